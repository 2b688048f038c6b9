"""Parity of the sensitivity kernels with the PyTorch reference of ``rlmem/rtrl.py``.

Every test runs on two backends:

* ``cuda``: the compiled extension on a GPU (marked ``gpu``; skipped without a CUDA device, or when
  the kernels cannot be built there, with the reason);
* ``emulated``: the same ``.cu`` sources compiled for the host with ``kernels/csrc/host_emulation.h``
  (blocks one after another, each CUDA thread a std::thread meeting the others at __syncthreads) and
  called through ctypes in place of the extension. It runs wherever a C++20 compiler is, so the
  kernels' arithmetic, tiling, split reductions and the Python layers above them (``kernels.ops``,
  ``kernels.engine``) are checked on machines without a GPU too. Inputs sit between NaN guards and
  outputs between sentinel guards, so an out-of-bounds read or write fails the comparison.

The reference is the engine's own functions (``advance``, ``gradients``, the adjoint) in float64 on
the CPU, or recursion (1)-(2) stepped one step at a time. Tolerance, float32 kernels against it:
|Δ| ≤ 1e-4·|ref| + 1e-4·max|ref| entry-wise (relative to each tensor's scale, which grows with T
and B). Shapes are chosen off the tile sizes (32 or 16 rows, 64 columns, 16 staged steps), with
resets inside the windows (Ã_t = 0 for an env that resets before step t).
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

import kernels
from kernels import engine, loader, ops
from rlmem import rtrl
from rlmem.rtrl import ParamGroup, RTRLCell, WindowCoefficients

CSRC = Path(kernels.__file__).resolve().parent / "csrc"
CUDA_SOURCES = ("forward.cu", "backward.cu", "reduce.cu")
RTOL, SCALE_TOL = 1e-4, 1e-4


# --------------------------------------------------------------------------------------------------
# The host-emulated kernels, behind the binding's interface


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="session")
def emulated_library(tmp_path_factory) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler for the host emulation")
    build = tmp_path_factory.mktemp("emulated_kernels")
    probe = build / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([compiler, "-std=c++20", "-pthread", str(probe), "-o", str(build / "probe")]).returncode:
        pytest.skip(f"{compiler} has no C++20 <barrier> for the host emulation")
    library = build / "libemulated.so"
    command = [
        compiler, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas",
        "-x", "c++", "-DRLMEM_HOST_EMULATION", "-include", str(CSRC / "host_emulation.h"), "-I", str(CSRC),
        *(str(CSRC / name) for name in CUDA_SOURCES), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"the kernels do not compile for the host emulation:\n{result.stderr}")
    lib = ctypes.CDLL(str(library))
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.rlmem_gradient_splits.argtypes = [i] * 7
    lib.rlmem_sensitivity_forward.argtypes = [i] * 8 + [p] * 7 + [i, i, p, p]
    lib.rlmem_sensitivity_gradient.argtypes = [i] * 8 + [p] * 6 + [i, i, p, p]
    lib.rlmem_adjoint.argtypes = [i] * 5 + [p] * 4
    return lib


GUARD = 67  # floats on each side of every buffer
SENTINEL = 1234.5


class _Guarded:
    """A host buffer with guards around a tensor's data: NaN for inputs, a sentinel for outputs."""

    def __init__(self, tensor: Tensor, output: bool) -> None:
        self.tensor, self.output = tensor, output
        flat = tensor.detach().reshape(-1).to(torch.float32)
        self.buffer = torch.full((flat.numel() + 2 * GUARD,), SENTINEL if output else math.nan)
        self.buffer[GUARD : GUARD + flat.numel()] = flat
        self.pointer = ctypes.c_void_p(self.buffer.data_ptr() + 4 * GUARD)

    def finish(self) -> None:
        n = self.tensor.numel()
        guards = torch.cat([self.buffer[:GUARD], self.buffer[GUARD + n :]])
        assert bool((guards == SENTINEL).all()), "a kernel wrote outside its output"
        self.tensor.copy_(self.buffer[GUARD : GUARD + n].view(self.tensor.shape))


