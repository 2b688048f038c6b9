"""Columnar-constructive networks (Javed, Shah, Sutton and White, JMLR 2023): the ``ccn`` core.

A *column* is an LSTM cell with a single hidden unit and its own weights. Column j of a stage reads
the stage's m inputs, normalised, x̂ ∈ R^m, and its own previous output h₋₁:

    a_q = w_q · x̂ + r_q h₋₁ + b_q        for the gates q ∈ {i, f, g, o}
    i, f, o = σ(a_i), σ(a_f), σ(a_o)       g = tanh(a_g)
    c = f c₋₁ + i g                        h = o tanh(c)

so a column has 4m + 8 weights (w_q ∈ R^m, r_q, b_q). Columns never read each other's outputs within
a stage, so the Jacobian of the stage's state is block-diagonal with one 2×2 block per column for the
pair (h, c), and RTRL is exact at O(m) per column parameter per step. With ``dc_q = ∂c/∂a_q``
= (g i(1 − i), c₋₁ f(1 − f), i(1 − g²), 0) and ``dh_q = ∂h/∂a_q`` = o(1 − tanh² c) dc_q
(+ tanh(c) o(1 − o) for q = o), the blocks of ``rlmem.rtrl`` (block form, k = 2) are

    A = ∂(h, c)/∂(h₋₁, c₋₁) = [[Σ_q dh_q r_q, o(1 − tanh² c) f], [Σ_q dc_q r_q, f]]
    injection of w_q: (dh_q, dc_q) ⊗ x̂      of r_q: (dh_q, dc_q) h₋₁      of b_q: (dh_q, dc_q)

which is the paper's C_t = f C₋₁ + c₋₁ ∂f + i ∂g + g ∂i, H_t = o(1 − tanh² c) C_t + tanh(c) ∂o, each
gate derivative including its recurrent path r_q H₋₁. Weights start at U(±``init_scale``) (0.01).

**Stages.** The ``hidden_size`` (N) columns form stages of ``columns_per_stage`` (S) columns (the last
stage may be smaller). Columns of stage s read the observation and the outputs h of every column of
stages 0..s−1, so m_s = D + s·S. One stage learns at a time: stage s starts learning once the core
has learned from ``s · steps_per_stage`` env steps, and from then on stages 0..s−1 are frozen (their
weights and input-normaliser statistics never change again) while the columns of later stages do not
run at all (their outputs are 0; they start from h = c = 0 when their stage begins). Presets:
columnar = one stage of N independent columns (S = N), constructive = one column per stage (S = 1),
CCN = several columns per stage. The paper's schedule "N:S:T" is ``hidden_size: N``,
``columns_per_stage: S``, ``steps_per_stage: T``.

Every parameter of every stage exists from construction, so the optimizer's parameter list never
changes: frozen and future columns simply receive no gradient (``None``).

**The step count.** The core counts env steps (time steps × envs) of its *learning passes*, forward
calls made with gradients enabled, in ``steps_seen``, which is saved with the core's state_dict
(``get_extra_state``), so resuming from a checkpoint is exact. Acting under ``torch.no_grad()`` counts
nothing. The stage is read from the count at the start of each forward call, so a stage begins at the
first window that starts at or after its step: exactly at its step for per-step (T = 1) learners, and
within one window for rollout learners. A learner that runs a step through several learning passes
(PPO epochs, or truncated BPTT over overlapping windows) counts it once per pass. A caller that
compiles the forward counts for it (``count_learning_steps``, after clearing
``counts_learning_steps_in_forward``): the compiled forward then reads only ``learning_stage``, which
changes at stage boundaries alone, so it is compiled once per stage instead of once per step.

**Normalisation.** Each stage normalises its inputs online, x̂ = (x − μ)/√v, with running statistics
μ ← d μ + (1 − d) mean_b(x),  v ← max(d v + (1 − d) mean_b((x − μ)²), ``variance_floor``) (d =
``normalizer_decay``; μ = 0 and v = 1 at first), updated after they are used, during learning passes
of the stage's own learning period only. The core's output is the started columns' h normalised the
same way by output statistics that keep adapting for every started column (the readout learns on
top of them), and 0 for the columns of later stages. ``output_normalizer_decay`` gives the output
statistics a decay of their own (1: the columns' h unnormalised, with the inputs still normalised), so
that the two normalisers can be studied apart.

With ``normalizer_warmup`` (not in the CCN paper) each feature's n-th update uses the rate
r_n = max(1 − d, 1/n) in place of 1 − d: μ ← (1 − r_n) μ + r_n mean_b(x), and v likewise. The first
1/(1 − d) updates are then the plain average of what was seen, so the statistics start at the data's
instead of relaxing from μ = 0, v = 1 over ~1/(1 − d) steps (a transient that, with d = 0.99999,
lasts a few hundred thousand steps; docs/trace_patterning.md). A column's output feature counts from
its stage's start.

**Gradients.** ``grad: rtrl`` runs the learning stage's window through ``rlmem.rtrl.rtrl_window``
(sensitivities for the learning stage only: 2·S·(4·m_s + 8) reals per env); frozen stages are fixed
functions of the window's inputs, run with ordinary autograd so that the core's inputs still get
their gradient through them (through the whole window, whatever ``encoder_grad`` says; it applies to
the learning stage). ``grad: bptt`` runs everything with autograd (truncated BPTT within the window;
the test oracle of the RTRL mode).

State: ``{"hc": [B, N, 2]}`` ((h, c) per column), plus, in ``rtrl`` mode, ``sensitivity_<parameter>``
for the 12 parameters of the learning stage: ``[B, S, 2, m]`` for ``w_q`` and ``[B, S, 2]`` for ``r_q``
and ``b_q``. Sensitivities of an earlier stage (from a state carried across a stage change) are
replaced by zeros: the new stage's columns start at h = c = 0, so their sensitivities are exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.memory.base import CoreOptions, State, register_core
from rlmem.memory.engine import SENSITIVITY, EngineCore, SensitivityLayout, carried_sensitivities
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients

GATES = ("i", "f", "g", "o")


@dataclass
class CCNOptions(CoreOptions):
    """Options of the ``ccn`` core: ``hidden_size`` columns in stages (``grad``: ``rtrl`` or ``bptt``)."""

    hidden_size: int = 20  # N: columns in all
    grad: str = "rtrl"
    columns_per_stage: int = 4  # S; = hidden_size: columnar, 1: constructive
    steps_per_stage: int = 1_000_000  # env steps each stage learns before the next one starts
    # d of the running input and output statistics (1: never update); the CCN code's setting for trace
    # patterning (docs/cores.md)
    normalizer_decay: float = 0.99999
    variance_floor: float = 0.01  # lower bound of the running variances
    normalizer_warmup: bool = False  # average each feature's first 1/(1 − d) updates (see the docstring)
    output_normalizer_decay: float | None = None  # d of the output statistics; None: normalizer_decay
    init_scale: float = 0.01  # column weights start at U(−init_scale, init_scale)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.columns_per_stage, int) or not 1 <= self.columns_per_stage <= self.hidden_size:
            raise ConfigError(
                f"memory.columns_per_stage must be an integer in 1..hidden_size={self.hidden_size} "
                f"(hidden_size: columnar, 1: constructive), got {self.columns_per_stage!r}"
            )
        if not isinstance(self.steps_per_stage, int) or self.steps_per_stage < 1:
            raise ConfigError(f"memory.steps_per_stage must be a positive integer, got {self.steps_per_stage!r}")
        if not _is_number(self.normalizer_decay) or not 0.0 <= self.normalizer_decay <= 1.0:
            raise ConfigError(f"memory.normalizer_decay must be a number in [0, 1], got {self.normalizer_decay!r}")
        if not isinstance(self.normalizer_warmup, bool):
            raise ConfigError(f"memory.normalizer_warmup must be true or false, got {self.normalizer_warmup!r}")
        if self.output_normalizer_decay is not None and (
                not _is_number(self.output_normalizer_decay) or not 0.0 <= self.output_normalizer_decay <= 1.0):
            raise ConfigError("memory.output_normalizer_decay must be null (normalizer_decay) or a number in "
                              f"[0, 1], got {self.output_normalizer_decay!r}")
        if self.normalizer_warmup and self.normalizer_decay == 1.0:
            raise ConfigError(
                "memory.normalizer_warmup needs memory.normalizer_decay < 1 (1 never updates the statistics)"
            )
        if not _is_number(self.variance_floor) or self.variance_floor <= 0:
            raise ConfigError(f"memory.variance_floor must be a positive number, got {self.variance_floor!r}")
        if not _is_number(self.init_scale) or self.init_scale < 0:
            raise ConfigError(f"memory.init_scale must be a non-negative number, got {self.init_scale!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ColumnCell(RTRLCell):
    """A stage's S independent one-unit LSTM columns in the block form (k = 2) of ``rlmem.rtrl``.

    State per column: (h, c). Inputs: the normalised stage input ``x`` [T, B, m]. Parameters per gate q:
    ``w_q`` [S, m], ``r_q`` [S], ``b_q`` [S], each trained by its own group with the gate's injection."""

    form = "block"
    block_size = 2
    input_names = ("x",)
    param_names = tuple(f"{kind}_{gate}" for kind in ("w", "r", "b") for gate in GATES)
    groups = tuple(
        group
        for gate in GATES
        for group in (
            ParamGroup(f"w_{gate}", u=f"u_{gate}", v="x", matrix=True),
            ParamGroup(f"r_{gate}", u=f"u_{gate}", v="h_prev"),
            ParamGroup(f"b_{gate}", u=f"u_{gate}"),
        )
    )

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # The input part of all four gates over the whole window as one matrix product.
        weights = torch.cat([params[f"w_{gate}"] for gate in GATES])  # [4S, m]
        x = inputs["x"]
        return {"x": x, "drive": (x @ weights.t()).unflatten(-1, (4, -1))}  # [T, B, 4, S]

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        hidden_prev, cell_prev = h_prev.unbind(-1)  # [rows, S] each
        recurrent = torch.stack([params[f"r_{gate}"] for gate in GATES])  # [4, S]
        bias = torch.stack([params[f"b_{gate}"] for gate in GATES])
        pre = inputs["drive"] + recurrent * hidden_prev.unsqueeze(-2) + bias  # [rows, 4, S]
        i, f, o = torch.sigmoid(pre[:, 0]), torch.sigmoid(pre[:, 1]), torch.sigmoid(pre[:, 3])
        g = torch.tanh(pre[:, 2])
        cell = f * cell_prev + i * g
        squashed = torch.tanh(cell)
        hidden = o * squashed
        state = torch.stack([hidden, cell], dim=-1)
        if not coefficients:
            return state, None

        dh_dc = o * (1 - squashed * squashed)
        dc_da = torch.stack([g * i * (1 - i), cell_prev * f * (1 - f), i * (1 - g * g), torch.zeros_like(o)], dim=1)
        dh_da = dh_dc.unsqueeze(1) * dc_da
        dh_da[:, 3] = dh_da[:, 3] + squashed * o * (1 - o)
        jacobian = torch.stack(
            [
                torch.stack([(dh_da * recurrent).sum(1), dh_dc * f], dim=-1),
                torch.stack([(dc_da * recurrent).sum(1), f], dim=-1),
            ],
            dim=-2,
        )  # [rows, S, 2, 2]: rows (h, c), columns (h₋₁, c₋₁)
        factors = {f"u_{gate}": torch.stack([dh_da[:, q], dc_da[:, q]], dim=-1) for q, gate in enumerate(GATES)}
        factors["x"] = inputs["x"]
        factors["h_prev"] = hidden_prev
        return state, StepCoefficients(jacobian, factors)


