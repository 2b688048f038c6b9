"""ObGD, the overshooting-bounded step of streaming deep RL (Elsayed, Vasan and Mahmood 2024), with one
eligibility trace per objective and env.

For objective k (critic, actor) and env b, with TD error δ_b and gradient ∇_kb:

    z_kb ← decay · z_kb + ∇_kb
    α_kb = lr / max(1, κ_k · max(|δ_b|, 1) · lr · ‖z_kb‖₁)
    Δθ   = (1/B) Σ_k Σ_b α_kb δ_b z_kb          (``env_update: mean``; ``sum`` drops the 1/B)

The bound keeps a single step from overshooting the TD target whatever the trace's size. The caller
applies Δθ (through ``Learner.apply_gradients``) and zeroes the traces of envs whose episode ended.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def obgd_update(traces: Tensor, grads: Tensor, delta: Tensor, decay: float, lr: float, kappa: Tensor,
                env_update: str = "mean") -> tuple[Tensor, Tensor]:
    """Per-env eligibility traces and ObGD steps, one per objective k; the mean step over envs.

    ``traces`` (updated in place) and ``grads``: [K, B, P]; ``delta``: [B]; ``kappa``: [K]. With
    z ← decay·z + ∇ and α_kb = lr / max(1, κ_k·max(|δ_b|, 1)·lr·‖z_kb‖₁), returns the parameter step
    (1/B) Σ_k Σ_b α_kb δ_b z_kb [P] and the step sizes α [K, B]."""
    traces.mul_(decay).add_(grads)
    l1 = traces.abs().sum(-1)
    step_size = lr / (kappa.unsqueeze(1) * delta.abs().clamp(min=1.0) * lr * l1).clamp(min=1.0)
    weight = step_size * delta / (delta.shape[0] if env_update == "mean" else 1)
    update = torch.einsum("kb,kbp->p", weight, traces)
    return update, step_size
