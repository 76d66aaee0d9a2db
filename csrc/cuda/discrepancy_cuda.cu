// CUDA translation unit of the discrepancy ops.
//
// Foundation stage: this unit proves that the shared arithmetic in csrc/common compiles as
// device code (the CI build links it for sm_80/sm_90 with no GPU present).  It registers no
// kernel yet; the CUDA implementations of the lwkd ops arrive with the GPU-kernels issue, and
// until then CUDA tensors are served by the Triton or reference backends.
#include <cuda_runtime.h>

#include "common/lwkd_common.h"

namespace lwkd {
namespace {

template <typename T>
__global__ void common_math_smoke(const T* x, T* y, int n, T p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    y[i] = abs_pow<PowMode::kGeneral>(x[i], p) + abs_pow_grad<PowMode::kTwo>(x[i], p) +
           jsd_term(x[i], T(0.5), T(0.5)) + jsd_grad_ps(x[i], T(0.5), T(0.5)) +
           sqdist_term(x[i], T(1), T(1), T(1));
  }
}

template __global__ void common_math_smoke<float>(const float*, float*, int, float);
template __global__ void common_math_smoke<double>(const double*, double*, int, double);

}  // namespace
}  // namespace lwkd
