"""The small-scale reproduction study: rank sweep, low data, ablation, filter comparison (paper §5), and
study v2: what adapters add over the head, peers, more data, Table 6, a ground-truth task, figures.

    python -m experiments.study vit      # DINOv2-S on Fashion-MNIST: r {2,4,8} × 4 methods × seeds {0,1,2} × {10, 50} images/class
    python -m experiments.study filter   # r = 8, 50 images/class: IB gate vs top-k-norm vs random mask (same kept directions)
    python -m experiments.study investigate  # held-out: one knob at a time (gate init, β, η₀, edge rule) at r = 8, 10/class
    python -m experiments.study llama    # SmolLM2-135M on fine-foods: the untrained base, r {2,8} × {lora, structlora} × seeds {0,1,2}
    python -m experiments.study lr       # v2, held-out: lr of the head alone and of peft's LoRA, DoRA, AdaLoRA (seed 0)
    python -m experiments.study peers    # v2: head, lora, structlora, peft-lora, dora, adalora at r = 8, 50 and 10 images/class
    python -m experiments.study table6   # v2: smooth/gcn × T = 1..3, chain/semantic edges, lora+cos, lora+laplacian (r = 8, 50/class)
    python -m experiments.study fractions --percents 10 25 100  # v2: one epoch over 10/25/100% of the training set
                                                    # (--methods graph ib "ib beta=0": which part costs accuracy)
    python -m experiments.study budgets  # v2: at 25/50/75% of the r = 8 directions kept (10% of the training set): the
                                         # IB gate (--budget) vs top-k-norm and random masks vs AdaLoRA at that rank
    python -m experiments.study groundtruth  # v2: planted ΔW* (smooth / independent / noisy) on a random 12-block network
    python -m experiments.study report   # tables with paired t-tests → experiments/results/study/tables.md, tables_v2.md; figures → *.png
    python -m experiments.study all

Every run goes through train_vit.py / train_llama.py with their defaults (chosen on held-out data),
so every method gets the same data, steps and learning rates. Runs are resumable: a run whose
runs/study/.../metrics.json exists is read back, not repeated. Results: experiments/results/study/*.json.
"""
import argparse
import datetime
import fcntl
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from experiments import groundtruth
import train_llama
import train_llava
import train_vit
from training.baselines import BASELINES
from structlora import (StructLoRA, StructLoRAConfig, adjacent_cosine, deterministic_gate, factor_gram,
                        read_adapter_config)

RANKS, METHODS, SEEDS = (2, 4, 8), ("lora", "ib", "graph", "structlora"), (0, 1, 2)
# images per class → training flags; both settings take about the same number of steps (80 and 96)
SIZES = {10: ["--shots-per-class", "10", "--epochs", "20"], 50: ["--shots-per-class", "50", "--epochs", "6"]}
VIT_EVAL = ["--test-samples", "3000", "--merged-eval-samples", "256"]
# At the held-out-best control lr (5e-2) the gate keeps every direction; at 2e-1 it closes about 70%
# of them (experiments/results/sweeps/vit_holdout_control_lr), so the filters are compared there, all at that lr.
FILTER_RANK, FILTER_SIZE, FILTER_CONTROL_LR = 8, 50, "2e-1"
LLAMA_RANKS, LLAMA_METHODS = (2, 8), ("lora", "structlora")
LLAMA_BASE = "base model, untrained"
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
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS, RUNS = os.path.join(HERE, "results", "study"), "runs/study"
RESULTS_MD = os.path.join(HERE, "README.md")  # its <!-- v2_* --> blocks are rewritten by `report`
STOP_AT = None  # seconds since the epoch: start no new training run after this (--stop-at HH:MM)


def stop_deadline(hhmm, now):
    """The next time after `now` (seconds since the epoch) that the local clock reads HH:MM."""
    try:
        h, m = (int(x) for x in hhmm.split(":")) if len(hhmm) == 5 and hhmm[2] == ":" else (None, None)
        at = datetime.datetime.fromtimestamp(now).replace(hour=h, minute=m, second=0, microsecond=0)
    except (TypeError, ValueError):
        raise ValueError(f"--stop-at wants a time of day HH:MM, got {hhmm!r}") from None
    return (at if at.timestamp() > now else at + datetime.timedelta(days=1)).timestamp()


