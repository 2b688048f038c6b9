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
* ``rtrl``: exact real-time recurrent learning for every parameter that reaches the aggregator
  (W_pre and b_pre rows of ŷ and p̃, ρ, b) through the shared engine of ``rlmem.rtrl`` with units
  = (trace, column) pairs as complex numbers (k = 2); the readout (W_mix, b_mix, the τ and q̃ rows of
  W_pre) learns by ordinary backprop after the aggregator.

The state is ``{"aggregate": [B, m, c, 2]}`` (real and imaginary parts of S) plus, in ``rtrl`` mode,
the sensitivities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.memory.base import CoreOptions, MemoryCore, State, register_core
from rlmem.scan import scan_adjoint, scan_states

# The paper's initial decay rates: the fastest trace keeps 1% after ~7 steps, the slowest after 1024.
FASTEST_DECAY = -0.6731
SLOWEST_DECAY = -0.004497
LONGEST_PERIOD = 1024.0


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


@dataclass
class FFMOptions(CoreOptions):
    """Options of the ``ffm`` core. The state holds 2·traces·context reals per env."""

    traces: int = 32  # m: memory traces, each with its own decay rate
    context: int = 4  # c: context columns, each with its own rotation frequency

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("traces", "context"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"memory.{key} must be a positive integer, got {value!r}")


@register_core("ffm", FFMOptions)
class FFMCore(MemoryCore):
    """Fast and Forgetful Memory: complex diagonal aggregator with per-trace decay and per-column frequency."""

    grad_modes = ("bptt", "rtrl")

    def __init__(self, options: FFMOptions, input_size: int) -> None:
        super().__init__(options, input_size)
        self.traces = options.traces
        self.context = options.context
        m, c, H = self.traces, self.context, self.hidden_size
        self.pre = nn.Linear(input_size, 2 * m + 2 * H)
        # a = −exp(ρ) stays negative for any ρ, so every trace forgets.
        self.log_decay_rate = nn.Parameter(torch.linspace(FASTEST_DECAY, SLOWEST_DECAY, m).neg().log())
        self.frequency = nn.Parameter(2 * math.pi / torch.linspace(1.0, LONGEST_PERIOD, c))
        self.mix = nn.Linear(2 * m * c, H)

    @property
    def aggregator_rows(self) -> int:
        """The leading rows of W_pre (ŷ and p̃) feed the aggregator; the rest (τ, q̃) feed the output."""
        return 2 * self.traces

    def decay(self) -> Tensor:
        """γ [m, c] complex: γ_ij = exp(a_i) · e^{i b_j} with a_i = −exp(ρ_i)."""
        magnitude = torch.exp(-torch.exp(self.log_decay_rate))
        return torch.polar(
            magnitude.unsqueeze(1).expand(self.traces, self.context),
            self.frequency.unsqueeze(0).expand(self.traces, self.context),
        )

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> State:
        dtype = dtype or self.mix.weight.dtype
        return {"aggregate": torch.zeros(batch, self.traces, self.context, 2, device=device, dtype=dtype)}

    # ----------------------------------------------------------------------------------------------
    # The pieces of one layer, shared by both modes.

    def gated_input(self, aggregator_pre: Tensor) -> Tensor:
        """u = ŷ ⊙ σ(p̃) [..., m] from the aggregator rows of W_pre x + b_pre [..., 2m]."""
        value, input_gate = aggregator_pre.split(self.traces, dim=-1)
        return value * torch.sigmoid(input_gate)

    def readout(self, aggregate: Tensor, output_pre: Tensor) -> Tensor:
        """y [T, B, H] from S [T, B, m, c] (complex) and the output rows τ, q̃ [T, B, 2H] of W_pre x + b_pre."""
        skip, output_gate = output_pre.split(self.hidden_size, dim=-1)
        mixed = self.mix(torch.view_as_real(aggregate).flatten(-3))
        gate = torch.sigmoid(output_gate)
        return F.layer_norm(mixed, (self.hidden_size,)) * gate + skip * (1 - gate)

    def aggregate(self, gated_input: Tensor, reset: Tensor, initial: Tensor) -> Tensor:
        """S [T, B, m, c] complex from u [T, B, m], ``reset`` [T, B] and S_{-1} [B, m, c] complex."""
        gamma = self.decay()
        keep = (~reset).to(gated_input.dtype)
        if gated_input.shape[0] == 1:  # a single step is the recurrence itself
            return (gamma * keep[0].view(-1, 1, 1) * initial + gated_input[0].unsqueeze(-1)).unsqueeze(0)
        return _AggregatorWindow.apply(gated_input, gamma, keep, initial)

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool. Returns ``y`` [T, B, H] and the state."""
        pre = self.pre(x)
        aggregator_pre, output_pre = pre.split([self.aggregator_rows, 2 * self.hidden_size], dim=-1)
        initial = torch.view_as_complex(state["aggregate"].contiguous())
        aggregate = self.aggregate(self.gated_input(aggregator_pre), reset, initial)
        y = self.readout(aggregate, output_pre)
        return y, {"aggregate": torch.view_as_real(aggregate[-1]).detach().clone()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, traces={self.traces}, context={self.context}"
