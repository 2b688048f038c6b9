"""The Atari adapter (ale-py's native vector env): same-step autoreset, raw stats under learning aids."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ale_py")

from envs import EnvError, make_env
from envs.atari import HUMAN_RANDOM, AtariOptions


def random_actions(env, generator):
    return torch.randint(env.single_action_space.n, (env.num_envs,), generator=generator)


def test_frame_cap_truncates_with_same_step_autoreset_and_hns():
    # 40 frames at frameskip 4: every game is truncated at its 10th step. Pong's first frame after a
    # reset (no no-ops) is always the same, so the obs returned at the truncation is exactly it.
    spec = {"name": "atari", "game": "pong", "num_envs": 2, "max_episode_frames": 40}
    with make_env(spec, seed=0) as env:
        first = env.reset(seed=0)
        assert first.dtype == torch.uint8 and first.shape == (2, 1, 84, 84)
        assert env.single_observation_space.shape == (1, 84, 84)
        generator = torch.Generator().manual_seed(0)
        running = torch.zeros(2, dtype=torch.float64)
        for t in range(1, 21):
            obs, reward, terminated, truncated, info = env.step(random_actions(env, generator))
            running += reward.double()
            ends = t % 10 == 0
            assert torch.all(truncated == ends) and not terminated.any()
            assert torch.all(info["episode"]["done"] == ends)
            if ends:
                assert torch.equal(obs, first)
                assert not torch.equal(info["final_obs"], obs)
                assert torch.all(info["episode"]["length"] == 10)
                torch.testing.assert_close(info["episode"]["return"], running)
                random_score, human_score = HUMAN_RANDOM["pong"]
                expected_hns = (running - random_score) / (human_score - random_score)
                torch.testing.assert_close(info["episode"]["hns"], expected_hns)
                running.zero_()
            else:
                assert torch.equal(info["final_obs"], obs)


def test_episodic_life_terminates_on_each_life_but_logs_whole_games():
    spec = {"name": "atari", "game": "breakout", "num_envs": 2, "episodic_life": True, "sticky_actions": 0.0}
    with make_env(spec, seed=1) as env:
        env.reset(seed=1)
        generator = torch.Generator().manual_seed(1)
        terminations = torch.zeros(2, dtype=torch.int64)
        running_return = torch.zeros(2, dtype=torch.float64)
        running_length = torch.zeros(2, dtype=torch.int64)
        games = 0
        for _ in range(3000):
            _, reward, terminated, _, info = env.step(random_actions(env, generator))
            terminations += terminated.long()
            running_return += reward.double()
            running_length += 1
            done = info["episode"]["done"]
            if done.any():
                # Breakout has 5 lives: four life losses, then the game over, each a termination.
                assert torch.all(terminations[done] == 5)
                torch.testing.assert_close(info["episode"]["return"][done], running_return[done])
                assert torch.equal(info["episode"]["length"][done], running_length[done])
                games += int(done.sum())
                terminations[done] = 0
                running_return[done] = 0
                running_length[done] = 0
            if games >= 2:
                break
        assert games >= 2


def test_reward_clip_changes_rewards_not_episode_returns():
    spec = {"name": "atari", "game": "space_invaders", "num_envs": 2, "max_episode_frames": 600}
    with make_env(spec, seed=3) as raw_env, make_env({**spec, "reward_clip": True}, seed=3) as clipped_env:
        raw_env.reset(seed=3)
        clipped_env.reset(seed=3)
        generator = torch.Generator().manual_seed(3)
        saw_large_reward = False
        for _ in range(150):
            actions = random_actions(raw_env, generator)
            raw_obs, raw_reward, _, _, raw_info = raw_env.step(actions)
            obs, reward, _, _, info = clipped_env.step(actions)
            assert torch.equal(obs, raw_obs)
            assert torch.equal(reward, raw_reward.clamp(-1, 1))
            saw_large_reward |= bool((raw_reward > 1).any())
            assert torch.equal(info["episode"]["return"], raw_info["episode"]["return"])
        assert saw_large_reward


def test_seeding_is_reproducible():
    spec = {"name": "atari", "game": "pong", "num_envs": 2}
    runs = []
    for _ in range(2):
        with make_env(spec, seed=4) as env:
            frames = [env.reset(seed=4)]
            generator = torch.Generator().manual_seed(4)
            frames += [env.step(random_actions(env, generator))[0] for _ in range(30)]
            runs.append(torch.stack(frames))
    assert torch.equal(runs[0], runs[1])


def test_bad_actions_and_closed_env_raise():
    env = make_env({"name": "atari", "game": "pong", "num_envs": 2})
    env.reset()
    n = env.single_action_space.n
    with pytest.raises(EnvError, match="shape"):
        env.step(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(EnvError, match=f"valid actions: 0..{n - 1}"):
        env.step(torch.full((2,), n, dtype=torch.int64))
    env.close()
    with pytest.raises(EnvError, match="closed"):
        env.step(torch.zeros(2, dtype=torch.int64))


def test_game_names():
    assert AtariOptions(game="MsPacman").game == "ms_pacman"
    assert AtariOptions(game="SpaceInvaders").game == "space_invaders"
    with pytest.raises(EnvError, match=r"unknown Atari game env\.game='pongg'; close matches: pong"):
        AtariOptions(game="pongg")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sticky_actions", 1.5, "env.sticky_actions must be a probability"),
        ("frame_stack", 0, "env.frame_stack must be an integer >= 1"),
        ("episodic_life", "yes", "env.episodic_life must be true or false"),
    ],
)
def test_invalid_options_raise(key, value, message):
    with pytest.raises(EnvError, match=message):
        AtariOptions(**{key: value})
