"""The baselines that are not StructLoRA, behind the few calls a training script makes on a StructLoRA
wrapper (forward, aux_loss, step, param_groups, save_adapter, merge_and_unload, ...):

    head       the new head trained alone, no adapter: what the adapters add is measured against it
    peft-lora  peft's LoRA on the same q/v layers, same r and α
    dora       peft's DoRA (use_dora=True): LoRA on the direction, a learned magnitude per output
    adalora    peft's AdaLoRA: SVD-form P·Λ·Q, ranks pruned from init_r = 1.5·r to an average of r, or with a
               budget b (StructLoRA's --budget) from r to an average of round(b·r)

and the filter baselines of §5 (train_vit.py --mask): mask_directions fixes a StructLoRA without IB
gate to keep the top-k-norm or k random directions per layer.

peft wraps any nn.Module by target names, so these run on our own model classes. peft is a
study/test dependency (requirements-dev.txt): imported only when a peer is asked for.
"""
import os

import torch
import torch.nn as nn

BASELINES = ("head", "peft-lora", "dora", "adalora")


def peft_config(method, r, alpha, target_modules, modules_to_save, total_steps, budget=0.0):
    """peft's config for a peer at LoRA's budget. AdaLoRA: target_r = r, so the final total rank
    Σ_ℓ r_ℓ = r × (number of adapted layers) equals LoRA's; it starts at init_r = 1.5·r (its paper's
    12 → 8) and prunes between 10% and 80% of training (tinit, tfinal), reallocating every 5%. With a
    budget b > 0 (StructLoRA's share of open directions) it starts where StructLoRA does, at init_r = r,
    and keeps target_r = round(b·r) per layer on average: the same rank budget, allotted across layers."""
    try:
        import peft
    except ImportError as e:
        raise SystemExit(f"--method {method} needs peft: pip install -r requirements-dev.txt") from e
    common = dict(target_modules=list(target_modules), modules_to_save=list(modules_to_save) or None,
                  lora_dropout=0.0, bias="none")
    if method == "adalora":
        init_r, target_r = (r, round(budget * r)) if budget > 0 else (r + r // 2, r)
        if target_r < 1:
            raise SystemExit(f"--budget {budget} of rank {r} keeps no direction: AdaLoRA needs target_r ≥ 1")
        return peft.AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, total_step=total_steps,
                                  tinit=int(0.1 * total_steps), tfinal=int(0.2 * total_steps),
                                  deltaT=max(1, int(0.05 * total_steps)), **common)
    return peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=method == "dora", **common)


