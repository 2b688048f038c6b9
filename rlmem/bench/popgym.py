"""``rlmem bench popgym``: memory cores compared on POPGym tasks by recurrent PPO, reported as POPGym does.

Every (task, core, seed) is one ordinary training run: the config ``configs/popgym_ppo.yaml`` resolved
with ``env.id=<task> memory=<core> memory.grad=<grad> train.seed=<seed> train.total_steps=<steps>``
and trained by ``rlmem.train.train`` into ``OUT/<task>/<core>-<grad>_s<seed>``. A core is a memory
group (``configs/memory/<core>.yaml`` or a registered core), written ``core`` (with its group's
gradient) or ``core:grad``::

    rlmem bench popgym --tasks popgym-RepeatFirstEasy-v0,popgym-CountRecallEasy-v0 \\
        --cores gru,elstm:rtrl --seeds 3 --steps 1000000 --workers 2 --out runs/bench/popgym

The metric is POPGym's max-mean episodic reward (MMER). Let r(s) be the mean return of the episodes
that ended in the iteration logged at env step s (``charts/episodic_return``; every POPGym task
scales its episode return into [-1, 1]), and W the window (``--window`` env steps)::

    m(s)  = mean of r(s') over the logged s' in (s − W, s]      (for s ≥ W)
    MMER  = max over s of m(s)

i.e. the best mean return over any W consecutive env steps of training (POPGym: the best mean over
one training batch). A run shorter than W has one window, all of it. The table gives per task and
core the mean ± standard error over seeds, and per core the mean over tasks (its standard error
√(Σ s.e.²) / tasks, tasks being independent).

Runs are independent processes (``--workers``, one thread each). A run whose checkpoint has reached
``--steps`` is not run again; one with an earlier checkpoint (interrupted, or finished with fewer
steps) is resumed from it by the library's resume, and a run directory whose saved config differs
from this call's is refused. Ctrl-C stops the study (a running run saves its checkpoint first).
The table (``OUT/results.md``, ``OUT/results.json``) is rewritten as each run finishes, so a study
stopped part way is summarised as far as it got and continued by running the same command again;
the learning curves (``OUT/popgym.png``) are drawn at the end of each call. ``--saved-only`` runs
nothing and writes both for the runs finished so far.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from rlmem import config as cfg
from rlmem.checkpoint import load_checkpoint
from rlmem.errors import ConfigError, writable_dir
from rlmem.plot import read_scalars
from rlmem.train import train

CONFIG_NAME = "popgym_ppo.yaml"
RETURN_TAG = "charts/episodic_return"
# POPGym's Easy tasks with POPGym's tags. The navigation tasks (LabyrinthEscape/Explore) register only
# where `mazelib` is installed (the popgym extra installs it).
DEFAULT_TASKS = (
    "popgym-RepeatPreviousEasy-v0",  # diagnostic
    "popgym-RepeatFirstEasy-v0",  # diagnostic
    "popgym-AutoencodeEasy-v0",  # diagnostic
    "popgym-CountRecallEasy-v0",  # diagnostic, noisy
    "popgym-PositionOnlyCartPoleEasy-v0",  # control (stateless cartpole)
    "popgym-PositionOnlyPendulumEasy-v0",  # control (stateless pendulum)
    "popgym-HigherLowerEasy-v0",  # game, noisy
    "popgym-BattleshipEasy-v0",  # game
    "popgym-MineSweeperEasy-v0",  # game
    "popgym-LabyrinthEscapeEasy-v0",  # navigation
)
DEFAULT_CORES = ("gru", "elstm:rtrl", "lru:rtrl", "ffm", "cfc_lowrank:bptt")
# Settings that may differ between a saved run and this call: where and how long it runs, and how it reports.
RUN_KEYS = {"total_steps", "run_dir", "name", "progress"}


@dataclass(frozen=True)
class Run:
    """One (task, core, seed) of the study and the overrides that make its config."""

    task: str
    core: str  # <memory group>:<grad>, the gradient resolved
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]


def short_task(task: str) -> str:
    """``popgym-RepeatFirstEasy-v0`` -> ``RepeatFirstEasy``."""
    name = task.removeprefix("popgym-")
    return name.rsplit("-v", 1)[0] if "-v" in name else name


def find_config(path: str | None) -> Path:
    """The study's config: ``--config`` if given, else ``configs/popgym_ppo.yaml`` (./configs or the source tree)."""
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config: file not found: {path}")
        return Path(path)
    for directory in cfg.config_search_dirs(None):
        if (directory / CONFIG_NAME).is_file():
            return directory / CONFIG_NAME
    raise ConfigError(f"cannot find configs/{CONFIG_NAME}; pass --config")


