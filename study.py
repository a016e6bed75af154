"""The small-scale reproduction study: rank sweep, low data, ablation, filter comparison (paper §5).

    python study.py vit      # DINOv2-S on Fashion-MNIST: r {2,4,8} × 4 methods × seeds {0,1,2} × {10, 50} images/class
    python study.py filter   # r = 8, 50 images/class: IB gate vs top-k-norm vs random mask (same kept directions)
    python study.py investigate  # held-out: one knob at a time (gate init, β, η₀, edge rule) at r = 8, 10/class
    python study.py llama    # SmolLM2-135M on fine-foods: r {2,8} × {lora, structlora} × seeds {0,1,2}
    python study.py report   # tables with paired t-tests → results/study/tables.md, plot → results/study/accuracy.png
    python study.py all

Every run goes through train_vit.py / train_llama.py with their defaults (chosen on held-out data),
so every method gets the same data, steps and learning rates. Runs are resumable: a run whose
runs/study/.../metrics.json exists is read back, not repeated. Results: results/study/*.json.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
from safetensors.torch import load_file

import train_llama
import train_vit
from structlora import adjacent_cosine, deterministic_gate, factor_gram, read_adapter_config

RANKS, METHODS, SEEDS = (2, 4, 8), ("lora", "ib", "graph", "structlora"), (0, 1, 2)
# images per class → training flags; both settings take about the same number of steps (80 and 96)
SIZES = {10: ["--shots-per-class", "10", "--epochs", "20"], 50: ["--shots-per-class", "50", "--epochs", "6"]}
VIT_EVAL = ["--test-samples", "3000", "--merged-eval-samples", "256"]
# At the held-out-best control lr (5e-2) the gate keeps every direction; at 2e-1 it closes about 70%
# of them (results/vit_holdout_control_lr), so the filters are compared there, all at that lr.
FILTER_RANK, FILTER_SIZE, FILTER_CONTROL_LR = 8, 50, "2e-1"
LLAMA_RANKS, LLAMA_METHODS = (2, 8), ("lora", "structlora")
# One knob at a time from the defaults, on held-out training images (never the test split)
INVESTIGATE_RANK, INVESTIGATE_SIZE = 8, 10
VARIANTS = {
    "lora": ["--method=lora"],
    "structlora": [],
    "gate-init 0.99": ["--gate-init=0.99"],
    "beta 1e-2": ["--beta=1e-2"],
    "eta-init 0.5": ["--eta-init=0.5"],
    "chain edges only": ["--semantic-every=0"],
    "semantic-threshold 0": ["--semantic-threshold=0"],
}
RESULTS, RUNS = "results/study", "runs/study"


def run(script, out, flags):
    """One training run (or its saved metrics), reduced to what the tables need."""
    path = os.path.join(out, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            return summarize(json.load(f), None, out)
    t0 = time.time()
    m = script.main(script.parse_args(flags + [f"--out={out}"]))
    return summarize(m, time.time() - t0, out)


@torch.no_grad()
def plain_adjacent_cosine(run_dir):
    """Mean cosine between adjacent layers' un-coordinated updates ΔW̃ = B·diag(m)·A (eval gates, or the
    fixed mask), read from the run's saved adapter; one value per target name, averaged. For LoRA
    this is the paper's 0.34 baseline figure."""
    path = os.path.join(run_dir, "adapter")
    t, saved = load_file(os.path.join(path, "adapter_model.safetensors")), read_adapter_config(path)
    groups = {}
    for name in saved["layers"]:  # saved in depth order
        if f"{name}.gate_logits" in t:
            m = deterministic_gate(t[f"{name}.gate_logits"].double(), saved["config"]["prune_below"])
        else:
            m = t[f"{name}.mask"].double()
        groups.setdefault(name.rpartition(".")[2], []).append((t[f"{name}.lora_B"].double() * m, t[f"{name}.lora_A"].double()))
    return statistics.mean(float(adjacent_cosine(factor_gram(f))) for f in groups.values())


