"""The actor_critic learner, the rollout collector and evaluate(), on small fake VecEnvs."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.actor_critic import ActorCriticLearner, ActorCriticOptions
from agents.base import LEARNERS, ModelOptions
from agents.evaluate import evaluate
from agents.returns import gae
from envs.base import VecEnv
from rlmem.errors import ConfigError
from rlmem.memory import CoreOptions, MemoryCore, register_core

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# Fake environments (natively batched, same-step autoreset, exact state_dict)


class CueRecall(VecEnv):
    """A cue (one of ``num_cues``) is shown at step 0, then ``delay`` blank steps, then a query step.

    Obs: [cue one-hot (num_cues), query flag, episode step / 100]. Reward 1 at the query step when the
    action names the cue (0 otherwise); the episode terminates after the query. Acting well needs memory.
    """

    def __init__(self, num_envs: int = 8, num_cues: int = 4, delay: int = 3, truncate: bool = False) -> None:
        self.num_envs, self.num_cues, self.delay, self.truncate = num_envs, num_cues, delay, truncate
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (num_cues + 2,), np.float32)
        self.single_action_space = gym.spaces.Discrete(num_cues)
        self.device = torch.device("cpu")
        self.generator = torch.Generator()

    def _obs(self) -> torch.Tensor:
        obs = torch.zeros(self.num_envs, self.num_cues + 2)
        first = self.t == 0
        obs[first, self.cue[first]] = 1.0
        obs[:, self.num_cues] = (self.t == self.delay + 1).float()
        obs[:, self.num_cues + 1] = self.t.float() / 100
        return obs

    def reset(self, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            self.generator.manual_seed(seed)
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.cue = torch.randint(self.num_cues, (self.num_envs,), generator=self.generator)
        self.ep_return = torch.zeros(self.num_envs)
        return self._obs()

    def step(self, actions):
        query = self.t == self.delay + 1
        correct = actions.long() == self.cue
        reward = (query & correct).float()
        self.ep_return += reward
        self.t += 1
        final_obs = self._obs()
        done = query
        terminated = done & torch.tensor(not self.truncate)
        truncated = done & torch.tensor(self.truncate)
        info = {
            "final_obs": final_obs,
            "episode": {"done": done.clone(), "return": self.ep_return.clone(), "length": self.t.clone()},
            "success": (query & correct).clone(),
        }
        new_cue = torch.randint(self.num_cues, (self.num_envs,), generator=self.generator)
        self.cue = torch.where(done, new_cue, self.cue)
        self.t = torch.where(done, 0, self.t)
        self.ep_return = torch.where(done, 0.0, self.ep_return)
        return self._obs(), reward, terminated, truncated, info

    def state_dict(self):
        return {"t": self.t.clone(), "cue": self.cue.clone(), "ret": self.ep_return.clone(),
                "rng": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.t, self.cue, self.ep_return = state["t"].clone(), state["cue"].clone(), state["ret"].clone()
        self.generator.set_state(state["rng"])


class ReachTarget(VecEnv):
    """Continuous control: obs = target in [-1, 1]^2 plus the step; reward −|a − target|².

    Episodes last ``length`` steps; env b's episodes end by truncation where ``b`` is even and by
    termination where it is odd, so both kinds of ending occur in every window. ``info`` reports no
    ``episode`` dict, so the collector keeps its own episode statistics.
    """

    def __init__(self, num_envs: int = 4, length: int = 5) -> None:
        self.num_envs, self.length = num_envs, length
        self.single_observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
        self.single_action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.device = torch.device("cpu")
        self.generator = torch.Generator()
        self.truncates = torch.arange(num_envs) % 2 == 0

    def _obs(self) -> torch.Tensor:
        return torch.cat([self.target, self.t.float().unsqueeze(1) / self.length], dim=1)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            self.generator.manual_seed(seed)
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.target = torch.rand(self.num_envs, 2, generator=self.generator) * 2 - 1
        return self._obs()

    def step(self, actions):
        assert actions.shape == (self.num_envs, 2) and actions.abs().max() <= 1.0  # clipped to the bounds
        reward = -(actions - self.target).pow(2).sum(1)
        self.t += 1
        final_obs = self._obs()
        done = self.t == self.length
        info = {"final_obs": final_obs}
        self.target = torch.where(done.unsqueeze(1), torch.rand(self.num_envs, 2, generator=self.generator) * 2 - 1,
                                  self.target)
        self.t = torch.where(done, 0, self.t)
        return self._obs(), reward, done & ~self.truncates, done & self.truncates, info

    def state_dict(self):
        return {"t": self.t.clone(), "target": self.target.clone(), "rng": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.t, self.target = state["t"].clone(), state["target"].clone()
        self.generator.set_state(state["rng"])


class Prediction(VecEnv):
    num_envs = 2
    single_observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    single_action_space = None
    device = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# A probe core whose state counts the steps since the episode start, as the core sees them.


@dataclass
class ProbeOptions(CoreOptions):
    pass


@register_core("test_agents_step_count", ProbeOptions)
class StepCountCore(MemoryCore):
    """``state["count"]`` = steps consumed since the last reset; records it before every step."""

    records: ClassVar[list[tuple[torch.Tensor, torch.Tensor]]] = []  # (count entering step t, episode step)
    episode_step_index: ClassVar[int] = 5  # where CueRecall(num_cues=4) keeps the episode step in the input

    def __init__(self, options: ProbeOptions, input_size: int) -> None:
        super().__init__(options, input_size)
        self.linear = torch.nn.Linear(input_size, options.hidden_size)

    def initial_state(self, batch, device="cpu", dtype=None):
        return {"count": torch.zeros(batch, 1, device=device)}

    def forward(self, x, state, reset):
        count = state["count"]
        for t in range(x.shape[0]):
            count = count * (~reset[t]).unsqueeze(1).float()
            # The identity encoder passes the obs through, and CueRecall writes the episode step / 100.
            StepCountCore.records.append((count[:, 0].clone(), (x[t, :, self.episode_step_index] * 100).round()))
            count = count + 1
        return torch.tanh(self.linear(x)), {"count": count}


# --------------------------------------------------------------------------------------------------

GRU = {"name": "gru", "hidden_size": 16}
MODEL = ModelOptions(encoder_size=32)


def make_learner(env, memory=GRU, model=MODEL, seed=0, total_steps=10_000, **options) -> ActorCriticLearner:
    options.setdefault("unroll_length", 8)
    return LEARNERS.get("actor_critic").cls(ActorCriticOptions(**options), env, memory, model,
                                            torch.device("cpu"), seed, total_steps)


def collect(learner: ActorCriticLearner):
    return learner.collector.collect(learner.options.unroll_length)[0]


def concat_rollouts(rollouts):
    fields = ("obs", "actions", "log_probs", "values", "reset", "prev_actions", "prev_rewards")
    return {f: torch.cat([getattr(r, f) for r in rollouts]) for f in fields}


def episode_replay_error(learner: ActorCriticLearner, windows: int) -> float:
    """Collect ``windows`` windows, then rerun every episode on its own from a zero state and return the
    largest difference to the values and log-probs recorded while acting. A memory state that leaks
    across an episode start, or that is lost between windows, makes this large. Episode starts are read
    from the observation (its last entry is the episode step), not from the learner's reset flags."""
    rollouts = [collect(learner) for _ in range(windows)]
    data = concat_rollouts(rollouts)
    net, error = learner.network, 0.0
    starts = data["obs"][..., -1] == 0
    with torch.no_grad():
        for b in range(learner.num_envs):
            bounds = [*torch.nonzero(starts[:, b]).flatten().tolist(), starts.shape[0]]
            for s, e in itertools.pairwise(bounds):
                episode_start = torch.zeros(e - s, 1, dtype=torch.bool)
                episode_start[0] = True
                out = net(data["obs"][s:e, b:b + 1], net.initial_state(1), episode_start,
                          data["prev_actions"][s:e, b:b + 1], data["prev_rewards"][s:e, b:b + 1])
                error = max(error, float((out.value[:, 0] - data["values"][s:e, b]).abs().max()),
                            float((out.dist.log_prob(data["actions"][s:e, b:b + 1])[:, 0]
                                   - data["log_probs"][s:e, b]).abs().max()))
    return error


