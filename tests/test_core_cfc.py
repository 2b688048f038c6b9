"""The ``cfc`` core: the cell equations, the low-rank sparse recurrence, and its gradients.

Gradient oracle: autograd BPTT over the whole sequence in float64. The learning modes run the same
sequence as consecutive windows with carried state and episode resets at random positions; with the
parameters fixed, exact RTRL must give the full-sequence gradient for every parameter.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from rlmem.errors import ConfigError
from rlmem.memory import make_core
from rlmem.memory.cfc import CfCCore
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients, rtrl_window, zero_sensitivities

N, D, B = 5, 3, 3
WINDOWS, WINDOW = 3, 4


def _spec(grad: str, **options) -> dict:
    return {"name": "cfc", "hidden_size": N, "grad": grad, **options}


def _perturbed(core: CfCCore, seed: int) -> CfCCore:
    """Random parameters of order one, so that every gate, slope and |·| is away from its special points."""
    core = core.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in core.parameters():
            param.add_(0.4 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return core


def _sequence(seed: int, time_span: bool = False):
    generator = torch.Generator().manual_seed(seed)
    steps = WINDOWS * WINDOW
    x = torch.randn(steps, B, D, generator=generator, dtype=torch.float64)
    reset = torch.rand(steps, B, generator=generator) < 0.2
    reset[0] = True
    reset[WINDOW + 1, 0] = True  # a reset inside a window
    reset[WINDOW, 1] = False  # a state that crosses a window boundary
    reset[1:, 2] = False  # and one whose sensitivities cross every window
    weights = torch.randn(steps, B, N, generator=generator, dtype=torch.float64)
    dt = 0.2 + 1.5 * torch.rand(steps, B, generator=generator, dtype=torch.float64) if time_span else None
    return x, reset, weights, dt


def _loss(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * torch.sin(y)).sum()


def _windowed(core: CfCCore, x, reset, weights, dt):
    """Run consecutive windows carrying the state; each window's loss is back-propagated on its own."""
    x = x.clone().requires_grad_(True)
    state = core.initial_state(B, dtype=torch.float64)
    outputs = []
    for k in range(WINDOWS):
        window = slice(k * WINDOW, (k + 1) * WINDOW)
        span = None if dt is None else dt[window]
        y, state = core(x[window], state, reset[window], time_span=span)
        _loss(y, weights[window]).backward()
        outputs.append(y.detach())
        assert all(not v.requires_grad for v in state.values())
    return torch.cat(outputs), x.grad, state


CASES = [
    # mode, backbone layers, activation, rank, sparsity, time spans
    ("default", 1, "lecun_tanh", None, 0.0, False),
    ("default", 0, "tanh", 2, 0.5, True),
    ("default", 2, "silu", 3, 0.3, False),
    ("no_gate", 1, "gelu", 2, 0.0, True),
    ("no_gate", 0, "tanh", None, 0.4, False),
    ("pure", 1, "relu", 1, 0.5, True),
    ("pure", 0, "lecun_tanh", 3, 0.0, False),
    ("pure", 2, "tanh", None, 0.2, False),
]


@pytest.mark.parametrize(("mode", "layers", "activation", "rank", "sparsity", "timed"), CASES)
def test_exact_rtrl_equals_full_sequence_bptt_for_every_parameter(mode, layers, activation, rank, sparsity, timed):
    options = dict(mode=mode, backbone_layers=layers, backbone_units=6, backbone_activation=activation,
                   rank=rank, sparsity=sparsity, mask_seed=7)
    reference = _perturbed(make_core(_spec("bptt", **options), input_size=D), seed=1)
    rtrl = make_core(_spec("rtrl", **options), input_size=D).double()
    rtrl.load_state_dict(reference.state_dict())
    x, reset, weights, dt = _sequence(seed=2, time_span=timed)

    y_ref, _ = reference(x, reference.initial_state(B, dtype=torch.float64), reset, time_span=dt)
    _loss(y_ref, weights).backward()
    y, _x_grad, state = _windowed(rtrl, x, reset, weights, dt)

    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-12, atol=1e-12)
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), rtrl.named_parameters()):
        assert p_ref.grad is not None and p_ref.grad.abs().max() > 1e-6, f"{name} gets no gradient"
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-11, msg=f"parameter {name}")
    assert set(state) == {"h"} | {f"sensitivity_{name}" for name, _ in rtrl.named_parameters()}