class _Normaliser(nn.Module):
    """Running mean and variance (with a floor) of F features; normalises [T, B, F] windows. With
    ``warmup`` it also counts each feature's updates (a buffer, so checkpoints and populations keep it)."""

    def __init__(self, features: int, decay: float, floor: float, warmup: bool = False) -> None:
        super().__init__()
        self.decay, self.floor, self.warmup = decay, floor, warmup
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        if warmup:
            self.register_buffer("count", torch.zeros(features))

    def forward(self, values: Tensor, update: bool) -> Tensor:
        """Normalise ``values`` [T, B, F'] by the statistics of the first F' features (F' ≤ F); with
        ``update``, fold each step into those statistics after normalising it."""
        features = values.shape[-1]
        if not update:
            return (values - self.mean[:features]) / self.var[:features].sqrt()
        mean, var = self.mean[:features].clone(), self.var[:features].clone()
        count = self.count[:features].clone() if self.warmup else None
        normalised = []
        for t in range(values.shape[0]):
            normalised.append((values[t] - mean) / var.sqrt())
            batch = values[t].detach()
            if count is None:  # the paper's update, in its own form so that default runs stay bit for bit
                mean = self.decay * mean + (1 - self.decay) * batch.mean(0)
                var = (self.decay * var + (1 - self.decay) * (batch - mean).pow(2).mean(0)).clamp(min=self.floor)
            else:
                count = count + 1
                rate = count.reciprocal().clamp(min=1 - self.decay)  # r_n = max(1 − d, 1/n)
                mean = mean + rate * (batch.mean(0) - mean)
                var = (var + rate * ((batch - mean).pow(2).mean(0) - var)).clamp(min=self.floor)
        self.mean[:features] = mean
        self.var[:features] = var
        if count is not None:
            self.count[:features] = count
        return torch.stack(normalised)


