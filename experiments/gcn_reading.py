"""Float64 checks of the numbers docs/paper.md states about the GCN reading (§3, "The GCN's h·Θ and σ
act on factors" and "The GCN's message is (Â − I)·h"). Runs in seconds on a CPU:

    python -m experiments.gcn_reading
"""
import numpy as np
import torch
import torch.nn as nn

from structlora import StructLoRA, StructLoRAConfig, propagation_matrix


def chain(n):
    adj = np.diag(np.ones(n - 1), 1)
    return adj + adj.T


def literal_form_is_scaled_smoothing(rng, n=12, out=64, r=8, eta=0.3):
    """h + Â·h·η·I equals (1 + η)·smooth(η/(1 + η)); equal states stay equal under rw, not under sym."""
    adj = chain(n)
    adj[2, 7] = adj[7, 2] = 1
    for norm in ("rw", "sym"):
        A = propagation_matrix(torch.tensor(adj), norm).numpy()
        H = rng.standard_normal((n, out, r))
        literal = H + eta * np.einsum("ij,jor->ior", A, H)
        e = eta / (1 + eta)
        scaled = (1 + eta) * ((1 - e) * H + e * np.einsum("ij,jor->ior", A, H))
        same = np.repeat(rng.standard_normal((1, out, r)), n, 0)
        after = same + eta * np.einsum("ij,jor->ior", A, same)
        print(f"{norm}: literal − (1+η)·smooth(η/(1+η)): {np.abs(literal - scaled).max() / np.abs(literal).max():.1e}; "
              f"spread of equal states after it: {np.abs(after - after[0]).max() / np.abs(after).max():.1e}")


def theta_cannot_absorb(rng, n=12, out=64, r=8, eta=0.1):
    """The best Θ' with Â·H·Θ' ≈ (Â − I)·H·η for random states H: relative residual."""
    A = propagation_matrix(torch.tensor(chain(n)), "rw").numpy()
    H = rng.standard_normal((n, out, r))
    X = np.einsum("ij,jor->ior", A, H).reshape(-1, r)
    Y = eta * np.einsum("ij,jor->ior", A - np.eye(n), H).reshape(-1, r)
    theta = np.linalg.lstsq(X, Y, rcond=None)[0]
    print(f"best Θ' leaves a relative residual of {np.linalg.norm(X @ theta - Y) / np.linalg.norm(Y):.3f}")


def split_change(act, scale, theta_kind, g_kind, r=4):
    """Relative change of every ΔW^f when each layer's factors are re-split B → B·G, A → G⁻¹·A."""
    torch.manual_seed(0)
    model = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(16, 16)}) for _ in range(5))
    slora = StructLoRA(model, StructLoRAConfig(r=r, alpha=2 * r, ib=False, coordinator="gcn", gcn_activation=act,
                                               target_modules=("q_proj",), semantic_every=0)).double().eval()
    g = torch.Generator().manual_seed(1)
    eye = torch.eye(r, dtype=torch.float64)
    with torch.no_grad():
        for layer in slora.lora_layers.values():
            layer.lora_B.copy_(scale * torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
        for theta in slora.graphs["q_proj"].coordinator.theta:
            noise = 0.05 * torch.randn(r, r, generator=g, dtype=torch.float64)
            theta.copy_(0.1 * eye + (noise if theta_kind == "full" else noise.diagonal().diag()))
        before = torch.stack([layer.delta_weight() for layer in slora.lora_layers.values()])
        for layer in slora.lora_layers.values():
            R = torch.randn(r, r, generator=g, dtype=torch.float64)
            G = eye + 0.5 * R if g_kind == "full" else R.diagonal().exp().diag()
            layer.lora_B.copy_(layer.lora_B @ G)
            layer.lora_A.copy_(torch.linalg.solve(G, layer.lora_A))  # B·A, the gated update, is unchanged
        after = torch.stack([layer.delta_weight() for layer in slora.lora_layers.values()])
    return ((after - before).norm() / before.norm()).item()


def main():
    rng = np.random.default_rng(0)
    literal_form_is_scaled_smoothing(rng)
    theta_cannot_absorb(rng)
    for act in ("identity", "tanh"):
        for scale in (1.0, 0.01):
            print(f"σ={act}, B entries ~{scale}: re-split changes ΔW^f by {split_change(act, scale, 'full', 'full'):.2f} "
                  f"(Θ = 0.1·I + 0.05·noise, G = I + 0.5·noise); diagonal Θ and G: "
                  f"{split_change(act, scale, 'diag', 'diag'):.1e}")
    for z in (1e-1, 1e-2):
        v = z * rng.standard_normal(10000)
        print(f"entries ~{z}: ‖tanh z − z‖/‖z‖ = {np.linalg.norm(np.tanh(v) - v) / np.linalg.norm(v):.1e}")


if __name__ == "__main__":
    main()
