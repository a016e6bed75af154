"""StructLoRA: structured, task-aware low-rank adaptation, in one file of plain PyTorch.

Paper: "Not All Directions Matter: Toward Structured and Task-Aware Low-Rank Adaptation"
(arXiv 2603.14228). Read beside docs/paper.md (section numbers below refer to it).

    §1  LoRA            ΔW   = (α/r)·B·A                                   LoRALinear
    §2  IB gate         ΔW̃   = (α/r)·B·diag(m)·A,  m ~ Concrete(φ, τ)      LoRALinear.gate, bernoulli_kl
    §3  coordinator     ΔW^f = (1-η)·ΔW̃_ℓ + η·Σ_j Â_ℓj·ΔW̃_j                LayerGraph
    §4  loss, merge     L = L_task + β·Σ KL(q(m)‖p(m));  W = W0 + ΔW^f     StructLoRA

Both training-only parts are computed in factor form: the coordinated update of layer ℓ is
B_cat·diag(c ⊙ m)·A_cat with its neighbours' factors stacked, so no d×k matrix is ever formed
while training. merge_and_unload() folds ΔW^f into the frozen weights once and returns the
plain base model.
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class StructLoRAConfig:
    r: int = 8                        # rank of each update
    alpha: float = 16.0               # LoRA scaling numerator: ΔW is scaled by α/r
    dropout: float = 0.0              # dropout on the LoRA input
    target_modules: tuple = ("q_proj", "v_proj")  # nn.Linear names (last path component) to adapt
    modules_to_save: tuple = ()       # modules trained fully and saved with the adapter (e.g. a new head)
    ib: bool = True                   # §2 IB gate on the r directions (False: m = 1)
    graph: bool = True                # §3 graph coordinator across depth (False: η = 0)
    # §2 IB gate
    beta: float = 1e-3                # weight of the KL penalty, per direction
    prior: float = 0.2                # π0 < prune_below, so a direction the task does not hold open closes
    tau: float = 0.5                  # temperature of the relaxed-Bernoulli sample
    gate_init: float = 0.9            # σ(φ) at step 0: gates start open
    prune_below: float = 0.5          # at eval and merge, directions with σ(φ) below this are cut to 0
    kl_warmup_steps: int = 0          # KL weight ramps linearly from 0 to β over this many step() calls
    # §3 graph coordinator
    graph_norm: str = "rw"            # Â = D^-1 (A+I) ("rw") or D^-1/2 (A+I) D^-1/2 ("sym", GCN)
    eta_max: float = 1.0              # η = η_max·σ(ψ); η ≤ 1 keeps the drift-energy theorem true
    eta_init: float = 0.1             # η at step 0: start close to plain LoRA
    semantic_every: int = 50          # K: rebuild the semantic edges every K step() calls (0: chain only)
    sketch_dim: int = 16              # p: width of the random gradient sketch G·P
    sketch_ema: float = 0.9           # EMA factor of the sketches across rebuilds
    semantic_topk: int = 1            # k: at most k semantic (non-adjacent) neighbours per layer
    semantic_threshold: float = 0.05  # minimum sketch cosine (measured between layers of DINOv2-S: 0.00–0.05)
    seed: int = 0                     # seed of A's init and of the sketch projection P

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules, self.modules_to_save = tuple(self.target_modules), tuple(self.modules_to_save)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"rank r must be a positive integer, got {self.r!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        if not 0 < self.prior < 1 or not 0 < self.gate_init < 1:
            raise ValueError("prior and gate_init must lie in (0, 1)")
        if self.tau <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("tau must be > 0 and dropout in [0, 1)")
        if self.graph_norm not in ("rw", "sym"):
            raise ValueError(f"graph_norm must be 'rw' or 'sym', got {self.graph_norm!r}")
        if not 0 < self.eta_init < self.eta_max:
            raise ValueError("need 0 < eta_init < eta_max")


# ----------------------------------------------------------------------------------------------
# §2 the IB gate


def concrete_sample(logits, tau):
    """Relaxed-Bernoulli (binary Concrete) sample, reparameterized: m = σ((φ + log u − log(1−u))/τ)."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)


