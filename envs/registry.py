"""Environment registry: name -> (VecEnv class, typed options dataclass).

``ENVS`` is a ``rlmem.registry.Registry`` like the core and learner registries (a shared foundation,
not the composition root), so the CLI and the config read all three alike. ``make_env`` builds an env
from a plain spec ``{"name": ..., <options>}``; every user error is an ``EnvError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from envs.base import EnvError, EnvShard, VecEnv
from rlmem.registry import Entry, Registry


@dataclass
class EnvOptions:
    """Options every environment has; an environment's own options dataclass extends this one."""

    num_envs: int = 16
    # Step half of the envs while the policy acts for the other half (agents.runner): true, false, or
    # auto (where the env steps in the background and the policy runs on an accelerator).
    overlap: bool | str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_envs, int) or self.num_envs <= 0:
            raise EnvError(f"env.num_envs must be a positive integer, got {self.num_envs!r}")
        if not (isinstance(self.overlap, bool) or self.overlap == "auto"):
            raise EnvError(f"env.overlap must be true, false or auto, got {self.overlap!r}")


ENVS: Registry[VecEnv] = Registry("environment")


def register_env(name: str, options: type = EnvOptions) -> Callable[[type[VecEnv]], type[VecEnv]]:
    """Class decorator: ``@register_env("cue_recall", CueRecallOptions)``."""
    return ENVS.register(name, options)


def env_entry(name: str) -> Entry[VecEnv]:
    """The registered entry of env ``name``; an unknown name -> EnvError listing the valid ones."""
    if name not in ENVS:
        raise EnvError(f"unknown environment {name!r}; valid choices: {', '.join(ENVS.names())}")
    return ENVS.get(name)


def env_options(spec: Mapping[str, Any]) -> Any:
    values = {k: (list(v) if type(v).__name__ == "ListConfig" else v) for k, v in dict(spec).items()}
    if "name" not in values:
        raise EnvError(f"env.name is missing; valid choices: {', '.join(ENVS.names())}")
    entry = env_entry(values.pop("name"))
    fields = {f.name for f in dataclasses.fields(entry.options)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise EnvError(f"unknown key env.{unknown[0]}; valid keys: {', '.join(sorted(fields))}")
    return entry.options(**values)


def make_env(spec: Mapping[str, Any], device: torch.device | str = "cpu", seed: int = 0,
             shard: EnvShard | None = None) -> VecEnv:
    """Build a VecEnv from ``{"name": ..., "num_envs": ..., <env options>}``; it is reset by the caller.
    ``shard``: the env is that part of a larger batch (``VecEnv.take_shard``; ``num_envs`` = its size)."""
    options = env_options(spec)
    env = env_entry(str(spec["name"])).cls(options, device=torch.device(device), seed=seed)
    if shard is not None:
        try:
            env.take_shard(shard)
        except BaseException:
            env.close()
            raise
    env.overlap = None if options.overlap == "auto" else options.overlap
    return env


def env_device(name: str, training_device: torch.device | str) -> torch.device:
    """Where to build env ``name`` for a learner on ``training_device``: on the CPU where its library
    works on the host (``VecEnv.steps_on_host``), so that the runner's pinned, asynchronous upload does
    the copy; on the training device otherwise (natively batched torch envs step there)."""
    return torch.device("cpu") if env_entry(name).cls.steps_on_host else torch.device(training_device)
