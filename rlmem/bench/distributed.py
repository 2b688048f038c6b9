"""``rlmem bench distributed``: env steps/s of one data-parallel run on 1, 2, ... processes of this machine.

Each contender is the same ``rlmem train --nproc N`` run (the same config, ``env.num_envs`` and step
budget, split across N ranks), started in turn as a fresh set of processes; its figure is the
``charts/SPS`` it logged last (every rank's env steps per second since its loop started, so process
start-up and building are left out). Scaling efficiency = (SPS_N / SPS_1) / N. Processes share this
machine's cores (and, with ``train.device=cuda``, take one GPU each: ``LOCAL_RANK``); with more ranks
than GPUs run ``torchrun`` yourself to place them.

Example::

    rlmem bench distributed --nproc 1,2 -- agent=ppo memory=elstm env.num_envs=32 train.total_steps=50000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rlmem.bench.measure import Column, Table, positive_ints
from rlmem.errors import ConfigError
from rlmem.plot import read_scalars

DEFAULT_ARGS = ["env.num_envs=16", "train.total_steps=30000"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=positive_ints, default=[1, 2], help="numbers of processes")
    parser.add_argument("--repeats", type=int, default=1, help="runs per process count (the fastest is shown)")
    parser.add_argument("train_args", nargs="*",
                        help=f"CONFIG and overrides of the run (default: {' '.join(DEFAULT_ARGS)})")
    return parser


def measure(nproc: int, train_args: list[str], run_dir: Path) -> float:
    """The last ``charts/SPS`` of ``rlmem train --nproc nproc`` with ``train_args`` in ``run_dir``."""
    command = [sys.executable, "-m", "rlmem", "train", "--nproc", str(nproc), *train_args,
               f"train.run_dir={run_dir}", "train.progress=false", "train.checkpoint_every=1000000000"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise ConfigError(f"the {nproc}-process run failed: {lines[-1] if lines else done.returncode}")
    _, values = read_scalars(run_dir, "charts/SPS")
    return float(values[-1])


def run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    train_args = args.train_args or DEFAULT_ARGS
    table = Table(Column("processes", 9), Column("env steps/s", 11), Column("speed-up", 8), Column("efficiency", 10))
    table.header()
    base = None
    with tempfile.TemporaryDirectory(prefix="rlmem-bench-distributed-") as tmp:
        for index, nproc in enumerate(args.nproc):
            sps = max(measure(nproc, train_args, Path(tmp) / f"{index}_n{nproc}_r{r}") for r in range(args.repeats))
            base = sps if base is None and nproc == 1 else base
            speedup = None if base is None else sps / base
            table.row(nproc, f"{sps:,.0f}", "-" if speedup is None else f"{speedup:.2f}x",
                      "-" if speedup is None else f"{speedup / nproc:.0%}")
