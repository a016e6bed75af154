"""The coordinator's design space (the paper's Table 6 and appendix): smooth vs gcn, T layers, edge sets,
static regularizer baselines, and the seam for a researcher's own coordinator."""
import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel, make_toy, randomize_adapters, rel_err, train_steps


def make(**cfg):
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(), StructLoRAConfig(**{"r": 4, "alpha": 8, "num_train_examples": 64, "semantic_every": 0, **cfg})).double()
    randomize_adapters(slora)
    return slora


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_gcn_with_identity_and_theta_eta_I_is_smooth(T, training):
    smooth = make(graph_layers=T)
    gcn = make(graph_layers=T, coordinator="gcn", gcn_activation="identity")
    for key, graph in gcn.graphs.items():
        eta = smooth.graphs[key].coordinator.eta().item()
        for theta in graph.coordinator.theta:
            theta.data = eta * torch.eye(4, dtype=torch.float64)
        graph.set_edges(smooth.graphs[key].adj)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    outs = []
    for slora in (smooth, gcn):
        slora.train(training)
        torch.manual_seed(1)
        outs.append(slora(x))
    assert rel_err(outs[1], outs[0]) < 1e-12
    with torch.no_grad():
        theta = gcn.graphs["q_proj"].coordinator.theta[0]
        theta.add_(0.1)
    assert rel_err(gcn(x), outs[0]) > 1e-6  # Θ is used: any other Θ changes the function


def test_gcn_theta_learns_and_merged_equals_adapted():
    slora = make(coordinator="gcn", graph_layers=2)
    slora.train()
    slora(torch.randn(3, 5, 16, dtype=torch.float64)).square().mean().backward()
    thetas = [t for g in slora.graphs.values() for t in g.coordinator.theta]
    assert len(thetas) == 4 and all(t.grad is not None and t.grad.abs().sum() > 0 for t in thetas)
    assert {id(t) for t in thetas} <= {id(p) for p in slora.control_parameters()}
    slora.eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        adapted = slora(x)
        merged = slora.merge_and_unload()
        assert rel_err(merged(x), adapted) < 1e-12


def rebuild(slora, sketches):
    """Runs one semantic rebuild with the given per-layer sketches (fed as if a backward had filled them)."""
    slora.step()
    for graph in slora.graphs.values():
        for layer, s in zip(graph.layers, sketches):
            layer.sketch = s.clone()
    slora.step()


