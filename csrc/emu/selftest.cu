// Self-test kernels of the CUDA CPU execution layer (compiled only into torch.ops.lwkd_emu, never
// by nvcc): each case is ordinary CUDA, correct or carrying one deliberate bug, so
// tests/test_cuda_emu.py can show that the layer executes CUDA semantics and catches what the
// GPU would get wrong or fault on.
//
//   torch.ops.lwkd_emu._selftest(case, x) -> Tensor
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace lwkd_selftest {
namespace {

constexpr int kThreads = 256;

// ---- correct building blocks ------------------------------------------------------------------
__device__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// sum of x[0..n) per block, written to out[blockIdx.x]; `barriers` drops the first (1) or the
// second (2) barrier of the two-level reduction (the bugs a schedule must expose)
__global__ void block_sum_kernel(const float* x, int64_t n, float* out, int drop) {
  __shared__ float red[kThreads / 32];
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
  for (int rep = 0; rep < 2; ++rep) {  // two reductions back to back reuse `red`
    float w = warp_sum(v);
    if (drop != 1) __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = w;
    if (drop != 2) __syncthreads();
    float r = 0.f;
    for (int k = 0; k < kThreads / 32; ++k) r += red[k];
    v = r / float(kThreads);  // every thread holds the block sum / 256 for the next round
  }
  if (threadIdx.x == 0) out[blockIdx.x] = v * float(kThreads);
}

// out[t] = the results of every warp collective for lane t (one row of 8 per thread)
__global__ void warp_ops_kernel(const float* x, float* out) {
  const unsigned t = threadIdx.x;
  const float v = x[t];
  float* o = out + t * 8;
  o[0] = __shfl_down_sync(0xffffffffu, v, 3);
  o[1] = __shfl_up_sync(0xffffffffu, v, 5);
  o[2] = __shfl_xor_sync(0xffffffffu, v, 9);
  o[3] = __shfl_sync(0xffffffffu, v, 7);
  o[4] = __shfl_down_sync(0xffffffffu, v, 3, 16);
  o[5] = __shfl_xor_sync(0xffffffffu, v, 5, 8);
  o[6] = float(__ballot_sync(0xffffffffu, v > 0.f) & 0xffffu);
  o[7] = float(__any_sync(0xffffffffu, v > 2.5f)) + 2.f * float(__all_sync(0xffffffffu, v > -10.f));
  __syncwarp();
}

// ---- deliberate bugs --------------------------------------------------------------------------
__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x >= 128) return;  // half the block leaves ...
  __syncthreads();                 // ... and the other half waits for it
  out[threadIdx.x] = 1.f;
}

__global__ void barrier_two_sites_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_exited_lane_kernel(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
}

__global__ void shuffle_outside_mask_kernel(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, float(threadIdx.x), 20);
}

