"""Atari 2600 games through ale-py's native vector env (C++ threads) behind the VecEnv contract.

Defaults follow the ALE v5 protocol (Machado et al., 2018): sticky actions with probability 0.25,
frameskip 4 with a max-pool over the last two frames, 84×84 grayscale, episodes capped at 108,000
frames (truncation), the minimal action set, no no-op or FIRE starts. Observations are uint8
``[B, frame_stack, 84, 84]``.

Learning aids change only what the learner sees, never the logs:

* ``episodic_life``: a lost life is reported as ``terminated`` (the learner stops bootstrapping
  there and resets memory) while the game itself goes on; the observation returned is simply the
  next frame, which starts the next "life episode".
* ``reward_clip``: the returned reward is clipped to [−1, 1].

``info["episode"]`` always describes whole games: raw (unclipped) return and length in agent steps,
``done`` only at game over or the frame cap, and ``hns``, the human-normalised score
``(return − random) / (human − random)``, for the games with reference scores (``HUMAN_RANDOM``).
Same-step autoreset is ale-py's own; ``info["final_obs"]`` holds the frame reached by the last action
of an ended game (and of a lost life, under ``episodic_life``).

``step_async``/``step_wait`` are ale-py's ``send``/``recv``: the emulators step in ale-py's C++
threads meanwhile. ``split`` rebuilds the env as several ale-py vector envs (env ``j`` keeps its seed)
whose emulator threads are capped at each group's share of the cores (``threads_per_group``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, StepResult, threads_per_group
from envs.common import EpisodeTracker, LibraryVecEnv, to_numpy_actions, to_tensor
from envs.registry import EnvOptions, register_env

# Random and human reference scores: game -> (random, human).
HUMAN_RANDOM: dict[str, tuple[float, float]] = {
    "pong": (-20.7, 14.6),
    "breakout": (1.7, 30.5),
    "ms_pacman": (307.3, 6951.6),
    "seaquest": (68.4, 42054.7),
    "space_invaders": (148.0, 1668.7),
    "qbert": (163.9, 13455.0),
    "boxing": (0.1, 12.1),
}


def game_names() -> list[str]:
    """The ROM names that ship with the installed ale-py (snake_case)."""
    from ale_py import roms

    return sorted(roms.get_all_rom_ids())


def normalize_game(name: str) -> str:
    """``"MsPacman"``, ``"ms-pacman"`` and ``"ms_pacman"`` all name the ROM ``ms_pacman``."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    return snake.replace("-", "_").lower()


