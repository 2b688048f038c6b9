"""The gymnasium adapter: same-step autoreset against single reference envs, hidden observations, options."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import EnvError, make_env
from envs.gym_env import GymOptions


def reference_episodes(seed: int, env_index: int, steps: int, action: int, **make_kwargs):
    """Per step of one gymnasium env under a fixed action, as same-step autoreset should report it:
    (next obs, reward, terminated, truncated, final obs or None)."""
    env = gym.make("CartPole-v1", **make_kwargs)
    obs, _ = env.reset(seed=seed + env_index)  # gymnasium vector envs seed env i with seed + i
    out = [obs]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(action)
        final = None
        if terminated or truncated:
            final = obs
            obs, _ = env.reset()
        out.append((obs, reward, terminated, truncated, final))
    env.close()
    return out


@pytest.mark.parametrize(("vectorization", "num_envs"), [("sync", 3), ("async", 2)])
@pytest.mark.parametrize("max_episode_steps", [None, 6])
def test_cartpole_same_step_autoreset_matches_single_envs(vectorization, num_envs, max_episode_steps):
    # Pushing left forever ends CartPole deterministically within ~10 steps (termination) or at the
    # truncation limit; both must hand back the next episode's first obs on the same step.
    steps, seed = 30, 7
    spec = {"name": "gym", "num_envs": num_envs, "vectorization": vectorization,
            "max_episode_steps": max_episode_steps}
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    references = [reference_episodes(seed, i, steps, action=0, **kwargs) for i in range(num_envs)]
    with make_env(spec, seed=seed) as env:
        obs = env.reset(seed=seed)
        np.testing.assert_allclose(obs.numpy(), np.stack([r[0] for r in references]), rtol=0, atol=0)
        ended = 0
        for t in range(1, steps + 1):
            obs, reward, terminated, truncated, info = env.step(torch.zeros(num_envs, dtype=torch.int64))
            for i, ref in enumerate(references):
                ref_obs, ref_reward, ref_terminated, ref_truncated, ref_final = ref[t]
                np.testing.assert_array_equal(obs[i].numpy(), ref_obs.astype(np.float32))
                assert reward[i].item() == ref_reward
                assert bool(terminated[i]) == ref_terminated and bool(truncated[i]) == ref_truncated
                if ref_final is not None:
                    ended += 1
                    np.testing.assert_array_equal(info["final_obs"][i].numpy(), ref_final.astype(np.float32))
                    assert not torch.equal(info["final_obs"][i], obs[i])
        assert ended >= 2 * num_envs


def test_hide_obs_drops_entries_and_their_bounds():
    full_spec = {"name": "gym", "id": "CartPole-v1", "num_envs": 4}
    with make_env(full_spec, seed=3) as full, make_env({**full_spec, "hide_obs": [1, 3]}, seed=3) as hidden:
        assert hidden.single_observation_space.shape == (2,)
        np.testing.assert_array_equal(hidden.single_observation_space.high, full.single_observation_space.high[[0, 2]])
        obs_full, obs_hidden = full.reset(seed=3), hidden.reset(seed=3)
        assert obs_hidden.shape == (4, 2)
        assert torch.equal(obs_hidden, obs_full[:, [0, 2]])
        actions = torch.tensor([0, 1, 0, 1])
        for _ in range(15):
            obs_full, *_, info_full = full.step(actions)
            obs_hidden, *_, info_hidden = hidden.step(actions)
            assert torch.equal(obs_hidden, obs_full[:, [0, 2]])
            assert torch.equal(info_hidden["final_obs"], info_full["final_obs"][:, [0, 2]])


def test_discrete_observations_become_one_hot():
    with make_env({"name": "gym", "id": "FrozenLake-v1", "num_envs": 3}, seed=0) as env:
        assert env.single_observation_space.shape == (16,)
        obs = env.reset(seed=0)
        assert obs.dtype == torch.float32
        assert torch.equal(obs.sum(dim=1), torch.ones(3)) and torch.all(obs[:, 0] == 1)  # the start cell


def test_env_kwargs_reach_the_constructor():
    # Sutton & Barto's CartPole reward: 0 per step, -1 at the failure.
    spec = {"name": "gym", "num_envs": 2, "env_kwargs": {"sutton_barto_reward": True}}
    with make_env(spec, seed=0) as env:
        env.reset(seed=0)
        for _ in range(30):
            _, reward, terminated, _, _ = env.step(torch.zeros(2, dtype=torch.int64))
            assert torch.equal(reward, torch.where(terminated, -1.0, 0.0))


def test_env_kwargs_from_a_config_are_plain_dicts():
    from omegaconf import OmegaConf

    from envs.registry import env_options

    spec = OmegaConf.create({"name": "gym", "hide_obs": [2], "env_kwargs": {"sutton_barto_reward": True}})
    options = env_options(spec)
    assert type(options.env_kwargs) is dict and type(options.hide_obs) is list


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"id": "CartPol-v1"}, "unknown gymnasium id env.id='CartPol-v1'; close matches: CartPole-v"),
        ({"id": "NoSuchThingAtAll-v0"}, r"gymnasium\.registry"),
        ({"id": "no_such_module:Thing-v0"}, "cannot be imported"),
        ({"vectorization": "threads"}, "env.vectorization must be one of sync, async; got 'threads'"),
        ({"hide_obs": [4]}, r"env.hide_obs index 4 is out of range.*valid indices 0\.\.3"),
        ({"hide_obs": [1, 1]}, "twice"),
        ({"hide_obs": [-1]}, "non-negative"),
        ({"hide_obs": [0, 1, 2, 3]}, "hides every"),
        ({"max_episode_steps": 0}, "env.max_episode_steps"),
        ({"env_kwargs": {"gravity": 3.0}}, "env.env_kwargs does not fit"),
        ({"env_kwargs": [1]}, "env.env_kwargs must be a mapping"),
    ],
)
def test_invalid_options_raise(spec, message):
    with pytest.raises(EnvError, match=message):
        make_env({"name": "gym", "num_envs": 2, **spec})


def test_popgym_ids_use_the_optional_package():
    try:
        import popgym  # noqa: F401
    except ImportError:
        with pytest.raises(EnvError, match=r"pip install rlmem\[popgym\]"):
            GymOptions(id="popgym-RepeatPreviousEasy-v0")
        return
    with make_env({"name": "gym", "id": "popgym-RepeatPreviousEasy-v0", "num_envs": 2}, seed=0) as env:
        obs = env.reset(seed=0)
        assert obs.dtype == torch.float32 and obs.shape == (2, *env.single_observation_space.shape)
        returns = []
        for _ in range(200):
            actions = torch.randint(env.single_action_space.n, (2,))
            _, _, terminated, truncated, info = env.step(actions)
            done = terminated | truncated
            returns += info["episode"]["return"][done].tolist()
        assert returns and all(-1 - 1e-6 <= r <= 1 + 1e-6 for r in returns)
