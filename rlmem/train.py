"""The training loop: config -> env -> learner -> TensorBoard, with atomic checkpoints and exact resume.

A run directory ``runs/<name>/`` holds ``config.yaml`` (the resolved config), TensorBoard event files
and ``checkpoint.pt``. Checkpoints are written every ``train.checkpoint_every`` env steps, at the end
and on Ctrl-C (the first Ctrl-C finishes the current iteration, saves and stops; a second one stops at
once and keeps the last good checkpoint). A run that fails with an error keeps its last good
checkpoint: nothing is written after an error.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rlmem.checkpoint import load_checkpoint, save_checkpoint
from rlmem.config import RunConfig
from rlmem.errors import ConfigError


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


def build(config: RunConfig, env_overrides: dict[str, Any] | None = None, seed: int | None = None):
    """Create the environment and the learner that a config describes. Returns (env, learner, device)."""
    import agents.actor_critic  # noqa: F401  (registers learners)
    import rlmem.memory  # noqa: F401  (registers cores)
    from agents.base import LEARNERS
    from agents.rollout import set_acting_threads
    from envs import env_device, make_env

    device = resolve_device(config.train.device)
    seed = config.train.seed if seed is None else seed
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    set_acting_threads(config.train.acting_threads)
    seed_everything(seed)
    spec = {**config.env, **(env_overrides or {})}
    env = make_env(spec, device=env_device(str(spec["name"]), device), seed=seed)
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


def train(config: RunConfig, resume: bool = False, log=print) -> Path:
    """Train as ``config`` says (or continue the run in ``train.run_dir``); return the run dir."""
    run_dir = run_dir_of(config)
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir)
    elif (run_dir / "checkpoint.pt").exists():
        raise ConfigError(
            f"run dir {run_dir} already holds a run; continue it with `rlmem train --resume {run_dir}` "
            "or choose another train.run_dir / train.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(config.to_yaml())

    env, learner, _device = build(config)
    global_step = 0
    iteration = 0
    if checkpoint is not None:
        learner.load_state_dict(checkpoint["learner"])
        if checkpoint.get("env") is not None:
            env.load_state_dict(checkpoint["env"])
        global_step = int(checkpoint["global_step"])
        iteration = int(checkpoint["iteration"])
        _restore_rng(checkpoint["rng"])

    def save() -> None:
        save_checkpoint(
            run_dir,
            {
                "learner": learner.state_dict(),
                "network": learner.network.state_dict(),
                "env": env.state_dict(),
                "global_step": global_step,
                "iteration": iteration,
                "rng": _capture_rng(),
                "config": config.to_dict(),
            },
        )

    writer = SummaryWriter(log_dir=str(run_dir))
    if checkpoint is None:
        writer.add_text("hyperparameters", "```yaml\n" + config.to_yaml() + "\n```", 0)
    log(f"run dir: {run_dir}")
    log(f"watch it: tensorboard --logdir {run_dir.parent}")

    recent = EpisodeWindow.create()
    total = config.train.total_steps
    next_checkpoint = (global_step // config.train.checkpoint_every + 1) * config.train.checkpoint_every
    bar = tqdm(total=total, initial=global_step, unit="step", disable=not config.train.progress, dynamic_ncols=True)
    started, started_step = time.perf_counter(), global_step
    stopped_early = False
    try:
        with _StopRequest() as stop:
            while global_step < total:
                result = learner.iteration()
                iteration += 1
                global_step += result.env_steps
                sps = (global_step - started_step) / max(time.perf_counter() - started, 1e-9)
                _log_iteration(writer, result, global_step, sps)
                recent.returns.extend(result.episode_returns)
                bar.update(result.env_steps)
                mean_return = recent.mean()
                bar.set_postfix(sps=f"{sps:,.0f}", ret="-" if mean_return is None else f"{mean_return:.3g}")
                if global_step >= next_checkpoint:
                    save()
                    next_checkpoint += config.train.checkpoint_every
                if stop.requested:
                    stopped_early = True
                    break
        save()
    finally:
        bar.close()
        writer.close()
        env.close()
    if stopped_early:
        log(f"stopped at step {global_step}; continue with: rlmem train --resume {run_dir}")
    else:
        log(f"done: {global_step} steps; checkpoint {run_dir / 'checkpoint.pt'}")
    return run_dir


def _log_iteration(writer: SummaryWriter, result, step: int, sps: float) -> None:
    for tag, value in result.metrics.items():
        writer.add_scalar(tag, float(value), step)
    writer.add_scalar("charts/SPS", sps, step)
    if result.episode_returns:
        writer.add_scalar("charts/episodic_return", float(np.mean(result.episode_returns)), step)
        writer.add_scalar("charts/episodic_length", float(np.mean(result.episode_lengths)), step)
    if result.episode_successes:
        writer.add_scalar("charts/success_rate", float(np.mean(result.episode_successes)), step)


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
