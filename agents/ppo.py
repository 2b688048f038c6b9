"""Recurrent proximal policy optimisation (PPO; Schulman et al. 2017) for any memory core, in either
``memory.grad`` mode (truncated BPTT within the window, or exact RTRL through every earlier window).

One iteration:

1. Collect ``unroll_length`` (T) steps on all B envs with the shared ``RolloutCollector``: acting runs
   encoder -> core -> heads one step at a time under ``torch.no_grad()``, and the rollout keeps the
   memory state at the window start (sensitivities included in rtrl mode).
2. Advantages by GAE(λ) and λ-returns from the acting values (truncated episodes bootstrap from their
   final observation).
3. The state carried into the next window. In bptt mode it is the acting state. In rtrl / snap1 mode
   it is the state of one forward replay of the whole window from its stored start with the acting
   parameters, made before the first minibatch step: its h equals the acting h exactly, and its
   sensitivities are those the first epoch would carry out if it replayed the window as one
   minibatch. (The first epoch's minibatch replays themselves run with parameters that earlier
   minibatches have already moved, so their states would mix parameter versions across envs.)
4. ``update_epochs`` epochs. Each shuffles the envs and splits them into ``num_minibatches`` groups of
   B / M envs: a minibatch holds whole sequences [T, B/M] — no padding, every minibatch the same size
   — replayed with gradients from their stored start states (``Rollout.select_envs``). In rtrl mode
   every epoch therefore replays from the same stored start sensitivities, never from a state an
   earlier epoch produced. Loss: the clipped surrogate, the clipped value loss, an entropy bonus;
   gradient-norm clipping; Adam. After an epoch whose last minibatch moved the policy further than
   ``target_kl`` (approximate KL), the remaining epochs are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agents.base import ModelOptions, register_learner
from agents.distributed import all_mean, global_count, normalize
from agents.on_policy import WindowLearner, loss_terms
from agents.options import check_options
from agents.returns import bootstrap_truncation, explained_variance, gae
from agents.rollout import Rollout
from envs.base import EnvShard, VecEnv
from rlmem.errors import ConfigError
from rlmem.memory import State


@dataclass
class PPOOptions:
    """Options of the ``ppo`` learner."""

    unroll_length: int = 32  # T: steps per env per iteration (the window every minibatch replays whole)
    num_minibatches: int = 4  # M: groups of envs per epoch; must divide env.num_envs
    update_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    lr: float = 1e-3
    adam_eps: float = 1e-5
    anneal_lr: bool = True  # linearly to 0 over train.total_steps
    clip_coef: float = 0.2  # ε of the clipped surrogate (and of the value clipping)
    clip_value_loss: bool = True
    normalize_advantages: bool = True  # per minibatch
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5  # 0 turns clipping off (the norm is still logged)
    target_kl: float = 0.0  # stop the epochs once approx_kl exceeds it; 0 = off
    reward_clip: float = 0.0  # clip rewards to [-c, c] for learning and the core's input; 0 = off

    def __post_init__(self) -> None:
        check_options(self, counts=["unroll_length", "num_minibatches", "update_epochs"],
                      unit_interval=["gamma", "gae_lambda"], positive=["lr", "adam_eps", "clip_coef"],
                      non_negative=["entropy_coef", "value_coef", "max_grad_norm", "target_kl", "reward_clip"],
                      flags=["anneal_lr", "clip_value_loss", "normalize_advantages"])


def env_minibatches(num_envs: int, num_minibatches: int, generator: torch.Generator,
                    shard: EnvShard | None = None) -> list[Tensor]:
    """A random partition of the envs into ``num_minibatches`` index tensors of num_envs / M envs each.

    ``shard``: these envs are part of a larger batch split across processes. The permutation is drawn
    over the whole batch (so the generator's stream is that of one process) and each minibatch takes
    this part's envs in its order: every process contributes num_envs / M envs to each minibatch, as in
    data-parallel PPO, so the minibatches hold the same numbers of envs as in one process, though
    (for M > 1) not the same envs."""
    if shard is None or shard.size == shard.total:
        order = torch.randperm(num_envs, generator=generator, device=generator.device)
    else:
        whole = torch.randperm(shard.total, generator=generator, device=generator.device)
        order = whole[(whole >= shard.offset) & (whole < shard.offset + shard.size)] - shard.offset
    return list(order.view(num_minibatches, num_envs // num_minibatches))


class PPOLoss(NamedTuple):
    total: Tensor  # policy_loss - entropy_coef * entropy + value_coef * value_loss
    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    old_approx_kl: Tensor  # mean(−log r), detached
    approx_kl: Tensor  # mean((r − 1) − log r), detached (CleanRL's lower-variance estimator)
    clipfrac: Tensor  # fraction of steps whose ratio r is outside [1 − ε, 1 + ε], detached


@register_learner("ppo", PPOOptions)
class PPOLearner(WindowLearner):
    """Recurrent PPO with whole-sequence minibatches, for any memory core in bptt or rtrl mode."""

    name = "ppo"

    def __init__(self, options: PPOOptions, env: VecEnv, memory: Mapping[str, Any], model: ModelOptions,
                 device: torch.device | str, seed: int, total_steps: int) -> None:
        B, M = env.num_envs, options.num_minibatches
        if env.single_action_space is not None and B % M != 0:
            divisors = [str(d) for d in range(1, B + 1) if B % d == 0]
            raise ConfigError(
                f"agent.num_minibatches={M} must divide env.num_envs={B} (a minibatch is whole sequences of "
                f"B / M envs); valid choices: {', '.join(divisors)}"
                + ("" if env.shard is None else f" (env.num_envs={env.shard.total} split across processes: "
                   f"{B} envs per process)")
            )
        super().__init__(options, env, memory, model, device, seed, total_steps)

    def targets(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """GAE(λ) advantages and λ-returns [T, B] from the acting values."""
        opt = self.options
        rewards = rollout.rewards
        if opt.reward_clip > 0:
            rewards = rewards.clamp(-opt.reward_clip, opt.reward_clip)
        rewards = bootstrap_truncation(rewards, rollout.truncated, rollout.final_values, opt.gamma)
        return gae(rewards, rollout.values, rollout.bootstrap_value, rollout.done, opt.gamma, opt.gae_lambda)

    def carried_state(self, rollout: Rollout) -> State:
        """The memory state the next window starts from (see step 3 of the module docstring)."""
        net = self.network
        if net.core.grad not in ("rtrl", "snap1"):
            return self.collector.memory_state  # bptt: the acting state is the replay's state
        # A learning pass of the core alone (its sensitivities advance only with gradients enabled);
        # nothing is backpropagated, so the encoder runs without a graph.
        with torch.no_grad():
            x = net.core_inputs(rollout.obs, rollout.reset, rollout.prev_actions, rollout.prev_rewards)
        with torch.enable_grad():
            _, state = net.core(x, rollout.start_state, rollout.reset)
        return state

    def replay(self, minibatch: Rollout):
        """The network over a minibatch's whole sequences [T, b], from their stored start states."""
        return self.network(minibatch.obs, minibatch.start_state, minibatch.reset, minibatch.prev_actions,
                            minibatch.prev_rewards)

    def loss(self, minibatch: Rollout, advantages: Tensor, returns: Tensor) -> PPOLoss:
        """The PPO loss of a minibatch; ``advantages`` and ``returns``: [T, b]."""
        opt = self.options
        out = self.replay(minibatch)
        log_ratio = out.dist.log_prob(minibatch.actions) - minibatch.log_probs
        ratio = log_ratio.exp()
        with torch.no_grad():
            old_approx_kl = (-log_ratio).mean()
            approx_kl = ((ratio - 1) - log_ratio).mean()
            clipfrac = ((ratio - 1.0).abs() > opt.clip_coef).float().mean()
        if opt.normalize_advantages and global_count(advantages) > 1:
            advantages = normalize(advantages)  # over the minibatch's envs of every process

        clipped_ratio = ratio.clamp(1 - opt.clip_coef, 1 + opt.clip_coef)
        policy_loss = torch.max(-advantages * ratio, -advantages * clipped_ratio).mean()
        values = out.value
        if opt.clip_value_loss:
            # The value may move at most ε from the acting value before its error stops counting.
            clipped = minibatch.values + (values - minibatch.values).clamp(-opt.clip_coef, opt.clip_coef)
            value_loss = 0.5 * torch.max((values - returns).pow(2), (clipped - returns).pow(2)).mean()
        else:
            value_loss = 0.5 * (values - returns).pow(2).mean()
        entropy = out.dist.entropy().mean()
        total = policy_loss - opt.entropy_coef * entropy + opt.value_coef * value_loss
        return PPOLoss(total, policy_loss, value_loss, entropy, old_approx_kl, approx_kl, clipfrac)

    def update(self, rollout: Rollout) -> tuple[dict[str, float], State]:
        """The PPO epochs on ``rollout``. Returns the metrics and the state the next window starts from."""
        opt = self.options
        lr = self.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            advantages, returns = self.targets(rollout)
        carried = self.carried_state(rollout)

        epochs, clipfracs = 0, []
        for _ in range(opt.update_epochs):
            for envs in env_minibatches(self.num_envs, opt.num_minibatches, self.generator, self.env.shard):
                terms = self.loss(rollout.select_envs(envs), advantages[:, envs], returns[:, envs])
                grad_norm = self.optimizer_step(terms.total, loss_terms(terms))
                clipfracs.append(terms.clipfrac)
            epochs += 1
            if opt.target_kl > 0 and float(all_mean(terms.approx_kl)) > opt.target_kl:  # every process stops alike
                break

        metrics = {
            "losses/value_loss": float(terms.value_loss.detach()),
            "losses/policy_loss": float(terms.policy_loss.detach()),
            "losses/entropy": float(terms.entropy.detach()),
            "losses/old_approx_kl": float(terms.old_approx_kl),
            "losses/approx_kl": float(terms.approx_kl),
            "losses/clipfrac": float(torch.stack(clipfracs).mean()),  # over every minibatch step
            "losses/explained_variance": explained_variance(rollout.values, returns),
            "losses/grad_norm": float(grad_norm),
            "losses/epochs": float(epochs),
            "charts/learning_rate": float(lr),
        }
        return metrics, carried