def deterministic_gate(logits, prune_below):
    """Eval and merge: m = σ(φ), with directions below prune_below cut to exactly 0."""
    q = torch.sigmoid(logits)
    return q * (q >= prune_below)


def bernoulli_kl(logits, prior):
    """KL(Bern(σ(φ)) ‖ Bern(π0)) per direction: the variational bound on I(ΔW̃; X)."""
    q = torch.sigmoid(logits)
    log_q, log_1mq = F.logsigmoid(logits), F.logsigmoid(-logits)
    return q * (log_q - math.log(prior)) + (1 - q) * (log_1mq - math.log(1 - prior))


# ----------------------------------------------------------------------------------------------
# §1 the LoRA layer, computing its (coordinated) update in factor form


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus y += (α/r)·B_cat·diag(c ⊙ m)·A_cat·x (§1–§3, factor form)."""

    def __init__(self, base: nn.Linear, cfg: StructLoRAConfig, generator=None):
        super().__init__()
        self.base, self.r, self.scaling, self.cfg = base, cfg.r, cfg.alpha / cfg.r, cfg
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.r, **kw))  # ΔW = 0 at step 0
        bound = 1 / math.sqrt(base.in_features)  # = kaiming_uniform_(a=√5), as loralib and peft
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        # §2: gate logits φ, σ(φ) = gate_init at step 0
        init = math.log(cfg.gate_init / (1 - cfg.gate_init))
        self.gate_logits = nn.Parameter(torch.full((cfg.r,), init, **kw)) if cfg.ib else None
        # A fixed 0/1 mask on the directions (all ones unless mask_directions() set it: filter baselines)
        self.register_buffer("mask", torch.ones(cfg.r, **kw), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Set by StructLoRA: the graph this layer is a node of, and (training only) this forward's
        # gate sample, shared by every layer that mixes this layer's update into its own.
        self.graph, self.m, self.cached_factors = None, None, None
        self.sketch_P, self.sketch = None, None  # §3 gradient sketch, only while armed

    def gate(self):
        """§2: m ∈ [0,1]^r — a Concrete sample in training, σ(φ) with weak directions cut to 0 at eval."""
        if self.gate_logits is None:
            return self.mask
        if self.training:
            return self.m if self.m is not None else concrete_sample(self.gate_logits, self.cfg.tau)
        return deterministic_gate(self.gate_logits, self.cfg.prune_below)

    def factors(self):
        """(B, d, A) with ΔW^f = B·diag(d)·A; with a graph, the neighbours' factors stacked (§3)."""
        if self.cached_factors is not None:  # training: LayerGraph.prepare() built them for the graph
            return self.cached_factors
        if self.graph is None:
            return self.lora_B, self.scaling * self.gate(), self.lora_A  # eq. §2: (α/r)·B·diag(m)·A
        graph, i = self.graph
        nodes, c = graph.row(i)  # ΔW^f_ℓ = Σ_j c_ℓj ΔW̃_j, c = row ℓ of (1-η)I + ηÂ
        d = torch.cat([c[k] * n.gate() for k, n in enumerate(nodes)])
        A = torch.cat([n.lora_A for n in nodes], 0)
        B = torch.cat([n.lora_B for n in nodes], 1)
        return B, self.scaling * d, A

    def delta_weight(self):
        """ΔW^f as a dense out×in matrix (merge and diagnostics only, never in training)."""
        B, d, A = self.factors()
        return (B * d) @ A

    def forward(self, x):
        B, d, A = self.factors()
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(A.dtype)  # adapters stay float32 on a bf16/fp16 base
        h = F.linear(h, A) * d  # diag(d)·A·x: r·(deg+1) numbers per token
        y = self.base(x)
        y = y + F.linear(h, B).to(y.dtype)  # §3: W0·x + B_cat·diag(c ⊙ m)·A_cat·x
        if self.sketch_P is not None and y.requires_grad:
            self._add_sketch_hook(y, x)
        return y

    def _add_sketch_hook(self, y, x):
        # §3: G·P = Σ_tokens (∂L/∂y)(Pᵀx)ᵀ, the gradient a zero-valued probe y += Z·(Pᵀx) would get.
        xp = x.detach().flatten(0, -2).float() @ self.sketch_P

        def hook(g):
            s = g.detach().flatten(0, -2).float().T @ xp
            self.sketch = s if self.sketch is None else self.sketch + s
        y.register_hook(hook)

    def extra_repr(self):
        return f"r={self.r}, scaling={self.scaling:g}, ib={self.gate_logits is not None}"


