"""The ``td`` learner: its eligibility traces against autograd references (RTRL through every earlier
step, truncated BPTT through K steps), learning on trace conditioning, frozen ``ccn`` stages, exact
resume across a stage boundary, and the errors a user can cause."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.base import ModelOptions
from agents.td import PredictionNetwork, TDLearner, TDOptions
from envs import make_env
from envs.base import VecEnv
from rlmem import config as cfg
from rlmem.checkpoint import load_checkpoint
from rlmem.errors import ConfigError
from rlmem.train import train

SMALL_TASK = {"name": "trace_conditioning", "isi_min": 3, "isi_max": 4, "iti_min": 4, "iti_max": 6,
              "num_distractors": 1}
IDENTITY = ModelOptions(encoder="identity")


def make_learner(memory: dict, num_envs: int = 2, seed: int = 0, **options) -> TDLearner:
    env = make_env({**SMALL_TASK, "num_envs": num_envs}, seed=seed)
    return TDLearner(TDOptions(**options), env, memory, IDENTITY, torch.device("cpu"), seed, total_steps=1000)


def per_env_gradients(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """[B, P]: ∇_θ V_b flattened in parameter order, one autograd pass per env."""
    rows = []
    for b in range(value.shape[0]):
        grads = torch.autograd.grad(value[b], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel()) if g is None else g.flatten() for g, p in zip(grads, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "memory, unroll",
    [
        ({"name": "ccn", "hidden_size": 3, "columns_per_stage": 3, "grad": "rtrl", "normalizer_decay": 0.8}, None),
        ({"name": "lstm", "hidden_size": 3}, 3),
    ],
)
def test_traces_sum_the_cores_gradients(memory: dict, unroll: int | None):
    """With θ held fixed (a vanishing step), z_n = Σ_k (γλ)^(n−k) ∇V_k: through every earlier step for an
    rtrl core (against BPTT over the whole stream), through the last K steps for a bptt core."""
    n, B = 9, 2
    learner = make_learner(memory, num_envs=B, lr=1e-30, trace_lambda=0.7, unroll_length=unroll or 1)
    reference = PredictionNetwork(learner.env.single_observation_space, memory, IDENTITY)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the learner's initial weights (seed 0), before it consumed any observation
        initial = PredictionNetwork(learner.env.single_observation_space, memory, IDENTITY)
    reference.load_state_dict(initial.state_dict())
    # A nonzero readout (the learner's starts at 0) so that the core's gradients carry signal.
    readout = torch.randn_like(learner.network.value.weight)
    with torch.no_grad():
        learner.network.value.weight.copy_(readout)
        reference.value.weight.copy_(readout)
    z0 = learner.traces.clone()
    for _ in range(n):
        tags = ("losses/td_error", "charts/value", "charts/prediction_error", "charts/zero_prediction_error")
        learner._step({k: torch.zeros(()) for k in tags}, [], [])

    # The same stream of observations, replayed.
    env = make_env({**SMALL_TASK, "num_envs": B}, seed=0)
    obs = torch.stack([env.reset(seed=0)] + [env.step(None)[0] for _ in range(n)])  # [n + 1, B, D]
    reset = torch.zeros(n + 1, B, dtype=torch.bool)
    reset[0] = True
    params = list(reference.parameters())
    decay = learner.gamma * 0.7
    expected = decay**n * z0
    if unroll is None:
        values, _ = reference(obs, reference.initial_state(B), reset)  # one graph through the whole stream
        for k in range(1, n + 1):
            expected += decay ** (n - k) * per_env_gradients(values[k], params)
    else:
        for k in range(1, n + 1):
            start = max(0, k - unroll + 1)  # the window of V_k: the last K observations
            state = reference.initial_state(B)
            if start > 0:
                with torch.no_grad():
                    _, state = reference(obs[:start], state, reset[:start])
            values, _ = reference(obs[start : k + 1], state, reset[start : k + 1])
            expected += decay ** (n - k) * per_env_gradients(values[-1], params)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(learner.traces, expected, rtol=2e-4, atol=1e-6)


def test_batched_per_env_gradients_equal_one_backward_per_env():
    learner = make_learner({"name": "ccn", "hidden_size": 3, "columns_per_stage": 3, "init_scale": 0.5}, num_envs=3,
                           steps_per_iteration=20)
    with torch.no_grad():
        learner.network.value.weight.normal_()  # so that the core's weights get gradients too
    learner.iteration()  # a few steps, so that the envs' states and sensitivities differ
    start, obs, reset = learner._window_tensors()
    values, _ = learner.network(obs, start, reset)
    batched = learner._per_env_gradients(values[-1])
    learner._batched_backward = False  # the fallback for cores whose backward cannot be batched
    for fast, slow in zip(batched, learner._per_env_gradients(values[-1])):
        assert (fast is None) == (slow is None)
        if fast is not None:
            torch.testing.assert_close(fast, slow)
    w_f = batched[[name for name, _ in learner.network.named_parameters()].index("core.stages.0.w_f")]
    assert w_f.abs().sum() > 0 and not torch.allclose(w_f[0], w_f[1])


def test_td_learns_trace_conditioning_with_memory():
    """Prediction error falls, and a memory core ends well below a core without memory. (Columns start
    from larger weights than the paper's U(±0.01) so that memory pays off within a few hundred steps.)"""
    errors = {}
    for name, memory in (("ccn", {"name": "ccn", "hidden_size": 4, "columns_per_stage": 4, "init_scale": 1.0}),
                         ("none", {"name": "none", "hidden_size": 4})):
        learner = make_learner(memory, num_envs=8, lr=0.03, steps_per_iteration=100)
        errors[name] = [learner.iteration().metrics["charts/prediction_error"] for _ in range(8)]
    assert errors["ccn"][-1] < 0.15 * errors["ccn"][0]
    assert errors["ccn"][-1] < 0.6 * errors["none"][-1]


def test_the_error_of_predicting_nothing_is_logged_beside_the_prediction_error():
    """``charts/zero_prediction_error`` is the mean G² of the same steps (what V = 0 would score) and
    ``charts/relative_prediction_error`` the ratio, alone and in a population, whose members step the
    streams they would alone."""
    from envs import make_env

    learner = make_learner({"name": "none", "hidden_size": 4}, num_envs=2, lr=1e-30, steps_per_iteration=50)
    metrics = learner.iteration().metrics
    env = make_env({**SMALL_TASK, "num_envs": 2}, seed=0)
    env.reset(seed=0)
    squared = [env.step(None)[4]["true_return"].double().pow(2).mean() for _ in range(50)]
    assert metrics["charts/zero_prediction_error"] == pytest.approx(float(torch.stack(squared).mean()))
    # at step size 1e-30 V stays at 0 (where the readout starts): the prediction error is exactly that of V = 0
    assert metrics["charts/prediction_error"] == pytest.approx(metrics["charts/zero_prediction_error"])
    assert metrics["charts/relative_prediction_error"] == pytest.approx(1.0)


def test_frozen_ccn_stages_never_move_under_td():
    memory = {"name": "ccn", "hidden_size": 4, "columns_per_stage": 2, "steps_per_stage": 40}
    learner = make_learner(memory, num_envs=2, lr=0.05, steps_per_iteration=1)
    core = learner.network.core
    snapshot, seen_learning = None, False
    for _ in range(60):
        before = copy.deepcopy(core.stages[0].state_dict())
        learner.iteration()
        if core.learning_stage == 0:
            seen_learning |= any(not torch.equal(before[k], v) for k, v in core.stages[0].state_dict().items())
        elif snapshot is None:
            snapshot = copy.deepcopy(core.stages[0].state_dict())  # the next forward runs stage 1
    assert seen_learning and snapshot is not None
    for key, value in core.stages[0].state_dict().items():
        assert torch.equal(value, snapshot[key]), key


class EndingStream(VecEnv):
    """Two streams of 3-step episodes without actions: env 0 is truncated, env 1 terminates. Obs
    [step / 10, 1]; the last observation of an episode, [3 / 10, 1], is only in ``final_obs``."""

    num_envs = 2
    single_observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    single_action_space = None
    device = torch.device("cpu")
    gamma = 0.9

    def _obs(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.float() / 10, torch.ones(2)], dim=1)

    def reset(self, seed=None):
        self.t = torch.zeros(2, dtype=torch.long)
        return self._obs(self.t)

    def step(self, actions):
        self.t = self.t + 1
        ended = self.t == 3
        final_obs = self._obs(self.t)
        self.t = torch.where(ended, 0, self.t)
        info = {"final_obs": final_obs, "episode": {"done": ended, "return": 3.0 * ended, "length": 3 * ended}}
        return self._obs(self.t), torch.ones(2), ended & torch.tensor([False, True]), ended & torch.tensor(
            [True, False]), info


