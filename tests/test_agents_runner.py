"""The env runner: async stepping on VecEnv, split envs, and rollouts that overlap env steps with inference.

With overlap the collector acts for one half of the envs while the other half steps; the stored window
must still be the one a plain loop stores: the replay from the stored start state over all envs
reproduces the acting values, reset flags mark exactly the episode starts, and each half carries its
own memory across windows.
"""

from __future__ import annotations

import importlib.util
import io

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.actor_critic import ActorCriticLearner, ActorCriticOptions
from agents.base import LEARNERS, ModelOptions
from agents.rollout import RolloutCollector
from agents.runner import EnvRunner, overlap_helps
from envs import EnvError, make_env
from envs.base import VecEnv, VecEnvGroup, split_bounds, threads_per_group

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# A splittable fake env that pretends to step in the background and logs the calls


class Recall(VecEnv):
    """Env ``j`` (global index ``start + j``) shows one of 3 cues at episode step 0, blanks for
    ``delay_j = 1 + j % 3`` steps, then a query; naming the cue there pays 1 and ends the episode (by
    truncation for even global indices, termination for odd ones). Obs: [cue one-hot (3), query flag,
    episode step / 100]. ``split`` builds the groups like the real adapters; calls go to ``log``."""

    steps_in_background = True

    def __init__(self, num_envs: int = 6, start: int = 0, log: list | None = None, seed: int = 0) -> None:
        self.num_envs, self.start = num_envs, start
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
        self.single_action_space = gym.spaces.Discrete(3)
        self.device = torch.device("cpu")
        self.log = [] if log is None else log
        index = torch.arange(start, start + num_envs)
        self.delay = 1 + index % 3
        self.truncates = index % 2 == 0
        self.generator = torch.Generator().manual_seed(seed + start)

    def _obs(self, t: torch.Tensor) -> torch.Tensor:
        obs = torch.zeros(self.num_envs, 5)
        first = t == 0
        obs[first, self.cue[first]] = 1.0
        obs[:, 3] = (t == self.delay + 1).float()
        obs[:, 4] = t.float() / 100
        return obs

    def reset(self, seed: int | None = None) -> torch.Tensor:
        if self._group is not None:
            return self._group.reset(seed)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.cue = torch.randint(3, (self.num_envs,), generator=self.generator)
        self.ret = torch.zeros(self.num_envs)
        return self._obs(self.t)

    def step(self, actions):
        if self._group is not None:
            return self._group.step(actions)
        self._check_idle()
        assert actions.shape == (self.num_envs,)
        query = self.t == self.delay + 1
        reward = (query & (actions == self.cue)).float()
        self.ret += reward
        self.t += 1
        final_obs = self._obs(self.t)
        done = query
        episode = {"done": done.clone(), "return": self.ret.clone(), "length": self.t.clone()}
        self.cue = torch.where(done, torch.randint(3, (self.num_envs,), generator=self.generator), self.cue)
        self.t = torch.where(done, 0, self.t)
        self.ret = torch.where(done, 0.0, self.ret)
        info = {"final_obs": final_obs, "episode": episode}
        return self._obs(self.t), reward, done & ~self.truncates, done & self.truncates, info

    def step_async(self, actions):
        if self._group is not None:
            return self._group.step_async(actions)
        self.log.append(("send", self.start))
        super().step_async(actions)

    def step_wait(self):
        if self._group is not None:
            return self._group.step_wait()
        self.log.append(("wait", self.start))
        return super().step_wait()

    def split(self, parts):
        return self._split_with(parts, lambda n, start: Recall(n, self.start + start, self.log), lambda: None)

    def state_dict(self):
        if self._group is not None:
            return self._group.state_dict()
        return {"t": self.t.clone(), "cue": self.cue.clone(), "ret": self.ret.clone(),
                "rng": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        if self._group is not None:
            return self._group.load_state_dict(state)
        self.t, self.cue, self.ret = state["t"].clone(), state["cue"].clone(), state["ret"].clone()
        self.generator.set_state(state["rng"])


class Unsplittable(Recall):
    def split(self, parts):
        return [self]


MODEL = ModelOptions(encoder_size=16, prev_action=True, prev_reward=True)
GRU = {"name": "gru", "hidden_size": 8}


def make_learner(env, memory=GRU, overlap: bool | None = True, seed: int = 0, **options) -> ActorCriticLearner:
    options.setdefault("unroll_length", 7)
    learner = LEARNERS.get("actor_critic").cls(ActorCriticOptions(**options), env, memory, MODEL,
                                               torch.device("cpu"), seed, 10_000)
    if overlap is not None:  # the learner chose the default; a collector with the overlap asked for
        learner.collector = RolloutCollector(learner.network, env, learner.device, learner.generator, seed,
                                             overlap=overlap)
    return learner


def collect(learner):
    return learner.collector.collect(learner.options.unroll_length)


# --------------------------------------------------------------------------------------------------
# VecEnv: the default step_async/step_wait pair and groups


def test_default_async_pair_is_step_and_refuses_misuse():
    plain, paired = Unsplittable(num_envs=3), Unsplittable(num_envs=3)
    plain.steps_in_background = paired.steps_in_background = False
    torch.testing.assert_close(plain.reset(seed=1), paired.reset(seed=1))
    with pytest.raises(EnvError, match="step_wait was called without a step"):
        paired.step_wait()
    for _ in range(6):
        actions = torch.tensor([0, 1, 2])
        expected = plain.step(actions)
        paired.step_async(actions)
        with pytest.raises(EnvError, match="step_async was called twice"):
            paired.step_async(actions)
        got = paired.step_wait()
        for a, b in zip(expected[:4], got[:4], strict=True):
            assert torch.equal(a, b)
    with pytest.raises(AssertionError):  # a bad action raises in step_async and leaves the env idle
        paired.step_async(torch.tensor([0, 1]))
    paired.step_async(torch.tensor([0, 1, 2]))
    paired.step_wait()


def test_split_bounds_and_group_merging():
    assert split_bounds(7, 2) == [(0, 4), (4, 7)]
    assert split_bounds(1, 2) == [(0, 1)]
    assert split_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]

    whole, log = Recall(num_envs=5), []
    split = Recall(num_envs=5, log=log)
    parts = split.split(2)
    assert [p.num_envs for p in parts] == [3, 2] and [p.start for p in parts] == [0, 3]
    assert split.split(2) == parts  # splitting again returns the same groups
    with pytest.raises(EnvError, match="already split into 2 groups"):
        split.split(3)
    assert isinstance(split._group, VecEnvGroup) and split._group.steps_in_background
    split.reset(seed=0)
    whole.reset(seed=0)
    obs, reward, terminated, truncated, info = split.step(torch.zeros(5, dtype=torch.long))
    assert obs.shape == (5, 5) and reward.shape == terminated.shape == truncated.shape == (5,)
    assert info["final_obs"].shape == (5, 5) and set(info["episode"]) == {"done", "return", "length"}
    assert info["episode"]["length"].tolist() == [1] * 5
    assert log == [("send", 0), ("send", 3), ("wait", 0), ("wait", 3)]  # both groups in flight together
    with pytest.raises(EnvError, match="one row per env"):
        split.step(torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# The runner's choice and schedule


def test_overlap_default_and_fallbacks():
    cpu = torch.device("cpu")
    # On a CPU the halves cost what the whole batch did; on a GPU two calls per step cost twice one.
    assert overlap_helps(Recall(), cpu)
    assert not overlap_helps(Recall(), torch.device("cuda"))  # (only the rule; nothing runs on CUDA here)
    assert not overlap_helps(Recall(num_envs=1), cpu)
    background_off = Recall()
    background_off.steps_in_background = False
    assert not overlap_helps(background_off, cpu)

    assert EnvRunner(Recall(), cpu).overlap
    assert not EnvRunner(Recall(), cpu, overlap=False).overlap
    assert EnvRunner(Recall(), cpu, overlap=True).overlap
    assert not EnvRunner(Unsplittable(), cpu, overlap=True).overlap  # cannot split: one group
    assert not EnvRunner(Recall(num_envs=1), cpu, overlap=True).overlap
    runner = EnvRunner(Recall(num_envs=5), cpu, overlap=True)
    assert [g.index for g in runner.groups] == [slice(0, 3), slice(3, 5)]


def test_the_env_option_overlap_decides_where_the_runner_is_not_told():
    cpu = torch.device("cpu")
    forced = Recall()
    forced.overlap = True  # what make_env sets from env.overlap=true
    assert EnvRunner(forced, cpu).overlap
    refused = Recall()
    refused.overlap = False
    assert not EnvRunner(refused, torch.device("cuda")).overlap  # (no CUDA work: the env is a fake)
    assert not EnvRunner(forced, cpu, overlap=False).overlap  # the caller's word wins
    for value, expected in (("auto", None), (True, True), (False, False)):
        assert make_env({"name": "cue_recall", "num_envs": 2, "overlap": value}).overlap is expected
    with pytest.raises(EnvError, match=r"env\.overlap must be true, false or auto, got 'maybe'"):
        make_env({"name": "cue_recall", "overlap": "maybe"})


def test_split_groups_share_the_worker_threads(monkeypatch):
    import envs.base

    monkeypatch.setattr(envs.base, "available_cores", lambda: 6)
    assert threads_per_group(0, 2) == 3  # 0: one per core, shared
    assert threads_per_group(4, 2) == 3  # capped at the group's share of the cores
    assert threads_per_group(2, 2) == 2  # within the share: kept
    assert threads_per_group(0, 8) == 1  # at least one each
    monkeypatch.setattr(envs.base, "available_cores", lambda: 16)
    assert threads_per_group(4, 2) == 4  # a big machine: each group keeps the library's count


def test_collect_acts_on_the_acting_threads_and_gives_the_update_its_own():
    from agents.rollout import set_acting_threads

    env = Recall(num_envs=4)
    learner = make_learner(env, unroll_length=3)
    seen = []
    learner.network.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()  # 1: this module's fixture
    torch.set_num_threads(2)
    try:
        set_acting_threads(1)
        collect(learner)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2  # restored for the update
        seen.clear()
        set_acting_threads(0)  # 0: the process's own setting
        collect(learner)
        assert set(seen) == {2}
    finally:
        set_acting_threads(0)
        torch.set_num_threads(threads)


def test_each_group_steps_while_the_policy_acts_for_the_other():
    env = Recall(num_envs=6)
    learner = make_learner(env, unroll_length=4)
    env.log.clear()
    collect(learner)
    A, B = ("send", 0), ("send", 3)
    waitA, waitB = ("wait", 0), ("wait", 3)
    assert env.log == [A, B] + [waitA, A, waitB, B] * 3 + [waitA, waitB]


# --------------------------------------------------------------------------------------------------
# The stored window with overlap


def check_window(learner, rollout, previous=None):
    """The replay over all envs from the stored start state reproduces acting; flags and inputs align."""
    net = learner.network
    with torch.no_grad():
        out = net(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions, rollout.prev_rewards)
    torch.testing.assert_close(out.value, rollout.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.dist.log_prob(rollout.actions), rollout.log_probs, atol=1e-5, rtol=1e-5)
    for key, value in out.state.items():  # ... and ends in the state the collector carries on with
        torch.testing.assert_close(value, learner.collector.memory_state[key], atol=1e-5, rtol=1e-5)
    # reset[t, b] exactly where obs[t, b] is an episode's first observation (episode step 0).
    assert torch.equal(rollout.reset, rollout.obs[..., 4] == 0)
    assert torch.equal(rollout.reset[1:], rollout.done[:-1])
    # The previous action and reward are the ones of the same env one step earlier.
    assert torch.equal(rollout.prev_actions[1:], rollout.actions[:-1])
    assert torch.equal(rollout.prev_rewards[1:], rollout.rewards[:-1])
    if previous is not None:  # and across the window boundary (no update in between)
        assert torch.equal(rollout.prev_actions[0], previous.actions[-1])
        assert torch.equal(rollout.reset[0], previous.done[-1])
        torch.testing.assert_close(previous.bootstrap_value, rollout.values[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", [GRU, {"name": "lstm", "hidden_size": 8},
                                    {"name": "elstm", "hidden_size": 8, "grad": "rtrl"}],
                         ids=["gru", "lstm", "elstm_rtrl"])
def test_replay_from_the_stored_start_state_reproduces_overlapped_acting(memory):
    env = Recall(num_envs=6)
    learner = make_learner(env, memory=memory)
    assert learner.collector.overlap and len(learner.collector.runner.groups) == 2
    learner.iteration()  # the next windows start from a carried state
    previous = None
    for _ in range(3):
        rollout, _ = collect(learner)
        assert rollout.reset[1:].any() and rollout.truncated.any() and rollout.terminated.any()
        check_window(learner, rollout, previous)
        previous = rollout


def test_truncations_bootstrap_from_final_obs_in_each_group():
    env = Recall(num_envs=6)
    learner = make_learner(env)
    learner.iteration()
    rollout, _ = collect(learner)
    net = learner.network
    checked = 0
    with torch.no_grad():
        state = rollout.start_state
        for t in range(rollout.rewards.shape[0]):
            out = net.step(rollout.obs[t], state, rollout.reset[t], rollout.prev_actions[t], rollout.prev_rewards[t])
            state = out.state
            # Env b's terminal observation: no cue, no query, episode step delay_b + 2.
            final_obs = torch.zeros(6, 5)
            final_obs[:, 4] = (env.delay.float() + 2) / 100  # the parent's delays: global indices 0..5
            final = net.step(final_obs, state, torch.zeros(6, dtype=torch.bool), rollout.actions[t],
                             rollout.rewards[t]).value[0]
            expected = torch.where(rollout.truncated[t] & ~rollout.terminated[t], final, 0.0)
            torch.testing.assert_close(rollout.final_values[t], expected, atol=1e-5, rtol=1e-5)
            checked += int(rollout.truncated[t].sum())
    assert checked >= 2 and set(torch.nonzero(rollout.truncated)[:, 1].tolist()) >= {0, 4}  # both groups


def test_overlap_and_the_plain_loop_store_the_same_episodes():
    results = {}
    for overlap in (False, True):
        learner = make_learner(Recall(num_envs=6), overlap=overlap, unroll_length=12)
        stats = [collect(learner)[1] for _ in range(2)]
        results[overlap] = sorted(n for s in stats for n in s.lengths)
        assert learner.collector.overlap == overlap
    assert results[False] == results[True] and set(results[True]) == {3, 4, 5}


@pytest.mark.parametrize("learner_name", ["actor_critic", "ppo"])
def test_learners_iterate_with_overlap(learner_name):
    env = Recall(num_envs=6)
    if learner_name == "actor_critic":
        learner = make_learner(env, memory={"name": "elstm", "hidden_size": 8, "grad": "rtrl"})
    else:
        entry = LEARNERS.get("ppo")
        learner = entry.cls(entry.options(unroll_length=7, num_minibatches=2), env, GRU, MODEL,
                            torch.device("cpu"), 0, 10_000)
        learner.collector = RolloutCollector(learner.network, env, learner.device, learner.generator, 0,
                                             overlap=True)
    for _ in range(3):
        result = learner.iteration()
    assert result.env_steps == 7 * 6 and np.isfinite(result.metrics["losses/value_loss"])
    assert learner.collector.overlap


def test_resume_with_overlap_is_bit_identical():
    uninterrupted = make_learner(Recall(num_envs=6), seed=1)
    for _ in range(2):
        uninterrupted.iteration()
    reference = [uninterrupted.iteration() for _ in range(2)]

    env = Recall(num_envs=6)
    interrupted = make_learner(env, seed=1)
    for _ in range(2):
        interrupted.iteration()
    buffer = io.BytesIO()
    torch.save({"learner": interrupted.state_dict(), "env": env.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed_env = Recall(num_envs=6)
    resumed = make_learner(resumed_env, seed=5)
    resumed.load_state_dict(saved["learner"])
    resumed_env.load_state_dict(saved["env"])
    results = [resumed.iteration() for _ in range(2)]
    for ref, res in zip(reference, results, strict=True):
        assert ref.metrics == res.metrics and ref.episode_returns == res.episode_returns
    for p, q in zip(uninterrupted.network.parameters(), resumed.network.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_policy_with_a_cpu_env_goes_through_pinned_buffers():
    env = Recall(num_envs=6)
    learner = LEARNERS.get("actor_critic").cls(ActorCriticOptions(unroll_length=7), env, GRU, MODEL,
                                               torch.device("cuda"), 0, 10_000)
    collector = learner.collector
    assert collector.overlap and all(g.staging is not None for g in collector.runner.groups)
    learner.iteration()
    rollout, _ = collector.collect(7)
    assert rollout.obs.is_cuda and all(b.is_pinned() for g in collector.runner.groups
                                       for b in g.staging.buffers.values())
    check_window(learner, rollout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_upload_keeps_channels_last_frames_channels_last():
    from agents.runner import PinnedStaging

    staging = PinnedStaging(torch.device("cuda"))
    hwc = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    frames = hwc.permute(0, 3, 1, 2)  # what the ProcGen adapter hands out
    for _ in range(2):  # the second upload reuses the buffers
        up = staging.upload(obs=frames, flat=torch.arange(4))
        assert up["obs"].is_contiguous(memory_format=torch.channels_last) and torch.equal(up["obs"].cpu(), frames)
        assert up["flat"].is_contiguous() and torch.equal(up["flat"].cpu(), torch.arange(4))
    assert staging.buffers["obs"].is_pinned() and staging.buffers["obs"].stride() == frames.stride()


def test_library_envs_are_built_on_the_host_for_a_gpu_learner():
    from envs import env_device

    cuda = torch.device("cuda")  # (only the rule; nothing runs on CUDA here)
    for name in ("gym", "atari", "procgen"):  # numpy from the library: the runner's pinned upload copies
        assert env_device(name, cuda) == torch.device("cpu")
    for name in ("cue_recall", "repeat_previous", "count_recall", "trace_patterning"):  # torch-native
        assert env_device(name, cuda) == cuda
    assert env_device("gym", "cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_keeps_a_gymnasium_env_on_the_host():
    from rlmem.config import load
    from rlmem.train import build

    config = load(None, ["env=cartpole_nv", "train.device=cuda", "env.num_envs=4"])
    env, learner, device = build(config)
    try:
        assert device.type == "cuda" and env.device == torch.device("cpu")
        assert all(g.staging is not None for g in learner.collector.runner.groups)
        learner.iteration()
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------
# The library adapters: native async stepping and splitting


needs_ale = pytest.mark.skipif(importlib.util.find_spec("ale_py") is None, reason="needs ale-py")
needs_procgen = pytest.mark.skipif(importlib.util.find_spec("procgen") is None, reason="needs procgen")


def merged(results):
    """The groups' step results as one batch."""
    info = {"final_obs": torch.cat([r[4]["final_obs"] for r in results]),
            "episode": {k: torch.cat([r[4]["episode"][k] for r in results]) for k in results[0][4]["episode"]}}
    return (*(torch.cat([r[k] for r in results]) for k in range(4)), info)


def assert_steps_equal(a, b):
    for x, y in zip(a[:4], b[:4], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a[4]["final_obs"], b[4]["final_obs"])
    for key in a[4]["episode"]:
        assert torch.equal(a[4]["episode"][key], b[4]["episode"][key]), key


@pytest.mark.parametrize("spec", [
    pytest.param({"name": "atari", "game": "pong", "num_envs": 4, "max_episode_frames": 400}, marks=needs_ale,
                 id="atari"),
    pytest.param({"name": "gym", "id": "CartPole-v1", "num_envs": 4, "vectorization": "async"}, id="gym_async"),
    pytest.param({"name": "gym", "id": "CartPole-v1", "num_envs": 4}, id="gym_sync"),
])
def test_split_adapters_keep_each_envs_seed(spec):
    # Split into groups, env j is seeded as before: the same actions give the same steps.
    with make_env(spec, seed=3) as whole, make_env(spec, seed=3) as split:
        parts = split.split(2)
        assert [p.num_envs for p in parts] == [2, 2]
        assert torch.equal(whole.reset(), split.reset())
        generator = torch.Generator().manual_seed(0)
        n = int(whole.single_action_space.n)
        ended = False
        for i in range(120):
            actions = torch.randint(n, (4,), generator=generator)
            expected = whole.step(actions)
            if i % 2:  # the parent steps its groups ...
                got = split.step(actions)
            else:  # ... or the groups step on their own, both in flight at once
                for part, piece in zip(parts, actions.split(2), strict=True):
                    part.step_async(piece)
                got = merged([part.step_wait() for part in parts])
            assert_steps_equal(expected, got)
            ended = ended or bool((expected[2] | expected[3]).any())
        assert ended  # episodes ended (and autoreset) during the comparison


@pytest.mark.parametrize("spec", [
    pytest.param({"name": "atari", "game": "pong", "num_envs": 2}, marks=needs_ale, id="atari"),
    pytest.param({"name": "gym", "id": "CartPole-v1", "num_envs": 2, "vectorization": "async"}, id="gym_async"),
    pytest.param({"name": "procgen", "game": "maze", "num_envs": 2}, marks=needs_procgen, id="procgen"),
])
def test_native_async_pair_refuses_misuse_without_hanging(spec):
    with make_env(spec) as env:
        assert env.steps_in_background
        env.reset(seed=0)
        with pytest.raises(EnvError, match="without a step started by step_async"):
            env.step_wait()
        with pytest.raises(EnvError, match="out of range"):  # refused before anything is sent
            env.step_async(torch.tensor([0, 99]))
        actions = torch.zeros(2, dtype=torch.long)
        env.step_async(actions)
        with pytest.raises(EnvError, match="step_async was called twice"):
            env.step_async(actions)
        with pytest.raises(EnvError, match="still pending"):
            env.step(actions)
        with pytest.raises(EnvError, match="still pending"):
            env.reset()
        obs, reward, *_ = env.step_wait()
        assert obs.shape == (2, *env.single_observation_space.shape) and reward.shape == (2,)
        env.step(actions)  # idle again


@needs_procgen
def test_procgen_splits_and_closes_its_groups(monkeypatch):
    import envs.base

    monkeypatch.setattr(envs.base, "available_cores", lambda: 4)
    env = make_env({"name": "procgen", "game": "maze", "num_envs": 4, "num_threads": 4})
    parts = env.split(2)
    assert [p.options.num_threads for p in parts] == [2, 2]  # each group's share of the 4 cores
    obs = env.reset(seed=0)
    assert obs.shape == (4, 3, 64, 64) and obs.dtype == torch.uint8
    obs, *_, info = env.step(torch.zeros(4, dtype=torch.long))
    assert obs.shape == (4, 3, 64, 64) and info["final_obs"].shape == (4, 3, 64, 64)
    env.close()
    with pytest.raises(EnvError, match="closed"):
        parts[0].step(torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("spec", [
    pytest.param({"name": "atari", "game": "pong", "episodic_life": True, "reward_clip": True}, marks=needs_ale,
                 id="atari"),
    pytest.param({"name": "procgen", "game": "maze"}, marks=needs_procgen, id="procgen"),  # channels-last frames
])
def test_library_rollout_with_overlap_replays_exactly(spec, monkeypatch):
    import envs.base

    monkeypatch.setattr(envs.base, "available_cores", lambda: 2)
    env = make_env({**spec, "num_envs": 4, "num_threads": 2, "overlap": True})
    try:
        learner = LEARNERS.get("actor_critic").cls(
            ActorCriticOptions(unroll_length=5), env, {"name": "gru", "hidden_size": 16},
            ModelOptions(encoder_size=32, prev_action=True, prev_reward=True), torch.device("cpu"), 0, 10_000)
        assert learner.collector.overlap  # env.overlap=true, on a CPU
        assert [g.env.options.num_threads for g in learner.collector.runner.groups] == [1, 1]
        learner.iteration()
        rollout, _ = collect(learner)
        with torch.no_grad():
            out = learner.network(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions,
                                  rollout.prev_rewards)
        torch.testing.assert_close(out.value, rollout.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.dist.log_prob(rollout.actions), rollout.log_probs, atol=1e-5, rtol=1e-5)
    finally:
        env.close()
