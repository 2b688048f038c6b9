"""The Learner contract every learner keeps: registered names, the one update path with its gradient hooks
and non-finite checks (TrainingDiverged naming the quantity), checkpoints that resume exactly, and the
acting inputs helper."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import agents  # noqa: F401  (registers the learners)
from agents.acting import ActingInputs
from agents.base import LEARNERS, Learner, check_memory_state
from agents.options import check_options
from rlmem import config as cfg
from rlmem.errors import ConfigError, TrainingDiverged
from rlmem.train import build

# name -> (runnable file or None for the embedded default, arguments): one small run per learner
RUNS: dict[str, tuple[str | None, list[str]]] = {
    "actor_critic": (None, ["env.num_envs=4", "agent.unroll_length=4", "memory.hidden_size=8"]),
    "ppo": (None, ["agent=ppo", "env.num_envs=4", "agent.unroll_length=4", "agent.num_minibatches=2",
                   "agent.update_epochs=2", "memory.hidden_size=8"]),
    "stream_ac": (None, ["agent=stream_ac", "memory=lru", "memory.grad=rtrl", "memory.hidden_size=8",
                         "env=repeat_previous", "env.num_envs=2", "agent.steps_per_iteration=4",
                         "agent.torso_size=16"]),
    "td": ("trace_patterning_ccn.yaml", ["env=trace_conditioning", "env.isi_min=3", "env.isi_max=4", "env.iti_min=4",
                                         "env.iti_max=6", "agent.steps_per_iteration=30"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, *extra: str):
    config_file, args = RUNS[name]
    path = None if config_file is None else str(Path(__file__).parent.parent / "configs" / config_file)
    config = cfg.load(path, [*args, *extra, "train.device=cpu", "train.total_steps=100000"])
    return build(config)[:2]


def params_of(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.network.named_parameters()}


def test_the_registry_keeps_its_names_and_every_learner_implements_the_contract():
    assert sorted(LEARNERS.names()) == ["actor_critic", "ppo", "stream_ac", "td"]
    for name in LEARNERS.names():
        assert issubclass(LEARNERS.get(name).cls, Learner), name


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_update_passes_the_gradient_hooks_with_every_parameter_named(name: str):
    env, learner = make(name)
    try:
        seen: list[list[str]] = []
        learner.gradient_hooks.append(lambda gradients: seen.append([n for n, _ in gradients]))
        learner.iteration()
        assert seen, "no update went through apply_gradients"
        trainable = {n for n, p in learner.network.named_parameters() if p.requires_grad}
        assert set(seen[0]) <= trainable and len(seen[0]) > 0
        if name in ("stream_ac", "td"):  # an update per env step, every parameter in it
            assert len(seen) == learner.options.steps_per_iteration and set(seen[0]) == trainable
    finally:
        env.close()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_gradient_hook_acts_on_the_tensors_the_step_reads(name: str):
    """Hooks run before the step on the very tensors it applies (an all-reduce changes what is applied):
    a hook that zeroes the update leaves every parameter where it was."""
    moved = []
    for zero in (False, True):
        env, learner = make(name)
        try:
            before = params_of(learner)
            if zero:
                learner.gradient_hooks.append(lambda gradients: [g.zero_() for _, g in gradients])
            learner.iteration()
            moved.append(sorted(k for k, v in params_of(learner).items() if not torch.equal(v, before[k])))
        finally:
            env.close()
    assert moved[0], "the plain run changed no parameter"
    assert not moved[1], f"a hook zeroing the update still moved {moved[1]}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_non_finite_gradient_stops_the_run_naming_the_parameter_before_it_moves(name: str):
    env, learner = make(name)
    try:
        target: list[str] = []

        def poison(gradients):
            target.append(gradients[0][0])
            gradients[0][1].view(-1)[0] = math.nan

        learner.gradient_hooks.append(poison)
        before = params_of(learner)
        with pytest.raises(TrainingDiverged, match="non-finite gradient of ") as err:
            learner.iteration()
        assert err.value.quantity == f"gradient of {target[0]}"
        assert all(torch.equal(v, params_of(learner)[k]) for k, v in before.items())
    finally:
        env.close()


def test_a_non_finite_loss_term_is_named():
    env, learner = make("actor_critic")
    try:
        loss = learner.loss
        learner.loss = lambda rollout: loss(rollout)._replace(
            value_loss=torch.tensor(math.nan), total=torch.tensor(math.nan, requires_grad=True))
        with pytest.raises(TrainingDiverged, match="non-finite loss losses/value_loss"):
            learner.iteration()
    finally:
        env.close()


def test_a_parameter_a_step_makes_non_finite_is_named():
    env, learner = make("ppo")
    try:
        step = learner.optimizer.step

        def bad_step():
            step()
            with torch.no_grad():
                learner.network.value.bias.fill_(math.inf)

        learner.optimizer.step = bad_step
        with pytest.raises(TrainingDiverged, match=re.escape("non-finite parameter value.bias")):
            learner.iteration()
    finally:
        env.close()


def test_a_diverging_lru_stops_at_the_memory_state_before_sampling_nan():
    """lr = 100 moves the LRU's log-parameters so far that its state overflows when the next window is
    acted: the run must stop with TrainingDiverged naming the state, not inside torch.multinomial."""
    env, learner = build(cfg.load(None, ["memory=lru", "memory.grad=rtrl", "agent.lr=100", "train.device=cpu"]))[:2]
    try:
        with pytest.raises(TrainingDiverged, match="non-finite memory state hidden"):
            for _ in range(3):
                learner.iteration()
    finally:
        env.close()


@pytest.mark.parametrize("name", ["actor_critic", "ppo"])  # ObGD bounds stream_ac's step by design
def test_a_huge_step_stops_the_run_with_training_diverged(name: str):
    env, learner = make(name, "memory=lru", "memory.grad=rtrl", "agent.lr=1e6")
    try:
        with pytest.raises(TrainingDiverged):
            for _ in range(5):
                learner.iteration()
    finally:
        env.close()


def test_check_memory_state_names_the_entry_sensitivities_included():
    check_memory_state({"hidden": torch.zeros(2, 3)})
    with pytest.raises(TrainingDiverged, match="non-finite memory state sensitivity_w"):
        check_memory_state({"hidden": torch.zeros(2, 3), "sensitivity_w": torch.tensor([0.0, math.inf])})


def test_acting_inputs_start_advance_split_and_rejoin():
    class Net:
        action_shape = ()

        @staticmethod
        def action_dtype():
            return torch.long

    first = ActingInputs.first(torch.arange(6.0).view(3, 2), Net())
    assert first.reset.all() and not first.prev_action.any() and not first.prev_reward.any()
    nxt = first.after(torch.ones(3, 2), torch.tensor([False, True, False]), torch.tensor([1, 2, 0]),
                      torch.tensor([0.5, 1.0, 0.0]))
    assert nxt.reset.tolist() == [False, True, False] and nxt.prev_action.tolist() == [1, 2, 0]
    rejoined = ActingInputs.cat([nxt.select(slice(0, 1)), nxt.select(slice(1, 3))])
    for key, value in nxt.state_dict().items():
        assert torch.equal(value, rejoined.state_dict()[key]), key
    obs, state, reset, prev_action, prev_reward = nxt.before({"h": torch.zeros(3)})
    assert obs is nxt.obs and reset is nxt.reset and prev_action is nxt.prev_action
    assert prev_reward is nxt.prev_reward and "h" in state


def test_check_options_names_the_option():
    class Options:
        lr, gamma, steps, flag = 0.0, 0.5, 2, True

    with pytest.raises(ConfigError, match=re.escape("agent.lr must be a number > 0.0")):
        check_options(Options(), positive=["lr"])
    with pytest.raises(ConfigError, match=re.escape("agent.flag must be true or false")):
        Options.flag = 1
        check_options(Options(), flags=["flag"], counts=["steps"], unit_interval=["gamma"])
