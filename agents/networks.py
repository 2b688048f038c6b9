"""Shared actor-critic network: observation encoder -> memory core -> policy and value heads.

Every learner builds the same network::

    network = ActorCritic(env.single_observation_space, env.single_action_space, memory_spec, model)
    state = network.initial_state(batch=B, device=device)
    out = network(obs, state, reset, prev_action, prev_reward)   # obs: [T, B, *obs_shape]
    out.dist.sample(generator)  # [T, B, *act_shape];  out.value: [T, B];  out.state: the carried state

Encoders (``ModelOptions.encoder``): ``mlp`` for vectors, ``nature_cnn`` (Mnih et al. 2015), ``impala``
(Espeholt et al. 2018: 16, 32, 32 channels, each a conv + max-pool + 2 residual blocks, then a dense
layer), ``identity`` (flattened observation) and ``auto`` (``nature_cnn`` for uint8 images
[C, H, W], ``mlp`` otherwise). uint8 frames are converted to float and divided by 255 on the network's
device, so rollouts store them as uint8.

Optionally the previous action (one-hot when discrete) and the previous reward are concatenated to the
core's input; both are zeroed where ``reset`` marks the first step of an episode.

Policies: categorical for ``Discrete`` action spaces and a diagonal Gaussian with a state-independent
log-std for 1-D ``Box`` spaces (samples are clipped to the bounds only when sent to the env; the
log-prob is that of the unclipped sample). Weights use orthogonal init as in CleanRL's agents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.base import ModelOptions
from rlmem.errors import ConfigError
from rlmem.memory import MemoryCore, State, make_core

ENCODERS = ("auto", "mlp", "nature_cnn", "impala", "identity")


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain ``std`` and constant bias (the CleanRL convention)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


# --------------------------------------------------------------------------------------------------
# Observations


def is_image_space(space: gym.Space) -> bool:
    """A uint8 ``Box`` shaped [C, H, W] or [H, W] (a single grey channel)."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)


class ObservationFloat(nn.Module):
    """Turns raw observations [N, *obs_shape] into float tensors: uint8 / 255, Discrete -> one-hot.

    Images keep their [C, H, W] layout (a 2-D frame gets a channel axis); everything else is flattened.
    """

    def __init__(self, space: gym.Space) -> None:
        super().__init__()
        if isinstance(space, gym.spaces.Discrete):
            self.kind, self.shape = "discrete", (int(space.n),)
            self.start = int(space.start)
        elif isinstance(space, (gym.spaces.Box, gym.spaces.MultiBinary)):
            if is_image_space(space):
                self.kind = "image"
                self.shape = tuple(space.shape) if len(space.shape) == 3 else (1, *space.shape)
            else:
                self.kind, self.shape = "vector", (int(np.prod(space.shape)),)
            self.scale = 1.0 / 255.0 if space.dtype == np.uint8 else 1.0
        else:
            raise ConfigError(
                f"observation space {space} is not supported; valid choices: Box, Discrete, MultiBinary"
            )

    def forward(self, obs: Tensor) -> Tensor:
        if self.kind == "discrete":
            return F.one_hot(obs.long() - self.start, self.shape[0]).to(torch.get_default_dtype())
        x = obs.to(torch.get_default_dtype())  # float32 unless a caller (a float64 test) sets the default
        x = x * self.scale if self.scale != 1.0 else x
        return x.reshape(obs.shape[0], *self.shape)


# --------------------------------------------------------------------------------------------------
# Encoders: [N, *shape] float -> [N, output_size]


class IdentityEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.output_size = int(np.prod(input_shape))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class MLPEncoder(nn.Module):
    """``layers`` dense layers of width ``size`` with tanh (CleanRL's classic-control torso)."""

    def __init__(self, input_shape: tuple[int, ...], size: int, layers: int) -> None:
        super().__init__()
        in_features = int(np.prod(input_shape))
        modules: list[nn.Module] = []
        for _ in range(layers):
            modules += [layer_init(nn.Linear(in_features, size)), nn.Tanh()]
            in_features = size
        self.net = nn.Sequential(*modules)
        self.output_size = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def _conv_output_size(stem: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(stem(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class ConvEncoder(nn.Module):
    """A convolutional ``stem`` (ending in a flatten) and a dense ``head`` of ``size`` units (ReLU).

    With ``channels_last`` the weights and inputs are kept in channels-last memory layout, in which
    oneDNN runs the IMPALA ResNet's CPU convolutions about twice as fast (it slowed the Nature CNN
    down, so that one keeps the plain layout). The values are the same in either layout: the
    flatten reads the logical [C, H, W] order.
    """

    channels_last = False

    def _add_head(self, input_shape: tuple[int, ...], size: int) -> None:
        self.head = nn.Sequential(layer_init(nn.Linear(_conv_output_size(self.stem, input_shape), size)), nn.ReLU())
        self.output_size = size
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.stem(x))


class NatureCNN(ConvEncoder):
    """Mnih et al. (2015): conv 32x8x8/4, 64x4x4/2, 64x3x3/1, then a dense layer of ``size`` (ReLU)."""

    def __init__(self, input_shape: tuple[int, ...], size: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.stem = nn.Sequential(
            layer_init(nn.Conv2d(channels, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
        )
        self._add_head(input_shape, size)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaStage(nn.Module):
    """Conv 3x3 -> max-pool 3x3/2 -> two residual blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.res1(self.res0(self.pool(self.conv(x))))


class ImpalaCNN(ConvEncoder):
    """IMPALA ResNet (Espeholt et al. 2018): stages of 16, 32, 32 channels, then a dense layer of ``size``."""

    channels_last = True

    def __init__(self, input_shape: tuple[int, ...], size: int, channels: tuple[int, ...] = (16, 32, 32)) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        in_channels = input_shape[0]
        for out_channels in channels:
            stages.append(ImpalaStage(in_channels, out_channels))
            in_channels = out_channels
        self.stem = nn.Sequential(*stages, nn.ReLU(), nn.Flatten())
        self._add_head(input_shape, size)


def make_encoder(name: str, space: gym.Space, size: int, layers: int) -> nn.Sequential:
    """``ObservationFloat`` followed by the named encoder; the result has ``output_size``."""
    if name not in ENCODERS:
        raise ConfigError(f"model.encoder must be one of {', '.join(ENCODERS)}; got {name!r}")
    to_float = ObservationFloat(space)
    if name == "auto":
        name = "nature_cnn" if to_float.kind == "image" else "mlp"
    if name in ("nature_cnn", "impala") and to_float.kind != "image":
        raise ConfigError(
            f"model.encoder={name!r} needs uint8 image observations [C, H, W], got {space}; "
            "valid choices for this env: auto, mlp, identity"
        )
    if name == "mlp":
        encoder: nn.Module = MLPEncoder(to_float.shape, size, layers)
    elif name == "nature_cnn":
        encoder = NatureCNN(to_float.shape, size)
    elif name == "impala":
        encoder = ImpalaCNN(to_float.shape, size)
    else:
        encoder = IdentityEncoder(to_float.shape)
    module = nn.Sequential(to_float, encoder)
    module.output_size = encoder.output_size
    return module


# --------------------------------------------------------------------------------------------------
# Distributions: sampling takes an explicit torch.Generator so that runs are reproducible and resumable.


class Categorical:
    """Categorical distribution over the last axis of ``logits`` [..., A]; actions are indices [...]."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits - logits.logsumexp(dim=-1, keepdim=True)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        probs = self.logits.exp()
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return flat.view(probs.shape[:-1])

    def mode(self) -> Tensor:
        return self.logits.argmax(dim=-1)

    def parameters(self) -> list[Tensor]:
        """The tensors the distribution is computed from."""
        return [self.logits]

    def log_prob(self, actions: Tensor) -> Tensor:
        return self.logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        return -(self.logits.exp() * self.logits).sum(-1)


class DiagGaussian:
    """Diagonal Gaussian over the last axis: ``mean`` [..., A], ``log_std`` broadcastable to it."""

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean = mean
        self.log_std = log_std.expand_as(mean)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.log_std.exp() * noise

    def mode(self) -> Tensor:
        return self.mean

    def parameters(self) -> list[Tensor]:
        """The tensors the distribution is computed from."""
        return [self.mean, self.log_std]

    def log_prob(self, actions: Tensor) -> Tensor:
        z = (actions - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> Tensor:
        return (self.log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(-1)


Distribution = Categorical | DiagGaussian


class CategoricalHead(nn.Module):
    def __init__(self, in_features: int, space: gym.spaces.Discrete) -> None:
        super().__init__()
        self.logits = layer_init(nn.Linear(in_features, int(space.n)), std=0.01)

    def forward(self, features: Tensor) -> Categorical:
        return Categorical(self.logits(features))


class GaussianHead(nn.Module):
    """State-dependent mean, state-independent log-std (initialised to 0, i.e. std 1)."""

    def __init__(self, in_features: int, space: gym.spaces.Box) -> None:
        super().__init__()
        action_size = int(space.shape[0])
        self.mean = layer_init(nn.Linear(in_features, action_size), std=0.01)
        self.log_std = nn.Parameter(torch.zeros(action_size))

    def forward(self, features: Tensor) -> DiagGaussian:
        return DiagGaussian(self.mean(features), self.log_std)


# --------------------------------------------------------------------------------------------------
# The network


class ActorCriticOutput(NamedTuple):
    dist: Distribution  # over actions, batch shape [T, B]
    value: Tensor  # [T, B]
    state: State  # the core's state after the window (detached)


def _time_axis(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.unsqueeze(0)


def check_action_space(space: gym.Space | None, learner: str) -> None:
    if space is None:
        raise ConfigError(
            f"learner {learner!r} needs an environment with actions, but this env is a prediction task "
            "(single_action_space is None); valid choices for it: a prediction learner such as td"
        )
    if isinstance(space, gym.spaces.Discrete):
        return
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and np.issubdtype(space.dtype, np.floating):
        return
    raise ConfigError(
        f"learner {learner!r} does not support the action space {space}; "
        "valid choices: Discrete, 1-D float Box"
    )


class ActorCritic(nn.Module):
    """Encoder -> memory core -> policy and value heads, run over time-major windows [T, B].

    ``reward_clip`` (> 0) clips the previous reward fed to the core, so that callers pass raw rewards.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        memory: Mapping[str, Any],
        model: ModelOptions,
        reward_clip: float = 0.0,
    ) -> None:
        super().__init__()
        check_action_space(action_space, "actor_critic")
        self.observation_space = observation_space
        self.action_space = action_space
        self.model_options = model
        self.reward_clip = float(reward_clip)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.action_shape: tuple[int, ...] = () if self.discrete else tuple(action_space.shape)
        self.action_input_size = int(action_space.n) if self.discrete else int(action_space.shape[0])

        self.encoder = make_encoder(model.encoder, observation_space, model.encoder_size, model.encoder_layers)
        core_input = self.encoder.output_size
        core_input += self.action_input_size if model.prev_action else 0
        core_input += 1 if model.prev_reward else 0
        self.core: MemoryCore = make_core(memory, core_input)
        if self.discrete:
            self.policy: nn.Module = CategoricalHead(self.core.output_size, action_space)
            self.action_start = int(action_space.start)
        else:
            self.policy = GaussianHead(self.core.output_size, action_space)
            low = torch.as_tensor(action_space.low, dtype=torch.float32)
            high = torch.as_tensor(action_space.high, dtype=torch.float32)
            self.register_buffer("action_low", low, persistent=False)
            self.register_buffer("action_high", high, persistent=False)
        self.value = layer_init(nn.Linear(self.core.output_size, 1), std=1.0)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        return self.core.initial_state(batch, device)

    def action_dtype(self) -> torch.dtype:
        return torch.long if self.discrete else torch.float32

    def core_inputs(self, obs: Tensor, reset: Tensor, prev_action: Tensor | None, prev_reward: Tensor | None) -> Tensor:
        """Encoder output and the optional previous action/reward: [T, B, core.input_size]."""
        T, B = reset.shape
        features = self.encoder(obs.reshape(T * B, *obs.shape[2:])).view(T, B, -1)
        if not (self.model_options.prev_action or self.model_options.prev_reward):
            return features
        # The previous action and reward belong to the previous episode at its first step: zero them.
        keep = (~reset).unsqueeze(-1).to(features.dtype)
        parts = [features]
        if self.model_options.prev_action:
            if prev_action is None:
                raise ValueError("model.prev_action is on: pass prev_action")
            if self.discrete:
                action = F.one_hot(prev_action.long(), self.action_input_size).to(features.dtype)
            else:  # the action the env received
                action = self.env_action(prev_action).to(features.dtype)
            parts.append(action * keep)
        if self.model_options.prev_reward:
            if prev_reward is None:
                raise ValueError("model.prev_reward is on: pass prev_reward")
            reward = prev_reward.to(features.dtype)
            if self.reward_clip > 0:
                reward = reward.clamp(-self.reward_clip, self.reward_clip)
            parts.append(reward.unsqueeze(-1) * keep)
        return torch.cat(parts, dim=-1)

    def forward(self, obs: Tensor, state: State, reset: Tensor, prev_action: Tensor | None = None,
                prev_reward: Tensor | None = None) -> ActorCriticOutput:
        """Run a window. ``obs`` [T, B, *obs_shape], ``reset`` [T, B] bool (zero the state before step t),
        ``prev_action`` [T, B, *act_shape] (indices when discrete; a Box action is clipped to its bounds),
        ``prev_reward`` [T, B] (raw; clipped here when ``reward_clip`` > 0)."""
        x = self.core_inputs(obs, reset, prev_action, prev_reward)
        y, state = self.core(x, state, reset)
        return ActorCriticOutput(self.policy(y), self.value(y).squeeze(-1), state)

    def step(self, obs: Tensor, state: State, reset: Tensor, prev_action: Tensor | None = None,
             prev_reward: Tensor | None = None) -> ActorCriticOutput:
        """``forward`` for one step of all envs: ``obs`` [B, *obs_shape], ``reset`` [B], ``prev_action``
        [B, *act_shape], ``prev_reward`` [B]; the outputs keep a leading T = 1."""
        return self(obs.unsqueeze(0), state, reset.unsqueeze(0), _time_axis(prev_action), _time_axis(prev_reward))

    def env_action(self, action: Tensor) -> Tensor:
        """The action the env receives: shifted by ``Discrete.start``, or clipped to the ``Box`` bounds."""
        if self.discrete:
            return action + self.action_start if self.action_start else action
        return torch.maximum(torch.minimum(action, self.action_high), self.action_low)
