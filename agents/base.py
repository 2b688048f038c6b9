"""The Learner contract, shared options, and the learner registry.

A learner owns the networks, the optimizer, the carried memory state and the environment's current
observation. The training loop (``rlmem.train``) only calls::

    learner = LEARNERS.get(name).cls(options, env=env, memory=memory_spec, model=model_options,
                                     device=device, seed=seed, total_steps=total_steps)
    result = learner.iteration()          # act + learn -> IterationResult
    learner.state_dict() / learner.load_state_dict(d)   # networks, optimizer, memory state, RNG
    learner.network                       # the module ``rlmem eval`` runs (agents.evaluate)

and catches ``rlmem.errors.TrainingDiverged``. Every learner derives from ``Learner`` and changes its
parameters only through ``Learner.apply_gradients``, the one place where an update meets the
gradient hooks (``Learner.gradient_hooks``: e.g. an all-reduce over workers), the non-finite check,
the clipping and the step, in that order::

    optimizer_step(loss, losses) = zero_grad -> loss.backward() -> apply_gradients(∇θ, losses, optimizer.step)
    apply_gradients(g, losses, step) = hooks(g) -> finite(losses, ‖g‖₂)? -> clip g to max_grad_norm
                                       -> step() -> finite(θ)?

A learner that forms its own update direction (per-env gradients with eligibility traces and ObGD,
TD(λ) traces) passes that direction as ``g`` and its own ``step``. Each finiteness check costs one
host synchronisation (a reduction over all tensors, not one per tensor); only when it fails are the
tensors searched for the one to name. The carried memory state (sensitivities included) is checked
once per iteration (``check_memory_state``) and the policy's output before every sample
(``agents.acting.sample_action``), so a diverged run stops with ``TrainingDiverged(quantity)`` naming
what stopped being finite ("loss losses/value_loss", "gradient of core.w_in", "parameter value.bias",
"memory state hidden") instead of failing later somewhere else.

Checkpoints: a learner lists the attributes it saves in ``checkpointed``; ``state_dict`` and
``load_state_dict`` (``save_attributes`` / ``load_attributes``) treat each by its kind: modules,
optimizers and other objects with a ``state_dict``, random generators, tensors, memory states (dicts
of tensors) and plain numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from envs.base import VecEnv
from rlmem.errors import ConfigError, TrainingDiverged
from rlmem.memory import State
from rlmem.registry import Registry

# A gradient hook sees the update direction of every parameter, [(name, tensor)], and may change the
# tensors in place (average them over workers, add noise, mask them); it runs before the finite check.
GradientHook = Callable[[Sequence[tuple[str, Tensor]]], None]


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
    # A population's member that has diverged (agents.population) says why here, and reports no metrics:
    # it takes no further steps while the other members go on.
    diverged: str | None = None


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host synchronisation: the max-norm of
    all of them is NaN or inf exactly when one element is (it cannot overflow)."""
    if not tensors:
        return True
    if len(tensors) <= 4:  # a few losses and a norm: without the grouping of get_total_norm
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    return bool(torch.isfinite(nn.utils.get_total_norm(tensors, float("inf"))))


def first_non_finite(named: Sequence[tuple[str, Tensor]]) -> str | None:
    """The name of the first tensor with a NaN or inf element (a search, for the error message)."""
    return next((name for name, tensor in named if not bool(torch.isfinite(tensor).all())), None)


def check_memory_state(state: State) -> None:
    """TrainingDiverged naming the first entry of ``state`` (hidden state or sensitivities) that is not finite."""
    if not all_finite(list(state.values())):
        raise TrainingDiverged(f"memory state {first_non_finite(list(state.items()))}")


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_attributes(owner: object, names: Sequence[str]) -> dict[str, Any]:
    """``{name: saved value}`` of ``owner``'s attributes ``names`` (see the module docstring)."""
    saved = {}
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, torch.Generator):
            saved[name] = value.get_state()
        elif hasattr(value, "state_dict"):
            saved[name] = value.state_dict()
        elif isinstance(value, Tensor):
            saved[name] = value.detach().clone()
        elif isinstance(value, dict):  # a memory state
            saved[name] = {k: v.detach().clone() for k, v in value.items()}
        else:
            saved[name] = value
    return saved


def load_attributes(owner: object, saved: Mapping[str, Any], names: Sequence[str], device: torch.device) -> None:
    """Restore what ``save_attributes`` saved: tensors onto the device the attribute lives on now,
    memory states onto ``device``."""
    for name in names:
        value, current = saved[name], getattr(owner, name)
        if isinstance(current, torch.Generator):
            current.set_state(value.cpu())
        elif hasattr(current, "load_state_dict"):
            current.load_state_dict(value)
        elif isinstance(current, Tensor):
            setattr(owner, name, value.to(current.device))
        elif isinstance(current, dict):
            setattr(owner, name, {k: v.to(device) for k, v in value.items()})
        else:
            setattr(owner, name, type(current)(value))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block without touching the caller's (initial weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# The learner


