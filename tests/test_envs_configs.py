"""Every preset in configs/env/ names a registered environment with valid options and builds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from envs import make_env
from envs.registry import env_options

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "env"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))
# Presets whose source needs an optional package.
NEEDS = {"atari": "ale_py", "procgen": "procgen"}


def test_the_documented_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"cartpole", "cartpole_nv", "cue_recall", "repeat_previous", "count_recall"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds_and_steps(path):
    spec = OmegaConf.load(path)
    package = NEEDS.get(str(spec.name))
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    spec.num_envs = 2
    env_options(spec)
    with make_env(spec, seed=0) as env:
        obs = env.reset(seed=0)
        assert obs.shape == (2, *env.single_observation_space.shape)
        space = env.single_action_space  # None for prediction tasks, which step without actions
        actions = None if space is None else torch.as_tensor(np.stack([space.sample() for _ in range(2)]))
        next_obs, reward, *_ = env.step(actions)
        assert next_obs.shape == obs.shape and reward.shape == (2,)


def test_cartpole_nv_hides_the_velocities():
    options = env_options(OmegaConf.load(CONFIG_DIR / "cartpole_nv.yaml"))
    assert options.id == "CartPole-v1" and options.hide_obs == [1, 3]
    with make_env({"name": "gym", "hide_obs": [1, 3], "num_envs": 2}) as env:
        assert env.single_observation_space.shape == (2,)