class Baseline(nn.Module):
    """The head alone or a peft peer, with StructLoRA's training-script interface."""

    def __init__(self, model, method, r, alpha, target_modules, modules_to_save, total_steps, budget=0.0):
        super().__init__()
        if method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
        if budget > 0 and method != "adalora":
            raise ValueError(f"a budget of directions needs an IB method or adalora; {method} keeps every direction")
        self.method, self.steps, self.modules_to_save = method, 0, tuple(modules_to_save)
        if method == "head":
            if not modules_to_save:
                raise ValueError("--method head trains modules_to_save alone; the model has none")
            model.requires_grad_(False)
            for name in modules_to_save:
                model.get_submodule(name).requires_grad_(True)
            self.model = model
        else:
            from peft import get_peft_model
            self.model = get_peft_model(model, peft_config(method, r, alpha, target_modules, modules_to_save,
                                                           total_steps, budget))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def aux_loss(self):
        """AdaLoRA's orthogonality penalty on P and Q (peft adds it only to outputs that carry a .loss,
        which our models' logits do not): w·mean ‖PPᵀ − I‖_F, ‖QᵀQ − I‖_F, as in peft's forward."""
        zero = self.trainable_parameters()[0].new_zeros(())
        if self.method != "adalora":
            return zero
        terms = [torch.linalg.matrix_norm(p @ p.T - torch.eye(len(p), device=p.device)) if ".lora_A." in n else
                 torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1], device=p.device))
                 for n, p in self.model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)]
        return self.model.peft_config["default"].orth_reg_weight * torch.stack(terms).mean()

    def step(self):
        """Once per optimizer step, after backward and before zero_grad: AdaLoRA reads the gradients to
        score and prune its singular values."""
        if self.method == "adalora":
            self.model.base_model.update_and_allocate(self.steps)
        self.steps += 1

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr, control_lr, weight_decay):
        return [{"params": self.trainable_parameters(), "lr": lr, "weight_decay": weight_decay}]

    def open_directions(self):
        """Kept rank per adapted layer: AdaLoRA's non-zero singular values, r for LoRA and DoRA."""
        if self.method == "head":
            return {}
        from peft.tuners.tuners_utils import BaseTunerLayer
        prefix = "base_model.model."
        return {n[len(prefix):]: int((m.lora_E["default"] != 0).sum()) if self.method == "adalora" else m.r["default"]
                for n, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)}

    def diagnostics(self):
        return {}

    def adapter_state(self):
        """(tensors, meta) for checkpoints: the trained parameters and the step count."""
        tensors = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        return tensors, {"format": "baseline", "method": self.method, "steps": self.steps}

    @torch.no_grad()
    def load_adapter_state(self, tensors, meta):
        if meta.get("format") != "baseline" or meta["method"] != self.method:
            raise ValueError(f"checkpoint holds {meta.get('method', meta.get('format'))!r}, not {self.method!r}")
        if self.method == "adalora":  # its sensitivity EMAs live in peft's RankAllocator, not in parameters
            raise ValueError("resuming AdaLoRA is not supported: peft's rank allocator state is not saved")
        own = dict(self.named_parameters())
        if set(tensors) != {n for n, p in own.items() if p.requires_grad}:
            raise ValueError(f"checkpoint parameters differ: {sorted(set(tensors) ^ set(own))[:8]}")
        for n, v in tensors.items():
            own[n].copy_(v)
        self.steps = meta["steps"]

    def save_adapter(self, path):
        os.makedirs(path, exist_ok=True)
        if self.method == "head":
            from safetensors.torch import save_file
            save_file({f"{m}.{k}": v.contiguous().cpu() for m in self.modules_to_save
                       for k, v in self.model.get_submodule(m).state_dict().items()},
                      os.path.join(path, "head.safetensors"))
        else:
            self.model.save_pretrained(path)

    def merge_and_unload(self):
        return self.model if self.method == "head" else self.model.merge_and_unload()


@torch.no_grad()
def mask_directions(adapter, keep, rule, generator=None):
    """Filter baselines (§5): fix each layer's mask of a StructLoRA wrapper (ib=False) to keep[name]
    directions, those with the largest ‖b_j‖·‖a_j‖ = ‖b_j a_jᵀ‖_F (rule "norm", top-k-norm) or random
    ones (rule "random"). The mask is a buffer of each layer: saved, loaded and merged with it."""
    if adapter.merged:
        raise RuntimeError("this StructLoRA wrapper was merged by merge_and_unload(); use the model it returned")
    if adapter.cfg.ib:
        raise ValueError("mask_directions() replaces the IB gate: use it with ib=False")
    if rule not in ("norm", "random"):
        raise ValueError(f"rule must be 'norm' or 'random', got {rule!r}")
    layers = adapter.lora_layers
    if set(keep) != set(layers):
        raise ValueError(f"keep must name every adapted layer; missing {sorted(set(layers) - set(keep))[:4]}, "
                         f"unknown {sorted(set(keep) - set(layers))[:4]}")
    for name, layer in layers.items():
        k = keep[name]
        if not 0 <= k <= layer.r:
            raise ValueError(f"keep[{name!r}] = {k} is outside [0, {layer.r}]")
        if rule == "norm":
            score = layer.lora_B.norm(dim=0) * layer.lora_A.norm(dim=1)
        else:
            score = torch.rand(layer.r, generator=generator).to(layer.mask.device)
        layer.mask.zero_()[score.topk(k).indices] = 1.0
