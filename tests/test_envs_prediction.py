"""Trace conditioning and trace patterning: the task statistics match the definition, the true return
matches a direct discounted sum, and a saved stream resumes exactly."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from envs import EnvError, make_env

GAMMA = 0.9


def rollout(env, steps: int) -> dict[str, np.ndarray]:
    """Observations [T+1, B, D] (obs_0 from reset), rewards and true returns [T, B] (of obs_1..obs_T)."""
    observations = [env.reset(seed=3)]
    rewards, returns = [], []
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(None)
        assert not terminated.any() and not truncated.any()
        observations.append(obs)
        rewards.append(reward)
        returns.append(info["true_return"])
    return {
        "obs": torch.stack(observations).numpy(),
        "reward": torch.stack(rewards).numpy(),
        "true_return": torch.stack(returns).numpy(),
    }


@pytest.fixture(scope="module")
def patterning_run():
    env = make_env({"name": "trace_patterning", "num_envs": 48}, seed=3)
    return env, rollout(env, 4000)


def trials_of(obs: np.ndarray, cs_bits: int) -> list[list[tuple[int, tuple[int, ...], int | None, int]]]:
    """Per env, the complete trials seen: (onset step, pattern, US step after onset or None, trial length)."""
    per_env = []
    for b in range(obs.shape[1]):
        cs = obs[:, b, :cs_bits]
        us = obs[:, b, cs_bits]
        onsets = np.flatnonzero(cs.sum(axis=1) > 0)
        trials = []
        for start, end in itertools.pairwise(onsets):
            us_steps = np.flatnonzero(us[start:end])
            assert len(us_steps) <= 1, "at most one US per trial"
            trials.append((int(start), tuple(np.flatnonzero(cs[start]).tolist()),
                           int(us_steps[0]) if len(us_steps) else None, int(end - start)))
        per_env.append(trials)
    return per_env


def test_observation_layout_and_space(patterning_run):
    env, run = patterning_run
    assert env.single_action_space is None
    assert env.single_observation_space.shape == (12,)
    assert run["obs"].shape[-1] == 12
    assert set(np.unique(run["obs"])) <= {0.0, 1.0}
    # the cumulant is the US bit of the returned observation
    np.testing.assert_array_equal(run["reward"], run["obs"][1:, :, 6])


def test_patterns_isi_iti_and_validity(patterning_run):
    _env, run = patterning_run
    isis, itis, lengths = [], [], []
    for trials in trials_of(run["obs"], cs_bits=6):
        assert len(trials) > 20
        followed = {}
        for _start, pattern, us_step, length in trials:
            assert len(pattern) == 3, "every onset shows exactly 3 of the 6 CS bits"
            followed.setdefault(pattern, set()).add(us_step is not None)
            lengths.append(length)
            if us_step is not None:
                isis.append(us_step)
                itis.append(length - us_step)
        # each pattern is always or never followed by the US; exactly 10 of the 20 are valid
        assert all(len(v) == 1 for v in followed.values())
        valid = [p for p, v in followed.items() if True in v]
        assert len(valid) <= 10 and len(followed) - len(valid) <= 10
        if len(followed) == 20:
            assert len(valid) == 10
    assert min(isis) == 24 and max(isis) == 36 and len(set(isis)) == 13
    assert min(itis) == 80 and max(itis) == 120 and len(set(itis)) == 41
    assert min(lengths) >= 104 and max(lengths) <= 156
    # valid trials are half of all trials (10 of 20 uniform patterns)
    assert abs(len(isis) / len(lengths) - 0.5) < 0.03


def test_us_rate_and_distractor_rates(patterning_run):
    _env, run = patterning_run
    obs = run["obs"].reshape(-1, 12)
    n = obs.shape[0]
    # US rate: P(valid) / E[trial length] = 0.5 / (30 + 100)
    us_rate = obs[:, 6].mean()
    assert abs(us_rate - 0.5 / 130) < 0.1 * 0.5 / 130
    for j in range(1, 6):
        p = 1.0 / (10 * j)
        rate = obs[:, 6 + j].mean()
        assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n), (j, rate, p)


def test_true_return_is_the_discounted_sum_of_future_cumulants(patterning_run):
    _env, run = patterning_run
    rewards, true_return = run["reward"].astype(np.float64), run["true_return"]
    T = rewards.shape[0]
    # G_{t} = c_{t+1} + γ G_{t+1}: rewards[t] = c_{t+1}, true_return[t] = G_{t+1}
    direct = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1])
    for t in range(T - 1, -1, -1):
        direct[t] = running  # G_{t+1} = Σ_k γ^k c_{t+2+k}
        running = rewards[t] + GAMMA * running
    horizon = 400  # γ^400 ~ 5e-19: the unseen tail is negligible before T − horizon
    np.testing.assert_allclose(true_return[: T - horizon], direct[: T - horizon], atol=1e-6, rtol=1e-5)
    assert true_return.max() > 0.99  # one step before a US the return is 1


def test_trace_conditioning_every_trial_ends_in_a_us():
    env = make_env({"name": "trace_conditioning", "num_envs": 8, "isi_min": 5, "isi_max": 9,
                    "iti_min": 10, "iti_max": 14, "num_distractors": 2}, seed=0)
    run = rollout(env, 1500)
    assert env.single_observation_space.shape == (4,)
    isis = []
    for trials in trials_of(run["obs"], cs_bits=1):
        for _start, pattern, us_step, length in trials:
            assert pattern == (0,) and us_step is not None
            assert 15 <= length <= 23
            isis.append(us_step)
    assert set(isis) == set(range(5, 10))


def test_seeded_streams_and_exact_resume():
    spec = {"name": "trace_patterning", "num_envs": 5, "isi_min": 3, "isi_max": 6, "iti_min": 4, "iti_max": 8}
    env = make_env(spec, seed=11)
    env.reset(seed=11)
    for _ in range(37):
        env.step(None)
    saved = env.state_dict()
    expected = [env.step(None) for _ in range(60)]

    fresh = make_env(spec, seed=0)
    fresh.load_state_dict(saved)
    resumed = [fresh.step(None) for _ in range(60)]
    for (obs_a, rew_a, _, _, info_a), (obs_b, rew_b, _, _, info_b) in zip(expected, resumed):
        torch.testing.assert_close(obs_a, obs_b, rtol=0, atol=0)
        torch.testing.assert_close(rew_a, rew_b, rtol=0, atol=0)
        torch.testing.assert_close(info_a["true_return"], info_b["true_return"], rtol=0, atol=0)

    again = make_env(spec, seed=0)
    torch.testing.assert_close(again.reset(seed=11), make_env(spec, seed=11).reset(), rtol=0, atol=0)
    first, second = make_env(spec, seed=11), make_env(spec, seed=12)
    first.reset(), second.reset()
    assert any(not torch.equal(first.step(None)[0], second.step(None)[0]) for _ in range(30))

    with pytest.raises(EnvError, match=re.escape("num_envs=3")):
        make_env({**spec, "num_envs": 3}).load_state_dict(saved)
    # a state saved when the streams were torch generators cannot continue exactly: one clear message
    earlier = {k: v for k, v in saved.items() if not k.startswith("stream_")}
    earlier["generator"] = torch.Generator().get_state()
    with pytest.raises(EnvError, match=r"earlier rlmem.*start it again"):
        make_env(spec).load_state_dict(earlier)


def test_user_errors_name_the_problem():
    env = make_env({"name": "trace_patterning", "num_envs": 2})
    with pytest.raises(EnvError, match="call reset"):
        env.step(None)
    env.reset(seed=0)
    with pytest.raises(EnvError, match="without actions"):
        env.step(torch.zeros(2, dtype=torch.long))
    env.close()
    with pytest.raises(EnvError, match="closed"):
        env.reset()
    with pytest.raises(EnvError, match=re.escape("env.isi_max=3 must be >= env.isi_min=5")):
        make_env({"name": "trace_conditioning", "isi_min": 5, "isi_max": 3})
    with pytest.raises(EnvError, match=re.escape("env.valid_patterns must be an integer in 1..20")):
        make_env({"name": "trace_patterning", "valid_patterns": 21})
    with pytest.raises(EnvError, match=re.escape("env.gamma")):
        make_env({"name": "trace_patterning", "gamma": 1.0})
    with pytest.raises(EnvError, match=re.escape("unknown key env.isi; valid keys")):
        make_env({"name": "trace_patterning", "isi": 3})


def test_exact_return_queue_covers_the_discount_horizon():
    # γ = 0.99 with short trials needs many queued trials; the return still matches a direct sum.
    env = make_env({"name": "trace_conditioning", "num_envs": 3, "isi_min": 2, "isi_max": 4, "iti_min": 3,
                    "iti_max": 6, "gamma": 0.99}, seed=1)
    assert isinstance(env.queued_trials, int) and env.queued_trials > 100
    run = rollout(env, 6000)
    rewards = run["reward"].astype(np.float64)
    direct = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1])
    for t in range(rewards.shape[0] - 1, -1, -1):
        direct[t] = running
        running = rewards[t] + 0.99 * running
    np.testing.assert_allclose(run["true_return"][:2500], direct[:2500], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["trace_patterning", "trace_conditioning"])
def test_a_stack_of_tasks_steps_each_task_stream_exactly(name: str):
    """A stack's blocks are its tasks' own streams; unstacked, the tasks continue them exactly."""
    spec = {"name": name, "num_envs": 2, "isi_min": 3, "isi_max": 5, "iti_min": 4, "iti_max": 6}
    alone = [make_env(spec, seed=seed) for seed in (0, 7, 3)]
    tasks = [make_env(spec, seed=seed) for seed in (0, 7, 3)]
    first = [env.reset(seed=seed) for env, seed in zip(alone, (0, 7, 3))]
    assert torch.equal(torch.cat(first), torch.cat([t.reset(seed=s) for t, s in zip(tasks, (0, 7, 3))]))
    stacked = type(tasks[0]).stack(tasks)
    assert stacked.num_envs == 6
    for _ in range(40):
        expected = [env.step(None) for env in alone]
        obs, reward, _, _, info = stacked.step(None)
        assert torch.equal(obs, torch.cat([e[0] for e in expected]))
        assert torch.equal(reward, torch.cat([e[1] for e in expected]))
        assert torch.equal(info["true_return"], torch.cat([e[4]["true_return"] for e in expected]))
    stacked.unstack_into(tasks)
    for env, task in zip(alone, tasks):
        assert torch.equal(env.step(None)[0], task.step(None)[0])
    with pytest.raises(EnvError, match="is not reset"):
        stacked.reset()


def test_a_shard_steps_its_rows_of_the_whole_batch():
    from envs.base import EnvShard

    spec = {"name": "trace_patterning", "num_envs": 6, "isi_min": 3, "isi_max": 5, "iti_min": 4, "iti_max": 6}
    whole = make_env(spec, seed=4)
    shard = make_env({**spec, "num_envs": 2}, seed=4, shard=EnvShard(offset=3, size=2, total=6))
    assert torch.equal(whole.reset()[3:5], shard.reset())
    for _ in range(30):
        assert torch.equal(whole.step(None)[0][3:5], shard.step(None)[0])


@pytest.mark.parametrize("name", ["trace_patterning", "trace_conditioning"])
def test_draws_taken_ahead_are_the_draws_of_each_step(name: str, monkeypatch):
    """The streams are drawn many steps ahead; a run equals one that draws step by step, and a state
    saved mid-block holds the draws taken, not those drawn ahead (a stack unstacked mid-block:
    test_a_stack_of_tasks_steps_each_task_stream_exactly, 40 steps into a block of 256)."""
    import envs.prediction_tasks as tasks_module

    spec = {"name": name, "num_envs": 3, "isi_min": 3, "isi_max": 6, "iti_min": 4, "iti_max": 8}

    def run(steps: int) -> list[torch.Tensor]:
        env = make_env(spec, seed=5)
        rows = [env.reset()]
        for t in range(steps):
            obs, _, _, _, info = env.step(None)
            rows.append(torch.cat([obs.flatten(), info["true_return"]]))
            if t % 97 == 0:  # a save mid-block, resumed into a fresh env
                saved = env.state_dict()
                rows.append(saved["stream_counters"].float())
                env = make_env(spec, seed=0)
                env.load_state_dict(saved)
        return rows

    steps = 3 * tasks_module.DRAW_AHEAD_STEPS + 5
    ahead = run(steps)
    monkeypatch.setattr(tasks_module, "DRAW_AHEAD_VALUES", 1)  # one step's draws at a time
    step_by_step = run(steps)
    assert all(torch.equal(a, b) for a, b in zip(ahead, step_by_step, strict=True))
    # the counters count every step's draws: reset's, then 3 + distractors per step
    env = make_env(spec, seed=5)
    env.reset()
    at_reset = env.state_dict()["stream_counters"]
    for _ in range(10):
        env.step(None)
    assert torch.equal(env.state_dict()["stream_counters"] - at_reset, torch.full((3,), 10 * (3 + 5)))
