"""A small attention-shaped model with q_proj/k_proj/v_proj/o_proj in every block, for fast tests."""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from structlora import StructLoRA, StructLoRAConfig


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm(x)
        att = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(-1, -2) / h.shape[-1] ** 0.5, -1)
        return x + self.o_proj(att @ self.v_proj(h))


class ToyModel(nn.Module):
    def __init__(self, d=16, n_layers=5, n_out=3, checkpointing=None):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(n_layers))
        self.head = nn.Linear(d, n_out)
        self.checkpointing = checkpointing  # None, "reentrant" or "non-reentrant": recompute blocks in backward

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
            else:
                x = block(x)
        return self.head(x.mean(1))


def randomize_adapters(slora, seed=0, scale=0.3):
    """Non-zero B (it starts at zero), varied gates and η, so every term of ΔW^f is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in slora.lora_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
            if layer.gate_logits is not None:
                layer.gate_logits.copy_(torch.randn(layer.r, generator=g) * 2)
        for graph in slora.graphs.values():
            for p in graph.coordinator.parameters():  # η's logit ψ, each Θ^(t) (near 0.5·I), or yours
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 * torch.eye(p.shape[0]) if p.dim() == 2 else 0.3))


def randomize(model, seed=0):
    """Random values everywhere (norms, biases, layer scales too), so no weight can be silently missed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return model.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_toy(**cfg):
    """StructLoRA (r = 4, no semantic rebuilds unless asked) on a ToyModel, with random adapters."""
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(), StructLoRAConfig(**{"r": 4, "alpha": 8, "num_train_examples": 64, "semantic_every": 0, **cfg}))
    randomize_adapters(slora)
    return slora


def train_steps(slora, n, autocast=False):
    """n SGD steps on random inputs (seeded by step), optionally under bf16 autocast."""
    opt = torch.optim.SGD(slora.trainable_parameters(), lr=1e-2)
    for s in range(n):
        torch.manual_seed(s)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = slora(torch.randn(4, 5, 16)).float().square().mean()
        (loss + slora.aux_loss()).backward()
        opt.step()
        slora.step()
        opt.zero_grad()
