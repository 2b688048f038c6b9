"""CUDA kernels for the sensitivity recursion; ``rlmem/rtrl.py`` holds their PyTorch oracle.

Three kernels cover the engine's equations for every unit form (real, complex, k × k blocks up to
k = 4) and group kind (matrix, vector, fan-out), in float32:

* window forward, S_0 → S_T (equation (3), the engine's ``advance``), with each tile of S kept in
  registers across the window's steps; with errors it also accumulates Σ_t Σ_b ⟨e_t, S_t⟩, which at
  T = 1 is the per-step update with gradient of streaming learners (:func:`ops.step`);
* window gradient from the adjoint (equation (4), the engine's ``gradients``), which reads S_0 once
  and forms no S_t;
* the adjoint δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1}.

The engine dispatches to them by itself for CUDA tensors when :func:`available` is True (functions
:func:`advance`, :func:`gradients`, :func:`adjoint` take the engine's arguments), so every core on
the engine uses them on a GPU with no change to its code. ``RLMEM_KERNELS=0`` turns them off;
``rlmem kernels build`` compiles them ahead of the first run (:func:`build_command`). This package
imports only torch, never ``rlmem``.
"""

from kernels.engine import adjoint, advance, gradients
from kernels.loader import ENV_VAR, available, build_command, enabled, load, unavailable_reason

__all__ = [
    "ENV_VAR",
    "adjoint",
    "advance",
    "available",
    "build_command",
    "enabled",
    "gradients",
    "load",
    "unavailable_reason",
]
