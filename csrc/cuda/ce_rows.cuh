// Fused cross-entropy row pass over one chunk of logits (see CeRowsArgs in rows.h).
//
// Per row: pass 1 reads the row once for the max m and d = sum exp(s - m) (online, float32) and
// the target's logit, giving lse = m + log d and ce = (m - s_t) + log d; pass 2 reads it again
// and writes, in place, the logit gradient coeff * (softmax - onehot(target)) times the softcap
// chain rule, with softmax = exp((s - m) - log d) (exact for logits of +-1e4, unlike exp(s - lse)).
#pragma once

#include <cmath>

#include "row_common.cuh"

namespace surgery_cuda {

// The logit the loss sees: z + bias, then softcap * tanh(. / softcap). `dcap` receives
// d(capped)/d(z) = 1 - tanh^2 (1 without softcap).
template <typename T>
__device__ __forceinline__ float ce_logit(float z, int64_t j, const T* bias, bool has_softcap, float softcap,
                                          float* dcap) {
  if (bias != nullptr) z += to_float(bias[j]);
  if (has_softcap) {
    const float t = tanhf(z / softcap);
    *dcap = 1.f - t * t;
    return softcap * t;
  }
  *dcap = 1.f;
  return z;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(CeRowsArgs a) {
  __shared__ SoftmaxStats smem[kThreads / 32];
  const int64_t n = a.vocab;
  const T* bias = static_cast<const T*>(a.bias);
  const bool has_softcap = a.has_softcap;
  const float softcap = a.softcap;
  const bool forward = a.ce != nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* z = static_cast<T*>(a.logits) + row * n;
    const int64_t t = a.target[row];
    const bool live = t != a.ignore_index;
    // Python validates targets; an out-of-range one poisons its value instead of reading
    // outside the row.
    const bool in_range = t >= 0 && t < n;
    SoftmaxStats st;
    row_read<kThreads>(z, n, [&](int64_t j, float x) {
      float dcap;
      st.add(ce_logit(x, j, bias, has_softcap, softcap, &dcap));
    });
    // Read the target logit before the barrier in block_allreduce: pass 2 overwrites the row.
    float zt = 0.f;
    if (forward && live && in_range) {
      float dcap;
      zt = ce_logit(to_float(z[t]), t, bias, has_softcap, softcap, &dcap);
    }
    st = block_allreduce<kThreads>(st, smem);
    const float m = st.m;
    const float log_d = logf(st.d);
    float ce = 0.f;
    if (forward) {
      if (live) ce = in_range ? (m - zt) + log_d : NAN;
      if (threadIdx.x == 0) {
        a.lse[row] = m + log_d;
        a.ce[row] = ce;
      }
    }
    if (a.coeff == nullptr) continue;
    float c = (live && in_range) ? a.coeff[row] : 0.f;
    // Bounded ascent: a token already pushed past the cap gets no gradient.
    if (forward && a.has_ascent_cap && c < 0.f && ce > a.ascent_cap) c = 0.f;
    if (c == 0.f) {
      row_update<kThreads>(z, z, n, [](int64_t, float, float) { return 0.f; });
      continue;
    }
    row_update<kThreads>(z, z, n, [&](int64_t j, float x, float) {
      float dcap;
      const float s = ce_logit(x, j, bias, has_softcap, softcap, &dcap);
      const float g = expf((s - m) - log_d) - (j == t ? 1.f : 0.f);
      return c * g * dcap;
    });
  }
}

}  // namespace surgery_cuda
