"""VecEnv wrappers that change what the agent observes, for robustness studies.

``ObservationNoise(env, sigma, seed)`` adds i.i.d. Gaussian noise ``N(0, sigma²)`` to every observation
the agent sees, including ``info["final_obs"]``::

    obs_noisy = obs + sigma * ε,   ε ~ N(0, 1)   (float observations)
    obs_noisy = clip(round(obs + sigma * ε), 0, 255)   (uint8 frames: sigma is in pixel units)

The noise is drawn from the wrapper's own generator (seeded by ``seed``, on the env's device), so an
evaluation under noise is reproducible and does not disturb the environment's own random stream.
For envs that did not end at a step, ``final_obs`` holds their current observation (VecEnv contract),
so it receives the very same noisy value as ``obs``; envs that ended get independent noise on the last
observation of their episode.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from torch import Tensor

from envs.base import EnvError, StepResult, VecEnv


class ObservationNoise(VecEnv):
    """Gaussian observation noise N(0, sigma²) on every observation (final_obs included), seeded."""

    def __init__(self, env: VecEnv, sigma: float, seed: int) -> None:
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma >= 0:
            raise EnvError(f"observation noise sigma must be a number >= 0, got {sigma!r}")
        space = env.single_observation_space
        if not isinstance(space, gym.spaces.Box):
            raise EnvError(
                f"observation noise needs a Box observation space (float or uint8), got {type(space).__name__}"
            )
        if not (space.dtype == "uint8" or space.dtype.kind == "f"):
            raise EnvError(f"observation noise supports float and uint8 observations, got dtype {space.dtype}")
        self.env = env
        self.sigma = float(sigma)
        self.num_envs = env.num_envs
        self.single_observation_space = space
        self.single_action_space = env.single_action_space
        self.device = env.device
        self.generator = torch.Generator(device=env.device)
        self.generator.manual_seed(int(seed))

    def _noisy(self, obs: Tensor) -> Tensor:
        if self.sigma == 0.0:
            return obs
        if obs.is_floating_point():
            noise = torch.randn(obs.shape, generator=self.generator, device=obs.device, dtype=obs.dtype)
            return obs + self.sigma * noise
        if obs.dtype == torch.uint8:
            noise = torch.randn(obs.shape, generator=self.generator, device=obs.device)
            return (obs.float() + self.sigma * noise).round_().clamp_(0, 255).to(torch.uint8)
        raise EnvError(f"observation noise supports float and uint8 observations, got {obs.dtype}")

    def reset(self, seed: int | None = None) -> Tensor:
        return self._noisy(self.env.reset(seed))

    def step(self, actions: Tensor | None) -> StepResult:
        obs, reward, terminated, truncated, info = self.env.step(actions)
        obs = self._noisy(obs)
        if "final_obs" in info:
            ended = (terminated | truncated).view(-1, *([1] * (obs.dim() - 1)))
            info = {**info, "final_obs": torch.where(ended, self._noisy(info["final_obs"]), obs)}
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.env.close()

    def state_dict(self) -> dict[str, Any] | None:
        inner = self.env.state_dict()
        if inner is None:
            return None
        return {"env": inner, "noise_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.env.load_state_dict(state["env"])
        self.generator.set_state(state["noise_generator"])

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks: expose the wrapped env's extras (e.g. its options).
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)
