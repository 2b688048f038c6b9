"""The VecEnv contract: every environment source is adapted to one batched, torch-tensor interface.

``B = num_envs``. Observations, rewards and flags are torch tensors on ``device``.

* ``reset(seed) -> obs [B, *obs_shape]``
* ``step(actions [B, *act_shape]) -> obs, reward [B] float32, terminated [B] bool, truncated [B] bool, info``
* Same-step autoreset: when env ``b`` ends at a step, the returned ``obs[b]`` is already the first
  observation of its next episode and ``terminated[b] | truncated[b]`` is set. The last observation of
  the ended episode is ``info["final_obs"][b]`` (rows of envs that did not end hold their current obs),
  so that truncation can bootstrap.
* ``info["episode"]`` reports finished episodes as ``{"done": bool [B], "return": float [B],
  "length": int [B]}``: raw (unclipped, unscaled) return and length, valid where ``done``.
* Prediction environments without actions (``single_action_space is None``) take ``step(None)``.
* Bad input (unknown id, wrong action shape or range, a closed env) raises ``EnvError`` naming the
  problem; nothing hangs.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from torch import Tensor


class EnvError(ValueError):
    """An environment error a user can cause (unknown id, bad action, closed env...)."""


StepResult = tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]


class VecEnv:
    """Base class of all batched environments; see the module docstring for the contract."""

    num_envs: int
    single_observation_space: gym.Space
    single_action_space: gym.Space | None
    device: torch.device

    def reset(self, seed: int | None = None) -> Tensor:
        raise NotImplementedError

    def step(self, actions: Tensor | None) -> StepResult:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # Exact resume. Sources that can snapshot their state (the built-in tasks) override these; the
    # others return None and the training loop resets them on resume.
    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise EnvError(f"{type(self).__name__} cannot restore a saved environment state")

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
