"""``rlmem bench trace_patterning``: the CCN paper's comparison of recurrent learners on trace patterning.

Every method learns online by TD(λ) (``agents.td``: λ = 0.99, γ = 0.9, the normalised step with bias
correction, one stream per run as in the paper) on ``trace_patterning`` (12 inputs, ISI 24..36, ITI
80..120, 5 distractors), from the raw observation (identity encoder) through its memory core into a
linear readout. The metric is the paper's: the squared error of the prediction against the true
return, mean over the last ``--window`` steps of each run; the table reports its mean and standard
error over seeds, and the plot shows learning curves (mean ± s.e. over seeds) and the final errors.
Both include the reference V = 0 (nothing learned: the mean of G² over the same streams).

Methods (sizes as in the paper where it gives them; per-step compute roughly matched, see the
``MACs/step`` column):

* ``ccn``: 20 columns in stages of 4, a new stage every ``steps / 5`` (the paper's "20:4:10M" of 50M);
* ``columnar``: 7 independent columns ("7:7");
* ``constructive``: 10 columns, one per stage, a new one every ``steps / 10`` ("10:1:5M");
* ``lstm_tbptt15`` / ``lstm_tbptt40``: an LSTM of 4 / 2 units whose gradient is truncated after 15 /
  40 steps, i.e. below / above the longest ISI of 36 (the paper's truncated-BPTT baseline);
* ``elstm`` / ``lru``: 16-unit element-wise LSTM / linear recurrent unit with exact RTRL.

``MACs/step`` is an estimate of the multiply-adds one learning step costs: for RTRL cores, the core's
weights used per step (forward) plus 4 per sensitivity entry (carry by the Jacobian, injection and
gradient); for truncated BPTT, 3 × (window length) × the core's weights (forward and backward over the
window every step). Wall-clock time is also reported, but at these sizes it measures Python overhead,
not arithmetic.

Each run learns from ``--num-envs`` streams (1, the paper's protocol, by default): with more, one
learner takes one TD(λ) update per step from the mean of the streams' δ·z (each stream keeps its own
trace), which puts more data through per unit of compute but is not the single-stream setting.
``MACs/step`` counts one stream. Runs are independent processes (``--workers``), one thread each::

    rlmem bench trace_patterning --steps 300000 --seeds 5 --workers 2 --out runs/bench/trace_patterning

``--task trace_conditioning`` runs the same comparison on the memory-only variant (one CS, every trial
followed by the US): a check that a method can learn the timing at all before it must also read the
pattern.

Every learner's run is an ordinary training run (``rlmem.train.train`` on a config resolved by
``rlmem.config``: the method's core, the ``td`` learner with its group file's λ and optimiser, the
method's step size and BPTT window), written as a run dir under ``OUT/train/`` (config, TensorBoard
events, final checkpoint; ``rlmem plot`` reads them); its learning curve is the loop's logged
``charts/prediction_error``, one point per iteration of ``--log-every`` env steps.

``--population`` runs each method's seeds as one population instead (``train.population``,
``agents.population``: the seeds' learners stepped together in one process, each member exactly the
run it would be alone up to rounding, about 10x the runs per CPU core at 32 members): one training
run dir ``OUT/train/<method>-seeds<first>-<last>-<digest>`` whose ``members/member_s<seed>``
sub-runs hold each seed's curve; every seed's result is saved as its own run, as without it.

``--lr-factors 0.3,1,3`` sweeps the step size: every method runs at each multiple of its own step size,
the table reports each method at its best (the lowest mean final error over seeds) and a second table
the whole sweep, and the figure adds each method's final error against its step size; with
``--population`` a method's step sizes and seeds are one population (its ``train.population_grid``), so
a sweep of 10 seeds × 3 step sizes is one process per method.

The full comparison takes CPU-hours, so every finished run is saved at once under ``OUT/runs/`` and a
later call with the same settings (steps, streams, curve spacing, step size) reuses it instead of
running it again: an interrupted benchmark resumes where it stopped, and more seeds or methods can be
added to an existing one. A training run stopped part way (Ctrl-C, or the machine going away) keeps its
checkpoint (every ``CHECKPOINT_EVERY`` steps) in ``OUT/train/``, and the next call continues it there,
also when it adds seeds or step sizes: a stopped population goes on as it was, and only the added
members form new ones.
``--results DIR`` saves and looks up the finished runs there instead of ``OUT/runs/``: a few kB of
JSON per run (its settings and curve), so a study's directory of results can live in version control
and carry over to another machine, where the training runs and their checkpoints (``OUT/train/``,
megabytes) do not.
``--no-reuse`` runs everything afresh; ``--saved-only`` runs nothing,
summarises the runs saved so far (while the study is still running elsewhere, say) and lists the
training runs in progress with the step of their last checkpoint and, where V = 0 is saved, their error
so far as a fraction of V = 0's, per step size. ``--lr METHOD=LR`` and
``--set METHOD.KEY=VALUE`` (a core option, e.g. ``columnar.normalizer_decay=0.9999``, or a truncated-BPTT
method's window, ``lstm_tbptt40.unroll_length=30``) vary a method; both
are part of the settings a saved run must match, and of its file name (``<method>-seed<s>-<digest>.json``),
so runs of several settings share one ``OUT`` without replacing each other. ``--variant NAME=METHOD``
adds a copy of METHOD under its own NAME, for ``--methods``, ``--set NAME.KEY=VALUE`` and ``--lr NAME=LR``,
so that a method and a variant of it (CCN with and without its normaliser warm-up, say) share one table,
figure and paired comparison::

    rlmem bench trace_patterning --methods ccn,ccn_warmup --variant ccn_warmup=ccn \
        --set ccn_warmup.normalizer_warmup=true --lr ccn_warmup=0.0003 ...

A variant's label is its family's with the settings the label shows filled in (``--variant
lstm1=lstm_tbptt40 --set lstm1.hidden_size=1`` reads "LSTM 1, T-BPTT 40") and any other option it changes
appended.

A variant's runs are saved and trained under its method's name (the family, in ``Method.family``): the
settings say which learner a run is, so a variant reuses runs made by changing the method itself, and
the other way round. The paired comparison (each method minus the best, seed by seed, on the same
streams) takes another reference with ``--against METHOD``. The table and plot are
``OUT/results.json`` and ``OUT/<task>.png`` for the whole comparison at the bench's settings; a subset of
methods or changed settings writes its own (``results-<methods>[-<digest>].json``), so that a side check
run into the study's ``OUT`` leaves the study's table alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import re
import shutil
import statistics
import string
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import envs
from envs import make_env
from rlmem.bench.measure import Column, Table, write_json
from rlmem.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rlmem.config import RunConfig, is_population, load_saved, member_run_dir, population_members, read_dotted, resolve
from rlmem.errors import ConfigError, writable_dir
from rlmem.memory import core_options
from rlmem.plot import read_scalars
from rlmem.train import RESUMABLE_OPTIONS, build, train

GAMMA = 0.9
TASKS = ("trace_patterning", "trace_conditioning")
LAM = 0.99
CHECKPOINT_EVERY = 100_000  # env steps between a run's checkpoints (it resumes from the last one)


@dataclass(frozen=True)
class Method:
    """One learner of the comparison: its core spec (stage lengths as fractions of the run), BPTT window
    and step size."""
    memory: dict[str, Any]
    lr: float
    unroll_length: int = 1
    stages_per_run: int = 0  # ccn: the run is split into this many stage lengths (0: one stage)
    label: str = ""
    family: str = ""  # the METHODS entry it is (a variant of): names its saved runs and training dirs


def labelled(template: str, method: Method) -> str:
    """``template`` with the method's core options and ``unroll_length`` filled in."""
    return template.format(unroll_length=method.unroll_length, **method.memory)


