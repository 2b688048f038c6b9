"""The MemoryCore contract shared by every recurrent core, and the core registry.

A core maps a time-major window of inputs to outputs while carrying a state between calls::

    core = make_core({"name": "gru", "hidden_size": 128, "grad": "bptt"}, input_size=D)
    state = core.initial_state(batch=B, device=device)
    y, state = core(x, state, reset)      # x: [T, B, D], reset: [T, B] bool, y: [T, B, core.output_size]

Conventions every core follows:

* ``state`` is a ``dict[str, Tensor]`` whose tensors all hold the batch on dim 0 (``[B, ...]``), so
  that learners can store, index (``select_state``) and mask states without knowing the core.
* ``reset[t, b]`` zeroes env ``b``'s state (and, in ``rtrl`` mode, its sensitivities) *before* step
  ``t`` consumes ``x[t, b]``. This matches the same-step autoreset of the VecEnv contract.
* The returned state is detached: information crosses calls, an autograd graph never does.
* ``grad`` selects how the core learns (``bptt``, ``rtrl``, ``snap1``); a core declares the modes it
  supports in ``grad_modes`` and refuses the others with a ``ConfigError``.
* In ``rtrl``/``snap1`` mode the state also carries sensitivities. Under ``torch.no_grad()`` (acting)
  a core runs its cell only and passes the sensitivities through untouched: learners replay each
  window from its stored start state with gradients on, which is where sensitivities advance.
* Parameter names never depend on ``grad``, so a checkpoint loads in any mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.registry import Registry, build_options

State = dict[str, Tensor]

GRAD_MODES = ("bptt", "rtrl", "snap1")
ENCODER_GRAD_MODES = ("window", "same_step")


@dataclass
class CoreOptions:
    """Options every core has; a core's own options dataclass extends this one."""

    hidden_size: int = 128
    grad: str = "bptt"
    # rtrl/snap1 only: how far the error reaches back into the core's inputs (the encoder output).
    encoder_grad: str = "window"

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ConfigError(f"memory.hidden_size must be a positive integer, got {self.hidden_size!r}")
        if self.grad not in GRAD_MODES:
            raise ConfigError(f"memory.grad must be one of {', '.join(GRAD_MODES)}, got {self.grad!r}")
        if self.encoder_grad not in ENCODER_GRAD_MODES:
            raise ConfigError(
                f"memory.encoder_grad must be one of {', '.join(ENCODER_GRAD_MODES)}, got {self.encoder_grad!r}"
            )


class MemoryCore(nn.Module):
    """Base class of all memory cores. Subclasses set ``output_size`` and implement the contract."""

    grad_modes: ClassVar[tuple[str, ...]] = ("bptt",)
    name: ClassVar[str] = ""

    def __init__(self, options: CoreOptions, input_size: int) -> None:
        super().__init__()
        if options.grad not in self.grad_modes:
            raise ConfigError(
                f"memory.grad={options.grad!r} is not supported by core {self.name!r}; "
                f"valid choices: {', '.join(self.grad_modes)}"
            )
        if not isinstance(input_size, int) or input_size <= 0:
            raise ConfigError(f"core input size must be a positive integer, got {input_size!r}")
        self.options = options
        self.input_size = input_size
        self.hidden_size = options.hidden_size
        self.grad = options.grad
        self.output_size = options.hidden_size

    # Some cores keep Python state that their learning passes advance (``ccn``'s stage schedule counts
    # env steps). forward() advances it itself unless a caller clears this flag: a caller that compiles
    # the forward (a compiled population) does, so that the traced forward only reads that state, and
    # calls ``count_learning_steps`` after each learning pass instead.
    counts_learning_steps_in_forward: bool = True

    def count_learning_steps(self, env_steps: int) -> None:
        """Advance the core's schedule by a learning pass over ``env_steps`` env steps (time steps × envs).
        Cores without a schedule have nothing to advance."""

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> State:
        """The zero state for ``batch`` envs (sensitivities included in rtrl/snap1 mode)."""
        raise NotImplementedError

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool. Returns ``y`` [T, B, O] and the state."""
        raise NotImplementedError

    def state_metrics(self, state: State, buffers: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Scalars for the ``memory/*`` TensorBoard tags: mean L2 norm of each state tensor per env.

        ``buffers``: the core's buffers by their ``named_buffers()`` names, for a core whose buffers are
        held elsewhere (a population stacks its members'); None reads the core's own. A core with
        statistics worth watching (``ccn``'s normalisers) adds them from these."""
        return {
            f"{key}_norm": float(value.detach().flatten(1).norm(dim=1).mean())
            for key, value in state.items()
            if value.is_floating_point() or value.is_complex()
        }

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, grad={self.grad}"


# --------------------------------------------------------------------------------------------------
# State helpers: every state tensor has the batch on dim 0.


def _batch_view(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))


def reset_state(state: State, reset: Tensor) -> State:
    """Zero the rows of ``state`` whose ``reset`` [B] flag is set (without a Python loop over envs)."""
    keep = ~reset
    return {k: v * _batch_view(keep, v).to(v.dtype) for k, v in state.items()}


def select_state(state: State, index: Tensor | slice) -> State:
    """The state of a subset of envs, e.g. the envs of a PPO minibatch."""
    return {k: v[index] for k, v in state.items()}


def detach_state(state: State) -> State:
    return {k: v.detach() for k, v in state.items()}


def clone_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def cat_states(states: list[State]) -> State:
    return {k: torch.cat([s[k] for s in states], dim=0) for k in states[0]}


def state_to(state: State, device: torch.device | str) -> State:
    return {k: v.to(device) for k, v in state.items()}


def reset_segments(reset: Tensor) -> list[tuple[int, int]]:
    """Split a window at the steps where any env resets: [(t0, t1), ...] covering 0..T.

    Cores backed by fused sequence kernels (cuDNN GRU/LSTM) run each segment in one call, zeroing the
    state of the resetting envs at the segment start, so a window without resets costs one call.
    """
    T = reset.shape[0]
    if torch.compiler.is_compiling():
        # A traced caller cannot read the flags on the host: every step starts a segment, whose zeroing
        # multiplies by exactly 1 where no env resets (the unfused, step-by-step cores it traces).
        return [(t, t + 1) for t in range(T)]
    starts = torch.nonzero(reset[1:].any(dim=1)).flatten().add(1).tolist()
    bounds = [0, *starts, T]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


# --------------------------------------------------------------------------------------------------
# Registry

CORES: Registry[MemoryCore] = Registry("memory core")


def register_core(name: str, options: type = CoreOptions):
    """Class decorator: ``@register_core("gru", GRUOptions)``."""

    def decorate(cls):
        cls.name = name
        return CORES.register(name, options)(cls)

    return decorate


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def core_options(spec: Mapping[str, Any]) -> CoreOptions:
    """Typed options of the core named in ``spec`` (a dict or config node with ``name`` and options)."""
    values = _plain(spec)
    if "name" not in values:
        raise ConfigError(f"memory.name is missing; valid choices: {', '.join(CORES.names())}")
    entry = CORES.get(values.pop("name"))
    return build_options(entry.options, values, "memory")


def make_core(spec: Mapping[str, Any], input_size: int) -> MemoryCore:
    """Build a core from ``{"name": ..., "hidden_size": ..., "grad": ..., <core options>}``."""
    options = core_options(spec)
    entry = CORES.get(str(_plain(spec)["name"]))
    return entry.cls(options, input_size)
