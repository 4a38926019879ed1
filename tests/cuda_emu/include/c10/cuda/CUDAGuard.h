// Host-emulation stand-in for c10/cuda/CUDAGuard.h: no device to switch to.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};

}  // namespace c10::cuda
