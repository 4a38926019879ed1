// Device helpers shared by the row kernels: dtype conversion, a row walk with 16-byte loads,
// the online max/sum-exp state and a block-wide all-reduce.
//
// A block handles one row at a time (grid-stride over rows); kThreads threads split the row.
// Math is float32 whatever the storage dtype. Conversions use the explicit intrinsics because
// torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rows.h"

namespace surgery_cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
};

// Leading elements of `p` before the first 16-byte boundary (at most `n`).
template <typename T>
__device__ __forceinline__ int64_t head_elements(const T* p, int64_t n) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15);
  const int64_t head = misaligned == 0 ? 0 : (16 - misaligned) / static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// Calls f(j, x_j) for the elements j of row p[0, n) owned by this thread. The aligned body is
// read with 16-byte loads; the unaligned head (rows start at row * vocab, so any V works) and
// the tail are read element by element.
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void row_read(const T* p, int64_t n, F&& f) {
  constexpr int kV = Vec<T>::kSize;
  const int tid = threadIdx.x;
  const int64_t head = head_elements(p, n);
  if (tid < head) f(static_cast<int64_t>(tid), to_float(p[tid]));
  const int64_t nvec = (n - head) / kV;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  for (int64_t i = tid; i < nvec; i += kThreads) {
    const uint4 raw = pv[i];
    const T* e = reinterpret_cast<const T*>(&raw);
    const int64_t j0 = head + i * kV;
#pragma unroll
    for (int k = 0; k < kV; ++k) f(j0 + k, to_float(e[k]));
  }
  for (int64_t j = head + nvec * kV + tid; j < n; j += kThreads) f(j, to_float(p[j]));
}

// Like row_read over two rows read in lockstep: f(j, x_j, y_j). The vector path needs both
// rows to share their alignment (true for rows of two workspaces of one dtype and width);
// otherwise every element is read singly.
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void row_read2(const T* p, const T* q, int64_t n, F&& f) {
  constexpr int kV = Vec<T>::kSize;
  const int tid = threadIdx.x;
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(q)) & 15) == 0;
  const int64_t head = same_alignment ? head_elements(p, n) : n;
  const int64_t nvec = (n - head) / kV;
  for (int64_t j = tid; j < head; j += kThreads) f(j, to_float(p[j]), to_float(q[j]));
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  const uint4* qv = reinterpret_cast<const uint4*>(q + head);
  for (int64_t i = tid; i < nvec; i += kThreads) {
    const uint4 rp = pv[i];
    const uint4 rq = qv[i];
    const T* ep = reinterpret_cast<const T*>(&rp);
    const T* eq = reinterpret_cast<const T*>(&rq);
    const int64_t j0 = head + i * kV;
#pragma unroll
    for (int k = 0; k < kV; ++k) f(j0 + k, to_float(ep[k]), to_float(eq[k]));
  }
  for (int64_t j = head + nvec * kV + tid; j < n; j += kThreads) f(j, to_float(p[j]), to_float(q[j]));
}

// In place: p[j] = f(j, p[j], q[j]) for the elements of this thread (q read only; pass
// q = p when there is no second row). Same access pattern as row_read2.
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void row_update(T* p, const T* q, int64_t n, F&& f) {
  constexpr int kV = Vec<T>::kSize;
  const int tid = threadIdx.x;
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(q)) & 15) == 0;
  const int64_t head = same_alignment ? head_elements(p, n) : n;
  const int64_t nvec = (n - head) / kV;
  for (int64_t j = tid; j < head; j += kThreads) p[j] = from_float<T>(f(j, to_float(p[j]), to_float(q[j])));
  uint4* pv = reinterpret_cast<uint4*>(p + head);
  const uint4* qv = reinterpret_cast<const uint4*>(q + head);
  for (int64_t i = tid; i < nvec; i += kThreads) {
    uint4 rp = pv[i];
    const uint4 rq = qv[i];
    T* ep = reinterpret_cast<T*>(&rp);
    const T* eq = reinterpret_cast<const T*>(&rq);
    const int64_t j0 = head + i * kV;
#pragma unroll
    for (int k = 0; k < kV; ++k) ep[k] = from_float<T>(f(j0 + k, to_float(ep[k]), to_float(eq[k])));
    pv[i] = rp;
  }
  for (int64_t j = head + nvec * kV + tid; j < n; j += kThreads) {
    p[j] = from_float<T>(f(j, to_float(p[j]), to_float(q[j])));
  }
}