# ----------------------------------------------------------------------------------------------
# §3 the graph coordinator: one graph per target name, nodes ordered by depth


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


def chain_adjacency(n):
    """Edges between depth-neighbouring layers ℓ and ℓ+1."""
    adj = torch.zeros(n, n)
    i = torch.arange(n - 1)
    adj[i, i + 1] = adj[i + 1, i] = 1.0
    return adj


def semantic_adjacency(sketches, topk, threshold):
    """Non-adjacent edges i–j whose gradient sketches align: cosine > threshold, top-k per layer."""
    n = sketches.shape[0]
    z = F.normalize(sketches.flatten(1).float(), dim=1)
    cos = z @ z.T
    idx = torch.arange(n)
    cos[(idx[:, None] - idx[None, :]).abs() <= 1] = -float("inf")  # self and chain edges exist already
    adj = torch.zeros(n, n)
    if topk > 0 and n > 2:
        val, j = cos.topk(min(topk, n), dim=1)
        keep = val > threshold
        adj[idx[:, None].expand_as(j)[keep], j[keep]] = 1.0
    return torch.maximum(adj, adj.T)


def factor_gram(factors):
    """G_ij = ⟨ΔW_i, ΔW_j⟩_F for ΔW_i = B_i·A_i, from r×r products only: Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ)."""
    return torch.stack([torch.stack([((Bi.T @ Bj) * (Ai @ Aj.T)).sum() for Bj, Aj in factors]) for Bi, Ai in factors])


def drift_energy(gram, adj):
    """E = Σ_(i,j)∈E ‖H_i − H_j‖², from the Gram matrix G_ij = ⟨H_i, H_j⟩_F (each edge once)."""
    g = torch.diagonal(gram)
    sq = g[:, None] + g[None, :] - 2 * gram
    return 0.5 * (adj * sq).sum()


def adjacent_cosine(gram):
    """Mean cosine between vec(ΔW_ℓ) and vec(ΔW_ℓ+1) (the paper: ≈0.34 for LoRA, ≈0.62 StructLoRA)."""
    g = torch.diagonal(gram).clamp_min(1e-30)
    cos = torch.diagonal(gram, 1) / torch.sqrt(g[:-1] * g[1:])
    return cos.mean() if cos.numel() else gram.new_tensor(float("nan"))


