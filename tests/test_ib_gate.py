"""The IB gate's penalty (§2, §4): weighted per training example (the ELBO reading), held off while the
warm-up lets B grow, so that more data never closes more of the directions a task needs."""
import copy

import pytest
import torch
from torch.distributions import Bernoulli, kl_divergence

from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel


def planted_task(n, seed=0):
    """A student, and n inputs with a teacher's outputs: every block's v_proj needs a rank-4 change whose
    four directions all carry signal (singular values 3, 2.4, 1.8, 1.5)."""
    torch.manual_seed(seed)
    student = ToyModel(d=16, n_layers=3)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for block in teacher.blocks:
            U, _, V = torch.linalg.svd(torch.randn(16, 16))
            block.v_proj.weight += U[:, :4] @ torch.diag(torch.tensor([3.0, 2.4, 1.8, 1.5])) @ V[:4]
        x = torch.randn(n, 6, 16)
        y = teacher(x)
    return student, x, y


def setup(n, epochs=3, batch=16, **cfg):
    """The IB gate alone (r = 4 per layer) on planted_task(n), at the scripts' defaults (KL warm-up 10% of the
    steps, lr decaying to 0, the control lr for φ): the wrapper, its optimizer and schedule, and the batches."""
    student, x, y = planted_task(n)
    steps = epochs * n // batch
    config = StructLoRAConfig(r=4, alpha=8, target_modules=("v_proj",), graph=False, num_train_examples=n,
                              kl_warmup_steps=steps // 10, **cfg)
    slora = StructLoRA(student, config)
    opt = torch.optim.AdamW(slora.param_groups(lr=1e-2, control_lr=5e-2, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    g = torch.Generator().manual_seed(1)
    batches = [perm[i:i + batch] for _ in range(epochs) for perm in [torch.randperm(n, generator=g)]
               for i in range(0, n, batch)]
    return slora, opt, sched, (x, y), batches


def train(slora, opt, sched, data, batches):
    x, y = data
    for idx in batches:
        loss = (slora(x[idx]) - y[idx]).square().mean() + slora.aux_loss()
        loss.backward()
        opt.step()
        sched.step()
        slora.step()
        opt.zero_grad(set_to_none=True)


def train_open_directions(n, epochs=3, batch=16, **cfg):
    """Trains the gates over `epochs` passes of n examples; the directions left open (of 12)."""
    slora, opt, sched, data, batches = setup(n, epochs, batch, **cfg)
    train(slora, opt, sched, data, batches)
    return sum(slora.open_directions().values())


def test_ten_times_the_data_closes_no_direction_the_task_needs():
    # Study v2 part 3: with β·KL added once per step, 1 875 steps over 60 000 images closed 180 of 192
    # directions. Here: the same epochs over 512 and 5 120 examples (96 and 960 steps). Per step, as in
    # study v1 (β = 1e-3, linear warm-up), the long run keeps 3 of 12.
    assert train_open_directions(512) == 12
    assert train_open_directions(5120) == 12


def kl_sum(slora, prior):
    phi = torch.cat([l.gate_logits.detach().double() for l in slora.lora_layers.values()])
    return kl_divergence(Bernoulli(logits=phi), Bernoulli(probs=torch.tensor(prior, dtype=torch.float64))).sum()


@pytest.mark.parametrize("weighting,schedule", [("example", "hold"), ("example", "linear"), ("step", "hold")])
def test_ib_loss_is_beta_kl_over_n_after_the_warmup(weighting, schedule):
    cfg = StructLoRAConfig(r=4, alpha=8, beta=0.7, prior=0.3, num_train_examples=250, ib_weighting=weighting,
                           kl_schedule=schedule, kl_warmup_steps=4, semantic_every=0)
    slora = StructLoRA(ToyModel(), cfg)
    with torch.no_grad():
        for layer in slora.lora_layers.values():
            layer.gate_logits.copy_(torch.randn(4) * 2)
    full = 0.7 * kl_sum(slora, 0.3) / (250 if weighting == "example" else 1)
    for step in range(6):
        warm = 1.0 if step >= 4 else (step / 4 if schedule == "linear" else 0.0)
        assert slora.ib_loss().item() == pytest.approx(warm * full.item(), rel=1e-6, abs=1e-12)
        slora.step()


def test_per_example_weighting_needs_the_training_set_size():
    slora = StructLoRA(ToyModel(), StructLoRAConfig(r=4, semantic_every=0))
    with pytest.raises(ValueError, match="num_train_examples"):
        slora.aux_loss()
    plain = StructLoRA(ToyModel(), StructLoRAConfig(r=4, ib=False, semantic_every=0))
    assert plain.aux_loss().item() == 0.0  # no gate, nothing to weigh
    for bad in (dict(num_train_examples=-1), dict(ib_weighting="epoch"), dict(kl_schedule="cosine")):
        with pytest.raises(ValueError):
            StructLoRAConfig(**bad)


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_budget_holds_the_share_of_open_directions_at_any_run_length(budget):
    # Every direction carries signal, so only the budget closes any. The same 3 epochs over 1 024 and 10 240
    # examples (192 and 1 920 steps): the share open at eval (σ(φ) ≥ prune_below) is the budget's, ± 1 of 12.
    # A multiplier on the mean of σ(φ) moved all gates together: 0 of 12 open at budget 0.5.
    for n in (1024, 10240):
        assert abs(train_open_directions(n, budget=budget) - 12 * budget) <= 1, n


@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_budget_holds_the_closed_gates_a_margin_below_the_cut(margin):
    # The gates the budget closes end about δ below logit(p) = 0 (a gate at φ is sampled open in σ(φ) of the
    # training steps and cut at eval: δ = 0.5 leaves a closed direction on in ~26% of the steps, δ = 2 in ~12%),
    # and the open ones δ above it
    slora, opt, sched, data, batches = setup(1024, budget=0.5, budget_margin=margin)
    train(slora, opt, sched, data, batches)
    phi = torch.stack([l.gate_logits for l in slora.lora_layers.values()]).flatten().sort().values
    closed, kept = phi[:6], phi[6:]
    assert closed.max() <= -margin + 0.1 and closed.max() >= -margin - 0.5, closed
    assert kept.min() >= margin - 0.1, kept


def budget_reference(phi, k, cut, margin, lam):
    """The budget's Lagrangian and the next λ by hand, in float64: φ ranked high to low, the k first held
    above cut + δ, the rest below cut − δ; c is the worst violation on each side."""
    ranked = sorted(phi, reverse=True)
    too_open = sum(max(0.0, v - (cut - margin)) for v in ranked[k:])
    too_closed = sum(max(0.0, (cut + margin) - v) for v in ranked[:k])
    c = (ranked[k] - (cut - margin), (cut + margin) - ranked[k - 1])
    return lam[0] * too_open + lam[1] * too_closed, [max(0.0, l + 0.1 * ci) for l, ci in zip(lam, c)]


@pytest.mark.parametrize("prune_below,margin", [(0.5, 4.0), (0.5, 0.5), (0.8, 2.0), (0.3, 1.0)])
def test_budget_loss_and_multiplier_step_match_a_hand_computation(prune_below, margin):
    # review-margin: no test read budget_loss or the dual step directly; holding k + 1 gates open, the wrong
    # rank in the ascent, or δ ignored on the open side passed every budget test
    import math
    slora = StructLoRA(ToyModel(n_layers=3), StructLoRAConfig(
        r=4, target_modules=("v_proj",), graph=False, budget=0.5, budget_margin=margin, prune_below=prune_below,
        gate_init=0.95, prior=0.1, num_train_examples=8, kl_warmup_steps=2))
    cut = math.log(prune_below / (1 - prune_below))
    values = [cut + 0.3, cut - 0.2, cut + margin + 1, cut - margin - 1, cut, cut,  # ties on the cut and off it
              cut + 0.3, cut - 3.1, cut + 2.2, cut - 0.2, cut + 0.9, cut - margin + 0.4]
    with torch.no_grad():
        for i, layer in enumerate(slora.lora_layers.values()):
            layer.gate_logits.copy_(torch.tensor(values[4 * i:4 * i + 4]))
    phi64 = [float(v) for l in slora.lora_layers.values() for v in l.gate_logits.detach()]  # as float32 holds them
    lam = [1.3, 0.7]
    slora.budget_lambda.copy_(torch.tensor(lam))
    phi = torch.stack([l.gate_logits for l in slora.lora_layers.values()])
    slora.step()  # step 1 < kl_warmup_steps: neither the loss nor λ moves
    assert slora.budget_loss(phi).item() == 0.0 and slora.budget_lambda.tolist() == pytest.approx(lam)
    slora.step()  # step 2: the loss is on; λ takes its first step after it
    loss, lam_next = budget_reference(phi64, 6, cut, margin, lam)
    got = slora.budget_loss(phi)
    assert got.item() == pytest.approx(loss, rel=1e-6)
    grad, = torch.autograd.grad(got, phi)  # ∂/∂φ_i: λ_close on a too-open gate ranked below k, −λ_open above
    ranked = sorted(range(12), key=lambda i: -phi64[i])
    expected = [0.0] * 12
    for pos, i in enumerate(ranked):
        if pos >= 6 and phi64[i] > cut - margin:
            expected[i] = lam[0]
        elif pos < 6 and phi64[i] < cut + margin:
            expected[i] = -lam[1]
    for v in set(phi64):  # gates tied in φ (the two on the cut straddle rank k) may take either rank
        tied = [i for i in range(12) if phi64[i] == v]
        assert sorted(grad.flatten()[tied].tolist()) == pytest.approx(sorted(expected[i] for i in tied)), v
    slora.step()
    assert slora.budget_lambda.tolist() == pytest.approx(lam_next, rel=1e-6)


def test_budget_multiplier_survives_save_and_load(tmp_path):
    # A run saved halfway and resumed into a fresh model (adapter, optimizer and schedule states, RNG) ends
    # exactly where the uninterrupted run ends: λ is part of the adapter's training state.
    slora, opt, sched, data, batches = setup(256, budget=0.5)
    train(slora, opt, sched, data, batches)
    half = len(batches) // 2
    first, opt1, sched1, _, _ = setup(256, budget=0.5)
    train(first, opt1, sched1, data, batches[:half])
    assert first.budget_lambda.sum() > 0  # the multiplier has moved by then, or this would prove nothing
    first.save_adapter(tmp_path)
    rng = torch.get_rng_state()
    second, opt2, sched2, _, _ = setup(256, budget=0.5)
    second.load_adapter(tmp_path)
    opt2.load_state_dict(opt1.state_dict())
    sched2.load_state_dict(sched1.state_dict())
    torch.set_rng_state(rng)
    train(second, opt2, sched2, data, batches[half:])
    assert torch.equal(second.budget_lambda, slora.budget_lambda)
    for name, layer in slora.lora_layers.items():
        assert torch.equal(second.lora_layers[name].gate_logits, layer.gate_logits), name


def test_an_adapter_saved_before_the_margin_was_a_field_keeps_its_margin(tmp_path):
    # review-margin: budget mode held its gates a constant 0.5 from the cut before budget_margin existed; such a
    # save has no budget_margin, took today's default (4) and resumed training with another δ, silently
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    cfg = dict(r=4, target_modules=("v_proj",), graph=False, budget=0.5, num_train_examples=8)
    StructLoRA(ToyModel(n_layers=2), StructLoRAConfig(**cfg, budget_margin=0.5)).save_adapter(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    del meta["config"]["budget_margin"]  # as written before the field existed
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"structlora": json.dumps(meta)})
    assert StructLoRA.from_pretrained(ToyModel(n_layers=2), tmp_path).cfg.budget_margin == 0.5
    StructLoRA(ToyModel(n_layers=2), StructLoRAConfig(**cfg, budget_margin=0.5)).load_adapter(tmp_path)
    with pytest.raises(ValueError, match="budget_margin"):  # not into a wrapper at another δ
        StructLoRA(ToyModel(n_layers=2), StructLoRAConfig(**cfg)).load_adapter(tmp_path)
    plain = dict(cfg, budget=0.0)  # without a budget δ plays no part: such a save loads at today's default
    StructLoRA(ToyModel(n_layers=2), StructLoRAConfig(**plain)).save_adapter(tmp_path / "plain")
    meta = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert StructLoRAConfig(**{k: v for k, v in meta["config"].items() if k != "budget_margin"}) == \
        StructLoRA.from_pretrained(ToyModel(n_layers=2), tmp_path / "plain").cfg


def test_budget_needs_the_ib_gate():
    with pytest.raises(ValueError, match="ib=True"):
        StructLoRAConfig(ib=False, budget=0.5)
    for bad in (dict(budget=-0.1), dict(budget=1.0), dict(budget=0.5, budget_lr=0)):
        with pytest.raises(ValueError):
            StructLoRAConfig(**bad)


def test_budget_that_keeps_no_direction_is_refused():
    # review20: round(budget·n) = 0 was accepted and then closed every direction (ΔW = 0 at eval), where the
    # AdaLoRA peer refuses the same budget (target_r = round(budget·r) < 1)
    for budget in (0.1, 0.125):  # round(0.4), round(0.5) (banker's rounding) of r = 4
        with pytest.raises(ValueError, match="keeps no direction"):
            StructLoRA(ToyModel(n_layers=1), StructLoRAConfig(r=4, target_modules=("v_proj",), graph=False,
                                                              budget=budget, num_train_examples=8))


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.9])
def test_budget_keeps_as_many_directions_as_the_adalora_peer(budget):
    # review20: StructLoRA kept round(b·L·r) of its L·r gates, AdaLoRA round(b·r)·L (peft: target_r × layers)
    from training.baselines import peft_config
    pytest.importorskip("peft")
    slora = StructLoRA(ToyModel(n_layers=6), StructLoRAConfig(r=8, alpha=16, budget=budget, num_train_examples=8))
    phi = torch.stack([l.gate_logits for l in slora.lora_layers.values()])
    target_r = peft_config("adalora", 8, 16, ["q_proj", "v_proj"], [], 100, budget).target_r
    assert slora._budget_ranks(phi)[1] == target_r * len(slora.lora_layers)


