// CUDA implementation of the surgery ops (schemas: TORCH_LIBRARY(surgery, m) in csrc/ops.cpp).
//
// Per chunk of `chunk_size` tokens: the logits GEMM through ATen (cuBLAS on the current stream)
// into a workspace allocated once per call and reused by every chunk, one fused row kernel
// (ce_rows.cuh / kl_rows.cuh, launched by rows.cu) for the statistics, the value and, in place,
// the logit gradient G, then dhidden_chunk = G @ W, dweight += G^T @ h_chunk (float32) and
// dbias += sum(G). Nothing here waits for the device.
//
// The workspace holds logits in the input dtype: the GEMM writes that dtype (as nn.Linear does),
// the gradient GEMMs read that dtype, and the row kernel does its math in float32 in between;
// a float32 workspace would double the chunk's memory and the row pass's traffic for bf16/fp16
// and still need a conversion before the gradient GEMMs.
//
// Only c10/cuda headers are used for the stream and errors: ATen/cuda/CUDAContext.h would pull
// in cuBLAS headers, which this file does not need and which a toolkit may lack.
#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rows.h"

// The device type the ops accept. Only tests/cuda_emu overrides it (CPU), to run this very file
// with the row kernels under host emulation; every real build takes CUDA.
#ifndef SURGERY_CUDA_DEVICE_TYPE
#define SURGERY_CUDA_DEVICE_TYPE c10::DeviceType::CUDA
#endif

namespace surgery_cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Logit elements per chunk when chunk_size <= 0: 2^24 (64 MiB of float32), as the torch backend.
constexpr int64_t kChunkElements = int64_t(1) << 24;

int64_t chunk_rows(int64_t n, int64_t v, int64_t chunk_size) {
  const int64_t rows = chunk_size > 0 ? chunk_size : kChunkElements / std::max<int64_t>(v, 1);
  return std::max<int64_t>(1, std::min<int64_t>(rows, n));
}

RowDtype row_dtype(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "hidden must be float32, bfloat16 or float16, got ", st);
  return st == at::kFloat ? RowDtype::kFloat32 : st == at::kBFloat16 ? RowDtype::kBFloat16 : RowDtype::kFloat16;
}

