"""``rlmem bench cfc``: CfC time per step and memory per env, exact RTRL vs SnAp-1 vs BPTT, side by side.

For each state size n and rank r (and one sparsity), the three learning modes of the ``cfc`` core run
the same forward + backward over one window (x [T, B, D] with input gradients, a few episode resets,
a loss on every output) in one process, from the same parameters. Reported per mode:

* µs per step: the fastest of repeated windows, divided by T; the ratios to BPTT are the figures to
  quote (absolute times depend on the machine and its load);
* state per env: the carried state, h plus the sensitivities (exact RTRL: n·p floats; SnAp-1: one
  float per head parameter plus n per backbone parameter);
* window per env: on CUDA the peak allocation of forward + backward above what was allocated before
  it, less the parameters' gradients; on CPU the bytes autograd keeps for backward (each storage
  once, parameters and the carried state excluded). On CPU this leaves out transient work buffers,
  e.g. exact RTRL's sweep over the window (T·B·n·(rows of every weight) floats while the window's
  injections are summed).

Example::

    rlmem bench cfc                                   # n = 16..128, ranks full, 8, 2; B = 8, T = 32
    rlmem bench cfc --sizes 32,64 --ranks full,4 --sparsity 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from rlmem.errors import ConfigError
from rlmem.memory import MemoryCore, make_core

MODES = ("rtrl", "snap1", "bptt")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _ranks(text: str) -> list[int | None]:
    ranks: list[int | None] = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        if item == "full":
            ranks.append(None)
        elif item.isdigit() and int(item) > 0:
            ranks.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"ranks are positive integers or 'full', got {item!r}")
    if not ranks:
        raise argparse.ArgumentTypeError("expected at least one rank")
    return ranks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench cfc", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_int_list, default=[16, 32, 64, 128], help="state sizes n")
    parser.add_argument("--ranks", type=_ranks, default=[None, 8, 2], help="ranks r: integers or 'full'")
    parser.add_argument("--sparsity", type=float, default=0.0, help="fraction of recurrent connections masked")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=8, help="envs B")
    parser.add_argument("--window", type=int, default=32, help="steps per window T")
    parser.add_argument("--input", type=int, default=32, help="core input size D")
    parser.add_argument("--backbone-layers", type=int, default=1, help="CfC backbone layers (0: none)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed repeats per cell")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: its default)")
    parser.add_argument("--budget-mb", type=float, default=1 << 16, help="memory.rtrl_budget_mb for the rtrl rows")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _state_bytes(state: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _forward_backward(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> None:
    y, _ = core(x, state, reset)
    y.square().mean().backward()


def _cpu_window_bytes(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> int:
    """Bytes autograd keeps for backward (each storage once; parameters and the carried state excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in core.parameters()}
    skip |= {v.untyped_storage().data_ptr() for v in state.values()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward_backward(core, x, state, reset)
    return sum(storages.values())


def _cuda_window_bytes(core: MemoryCore, x: Tensor, state: dict[str, Tensor], reset: Tensor) -> int:
    """Peak allocation of forward + backward above the allocation before it, less the parameter grads."""
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    _forward_backward(core, x, state, reset)
    torch.cuda.synchronize(x.device)
    param_grads = sum(p.numel() * p.element_size() for p in core.parameters())
    return max(torch.cuda.max_memory_allocated(x.device) - before - param_grads, 0)


def _fastest_seconds(run: Callable[[], None], device: torch.device, min_time: float) -> float:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up
    times = [timed()]
    while sum(times) < min_time and len(times) < 20:
        times.append(timed())
    return min(times)


def measure(spec: dict, args: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    """(µs per step, carried state bytes per env, window bytes per env) of one forward + backward."""
    torch.manual_seed(args.seed)
    core = make_core(spec, input_size=args.input).to(device)
    state = core.initial_state(args.batch, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.window, args.batch, args.input, generator=generator).to(device).requires_grad_()
    reset = (torch.rand(args.window, args.batch, generator=generator) < 0.01).to(device)
    counter = _cuda_window_bytes if device.type == "cuda" else _cpu_window_bytes
    window_bytes = counter(core, x, state, reset)

    def run() -> None:
        core.zero_grad(set_to_none=True)
        x.grad = None
        _forward_backward(core, x, state, reset)

    seconds = _fastest_seconds(run, device, args.min_time)
    return seconds / args.window * 1e6, _state_bytes(state) / args.batch, window_bytes / args.batch


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_cell(cell: tuple[float, float, float] | None, index: int) -> str:
    """One table entry: index 0 is µs per step, 1 and 2 are bytes per env."""
    if cell is None:
        return "over budget"
    return f"{cell[0]:.0f}" if index == 0 else _fmt_bytes(cell[index])


def run(argv: list[str]) -> None:
    """Parse ``argv``, measure every (n, rank, mode) cell and print the table (see the module docstring)."""
    args = _parser().parse_args(argv)
    for key in ("batch", "window", "input", "threads"):
        if getattr(args, key) < (0 if key == "threads" else 1):
            raise ConfigError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if args.backbone_layers < 0:
        raise ConfigError(f"--backbone-layers must be >= 0, got {args.backbone_layers}")
    if not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ConfigError(f"--modes: unknown mode {unknown[0] if unknown else ''!r}; valid choices: {', '.join(MODES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; valid choices here: cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"cfc forward + backward of one window: B={args.batch} T={args.window} D={args.input} "
        f"backbone={args.backbone_layers}x n, sparsity {args.sparsity:g}, float32, {where}"
    )
    columns = [f"{m} µs/step" for m in modes]
    columns += [f"{m}/bptt" for m in modes if m != "bptt" and "bptt" in modes]
    columns += [f"{m} state/env" for m in modes if m != "bptt"]
    columns += [f"{m} window/env" for m in modes]
    header = f"{'n':>4s} {'rank':>4s} {'params':>8s} | " + " ".join(f"{c:>16s}" for c in columns)
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for rank in args.ranks:
            if rank is not None and rank > n:
                continue
            base = {
                "name": "cfc",
                "hidden_size": n,
                "rank": rank,
                "sparsity": args.sparsity,
                "backbone_layers": args.backbone_layers,
                "rtrl_budget_mb": args.budget_mb,
            }
            cells: dict[str, tuple[float, float, float] | None] = {}
            for mode in modes:
                try:
                    cells[mode] = measure({**base, "grad": mode}, args, device)
                except ConfigError:  # over the rtrl budget
                    cells[mode] = None
            params = sum(p.numel() for p in make_core({**base, "grad": "bptt"}, input_size=args.input).parameters())

            values = [_fmt_cell(cells[m], 0) for m in modes]
            for m in modes:
                if m != "bptt" and "bptt" in modes:
                    cell, reference = cells[m], cells["bptt"]
                    values.append("-" if cell is None or reference is None else f"{cell[0] / reference[0]:.1f}")
            values += [_fmt_cell(cells[m], 1) for m in modes if m != "bptt"]
            values += [_fmt_cell(cells[m], 2) for m in modes]
            label = "full" if rank is None else str(rank)
            print(f"{n:4d} {label:>4s} {params:8d} | " + " ".join(f"{v:>16s}" for v in values))
