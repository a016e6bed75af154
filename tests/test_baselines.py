"""training/baselines.py: the head alone and peft's peers behind the training-script interface, end to
end in train_vit.py, against peft's own computations; the filter baselines' masks (mask_directions)
against float64 dense updates."""
import copy

import numpy as np
import pytest
import torch

import train_vit
from structlora import StructLoRA
from training.baselines import Baseline, mask_directions
from test_structlora import make
from test_train_vit import run, tiny  # noqa: F401  (the tiny checkpoint and image folder fixture)
from toy import ToyModel, randomize_adapters, rel_err

peft = pytest.importorskip("peft")


def test_head_trains_only_the_head(tiny, tmp_path):
    m = run(tiny, tmp_path, "--method", "head")
    assert m["open_directions"] == {} and m["merged_prediction_agreement"] == 1.0
    n_head = 32 * 2 * 3 + 3  # cls+mean features (2·dim) → 3 classes
    assert m["trainable_params"] == n_head


@pytest.mark.parametrize("method", ["peft-lora", "dora"])
def test_peers_train_and_merge(tiny, tmp_path, method):
    m = run(tiny, tmp_path, "--method", method, "--rank", "2")
    assert m["merged_prediction_agreement"] == 1.0
    assert list(m["open_directions"].values()) == [2] * 6  # q and v of 3 blocks
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_adalora_prunes_to_the_lora_budget(tiny, tmp_path):
    m = run(tiny, tmp_path, "--method", "adalora", "--rank", "2", "--epochs", "8")
    assert m["steps"] == 40
    assert sum(m["open_directions"].values()) == 2 * 6  # target_r·layers: LoRA's r = 2 budget, from init_r = 3


def test_adalora_at_a_budget_prunes_from_r_to_that_share(tiny, tmp_path):
    # study `budgets`: AdaLoRA starts where StructLoRA does (r = 4) and keeps round(0.5·4) = 2 per layer on average
    m = run(tiny, tmp_path, "--method", "adalora", "--rank", "4", "--budget", "0.5", "--epochs", "8")
    assert sum(m["open_directions"].values()) == 2 * 6


def test_budget_is_refused_where_every_direction_stays():
    for method in ("head", "peft-lora", "dora"):
        with pytest.raises(ValueError, match="budget"):
            Baseline(ToyModel(), method, 4, 8, ["q_proj", "v_proj"], ["head"], total_steps=20, budget=0.5)


def test_adalora_aux_loss_is_peft_orthogonality_penalty():
    """peft adds the penalty in its forward when the output carries a .loss; ours, whose logits do not,
    must get the same number from aux_loss()."""
    torch.manual_seed(0)
    base = Baseline(ToyModel(), "adalora", 4, 8, ["q_proj", "v_proj"], ["head"], total_steps=20)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_" in n:
                p.normal_()

    class WithLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            class Out:
                loss = torch.zeros(())
            self.inner(x)
            return Out()
    inner = base.model.base_model.model
    base.model.base_model.model = WithLoss(inner)
    ref = base.model.base_model(torch.randn(2, 3, 16)).loss
    assert torch.allclose(base.aux_loss(), ref, rtol=1e-6)


def test_adalora_resume_is_refused(tiny, tmp_path):
    from test_checkpoint import run as run_ckpt
    run_ckpt(tiny, tmp_path / "a", "--method", "adalora")
    with pytest.raises(ValueError, match="resuming AdaLoRA is not supported"):
        run_ckpt(tiny, tmp_path / "a", "--method", "adalora", "--resume", str(tmp_path / "a"))


@pytest.mark.parametrize("rule", ["norm", "random"])
def test_mask_directions_keeps_k_directions_and_merges_them(rule):
    base, slora = make(ib=False, graph=False)
    randomize_adapters(slora)
    keep = {n: i % 5 for i, n in enumerate(slora.lora_layers)}  # 0..4 of r = 4
    mask_directions(slora, keep, rule, torch.Generator().manual_seed(0))
    assert slora.open_directions() == keep
    x = torch.randn(2, 7, 16)
    out = slora.eval()(x)
    for name, layer in slora.lora_layers.items():
        B, A = layer.lora_B.detach().double().numpy(), layer.lora_A.detach().double().numpy()
        kept = np.flatnonzero(layer.mask.numpy())
        assert len(kept) == keep[name]
        if rule == "norm":  # the kept rank-one updates b_j a_jᵀ have the largest Frobenius norms
            norms = [np.linalg.norm(np.outer(B[:, j], A[j])) for j in range(layer.r)]
            assert sorted(kept) == sorted(np.argsort(norms)[::-1][:keep[name]])
        dense = sum((np.outer(B[:, j], A[j]) for j in kept), np.zeros((B.shape[0], A.shape[1]))) * layer.scaling
        assert rel_err(layer.delta_weight(), torch.from_numpy(dense)) < 1e-6 or not len(kept)
    merged = slora.merge_and_unload()
    assert rel_err(merged(x), out) < 1e-5


def test_mask_directions_survives_save_and_load(tmp_path):
    base, slora = make(ib=False, graph=True)
    randomize_adapters(slora)
    mask_directions(slora, {n: 2 for n in slora.lora_layers}, "random", torch.Generator().manual_seed(1))
    slora.save_adapter(tmp_path / "a")
    again = StructLoRA.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    x = torch.randn(2, 7, 16)
    assert rel_err(again.eval()(x), slora.eval()(x)) < 1e-6 and again.open_directions() == slora.open_directions()


def test_mask_directions_rejects_bad_input():
    _, slora = make(ib=True)
    with pytest.raises(ValueError, match="ib=False"):
        mask_directions(slora, {n: 1 for n in slora.lora_layers}, "norm")
    _, slora = make(ib=False)
    with pytest.raises(ValueError, match="rule"):
        mask_directions(slora, {n: 1 for n in slora.lora_layers}, "magnitude")
    with pytest.raises(ValueError, match="missing"):
        mask_directions(slora, {"blocks.0.q_proj": 1}, "norm")
    with pytest.raises(ValueError, match="outside"):
        mask_directions(slora, {n: 5 for n in slora.lora_layers}, "norm")