def summarize(m, wall, out):
    graphs = list(m["graphs"].values())
    mean = lambda key: statistics.mean(g[key] for g in graphs) if graphs else None
    return {
        "accuracy": m["accuracy"], "merged_agreement": m["merged_prediction_agreement"],
        "train_seconds": m["train_seconds"], "eval_seconds": m["eval_seconds"], "wall_seconds": wall,
        "open_directions": sum(m["open_directions"].values()),
        "directions": m["args"]["rank"] * len(m["open_directions"]),
        "open_per_layer": list(m["open_directions"].values()),
        "adjacent_cosine_plain": plain_adjacent_cosine(out),
        "eta": mean("eta"), "semantic_edges": sum(len(g["semantic_edges"]) for g in graphs),
        "adjacent_cosine_before": mean("adjacent_cosine_before"), "adjacent_cosine_after": mean("adjacent_cosine_after"),
        "drift_energy_before": mean("drift_energy_before"), "drift_energy_after": mean("drift_energy_after"),
    }


def save(name, rows):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)


def vit_grid(seeds=SEEDS):
    rows = []
    for size, size_flags in SIZES.items():
        for rank in RANKS:
            for method in METHODS:
                for seed in seeds:
                    out = f"{RUNS}/vit/n{size}_r{rank}_{method}_seed{seed}"
                    flags = size_flags + VIT_EVAL + [f"--rank={rank}", f"--method={method}", f"--seed={seed}"]
                    rows.append({"size": size, "rank": rank, "method": method, "seed": seed,
                                 **run(train_vit, out, flags)})
                    save("vit", rows)


def vit_filter(seeds=SEEDS):
    """IB (structlora) against the same coordinator with a fixed mask of as many directions per layer."""
    rows = []
    for seed in seeds:
        ib_run = f"{RUNS}/vit_filter/ib_seed{seed}"
        common = SIZES[FILTER_SIZE] + VIT_EVAL + [f"--rank={FILTER_RANK}", f"--seed={seed}",
                                                  f"--control-lr={FILTER_CONTROL_LR}"]
        rows.append({"filter": "ib", "seed": seed, **run(train_vit, ib_run, common + ["--method=structlora"])})
        for rule in ("norm", "random"):
            out = f"{RUNS}/vit_filter/{rule}_seed{seed}"
            flags = common + ["--method=graph", f"--mask={rule}", f"--keep-from={ib_run}"]
            rows.append({"filter": rule, "seed": seed, **run(train_vit, out, flags)})
            save("vit_filter", rows)


def investigate(seeds=SEEDS):
    rows = []
    for name, variant in VARIANTS.items():
        for seed in seeds:
            out = f"{RUNS}/investigate/{name.replace(' ', '_')}_seed{seed}"  # e.g. beta_1e-2_seed0
            flags = SIZES[INVESTIGATE_SIZE] + ["--holdout-per-class=100", "--merged-eval-samples=256",
                                               f"--rank={INVESTIGATE_RANK}", "--method=structlora", f"--seed={seed}"]
            rows.append({"variant": name, "seed": seed, **run(train_vit, out, flags + variant)})
            save("vit_investigate", rows)


def llama(seeds=SEEDS):
    rows = []
    for rank in LLAMA_RANKS:
        for method in LLAMA_METHODS:
            for seed in seeds:
                out = f"{RUNS}/llama/r{rank}_{method}_seed{seed}"
                flags = [f"--rank={rank}", f"--method={method}", f"--seed={seed}", "--generations=0"]
                rows.append({"rank": rank, "method": method, "seed": seed, **run(train_llama, out, flags)})
                save("llama", rows)


# ----------------------------------------------------------------------------------------------
# report: mean ± std over seeds and the paired two-sided t-test against LoRA (paper §4)


def two_sided_p(t, df):
    """P(|T| ≥ |t|) for Student's t with df degrees of freedom: 1 − 2∫₀^|t| pdf (Simpson's rule)."""
    if math.isinf(t):
        return 0.0
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    n, h = 4000, abs(t) / 4000
    area = pdf(0) + pdf(abs(t)) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return max(0.0, 1 - 2 * area * h / 3)