def test_a_margin_that_overflows_float32_is_refused():
    # review-margin: budget_margin=1e30 was accepted ("finite and > 0"); λ grows by budget_lr·δ a step and the
    # violation is ~δ, so λ·violation overflowed: the loss was inf from the first budget step, Adam's second
    # moment inf, no gate moved (12 of 12 open at budget 0.5 on the toy); at 1e38 every φ became NaN
    for margin in (1e30, 1e38, 50.5):
        with pytest.raises(ValueError, match="budget_margin"):
            StructLoRAConfig(budget=0.5, budget_margin=margin)
    for margin in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget_margin"):
            StructLoRAConfig(budget=0.5, budget_margin=margin)
    StructLoRAConfig(budget=0.5, budget_margin=50.0)


def test_non_finite_weights_are_refused():
    for bad in (dict(beta=float("nan")), dict(beta=float("inf")), dict(budget=0.5, budget_lr=float("nan")),
                dict(budget=0.5, budget_lr=float("inf"))):
        with pytest.raises(ValueError):
            StructLoRAConfig(**bad)


def test_budget_multiplier_is_state_only_in_budget_mode():
    # review20: budget_lambda was a persistent buffer of every wrapper, so a state_dict saved before budget mode
    # existed (Lightning, accelerate, the HF Trainer) no longer loaded: "Missing key(s): budget_lambda"
    plain = StructLoRA(ToyModel(), StructLoRAConfig(r=4, num_train_examples=8))
    assert "budget_lambda" not in plain.state_dict()
    budgeted = StructLoRA(ToyModel(), StructLoRAConfig(r=4, num_train_examples=8, budget=0.5))
    assert "budget_lambda" in budgeted.state_dict()


