// Launchers of the fused row kernels (defined in ce_rows.cu and kl_rows.cu).
//
// This header is shared by the .cu files (nvcc) and ops_cuda.cpp (host compiler), so it holds
// plain C++ only: raw pointers, sizes and a stream; no ATen. Every launcher enqueues one kernel
// on `stream` and returns without synchronizing; the caller checks the launch error.
//
// A row is one token's logits: `rows` rows of `vocab` elements, contiguous, in the input dtype.
// All index arithmetic is 64-bit (rows * vocab may exceed 2^31).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace surgery_cuda {

// Element type of the logits workspace, the bias and the reference-side tensors.
enum class RowDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Every row pass first reads the row(s) for the softmax statistics (row max m and
// log sum exp(x - m), kept apart: a float32 lse = m + log d has lost ~1e-3 at |z| ~ 1e4, so
// probabilities are formed as exp((x - m) - log d)). The backward ops recompute these
// statistics instead of reading the forward's lse for the same reason.

// Cross-entropy rows. Forward (`ce`, `lse` given): writes lse and ce (0 where target ==
// ignore_index); with `coeff` also overwrites each row with coeff_i * d ce_i / d z_raw, except
// rows with coeff_i < 0 and ce_i > ascent_cap (bounded ascent), which get zeros. Backward (`ce`,
// `lse` null, `coeff` given): overwrites each row with coeff_i * d ce_i / d z_raw.
// Ignored rows always get a zero gradient row.
struct CeRowsArgs {
  void* logits = nullptr;           // (rows, vocab) z = hidden @ weight^T (bias not yet added)
  const void* bias = nullptr;       // (vocab,) or nullptr
  const int64_t* target = nullptr;  // (rows,)
  const float* coeff = nullptr;     // (rows,) or nullptr: values only
  float* ce = nullptr;              // (rows,) forward output, nullptr in backward
  float* lse = nullptr;             // (rows,) forward output, nullptr in backward
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  bool has_softcap = false;
  float softcap = 0.f;
  bool has_ascent_cap = false;
  float ascent_cap = 0.f;
  RowDtype dtype = RowDtype::kFloat32;
};

// KL rows between q = softmax(s / T) (trained side, `logits`) and p = softmax(s_ref / T)
// (reference side, `ref_logits`, read only); forward direction KL(p || q), reverse KL(q || p).
// s = z + bias, then softcap * tanh(. / softcap) when has_softcap; s_ref likewise with ref_bias and
// ref_softcap. Forward (`kl`, `lse`, `ref_lse` and `mask` given): writes lse, ref_lse (of s / T and
// s_ref / T) and kl (0 where mask is false); with `coeff` also overwrites the trained rows with
// coeff_i * d kl_i / d z (softcap chain rule included; zeros where mask is false). Backward
// (outputs and mask null, `coeff` given): overwrites the trained rows with coeff_i * d kl_i / d z.
struct KlRowsArgs {
  void* logits = nullptr;            // (rows, vocab) hidden @ weight^T
  const void* ref_logits = nullptr;  // (rows, vocab) ref_hidden @ ref_weight^T
  const void* bias = nullptr;        // (vocab,) or nullptr
  const void* ref_bias = nullptr;    // (vocab,) or nullptr
  const bool* mask = nullptr;        // (rows,) forward only
  const float* coeff = nullptr;      // (rows,) or nullptr: values only
  float* kl = nullptr;               // (rows,) forward output
  float* lse = nullptr;              // (rows,) forward output
  float* ref_lse = nullptr;          // (rows,) forward output
  int64_t rows = 0;
  int64_t vocab = 0;
  bool reverse = false;
  float temperature = 1.f;
  bool has_softcap = false;
  float softcap = 0.f;
  bool has_ref_softcap = false;
  float ref_softcap = 0.f;
  RowDtype dtype = RowDtype::kFloat32;
};

void launch_ce_rows(const CeRowsArgs& args, cudaStream_t stream);
void launch_kl_rows(const KlRowsArgs& args, cudaStream_t stream);

}  // namespace surgery_cuda
