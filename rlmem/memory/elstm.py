"""The element-wise LSTM (eLSTM; Irie, Gopalakrishnan and Schmidhuber, ICLR 2024): the ``elstm`` core.

Its cell state c ∈ R^N recurs element-wise, so exact RTRL costs O(N·D) per step and env::

    f_t = σ(F x_t + w_f ⊙ c_{t-1} + b_f)          z_t = tanh(Z x_t + w_z ⊙ c_{t-1} + b_z)
    c_t = f_t ⊙ c_{t-1} + (1 − f_t) ⊙ z_t
    o_t = σ(O x_t + W_o c_t + b_o)                 h_t = o_t ⊙ c_t       (the core's output)

The output gate reads c_t but does not feed back, so it learns by ordinary backprop. For RTRL
(``rlmem.rtrl``, real units, k = 1) the step supplies

    ẑ = (1 − f)(1 − z²)      f̂ = (c_{t-1} − z) f (1 − f)      a = ∂c_t/∂c_{t-1} = f + w_z ⊙ ẑ + w_f ⊙ f̂

and the injections ẑ ⊗ x (Z), f̂ ⊗ x (F), ẑ ⊙ c_{t-1} (w_z), f̂ ⊙ c_{t-1} (w_f), ẑ (b_z), f̂ (b_f): the
sensitivities take 2·N·D + 4·N reals per env. All weights start at N(0, 0.1²), as in the paper.

With small weights every forget gate starts near σ(0) = 0.5, so a cue fades as 0.5^L before learning
has begun. ``chrono_horizon: T_max`` (Tallec and Ollivier, "Can recurrent neural networks warp
time?", ICLR 2018) instead starts the forget biases at b_f = log u, u ~ U[1, T_max − 1], so that on a
zero input unit i retains its cell with time constant 1 / (1 − f_i) = 1 + u_i spread up to T_max steps,
and b_z = 0. The output-gate and input weights keep their N(0, init_std²) start.

State: ``{"cell": [B, N]}``, plus ``sensitivity_<parameter>`` for the six recurrent parameters in
``rtrl`` mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.memory.base import CoreOptions, State, register_core
from rlmem.memory.engine import EngineCore, SensitivityLayout
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients


@dataclass
class ELSTMOptions(CoreOptions):
    """Options of the ``elstm`` core (``grad``: ``rtrl`` or ``bptt``)."""

    init_std: float = 0.1  # every weight and bias starts at N(0, init_std²)
    chrono_horizon: int = 0  # > 1: forget biases start at log U[1, chrono_horizon − 1] (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_std, (int, float)) or isinstance(self.init_std, bool) or self.init_std < 0:
            raise ConfigError(f"memory.init_std must be a non-negative number, got {self.init_std!r}")
        horizon = self.chrono_horizon
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0 or horizon == 1:
            raise ConfigError(f"memory.chrono_horizon must be 0 (off) or an integer >= 2, got {horizon!r}")


class ELSTMCell(RTRLCell):
    """The recurrence c_t of the eLSTM in the form of ``rlmem.rtrl``."""

    form = "real"
    block_size = 1
    input_names = ("x",)
    param_names = (
        "forget_input",
        "cell_input",
        "forget_recurrent",
        "cell_recurrent",
        "forget_bias",
        "cell_bias",
    )
    groups = (
        ParamGroup("forget_input", u="forget_injection", v="x", matrix=True),  # F
        ParamGroup("cell_input", u="cell_injection", v="x", matrix=True),  # Z
        ParamGroup("forget_recurrent", u="forget_injection", v="c_prev"),  # w_f
        ParamGroup("cell_recurrent", u="cell_injection", v="c_prev"),  # w_z
        ParamGroup("forget_bias", u="forget_injection"),  # b_f
        ParamGroup("cell_bias", u="cell_injection"),  # b_z
    )

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # Both input projections of the whole window in one matrix product.
        weights = torch.cat([params["forget_input"], params["cell_input"]], dim=0)
        forget_drive, cell_drive = (inputs["x"] @ weights.t()).chunk(2, dim=-1)
        return {"x": inputs["x"], "forget_drive": forget_drive, "cell_drive": cell_drive}

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        c_prev = h_prev
        f = torch.sigmoid(inputs["forget_drive"] + params["forget_recurrent"] * c_prev + params["forget_bias"])
        z = torch.tanh(inputs["cell_drive"] + params["cell_recurrent"] * c_prev + params["cell_bias"])
        c = z + f * (c_prev - z)
        if not coefficients:
            return c, None
        cell_injection = (1 - f) * (1 - z * z)  # ∂c/∂(pre-activation of z)
        forget_injection = (c_prev - z) * f * (1 - f)  # ∂c/∂(pre-activation of f)
        jacobian = f + params["cell_recurrent"] * cell_injection + params["forget_recurrent"] * forget_injection
        factors = {
            "cell_injection": cell_injection,
            "forget_injection": forget_injection,
            "c_prev": c_prev,
            "x": inputs["x"],
        }
        return c, StepCoefficients(jacobian, factors)


@register_core("elstm", ELSTMOptions)
class ELSTMCore(EngineCore):
    """Element-wise LSTM with exact RTRL (Irie et al. 2024); output h = o ⊙ c."""

    state_key = "cell"

    def __init__(self, options: ELSTMOptions, input_size: int) -> None:
        super().__init__(options, input_size, ELSTMCell())
        N, D = self.hidden_size, input_size
        shapes = {
            "forget_input": (N, D),
            "cell_input": (N, D),
            "forget_recurrent": (N,),
            "cell_recurrent": (N,),
            "forget_bias": (N,),
            "cell_bias": (N,),
            "output_input": (N, D),
            "output_recurrent": (N, N),
            "output_bias": (N,),
        }
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * options.init_std))
        if options.chrono_horizon:
            with torch.no_grad():
                self.forget_bias.copy_(torch.log(torch.empty(N).uniform_(1.0, options.chrono_horizon - 1)))
                self.cell_bias.zero_()

    def state_shape(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    def sensitivity_layout(self) -> SensitivityLayout:
        return SensitivityLayout(self.hidden_size, {"forget_input": self.input_size, "cell_input": self.input_size})

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool. Returns ``y`` [T, B, N] and the state."""
        cells, sensitivities = self.run_recurrence(state["cell"], {"x": x}, self.recurrent_params(), reset, state)
        output_gate = torch.sigmoid(x @ self.output_input.t() + cells @ self.output_recurrent.t() + self.output_bias)
        return output_gate * cells, self.window_state(cells[-1], sensitivities)
