"""Any registered gymnasium environment behind the VecEnv contract.

The adapter runs gymnasium's own vector envs (``SyncVectorEnv`` or ``AsyncVectorEnv``) in same-step
autoreset mode, so the observation returned on an env's last step is already its next episode's first
observation and gymnasium's ``final_obs`` is the ended episode's terminal observation (the one reached
by the last action, never acted on).

Observations: a ``uint8`` Box with two or more dimensions (an image) passes through unchanged; every
other space is flattened to a ``float32`` vector ``[D]`` (Discrete and MultiDiscrete one-hot, Tuple
and Dict concatenated in order). ``hide_obs`` then drops chosen entries of that vector, which turns a
fully observed task into a partially observed one (CartPole without velocities: ``hide_obs=[1, 3]``).

Actions: Discrete and Box spaces as they are; a MultiDiscrete space ``nvec`` becomes one Discrete
choice over its ``prod(nvec)`` combinations in row-major order (POPGym's Battleship and MineSweeper
pick a cell this way), since that is what every learner supports.

With ``vectorization: async``, ``step_async``/``step_wait`` are gymnasium's own: the subprocesses step
meanwhile. ``split`` rebuilds the env as several vector envs (env ``j`` keeps its seed).

Ids with a namespace provided by an optional package are imported on demand: ``popgym-*`` ids import
``popgym``, ``ALE/*`` ids import ``ale_py``; ``module:Id-v0`` imports ``module`` first, as
``gymnasium.make`` does.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, StepResult
from envs.common import EpisodeTracker, LibraryVecEnv, copy_tensor, to_numpy_actions, to_tensor
from envs.registry import EnvOptions, register_env

VECTORIZATION_MODES = ("sync", "async")
MAX_JOINT_ACTIONS = 4096  # MultiDiscrete action spaces up to this many combinations become one Discrete
# Id prefix -> the optional package that registers those ids when imported, and its pip extra.
_PROVIDERS = {"popgym-": ("popgym", "rlmem[popgym]"), "ALE/": ("ale_py", "rlmem[atari]")}


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python containers (options may come straight from a config)."""
    if type(value).__name__ in ("DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_gym_id(env_id: str) -> str:
    """Import whatever registers ``env_id`` and return the plain registry id; unknown id -> EnvError."""
    if ":" in env_id:
        module, env_id = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EnvError(f"env.id names module {module!r}, which cannot be imported: {err}") from None
    for prefix, (package, extra) in _PROVIDERS.items():
        if env_id.startswith(prefix):
            try:
                provider = importlib.import_module(package)
            except ImportError:
                raise EnvError(
                    f"env.id={env_id!r} needs the package {package!r}; install it with `pip install {extra}`"
                ) from None
            if package == "ale_py":
                gym.register_envs(provider)
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "valid ids: see `gymnasium.registry.keys()`"
        raise EnvError(f"unknown gymnasium id env.id={env_id!r}; {hint}")
    return env_id


@dataclass
class GymOptions(EnvOptions):
    id: str = "CartPole-v1"
    vectorization: str = "sync"  # sync (one process) | async (one subprocess per env)
    hide_obs: list[int] = field(default_factory=list)  # entries of the flat observation hidden from the agent
    max_episode_steps: int | None = None  # truncate episodes here (None: the id's own limit)
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the environment's constructor

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.id, str) or not self.id:
            raise EnvError(f"env.id must be a gymnasium id such as 'CartPole-v1', got {self.id!r}")
        if self.vectorization not in VECTORIZATION_MODES:
            raise EnvError(
                f"env.vectorization must be one of {', '.join(VECTORIZATION_MODES)}; got {self.vectorization!r}"
            )
        self.hide_obs = _plain(self.hide_obs)
        if not isinstance(self.hide_obs, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.hide_obs
        ):
            raise EnvError(f"env.hide_obs must be a list of non-negative observation indices, got {self.hide_obs!r}")
        if len(set(self.hide_obs)) != len(self.hide_obs):
            raise EnvError(f"env.hide_obs lists an index twice: {self.hide_obs!r}")
        self.hide_obs = list(self.hide_obs)
        if self.max_episode_steps is not None and (
            not isinstance(self.max_episode_steps, int) or self.max_episode_steps <= 0
        ):
            raise EnvError(f"env.max_episode_steps must be a positive integer or null, got {self.max_episode_steps!r}")
        self.env_kwargs = _plain(self.env_kwargs)
        if not isinstance(self.env_kwargs, dict):
            raise EnvError(f"env.env_kwargs must be a mapping of constructor arguments, got {self.env_kwargs!r}")
        self.id = resolve_gym_id(self.id)


