"""Runs train_vit.py over a grid of settings and seeds; writes every run's metrics and a table.

    python -m experiments.sweep_vit --grid lr=1e-3,2e-3,5e-3 --grid method=lora,structlora --seeds 0 1 \
        --out experiments/results/sweeps/vit_lr -- --rank 2 --holdout-per-class 50

Arguments after `--` go to every run. Choose hyper-parameters with --holdout-per-class (held-out
training images), never on the test split.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time

import train_vit


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=[], help="name=v1,v2,... (train_vit.py option, '-' as '_')")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True, help="results folder: runs.json (every run) and table.md")
    p.add_argument("--runs-dir", default=None, help="run folders (adapters etc.); default runs/<out's name>")
    args = p.parse_args(own)
    axes = [(g.split("=")[0], g.split("=")[1].split(",")) for g in args.grid]
    os.makedirs(args.out, exist_ok=True)
    runs_dir = args.runs_dir or os.path.join("runs", os.path.basename(os.path.normpath(args.out)))
    rows, t0 = [], time.time()
    for values in itertools.product(*[v for _, v in axes]):
        setting = dict(zip([k for k, _ in axes], values))
        for seed in args.seeds:
            name = "_".join(f"{k}{v}" for k, v in setting.items()) + f"_seed{seed}"
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in setting.items()]
            run_args = train_vit.parse_args(rest + flags + [f"--seed={seed}", f"--out={runs_dir}/{name}"])
            m = train_vit.main(run_args)
            rows.append({**setting, "seed": seed, "accuracy": m["accuracy"], "split": m["split"],
                         "train_seconds": m["train_seconds"],
                         "open_directions": sum(m["open_directions"].values())})
            with open(os.path.join(args.out, "runs.json"), "w") as f:
                json.dump(rows, f, indent=1)
    table = summarize(rows, [k for k, _ in axes])
    table += f"\n{len(rows)} runs, {time.time() - t0:.0f}s in all; command: python -m experiments.sweep_vit {' '.join(argv)}\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)


def summarize(rows, keys):
    """Mean ± std accuracy per setting (over seeds), as a Markdown table."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(100 * r["accuracy"])
    split = rows[0]["split"] if rows else "?"
    lines = ["| " + " | ".join(keys) + f" | {split} accuracy % (mean ± std) | seeds |",
             "|" + "---|" * (len(keys) + 2)]
    for key, accs in groups.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append("| " + " | ".join(key) + f" | {statistics.mean(accs):.2f} ± {sd:.2f} | {len(accs)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
