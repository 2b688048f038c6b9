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
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from rlmem.errors import ConfigError
from rlmem.memory import CORES, MemoryCore, make_core


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="elstm,lru,gru", help="comma-separated core names")
    parser.add_argument("--windows", type=_int_list, default=[1, 4, 16, 64, 256, 1024], help="window lengths T")
    parser.add_argument("--batch", type=int, default=8, help="envs B")
    parser.add_argument("--hidden", type=int, default=64, help="hidden_size N")
    parser.add_argument("--input", type=int, default=64, help="core input size D")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed repeats per row")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _state_bytes(state: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _window_inputs(core: MemoryCore, T: int, batch: int, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, batch, core.input_size, generator=g).to(device).requires_grad_()
    reset = (torch.rand(T, batch, generator=g) < 0.01).to(device)
    return x, reset


def _forward_backward(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> None:
    y, _ = core(x, state, reset)
    y.square().mean().backward()


def _cpu_bytes(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> int:
    """Bytes autograd keeps: what the forward saves for backward (each storage once; parameters and
    the carried state, counted apart, excluded) plus the peak of what the backward itself saves while
    it runs (a recomputation)."""
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


def _cuda_bytes(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> int:
    """Peak allocation of forward + backward above the allocation before it, less parameter grads."""
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    _forward_backward(core, x, state, reset)
    torch.cuda.synchronize(x.device)
    param_grads = sum(p.numel() * p.element_size() for p in core.parameters())
    return max(torch.cuda.max_memory_allocated(x.device) - before - param_grads, 0)


def _timed(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


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
        x, reset = _window_inputs(core, T, args.batch, device, args.seed)
        counter = _cuda_bytes if device.type == "cuda" else _cpu_bytes
        memory[grad] = (counter(core, x, state, reset) + _state_bytes(state)) / args.batch

        def run(core=core, x=x, state=state, reset=reset) -> None:
            core.zero_grad(set_to_none=True)
            x.grad = None
            _forward_backward(core, x, state, reset)

        runs[grad] = run
    for run in runs.values():
        run()  # warm-up
    best = {grad: float("inf") for grad in runs}
    spent, repeats = 0.0, 0
    while repeats < 2 or (spent < args.min_time and repeats < 50):
        for grad, run in runs.items():
            seconds = _timed(run, device)
            best[grad] = min(best[grad], seconds)
            spent += seconds
        repeats += 1
    return {grad: (memory[grad], best[grad] / T * 1e6) for grad in modes}


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


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
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; valid choices here: cpu")
    windows = sorted(set(args.windows))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"memory per env and time per step, forward + backward of one window "
        f"(B={args.batch}, N={args.hidden}, D={args.input}, float32, {where})"
    )
    header = f"{'core':6s} {'T':>5s} | {'rtrl mem/env':>12s} {'bptt mem/env':>12s} | "
    header += f"{'rtrl us/step':>12s} {'bptt us/step':>12s} {'time rtrl/bptt':>14s}"
    print(header)
    print("-" * len(header))
    for name in names:
        modes = [g for g in ("rtrl", "bptt") if g in CORES.get(name).cls.grad_modes]
        rows: dict[str, list[tuple[float, float]]] = {g: [] for g in modes}
        for T in windows:
            cells = measure(name, modes, T, args, device)
            for g in modes:
                rows[g].append(cells[g])
            mem = {g: _fmt_bytes(cells[g][0]) if g in cells else "-" for g in ("rtrl", "bptt")}
            us = {g: f"{cells[g][1]:.1f}" if g in cells else "-" for g in ("rtrl", "bptt")}
            ratio = f"{cells['rtrl'][1] / cells['bptt'][1]:.2f}" if len(cells) == 2 else "-"
            print(
                f"{name:6s} {T:5d} | {mem['rtrl']:>12s} {mem['bptt']:>12s} | "
                f"{us['rtrl']:>12s} {us['bptt']:>12s} {ratio:>14s}"
            )
        if len(windows) >= 2:
            span = windows[-1] - windows[-2]
            growth = ", ".join(f"{g} {_fmt_bytes((rows[g][-1][0] - rows[g][-2][0]) / span)}/step" for g in modes)
            carried = ", ".join(f"{g} {_fmt_bytes(rows[g][0][0])} at T={windows[0]}" for g in modes)
            print(f"{'':6s} per env: {carried}; growth per step {growth}")
