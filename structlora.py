"""StructLoRA: structured, task-aware low-rank adaptation, in one file of plain PyTorch.

Paper: "Not All Directions Matter: Toward Structured and Task-Aware Low-Rank Adaptation"
(arXiv 2603.14228). Read beside docs/paper.md (section numbers below refer to it).

    §1  LoRA            ΔW   = (α/r)·B·A                                   LoRALinear
    §2  IB gate         ΔW̃   = (α/r)·B·diag(m)·A,  m ~ Concrete(φ, τ)      gate_values, bernoulli_kl
    §3  coordinator     smooth: ΔW^f = C^T·ΔW̃,  C = (1-η)·I + η·Â          Smooth
                        gcn:    h ← h + σ((Â-I)·h·Θ^(t)),  t = 1..T         GCN
    §4  loss, merge     L = L_task + (β/N)·Σ KL(q(m)‖p(m));  W = W0 + ΔW^f StructLoRA

The coordinated update of layer ℓ is computed in factor form inside that layer's forward:

      x ──► A_cat ──► ⊙ d ──► B'_cat ──► + ──► y        A_cat = [A_s; …]   (the K sources s of ℓ)
      └──────────────► W0 ─────────────────┘              d     = (α/r)·[m_s; …]   (gates, §2)
                                                          B'    = coordinator(ℓ, [B_s, …])  (§3)

No d×k matrix is formed while training, and nothing computed in one forward is kept on a module
for a later one: gate noise comes from torch's global RNG inside the forward that uses it, so
activation checkpointing recomputes the same sample. merge_and_unload() folds ΔW^f into the frozen
weights once and returns the plain base model.
"""
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# the largest budget_margin: σ(±50) is 0 or 1 in float32 already (bernoulli_kl clamps φ there), and λ·violation
# grows as δ², so a larger δ only overflows the budget's loss (δ = 1e30: inf, and no gate moves)
MAX_BUDGET_MARGIN = 50.0
LEGACY_BUDGET_MARGIN = 0.5  # budget mode's δ, a constant, in saves written before budget_margin was a field