class _Stage(nn.Module):
    """The S columns of one stage (4m + 8 weights each) and the normaliser of their m inputs."""

    def __init__(self, columns: int, inputs: int, options: CCNOptions) -> None:
        super().__init__()
        self.columns, self.inputs = columns, inputs
        scale = options.init_scale
        for kind in ("w", "r", "b"):
            for gate in GATES:
                shape = (columns, inputs) if kind == "w" else (columns,)
                setattr(self, f"{kind}_{gate}", nn.Parameter(torch.empty(shape).uniform_(-scale, scale)))
        self.normaliser = _Normaliser(
            inputs, options.normalizer_decay, options.variance_floor, options.normalizer_warmup
        )

    def params(self, trainable: bool) -> dict[str, Tensor]:
        values = {name: getattr(self, name) for name in ColumnCell.param_names}
        return values if trainable else {name: value.detach() for name, value in values.items()}


@register_core("ccn", CCNOptions)
class CCNCore(EngineCore):
    """Columnar-constructive network: stages of one-unit LSTM columns, one stage learning at a time."""

    grad_modes = ("rtrl", "bptt")
    state_key = "hc"

    def __init__(self, options: CCNOptions, input_size: int) -> None:
        super().__init__(options, input_size, ColumnCell())
        self.columns_per_stage = options.columns_per_stage
        self.steps_per_stage = options.steps_per_stage
        self.num_stages = math.ceil(options.hidden_size / options.columns_per_stage)
        bounds = [min(s * options.columns_per_stage, options.hidden_size) for s in range(self.num_stages + 1)]
        self.stage_columns = [slice(bounds[s], bounds[s + 1]) for s in range(self.num_stages)]
        self.stages = nn.ModuleList(
            _Stage(bounds[s + 1] - bounds[s], input_size + bounds[s], options) for s in range(self.num_stages)
        )
        output_decay = options.normalizer_decay if options.output_normalizer_decay is None \
            else options.output_normalizer_decay
        # warm-up needs a decay below 1 (a decay of 1 never updates: there is nothing to warm up)
        self.output_normaliser = _Normaliser(options.hidden_size, output_decay, options.variance_floor,
                                             options.normalizer_warmup and output_decay < 1.0)
        self.steps_seen = 0

    # ----------------------------------------------------------------------------------------------
    # The stage schedule

    @property
    def steps_seen(self) -> int:
        """Env steps of the learning passes so far."""
        return self._steps_seen

    @steps_seen.setter
    def steps_seen(self, steps: int) -> None:
        self._steps_seen = steps
        # The stage that learns now (0-based); stages before it are frozen, stages after it idle. Kept as
        # a plain int that changes only at stage boundaries: a compiled forward specialises on it.
        self.learning_stage = min(steps // self.steps_per_stage, self.num_stages - 1)

    def count_learning_steps(self, env_steps: int) -> None:
        self.steps_seen += env_steps

    @property
    def active_output_size(self) -> int:
        """How many outputs are live: the columns of the stages started so far (the rest output 0)."""
        return self.stage_columns[self.learning_stage].stop

    def get_extra_state(self) -> dict[str, int]:
        return {"steps_seen": self.steps_seen}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps_seen = int(state["steps_seen"])

    # ----------------------------------------------------------------------------------------------

    def state_shape(self) -> tuple[int, ...]:
        return (self.hidden_size, 2)

    def sensitivity_layout(self) -> SensitivityLayout:
        """The learning stage's: only its columns carry sensitivities."""
        stage = self.stages[self.learning_stage]
        return SensitivityLayout(stage.columns, {f"w_{gate}": stage.inputs for gate in GATES})

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        learning = torch.is_grad_enabled()
        stage_now = self.learning_stage
        hc = state["hc"]
        B = hc.shape[0]
        carried = carried_sensitivities(state)
        outputs: list[Tensor] = []  # h of each started stage, [T, B, S_s]
        finals: list[Tensor] = []  # (h, c) after the window, [B, S_s, 2]
        for s in range(stage_now + 1):
            stage, columns = self.stages[s], self.stage_columns[s]
            trains = learning and s == stage_now
            raw = torch.cat([x, *outputs], dim=-1) if outputs else x
            normalised = stage.normaliser(raw, update=trains)
            params = stage.params(trainable=trains)
            if trains and self.grad == "rtrl":
                carried_w = carried.get(SENSITIVITY + "w_i")
                if carried_w is None or carried_w.shape != (B, stage.columns, 2, stage.inputs):
                    # the stage just began: its columns start at h = c = 0, so their sensitivities are 0
                    carried = self.zero_sensitivities(B, hc.device, hc.dtype)  # stage s is the learning stage
                hc_seq, carried = self.run_recurrence(hc[:, columns], {"x": normalised}, params, reset, carried)
            else:
                hc_seq = self.run_cell(hc[:, columns], {"x": normalised}, params, reset)
            outputs.append(hc_seq[..., 0])
            finals.append(hc_seq[-1].detach())

        hidden = torch.cat(outputs, dim=-1)  # [T, B, started columns]
        y = self.output_normaliser(hidden, update=learning)
        if hidden.shape[-1] < self.hidden_size:
            y = torch.cat([y, y.new_zeros(*y.shape[:2], self.hidden_size - hidden.shape[-1])], dim=-1)
            finals.append(hc.new_zeros(B, self.hidden_size - hidden.shape[-1], 2))
        if learning and self.counts_learning_steps_in_forward:
            self.count_learning_steps(x.shape[0] * B)
        return y, self.window_state(torch.cat(finals, dim=1), carried)

    def state_metrics(self, state: State, buffers: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """The base metrics and the normalisers' mean running variance: ``stage<s>_input_var`` for each
        started stage (over its inputs) and ``output_var`` (over the started columns). A normaliser
        divides by √v: a mean v of 0.01 (the default floor) amplifies what it normalises about tenfold."""
        metrics = super().state_metrics(state)
        buffers = dict(self.named_buffers()) if buffers is None else buffers
        for s in range(self.learning_stage + 1):
            metrics[f"stage{s}_input_var"] = float(buffers[f"stages.{s}.normaliser.var"].mean())
        metrics["output_var"] = float(buffers["output_normaliser.var"][: self.active_output_size].mean())
        return metrics

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, columns_per_stage={self.columns_per_stage}, "
            f"steps_per_stage={self.steps_per_stage}, stages={self.num_stages}"
        )