def run(script, out, flags, reduce=None):
    """One training run (or its saved metrics), reduced to what the tables need (by `reduce`, default
    summarize). A run killed after writing out/checkpoint.pt (--save-every) continues from there."""
    reduce = reduce or summarize
    path = os.path.join(out, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            return reduce(json.load(f), None, out)
    if STOP_AT and time.time() >= STOP_AT:
        raise SystemExit(f"--stop-at {time.strftime('%H:%M', time.localtime(STOP_AT))}: not starting {out}")
    resume = [f"--resume={out}"] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else []
    t0 = time.time()
    m = script.main(script.parse_args(flags + [f"--out={out}", *resume]))
    return reduce(m, time.time() - t0, out)


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
    llama_base()
    for rank in LLAMA_RANKS:
        for method in LLAMA_METHODS:
            for seed in seeds:
                out = f"{RUNS}/llama/r{rank}_{method}_seed{seed}"
                flags = [f"--rank={rank}", f"--method={method}", f"--seed={seed}", "--generations=0"]
                record("llama", {"rank": rank, "method": method, "seed": seed, **run(train_llama, out, flags)},
                       ("rank", "method", "seed"))


def llama_base():
    """What the adapters add: the base model's own picks (no training step; B = 0, so no update)."""
    m = run(train_llama, f"{RUNS}/llama/base", ["--epochs=0", "--method=lora", "--generations=0"])
    record("llama", {"rank": 0, "method": LLAMA_BASE, "seed": 0, **m}, ("rank", "method", "seed"))


# ----------------------------------------------------------------------------------------------
# Study v2: what the adapters add over the head, peers, more data, Table 6, a ground-truth task

V2 = "runs/study/v2"
R8 = ["--rank=8"]
# Held-out lr search (seed 0, 100 other training images per class), the grid of the first study's
# LoRA search; the head alone trains a freshly initialized linear layer, so its grid sits higher.
LR_GRID = {"head": ("5e-3", "2e-2", "5e-2"), "peft-lora": ("2e-3", "5e-3", "1e-2"),
           "dora": ("2e-3", "5e-3", "1e-2"), "adalora": ("2e-3", "5e-3", "1e-2")}
PEERS = ("peft-lora", "dora", "adalora")
PEER_METHODS = ("head", "lora", "structlora") + PEERS
# Table 6 and the appendix baselines at the setting where StructLoRA did best (r = 8, 50 images/class)
TABLE6 = {
    "lora": ["--method=lora"],
    "structlora (smooth T=1, hybrid)": ["--method=structlora"],
    "smooth T=2": ["--method=structlora", "--graph-layers=2"],
    "smooth T=3": ["--method=structlora", "--graph-layers=3"],
    "gcn T=1": ["--method=structlora", "--coordinator=gcn"],
    "gcn T=2": ["--method=structlora", "--coordinator=gcn", "--graph-layers=2"],
    "gcn T=3": ["--method=structlora", "--coordinator=gcn", "--graph-layers=3"],
    "chain edges": ["--method=structlora", "--edges=chain"],
    "semantic edges": ["--method=structlora", "--edges=semantic"],
    "lora+cos": ["--method=lora+cos"],
    "lora+laplacian": ["--method=lora+laplacian"],
}
PERCENTS = (10, 25, 100)   # % of the 60 000 Fashion-MNIST training images, one epoch each
# One epoch over 10% or more is 188–1875 steps, not ~100: LoRA at 5e-3 diverged after warm-up on 100%
# (experiments/results/study/v2_p100_lora_lr5e-3_killed.txt), so the lr of these runs is chosen again, held-out, at 10%.
FRACTION_LRS = ("1e-3", "2e-3", "5e-3")
# "structlora v1", "ib v1": rows trained with study v1's gate (β = 1e-3 added per step, linear KL warm-up),
# kept beside the per-example gate's rows. The peers part and Table 6 (50 images/class) ran v1's gate too.
# Diagnostics for the fractions (which part of StructLoRA costs accuracy in long runs): `ib` and `graph`
# are methods of train_vit.py; these are methods with one flag changed
FRACTION_VARIANTS = {"ib beta=0": ["--method=ib", "--beta=0"],
                     # the per-example gate at the former control lr (the default until held-out chose 1e-2)
                     "structlora control-lr=5e-2": ["--method=structlora", "--control-lr=5e-2"],
                     "ib control-lr=5e-2": ["--method=ib", "--control-lr=5e-2"],
                     "ib beta=0 control-lr=5e-2": ["--method=ib", "--beta=0", "--control-lr=5e-2"],
                     "graph control-lr=5e-2": ["--method=graph", "--control-lr=5e-2"]}
# The IB gate weighted per example (β·KL/N) and held off during the warm-up: β, π0 and the control lr chosen
# again, one at a time around the ELBO's β = 1, on held-out images at two data sizes (ib-search)
# (around the control lr 5e-2 of that time; 1e-2 won and is now the scripts' default)
C5 = "--control-lr=5e-2"
IB_SEARCH = {"structlora": [C5], "structlora beta=0.1": ["--beta=0.1", C5], "structlora beta=10": ["--beta=10", C5],
             "structlora prior=0.4": ["--prior=0.4", C5], "structlora control-lr=1e-2": ["--control-lr=1e-2"],
             # the gate's sampling noise at 188 steps (what still costs at 10%): a colder Concrete sample
             "structlora control-lr=1e-2 tau=0.2": ["--control-lr=1e-2", "--tau=0.2"],
             "structlora control-lr=1e-2 tau=0.1": ["--control-lr=1e-2", "--tau=0.1"],
             # the gates' start: at σ(φ) = 0.9 every direction is dropped in ~10% of the steps (a rank dropout LoRA
             # does not have); at 0.98 in ~2%. Judged on 300 held-out images per class, 2 seeds (--holdout 300)
             "structlora control-lr=1e-2 gate-init=0.98": ["--control-lr=1e-2", "--gate-init=0.98"],
             # budget mode's margin δ: at δ = 0.5 the closed gates end at φ ≈ −1.05, sampled open in ~26% of the
             # training steps and cut at eval (measured on the 25% budget run of `budgets`); at δ = 2 / 4 in 12 / 2%
             "structlora budget=0.25 margin=0.5": ["--budget=0.25", C5, "--budget-margin=0.5"],
             "structlora budget=0.25 margin=2": ["--budget=0.25", C5, "--budget-margin=2"],
             "structlora budget=0.25 margin=4": ["--budget=0.25", C5, "--budget-margin=4"],
             "lora": ["--method=lora"]}
IB_SEARCH_PERCENTS = (10, 25)
# The paper's filter ablation at matched budgets: StructLoRA holding a share of its directions open (--budget), the
# same coordinator with a top-k-norm or random mask of as many directions per layer as that run kept (--keep-from),
# and AdaLoRA pruned from the same r to the same share; one epoch over 10% of the training set at the fractions' lr
BUDGETS = (25, 50, 75)   # % of the r = 8 directions of every adapted layer kept
BUDGET_PERCENT = 10
# To close, a gate travels from logit 0.9 = 2.2 to below logit 0.5 − δ = −0.5, and Adam moves φ by about the
# control lr a step: at the default 1e-2 that is ~270 steps, and 10% has 169 after the warm-up (measured: at
# a 25% budget all 192 of 192 stayed open, λ rising). At 5e-2 (the former default) ~55 steps; every method of
# this part runs at it (for the masks and AdaLoRA it is only the lr of η)
BUDGET_CONTROL_LR = "5e-2"
BUDGET_METHODS = {
    "structlora": ["--method=structlora", "--budget={budget}"],
    # the margin δ of the first budget runs: closed gates sampled open in ~26% of the training steps (ib-search)
    "structlora margin=0.5": ["--method=structlora", "--budget={budget}", "--budget-margin=0.5"],
    "norm mask": ["--method=graph", "--mask=norm", "--keep-from={gate_run}"],
    "random mask": ["--method=graph", "--mask=random", "--keep-from={gate_run}"],
    "adalora": ["--method=adalora", "--budget={budget}"],
}
GT_N, GT_FLAGS = (256, 64), ["--steps=500", "--lr=2e-2", "--rank=4"]
GT_METHODS = {"lora": ["--method=lora"], "ib": ["--method=ib"], "graph": ["--method=graph"],
              "structlora": ["--method=structlora"], "structlora gcn": ["--method=structlora", "--coordinator=gcn"],
              "lora+laplacian": ["--method=lora+laplacian"]}


def slug(name):
    return name.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "")


