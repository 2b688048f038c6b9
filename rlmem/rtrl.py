"""Exact real-time recurrent learning (RTRL) for recurrences with a block-diagonal Jacobian.

The recursion
-------------
A core's recurrent state h_t has N units, each a block of k reals. Its step
``h_t = φ(m_t ⊙ h_{t-1}, x_t; θ)``, where ``m_t[b] = 0`` if env b resets before step t and 1
otherwise, couples each unit only to itself across time:

    A_t[b, i] = ∂h_t[b, i] / ∂h_{t-1}[b, i]                                   (k × k)

and every parameter group p (a tensor θ_p whose row i acts on unit i, or on a fixed set of units)
enters a step through a rank-one injection, the step's own derivative at fixed h_{t-1}:

    ∂h_t[b, i] / ∂θ_p[i, j] = u_t^p[b, i] v_t^p[b, j]     matrix group, θ_p [N, D_p], u ∈ R^k
    ∂h_t[b, i] / ∂θ_p[i]    = u_t^p[b, i] v_t^p[b, i]     vector group, θ_p [N]  (v = 1 if absent)

The sensitivities S_t^p = dh_t/dθ_p (total derivatives, through all earlier steps) then follow

    S_t^p = m_t A_t S_{t-1}^p + u_t^p ⊗ v_t^p                                           (1)

and a loss L = Σ_t ℓ_t(h_t) has the exact, untruncated gradient

    G^p = Σ_t Σ_b ⟨e_t[b, i], S_t^p[b, i, :, j]⟩,      e_t = ∂ℓ_t/∂h_t (the same-step error).    (2)

Evaluating (1)-(2) over a window
--------------------------------
A window t = 1..T starts from the carried sensitivities S_0. Write Ã_t = m_t A_t. Unrolling (1),

    S_T = Φ_0 S_0 + Σ_t Φ_t (u_t ⊗ v_t),        Φ_t = Ã_T ··· Ã_{t+1}   (Φ_T = I),          (3)

and substituting (1) into (2) and exchanging the sums over t,

    G^p = Σ_t Σ_b ⟨δ_t[b, i], u_t^p[b, i]⟩ v_t^p[b, j]  +  Σ_b ⟨Ã_1ᵀ δ_1, S_0^p⟩[i, j],
    δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1},   δ_{T+1} = 0                                              (4)

where δ_t is the error on h_t from steps t..T of the window (the adjoint). (3) and (4) are (1) and
(2) exactly, not an approximation: forward-mode across windows (S carried), reverse-mode inside one.
They cost what stepping (1) costs, O(T·B·N·k·D_p) per matrix group, but as one batched matrix
product per group and direction instead of T memory-bound passes over S. T = 1 is the per-step form
(1)-(2) itself, which streaming learners use (:func:`rtrl_step` gives S_t, :func:`gradients` ⟨e_t, S_t⟩).

The same adjoint gives the gradient of the window's inputs: ∂L/∂x_t = (∂h_t/∂x_t)ᵀ δ_t, or, with
``encoder_grad="same_step"``, (∂h_t/∂x_t)ᵀ e_t.

Unit forms
----------
``"real"``    k = 1: A [B, N] real; state [B, N]; S [B, N, D_p] / [B, N].
``"complex"`` k = 2 as one complex number (complex-diagonal cores: LRU, RTU, FFM): A [B, N] complex.
              In the state, complex tensors are stored as real pairs (last dim 2): h [B, N, 2],
              S [B, N, D_p, 2] / [B, N, 2]. The real-pair inner product is ⟨a, b⟩ = Re(conj(a) b)
              and Aᵀ is multiplication by conj(A).
``"block"``   general k × k blocks (a coupled pair such as CCN's (h, c)): A [B, N, k, k];
              state [B, N, k]; S [B, N, k, D_p] / [B, N, k].

Parameters behind a mixing layer (real form): a group may *fan out*, when θ_p's R rows act on every
unit at once (e.g. a layer before a dense readout into the units). Each unit then keeps a sensitivity
to the whole parameter, and the injection has one value per unit and parameter row:

    ∂h_t[b, i] / ∂θ_p[r, j] = u_t^p[b, i, r] v_t^p[b, j]     fan-out matrix group, θ_p [R, D_p]
    ∂h_t[b, i] / ∂θ_p[r]    = u_t^p[b, i, r] v_t^p[b, r]     fan-out vector group, θ_p [R]

with S^p [B, N, R, D_p] or [B, N, R]; (1)-(4) hold as written, with A acting on each unit's slice. With
a diagonal A that is the exact recursion of a diagonal core, and for a core whose true Jacobian is
not diagonal it is SnAp-1 (A = the Jacobian's diagonal; the sensitivities keep the sparsity pattern
of one step's injection).

A complex parameter θ = θ_re + i θ_im on which h depends holomorphically (∂h/∂θ_im = i ∂h/∂θ_re; e.g.
the LRU's input matrix) needs one complex sensitivity, not two real ones: with u ⊗ v = ∂h/∂θ_re,
the group's gradient w = Σ conj(e) S gives ∂L/∂θ_re = Re w and ∂L/∂θ_im = −Im w.

How a core plugs in
-------------------
A core describes its cell with an :class:`RTRLCell` (unit form, block size, parameter groups, and
a ``step`` that returns h_t and, on request, A_t and the named factors that the groups use as u and
v) and calls :func:`rtrl_window`, an autograd Function: forward runs the cell over the window
without a graph and returns h_1..h_T and S_T; backward recomputes the per-step coefficients by
evaluating the step over many rows at once, runs the adjoint (4), and returns the inputs' gradients
and G. It saves only the window's inputs, h_0, S_0 and h_1..h_T, so what it keeps beyond the carried
state is O(T·B·(N·k + D)), never O(T·|S|); and it walks the window in chunks of ``CHUNK_STEPS``
steps ((3) composes over chunks; the adjoint crosses a chunk boundary as one vector), so its working
memory for coefficients and the recomputation does not grow with T either. ``prepare`` must
therefore treat steps independently. The functions :func:`advance` (3) and :func:`gradients` (4) on
:class:`WindowCoefficients` are the pieces a fused kernel replaces: for CUDA tensors they (and the
adjoint) run the CUDA kernels of the ``kernels`` package when it can (see ``kernels.available``).

A one-step window, the streaming learners' case, needs no Function: S_1 is (1) itself, and

    h_1 + Σ_p ⟨S_1^p, θ_p − sg(θ_p)⟩          (sg(θ): θ's value, without gradient)

equals h_1 while its gradient in θ_p is S_1^p, so autograd returns (2) exactly, and the inputs the
step's own partial, which δ_1 = e_1 makes the window's (:func:`_one_step_window`). Being ordinary
ops, it runs under torch.func.vmap at no more than their cost (populations, per-env gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import kernels

UNIT_FORMS = ("real", "complex", "block")
ENCODER_GRAD_MODES = ("window", "same_step")
# The window Function handles this many steps at a time: per-step coefficients (and the backward's
# recomputation graph) exist for one chunk only, so its working memory does not grow with T.
CHUNK_STEPS = 64


# --------------------------------------------------------------------------------------------------
# Describing a cell


@dataclass(frozen=True)
class ParamGroup:
    """One parameter group p of recursion (1): its injection u ⊗ v and the parameters it trains.

    Attributes:
        name: the group's name; its sensitivity is ``sensitivities[name]``.
        u: name of the step factor giving u_t^p: [B, N] (real / complex form) or [B, N, k] (block).
        v: name of the step factor giving v_t^p ([B, D_p] for a matrix group, [B, N] for a vector
            group, real in every form), or None for v = 1 (vector groups only).
        matrix: True for θ_p[i, j] (gradient [N, D_p]), False for θ_p[i] (gradient [N]).
        params: the parameter names that receive the group's gradient: one name, or (real part,
            imaginary part) with ``complex_param``. Default: ``(name,)``.
        complex_param: θ_p is complex and h is holomorphic in it (complex form only); u ⊗ v is the
            derivative with respect to its real part.
        reduce: maps the per-unit gradient ([N, D_p] or [N]) to the parameters' shape, for groups
            whose parameter rows act on a fixed set of units (e.g. one decay per FFM trace shared by
            all columns of that trace: reshape and sum). Default: identity.
        fan_out: θ_p's R rows act on every unit (real form only): u is [B, N, R], v is [B, D_p]
            (matrix) or [B, R] / None (vector), and S is [B, N, R, D_p] or [B, N, R]; the gradient
            is [R, D_p] or [R]. Default: False.
    """

    name: str
    u: str
    v: str | None = None
    matrix: bool = False
    params: tuple[str, ...] = ()
    complex_param: bool = False
    reduce: Callable[[Tensor], Tensor] | None = None
    fan_out: bool = False

    def __post_init__(self) -> None:
        if not self.params:
            object.__setattr__(self, "params", (self.name,))
        if len(self.params) != (2 if self.complex_param else 1):
            raise ValueError(f"group {self.name!r}: a complex parameter names (real, imaginary) parameters")
        if self.matrix and self.v is None:
            raise ValueError(f"matrix group {self.name!r} needs a factor v")

    def parameter_gradients(self, grad: Tensor) -> dict[str, Tensor]:
        """The trained parameters' gradients from the group's per-unit gradient G^p ([N, D_p] or [N];
        complex in the complex form): ``reduce`` applied, then the real part, or with
        ``complex_param`` (Re G, −Im G) for (θ_re, θ_im)."""
        if self.reduce is not None:
            grad = self.reduce(grad)
        if self.complex_param:
            return {self.params[0]: grad.real, self.params[1]: -grad.imag}
        return {self.params[0]: grad.real if grad.is_complex() else grad}


class StepCoefficients(NamedTuple):
    """What one step supplies to the recursion (leading dim: the rows of the step, usually B)."""

    jacobian: Tensor  # A_t: [B, N] (real / complex) or [B, N, k, k] (block), before the reset mask
    factors: dict[str, Tensor]  # the named u and v factors of the parameter groups


class RTRLCell:
    """A recurrent cell in the form recursion (1) needs. Subclasses set the class attributes.

    ``step`` is a pure function of its arguments, row-wise over its leading dim (so the engine can
    evaluate it over all T·B rows of a window at once), written with ordinary differentiable ops
    (the engine recomputes it under autograd for the inputs' gradients; ``bptt`` mode runs it so).
    """

    form: str = "real"
    block_size: int = 1  # k
    groups: tuple[ParamGroup, ...] = ()
    input_names: tuple[str, ...] = ("x",)  # the window inputs, each [T, B, ...]
    param_names: tuple[str, ...] = ()  # every parameter the step uses; each trained by one group

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Work done once for many steps (e.g. the input projections as one matrix product). Must
        treat steps independently: the engine calls it on whole windows or on chunks of them.
        Returns the per-step inputs of ``step``, each [T, B, ...]. Default: ``inputs``."""
        return dict(inputs)

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        """h_t from h_{t-1} (already reset) and the step's prepared inputs; with ``coefficients``
        also A_t and the factors. ``h_prev``: [B, N] (real), [B, N] complex, or [B, N, k] (block)."""
        raise NotImplementedError

    def check(self) -> None:
        """Validate the description (called once by cores at construction)."""
        if self.form not in UNIT_FORMS:
            raise ValueError(f"unit form {self.form!r}; valid choices: {', '.join(UNIT_FORMS)}")
        expected = {"real": 1, "complex": 2}.get(self.form, self.block_size)
        if self.block_size != expected:
            raise ValueError(f"form {self.form!r} has block size {expected}, got {self.block_size}")
        trained = [name for group in self.groups for name in group.params]
        if sorted(trained) != sorted(self.param_names):
            raise ValueError(f"every parameter must be trained by exactly one group: {trained} vs {self.param_names}")
        for group in self.groups:
            if group.complex_param and self.form != "complex":
                raise ValueError(f"group {group.name!r}: complex parameters need the complex form")
            if group.fan_out and self.form != "real":
                raise ValueError(f"group {group.name!r}: fan-out groups need the real form")


# --------------------------------------------------------------------------------------------------
# The algebra of one unit form: how A acts on unit vectors and on sensitivities.


def _keep(reset: Tensor, like: Tensor, trailing: int) -> Tensor:
    """The mask m = 1 − reset [T, B] (or [B]) shaped to broadcast against ``like``'s unit dims."""
    keep = (~reset).to(like.real.dtype if like.is_complex() else like.dtype)
    return keep.view(*keep.shape, *([1] * trailing))


def _act(cell: RTRLCell, A: Tensor, x: Tensor, matrix: bool) -> Tensor:
    """A x for unit vectors x ([..., N(, k)]) or, with ``matrix``, sensitivities [..., N(, k), D]."""
    if cell.form == "block":
        return A @ x if matrix else (A @ x.unsqueeze(-1)).squeeze(-1)
    return A.unsqueeze(-1) * x if matrix else A * x


def _act_transpose(cell: RTRLCell, A: Tensor, x: Tensor) -> Tensor:
    """Aᵀ x for unit vectors x: the adjoint's step."""
    if cell.form == "block":
        return (A.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1)
    return A.conj() * x if cell.form == "complex" else A * x


def _inner(cell: RTRLCell, a: Tensor, b: Tensor, matrix: bool) -> Tensor:
    """⟨a, b⟩ per unit, over the block's components: a [..., N(, k)], b like a or [..., N(, k), D].

    In the complex form the result is complex, conj(a)·b; its real part is the real-pair product."""
    if cell.form == "block":
        return (a.unsqueeze(-1) * b).sum(-2) if matrix else (a * b).sum(-1)
    a = a.conj() if cell.form == "complex" else a
    return a.unsqueeze(-1) * b if matrix else a * b


def _act_on_sensitivity(cell: RTRLCell, A: Tensor, S: Tensor, group: ParamGroup) -> Tensor:
    """A S for one group's sensitivities (a fan-out group's S has the parameter's rows after the unit)."""
    if group.fan_out:
        return A.view(*A.shape, *([1] * (S.dim() - A.dim()))) * S
    return _act(cell, A, S, group.matrix)


def _times_real(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for a real b and a real or complex a, as one real matrix product (a complex a's real and
    imaginary parts stacked as rows): half the work of promoting b to complex."""
    if not a.is_complex():
        return a @ b
    rows = torch.view_as_real(a).movedim(-1, -3)  # [..., 2, M, K]
    product = rows.reshape(*rows.shape[:-3], 2 * rows.shape[-2], rows.shape[-1]) @ b
    product = product.unflatten(-2, (2, rows.shape[-2])).movedim(-3, -1)  # [..., M, P, 2]
    return torch.view_as_complex(product.contiguous())


def _suffix_products(cell: RTRLCell, jacobians: Tensor) -> Tensor:
    """P_t = Ã_T ··· Ã_t for t = 1..T, [T, ...] (products of Jacobians only, never inverses)."""
    if jacobians.shape[0] == 1:
        return jacobians
    if cell.form != "block":
        return torch.cumprod(jacobians.flip(0), dim=0).flip(0)
    products = torch.empty_like(jacobians)
    products[-1] = jacobians[-1]
    for t in range(jacobians.shape[0] - 2, -1, -1):
        products[t] = products[t + 1] @ jacobians[t]
    return products


def _fused(probe: Tensor) -> bool:
    """Whether the CUDA kernels of ``kernels`` run for ``probe``: a CUDA tensor, outside torch.func
    transforms (vmap, grad; the kernels cannot take their wrapped tensors), and the kernels built, on
    a GPU and not turned off by RLMEM_KERNELS=0. The kernels return None for a case they do not cover
    (e.g. float64), and the reference below runs."""
    return probe.is_cuda and not torch._C._functorch.is_functorch_wrapped_tensor(probe) and kernels.available()


def _adjoint(cell: RTRLCell, jacobians: Tensor, errors: Tensor) -> Tensor:
    """δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1} over the window, [T, B, N(, k)] (equation (4))."""
    fused = kernels.adjoint(cell, jacobians, errors) if _fused(errors) else None
    if fused is not None:
        return fused
    adjoint = errors.clone()
    for t in range(errors.shape[0] - 2, -1, -1):
        adjoint[t] += _act_transpose(cell, jacobians[t + 1], adjoint[t + 1])
    return adjoint


# --------------------------------------------------------------------------------------------------
# State representation: complex quantities live in the state as real pairs.


def _internal(cell: RTRLCell, x: Tensor) -> Tensor:
    return torch.view_as_complex(x.contiguous()) if cell.form == "complex" else x


def _external(cell: RTRLCell, x: Tensor) -> Tensor:
    return torch.view_as_real(x) if cell.form == "complex" else x


def zero_state(cell: RTRLCell, batch: int, units: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The zero recurrent state h: [B, N] (real), [B, N, 2] (complex), [B, N, k] (block)."""
    trailing = () if cell.form == "real" else (cell.block_size,)
    return torch.zeros(batch, units, *trailing, device=device, dtype=dtype)


def zero_sensitivities(
    cell: RTRLCell,
    batch: int,
    units: int,
    columns: Mapping[str, int],
    device: torch.device | str,
    dtype: torch.dtype,
    rows: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Zero sensitivities per group, in the state representation. ``columns``: D_p per matrix group;
    ``rows``: R per fan-out group."""
    sensitivities = {}
    for group in cell.groups:
        shape = [batch, units]
        if group.fan_out:
            shape.append((rows or {})[group.name])
        if cell.form == "block":
            shape.append(cell.block_size)
        if group.matrix:
            shape.append(columns[group.name])
        if cell.form == "complex":
            shape.append(2)
        sensitivities[group.name] = torch.zeros(shape, device=device, dtype=dtype)
    return sensitivities


# --------------------------------------------------------------------------------------------------
# Running the cell


def run_cell(
    cell: RTRLCell, h0: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], reset: Tensor
) -> Tensor:
    """h_1..h_T [T, B, ...] (state representation) from h_0 and prepared inputs, step by step.

    Differentiable when autograd is on (``bptt`` mode); ``reset`` [T, B] zeroes h before a step."""
    T = reset.shape[0]
    # One host read per window, not per step; a compiled caller (which cannot read flags on the host)
    # multiplies every step by its keep mask, exactly 1 where no env resets.
    resetting = [True] * T if torch.compiler.is_compiling() else reset.any(dim=1).tolist()
    h = _internal(cell, h0)
    keep = _keep(reset, h, h.dim() - 1)
    outputs = []
    for t in range(T):
        if resetting[t]:
            h = h * keep[t]
        h, _ = cell.step(h, {name: value[t] for name, value in inputs.items()}, params, False)
        outputs.append(h)
    return _external(cell, torch.stack(outputs))


@dataclass
class WindowCoefficients:
    """The per-step coefficients of recursion (1) over a window, every tensor [T, B, ...]."""

    jacobians: Tensor  # Ã_t = m_t A_t (the reset mask applied)
    factors: dict[str, Tensor]

    def injection(self, group: ParamGroup) -> tuple[Tensor, Tensor | None]:
        return self.factors[group.u], None if group.v is None else self.factors[group.v]


def _window_rows(
    cell: RTRLCell, h0: Tensor, h_seq: Tensor, inputs: Mapping[str, Tensor], reset: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The arguments of the step over all T·B rows of a window at once: h_{t-1} = m_t ⊙ (h_0,
    h_1..h_{T-1}) (internal representation) and the step inputs, each [T·B, ...]."""
    T, B = reset.shape
    h_seq = _internal(cell, h_seq)
    h_prev = torch.cat([_internal(cell, h0).unsqueeze(0), h_seq[:-1]], dim=0)
    h_prev = h_prev * _keep(reset, h_prev, h_prev.dim() - 2)
    rows = {name: value.reshape(T * B, *value.shape[2:]) for name, value in inputs.items()}
    return h_prev.reshape(T * B, *h_prev.shape[2:]), rows


def window_coefficients(
    cell: RTRLCell,
    h0: Tensor,
    h_seq: Tensor,
    inputs: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    reset: Tensor,
) -> tuple[Tensor, WindowCoefficients]:
    """Evaluate the step once over all T·B rows, from h_{t-1} = m_t ⊙ (h_0, h_1..h_{T-1}).

    Returns the recomputed h_1..h_T (internal representation, [T·B, ...], with autograd's graph if
    enabled) and the coefficients (detached)."""
    T, B = reset.shape
    h, step = cell.step(*_window_rows(cell, h0, h_seq, inputs, reset), params, True)
    assert step is not None

    def windowed(x: Tensor) -> Tensor:
        return x.detach().reshape(T, B, *x.shape[1:])

    jacobians = windowed(step.jacobian)
    jacobians = jacobians * _keep(reset, jacobians, jacobians.dim() - 2)
    return h, WindowCoefficients(jacobians, {name: windowed(f) for name, f in step.factors.items()})


# --------------------------------------------------------------------------------------------------
# Equations (3) and (4)


def _per_unit(cell: RTRLCell, group: ParamGroup, v: Tensor) -> Tensor:
    """A vector group's v (one value per unit, or per parameter row of a fan-out group) shaped to
    multiply its u."""
    return v.unsqueeze(-1) if cell.form == "block" else v.unsqueeze(-2) if group.fan_out else v


def advance(cell: RTRLCell, sensitivities: Mapping[str, Tensor], coefficients: WindowCoefficients) -> dict[str, Tensor]:
    """S_T from S_0 over the window (equation (3)); with T = 1, one step of recursion (1).

    ``sensitivities`` and the result are in the state representation, keyed by group name."""
    fused = kernels.advance(cell, sensitivities, coefficients) if _fused(coefficients.jacobians) else None
    if fused is not None:
        return fused
    if coefficients.jacobians.shape[0] == 1:
        return _advance_one_step(cell, sensitivities, coefficients)
    products = _suffix_products(cell, coefficients.jacobians)  # P_t = Ã_T ··· Ã_t
    carry = products[0]  # Φ_0
    # Φ_t = P_{t+1}, Φ_T = I: each step's injection is carried by the Jacobians after it.
    later = products[1:]
    result = {}
    for group in cell.groups:
        S0 = _internal(cell, sensitivities[group.name])
        u, v = coefficients.injection(group)
        carried_u = torch.cat([_act(cell, later, u[:-1], matrix=group.fan_out), u[-1:]], dim=0)  # Φ_t u_t
        if group.matrix:
            assert v is not None
            T, B = u.shape[:2]
            # Σ_t (Φ_t u_t) ⊗ v_t for every env: [B, N·k, T] @ [B, T, D_p]
            left = carried_u.reshape(T, B, -1).permute(1, 2, 0)
            injected = _times_real(left, v.permute(1, 0, 2)).reshape(S0.shape)
        else:
            injected = (carried_u if v is None else carried_u * _per_unit(cell, group, v)).sum(0)
        result[group.name] = _external(cell, _act_on_sensitivity(cell, carry, S0, group) + injected)
    return result


def _advance_one_step(
    cell: RTRLCell, sensitivities: Mapping[str, Tensor], coefficients: WindowCoefficients
) -> dict[str, Tensor]:
    """Recursion (1) itself, S_1 = Ã_1 S_0 + u_1 ⊗ v_1: what :func:`advance` computes for T = 1, in half
    its ops (a streaming learner's step is dispatch-bound: its tensors are small)."""
    A = coefficients.jacobians[0]
    result = {}
    for group in cell.groups:
        S0 = _internal(cell, sensitivities[group.name])
        u, v = coefficients.injection(group)
        u = u[0]
        if group.matrix:
            assert v is not None  # u [B, N(, R or k)] ⊗ v [B, D_p]
            injected = u.unsqueeze(-1) * v[0].view(v.shape[1], *([1] * (u.dim() - 1)), v.shape[-1])
        elif v is None:
            injected = u
        else:
            injected = u * _per_unit(cell, group, v[0])
        result[group.name] = _external(cell, _act_on_sensitivity(cell, A, S0, group) + injected)
    return result


def rtrl_step(
    cell: RTRLCell,
    h_prev: Tensor,
    sensitivities: Mapping[str, Tensor],
    inputs: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    reset: Tensor,
) -> tuple[Tensor, dict[str, Tensor], WindowCoefficients]:
    """The per-step form: h_t and S_t from h_{t-1}, S_{t-1} and one step's inputs (S_t without autograd's
    graph: the coefficients it comes from are detached; h_t with whatever graph its arguments have).

    ``inputs``: the window inputs of one step, each [1, B, ...]; ``reset``: [1, B]. Returns h_t
    [B, ...], S_t (state representation) and the step's coefficients. A streaming learner's gradient
    ⟨e_t, S_t⟩ is then ``step_gradients(cell, S_t, e_t)``, or equally, from S_{t-1},
    ``gradients(cell, S_{t-1}, coefficients, adjoint(cell, coefficients, e_t[None]))``.
    """
    prepared = cell.prepare(inputs, params)
    # With T = 1 the step's h_{t-1} is h_prev itself; the second argument only fixes the shape.
    h, coefficients = window_coefficients(cell, h_prev, h_prev.unsqueeze(0), prepared, params, reset)
    return _external(cell, h), advance(cell, sensitivities, coefficients), coefficients


def adjoint(cell: RTRLCell, coefficients: WindowCoefficients, errors: Tensor) -> Tensor:
    """δ [T, B, ...] (internal representation) from the same-step errors e (state representation)."""
    return _adjoint(cell, coefficients.jacobians, _internal(cell, errors))


def gradients(
    cell: RTRLCell,
    sensitivities: Mapping[str, Tensor] | None,
    coefficients: WindowCoefficients,
    adjoint_errors: Tensor,
    groups: tuple[ParamGroup, ...] | None = None,
) -> dict[str, Tensor]:
    """G^p of the window (equation (4)) from S_0 and the adjoint δ (internal representation).

    With T = 1, δ = e and this is ⟨e_1, S_1⟩, the per-step form (2). ``sensitivities=None`` leaves
    out the S_0 term (a later chunk of a window: its S_0 term belongs to the first chunk). Returns
    the gradient of each trained parameter, by parameter name, in the parameters' shape."""
    fused = (
        kernels.gradients(cell, sensitivities, coefficients, adjoint_errors, groups) if _fused(adjoint_errors) else None
    )
    if fused is not None:
        return fused
    T, B = adjoint_errors.shape[:2]
    carried = _act_transpose(cell, coefficients.jacobians[0], adjoint_errors[0])  # Ã_1ᵀ δ_1
    result: dict[str, Tensor] = {}
    for group in groups if groups is not None else cell.groups:
        u, v = coefficients.injection(group)
        if group.fan_out:  # Σ_i δ_t[i] u_t[i, r]: [T, B, R]
            weight = (adjoint_errors.unsqueeze(-1) * u).sum(-2)
        else:
            weight = _inner(cell, adjoint_errors, u, matrix=False)  # ⟨δ_t, u_t⟩: [T, B, N]
        if weight.is_complex() and not group.complex_param:
            weight = weight.real  # a real parameter needs only the real part, Re(conj(δ) u) v
        if group.matrix:
            assert v is not None
            grad = _times_real(weight.reshape(T * B, -1).transpose(0, 1), v.reshape(T * B, -1))
        else:
            grad = (weight if v is None else weight * v).sum((0, 1))
        if sensitivities is not None:
            S0 = _internal(cell, sensitivities[group.name])
            if group.fan_out:
                grad = grad + _act_on_sensitivity(cell, carried, S0, group).sum((0, 1))
            else:
                grad = grad + _inner(cell, carried, S0, group.matrix).sum(0)
        result.update(group.parameter_gradients(grad))
    return result


def step_gradients(
    cell: RTRLCell, sensitivities: Mapping[str, Tensor], errors: Tensor, groups: tuple[ParamGroup, ...] | None = None
) -> dict[str, Tensor]:
    """G^p = Σ_b ⟨e[b], S^p[b]⟩, the per-step form (2), from a step's S_t and its errors e_t [B, ...]
    (both in the state representation): :func:`gradients` of a one-step window, without that step's
    coefficients. Returns the gradients by parameter name, as :func:`gradients`."""
    errors = _internal(cell, errors)
    result: dict[str, Tensor] = {}
    for group in groups if groups is not None else cell.groups:
        S = _internal(cell, sensitivities[group.name])
        if group.fan_out:
            grad = _act_on_sensitivity(cell, errors, S, group).sum((0, 1))
        else:
            grad = _inner(cell, errors, S, group.matrix).sum(0)
        result.update(group.parameter_gradients(grad))
    return result


# --------------------------------------------------------------------------------------------------
# The window as one autograd Function


def _chunks(T: int) -> list[tuple[int, int]]:
    return [(t0, min(t0 + CHUNK_STEPS, T)) for t0 in range(0, T, CHUNK_STEPS)]


class _RTRLWindow(torch.autograd.Function):
    """Inputs: cell, encoder_grad, reset, h0, *S_0 (by group), *inputs, *params. Outputs: h_1..h_T, *S_T.

    Both directions walk the window in chunks of ``CHUNK_STEPS`` steps: (3) composes over chunks
    (S after a chunk is the next chunk's S_0) and the adjoint crosses a chunk boundary as the single
    vector Ã_{t0}ᵀ δ_{t0}, so per-step coefficients only ever exist for one chunk."""

    # One-step windows do not come here (:func:`_one_step_window`): longer windows read the reset flags
    # on the host (run_cell), which vmap cannot trace, so this Function needs no vmap rule.

    @staticmethod
    def forward(cell: RTRLCell, encoder_grad: str, reset: Tensor, h0: Tensor, *tensors: Tensor):
        sensitivities, inputs, params = _split(cell, tensors)
        h_start, chunk_states = h0, []
        for t0, t1 in _chunks(reset.shape[0]):
            chunk_inputs = {name: x[t0:t1] for name, x in inputs.items()}
            if t1 - t0 == 1:  # one step (streaming): its coefficient evaluation also gives h_1
                h, sensitivities, _ = rtrl_step(cell, h_start, sensitivities, chunk_inputs, params, reset[t0:t1])
                h_chunk = h.unsqueeze(0)
            else:
                prepared = cell.prepare(chunk_inputs, params)
                h_chunk = run_cell(cell, h_start, prepared, params, reset[t0:t1])
                _, coefficients = window_coefficients(cell, h_start, h_chunk, prepared, params, reset[t0:t1])
                sensitivities = advance(cell, sensitivities, coefficients)
            chunk_states.append(h_chunk)
            h_start = h_chunk[-1]
        h_seq = chunk_states[0] if len(chunk_states) == 1 else torch.cat(chunk_states)
        return (h_seq, *(sensitivities[group.name] for group in cell.groups))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        cell, encoder_grad, reset, h0, *tensors = inputs
        h_seq, *final = output
        ctx.cell, ctx.encoder_grad = cell, encoder_grad
        ctx.save_for_backward(reset, h0, h_seq, *tensors)
        ctx.mark_non_differentiable(*final)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h_seq: Tensor | None, *_: Tensor):
        cell: RTRLCell = ctx.cell
        # Saved outputs come back attached to this Function's graph: detach so that the recomputation
        # below records only what the inputs' gradient needs.
        reset, h0, h_seq, *tensors = (t.detach() for t in ctx.saved_tensors)
        sensitivities, inputs, params = _split(cell, tuple(tensors))
        offset = 4 + len(cell.groups)
        input_needs = dict(zip(cell.input_names, ctx.needs_input_grad[offset : offset + len(cell.input_names)]))
        param_needs = dict(zip(cell.param_names, ctx.needs_input_grad[offset + len(cell.input_names) :]))
        trained = tuple(g for g in cell.groups if any(param_needs[name] for name in g.params))
        errors = torch.zeros_like(h_seq) if grad_h_seq is None else grad_h_seq
        fixed = {name: p.detach() for name, p in params.items()}

        input_grads: dict[str, Tensor | None] = {name: None for name in cell.input_names}
        param_grads: dict[str, Tensor] = {}
        from_later = None  # Ã_{t1}ᵀ δ_{t1}: the error the steps after this chunk send back into it
        wanted = [name for name in cell.input_names if input_needs[name]]
        for t0, t1 in reversed(_chunks(reset.shape[0])):
            h_start, chunk = (h0 if t0 == 0 else h_seq[t0 - 1]), slice(t0, t1)
            chunk_inputs = {name: x[chunk] for name, x in inputs.items()}
            chunk_errors = _internal(cell, errors[chunk])
            _, coefficients = window_coefficients(
                cell, h_start, h_seq[chunk], cell.prepare(chunk_inputs, fixed), fixed, reset[chunk]
            )
            if from_later is not None:
                chunk_errors = chunk_errors.clone()
                chunk_errors[-1] += from_later
            adjoint_errors = _adjoint(cell, coefficients.jacobians, chunk_errors)
            from_later = _act_transpose(cell, coefficients.jacobians[0], adjoint_errors[0])

            if wanted:
                # (∂h_t/∂x_t)ᵀ δ_t by autograd through one more evaluation of the step, h only, so that
                # the graph holds the step's activations and not those of its coefficients.
                with torch.enable_grad():
                    leaves = {name: x.detach().requires_grad_(input_needs[name]) for name, x in chunk_inputs.items()}
                    prepared = cell.prepare(leaves, fixed)
                    h, _ = cell.step(*_window_rows(cell, h_start, h_seq[chunk], prepared, reset[chunk]), fixed, False)
                    h = _external(cell, h).reshape(h_seq[chunk].shape)
                upstream = _external(cell, adjoint_errors) if ctx.encoder_grad == "window" else errors[chunk]
                found = torch.autograd.grad(h, [leaves[name] for name in wanted], upstream, allow_unused=True)
                del h, leaves, prepared  # free this chunk's graph before the next one is built
                for name, grad in zip(wanted, found):
                    if grad is None:
                        continue
                    if input_grads[name] is None:
                        input_grads[name] = torch.zeros_like(inputs[name])
                    input_grads[name][chunk] = grad
            if trained:
                chunk_grads = gradients(cell, sensitivities if t0 == 0 else None, coefficients, adjoint_errors, trained)
                for name, grad in chunk_grads.items():
                    param_grads[name] = grad if name not in param_grads else param_grads[name] + grad
            coefficients = adjoint_errors = None  # free this chunk's before the next chunk's exist

        out_params = [
            param_grads[name].to(p.dtype).reshape(p.shape) if param_needs[name] else None for name, p in params.items()
        ]
        out_inputs = [input_grads[name] for name in cell.input_names]
        return (None, None, None, None, *([None] * len(cell.groups)), *out_inputs, *out_params)


def _split(cell: RTRLCell, tensors: tuple[Tensor, ...]):
    n_groups, n_inputs = len(cell.groups), len(cell.input_names)
    sensitivities = {g.name: s for g, s in zip(cell.groups, tensors[:n_groups])}
    inputs = dict(zip(cell.input_names, tensors[n_groups : n_groups + n_inputs]))
    params = dict(zip(cell.param_names, tensors[n_groups + n_inputs :]))
    return sensitivities, inputs, params


def _sensitivity_term(cell: RTRLCell, group: ParamGroup, S: Tensor, params: Mapping[str, Tensor],
                      fixed: Mapping[str, Tensor]) -> Tensor:
    """⟨S^p, θ_p − sg(θ_p)⟩ per unit ([B, N(, k)], internal representation): zero in value, S^p in
    gradient (for a complex parameter, ∂h/∂θ_im = i S^p)."""
    delta = params[group.params[0]] - fixed[group.params[0]]
    if group.complex_param:
        delta = torch.complex(delta, params[group.params[1]] - fixed[group.params[1]])
    if group.reduce is not None:  # parameter rows shared by units: the transpose of the (linear) reduce
        # the per-unit gradient's shape: [N(, D_p)], or a fan-out group's [R(, D_p)]
        shape = S.shape[2:] if group.fan_out else S.shape[1:2] + S.shape[3:] if cell.form == "block" else S.shape[1:]
        _, transpose = torch.func.vjp(group.reduce, delta.new_zeros(shape))
        (delta,) = transpose(delta)
    if group.fan_out:  # S [B, N, R(, D)], θ [R(, D)]
        return (S * delta).sum((-2, -1) if group.matrix else -1)
    if cell.form == "block":  # S [B, N, k(, D)], θ [N(, D)]
        return (S * delta.unsqueeze(-2)).sum(-1) if group.matrix else S * delta.unsqueeze(-1)
    return (S * delta).sum(-1) if group.matrix else S * delta


def _one_step_window(
    cell: RTRLCell,
    h0: Tensor,
    sensitivities: Mapping[str, Tensor],
    inputs: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    reset: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A one-step window (the streaming learners' case) in ordinary autograd ops.

    The step runs once, with autograd's graph to the inputs only, and gives h_1 and the step's
    coefficients; S_1 follows from (1). Then

        h_1 + Σ_p ⟨S_1^p, θ_p − sg(θ_p)⟩            (sg: the value, without gradient)

    is h_1 in value (the sum is zero) and has, by (2), the exact gradient ⟨e_1, S_1^p⟩ for every
    parameter, while the inputs get the step's own (∂h_1/∂x_1)ᵀ e_1: for T = 1 that is what the window
    Function returns in either ``encoder_grad`` mode, since δ_1 = e_1. Plain ops vmap like any others,
    so a population of streaming learners does not pay for torch.func's generated rule of a Function."""
    # Whether a tensor needs a gradient is not asked: under vmap, ``requires_grad`` reads False on the
    # batched wrappers. Autograd records only what does; every parameter given here is trained.
    fixed = {name: p.detach() for name, p in params.items()}
    # the carried state receives no gradient, as from the window Function
    h, final, _ = rtrl_step(cell, h0.detach(), sensitivities, inputs, fixed, reset)
    if torch.is_grad_enabled():
        correction = None
        for group in cell.groups:
            term = _sensitivity_term(cell, group, _internal(cell, final[group.name]), params, fixed)
            correction = term if correction is None else correction + term
        h = h + _external(cell, correction)
    return h.unsqueeze(0), final


def rtrl_window(
    cell: RTRLCell,
    h0: Tensor,
    sensitivities: Mapping[str, Tensor],
    inputs: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    reset: Tensor,
    encoder_grad: str = "window",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run a window with exact RTRL gradients for ``params`` (see the module docstring).

    Args:
        cell: the cell's description.
        h0: the carried state [B, ...] (state representation); receives no gradient.
        sensitivities: the carried S_0 by group name (state representation); receive no gradient.
        inputs: the window inputs by ``cell.input_names``, each [T, B, ...]; they receive the adjoint's
            gradient (``encoder_grad="window"``) or the same-step gradient (``"same_step"``).
        params: every parameter in ``cell.param_names``; each receives G (equation (4)).
        reset: [T, B] bool, zeroes h and S of env b before step t.

    Returns:
        h_1..h_T [T, B, ...] (state representation, differentiable) and S_T by group (detached).
    """
    if encoder_grad not in ENCODER_GRAD_MODES:
        raise ValueError(f"encoder_grad={encoder_grad!r}; valid choices: {', '.join(ENCODER_GRAD_MODES)}")
    if reset.shape[0] == 1:
        return _one_step_window(cell, h0, sensitivities, inputs, params, reset)
    tensors = (
        *(sensitivities[g.name] for g in cell.groups),
        *(inputs[name] for name in cell.input_names),
        *(params[name] for name in cell.param_names),
    )
    h_seq, *final = _RTRLWindow.apply(cell, encoder_grad, reset, h0, *tensors)
    return h_seq, {g.name: s for g, s in zip(cell.groups, final)}
