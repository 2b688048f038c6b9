"""``rlmem bench ffm``: forward+backward time of one window, FFM (associative scan) vs the fused GRU.

Both cores hold the same state size (FFM: 2·traces·context reals; GRU: hidden units) and produce the
same output size, and run the same window in the same process, so the printed ratio is the figure to
quote; absolute times depend on the machine. Example::

    rlmem bench ffm                          # B = 8, T = 1024, input 128, state 256, CPU (+ CUDA if present)
    rlmem bench ffm --window 4096 --reset-prob 0.01 --devices cpu
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from rlmem.bench.measure import Column, Table, forward_backward, median_seconds
from rlmem.errors import ConfigError
from rlmem.memory import MemoryCore, make_core


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench ffm", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="envs per window (B)")
    parser.add_argument("--window", type=int, default=1024, help="steps per window (T)")
    parser.add_argument("--input", type=int, default=128, help="core input size (D)")
    parser.add_argument("--state", type=int, default=256, help="reals of state per env (GRU hidden size)")
    parser.add_argument("--traces", type=int, default=32, help="FFM traces m; context c = state / (2 m)")
    parser.add_argument("--reset-prob", type=float, default=0.0, help="chance of an episode reset per step")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions (the median is shown)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rtrl", action="store_true", help="also time ffm with grad: rtrl (exact RTRL window)")
    parser.add_argument("--devices", default="auto", help="comma-separated: cpu, cuda; auto = cpu (+ cuda)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: its default)")
    return parser


def _devices(spec: str) -> list[torch.device]:
    if spec == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = []
    for name in spec.split(","):
        if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
            raise ConfigError(f"--devices: unknown device {name!r}; valid choices: cpu, cuda, cuda:N, auto")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--devices: {name!r} requested but no CUDA device is available")
        devices.append(torch.device(name))
    return devices


def _window_step(core: MemoryCore, x: torch.Tensor, reset: torch.Tensor) -> Callable[[], None]:
    state = core.initial_state(x.shape[1], device=x.device)

    def window() -> None:
        core.zero_grad(set_to_none=True)
        forward_backward(core, x, state, reset)

    return window


def run(argv: list[str]) -> None:
    """Time forward+backward of one window for ``ffm`` (bptt) and ``gru`` on each device; print a table."""
    args = _parser().parse_args(argv)
    for key in ("batch", "window", "input", "state", "traces", "repeats"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.state % (2 * args.traces):
        raise ConfigError(f"--state {args.state} must be a multiple of 2 * --traces ({2 * args.traces})")
    if not 0.0 <= args.reset_prob <= 1.0:
        raise ConfigError(f"--reset-prob must be in [0, 1], got {args.reset_prob}")
    if args.threads:
        torch.set_num_threads(args.threads)
    context = args.state // (2 * args.traces)
    specs = {
        "ffm": {"name": "ffm", "hidden_size": args.state, "grad": "bptt", "traces": args.traces, "context": context},
        "gru": {"name": "gru", "hidden_size": args.state, "grad": "bptt"},
    }
    if args.rtrl:
        specs["ffm-rtrl"] = {**specs["ffm"], "grad": "rtrl"}
    print(
        f"forward+backward of one window: B={args.batch} T={args.window} input={args.input} "
        f"state={args.state} reals (ffm: m={args.traces}, c={context}), reset prob {args.reset_prob}, "
        f"float32, median of {args.repeats}, {torch.get_num_threads()} CPU threads"
    )
    table = Table(Column("device", 8, "<"), Column("core", 8, "<"), Column("ms/window", 10), Column("steps/s", 12),
                  Column("gru/core", 8))
    table.header(rule=False)
    for device in _devices(args.devices):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.window, args.batch, args.input, generator=generator).to(device)
        reset = (torch.rand(args.window, args.batch, generator=generator) < args.reset_prob).to(device)
        seconds = {}
        for name, spec in specs.items():
            torch.manual_seed(0)
            core = make_core(spec, input_size=args.input).to(device)
            seconds[name] = median_seconds(_window_step(core, x, reset), device, args.repeats, args.warmup)
        for name, sec in seconds.items():
            steps = args.window * args.batch / sec
            table.row(device.type, name, f"{sec * 1e3:.1f}", f"{steps:.0f}", f"{seconds['gru'] / sec:.2f}")
