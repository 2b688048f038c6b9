"""What the policy reads at each step besides its memory state, and sampling that refuses a diverged policy.

At env step t the network reads the observation obs_t, the reset flag (obs_t starts an episode: the
core zeroes its state, and the previous action and reward, which belong to the previous episode, are
masked), the previous action a_{t−1} and the previous reward r_{t−1}::

    inputs = ActingInputs.first(obs, network)          # reset = 1, a_{−1} = 0, r_{−1} = 0   ([B, ...])
    out = network.step(*inputs.before(state))          # obs, state, reset, prev_action, prev_reward
    action = sample_action(out, generator)             # TrainingDiverged instead of sampling NaN
    inputs = inputs.after(next_obs, done, action, reward)

Every learner, the rollout collector and its env groups keep these four tensors in one ``ActingInputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from agents.base import all_finite, check_memory_state
from agents.networks import ActorCritic, ActorCriticOutput, Categorical, DiagGaussian, Distribution
from envs.base import EnvShard
from rlmem.errors import TrainingDiverged
from rlmem.memory import State


@dataclass
class ActingInputs:
    """The acting inputs of B envs besides the memory state."""

    obs: Tensor  # [B, *obs_shape] on the policy device (env dtype: uint8 frames stay uint8)
    reset: Tensor  # [B] bool: obs starts an episode
    prev_action: Tensor  # [B, *act_shape] the action before obs (as sampled: unshifted, unclipped)
    prev_reward: Tensor  # [B] the raw reward before obs

    @classmethod
    def first(cls, obs: Tensor, network: ActorCritic) -> ActingInputs:
        """The inputs at the first observation: every env starts an episode (the flag also keeps the
        previous action/reward inputs zero and tells cores that carry sensitivities to reset them)."""
        B, device = obs.shape[0], obs.device
        return cls(obs, torch.ones(B, dtype=torch.bool, device=device),
                   torch.zeros(B, *network.action_shape, dtype=network.action_dtype(), device=device),
                   torch.zeros(B, device=device))

    def after(self, obs: Tensor, done: Tensor, action: Tensor, reward: Tensor) -> ActingInputs:
        """The inputs of the next step, after ``action`` was taken and the envs returned ``obs``,
        ``reward`` and ``done`` (terminated | truncated: with same-step autoreset ``obs`` starts a new
        episode where ``done``)."""
        return ActingInputs(obs, done, action, reward)

    def before(self, state: State) -> tuple[Tensor, State, Tensor, Tensor, Tensor]:
        """The arguments of ``ActorCritic.step``: obs, state, reset, prev_action, prev_reward."""
        return self.obs, state, self.reset, self.prev_action, self.prev_reward

    def select(self, index: Tensor | slice) -> ActingInputs:
        """The inputs of a subset of envs."""
        return ActingInputs(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: list[ActingInputs]) -> ActingInputs:
        """Groups of envs back into one batch, in order."""
        return ActingInputs(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ActingInputs)))

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).clone() for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name].to(getattr(self, f.name).device))


def sample_action(out: ActorCriticOutput, generator: torch.Generator, shard: EnvShard | None = None) -> Tensor:
    """A sample of ``out.dist`` [1, B, *act_shape]; TrainingDiverged where the policy's output is not
    finite, naming the memory state entry that caused it where one did (one host synchronisation).

    ``shard``: these B envs are rows ``shard.rows`` of a batch of ``shard.total`` (data-parallel
    training): the sample is drawn for the whole batch, with the other rows' distributions filled in,
    and these rows kept, so that each env's action and the generator's stream are those of one process
    stepping every env (both samplers draw their noise by shape and use it row by row)."""
    if not all_finite(out.dist.parameters()):
        check_memory_state(out.state)
        raise TrainingDiverged("policy output")
    if shard is None or shard.size == shard.total:
        return out.dist.sample(generator)
    return padded_distribution(out.dist, shard).sample(generator)[:, shard.rows]


def padded_distribution(dist: Distribution, shard: EnvShard) -> Distribution:
    """``dist`` [1, b, ...] as rows ``shard.rows`` of a distribution over ``shard.total`` envs whose
    other rows are uniform (categorical) or standard normal (Gaussian)."""
    def pad(rows: Tensor) -> Tensor:
        full = rows.new_zeros(rows.shape[0], shard.total, *rows.shape[2:])
        full[:, shard.rows] = rows
        return full

    if isinstance(dist, Categorical):
        padded = Categorical.__new__(Categorical)  # the logits are normalised already: keep them bit for bit
        padded.logits = pad(dist.logits)
        return padded
    return DiagGaussian(pad(dist.mean), pad(dist.log_std))
