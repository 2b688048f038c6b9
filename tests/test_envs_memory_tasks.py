"""The built-in memory tasks against straightforward per-env oracles written from their definitions."""

from __future__ import annotations

import pytest
import torch

from envs import EnvError, make_env


def test_cue_recall_episode_structure_and_same_step_autoreset():
    C, L, B = 3, 4, 5
    with make_env({"name": "cue_recall", "num_envs": B, "num_cues": C, "delay": L}, seed=0) as env:
        obs = env.reset(seed=0)
        for _ in range(3):  # episodes
            cue = obs[:, :C].argmax(dim=1)
            # Step 0: the cue, one-hot, no query flag.
            assert torch.equal(obs[:, :C], torch.nn.functional.one_hot(cue, C).float())
            assert torch.all(obs[:, C] == 0)
            # Answer correctly in env 0, wrongly in env 1, and with the cue at the wrong time elsewhere.
            for t in range(L + 2):
                query = t == L + 1
                actions = cue.clone()
                if query:
                    actions[1] = (cue[1] + 1) % C
                else:
                    actions[0] = (cue[0] + 1) % C  # ignored before the query
                obs, reward, terminated, truncated, info = env.step(actions)
                assert not truncated.any()
                if not query:
                    assert torch.all(reward == 0) and not terminated.any()
                    is_query_next = t + 1 == L + 1
                    assert torch.all(obs[:, C] == float(is_query_next))
                    assert torch.all(obs[:, :C] == 0)  # blank steps and the query show no cue
                else:
                    expected = torch.ones(B)
                    expected[1] = -1.0
                    assert torch.equal(reward, expected)
                    assert terminated.all()
                    # The returned obs already starts the next episode: a cue, no flag.
                    assert torch.all(obs[:, C] == 0) and torch.all(obs[:, :C].sum(dim=1) == 1)
                    # The terminal observation is the all-zero observation.
                    assert torch.all(info["final_obs"] == 0)
                    assert torch.equal(info["success"], (expected > 0).float())
                    assert torch.all(info["episode"]["length"] == L + 2)
                    assert torch.equal(info["episode"]["return"], expected.double())


def test_cue_recall_noise_only_on_blank_cue_channels():
    C, L = 4, 3
    with make_env({"name": "cue_recall", "num_envs": 64, "num_cues": C, "delay": L, "noise": 2.0}, seed=1) as env:
        obs = env.reset()
        assert torch.all(obs[:, :C].sum(dim=1) == 1)  # the cue step is clean
        blank = []
        for _ in range(L):
            obs, *_ = env.step(torch.zeros(64, dtype=torch.int64))
            blank.append(obs)
            assert torch.all(obs[:, C] == 0)
        blank = torch.stack(blank)[..., :C]
        assert 1.7 < blank.std().item() < 2.3
        obs, *_ = env.step(torch.zeros(64, dtype=torch.int64))  # the query step is clean
        assert torch.all(obs[:, :C] == 0) and torch.all(obs[:, C] == 1)


def test_cue_recall_long_delay():
    L = 3000
    with make_env({"name": "cue_recall", "num_envs": 2, "num_cues": 2, "delay": L}, seed=0) as env:
        obs = env.reset()
        cue = obs[:, :2].argmax(dim=1)
        for _ in range(L + 1):
            obs, reward, terminated, _, _ = env.step(cue)
            assert not terminated.any()
        assert torch.all(obs[:, 2] == 1)
        _, reward, terminated, _, info = env.step(cue)
        assert terminated.all() and torch.all(reward == 1) and torch.all(info["episode"]["length"] == L + 2)


def _run(env, steps, choose):
    """Step ``env`` with ``choose(history_of_obs) -> actions``; returns observations, actions and results."""
    observations = [env.reset(seed=4)]
    actions, results = [], []
    for _ in range(steps):
        actions.append(choose(observations))
        results.append(env.step(actions[-1]))
        observations.append(results[-1][0])
    return observations, actions, results


def test_repeat_previous_rewards_match_the_definition():
    S, k, T, B = 3, 2, 6, 4
    with make_env({"name": "repeat_previous", "num_envs": B, "num_symbols": S, "k": k, "episode_length": T}) as env:
        generator = torch.Generator().manual_seed(0)
        observations, actions, results = _run(env, 3 * T, lambda _: torch.randint(S, (B,), generator=generator))
    episode_return = torch.zeros(B, dtype=torch.float64)
    for t, (a, (_, reward, terminated, _, info)) in enumerate(zip(actions, results)):
        position = t % T  # every env starts together and episodes have a fixed length
        if position < k:
            expected = torch.zeros(B)
        else:
            expected = torch.where(a == observations[t - k].argmax(dim=1), 1.0, -1.0) / (T - k)
        torch.testing.assert_close(reward, expected)
        assert torch.all(terminated == (position == T - 1))
        episode_return += reward.double()
        if position == T - 1:
            assert torch.all(info["episode"]["length"] == T)
            torch.testing.assert_close(info["episode"]["return"], episode_return)
            assert torch.all(info["episode"]["return"].abs() <= 1 + 1e-6)
            torch.testing.assert_close(info["success"].double(), (episode_return + 1) / 2)
            assert torch.all(info["final_obs"] == 0)
            episode_return.zero_()