__global__ void shared_partly_written_kernel(float* out) {
  __shared__ float s[kThreads];
  if (threadIdx.x < 128) s[threadIdx.x] = 2.f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

__global__ void shared_from_previous_block_kernel(float* out) {
  __shared__ float s[kThreads];
  if (blockIdx.x == 0) s[threadIdx.x] = 3.f;  // later blocks read what block 0 wrote
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

__global__ void unsigned_index_kernel(int64_t* out) {
  const int64_t below = threadIdx.x - 1;  // 32-bit unsigned arithmetic: wraps for thread 0
  const int64_t span = blockIdx.x * blockDim.x + threadIdx.x;
  out[threadIdx.x] = below;
  if (blockIdx.x == 2) out[blockDim.x + threadIdx.x] = span;
}

__global__ void misaligned_store_kernel(float* out) {
  const uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (threadIdx.x == 0) __stwb(reinterpret_cast<uint4*>(out + 1), v);
}

struct alignas(16) Quad {
  float v[4];
};
// a plain 16-byte load through a misaligned pointer: x86 executes it, the GPU faults; the
// sanitizer build reports it
__global__ void misaligned_load_kernel(const float* x, float* out) {
  if (threadIdx.x == 0) {
    const Quad q = *reinterpret_cast<const Quad*>(x + 1);
    out[0] = q.v[0];
  }
}

__global__ void nothing_kernel(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.f;
}

struct Huge {
  char bytes[33000];
};
__global__ void huge_params_kernel(Huge h, float* out) { out[0] = float(h.bytes[0]); }

__global__ void big_shared_kernel(float* out) {
  __shared__ double s[7000];  // 56000 bytes: more than the 48 KiB of static shared memory
  s[threadIdx.x] = 1.0;
  __syncthreads();
  out[threadIdx.x] = float(s[threadIdx.x]);
}

// ---- host side --------------------------------------------------------------------------------
at::Tensor selftest(c10::string_view which, const at::Tensor& x) {
  const std::string c(which);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::full({4096}, -7.f, xf.options());
  float* o = out.mutable_data_ptr<float>();
  if (c == "block_sum" || c == "block_sum_drop1" || c == "block_sum_drop2") {
    const int drop = c == "block_sum" ? 0 : (c == "block_sum_drop1" ? 1 : 2);
    at::Tensor r = at::empty({4}, xf.options());
    block_sum_kernel<<<4, kThreads>>>(xf.const_data_ptr<float>(), xf.numel(), r.mutable_data_ptr<float>(), drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return r;
  }
  if (c == "warp_ops") {
    TORCH_CHECK(xf.numel() >= 64, "selftest warp_ops: needs 64 values");
    warp_ops_kernel<<<1, 64>>>(xf.const_data_ptr<float>(), o);
    return out.narrow(0, 0, 64 * 8).view({64, 8});
  }
  if (c == "unsigned_index") {
    at::Tensor r = at::empty({2 * 64}, xf.options().dtype(at::kLong));
    unsigned_index_kernel<<<3, 64>>>(r.mutable_data_ptr<int64_t>());
    return r;
  }
  if (c == "barrier_after_exit") barrier_after_exit_kernel<<<1, kThreads>>>(o);
  else if (c == "barrier_two_sites") barrier_two_sites_kernel<<<1, kThreads>>>(o);
  else if (c == "shuffle_exited_lane") shuffle_exited_lane_kernel<<<1, 32>>>(o);
  else if (c == "shuffle_outside_mask") shuffle_outside_mask_kernel<<<1, 32>>>(o);
  else if (c == "shared_partly_written") shared_partly_written_kernel<<<2, kThreads>>>(o);
  else if (c == "shared_from_previous_block") shared_from_previous_block_kernel<<<3, kThreads>>>(o);
  else if (c == "misaligned_store") misaligned_store_kernel<<<1, 32>>>(o);
  else if (c == "misaligned_load") misaligned_load_kernel<<<1, 32>>>(xf.const_data_ptr<float>(), o);
  else if (c == "empty_grid") nothing_kernel<<<0, kThreads>>>(o);
  else if (c == "grid_y_too_large") nothing_kernel<<<dim3(1, 65536), 32>>>(o);
  else if (c == "block_too_large") nothing_kernel<<<1, 1025>>>(o);
  else if (c == "block_z_too_large") nothing_kernel<<<1, dim3(1, 1, 65)>>>(o);
  else if (c == "grid_truncated") nothing_kernel<<<(size_t(1) << 32) + 1, 32>>>(o);
  else if (c == "huge_params") huge_params_kernel<<<1, 32>>>(Huge{}, o);
  else if (c == "big_shared") big_shared_kernel<<<1, kThreads>>>(o);
  else TORCH_CHECK(false, "selftest: unknown case '", c, "'");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace lwkd_selftest

TORCH_LIBRARY_FRAGMENT(lwkd_emu, m) { m.def("_selftest(str case, Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(lwkd, CUDA, m) { m.impl("_selftest", &lwkd_selftest::selftest); }
