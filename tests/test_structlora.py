import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structlora import StructLoRA, StructLoRAConfig, bernoulli_kl, drift_energy, propagation_matrix
from toy import ToyModel, make_toy, randomize_adapters, rel_err, train_steps
from training.baselines import mask_directions


def make(seed=0, **cfg):
    torch.manual_seed(seed)
    model = ToyModel()
    cfg = StructLoRAConfig(**{"r": 4, "alpha": 8, "num_train_examples": 64, **cfg})
    return model, StructLoRA(copy.deepcopy(model), cfg)


def test_plain_lora_equals_peft():
    peft = pytest.importorskip("peft")
    base, slora = make(ib=False, graph=False)
    randomize_adapters(slora)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    sd = {}
    for name, layer in slora.lora_layers.items():
        sd[f"base_model.model.{name}.lora_A.default.weight"] = layer.lora_A
        sd[f"base_model.model.{name}.lora_B.default.weight"] = layer.lora_B
    missing = set(sd) - set(ref.state_dict())
    assert not missing
    ref.load_state_dict(sd, strict=False)
    x = torch.randn(2, 7, 16)
    assert rel_err(slora(x), ref(x)) < 1e-6
    ref.eval()
    slora.eval()
    assert rel_err(slora(x), ref(x)) < 1e-6