def test_td_errors_bootstrap_truncations_and_not_terminations():
    env = EndingStream()
    learner = TDLearner(TDOptions(lr=1e-30), env, {"name": "none", "hidden_size": 3}, ModelOptions(encoder="mlp",
                        encoder_size=4), torch.device("cpu"), 0, 100)
    with torch.no_grad():
        learner.network.value.weight.normal_()
    learner.value = learner._value_and_gradients()[0]  # V(obs_0) under the new readout

    def V(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return learner.network(obs.unsqueeze(0), {}, torch.zeros(1, 2, dtype=torch.bool))[0][0]

    for t in range(1, 7):
        previous = learner.value
        sums = {"losses/td_error": torch.zeros(()), "charts/value": torch.zeros(())}
        episodes: list[float] = []
        learner._step(sums, episodes, [])
        position = torch.full((2,), t % 3)
        if t % 3 == 0:  # env 0 truncated: bootstrap from the final observation; env 1 terminated: no bootstrap
            final = V(env._obs(torch.full((2,), 3)))
            expected = 1 + torch.stack([0.9 * final[0], torch.zeros(())]) - previous
            assert episodes == [3.0, 3.0]
        else:
            expected = 1 + 0.9 * V(env._obs(position)) - previous
        torch.testing.assert_close(sums["losses/td_error"], expected.pow(2).mean())
    # traces restart with each episode: at the first step of the new one, z is that step's gradient alone
    values, _ = learner.network(env._obs(torch.zeros(2, dtype=torch.long)).unsqueeze(0), {},
                                torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(learner.traces, per_env_gradients(values[0], list(learner.network.parameters())))


def run_config(tmp_path: Path, name: str, total: int, resume: bool = False) -> Path:
    config = cfg.resolve(
        {
            "defaults": {"memory": "ccn", "env": "trace_conditioning", "agent": "td"},
            "memory": {"hidden_size": 6, "columns_per_stage": 2, "steps_per_stage": 50},
            "env": {**{k: v for k, v in SMALL_TASK.items() if k != "name"}, "num_envs": 2},
            "agent": {"steps_per_iteration": 10, "lr": 0.05},
            "model": {"encoder": "identity"},
            "train": {"total_steps": total, "checkpoint_every": 1000, "progress": False,
                      "run_dir": str(tmp_path / name)},
        }
    )
    return train(config, resume=resume, log=lambda *_: None)


def test_resume_is_exact_across_a_stage_boundary(tmp_path: Path):
    straight = load_checkpoint(run_config(tmp_path, "straight", 200))
    run_config(tmp_path, "interrupted", 80)  # stops at 80 env steps; stages begin at 50, 100, 150
    first = load_checkpoint(tmp_path / "interrupted")
    assert first["network"]["core._extra_state"]["steps_seen"] < 100
    resumed = load_checkpoint(run_config(tmp_path, "interrupted", 200, resume=True))
    assert straight["network"]["core._extra_state"]["steps_seen"] >= 150
    for key, value in straight["network"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed["network"][key]), key
    for key in ("traces", "step_norms", "value"):
        assert torch.equal(straight["learner"][key], resumed["learner"][key]), key
    assert straight["learner"]["updates"] == resumed["learner"]["updates"]


def test_user_errors_name_the_key_and_the_choices():
    env = make_env({"name": "cue_recall", "num_envs": 2})
    with pytest.raises(ConfigError, match="valid choices: trace_conditioning, trace_patterning"):
        TDLearner(TDOptions(), env, {"name": "gru", "hidden_size": 4}, IDENTITY, torch.device("cpu"), 0, 100)
    with pytest.raises(ConfigError, match=re.escape("agent.optimizer must be one of normalized, sgd")):
        TDOptions(optimizer="adam")
    with pytest.raises(ConfigError, match=re.escape("agent.trace_lambda must be a number")):
        TDOptions(trace_lambda=1.5)
    with pytest.raises(ConfigError, match=re.escape("agent.unroll_length must be an integer")):
        TDOptions(unroll_length=0)
    with pytest.raises(ConfigError, match=re.escape("model.prev_action")):
        PredictionNetwork(make_env(SMALL_TASK).single_observation_space, {"name": "gru", "hidden_size": 4},
                          ModelOptions(prev_action=True))