@dataclass
class StructLoRAConfig:
    r: int = 8                        # rank of each update
    alpha: float = 16.0               # LoRA scaling numerator: ΔW is scaled by α/r
    dropout: float = 0.0              # dropout on the LoRA input
    target_modules: tuple = ("q_proj", "v_proj")  # nn.Linear names (last path component) to adapt
    modules_to_save: tuple = ()       # modules trained fully and saved with the adapter (e.g. a new head)
    ib: bool = True                   # §2 IB gate on the r directions (False: m = 1)
    graph: bool = True                # §3 graph coordinator across depth (False: each layer alone)
    # §2 IB gate
    beta: float = 1.0                 # weight of the KL penalty on the whole training set (1: the ELBO's)
    ib_weighting: str = "example"     # "example": β·KL/N per step (ELBO: the KL spread over the N examples the
                                      # task loss averages); "step": β·KL per step (study v1, grows with run length)
    num_train_examples: int = 0       # N, the training-set size: needed by ib_weighting="example"
    prior: float = 0.2                # π0 < prune_below, so a direction the task does not hold open closes
    budget: float = 0.0               # 0: off; else the share of directions kept open, held by a Lagrange multiplier
    budget_lr: float = 0.1            # dual-ascent rate of its multipliers λ (per step, per nat of violation)
    budget_margin: float = 4.0        # δ: budget mode holds the gates this far (in logit) on their side of logit(p)
    tau: float = 0.5                  # temperature of the relaxed-Bernoulli sample
    gate_init: float = 0.9            # σ(φ) at step 0: gates start open (must be ≥ prune_below)
    prune_below: float = 0.5          # at eval and merge, directions with σ(φ) below this are cut to 0
    kl_warmup_steps: int = 0          # the KL term starts after this many step() calls (see kl_schedule)
    kl_schedule: str = "hold"         # "hold": 0 then β (Adam ignores a gradient's scale: a ramp would not
                                      # slow the gates while B ≈ 0 gives φ no task signal); "linear": 0 → β
    # §3 graph coordinator
    coordinator: str = "smooth"       # "smooth" (residual Laplacian step), "gcn" (learnable Θ, σ), "custom"
    graph_layers: int = 1             # T: message-passing layers; the update of ℓ mixes its T-hop neighbourhood
    edges: str = "hybrid"             # "hybrid" = chain ∪ semantic, "chain" (depth only), "semantic" (gradients only)
    gcn_activation: str = "tanh"      # σ of the gcn coordinator, on B factors: "tanh" or "identity"
    graph_norm: str = "rw"            # Â = D^-1 (A+I) ("rw") or D^-1/2 (A+I) D^-1/2 ("sym", GCN)
    eta_max: float = 1.0              # η = η_max·σ(ψ) ∈ (0, η_max], η_max ≤ 1 keeps the drift-energy theorem
    eta_init: float = 0.1             # η at step 0 (gcn: Θ^(t) = η_init·I at step 0)
    semantic_every: int = 50          # K: rebuild the semantic edges every K step() calls (0: never)
    sketch_dim: int = 16              # p: width of the random gradient sketch G·P
    sketch_ema: float = 0.9           # EMA factor of the sketches across rebuilds
    semantic_topk: int = 1            # k: every layer has at most k semantic neighbours (greedy, best cosine first)
    semantic_threshold: float = 0.05  # minimum sketch cosine (measured between layers of DINOv2-S: 0.00–0.05)
    # static regularizer baselines of the paper's appendix (added by aux_loss(), on ΔW̃ of depth neighbours)
    reg: str = "none"                 # "cos": Σ (1 − cos(ΔW̃_i, ΔW̃_j)); "laplacian": Σ ‖ΔW̃_i − ΔW̃_j‖²
    reg_weight: float = 1e-2
    seed: int = 0                     # seed of A's init and of the sketch projection P

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules, self.modules_to_save = tuple(self.target_modules), tuple(self.modules_to_save)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0 or not 0 <= self.beta < math.inf or self.kl_warmup_steps < 0:
            raise ValueError(f"need alpha > 0, a finite beta ≥ 0 and kl_warmup_steps ≥ 0; got alpha {self.alpha}, "
                             f"beta {self.beta}, kl_warmup_steps {self.kl_warmup_steps}")
        if not isinstance(self.num_train_examples, int) or self.num_train_examples < 0:
            raise ValueError(f"num_train_examples must be an integer ≥ 0, got {self.num_train_examples!r}")
        if not 0 < self.budget_margin <= MAX_BUDGET_MARGIN:
            raise ValueError(f"budget_margin must lie in (0, {MAX_BUDGET_MARGIN:g}] (a logit: σ(±50) is 0 or 1 in "
                             f"float32, a larger one overflows the budget's loss), got {self.budget_margin}")
        if not 0 <= self.budget < 1 or not 0 < self.budget_lr < math.inf:
            raise ValueError(f"need 0 ≤ budget < 1 (0: off) and a finite budget_lr > 0; got budget {self.budget}, "
                             f"budget_lr {self.budget_lr}")
        if self.budget > 0 and not self.ib:
            raise ValueError("budget holds the share of open IB gates: it needs ib=True")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        if not 0 < self.prior < 1 or not 0 < self.gate_init < 1 or not 0 < self.prune_below < 1:
            raise ValueError("prior, gate_init and prune_below must lie in (0, 1)")
        if self.ib and self.gate_init < self.prune_below:
            raise ValueError(f"gate_init {self.gate_init} < prune_below {self.prune_below} closes every direction "
                             "at step 0; start the gates open")
        if self.ib and self.prior >= self.prune_below:
            raise ValueError(f"need prior π0 {self.prior} < prune_below {self.prune_below}: a direction the task "
                             "does not hold open must be able to close")
        if self.tau <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("tau must be > 0 and dropout in [0, 1)")
        choices = {"coordinator": ("smooth", "gcn", "custom"), "edges": ("hybrid", "chain", "semantic"),
                   "gcn_activation": ("tanh", "identity"), "graph_norm": ("rw", "sym"),
                   "ib_weighting": ("example", "step"), "kl_schedule": ("hold", "linear"),
                   "reg": ("none", "cos", "laplacian")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not 0 < self.eta_max <= 1:
            raise ValueError(f"need 0 < eta_max ≤ 1 (the drift-energy theorem needs η ≤ 1), got {self.eta_max}")
        if not 0 < self.eta_init < self.eta_max:
            raise ValueError("need 0 < eta_init < eta_max")
        if not isinstance(self.graph_layers, int) or self.graph_layers < 1:
            raise ValueError(f"graph_layers must be an integer ≥ 1, got {self.graph_layers!r}")
        if not isinstance(self.semantic_topk, int) or self.semantic_topk < 0 or self.semantic_every < 0 \
                or self.reg_weight < 0 or self.sketch_dim < 1:
            raise ValueError("semantic_topk (an integer), semantic_every and reg_weight must be ≥ 0, sketch_dim ≥ 1")
        if not 0 <= self.sketch_ema < 1 or not -1 <= self.semantic_threshold < 1:
            raise ValueError("need 0 ≤ sketch_ema < 1 and -1 ≤ semantic_threshold < 1 (a cosine)")
        if self.graph and self.edges == "semantic" and (self.semantic_every == 0 or self.semantic_topk == 0):
            raise ValueError("edges='semantic' with semantic_every=0 or semantic_topk=0 never builds an edge")


def with_saved_margin(fields):
    """A saved config dict (or a checkpoint's args) with the budget margin it trained at: a budget-mode save
    written before budget_margin was a field trained at δ = LEGACY_BUDGET_MARGIN, not at today's default."""
    if fields.get("budget", 0) > 0 and "budget_margin" not in fields:
        return {**fields, "budget_margin": LEGACY_BUDGET_MARGIN}
    return fields


def saved_config(config):
    """The StructLoRAConfig of a saved adapter's config dict."""
    return StructLoRAConfig(**with_saved_margin(config))


# ----------------------------------------------------------------------------------------------
# §2 the IB gate


def concrete_sample(logits, tau):
    """Relaxed-Bernoulli (binary Concrete) sample, reparameterized: m = σ((φ + log u − log(1−u))/τ).
    u comes from torch's global RNG, so a seed makes it repeatable and checkpointing recomputes it."""
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.sigmoid((logits + torch.logit(u, eps=1e-6)) / tau).to(logits.dtype)  # logit(u) = log u − log(1−u)


def deterministic_gate(logits, prune_below):
    """Eval and merge: m = σ(φ), with directions below prune_below cut to exactly 0."""
    q = torch.sigmoid(logits)
    return q * (q >= prune_below)


def bernoulli_kl(logits, prior):
    """KL(Bern(σ(φ)) ‖ Bern(π0)) per direction: the variational bound on I(ΔW̃; X)."""
    logits = logits.clamp(-50, 50)  # σ(±50) is 0 or 1 in float32 already; ±inf would give 0·∞
    q = torch.sigmoid(logits)
    log_q, log_1mq = F.logsigmoid(logits), F.logsigmoid(-logits)
    return q * (log_q - math.log(prior)) + (1 - q) * (log_1mq - math.log(1 - prior))


def gate_values(layers, training):
    """§2: m for each layer's r directions, [len(layers), r]: a fresh Concrete sample in training,
    σ(φ) with weak directions cut at eval; the fixed mask when the layers have no IB gate."""
    if layers[0].gate_logits is None:
        return torch.stack([l.mask for l in layers])
    phi, cfg = torch.stack([l.gate_logits for l in layers]), layers[0].cfg
    return concrete_sample(phi, cfg.tau) if training else deterministic_gate(phi, cfg.prune_below)


# ----------------------------------------------------------------------------------------------
# §1 the LoRA layer, computing its (coordinated) update in factor form


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus y += B'_cat·diag(d)·A_cat·x (§1–§3, factor form)."""

    def __init__(self, base: nn.Linear, cfg: StructLoRAConfig, generator=None):
        super().__init__()
        self.base, self.r, self.scaling, self.cfg = base, cfg.r, cfg.alpha / cfg.r, cfg
        if is_linear4bit(base):
            check_linear4bit(base)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.r, **kw))  # ΔW = 0 at step 0
        bound = 1 / math.sqrt(base.in_features)  # = kaiming_uniform_(a=√5), as loralib and peft
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        # §2: gate logits φ, σ(φ) = gate_init at step 0
        init = math.log(cfg.gate_init / (1 - cfg.gate_init))
        self.gate_logits = nn.Parameter(torch.full((cfg.r,), init, **kw)) if cfg.ib else None
        # A fixed 0/1 mask on the directions (all ones unless training/baselines.py's mask_directions set it)
        self.register_buffer("mask", torch.ones(cfg.r, **kw))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.graph = None                        # (LayerGraph, index of this layer), set by StructLoRA
        self.precomputed = None                  # this layer's factors, only during one no-grad eval call
        self.sketch_P, self.sketch = None, None  # §3 gradient sketch, only while armed by step()

    def factors(self):
        """(B, d, A) with ΔW^f = B·diag(d)·A, computed now from the parameters."""
        if self.precomputed is not None and not self.training and not torch.is_grad_enabled():
            return self.precomputed  # set by StructLoRA.forward for this one eval call, then cleared
        if self.graph is None:
            return self.lora_B, self.scaling * gate_values([self], self.training)[0], self.lora_A  # §2
        graph, i = self.graph
        return graph.factors(i, self.training)

    def delta_weight(self):
        """ΔW^f as a dense out×in matrix (merge and diagnostics only, never in training)."""
        B, d, A = self.factors()
        return (B * d) @ A

    def forward(self, x):
        B, d, A = self.factors()
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(A.dtype)  # adapters stay float32 on a bf16/fp16 base
        y = self.base(x)
        y = y + F.linear(F.linear(h, A) * d, B).to(y.dtype)  # W0·x + B'·diag(d)·A·x
        if self.sketch_P is not None and y.requires_grad:
            self._add_sketch_hook(y, x)
        return y

    def _add_sketch_hook(self, y, x):
        # §3: G·P = Σ_tokens (∂L/∂y)(Pᵀx)ᵀ, the gradient a zero-valued probe y += Z·(Pᵀx) would get.
        # Accumulated like .grad between two step() calls; recomputation under checkpointing adds no
        # second hook that fires (non-reentrant) or runs the only one (reentrant).
        with torch.autocast(x.device.type, enabled=False):  # the hook runs in backward, outside autocast
            xp = x.detach().flatten(0, -2).float() @ self.sketch_P

        def hook(g):
            s = g.detach().flatten(0, -2).float().T @ xp
            self.sketch = s if self.sketch is None else self.sketch + s
        y.register_hook(hook)

    def extra_repr(self):
        return f"r={self.r}, scaling={self.scaling:g}, ib={self.gate_logits is not None}"


# ----------------------------------------------------------------------------------------------
# §3 the graph: nodes are the adapted layers of one target name, in depth order