def core_overrides(core: str) -> list[str]:
    """``name`` or ``name:grad`` -> the group choice and gradient override it stands for."""
    name, colon, grad = core.partition(":")
    if not name or (colon and not grad) or ":" in grad:
        raise ConfigError(f"--cores: cannot read core {core!r}; expected NAME or NAME:GRAD, e.g. elstm:rtrl")
    return [f"memory={name}", *([f"memory.grad={grad}"] if grad else [])]


def resolve_core(config_file: Path, task: str, core: str, extra: Sequence[str]) -> str:
    """Check a core (and its gradient) against the first task; return it as ``group:grad``."""
    overrides = core_overrides(core)
    try:
        config = cfg.load(str(config_file), [f"env.id={task}", *overrides, *extra])
    except ConfigError as err:
        raise ConfigError(f"--cores {core!r}: {err}") from None
    # the group choice, not the registered core: cfc_lowrank is the cfc core with other options
    return f"{config.choices['memory']}:{config.memory['grad']}"


def check_task(config_file: Path, task: str, extra: Sequence[str]) -> None:
    """Check a task with the options that do not depend on the core (``memory.*`` options are checked
    with each core, by ``resolve_core``: a core's own options are unknown to the config's default core)."""
    try:
        cfg.load(str(config_file), [f"env.id={task}", *(o for o in extra if not o.startswith("memory."))])
    except ConfigError as err:
        hint = "" if task.startswith("popgym-") else f" (POPGym's ids begin with 'popgym-', e.g. {DEFAULT_TASKS[0]})"
        raise ConfigError(f"--tasks {task!r}: {err}{hint}") from None


def plan_runs(config_file: Path, tasks: Sequence[str], cores: Sequence[str], seeds: int, steps: int,
              out: Path, extra: Sequence[str]) -> list[Run]:
    """Every run of the study, each task and core checked before any run starts."""
    for task in tasks:
        check_task(config_file, task, extra)
    resolved = [resolve_core(config_file, tasks[0], core, extra) for core in cores]
    duplicated = sorted({c for c in resolved if resolved.count(c) > 1})
    if duplicated:
        raise ConfigError(f"--cores names {duplicated[0]} twice")
    runs = []
    for task in tasks:
        for core in resolved:
            name, grad = core.split(":")
            for seed in range(seeds):
                run_dir = out / task / f"{name}-{grad}_s{seed}"
                overrides = (f"env.id={task}", f"memory={name}", f"memory.grad={grad}", *extra,
                             f"train.seed={seed}", f"train.total_steps={steps}", f"train.run_dir={run_dir}",
                             "train.torch_threads=1", "train.progress=false")
                runs.append(Run(task, core, seed, run_dir, overrides))
    return runs


def checkpoint_step(run_dir: Path) -> int | None:
    """The global step of a run's checkpoint, or None when it has none."""
    if not (run_dir / "checkpoint.pt").is_file():
        return None
    return int(load_checkpoint(run_dir)["global_step"])


