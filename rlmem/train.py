"""The training loop: config -> env -> learner -> TensorBoard, with atomic checkpoints and exact resume.

A run directory ``runs/<name>/`` holds ``config.yaml`` (the resolved config), TensorBoard event files
and ``checkpoint.pt`` (``rlmem.checkpoint``). Checkpoints are written every ``train.checkpoint_every``
env steps, at the end and on Ctrl-C (the first Ctrl-C finishes the current iteration, saves and stops;
a second one stops at once and keeps the last good checkpoint). A run that fails with an error keeps its
last good checkpoint: nothing is written after an error.

**Resume** (``rlmem train --resume RUN_DIR``) restores the learner, the env and the global generators,
so the continuation is the uninterrupted run bit for bit; only options that cannot change what is
learned may be set again (``resume_config``). The event writer reopens with ``purge_step`` one past the
checkpoint's step, so TensorBoard drops what a killed process logged after its last checkpoint.

**Divergence.** A learner raises ``TrainingDiverged`` when a loss, gradient, parameter or carried state
stops being finite; the loop raises it too for a non-finite metric, for sampling from non-finite action
probabilities and (``save_checkpoint``) for a non-finite checkpoint entry. The run stops with
``RunDiverged``: one message naming the step, the quantity and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.base import LEARNERS
from agents.population import POPULATIONS
from agents.rollout import set_acting_threads
from envs import env_device, make_env
from envs.base import EnvError, EnvShard
from rlmem import config as cfg
from rlmem.checkpoint import CHECKPOINT_NAME, exclusive_run_dir, load_checkpoint, save_checkpoint
from rlmem.config import RunConfig
from rlmem.distributed import Distributed, check_divides, launched_world_size
from rlmem.errors import DIVERGED_TAG, ConfigError, TrainingDiverged


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_name(config: RunConfig) -> str:
    return f"{config.choices.get('env', config.env['name'])}_{config.memory['name']}-{config.memory['grad']}_" \
        f"{config.agent['name']}_s{config.train.seed}"


def run_dir_of(config: RunConfig) -> Path:
    if config.train.run_dir:
        return Path(config.train.run_dir)
    return Path("runs") / (config.train.name or default_run_name(config))


def build(config: RunConfig, env_overrides: dict[str, Any] | None = None, seed: int | None = None,
          shard: EnvShard | None = None):
    """Create the environment and the learner that a config describes. Returns (env, learner, device).
    ``shard``: build only these envs of the run's ``env.num_envs`` (one rank of a data-parallel run)."""
    device = resolve_device(config.train.device)
    seed = config.train.seed if seed is None else seed
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    set_acting_threads(config.train.acting_threads)
    seed_everything(seed)
    spec = {**config.env, **(env_overrides or {})}
    if shard is not None:
        spec["num_envs"] = shard.size
    env = make_env(spec, device=env_device(str(spec["name"]), device), seed=seed, shard=shard)
    try:
        learner = LEARNERS.get(config.agent["name"]).cls(
            config.agent_options(),
            env=env,
            memory=config.memory,
            model=config.model,
            device=device,
            seed=seed,
            total_steps=config.train.total_steps,
        )
    except BaseException:
        env.close()
        raise
    return env, learner, device


@dataclass
class EpisodeWindow:
    """Recent finished episodes, for the progress bar."""

    returns: deque

    @classmethod
    def create(cls, size: int = 100) -> EpisodeWindow:
        return cls(deque(maxlen=size))

    def mean(self) -> float | None:
        return float(np.mean(self.returns)) if self.returns else None


