// CPU kernels of the optimizer ops (SPEC sections 4-5).
//
// lwkd::layerwise_rates   the per-layer rate rule: K values, one sequential pass in double.
// lwkd::layerwise_step    the fused per-layer SGD / AdamW step over every tensor of every group.
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
                               double gamma, double s_min, double s_max, double eps) {
  const RatesArgs a =
      check_rates_args(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min, s_max, eps);
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

  double sum = 0.0;
  int64_t count = 0;
  for (int64_t j = 0; j < K; ++j) {
    sum += rule_sum_term(dv[j]);
    count += rule_count_term(dv[j]);
  }
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "lwkd_rates_update", [&] {
    scalar_t* m = state.mutable_data_ptr<scalar_t>();
    scalar_t* out = eta.mutable_data_ptr<scalar_t>();
    const int64_t s = state.stride(0);
    for (int64_t j = 0; j < K; ++j) {
      const scalar_t mj = scalar_t(rule_update(dv[j], double(m[j * s]), sum, count, a.prm));
      m[j * s] = mj;
      out[j] = scalar_t(lr[j] * double(mj));
    }
  });
  if (count < K && nonfinite.has_value() && nonfinite->defined()) {
    *nonfinite->mutable_data_ptr<int64_t>() += 1;
  }
  return eta;
}

// ---------------------------------------------------------------------------------------------
// The fused step: one chunk of one tensor
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, bool kWd, SgdVariant V, bool kNesterov>
void sgd_chunk(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
               int64_t n, const SgdScalars<at::opmath_type<scalar_t>> c) {
  using op_t = at::opmath_type<scalar_t>;
  if (V == SgdVariant::kPlain) {
    for (int64_t i = 0; i < n; ++i) {
      op_t pi = op_t(p[i]);
      op_t unused = op_t(0);
      sgd_element<kWd, V, kNesterov>(pi, op_t(g[i]), unused, c);
      p[i] = scalar_t(pi);
    }
  } else if (V == SgdVariant::kMomentumFresh) {
    for (int64_t i = 0; i < n; ++i) {
      op_t pi = op_t(p[i]);
      op_t bi = op_t(0);
      sgd_element<kWd, V, kNesterov>(pi, op_t(g[i]), bi, c);
      p[i] = scalar_t(pi);
      buf[i] = scalar_t(bi);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      op_t pi = op_t(p[i]);
      op_t bi = op_t(buf[i]);
      sgd_element<kWd, V, kNesterov>(pi, op_t(g[i]), bi, c);
      p[i] = scalar_t(pi);
      buf[i] = scalar_t(bi);
    }
  }
}

template <typename scalar_t, bool kWd, bool kAmsgrad>
void adamw_chunk(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                 scalar_t* __restrict__ v, scalar_t* __restrict__ vmax, int64_t n,
                 const AdamScalars<at::opmath_type<scalar_t>> c) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    op_t pi = op_t(p[i]);
    op_t mi = op_t(m[i]);
    op_t vi = op_t(v[i]);
    op_t wi = kAmsgrad ? op_t(vmax[i]) : op_t(0);
    adamw_element<kWd, kAmsgrad>(pi, op_t(g[i]), mi, vi, wi, c);
    p[i] = scalar_t(pi);
    m[i] = scalar_t(mi);
    v[i] = scalar_t(vi);
    if (kAmsgrad) vmax[i] = scalar_t(wi);
  }
}

// Per-tensor values fixed for this step, computed once on the calling thread.
struct TensorStepInfo {
  double rate;   // eta of the tensor's group
  double step;   // AdamW: the step count after this step's increment
};

