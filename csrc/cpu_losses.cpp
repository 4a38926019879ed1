// CPU implementations of the surgery ops (schemas in ops.cpp).
//
// Per chunk of `chunk_size` tokens:
//   1. one logits GEMM through ATen (BLAS/oneDNN) in the input dtype (two for the KL: the
//      reference side too), into a buffer reused across chunks;
//   2. one parallel pass over the chunk's rows (at::parallel_for): each row is loaded into float32,
//      then max, sum-exp, log-sum-exp and the value are computed and, when a
//      gradient is wanted, the row is overwritten in place by coeff_i * d value_i / d z_i while it
//      is still in cache (a 49152-wide float row is 192 KiB: it stays in L2 across the passes);
//   3. dhidden_chunk = G @ W and dweight += G^T @ h_chunk (float32), dbias += sum_rows(G).
// Only one chunk of logits (two for the KL) is alive. bf16/fp16 inputs: the GEMM output is
// converted row by row into a float32 buffer; G is kept in float32 for dweight/dbias (one float32
// GEMM, no per-chunk rounding of the accumulator's increments) and rounded once to the input dtype
// for dhidden = G @ W, which is what the plain PyTorch computation does too.
//
// The row loops are plain loops over float arrays with branch-free exp/tanh so the compiler
// vectorizes them; they are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load
// time (target_clones), since the build may not assume the CPU it runs on (no -march=native).
// Index arithmetic is 64-bit throughout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace surgery {
namespace {

// GCC >= 11 knows the x86-64-v3/v4 levels; elsewhere the loops get the baseline vectorization only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define SK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_MULTIVERSION
#endif
#if defined(__GNUC__)
#define SK_INLINE inline __attribute__((always_inline))
#else
#define SK_INLINE inline
#endif

// ---------------------------------------------------------------------------------------------
// Branch-free float math the compiler can vectorize (no calls into libm inside the row loops).

SK_INLINE float from_bits(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

SK_INLINE int32_t to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) to ~2 ulp (Cephes expf): x = n ln2 + r, |r| <= ln2/2, polynomial for e^r, 2^n through the
// exponent bits. Underflows to exactly 0 below -87.3 (our arguments are x - max <= 0); NaN stays NaN.
SK_INLINE float exp_approx(float x) {
  constexpr float lo = -87.33654f, hi = 88.0f;
  // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
  constexpr float shifter = 12582912.0f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  float t = xc * 1.44269504088896341f + shifter;
  float n = t - shifter;
  int32_t k = to_bits(t) - to_bits(shifter);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  float y = p * from_bits((k + 127) << 23);
  return x < lo ? 0.0f : y;
}

// tanh(x) to a few ulp (Cephes tanhf): odd polynomial near 0 (no cancellation), 1 - 2/(e^2|x| + 1)
// elsewhere.
SK_INLINE float tanh_approx(float x) {
  float ax = std::fabs(x);
  float z = x * x;
  float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                  1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  float big = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

SK_INLINE float fmax_(float a, float b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Row kernels over one float32 row of V logits.

// x -> cap * tanh(x / cap) * scale when cap > 0; x -> x * scale otherwise. Returns max(x).
SK_MULTIVERSION float transform_max_(float* x, int64_t V, float cap, float scale) {
  float m = -std::numeric_limits<float>::infinity();
  if (cap > 0.0f) {
    // scale 1 (cross-entropy): cap * scale is cap exactly.
    const float inv = 1.0f / cap, cs = cap * scale;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float v = cs * tanh_approx(x[j] * inv);
      x[j] = v;
      m = fmax_(m, v);
    }
  } else if (scale != 1.0f) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float v = x[j] * scale;
      x[j] = v;
      m = fmax_(m, v);
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) m = fmax_(m, x[j]);
  }
  return m;
}

// Sums over a row run in float32 vector lanes within blocks of kBlock elements and in double across
// blocks: V can be 2^17 and the sums feed a 1e-5 relative-error contract.
constexpr int64_t kBlock = 1024;

// sum_j exp(x_j - m).
SK_MULTIVERSION double sum_exp(const float* x, int64_t V, float m) {
  double s = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = std::min(V, j0 + kBlock);
    float b = 0.0f;
#pragma omp simd reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) b += exp_approx(x[j] - m);
    s += b;
  }
  return s;
}

