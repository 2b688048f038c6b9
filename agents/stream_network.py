"""The streaming actor-critic network (the streaming-deep-RL recipe around a memory core).

    obs -> NormalizedObservation -> memory core -> actor torso -> policy head
                                                -> critic torso -> value

No trainable encoder sits in front of the core: all of the core's learning is RTRL through its own
parameters, and the learner's per-env backward pass needs no gradient with respect to the core's inputs.
The actor and critic have separate torsos of Linear -> LayerNorm without affine -> LeakyReLU layers,
and every linear layer after the core is sparsely initialised (``sparse_init_``: a fraction of each
unit's inputs zeroed). Shapes and the step/forward interface are those of ``agents.networks.ActorCritic``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from agents.base import ModelOptions
from agents.networks import ActorCritic, CategoricalHead, GaussianHead
from agents.normalization import NormalizedObservation
from rlmem.errors import ConfigError


def sparse_init_(layer: nn.Linear, sparsity: float, generator: torch.Generator) -> nn.Linear:
    """Weights U(±1/√fan_in) with ⌈sparsity·fan_in⌉ of each output unit's inputs zeroed (but never all
    of them: every unit keeps at least one input); biases 0."""
    fan_out, fan_in = layer.weight.shape
    bound = 1.0 / math.sqrt(fan_in)
    zeroed_per_unit = min(math.ceil(sparsity * fan_in), fan_in - 1)
    with torch.no_grad():
        weight = torch.rand(fan_out, fan_in, generator=generator) * (2 * bound) - bound
        # A random subset of each row: the positions of its lowest scores in a row of random scores.
        zeroed = torch.rand(fan_out, fan_in, generator=generator).argsort(dim=1)[:, :zeroed_per_unit]
        weight.scatter_(1, zeroed, 0.0)
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


def torso(in_features: int, size: int, layers: int) -> nn.Sequential:
    """``layers`` × (Linear -> LayerNorm without affine -> LeakyReLU); its ``output_size``."""
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(in_features, size), nn.LayerNorm(size, elementwise_affine=False), nn.LeakyReLU()]
        in_features = size
    module = nn.Sequential(*modules)
    module.output_size = in_features
    return module


class StreamingActorCritic(ActorCritic):
    """``ActorCritic`` for streaming learning: normalised observation -> core -> separate actor and
    critic torsos -> heads, sparse initialisation from ``generator``. Shapes as in ``ActorCritic``.

    ``torso_layers`` layers of ``torso_size`` units per torso (0: the heads read the core); ``sparsity``:
    the fraction of each unit's inputs zeroed at initialisation."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, memory: Mapping[str, Any],
                 model: ModelOptions, generator: torch.Generator, *, normalize_observations: bool,
                 torso_size: int, torso_layers: int, sparsity: float) -> None:
        if model.encoder not in ("auto", "identity"):
            raise ConfigError(
                f"learner 'stream_ac' feeds the normalised observation straight to the core; "
                f"model.encoder must be one of auto, identity, got {model.encoder!r}"
            )
        super().__init__(observation_space, action_space, memory, dataclasses.replace(model, encoder="identity"))
        self.encoder = NormalizedObservation(observation_space, normalize_observations)
        core_size = self.core.output_size
        policy_torso = torso(core_size, torso_size, torso_layers)
        value_torso = torso(core_size, torso_size, torso_layers)
        if self.discrete:
            head: nn.Module = CategoricalHead(policy_torso.output_size, action_space)
        else:
            head = GaussianHead(policy_torso.output_size, action_space)
        self.policy = nn.Sequential(policy_torso, head)
        self.value = nn.Sequential(value_torso, nn.Linear(value_torso.output_size, 1))
        for module in (self.policy, self.value):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    sparse_init_(layer, sparsity, generator)
