// C entry points that run the row kernels of csrc/cuda under the host emulation (emu.h), for
// tests/test_cuda_emulated.py (loaded with ctypes). Built with -Itests/cuda_emu/include first,
// so the kernels' CUDA includes resolve to the stand-ins.
#include "ce_rows.cuh"
#include "kl_rows.cuh"

namespace {

using surgery_cuda::CeRowsArgs;
using surgery_cuda::KlRowsArgs;
using surgery_cuda::RowDtype;

template <typename T, int kThreads>
void run(const CeRowsArgs& a, unsigned int grid) {
  emu::launch(surgery_cuda::ce_rows_kernel<T, kThreads>, grid, kThreads, a);
}

template <typename T, int kThreads>
void run(const KlRowsArgs& a, unsigned int grid) {
  emu::launch(surgery_cuda::kl_rows_kernel<T, kThreads>, grid, kThreads, a);
}

template <typename T, typename Args>
int run_threads(const Args& a, int threads, unsigned int grid) {
  switch (threads) {
    case 512: run<T, 512>(a, grid); return 0;
    case 256: run<T, 256>(a, grid); return 0;
    case 128: run<T, 128>(a, grid); return 0;
    default: return 1;
  }
}

// threads <= 0: the block size the real launcher picks; grid <= 0: one block per row.
template <typename Args>
int run_dtype(const Args& a, int threads, int grid) {
  if (a.rows <= 0) return 0;
  if (threads <= 0) threads = surgery_cuda::threads_for_vocab(a.vocab);
  const unsigned int g = grid > 0 ? static_cast<unsigned int>(grid) : surgery_cuda::grid_for_rows(a.rows);
  switch (a.dtype) {
    case RowDtype::kFloat32: return run_threads<float>(a, threads, g);
    case RowDtype::kBFloat16: return run_threads<__nv_bfloat16>(a, threads, g);
    case RowDtype::kFloat16: return run_threads<__half>(a, threads, g);
  }
  return 1;
}

}  // namespace

extern "C" int emu_ce_rows(void* logits, const void* bias, const int64_t* target, const float* coeff, float* ce,
                           float* lse, int64_t rows, int64_t vocab,
                           int64_t ignore_index, int has_softcap, float softcap, int has_ascent_cap,
                           float ascent_cap, int dtype, int threads, int grid) {
  CeRowsArgs a;
  a.logits = logits;
  a.bias = bias;
  a.target = target;
  a.coeff = coeff;
  a.ce = ce;
  a.lse = lse;
  a.rows = rows;
  a.vocab = vocab;
  a.ignore_index = ignore_index;
  a.has_softcap = has_softcap != 0;
  a.softcap = softcap;
  a.has_ascent_cap = has_ascent_cap != 0;
  a.ascent_cap = ascent_cap;
  a.dtype = static_cast<RowDtype>(dtype);
  return run_dtype(a, threads, grid);
}

extern "C" int emu_kl_rows(void* logits, const void* ref_logits, const void* bias, const void* ref_bias,
                           const bool* mask, const float* coeff, float* kl, float* lse, float* ref_lse,
                           int64_t rows, int64_t vocab,
                           int reverse, float temperature, int has_softcap, float softcap, int has_ref_softcap,
                           float ref_softcap, int dtype, int threads, int grid) {
  KlRowsArgs a;
  a.logits = logits;
  a.ref_logits = ref_logits;
  a.bias = bias;
  a.ref_bias = ref_bias;
  a.mask = mask;
  a.coeff = coeff;
  a.kl = kl;
  a.lse = lse;
  a.ref_lse = ref_lse;
  a.rows = rows;
  a.vocab = vocab;
  a.reverse = reverse != 0;
  a.temperature = temperature;
  a.has_softcap = has_softcap != 0;
  a.softcap = softcap;
  a.has_ref_softcap = has_ref_softcap != 0;
  a.ref_softcap = ref_softcap;
  a.dtype = static_cast<RowDtype>(dtype);
  return run_dtype(a, threads, grid);
}

// The launchers ops_cuda.cpp calls (tests/cuda_emu/ops_emu.cpp): a few blocks take the rows in
// turn through the kernels' grid-stride loop, which keeps the number of emulated threads small.
namespace surgery_cuda {

void launch_ce_rows(const CeRowsArgs& args, cudaStream_t) {
  run_dtype(args, 0, static_cast<int>(args.rows < 3 ? args.rows : 3));
}

void launch_kl_rows(const KlRowsArgs& args, cudaStream_t) {
  run_dtype(args, 0, static_cast<int>(args.rows < 3 ? args.rows : 3));
}

}  // namespace surgery_cuda