class Learner:
    """Base of every learner: the contract the training loop relies on and the one update path.

    Subclasses set ``network`` (the module ``rlmem eval`` runs), ``optimizer`` where they use a torch
    optimizer, ``checkpointed`` (the attributes ``state_dict`` saves) and implement ``iteration``.
    """

    network: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    checkpointed: tuple[str, ...] = ()
    # A learner that steps every env step adds a direction already checked finite to finite parameters;
    # it checks them once per iteration (``check_parameters``), which costs a pass over every tensor.
    parameters_checked_per_step = True

    def __init__(self, options: Any, env: VecEnv, device: torch.device | str) -> None:
        self.options = options
        self.env = env
        self.device = torch.device(device)
        self.num_envs = env.num_envs
        # The run's envs, every process's together (data-parallel training: this learner steps a shard).
        self.run_envs = env.num_envs if env.shard is None else env.shard.total
        self.gradient_hooks: list[GradientHook] = []
        # Whether the update direction sums over envs rather than averaging them: workers that split the
        # envs between them then add up their directions instead of averaging them (agents.distributed).
        self.gradients_sum_over_envs = False
        self.max_grad_norm = math.inf  # clip the update direction's global L2 norm to this

    def iteration(self) -> IterationResult:
        """Act and learn for one iteration on every env."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------
    # The update path

    def optimizer_step(self, loss: Tensor, losses: Mapping[str, Tensor]) -> Tensor:
        """Backpropagate ``loss`` and step ``optimizer`` through ``apply_gradients``; ``losses``: the
        named terms to blame when ``loss`` is not finite. Returns ‖∇θ‖₂ before clipping."""
        assert self.optimizer is not None, "optimizer_step needs the learner's torch optimizer"
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients = [(name, p.grad) for name, p in self.network.named_parameters() if p.grad is not None]
        return self.apply_gradients(gradients, {"loss": loss, **losses}, self.optimizer.step)

    def apply_gradients(self, gradients: Sequence[tuple[str, Tensor]], losses: Mapping[str, Tensor],
                        step: Callable[[], Any], *, flat: Tensor | None = None) -> Tensor:
        """The one place an update is applied: ``gradient_hooks`` on the named update directions
        ``gradients`` (in place), the check that ``losses`` and the directions are finite, clipping of
        their global L2 norm to ``max_grad_norm``, ``step()`` (which reads the directions), and the
        check that the parameters stayed finite (every step, or once per iteration where
        ``parameters_checked_per_step`` is False). ``flat``: the directions as one tensor [P] when
        ``gradients`` are views of it, so that the check reads one tensor instead of one per
        parameter. Returns the norm before clipping."""
        for hook in self.gradient_hooks:
            hook(gradients)
        tensors = [g for _, g in gradients]
        norm = nn.utils.get_total_norm(tensors) if flat is None else torch.linalg.vector_norm(flat)
        if not all_finite([*(t.detach() for t in losses.values()), norm]):
            raise TrainingDiverged(self.diagnose(gradients, losses))
        if self.max_grad_norm != math.inf:
            # As torch.nn.utils.clip_grad_norm_ scales: by min(1, max_norm / (‖g‖ + 1e-6)).
            torch._foreach_mul_(tensors, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        step()
        if self.parameters_checked_per_step:
            self.check_parameters()
        return norm

    @staticmethod
    def diagnose(gradients: Sequence[tuple[str, Tensor]], losses: Mapping[str, Tensor]) -> str:
        """What is not finite, losses before gradients: the first loss term (the total, named "loss",
        only when every term is finite), else the first gradient, else their norm (an overflow)."""
        terms = [(name, t.detach()) for name, t in losses.items() if name != "loss"]
        bad_term = first_non_finite(terms)
        if bad_term is not None:
            return f"loss {bad_term}"
        if "loss" in losses and first_non_finite([("loss", losses["loss"].detach())]):
            return "loss"
        bad_gradient = first_non_finite(gradients)
        return "gradient norm" if bad_gradient is None else f"gradient of {bad_gradient}"

    def check_parameters(self) -> None:
        """TrainingDiverged naming the first parameter of ``network`` that is not finite."""
        if not all_finite([p.detach() for p in self.network.parameters()]):
            raise TrainingDiverged(f"parameter {first_non_finite(list(self.network.named_parameters()))}")

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        return save_attributes(self, self.checkpointed)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_attributes(self, state, self.checkpointed, self.device)


LEARNERS: Registry = Registry("learner")


def register_learner(name: str, options: type):
    return LEARNERS.register(name, options)