def paired_t(a, b):
    """Two-sided paired t-test of mean(a − b) = 0 over seeds: (t, p), df = n − 1."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    sd = statistics.stdev(d)
    if sd == 0:
        return (0.0, 1.0) if statistics.mean(d) == 0 else (math.copysign(math.inf, statistics.mean(d)), 0.0)
    t = statistics.mean(d) / (sd / math.sqrt(len(d)))
    return t, two_sided_p(t, len(d) - 1)


def by_seed(rows, **key):
    picked = [r for r in rows if all(r[k] == v for k, v in key.items())]
    return {r["seed"]: r for r in sorted(picked, key=lambda r: r["seed"])}


def pm(values, scale=100.0, digits=2):
    values = [scale * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def versus_lora(rows, **key):
    """Accuracy mean ± std, Δ against LoRA on the same seeds, and the paired t-test's p."""
    runs, lora = by_seed(rows, **key), by_seed(rows, **{**key, "method": "lora"})
    seeds = sorted(set(runs) & set(lora))
    acc = [runs[s]["accuracy"] for s in seeds]
    if not seeds:
        return ["–", "", ""]
    if key["method"] == "lora" or len(seeds) < 2:
        return [pm(acc), "", ""]
    base = [lora[s]["accuracy"] for s in seeds]
    t, p = paired_t(acc, base)
    return [pm(acc), f"{100 * statistics.mean(a - b for a, b in zip(acc, base)):+.2f}", f"{p:.2f}"]


def table(header, lines):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(map(str, l)) + " |" for l in lines]) + "\n"


def vit_tables(rows):
    out = []
    for size in SIZES:
        lines = [[r, m, *versus_lora(rows, size=size, rank=r, method=m)] for r in RANKS for m in METHODS]
        seeds = sorted({r["seed"] for r in rows if r["size"] == size})
        out.append(f"### ViT, {size} images per class (test accuracy %, 3000 test images, seeds {seeds})\n\n" +
                   table(["r", "method", "accuracy", "Δ vs LoRA", "p (paired t)"], lines))
    lines = []
    for size in SIZES:
        for r in RANKS:
            for m in METHODS:
                runs = list(by_seed(rows, size=size, rank=r, method=m).values())
                if not runs:
                    continue
                mean = lambda k: statistics.mean(x[k] for x in runs) if runs and runs[0][k] is not None else None
                fmt = lambda v, f: "–" if v is None else format(v, f)
                lines.append([size, r, m, f"{mean('open_directions'):.1f} / {runs[0]['directions']}",
                              fmt(mean("adjacent_cosine_plain"), ".3f"),
                              fmt(mean("eta"), ".3f"), fmt(mean("semantic_edges") if runs[0]["eta"] else None, ".1f"),
                              f"{fmt(mean('adjacent_cosine_before'), '.3f')} → {fmt(mean('adjacent_cosine_after'), '.3f')}",
                              f"{fmt(mean('drift_energy_before'), '.3g')} → {fmt(mean('drift_energy_after'), '.3g')}"])
    out.append("### ViT diagnostics (means over seeds, averaged over the q and v graphs; ΔW̃: the gated "
               "update of each layer, ΔW^f: after the smoothing step)\n\n" +
               table(["images/class", "r", "method", "open directions", "adjacent cosine of ΔW̃", "η",
                      "semantic edges", "adjacent cosine ΔW̃ → ΔW^f (graph)", "drift energy ΔW̃ → ΔW^f"], lines))
    return out


def filter_table(rows):
    ib = by_seed(rows, filter="ib")
    lines = []
    for rule in ("ib", "norm", "random"):
        runs = by_seed(rows, filter=rule)
        seeds = sorted(set(runs) & set(ib))
        if not seeds:
            continue
        acc = [runs[s]["accuracy"] for s in seeds]
        t, p = paired_t(acc, [ib[s]["accuracy"] for s in seeds]) if rule != "ib" and len(seeds) > 1 else (None, None)
        kept = statistics.mean(runs[s]["open_directions"] for s in seeds)
        lines.append([rule, f"{kept:.1f} / {runs[seeds[0]]['directions']}", pm(acc), "" if p is None else f"{p:.2f}"])
    return (f"### Filter comparison (r = {FILTER_RANK}, {FILTER_SIZE} images per class, graph coordinator on, "
            f"control lr {FILTER_CONTROL_LR})\n\n" +
            table(["filter", "kept directions", "accuracy", "p vs IB (paired t)"], lines))


