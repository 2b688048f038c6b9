"""The ffm core: the associative scan against the step-by-step recurrence, float32 stability on long
windows, the contract (shapes, detached state, resets, options), and the rtrl gradients against
autograd BPTT over the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from rlmem.errors import ConfigError
from rlmem.memory import make_core
from rlmem.memory.ffm import FFMCore
from rlmem.scan import linear_scan, scan_adjoint

D, H, M, C = 5, 6, 3, 2


def ffm(grad: str = "bptt", dtype: torch.dtype = torch.float64, seed: int = 0, **extra) -> FFMCore:
    torch.manual_seed(seed)
    core = make_core({"name": "ffm", "hidden_size": H, "grad": grad, "traces": M, "context": C, **extra}, D)
    return core.to(dtype)


def random_resets(T: int, B: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(T, B, generator=generator) < p


def reference_ffm(core: FFMCore, x: torch.Tensor, reset: torch.Tensor, aggregate: torch.Tensor):
    """FFM written out step by step from the paper's equations, with its own complex arithmetic."""
    m, c, H = core.traces, core.context, core.hidden_size
    a = -torch.exp(core.log_decay_rate)
    gamma = torch.exp(torch.complex(a.unsqueeze(1).expand(m, c), core.frequency.unsqueeze(0).expand(m, c)))
    S = torch.complex(aggregate[..., 0], aggregate[..., 1])
    ys = []
    for t in range(x.shape[0]):
        pre = x[t] @ core.pre.weight.T + core.pre.bias
        value, input_gate, skip, output_gate = pre.split([m, m, H, H], dim=-1)
        S = torch.where(reset[t].view(-1, 1, 1), torch.zeros_like(S), S)
        S = gamma * S + (value * torch.sigmoid(input_gate)).unsqueeze(-1)
        z = torch.cat([S.real.unsqueeze(-1), S.imag.unsqueeze(-1)], -1).flatten(1) @ core.mix.weight.T
        z = z + core.mix.bias
        normed = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
        q = torch.sigmoid(output_gate)
        ys.append(normed * q + skip * (1 - q))
    return torch.stack(ys), torch.stack([S.real, S.imag], -1)


# --------------------------------------------------------------------------------------------------
# The scan