def test_carried_sensitivities_are_the_jacobian_of_the_state():
    options = dict(backbone_layers=1, backbone_units=4, rank=2, sparsity=0.5)
    core = _perturbed(make_core(_spec("rtrl", **options), input_size=D), seed=3)
    x, reset, _weights, _ = _sequence(seed=4)
    reset[:] = False
    reset[0] = True
    state = core.initial_state(B, dtype=torch.float64)
    for k in range(WINDOWS):
        window = slice(k * WINDOW, (k + 1) * WINDOW)
        _y, state = core(x[window], state, reset[window])

    names = [name for name, _ in core.named_parameters()]
    values = [p.detach().clone() for p in core.parameters()]

    def final_state(*params):
        return _run_functional(core, dict(zip(names, params)), x, reset)

    jacobians = torch.autograd.functional.jacobian(final_state, tuple(values), vectorize=True)
    for name, jacobian in zip(names, jacobians):
        # jacobian: [B, N, *shape]; the carried sensitivity has the same layout
        torch.testing.assert_close(state[f"sensitivity_{name}"], jacobian, rtol=1e-9, atol=1e-11, msg=name)


def _run_functional(core: CfCCore, overrides: dict, x, reset) -> torch.Tensor:
    """h_T of a bptt twin of ``core`` with the parameters given as tensors (for autograd's jacobian)."""
    twin = make_core({**_spec("bptt"), **_options_of(core)}, input_size=D).double()
    twin.load_state_dict(core.state_dict())
    y, _ = torch.func.functional_call(twin, overrides, (x, twin.initial_state(B, dtype=torch.float64), reset))
    return y[-1]


def _options_of(core: CfCCore) -> dict:
    o = core.options
    return dict(mode=o.mode, backbone_layers=o.backbone_layers, backbone_units=o.backbone_units,
                backbone_activation=o.backbone_activation, rank=o.rank, sparsity=o.sparsity, mask_seed=o.mask_seed)


