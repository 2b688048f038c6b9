"""The MemoryCore contract of the RTRL cores (elstm, lru), checked in float64 against autograd BPTT.

The oracle for ``grad: rtrl`` is the same core in ``grad: bptt`` mode run over the whole sequence as
one window: with parameters fixed, the gradients summed over consecutive windows must match it for
every parameter, with episode resets at random positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from rlmem.errors import ConfigError
from rlmem.memory import MemoryCore, make_core

DTYPE = torch.float64
CORE_NAMES = ("elstm", "lru")
D, N = 3, 4


def build(name: str, grad: str, encoder_grad: str = "window", seed: int = 0, **options) -> MemoryCore:
    torch.manual_seed(seed)
    spec = {"name": name, "hidden_size": N, "grad": grad, "encoder_grad": encoder_grad, **options}
    return make_core(spec, input_size=D).to(DTYPE)


def twins(name: str, encoder_grad: str = "window", **options) -> tuple[MemoryCore, MemoryCore]:
    """An rtrl core and a bptt core with the same weights."""
    rtrl = build(name, "rtrl", encoder_grad, **options)
    bptt = build(name, "bptt", seed=1, **options)
    bptt.load_state_dict(rtrl.state_dict())
    return rtrl, bptt


def loss_of(y: Tensor, weights: Tensor) -> Tensor:
    """An arbitrary loss on the outputs at every step."""
    return (y * weights).sum() + 0.3 * torch.sin(y).pow(2).sum()


def sequence(T: int, B: int, seed: int, reset_rate: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=DTYPE)
    reset = torch.rand(T, B, generator=g) < reset_rate
    weights = torch.randn(T, B, N, generator=g, dtype=DTYPE)
    return x, reset, weights


def split(lengths: list[int]) -> list[tuple[int, int]]:
    bounds, t = [], 0
    for length in lengths:
        bounds.append((t, t + length))
        t += length
    return bounds


def grads(core: MemoryCore) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in core.named_parameters()}


@pytest.mark.parametrize("name", CORE_NAMES)
@pytest.mark.parametrize("encoder_grad", ["window", "same_step"])
@pytest.mark.parametrize("batch, lengths", [(1, [1, 1, 1, 1, 1, 1]), (3, [5, 1, 8, 2]), (5, [2, 13]), (2, [12])])
def test_rtrl_windows_sum_to_whole_sequence_bptt(name, encoder_grad, batch, lengths):
    rtrl, bptt = twins(name, encoder_grad)
    x, reset, weights = sequence(sum(lengths), batch, seed=batch + len(lengths))

    y, _ = bptt(x, bptt.initial_state(batch, dtype=DTYPE), reset)
    loss_of(y, weights).backward()
    expected = grads(bptt)

    state = rtrl.initial_state(batch, dtype=DTYPE)
    for t0, t1 in split(lengths):
        y, state = rtrl(x[t0:t1], state, reset[t0:t1])
        loss_of(y, weights[t0:t1]).backward()
    got = grads(rtrl)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-12, msg=f"{name}: {key}")


def carried_state(core: MemoryCore, batch: int, seed: int):
    """A state with history: run a few steps first (no grad), so windows start from nonzero h and S."""
    x, reset, _ = sequence(4, batch, seed=seed, reset_rate=0.0)
    state = core.initial_state(batch, dtype=DTYPE)
    with torch.enable_grad():
        _, state = core(x, state, reset)
    return state


@pytest.mark.parametrize("name", CORE_NAMES)
def test_input_gradient_within_the_window_matches_bptt(name):
    rtrl, bptt = twins(name, "window")
    B, T = 3, 7
    x, reset, weights = sequence(T, B, seed=11)
    start = carried_state(rtrl, B, seed=12)
    h_key = "cell" if name == "elstm" else "hidden"

    x_rtrl = x.clone().requires_grad_()
    y, _ = rtrl(x_rtrl, start, reset)
    loss_of(y, weights).backward()

    x_bptt = x.clone().requires_grad_()
    y, _ = bptt(x_bptt, {h_key: start[h_key]}, reset)
    loss_of(y, weights).backward()
    torch.testing.assert_close(x_rtrl.grad, x_bptt.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CORE_NAMES)
def test_same_step_input_gradient_stops_at_the_step(name):
    """``encoder_grad: same_step``: x_t gets ∂ℓ_t/∂x_t only, as if the state before t were a constant."""
    rtrl, bptt = twins(name, "same_step")
    B, T = 2, 6
    x, reset, weights = sequence(T, B, seed=21)
    start = carried_state(rtrl, B, seed=22)
    h_key = "cell" if name == "elstm" else "hidden"

    x_rtrl = x.clone().requires_grad_()
    y, _ = rtrl(x_rtrl, start, reset)
    loss_of(y, weights).backward()

    x_bptt = x.clone().requires_grad_()
    state = {h_key: start[h_key]}
    for t in range(T):  # one-step windows: the returned state is detached between them
        y, state = bptt(x_bptt[t : t + 1], state, reset[t : t + 1])
        loss_of(y, weights[t : t + 1]).backward()
    torch.testing.assert_close(x_rtrl.grad, x_bptt.grad, rtol=1e-10, atol=1e-12)
    # ... and it differs from the full-window gradient, so the test can tell them apart.
    x_window = x.clone().requires_grad_()
    y, _ = bptt(x_window, {h_key: start[h_key]}, reset)
    loss_of(y, weights).backward()
    assert not torch.allclose(x_rtrl.grad, x_window.grad)


@pytest.mark.parametrize("name", CORE_NAMES)
def test_sensitivities_restart_at_a_reset(name):
    core = build(name, "rtrl")
    B = 3
    start = carried_state(core, B, seed=31)
    x, _, _ = sequence(5, B, seed=32)
    reset = torch.zeros(5, B, dtype=torch.bool)
    reset[-1, 0] = True  # env 0 resets before the last step
    _, state = core(x, start, reset)
    # Right after the reset, env 0's state is that of a fresh episode after one step.
    _, fresh = core(x[-1:, :1], core.initial_state(1, dtype=DTYPE), torch.zeros(1, 1, dtype=torch.bool))
    sensitivity_keys = [k for k in state if k.startswith("sensitivity_")]
    assert sensitivity_keys
    for key in state:
        torch.testing.assert_close(state[key][:1], fresh[key], rtol=1e-12, atol=1e-14, msg=key)
        assert not torch.allclose(state[key][1:2], fresh[key]), key  # env 1 kept its history
    # A reset at the very first step of a window ignores the carried sensitivities entirely.
    first = torch.zeros(1, B, dtype=torch.bool)
    first[0, 2] = True
    _, state = core(x[:1], start, first)
    _, fresh = core(x[:1, 2:3], core.initial_state(1, dtype=DTYPE), torch.zeros(1, 1, dtype=torch.bool))
    for key in sensitivity_keys:
        torch.testing.assert_close(state[key][2:3], fresh[key], rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize("name", CORE_NAMES)
@pytest.mark.parametrize("grad", ["rtrl", "bptt"])
def test_returned_state_is_detached(name, grad):
    core = build(name, grad)
    x, reset, _ = sequence(4, 2, seed=41)
    y, state = core(x.requires_grad_(), core.initial_state(2, dtype=DTYPE), reset)
    assert y.requires_grad
    for key, value in state.items():
        assert not value.requires_grad and value.grad_fn is None, key
        assert value.shape[0] == 2, key  # batch on dim 0


@pytest.mark.parametrize("name", CORE_NAMES)
def test_no_grad_runs_the_cell_and_passes_sensitivities_through(name):
    core = build(name, "rtrl")
    B = 3
    start = carried_state(core, B, seed=51)
    x, reset, _ = sequence(6, B, seed=52)
    y_learn, learned = core(x, start, reset)
    with torch.no_grad():
        y_act, acted = core(x, start, reset)
    torch.testing.assert_close(y_act, y_learn.detach(), rtol=1e-12, atol=1e-14)
    for key, value in acted.items():
        if key.startswith("sensitivity_"):
            assert value is start[key], key  # untouched: the learner's replay advances them
        else:
            torch.testing.assert_close(value, learned[key], rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(learned[k], start[k]) for k in start if k.startswith("sensitivity_"))


@pytest.mark.parametrize("name", CORE_NAMES)
def test_bptt_and_rtrl_compute_the_same_outputs(name):
    rtrl, bptt = twins(name)
    B = 4
    x, reset, _ = sequence(15, B, seed=61)
    s_rtrl, s_bptt = rtrl.initial_state(B, dtype=DTYPE), bptt.initial_state(B, dtype=DTYPE)
    for t0, t1 in split([6, 1, 8]):
        y_rtrl, s_rtrl = rtrl(x[t0:t1], s_rtrl, reset[t0:t1])
        y_bptt, s_bptt = bptt(x[t0:t1], s_bptt, reset[t0:t1])
        torch.testing.assert_close(y_rtrl, y_bptt, rtol=1e-12, atol=1e-14)
    for key, value in s_bptt.items():
        torch.testing.assert_close(s_rtrl[key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CORE_NAMES)
def test_checkpoint_loads_across_grad_modes(name):
    rtrl, _ = twins(name)
    other = build(name, "bptt", seed=7)
    other.load_state_dict(rtrl.state_dict())  # strict: identical parameter names
    x, reset, _ = sequence(5, 2, seed=71)
    y_other, _ = other(x, other.initial_state(2, dtype=DTYPE), reset)
    y_rtrl, _ = rtrl(x, rtrl.initial_state(2, dtype=DTYPE), reset)
    torch.testing.assert_close(y_other, y_rtrl, rtol=1e-12, atol=1e-14)
    back = build(name, "rtrl", seed=8)
    back.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), rtrl.state_dict().values()))


def saved_elements_per_env(core: MemoryCore, T: int, batch: int) -> float:
    """Elements kept for backward by a forward over T steps, plus the carried state, per env."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    state = core.initial_state(batch, dtype=DTYPE)
    x = torch.randn(T, batch, core.input_size, dtype=DTYPE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        core(x, state, torch.zeros(T, batch, dtype=torch.bool))
    state_elements = sum(v.numel() for v in state.values())
    return (sum(storages.values()) + state_elements) / batch


@pytest.mark.parametrize("name", CORE_NAMES)
def test_backward_memory_does_not_grow_with_the_sensitivities(name):
    """Per extra step, the window keeps O(N + D) numbers per env, never a copy of S (O(N·D))."""
    width = 48
    torch.manual_seed(0)
    core = make_core({"name": name, "hidden_size": width, "grad": "rtrl"}, input_size=width).to(DTYPE)
    sensitivity = sum(v[0].numel() for k, v in core.initial_state(1).items() if k.startswith("sensitivity_"))
    short, long = saved_elements_per_env(core, 4, 2), saved_elements_per_env(core, 36, 2)
    per_step = (long - short) / 32
    assert short >= sensitivity  # the carried sensitivities are counted
    assert per_step <= 12 * width, per_step
    assert per_step < sensitivity / 4, (per_step, sensitivity)


@pytest.mark.parametrize("name", CORE_NAMES)
def test_built_from_the_minimal_spec_and_refuses_other_modes(name):
    for grad in ("rtrl", "bptt"):
        core = make_core({"name": name, "hidden_size": 6, "grad": grad}, input_size=5)
        y, state = core(torch.randn(3, 2, 5), core.initial_state(2), torch.zeros(3, 2, dtype=torch.bool))
        assert y.shape == (3, 2, core.output_size) and core.output_size == 6
        assert y.dtype == torch.float32 and all(v.dtype == torch.float32 for v in state.values())
    with pytest.raises(ConfigError, match=r"memory\.grad=.snap1. is not supported"):
        make_core({"name": name, "hidden_size": 6, "grad": "snap1"}, input_size=5)
