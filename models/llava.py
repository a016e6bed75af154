"""LLaVA-1.5: a vision tower, a two-layer GELU projector, and a LLaMA decoder that reads the
projected patch features in place of its `<image>` tokens."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import clip
from models import llama as llama_mod
from models import vit
from models.clip import HF_TO_OURS as CLIP_TO_OURS, CLIPVision, CLIPVisionConfig, clip_state
from models.hub import load_into, load_safetensors, read_config, resolve, save_folder

OUR_LAYOUT = "structlora_llava"  # a tower transformers' LlavaForConditionalGeneration does not have (DINOv2)


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: linear → GELU → linear."""

    def __init__(self, vision_dim, text_dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(vision_dim, text_dim), nn.Linear(text_dim, text_dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class Llava(nn.Module):
    def __init__(self, vision_tower, language_model, image_token_id, vision_layer=-2):
        super().__init__()
        self.vision_tower, self.language_model = vision_tower, language_model
        self.image_token_id, self.vision_layer = image_token_id, vision_layer
        self.projector = Projector(vision_tower.cfg.dim, language_model.cfg.dim)

    def image_features(self, pixel_values):
        """[B, patches, text dim]: CLIP's layer `vision_layer`, or a ViT/DINOv2's last normed layer."""
        if isinstance(self.vision_tower, vit.ViT):
            feats = self.vision_tower.features(pixel_values)[:, 1:]
        else:
            feats = self.vision_tower(pixel_values, self.vision_layer)
        return self.projector(feats)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, logits_at=None):
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.image_features(pixel_values).to(x.dtype)
            slots = input_ids == self.image_token_id
            if slots.sum() != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} <image> tokens for {feats.shape[0]}×{feats.shape[1]} image features")
            x = x.masked_scatter(slots[..., None], feats)  # each <image> slot takes one patch feature
        return self.language_model(inputs_embeds=x, attention_mask=attention_mask, logits_at=logits_at)


# Checkpoint prefixes: transformers ≥ 5 (first) and 4.x layouts -> one canonical layout
PREFIXES = [("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "projector."),
            ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("vision_tower.", "vision_tower."), ("multi_modal_projector.", "projector."),
            ("language_model.", "language_model.")]


def hf_state_dict(model):
    """model.state_dict() under transformers 5's LlavaForConditionalGeneration names (also its module
    paths): each part renamed by its own family, then PREFIXES' first (transformers 5) rows read backwards."""
    parts = {"vision_tower": clip.hf_state_dict(model.vision_tower), "projector": model.projector.state_dict(),
             "language_model": llama_mod.hf_state_dict(model.language_model)}
    return {hf_key(f"{part}.{k}"): v for part, state in parts.items() for k, v in state.items()}


def hf_key(canonical_key):
    """A key of the canonical layout (part. + the part's own HF name) -> its transformers 5 LLaVA name."""
    hf, ours = next((o, n) for o, n in PREFIXES[:4] if canonical_key.startswith(n))
    return hf + canonical_key[len(ours):]


def canonical(state):
    out = {}
    for k, v in state.items():
        old, new = next(((o, n) for o, n in PREFIXES if k.startswith(o)), (None, None))
        if old is None:
            raise ValueError(f"unexpected key {k} in a LLaVA checkpoint")
        out[new + k[len(old):]] = v
    return out


def save_pretrained(model, folder, source):
    """A LlavaForConditionalGeneration folder with the tokenizer and processor files of `source`. A
    DINOv2 tower has no transformers LLaVA class: then our layout, the parts as transformers folders."""
    if isinstance(model.vision_tower, vit.ViT):
        return save_our_layout(model, folder, source)
    vcfg, lcfg = model.vision_tower.cfg, model.language_model.cfg
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "vision_config": vcfg.to_hf_config(), "text_config": lcfg.to_hf_config(),
              "image_token_index": model.image_token_id, "image_seq_length": (vcfg.image_size // vcfg.patch_size) ** 2,
              "projector_hidden_act": "gelu", "vision_feature_layer": model.vision_layer,
              "vision_feature_select_strategy": "default", "tie_word_embeddings": lcfg.tie_embeddings}
    processor = ("preprocessor_config.json", "processor_config.json", "chat_template.json")
    save_folder(folder, config, hf_state_dict(model), copy_from=resolve(source), files=llama_mod.TOKENIZER_FILES + processor)


def save_our_layout(model, folder, source):
    """LLaVA with a DINOv2 tower: language_model/ (LlamaForCausalLM), vision_tower/ (Dinov2Model),
    projector.safetensors and a config.json that load_llava reads."""
    import json
    from safetensors.torch import save_file
    print(f"transformers has no LLaVA class with a DINOv2 tower: {folder} holds language_model/ "
          "(LlamaForCausalLM), vision_tower/ (Dinov2Model) and projector.safetensors")
    vit.save_pretrained(model.vision_tower, os.path.join(folder, "vision_tower"))
    llama_mod.save_pretrained(model.language_model, os.path.join(folder, "language_model"), source)
    save_file({k: v.contiguous().cpu() for k, v in model.projector.state_dict().items()},
              os.path.join(folder, "projector.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": OUR_LAYOUT, "image_token_index": model.image_token_id,
                   "note": "no transformers class has this tower; models.llava.load_llava reads it"}, f, indent=1)


def load_llava(source, dtype=torch.float32):
    """A LlavaForConditionalGeneration checkpoint (llava-hf/llava-1.5-7b-hf layout), or our layout."""
    folder = resolve(source)
    hf = read_config(folder)
    if hf.get("model_type") == OUR_LAYOUT:
        from safetensors.torch import load_file
        model = Llava(vit.load_vit(os.path.join(folder, "vision_tower")),
                      llama_mod.load_llama(os.path.join(folder, "language_model")), hf["image_token_index"])
        model.projector.load_state_dict(load_file(os.path.join(folder, "projector.safetensors")))
        return model.to(dtype)
    if hf.get("model_type") != "llava":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not llava")
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("only vision_feature_select_strategy='default' (class token dropped) is supported")
    state = canonical(load_safetensors(folder))
    vcfg = CLIPVisionConfig.from_hf_config(hf["vision_config"])
    vision = CLIPVision(vcfg)
    vstate = clip_state({k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")}, vcfg)
    no_post = "post_layernorm.weight" not in vstate  # some exports drop the unused post-norm
    load_into(vision, vstate, CLIP_TO_OURS, ignore=[r"embeddings\.position_ids"],
              skip=("post_norm.weight", "post_norm.bias") if no_post else ())
    lm = llama_mod.Llama(llama_mod.LlamaConfig.from_hf_config({"model_type": "llama", **hf["text_config"]}))
    lstate = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    tied = ["lm_head.weight"] if lm.cfg.tie_embeddings else []
    load_into(lm, lstate, llama_mod.HF_TO_OURS, ignore=tied, skip=tied)
    vision_layer = hf.get("vision_feature_layer", -2)
    model = Llava(vision, lm, hf.get("image_token_index", hf.get("image_token_id")), vision_layer)
    pstate = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    model.projector.load_state_dict(pstate)  # strict: names any missing or unexpected projector key
    return model.to(dtype)