@pytest.mark.parametrize(("grad", "encoder_grad"), [("rtrl", "window"), ("rtrl", "same_step"), ("snap1", "same_step")])
def test_input_gradients_follow_encoder_grad(grad, encoder_grad):
    """rtrl's window gradient is BPTT's within the window; same_step is exact in every mode (snap1's
    window gradient uses its diagonal adjoint, checked against the SnAp-1 oracle below)."""
    options = dict(backbone_layers=1, backbone_units=4, rank=2, sparsity=0.25, encoder_grad=encoder_grad)
    core = _perturbed(make_core(_spec(grad, **options), input_size=D), seed=5)
    reference = make_core(_spec("bptt", **options), input_size=D).double()
    reference.load_state_dict(core.state_dict())
    x, reset, weights, _ = _sequence(seed=6)
    _y, x_grad, _ = _windowed(core, x, reset, weights, None)

    # window: BPTT truncated at the window boundary; same_step: truncated after every step
    chunk = WINDOW if encoder_grad == "window" else 1
    x_ref = x.clone().requires_grad_(True)
    state = reference.initial_state(B, dtype=torch.float64)
    for t0 in range(0, WINDOWS * WINDOW, chunk):
        part = slice(t0, t0 + chunk)
        y, state = reference(x_ref[part], state, reset[part])
        _loss(y, weights[part]).backward()
    torch.testing.assert_close(x_grad, x_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad", ["rtrl", "snap1"])
def test_acting_without_grad_passes_sensitivities_through_untouched(grad):
    core = _perturbed(make_core(_spec(grad, rank=2, sparsity=0.5), input_size=D), seed=7)
    x, reset, _, _ = _sequence(seed=8)
    state = core.initial_state(B, dtype=torch.float64)
    with torch.no_grad():
        state = {k: v + 0.1 for k, v in state.items()}
        y, new_state = core(x[:WINDOW], state, reset[:WINDOW])
    for key, value in state.items():
        if key != "h":
            assert new_state[key] is value
    assert not torch.equal(new_state["h"], state["h"])
    assert y.shape == (WINDOW, B, N)


def test_the_cell_matches_the_ncps_equations_in_every_mode():
    """A dense cell (full rank, no mask) against the equations written out with one dense first layer."""
    for mode in ("default", "no_gate", "pure"):
        for layers in (0, 1):
            core = _perturbed(make_core(_spec("bptt", mode=mode, backbone_layers=layers), input_size=D), seed=9)
            generator = torch.Generator().manual_seed(10)
            x = torch.randn(1, B, D, generator=generator, dtype=torch.float64)
            h = torch.randn(B, N, generator=generator, dtype=torch.float64)
            dt = torch.rand(1, B, generator=generator, dtype=torch.float64) + 0.5
            y, _ = core(x, {"h": h}, torch.zeros(1, B, dtype=torch.bool), time_span=dt)
            torch.testing.assert_close(y[0], _ncps_cell(core, x[0], h, dt[0].unsqueeze(-1)), rtol=1e-12, atol=1e-12)


def _ncps_cell(core: CfCCore, x, h, ts):
    with torch.no_grad():
        first = torch.cat([core.input_weight, core.recurrent_u @ core.recurrent_v.T], dim=1)
        assert torch.all(core.recurrent_mask == 1)
        hidden = torch.cat([x, h], dim=1) @ first.T + core.input_bias
        if core.head is not None:
            hidden = 1.7159 * torch.tanh(0.666 * hidden)
            hidden = core.head(hidden)
        heads = hidden.view(B, -1, N)
        if core.mode == "pure":
            ff1 = heads[:, 0]
            return -core.amplitude * torch.exp(-ts * (core.tau.abs() + ff1.abs())) * ff1 + core.amplitude
        ff1, ff2 = torch.tanh(heads[:, 0]), torch.tanh(heads[:, 1])
        t_interp = torch.sigmoid(heads[:, 2] * ts + heads[:, 3])
        if core.mode == "no_gate":
            return ff1 + t_interp * ff2
        return ff1 * (1.0 - t_interp) + t_interp * ff2


# --------------------------------------------------------------------------------------------------
# SnAp-1


def _snap1_oracle(core: CfCCore, x, reset, weights, dt):
    """SnAp-1 by brute force: J̃_t = diag(D_t) J̃_{t−1} + I_t with D_t and I_t from autograd, every
    parameter tracked directly (U and V too); G = Σ_t e_tᵀ J̃_t; inputs get the diagonal adjoint."""
    twin = make_core({**_spec("bptt"), **_options_of(core)}, input_size=D).double()
    twin.load_state_dict(core.state_dict())
    names = [name for name, _ in twin.named_parameters()]
    values = [p.detach() for p in twin.parameters()]
    sens = {name: torch.zeros(B, N, *v.shape, dtype=torch.float64) for name, v in zip(names, values)}
    grads = {name: torch.zeros_like(v) for name, v in zip(names, values)}
    h = torch.zeros(B, N, dtype=torch.float64)
    errors, diagonals, input_jacobians = [], [], []
    envs = torch.arange(B)
    for t in range(x.shape[0]):
        span = None if dt is None else dt[t : t + 1]

        def step(h_prev, x_t, *params, t=t, span=span):
            y, _ = torch.func.functional_call(
                twin, dict(zip(names, params)), (x_t[None], {"h": h_prev}, reset[t : t + 1]), {"time_span": span}
            )
            return y[0]

        jacobian = torch.autograd.functional.jacobian(step, (h, x[t], *values), vectorize=True)
        diagonal = torch.diagonal(jacobian[0][envs, :, envs], dim1=1, dim2=2)  # [B, N]
        h = step(h, x[t], *values).detach()
        error = weights[t] * torch.cos(h)  # ∂ loss / ∂y_t
        for name, injection in zip(names, jacobian[2:]):
            sens[name] = diagonal.view(B, N, *([1] * (injection.dim() - 2))) * sens[name] + injection
            grads[name] += torch.tensordot(error, sens[name], dims=([0, 1], [0, 1]))
        errors.append(error)
        diagonals.append(diagonal)
        input_jacobians.append(jacobian[1][envs, :, envs])  # [B, N, D]
    x_grad = torch.zeros_like(x)
    for k in range(WINDOWS):
        adjoint = torch.zeros(B, N, dtype=torch.float64)
        for t in range((k + 1) * WINDOW - 1, k * WINDOW - 1, -1):
            later = diagonals[t + 1] if t + 1 < (k + 1) * WINDOW else torch.zeros_like(adjoint)
            adjoint = errors[t] + later * adjoint
            x_grad[t] = torch.einsum("bn,bnd->bd", adjoint, input_jacobians[t])
    return grads, x_grad


SNAP_CASES = [
    # mode, backbone layers, activation, rank, sparsity, time spans
    ("default", 1, "lecun_tanh", 2, 0.4, False),
    ("default", 0, "tanh", None, 0.0, True),
    ("no_gate", 2, "silu", 3, 0.0, False),
    ("pure", 1, "gelu", None, 0.3, True),
    ("pure", 0, "tanh", 2, 0.5, False),
]


@pytest.mark.parametrize(("mode", "layers", "activation", "rank", "sparsity", "timed"), SNAP_CASES)
def test_snap1_follows_the_diagonal_recursion_for_every_parameter(mode, layers, activation, rank, sparsity, timed):
    options = dict(mode=mode, backbone_layers=layers, backbone_units=4, backbone_activation=activation,
                   rank=rank, sparsity=sparsity, mask_seed=3)
    core = _perturbed(make_core(_spec("snap1", **options), input_size=D), seed=14)
    x, reset, weights, dt = _sequence(seed=15, time_span=timed)
    expected, expected_x_grad = _snap1_oracle(core, x, reset, weights, dt)
    _y, x_grad, _state = _windowed(core, x, reset, weights, dt)
    for name, param in core.named_parameters():
        assert expected[name].abs().max() > 1e-6, f"{name} gets no gradient"
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-11, msg=f"parameter {name}")
    torch.testing.assert_close(x_grad, expected_x_grad, rtol=1e-9, atol=1e-11)


