"""TD(λ) prediction (policy evaluation without actions), online, with eligibility traces: the ``td`` learner.

The network is encoder → memory core → linear readout V (the readout starts at 0). With
``obs_t`` the observation after t steps and ``c_{t+1}`` the reward (cumulant) of the step that returns
``obs_{t+1}``, every env step t → t + 1 does, for each env b:

    V_{t+1} = V(obs_{t+1}),   g_{t+1} = ∇_θ V_{t+1}             (one forward and one backward, with θ_t)
    δ_t     = c_{t+1} + γ (1 − term_t) V_{t+1} − V_t                     (truncation bootstraps V(final_obs))
    θ_{t+1} = θ_t + α u_t / (√n + ε),   u_t = mean_b δ_t z_t,   n ← β₂ n + (1 − β₂) u_t²          (1)
    z_{t+1} = γ λ (1 − done_t) z_t + g_{t+1}

with one trace z per env (the envs are independent streams that share θ). Parameters that V_{t+1}
does not depend on (a ``ccn`` stage that froze or has not started) are left out of (1) and their traces
emptied, so a frozen stage never moves again. (1) is the columnar-
constructive networks paper's normalised step (RMSProp's normalisation applied to the update δ·z,
β₂ = 0.9999; n starts at 1 as in its code, or at 0 with Adam's bias correction n / (1 − β₂^k) after k
updates, ``bias_correction: true``, which normalises from the first step rather than after ~1/(1 − β₂)
steps); ``optimizer: sgd`` takes θ + α u instead. With
``readout_step_per_feature`` the readout's step is α divided by the number of live features (for
``ccn``: the columns of the stages started so far), which keeps its effective step independent of how
many normalised features it reads.

Where ∇_θ V comes from is the core's business:

* ``rtrl`` (and ``snap1``) cores run one step per forward (T = 1 windows from the carried state), so
  their carried sensitivities give ∂V_t/∂θ through all earlier steps (exact RTRL while θ is fixed; the
  usual online approximation across updates).
* ``bptt`` cores rerun the last ``unroll_length`` (K) steps from the state K steps back, every step:
  ∇V_t is truncated at K steps (the truncated-BPTT baseline, recomputed with the current θ).

Per-env gradients for B > 1 come from one batched backward (``is_grads_batched``), whose cost grows
with B² (a core whose backward cannot be batched falls back to one backward per env, with a warning);
the paper's setting is one stream (B = 1).

Metrics (mean over the iteration): ``losses/td_error`` = δ², ``charts/prediction_error`` =
(V_{t+1} − G_{t+1})² where the env reports the true return ``info["true_return"]`` (= G_{t+1}, the
target of V(obs_{t+1})) and the learner's γ is the env's, beside it ``charts/zero_prediction_error`` =
G_{t+1}², the error of V = 0 (nothing learned) on the same steps, and their ratio
``charts/relative_prediction_error`` (below 1: better than predicting nothing), ``charts/value`` = V,
``charts/learning_rate`` = α, and ``memory/*`` state norms. Tasks are continuing, so ``episode_returns``
is usually empty.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor, nn

from agents.base import IterationResult, Learner, ModelOptions, check_memory_state, register_learner, seeded
from agents.networks import make_encoder
from agents.options import check_choice, check_number, check_options
from envs.base import VecEnv
from rlmem.errors import ConfigError
from rlmem.memory import MemoryCore, State, clone_state, make_core

OPTIMIZERS = ("normalized", "sgd")


@dataclass
class TDOptions:
    """Options of the ``td`` learner (defaults: the CCN paper's TD(λ) on trace patterning)."""

    lr: float = 0.01  # α
    trace_lambda: float = 0.99  # λ of the eligibility traces
    gamma: float | None = None  # None: the env's own discount (prediction tasks define one)
    optimizer: str = "normalized"  # normalized: RMSProp normalisation of δ·z (CCN) | sgd
    beta2: float = 0.9999  # β₂ of the normalised step
    eps: float = 1e-8  # ε of the normalised step
    bias_correction: bool = True  # n starts at 0 and is divided by 1 − β₂^k (Adam); false: n starts at 1
    unroll_length: int = 10  # bptt cores: BPTT reaches back this many steps (rtrl cores use 1)
    steps_per_iteration: int = 1000  # env steps per env between reports (every step is an update)
    readout_step_per_feature: bool = True  # divide the readout's step by the number of live features

    def __post_init__(self) -> None:
        check_options(self, counts=["unroll_length", "steps_per_iteration"], positive=["lr", "eps"],
                      unit_interval=["trace_lambda"], flags=["bias_correction", "readout_step_per_feature"])
        if self.gamma is not None:
            check_number("gamma", self.gamma, 0.0, 1.0, high_open=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("beta2", self.beta2, 0.0, 1.0, high_open=True)


class PredictionNetwork(nn.Module):
    """Encoder → memory core → linear value readout (zero at first), over time-major windows [T, B]."""

    def __init__(self, observation_space: gym.Space, memory: Mapping[str, Any], model: ModelOptions) -> None:
        super().__init__()
        if model.prev_action or model.prev_reward:
            raise ConfigError(
                "model.prev_action and model.prev_reward are not supported by learner 'td' (prediction tasks "
                "have no actions, and their cumulant is part of the observation); valid choices: false"
            )
        self.encoder = make_encoder(model.encoder, observation_space, model.encoder_size, model.encoder_layers)
        self.core: MemoryCore = make_core(memory, self.encoder.output_size)
        self.value = nn.Linear(self.core.output_size, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        return self.core.initial_state(batch, device)

    def forward(self, obs: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        """``obs`` [T, B, *obs_shape], ``reset`` [T, B] → values [T, B] and the core's state after the window."""
        T, B = reset.shape
        features = self.encoder(obs.reshape(T * B, *obs.shape[2:])).view(T, B, -1)
        y, state = self.core(features, state, reset)
        return self.value(y).squeeze(-1), state

    def live_features(self) -> int:
        """How many of the readout's inputs are live (``ccn`` idles the columns of later stages)."""
        return int(getattr(self.core, "active_output_size", self.core.output_size))


def normalized_step(update: Tensor, step_norms: Tensor, beta2: float | Tensor, eps: float | Tensor,
                    lr: float | Tensor, readout_mask: Tensor, features: int, normalized: bool,
                    correction: float | Tensor | None, live: Tensor | None) -> tuple[Tensor, Tensor]:
    """Equation (1)'s parameter step from u_t = ``update`` ([N], or [P, N] for a population, whose
    ``beta2``, ``eps``, ``lr`` and ``correction`` are then [P, 1]) and the new n (``step_norms``, returned
    unchanged without ``normalized``). ``correction`` = 1 − β₂^k with bias correction, else None; the
    readout's step size (``readout_mask``) is α / ``features``; ``live`` (0 or 1 per parameter entry) keeps
    parameters V does not depend on now where they are."""
    if normalized:
        # A scalar β₂ (one learner) takes addcmul, whose rounding its pinned updates record; a population's
        # [P, 1] β₂ cannot be addcmul's scalar factor.
        if isinstance(beta2, Tensor):
            step_norms = step_norms * beta2 + (1 - beta2) * update * update
        else:
            step_norms = torch.addcmul(step_norms * beta2, update, update, value=1 - beta2)
        norms = step_norms if correction is None else step_norms / correction
        update = update / (norms.sqrt() + eps)
    step = update * torch.where(readout_mask, lr / features, lr)
    if live is not None:
        step = step * live
    return step, step_norms


def add_relative_error(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with ``charts/relative_prediction_error``, the iteration's prediction error over that of
    V = 0 on the same steps, where both are there and V = 0's is not 0 (a stretch without any return)."""
    zero = metrics.get("charts/zero_prediction_error", 0.0)
    if "charts/prediction_error" in metrics and zero > 0:
        metrics["charts/relative_prediction_error"] = metrics["charts/prediction_error"] / zero
    return metrics


def live_mask(gradients: Sequence[Tensor | None], sizes: Sequence[int], cache: dict[tuple[bool, ...], Tensor],
              like: Tensor) -> Tensor | None:
    """[P] 1 for the weights of parameters V depends on, 0 for the others (None when all are live); the
    masks are kept in ``cache`` by pattern, with ``like``'s dtype and device."""
    live = tuple(g is not None for g in gradients)
    if all(live):
        return None
    if live not in cache:
        cache[live] = torch.cat([torch.full((n,), flag, dtype=like.dtype, device=like.device)
                                 for flag, n in zip(live, sizes)])
    return cache[live]


@register_learner("td", TDOptions)
class TDLearner(Learner):
    """TD(λ) prediction with eligibility traces through any memory core (RTRL or truncated BPTT)."""

    parameters_checked_per_step = False  # see Learner
    checkpointed = ("network", "traces", "step_norms", "state_after", "value", "steps", "updates")

    def __init__(self, options: TDOptions, env: VecEnv, memory: Mapping[str, Any], model: ModelOptions,
                 device: torch.device | str, seed: int, total_steps: int) -> None:
        if env.single_action_space is not None:
            raise ConfigError(
                f"learner 'td' evaluates predictions on environments without actions, but this env has the "
                f"action space {env.single_action_space}; valid choices: trace_conditioning, trace_patterning "
                "(or agent=actor_critic for control)"
            )
        env_gamma = getattr(env, "gamma", None)
        if options.gamma is None and env_gamma is None:
            raise ConfigError("agent.gamma is not set and this env defines no discount; set agent.gamma=<0..1>")
        super().__init__(options, env, device)
        self.gamma = float(options.gamma if options.gamma is not None else env_gamma)
        self.reports_prediction_error = env_gamma is not None and math.isclose(self.gamma, float(env_gamma))

        with seeded(seed):
            self.network = PredictionNetwork(env.single_observation_space, memory, model).to(self.device)
        core = self.network.core
        self.unroll_length = options.unroll_length if core.grad == "bptt" else 1
        # Traces and step normalisers of all parameters live in flat buffers, so that an update costs the
        # same few operations whatever the number of parameter tensors.
        named = list(self.network.named_parameters())
        self.param_names, self.params = [name for name, _ in named], [p for _, p in named]
        self.sizes = [p.numel() for p in self.params]
        readout = {id(p) for p in self.network.value.parameters()}
        self.readout_mask = torch.cat([torch.full((n,), id(p) in readout, dtype=torch.bool, device=self.device)
                                       for p, n in zip(self.params, self.sizes)])
        B, dtype = self.num_envs, self.params[0].dtype
        self.traces = torch.zeros(B, sum(self.sizes), device=self.device, dtype=dtype)  # z, one row per env
        # n of (1): 1 at first as in the CCN code, or 0 with bias correction
        self.step_norms = torch.full((sum(self.sizes),), 0.0 if options.bias_correction else 1.0,
                                     device=self.device, dtype=dtype)
        self.updates = 0
        self._no_gradient = [torch.zeros(B, n, device=self.device, dtype=dtype) for n in self.sizes]
        self._live_masks: dict[tuple[bool, ...], Tensor] = {}
        self._batched_backward = True

        # The window the next forward runs: (state before step j, obs_j, reset_j) for the last K steps.
        obs = env.reset(seed=seed).to(self.device)
        first = torch.ones(B, dtype=torch.bool, device=self.device)
        self.window: deque[tuple[State, Tensor, Tensor]] = deque(maxlen=self.unroll_length)
        self.window.append((self.network.initial_state(B, self.device), obs, first))
        value, state, gradients = self._value_and_gradients()
        self._advance(state, gradients, first, self._live_mask(gradients))
        self.value = value.detach()
        self.steps = 0

    # ----------------------------------------------------------------------------------------------

    def _window_tensors(self, last_obs: Tensor | None = None) -> tuple[State, Tensor, Tensor]:
        start = self.window[0][0]
        obs = [entry[1] for entry in self.window]
        reset = [entry[2] for entry in self.window]
        if last_obs is not None:  # the last observation of an ended episode: no reset before it
            obs[-1], reset[-1] = last_obs, torch.zeros_like(reset[-1])
        if len(obs) == 1:
            return start, obs[0].unsqueeze(0), reset[0].unsqueeze(0)
        return start, torch.stack(obs), torch.stack(reset)

    def _value_and_gradients(self) -> tuple[Tensor, State, list[Tensor | None]]:
        """V of the window's last observation [B], the core's state after it, and ∇_θ V per env
        ([B, *θ.shape], None for parameters V does not depend on, e.g. frozen ``ccn`` stages)."""
        start, obs, reset = self._window_tensors()
        with torch.enable_grad():
            values, state = self.network(obs, start, reset)
            value = values[-1]
            if self.num_envs == 1:
                grads = torch.autograd.grad(value.sum(), self.params, allow_unused=True)
                gradients = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                gradients = self._per_env_gradients(value)
        return value.detach(), state, gradients

    def _per_env_gradients(self, value: Tensor) -> list[Tensor | None]:
        """∇_θ V_b for every env b from one batched backward; a core whose backward uses an operation
        without a batching rule gets one backward per env instead (correct, B times slower)."""
        if self._batched_backward:
            eye = torch.eye(self.num_envs, device=self.device, dtype=value.dtype)
            try:
                return list(torch.autograd.grad(value, self.params, grad_outputs=eye, is_grads_batched=True,
                                                allow_unused=True, retain_graph=True))
            except RuntimeError as err:
                self._batched_backward = False
                warnings.warn(f"td: per-env gradients fall back to one backward per env ({err})", stacklevel=2)
        rows = [torch.autograd.grad(value[b], self.params, allow_unused=True, retain_graph=b + 1 < self.num_envs)
                for b in range(self.num_envs)]
        return [None if column[0] is None else torch.stack(column) for column in zip(*rows)]

    def _live_mask(self, gradients: list[Tensor | None]) -> Tensor | None:
        return live_mask(gradients, self.sizes, self._live_masks, self.traces)

    def _advance(self, state: State, gradients: list[Tensor | None], done: Tensor, live: Tensor | None) -> None:
        """z ← γλ(1 − done) z + g, and the traces of parameters V no longer depends on emptied."""
        decay = ((self.gamma * self.options.trace_lambda) * (~done).to(self.traces.dtype)).unsqueeze(1)
        if live is not None:
            decay = decay * live
        flat = torch.cat([self._no_gradient[i] if g is None else g.reshape(self.num_envs, -1)
                          for i, g in enumerate(gradients)], dim=1)
        self.traces.mul_(decay).add_(flat)
        self.state_after = state

    @torch.no_grad()
    def _update(self, td_error: Tensor, live: Tensor | None) -> None:
        """u_t = mean_b δ_b z_b, applied by ``_apply_update`` through ``apply_gradients``."""
        update = (td_error.to(self.traces.dtype) @ self.traces) / self.num_envs
        directions = list(zip(self.param_names, update.split(self.sizes)))
        apply = functools.partial(self._apply_update, update, live)
        self.apply_gradients(directions, {"losses/td_error": td_error}, apply, flat=update)

    @torch.no_grad()
    def _apply_update(self, update: Tensor, live: Tensor | None) -> None:
        """Equation (1) with u_t = ``update`` [P] for the parameters V depends on now. The others (a ``ccn``
        stage that just froze) stay where they are: frozen means no update at all, as in the CCN paper."""
        opt = self.options
        normalized = opt.optimizer == "normalized"
        correction = 1 - opt.beta2 ** (self.updates + 1) if normalized and opt.bias_correction else None
        features = self.network.live_features() if opt.readout_step_per_feature else 1
        step, self.step_norms = normalized_step(update, self.step_norms, opt.beta2, opt.eps, opt.lr,
                                                self.readout_mask, features, normalized, correction, live)
        self.updates += 1
        torch._foreach_add_(self.params, [s.view_as(p) for s, p in zip(step.split(self.sizes), self.params)])

    def _step(self, sums: dict[str, Tensor], episode_returns: list[float], episode_lengths: list[int]) -> None:
        obs, reward, terminated, truncated, info = self.env.step(None)
        obs, terminated, truncated = obs.to(self.device), terminated.to(self.device), truncated.to(self.device)
        done = terminated | truncated
        self.window.append((self.state_after, obs, done))
        value, state, gradients = self._value_and_gradients()

        bootstrap = value * (~terminated).to(value.dtype)
        if truncated.any():
            # A truncated episode continues in principle: bootstrap from its last observation, run from the
            # state before it (without advancing anything: no gradients).
            with torch.no_grad():
                start, window_obs, reset = self._window_tensors(last_obs=info["final_obs"].to(self.device))
                final_values, _ = self.network(window_obs, start, reset)
            bootstrap = torch.where(truncated & ~terminated, final_values[-1], bootstrap)
        td_error = reward.to(self.device, value.dtype) + self.gamma * bootstrap - self.value
        live = self._live_mask(gradients)
        self._update(td_error, live)
        self._advance(state, gradients, done, live)
        self.value = value

        sums["losses/td_error"] += td_error.pow(2).mean()
        sums["charts/value"] += value.mean()
        if self.reports_prediction_error and "true_return" in info:
            true_return = info["true_return"].to(self.device, value.dtype)
            sums["charts/prediction_error"] += (value - true_return).pow(2).mean()
            sums["charts/zero_prediction_error"] += true_return.pow(2).mean()
        episode = info.get("episode")
        if episode is not None and bool(episode["done"].any()):
            finished = episode["done"].nonzero().flatten()
            episode_returns.extend(episode["return"][finished].tolist())
            episode_lengths.extend(episode["length"][finished].tolist())

    def iteration(self) -> IterationResult:
        """``steps_per_iteration`` online TD(λ) steps on every env."""
        n = self.options.steps_per_iteration
        zero = torch.zeros((), device=self.device, dtype=self.value.dtype)
        sums = {"losses/td_error": zero.clone(), "charts/value": zero.clone()}
        if self.reports_prediction_error:
            sums["charts/prediction_error"] = zero.clone()
            sums["charts/zero_prediction_error"] = zero.clone()
        episode_returns: list[float] = []
        episode_lengths: list[int] = []
        for _ in range(n):
            self._step(sums, episode_returns, episode_lengths)
        self.steps += n
        metrics = add_relative_error({tag: float(total) / n for tag, total in sums.items()})
        metrics["charts/learning_rate"] = self.options.lr
        check_memory_state(self.state_after)
        self.check_parameters()
        metrics.update({f"memory/{k}": v for k, v in self.network.core.state_metrics(self.state_after).items()})
        return IterationResult(n * self.num_envs, metrics, episode_returns, episode_lengths)

    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        window = [(clone_state(s), o.clone(), r.clone()) for s, o, r in self.window]
        return {**super().state_dict(), "window": window}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.window.clear()
        for s, o, r in state["window"]:
            self.window.append(({k: v.to(self.device) for k, v in s.items()}, o.to(self.device), r.to(self.device)))