# --------------------------------------------------------------------------------------------------
# Options and construction


def test_registered_with_options_matching_the_config_file():
    from pathlib import Path

    from omegaconf import OmegaConf

    entry = LEARNERS.get("actor_critic")
    assert entry.cls is ActorCriticLearner and entry.options is ActorCriticOptions
    values = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "configs/agent/actor_critic.yaml"))
    assert values.pop("name") == "actor_critic"
    assert ActorCriticOptions(**values) == ActorCriticOptions()


@pytest.mark.parametrize("key,value,message", [
    ("target", "retrace", "agent.target must be one of gae, vtrace"),
    ("optimizer", "sgd", "agent.optimizer must be one of adam, rmsprop"),
    ("unroll_length", 0, "agent.unroll_length"),
    ("unroll_length", 2.5, "agent.unroll_length"),
    ("gamma", 1.5, "agent.gamma"),
    ("lr", 0, "agent.lr"),
    ("reward_clip", -1, "agent.reward_clip"),
    ("anneal_lr", "yes", "agent.anneal_lr must be true or false"),
])
def test_invalid_options_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        ActorCriticOptions(**{key: value})


def test_prediction_env_is_refused():
    with pytest.raises(ConfigError, match="prediction task"):
        make_learner(Prediction())


# --------------------------------------------------------------------------------------------------
# Iterations