@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 2048])
def test_scan_equals_the_recurrence_with_resets(T):
    g = torch.Generator().manual_seed(T)
    shape = (T, 3, 2)
    decay = torch.polar(torch.rand(shape, generator=g, dtype=torch.float64),
                        torch.randn(shape, generator=g, dtype=torch.float64))
    decay = decay * (torch.rand(shape, generator=g) > 0.05)
    value = torch.randn(shape, generator=g, dtype=torch.complex128)
    initial = torch.randn(shape[1:], generator=g, dtype=torch.complex128)
    states = linear_scan(decay, value, initial)
    S, expected = initial, []
    for t in range(T):
        S = decay[t] * S + value[t]
        expected.append(S)
    torch.testing.assert_close(states, torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_scan_gradients_match_autograd(dtype):
    g = torch.Generator().manual_seed(1)
    T = 11
    decay = (torch.rand(T, 4, generator=g, dtype=torch.float64) * 0.9).to(dtype)
    decay[3, 1] = 0
    decay[8, 2] = 0
    value = torch.randn(T, 4, generator=g, dtype=torch.float64).to(dtype)
    initial = torch.randn(4, generator=g, dtype=torch.float64).to(dtype)
    if dtype.is_complex:
        decay = decay * torch.exp(1j * torch.randn(T, 4, generator=g, dtype=torch.float64))
        value = value + 1j * torch.randn(T, 4, generator=g, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (decay, value, initial))
    assert torch.autograd.gradcheck(linear_scan, inputs)


def test_scan_adjoint_is_the_backward_recurrence():
    g = torch.Generator().manual_seed(2)
    decay = torch.rand(9, 3, generator=g, dtype=torch.float64) * torch.exp(1j * torch.randn(9, 3, generator=g))
    errors = torch.randn(9, 3, generator=g, dtype=torch.complex128)
    adjoint = scan_adjoint(decay, errors)
    expected, running = [], torch.zeros(3, dtype=torch.complex128)
    for t in reversed(range(9)):
        running = errors[t] + (decay[t + 1].conj() * running if t + 1 < 9 else 0)
        expected.append(running)
    torch.testing.assert_close(adjoint, torch.stack(expected[::-1]))


# --------------------------------------------------------------------------------------------------
# The core in bptt mode


def test_paper_initialisation_and_defaults():
    core = make_core({"name": "ffm", "hidden_size": 256, "grad": "bptt"}, input_size=8)
    assert (core.traces, core.context) == (32, 4)
    assert 2 * core.traces * core.context == 256  # the paper's 256-real state
    a = -torch.exp(core.log_decay_rate.detach())
    torch.testing.assert_close(a, torch.linspace(-0.6731, -0.004497, 32), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(core.frequency.detach(), 2 * math.pi / torch.linspace(1, 1024, 4))
    steps_to_one_percent = math.log(0.01) / core.decay().abs().detach()[:, 0].log()
    assert round(float(steps_to_one_percent[0])) == 7
    assert float(steps_to_one_percent[-1]) == pytest.approx(1024, rel=1e-3)
    state = core.initial_state(3)
    assert state["aggregate"].shape == (3, 32, 4, 2)
    assert core.output_size == 256


def test_zero_value_bias_keeps_the_traces_empty_on_zero_input():
    torch.manual_seed(0)
    x = torch.zeros(16, 2, 8)
    reset = torch.zeros(16, 2, dtype=torch.bool)
    for zero, empty in ((True, True), (False, False)):
        core = make_core({"name": "ffm", "hidden_size": 32, "grad": "bptt", "zero_value_bias": zero}, input_size=8)
        _, state = core(x, core.initial_state(2), reset)
        assert bool(state["aggregate"].abs().max() == 0) is empty
    with pytest.raises(ConfigError, match=r"memory\.zero_value_bias"):
        make_core({"name": "ffm", "hidden_size": 8, "zero_value_bias": "yes"}, input_size=3)


def test_decay_stays_negative_under_any_parameter():
    core = ffm()
    with torch.no_grad():
        core.log_decay_rate.copy_(torch.tensor([-30.0, 0.0, 5.0], dtype=torch.float64))
    assert (core.decay().abs() < 1).all()


@pytest.mark.parametrize("T", [1, 5, 300])
def test_window_equals_step_by_step_reference_with_resets(T):
    core = ffm(seed=T)
    g = torch.Generator().manual_seed(T)
    B = 4
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    reset = random_resets(T, B, 0.02 if T > 100 else 0.3, g)
    start = torch.randn(B, M, C, 2, generator=g, dtype=torch.float64)
    y, state = core(x, {"aggregate": start}, reset)
    with torch.no_grad():
        y_ref, aggregate_ref = reference_ffm(core, x, reset, start)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state["aggregate"], aggregate_ref, rtol=1e-10, atol=1e-10)


def test_window_gradients_equal_the_step_loop():
    core = ffm(seed=3)
    g = torch.Generator().manual_seed(3)
    T, B = 37, 3
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64, requires_grad=True)
    reset = random_resets(T, B, 0.15, g)
    start = torch.randn(B, M, C, 2, generator=g, dtype=torch.float64)
    weights = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    params = dict(core.named_parameters())

    y, _ = core(x, {"aggregate": start}, reset)
    window = torch.autograd.grad((y * weights).sum(), [x, *params.values()])
    y_ref, _ = reference_ffm(core, x, reset, start)
    loop = torch.autograd.grad((y_ref * weights).sum(), [x, *params.values()])
    for name, got, want in zip(["x", *params], window, loop):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


def test_float32_window_of_4096_steps_stays_finite_and_accurate():
    core = ffm(dtype=torch.float32, seed=4)
    with torch.no_grad():  # the slowest decays of the paper's 1024-step range, where rescaling overflows
        core.log_decay_rate.copy_(torch.full((M,), math.log(0.004497)))
    g = torch.Generator().manual_seed(4)
    T, B = 4096, 2
    x = torch.randn(T, B, D, generator=g) * 3
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[3000, 1] = True
    y, state = core(x, core.initial_state(B), reset)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(state["aggregate"]).all()
    assert all(torch.isfinite(p.grad).all() for p in core.parameters())
    core64 = ffm(seed=4)
    core64.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
    y64, _ = core64(x.double(), core64.initial_state(B), reset)
    torch.testing.assert_close(y.double(), y64, rtol=1e-3, atol=1e-3)


