"""ObservationNoise: noise statistics, seeding, final_obs handling, uint8 frames and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.base import EnvError, VecEnv
from envs.wrappers import ObservationNoise


class _CountingEnv(VecEnv):
    """Observations are known constants: obs[b] = level + step count of env b; episodes last `length` steps."""

    def __init__(self, num_envs: int = 64, obs_dim: int = 6, length: int = 3, dtype=torch.float32, level=10.0):
        self.num_envs = num_envs
        self.dtype = dtype
        self.level = level
        self.length = length
        low, high = (0, 255) if dtype == torch.uint8 else (-np.inf, np.inf)
        np_dtype = np.uint8 if dtype == torch.uint8 else np.float32
        self.single_observation_space = gym.spaces.Box(low, high, (obs_dim,), dtype=np_dtype)
        self.single_action_space = gym.spaces.Discrete(2)
        self.device = torch.device("cpu")
        # envs start staggered so that some end at every step
        self.t = torch.arange(num_envs) % length
        self.obs_dim = obs_dim

    def _obs(self) -> torch.Tensor:
        values = (self.level + self.t).to(torch.float32).unsqueeze(1).expand(-1, self.obs_dim)
        return values.to(self.dtype).clone()

    def reset(self, seed=None):
        self.t = torch.arange(self.num_envs) % self.length
        return self._obs()

    def step(self, actions):
        self.t = self.t + 1
        ended = self.t >= self.length
        final = self._obs()
        self.t = torch.where(ended, torch.zeros_like(self.t), self.t)
        obs = self._obs()
        final = torch.where(ended.unsqueeze(1), final, obs)
        zeros = torch.zeros(self.num_envs, dtype=torch.bool)
        return obs, torch.zeros(self.num_envs), ended, zeros, {"final_obs": final}


def test_float_noise_has_the_requested_mean_and_standard_deviation():
    sigma = 0.7
    inner = _CountingEnv(num_envs=512, obs_dim=8)
    env = ObservationNoise(_CountingEnv(num_envs=512, obs_dim=8), sigma=sigma, seed=3)
    deviations = [env.reset(seed=0) - inner.reset(seed=0)]
    for _ in range(4):
        obs, *_ = env.step(torch.zeros(512, dtype=torch.long))
        clean, *_ = inner.step(torch.zeros(512, dtype=torch.long))
        deviations.append(obs - clean)
    noise = torch.cat(deviations).double().flatten()
    count = noise.numel()  # 20480 draws: the standard error of the mean is sigma / 143
    assert abs(noise.mean().item()) < 4 * sigma / count**0.5
    assert noise.std().item() == pytest.approx(sigma, rel=0.03)
    # independent across envs and features, not one draw broadcast
    assert noise.view(5, 512, 8).std(dim=1).min().item() > 0.5 * sigma


def test_same_seed_reproduces_and_other_seeds_differ_without_touching_the_env():
    def rollout(seed):
        env = ObservationNoise(_CountingEnv(), sigma=1.0, seed=seed)
        frames = [env.reset(seed=0)]
        for _ in range(3):
            obs, _r, _te, _tr, info = env.step(torch.zeros(64, dtype=torch.long))
            frames += [obs, info["final_obs"]]
        return torch.stack(frames)

    a, b, c = rollout(1), rollout(1), rollout(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the clean stream underneath is the same whatever the noise seed (the wrapper has its own generator)
    clean = _CountingEnv()
    clean.reset(seed=0)
    noisy = ObservationNoise(_CountingEnv(), sigma=1.0, seed=5)
    noisy.reset(seed=0)
    for _ in range(3):
        clean.step(None)
        noisy.step(None)
    assert torch.equal(noisy.env.t, clean.t)


def test_final_obs_is_noisy_and_matches_obs_for_envs_that_did_not_end():
    env = ObservationNoise(_CountingEnv(num_envs=300, length=3), sigma=0.5, seed=0)
    inner = _CountingEnv(num_envs=300, length=3)
    env.reset(seed=0)
    inner.reset(seed=0)
    obs, _r, terminated, truncated, info = env.step(None)
    _o, _r, _te, _tr, clean_info = inner.step(None)
    ended = terminated | truncated
    assert 0 < int(ended.sum()) < 300
    final = info["final_obs"]
    assert torch.equal(final[~ended], obs[~ended])
    # ended envs: noise around the true last observation, drawn independently of obs
    final_noise = (final[ended] - clean_info["final_obs"][ended]).flatten()
    assert final_noise.std().item() == pytest.approx(0.5, rel=0.15)
    assert not torch.allclose(final[ended] - clean_info["final_obs"][ended], obs[ended] - inner._obs()[ended])


def test_uint8_frames_get_pixel_unit_noise_clipped_to_the_valid_range():
    sigma = 20.0
    mid = ObservationNoise(_CountingEnv(num_envs=512, dtype=torch.uint8, level=120.0, length=100), sigma, seed=0)
    obs = mid.reset()
    assert obs.dtype == torch.uint8
    deviation = obs.float() - 120.0 - mid.env.t.float().unsqueeze(1)
    assert deviation.std().item() == pytest.approx(sigma, rel=0.05)
    assert abs(deviation.mean().item()) < 1.0
    low = ObservationNoise(_CountingEnv(num_envs=512, dtype=torch.uint8, level=0.0, length=1), sigma, seed=0)
    frames = low.reset().float()
    assert frames.min().item() == 0.0  # clipped, not wrapped around to 255
    assert frames.max().item() < 120.0
    assert (frames == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_zero_sigma_passes_observations_through():
    env = ObservationNoise(_CountingEnv(), sigma=0.0, seed=0)
    inner = _CountingEnv()
    assert torch.equal(env.reset(), inner.reset())
    obs, _r, _te, _tr, info = env.step(None)
    clean, _r, _te, _tr, clean_info = inner.step(None)
    assert torch.equal(obs, clean)
    assert torch.equal(info["final_obs"], clean_info["final_obs"])


def test_bad_sigma_and_unsupported_observations_raise_env_errors():
    with pytest.raises(EnvError, match="sigma"):
        ObservationNoise(_CountingEnv(), sigma=-0.1, seed=0)
    discrete = _CountingEnv()
    discrete.single_observation_space = gym.spaces.Discrete(4)
    with pytest.raises(EnvError, match="Box"):
        ObservationNoise(discrete, sigma=0.1, seed=0)
    integer = _CountingEnv()
    integer.single_observation_space = gym.spaces.Box(0, 10, (6,), dtype=np.int64)
    with pytest.raises(EnvError, match="int64"):
        ObservationNoise(integer, sigma=0.1, seed=0)


def test_wrapper_exposes_the_vecenv_attributes():
    inner = _CountingEnv(num_envs=7)
    env = ObservationNoise(inner, sigma=0.1, seed=0)
    assert env.num_envs == 7
    assert env.single_observation_space is inner.single_observation_space
    assert env.single_action_space is inner.single_action_space
    assert env.obs_dim == inner.obs_dim  # other attributes reach the wrapped env
