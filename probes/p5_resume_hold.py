"""Warm-up hold and budget λ across save/restore (adapter_state and state_dict)."""
import sys; sys.path.insert(0, "tests")
import torch
from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel

def make():
    torch.manual_seed(0)
    return StructLoRA(ToyModel(d=8, n_layers=3), StructLoRAConfig(r=2, alpha=4, target_modules=("v_proj",),
                      budget=0.5, num_train_examples=64, kl_warmup_steps=4, semantic_every=2))
a = make()
opt = torch.optim.AdamW(a.param_groups(1e-2, 5e-2, 0.0))
x, y = torch.randn(64, 4, 8), torch.randn(64, 3)
for i in range(3):
    (a(x).square().mean() + a.aux_loss()).backward(); opt.step(); a.step(); opt.zero_grad()
print("at step 3: warm", a._kl_warmup(), "ib_loss", a.ib_loss().item())
b = make(); b.load_adapter_state(*a.adapter_state())
print("adapter_state resume: steps", b.steps, "warm", b._kl_warmup(), "ib_loss", b.ib_loss().item())
for i in range(3):
    for s in (a, b):
        (s(x).square().mean() + s.aux_loss()).backward(); s.step(); s.zero_grad()
print("λ after 3 more steps: a", a.budget_lambda.tolist(), "b", b.budget_lambda.tolist())
c = make(); c.load_state_dict(a.state_dict())
print("state_dict resume: steps", c.steps, "λ", c.budget_lambda.tolist())
# an older state_dict (before budget_lambda existed) no longer loads:
sd = a.state_dict(); sd.pop("budget_lambda")
try:
    make().load_state_dict(sd); print("old state_dict loads")
except Exception as e:
    print("old state_dict (no budget_lambda, budget off):", type(e).__name__, str(e)[:120])
