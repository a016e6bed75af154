"""What a training run needs beyond one process's loop: torchrun, each rank's share of a batch,
gathering, rank-0 writing, and checkpoints that resume exactly.

    torchrun --nproc_per_node 4 train_llama.py ...          # DDP: every rank holds the whole model
    torchrun --nproc_per_node 4 train_llama.py --fsdp ...   # FSDP2: the frozen base sharded by block

Every rank sees the global batches of a one-process run, in the same order, and takes a contiguous
part of each; its loss is weighted so that the average over ranks (what DDP does to gradients) is
the global batch's loss. So `--method lora` trains the same adapter on any number of processes.
Under --fsdp the trained parameters (adapters, gates, coordinators, modules_to_save: a few MB) are
left out of FSDP (`ignored_params`) and stay whole on every rank, so a coordinator can read every
layer's factors inside any layer's forward; `sync_gradients` averages their gradients.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: F401 (the scripts' __main__)

from structlora import StructLoRA, saved_config, with_saved_margin

CHECKPOINT = "checkpoint.pt"
# Arguments that say where and how a run executes, not what it trains: they may change on --resume
FREE_ON_RESUME = {"out", "resume", "save_every", "device", "fsdp", "grad_checkpointing", "generations", "export_peft",
                  "eval_samples", "test_samples", "merged_eval_samples", "save_merged", "given"}


def add_args(p):
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the frozen base weights over the processes (FSDP2) instead of DDP")
    p.add_argument("--save-every", type=int, default=0, help="also write RUN_DIR/checkpoint.pt every N steps")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run whose checkpoint.pt is in RUN_DIR (and write there)")


def given_flags(parser, argv=None):
    """The destinations of the options actually written on the command line (not left at their
    default): on --resume only these are compared with the run's, the others are taken from it."""
    defaults = {a.dest: a.default for a in parser._actions}
    for a in parser._actions:
        a.default = argparse.SUPPRESS  # an option not given then leaves no attribute at all
    try:
        given = parser.parse_args(argv)
    finally:
        for a in parser._actions:
            a.default = defaults[a.dest]
    return sorted(vars(given))


def check_run_args(args):
    """Flags every script shares, refused with their name before anything is loaded."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be 1 or more")
    if args.epochs < 0:
        raise ValueError(f"--epochs {args.epochs}: must be 0 or more")
    if args.save_every < 0:
        raise ValueError(f"--save-every {args.save_every}: must be 0 (a checkpoint at the end only) or more")


def setup(args):
    """Joins torchrun's process group when launched by it (gloo on CPU; nccl on CUDA, on the device of
    LOCAL_RANK) and returns this rank's device (--device, or cuda:LOCAL_RANK). Checks, before anything is
    loaded, the shared flags and that the ranks can split --batch-size evenly."""
    check_run_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the {world} processes: each "
                         "rank takes an equal share of every global batch")
    if "WORLD_SIZE" not in os.environ:
        if args.fsdp:
            raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node N")
        return args.device
    cuda = args.device.startswith("cuda")
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else args.device
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Rank 0 alone writes the run folder, prints, and shows progress bars."""
    return rank() == 0


def local_part(n):
    """(lo, hi, w): this rank's part [lo, hi) of a global batch of n examples, and the weight w of its
    summed loss, to be divided by the global batch's count (examples or tokens): w = world size, so that
    the ranks' average is the global mean. A rank left without examples (a last batch shorter than the
    world) takes example 0 with w = 0: every rank must run each forward and backward (collectives)."""
    r, k = rank(), world()
    lo, hi = n * r // k, n * (r + 1) // k
    return (lo, hi, k) if hi > lo else (0, 1, 0)


def global_batches(items, batch_size, epochs, shuffle):
    """The global batches of a one-process run, in order: each epoch's `shuffle(items)` (a new order
    from the run's one generator) cut into pieces of batch_size, the last one shorter. Every rank walks
    this list and takes its local_part of each batch; a resumed run rebuilds it whole, so it draws the
    orders of the epochs it skips and continues the same sequence."""
    return [order[i:i + batch_size] for order in (shuffle(items) for _ in range(epochs))
            for i in range(0, len(items), batch_size)]


def gather(items):
    """Every rank's [(global index, value)] as one list of values in index order."""
    if world() > 1:
        parts = [None] * world()
        dist.all_gather_object(parts, items)
        items = [x for part in parts for x in part]
    return [v for _, v in sorted(items, key=lambda x: x[0])]


def wrap(module, blocks, args):
    """The module the training forward calls: `module` itself in one process; DDP of it under torchrun;
    with --fsdp, `module` with each of `blocks` and then the rest (the root) sharded by FSDP2, except the
    trained parameters. A block or root sharded before (an earlier stage) is left as it is."""
    if not dist.is_initialized():
        return module
    device = torch.device(args.device)
    if not args.fsdp:
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    mesh = init_device_mesh(device.type, (world(),))
    trained = {p for p in module.parameters() if p.requires_grad}
    for m in [*blocks, module]:
        if not isinstance(m, FSDPModule):
            fully_shard(m, mesh=mesh, ignored_params=trained)
    return module


