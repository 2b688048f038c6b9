"""The closed-form continuous-time cell (CfC; Hasani et al., Nature MI 2022, the ncps formulation).

With state h ∈ R^n, input x ∈ R^D and time span Δt of the step::

    a    = W_x x + R h + b                     the first layer reads [x; h];   a ∈ R^m
    z    = φ(W_L ⋯ φ(W_2 φ(a) + b_2) ⋯ + b_L)  a backbone of L layers of m units (L = 0: z = [x; h])
    p_j  = H_j z + c_j,  j ∈ {ff1, ff2, a, b}   heads, n units each (L = 0: the heads are the first layer)
    ff1 = tanh(p_ff1),  ff2 = tanh(p_ff2),  gate = σ(p_a · Δt + p_b)

    default:  h' = ff1 ⊙ (1 − gate) + gate ⊙ ff2
    no_gate:  h' = ff1 + gate ⊙ ff2
    pure:     h' = −A ⊙ exp(−Δt (|w_τ| + |p_ff1|)) ⊙ p_ff1 + A      (one head, no tanh; A, w_τ ∈ R^n)

``pure`` is the direct solution of the liquid time-constant ODE as ncps writes it. Δt = 1 unless the
caller passes the spans; only the gate sees Δt (and the decay in ``pure``).

The element-wise derivatives of h' with respect to the heads (:meth:`CfCCell.slopes`), with
ĝ = gate (1 − gate)::

    default:  ∂h'/∂p_ff1 = (1 − gate)(1 − ff1²)   ∂h'/∂p_ff2 = gate (1 − ff2²)
              ∂h'/∂p_a = Δt (ff2 − ff1) ĝ            ∂h'/∂p_b = (ff2 − ff1) ĝ
    no_gate:  ∂h'/∂p_ff1 = 1 − ff1²,  ∂h'/∂p_ff2 = gate (1 − ff2²),  ∂h'/∂p_a = Δt ff2 ĝ,  ∂h'/∂p_b = ff2 ĝ
    pure:     with d = exp(−Δt (|w_τ| + |p|)):   ∂h'/∂p = −A d (1 − Δt |p|),
              ∂h'/∂A = 1 − d p,   ∂h'/∂w_τ = A p d Δt sign(w_τ)

The weights of one window are a :class:`Weights`; the recurrent R = (U Vᵀ) ⊙ M is formed once per
window by the core (``rlmem.memory.cfc``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("default", "no_gate", "pure")


def _lecun_tanh(x: Tensor) -> Tensor:
    return 1.7159 * torch.tanh(0.666 * x)


def _lecun_tanh_slope(x: Tensor) -> Tensor:
    return (1.7159 * 0.666) * (1 - torch.tanh(0.666 * x).square())


def _silu_slope(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_slope(x: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    return cdf + x * torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi)


# name -> (φ, φ'), the backbone activations of ncps
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "lecun_tanh": (_lecun_tanh, _lecun_tanh_slope),
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x).square()),
    "relu": (torch.relu, lambda x: (x > 0).to(x.dtype)),
    "silu": (torch.nn.functional.silu, _silu_slope),
    "gelu": (torch.nn.functional.gelu, _gelu_slope),
}


@dataclass
class Weights:
    """The weights of one window."""

    input_weight: Tensor  # W_x [m, D]
    recurrent: Tensor  # R [m, n]
    input_bias: Tensor  # b [m]
    backbone: list[tuple[Tensor, Tensor]]  # (W_l [m, m], b_l [m]), l = 2..L
    head: tuple[Tensor, Tensor] | None  # (H [k·n, m], c [k·n]); None without backbone
    amplitude: Tensor | None  # A [n] (pure)
    tau: Tensor | None  # w_τ [n] (pure)

    def detached(self) -> Weights:
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return Weights(
            input_weight=self.input_weight.detach(),
            recurrent=self.recurrent.detach(),
            input_bias=self.input_bias.detach(),
            backbone=[(a.detach(), b.detach()) for a, b in self.backbone],
            head=None if self.head is None else (self.head[0].detach(), self.head[1].detach()),
            amplitude=d(self.amplitude),
            tau=d(self.tau),
        )


class CfCCell:
    """The step h' = F(h, x) of the module docstring, for a given mode and shape (no parameters)."""

    def __init__(self, mode: str, hidden_size: int, backbone_layers: int, activation: str) -> None:
        self.mode = mode
        self.hidden_size = hidden_size
        self.num_heads = 1 if mode == "pure" else 4
        self.backbone_layers = backbone_layers
        self.activation, self.activation_slope = ACTIVATIONS[activation]

    def step(
        self, w: Weights, drive: Tensor, h: Tensor, dt: Tensor | None
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """One step from the input drive W_x x + b [B, m] and h [B, n]; ``dt``: [B, 1] or None (Δt = 1).

        Returns (h' [B, n], the backbone pre-activations [B, m] for l = 1..L (the first is a), their
        outputs φ(pre) [B, m], the head pre-activations p [B, k, n])."""
        return self.above_first_layer(w, drive + h @ w.recurrent.T, dt)

    def above_first_layer(
        self, w: Weights, a: Tensor, dt: Tensor | None
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """From the first layer's pre-activation ``a`` [B, m] to h': (h', layer_pre, layer_out, heads)."""
        layer_pre, layer_out = [a], []
        if w.head is not None:
            z = self.activation(a)
            layer_out.append(z)
            for weight, bias in w.backbone:
                layer_pre.append(torch.addmm(bias, z, weight.T))
                z = self.activation(layer_pre[-1])
                layer_out.append(z)
            p = torch.addmm(w.head[1], z, w.head[0].T)
        else:
            p = a
        heads = p.view(p.shape[0], self.num_heads, self.hidden_size)
        return self.output(heads, dt, w), layer_pre, layer_out, heads

    def output(self, heads: Tensor, dt: Tensor | None, w: Weights) -> Tensor:
        """h' from the head pre-activations ``heads`` [B, k, n] (the mode equations)."""
        if self.mode == "pure":
            p = heads[:, 0]
            rate = w.tau.abs() + p.abs()
            decay = torch.exp(-(rate if dt is None else dt * rate))
            return w.amplitude - w.amplitude * decay * p
        ff1, ff2 = torch.tanh(heads[:, 0]), torch.tanh(heads[:, 1])
        gate = torch.sigmoid(heads[:, 2] * (1.0 if dt is None else dt) + heads[:, 3])
        if self.mode == "no_gate":
            return ff1 + gate * ff2
        return ff1 * (1 - gate) + gate * ff2

    def slopes(self, heads: Tensor, dt: Tensor | None, w: Weights) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """∂h'/∂p_j [B, k, n] and, in ``pure`` mode, ∂h'/∂A and ∂h'/∂w_τ [B, n] (element-wise)."""
        dt = 1.0 if dt is None else dt
        if self.mode == "pure":
            p = heads[:, 0]
            decay = torch.exp(-dt * (w.tau.abs() + p.abs()))
            d_p = -w.amplitude * decay * (1 - dt * p.abs())
            d_amplitude = 1 - decay * p
            d_tau = w.amplitude * p * decay * dt * torch.sign(w.tau)
            return d_p.unsqueeze(1), d_amplitude, d_tau
        ff1, ff2 = torch.tanh(heads[:, 0]), torch.tanh(heads[:, 1])
        gate = torch.sigmoid(heads[:, 2] * dt + heads[:, 3])
        gate_slope = gate * (1 - gate)
        if self.mode == "no_gate":
            d_ff1, d_ff2, d_gate = 1 - ff1.square(), gate * (1 - ff2.square()), ff2 * gate_slope
        else:
            d_ff1, d_ff2, d_gate = (1 - gate) * (1 - ff1.square()), gate * (1 - ff2.square()), (ff2 - ff1) * gate_slope
        return torch.stack([d_ff1, d_ff2, d_gate * dt, d_gate], dim=1), None, None
