"""Animal-learning prediction tasks: trace conditioning and trace patterning (Rafiee et al.).

Both are continuing policy-evaluation tasks without actions (``single_action_space is None``,
``step(None)``): a stream of binary observations in which a conditioned stimulus (CS) predicts an
unconditioned stimulus (US) that arrives an interstimulus interval (ISI) later, after a gap in which
nothing in the observation tells how long ago the CS was shown. Predicting the US therefore needs
memory of the CS over ISI steps. Environments are natively batched: every tensor holds ``B = num_envs``
independent streams and no step loops over envs.

**Trials.** Trials follow each other without pause. Trial step ``k = 0`` is the onset, where the CS
bits show the trial's pattern (and only there); the US bit is on at ``k = ISI`` if the pattern is
valid; the next trial's onset comes at ``k = ISI + ITI``, so a trial lasts ``ISI + ITI`` steps, with
``ISI ~ U{isi_min..isi_max}`` and ``ITI ~ U{iti_min..iti_max}`` drawn per trial (defaults 24..36 and
80..120). Distractor bit ``j = 1..num_distractors`` is on at every step independently with
probability ``1 / (10 j)``.

**Observation** (float32 {0, 1}): ``[CS bits, US bit, distractor bits]``.

* ``trace_patterning``: 6 CS bits; every onset shows one of the 20 patterns with exactly 3 bits on,
  uniformly; 10 of the 20 are *valid* (drawn per env when it is seeded) and only valid patterns are
  followed by the US. 6 + 1 + 5 = 12 inputs by default. The task needs memory *and* a nonlinear
  reading of the pattern.
* ``trace_conditioning``: the single-CS variant: one CS bit, on at every onset, and every trial ends
  in a US. 1 + 1 + 5 = 7 inputs by default. It needs memory only.

**Cumulant, return and the prediction target.** ``obs_t`` is the observation after ``t`` steps
(``obs_0`` from ``reset``). ``step`` returns ``obs_{t+1}`` and the cumulant ``c_{t+1}`` = the US bit
of ``obs_{t+1}`` as the reward. The prediction made from ``obs_t`` targets the discounted return

    G_t = Σ_{k≥0} γ^k c_{t+1+k}        (γ = ``gamma``, 0.9 by default)

which TD learns through ``δ_t = c_{t+1} + γ V(obs_{t+1}) − V(obs_t)``. ``info["true_return"]`` [B]
(float32) returned by the step that produces ``obs_{t+1}`` is ``G_{t+1}``, the target of the prediction
made from the observation that the same step returns.

The environment knows the schedule: it draws trials ahead and keeps a queue of the current and the
next ``Q − 1`` trials, so ``G_{t+1}`` is the realized return, computed in closed form from the US steps
of the queued trials. Later trials start at least ``(Q − 1)(isi_min + iti_min)`` steps ahead; ``Q`` is
chosen so that what they could add is below ``1e-10`` (``RETURN_TOLERANCE``).

There are no episodes: ``terminated`` and ``truncated`` are always False and ``info["episode"]``
never reports one. ``state_dict()`` / ``load_state_dict()`` snapshot everything, including the
random streams' counters, so a resumed stream continues exactly.

**Randomness.** Every env draws from its own counter-based stream (``envs.streams``: SplitMix64 from a
key that hashes the seed and the env's index in the run's whole batch), the same number of values at
every step, so each env's stream is a pure function of the seed and its index: a shard of a batch
(``take_shard``) computes exactly its rows of the whole batch's streams. Since every step takes the
same values in the same order, they are drawn up to ``DRAW_AHEAD_STEPS`` steps ahead in one batch of
tensor ops; what is drawn ahead and not yet taken is handed back before a stream is saved or stacked,
so the saved counters count the draws taken.

**Stacks.** ``stack(tasks)`` steps several tasks (of one kind and options, each seeded on its own) as
one env of all their envs: each block keeps its task's streams, so every block's stream is its task's
stream exactly, and one step of tensor ops serves them all (populations of learners step their
members' streams this way). ``unstack_into(tasks)`` writes the blocks' state back into the tasks,
whose ``state_dict`` then holds it.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, EnvShard, StepResult, VecEnv
from envs.registry import EnvOptions, register_env
from envs.streams import CounterStreams, integers_from_bits, uniform_from_bits

# The neglected tail of the true return (trials beyond the queue) is below this.
RETURN_TOLERANCE = 1e-10
MAX_QUEUED_TRIALS = 4096
# Steps of random draws taken from the streams at once (fewer where B · outputs per step · steps would
# pass DRAW_AHEAD_VALUES): one batch of ops serves many steps.
DRAW_AHEAD_STEPS = 256
DRAW_AHEAD_VALUES = 1 << 20


@dataclass
class TraceConditioningOptions(EnvOptions):
    """Timing and inputs of the trace-conditioning task (see the module docstring)."""

    num_envs: int = 1  # independent streams
    isi_min: int = 24
    isi_max: int = 36
    iti_min: int = 80
    iti_max: int = 120
    num_distractors: int = 5
    gamma: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("isi_min", "isi_max", "iti_min", "iti_max"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise EnvError(f"env.{key} must be an integer >= 1, got {value!r}")
        if self.isi_max < self.isi_min:
            raise EnvError(f"env.isi_max={self.isi_max} must be >= env.isi_min={self.isi_min}")
        if self.iti_max < self.iti_min:
            raise EnvError(f"env.iti_max={self.iti_max} must be >= env.iti_min={self.iti_min}")
        if not isinstance(self.num_distractors, int) or self.num_distractors < 0:
            raise EnvError(f"env.num_distractors must be an integer >= 0, got {self.num_distractors!r}")
        if not 0.0 <= float(self.gamma) < 1.0:
            raise EnvError(f"env.gamma must be in [0, 1), got {self.gamma!r}")


@dataclass
class TracePatterningOptions(TraceConditioningOptions):
    """Trace conditioning with a pattern of CS bits, of which only some predict the US."""

    cs_bits: int = 6  # CS inputs
    cs_bits_on: int = 3  # bits on in every pattern
    valid_patterns: int = 10  # patterns (of C(cs_bits, cs_bits_on)) that are followed by the US

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.cs_bits, int) or self.cs_bits < 1:
            raise EnvError(f"env.cs_bits must be an integer >= 1, got {self.cs_bits!r}")
        if not isinstance(self.cs_bits_on, int) or not 1 <= self.cs_bits_on <= self.cs_bits:
            raise EnvError(f"env.cs_bits_on must be an integer in 1..cs_bits={self.cs_bits}, got {self.cs_bits_on!r}")
        count = math.comb(self.cs_bits, self.cs_bits_on)
        if not isinstance(self.valid_patterns, int) or not 1 <= self.valid_patterns <= count:
            raise EnvError(
                f"env.valid_patterns must be an integer in 1..{count} (the number of patterns with "
                f"{self.cs_bits_on} of {self.cs_bits} bits on), got {self.valid_patterns!r}"
            )


class _TraceTask(VecEnv):
    """Shared machinery: a queue of scheduled trials per env, observations and the exact return."""

    def __init__(self, options: TraceConditioningOptions, patterns: Tensor, num_valid: int,
                 device: torch.device, seed: int = 0) -> None:
        self.options = options
        self.num_envs = options.num_envs
        self.device = torch.device(device)
        self.gamma = float(options.gamma)
        self._discount = torch.tensor(self.gamma, dtype=torch.float64, device=self.device)
        self.patterns = patterns.to(self.device, torch.float32)  # [P, cs_bits]
        self.num_patterns, self.cs_bits = self.patterns.shape
        self.num_valid = num_valid
        self.us_index = self.cs_bits
        self.observation_size = self.cs_bits + 1 + options.num_distractors
        self.single_observation_space = gym.spaces.Box(0.0, 1.0, (self.observation_size,), np.float32)
        self.single_action_space = None
        self.distractor_probs = 1.0 / (10.0 * torch.arange(1, options.num_distractors + 1, device=self.device))
        self.queued_trials = self._queue_length(options)
        self._seed = seed
        self._env_indices = torch.arange(self.num_envs, device=self.device)  # in the run's whole batch
        self._streams = CounterStreams.seeded(seed, self._env_indices)
        self._ahead: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # see _draw_ahead
        self._ahead_taken = 0
        self._stacked = False
        self._closed = False
        self._started = False

    @staticmethod
    def _queue_length(options: TraceConditioningOptions) -> int:
        """Smallest Q whose neglected tail γ^((Q−1)L + isi_min) / (1 − γ^L) is below RETURN_TOLERANCE."""
        gamma = float(options.gamma)
        if gamma == 0.0:
            return 1
        shortest = options.isi_min + options.iti_min
        # Solve (Q−1)·L·log γ + isi_min·log γ − log(1 − γ^L) ≤ log tol for Q.
        budget = math.log(RETURN_TOLERANCE) + math.log(1.0 - gamma**shortest) - options.isi_min * math.log(gamma)
        queued = 1 + max(0, math.ceil(budget / (shortest * math.log(gamma))))
        if queued > MAX_QUEUED_TRIALS:
            raise EnvError(
                f"env.gamma={gamma} is too close to 1 for trials of {shortest}+ steps: the exact return would "
                f"need {queued} scheduled trials (at most {MAX_QUEUED_TRIALS}); lower env.gamma or lengthen trials"
            )
        return queued

    # ----------------------------------------------------------------------------------------------
    # Random draws (each env from its own stream)

    def take_shard(self, shard: EnvShard) -> None:
        """Make these envs rows ``shard.rows`` of a batch of ``shard.total``: their streams are those rows'
        streams of the whole batch from the same seed."""
        self.shard = shard
        self._env_indices = torch.arange(shard.offset, shard.offset + shard.size, device=self.device)

    def _draw_trials(self, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """ISI [B, count], trial length ISI + ITI [B, count] and pattern index [B, count]."""
        ranges = [(self.options.isi_min, self.options.isi_max), (self.options.iti_min, self.options.iti_max),
                  (0, self.num_patterns - 1)]
        isi, iti, pattern = self._streams.integer_blocks(ranges, count)
        return isi, isi + iti, pattern

    @property
    def _outputs_per_step(self) -> int:
        """Stream outputs each step takes: the successor trial's ISI, ITI and pattern, then the distractors."""
        return 3 + self.options.num_distractors

    def _draw_ahead(self) -> None:
        """Draw the next K steps' values at once: ISI, trial length and pattern [B, K] and the distractor
        bits [B, K, D]; the same values as K steps' draws one by one, since each step takes the same number
        of outputs (``_outputs_per_step``) in the same order."""
        per_step = self._outputs_per_step
        steps = max(1, min(DRAW_AHEAD_STEPS, DRAW_AHEAD_VALUES // (self.num_envs * per_step)))
        outputs = self._streams.bits(steps * per_step).view(self.num_envs, steps, per_step)
        isi = integers_from_bits(outputs[..., 0], self.options.isi_min, self.options.isi_max)
        iti = integers_from_bits(outputs[..., 1], self.options.iti_min, self.options.iti_max)
        pattern = integers_from_bits(outputs[..., 2], 0, self.num_patterns - 1)
        distractors = (uniform_from_bits(outputs[..., 3:]) < self.distractor_probs).float()
        self._ahead, self._ahead_taken = (isi, isi + iti, pattern, distractors), 0

    def _take_step_draws(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This step's ISI, length and pattern [B, 1] and distractor bits [B, D], from the values drawn ahead."""
        if self._ahead is None or self._ahead_taken == self._ahead[0].shape[1]:
            self._draw_ahead()
        k = self._ahead_taken
        self._ahead_taken += 1
        isi, length, pattern, distractors = self._ahead
        return isi[:, k:k + 1], length[:, k:k + 1], pattern[:, k:k + 1], distractors[:, k]

    def _return_draws_ahead(self) -> None:
        """Give back the values drawn ahead and not taken: the counters then count exactly the draws taken,
        which is what a saved, stacked or split stream must hold."""
        if self._ahead is not None:
            untaken = self._ahead[0].shape[1] - self._ahead_taken
            self._streams.counters = self._streams.counters - untaken * self._outputs_per_step
            self._ahead = None

    def _draw_valid_patterns(self) -> Tensor:
        """[B, P] bool: a uniformly random subset of ``num_valid`` patterns per env."""
        scores = self._streams.uniform(self.num_patterns)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return ranks < self.num_valid

    # ----------------------------------------------------------------------------------------------
    # VecEnv

    def reset(self, seed: int | None = None) -> Tensor:
        self._check_open()
        if self._stacked:
            raise EnvError(f"a stack of {self.name} tasks is not reset: reset its tasks and stack them again")
        if seed is not None:
            self._seed = int(seed)
        self._streams = CounterStreams.seeded(self._seed, self._env_indices)
        self._ahead = None
        self._valid = self._draw_valid_patterns()
        self._isi, self._length, self._pattern = self._draw_trials(self.queued_trials)
        self._trial_step = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._started = True
        distractors = (self._streams.uniform(self.options.num_distractors) < self.distractor_probs).float()
        return self._observation(distractors)

    def step(self, actions: Tensor | None = None) -> StepResult:
        self._check_open()
        if actions is not None:
            raise EnvError(f"{self.name} is a prediction task without actions; call step(None)")
        if not self._started:
            raise EnvError(f"{self.name}: call reset() before step()")
        self._trial_step = self._trial_step + 1
        ended = self._trial_step >= self._length[:, 0]
        # Every env draws a successor trial each step (a fixed number of draws keeps the stream a pure
        # function of the seed); only envs whose trial ended take it, shifting their queue by one.
        isi, length, pattern, distractors = self._take_step_draws()
        shift = ended.unsqueeze(1)
        self._isi = torch.where(shift, torch.cat([self._isi[:, 1:], isi], dim=1), self._isi)
        self._length = torch.where(shift, torch.cat([self._length[:, 1:], length], dim=1), self._length)
        self._pattern = torch.where(shift, torch.cat([self._pattern[:, 1:], pattern], dim=1), self._pattern)
        self._trial_step = torch.where(ended, torch.zeros_like(self._trial_step), self._trial_step)

        obs = self._observation(distractors)
        reward = obs[:, self.us_index].clone()
        no_end = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        info = {
            "true_return": self.true_return(),
            "final_obs": obs,
            "episode": {
                "done": no_end,
                "return": torch.zeros(self.num_envs, device=self.device),
                "length": torch.zeros(self.num_envs, dtype=torch.long, device=self.device),
            },
        }
        return obs, reward, no_end, no_end.clone(), info

    def _observation(self, distractors: Tensor) -> Tensor:
        """[CS bits, US bit, distractor bits] [B, obs] of the current trial step (``distractors`` [B, D])."""
        onset = (self._trial_step == 0).unsqueeze(1).float()
        cs = self.patterns[self._pattern[:, 0]] * onset
        us = (self._trial_step == self._isi[:, 0]) & self._is_valid(self._pattern[:, :1]).squeeze(1)
        return torch.cat([cs, us.float().unsqueeze(1), distractors], dim=1)

    def _is_valid(self, pattern: Tensor) -> Tensor:
        """[B, Q] bool: whether the queued trials' patterns are followed by the US."""
        return self._valid.gather(1, pattern)

    def true_return(self) -> Tensor:
        """G of the current observation: Σ_{k≥0} γ^k c_{k+1} over the US steps of the queued trials. [B]"""
        # Onset of queued trial q, in steps from now: −k for the current one, then the lengths add up.
        onsets = torch.cat(
            [torch.zeros_like(self._length[:, :1]), self._length[:, :-1].cumsum(dim=1)], dim=1
        ) - self._trial_step.unsqueeze(1)
        us_offset = onsets + self._isi  # the US of trial q is this many steps ahead (≥ 1 if still to come)
        counts = self._is_valid(self._pattern) & (us_offset >= 1)
        terms = self._discount.pow((us_offset - 1).clamp(min=0).to(torch.float64)) * counts
        return terms.sum(dim=1).to(torch.float32)

    def close(self) -> None:
        self._closed = True

    # ----------------------------------------------------------------------------------------------
    # Stacks (see the module docstring)

    STREAM_STATE = ("_valid", "_isi", "_length", "_pattern", "_trial_step")

    @classmethod
    def stack(cls, tasks: Sequence[_TraceTask]) -> _TraceTask:
        """One env of all ``tasks``' envs, in order; each block keeps its task's streams."""
        first = tasks[0]
        for task in tasks:
            if type(task) is not type(first) or task.options != first.options or not task._started:
                raise EnvError(f"only started {first.name} tasks with the same options stack")
            task._return_draws_ahead()
        stacked = copy.copy(first)
        stacked.num_envs = sum(task.num_envs for task in tasks)
        stacked._stacked = True
        stacked._streams = CounterStreams.cat([task._streams for task in tasks])
        for name in cls.STREAM_STATE:
            setattr(stacked, name, torch.cat([getattr(task, name) for task in tasks]))
        return stacked

    def unstack_into(self, tasks: Sequence[_TraceTask]) -> None:
        """Write each block's stream state back into its task."""
        self._return_draws_ahead()
        start = 0
        for task in tasks:
            for name in self.STREAM_STATE:
                setattr(task, name, getattr(self, name)[start : start + task.num_envs].clone())
            task._streams = self._streams.rows(slice(start, start + task.num_envs))
            start += task.num_envs

    def _check_open(self) -> None:
        if self._closed:
            raise EnvError(f"{self.name} is closed")

    @property
    def name(self) -> str:
        return type(self).registered_name

    # ----------------------------------------------------------------------------------------------
    # Exact resume

    def state_dict(self) -> dict[str, Any]:
        if not self._started:
            return {"started": False, "seed": self._seed}
        self._return_draws_ahead()
        return {
            "started": True,
            "seed": self._seed,
            "stream_counters": self._streams.counters.clone(),
            "valid": self._valid.clone(),
            "isi": self._isi.clone(),
            "length": self._length.clone(),
            "pattern": self._pattern.clone(),
            "trial_step": self._trial_step.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_open()
        self._seed = int(state["seed"])
        if not state["started"]:
            self._started = False
            return
        if "stream_counters" not in state:
            raise EnvError(
                f"saved {self.name} state comes from an earlier rlmem, whose random streams were torch "
                "generators; the streams are counter-based now, so the run cannot continue exactly: start it again"
            )
        valid = state["valid"]
        if tuple(valid.shape) != (self.num_envs, self.num_patterns) or state["isi"].shape[1] != self.queued_trials:
            raise EnvError(
                f"saved {self.name} state does not fit this env: it holds {valid.shape[0]} envs and "
                f"{state['isi'].shape[1]} queued trials, this env has num_envs={self.num_envs} and "
                f"{self.queued_trials} (set env.num_envs and the timing options as in the saved run)"
            )
        self._streams = CounterStreams.seeded(self._seed, self._env_indices)  # keys: seed and env indices
        self._streams.counters = state["stream_counters"].to(self.device)
        self._ahead = None
        self._valid = valid.to(self.device)
        self._isi = state["isi"].to(self.device)
        self._length = state["length"].to(self.device)
        self._pattern = state["pattern"].to(self.device)
        self._trial_step = state["trial_step"].to(self.device)
        self._started = True


@register_env("trace_conditioning", TraceConditioningOptions)
class TraceConditioning(_TraceTask):
    """Trace conditioning: one CS bit at each trial onset, the US ISI steps later (prediction, γ = 0.9)."""

    registered_name = "trace_conditioning"

    def __init__(self, options: TraceConditioningOptions, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(options, torch.ones(1, 1), num_valid=1, device=torch.device(device), seed=seed)


@register_env("trace_patterning", TracePatterningOptions)
class TracePatterning(_TraceTask):
    """Trace patterning: a 3-of-6 CS pattern at onset; only 10 of the 20 patterns predict the US."""

    registered_name = "trace_patterning"

    def __init__(self, options: TracePatterningOptions, device: torch.device | str = "cpu", seed: int = 0) -> None:
        patterns = torch.zeros(math.comb(options.cs_bits, options.cs_bits_on), options.cs_bits)
        for row, on in enumerate(itertools.combinations(range(options.cs_bits), options.cs_bits_on)):
            patterns[row, list(on)] = 1.0
        super().__init__(options, patterns, num_valid=options.valid_patterns, device=torch.device(device), seed=seed)