@pytest.mark.parametrize("make_env", [CueRecall, ReachTarget], ids=["discrete", "continuous"])
@pytest.mark.parametrize("core", ["gru", "lstm", "none"])
def test_iteration_runs_and_reports(make_env, core):
    env = make_env()
    learner = make_learner(env, memory={"name": core, "hidden_size": 8},
                           model=ModelOptions(encoder_size=16, prev_action=True, prev_reward=True))
    results = [learner.iteration() for _ in range(3)]
    result = results[-1]
    assert result.env_steps == 8 * env.num_envs
    for tag in ("losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl",
                "losses/explained_variance", "losses/grad_norm", "charts/learning_rate"):
        assert tag in result.metrics and np.isfinite(result.metrics[tag]), tag
    assert result.metrics["losses/approx_kl"] > 0  # the update moved the policy
    memory_tags = sorted(k for k in result.metrics if k.startswith("memory/"))
    assert memory_tags == {"gru": ["memory/h_norm"], "lstm": ["memory/c_norm", "memory/h_norm"], "none": []}[core]
    # 24 steps per env with 5-step episodes: every env finished episodes.
    returns = [r for res in results for r in res.episode_returns]
    lengths = [n for res in results for n in res.episode_lengths]
    assert len(returns) >= 4 * env.num_envs and set(lengths) == {5}
    if make_env is CueRecall:
        assert set(returns) <= {0.0, 1.0} and all(0 <= s <= 1 for s in result.episode_successes)
        assert len(result.episode_successes) == len(result.episode_returns)
    else:
        assert result.episode_successes == [] and max(returns) < 0


def test_episode_stats_match_the_env():
    env = CueRecall(num_envs=4, delay=1)  # 3-step episodes
    learner = make_learner(env, unroll_length=6)
    result = learner.iteration()
    # Each env finished episodes at steps 2 and 5 of the window.
    assert result.episode_lengths == [3] * 8
    assert len(result.episode_returns) == 8
    assert result.episode_successes == result.episode_returns  # one scored action: success is the 0/1 return


def test_memory_metrics_come_from_the_carried_state():
    learner = make_learner(CueRecall())
    result = learner.iteration()
    carried = learner.collector.memory_state["h"]
    assert result.metrics["memory/h_norm"] == pytest.approx(float(carried.norm(dim=1).mean()))
    assert result.metrics["memory/h_norm"] > 0


@pytest.mark.parametrize("make_env", [CueRecall, ReachTarget], ids=["discrete", "continuous"])
@pytest.mark.parametrize("core", ["gru", "lstm", "none"])
def test_replay_from_stored_start_state_reproduces_acting(make_env, core):
    learner = make_learner(make_env(), memory={"name": core, "hidden_size": 8},
                           model=ModelOptions(encoder_size=16, prev_action=True, prev_reward=True))
    learner.iteration()  # the second window starts from a non-zero carried state
    rollout = collect(learner)
    assert rollout.reset[1:].any()  # episodes end inside the window
    out = learner.network(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions,
                          rollout.prev_rewards)
    torch.testing.assert_close(out.value, rollout.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.dist.log_prob(rollout.actions), rollout.log_probs, atol=1e-5, rtol=1e-5)
    for key, value in out.state.items():  # and ends in the acting state
        torch.testing.assert_close(value, learner.collector.memory_state[key], atol=1e-5, rtol=1e-5)