# The CCN variants' normaliser decay is the CCN code's (it is also the core's default, but stating it here
# keeps runs saved under another setting from being reused).
COLUMNS = {"name": "ccn", "grad": "rtrl", "normalizer_decay": 0.99999}
LSTM_LABEL = "LSTM {hidden_size}, T-BPTT {unroll_length}"
# Each method's label is a template of the settings it shows, so that a variant changing one of them
# reads as what it is ("LSTM 1, T-BPTT 40"), not as its family's label with a change appended.
TEMPLATES: dict[str, Method] = {
    "ccn": Method({**COLUMNS, "hidden_size": 20, "columns_per_stage": 4}, lr=0.01, stages_per_run=5,
                  label="CCN {hidden_size}:{columns_per_stage} (RTRL)"),
    "columnar": Method({**COLUMNS, "hidden_size": 7, "columns_per_stage": 7}, lr=0.01,
                       label="Columnar {hidden_size} (RTRL)"),
    "constructive": Method({**COLUMNS, "hidden_size": 10, "columns_per_stage": 1}, lr=0.01, stages_per_run=10,
                           label="Constructive {hidden_size}:{columns_per_stage} (RTRL)"),
    "lstm_tbptt15": Method({"name": "lstm", "grad": "bptt", "hidden_size": 4}, lr=0.001, unroll_length=15,
                           label=LSTM_LABEL),
    "lstm_tbptt40": Method({"name": "lstm", "grad": "bptt", "hidden_size": 2}, lr=0.001, unroll_length=40,
                           label=LSTM_LABEL),
    "elstm": Method({"name": "elstm", "grad": "rtrl", "hidden_size": 16}, lr=0.003, label="eLSTM {hidden_size} (RTRL)"),
    # 0.001, not the eLSTM's 0.003: at 0.003 two of five seeds blew up (docs/trace_patterning.md).
    "lru": Method({"name": "lru", "grad": "rtrl", "hidden_size": 16}, lr=0.001, label="LRU {hidden_size} (RTRL)"),
}
METHODS: dict[str, Method] = {name: dataclasses.replace(method, family=name, label=labelled(method.label, method))
                              for name, method in TEMPLATES.items()}
# The reference every table and plot includes: V = 0, i.e. nothing learned (the mean of G²).
ZERO = Method({}, lr=0.0, label="V = 0 (nothing learned)", family="zero")