def propagation_matrix(adj, norm="rw"):
    """Â from a 0/1 adjacency without self-loops: D^-1(A+I) ("rw") or D^-1/2(A+I)D^-1/2 ("sym").

    "rw" is our default: its rows sum to 1, so equal updates stay equal, and the smoothing step
    provably does not increase the paper's drift energy E = Σ_(i,j)∈E ‖ΔW_i − ΔW_j‖² (the
    combinatorial Laplacian D−(A+I) is D·(I−Â_rw)). "sym" is the GCN normalization the summary
    quotes; for it only the normalized energy tr(Hᵀ(I−Â)H) is guaranteed not to increase.
    """
    a = adj + torch.eye(adj.shape[0], dtype=adj.dtype, device=adj.device)
    deg = a.sum(1)
    if norm == "rw":
        return a / deg[:, None]
    return a / torch.sqrt(deg[:, None] * deg[None, :])


def chain_adjacency(depth):
    """Edges between depth neighbours: nodes whose positions among the layers of their target name
    differ by one (layers 0, 1, 4 of a shape group: 0–1 only, when layers 2, 3 have another shape)."""
    d = torch.as_tensor(depth)
    return ((d[:, None] - d[None, :]).abs() == 1).float()


def semantic_adjacency(sketches, topk, threshold, exclude):
    """Edges i–j whose gradient sketches align (cosine > threshold), best first, each node taking at
    most `topk` of them; pairs where `exclude` is set (existing edges, self) are never chosen."""
    z = F.normalize(sketches.flatten(1).double(), dim=1)
    silent = (z.norm(dim=1) == 0) | ~torch.isfinite(z).all(1)  # no gradient reached it yet, or a NaN/inf one
    cos = (z @ z.T).masked_fill(exclude.bool() | torch.eye(len(z), dtype=torch.bool) | silent[:, None] | silent, -2.0)
    adj, deg = torch.zeros_like(exclude, dtype=torch.float32), [0] * len(z)
    iu = torch.triu_indices(len(z), len(z), 1)
    for k in cos[iu[0], iu[1]].argsort(descending=True, stable=True).tolist():
        i, j = iu[0, k].item(), iu[1, k].item()
        if cos[i, j] <= threshold:
            break
        if deg[i] < topk and deg[j] < topk:
            adj[i, j] = adj[j, i] = 1.0
            deg[i], deg[j] = deg[i] + 1, deg[j] + 1
    return adj


def factor_inner(f, g):
    """⟨B_f·A_f, B_g·A_g⟩_F from r×r products only: Σ (B_fᵀB_g) ⊙ (A_f A_gᵀ)."""
    return ((f[0].T @ g[0]) * (f[1] @ g[1].T)).sum()


def factor_gram(factors):
    """G_ij = ⟨ΔW_i, ΔW_j⟩_F for ΔW_i = B_i·A_i given as factor pairs (B_i, A_i)."""
    return torch.stack([torch.stack([factor_inner(f, g) for g in factors]) for f in factors])


def drift_energy(gram, adj):
    """E = Σ_(i,j)∈E ‖H_i − H_j‖², from the Gram matrix G_ij = ⟨H_i, H_j⟩_F (each edge once)."""
    g = torch.diagonal(gram)
    sq = g[:, None] + g[None, :] - 2 * gram
    return 0.5 * (adj * sq).sum()


def edge_cosine(gram, adj, eps=1e-30):
    """Cosine between vec(ΔW_i) and vec(ΔW_j) for every edge (i < j) of adj."""
    i, j = torch.triu(adj, 1).nonzero().unbind(1)
    g = torch.diagonal(gram)
    return gram[i, j] / torch.sqrt((g[i] * g[j]).clamp_min(eps))


def adjacent_cosine(gram):
    """Mean cosine between vec(ΔW_ℓ) and vec(ΔW_ℓ+1) (the paper: ≈0.34 for LoRA, ≈0.62 StructLoRA)."""
    g = torch.diagonal(gram).clamp_min(1e-30)
    cos = torch.diagonal(gram, 1) / torch.sqrt(g[:-1] * g[1:])
    return cos.mean() if cos.numel() else gram.new_tensor(float("nan"))


def check_adjacency(adj):
    if not (torch.equal(adj, adj.T) and (adj.diagonal() == 0).all() and ((adj == 0) | (adj == 1)).all()):
        raise ValueError("adjacency must be 0/1, symmetric, with a zero diagonal")
    return adj


def _edges_changed(graph, incompatible_keys):
    graph.set_edges(graph.adj)  # after load_state_dict: Â and the sources follow the loaded edges


def hop_order(adj, hops):
    """For each node i: the nodes within `hops` edges, nearest first (i itself first), and how many
    lie within 0, 1, …, hops edges. The sources whose updates can reach i in T message passes."""
    n, nbrs = len(adj), [row.nonzero().flatten().tolist() for row in adj.cpu()]
    orders, counts = [], []
    for i in range(n):
        order, frontier, count = [i], [i], [1]
        for _ in range(hops):
            frontier = sorted({j for f in frontier for j in nbrs[f]} - set(order))
            order += frontier
            count.append(len(order))
        orders.append(order)
        counts.append(count)
    return orders, counts


# ----------------------------------------------------------------------------------------------
# §3 the coordinators. A coordinator is the seam for new ideas: an nn.Module built as
# `Coordinator(graph)` whose forward(graph, i, B) maps the gated B factors of node i's sources,
# B[:, k] = B_s·diag(m_s) for the K nodes s = graph.sources[i][k], [out, K, r], to coordinated ones
# of the same shape: h^(0) = ΔW̃ in factor form. The A's apply after it, on open directions only:
# ΔW^f_i = Σ_s B'_s·diag((α/r)·[m_s ≠ 0])·A_s, so a pruned direction (b_j, a_j) has no influence
# whatever the coordinator mixes. Its parameters train at the control lr. Pass your own as
# StructLoRA(model, cfg, coordinator=YourClass) with cfg.coordinator = "custom".


class Smooth(nn.Module):
    """§3 residual Laplacian smoothing, T times: ΔW^f = C^T·ΔW̃, C = I − η·L = (1−η)·I + η·Â."""

    def __init__(self, graph):
        super().__init__()
        cfg = graph.cfg
        self.eta_max, self.T = cfg.eta_max, cfg.graph_layers
        psi = math.log(cfg.eta_init / (cfg.eta_max - cfg.eta_init))  # η = η_max·σ(ψ), shared by the graph
        self.eta_logit = nn.Parameter(torch.tensor(psi, device=graph.adj.device))

    def eta(self):
        eta = torch.sigmoid(self.eta_logit)
        return eta if self.eta_max == 1 else self.eta_max * eta

    def forward(self, graph, i, B):
        eta, K = self.eta(), B.shape[1]
        if self.T == 1:  # row i of C = I − η·L over i's sources (i first): e_0 − η·L_i,sources
            c = graph.eye[0, :K] - eta * graph.lap[i, :K]
        else:
            v = graph.eye[i]
            for _ in range(self.T):
                v = v - eta * (v - v @ graph.a_hat)  # row i of C^t = (1−η)·v + η·v·Â
            c = v[graph.source_index(i)]
        return B * c[:, None]  # B'_s = (C^T)_is·B_s·diag(m_s)


