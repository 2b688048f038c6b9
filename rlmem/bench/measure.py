"""Measuring for the benchmarks: timing with warm-up and repeats, the figures quoted (fastest, median,
ratios), tables printed as results arrive, and results files.

Timing. A measured call first runs ``warmup`` times untimed (first-call costs: allocation, kernel
selection, lazy imports); then it is timed by the host clock, the device synchronised before and after
(a CUDA call returns before its kernels finish). Contenders are timed in alternating rounds, each
round timing every contender once, so that load from other processes skews them alike. A figure is the
fastest of its rounds (``fastest_seconds``, ``best_rates``: the least disturbed) or their median
(``median_seconds``, ``alternating_seconds``); the ratio of two contenders measured side by side is
the figure to quote, since it survives a change of machine or load better than either time.

Memory of a window. ``window_bytes`` is what one forward + backward of a core over a window needs
beyond its parameters and carried state: on CUDA the peak allocation above what was allocated before,
less the parameters' gradients; on the CPU what autograd keeps, via ``saved_tensors_hooks``: the
tensors the forward saves for backward (each storage once) plus the peak of what the backward itself
saves while it runs (a recomputation, such as RTRL's per-step coefficients of one chunk).
``state_bytes`` is the carried state (sensitivities included).

Tables. ``Table`` prints a header, a rule and then each row as soon as it is measured, in fixed-width
columns (whitespace-separated, so that a row splits into its cells); ``markdown_table`` renders rows for
a file. ``write_json`` writes a results file whole (a temporary file, then renamed), so that an
interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from rlmem.errors import ConfigError
from rlmem.memory import MemoryCore

K = TypeVar("K", bound=Hashable)


# --------------------------------------------------------------------------------------------------
# Arguments and devices


def positive_ints(text: str) -> list[int]:
    """argparse type: ``"1,4,16"`` -> ``[1, 4, 16]``; anything else is a usage error (exit status 2)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def bench_device(name: str) -> torch.device:
    """The device a benchmark runs on; ``cuda`` without a CUDA device is a ConfigError."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; valid choices here: cpu")
    return device


def device_label(device: torch.device) -> str:
    """``"NVIDIA H200"`` or ``"cpu, 2 threads"``: where the figures were measured."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, with the device's work before it finished first and its own waited for."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def alternating_seconds(calls: Mapping[K, Callable[[], Any]], device: torch.device, rounds: int,
                        warmup: int = 1) -> dict[K, list[float]]:
    """Seconds of each call in each of ``rounds`` alternating rounds, after ``warmup`` untimed calls each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds: dict[K, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            seconds[key].append(timed(call, device))
    return seconds


def median_seconds(call: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``call`` over ``repeats`` timed calls, after ``warmup`` untimed ones."""
    return statistics.median(alternating_seconds({0: call}, device, repeats, warmup)[0])


def fastest_seconds(calls: Mapping[K, Callable[[], Any]], device: torch.device, min_time: float,
                    min_rounds: int, max_rounds: int, warmup: int = 1) -> dict[K, float]:
    """Fastest seconds of each call over alternating rounds: at least ``min_rounds``, then more until
    ``min_time`` seconds were timed in all or ``max_rounds`` rounds were taken."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    best = {key: float("inf") for key in calls}
    spent, rounds = 0.0, 0
    while rounds < min_rounds or (spent < min_time and rounds < max_rounds):
        for key, call in calls.items():
            seconds = timed(call, device)
            best[key] = min(best[key], seconds)
            spent += seconds
        rounds += 1
    return best


def best_rates(steppers: Sequence[Callable[[int], Any]], steps: int, repeats: int, items_per_step: int,
               warmup: int = 20) -> list[float]:
    """Best items per second of each stepper over ``repeats`` alternating rounds of ``steps`` calls
    ``step(0..steps-1)`` (each call handles ``items_per_step`` items: envs of a vector step), after
    ``min(warmup, steps)`` untimed calls each. Host work only: nothing is synchronised."""
    best = [0.0] * len(steppers)
    for step in steppers:
        for i in range(min(warmup, steps)):
            step(i)
    for _ in range(repeats):
        for k, step in enumerate(steppers):
            start = time.perf_counter()
            for i in range(steps):
                step(i)
            best[k] = max(best[k], steps * items_per_step / (time.perf_counter() - start))
    return best


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None where either is missing (or ``base`` is 0)."""
    return value / base if value is not None and base else None


# --------------------------------------------------------------------------------------------------
# Memory of a core's window


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of a carried memory state (all batch rows)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def window_inputs(core: MemoryCore, T: int, batch: int, device: torch.device, seed: int,
                  reset_prob: float = 0.01) -> tuple[Tensor, Tensor]:
    """A window's inputs ``x [T, B, D]`` (requiring grad) and episode resets ``[T, B]`` (chance
    ``reset_prob`` each), drawn on the CPU from ``seed`` so that every device sees the same window."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, batch, core.input_size, generator=g).to(device).requires_grad_()
    reset = (torch.rand(T, batch, generator=g) < reset_prob).to(device)
    return x, reset


def forward_backward(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> None:
    """One window forward and the backward of a loss on every output (the parameters' grads accumulate)."""
    y, _ = core(x, state, reset)
    y.square().mean().backward()


def window_bytes(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> int:
    """Bytes one ``forward_backward`` needs beyond parameters and carried state (see the module docstring)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        forward_backward(core, x, state, reset)
        torch.cuda.synchronize(x.device)
        param_grads = sum(p.numel() * p.element_size() for p in core.parameters())
        return max(torch.cuda.max_memory_allocated(x.device) - before - param_grads, 0)

    skip = {t.untyped_storage().data_ptr() for t in [*core.parameters(), *state.values()]}
    storages: dict[int, int] = {}

    def pack_forward(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    live, peak = [0], [0]

    def pack_backward(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() in skip:
            return t
        size = t.numel() * t.element_size()
        live[0] += size
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - size))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_forward, lambda t: t):
        y, _ = core(x, state, reset)
        loss = y.square().mean()
    with torch.autograd.graph.saved_tensors_hooks(pack_backward, lambda t: t):
        loss.backward()
    return sum(storages.values()) + peak[0]


# --------------------------------------------------------------------------------------------------
# Tables and results files


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units, one decimal)."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Column:
    """A table column: its title, its width in characters, and its alignment (``">"`` or ``"<"``)."""

    title: str
    width: int
    align: str = ">"


class Table:
    """A fixed-width table printed as it is measured: ``header()`` prints the titles and a rule, each
    ``row(*cells)`` one line at once (flushed, so a long benchmark shows its progress)."""

    def __init__(self, *columns: Column) -> None:
        self.columns = columns

    def line(self, cells: Sequence[object]) -> str:
        return " ".join(f"{cell!s:{c.align}{c.width}s}" for c, cell in zip(self.columns, cells, strict=True))

    def header(self, rule: bool = True) -> None:
        title = self.line([c.title for c in self.columns])
        print(title)
        if rule:
            print("-" * len(title))

    def row(self, *cells: object) -> None:
        print(self.line(cells), flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The rows as a markdown table, header first (for a results file or a doc)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` whole: to a temporary file first, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=indent))
    partial.replace(path)
