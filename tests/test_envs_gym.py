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


class MissingDependency(gym.Env):
    """An env whose optional dependency is absent, as gymnasium reports it."""

    def __init__(self):
        raise gym.error.DependencyNotInstalled("needs a package that is not installed")


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
        ({"id": "rlmem-test/MissingDependency-v0"}, "cannot build env.id='rlmem-test/MissingDependency-v0': needs"),
    ],
)
def test_invalid_options_raise(spec, message):
    if "rlmem-test/MissingDependency-v0" not in gym.registry:
        gym.register("rlmem-test/MissingDependency-v0", entry_point=MissingDependency)
    with pytest.raises(EnvError, match=message):
        make_env({"name": "gym", "num_envs": 2, **spec})


class EchoMultiDiscrete(gym.Env):
    """Observes the last action it received (MultiDiscrete with a non-zero start); ends after 3 steps."""

    observation_space = gym.spaces.Box(-10, 10, (2,), dtype=np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 4], start=[1, -2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action))
        self.t += 1
        return np.asarray(action, dtype=np.float32), 0.0, self.t == 3, False, {}


def test_multi_discrete_actions_become_one_joint_choice():
    if "rlmem-test/EchoMultiDiscrete-v0" not in gym.registry:
        gym.register("rlmem-test/EchoMultiDiscrete-v0", entry_point=EchoMultiDiscrete)
    with make_env({"name": "gym", "id": "rlmem-test/EchoMultiDiscrete-v0", "num_envs": 3}) as env:
        assert env.single_action_space == gym.spaces.Discrete(12)
        env.reset(seed=0)
        obs, *_ = env.step(torch.tensor([0, 5, 11]))
        # Row-major: joint index k -> (k // 4, k % 4), shifted by the spaces' starts (1, -2).
        assert torch.equal(obs, torch.tensor([[1.0, -2.0], [2.0, -1.0], [3.0, 1.0]]))
        with pytest.raises(EnvError, match=r"valid actions: 0\.\.11"):
            env.step(torch.tensor([0, 12, 1]))


def test_popgym_without_the_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "popgym", None)  # makes `import popgym` fail
    with pytest.raises(EnvError, match=r"needs the package 'popgym'; install it with `pip install rlmem\[popgym\]`"):
        GymOptions(id="popgym-RepeatPreviousEasy-v0")


@pytest.mark.parametrize(
    "env_id",
    ["popgym-RepeatPreviousEasy-v0", "popgym-ConcentrationEasy-v0", "popgym-BattleshipEasy-v0",
     "popgym-PositionOnlyPendulumEasy-v0"],
)
def test_popgym_envs_run_through_the_adapter(env_id):
    pytest.importorskip("popgym")
    with make_env({"name": "gym", "id": env_id, "num_envs": 2}, seed=0) as env:
        obs = env.reset(seed=0)
        assert obs.dtype == torch.float32 and obs.shape == (2, *env.single_observation_space.shape)
        space = env.single_action_space
        running = torch.zeros(2, dtype=torch.float64)
        returns = []
        for _ in range(250):
            actions = torch.as_tensor(np.stack([space.sample() for _ in range(2)]))
            obs, reward, terminated, truncated, info = env.step(actions)
            running += reward.double()
            done = terminated | truncated
            torch.testing.assert_close(info["episode"]["return"][done], running[done])
            returns += running[done].tolist()
            running[done] = 0
        # POPGym scales every episode's return into [-1, 1].
        assert returns and all(-1 - 1e-5 <= r <= 1 + 1e-5 for r in returns)
