// CPU kernels of the optimizer ops (SPEC sections 4-5).
//
// lwkd::layerwise_rates   the per-layer rate rule: K values, one sequential pass in double.
// lwkd::layerwise_sgd_step, lwkd::layerwise_adamw_step
//                         the fused per-layer SGD / AdamW step over every tensor of every group
//                         (StepOps: one plan from the typed lists, make_*_step_plan, then run_step_cpu).
//
// Work distribution of the step: the tensors of the work list are laid end to end in one
// virtual element range [0, E); at::parallel_for hands every thread an equal slice of that
// range, and a thread walks the (tensor, sub-range) chunks its slice covers.  Threads therefore
// move the same number of bytes however unequal the tensors are (a ResNet's 64-element
// BatchNorm vectors next to its 2.4M-element convolutions).  Inside a chunk the update is a
// branch-free loop instantiated per (dtype, variant) so that the compiler vectorises it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "common/optim_host.h"

namespace lwkd {
namespace {

// ---------------------------------------------------------------------------------------------
// The rule
// ---------------------------------------------------------------------------------------------
at::Tensor layerwise_rates_cpu(const at::Tensor& d, at::Tensor& state,
                               const std::optional<at::Tensor>& nonfinite,
                               at::ArrayRef<double> base_lr,
                               const std::optional<at::Tensor>& base_lr_tensor, double momentum,
                               double gamma, double s_min, double s_max, double eps,
                               const std::optional<at::Tensor>& found_inf,
                               const std::optional<at::Tensor>& ref_state, double ref_momentum) {
  const RatesArgs a = check_rates_args(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min,
                                       s_max, eps, found_inf, ref_state, ref_momentum);
  const int64_t K = a.K;
  at::Tensor eta = at::empty_like(state, at::MemoryFormat::Contiguous);
  if (K == 0) return eta;

  std::vector<double> dv(K), lr(K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "lwkd_rates_load", [&] {
    const scalar_t* p = d.const_data_ptr<scalar_t>();
    const int64_t s = d.stride(0);
    for (int64_t j = 0; j < K; ++j) dv[j] = double(p[j * s]);
  });
  if (a.lr_tensor != nullptr) {
    const at::Tensor& t = *a.lr_tensor;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "lwkd_rates_lr", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      const int64_t s = t.dim() == 1 ? t.stride(0) : 0;
      for (int64_t j = 0; j < K; ++j) lr[j] = double(p[a.lr_per_layer ? j * s : 0]);
    });
  } else {
    for (int64_t j = 0; j < K; ++j) lr[j] = base_lr[a.lr_per_layer ? j : 0];
  }

  // skipped step (the flag is host memory here): eta = base_lr * m, no state changes
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "lwkd_rates_update", [&] {
    scalar_t* m = state.mutable_data_ptr<scalar_t>();
    scalar_t* out = eta.mutable_data_ptr<scalar_t>();
    const int64_t s = state.stride(0);
    // the running reference: row 0 the moving averages a, row 1 the accumulated weights w
    scalar_t* ra = nullptr;
    int64_t rs0 = 0, rs1 = 0;
    if (a.ref_state != nullptr) {
      ra = a.ref_state->mutable_data_ptr<scalar_t>();
      rs0 = a.ref_state->stride(0);
      rs1 = a.ref_state->stride(1);
    }
    auto ref_a = [&](int64_t j) { return ra == nullptr ? 0.0 : double(ra[j * rs1]); };
    auto ref_w = [&](int64_t j) { return ra == nullptr ? 0.0 : double(ra[rs0 + j * rs1]); };
    if (skip) {
      for (int64_t j = 0; j < K; ++j) out[j] = scalar_t(lr[j] * double(m[j * s]));
      return;
    }
    double sum = 0.0;
    int64_t count = 0;
    std::vector<double> x(K);
    for (int64_t j = 0; j < K; ++j) {
      x[j] = rule_input(dv[j], ref_a(j), ref_w(j), a.prm);
      sum += x[j];
      count += rule_usable(dv[j]) ? 1 : 0;
    }
    for (int64_t j = 0; j < K; ++j) {
      if (rule_usable(dv[j])) {
        m[j * s] = scalar_t(rule_update(x[j], double(m[j * s]), sum, count, a.prm));
        if (ra != nullptr) {
          const RuleReference r = rule_reference(dv[j], ref_a(j), ref_w(j), a.prm.ref_momentum);
          ra[j * rs1] = scalar_t(r.a);
          ra[rs0 + j * rs1] = scalar_t(r.w);
        }
      }
      out[j] = scalar_t(lr[j] * double(m[j * s]));
    }
    if (count < K && nonfinite.has_value() && nonfinite->defined()) {
      *nonfinite->mutable_data_ptr<int64_t>() += 1;
    }
  });
  return eta;
}

// Per-tensor values fixed for this step, computed once on the calling thread.
struct TensorStepInfo {
  double rate;   // eta of the tensor's group
  double step;   // AdamW: the step count after this step's increment
};

