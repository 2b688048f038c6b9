"""Return targets over time-major windows [T, B]: GAE(λ) and V-trace.

Conventions (same-step autoreset, see ``envs.base``):

* ``rewards[t]``, ``terminated[t]``, ``truncated[t]`` belong to the transition taken at step t;
  ``values[t] = V(obs[t])`` and ``bootstrap_value = V(obs[T])``, the observation after the window.
* ``done[t] = terminated[t] | truncated[t]`` cuts the recursion: ``obs[t + 1]`` already belongs to the
  next episode. A truncated episode did not end, though, so its value is folded into the reward first
  (``bootstrap_truncation``): ``r_t + γ V(final_obs)``. A terminated one bootstraps nothing.

The recursions run backwards over T (a short loop over time, vectorised over envs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def bootstrap_truncation(rewards: Tensor, truncated: Tensor, final_values: Tensor, gamma: float) -> Tensor:
    """``r_t + γ V(final_obs_t)`` where the episode was truncated at step t, ``r_t`` elsewhere. All [T, B]."""
    return rewards + gamma * final_values * truncated.to(rewards.dtype)


def gae(
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    done: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    ``rewards``, ``values``, ``done``: [T, B]; ``bootstrap_value``: [B].
    Returns ``advantages`` [T, B] and the λ-returns ``advantages + values`` [T, B].
    """
    T = rewards.shape[0]
    not_done = 1.0 - done.to(rewards.dtype)
    next_values = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
    deltas = rewards + gamma * not_done * next_values - values
    advantages = torch.empty_like(rewards)
    running = torch.zeros_like(bootstrap_value, dtype=rewards.dtype)
    for t in reversed(range(T)):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


def vtrace(
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    done: Tensor,
    log_rhos: Tensor,
    gamma: float,
    rho_clip: float = 1.0,
    c_clip: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """V-trace targets (Espeholt et al. 2018).

    ``log_rhos`` [T, B] = log π(a_t|·) − log μ(a_t|·) (target minus behaviour). With
    ρ_t = min(ρ̄, e^{log ρ_t}), c_t = λ·min(c̄, e^{log ρ_t}) and discounts γ_t = γ(1 − done_t):

        v_s − V_s = Σ_{t≥s} (Π_{s≤i<t} γ_i c_i) ρ_t (r_t + γ_t V_{t+1} − V_t)

    Returns ``vs`` [T, B] (value targets) and the policy-gradient advantages
    ``ρ_t (r_t + γ_t v_{t+1} − V_t)`` [T, B], where ``v_T = bootstrap_value``.
    """
    T = rewards.shape[0]
    rhos = log_rhos.exp()
    clipped_rhos = rhos.clamp(max=rho_clip)
    cs = lam * rhos.clamp(max=c_clip)
    discounts = gamma * (1.0 - done.to(rewards.dtype))
    next_values = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
    deltas = clipped_rhos * (rewards + discounts * next_values - values)
    vs_minus_v = torch.empty_like(rewards)
    running = torch.zeros_like(bootstrap_value, dtype=rewards.dtype)
    for t in reversed(range(T)):
        running = deltas[t] + discounts[t] * cs[t] * running
        vs_minus_v[t] = running
    vs = vs_minus_v + values
    next_vs = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
    pg_advantages = clipped_rhos * (rewards + discounts * next_vs - values)
    return vs, pg_advantages


def explained_variance(predictions: Tensor, targets: Tensor) -> float:
    """1 − Var[targets − predictions] / Var[targets]; NaN when the targets do not vary."""
    var_targets = targets.var()
    if var_targets.item() == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / var_targets)
