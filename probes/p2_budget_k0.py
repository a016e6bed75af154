"""Budget mode: round(budget·n) == 0 is accepted silently and then closes EVERY direction (ΔW = 0 at eval).
Python's round() is banker's rounding: budget 0.125 of n=4 gates keeps 0, budget 0.375 keeps 2."""
import sys; sys.path.insert(0, "tests")
import torch
from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel

for budget in (0.1, 0.125, 0.375):
    torch.manual_seed(0)
    m = ToyModel(d=8, n_layers=2)
    s = StructLoRA(m, StructLoRAConfig(r=2, alpha=4, target_modules=("v_proj",), graph=False, budget=budget,
                                       num_train_examples=64, kl_warmup_steps=0))
    phi = torch.cat([l.gate_logits for l in s.lora_layers.values()])
    print(f"budget={budget}: n={phi.numel()}, k=round({budget*phi.numel()})={s._budget_ranks(phi)[1]} (accepted)")
# train the k=0 case on a task where every direction carries signal
torch.manual_seed(0)
m = ToyModel(d=8, n_layers=2)
s = StructLoRA(m, StructLoRAConfig(r=2, alpha=4, target_modules=("v_proj",), graph=False, budget=0.1,
                                   num_train_examples=64, kl_warmup_steps=0))
opt = torch.optim.AdamW(s.param_groups(1e-2, 5e-2, 0.0))
x, y = torch.randn(64, 4, 8), torch.randn(64, 3)
for _ in range(200):
    loss = (s(x) - y).square().mean() + s.aux_loss()
    loss.backward(); opt.step(); s.step(); opt.zero_grad()
print("after 200 steps: open directions", s.open_directions(), "lambda", s.budget_lambda.tolist())
