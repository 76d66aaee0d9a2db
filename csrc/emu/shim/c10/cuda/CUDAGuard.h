// CPU execution layer: device guards.  The emulated device is the CPU; a guard for any other
// device means the host code handed a tensor of another device to an emulated kernel.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "CUDAStream.h"

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "lwkd_emu: CUDAGuard for ", device,
                ": the emulated CUDA kernels run on CPU tensors only");
  }
  explicit CUDAGuard(c10::DeviceIndex /*index*/) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device> device) {
    if (device.has_value()) CUDAGuard g(*device);
  }
};

struct CUDAStreamGuard {
  explicit CUDAStreamGuard(const CUDAStream& /*stream*/) {}
};

}  // namespace cuda
}  // namespace c10