class LayerGraph(nn.Module):
    """Nodes = the adapted layers of one target name; one residual Laplacian-smoothing step."""

    def __init__(self, layers, cfg: StructLoRAConfig, seed: int):
        super().__init__()
        self.layers, self.cfg = list(layers), cfg  # plain list: the layers live in the model
        # η = η_max·σ(ψ), shared by the graph (the drift theorem needs one η in [0, 1])
        psi = math.log(cfg.eta_init / (cfg.eta_max - cfg.eta_init))
        self.eta_logit = nn.Parameter(torch.tensor(psi, device=self.layers[0].lora_A.device))
        self.register_buffer("adj", chain_adjacency(len(self.layers)).to(self.layers[0].lora_A.device))
        self.register_buffer("padded_idx", None, persistent=False)   # set by update_neighbours()
        self.register_buffer("padded_mask", None, persistent=False)
        self.sketch_ema = None
        g = torch.Generator().manual_seed(seed)
        in_features = self.layers[0].base.in_features
        self.P = torch.randn(in_features, cfg.sketch_dim, generator=g) / math.sqrt(cfg.sketch_dim)
        self.update_neighbours()
        for i, layer in enumerate(self.layers):
            layer.graph = (self, i)

    def eta(self):
        return self.cfg.eta_max * torch.sigmoid(self.eta_logit)

    def mixing(self):
        """C = I − η·L = (1−η)·I + η·Â: one residual smoothing step, H^f = C·H̃ (§3)."""
        a_hat = propagation_matrix(self.adj, self.cfg.graph_norm)
        eye = torch.eye(len(self.layers), dtype=a_hat.dtype, device=a_hat.device)
        return (1 - self.eta()) * eye + self.eta() * a_hat

    @torch.no_grad()
    def set_edges(self, adj):
        """Replaces the adjacency (0/1, symmetric, no self-loops) and the neighbour lists it implies."""
        self.adj.copy_(adj)
        self.update_neighbours()

    def update_neighbours(self):
        adj = self.adj.cpu()
        self.neighbours = [[i] + adj[i].nonzero().flatten().tolist() for i in range(len(self.layers))]
        # The same lists padded to one width K (a pad repeats node i with coefficient 0), so that
        # prepare() stacks every layer's factors with a few whole-graph ops.
        K = max(map(len, self.neighbours))
        pad = [nb + [nb[0]] * (K - len(nb)) for nb in self.neighbours]
        self.padded_idx = torch.tensor(pad, device=self.adj.device)
        valid = torch.arange(K)[None, :] < torch.tensor([len(nb) for nb in self.neighbours])[:, None]
        self.padded_mask = valid.to(self.adj.device, self.adj.dtype)

    def prepare(self):
        """Training forward: every layer's (B_cat, d, A_cat) at once (same values as LoRALinear.factors)."""
        idx, mask = self.padded_idx, self.padded_mask
        (n, K), flat = idx.shape, idx.flatten()  # index_select: its backward is far cheaper than A[idx]'s
        pick = lambda ts: torch.index_select(torch.stack(ts), 0, flat).unflatten(0, (n, K))
        coef = self.mixing().gather(1, idx) * mask                                   # c_ℓj, [n, K]
        M = pick([layer.gate() for layer in self.layers])                            # m_j, [n, K, r]
        d = (coef[:, :, None] * M).flatten(1) * self.layers[0].scaling               # [n, K·r]
        A = pick([layer.lora_A for layer in self.layers]).flatten(1, 2)               # [n, K·r, in]
        B = pick([layer.lora_B for layer in self.layers]).permute(0, 2, 1, 3).flatten(2)  # [n, out, K·r]
        for i in range(n):
            self.layers[i].cached_factors = (B[i], d[i], A[i])

    def row(self, i):
        """The layers mixed into layer i's update and their coefficients."""
        idx = self.neighbours[i]
        return [self.layers[j] for j in idx], self.mixing()[i, idx]

    def arm_sketches(self):
        for layer in self.layers:
            layer.sketch_P, layer.sketch = self.P.to(layer.lora_A.device), None

    def rebuild_semantic_edges(self):
        """EMA the gradient sketches collected since arm_sketches(); rebuild A = chain ∪ semantic."""
        sketches = [layer.sketch for layer in self.layers]
        for layer in self.layers:
            layer.sketch_P, layer.sketch = None, None
        if any(s is None for s in sketches):
            return  # no training backward ran since the sketches were armed
        s = torch.stack(sketches).cpu()
        rho = self.cfg.sketch_ema
        self.sketch_ema = s if self.sketch_ema is None else rho * self.sketch_ema + (1 - rho) * s
        semantic = semantic_adjacency(self.sketch_ema, self.cfg.semantic_topk, self.cfg.semantic_threshold)
        self.set_edges(torch.maximum(chain_adjacency(len(self.layers)), semantic))

    @torch.no_grad()
    def gram(self, coordinated):
        """G_ij = ⟨ΔW_i, ΔW_j⟩_F in factor form: Σ (B_iᵀB_j) ⊙ (D_iA_i A_jᵀD_j), r×r products only."""
        G = factor_gram([(l.lora_B.float(), (l.scaling * l.gate())[:, None] * l.lora_A.float()) for l in self.layers])
        if coordinated:
            C = self.mixing().float()
            G = C @ G @ C.T  # H^f = C·H̃  ⇒  G^f = C·G·Cᵀ
        return G

    def diagnostics(self):
        before, after = self.gram(False), self.gram(True)
        n = len(self.layers)
        semantic = [(i, j) for i in range(n) for j in range(i + 2, n) if self.adj[i, j] > 0]
        return {
            "nodes": n, "eta": float(self.eta()), "semantic_edges": semantic,
            "drift_energy_before": float(drift_energy(before, self.adj)),
            "drift_energy_after": float(drift_energy(after, self.adj)),
            "adjacent_cosine_before": float(adjacent_cosine(before)),
            "adjacent_cosine_after": float(adjacent_cosine(after)),
        }


