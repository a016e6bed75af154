"""experiments/study.py's statistics against scipy, and its report on synthetic runs."""
import importlib.util
import json
import random
import time

import numpy as np
import pytest
import torch

from experiments import study
from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel, randomize_adapters
from training.baselines import mask_directions


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
    if importlib.util.find_spec("matplotlib"):  # the plot is optional (experiments/requirements.txt)
        assert (tmp_path / "accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize("ib", [False, True])
def test_plain_adjacent_cosine_equals_dense_updates(tmp_path, ib):
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(), StructLoRAConfig(r=4, alpha=8, ib=ib, graph=False))
    randomize_adapters(slora)
    if not ib:
        mask_directions(slora, {n: 3 for n in slora.lora_layers}, "random", torch.Generator().manual_seed(0))
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


# ----------------------------------------------------------------------------------------------
# study v2


def test_update_stats_equal_dense_smoothing(tmp_path):
    """Cosines and singular-value energy of ΔW^f = C·ΔW̃ (C = (1−η)I + η·D⁻¹(A+I), chain edges), rebuilt
    from the saved adapter, against float64 numpy."""
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(n_layers=5), StructLoRAConfig(r=3, alpha=6, edges="chain"))
    randomize_adapters(slora)
    slora.save_adapter(tmp_path / "adapter")
    stats = study.update_stats(tmp_path, top=4)
    for key, graph in slora.graphs.items():
        layers, eta = graph.layers, float(graph.coordinator.eta().detach())
        tilde = []
        for l in layers:
            q = 1 / (1 + np.exp(-l.gate_logits.detach().double().numpy()))
            tilde.append(l.scaling * l.lora_B.detach().double().numpy() @ np.diag(q * (q >= 0.5)) @ l.lora_A.detach().double().numpy())
        n = len(tilde)
        adj = np.eye(n, k=1) + np.eye(n, k=-1) + np.eye(n)
        C = (1 - eta) * np.eye(n) + eta * adj / adj.sum(1, keepdims=True)
        dense = [sum(C[i, j] * tilde[j] for j in range(n)) for i in range(n)]
        z = np.stack([d.ravel() / np.linalg.norm(d) for d in dense])
        np.testing.assert_allclose(stats[key]["cosine"], z @ z.T, atol=1e-6)
        energy = np.mean([np.cumsum(np.linalg.svd(d, compute_uv=False)[:4] ** 2) / np.sum(d ** 2) for d in dense], 0)
        np.testing.assert_allclose(stats[key]["energy"], energy, atol=1e-6)


def synthetic_v2(rng):
    diag = dict(train_seconds=1.0, eval_seconds=1.0, wall_seconds=2.0, steps=96, n_train=500, trainable_params=1000,
                open_directions=192, directions=192, eta=0.3, edges=22, semantic_edges=0,
                adjacent_cosine_before=0.01, adjacent_cosine_after=0.2, merged_agreement=1.0)
    updates = {k: {"cosine": np.eye(12).tolist(), "energy": np.linspace(0.3, 1, 24).tolist()} for k in ("q_proj", "v_proj")}
    acc = lambda: rng.uniform(0.7, 0.8)
    lr = [{"method": m, "lr": lr, "seed": 0, "accuracy": acc(), **diag} for m, g in study.LR_GRID.items() for lr in g]
    peers = [{"size": s, "method": m, "lr": "5e-3", "seed": seed, "accuracy": acc(), **diag, "updates": updates}
             for s in (50, 10) for m in study.PEER_METHODS for seed in study.SEEDS]
    t6 = [{"variant": v, "seed": seed, "accuracy": acc(), **diag, "updates": updates}
          for v in study.TABLE6 for seed in study.SEEDS]
    frac = [{"percent": p, "method": m, "seed": seed, "accuracy": acc(), **diag}
            for p in study.PERCENTS for m in ("head", "lora", "structlora", "dora") for seed in study.SEEDS[:2 if p == 100 else 3]]
    frac += [{"percent": 25, "method": m, "seed": 0, "accuracy": acc(), **diag, "open_directions": 30}
             for m in ("ib", "graph")]  # diagnostics: one seed, no test
    gt = [{"structure": s, "n_train": n, "method": m, "seed": seed, "test_loss": rng.random(), "relative_error": rng.random(),
           "subspace_angle": 90 * rng.random(), "train_seconds": 1.0, "eval_seconds": 0.0, "open_directions": 90, "directions": 96}
          for n in study.GT_N for s in ("smooth", "independent", "noisy") for m in study.GT_METHODS for seed in study.SEEDS]
    flr = [{"method": "lora", "lr": lr, "seed": 0, "accuracy": acc(), **diag} for lr in study.FRACTION_LRS]
    return {"v2_lr": lr, "v2_fraction_lr": flr, "v2_peers": peers, "v2_table6": t6, "v2_fractions": frac, "v2_groundtruth": gt}


