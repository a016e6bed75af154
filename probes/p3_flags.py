"""Script flags that are accepted although they break the run (train_vit's parser; llama/llava share add_method_args)."""
import math
import train_vit
from training.common import structlora_config

def try_cfg(argv, total=100, n=500):
    args = train_vit.parse_args(argv)
    try:
        c = structlora_config(args, total, n)
        return f"ACCEPTED kl_warmup_steps={c.kl_warmup_steps} of {total}, beta={c.beta}, budget_lr={c.budget_lr}"
    except Exception as e:
        return f"refused: {type(e).__name__}: {e}"

for argv in (["--kl-warmup", "1.0", "--budget", "0.5"], ["--kl-warmup", "3"], ["--kl-warmup", "-0.005"],
             ["--kl-warmup", "-0.5"], ["--beta", "nan"], ["--budget-lr", "nan", "--budget", "0.5"],
             ["--budget-lr", "inf", "--budget", "0.5"], ["--budget", "0.5", "--method", "lora"]):
    print(" ".join(argv), "->", try_cfg(argv))
