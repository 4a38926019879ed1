// Fused KL row pass over one chunk of trained and reference logits (see KlRowsArgs in rows.h).
//
// With a = (z + bias) / T, r = (z_ref + ref_bias) / T, row maxima m_q, m_p and
// d_q = sum exp(a - m_q), d_p = sum exp(r - m_p):
//   log q = (a - m_q) - log d_q,   log p = (r - m_p) - log d_p
//   KL(p || q) = E_p[r - a] - (m_p - m_q) - log d_p + log d_q
//   KL(q || p) = E_q[a - r] - (m_q - m_p) - log d_q + log d_p
// Every term is of the size of the two models' disagreement, not of the logits, so nothing
// cancels at logits of +-1e4. Pass 1 reads both rows once, keeping per side the online max,
// sum-exp and softmax-weighted sum of the log-ratio; pass 2 writes, in place of the trained row,
// coeff * d kl / d z:  forward (q - p) / T,  reverse q (log q - log p - kl) / T.
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
  const bool forward = a.kl != nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* zq = static_cast<T*>(a.logits) + row * n;
    const T* zp = static_cast<const T*>(a.ref_logits) + row * n;
    SoftmaxStats q, p;
    row_read2<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
      const float av = tempered(x, j, bias, inv_t);
      const float rv = tempered(y, j, ref_bias, inv_t);
      q.add(av, av - rv);
      p.add(rv, rv - av);
    });
    q = block_allreduce<kThreads>(q, smem);
    p = block_allreduce<kThreads>(p, smem);
    const float m_q = q.m, m_p = p.m;
    const float log_dq = logf(q.d), log_dp = logf(p.d);
    const float kl = reverse ? (q.mean_y() - (m_q - m_p)) - log_dq + log_dp
                             : (p.mean_y() - (m_p - m_q)) - log_dp + log_dq;
    const bool live = forward ? a.mask[row] : true;
    if (forward && threadIdx.x == 0) {
      a.lse[row] = m_q + log_dq;
      a.ref_lse[row] = m_p + log_dp;
      a.kl[row] = live ? kl : 0.f;
    }
    if (a.coeff == nullptr) continue;
    const float c = live ? a.coeff[row] : 0.f;
    if (c == 0.f) {
      row_update<kThreads>(zq, zq, n, [](int64_t, float, float) { return 0.f; });
      continue;
    }
    const float c_t = c * inv_t;
    if (reverse) {
      row_update<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        const float log_q = (tempered(x, j, bias, inv_t) - m_q) - log_dq;
        const float log_p = (tempered(y, j, ref_bias, inv_t) - m_p) - log_dp;
        return log_q != -INFINITY ? c_t * expf(log_q) * (log_q - log_p - kl) : 0.f;  // q = 0: gradient 0
      });
    } else {
      row_update<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        const float log_q = (tempered(x, j, bias, inv_t) - m_q) - log_dq;
        const float log_p = (tempered(y, j, ref_bias, inv_t) - m_p) - log_dp;
        return c_t * (expf(log_q) - expf(log_p));
      });
    }
  }
}

}  // namespace surgery_cuda