template <typename scalar_t>
void run_chunk(const StepPlan& plan, const StepTensor& t, const TensorStepInfo& info, int64_t begin,
               int64_t end) {
  using op_t = at::opmath_type<scalar_t>;
  const StepGroup& grp = plan.groups[t.group];
  const int64_t n = end - begin;
  scalar_t* p = static_cast<scalar_t*>(t.p) + begin;
  const scalar_t* g = static_cast<const scalar_t*>(t.g) + begin;
  if (plan.algo == Algorithm::kSgd) {
    const auto c = sgd_scalars<op_t>(info.rate, grp.hyper);
    const bool wd = grp.hyper[kSgdWeightDecay] != 0.0;
    const bool mom = grp.hyper[kSgdMomentum] != 0.0;
    const bool nesterov = grp.hyper[kSgdNesterov] != 0.0;
    scalar_t* buf = mom ? static_cast<scalar_t*>(t.s1) + begin : nullptr;
#define LWKD_SGD_CALL(WD, V, NES) sgd_chunk<scalar_t, WD, V, NES>(p, g, buf, n, c)
#define LWKD_SGD_MOM(WD)                                                               \
  if (!mom) LWKD_SGD_CALL(WD, SgdVariant::kPlain, false);                              \
  else if (t.fresh) {                                                                  \
    if (nesterov) LWKD_SGD_CALL(WD, SgdVariant::kMomentumFresh, true);                 \
    else LWKD_SGD_CALL(WD, SgdVariant::kMomentumFresh, false);                         \
  } else {                                                                             \
    if (nesterov) LWKD_SGD_CALL(WD, SgdVariant::kMomentum, true);                      \
    else LWKD_SGD_CALL(WD, SgdVariant::kMomentum, false);                              \
  }
    if (wd) {
      LWKD_SGD_MOM(true)
    } else {
      LWKD_SGD_MOM(false)
    }
#undef LWKD_SGD_MOM
#undef LWKD_SGD_CALL
  } else {
    const auto c = adam_scalars<op_t>(info.rate, info.step, grp.hyper);
    const bool wd = grp.hyper[kAdamWeightDecay] != 0.0;
    const bool ams = grp.hyper[kAdamAmsgrad] != 0.0;
    scalar_t* m = static_cast<scalar_t*>(t.s1) + begin;
    scalar_t* v = static_cast<scalar_t*>(t.s2) + begin;
    scalar_t* vmax = ams ? static_cast<scalar_t*>(t.s3) + begin : nullptr;
    if (wd) {
      if (ams) adamw_chunk<scalar_t, true, true>(p, g, m, v, vmax, n, c);
      else adamw_chunk<scalar_t, true, false>(p, g, m, v, vmax, n, c);
    } else {
      if (ams) adamw_chunk<scalar_t, false, true>(p, g, m, v, vmax, n, c);
      else adamw_chunk<scalar_t, false, false>(p, g, m, v, vmax, n, c);
    }
  }
}

void dispatch_chunk(const StepPlan& plan, size_t i, const TensorStepInfo& info, int64_t begin, int64_t end) {
  const StepTensor& t = plan.tensors[i];
  switch (plan.dtypes[i]) {
    case at::kFloat: run_chunk<float>(plan, t, info, begin, end); break;
    case at::kDouble: run_chunk<double>(plan, t, info, begin, end); break;
    case at::kBFloat16: run_chunk<c10::BFloat16>(plan, t, info, begin, end); break;
    case at::kHalf: run_chunk<c10::Half>(plan, t, info, begin, end); break;
    default: TORCH_CHECK(false, "lwkd::layerwise_step: unsupported dtype ", plan.dtypes[i]);
  }
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

void layerwise_step_cpu(c10::string_view algorithm, at::TensorList params, at::TensorList grads,
                        at::TensorList state1, at::TensorList state2, at::TensorList state3,
                        at::TensorList steps, const at::Tensor& factors, at::IntArrayRef tensor_group,
                        at::IntArrayRef fresh, at::IntArrayRef group_layer, at::ArrayRef<double> group_lr,
                        const c10::List<std::optional<at::Tensor>>& group_lr_tensor,
                        at::ArrayRef<double> group_hyper) {
  const StepPlan plan = make_step_plan(algorithm, params, grads, state1, state2, state3, steps, factors,
                                       tensor_group, fresh, group_layer, group_lr, group_lr_tensor,
                                       group_hyper);
  const size_t N = plan.tensors.size();
  if (N == 0) return;

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

  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(kMinElementsPerThread, (total + nthreads - 1) / nthreads);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    // first tensor whose range [offset[i], offset[i+1]) contains `begin`
    size_t i = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
    for (; i < N && offset[i] < end; ++i) {
      const int64_t lo = std::max(begin, offset[i]) - offset[i];
      const int64_t hi = std::min(end, offset[i + 1]) - offset[i];
      if (hi > lo) dispatch_chunk(plan, i, info[i], lo, hi);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lwkd, CPU, m) {
  m.impl("layerwise_rates", &layerwise_rates_cpu);
  m.impl("layerwise_step", &layerwise_step_cpu);
}

}  // namespace lwkd
