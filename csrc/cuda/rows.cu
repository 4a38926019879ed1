// Launchers of the fused row kernels: pick the storage type and the block size, launch on the
// caller's stream. The kernels live in ce_rows.cuh / kl_rows.cuh (headers, so that the CPU
// emulation test in tests/cuda_emu can compile the very same device code with a host compiler).
#include "ce_rows.cuh"
#include "kl_rows.cuh"

namespace surgery_cuda {
namespace {

template <typename T, int kThreads>
void launch(const CeRowsArgs& a, cudaStream_t stream) {
  ce_rows_kernel<T, kThreads><<<grid_for_rows(a.rows), kThreads, 0, stream>>>(a);
}

template <typename T, int kThreads>
void launch(const KlRowsArgs& a, cudaStream_t stream) {
  kl_rows_kernel<T, kThreads><<<grid_for_rows(a.rows), kThreads, 0, stream>>>(a);
}

template <typename T, typename Args>
void launch_threads(const Args& a, cudaStream_t stream) {
  switch (threads_for_vocab(a.vocab)) {
    case 512: return launch<T, 512>(a, stream);
    case 256: return launch<T, 256>(a, stream);
    default: return launch<T, 128>(a, stream);
  }
}

template <typename Args>
void launch_dtype(const Args& a, cudaStream_t stream) {
  // A launch with an empty grid is an error; there is nothing to do anyway.
  if (a.rows <= 0 || a.vocab <= 0) return;
  switch (a.dtype) {
    case RowDtype::kFloat32: return launch_threads<float>(a, stream);
    case RowDtype::kBFloat16: return launch_threads<__nv_bfloat16>(a, stream);
    case RowDtype::kFloat16: return launch_threads<__half>(a, stream);
  }
}

}  // namespace

void launch_ce_rows(const CeRowsArgs& args, cudaStream_t stream) { launch_dtype(args, stream); }

void launch_kl_rows(const KlRowsArgs& args, cudaStream_t stream) { launch_dtype(args, stream); }

}  // namespace surgery_cuda