def test_returned_state_is_detached_and_resets_zero_it():
    core = ffm()
    x = torch.randn(4, 2, D, dtype=torch.float64)
    start = torch.randn(2, M, C, 2, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(4, 2, dtype=torch.bool)
    _, state = core(x, {"aggregate": start}, reset)
    assert not state["aggregate"].requires_grad and state["aggregate"].grad_fn is None
    # A reset at step 0 makes the window independent of the carried state for that env only.
    reset[0, 0] = True
    y_a, _ = core(x, {"aggregate": start.detach()}, reset)
    y_b, _ = core(x, {"aggregate": torch.zeros_like(start)}, reset)
    torch.testing.assert_close(y_a[:, 0], y_b[:, 0])
    assert not torch.allclose(y_a[:, 1], y_b[:, 1])


def test_consecutive_windows_equal_one_long_window():
    core = ffm(seed=5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 3, D, generator=g, dtype=torch.float64)
    reset = random_resets(30, 3, 0.2, g)
    y_long, state_long = core(x, core.initial_state(3), reset)
    state, parts = core.initial_state(3), []
    for t0, t1 in [(0, 1), (1, 13), (13, 14), (14, 30)]:
        y, state = core(x[t0:t1], state, reset[t0:t1])
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts), y_long)
    torch.testing.assert_close(state["aggregate"], state_long["aggregate"])


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"traces": 0}, ["memory.traces", "positive"]),
        ({"context": "4"}, ["memory.context", "positive"]),
        ({"grad": "snap1"}, ["snap1", "bptt, rtrl"]),
        ({"memory_size": 4}, ["memory.memory_size", "traces"]),
    ],
)
def test_bad_options_raise_config_errors(spec, words):
    with pytest.raises(ConfigError) as err:
        make_core({"name": "ffm", "hidden_size": 8, **spec}, input_size=3)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------------------------------
# The core in rtrl mode, against autograd BPTT


def twins(encoder_grad: str = "window", seed: int = 0) -> tuple[FFMCore, FFMCore]:
    """An rtrl core and a bptt core with the same weights."""
    rtrl = ffm("rtrl", seed=seed, encoder_grad=encoder_grad)
    bptt = ffm("bptt", seed=seed + 1)
    bptt.load_state_dict(rtrl.state_dict())
    return rtrl, bptt


def loss_of(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A nonlinear loss on the outputs of every step."""
    return (y * weights).sum() + 0.3 * torch.sin(y).pow(2).sum()


def windows(lengths: list[int]) -> list[tuple[int, int]]:
    bounds, t = [], 0
    for length in lengths:
        bounds.append((t, t + length))
        t += length
    return bounds


def test_rtrl_state_holds_the_documented_sensitivities():
    core = ffm("rtrl")
    state = core.initial_state(3)
    units = M * C
    expected = {
        "aggregate": (3, M, C, 2),
        "sensitivity_value_weight": (3, units, D, 2),
        "sensitivity_gate_weight": (3, units, D, 2),
        "sensitivity_value_bias": (3, units, 2),
        "sensitivity_gate_bias": (3, units, 2),
        "sensitivity_log_decay_rate": (3, units, 2),
        "sensitivity_frequency": (3, units, 2),
    }
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v[0].numel() for k, v in state.items() if k != "aggregate") == 2 * units * (2 * D + 4)


@pytest.mark.parametrize(
    ("lengths", "batch", "seed"),
    [([30], 3, 0), ([1, 7, 1, 12, 9], 3, 1), ([1] * 12, 2, 2), ([5, 5, 5, 5], 4, 3)],
)
def test_rtrl_windows_sum_to_whole_sequence_bptt(lengths, batch, seed):
    rtrl, bptt = twins(seed=seed)
    T = sum(lengths)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(T, batch, D, generator=g, dtype=torch.float64)
    reset = random_resets(T, batch, 0.2, g)
    reset[lengths[0] % T, 0] = True  # a reset on a window boundary
    weights = torch.randn(T, batch, H, generator=g, dtype=torch.float64)

    y_bptt, _ = bptt(x, bptt.initial_state(batch), reset)
    loss_of(y_bptt, weights).backward()

    state, outputs = rtrl.initial_state(batch), []
    for t0, t1 in windows(lengths):
        y, state = rtrl(x[t0:t1], state, reset[t0:t1])
        loss_of(y, weights[t0:t1]).backward()
        outputs.append(y.detach())
    torch.testing.assert_close(torch.cat(outputs), y_bptt.detach(), rtol=1e-12, atol=1e-12)
    for (name, p_rtrl), (_, p_bptt) in zip(rtrl.named_parameters(), bptt.named_parameters()):
        assert p_bptt.grad.abs().max() > 1e-6, name  # every parameter takes part
        torch.testing.assert_close(p_rtrl.grad, p_bptt.grad, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def carried_state(core: FFMCore, batch: int, seed: int):
    """A nonzero state (and sensitivities) reached by running a first window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, batch, D, generator=g, dtype=torch.float64)
    reset = torch.zeros(6, batch, dtype=torch.bool)
    with torch.enable_grad():
        _, state = core(x, core.initial_state(batch), reset)
    return state