def record(name, row, keys):
    """Adds `row` to experiments/results/study/{name}.json, replacing the row with the same values at `keys`; rows of
    other seeds or settings, from earlier calls, stay. Locked: two studies may run side by side."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        save(name, [r for r in load_rows(name) if any(r[k] != row[k] for k in keys)] + [row])


def load_rows(name):
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def held_out_means():
    """{(method, lr): mean held-out accuracy over the seeds} of the lr search."""
    runs = {}
    for r in load_rows("v2_lr"):
        runs.setdefault((r["method"], r["lr"]), []).append(r["accuracy"])
    if not runs:
        raise SystemExit("no held-out lr search: run `python -m experiments.study lr` first")
    return {k: statistics.mean(v) for k, v in runs.items()}


def best_lr(method):
    """The held-out-best lr (python -m experiments.study lr); lora and structlora keep the first study's 5e-3."""
    if method not in LR_GRID:
        return "5e-3"
    means = {lr: acc for (m, lr), acc in held_out_means().items() if m == method}
    if not means:
        raise SystemExit(f"no held-out lr search for {method}: run `python -m experiments.study lr` first")
    return max(means, key=lambda lr: (means[lr], -float(lr)))


def best_peer():
    """The peer with the best held-out accuracy at its best lr (never chosen on the test split)."""
    return max((acc, m) for (m, _), acc in held_out_means().items() if m in PEERS)[1]


def lr_search(seeds=(0,)):
    for method, grid in LR_GRID.items():
        for lr in grid:
            for seed in seeds:
                out = f"{V2}/lr/{method}_lr{lr}_seed{seed}"
                flags = SIZES[50] + R8 + ["--holdout-per-class=100", "--merged-eval-samples=256",
                                          f"--method={method}", f"--lr={lr}", f"--seed={seed}"]
                record("v2_lr", {"method": method, "lr": lr, "seed": seed, **run(train_vit, out, flags, summarize_v2)},
                       ("method", "lr", "seed"))


def vit_n50(flags, name, seed, size=50):
    """One r = 8 run at `size` images/class; Table 6 and the peers share these run folders."""
    out = f"{V2}/n{size}_r8_{slug(name)}_seed{seed}"
    return run(train_vit, out, SIZES[size] + VIT_EVAL + R8 + flags + [f"--seed={seed}"], summarize_v2)


def peers(seeds=SEEDS, sizes=(50, 10), methods=PEER_METHODS):
    for size in sizes:
        for method in methods:
            for seed in seeds:
                lr = best_lr(method)
                m = vit_n50([f"--method={method}", f"--lr={lr}"], method, seed, size)
                record("v2_peers", {"size": size, "method": method, "lr": lr, "seed": seed, **m}, ("size", "method", "seed"))


def table6(seeds=SEEDS, variants=None):
    if unknown := set(variants or ()) - set(TABLE6):
        raise ValueError(f"no Table 6 variant {sorted(unknown)}; there are {list(TABLE6)}")
    shared = ("lora", "structlora (smooth T=1, hybrid)")  # the peers part trains these too: last, so that two
    for name in sorted(variants or TABLE6, key=lambda n: n in shared):  # studies side by side do not train them twice
        flags = TABLE6[name]
        for seed in seeds:
            record("v2_table6", {"variant": name, "seed": seed, **vit_n50(flags, name, seed)}, ("variant", "seed"))


def fraction_flags(percent):
    return ["--shots-per-class=0", f"--train-fraction={percent / 100}", "--epochs=1", "--save-every=100", *R8]


def fraction_lr_search(seeds=(0,)):
    """LoRA's lr for one epoch over 10% of the training set, on 100 other training images per class."""
    for lr in FRACTION_LRS:
        for seed in seeds:
            out = f"{V2}/lr_p10/lora_lr{lr}_seed{seed}"
            flags = fraction_flags(10) + ["--holdout-per-class=100", "--merged-eval-samples=256", "--method=lora",
                                          f"--lr={lr}", f"--seed={seed}"]
            record("v2_fraction_lr", {"method": "lora", "lr": lr, "seed": seed, **run(train_vit, out, flags, summarize_v2)},
                   ("lr", "seed"))


def fraction_lr():
    """The held-out-best lr of fraction_lr_search, used by every method of the fractions part."""
    runs = {}
    for r in load_rows("v2_fraction_lr"):
        runs.setdefault(r["lr"], []).append(r["accuracy"])
    if not runs:
        raise SystemExit("no held-out lr for the fractions: run `python -m experiments.study fraction-lr` first")
    return max(runs, key=lambda lr: (statistics.mean(runs[lr]), -float(lr)))


def ib_search(seeds=(0,), percents=IB_SEARCH_PERCENTS, variants=None, holdout=100):
    """StructLoRA's IB settings on `holdout` other training images per class (never the test split)."""
    lr = fraction_lr()
    for percent in percents:
        for name in variants or IB_SEARCH:
            for seed in seeds:
                out = f"{V2}/ib_search/p{percent}_h{holdout}_{slug(name)}_seed{seed}"
                flags = fraction_flags(percent) + [f"--holdout-per-class={holdout}", "--merged-eval-samples=256",
                                                   "--method=structlora", *IB_SEARCH[name], f"--lr={lr}", f"--seed={seed}"]
                record("v2_ib_search", {"percent": percent, "variant": name, "seed": seed, "holdout_per_class": holdout,
                                        **run(train_vit, out, flags, summarize_v2)},
                       ("percent", "variant", "seed", "holdout_per_class"))