void check_hidden(const at::Tensor& hidden, const char* name) {
  TORCH_CHECK_VALUE(hidden.device().type() == SURGERY_CUDA_DEVICE_TYPE, name, " must be a CUDA tensor, got ",
                    hidden.device());
  TORCH_CHECK_VALUE(hidden.dim() == 2, name, " must be 2-D (N, H), got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(hidden.is_contiguous(), name, " must be contiguous");
  row_dtype(hidden);
}

// `t` lives on `device`, has `dtype` and `sizes`, and is contiguous.
void check_tensor(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype,
                  at::IntArrayRef sizes) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// A scalar option the row kernels divide by or compare in float32: positive, finite and, where
// float32 divides by it (softcap, temperature), a normal float32 (surgery_kernels.checks.positive
// refuses the same in Python; softcap = inf would give inf * tanh(0) = NaN logits).
void check_scalar(const char* name, const std::optional<double>& x, bool float32) {
  if (!x.has_value()) return;
  const double lo = float32 ? std::numeric_limits<float>::min() : std::numeric_limits<double>::denorm_min();
  const double hi = float32 ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  TORCH_CHECK_VALUE(*x >= lo && *x <= hi, name, " must be > 0 and finite", float32 ? " in float32" : "", ", got ",
                    *x);
}

// The checks every op makes on one side's (hidden, weight, bias); returns V.
int64_t check_side(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const char* hname,
                   const char* wname, const char* bname, const at::Device& device, int64_t n) {
  check_hidden(hidden, hname);
  check_tensor(hidden, hname, device, hidden.scalar_type(), {n, hidden.size(1)});
  TORCH_CHECK_VALUE(weight.dim() == 2, wname, " must be 2-D (V, H), got shape ", weight.sizes());
  const int64_t v = weight.size(0);
  check_tensor(weight, wname, device, hidden.scalar_type(), {v, hidden.size(1)});
  if (bias.has_value()) check_tensor(*bias, bname, device, hidden.scalar_type(), {v});
  return v;
}

// dweight (V, H) float32 += a (V, c) @ b (c, H).
//
// For bf16/fp16 inputs cuBLAS can accumulate straight into the float32 dweight through
// addmm's out_dtype overload. Torch versions whose overload insists on `self` having the
// inputs' dtype reject that with a c10::Error before anything is launched; those fall back,
// once and for all, to a GEMM into a scratch of the input dtype followed by a float32 add
// (what the torch backend does).
std::atomic<int> g_mixed_addmm{-1};  // -1 unknown, 0 unsupported, 1 supported

void addmm_float32_(at::Tensor& dweight, const at::Tensor& a, const at::Tensor& b, at::Tensor& scratch) {
  if (a.scalar_type() == at::kFloat) {
    dweight.addmm_(a, b);
    return;
  }
  if (g_mixed_addmm.load() != 0) {
    try {
      at::addmm_out(dweight, dweight, a, b, at::kFloat);
      g_mixed_addmm.store(1);
      return;
    } catch (const c10::Error&) {
      if (g_mixed_addmm.load() == 1) throw;
      g_mixed_addmm.store(0);
    }
  }
  if (!scratch.defined()) scratch = at::empty(dweight.sizes(), a.options());
  at::mm_out(scratch, a, b);
  dweight.add_(scratch);
}

// The optional gradient outputs of one op and how a chunk's logit gradient G adds to them.
class GradOutputs {
 public:
  GradOutputs(const OptTensor& dhidden, const OptTensor& dweight, const OptTensor& dbias)
      : dh_(dhidden), dw_(dweight), db_(dbias) {}

  bool any() const { return dh_.has_value() || dw_.has_value() || db_.has_value(); }

  void check(const at::Tensor& hidden, const at::Tensor& weight) const {
    const auto device = hidden.device();
    if (dh_) check_tensor(*dh_, "dhidden", device, hidden.scalar_type(), hidden.sizes());
    if (dw_) check_tensor(*dw_, "dweight", device, at::kFloat, weight.sizes());
    if (db_) check_tensor(*db_, "dbias", device, at::kFloat, {weight.size(0)});
  }

  // dweight and dbias accumulate over chunks: start them at zero.
  void begin() {
    if (dw_) dw_->zero_();
    if (db_) db_->zero_();
  }

  // g: (c, V) logit gradient of tokens [start, start + c); h: those tokens' hidden (c, H).
  void add_chunk(const at::Tensor& g, const at::Tensor& h, const at::Tensor& weight, int64_t start) {
    if (dh_) {
      at::Tensor out = dh_->narrow(0, start, g.size(0));
      at::mm_out(out, g, weight);
    }
    if (dw_) addmm_float32_(*dw_, g.t(), h, dw_scratch_);
    if (db_) {
      const int64_t dim0[1] = {0};
      db_->add_(at::sum(g, at::IntArrayRef(dim0, 1), /*keepdim=*/false, at::kFloat));
    }
  }

 private:
  OptTensor dh_, dw_, db_;
  at::Tensor dw_scratch_;
};

// For the body of an op: the tensors' GPU is the current device, and the ATen calls inside (GEMMs,
// sum) run as written even when the caller has autocast on (no hidden casts or copies).
struct OpScope {
  explicit OpScope(const at::Tensor& t) : device(t.device()), no_autocast(c10::autocast_dispatch_keyset) {}
  c10::cuda::CUDAGuard device;
  c10::impl::ExcludeDispatchKeyGuard no_autocast;
};

const void* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Pointer to row `s` of a per-token array, or nullptr.
template <typename P>
P at_row(P p, int64_t s) {
  return p == nullptr ? nullptr : p + s;
}

// ---- cross-entropy ----

void check_ce(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& target,
              const OptTensor& coeff, const std::optional<double>& softcap) {
  const auto device = hidden.device();
  const int64_t n = hidden.dim() == 2 ? hidden.size(0) : -1;
  check_side(hidden, weight, bias, "hidden", "weight", "bias", device, n);
  check_tensor(target, "target", device, at::kLong, {n});
  if (coeff) check_tensor(*coeff, "coeff", device, at::kFloat, {n});
  check_scalar("softcap", softcap, true);
}

// The chunk loop shared by ce_forward and ce_backward. `rows` holds the per-token pointers
// (row 0) and options; each chunk gets them offset to its first token.
void ce_chunks(const at::Tensor& hidden, const at::Tensor& weight, const CeRowsArgs& rows, int64_t chunk_size,
               GradOutputs& grads) {
  const int64_t n = hidden.size(0);
  const int64_t v = weight.size(0);
  const bool write_grad = rows.coeff != nullptr;
  grads.begin();
  // Backward with no gradient output wanted: nothing to compute.
  if (n == 0 || (rows.ce == nullptr && !write_grad)) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  const int64_t chunk = chunk_rows(n, v, chunk_size);
  at::Tensor ws = at::empty({chunk, v}, hidden.options());
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor z = ws.narrow(0, 0, c);
    const at::Tensor h = hidden.narrow(0, s, c);
    at::mm_out(z, h, weight.t());
    CeRowsArgs a = rows;
    a.logits = z.data_ptr();
    a.target = rows.target + s;
    a.coeff = at_row(rows.coeff, s);
    a.ce = at_row(rows.ce, s);
    a.lse = at_row(rows.lse, s);
    a.rows = c;
    a.vocab = v;
    launch_ce_rows(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (write_grad) grads.add_chunk(z, h, weight, s);
  }
}

CeRowsArgs ce_rows_args(const at::Tensor& hidden, const OptTensor& bias, const at::Tensor& target,
                        const OptTensor& coeff, const GradOutputs& grads, int64_t ignore_index,
                        const std::optional<double>& softcap) {
  CeRowsArgs a;
  a.bias = opt_ptr(bias);
  a.target = target.const_data_ptr<int64_t>();
  // The gradient pass runs only when some gradient output is wanted.
  a.coeff = coeff.has_value() && grads.any() ? coeff->const_data_ptr<float>() : nullptr;
  a.ignore_index = ignore_index;
  a.has_softcap = softcap.has_value();
  a.softcap = static_cast<float>(softcap.value_or(0.0));
  a.dtype = row_dtype(hidden);
  return a;
}

std::tuple<at::Tensor, at::Tensor> ce_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                   const OptTensor& bias, const at::Tensor& target,
                                                   const OptTensor& coeff, int64_t ignore_index,
                                                   std::optional<double> softcap, std::optional<double> ascent_cap,
                                                   int64_t chunk_size, const OptTensor& dhidden,
                                                   const OptTensor& dweight, const OptTensor& dbias) {
  check_ce(hidden, weight, bias, target, coeff, softcap);
  check_scalar("ascent_cap", ascent_cap, false);
  GradOutputs grads(dhidden, dweight, dbias);
  TORCH_CHECK_VALUE(coeff.has_value() || !grads.any(), "dhidden, dweight and dbias need coeff");
  grads.check(hidden, weight);
  const OpScope scope(hidden);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor ce = at::empty({hidden.size(0)}, f32);
  at::Tensor lse = at::empty({hidden.size(0)}, f32);
  CeRowsArgs a = ce_rows_args(hidden, bias, target, coeff, grads, ignore_index, softcap);
  a.ce = ce.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.has_ascent_cap = ascent_cap.has_value();
  a.ascent_cap = static_cast<float>(ascent_cap.value_or(0.0));
  ce_chunks(hidden, weight, a, chunk_size, grads);
  return {ce, lse};
}

