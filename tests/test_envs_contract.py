"""The VecEnv contract, checked on every environment source built into rlmem.

Each source runs under random actions while the test keeps its own episode bookkeeping; the env's
``info["episode"]``, ``final_obs`` rows, dtypes and error behaviour must agree with it.
"""

from __future__ import annotations

import sys

import gymnasium as gym
import pytest
import torch

from envs import EnvError, make_env

SOURCES = {
    "gym_sync": {"name": "gym", "id": "CartPole-v1", "num_envs": 3},
    "gym_async": {"name": "gym", "id": "CartPole-v1", "num_envs": 2, "vectorization": "async"},
    "gym_pendulum": {"name": "gym", "id": "Pendulum-v1", "num_envs": 2, "max_episode_steps": 15},
    "cue_recall": {"name": "cue_recall", "num_envs": 3, "delay": 3},
    "cue_recall_noise": {"name": "cue_recall", "num_envs": 3, "delay": 3, "noise": 0.5},
    "repeat_previous": {"name": "repeat_previous", "num_envs": 3, "k": 2, "episode_length": 7},
    "count_recall": {"name": "count_recall", "num_envs": 3, "num_actions": 4, "episode_length": 6},
}


@pytest.fixture(params=sorted(SOURCES))
def spec(request):
    return SOURCES[request.param]


def random_actions(env, generator: torch.Generator) -> torch.Tensor:
    space = env.single_action_space
    B = env.num_envs
    if isinstance(space, gym.spaces.Discrete):
        return int(space.start) + torch.randint(int(space.n), (B,), generator=generator)
    low = torch.as_tensor(space.low)
    high = torch.as_tensor(space.high)
    return low + (high - low) * torch.rand(B, *space.shape, generator=generator)


