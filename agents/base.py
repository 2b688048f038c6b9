"""The Learner contract, shared options, and the learner registry.

A learner owns the networks, the optimizer, the carried memory state and the environment's current
observation. The training loop (``rlmem.train``) only calls::

    learner = LEARNERS.get(name).cls(options, env=env, memory=memory_spec, model=model_options,
                                     device=device, seed=seed)
    result = learner.iteration()          # collect + update
    learner.state_dict() / learner.load_state_dict(d)   # networks, optimizer, memory state, RNG
    learner.act(obs, state, ...)          # greedy or sampled actions for ``rlmem eval``
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


LEARNERS: Registry = Registry("learner")


def register_learner(name: str, options: type):
    return LEARNERS.register(name, options)
