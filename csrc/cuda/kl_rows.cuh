// Fused KL row pass over one chunk of trained and reference logits (see KlRowsArgs in rows.h).
//
// With a = s / T, r = s_ref / T (s = z + bias, then softcap * tanh(. / softcap) when that side has
// a softcap; s_ref likewise with ref_bias and ref_softcap), row maxima m_q, m_p and
// d_q = sum exp(a - m_q), d_p = sum exp(r - m_p):
//   log q = (a - m_q) - log d_q,   log p = (r - m_p) - log d_p
//   KL(p || q) = E_p[r - a] - (m_p - m_q) - log d_p + log d_q
//   KL(q || p) = E_q[a - r] - (m_q - m_p) - log d_q + log d_p
// Every term is of the size of the two models' disagreement, not of the logits, so nothing
// cancels at logits of +-1e4 on both sides. A constant offset between the sides (r - a ~ c for
// every column) is disagreement by that measure and does cancel, at ulp(c): KL values err by
// ~1e-5 at c = 100 and ~1e-3 at c = 1e4 where plain PyTorch's per-side log-softmax does not
// (review 2026-12-07; the gradients are not affected: the forward one is q - p, the reverse one
// subtracts the kl summed below). Pass 1 reads both rows once, keeping per side the online max,
// sum-exp and softmax-weighted sum of the log-ratio; the last pass writes, in place of the trained
// row, coeff * d kl / d z:  forward (q - p) / T,  reverse q (log q - log p - kl) / T, times the
// trained side's d s / d z = 1 - tanh^2 when it has a softcap. The reverse gradient cancels where
// q is nearly one-hot, so the kl it subtracts is summed from its very terms, sum q (log q - log p),
// in a pass between the two (the closed form above rounds otherwise: its terms are of the logits'
// size; the Triton row kernel, which had the same structure, erred thousands of times plain
// PyTorch's on a peaked q far from p).
#pragma once

#include <cmath>

#include "row_common.cuh"

namespace surgery_cuda {

// One side's s / T. `dcap` receives d s / d z = 1 - tanh^2 (1 without softcap).
template <typename T>
__device__ __forceinline__ float tempered(float z, int64_t j, const T* bias, bool has_softcap, float softcap,
                                          float inv_t, float* dcap) {
  if (bias != nullptr) z += to_float(bias[j]);
  *dcap = 1.f;
  if (has_softcap) {
    const float t = tanhf(z / softcap);
    *dcap = 1.f - t * t;
    z = softcap * t;
  }
  return z * inv_t;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) kl_rows_kernel(KlRowsArgs a) {
  __shared__ SoftmaxStats smem[kThreads / 32];
  const int64_t n = a.vocab;
  const T* bias = static_cast<const T*>(a.bias);
  const T* ref_bias = static_cast<const T*>(a.ref_bias);
  const float inv_t = 1.f / a.temperature;
  const bool has_cap = a.has_softcap, has_ref_cap = a.has_ref_softcap;
  const float cap = a.softcap, ref_cap = a.ref_softcap;
  const bool reverse = a.reverse;
  const bool forward = a.kl != nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* zq = static_cast<T*>(a.logits) + row * n;
    const T* zp = static_cast<const T*>(a.ref_logits) + row * n;
    SoftmaxStats q, p;
    row_read2<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
      float dcap;
      const float av = tempered(x, j, bias, has_cap, cap, inv_t, &dcap);
      const float rv = tempered(y, j, ref_bias, has_ref_cap, ref_cap, inv_t, &dcap);
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
      // log q and log p of column j, one function for both passes, so both compute the same values
      auto log_probs = [&](int64_t j, float x, float y, float* log_q, float* log_p, float* dcap) {
        float unused;
        *log_q = (tempered(x, j, bias, has_cap, cap, inv_t, dcap) - m_q) - log_dq;
        *log_p = (tempered(y, j, ref_bias, has_ref_cap, ref_cap, inv_t, &unused) - m_p) - log_dp;
      };
      float part = 0.f;
      row_read2<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        float log_q, log_p, dcap;
        log_probs(j, x, y, &log_q, &log_p, &dcap);
        if (log_q != -INFINITY) part += expf(log_q) * (log_q - log_p);  // 0 * log 0 = 0
      });
      const float kl_g = block_sum<kThreads>(part, reinterpret_cast<float*>(smem));
      row_update<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        float log_q, log_p, dcap;
        log_probs(j, x, y, &log_q, &log_p, &dcap);
        // q = 0: gradient 0
        return log_q != -INFINITY ? c_t * expf(log_q) * ((log_q - log_p) - kl_g) * dcap : 0.f;
      });
    } else {
      row_update<kThreads>(zq, zp, n, [&](int64_t j, float x, float y) {
        float dcap, unused;
        const float log_q = (tempered(x, j, bias, has_cap, cap, inv_t, &dcap) - m_q) - log_dq;
        const float log_p = (tempered(y, j, ref_bias, has_ref_cap, ref_cap, inv_t, &unused) - m_p) - log_dp;
        return c_t * (expf(log_q) - expf(log_p)) * dcap;
      });
    }
  }
}

}  // namespace surgery_cuda
