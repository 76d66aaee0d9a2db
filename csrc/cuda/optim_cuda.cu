// CUDA kernels of the optimizer ops (SPEC sections 4-5).
//
// lwkd::layerwise_rates   one block: two deterministic tree reductions (sum of the usable
//                         normalised discrepancies x_j, their count), then one thread per layer
//                         applies the rule (and updates its running reference); the counter of
//                         steps with an unusable discrepancy is bumped on the device.
// lwkd::layerwise_sgd_step, lwkd::layerwise_adamw_step (StepOps: one plan from the typed
//                         lists, make_*_step_plan, then run_step_cuda)
//                         multi-tensor apply: the host packs a table (groups, tensors, and one
//                         (tensor, chunk) task per block) into one DeviceTable (cuda/work_table.cuh:
//                         pinned memory, one asynchronous H2D transfer), and ONE kernel launch
//                         updates every chunk of every tensor of every group (one launch per
//                         parameter dtype present; AdamW adds one tiny launch before it that
//                         increments the per-parameter step counts on the device, as torch's
//                         fused AdamW does).  Each block
//                         reads its group's rate (base rate x factor of its layer) from device
//                         memory: nothing waits on the host.
// Both take an optional device-side skip flag `found_inf` (apex's noop flag): every kernel
// (the rule, the step-count bump, the step) reads it first and, when it is nonzero, writes
// nothing (the rule still writes eta = lr * m, its output).
//
// Narrow headers only (no torch/extension.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "common/optim_host.h"
#include "cuda/work_table.cuh"

namespace lwkd {
namespace {

using cuda::DeviceTable;

// ---------------------------------------------------------------------------------------------
// The rule
// ---------------------------------------------------------------------------------------------
constexpr int kRuleThreads = 256;

template <typename d_t, typename m_t>
__global__ void __launch_bounds__(kRuleThreads)
rates_kernel(const d_t* __restrict__ d, int64_t ds, m_t* __restrict__ m, int64_t ms, int64_t K,
             m_t* __restrict__ eta, int64_t* __restrict__ nonfinite, const void* lr_ptr,
             int lr_kind /*0 host list, 1 float tensor, 2 double tensor*/, int64_t lr_stride,
             const double* __restrict__ lr_list, RuleParams prm, const float* __restrict__ found_inf,
             m_t* __restrict__ ref, int64_t ref_s0, int64_t ref_s1) {
  // skipped step (device-side flag, uniform over the block): eta = lr * m, nothing is written
  // back to m, the reference or the counter
  const bool skip = found_inf != nullptr && *found_inf != 0.0f;
  __shared__ double s_sum[kRuleThreads];
  __shared__ long long s_cnt[kRuleThreads];
  // Thread t owns layers t, t + blockDim, ...: it reads their reference in both passes and
  // writes it only in the second, so no other thread ever sees a half-updated reference.
  double sum = 0.0;
  long long cnt = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const double dj = double(d[j * ds]);
    const double aj = ref != nullptr ? double(ref[j * ref_s1]) : 0.0;
    const double wj = ref != nullptr ? double(ref[ref_s0 + j * ref_s1]) : 0.0;
    sum += rule_input(dj, aj, wj, prm);
    cnt += rule_usable(dj) ? 1 : 0;
  }
  s_sum[threadIdx.x] = sum;
  s_cnt[threadIdx.x] = cnt;
  __syncthreads();
  for (int w = kRuleThreads / 2; w > 0; w >>= 1) {  // fixed tree: deterministic
    if (threadIdx.x < w) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + w];
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + w];
    }
    __syncthreads();
  }
  const double total = s_sum[0];
  const int64_t n_usable = s_cnt[0];
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const double dj = double(d[j * ds]);
    m_t mj = m[j * ms];
    if (!skip && rule_usable(dj)) {
      const double aj = ref != nullptr ? double(ref[j * ref_s1]) : 0.0;
      const double wj = ref != nullptr ? double(ref[ref_s0 + j * ref_s1]) : 0.0;
      mj = m_t(rule_update(rule_input(dj, aj, wj, prm), double(mj), total, n_usable, prm));
      m[j * ms] = mj;
      if (ref != nullptr) {
        const RuleReference r = rule_reference(dj, aj, wj, prm.ref_momentum);
        ref[j * ref_s1] = m_t(r.a);
        ref[ref_s0 + j * ref_s1] = m_t(r.w);
      }
    }
    double lr;
    if (lr_kind == 1) lr = double(static_cast<const float*>(lr_ptr)[j * lr_stride]);
    else if (lr_kind == 2) lr = static_cast<const double*>(lr_ptr)[j * lr_stride];
    else lr = lr_list[j * lr_stride];
    eta[j] = m_t(lr * double(mj));
  }
  if (threadIdx.x == 0 && !skip && nonfinite != nullptr && n_usable < K) *nonfinite += 1;
}

