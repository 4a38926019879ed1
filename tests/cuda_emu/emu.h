// A small host emulation of the CUDA execution model, enough to run the row kernels of
// csrc/cuda/*.cuh on the CPU in tests: one block at a time, each CUDA thread a std::thread,
// __syncthreads a block-wide barrier, __shfl_xor_sync an exchange between the 32 threads of a
// warp through a buffer and two warp barriers, __shared__ variables function-level statics
// (shared by the block's threads; blocks run one after another).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

namespace emu {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local Dim3 thread_idx, block_idx, grid_dim;

struct Block {
  explicit Block(int threads) : sync(threads), lanes(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
};

inline Block* current = nullptr;

// Runs kernel(args) on `grid` blocks of `threads` threads, block after block.
template <typename Kernel, typename Args>
void launch(Kernel kernel, unsigned int grid, int threads, const Args& args) {
  for (unsigned int b = 0; b < grid; ++b) {
    Block block(threads);
    current = &block;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx.x = static_cast<unsigned int>(t);
        block_idx.x = b;
        grid_dim.x = grid;
        kernel(args);
      });
    }
    for (auto& th : pool) th.join();
    current = nullptr;
  }
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::current->sync.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int /*mask*/, float v, int lane_mask) {
  emu::Block& b = *emu::current;
  const int t = static_cast<int>(threadIdx.x);
  const int warp = t / 32;
  b.lanes[t] = v;
  b.warps[warp]->arrive_and_wait();
  const float r = b.lanes[warp * 32 + ((t % 32) ^ lane_mask)];
  b.warps[warp]->arrive_and_wait();
  return r;
}