// ---------------------------------------------------------------------------------------------
// The fused step: per-chunk loops, compiled once per instruction set (see optim_cpu_loops.h)
// and chosen at run time from the CPU's features.
// ---------------------------------------------------------------------------------------------
namespace isa_default {
#define LWKD_ISA_NAME "default"
#include "cpu/optim_cpu_loops.h"
#undef LWKD_ISA_NAME
}  // namespace isa_default

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define LWKD_X86_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define LWKD_ISA_NAME "avx2"
#include "cpu/optim_cpu_loops.h"
#undef LWKD_ISA_NAME
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace isa_avx512 {
#define LWKD_ISA_NAME "avx512"
#include "cpu/optim_cpu_loops.h"
#undef LWKD_ISA_NAME
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

using ChunkFn = void (*)(const StepPlan&, size_t, const TensorStepInfo&, int64_t, int64_t);

struct IsaEntry {
  const char* name;
  ChunkFn fn;
  bool supported;
};

std::vector<IsaEntry> make_isa_table() {
  std::vector<IsaEntry> t{{"default", &isa_default::dispatch_chunk, true}};
#ifdef LWKD_X86_MULTIVERSION
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  t.push_back({"avx2", &isa_avx2::dispatch_chunk, avx2});
  t.push_back({"avx512", &isa_avx512::dispatch_chunk,
               avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")});
#endif
  return t;
}

const std::vector<IsaEntry>& isa_table() {
  static const std::vector<IsaEntry> table = make_isa_table();
  return table;
}

// The best supported entry, or the one chosen with lwkd::_optim_cpu_isa (tests run each).
std::atomic<int>& isa_choice() {
  static std::atomic<int> choice([] {
    const auto& t = isa_table();
    int best = 0;
    for (size_t k = 0; k < t.size(); ++k)
      if (t[k].supported) best = static_cast<int>(k);
    return best;
  }());
  return choice;
}

std::string optim_cpu_isa(c10::string_view request) {
  const auto& t = isa_table();
  const std::string r(request);
  if (!r.empty()) {
    int pick = -1;
    if (r == "auto") {
      for (size_t k = 0; k < t.size(); ++k)
        if (t[k].supported) pick = static_cast<int>(k);
    } else {
      for (size_t k = 0; k < t.size(); ++k)
        if (r == t[k].name) pick = static_cast<int>(k);
      TORCH_CHECK(pick >= 0, "lwkd::_optim_cpu_isa: unknown instruction set '", r,
                  "' (expected auto, default, avx2 or avx512)");
      TORCH_CHECK(t[pick].supported, "lwkd::_optim_cpu_isa: this CPU does not support ", r);
    }
    isa_choice().store(pick);
  }
  return t[isa_choice().load()].name;
}

double group_rate(const StepPlan& plan, const StepGroup& grp) {
  double base = grp.lr;
  if (grp.lr_ptr != nullptr) {
    base = grp.lr_is_double ? *static_cast<const double*>(grp.lr_ptr)
                            : double(*static_cast<const float*>(grp.lr_ptr));
  }
  if (plan.factors.scalar_type() == at::kDouble)
    return effective_rate(base, plan.factors.const_data_ptr<double>(), grp.layer);
  return effective_rate(base, plan.factors.const_data_ptr<float>(), grp.layer);
}

// Below this many elements the whole step runs on the calling thread (a parallel region costs
// several microseconds).
constexpr int64_t kMinElementsPerThread = 32768;

// The step of a checked plan (both ops).
void run_step_cpu(const StepPlan& plan) {
  const size_t N = plan.tensors.size();
  if (N == 0) return;
  // skipped step: the flag is host memory here; nothing (not even a step count) changes
  if (plan.found_inf != nullptr && *plan.found_inf != 0.0f) return;

  // rates per group, step counts per tensor (incremented here, before any element reads them)
  std::vector<double> rate(plan.groups.size());
  for (size_t k = 0; k < plan.groups.size(); ++k) rate[k] = group_rate(plan, plan.groups[k]);
  std::vector<TensorStepInfo> info(N);
  std::vector<int64_t> offset(N + 1, 0);
  for (size_t i = 0; i < N; ++i) {
    const StepTensor& t = plan.tensors[i];
    info[i].rate = rate[t.group];
    info[i].step = 0.0;
    if (t.step != nullptr) {
      *t.step += 1.0f;
      info[i].step = double(*t.step);
    }
    offset[i + 1] = offset[i] + t.numel;
  }
  const int64_t total = offset[N];
  if (total == 0) return;

  const ChunkFn chunk = isa_table()[isa_choice().load()].fn;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(kMinElementsPerThread, (total + nthreads - 1) / nthreads);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    // first tensor whose range [offset[i], offset[i+1]) contains `begin`
    size_t i = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
    for (; i < N && offset[i] < end; ++i) {
      const int64_t lo = std::max(begin, offset[i]) - offset[i];
      const int64_t hi = std::min(end, offset[i + 1]) - offset[i];
      if (hi > lo) chunk(plan, i, info[i], lo, hi);
    }
  });
}

using CpuStepOps = StepOps<NoDeviceGuard, run_step_cpu>;

}  // namespace

TORCH_LIBRARY_IMPL(lwkd, CPU, m) {
  m.impl("layerwise_rates", &layerwise_rates_cpu);
  m.impl("layerwise_sgd_step", &CpuStepOps::sgd);
  m.impl("layerwise_adamw_step", &CpuStepOps::adamw);
}

TORCH_LIBRARY_IMPL(lwkd, CompositeExplicitAutograd, m) {
  m.impl("_optim_cpu_isa", &optim_cpu_isa);
}

}  // namespace lwkd