class EmulatedExtension:
    """``forward``, ``gradient`` and ``adjoint`` of csrc/binding.cpp over the host-emulated kernels."""

    MULTIPROCESSORS = 2  # small, so that gradient reductions are split over the batch

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    @staticmethod
    def _v_len(v: Tensor | None, columns: int) -> int:
        return 0 if v is None or columns else v.shape[-1]

    def _workspace(self, form, k, B, N, rows, columns) -> _Guarded | None:
        splits = self.lib.rlmem_gradient_splits(form, k, B, N, rows, columns, self.MULTIPROCESSORS)
        if splits <= 1:
            return None
        size = splits * N * rows * max(columns, 1) * (2 if form == 1 else 1)
        return _Guarded(torch.full((size,), math.nan), output=True)

    @staticmethod
    def _run(status: int, outputs: list[_Guarded | None]) -> None:
        assert status == 0, f"kernel launch returned {status}"
        for output in outputs:
            if output is not None:
                output.finish()

    def forward(self, form, k, rows, columns, jacobians, u, v, sensitivity, out, errors, grad, accumulate):
        T, B, N = jacobians.shape[:3]
        ins = [_Guarded(x, False) if x is not None else None for x in (jacobians, u, v, sensitivity, errors)]
        s_out = ins[3] if out.data_ptr() == sensitivity.data_ptr() else _Guarded(out, True)
        if s_out is ins[3]:
            s_out.output, s_out.buffer[:GUARD], s_out.buffer[-GUARD:] = True, SENTINEL, SENTINEL
        g = _Guarded(grad, True) if errors is not None else None
        work = self._workspace(form, k, B, N, rows, columns) if errors is not None else None
        splits = self.lib.rlmem_gradient_splits(form, k, B, N, rows, columns, self.MULTIPROCESSORS)
        ptr = [x.pointer if x is not None else None for x in (*ins, g, work)]
        status = self.lib.rlmem_sensitivity_forward(
            form, k, T, B, N, rows, columns, self._v_len(v, columns), ptr[0], ptr[1], ptr[2], ptr[3],
            s_out.pointer, ptr[4], ptr[5], int(accumulate), splits, ptr[6], None,
        )  # fmt: skip
        self._run(status, [s_out, g])

    def gradient(self, form, k, rows, columns, jacobians, adjoint, u, v, sensitivity, grad, accumulate):
        T, B, N = jacobians.shape[:3]
        ins = [_Guarded(x, False) if x is not None else None for x in (jacobians, adjoint, u, v, sensitivity)]
        g = _Guarded(grad, True)
        work = self._workspace(form, k, B, N, rows, columns)
        splits = self.lib.rlmem_gradient_splits(form, k, B, N, rows, columns, self.MULTIPROCESSORS)
        ptr = [x.pointer if x is not None else None for x in ins]
        status = self.lib.rlmem_sensitivity_gradient(
            form, k, T, B, N, rows, columns, self._v_len(v, columns), *ptr, g.pointer, int(accumulate),
            splits, None if work is None else work.pointer, None,
        )  # fmt: skip
        self._run(status, [g])

    def adjoint(self, form, k, jacobians, errors, out):
        T, B, N = jacobians.shape[:3]
        a, e, o = _Guarded(jacobians, False), _Guarded(errors, False), _Guarded(out, True)
        self._run(self.lib.rlmem_adjoint(form, k, T, B, N, a.pointer, e.pointer, o.pointer, None), [o])