// Online softmax statistics of a set of values x: m = max x, d = sum exp(x - m) and
// s = sum exp(x - m) * y for a second value y attached to each x (the KL's log-ratio).
// An empty set is (-inf, 0, 0). x = -inf (a -inf bias: a banned or padded vocabulary entry)
// has weight 0 and adds nothing, y included (0 * log 0 = 0): without the test, exp(-inf - -inf)
// is NaN while m is still -inf, and 0 * y is NaN for y = -inf - -inf.
struct SoftmaxStats {
  float m = -INFINITY;
  float d = 0.f;
  float s = 0.f;

  __device__ __forceinline__ void add(float x) {
    if (x > m) {
      d = d * expf(m - x) + 1.f;
      m = x;
    } else if (x != -INFINITY) {  // NaN still propagates
      d += expf(x - m);
    }
  }

  __device__ __forceinline__ void add(float x, float y) {
    if (x > m) {
      const float scale = expf(m - x);
      d = d * scale + 1.f;
      s = s * scale + y;
      m = x;
    } else if (x != -INFINITY) {  // NaN still propagates
      const float w = expf(x - m);
      d += w;
      s += w * y;
    }
  }

  // sum softmax(x) * y
  __device__ __forceinline__ float mean_y() const { return s / d; }
};

__device__ __forceinline__ SoftmaxStats combine(const SoftmaxStats& a, const SoftmaxStats& b) {
  SoftmaxStats r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) {  // nothing but -inf (d, s = 0) or NaN (d, s = NaN) on both sides
    r.d = a.d + b.d;
    r.s = a.s + b.s;
    return r;
  }
  const float sa = expf(a.m - r.m);
  const float sb = expf(b.m - r.m);
  r.d = a.d * sa + b.d * sb;
  r.s = a.s * sa + b.s * sb;
  return r;
}

__device__ __forceinline__ SoftmaxStats shfl_xor(const SoftmaxStats& v, int lane_mask) {
  SoftmaxStats r;
  r.m = __shfl_xor_sync(0xffffffffu, v.m, lane_mask);
  r.d = __shfl_xor_sync(0xffffffffu, v.d, lane_mask);
  r.s = __shfl_xor_sync(0xffffffffu, v.s, lane_mask);
  return r;
}

// Combines the values of all kThreads threads of the block with `op` (associative; `shfl(v, o)`
// exchanges v with lane ^ o); every thread gets the same result (same combination order
// everywhere). `smem` holds kThreads / 32 values. Safe to call again for the next row: the leading
// barrier keeps a fast warp from overwriting `smem` while a slow one still reads the previous result.
template <int kThreads, typename T, typename Op, typename Shfl>
__device__ __forceinline__ T block_reduce(T v, T* smem, Op op, Shfl shfl) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads must be a multiple of 32, at most 1024");
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl(v, o));
  if constexpr (kThreads == 32) {
    return v;
  } else {
    constexpr int kWarps = kThreads / 32;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    T r = smem[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
    return r;
  }
}

// The softmax statistics of the whole block (combine).
template <int kThreads>
__device__ __forceinline__ SoftmaxStats block_allreduce(SoftmaxStats v, SoftmaxStats* smem) {
  return block_reduce<kThreads>(
      v, smem, [](const SoftmaxStats& a, const SoftmaxStats& b) { return combine(a, b); },
      [](const SoftmaxStats& a, int o) { return shfl_xor(a, o); });
}

// The sum of v over the block; `smem` holds kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  return block_reduce<kThreads>(
      v, smem, [](float a, float b) { return a + b; },
      [](float a, int o) { return __shfl_xor_sync(0xffffffffu, a, o); });
}

// Threads per row for a vocabulary of size v: enough 16-byte loads per thread to hide latency
// for large V, and blocks small enough that many rows share an SM for small V.
inline int threads_for_vocab(int64_t v) {
  if (v >= 16384) return 512;
  if (v >= 4096) return 256;
  return 128;
}

// Blocks for `rows` rows (grid-stride loop inside; gridDim.x is capped at 2^31 - 1).
inline unsigned int grid_for_rows(int64_t rows) {
  const int64_t cap = 2147483647;
  return static_cast<unsigned int>(rows < cap ? rows : cap);
}

}  // namespace surgery_cuda
