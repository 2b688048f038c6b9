// Pieces shared by the sensitivity kernels: the algebra of one unit form, the memory layouts of
// sensitivity.h, the tile sizes, and a launch helper.
#pragma once

#include <stddef.h>

#include "sensitivity.h"

namespace rlmem {

enum Form { kReal = 0, kComplex = 1, kBlock = 2 };

// ------------------------------------------------------------------------------------------------
// One state unit: K reals (real: 1; complex: (re, im); block: k components).
//
// A unit's Jacobian block Ã has kA reals (real: 1; complex: (re, im); block: k × k row-major) and a
// gradient entry kG reals (complex: the pair of conj(e)·S; otherwise 1).

template <int FORM, int K>
struct Unit {
  static constexpr int kA = FORM == kBlock ? K * K : K;
  static constexpr int kG = FORM == kComplex ? 2 : 1;

  // y = Ã x (y must not alias x): the action of recursion (1) on one unit's column of S.
  __device__ __forceinline__ static void apply(const float* a, const float* x, float* y) {
    if constexpr (FORM == kComplex) {
      y[0] = a[0] * x[0] - a[1] * x[1];
      y[1] = a[0] * x[1] + a[1] * x[0];
    } else {
#pragma unroll
      for (int r = 0; r < K; ++r) {
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < K; ++c) acc = fmaf(a[r * K + c], x[c], acc);
        y[r] = acc;
      }
    }
  }

  // y = Ãᵀ x (complex: conj(Ã) x): the adjoint's step in equation (4).
  __device__ __forceinline__ static void apply_transpose(const float* a, const float* x, float* y) {
    if constexpr (FORM == kComplex) {
      y[0] = a[0] * x[0] + a[1] * x[1];
      y[1] = a[0] * x[1] - a[1] * x[0];
    } else {
#pragma unroll
      for (int c = 0; c < K; ++c) {
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < K; ++r) acc = fmaf(a[r * K + c], x[r], acc);
        y[c] = acc;
      }
    }
  }

  // out = ⟨a, b⟩ over the unit's components (complex: conj(a) b as a real pair): equations (2), (4).
  __device__ __forceinline__ static void inner(const float* a, const float* b, float* out) {
    if constexpr (FORM == kComplex) {
      out[0] = a[0] * b[0] + a[1] * b[1];
      out[1] = a[0] * b[1] - a[1] * b[0];
    } else {
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < K; ++c) acc = fmaf(a[c], b[c], acc);
      out[0] = acc;
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Layouts of sensitivity.h. ``row`` = b·NE + e (env b, sensitivity row e); D = 1 and j = 0 for
// vector groups. Offsets are 64-bit: B·NE·D·k exceeds 2³¹ for large fan-out groups.

// S[b, e, c, j]: complex [B, N, D, 2] (pairs innermost); real and block [B, NE, k, D] (columns innermost).
template <int FORM, int K>
__device__ __forceinline__ size_t s_offset(size_t row, int c, int j, int D) {
  if constexpr (FORM == kComplex) {
    return (row * D + j) * 2 + c;
  } else {
    return (row * K + c) * D + j;
  }
}

// Ã_t[b, n] (kA reals), and e_t[b, n], δ_t[b, n], u_t[b, e] (K reals each).
__host__ __device__ __forceinline__ size_t step_offset(int t, int b, int B, int units, int width) {
  return ((static_cast<size_t>(t) * B + b) * units) * width;
}

// ------------------------------------------------------------------------------------------------
// Tiles of the matrix-group kernels. A thread block of kThreadsX × kThreadsY threads owns a tile of
// S (or of G) of TE sensitivity rows × TJ columns: thread (x, y) holds rows y + kThreadsY·m
// (m < units_per_thread) and columns x + kThreadsX·l (l < kColumnsPerThread), so that the 32 threads
// of a warp touch 32 consecutive columns of one row (coalesced loads and stores of S, one broadcast
// load of that row's coefficients). Per-step coefficients are staged in shared memory kSteps at a time.

constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kColumnsPerThread = 2;
constexpr int kTileColumns = kThreadsX * kColumnsPerThread;  // TJ = 64
constexpr int kSteps = 16;
// Vector groups (one column): one thread per sensitivity row, kVectorThreads rows per block.
constexpr int kVectorThreads = 256;

// Rows per thread: 4 for k ≤ 2 (TE = 32), 2 for k = 3, 4 (TE = 16), which keeps a thread's share of
// S and G, k reals per entry, within registers and the staged Jacobians within 48 KiB.
__host__ __device__ constexpr int units_per_thread(int k) { return k <= 2 ? 4 : 2; }
__host__ __device__ constexpr int tile_rows(int k) { return kThreadsY * units_per_thread(k); }

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Sum of ``splits`` partial gradients [splits, count] into ``grad`` [count] (reduce.cu).
cudaError_t sum_splits(const float* partial, int splits, size_t count, float* grad, int accumulate,
                       cudaStream_t stream);

#ifndef RLMEM_HOST_EMULATION
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
}
#endif

}  // namespace rlmem