def memory_spec(method: Method, steps: int) -> dict[str, Any]:
    spec = dict(method.memory)
    if spec["name"] == "ccn":
        spec["steps_per_stage"] = max(1, steps // method.stages_per_run) if method.stages_per_run else steps + 1
    return spec


def multiply_adds(core: Any, state: dict[str, Any], unroll_length: int) -> int:
    """The ``MACs/step`` estimate of the module docstring, for a core as it is at the end of a run."""
    if core.name == "ccn":
        started = core.learning_stage + 1
        weights = sum(p.numel() for stage in list(core.stages)[:started] for p in stage.parameters())
    else:
        weights = sum(p.numel() for p in core.parameters())
    if core.grad == "bptt":
        return 3 * unroll_length * weights
    sensitivities = sum(v[0].numel() for k, v in state.items() if k.startswith("sensitivity_"))
    return weights + 4 * sensitivities


@dataclass(frozen=True)
class Protocol:
    """What every run of one benchmark call shares: the task, its length and streams, the curve spacing."""
    task: str
    steps: int  # env steps per run (all streams together)
    log_every: int  # env steps per point of the learning curve
    num_envs: int  # streams sharing one learner

    def make_env(self, seed: int) -> Any:
        return make_env({"name": self.task, "num_envs": self.num_envs, "gamma": GAMMA}, seed=seed)

    @property
    def points(self) -> int:
        return self.steps // self.log_every

    @property
    def updates_per_point(self) -> int:
        return self.log_every // self.num_envs


def swept(method: Method, factor: float) -> Method:
    """The method at ``factor`` times its step size, to 6 significant digits (0.3 × 0.001 is 0.0003)."""
    return dataclasses.replace(method, lr=float(f"{method.lr * factor:.6g}"))


def run_config(method: Method, seed: int, protocol: Protocol, run_dir: Path, device: str = "cpu") -> RunConfig:
    """The resolved ``rlmem train`` config of one run: the method's core and step size on the
    protocol's task, one curve point per training iteration, a checkpoint every ``CHECKPOINT_EVERY``
    steps (whole curve points) and at the end. The memory and env sections are complete (every option
    stated), so no group file can change them; the learner's λ, optimiser and its constants are the
    ``td`` group file's (the paper's)."""
    spec = memory_spec(method, protocol.steps)
    memory = {"name": spec["name"], **dataclasses.asdict(core_options(spec))}
    env = dataclasses.asdict(envs.env_options({"name": protocol.task, "num_envs": protocol.num_envs, "gamma": GAMMA}))
    steps = protocol.points * protocol.log_every  # whole curve points
    checkpoint_every = min(steps, max(1, CHECKPOINT_EVERY // protocol.log_every) * protocol.log_every)
    return resolve({
        "defaults": {"memory": spec["name"], "env": protocol.task, "agent": "td"},
        "memory": memory,
        "env": {"name": protocol.task, **env},
        "agent": {"lr": method.lr, "unroll_length": method.unroll_length,
                  "steps_per_iteration": protocol.updates_per_point},
        "model": {"encoder": "identity"},
        "train": {"total_steps": steps, "seed": seed, "run_dir": str(run_dir), "device": device,
                  "checkpoint_every": checkpoint_every, "progress": False, "torch_threads": 1},
    })


def _learning_settings(config: RunConfig) -> list[dict[str, Any]]:
    """What each learner of a run is (every member's config), without what a resume may change."""
    ignored = {key.split(".", 1)[1] for key in RESUMABLE_OPTIONS if key.startswith("train.")} | {"run_dir", "name"}
    settings = []
    for learner in population_members(config) if is_population(config) else [config]:
        values = learner.to_dict()
        values["train"] = {k: v for k, v in values["train"].items() if k not in ignored}
        settings.append(json.loads(json.dumps(values)))
    return settings


def train_or_continue(config: RunConfig, name: str) -> dict[str, Any]:
    """Train ``config`` into its run dir and return its final checkpoint. A run dir holding an interrupted
    run of the same learners (its checkpoint's members are ours, up to the options a resume may change)
    is continued from that checkpoint, so a study of hours survives being stopped, and one that has
    finished is left as it is; anything else there is replaced. A run that Ctrl-C stopped returns from
    ``train`` with its checkpoint saved: the bench stops there too (KeyboardInterrupt), rather than take
    the part run for a finished one. Each checkpoint prints a progress line (``<method name> (<run dir
    name>): step N of M (…), … steps/s, about … left``), as a background ``rlmem train`` logs it."""
    run_dir = Path(config.train.run_dir)
    same = False
    if (run_dir / CHECKPOINT_NAME).is_file():
        with contextlib.suppress(ConfigError):  # an unreadable run dir is replaced
            same = _learning_settings(load_saved(run_dir)) == _learning_settings(config)
    if not same and run_dir.exists():
        shutil.rmtree(run_dir)
    if not same or load_checkpoint(run_dir)["global_step"] < config.train.total_steps:
        label = f"{name} ({run_dir.name})"  # variants of one core share the dir's prefix
        train(config, resume=same, log=lambda message: None,
              report=lambda line: print(f"  {label}: {line}", flush=True))  # a population runs for hours
    checkpoint = load_checkpoint(run_dir)
    if checkpoint["global_step"] < config.train.total_steps:
        raise KeyboardInterrupt
    return checkpoint


def run_one(name: str, method: Method, seed: int, protocol: Protocol, run_dir: Path) -> dict[str, Any]:
    """One online TD(λ) run through the ordinary training loop (``rlmem.train.train``) into ``run_dir``;
    returns its learning curve (mean squared return error per ``protocol.log_every`` env steps, all
    streams together) as the loop logged it (``charts/prediction_error``), its speed (the loop's final
    ``charts/SPS``) and, from the final checkpoint, the ``MACs/step`` estimate."""
    config = run_config(method, seed, protocol, run_dir)
    checkpoint = train_or_continue(config, name)
    _, curve = read_scalars(run_dir, "charts/prediction_error")
    _, env_steps_per_second = read_scalars(run_dir, "charts/SPS")
    env, learner, _ = build(config)
    try:
        learner.load_state_dict(checkpoint["learner"])  # the core as it is at the end
        macs = multiply_adds(learner.network.core, learner.state_after, method.unroll_length)
        params = sum(p.numel() for p in learner.network.parameters())
    finally:
        env.close()
    return {
        "method": name,
        "lr": method.lr,
        "seed": seed,
        "curve": curve.tolist(),
        "ms_per_step": 1e3 * protocol.num_envs / float(env_steps_per_second[-1]),  # per update
        "macs_per_step": macs,
        "params": params,
    }


def run_population(name: str, methods: Sequence[Method], seeds: Sequence[int], protocol: Protocol,
                   run_dir: Path, compile: bool = False) -> list[dict[str, Any]]:
    """``run_one`` for consecutive ``seeds`` of each of ``methods`` (one method at several step sizes) at
    once: one population (``train.population``, the step sizes as its ``train.population_grid``) trained
    into ``run_dir``, or continued there; each member's result read from its sub-run and from its state
    in the final checkpoint. ``ms_per_step`` is the population's time per step divided by its members
    (a member's share). ``compile``: the population's step compiled (``train.compile``; the same
    updates up to rounding, so a run may be continued with or without it)."""
    config = run_config(methods[0], seeds[0], protocol, run_dir)
    config.train.population = len(seeds)
    config.train.compile = compile
    if len(methods) > 1:
        config.train.population_grid = {"agent.lr": [m.lr for m in methods]}
    checkpoint = train_or_continue(config, name)
    members = population_members(config)
    by_lr = {m.lr: m for m in methods}
    diverged = checkpoint["learner"].get("diverged", [None] * len(members))
    member_dirs = [member_run_dir(run_dir, member, config.train.population_grid) for member in members]
    # the population's rate, as every member that has not diverged logged it to the end
    _, population_steps_per_second = read_scalars(member_dirs[diverged.index(None)], "charts/SPS")
    results = []
    for member, member_dir, saved, why in zip(members, member_dirs, checkpoint["learner"]["members"], diverged,
                                              strict=True):
        method = by_lr[member.agent["lr"]]
        try:
            curve = read_scalars(member_dir, "charts/prediction_error")[1].tolist()
        except ConfigError:
            if why is None:
                raise
            curve = []  # it diverged in its first logging interval
        env, learner, _ = build(member)
        try:
            learner.load_state_dict(saved)
            macs = multiply_adds(learner.network.core, learner.state_after, method.unroll_length)
            params = sum(p.numel() for p in learner.network.parameters())
        finally:
            env.close()
        results.append({
            "method": name,
            "lr": method.lr,
            "seed": member.train.seed,
            "curve": curve,
            "ms_per_step": 1e3 * protocol.num_envs / float(population_steps_per_second[-1]) / len(members),
            "macs_per_step": macs,
            "params": params,
            **({} if why is None else {"diverged": why}),  # its curve ends where it diverged
        })
    return results


def _consecutive_runs(seeds: Sequence[int]) -> list[list[int]]:
    """Sorted ``seeds`` cut into runs of consecutive seeds (a population's seeds are seed..seed+P−1)."""
    return [[seed for _, seed in run]
            for _, run in itertools.groupby(enumerate(sorted(seeds)), key=lambda item: item[1] - item[0])]


def population_jobs(pending: Sequence[tuple]) -> list[tuple]:
    """Pending (name, method, seed, protocol) jobs as populations ``(name, methods, seeds, protocol)``:
    each method's step sizes and consecutive seeds together when every step size still needs the same
    seeds (a full grid: one population), else each step size's consecutive seeds. The V = 0 reference's
    consecutive seeds step their streams together (``("zero", ZERO, seeds, protocol)``); a lone (step
    size, seed) stays an ordinary one-seed job."""
    jobs: list[tuple] = []
    by_method: dict[str, dict[float, list[tuple]]] = {}
    for job in pending:
        by_method.setdefault(job[0], {}).setdefault(job[1].lr, []).append(job)
    for zero_jobs in by_method.pop("zero", {}).values():
        for consecutive in _consecutive_runs([job[2] for job in zero_jobs]):
            jobs.append(("zero", ZERO, consecutive if len(consecutive) > 1 else consecutive[0], zero_jobs[0][3]))
    for name, by_lr in by_method.items():
        seeds_per_lr = {lr: sorted(job[2] for job in lr_jobs) for lr, lr_jobs in by_lr.items()}
        methods = tuple(lr_jobs[0][1] for lr_jobs in by_lr.values())
        protocol = next(iter(by_lr.values()))[0][3]
        seeds = next(iter(seeds_per_lr.values()))
        if len(methods) > 1 and all(s == seeds for s in seeds_per_lr.values()) and len(_consecutive_runs(seeds)) == 1:
            jobs.append((name, methods, seeds, protocol))
            continue
        for method in methods:
            for consecutive in _consecutive_runs(seeds_per_lr[method.lr]):
                if len(consecutive) > 1:
                    jobs.append((name, (method,), consecutive, protocol))
                else:  # one seed: an ordinary run
                    jobs.append((name, method, consecutive[0], protocol))
    return jobs


def job_dir(train_root: Path, job: tuple) -> Path:
    """Where a job trains: ``<method>-seed<s>-<digest>`` for one run, ``<method>-seeds<a>-<b>-<digest>``
    for a population at one step size, ``<method>-sweep-seeds<a>-<b>-<digest>`` for a sweep's; the
    digest is of every member's settings, so a directory names exactly one set of learners."""
    name, method, seed, protocol = job
    if name == "zero":  # nothing is trained
        return train_root / "zero"
    if isinstance(seed, list):
        seeds = f"seeds{seed[0]}-{seed[-1]}"
        family = method[0].family
        if len(method) == 1:
            return train_root / f"{family}-{seeds}-{_digest(_run_settings(method[0], protocol), 12)}"
        return train_root / f"{family}-sweep-{seeds}-{_digest([_run_settings(m, protocol) for m in method], 12)}"
    return train_root / run_name(method, seed, protocol)


def stopped_populations(pending: Sequence[tuple], train_root: Path) -> tuple[list[tuple], list[tuple]]:
    """The populations stopped part way under ``train_root`` whose members are all still pending, as
    jobs, and the pending jobs they leave. Grouping alone would fold a stopped population into a larger
    one when a call adds seeds or step sizes (a new directory, hours of training lost); this keeps
    each stopped population as it was, to continue from its checkpoint, and groups only the rest."""
    continued: list[tuple] = []
    left = list(pending)
    for checkpoint in sorted(train_root.glob(f"*/{CHECKPOINT_NAME}")):
        try:
            config = load_saved(checkpoint.parent)
        except ConfigError:
            continue
        grid = config.train.population_grid
        if not is_population(config) or set(grid) - {"agent.lr"}:
            continue
        step_sizes = grid.get("agent.lr", [config.agent["lr"]])
        seeds = list(range(config.train.seed, config.train.seed + config.train.population))
        members = {(lr, seed) for lr in step_sizes for seed in seeds}
        for name in dict.fromkeys(job[0] for job in left if job[0] != "zero"):
            by_member = {(job[1].lr, job[2]): job for job in left if job[0] == name}
            if not members <= by_member.keys():
                continue
            protocol = by_member[(step_sizes[0], seeds[0])][3]
            job = (name, tuple(by_member[(lr, seeds[0])][1] for lr in step_sizes), seeds, protocol)
            if job_dir(train_root, job) == checkpoint.parent:  # the same learners, not only the same names
                continued.append(job)
                left = [j for j in left if j[0] != name or (j[1].lr, j[2]) not in members]
                break
    return continued, left


def unfinished_runs(train_root: Path, steps: int, zero: Mapping[int, Sequence[float]] | None = None,
                    log_every: int = 1, window: int = 0, only: Mapping[Path, str] | None = None) -> list[str]:
    """One line per training run under ``train_root`` (of those in ``only``, run dir -> method name, if
    given; the line then names the method) whose last checkpoint is short of ``steps`` (stopped, or
    still running elsewhere), with how far it got: in a study of many sessions, what the next call
    continues. Given V = 0's curves (``zero``: seed -> one point per ``log_every`` steps), the line adds
    the error so far as the table will give it: over the last ``window`` steps up to the checkpoint,
    divided by V = 0's over the same steps on the same seed, mean ± s.e. over seeds, per step size."""
    lines = []
    for run_dir in sorted(p for p in train_root.glob("*") if (p / "config.yaml").is_file()):
        if only is not None and run_dir not in only:
            continue
        try:
            config = load_saved(run_dir)
            checkpoint = load_checkpoint(run_dir) if (run_dir / CHECKPOINT_NAME).is_file() else None
        except ConfigError:
            continue
        step = 0 if checkpoint is None else checkpoint["global_step"]
        if step < steps:
            members = f", {len(population_members(config))} members" if is_population(config) else ""
            label = run_dir.name if only is None else f"{only[run_dir]} ({run_dir.name})"
            line = f"in progress: {label}: checkpoint at step {step:,} of {steps:,}{members}"
            if zero and checkpoint is not None and step > 0:
                line += _error_so_far(run_dir, config, step, zero, log_every, window,
                                      checkpoint["learner"].get("diverged"))
            lines.append(line)
    return lines


def _error_so_far(run_dir: Path, config: RunConfig, step: int, zero: Mapping[int, Sequence[float]],
                  log_every: int, window: int, diverged: Sequence[str | None] | None = None) -> str:
    """``; error / V = 0 over steps a–b: lr X m ± s.e., ...`` of a run in progress (see unfinished_runs),
    leaving out and counting the members that have diverged (``diverged``: why, per member; None in
    checkpoints of single runs and of populations from before members could diverge alone)."""
    members = population_members(config) if is_population(config) else [config]
    start = max(step - window, 0)
    ratios: dict[float, list[float]] = {}
    stopped: dict[float, int] = {}
    for member, why in zip(members, diverged or [None] * len(members), strict=True):
        lr = float(member.agent["lr"])
        if why is not None:
            stopped[lr] = stopped.get(lr, 0) + 1
            continue
        member_dir = run_dir
        if is_population(config):
            member_dir = member_run_dir(run_dir, member, config.train.population_grid)
        seed = member.train.seed
        try:
            logged, errors = read_scalars(member_dir, "charts/prediction_error", until=step)
        except ConfigError:
            continue
        kept = [(int(at), error) for at, error in zip(logged, errors)
                if at > start and int(at) // log_every <= len(zero.get(seed, ()))]
        if not kept:
            continue
        learned = statistics.fmean(error for _, error in kept)
        nothing = statistics.fmean(zero[seed][at // log_every - 1] for at, _ in kept)
        ratios.setdefault(lr, []).append(learned / nothing)
    if not ratios and not stopped:
        return ""
    parts = []
    for lr in dict.fromkeys([*ratios, *stopped]):
        part = f"lr {lr:g}"
        if lr in ratios:
            mean, stderr = mean_stderr(ratios[lr])
            part += f" {_ratio(mean)}"
            if len(ratios[lr]) > 1:  # the median too: one member that blows up makes the mean its own
                part += f" ± {_ratio(stderr)} (median {_ratio(statistics.median(ratios[lr]))})"
        parts.append(part + (f" ({stopped[lr]} diverged)" if lr in stopped else ""))
    return f"; error / V = 0 over steps {start:,}–{step:,}: {', '.join(parts)}"


def _ratio(value: float) -> str:
    """An error / V = 0 as the tables print it, and a run that has blown up by factors of millions legibly."""
    return f"{value:.2f}" if value < 1000 else f"{value:.2g}"


def zero_prediction_curves(seeds: Sequence[int], protocol: Protocol) -> list[list[float]]:
    """The learning curve of V = 0 on each seed's stream (the mean of G²): the error with nothing
    learned. The seeds' envs step as one stack, each block exactly its seed's stream."""
    import torch

    tasks = [protocol.make_env(seed) for seed in seeds]
    for task, seed in zip(tasks, seeds):
        task.reset(seed=seed)
    env = type(tasks[0]).stack(tasks)
    curves: list[list[float]] = [[] for _ in seeds]
    for _ in range(protocol.points):
        total = torch.zeros(len(seeds), dtype=torch.float64)
        for _ in range(protocol.updates_per_point):
            total += env.step(None)[4]["true_return"].double().pow(2).view(len(seeds), -1).mean(1)
        for curve, value in zip(curves, (total / protocol.updates_per_point).tolist()):
            curve.append(value)
    return curves


def run_job(name: str, method: Method | tuple[Method, ...], seed: int | list[int], protocol: Protocol,
            run_dir: Path, compile: bool = False) -> list[dict[str, Any]]:
    """One job of the comparison: a learner trained into ``run_dir``, a population of learners (``method``
    a tuple of one method's step sizes, ``seed`` a list of consecutive seeds), or (``name == "zero"``) the
    V = 0 reference on the same stream (nothing to train: it only steps the env). Returns the result of
    each learner."""
    if name == "zero":
        seeds = seed if isinstance(seed, list) else [seed]
        return [{"method": "zero", "lr": 0.0, "seed": s, "macs_per_step": 0, "ms_per_step": 0.0, "params": 0,
                 "curve": curve} for s, curve in zip(seeds, zero_prediction_curves(seeds, protocol))]
    if isinstance(seed, list):
        assert isinstance(method, tuple)
        return run_population(name, method, seed, protocol, run_dir, compile)
    assert isinstance(method, Method)
    return [run_one(name, method, seed, protocol, run_dir)]


def _run_settings(method: Method, protocol: Protocol) -> dict[str, Any]:
    """What a saved run must share with a new call to stand in for it (as JSON would give it back)."""
    return json.loads(json.dumps({
        **dataclasses.asdict(protocol), "lr": method.lr, "unroll_length": method.unroll_length,
        "memory": method.memory, "gamma": GAMMA, "lam": LAM}))


def _digest(value: Any, length: int) -> str:
    """A short name for a JSON-able value (settings): the first ``length`` hex digits of its SHA-256."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def run_name(method: Method, seed: int, protocol: Protocol) -> str:
    """``<method>-seed<seed>-<digest of the settings>``: runs of other settings live side by side. It
    names the saved run (``OUT/runs/<run name>.json``) and its training run dir (``OUT/train/<run name>``).
    ``<method>`` is the method's family (``ccn`` for a ``--variant`` of it): the settings say what the
    learner is, so a variant reuses the runs of a method with the same settings, and its own serve them."""
    return f"{method.family}-seed{seed}-{_digest(_run_settings(method, protocol), 12)}"


def save_run(saved: Path, method: Method, seed: int, protocol: Protocol, result: dict[str, Any]) -> None:
    """Write one finished run (written whole, then renamed, so an interrupted write leaves nothing)."""
    settings = _run_settings(method, protocol)
    write_json(saved / f"{run_name(method, seed, protocol)}.json", {"settings": settings, "run": result})


def load_run(saved: Path, method: Method, seed: int, protocol: Protocol) -> dict[str, Any] | None:
    """A run saved earlier with the same settings, or None. Files of the first format, named by method
    and seed only (one setting per directory), are read too."""
    settings = _run_settings(method, protocol)
    for path in (saved / f"{run_name(method, seed, protocol)}.json", saved / f"{method.family}-seed{seed}.json"):
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if earlier.get("settings") == settings:
            return earlier["run"]
    return None


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (nan for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summarise(results: list[dict[str, Any]], methods: Sequence[str], log_every: int, window: int,
              labels: Mapping[str, str] | None = None) -> list[dict]:
    """One row per method and step size (in ``methods``' order, step sizes ascending): the final error
    (mean over the last ``window`` steps of each run) over seeds. A run that diverged (a population's
    member that stopped; its curve ends there) has no final error: its errors count as inf, so its row's
    mean is inf (never a method's best) and ``diverged`` lists its seeds. ``labels``: each method's label
    in tables and figures (default: those of ``METHODS``)."""
    labels = {**{name: method.label for name, method in METHODS.items()}, "zero": ZERO.label, **(labels or {})}
    last = max(1, window // log_every)
    rows = []
    for name, lr in [(m, lr) for m in methods for lr in sorted({r["lr"] for r in results if r["method"] == m})]:
        runs = [r for r in results if r["method"] == name and r["lr"] == lr]
        diverged = [r["seed"] for r in runs if "diverged" in r]
        finals = [math.inf if "diverged" in r else statistics.fmean(r["curve"][-last:]) for r in runs]
        whole = [math.inf if "diverged" in r else statistics.fmean(r["curve"]) for r in runs]
        mean, stderr = (math.inf, math.nan) if diverged else mean_stderr(finals)
        whole_mean, whole_stderr = (math.inf, math.nan) if diverged else mean_stderr(whole)
        rows.append({
            "method": name,
            "lr": lr,
            "label": labels[name],
            "final_error": mean,
            "stderr": stderr,
            # one diverging seed moves the mean by more than the spread of the others: report both
            "median_error": statistics.median(finals),
            "per_seed": finals,
            "seeds": [r["seed"] for r in runs],
            # how fast a method learns, not only where it ends: the mean error over the whole run
            "whole_run_error": whole_mean,
            "whole_run_stderr": whole_stderr,
            "per_seed_whole_run": whole,
            "diverged": diverged,
            "macs_per_step": max(r["macs_per_step"] for r in runs),
            "ms_per_step": sum(r["ms_per_step"] for r in runs) / len(runs),
        })
    return rows


def _error(value: float) -> str:
    """An error in the tables: "diverged" where a seed's run diverged (its errors count as inf)."""
    return f"{value:.5f}" if math.isfinite(value) else "diverged"


def best_rows(rows: list[dict]) -> list[dict]:
    """Each method's row at its best step size (the lowest mean final error; a diverged one is never best)."""
    def score(row: dict) -> tuple[bool, float]:
        return not math.isfinite(row["final_error"]), row["final_error"]

    best: dict[str, dict] = {}
    for row in rows:
        if row["method"] not in best or score(row) < score(best[row["method"]]):
            best[row["method"]] = row
    return list(best.values())


def paired_against_best(rows: list[dict], against: str | None = None) -> list[dict]:
    """Each method's row (at its best step size) against the best method's (or the method named
    ``against``), seed by seed.

    Every method steps the same stream on a given seed, so much of a run's error is the stream's (how
    many trials fell in the window, how hard they were) and is shared by all methods on that seed. The
    difference on each seed removes it: ``difference`` and ``stderr`` are the mean and standard error of
    (this method's error − the best's) over the seeds both have, for the final window and for the whole
    run, and ``best_lower`` counts the seeds on which the best method's final error is lower."""
    learners = [row for row in rows if row["method"] != "zero" and math.isfinite(row["final_error"])]
    if len(learners) < 2:
        return []
    best = min(learners, key=lambda row: row["final_error"])
    # a reference without finite results (none saved yet) leaves the best
    best = next((row for row in learners if row["method"] == against), best)
    paired = []
    for row in learners:
        if row is best:
            continue
        common = [seed for seed in row["seeds"] if seed in best["seeds"]]
        if not common:
            continue

        def differences(key: str, row: dict = row, common: list[int] = common) -> list[float]:
            mine, theirs = dict(zip(row["seeds"], row[key])), dict(zip(best["seeds"], best[key]))
            return [mine[seed] - theirs[seed] for seed in common]

        final, whole = differences("per_seed"), differences("per_seed_whole_run")
        (difference, stderr), (whole_difference, whole_stderr) = mean_stderr(final), mean_stderr(whole)
        paired.append({
            "method": row["method"], "lr": row["lr"], "label": row["label"],
            "against": best["method"], "against_lr": best["lr"], "seeds": len(common),
            "difference": difference, "stderr": stderr,
            "whole_run_difference": whole_difference, "whole_run_stderr": whole_stderr,
            "best_lower": sum(d > 0 for d in final),  # the reference's, when ``against`` names it
        })
    return paired


def plot(results: list[dict[str, Any]], rows: list[dict], log_every: int, path: Path, title: str,
         sweep_rows: Sequence[dict] = ()) -> None:
    """Learning curves of ``rows`` (each method at its best step size) relative to V = 0, their final errors
    per seed, and, given a step-size sweep (``sweep_rows``), each method's final error against its step size
    (the sensitivity curve: a best step size at the edge of the sweep says the sweep should go further)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # Curves relative to V = 0 on the same seed's stream: every method sees the same trials, so dividing
    # removes the trial-to-trial noise they share (how many USs fell in each stretch of log_every steps).
    zero = {r["seed"]: np.array(r["curve"]) for r in results if r["method"] == "zero"}

    def relative(run: dict[str, Any]) -> np.ndarray:  # nan where the stream had no US at all
        reference = zero[run["seed"]]
        return np.divide(run["curve"], reference, out=np.full_like(reference, np.nan), where=reference > 0)

    swept = [m for m in dict.fromkeys(r["method"] for r in sweep_rows if r["method"] != "zero")
             if sum(r["method"] == m for r in sweep_rows) > 1]
    if swept:
        fig, (curves, finals, sensitivity) = plt.subplots(1, 3, figsize=(18, 4.8),
                                                          gridspec_kw={"width_ratios": [3, 2, 2]})
    else:
        fig, (curves, finals) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    # ten colours repeat after ten methods: twenty (in pairs of a dark and a light shade) beyond that
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for i, row in enumerate(rows):
        if row["diverged"]:  # every step size of this method diverged on some seed: no curve to draw
            continue
        runs = np.array([relative(r) for r in results if (r["method"], r["lr"]) == (row["method"], row["lr"])])
        steps = log_every * np.arange(1, runs.shape[1] + 1)
        mean = runs.mean(0)
        stderr = runs.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
        color = "black" if row["method"] == "zero" else palette(i)
        curves.plot(steps, mean, color=color, label=row["label"], linestyle="--" if row["method"] == "zero" else "-")
        curves.fill_between(steps, mean - stderr, mean + stderr, color=color, alpha=0.2, linewidth=0)
        finals.errorbar([i], [row["final_error"]], yerr=[row["stderr"]], fmt="o", color=color, capsize=4)
        finals.scatter([i] * len(row["per_seed"]), row["per_seed"], color=color, s=10, alpha=0.5)
    curves.set_yscale("log")
    curves.set_xlabel("env steps")
    curves.set_ylabel(f"squared return error / that of V = 0 (per {log_every} steps)")
    curves.legend(fontsize=8)
    curves.set_title(title)
    finals.set_xticks(range(len(rows)), [row["method"] for row in rows], rotation=30, ha="right")
    finals.set_ylabel("final error (mean ± s.e. over seeds)")
    finals.set_yscale("log")
    if swept:
        colors = {row["method"]: palette(i) for i, row in enumerate(rows)}
        (zero_final,) = [r["final_error"] for r in sweep_rows if r["method"] == "zero"] or [float("nan")]
        for method in swept:
            points = sorted((r for r in sweep_rows if r["method"] == method), key=lambda r: r["lr"])
            kept = [r for r in points if not r["diverged"]]
            sensitivity.errorbar([r["lr"] for r in kept], [r["final_error"] / zero_final for r in kept],
                                 yerr=[r["stderr"] / zero_final for r in kept], color=colors.get(method),
                                 marker="o", capsize=3, label=points[0]["label"])
            for r in points:  # a step size at which a seed diverged: an x on the V = 0 line
                if r["diverged"]:
                    sensitivity.scatter([r["lr"]], [1.0], marker="x", s=60, color=colors.get(method))
        sensitivity.axhline(1.0, color="black", linestyle="--", label="V = 0")
        sensitivity.set_xscale("log")
        sensitivity.set_xlabel("step size")
        sensitivity.set_ylabel("final error / that of V = 0 (mean ± s.e.)")
        diverged = any(r["diverged"] for r in sweep_rows if r["method"] in swept)
        sensitivity.set_title("step-size sensitivity" + (" (x: a seed diverged)" if diverged else ""))
        sensitivity.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench trace_patterning", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=300_000, help="env steps per run (all streams together)")
    parser.add_argument("--num-envs", type=int, default=1,
                        help="streams per run, sharing one learner (1: the paper's protocol)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method (0..seeds-1)")
    parser.add_argument("--window", type=int, default=50_000, help="final error: mean over this many last steps")
    parser.add_argument("--log-every", type=int, default=5_000, help="steps per point of the learning curve")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (processes, one thread each)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a step size")
    parser.add_argument("--lr-factors", default="1", metavar="F[,F...]",
                        help="step-size sweep: run every method at these multiples of its step size and report "
                             "each at its best (with --population, one population per method)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", dest="method_options",
                        help="override an option of a method's memory core, e.g. columnar.normalizer_decay=0.9999, "
                             "or a truncated-BPTT method's window, e.g. lstm_tbptt40.unroll_length=30")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD",
                        help="a variant of METHOD under its own NAME, to list in --methods beside it and vary by "
                             "--set NAME.KEY=VALUE and --lr NAME=LR, e.g. ccn_warmup=ccn")
    parser.add_argument("--task", default="trace_patterning",
                        help=f"one of: {', '.join(TASKS)} (the memory-only variant: one CS, every trial ends in a US)")
    parser.add_argument("--out", default=None, help="directory for the runs, the table and the plot (runs/bench/TASK)")
    parser.add_argument("--population", action="store_true",
                        help="run each method's seeds as one population (one process, ~10x the runs per core)")
    parser.add_argument("--compile", action="store_true",
                        help="with --population: compile each population's step (train.compile; 1.6-2x faster "
                             "for the RTRL cores on a CPU after a minute of compiling, the same updates up to "
                             "rounding)")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="save and look up the finished runs (small JSON files) here instead of OUT/runs/, "
                             "e.g. a directory in version control")
    parser.add_argument("--against", default=None, metavar="METHOD",
                        help="pair every method seed by seed with this one (one of --methods) instead of the best")
    parser.add_argument("--no-reuse", action="store_true", help="rerun runs already saved")
    parser.add_argument("--saved-only", action="store_true",
                        help="run nothing: summarise the runs saved so far (a study in progress)")
    return parser


def _with_option(methods: dict[str, Method], item: str) -> tuple[str, Method]:
    """``--set METHOD.KEY=VALUE``: the method with that core option (or, for truncated BPTT, its window
    ``unroll_length``) changed, the value typed as ``rlmem train`` types its overrides and checked by
    the core's own options."""
    name, dot, key = item.partition("=")[0].partition(".")
    if "=" not in item or not (dot and key) or "." in key or name not in methods:
        raise ConfigError(f"--set {item!r}: expected METHOD.KEY=VALUE with METHOD one of: {', '.join(methods)}")
    if key in ("name", "grad"):
        raise ConfigError(f"--set {item!r}: a method's core and gradient are what defines it; choose another method")
    if key == "steps_per_stage":
        raise ConfigError(f"--set {item!r}: the stage length follows from --steps (the method's stages per run)")
    value = read_dotted([item])[name][key]
    if key == "unroll_length":
        if methods[name].memory["grad"] != "bptt":
            raise ConfigError(f"--set {item!r}: unroll_length is the window of a truncated-BPTT method "
                              f"({', '.join(n for n, m in METHODS.items() if m.memory['grad'] == 'bptt')})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--set {item!r}: unroll_length must be a positive whole number of steps")
        return name, dataclasses.replace(methods[name], unroll_length=value)
    changed = dataclasses.replace(methods[name], memory={**methods[name].memory, key: value})
    core_options(changed.memory)  # an unknown key or a bad value ends here, with the core's own message
    return name, changed


def with_variants(items: Sequence[str]) -> dict[str, Method]:
    """``METHODS`` and each ``--variant NAME=METHOD`` (a copy of METHOD, of its family, to be varied
    under NAME)."""
    chosen = dict(METHODS)
    for item in items:
        name, _, family = item.partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or family not in METHODS:
            raise ConfigError(f"--variant {item!r}: expected NAME=METHOD, NAME of lower-case letters, digits "
                              f"and _, METHOD one of: {', '.join(METHODS)}")
        if name in chosen or name == "zero":
            raise ConfigError(f"--variant {item!r}: {name!r} names a method already; choose another name")
        chosen[name] = METHODS[family]
    return chosen


def variant_label(method: Method, name: str) -> str:
    """A variant's label: its family's template filled in with its settings, and the core options it
    changes that the template does not show (or, when it reads as its family's, its name)."""
    template = TEMPLATES[method.family].label
    shown = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    family = METHODS[method.family]
    label = labelled(template, method)
    changes = [f"{key}={json.dumps(value)}" for key, value in method.memory.items()
               if key not in shown and family.memory.get(key) != value]
    if label == family.label and not changes:
        return f"{label}, {name}"
    return ", ".join([label, *changes])


def output_files(out: Path, task: str, methods: Sequence[str], chosen: dict[str, Method],
                 lr_factors: Sequence[float] = (1.0,)) -> tuple[Path, Path]:
    """Where a call's table and plot go: ``results.json`` and ``<task>.png`` for the whole comparison
    at the bench's own settings; for a subset of methods or changed settings (a sweep included), files
    named after them (``results-<methods>[-<digest>].json``), so that such a call into the study's OUT
    leaves its table and plot alone."""
    changed: dict[str, Any] = {m: [chosen[m].lr, chosen[m].memory] for m in methods if chosen[m] != METHODS.get(m)}
    if list(lr_factors) != [1.0]:
        changed["lr_factors"] = list(lr_factors)
    if list(methods) == list(METHODS) and not changed:
        return out / "results.json", out / f"{task}.png"
    tag = "+".join(methods)
    if changed:
        tag += "-" + _digest(changed, 8)
    return out / f"results-{tag}.json", out / f"{task}-{tag}.png"


def run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.task not in TASKS:
        raise ConfigError(f"--task: unknown task {args.task!r}; valid choices: {', '.join(TASKS)}")
    chosen = with_variants(args.variant)
    unknown = [m for m in methods if m not in chosen]
    if unknown or not methods:
        what = repr(unknown[0]) if unknown else "(none)"
        raise ConfigError(f"--methods: unknown method {what}; valid choices: {', '.join(chosen)}")
    for key in ("steps", "num_envs", "seeds", "window", "log_every", "workers"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.steps < args.log_every:
        raise ConfigError(f"--steps={args.steps} must be at least --log-every={args.log_every}")
    if args.against is not None and args.against not in methods:
        raise ConfigError(f"--against {args.against!r}: expected one of --methods: {', '.join(methods)}")
    if args.compile and not args.population:
        raise ConfigError("--compile compiles the step of a population: add --population")
    if args.log_every % args.num_envs:
        raise ConfigError(f"--log-every={args.log_every} must be a multiple of --num-envs={args.num_envs}")
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in chosen:
            raise ConfigError(f"--lr {item!r}: unknown method {name!r}; valid choices: {', '.join(chosen)}")
        try:
            chosen[name] = dataclasses.replace(chosen[name], lr=float(value))
        except ValueError:
            raise ConfigError(f"--lr {item!r}: expected METHOD=<number>") from None

    for item in args.method_options:
        name, method = _with_option(chosen, item)
        chosen[name] = method
    for name in [name for name in chosen if name not in METHODS]:
        chosen[name] = dataclasses.replace(chosen[name], label=variant_label(chosen[name], name))
    same = [(a, b) for a, b in itertools.combinations(methods, 2)
            if dataclasses.replace(chosen[a], label="") == dataclasses.replace(chosen[b], label="")]
    if same:
        raise ConfigError(f"--methods: {same[0][0]} and {same[0][1]} are the same learner; give a variant its own "
                          "--set NAME.KEY=VALUE or --lr NAME=LR")
    try:
        lr_factors = [float(f) for f in args.lr_factors.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"--lr-factors {args.lr_factors!r}: expected comma-separated numbers") from None
    if not lr_factors or any(not (math.isfinite(f) and f > 0) for f in lr_factors):
        raise ConfigError(f"--lr-factors {args.lr_factors!r}: expected positive numbers")
    # each method at every step size of the sweep (the same step size twice is one run)
    variants = {name: list({v.lr: v for v in (swept(chosen[name], f) for f in lr_factors)}.values())
                for name in methods}

    out = writable_dir(Path(args.out or f"runs/bench/{args.task}"), "the runs, table and figure")
    saved = Path(args.results) if args.results else out / "runs"
    if args.results and not args.saved_only:  # --saved-only only reads them
        writable_dir(saved, "the finished runs")
    # The V = 0 reference steps the same streams, so it runs (and is saved) like a method.
    chosen["zero"] = ZERO
    protocol = Protocol(args.task, args.steps, args.log_every, args.num_envs)
    variants["zero"] = [ZERO]
    jobs = [(name, variant, seed, protocol) for seed in range(args.seeds) for name in [*methods, "zero"]
            for variant in variants[name]]
    sweep = f" x {len(lr_factors)} step sizes" if len(lr_factors) > 1 else ""
    print(f"{args.task}: {len(methods)} methods (and V = 0) x {args.seeds} seeds{sweep} x {args.steps:,} steps "
          f"({args.num_envs} stream(s) per run), {args.workers} worker(s)", flush=True)
    results = []
    pending = []
    for job in jobs:
        earlier = None if args.no_reuse else load_run(saved, *job[1:])
        if earlier is None:
            pending.append(job)
        else:
            # runs saved before sweeps did not record the step size; a variant reuses its family's runs
            results.append({**earlier, "method": job[0], "lr": job[1].lr})
    if results:
        print(f"  reusing {len(results)} finished run(s) from {saved}", flush=True)
    if args.saved_only:
        if not results:
            raise ConfigError(f"--saved-only: no runs with these settings are saved under {saved}")
        print(f"  leaving out {len(pending)} run(s) not saved yet", flush=True)
        zero = {r["seed"]: r["curve"] for r in results if r["method"] == "zero"}
        upcoming = pending  # where the same call without --saved-only would train them
        if args.population:
            continued, rest = stopped_populations(pending, out / "train")
            upcoming = continued + population_jobs(rest)
        for line in unfinished_runs(out / "train", protocol.points * protocol.log_every, zero, args.log_every,
                                    args.window, only={job_dir(out / "train", job): job[0] for job in upcoming}):
            print(f"  {line}", flush=True)
        pending = []

    def finished(job: tuple, job_results: list[dict[str, Any]]) -> None:
        for result in job_results:
            method = job[1] if isinstance(job[1], Method) else next(m for m in job[1] if m.lr == result["lr"])
            save_run(saved, method, result["seed"], job[3], result)
            results.append(result)
            at = f" lr {result['lr']:g}" if len(variants[job[0]]) > 1 else ""
            print(f"  done {job[0]}{at} seed {result['seed']} ({len(results)}/{len(jobs)})", flush=True)

    if args.population:
        continued, pending = stopped_populations(pending, out / "train")
        pending = continued + population_jobs(pending)

    if args.workers == 1:
        for job in pending:
            finished(job, run_job(*job, job_dir(out / "train", job), args.compile))
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = {pool.submit(run_job, *job, job_dir(out / "train", job), args.compile): job for job in pending}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    order = {(name, method.lr, seed): i for i, (name, method, seed, _) in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["method"], r["lr"], r["seed"])])

    sweep_rows = summarise(results, [m for m in [*methods, "zero"] if any(r["method"] == m for r in results)],
                           args.log_every, args.window, {name: chosen[name].label for name in methods})
    rows = best_rows(sweep_rows)
    settings = {**dataclasses.asdict(protocol), "seeds": args.seeds, "window": args.window,
                "gamma": GAMMA, "lam": LAM, "lr": {m: chosen[m].lr for m in methods}}
    if len(lr_factors) > 1:
        settings["lr_factors"] = lr_factors
    table, figure = output_files(out, args.task, methods, chosen, lr_factors)
    paired = paired_against_best(rows, args.against)
    record = {"settings": settings, "summary": rows, "paired": paired, "runs": results}
    if len(lr_factors) > 1:
        record["sweep"] = sweep_rows
    write_json(table, record, indent=1)
    at_best = " (each method at its best step size)" if len(lr_factors) > 1 else ""
    title = f"{args.task}, {args.steps:,} steps ({args.num_envs} stream(s) per run), {args.seeds} seeds{at_best}"
    plot(results, rows, args.log_every, figure, title, sweep_rows if len(lr_factors) > 1 else ())

    seeds = sorted({len(row["per_seed"]) for row in rows})
    print(f"\nsquared return error, mean over the last {args.window:,} of {args.steps:,} steps "
          f"({'/'.join(map(str, seeds))} seeds per method):")
    label_width = max(26, *(len(row["label"]) + 1 for row in sweep_rows))
    summary = Table(Column("method", label_width, "<"), Column("error", 10), Column("± s.e.", 9), Column("median", 9),
                    Column("whole run", 10), Column("MACs/step", 10), Column("ms/update", 9), Column("lr", 7))
    summary.header()
    for row in sorted(rows, key=lambda r: r["final_error"]):
        summary.row(row["label"], _error(row["final_error"]), f"{row['stderr']:.5f}", _error(row["median_error"]),
                    _error(row["whole_run_error"]), f"{row['macs_per_step']:,d}", f"{row['ms_per_step']:.2f}",
                    f"{row['lr']:g}" if row["method"] != "zero" else "-")
    if paired:
        against = (paired[0]["against"], paired[0]["against_lr"])
        best = next(row for row in rows if (row["method"], row["lr"]) == against)
        reference = paired[0]["against"] == args.against
        which = "the reference" if reference else "the best"
        print(f"\npaired by seed (each seed is the same stream for every method): error minus that of {which}, "
              f"{best['label']} at {best['lr']:g}, mean ± s.e. over the seeds both have:")
        pairs = Table(Column("method", label_width, "<"), Column("final", 10), Column("± s.e.", 9),
                      Column("whole run", 10), Column("± s.e.", 9),
                      Column("ref. lower" if reference else "best lower", 11))
        pairs.header()
        for pair in paired:
            pairs.row(pair["label"], f"{pair['difference']:+.5f}", f"{pair['stderr']:.5f}",
                      f"{pair['whole_run_difference']:+.5f}", f"{pair['whole_run_stderr']:.5f}",
                      f"{pair['best_lower']} of {pair['seeds']}")
    if len(lr_factors) > 1:
        print(f"\nthe step-size sweep (factors {', '.join(f'{f:g}' for f in lr_factors)} of each method's step size; "
              "* marks the best):")
        sweep_table = Table(Column("method", label_width, "<"), Column("lr", 9), Column("error", 10),
                            Column("± s.e.", 9), Column("median", 9), Column("seeds", 6), Column("diverged", 9))
        sweep_table.header()
        for row in sweep_rows:
            if row["method"] != "zero":
                mark = "*" if any(row is best for best in rows) else ""
                sweep_table.row(row["label"], f"{row['lr']:g}{mark}", _error(row["final_error"]),
                                f"{row['stderr']:.5f}", _error(row["median_error"]), len(row["per_seed"]),
                                len(row["diverged"]) or "-")
    print(f"\nwrote {table} and {figure}")
