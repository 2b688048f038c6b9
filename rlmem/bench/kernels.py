"""``rlmem bench kernels``: the CUDA sensitivity kernels against the eager PyTorch reference, on a GPU.

For one matrix parameter group (S: B × N units × k reals × D columns) and each unit form, it times,
side by side in one run:

* window forward S_0 → S_T (equation (3)): the kernel; the engine's reference ``rtrl.advance``
  (batched products, kernels off); and recursion (1) stepped eagerly, T passes over S;
* window backward (equation (4)): the kernel adjoint + gradient; the engine's reference ``adjoint``
  + ``gradients``;
* the per-step form (T = 1) with gradient, S ← Ã S + u ⊗ v and G += Σ_b ⟨e, S⟩: the kernel, and
  the engine's reference ``advance`` + ``gradients``.

Each kernel is timed as one eager call (what the engine pays, Python included; the ratios use these)
and replayed in a CUDA graph (its device time). Throughput is in sensitivity element-updates per
second of device time (T·B·N·k·D reals of S per window, for either direction). The per-step
kernel's achieved memory bandwidth (bytes it must move: S read and written, coefficients, G) is
given as a fraction of two references: the theoretical peak from ``torch.cuda.get_device_properties``
(memory clock × bus width × 2, where torch reports them) and a measured device-to-device copy
(read + write bytes of a 1 GiB ``copy_``). Last, one window of an
elstm core, forward + backward, with grad rtrl (kernels on and off) against grad bptt. Example::

    rlmem bench kernels                              # B = 64, N = 256, D = 256, T = 32 and T = 1
    rlmem bench kernels --forms real --windows 64 --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

import kernels
from kernels import loader, ops
from rlmem import rtrl
from rlmem.bench.measure import forward_backward
from rlmem.errors import ConfigError
from rlmem.memory import make_core
from rlmem.rtrl import ParamGroup, RTRLCell, WindowCoefficients

FORM_BLOCKS = {"real": ("real", 1), "complex": ("complex", 2), "block2": ("block", 2), "block4": ("block", 4)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="envs (B)")
    parser.add_argument("--units", type=int, default=256, help="state units (N)")
    parser.add_argument("--columns", type=int, default=256, help="columns of the matrix group (D)")
    parser.add_argument("--windows", default="32,1", help="comma-separated window lengths T")
    parser.add_argument("--forms", default="real,complex,block2", help=f"comma-separated: {', '.join(FORM_BLOCKS)}")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions (the median is shown)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-core", action="store_true", help="skip the elstm window row")
    return parser


class _OneGroup(RTRLCell):
    def __init__(self, form: str, k: int) -> None:
        self.form, self.block_size = form, k
        self.groups = (ParamGroup("W", u="u", v="x", matrix=True),)
        self.param_names = ("W",)


@contextlib.contextmanager
def _kernels_off() -> Iterator[None]:
    saved = os.environ.get(loader.ENV_VAR)
    os.environ[loader.ENV_VAR] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[loader.ENV_VAR]
        else:
            os.environ[loader.ENV_VAR] = saved


def _seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median seconds of one call, by CUDA events around a batch of calls (short kernels are timed
    over enough calls to cover ~1 ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, min(1000, math.ceil(1.0 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _device_seconds(fn: Callable[[], object], repeats: int, warmup: int, calls: int = 20) -> float | None:
    """Median seconds of one call with the Python and launch overhead removed: ``calls`` calls captured
    in a CUDA graph and replayed. None if the call cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        return None
    return _seconds(graph.replay, repeats, 1) / calls


def _window(form: str, k: int, T: int, B: int, N: int, D: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)

    def normal(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, device=device)

    if form == "real":
        jacobians = 0.9 * torch.rand(T, B, N, generator=g, device=device)
        u, errors = normal(T, B, N), normal(T, B, N)
    elif form == "complex":
        jacobians = torch.polar(0.9 * torch.ones(T, B, N, device=device), normal(T, B, N))
        u, errors = torch.complex(normal(T, B, N), normal(T, B, N)), torch.complex(normal(T, B, N), normal(T, B, N))
    else:
        jacobians = normal(T, B, N, k, k) * (0.9 / k)
        u, errors = normal(T, B, N, k), normal(T, B, N, k)
    cell = _OneGroup(form, k)
    S0 = rtrl.zero_sensitivities(cell, B, N, {"W": D}, device, torch.float32)["W"].normal_(generator=g)
    coefficients = WindowCoefficients(jacobians, {"u": u, "x": normal(T, B, D)})
    return cell, coefficients, {"W": S0}, errors