def sync_gradients(opt, args):
    """--fsdp: average the gradients of the optimizer's (replicated) parameters over the ranks, one
    all-reduce per dtype. A missing gradient is sent as zeros, so every rank sends the same tensors;
    one that no rank has stays None, so AdamW skips that parameter as it would in one process."""
    if not (args.fsdp and dist.is_initialized()):
        return  # one process, or DDP did it during backward
    params = [p for g in opt.param_groups for p in g["params"]]
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(present)
    for dtype in sorted({p.dtype for p in params}, key=str):
        group = [p for p in params if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in group])
        dist.all_reduce(flat)
        flat /= world()
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad = g.view_as(p)
    for p, n in zip(params, present.tolist()):
        if n == 0:
            p.grad = None


def merge(adapter, args, fresh_base):
    """adapter.merge_and_unload(). Under --fsdp W0 exists only as shards, so the adapter is merged into a
    fresh unsharded base built by `fresh_base()` instead (no gradients, no optimizer: inference memory)."""
    if not args.fsdp:
        return adapter.merge_and_unload()
    tensors, meta = adapter.adapter_state()
    fresh = StructLoRA(fresh_base(), saved_config(meta["config"]))
    fresh.load_adapter_state(tensors, meta)
    return fresh.merge_and_unload()


# ----------------------------------------------------------------------------------------------
# Checkpoints: RUN_DIR/checkpoint.pt, every --save-every steps and at the end of training


def rng_state(device):
    cuda = torch.device(device).type == "cuda"
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}


def checkpoint(args, step, total, adapter, opt, sched, **extra):
    """After step `step` (from 1) of `total`: save_checkpoint if it is a multiple of --save-every or the last."""
    if step == total or (args.save_every > 0 and step % args.save_every == 0):
        save_checkpoint(args, step, adapter, opt, sched, **extra)


def save_checkpoint(args, step, adapter, opt, sched, **extra):
    """Everything needed to continue exactly: the adapter (adapter_state(): factors, gates, edges, sketch
    EMA, step count), optimizer, scheduler, every rank's RNG state, the step (the position in the data
    order) and the arguments. Written to a temporary file, then renamed: a run killed while saving
    keeps its last good checkpoint. Call it on every rank (it gathers the RNG states)."""
    rngs = [None] * world()
    if world() > 1:
        dist.all_gather_object(rngs, rng_state(args.device))
    else:
        rngs = [rng_state(args.device)]
    if not is_main():
        return
    state = {"step": step, "args": vars(args), "world_size": world(), "rng": rngs,
             "adapter": adapter.adapter_state() if adapter is not None else None,
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **extra}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, CHECKPOINT)
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(args):
    """(checkpoint, run folder): the checkpoint of --resume RUN_DIR after checking that this run trains the
    same thing, and RUN_DIR, where the run continues; (None, --out) without --resume. Call it before
    loading the model: it fails fast. Flags not typed on this command line take the run's own values (in
    `args`): `--resume RUN_DIR` alone continues the same run."""
    if not args.resume:
        return None, args.out
    path = os.path.join(args.resume, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {args.resume}: no {CHECKPOINT} there")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ours, saved = vars(args), ckpt["args"]
    saved = with_saved_margin(saved)  # a budget run saved before --budget-margin existed: the δ it trained at
    given = set(ours.get("given", ours))  # without a record of the given flags (args built in code): all
    compared = [k for k in sorted(set(saved) | set(ours)) if k not in FREE_ON_RESUME and k in given]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (this run: {ours.get(k)!r})"
            for k in compared if not same_value(saved.get(k), ours.get(k))]
    if diff:
        raise ValueError(f"cannot resume {args.resume}: it was trained with " + ", ".join(diff))
    for k in (set(saved) & set(ours)) - FREE_ON_RESUME - given:
        setattr(args, k, saved[k])  # not given now (e.g. --bf16, resolved from --device): the run's own
    return ckpt, args.resume


def same_value(a, b):
    """Equal, or two paths to the same existing file or folder (runs/x and ./runs/x)."""
    if a == b:
        return True
    paths = isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
    return paths and os.path.samefile(a, b)


def restore(ckpt, adapter, opt, sched, device):
    """Loads a checkpoint's adapter, optimizer, scheduler and this rank's RNG state; returns its step.
    With another world size every rank takes rank 0's RNG state (exact only for the deterministic parts)."""
    if adapter is not None:
        adapter.load_adapter_state(*ckpt["adapter"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"][rank() if len(ckpt["rng"]) == world() else 0]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return ckpt["step"]
