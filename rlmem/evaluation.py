"""Evaluate a saved run: rebuild its env and network from the run dir, load the checkpoint, play episodes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlmem.errors import ConfigError


def evaluate_run(
    run_dir: Path,
    episodes: int,
    seed: int = 12345,
    obs_noise: float = 0.0,
    greedy: bool = False,
    num_envs: int | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> tuple[list[float], list[int]]:
    """Raw returns and lengths of ``episodes`` episodes of the policy saved in ``run_dir``.

    ``obs_noise`` > 0 adds N(0, σ²) to every observation the policy sees (``envs.wrappers.ObservationNoise``);
    ``overrides`` are ``env.key=value`` strings (e.g. ``env.start_level=1000`` for unseen levels).
    """
    import torch

    from agents.evaluate import evaluate
    from rlmem import config as cfg
    from rlmem.checkpoint import load_checkpoint
    from rlmem.train import build

    if not run_dir.is_dir():
        raise ConfigError(f"run dir not found: {run_dir}")
    if episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {episodes}")
    if obs_noise < 0:
        raise ConfigError(f"--obs-noise must be >= 0, got {obs_noise}")
    if any(not a.startswith("env.") for a in overrides):
        raise ConfigError("eval accepts env.key=value overrides only")
    overrides = list(overrides)
    if num_envs is not None:
        overrides.append(f"env.num_envs={num_envs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    config = cfg.load_saved(run_dir, overrides)
    checkpoint = load_checkpoint(run_dir)
    env, learner, run_device = build(config, seed=seed)
    try:
        learner.network.load_state_dict(checkpoint["network"])
        if obs_noise > 0:
            from envs.wrappers import ObservationNoise

            env = ObservationNoise(env, sigma=obs_noise, seed=seed)
        with torch.no_grad():
            return evaluate(learner.network, env, episodes, run_device, greedy=greedy, seed=seed)
    finally:
        env.close()
