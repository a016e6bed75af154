"""A wrapper cast whole to bf16 (slora.to(torch.bfloat16)) accumulates λ in bf16: the dual ascent stalls."""
import sys; sys.path.insert(0, "tests")
import torch
from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    s = StructLoRA(ToyModel(d=8, n_layers=2), StructLoRAConfig(r=4, alpha=8, target_modules=("v_proj",), graph=False,
                   budget=0.5, num_train_examples=8)).to(dtype)
    for _ in range(2000):  # gates held at init (all open): λ_close rises by budget_lr·2.7 per step
        s._budget_ascent()
    print(dtype, "λ after 2000 violated steps:", s.budget_lambda.tolist(), "(exact: %.1f)" % (2000 * 0.1 * (2.197 + 0.5)))
