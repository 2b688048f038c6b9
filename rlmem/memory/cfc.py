"""Closed-form continuous-time cell (CfC) with low-rank, sparse recurrence: the ``cfc`` core.

The cell (Hasani et al., Nature MI 2022; the ncps formulation). With state h ∈ R^n, input x ∈ R^D and
time span Δt of the step::

    a    = W_x x + R h + b                     the first layer reads [x; h];   a ∈ R^m
    z    = φ(W_L ⋯ φ(W_2 φ(a) + b_2) ⋯ + b_L)  a backbone of L layers of m units (L = 0: z = [x; h])
    p_j  = H_j z + c_j,  j ∈ {ff1, ff2, a, b}   heads, n units each (L = 0: the heads are the first layer)
    ff1 = tanh(p_ff1),  ff2 = tanh(p_ff2),  gate = σ(p_a · Δt + p_b)

    default:  h' = ff1 ⊙ (1 − gate) + gate ⊙ ff2
    no_gate:  h' = ff1 + gate ⊙ ff2
    pure:     h' = −A ⊙ exp(−Δt (|w_τ| + |p_ff1|)) ⊙ p_ff1 + A      (one head, no tanh; A, w_τ ∈ R^n)

``pure`` is the direct solution of the liquid time-constant ODE as ncps writes it; ncps starts w_τ at 0,
where |·| has subgradient 0 and w_τ would never move, so here it starts at 0.1.

**Time spans.** Δt = 1 unless the caller passes the spans: ``core(x, state, reset, time_span=dt)`` with
``dt`` of shape [T, B] (e.g. the difference of the env's time stamps). Only the gate sees Δt (and the
decay in ``pure``).

**Low-rank, sparse recurrence** (Tumma et al., ICLR 2024). The weights that act on h, R ∈ R^{m×n} (the
h-columns of the first layer; without backbone the four heads' h-blocks stacked, m = 4n), are

    R = (U Vᵀ) ⊙ M,    U ∈ R^{m×r},  V ∈ R^{n×r},  M_ij ~ Bernoulli(1 − s) fixed,

with rank r = ``rank`` and sparsity s = ``sparsity``. M is drawn once from its own generator
(``mask_seed``) and kept as a buffer, so it is saved and loaded with the model; it never learns.
r = min(m, n) and s = 0 give the dense cell. U and V hold (m + n)·r free parameters, 2·n·r in the
default square case (backbone of n units).

**Spectral radius at initialisation.** With U, V ~ N(0, σ²) and q = 1 − s, the entries of R have mean 0
and variance q·r·σ⁴. Split R = q·U Vᵀ + (U Vᵀ) ⊙ (M − q): the first term has rank r and its nonzero
eigenvalues are q·eig(Vᵀ U), where Vᵀ U is r×r with entries of variance n·σ⁴, so by the circular law
they fill a disc of radius q·σ²·√(n r); the second term has uncorrelated entries of variance
q(1 − q)·r·σ⁴ and a bulk of radius σ²·√(n r q (1 − q)). The variances add, so for a square block

    ρ(R) ≈ σ² · √(n · r · (1 − s)).

(Measured over 20 draws, n ∈ {32, 128}, r ≥ 2, s ∈ {0, 0.5, 0.9}: ρ / σ²√(n r q) ∈ [0.93, 1.18]; at
r = 1 the one eigenvalue vᵀu is Gaussian and the ratio is ≈ 0.8.) At a fixed σ, lowering the rank or
raising the sparsity shrinks the spectral radius as √r and √(1 − s): the recurrence becomes more
contractive and forgets faster. Two initialisations:

* ``recurrent_init: spectral`` (default): σ² = ρ* / √(n r (1 − s)) with ρ* = ``spectral_radius``, so
  every n×n block of R starts at spectral radius ≈ ρ* whatever r and s. This separates the effect of
  the connectivity from the effect of the gain.
* ``recurrent_init: svd``: the construction reported for Tumma et al.: a dense Glorot-uniform matrix
  (ncps' initialiser) truncated to rank r by SVD, split evenly (U = U_r Σ_r^½, V = V_r Σ_r^½), then
  masked, so the spectral radius falls with r and s as above. We could not confirm the paper's exact
  dense initialiser; the spectral init is the variance-preserving alternative with an explicit target.

**Learning** (``grad``). Write the step h_t = F(h_{t−1}, x_t; θ) and the sensitivities J_t = ∂h_t/∂θ
[B, n, p] (p parameters). They obey

    J_t = D_t J_{t−1} + I_t,    D_t = ∂F/∂h_{t−1} [B, n, n] (dense),   I_t = ∂F/∂θ (immediate),

with D_t zeroed for env b when it resets before step t. The parameter gradient of a loss with direct
errors e_t = ∂L/∂h_t is G = Σ_t e_tᵀ J_t.

* ``bptt``: autograd through the window (truncated BPTT).
* ``rtrl``: exact RTRL. Over a window of T steps the recursion has the closed form

      J_T = Φ_{T,0} J_0 + Σ_t Φ_{T,t} I_t,      Φ_{T,t} = D_T ⋯ D_{t+1},

  and G = μ_0ᵀ J_0 + Σ_t λ_tᵀ I_t with the adjoint λ_t = e_t + D_{t+1}ᵀ λ_{t+1}, μ_0 = D_1ᵀ λ_1.
  The second term of G is the within-window gradient that autograd computes; the first is injected at
  h_0 from the carried J_0. For J_T the window runs backwards once with the n rows of Φ_{T,t} as
  cotangents: pulling them back through step t yields Φ_{T,t} I_t (accumulated into J_T) and
  Φ_{T,t} D_t = Φ_{T,t−1}. Cost per env: O(n·p) per step plus O(n²·p) per window for Φ_{T,0} J_0
  (the per-step form, T = 1, costs O(n²·p)); the rank-r factors enter as outer products of size
  n·(m + n)·r when s = 0, and through the masked R (n·m·n per step, projected on U, V once per window)
  when s > 0. Memory: the sensitivities, n·p floats per env, plus the window's activations;
  constant in the episode length. ``rtrl_budget_mb`` caps n·p·B: beyond it the core refuses and names
  the cheaper modes.
* ``snap1``: SnAp-1 on the shared engine (``rlmem.rtrl``): D_t is replaced by its diagonal, so
  J̃_t = diag(D_t) J̃_{t−1} + I_t keeps the sparsity pattern of one step's injection. A head row feeds
  one unit, so its sensitivity is one float per parameter; with a backbone, the first-layer and
  backbone parameters reach every unit in one step and keep a sensitivity per unit (the engine's
  fan-out groups), with R = (U Vᵀ) ⊙ M tracked as one [m, n] matrix whose gradient reaches U and V by
  the chain rule. Cost O(n·m·(D + n) + k·n·m + (L − 1)·n·m²) per env and step, no O(n²·p) term;
  the inputs' window gradient uses the same diagonal adjoint. Exact when D_t is diagonal (no backbone
  and a diagonal mask on every head block).

The state is ``{"h": [B, n]}`` plus, in ``rtrl`` mode, one sensitivity tensor per parameter,
``"sensitivity.<name>": [B, n, *shape]``, and in ``snap1`` mode one per engine group
(``"sensitivity.<group>"``, see ``_SnapCell``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.memory.base import CoreOptions, MemoryCore, State, register_core
from rlmem.rtrl import ParamGroup, RTRLCell, StepCoefficients, rtrl_window, zero_sensitivities

MODES = ("default", "no_gate", "pure")
RECURRENT_INITS = ("spectral", "svd")
SENSITIVITY_PREFIX = "sensitivity."
# ncps starts w_τ at 0, where d|w_τ|/dw_τ = 0 and w_τ would never learn; a small positive start does.
INITIAL_TAU = 0.1


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
class CfCOptions(CoreOptions):
    """Options of the ``cfc`` core (see the module docstring for the cell and the recurrence)."""

    mode: str = "default"  # default | no_gate | pure
    backbone_layers: int = 1  # L; 0: the heads read [x; h] directly
    backbone_units: int | None = None  # m; None: hidden_size (a square recurrent block)
    backbone_activation: str = "lecun_tanh"  # lecun_tanh | tanh | relu | silu | gelu
    rank: int | None = None  # r of R = (U Vᵀ) ⊙ M; None: full rank
    sparsity: float = 0.0  # s: the fraction of recurrent connections M removes
    mask_seed: int = 0  # seed of the fixed mask M
    recurrent_init: str = "spectral"  # spectral | svd
    spectral_radius: float = 1.0  # target spectral radius of R at init (recurrent_init=spectral)
    rtrl_budget_mb: float = 1024.0  # grad=rtrl: most memory the sensitivities of a batch may take

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"mode": MODES, "backbone_activation": tuple(ACTIVATIONS), "recurrent_init": RECURRENT_INITS}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"memory.{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        if not _is_int(self.backbone_layers) or self.backbone_layers < 0:
            raise ConfigError(f"memory.backbone_layers must be an integer >= 0, got {self.backbone_layers!r}")
        for key in ("backbone_units", "rank"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ConfigError(f"memory.{key} must be a positive integer or null, got {value!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"memory.sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.spectral_radius, (int, float)) or not self.spectral_radius > 0:
            raise ConfigError(f"memory.spectral_radius must be positive, got {self.spectral_radius!r}")
        if not isinstance(self.rtrl_budget_mb, (int, float)) or not self.rtrl_budget_mb > 0:
            raise ConfigError(f"memory.rtrl_budget_mb must be positive, got {self.rtrl_budget_mb!r}")
        if not _is_int(self.mask_seed):
            raise ConfigError(f"memory.mask_seed must be an integer, got {self.mask_seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _Weights:
    """The weights of one window; R = (U Vᵀ) ⊙ M is formed once per window."""

    input_weight: Tensor  # W_x [m, D]
    recurrent: Tensor  # R [m, n]
    input_bias: Tensor  # b [m]
    backbone: list[tuple[Tensor, Tensor]]  # (W_l [m, m], b_l [m]), l = 2..L
    head: tuple[Tensor, Tensor] | None  # (H [k·n, m], c [k·n]); None without backbone
    amplitude: Tensor | None  # A [n] (pure)
    tau: Tensor | None  # w_τ [n] (pure)


@dataclass
class _StepRecord:
    """What one step leaves for the sensitivity pass (detached)."""

    x: Tensor  # [B, D]
    h: Tensor  # h_{t−1} after the reset [B, n]
    dt: Tensor | None  # [B, 1]
    layer_pre: list[Tensor]  # backbone pre-activations [B, m], l = 1..L (layer_pre[0] = a)
    layer_out: list[Tensor]  # backbone outputs φ(pre) [B, m], l = 1..L
    heads: Tensor  # head pre-activations p [B, k, n]


@register_core("cfc", CfCOptions)
class CfCCore(MemoryCore):
    """Closed-form continuous-time cell with low-rank sparse recurrence; exact RTRL, SnAp-1 or BPTT."""

    grad_modes = ("bptt", "rtrl", "snap1")

    def __init__(self, options: CfCOptions, input_size: int) -> None:
        super().__init__(options, input_size)
        n, D, L = self.hidden_size, input_size, options.backbone_layers
        self.mode = options.mode
        self.num_heads = 1 if options.mode == "pure" else 4
        self.backbone_layers = L
        self.units = (options.backbone_units or n) if L > 0 else self.num_heads * n
        m = self.units
        max_rank = min(m, n)
        self.rank = options.rank if options.rank is not None else max_rank
        if self.rank > max_rank:
            raise ConfigError(
                f"memory.rank={self.rank} exceeds the full rank min(m, n) = {max_rank} of the recurrent "
                f"weights [m={m}, n={n}]; valid choices: 1..{max_rank} or null (full)"
            )
        self.sparsity = float(options.sparsity)
        self.activation, self.activation_slope = ACTIVATIONS[options.backbone_activation]

        self.input_weight = nn.Parameter(torch.empty(m, D))
        self.recurrent_u = nn.Parameter(torch.empty(m, self.rank))
        self.recurrent_v = nn.Parameter(torch.empty(n, self.rank))
        self.input_bias = nn.Parameter(torch.zeros(m))
        self.backbone = nn.ModuleList(nn.Linear(m, m) for _ in range(max(L - 1, 0)))
        self.head = nn.Linear(m, self.num_heads * n) if L > 0 else None
        if self.mode == "pure":
            self.amplitude = nn.Parameter(torch.ones(n))
            self.tau = nn.Parameter(torch.full((n,), INITIAL_TAU))
        mask_generator = torch.Generator().manual_seed(options.mask_seed)
        mask = (torch.rand(m, n, generator=mask_generator) >= self.sparsity).float()
        self.register_buffer("recurrent_mask", mask)
        self._initialise(options)
        self.snap_cell = _SnapCell(self) if self.grad == "snap1" else None

    # ----------------------------------------------------------------------------------------------
    # Initialisation

    def _initialise(self, options: CfCOptions) -> None:
        n, D, m, r = self.hidden_size, self.input_size, self.units, self.rank
        rows_per_layer = m if self.backbone_layers > 0 else n  # ncps: one Linear per head without backbone
        glorot = math.sqrt(6.0 / (D + n + rows_per_layer))  # the first layer reads [x; h]
        with torch.no_grad():
            self.input_weight.uniform_(-glorot, glorot)
            for layer in self.backbone:
                nn.init.xavier_uniform_(layer.weight)
                layer.bias.zero_()
            if self.head is not None:
                bound = math.sqrt(6.0 / (m + n))
                self.head.weight.uniform_(-bound, bound)
                self.head.bias.zero_()
            if options.recurrent_init == "spectral":
                sigma = math.sqrt(options.spectral_radius / math.sqrt(n * r * (1.0 - self.sparsity)))
                self.recurrent_u.normal_(0.0, sigma)
                self.recurrent_v.normal_(0.0, sigma)
            else:
                dense = torch.empty(m, n).uniform_(-glorot, glorot)
                left, singular, right_t = torch.linalg.svd(dense, full_matrices=False)
                root = singular[:r].sqrt()
                self.recurrent_u.copy_(left[:, :r] * root)
                self.recurrent_v.copy_(right_t[:r].T * root)

    def recurrent_weight(self) -> Tensor:
        """R = (U Vᵀ) ⊙ M [m, n], the weights that act on the state."""
        return (self.recurrent_u @ self.recurrent_v.T) * self.recurrent_mask

    def _weights(self) -> _Weights:
        return _Weights(
            input_weight=self.input_weight,
            recurrent=self.recurrent_weight(),
            input_bias=self.input_bias,
            backbone=[(layer.weight, layer.bias) for layer in self.backbone],
            head=(self.head.weight, self.head.bias) if self.head is not None else None,
            amplitude=self.amplitude if self.mode == "pure" else None,
            tau=self.tau if self.mode == "pure" else None,
        )

    # ----------------------------------------------------------------------------------------------
    # The cell

    def _step(
        self, w: _Weights, drive: Tensor, x: Tensor, h: Tensor, dt: Tensor | None, record: bool
    ) -> tuple[Tensor, _StepRecord | None]:
        """One step h' = F(h, x). ``drive``: W_x x + b [B, m]; ``x``: [B, D] (kept for the sensitivities);
        ``h``: [B, n]; ``dt``: [B, 1] or None (Δt = 1)."""
        h_new, layer_pre, layer_out, heads = self._above_first_layer(w, drive + h @ w.recurrent.T, dt)
        if not record:
            return h_new, None
        return h_new, _StepRecord(
            x=x.detach(),
            h=h.detach(),
            dt=dt,
            layer_pre=[t.detach() for t in layer_pre] if w.head is not None else [],
            layer_out=[t.detach() for t in layer_out],
            heads=heads.detach(),
        )

    def _above_first_layer(
        self, w: _Weights, a: Tensor, dt: Tensor | None
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
        return self._cell(heads, dt, w), layer_pre, layer_out, heads

    def _cell(self, heads: Tensor, dt: Tensor | None, w: _Weights) -> Tensor:
        """h' from the head pre-activations ``heads`` [B, k, n] (the mode equations of the docstring)."""
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

    def _cell_slopes(
        self, heads: Tensor, dt: Tensor | None, w: _Weights
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
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

    def _pullback(
        self, w: _Weights, rec: _StepRecord, cot: Tensor
    ) -> tuple[dict[str, tuple[Tensor, Tensor | None]], Tensor, Tensor]:
        """Pull C cotangents ``cot`` [B, C, n] on h' back through one step (reverse mode, no autograd).

        Returns ``(pieces, cot_a, cot_h)``: ``pieces[name] = (rows [B, C, *rows], inputs [B, cols] | None)``
        so that cotᵀ ∂h'/∂θ = rows ⊗ inputs for a weight and = rows for a bias or an element-wise
        parameter; ``cot_a`` [B, C, m] is the cotangent on the first layer's pre-activation a (the
        recurrent factors are handled by the caller); ``cot_h`` [B, C, n] = cot · D (before the reset).
        """
        B, C, n = cot.shape
        slopes, d_amplitude, d_tau = self._cell_slopes(rec.heads, rec.dt, w)
        cot_heads = (cot.unsqueeze(2) * slopes.unsqueeze(1)).reshape(B, C, self.num_heads * n)
        pieces: dict[str, tuple[Tensor, Tensor | None]] = {}
        if self.mode == "pure":
            pieces["amplitude"] = (cot * d_amplitude.unsqueeze(1), None)
            pieces["tau"] = (cot * d_tau.unsqueeze(1), None)
        if w.head is None:
            cot_a = cot_heads
        else:
            pieces["head.weight"] = (cot_heads, rec.layer_out[-1])
            pieces["head.bias"] = (cot_heads, None)
            cot_z = cot_heads @ w.head[0]
            for layer in range(self.backbone_layers - 1, -1, -1):
                cot_pre = cot_z * self.activation_slope(rec.layer_pre[layer]).unsqueeze(1)
                if layer == 0:
                    break
                pieces[f"backbone.{layer - 1}.weight"] = (cot_pre, rec.layer_out[layer - 1])
                pieces[f"backbone.{layer - 1}.bias"] = (cot_pre, None)
                cot_z = cot_pre @ w.backbone[layer - 1][0]
            cot_a = cot_pre
        pieces["input_weight"] = (cot_a, rec.x)
        pieces["input_bias"] = (cot_a, None)
        return pieces, cot_a, cot_a @ w.recurrent

    # ----------------------------------------------------------------------------------------------
    # Exact RTRL over a window

    def sensitivity_floats(self) -> int:
        """n·p: floats of sensitivity per env in ``rtrl`` mode."""
        return self.hidden_size * sum(p.numel() for p in self.parameters())

    def _check_budget(self, batch: int, dtype: torch.dtype) -> None:
        if self.grad != "rtrl":
            return
        needed_mb = self.sensitivity_floats() * batch * torch.finfo(dtype).bits / 8 / 2**20
        budget = self.options.rtrl_budget_mb
        if needed_mb > budget:
            raise ConfigError(
                f"memory.grad=rtrl needs {needed_mb:.0f} MB of sensitivities (n·p = {self.sensitivity_floats()} "
                f"floats per env × {batch} envs), over memory.rtrl_budget_mb={budget:g}; use memory.grad=snap1 "
                f"(diagonal RTRL) or memory.grad=bptt, a smaller hidden_size/backbone_units/rank, fewer envs, "
                f"or raise memory.rtrl_budget_mb"
            )

    def _advance_sensitivities(self, w: _Weights, records: list[_StepRecord], keep: Tensor, sens: State) -> State:
        """J_T = Φ_{T,0} J_0 + Σ_t Φ_{T,t} I_t for the window (see the module docstring). ``keep``: [T, B].

        The backward sweep over the window collects each step's Φ_{T,t}-weighted injection factors;
        each weight's Σ_t is then one batched matrix product over t instead of T passes over J.
        """
        first = records[0].h
        B, n = first.shape[0], self.hidden_size
        new = {name: torch.zeros_like(s) for name, s in sens.items()}
        u, v = self.recurrent_u.detach(), self.recurrent_v.detach()
        rows_of: dict[str, list[Tensor]] = {}  # per weight: Φ_{T,t}-weighted rows [B, n, rows], t = T..1
        inputs_of: dict[str, list[Tensor]] = {}  # and the matching inputs [B, cols]
        cot = torch.eye(n, dtype=first.dtype, device=first.device).expand(B, n, n)  # Φ_{T,T} = I
        for t in range(len(records) - 1, -1, -1):
            rec = records[t]
            pieces, cot_a, cot_h = self._pullback(w, rec, cot)
            if self.sparsity > 0:
                # Σ_t Φ_{T,t} ∂F/∂R, projected on U and V once the window is summed
                pieces["recurrent"] = (cot_a, rec.h)
            else:
                # ∂a_i/∂U_ik = (Vᵀh)_k and ∂a_i/∂V_jk = U_ik h_j: outer products of the rank-r factors
                pieces["recurrent_u"] = (cot_a, rec.h @ v)
                pieces["recurrent_v.transposed"] = (cot_a @ u, rec.h)
            for name, (rows, inputs) in pieces.items():
                if inputs is None:
                    new[SENSITIVITY_PREFIX + name].add_(rows)
                else:
                    rows_of.setdefault(name, []).append(rows)
                    inputs_of.setdefault(name, []).append(inputs)
            cot = cot_h * keep[t].view(B, 1, 1).to(cot_h.dtype)  # Φ_{T,t−1} = Φ_{T,t} D̃_t
        for name, rows in rows_of.items():
            injected = torch.bmm(torch.stack(rows, dim=-1).flatten(1, 2), torch.stack(inputs_of[name], dim=1))
            injected = injected.view(B, n, rows[0].shape[-1], -1)  # [B, n, rows, cols]
            if name == "recurrent":
                masked = injected * self.recurrent_mask
                new[SENSITIVITY_PREFIX + "recurrent_u"] += masked @ v
                new[SENSITIVITY_PREFIX + "recurrent_v"] += masked.transpose(-1, -2) @ u
            elif name == "recurrent_v.transposed":
                new[SENSITIVITY_PREFIX + "recurrent_v"] += injected.transpose(-1, -2)
            else:
                new[SENSITIVITY_PREFIX + name] += injected
        for name, carried in sens.items():  # Φ_{T,0} J_0
            new[name].view(B, n, -1).baddbmm_(cot, carried.view(B, n, -1))
        return new

    # ----------------------------------------------------------------------------------------------
    # The MemoryCore contract

    def _named_sensitive_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.named_parameters())

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> State:
        dtype = dtype or self.input_weight.dtype
        state = {"h": torch.zeros(batch, self.hidden_size, device=device, dtype=dtype)}
        if self.grad == "rtrl":
            self._check_budget(batch, dtype)
            for name, param in self._named_sensitive_parameters():
                state[SENSITIVITY_PREFIX + name] = torch.zeros(
                    batch, self.hidden_size, *param.shape, device=device, dtype=dtype
                )
        elif self.snap_cell is not None:
            cell = self.snap_cell
            zeros = zero_sensitivities(cell, batch, self.hidden_size, cell.columns, device, dtype, rows=cell.rows)
            state.update({SENSITIVITY_PREFIX + name: value for name, value in zeros.items()})
        return state

    def forward(
        self, x: Tensor, state: State, reset: Tensor, time_span: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool; ``time_span``: [T, B] Δt or None (Δt = 1).

        Returns ``y`` [T, B, n] (the states h_1..h_T) and the detached state after the window.
        """
        T, B = x.shape[0], x.shape[1]
        if self.snap_cell is not None and torch.is_grad_enabled():
            return self._snap_window(x, state, reset, time_span)
        keep = (~reset).to(x.dtype)
        dts = None if time_span is None else time_span.to(x.dtype).unsqueeze(-1)
        learning = torch.is_grad_enabled() and self.grad == "rtrl"
        same_step = learning and self.options.encoder_grad == "same_step"
        h = state["h"]
        sens = {k: v for k, v in state.items() if k.startswith(SENSITIVITY_PREFIX)}
        if learning:
            self._check_budget(B, h.dtype)
            names, params = zip(*self._named_sensitive_parameters())
            h = _CarriedSensitivity.apply(h, [sens[SENSITIVITY_PREFIX + k] for k in names], *params)
        w = self._weights()
        # the input drive W_x x + b of all T steps as one matrix product
        drive = torch.addmm(w.input_bias, (x.detach() if same_step else x).flatten(0, 1), w.input_weight.T)
        drive = drive.view(T, B, -1)
        if same_step:
            frozen = _detached(w)
            twin_drive = torch.addmm(frozen.input_bias, x.flatten(0, 1), frozen.input_weight.T).view(T, B, -1)
        outputs, records = [], []
        for t in range(T):
            h_prev = h * keep[t].unsqueeze(-1)
            dt = None if dts is None else dts[t]
            h, rec = self._step(w, drive[t], x[t], h_prev, dt, record=learning)
            if same_step:
                # the input sees only the same-step error: a twin of the step with the state and the
                # weights detached adds ∂h_t/∂x_t without changing the value
                twin, _ = self._step(frozen, twin_drive[t], x[t], h_prev.detach(), dt, record=False)
                outputs.append(h + (twin - twin.detach()))
            else:
                outputs.append(h)
            if learning:
                records.append(rec)
        y = torch.stack(outputs)
        new_state = {"h": h.detach()}
        if learning:
            with torch.no_grad():
                new_state.update(self._advance_sensitivities(_detached(w), records, keep, sens))
        else:
            new_state.update(sens)  # acting (no_grad) and bptt pass sensitivities through untouched
        return y, new_state

    def _snap_window(self, x: Tensor, state: State, reset: Tensor, time_span: Tensor | None) -> tuple[Tensor, State]:
        """SnAp-1 over a window on the shared engine (``rlmem.rtrl.rtrl_window``)."""
        cell = self.snap_cell
        T, B = reset.shape
        span = x.new_ones(T, B, 1) if time_span is None else time_span.to(x.dtype).unsqueeze(-1)
        sensitivities = {g.name: state[SENSITIVITY_PREFIX + g.name] for g in cell.groups}
        y, final = rtrl_window(
            cell,
            state["h"],
            sensitivities,
            {"x": x, "time_span": span},
            cell.parameters_of(self),
            reset,
            encoder_grad=self.options.encoder_grad,
        )
        new_state = {"h": y[-1].detach()}
        new_state.update({SENSITIVITY_PREFIX + name: value for name, value in final.items()})
        return y, new_state

    def state_metrics(self, state: State) -> dict[str, float]:
        metrics = {"h_norm": float(state["h"].norm(dim=1).mean())}
        sens = [v.flatten(1) for k, v in state.items() if k.startswith(SENSITIVITY_PREFIX)]
        if sens:
            metrics["sensitivity_norm"] = float(torch.cat(sens, dim=1).norm(dim=1).mean())
        return metrics

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mode={self.mode}, backbone={self.backbone_layers}x{self.units}, "
            f"rank={self.rank}, sparsity={self.sparsity:g}"
        )


class _SnapCell(RTRLCell):
    """The CfC step in the engine's form, with A_t = diag(D_t): SnAp-1 (see ``rlmem.rtrl``).

    Units are the n state units (k = 1). Row j·n + i of a head's weights feeds unit i only, so the
    head parameters (and, without backbone, the first layer's rows) are ordinary groups with
    injection u = ∂h'/∂p_j (one group per head). With a backbone, every first-layer and backbone
    parameter reaches all units through the heads: fan-out groups whose injection is
    Ĝ^l = ∂h'/∂pre_l [B, n, m], so each unit keeps a sensitivity to the whole backbone. The recurrent
    weights are tracked as R = (U Vᵀ) ⊙ M (one [m, n] group), and U, V receive their gradient
    through R by the chain rule.

    Cost per env and step: O(k·n·m) for the heads, O(n·m·(D + n + 1)) for the first layer and
    O(n·m²) per further backbone layer (against O(n·p) and O(n²·p) per window for exact RTRL);
    memory: the head parameters plus n times the backbone parameters (with R as m·n), or, without
    backbone, one float per parameter (R counted as k·n·n).
    """

    form, block_size = "real", 1
    input_names = ("x", "time_span")

    def __init__(self, core: CfCCore) -> None:
        self.core = core
        n, D, m, k = core.hidden_size, core.input_size, core.units, core.num_heads
        groups: list[ParamGroup] = []
        self.columns: dict[str, int] = {}
        self.rows: dict[str, int] = {}

        def add(name: str, u: str, v: str | None = None, columns: int = 0, rows: int = 0) -> None:
            groups.append(ParamGroup(name, u=u, v=v, matrix=columns > 0, fan_out=rows > 0))
            if columns:
                self.columns[name] = columns
            if rows:
                self.rows[name] = rows

        if core.backbone_layers > 0:
            add("input_weight", u="first_fanout", v="x", columns=D, rows=m)
            add("recurrent", u="first_fanout", v="h_prev", columns=n, rows=m)
            add("input_bias", u="first_fanout", rows=m)
            for i in range(core.backbone_layers - 1):
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
        if core.mode == "pure":
            add("amplitude", u="d_amplitude")
            add("tau", u="d_tau")
        self.groups = tuple(groups)
        self.param_names = tuple(g.name for g in groups)
        self.check()

    def parameters_of(self, core: CfCCore) -> dict[str, Tensor]:
        """The tensors the groups train: views of the core's parameters, and R formed from U and V."""
        n, m, k = core.hidden_size, core.units, core.num_heads
        recurrent = core.recurrent_weight()
        if core.backbone_layers > 0:
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
        if core.mode == "pure":
            params["amplitude"], params["tau"] = core.amplitude, core.tau
        return params

    def _weights(self, params: Mapping[str, Tensor]) -> _Weights:
        core, k = self.core, self.core.num_heads
        if core.backbone_layers > 0:
            backbone = [
                (params[f"backbone.{i}.weight"], params[f"backbone.{i}.bias"]) for i in range(len(core.backbone))
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
        return _Weights(*first, backbone=backbone, head=head, amplitude=params.get("amplitude"), tau=params.get("tau"))

    def prepare(self, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # the input drive W_x x + b of all T steps as one matrix product
        w = self._weights(params)
        drive = torch.addmm(w.input_bias, inputs["x"].flatten(0, 1), w.input_weight.T)
        return {"drive": drive.view(*inputs["x"].shape[:2], -1), "x": inputs["x"], "time_span": inputs["time_span"]}

    def step(
        self, h_prev: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], coefficients: bool
    ) -> tuple[Tensor, StepCoefficients | None]:
        core, w = self.core, self._weights(params)
        n, m, k = core.hidden_size, core.units, core.num_heads
        dt = inputs["time_span"]
        h, layer_pre, layer_out, heads = core._above_first_layer(w, inputs["drive"] + h_prev @ w.recurrent.T, dt)
        if not coefficients:
            return h, None
        slopes, d_amplitude, d_tau = core._cell_slopes(heads, dt, w)
        factors = {f"slope_{j}": slopes[:, j] for j in range(k)}
        factors.update(x=inputs["x"], h_prev=h_prev)
        if w.head is not None:
            factors["z"] = layer_out[-1]
            # Ĝ = ∂h'/∂z_L: unit i reads row j·n + i of every head
            fanout = (slopes.unsqueeze(-1) * w.head[0].view(k, n, m)).sum(1)
            for layer in range(core.backbone_layers - 1, -1, -1):
                fanout = fanout * core.activation_slope(layer_pre[layer]).unsqueeze(1)
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


def _detached(w: _Weights) -> _Weights:
    def d(t):
        return None if t is None else t.detach()

    return _Weights(
        input_weight=w.input_weight.detach(),
        recurrent=w.recurrent.detach(),
        input_bias=w.input_bias.detach(),
        backbone=[(a.detach(), b.detach()) for a, b in w.backbone],
        head=None if w.head is None else (w.head[0].detach(), w.head[1].detach()),
        amplitude=d(w.amplitude),
        tau=d(w.tau),
    )


class _CarriedSensitivity(torch.autograd.Function):
    """h_0 as a function of θ through the carried sensitivities J_0 = ∂h_0/∂θ.

    Forward returns h_0 unchanged; backward maps the cotangent μ_0 [B, n] on h_0 to Σ_b μ_0[b]ᵀ J_0[b]
    on each parameter: the part of the exact gradient that reaches back before the window.
    """

    @staticmethod
    def forward(ctx, h0: Tensor, sensitivities: list[Tensor], *params: Tensor) -> Tensor:
        ctx.sensitivities = sensitivities
        return h0.clone()

    @staticmethod
    def backward(ctx, grad_h0: Tensor):
        B, n = grad_h0.shape
        grads = [
            (grad_h0.unsqueeze(1) @ s.view(B, n, -1)).sum(0).view(s.shape[2:]) for s in ctx.sensitivities
        ]
        return grad_h0, None, *grads