def test_rollout_of_a_subset_of_envs_replays_like_the_whole():
    # Recurrent PPO minibatches take whole sequences of some envs, from those envs' start states.
    learner = make_learner(CueRecall(num_envs=6), model=ModelOptions(encoder_size=16, prev_action=True))
    learner.iteration()
    rollout = collect(learner)
    envs = torch.tensor([4, 1])
    subset = rollout.select_envs(envs)
    assert subset.obs.shape == (8, 2, 6) and subset.bootstrap_value.shape == (2,)
    assert torch.equal(subset.actions, rollout.actions[:, envs])
    assert torch.equal(subset.start_state["h"], rollout.start_state["h"][envs])
    out = learner.network(subset.obs, subset.start_state, subset.reset, subset.prev_actions, subset.prev_rewards)
    torch.testing.assert_close(out.value, rollout.values[:, envs], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Memory resets at episode boundaries


@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_no_memory_leaks_across_episodes_or_loss_across_windows(core):
    # 5-step episodes, 8-step windows: episodes start inside windows and straddle window boundaries.
    learner = make_learner(CueRecall(num_envs=4), memory={"name": core, "hidden_size": 8},
                           model=ModelOptions(encoder_size=16, prev_action=True, prev_reward=True))
    assert episode_replay_error(learner, windows=4) < 1e-5


def test_leak_check_detects_a_leak():
    # Sabotage: never tell the core that an episode started. The check must notice.
    learner = make_learner(CueRecall(num_envs=4), model=ModelOptions(encoder_size=16))
    collector = learner.collector
    original_step = collector.env.step

    def step_without_resets(actions):
        obs, reward, terminated, truncated, info = original_step(actions)
        return obs, reward, terminated & False, truncated & False, info

    collector.env.step = step_without_resets
    assert episode_replay_error(learner, windows=3) > 1e-3


def test_state_entering_every_episode_is_zero():
    # The probe core counts the steps it has seen since its last reset; the env writes the true
    # episode step into the observation. They agree at every step, for acting and for the replay.
    StepCountCore.records.clear()
    learner = make_learner(CueRecall(num_envs=3, delay=3), memory={"name": "test_agents_step_count", "hidden_size": 4},
                           model=ModelOptions(encoder="identity", prev_action=True, prev_reward=True))
    for _ in range(3):
        learner.iteration()
    counts = torch.stack([c for c, _ in StepCountCore.records])
    episode_steps = torch.stack([s for _, s in StepCountCore.records])
    assert counts.shape[0] >= 3 * (8 + 1 + 8)  # acting steps, bootstrap steps and replays
    assert torch.equal(counts, episode_steps)
    assert (episode_steps == 0).sum() > 3 * 3  # episode starts were seen


# --------------------------------------------------------------------------------------------------
# Truncation and termination


def test_truncation_bootstraps_from_final_obs_and_termination_does_not():
    # ReachTarget: even envs' episodes end by truncation, odd envs' by termination, every 5 steps.
    env = ReachTarget(num_envs=4, length=5)
    learner = make_learner(env, model=ModelOptions(encoder_size=16, prev_action=True, prev_reward=True))
    learner.iteration()
    rollouts = [collect(learner) for _ in range(2)]
    data = concat_rollouts(rollouts)
    terminated = torch.cat([r.terminated for r in rollouts])
    truncated = torch.cat([r.truncated for r in rollouts])
    final_values = torch.cat([r.final_values for r in rollouts])
    assert truncated[:, 0::2].any() and terminated[:, 1::2].any()
    assert not truncated[:, 1::2].any() and not terminated[:, 0::2].any()
    assert torch.all(final_values[~truncated] == 0)  # termination bootstraps nothing

    net = learner.network
    checked = 0
    with torch.no_grad():
        for t, b in torch.nonzero(truncated).tolist():
            s = t - 4  # the episode's first step
            if s < 0:
                continue
            # V(final_obs) computed with the state after step t, before the reset: rerun the episode
            # from a zero state and feed the final observation (the target, at episode step 5) once more.
            final_obs = torch.cat([data["obs"][t, b, :2], torch.ones(1)])
            obs = torch.cat([data["obs"][s:t + 1, b], final_obs[None]]).unsqueeze(1)
            prev_action = torch.cat([data["prev_actions"][s:t + 1, b], data["actions"][t, b][None]]).unsqueeze(1)
            reward = -(data["actions"][t, b].clamp(-1, 1) - data["obs"][t, b, :2]).pow(2).sum()
            prev_reward = torch.cat([data["prev_rewards"][s:t + 1, b], reward[None]]).unsqueeze(1)
            episode_start = torch.zeros(6, 1, dtype=torch.bool)
            episode_start[0] = True
            value = net(obs, net.initial_state(1), episode_start, prev_action, prev_reward).value[-1, 0]
            torch.testing.assert_close(final_values[t, b], value, atol=1e-5, rtol=1e-5)
            if t + 1 < data["values"].shape[0]:  # the next episode's first value is something else
                assert abs(float(final_values[t, b] - data["values"][t + 1, b])) > 1e-4
            checked += 1
    assert checked >= 2

    # The value targets at the last step of an episode: r + γ·V(final_obs) when truncated, r when terminated.
    rollout = rollouts[1]
    targets = learner.loss(rollout).targets
    gamma = learner.options.gamma
    torch.testing.assert_close(targets[rollout.truncated],
                               rollout.rewards[rollout.truncated] + gamma * rollout.final_values[rollout.truncated])
    torch.testing.assert_close(targets[rollout.terminated], rollout.rewards[rollout.terminated])


# --------------------------------------------------------------------------------------------------
# Resume


def assert_metrics_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), key


