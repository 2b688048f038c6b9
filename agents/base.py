"""The Learner contract, shared options, and the learner registry.

A learner owns the networks, the optimizer, the carried memory state and the environment's current
observation. The training loop (``rlmem.train``) only calls::

    learner = LEARNERS.get(name).cls(options, env=env, memory=memory_spec, model=model_options,
                                     device=device, seed=seed, total_steps=total_steps)
    result = learner.iteration()          # collect + update -> IterationResult
    learner.state_dict() / learner.load_state_dict(d)   # networks, optimizer, memory state, RNG
    learner.network                       # the ActorCritic module ``rlmem eval`` runs (agents.evaluate)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlmem.errors import ConfigError
from rlmem.registry import Registry


@dataclass
class ModelOptions:
    """The network around the memory core: encoder -> core -> policy and value heads."""

    encoder: str = "auto"  # auto | mlp | nature_cnn | impala | identity
    encoder_size: int = 128  # width of the MLP encoder's layers / the CNN's final layer
    encoder_layers: int = 1  # hidden layers of the MLP encoder
    prev_action: bool = False  # feed the previous action (one-hot for discrete) to the core
    prev_reward: bool = False  # feed the previous reward to the core

    def __post_init__(self) -> None:
        if self.encoder not in ("auto", "mlp", "nature_cnn", "impala", "identity"):
            raise ConfigError(
                f"model.encoder must be one of auto, mlp, nature_cnn, impala, identity; got {self.encoder!r}"
            )
        if self.encoder_size <= 0 or self.encoder_layers < 0:
            raise ConfigError("model.encoder_size must be positive and model.encoder_layers non-negative")


@dataclass
class IterationResult:
    """What one ``Learner.iteration()`` reports to the training loop."""

    env_steps: int  # environment steps taken in this iteration (all envs together)
    metrics: dict[str, float] = field(default_factory=dict)  # full TensorBoard tags: "losses/value_loss"...
    episode_returns: list[float] = field(default_factory=list)  # raw returns of episodes finished
    episode_lengths: list[int] = field(default_factory=list)
    # Per finished episode, where the env reports ``info["success"]`` (memory tasks); logged as charts/success_rate.
    episode_successes: list[float] = field(default_factory=list)


def check_number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                 integer: bool = False) -> None:
    """Validate the learner option ``agent.<name>`` lies in [low, high] (or (low, high]); ConfigError if not."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ConfigError(f"agent.{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


LEARNERS: Registry = Registry("learner")


def register_learner(name: str, options: type):
    return LEARNERS.register(name, options)