def _diagonal_core(grad: str, mode: str) -> CfCCore:
    """No backbone and every head's recurrent block masked to its diagonal: D_t is exactly diagonal."""
    core = make_core(_spec(grad, mode=mode, backbone_layers=0, sparsity=0.5), input_size=D).double()
    core.recurrent_mask.copy_(torch.eye(N, dtype=torch.float64).repeat(core.num_heads, 1))
    return core


@pytest.mark.parametrize("mode", ["default", "pure"])
def test_snap1_equals_exact_rtrl_and_bptt_when_the_recurrent_jacobian_is_diagonal(mode):
    snap = _perturbed(_diagonal_core("snap1", mode), seed=16)
    exact = _diagonal_core("rtrl", mode)
    exact.load_state_dict(snap.state_dict())
    reference = _diagonal_core("bptt", mode)
    reference.load_state_dict(snap.state_dict())
    x, reset, weights, _ = _sequence(seed=17)
    y_ref, _ = reference(x, reference.initial_state(B, dtype=torch.float64), reset)
    _loss(y_ref, weights).backward()
    _windowed(snap, x, reset, weights, None)
    _windowed(exact, x, reset, weights, None)
    for (name, p_ref), p_snap, p_exact in zip(reference.named_parameters(), snap.parameters(), exact.parameters()):
        torch.testing.assert_close(p_snap.grad, p_ref.grad, rtol=1e-9, atol=1e-11, msg=f"snap1 {name}")
        torch.testing.assert_close(p_exact.grad, p_ref.grad, rtol=1e-9, atol=1e-11, msg=f"rtrl {name}")