@pytest.mark.parametrize("make_env", [CueRecall, ReachTarget], ids=["discrete", "continuous"])
def test_resume_from_state_dict_is_bit_identical(make_env):
    model = ModelOptions(encoder_size=16, prev_action=True, prev_reward=True)
    uninterrupted = make_learner(make_env(), model=model, seed=1)
    for _ in range(3):
        uninterrupted.iteration()
    reference = [uninterrupted.iteration() for _ in range(3)]

    interrupted_env = make_env()
    interrupted = make_learner(interrupted_env, model=model, seed=1)
    for _ in range(3):
        interrupted.iteration()
    checkpoint = io.BytesIO()
    torch.save({"learner": interrupted.state_dict(), "env": interrupted_env.state_dict()}, checkpoint)
    interrupted.iteration()  # runs on after the checkpoint: what it does later must not leak into it
    checkpoint.seek(0)
    saved = torch.load(checkpoint)

    resumed_env = make_env()
    resumed = make_learner(resumed_env, model=model, seed=7)  # a different seed: everything comes from the file
    resumed.load_state_dict(saved["learner"])
    resumed_env.load_state_dict(saved["env"])
    results = [resumed.iteration() for _ in range(3)]

    for p, q in zip(uninterrupted.network.parameters(), resumed.network.parameters(), strict=True):
        assert torch.equal(p, q)
    for ref, res in zip(reference, results, strict=True):
        assert_metrics_equal(ref.metrics, res.metrics)
        assert ref.episode_returns == res.episode_returns and ref.episode_lengths == res.episode_lengths
    assert resumed.iterations == uninterrupted.iterations == 6


# --------------------------------------------------------------------------------------------------
# Learning


def test_loss_decreases_on_a_fixed_batch():
    learner = make_learner(CueRecall(num_envs=8), lr=1e-2, anneal_lr=False)
    learner.iteration()
    rollout = collect(learner)
    first = learner.loss(rollout)
    for _ in range(30):
        learner.update(rollout)
    last = learner.loss(rollout)
    # The value fits its (recomputed, noisy) targets better and the policy moves towards the actions
    # with positive advantages.
    assert float(last.value_loss.detach()) < 0.75 * float(first.value_loss.detach())
    assert float(last.policy_loss.detach()) < float(first.policy_loss.detach()) - 0.1
    assert float(last.total.detach()) < float(first.total.detach())


def test_vtrace_on_policy_targets_are_n_step_returns():
    learner = make_learner(CueRecall(num_envs=4), target="vtrace")
    learner.iteration()
    rollout = collect(learner)
    terms = learner.loss(rollout)
    _, n_step = gae(rollout.rewards, terms.values, rollout.bootstrap_value, rollout.done, 0.99, 1.0)
    torch.testing.assert_close(terms.targets, n_step, atol=1e-5, rtol=1e-5)


