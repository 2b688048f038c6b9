// The forward sensitivity kernels: S_0 → S_T over a window, equation (3) of rlmem/rtrl.py (``advance``),
// evaluated as recursion (1) stepped T times on a tile of S that stays in registers, so that S is read
// once and written once whatever T is:
//
//   S_t[b, e, :, j] = Ã_t[b, n] S_{t-1}[b, e, :, j] + u_t[b, e] v_t[b, j]          (1), n = e / R
//
// With errors e_t given, each step also adds ⟨e_t[b, n], S_t[b, e, :, j]⟩ to the thread's share of G,
// equation (2), which is the per-step form (T = 1) with gradient accumulation used by streaming
// learners. Shapes and layouts: sensitivity.h.

#include "common.cuh"

namespace rlmem {
namespace {

// ------------------------------------------------------------------------------------------------
// Matrix groups, S [B, NE, (k,) D].
//
// Grid: (ceil(NE / TE), ceil(D / TJ), ceil(B / b_per_block)); block: kThreadsX × kThreadsY.
// Block (x, y, z) owns rows e0 = TE·x .. +TE and columns j0 = TJ·y .. +TJ of S for envs
// b = b_per_block·z .. +b_per_block, one env after the other (b_per_block is 1 without errors;
// with errors, the block's envs are summed into its G tile before it is written).
// For each env and each chunk of kSteps steps, the block stages Ã_t and u_t of its TE rows, v_t of
// its TJ columns and e_t of its rows in shared memory (coalesced, one pass), then every thread
// advances its UPT × kColumnsPerThread entries of S through the chunk.
template <int FORM, int K, bool ERRORS>
__global__ void __launch_bounds__(kThreads)
    forward_matrix_kernel(int T, int B, int N, int R, int D, const float* __restrict__ jacobians,
                          const float* __restrict__ u, const float* __restrict__ v, const float* s0, float* s_out,
                          const float* __restrict__ errors, float* __restrict__ grad, int accumulate,
                          int b_per_block) {
  using U = Unit<FORM, K>;
  constexpr int UPT = units_per_thread(K);
  constexpr int TE = kThreadsY * UPT;
  constexpr int TJ = kTileColumns;
  constexpr int KA = U::kA;
  constexpr int KG = U::kG;

  __shared__ float a_s[kSteps][TE][KA];  // Ã_t[b, e / R] for the tile's rows
  __shared__ float u_s[kSteps][TE][K];   // u_t[b, e]
  __shared__ float v_s[kSteps][TJ];      // v_t[b, j]
  __shared__ float e_s[ERRORS ? kSteps : 1][TE][K];  // e_t[b, e / R]

  const int NE = N * R;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsX + tx;
  const int e0 = blockIdx.x * TE, j0 = blockIdx.y * TJ;
  const int b_begin = blockIdx.z * b_per_block;
  const int b_end = min(B, b_begin + b_per_block);

  float g[UPT][kColumnsPerThread][KG];
#pragma unroll
  for (int m = 0; m < UPT; ++m)
#pragma unroll
    for (int l = 0; l < kColumnsPerThread; ++l)
#pragma unroll
      for (int q = 0; q < KG; ++q) g[m][l][q] = 0.f;

  for (int b = b_begin; b < b_end; ++b) {
    // The thread's entries of S_0 (zero outside the tensor, never stored).
    float s[UPT][kColumnsPerThread][K];
#pragma unroll
    for (int m = 0; m < UPT; ++m) {
      const int e = e0 + ty + kThreadsY * m;
#pragma unroll
      for (int l = 0; l < kColumnsPerThread; ++l) {
        const int j = j0 + tx + kThreadsX * l;
        const bool inside = e < NE && j < D;
#pragma unroll
        for (int c = 0; c < K; ++c)
          s[m][l][c] = inside ? s0[s_offset<FORM, K>(static_cast<size_t>(b) * NE + e, c, j, D)] : 0.f;
      }
    }

    for (int t0 = 0; t0 < T; t0 += kSteps) {
      const int steps = min(kSteps, T - t0);
      __syncthreads();  // every thread is done with the previous chunk's coefficients
      for (int i = tid; i < steps * TE * KA; i += kThreads) {
        const int tt = i / (TE * KA), el = (i / KA) % TE, q = i % KA, e = e0 + el;
        a_s[tt][el][q] = e < NE ? jacobians[step_offset(t0 + tt, b, B, N, KA) + (e / R) * KA + q] : 0.f;
      }
      for (int i = tid; i < steps * TE * K; i += kThreads) {
        const int tt = i / (TE * K), el = (i / K) % TE, c = i % K, e = e0 + el;
        u_s[tt][el][c] = e < NE ? u[step_offset(t0 + tt, b, B, NE, K) + e * K + c] : 0.f;
        if constexpr (ERRORS) {
          e_s[tt][el][c] = e < NE ? errors[step_offset(t0 + tt, b, B, N, K) + (e / R) * K + c] : 0.f;
        }
      }
      for (int i = tid; i < steps * TJ; i += kThreads) {
        const int tt = i / TJ, jl = i % TJ, j = j0 + jl;
        v_s[tt][jl] = j < D ? v[step_offset(t0 + tt, b, B, D, 1) + j] : 0.f;
      }
      __syncthreads();

      for (int tt = 0; tt < steps; ++tt) {
#pragma unroll
        for (int m = 0; m < UPT; ++m) {
          const int el = ty + kThreadsY * m;  // the warp's threads share el: broadcast reads
          float a[KA], uu[K], ee[K];
#pragma unroll
          for (int q = 0; q < KA; ++q) a[q] = a_s[tt][el][q];
#pragma unroll
          for (int c = 0; c < K; ++c) {
            uu[c] = u_s[tt][el][c];
            if constexpr (ERRORS) ee[c] = e_s[tt][el][c];
          }
#pragma unroll
          for (int l = 0; l < kColumnsPerThread; ++l) {
            const float vv = v_s[tt][tx + kThreadsX * l];
            float y[K];
            U::apply(a, s[m][l], y);  // (1): Ã_t S_{t-1} + u_t v_t
#pragma unroll
            for (int c = 0; c < K; ++c) s[m][l][c] = fmaf(uu[c], vv, y[c]);
            if constexpr (ERRORS) {  // (2): ⟨e_t, S_t⟩
              float p[KG];
              U::inner(ee, s[m][l], p);
#pragma unroll
              for (int q = 0; q < KG; ++q) g[m][l][q] += p[q];
            }
          }
        }
      }
    }

#pragma unroll
    for (int m = 0; m < UPT; ++m) {
      const int e = e0 + ty + kThreadsY * m;
#pragma unroll
      for (int l = 0; l < kColumnsPerThread; ++l) {
        const int j = j0 + tx + kThreadsX * l;
        if (e < NE && j < D) {
#pragma unroll
          for (int c = 0; c < K; ++c) s_out[s_offset<FORM, K>(static_cast<size_t>(b) * NE + e, c, j, D)] = s[m][l][c];
        }
      }
    }
  }

  if constexpr (ERRORS) {
    // This block's share of G: grad[z, e, j, q] (a partial sum over its envs when the batch is split).
    float* out = grad + static_cast<size_t>(blockIdx.z) * NE * D * KG;
#pragma unroll
    for (int m = 0; m < UPT; ++m) {
      const int e = e0 + ty + kThreadsY * m;
#pragma unroll
      for (int l = 0; l < kColumnsPerThread; ++l) {
        const int j = j0 + tx + kThreadsX * l;
        if (e < NE && j < D) {
#pragma unroll
          for (int q = 0; q < KG; ++q) {
            const size_t at = (static_cast<size_t>(e) * D + j) * KG + q;
            out[at] = accumulate ? out[at] + g[m][l][q] : g[m][l][q];
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Vector groups, S [B, NE, (k)]: one sensitivity row e per thread, steps read straight from global
// memory (consecutive threads read consecutive rows). Grid: (ceil(NE / kVectorThreads),
// ceil(B / b_per_block)).
template <int FORM, int K, bool ERRORS>
__global__ void __launch_bounds__(kVectorThreads)
    forward_vector_kernel(int T, int B, int N, int R, int v_len, const float* __restrict__ jacobians,
                          const float* __restrict__ u, const float* __restrict__ v, const float* s0, float* s_out,
                          const float* __restrict__ errors, float* __restrict__ grad, int accumulate,
                          int b_per_block) {
  using U = Unit<FORM, K>;
  constexpr int KA = U::kA;
  constexpr int KG = U::kG;
  const int NE = N * R;
  const int e = blockIdx.x * kVectorThreads + threadIdx.x;
  if (e >= NE) return;
  const int n = e / R;
  const int b_begin = blockIdx.y * b_per_block;
  const int b_end = min(B, b_begin + b_per_block);

  float g[KG];
#pragma unroll
  for (int q = 0; q < KG; ++q) g[q] = 0.f;

  for (int b = b_begin; b < b_end; ++b) {
    const size_t row = static_cast<size_t>(b) * NE + e;
    float s[K];
#pragma unroll
    for (int c = 0; c < K; ++c) s[c] = s0[s_offset<FORM, K>(row, c, 0, 1)];
    for (int t = 0; t < T; ++t) {
      float a[KA], y[K];
#pragma unroll
      for (int q = 0; q < KA; ++q) a[q] = jacobians[step_offset(t, b, B, N, KA) + n * KA + q];
      const float vv = v_len > 0 ? v[step_offset(t, b, B, v_len, 1) + e % v_len] : 1.f;
      U::apply(a, s, y);
#pragma unroll
      for (int c = 0; c < K; ++c) s[c] = fmaf(u[step_offset(t, b, B, NE, K) + e * K + c], vv, y[c]);
      if constexpr (ERRORS) {
        float ee[K], p[KG];
#pragma unroll
        for (int c = 0; c < K; ++c) ee[c] = errors[step_offset(t, b, B, N, K) + n * K + c];
        U::inner(ee, s, p);
#pragma unroll
        for (int q = 0; q < KG; ++q) g[q] += p[q];
      }
    }
#pragma unroll
    for (int c = 0; c < K; ++c) s_out[s_offset<FORM, K>(row, c, 0, 1)] = s[c];
  }

  if constexpr (ERRORS) {
    float* out = grad + static_cast<size_t>(blockIdx.y) * NE * KG;
#pragma unroll
    for (int q = 0; q < KG; ++q) {
      const size_t at = static_cast<size_t>(e) * KG + q;
      out[at] = accumulate ? out[at] + g[q] : g[q];
    }
  }
}

template <int FORM, int K>
cudaError_t run_forward(int T, int B, int N, int R, int D, int v_len, const float* jacobians, const float* u,
                        const float* v, const float* s0, float* s_out, const float* errors, float* grad,
                        int accumulate, int splits, float* workspace, cudaStream_t stream) {
  const int NE = N * R;
  const bool with_errors = errors != nullptr;
  // Without errors every env is its own slice; with errors the batch is cut into ``splits`` slices
  // whose partial sums go to the workspace (or straight to grad for one slice).
  int b_per_block = with_errors ? ceil_div(B, splits < 1 ? 1 : splits) : 1;
  if (ceil_div(B, b_per_block) > 65535) b_per_block = ceil_div(B, 65535);
  const int slices = ceil_div(B, b_per_block);
  float* partial = with_errors && slices > 1 ? workspace : grad;
  const int partial_accumulate = slices > 1 ? 0 : accumulate;
  if (with_errors && partial == nullptr) return cudaErrorInvalidValue;

  if (D > 0) {
    const dim3 grid(ceil_div(NE, tile_rows(K)), ceil_div(D, kTileColumns), slices);
    if (grid.y > 65535) return cudaErrorInvalidConfiguration;
    const dim3 block(kThreadsX, kThreadsY);
    if (with_errors) {
      launch(forward_matrix_kernel<FORM, K, true>, grid, block, stream, T, B, N, R, D, jacobians, u, v, s0, s_out,
             errors, partial, partial_accumulate, b_per_block);
    } else {
      launch(forward_matrix_kernel<FORM, K, false>, grid, block, stream, T, B, N, R, D, jacobians, u, v, s0, s_out,
             errors, partial, partial_accumulate, b_per_block);
    }
  } else {
    const dim3 grid(ceil_div(NE, kVectorThreads), slices);
    const dim3 block(kVectorThreads);
    if (with_errors) {
      launch(forward_vector_kernel<FORM, K, true>, grid, block, stream, T, B, N, R, v_len, jacobians, u, v, s0, s_out,
             errors, partial, partial_accumulate, b_per_block);
    } else {
      launch(forward_vector_kernel<FORM, K, false>, grid, block, stream, T, B, N, R, v_len, jacobians, u, v, s0,
             s_out, errors, partial, partial_accumulate, b_per_block);
    }
  }
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || !with_errors || slices == 1) return status;
  const size_t count = static_cast<size_t>(NE) * (D > 0 ? D : 1) * Unit<FORM, K>::kG;
  return sum_splits(workspace, slices, count, grad, accumulate, stream);
}

}  // namespace
}  // namespace rlmem

extern "C" int rlmem_sensitivity_forward(int form, int k, int T, int B, int N, int rows, int columns, int v_len,
                                         const float* jacobians, const float* u, const float* v, const float* s0,
                                         float* s_out, const float* errors, float* grad, int accumulate, int splits,
                                         float* workspace, cudaStream_t stream) {
  using namespace rlmem;
  if (T < 1 || B < 1 || N < 1 || rows < 1 || columns < 0 || v_len < 0) return cudaErrorInvalidValue;
  if ((columns > 0 || v_len > 0) && v == nullptr) return cudaErrorInvalidValue;
  if (form == kBlock && k == 1) form = kReal;  // a 1 × 1 block is the real form
  if (rows > 1 && form != kReal) return cudaErrorInvalidValue;
#define RLMEM_FORWARD(FORM, K)                                                                                   \
  run_forward<FORM, K>(T, B, N, rows, columns, v_len, jacobians, u, v, s0, s_out, errors, grad, accumulate, splits, \
                       workspace, stream)
  switch (form) {
    case kReal:
      return RLMEM_FORWARD(kReal, 1);
    case kComplex:
      return k == 2 ? RLMEM_FORWARD(kComplex, 2) : cudaErrorInvalidValue;
    case kBlock:
      switch (k) {
        case 2:
          return RLMEM_FORWARD(kBlock, 2);
        case 3:
          return RLMEM_FORWARD(kBlock, 3);
        case 4:
          return RLMEM_FORWARD(kBlock, 4);
      }
  }
#undef RLMEM_FORWARD
  return cudaErrorInvalidValue;
}
