"""Populations: P independent streaming learners stepped as one.

A single-stream learner step on a network of a few thousand weights costs mostly Python and operator
dispatch, not arithmetic. A *population* steps P independent learners (members) together: every
member keeps its own parameters θ_p, buffers (e.g. ``ccn``'s input statistics), traces, step
normalisers, carried memory state (sensitivities included), environment stream and seed, and the
step runs over all of them at once:

    (V_p, state_p) = f(θ_p, buffers_p; obs_p, state_p, reset_p)    for p = 1..P, by torch.func.vmap of
                                                                       functional_call over stacked θ [P, ...]
    ∇_{θ_p} V_p    = ∂(Σ_p V_p)/∂θ[p]                              (members share no weight: one backward)

and the learner's update is applied to the stacked tensors row by row, with the member's own scalar
hyperparameters (``lr``, ...: tensors [P]). Member p therefore receives exactly the update it receives
when trained alone with the same seed, up to the rounding of batched kernels (float64: ~1e-12
relative after hundreds of steps; tested).

The stacked tensors are the truth while the population runs. The members (ordinary learners built
one by one, each as its own run would build it) are templates: ``members[0].network`` runs the
functional forward (its own parameters are never read), and ``sync_members`` writes member p's slice
back into ``members[p]`` so that checkpoints are the members' own ``state_dict`` (a population's
member can be resumed, evaluated or compared as the run it equals). Python state of the template's
modules (``ccn``'s step count, ``get_extra_state``) advances once per step, as each member's would.

Environments: where the members' env class can ``stack`` them (the trace tasks: one env of all the
members' streams, each drawing from its member's generator exactly as alone), one env step serves the
whole population; otherwise the members' envs step one by one.

Reset flags: cores read a window's reset flags on the host (segments of fused kernels, ``run_cell``),
which a vmapped function cannot do, so when every member resets at the same steps (continuing
prediction streams, and the first step of every member) the flags go in unbatched. ``stream_ac``'s
members, whose episodes end at different steps, run their acting forwards as one vmapped call per
reset pattern (at most two with one env per member); its gradient pass (one-step RTRL windows) takes
batched flags. ``td`` populations pass batched flags when members disagree, which only a core whose
window does not read them on the host runs (``td``'s tasks are continuing streams).

Compiled (``TDPopulation(..., compile=True)``, ``train.compile``): the vmapped forward runs under
``torch.compile``, one graph per grad mode and ``ccn`` stage. The population advances the core's
schedule itself (``MemoryCore.count_learning_steps``), so the traced forward only reads it; cores read
no reset flags on the host while traced; and the members update copies of their buffers, returned as
outputs, since a compiled call must not mutate its inputs. The updates are those of the uncompiled
population up to rounding (tested in float64).

Members that diverge: a member whose loss, update direction (its norm included, in the direction's
dtype), parameters, memory state or policy stops being finite has diverged where it would have stopped
alone. It retires and the other members go on: from that step its update is zero, so its parameters
keep their last finite values; the non-finite entries of its other rows (traces, memory state, ...)
are set to 0 at each iteration's end, so that checkpoints stay finite; its iteration results carry why
(``IterationResult.diverged``) and no metrics. The population stops (``TrainingDiverged``) only when
every member has diverged. In a step-size sweep, divergence at the large end is a result to report,
not a reason to lose the sweep.

Learners: ``td`` (``TDPopulation``) and ``stream_ac`` (``StreamACPopulation``); ``MEMBER_OPTIONS``
lists the scalar options their members may differ in.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from agents.acting import ActingInputs
from agents.base import IterationResult, Learner, all_finite
from agents.networks import Categorical, DiagGaussian
from agents.obgd import obgd_update
from agents.stream_ac import StreamACLearner, per_env_gradients
from agents.td import TDLearner, add_relative_error, live_mask, normalized_step
from rlmem.errors import ConfigError, TrainingDiverged
from rlmem.memory import State

# Learner name -> the options its members may differ in (scalars the population step reads per member).
MEMBER_OPTIONS: dict[str, tuple[str, ...]] = {
    "td": ("lr", "trace_lambda", "gamma", "beta2", "eps"),
    "stream_ac": ("lr", "trace_lambda", "gamma", "entropy_coef"),
}


# Graphs a compiled population may keep for its forward: one per stage of a ``ccn`` schedule, grad mode
# and reset pattern.
COMPILED_GRAPHS_LIMIT = 256


def check_cpp_compiler() -> None:
    """ConfigError unless torch.compile's inductor finds the C++ compiler it builds CPU kernels with."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ConfigError("train.compile on a CPU needs a C++ compiler (torch.compile builds its kernels with "
                          "one) and none was found: install g++ or set CXX, or leave train.compile false") from None


@contextlib.contextmanager
def compiled_call_settings() -> Iterator[None]:
    """Dynamo's and AOTAutograd's settings for a call of a compiled population forward: more graphs
    than Dynamo's default limit; tracing a core that holds an ``nn.LSTM`` (whose weights alone the
    unfused cell reads); and no buffers donated to the backward, which runs once per env with several.
    Set and restored directly: ``config.patch`` costs 3x more, and this runs around every compiled call."""
    dynamo, functorch = torch._dynamo.config, torch._functorch.config
    saved = dynamo.recompile_limit, dynamo.allow_rnn, functorch.donated_buffer
    dynamo.recompile_limit, dynamo.allow_rnn, functorch.donated_buffer = COMPILED_GRAPHS_LIMIT, True, False
    try:
        yield
    finally:
        dynamo.recompile_limit, dynamo.allow_rnn, functorch.donated_buffer = saved


