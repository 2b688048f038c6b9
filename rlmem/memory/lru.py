"""The linear recurrent unit (LRU; Orvieto et al., "Resurrecting Recurrent Neural Networks for Long
Sequences", ICML 2023) with exact online learning (Zucchet et al., NeurIPS 2023): the ``lru`` core.

A complex diagonal linear recurrence with N = hidden_size units, read out by a real projection::

    λ = exp(−exp(ν_log) + i·exp(θ_log))       γ = exp(γ_log)        (ν_log, θ_log, γ_log ∈ R^N)
    h_t = λ ⊙ h_{t-1} + γ ⊙ (B x_t)            B = B_re + i·B_im ∈ C^{N×D}
    y_t = Re(C h_t) + D x_t                     C ∈ C^{N×N}; D = diag(d) when D = N (the paper's D ⊙ x), else dense
    out_t = activation(y_t)                     none | gelu | glu (GELU, then W₁ g ⊙ σ(W₂ g) as in the paper's block)

|λ| = exp(−exp(ν_log)) < 1 for any ν_log, so the recurrence is stable by construction. The eigenvalues
start uniformly on the ring r_min ≤ |λ| ≤ r_max (|λ|² uniform) with phases uniform in
[0, max_phase]; γ_log starts at log √(1 − |λ|²), the normalisation that keeps h's scale independent of
|λ|, and then trains freely. The LRU paper's surrounding block (normalisation, residual, dropout) is
left to the network around the core.

``rtrl`` (``rlmem.rtrl``, complex form, k = 2): the recurrence is holomorphic in B, so one complex
sensitivity per entry of B serves both B_re and B_im. The step's injections are

    ∂h/∂B[i, j] = γ_i x_j        ∂h/∂ν_log = −exp(ν_log) λ h_{t-1}        ∂h/∂θ_log = i·exp(θ_log) λ h_{t-1}
    ∂h/∂γ_log = γ ⊙ (B x_t)

(γ, not γ_log, multiplies the B sensitivity; the θ_log derivative carries the factor exp(θ_log)).
Sensitivities take 2·N·D + 6·N reals per env. C, D and the activation learn by ordinary backprop.

State: ``{"hidden": [B, N, 2]}`` (real and imaginary parts of h), plus ``sensitivity_<group>`` for the
groups ``input`` ([B, N, D, 2]), ``nu_log``, ``theta_log``, ``gamma_log`` ([B, N, 2]) in ``rtrl`` mode.
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
from rlmem.memory.engine import EngineCore, SensitivityLayout
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients

ACTIVATIONS = ("none", "gelu", "glu")


@dataclass
class LRUOptions(CoreOptions):
    """Options of the ``lru`` core (``grad``: ``rtrl`` or ``bptt``)."""

    r_min: float = 0.0  # smallest initial eigenvalue modulus
    r_max: float = 1.0  # largest initial eigenvalue modulus
    max_phase: float = 2 * math.pi  # initial eigenvalue phases are uniform in [0, max_phase]
    activation: str = "glu"  # after the linear readout: none | gelu | glu

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("r_min", "r_max", "max_phase"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"memory.{key} must be a number, got {value!r}")
        if not 0.0 <= self.r_min < self.r_max <= 1.0:
            raise ConfigError(
                f"memory.r_min and memory.r_max must satisfy 0 <= r_min < r_max <= 1, "
                f"got r_min={self.r_min!r}, r_max={self.r_max!r}"
            )
        if self.max_phase <= 0:
            raise ConfigError(f"memory.max_phase must be positive, got {self.max_phase!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"memory.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


class LRUCell(RTRLCell):
    """The recurrence h_t of the LRU in the form of ``rlmem.rtrl`` (complex units)."""

    form = "complex"
    block_size = 2
    input_names = ("x",)
    param_names = ("input_re", "input_im", "nu_log", "theta_log", "gamma_log")
    groups = (
        ParamGroup("input", u="gamma", v="x", matrix=True, params=("input_re", "input_im"), complex_param=True),
        ParamGroup("nu_log", u="nu_injection"),
        ParamGroup("theta_log", u="theta_injection"),
        ParamGroup("gamma_log", u="gamma_injection"),
    )

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # B x for the whole window in one real matrix product.
        weights = torch.cat([params["input_re"], params["input_im"]], dim=0)
        real, imag = (inputs["x"] @ weights.t()).chunk(2, dim=-1)
        return {"x": inputs["x"], "drive": torch.complex(real, imag)}

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        rate, frequency = torch.exp(params["nu_log"]), torch.exp(params["theta_log"])
        eigenvalue = torch.exp(torch.complex(-rate, frequency))
        gamma = torch.exp(params["gamma_log"])
        scaled_drive = gamma * inputs["drive"]
        decayed = eigenvalue * h_prev
        h = decayed + scaled_drive
        if not coefficients:
            return h, None
        factors = {
            "gamma": gamma.to(h.dtype).expand_as(h),
            "x": inputs["x"],
            "nu_injection": -rate * decayed,
            "theta_injection": 1j * frequency * decayed,
            "gamma_injection": scaled_drive,
        }
        return h, StepCoefficients(eigenvalue.expand_as(h), factors)


@register_core("lru", LRUOptions)
class LRUCore(EngineCore):
    """Linear recurrent unit (Orvieto et al. 2023): complex diagonal recurrence with exact RTRL."""

    state_key = "hidden"

    def __init__(self, options: LRUOptions, input_size: int) -> None:
        super().__init__(options, input_size, LRUCell())
        self.activation = options.activation
        N, D = self.hidden_size, input_size
        # |λ|² uniform on [r_min², r_max²], kept off 0 and 1 so that ν_log and γ_log stay finite.
        squared_modulus = torch.rand(N, dtype=torch.float64) * (options.r_max**2 - options.r_min**2) + options.r_min**2
        squared_modulus = squared_modulus.clamp(1e-8, 1 - 1e-8)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(squared_modulus)).float())
        self.theta_log = nn.Parameter(
            torch.log(options.max_phase * torch.rand(N, dtype=torch.float64).clamp_min(1e-8)).float()
        )
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - squared_modulus)).float())
        self.input_re = nn.Parameter(torch.randn(N, D) / math.sqrt(2 * D))
        self.input_im = nn.Parameter(torch.randn(N, D) / math.sqrt(2 * D))
        self.output_re = nn.Parameter(torch.randn(N, N) / math.sqrt(N))
        self.output_im = nn.Parameter(torch.randn(N, N) / math.sqrt(N))
        # The paper's element-wise D ⊙ x needs D = N; otherwise the skip is a dense projection.
        self.skip = nn.Parameter(torch.randn(N) if D == N else torch.randn(N, D) / math.sqrt(D))
        if self.activation == "glu":
            self.glu_value = nn.Linear(N, N)
            self.glu_gate = nn.Linear(N, N)

    def state_shape(self) -> tuple[int, ...]:
        return (self.hidden_size, 2)

    def sensitivity_layout(self) -> SensitivityLayout:
        return SensitivityLayout(self.hidden_size, {"input": self.input_size})

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool. Returns ``y`` [T, B, N] and the state."""
        hidden, sensitivities = self.run_recurrence(state["hidden"], {"x": x}, self.recurrent_params(), reset, state)
        new_state = self.window_state(hidden[-1], sensitivities)
        real, imag = hidden.unbind(-1)
        skip = x * self.skip if self.skip.dim() == 1 else x @ self.skip.t()
        y = real @ self.output_re.t() - imag @ self.output_im.t() + skip
        if self.activation == "none":
            return y, new_state
        y = F.gelu(y)
        if self.activation == "glu":
            y = self.glu_value(y) * torch.sigmoid(self.glu_gate(y))
        return y, new_state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
