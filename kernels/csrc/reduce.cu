// The last step of a gradient whose batch was split across thread blocks: G = Σ_z partial[z], in a
// fixed order (deterministic for a given split), and the choice of the split.

#include "common.cuh"

namespace rlmem {
namespace {

// partial [splits, count] → grad [count] (added to grad when ``accumulate``). Grid-stride over the
// entries; consecutive threads read consecutive entries of each slice.
__global__ void __launch_bounds__(kVectorThreads)
    sum_splits_kernel(const float* __restrict__ partial, int splits, size_t count, float* __restrict__ grad,
                      int accumulate) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kVectorThreads;
  for (size_t i = static_cast<size_t>(blockIdx.x) * kVectorThreads + threadIdx.x; i < count; i += stride) {
    float acc = accumulate ? grad[i] : 0.f;
    for (int z = 0; z < splits; ++z) acc += partial[z * count + i];
    grad[i] = acc;
  }
}

}  // namespace

cudaError_t sum_splits(const float* partial, int splits, size_t count, float* grad, int accumulate,
                       cudaStream_t stream) {
  const long long wanted = (static_cast<long long>(count) + kVectorThreads - 1) / kVectorThreads;
  const int blocks = static_cast<int>(wanted < 4096 ? (wanted < 1 ? 1 : wanted) : 4096);
  launch(sum_splits_kernel, dim3(blocks), dim3(kVectorThreads), stream, partial, splits, count, grad, accumulate);
  return cudaGetLastError();
}

}  // namespace rlmem

extern "C" int rlmem_gradient_splits(int form, int k, int B, int N, int rows, int columns, int multiprocessors) {
  using namespace rlmem;
  if (B < 1 || N < 1 || rows < 1) return 1;
  if (form == kBlock && k == 1) form = kReal;
  const long long NE = static_cast<long long>(N) * rows;
  // Thread blocks per slice of the batch: the tiles of G (matrix groups) or of its rows (vector groups).
  const long long tiles = columns > 0 ? static_cast<long long>(ceil_div(NE, tile_rows(form == kReal ? 1 : k))) *
                                            ceil_div(columns, kTileColumns)
                                      : ceil_div(NE, kVectorThreads);
  // Aim at four blocks per multiprocessor, and give each slice at least two envs, so that the
  // partial sums (slices × |G|) stay small next to the one read of S they come from.
  const long long target = 4LL * (multiprocessors > 0 ? multiprocessors : 1);
  long long splits = (target + tiles - 1) / tiles;
  const long long most = (B + 1) / 2;
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  return static_cast<int>(splits);
}