// In place x -> exp(x - m); returns the sum.
SK_MULTIVERSION double exp_sum_(float* x, int64_t V, float m) {
  double s = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = std::min(V, j0 + kBlock);
    float b = 0.0f;
#pragma omp simd reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) {
      float e = exp_approx(x[j] - m);
      x[j] = e;
      b += e;
    }
    s += b;
  }
  return s;
}

SK_MULTIVERSION void scale_(float* x, int64_t V, float c) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) x[j] *= c;
}

// In place, x holding softcapped logits: x -> c * softmax(x) * (1 - (x / cap)^2), the softmax
// taken as exp((x - m) - ls) with m the row max and ls = log sum exp(x - m): never through a float
// lse, which has lost ~1e-3 of relative accuracy when the logits are ~1e4.
SK_MULTIVERSION void softcap_softmax_grad_(float* x, int64_t V, float m, float ls, float c, float cap) {
  const float inv = 1.0f / cap;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float t = x[j] * inv;
    x[j] = c * exp_approx((x[j] - m) - ls) * (1.0f - t * t);
  }
}

// The KL rows take x = s / T (trained) and y = s_ref / T, s = z or cap * tanh(z / cap) with each
// side's own softcap, with their row maxima mx, my and lsx = log sum exp(x - mx), lsy likewise:
// log q = (x - mx) - lsx is exact even for logits ~1e4.
#define SK_LOGQ_LOGP float logq = (x[j] - mx) - lsx, logp = (y[j] - my) - lsy

// The softcap chain rule d s / d z = 1 - tanh(z / cap)^2 of a trained-side x = cap * tanh(z / cap) / T,
// given tc = T / cap. Without softcap it is 1 at compile time: x * 0 would be NaN for a -inf
// logit (a banned column), and the plain path keeps its exact arithmetic.
template <bool kCap>
SK_INLINE float dcap(float x, float tc) {
  if constexpr (kCap) {
    const float u = x * tc;
    return 1.0f - u * u;
  } else {
    return 1.0f;
  }
}

template <bool kCap>
SK_INLINE double kl_forward_row_impl(float* x, const float* y, int64_t V, float mx, float lsx, float my, float lsy,
                                     float c, float tc) {
  double kl = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = std::min(V, j0 + kBlock);
    float b = 0.0f;
    if (c != 0.0f) {
#pragma omp simd reduction(+ : b)
      for (int64_t j = j0; j < j1; ++j) {
        SK_LOGQ_LOGP;
        float p = exp_approx(logp);
        b += logp != -INFINITY ? p * (logp - logq) : 0.0f;
        x[j] = c * (exp_approx(logq) - p) * dcap<kCap>(x[j], tc);
      }
    } else {
#pragma omp simd reduction(+ : b)
      for (int64_t j = j0; j < j1; ++j) {
        SK_LOGQ_LOGP;
        b += logp != -INFINITY ? exp_approx(logp) * (logp - logq) : 0.0f;
      }
    }
    kl += b;
  }
  return kl;
}

// Forward KL(p || q) of one row: sum_j p_j (log p_j - log q_j), 0 * log 0 = 0 (a column whose
// reference logit is -inf adds nothing; -inf - -inf would be NaN). When c != 0, x is overwritten
// by c * (q - p) * d s / d z in the same loop (tc = T / cap of the trained side, 0 without softcap).
SK_MULTIVERSION double kl_forward_row_(float* x, const float* y, int64_t V, float mx, float lsx, float my, float lsy,
                                       float c, float tc) {
  return tc != 0.0f ? kl_forward_row_impl<true>(x, y, V, mx, lsx, my, lsy, c, tc)
                    : kl_forward_row_impl<false>(x, y, V, mx, lsx, my, lsy, c, tc);
}

template <bool kCap>
SK_INLINE double kl_reverse_row_impl(float* x, float* y, int64_t V, float mx, float lsx, float my, float lsy, bool keep,
                                     float tc) {
  double kl = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = std::min(V, j0 + kBlock);
    float b = 0.0f;
    if (keep) {
#pragma omp simd reduction(+ : b)
      for (int64_t j = j0; j < j1; ++j) {
        SK_LOGQ_LOGP;
        const float d = dcap<kCap>(x[j], tc);
        float q = exp_approx(logq);
        float v = logq != -INFINITY ? q * (logq - logp) : 0.0f;
        b += v;
        x[j] = v * d;
        y[j] = q * d;
      }
    } else {
#pragma omp simd reduction(+ : b)
      for (int64_t j = j0; j < j1; ++j) {
        SK_LOGQ_LOGP;
        b += logq != -INFINITY ? exp_approx(logq) * (logq - logp) : 0.0f;
      }
    }
    kl += b;
  }
  return kl;
}

