"""Pieces every VecEnv adapter shares: action validation and raw episode statistics."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError


def check_actions(actions: Any, space: gym.Space, num_envs: int) -> Tensor:
    """Validate a batch of actions against ``space`` and return it as a tensor.

    Discrete: integer tensor ``[B]`` with values in ``[start, start + n)``. Box: float tensor
    ``[B, *shape]`` with finite values inside the bounds. One host read per call (the range check).
    """
    if not isinstance(actions, Tensor):
        raise EnvError(f"actions must be a torch tensor, got {type(actions).__name__}")
    if isinstance(space, gym.spaces.Discrete):
        if tuple(actions.shape) != (num_envs,):
            raise EnvError(f"discrete actions must have shape [{num_envs}] (one per env), got {list(actions.shape)}")
        if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
            raise EnvError(f"discrete actions must be an integer tensor, got dtype {actions.dtype}")
        start, n = int(space.start), int(space.n)
        low, high = torch.aminmax(actions)
        if int(low) < start or int(high) >= start + n:
            bad = int(low) if int(low) < start else int(high)
            raise EnvError(f"discrete action {bad} is out of range; valid actions: {start}..{start + n - 1}")
        return actions
    if isinstance(space, gym.spaces.Box):
        shape = (num_envs, *space.shape)
        if tuple(actions.shape) != shape:
            raise EnvError(f"continuous actions must have shape {list(shape)}, got {list(actions.shape)}")
        if not actions.dtype.is_floating_point:
            raise EnvError(f"continuous actions must be a float tensor, got dtype {actions.dtype}")
        low = torch.as_tensor(space.low, dtype=actions.dtype, device=actions.device)
        high = torch.as_tensor(space.high, dtype=actions.dtype, device=actions.device)
        outside = ~((actions >= low) & (actions <= high))  # NaN counts as outside
        if bool(outside.any()):
            raise EnvError(
                f"continuous action outside the bounds [{space.low.min():g}, {space.high.max():g}] "
                f"(or not finite): {actions[outside][0].item():g}"
            )
        return actions
    raise EnvError(f"unsupported action space {space}; valid choices: Discrete, Box")


class EpisodeTracker:
    """Raw return and length of every env's running episode, kept on ``device`` (no per-env loop).

    ``update(reward [B], done [B])`` adds the step and returns ``info["episode"]``: ``done`` [B] bool,
    ``return`` [B] float64 and ``length`` [B] int64 of the episodes that ended at this step (valid
    where ``done``), then starts the ended envs' counters afresh.
    """

    def __init__(self, num_envs: int, device: torch.device) -> None:
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.lengths = torch.zeros(num_envs, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.returns.zero_()
        self.lengths.zero_()

    def update(self, reward: Tensor, done: Tensor) -> dict[str, Tensor]:
        self.returns += reward
        self.lengths += 1
        episode = {"done": done.clone(), "return": self.returns.clone(), "length": self.lengths.clone()}
        self.returns.masked_fill_(done, 0.0)
        self.lengths.masked_fill_(done, 0)
        return episode

    def state_dict(self) -> dict[str, Tensor]:
        return {"returns": self.returns.clone(), "lengths": self.lengths.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.returns.copy_(state["returns"])
        self.lengths.copy_(state["lengths"])


def to_tensor(array: Any, device: torch.device, dtype: np.dtype | None = None) -> Tensor:
    """A C-contiguous tensor on ``device`` that owns a copy of ``array`` (libraries may reuse their buffers).

    The host copy is made by numpy: torch's own copy of a large array may start intra-op threads,
    which compete with an emulator's worker threads for the same cores.
    """
    if device.type == "cpu":
        return torch.from_numpy(np.array(array, dtype=dtype, copy=True, order="C"))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device)


def copy_tensor(tensor: Tensor) -> Tensor:
    """A copy of ``tensor``; on the CPU made by numpy, for the reason given in ``to_tensor``."""
    if tensor.device.type == "cpu":
        return torch.from_numpy(tensor.numpy().copy())
    return tensor.clone()


def to_numpy_actions(actions: Tensor, space: gym.Space) -> np.ndarray:
    """Actions as the numpy array a library expects (its own dtype)."""
    return actions.detach().cpu().numpy().astype(space.dtype, copy=False)
