// Device-side building blocks of the lwkd CUDA kernels: dtype codes, 8-element vectorised loads
// and stores, and deterministic block reductions.  No arithmetic of the metrics lives here (that
// is csrc/common/lwkd_common.h, shared with the CPU kernels).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace lwkd {
namespace cuda {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;        // elements per vector access (16 B of half, 32 B of float, ...)

// Input dtypes, decided per tensor at run time (a block-uniform switch per 8-element access).
enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };
// Memory layout of a (B, C, N) feature view.
enum Layout : int32_t { kPosContig = 0, kChanContig = 1, kGeneral = 2 };

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <>
__device__ __forceinline__ float to_acc<float, c10::Half>(c10::Half x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ double to_acc<double, c10::Half>(c10::Half x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_acc<float, c10::BFloat16>(c10::BFloat16 x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ double to_acc<double, c10::BFloat16>(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename scalar_t, typename v_t>
__device__ __forceinline__ scalar_t from_acc(v_t v) {
  return static_cast<scalar_t>(v);
}
template <>
__device__ __forceinline__ c10::Half from_acc<c10::Half, double>(double v) { return c10::Half(static_cast<float>(v)); }
template <>
__device__ __forceinline__ c10::BFloat16 from_acc<c10::BFloat16, double>(double v) {
  return c10::BFloat16(static_cast<float>(v));
}

// 16-byte packet of scalar_t.
template <typename scalar_t>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / sizeof(scalar_t);
  scalar_t v[kN];
};

// out[j] = p[j] for j < valid (0 beyond).  `vec`: p is 16-byte aligned (checked on the host for
// the tensor's base pointer and strides; every index passed here is a multiple of kVec).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load8(const scalar_t* __restrict__ p, bool vec, int valid, acc_t (&out)[kVec]) {
  if (vec && valid == kVec) {
    constexpr int kN = Pack16<scalar_t>::kN;
#pragma unroll
    for (int u = 0; u < kVec / kN; ++u) {
      const Pack16<scalar_t> pk = reinterpret_cast<const Pack16<scalar_t>*>(p)[u];
#pragma unroll
      for (int j = 0; j < kN; ++j) out[u * kN + j] = to_acc<acc_t>(pk.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = j < valid ? to_acc<acc_t>(p[j]) : acc_t(0);
  }
}

template <typename scalar_t, typename v_t>
__device__ __forceinline__ void store8(scalar_t* __restrict__ p, bool vec, int valid, const v_t (&in)[kVec]) {
  if (vec && valid == kVec) {
    // one st.global.wb.v4 (write-back = the default policy) through the intrinsic: a plain 16-byte
    // store was split into element stores in map_grad_kernel's PTX (alignment lost after the
    // compiler strength-reduced the address); the intrinsic is inline PTX and cannot be split
    constexpr int kN = Pack16<scalar_t>::kN;
#pragma unroll
    for (int u = 0; u < kVec / kN; ++u) {
      Pack16<scalar_t> pk;
#pragma unroll
      for (int j = 0; j < kN; ++j) pk.v[j] = from_acc<scalar_t>(in[u * kN + j]);
      uint4 raw;
      memcpy(&raw, &pk, sizeof(raw));
      __stwb(reinterpret_cast<uint4*>(p) + u, raw);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < valid) p[j] = from_acc<scalar_t>(in[j]);
  }
}

// Runs f(scalar_t tag) with scalar_t the C++ type of a DType code (block-uniform switch).
template <typename F>
__device__ __forceinline__ void dispatch_dtype(int32_t dt, const F& f) {
  switch (dt) {
    case kF16: f(c10::Half()); break;
    case kBF16: f(c10::BFloat16()); break;
    case kF64: f(double()); break;
    default: f(float()); break;
  }
}

// load8 from a type-erased pointer with a run-time dtype.
template <typename acc_t>
__device__ __forceinline__ void load8_any(const void* p, int32_t dt, int64_t idx, bool vec, int valid,
                                          acc_t (&out)[kVec]) {
  dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = decltype(tag);
    load8(static_cast<const scalar_t*>(p) + idx, vec, valid, out);
  });
}

template <typename v_t>
__device__ __forceinline__ void store8_any(void* p, int32_t dt, int64_t idx, bool vec, int valid,
                                           const v_t (&in)[kVec]) {
  dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = decltype(tag);
    store8(static_cast<scalar_t*>(p) + idx, vec, valid, in);
  });
}

// ---------------------------------------------------------------------------------------------
// Deterministic block reductions (fixed shuffle pattern, fixed warp order); the result is
// returned to every thread.  `smem` holds kWarps values.  Must be called by all threads.
// ---------------------------------------------------------------------------------------------
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  return r;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) { return block_reduce(v, SumOp(), smem); }
template <typename T>
__device__ __forceinline__ T block_max(T v, T* smem) { return block_reduce(v, MaxOp(), smem); }

}  // namespace cuda
}  // namespace lwkd
