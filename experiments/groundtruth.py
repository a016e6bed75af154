"""A task whose answer is known: a frozen random deep network, and a teacher that is the same network
plus a planted update ΔW* on every q_proj and v_proj. A student (the frozen network + an adapter)
learns the teacher from few samples; how close its ΔW comes to ΔW* says when the IB gate and the
coordinator help, which no real benchmark can.

    smooth       ΔW*_ℓ = B(t_ℓ)·A(t_ℓ): rank k, both factors turning slowly with depth t_ℓ = ℓ/(L−1)
    independent  ΔW*_ℓ = B_ℓ·A_ℓ: rank k, drawn independently for every layer
    noisy        ΔW*_ℓ = B·A + b_ℓ·a_ℓᵀ: a shared rank-k update plus one independent direction per layer

    python -m experiments.groundtruth --structure smooth --method structlora --rank 4
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from training.common import add_method_args, make_adapter, optimizer

STRUCTURES = ("smooth", "independent", "noisy")
TARGETS = ("q_proj", "v_proj")


@dataclass
class GroundTruthConfig:
    dim: int = 32
    depth: int = 12
    planted_rank: int = 2   # k: rank of the planted (shared) structure
    scale: float = 0.5      # ‖ΔW*_ℓ‖_F / ‖W_ℓ‖_F
    noise: float = 0.5      # noisy: ‖b_ℓ·a_ℓᵀ‖_F / ‖B·A‖_F
    n_train: int = 64
    n_test: int = 2048


class Block(nn.Module):
    """x + v_proj(tanh(q_proj(rms_norm(x)))): an MLP block with the q/v names StructLoRA adapts. RMS, not
    LayerNorm: a LayerNorm output sums to 0, so q_proj's update along the all-ones input would be unseen."""

    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.v_proj(torch.tanh(self.q_proj(h)))


