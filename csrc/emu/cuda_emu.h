// The CUDA device model of the CPU execution layer (lwkd_fast.cuda_emu, docs/ARCHITECTURE.md
// "CUDA execution layer"): what a kernel in csrc/cuda sees when it is compiled as C++ for the CPU.
//
// Every CUDA thread of a block is a cooperative fiber with its own stack; the blocks of a grid
// run one after another.  A fiber runs until it reaches a synchronisation point
// (__syncthreads, a warp operation) or returns; the scheduler then picks the next runnable
// fiber (lowest thread index first by default, highest first, or at random: the schedule is
// chosen with LWKD_EMU_SCHEDULE or torch.ops.lwkd_emu._emu_schedule).  So:
//
//   * threadIdx/blockIdx are 32-bit unsigned uint3 and blockDim/gridDim dim3, exactly the
//     types of CUDA, so index arithmetic wraps where it wraps on the GPU;
//   * __syncthreads is a block barrier that fails the launch when threads of the block exited
//     or wait at another barrier (divergence), instead of hanging or passing silently;
//   * warp operations (__shfl_*_sync, __ballot_sync, __any/__all_sync, __syncwarp) complete only
//     when every lane named in the mask takes part with the same operation; a lane that exited,
//     waits elsewhere, is missing from the block or is read while outside the mask fails the
//     launch (warpSize is 32);
//   * __shared__ variables are shared by the threads of a block and filled with 0xFF bytes
//     (NaN for floating types) at the start of every block, so reading shared memory that was
//     never written in this block shows up in the results;
//   * launches are checked like the driver checks them (grid and block limits, an empty grid,
//     the kernel parameter space) and run synchronously; any failure raises at the launch, naming
//     the kernel, the block and the thread.
//
// The kernel sources are NOT edited: lwkd_fast/cuda_emu.py rewrites them mechanically at build
// time (`k<<<g, b, s, st>>>(args)` -> `::lwkd_emu::launcher(k, "k", g, b, s, st)(args)`,
// `__shared__ T x[n];` -> `static T x[n]; LWKD_EMU_SHARED(x);`, the dispatch key, is_cuda(),
// pinned memory) and compiles them against this header and the shim headers next to it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Vector types of the CUDA runtime (global namespace, as in <vector_types.h>)
// ---------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };

// ---------------------------------------------------------------------------------------------
// Function and variable qualifiers: host C++ here.
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __constant__
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

namespace lwkd_emu {

constexpr int kWarpSize = 32;

namespace detail {

// What the kernel reads of the executing thread and block (set by the scheduler).
struct ThreadCtx {
  uint3 thread_idx;
};
struct GridCtx {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern ThreadCtx* g_thread;
extern GridCtx g_grid;

inline const uint3& thread_idx() { return g_thread->thread_idx; }
inline const uint3& block_idx() { return g_grid.block_idx; }
inline const dim3& block_dim() { return g_grid.block_dim; }
inline const dim3& grid_dim() { return g_grid.grid_dim; }

// Device-side API, implemented in runtime.cpp.  `file`/`line` name the call site in the
// original .cu source (the rewritten sources keep its line numbers).
void syncthreads(const char* file, int line);
enum class WarpOp : int32_t { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };
// One warp collective: deposits `value` (size <= 16 bytes) and `pred`, waits for the lanes of
// `mask`, and returns through `out` (shuffles) / the return value (ballot, any, all).
unsigned warp_collective(WarpOp op, const char* file, int line, unsigned mask, const void* value,
                         size_t size, int arg, int width, int pred, void* out);
[[noreturn]] void fault(const char* file, int line, const char* what);
void shared_decl(void* addr, size_t bytes, const char* name, const char* file, int line);
void* dynamic_shared(size_t align);

// ---- launches ----------------------------------------------------------------------------
using Invoke = void (*)(void* ctx);
struct LaunchSpec {
  const char* kernel;    // the kernel expression as written at the launch site
  const char* file;
  int line;
  dim3 grid, block;
  size_t shared_bytes;
  size_t param_bytes;
  Invoke invoke;
  void* ctx;
  bool grid_truncated;   // the grid/block argument did not fit an unsigned int
};
void run_launch(const LaunchSpec& spec);  // throws c10::Error when the launch fails

template <typename F, typename Tuple>
struct KernelCall {
  F fn;
  Tuple* params;
  static void invoke(void* p) {
    auto* self = static_cast<KernelCall*>(p);
    std::apply(self->fn, *self->params);  // by-value kernel parameters: one copy per thread
  }
};

// Size of the kernel parameter buffer as the driver lays it out (each parameter at its
// alignment).
template <typename... P>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return off;
}

template <typename T>
dim3 to_dim3(const T& v, bool& truncated) {
  if constexpr (std::is_integral<T>::value) {
    if constexpr (std::is_signed<T>::value) {
      if (v < 0) truncated = true;
    }
    if (static_cast<unsigned long long>(v) > std::numeric_limits<unsigned int>::max()) truncated = true;
    return dim3(static_cast<unsigned int>(v));
  } else {
    return dim3(v);
  }
}

}  // namespace detail

// `kernel<<<grid, block, shared, stream>>>(args...)` becomes
// `::lwkd_emu::launcher(kernel, "kernel", __FILE__, __LINE__, grid, block, shared, stream)(args...)`.
template <typename... P>
struct Launcher {
  void (*fn)(P...);
  detail::LaunchSpec spec;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "lwkd_emu: kernel launched with the wrong number of arguments");
    // the arguments are converted to the kernel's parameter types, as cudaLaunchKernel does
    std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);
    detail::KernelCall<void (*)(P...), decltype(params)> call{fn, &params};
    detail::LaunchSpec s = spec;
    s.param_bytes = detail::param_bytes<typename std::decay<P>::type...>();
    s.invoke = &decltype(call)::invoke;
    s.ctx = &call;
    detail::run_launch(s);
  }
};

