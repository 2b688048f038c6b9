"""The ``elstm`` core's own equations (the contract checks shared with ``lru`` are in test_rtrl_cores.py)."""

from __future__ import annotations

import pytest
import torch

from rlmem.errors import ConfigError
from rlmem.memory import make_core
from rlmem.memory.elstm import ELSTMCell
from rlmem.rtrl import adjoint, gradients, window_coefficients

DTYPE = torch.float64


def test_step_coefficients_are_the_cells_derivatives():
    """A = ∂c_t/∂c_{t-1} (with the w_z ⊙ ẑ term) and each group's injection u ⊗ v = ∂c_t/∂θ at fixed c_{t-1}."""
    cell, B, N, D = ELSTMCell(), 5, 4, 3
    g = torch.Generator().manual_seed(0)
    params = {
        "forget_input": torch.randn(N, D, generator=g, dtype=DTYPE),
        "cell_input": torch.randn(N, D, generator=g, dtype=DTYPE),
        "forget_recurrent": torch.randn(N, generator=g, dtype=DTYPE),
        "cell_recurrent": torch.randn(N, generator=g, dtype=DTYPE),
        "forget_bias": torch.randn(N, generator=g, dtype=DTYPE),
        "cell_bias": torch.randn(N, generator=g, dtype=DTYPE),
    }
    params = {k: v.requires_grad_() for k, v in params.items()}
    x = torch.randn(1, B, D, generator=g, dtype=DTYPE)
    c_prev = torch.randn(B, N, generator=g, dtype=DTYPE, requires_grad=True)
    error = torch.randn(1, B, N, generator=g, dtype=DTYPE)
    reset = torch.zeros(1, B, dtype=torch.bool)

    prepared = cell.prepare({"x": x}, params)
    c, _ = cell.step(c_prev, {k: v[0] for k, v in prepared.items()}, params, False)
    expected = torch.autograd.grad((c * error[0]).sum(), [c_prev, *params.values()])

    with torch.no_grad():
        _, coefficients = window_coefficients(cell, c_prev, c.unsqueeze(0), prepared, params, reset)
        zero = {
            group.name: torch.zeros(B, N, D, dtype=DTYPE) if group.matrix else torch.zeros(B, N, dtype=DTYPE)
            for group in cell.groups
        }
        got = gradients(cell, zero, coefficients, error)
    # ∂c_t/∂c_{t-1} is diagonal: its diagonal is A.
    torch.testing.assert_close(coefficients.jacobians[0] * error[0], expected[0], rtol=1e-12, atol=1e-14)
    for name, want in zip(params, expected[1:]):
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-14, msg=name)
    # the adjoint of a one-step window is the error itself
    torch.testing.assert_close(adjoint(cell, coefficients, error), error)


def test_output_is_the_output_gate_times_the_cell():
    torch.manual_seed(0)
    core = make_core({"name": "elstm", "hidden_size": 4, "grad": "bptt"}, input_size=3).to(DTYPE)
    x = torch.randn(2, 2, 3, dtype=DTYPE)
    y, state = core(x, core.initial_state(2, dtype=DTYPE), torch.zeros(2, 2, dtype=torch.bool))
    p = dict(core.named_parameters())
    c = torch.zeros(2, 4, dtype=DTYPE)
    for t in range(2):
        f = torch.sigmoid(x[t] @ p["forget_input"].t() + p["forget_recurrent"] * c + p["forget_bias"])
        z = torch.tanh(x[t] @ p["cell_input"].t() + p["cell_recurrent"] * c + p["cell_bias"])
        c = f * c + (1 - f) * z
        o = torch.sigmoid(x[t] @ p["output_input"].t() + c @ p["output_recurrent"].t() + p["output_bias"])
        torch.testing.assert_close(y[t], o * c, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["cell"], c, rtol=1e-12, atol=1e-14)


def test_state_layout_and_sensitivity_size():
    N, D = 6, 5
    bptt = make_core({"name": "elstm", "hidden_size": N, "grad": "bptt"}, input_size=D)
    rtrl = make_core({"name": "elstm", "hidden_size": N, "grad": "rtrl"}, input_size=D)
    assert set(bptt.initial_state(3)) == {"cell"}
    state = rtrl.initial_state(3)
    sensitivities = {k: v for k, v in state.items() if k.startswith("sensitivity_")}
    assert len(sensitivities) == 6
    assert sum(v[0].numel() for v in sensitivities.values()) == 2 * N * D + 4 * N  # as in the paper
    assert all(v.shape[0] == 3 for v in state.values())


def test_initialisation_and_options():
    torch.manual_seed(0)
    core = make_core({"name": "elstm", "hidden_size": 64, "grad": "rtrl"}, input_size=64)
    weights = torch.cat([p.detach().flatten() for p in core.parameters()])
    assert abs(weights.std().item() - 0.1) < 0.005 and abs(weights.mean().item()) < 0.005
    core = make_core({"name": "elstm", "hidden_size": 64, "grad": "rtrl", "init_std": 0.02}, input_size=64)
    assert abs(core.forget_input.std().item() - 0.02) < 0.002
    with pytest.raises(ConfigError, match=r"memory\.init_std"):
        make_core({"name": "elstm", "hidden_size": 4, "init_std": -1.0}, input_size=3)


def test_chrono_initialisation_spreads_forget_time_constants():
    torch.manual_seed(0)
    core = make_core({"name": "elstm", "hidden_size": 256, "chrono_horizon": 200}, input_size=3)
    # On a zero input the forget gate is σ(b_f) = u / (1 + u): time constants 1 + u in [2, 200].
    time_constants = 1 + torch.exp(core.forget_bias.detach())
    assert time_constants.min() >= 2 - 1e-4 and time_constants.max() <= 200 + 1e-3
    assert time_constants.max() > 150 and torch.all(core.cell_bias == 0)
    # A cue written into the cell survives 128 blank steps in the slowest units.
    cell = torch.ones(1, 256)
    state = {"cell": cell}
    _, state = core(torch.zeros(128, 1, 3), state, torch.zeros(128, 1, dtype=torch.bool))
    assert state["cell"].abs().max() > 0.3
    with pytest.raises(ConfigError, match=r"memory\.chrono_horizon"):
        make_core({"name": "elstm", "hidden_size": 4, "chrono_horizon": 1}, input_size=3)
