"""Fast and Forgetful Memory (FFM; Morad et al., NeurIPS 2023): the ``ffm`` core.

An FFM layer with m traces and c context columns maps x_t ∈ R^D to y_t ∈ R^H (H = hidden_size)::

    [ŷ; p̃; τ; q̃] = W_pre x_t + b_pre        ŷ, p̃ ∈ R^m,  τ, q̃ ∈ R^H
    u_t = ŷ ⊙ σ(p̃)                          the gated input, one real per trace
    γ_ij = exp(a_i + i·b_j),  a_i = −exp(ρ_i) < 0
    S_t = γ ⊙ S_{t-1} + u_t 1ᵀ               the aggregator, S ∈ C^{m×c}, 0 at each episode start
    z_t = W_mix [Re S_t; Im S_t] + b_mix
    y_t = LN(z_t) ⊙ q + τ ⊙ (1 − q),  q = σ(q̃)      LN without affine parameters

Trace i forgets at rate a_i and column j rotates at frequency b_j; the paper initialises
a = linspace(−0.6731, −0.004497, m) (the fastest trace falls to 1% in about 7 steps, the slowest in
1024) and b = 2π / linspace(1, 1024, c). The defaults m = 32, c = 4 give the paper's 256-real state.

Learning (``grad``):

* ``bptt``: autograd through the window. The aggregator over a window is a linear recurrence, run by
  the log-depth associative scan of ``rlmem.scan`` with resets as zero decays, so it stays finite in
  float32 for windows of any length.
* ``rtrl``: exact real-time recurrent learning for every parameter that reaches the aggregator,
  through the shared engine of ``rlmem.rtrl`` with N = m·c units, unit (i, j) = S_ij a complex number
  (k = 2), A_t = γ_ij. With W_ŷ, W_p̃ the ŷ and p̃ rows of W_pre, p = σ(p̃) and a = −exp(ρ), the
  injections of one step are

      ∂S_ij/∂W_ŷ[i, k] = p_i x_k        ∂S_ij/∂b_ŷ[i] = p_i
      ∂S_ij/∂W_p̃[i, k] = ŷ_i p_i (1 − p_i) x_k    ∂S_ij/∂b_p̃[i] = ŷ_i p_i (1 − p_i)
      ∂S_ij/∂ρ_i = a_i γ_ij S_{t-1,ij}               ∂S_ij/∂b_j = i γ_ij S_{t-1,ij}

  Each parameter row acts on a fixed group of units (trace i: its c columns; frequency j: its m
  traces), so the engine's per-unit gradients are summed over that group. Sensitivities take
  2·N·(2·D + 4) reals per env. The readout (W_mix, b_mix, and the τ and q̃ rows of W_pre) learns by
  ordinary backprop after the aggregator. Under ``torch.no_grad()`` the core runs the scan only and
  passes the sensitivities through untouched.

The state is ``{"aggregate": [B, m, c, 2]}`` (real and imaginary parts of S) plus, in ``rtrl`` mode,
``sensitivity_<group>`` for the groups ``value_weight``, ``gate_weight`` ([B, m·c, D, 2]) and
``value_bias``, ``gate_bias``, ``log_decay_rate``, ``frequency`` ([B, m·c, 2]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.memory.base import CoreOptions, State, register_core
from rlmem.memory.engine import EngineCore, SensitivityLayout, carried_sensitivities
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients
from rlmem.scan import scan_adjoint, scan_states

# The paper's initial decay rates: the fastest trace keeps 1% after ~7 steps, the slowest after 1024.
FASTEST_DECAY = -0.6731
SLOWEST_DECAY = -0.004497
LONGEST_PERIOD = 1024.0


def trace_decay(log_decay_rate: Tensor, frequency: Tensor) -> Tensor:
    """γ [m, c] complex: γ_ij = exp(a_i + i·b_j) with a_i = −exp(ρ_i) < 0, from ρ [m] and b [c]."""
    m, c = log_decay_rate.shape[0], frequency.shape[0]
    magnitude = torch.exp(-torch.exp(log_decay_rate))
    return torch.polar(magnitude.unsqueeze(1).expand(m, c), frequency.unsqueeze(0).expand(m, c))


def gated_input(value: Tensor, gate_pre: Tensor) -> Tensor:
    """u = ŷ ⊙ σ(p̃) [..., m]: the input each trace adds to all of its columns."""
    return value * torch.sigmoid(gate_pre)


class _AggregatorWindow(torch.autograd.Function):
    """S [T, B, m, c] over a window by the associative scan, differentiable in u, γ and S_{-1}.

    With d_t = γ·keep_t (keep_t = 0 where an episode resets before step t) and the adjoint
    λ_t = ∂L/∂S_t + conj(d_{t+1}) λ_{t+1} from ``rlmem.scan``, the gradients are
    ∂L/∂u_t[i] = Σ_j Re λ_t[i, j],  ∂L/∂γ = Σ_{t,b} keep_t λ_t conj(S_{t-1}),  ∂L/∂S_{-1} = conj(d_0) λ_0,
    so backward keeps S only and never materialises the gradient of the [T, B, m, c] decays.
    """

    @staticmethod
    def forward(ctx, gated_input: Tensor, gamma: Tensor, keep: Tensor, initial: Tensor) -> Tensor:
        decays = gamma * keep.unsqueeze(-1).unsqueeze(-1)
        values = gated_input.unsqueeze(-1).expand(*gated_input.shape, gamma.shape[-1]).to(gamma.dtype)
        states = scan_states(decays, values, initial)
        ctx.save_for_backward(gamma, keep, initial, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: Tensor):
        gamma, keep, initial, states = ctx.saved_tensors
        keep_cells = keep.unsqueeze(-1).unsqueeze(-1)
        adjoint = scan_adjoint(gamma * keep_cells, grad_states)
        grad_input = adjoint.real.sum(-1) if ctx.needs_input_grad[0] else None
        grad_gamma = grad_initial = None
        if ctx.needs_input_grad[1]:
            weighted = adjoint * keep_cells
            grad_gamma = (weighted[0] * initial.conj()).sum(0) + (weighted[1:] * states[:-1].conj()).sum((0, 1))
        if ctx.needs_input_grad[3]:
            grad_initial = (gamma * keep_cells[0]).conj() * adjoint[0]
        return grad_input, grad_gamma, None, grad_initial


class FFMCell(RTRLCell):
    """The aggregator S_t of FFM in the form of ``rlmem.rtrl``: complex units (trace i, column j), i·c + j."""

    form = "complex"
    block_size = 2
    input_names = ("x",)
    param_names = ("value_weight", "gate_weight", "value_bias", "gate_bias", "log_decay_rate", "frequency")

    def __init__(self, traces: int, context: int) -> None:
        self.traces, self.context = traces, context

        def per_trace(grad: Tensor) -> Tensor:  # [m·c(, D)] -> [m(, D)]: trace i owns its c columns
            return grad.reshape(traces, context, *grad.shape[1:]).sum(1)

        def per_column(grad: Tensor) -> Tensor:  # [m·c] -> [c]: frequency j owns its m traces
            return grad.reshape(traces, context).sum(0)

        self.groups = (
            ParamGroup("value_weight", u="value_gain", v="x", matrix=True, reduce=per_trace),
            ParamGroup("gate_weight", u="gate_gain", v="x", matrix=True, reduce=per_trace),
            ParamGroup("value_bias", u="value_gain", reduce=per_trace),
            ParamGroup("gate_bias", u="gate_gain", reduce=per_trace),
            ParamGroup("log_decay_rate", u="decay_injection", reduce=per_trace),
            ParamGroup("frequency", u="frequency_injection", reduce=per_column),
        )

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # [ŷ; p̃] for the whole window in one matrix product.
        weight = torch.cat([params["value_weight"], params["gate_weight"]], dim=0)
        bias = torch.cat([params["value_bias"], params["gate_bias"]], dim=0)
        value, gate_pre = F.linear(inputs["x"], weight, bias).split(self.traces, dim=-1)
        return {"x": inputs["x"], "value": value, "gate_pre": gate_pre}

    def per_unit(self, per_trace: Tensor) -> Tensor:
        """[..., m] -> [..., m·c]: a trace's quantity copied to each of its columns."""
        return per_trace.unsqueeze(-1).expand(*per_trace.shape, self.context).flatten(-2)

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        gamma = trace_decay(params["log_decay_rate"], params["frequency"]).flatten()
        decayed = gamma * h_prev
        h = decayed + self.per_unit(gated_input(inputs["value"], inputs["gate_pre"]))
        if not coefficients:
            return h, None
        gate = torch.sigmoid(inputs["gate_pre"])
        factors = {
            "value_gain": self.per_unit(gate).to(h.dtype),
            "gate_gain": self.per_unit(inputs["value"] * gate * (1 - gate)).to(h.dtype),
            "x": inputs["x"],
            "decay_injection": self.per_unit(-torch.exp(params["log_decay_rate"])) * decayed,  # a_i γ_ij S_ij
            "frequency_injection": 1j * decayed,
        }
        return h, StepCoefficients(gamma.expand_as(h), factors)


