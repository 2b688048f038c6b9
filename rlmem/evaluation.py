"""Evaluate a saved run: rebuild its env and network from the run dir, load the checkpoint, run it fresh.

What a run is evaluated on depends on its network:

* a policy (``ActorCritic``: actor_critic, ppo, stream_ac): ``episodes`` episodes, their raw returns and
  lengths (``agents.evaluate.evaluate``);
* a prediction (``PredictionNetwork``: td on a prediction task): ``steps`` steps of every stream, the
  mean squared error of the prediction against the true return the env reports, beside that of V = 0
  (``agents.evaluate.evaluate_prediction``).

Any other network is refused with one message. Evaluation runs with ``seed`` (``EVAL_SEED`` by
default, not a training seed), so it sees fresh episodes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agents.evaluate import evaluate, evaluate_prediction
from agents.networks import ActorCritic
from agents.td import PredictionNetwork
from envs.wrappers import ObservationNoise
from rlmem import config as cfg
from rlmem.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rlmem.errors import ConfigError
from rlmem.train import build

EVAL_SEED = 12345  # differs from the training seeds, so evaluation sees fresh episodes
DEFAULT_EPISODES = 20  # of a policy
DEFAULT_PREDICTION_STEPS = 10_000  # per stream, of a prediction (about 75 trials of trace patterning)


@dataclass
class EpisodeScores:
    """A policy's evaluation: the raw return and length of each episode."""

    returns: list[float]
    lengths: list[int]


@dataclass
class PredictionScores:
    """A prediction's evaluation: mean squared errors against the true return over ``steps`` × ``streams``."""

    steps: int  # per stream
    streams: int
    squared_error: float  # of the saved network's prediction
    zero_squared_error: float  # of V = 0 (nothing learned)


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
    """Raw returns and lengths of ``episodes`` episodes of the policy saved in ``run_dir`` at each noise std
    of ``sigmas`` (N(0, σ²) added to every observation the policy sees, ``envs.wrappers.ObservationNoise``),
    loading the run once: one (returns, lengths) pair per σ. Every evaluation resets the env with ``seed``,
    so all σ start from the same states. ``overrides`` are ``env.key=value`` strings (e.g.
    ``env.start_level=1000`` for unseen levels)."""
    _check_counts("--episodes", episodes)
    _check_sigmas(sigmas)
    with _saved_run(run_dir, seed, num_envs, device, overrides) as (env, network, run_device, _config):
        if not isinstance(network, ActorCritic):
            raise ConfigError(f"{run_dir} holds a {type(network).__name__}, not a policy: no episode returns to "
                              f"measure (`rlmem eval {run_dir}` reports what it can)")
        with torch.no_grad():
            return [
                evaluate(network, _noisy(env, sigma, seed), episodes, run_device, greedy=greedy, seed=seed)
                for sigma in sigmas
            ]