def _comparable(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("choices")
    data["train"] = {k: v for k, v in data["train"].items() if k not in RUN_KEYS}
    return data


def check_saved_config(config_file: Path, run: Run) -> None:
    """Refuse a run directory trained with other settings than this call's (all but its length)."""
    saved = _comparable(cfg.load_saved(run.run_dir))
    wanted = _comparable(cfg.load(str(config_file), list(run.overrides)))
    for section, values in wanted.items():
        for key, value in values.items():
            if saved[section].get(key) != value:
                raise ConfigError(
                    f"{run.run_dir} was trained with {section}.{key}={saved[section].get(key)!r}, this call asks for "
                    f"{value!r}; choose another --out or the same settings"
                )


def train_run(config_file: Path, run: Run, resume_from: int | None, steps: int) -> tuple[float, int]:
    """Train (or continue) one run to ``steps`` env steps, quietly, on one thread; return its seconds and
    the step it reached (short of ``steps`` when Ctrl-C stopped it: the library saves and returns)."""
    started = time.perf_counter()
    if resume_from is None:
        config = cfg.load(str(config_file), list(run.overrides))
    else:
        config = cfg.load_saved(run.run_dir, [f"train.total_steps={steps}"])
        config.train.run_dir = str(run.run_dir)
    if InterruptLatch.requested:
        return 0.0, resume_from or 0
    if resume_from is None:
        for stale in run.run_dir.glob("events.out.tfevents.*"):  # a start that died before its first checkpoint
            stale.unlink()
    train(config, resume=resume_from is not None, log=lambda *_: None)
    reached = checkpoint_step(run.run_dir) or 0
    if reached < steps and InterruptLatch.installed:  # train's handler took the Ctrl-C: start no other run
        InterruptLatch.requested = True
    return time.perf_counter() - started, reached


class InterruptLatch:
    """In a pool worker: a Ctrl-C that arrives between runs (or while one is being set up) is remembered,
    so that the worker starts no run after it. During a run ``train``'s own handler takes over: it
    saves the run's checkpoint and returns."""

    installed = False  # only in pool workers: a study run in-process stops by its own loop
    requested = False

    @classmethod
    def install(cls) -> None:
        cls.installed = True
        signal.signal(signal.SIGINT, cls.request)

    @classmethod
    def request(cls, signum: int, frame: Any) -> None:
        cls.requested = True


def windowed_means(steps: np.ndarray, values: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, m(s)) of the module docstring: the mean of the points logged in (s − window, s], for s ≥ window
    (a run shorter than the window: its last step and the mean of all of it)."""
    if steps[-1] < window:
        return steps[-1:], np.array([values.mean()])
    sums = np.concatenate([[0.0], np.cumsum(values)])
    first = np.searchsorted(steps, steps - window, side="right")
    ends = np.arange(1, len(values) + 1)
    means = (sums[ends] - sums[first]) / (ends - first)
    full = steps >= window
    return steps[full], means[full]


def read_run(run_dir: Path, steps: int, window: float) -> dict[str, Any]:
    """One finished run: its MMER, its windowed learning curve and its env steps/s, up to the end of the
    update that reached ``steps`` (a run trains whole updates, so ``--steps`` below one update still
    gives one; a run trained further for a longer study is read only as far as this one asks)."""
    sps_steps, sps = read_scalars(run_dir, "charts/SPS")
    until = sps_steps[min(np.searchsorted(sps_steps, steps), len(sps_steps) - 1)]
    sps_steps, sps = sps_steps[sps_steps <= until], sps[sps_steps <= until]
    try:
        logged, returns = read_scalars(run_dir, RETURN_TAG, until=until)
    except ConfigError:  # no episode ended within the run
        return {"mmer": float("nan"), "curve_steps": [], "curve": [], "steps": int(sps_steps[-1]),
                "steps_per_second": float(sps[-1])}
    # A resumed run logs again the steps after its last checkpoint: keep the last value logged at each step.
    last = len(logged) - 1 - np.unique(logged[::-1], return_index=True)[1]
    logged, returns = logged[last], returns[last]
    curve_steps, curve = windowed_means(logged, returns, window)
    return {"mmer": float(curve.max()), "curve_steps": curve_steps.tolist(), "curve": curve.tolist(),
            "steps": int(sps_steps[-1]), "steps_per_second": float(sps[-1])}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    mean = float(np.mean(values))
    stderr = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return mean, stderr


def summarise(results: dict[Run, dict[str, Any]], tasks: Sequence[str], cores: Sequence[str]) -> dict[str, Any]:
    """Per task and core: the seeds' MMERs, mean and standard error; per core: the mean over tasks."""
    cells: dict[str, dict[str, Any]] = {}
    for task in tasks:
        cells[task] = {}
        for core in cores:
            mmers = [r["mmer"] for run, r in sorted(results.items(), key=lambda item: item[0].seed)
                     if run.task == task and run.core == core]
            if mmers:
                mean, stderr = mean_and_stderr(mmers)
                cells[task][core] = {"mmer": mean, "stderr": stderr, "seeds": len(mmers), "per_seed": mmers}
    overall = {}
    for core in cores:
        done = [cells[task][core] for task in tasks if core in cells[task]]
        if done:
            errors = [c["stderr"] for c in done]
            overall[core] = {
                "mmer": float(np.mean([c["mmer"] for c in done])),
                "stderr": math.sqrt(sum(e * e for e in errors)) / len(done),
                "tasks": len(done),
                "steps_per_second": float(np.mean([r["steps_per_second"] for run, r in results.items()
                                                   if run.core == core])),
            }
    return {"cells": cells, "mean_over_tasks": overall}


def _cell(entry: dict[str, Any] | None, total_tasks: int | None = None) -> str:
    if entry is None:
        return "—"
    text = f"{entry['mmer']:.3f}"
    if not math.isnan(entry["stderr"]):
        text += f" ± {entry['stderr']:.3f}"
    if total_tasks is not None and entry["tasks"] < total_tasks:
        text += f" ({entry['tasks']}/{total_tasks} tasks)"
    return text


def markdown_table(summary: dict[str, Any], tasks: Sequence[str], cores: Sequence[str]) -> str:
    """POPGym's table: a row per task, a column per core, MMER mean ± s.e. over seeds; a final mean row."""
    lines = ["| task | " + " | ".join(cores) + " |", "|---|" + "---|" * len(cores)]
    for task in tasks:
        cells = [_cell(summary["cells"][task].get(core)) for core in cores]
        lines.append(f"| {short_task(task)} | " + " | ".join(cells) + " |")
    overall = [_cell(summary["mean_over_tasks"].get(core), len(tasks)) for core in cores]
    lines.append("| **mean over tasks** | " + " | ".join(overall) + " |")
    return "\n".join(lines)


def write_results(out: Path, settings: dict[str, Any], results: dict[Run, dict[str, Any]], tasks: Sequence[str],
                  cores: Sequence[str]) -> str:
    """Write OUT/results.md and OUT/results.json (written whole, then renamed); return the table."""
    summary = summarise(results, tasks, cores)
    table = markdown_table(summary, tasks, cores)
    seeds = sorted({c["seeds"] for cells in summary["cells"].values() for c in cells.values()})
    header = (f"POPGym MMER (max over training of the mean episodic return over {settings['window']:,} env steps), "
              f"mean ± s.e. over {'/'.join(map(str, seeds)) or 0} seed(s), {settings['steps']:,} env steps per run, "
              f"{len(results)} finished run(s).\n\n")
    speeds = ", ".join(f"{core} {entry['steps_per_second']:,.0f}" for core, entry in summary["mean_over_tasks"].items())
    text = header + table + f"\n\nenv steps/s per run (one thread): {speeds}\n"
    runs = [{"task": run.task, "core": run.core, "seed": run.seed, "run_dir": str(run.run_dir), **result}
            for run, result in sorted(results.items(), key=lambda item: (item[0].task, item[0].core, item[0].seed))]
    payload = {"settings": settings, "summary": summary, "runs": runs}
    for name, content in (("results.md", text), ("results.json", json.dumps(payload, indent=1))):
        partial = out / f"{name}.partial"
        partial.write_text(content)
        partial.replace(out / name)
    return table


def plot(results: dict[Run, dict[str, Any]], tasks: Sequence[str], cores: Sequence[str], window: float,
         path: Path) -> None:
    """One subplot per task: per core the windowed mean return m(s), mean ± s.e. over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    lines = {}  # a line of each core drawn on any task, for the figure's legend
    for ax, task in zip(axes.flat, tasks):
        seeds = []  # per core drawn: its seeds here (a study in progress has fewer on some tasks)
        for i, core in enumerate(cores):
            curves = [r for run, r in results.items() if run.task == task and run.core == core and r["curve"]]
            if not curves:
                continue
            seeds.append(len(curves))
            end = min(r["curve_steps"][-1] for r in curves)
            start = max(r["curve_steps"][0] for r in curves)
            grid = np.linspace(start, end, 100) if end > start else np.array([end])
            stacked = np.stack([np.interp(grid, r["curve_steps"], r["curve"]) for r in curves])
            mean = stacked.mean(0)
            (lines[core],) = ax.plot(grid, mean, color=f"C{i}", marker="o" if len(grid) == 1 else None)
            if len(curves) > 1:
                stderr = stacked.std(0, ddof=1) / math.sqrt(len(curves))
                ax.fill_between(grid, mean - stderr, mean + stderr, color=f"C{i}", alpha=0.2, linewidth=0)
        title = short_task(task)
        if seeds:
            counts = f"{min(seeds)}" if min(seeds) == max(seeds) else f"{min(seeds)}–{max(seeds)}"
            title += f" ({counts} seed{'s' if max(seeds) > 1 else ''})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"mean return over {window:,.0f} steps")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    labels = [core for core in cores if core in lines]
    fig.legend([lines[core] for core in labels], labels, loc="lower center", ncol=min(len(cores), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench popgym", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated POPGym gymnasium ids")
    parser.add_argument("--cores", default=",".join(DEFAULT_CORES),
                        help="comma-separated memory cores, NAME or NAME:GRAD (rtrl, bptt, snap1)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per task and core (0..seeds-1)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="env steps per run")
    parser.add_argument("--window", type=int, default=65_536,
                        help="MMER: env steps over which the episodic return is averaged (POPGym's training batch)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (processes, one thread each)")
    parser.add_argument("--out", default="runs/bench/popgym", help="directory of the runs, the table and the figure")
    parser.add_argument("--config", default=None, help=f"the shared run config (default: configs/{CONFIG_NAME})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="an override applied to every run, e.g. memory.hidden_size=128 (part of the settings)")
    parser.add_argument("--saved-only", action="store_true",
                        help="run nothing: write the table and figure of the runs finished so far (a study in "
                             "progress, or one running elsewhere)")
    return parser


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    for key in ("seeds", "steps", "window", "workers"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(args, key)}")
    tasks, core_specs = _items(args.tasks), _items(args.cores)
    if not tasks or not core_specs:
        raise ConfigError("--tasks and --cores must each name at least one")
    if len(set(tasks)) != len(tasks):
        raise ConfigError("--tasks names a task twice")
    choices, extra = cfg.parse_overrides(args.overrides)
    if choices or any(o.split("=", 1)[0] in ("env.id", "memory.grad", "train.seed", "train.total_steps",
                                                 "train.run_dir") for o in extra):
        raise ConfigError("--set takes SECTION.KEY=VALUE options; tasks, cores, seeds, steps and --out have their "
                          "own flags")
    config_file = find_config(args.config)
    out = Path(args.out)
    runs = plan_runs(config_file, tasks, core_specs, args.seeds, args.steps, out, extra)
    cores = list(dict.fromkeys(run.core for run in runs))
    settings = {"config": str(config_file), "overrides": extra, "tasks": tasks, "cores": cores, "seeds": args.seeds,
                "steps": args.steps, "window": args.window}
    print(f"POPGym: {len(tasks)} task(s) x {len(cores)} core(s) x {args.seeds} seed(s) x {args.steps:,} steps, "
          f"{args.workers} worker(s), into {out}", flush=True)

    results: dict[Run, dict[str, Any]] = {}
    pending: list[tuple[Run, int | None]] = []
    for run_ in runs:
        step = checkpoint_step(run_.run_dir)
        if step is not None:
            check_saved_config(config_file, run_)
        label = f"{short_task(run_.task)} {run_.core} s{run_.seed}"
        if step is not None and step >= args.steps:
            print(f"  skip {label}: finished (step {step:,})", flush=True)
            results[run_] = read_run(run_.run_dir, args.steps, args.window)
        else:
            pending.append((run_, step))
    if args.saved_only:
        if not results:
            raise ConfigError(f"--saved-only: none of these runs has finished under {out}")
        print(f"  leaving out {len(pending)} run(s) not finished yet", flush=True)
        pending = []
    writable_dir(out, "the runs, table and figure")
    if results:
        write_results(out, settings, results, tasks, cores)

    def announce(run_: Run, step: int | None) -> None:
        what = "start" if step is None else f"resume from step {step:,}:"
        print(f"  {what} {short_task(run_.task)} {run_.core} s{run_.seed}", flush=True)

    failed, stopped = [], []

    def finished(run_: Run, outcome: tuple[float, int] | Exception) -> None:
        label = f"{short_task(run_.task)} {run_.core} s{run_.seed}"
        if isinstance(outcome, Exception):  # a diverged run, say: the others go on, a rerun retries it
            failed.append(run_)
            print(f"  FAILED {label}: {outcome}", flush=True)
            return
        seconds, reached = outcome
        if reached < args.steps:  # Ctrl-C: the run saved its checkpoint and returned
            stopped.append(run_)
            print(f"  stopped {label} at step {reached:,}", flush=True)
            return
        results[run_] = read_run(run_.run_dir, args.steps, args.window)
        write_results(out, settings, results, tasks, cores)
        print(f"  done {label}: MMER {results[run_]['mmer']:.3f} ({seconds:.0f} s, "
              f"{results[run_]['steps_per_second']:,.0f} steps/s) [{len(results)}/{len(runs)}]", flush=True)

    if args.workers == 1:
        for run_, step in pending:
            announce(run_, step)
            try:
                outcome: tuple[float, int] | Exception = train_run(config_file, run_, step, args.steps)
            except Exception as err:
                outcome = err
            finished(run_, outcome)
            if stopped:
                break
    elif pending:
        # spawn, not fork: a forked child would inherit PyTorch's thread pools in whatever state they are
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"),
                                 initializer=InterruptLatch.install) as pool:
            futures = {}
            for run_, step in pending:
                announce(run_, step)  # queued: the pool starts it as a worker frees up
                futures[pool.submit(train_run, config_file, run_, step, args.steps)] = run_
            try:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    try:
                        outcome = future.result()
                    except Exception as err:
                        outcome = err
                    finished(futures[future], outcome)
                    if stopped:  # a Ctrl-C reached the runs but not this process: start no other run either
                        for queued in futures:
                            queued.cancel()
            except KeyboardInterrupt:
                # The running runs got the same Ctrl-C: they save their checkpoints and return. Start no other.
                pool.shutdown(wait=True, cancel_futures=True)
                for future, run_ in futures.items():  # those that returned (a worker stopped while starting did not)
                    if (future.done() and not future.cancelled() and future.exception() is None
                            and run_ not in {*results, *stopped}):
                        finished(run_, future.result())
                write_results(out, settings, results, tasks, cores)
                raise

    table = write_results(out, settings, results, tasks, cores)
    plot(results, tasks, cores, args.window, out / "popgym.png")
    print(f"\n{table}\n\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'popgym.png'}")
    if args.saved_only and len(results) < len(runs):
        print(f"{len(results)} of {len(runs)} runs finished; the command without --saved-only continues the study")
    elif failed or stopped:
        print(f"{len(failed)} run(s) failed, {len(stopped)} stopped (see above), "
              f"{len(runs) - len(results)} of {len(runs)} not finished; the same command again continues the study")
