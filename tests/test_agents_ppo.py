"""The ppo learner: whole-sequence minibatches, replays from stored start states, the loss, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import agents.ppo as ppo_module
from agents.base import LEARNERS, ModelOptions
from agents.ppo import PPOLearner, PPOOptions, env_minibatches
from envs import make_env
from rlmem.config import load
from rlmem.errors import ConfigError
from rlmem.memory import select_state

ELSTM = {"name": "elstm", "hidden_size": 8, "grad": "rtrl"}
GRU = {"name": "gru", "hidden_size": 8, "grad": "bptt"}
MODEL = ModelOptions(encoder_size=16)


def cue_recall(num_envs: int = 4, seed: int = 0):
    return make_env({"name": "cue_recall", "num_envs": num_envs, "delay": 3}, seed=seed)


def make_learner(env, memory=ELSTM, seed: int = 0, total_steps: int = 10_000, **options) -> PPOLearner:
    options.setdefault("unroll_length", 6)  # episodes last 5 steps: windows start mid-episode
    options.setdefault("num_minibatches", 2)
    return LEARNERS.get("ppo").cls(PPOOptions(**options), env, memory, MODEL, torch.device("cpu"), seed, total_steps)


def params_of(learner: PPOLearner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.network.named_parameters()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(ConfigError, match=r"agent\.num_minibatches=3 must divide env\.num_envs=4.*1, 2, 4"):
        make_learner(cue_recall(4), num_minibatches=3)
    with pytest.raises(ConfigError, match=r"agent\.clip_coef"):
        PPOOptions(clip_coef=0.0)
    with pytest.raises(ConfigError, match=r"agent\.update_epochs"):
        PPOOptions(update_epochs=0)
    for path in ("configs/cue_recall_ppo.yaml", "configs/repeat_previous_ppo.yaml", "configs/cartpole_nv_ppo.yaml"):
        assert load(path).agent["name"] == "ppo"


def test_env_minibatches_partition_the_envs():
    generator = torch.Generator().manual_seed(0)
    batches = env_minibatches(8, 4, generator)
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(8))
    assert not torch.equal(torch.cat(batches), torch.cat(env_minibatches(8, 4, generator)))  # reshuffled


@pytest.mark.parametrize("memory", [ELSTM, GRU])
def test_minibatch_replays_are_whole_sequences_that_match_acting(memory):
    """Each minibatch is [T, B/M] whole sequences from its stored start state; replayed with the acting
    parameters it reproduces the acting values and log-probs, resets inside the window included."""
    learner = make_learner(cue_recall(4), memory=memory)
    for _ in range(2):  # non-zero start states (and sensitivities) for the window under test
        learner.iteration()
    rollout, _ = learner.collector.collect(learner.options.unroll_length)
    assert rollout.reset[1:].any()  # episodes end inside the window
    for envs in env_minibatches(4, 2, learner.generator):
        minibatch = rollout.select_envs(envs)
        assert minibatch.obs.shape[:2] == (6, 2) and minibatch.actions.shape == (6, 2)
        assert states_equal(minibatch.start_state, select_state(rollout.start_state, envs))
        with torch.no_grad():
            out = learner.replay(minibatch)
        torch.testing.assert_close(out.value, rollout.values[:, envs])
        torch.testing.assert_close(out.dist.log_prob(minibatch.actions), rollout.log_probs[:, envs])


def test_rtrl_epochs_replay_from_the_stored_start_sensitivities(monkeypatch):
    learner = make_learner(cue_recall(4), update_epochs=3)
    for _ in range(2):
        learner.iteration()
    rollout, _ = learner.collector.collect(learner.options.unroll_length)
    acting_state = {k: v.clone() for k, v in learner.collector.memory_state.items()}
    sensitivities = [k for k in rollout.start_state if k.startswith("sensitivity_")]
    assert sensitivities and all(rollout.start_state[k].abs().sum() > 0 for k in sensitivities)

    minibatches: list[torch.Tensor] = []
    original_split = ppo_module.env_minibatches

    def recording_split(*args):
        batches = original_split(*args)
        minibatches.extend(batches)
        return batches

    start_states: list[dict[str, torch.Tensor]] = []
    original_core = learner.network.core.forward

    def recording_core(x, state, reset):
        start_states.append({k: v.clone() for k, v in state.items()})
        return original_core(x, state, reset)

    monkeypatch.setattr(ppo_module, "env_minibatches", recording_split)
    monkeypatch.setattr(learner.network.core, "forward", recording_core)
    with torch.no_grad():
        acting_replay = learner.network(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions,
                                        rollout.prev_rewards)
    start_states.clear()
    _, carried = learner.update(rollout)

    # First the carried-state pass over all envs, then one replay per minibatch of every epoch.
    assert len(start_states) == 1 + 3 * 2 and len(minibatches) == 3 * 2
    assert states_equal(start_states[0], rollout.start_state)
    for envs, state in zip(minibatches, start_states[1:]):
        assert states_equal(state, select_state(rollout.start_state, envs))
    # The carried state: the acting h, and sensitivities advanced over the window (not the start ones).
    assert torch.equal(carried["cell"], acting_state["cell"])
    assert torch.equal(acting_replay.state["cell"], acting_state["cell"])
    assert all(not torch.equal(carried[k], rollout.start_state[k]) for k in sensitivities)


def test_carried_sensitivities_are_those_of_a_replay_with_the_acting_parameters():
    learner = make_learner(cue_recall(4))
    learner.iteration()
    acting_params = copy.deepcopy(learner.network.state_dict())
    rollout, _ = learner.collector.collect(learner.options.unroll_length)
    _, carried = learner.update(rollout)
    reference = make_learner(cue_recall(4))
    reference.network.load_state_dict(acting_params)
    out = reference.network(rollout.obs, rollout.start_state, rollout.reset, rollout.prev_actions,
                            rollout.prev_rewards)
    assert states_equal(carried, out.state)


@pytest.mark.parametrize("memory", [ELSTM, GRU])
def test_update_lowers_the_loss_on_its_batch(memory):
    learner = make_learner(cue_recall(8), memory=memory, num_minibatches=4, update_epochs=4, lr=3e-3)
    learner.iteration()
    rollout, _ = learner.collector.collect(learner.options.unroll_length)
    with torch.no_grad():
        advantages, returns = learner.targets(rollout)

    def full_batch_loss() -> float:
        with torch.no_grad():
            return float(learner.loss(rollout, advantages, returns).total)

    before = full_batch_loss()
    learner.update(rollout)
    assert full_batch_loss() < before


def test_target_kl_stops_the_epochs():
    learner = make_learner(cue_recall(4), update_epochs=5, lr=1e-2, target_kl=1e-9)
    learner.iteration()
    assert learner.iteration().metrics["losses/epochs"] == 1.0
    assert make_learner(cue_recall(4), update_epochs=5).iteration().metrics["losses/epochs"] == 5.0


def test_iteration_metrics_and_learning_rate_annealing():
    learner = make_learner(cue_recall(4), total_steps=4 * 6 * 4, lr=1e-3)
    rates = []
    for _ in range(4):
        result = learner.iteration()
        assert result.env_steps == 24
        rates.append(result.metrics["charts/learning_rate"])
        for tag in ("losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl",
                    "losses/old_approx_kl", "losses/clipfrac", "losses/grad_norm"):
            assert np.isfinite(result.metrics[tag]), tag
        assert "losses/explained_variance" in result.metrics
    np.testing.assert_allclose(rates, [1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert result.episode_returns and all(r in (-1.0, 1.0) for r in result.episode_returns)


@pytest.mark.parametrize("memory", [ELSTM, GRU])
def test_resume_is_exact(memory):
    env = cue_recall(4)
    learner = make_learner(env, memory=memory)
    for _ in range(2):
        learner.iteration()
    saved, env_saved = copy.deepcopy(learner.state_dict()), env.state_dict()
    for _ in range(3):
        learner.iteration()

    env2 = cue_recall(4, seed=7)
    resumed = make_learner(env2, memory=memory, seed=3)
    resumed.load_state_dict(saved)
    env2.load_state_dict(env_saved)
    for _ in range(3):
        resumed.iteration()
    for name, value in params_of(learner).items():
        assert torch.equal(value, params_of(resumed)[name]), name
    assert states_equal(learner.collector.memory_state, resumed.collector.memory_state)