@dataclass
class AtariOptions(EnvOptions):
    game: str = "pong"  # ROM name, snake_case (CamelCase is accepted)
    frame_stack: int = 1  # frames per observation
    frameskip: int = 4  # emulator frames per action (max-pooled over the last two)
    sticky_actions: float = 0.25  # probability that the emulator repeats the previous action
    max_episode_frames: int = 108_000  # truncate a game after this many emulator frames
    full_action_space: bool = False  # all 18 actions instead of the game's minimal set
    noop_max: int = 0  # up to this many no-ops at the start of a game (0: none, as in ALE v5)
    fire_reset: bool = False  # press FIRE at the start of a game where the game needs it
    episodic_life: bool = False  # learning only: a lost life terminates the learner's episode
    reward_clip: bool = False  # learning only: rewards clipped to [-1, 1]
    num_threads: int = 0  # emulator threads (0: one per env, up to the number of cores)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.game, str) or not self.game:
            raise EnvError(f"env.game must be an Atari ROM name such as 'pong', got {self.game!r}")
        try:
            names = game_names()
        except ImportError:
            raise EnvError("the atari env needs ale-py; install it with `pip install rlmem[atari]`") from None
        game = normalize_game(self.game)
        if game not in names:
            close = difflib.get_close_matches(game, names, n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}; " if close else ""
            raise EnvError(f"unknown Atari game env.game={self.game!r}; {hint}valid names: {', '.join(names)}")
        self.game = game
        for key, minimum in (("frame_stack", 1), ("frameskip", 1), ("max_episode_frames", 1), ("noop_max", 0),
                             ("num_threads", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise EnvError(f"env.{key} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.sticky_actions, bool) or not isinstance(self.sticky_actions, int | float) or not (
            0.0 <= self.sticky_actions <= 1.0
        ):
            raise EnvError(f"env.sticky_actions must be a probability in [0, 1], got {self.sticky_actions!r}")
        for key in ("full_action_space", "fire_reset", "episodic_life", "reward_clip"):
            if not isinstance(getattr(self, key), bool):
                raise EnvError(f"env.{key} must be true or false, got {getattr(self, key)!r}")


@register_env("atari", AtariOptions)
class AtariVecEnv(LibraryVecEnv):
    """Atari 2600 games (ale-py AtariVectorEnv, ALE v5 protocol), uint8 frames [B, stack, 84, 84]."""

    steps_in_background = True  # send/recv

    def __init__(self, options: AtariOptions, device: torch.device, seed: int = 0) -> None:
        from ale_py.vector_env import AtariVectorEnv

        super().__init__(options, device, seed)
        self.env = AtariVectorEnv(
            options.game,
            options.num_envs,
            num_threads=options.num_threads,
            max_num_frames_per_episode=options.max_episode_frames,
            repeat_action_probability=float(options.sticky_actions),
            full_action_space=options.full_action_space,
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
            img_height=84,
            img_width=84,
            grayscale=True,
            stack_num=options.frame_stack,
            frameskip=options.frameskip,
            maxpool=True,
            noop_max=options.noop_max,
            # Life loss and reward clipping are applied here, so that episode statistics stay raw.
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            use_fire_reset=options.fire_reset,
        )
        self._closed = False
        self.single_observation_space = self.env.single_observation_space
        self.single_action_space = self.env.single_action_space
        self.episodes = EpisodeTracker(self.num_envs, self.device)
        self._lives = np.zeros(self.num_envs, dtype=np.int64)
        reference = HUMAN_RANDOM.get(options.game)
        self._hns_scale = None if reference is None else (reference[0], reference[1] - reference[0])

    def describe(self) -> str:
        return f"atari env ({self.options.game})"

    def _reset_library(self, seed: int | None) -> Tensor:
        obs, info = self.env.reset(seed=self._reset_seed(seed))
        self._lives = np.asarray(info["lives"], dtype=np.int64).copy()
        self.episodes.reset()
        return to_tensor(obs, self.device)

    def _send(self, actions: Tensor) -> None:
        """Send the actions; the emulators step in ale-py's threads until ``step_wait``."""
        self.env.send(to_numpy_actions(actions, self.single_action_space))

    def _receive(self) -> StepResult:
        obs, raw_reward, game_over, truncated, info = self.env.recv()
        game_done = game_over | truncated
        lives = np.asarray(info["lives"], dtype=np.int64)
        terminated = game_over
        if self.options.episodic_life:
            # A life lost while the game goes on (at game over the counter jumps back up on reset).
            terminated = game_over | ((lives < self._lives) & ~game_done)
        self._lives = lives.copy()

        next_obs = to_tensor(obs, self.device)
        if game_done.any():  # ale-py's final_obs rows are valid only where a game ended
            final_obs = to_tensor(np.where(game_done[:, None, None, None], info["final_obs"], obs), self.device)
        else:
            final_obs = to_tensor(obs, self.device)
        raw = to_tensor(raw_reward, self.device, np.float32)
        reward = raw.clamp(-1.0, 1.0) if self.options.reward_clip else raw
        episode = self.episodes.update(raw, to_tensor(game_done, self.device))
        if self._hns_scale is not None:
            random_score, span = self._hns_scale
            episode["hns"] = (episode["return"] - random_score) / span
        info_out: dict[str, Any] = {"final_obs": final_obs, "episode": episode}
        return (
            next_obs,
            reward,
            to_tensor(terminated, self.device, np.bool_),
            to_tensor(truncated, self.device, np.bool_),
            info_out,
        )

    def _group_options(self, parts: int) -> AtariOptions:
        return dataclasses.replace(self.options, num_threads=threads_per_group(self.options.num_threads, parts))

    def _release(self) -> None:
        self.env.close()