def fractions(seeds=SEEDS, percents=PERCENTS, methods=None):
    methods, lr = methods or ("head", "lora", "structlora", best_peer()), fraction_lr()
    for percent in percents:
        for method in methods:
            for seed in seeds:
                out = f"{V2}/p{percent}_r8_{slug(method)}_lr{lr}_seed{seed}"
                flags = fraction_flags(percent) + [*VIT_EVAL, *FRACTION_VARIANTS.get(method, [f"--method={method}"]),
                                                   f"--lr={lr}", f"--seed={seed}"]
                record("v2_fractions", {"percent": percent, "method": method, "seed": seed,
                                        **run(train_vit, out, flags, summarize_v2)}, ("percent", "method", "seed"))


# The language testbeds at the per-example gate's defaults, StructLoRA against LoRA: the decoder (SmolLM2-135M)
# on fine-food reviews and the LLaVA-style model on easy-VQA, at r = 8, one epoch, the scripts' lr, batch 8, each
# at the largest training set whose 6 runs fit a session on these 2 cores: fine-foods 150 steps (5–9 s a step on
# one thread, 16–20 min a run with its two evaluations of 300 test examples), easy-VQA 400 steps (2.7–3.2 s a step,
# ~20 min a run), its stage 2 from one stage-1 projector trained for 150 steps (1200 examples, seed 0)
LANGUAGE = {"fine-foods": (train_llama, 1200, ["--eval-samples=300", "--generations=0"]),  # (script, training set, flags)
            "easy-vqa": (train_llava, 3200, ["--eval-samples=300"])}
STAGE1_SAMPLES = 1200


def language(seeds=SEEDS, testbeds=tuple(LANGUAGE), methods=("lora", "structlora")):
    for testbed in testbeds:
        script, n, flags = LANGUAGE[testbed]
        if script is train_llava:  # one stage-1 projector (seed 0) shared by every stage-2 run
            stage1 = f"{V2}/language/{testbed}_stage1"
            run(script, stage1, [*flags, "--stage=1", f"--train-samples={STAGE1_SAMPLES}", "--eval-samples=200",
                                 "--save-every=50"], lambda *a: None)
            flags = [*flags, "--stage=2", f"--projector={stage1}/projector.safetensors"]
        flags = [f"--train-samples={n}", *flags]
        for method in methods:
            for seed in seeds:
                out = f"{V2}/language/{testbed}_n{n}_r8_{method}_seed{seed}"
                m = run(script, out, [*flags, *R8, "--save-every=50", f"--method={method}", f"--seed={seed}"],
                        summarize_language)
                record("v2_language", {"testbed": testbed, "method": method, "seed": seed, **m},
                       ("testbed", "method", "seed"))


def summarize_language(m, wall, out):
    keys = ("accuracy", "merged_accuracy", "merged_prediction_agreement", "n_train", "n_eval", "steps")
    return {**{k: m[k] for k in keys}, "train_seconds": m.get("train_seconds", m.get("stage2_seconds")),
            "eval_seconds": m.get("eval_seconds", 0.0), "wall_seconds": wall,
            "open_directions": sum(m["open_directions"].values()),
            "directions": m["args"]["rank"] * len(m["open_directions"])}


def budgets(seeds=(0,), shares=BUDGETS):
    """Accuracy and the budget actually reached (open directions / all) at each share of directions kept. The
    masks keep, per layer, what the StructLoRA run of the same share and seed kept: it runs first."""
    lr = fraction_lr()
    for share in shares:
        for seed in seeds:
            gate_run = budget_run(share, "structlora", lr, seed)
            for method, template in BUDGET_METHODS.items():
                flags = [f.format(budget=share / 100, gate_run=gate_run) for f in template]
                flags = fraction_flags(BUDGET_PERCENT) + [*VIT_EVAL, *flags, f"--control-lr={BUDGET_CONTROL_LR}",
                                                          f"--lr={lr}", f"--seed={seed}"]
                m = run(train_vit, budget_run(share, method, lr, seed), flags, summarize_v2)
                record("v2_budgets", {"budget": share, "method": method, "seed": seed, **m}, ("budget", "method", "seed"))


def budget_run(share, method, lr, seed):
    return f"{V2}/budgets/b{share}_r8_{slug(method)}_lr{lr}_seed{seed}"


def ground_truth(seeds=SEEDS, sizes=GT_N):
    for n in sizes:
        for structure in groundtruth.STRUCTURES:
            for name, flags in GT_METHODS.items():
                for seed in seeds:
                    out = f"{V2}/groundtruth/{structure}_n{n}_{slug(name)}_seed{seed}"
                    m = run(groundtruth, out, GT_FLAGS + flags + [f"--structure={structure}", f"--n-train={n}",
                                                                  f"--seed={seed}"], summarize_groundtruth)
                    record("v2_groundtruth", {"structure": structure, "n_train": n, "method": name, "seed": seed, **m},
                           ("structure", "n_train", "method", "seed"))


def summarize_groundtruth(m, wall, out):
    keys = ("test_loss", "relative_error", "subspace_angle", "train_seconds")
    return {**{k: m[k] for k in keys}, "eval_seconds": 0.0, "wall_seconds": wall,
            "open_directions": sum(m["open_directions"].values()),
            "directions": m["args"]["rank"] * len(m["open_directions"])}


