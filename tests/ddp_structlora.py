"""Run by test_distributed.py under torchrun: DDP(StructLoRA(toy model)) with default arguments, trained
on different data on every rank, semantic edges rebuilt every 2 steps, one direction pruned, half the
directions held open by the budget's multipliers; rank 0
writes what every rank ended with to the JSON file argv[1]."""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
slora = StructLoRA(ToyModel(d=16, n_layers=5), StructLoRAConfig(
    r=4, modules_to_save=("head",), num_train_examples=64, budget=0.5,
    semantic_every=2, semantic_threshold=-1.0))  # -1: every top-k pair is an edge
with torch.no_grad():
    next(iter(slora.lora_layers.values())).gate_logits[0] = -4.0  # pruned at eval, still trained
ddp = DistributedDataParallel(slora)
opt = torch.optim.AdamW(slora.trainable_parameters(), lr=3e-2)
g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
for step in range(10):
    x, y = torch.randn(4, 6, 16, generator=g), torch.randint(0, 3, (4,), generator=g)
    loss = F.cross_entropy(ddp(x), y) + slora.aux_loss()
    loss.backward()
    opt.step(), opt.zero_grad(), slora.step()
slora.eval()
with torch.no_grad():
    out = slora(torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(7)))
mine = {"adj": {k: g.adj.tolist() for k, g in slora.graphs.items()}, "out": out.tolist(),
        "open": slora.open_directions(), "budget_lambda": slora.budget_lambda.tolist()}
parts = [None] * dist.get_world_size()
dist.all_gather_object(parts, mine)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(parts, f)
dist.destroy_process_group()
