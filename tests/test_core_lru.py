"""The ``lru`` core's own equations (the contract checks shared with ``elstm`` are in test_rtrl_cores.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlmem.errors import ConfigError
from rlmem.memory import make_core
from rlmem.memory.lru import LRUCell
from rlmem.rtrl import advance, gradients, run_cell, window_coefficients, zero_sensitivities

DTYPE = torch.float64


def eigenvalues(core) -> torch.Tensor:
    nu_log, theta_log = core.nu_log.detach().double(), core.theta_log.detach().double()
    return torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))


def test_step_coefficients_are_the_cells_derivatives():
    """A = λ and u ⊗ v = ∂h_t/∂θ at fixed h_{t-1} for B (both parts), ν_log, θ_log and γ_log."""
    cell, B, N, D = LRUCell(), 4, 5, 3
    g = torch.Generator().manual_seed(0)
    params = {
        "input_re": torch.randn(N, D, generator=g, dtype=DTYPE),
        "input_im": torch.randn(N, D, generator=g, dtype=DTYPE),
        "nu_log": torch.randn(N, generator=g, dtype=DTYPE),
        "theta_log": torch.randn(N, generator=g, dtype=DTYPE),
        "gamma_log": torch.randn(N, generator=g, dtype=DTYPE),
    }
    params = {k: v.requires_grad_() for k, v in params.items()}
    x = torch.randn(1, B, D, generator=g, dtype=DTYPE)
    h_prev = torch.randn(B, N, 2, generator=g, dtype=DTYPE, requires_grad=True)
    error = torch.randn(1, B, N, 2, generator=g, dtype=DTYPE)
    reset = torch.zeros(1, B, dtype=torch.bool)

    prepared = cell.prepare({"x": x}, params)
    h, _ = cell.step(torch.view_as_complex(h_prev), {k: v[0] for k, v in prepared.items()}, params, False)
    h = torch.view_as_real(h)
    expected = torch.autograd.grad((h * error[0]).sum(), [h_prev, *params.values()])

    with torch.no_grad():
        _, coefficients = window_coefficients(cell, h_prev, h.unsqueeze(0), prepared, params, reset)
        zero = zero_sensitivities(cell, B, N, {"input": D}, "cpu", DTYPE)
        got = gradients(cell, zero, coefficients, torch.view_as_complex(error))
    lam = torch.exp(torch.complex(-params["nu_log"].exp(), params["theta_log"].exp())).detach()
    torch.testing.assert_close(coefficients.jacobians[0], lam.expand(B, N))
    # ∂L/∂h_{t-1} = conj(λ) e in real pairs: the transposed Jacobian.
    torch.testing.assert_close(
        torch.view_as_real(lam.conj() * torch.view_as_complex(error[0])), expected[0], rtol=1e-12, atol=1e-14
    )
    for name, want in zip(params, expected[1:]):
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-14, msg=name)


def test_ring_initialisation_and_normalisation():
    torch.manual_seed(0)
    spec = {"name": "lru", "hidden_size": 256, "r_min": 0.5, "r_max": 0.9, "max_phase": math.pi / 4}
    core = make_core(spec, input_size=7)
    lam = eigenvalues(core)
    modulus, phase = lam.abs(), torch.exp(core.theta_log.detach().double())
    assert modulus.min() >= 0.5 - 1e-6 and modulus.max() <= 0.9 + 1e-6
    assert phase.min() >= 0 and phase.max() <= math.pi / 4 + 1e-6
    # |λ|² is uniform on [r_min², r_max²]: its mean is the interval's midpoint.
    assert abs((modulus**2).mean().item() - (0.25 + 0.81) / 2) < 0.03
    # γ normalises the input so that a unit-variance drive keeps h at unit scale: γ² + |λ|² = 1.
    gamma = torch.exp(core.gamma_log.detach().double())
    torch.testing.assert_close(gamma**2 + modulus**2, torch.ones_like(gamma), rtol=1e-5, atol=1e-5)
    # The default ring (r_min = 0, r_max = 1) stays finite.
    core = make_core({"name": "lru", "hidden_size": 512}, input_size=3)
    assert all(torch.isfinite(p).all() for p in core.parameters())
    assert eigenvalues(core).abs().max() < 1


def test_skip_is_diagonal_when_sizes_match_and_dense_otherwise():
    same = make_core({"name": "lru", "hidden_size": 5, "activation": "none"}, input_size=5)
    other = make_core({"name": "lru", "hidden_size": 5, "activation": "none"}, input_size=3)
    assert same.skip.shape == (5,) and other.skip.shape == (5, 3)
    # With the recurrence silenced (B = 0, h = 0), the output is the skip term alone.
    with torch.no_grad():
        same.input_re.zero_()
        same.input_im.zero_()
        x = torch.randn(2, 3, 5)
        y, _ = same(x, same.initial_state(3), torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(y, x * same.skip)


@pytest.mark.parametrize("activation", ["none", "gelu", "glu"])
def test_activations_keep_rtrl_exact(activation):
    """RTRL over windows equals whole-sequence BPTT whatever follows the readout (D = N: diagonal skip)."""
    torch.manual_seed(3)
    spec = {"name": "lru", "hidden_size": 3, "activation": activation}
    rtrl = make_core({**spec, "grad": "rtrl"}, input_size=3).to(DTYPE)
    bptt = make_core({**spec, "grad": "bptt"}, input_size=3).to(DTYPE)
    bptt.load_state_dict(rtrl.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 2, 3, generator=g, dtype=DTYPE)
    reset = torch.rand(9, 2, generator=g) < 0.2
    target = torch.randn(9, 2, 3, generator=g, dtype=DTYPE)
    y, _ = bptt(x, bptt.initial_state(2, dtype=DTYPE), reset)
    ((y - target) ** 2).sum().backward()
    state = rtrl.initial_state(2, dtype=DTYPE)
    for t0, t1 in [(0, 4), (4, 5), (5, 9)]:
        y, state = rtrl(x[t0:t1], state, reset[t0:t1])
        ((y - target[t0:t1]) ** 2).sum().backward()
    for (name, p), q in zip(rtrl.named_parameters(), bptt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_long_float32_window_matches_the_float64_recursion():
    """S_T of a 512-step float32 window (|λ| up to 1) agrees with one-step recursion (1) in float64."""
    torch.manual_seed(5)
    core = make_core({"name": "lru", "hidden_size": 8, "grad": "rtrl", "r_min": 0.9}, input_size=4)
    T, B = 512, 2
    x = torch.randn(T, B, 4)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[200, 1] = True
    with torch.enable_grad():
        _, state = core(x, core.initial_state(B), reset)
    cell, params = core.cell, {k: v.detach().double() for k, v in core.recurrent_params().items()}
    h = torch.zeros(B, 8, 2, dtype=DTYPE)
    S = zero_sensitivities(cell, B, 8, {"input": 4}, "cpu", DTYPE)
    with torch.no_grad():
        for t in range(T):
            prepared = cell.prepare({"x": x[t : t + 1].double()}, params)
            h_next = run_cell(cell, h, prepared, params, reset[t : t + 1])
            _, coefficients = window_coefficients(cell, h, h_next, prepared, params, reset[t : t + 1])
            S, h = advance(cell, S, coefficients), h_next[0]
    for name, value in S.items():
        reference = value.float()
        got = state["sensitivity_" + name]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, reference, rtol=2e-3, atol=2e-3 * reference.abs().max().item())


def test_state_layout_and_sensitivity_size():
    N, D = 6, 5
    core = make_core({"name": "lru", "hidden_size": N, "grad": "rtrl"}, input_size=D)
    state = core.initial_state(3)
    assert state["hidden"].shape == (3, N, 2)
    sensitivities = [v[0].numel() for k, v in state.items() if k.startswith("sensitivity_")]
    assert sum(sensitivities) == 2 * N * D + 6 * N
    assert set(make_core({"name": "lru", "hidden_size": N}, input_size=D).initial_state(1)) == {"hidden"}


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"r_min": 0.9, "r_max": 0.5}, "memory.r_min and memory.r_max must satisfy"),
        ({"r_max": 1.5}, "0 <= r_min < r_max <= 1"),
        ({"max_phase": 0.0}, "memory.max_phase must be positive"),
        ({"activation": "relu"}, "memory.activation must be one of none, gelu, glu, got 'relu'"),
        ({"r_min": "low"}, "memory.r_min must be a number"),
    ],
)
def test_bad_options_name_the_key(options, fragment):
    with pytest.raises(ConfigError) as raised:
        make_core({"name": "lru", "hidden_size": 4, **options}, input_size=3)
    assert fragment in str(raised.value)