class GCN(nn.Module):
    """§3 the paper's residual GCN in factor space: h_ℓ ← h_ℓ + σ(Σ_j (Â − I)_ℓj·h_j·Θ^(t)), T layers.

    A node's state h is its B factor on each source's r directions, starting from the gated
    B_s·diag(m_s): the A_s stay fixed, so Θ^(t) ∈ R^{r×r} and σ act on weight-space factors, never on
    activations, and the update stays low-rank and mergeable; closed directions are cut again after Θ
    has mixed the columns. σ = identity with Θ^(t) = η·I is Smooth exactly."""

    def __init__(self, graph):
        super().__init__()
        cfg = graph.cfg
        eye = torch.eye(cfg.r, device=graph.adj.device)
        self.theta = nn.ParameterList(nn.Parameter(cfg.eta_init * eye) for _ in range(cfg.graph_layers))
        self.act = torch.tanh if cfg.gcn_activation == "tanh" else nn.Identity()

    def forward(self, graph, i, B):
        if len(self.theta) == 1:  # T = 1: h_i on source s is δ_is·B_s + σ((Â − I)_is·B_s·Θ), i first
            K = B.shape[1]
            return B * graph.eye[0, :K, None] + self.act(-graph.lap[i, :K, None] * (B @ self.theta[0]))
        idx, within = graph.source_index(i), graph.counts[i]  # sources nearest first; within[h]: ≤ h hops
        T = len(self.theta)
        H = torch.einsum("js,osr->josr", graph.eye.new_ones(len(idx)).diag(), B)  # h_j^(0): B_j on source j
        for t, theta in enumerate(self.theta, 1):
            rows = idx[:within[T - t]]  # nodes whose state layer t must still feed towards node i
            L = graph.a_hat.index_select(0, rows).index_select(1, idx[:len(H)]) - graph.eye[rows][:, idx[:len(H)]]
            H = H[:len(rows)] + self.act(torch.einsum("jk,kosr->josr", L, H) @ theta)
        return H[0]


# ----------------------------------------------------------------------------------------------
# §3 the graph: nodes are the adapted layers of one role and shape, in depth order