def check_population_grid(learner: str, grid: Mapping[str, Any]) -> None:
    """ConfigError unless every key of ``grid`` is ``agent.<option>`` with an option the members of a
    ``learner`` population may differ in, and every value a non-empty list of numbers."""
    if learner not in MEMBER_OPTIONS:
        raise ConfigError(
            f"train.population is not supported by learner {learner!r}; valid choices: {', '.join(MEMBER_OPTIONS)}"
        )
    valid = [f"agent.{name}" for name in MEMBER_OPTIONS[learner]]
    for key, values in grid.items():
        if key not in valid:
            raise ConfigError(
                f"train.population_grid key {key!r} is not a scalar option that members of a {learner!r} "
                f"population may differ in; valid keys: {', '.join(valid)}"
            )
        if not isinstance(values, (list, tuple)) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"train.population_grid.{key} must be a non-empty list of numbers, got {values!r}")


def _info_rows(info: Any, rows: slice) -> Any:
    """The rows of a stacked env's info (tensors with the envs on dim 0, nested in dicts)."""
    if isinstance(info, dict):
        return {k: _info_rows(v, rows) for k, v in info.items()}
    return info[rows] if isinstance(info, Tensor) and info.dim() > 0 else info


class MemberInfos:
    """The members' env infos after one step: one info per member, or the info of one stacked env whose
    tensors hold member p's envs in rows p·B..(p+1)·B, split into the members' own only when one is
    asked for (most steps need none of it: splitting every key of every member cost 7 % of a step)."""

    def __init__(self, size: int, num_envs: int, stacked: dict[str, Any] | None = None,
                 members: list[dict[str, Any]] | None = None) -> None:
        self.size, self.num_envs = size, num_envs
        self.stacked, self.members = stacked, members  # one of the two

    def __getitem__(self, p: int) -> dict[str, Any]:
        if self.members is None:
            B = self.num_envs
            self.members = [_info_rows(self.stacked, slice(q * B, (q + 1) * B)) for q in range(self.size)]
        return self.members[p]

    def tensor(self, key: str) -> Tensor | None:
        """``key`` of every member as one tensor [P, B, ...]; None where a member does not report it."""
        if self.stacked is not None:
            value = self.stacked.get(key)
            return None if value is None else value.view(self.size, self.num_envs, *value.shape[1:])
        values = [info.get(key) for info in self.members]
        return None if any(v is None for v in values) else torch.stack(values)

    def episode_ended(self) -> bool:
        """Whether any member's episode ended at this step."""
        infos = self.members if self.stacked is None else [self.stacked]
        return any(info.get("episode") is not None and bool(info["episode"]["done"].any()) for info in infos)


def stack_states(states: Sequence[State]) -> State:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def member_state(state: State, p: int) -> State:
    return {k: v[p].clone() for k, v in state.items()}


