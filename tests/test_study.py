"""study.py's statistics against scipy, and its report on synthetic runs."""
import importlib.util
import json
import random

import numpy as np
import pytest
import torch

import study
from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel, randomize_adapters


@pytest.mark.parametrize("n", [3, 5, 12])
def test_paired_t_matches_scipy(n):
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(n)
    for _ in range(20):
        a = [rng.gauss(0.8, 0.02) for _ in range(n)]
        b = [x + rng.gauss(rng.choice([0, 0.01, 0.05]), 0.01) for x in a]
        t, p = study.paired_t(a, b)
        ref = stats.ttest_rel(a, b)
        assert abs(t - ref.statistic) < 1e-9 * max(1, abs(t))
        assert abs(p - ref.pvalue) < 1e-6


def test_paired_t_edge_cases():
    assert study.paired_t([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == (0.0, 1.0)
    assert study.paired_t([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])[1] == 0.0  # constant gain: no variance
    with pytest.raises(ValueError):
        study.paired_t([0.5, 0.6], [0.5, 0.6, 0.7])


def test_report_on_synthetic_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    rng = random.Random(0)
    diag = dict(eta=0.2, semantic_edges=1, adjacent_cosine_before=0.3, adjacent_cosine_after=0.5,
                drift_energy_before=2.0, drift_energy_after=1.0, train_seconds=1.0, eval_seconds=1.0,
                open_directions=40, directions=48, adjacent_cosine_plain=0.01)
    vit = [{"size": s, "rank": r, "method": m, "seed": seed, "accuracy": rng.uniform(0.7, 0.8), **diag}
           for s in study.SIZES for r in study.RANKS for m in study.METHODS for seed in study.SEEDS]
    filt = [{"filter": f, "seed": seed, "accuracy": rng.uniform(0.7, 0.8), **diag}
            for f in ("ib", "norm", "random") for seed in study.SEEDS]
    inv = [{"variant": v, "seed": seed, "accuracy": rng.uniform(0.7, 0.8), **diag}
           for v in study.VARIANTS for seed in study.SEEDS]
    for name, rows in (("vit", vit), ("vit_filter", filt), ("vit_investigate", inv)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    study.report()
    text = (tmp_path / "tables.md").read_text()
    lora_r2 = [100 * r["accuracy"] for r in vit if (r["size"], r["rank"], r["method"]) == (10, 2, "lora")]
    assert f"| 2 | lora | {sum(lora_r2) / 3:.2f} ± " in text
    assert "### Filter comparison" in text and "### Investigation" in text
    assert "SmolLM2" not in text  # llama.json absent: skipped
    if importlib.util.find_spec("matplotlib"):  # the plot is optional (requirements-study.txt)
        assert (tmp_path / "accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize("ib", [False, True])
def test_plain_adjacent_cosine_equals_dense_updates(tmp_path, ib):
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(), StructLoRAConfig(r=4, alpha=8, ib=ib, graph=False))
    randomize_adapters(slora)
    if not ib:
        slora.mask_directions({n: 3 for n in slora.lora_layers}, "random", torch.Generator().manual_seed(0))
    slora.save_adapter(tmp_path / "adapter")
    slora.eval()
    per_target = {}
    for name, layer in slora.lora_layers.items():  # dense ΔW̃ in float64 numpy, eval gates
        q = 1 / (1 + np.exp(-layer.gate_logits.detach().double().numpy())) if ib else layer.mask.double().numpy()
        m = q * (q >= 0.5) if ib else q
        dw = layer.lora_B.detach().double().numpy() @ np.diag(m) @ layer.lora_A.detach().double().numpy()
        per_target.setdefault(name.rpartition(".")[2], []).append(dw.ravel())
    cos = [np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(v, v[1:])]) for v in per_target.values()]
    assert abs(study.plain_adjacent_cosine(tmp_path) - np.mean(cos)) < 1e-9