// Reverse KL(q || p) of one row: sum_j q_j (log q_j - log p_j), 0 * log 0 = 0 (as above, for q).
// When keep is set, x -> q (log q - log p) d and y -> q d, d = d s / d z (1 without softcap,
// tc = T / cap as in kl_forward_row_), for kl_reverse_grad_ once the row's kl is known.
SK_MULTIVERSION double kl_reverse_row_(float* x, float* y, int64_t V, float mx, float lsx, float my, float lsy,
                                       bool keep, float tc) {
  return tc != 0.0f ? kl_reverse_row_impl<true>(x, y, V, mx, lsx, my, lsy, keep, tc)
                    : kl_reverse_row_impl<false>(x, y, V, mx, lsx, my, lsy, keep, tc);
}

// x = q (log q - log p) d, y = q d  ->  x = c * q (log q - log p - kl) d.
SK_MULTIVERSION void kl_reverse_grad_(float* x, const float* y, int64_t V, float kl, float c) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) x[j] = c * (x[j] - kl * y[j]);
}

template <bool kCap>
SK_INLINE void kl_grad_impl(float* x, const float* y, int64_t V, float mx, float lsx, float my, float lsy, float kl,
                            float c, bool reverse, float tc) {
  if (reverse) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      SK_LOGQ_LOGP;
      x[j] = logq != -INFINITY ? c * exp_approx(logq) * (logq - logp - kl) * dcap<kCap>(x[j], tc) : 0.0f;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      SK_LOGQ_LOGP;
      x[j] = c * (exp_approx(logq) - exp_approx(logp)) * dcap<kCap>(x[j], tc);
    }
  }
}

// Recompute path of the KL gradient (row statistics and kl known): x, y -> c * dkl/dz in x
// (tc as in kl_forward_row_).
SK_MULTIVERSION void kl_grad_(float* x, const float* y, int64_t V, float mx, float lsx, float my, float lsy, float kl,
                              float c, bool reverse, float tc) {
  if (tc != 0.0f) {
    kl_grad_impl<true>(x, y, V, mx, lsx, my, lsy, kl, c, reverse, tc);
  } else {
    kl_grad_impl<false>(x, y, V, mx, lsx, my, lsy, kl, c, reverse, tc);
  }
}

// Row of GEMM output (input dtype) + bias -> float32. For float32 input dst may alias z.
template <typename T>
void load_row(float* dst, const T* z, const T* bias, int64_t V) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<float>(z[j]) + static_cast<float>(bias[j]);
  } else if (static_cast<const void*>(dst) != static_cast<const void*>(z)) {
    for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<float>(z[j]);
  }
}

template <typename T>
void store_row(T* dst, const float* x, int64_t V) {
  if (static_cast<void*>(dst) == static_cast<const void*>(x)) return;
  for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<T>(x[j]);
}

template <typename F>
void dispatch_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": hidden must be float32, bfloat16 or float16, got ", t);
  }
}

// ---------------------------------------------------------------------------------------------
// Input checks.

#define SK_CHECK_CPU(x) TORCH_CHECK_VALUE((x).device().is_cpu(), #x " must be a CPU tensor")
#define SK_CHECK_CONTIG(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")

void check_side(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const char* side) {
  SK_CHECK_CPU(hidden);
  SK_CHECK_CPU(weight);
  SK_CHECK_CONTIG(hidden);
  SK_CHECK_CONTIG(weight);
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op, ": ", side,
                    "hidden (N, H) and ", side, "weight (V, H) must agree, got ", hidden.sizes(), " and ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op, ": ", side, "weight dtype ", weight.scalar_type(),
                   " != ", side, "hidden dtype ", hidden.scalar_type());
  if (bias.has_value()) {
    SK_CHECK_CPU(*bias);
    SK_CHECK_CONTIG(*bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": ", side, "bias must have shape (V,)");
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), op, ": ", side, "bias dtype must match hidden");
  }
}