class LayerGraph(nn.Module):
    """One node per adapted layer; edges: depth neighbours (chain) and/or layers whose gradient sketches
    align (semantic); and the coordinator that mixes the nodes' updates along them."""

    def __init__(self, layers, depth, cfg: StructLoRAConfig, seed: int, coordinator, process_group=None):
        super().__init__()
        self.layers, self.cfg = list(layers), cfg  # plain list: the layers live in the model
        self.process_group = process_group  # the ranks that train this model together (None: the default group)
        n, dev = len(self.layers), self.layers[0].lora_A.device
        chain = chain_adjacency(depth)
        # Fixed-shape buffers, updated in place, so DDP's buffer broadcast always matches
        self.register_buffer("adj", (torch.zeros(n, n) if cfg.edges == "semantic" else chain.clone()).to(dev))
        self.register_buffer("chain", chain.to(dev), persistent=False)
        self.register_buffer("a_hat", torch.zeros(n, n, device=dev), persistent=False)
        self.register_buffer("eye", torch.eye(n, device=dev), persistent=False)
        self.register_buffer("order", torch.zeros(n, n, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("lap", torch.zeros(n, n, device=dev), persistent=False)  # L = I − Â, row i in i's source order
        self.sketch_ema = None
        g = torch.Generator().manual_seed(seed)
        self.P = torch.randn(self.layers[0].base.in_features, cfg.sketch_dim, generator=g) / math.sqrt(cfg.sketch_dim)
        self.set_edges(self.adj)
        self.coordinator = coordinator(self)  # sees the graph: its edges, Â and sources
        self.register_load_state_dict_post_hook(_edges_changed)
        for i, layer in enumerate(self.layers):
            layer.graph = (self, i)

    @torch.no_grad()
    def set_edges(self, adj):
        """Replaces the adjacency (0/1, symmetric, no self-loops) and what follows from it: Â, and each
        node's sources (its T-hop neighbourhood, nearest first)."""
        adj = check_adjacency(adj.to(self.adj))
        self.adj.copy_(adj)
        self.a_hat.copy_(propagation_matrix(self.adj, self.cfg.graph_norm))
        self.sources, self.counts = hop_order(self.adj, self.cfg.graph_layers)
        n = len(self.layers)
        self.order.copy_(torch.tensor([s + [j for j in range(n) if j not in s] for s in self.sources]))
        self.lap.copy_((self.eye - self.a_hat).gather(1, self.order))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.set_edges(self.adj)  # Â again in the new dtype (a float32 1/3 cast to float64 is not 1/3)
        return self

    def source_index(self, i):
        return self.order[i, :len(self.sources[i])]

    def factors(self, i, training):
        """(B', d, A) of node i: ΔW^f_i = Σ_s B'_s·diag((α/r)·[m_s ≠ 0])·A_s over its sources s (§2–§3)."""
        nodes = [self.layers[s] for s in self.sources[i]]
        m = gate_values(nodes, training)                                           # §2, [K, r]
        B = self.coordinator(self, i, torch.stack([n.lora_B for n in nodes], 1) * m)  # §3, h^(0) = B·diag(m)
        return B.flatten(1), (m != 0).flatten().to(m.dtype) * nodes[0].scaling, torch.cat([n.lora_A for n in nodes])

    @torch.no_grad()
    def all_factors(self):
        """Eval under no_grad: every node's factors at once (the same values as factors(i, False)).
        Smooth's in a few whole-graph ops — coefficients of C^T, zero beyond T hops, over the
        nodes in each row's source order; other coordinators node by node."""
        if not isinstance(self.coordinator, Smooth):
            return [self.factors(i, False) for i in range(len(self.layers))]
        K = max(map(len, self.sources))
        idx, eta = self.order[:, :K], self.coordinator.eta()
        C = torch.linalg.matrix_power((1 - eta) * self.eye + eta * self.a_hat, self.cfg.graph_layers)
        m = gate_values(self.layers, False)                                              # [n, r]
        d = (C.gather(1, idx)[:, :, None] * m[idx]).flatten(1) * self.layers[0].scaling   # [n, K·r]
        A = torch.stack([l.lora_A for l in self.layers])[idx].flatten(1, 2)              # [n, K·r, in]
        B = torch.stack([l.lora_B for l in self.layers])[idx].permute(0, 2, 1, 3).flatten(2)  # [n, out, K·r]
        return list(zip(B, d, A))

    def arm_sketches(self):
        for layer in self.layers:
            layer.sketch_P, layer.sketch = self.P.to(layer.lora_A.device), None

    def rebuild_semantic_edges(self):
        """EMA the gradient sketches collected since arm_sketches() — each layer's averaged over the
        ranks of a process group that have one, so every rank builds the same graph — and rebuild the
        semantic edges. A layer without a sketch (no gradient reached it) keeps its EMA, gains no edge."""
        sketches = [layer.sketch for layer in self.layers]
        for layer in self.layers:
            layer.sketch_P, layer.sketch = None, None
        shape, dev = (self.layers[0].base.out_features, self.cfg.sketch_dim), self.adj.device
        s = torch.stack([x if x is not None else torch.zeros(shape, device=dev) for x in sketches])
        have = torch.tensor([float(x is not None) for x in sketches], device=dev)
        group = self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            # with DDP's loss scaling, the average is the one-process sketch
            dist.all_reduce(s, group=group)
            dist.all_reduce(have, group=group)
        s, have = (s / have.clamp_min(1)[:, None, None]).cpu(), have.cpu() > 0
        if not have.any():
            return  # no training backward ran since the sketches were armed
        if not have.all():
            missing = [i for i in range(len(self.layers)) if not have[i]]
            warnings.warn(f"layers {missing} of a graph got no gradient sketch since the last rebuild "
                          "(no gradient reached them): they keep their old sketch and gain no semantic edge")
        finite = torch.isfinite(s).flatten(1).all(1)
        if not finite[have].all():  # a NaN/inf batch or an fp16 overflow (a step the GradScaler skips)
            warnings.warn(f"layers {(have & ~finite).nonzero().flatten().tolist()} of a graph got a non-finite "
                          "gradient sketch: it is skipped, they keep their old sketch EMA")
            have = have & finite  # every rank sees the same all-reduced sum, so every rank skips the same
        rho, ema = self.cfg.sketch_ema, self.sketch_ema if self.sketch_ema is not None else torch.zeros_like(s)
        fresh = (ema.flatten(1).norm(dim=1) == 0)[:, None, None]  # first sketch of a layer: taken as it is
        self.sketch_ema = torch.where(have[:, None, None], torch.where(fresh, s, rho * ema + (1 - rho) * s), ema)
        hybrid = self.cfg.edges == "hybrid"
        fixed = self.chain.cpu() if hybrid else torch.zeros_like(self.chain.cpu())
        semantic = semantic_adjacency(self.sketch_ema, self.cfg.semantic_topk, self.cfg.semantic_threshold, fixed)
        self.set_edges(torch.maximum(fixed, semantic))

    @torch.no_grad()
    def diagnostics(self):
        """Every edge, the semantic ones, drift energy and adjacent cosine before/after the coordinator."""
        n, cfg = len(self.layers), self.cfg
        before = factor_gram([(l.lora_B * (l.scaling * gate_values([l], False)), l.lora_A) for l in self.layers])
        after = factor_gram([(B * d, A) for B, d, A in (self.factors(i, False) for i in range(n))])
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if self.adj[i, j] > 0]
        eta = self.coordinator.eta() if isinstance(self.coordinator, Smooth) else None
        return {
            "nodes": n, "coordinator": cfg.coordinator, "graph_layers": cfg.graph_layers,
            "eta": None if eta is None else float(eta), "edges": edges,
            "semantic_edges": edges if cfg.edges == "semantic" else [e for e in edges if self.chain[e] == 0],
            "drift_energy_before": float(drift_energy(before, self.adj)),
            "drift_energy_after": float(drift_energy(after, self.adj)),
            "adjacent_cosine_before": float(edge_cosine(before, self.chain).mean()),
            "adjacent_cosine_after": float(edge_cosine(after, self.chain).mean()),
        }


def neighbour_penalty(layers, depth, kind):
    """The appendix's static baselines on ΔW̃_i = (α/r)·B_i·diag(σ(φ_i))·A_i of depth neighbours:
    "laplacian" Σ ‖ΔW̃_i − ΔW̃_j‖² (drift energy), "cos" Σ (1 − cos(vec ΔW̃_i, vec ΔW̃_j))."""
    gate = lambda l: torch.sigmoid(l.gate_logits) if l.gate_logits is not None else l.mask
    f = [(l.lora_B * (l.scaling * gate(l)), l.lora_A) for l in layers]
    pairs = [(a, b) for a in range(len(depth)) for b in range(a + 1, len(depth)) if abs(depth[a] - depth[b]) == 1]
    i, j = [a for a, _ in pairs], [b for _, b in pairs]  # the chain's edges, from the depths alone
    if not i:
        return layers[0].lora_B.new_zeros(())
    sq = torch.stack([factor_inner(a, a) for a in f])                    # ‖ΔW̃_i‖²
    ij = torch.stack([factor_inner(f[a], f[b]) for a, b in zip(i, j)])    # ⟨ΔW̃_i, ΔW̃_j⟩
    if kind == "laplacian":
        return (sq[i] + sq[j] - 2 * ij).sum()
    return (1 - ij / torch.sqrt(sq[i] * sq[j] + 1e-12)).sum()


# ----------------------------------------------------------------------------------------------
# §4 the whole method: injection, loss, step hook, merge, save/load


class StructLoRA(nn.Module):
    """Wraps a model: adapts its target nn.Linear layers, freezes the rest, and owns the graphs."""

    def __init__(self, model: nn.Module, cfg: StructLoRAConfig, coordinator=None, process_group=None):
        """process_group: the ranks that train this model together (DDP's group), over which the gradient
        sketches are averaged; None: the default group when torch.distributed is initialized."""
        super().__init__()
        if (cfg.coordinator == "custom") != (coordinator is not None):
            raise ValueError("pass a coordinator class exactly when cfg.coordinator == 'custom'")
        targets = find_targets(model, cfg)  # every check runs, and every part is built, before the model changes
        gen = torch.Generator().manual_seed(cfg.seed)
        lora_layers = {name: LoRALinear(base, cfg, gen) for name, base in targets}  # in depth order
        self.groups = group_layers(lora_layers)  # {key: (layers, depth)}
        graphs = nn.ModuleDict()
        if cfg.graph or cfg.reg != "none":
            warn_single_node_groups(lora_layers, self.groups)
        if cfg.graph:
            make = coordinator or {"smooth": Smooth, "gcn": GCN}[cfg.coordinator]
            for key, (layers, depth) in self.groups.items():
                graphs[key] = LayerGraph(layers, depth, cfg, cfg.seed + len(graphs), make, process_group)
        self.cfg, self.model, self.graphs, self.steps, self.merged = cfg, model, graphs, 0, False
        if cfg.budget > 0 and round(cfg.budget * cfg.r) == 0:
            raise ValueError(f"budget {cfg.budget} of rank {cfg.r} keeps no direction (round(budget·r) = 0 per layer): "
                             "every ΔW would be 0 at eval. Raise the budget, or set budget=0 (off)")
        device = next(iter(lora_layers.values())).lora_A.device
        # (λ_close, λ_open), see budget_loss; state only in budget mode, so older state_dicts still load
        self.register_buffer("budget_lambda", torch.zeros(2, device=device), persistent=cfg.budget > 0)
        self.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        for name in cfg.modules_to_save:
            model.get_submodule(name).requires_grad_(True)
        for name, layer in lora_layers.items():  # the LoRA parameters were made trainable, the base is frozen
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)
        self.lora_layers = lora_layers

    def _apply(self, fn, *args, **kwargs):
        lam = self.budget_lambda
        super()._apply(fn, *args, **kwargs)
        if self.budget_lambda.dtype != torch.float32:  # .to(bf16) moves it, but λ accumulates: bf16 stalls at 128,
            # and the cast itself rounds it (fp16: inf above 65504): λ keeps its float32 value, on the new device
            self.budget_lambda = lam.to(self.budget_lambda.device, torch.float32)
        return self

    def _live(self):
        if self.merged:
            raise RuntimeError("this StructLoRA wrapper was merged by merge_and_unload(); use the model it returned")

    def forward(self, *args, **kwargs):
        self._live()
        if self.training or torch.is_grad_enabled() or not self.graphs:
            return self.model(*args, **kwargs)
        try:  # eval under no_grad: the coordinated factors once for this call, not once per layer
            for graph in self.graphs.values():
                for layer, f in zip(graph.layers, graph.all_factors()):
                    layer.precomputed = f
            return self.model(*args, **kwargs)
        finally:
            for layer in self.lora_layers.values():
                layer.precomputed = None

    def aux_loss(self):
        """§4: every training-only loss term — β·KL of the gates (warmed up), and the static
        regularizer when cfg.reg is set. Add it to the task loss: L = L_task + aux_loss()."""
        loss = self.ib_loss()
        if self.cfg.reg != "none":
            loss = loss + self.cfg.reg_weight * self.reg_loss()
        return loss

    def ib_loss(self):
        """§4: (β/N)·Σ_modules Σ_j KL(Bern(σ(φ_j)) ‖ Bern(π0)), from step kl_warmup_steps on. [OURS] The
        task loss is a mean over examples, so the data-set-level KL of the ELBO enters each step as KL/N:
        the prior then weighs less the more data there is (ib_weighting="step" drops the 1/N). In budget
        mode, + budget_loss(): the Lagrangian terms that hold k = round(budget·r)·L of the n = L·r gates open."""
        self._live()
        layers = list(self.lora_layers.values())
        if not self.cfg.ib:
            return layers[0].lora_A.new_zeros(())
        phi = torch.stack([l.gate_logits for l in layers])
        kl = bernoulli_kl(phi, self.cfg.prior).sum()
        loss = self.cfg.beta * self._kl_warmup() * kl / self._examples_per_kl()
        if self.cfg.budget > 0:
            loss = loss + self.budget_loss(phi)
        return loss

    def _budget_k(self):
        """k = round(budget·r)·L, the number to keep open of the n = L·r gates: round(budget·r) per layer on
        average, the total the AdaLoRA peer keeps at this budget (peft: target_r × layers); round(budget·n)
        differed from it whenever budget·r is not an integer."""
        return round(self.cfg.budget * self.cfg.r) * len(self.lora_layers)

    def _budget_ranks(self, phi):
        """φ of every gate sorted high to low, and k (_budget_k): the number to keep open."""
        return phi.flatten().sort(descending=True).values, self._budget_k()

    def _budget_bounds(self):
        """(logit p − δ, logit p + δ): where budget mode holds the closed and the open gates."""
        t = math.log(self.cfg.prune_below / (1 - self.cfg.prune_below))
        return t - self.cfg.budget_margin, t + self.cfg.budget_margin

    def budget_loss(self, phi):
        """[OURS] budget mode: k of the n gates open at eval (σ(φ) ≥ p, p = prune_below) means, with φ
        sorted high to low, φ_(k) ≥ logit p > φ_(k+1). Held with a margin δ = budget_margin either side by
        two Lagrange multipliers, λ ≥ 0, raised by step() while their constraint is violated:
            λ_close · Σ_{i>k} [φ_(i) − (logit p − δ)]₊  +  λ_open · Σ_{i≤k} [(logit p + δ) − φ_(i)]₊
        Only gates on the wrong side of their rank are pushed, so the task (and the KL) choose which
        directions stay open and the budget only how many. A multiplier on the mean of σ(φ) pushes every
        gate alike, and Adam moves each φ by about the lr whatever the gradient's size: the gates fall
        together and cross p together (measured: 0 of 12 open at budget 0.5, λ oscillating). Off until
        the KL warm-up ends: while B ≈ 0 the ranking carries no task signal."""
        if self.steps < self.cfg.kl_warmup_steps:
            return phi.new_zeros(())
        ranked, k = self._budget_ranks(phi)
        closed_below, open_above = self._budget_bounds()
        lam_close, lam_open = self.budget_lambda.to(phi.dtype)
        too_open = F.relu(ranked[k:] - closed_below).sum()  # gates ranked below k that are not closed
        too_closed = F.relu(open_above - ranked[:k]).sum()  # gates ranked k or above that are not open
        return lam_close * too_open + lam_open * too_closed

    def _kl_warmup(self):
        W = self.cfg.kl_warmup_steps
        if W == 0 or self.steps >= W:
            return 1.0
        return self.steps / W if self.cfg.kl_schedule == "linear" else 0.0

    def _examples_per_kl(self):
        if self.cfg.ib_weighting == "step":
            return 1
        if self.cfg.num_train_examples <= 0:
            raise ValueError("the IB penalty is weighted per training example (β·KL/N, the ELBO reading): set "
                             "StructLoRAConfig(num_train_examples=N), N the training-set size, or ib_weighting='step'")
        return self.cfg.num_train_examples

    def reg_loss(self):
        """The appendix baselines (cfg.reg), summed over the depth neighbours of every target name."""
        self._live()
        if self.cfg.reg == "none":
            return next(iter(self.lora_layers.values())).lora_A.new_zeros(())
        return sum(neighbour_penalty(layers, depth, self.cfg.reg) for layers, depth in self.groups.values())

    def step(self):
        """Call once per optimizer step (on every rank): advances the KL warm-up, the budget's multipliers
        and, every K steps, the semantic edges."""
        self._live()
        self.steps += 1
        if self.cfg.budget > 0 and self.steps > self.cfg.kl_warmup_steps:
            self._budget_ascent()
        armed = any(l.sketch_P is not None for l in self.lora_layers.values())
        for graph in self.graphs.values():
            if armed:
                graph.rebuild_semantic_edges()
        self._arm_if_due()

    @torch.no_grad()
    def _budget_ascent(self):
        """Projected dual ascent, λ ← max(0, λ + budget_lr·c), c the worst violation on each side: the
        strongest gate that must close, the weakest that must stay open (see budget_loss). From φ alone,
        which every DDP rank holds the same, so λ is the same on every rank."""
        phi = torch.cat([l.gate_logits for l in self.lora_layers.values()]).float()
        ranked, k = self._budget_ranks(phi)
        closed_below, open_above = self._budget_bounds()
        strongest_closed = ranked[k] if k < len(ranked) else ranked.new_tensor(-math.inf)
        weakest_open = ranked[k - 1] if k > 0 else ranked.new_tensor(math.inf)
        c = torch.stack([strongest_closed - closed_below, open_above - weakest_open])
        c = c.clamp(min=-1e3)  # ±inf when k is 0 or n: that side has no constraint, its λ stays 0
        self.budget_lambda.copy_((self.budget_lambda + self.cfg.budget_lr * c.to(self.budget_lambda)).clamp(min=0))

    def _arm_if_due(self):
        K = self.cfg.semantic_every
        if K > 0 and self.steps > 0 and self.steps % K == 0 and self.cfg.edges != "chain":
            for graph in self.graphs.values():
                graph.arm_sketches()  # the next training backward fills the sketches

    def trainable_parameters(self):
        self._live()
        return [p for p in self.parameters() if p.requires_grad]

    def control_parameters(self):
        """The gate logits φ and the coordinators' parameters (η's ψ, or Θ): few numbers per layer
        that decide which directions stay open and how much layers mix."""
        self._live()
        return [l.gate_logits for l in self.lora_layers.values() if l.gate_logits is not None] + \
            [p for g in self.graphs.values() for p in g.coordinator.parameters()]

    def param_groups(self, lr, control_lr, weight_decay):
        """AdamW groups: LoRA factors and modules_to_save at `lr` with weight decay; φ and the
        coordinators at `control_lr` without it. [OURS] Adam moves a parameter by about lr per step, so
        at lr = 5e-3 a gate logit (init 2.2, pruned below 0) cannot close in a few hundred steps."""
        control = {id(p) for p in self.control_parameters()}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in control],
                   "lr": lr, "weight_decay": weight_decay},
                  {"params": self.control_parameters(), "lr": control_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def open_directions(self):
        """Directions kept at eval per adapted layer: σ(φ) ≥ prune_below, or the fixed mask without IB. In
        budget mode, warns when their total is not the budget's k (a run too short for the gates to travel)."""
        self._live()
        kept = {n: int((torch.sigmoid(l.gate_logits) >= self.cfg.prune_below).sum()) if l.gate_logits is not None
                else int(l.mask.sum()) for n, l in self.lora_layers.items()}
        if self.cfg.budget > 0:
            k = self._budget_k()
            if sum(kept.values()) != k:
                warnings.warn(f"budget {self.cfg.budget} keeps {k} of {self.cfg.r * len(kept)} directions open, but "
                              f"{sum(kept.values())} are (after {self.steps} steps, {self.cfg.kl_warmup_steps} of them "
                              "warm-up): the gates had too few steps to reach it (Adam moves φ by about the control "
                              "lr per step)")
        return kept

    @torch.no_grad()
    def diagnostics(self):
        """Per graph: the coordinator, every edge (i < j), drift energy and adjacent cosine before/after it."""
        self._live()
        return {key: g.diagnostics() for key, g in self.graphs.items()}

    @torch.no_grad()
    def merge_and_unload(self):
        """W0 ← W0 + ΔW^f (deterministic gates, the coordinator); returns the plain base model and
        retires this wrapper (every later call raises). A bitsandbytes Linear4bit target (QLoRA) comes
        back as an ordinary nn.Linear in its compute dtype holding dequantize(W0) + ΔW^f: re-quantizing
        to 4 bits would change the merged weights. Layers that were not adapted stay 4-bit."""
        self._live()
        self.eval()
        deltas = {name: layer.delta_weight() for name, layer in self.lora_layers.items()}
        for name, layer in self.lora_layers.items():
            if is_linear4bit(layer.base):  # QLoRA: the merged layer leaves as a plain nn.Linear
                merged = dequantized_linear(layer.base, deltas[name])
            else:
                layer.base.weight += deltas[name].to(layer.base.weight.dtype)
                merged = layer.base
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, merged)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad_before[n])
        model = self.model
        self.merged, self.lora_layers, self.groups = True, {}, {}
        self._modules.clear()  # the old wrapper owns nothing: an optimizer built from it gets no parameters
        return model

    def adapter_state(self):
        """(tensors, meta): everything training changed and needs to continue exactly — LoRA factors,
        masks, gate logits, the budget's multipliers, coordinator parameters, edges, the sketch EMA, the
        step count — and the modules_to_save."""
        self._live()
        sd = {}
        for name, layer in self.lora_layers.items():
            sd[f"{name}.lora_A"], sd[f"{name}.lora_B"], sd[f"{name}.mask"] = layer.lora_A, layer.lora_B, layer.mask
            if layer.gate_logits is not None:
                sd[f"{name}.gate_logits"] = layer.gate_logits
        if self.cfg.budget > 0:
            sd["budget_lambda"] = self.budget_lambda
        for key, graph in self.graphs.items():
            sd[f"graphs.{key}.adj"] = graph.adj
            sd.update({f"graphs.{key}.coordinator.{k}": v for k, v in graph.coordinator.state_dict().items()})
            if graph.sketch_ema is not None:
                sd[f"graphs.{key}.sketch_ema"] = graph.sketch_ema
        for mod in self.cfg.modules_to_save:
            sd.update({f"{mod}.{k}": v for k, v in self.model.get_submodule(mod).state_dict().items()})
        meta = {"format": "structlora", "config": asdict(self.cfg), "layers": self._shapes(), "steps": self.steps}
        return {k: v.detach() for k, v in sd.items()}, meta

    def get_extra_state(self):
        """What state_dict() carries beyond tensors attached to modules (Lightning, accelerate and the HF
        Trainer checkpoint that): the step count (KL warm-up, rebuild schedule), each graph's sketch EMA,
        and whether the sketches are armed. Taken between two step() calls, it resumes exactly."""
        self._live()
        return {"steps": self.steps, "armed": any(l.sketch_P is not None for l in self.lora_layers.values()),
                "sketch_ema": {key: g.sketch_ema for key, g in self.graphs.items()}}

    def set_extra_state(self, state):
        self._live()
        if set(state["sketch_ema"]) != set(self.graphs):
            raise ValueError(f"state_dict has graphs {sorted(state['sketch_ema'])}, this wrapper {sorted(self.graphs)}")
        self.steps = state["steps"]
        for key, graph in self.graphs.items():
            ema = state["sketch_ema"][key]
            graph.sketch_ema = None if ema is None else ema.detach().float().cpu().clone()
        for layer in self.lora_layers.values():
            layer.sketch_P, layer.sketch = None, None
        if state["armed"]:
            for graph in self.graphs.values():
                graph.arm_sketches()

    def _shapes(self):
        return {n: [l.base.out_features, l.base.in_features] for n, l in self.lora_layers.items()}

    @torch.no_grad()
    def load_adapter_state(self, tensors, meta):
        """Loads adapter_state() output; the layers, shapes and config must match exactly. Resets the
        training state (sketches, edges, step) to the saved one."""
        self._live()
        if meta["layers"] != self._shapes():
            diff = sorted(set(map(str, meta["layers"].items())) ^ set(map(str, self._shapes().items())))
            raise ValueError(f"adapter was trained on other layers/shapes: {diff[:8]}")
        saved = saved_config(meta["config"])
        if saved != self.cfg:
            diff = {k: (v, getattr(self.cfg, k)) for k, v in asdict(saved).items() if v != getattr(self.cfg, k)}
            raise ValueError(f"adapter has another config (saved, ours): {diff}; "
                             "use StructLoRA.from_pretrained(model, path)")
        own, _ = self.adapter_state()
        sketch = {f"graphs.{key}.sketch_ema" for key in self.graphs}
        missing, unexpected = sorted(set(own) - sketch - set(tensors)), sorted(set(tensors) - set(own) - sketch)
        bad = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"adapter: missing {missing[:8]}, unexpected {unexpected[:8]}, mis-shaped {bad[:8]}")
        for key in self.graphs:
            check_adjacency(tensors[f"graphs.{key}.adj"].to(self.graphs[key].adj))  # before anything changes
        for k, v in own.items():
            if k not in sketch:
                v.copy_(tensors[k])  # detach() shares storage with the parameters and buffers
        for key, graph in self.graphs.items():
            graph.set_edges(graph.adj)
            ema = tensors.get(f"graphs.{key}.sketch_ema")
            graph.sketch_ema = None if ema is None else ema.detach().float().cpu().clone()
        for layer in self.lora_layers.values():
            layer.sketch_P, layer.sketch = None, None
        self.steps = meta["steps"]
        self._arm_if_due()

    def save_adapter(self, path):
        """Writes adapter_model.safetensors and adapter_config.json into the folder `path`."""
        from safetensors.torch import save_file
        tensors, meta = self.adapter_state()
        os.makedirs(path, exist_ok=True)
        weights, config = os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, ADAPTER_CONFIG)
        save_file(unshared(tensors), weights + ".tmp",
                  metadata={"structlora": json.dumps(meta)})  # so load_adapter can tell two saves apart
        with open(config + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(weights + ".tmp", weights)  # a killed save keeps the old files
        os.replace(config + ".tmp", config)

    def load_adapter(self, path):
        """Loads a save_adapter() folder (see load_adapter_state)."""
        from safetensors import safe_open
        self._live()
        meta = read_adapter_config(path)
        with safe_open(os.path.join(path, ADAPTER_WEIGHTS), "pt") as f:
            saved = (f.metadata() or {}).get("structlora")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if saved is not None and json.loads(saved) != meta:
            raise ValueError(f"{path}: the weights and {ADAPTER_CONFIG} come from different saves (a save was "
                             "interrupted between its two files); save again or use an older copy")
        self.load_adapter_state(tensors, meta)

    @classmethod
    def from_pretrained(cls, model, path, coordinator=None, process_group=None):
        """Builds StructLoRA on `model` with the saved config, then loads the saved adapter."""
        slora = cls(model, saved_config(read_adapter_config(path)["config"]), coordinator, process_group)
        try:
            slora.load_adapter(path)
        except BaseException:
            slora._uninject()  # a corrupt or mismatched folder leaves the model as it was, ready for a retry
            raise
        return slora

    def _uninject(self):
        """Puts the plain base layers back and the requires_grad flags as they were (no merge)."""
        for name, layer in self.lora_layers.items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, layer.base)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad_before[n])

    @torch.no_grad()
    def export_peft(self, path, rename=None, base_model_name_or_path=None):
        """Writes ΔW^f as a plain PEFT LoRA adapter: rank K·r per layer, pruned directions dropped.
        `rename` maps our module paths (adapted layers, modules_to_save) to those of the model PEFT will
        load it on, e.g. the Hugging Face class of the same checkpoint."""
        from safetensors.torch import save_file
        rename = rename or (lambda name: name)
        self._live()
        modes = {m: m.training for m in self.modules()}
        self.eval()  # ΔW^f with the deterministic gates
        try:
            factors = {name: layer.factors() for name, layer in self.lora_layers.items()}
        finally:
            for m, training in modes.items():
                m.training = training  # a mid-training export leaves the run as it found it
        tensors, ranks = {}, {}
        for name, (B, d, A) in factors.items():
            keep = d != 0
            if not keep.any():
                keep[0] = True  # PEFT needs rank ≥ 1; this direction's d is 0
            tensors[f"base_model.model.{rename(name)}.lora_A.weight"] = (d[keep, None] * A[keep]).contiguous().cpu()
            tensors[f"base_model.model.{rename(name)}.lora_B.weight"] = B[:, keep].contiguous().cpu()
            ranks[rename(name)] = int(keep.sum())
        for mod in self.cfg.modules_to_save:
            for k, v in self.model.get_submodule(mod).state_dict().items():
                tensors[f"base_model.model.{rename(mod)}.{k}"] = v.contiguous().cpu()
        os.makedirs(path, exist_ok=True)
        save_file(unshared(tensors), os.path.join(path, ADAPTER_WEIGHTS))
        r0 = next(iter(ranks.values()))
        config = {"peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": r0,
                  "rank_pattern": {f"^{n}$": k for n, k in ranks.items()},
                  "alpha_pattern": {f"^{n}$": k for n, k in ranks.items()},  # scaling α/r = 1: d is inside A
                  "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
                  "modules_to_save": [rename(m) for m in self.cfg.modules_to_save] or None,
                  "base_model_name_or_path": base_model_name_or_path}
        with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=1)


