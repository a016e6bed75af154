"""--resume with a changed typed flag (--budget, --ib-weighting, --kl-schedule, --budget-lr, --control-lr)."""
import os, tempfile, torch
import train_vit
from training import distributed
d = tempfile.mkdtemp()
old = train_vit.parse_args(["--budget", "0.5", "--out", d])
torch.save({"args": vars(old)}, os.path.join(d, "checkpoint.pt"))
for argv in (["--budget", "0.3"], ["--ib-weighting", "step"], ["--kl-schedule", "linear"], ["--budget-lr", "1"],
             ["--control-lr", "0.05"], []):
    a = train_vit.parse_args(["--resume", d] + argv)
    try:
        distributed.load_checkpoint(a)
        print(argv, "-> resumed with budget", a.budget, "ib_weighting", a.ib_weighting, "control_lr", a.control_lr)
    except ValueError as e:
        print(argv, "-> refused:", str(e)[len(d) + 16:])