void check_per_token(const char* op, const at::Tensor& x, int64_t n, at::ScalarType dtype, const char* name) {
  SK_CHECK_CPU(x);
  SK_CHECK_CONTIG(x);
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == n, op, ": ", name, " must have shape (", n, ",), got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", x.scalar_type());
}

// The three optional gradient outputs, checked, plus the per-chunk GEMMs that fill them.
struct Grads {
  at::Tensor dh, dw, db;  // undefined = not wanted
  bool any() const { return dh.defined() || dw.defined() || db.defined(); }

  Grads(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
        const std::optional<at::Tensor>& dhidden, const std::optional<at::Tensor>& dweight,
        const std::optional<at::Tensor>& dbias) {
    if (dhidden.has_value()) {
      dh = *dhidden;
      SK_CHECK_CONTIG(dh);
      TORCH_CHECK_VALUE(
          dh.sizes() == hidden.sizes() && dh.scalar_type() == hidden.scalar_type() && dh.device().is_cpu(), op,
          ": dhidden must be a contiguous CPU tensor shaped and typed like hidden");
    }
    if (dweight.has_value()) {
      dw = *dweight;
      SK_CHECK_CONTIG(dw);
      TORCH_CHECK_VALUE(dw.sizes() == weight.sizes() && dw.scalar_type() == at::kFloat && dw.device().is_cpu(), op,
                        ": dweight must be a contiguous float32 CPU tensor shaped like weight");
    }
    if (dbias.has_value()) {
      TORCH_CHECK_VALUE(bias.has_value(), op, ": dbias given without bias");
      db = *dbias;
      SK_CHECK_CONTIG(db);
      TORCH_CHECK_VALUE(
          db.dim() == 1 && db.size(0) == weight.size(0) && db.scalar_type() == at::kFloat && db.device().is_cpu(), op,
          ": dbias must be a contiguous float32 CPU tensor of shape (V,)");
    }
  }

  // g: (r, V) gradient of the chunk's logits in hidden's dtype; gf: the same in float32 (may be g).
  void accumulate(const at::Tensor& g, const at::Tensor& gf, const at::Tensor& hidden, const at::Tensor& weight,
                  int64_t start, int64_t rows) {
    const bool first = start == 0;
    at::Tensor h = hidden.narrow(0, start, rows);
    if (dh.defined()) {
      at::Tensor out = dh.narrow(0, start, rows);
      at::mm_out(out, g, weight);
    }
    if (dw.defined()) {
      at::Tensor hf = h.scalar_type() == at::kFloat ? h : h.to(at::kFloat);
      if (first) {
        at::mm_out(dw, gf.t(), hf);
      } else {
        dw.addmm_(gf.t(), hf);
      }
    }
    if (db.defined()) {
      if (first) {
        at::sum_out(db, gf, {0});
      } else {
        db.add_(gf.sum(0));
      }
    }
  }

  // With no token there was no chunk: the gradients are zero.
  void finish(int64_t n) {
    if (n == 0) {
      if (dw.defined()) dw.zero_();
      if (db.defined()) db.zero_();
    }
  }
};

// The chunk's logits z = h @ W^T (+ bias) in the input dtype. bf16/fp16: the bias goes into the
// GEMM, as in the model's own F.linear head, so the logits are rounded once, exactly as there.
// float32: the row pass adds it (row_bias), which saves a broadcast pass over the chunk.
void logits_gemm(at::Tensor& z, const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && h.scalar_type() != at::kFloat) {
    at::addmm_out(z, *bias, h, w.t());
  } else {
    at::mm_out(z, h, w.t());
  }
}

template <typename T>
const T* row_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && std::is_same_v<T, float> ? bias->const_data_ptr<T>() : nullptr;
}

// A scalar option the row pass divides by or compares in float32: positive, finite and, where
// float32 divides by it (softcap, temperature), a normal float32 (surgery_kernels.checks.positive
// refuses the same in Python; softcap = inf would give inf * tanh(0) = NaN logits).
void check_scalar(const char* op, const char* name, const std::optional<double>& x, bool float32) {
  if (!x.has_value()) return;
  const double lo = float32 ? std::numeric_limits<float>::min() : std::numeric_limits<double>::denorm_min();
  const double hi = float32 ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  TORCH_CHECK_VALUE(*x >= lo && *x <= hi, op, ": ", name, " must be > 0 and finite",
                    float32 ? " in float32" : "", ", got ", *x);
}

