"""groundtruth.py: the planted ΔW* is what the teacher applies (a float64 least-squares fit on the teacher's
own layer inputs and outputs), it has the promised structure, and the metrics match scipy/numpy."""
import copy

import numpy as np
import pytest
import torch

from experiments import groundtruth as gt
from structlora import StructLoRA, StructLoRAConfig

TINY = gt.GroundTruthConfig(dim=6, depth=12, planted_rank=2, n_train=300, n_test=4)


@pytest.mark.parametrize("structure", gt.STRUCTURES)
def test_least_squares_recovers_planted_update(structure):
    base, teacher, planted, (x, _), _ = gt.make_task(TINY, structure, seed=1, dtype=torch.float64)
    seen = {}
    hooks = [teacher.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n in planted]
    teacher(x)
    for h in hooks:
        h.remove()
    for name, dw in planted.items():
        inp, out = (t.numpy() for t in seen[name])
        design = np.hstack([inp, np.ones((len(inp), 1))])                 # y = [x, 1]·[Wᵀ; bᵀ]
        sol = np.linalg.lstsq(design, out, rcond=None)[0]
        w0 = base.get_submodule(name).weight.numpy()
        np.testing.assert_allclose(sol[:-1].T - w0, dw.numpy(), atol=1e-9)
        np.testing.assert_allclose(sol[-1], base.get_submodule(name).bias.numpy(), atol=1e-9)


def test_planted_structure():
    cfg = gt.GroundTruthConfig(dim=16, depth=12, planted_rank=2)
    cos = {}
    for structure in gt.STRUCTURES:
        base, _, planted, _, _ = gt.make_task(cfg, structure, seed=0, dtype=torch.float64)
        vec = [planted[f"blocks.{l}.q_proj"].numpy().ravel() for l in range(cfg.depth)]
        cos[structure] = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(vec, vec[1:])])
        for name, dw in planted.items():
            rank = np.linalg.matrix_rank(dw.numpy(), tol=1e-8 * np.linalg.norm(dw.numpy()))
            assert rank == (3 if structure == "noisy" else 2)
            w = base.get_submodule(name).weight.numpy()
            assert abs(np.linalg.norm(dw.numpy()) / np.linalg.norm(w) - cfg.scale) < 1e-9
    assert cos["smooth"] > 0.95 and abs(cos["independent"]) < 0.2 and 0.5 < cos["noisy"] < 0.95


def test_metrics_match_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        planted = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
        learned = planted + 0.5 * torch.randn(10, 8, generator=g, dtype=torch.float64)
        u = np.linalg.svd(learned.numpy())[0][:, :3]
        ref = np.degrees(linalg.subspace_angles(planted.numpy(), u).max())
        assert abs(gt.subspace_angle(learned, planted) - ref) < 1e-6
        a, b = {"x": learned, "y": 2 * learned}, {"x": planted, "y": planted}
        ref = np.sqrt(sum(np.linalg.norm((a[k] - b[k]).numpy()) ** 2 for k in a) / (2 * np.linalg.norm(planted.numpy()) ** 2))
        assert abs(gt.relative_error(a, b) - ref) < 1e-12


def test_learned_updates_are_the_dense_lora_products():
    base, *_ = gt.make_task(TINY, "smooth", seed=0)
    slora = StructLoRA(copy.deepcopy(base), StructLoRAConfig(r=2, alpha=4, ib=False, graph=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in slora.lora_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    dense = {n: 2.0 * l.lora_B.detach().double().numpy() @ l.lora_A.detach().double().numpy()
             for n, l in slora.lora_layers.items()}
    learned = gt.learned_updates(slora.merge_and_unload(), base)
    assert set(learned) == set(dense) and len(dense) == 2 * TINY.depth
    for n in dense:
        np.testing.assert_allclose(learned[n].numpy(), dense[n], atol=1e-5)


@pytest.mark.parametrize("method", ["structlora", "dora"])
def test_main_runs(tmp_path, method):
    pytest.importorskip("peft")
    m = gt.main(gt.parse_args(["--method", method, "--structure", "noisy", "--depth", "3", "--dim", "8",
                               "--steps", "20", "--n-test", "64", "--out", str(tmp_path)]))
    assert 0 < m["test_loss"] < 1.5 and m["relative_error"] > 0 and 0 <= m["subspace_angle"] <= 90
    assert (tmp_path / "metrics.json").is_file()


def test_kl_is_divided_by_the_count_the_mse_averages(tmp_path, monkeypatch):
    # F.mse_loss is a mean over n_train × dim outputs, so the data-set KL enters each step as KL/(n_train·dim)
    # (the rule train_vit and the LM scripts follow: N = the count their task loss is a mean over)
    seen = []
    make = gt.make_adapter
    monkeypatch.setattr(gt, "make_adapter", lambda *a, **k: seen.append(a[3]) or make(*a, **k))
    gt.main(gt.parse_args(["--method", "ib", "--depth", "3", "--dim", "8", "--n-train", "50", "--steps", "2",
                           "--n-test", "8", "--out", str(tmp_path)]))
    assert seen == [50 * 8]
