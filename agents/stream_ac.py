"""Streaming actor-critic: an update every environment step, eligibility traces and the ObGD step-size
bound (Elsayed, Vasan and Mahmood 2024, "Streaming Deep RL"), with a memory core that learns online
through per-step (T = 1) real-time recurrent learning.

One step, for all B envs at once:

1. Forward one step without gradients from the carried memory state, and sample a_t.
2. Step the envs; scale the reward online: r̃_t = r_t / σ(discounted return).
3. TD error δ_t = r̃_t + γ (1 − terminated_t) V(s_{t+1}) − V(s_t). V(s_{t+1}) comes from one more
   forward without gradients from h_t, on the episode's final observation where it ended (so that a
   truncated episode bootstraps).
4. The gradients of V(s_t) and of the actor objective log π(a_t|s_t) + c_H sign(δ_t) H(π(·|s_t)), per
   env (``per_env_gradients``). The core runs a T = 1 RTRL window (``rlmem.rtrl``): its forward
   advances the sensitivities S_t = dh_t/dθ_core (reset to 0 with the state where an episode starts)
   and becomes the carried state; its backward returns ⟨∂y_t/∂h_t, S_t⟩, the gradient of this step's
   output through every earlier step of the episode, without truncation (exact while θ stays fixed;
   across per-step updates the carried sensitivities are the usual RTRL approximation).
5. Traces z ← γλ z + ∇, one per objective and env; the ObGD step per env
   α_b = α / max(1, κ max(|δ_b|, 1) α ‖z_b‖₁) (κ = 2 for the critic's trace, 3 for the actor's), and
   θ ← θ + (1/B) Σ_b α_b δ_b z_b (``env_update: mean``; ``sum`` drops the 1/B).
6. Where an episode ended, the env's traces are zeroed; the core zeroes its state and sensitivities
   before the env's next observation (the reset flag).

A batch of envs: every env keeps its own traces, [B, *θ.shape] per parameter and objective, because
a trace must only ever be multiplied by the TD errors of the trajectory it summarises. Each env's
step is bounded by ObGD on its own trace and δ, and the parameter update is the mean of the B per-env
steps (``env_update: mean``, bounded as each of them is) or their sum (``env_update: sum``, as if the
B steps were taken one after another without re-evaluating). With B = 1 both are ObGD exactly. The
per-env gradients come one of two ways (``per_env_gradients``): ``vmap`` runs one env's step under
``torch.func.vmap`` over envs (of ``jacrev`` over the two objectives), the arithmetic of 2B single-env
backward passes plus torch.func's fixed cost per step; ``batched`` pushes 2B one-hot output gradients
through the batched graph, where every op sees all B envs, quadratic in B. ``auto`` takes vmap from
``VMAP_MIN_ENVS`` envs on. The traces, 2·B·|θ| numbers, are the memory cost of many envs.

The pieces live by concern: the network (``agents.stream_network.StreamingActorCritic``: online
observation normalisation from ``agents.normalization``, the core, separate actor and critic torsos,
sparse initialisation; no trainable encoder before the core, so the per-env backward pass needs no
gradient with respect to the core's inputs, whose RTRL input-gradient path does not run under vmap),
the ObGD step (``agents.obgd``), and here the per-env gradients and the learner. The ObGD update is
applied through ``Learner.apply_gradients`` (gradient hooks, finite checks) like every learner's.

The core must learn online, so ``memory.grad`` must be ``rtrl`` or ``snap1``; cores that learn only
by truncated BPTT (gru, lstm, none) are a config error.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agents.acting import ActingInputs, sample_action
from agents.base import IterationResult, Learner, ModelOptions, check_memory_state, register_learner, seeded
from agents.networks import ActorCriticOutput, check_action_space
from agents.normalization import NormalizedObservation, RunningMeanStd
from agents.obgd import obgd_update
from agents.options import check_choice, check_number, check_options
from agents.stream_network import StreamingActorCritic
from envs.base import VecEnv
from rlmem.errors import ConfigError
from rlmem.memory import CORES, State, core_options

ONLINE_GRAD_MODES = ("rtrl", "snap1")
ENV_UPDATES = ("mean", "sum")
PER_ENV_GRADIENTS = ("auto", "vmap", "batched")
# The vmap path pays torch.func's fixed cost per step, the batched one a cost quadratic in B; where they
# cross was measured with `rlmem bench stream_ac` (docs/learners_ppo_stream_ac.md, section 3).
VMAP_MIN_ENVS = 32


@dataclass
class StreamACOptions:
    """Options of the ``stream_ac`` learner (defaults: Elsayed et al. 2024)."""

    steps_per_iteration: int = 32  # env steps per env between reports (every step is an update)
    gamma: float = 0.99
    trace_lambda: float = 0.8  # λ of the eligibility traces
    lr: float = 1.0  # α, the ObGD step size before the bound
    critic_kappa: float = 2.0  # κ of the critic's ObGD bound
    actor_kappa: float = 3.0  # κ of the actor's ObGD bound
    entropy_coef: float = 0.01  # c_H: the actor objective is log π + c_H·sign(δ)·H
    sparsity: float = 0.9  # fraction of each unit's inputs zeroed at initialisation (linear layers)
    torso_size: int = 128  # width of the actor and critic torsos after the core
    torso_layers: int = 1  # Linear -> LayerNorm -> LeakyReLU layers per torso (0: heads read the core)
    normalize_observations: bool = True
    scale_rewards: bool = True
    env_update: str = "mean"  # mean | sum: how the B envs' ObGD steps combine into one update
    # vmap | batched | auto: how per-env gradients are taken (auto: vmap from VMAP_MIN_ENVS envs on)
    per_env_gradients: str = "auto"

    def __post_init__(self) -> None:
        check_options(self, counts=["steps_per_iteration", "torso_size"], unit_interval=["gamma", "trace_lambda"],
                      positive=["lr", "critic_kappa", "actor_kappa"], non_negative=["entropy_coef"],
                      flags=["normalize_observations", "scale_rewards"])
        check_number("sparsity", self.sparsity, 0.0, 1.0)
        if self.sparsity == 1.0:
            raise ConfigError("agent.sparsity must be < 1 (a layer with every input zeroed cannot learn), got 1.0")
        check_number("torso_layers", self.torso_layers, 0, integer=True)
        check_choice("env_update", self.env_update, ENV_UPDATES)
        check_choice("per_env_gradients", self.per_env_gradients, PER_ENV_GRADIENTS)


def check_online_core(memory: Mapping[str, Any]) -> None:
    """Refuse a core that cannot learn online (``memory.grad`` not rtrl/snap1), naming those that can."""
    options = core_options(memory)
    if options.grad in ONLINE_GRAD_MODES:
        return
    valid = []
    for name in CORES.names():
        modes = [m for m in CORES.get(name).cls.grad_modes if m in ONLINE_GRAD_MODES]
        if modes:
            valid.append(f"{name} ({'/'.join(modes)})")
    raise ConfigError(
        f"agent stream_ac learns the memory core every step through RTRL, so memory.grad must be one of "
        f"{', '.join(ONLINE_GRAD_MODES)}; core {memory['name']!r} with grad={options.grad!r} cannot. "
        f"Valid choices: {', '.join(valid)}"
    )


# --------------------------------------------------------------------------------------------------
# Per-env gradients and the ObGD step


def per_env_gradients(objectives: Callable[..., tuple[Tensor, Any]], params: Mapping[str, Tensor],
                      *per_env: Any) -> tuple[Tensor, Any]:
    """∂objectives[k]/∂θ for every objective k and env b, and the objectives' auxiliary output.

    ``objectives(params, *args)`` sees one env's arguments (``per_env`` without their env dim 0: tensors
    or dicts of them) and returns ([K] objectives, aux). It runs once per env under ``torch.func.vmap``
    of ``jacrev`` (K vector-Jacobian products), so the cost is that of B single-env backward passes and
    not, as with one-hot output gradients through a batched backward, of K·B batched ones. Returns
    [K, B, P], the gradients of all ``params`` flattened and concatenated in order, and aux with the
    env dim first."""
    jacobians, aux = torch.func.vmap(torch.func.jacrev(objectives, has_aux=True),
                                     in_dims=(None, *[0] * len(per_env)))(dict(params), *per_env)
    return torch.cat([jacobians[name].flatten(2).transpose(0, 1) for name in params], dim=2), aux


def step_objectives(out: ActorCriticOutput, action: Tensor, entropy_weight: Tensor) -> Tensor:
    """[2, B]: the critic's objective V(s_t) and the actor's log π(a_t|s_t) + entropy_weight·H(π(·|s_t)),
    in the order of the learner's κ, from the network's one-step output (leading T = 1); ``action``
    [B, *act_shape], ``entropy_weight`` [B] (c_H·sign(δ_t))."""
    actor = out.dist.log_prob(action[None])[0] + entropy_weight * out.dist.entropy()[0]
    return torch.stack([out.value[0], actor])


def batched_per_env_gradients(objectives: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``per_env_gradients`` for a core that does not run under torch.func transforms: ∂objectives[k, b]/∂θ
    from the batched graph of ``objectives`` [K, B] (env b's entries depending on env b's inputs only),
    by one backward pass vectorised over K·B one-hot output gradients. Every op of that pass still
    sees all B envs, so it costs K·B batched backward passes: quadratic in B. Returns [K, B, P]."""
    K, B = objectives.shape
    basis = torch.eye(K * B, device=objectives.device, dtype=objectives.dtype).view(K * B, K, B)

    def backward(one_hot: Tensor) -> Tensor:
        grads = torch.autograd.grad(objectives, list(params), one_hot, retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        return torch.cat([g.flatten() for g in grads])

    return torch.func.vmap(backward)(basis).view(K, B, -1)


# --------------------------------------------------------------------------------------------------
# The learner


@register_learner("stream_ac", StreamACOptions)
class StreamACLearner(Learner):
    """Streaming actor-critic with eligibility traces and ObGD; the core learns by per-step RTRL."""

    parameters_checked_per_step = False  # see Learner
    checkpointed = ("network", "traces", "reward_stats", "discounted_return", "memory_state", "generator", "steps")

    def __init__(self, options: StreamACOptions, env: VecEnv, memory: Mapping[str, Any], model: ModelOptions,
                 device: torch.device | str, seed: int, total_steps: int) -> None:
        check_action_space(env.single_action_space, "stream_ac")
        check_online_core(memory)
        super().__init__(options, env, device)
        self.gradients_sum_over_envs = options.env_update == "sum"
        B = self.num_envs
        self.total_steps = int(total_steps)

        with seeded(seed):
            init_generator = torch.Generator().manual_seed(seed)
            self.network = StreamingActorCritic(
                env.single_observation_space, env.single_action_space, memory, model, init_generator,
                normalize_observations=options.normalize_observations, torso_size=options.torso_size,
                torso_layers=options.torso_layers, sparsity=options.sparsity).to(self.device)
        named = [(name, p) for name, p in self.network.named_parameters() if p.requires_grad]
        self.param_names, self.params = [name for name, _ in named], [p for _, p in named]
        self.param_sizes = [p.numel() for p in self.params]
        # False also once the core turns out not to run under torch.func transforms.
        self.vmap_gradients = options.per_env_gradients == "vmap" or (
            options.per_env_gradients == "auto" and B >= VMAP_MIN_ENVS)
        # Traces of the critic (k = 0: ∇V) and of the actor (k = 1: ∇ of its objective) per env, over
        # all parameters flattened; a parameter an objective does not reach keeps a zero trace.
        num_params = sum(self.param_sizes)
        self.traces = torch.zeros(2, B, num_params, device=self.device)
        self.kappa = torch.tensor([options.critic_kappa, options.actor_kappa], device=self.device)
        self.reward_stats = RunningMeanStd().to(self.device)
        self.discounted_return = torch.zeros(B, dtype=torch.float64, device=self.device)

        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.inputs = ActingInputs.first(env.reset(seed=seed).to(self.device), self.network)
        self._observe(self.inputs.obs)
        self.memory_state: State = self.network.initial_state(B, self.device)
        self.steps = 0

    # ----------------------------------------------------------------------------------------------

    def _observe(self, obs: Tensor) -> None:
        if self.options.normalize_observations:
            encoder: NormalizedObservation = self.network.encoder  # type: ignore[assignment]
            encoder.stats.update(encoder.to_float(obs))

    def _scale(self, reward: Tensor) -> Tensor:
        """r / σ of the discounted return, per env restarted where an episode starts (``inputs.reset``)."""
        if not self.options.scale_rewards:
            return reward
        self.discounted_return = self.discounted_return * self.options.gamma * (~self.inputs.reset) + reward
        self.reward_stats.update(self.discounted_return)
        return (reward / (self.reward_stats.var + 1e-8).sqrt()).to(reward.dtype)

    def step(self) -> dict[str, Tensor]:
        """One env step on every env and one update. Returns the step's statistics [B] (on device)."""
        opt, net = self.options, self.network
        # The batched backward reuses this forward's graph; vmap runs the step again per env (the acting
        # forward then runs the cell only, and the vmapped one advances the sensitivities).
        with torch.set_grad_enabled(not self.vmap_gradients):
            out = net.step(*self.inputs.before(self.memory_state))
        action = sample_action(out, self.generator, self.env.shard)[0]  # [B, *act_shape]
        entropy, value = out.dist.entropy()[0].detach(), out.value[0].detach()

        next_obs, reward, terminated, truncated, info = self.env.step(net.env_action(action).to(self.env.device))
        next_obs, reward = next_obs.to(self.device), reward.to(device=self.device, dtype=torch.float32)
        terminated, done = terminated.to(self.device), (terminated | truncated).to(self.device)
        scaled_reward = self._scale(reward)
        # A gradient pass that runs the step again must see s_t as acting saw it: normalised by the
        # statistics before s_{t+1} (the batched path backpropagates through the acting forward itself).
        acting_stats = {name: b.clone() for name, b in net.named_buffers()
                        if name.startswith("encoder.stats.")} if self.vmap_gradients else {}
        self._observe(next_obs)

        with torch.no_grad():
            # V(s_{t+1}) from h_t. ``final_obs`` is the ended episode's last observation where an env
            # ended (a truncated episode bootstraps from it; a terminated one bootstraps nothing) and the
            # next observation elsewhere.
            following = info["final_obs"].to(self.device)
            next_value = net.step(following, out.state, torch.zeros_like(done), action, reward).value[0]
            delta = scaled_reward + opt.gamma * (~terminated) * next_value - value

        grads, next_state = self.gradients(out, acting_stats, action, opt.entropy_coef * delta.sign())
        update, step_size = obgd_update(self.traces, grads, delta, opt.gamma * opt.trace_lambda, opt.lr, self.kappa,
                                        opt.env_update)
        changes = [change.view_as(param) for param, change in zip(self.params, update.split(self.param_sizes))]
        self.apply_gradients(list(zip(self.param_names, changes)), {"losses/td_error": delta},
                             functools.partial(self._add, changes), flat=update)
        with torch.no_grad():
            # An ended episode's traces must not meet the next episode's TD errors.
            self.traces.mul_((~done).to(self.traces.dtype).view(1, -1, 1))

        self.memory_state = next_state
        self.inputs = self.inputs.after(next_obs, done, action, reward)
        self.steps += 1
        episode = info["episode"]  # the VecEnv contract: raw returns of finished episodes, on the env's device
        success = info.get("success")  # only tasks that score their episodes report it
        return {
            "delta": delta,
            "value": value,
            "entropy": entropy,
            "critic_step": step_size[0],
            "actor_step": step_size[1],
            "episode_done": torch.as_tensor(episode["done"]),
            "episode_return": torch.as_tensor(episode["return"], dtype=torch.float64),
            "episode_length": torch.as_tensor(episode["length"]),
            **({} if success is None else {"episode_success": torch.as_tensor(success, dtype=torch.float32)}),
        }

    def gradients(self, out: ActorCriticOutput, stats: dict[str, Tensor], action: Tensor,
                   entropy_weight: Tensor) -> tuple[Tensor, State]:
        """The per-env gradients [2, B, P] of this step's objectives and the next memory state (from the
        step's forward with gradients on, which advances the core's sensitivities): ``out``'s graph in the
        batched path, or the step run again with the network's buffers ``stats`` in place of its
        current ones (the statistics acting used)."""
        inputs = self.inputs.before(self.memory_state)
        if self.vmap_gradients:
            params = {name: p.detach() for name, p in zip(self.param_names, self.params)}
            try:
                objectives = functools.partial(self.one_env_objectives, stats=stats)
                return per_env_gradients(objectives, params, *inputs, action, entropy_weight)
            except RuntimeError as err:  # raised before any state changed: the core's forward is pure
                self.vmap_gradients = False
                warnings.warn(f"stream_ac: core {self.network.core.name!r} does not run under torch.func "
                              f"transforms ({err}); per-env gradients fall back to a batched backward whose cost "
                              f"grows with the square of the number of envs", stacklevel=2)
        if not out.value.requires_grad:  # acting ran without gradients for vmap, which then fell back
            out = self._step_with(stats, *inputs)
        return batched_per_env_gradients(step_objectives(out, action, entropy_weight), self.params), out.state

    def one_env_objectives(self, params: dict[str, Tensor], obs: Tensor, state: State, reset: Tensor,
                           prev_action: Tensor, prev_reward: Tensor, action: Tensor, entropy_weight: Tensor, *,
                           stats: dict[str, Tensor]) -> tuple[Tensor, State]:
        """``step_objectives`` [2] of one env and its next memory state: the network with ``params`` and
        the buffers ``stats`` on one env's inputs (no env dim), as ``per_env_gradients`` calls it under vmap."""
        out = self._step_with({**params, **stats}, obs[None], {k: v[None] for k, v in state.items()}, reset[None],
                              prev_action[None], prev_reward[None])
        return step_objectives(out, action[None], entropy_weight[None])[:, 0], {k: v[0] for k, v in out.state.items()}

    def _step_with(self, tensors: dict[str, Tensor], obs: Tensor, state: State, reset: Tensor, prev_action: Tensor,
                   prev_reward: Tensor) -> ActorCriticOutput:
        """``network.step`` (inputs [B, ...]) with the parameters and buffers in ``tensors`` replacing its own."""
        return torch.func.functional_call(self.network, tensors, (
            obs[None], state, reset[None], prev_action[None], prev_reward[None]))

    @torch.no_grad()
    def _add(self, changes: list[Tensor]) -> None:
        """θ ← θ + Δθ (the ObGD step, ascent on the objectives)."""
        for param, change in zip(self.params, changes):
            param.add_(change)

    def iteration(self) -> IterationResult:
        """``steps_per_iteration`` steps on every env, each one an update; metrics over them."""
        steps = [self.step() for _ in range(self.options.steps_per_iteration)]
        check_memory_state(self.memory_state)
        self.check_parameters()
        stacked = {key: torch.stack([s[key] for s in steps]) for key in steps[0]}  # [S, B]
        delta = stacked["delta"]
        metrics = {
            "losses/value_loss": float(0.5 * delta.pow(2).mean()),
            "losses/td_error": float(delta.abs().mean()),
            "losses/value": float(stacked["value"].mean()),
            "losses/entropy": float(stacked["entropy"].mean()),
            "charts/learning_rate": self.options.lr,
            "charts/critic_step_size": float(stacked["critic_step"].mean()),
            "charts/actor_step_size": float(stacked["actor_step"].mean()),
        }
        if self.options.scale_rewards:
            metrics["charts/reward_scale"] = float((self.reward_stats.var + 1e-8).rsqrt())
        metrics.update({f"memory/{k}": v for k, v in self.network.core.state_metrics(self.memory_state).items()})
        ended = stacked["episode_done"]
        returns, lengths, successes = [], [], []
        if bool(ended.any()):  # one host transfer per iteration, in time-then-env order
            returns, lengths = stacked["episode_return"][ended].tolist(), stacked["episode_length"][ended].tolist()
            if "episode_success" in stacked:
                successes = stacked["episode_success"][ended].tolist()
        return IterationResult(self.options.steps_per_iteration * self.num_envs, metrics, returns, lengths, successes)

    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.inputs.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.inputs.load_state_dict(state)