int64_t resolve_chunk(const char* op, int64_t chunk_size, int64_t n) {
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  return std::max<int64_t>(1, std::min(chunk_size, n));
}

// Float32 view of a chunk's rows: the GEMM buffer itself for float32 input, else a float32 buffer.
at::Tensor float_buffer(const at::Tensor& zbuf) {
  return zbuf.scalar_type() == at::kFloat ? zbuf : at::empty(zbuf.sizes(), zbuf.options().dtype(at::kFloat));
}

void check_target(int64_t t, int64_t V, int64_t ignore_index) {
  TORCH_CHECK_VALUE(t == ignore_index || (t >= 0 && t < V), "target must hold class ids in [0, ", V,
                    ") or ignore_index=", ignore_index, ", got ", t);
}

// One side of a loss: the rows and head whose logits a chunk computes.
struct Side {
  const at::Tensor& hidden;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
};

// The chunk driver of every op: per chunk of C rows, each side's logits by one GEMM into its
// buffer (input dtype), then row(i, row, zp, fp) for the chunk's rows in parallel (zp[k]: side k's
// logits of the chunk in the input dtype, fp[k] the float32 buffer for them, which is zp[k] itself
// for float32 input; row i at offset i * V), then, with grads, the gradient GEMMs from side 0's
// buffer (which the row pass has overwritten with the logit gradient).
template <typename T, size_t S, typename RowFn>
void for_each_chunk(const std::array<Side, S>& sides, int64_t N, int64_t C, int64_t V, Grads* grads, RowFn&& row) {
  std::array<at::Tensor, S> zbuf, fbuf;
  for (size_t k = 0; k < S; ++k) {
    zbuf[k] = at::empty({C, V}, sides[k].hidden.options());
    fbuf[k] = float_buffer(zbuf[k]);
  }
  for (int64_t s = 0; s < N; s += C) {
    const int64_t r = std::min(C, N - s);
    std::array<at::Tensor, S> z, zf;
    std::array<T*, S> zp;
    std::array<float*, S> fp;
    for (size_t k = 0; k < S; ++k) {
      z[k] = zbuf[k].narrow(0, 0, r);
      zf[k] = fbuf[k].narrow(0, 0, r);
      logits_gemm(z[k], sides[k].hidden.narrow(0, s, r), sides[k].weight, sides[k].bias);
      zp[k] = z[k].template mutable_data_ptr<T>();
      fp[k] = zf[k].template mutable_data_ptr<float>();
    }
    at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row(i, s + i, zp, fp);
    });
    if (grads != nullptr) grads->accumulate(z[0], zf[0], sides[0].hidden, sides[0].weight, s, r);
  }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

struct CeRow {
  float lse, ce;
};

