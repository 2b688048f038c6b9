"""Built-in memory tasks, natively batched in torch on ``device`` (no per-env Python loop).

Every task draws its randomness from one ``torch.Generator`` seeded by the constructor's ``seed`` (or
``reset(seed)``), and draws the same amount of it at every step whichever envs end, so a run is a pure
function of its seed and actions. ``state_dict()`` captures the episode positions, the hidden
targets, the episode counters and the generator state; a task loaded from it continues exactly as the
original would have.

Episodes end by termination only (their length is part of the task), with same-step autoreset. The
terminal observation an episode reaches after its last action is the all-zero observation; it is
``info["final_obs"]`` for the ended envs (rows of the other envs hold their current observation).
``info["success"]`` [B] float is the fraction of scored actions of the ended episode that were correct
(valid where the episode ended, 0 elsewhere); ``info["episode"]`` holds the raw returns and lengths.

Every task's episodes have a fixed length, so envs that start together end together forever, and a
learner whose window is shorter than an episode sees every reward in the same window out of
``episode_length / unroll_length`` (the others hold none). ``desync: true`` starts each env's first
episode after a reset at a uniformly random step of it (that episode is cut short and scores by
chance), which spreads the episode ends evenly over the windows.

Tasks (actions are discrete, observations float32 vectors):

``cue_recall``
    Step 0 shows a cue ``c`` (one of ``C = num_cues`` symbols, one-hot); steps 1..L (``L = delay``)
    are blank (zeros, plus N(0, ``noise``²) on the cue channels); step L + 1 is the query (flag bit
    set). Observation ``[one-hot cue (C) | query flag (1)]``. Reward at the query step
    ``r = +1 if a = c else −1``, then the episode terminates; every other step gives 0 and its action
    is ignored. An episode lasts L + 2 steps; a random policy's expected return is 2/C − 1.

``repeat_previous`` (POPGym's RepeatPrevious)
    Step t shows a random symbol ``s_t`` (one of ``num_symbols``, one-hot). From step k on, the action
    ``a_t`` is scored against ``s_{t−k}``: ``r_t = ±1 / (T − k)`` with ``T = episode_length``, so
    returns lie in [−1, 1]. Steps before k give 0.

``count_recall`` (POPGym's CountRecall)
    Step t shows a random symbol ``s_t`` and a random query symbol ``q_t``; observation
    ``[one-hot s_t | one-hot q_t]``. The action must name ``min(n_t(q_t), A − 1)``, where
    ``n_t(q) = #{τ ≤ t : s_τ = q}`` and ``A = num_actions``: ``r_t = ±1 / T``, returns in [−1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, EnvShard, StepResult, VecEnv
from envs.common import EpisodeTracker, check_actions
from envs.registry import EnvOptions, register_env


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise EnvError(f"env.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class MemoryTaskOptions(EnvOptions):
    """Options every built-in memory task has."""

    desync: bool = False  # start each env's first episode at a random step of it

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.desync, bool):
            raise EnvError(f"env.desync must be true or false, got {self.desync!r}")


class MemoryTask(VecEnv):
    """Shared machinery of the built-in tasks: seeding, episode counters, autoreset, state_dict.

    A task defines ``observation_size``, ``num_actions``, the names of its per-env state tensors
    (``state_names``) and three batched methods: ``_start(mask)`` begins new episodes where ``mask``,
    ``_observe()`` renders the current observation ``[B, D]``, and ``_score(actions)`` returns the
    step's ``(reward [B], terminated [B], scored [B], correct [B])`` and advances every env one step.
    """

    state_names: ClassVar[tuple[str, ...]] = ()
    observation_size: int  # D
    num_actions: int
    episode_length: int  # every episode's number of steps

    def __init__(self, options: MemoryTaskOptions, device: torch.device, seed: int = 0) -> None:
        self.options = options
        self.num_envs = options.num_envs
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # Random draws are made for this many envs and these rows kept (``take_shard``).
        self.drawn_envs, self.drawn_rows = self.num_envs, slice(None)
        self.single_action_space = gym.spaces.Discrete(self.num_actions)
        low, high = self._observation_bounds()
        self.single_observation_space = gym.spaces.Box(low, high, (self.observation_size,), dtype=np.float32)
        B = self.num_envs
        self.step_index = torch.zeros(B, dtype=torch.int64, device=self.device)  # position in the episode
        self.scored = torch.zeros(B, dtype=torch.int64, device=self.device)  # scored actions this episode
        self.correct = torch.zeros(B, dtype=torch.int64, device=self.device)  # correct ones among them
        self.episodes = EpisodeTracker(B, self.device)
        self._closed = False
        self._begin()

    def _begin(self) -> None:
        """Start every env's first episode (at a random step of it with ``desync``)."""
        self._start(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        if self.options.desync:
            self.step_index.copy_(self._randint(self.episode_length))

    def _observation_bounds(self) -> tuple[float, float]:
        return 0.0, 1.0

    # Task-specific pieces ---------------------------------------------------------------------------

    def _start(self, mask: Tensor) -> None:
        raise NotImplementedError

    def _observe(self) -> Tensor:
        raise NotImplementedError

    def _score(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    # Helpers ----------------------------------------------------------------------------------------

    def _randint(self, high: int, *shape: int) -> Tensor:
        return torch.randint(high, (self.drawn_envs, *shape), generator=self.generator,
                             device=self.device)[self.drawn_rows]

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(self.drawn_envs, *shape, generator=self.generator, device=self.device)[self.drawn_rows]

    def take_shard(self, shard: EnvShard) -> None:
        """Draw every step's randomness for all ``shard.total`` envs and keep rows ``shard.rows``, so that
        these envs are those of the whole batch from the same seed."""
        self.shard = shard
        self.drawn_envs, self.drawn_rows = shard.total, shard.rows

    def _one_hot(self, index: Tensor, size: int) -> Tensor:
        return torch.nn.functional.one_hot(index, size).to(torch.float32)

    # The VecEnv contract ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EnvError(f"the {type(self).__name__} env is closed")

    def reset(self, seed: int | None = None) -> Tensor:
        self._check_open()
        if seed is not None:
            self.generator.manual_seed(seed)
        for counter in (self.step_index, self.scored, self.correct):
            counter.zero_()
        self.episodes.reset()
        self._begin()
        return self._observe()

    def step(self, actions: Tensor | None) -> StepResult:
        self._check_open()
        actions = check_actions(actions, self.single_action_space, self.num_envs).to(self.device)
        reward, terminated, scored, correct = self._score(actions)
        self.scored += scored
        self.correct += correct
        success = torch.where(terminated, self.correct / self.scored.clamp(min=1), 0.0).to(torch.float32)
        episode = self.episodes.update(reward, terminated)

        self.step_index.masked_fill_(terminated, 0)
        self.scored.masked_fill_(terminated, 0)
        self.correct.masked_fill_(terminated, 0)
        self._start(terminated)
        obs = self._observe()
        final_obs = obs.masked_fill(terminated[:, None], 0.0)
        truncated = torch.zeros_like(terminated)
        return obs, reward, terminated, truncated, {"final_obs": final_obs, "episode": episode, "success": success}

    def close(self) -> None:
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        tensors = {name: getattr(self, name).clone() for name in ("step_index", "scored", "correct", *self.state_names)}
        return {"tensors": tensors, "episodes": self.episodes.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors = state["tensors"]
        if tensors["step_index"].shape[0] != self.num_envs:
            raise EnvError(
                f"the saved {type(self).__name__} state has {tensors['step_index'].shape[0]} envs, "
                f"this env has num_envs={self.num_envs}"
            )
        for name, value in tensors.items():
            getattr(self, name).copy_(value)
        self.episodes.load_state_dict(state["episodes"])
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------------


@dataclass
class CueRecallOptions(MemoryTaskOptions):
    num_cues: int = 4
    delay: int = 8  # blank steps between the cue and the query
    noise: float = 0.0  # std of Gaussian noise on the blank steps' cue channels

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("num_cues", self.num_cues, 2)
        _check_int("delay", self.delay, 0)
        if isinstance(self.noise, bool) or not isinstance(self.noise, int | float) or not self.noise >= 0:
            raise EnvError(f"env.noise must be a non-negative number, got {self.noise!r}")
        self.noise = float(self.noise)


@register_env("cue_recall", CueRecallOptions)
class CueRecall(MemoryTask):
    """Recall a cue shown at the first step after a delay of blank steps (reward ±1 at the query)."""

    state_names = ("cue",)

    def __init__(self, options: CueRecallOptions, device: torch.device, seed: int = 0) -> None:
        self.observation_size = options.num_cues + 1
        self.num_actions = options.num_cues
        self.episode_length = options.delay + 2
        self.cue = torch.zeros(options.num_envs, dtype=torch.int64, device=device)
        super().__init__(options, device, seed)

    def _observation_bounds(self) -> tuple[float, float]:
        return (-np.inf, np.inf) if self.options.noise > 0 else (0.0, 1.0)

    def _start(self, mask: Tensor) -> None:
        self.cue = torch.where(mask, self._randint(self.options.num_cues), self.cue)

    def _observe(self) -> Tensor:
        C, L = self.options.num_cues, self.options.delay
        t = self.step_index
        obs = torch.zeros(self.num_envs, C + 1, device=self.device)
        obs[:, :C] = self._one_hot(self.cue, C) * (t == 0)[:, None]
        if self.options.noise > 0:
            # Drawn for every env at every observation, so the stream does not depend on who is blank.
            noise = self._randn(C)
            blank = (t >= 1) & (t <= L)
            obs[:, :C] += noise * self.options.noise * blank[:, None]
        obs[:, C] = (t == L + 1).float()
        return obs

    def _score(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        query = self.step_index == self.options.delay + 1
        correct = query & (actions == self.cue)
        reward = torch.where(query, torch.where(correct, 1.0, -1.0), 0.0)
        self.step_index += 1
        return reward, query, query.long(), correct.long()


# --------------------------------------------------------------------------------------------------


@dataclass
class RepeatPreviousOptions(MemoryTaskOptions):
    num_symbols: int = 4
    k: int = 4  # the action names the symbol shown k steps earlier
    episode_length: int = 52

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("num_symbols", self.num_symbols, 2)
        _check_int("k", self.k, 1)
        _check_int("episode_length", self.episode_length, self.k + 1)


@register_env("repeat_previous", RepeatPreviousOptions)
class RepeatPrevious(MemoryTask):
    """Name the symbol shown k steps ago (POPGym RepeatPrevious; returns in [-1, 1])."""

    state_names = ("history",)

    def __init__(self, options: RepeatPreviousOptions, device: torch.device, seed: int = 0) -> None:
        self.observation_size = options.num_symbols
        self.num_actions = options.num_symbols
        self.episode_length = options.episode_length
        # Ring buffer of the last k + 1 symbols: s_t sits at column t mod (k + 1).
        self.history = torch.zeros(options.num_envs, options.k + 1, dtype=torch.int64, device=device)
        super().__init__(options, device, seed)

    def _column(self, offset: int = 0) -> Tensor:
        return ((self.step_index - offset) % (self.options.k + 1))[:, None]

    def _start(self, mask: Tensor) -> None:
        self._draw(mask)

    def _draw(self, mask: Tensor) -> None:
        """Write a fresh symbol at the current column of the envs in ``mask``."""
        symbol = self._randint(self.options.num_symbols)
        column = self._column()
        current = self.history.gather(1, column)[:, 0]
        self.history.scatter_(1, column, torch.where(mask, symbol, current)[:, None])

    def _observe(self) -> Tensor:
        return self._one_hot(self.history.gather(1, self._column())[:, 0], self.options.num_symbols)

    def _score(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k, T = self.options.k, self.options.episode_length
        scored = self.step_index >= k
        correct = scored & (actions == self.history.gather(1, self._column(k))[:, 0])
        reward = torch.where(scored, torch.where(correct, 1.0, -1.0), 0.0) / (T - k)
        terminated = self.step_index == T - 1
        self.step_index += 1
        self._draw(~terminated)  # ended envs draw their first symbol in _start, after the reset
        return reward, terminated, scored.long(), correct.long()


# --------------------------------------------------------------------------------------------------


@dataclass
class CountRecallOptions(MemoryTaskOptions):
    num_symbols: int = 4
    num_actions: int = 16  # counts 0..num_actions-1; larger counts are clipped to the largest
    episode_length: int = 52

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("num_symbols", self.num_symbols, 2)
        _check_int("num_actions", self.num_actions, 2)
        _check_int("episode_length", self.episode_length, 1)


@register_env("count_recall", CountRecallOptions)
class CountRecall(MemoryTask):
    """Name how often the query symbol has been shown so far (POPGym CountRecall; returns in [-1, 1])."""

    state_names = ("counts", "symbol", "query")

    def __init__(self, options: CountRecallOptions, device: torch.device, seed: int = 0) -> None:
        self.observation_size = 2 * options.num_symbols
        self.num_actions = options.num_actions
        self.episode_length = options.episode_length
        B, S = options.num_envs, options.num_symbols
        self.counts = torch.zeros(B, S, dtype=torch.int64, device=device)  # n_t(q) for every q
        self.symbol = torch.zeros(B, dtype=torch.int64, device=device)
        self.query = torch.zeros(B, dtype=torch.int64, device=device)
        super().__init__(options, device, seed)

    def _start(self, mask: Tensor) -> None:
        self.counts.masked_fill_(mask[:, None], 0)
        self._draw(mask)

    def _draw(self, mask: Tensor) -> None:
        """Show a fresh symbol and query to the envs in ``mask`` and count the symbol."""
        symbol, query = self._randint(self.options.num_symbols), self._randint(self.options.num_symbols)
        self.symbol = torch.where(mask, symbol, self.symbol)
        self.query = torch.where(mask, query, self.query)
        self.counts.scatter_add_(1, self.symbol[:, None], mask.long()[:, None])

    def _observe(self) -> Tensor:
        S = self.options.num_symbols
        return torch.cat([self._one_hot(self.symbol, S), self._one_hot(self.query, S)], dim=1)

    def _score(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        T = self.options.episode_length
        target = self.counts.gather(1, self.query[:, None])[:, 0].clamp(max=self.options.num_actions - 1)
        correct = actions == target
        reward = torch.where(correct, 1.0, -1.0) / T
        terminated = self.step_index == T - 1
        self.step_index += 1
        self._draw(~terminated)
        return reward, terminated, torch.ones_like(correct, dtype=torch.int64), correct.long()
