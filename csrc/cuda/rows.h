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

// Cross-entropy rows. Two modes:
//  - forward (lse_in == nullptr): computes lse and ce (written to `lse`, `ce`); with `coeff`
//    it also overwrites each row with coeff_i * d ce_i / d z_raw (bounded ascent applied: a
//    row with coeff_i < 0 and ce_i > ascent_cap gets zeros).
//  - backward (lse_in != nullptr, coeff required): overwrites each row with
//    coeff_i * d ce_i / d z_raw using the given lse; `ce`, `lse` are not touched.
// Rows whose target is ignore_index get ce = 0 and a zero gradient row.
struct CeRowsArgs {
  void* logits = nullptr;           // (rows, vocab) z = hidden @ weight^T (bias not yet added)
  const void* bias = nullptr;       // (vocab,) or nullptr
  const int64_t* target = nullptr;  // (rows,)
  const float* coeff = nullptr;     // (rows,) or nullptr: values only
  const float* lse_in = nullptr;    // (rows,) or nullptr
  float* ce = nullptr;              // (rows,) forward output
  float* lse = nullptr;             // (rows,) forward output
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  bool has_softcap = false;
  float softcap = 0.f;
  bool has_ascent_cap = false;
  float ascent_cap = 0.f;
  RowDtype dtype = RowDtype::kFloat32;
};

// KL rows between q = softmax(z / T) (trained side, `logits`) and p = softmax(z_ref / T)
// (reference side, `ref_logits`, read only). Two modes:
//  - forward (lse_in == nullptr): writes lse, ref_lse and kl (0 where mask is false);
//    forward direction KL(p || q), reverse KL(q || p). With `coeff` it also overwrites the
//    trained rows with coeff_i * d kl_i / d z (0 where mask is false).
//  - backward (lse_in, ref_lse_in, kl_in and coeff given): overwrites the trained rows with
//    coeff_i * d kl_i / d z.
struct KlRowsArgs {
  void* logits = nullptr;            // (rows, vocab) hidden @ weight^T
  const void* ref_logits = nullptr;  // (rows, vocab) ref_hidden @ ref_weight^T
  const void* bias = nullptr;        // (vocab,) or nullptr
  const void* ref_bias = nullptr;    // (vocab,) or nullptr
  const bool* mask = nullptr;        // (rows,) forward mode only
  const float* coeff = nullptr;      // (rows,) or nullptr: values only
  const float* lse_in = nullptr;     // (rows,) backward mode
  const float* ref_lse_in = nullptr; // (rows,) backward mode
  const float* kl_in = nullptr;      // (rows,) backward mode
  float* kl = nullptr;               // (rows,) forward output
  float* lse = nullptr;              // (rows,) forward output
  float* ref_lse = nullptr;          // (rows,) forward output
  int64_t rows = 0;
  int64_t vocab = 0;
  bool reverse = false;
  float temperature = 1.f;
  RowDtype dtype = RowDtype::kFloat32;
};

void launch_ce_rows(const CeRowsArgs& args, cudaStream_t stream);
void launch_kl_rows(const KlRowsArgs& args, cudaStream_t stream);

}  // namespace surgery_cuda