def _is_image(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) >= 2


def _flat_size(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Box | gym.spaces.MultiBinary):
        return int(np.prod(space.shape))
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return int(space.nvec.sum())
    if isinstance(space, gym.spaces.Tuple):
        return sum(_flat_size(s) for s in space.spaces)
    if isinstance(space, gym.spaces.Dict):
        return sum(_flat_size(s) for s in space.spaces.values())
    raise EnvError(
        f"observation space {space} is not supported; valid choices: Box, Discrete, MultiDiscrete, "
        "MultiBinary, Tuple and Dict of those"
    )


def _flatten_batch(space: gym.Space, batch: Any) -> np.ndarray:
    """A batch of observations of ``space`` (gymnasium's batched layout) -> float32 ``[B, D]``."""
    if isinstance(space, gym.spaces.Box | gym.spaces.MultiBinary):
        batch = np.asarray(batch)
        return batch.reshape(batch.shape[0], -1).astype(np.float32)
    if isinstance(space, gym.spaces.Discrete):
        index = np.asarray(batch, dtype=np.int64) - int(space.start)
        return np.eye(int(space.n), dtype=np.float32)[index]
    if isinstance(space, gym.spaces.MultiDiscrete):
        values = np.asarray(batch, dtype=np.int64).reshape(len(batch), -1) - space.start.reshape(-1)
        nvec = space.nvec.reshape(-1)
        return np.concatenate([np.eye(int(n), dtype=np.float32)[values[:, i]] for i, n in enumerate(nvec)], axis=1)
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([_flatten_batch(s, b) for s, b in zip(space.spaces, batch)], axis=1)
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([_flatten_batch(s, batch[k]) for k, s in space.spaces.items()], axis=1)
    raise EnvError(f"observation space {space} is not supported")


def _flat_bounds(space: gym.Space) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(space, gym.spaces.Box):
        return space.low.reshape(-1).astype(np.float32), space.high.reshape(-1).astype(np.float32)
    if isinstance(space, gym.spaces.Tuple | gym.spaces.Dict):
        children = space.spaces if isinstance(space, gym.spaces.Tuple) else space.spaces.values()
        parts = [_flat_bounds(s) for s in children]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    size = _flat_size(space)  # one-hot and binary entries
    return np.zeros(size, dtype=np.float32), np.ones(size, dtype=np.float32)