@dataclass
class FFMOptions(CoreOptions):
    """Options of the ``ffm`` core. The state holds 2·traces·context reals per env."""

    traces: int = 32  # m: memory traces, each with its own decay rate
    context: int = 4  # c: context columns, each with its own rotation frequency
    # Start the value bias at zero, so that a zero input writes nothing into the traces (with a random
    # bias every step writes the same constant, up to 1 / (1 − |γ|) times in a slow trace; docs/cores.md).
    zero_value_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("traces", "context"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"memory.{key} must be a positive integer, got {value!r}")
        if not isinstance(self.zero_value_bias, bool):
            raise ConfigError(f"memory.zero_value_bias must be true or false, got {self.zero_value_bias!r}")


@register_core("ffm", FFMOptions)
class FFMCore(EngineCore):
    """Fast and Forgetful Memory: complex diagonal aggregator with per-trace decay and per-column frequency."""

    state_key = "aggregate"

    def __init__(self, options: FFMOptions, input_size: int) -> None:
        super().__init__(options, input_size, FFMCell(options.traces, options.context))
        self.traces = options.traces
        self.context = options.context
        m, c, H = self.traces, self.context, self.hidden_size
        self.pre = nn.Linear(input_size, 2 * m + 2 * H)
        if options.zero_value_bias:
            with torch.no_grad():
                self.pre.bias[:m].zero_()  # ŷ's bias: u = ŷ ⊙ σ(g) is then 0 for a zero input
        # a = −exp(ρ) stays negative for any ρ, so every trace forgets.
        self.log_decay_rate = nn.Parameter(torch.linspace(FASTEST_DECAY, SLOWEST_DECAY, m).neg().log())
        self.frequency = nn.Parameter(2 * math.pi / torch.linspace(1.0, LONGEST_PERIOD, c))
        self.mix = nn.Linear(2 * m * c, H)

    @property
    def aggregator_rows(self) -> int:
        """The leading rows of W_pre (ŷ and p̃) feed the aggregator; the rest (τ, q̃) feed the output."""
        return 2 * self.traces

    def decay(self) -> Tensor:
        """γ [m, c] complex."""
        return trace_decay(self.log_decay_rate, self.frequency)

    def recurrent_params(self) -> dict[str, Tensor]:
        """The parameters that reach the aggregator, by the cell's names (views of W_pre, b_pre)."""
        m = self.traces
        return {
            "value_weight": self.pre.weight[:m],
            "gate_weight": self.pre.weight[m : 2 * m],
            "value_bias": self.pre.bias[:m],
            "gate_bias": self.pre.bias[m : 2 * m],
            "log_decay_rate": self.log_decay_rate,
            "frequency": self.frequency,
        }

    def state_shape(self) -> tuple[int, ...]:
        return (self.traces, self.context, 2)

    def sensitivity_layout(self) -> SensitivityLayout:
        columns = {"value_weight": self.input_size, "gate_weight": self.input_size}
        return SensitivityLayout(self.traces * self.context, columns)

    # ----------------------------------------------------------------------------------------------
    # The pieces of one layer, shared by both modes.

    def readout(self, aggregate: Tensor, output_pre: Tensor) -> Tensor:
        """y [T, B, H] from S [T, B, m, c] (complex) and the output rows τ, q̃ [T, B, 2H] of W_pre x + b_pre."""
        skip, output_gate = output_pre.split(self.hidden_size, dim=-1)
        mixed = self.mix(torch.view_as_real(aggregate).flatten(-3))
        gate = torch.sigmoid(output_gate)
        return F.layer_norm(mixed, (self.hidden_size,)) * gate + skip * (1 - gate)

    def aggregate(self, aggregator_pre: Tensor, reset: Tensor, initial: Tensor) -> Tensor:
        """S [T, B, m, c] complex from [ŷ; p̃] [T, B, 2m], ``reset`` [T, B] and S_{-1} [B, m, c] complex."""
        value, gate_pre = aggregator_pre.split(self.traces, dim=-1)
        keep = (~reset).to(value.dtype)
        if value.shape[0] == 1:  # a single step is the recurrence itself
            B = value.shape[1]
            h_prev = (initial * keep[0].view(B, 1, 1)).reshape(B, -1)
            step_inputs = {"value": value[0], "gate_pre": gate_pre[0]}
            h, _ = self.cell.step(h_prev, step_inputs, self.recurrent_params(), False)
            return h.reshape(1, *initial.shape)
        return _AggregatorWindow.apply(gated_input(value, gate_pre), self.decay(), keep, initial)

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool. Returns ``y`` [T, B, H] and the state."""
        if self.learns_online():
            return self._rtrl_forward(x, state, reset)
        # bptt, or acting under no_grad (sensitivities pass through untouched).
        pre = self.pre(x)
        aggregator_pre, output_pre = pre.split([self.aggregator_rows, 2 * self.hidden_size], dim=-1)
        initial = torch.view_as_complex(state["aggregate"].contiguous())
        aggregate = self.aggregate(aggregator_pre, reset, initial)
        y = self.readout(aggregate, output_pre)
        # a copy, so that the carried state does not keep the window's aggregate alive
        return y, self.window_state(torch.view_as_real(aggregate[-1]).detach().clone(), carried_sensitivities(state))

    def _rtrl_forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        T, B, _ = x.shape
        m, c = self.traces, self.context
        aggregate_pairs, sensitivities = self.run_recurrence(
            state["aggregate"].reshape(B, m * c, 2), {"x": x}, self.recurrent_params(), reset, state
        )
        aggregate = torch.view_as_complex(aggregate_pairs.reshape(T, B, m, c, 2))
        output_pre = F.linear(x, self.pre.weight[2 * m :], self.pre.bias[2 * m :])
        y = self.readout(aggregate, output_pre)
        return y, self.window_state(aggregate_pairs[-1].reshape(B, m, c, 2), sensitivities)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, traces={self.traces}, context={self.context}"