class _StopRequest:
    """First Ctrl-C: finish the iteration, checkpoint and stop. Second Ctrl-C: stop now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# Options a resumed run may change: they decide how long the run goes on, how often it checkpoints,
# what the console shows and how many threads compute or whether a population's step is compiled,
# never what is computed. Thread counts and compiling can change the rounding of reductions (a
# bit-for-bit continuation needs the same settings), not the algorithm, its data or its random
# streams. train.device is not among them: the saved generator states belong to the device they were
# drawn on, and other kernels round differently.
RESUMABLE_OPTIONS = (
    "train.total_steps",
    "train.checkpoint_every",
    "train.progress",
    "train.torch_threads",
    "train.acting_threads",
    "train.compile",
)


def resume_config(run_dir: Path, args: Sequence[str] = ()) -> RunConfig:
    """The config saved in ``run_dir`` with ``args`` applied, for ``rlmem train --resume RUN_DIR``.

    A resumed run continues exactly where the interrupted one stopped, so only options that do not change
    what the run learns may be set (``RESUMABLE_OPTIONS``); an argument that would change anything else
    (memory, env, agent, model, train.seed, train.device, the run dir or name) raises ``ConfigError``
    unless it sets the value the run already has.
    """
    saved = cfg.load_saved(run_dir)
    choices, dotted = cfg.parse_overrides(args)
    for group, choice in choices.items():
        if choice not in (saved.choices.get(group), getattr(saved, group)["name"]):
            raise _resume_refusal(run_dir, f"{group}={choice}", f"{group}={getattr(saved, group)['name']}")
    config = cfg.load_saved(run_dir, dotted)
    before, after = cfg.dotted_keys(saved.to_dict()), cfg.dotted_keys(config.to_dict())
    for key, value in after.items():
        if key.split(".", 1)[0] != "choices" and key not in RESUMABLE_OPTIONS and before.get(key) != value:
            raise _resume_refusal(run_dir, f"{key}={value}", f"{key}={before.get(key)}")
    config.train.run_dir = str(run_dir)
    return config


def _resume_refusal(run_dir: Path, asked: str, saved: str) -> ConfigError:
    return ConfigError(
        f"with --resume only {', '.join(RESUMABLE_OPTIONS)} may change (they do not change what the run learns); "
        f"{asked} would make the continuation differ from the run in {run_dir} ({saved}): start a new run instead"
    )


class RunDiverged(TrainingDiverged):
    """``TrainingDiverged`` with where it happened: the env step and the last good checkpoint."""

    def __init__(self, quantity: str, step: int, last_checkpoint: tuple[Path, int] | None) -> None:
        super().__init__(quantity)
        if last_checkpoint is None:
            kept = "no checkpoint was written yet"
        else:
            path, saved_step = last_checkpoint
            kept = f"the last good checkpoint is {path} (step {saved_step})"
        self.args = (f"training diverged at step {step}: non-finite {quantity}; {kept}",)


# "losses/explained_variance" is NaN by definition when the targets do not vary (agents.returns).
UNDEFINED_WHEN_NAN = frozenset({"losses/explained_variance"})


def check_finite_metrics(metrics: dict[str, float]) -> None:
    """Raise ``TrainingDiverged`` naming the first metric that is not finite."""
    for tag, value in metrics.items():
        if not math.isfinite(float(value)) and not (tag in UNDEFINED_WHEN_NAN and math.isnan(float(value))):
            raise TrainingDiverged(tag)


def progress_line(step: int, total: int, steps_per_second: float, members: int = 1,
                  recent: EpisodeWindow | None = None) -> str:
    """One line of a run's progress, e.g. ``step 1,800,000 of 2,000,000 (90 %), 135 steps/s, about 25 min
    left``; a population's rate counts one member's steps (its step axis), its member-steps/s beside it."""
    line = f"step {step:,} of {total:,} ({100 * step // max(total, 1)} %), {steps_per_second:,.0f} steps/s"
    if members > 1:
        line += f" ({steps_per_second * members:,.0f} member-steps/s)"
    if step < total and steps_per_second > 0:
        minutes = round((total - step) / steps_per_second / 60)
        line += f", about {minutes // 60} h {minutes % 60} min left" if minutes >= 60 else f", about {minutes} min left"
    if recent is not None and recent.returns:
        line += f", mean return {recent.mean():.3g} over the last {len(recent.returns)} episodes"
    return line


def run_iterations(config: RunConfig, iterate: Callable[[], Sequence[Any]], writers: Sequence[Any],
                   save: Callable[[int, int], tuple[Path, int]], global_step: int, iteration: int,
                   last_checkpoint: tuple[Path, int] | None, any_rank: Callable[[bool], bool] = bool,
                   show_progress: bool = True, report: Callable[[str], None] = lambda line: None) -> tuple[int, bool]:
    """The loop every run shares: ``iterate()`` (one ``IterationResult`` per writer: one run, or a
    population's members) until ``train.total_steps``, each result checked finite and logged to its
    writer (a population's member that has diverged is reported once, then logs nothing more),
    ``save(global_step, iteration)`` every ``train.checkpoint_every`` env steps and at the end.
    Where no progress bar is drawn (no terminal: a run in the background, its output in a log file; or
    ``train.progress: false``), each checkpoint ``report``-s a ``progress_line`` instead, so a log shows
    how far a run of hours has got. The first Ctrl-C (on any rank) finishes the iteration, saves and
    stops. Returns (the env step reached, whether it stopped early); a non-finite quantity raises
    ``RunDiverged`` naming the last good checkpoint, and nothing is saved after it."""
    recent = EpisodeWindow.create()
    total, every = config.train.total_steps, config.train.checkpoint_every
    next_checkpoint = (global_step // every + 1) * every
    # disable=None: tqdm draws only on a terminal, so a log file of a background run stays readable
    bar = tqdm(total=total, initial=global_step, unit="step",
               disable=None if config.train.progress and show_progress else True, dynamic_ncols=True)
    started, started_step = time.perf_counter(), global_step
    stopped_early = False
    announced: set[int] = set()  # the population members whose divergence has been reported
    try:
        with _StopRequest() as stop:
            while global_step < total:
                results = iterate()
                iteration += 1
                global_step += results[0].env_steps
                sps = (global_step - started_step) / max(time.perf_counter() - started, 1e-9)
                for i, (writer, result) in enumerate(zip(writers, results, strict=True)):
                    if result.diverged is not None:
                        if i not in announced:
                            announced.add(i)
                            _announce_divergence(writer, result.diverged, global_step, report)
                        continue
                    check_finite_metrics(result.metrics)
                    _log_iteration(writer, result, global_step, sps)
                    recent.returns.extend(result.episode_returns)
                bar.update(results[0].env_steps)
                mean_return = recent.mean()
                shown_return = "-" if mean_return is None else f"{mean_return:.3g}"
                bar.set_postfix(sps=f"{sps * len(results):,.0f}", ret=shown_return)
                if global_step >= next_checkpoint:
                    last_checkpoint = save(global_step, iteration)
                    next_checkpoint += every
                    if bar.disable and global_step < total:
                        report(progress_line(global_step, total, sps, len(results), recent))
                if any_rank(stop.requested):
                    stopped_early = True
                    break
        save(global_step, iteration)
    except TrainingDiverged as err:
        raise RunDiverged(err.quantity, global_step, last_checkpoint) from None
    finally:
        bar.close()
        for writer in writers:
            writer.close()
    return global_step, stopped_early


def _announce_divergence(writer: Any, why: str, step: int, report: Callable[[str], None]) -> None:
    """Say (in the run's output and in the member's own TensorBoard text) that a population's member
    diverged: it takes no further steps, and its curves end here."""
    message = (f"member {Path(writer.log_dir).name} diverged by step {step}: non-finite {why}; it takes no "
               "further steps and the other members go on")
    writer.add_text(DIVERGED_TAG, message, step)
    report(message)


def train(config: RunConfig, resume: bool = False, log=print, report: Callable[[str], None] | None = None) -> Path:
    """Train as ``config`` says (or continue the run in ``train.run_dir``); return the run dir.

    ``log`` takes the run's messages (where it writes, how it ended); ``report`` (``log`` by default)
    the progress line of each checkpoint where no progress bar is drawn (see ``run_iterations``).

    Launched by torchrun (``rlmem.distributed``), this process trains its rank's share of the run and
    only rank 0 writes the run dir and logs.

    Raises ``RunDiverged`` (a ``TrainingDiverged``) when a loss, gradient, parameter, memory state,
    metric or checkpoint entry stops being finite; the last good checkpoint stays.
    """
    report = report or log
    if cfg.is_population(config):
        if launched_world_size() > 1:
            raise ConfigError("train.population trains every member in one process; start it without torchrun "
                              "or --nproc (a population and data-parallel ranks do not combine)")
        with exclusive_run_dir(run_dir_of(config)):
            return train_population(config, resume, log, report)
    ranks = Distributed.from_environment(config.train.device)
    try:
        if not ranks.is_main:
            log = report = _silent
        # rank 0 alone writes the run dir, so it alone holds it
        with exclusive_run_dir(run_dir_of(config)) if ranks.is_main else contextlib.nullcontext():
            return _train(config, resume, log, ranks, report)
    finally:
        ranks.close()


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


class _NoWriter:
    """The event writer of ranks other than 0, which write nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_text(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def rank_checkpoints(checkpoint: dict[str, Any], world_size: int, path: Path) -> list[dict[str, Any]]:
    """One checkpoint per rank of a run of ``world_size`` ranks: rank 0's is the file's own entries,
    rank r's has its ``learner``, ``env`` and ``rng`` from the file's ``ranks`` list. A checkpoint of
    another number of ranks raises ``ConfigError``: each rank's envs and memory state are its own."""
    saved = int(checkpoint.get("world_size", 1))
    if saved != world_size:
        raise ConfigError(
            f"checkpoint {path} was saved by a run of {saved} process(es) and this run has {world_size}; "
            f"a run resumes only with the world size it was saved with (each process keeps its own envs' "
            f"memory state): resume with {saved} process(es)"
        )
    others = checkpoint.get("ranks", [])
    return [checkpoint, *({**checkpoint, **part} for part in others)]


def _train(config: RunConfig, resume: bool, log, ranks: Distributed, report: Callable[[str], None]) -> Path:
    run_dir = run_dir_of(config)
    if ranks.active:
        check_divides(int(config.env.get("num_envs", 1)), ranks.world_size)

    def prepare_run_dir() -> None:
        if not resume and (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"run dir {run_dir} already holds a run; continue it with `rlmem train --resume {run_dir}` "
                "or choose another train.run_dir / train.name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / "config.yaml").write_text(config.to_yaml())

    checkpoint = None
    if resume:
        checkpoint = ranks.scatter_states(
            lambda: rank_checkpoints(load_checkpoint(run_dir), ranks.world_size, run_dir / CHECKPOINT_NAME))
    ranks.on_main(prepare_run_dir)

    rank_config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, device=ranks.device(config.train.device)))
    env, learner, _device = build(rank_config, shard=ranks.shard(int(config.env.get("num_envs", 1))))
    ranks.prepare(learner)
    global_step = 0
    iteration = 0
    last_checkpoint: tuple[Path, int] | None = None  # (path, step) of the last good checkpoint
    if checkpoint is not None:
        try:
            restore(checkpoint, learner, env, run_dir / CHECKPOINT_NAME)
        except BaseException:
            env.close()
            raise
        global_step = checkpoint["global_step"]
        iteration = checkpoint["iteration"]
        last_checkpoint = (run_dir / CHECKPOINT_NAME, global_step)

    def save(global_step: int, iteration: int) -> tuple[Path, int]:
        # Every rank's own part (its envs' memory state, sensitivities, env state, generators), on rank 0.
        parts = ranks.gather_states({"learner": learner.state_dict(), "env": env.state_dict(), "rng": _capture_rng()})
        if parts is not None:
            payload = {
                **parts[0],
                "network": learner.network.state_dict(),
                "global_step": global_step,
                "iteration": iteration,
                "config": config.to_dict(),
            }
            if ranks.active:
                payload.update(world_size=ranks.world_size, ranks=parts[1:])
            save_checkpoint(run_dir, payload)
        return run_dir / CHECKPOINT_NAME, global_step

    # A resumed run drops what the interrupted one logged after its checkpoint (a killed process logs on
    # past it): the writer opens with a SessionLog START at purge_step, and TensorBoard discards every
    # event read before it whose step is >= purge_step. The checkpoint's own step was logged before it
    # was saved, so that step stays.
    writer = _NoWriter() if not ranks.is_main else SummaryWriter(
        log_dir=str(run_dir), purge_step=None if checkpoint is None else global_step + 1)
    if checkpoint is None:
        writer.add_text("hyperparameters", "```yaml\n" + config.to_yaml() + "\n```", 0)
    log(f"run dir: {run_dir}")
    log(f"watch it: tensorboard --logdir {run_dir.parent}")

    try:
        global_step, stopped_early = run_iterations(
            config, lambda: [ranks.global_result(learner.iteration())], [writer], save, global_step, iteration,
            last_checkpoint, any_rank=ranks.any_rank, show_progress=ranks.is_main, report=report)
    finally:
        env.close()
    if stopped_early:
        log(f"stopped at step {global_step}; continue with: rlmem train --resume {run_dir}")
    else:
        log(f"done: {global_step} steps; checkpoint {run_dir / CHECKPOINT_NAME}")
    return run_dir


def restore(checkpoint: dict[str, Any], learner: Any, env: Any, path: Path) -> None:
    """Load a checkpoint's learner, env and global RNG states; a checkpoint that does not fit the run's
    learner or env (another run's file) raises ``ConfigError`` naming ``path``."""
    with checkpoint_must_fit(path):
        learner.load_state_dict(checkpoint["learner"])
        if checkpoint["env"] is not None:
            env.load_state_dict(checkpoint["env"])
        _restore_rng(checkpoint["rng"])


@contextlib.contextmanager
def checkpoint_must_fit(path: Path) -> Iterator[None]:
    """Loading checkpoint ``path`` into a run: what does not fit the run's learner or env (another run's
    file) becomes one ``ConfigError`` naming the file."""
    try:
        yield
    except EnvError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        detail = (str(err).splitlines() or [""])[0]
        raise ConfigError(
            f"checkpoint {path} does not fit the run's config.yaml ({type(err).__name__}: {detail})"
        ) from None


def _log_iteration(writer: SummaryWriter, result, step: int, sps: float) -> None:
    for tag, value in result.metrics.items():
        writer.add_scalar(tag, float(value), step)
    writer.add_scalar("charts/SPS", sps, step)
    if result.episode_returns:
        writer.add_scalar("charts/episodic_return", float(np.mean(result.episode_returns)), step)
        writer.add_scalar("charts/episodic_length", float(np.mean(result.episode_lengths)), step)
    if result.episode_successes:
        writer.add_scalar("charts/success_rate", float(np.mean(result.episode_successes)), step)


# --------------------------------------------------------------------------------------------------
# Populations: P learners stepped together (agents.population), each logged as its own sub-run


def train_population(config: RunConfig, resume: bool = False, log=print,
                     report: Callable[[str], None] | None = None) -> Path:
    """``train`` for a population (``train.population`` > 1 or a ``train.population_grid``).

    The run dir holds the population's ``config.yaml`` and one checkpoint with every member; each
    member logs to its own sub-run ``members/<grid values>_s<seed>/`` (its own ``config.yaml`` and
    event files), so ``rlmem summary RUN_DIR/members/*`` groups the members like separate runs.
    ``global_step`` counts one member's env steps (each member's step axis is the one it has alone).
    """
    run_dir = run_dir_of(config)
    checkpoint = load_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"run dir {run_dir} already holds a run; continue it with `rlmem train --resume {run_dir}` "
            "or choose another train.run_dir / train.name"
        )
    members = cfg.population_members(config)
    member_dirs = [cfg.member_run_dir(run_dir, m, config.train.population_grid) for m in members]
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(config.to_yaml())
        for member, member_dir in zip(members, member_dirs):
            member_dir.mkdir(parents=True, exist_ok=True)
            member.train.run_dir = str(member_dir)
            (member_dir / "config.yaml").write_text(member.to_yaml())

    built: list[tuple[Any, Any]] = []
    try:
        for member in members:
            env, learner, _device = build(member)
            built.append((env, learner))
        compiled = {"compile": True} if config.train.compile else {}  # td only (check_combination)
        population = POPULATIONS[config.agent["name"]]([learner for _, learner in built], **compiled)
        population.member_names = [d.name for d in member_dirs]
    except BaseException:
        for env, _ in built:
            env.close()
        raise
    envs = [env for env, _ in built]
    global_step, iteration = 0, 0
    last_checkpoint: tuple[Path, int] | None = None
    if checkpoint is not None:
        try:
            restore_population(checkpoint, population, dict(zip([d.name for d in member_dirs], envs)),
                               run_dir / CHECKPOINT_NAME)
        except BaseException:
            for env in envs:
                env.close()
            raise
        global_step, iteration = checkpoint["global_step"], checkpoint["iteration"]
        last_checkpoint = (run_dir / CHECKPOINT_NAME, global_step)

    def save(global_step: int, iteration: int) -> tuple[Path, int]:
        learner_state = population.state_dict()  # writes every member's slice back into it first
        path = save_checkpoint(
            run_dir,
            {
                "learner": learner_state,
                # keyed by the members' sub-run names, in member order
                "network": {d.name: learner.network.state_dict() for d, (_, learner) in zip(member_dirs, built)},
                "env": {d.name: env.state_dict() for d, env in zip(member_dirs, envs)},
                "global_step": global_step,
                "iteration": iteration,
                "rng": _capture_rng(),
                "config": config.to_dict(),
            },
        )
        return path, global_step

    purge_step = None if checkpoint is None else global_step + 1
    writers = [SummaryWriter(log_dir=str(d), purge_step=purge_step) for d in member_dirs]
    if checkpoint is None:
        for writer, member in zip(writers, members):
            writer.add_text("hyperparameters", "```yaml\n" + member.to_yaml() + "\n```", 0)
    log(f"run dir: {run_dir} ({len(members)} members)")
    log(f"watch it: tensorboard --logdir {run_dir / 'members'}")
    if config.train.compile:
        log("train.compile: the first iteration compiles the step (and so does each ccn stage's first), "
            "10-60 s each")

    try:
        global_step, stopped_early = run_iterations(config, population.iteration, writers, save, global_step,
                                                    iteration, last_checkpoint, report=report or log)
    finally:
        for env in envs:
            env.close()
    if stopped_early:
        log(f"stopped at step {global_step}; continue with: rlmem train --resume {run_dir}")
    else:
        log(f"done: {global_step} steps of {len(members)} members; checkpoint {run_dir / CHECKPOINT_NAME}")
    return run_dir


def restore_population(checkpoint: dict[str, Any], population: Any, envs: dict[str, Any], path: Path) -> None:
    """``restore`` for a population: every member's learner and env (``envs`` by member name), and the
    global RNG states."""
    with checkpoint_must_fit(path):
        if sorted(checkpoint["env"]) != sorted(envs):
            raise ValueError(f"members saved: {', '.join(checkpoint['env'])}; members now: {', '.join(envs)}")
        for name, env in envs.items():
            if checkpoint["env"][name] is not None:
                env.load_state_dict(checkpoint["env"][name])
        population.load_state_dict(checkpoint["learner"])  # after the envs: it stacks their streams
        _restore_rng(checkpoint["rng"])


def _capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