class DeepNet(nn.Module):
    def __init__(self, cfg: GroundTruthConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg.dim) for _ in range(cfg.depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def low_rank(d, k, g):
    return torch.randn(d, k, generator=g, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64)


def planted_shapes(cfg, structure, g):
    """The L un-normalized updates of one target name, in depth order."""
    L, d, k = cfg.depth, cfg.dim, cfg.planted_rank
    if structure == "smooth":  # factors on a quarter circle between two random ones: adjacent cosine ≈ 1
        (B0, A0), (B1, A1) = low_rank(d, k, g), low_rank(d, k, g)
        t = [math.pi / 2 * l / (L - 1) for l in range(L)]
        return [(math.cos(s) * B0 + math.sin(s) * B1) @ (math.cos(s) * A0 + math.sin(s) * A1) for s in t]
    if structure == "independent":
        return [B @ A for B, A in (low_rank(d, k, g) for _ in range(L))]
    if structure == "noisy":
        B, A = low_rank(d, k, g)
        shared = B @ A
        noise = [b @ a for b, a in (low_rank(d, 1, g) for _ in range(L))]
        return [shared + cfg.noise * shared.norm() / n.norm() * n for n in noise]
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")


def planted_updates(net, cfg, structure, g):
    """{layer name: ΔW*} for every q_proj and v_proj, each scaled to ‖ΔW*‖_F = scale·‖W‖_F."""
    deltas = {}
    for target in TARGETS:
        for l, dw in enumerate(planted_shapes(cfg, structure, g)):
            w = net.blocks[l].get_submodule(target).weight.detach()
            deltas[f"blocks.{l}.{target}"] = dw * (cfg.scale * w.double().norm() / dw.norm())
    return deltas


def make_task(cfg, structure, seed, dtype=torch.float32):
    """(base, teacher, ΔW*, (x_train, y_train), (x_test, y_test)): teacher = base with W ← W + ΔW*."""
    g = torch.Generator().manual_seed(seed)
    base = DeepNet(cfg).to(dtype)
    with torch.no_grad():
        for p in base.parameters():  # W ~ N(0, 1/d): each block adds an O(1) change to the residual stream
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(cfg.dim))
    deltas = planted_updates(base, cfg, structure, g)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name, dw in deltas.items():
            teacher.get_submodule(name).weight += dw.to(dtype)
    x = torch.randn(cfg.n_train + cfg.n_test, cfg.dim, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        y = teacher(x)
    base.requires_grad_(False)
    teacher.requires_grad_(False)
    split = cfg.n_train
    return base, teacher, deltas, (x[:split], y[:split]), (x[split:], y[split:])


# ----------------------------------------------------------------------------------------------
# how close a learned update comes to the planted one


def relative_error(learned, planted):
    """‖ΔW − ΔW*‖_F / ‖ΔW*‖_F over all layers together."""
    num = sum(float((learned[n] - planted[n]).norm() ** 2) for n in planted)
    return math.sqrt(num / sum(float(planted[n].norm() ** 2) for n in planted))


def subspace_angle(learned, planted, tol=1e-8):
    """Largest principal angle (degrees) between the column space of ΔW* and the top-k left singular
    subspace of ΔW (k = rank of ΔW*)."""
    U, S, _ = torch.linalg.svd(planted.double())
    k = int((S > tol * S[0]).sum())
    Q = torch.linalg.svd(learned.double())[0][:, :k]
    cos = torch.linalg.svdvals(Q.T @ U[:, :k]).clamp(max=1.0)
    return math.degrees(math.acos(float(cos.min())))


def learned_updates(merged, base):
    """ΔW of every planted layer: merged weights minus the frozen ones (any method, DoRA included)."""
    return {n: (m.weight.double() - b.weight.double()).detach() for (n, m), (_, b) in
            zip(merged.named_modules(), base.named_modules()) if n.rpartition(".")[2] in TARGETS}


# ----------------------------------------------------------------------------------------------
# the script: one student on one task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = GroundTruthConfig()
    p.add_argument("--structure", default="smooth", choices=STRUCTURES)
    for field in ("dim", "depth", "planted_rank", "n_train", "n_test"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(d, field))
    p.add_argument("--scale", type=float, default=d.scale)
    p.add_argument("--noise", type=float, default=d.noise)
    p.add_argument("--steps", type=int, default=300, help="full-batch AdamW steps")
    p.add_argument("--lr", type=float, default=1e-2)
    add_method_args(p, rank=4, baselines=True)
    p.add_argument("--out", default="runs/groundtruth")
    return p.parse_args(argv)


def main(args):
    torch.manual_seed(args.seed)
    cfg = GroundTruthConfig(**{f: getattr(args, f) for f in asdict(GroundTruthConfig())})
    base, teacher, planted, (x, y), (x_test, y_test) = make_task(cfg, args.structure, args.seed)
    # N of β·KL/N: the count the task loss is a mean over, here n_train × dim outputs (F.mse_loss)
    student = make_adapter(copy.deepcopy(base), args, args.steps, cfg.n_train * cfg.dim)
    opt, sched = optimizer(student.param_groups(args.lr, args.control_lr, args.weight_decay), args, args.steps)
    t0 = time.time()
    student.train()
    for _ in tqdm(range(args.steps), desc=f"{args.structure} {args.method}", leave=False):
        loss = F.mse_loss(student(x), y) + student.aux_loss()
        loss.backward()
        opt.step()
        sched.step()
        student.step()  # before zero_grad: AdaLoRA's step reads .grad
        opt.zero_grad(set_to_none=True)
    train_s = time.time() - t0
    student.eval()
    with torch.no_grad():
        # relative test loss: 1 = no better than the frozen network, 0 = the teacher exactly
        floor = F.mse_loss(base(x_test), y_test).item()
        test_loss = F.mse_loss(student(x_test), y_test).item() / floor
        open_dirs = student.open_directions()
        learned = learned_updates(student.merge_and_unload(), base)
    metrics = {
        "test_loss": test_loss, "train_loss": loss.item(), "relative_error": relative_error(learned, planted),
        "subspace_angle": sum(subspace_angle(learned[n], planted[n]) for n in planted) / len(planted),
        "open_directions": open_dirs, "train_seconds": train_s, "args": vars(args),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"{args.structure} {args.method} r={args.rank}: test loss {test_loss:.3f} of the frozen network's, "
          f"‖ΔW − ΔW*‖/‖ΔW*‖ {metrics['relative_error']:.3f}, subspace angle {metrics['subspace_angle']:.1f}°")
    return metrics


if __name__ == "__main__":
    main(parse_args())