def summarize_v2(m, wall, out):
    """What the v2 tables need from a run of any method; for StructLoRA adapters also the layer × layer
    cosines and the singular-value energy of the trained updates (figures)."""
    graphs = list(m["graphs"].values())
    mean = lambda key: statistics.mean(g[key] for g in graphs) if graphs and graphs[0][key] is not None else None
    row = {"accuracy": m["accuracy"], "merged_agreement": m["merged_prediction_agreement"],
           "train_seconds": m["train_seconds"], "eval_seconds": m["eval_seconds"], "wall_seconds": wall,
           "steps": m["steps"], "n_train": m["n_train"], "trainable_params": m["trainable_params"],
           "open_directions": sum(m["open_directions"].values()),
           "directions": m["args"]["rank"] * len(m["open_directions"]), "eta": mean("eta"),
           "edges": sum(len(g["edges"]) for g in graphs), "semantic_edges": sum(len(g["semantic_edges"]) for g in graphs),
           "adjacent_cosine_before": mean("adjacent_cosine_before"), "adjacent_cosine_after": mean("adjacent_cosine_after")}
    if m["args"]["method"] not in BASELINES:
        row["updates"] = update_stats(out)
    return row


def stand_in(shapes):
    """An nn.Module with a bias-free nn.Linear at every saved layer path ({path: [out, in]}): enough to
    rebuild a saved adapter and compute its updates without the base model's weights."""
    root = nn.Module()
    for name, (n_out, n_in) in shapes.items():
        parent, (*path, leaf) = root, name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(n_in, n_out, bias=False))
    return root


@torch.no_grad()
def trained_updates(run_dir):
    """{graph key: [ΔW^f of each layer, depth order]} in float64 (eval gates, coordinator applied), rebuilt
    from the run's saved adapter on a stand-in of the adapted layers."""
    path = os.path.join(run_dir, "adapter")
    tensors, meta = load_file(os.path.join(path, "adapter_model.safetensors")), read_adapter_config(path)
    saved = tuple(f"{m}." for m in meta["config"]["modules_to_save"])
    cfg = {**meta["config"], "modules_to_save": []}
    slora = StructLoRA(stand_in(meta["layers"]), StructLoRAConfig(**cfg)).double().eval()
    slora.load_adapter_state({k: v for k, v in tensors.items() if not k.startswith(saved)}, {**meta, "config": cfg})
    return {key: [layer.delta_weight() for layer in layers] for key, (layers, _) in slora.groups.items()}


def update_stats(run_dir, top=24):
    """Per graph: the layer × layer cosine of vec(ΔW^f) (paper Fig. 4) and, averaged over layers, the
    share of ‖ΔW^f‖² in its top-k singular values for k = 1..top (Fig. 6)."""
    stats = {}
    for key, deltas in trained_updates(run_dir).items():
        z = F.normalize(torch.stack([d.flatten() for d in deltas]), dim=1)
        energy = torch.stack([torch.linalg.svdvals(d)[:top] ** 2 / d.norm().clamp_min(1e-30) ** 2
                              for d in deltas]).cumsum(1).mean(0)
        stats[key] = {"cosine": (z @ z.T).tolist(), "energy": energy.tolist()}
    return stats


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
    base = [r["accuracy"] for r in rows if r["method"] == LLAMA_BASE]  # one run: no training, nothing random
    lines = [["–", LLAMA_BASE, f"{100 * base[0]:.2f}", "", "", "–", "–"]] if base else []
    for r in LLAMA_RANKS:
        for m in LLAMA_METHODS:
            runs = list(by_seed(rows, rank=r, method=m).values())
            if not runs:
                continue
            cos = [(x["adjacent_cosine_before"], x["adjacent_cosine_after"]) for x in runs if x["eta"] is not None]
            cos = f"{statistics.mean(b for b, _ in cos):.3f} → {statistics.mean(a for _, a in cos):.3f}" if cos else "–"
            lines.append([r, m, *versus_lora(rows, rank=r, method=m),
                          f"{statistics.mean(x['open_directions'] for x in runs):.1f} / {runs[0]['directions']}", cos])
    seeds = sorted({r["seed"] for r in rows if r["method"] != LLAMA_BASE})
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
            print(f"skipping {name}: {path} not found (run `python -m experiments.study {name.replace('vit_', '')}`)")
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
                print("no plot: matplotlib is not installed (pip install -r experiments/requirements.txt)")
    parts.append(f"Training + evaluation time summed over all runs: {total / 60:.0f} min on this machine.\n")
    with open(os.path.join(RESULTS, "tables.md"), "w") as f:
        f.write("\n".join(parts))
    print("\n".join(parts))


# ----------------------------------------------------------------------------------------------
# Study v2 report: every table and figure from experiments/results/study/v2_*.json


def versus(rows, base, **key):
    """(cells, p): mean ± std of `key`'s runs, Δ against the `base` runs on the same seeds, the paired
    t-test's p (None where it is not defined)."""
    runs, ref = by_seed(rows, **key), by_seed(rows, **{**key, **base})
    if not runs:
        return ["–", "", ""], None
    seeds = sorted(set(runs) & set(ref))
    acc = [runs[s]["accuracy"] for s in sorted(runs)]
    if all(key.get(k) == v for k, v in base.items()) or not seeds:
        return [pm(acc), "", ""], None
    a, b = [runs[s]["accuracy"] for s in seeds], [ref[s]["accuracy"] for s in seeds]
    p = paired_t(a, b)[1] if len(seeds) > 1 else None  # one seed: the difference, no test
    return [pm(acc), f"{100 * statistics.mean(x - y for x, y in zip(a, b)):+.2f}", "" if p is None else f"{p:.3f}"], p


def seeds_of(runs):
    return ",".join(str(s) for s in sorted({r["seed"] for r in runs}))


def lr_table(rows, title=("Held-out lr search for the head and the peers (r = 8, 50 images/class, 1000 held-out "
                           "training images)")):
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["lr"]), []).append(r)
    lines = [[m, lr, f"{100 * statistics.mean(r['accuracy'] for r in runs):.2f}", runs[0]["steps"], seeds_of(runs)]
             for (m, lr), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], float(kv[0][1])))]
    return f"### {title}\n\n" + table(["method", "lr", "held-out accuracy %", "steps", "seeds"], lines), []


def fraction_lr_table(rows):
    return lr_table(rows, "Held-out lr for the fractions (LoRA, r = 8, one epoch over 10% of the training images, "
                          "1000 held-out training images)")


