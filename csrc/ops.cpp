// The schemas of the four surgery ops, registered once for every device.
//
// Implementations live per device: csrc/cpu_losses.cpp (CPU) and csrc/cuda/ (CUDA), each in a
// TORCH_LIBRARY_IMPL block; fake (meta) kernels and autograd are added from Python
// (surgery_kernels/backends/extension.py). The semantics are those of the Python primitives in
// surgery_kernels/backends/__init__.py, with surgery_kernels/backends/chunked.py as reference:
//
// - *_forward with coeff = None computes the per-token values and log-sum-exps only; with coeff it
//   also writes the gradient of sum_i coeff_i * value_i into the optional gradient outputs in the
//   same pass over each chunk of logits (ce_forward: tokens with coeff_i < 0 and ce_i > ascent_cap
//   get no gradient).
// - *_backward recomputes the logits and writes the gradient of sum_i coeff_i * value_i. An
//   implementation may recompute the row statistics instead of reading lse/ref_lse (the CPU one
//   does: exp(z - lse) with a float32 lse loses ~1e-3 relative accuracy for logits ~1e4).
// - Gradient outputs, each optional (None = skip that GEMM), are overwritten entirely: dhidden in
//   hidden's dtype, dweight and dbias in float32.

#include <torch/library.h>

TORCH_LIBRARY(surgery, m) {
  m.def(
      "ce_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? coeff, int ignore_index, "
      "float? softcap, float? ascent_cap, int chunk_size, "
      "Tensor(a!)? dhidden, Tensor(b!)? dweight, Tensor(c!)? dbias) -> (Tensor ce, Tensor lse)");
  m.def(
      "ce_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor lse, Tensor coeff, "
      "int ignore_index, float? softcap, int chunk_size, "
      "Tensor(a!)? dhidden, Tensor(b!)? dweight, Tensor(c!)? dbias) -> ()");
  m.def(
      "kl_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, Tensor ref_weight, "
      "Tensor? ref_bias, Tensor mask, Tensor? coeff, bool reverse, float temperature, float? softcap, "
      "float? ref_softcap, int chunk_size, Tensor(a!)? dhidden, Tensor(b!)? dweight, Tensor(c!)? dbias) "
      "-> (Tensor kl, Tensor lse, Tensor ref_lse)");
  m.def(
      "kl_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, Tensor ref_weight, "
      "Tensor? ref_bias, Tensor lse, Tensor ref_lse, Tensor kl, Tensor coeff, bool reverse, float temperature, "
      "float? softcap, float? ref_softcap, int chunk_size, Tensor(a!)? dhidden, Tensor(b!)? dweight, "
      "Tensor(c!)? dbias) -> ()");
}
