"""SnAp-1 for the CfC cell (``rlmem.memory.cfc_cell``) on the shared RTRL engine (``rlmem.rtrl``).

The exact sensitivities of the CfC cell obey J_t = D_t J_{t−1} + I_t with a dense Jacobian
D_t = ∂h_t/∂h_{t−1} (``rlmem.memory.cfc_rtrl``). SnAp-1 replaces D_t by its diagonal,

    J̃_t = diag(D_t) J̃_{t−1} + I_t,

so J̃ keeps the sparsity pattern of one step's injection I_t, and the engine's recursion (1) with a
real diagonal A_t = diag(D_t) runs it. Units are the n state units (k = 1):

* Row j·n + i of head j's weights feeds unit i only, so the head parameters (and, without backbone,
  the first layer's rows) are ordinary groups with injection u = ∂h'/∂p_j (one group per head): one
  float of sensitivity per parameter.
* With a backbone, every first-layer and backbone parameter reaches all units through the heads in
  one step: fan-out groups whose injection is Ĝ^l = ∂h'/∂pre_l [B, n, m],

      Ĝ^L = Σ_j (∂h'/∂p_j) H_j ⊙ φ'(pre_L),      Ĝ^{l−1} = (Ĝ^l W_l) ⊙ φ'(pre_{l−1}),

  so each unit keeps a sensitivity to the whole backbone. The recurrent weights are tracked as
  R = (U Vᵀ) ⊙ M, one [m, n] group, and U, V receive their gradient through R by the chain rule.
* The diagonal: D_ii = Σ_r Ĝ^1[i, r] R[r, i] with a backbone, Σ_j (∂h'/∂p_j)_i R_j[i, i] without.

Cost per env and step: O(k·n·m) for the heads, O(n·m·(D + n + 1)) for the first layer and O(n·m²)
per further backbone layer (against O(n·p) and O(n²·p) per window for exact RTRL); memory: the head
parameters plus n times the backbone parameters (with R as m·n), or, without backbone, one float per
parameter (R counted as k·n·n). The inputs' window gradient uses the same diagonal adjoint. Exact when
D_t is diagonal (no backbone and a diagonal mask on every head block).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rlmem.memory.cfc_cell import CfCCell, Weights
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients


class SnapCell(RTRLCell):
    """The CfC step in the engine's form, with A_t = diag(D_t) (see the module docstring).

    Inputs: ``x`` [T, B, D] and ``time_span`` [T, B, 1]. Groups are named after the parameters they
    train (``head.weight.<j>`` for head j's rows, ``recurrent`` for R)."""

    form, block_size = "real", 1
    input_names = ("x", "time_span")

    def __init__(self, cell: CfCCell, input_size: int, units: int) -> None:
        self.cfc = cell
        n, D, m, k = cell.hidden_size, input_size, units, cell.num_heads
        groups: list[ParamGroup] = []
        self.columns: dict[str, int] = {}
        self.rows: dict[str, int] = {}

        def add(name: str, u: str, v: str | None = None, columns: int = 0, rows: int = 0) -> None:
            groups.append(ParamGroup(name, u=u, v=v, matrix=columns > 0, fan_out=rows > 0))
            if columns:
                self.columns[name] = columns
            if rows:
                self.rows[name] = rows

        if cell.backbone_layers > 0:
            add("input_weight", u="first_fanout", v="x", columns=D, rows=m)
            add("recurrent", u="first_fanout", v="h_prev", columns=n, rows=m)
            add("input_bias", u="first_fanout", rows=m)
            for i in range(cell.backbone_layers - 1):
                add(f"backbone.{i}.weight", u=f"fanout_{i}", v=f"backbone_input_{i}", columns=m, rows=m)
                add(f"backbone.{i}.bias", u=f"fanout_{i}", rows=m)
            for j in range(k):
                add(f"head.weight.{j}", u=f"slope_{j}", v="z", columns=m)
                add(f"head.bias.{j}", u=f"slope_{j}")
        else:
            for j in range(k):
                add(f"input_weight.{j}", u=f"slope_{j}", v="x", columns=D)
                add(f"recurrent.{j}", u=f"slope_{j}", v="h_prev", columns=n)
                add(f"input_bias.{j}", u=f"slope_{j}")
        if cell.mode == "pure":
            add("amplitude", u="d_amplitude")
            add("tau", u="d_tau")
        self.groups = tuple(groups)
        self.param_names = tuple(g.name for g in groups)
        self.check()

    def parameters_of(self, core: nn.Module) -> dict[str, Tensor]:
        """The tensors the groups train: views of the CfC core's parameters, and R formed from U and V."""
        cfc = self.cfc
        n, k = cfc.hidden_size, cfc.num_heads
        recurrent = core.recurrent_weight()
        if cfc.backbone_layers > 0:
            m = recurrent.shape[0]
            params = {"input_weight": core.input_weight, "recurrent": recurrent, "input_bias": core.input_bias}
            for i, layer in enumerate(core.backbone):
                params[f"backbone.{i}.weight"], params[f"backbone.{i}.bias"] = layer.weight, layer.bias
            head_weight, head_bias = core.head.weight.view(k, n, m), core.head.bias.view(k, n)
            for j in range(k):
                params[f"head.weight.{j}"], params[f"head.bias.{j}"] = head_weight[j], head_bias[j]
        else:
            input_weight, bias = core.input_weight.view(k, n, -1), core.input_bias.view(k, n)
            recurrent = recurrent.view(k, n, n)
            params = {}
            for j in range(k):
                params[f"input_weight.{j}"], params[f"recurrent.{j}"] = input_weight[j], recurrent[j]
                params[f"input_bias.{j}"] = bias[j]
        if cfc.mode == "pure":
            params["amplitude"], params["tau"] = core.amplitude, core.tau
        return params

    def weights(self, params: Mapping[str, Tensor]) -> Weights:
        """The cell's weights from the groups' tensors (the inverse of :meth:`parameters_of`)."""
        cfc, k = self.cfc, self.cfc.num_heads
        if cfc.backbone_layers > 0:
            backbone = [
                (params[f"backbone.{i}.weight"], params[f"backbone.{i}.bias"]) for i in range(cfc.backbone_layers - 1)
            ]
            head = (
                torch.cat([params[f"head.weight.{j}"] for j in range(k)]),
                torch.cat([params[f"head.bias.{j}"] for j in range(k)]),
            )
            first = (params["input_weight"], params["recurrent"], params["input_bias"])
        else:
            backbone, head = [], None
            names = ("input_weight", "recurrent", "input_bias")
            first = tuple(torch.cat([params[f"{name}.{j}"] for j in range(k)]) for name in names)
        return Weights(*first, backbone=backbone, head=head, amplitude=params.get("amplitude"), tau=params.get("tau"))

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # the input drive W_x x + b of all T steps as one matrix product
        w = self.weights(params)
        drive = torch.addmm(w.input_bias, inputs["x"].flatten(0, 1), w.input_weight.T)
        return {"drive": drive.view(*inputs["x"].shape[:2], -1), "x": inputs["x"], "time_span": inputs["time_span"]}

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        cfc, w = self.cfc, self.weights(params)
        n, k = cfc.hidden_size, cfc.num_heads
        dt = inputs["time_span"]
        h, layer_pre, layer_out, heads = cfc.step(w, inputs["drive"], h_prev, dt)
        if not coefficients:
            return h, None
        slopes, d_amplitude, d_tau = cfc.slopes(heads, dt, w)
        factors = {f"slope_{j}": slopes[:, j] for j in range(k)}
        factors.update(x=inputs["x"], h_prev=h_prev)
        if w.head is not None:
            m = w.recurrent.shape[0]
            factors["z"] = layer_out[-1]
            # Ĝ = ∂h'/∂z_L: unit i reads row j·n + i of every head
            fanout = (slopes.unsqueeze(-1) * w.head[0].view(k, n, m)).sum(1)
            for layer in range(cfc.backbone_layers - 1, -1, -1):
                fanout = fanout * cfc.activation_slope(layer_pre[layer]).unsqueeze(1)
                if layer == 0:
                    break
                factors[f"fanout_{layer - 1}"] = fanout
                factors[f"backbone_input_{layer - 1}"] = layer_out[layer - 1]
                fanout = fanout @ w.backbone[layer - 1][0]
            factors["first_fanout"] = fanout
            diagonal = (fanout * w.recurrent.T).sum(-1)  # D_ii = Σ_r Ĝ[i, r] R[r, i]
        else:
            diagonal = (slopes * torch.diagonal(w.recurrent.view(k, n, n), dim1=1, dim2=2)).sum(1)
        if d_amplitude is not None:
            factors["d_amplitude"], factors["d_tau"] = d_amplitude, d_tau
        return h, StepCoefficients(diagonal, factors)
