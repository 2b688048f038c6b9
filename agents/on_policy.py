"""What the window learners (``actor_critic``, ``ppo``) share: collect a window, learn from it, carry
the memory state the update returns into the next window.

One iteration::

    lr ← lr₀ · max(0, 1 − iterations / num_iterations)       (``anneal_lr``)
    rollout = collector.collect(unroll_length)               [T, B] with the window's start state
    metrics, carried = update(rollout)                       (the subclass: its losses and optimizer steps)
    collector.memory_state ← carried                         (checked finite, sensitivities included)

``carried`` is the state the update's replay of the window ends in (in bptt mode the acting state; in
rtrl mode the state whose sensitivities advanced with gradients on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from agents.base import IterationResult, Learner, ModelOptions, check_memory_state, seeded
from agents.networks import ActorCritic, check_action_space
from agents.rollout import Rollout, RolloutCollector
from envs.base import VecEnv
from rlmem.memory import State


def loss_terms(terms: Any) -> dict[str, Tensor]:
    """The policy loss, value loss and entropy of a learner's loss tuple, by their metric names (the
    terms ``Learner.optimizer_step`` names when the total is not finite)."""
    return {f"losses/{name}": getattr(terms, name) for name in ("policy_loss", "value_loss", "entropy")}


class WindowLearner(Learner):
    """A learner that acts for ``options.unroll_length`` steps per env, then learns from that window.

    Subclasses implement ``update(rollout) -> (metrics, carried state)`` and may pass their own
    ``optimizer``; the options must have ``unroll_length``, ``lr``, ``anneal_lr``, ``max_grad_norm``
    (0: no clipping), ``reward_clip`` and, for the default optimizer, ``adam_eps``.
    """

    name = "window"  # the registered name, for error messages
    checkpointed = ("network", "optimizer", "collector", "generator", "iterations")

    def __init__(self, options: Any, env: VecEnv, memory: Mapping[str, Any], model: ModelOptions,
                 device: torch.device | str, seed: int, total_steps: int) -> None:
        check_action_space(env.single_action_space, self.name)
        super().__init__(options, env, device)
        self.steps_per_iteration = options.unroll_length * env.num_envs
        # total_steps counts the run's steps: those of every process's envs
        self.num_iterations = max(1, int(total_steps) // (options.unroll_length * self.run_envs))
        if options.max_grad_norm > 0:
            self.max_grad_norm = options.max_grad_norm
        with seeded(seed):
            self.network = ActorCritic(env.single_observation_space, env.single_action_space, memory, model,
                                       reward_clip=options.reward_clip).to(self.device)
        self.optimizer = self.make_optimizer()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.collector = RolloutCollector(self.network, env, self.device, self.generator, seed)
        self.iterations = 0

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.network.parameters(), lr=self.options.lr, eps=self.options.adam_eps)

    def iteration(self) -> IterationResult:
        """Collect ``unroll_length`` steps on every env, then ``update`` on that window."""
        opt = self.options
        if opt.anneal_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = opt.lr * max(0.0, 1.0 - self.iterations / self.num_iterations)
        rollout, episodes = self.collector.collect(opt.unroll_length)
        metrics, carried_state = self.update(rollout)
        check_memory_state(carried_state)
        self.collector.memory_state = carried_state
        self.iterations += 1
        metrics.update({f"memory/{k}": v for k, v in self.network.core.state_metrics(carried_state).items()})
        return IterationResult(self.steps_per_iteration, metrics, episodes.returns, episodes.lengths,
                               episodes.successes)

    def update(self, rollout: Rollout) -> tuple[dict[str, float], State]:
        """Learn from ``rollout``; the metrics and the state the next window starts from."""
        raise NotImplementedError