at::Tensor layerwise_rates_cuda(const at::Tensor& d, at::Tensor& state,
                                const std::optional<at::Tensor>& nonfinite,
                                at::ArrayRef<double> base_lr,
                                const std::optional<at::Tensor>& base_lr_tensor, double momentum,
                                double gamma, double s_min, double s_max, double eps,
                                const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& ref_state, double ref_momentum) {
  const RatesArgs a = check_rates_args(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min,
                                       s_max, eps, found_inf, ref_state, ref_momentum);
  const c10::cuda::CUDAGuard guard(d.device());
  at::Tensor eta = at::empty_like(state, at::MemoryFormat::Contiguous);
  const int64_t K = a.K;
  if (K == 0) return eta;

  int lr_kind = 0;
  const void* lr_ptr = nullptr;
  int64_t lr_stride = a.lr_per_layer ? 1 : 0;
  std::vector<double> lr_host;
  if (a.lr_tensor != nullptr && a.lr_tensor->device() == d.device()) {
    lr_kind = a.lr_tensor->scalar_type() == at::kDouble ? 2 : 1;
    lr_ptr = a.lr_tensor->const_data_ptr();
    if (a.lr_per_layer) lr_stride = a.lr_tensor->stride(0);
  } else if (a.lr_tensor != nullptr) {  // CPU tensor: host memory, read without any sync
    const at::Tensor& t = *a.lr_tensor;
    for (int64_t j = 0; j < (a.lr_per_layer ? K : 1); ++j) {
      const int64_t idx = a.lr_per_layer ? j * t.stride(0) : 0;
      lr_host.push_back(t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[idx]
                                                       : double(t.const_data_ptr<float>()[idx]));
    }
  } else {
    lr_host.assign(base_lr.begin(), base_lr.end());
  }
  at::Tensor lr_dev;
  const double* lr_list = nullptr;
  if (lr_kind == 0) {
    DeviceTable table;
    const size_t off = table.add(lr_host);
    lr_dev = table.upload(d.device());
    lr_list = DeviceTable::view<double>(lr_dev, off);
  }
  int64_t* nf = (nonfinite.has_value() && nonfinite->defined()) ? nonfinite->mutable_data_ptr<int64_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "lwkd_rates_cuda", [&] {
    using d_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "lwkd_rates_cuda_state", [&] {
      scalar_t* ref = a.ref_state != nullptr ? a.ref_state->mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t ref_s0 = a.ref_state != nullptr ? a.ref_state->stride(0) : 0;
      const int64_t ref_s1 = a.ref_state != nullptr ? a.ref_state->stride(1) : 0;
      rates_kernel<d_t, scalar_t><<<1, kRuleThreads, 0, stream>>>(
          d.const_data_ptr<d_t>(), d.stride(0), state.mutable_data_ptr<scalar_t>(), state.stride(0), K,
          eta.mutable_data_ptr<scalar_t>(), nf, lr_ptr, lr_kind, lr_stride, lr_list, a.prm, a.found_inf,
          ref, ref_s0, ref_s1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return eta;
}

// ---------------------------------------------------------------------------------------------
// The fused step
// ---------------------------------------------------------------------------------------------
constexpr int kStepThreads = 256;
constexpr int kIlp = 4;
constexpr int64_t kChunk = 16384;  // elements per block

struct BlockTask {
  int32_t tensor;
  int32_t chunk;
};

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

__device__ __forceinline__ bool aligned_for_pack(const void* p, size_t bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Loads/stores kIlp consecutive elements, vectorised when `vec` (all pointers aligned).
template <typename scalar_t, typename op_t>
__device__ __forceinline__ void load_ilp(op_t (&r)[kIlp], const scalar_t* src, int64_t i, int64_t n, bool vec) {
  if (vec) {
    const Pack<scalar_t> pk = *reinterpret_cast<const Pack<scalar_t>*>(src + i);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) r[k] = op_t(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k) r[k] = (i + k < n) ? op_t(src[i + k]) : op_t(0);
  }
}

template <typename scalar_t, typename op_t>
__device__ __forceinline__ void store_ilp(scalar_t* dst, const op_t (&r)[kIlp], int64_t i, int64_t n, bool vec) {
  if (vec) {
    Pack<scalar_t> pk;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) pk.v[k] = scalar_t(r[k]);
    *reinterpret_cast<Pack<scalar_t>*>(dst + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
      if (i + k < n) dst[i + k] = scalar_t(r[k]);
  }
}

template <typename scalar_t, bool kWd, SgdVariant V, bool kNesterov>
__device__ void sgd_block(scalar_t* p, const scalar_t* g, scalar_t* buf, int64_t n, bool vec,
                          const SgdScalars<at::opmath_type<scalar_t>>& c) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(threadIdx.x) * kIlp; i < n; i += int64_t(blockDim.x) * kIlp) {
    const bool v = vec && i + kIlp <= n;
    op_t rp[kIlp], rg[kIlp], rb[kIlp];
    load_ilp(rp, p, i, n, v);
    load_ilp(rg, g, i, n, v);
    if (V == SgdVariant::kMomentum) load_ilp(rb, buf, i, n, v);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      if (V != SgdVariant::kMomentum) rb[k] = op_t(0);
      sgd_element<kWd, V, kNesterov>(rp[k], rg[k], rb[k], c);
    }
    store_ilp(p, rp, i, n, v);
    if (V != SgdVariant::kPlain) store_ilp(buf, rb, i, n, v);
  }
}