template <typename... P, typename G, typename B>
Launcher<P...> launcher(void (*fn)(P...), const char* kernel, const char* file, int line, const G& grid,
                        const B& block, size_t shared_bytes = 0, cudaStream_t /*stream*/ = nullptr) {
  Launcher<P...> l;
  l.fn = fn;
  l.spec = detail::LaunchSpec{};
  l.spec.kernel = kernel;
  l.spec.file = file;
  l.spec.line = line;
  bool truncated = false;
  l.spec.grid = detail::to_dim3(grid, truncated);
  l.spec.block = detail::to_dim3(block, truncated);
  l.spec.grid_truncated = truncated;
  l.spec.shared_bytes = shared_bytes;
  return l;
}

// ---- warp intrinsics ---------------------------------------------------------------------------
template <typename T>
T shfl(detail::WarpOp op, const char* file, int line, unsigned mask, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "lwkd_emu: unsupported shuffle type");
  T out;
  detail::warp_collective(op, file, line, mask, &var, sizeof(T), arg, width, 0, &out);
  return out;
}

inline unsigned vote(detail::WarpOp op, const char* file, int line, unsigned mask, int pred) {
  return detail::warp_collective(op, file, line, mask, nullptr, 0, 0, kWarpSize, pred != 0, nullptr);
}
inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  vote(detail::WarpOp::kSyncwarp, file, line, mask, 1);
}

// ---- memory intrinsics ---------------------------------------------------------------------
// 16-byte stores and loads fault on a misaligned address, as the GPU does.
template <typename T>
inline void store_aligned(const char* file, int line, T* p, const T& v) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) detail::fault(file, line, "misaligned address in a vector store");
  std::memcpy(static_cast<void*>(p), &v, sizeof(T));
}
template <typename T>
inline T load_aligned(const char* file, int line, const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) detail::fault(file, line, "misaligned address in a vector load");
  T v;
  std::memcpy(&v, static_cast<const void*>(p), sizeof(T));
  return v;
}

}  // namespace lwkd_emu

// ---------------------------------------------------------------------------------------------
// The names CUDA code uses
// ---------------------------------------------------------------------------------------------
#define threadIdx (::lwkd_emu::detail::thread_idx())
#define blockIdx (::lwkd_emu::detail::block_idx())
#define blockDim (::lwkd_emu::detail::block_dim())
#define gridDim (::lwkd_emu::detail::grid_dim())
constexpr int warpSize = ::lwkd_emu::kWarpSize;

#define __syncthreads() ::lwkd_emu::detail::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::lwkd_emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define LWKD_EMU_SHFL(OP, mask, var, arg, ...) \
  ::lwkd_emu::shfl(::lwkd_emu::detail::WarpOp::OP, __FILE__, __LINE__, (mask), (var), (arg), ::lwkd_emu::detail::width_or_warp(__VA_ARGS__))
#define __shfl_sync(mask, var, lane, ...) LWKD_EMU_SHFL(kShflIdx, mask, var, lane __VA_OPT__(,) __VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) LWKD_EMU_SHFL(kShflUp, mask, var, delta __VA_OPT__(,) __VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) LWKD_EMU_SHFL(kShflDown, mask, var, delta __VA_OPT__(,) __VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) LWKD_EMU_SHFL(kShflXor, mask, var, lane_mask __VA_OPT__(,) __VA_ARGS__)
#define __ballot_sync(mask, pred) ::lwkd_emu::vote(::lwkd_emu::detail::WarpOp::kBallot, __FILE__, __LINE__, (mask), (pred))
#define __any_sync(mask, pred) (::lwkd_emu::vote(::lwkd_emu::detail::WarpOp::kAny, __FILE__, __LINE__, (mask), (pred)) != 0)
#define __all_sync(mask, pred) (::lwkd_emu::vote(::lwkd_emu::detail::WarpOp::kAll, __FILE__, __LINE__, (mask), (pred)) != 0)

namespace lwkd_emu {
namespace detail {
constexpr int width_or_warp() { return kWarpSize; }
constexpr int width_or_warp(int w) { return w; }
}  // namespace detail
}  // namespace lwkd_emu

// memory fences are no-ops between cooperative fibers; there is no other observer
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

#define __stwb(p, v) ::lwkd_emu::store_aligned(__FILE__, __LINE__, (p), (v))
#define __stcg(p, v) ::lwkd_emu::store_aligned(__FILE__, __LINE__, (p), (v))
#define __stcs(p, v) ::lwkd_emu::store_aligned(__FILE__, __LINE__, (p), (v))
#define __ldg(p) ::lwkd_emu::load_aligned(__FILE__, __LINE__, (p))
#define __ldcs(p) ::lwkd_emu::load_aligned(__FILE__, __LINE__, (p))

// Atomics: fibers are cooperative, so a read-modify-write is atomic by construction.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  if (old < v) *p = v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// `__shared__ T x[n];` is rewritten to `static T x[n]; LWKD_EMU_SHARED(x);`: one object per
// kernel instantiation, shared by the fibers of the running block (blocks run one at a time),
// poisoned when the first thread of a block reaches the declaration.
#define LWKD_EMU_SHARED(name) ::lwkd_emu::detail::shared_decl(&(name), sizeof(name), #name, __FILE__, __LINE__)
// `extern __shared__ T x[];` is rewritten to `T* x = LWKD_EMU_DYNAMIC_SHARED(T);`
#define LWKD_EMU_DYNAMIC_SHARED(T) static_cast<T*>(::lwkd_emu::detail::dynamic_shared(alignof(T)))
