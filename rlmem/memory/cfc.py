"""Closed-form continuous-time cell (CfC) with low-rank, sparse recurrence: the ``cfc`` core.

The cell (Hasani et al., Nature MI 2022; the ncps formulation; ``rlmem.memory.cfc_cell``) maps h ∈ R^n
and x ∈ R^D through a first layer a = W_x x + R h + b (a ∈ R^m), a backbone of L layers and four
heads (one in ``pure`` mode) to h'. ncps starts the ``pure`` mode's w_τ at 0, where |·| has
subgradient 0 and w_τ would never move, so here it starts at 0.1.

**Time spans.** Δt = 1 unless the caller passes the spans: ``core(x, state, reset, time_span=dt)`` with
``dt`` of shape [T, B] (e.g. the difference of the env's time stamps).

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

At a fixed σ, lowering the rank or raising the sparsity shrinks the spectral radius as √r and
√(1 − s): the recurrence becomes more contractive and forgets faster. Two initialisations:

* ``recurrent_init: spectral`` (default): σ² = ρ* / √(n r (1 − s)) with ρ* = ``spectral_radius``, so
  every n×n block of R starts at spectral radius ≈ ρ* whatever r and s.
* ``recurrent_init: svd``: a dense Glorot-uniform matrix (ncps' initialiser) truncated to rank r by
  SVD, split evenly (U = U_r Σ_r^½, V = V_r Σ_r^½), then masked, so the spectral radius falls with r
  and s as above.

**Learning** (``grad``). The Jacobian D_t = ∂h_t/∂h_{t−1} is dense, so the cell is not one the engine
runs exactly:

* ``bptt``: autograd through the window (truncated BPTT).
* ``rtrl``: exact RTRL with one sensitivity per parameter, [B, n, *shape] (``rlmem.memory.cfc_rtrl``);
  ``rtrl_budget_mb`` caps their memory: beyond it the core refuses and names the cheaper modes.
* ``snap1``: SnAp-1 on the shared engine, A_t = diag(D_t) (``rlmem.memory.cfc_snap``).

The state is ``{"h": [B, n]}`` plus, in ``rtrl`` mode, one sensitivity per parameter,
``"sensitivity_<parameter>": [B, n, *shape]``, and in ``snap1`` mode one per engine group
(``"sensitivity_<group>"``, see ``SnapCell``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlmem.errors import ConfigError
from rlmem.memory.base import CoreOptions, State, register_core
from rlmem.memory.cfc_cell import ACTIVATIONS, MODES, CfCCell, Weights
from rlmem.memory.cfc_rtrl import CarriedSensitivity, advance_sensitivities, check_budget, record_step
from rlmem.memory.cfc_snap import SnapCell
from rlmem.memory.engine import (
    EngineCore,
    SensitivityLayout,
    carried_sensitivities,
    sensitivities_in,
    sensitivity_entries,
)

RECURRENT_INITS = ("spectral", "svd")
# ncps starts w_τ at 0, where d|w_τ|/dw_τ = 0 and w_τ would never learn; a small positive start does.
INITIAL_TAU = 0.1


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


@register_core("cfc", CfCOptions)
class CfCCore(EngineCore):
    """Closed-form continuous-time cell with low-rank sparse recurrence; exact RTRL, SnAp-1 or BPTT."""

    grad_modes = ("bptt", "rtrl", "snap1")
    engine_modes = ("snap1",)
    state_key = "h"

    def __init__(self, options: CfCOptions, input_size: int) -> None:
        n, D, L = options.hidden_size, input_size, options.backbone_layers
        cfc_cell = CfCCell(options.mode, n, L, options.backbone_activation)
        m = (options.backbone_units or n) if L > 0 else cfc_cell.num_heads * n
        super().__init__(options, input_size, SnapCell(cfc_cell, input_size, m) if options.grad == "snap1" else None)
        self.cfc_cell = cfc_cell
        self.mode = options.mode
        self.num_heads = cfc_cell.num_heads
        self.backbone_layers = L
        self.units = m
        max_rank = min(m, n)
        self.rank = options.rank if options.rank is not None else max_rank
        if self.rank > max_rank:
            raise ConfigError(
                f"memory.rank={self.rank} exceeds the full rank min(m, n) = {max_rank} of the recurrent "
                f"weights [m={m}, n={n}]; valid choices: 1..{max_rank} or null (full)"
            )
        self.sparsity = float(options.sparsity)

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

    def weights(self) -> Weights:
        """The cell's weights for one window (R formed once)."""
        return Weights(
            input_weight=self.input_weight,
            recurrent=self.recurrent_weight(),
            input_bias=self.input_bias,
            backbone=[(layer.weight, layer.bias) for layer in self.backbone],
            head=(self.head.weight, self.head.bias) if self.head is not None else None,
            amplitude=self.amplitude if self.mode == "pure" else None,
            tau=self.tau if self.mode == "pure" else None,
        )

    # ----------------------------------------------------------------------------------------------
    # EngineCore hooks (the engine runs ``snap1``)

    def recurrent_params(self) -> dict[str, Tensor]:
        return self.cell.parameters_of(self)

    def state_shape(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    def sensitivity_layout(self) -> SensitivityLayout:
        return SensitivityLayout(self.hidden_size, self.cell.columns, self.cell.rows)

    def zero_sensitivities(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        if self.grad != "rtrl":
            return super().zero_sensitivities(batch, device, dtype)
        self.check_budget(batch, dtype)
        return {
            name: torch.zeros(batch, self.hidden_size, *shape, device=device, dtype=dtype)
            for name, shape in sensitivity_entries({k: p.shape for k, p in self.named_parameters()}).items()
        }

    # ----------------------------------------------------------------------------------------------
    # Exact RTRL

    def sensitivity_floats(self) -> int:
        """n·p: floats of sensitivity per env in ``rtrl`` mode."""
        return self.hidden_size * sum(p.numel() for p in self.parameters())

    def check_budget(self, batch: int, dtype: torch.dtype) -> None:
        """Refuse ``rtrl`` sensitivities for ``batch`` envs above ``rtrl_budget_mb`` (ConfigError)."""
        if self.grad == "rtrl":
            check_budget(self.sensitivity_floats(), batch, dtype, self.options.rtrl_budget_mb)

    # ----------------------------------------------------------------------------------------------
    # The MemoryCore contract

    def forward(
        self, x: Tensor, state: State, reset: Tensor, time_span: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Run a window. ``x``: [T, B, D]; ``reset``: [T, B] bool; ``time_span``: [T, B] Δt or None (Δt = 1).

        Returns ``y`` [T, B, n] (the states h_1..h_T) and the detached state after the window.
        """
        T, B = x.shape[0], x.shape[1]
        if self.learns_online():  # snap1 on the engine
            span = x.new_ones(T, B, 1) if time_span is None else time_span.to(x.dtype).unsqueeze(-1)
            inputs = {"x": x, "time_span": span}
            y, sensitivities = self.run_recurrence(state["h"], inputs, self.recurrent_params(), reset, state)
            return y, self.window_state(y[-1], sensitivities)
        keep = (~reset).to(x.dtype)
        dts = None if time_span is None else time_span.to(x.dtype).unsqueeze(-1)
        learning = torch.is_grad_enabled() and self.grad == "rtrl"
        same_step = learning and self.encoder_grad == "same_step"
        h = state["h"]
        sens = sensitivities_in(state)
        if learning:
            self.check_budget(B, h.dtype)
            names, params = zip(*self.named_parameters())
            h = CarriedSensitivity.apply(h, [sens[k] for k in names], *params)
        w = self.weights()
        # the input drive W_x x + b of all T steps as one matrix product
        drive = torch.addmm(w.input_bias, (x.detach() if same_step else x).flatten(0, 1), w.input_weight.T)
        drive = drive.view(T, B, -1)
        if same_step:
            frozen = w.detached()
            twin_drive = torch.addmm(frozen.input_bias, x.flatten(0, 1), frozen.input_weight.T).view(T, B, -1)
        outputs, records = [], []
        for t in range(T):
            h_prev = h * keep[t].unsqueeze(-1)
            dt = None if dts is None else dts[t]
            h, layer_pre, layer_out, heads = self.cfc_cell.step(w, drive[t], h_prev, dt)
            if same_step:
                # the input sees only the same-step error: a twin of the step with the state and the
                # weights detached adds ∂h_t/∂x_t without changing the value
                twin = self.cfc_cell.step(frozen, twin_drive[t], h_prev.detach(), dt)[0]
                outputs.append(h + (twin - twin.detach()))
            else:
                outputs.append(h)
            if learning:
                records.append(record_step(w, x[t], h_prev, dt, layer_pre, layer_out, heads))
        y = torch.stack(outputs)
        if not learning:  # acting (no_grad) and bptt pass sensitivities through untouched
            return y, self.window_state(h, carried_sensitivities(state))
        with torch.no_grad():
            factors = (self.recurrent_u.detach(), self.recurrent_v.detach())
            advanced = advance_sensitivities(
                self.cfc_cell, w.detached(), records, keep, sens, factors, self.recurrent_mask, self.sparsity > 0
            )
        return y, self.window_state(h, sensitivity_entries(advanced))

    def state_metrics(self, state: State, buffers: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        metrics = {"h_norm": float(state["h"].norm(dim=1).mean())}
        sens = [v.flatten(1) for v in sensitivities_in(state).values()]
        if sens:
            metrics["sensitivity_norm"] = float(torch.cat(sens, dim=1).norm(dim=1).mean())
        return metrics

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mode={self.mode}, backbone={self.backbone_layers}x{self.units}, "
            f"rank={self.rank}, sparsity={self.sparsity:g}"
        )