def llama_table(rows):
    lines = []
    for r in LLAMA_RANKS:
        for m in LLAMA_METHODS:
            runs = list(by_seed(rows, rank=r, method=m).values())
            if not runs:
                continue
            cos = [(x["adjacent_cosine_before"], x["adjacent_cosine_after"]) for x in runs if x["eta"] is not None]
            cos = f"{statistics.mean(b for b, _ in cos):.3f} → {statistics.mean(a for _, a in cos):.3f}" if cos else "–"
            lines.append([r, m, *versus_lora(rows, rank=r, method=m),
                          f"{statistics.mean(x['open_directions'] for x in runs):.1f} / {runs[0]['directions']}", cos])
    seeds = sorted({r["seed"] for r in rows})
    return (f"### SmolLM2-135M on fine-foods (accuracy %, 200 test reviews, seeds {seeds})\n\n" +
            table(["r", "method", "accuracy", "Δ vs LoRA", "p (paired t)", "open directions", "adjacent cosine"], lines))


def investigate_table(rows):
    lora = by_seed(rows, variant="lora")
    lines = []
    for name in VARIANTS:
        runs = by_seed(rows, variant=name)
        seeds = sorted(set(runs) & set(lora))
        if not seeds:
            continue
        acc = [runs[s]["accuracy"] for s in seeds]
        p = paired_t(acc, [lora[s]["accuracy"] for s in seeds])[1] if name != "lora" and len(seeds) > 1 else None
        eta = [runs[s]["eta"] for s in seeds if runs[s]["eta"] is not None]
        lines.append([name, pm(acc), "" if p is None else f"{p:.2f}",
                      f"{statistics.mean(runs[s]['open_directions'] for s in seeds):.1f} / {runs[seeds[0]]['directions']}",
                      f"{statistics.mean(eta):.3f}" if eta else "–"])
    return (f"### Investigation (held-out: 100 other training images per class; r = {INVESTIGATE_RANK}, "
            f"{INVESTIGATE_SIZE} images per class)\n\n" +
            table(["variant", "held-out accuracy", "p vs LoRA (paired t)", "open directions", "η"], lines))


def mean_sd(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, size in zip(axes[:2], SIZES):
        for m in METHODS:
            xs = [r for r in RANKS if by_seed(rows, size=size, rank=r, method=m)]
            ys = [mean_sd([100 * x["accuracy"] for x in by_seed(rows, size=size, rank=r, method=m).values()]) for r in xs]
            ax.errorbar(xs, [y for y, _ in ys], [sd for _, sd in ys], marker="o", capsize=3, label=m)
        ax.set(title=f"{size} images per class", xlabel="rank r", ylabel="test accuracy %", xticks=RANKS)
    for m in METHODS:
        xs = [s for s in SIZES if by_seed(rows, size=s, rank=8, method=m)]
        ys = [mean_sd([100 * x["accuracy"] for x in by_seed(rows, size=s, rank=8, method=m).values()]) for s in xs]
        axes[2].errorbar(xs, [y for y, _ in ys], [sd for _, sd in ys], marker="o", capsize=3, label=m)
    axes[2].set(title="r = 8", xlabel="training images per class", ylabel="test accuracy %", xticks=list(SIZES))
    axes[0].legend()
    fig.suptitle(f"DINOv2-S/14 on Fashion-MNIST, mean ± std over {len({r['seed'] for r in rows})} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report():
    parts, total = [], 0.0
    for name, make in (("vit", vit_tables), ("vit_filter", filter_table), ("vit_investigate", investigate_table),
                       ("llama", llama_table)):
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.isfile(path):
            print(f"skipping {name}: {path} not found (run `python study.py {name.replace('vit_', '')}`)")
            continue
        with open(path) as f:
            rows = json.load(f)
        made = make(rows)
        parts += [made] if isinstance(made, str) else made
        total += sum(r["train_seconds"] + r["eval_seconds"] for r in rows)
        if name == "vit":
            try:
                plot(rows, os.path.join(RESULTS, "accuracy.png"))
            except ImportError:
                print("no plot: matplotlib is not installed (pip install -r requirements-study.txt)")
    parts.append(f"Training + evaluation time summed over all runs: {total / 60:.0f} min on this machine.\n")
    with open(os.path.join(RESULTS, "tables.md"), "w") as f:
        f.write("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["vit", "filter", "investigate", "llama", "report", "all"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the training runs")
    args = p.parse_args()
    part, seeds = args.part, tuple(args.seeds)
    steps = {"vit": [vit_grid], "filter": [vit_filter], "investigate": [investigate], "llama": [llama],
             "report": [report], "all": [vit_grid, vit_filter, investigate, llama, report]}[part]
    for step in steps:
        step() if step is report else step(seeds)
