"""--budget b: StructLoRA keeps round(b·n) of all n = L·r gates; AdaLoRA (training/baselines.py) gets
target_r = round(b·r) per layer, and peft budgets target_r·L in total. They differ whenever b·r is not an integer."""
import sys; sys.path.insert(0, "tests")
import torch
from structlora import StructLoRA, StructLoRAConfig
from training.baselines import peft_config
from toy import ToyModel
r, layers = 8, 12  # ToyModel: 6 blocks × (q_proj, v_proj)
for b in (0.1, 0.3, 0.5, 0.9):
    s = StructLoRA(ToyModel(d=16, n_layers=6), StructLoRAConfig(r=r, alpha=16, budget=b, num_train_examples=10))
    phi = torch.cat([l.gate_logits for l in s.lora_layers.values()])
    k = s._budget_ranks(phi)[1]
    target_r = peft_config("adalora", r, 16, ["q_proj", "v_proj"], [], 100, b).target_r
    print(f"budget {b}: StructLoRA keeps {k} of {phi.numel()}, AdaLoRA total budget {target_r * layers} "
          f"({'MISMATCH' if k != target_r * layers else 'same'})")
