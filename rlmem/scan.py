"""A log-depth associative scan for first-order linear recurrences over time, with its adjoint.

The recurrence, element-wise over every non-time dimension, real or complex::

    S_t = d_t ⊙ S_{t-1} + v_t          t = 0 .. T-1,   S_{-1} = S_0 (the carried state)

is the prefix "sum" of the pairs ``(d_t, v_t)`` under the associative operator

    (d₁, v₁) ∘ (d₂, v₂) = (d₂ d₁, d₂ v₁ + v₂)         (apply pair 1 first, then pair 2).

An episode reset before step t is the pair with ``d_t = 0``: the operator then forgets everything to
its left, so resets anywhere in a window need no special case. Only products of decays are ever
formed (never their inverses), so with ``|d_t| <= 1`` every intermediate stays bounded and float32
windows of any length stay finite, unlike the rescaled cumulative-sum form Σ_k γ^{-k} v_k.

The scan is the odd–even (Blelloch-style) reduction: combine neighbouring pairs, scan the half-length
sequence recursively, then fill in the even positions — O(T) work and O(log T) depth.

Gradients (PyTorch's convention for complex tensors: ``grad`` is ∂L/∂Re + i ∂L/∂Im) come from the
adjoint recurrence, itself a linear recurrence backwards in time and computed by the same scan::

    λ_t = G_t + conj(d_{t+1}) ⊙ λ_{t+1},   λ_{T-1} = G_{T-1}
    ∂L/∂v_t = λ_t,   ∂L/∂d_t = λ_t ⊙ conj(S_{t-1}),   ∂L/∂S_0 = conj(d_0) ⊙ λ_0

so backward keeps only ``d`` and ``S`` (O(T) memory), not the scan's intermediate levels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scan_pairs(decay: Tensor, value: Tensor) -> Tensor:
    """Inclusive scan of ``(decay, value)`` pairs along dim 0 (no state before step 0).

    ``decay``, ``value``: [T, ...] of one shape. Returns S [T, ...] with S_t = d_t S_{t-1} + v_t, S_{-1} = 0.
    """
    T = value.shape[0]
    if T == 1:
        return value.clone()
    # Combine each odd position with its even left neighbour: pair i covers steps (2i, 2i+1).
    half = T // 2
    odd_decay = decay[1 : 2 * half : 2]
    combined_decay = odd_decay * decay[0 : 2 * half : 2]
    combined_value = odd_decay * value[0 : 2 * half : 2] + value[1 : 2 * half : 2]
    states = torch.empty_like(value)
    # The scan of the half sequence is the state at every odd position.
    states[1::2] = _scan_pairs(combined_decay, combined_value)
    states[0] = value[0]
    # Each even position t >= 2 is one step on from the odd position before it.
    states[2::2] = decay[2::2] * states[1 : T - 1 : 2] + value[2::2]
    return states


def _reverse_adjoint(decay: Tensor, grad_states: Tensor) -> Tensor:
    """λ_t = G_t + conj(d_{t+1}) λ_{t+1}: the scan run backwards in time."""
    next_decay = torch.zeros_like(decay)
    next_decay[:-1] = decay[1:].conj()
    return _scan_pairs(next_decay.flip(0), grad_states.flip(0)).flip(0)


def scan_states(decay: Tensor, value: Tensor, initial: Tensor) -> Tensor:
    """States S [T, ...] of S_t = d_t ⊙ S_{t-1} + v_t from S_{-1} = ``initial`` [...] (no autograd graph)."""
    with torch.no_grad():
        if value.shape[0] == 1:
            return (decay[0] * initial + value[0]).unsqueeze(0)
        # Fold the carried state into step 0: S_0 = d_0 S_{-1} + v_0.
        first = decay[0] * initial + value[0]
        return _scan_pairs(decay, torch.cat([first.unsqueeze(0), value[1:]], dim=0))


def scan_adjoint(decay: Tensor, grad_states: Tensor) -> Tensor:
    """The adjoint λ [T, ...]: λ_t = G_t + conj(d_{t+1}) ⊙ λ_{t+1}, λ_{T-1} = G_{T-1} (no autograd graph).

    ``grad_states`` [T, ...] is the direct error ∂L/∂S_t of each step; λ_t is the total error on S_t
    from steps t..T-1 of the window.
    """
    with torch.no_grad():
        if grad_states.shape[0] == 1:
            return grad_states.clone()
        return _reverse_adjoint(decay, grad_states)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, decay: Tensor, value: Tensor, initial: Tensor) -> Tensor:
        states = scan_states(decay, value, initial)
        ctx.save_for_backward(decay, initial, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: Tensor):
        decay, initial, states = ctx.saved_tensors
        adjoint = scan_adjoint(decay, grad_states)
        grad_decay = grad_initial = None
        if ctx.needs_input_grad[0]:
            previous = torch.cat([initial.unsqueeze(0), states[:-1]], dim=0)
            grad_decay = adjoint * previous.conj()
        if ctx.needs_input_grad[2]:
            grad_initial = decay[0].conj() * adjoint[0]
        return grad_decay, adjoint, grad_initial


def linear_scan(decay: Tensor, value: Tensor, initial: Tensor) -> Tensor:
    """All states of S_t = d_t ⊙ S_{t-1} + v_t over a window, by a log-depth associative scan.

    Args:
        decay: [T, ...] per-step decays d_t (0 where an episode resets before step t).
        value: [T, ...] per-step inputs v_t, same shape and dtype as ``decay``.
        initial: [...] the state before step 0.

    Returns:
        [T, ...] the states S_0 .. S_{T-1}. Differentiable in all three inputs.
    """
    if decay.shape != value.shape or initial.shape != value.shape[1:]:
        raise ValueError(
            f"linear_scan shapes disagree: decay {tuple(decay.shape)}, value {tuple(value.shape)}, "
            f"initial {tuple(initial.shape)}"
        )
    if value.shape[0] == 1:  # a single step is the recurrence itself
        return (decay[0] * initial + value[0]).unsqueeze(0)
    return _LinearScan.apply(decay, value, initial)