def test_rmsprop_reward_clip_and_lr_annealing():
    learner = make_learner(ReachTarget(), optimizer="rmsprop", lr=1e-3, rmsprop_eps=0.01, rmsprop_alpha=0.9,
                           reward_clip=0.5, total_steps=8 * 4 * 10)
    assert isinstance(learner.optimizer, torch.optim.RMSprop)
    assert learner.optimizer.defaults["eps"] == 0.01 and learner.optimizer.defaults["alpha"] == 0.9
    rates = [learner.iteration().metrics["charts/learning_rate"] for _ in range(3)]
    assert rates == pytest.approx([1e-3, 0.9e-3, 0.8e-3])  # linear to 0 over 10 updates
    rollout = collect(learner)
    targets = learner.loss(rollout).targets
    assert rollout.rewards[rollout.terminated].min() < -0.5  # the raw rewards reach beyond the clip
    torch.testing.assert_close(targets[rollout.terminated], rollout.rewards[rollout.terminated].clamp(-0.5, 0.5))
    constant = make_learner(ReachTarget(), anneal_lr=False, lr=1e-3, total_steps=8 * 4 * 10)
    assert [constant.iteration().metrics["charts/learning_rate"] for _ in range(3)] == [1e-3] * 3


def test_gru_actor_critic_learns_cue_recall():
    env = CueRecall(num_envs=16, delay=2)
    learner = make_learner(env, memory={"name": "gru", "hidden_size": 32}, unroll_length=16, anneal_lr=False)
    success = [np.mean(learner.iteration().episode_successes) for _ in range(160)]
    assert np.mean(success[:10]) < 0.4  # chance is 0.25
    assert np.mean(success[-20:]) > 0.8
    returns, lengths = evaluate(learner.network, CueRecall(num_envs=16, delay=2), episodes=64, device="cpu",
                                greedy=True)
    assert len(returns) == 64 and set(lengths) == {4}
    assert np.mean(returns) > 0.85


# --------------------------------------------------------------------------------------------------
# evaluate()


def test_evaluate_counts_episodes_reproducibly_and_resets_memory():
    StepCountCore.records.clear()
    learner = make_learner(CueRecall(num_envs=3), memory={"name": "test_agents_step_count", "hidden_size": 4},
                           model=ModelOptions(encoder="identity"))
    StepCountCore.records.clear()
    env = CueRecall(num_envs=3)  # 5-step episodes, all envs in step: 3 episodes finish every 5 steps
    returns, lengths = evaluate(learner.network, env, episodes=7, device="cpu", seed=3)
    assert len(returns) == 7 and lengths == [5] * 7
    assert len(StepCountCore.records) == 15  # stopped after the step where the 7th episode finished
    counts = torch.stack([c for c, _ in StepCountCore.records])
    assert torch.equal(counts, torch.stack([s for _, s in StepCountCore.records]))
    assert (returns, lengths) == evaluate(learner.network, env, episodes=7, device="cpu", seed=3)


def test_evaluate_greedy_and_without_episode_info():
    learner = make_learner(ReachTarget())
    env = ReachTarget()
    returns, lengths = evaluate(learner.network, env, episodes=6, device="cpu", greedy=True, seed=0)
    assert lengths == [5] * 6 and all(r < 0 for r in returns)
    again, _ = evaluate(learner.network, env, episodes=6, device="cpu", greedy=True, seed=0)
    assert again == returns
    sampled, _ = evaluate(learner.network, env, episodes=6, device="cpu", greedy=False, seed=0)
    assert sampled != returns


# --------------------------------------------------------------------------------------------------
# Exact RTRL (elstm): sensitivities advance in the replay, never while acting


ELSTM_RTRL = {"name": "elstm", "hidden_size": 16, "grad": "rtrl"}


def test_elstm_rtrl_replay_reproduces_acting_without_leaks():
    learner = make_learner(CueRecall(num_envs=4), memory=ELSTM_RTRL,
                           model=ModelOptions(encoder_size=16, prev_action=True, prev_reward=True))
    learner.iteration()
    rollout = collect(learner)
    out = learner.network(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions,
                          rollout.prev_rewards)
    torch.testing.assert_close(out.value, rollout.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.dist.log_prob(rollout.actions), rollout.log_probs, atol=1e-5, rtol=1e-5)
    assert episode_replay_error(learner, windows=3) < 1e-5