// One row: x holds its logits in float32 (bias added). Returns lse and ce (0 when not live); when
// with_grad, x becomes c * dce/dz (softcap chain rule included), zeros when c is 0 or the token is
// capped (c < 0 and ce > *ascent_cap). The softmax is formed from the row max m and
// ls = log sum exp(x - m), never from a rounded lse (exact for logits ~1e4). The target's column
// is left out of the sum, rest = sum_{j != t} exp(x_j - m), and added back as et = exp(x_t - m):
// the CE as log1p(rest / et) and the target's gradient as -c * rest / se are then exact on a
// memorized token (p_t near 1), where lse - x_t and p_t - 1 cancel (at 1 - p_t = 1e-6 forming
// them so errs by ~10% in float32, plain PyTorch's too).
CeRow ce_row_(float* x, int64_t V, int64_t t, bool live, float c, float cap, bool with_grad,
              const double* ascent_cap) {
  const float m = transform_max_(x, V, cap, 1.0f);
  const float xt = live ? x[t] : 0.0f;
  // Without softcap the gradient needs only exp(x - m) / sum: keep it in x (one exp per logit).
  const bool keep_exp = with_grad && cap <= 0.0f;
  if (live) x[t] = -INFINITY;
  const double rest = keep_exp ? exp_sum_(x, V, m) : sum_exp(x, V, m);
  if (live && !keep_exp) x[t] = xt;  // (keep_exp: x[t] holds exp(-inf) = 0 now)
  const double et = live ? static_cast<double>(exp_approx(xt - m)) : 0.0;
  const double se = rest + et;
  const double ls = std::log(se);
  float ce = 0.0f;
  if (live) {
    ce = static_cast<float>(et >= rest ? std::log1p(rest / et) : (static_cast<double>(m) - xt) + ls);
  }
  CeRow out{static_cast<float>(m + ls), ce};
  if (!with_grad) return out;
  // the cap as float, as the loss (autograd.py) and every other backend compare it: the gradient
  // must belong to the loss returned when float(cap) equals the token's ce
  if (!live || (ascent_cap != nullptr && c < 0.0f && out.ce > static_cast<float>(*ascent_cap))) c = 0.0f;
  if (c == 0.0f) {
    std::fill(x, x + V, 0.0f);
  } else if (cap > 0.0f) {
    softcap_softmax_grad_(x, V, m, static_cast<float>(ls), c, cap);
    const float u = xt / cap;
    x[t] = static_cast<float>(-c * (rest / se)) * (1.0f - u * u);
  } else {
    scale_(x, V, static_cast<float>(c / se));
    x[t] = static_cast<float>(-c * (rest / se));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> ce_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& coeff, int64_t ignore_index,
    std::optional<double> softcap, std::optional<double> ascent_cap, int64_t chunk_size,
    const std::optional<at::Tensor>& dhidden, const std::optional<at::Tensor>& dweight,
    const std::optional<at::Tensor>& dbias) {
  const char* op = "surgery::ce_forward";
  check_side(op, hidden, weight, bias, "");
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_per_token(op, target, N, at::kLong, "target");
  if (coeff.has_value()) check_per_token(op, *coeff, N, at::kFloat, "coeff");
  Grads grads(op, hidden, weight, bias, dhidden, dweight, dbias);
  TORCH_CHECK_VALUE(coeff.has_value() || !grads.any(), op, ": gradient outputs need coeff");
  check_scalar(op, "softcap", softcap, true);
  check_scalar(op, "ascent_cap", ascent_cap, false);
  const int64_t C = resolve_chunk(op, chunk_size, N);

  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor ce = at::empty({N}, f32), lse = at::empty({N}, f32);
  if (N == 0) {
    grads.finish(N);
    return {ce, lse};
  }
  const bool with_grad = coeff.has_value();
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
  const double acap = ascent_cap.value_or(0.0);
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const float* cf = with_grad ? coeff->const_data_ptr<float>() : nullptr;
  float* ce_p = ce.mutable_data_ptr<float>();
  float* lse_p = lse.mutable_data_ptr<float>();

  dispatch_dtype(hidden.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* b = row_bias<T>(bias);
    std::array<Side, 1> sides{Side{hidden, weight, bias}};
    for_each_chunk<T>(sides, N, C, V, with_grad ? &grads : nullptr, [&](int64_t i, int64_t row, auto& zp, auto& fp) {
      float* x = fp[0] + i * V;
      const int64_t t = tgt[row];
      check_target(t, V, ignore_index);
      load_row<T>(x, zp[0] + i * V, b, V);
      const CeRow res = ce_row_(x, V, t, t != ignore_index, with_grad ? cf[row] : 0.0f, cap, with_grad,
                                ascent_cap.has_value() ? &acap : nullptr);
      lse_p[row] = res.lse;
      ce_p[row] = res.ce;
      if (with_grad) store_row<T>(zp[0] + i * V, x, V);
    });
  });
  grads.finish(N);
  return {ce, lse};
}