def unshared(tensors):
    """Contiguous CPU tensors, each its own copy where two names share memory (tied modules_to_save:
    an embedding and its head), which safetensors refuses to write."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = v.untyped_storage().data_ptr()
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _get_module(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from None


def is_linear4bit(module):
    """A bitsandbytes 4-bit linear layer (QLoRA's frozen base), recognised without importing bitsandbytes."""
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes.")


def check_linear4bit(q):
    """A Linear4bit target must compute in eval what it computes in training, and stay dequantizable.
    On a CPU with AVX512-BF16, bitsandbytes repacks the weight on the first eval forward under no_grad
    and from then on computes in bf16 with bf16 block scales; that path is turned off here."""
    if getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError("this Linear4bit was repacked by bitsandbytes' CPU inference path (an eval forward under "
                         "no_grad before StructLoRA wrapped it); adapt a freshly quantized model")
    q.support_avx512bf16_for_cpu = False


def dequantized_linear(q, delta=None):
    """An ordinary nn.Linear with W = dequantize(W_nf4) (+ ΔW^f), summed in float32, in q's compute dtype
    (the dtype of its weights before quantization when it has none). Re-quantizing would round
    W0 + ΔW^f to the 4-bit grid again and change the merged model, so the merge leaves it unquantized."""
    from bitsandbytes.functional import dequantize_4bit  # q exists, so bitsandbytes is installed
    state = q.weight.quant_state
    w = dequantize_4bit(q.weight.data, state).float()
    if delta is not None:
        w += delta.float()
    dtype = q.compute_dtype or state.dtype
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=dtype)
    lin.weight.copy_(w)
    if q.bias is not None:
        lin.bias.copy_(q.bias)
    return lin


