"""The patterns real training uses: activation checkpointing (both kinds), several forwards before one
backward, gradient accumulation, eval right after train, inner modules called directly, resume, and
what the wrapper does after merge_and_unload()."""
import copy

import pytest
import torch
import torch.nn as nn

from structlora import LoRALinear, StructLoRA, StructLoRAConfig
from toy import ToyModel, make_toy, randomize_adapters, rel_err, train_steps
from training.baselines import mask_directions


def make(checkpointing=None, **cfg):
    torch.manual_seed(0)
    base = ToyModel(checkpointing=checkpointing)
    slora = StructLoRA(base, StructLoRAConfig(**{"r": 4, "alpha": 8, "num_train_examples": 64, "semantic_every": 0, **cfg})).double()
    randomize_adapters(slora)
    graph = slora.graphs["q_proj"]
    adj = graph.adj.clone()
    adj[0, 3] = adj[3, 0] = 1.0  # a semantic edge, so layers mix non-neighbours' gates too
    graph.set_edges(adj)
    return slora


def loss_of(slora, x, seed):
    torch.manual_seed(seed)  # gate noise and dropout come from the global RNG
    return slora(x).square().mean()


def grads(slora):
    return torch.cat([p.grad.flatten() for p in slora.trainable_parameters()])


@pytest.mark.parametrize("coordinator", ["smooth", "gcn"])
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
def test_two_forwards_one_backward_equals_separate_runs(checkpointing, coordinator):
    slora = make(checkpointing, coordinator=coordinator, graph_layers=2, dropout=0.1).train()
    x1, x2 = (torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))  # reentrant needs it
    (loss_of(slora, x1, 1) + loss_of(slora, x2, 2)).backward()  # DPO / R-Drop / summed micro-batches
    together = grads(slora)
    slora.zero_grad()
    loss_of(slora, x1, 1).backward()
    g1 = grads(slora)
    loss_of(slora, x2, 2).backward()  # gradient accumulation: .grad sums
    accumulated = grads(slora)
    slora.zero_grad()
    loss_of(slora, x2, 2).backward()
    g2 = grads(slora)
    assert rel_err(together, g1 + g2) < 1e-10 and rel_err(accumulated, g1 + g2) < 1e-10
    plain = make(None, coordinator=coordinator, graph_layers=2, dropout=0.1).train()  # no recomputation at all
    (loss_of(plain, x1, 1) + loss_of(plain, x2, 2)).backward()
    assert rel_err(together, grads(plain)) < 1e-10


def merged_copy(slora):
    return copy.deepcopy(slora).merge_and_unload().eval()


def test_eval_after_training_forward_and_step_uses_deterministic_gates():
    slora = make().train()
    opt = torch.optim.SGD(slora.trainable_parameters(), lr=0.1)
    loss_of(slora, torch.randn(3, 5, 16, dtype=torch.float64), 0).backward()
    opt.step()  # parameters change after the training forward
    slora(torch.randn(3, 5, 16, dtype=torch.float64))  # and one more training forward
    slora.eval()
    ref = merged_copy(slora)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(slora.model.blocks[1](x), ref.blocks[1](x)) < 1e-12  # an inner block, called directly
        for name, layer in slora.lora_layers.items():
            dW = ref.get_submodule(name).weight - layer.base.weight
            assert rel_err(layer.delta_weight(), dW) < 1e-12


def test_inner_block_gets_gradients_after_a_no_grad_forward():
    slora = make().train()
    with torch.no_grad():
        slora(torch.randn(2, 5, 16, dtype=torch.float64))
    slora.model.blocks[0](torch.randn(2, 5, 16, dtype=torch.float64)).square().sum().backward()
    layer = slora.lora_layers["blocks.0.q_proj"]
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.gate_logits.grad is not None


def test_merged_wrapper_refuses_every_call(tmp_path):
    slora = make(modules_to_save=("head",))
    model = slora.merge_and_unload()
    calls = [lambda: slora(torch.randn(2, 5, 16, dtype=torch.float64)), slora.ib_loss, slora.aux_loss,
             slora.reg_loss, slora.step, slora.trainable_parameters, slora.control_parameters,
             lambda: slora.param_groups(1e-3, 1e-2, 0.0), slora.open_directions, slora.diagnostics,
             slora.merge_and_unload, slora.adapter_state, lambda: slora.save_adapter(tmp_path / "a"),
             lambda: slora.load_adapter(tmp_path / "a"), lambda: slora.export_peft(tmp_path / "p"),
             lambda: mask_directions(slora, {}, "norm")]
    for call in calls:
        with pytest.raises(RuntimeError, match="use the model it returned"):
            call()
    assert list(slora.parameters()) == [] and not (tmp_path / "a").exists() and not (tmp_path / "p").exists()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("bad", [dict(modules_to_save=("blocks",)), dict(modules_to_save=("classifier",)),
                                 dict(modules_to_save=("blocks.0.q_proj",)), dict(target_modules=("norm",))])
