"""GAE(λ) and V-trace against hand-computed examples and against naive per-env loops."""

from __future__ import annotations

import math

import pytest
import torch

from agents.returns import bootstrap_truncation, explained_variance, gae, vtrace


def col(*values: float) -> torch.Tensor:
    """A [T, 1] column (one env)."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


def flags(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool).unsqueeze(1)


REWARDS, VALUES, BOOTSTRAP = col(1.0, 2.0, 3.0), col(0.5, 1.0, 1.5), torch.tensor([2.0], dtype=torch.float64)


def test_gae_hand_computed_without_episode_end():
    # δ = [1 + .5·1 − .5, 2 + .5·1.5 − 1, 3 + .5·2 − 1.5] = [1, 1.75, 2.5]; γλ = 0.25
    advantages, returns = gae(REWARDS, VALUES, BOOTSTRAP, flags(0, 0, 0), gamma=0.5, lam=0.5)
    expected = col(1.0 + 0.25 * (1.75 + 0.25 * 2.5), 1.75 + 0.25 * 2.5, 2.5)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + VALUES)


def test_gae_termination_cuts_bootstrap_and_recursion():
    # Terminated at t = 1: δ_1 = r_1 − V_1 = 1 (no V_2), and A_1 does not see A_2.
    advantages, _ = gae(REWARDS, VALUES, BOOTSTRAP, flags(0, 1, 0), gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, col(1.0 + 0.25 * 1.0, 1.0, 2.5))


def test_truncation_bootstraps_from_final_value_termination_does_not():
    truncated, final_values = flags(0, 1, 0), col(0.0, 4.0, 0.0)
    rewards = bootstrap_truncation(REWARDS, truncated, final_values, gamma=0.5)
    torch.testing.assert_close(rewards, col(1.0, 2.0 + 0.5 * 4.0, 3.0))
    # Truncated at t = 1: δ_1 = r_1 + γ V(final_obs) − V_1 = 3; the next episode's V_2 is not used.
    advantages, _ = gae(rewards, VALUES, BOOTSTRAP, flags(0, 1, 0), gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, col(1.0 + 0.25 * 3.0, 3.0, 2.5))
    # The same step terminated instead: the final value is ignored.
    terminated_adv, _ = gae(REWARDS, VALUES, BOOTSTRAP, flags(0, 1, 0), gamma=0.5, lam=0.5)
    assert terminated_adv[1, 0] == 1.0 and advantages[1, 0] == 3.0


def test_vtrace_hand_computed():
    rewards, values, bootstrap = col(1.0, 2.0), col(0.5, 1.0), torch.tensor([2.0], dtype=torch.float64)
    log_rhos = col(math.log(2.0), math.log(0.5))  # ρ = [2 → clipped to 1, 0.5]
    vs, pg = vtrace(rewards, values, bootstrap, flags(0, 0), log_rhos, gamma=0.5, rho_clip=1.0, c_clip=1.0)
    # δ_0 = 1·(1 + .5·1 − .5) = 1, δ_1 = .5·(2 + .5·2 − 1) = 1; vs_1 = V_1 + δ_1 = 2; vs_0 = V_0 + δ_0 + γ c_0 δ_1 = 2
    torch.testing.assert_close(vs, col(2.0, 2.0))
    # pg_0 = ρ_0 (r_0 + γ vs_1 − V_0) = 1.5;  pg_1 = ρ_1 (r_1 + γ·bootstrap − V_1) = 1
    torch.testing.assert_close(pg, col(1.5, 1.0))


def naive_gae(rewards, values, bootstrap, done, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k}, summed until (and including) the step where the episode ends."""
    T, B = rewards.shape
    advantages = torch.zeros_like(rewards)
    for b in range(B):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                next_value = bootstrap[b] if k == T - 1 else values[k + 1, b]
                delta = rewards[k, b] + gamma * next_value * (not done[k, b]) - values[k, b]
                total += weight * delta
                if done[k, b]:
                    break
                weight *= gamma * lam
            advantages[t, b] = total
    return advantages


def naive_vtrace(rewards, values, bootstrap, done, log_rhos, gamma, rho_clip, c_clip):
    """The definition: vs_s = V_s + Σ_{t≥s} (Π_{s≤i<t} γ_i c_i) ρ_t δ_t."""
    T, B = rewards.shape
    vs = torch.zeros_like(rewards)
    pg = torch.zeros_like(rewards)
    rho = log_rhos.exp().clamp(max=rho_clip)
    c = log_rhos.exp().clamp(max=c_clip)
    discount = gamma * (~done).double()
    next_values = torch.cat([values[1:], bootstrap.unsqueeze(0)])
    for b in range(B):
        for s in range(T):
            total, product = 0.0, 1.0
            for t in range(s, T):
                total += product * rho[t, b] * (rewards[t, b] + discount[t, b] * next_values[t, b] - values[t, b])
                product *= discount[t, b] * c[t, b]
            vs[s, b] = values[s, b] + total
    for b in range(B):
        for s in range(T):
            next_vs = bootstrap[b] if s == T - 1 else vs[s + 1, b]
            pg[s, b] = rho[s, b] * (rewards[s, b] + discount[s, b] * next_vs - values[s, b])
    return vs, pg


def random_window(T=7, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, B, generator=g, dtype=torch.float64)
    values = torch.randn(T, B, generator=g, dtype=torch.float64)
    bootstrap = torch.randn(B, generator=g, dtype=torch.float64)
    done = torch.rand(T, B, generator=g) < 0.25
    log_rhos = 0.7 * torch.randn(T, B, generator=g, dtype=torch.float64)
    return rewards, values, bootstrap, done, log_rhos


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.5, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    rewards, values, bootstrap, done, _ = random_window()
    advantages, returns = gae(rewards, values, bootstrap, done, gamma, lam)
    torch.testing.assert_close(advantages, naive_gae(rewards, values, bootstrap, done, gamma, lam))
    torch.testing.assert_close(returns, advantages + values)


@pytest.mark.parametrize("rho_clip,c_clip", [(1.0, 1.0), (2.0, 0.5), (100.0, 100.0)])
def test_vtrace_matches_naive_definition(rho_clip, c_clip):
    rewards, values, bootstrap, done, log_rhos = random_window(seed=1)
    vs, pg = vtrace(rewards, values, bootstrap, done, log_rhos, 0.9, rho_clip, c_clip)
    expected_vs, expected_pg = naive_vtrace(rewards, values, bootstrap, done, log_rhos, 0.9, rho_clip, c_clip)
    torch.testing.assert_close(vs, expected_vs)
    torch.testing.assert_close(pg, expected_pg)


def test_vtrace_on_policy_equals_n_step_returns():
    # With π = μ (log ρ = 0) and λ = 1, V-trace targets are the n-step bootstrapped returns = GAE(λ = 1).
    rewards, values, bootstrap, done, _ = random_window(seed=2)
    vs, pg = vtrace(rewards, values, bootstrap, done, torch.zeros_like(rewards), 0.95)
    _, returns = gae(rewards, values, bootstrap, done, 0.95, 1.0)
    torch.testing.assert_close(vs, returns)
    # The policy-gradient advantage is the one-step TD error towards the next V-trace target.
    next_vs = torch.cat([vs[1:], bootstrap.unsqueeze(0)])
    torch.testing.assert_close(pg, rewards + 0.95 * (~done).double() * next_vs - values)


def test_explained_variance():
    targets = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(targets, targets) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(targets, 2.5), targets) == pytest.approx(0.0)
    assert math.isnan(explained_variance(targets, torch.ones(4)))
