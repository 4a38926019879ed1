// Fused KL row pass over one chunk of trained and reference logits (see KlRowsArgs in rows.h).
//
// With a = (z + bias) / T, r = (z_ref + ref_bias) / T, log q = a - lse_q, log p = r - lse_p:
//   KL(p || q) = sum_j p_j (r_j - a_j) - lse_p + lse_q
//   KL(q || p) = sum_j q_j (a_j - r_j) - lse_q + lse_p
// Pass 1 reads both rows once and keeps, per side, the online max / sum-exp and the
// softmax-weighted sum of the log-ratio, so lse, ref_lse and kl come out of a single read.
// Pass 2 writes, in place of the trained row, coeff * d kl / d z:
//   forward (q - p) / T,   reverse q (log q - log p - kl) / T.
// Backward mode skips pass 1 and takes lse, ref_lse and kl from the forward.
#pragma once

#include <cmath>

#include "row_common.cuh"

namespace surgery_cuda {

template <typename T>
__device__ __forceinline__ float tempered(float z, int64_t j, const T* bias, float inv_t) {
  if (bias != nullptr) z += to_float(bias[j]);
  return z * inv_t;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) kl_rows_kernel(KlRowsArgs a) {
  __shared__ SoftmaxStats smem[kThreads / 32];
  const int64_t n = a.vocab;
  const T* bias = static_cast<const T*>(a.bias);
  const T* ref_bias = static_cast<const T*>(a.ref_bias);
  const float inv_t = 1.f / a.temperature;
  const bool reverse = a.reverse;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* zq = static_cast<T*>(a.logits) + row * n;
    const T* zp = static_cast<const T*>(a.ref_logits) + row * n;
    float lse_q, lse_p, kl, c;
    if (a.lse_in != nullptr) {
      lse_q = a.lse_in[row];
      lse_p = a.ref_lse_in[row];
      kl = a.kl_in[row];
      c = a.coeff[row];
    } else {
      SoftmaxStats q, p;
      row_read2<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        const float av = tempered(x, j, bias, inv_t);
        const float rv = tempered(y, j, ref_bias, inv_t);
        q.add(av, av - rv);
        p.add(rv, rv - av);
      });
      q = block_allreduce<kThreads>(q, smem);
      p = block_allreduce<kThreads>(p, smem);
      lse_q = q.lse();
      lse_p = p.lse();
      kl = reverse ? q.mean_y() - lse_q + lse_p : p.mean_y() - lse_p + lse_q;
      const bool live = a.mask[row];
      if (threadIdx.x == 0) {
        a.lse[row] = lse_q;
        a.ref_lse[row] = lse_p;
        a.kl[row] = live ? kl : 0.f;
      }
      if (a.coeff == nullptr) continue;
      c = live ? a.coeff[row] : 0.f;
    }
    if (c == 0.f) {
      row_update<kThreads>(zq, zq, n, [](int64_t, float, float) { return 0.f; });
      continue;
    }
    const float c_t = c * inv_t;
    if (reverse) {
      row_update<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        const float log_q = tempered(x, j, bias, inv_t) - lse_q;
        const float log_p = tempered(y, j, ref_bias, inv_t) - lse_p;
        return c_t * expf(log_q) * (log_q - log_p - kl);
      });
    } else {
      row_update<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        const float log_q = tempered(x, j, bias, inv_t) - lse_q;
        const float log_p = tempered(y, j, ref_bias, inv_t) - lse_p;
        return c_t * (expf(log_q) - expf(log_p));
      });
    }
  }
}

}  // namespace surgery_cuda