def test_a_rejected_config_leaves_the_model_untouched(bad):
    model = ToyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError)):
        StructLoRA(model, StructLoRAConfig(**bad))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    StructLoRA(model, StructLoRAConfig(modules_to_save=("head",)))  # a retry with a good config works


def train(slora, steps, first):
    opt = torch.optim.SGD(slora.trainable_parameters(), lr=0.05)  # stateless: the adapter is all there is
    for s in range(first, first + steps):
        torch.manual_seed(s)
        x = torch.randn(4, 5, 16, dtype=torch.float64)
        (slora(x).square().mean() + slora.aux_loss()).backward()
        opt.step()
        slora.step()
        opt.zero_grad()


def resumed_from(half, via, tmp_path):
    """A fresh wrapper continuing `half`: from its saved adapter folder, or (what Lightning, accelerate and
    HF Trainer checkpoint) from the module's state_dict."""
    if via == "adapter":
        half.save_adapter(tmp_path / "a")
        torch.manual_seed(0)
        fresh = ToyModel()  # the same frozen weights as make()'s, no adapter
        resumed = StructLoRA(fresh, StructLoRAConfig(**half.cfg.__dict__)).double().train()
        resumed.load_adapter(tmp_path / "a")
        return resumed
    torch.save(half.state_dict(), tmp_path / "sd.pt")
    resumed = make(**{k: getattr(half.cfg, k) for k in ("semantic_every", "semantic_threshold", "kl_warmup_steps")})
    resumed.train().load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    return resumed


@pytest.mark.parametrize("via", ["adapter", "state_dict"])
@pytest.mark.parametrize("split", [3, 4])  # after a rebuild / while the sketches are armed
def test_resume_is_exact(tmp_path, split, via):
    cfg = dict(semantic_every=2, semantic_threshold=-1.0, kl_warmup_steps=4)
    full = make(**cfg).train()
    train(full, 7, 0)
    half = make(**cfg).train()
    train(half, split, 0)
    resumed = resumed_from(half, via, tmp_path)
    assert resumed.steps == split
    train(resumed, 7 - split, split)
    a, meta = full.adapter_state()
    b, meta_b = resumed.adapter_state()
    assert meta == meta_b and set(a) == set(b) and any(k.endswith("sketch_ema") for k in a)
    assert all(rel_err(b[k], a[k]) < 1e-12 or torch.equal(a[k], b[k]) for k in a)


def test_load_adapter_resets_stale_training_state(tmp_path):
    cfg = dict(semantic_every=2, semantic_threshold=-1.0)
    saved = make(**cfg).train()
    train(saved, 1, 0)  # step 1: no sketches yet, not armed
    saved.save_adapter(tmp_path / "a")
    trained = make(**cfg).train()
    train(trained, 4, 10)  # has a sketch EMA and armed sketches
    assert all(g.sketch_ema is not None for g in trained.graphs.values())
    assert any(l.sketch_P is not None for l in trained.lora_layers.values())
    trained.load_adapter(tmp_path / "a")
    assert trained.steps == 1 and all(g.sketch_ema is None for g in trained.graphs.values())
    assert all(l.sketch_P is None and l.sketch is None for l in trained.lora_layers.values())


def test_config_gaps_are_refused():
    for bad in (dict(eta_max=1.5), dict(eta_max=0.0), dict(prune_below=1.2), dict(prune_below=0.0),
                dict(gate_init=0.3), dict(graph_layers=0), dict(coordinator="gat"), dict(edges="knn"),
                dict(reg="l2"), dict(gcn_activation="relu")):
        with pytest.raises(ValueError):
            StructLoRAConfig(**bad)
    StructLoRAConfig(gate_init=0.3, ib=False)  # without the gate, gate_init is unused


def test_semantic_topk_is_at_most_k_neighbours_per_layer():
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(n_layers=6), StructLoRAConfig(r=4, semantic_every=1, semantic_topk=1,
                                                               semantic_threshold=0.5))
    graph = slora.graphs["q_proj"]
    slora.step()  # arms the sketches
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, 16, generator=g)
    for i, layer in enumerate(graph.layers):  # layer 0 aligns with 2, 3 and 4 alike
        layer.sketch = shared + 0.01 * i * torch.randn(16, 16, generator=g) if i in (0, 2, 3, 4) else \
            torch.randn(16, 16, generator=g)
    slora.step()
    semantic = graph.adj - graph.chain
    assert semantic.sum() > 0 and semantic.sum(1).max() <= 1
    assert (graph.chain <= graph.adj).all()