template <typename scalar_t, bool kWd, bool kAmsgrad>
__device__ void adamw_block(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v2, scalar_t* vmax,
                            int64_t n, bool vec, const AdamScalars<at::opmath_type<scalar_t>>& c) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(threadIdx.x) * kIlp; i < n; i += int64_t(blockDim.x) * kIlp) {
    const bool v = vec && i + kIlp <= n;
    op_t rp[kIlp], rg[kIlp], rm[kIlp], rv[kIlp], rw[kIlp];
    load_ilp(rp, p, i, n, v);
    load_ilp(rg, g, i, n, v);
    load_ilp(rm, m, i, n, v);
    load_ilp(rv, v2, i, n, v);
    if (kAmsgrad) load_ilp(rw, vmax, i, n, v);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      if (!kAmsgrad) rw[k] = op_t(0);
      adamw_element<kWd, kAmsgrad>(rp[k], rg[k], rm[k], rv[k], rw[k], c);
    }
    store_ilp(p, rp, i, n, v);
    store_ilp(m, rm, i, n, v);
    store_ilp(v2, rv, i, n, v);
    if (kAmsgrad) store_ilp(vmax, rw, i, n, v);
  }
}

__device__ double device_group_rate(const StepGroup& grp, const void* factors, bool factors_double) {
  double base = grp.lr;
  if (grp.lr_ptr != nullptr) {
    base = grp.lr_is_double ? *static_cast<const double*>(grp.lr_ptr)
                            : double(*static_cast<const float*>(grp.lr_ptr));
  }
  return factors_double ? effective_rate(base, static_cast<const double*>(factors), grp.layer)
                        : effective_rate(base, static_cast<const float*>(factors), grp.layer);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kStepThreads)
