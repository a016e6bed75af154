"""Run by test_distributed.py under torchrun: DDP(StructLoRA(toy model)) with default arguments, trained
on different data on every rank, semantic edges rebuilt every 2 steps, one direction pruned, half the
directions held open by the budget's multipliers; then a second
model that each rank trains alone (its own process group). Rank 0 writes what every rank ended with to
the JSON file argv[1]. The test imports build/batches/train for the one-process reference."""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel


def build(process_group=None):
    torch.manual_seed(0)
    slora = StructLoRA(ToyModel(d=16, n_layers=5), StructLoRAConfig(
        r=4, modules_to_save=("head",), num_train_examples=64, budget=0.5, semantic_every=2,
        semantic_threshold=-1.0),  # -1: every top-k pair is an edge
        process_group=process_group)
    with torch.no_grad():
        next(iter(slora.lora_layers.values())).gate_logits[0] = -4.0  # pruned at eval, still trained
    return slora


def batches(seed, steps=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(steps)]


def train(slora, forward, data):
    opt = torch.optim.AdamW(slora.trainable_parameters(), lr=3e-2)
    for x, y in data:
        loss = F.cross_entropy(forward(x), y) + slora.aux_loss()
        loss.backward()
        opt.step()
        slora.step()
        opt.zero_grad(set_to_none=True)


def state(slora):
    slora.eval()
    with torch.no_grad():
        out = slora(torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(7)))
    return {"adj": {k: g.adj.tolist() for k, g in slora.graphs.items()}, "out": out.tolist(),
            "open": slora.open_directions(), "ema": {k: g.sketch_ema.tolist() for k, g in slora.graphs.items()},
            "budget_lambda": slora.budget_lambda.tolist()}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    slora = build()
    train(slora, DistributedDataParallel(slora), batches(100 + rank))  # different data on every rank
    mine = state(slora)
    alone_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    alone = build(process_group=alone_groups[rank])
    train(alone, alone, batches(200 + rank))  # no collective: a rank training its own model
    mine["alone"] = state(alone)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(parts, f)
    dist.destroy_process_group()