@pytest.fixture(params=[pytest.param("emulated"), pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch) -> torch.device:
    """The device the kernels run on: the GPU (compiled extension) or the CPU (host emulation)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not kernels.available():
            pytest.skip(f"CUDA kernels unavailable: {kernels.unavailable_reason()}")
        return torch.device("cuda")
    extension = EmulatedExtension(request.getfixturevalue("emulated_library"))
    monkeypatch.setattr(loader, "load", lambda *args, **kwargs: extension)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Random windows for toy cells that hold every group kind of each unit form


class ToyCell(RTRLCell):
    """Groups only (the kernels never run a step): every group kind the engine has for ``form``."""

    def __init__(self, form: str, k: int) -> None:
        self.form, self.block_size = form, k
        if form == "real":
            groups = [
                ParamGroup("W", u="u", v="x", matrix=True),
                ParamGroup("r", u="u", v="h"),
                ParamGroup("b", u="u2", reduce=lambda g: g.sum().reshape(1)),
                ParamGroup("F", u="uf", v="x", matrix=True, fan_out=True),
                ParamGroup("Fr", u="uf", v="z", fan_out=True),
                ParamGroup("Fb", u="uf", fan_out=True),
            ]
        elif form == "complex":
            groups = [
                ParamGroup("W", u="u", v="x", matrix=True, params=("W_re", "W_im"), complex_param=True),
                ParamGroup("r", u="u", v="h"),
                ParamGroup("b", u="u2", params=("b_re", "b_im"), complex_param=True),
                ParamGroup("c", u="u_real"),
            ]
        else:
            groups = [
                ParamGroup("W", u="u", v="x", matrix=True),
                ParamGroup("r", u="u", v="h"),
                ParamGroup("b", u="u2"),
            ]
        self.groups = tuple(groups)
        self.param_names = tuple(name for g in groups for name in g.params)


FORMS = [("real", 1), ("complex", 2), ("block", 2), ("block", 3), ("block", 4)]
FORM_IDS = ["real", "complex", "block2", "block3", "block4"]


@dataclass(frozen=True)
class Shape:
    T: int
    B: int
    N: int
    D: int
    R: int


# Off every tile size; T = 19 crosses the 16-step staging chunk; B = 4 splits reductions in two.
SHAPES = [Shape(1, 1, 1, 1, 2), Shape(19, 4, 37, 70, 3), Shape(2, 3, 17, 129, 1)]
SHAPE_IDS = ["tiny", "T19", "wide"]
GPU_SHAPES = [Shape(40, 17, 300, 200, 4), Shape(70, 16, 256, 256, 2)]  # T = 70: beyond the engine's chunk


@dataclass
class Window:
    cell: ToyCell
    shape: Shape
    coefficients: WindowCoefficients  # float32 / complex64, on the device
    sensitivities: dict[str, Tensor]
    errors: Tensor  # e_t, internal representation

    def reference(self) -> Window:
        """The same window in float64 / complex128 on the CPU."""

        def wide(x: Tensor) -> Tensor:
            return x.detach().cpu().to(torch.complex128 if x.is_complex() else torch.float64)

        coefficients = WindowCoefficients(
            wide(self.coefficients.jacobians), {name: wide(f) for name, f in self.coefficients.factors.items()}
        )
        sensitivities = {name: wide(s) for name, s in self.sensitivities.items()}
        return Window(self.cell, self.shape, coefficients, sensitivities, wide(self.errors))


def make_window(form: str, k: int, shape: Shape, device: torch.device, seed: int = 0) -> Window:
    g = torch.Generator().manual_seed(seed)
    T, B, N, D, R = shape.T, shape.B, shape.N, shape.D, shape.R

    def normal(*size: int) -> Tensor:
        return torch.randn(*size, generator=g)

    def uniform(low: float, high: float, *size: int) -> Tensor:
        return low + (high - low) * torch.rand(*size, generator=g)

    keep = (torch.rand(T, B, generator=g) > 0.2).float()  # resets inside the window
    if form == "real":
        jacobians = uniform(-0.95, 0.95, T, B, N)
    elif form == "complex":
        jacobians = torch.polar(uniform(0.3, 0.99, T, B, N), uniform(-math.pi, math.pi, T, B, N))
    else:
        blocks = normal(T, B, N, k, k)
        jacobians = 0.95 * blocks / torch.linalg.matrix_norm(blocks, ord=2)[..., None, None]
    jacobians = jacobians * keep.view(T, B, *([1] * (jacobians.dim() - 2)))

    def unit(*lead: int) -> Tensor:  # one value per unit in the internal representation
        if form == "complex":
            return torch.complex(normal(*lead), normal(*lead))
        return normal(*lead, k) if form == "block" else normal(*lead)

    factors = {"u": unit(T, B, N), "u2": unit(T, B, N), "x": normal(T, B, D), "h": normal(T, B, N)}
    if form == "real":
        factors.update(uf=normal(T, B, N, R), z=normal(T, B, R))
    if form == "complex":
        factors["u_real"] = normal(T, B, N)
    cell = ToyCell(form, k)
    cell.check()
    columns = {g.name: D for g in cell.groups if g.matrix}
    rows = {g.name: R for g in cell.groups if g.fan_out}
    sensitivities = rtrl.zero_sensitivities(cell, B, N, columns, "cpu", torch.float32, rows)
    sensitivities = {name: normal(*s.shape) for name, s in sensitivities.items()}

    def on(x: Tensor) -> Tensor:
        return x.to(device)

    coefficients = WindowCoefficients(on(jacobians), {name: on(f) for name, f in factors.items()})
    return Window(cell, shape, coefficients, {n: on(s) for n, s in sensitivities.items()}, on(unit(T, B, N)))


def assert_matches(got: Tensor, want: Tensor, what: str) -> None:
    """``got`` (kernels, any device) against ``want`` (reference, any device), compared on the host; the
    failure message keeps torch's own account of the mismatch (how many elements, the largest error)."""
    want = want.detach().cpu()
    got = got.detach().cpu().to(want.dtype)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=SCALE_TOL * max(scale, 1e-30),
                               msg=lambda message: f"{what}: {message}")


