"""The `rlmem` command line: train, eval, list, plot, summary, bench.

Every error a user can cause (config, arguments, env ids, files, a run that diverges) ends in one
message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.distributed.run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

import envs
from agents.base import LEARNERS
from kernels.loader import build_command
from rlmem import config as cfg
from rlmem.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rlmem.distributed import check_divides
from rlmem.errors import ConfigError, TrainingDiverged, writable_dir
from rlmem.evaluation import DEFAULT_EPISODES, DEFAULT_PREDICTION_STEPS, EVAL_SEED, EpisodeScores, evaluate_saved
from rlmem.memory import CORES
from rlmem.plot import GROUPINGS, MAIN_TAGS, diverged, main_tag, plot_runs, scalar_tags, summarize_runs, summary_table
from rlmem.train import rank_checkpoints, resume_config, train

TAG_HELP = (f"the scalar to show (default: the first the first run logs of {', '.join(MAIN_TAGS)}: "
            "a policy's return, or a prediction's error)")

BENCHES = {
    "envs": ("rlmem.bench.envs", "environment steps/s: raw library vs rlmem VecEnv vs rollout with a policy"),
    "memory": ("rlmem.bench.memory", "per-env memory and time per step of rtrl vs bptt as the window grows"),
    "ffm": ("rlmem.bench.ffm", "FFM associative-scan window vs fused GRU, forward+backward"),
    "cfc": ("rlmem.bench.cfc", "CfC per-step time and memory: rtrl vs snap1 vs bptt"),
    "kernels": ("rlmem.bench.kernels", "CUDA sensitivity kernels vs the eager PyTorch reference"),
    "robustness": ("rlmem.bench.robustness", "return of trained runs vs observation noise σ (grouped by seed)"),
    "trace_patterning": ("rlmem.bench.trace_patterning", "CCN paper's prediction benchmark: CCN vs BPTT vs RTRL cores"),
    "popgym": ("rlmem.bench.popgym", "memory cores on POPGym tasks by recurrent PPO: MMER table and learning curves"),
    "distributed": ("rlmem.bench.distributed", "env steps/s of one data-parallel run on 1, 2, ... processes (scaling)"),
    "stream_ac": ("rlmem.bench.stream_ac", "stream_ac env steps/s: per-env gradients by vmap vs batched backward"),
    "population": ("rlmem.bench.population", "learner steps/s of P members in one process vs one process each"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other user error
        self.exit(2, f"rlmem: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlmem", description="Online RL with recurrent memory (RTRL, FFM, CCN, CfC).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train an agent",
        description="rlmem train [CONFIG] [group=choice ...] [section.key=value ...]; "
        "with no CONFIG, the embedded default (a GRU actor-critic on cue_recall, CPU, minutes).",
    )
    train.add_argument("args", nargs="*", help="CONFIG file, group choices (memory=lstm) and dotted overrides")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="data-parallel on this machine: N processes through torch.distributed.run (torchrun), "
                       "each stepping env.num_envs / N envs (one GPU each with train.device=cuda)")

    ev = sub.add_parser(
        "eval",
        help="evaluate the saved policy (return) or prediction (error) of a run",
        description="A policy plays --episodes episodes and reports their return; a prediction (learner td) "
        "follows --steps steps of each stream and reports its mean squared error against the true return.",
    )
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="env.key=value overrides, e.g. env.start_level=1000")
    ev.add_argument("--episodes", type=int, default=None, help=f"of a policy (default {DEFAULT_EPISODES})")
    ev.add_argument("--steps", type=int, default=None,
                    help=f"per stream, of a prediction (default {DEFAULT_PREDICTION_STEPS})")
    ev.add_argument("--num-envs", type=int, default=None)
    ev.add_argument("--seed", type=int, default=EVAL_SEED, help="evaluation seed (differs from training by default)")
    ev.add_argument("--greedy", action="store_true", help="take the most likely action instead of sampling")
    ev.add_argument("--obs-noise", type=float, default=0.0, metavar="SIGMA", help="Gaussian observation noise")
    ev.add_argument("--device", default=None)

    sub.add_parser("list", help="list memory cores, environments and learners with their options")

    plot = sub.add_parser("plot", help="draw learning curves from runs' event files")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("-o", "--output", default="curves.png")
    plot.add_argument("--tag", default=None, help=TAG_HELP)
    plot.add_argument("--title", default=None)
    plot.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged points")

    summary = sub.add_parser(
        "summary",
        help="table of final values and steps to thresholds over groups of seeds",
        description="One markdown row per group of runs (seeds of one configuration, or runs named "
        "<group>_s<seed> with --group-by name): the final value of TAG, mean ± std over runs, and the mean "
        "step at which the mean of TAG over the last --window env steps first reaches each threshold.",
    )
    summary.add_argument("run_dirs", nargs="+")
    summary.add_argument("--tag", default=None, help=TAG_HELP)
    summary.add_argument("--threshold", type=float, action="append", default=[],
                         help="a level to reach (repeat for several)")
    summary.add_argument("--final-fraction", type=float, default=0.1,
                         help="the final value averages this fraction of each run's last steps")
    summary.add_argument("--window", type=float, default=10_000,
                         help="a threshold is reached when the mean over the last WINDOW env steps reaches it")
    for command in (plot, summary):
        command.add_argument("--group-by", choices=GROUPINGS, default="config",
                             help="config: runs differing only by seed; name: directory name without _s<seed>")
        command.add_argument("--until", type=float, default=None, metavar="STEP",
                             help="read runs up to this env step only (equal steps for runs of unequal length)")

    bench = sub.add_parser(
        "bench",
        help="benchmarks (ratios measured side by side in one run)",
        description="\n".join(f"  {name:8s} {text}" for name, (_, text) in BENCHES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("what", help=f"one of: {', '.join(BENCHES)}")
    bench.add_argument("args", nargs=argparse.REMAINDER)

    kernels = sub.add_parser("kernels", help="CUDA kernels: `rlmem kernels build` precompiles them")
    kernels.add_argument("action", choices=["build"])
    kernels.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _cmd_train(ns: argparse.Namespace) -> int:
    if ns.nproc is not None:
        return _launch_train(ns)
    if ns.resume:
        train(resume_config(Path(ns.resume), ns.args), resume=True)
        return 0
    args = list(ns.args)
    config_path = args.pop(0) if args and "=" not in args[0] else None
    config = cfg.load(config_path, args)
    train(config)
    return 0


def _launch_train(ns: argparse.Namespace) -> int:
    """``rlmem train --nproc N ...``: check the config here (one message, before any process starts),
    then start N ranks of ``rlmem train ...`` through torch.distributed.run on this machine."""
    if ns.nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer, got {ns.nproc}")
    args = list(ns.args)
    if ns.resume:
        config = resume_config(Path(ns.resume), args)
        rank_checkpoints(load_checkpoint(Path(ns.resume)), ns.nproc, Path(ns.resume) / CHECKPOINT_NAME)
        args = ["--resume", ns.resume, *args]
    else:
        config_path = args[0] if args and "=" not in args[0] else None
        config = cfg.load(config_path, args[1:] if config_path is not None else args)
    check_divides(int(config.env.get("num_envs", 1)), ns.nproc)
    launcher = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc_per_node", str(ns.nproc), "-m", "rlmem", "train", *args])
    try:
        torchrun.run(launcher)
    except ChildFailedError as err:  # the ranks printed their own messages
        return max((failure.exitcode for failure in err.failures.values()), default=1) or 1
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    run_dir = Path(ns.run_dir)
    _choices, dotted = cfg.parse_overrides(ns.overrides)
    scores = evaluate_saved(
        run_dir, episodes=ns.episodes, steps=ns.steps, seed=ns.seed, obs_noise=ns.obs_noise, greedy=ns.greedy,
        num_envs=ns.num_envs, device=ns.device, overrides=dotted,
    )
    noise = f", obs noise σ={ns.obs_noise}" if ns.obs_noise else ""
    if isinstance(scores, EpisodeScores):
        returns = np.asarray(scores.returns, dtype=np.float64)
        print(
            f"{run_dir}: {len(returns)} episodes, return {returns.mean():.4g} ± {returns.std():.4g} "
            f"(min {returns.min():.4g}, max {returns.max():.4g}), mean length {np.mean(scores.lengths):.1f}{noise}"
        )
    else:
        print(
            f"{run_dir}: prediction error {scores.squared_error:.4g} (mean squared error against the true return "
            f"over {scores.steps} steps x {scores.streams} streams; {scores.zero_squared_error:.4g} for V = 0){noise}"
        )
    return 0


def _describe_options(options_cls: type) -> str:
    parts = []
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        parts.append(f"{f.name}={default!r}")
    return ", ".join(parts)


def _cmd_list(ns: argparse.Namespace) -> int:
    print("memory cores (memory=<name>):")
    for entry in CORES:
        modes = ", ".join(entry.cls.grad_modes)
        print(f"  {entry.name:10s} {entry.summary}\n             grad: {modes}\n             options: "
              f"{_describe_options(entry.options)}")
    print("\nenvironments (env=<name>):")
    for entry in envs.ENVS:
        print(f"  {entry.name:16s} {entry.summary}\n                   options: {_describe_options(entry.options)}")
    print("\nlearners (agent=<name>):")
    for entry in LEARNERS:
        print(f"  {entry.name:14s} {entry.summary}\n                 options: {_describe_options(entry.options)}")
    return 0


def _cmd_plot(ns: argparse.Namespace) -> int:
    if ns.smooth < 1:
        raise ConfigError(f"--smooth must be a positive integer, got {ns.smooth}")
    writable_dir(Path(ns.output).absolute().parent, "the figure")
    run_dirs = _with_members(ns.run_dirs)
    tag = ns.tag or main_tag(_first_not_diverged(run_dirs))
    path = plot_runs(run_dirs, Path(ns.output), tag=tag, title=ns.title, smoothing=ns.smooth,
                     group_by=ns.group_by, until=ns.until)
    print(f"wrote {path}")
    return 0


def _with_members(run_dirs: list[str]) -> list[Path]:
    """The runs to read: a population's run dir stands for its members (each logs as its own run under
    ``members/``, and they group like separate seeds and step sizes); other run dirs as given."""
    expanded = []
    for run_dir in map(Path, run_dirs):
        population = (run_dir / "members").is_dir() and (run_dir / "config.yaml").is_file()
        config = cfg.load_saved(run_dir) if population else None  # other runs' configs are not read here
        if config is not None and cfg.is_population(config):
            grid = config.train.population_grid
            expanded += [cfg.member_run_dir(run_dir, member, grid) for member in cfg.population_members(config)]
        else:
            expanded.append(run_dir)
    return expanded


def _first_not_diverged(run_dirs: list[Path]) -> Path:
    """The run whose tags choose the main tag: the first that did not diverge (one that diverged in its
    first iteration logged no scalar). ConfigError where every run diverged before logging any."""
    for run_dir in run_dirs:
        if diverged(run_dir) is None:
            return run_dir
    first = run_dirs[0]
    if not any(tag in MAIN_TAGS for tag in scalar_tags(first)):
        raise ConfigError(f"every run given diverged, and {first} before it logged anything: {diverged(first)}")
    return first


def _cmd_summary(ns: argparse.Namespace) -> int:
    run_dirs = _with_members(ns.run_dirs)
    tag = ns.tag or main_tag(_first_not_diverged(run_dirs))
    summaries = summarize_runs(run_dirs, tag, ns.threshold, ns.final_fraction, ns.window, ns.group_by, ns.until)
    print(summary_table(summaries, tag, ns.final_fraction))
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    if ns.what not in BENCHES:
        raise ConfigError(f"unknown benchmark {ns.what!r}; valid choices: {', '.join(BENCHES)}")
    module_name = BENCHES[ns.what][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ConfigError(f"benchmark {ns.what!r} is not available in this installation") from None
        raise
    module.run(list(ns.args))
    return 0


def _cmd_kernels(ns: argparse.Namespace) -> int:
    return build_command(list(ns.args))


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "list": _cmd_list,
    "plot": _cmd_plot,
    "summary": _cmd_summary,
    "bench": _cmd_bench,
    "kernels": _cmd_kernels,
}


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except (ConfigError, TrainingDiverged) as err:  # EnvError is a ConfigError
        print(f"rlmem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