def aligned_sketches(n=5, seed=0):
    """Every layer's sketch close to one shared direction, so every pair (adjacent or not) is aligned."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(16, 16, generator=g)
    return [shared + 0.3 * torch.randn(16, 16, generator=g) for _ in range(n)]


def test_edge_sets():
    cfg = dict(semantic_every=1, semantic_topk=2, semantic_threshold=0.1)
    chain, semantic, hybrid = (make(edges=e, **cfg) for e in ("chain", "semantic", "hybrid"))
    g0 = semantic.graphs["q_proj"]
    assert g0.adj.sum() == 0  # no forced depth edges: nothing mixes before the first rebuild
    for _ in range(3):
        for slora in (chain, semantic, hybrid):
            rebuild(slora, aligned_sketches())
    depth = hybrid.graphs["q_proj"].chain
    for graph in chain.graphs.values():
        assert torch.equal(graph.adj, graph.chain)  # chain never adds a non-adjacent edge
    for graph in hybrid.graphs.values():
        assert (graph.chain <= graph.adj).all() and (graph.adj > graph.chain).any()  # chain ⊂ hybrid, plus semantic
    for graph in semantic.graphs.values():
        assert graph.adj.sum() > 0 and (graph.adj.sum(1) <= 2).all()  # only its own top-2 picks
    d = hybrid.diagnostics()["q_proj"]
    adj = hybrid.graphs["q_proj"].adj
    assert d["edges"] == [(i, j) for i in range(5) for j in range(i + 1, 5) if adj[i, j]]
    assert d["semantic_edges"] == [(i, j) for i, j in d["edges"] if not depth[i, j]]


def dense_updates(slora, target):
    """ΔW̃_i = (α/r)·B_i·diag(σ(φ_i))·A_i, by hand in float64 numpy."""
    out = []
    for name, l in slora.lora_layers.items():
        if name.endswith(target):
            q = 1 / (1 + np.exp(-l.gate_logits.detach().numpy()))
            out.append(l.scaling * l.lora_B.detach().numpy() @ np.diag(q) @ l.lora_A.detach().numpy())
    return out


@pytest.mark.parametrize("reg", ["cos", "laplacian"])
def test_regularizers_equal_their_dense_definitions(reg):
    slora = make(graph=False, reg=reg, reg_weight=0.5)
    expect = 0.0
    for target in ("q_proj", "v_proj"):
        dW = dense_updates(slora, target)
        for a, b in zip(dW, dW[1:]):  # depth neighbours
            if reg == "laplacian":
                expect += ((a - b) ** 2).sum()
            else:
                expect += 1 - (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    assert slora.reg_loss().item() == pytest.approx(expect, rel=1e-10)
    assert slora.aux_loss().item() == pytest.approx(0.5 * expect + slora.ib_loss().item(), rel=1e-10)
    with torch.no_grad():  # equal updates: both penalties vanish
        first = next(iter(slora.lora_layers.values()))
        for layer in slora.lora_layers.values():
            layer.lora_A.copy_(first.lora_A)
            layer.lora_B.copy_(first.lora_B)
            layer.gate_logits.copy_(first.gate_logits)
    assert abs(slora.reg_loss().item()) < 1e-9
    slora.reg_loss().backward()  # and it is differentiable in the factors
    assert first.lora_B.grad is not None


def readme_block(heading):
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_custom_coordinator_example_runs_and_coordinates():
    scope = {}
    exec(readme_block("## Add your own coordinator"), scope)
    torch.manual_seed(0)
    model = ToyModel()
    slora = StructLoRA(model, StructLoRAConfig(r=4, coordinator="custom", graph_layers=2,
                                                    semantic_every=0), coordinator=scope["HopWeights"])
    randomize_adapters(slora)
    x = torch.randn(2, 5, 16)
    slora.train()
    slora(x).square().mean().backward()
    params = [p for g in slora.graphs.values() for p in g.coordinator.parameters()]
    assert params and all(p.grad is not None for p in params)
    slora.eval()
    with torch.no_grad():
        adapted = slora(x)
        alone = copy.deepcopy(slora)
        for g in alone.graphs.values():  # a graph without edges: the coordinator has nothing to mix
            g.set_edges(torch.zeros_like(g.adj))
        assert rel_err(alone(x), adapted) > 1e-4
        assert rel_err(slora.merge_and_unload()(x), adapted) < 1e-5


@pytest.mark.parametrize("T", [1, 2])
def test_gcn_pruned_direction_has_no_influence_on_the_merged_weights(T):
    slora = make_toy(coordinator="gcn", graph_layers=T)
    layer = slora.lora_layers["blocks.2.q_proj"]
    with torch.no_grad():
        layer.gate_logits[0] = -5.0  # σ = 0.007: pruned
        before = {n: l.delta_weight().clone() for n, l in slora.eval().lora_layers.items()}
        layer.lora_B[:, 0] += 3.0  # only the pruned direction's column changes
        layer.lora_A[0] += 3.0
        after = {n: l.delta_weight() for n, l in slora.lora_layers.items()}
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)


def test_a_failing_coordinator_leaves_the_model_untouched():
    class Broken(nn.Module):
        def __init__(self, graph):
            super().__init__()
            raise RuntimeError("broken coordinator")
    model = ToyModel()
    with pytest.raises(RuntimeError, match="broken"):
        StructLoRA(model, StructLoRAConfig(coordinator="custom"), coordinator=Broken)
    assert all(type(m) is not StructLoRA for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    StructLoRA(model, StructLoRAConfig())  # and it can still be adapted


def test_a_custom_coordinator_sees_the_graph_when_built():
    seen = {}

    class Peek(nn.Module):
        def __init__(self, graph):
            super().__init__()
            seen["sources"], seen["a_hat"] = graph.sources, graph.a_hat.clone()

        def forward(self, graph, i, B):
            return B
    StructLoRA(ToyModel(), StructLoRAConfig(coordinator="custom"), coordinator=Peek)
    assert seen["sources"][0] == [0, 1] and seen["a_hat"][0, 0] == 0.5


def test_a_layer_without_gradient_does_not_cancel_the_rebuild():
    slora = make_toy(semantic_every=1, semantic_threshold=-1.0)
    blocks = slora.model.blocks
    slora.model.blocks = nn.ModuleList(list(blocks)[:4])  # block 4 is never run: its layers get no sketch
    with pytest.warns(UserWarning, match="no gradient sketch"):
        train_steps(slora, 3)
    slora.model.blocks = blocks
    g = slora.graphs["q_proj"]
    assert g.sketch_ema is not None and (g.adj - g.chain).sum() > 0  # the others still got semantic edges
    assert g.adj[4].sum() == g.chain[4].sum()  # and the silent layer got none


def test_semantic_only_graph_lists_all_its_edges_as_semantic():
    slora = make_toy(edges="semantic", semantic_every=1, semantic_threshold=-1.0, semantic_topk=2)
    train_steps(slora, 3)
    d = slora.diagnostics()["q_proj"]
    assert d["edges"] and d["semantic_edges"] == d["edges"]


def test_encoder_and_decoder_layers_form_separate_graphs():
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(8, 8)}) for _ in range(3))
            self.decoder = nn.ModuleList(nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8)}),
                                                        "cross_attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8)})})
                                         for _ in range(3))
    slora = StructLoRA(EncDec(), StructLoRAConfig(r=2, target_modules=("q_proj",)))
    assert sorted(len(g.layers) for g in slora.graphs.values()) == [3, 3, 3]
    for g in slora.graphs.values():
        assert torch.equal(g.adj, g.chain) and g.chain.sum() == 4  # a chain of 3 within one role


def test_a_non_finite_sketch_is_skipped_and_keeps_the_old_ema():
    # An fp16 overflow or a NaN batch while the sketches are armed must not poison the EMA for good
    slora = make(edges="semantic", semantic_every=1, semantic_topk=1, semantic_threshold=0.1)
    rebuild(slora, aligned_sketches())
    graph = slora.graphs["q_proj"]
    before = graph.sketch_ema.clone()
    bad = aligned_sketches(seed=1)
    bad[2][0, 0] = float("nan")
    bad[4][1, 1] = float("inf")
    with pytest.warns(UserWarning, match="non-finite"):
        rebuild(slora, bad)
    ema = graph.sketch_ema
    assert torch.isfinite(ema).all()
    assert torch.equal(ema[2], before[2]) and torch.equal(ema[4], before[4])  # skipped: the old EMA stays
    rho = slora.cfg.sketch_ema
    for i in (0, 1, 3):  # the finite ones were averaged in, as a float64 hand computation says
        ref = rho * before[i].double() + (1 - rho) * bad[i].double()
        assert rel_err(ema[i].double(), ref) < 1e-6


def test_nan_cosines_never_form_semantic_edges():
    from structlora import semantic_adjacency
    s = torch.stack(aligned_sketches(6))
    s[1] = float("nan")  # a NaN sketch reaching the edge builder anyway
    s[4, 0, 0] = float("nan")
    adj = semantic_adjacency(s, topk=1, threshold=0.1, exclude=torch.zeros(6, 6))
    assert adj[1].sum() == 0 and adj[4].sum() == 0
    finite = semantic_adjacency(s[[0, 2, 3, 5]], topk=1, threshold=0.1, exclude=torch.zeros(4, 4))
    assert torch.equal(adj[[0, 2, 3, 5]][:, [0, 2, 3, 5]], finite)  # the others pair as if 1, 4 were absent


@pytest.mark.parametrize("T", [1, 2])
def test_a_fresh_gcn_with_identity_is_smooth_at_eta_init(T):
    # bug guarded: Θ^(t) starting at I instead of η_init·I (the config says gcn starts as smooth at η_init)
    torch.manual_seed(0)
    cfg = dict(r=4, alpha=8, semantic_every=0, graph_layers=T, eta_init=0.3)
    smooth = StructLoRA(ToyModel(), StructLoRAConfig(**cfg)).double()
    torch.manual_seed(0)
    gcn = StructLoRA(ToyModel(), StructLoRAConfig(**cfg, coordinator="gcn", gcn_activation="identity")).double()
    g = torch.Generator().manual_seed(1)
    for a, b in zip(smooth.lora_layers.values(), gcn.lora_layers.values()):
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g, dtype=torch.float64))
            b.lora_B.copy_(a.lora_B)
    assert smooth.graphs["q_proj"].coordinator.eta().item() == pytest.approx(0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(gcn.eval()(x), smooth.eval()(x)) < 1e-6  # η = σ(ψ) was rounded to float32 at init


def test_semantic_edges_come_from_the_sketch_ema():
    # bugs guarded: edges from the raw last sketch instead of the EMA; the EMA's weights swapped
    slora = make(edges="semantic", semantic_every=1, semantic_topk=1, semantic_threshold=0.5)
    g = torch.Generator().manual_seed(3)
    v, w = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    noise = lambda: [0.2 * torch.randn(16, 16, generator=g) for _ in range(5)]
    first = [x + (v if i in (0, 3) else 0) for i, x in enumerate(noise())]   # 0–3 aligned
    second = [x + (w if i in (1, 4) else 0) for i, x in enumerate(noise())]  # 1–4 aligned, in the last sketch only
    rebuild(slora, first)
    slora.step()
    for layer, s in zip(slora.graphs["q_proj"].layers, second):
        layer.sketch = s.clone()
    slora.step()
    rho = slora.cfg.sketch_ema
    ema = np.stack([(rho * a.double() + (1 - rho) * b.double()).numpy().ravel() for a, b in zip(first, second)])
    z = ema / np.linalg.norm(ema, axis=1, keepdims=True)
    cos = z @ z.T
    assert cos[0, 3] > 0.5 and max(cos[i, j] for i in range(5) for j in range(i + 1, 5) if (i, j) != (0, 3)) < 0.5
    adj = slora.graphs["q_proj"].adj
    assert [(i, j) for i in range(5) for j in range(i + 1, 5) if adj[i, j]] == [(0, 3)]