def rollout(env, steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    obs = [env.reset(seed=seed)]
    results = []
    for _ in range(steps):
        actions = random_actions(env, generator)
        results.append((actions, *env.step(actions)))
        obs.append(results[-1][1])
    return obs, results


def test_step_contract_and_episode_statistics(spec):
    with make_env(spec, seed=3) as env:
        B = env.num_envs
        obs = env.reset(seed=3)
        assert obs.shape == (B, *env.single_observation_space.shape)
        assert obs.dtype == torch.float32 and obs.device == env.device
        generator = torch.Generator().manual_seed(0)
        running_return = torch.zeros(B, dtype=torch.float64)
        running_length = torch.zeros(B, dtype=torch.int64)
        finished = 0
        for _ in range(40):
            next_obs, reward, terminated, truncated, info = env.step(random_actions(env, generator))
            assert next_obs.shape == obs.shape and next_obs.dtype == torch.float32
            assert reward.shape == (B,) and reward.dtype == torch.float32
            assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
            assert terminated.shape == truncated.shape == (B,)
            done = terminated | truncated
            running_return += reward.double()
            running_length += 1
            episode = info["episode"]
            assert torch.equal(episode["done"], done)
            torch.testing.assert_close(episode["return"][done], running_return[done])
            assert torch.equal(episode["length"][done], running_length[done])
            # Rows of envs that did not end hold their current observation.
            assert torch.equal(info["final_obs"][~done], next_obs[~done])
            assert info["final_obs"].shape == next_obs.shape
            finished += int(done.sum())
            running_return[done] = 0.0
            running_length[done] = 0
            obs = next_obs
        assert finished > 0, "the test must see episodes end"


def test_same_seed_same_run_and_different_seed_differs(spec):
    with make_env(spec, seed=5) as a, make_env(spec, seed=5) as b:
        obs_a, res_a = rollout(a, 25, seed=11)
        obs_b, res_b = rollout(b, 25, seed=11)
    for x, y in zip(obs_a, obs_b):
        assert torch.equal(x, y)
    for x, y in zip(res_a, res_b):
        for u, v in zip(x[:5], y[:5]):
            assert torch.equal(u, v)
    with make_env(spec, seed=5) as c:
        obs_c, _ = rollout(c, 25, seed=12)
    assert any(not torch.equal(x, y) for x, y in zip(obs_a, obs_c))


def test_bad_actions_and_closed_env_raise(spec):
    env = make_env(spec, seed=0)
    env.reset(seed=0)
    space = env.single_action_space
    B = env.num_envs
    with pytest.raises(EnvError, match="shape"):
        env.step(random_actions(env, torch.Generator().manual_seed(0))[:-1])
    with pytest.raises(EnvError, match="torch tensor"):
        env.step(None)
    if isinstance(space, gym.spaces.Discrete):
        with pytest.raises(EnvError, match=r"out of range; valid actions: 0\.\."):
            env.step(torch.full((B,), int(space.n), dtype=torch.int64))
        with pytest.raises(EnvError, match="out of range"):
            env.step(torch.full((B,), -1, dtype=torch.int64))
        with pytest.raises(EnvError, match="integer"):
            env.step(torch.zeros(B))
    else:
        with pytest.raises(EnvError, match="outside the bounds"):
            env.step(torch.full((B, *space.shape), float(space.high.max()) + 1.0))
        with pytest.raises(EnvError, match="outside the bounds"):
            env.step(torch.full((B, *space.shape), float("nan")))
    # A rejected action leaves the env usable.
    env.step(random_actions(env, torch.Generator().manual_seed(1)))
    env.close()
    with pytest.raises(EnvError, match="closed"):
        env.step(random_actions(env, torch.Generator().manual_seed(1)))
    with pytest.raises(EnvError, match="closed"):
        env.reset()
    env.close()  # closing twice is harmless


@pytest.mark.parametrize("name", ["cue_recall", "cue_recall_noise", "repeat_previous", "count_recall"])
def test_state_dict_round_trip_continues_identically(name):
    spec = SOURCES[name]
    generator = torch.Generator().manual_seed(0)
    with make_env(spec, seed=1) as env:
        env.reset(seed=1)
        for _ in range(9):  # stop mid-episode, with some envs' episodes already restarted
            env.step(random_actions(env, generator))
        snapshot = env.state_dict()
        actions = [random_actions(env, generator) for _ in range(20)]
        original = [env.step(a) for a in actions]
    with make_env(spec, seed=99) as restored:
        restored.reset(seed=99)
        restored.load_state_dict(snapshot)
        for (obs, reward, terminated, truncated, info), a in zip(original, actions):
            obs2, reward2, terminated2, truncated2, info2 = restored.step(a)
            assert torch.equal(obs, obs2) and torch.equal(reward, reward2)
            assert torch.equal(terminated, terminated2) and torch.equal(truncated, truncated2)
            assert torch.equal(info["final_obs"], info2["final_obs"])
            for key in ("done", "return", "length"):
                assert torch.equal(info["episode"][key], info2["episode"][key])
            assert torch.equal(info["success"], info2["success"])


def test_state_dict_of_another_size_is_refused():
    small, big = make_env({"name": "cue_recall", "num_envs": 3}), make_env({"name": "cue_recall", "num_envs": 4})
    with pytest.raises(EnvError, match="num_envs=4"):
        big.load_state_dict(small.state_dict())


def test_gym_env_cannot_snapshot():
    with make_env(SOURCES["gym_sync"]) as env:
        assert env.state_dict() is None
        with pytest.raises(EnvError, match="cannot restore"):
            env.load_state_dict({})


def test_a_missing_optional_library_is_one_config_error(monkeypatch):
    # Without procgen (an import that fails), env=procgen ends in one EnvError, which the CLI prints
    # as one line with exit status 2 (a ConfigError), telling how to install it.
    from rlmem.errors import ConfigError

    monkeypatch.setitem(sys.modules, "procgen", None)  # `import procgen` now raises ImportError
    with pytest.raises(EnvError, match=r"needs the procgen module .*make install.*--no-deps") as error:
        make_env({"name": "procgen", "num_envs": 2})
    assert isinstance(error.value, ConfigError)