def evaluate_saved(
    run_dir: Path,
    episodes: int | None = None,
    steps: int | None = None,
    seed: int = EVAL_SEED,
    obs_noise: float = 0.0,
    greedy: bool = False,
    num_envs: int | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> EpisodeScores | PredictionScores:
    """Evaluate the run in ``run_dir`` as its network allows (module docstring): ``episodes`` of a policy
    (default ``DEFAULT_EPISODES``) or ``steps`` per stream of a prediction (``DEFAULT_PREDICTION_STEPS``).
    Asking for what the network cannot do (``steps`` or ``greedy`` of a prediction, ``steps`` of a policy)
    raises ``ConfigError``."""
    for name, count in (("--episodes", episodes), ("--steps", steps)):
        if count is not None:
            _check_counts(name, count)
    _check_sigmas([obs_noise])
    with _saved_run(run_dir, seed, num_envs, device, overrides) as (env, network, run_device, config):
        if isinstance(network, ActorCritic):
            if steps is not None:
                raise ConfigError(f"--steps applies to prediction runs; {run_dir} holds a policy: use --episodes")
            returns, lengths = evaluate(network, _noisy(env, obs_noise, seed), episodes or DEFAULT_EPISODES,
                                        run_device, greedy=greedy, seed=seed)
            return EpisodeScores(returns, lengths)
        if isinstance(network, PredictionNetwork):
            if episodes is not None or greedy:
                raise ConfigError(
                    f"{run_dir} holds a prediction (no actions, no episodes): --episodes and --greedy do not "
                    "apply; use --steps"
                )
            _check_ground_truth(run_dir, config.agent.get("gamma"), env)
            steps = steps or DEFAULT_PREDICTION_STEPS
            error = evaluate_prediction(network, _noisy(env, obs_noise, seed), steps, run_device, seed=seed)
            return PredictionScores(steps, env.num_envs, error.squared_error, error.zero_squared_error)
        raise ConfigError(f"rlmem eval cannot evaluate {run_dir}: it holds a {type(network).__name__}, which is "
                          "neither a policy nor a prediction network")


# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _saved_run(
    run_dir: Path, seed: int, num_envs: int | None, device: str | None, overrides: Sequence[str]
) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(env, network with the checkpoint's weights, device, config) of the run in ``run_dir``; the env closes
    after."""
    if not run_dir.is_dir():
        raise ConfigError(f"run dir not found: {run_dir}")
    if any(not a.startswith("env.") for a in overrides):
        raise ConfigError("eval accepts env.key=value overrides only")
    overrides = list(overrides)
    if num_envs is not None:
        overrides.append(f"env.num_envs={num_envs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    config = cfg.load_saved(run_dir, overrides)
    if cfg.is_population(config):
        members = sorted(p.name for p in (run_dir / "members").glob("*") if p.is_dir())
        raise ConfigError(f"{run_dir} holds a population; evaluate one of its members: rlmem eval "
                          f"{run_dir / 'members'}/<member> (members: {', '.join(members)})")
    network_state = _member_network(run_dir)
    if network_state is None:
        network_state = load_checkpoint(run_dir)["network"]
    env, learner, run_device = build(config, seed=seed)
    try:
        try:
            learner.network.load_state_dict(network_state)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            detail = (str(err).splitlines() or [""])[0]
            raise ConfigError(f"checkpoint {run_dir / CHECKPOINT_NAME} does not fit the run's config.yaml "
                              f"({type(err).__name__}: {detail})") from None
        yield env, learner.network, run_device, config
    finally:
        env.close()


def _member_network(run_dir: Path) -> dict[str, Any] | None:
    """A population member's weights (``POPULATION/members/<name>``: the population's checkpoint holds
    them under the member's name), or None for an ordinary run dir."""
    population_dir = run_dir.parent.parent
    if (run_dir / CHECKPOINT_NAME).exists() or run_dir.parent.name != "members" \
            or not (population_dir / CHECKPOINT_NAME).exists():
        return None
    networks = load_checkpoint(population_dir)["network"]
    if run_dir.name not in networks:
        raise ConfigError(f"the population checkpoint {population_dir / CHECKPOINT_NAME} holds no member "
                          f"{run_dir.name}")
    return networks[run_dir.name]


def _noisy(env: Any, sigma: float, seed: int) -> Any:
    # Only σ > 0 wraps: the wrapper needs a Box observation space.
    return ObservationNoise(env, sigma=sigma, seed=seed) if sigma > 0 else env


def _check_ground_truth(run_dir: Path, agent_gamma: float | None, env: Any) -> None:
    """The env's true return discounts by env.gamma; a run that predicts with another γ has no ground truth."""
    env_gamma = getattr(env, "gamma", None)
    if env_gamma is None:
        raise ConfigError(f"the env of {run_dir} defines no discount and no true return to measure predictions by")
    if agent_gamma is not None and not math.isclose(float(agent_gamma), float(env_gamma)):
        raise ConfigError(
            f"{run_dir} predicts returns discounted by agent.gamma={agent_gamma}, but the env's true return uses "
            f"env.gamma={env_gamma}: there is no ground truth to measure its prediction against"
        )


def _check_counts(name: str, count: int) -> None:
    if count <= 0:
        raise ConfigError(f"{name} must be positive, got {count}")


def _check_sigmas(sigmas: Sequence[float]) -> None:
    if any(sigma < 0 for sigma in sigmas):
        raise ConfigError(f"--obs-noise must be >= 0, got {min(sigmas)}")