def test_snap1_differs_from_the_exact_gradient_when_the_recurrence_mixes_units():
    options = dict(backbone_layers=1, backbone_units=4, rank=2, sparsity=0.25)
    snap = _perturbed(make_core(_spec("snap1", **options), input_size=D), seed=18)
    exact = make_core(_spec("rtrl", **options), input_size=D).double()
    exact.load_state_dict(snap.state_dict())
    x, reset, weights, _ = _sequence(seed=19)
    y_snap, _, _ = _windowed(snap, x, reset, weights, None)
    y_exact, _, _ = _windowed(exact, x, reset, weights, None)
    torch.testing.assert_close(y_snap, y_exact, rtol=1e-12, atol=1e-12)  # the same cell, other gradients
    for (name, p_snap), p_exact in zip(snap.named_parameters(), exact.parameters()):
        relative = (p_snap.grad - p_exact.grad).norm() / p_exact.grad.norm()
        assert relative > 1e-3, f"{name}: snap1 is indistinguishable from exact RTRL"


# --------------------------------------------------------------------------------------------------
# Low-rank, sparse recurrence


def test_recurrent_factors_hold_two_n_r_parameters_and_the_mask_has_density_one_minus_s():
    n, r, s = 64, 8, 0.7
    core = make_core({"name": "cfc", "hidden_size": n, "rank": r, "sparsity": s}, input_size=D)
    assert core.recurrent_u.numel() + core.recurrent_v.numel() == 2 * n * r
    assert "recurrent_mask" not in dict(core.named_parameters())
    mask = core.recurrent_mask
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    standard_error = math.sqrt(s * (1 - s) / mask.numel())
    assert abs(mask.mean().item() - (1 - s)) < 4 * standard_error
    assert torch.all(core.recurrent_weight()[mask == 0] == 0)
    low_rank = make_core({"name": "cfc", "hidden_size": n, "rank": r}, input_size=D).double()
    assert torch.linalg.matrix_rank(low_rank.recurrent_weight().detach()) == r
    # a non-square block (backbone of m units) holds (m + n)·r
    wide = make_core({"name": "cfc", "hidden_size": n, "rank": r, "backbone_units": 24}, input_size=D)
    assert wide.recurrent_u.numel() + wide.recurrent_v.numel() == (24 + n) * r
    # full rank and no sparsity: the dense cell
    dense = make_core({"name": "cfc", "hidden_size": n}, input_size=D).double()
    assert dense.rank == n and torch.all(dense.recurrent_mask == 1)
    assert torch.linalg.matrix_rank(dense.recurrent_weight().detach()) == n


