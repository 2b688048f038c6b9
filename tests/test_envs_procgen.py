"""The ProcGen adapter (gym3 vector env): same-step autoreset from gym3's ``first`` flag, stats, seeding."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("procgen") is None:
    pytest.skip("procgen is not installed", allow_module_level=True)

from envs import EnvError, make_env
from envs.procgen_env import ProcgenOptions

NOOP = 4  # procgen's action 4 presses no button


def test_maze_timeout_and_goal_end_on_the_step_that_caused_them():
    # Standing still, every maze episode times out after exactly 500 steps; the step that ends it
    # returns the next level's first frame. Under random actions, the goal's reward and the
    # termination arrive together (same step), never a step apart.
    spec = {"name": "procgen", "game": "maze", "num_envs": 2}
    with make_env(spec, seed=0) as env:
        obs = env.reset()
        assert obs.dtype == torch.uint8 and obs.shape == (2, 3, 64, 64)
        first = obs
        for t in range(1, 501):
            obs, reward, terminated, truncated, info = env.step(torch.full((2,), NOOP))
            assert not truncated.any() and torch.all(reward == 0)
            assert torch.all(terminated == (t == 500))
            assert torch.equal(info["final_obs"], obs)
        assert torch.all(info["episode"]["length"] == 500) and torch.all(info["episode"]["return"] == 0)
        assert not torch.equal(obs, first)  # a new level

    with make_env({**spec, "num_envs": 8}, seed=1) as env:
        env.reset()
        generator = torch.Generator().manual_seed(1)
        running = torch.zeros(8, dtype=torch.float64)
        lengths = torch.zeros(8, dtype=torch.int64)
        goals = 0
        for _ in range(400):
            _, reward, terminated, _, info = env.step(torch.randint(15, (8,), generator=generator))
            assert torch.equal(reward > 0, terminated & (reward > 0))  # maze rewards only at its end
            running += reward.double()
            lengths += 1
            done = info["episode"]["done"]
            assert torch.equal(done, terminated)
            torch.testing.assert_close(info["episode"]["return"][done], running[done])
            assert torch.equal(info["episode"]["length"][done], lengths[done])
            goals += int((reward > 0).sum())
            running[done] = 0
            lengths[done] = 0
        assert goals > 0


def test_seeding_and_reset_rebuild_the_same_levels():
    spec = {"name": "procgen", "game": "coinrun", "num_envs": 3}
    with make_env(spec, seed=5) as a, make_env(spec, seed=5) as b, make_env(spec, seed=6) as c:
        first = a.reset(seed=5)
        assert torch.equal(first, b.reset(seed=5))
        assert not torch.equal(first, c.reset(seed=6))
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            actions = torch.randint(15, (3,), generator=generator)
            assert torch.equal(a.step(actions)[0], b.step(actions)[0])
        assert torch.equal(a.reset(seed=5), first)  # a stepped env rebuilt with the same seed
        assert torch.equal(a.reset(), first)  # an env not stepped since its reset is fresh already
        a.step(torch.zeros(3, dtype=torch.int64))
        assert not torch.equal(a.reset(), first)  # without a seed, fresh levels


def test_bad_actions_and_closed_env_raise():
    env = make_env({"name": "procgen", "game": "maze", "num_envs": 2})
    env.reset()
    with pytest.raises(EnvError, match="shape"):
        env.step(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(EnvError, match=r"valid actions: 0\.\.14"):
        env.step(torch.full((2,), 15))
    env.close()
    with pytest.raises(EnvError, match="closed"):
        env.step(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"game": "bigfish", "distribution_mode": "memory"},
         "distribution_mode='memory' is not available for env.game='bigfish'; games with a memory mode: caveflyer"),
        ({"game": "mazee"}, "unknown ProcGen game env.game='mazee'; close matches: maze"),
        ({"distribution_mode": "medium"}, "env.distribution_mode must be one of easy, hard, memory"),
        ({"num_levels": -1}, "env.num_levels"),
    ],
)
def test_invalid_options_raise(options, message):
    with pytest.raises(EnvError, match=message.replace(".", r"\.")):
        ProcgenOptions(**options)


def test_memory_mode_builds_for_a_game_that_has_it():
    with make_env({"name": "procgen", "game": "heist", "distribution_mode": "memory", "num_envs": 2}) as env:
        assert env.reset().shape == (2, 3, 64, 64)


def test_frames_are_copies_of_the_library_frames_channels_first_in_channels_last_layout():
    env = make_env({"name": "procgen", "game": "maze", "num_envs": 2})
    obs = env.reset(seed=0)
    _, observation, _ = env.env.observe()
    assert obs.shape == (2, 3, 64, 64) and obs.dtype == torch.uint8
    assert obs.is_contiguous(memory_format=torch.channels_last)  # the plain copy, permuted (see _frames)
    assert torch.equal(obs, torch.from_numpy(observation["rgb"]).permute(0, 3, 1, 2))
    before = obs.clone()
    for _ in range(3):
        env.step(torch.ones(2, dtype=torch.long))
    assert torch.equal(obs, before)  # a copy: the library's later steps leave it alone
    env.close()