def test_elstm_rtrl_sensitivities_advance_in_the_replay_and_not_while_acting():
    learner = make_learner(CueRecall(num_envs=4), memory=ELSTM_RTRL, model=ModelOptions(encoder_size=16))
    result = learner.iteration()
    sensitivity_keys = [k for k in learner.collector.memory_state if k.startswith("sensitivity_")]
    assert sensitivity_keys
    assert {f"memory/{k}_norm" for k in sensitivity_keys} <= result.metrics.keys()
    assert all(result.metrics[f"memory/{k}_norm"] > 0 for k in sensitivity_keys)

    start = {k: v.clone() for k, v in learner.collector.memory_state.items()}
    rollout = collect(learner)  # acting only
    acted = learner.collector.memory_state
    assert not torch.equal(acted["cell"], start["cell"])  # acting ran the cell...
    for key in sensitivity_keys:  # ...and passed the sensitivities through untouched
        assert torch.equal(acted[key], start[key]), key
        assert torch.equal(rollout.start_state[key], start[key]), key

    _, carried = learner.update(rollout)
    torch.testing.assert_close(carried["cell"], acted["cell"], atol=1e-5, rtol=1e-5)
    for key in sensitivity_keys:  # the replay advanced them
        assert not torch.equal(carried[key], start[key]), key

    # Across iterations, the learner carries the replay's sensitivities into the next window.
    learner.collector.memory_state = carried
    learner.iteration()
    for key in sensitivity_keys:
        assert not torch.equal(learner.collector.memory_state[key], carried[key]), key


# --------------------------------------------------------------------------------------------------
# The registered environments


@pytest.mark.parametrize("spec", [
    {"name": "cue_recall", "num_envs": 4},
    {"name": "gym", "id": "CartPole-v1", "num_envs": 2},
    {"name": "gym", "id": "Pendulum-v1", "num_envs": 2},
], ids=["cue_recall", "cartpole", "pendulum"])
def test_runs_on_registered_envs(spec):
    from envs import make_env

    env = make_env(spec)
    learner = make_learner(env, model=ModelOptions(encoder_size=16, prev_action=True, prev_reward=True))
    result = learner.iteration()
    assert result.env_steps == 8 * env.num_envs and np.isfinite(result.metrics["losses/value_loss"])
    env.close()


def test_registered_prediction_env_is_refused():
    from envs import make_env

    with pytest.raises(ConfigError, match="prediction task"):
        make_learner(make_env({"name": "trace_patterning", "num_envs": 2}))


def test_elstm_rtrl_learns_a_cue_beyond_the_window():
    # 4-step episodes, 3-step windows: the cue and the query never share a window, so it is the
    # gradient carried across windows (the replay's sensitivities) that connects them.
    env = CueRecall(num_envs=16, delay=2)
    learner = make_learner(env, memory={"name": "elstm", "hidden_size": 16, "grad": "rtrl"}, unroll_length=3,
                           anneal_lr=False)
    success = [np.mean(learner.iteration().episode_successes or [np.nan]) for _ in range(600)]
    assert np.nanmean(success[:60]) < 0.35  # chance is 0.25
    assert np.nanmean(success[-60:]) > 0.8



def test_summed_loss_gives_the_window_size_times_the_mean_gradient():
    """loss_reduction=sum (IMPALA's scale, for which RMSProp's ε = 0.01 is set) gives T·B times the
    gradient of the mean on the same window."""
    import dataclasses

    from rlmem import config as cfg
    from rlmem.train import build

    config = cfg.load(None, ["env.num_envs=4", "agent.unroll_length=5"])
    env, learner, _ = build(config)
    try:
        rollout, _ = learner.collector.collect(5)
        gradients = {}
        for reduction in ("mean", "sum"):
            learner.options = dataclasses.replace(learner.options, loss_reduction=reduction)
            learner.network.zero_grad()
            learner.loss(rollout).total.backward()
            gradients[reduction] = [p.grad.clone() for p in learner.network.parameters() if p.grad is not None]
    finally:
        env.close()
    for mean, summed in zip(gradients["mean"], gradients["sum"]):
        torch.testing.assert_close(summed, mean * 20, rtol=1e-4, atol=1e-6)