# ----------------------------------------------------------------------------------------------
# §4 the whole method: injection, loss, step hook, merge, save/load


class StructLoRA(nn.Module):
    """Wraps a model: adapts its target nn.Linear layers, freezes the rest, and owns the graphs."""

    def __init__(self, model: nn.Module, cfg: StructLoRAConfig):
        super().__init__()
        self.cfg, self.model, self.steps = cfg, model, 0
        self.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        for name in cfg.modules_to_save:
            _get_module(model, name).requires_grad_(True)
        self.lora_layers = inject_lora(model, cfg)  # {name: LoRALinear}, in depth order
        overlap = [n for n in self.lora_layers if any(n.startswith(s + ".") for s in cfg.modules_to_save)]
        if overlap:
            raise ValueError(f"modules_to_save contain adapted layers {overlap}")
        self.graphs = nn.ModuleDict()
        if cfg.graph:
            for key, layers in group_layers(self.lora_layers).items():
                self.graphs[key] = LayerGraph(layers, cfg, seed=cfg.seed + len(self.graphs))
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def _before_forward(self, module, args):
        self.refresh()

    def refresh(self):
        """Draws this training forward's gates and mixing matrices, shared by every layer that uses
        them (and reused by activation-checkpoint recomputation). Runs before each forward of the
        wrapped model; call it yourself before using adapted layers outside that forward."""
        self._clear_caches()
        if self.model.training:
            layers = [l for l in self.lora_layers.values() if l.gate_logits is not None]
            if layers:  # §2: one Concrete sample for every direction of every layer
                m = concrete_sample(torch.stack([l.gate_logits for l in layers]), self.cfg.tau)
                for layer, m_l in zip(layers, m.unbind(0)):
                    layer.m = m_l
            for graph in self.graphs.values():
                graph.prepare()

    def _clear_caches(self):
        for layer in self.lora_layers.values():
            layer.m, layer.cached_factors = None, None

    def ib_loss(self):
        """§4: β·Σ_modules Σ_j KL(Bern(σ(φ_j)) ‖ Bern(π0)), warmed up over kl_warmup_steps."""
        p = next(iter(self.lora_layers.values())).lora_A
        if not self.cfg.ib:
            return p.new_zeros(())
        warm = min(1.0, self.steps / self.cfg.kl_warmup_steps) if self.cfg.kl_warmup_steps > 0 else 1.0
        kl = bernoulli_kl(torch.stack([l.gate_logits for l in self.lora_layers.values()]), self.cfg.prior).sum()
        return self.cfg.beta * warm * kl

    def step(self):
        """Call once per optimizer step: advances the KL warm-up and, every K steps, the semantic edges."""
        self.steps += 1
        K = self.cfg.semantic_every
        if not self.graphs or K <= 0:
            return
        armed = any(l.sketch_P is not None for l in self.lora_layers.values())
        for graph in self.graphs.values():
            if armed:
                graph.rebuild_semantic_edges()
            if self.steps % K == 0:
                graph.arm_sketches()  # the next training backward fills the sketches

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def control_parameters(self):
        """The gate logits φ and the smoothing logits ψ: a few numbers per layer that decide which
        directions stay open and how much layers mix."""
        return [l.gate_logits for l in self.lora_layers.values() if l.gate_logits is not None] + \
            [g.eta_logit for g in self.graphs.values()]

    def param_groups(self, lr, control_lr, weight_decay):
        """AdamW groups: LoRA factors and modules_to_save at `lr` with weight decay; φ and ψ at
        `control_lr` without it. [OURS] Adam moves a parameter by about lr per step, so at lr = 5e-3 a
        gate logit (init 2.2, pruned below 0) cannot close in a run of a few hundred steps."""
        control = {id(p) for p in self.control_parameters()}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in control],
                   "lr": lr, "weight_decay": weight_decay},
                  {"params": self.control_parameters(), "lr": control_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def mask_directions(self, keep, rule, generator=None):
        """Filter baselines (§5): fix each layer's mask to keep[name] directions, those with the largest
        ‖b_j‖·‖a_j‖ = ‖b_j a_jᵀ‖_F (rule "norm", top-k-norm) or random ones (rule "random")."""
        if self.cfg.ib:
            raise ValueError("mask_directions() replaces the IB gate: use it with ib=False")
        if rule not in ("norm", "random"):
            raise ValueError(f"rule must be 'norm' or 'random', got {rule!r}")
        if set(keep) != set(self.lora_layers):
            raise ValueError(f"keep must name every adapted layer; missing {sorted(set(self.lora_layers) - set(keep))[:4]}, "
                             f"unknown {sorted(set(keep) - set(self.lora_layers))[:4]}")
        for name, layer in self.lora_layers.items():
            k = keep[name]
            if not 0 <= k <= layer.r:
                raise ValueError(f"keep[{name!r}] = {k} is outside [0, {layer.r}]")
            if rule == "norm":
                score = layer.lora_B.norm(dim=0) * layer.lora_A.norm(dim=1)
            else:
                score = torch.rand(layer.r, generator=generator).to(layer.mask.device)
            layer.mask.zero_()[score.topk(k).indices] = 1.0

    def open_directions(self):
        """Directions kept at eval per adapted layer: σ(φ) ≥ prune_below, or the fixed mask without IB."""
        return {n: int((torch.sigmoid(l.gate_logits) >= self.cfg.prune_below).sum()) if l.gate_logits is not None
                else int(l.mask.sum()) for n, l in self.lora_layers.items()}

    @torch.no_grad()
    def diagnostics(self):
        """Per graph: η, semantic edges, drift energy and adjacent cosine before/after smoothing."""
        self._clear_caches()
        was = self.training
        self.eval()
        out = {key: g.diagnostics() for key, g in self.graphs.items()}
        self.train(was)
        return out

    @torch.no_grad()
    def merge_and_unload(self):
        """W0 ← W0 + ΔW^f (deterministic gates, one smoothing step); returns the plain base model."""
        self._clear_caches()
        self.eval()
        deltas = {name: layer.delta_weight() for name, layer in self.lora_layers.items()}
        for name, layer in self.lora_layers.items():
            layer.base.weight += deltas[name].to(layer.base.weight.dtype)
            parent, _, leaf = name.rpartition(".")
            setattr(_get_module(self.model, parent), leaf, layer.base)
        self._hook.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad_before[n])
        model, self.lora_layers = self.model, {}
        return model

    def adapter_state_dict(self):
        """Everything training changed: LoRA factors, masks, gate logits, η and edges, modules_to_save."""
        sd = {}
        for name, layer in self.lora_layers.items():
            sd[f"{name}.lora_A"], sd[f"{name}.lora_B"], sd[f"{name}.mask"] = layer.lora_A, layer.lora_B, layer.mask
            if layer.gate_logits is not None:
                sd[f"{name}.gate_logits"] = layer.gate_logits
        for key, graph in self.graphs.items():
            sd[f"graphs.{key}.eta_logit"], sd[f"graphs.{key}.adj"] = graph.eta_logit, graph.adj
        for mod in self.cfg.modules_to_save:
            sd.update({f"{mod}.{k}": v for k, v in _get_module(self.model, mod).state_dict().items()})
        return {k: v.detach() for k, v in sd.items()}

    def save_adapter(self, path):
        """Writes adapter_model.safetensors and adapter_config.json into the folder `path`."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in self.adapter_state_dict().items()},
                  os.path.join(path, ADAPTER_WEIGHTS))
        shapes = {n: [l.base.out_features, l.base.in_features] for n, l in self.lora_layers.items()}
        with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
            json.dump({"format": "structlora", "config": asdict(self.cfg), "layers": shapes, "steps": self.steps},
                      f, indent=1)

    @torch.no_grad()
    def load_adapter(self, path):
        """Loads a save_adapter() folder; the model's adapted layers and shapes must match it exactly."""
        from safetensors.torch import load_file
        saved = read_adapter_config(path)
        ours = {n: [l.base.out_features, l.base.in_features] for n, l in self.lora_layers.items()}
        if saved["layers"] != ours:
            diff = sorted(set(map(str, saved["layers"].items())) ^ set(map(str, ours.items())))
            raise ValueError(f"adapter at {path} was trained on other layers/shapes: {diff[:8]}")
        if StructLoRAConfig(**saved["config"]) != self.cfg:
            raise ValueError(f"adapter at {path} has another config; use StructLoRA.from_pretrained(model, path)")
        tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        bad = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"adapter {path}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                             f"mis-shaped {bad[:8]}")
        for k, v in own.items():
            v.copy_(tensors[k])  # detach() shares storage with the parameters and buffers
        for graph in self.graphs.values():
            graph.update_neighbours()
        self.steps = saved.get("steps", 0)

    @classmethod
    def from_pretrained(cls, model, path):
        """Builds StructLoRA on `model` with the saved config, then loads the saved adapter."""
        saved = read_adapter_config(path)
        slora = cls(model, StructLoRAConfig(**saved["config"]))
        slora.load_adapter(path)
        return slora

    @torch.no_grad()
    def export_peft(self, path, rename=None, base_model_name_or_path=None):
        """Writes ΔW^f as a plain PEFT LoRA adapter: rank r·(deg+1) per layer, pruned directions dropped.
        `rename` maps our module paths (adapted layers, modules_to_save) to those of the model PEFT will
        load it on, e.g. the Hugging Face class of the same checkpoint."""
        from safetensors.torch import save_file
        rename = rename or (lambda name: name)
        self._clear_caches()
        self.eval()
        tensors, ranks = {}, {}
        for name, layer in self.lora_layers.items():
            B, d, A = layer.factors()
            keep = d != 0
            if not keep.any():
                keep[0] = True  # PEFT needs rank ≥ 1; this direction's d is 0
            tensors[f"base_model.model.{rename(name)}.lora_A.weight"] = (d[keep, None] * A[keep]).contiguous().cpu()
            tensors[f"base_model.model.{rename(name)}.lora_B.weight"] = B[:, keep].contiguous().cpu()
            ranks[rename(name)] = int(keep.sum())
        for mod in self.cfg.modules_to_save:
            for k, v in _get_module(self.model, mod).state_dict().items():
                tensors[f"base_model.model.{rename(mod)}.{k}"] = v.contiguous().cpu()
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
        r0 = next(iter(ranks.values()))
        config = {"peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": r0,
                  "rank_pattern": {f"^{n}$": k for n, k in ranks.items()},
                  "alpha_pattern": {f"^{n}$": k for n, k in ranks.items()},  # scaling α/r = 1: d is inside A
                  "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
                  "modules_to_save": [rename(m) for m in self.cfg.modules_to_save] or None,
                  "base_model_name_or_path": base_model_name_or_path}
        with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=1)