def ib_search_table(rows):
    key = lambda r: (r["percent"], r["holdout_per_class"], list(IB_SEARCH).index(r["variant"]), r["seed"])
    lines = [[f"{r['percent']}%", 10 * r["holdout_per_class"], r["variant"], f"{100 * r['accuracy']:.2f}",
              f"{r['open_directions']} / {r['directions']}" if r["directions"] else "–",
              f"{r['train_seconds'] / 60:.1f}", r["seed"]] for r in sorted(rows, key=key)]
    return ("### The IB gate's settings, held-out (β·KL/N, KL held off for 10% of the steps; r = 8, one epoch; "
            "held-out: other training images, never the test split)\n\n" +
            table(["training images", "held-out images", "variant", "held-out accuracy %", "open directions",
                   "train min", "seed"], lines)), []


def peers_table(rows):
    out, tests = [], []
    for size in sorted({r["size"] for r in rows}, reverse=True):
        lines = []
        for m in PEER_METHODS:
            picked = [r for r in rows if (r["size"], r["method"]) == (size, m)]
            if not picked:
                continue
            cells, p = versus(rows, {"method": "lora"}, size=size, method=m)
            head, _ = versus(rows, {"method": "head"}, size=size, method=m)
            tests += [(f"{m}, {size} images/class", p)] if p is not None else []
            lines.append([m, picked[0]["lr"], *cells, head[1], f"{picked[0]['trainable_params']:,}",
                          f"{statistics.mean(r['open_directions'] for r in picked):.1f} / {picked[0]['directions']}"
                          if picked[0]["directions"] else "–",
                          seeds_of(picked)])
        out.append(f"### Peers and the head alone: r = 8, {size} images/class (test accuracy %, 3000 test images)\n\n" +
                   table(["method", "lr", "accuracy", "Δ vs LoRA", "p vs LoRA", "Δ vs head", "trainable",
                          "kept rank", "seeds"], lines))
    return "\n".join(out), tests


def table6_table(rows):
    lines, tests = [], []
    for name in TABLE6:
        runs = list(by_seed(rows, variant=name).values())
        if not runs:
            continue
        cells, p = versus(rows, {"variant": "lora"}, variant=name)
        tests += [(name, p)] if p is not None else []
        fmt = lambda k, f: "–" if runs[0][k] is None else format(statistics.mean(r[k] for r in runs), f)
        lines.append([name, *cells, fmt("eta", ".3f"), fmt("edges", ".1f"), fmt("semantic_edges", ".1f"),
                      f"{statistics.mean(map(adjacent_cosine_of, runs)):.3f}", seeds_of(runs)])
    return ("### Table 6 and the appendix baselines: r = 8, 50 images/class (test accuracy %, 3000 test images)\n\n" +
            table(["variant", "accuracy", "Δ vs LoRA", "p vs LoRA", "η", "edges (q+v)", "semantic edges",
                   "adjacent cosine of the merged ΔW", "seeds"], lines)), tests


def adjacent_cosine_of(row):
    """Mean cosine of vec(ΔW) between depth neighbours, over the graphs, from the run's update stats."""
    return statistics.mean(float(torch.tensor(g["cosine"]).diagonal(1).mean()) for g in row["updates"].values())


def fractions_table(rows):
    lines, tests = [], []
    for percent in sorted({r["percent"] for r in rows}):
        for m in ("head", "lora", "ib v1", "ib", *FRACTION_VARIANTS, "graph", "structlora v1", "structlora") + PEERS:
            runs = [r for r in rows if (r["percent"], r["method"]) == (percent, m)]
            if not runs:
                continue
            cells, p = versus(rows, {"method": "lora"}, percent=percent, method=m)
            head, _ = versus(rows, {"method": "head"}, percent=percent, method=m)
            tests += [(f"{m}, {percent}%", p)] if p is not None else []
            etas = [r["eta"] for r in runs if r["eta"] is not None]
            lines.append([f"{percent}% ({runs[0]['n_train']:,})", runs[0]["steps"], m, *cells, head[1],
                          f"{statistics.mean(r['open_directions'] for r in runs):.0f} / {runs[0]['directions']}"
                          if runs[0]["directions"] else "–", f"{statistics.mean(etas):.2f}" if etas else "–",
                          f"{statistics.mean(r['train_seconds'] for r in runs) / 60:.1f}", seeds_of(runs)])
    return ("### Table 4 at a real scale: r = 8, one epoch over a share of the 60 000 training images (test "
            "accuracy %, 3000 test images)\n\n" +
            table(["training images", "steps", "method", "accuracy", "Δ vs LoRA", "p vs LoRA", "Δ vs head",
                   "open directions", "η", "train min / run", "seeds"], lines)), tests


def budgets_table(rows):
    lines, tests = [], []
    for share in sorted({r["budget"] for r in rows}):
        for m in BUDGET_METHODS:
            runs = [r for r in rows if (r["budget"], r["method"]) == (share, m)]
            if not runs:
                continue
            cells, p = versus(rows, {"method": "structlora"}, budget=share, method=m)
            tests += [(f"{m} at a {share}% budget", p)] if p is not None else []
            reached = [r["open_directions"] / r["directions"] for r in runs]
            lines.append([f"{share}%", m, *cells, f"{statistics.mean(r['open_directions'] for r in runs):.0f} / "
                          f"{runs[0]['directions']} ({100 * statistics.mean(reached):.1f}%)", seeds_of(runs)])
    return ("### The gate at matched budgets: r = 8, one epoch over 10% of the training images, a share of the "
            f"directions kept, control lr {BUDGET_CONTROL_LR} (test accuracy %, 3000 test images)\n\n" +
            table(["budget", "method", "accuracy", "Δ vs StructLoRA", "p vs StructLoRA", "open directions (reached)",
                   "seeds"], lines)), tests


