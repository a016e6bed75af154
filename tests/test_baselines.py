"""baselines.py: the head alone and peft's peers behind the training-script interface, end to end in
train_vit.py, against peft's own computations."""
import pytest
import torch

import train_vit
from training.baselines import Baseline
from test_train_vit import run, tiny  # noqa: F401  (the tiny checkpoint and image folder fixture)
from toy import ToyModel

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
