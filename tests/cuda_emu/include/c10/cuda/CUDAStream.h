// Host-emulation stand-in for c10/cuda/CUDAStream.h (tests/cuda_emu/ops_emu.cpp): the ops ask
// for the current stream and pass it to the (emulated) launchers, which ignore it.
#pragma once

#include <c10/core/Device.h>

#include <cuda_runtime_api.h>

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