def test_chain_joins_depth_neighbours_only():
    class Mixed(nn.Module):  # q_proj of layers 2 and 3 have another shape than those of 0, 1, 4
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(16, 8 if i in (2, 3) else 16)})
                                        for i in range(5))
    slora = StructLoRA(Mixed(), StructLoRAConfig(r=2, target_modules=("q_proj",)))
    wide, narrow = slora.graphs["q_proj_16x16"], slora.graphs["q_proj_8x16"]
    assert wide.adj.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]  # 0–1, and 1–4 is no depth neighbour
    assert narrow.adj.tolist() == [[0, 1], [1, 0]]


def test_a_shared_linear_is_refused():
    model = ToyModel()
    model.blocks[1].q_proj = model.blocks[0].q_proj
    with pytest.raises(ValueError, match="several paths"):
        StructLoRA(model, StructLoRAConfig())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_readme_snippet_trains_gates_and_coordinator_and_merges(tmp_path, monkeypatch):
    from pathlib import Path
    import re
    import torch.nn.functional as F
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme.split("## Use it on your own model", 1)[1], re.S).group(1)
    torch.manual_seed(0)
    model = ToyModel()
    data = [(torch.randn(8, 5, 16), torch.randint(0, 3, (8,))) for _ in range(40)]
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "data": data, "torch": torch, "F": F}
    exec(code, scope)
    assert not any(isinstance(m, LoRALinear) for m in scope["model"].modules())
    assert scope["cfg"].kl_warmup_steps == 4 and scope["cfg"].num_train_examples == 320
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    control = scope["opt"].param_groups[1]  # φ of 10 layers and ψ of 2 graphs at the control lr, no decay
    assert (control["lr"], control["weight_decay"], len(control["params"])) == (1e-2, 0.0, 12)
    assert sorted(p.numel() for p in control["params"]) == [1, 1] + [8] * 10


@pytest.mark.parametrize("coordinator,T", [("smooth", 1), ("smooth", 3), ("gcn", 2)])
def test_no_grad_eval_call_equals_layer_by_layer_and_keeps_nothing(coordinator, T):
    slora = make(coordinator=coordinator, graph_layers=T).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    by_layer = slora(x)  # grad enabled: every layer computes its own factors
    with torch.no_grad():
        once = slora(x)  # the whole graph's factors once for this call
        with pytest.raises(RuntimeError):
            slora(torch.randn(2, 5, 7, dtype=torch.float64))  # a failing call clears them too
    assert rel_err(once, by_layer) < 1e-12
    assert all(l.precomputed is None for l in slora.lora_layers.values())


def test_bf16_autocast_training_survives_armed_sketches():
    slora, ref = make_toy(semantic_every=1, semantic_threshold=-1.0), make_toy(semantic_every=1, semantic_threshold=-1.0)
    train_steps(slora, 3, autocast=True)  # step 1 arms, step 2's backward fills the sketches under autocast
    train_steps(ref, 3)
    for key, g in slora.graphs.items():
        assert torch.cosine_similarity(g.sketch_ema.flatten(), ref.graphs[key].sketch_ema.flatten(), 0) > 0.99


def test_export_peft_in_the_middle_of_training_keeps_training_exactly(tmp_path):
    # A per-epoch export must not switch the run to eval gates and no dropout
    slora, ref = make(dropout=0.1).train(), make(dropout=0.1).train()
    slora.model.blocks[2].eval()  # a part the user keeps in eval mode stays so
    ref.model.blocks[2].eval()
    modes = {n: m.training for n, m in slora.named_modules()}
    slora.export_peft(tmp_path / "peft")
    assert {n: m.training for n, m in slora.named_modules()} == modes
    train(slora, 3, 0)
    train(ref, 3, 0)  # the same steps without the export
    for (n, p), q in zip(slora.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_a_failed_from_pretrained_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file
    slora = make(modules_to_save=("head",))
    slora.save_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors.pop("blocks.0.q_proj.lora_A")  # a mismatched (or half-copied) adapter folder
    save_file(tensors, weights)
    model = ToyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        StructLoRA.from_pretrained(model, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    slora.save_adapter(tmp_path / "b")
    StructLoRA.from_pretrained(model, tmp_path / "b")  # a retry on the same model works


def test_a_prior_at_or_above_prune_below_is_refused():
    # π0 < prune_below: a direction the task does not hold open must drift below the cut
    for prior in (0.5, 0.7):
        with pytest.raises(ValueError, match="prior"):
            StructLoRAConfig(prior=prior, prune_below=0.5)
    StructLoRAConfig(prior=0.7, prune_below=0.5, ib=False)  # without the gate, π0 is unused
    StructLoRAConfig(prior=0.49, prune_below=0.5)
