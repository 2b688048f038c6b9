"""Exact RTRL for the CfC cell (``rlmem.memory.cfc_cell``), whose Jacobian in h is dense.

Write the step h_t = F(h_{t−1}, x_t; θ) and the sensitivities J_t = ∂h_t/∂θ [B, n, p] (p parameters).
They obey

    J_t = D_t J_{t−1} + I_t,    D_t = ∂F/∂h_{t−1} [B, n, n] (dense),   I_t = ∂F/∂θ (immediate),

with D_t zeroed for env b when it resets before step t. The parameter gradient of a loss with direct
errors e_t = ∂L/∂h_t is G = Σ_t e_tᵀ J_t. Over a window of T steps the recursion has the closed form

    J_T = Φ_{T,0} J_0 + Σ_t Φ_{T,t} I_t,      Φ_{T,t} = D_T ⋯ D_{t+1},

and G = μ_0ᵀ J_0 + Σ_t λ_tᵀ I_t with the adjoint λ_t = e_t + D_{t+1}ᵀ λ_{t+1}, μ_0 = D_1ᵀ λ_1. The
second term of G is the within-window gradient that autograd computes; the first is injected at h_0
from the carried J_0 (:class:`CarriedSensitivity`). For J_T (:func:`advance_sensitivities`) the
window runs backwards once with the n rows of Φ_{T,t} as cotangents: pulling them back through step t
(:func:`pullback`) yields Φ_{T,t} I_t (accumulated into J_T) and Φ_{T,t} D_t = Φ_{T,t−1}.

For the recurrent weights R = (U Vᵀ) ⊙ M: ∂a_i/∂U_ik = Σ_j M_ij V_jk h_j and ∂a_i/∂V_jk = M_ij U_ik h_j.
With no mask (s = 0) these are (Vᵀh)_k and U_ik h_j, outer products of the rank-r factors; with a
mask, Σ_t Φ_{T,t} ∂F/∂R is summed over the window first and projected on U and V once.

Cost per env: O(n·p) per step plus O(n²·p) per window for Φ_{T,0} J_0 (the per-step form, T = 1,
costs O(n²·p)); the rank-r factors enter as outer products of size n·(m + n)·r when s = 0, and through
the masked R (n·m·n per step, projected on U, V once per window) when s > 0. Memory: the
sensitivities, n·p floats per env, plus the window's activations; constant in the episode length.
:func:`check_budget` caps n·p·B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlmem.errors import ConfigError
from rlmem.memory.cfc_cell import CfCCell, Weights


@dataclass
class StepRecord:
    """What one step leaves for the sensitivity pass (detached)."""

    x: Tensor  # [B, D]
    h: Tensor  # h_{t−1} after the reset [B, n]
    dt: Tensor | None  # [B, 1]
    layer_pre: list[Tensor]  # backbone pre-activations [B, m], l = 1..L (layer_pre[0] = a)
    layer_out: list[Tensor]  # backbone outputs φ(pre) [B, m], l = 1..L
    heads: Tensor  # head pre-activations p [B, k, n]


def record_step(
    w: Weights, x: Tensor, h: Tensor, dt: Tensor | None, layer_pre: list[Tensor], layer_out: list[Tensor], heads: Tensor
) -> StepRecord:
    """The record of a step from its inputs ``x`` [B, D], h_{t−1} [B, n] and what ``CfCCell.step`` returned."""
    return StepRecord(
        x=x.detach(),
        h=h.detach(),
        dt=dt,
        layer_pre=[t.detach() for t in layer_pre] if w.head is not None else [],
        layer_out=[t.detach() for t in layer_out],
        heads=heads.detach(),
    )


def pullback(
    cell: CfCCell, w: Weights, rec: StepRecord, cot: Tensor
) -> tuple[dict[str, tuple[Tensor, Tensor | None]], Tensor, Tensor]:
    """Pull C cotangents ``cot`` [B, C, n] on h' back through one step (reverse mode, no autograd).

    Returns ``(pieces, cot_a, cot_h)``: ``pieces[name] = (rows [B, C, *rows], inputs [B, cols] | None)``
    so that cotᵀ ∂h'/∂θ = rows ⊗ inputs for a weight and = rows for a bias or an element-wise
    parameter; ``cot_a`` [B, C, m] is the cotangent on the first layer's pre-activation a (the
    recurrent factors are handled by the caller); ``cot_h`` [B, C, n] = cot · D (before the reset).
    """
    B, C, n = cot.shape
    slopes, d_amplitude, d_tau = cell.slopes(rec.heads, rec.dt, w)
    cot_heads = (cot.unsqueeze(2) * slopes.unsqueeze(1)).reshape(B, C, cell.num_heads * n)
    pieces: dict[str, tuple[Tensor, Tensor | None]] = {}
    if cell.mode == "pure":
        pieces["amplitude"] = (cot * d_amplitude.unsqueeze(1), None)
        pieces["tau"] = (cot * d_tau.unsqueeze(1), None)
    if w.head is None:
        cot_a = cot_heads
    else:
        pieces["head.weight"] = (cot_heads, rec.layer_out[-1])
        pieces["head.bias"] = (cot_heads, None)
        cot_z = cot_heads @ w.head[0]
        for layer in range(cell.backbone_layers - 1, -1, -1):
            cot_pre = cot_z * cell.activation_slope(rec.layer_pre[layer]).unsqueeze(1)
            if layer == 0:
                break
            pieces[f"backbone.{layer - 1}.weight"] = (cot_pre, rec.layer_out[layer - 1])
            pieces[f"backbone.{layer - 1}.bias"] = (cot_pre, None)
            cot_z = cot_pre @ w.backbone[layer - 1][0]
        cot_a = cot_pre
    pieces["input_weight"] = (cot_a, rec.x)
    pieces["input_bias"] = (cot_a, None)
    return pieces, cot_a, cot_a @ w.recurrent


def advance_sensitivities(
    cell: CfCCell,
    w: Weights,
    records: list[StepRecord],
    keep: Tensor,
    sensitivities: dict[str, Tensor],
    factors: tuple[Tensor, Tensor],
    mask: Tensor,
    sparse: bool,
) -> dict[str, Tensor]:
    """J_T = Φ_{T,0} J_0 + Σ_t Φ_{T,t} I_t for the window (see the module docstring).

    ``w``: the window's weights (detached); ``keep``: [T, B], 0 where an env resets before step t;
    ``sensitivities``: J_0 by parameter name, [B, n, *shape]; ``factors``: (U [m, r], V [n, r]),
    detached; ``mask``: M [m, n]; ``sparse``: whether M removes connections (s > 0). The backward
    sweep over the window collects each step's Φ_{T,t}-weighted injection factors; each weight's Σ_t
    is then one batched matrix product over t instead of T passes over J.
    """
    first = records[0].h
    B, n = first.shape[0], cell.hidden_size
    u, v = factors
    new = {name: torch.zeros_like(s) for name, s in sensitivities.items()}
    rows_of: dict[str, list[Tensor]] = {}  # per weight: Φ_{T,t}-weighted rows [B, n, rows], t = T..1
    inputs_of: dict[str, list[Tensor]] = {}  # and the matching inputs [B, cols]
    cot = torch.eye(n, dtype=first.dtype, device=first.device).expand(B, n, n)  # Φ_{T,T} = I
    for t in range(len(records) - 1, -1, -1):
        rec = records[t]
        pieces, cot_a, cot_h = pullback(cell, w, rec, cot)
        if sparse:
            # Σ_t Φ_{T,t} ∂F/∂R, projected on U and V once the window is summed
            pieces["recurrent"] = (cot_a, rec.h)
        else:
            # ∂a_i/∂U_ik = (Vᵀh)_k and ∂a_i/∂V_jk = U_ik h_j: outer products of the rank-r factors
            pieces["recurrent_u"] = (cot_a, rec.h @ v)
            pieces["recurrent_v.transposed"] = (cot_a @ u, rec.h)
        for name, (rows, inputs) in pieces.items():
            if inputs is None:
                new[name].add_(rows)
            else:
                rows_of.setdefault(name, []).append(rows)
                inputs_of.setdefault(name, []).append(inputs)
        cot = cot_h * keep[t].view(B, 1, 1).to(cot_h.dtype)  # Φ_{T,t−1} = Φ_{T,t} D̃_t
    for name, rows in rows_of.items():
        injected = torch.bmm(torch.stack(rows, dim=-1).flatten(1, 2), torch.stack(inputs_of[name], dim=1))
        injected = injected.view(B, n, rows[0].shape[-1], -1)  # [B, n, rows, cols]
        if name == "recurrent":
            masked = injected * mask
            new["recurrent_u"] += masked @ v
            new["recurrent_v"] += masked.transpose(-1, -2) @ u
        elif name == "recurrent_v.transposed":
            new["recurrent_v"] += injected.transpose(-1, -2)
        else:
            new[name] += injected
    for name, carried in sensitivities.items():  # Φ_{T,0} J_0
        new[name].view(B, n, -1).baddbmm_(cot, carried.view(B, n, -1))
    return new


class CarriedSensitivity(torch.autograd.Function):
    """h_0 as a function of θ through the carried sensitivities J_0 = ∂h_0/∂θ.

    Forward returns h_0 unchanged; backward maps the cotangent μ_0 [B, n] on h_0 to Σ_b μ_0[b]ᵀ J_0[b]
    on each parameter: the part of the exact gradient that reaches back before the window.
    """

    @staticmethod
    def forward(ctx, h0: Tensor, sensitivities: list[Tensor], *params: Tensor) -> Tensor:
        ctx.sensitivities = sensitivities
        return h0.clone()

    @staticmethod
    def backward(ctx, grad_h0: Tensor):
        B, n = grad_h0.shape
        grads = [
            (grad_h0.unsqueeze(1) @ s.view(B, n, -1)).sum(0).view(s.shape[2:]) for s in ctx.sensitivities
        ]
        return grad_h0, None, *grads


def check_budget(floats_per_env: int, batch: int, dtype: torch.dtype, budget_mb: float) -> None:
    """Refuse (ConfigError) sensitivities of ``floats_per_env`` (n·p) × ``batch`` above ``budget_mb``."""
    needed_mb = floats_per_env * batch * torch.finfo(dtype).bits / 8 / 2**20
    if needed_mb > budget_mb:
        raise ConfigError(
            f"memory.grad=rtrl needs {needed_mb:.0f} MB of sensitivities (n·p = {floats_per_env} "
            f"floats per env × {batch} envs), over memory.rtrl_budget_mb={budget_mb:g}; use memory.grad=snap1 "
            f"(diagonal RTRL) or memory.grad=bptt, a smaller hidden_size/backbone_units/rank, fewer envs, "
            f"or raise memory.rtrl_budget_mb"
        )
