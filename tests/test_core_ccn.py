"""The ``ccn`` core: exact RTRL of the learning stage against BPTT, frozen and future stages, the stage
schedule, normalisation, acting without gradients, and exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from rlmem.errors import ConfigError
from rlmem.memory import make_core
from rlmem.memory.ccn import GATES, CCNCore

DTYPE = torch.float64


def build(grad: str = "rtrl", **options) -> CCNCore:
    spec = {"name": "ccn", "hidden_size": 6, "columns_per_stage": 2, "steps_per_stage": 1000,
            "normalizer_decay": 0.9, "grad": grad, **options}
    torch.manual_seed(0)
    core = make_core(spec, input_size=3)
    assert isinstance(core, CCNCore)
    # Larger weights than the default U(±0.01) so that every gradient path carries signal.
    with torch.no_grad():
        for p in core.parameters():
            p.uniform_(-0.8, 0.8)
    return core.to(DTYPE)


def sequence(T: int, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 3, generator=g, dtype=DTYPE)
    reset = torch.rand(T, B, generator=g) < 0.15
    loss_weights = torch.randn(T, B, 6, generator=g, dtype=DTYPE)
    hc0 = 0.5 * torch.randn(B, 6, 2, generator=g, dtype=DTYPE)
    return x, reset, loss_weights, hc0


def start_stage(core: CCNCore, stage: int) -> None:
    core.set_extra_state({"steps_seen": stage * core.steps_per_stage})


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_rtrl_over_windows_equals_bptt_over_the_whole_sequence(stage: int):
    T, B = 13, 3
    x, reset, loss_weights, hc0 = sequence(T, B, seed=stage)
    rtrl = build("rtrl")
    bptt = build("bptt")
    bptt.load_state_dict(rtrl.state_dict())
    start_stage(rtrl, stage)
    start_stage(bptt, stage)

    # BPTT: one graph through the whole sequence.
    y_full, _ = bptt(x, {"hc": hc0.clone()}, reset)
    (loss_weights * y_full).sum().backward()

    # RTRL: consecutive windows, state and sensitivities carried, parameters fixed.
    state = rtrl.initial_state(B, dtype=DTYPE)
    state["hc"] = hc0.clone()
    outputs, t0 = [], 0
    for length in (4, 1, 5, 3):
        y, state = rtrl(x[t0 : t0 + length], state, reset[t0 : t0 + length])
        (loss_weights[t0 : t0 + length] * y).sum().backward()
        outputs.append(y.detach())
        t0 += length
    assert t0 == T

    torch.testing.assert_close(torch.cat(outputs), y_full.detach())
    for (name, p_rtrl), (_, p_bptt) in zip(rtrl.named_parameters(), bptt.named_parameters()):
        owner = int(name.split(".")[1])
        if owner == stage:
            assert p_bptt.grad is not None and p_bptt.grad.abs().sum() > 0, name
            torch.testing.assert_close(p_rtrl.grad, p_bptt.grad, rtol=1e-9, atol=1e-11, msg=name)
        else:  # frozen (earlier) and idle (later) stages learn nothing
            assert p_rtrl.grad is None and p_bptt.grad is None, name
    # the normaliser statistics took the same path
    for (name, b_rtrl), (_, b_bptt) in zip(rtrl.named_buffers(), bptt.named_buffers()):
        torch.testing.assert_close(b_rtrl, b_bptt, msg=name)


def test_inputs_get_the_window_gradient_through_learning_and_frozen_columns():
    T, B = 7, 2
    x, reset, loss_weights, hc0 = sequence(T, B, seed=5)
    grads = {}
    for grad in ("rtrl", "bptt"):
        core = build(grad)
        start_stage(core, 2)
        inputs = x.clone().requires_grad_(True)
        state = core.initial_state(B, dtype=DTYPE)
        state["hc"] = hc0.clone()
        y, _ = core(inputs, state, reset)
        (loss_weights * y).sum().backward()
        grads[grad] = inputs.grad
    assert grads["bptt"].abs().sum() > 0
    torch.testing.assert_close(grads["rtrl"], grads["bptt"], rtol=1e-9, atol=1e-11)


def test_stage_schedule_counts_learning_steps_and_starts_stages_on_time():
    core = make_core({"name": "ccn", "hidden_size": 5, "columns_per_stage": 2, "steps_per_stage": 6}, input_size=3)
    assert core.num_stages == 3 and [s.columns for s in core.stages] == [2, 2, 1]
    assert [s.inputs for s in core.stages] == [3, 5, 7]
    B = 2
    state = core.initial_state(B)
    x = torch.rand(1, B, 3)
    reset = torch.zeros(1, B, dtype=torch.bool)
    live = []
    for step in range(8):
        with torch.no_grad():  # acting counts nothing
            core(x, state, reset)
        assert core.steps_seen == step * B
        y, state = core(x, state, reset)
        live.append(int((y.abs().sum(dim=(0, 1)) > 0).sum()))
        assert core.steps_seen == (step + 1) * B
    # 2 env steps per window: stage 1 begins at the window starting at 6 steps, stage 2 at 12
    assert live == [2, 2, 2, 4, 4, 4, 5, 5]
    assert core.learning_stage == 2 and core.active_output_size == 5


def test_state_metrics_report_the_normalisers_running_variance():
    """``memory/stage<s>_input_var`` for the started stages and ``output_var`` over the live columns:
    inputs of variance 0.04 pull the learning stage's estimate from 1 toward 0.04; an idle stage has none."""
    core = build(steps_per_stage=200)
    B = 4
    state = core.initial_state(B, dtype=DTYPE)
    reset = torch.zeros(1, B, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(49):  # 49 updates of 4 env steps: stage 0 ends at 200
        _, state = core(0.2 * torch.randn(1, B, 3, generator=g, dtype=DTYPE), state, reset)
    metrics = core.state_metrics(state)
    assert {k for k in metrics if not k.startswith("sensitivity_")} == {"hc_norm", "stage0_input_var", "output_var"}
    assert metrics["stage0_input_var"] == pytest.approx(float(core.stages[0].normaliser.var.mean()))
    assert 0.03 < metrics["stage0_input_var"] < 0.06  # 1 · 0.9^49 and the inputs' share of 0.04
    assert metrics["output_var"] == pytest.approx(float(core.output_normaliser.var[:2].mean()))
    for _ in range(2):  # stage 1 begins with the second window
        _, state = core(torch.zeros(1, B, 3, dtype=DTYPE), state, reset)
    buffers = {name: 2 * value for name, value in core.named_buffers()}  # as a population passes a member's
    metrics = core.state_metrics(state, buffers)
    assert metrics["stage1_input_var"] == pytest.approx(2 * float(core.stages[1].normaliser.var.mean()))
    assert metrics["output_var"] == pytest.approx(2 * float(core.output_normaliser.var[:4].mean()))


def test_warmup_averages_each_features_first_updates_and_new_columns_count_from_their_stage():
    """With ``normalizer_warmup`` the n-th update has rate max(1 − d, 1/n): over the first 1/(1 − d)
    steps μ is the plain mean of the batch means and v the mean of the squared deviations from the
    running μ; later the rate stays at 1 − d. The output features of stage 1 start counting when it does."""
    decay = 0.9  # rate 1/n for n ≤ 10, then 0.1
    core = build(normalizer_decay=decay, normalizer_warmup=True, steps_per_stage=24)
    B = 2
    state = core.initial_state(B, dtype=DTYPE)
    reset = torch.zeros(1, B, dtype=torch.bool)
    xs = 3.0 + 0.5 * torch.randn(14, 1, B, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    mean, var = torch.zeros(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE)
    for n in range(1, 15):
        _, state = core(xs[n - 1], state, reset)
        if n > 12:  # 24 learning steps: stage 0 is frozen from the 13th window on, its statistics too
            continue
        rate = max(1 - decay, 1 / n)
        mean = mean + rate * (xs[n - 1, 0].mean(0) - mean)
        var = (var + rate * ((xs[n - 1, 0] - mean).pow(2).mean(0) - var)).clamp(min=0.01)
        if n == 10:  # so far, the plain averages: μ is the mean of all 20 inputs
            torch.testing.assert_close(core.stages[0].normaliser.mean, xs[:10].mean((0, 1, 2)))
    normaliser = core.stages[0].normaliser
    torch.testing.assert_close(normaliser.mean, mean)
    torch.testing.assert_close(normaliser.var, var)
    assert normaliser.count.tolist() == [12.0] * 3
    # stage 1 began with the 13th window: its inputs and its columns' outputs were updated twice
    assert core.output_normaliser.count.tolist() == [14.0, 14.0, 2.0, 2.0, 0.0, 0.0]
    assert core.stages[1].normaliser.count.tolist() == [2.0] * 5


@pytest.mark.parametrize("warmup", [False, True])
def test_the_output_normaliser_can_have_its_own_decay(warmup: bool):
    """``output_normalizer_decay: 1`` leaves the columns' h unnormalised (μ = 0, v = 1 for ever) while the
    inputs are still normalised at ``normalizer_decay``; by default both share it."""
    B, xs = 2, 3.0 + torch.randn(6, 1, 2, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    reset = torch.zeros(1, B, dtype=torch.bool)
    cores = {decay: build(normalizer_warmup=warmup, output_normalizer_decay=decay) for decay in (None, 1.0, 0.5)}
    for decay, core in cores.items():
        state = core.initial_state(B, dtype=DTYPE)
        for x in xs:
            y, state = core(x, state, reset)
        if decay == 1.0:  # the output is the columns' h itself
            torch.testing.assert_close(y[-1, :, :2], state["hc"][:, :2, 0], rtol=0, atol=0)
    unnormalised, shared, own = cores[1.0], cores[None], cores[0.5]
    assert unnormalised.output_normaliser.mean.eq(0).all() and unnormalised.output_normaliser.var.eq(1).all()
    for core in (unnormalised, own):  # the inputs' statistics are the same whatever the outputs'
        torch.testing.assert_close(core.stages[0].normaliser.mean, shared.stages[0].normaliser.mean)
    assert not torch.equal(own.output_normaliser.var[:2], shared.output_normaliser.var[:2])


def test_frozen_stages_never_change_and_idle_stages_wait():
    core = make_core({"name": "ccn", "hidden_size": 4, "columns_per_stage": 2, "steps_per_stage": 20,
                      "normalizer_decay": 0.9}, input_size=3)
    optimizer = torch.optim.SGD(core.parameters(), lr=0.5)
    B = 2
    state = core.initial_state(B)
    g = torch.Generator().manual_seed(0)
    snapshots = {}
    for _ in range(30):
        if core.steps_seen in (0, 20):
            snapshots[core.steps_seen] = copy.deepcopy(core.state_dict())
        x = torch.rand(1, B, 3, generator=g)
        y, state = core(x, state, torch.zeros(1, B, dtype=torch.bool))
        optimizer.zero_grad()
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        optimizer.step()
    final = core.state_dict()
    begin, boundary = snapshots[0], snapshots[20]

    def changed(a, b, prefix):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and isinstance(a[k], torch.Tensor))

    # stage 0 learned (weights and input statistics) until the boundary, then never changed
    assert changed(begin, boundary, "stages.0.w_") and changed(begin, boundary, "stages.0.normaliser.")
    assert not changed(boundary, final, "stages.0.")
    # stage 1 waited untouched until the boundary, then learned
    assert not changed(begin, boundary, "stages.1.")
    assert changed(boundary, final, "stages.1.w_") and changed(boundary, final, "stages.1.normaliser.")


def test_acting_without_gradients_passes_sensitivities_through():
    core = build("rtrl")
    x, reset, _, hc0 = sequence(4, 2, seed=1)
    state = core.initial_state(2, dtype=DTYPE)
    state["hc"] = hc0
    _, state = core(x, state, reset)  # sensitivities now nonzero
    buffers = copy.deepcopy(dict(core.named_buffers()))
    with torch.no_grad():
        y, acted = core(x, state, reset)
    for key in state:
        if key.startswith("sensitivity_"):
            assert state[key].abs().sum() > 0
            assert torch.equal(acted[key], state[key])
    assert not torch.equal(acted["hc"], state["hc"])
    for name, value in core.named_buffers():
        assert torch.equal(value, buffers[name])
    # the cell itself is the same as in a learning pass: outputs agree with the bptt mode's
    bptt = build("bptt")
    bptt.load_state_dict(core.state_dict())
    with torch.no_grad():
        y_bptt, _ = bptt(x, {"hc": state["hc"]}, reset)
    torch.testing.assert_close(y, y_bptt)


def test_columns_have_4m_plus_8_weights_and_do_not_read_each_other():
    core = make_core({"name": "ccn", "hidden_size": 3, "columns_per_stage": 3, "grad": "bptt"}, input_size=4)
    per_stage = sum(p.numel() for p in core.stages[0].parameters())
    assert per_stage == 3 * (4 * 4 + 8)
    x = torch.randn(6, 2, 4)
    reset = torch.zeros(6, 2, dtype=torch.bool)
    y, _ = core(x, core.initial_state(2), reset)
    y[..., 1].sum().backward()
    for gate in GATES:
        grad = core.stages[0].get_parameter(f"w_{gate}").grad
        assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


@pytest.mark.parametrize("warmup", [False, True])
def test_checkpoint_restores_the_schedule_and_statistics_exactly(warmup: bool):
    spec = {"name": "ccn", "hidden_size": 4, "columns_per_stage": 1, "steps_per_stage": 3,
            "normalizer_decay": 0.9, "normalizer_warmup": warmup}
    core = make_core(spec, input_size=2)
    state = core.initial_state(1)
    xs = torch.rand(12, 1, 1, 2)
    reset = torch.zeros(1, 1, dtype=torch.bool)
    for t in range(7):
        _, state = core(xs[t], state, reset)
    saved, saved_state = copy.deepcopy(core.state_dict()), {k: v.clone() for k, v in state.items()}
    expected = []
    for t in range(7, 12):
        y, state = core(xs[t], state, reset)
        expected.append(y.detach())
    torch.manual_seed(123)
    fresh = make_core(spec, input_size=2)
    assert ("output_normaliser.count" in saved) == warmup
    fresh.load_state_dict(saved)
    assert fresh.steps_seen == 7 and fresh.learning_stage == 2
    state = saved_state
    for t in range(7, 12):
        y, state = fresh(xs[t], state, reset)
        torch.testing.assert_close(y.detach(), expected[t - 7], rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"columns_per_stage": 9}, "memory.columns_per_stage must be an integer in 1..hidden_size=8"),
        ({"steps_per_stage": 0}, "memory.steps_per_stage must be a positive integer"),
        ({"normalizer_decay": 1.5}, "memory.normalizer_decay must be a number in [0, 1]"),
        ({"variance_floor": 0.0}, "memory.variance_floor must be a positive number"),
        ({"normalizer_warmup": "yes"}, "memory.normalizer_warmup must be true or false"),
        ({"normalizer_warmup": True, "normalizer_decay": 1.0},
         "memory.normalizer_warmup needs memory.normalizer_decay < 1"),
        ({"output_normalizer_decay": 2}, "memory.output_normalizer_decay must be null (normalizer_decay) or a"),
        ({"output_normalizer_decay": "fast"}, "memory.output_normalizer_decay must be null"),
        ({"grad": "snap1"}, "memory.grad='snap1' is not supported by core 'ccn'; valid choices: rtrl, bptt"),
        ({"columns": 3}, "unknown key memory.columns; valid keys:"),
    ],
)
def test_user_errors_name_the_key_and_the_choices(options, fragment):
    with pytest.raises(ConfigError) as err:
        make_core({"name": "ccn", "hidden_size": 8, **options}, input_size=3)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------------------------------