def _get_module(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from None


def inject_lora(model, cfg):
    """Replaces every nn.Linear whose last name component is in target_modules by a LoRALinear."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; merge_and_unload() first or use a fresh model")
    hits = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in cfg.target_modules]
    not_linear = [n for n, m in hits if type(m) is not nn.Linear]
    if not_linear:
        raise TypeError(f"target modules must be nn.Linear; these are not: {not_linear[:8]}")
    found = {n.rpartition(".")[2] for n, _ in hits}
    missing = [t for t in cfg.target_modules if t not in found]
    if missing:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {missing} match no nn.Linear; the model's nn.Linear names are {names}")
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = {}
    for name, base in hits:
        parent, _, leaf = name.rpartition(".")
        layers[name] = LoRALinear(base, cfg, gen)
        setattr(_get_module(model, parent), leaf, layers[name])
    return layers


def group_layers(lora_layers):
    """One graph per target name (and shape, so that neighbours' factors stack), in depth order."""
    groups = {}
    for name, layer in lora_layers.items():
        key = (name.rpartition(".")[2], layer.base.out_features, layer.base.in_features)
        groups.setdefault(key, []).append(layer)
    names = [k[0] for k in groups]
    return {(k[0] if names.count(k[0]) == 1 else f"{k[0]}_{k[1]}x{k[2]}"): v for k, v in groups.items()}


def read_adapter_config(path):
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise FileNotFoundError(f"no StructLoRA adapter at {path!r} (need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        saved = json.load(f)
    if saved.get("format") != "structlora":
        raise ValueError(f"{cfg_path} is not a StructLoRA adapter config")
    return saved
