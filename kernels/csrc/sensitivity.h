// The C interface of the sensitivity kernels: raw float32 device pointers, no torch types, so that
// the .cu files compile with nvcc alone and any binding (binding.cpp, or a plain C caller) can use them.
//
// The kernels evaluate the recursion of rlmem/rtrl.py (see its module docstring for equations (1)-(4)):
//
//   S_t = Ã_t S_{t-1} + u_t ⊗ v_t                                      (1)   Ã_t = m_t A_t (reset mask applied)
//   G   = Σ_t Σ_b ⟨e_t, S_t⟩                                            (2)
//   S_T = Φ_0 S_0 + Σ_t Φ_t (u_t ⊗ v_t)                                  (3)   ``advance``
//   G   = Σ_t Σ_b ⟨δ_t, u_t⟩ v_t + Σ_b ⟨Ã_1ᵀ δ_1, S_0⟩,  δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1}   (4)   ``gradients``
//
// for one parameter group p at a time.
//
// Unit forms (``form``) and block size ``k`` (reals per state unit):
//   0 real     k = 1
//   1 complex  k = 2, every complex number stored as a real pair (re, im)
//   2 block    k = 1..4, general k × k Jacobian blocks
//
// Shapes (row-major, contiguous, float32). T steps, B envs, N state units, R sensitivity rows per unit
// (R > 1 only for fan-out groups, real form; 1 otherwise), NE = N·R, D = ``columns``:
//   jacobians  Ã      real [T, B, N]        complex [T, B, N, 2]      block [T, B, N, k, k]
//   u                 real [T, B, NE]       complex [T, B, N, 2]      block [T, B, N, k]
//   v                 matrix groups (D > 0): [T, B, D]; vector groups (D = 0): [T, B, v_len] read at
//                     index e mod v_len for sensitivity row e (v_len = NE, or R for fan-out groups),
//                     or NULL with v_len = 0 for v = 1
//   S                 matrix: real [B, NE, D]   complex [B, N, D, 2]   block [B, N, k, D]
//                     vector: real [B, NE]      complex [B, N, 2]      block [B, N, k]
//   errors e, δ       real [T, B, N]        complex [T, B, N, 2]      block [T, B, N, k]
//   grad              per sensitivity row, summed over b (and t):
//                     matrix: real/block [NE, D], complex [NE, D, 2]; vector: real/block [NE], complex [NE, 2]
//                     (complex: Σ conj(e)·S as a real pair; a fan-out group's caller sums the N units)
//
// Every function returns a cudaError_t value (0: success) and only enqueues work on ``stream``.
#pragma once

#include <stddef.h>

#ifndef RLMEM_HOST_EMULATION
#include <cuda_runtime_api.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

// How many slices of the batch a gradient reduction is split into (1 .. B) so that a device with
// ``multiprocessors`` SMs has enough thread blocks; the caller passes a workspace of
// splits · (gradient size) floats when this is above 1.
int rlmem_gradient_splits(int form, int k, int B, int N, int rows, int columns, int multiprocessors);

// Equation (3), or (1) stepped T times, with the tile of S kept in registers: reads s0 once, writes
// s_out once (s_out may be s0: the update is in place). With ``errors`` non-NULL it also accumulates
// equation (2) over the window's steps, Σ_t Σ_b ⟨e_t, S_t⟩, into ``grad`` (added to it when
// ``accumulate``, else written); this is the per-step form of streaming learners when T = 1.
int rlmem_sensitivity_forward(int form, int k, int T, int B, int N, int rows, int columns, int v_len,
                              const float* jacobians, const float* u, const float* v, const float* s0,
                              float* s_out, const float* errors, float* grad, int accumulate, int splits,
                              float* workspace, cudaStream_t stream);

// Equation (4): the window's gradient from the adjoint δ (see rlmem_adjoint), without forming any S_t.
// ``s0`` NULL leaves out the S_0 term (a later chunk of a window); ``jacobians`` is read for Ã_1 only.
int rlmem_sensitivity_gradient(int form, int k, int T, int B, int N, int rows, int columns, int v_len,
                               const float* jacobians, const float* adjoint, const float* u, const float* v,
                               const float* s0, float* grad, int accumulate, int splits, float* workspace,
                               cudaStream_t stream);

// The adjoint of equation (4): δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1}, δ_T = e_T, over t = T..1.
int rlmem_adjoint(int form, int k, int T, int B, int N, const float* jacobians, const float* errors, float* adjoint,
                  cudaStream_t stream);

#ifdef __cplusplus
}
#endif