void ce_backward_cuda(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& target, const at::Tensor& lse, const at::Tensor& coeff, int64_t ignore_index,
                      std::optional<double> softcap, int64_t chunk_size, const OptTensor& dhidden,
                      const OptTensor& dweight, const OptTensor& dbias) {
  check_ce(hidden, weight, bias, target, coeff, softcap);
  // lse is checked but not read: the row pass recomputes the row max and sum-exp, because
  // exp(z - lse) with a float32 lse loses ~1e-3 relative accuracy at logits ~1e4.
  check_tensor(lse, "lse", hidden.device(), at::kFloat, {hidden.size(0)});
  GradOutputs grads(dhidden, dweight, dbias);
  grads.check(hidden, weight);
  const OpScope scope(hidden);
  // coeff already holds zeros for capped tokens: no ascent cap here.
  ce_chunks(hidden, weight, ce_rows_args(hidden, bias, target, coeff, grads, ignore_index, softcap), chunk_size,
            grads);
}

// ---- KL ----

void check_kl(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& ref_hidden,
              const at::Tensor& ref_weight, const OptTensor& ref_bias, const OptTensor& coeff, double temperature,
              const std::optional<double>& softcap, const std::optional<double>& ref_softcap) {
  const auto device = hidden.device();
  const int64_t n = hidden.dim() == 2 ? hidden.size(0) : -1;
  const int64_t v = check_side(hidden, weight, bias, "hidden", "weight", "bias", device, n);
  check_side(ref_hidden, ref_weight, ref_bias, "ref_hidden", "ref_weight", "ref_bias", device, n);
  TORCH_CHECK_TYPE(ref_hidden.scalar_type() == hidden.scalar_type(), "ref_hidden must have hidden's dtype ",
                   hidden.scalar_type(), ", got ", ref_hidden.scalar_type());
  TORCH_CHECK_VALUE(ref_weight.size(0) == v, "ref_weight must have V = ", v, " rows, got ", ref_weight.size(0));
  if (coeff) check_tensor(*coeff, "coeff", device, at::kFloat, {n});
  check_scalar("temperature", temperature, true);
  check_scalar("softcap", softcap, true);
  check_scalar("ref_softcap", ref_softcap, true);
}