void ce_backward_cpu(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& target, const at::Tensor& lse, const at::Tensor& coeff, int64_t ignore_index,
                     std::optional<double> softcap, int64_t chunk_size, const std::optional<at::Tensor>& dhidden,
                     const std::optional<at::Tensor>& dweight, const std::optional<at::Tensor>& dbias) {
  const char* op = "surgery::ce_backward";
  check_side(op, hidden, weight, bias, "");
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_per_token(op, target, N, at::kLong, "target");
  check_per_token(op, lse, N, at::kFloat, "lse");
  check_per_token(op, coeff, N, at::kFloat, "coeff");
  Grads grads(op, hidden, weight, bias, dhidden, dweight, dbias);
  check_scalar(op, "softcap", softcap, true);
  const int64_t C = resolve_chunk(op, chunk_size, N);
  if (N == 0 || !grads.any()) {
    grads.finish(0);
    return;
  }
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const float* cf = coeff.const_data_ptr<float>();

  dispatch_dtype(hidden.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* b = row_bias<T>(bias);
    std::array<Side, 1> sides{Side{hidden, weight, bias}};
    for_each_chunk<T>(sides, N, C, V, &grads, [&](int64_t i, int64_t row, auto& zp, auto& fp) {
      float* x = fp[0] + i * V;
      const int64_t t = tgt[row];
      check_target(t, V, ignore_index);
      const float c = t != ignore_index ? cf[row] : 0.0f;
      if (c == 0.0f) {
        std::fill(x, x + V, 0.0f);
      } else {
        load_row<T>(x, zp[0] + i * V, b, V);
        ce_row_(x, V, t, true, c, cap, true, nullptr);
      }
      store_row<T>(zp[0] + i * V, x, V);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// KL divergence between softmax(s / T) (trained, q) and softmax(s_ref / T) (reference, p), where
// s = softcap * tanh(z / softcap) (s = z without softcap) and s_ref likewise with ref_softcap.

void check_kl(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
              const std::optional<at::Tensor>& bias, const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
              const std::optional<at::Tensor>& ref_bias, double temperature, std::optional<double> softcap,
              std::optional<double> ref_softcap) {
  check_side(op, hidden, weight, bias, "");
  check_side(op, ref_hidden, ref_weight, ref_bias, "ref_");
  TORCH_CHECK_VALUE(ref_hidden.size(0) == hidden.size(0) && ref_weight.size(0) == weight.size(0), op,
              ": ref_hidden/ref_weight must have hidden's N and weight's V");
  TORCH_CHECK_TYPE(ref_hidden.scalar_type() == hidden.scalar_type(), op, ": ref_hidden dtype must match hidden");
  check_scalar(op, "temperature", temperature, true);
  check_scalar(op, "softcap", softcap, true);
  check_scalar(op, "ref_softcap", ref_softcap, true);
}

// The row transform of one KL side: cap (0 = none) for transform_max_, and for the trained side
// tc = T / cap (0 = none) for the softcap chain rule of the gradient.
float kl_cap(std::optional<double> softcap) { return softcap.has_value() ? static_cast<float>(*softcap) : 0.0f; }

float kl_tc(std::optional<double> softcap, double temperature) {
  return softcap.has_value() ? static_cast<float>(temperature / *softcap) : 0.0f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const std::optional<at::Tensor>& ref_bias,
    const at::Tensor& mask, const std::optional<at::Tensor>& coeff, bool reverse, double temperature,
    std::optional<double> softcap, std::optional<double> ref_softcap, int64_t chunk_size,
    const std::optional<at::Tensor>& dhidden, const std::optional<at::Tensor>& dweight,
    const std::optional<at::Tensor>& dbias) {
  const char* op = "surgery::kl_forward";
  check_kl(op, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, softcap, ref_softcap);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_per_token(op, mask, N, at::kBool, "mask");
  if (coeff.has_value()) check_per_token(op, *coeff, N, at::kFloat, "coeff");
  Grads grads(op, hidden, weight, bias, dhidden, dweight, dbias);
  TORCH_CHECK_VALUE(coeff.has_value() || !grads.any(), op, ": gradient outputs need coeff");
  const int64_t C = resolve_chunk(op, chunk_size, N);

  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, f32), lse = at::empty({N}, f32), rlse = at::empty({N}, f32);
  if (N == 0) {
    grads.finish(N);
    return {kl, lse, rlse};
  }
  const bool with_grad = coeff.has_value();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float cap = kl_cap(softcap), rcap = kl_cap(ref_softcap), tc = kl_tc(softcap, temperature);
  const bool* mk = mask.const_data_ptr<bool>();
  const float* cf = with_grad ? coeff->const_data_ptr<float>() : nullptr;
  float* kl_p = kl.mutable_data_ptr<float>();
  float* lse_p = lse.mutable_data_ptr<float>();
  float* rlse_p = rlse.mutable_data_ptr<float>();

  dispatch_dtype(hidden.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* b = row_bias<T>(bias);
    const T* rb = row_bias<T>(ref_bias);
    std::array<Side, 2> sides{Side{hidden, weight, bias}, Side{ref_hidden, ref_weight, ref_bias}};
    for_each_chunk<T>(sides, N, C, V, with_grad ? &grads : nullptr, [&](int64_t i, int64_t row, auto& zp, auto& fp) {
      float* x = fp[0] + i * V;
      float* y = fp[1] + i * V;
      load_row<T>(x, zp[0] + i * V, b, V);
      load_row<T>(y, zp[1] + i * V, rb, V);
      const float mx = transform_max_(x, V, cap, inv_t);
      const float my = transform_max_(y, V, rcap, inv_t);
      const double lsx = std::log(sum_exp(x, V, mx)), lsy = std::log(sum_exp(y, V, my));
      lse_p[row] = static_cast<float>(mx + lsx);
      rlse_p[row] = static_cast<float>(my + lsy);
      const float fx = static_cast<float>(lsx), fy = static_cast<float>(lsy);
      const bool live = mk[row];
      const float c = with_grad && live ? cf[row] * inv_t : 0.0f;
      double k = 0.0;
      if (live) {
        if (!reverse) {
          k = kl_forward_row_(x, y, V, mx, fx, my, fy, c, tc);
        } else {
          k = kl_reverse_row_(x, y, V, mx, fx, my, fy, c != 0.0f, tc);
          if (c != 0.0f) kl_reverse_grad_(x, y, V, static_cast<float>(k), c);
        }
      }
      kl_p[row] = static_cast<float>(k);
      if (!with_grad) return;
      if (c == 0.0f) std::fill(x, x + V, 0.0f);
      store_row<T>(zp[0] + i * V, x, V);
    });
  });
  grads.finish(N);
  return {kl, lse, rlse};
}

void kl_backward_cpu(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
                     const std::optional<at::Tensor>& ref_bias, const at::Tensor& lse, const at::Tensor& ref_lse,
                     const at::Tensor& kl, const at::Tensor& coeff, bool reverse, double temperature,
                     std::optional<double> softcap, std::optional<double> ref_softcap, int64_t chunk_size,
                     const std::optional<at::Tensor>& dhidden, const std::optional<at::Tensor>& dweight,
                     const std::optional<at::Tensor>& dbias) {
  const char* op = "surgery::kl_backward";
  check_kl(op, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, softcap, ref_softcap);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_per_token(op, lse, N, at::kFloat, "lse");
  check_per_token(op, ref_lse, N, at::kFloat, "ref_lse");
  check_per_token(op, kl, N, at::kFloat, "kl");
  check_per_token(op, coeff, N, at::kFloat, "coeff");
  Grads grads(op, hidden, weight, bias, dhidden, dweight, dbias);
  const int64_t C = resolve_chunk(op, chunk_size, N);
  if (N == 0 || !grads.any()) {
    grads.finish(0);
    return;
  }
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float cap = kl_cap(softcap), rcap = kl_cap(ref_softcap), tc = kl_tc(softcap, temperature);
  const float* cf = coeff.const_data_ptr<float>();
  const float* kl_p = kl.const_data_ptr<float>();

  dispatch_dtype(hidden.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* b = row_bias<T>(bias);
    const T* rb = row_bias<T>(ref_bias);
    std::array<Side, 2> sides{Side{hidden, weight, bias}, Side{ref_hidden, ref_weight, ref_bias}};
    for_each_chunk<T>(sides, N, C, V, &grads, [&](int64_t i, int64_t row, auto& zp, auto& fp) {
      float* x = fp[0] + i * V;
      const float c = cf[row] * inv_t;
      if (c == 0.0f) {
        std::fill(x, x + V, 0.0f);
      } else {
        float* y = fp[1] + i * V;
        load_row<T>(x, zp[0] + i * V, b, V);
        load_row<T>(y, zp[1] + i * V, rb, V);
        // Row statistics are recomputed rather than read from lse/ref_lse: a float lse is
        // not exact enough to form exp(z - lse) for logits ~1e4.
        const float mx = transform_max_(x, V, cap, inv_t);
        const float my = transform_max_(y, V, rcap, inv_t);
        const float lsx = static_cast<float>(std::log(sum_exp(x, V, mx)));
        const float lsy = static_cast<float>(std::log(sum_exp(y, V, my)));
        kl_grad_(x, y, V, mx, lsx, my, lsy, kl_p[row], c, reverse, tc);
      }
      store_row<T>(zp[0] + i * V, x, V);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(surgery, CPU, m) {
  m.impl("ce_forward", &ce_forward_cpu);
  m.impl("ce_backward", &ce_backward_cpu);
  m.impl("kl_forward", &kl_forward_cpu);
  m.impl("kl_backward", &kl_backward_cpu);
}

}  // namespace surgery
