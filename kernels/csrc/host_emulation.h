// Runs the kernels of this directory on the host, for checking them where no GPU is at hand (the
// tests build the .cu files with it and compare against the PyTorch reference). Not part of the
// extension's build. Usage, from this directory:
//
//   g++ -std=c++20 -O1 -pthread -fPIC -shared -x c++ -DRLMEM_HOST_EMULATION
//       -include host_emulation.h forward.cu backward.cu reduce.cu -o libemulated.so
//
// Thread blocks run one after the other; the threads of a block run as std::threads that meet at
// __syncthreads() on a std::barrier (a thread that returns leaves the barrier, as on the device).
// __shared__ arrays become function-local statics, which is one copy per block since blocks do not
// overlap. Device pointers are host pointers.
#pragma once

#ifndef RLMEM_HOST_EMULATION
#error "define RLMEM_HOST_EMULATION when including host_emulation.h"
#endif

#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* rlmem_block_barrier = nullptr;
inline void __syncthreads() { rlmem_block_barrier->arrive_and_wait(); }

using std::max;
using std::min;

namespace rlmem {

template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  gridDim = grid;
  blockDim = block;
  const std::ptrdiff_t threads = static_cast<std::ptrdiff_t>(block.x) * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        rlmem_block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
              pool.emplace_back([&, tx, ty, tz] {
                threadIdx = dim3(tx, ty, tz);
                blockIdx = dim3(bx, by, bz);
                kernel(static_cast<Params>(args)...);
                barrier.arrive_and_drop();
              });
        for (std::thread& thread : pool) thread.join();
      }
}

}  // namespace rlmem