// The chunk loop shared by kl_forward and kl_backward (see ce_chunks).
void kl_chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ref_hidden,
               const at::Tensor& ref_weight, const KlRowsArgs& rows, int64_t chunk_size, GradOutputs& grads) {
  const int64_t n = hidden.size(0);
  const int64_t v = weight.size(0);
  const bool write_grad = rows.coeff != nullptr;
  grads.begin();
  if (n == 0 || (rows.kl == nullptr && !write_grad)) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  const int64_t chunk = chunk_rows(n, v, chunk_size);
  at::Tensor ws = at::empty({chunk, v}, hidden.options());
  at::Tensor ref_ws = at::empty({chunk, v}, hidden.options());
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor z = ws.narrow(0, 0, c);
    at::Tensor zr = ref_ws.narrow(0, 0, c);
    const at::Tensor h = hidden.narrow(0, s, c);
    at::mm_out(z, h, weight.t());
    at::mm_out(zr, ref_hidden.narrow(0, s, c), ref_weight.t());
    KlRowsArgs a = rows;
    a.logits = z.data_ptr();
    a.ref_logits = zr.data_ptr();
    a.mask = at_row(rows.mask, s);
    a.coeff = at_row(rows.coeff, s);
    a.kl = at_row(rows.kl, s);
    a.lse = at_row(rows.lse, s);
    a.ref_lse = at_row(rows.ref_lse, s);
    a.rows = c;
    a.vocab = v;
    launch_kl_rows(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (write_grad) grads.add_chunk(z, h, weight, s);
  }
}