def test_repeat_previous_perfect_policy_scores_one():
    S, k, T, B = 4, 3, 10, 2
    with make_env({"name": "repeat_previous", "num_envs": B, "num_symbols": S, "k": k, "episode_length": T}) as env:
        def oracle(observations):
            t = (len(observations) - 1) % T
            return observations[-1 - k].argmax(dim=1) if t >= k else torch.zeros(B, dtype=torch.int64)

        _, _, results = _run(env, 2 * T, oracle)
    for index in (T - 1, 2 * T - 1):
        info = results[index][4]
        torch.testing.assert_close(info["episode"]["return"], torch.ones(B, dtype=torch.float64))
        assert torch.all(info["success"] == 1)


def test_count_recall_rewards_match_the_definition():
    S, A, T, B = 3, 4, 12, 5
    spec = {"name": "count_recall", "num_envs": B, "num_symbols": S, "num_actions": A, "episode_length": T}
    with make_env(spec, seed=2) as env:
        assert env.single_observation_space.shape == (2 * S,)
        generator = torch.Generator().manual_seed(1)
        observations, actions, results = _run(env, 2 * T, lambda _: torch.randint(A, (B,), generator=generator))
    counts = torch.zeros(B, S, dtype=torch.int64)
    for t, (a, (_, reward, terminated, _, _)) in enumerate(zip(actions, results)):
        if t % T == 0:
            counts.zero_()
        obs = observations[t]
        symbol, query = obs[:, :S].argmax(dim=1), obs[:, S:].argmax(dim=1)
        assert torch.all(obs.sum(dim=1) == 2)
        counts[torch.arange(B), symbol] += 1
        target = counts[torch.arange(B), query].clamp(max=A - 1)
        torch.testing.assert_close(reward, torch.where(a == target, 1.0, -1.0) / T)
        assert torch.all(terminated == (t % T == T - 1))


def test_count_recall_clips_counts_at_the_largest_action():
    # Eight draws of two symbols: some symbol is shown at least four times, beyond the largest action 2.
    spec = {"name": "count_recall", "num_envs": 2, "num_symbols": 2, "num_actions": 3, "episode_length": 8}
    with make_env(spec, seed=0) as env:
        obs = env.reset()
        counts = torch.zeros(2, 2, dtype=torch.int64)
        for _ in range(8):
            symbol, query = obs[:, :2].argmax(dim=1), obs[:, 2:].argmax(dim=1)
            counts[torch.arange(2), symbol] += 1
            target = counts[torch.arange(2), query].clamp(max=2)
            obs, reward, *_ = env.step(target)
            assert torch.all(reward > 0)
        assert counts.max() > 2  # the clipping was exercised


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "cue_recall", "num_cues": 1}, "env.num_cues must be an integer >= 2"),
        ({"name": "cue_recall", "delay": -1}, "env.delay"),
        ({"name": "cue_recall", "delay": 2.5}, "env.delay"),
        ({"name": "cue_recall", "noise": -0.1}, "env.noise"),
        ({"name": "cue_recall", "num_envs": 0}, "env.num_envs"),
        ({"name": "repeat_previous", "k": 5, "episode_length": 5}, "env.episode_length must be an integer >= 6"),
        ({"name": "count_recall", "num_actions": 1}, "env.num_actions"),
        (
            {"name": "cue_recall", "cues": 3},
            "unknown key env.cues; valid keys: delay, desync, noise, num_cues, num_envs",
        ),
    ],
)
def test_invalid_options_raise(spec, message):
    with pytest.raises(EnvError, match=message):
        make_env(spec)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "cue_recall", "delay": 6},
        {"name": "repeat_previous", "episode_length": 8, "k": 2},
        {"name": "count_recall", "episode_length": 8},
    ],
)
def test_desync_spreads_episode_ends_and_later_episodes_are_whole(spec):
    env = make_env({**spec, "num_envs": 256, "desync": True}, "cpu", seed=3)
    length = env.episode_length
    env.reset(seed=3)
    first_end = torch.full((256,), -1)
    lengths = []
    for t in range(3 * length):
        _, _, terminated, _, info = env.step(torch.zeros(256, dtype=torch.long))
        first_end = torch.where((first_end < 0) & terminated, t, first_end)
        lengths.append(info["episode"]["length"][terminated])
    # Every env's first episode ends within one episode length, at every offset.
    assert set(first_end.tolist()) == set(range(length))
    # After the first, each episode is whole.
    later = torch.cat(lengths[length:])
    assert torch.all(later == length)
    # Without desync the envs stay in lockstep.
    env = make_env({**spec, "num_envs": 4}, "cpu", seed=3)
    env.reset(seed=3)
    ends = [env.step(torch.zeros(4, dtype=torch.long))[2] for _ in range(length)]
    assert torch.all(ends[-1]) and not any(e.any() for e in ends[:-1])
    with pytest.raises(EnvError, match=r"env\.desync"):
        make_env({**spec, "desync": "yes"}, "cpu")
