"""Learners (one module per algorithm) built from shared actor-critic pieces. Importing registers them."""

import agents.td  # noqa: F401  (registers td)
from agents import (
    actor_critic,  # noqa: F401  (registers actor_critic)
    ppo,  # noqa: F401  (registers ppo)
    stream_ac,  # noqa: F401  (registers stream_ac)
)
from agents.base import LEARNERS, IterationResult, Learner, ModelOptions, register_learner

__all__ = ["LEARNERS", "IterationResult", "Learner", "ModelOptions", "register_learner"]
