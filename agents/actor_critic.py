"""Synchronous actor-critic with recurrent memory (the A2C / IMPALA family; GAE(λ) or V-trace targets).

One iteration:

1. Collect ``unroll_length`` (T) steps on all B envs. Acting runs encoder -> core -> heads one step at
   a time under ``torch.no_grad()``; the rollout keeps the memory state at the window start.
2. Replay the whole window [T, B] with gradients from that start state (with the per-step reset
   flags). How the core's gradient is computed is the core's business (``memory.grad``: truncated
   BPTT within the window, or exact RTRL through every earlier window), so this file is the same for
   every core. The state this replay returns is carried into the next window: in rtrl mode this is
   where the sensitivities advance; in bptt mode it equals the acting state.
3. Targets (GAE(λ) or V-trace, truncations bootstrapped from ``final_obs``), the usual loss
   ``policy − entropy_coef·entropy + value_coef·value``, gradient-norm clipping, one optimizer step.
   Each term is a mean over the window's T·B steps, or their sum (``loss_reduction: sum``, as IMPALA
   and torchbeast, whose RMSProp ε = 0.01 and clip of 40 are set for summed gradients: with a mean the
   gradients are T·B times smaller, ε then dominates RMSProp's normaliser and the step shrinks by
   about as much).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agents.base import register_learner
from agents.distributed import global_count, normalize
from agents.on_policy import WindowLearner, loss_terms
from agents.options import check_choice, check_number, check_options
from agents.returns import bootstrap_truncation, explained_variance, gae, vtrace
from agents.rollout import Rollout
from rlmem.memory import State

TARGETS = ("gae", "vtrace")
OPTIMIZERS = ("adam", "rmsprop")
LOSS_REDUCTIONS = ("mean", "sum")



@dataclass
class ActorCriticOptions:
    """Options of the ``actor_critic`` learner (defaults solve the built-in cue-recall task with a GRU)."""

    unroll_length: int = 32  # T: env steps per env per iteration (the window the core replays)
    gamma: float = 0.99
    gae_lambda: float = 0.9
    target: str = "gae"  # gae | vtrace
    vtrace_rho_clip: float = 1.0  # ρ̄
    vtrace_c_clip: float = 1.0  # c̄
    optimizer: str = "adam"  # adam | rmsprop
    lr: float = 3e-3
    adam_eps: float = 1e-5
    rmsprop_eps: float = 0.01  # R2AC / IMPALA use a large epsilon
    rmsprop_alpha: float = 0.99
    max_grad_norm: float = 0.5  # 0 turns clipping off (the norm is still logged)
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    reward_clip: float = 0.0  # clip rewards to [-c, c] for learning and the core's input; 0 = off
    normalize_advantages: bool = True
    anneal_lr: bool = True  # linearly to 0 over train.total_steps
    loss_reduction: str = "mean"  # mean | sum: each loss term over the window's T·B steps

    def __post_init__(self) -> None:
        check_options(self, counts=["unroll_length"], unit_interval=["gamma", "gae_lambda"],
                      positive=["vtrace_rho_clip", "vtrace_c_clip", "lr", "adam_eps", "rmsprop_eps"],
                      non_negative=["max_grad_norm", "entropy_coef", "value_coef", "reward_clip"],
                      flags=["normalize_advantages", "anneal_lr"])
        check_choice("target", self.target, TARGETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_number("rmsprop_alpha", self.rmsprop_alpha, 0.0, 1.0, low_open=True)


class ActorCriticLoss(NamedTuple):
    total: Tensor  # policy_loss - entropy_coef * entropy + value_coef * value_loss
    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    values: Tensor  # [T, B] the replay's values (detached)
    targets: Tensor  # [T, B] the value targets
    state: State  # the state the replay carried out of the window


@register_learner("actor_critic", ActorCriticOptions)
class ActorCriticLearner(WindowLearner):
    """Synchronous actor-critic (A2C/IMPALA family) with GAE(λ) or V-trace targets, for any memory core."""

    name = "actor_critic"

    def make_optimizer(self) -> torch.optim.Optimizer:
        opt = self.options
        if opt.optimizer == "rmsprop":
            return torch.optim.RMSprop(self.network.parameters(), lr=opt.lr, eps=opt.rmsprop_eps,
                                       alpha=opt.rmsprop_alpha)
        return super().make_optimizer()

    def loss(self, rollout: Rollout) -> ActorCriticLoss:
        """Replay ``rollout`` with gradients from its start state; targets and the actor-critic loss."""
        opt, net = self.options, self.network
        reduce = torch.sum if opt.loss_reduction == "sum" else torch.mean
        out = net(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions, rollout.prev_rewards)
        log_probs = out.dist.log_prob(rollout.actions)
        entropy = reduce(out.dist.entropy())
        values = out.value

        with torch.no_grad():
            rewards = rollout.rewards
            if opt.reward_clip > 0:
                rewards = rewards.clamp(-opt.reward_clip, opt.reward_clip)
            rewards = bootstrap_truncation(rewards, rollout.truncated, rollout.final_values, opt.gamma)
            if opt.target == "gae":
                advantages, targets = gae(rewards, values.detach(), rollout.bootstrap_value, rollout.done,
                                          opt.gamma, opt.gae_lambda)
            else:
                targets, advantages = vtrace(rewards, values.detach(), rollout.bootstrap_value, rollout.done,
                                             log_probs.detach() - rollout.log_probs, opt.gamma,
                                             opt.vtrace_rho_clip, opt.vtrace_c_clip)
            if opt.normalize_advantages and global_count(advantages) > 1:
                advantages = normalize(advantages)  # over every process's envs

        policy_loss = -reduce(advantages * log_probs)
        value_loss = 0.5 * reduce((values - targets).pow(2))
        total = policy_loss - opt.entropy_coef * entropy + opt.value_coef * value_loss
        return ActorCriticLoss(total, policy_loss, value_loss, entropy, values.detach(), targets, out.state)

    def update(self, rollout: Rollout) -> tuple[dict[str, float], State]:
        """One optimizer step on ``rollout``. Returns the metrics and the state the replay carried out
        of the window (what the next window starts from)."""
        lr = self.optimizer.param_groups[0]["lr"]
        terms = self.loss(rollout)
        grad_norm = self.optimizer_step(terms.total, loss_terms(terms))

        # How far the update moved the policy on this window (CleanRL's estimator of KL(old || new)).
        # It costs one forward pass without gradients.
        with torch.no_grad():
            new = self.network(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions,
                               rollout.prev_rewards)
            log_ratio = new.dist.log_prob(rollout.actions) - rollout.log_probs
            approx_kl = ((log_ratio.exp() - 1) - log_ratio).mean()

        # the terms are logged per step whatever the reduction, so that runs compare
        per_step = 1.0 / terms.values.numel() if self.options.loss_reduction == "sum" else 1.0
        metrics = {
            "losses/value_loss": float(terms.value_loss.detach()) * per_step,
            "losses/policy_loss": float(terms.policy_loss.detach()) * per_step,
            "losses/entropy": float(terms.entropy.detach()) * per_step,
            "losses/approx_kl": float(approx_kl),
            "losses/explained_variance": explained_variance(terms.values, terms.targets),
            "losses/grad_norm": float(grad_norm),
            "charts/learning_rate": float(lr),
        }
        return metrics, terms.state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "updates" in state:  # a checkpoint from before the counter was called iterations
            state = {**state, "iterations": state["updates"]}
        super().load_state_dict(state)
