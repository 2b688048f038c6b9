"""The RTRL engine against autograd BPTT, for each unit form, with toy cells that exercise it fully.

Every gradient test runs in float64: the sum over consecutive windows (state and sensitivities
carried, parameters fixed) of the engine's gradients must equal autograd's gradient through the whole
sequence in one graph, for every parameter, with episode resets at random positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from rlmem import rtrl
from rlmem.rtrl import (
    ParamGroup,
    RTRLCell,
    StepCoefficients,
    adjoint,
    gradients,
    rtrl_step,
    rtrl_window,
    run_cell,
    step_gradients,
    zero_sensitivities,
    zero_state,
)

DTYPE = torch.float64


class NonlinearDiagonal(RTRLCell):
    """k = 1: h = tanh(W x + r ⊙ h₋₁ + b)."""

    form, block_size = "real", 1
    param_names = ("W", "r", "b")
    groups = (
        ParamGroup("W", u="slope", v="x", matrix=True),
        ParamGroup("r", u="slope", v="h_prev"),
        ParamGroup("b", u="slope"),
    )

    def step(self, h_prev, inputs, params, coefficients):
        h = torch.tanh(inputs["x"] @ params["W"].t() + params["r"] * h_prev + params["b"])
        if not coefficients:
            return h, None
        slope = 1 - h * h
        return h, StepCoefficients(slope * params["r"], {"slope": slope, "h_prev": h_prev, "x": inputs["x"]})


class TracesAndColumns(RTRLCell):
    """k = 2 complex, FFM-like: units (i, j) of m traces × c columns, h_ij = exp(−e^{ρ_i} + iω_j) h₋₁ + (W x)_i.

    ρ and ω each act on a fixed set of units (a trace's row, a column), and W's row i feeds all units of
    trace i: the three groups reduce per-unit gradients to the parameters' shapes."""

    form, block_size = "complex", 2
    param_names = ("W", "rho", "omega")

    def __init__(self, traces: int, columns: int) -> None:
        m, c = traces, columns
        self.m, self.c = m, c
        self.groups = (
            ParamGroup("W", u="one", v="x", matrix=True, reduce=lambda g: g.reshape(m, c, -1).sum(1)),
            ParamGroup("rho", u="rho_injection", reduce=lambda g: g.reshape(m, c).sum(1)),
            ParamGroup("omega", u="omega_injection", reduce=lambda g: g.reshape(m, c).sum(0)),
        )

    def decay(self, params):
        magnitude = torch.exp(-torch.exp(params["rho"]))
        return torch.polar(magnitude[:, None].expand(self.m, self.c), params["omega"][None, :].expand(self.m, self.c))

    def step(self, h_prev, inputs, params, coefficients):
        rows = h_prev.shape[0]
        decay = self.decay(params).reshape(-1)
        drive = (inputs["x"] @ params["W"].t()).repeat_interleave(self.c, dim=-1)
        h = decay * h_prev + drive
        if not coefficients:
            return h, None
        decayed = decay * h_prev
        rate = torch.exp(params["rho"]).repeat_interleave(self.c)
        factors = {
            "one": torch.ones_like(h),
            "x": inputs["x"],
            "rho_injection": -rate * decayed,
            "omega_injection": 1j * decayed,
        }
        return h, StepCoefficients(decay.expand(rows, -1), factors)


class CoupledPair(RTRLCell):
    """k = 2 general blocks: per unit (p, q), p = tanh(W x + r ⊙ p₋₁ + s ⊙ q₋₁), q = λ q₋₁ + (1 − λ) p, λ = σ(ℓ)."""

    form, block_size = "block", 2
    param_names = ("W", "r", "s", "leak")
    groups = (
        ParamGroup("W", u="pre", v="x", matrix=True),
        ParamGroup("r", u="pre", v="p_prev"),
        ParamGroup("s", u="pre", v="q_prev"),
        ParamGroup("leak", u="leak_injection"),
    )

    def step(self, h_prev, inputs, params, coefficients):
        p_prev, q_prev = h_prev.unbind(-1)
        lam = torch.sigmoid(params["leak"])
        p = torch.tanh(inputs["x"] @ params["W"].t() + params["r"] * p_prev + params["s"] * q_prev)
        q = lam * q_prev + (1 - lam) * p
        h = torch.stack([p, q], dim=-1)
        if not coefficients:
            return h, None
        slope = 1 - p * p
        pre = torch.stack([slope, (1 - lam) * slope], dim=-1)  # ∂(p, q)/∂ pre-activation of p
        jacobian = torch.stack(
            [
                torch.stack([slope * params["r"], slope * params["s"]], dim=-1),
                torch.stack([(1 - lam) * slope * params["r"], lam + (1 - lam) * slope * params["s"]], dim=-1),
            ],
            dim=-2,
        )
        leak = torch.stack([torch.zeros_like(p), lam * (1 - lam) * (q_prev - p)], dim=-1)
        factors = {"pre": pre, "x": inputs["x"], "p_prev": p_prev, "q_prev": q_prev, "leak_injection": leak}
        return h, StepCoefficients(jacobian, factors)


def make_case(kind: str, D: int = 3, N: int = 4, seed: int = 0):
    """(cell, units, params, matrix columns) for each toy cell."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=DTYPE) * scale).requires_grad_()

    if kind == "real":
        params = {"W": randn(N, D), "r": randn(N, scale=0.9), "b": randn(N)}
        return NonlinearDiagonal(), N, params, {"W": D}
    if kind == "complex":
        m, c = 3, 2
        params = {"W": randn(m, D), "rho": randn(m), "omega": randn(c, scale=1.0)}
        return TracesAndColumns(m, c), m * c, params, {"W": D}
    params = {"W": randn(N, D), "r": randn(N, scale=0.9), "s": randn(N, scale=0.9), "leak": randn(N)}
    return CoupledPair(), N, params, {"W": D}


KINDS = ("real", "complex", "block")


def bptt_gradients(cell, params, x, reset, weights, h0):
    """Autograd through the whole sequence in one graph."""
    h_seq = run_cell(cell, h0, {"x": x}, params, reset)
    loss = (h_seq * weights).sum() + (h_seq**2).sum() * 0.1
    return torch.autograd.grad(loss, list(params.values()))


def windows_of(lengths):
    bounds, t = [], 0
    for length in lengths:
        bounds.append((t, t + length))
        t += length
    return bounds


@pytest.fixture(params=[None, 2], ids=["whole", "chunks_of_2"])
def chunk_steps(request, monkeypatch):
    """Run each test with the window Function's default chunking and with chunks of 2 steps, so that
    the chunk boundaries (S composed across chunks, the adjoint carried back) are exercised."""
    if request.param is not None:
        monkeypatch.setattr(rtrl, "CHUNK_STEPS", request.param)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch, lengths", [(1, [1, 1, 1, 1, 1]), (3, [4, 1, 7, 2]), (5, [9, 3])])
def test_window_gradients_sum_to_bptt(kind, batch, lengths, chunk_steps):
    cell, N, params, columns = make_case(kind)
    cell.check()
    T = sum(lengths)
    g = torch.Generator().manual_seed(batch * 31 + T)
    x = torch.randn(T, batch, 3, generator=g, dtype=DTYPE)
    reset = torch.rand(T, batch, generator=g) < 0.25
    h0 = zero_state(cell, batch, N, "cpu", DTYPE)
    weights = torch.randn(T, *h0.shape, generator=g, dtype=DTYPE)
    expected = bptt_gradients(cell, params, x, reset, weights, h0)

    h, S = h0, zero_sensitivities(cell, batch, N, columns, "cpu", DTYPE)
    totals = [torch.zeros_like(p) for p in params.values()]
    for t0, t1 in windows_of(lengths):
        h_seq, S = rtrl_window(cell, h, S, {"x": x[t0:t1]}, params, reset[t0:t1])
        loss = (h_seq * weights[t0:t1]).sum() + (h_seq**2).sum() * 0.1
        for total, grad in zip(totals, torch.autograd.grad(loss, list(params.values()))):
            total += grad
        h = h_seq[-1].detach()
    for name, total, want in zip(params, totals, expected):
        torch.testing.assert_close(total, want, rtol=1e-9, atol=1e-11, msg=f"{kind}: parameter {name}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("encoder_grad", ["window", "same_step"])
def test_input_gradients(kind, encoder_grad, chunk_steps):
    cell, N, params, columns = make_case(kind, seed=1)
    T, B = 6, 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, 3, generator=g, dtype=DTYPE, requires_grad=True)
    reset = torch.rand(T, B, generator=g) < 0.3
    h0 = torch.randn(zero_state(cell, B, N, "cpu", DTYPE).shape, generator=g, dtype=DTYPE)
    S0 = {
        k: torch.randn(s.shape, generator=g, dtype=DTYPE)
        for k, s in zero_sensitivities(cell, B, N, columns, "cpu", DTYPE).items()
    }
    weights = torch.randn(T, *h0.shape, generator=g, dtype=DTYPE)

    h_seq, _ = rtrl_window(cell, h0, S0, {"x": x}, params, reset, encoder_grad)
    (got,) = torch.autograd.grad((h_seq * weights).sum(), [x])

    if encoder_grad == "window":
        (want,) = torch.autograd.grad((run_cell(cell, h0, {"x": x}, params, reset) * weights).sum(), [x])
    else:
        # Same step only: each step sees its h_{t-1} as a constant.
        h_prev = torch.cat([h0.unsqueeze(0), h_seq[:-1].detach()])
        want = torch.zeros_like(x)
        for t in range(T):
            h_t = run_cell(cell, h_prev[t], {"x": x[t : t + 1]}, params, reset[t : t + 1])
            want += torch.autograd.grad((h_t * weights[t : t + 1]).sum(), [x])[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def direct_contraction(cell: RTRLCell, kind: str, error: Tensor, S: Tensor) -> Tensor:
    """Σ_b ⟨e[b, i], S[b, i, :, j]⟩ for the matrix group W, written out per unit form (then reduced)."""
    if kind == "real":
        per_unit = torch.einsum("bi,bij->ij", error, S)
    elif kind == "complex":
        e, s = torch.view_as_complex(error.contiguous()), torch.view_as_complex(S.contiguous())
        per_unit = torch.einsum("bi,bij->ij", e.conj(), s).real
    else:
        per_unit = torch.einsum("bik,bikj->ij", error, S)
    reduce = cell.groups[0].reduce
    return per_unit if reduce is None else reduce(per_unit)


@pytest.mark.parametrize("kind", KINDS)
def test_per_step_form_equals_the_window_form(kind, chunk_steps):
    """Stepping recursion (1) and accumulating ⟨e_t, S_t⟩ step by step (from S_{t-1} and the coefficients,
    and from S_t directly) gives the window's S_T and G."""
    cell, N, params, columns = make_case(kind, seed=2)
    B, T = 4, 6
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, B, 3, generator=g, dtype=DTYPE)
    reset = torch.rand(T, B, generator=g) < 0.3
    h0 = torch.randn(zero_state(cell, B, N, "cpu", DTYPE).shape, generator=g, dtype=DTYPE)
    S0 = {
        k: torch.randn(s.shape, generator=g, dtype=DTYPE)
        for k, s in zero_sensitivities(cell, B, N, columns, "cpu", DTYPE).items()
    }
    errors = torch.randn(T, *h0.shape, generator=g, dtype=DTYPE)

    h_seq, S_T = rtrl_window(cell, h0, S0, {"x": x}, params, reset)
    window_grads = dict(zip(params, torch.autograd.grad((h_seq * errors).sum(), list(params.values()))))

    fixed = {k: p.detach() for k, p in params.items()}
    h, S = h0, S0
    step_grads = {k: torch.zeros_like(p) for k, p in fixed.items()}
    from_S_t = {k: torch.zeros_like(p) for k, p in fixed.items()}
    direct = torch.zeros_like(fixed["W"])
    with torch.no_grad():
        for t in range(T):
            h_next, S_next, coefficients = rtrl_step(cell, h, S, {"x": x[t : t + 1]}, fixed, reset[t : t + 1])
            torch.testing.assert_close(h_next, h_seq[t].detach(), rtol=1e-12, atol=1e-14)
            step = gradients(cell, S, coefficients, adjoint(cell, coefficients, errors[t : t + 1]))
            for name, grad in step.items():
                step_grads[name] += grad
            for name, grad in step_gradients(cell, S_next, errors[t]).items():
                from_S_t[name] += grad
            direct += direct_contraction(cell, kind, errors[t], S_next["W"])
            h, S = h_next, S_next
    for name in S_T:
        torch.testing.assert_close(S[name], S_T[name], rtol=1e-10, atol=1e-12)
    for name in params:
        torch.testing.assert_close(step_grads[name], window_grads[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(from_S_t[name], window_grads[name], rtol=1e-10, atol=1e-12)
    # G of the matrix group is also ⟨e_t, S_t⟩ contracted directly from the recursion's S_t.
    torch.testing.assert_close(direct, window_grads["W"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_sensitivities_right_after_a_reset_hold_only_that_step(kind):
    """A reset zeroes S before the step: S_T is then the step's own injection, whatever S_0 was."""
    cell, N, params, columns = make_case(kind, seed=3)
    B, T = 3, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, 3, generator=g, dtype=DTYPE)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[-1, 1] = True
    h0 = torch.randn(zero_state(cell, B, N, "cpu", DTYPE).shape, generator=g, dtype=DTYPE)
    S0 = {
        k: torch.randn(s.shape, generator=g, dtype=DTYPE)
        for k, s in zero_sensitivities(cell, B, N, columns, "cpu", DTYPE).items()
    }
    with torch.no_grad():
        _, S_T = rtrl_window(cell, h0, S0, {"x": x}, params, reset)
        zero = zero_sensitivities(cell, 1, N, columns, "cpu", DTYPE)
        _, fresh = rtrl_window(cell, torch.zeros_like(h0[:1]), zero, {"x": x[-1:, 1:2]}, params, reset[-1:, 1:2])
    for name in S_T:
        torch.testing.assert_close(S_T[name][1:2], fresh[name], rtol=1e-12, atol=1e-14)
        # The env that did not reset still carries its history.
        assert not torch.allclose(S_T[name][0], fresh[name][0])


def test_saved_memory_grows_with_window_only_by_per_step_coefficients():
    """What the window Function keeps for backward is O(T·B·(N·k + D)), never O(T·|S|)."""
    cell, N, _, _ = make_case("real")
    D, N, B = 48, 40, 2
    params = {
        "W": torch.randn(N, D, dtype=DTYPE, requires_grad=True),
        "r": torch.rand(N, dtype=DTYPE, requires_grad=True),
        "b": torch.zeros(N, dtype=DTYPE, requires_grad=True),
    }

    def saved_elements(T: int) -> int:
        storages: dict[int, int] = {}

        def pack(t: Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        x = torch.randn(T, B, D, dtype=DTYPE, requires_grad=True)
        S0 = zero_sensitivities(cell, B, N, {"W": D}, "cpu", DTYPE)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rtrl_window(cell, torch.zeros(B, N, dtype=DTYPE), S0, {"x": x}, params, torch.zeros(T, B, dtype=torch.bool))
        return sum(storages.values())

    small, large = saved_elements(8), saved_elements(72)
    per_step_per_env = (large - small) / (64 * B)
    sensitivity_per_env = N * D + 2 * N
    assert per_step_per_env <= 2 * (N + D), per_step_per_env  # x_t and h_t
    assert per_step_per_env < sensitivity_per_env / 10


def test_no_grad_window_returns_the_same_states():
    cell, N, params, columns = make_case("block", seed=4)
    B, T = 2, 6
    x = torch.randn(T, B, 3, dtype=DTYPE)
    reset = torch.zeros(T, B, dtype=torch.bool)
    h0 = zero_state(cell, B, N, "cpu", DTYPE)
    S0 = zero_sensitivities(cell, B, N, columns, "cpu", DTYPE)
    h_seq, _ = rtrl_window(cell, h0, S0, {"x": x}, params, reset)
    with torch.no_grad():
        plain = run_cell(cell, h0, {"x": x}, params, reset)
    torch.testing.assert_close(h_seq.detach(), plain, rtol=0, atol=0)


def test_cell_descriptions_are_checked():
    class Missing(NonlinearDiagonal):
        groups = NonlinearDiagonal.groups[:2]

    with pytest.raises(ValueError, match="exactly one group"):
        Missing().check()
    with pytest.raises(ValueError, match="needs a factor v"):
        ParamGroup("W", u="slope", matrix=True)


def test_backward_working_memory_does_not_grow_with_the_window(monkeypatch):
    """The backward's recomputation exists for one chunk at a time: the peak of what its graph holds
    is the same for a window of 4 chunks as for one."""
    import weakref

    monkeypatch.setattr(rtrl, "CHUNK_STEPS", 8)
    cell, N, params, columns = make_case("real", D=16, N=24)

    def backward_peak(T: int) -> int:
        live, peak = [0], [0]

        def pack(t: Tensor) -> Tensor:
            size = t.numel() * t.element_size()
            live[0] += size
            peak[0] = max(peak[0], live[0])
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - size))
            return t

        x = torch.randn(T, 3, 16, dtype=DTYPE, requires_grad=True)
        S0 = zero_sensitivities(cell, 3, N, columns, "cpu", DTYPE)
        h_seq, _ = rtrl_window(
            cell, zero_state(cell, 3, N, "cpu", DTYPE), S0, {"x": x}, params, torch.zeros(T, 3, dtype=torch.bool)
        )
        loss = h_seq.square().sum()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss.backward()
        return peak[0]

    one_chunk, four_chunks = backward_peak(8), backward_peak(32)
    assert one_chunk > 0
    assert four_chunks <= 1.25 * one_chunk, (one_chunk, four_chunks)


@pytest.mark.parametrize("name", ["elstm", "lru", "ffm"])
def test_one_step_windows_run_under_vmap_for_per_env_gradients(name):
    """torch.func.vmap over envs of the gradient through a T = 1 RTRL window (carried sensitivities, one
    env resetting) gives each env's own gradient, as a batch of that env alone does. (Longer windows
    read the reset flags on the host to skip steps, which vmap cannot trace.)"""
    from rlmem.memory import make_core

    torch.manual_seed(0)
    core = make_core({"name": name, "hidden_size": 4, "grad": "rtrl"}, input_size=3).double()
    T, B = 1, 4
    x = torch.randn(T, B, 3, dtype=torch.float64)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[0, 2] = True
    _, state = core(torch.randn(3, B, 3, dtype=torch.float64), core.initial_state(B, dtype=torch.float64),
                    torch.zeros(3, B, dtype=torch.bool))  # carry non-zero sensitivities in
    params = {n: p.detach() for n, p in core.named_parameters()}

    def loss(params, x_env, state_env, reset_env):
        y, _ = torch.func.functional_call(core, params, (x_env[:, None], {k: v[None] for k, v in state_env.items()},
                                                        reset_env[:, None]))
        return y.pow(2).sum()

    per_env = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1, 0, 1))(params, x, state, reset)
    for b in range(B):
        y, _ = core(x[:, b : b + 1], {k: v[b : b + 1] for k, v in state.items()}, reset[:, b : b + 1])
        alone = torch.autograd.grad(y.pow(2).sum(), list(core.parameters()))
        for (param_name, _), expected in zip(core.named_parameters(), alone):
            torch.testing.assert_close(per_env[param_name][b], expected, msg=f"{param_name}, env {b}")


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_windows_of_stacked_members_under_vmap(kind):
    """A population's way: vmap over the members' stacked parameters, inputs and carried state, and
    autograd from outside (where, inside vmap, ``requires_grad`` reads False on every batched tensor).
    Each member's h_1, S_1 and parameter gradients are its window's alone, and its inputs' gradient is
    the step's own, as autograd through that one step gives it."""
    members, B = 3, 2
    cases = [make_case(kind, seed=seed) for seed in range(members)]
    cell, N, _, columns = cases[0]
    stacked = {name: torch.stack([case[2][name].detach() for case in cases]).requires_grad_() for name in cases[0][2]}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(members, 1, B, 3, generator=g, dtype=DTYPE, requires_grad=True)
    reset = torch.zeros(members, 1, B, dtype=torch.bool)
    reset[1, 0, 0] = True
    h0 = torch.randn(members, *zero_state(cell, B, N, "cpu", DTYPE).shape, generator=g, dtype=DTYPE)
    S0 = {k: torch.randn(members, *s.shape, generator=g, dtype=DTYPE)
          for k, s in zero_sensitivities(cell, B, N, columns, "cpu", DTYPE).items()}
    weights = torch.randn(members, 1, *h0.shape[1:], generator=g, dtype=DTYPE)

    def window(params, x, h0, S0, reset):
        return rtrl_window(cell, h0, S0, {"x": x}, params, reset)

    def loss(h_seq, weights):
        return (h_seq * weights).sum() + (h_seq**2).sum() * 0.1

    h_seq, S1 = torch.func.vmap(window)(stacked, x, h0, S0, reset)
    got = torch.autograd.grad(loss(h_seq, weights), [x, *stacked.values()])
    for m in range(members):
        params = {name: p[m].detach().requires_grad_() for name, p in stacked.items()}
        x_alone = x[m].detach().requires_grad_()
        h_alone, S_alone = window(params, x_alone, h0[m], {k: s[m] for k, s in S0.items()}, reset[m])
        want = torch.autograd.grad(loss(h_alone, weights[m]), list(params.values()))
        torch.testing.assert_close(h_seq[m], h_alone, rtol=1e-12, atol=1e-14)
        for k, s in S_alone.items():
            torch.testing.assert_close(S1[k][m], s, rtol=1e-12, atol=1e-14, msg=f"S of {k}, member {m}")
        for name, grad_got, grad_want in zip(params, got[1:], want):
            torch.testing.assert_close(grad_got[m], grad_want, rtol=1e-10, atol=1e-12, msg=f"{name}, member {m}")
        (x_want,) = torch.autograd.grad(loss(run_cell(cell, h0[m], {"x": x_alone}, params, reset[m]), weights[m]),
                                        [x_alone])
        torch.testing.assert_close(got[0][m], x_want, rtol=1e-10, atol=1e-12, msg=f"inputs, member {m}")