def test_mask_comes_from_its_own_seed_and_survives_save_and_load():
    spec = {"name": "cfc", "hidden_size": 16, "rank": 4, "sparsity": 0.5}
    torch.manual_seed(0)
    a = make_core({**spec, "mask_seed": 1}, input_size=D)
    torch.manual_seed(1)  # other parameters, same mask
    b = make_core({**spec, "mask_seed": 1}, input_size=D)
    other = make_core({**spec, "mask_seed": 2}, input_size=D)
    assert torch.equal(a.recurrent_mask, b.recurrent_mask)
    assert not torch.equal(a.recurrent_mask, other.recurrent_mask)

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other.recurrent_mask, a.recurrent_mask)
    x = torch.randn(3, 2, D)
    reset = torch.zeros(3, 2, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(other(x, other.initial_state(2), reset)[0], a(x, a.initial_state(2), reset)[0])


def test_mask_stays_fixed_while_the_factors_learn():
    core = make_core(_spec("bptt", rank=2, sparsity=0.5), input_size=D)
    mask = core.recurrent_mask.clone()
    x, reset, weights, _ = _sequence(seed=11)
    y, _ = core(x.float(), core.initial_state(B), reset)
    _loss(y, weights.float()).backward()
    with torch.no_grad():  # a gradient step on every parameter
        for param in core.parameters():
            param -= 0.5 * param.grad
    assert torch.equal(core.recurrent_mask, mask)
    assert torch.all(core.recurrent_weight()[mask == 0] == 0)


@pytest.mark.parametrize(("rank", "sparsity"), [(4, 0.0), (16, 0.5), (64, 0.0), (32, 0.8)])
def test_spectral_init_sets_the_spectral_radius_whatever_rank_and_sparsity(rank, sparsity):
    n, target = 64, 0.9
    radii = []
    for seed in range(4):
        torch.manual_seed(seed)
        core = make_core({"name": "cfc", "hidden_size": n, "rank": rank, "sparsity": sparsity,
                          "spectral_radius": target, "mask_seed": seed}, input_size=D)
        radii.append(torch.linalg.eigvals(core.recurrent_weight().detach().double()).abs().max().item())
    assert sum(radii) / len(radii) == pytest.approx(target, rel=0.25)


def test_svd_init_splits_a_truncated_svd_evenly_between_the_factors():
    core = make_core({"name": "cfc", "hidden_size": 32, "rank": 6, "recurrent_init": "svd"}, input_size=D).double()
    u, v = core.recurrent_u.detach().double(), core.recurrent_v.detach().double()
    gram_u, gram_v = u.T @ u, v.T @ v
    torch.testing.assert_close(gram_u, gram_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram_u, torch.diag(torch.diagonal(gram_u)), rtol=1e-5, atol=1e-6)
    singular = torch.diagonal(gram_u)
    assert torch.all(singular[:-1] >= singular[1:])  # the r largest singular values, in order
    assert torch.linalg.matrix_rank(core.recurrent_weight().detach()) == 6


# --------------------------------------------------------------------------------------------------
# Configuration


def test_make_core_with_the_minimal_keys_in_every_mode():
    for grad in CfCCore.grad_modes:
        core = make_core({"name": "cfc", "hidden_size": 8, "grad": grad}, input_size=D)
        state = core.initial_state(2)
        y, state = core(torch.randn(3, 2, D), state, torch.zeros(3, 2, dtype=torch.bool))
        assert y.shape == (3, 2, 8) and core.output_size == 8


def test_rtrl_refuses_sensitivities_over_the_budget_and_names_the_cheaper_modes():
    core = make_core(_spec("rtrl", rtrl_budget_mb=0.01), input_size=D)
    floats = core.sensitivity_floats()
    assert floats == N * sum(p.numel() for p in core.parameters())
    batch_within = int(0.01 * 2**20 / (4 * floats))
    core.initial_state(batch_within)
    with pytest.raises(ConfigError, match=r"rtrl_budget_mb.*snap1.*bptt"):
        core.initial_state(batch_within + 1)
    state = make_core(_spec("rtrl"), input_size=D).initial_state(batch_within + 1)
    with pytest.raises(ConfigError, match="rtrl_budget_mb"):
        core(torch.randn(2, batch_within + 1, D), state, torch.zeros(2, batch_within + 1, dtype=torch.bool))
    # bptt keeps no sensitivities and never refuses
    make_core(_spec("bptt", rtrl_budget_mb=0.01), input_size=D).initial_state(10_000)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("mode", "liquid", "memory.mode must be one of default, no_gate, pure"),
        ("backbone_activation", "swish", "memory.backbone_activation must be one of"),
        ("recurrent_init", "orthogonal", "memory.recurrent_init must be one of spectral, svd"),
        ("sparsity", 1.0, r"memory.sparsity must be in \[0, 1\)"),
        ("rank", 0, "memory.rank must be a positive integer"),
        ("rank", 9, "memory.rank=9 exceeds"),
        ("backbone_layers", -1, "memory.backbone_layers"),
        ("spectral_radius", 0.0, "memory.spectral_radius"),
        ("colour", "red", "unknown key memory.colour"),
    ],
)
def test_bad_options_raise_config_errors_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        make_core({"name": "cfc", "hidden_size": 8, key: value}, input_size=D)


# --------------------------------------------------------------------------------------------------
# The engine's fan-out groups (rlmem.rtrl), which snap1 uses for parameters behind the backbone


