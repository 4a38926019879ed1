// csrc/cuda/ops_cuda.cpp, built for CPU tensors with the row kernels under host emulation, as the
// ops surgery_emu::{ce,kl}_{forward,backward} (tests/test_cuda_emulated_ops.py).
//
// - c10/cuda/{CUDAStream,CUDAGuard,CUDAException}.h resolve to the stand-ins in include/ (that
//   directory comes before torch's on the include path);
// - the schemas are csrc/ops.cpp's, registered under the namespace surgery_emu so that they do not
//   clash with the real extension's ops in the same process;
// - ops_cuda.cpp's TORCH_LIBRARY_IMPL(surgery, CUDA) block becomes a plain function, registered
//   below for CPU; SURGERY_CUDA_DEVICE_TYPE makes its device check accept CPU tensors;
// - the launchers come from emu_rows.cpp (the kernels run there, one block after another).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) void emulated_impls(torch::Library& m)
#define SURGERY_CUDA_DEVICE_TYPE c10::DeviceType::CPU
#define surgery surgery_emu
#include "ops.cpp"
#include "cuda/ops_cuda.cpp"
#undef surgery

static const torch::detail::TorchLibraryInit surgery_emu_cpu_impls(torch::Library::IMPL,
                                                                   &surgery_cuda::emulated_impls, "surgery_emu",
                                                                   std::make_optional(c10::DispatchKey::CPU),
                                                                   __FILE__, __LINE__);