def language_table(rows):
    lines, tests = [], []
    for testbed in LANGUAGE:
        for m in ("lora", "structlora"):
            runs = [r for r in rows if (r["testbed"], r["method"]) == (testbed, m)]
            if not runs:
                continue
            cells, p = versus(rows, {"method": "lora"}, testbed=testbed, method=m)
            tests += [(f"{m} on {testbed}", p)] if p is not None else []
            lines.append([testbed, f"{runs[0]['n_train']:,}", runs[0]["steps"], runs[0]["n_eval"], m, *cells,
                          f"{statistics.mean(r['open_directions'] for r in runs):.0f} / {runs[0]['directions']}",
                          f"{statistics.mean(r['train_seconds'] for r in runs) / 60:.1f}", seeds_of(runs)])
    return ("### The language testbeds: r = 8, one epoch (test accuracy %)\n\n" +
            table(["testbed", "training examples", "steps", "test examples", "method", "accuracy", "Δ vs LoRA",
                   "p vs LoRA", "open directions", "train min / run", "seeds"], lines)), tests


def gt_cell(runs, key, digits):
    values = [r[key] for r in runs]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def groundtruth_table(rows):
    lines, tests = [], []
    for n in sorted({r["n_train"] for r in rows}, reverse=True):
        for structure in groundtruth.STRUCTURES:
            lora = by_seed(rows, n_train=n, structure=structure, method="lora")
            for name in GT_METHODS:
                runs = by_seed(rows, n_train=n, structure=structure, method=name)
                if not runs:
                    continue
                seeds = sorted(set(runs) & set(lora))
                p = None
                if name != "lora" and len(seeds) > 1:
                    p = paired_t([runs[s]["relative_error"] for s in seeds], [lora[s]["relative_error"] for s in seeds])[1]
                    tests.append((f"ground truth {structure}, n = {n}, {name}", p))
                r = list(runs.values())
                lines.append([n, structure, name, gt_cell(r, "test_loss", 3), gt_cell(r, "relative_error", 3),
                              "" if p is None else f"{p:.3f}", gt_cell(r, "subspace_angle", 1),
                              f"{statistics.mean(x['open_directions'] for x in r):.1f} / {r[0]['directions']}",
                              seeds_of(r)])
    return ("### Ground truth: a planted ΔW* on a frozen random 12-block network (d = 32, r = 4, planted rank 2)\n\n" +
            table(["samples", "structure", "method", "test loss (frozen = 1)", "‖ΔW − ΔW*‖/‖ΔW*‖",
                   "p vs LoRA (rel. error)", "subspace angle °", "kept rank", "seeds"], lines)), tests