class _MixedReadout(RTRLCell):
    """h = tanh(r ⊙ h₋₁ + C tanh(W x + b)): a diagonal recurrence whose W and b reach every unit through C.

    The Jacobian is exactly diagonal, so the engine with fan-out groups for W and b must be exact."""

    form, block_size = "real", 1
    param_names = ("W", "b", "C", "r")
    groups = (
        ParamGroup("W", u="through_C", v="x", matrix=True, fan_out=True),
        ParamGroup("b", u="through_C", fan_out=True),
        ParamGroup("C", u="slope", v="features", matrix=True),
        ParamGroup("r", u="slope", v="h_prev"),
    )

    def step(self, h_prev, inputs, params, coefficients):
        features = torch.tanh(inputs["x"] @ params["W"].T + params["b"])
        h = torch.tanh(params["r"] * h_prev + features @ params["C"].T)
        if not coefficients:
            return h, None
        slope = 1 - h * h
        through_c = slope.unsqueeze(-1) * params["C"] * (1 - features * features).unsqueeze(1)
        factors = {"through_C": through_c, "slope": slope, "features": features, "h_prev": h_prev, "x": inputs["x"]}
        return h, StepCoefficients(slope * params["r"], factors)


@pytest.mark.parametrize("window", [WINDOW, 1])  # 1: the one-step form, G = ⟨e_1, S_1⟩
def test_engine_fan_out_groups_equal_bptt_for_a_diagonal_recurrence_behind_a_mixing_layer(window):
    cell, units, hidden, inputs = _MixedReadout(), 4, 3, 2
    cell.check()
    generator = torch.Generator().manual_seed(12)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    params = {"W": rand(hidden, inputs), "b": rand(hidden), "C": rand(units, hidden), "r": 0.9 * rand(units)}
    x, reset, weights, _ = _sequence(seed=13)
    x, weights = x[..., :inputs], weights[..., :units]
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    h = torch.zeros(B, units, dtype=torch.float64)
    outputs = []
    for t in range(x.shape[0]):
        h, _ = cell.step(h * (~reset[t]).to(h.dtype).unsqueeze(-1), {"x": x[t]}, leaves, False)
        outputs.append(h)
    _loss(torch.stack(outputs), weights).backward()

    trained = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    h = torch.zeros(B, units, dtype=torch.float64)
    sens = zero_sensitivities(
        cell, B, units, {"W": inputs, "C": hidden}, "cpu", torch.float64, rows={"W": hidden, "b": hidden}
    )
    assert sens["W"].shape == (B, units, hidden, inputs) and sens["b"].shape == (B, units, hidden)
    for t0 in range(0, x.shape[0], window):
        steps = slice(t0, t0 + window)
        y, sens = rtrl_window(cell, h, sens, {"x": x[steps]}, trained, reset[steps])
        _loss(y, weights[steps]).backward()
        h = y[-1].detach()
    for name in params:
        torch.testing.assert_close(trained[name].grad, leaves[name].grad, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------------
# The benchmark entry point (`rlmem bench cfc`)


def test_bench_prints_every_mode_side_by_side(capsys):
    from rlmem.bench import cfc as bench

    bench.run(["--sizes", "4,6", "--ranks", "full,2", "--batch", "2", "--window", "3", "--input", "3",
               "--min-time", "0", "--budget-mb", "0.0115"])
    lines = capsys.readouterr().out.splitlines()
    assert "rtrl µs/step" in lines[1] and "snap1/bptt" in lines[1] and "bptt window/env" in lines[1]
    rows = [line.split() for line in lines[3:]]
    assert [(row[0], row[1]) for row in rows] == [("4", "full"), ("4", "2"), ("6", "full"), ("6", "2")]
    assert "over budget" in lines[5]  # n = 6: 12.4 KB of sensitivities at full rank, 10.1 KB at rank 2
    with pytest.raises(ConfigError, match="--modes"):
        bench.run(["--modes", "rtrl,tbptt"])
