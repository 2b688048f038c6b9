"""``rlmem bench population``: learner steps/s of a population of P members against one process per member.

Each method of the trace-patterning comparison (``rlmem.bench.trace_patterning.METHODS``: its core,
step size and BPTT window, the ``td`` learner, one stream per member) runs

* alone: one learner, as one process of a study runs it (``train.population: 1``);
* as a population of P members (``agents.population``: seeds 0..P−1, one vmapped step).

Both run in this process on one thread, their timed iterations interleaved so that both see the same
machine load. P separate processes on P cores each reach the alone rate, so the alone rate is the
member-steps/s per core of "one process per member", and the ratio ``population / alone`` is the
speed-up per core (the figure the issue asks for; it does not depend on how many cores a machine has
or how busy the others are). Every member step is a full TD(λ) step: env step, forward, gradient,
update.

Example::

    rlmem bench population --members 1,8,32,128 --methods elstm,lru,ccn,lstm_tbptt15
    rlmem bench population --members 1,256,1024 --methods elstm,ccn --device cuda   # on a GPU

``--stage S`` times the ``ccn``-family methods at their stage S (0-based; the frozen stages before it
run too, as late in a study's run), where the default, a fresh learner, times stage 0 alone.

``--compile`` adds the population compiled (``train.compile``), timed in the same rounds, and its
member-steps/s against the uncompiled population's; compiling happens in the untimed warm-up.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from agents.population import POPULATIONS
from rlmem.bench.measure import Column, Table, alternating_seconds, positive_ints, write_json
from rlmem.bench.trace_patterning import METHODS, Protocol, run_config
from rlmem.errors import ConfigError, writable_dir
from rlmem.train import build

DEFAULT_METHODS = ("elstm", "lru", "ccn", "lstm_tbptt15")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench population", description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=positive_ints, default=[1, 8, 32], help="population sizes P")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods of `rlmem bench trace_patterning` ({', '.join(METHODS)})")
    parser.add_argument("--steps", type=int, default=40, help="learner steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is shown)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where the learners run (both ways)")
    parser.add_argument("--stage", type=int, default=0,
                        help="time ccn-family methods at this stage (0-based, up to their last)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each population compiled (train.compile), side by side")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    return parser


def _learners(name: str, seeds: range, steps: int, device: str, stage: int = 0) -> list[Any]:
    """Ordinary ``td`` learners of method ``name``, one per seed, built as their runs would build them;
    a ``ccn``-family core advanced to ``stage`` (its last if it has fewer)."""
    protocol = Protocol("trace_patterning", steps=10**8, log_every=steps, num_envs=1)
    built = [build(run_config(METHODS[name], seed, protocol, Path("unused"), device)) for seed in seeds]
    learners = [learner for _, learner, _ in built]
    for learner in learners:
        core = learner.network.core
        if hasattr(core, "steps_per_stage"):
            core.steps_seen = min(stage, core.num_stages - 1) * core.steps_per_stage
    return learners


def run(argv: list[str]) -> None:
    """Time ``steps`` steps alone and as populations of each size, per method; print a table."""
    args = _parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; valid choices: {', '.join(METHODS)}")
    if args.steps <= 0 or args.repeats <= 0:
        raise ConfigError("--steps and --repeats must be positive")
    if args.stage < 0:
        raise ConfigError(f"--stage must be >= 0, got {args.stage}")
    if args.out is not None:
        writable_dir(args.out.absolute().parent, "the table")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is available here")
    torch.set_num_threads(1)
    stage = f", ccn-family cores at stage {args.stage}" if args.stage else ""
    print(f"td on trace_patterning, one stream per member, {args.steps} steps per repeat, median of "
          f"{args.repeats}, 1 CPU thread, learners on {device}{stage}")
    columns = [Column("method", 13), Column("P", 4), Column("alone steps/s", 14),
               Column("population member-steps/s", 27), Column("speed-up", 9)]
    if args.compile:
        columns += [Column("compiled member-steps/s", 24), Column("compiled / population", 21)]
    table = Table(*columns)
    table.header(rule=False)
    rows = []
    for name in methods:
        for size in args.members:
            options = {"steps": args.steps, "device": args.device, "stage": args.stage}
            alone = _learners(name, range(1), **options)[0]
            populations = {"population": POPULATIONS["td"](_learners(name, range(size), **options))}
            if args.compile:
                populations["compiled"] = POPULATIONS["td"](_learners(name, range(size), **options), compile=True)
            calls = {"alone": alone.iteration, **{key: p.iteration for key, p in populations.items()}}
            seconds = alternating_seconds(calls, device, args.repeats)
            alone_rate = args.steps / statistics.median(seconds["alone"])
            member_rate = size * args.steps / statistics.median(seconds["population"])
            row = {"method": name, "members": size, "alone_steps_per_s": alone_rate,
                   "member_steps_per_s": member_rate, "speedup": member_rate / alone_rate}
            cells = [name, size, f"{alone_rate:.0f}", f"{member_rate:.0f}", f"{member_rate / alone_rate:.1f}x"]
            if args.compile:
                compiled_rate = size * args.steps / statistics.median(seconds["compiled"])
                row.update(compiled_member_steps_per_s=compiled_rate, compiled_speedup=compiled_rate / member_rate)
                cells += [f"{compiled_rate:.0f}", f"{compiled_rate / member_rate:.2f}x"]
            rows.append(row)
            table.row(*cells)
            for learner in [alone, *(m for p in populations.values() for m in p.members)]:
                learner.env.close()
    if args.out is not None:
        write_json(args.out, {"steps": args.steps, "repeats": args.repeats, "device": str(device), "stage": args.stage,
                              "compile": args.compile, "rows": rows},
                   indent=1)