def test_only_adapter_parameters_train_and_base_stays_bit_identical():
    base, slora = make(modules_to_save=("head",), semantic_every=1)
    frozen = {k: v.clone() for k, v in base.state_dict().items() if not k.startswith("head")}
    opt = torch.optim.AdamW(slora.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = slora(torch.randn(4, 6, 16)).square().mean() + slora.ib_loss()
        loss.backward()
        opt.step()
        slora.step()
        opt.zero_grad()
    names = {n for n, p in slora.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B", "gate_logits", "eta_logit")) or ".head." in n
                         for n in names)
    assert any(n.endswith("eta_logit") for n in names) and any(".head." in n for n in names)
    for name, layer in slora.lora_layers.items():
        assert layer.base.weight.grad is None
        assert torch.equal(layer.base.weight, frozen[f"{name}.weight"])
    assert torch.equal(slora.model.blocks[0].k_proj.weight, frozen["blocks.0.k_proj.weight"])
    assert not torch.equal(slora.model.head.weight, base.head.weight)  # modules_to_save did train


def sources_nearest_first(adj, i, hops):
    """Nodes within `hops` edges of i, by (distance, index): the order in which a layer draws its sources' gates."""
    dist = {i: 0}
    for h in range(1, hops + 1):
        for j in [j for j in dist if dist[j] == h - 1]:
            for k in np.flatnonzero(adj[j]):
                dist.setdefault(int(k), h)
    return sorted(dist, key=lambda j: (dist[j], j))


def dense_reference(layers, adj, gates, cfg, coordinator_params):
    """ΔW^f of every node from the paper's formulas, by hand in float64 numpy: no code from structlora.
    gates[i][s]: the gate vector layer i applied to source s's directions."""
    n, T, I = len(layers), cfg.graph_layers, np.eye(len(layers))
    a_hat = (adj + I) / (adj + I).sum(1, keepdims=True)  # D^-1 (A + I)
    Bs = [l.lora_B.detach().numpy() for l in layers]
    As = [l.lora_A.detach().numpy() for l in layers]
    sc = layers[0].scaling
    if cfg.coordinator == "smooth":  # ΔW^f = C^T·ΔW̃ with C = (1-η)I + ηÂ, per consumer's gate samples
        C = np.linalg.matrix_power((1 - coordinator_params) * I + coordinator_params * a_hat, T)
        return [sum(C[i, s] * sc * Bs[s] @ np.diag(gates[i].get(s, 0 * As[s][:, 0])) @ As[s] for s in range(n))
                for i in range(n)]
    act = np.tanh if cfg.gcn_activation == "tanh" else (lambda z: z)
    out = []
    for i in range(n):  # consumer i's own gate samples: h_s^(0) = B_s·diag(m_s) = ΔW̃_s in factor form
        m = [gates[i].get(s, 0 * As[s][:, 0]) for s in range(n)]
        H = [[Bs[s] @ np.diag(m[s]) if j == s else np.zeros_like(Bs[s]) for s in range(n)] for j in range(n)]
        for theta in coordinator_params:  # h_j ← h_j + σ(Σ_k (Â − I)_jk h_k Θ), every node, every source
            H = [[H[j][s] + act(sum((a_hat - I)[j, k] * H[k][s] for k in range(n)) @ theta) for s in range(n)]
                 for j in range(n)]
        out.append(sum(H[i][s] @ np.diag(sc * (m[s] != 0)) @ As[s] for s in range(n)))  # open directions only
    return out


@pytest.mark.parametrize("coordinator,T", [("smooth", 1), ("smooth", 2), ("smooth", 3), ("gcn", 1), ("gcn", 2)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_factor_form_equals_dense_coordinated_update(mode, coordinator, T):
    _, slora = make(semantic_every=0, coordinator=coordinator, graph_layers=T)
    randomize_adapters(slora)
    slora.double()
    graph = slora.graphs["q_proj"]
    adj = graph.adj.clone()
    adj[0, 3] = adj[3, 0] = 1.0  # a semantic edge 0–3, by hand
    graph.set_edges(adj)
    slora.train(mode == "train")
    adj, gates, outs = adj.numpy(), [], []
    for i, layer in enumerate(graph.layers):  # each layer called directly, outside the wrapped forward
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        torch.manual_seed(100 + i)
        outs.append((x, layer(x)))
        src = sources_nearest_first(adj, i, T)
        phi = torch.stack([graph.layers[s].gate_logits for s in src]).detach().numpy()
        if mode == "train":  # the Concrete sample comes from torch's global RNG: replay it
            torch.manual_seed(100 + i)
            u = torch.rand(len(src), layer.r, dtype=torch.float64).clamp(1e-6, 1 - 1e-6).numpy()
            m = 1 / (1 + np.exp(-(phi + np.log(u) - np.log1p(-u)) / slora.cfg.tau))
        else:
            q = 1 / (1 + np.exp(-phi))
            m = q * (q >= 0.5)
        gates.append(dict(zip(src, m)))
    params = graph.coordinator.eta().item() if coordinator == "smooth" else \
        [t.detach().numpy() for t in graph.coordinator.theta]
    ref = dense_reference(graph.layers, adj, gates, slora.cfg, params)
    for i, layer in enumerate(graph.layers):
        x, y = outs[i]
        W = layer.base.weight.detach().numpy() + ref[i]
        np.testing.assert_allclose(y.detach().numpy(), x.numpy() @ W.T + layer.base.bias.detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
        if mode == "eval":
            np.testing.assert_allclose(layer.delta_weight().detach().numpy(), ref[i], atol=1e-12)


def direct_drift(H, adj):
    n = len(H)
    return sum(((H[i] - H[j]) ** 2).sum() for i in range(n) for j in range(i + 1, n) if adj[i, j])


@pytest.mark.parametrize("seed", range(5))
def test_smoothing_never_increases_drift_energy(seed):
    g = torch.Generator().manual_seed(seed)
    n = 8
    H = torch.randn(n, 6, 5, generator=g, dtype=torch.float64) * torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 3
    adj = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n - 1):
        adj[i, i + 1] = adj[i + 1, i] = 1
    extra = torch.rand(n, n, generator=g) < 0.2
    adj = torch.maximum(adj, (extra | extra.T).double() * (1 - torch.eye(n, dtype=torch.float64)))
    flat = H.flatten(1)
    e0 = direct_drift(H, adj)
    # drift_energy from the Gram matrix equals the direct sum over edges
    assert abs(drift_energy(flat @ flat.T, adj) - e0) < 1e-9 * e0
    L_sym = torch.eye(n, dtype=torch.float64) - propagation_matrix(adj, "sym")
    t0 = torch.trace(flat.T @ L_sym @ flat)
    for eta in np.linspace(0, 1, 11):
        rw = ((1 - eta) * torch.eye(n, dtype=torch.float64) + eta * propagation_matrix(adj, "rw")) @ flat
        assert direct_drift(rw.view_as(H), adj) <= e0 * (1 + 1e-12)
        sym = ((1 - eta) * torch.eye(n, dtype=torch.float64) + eta * propagation_matrix(adj, "sym")) @ flat
        assert torch.trace(sym.T @ L_sym @ sym) <= t0 * (1 + 1e-12)


def test_sym_normalization_can_raise_the_papers_drift_energy():
    # Why "rw" is the default: equal updates on a chain drift apart under D^-1/2 (A+I) D^-1/2.
    n = 5
    adj = torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    adj = adj + adj.T
    H = torch.ones(n, 3, dtype=torch.float64)
    sym = 0.5 * H + 0.5 * propagation_matrix(adj, "sym") @ H
    rw = 0.5 * H + 0.5 * propagation_matrix(adj, "rw") @ H
    assert direct_drift(sym, adj) > 1e-3 and direct_drift(rw, adj) < 1e-20


def test_diagnostics_match_dense_updates():
    _, slora = make()
    randomize_adapters(slora)
    slora.eval()
    d = slora.diagnostics()["v_proj"]
    layers = [l for n, l in slora.lora_layers.items() if n.endswith("v_proj")]
    with torch.no_grad():
        after = [l.delta_weight().flatten() for l in layers]
    adj = slora.graphs["v_proj"].adj
    assert d["drift_energy_after"] == pytest.approx(direct_drift(torch.stack(after), adj).item(), rel=1e-4)
    cos = [torch.cosine_similarity(a, b, 0).item() for a, b in zip(after, after[1:])]
    assert d["adjacent_cosine_after"] == pytest.approx(np.mean(cos), rel=1e-4, abs=1e-6)
    assert d["drift_energy_after"] <= d["drift_energy_before"] * (1 + 1e-6)


def test_kl_matches_torch_distributions():
    logits = torch.randn(20, dtype=torch.float64) * 3
    for prior in (0.1, 0.5, 0.8):
        ref = torch.distributions.kl_divergence(torch.distributions.Bernoulli(logits=logits),
                                                torch.distributions.Bernoulli(probs=torch.tensor(prior)))
        torch.testing.assert_close(bernoulli_kl(logits, prior), ref.double())


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
def test_gradient_sketch_equals_weight_gradient_times_P(checkpointing):
    _, slora = make(semantic_every=1)
    slora.model.checkpointing = checkpointing  # recomputation must neither lose nor double the sketch
    randomize_adapters(slora)
    for layer in slora.lora_layers.values():
        layer.base.weight.requires_grad_(True)  # only to get the reference gradient ∂L/∂W
    slora.step()  # arms the sketches
    slora.train()
    slora(torch.randn(3, 5, 16, requires_grad=True)).square().sum().backward()
    for name, layer in slora.lora_layers.items():
        ref = layer.base.weight.grad @ layer.sketch_P
        torch.testing.assert_close(layer.sketch, ref, rtol=1e-4, atol=1e-5)


def test_semantic_edges_join_aligned_layers():
    _, slora = make(semantic_every=1, semantic_topk=1, semantic_threshold=0.5)
    graph = slora.graphs["q_proj"]
    slora.step()
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, 16, generator=g)
    for i, layer in enumerate(graph.layers):  # layers 0 and 3 see the same gradient, others random
        layer.sketch = shared.clone() if i in (0, 3) else torch.randn(16, 16, generator=g)
    slora.step()
    assert graph.adj[0, 3] == 1 and graph.adj[3, 0] == 1
    assert graph.sources[0] == [0, 1, 3]
    assert all(graph.adj[i, i + 1] == 1 for i in range(4))  # chain edges stay


def test_merge_and_unload_gives_the_plain_base_model():
    base, slora = make()
    randomize_adapters(slora)
    slora.eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        adapted = slora(x)
    merged = slora.merge_and_unload()
    with torch.no_grad():
        out = merged(x)
    assert rel_err(out, adapted) < 1e-5
    assert list(merged.state_dict()) == list(base.state_dict())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert all(p.requires_grad for p in merged.parameters())  # flags restored


def test_save_load_reproduces_outputs(tmp_path):
    base, slora = make(modules_to_save=("head",), semantic_every=1)
    opt = torch.optim.AdamW(slora.trainable_parameters(), lr=1e-2)
    for _ in range(4):  # a few real steps so B, gates, η, edges and the head all move
        slora(torch.randn(4, 5, 16)).square().mean().backward()
        opt.step()
        slora.step()
        opt.zero_grad()
    adj = slora.graphs["v_proj"].adj.clone()
    adj[0, 4] = adj[4, 0] = 1.0
    slora.graphs["v_proj"].set_edges(adj)
    slora.save_adapter(tmp_path / "ad")
    slora.eval()
    x = torch.randn(2, 5, 16)
    loaded = StructLoRA.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), slora(x))
    assert loaded.graphs["v_proj"].sources[0] == [0, 1, 4]