step_kernel(const StepGroup* __restrict__ groups, const StepTensor* __restrict__ tensors,
            const BlockTask* __restrict__ tasks, const void* factors, bool factors_double, int algo,
            const float* __restrict__ found_inf) {
  using op_t = at::opmath_type<scalar_t>;
  // skipped step: the whole block leaves before touching anything (uniform, so before any
  // __syncthreads); one 4-byte load per block is the entire cost of the flag
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const BlockTask task = tasks[blockIdx.x];
  const StepTensor& t = tensors[task.tensor];
  const StepGroup& grp = groups[t.group];
  const int64_t begin = int64_t(task.chunk) * kChunk;
  const int64_t n = (t.numel - begin) < kChunk ? (t.numel - begin) : kChunk;

  // per-tensor scalars, computed once per block (the AdamW bias corrections need two pow())
  __shared__ union {
    SgdScalars<op_t> sgd;
    AdamScalars<op_t> adam;
  } sc;
  if (threadIdx.x == 0) {
    const double rate = device_group_rate(grp, factors, factors_double);
    if (algo == int(Algorithm::kSgd)) sc.sgd = sgd_scalars<op_t>(rate, grp.hyper);
    else sc.adam = adam_scalars<op_t>(rate, double(*t.step), grp.hyper);
  }
  __syncthreads();

  scalar_t* p = static_cast<scalar_t*>(t.p) + begin;
  const scalar_t* g = static_cast<const scalar_t*>(t.g) + begin;
  scalar_t* s1 = t.s1 ? static_cast<scalar_t*>(t.s1) + begin : nullptr;
  scalar_t* s2 = t.s2 ? static_cast<scalar_t*>(t.s2) + begin : nullptr;
  scalar_t* s3 = t.s3 ? static_cast<scalar_t*>(t.s3) + begin : nullptr;
  constexpr size_t pack = sizeof(scalar_t) * kIlp;
  const bool vec = aligned_for_pack(p, pack) && aligned_for_pack(g, pack) && aligned_for_pack(s1, pack) &&
                   aligned_for_pack(s2, pack) && aligned_for_pack(s3, pack);

  if (algo == int(Algorithm::kSgd)) {
    const SgdScalars<op_t> c = sc.sgd;
    const bool wd = grp.hyper[kSgdWeightDecay] != 0.0;
    const bool mom = grp.hyper[kSgdMomentum] != 0.0;
    const bool nes = grp.hyper[kSgdNesterov] != 0.0;
#define LWKD_SGD(WD, V, NES) sgd_block<scalar_t, WD, V, NES>(p, g, s1, n, vec, c)
#define LWKD_SGD_MOM(WD)                                          \
  if (!mom) LWKD_SGD(WD, SgdVariant::kPlain, false);              \
  else if (t.fresh) {                                             \
    if (nes) LWKD_SGD(WD, SgdVariant::kMomentumFresh, true);      \
    else LWKD_SGD(WD, SgdVariant::kMomentumFresh, false);         \
  } else {                                                        \
    if (nes) LWKD_SGD(WD, SgdVariant::kMomentum, true);           \
    else LWKD_SGD(WD, SgdVariant::kMomentum, false);              \
  }
    if (wd) {
      LWKD_SGD_MOM(true)
    } else {
      LWKD_SGD_MOM(false)
    }
#undef LWKD_SGD_MOM
#undef LWKD_SGD
  } else {
    const AdamScalars<op_t> c = sc.adam;
    const bool wd = grp.hyper[kAdamWeightDecay] != 0.0;
    const bool ams = grp.hyper[kAdamAmsgrad] != 0.0;
    if (wd) {
      if (ams) adamw_block<scalar_t, true, true>(p, g, s1, s2, s3, n, vec, c);
      else adamw_block<scalar_t, true, false>(p, g, s1, s2, s3, n, vec, c);
    } else {
      if (ams) adamw_block<scalar_t, false, true>(p, g, s1, s2, s3, n, vec, c);
      else adamw_block<scalar_t, false, false>(p, g, s1, s2, s3, n, vec, c);
    }
  }
}

__global__ void bump_steps_kernel(const StepTensor* __restrict__ tensors, int64_t n,
                                  const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: counts stay
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float* s = tensors[i].step;
    if (s != nullptr) *s += 1.0f;
  }
}