def _pairs(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


def _stepwise(cell: RTRLCell, coefficients: WindowCoefficients, S: dict[str, Tensor]) -> Callable[[], Tensor]:
    """Recursion (1) stepped eagerly: T passes over S."""
    S0 = S["W"] if cell.form != "complex" else torch.view_as_complex(S["W"])
    A, u, v = coefficients.jacobians, coefficients.factors["u"], coefficients.factors["x"]

    def stepped() -> Tensor:
        s = S0
        for t in range(A.shape[0]):
            if cell.form == "block":
                s = A[t] @ s + u[t].unsqueeze(-1) * v[t][:, None, None, :]
            else:
                s = A[t].unsqueeze(-1) * s + u[t].unsqueeze(-1) * v[t][:, None, :]
        return s

    return stepped


def _peak_bandwidth() -> tuple[float | None, float]:
    """(theoretical peak from the device properties or None, measured device-to-device copy), bytes/s."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    theoretical = 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
    source = torch.empty(1 << 28, device="cuda")  # 1 GiB of float32
    target = torch.empty_like(source)
    seconds = _seconds(lambda: target.copy_(source), repeats=10, warmup=2)
    return theoretical, 2 * source.numel() * 4 / seconds


def _core_window(grad: str, x: Tensor, reset: Tensor, hidden: int) -> Callable[[], None]:
    """Forward + backward of one elstm window with the given grad mode."""
    torch.manual_seed(0)
    core = make_core({"name": "elstm", "hidden_size": hidden, "grad": grad}, input_size=x.shape[-1]).cuda()
    state = core.initial_state(x.shape[1], device="cuda")

    def window() -> None:
        core.zero_grad(set_to_none=True)
        forward_backward(core, x, state, reset)

    return window


def _core_row(args: argparse.Namespace) -> None:
    T, B, D, N = 32, args.batch, args.columns, args.units
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, D, generator=g).cuda()
    reset = (torch.rand(T, B, generator=g) < 0.01).cuda()
    seconds = {}
    for label, grad, off in (("rtrl", "rtrl", False), ("rtrl (kernels off)", "rtrl", True), ("bptt", "bptt", False)):
        with _kernels_off() if off else contextlib.nullcontext():
            seconds[label] = _seconds(_core_window(grad, x, reset, N), args.repeats, args.warmup)
    print(f"\nelstm window, forward + backward (B={B}, N={N}, D={D}, T={T}):")
    for label, sec in seconds.items():
        print(f"  {label:20s} {sec * 1e3:9.3f} ms   {sec / seconds['bptt']:6.2f}x bptt")


Row = tuple[str, Callable[[], object], Callable[[], object], Callable[[], object] | None, int]


def _rows(form_name: str, T: int, B: int, N: int, D: int, device: torch.device) -> list[Row]:
    """(direction, kernel, engine reference, eager stepwise or None, bytes the kernel must move or 0)."""
    form, k = FORM_BLOCKS[form_name]
    cell, coefficients, S, errors = _window(form, k, T, B, N, D, device)
    A, u = _pairs(coefficients.jacobians), _pairs(coefficients.factors["u"])
    v, e, S0 = coefficients.factors["x"], _pairs(errors), S["W"]

    def reference_forward() -> object:
        return rtrl.advance(cell, S, coefficients)

    def reference_backward() -> object:
        return rtrl.gradients(cell, S, coefficients, rtrl.adjoint(cell, coefficients, e))

    def kernel_forward() -> object:
        return ops.window_forward(form, A, S0, u, v, matrix=True)

    def kernel_backward() -> object:
        return ops.window_gradient(form, A, ops.window_adjoint(form, A, e), u, v, S0, matrix=True)

    rows: list[Row] = [
        ("forward (3)", kernel_forward, reference_forward, _stepwise(cell, coefficients, S), 0),
        ("backward (4)", kernel_backward, reference_backward, None, 0),
    ]
    if T == 1:
        grad = torch.zeros(N, D, *((2,) if form == "complex" else ()), device=device)
        S_step = S0.clone()

        def kernel_step() -> object:
            return ops.window_forward(form, A, S_step, u, v, matrix=True, errors=e, grad=grad, out=S_step)

        def reference_step() -> object:  # δ = e at T = 1
            return rtrl.advance(cell, S, coefficients), rtrl.gradients(cell, S, coefficients, errors)

        moved = 4 * (2 * S0.numel() + A.numel() + u.numel() + e.numel() + v.numel() + 2 * grad.numel())
        rows.append(("per-step + gradient", kernel_step, reference_step, None, moved))
    return rows


def _measure(row: Row, prefix: str, updates: int, args: argparse.Namespace, peaks: tuple[float | None, float]) -> None:
    """Time one row (kernel eagerly and in a CUDA graph, the reference, eager stepping) and print it."""
    label, kernel, reference, stepwise, moved = row
    kernel_s = _seconds(kernel, args.repeats, args.warmup)
    device_s = _device_seconds(kernel, args.repeats, args.warmup)
    with _kernels_off():
        reference_s = _seconds(reference, args.repeats, args.warmup)
        step_s = _seconds(stepwise, args.repeats, args.warmup) if stepwise is not None else None
    timed = device_s or kernel_s

    def ms(seconds: float | None) -> str:
        return f"{seconds * 1e3:9.3f}m" if seconds else f"{'-':>10s}"

    vs_step = f"{step_s / kernel_s:7.1f}x" if step_s else f"{'-':>8s}"
    print(
        f"{prefix} {label:20s} {ms(kernel_s)} {ms(device_s)} {ms(reference_s)} {ms(step_s)} "
        f"{reference_s / kernel_s:6.1f}x {vs_step} {updates / timed / 1e9:8.1f}"
    )
    if moved:
        theoretical, copy = peaks
        bandwidth = moved / timed
        of_peak = f"{bandwidth / theoretical:.0%} of peak, " if theoretical else ""
        timing = "kernel time in a CUDA graph" if device_s else "eager call time"
        print(
            f"{'':13s} {'bandwidth':20s} {bandwidth / 1e9:9.0f} GB/s = {of_peak}"
            f"{bandwidth / copy:.0%} of the measured copy ({timing})"
        )


def run(argv: list[str]) -> None:
    """Print the kernels-vs-reference table (see the module docstring); one line without a GPU."""
    args = _parser().parse_args(argv)
    for key in ("batch", "units", "columns", "repeats"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(args, key)}")
    try:
        windows = [int(t) for t in args.windows.split(",")]
    except ValueError:
        raise ConfigError(f"--windows: comma-separated integers, got {args.windows!r}") from None
    if any(t <= 0 for t in windows):
        raise ConfigError(f"--windows must be positive, got {args.windows!r}")
    forms = args.forms.split(",")
    for name in forms:
        if name not in FORM_BLOCKS:
            raise ConfigError(f"--forms: unknown form {name!r}; valid choices: {', '.join(FORM_BLOCKS)}")
    if not torch.cuda.is_available():
        print("rlmem bench kernels: no CUDA device is available here; nothing to measure (the kernels run on GPUs)")
        return

    if not kernels.available():
        print(f"rlmem bench kernels: the CUDA kernels are unavailable here: {kernels.unavailable_reason()}")
        return

    B, N, D = args.batch, args.units, args.columns
    peaks = theoretical, copy = _peak_bandwidth()
    name = torch.cuda.get_device_name()
    peak = f"{theoretical / 1e9:.0f} GB/s from the device properties" if theoretical else "not reported by torch"
    print(f"{name}: memory bandwidth peak {peak}; measured device-to-device copy {copy / 1e9:.0f} GB/s")
    print(f"one matrix group, B={B} N={N} D={D}, float32; median of {args.repeats}; updates = T·B·N·k·D per window")
    print(
        "times per window: kernel = one eager call (as the engine makes it), in graph = the same call replayed "
        "in a CUDA graph (device time, no Python or launch overhead); ratios use the eager calls; "
        "G/s = 1e9 element-updates per second of the kernel's device time"
    )
    header = f"{'form':8s} {'T':>4s} {'direction':20s} {'kernel':>10s} {'in graph':>10s} {'reference':>10s}"
    print(f"{header} {'stepwise':>10s} {'vs ref':>7s} {'vs step':>8s} {'G/s':>8s}")
    for form_name in forms:
        for T in windows:
            for row in _rows(form_name, T, B, N, D, torch.device("cuda")):
                _measure(row, f"{form_name:8s} {T:4d}", T * B * N * FORM_BLOCKS[form_name][1] * D, args, peaks)
    if not args.no_core:
        _core_row(args)