def holm(tests, alpha=0.05):
    """Holm–Bonferroni over all v2 comparisons: the ones that stay significant at family-wise `alpha`."""
    kept = []
    for i, (name, p) in enumerate(sorted(tests, key=lambda t: t[1])):
        if p > alpha / (len(tests) - i):
            break
        kept.append(f"{name} (p = {p:.4f})")
    raw = sum(p < alpha for _, p in tests)
    return (f"Multiple comparisons: {len(tests)} paired t-tests in the v2 tables, {raw} with p < {alpha}; "
            f"after Holm–Bonferroni at family-wise {alpha}: {', '.join(kept) if kept else 'none'}.\n")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_cosine(rows, path, seed=0):
    """Paper Fig. 4: layer × layer cosine of vec(ΔW^f), LoRA vs StructLoRA, same seed, one panel per graph."""
    picked = {m: by_seed(rows, size=50, method=m).get(seed) for m in ("lora", "structlora")}
    if not all(r and "updates" in r for r in picked.values()):
        return False
    plt, keys = pyplot(), list(picked["lora"]["updates"])
    fig, axes = plt.subplots(2, len(keys), figsize=(5.4 * len(keys), 8), squeeze=False)
    for i, (m, r) in enumerate(picked.items()):
        for j, key in enumerate(keys):
            c = torch.tensor(r["updates"][key]["cosine"])
            im = axes[i][j].imshow(c.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
            axes[i][j].set(title=f"{m}, {key}: adjacent cos {torch.diagonal(c, 1).mean():.2f}", xlabel="layer",
                           ylabel="layer", xticks=range(0, len(c), 2), yticks=range(0, len(c), 2))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(f"cosine of the trained updates between layers (r = 8, 50 images/class, seed {seed})")
    fig.savefig(path, dpi=110)
    return True


def plot_energy(rows, path, variants=("lora", "structlora (smooth T=1, hybrid)", "gcn T=1", "lora+laplacian")):
    """Paper Fig. 6: share of ‖ΔW‖² in the top-k singular values, mean over layers, graphs and seeds."""
    curves = {}
    for name in variants:
        runs = [r for r in rows if r["variant"] == name and "updates" in r]
        per = [torch.tensor(g["energy"]) for r in runs for g in r["updates"].values()]
        if per:
            curves[name] = (torch.stack([p[:min(map(len, per))] for p in per]).mean(0), len(runs))
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (curve, n) in curves.items():
        ax.plot(range(1, len(curve) + 1), 100 * curve.numpy(), marker=".", label=f"{name} ({n} seeds)")
    ax.axvline(8, color="gray", ls=":")
    ax.set(xlabel="k (top singular values)", ylabel="% of ‖ΔW‖² covered", title="energy of the trained updates, r = 8")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_fractions(frac_rows, peer_rows, path):
    """Accuracy vs share of the training set; 50 images/class (0.83%, six epochs) from the peers part."""
    v1 = lambda r: {**r, "method": "structlora v1"} if r["method"] == "structlora" else r  # the peers ran v1's gate
    points = [(100 * 500 / 60000, v1(r)) for r in peer_rows if r["size"] == 50] + [(r["percent"], r) for r in frac_rows]
    if not frac_rows:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in PEER_METHODS + ("structlora v1",):
        xs = sorted({x for x, r in points if r["method"] == m})
        ys = [mean_sd([100 * r["accuracy"] for x2, r in points if r["method"] == m and x2 == x]) for x in xs]
        if xs:
            ax.errorbar(xs, [y for y, _ in ys], [sd for _, sd in ys], marker="o", capsize=3, label=m)
    ax.set(xscale="log", xlabel="% of the 60 000 training images", ylabel="test accuracy %",
           title="DINOv2-S on Fashion-MNIST, r = 8 (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_groundtruth(rows, path):
    if not rows:
        return False
    plt = pyplot()
    ns = sorted({r["n_train"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 3.8), squeeze=False)
    width = 0.8 / len(GT_METHODS)
    for ax, n in zip(axes[0], ns):
        for k, name in enumerate(GT_METHODS):
            cells = [(i, [r["relative_error"] for r in rows if (r["n_train"], r["structure"], r["method"]) == (n, s, name)])
                     for i, s in enumerate(groundtruth.STRUCTURES)]
            cells = [(i, v) for i, v in cells if v]
            if cells:
                ys = [mean_sd(v) for _, v in cells]
                ax.bar([i + k * width for i, _ in cells], [y for y, _ in ys], width, yerr=[s for _, s in ys], label=name)
        ax.set(xticks=[i + 0.4 - width / 2 for i in range(3)], xticklabels=groundtruth.STRUCTURES,
               ylabel="‖ΔW − ΔW*‖ / ‖ΔW*‖", title=f"{n} training samples")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def fill_results(blocks):
    """Replaces each `<!-- name -->…<!-- /name -->` block of RESULTS_MD by the freshly built table `name`."""
    if not os.path.isfile(RESULTS_MD):
        return
    with open(RESULTS_MD) as f:
        text = f.read()
    for name, md in blocks.items():
        begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if begin in text and end in text:
            text = text[:text.index(begin) + len(begin)] + "\n" + md + text[text.index(end):]
    with open(RESULTS_MD, "w") as f:
        f.write(text)


def report_v2():
    """The v2 tables (experiments/results/study/tables_v2.md, and their blocks in experiments/README.md) and figures, from
    whatever v2 runs are saved."""
    blocks, tests, seconds = {}, [], 0.0
    for name, make in (("v2_lr", lr_table), ("v2_peers", peers_table), ("v2_table6", table6_table),
                       ("v2_fraction_lr", fraction_lr_table), ("v2_ib_search", ib_search_table),
                       ("v2_fractions", fractions_table), ("v2_budgets", budgets_table), ("v2_language", language_table),
                       ("v2_groundtruth", groundtruth_table)):
        rows = load_rows(name)
        if not rows:
            print(f"skipping {name}: no runs saved yet")
            continue
        blocks[name], found = make(rows)
        tests += found
        seconds += sum(r["train_seconds"] + r["eval_seconds"] for r in rows)
    if tests:
        blocks["v2_holm"] = holm(tests)
    blocks["v2_time"] = f"Training + evaluation time summed over all saved v2 runs: {seconds / 60:.0f} min.\n"
    try:
        made = [plot_cosine(load_rows("v2_peers"), os.path.join(RESULTS, "cosine_heatmaps.png")),
                plot_energy(load_rows("v2_table6"), os.path.join(RESULTS, "energy_coverage.png")),
                plot_fractions(load_rows("v2_fractions"), load_rows("v2_peers"), os.path.join(RESULTS, "fractions.png")),
                plot_groundtruth(load_rows("v2_groundtruth"), os.path.join(RESULTS, "groundtruth.png"))]
        print(f"{sum(made)} of 4 v2 figures written")
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -r experiments/requirements.txt)")
    with open(os.path.join(RESULTS, "tables_v2.md"), "w") as f:
        f.write("\n".join(blocks.values()))
    fill_results(blocks)
    print("\n".join(blocks.values()))


def reports():
    """The first study's tables, then v2's."""
    report()
    report_v2()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["vit", "filter", "investigate", "llama", "lr", "peers", "table6", "fraction-lr",
                                    "ib-search", "fractions", "budgets", "language", "groundtruth", "report", "all"])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of the training runs (default 0 1 2; lr, fraction-lr, ib-search, budgets: 0)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="budgets: %% of the directions kept (default 25 50 75)")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 10], help="peers: images per class")
    p.add_argument("--percents", type=int, nargs="+", default=None,
                   help="fractions (default 10 25 100), ib-search (default 10 25): %% of the training set")
    p.add_argument("--methods", nargs="+", default=None, help="peers, table6, fractions, ib-search, language: only these methods/variants")
    p.add_argument("--samples", type=int, nargs="+", default=list(GT_N), help="groundtruth: training samples")
    p.add_argument("--testbeds", nargs="+", choices=list(LANGUAGE), default=None, help="language: only these")
    p.add_argument("--holdout", type=int, default=100, help="ib-search: held-out training images per class")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when two studies run side by side)")
    p.add_argument("--stop-at", default=None, help="HH:MM: start no new training run after this time of day")
    args = p.parse_args()
    STOP_AT = args.stop_at and stop_deadline(args.stop_at, time.time())
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = tuple(args.seeds or ((0,) if args.part in ("lr", "fraction-lr", "ib-search", "budgets") else SEEDS))
    parts = {"vit": lambda: vit_grid(seeds), "filter": lambda: vit_filter(seeds), "investigate": lambda: investigate(seeds),
             "llama": lambda: llama(seeds), "lr": lambda: lr_search(seeds),
             "peers": lambda: peers(seeds, args.sizes, args.methods or PEER_METHODS),
             "table6": lambda: table6(seeds, args.methods), "fraction-lr": lambda: fraction_lr_search(seeds),
             "ib-search": lambda: ib_search(seeds, args.percents or IB_SEARCH_PERCENTS, args.methods, args.holdout),
             "fractions": lambda: fractions(seeds, args.percents or PERCENTS, args.methods),
             "budgets": lambda: budgets(seeds, args.budgets or BUDGETS),
             "language": lambda: language(seeds, args.testbeds or tuple(LANGUAGE), args.methods or ("lora", "structlora")),
             "groundtruth": lambda: ground_truth(seeds, args.samples), "report": reports}
    for part in (["vit", "filter", "investigate", "llama", "lr", "peers", "table6", "fraction-lr", "ib-search", "fractions",
                  "budgets", "language", "groundtruth", "report"] if args.part == "all" else [args.part]):
        parts[part]()
