"""The base of the cores whose recurrence runs on the RTRL engine (``rlmem.rtrl``).

Such a core splits into its math and the bookkeeping every engine core shares. The math is the
core's own: an :class:`rlmem.rtrl.RTRLCell` (the step h_t = φ(m_t ⊙ h_{t-1}, x_t; θ), its Jacobian
blocks A_t and its injections u ⊗ v), the parameters θ by the cell's names, and the layers before and
after the recurrence. :class:`EngineCore` holds the rest:

* the state: ``{state_key: h [B, *state_shape]}``, plus in an engine mode (``engine_modes``, e.g.
  ``rtrl``) the sensitivities S^p of every group p under ``"sensitivity_<p>"``, each [B, N, ...] in
  the engine's state representation (``rlmem.rtrl.zero_sensitivities``);
* the branch on ``grad``: with gradients on in an engine mode the window runs through
  ``rlmem.rtrl.rtrl_window`` (h_1..h_T differentiable, S_T carried); otherwise (``bptt``, or acting
  under ``torch.no_grad()``) the cell runs with ordinary autograd and the sensitivities pass through
  untouched;
* resets: ``reset[t, b]`` zeroes h and S of env b before step t (the engine and ``run_cell`` apply the
  mask m_t inside the window);
* the carried state leaves a window detached.

Hooks a subclass provides: the class attributes ``state_key`` and ``engine_modes``, its
``RTRLCell`` (passed to ``EngineCore.__init__``), :meth:`recurrent_params`, :meth:`state_shape` and
:meth:`sensitivity_layout`; it writes ``forward`` from :meth:`run_recurrence` (or :meth:`run_cell`)
and its own input and output layers. A core may run its other modes its own way and keep the shared
state layout: FFM's ``bptt`` runs an associative scan (``rlmem.scan``), CfC's exact ``rtrl`` has a
dense Jacobian and carries one sensitivity per parameter (it overrides :meth:`zero_sensitivities`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from rlmem.memory.base import CoreOptions, MemoryCore, State
from rlmem.rtrl import RTRLCell, rtrl_window, run_cell, zero_sensitivities

SENSITIVITY = "sensitivity_"


def sensitivity_entries(by_group: Mapping[str, Tensor]) -> State:
    """State entries ``"sensitivity_<group>"`` from sensitivities keyed by group name."""
    return {SENSITIVITY + name: value for name, value in by_group.items()}


def sensitivities_in(state: State) -> dict[str, Tensor]:
    """The sensitivities a state carries, keyed by group name (the ``"sensitivity_"`` prefix removed)."""
    return {key[len(SENSITIVITY) :]: value for key, value in state.items() if key.startswith(SENSITIVITY)}


def carried_sensitivities(state: State) -> State:
    """The sensitivity entries of ``state`` as they are (what a window that does not learn passes on)."""
    return {key: value for key, value in state.items() if key.startswith(SENSITIVITY)}


class SensitivityLayout(NamedTuple):
    """The shapes of the engine's sensitivities (``rlmem.rtrl.zero_sensitivities``)."""

    units: int  # N
    columns: Mapping[str, int]  # D_p per matrix group
    rows: Mapping[str, int] | None = None  # R per fan-out group


class EngineCore(MemoryCore):
    """A memory core whose recurrence is an ``RTRLCell`` run by the RTRL engine (see the module docstring)."""

    grad_modes: ClassVar[tuple[str, ...]] = ("bptt", "rtrl")
    engine_modes: ClassVar[tuple[str, ...]] = ("rtrl",)  # the modes whose sensitivities the engine carries
    state_key: ClassVar[str] = "h"  # the name of h in the state

    def __init__(self, options: CoreOptions, input_size: int, cell: RTRLCell | None) -> None:
        """``cell``: the description the engine runs, validated here; None for a core whose engine
        mode is not selected (it then never reaches the engine)."""
        super().__init__(options, input_size)
        self.encoder_grad = options.encoder_grad
        if cell is not None:
            cell.check()
        self.cell = cell

    # ----------------------------------------------------------------------------------------------
    # Hooks

    def recurrent_params(self) -> dict[str, Tensor]:
        """θ by ``cell.param_names``. Default: the core's attributes of those names."""
        return {name: getattr(self, name) for name in self.cell.param_names}

    def state_shape(self) -> tuple[int, ...]:
        """The shape of h per env in the state, without the batch."""
        raise NotImplementedError

    def sensitivity_layout(self) -> SensitivityLayout:
        """The sizes of the sensitivities the engine carries for this core."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------
    # State

    def parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def zero_sensitivities(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        """S = 0 for ``batch`` envs as state entries; none outside the engine modes."""
        if self.grad not in self.engine_modes:
            return {}
        units, columns, rows = self.sensitivity_layout()
        return sensitivity_entries(zero_sensitivities(self.cell, batch, units, columns, device, dtype, rows))

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> State:
        dtype = dtype or self.parameter_dtype()
        state = {self.state_key: torch.zeros(batch, *self.state_shape(), device=device, dtype=dtype)}
        state.update(self.zero_sensitivities(batch, device, dtype))
        return state

    # ----------------------------------------------------------------------------------------------
    # The window

    def learns_online(self) -> bool:
        """True when this window advances the sensitivities: an engine mode with gradients on."""
        return self.grad in self.engine_modes and torch.is_grad_enabled()

    def run_cell(self, h0: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], reset: Tensor) -> Tensor:
        """h_1..h_T [T, B, ...] by the cell alone, differentiable by autograd (``bptt``, or acting)."""
        return run_cell(self.cell, h0, self.cell.prepare(inputs, params), params, reset)

    def run_recurrence(
        self, h0: Tensor, inputs: Mapping[str, Tensor], params: Mapping[str, Tensor], reset: Tensor, state: State
    ) -> tuple[Tensor, State]:
        """h_1..h_T [T, B, ...] from h_0 [B, ...] over a window, and the sensitivity entries after it.

        With :meth:`learns_online` the engine runs the window from the sensitivities ``state`` carries
        (exact RTRL gradients for ``params``); otherwise the cell runs by autograd and ``state``'s
        sensitivities pass through untouched. ``reset`` [T, B] zeroes h and S before a step."""
        if self.learns_online():
            h_seq, final = rtrl_window(self.cell, h0, sensitivities_in(state), inputs, params, reset, self.encoder_grad)
            return h_seq, sensitivity_entries(final)
        return self.run_cell(h0, inputs, params, reset), carried_sensitivities(state)

    def window_state(self, h_last: Tensor, sensitivities: State) -> State:
        """The state carried after a window: h_T (detached) and the sensitivity entries."""
        return {self.state_key: h_last.detach(), **sensitivities}