def test_export_peft_matches_merged_model(tmp_path):
    peft = pytest.importorskip("peft")
    base, slora = make(modules_to_save=("head",))
    randomize_adapters(slora)
    with torch.no_grad():
        slora.model.head.weight.mul_(-2)  # a "trained" head must travel with the export
    slora.export_peft(tmp_path / "peft")
    x = torch.randn(2, 5, 16)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        merged = slora.merge_and_unload()
        assert rel_err(ref(x), merged(x)) < 1e-5
        assert rel_err(base(x), merged(x)) > 0.1


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        StructLoRAConfig(r=0)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        StructLoRA(ToyModel(), StructLoRAConfig(target_modules=("query",)))
    with pytest.raises(TypeError, match="must be nn.Linear"):
        StructLoRA(ToyModel(), StructLoRAConfig(target_modules=("norm",)))
    with pytest.raises(ValueError, match="not found"):
        StructLoRA(ToyModel(), StructLoRAConfig(modules_to_save=("classifier",)))
    _, slora = make()
    with pytest.raises(FileNotFoundError, match="no StructLoRA adapter"):
        slora.load_adapter(tmp_path / "nothing")
    slora.save_adapter(tmp_path / "ad")
    with pytest.raises(ValueError, match="other layers/shapes"):
        StructLoRA.from_pretrained(ToyModel(d=8), tmp_path / "ad")
    with pytest.raises(ValueError, match="other layers/shapes"):
        StructLoRA.from_pretrained(ToyModel(n_layers=3), tmp_path / "ad")
    with pytest.raises(ValueError, match="already has LoRA"):
        StructLoRA(slora.model, StructLoRAConfig())


