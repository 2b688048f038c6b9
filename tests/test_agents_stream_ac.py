"""The stream_ac learner: per-step updates, traces, ObGD, and the core's per-step RTRL gradient."""

from __future__ import annotations

import copy
import functools

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.base import LEARNERS, ModelOptions
from agents.normalization import RunningMeanStd
from agents.obgd import obgd_update
from agents.stream_ac import (
    VMAP_MIN_ENVS,
    StreamACLearner,
    StreamACOptions,
    batched_per_env_gradients,
    per_env_gradients,
)
from agents.stream_network import StreamingActorCritic, sparse_init_
from envs import make_env
from envs.base import VecEnv
from rlmem.config import load
from rlmem.errors import ConfigError

ELSTM = {"name": "elstm", "hidden_size": 8, "grad": "rtrl"}


def network_options(options: StreamACOptions) -> dict:
    """The ``StreamingActorCritic`` keywords the learner passes from its options."""
    return {"normalize_observations": options.normalize_observations, "torso_size": options.torso_size,
            "torso_layers": options.torso_layers, "sparsity": options.sparsity}
MODEL = ModelOptions()


class UnevenEpisodes(VecEnv):
    """Env b's episodes last b + 2 steps (termination where b is odd, truncation where it is even).

    Obs: 3 random numbers and the episode step / 10; reward: obs[0] of the step's observation times
    (action == 0). ``info`` carries ``final_obs`` and the raw ``episode`` statistics; exact state_dict.
    """

    def __init__(self, num_envs: int = 3) -> None:
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.device = torch.device("cpu")
        self.generator = torch.Generator()
        self.length = torch.arange(num_envs) + 2
        self.truncates = torch.arange(num_envs) % 2 == 0

    def _draw(self) -> None:
        self.noise = torch.randn(self.num_envs, 3, generator=self.generator)

    def _obs(self) -> torch.Tensor:
        return torch.cat([self.noise, self.t.float().unsqueeze(1) / 10], dim=1)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            self.generator.manual_seed(seed)
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.ep_return = torch.zeros(self.num_envs)
        self._draw()
        return self._obs()

    def step(self, actions):
        reward = self.noise[:, 0] * (actions == 0).float()
        self.ep_return += reward
        self.t += 1
        self._draw()
        final_obs = self._obs()
        done = self.t == self.length
        info = {"final_obs": final_obs,
                "episode": {"done": done.clone(), "return": self.ep_return.clone(), "length": self.t.clone()}}
        self.t = torch.where(done, 0, self.t)
        self.ep_return = torch.where(done, 0.0, self.ep_return)
        return self._obs(), reward, done & ~self.truncates, done & self.truncates, info

    def state_dict(self):
        return {"t": self.t.clone(), "ret": self.ep_return.clone(), "noise": self.noise.clone(),
                "rng": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.t, self.ep_return, self.noise = state["t"].clone(), state["ret"].clone(), state["noise"].clone()
        self.generator.set_state(state["rng"])


def make_learner(env: VecEnv, memory=ELSTM, model=MODEL, seed: int = 0, **options) -> StreamACLearner:
    options.setdefault("steps_per_iteration", 4)
    options.setdefault("torso_size", 16)
    return LEARNERS.get("stream_ac").cls(StreamACOptions(**options), env, memory, model, torch.device("cpu"),
                                         seed, 10_000)


def flat_grad(objective: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(objective, params, retain_graph=retain_graph, allow_unused=True,
                                materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def params_of(learner: StreamACLearner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.network.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize("memory", [
    {"name": "gru", "hidden_size": 8, "grad": "bptt"},
    {"name": "lstm", "hidden_size": 8, "grad": "bptt"},
    {"name": "none", "hidden_size": 8, "grad": "bptt"},
    {"name": "elstm", "hidden_size": 8, "grad": "bptt"},
])
def test_cores_that_cannot_learn_online_are_a_config_error(memory):
    expected = r"memory\.grad must be one of rtrl, snap1.*cfc \(rtrl/snap1\).*elstm \(rtrl\)"
    with pytest.raises(ConfigError, match=expected):
        make_learner(UnevenEpisodes(), memory=memory)


def test_other_config_errors():
    with pytest.raises(ConfigError, match=r"model\.encoder must be one of auto, identity"):
        make_learner(UnevenEpisodes(), model=ModelOptions(encoder="mlp"))
    with pytest.raises(ConfigError, match=r"agent\.env_update must be one of mean, sum"):
        StreamACOptions(env_update="max")
    with pytest.raises(ConfigError, match=r"agent\.per_env_gradients must be one of auto, vmap, batched"):
        StreamACOptions(per_env_gradients="fast")
    with pytest.raises(ConfigError, match=r"agent\.trace_lambda"):
        StreamACOptions(trace_lambda=1.5)
    image_space = gym.spaces.Box(0, 255, (1, 8, 8), np.uint8)
    with pytest.raises(ConfigError, match="vector observations"):
        StreamingActorCritic(image_space, gym.spaces.Discrete(2), ELSTM, MODEL, torch.Generator(),
                             **network_options(StreamACOptions()))


def test_experiment_configs_load():
    for path in ("configs/cue_recall_stream_ac.yaml", "configs/repeat_previous_stream_ac.yaml",
                 "configs/cartpole_nv_stream_ac.yaml"):
        config = load(path)
        assert config.agent["name"] == "stream_ac" and config.memory["grad"] in ("rtrl", "snap1")


# --------------------------------------------------------------------------------------------------
# Pieces


def test_running_mean_std_matches_the_whole_sample():
    stats = RunningMeanStd((2,))
    samples = torch.randn(50, 2, dtype=torch.float64) * 3 + 1
    assert torch.equal(stats.var, torch.ones(2, dtype=torch.float64))  # before two samples
    for chunk in samples.split([1, 7, 20, 22]):
        stats.update(chunk)
    torch.testing.assert_close(stats.mean, samples.mean(0))
    torch.testing.assert_close(stats.var, samples.var(0))


def test_sparse_init_zeroes_the_fraction_of_each_units_inputs():
    layer = sparse_init_(torch.nn.Linear(20, 6), 0.9, torch.Generator().manual_seed(0))
    assert ((layer.weight != 0).sum(1) == 2).all()
    assert layer.weight.abs().max() <= 20 ** -0.5 and torch.equal(layer.bias, torch.zeros(6))
    narrow = sparse_init_(torch.nn.Linear(4, 6), 0.9, torch.Generator().manual_seed(0))
    assert ((narrow.weight != 0).sum(1) == 1).all()  # never every input of a unit


@pytest.mark.parametrize("env_update", ["mean", "sum"])
def test_obgd_update_is_the_per_env_obgd_step(env_update):
    """Against a direct per-env transcription of ObGD (Elsayed et al.'s optimiser, one env at a time)."""
    K, B, P = 2, 3, 5
    generator = torch.Generator().manual_seed(0)
    traces = torch.randn(K, B, P, generator=generator)
    grads = torch.randn(K, B, P, generator=generator)
    delta = torch.tensor([0.3, -2.0, 0.0])
    kappa = torch.tensor([2.0, 3.0])
    decay, lr = 0.99 * 0.8, 1.0
    expected_update = torch.zeros(P)
    for k in range(K):
        for b in range(B):
            z = decay * traces[k, b] + grads[k, b]
            dot = max(abs(float(delta[b])), 1.0) * float(z.abs().sum()) * lr * float(kappa[k])
            step = lr / dot if dot > 1 else lr
            expected_update += step * float(delta[b]) * z / (B if env_update == "mean" else 1)
    expected_traces = decay * traces + grads
    update, step_size = obgd_update(traces, grads, delta, decay, lr, kappa, env_update)
    torch.testing.assert_close(traces, expected_traces)
    torch.testing.assert_close(update, expected_update)
    assert step_size.shape == (K, B) and (step_size <= lr).all()


# --------------------------------------------------------------------------------------------------
# The core's gradient through per-step RTRL


def stream_network(memory, seed: int = 0) -> StreamingActorCritic:
    torch.manual_seed(seed)
    env = UnevenEpisodes()
    options = StreamACOptions(torso_size=8, normalize_observations=False)
    return StreamingActorCritic(env.single_observation_space, env.single_action_space, memory, MODEL,
                                torch.Generator().manual_seed(seed), **network_options(options))


def one_env_values(net: StreamingActorCritic):
    """The ``per_env_gradients`` objective V(s_t) of one env, with its next state as aux."""
    def values(params, obs, state, reset):
        out = torch.func.functional_call(net, params, (obs[None, None], {k: v[None] for k, v in state.items()},
                                                       reset[None, None]))
        return out.value[0], {k: v[0] for k, v in out.state.items()}

    return values


def detached_params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in net.named_parameters()}


@pytest.mark.parametrize("memory", [ELSTM, {"name": "lru", "hidden_size": 4, "grad": "rtrl"}])
def test_per_env_gradients_are_the_t1_window_gradients(memory):
    """The learner's objectives per env (vmap over envs) against the ordinary backward pass through a
    batched T = 1 RTRL step: summed over envs, env by env, and the advanced state."""
    learner = make_learner(UnevenEpisodes(num_envs=3), memory)
    net, params = learner.network, learner.params
    B = 3
    state = net.initial_state(B)
    for _ in range(3):  # carry non-zero sensitivities into the step under test
        state = net.step(torch.randn(B, 4), state, torch.zeros(B, dtype=torch.bool)).state
    obs, reset = torch.randn(B, 4), torch.tensor([False, True, False])
    prev_action, prev_reward = torch.tensor([1, 0, 1]), torch.tensor([0.5, 0.0, -1.0])
    action, entropy_weight = torch.tensor([0, 1, 1]), torch.tensor([0.01, -0.01, 0.0])
    out = net.step(obs, state, reset, prev_action, prev_reward)
    value = out.value[0]
    actor = out.dist.log_prob(action[None])[0] + entropy_weight * out.dist.entropy()[0]
    objectives = functools.partial(learner.one_env_objectives, stats={})  # the network's own buffers
    per_env, next_state = per_env_gradients(objectives, detached_params(net), obs, state, reset, prev_action,
                                            prev_reward, action, entropy_weight)  # [2, B, P]
    assert per_env.shape == (2, B, sum(p.numel() for p in params))
    # The fallback for cores outside torch.func: one-hot output gradients through the batched graph.
    torch.testing.assert_close(per_env, batched_per_env_gradients(torch.stack([value, actor]), params))
    # Summed over envs: the ordinary backward pass through the T = 1 RTRL window.
    for k, objective in enumerate((value, actor)):
        torch.testing.assert_close(per_env[k].sum(0), flat_grad(objective.sum(), params, retain_graph=True))
    # Env by env: a batch of that env alone.
    for b in range(B):
        alone = net.step(obs[b : b + 1], {k: v[b : b + 1] for k, v in state.items()}, reset[b : b + 1])
        torch.testing.assert_close(per_env[0, b], flat_grad(alone.value[0, 0], params))
    # The state the gradient pass returns is the step's own, sensitivities advanced.
    for key, expected in out.state.items():
        torch.testing.assert_close(next_state[key], expected, msg=key)


@pytest.mark.parametrize("memory", [ELSTM, {"name": "lru", "hidden_size": 4, "grad": "rtrl"}])
def test_per_step_rtrl_gradients_sum_to_the_bptt_gradient(memory):
    """With fixed parameters, Σ_t of the per-step gradients of V_t (T = 1 windows carrying
    sensitivities) equals the BPTT gradient of Σ_t V_t over the whole sequence, resets included."""
    net = stream_network(memory)
    bptt_net = stream_network({**memory, "grad": "bptt"})
    bptt_net.load_state_dict(net.state_dict())
    params, bptt_params = list(net.parameters()), list(bptt_net.parameters())
    T, B = 7, 3
    obs = torch.randn(T, B, 4)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[0] = True
    reset[4, 1] = True  # env 1 starts a new episode mid-sequence

    state = net.initial_state(B)
    per_step = torch.zeros(B, sum(p.numel() for p in params))
    for t in range(T):
        grads, state = per_env_gradients(one_env_values(net), detached_params(net), obs[t], state, reset[t])
        per_step += grads[0]

    values = bptt_net(obs, bptt_net.initial_state(B), reset).value
    bptt = flat_grad(values.sum(), bptt_params)
    torch.testing.assert_close(per_step.sum(0), bptt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory", [{"name": "ccn", "grad": "rtrl"}, {"name": "cfc", "grad": "rtrl"}])
def test_cores_outside_torch_func_fall_back_to_the_batched_backward(memory):
    # The CCN's normaliser updates a buffer in its forward and the dense CfC's RTRL carries its
    # sensitivities through an autograd.Function of the old style: neither runs under vmap.
    memory = {**memory, "hidden_size": 4}
    learner = make_learner(UnevenEpisodes(num_envs=3), memory, per_env_gradients="vmap")
    with pytest.warns(UserWarning, match="fall back to a batched backward"):
        learner.step()
    assert not learner.vmap_gradients
    before = params_of(learner)
    learner.step()
    assert any(not torch.equal(before[name], value) for name, value in params_of(learner).items()
               if name.startswith("core."))


@pytest.mark.parametrize("memory", [ELSTM, {"name": "lru", "hidden_size": 4, "grad": "rtrl"}])
def test_vmap_and_batched_learners_take_the_same_steps(memory):
    learners = {name: make_learner(UnevenEpisodes(num_envs=3), memory, per_env_gradients=name)
                for name in ("vmap", "batched")}
    assert learners["vmap"].vmap_gradients and not learners["batched"].vmap_gradients
    for learner in learners.values():
        for _ in range(5):
            learner.step()
    vmapped, batched = (params_of(learner) for learner in learners.values())
    for name, value in vmapped.items():
        torch.testing.assert_close(value, batched[name], msg=name)
    # auto: the batched backward for few envs, vmap from VMAP_MIN_ENVS on.
    assert not make_learner(UnevenEpisodes(num_envs=VMAP_MIN_ENVS - 1)).vmap_gradients
    assert make_learner(UnevenEpisodes(num_envs=VMAP_MIN_ENVS)).vmap_gradients


# --------------------------------------------------------------------------------------------------
# The learner


def test_parameters_change_every_step_core_included():
    learner = make_learner(UnevenEpisodes(num_envs=3))
    core_names = [name for name, _ in learner.network.named_parameters() if name.startswith("core.")]
    learner.step()  # the recurrent weights' gradient is 0 at an episode's first step (c_{t-1} = 0)
    for _ in range(6):
        before = params_of(learner)
        learner.step()
        after = params_of(learner)
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert set(core_names) <= changed
        assert any(name.startswith("value.") for name in changed)
        assert any(name.startswith("policy.") for name in changed)


@pytest.mark.parametrize("num_envs", [1, 3])
def test_traces_reset_where_episodes_end(num_envs):
    env = UnevenEpisodes(num_envs=num_envs)
    learner = make_learner(env)
    for _ in range(12):
        learner.step()
        ended = learner.inputs.reset  # set by the step where an env's episode ended
        trace_norm = learner.traces.abs().sum(-1)  # [2, B]
        assert (trace_norm[:, ended] == 0).all()
        assert (trace_norm[:, ~ended] > 0).all()
        assert torch.equal(ended, env.t == 0)
    assert learner.network.core.grad == "rtrl"


def test_single_env_update_is_obgd():
    """With B = 1 the parameter change of a step is the critic's plus the actor's ObGD step."""
    learner = make_learner(UnevenEpisodes(num_envs=1))  # episodes of 2 steps
    for _ in range(4):
        learner.step()
    traces = learner.traces.clone()
    before = torch.cat([p.detach().flatten() for p in learner.params])
    stats = learner.step()
    after = torch.cat([p.detach().flatten() for p in learner.params])
    delta = stats["delta"]
    assert not bool(learner.inputs.reset[0])  # mid-episode: the traces were not zeroed after the update
    new_traces = learner.traces
    grads = new_traces - 0.99 * 0.8 * traces
    assert grads.abs().sum() > 0
    expected = torch.zeros_like(before)
    for k, kappa in enumerate((2.0, 3.0)):
        z = new_traces[k, 0]
        step = 1.0 / max(1.0, kappa * max(abs(float(delta[0])), 1.0) * float(z.abs().sum()))
        expected += step * float(delta[0]) * z
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_env", ["vmap", "batched"])
def test_step_gradients_are_those_of_the_forward_that_acted(per_env):
    """The critic's trace grows by ∇V(s_t) with s_t normalised as acting saw it, by the statistics from
    before s_{t+1} arrived, although the gradient pass runs after the env step."""
    learner = make_learner(UnevenEpisodes(num_envs=1), per_env_gradients=per_env)  # observation normalisation on
    for _ in range(4):
        learner.step()
    before = copy.deepcopy(learner)
    learner.step()
    assert not bool(learner.inputs.reset[0])  # mid-episode: the traces were not zeroed after the update
    out = before.network.step(*before.inputs.before(before.memory_state))
    expected = flat_grad(out.value[0, 0], before.params)
    torch.testing.assert_close(learner.traces[0, 0] - 0.99 * 0.8 * before.traces[0, 0], expected)


def test_iteration_reports_steps_episodes_and_metrics():
    learner = make_learner(UnevenEpisodes(num_envs=3), steps_per_iteration=6)
    result = learner.iteration()
    assert result.env_steps == 18
    # Env b's episodes last b + 2 steps: in 6 steps 3 + 2 + 1 episodes end.
    assert sorted(result.episode_lengths) == [2, 2, 2, 3, 3, 4]
    for tag in ("losses/value_loss", "losses/entropy", "charts/learning_rate", "charts/critic_step_size",
                "charts/actor_step_size", "charts/reward_scale"):
        assert np.isfinite(result.metrics[tag])
    assert any(tag.startswith("memory/") for tag in result.metrics)
    assert result.episode_successes == []  # the env does not score its episodes


def test_resume_is_exact():
    env = UnevenEpisodes(num_envs=3)
    learner = make_learner(env, memory={"name": "lru", "hidden_size": 4, "grad": "rtrl"})
    for _ in range(2):
        learner.iteration()
    saved, env_saved = copy.deepcopy(learner.state_dict()), env.state_dict()
    for _ in range(3):
        learner.iteration()

    env2 = UnevenEpisodes(num_envs=3)
    resumed = make_learner(env2, memory={"name": "lru", "hidden_size": 4, "grad": "rtrl"}, seed=5)
    resumed.load_state_dict(saved)
    env2.load_state_dict(env_saved)
    for _ in range(3):
        resumed.iteration()
    for name, value in params_of(learner).items():
        assert torch.equal(value, params_of(resumed)[name]), name
    assert torch.equal(learner.traces, resumed.traces)
    assert all(torch.equal(v, resumed.memory_state[k]) for k, v in learner.memory_state.items())


def test_runs_on_a_builtin_memory_task_with_snap1():
    env = make_env({"name": "cue_recall", "num_envs": 2, "delay": 2}, seed=0)
    learner = make_learner(env, memory={"name": "cfc", "hidden_size": 4, "grad": "snap1"})
    result = learner.iteration()
    assert result.env_steps == 8 and np.isfinite(result.metrics["losses/value_loss"])
    # 4-step episodes, 2 envs, 4 steps: one episode each, scored by its one query (reward +1 or -1).
    assert len(result.episode_returns) == 2
    assert result.episode_successes == [float(r > 0) for r in result.episode_returns]