@register_env("gym", GymOptions)
class GymVecEnv(LibraryVecEnv):
    """Any registered gymnasium id, vectorized by gymnasium (sync or async) with same-step autoreset."""

    _stepped: StepResult | None = None  # sync vectorization: the step taken by _send, until _receive

    def __init__(self, options: GymOptions, device: torch.device, seed: int = 0) -> None:
        super().__init__(options, device, seed)
        self.steps_in_background = options.vectorization == "async"  # subprocesses step between the calls

        make_kwargs = dict(options.env_kwargs)
        if options.max_episode_steps is not None:
            make_kwargs["max_episode_steps"] = options.max_episode_steps
        vector_kwargs: dict[str, Any] = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP, "copy": False}
        try:
            self.env = gym.make_vec(
                options.id,
                num_envs=options.num_envs,
                vectorization_mode=options.vectorization,
                vector_kwargs=vector_kwargs,
                **make_kwargs,
            )
        except TypeError as err:  # an env_kwargs key the constructor does not take
            raise EnvError(f"env.env_kwargs does not fit {options.id!r}: {err}") from None
        except (gym.error.Error, ImportError) as err:  # e.g. a dependency of the id that is not installed
            raise EnvError(f"cannot build env.id={options.id!r}: {err}") from None
        self._closed = False

        self.raw_observation_space = self.env.single_observation_space
        self._image = _is_image(self.raw_observation_space)
        if self._image:
            if options.hide_obs:
                self.close()
                raise EnvError(f"env.hide_obs applies to vector observations; {options.id!r} observes images")
            self.single_observation_space = self.raw_observation_space
            self._keep = None
        else:
            low, high = _flat_bounds(self.raw_observation_space)
            size = low.shape[0]
            bad = [i for i in options.hide_obs if i >= size]
            if bad:
                self.close()
                raise EnvError(
                    f"env.hide_obs index {bad[0]} is out of range: {options.id!r} observations have "
                    f"{size} entries (valid indices 0..{size - 1})"
                )
            keep = np.array([i for i in range(size) if i not in set(options.hide_obs)], dtype=np.int64)
            if keep.size == 0:
                self.close()
                raise EnvError(f"env.hide_obs hides every observation entry of {options.id!r}")
            self._keep = None if keep.size == size else keep
            self.single_observation_space = gym.spaces.Box(low[keep], high[keep], dtype=np.float32)

        self.raw_action_space = self.env.single_action_space
        self.single_action_space = self.raw_action_space
        if isinstance(self.raw_action_space, gym.spaces.MultiDiscrete) and self.raw_action_space.nvec.ndim == 1:
            # One discrete choice over all combinations (row-major), which every learner supports.
            combinations = int(np.prod(self.raw_action_space.nvec))
            if combinations > MAX_JOINT_ACTIONS:
                self.close()
                raise EnvError(
                    f"{options.id!r} has action space {self.raw_action_space}: {combinations} joint actions, "
                    f"more than the {MAX_JOINT_ACTIONS} a single discrete choice is offered for"
                )
            self.single_action_space = gym.spaces.Discrete(combinations)
        elif not isinstance(self.raw_action_space, gym.spaces.Discrete | gym.spaces.Box):
            self.close()
            raise EnvError(
                f"{options.id!r} has action space {self.raw_action_space}; valid choices: Discrete, Box, "
                "MultiDiscrete (as one joint discrete choice)"
            )
        self.episodes = EpisodeTracker(self.num_envs, self.device)

    # ----------------------------------------------------------------------------------------------

    def _observation(self, batch: Any) -> Tensor:
        """Raw batched observations -> the agent's tensor ``[B, *obs_shape]`` on ``device`` (a copy)."""
        if self._image:
            return to_tensor(batch, self.device)
        flat = _flatten_batch(self.raw_observation_space, batch)
        if self._keep is not None:
            flat = flat[:, self._keep]
        return to_tensor(flat, self.device)

    def _library_actions(self, actions: Tensor) -> np.ndarray:
        """Validated actions -> what the vector env takes (joint indices unravelled for MultiDiscrete)."""
        if self.single_action_space is self.raw_action_space:
            return to_numpy_actions(actions, self.raw_action_space)
        space = self.raw_action_space
        index = actions.detach().cpu().numpy()
        return (np.stack(np.unravel_index(index, tuple(space.nvec)), axis=1) + space.start).astype(space.dtype)

    def describe(self) -> str:
        return f"gym env {self.options.id!r}"

    def _reset_library(self, seed: int | None) -> Tensor:
        seed = self._reset_seed(seed)
        if seed is not None:
            self.single_action_space.seed(seed)
        obs, _ = self.env.reset(seed=seed)
        self.episodes.reset()
        return self._observation(obs)

    def _send(self, actions: Tensor) -> None:
        """Async vectorization: send the actions to the subprocesses; sync: step at once."""
        if self.steps_in_background:
            self.env.step_async(self._library_actions(actions))
        else:
            self._stepped = self._result(*self.env.step(self._library_actions(actions)))

    def _receive(self) -> StepResult:
        if self.steps_in_background:
            return self._result(*self.env.step_wait())
        result, self._stepped = self._stepped, None
        return result

    def _result(self, obs: Any, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                info: dict[str, Any]) -> StepResult:
        """The library's step result -> the VecEnv contract's."""
        next_obs = self._observation(obs)
        reward = to_tensor(reward, self.device, np.float32)
        terminated = to_tensor(terminated, self.device, np.bool_)
        truncated = to_tensor(truncated, self.device, np.bool_)
        done = terminated | truncated

        final_obs = copy_tensor(next_obs)
        ended = np.flatnonzero(info["_final_obs"]) if "_final_obs" in info else np.empty(0, dtype=np.int64)
        if ended.size:
            # gymnasium hands terminal observations over one object per ended env; batch only those.
            terminal = gym.vector.utils.concatenate(
                self.raw_observation_space,
                list(info["final_obs"][ended]),
                gym.vector.utils.create_empty_array(self.raw_observation_space, n=ended.size),
            )
            final_obs[torch.as_tensor(ended, device=self.device)] = self._observation(terminal)
        episode = self.episodes.update(reward, done)
        return next_obs, reward, terminated, truncated, {"final_obs": final_obs, "episode": episode}

    def _release(self) -> None:
        self.env.close()
