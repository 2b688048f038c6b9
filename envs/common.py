"""Pieces every VecEnv adapter shares: action validation, raw episode statistics, host-array copies,
and ``LibraryVecEnv``, the base of the adapters around a third-party vector env (ale-py, gymnasium,
ProcGen).

``LibraryVecEnv`` holds what those adapters have in common: the library env lives on the host
(``steps_on_host``); a step is ``_send(actions)`` (the library starts stepping, in its own threads or
processes where ``steps_in_background``) then ``_receive()`` (the step's result in the VecEnv
contract), which ``step_async``/``step_wait`` expose and ``step`` chains; ``split`` rebuilds the env
as groups of the same class with fewer envs (group ``i`` seeded with ``seed + start_i``) and
``_release``-s the library env they replace; once split, every call goes to the groups; a closed env
refuses every call. A subclass builds its library env and implements ``_reset_library``, ``_send``,
``_receive`` and ``_release`` (and ``_group_options`` where a group needs other options, such as a
share of the worker threads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, EnvShard, StepResult, VecEnv


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


class LibraryVecEnv(VecEnv):
    """Base of the adapters around a third-party vector env on the host (see the module docstring)."""

    steps_on_host = True
    _closed: bool = True  # until the library env exists, so a failed constructor leaves nothing to close

    def __init__(self, options: Any, device: torch.device | str, seed: int = 0) -> None:
        self.options = options  # the env's options dataclass (an ``envs.registry.EnvOptions``)
        self.num_envs = options.num_envs
        self.device = torch.device(device)
        self._seed = seed  # the seed the library env was built (or is first reset) with; groups count from it
        self._seeded = False

    def _reset_seed(self, seed: int | None) -> int | None:
        """The seed to reset the library env with: ``seed``; without one, the constructor's seed on the
        first reset and None (the library's own stream goes on) after it."""
        if seed is None and not self._seeded:
            seed = self._seed
        if seed is not None:
            self._seeded = True
        return seed

    def take_shard(self, shard: EnvShard) -> None:
        """Env ``j`` is seeded with ``seed + shard.offset + j``, as env ``shard.offset + j`` of the whole batch."""
        self.shard = shard
        self._seed += shard.offset

    def describe(self) -> str:
        """What the env is, for messages: ``"atari env (pong)"``."""
        return f"{type(self).__name__} env"

    # What a subclass implements. ---------------------------------------------------------------------

    def _reset_library(self, seed: int | None) -> Tensor:
        """Reset the library env (``seed``: None to continue its own stream) -> obs ``[B, *obs_shape]``."""
        raise NotImplementedError

    def _send(self, actions: Tensor) -> None:
        """Hand valid actions ``[B, *act_shape]`` to the library env."""
        raise NotImplementedError

    def _receive(self) -> StepResult:
        """The result of the step started by ``_send``, in the VecEnv contract."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free the library env (on close, or when ``split`` replaces it by groups)."""
        raise NotImplementedError

    def _group_options(self, parts: int) -> Any:
        """The options of each of ``parts`` groups (``num_envs`` is set per group afterwards)."""
        return self.options

    # The VecEnv contract on top of those. ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EnvError(f"the {self.describe()} is closed")

    def reset(self, seed: int | None = None) -> Tensor:
        self._check_open()
        self._check_idle()
        if seed is not None and self.shard is not None:
            seed += self.shard.offset
        if self._group is not None:
            return self._group.reset(seed)
        return self._reset_library(seed)

    def step(self, actions: Tensor | None) -> StepResult:
        self._check_open()
        self._check_idle()
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Tensor | None) -> None:
        """Validate the actions and hand them to the library (which may step until ``step_wait``)."""
        self._check_open()
        if self._group is not None:
            return self._group.step_async(actions)
        actions = check_actions(actions, self.single_action_space, self.num_envs)
        self._start_async()
        try:
            self._send(actions)
        except BaseException:
            self._step_in_flight = False
            raise

    def step_wait(self) -> StepResult:
        self._check_open()
        if self._group is not None:
            return self._group.step_wait()
        self._finish_async()
        return self._receive()

    def split(self, parts: int) -> Sequence[VecEnv]:
        self._check_open()
        options = self._group_options(parts)

        def make(num_envs: int, start: int) -> VecEnv:
            return type(self)(dataclasses.replace(options, num_envs=num_envs), self.device, self._seed + start)

        return self._split_with(parts, make, self._release)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._step_in_flight = False
            if self._group is not None:
                self._group.close()
            else:
                self._release()
