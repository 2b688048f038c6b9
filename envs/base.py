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

Optional, for overlapping environment stepping with policy inference (``agents.runner``); every
VecEnv has working defaults, so a source needs none of this to meet the contract:

* ``step_async(actions)`` then ``step_wait() -> StepResult`` is ``step(actions)`` in two halves. The
  default steps inside ``step_async``; a source whose library steps in its own threads or processes
  (ale-py ``send``/``recv``, gymnasium's ``AsyncVectorEnv``, ProcGen's ``act``/``observe``) returns
  from ``step_async`` at once and sets ``steps_in_background``, so that the caller can work meanwhile.
* ``split(parts)`` rebuilds the env as independent groups of consecutive envs (VecEnvs themselves)
  that can step at different times; the env itself then steps all its groups. The default returns
  ``[self]``: the env cannot be split.

Optional, for data-parallel training (a run's envs split across processes):

* ``take_shard(EnvShard(offset, total))`` makes this env of ``num_envs`` envs the envs
  ``[offset, offset + num_envs)`` of a run of ``total`` envs, so that whatever the number of shards its
  envs are the same envs as in one process: a source that seeds env ``j`` with ``seed + j`` (gymnasium,
  ale-py) seeds with ``seed + offset + j``; a built-in task, which draws each step's randomness for the
  whole batch from one generator, draws it for all ``total`` envs and keeps its own rows. Call it before
  the first ``reset``. The default refuses (``EnvError``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from rlmem.errors import ConfigError


class EnvError(ConfigError):
    """An environment error a user can cause (unknown id, bad action, closed env...)."""


StepResult = tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]


@dataclass(frozen=True)
class EnvShard:
    """Envs ``[offset, offset + size)`` of a run of ``total`` envs (one process's part of the batch)."""

    offset: int
    size: int
    total: int

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class VecEnv:
    """Base class of all batched environments; see the module docstring for the contract."""

    num_envs: int
    single_observation_space: gym.Space
    single_action_space: gym.Space | None
    device: torch.device

    #: True where the library hands out host (numpy) arrays (Atari, ProcGen, gymnasium). Such an env is
    #: built on the CPU whatever the training device: its results then reach a GPU policy through the
    #: runner's pinned buffers, asynchronously, instead of by a blocking copy inside every step.
    steps_on_host: bool = False

    def reset(self, seed: int | None = None) -> Tensor:
        raise NotImplementedError

    def step(self, actions: Tensor | None) -> StepResult:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # Asynchronous stepping (optional; see the module docstring). ------------------------------------

    #: True where ``step_async`` returns while the library steps in its own threads or processes.
    steps_in_background: bool = False
    #: Whether a runner should overlap this env's steps with inference (``env.overlap``); None: its choice.
    overlap: bool | None = None
    _pending_step: StepResult | None = None  # the default pair's result, held from step_async to step_wait
    _step_in_flight: bool = False

    def step_async(self, actions: Tensor | None) -> None:
        """Start a step; collect it with ``step_wait``. The default steps at once and keeps the result."""
        self._check_idle(twice=True)
        self._pending_step = self.step(actions)  # a bad action raises here, before the step counts as started
        self._step_in_flight = True

    def step_wait(self) -> StepResult:
        """The result of the step started by ``step_async``."""
        self._finish_async()
        result, self._pending_step = self._pending_step, None
        return result

    def _start_async(self) -> None:
        self._check_idle(twice=True)
        self._step_in_flight = True

    def _finish_async(self) -> None:
        if not self._step_in_flight:
            raise EnvError(f"{type(self).__name__}: step_wait was called without a step started by step_async")
        self._step_in_flight = False

    def _check_idle(self, twice: bool = False) -> None:
        """Raise unless no step is in flight (sources that step in the background call it in ``step``
        and ``reset``: their library would otherwise wait forever or mix two steps up)."""
        if self._step_in_flight:
            what = "step_async was called twice" if twice else "a step started by step_async is still pending"
            raise EnvError(f"{type(self).__name__}: {what}; collect it with step_wait first")

    _group: VecEnvGroup | None = None  # set by split(): this env then steps through its groups

    def split(self, parts: int) -> Sequence[VecEnv]:
        """Rebuild this env as ``parts`` independent groups of consecutive envs and return them.

        Group ``i`` holds envs ``[start_i, stop_i)`` (sizes differ by at most one); each is a VecEnv
        that steps on its own, while this env keeps working as before by stepping all of them. Call it
        before the first ``reset``: the groups start afresh. The default cannot split and returns
        ``[self]``.
        """
        return [self]

    def _split_with(self, parts: int, make: Callable[[int, int], VecEnv],
                    release: Callable[[], None]) -> Sequence[VecEnv]:
        """``split`` for sources that can build themselves again with fewer envs: ``make(num_envs_i,
        start_i)`` builds group i; ``release()`` frees this env's own library env, which the groups
        replace. Splitting again into as many groups returns the same groups."""
        self._check_idle()
        count = len(split_bounds(self.num_envs, parts))
        if self._group is not None:
            if len(self._group.parts) != count:
                raise EnvError(f"{type(self).__name__} is already split into {len(self._group.parts)} groups")
            return self._group.parts
        if count == 1:
            return [self]
        group = build_groups(self.num_envs, parts, make)
        release()
        self._group = group
        return group.parts

    #: The part of a larger batch this env is (``take_shard``); None: the whole batch.
    shard: EnvShard | None = None

    def take_shard(self, shard: EnvShard) -> None:
        """Be the envs ``shard.rows`` of a batch of ``shard.total`` (see the module docstring)."""
        raise EnvError(f"{type(self).__name__} cannot be split across processes (it has no per-env seeds)")

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


# --------------------------------------------------------------------------------------------------
# Groups of envs (``VecEnv.split``)


def split_bounds(num_envs: int, parts: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``num_envs`` consecutive envs in ``min(parts, num_envs)`` groups whose
    sizes differ by at most one (the first groups are the larger)."""
    parts = max(1, min(int(parts), num_envs))
    size, extra = divmod(num_envs, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_group(threads: int, parts: int) -> int:
    """Worker threads for each of ``parts`` groups of an env whose library was given ``threads``
    (0: one per available core): as many, but no more than the group's share of the cores. The
    groups step side by side, and more threads than cores only make them preempt each other and the
    policy (``rlmem bench envs``, overlap)."""
    share = max(1, available_cores() // max(1, parts))
    return min(threads, share) if threads else share


def _merge(values: list[Any], sizes: list[int]) -> Any:
    """Batch-first pieces of the groups -> one value for the whole batch (tensors and arrays are
    concatenated, dicts merged key by key; anything else becomes the list of the groups' values)."""
    first = values[0]
    if isinstance(first, Tensor) and first.dim() > 0 and [v.shape[0] for v in values] == sizes:
        return torch.cat(values)
    if isinstance(first, np.ndarray) and first.ndim > 0 and [len(v) for v in values] == sizes:
        return np.concatenate(values)
    if isinstance(first, dict):
        keys = [k for k in first if all(k in v for v in values)]
        return {k: _merge([v[k] for v in values], sizes) for k in keys}
    return values


class VecEnvGroup(VecEnv):
    """One VecEnv made of independent groups of consecutive envs (what ``split`` leaves behind).

    ``step`` starts every group's step before it waits for any, so groups whose library steps in the
    background step side by side. ``reset(seed)`` resets group ``i`` with ``seed + start_i``: sources
    that seed env ``j`` with ``seed + j`` (ale-py, gymnasium) then see the same seeds as unsplit.
    """

    def __init__(self, parts: Sequence[VecEnv]) -> None:
        if not parts:
            raise EnvError("a group of envs needs at least one part")
        self.parts = list(parts)
        self.sizes = [p.num_envs for p in self.parts]
        self.starts = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.num_envs = sum(self.sizes)
        self.single_observation_space = self.parts[0].single_observation_space
        self.single_action_space = self.parts[0].single_action_space
        self.device = self.parts[0].device

    @property
    def steps_in_background(self) -> bool:  # type: ignore[override]  (a class attribute elsewhere)
        return all(p.steps_in_background for p in self.parts)

    def reset(self, seed: int | None = None) -> Tensor:
        return torch.cat([p.reset(None if seed is None else seed + start)
                          for p, start in zip(self.parts, self.starts, strict=True)])

    def step(self, actions: Tensor | None) -> StepResult:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Tensor | None) -> None:
        if actions is not None and (not isinstance(actions, Tensor) or actions.dim() == 0
                                    or actions.shape[0] != self.num_envs):
            shape = list(actions.shape) if isinstance(actions, Tensor) else type(actions).__name__
            raise EnvError(f"actions must be a tensor with one row per env ({self.num_envs}), got {shape}")
        self._start_async()
        pieces = [None] * len(self.parts) if actions is None else actions.split(self.sizes)
        started: list[VecEnv] = []
        try:
            for part, piece in zip(self.parts, pieces, strict=True):
                part.step_async(piece)
                started.append(part)
        except BaseException:
            # A part refused its actions: finish the steps already started, so that no part is left
            # waiting and the group can step again.
            self._step_in_flight = False
            for part in started:
                part.step_wait()
            raise

    def step_wait(self) -> StepResult:
        self._finish_async()
        results = [p.step_wait() for p in self.parts]
        return tuple(_merge([r[i] for r in results], self.sizes) for i in range(5))  # type: ignore[return-value]

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def state_dict(self) -> dict[str, Any] | None:
        states = [p.state_dict() for p in self.parts]
        return None if any(s is None for s in states) else {"parts": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


def build_groups(num_envs: int, parts: int, make: Callable[[int, int], VecEnv]) -> VecEnvGroup:
    """``make(num_envs_i, start_i)`` for each of ``split_bounds(num_envs, parts)``, as one group; the
    parts built so far are closed if one fails."""
    built: list[VecEnv] = []
    try:
        for start, stop in split_bounds(num_envs, parts):
            built.append(make(stop - start, start))
    except BaseException:
        for part in built:
            part.close()
        raise
    return VecEnvGroup(built)
