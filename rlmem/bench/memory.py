"""``rlmem bench memory``: memory per env and time per step of ``rtrl`` vs ``bptt`` as the window grows.

For each core and window length T, both modes run the same forward + backward over one window
(x [T, B, D] with input gradients, a few episode resets, a loss on every output), side by side in
one process, their timed repeats interleaved. Memory per env is

* on CPU: what autograd keeps, via ``saved_tensors_hooks``: the tensors the forward saves for
  backward (each storage counted once; parameters and the carried state excluded), plus the peak of what the backward
  saves while it runs (RTRL's recomputation of one chunk of per-step coefficients), plus the
  carried state (sensitivities included);
* on CUDA: the peak allocation of the forward + backward above what was allocated before it
  (``torch.cuda.max_memory_allocated``), less the parameters' gradients, plus the carried state.

It splits into a part that does not depend on T (the carried state: for RTRL the sensitivities,
2·N·D + O(N) per env) and a per-step part, printed as the growth per step and env between the two
longest windows. RTRL keeps no sensitivity per step, so its per-step part is only the window's own
values (inputs, h_t, the readout's activations), while BPTT also keeps every step's gate activations.

Example::

    rlmem bench memory --cores elstm,lru,gru --windows 1,4,16,64,256,1024 --batch 8 --hidden 64 --input 64
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from rlmem.bench.measure import (
    Column,
    Table,
    bench_device,
    device_label,
    fastest_seconds,
    format_bytes,
    forward_backward,
    positive_ints,
    state_bytes,
    window_bytes,
    window_inputs,
)
from rlmem.errors import ConfigError
from rlmem.memory import CORES, make_core


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="elstm,lru,gru", help="comma-separated core names")
    parser.add_argument("--windows", type=positive_ints, default=[1, 4, 16, 64, 256, 1024], help="window lengths T")
    parser.add_argument("--batch", type=int, default=8, help="envs B")
    parser.add_argument("--hidden", type=int, default=64, help="hidden_size N")
    parser.add_argument("--input", type=int, default=64, help="core input size D")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed repeats per row")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def measure(
    name: str, modes: list[str], T: int, args: argparse.Namespace, device: torch.device
) -> dict[str, tuple[float, float]]:
    """{grad: (bytes per env, µs per step)} of one forward + backward over a window of T steps.

    The modes' repeats alternate, so that both see the same machine load; each keeps its fastest."""
    runs: dict[str, Callable[[], None]] = {}
    memory: dict[str, float] = {}
    for grad in modes:
        torch.manual_seed(args.seed)
        core = make_core({"name": name, "hidden_size": args.hidden, "grad": grad}, input_size=args.input).to(device)
        state = core.initial_state(args.batch, device=device)
        x, reset = window_inputs(core, T, args.batch, device, args.seed)
        memory[grad] = (window_bytes(core, x, state, reset) + state_bytes(state)) / args.batch

        def run(core=core, x=x, state=state, reset=reset) -> None:
            core.zero_grad(set_to_none=True)
            x.grad = None
            forward_backward(core, x, state, reset)

        runs[grad] = run
    best = fastest_seconds(runs, device, args.min_time, min_rounds=2, max_rounds=50)
    return {grad: (memory[grad], best[grad] / T * 1e6) for grad in modes}


def run(argv: list[str]) -> None:
    """Parse ``argv`` and print the table (see the module docstring)."""
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.cores.split(",") if n.strip()]
    for n in names:
        CORES.get(n)  # names the valid choices for an unknown core
    for key in ("batch", "hidden", "input"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    windows = sorted(set(args.windows))

    print(
        f"memory per env and time per step, forward + backward of one window "
        f"(B={args.batch}, N={args.hidden}, D={args.input}, float32, {device_label(device)})"
    )
    table = Table(Column("core", 6, "<"), Column("T", 5), Column("rtrl mem/env", 12), Column("bptt mem/env", 12),
                  Column("rtrl us/step", 12), Column("bptt us/step", 12), Column("time rtrl/bptt", 14))
    table.header()
    for name in names:
        modes = [g for g in ("rtrl", "bptt") if g in CORES.get(name).cls.grad_modes]
        rows: dict[str, list[tuple[float, float]]] = {g: [] for g in modes}
        for T in windows:
            cells = measure(name, modes, T, args, device)
            for g in modes:
                rows[g].append(cells[g])
            mem = {g: format_bytes(cells[g][0]) if g in cells else "-" for g in ("rtrl", "bptt")}
            us = {g: f"{cells[g][1]:.1f}" if g in cells else "-" for g in ("rtrl", "bptt")}
            ratio = f"{cells['rtrl'][1] / cells['bptt'][1]:.2f}" if len(cells) == 2 else "-"
            table.row(name, T, mem["rtrl"], mem["bptt"], us["rtrl"], us["bptt"], ratio)
        if len(windows) >= 2:
            span = windows[-1] - windows[-2]
            growth = ", ".join(f"{g} {format_bytes((rows[g][-1][0] - rows[g][-2][0]) / span)}/step" for g in modes)
            carried = ", ".join(f"{g} {format_bytes(rows[g][0][0])} at T={windows[0]}" for g in modes)
            print(f"{'':6s} per env: {carried}; growth per step {growth}")
