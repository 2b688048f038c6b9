"""Evaluate a saved run: rebuild its env and network from the run dir, load the checkpoint, play episodes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlmem.errors import ConfigError

EVAL_SEED = 12345  # differs from the training seeds, so evaluation sees fresh episodes


def evaluate_run(
    run_dir: Path,
    episodes: int,
    seed: int = EVAL_SEED,
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
    return evaluate_at_noise_levels(run_dir, episodes, [obs_noise], seed, greedy, num_envs, device, overrides)[0]


def evaluate_at_noise_levels(
    run_dir: Path,
    episodes: int,
    sigmas: Sequence[float],
    seed: int = EVAL_SEED,
    greedy: bool = False,
    num_envs: int | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> list[tuple[list[float], list[int]]]:
    """:func:`evaluate_run` at each noise std of ``sigmas``, loading the run once: one (returns, lengths)
    pair per σ. Every evaluation resets the env with ``seed``, so all σ start from the same states."""
    import torch

    from agents.evaluate import evaluate
    from envs.wrappers import ObservationNoise
    from rlmem import config as cfg
    from rlmem.checkpoint import load_checkpoint
    from rlmem.train import build

    if not run_dir.is_dir():
        raise ConfigError(f"run dir not found: {run_dir}")
    if episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {episodes}")
    if any(sigma < 0 for sigma in sigmas):
        raise ConfigError(f"--obs-noise must be >= 0, got {min(sigmas)}")
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
        with torch.no_grad():
            # Only σ > 0 wraps: the wrapper needs a Box observation space.
            return [
                evaluate(learner.network, ObservationNoise(env, sigma=sigma, seed=seed) if sigma > 0 else env,
                         episodes, run_device, greedy=greedy, seed=seed)
                for sigma in sigmas
            ]
    finally:
        env.close()