@pytest.mark.parametrize("coordinator", ["smooth", "gcn"])
def test_bf16_autocast_forward_and_backward(coordinator):
    _, slora = make(coordinator=coordinator, graph_layers=2)
    randomize_adapters(slora)
    x = torch.randn(2, 5, 16)
    slora.eval()  # deterministic gates, so both passes compute the same function
    ref = slora(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = slora(x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 0.03
    slora.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = slora(x)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in slora.trainable_parameters())


def test_training_lowers_loss_and_strong_ib_closes_gates():
    # Teacher: each adapted layer needs a rank-1 change; the student has r = 4 directions per layer.
    torch.manual_seed(0)
    student = ToyModel()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for block in teacher.blocks:
            for lin in (block.q_proj, block.v_proj):
                lin.weight += torch.randn(16, 1) @ torch.randn(1, 16) / 4
    slora = StructLoRA(student, StructLoRAConfig(r=4, alpha=4, beta=1e-3, ib_weighting="step", prior=0.05,
                                                 kl_warmup_steps=50))
    opt = torch.optim.AdamW(slora.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(300):
        x = torch.randn(32, 6, 16)
        with torch.no_grad():
            y = teacher(x)
        task = (slora(x) - y).square().mean()
        (task + slora.ib_loss()).backward()
        opt.step()
        slora.step()
        opt.zero_grad()
        losses.append(task.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    opened = slora.open_directions()
    assert sum(opened.values()) < 4 * len(opened)  # the IB penalty closed some directions
    assert sum(opened.values()) > 0                # but not the ones the task needs


def test_param_groups_split_control_logits_from_factors():
    _, slora = make(modules_to_save=("head",))
    factors, control = slora.param_groups(lr=1e-3, control_lr=5e-2, weight_decay=0.01)
    assert (factors["lr"], factors["weight_decay"], control["lr"], control["weight_decay"]) == (1e-3, 0.01, 5e-2, 0.0)
    names = {id(p): n for n, p in slora.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in control["params"]} == {"gate_logits", "eta_logit"}
    grouped = [id(p) for g in (factors, control) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in slora.trainable_parameters())  # each exactly once
    _, plain = make(ib=False, graph=False)
    assert len(plain.param_groups(1e-3, 5e-2, 0.01)) == 1  # LoRA: no control parameters, no empty group


def test_mask_survives_the_wrappers_state_dict_and_the_wrapper_pickles():
    slora = make_toy(ib=False)
    mask_directions(slora, {n: 2 for n in slora.lora_layers}, "norm")
    x = torch.randn(2, 5, 16)
    out = slora.eval()(x)
    again = make_toy(ib=False)
    again.load_state_dict(slora.state_dict())
    assert rel_err(again.eval()(x), out) < 1e-6
    buffer = io.BytesIO()
    torch.save(slora, buffer)
    buffer.seek(0)
    assert rel_err(torch.load(buffer, weights_only=False).eval()(x), out) < 1e-6


def test_a_rejected_adapter_leaves_the_wrapper_as_it_was():
    slora = make_toy()
    tensors, meta = make_toy().adapter_state()
    tensors = {k: v.clone() + (0.5 if k.endswith("lora_A") else 0) for k, v in tensors.items()}
    tensors["graphs.q_proj.adj"][0, 0] = 1.0  # a self-loop: not a valid adjacency
    before = {k: v.clone() for k, v in slora.adapter_state()[0].items()}
    with pytest.raises(ValueError, match="adjacency"):
        slora.load_adapter_state(tensors, meta)
    assert all(torch.equal(v, before[k]) for k, v in slora.adapter_state()[0].items())


@pytest.mark.parametrize("bad", [dict(sketch_dim=0), dict(sketch_ema=1.5), dict(semantic_threshold=1.0),
                                 dict(alpha=0.0), dict(beta=-1.0), dict(r=True), dict(semantic_topk=1.5),
                                 dict(kl_warmup_steps=-1), dict(edges="semantic", semantic_every=0),
                                 dict(edges="semantic", semantic_topk=0)])
def test_more_config_gaps_are_refused(bad):
    with pytest.raises(ValueError):
        StructLoRAConfig(**bad)


def test_adapter_files_from_two_saves_are_refused(tmp_path):
    slora = make_toy(semantic_every=1, semantic_threshold=-1.0)
    train_steps(slora, 1)
    slora.save_adapter(tmp_path / "old")
    train_steps(slora, 3)
    slora.save_adapter(tmp_path / "new")
    (tmp_path / "new" / "adapter_config.json").write_text((tmp_path / "old" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="different saves"):
        make_toy(semantic_every=1, semantic_threshold=-1.0).load_adapter(tmp_path / "new")


def test_kl_is_finite_for_saturated_gates_and_reg_loss_is_zero_without_reg():
    kl = bernoulli_kl(torch.tensor([-float("inf"), -60.0, 0.0, 60.0, float("inf")]), 0.2)
    assert torch.isfinite(kl).all()
    assert make_toy().reg_loss().item() == 0.0


class NamedBlocks(nn.Module):
    """Blocks as attributes named `<prefix>0…` (a user's model, torchvision's encoder_layer_N)."""

    def __init__(self, prefix, n=4):
        super().__init__()
        self.prefix = prefix
        for i in range(n):
            self.add_module(f"{prefix}{i}", nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 8)}))


@pytest.mark.parametrize("prefix", ["layer_", "encoder_layer_"])
def test_blocks_named_with_a_trailing_index_form_one_graph(prefix):
    slora = StructLoRA(NamedBlocks(prefix), StructLoRAConfig(r=2, target_modules=("q_proj", "k_proj")))
    assert sorted(slora.graphs) == ["k_proj", "q_proj"]
    for g in slora.graphs.values():
        assert len(g.layers) == 4 and torch.equal(g.adj, torch.diag(torch.ones(3), 1) + torch.diag(torch.ones(3), -1))


def test_self_and_cross_attention_named_attn1_attn2_stay_apart():
    # diffusers' blocks: attn1 (self) and attn2 (cross) in every block: two roles, not one chain
    blocks = nn.ModuleList(nn.ModuleDict({"attn1": nn.ModuleDict({"to_q": nn.Linear(8, 8)}),
                                          "attn2": nn.ModuleDict({"to_q": nn.Linear(8, 8)})}) for _ in range(3))
    slora = StructLoRA(nn.ModuleDict({"blocks": blocks}), StructLoRAConfig(r=2, target_modules=("to_q",)))
    assert sorted(len(g.layers) for g in slora.graphs.values()) == [3, 3]


def test_a_graph_of_one_node_per_layer_warns():
    with pytest.warns(UserWarning, match="one node"):
        StructLoRA(NamedBlocks("block"), StructLoRAConfig(r=2, target_modules=("q_proj",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StructLoRA(NamedBlocks("block"), StructLoRAConfig(r=2, target_modules=("q_proj",), graph=False))  # IB-only: fine
        StructLoRA(NamedBlocks("layer_"), StructLoRAConfig(r=2, target_modules=("q_proj",)))


class TiedLM(nn.Module):
    """A language model whose output head shares its weight with the input embedding (as SmolLM2)."""

    def __init__(self, vocab=11, d=16):
        super().__init__()
        from toy import ToyBlock
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(3))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_head_tied_to_a_module_outside_modules_to_save_is_refused():
    model = TiedLM()
    with pytest.raises(ValueError, match="tied"):
        StructLoRA(model, StructLoRAConfig(r=2, modules_to_save=("head",)))
    assert all(p.requires_grad for p in model.parameters())  # untouched: a retry with both works
    StructLoRA(model, StructLoRAConfig(r=2, modules_to_save=("emb", "head")))


def test_tied_modules_to_save_train_save_and_export_as_the_trained_model(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TiedLM()
    slora = StructLoRA(copy.deepcopy(base), StructLoRAConfig(r=2, modules_to_save=("emb", "head"), semantic_every=0))
    opt = torch.optim.SGD(slora.trainable_parameters(), lr=0.5)
    for s in range(3):
        ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(s))
        F.cross_entropy(slora(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad()
        slora.step()
    slora.eval()
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        trained = slora(ids)
        assert rel_err(base(ids), trained) > 0.05  # the tied embedding and head did change
    slora.save_adapter(tmp_path / "a")
    slora.export_peft(tmp_path / "peft")
    loaded = StructLoRA.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(loaded(ids), trained) < 1e-6
        assert rel_err(ref(ids), trained) < 1e-5


# ----------------------------------------------------------------------------------------------
# Each test below fails on a plausible one-line bug (named in its comment), against a reference
# that shares no code with structlora.py.


def test_propagation_matrices_equal_their_formulas():
    # bug guarded: "sym" written as column normalisation (A+I)·D^-1
    adj = np.zeros((5, 5))
    for i, j in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 3), (1, 3)]:  # uneven degrees
        adj[i, j] = adj[j, i] = 1
    a = adj + np.eye(5)
    deg = a.sum(1)
    rw = a / deg[:, None]
    sym = np.diag(deg ** -0.5) @ a @ np.diag(deg ** -0.5)
    np.testing.assert_allclose(propagation_matrix(torch.tensor(adj), "rw").numpy(), rw, atol=1e-15)
    np.testing.assert_allclose(propagation_matrix(torch.tensor(adj), "sym").numpy(), sym, atol=1e-15)


def test_kl_warmup_ramps_linearly_to_one():
    # bug guarded: a warm-up that never reaches 1 (s/(s+W) instead of min(1, s/W))
    _, slora = make(kl_warmup_steps=4, kl_schedule="linear", ib_weighting="step", beta=0.3, prior=0.1)
    randomize_adapters(slora)
    phi = torch.stack([l.gate_logits for l in slora.lora_layers.values()]).detach().double()
    kl = torch.distributions.kl_divergence(torch.distributions.Bernoulli(logits=phi),
                                           torch.distributions.Bernoulli(probs=torch.tensor(0.1, dtype=torch.float64))).sum()
    for steps, warm in [(0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (7, 1.0)]:
        while slora.steps < steps:
            slora.step()
        assert slora.ib_loss().item() == pytest.approx(0.3 * warm * kl.item(), rel=1e-5, abs=1e-12), steps


def hand_merged(base, slora):
    """The base model with W0 + (α/r)·B·diag(q·[q ≥ prune_below])·A (each layer alone), in float64 numpy."""
    ref = copy.deepcopy(base).double().eval()
    with torch.no_grad():
        for name, l in slora.lora_layers.items():
            q = 1 / (1 + np.exp(-l.gate_logits.detach().double().numpy()))
            dW = l.scaling * l.lora_B.detach().double().numpy() @ np.diag(q * (q >= 0.5)) @ l.lora_A.detach().double().numpy()
            ref.get_submodule(name).weight += torch.from_numpy(dW)
    return ref


def test_ib_without_graph_evaluates_with_the_deterministic_gates():
    # bug guarded: graph=False (the "ib" row) evaluating with a training Concrete sample
    base, slora = make(graph=False)
    randomize_adapters(slora)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    slora.double().eval()
    with torch.no_grad():
        assert rel_err(slora(x), hand_merged(base, slora)(x)) < 1e-12


def test_merge_and_unload_in_train_mode_merges_the_deterministic_gates():
    # bug guarded: merge_and_unload() without switching to eval (it would merge one training sample)
    base, slora = make(graph=False)
    randomize_adapters(slora)
    ref = hand_merged(base, slora)
    merged = slora.double().train().merge_and_unload().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(merged(x), ref(x)) < 1e-12


def test_lora_dropout_equals_peft_in_training():
    # bug guarded: LoRA dropout never applied
    peft = pytest.importorskip("peft")
    base, slora = make(ib=False, graph=False, dropout=0.3)
    randomize_adapters(slora)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3))
    ref.load_state_dict({f"base_model.model.{n}.lora_{k}.default.weight": getattr(l, f"lora_{k}")
                         for n, l in slora.lora_layers.items() for k in "AB"}, strict=False)
    x = torch.randn(2, 7, 16)
    slora.train()
    ref.train()
    torch.manual_seed(3)
    ours = slora(x)
    torch.manual_seed(3)  # the same dropout masks: both draw them from the global RNG, layer by layer
    assert rel_err(ours, ref(x)) < 1e-6
    slora.eval()
    assert rel_err(ours, slora(x)) > 1e-3  # dropout did something


def test_adjacent_cosine_is_over_depth_neighbours_only():
    # bug guarded: the diagnostics' "adjacent cosine" averaged over the semantic edges too
    _, slora = make(semantic_every=0)
    randomize_adapters(slora)
    graph = slora.graphs["v_proj"]
    adj = graph.adj.clone()
    adj[0, 3] = adj[3, 0] = adj[1, 4] = adj[4, 1] = 1.0  # two semantic edges
    graph.set_edges(adj)
    slora.eval()
    d = slora.diagnostics()["v_proj"]
    layers = [l for n, l in slora.lora_layers.items() if n.endswith("v_proj")]
    before = []
    for l in layers:  # ΔW̃ with the deterministic gates, by hand
        q = 1 / (1 + np.exp(-l.gate_logits.detach().double().numpy()))
        before.append((l.scaling * l.lora_B.detach().double().numpy() @ np.diag(q * (q >= 0.5))
                       @ l.lora_A.detach().double().numpy()).ravel())
    with torch.no_grad():
        after = [l.delta_weight().double().flatten().numpy() for l in layers]
    for key, H in [("adjacent_cosine_before", before), ("adjacent_cosine_after", after)]:
        cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(H, H[1:])]
        assert d[key] == pytest.approx(np.mean(cos), rel=1e-5, abs=1e-7), key