def test_rtrl_input_gradient_within_the_window_matches_bptt():
    rtrl, bptt = twins(seed=7)
    state = carried_state(rtrl, 3, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 3, D, generator=g, dtype=torch.float64)
    reset = random_resets(9, 3, 0.2, g)
    weights = torch.randn(9, 3, H, generator=g, dtype=torch.float64)
    grads = []
    for core, start in [(rtrl, state), (bptt, {"aggregate": state["aggregate"]})]:
        inputs = x.clone().requires_grad_()
        y, _ = core(inputs, start, reset)
        grads.append(torch.autograd.grad(loss_of(y, weights), inputs)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_rtrl_same_step_input_gradient_stops_at_the_step():
    rtrl, _ = twins("same_step", seed=9)
    state = carried_state(rtrl, 2, seed=9)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(7, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    reset = random_resets(7, 2, 0.2, g)
    weights = torch.randn(7, 2, H, generator=g, dtype=torch.float64)
    y, _ = rtrl(x, state, reset)
    got = torch.autograd.grad(loss_of(y, weights), x)[0]
    # The oracle: each step sees the previous aggregate as a constant, so x_t reaches only y_t.
    expected = torch.zeros_like(x)
    aggregate = state["aggregate"]
    for t in range(7):
        x_t = x[t : t + 1].detach().requires_grad_()
        y_t, aggregate = reference_ffm(rtrl, x_t, reset[t : t + 1], aggregate.detach())
        expected[t] = torch.autograd.grad(loss_of(y_t, weights[t : t + 1]), x_t)[0][0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_no_grad_runs_the_scan_and_passes_sensitivities_through():
    rtrl, bptt = twins(seed=11)
    state = carried_state(rtrl, 2, seed=11)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    reset = torch.zeros(5, 2, dtype=torch.bool)
    with torch.no_grad():
        y, acted = rtrl(x, state, reset)
        y_bptt, expected = bptt(x, {"aggregate": state["aggregate"]}, reset)
    torch.testing.assert_close(y, y_bptt)
    torch.testing.assert_close(acted["aggregate"], expected["aggregate"])
    for key in state:
        if key.startswith("sensitivity_"):
            assert acted[key] is state[key]
            assert state[key].abs().sum() > 0


def test_rtrl_state_is_detached_and_float32_windows_stay_finite():
    core = ffm("rtrl", dtype=torch.float32, seed=12)
    x = torch.randn(1024, 2, D)
    reset = torch.zeros(1024, 2, dtype=torch.bool)
    y, state = core(x, core.initial_state(2), reset)
    y.square().mean().backward()
    assert all(not v.requires_grad for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.isfinite(p.grad).all() for p in core.parameters())


def test_checkpoint_loads_across_grad_modes():
    rtrl, bptt = twins(seed=13)
    assert list(rtrl.state_dict()) == list(bptt.state_dict())
    fresh = ffm("bptt", seed=99)
    fresh.load_state_dict(rtrl.state_dict(), strict=True)
    back = ffm("rtrl", seed=98)
    back.load_state_dict(fresh.state_dict(), strict=True)
    x = torch.randn(4, 2, D, dtype=torch.float64)
    reset = torch.zeros(4, 2, dtype=torch.bool)
    torch.testing.assert_close(back(x, back.initial_state(2), reset)[0], rtrl(x, rtrl.initial_state(2), reset)[0])


# --------------------------------------------------------------------------------------------------
# The group config and the benchmark


def test_group_config_builds_the_paper_sized_core():
    from pathlib import Path

    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "configs" / "memory" / "ffm.yaml"))
    core = make_core(spec, input_size=4)
    assert (core.traces, core.context, core.output_size, core.grad) == (32, 4, 256, "bptt")


def test_bench_prints_both_cores_and_refuses_bad_arguments(capsys):
    from rlmem.bench.ffm import run

    small = ["--batch", "2", "--window", "16", "--input", "4", "--state", "8", "--traces", "2"]
    run([*small, "--repeats", "1", "--warmup", "0", "--devices", "cpu", "--rtrl"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["cpu", "ffm"], ["cpu", "gru"], ["cpu", "ffm-rtrl"]]
    assert float(rows[1][-1]) == 1.0  # the gru row is the reference of the ratio column
    with pytest.raises(ConfigError, match="--state 10 must be a multiple"):
        run([*small[:6], "--state", "10", "--traces", "2"])