def test_a_budget_not_reached_is_reported():
    # review20: a run too short for the gates to travel (48 steps here) ended with 12 of 12 open at budget 0.25,
    # silently, while the README said the budget holds "whatever the run length"
    slora, opt, sched, data, batches = setup(256, budget=0.25)
    train(slora, opt, sched, data, batches)
    with pytest.warns(UserWarning, match="budget 0.25 keeps 3 of 12 directions open, but 12 are"):
        slora.open_directions()
    with torch.no_grad():  # and a run that closed too many
        for layer in slora.lora_layers.values():
            layer.gate_logits.fill_(-1.0)
        next(iter(slora.lora_layers.values())).gate_logits[0] = 1.0
    with pytest.warns(UserWarning, match="budget 0.25 keeps 3 of 12 directions open, but 1 are"):
        slora.open_directions()


def test_budget_multiplier_stays_float32_when_the_wrapper_is_cast():
    # review20: slora.to(torch.bfloat16) made λ bf16, and its dual ascent stalled at 128 (bf16's spacing there is 1)
    slora = StructLoRA(ToyModel(n_layers=2), StructLoRAConfig(r=4, target_modules=("v_proj",), graph=False,
                                                              budget=0.5, num_train_examples=8)).to(torch.bfloat16)
    assert slora.budget_lambda.dtype == torch.float32
    for _ in range(2000):
        slora._budget_ascent()
    assert slora.budget_lambda[0].item() > 500


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_budget_multiplier_keeps_its_value_when_the_wrapper_is_cast(dtype):
    # review-margin: the cast rounded λ before _apply made it float32 again (bf16: 123.456 → 123.5; fp16: λ above
    # 65504 → inf, and the budget's loss inf from then on). A cast mid-run must leave λ as it was, to the bit
    slora = StructLoRA(ToyModel(n_layers=2), StructLoRAConfig(r=4, target_modules=("v_proj",), graph=False,
                                                              budget=0.5, num_train_examples=8))
    lam = torch.tensor([123.456, 70000.1], dtype=torch.float32)
    slora.budget_lambda.copy_(lam)
    slora.to(dtype)
    assert slora.budget_lambda.dtype == torch.float32 and torch.equal(slora.budget_lambda, lam)
    slora.float()
    assert torch.equal(slora.budget_lambda, lam)