# As the core of the actor-critic learner on a control task


def actor_critic_learner(grad: str, steps_per_stage: int):
    from agents.actor_critic import ActorCriticLearner, ActorCriticOptions
    from agents.base import ModelOptions
    from envs import make_env

    env = make_env({"name": "cue_recall", "num_envs": 4, "num_cues": 2, "delay": 2}, seed=0)
    memory = {"name": "ccn", "hidden_size": 4, "columns_per_stage": 2, "steps_per_stage": steps_per_stage,
              "grad": grad, "init_scale": 0.5}
    options = ActorCriticOptions(unroll_length=6, lr=1e-2, max_grad_norm=0.0, anneal_lr=False)
    return ActorCriticLearner(options, env, memory, ModelOptions(encoder="identity"), torch.device("cpu"), 0, 10_000)


def test_actor_critic_first_update_is_the_same_in_rtrl_and_bptt():
    # The first window starts from zero state and zero sensitivities, so RTRL's gradient is BPTT's.
    learners = {grad: actor_critic_learner(grad, steps_per_stage=1000) for grad in ("rtrl", "bptt")}
    initial = {name: p.detach().clone() for name, p in learners["rtrl"].network.named_parameters()}
    for learner in learners.values():
        learner.iteration()
    rtrl, bptt = (dict(learners[g].network.named_parameters()) for g in ("rtrl", "bptt"))
    for name, value in rtrl.items():
        torch.testing.assert_close(value, bptt[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(rtrl["core.stages.0.w_f"], initial["core.stages.0.w_f"])  # the core learned


def test_actor_critic_counts_learning_steps_and_freezes_stages():
    learner = actor_critic_learner("rtrl", steps_per_stage=48)  # 6 steps x 4 envs = 24 learning steps a window
    core = learner.network.core
    stage0 = None
    for iteration in range(1, 6):
        before = copy.deepcopy(core.stages[1].state_dict())
        learner.iteration()
        assert core.steps_seen == iteration * 24  # acting (no gradients) counts nothing
        if iteration == 2:
            stage0 = copy.deepcopy(core.stages[0].state_dict())
            assert all(torch.equal(v, before[k]) for k, v in core.stages[1].state_dict().items())  # idle so far
    assert core.learning_stage == 1
    for key, value in core.stages[0].state_dict().items():
        assert torch.equal(value, stage0[key]), key  # frozen from the window that began at step 48
    assert any(not torch.equal(v, before[k]) for k, v in core.stages[1].state_dict().items())  # stage 1 learns
