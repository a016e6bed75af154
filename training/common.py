"""What the training scripts share: the --method switch, StructLoRA's options, the export flags,
the LR schedule and autocast."""
import argparse
import math
from contextlib import nullcontext

import torch

from training.baselines import BASELINES
from structlora import MAX_BUDGET_MARGIN, StructLoRA, StructLoRAConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype of a frozen base
# --method -> (ib, graph, reg): the paper's four ablation rows and the appendix's two static baselines
METHODS = {"lora": (False, False, "none"), "ib": (True, False, "none"), "graph": (False, True, "none"),
           "structlora": (True, True, "none"), "lora+cos": (False, False, "cos"),
           "lora+laplacian": (False, False, "laplacian")}


def add_method_args(p, rank=8, baselines=False):
    """baselines=True also offers training/baselines.py's methods (the head alone; peft's LoRA, DoRA, AdaLoRA)."""
    d = StructLoRAConfig()
    p.add_argument("--method", default="structlora", choices=list(METHODS) + (list(BASELINES) if baselines else []))
    p.add_argument("--rank", type=int, default=rank)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2·rank, the paper's α/r = 2)")
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--beta", type=float, default=d.beta,
                   help="IB penalty weight β on the whole training set (per step β·KL/N; 1 = the ELBO's)")
    p.add_argument("--ib-weighting", default=d.ib_weighting, choices=["example", "step"],
                   help="example: β·KL/N per step (N training examples); step: β·KL per step (study v1)")
    p.add_argument("--budget", type=float, default=d.budget,
                   help="share of directions to keep open, held by Lagrange multipliers (0: off); "
                        "with --method adalora: its target rank, round(budget·rank) per layer on average")
    p.add_argument("--budget-lr", type=float, default=d.budget_lr, help="dual-ascent rate of the budget's multipliers")
    p.add_argument("--budget-margin", type=float, default=d.budget_margin,
                   help="δ: gates held this far (logit) on their side of logit(prune_below)")
    p.add_argument("--prior", type=float, default=d.prior, help="IB prior π0 of an open direction")
    p.add_argument("--gate-init", type=float, default=d.gate_init, help="σ(φ) of every gate at step 0")
    p.add_argument("--tau", type=float, default=d.tau, help="Concrete temperature τ")
    p.add_argument("--kl-warmup", type=float, default=0.1, help="share of steps before the KL term starts")
    p.add_argument("--kl-schedule", default=d.kl_schedule, choices=["hold", "linear"],
                   help="hold: KL off during the warm-up, then β; linear: β ramps up over it (study v1)")
    p.add_argument("--eta-init", type=float, default=d.eta_init, help="initial smoothing step η")
    p.add_argument("--semantic-every", type=int, default=d.semantic_every, help="K: steps between edge rebuilds")
    p.add_argument("--semantic-topk", type=int, default=d.semantic_topk)
    p.add_argument("--semantic-threshold", type=float, default=d.semantic_threshold)
    p.add_argument("--coordinator", default=d.coordinator, choices=["smooth", "gcn"],
                   help="smooth: residual Laplacian step; gcn: the paper's GCN with learnable Θ and σ")
    p.add_argument("--graph-layers", type=int, default=d.graph_layers, help="T message-passing layers")
    p.add_argument("--edges", default=d.edges, choices=["hybrid", "chain", "semantic"],
                   help="chain ∪ semantic, depth neighbours only, or gradient-similarity edges only")
    p.add_argument("--gcn-activation", default=d.gcn_activation, choices=["tanh", "identity"])
    p.add_argument("--reg-weight", type=float, default=d.reg_weight,
                   help="weight of the static regularizer of --method lora+cos / lora+laplacian")
    p.add_argument("--control-lr", type=float, default=1e-2,
                   help="learning rate of the gate and smoothing logits φ, ψ (see StructLoRA.param_groups)")
    p.add_argument("--warmup", type=float, default=0.06, help="share of steps with linear LR warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")


def check_method_args(p, args):
    """The method flags of add_method_args, refused with their name (p.error) before anything is loaded."""
    if not 0 <= args.kl_warmup < 1:
        p.error(f"--kl-warmup {args.kl_warmup}: the share of steps before the KL term (and a --budget) starts, "
                "in [0, 1); to train without the KL use --beta 0")
    if not 0 <= args.budget < 1:
        p.error(f"--budget {args.budget}: the share of directions kept open, in [0, 1) (0: off)")
    if args.budget > 0 and args.method not in ("ib", "structlora", "adalora"):
        p.error(f"--budget {args.budget}: --method {args.method} keeps every direction; a budget needs an IB "
                "method (ib, structlora) or adalora")
    for flag, value, low in (("--beta", args.beta, 0.0), ("--budget-lr", args.budget_lr, None),
                             ("--budget-margin", args.budget_margin, None),
                             ("--control-lr", args.control_lr, None)):
        if not (math.isfinite(value) and (value >= low if low is not None else value > 0)):
            p.error(f"{flag} {value}: must be finite and " + ("≥ 0" if low is not None else "> 0"))
    if args.budget_margin > MAX_BUDGET_MARGIN:
        p.error(f"--budget-margin {args.budget_margin}: at most {MAX_BUDGET_MARGIN:g} (a logit: σ(±50) is 0 or 1 "
                "in float32, a larger margin overflows the budget's loss)")