KlRowsArgs kl_rows_args(const at::Tensor& hidden, const OptTensor& bias, const OptTensor& ref_bias,
                        const OptTensor& coeff, const GradOutputs& grads, bool reverse, double temperature,
                        const std::optional<double>& softcap, const std::optional<double>& ref_softcap) {
  KlRowsArgs a;
  a.bias = opt_ptr(bias);
  a.ref_bias = opt_ptr(ref_bias);
  a.coeff = coeff.has_value() && grads.any() ? coeff->const_data_ptr<float>() : nullptr;
  a.reverse = reverse;
  a.temperature = static_cast<float>(temperature);
  a.has_softcap = softcap.has_value();
  a.softcap = static_cast<float>(softcap.value_or(0.0));
  a.has_ref_softcap = ref_softcap.has_value();
  a.ref_softcap = static_cast<float>(ref_softcap.value_or(0.0));
  a.dtype = row_dtype(hidden);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& ref_hidden,
    const at::Tensor& ref_weight, const OptTensor& ref_bias, const at::Tensor& mask, const OptTensor& coeff,
    bool reverse, double temperature, std::optional<double> softcap, std::optional<double> ref_softcap,
    int64_t chunk_size, const OptTensor& dhidden, const OptTensor& dweight, const OptTensor& dbias) {
  check_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, coeff, temperature, softcap, ref_softcap);
  check_tensor(mask, "mask", hidden.device(), at::kBool, {hidden.size(0)});
  GradOutputs grads(dhidden, dweight, dbias);
  TORCH_CHECK_VALUE(coeff.has_value() || !grads.any(), "dhidden, dweight and dbias need coeff");
  grads.check(hidden, weight);
  const OpScope scope(hidden);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({hidden.size(0)}, f32);
  at::Tensor lse = at::empty({hidden.size(0)}, f32);
  at::Tensor ref_lse = at::empty({hidden.size(0)}, f32);
  KlRowsArgs a = kl_rows_args(hidden, bias, ref_bias, coeff, grads, reverse, temperature, softcap, ref_softcap);
  a.mask = mask.const_data_ptr<bool>();
  a.kl = kl.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.ref_lse = ref_lse.data_ptr<float>();
  kl_chunks(hidden, weight, ref_hidden, ref_weight, a, chunk_size, grads);
  return {kl, lse, ref_lse};
}

void kl_backward_cuda(const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& ref_hidden, const at::Tensor& ref_weight, const OptTensor& ref_bias,
                      const at::Tensor& lse, const at::Tensor& ref_lse, const at::Tensor& kl, const at::Tensor& coeff,
                      bool reverse, double temperature, std::optional<double> softcap,
                      std::optional<double> ref_softcap, int64_t chunk_size, const OptTensor& dhidden,
                      const OptTensor& dweight, const OptTensor& dbias) {
  check_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, coeff, temperature, softcap, ref_softcap);
  // lse, ref_lse and kl are checked but not read: the row pass recomputes the row statistics
  // (exact for logits ~1e4, see ce_backward_cuda) and with them the kl of each row.
  const int64_t n = hidden.size(0);
  check_tensor(lse, "lse", hidden.device(), at::kFloat, {n});
  check_tensor(ref_lse, "ref_lse", hidden.device(), at::kFloat, {n});
  check_tensor(kl, "kl", hidden.device(), at::kFloat, {n});
  GradOutputs grads(dhidden, dweight, dbias);
  grads.check(hidden, weight);
  const OpScope scope(hidden);
  kl_chunks(hidden, weight, ref_hidden, ref_weight,
            kl_rows_args(hidden, bias, ref_bias, coeff, grads, reverse, temperature, softcap, ref_softcap), chunk_size,
            grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(surgery, CUDA, m) {
  m.impl("ce_forward", &ce_forward_cuda);
  m.impl("ce_backward", &ce_backward_cuda);
  m.impl("kl_forward", &kl_forward_cuda);
  m.impl("kl_backward", &kl_backward_cuda);
}

}  // namespace surgery_cuda
