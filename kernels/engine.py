"""The kernels behind the RTRL engine's functions: ``advance`` (3), ``gradients`` (4) and the adjoint.

``rlmem/rtrl.py`` calls these for CUDA tensors when :func:`kernels.available` is True; each takes the
engine's own arguments (a cell description, coefficients in the engine's internal representation,
sensitivities in the state representation) and returns what the engine's reference returns, or None
for a case the kernels do not cover (a dtype other than float32 / complex64, blocks larger than
4 × 4, a complex v), in which case the engine runs its reference. The engine's objects are used by
their attributes and methods only (a group's ``parameter_gradients`` turns its per-unit gradient
into the parameters' gradients, as in the reference), so this package, which sits below the engine,
does not import ``rlmem``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kernels import ops

MAX_BLOCK = 4


def _form(cell: Any) -> str | None:
    form = cell.form
    if form not in ops.FORMS or (form == "block" and not 1 <= cell.block_size <= MAX_BLOCK):
        return None
    return form


def _coefficient(form: str, x: Tensor | None) -> Tensor | None:
    """A coefficient in the kernels' layout (complex form: real pairs), or None if unsupported."""
    if x is None:
        return None
    if form == "complex":
        if x.dtype == torch.float32:
            x = x.to(torch.complex64)
        return torch.view_as_real(x.contiguous()) if x.dtype == torch.complex64 else None
    return x.contiguous() if x.dtype == torch.float32 else None


def _real(x: Tensor | None) -> Tensor | None:
    """v and S: float32 (the state representation already stores complex S as real pairs)."""
    if x is None or x.dtype != torch.float32:
        return None
    return x.contiguous()


def _injection(form: str, group: Any, coefficients: Any) -> tuple[Tensor, Tensor | None, int] | None:
    """(u, v, R) of a group in the kernels' layout, or None if unsupported."""
    u, v = coefficients.injection(group)
    u_k = _coefficient(form, u)
    v_k = _real(v) if v is not None else None
    if u_k is None or (v is not None and v_k is None):
        return None
    rows = u.shape[-1] if group.fan_out else 1
    return u_k, v_k, rows


def advance(cell: Any, sensitivities: Mapping[str, Tensor], coefficients: Any) -> dict[str, Tensor] | None:
    """S_T from S_0 for every group of ``cell`` (``rlmem.rtrl.advance``), or None if not covered."""
    form = _form(cell)
    jacobians = None if form is None else _coefficient(form, coefficients.jacobians)
    if form is None or jacobians is None or jacobians.numel() == 0:
        return None
    result = {}
    for group in cell.groups:
        injection = _injection(form, group, coefficients)
        S0 = _real(sensitivities[group.name])
        if injection is None or S0 is None or S0.numel() == 0:
            return None
        u, v, rows = injection
        result[group.name] = ops.window_forward(form, jacobians, S0, u, v, matrix=group.matrix, rows=rows)
    return result


def gradients(
    cell: Any,
    sensitivities: Mapping[str, Tensor] | None,
    coefficients: Any,
    adjoint_errors: Tensor,
    groups: Sequence[Any] | None = None,
) -> dict[str, Tensor] | None:
    """G of the window for each group (``rlmem.rtrl.gradients``), by parameter name, or None."""
    form = _form(cell)
    if form is None:
        return None
    jacobians = _coefficient(form, coefficients.jacobians)
    adjoint = _coefficient(form, adjoint_errors)
    if jacobians is None or adjoint is None or jacobians.numel() == 0:
        return None
    units = jacobians.shape[2]
    result: dict[str, Tensor] = {}
    for group in groups if groups is not None else cell.groups:
        injection = _injection(form, group, coefficients)
        S0 = None if sensitivities is None else _real(sensitivities[group.name])
        if injection is None or (sensitivities is not None and S0 is None):
            return None
        u, v, rows = injection
        grad = ops.window_gradient(form, jacobians, adjoint, u, v, S0, matrix=group.matrix, rows=rows)
        if group.fan_out:  # per (unit, parameter row): the parameter's gradient sums the units
            grad = grad.view(units, rows, *grad.shape[1:]).sum(0)
        if form == "complex":
            grad = torch.view_as_complex(grad)
        result.update(group.parameter_gradients(grad))  # as in the reference from here on
    return result


def adjoint(cell: Any, jacobians: Tensor, errors: Tensor) -> Tensor | None:
    """δ over the window from the errors e (both in the engine's internal representation), or None."""
    form = _form(cell)
    if form is None:
        return None
    jacobians_k, errors_k = _coefficient(form, jacobians), _coefficient(form, errors)
    if jacobians_k is None or errors_k is None or errors_k.numel() == 0:
        return None
    result = ops.window_adjoint(form, jacobians_k, errors_k)
    return torch.view_as_complex(result) if form == "complex" else result