def make_adapter(model, args, total_steps, n_train, modules_to_save=()):
    """StructLoRA for the methods of METHODS; the head alone or a peft peer (training/baselines.py) otherwise."""
    if args.method in BASELINES:
        if getattr(args, "export_peft", False):
            raise SystemExit(f"--export-peft writes StructLoRA's ΔW^f; --method {args.method} has none "
                             "(the peft peers save a peft adapter anyway)")
        from training.baselines import Baseline
        return Baseline(model, args.method, args.rank, args.alpha or 2.0 * args.rank,
                        args.target_modules.split(","), modules_to_save, total_steps, args.budget)
    return StructLoRA(model, structlora_config(args, total_steps, n_train, modules_to_save))


def add_export_args(p):
    p.add_argument("--save-merged", action="store_true",
                   help="write OUT/merged/: the merged model as a Hugging Face folder (transformers, llama.cpp)")
    p.add_argument("--export-peft", action="store_true",
                   help="write OUT/peft_adapter/: ΔW^f as a PEFT LoRA adapter on the Hugging Face base model")


def structlora_config(args, total_steps, n_train, modules_to_save=()):
    """The config of --method; n_train weighs the IB penalty (β·KL/n_train): the count the task loss is a mean
    over, for one epoch of all ranks: training examples (train_vit), answer tokens (train_llama, train_llava),
    examples × outputs (experiments/groundtruth.py's MSE)."""
    ib, graph, reg = METHODS[args.method]
    return StructLoRAConfig(
        r=args.rank, alpha=args.alpha or 2.0 * args.rank, target_modules=tuple(args.target_modules.split(",")),
        modules_to_save=modules_to_save, ib=ib, graph=graph, reg=reg, reg_weight=args.reg_weight,
        coordinator=args.coordinator, graph_layers=args.graph_layers, edges=args.edges,
        gcn_activation=args.gcn_activation, beta=args.beta, ib_weighting=args.ib_weighting,
        num_train_examples=n_train, budget=args.budget, budget_lr=args.budget_lr, budget_margin=args.budget_margin,
        prior=args.prior, tau=args.tau, gate_init=args.gate_init,
        kl_warmup_steps=int(args.kl_warmup * total_steps), kl_schedule=args.kl_schedule, eta_init=args.eta_init,
        semantic_every=args.semantic_every, semantic_topk=args.semantic_topk,
        semantic_threshold=args.semantic_threshold, seed=args.seed)


def optimizer(param_groups, args, total_steps):
    """§4: AdamW (0.9, 0.999) with weight decay, linear warm-up then cosine decay."""
    opt = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, args.warmup))


def parameter_counts(adapter):
    """(trainable, total) parameter counts of a wrapped model: StructLoRA or a baseline."""
    params = adapter.trainable_parameters()
    n_train = sum(p.numel() for p in params)
    frozen = sum(unpacked_numel(p) for p in adapter.parameters() if not p.requires_grad)
    return n_train, n_train + frozen


def unpacked_numel(p):
    """A parameter's element count; for a bitsandbytes 4-bit weight (two per byte), before packing."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def lr_lambda(total, warmup):
    """Linear warm-up over `warmup`·total steps, then cosine decay to 0."""
    w = max(1, int(total * warmup))
    return lambda s: (s + 1) / w if s < w else max(0.0, 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, total - w))))


def autocast(args):
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.bf16 else nullcontext()


def print_adapter_summary(m, args):
    """The part of the one-screen summary that is the same for every model family."""
    if args.method in ("ib", "structlora"):
        print(f"open directions per layer (of {args.rank}): {list(m['open_directions'].values())}")
    for key, d in m["graphs"].items():
        mix = f"η={d['eta']:.3f}" if d["eta"] is not None else d["coordinator"]
        print(f"graph {key}: {mix}, T={d['graph_layers']}, semantic edges {d['semantic_edges']}, drift energy "
              f"{d['drift_energy_before']:.3g} → {d['drift_energy_after']:.3g}, adjacent cosine "
              f"{d['adjacent_cosine_before']:.3f} → {d['adjacent_cosine_after']:.3f}")