class Population(Learner):
    """What both populations share: the members, their per-member scalars as tensors [P], the
    checkpoint (every member's own state) and the parameter check naming the member."""

    parameters_checked_per_step = False
    params: dict[str, Tensor]  # stacked [P, ...] by the subclass's gather_members

    def __init__(self, members: Sequence[Learner]) -> None:
        first = members[0]
        super().__init__(first.options, first.env, first.device)
        self.members = list(members)
        self.size = len(members)
        self.network = first.network  # the template of the functional forward
        # where the core sits in the network: its buffers are the stacked ones under this prefix
        self.core_prefix = next(name for name, m in self.network.named_modules() if m is self.network.core) + "."
        if any(m.num_envs != first.num_envs for m in members):
            raise ConfigError("members of a population must agree in env.num_envs")
        self.diverged: list[str | None] = [None] * self.size  # why each retired member diverged
        self.member_names = [str(p) for p in range(self.size)]  # in messages; a run names its sub-runs
        self.retired: Tensor | None = None  # [P] bool, None while every member learns

    def per_member(self, values: Iterable[float]) -> Tensor:
        """A scalar option of every member as one tensor [P] in the traces' dtype."""
        return torch.tensor(list(values), dtype=self.members[0].traces.dtype, device=self.device)

    def memory_metrics(self, state: State, p: int) -> dict[str, float]:
        """Member p's ``memory/*`` scalars, from its slices of the stacked memory state and buffers."""
        buffers = {name.removeprefix(self.core_prefix): value[p] for name, value in self.buffers.items()
                   if name.startswith(self.core_prefix)}
        metrics = self.network.core.state_metrics(member_state(state, p), buffers)
        return {f"memory/{k}": v for k, v in metrics.items()}

    def gather_members(self) -> None:
        raise NotImplementedError

    def sync_members(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        self.sync_members()
        return {"members": [m.state_dict() for m in self.members], "diverged": list(self.diverged)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load every member's state; the members' envs must hold their states already (loaded first)."""
        if len(state["members"]) != self.size:
            raise ConfigError(f"the checkpoint holds {len(state['members'])} members, this population {self.size}")
        for member, saved in zip(self.members, state["members"]):
            member.load_state_dict(saved)
        self.gather_members()
        self.diverged = list(state.get("diverged", [None] * self.size))  # none in checkpoints before retiring
        self.update_retired()

    # ----------------------------------------------------------------------------------------------
    # Members that diverge (see the module docstring)

    def stacked_tensors(self) -> list[Tensor]:
        """Every tensor that holds one row per member on dim 0 (parameters, buffers, learner and memory
        state), as the subclass keeps them."""
        raise NotImplementedError

    def update_retired(self) -> None:
        retired = [why is not None for why in self.diverged]
        self.retired = torch.tensor(retired, device=self.device) if any(retired) else None

    def retire(self, rows: Tensor, why: Callable[[int], str]) -> None:
        """Retire the members ``rows`` ([P] bool) that still learn, ``why(p)`` saying why member p
        diverged. TrainingDiverged when no member is left."""
        newly = [p for p in rows.nonzero().flatten().tolist() if self.diverged[p] is None]
        for p in newly:
            self.diverged[p] = why(p)
        self.update_retired()
        if newly and all(why is not None for why in self.diverged):
            raise TrainingDiverged(f"{self.diverged[newly[-1]]} in member {self.member_names[newly[-1]]}, the last "
                                   f"of the {self.size} members to diverge")

    @torch.no_grad()
    def clear_retired(self) -> None:
        """Set the non-finite entries of retired members' rows to 0 (their updates are zero already)."""
        if self.retired is None:
            return
        for tensor in self.stacked_tensors():
            if tensor.is_floating_point():
                tensor[self.retired] = torch.nan_to_num(tensor[self.retired], nan=0.0, posinf=0.0, neginf=0.0)

    def member_divergence(self, gradients: Sequence[tuple[str, Tensor]], losses: Mapping[str, Tensor],
                          p: int) -> str:
        """``Learner.diagnose`` for member p's rows of the directions [P, ...] and losses [P, ...], with its
        direction's norm computed in float64 (a float32 norm overflows at 1.8e19) where it is a number."""
        rows = [(name, g[p]) for name, g in gradients]
        what = Learner.diagnose(rows, {name: loss[p] for name, loss in losses.items()})
        norm = float(torch.linalg.vector_norm(torch.cat([g.detach().flatten().double() for _, g in rows])))
        return what if math.isnan(norm) else f"{what} (update norm {norm:.3g})"

    def apply_gradients(self, gradients: Sequence[tuple[str, Tensor]], losses: Mapping[str, Tensor],
                        step: Callable[[], Any], *, flat: Tensor | None = None) -> Tensor:
        """``Learner.apply_gradients`` member by member: ``flat`` [P, N] holds the members' directions
        (``gradients`` are views of it) and each of ``losses`` is [P, ...]. Retired members' directions
        are zeroed first; a member whose losses or direction norm (in the directions' dtype, as alone) is
        not finite retires here, before the step, so its parameters keep their last finite values.
        Clipping to ``max_grad_norm`` is per member. Returns the members' norms [P]."""
        assert flat is not None and flat.dim() == 2, "a population's update directions come as one [P, N] tensor"
        for hook in self.gradient_hooks:
            hook(gradients)
        if self.retired is not None:
            flat.masked_fill_(self.retired.unsqueeze(1), 0.0)
        norms = torch.linalg.vector_norm(flat, dim=1)
        finite = torch.isfinite(norms)
        for loss in losses.values():
            finite &= torch.isfinite(loss.detach().flatten(1)).all(1)
        if self.retired is not None:
            finite |= self.retired
        if not bool(finite.all()):  # one host synchronisation per step, as alone
            self.retire(~finite, functools.partial(self.member_divergence, gradients, losses))
            flat.masked_fill_(self.retired.unsqueeze(1), 0.0)
            norms = norms.masked_fill(self.retired, 0.0)
        if self.max_grad_norm != math.inf:
            flat.mul_(torch.clamp(self.max_grad_norm / (norms + 1e-6), max=1.0).unsqueeze(1))
        step()
        return norms

    def check_members(self, memory_state: State) -> None:
        """Once per iteration: clear the retired members' rows, then retire the members whose memory
        state or parameters are not finite."""
        self.clear_retired()
        named = [*((f"memory state {k}", v) for k, v in memory_state.items()),
                 *((f"parameter {k}", v.detach()) for k, v in self.params.items())]
        if all_finite([v for _, v in named]):
            return
        for what, value in named:
            self.retire(~torch.isfinite(value.flatten(1)).all(1), lambda p, what=what: what)
        self.clear_retired()

    def member_results(self, results: list[IterationResult]) -> list[IterationResult]:
        """The members' ``results``, a retired member's replaced by one that says why it diverged."""
        return [result if why is None else IterationResult(result.env_steps, diverged=why)
                for result, why in zip(results, self.diverged)]


def normalized_steps(params: list[Tensor], update: Tensor, step_norms: Tensor, beta2: Tensor, eps: Tensor,
                     lr: Tensor, readout_mask: Tensor, features: int, normalized: bool, correction: Tensor | None,
                     live: Tensor | None, sizes: Sequence[int]) -> Tensor:
    """Every member's step of ``agents.td``'s equation (1) (``normalized_step`` with [P, N] ``update``
    and [P, 1] ``beta2``, ``eps``, ``lr``), added to the stacked ``params`` in place (``sizes``: their
    sizes per member). Returns the new ``step_norms``."""
    step, step_norms = normalized_step(update, step_norms, beta2, eps, lr, readout_mask, features, normalized,
                                       correction, live)
    for param, s in zip(params, step.split(sizes, dim=1)):
        param.add_(s.view_as(param))
    return step_norms


class TDPopulation(Population):
    """P ``td`` learners (``agents.td.TDLearner``) stepped as one (see the module docstring).

    ``iteration()`` returns one ``IterationResult`` per member; ``state_dict()`` holds every member's."""

    def __init__(self, members: Sequence[TDLearner], compile: bool = False) -> None:
        super().__init__(members)
        first = members[0]
        self.template_modules = dict(first.network.named_modules())
        for module in self.template_modules.values():
            if getattr(module, "fused", False):  # fused sequence kernels have no vmap batching rule
                module.fused = False
        # The population advances the core's schedule (once per step, as each member's own would), so that
        # the forward only reads it: a compiled forward specialises on what it reads.
        self.network.core.counts_learning_steps_in_forward = False
        if compile and self.device.type == "cpu":
            check_cpp_compiler()
        self.compile = compile
        self._runs: dict[tuple[bool, bool], Callable[..., tuple[Tensor, State, State]]] = {}
        # a dozen elementwise passes over [P, N], one fused loop compiled
        self._steps = torch.compile(normalized_steps, dynamic=False) if compile else normalized_steps
        self.unroll_length = first.unroll_length
        self.param_names, self.sizes, self.readout_mask = first.param_names, first.sizes, first.readout_mask
        self.max_grad_norm = first.max_grad_norm
        if any(m.unroll_length != first.unroll_length for m in members):
            raise ConfigError("members of a population must agree in agent.unroll_length")
        options = [m.options for m in members]
        self.lr = self.per_member(o.lr for o in options)
        self.gamma = self.per_member(m.gamma for m in members)
        self.trace_decay = self.per_member(m.gamma * o.trace_lambda for m, o in zip(members, options))
        self.beta2 = self.per_member(o.beta2 for o in options)
        self.eps = self.per_member(o.eps for o in options)
        self.reports_prediction_error = first.reports_prediction_error
        self._live_masks: dict[tuple[bool, ...], Tensor] = {}
        self.gather_members()

    # ----------------------------------------------------------------------------------------------
    # Stacking and unstacking

    def gather_members(self) -> None:
        """Stack the members' parameters, buffers and learner state (after construction or a load)."""
        networks = [m.network for m in self.members]
        named = [dict(n.named_parameters()) for n in networks]
        self.params = {name: torch.stack([p[name].detach() for p in named]).requires_grad_()
                       for name in self.param_names}
        self.flat_params = list(self.params.values())
        buffers = [dict(n.named_buffers()) for n in networks]
        self.buffers = {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]}
        for name, module in self.template_modules.items():  # Python state: the first member's (all agree)
            if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
                module.set_extra_state(dict(networks[0].named_modules())[name].get_extra_state())
        members = self.members
        self.traces = torch.stack([m.traces for m in members])  # [P, B, N]
        self.step_norms = torch.stack([m.step_norms for m in members])  # [P, N]
        self.value = torch.stack([m.value for m in members])  # [P, B]
        self.state_after = stack_states([m.state_after for m in members])
        self.window: deque[tuple[State, Tensor, Tensor]] = deque(maxlen=self.unroll_length)
        for entries in zip(*(m.window for m in members)):
            self.window.append((stack_states([e[0] for e in entries]), torch.stack([e[1] for e in entries]),
                                torch.stack([e[2] for e in entries])))
        self.updates, self.steps = members[0].updates, members[0].steps
        stack = getattr(type(members[0].env), "stack", None)
        self.stacked_env = None if stack is None else stack([m.env for m in members])
        self.no_gradient = [torch.zeros(self.size, self.num_envs, n, dtype=self.traces.dtype, device=self.device)
                            for n in self.sizes]

    @torch.no_grad()
    def sync_members(self) -> None:
        """Write each member's slice of the stacked state back into the member learner."""
        for p, member in enumerate(self.members):
            for name, param in member.network.named_parameters():
                param.copy_(self.params[name][p])
            for name, buffer in member.network.named_buffers():
                buffer.copy_(self.buffers[name][p])
            modules = dict(member.network.named_modules())
            for name, module in self.template_modules.items():
                if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
                    modules[name].set_extra_state(module.get_extra_state())
            member.traces = self.traces[p].clone()
            member.step_norms = self.step_norms[p].clone()
            member.value = self.value[p].clone()
            member.state_after = member_state(self.state_after, p)
            member.window.clear()
            for state, obs, reset in self.window:
                member.window.append((member_state(state, p), obs[p].clone(), reset[p].clone()))
            member.updates, member.steps = self.updates, self.steps
        if self.stacked_env is not None:
            self.stacked_env.unstack_into([m.env for m in self.members])

    def stacked_tensors(self) -> list[Tensor]:
        window = [t for state, obs, _ in self.window for t in (*state.values(), obs)]
        return [*self.params.values(), *self.buffers.values(), self.traces, self.step_norms, self.value,
                *self.state_after.values(), *window]

    # ----------------------------------------------------------------------------------------------
    # The vmapped forward

    def vmapped_forward(self, shared_reset: bool, compiled: bool) -> Callable[..., tuple[Tensor, State, State]]:
        """The members' forward as one call, ``(params, buffers, obs, state, reset)`` → (values, state,
        buffers), with one reset pattern for all members (``shared_reset``) or one per member, compiled or
        not. Built once per kind: a compiled call keeps its graphs (one per stage of a ``ccn`` schedule
        and grad mode)."""
        if (shared_reset, compiled) in self._runs:
            return self._runs[shared_reset, compiled]
        template = self.network

        def member(params: dict[str, Tensor], buffers: dict[str, Tensor], obs: Tensor, state: State,
                   reset: Tensor) -> tuple[Tensor, State, dict[str, Tensor]]:
            # The network updates its buffers in place (ccn's normalisers); it updates copies here, which
            # come back as outputs. A compiled call must not mutate its inputs: AOTAutograd may recompute
            # a read of a mutated input in the backward, after the mutation (torch 2.13 gives ccn's
            # gradients through the normalised output from the updated variance).
            buffers = {name: value.clone() for name, value in buffers.items()}
            values, state = functional_call(template, (params, buffers), (obs, state, reset))
            return values, state, buffers

        run = vmap(member, in_dims=(0, 0, 0, 0, None if shared_reset else 0))
        if compiled:
            run = torch.compile(run, dynamic=False)
        self._runs[shared_reset, compiled] = run
        return run

    def forward(self, obs: Tensor, start: State, reset: Tensor) -> tuple[Tensor, State]:
        """Every member's network on its window: ``obs`` [P, T, B, ...], ``reset`` [P, T, B] → values
        [P, T, B] and the states after the window ([P, B, ...])."""
        shared = bool((reset == reset[:1]).all())
        # A T-BPTT window fills over its first steps: those few run uncompiled, not as a graph per length.
        compiled = self.compile and obs.shape[1] == self.unroll_length
        run = self.vmapped_forward(shared, compiled)
        with compiled_call_settings() if compiled else contextlib.nullcontext():
            values, state, self.buffers = run(self.params, self.buffers, obs, start, reset[0] if shared else reset)
        if torch.is_grad_enabled():  # a learning pass: [T, B] env steps of each member
            self.network.core.count_learning_steps(obs.shape[1] * obs.shape[2])
        self.buffers = {name: value.detach() for name, value in self.buffers.items()}
        # Cores return detached states; under vmap, outputs an autograd.Function marks non-differentiable
        # (carried sensitivities) still hang on its graph, which must not reach into the next step.
        return values, {k: v.detach() for k, v in state.items()}

    def window_tensors(self, last_obs: Tensor | None = None) -> tuple[State, Tensor, Tensor]:
        start = self.window[0][0]
        obs = [entry[1] for entry in self.window]
        reset = [entry[2] for entry in self.window]
        if last_obs is not None:
            obs[-1], reset[-1] = last_obs, torch.zeros_like(reset[-1])
        return start, torch.stack(obs, dim=1), torch.stack(reset, dim=1)

    def value_and_gradients(self) -> tuple[Tensor, State, list[Tensor | None]]:
        """V of every member's last observation [P, B], the states after it, and ∇_θ V per member and
        env ([P, B, *θ.shape], None for parameters V does not depend on)."""
        start, obs, reset = self.window_tensors()
        P, B = self.size, self.num_envs
        with torch.enable_grad():
            values, state = self.forward(obs, start, reset)
            value = values[:, -1]
            if B == 1:
                grads = torch.autograd.grad(value.sum(), self.flat_params, allow_unused=True)
                gradients = [None if g is None else g.unsqueeze(1) for g in grads]
            elif self.compile:  # a compiled backward cannot be batched: one backward per env
                per_env = [torch.autograd.grad(value[:, b].sum(), self.flat_params, retain_graph=b < B - 1,
                                               allow_unused=True) for b in range(B)]
                gradients = [None if g[0] is None else torch.stack(g, dim=1) for g in zip(*per_env)]
            else:
                eye = torch.eye(B, device=self.device, dtype=value.dtype).unsqueeze(1).expand(B, P, B)
                grads = torch.autograd.grad(value, self.flat_params, grad_outputs=eye, is_grads_batched=True,
                                            allow_unused=True)
                gradients = [None if g is None else g.movedim(0, 1) for g in grads]
        return value.detach(), state, gradients

    def live_mask(self, gradients: list[Tensor | None]) -> Tensor | None:
        return live_mask(gradients, self.sizes, self._live_masks, self.traces)

    # ----------------------------------------------------------------------------------------------
    # TD(λ), as agents.td does it, row by row

    def advance(self, state: State, gradients: list[Tensor | None], done: Tensor, live: Tensor | None) -> None:
        decay = (self.trace_decay.unsqueeze(1) * (~done).to(self.traces.dtype)).unsqueeze(2)
        if live is not None:
            decay = decay * live
        P, B = self.size, self.num_envs
        flat = torch.cat([self.no_gradient[i] if g is None else g.reshape(P, B, -1)
                          for i, g in enumerate(gradients)], dim=2)
        self.traces.mul_(decay).add_(flat)
        self.state_after = state

    @torch.no_grad()
    def update(self, td_error: Tensor, live: Tensor | None) -> None:
        update = torch.einsum("pb,pbn->pn", td_error.to(self.traces.dtype), self.traces) / self.num_envs
        directions = list(zip(self.param_names, update.split(self.sizes, dim=1)))
        self.apply_gradients(directions, {"losses/td_error": td_error}, lambda: self.apply_update(update, live),
                             flat=update)

    @torch.no_grad()
    def apply_update(self, update: Tensor, live: Tensor | None) -> None:
        opt = self.options
        normalized = opt.optimizer == "normalized"
        correction = (1 - self.beta2 ** (self.updates + 1)).unsqueeze(1) if normalized and opt.bias_correction else None
        features = self.network.live_features() if opt.readout_step_per_feature else 1
        self.step_norms = self._steps(self.flat_params, update, self.step_norms, self.beta2.unsqueeze(1),
                                      self.eps.unsqueeze(1), self.lr.unsqueeze(1), self.readout_mask, features,
                                      normalized, correction, live, self.sizes)
        self.updates += 1

    def env_step(self) -> tuple[Tensor, Tensor, Tensor, Tensor, MemberInfos]:
        """Every member's env step: obs [P, B, ...], reward, terminated, truncated [P, B], and the infos."""
        P, B = self.size, self.num_envs
        if self.stacked_env is None:
            steps = [m.env.step(None) for m in self.members]
            stacked = [torch.stack([s[k] for s in steps]).to(self.device) for k in range(4)]
            return (*stacked, MemberInfos(P, B, members=[s[4] for s in steps]))  # type: ignore[return-value]
        obs, reward, terminated, truncated, info = self.stacked_env.step(None)
        obs, reward, terminated, truncated = (t.to(self.device).view(P, B, *t.shape[1:])
                                              for t in (obs, reward, terminated, truncated))
        return obs, reward, terminated, truncated, MemberInfos(P, B, stacked=info)

    def step(self, sums: dict[str, Tensor], episodes: list[tuple[list[float], list[int]]]) -> None:
        obs, reward, terminated, truncated, infos = self.env_step()
        done = terminated | truncated
        self.window.append((self.state_after, obs, done))
        value, state, gradients = self.value_and_gradients()

        bootstrap = value * (~terminated).to(value.dtype)
        if truncated.any():
            final_obs = torch.stack([infos[p]["final_obs"] if "final_obs" in infos[p] else o.cpu()
                                     for p, o in enumerate(obs)]).to(self.device)
            with torch.no_grad():
                final_values, _ = self.forward(*self.window_tensors(last_obs=final_obs))
            bootstrap = torch.where(truncated & ~terminated, final_values[:, -1], bootstrap)
        td_error = reward.to(value.dtype) + self.gamma.unsqueeze(1) * bootstrap - self.value
        live = self.live_mask(gradients)
        self.update(td_error, live)
        self.advance(state, gradients, done, live)
        self.value = value

        sums["losses/td_error"] += td_error.pow(2).mean(1)
        sums["charts/value"] += value.mean(1)
        true_return = infos.tensor("true_return") if self.reports_prediction_error else None
        if true_return is not None:
            true_return = true_return.to(self.device, value.dtype)
            sums["charts/prediction_error"] += (value - true_return).pow(2).mean(1)
            sums["charts/zero_prediction_error"] += true_return.pow(2).mean(1)
        if not infos.episode_ended():
            return
        for p, (returns, lengths) in enumerate(episodes):
            episode = infos[p].get("episode")
            if episode is not None and bool(episode["done"].any()):
                finished = episode["done"].nonzero().flatten()
                returns.extend(episode["return"][finished].tolist())
                lengths.extend(episode["length"][finished].tolist())

    def iteration(self) -> list[IterationResult]:  # type: ignore[override]
        """``steps_per_iteration`` TD(λ) steps of every member; one result per member."""
        n = self.options.steps_per_iteration
        zero = torch.zeros(self.size, device=self.device, dtype=self.value.dtype)
        sums = {"losses/td_error": zero.clone(), "charts/value": zero.clone()}
        if self.reports_prediction_error:
            sums["charts/prediction_error"] = zero.clone()
            sums["charts/zero_prediction_error"] = zero.clone()
        episodes: list[tuple[list[float], list[int]]] = [([], []) for _ in range(self.size)]
        for _ in range(n):
            self.step(sums, episodes)
        self.steps += n
        self.check_members(self.state_after)
        means = {tag: (total / n).tolist() for tag, total in sums.items()}
        results = []
        for p in range(self.size):
            metrics = add_relative_error({tag: values[p] for tag, values in means.items()})
            metrics["charts/learning_rate"] = float(self.lr[p])
            metrics.update(self.memory_metrics(self.state_after, p))
            returns, lengths = episodes[p]
            results.append(IterationResult(n * self.num_envs, metrics, returns, lengths))
        return self.member_results(results)


def _rows(tree: Any, rows: Tensor) -> Any:
    """The members ``rows`` of stacked tensors (nested in dicts, lists and tuples)."""
    if isinstance(tree, dict):
        return {k: _rows(v, rows) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rows(v, rows) for v in tree)
    return tree[rows]


def _scatter_rows(parts: Sequence[Any], groups: Sequence[Tensor], size: int) -> Any:
    """Outputs of member groups (``parts[g]`` for the members ``groups[g]``) back in member order."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _scatter_rows([p[k] for p in parts], groups, size) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_scatter_rows([p[i] for p in parts], groups, size) for i in range(len(first)))
    merged = first.new_empty(size, *first.shape[1:])
    for part, rows in zip(parts, groups):
        merged[rows] = part
    return merged


def merge_running_stats(mean: Tensor, sum_squares: Tensor, count: Tensor, samples: Tensor) -> None:
    """``agents.normalization.RunningMeanStd.update`` of P members at once, in place: statistics
    ``mean``, ``sum_squares`` [P, *shape], ``count`` [P]; ``samples`` [P, n, *shape]."""
    samples = samples.to(torch.float64)
    n = samples.shape[1]
    batch_mean = samples.mean(1)
    extra = [1] * (mean.dim() - 1)
    total = count + n
    delta = batch_mean - mean
    counts = (count * n / total).view(-1, *extra)
    sum_squares += (samples - batch_mean.unsqueeze(1)).pow(2).sum(1) + delta.pow(2) * counts
    mean += delta * (n / total).view(-1, *extra)
    count.copy_(total)


def running_variance(sum_squares: Tensor, count: Tensor) -> Tensor:
    """``RunningMeanStd.var`` of P members: [P, *shape]."""
    count = count.view(-1, *[1] * (sum_squares.dim() - 1))
    return torch.where(count < 2, 1.0, sum_squares / (count - 1).clamp(min=1.0))


class StreamACPopulation(Population):
    """P ``stream_ac`` learners (``agents.stream_ac.StreamACLearner``) stepped as one.

    Every member's step is the learner's own (see ``agents.stream_ac``): acting by the vmapped one-step
    forward without gradients, an action sampled from the member's own generator, the member's env
    step, its reward scale and observation statistics (stacked buffers), V(s_{t+1}), per-env gradients
    by the learner's ``per_env_gradients`` (vmap over envs of jacrev) vmapped over members, and ObGD
    per member with the member's step size. Members may differ in ``lr``, ``trace_lambda``, ``gamma``
    and ``entropy_coef``."""

    def __init__(self, members: Sequence[StreamACLearner]) -> None:
        super().__init__(members)
        first = members[0]
        self.template = first
        self.param_names, self.param_sizes = first.param_names, first.param_sizes
        options = [m.options for m in members]
        self.lr = self.per_member(o.lr for o in options)
        self.gamma = self.per_member(o.gamma for o in options)
        self.trace_decay = self.per_member(o.gamma * o.trace_lambda for o in options)
        self.entropy_coef = self.per_member(o.entropy_coef for o in options)
        self.gather_members()

    def gather_members(self) -> None:
        members = self.members
        named = [dict(m.network.named_parameters()) for m in members]
        self.params = {name: torch.stack([p[name].detach() for p in named]) for name in self.param_names}
        buffers = [dict(m.network.named_buffers()) for m in members]
        self.buffers = {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]}
        self.traces = torch.stack([m.traces for m in members])  # [P, 2, B, N]
        stats = [m.reward_stats for m in members]
        self.reward_mean = torch.stack([s.mean for s in stats])
        self.reward_sum_squares = torch.stack([s.sum_squares for s in stats])
        self.reward_count = torch.stack([s.count for s in stats])
        self.discounted_return = torch.stack([m.discounted_return for m in members])  # [P, B]
        self.memory_state = stack_states([m.memory_state for m in members])
        self.inputs = ActingInputs(*(torch.stack([getattr(m.inputs, f) for m in members])
                                     for f in ("obs", "reset", "prev_action", "prev_reward")))
        self.steps = members[0].steps

    @torch.no_grad()
    def sync_members(self) -> None:
        for p, member in enumerate(self.members):
            for name, param in member.network.named_parameters():
                if name in self.params:
                    param.copy_(self.params[name][p])
            for name, buffer in member.network.named_buffers():
                buffer.copy_(self.buffers[name][p])
            member.traces = self.traces[p].clone()
            member.reward_stats.mean.copy_(self.reward_mean[p])
            member.reward_stats.sum_squares.copy_(self.reward_sum_squares[p])
            member.reward_stats.count.copy_(self.reward_count[p])
            member.discounted_return = self.discounted_return[p].clone()
            member.memory_state = member_state(self.memory_state, p)
            member.inputs = ActingInputs(*(getattr(self.inputs, f)[p].clone()
                                           for f in ("obs", "reset", "prev_action", "prev_reward")))
            member.steps = self.steps

    def stacked_tensors(self) -> list[Tensor]:
        return [*self.params.values(), *self.buffers.values(), self.traces, self.reward_mean,
                self.reward_sum_squares, self.discounted_return, *self.memory_state.values(), self.inputs.obs,
                self.inputs.prev_reward]

    def retire_on_policy(self, dist_tensors: list[Tensor]) -> list[Tensor]:
        """Retire the members whose policy output (``dist_tensors`` [P, ...]) is not finite; retired
        members act by the first learning member's policy instead (their actions no longer matter, and
        sampling needs a valid distribution)."""
        finite = torch.stack([torch.isfinite(t.flatten(1)).all(1) for t in dist_tensors]).all(0)
        self.retire(~finite, lambda p: "policy output")
        live = int((~self.retired).nonzero()[0])
        return [torch.where(self.retired.view(-1, *[1] * (t.dim() - 1)), t[live], t) for t in dist_tensors]

    # ----------------------------------------------------------------------------------------------

    def network_step(self, buffers: dict[str, Tensor], obs: Tensor, state: State, reset: Tensor,
                     prev_action: Tensor, prev_reward: Tensor) -> tuple[list[Tensor], Tensor, State]:
        """Every member's ``network.step`` ([P, B, ...] inputs): the distribution's tensors, the value
        [P, B] and the state after the step."""
        shared = bool((reset == reset[:1]).all())
        template = self.network

        def member(params: dict[str, Tensor], buffers: dict[str, Tensor], obs: Tensor, state: State,
                   reset: Tensor, prev_action: Tensor, prev_reward: Tensor) -> tuple[list[Tensor], Tensor, State]:
            # network.step: the forward over a one-step window (a leading T = 1)
            out = functional_call(template, (params, buffers), (obs[None], state, reset[None], prev_action[None],
                                                                prev_reward[None]))
            return out.dist.parameters(), out.value[0], out.state

        run = vmap(member, in_dims=(0, 0, 0, 0, None, 0, 0))
        args = (self.params, buffers, obs, state, prev_action, prev_reward)
        if shared:
            dist, value, next_state = run(*args[:4], reset[0], *args[4:])
        else:
            # Members whose envs reset at other steps: one vmapped call per reset pattern (a core's window
            # without gradients reads its reset flags on the host, which vmap cannot trace).
            patterns, pattern_of = torch.unique(reset, dim=0, return_inverse=True)
            groups = [(pattern_of == g).nonzero().flatten() for g in range(len(patterns))]
            parts = [run(*_rows(args[:4], rows), pattern, *_rows(args[4:], rows))
                     for pattern, rows in zip(patterns, groups)]
            dist, value, next_state = _scatter_rows(parts, groups, self.size)
        return dist, value, {k: v.detach() for k, v in next_state.items()}

    def distribution(self, tensors: Sequence[Tensor]) -> Categorical | DiagGaussian:
        return Categorical(*tensors) if self.network.discrete else DiagGaussian(*tensors)

    def step(self) -> dict[str, Tensor]:
        opt, net = self.options, self.network
        P, B = self.size, self.num_envs
        obs, state, reset, prev_action, prev_reward = self.inputs.before(self.memory_state)
        with torch.no_grad():
            dist_tensors, value, acting_state = self.network_step(self.buffers, obs, state, reset, prev_action,
                                                                  prev_reward)
        if not all_finite(dist_tensors):
            dist_tensors = self.retire_on_policy(dist_tensors)
        action = torch.stack([self.distribution([t[p] for t in dist_tensors]).sample(m.generator)[0]
                              for p, m in enumerate(self.members)])  # [P, B, *act_shape]
        entropy = self.distribution(dist_tensors).entropy()[:, 0]

        steps = [m.env.step(net.env_action(action[p]).to(m.env.device)) for p, m in enumerate(self.members)]
        next_obs = torch.stack([s[0] for s in steps]).to(self.device)
        reward = torch.stack([s[1] for s in steps]).to(device=self.device, dtype=torch.float32)
        terminated = torch.stack([s[2] for s in steps]).to(self.device)
        done = terminated | torch.stack([s[3] for s in steps]).to(self.device)
        infos = [s[4] for s in steps]
        scaled_reward = reward
        if opt.scale_rewards:
            self.discounted_return = self.discounted_return * self.gamma.unsqueeze(1) * (~reset) + reward
            merge_running_stats(self.reward_mean, self.reward_sum_squares, self.reward_count,
                                self.discounted_return)
            variance = running_variance(self.reward_sum_squares, self.reward_count)
            # alone, r [B] / σ (a 0-dim float64) divides in r's dtype: so here too
            scaled_reward = reward / (variance + 1e-8).sqrt().to(reward.dtype).unsqueeze(1)
        acting_buffers = {name: b.clone() for name, b in self.buffers.items()}
        if opt.normalize_observations:
            to_float = net.encoder.to_float
            samples = to_float(next_obs.flatten(0, 1)).view(P, B, -1)
            merge_running_stats(self.buffers["encoder.stats.mean"], self.buffers["encoder.stats.sum_squares"],
                                self.buffers["encoder.stats.count"], samples)

        with torch.no_grad():
            following = torch.stack([info["final_obs"] for info in infos]).to(self.device)
            _, next_value, _ = self.network_step(self.buffers, following, acting_state, torch.zeros_like(done),
                                                 action, reward)
            delta = scaled_reward + self.gamma.unsqueeze(1) * (~terminated) * next_value - value

        entropy_weight = self.entropy_coef.unsqueeze(1) * delta.sign()
        objectives = self.template.one_env_objectives

        def member_gradients(params: dict[str, Tensor], buffers: dict[str, Tensor], *per_env: Any) -> Any:
            return per_env_gradients(functools.partial(objectives, stats=buffers), params, *per_env)

        grads, next_state = vmap(member_gradients)(self.params, acting_buffers, obs, state, reset, prev_action,
                                                   prev_reward, action, entropy_weight)
        update, step_size = vmap(obgd_update, in_dims=(0, 0, 0, 0, 0, None, None))(
            self.traces, grads, delta, self.trace_decay, self.lr, self.template.kappa, opt.env_update)
        changes = update.split(self.param_sizes, dim=1)
        directions = [(name, change.view_as(self.params[name])) for name, change in zip(self.param_names, changes)]
        self.apply_gradients(directions, {"losses/td_error": delta},
                             functools.partial(self.add, [d for _, d in directions]), flat=update)
        with torch.no_grad():
            self.traces.mul_((~done).to(self.traces.dtype).view(P, 1, B, 1))

        self.memory_state = {k: v.detach() for k, v in next_state.items()}
        self.inputs = self.inputs.after(next_obs, done, action, reward)
        self.steps += 1
        episodes = [info["episode"] for info in infos]
        successes = [info.get("success") for info in infos]  # only tasks that score their episodes report it
        scored = {} if successes[0] is None else {
            "episode_success": torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in successes])}
        return {
            "delta": delta,
            "value": value,
            "entropy": entropy,
            "critic_step": step_size[:, 0],
            "actor_step": step_size[:, 1],
            "episode_done": torch.stack([torch.as_tensor(e["done"]) for e in episodes]),
            "episode_return": torch.stack([torch.as_tensor(e["return"], dtype=torch.float64) for e in episodes]),
            "episode_length": torch.stack([torch.as_tensor(e["length"]) for e in episodes]),
            **scored,
        }

    @torch.no_grad()
    def add(self, changes: list[Tensor]) -> None:
        for param, change in zip(self.params.values(), changes):
            param.add_(change)

    def iteration(self) -> list[IterationResult]:  # type: ignore[override]
        """``steps_per_iteration`` steps of every member; one result per member, as the learner reports."""
        steps = [self.step() for _ in range(self.options.steps_per_iteration)]
        self.check_members(self.memory_state)
        stacked = {key: torch.stack([s[key] for s in steps], dim=1) for key in steps[0]}  # [P, S, B]
        delta = stacked["delta"]
        per_member = {
            "losses/value_loss": (0.5 * delta.pow(2)).mean((1, 2)),
            "losses/td_error": delta.abs().mean((1, 2)),
            "losses/value": stacked["value"].mean((1, 2)),
            "losses/entropy": stacked["entropy"].mean((1, 2)),
            "charts/learning_rate": self.lr,
            "charts/critic_step_size": stacked["critic_step"].mean((1, 2)),
            "charts/actor_step_size": stacked["actor_step"].mean((1, 2)),
        }
        if self.options.scale_rewards:
            per_member["charts/reward_scale"] = (running_variance(self.reward_sum_squares, self.reward_count)
                                                 + 1e-8).rsqrt()
        values = {tag: v.tolist() for tag, v in per_member.items()}
        results = []
        for p in range(self.size):
            metrics = {tag: float(v[p]) for tag, v in values.items()}
            metrics.update(self.memory_metrics(self.memory_state, p))
            ended = stacked["episode_done"][p]
            returns, lengths, successes = [], [], []
            if bool(ended.any()):  # in time-then-env order, as the learner reports them
                returns = stacked["episode_return"][p][ended].tolist()
                lengths = stacked["episode_length"][p][ended].tolist()
                if "episode_success" in stacked:
                    successes = stacked["episode_success"][p][ended].tolist()
            results.append(IterationResult(self.options.steps_per_iteration * self.num_envs, metrics, returns,
                                           lengths, successes))
        return self.member_results(results)


# Learner name -> the class that steps a population of its members.
POPULATIONS: dict[str, Callable[[Sequence[Any]], Learner]] = {"td": TDPopulation, "stream_ac": StreamACPopulation}