def test_report_v2_on_synthetic_runs(tmp_path, monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    monkeypatch.setattr(study, "RESULTS_MD", str(tmp_path / "RESULTS.md"))
    (tmp_path / "RESULTS.md").write_text("prose\n<!-- v2_table6 -->\nold table\n<!-- /v2_table6 -->\nmore prose\n")
    data = synthetic_v2(random.Random(1))
    for name, rows in data.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    study.report_v2()
    text = (tmp_path / "tables_v2.md").read_text()
    results = (tmp_path / "RESULTS.md").read_text()
    assert results.startswith("prose\n<!-- v2_table6 -->\n### Table 6") and "old table" not in results
    assert results.endswith("| 0,1,2 |\n<!-- /v2_table6 -->\nmore prose\n")
    pick = lambda rows, **k: [r for r in rows if all(r[a] == b for a, b in k.items())]
    dora = [r["accuracy"] for r in pick(data["v2_peers"], size=50, method="dora")]
    lora = [r["accuracy"] for r in pick(data["v2_peers"], size=50, method="lora")]
    head = [r["accuracy"] for r in pick(data["v2_peers"], size=50, method="head")]
    p = stats.ttest_rel(dora, lora).pvalue
    sd = np.std(100 * np.array(dora), ddof=1)
    assert (f"| dora | 5e-3 | {100 * np.mean(dora):.2f} ± {sd:.2f} | {100 * (np.mean(dora) - np.mean(lora)):+.2f} | "
            f"{p:.3f} | {100 * (np.mean(dora) - np.mean(head)):+.2f} |") in text
    g = pick(data["v2_groundtruth"], structure="noisy", n_train=64, method="structlora")
    gl = pick(data["v2_groundtruth"], structure="noisy", n_train=64, method="lora")
    p = stats.ttest_rel([r["relative_error"] for r in g], [r["relative_error"] for r in gl]).pvalue
    assert f"| 64 | noisy | structlora | " in text and f"| {p:.3f} |" in text
    assert "| 100% (500) | 96 | lora |" in text and "| 0,1 |" in text  # 100% ran two seeds only
    assert "| 25% (500) | 96 | ib |" in text and "| 30 / 192 | 0.30 | 0.0 | 0 |" in text  # open directions, η
    n_tests = 2 * 5 + 10 + 3 * 3 + 2 * 3 * 5  # peers (2 sizes × 5), table6 (10), fractions (3 × 3), ground truth
    assert f"Multiple comparisons: {n_tests} paired t-tests" in text
    for name in ("gcn T=3", "semantic edges", "lora+laplacian"):
        assert f"| {name} |" in text
    if importlib.util.find_spec("matplotlib"):
        for png in ("cosine_heatmaps", "energy_coverage", "fractions", "groundtruth"):
            assert (tmp_path / f"{png}.png").stat().st_size > 10_000


def test_holm_against_hand_computation():
    tests = [("a", 0.001), ("b", 0.03), ("c", 0.012), ("d", 0.3)]
    # sorted: 0.001 ≤ 0.05/4, 0.012 ≤ 0.05/3, then 0.03 > 0.05/2 stops
    assert "after Holm–Bonferroni at family-wise 0.05: a (p = 0.0010), c (p = 0.0120)." in study.holm(tests)
    assert "3 with p < 0.05" in study.holm(tests)


def test_best_lr_and_peer_from_held_out_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    rows = [{"method": "dora", "lr": "2e-3", "seed": 0, "accuracy": 0.80}, {"method": "dora", "lr": "2e-3", "seed": 1, "accuracy": 0.70},
            {"method": "dora", "lr": "5e-3", "seed": 0, "accuracy": 0.76}, {"method": "dora", "lr": "5e-3", "seed": 1, "accuracy": 0.76},
            {"method": "adalora", "lr": "1e-2", "seed": 0, "accuracy": 0.77}, {"method": "adalora", "lr": "1e-2", "seed": 1, "accuracy": 0.77}]
    (tmp_path / "v2_lr.json").write_text(json.dumps(rows))
    assert study.best_lr("dora") == "5e-3"          # mean over seeds: 0.75 vs 0.76
    assert study.best_lr("lora") == "5e-3"          # the first study's held-out choice
    assert study.best_peer() == "adalora"
    with pytest.raises(SystemExit, match="peft-lora"):
        study.best_lr("peft-lora")


def test_fraction_lr_from_held_out_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    with pytest.raises(SystemExit, match="fraction-lr"):
        study.fraction_lr()
    rows = [{"lr": "1e-3", "seed": 0, "accuracy": 0.81}, {"lr": "2e-3", "seed": 0, "accuracy": 0.81},
            {"lr": "5e-3", "seed": 0, "accuracy": 0.30}]
    (tmp_path / "v2_fraction_lr.json").write_text(json.dumps(rows))
    assert study.fraction_lr() == "1e-3"  # a tie goes to the smaller lr


def test_llama_table_shows_the_base_model_row(tmp_path, monkeypatch):
    """The LLaMA table says what the adapters add over the untrained base model (train_llama --epochs 0)."""
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    diag = dict(open_directions=120, directions=120, eta=None, adjacent_cosine_before=0.0, adjacent_cosine_after=0.0)
    rows = [{"rank": r, "method": m, "seed": s, "accuracy": 0.6 + 0.01 * s + (0.02 if m == "lora" else 0), **diag}
            for r in study.LLAMA_RANKS for m in study.LLAMA_METHODS for s in study.SEEDS]
    rows.append({"rank": 0, "method": study.LLAMA_BASE, "seed": 0, "accuracy": 0.515, **diag})
    text = study.llama_table(rows)
    assert f"| – | {study.LLAMA_BASE} | 51.50 |" in text
    assert "| 2 | lora | 63.00 ± 1.00 |" in text  # 62, 63, 64 and "seeds [0, 1, 2]" in text


def fake_runs(monkeypatch, tmp_path, result):
    """study.run records (out, flags) and returns `result` instead of training; results go to tmp_path."""
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    monkeypatch.setattr(study, "fraction_lr", lambda: "2e-3")
    calls = []
    monkeypatch.setattr(study, "run", lambda script, out, flags, reduce: calls.append((out, flags)) or dict(result))
    return calls


def test_fractions_runs_the_variants_with_their_flags(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, tmp_path, {"accuracy": 0.5, "n_train": 15000, "steps": 469})
    study.fractions(seeds=(1,), percents=(25,), methods=("ib beta=0", "graph"))
    (out_a, a), (out_b, b) = calls
    assert out_a.endswith("/p25_r8_ib_beta0_lr2e-3_seed1") and "--method=ib" in a and "--beta=0" in a
    assert "--method=graph" in b and not any(f.startswith("--beta") for f in b)
    assert "--train-fraction=0.25" in a and "--epochs=1" in a and "--lr=2e-3" in a and "--seed=1" in a
    rows = study.load_rows("v2_fractions")
    assert [(r["method"], r["seed"], r["percent"]) for r in rows] == [("ib beta=0", 1, 25), ("graph", 1, 25)]


def test_ib_search_runs_on_held_out_images_with_one_flag_changed(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, tmp_path, {"accuracy": 0.5, "open_directions": 190, "directions": 192, "train_seconds": 60.0})
    study.ib_search(seeds=(0,), percents=(10,), variants=("structlora", "structlora beta=10", "lora"))
    (_, a), (out_b, b), (_, c) = calls
    assert all("--holdout-per-class=100" in f and "--train-fraction=0.1" in f for f in (a, b, c))  # never the test split
    assert not any(f.startswith("--beta") for f in a) and "--beta=10" in b and out_b.endswith("p10_h100_structlora_beta10_seed0")
    assert c[c.index("--method=structlora") + 1:].count("--method=lora") == 1  # the last --method wins
    block, _ = study.ib_search_table(study.load_rows("v2_ib_search"))
    assert "| 10% | 1000 | structlora beta=10 | 50.00 | 190 / 192 | 1.0 | 0 |" in block


def test_ib_search_records_the_held_out_size(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, tmp_path, {"accuracy": 0.5, "open_directions": 190, "directions": 192, "train_seconds": 60.0})
    study.ib_search(seeds=(0,), percents=(10,), variants=("structlora",), holdout=300)
    study.ib_search(seeds=(0,), percents=(10,), variants=("structlora",))
    (out_a, a), (_, b) = calls
    assert "--holdout-per-class=300" in a and out_a.endswith("p10_h300_structlora_seed0")
    assert "--holdout-per-class=100" in b
    rows = study.load_rows("v2_ib_search")  # two held-out sizes: two rows, neither replaces the other
    assert sorted(r["holdout_per_class"] for r in rows) == [100, 300]


def last_flag(flags, name):  # argparse: the last occurrence wins
    return [f.split("=", 1)[1] for f in flags if f.startswith(name + "=")][-1]


def test_language_runs_both_testbeds_with_one_stage1_projector(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, tmp_path, {"accuracy": 0.6, "open_directions": 240, "directions": 240})
    study.language(seeds=(0, 1), methods=("lora", "structlora"))
    outs = [out for out, _ in calls]
    assert len(calls) == 4 + 1 + 4 and outs[4].endswith("/language/easy-vqa_stage1")
    assert "--stage=1" in calls[4][1] and outs[:4] == [f"{study.V2}/language/fine-foods_n1200_r8_{m}_seed{s}"
                                                      for m in ("lora", "structlora") for s in (0, 1)]
    assert last_flag(calls[4][1], "--train-samples") == "1200"  # the projector: 150 steps, as fine-foods' runs
    for out, flags in calls[5:]:
        assert "--stage=2" in flags and f"--projector={outs[4]}/projector.safetensors" in flags
        assert "/easy-vqa_n3200_r8_" in out and last_flag(flags, "--train-samples") == "3200"  # 400 steps
    for out, flags in calls[:4] + calls[5:]:
        assert "--rank=8" in flags and "--eval-samples=300" in flags
        assert f"--seed={out[-1]}" in flags and f"--method={out.split('_r8_')[1].split('_seed')[0]}" in flags
    rows = study.load_rows("v2_language")
    assert sorted((r["testbed"], r["method"], r["seed"]) for r in rows) == sorted(
        (t, m, s) for t in study.LANGUAGE for m in ("lora", "structlora") for s in (0, 1))


def test_language_table_compares_with_lora_on_the_same_seeds():
    diag = dict(train_seconds=60.0, eval_seconds=1.0, directions=240, n_train=2400, n_eval=1000, steps=300)
    rows = [{"testbed": "fine-foods", "method": m, "seed": s, "accuracy": acc + 0.01 * s, "open_directions": o, **diag}
            for m, acc, o in (("lora", 0.70, 240), ("structlora", 0.71, 230)) for s in (0, 1, 2)]
    rows[3]["accuracy"] = 0.705  # structlora seed 0: differences 0.005, 0.01, 0.01
    text, tests = study.language_table(rows)
    assert "| fine-foods | 2,400 | 300 | 1000 | lora | 71.00 ± 1.00 |  |  | 240 / 240 | 1.0 | 0,1,2 |" in text
    assert "| fine-foods | 2,400 | 300 | 1000 | structlora | 71.83 ± 1.26 | +0.83 | 0.038 | 230 / 240 | 1.0 | 0,1,2 |" in text
    assert [name for name, _ in tests] == ["structlora on fine-foods"] and "easy-vqa" not in text


def test_budgets_runs_the_gate_first_and_masks_from_it(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, tmp_path, {"accuracy": 0.5, "open_directions": 96, "directions": 192})
    study.budgets(seeds=(1,), shares=(25,))
    (gate_out, gate), (_, gate05), (_, norm), (_, rand), (_, ada) = calls
    assert "--budget-margin=0.5" in gate05 and "--budget=0.25" in gate05 and "--budget-margin=0.5" not in gate
    assert gate_out.endswith("/budgets/b25_r8_structlora_lr2e-3_seed1")
    assert "--method=structlora" in gate and "--budget=0.25" in gate
    assert "--method=graph" in norm and "--mask=norm" in norm and f"--keep-from={gate_out}" in norm
    assert "--mask=random" in rand and f"--keep-from={gate_out}" in rand
    assert not any(f.startswith("--budget") for f in norm + rand)  # a fixed mask has no gate to hold
    assert "--method=adalora" in ada and "--budget=0.25" in ada
    for _, flags in calls:
        assert "--train-fraction=0.1" in flags and "--epochs=1" in flags and "--rank=8" in flags
        assert "--lr=2e-3" in flags and "--seed=1" in flags and "--control-lr=5e-2" in flags
    rows = study.load_rows("v2_budgets")
    assert [(r["budget"], r["method"], r["seed"]) for r in rows] == [(25, m, 1) for m in study.BUDGET_METHODS]


def test_budgets_table_reports_accuracy_and_the_budget_reached():
    diag = dict(train_seconds=1.0, eval_seconds=1.0, directions=192)
    rows = [{"budget": 25, "method": m, "seed": s, "accuracy": acc + 0.01 * s, "open_directions": kept, **diag}
            for m, acc, kept in (("structlora", 0.80, 48), ("norm mask", 0.78, 48), ("adalora", 0.81, 47))
            for s in (0, 1)]
    rows[0]["accuracy"] = 0.79  # seed 0 of structlora: differences 0.01 and 0.02 against the norm mask
    rows += [{"budget": 50, "method": "structlora", "seed": s, "accuracy": 0.9, "open_directions": 97, **diag}
             for s in (0, 1)]  # another budget: compared with nothing at 25%
    text, tests = study.budgets_table(rows)
    assert "| 25% | structlora | 80.00 ± 1.41 |  |  | 48 / 192 (25.0%) | 0,1 |" in text
    assert "| 25% | norm mask | 78.50 ± 0.71 | -1.50 | 0.205 | 48 / 192 (25.0%) | 0,1 |" in text
    assert "| 25% | adalora | 81.50 ± 0.71 | +1.50 | 0.205 | 47 / 192 (24.5%) | 0,1 |" in text
    assert "| 50% | structlora | 90.00 ± 0.00 |  |  | 97 / 192 (50.5%) | 0,1 |" in text
    assert "random mask" not in text and [name for name, _ in tests] == ["norm mask at a 25% budget",
                                                                          "adalora at a 25% budget"]


def test_stop_at_is_the_next_time_the_clock_reads_it():
    # started at 23:15 with --stop-at 01:55: stop 2 h 40 min later (not at once, as comparing "23:15" >= "01:55" did)
    now = time.mktime((2026, 12, 1, 23, 15, 0, 0, 0, -1))
    assert study.stop_deadline("01:55", now) - now == pytest.approx((2 * 60 + 40) * 60, abs=3600)  # ±1 h: DST
    assert study.stop_deadline("23:45", now) - now == pytest.approx(30 * 60)
    assert 0 < study.stop_deadline("23:15", now + 1) - now <= 24 * 3600 + 3600  # just passed: tomorrow
    for bad in ("25:00", "1:5x", "0155"):
        with pytest.raises(ValueError, match="HH:MM"):
            study.stop_deadline(bad, now)


def test_table6_runs_only_the_variants_asked_for(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, tmp_path, {"accuracy": 0.5})
    study.table6(seeds=(2,), variants=("gcn T=2", "structlora (smooth T=1, hybrid)"))
    (out_a, a), (out_b, b) = calls  # the shared variant last, as with every variant
    assert out_a.endswith("/n50_r8_gcn_T2_seed2") and "--coordinator=gcn" in a and "--graph-layers=2" in a
    assert out_b.endswith("/n50_r8_structlora_seed2") and "--method=structlora" in b and "--seed=2" in b
    assert sorted(r["variant"] for r in study.load_rows("v2_table6")) == ["gcn T=2", "structlora (smooth T=1, hybrid)"]
    with pytest.raises(ValueError, match="gcn T=9"):
        study.table6(seeds=(0,), variants=("gcn T=9",))
