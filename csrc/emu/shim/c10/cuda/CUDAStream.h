// CPU execution layer: the one stream of the emulated device.  Launches run synchronously on the
// calling thread, so stream order is program order.
#pragma once

#include <c10/core/Device.h>

#include "../../cuda_runtime.h"

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
  c10::Device device() const { return c10::Device(c10::kCPU); }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex /*device*/ = -1) { return CUDAStream(); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex /*device*/ = -1) { return CUDAStream(); }

}  // namespace cuda
}  // namespace c10
