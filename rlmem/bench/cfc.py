"""``rlmem bench cfc``: CfC time per step and memory per env, exact RTRL vs SnAp-1 vs BPTT, side by side.

For each state size n and rank r (and one sparsity), the three learning modes of the ``cfc`` core run
the same forward + backward over one window (x [T, B, D] with input gradients, a few episode resets,
a loss on every output) in one process, from the same parameters. Reported per mode:

* µs per step: the fastest of repeated windows, divided by T; the ratios to BPTT are the figures to
  quote (absolute times depend on the machine and its load);
* state per env: the carried state, h plus the sensitivities (exact RTRL: n·p floats; SnAp-1: one
  float per head parameter plus n per backbone parameter);
* window per env: on CUDA the peak allocation of forward + backward above what was allocated before
  it, less the parameters' gradients; on CPU the bytes autograd keeps: what the forward saves for
  backward (each storage once, parameters and the carried state excluded) plus the peak of what the
  backward saves while it runs (``rlmem.bench.measure.window_bytes``, as ``rlmem bench memory``
  counts it). On CPU this leaves out transient work buffers,
  e.g. exact RTRL's sweep over the window (T·B·n·(rows of every weight) floats while the window's
  injections are summed).

Example::

    rlmem bench cfc                                   # n = 16..128, ranks full, 8, 2; B = 8, T = 32
    rlmem bench cfc --sizes 32,64 --ranks full,4 --sparsity 0.5 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from rlmem.bench import measure
from rlmem.errors import ConfigError
from rlmem.memory import make_core

MODES = ("rtrl", "snap1", "bptt")


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
    parser.add_argument("--sizes", type=measure.positive_ints, default=[16, 32, 64, 128], help="state sizes n")
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


def measure_core(spec: dict, args: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    """(µs per step, carried state bytes per env, window bytes per env) of one forward + backward."""
    torch.manual_seed(args.seed)
    core = make_core(spec, input_size=args.input).to(device)
    state = core.initial_state(args.batch, device=device)
    x, reset = measure.window_inputs(core, args.window, args.batch, device, args.seed)
    window = measure.window_bytes(core, x, state, reset)

    def run() -> None:
        core.zero_grad(set_to_none=True)
        x.grad = None
        measure.forward_backward(core, x, state, reset)

    seconds = measure.fastest_seconds({"run": run}, device, args.min_time, min_rounds=1, max_rounds=20)["run"]
    return seconds / args.window * 1e6, measure.state_bytes(state) / args.batch, window / args.batch


def _fmt_cell(cell: tuple[float, float, float] | None, index: int) -> str:
    """One table entry: index 0 is µs per step, 1 and 2 are bytes per env."""
    if cell is None:
        return "over budget"
    return f"{cell[0]:.0f}" if index == 0 else measure.format_bytes(cell[index])


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
    device = measure.bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"cfc forward + backward of one window: B={args.batch} T={args.window} D={args.input} "
        f"backbone={args.backbone_layers}x n, sparsity {args.sparsity:g}, float32, {measure.device_label(device)}"
    )
    columns = [f"{m} µs/step" for m in modes]
    columns += [f"{m}/bptt" for m in modes if m != "bptt" and "bptt" in modes]
    columns += [f"{m} state/env" for m in modes if m != "bptt"]
    columns += [f"{m} window/env" for m in modes]
    table = measure.Table(measure.Column("n", 4), measure.Column("rank", 4), measure.Column("params", 8),
                          *(measure.Column(c, 16) for c in columns))
    table.header()
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
                    cells[mode] = measure_core({**base, "grad": mode}, args, device)
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
            table.row(n, label, params, *values)
