// The backward sensitivity kernels: equation (4) of rlmem/rtrl.py (``gradients`` and the adjoint),
//
//   δ_t = e_t + Ã_{t+1}ᵀ δ_{t+1},  δ_T = e_T                                                    (adjoint)
//   G[e, j] = Σ_b Σ_t ⟨δ_t[b, n], u_t[b, e]⟩ v_t[b, j]  +  Σ_b ⟨Ã_1[b, n]ᵀ δ_1[b, n], S_0[b, e, :, j]⟩,  n = e / R
//
// which equals Σ_t Σ_b ⟨e_t, S_t⟩ (equation (2)) without forming any S_t: the window's only pass over
// a sensitivity-sized tensor is the one read of S_0. Shapes and layouts: sensitivity.h.

#include "common.cuh"

namespace rlmem {
namespace {

// ------------------------------------------------------------------------------------------------
// The adjoint: one thread per (b, n), walking the window backwards; consecutive threads take
// consecutive units, so each step's loads and stores are coalesced. Grid: ceil(B·N / 256).
template <int FORM, int K>
__global__ void __launch_bounds__(kVectorThreads)
    adjoint_kernel(int T, int B, int N, const float* __restrict__ jacobians, const float* __restrict__ errors,
                   float* __restrict__ adjoint) {
  using U = Unit<FORM, K>;
  constexpr int KA = U::kA;
  const long long index = static_cast<long long>(blockIdx.x) * kVectorThreads + threadIdx.x;
  if (index >= static_cast<long long>(B) * N) return;
  const int b = static_cast<int>(index / N), n = static_cast<int>(index % N);

  float d[K];
  size_t at = step_offset(T - 1, b, B, N, K) + n * K;
#pragma unroll
  for (int c = 0; c < K; ++c) {
    d[c] = errors[at + c];
    adjoint[at + c] = d[c];
  }
  for (int t = T - 2; t >= 0; --t) {
    float a[KA], y[K];
#pragma unroll
    for (int q = 0; q < KA; ++q) a[q] = jacobians[step_offset(t + 1, b, B, N, KA) + n * KA + q];
    U::apply_transpose(a, d, y);
    at = step_offset(t, b, B, N, K) + n * K;
#pragma unroll
    for (int c = 0; c < K; ++c) {
      d[c] = errors[at + c] + y[c];
      adjoint[at + c] = d[c];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Matrix groups: G [NE, D(, 2)] as a reduction over the rows (t, b) of rank-one terms w ⊗ v with
// w[e] = ⟨δ_t[b, n], u_t[b, e]⟩, plus the S_0 term.
//
// Same tiles as forward_matrix_kernel: block (x, y, z) owns G[e0 .. e0 + TE, j0 .. j0 + TJ] for the
// envs of slice z and keeps it in registers. For each env and chunk of kSteps steps it stages w (TE
// values per step, computed while staging) and v (TJ values per step) in shared memory; each thread
// then adds the outer products onto its UPT × kColumnsPerThread entries. After the env's steps it
// adds ⟨Ã_1ᵀ δ_1, S_0⟩ for its entries (the env's only read of S_0). Partial sums per slice are
// written to ``grad`` + z · |G| and summed by sum_splits.
template <int FORM, int K>
__global__ void __launch_bounds__(kThreads)
    gradient_matrix_kernel(int T, int B, int N, int R, int D, const float* __restrict__ jacobians,
                           const float* __restrict__ adjoint, const float* __restrict__ u,
                           const float* __restrict__ v, const float* __restrict__ s0, float* __restrict__ grad,
                           int accumulate, int b_per_block) {
  using U = Unit<FORM, K>;
  constexpr int UPT = units_per_thread(K);
  constexpr int TE = kThreadsY * UPT;
  constexpr int TJ = kTileColumns;
  constexpr int KA = U::kA;
  constexpr int KG = U::kG;

  __shared__ float w_s[kSteps][TE][KG];  // ⟨δ_t[b, e / R], u_t[b, e]⟩
  __shared__ float v_s[kSteps][TJ];      // v_t[b, j]

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
    for (int t0 = 0; t0 < T; t0 += kSteps) {
      const int steps = min(kSteps, T - t0);
      __syncthreads();  // every thread is done with the previous chunk
      for (int i = tid; i < steps * TE; i += kThreads) {
        const int tt = i / TE, el = i % TE, e = e0 + el;
        float w[KG];
        if (e < NE) {
          float dd[K], uu[K];
#pragma unroll
          for (int c = 0; c < K; ++c) {
            dd[c] = adjoint[step_offset(t0 + tt, b, B, N, K) + (e / R) * K + c];
            uu[c] = u[step_offset(t0 + tt, b, B, NE, K) + e * K + c];
          }
          U::inner(dd, uu, w);
        } else {
#pragma unroll
          for (int q = 0; q < KG; ++q) w[q] = 0.f;
        }
#pragma unroll
        for (int q = 0; q < KG; ++q) w_s[tt][el][q] = w[q];
      }
      for (int i = tid; i < steps * TJ; i += kThreads) {
        const int tt = i / TJ, jl = i % TJ, j = j0 + jl;
        v_s[tt][jl] = j < D ? v[step_offset(t0 + tt, b, B, D, 1) + j] : 0.f;
      }
      __syncthreads();

      for (int tt = 0; tt < steps; ++tt) {
#pragma unroll
        for (int m = 0; m < UPT; ++m) {
          float w[KG];
#pragma unroll
          for (int q = 0; q < KG; ++q) w[q] = w_s[tt][ty + kThreadsY * m][q];
#pragma unroll
          for (int l = 0; l < kColumnsPerThread; ++l) {
            const float vv = v_s[tt][tx + kThreadsX * l];
#pragma unroll
            for (int q = 0; q < KG; ++q) g[m][l][q] = fmaf(w[q], vv, g[m][l][q]);
          }
        }
      }
    }

    if (s0 != nullptr) {  // Σ_b ⟨Ã_1ᵀ δ_1, S_0⟩
#pragma unroll
      for (int m = 0; m < UPT; ++m) {
        const int e = e0 + ty + kThreadsY * m;
        if (e >= NE) continue;
        const int n = e / R;
        float a[KA], dd[K], carried[K];
#pragma unroll
        for (int q = 0; q < KA; ++q) a[q] = jacobians[step_offset(0, b, B, N, KA) + n * KA + q];
#pragma unroll
        for (int c = 0; c < K; ++c) dd[c] = adjoint[step_offset(0, b, B, N, K) + n * K + c];
        U::apply_transpose(a, dd, carried);
#pragma unroll
        for (int l = 0; l < kColumnsPerThread; ++l) {
          const int j = j0 + tx + kThreadsX * l;
          if (j >= D) continue;
          float s[K], p[KG];
#pragma unroll
          for (int c = 0; c < K; ++c) s[c] = s0[s_offset<FORM, K>(static_cast<size_t>(b) * NE + e, c, j, D)];
          U::inner(carried, s, p);
#pragma unroll
          for (int q = 0; q < KG; ++q) g[m][l][q] += p[q];
        }
      }
    }
  }

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

// ------------------------------------------------------------------------------------------------
// Vector groups: G [NE(, 2)], one sensitivity row per thread, summing over its slice's envs and all
// steps. Grid: (ceil(NE / kVectorThreads), slices).
template <int FORM, int K>
__global__ void __launch_bounds__(kVectorThreads)
    gradient_vector_kernel(int T, int B, int N, int R, int v_len, const float* __restrict__ jacobians,
                           const float* __restrict__ adjoint, const float* __restrict__ u,
                           const float* __restrict__ v, const float* __restrict__ s0, float* __restrict__ grad,
                           int accumulate, int b_per_block) {
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
    for (int t = 0; t < T; ++t) {
      float dd[K], uu[K], w[KG];
#pragma unroll
      for (int c = 0; c < K; ++c) {
        dd[c] = adjoint[step_offset(t, b, B, N, K) + n * K + c];
        uu[c] = u[step_offset(t, b, B, NE, K) + e * K + c];
      }
      U::inner(dd, uu, w);
      const float vv = v_len > 0 ? v[step_offset(t, b, B, v_len, 1) + e % v_len] : 1.f;
#pragma unroll
      for (int q = 0; q < KG; ++q) g[q] = fmaf(w[q], vv, g[q]);
    }
    if (s0 != nullptr) {
      float a[KA], dd[K], carried[K], s[K], p[KG];
#pragma unroll
      for (int q = 0; q < KA; ++q) a[q] = jacobians[step_offset(0, b, B, N, KA) + n * KA + q];
#pragma unroll
      for (int c = 0; c < K; ++c) {
        dd[c] = adjoint[step_offset(0, b, B, N, K) + n * K + c];
        s[c] = s0[s_offset<FORM, K>(static_cast<size_t>(b) * NE + e, c, 0, 1)];
      }
      U::apply_transpose(a, dd, carried);
      U::inner(carried, s, p);
#pragma unroll
      for (int q = 0; q < KG; ++q) g[q] += p[q];
    }
  }

  float* out = grad + static_cast<size_t>(blockIdx.y) * NE * KG;
#pragma unroll
  for (int q = 0; q < KG; ++q) {
    const size_t at = static_cast<size_t>(e) * KG + q;
    out[at] = accumulate ? out[at] + g[q] : g[q];
  }
}

template <int FORM, int K>
cudaError_t run_adjoint(int T, int B, int N, const float* jacobians, const float* errors, float* adjoint,
                        cudaStream_t stream) {
  const long long units = static_cast<long long>(B) * N;
  launch(adjoint_kernel<FORM, K>, dim3(ceil_div(units, kVectorThreads)), dim3(kVectorThreads), stream, T, B, N,
         jacobians, errors, adjoint);
  return cudaGetLastError();
}

template <int FORM, int K>
cudaError_t run_gradient(int T, int B, int N, int R, int D, int v_len, const float* jacobians, const float* adjoint,
                         const float* u, const float* v, const float* s0, float* grad, int accumulate, int splits,
                         float* workspace, cudaStream_t stream) {
  const int NE = N * R;
  int b_per_block = ceil_div(B, splits < 1 ? 1 : splits);
  if (ceil_div(B, b_per_block) > 65535) b_per_block = ceil_div(B, 65535);
  const int slices = ceil_div(B, b_per_block);
  float* partial = slices > 1 ? workspace : grad;
  const int partial_accumulate = slices > 1 ? 0 : accumulate;
  if (partial == nullptr) return cudaErrorInvalidValue;

  if (D > 0) {
    const dim3 grid(ceil_div(NE, tile_rows(K)), ceil_div(D, kTileColumns), slices);
    if (grid.y > 65535) return cudaErrorInvalidConfiguration;
    launch(gradient_matrix_kernel<FORM, K>, grid, dim3(kThreadsX, kThreadsY), stream, T, B, N, R, D, jacobians,
           adjoint, u, v, s0, partial, partial_accumulate, b_per_block);
  } else {
    const dim3 grid(ceil_div(NE, kVectorThreads), slices);
    launch(gradient_vector_kernel<FORM, K>, grid, dim3(kVectorThreads), stream, T, B, N, R, v_len, jacobians, adjoint,
           u, v, s0, partial, partial_accumulate, b_per_block);
  }
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || slices == 1) return status;
  const size_t count = static_cast<size_t>(NE) * (D > 0 ? D : 1) * Unit<FORM, K>::kG;
  return sum_splits(workspace, slices, count, grad, accumulate, stream);
}

}  // namespace
}  // namespace rlmem

extern "C" int rlmem_adjoint(int form, int k, int T, int B, int N, const float* jacobians, const float* errors,
                             float* adjoint, cudaStream_t stream) {
  using namespace rlmem;
  if (T < 1 || B < 1 || N < 1) return cudaErrorInvalidValue;
  if (form == kBlock && k == 1) form = kReal;
  switch (form) {
    case kReal:
      return run_adjoint<kReal, 1>(T, B, N, jacobians, errors, adjoint, stream);
    case kComplex:
      return k == 2 ? run_adjoint<kComplex, 2>(T, B, N, jacobians, errors, adjoint, stream) : cudaErrorInvalidValue;
    case kBlock:
      switch (k) {
        case 2:
          return run_adjoint<kBlock, 2>(T, B, N, jacobians, errors, adjoint, stream);
        case 3:
          return run_adjoint<kBlock, 3>(T, B, N, jacobians, errors, adjoint, stream);
        case 4:
          return run_adjoint<kBlock, 4>(T, B, N, jacobians, errors, adjoint, stream);
      }
  }
  return cudaErrorInvalidValue;
}

extern "C" int rlmem_sensitivity_gradient(int form, int k, int T, int B, int N, int rows, int columns, int v_len,
                                          const float* jacobians, const float* adjoint, const float* u,
                                          const float* v, const float* s0, float* grad, int accumulate, int splits,
                                          float* workspace, cudaStream_t stream) {
  using namespace rlmem;
  if (T < 1 || B < 1 || N < 1 || rows < 1 || columns < 0 || v_len < 0) return cudaErrorInvalidValue;
  if ((columns > 0 || v_len > 0) && v == nullptr) return cudaErrorInvalidValue;
  if (form == kBlock && k == 1) form = kReal;
  if (rows > 1 && form != kReal) return cudaErrorInvalidValue;
#define RLMEM_GRADIENT(FORM, K)                                                                                  \
  run_gradient<FORM, K>(T, B, N, rows, columns, v_len, jacobians, adjoint, u, v, s0, grad, accumulate, splits, \
                        workspace, stream)
  switch (form) {
    case kReal:
      return RLMEM_GRADIENT(kReal, 1);
    case kComplex:
      return k == 2 ? RLMEM_GRADIENT(kComplex, 2) : cudaErrorInvalidValue;
    case kBlock:
      switch (k) {
        case 2:
          return RLMEM_GRADIENT(kBlock, 2);
        case 3:
          return RLMEM_GRADIENT(kBlock, 3);
        case 4:
          return RLMEM_GRADIENT(kBlock, 4);
      }
  }
#undef RLMEM_GRADIENT
  return cudaErrorInvalidValue;
}
