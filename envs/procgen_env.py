"""ProcGen games through the ``procgen`` module's native gym3 vector env, behind the VecEnv contract.

The standard protocol (Cobbe et al., 2020) is the default: easy mode, training on 200 levels from
level 0. Observations are uint8 ``[B, 3, 64, 64]`` (channels first); 15 discrete actions.

gym3 resets an ended episode inside ``act``: the next ``observe()`` returns the reward of the final
step together with ``first = True`` and the *new* episode's first frame. That is same-step autoreset
already (``done_t = first`` after the step), with two consequences that this adapter documents rather
than hides:

* ProcGen never exposes the terminal frame, so ``info["final_obs"]`` is the returned observation
  tensor itself (for an ended env, the next episode's first frame).
* ProcGen does not tell a time-out from a real end; every end is reported as ``terminated`` (the
  usual ProcGen convention) and ``truncated`` is always False, so no learner bootstraps from
  ``final_obs``.

gym3 envs cannot be reset; ``reset(seed)`` builds a fresh vector env seeded with ``seed``.

``step_async``/``step_wait`` are gym3's ``act``/``observe``: ProcGen steps in its worker threads
meanwhile. ``split`` rebuilds the env as several gym3 envs (group ``i`` seeded with ``seed + start_i``)
whose worker threads are capped at each group's share of the cores (``threads_per_group``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, StepResult, threads_per_group
from envs.common import EpisodeTracker, LibraryVecEnv, to_tensor
from envs.registry import EnvOptions, register_env

DISTRIBUTION_MODES = ("easy", "hard", "memory")
MEMORY_MODE_GAMES = ("caveflyer", "dodgeball", "heist", "jumper", "maze", "miner")


INSTALL_HINT = (
    "install it with `make install`, or by hand: `pip install rlmem[procgen]`, then "
    "`pip install --no-deps gym3==0.3.3 procgen-mirror==0.10.7` (procgen==0.10.7 before Python 3.11)"
)


def procgen_module() -> Any:
    """Import ``procgen`` (it imports the legacy ``gym``, whose import prints a notice; keep it quiet)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import procgen
    except ImportError as err:
        raise EnvError(f"the procgen env needs the procgen module ({err}); {INSTALL_HINT}") from None
    return procgen


def game_names() -> list[str]:
    """The ProcGen games of the installed module."""
    return sorted(procgen_module().env.ENV_NAMES)


@dataclass
class ProcgenOptions(EnvOptions):
    game: str = "maze"
    distribution_mode: str = "easy"  # easy | hard | memory (memory: caveflyer dodgeball heist jumper maze miner)
    num_levels: int = 200  # levels the training envs draw from (0: unlimited)
    start_level: int = 0  # the first of those levels
    num_threads: int = 4  # procgen's worker threads

    def __post_init__(self) -> None:
        super().__post_init__()
        names = game_names()
        if self.game not in names:
            close = difflib.get_close_matches(str(self.game), names, n=3, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}; " if close else ""
            raise EnvError(f"unknown ProcGen game env.game={self.game!r}; {hint}valid names: {', '.join(names)}")
        if self.distribution_mode not in DISTRIBUTION_MODES:
            raise EnvError(
                f"env.distribution_mode must be one of {', '.join(DISTRIBUTION_MODES)}; got {self.distribution_mode!r}"
            )
        if self.distribution_mode == "memory" and self.game not in MEMORY_MODE_GAMES:
            raise EnvError(
                f"env.distribution_mode='memory' is not available for env.game={self.game!r}; "
                f"games with a memory mode: {', '.join(MEMORY_MODE_GAMES)}"
            )
        for key, minimum in (("num_levels", 0), ("start_level", 0), ("num_threads", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise EnvError(f"env.{key} must be an integer >= {minimum}, got {value!r}")


@register_env("procgen", ProcgenOptions)
class ProcgenVecEnv(LibraryVecEnv):
    """ProcGen games (gym3 vector env; easy mode, 200 levels by default), uint8 frames [B, 3, 64, 64]."""

    steps_in_background = True  # act/observe

    def __init__(self, options: ProcgenOptions, device: torch.device, seed: int = 0) -> None:
        procgen_module()
        super().__init__(options, device, seed)
        self.single_observation_space = gym.spaces.Box(0, 255, (3, 64, 64), dtype=np.uint8)
        self.single_action_space = gym.spaces.Discrete(15)
        self.episodes = EpisodeTracker(self.num_envs, self.device)
        self._seeds = np.random.default_rng(seed)  # seeds of the fresh envs that later resets build
        self.env, self._stepped = self._make(seed), False
        self._closed = False

    def describe(self) -> str:
        return f"procgen env ({self.options.game})"

    def _make(self, seed: int) -> Any:
        env = procgen_module().ProcgenGym3Env(
            num=self.num_envs,
            env_name=self.options.game,
            distribution_mode=self.options.distribution_mode,
            num_levels=self.options.num_levels,
            start_level=self.options.start_level,
            num_threads=self.options.num_threads,
            rand_seed=int(seed),
        )
        if env.ac_space.eltype.n != self.single_action_space.n:  # every ProcGen game has 15 actions
            raise EnvError(f"procgen {self.options.game!r} has {env.ac_space.eltype.n} actions, expected 15")
        return env

    def _frames(self, observation: dict[str, np.ndarray]) -> Tensor:
        """gym3's ``{"rgb": [B, 64, 64, 3]}`` -> uint8 ``[B, 3, 64, 64]`` on ``device``, in channels-last
        memory layout (a permuted view of a plain copy of the frames).

        A copy that also moves the channels costs several times a plain one on the host, so it is left
        to where it is cheap: the GPU, after the runner's pinned upload keeps the layout, or the
        rollout's store of the frame on a CPU (whose convolutions take either layout).
        """
        return to_tensor(observation["rgb"], self.device).permute(0, 3, 1, 2)

    def _reset_library(self, seed: int | None) -> Tensor:
        # An env that has not been stepped yet, with the requested seed, is already freshly reset.
        if self._stepped or (seed is not None and seed != self._seed):
            seed = int(self._seeds.integers(2**31 - 1)) if seed is None else seed
            self.env, self._seed = self._make(seed), seed
        self._stepped = False
        self.episodes.reset()
        _, observation, _ = self.env.observe()
        return self._frames(observation)

    def _send(self, actions: Tensor) -> None:
        """Hand the actions to gym3; ProcGen's threads step until ``step_wait``."""
        self.env.act(actions.detach().cpu().numpy().astype(np.int32))
        self._stepped = True

    def _receive(self) -> StepResult:
        reward, observation, first = self.env.observe()
        obs = self._frames(observation)
        reward = to_tensor(reward, self.device, np.float32)
        terminated = to_tensor(first, self.device, np.bool_)  # first after a step: the episode ended
        truncated = torch.zeros_like(terminated)
        episode = self.episodes.update(reward, terminated)
        # No terminal frame to report: final_obs is the returned frame itself (see the module docstring).
        return obs, reward, terminated, truncated, {"final_obs": obs, "episode": episode}

    def _group_options(self, parts: int) -> ProcgenOptions:
        # 0 threads (stepping in the caller's thread) stays 0; otherwise capped at each group's share of the cores.
        threads = self.options.num_threads and threads_per_group(self.options.num_threads, parts)
        return dataclasses.replace(self.options, num_threads=threads)

    def _release(self) -> None:
        self.env = None  # gym3 envs free their native resources when collected
