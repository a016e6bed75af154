"""CLIP vision tower (openai/clip-vit-*): patch conv without bias, class token, pre-LN, quick-GELU.
LLaVA reads the penultimate layer's patch features (class token dropped)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hub import hf_name, load_into, load_safetensors, read_config, resolve
from models.vit import Attention, resample_pos_embed

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    channels: int = 3
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    eps: float = 1e-5
    act: str = "quick_gelu"
    qkv_bias: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @classmethod
    def from_hf_config(cls, hf):
        hf = hf.get("vision_config", hf)  # a CLIPModel / LLaVA config holds the tower's config inside
        if hf.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation {hf['hidden_act']!r} is not supported")
        return cls(image_size=hf["image_size"], patch_size=hf["patch_size"], channels=hf.get("num_channels", 3),
                   dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                   mlp_dim=hf["intermediate_size"], eps=hf.get("layer_norm_eps", 1e-5),
                   act=hf.get("hidden_act", "quick_gelu"))

    def to_hf_config(self):
        """config.json of transformers' CLIPVisionModel: each field from_hf_config reads, written back."""
        return {"model_type": "clip_vision_model", "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": self.channels, "hidden_size": self.dim, "num_hidden_layers": self.depth,
                "num_attention_heads": self.heads, "intermediate_size": self.mlp_dim, "layer_norm_eps": self.eps,
                "hidden_act": self.act}


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps), nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class CLIPVision(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.blocks = nn.ModuleList(CLIPBlock(cfg) for _ in range(cfg.depth))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # pooled output only; LLaVA does not use it

    def hidden_states(self, pixel_values):
        """[embeddings, block 1, …, block N] outputs, each [B, 1 + patches, dim]."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], 1) + self.pos_embed
        states = [self.pre_norm(x)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def forward(self, pixel_values, layer=-2):
        """LLaVA's image features: patch tokens of hidden state `layer` (default penultimate)."""
        return self.hidden_states(pixel_values)[layer][:, 1:]


# Hugging Face name (CLIPVisionModel) -> our name ({} = layer index)
HF_TO_OURS = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.position_embedding.weight": "pos_embed",
    "pre_layrnorm.weight": "pre_norm.weight",  # sic: HF's spelling
    "pre_layrnorm.bias": "pre_norm.bias",
    "post_layernorm.weight": "post_norm.weight",
    "post_layernorm.bias": "post_norm.bias",
}
for _hf, _ours in [("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
                   ("self_attn.v_proj", "attn.v_proj"), ("self_attn.out_proj", "attn.o_proj"),
                   ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]:
    for _p in ("weight", "bias"):
        HF_TO_OURS[f"encoder.layers.{{}}.{_hf}.{_p}"] = f"blocks.{{}}.{_ours}.{_p}"


def hf_state_dict(model):
    """model.state_dict() under CLIPVisionModel's names: the table backwards; the position grid is an
    nn.Embedding table there."""
    out = {"vision_model." + hf_name(k, HF_TO_OURS): v for k, v in model.state_dict().items()}
    out["vision_model.embeddings.position_embedding.weight"] = model.pos_embed[0]
    return out


def clip_state(state, cfg):
    """The tower's tensors of a CLIPVisionModel / CLIPModel / LLaVA tower state dict (with or without
    the `vision_model.` prefix, text tower dropped), position grid resized to cfg.image_size."""
    prefixed = any(k.startswith("vision_model.") for k in state)
    out = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.") or not prefixed}
    pos = out["embeddings.position_embedding.weight"]
    out["embeddings.position_embedding.weight"] = resample_pos_embed(pos[None], cfg.image_size // cfg.patch_size)
    return out


def load_clip_vision(source, dtype=torch.float32):
    folder = resolve(source)
    cfg = CLIPVisionConfig.from_hf_config(read_config(folder))
    model = CLIPVision(cfg)
    state = load_safetensors(folder)
    load_into(model, clip_state(state, cfg), HF_TO_OURS, ignore=[r"embeddings\.position_ids"])
    return model.to(dtype)