def shapes_for(device: torch.device) -> list[Shape]:
    return SHAPES + (GPU_SHAPES if device.type == "cuda" else [])


# --------------------------------------------------------------------------------------------------
# The engine's functions: advance (3), gradients (4), the adjoint


@pytest.mark.parametrize("form, k", FORMS, ids=FORM_IDS)
def test_advance(device, form, k):
    for index, shape in enumerate(shapes_for(device)):
        window = make_window(form, k, shape, device, seed=index)
        got = engine.advance(window.cell, window.sensitivities, window.coefficients)
        assert got is not None, "the kernels declined a float32 window"
        ref = window.reference()
        want = rtrl.advance(ref.cell, ref.sensitivities, ref.coefficients)
        for name in want:
            assert_matches(got[name], want[name], f"{form}{k} {shape}: S_T of group {name}")


@pytest.mark.parametrize("form, k", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("with_start", [True, False], ids=["S0", "later_chunk"])
def test_gradients(device, form, k, with_start):
    for index, shape in enumerate(shapes_for(device)):
        window = make_window(form, k, shape, device, seed=10 + index)
        ref = window.reference()
        adjoint = rtrl._adjoint(ref.cell, ref.coefficients.jacobians, ref.errors)  # δ, float64
        got = engine.gradients(
            window.cell,
            window.sensitivities if with_start else None,
            window.coefficients,
            adjoint.to(window.errors.dtype).to(device),
        )
        assert got is not None, "the kernels declined a float32 window"
        want = rtrl.gradients(ref.cell, ref.sensitivities if with_start else None, ref.coefficients, adjoint)
        assert got.keys() == want.keys()
        for name in want:
            assert_matches(got[name], want[name], f"{form}{k} {shape}: gradient of {name}")


@pytest.mark.parametrize("form, k", FORMS, ids=FORM_IDS)
def test_adjoint(device, form, k):
    for index, shape in enumerate(shapes_for(device)):
        window = make_window(form, k, shape, device, seed=20 + index)
        got = engine.adjoint(window.cell, window.coefficients.jacobians, window.errors)
        assert got is not None
        ref = window.reference()
        want = rtrl._adjoint(ref.cell, ref.coefficients.jacobians, ref.errors)
        assert_matches(got, want, f"{form}{k} {shape}: adjoint")


def test_gradients_subset_of_groups(device):
    window = make_window("real", 1, SHAPES[1], device, seed=3)
    ref = window.reference()
    adjoint = rtrl._adjoint(ref.cell, ref.coefficients.jacobians, ref.errors)
    groups = window.cell.groups[::2]
    got = engine.gradients(window.cell, window.sensitivities, window.coefficients, adjoint.float().to(device), groups)
    want = rtrl.gradients(ref.cell, ref.sensitivities, ref.coefficients, adjoint, groups)
    assert got is not None and got.keys() == want.keys() == {g.name for g in groups}


def test_unsupported_inputs_decline(device):
    """float64 windows and blocks above 4 × 4 are left to the reference (None), never mis-computed."""
    window = make_window("real", 1, SHAPES[0], device)
    wide = window.reference()
    assert engine.advance(wide.cell, wide.sensitivities, wide.coefficients) is None
    assert engine.adjoint(wide.cell, wide.coefficients.jacobians, wide.errors) is None
    big = ToyCell("block", 5)
    blocks, errors = torch.zeros(1, 1, 1, 5, 5, device=device), torch.zeros(1, 1, 1, 5, device=device)
    assert engine.adjoint(big, blocks, errors) is None


# --------------------------------------------------------------------------------------------------
# The forward with errors: equation (2) accumulated while stepping, and the per-step form


def kernel_layout(x: Tensor | None) -> Tensor | None:
    return None if x is None else (torch.view_as_real(x.contiguous()) if x.is_complex() else x.contiguous())


def raw_inner(form: str, group: ParamGroup, errors: Tensor, S: Tensor) -> Tensor:
    """Σ_b ⟨e[b, n], S[b, e, ...]⟩ per sensitivity row, in the kernels' gradient layout (float64)."""
    if form == "complex":
        S = torch.view_as_complex(S.contiguous())
        e = errors.conj()
        value = (e.unsqueeze(-1) * S).sum(0) if group.matrix else (e * S).sum(0)
        return torch.view_as_real(value)
    if form == "block":
        return torch.einsum("bnk,bnkd->nd", errors, S) if group.matrix else torch.einsum("bnk,bnk->n", errors, S)
    if group.fan_out:
        value = torch.einsum("bn,bnrd->nrd", errors, S) if group.matrix else torch.einsum("bn,bnr->nr", errors, S)
        return value.reshape(-1, *value.shape[2:])
    return torch.einsum("bn,bnd->nd", errors, S) if group.matrix else (errors * S).sum(0)


def stepped_reference(window: Window) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """S_T and Σ_t Σ_b ⟨e_t, S_t⟩ per group by recursion (1)-(2), one step at a time, in float64."""
    ref = window.reference()
    S = dict(ref.sensitivities)
    grads: dict[str, Tensor] = {}
    for t in range(window.shape.T):
        step = WindowCoefficients(
            ref.coefficients.jacobians[t : t + 1], {n: f[t : t + 1] for n, f in ref.coefficients.factors.items()}
        )
        S = rtrl.advance(ref.cell, S, step)
        for group in ref.cell.groups:
            term = raw_inner(window.cell.form, group, ref.errors[t], S[group.name])
            grads[group.name] = term if t == 0 else grads[group.name] + term
    return S, grads


def group_arguments(window: Window, group: ParamGroup) -> tuple[Tensor, Tensor | None, int]:
    u, v = window.coefficients.injection(group)
    if window.cell.form == "complex" and not u.is_complex():
        u = u.to(torch.complex64)
    return kernel_layout(u), v, (u.shape[-1] if group.fan_out else 1)


@pytest.mark.parametrize("form, k", FORMS, ids=FORM_IDS)
def test_forward_accumulates_errors(device, form, k):
    for index, shape in enumerate(shapes_for(device)):
        window = make_window(form, k, shape, device, seed=30 + index)
        want_S, want_grad = stepped_reference(window)
        jacobians, errors = kernel_layout(window.coefficients.jacobians), kernel_layout(window.errors)
        for group in window.cell.groups:
            u, v, rows = group_arguments(window, group)
            grad = torch.full(want_grad[group.name].shape, 0.5, device=device)
            S = ops.window_forward(
                form, jacobians, window.sensitivities[group.name], u, v, matrix=group.matrix, rows=rows,
                errors=errors, grad=grad,
            )  # fmt: skip
            what = f"{form}{k} {shape} group {group.name}"
            assert_matches(S, want_S[group.name], f"{what}: S_T")
            assert_matches(grad - 0.5, want_grad[group.name], f"{what}: Σ⟨e, S⟩ (added to the given gradient)")


@pytest.mark.parametrize("form, k", FORMS, ids=FORM_IDS)
def test_step_in_place(device, form, k):
    """ops.step over T calls equals the window: S updated in place, gradients accumulated."""
    window = make_window(form, k, Shape(3, 4, 37, 70, 3), device, seed=40)
    want_S, want_grad = stepped_reference(window)
    jacobians, errors = kernel_layout(window.coefficients.jacobians), kernel_layout(window.errors)
    for group in window.cell.groups:
        u, v, rows = group_arguments(window, group)
        S = window.sensitivities[group.name].clone()
        grad = torch.zeros(want_grad[group.name].shape, device=device)
        for t in range(window.shape.T):
            out = ops.step(
                form, jacobians[t], S, u[t], None if v is None else v[t], matrix=group.matrix, rows=rows,
                errors=errors[t], grad=grad,
            )  # fmt: skip
            assert out is S
        assert_matches(S, want_S[group.name], f"{form}{k} step group {group.name}: S")
        assert_matches(grad, want_grad[group.name], f"{form}{k} step group {group.name}: gradient")


# --------------------------------------------------------------------------------------------------
# Every core on the engine dispatches to the kernels and matches the reference


CORES = {
    "elstm": {"hidden_size": 48},
    "lru": {"hidden_size": 40},
    "ffm": {"hidden_size": 24, "traces": 6, "context": 3},
    "ccn": {"hidden_size": 10, "columns_per_stage": 4},
    "cfc": {"hidden_size": 20, "grad": "snap1"},
}


@pytest.mark.parametrize("name", list(CORES))
def test_cores_use_the_kernels(device, name, monkeypatch):
    """A core with grad rtrl (cfc: snap1) with the kernels on and off (RLMEM_KERNELS=0): the engine
    reaches each kernel, and outputs, carried state and parameter gradients agree. On the emulated
    backend the engine is let to dispatch CPU tensors (on a GPU it does so for CUDA tensors only)."""
    from rlmem.memory import make_core

    if device.type == "cpu":

        def fused(probe):
            return kernels.available()

        monkeypatch.setattr(rtrl, "_fused", fused)
        monkeypatch.setattr(loader, "_module", object())  # loaded: available() depends on RLMEM_KERNELS only

    options = {"name": name, "grad": "rtrl", **CORES[name]}
    D, T, B = 13, 70, 5  # T beyond the engine's 64-step chunk
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g).to(device)
    reset = (torch.rand(T, B, generator=g) < 0.1).to(device)

    calls = {"advance": 0, "gradients": 0, "adjoint": 0}
    for fn in calls:
        original = getattr(kernels, fn)

        def spy(*args, _fn=fn, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            calls[_fn] += result is not None
            return result

        monkeypatch.setattr(kernels, fn, spy)

    def run(enabled: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """A fresh core each time (cores such as ccn update statistics as they run)."""
        monkeypatch.setenv(loader.ENV_VAR, "1" if enabled else "0")
        torch.manual_seed(0)
        core = make_core(options, input_size=D).to(device)
        state = core.initial_state(B, device=device)
        y, state = core(x, state, reset)
        weights = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
        ((y * weights).sum() + 0.1 * y.pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None}
        return y.detach(), state, grads

    y_k, state_k, grads_k = run(True)
    assert all(calls.values()), f"{name}: the engine did not dispatch to every kernel: {calls}"
    before = dict(calls)
    y_r, state_r, grads_r = run(False)
    assert calls == before, "RLMEM_KERNELS=0 still reached the kernels"
    assert_matches(y_k, y_r.double(), f"{name}: outputs")
    for key in state_r:
        if state_r[key].is_floating_point():
            assert_matches(state_k[key], state_r[key].double(), f"{name}: state {key}")
    assert grads_k.keys() == grads_r.keys()
    for key in grads_r:
        assert_matches(grads_k[key], grads_r[key].double(), f"{name}: gradient of {key}")