// The step of a checked plan (both ops); StepOps has put the device guard in place.
void run_step_cuda(const StepPlan& plan) {
  const float* fi = plan.found_inf;  // device address (or null); read only by the kernels
  const size_t N = plan.tensors.size();
  if (N == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();

  // one task per (tensor, chunk), grouped by parameter dtype (one launch per dtype present)
  const at::ScalarType kinds[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  std::vector<BlockTask> tasks;
  std::vector<std::pair<size_t, size_t>> ranges;  // [begin, end) of each dtype's tasks
  for (at::ScalarType k : kinds) {
    const size_t first = tasks.size();
    for (size_t i = 0; i < N; ++i) {
      if (plan.dtypes[i] != k) continue;
      const int64_t chunks = cuda::cdiv(plan.tensors[i].numel, kChunk);
      TORCH_CHECK(chunks < (int64_t(1) << 31), plan.op, ": params[", i, "] is too large");
      for (int64_t c = 0; c < chunks; ++c) tasks.push_back(BlockTask{static_cast<int32_t>(i), static_cast<int32_t>(c)});
    }
    ranges.emplace_back(first, tasks.size());
  }
  // no early return when every tensor is empty: AdamW still counts the step of each parameter
  // (as the CPU kernels, the Triton kernels and torch.optim do); the step launches below skip
  // dtypes without tasks

  DeviceTable work;
  const size_t off_groups = work.add(plan.groups);
  const size_t off_tensors = work.add(plan.tensors);
  const size_t off_tasks = work.add(tasks);
  const at::Tensor table = work.upload(plan.factors.device());
  const auto* d_groups = DeviceTable::view<StepGroup>(table, off_groups);
  const auto* d_tensors = DeviceTable::view<StepTensor>(table, off_tensors);
  const auto* d_tasks = DeviceTable::view<BlockTask>(table, off_tasks);

  const int algo = static_cast<int>(plan.algo);
  if (plan.algo == Algorithm::kAdamW) {
    const int threads = 128;
    const int blocks = static_cast<int>(std::min<int64_t>(cuda::cdiv(int64_t(N), threads), 1024));
    bump_steps_kernel<<<blocks, threads, 0, stream>>>(d_tensors, static_cast<int64_t>(N), fi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const void* fac = plan.factors.numel() ? plan.factors.const_data_ptr() : nullptr;
  const bool fac_double = plan.factors.scalar_type() == at::kDouble;
  for (size_t k = 0; k < ranges.size(); ++k) {
    const size_t first = ranges[k].first, count = ranges[k].second - ranges[k].first;
    if (count == 0) continue;
    const BlockTask* tk = d_tasks + first;
    switch (kinds[k]) {
      case at::kFloat:
        step_kernel<float><<<count, kStepThreads, 0, stream>>>(d_groups, d_tensors, tk, fac, fac_double, algo, fi);
        break;
      case at::kBFloat16:
        step_kernel<c10::BFloat16><<<count, kStepThreads, 0, stream>>>(d_groups, d_tensors, tk, fac, fac_double, algo, fi);
        break;
      case at::kHalf:
        step_kernel<c10::Half><<<count, kStepThreads, 0, stream>>>(d_groups, d_tensors, tk, fac, fac_double, algo, fi);
        break;
      default:
        step_kernel<double><<<count, kStepThreads, 0, stream>>>(d_groups, d_tensors, tk, fac, fac_double, algo, fi);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // `table`, the gradient copies in plan.keep_alive and the lr tensors are released here; the
  // caching allocator reuses their blocks only for work queued later on this stream.
}

using CudaStepOps = StepOps<c10::cuda::CUDAGuard, run_step_cuda>;

}  // namespace

TORCH_LIBRARY_IMPL(lwkd, CUDA, m) {
  m.impl("layerwise_rates", &layerwise_rates_cuda);
  m.impl("layerwise_sgd_step", &CudaStepOps::sgd);
  m.impl("layerwise_adamw_step", &CudaStepOps::adamw);
}

}  // namespace lwkd