def find_targets(model, cfg):
    """[(path, nn.Linear)] to adapt, in depth order; refuses a config that cannot apply cleanly."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; merge_and_unload() first or use a fresh model")
    for name in cfg.modules_to_save:
        _get_module(model, name)
    paths = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    hits = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in cfg.target_modules]
    not_linear = [n for n, m in hits if type(m) is not nn.Linear and not is_linear4bit(m)]
    if not_linear:
        raise TypeError(f"target modules must be nn.Linear or bitsandbytes Linear4bit; these are not: {not_linear[:8]}")
    found = {n.rpartition(".")[2] for n, _ in hits}
    missing = [t for t in cfg.target_modules if t not in found]
    if missing:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {missing} match no nn.Linear; the model's nn.Linear names are {names}")
    shared = [paths[id(m)] for _, m in hits if len(paths[id(m)]) > 1]
    if shared:
        raise ValueError(f"one nn.Linear is reachable at several paths {shared[0]}; adapting it at one path would "
                         "leave the others plain. Untie it, or leave it out of target_modules")
    saved = lambda n: any(n == s or n.startswith(s + ".") for s in cfg.modules_to_save)
    trained = {id(p) for s in cfg.modules_to_save for p in model.get_submodule(s).parameters()}
    tied = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in trained and not saved(n)]
    if tied:
        raise ValueError(f"modules_to_save {cfg.modules_to_save} hold a weight tied to {tied[:4]}, outside them: "
                         "a PEFT export would train a separate copy. Add the module holding it to modules_to_save "
                         "(e.g. the input embedding with a tied head), or untie it")
    overlap = [n for n, _ in hits if saved(n)]
    if overlap:
        raise ValueError(f"modules_to_save contain adapted layers {overlap[:8]}")
    return hits


def group_layers(lora_layers):
    """One group per role — the layer's path with its layer indices wildcarded, so an encoder's and a
    decoder's q_proj, or self- and cross-attention, never mix — and shape (so neighbours' factors
    stack), in depth order; a layer's depth is its position among the adapted layers of its role.
    A group is named by the shortest of: target name, name_OUTxIN, role, role_OUTxIN that is unique."""
    groups, seen = {}, {}
    for name, layer in lora_layers.items():
        # blocks.3.attn.q_proj → blocks.*.attn.q_proj; layer_3.q_proj → layer_*.q_proj (torchvision:
        # encoder_layer_3); attn1/attn2 (self/cross, diffusers) have no "_" before the digits and stay apart
        role = re.sub(r"(^|\.)([^.]*_)?\d+(?=\.)", r"\1\2*", name)
        depth = seen[role] = seen.get(role, -1) + 1
        layers, depths = groups.setdefault((role, layer.base.out_features, layer.base.in_features), ([], []))
        layers.append(layer)
        depths.append(depth)
    def label(role, out, inp, full):  # module names cannot hold ".": a role is written encoder/*/q_proj
        leaf, role = role.rpartition(".")[2], role.replace(".", "/")
        return [leaf, f"{leaf}_{out}x{inp}", role, f"{role}_{out}x{inp}"][full]
    keys = list(groups)
    for full in range(4):
        names = [label(*k, full) for k in keys]
        if len(set(names)) == len(names):
            return dict(zip(names, groups.values()))


def warn_single_node_groups(lora_layers, groups):
    """A graph (and the appendix regularizers) needs depth neighbours: warn when every group of a target
    name has one node although the model has several such layers (their block index went unrecognised)."""
    leaf = {id(layer): name.rpartition(".")[2] for name, layer in lora_layers.items()}
    total, largest = {}, {}
    for layers, _ in groups.values():
        name = leaf[id(layers[0])]
        total[name] = total.get(name, 0) + len(layers)
        largest[name] = max(largest.get(name, 0), len(layers))
    lone = [name for name in total if total[name] > 1 and largest[name] == 1]
    if lone:
        examples = [n for n in lora_layers if n.rpartition(".")[2] == lone[0]][:3]
        warnings.warn(f"every graph of {lone} has one node (no edges: graph=True acts as IB-only LoRA): no block "
                      f"index was found in {examples}. Name blocks by a number (blocks.3) or a number after '_' "
                      "(layer_3)")


def read_adapter_config(path):
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise FileNotFoundError(f"no StructLoRA adapter at {path!r} (need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        saved = json.load(f)
    if saved.get("format") != "structlora":
        raise ValueError(f"{cfg_path} is not a StructLoRA adapter config")
    return saved
