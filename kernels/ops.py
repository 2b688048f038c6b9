"""The sensitivity kernels on tensors (one parameter group at a time), in the kernels' layout.

Layout: every tensor is float32 and contiguous; complex numbers are real pairs in a last dim of 2
(``torch.view_as_real``). With T steps, B envs, N units, k reals per unit and D columns:

=============  ======================  ======================  ========================
               real (k = 1)            complex (k = 2)         block (k × k)
=============  ======================  ======================  ========================
jacobians Ã    [T, B, N]               [T, B, N, 2]            [T, B, N, k, k]
u              [T, B, N(, R)]          [T, B, N, 2]            [T, B, N, k]
errors e, δ    [T, B, N]               [T, B, N, 2]            [T, B, N, k]
S (matrix)     [B, N(, R), D]          [B, N, D, 2]            [B, N, k, D]
S (vector)     [B, N(, R)]             [B, N, 2]               [B, N, k]
G (matrix)     [N·R, D]                [N, D, 2]               [N, D]
G (vector)     [N·R]                   [N, 2]                  [N]
=============  ======================  ======================  ========================

v is [T, B, D] for a matrix group, [T, B, N] (or [T, B, R] for a fan-out group) or None for a
vector group. Ã has the reset mask applied. R > 1: a fan-out group (real form), whose gradient the
caller sums over the N units. Complex gradients are Σ conj(e)·S as real pairs. Equations: the module
docstring of ``rlmem/rtrl.py``; the kernels: ``csrc/forward.cu``, ``csrc/backward.cu``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import loader

FORMS = {"real": 0, "complex": 1, "block": 2}


def block_size(form: str, jacobians: Tensor) -> int:
    """k: reals per unit."""
    if form not in FORMS:
        raise ValueError(f"unit form {form!r}; valid choices: {', '.join(FORMS)}")
    return {"real": 1, "complex": 2}.get(form) or jacobians.shape[-1]


def _gradient_shape(form: str, jacobians: Tensor, rows: int, columns: int) -> tuple[int, ...]:
    shape: tuple[int, ...] = (jacobians.shape[2] * rows,)
    if columns:
        shape += (columns,)
    return shape + ((2,) if form == "complex" else ())


def _columns(v: Tensor | None, matrix: bool) -> int:
    if not matrix:
        return 0
    if v is None:
        raise ValueError("a matrix group needs v")
    return v.shape[-1]


def _flat(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


def window_forward(
    form: str,
    jacobians: Tensor,
    sensitivity: Tensor,
    u: Tensor,
    v: Tensor | None = None,
    *,
    matrix: bool,
    rows: int = 1,
    errors: Tensor | None = None,
    grad: Tensor | None = None,
    accumulate: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """S_T from S_0 = ``sensitivity`` over the window (equation (3); recursion (1) stepped T times).

    With ``errors`` (e_t, [T, B, ...]) it also adds Σ_t Σ_b ⟨e_t, S_t⟩ (equation (2)) into ``grad``
    (or writes it, ``accumulate=False``). ``out`` may be ``sensitivity`` itself (in place)."""
    columns = _columns(v, matrix)
    if errors is not None and grad is None:
        raise ValueError("errors need a gradient tensor to accumulate into")
    out = torch.empty_like(sensitivity, memory_format=torch.contiguous_format) if out is None else out
    loader.load().forward(
        FORMS[form],
        block_size(form, jacobians),
        rows,
        columns,
        jacobians.contiguous(),
        u.contiguous(),
        _flat(v),
        sensitivity.contiguous(),
        out,
        _flat(errors),
        grad,
        accumulate,
    )
    return out


def window_gradient(
    form: str,
    jacobians: Tensor,
    adjoint: Tensor,
    u: Tensor,
    v: Tensor | None = None,
    sensitivity: Tensor | None = None,
    *,
    matrix: bool,
    rows: int = 1,
    grad: Tensor | None = None,
    accumulate: bool = False,
) -> Tensor:
    """G of the window from the adjoint δ (equation (4)): Σ_t Σ_b ⟨δ_t, u_t⟩ v_t, plus
    Σ_b ⟨Ã_1ᵀ δ_1, S_0⟩ when ``sensitivity`` (S_0) is given. Returns ``grad`` (new unless given)."""
    columns = _columns(v, matrix)
    if grad is None:
        grad = jacobians.new_empty(_gradient_shape(form, jacobians, rows, columns))
        accumulate = False
    loader.load().gradient(
        FORMS[form],
        block_size(form, jacobians),
        rows,
        columns,
        jacobians.contiguous(),
        adjoint.contiguous(),
        u.contiguous(),
        _flat(v),
        _flat(sensitivity),
        grad,
        accumulate,
    )
    return grad


def window_adjoint(form: str, jacobians: Tensor, errors: Tensor, out: Tensor | None = None) -> Tensor:
    """δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1} over the window (the adjoint of equation (4)), [T, B, ...]."""
    errors = errors.contiguous()
    out = torch.empty_like(errors) if out is None else out
    loader.load().adjoint(FORMS[form], block_size(form, jacobians), jacobians.contiguous(), errors, out)
    return out


def step(
    form: str,
    jacobian: Tensor,
    sensitivity: Tensor,
    u: Tensor,
    v: Tensor | None = None,
    *,
    matrix: bool,
    rows: int = 1,
    errors: Tensor | None = None,
    grad: Tensor | None = None,
) -> Tensor:
    """The per-step form for streaming learners: S ← Ã S + u ⊗ v in place on ``sensitivity`` (one
    read and one write of S), and with ``errors`` e [B, ...] also G += Σ_b ⟨e, S⟩ into ``grad``.
    Coefficients are one step's, without the T dim. Returns ``sensitivity``."""
    if not sensitivity.is_contiguous():
        raise ValueError("step updates the sensitivity in place: it must be contiguous")

    def one(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.unsqueeze(0)

    return window_forward(
        form,
        jacobian.unsqueeze(0),
        sensitivity,
        u.unsqueeze(0),
        one(v),
        matrix=matrix,
        rows=rows,
        errors=one(errors),
        grad=grad,
        accumulate=True,
        out=sensitivity,
    )
