// Host-side argument checking and work-list construction of the optimizer ops
// (lwkd::layerwise_rates, lwkd::layerwise_sgd_step, lwkd::layerwise_adamw_step), shared by the CPU and CUDA implementations.
// Host code only (uses ATen); the per-element arithmetic lives in optim_math.h.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <optional>

#include <cmath>
#include <initializer_list>
#include <vector>

#include "common/host_prep.h"
#include "common/optim_math.h"

namespace lwkd {

// ---------------------------------------------------------------------------------------------
// The optional skip flag of both ops (apex's device-side "noop" flag, torch.amp's found_inf): a
// one-element float32 tensor on the ops' device.  Returns its address, or null when absent.  The
// value is never read here: the kernels read it (host memory on CPU, device memory on CUDA).
// ---------------------------------------------------------------------------------------------
inline const float* check_found_inf(const char* op, const std::optional<at::Tensor>& found_inf,
                                    const at::Device& device) {
  if (!found_inf.has_value() || !found_inf->defined()) return nullptr;
  const at::Tensor& f = *found_inf;
  TORCH_CHECK(f.numel() == 1 && f.dim() <= 1, op, ": found_inf must be a 0-dim (or one-element) tensor, got shape ",
              f.sizes());
  TORCH_CHECK(f.scalar_type() == at::kFloat, op, ": found_inf has dtype ", f.scalar_type(),
              "; expected float32");
  TORCH_CHECK(f.device() == device, op, ": found_inf is on ", f.device(), " but the op runs on ", device);
  return f.const_data_ptr<float>();
}

// ---------------------------------------------------------------------------------------------
// layerwise_rates
// ---------------------------------------------------------------------------------------------
struct RatesArgs {
  int64_t K = 0;
  RuleParams prm{};
  // base rate: one value or one per layer, from the host list or from a tensor
  const at::Tensor* lr_tensor = nullptr;  // defined tensor or nullptr
  bool lr_per_layer = false;
  const float* found_inf = nullptr;       // skip flag (see check_found_inf) or null
  const at::Tensor* ref_state = nullptr;  // (2, K) running reference (a; w) or nullptr ("none")
};

inline RatesArgs check_rates_args(const at::Tensor& d, const at::Tensor& state,
                                  const std::optional<at::Tensor>& nonfinite, at::ArrayRef<double> base_lr,
                                  const std::optional<at::Tensor>& base_lr_tensor, double momentum,
                                  double gamma, double s_min, double s_max, double eps,
                                  const std::optional<at::Tensor>& found_inf,
                                  const std::optional<at::Tensor>& ref_state, double ref_momentum) {
  constexpr const char* op = "lwkd::layerwise_rates";
  RatesArgs a;
  TORCH_CHECK(d.dim() == 1, op, ": discrepancies must be a 1-D tensor (K,), got shape ", d.sizes());
  TORCH_CHECK(at::isFloatingType(d.scalar_type()), op, ": discrepancies has dtype ", d.scalar_type(),
              "; expected a floating dtype");
  a.K = d.size(0);
  TORCH_CHECK(state.dim() == 1 && state.size(0) == a.K, op, ": state must have shape (", a.K,
              ",) like the discrepancies, got ", state.sizes());
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble, op,
              ": state has dtype ", state.scalar_type(), "; expected float32 or float64");
  TORCH_CHECK(state.device() == d.device(), op, ": state is on ", state.device(),
              " but the discrepancies are on ", d.device());
  if (nonfinite.has_value() && nonfinite->defined()) {
    TORCH_CHECK(nonfinite->numel() == 1 && nonfinite->scalar_type() == at::kLong, op,
                ": nonfinite must be a one-element int64 tensor, got shape ", nonfinite->sizes(),
                " and dtype ", nonfinite->scalar_type());
    TORCH_CHECK(nonfinite->device() == d.device(), op, ": nonfinite is on ", nonfinite->device(),
                " but the discrepancies are on ", d.device());
  }
  if (base_lr_tensor.has_value() && base_lr_tensor->defined()) {
    const at::Tensor& t = *base_lr_tensor;
    TORCH_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == a.K), op,
                ": base_lr must be a 0-dim tensor or have shape (", a.K, ",), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                ": base_lr tensor has dtype ", t.scalar_type(), "; expected float32 or float64");
    TORCH_CHECK(t.device() == d.device() || t.device().is_cpu(), op, ": base_lr tensor is on ",
                t.device(), " but the discrepancies are on ", d.device());
    a.lr_tensor = &t;
    a.lr_per_layer = t.numel() != 1 || (t.dim() == 1 && a.K == 1);
  } else {
    TORCH_CHECK(base_lr.size() == 1 || static_cast<int64_t>(base_lr.size()) == a.K, op,
                ": base_lr must hold 1 or K=", a.K, " values, got ", base_lr.size());
    a.lr_per_layer = base_lr.size() != 1;
  }
  TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, op, ": momentum must lie in [0, 1), got ", momentum);
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma), op, ": gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK(!std::isnan(s_min) && !std::isnan(s_max) && s_min <= s_max, op,
              ": need s_min <= s_max, got s_min=", s_min, ", s_max=", s_max);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  a.prm = RuleParams{momentum, gamma, s_min, s_max, eps, ref_momentum, false};
  if (ref_state.has_value() && ref_state->defined()) {
    const at::Tensor& r = *ref_state;
    TORCH_CHECK(r.dim() == 2 && r.size(0) == 2 && r.size(1) == a.K, op, ": ref_state must have shape (2, ", a.K,
                ") (running mean; accumulated weight) for K=", a.K, " discrepancies, got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == state.scalar_type(), op, ": ref_state has dtype ", r.scalar_type(),
                " but state has dtype ", state.scalar_type(), "; they must match");
    TORCH_CHECK(r.device() == d.device(), op, ": ref_state is on ", r.device(), " but the discrepancies are on ",
                d.device());
    TORCH_CHECK(ref_momentum >= 0.0 && ref_momentum < 1.0, op, ": ref_momentum must lie in [0, 1), got ",
                ref_momentum);
    a.ref_state = &r;
    a.prm.running = true;
  }
  a.found_inf = check_found_inf(op, found_inf, d.device());
  return a;
}

// ---------------------------------------------------------------------------------------------
// layerwise_sgd_step, layerwise_adamw_step
// ---------------------------------------------------------------------------------------------
enum class Algorithm : int32_t { kSgd = 0, kAdamW = 1 };

// One parameter group as the kernels see it.
struct StepGroup {
  double lr;            // base rate (the value of group["lr"]) when lr_ptr is null
  const void* lr_ptr;   // device (or host, on CPU) address of a 0-dim tensor rate, or null
  int32_t lr_is_double; // dtype of *lr_ptr
  int32_t layer;        // matched layer j (index into the factor vector), -1 for the head
  double hyper[kHyperStride];
};

// One tensor of the work list (raw pointers into dense storage in the parameter's memory order).
struct StepTensor {
  void* p;
  const void* g;
  void* s1;        // SGD: momentum buffer; AdamW: exp_avg
  void* s2;        // AdamW: exp_avg_sq
  void* s3;        // AdamW: max_exp_avg_sq (amsgrad)
  float* step;     // AdamW: step count (float32, as torch keeps it)
  int64_t numel;
  int32_t group;
  int32_t fresh;   // SGD: momentum buffer created this step (buf = g)
};

struct StepPlan {
  const char* op = "";                  // "lwkd::layerwise_sgd_step" or "lwkd::layerwise_adamw_step"
  Algorithm algo = Algorithm::kSgd;
  std::vector<StepGroup> groups;
  std::vector<StepTensor> tensors;
  std::vector<at::ScalarType> dtypes;   // parameter dtype of each tensor
  std::vector<at::Tensor> keep_alive;   // gradient copies made to match a parameter's layout
  at::Tensor factors;
  const float* found_inf = nullptr;     // skip flag (see check_found_inf) or null
  bool any_momentum = false;            // SGD
  bool any_amsgrad = false;             // AdamW
};

inline bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A state tensor must share the parameter's shape, dtype, device and memory order.
inline void check_state_like(const char* op, const at::Tensor& s, const at::Tensor& p, size_t i,
                             const char* name) {
  TORCH_CHECK(s.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(s.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", s.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(s.scalar_type() == p.scalar_type(), op, ": ", name, "[", i, "] has dtype ",
              s.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
  TORCH_CHECK(s.device() == p.device(), op, ": ", name, "[", i, "] is on ", s.device(),
              " but params[", i, "] is on ", p.device());
  TORCH_CHECK(s.is_non_overlapping_and_dense() && same_layout(s, p), op, ": ", name, "[", i,
              "] (strides ", s.strides(), ") must have the memory layout of params[", i,
              "] (strides ", p.strides(), ")");
}

inline double read_host_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>()
                                        : double(*t.const_data_ptr<float>());
}

// The arguments both step ops share, as their schemas name them (csrc/ops.cpp).
struct StepArgs {
  at::TensorList params;
  at::TensorList grads;
  const at::Tensor& factors;
  at::IntArrayRef tensor_group;
  at::IntArrayRef group_layer;
  at::ArrayRef<double> group_lr;
  const c10::List<std::optional<at::Tensor>>& group_lr_tensor;
  const std::optional<at::Tensor>& found_inf;
};

// One named hyper-parameter list of a step op and its length (one value per group).
struct GroupList {
  const char* name;
  size_t size;
};

inline void check_factors(StepPlan& plan, const at::Tensor& factors, const std::optional<at::Tensor>& found_inf) {
  const char* op = plan.op;
  TORCH_CHECK(factors.dim() == 1, op, ": factors must be 1-D (K,), got shape ", factors.sizes());
  TORCH_CHECK(factors.scalar_type() == at::kFloat || factors.scalar_type() == at::kDouble, op,
              ": factors has dtype ", factors.scalar_type(), "; expected float32 or float64");
  TORCH_CHECK(factors.is_contiguous(), op, ": factors must be contiguous");
  plan.factors = factors;
  plan.found_inf = check_found_inf(op, found_inf, factors.device());
}

// Group k's layer and base rate (a host value, or the address of a 0-dim tensor on the device).
inline void plan_group_rate(StepPlan& plan, size_t k, const StepArgs& a) {
  const char* op = plan.op;
  const at::Tensor& factors = plan.factors;
  const int64_t K = factors.size(0);
  StepGroup& g = plan.groups[k];
  const int64_t layer = a.group_layer[k];
  TORCH_CHECK(layer >= -1 && layer < K, op, ": group ", k, " has layer ", layer,
              " but the factor vector has K=", K, " entries (use -1 for the head group)");
  g.layer = static_cast<int32_t>(layer);
  g.lr = a.group_lr[k];
  g.lr_ptr = nullptr;
  g.lr_is_double = 0;
  if (a.group_lr_tensor.size() != plan.groups.size()) return;
  const std::optional<at::Tensor> t = a.group_lr_tensor.get(k);
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == 1, op, ": group ", k, ": lr tensor must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": group ", k,
              ": lr tensor has dtype ", t->scalar_type(), "; expected float32 or float64");
  if (t->device() == factors.device()) {
    g.lr_ptr = t->const_data_ptr();
    g.lr_is_double = t->scalar_type() == at::kDouble;
    plan.keep_alive.push_back(*t);
  } else {
    TORCH_CHECK(t->device().is_cpu(), op, ": group ", k, ": lr tensor is on ", t->device(),
                " but the parameters are on ", factors.device());
    g.lr = read_host_scalar(*t);  // host memory: no device synchronisation
  }
}

// The checks and the part of the plan both step ops share: list lengths (the op's named
// hyper-parameter lists included), the factor vector, the skip flag and, group by group, the
// layer and base rate, then `fill_group(plan, k)`: the op's hyper-parameters of group k.
template <typename FillGroup>
inline StepPlan begin_step_plan(const char* op, Algorithm algo, const StepArgs& a,
                                std::initializer_list<GroupList> hyper_lists, FillGroup fill_group) {
  StepPlan plan;
  plan.op = op;
  plan.algo = algo;
  const size_t N = a.params.size();
  const size_t G = a.group_layer.size();
  TORCH_CHECK(a.grads.size() == N, op, ": ", N, " params but ", a.grads.size(), " grads");
  TORCH_CHECK(a.tensor_group.size() == N, op, ": ", N, " params but ", a.tensor_group.size(),
              " tensor_group entries");
  TORCH_CHECK(a.group_lr.size() == G, op, ": ", G, " groups (group_layer) but ", a.group_lr.size(),
              " group_lr values");
  TORCH_CHECK(a.group_lr_tensor.size() == G || a.group_lr_tensor.size() == 0, op, ": ", G,
              " groups but ", a.group_lr_tensor.size(), " group_lr_tensor entries");
  for (const GroupList& l : hyper_lists)
    TORCH_CHECK(l.size == G, op, ": ", l.name, " must hold one value per group (", G, "), got ", l.size);
  check_factors(plan, a.factors, a.found_inf);
  plan.groups.resize(G);
  for (size_t k = 0; k < G; ++k) {
    plan_group_rate(plan, k, a);
    fill_group(plan, k);
  }
  plan.tensors.resize(N);
  plan.dtypes.resize(N);
  return plan;
}

// Tensor i's parameter and gradient (checked; the gradient copied into the parameter's memory
// order where it differs); the state pointers are filled in by the op.
inline StepTensor& plan_tensor(StepPlan& plan, size_t i, const StepArgs& a) {
  const char* op = plan.op;
  const at::Tensor& factors = plan.factors;
  const size_t G = plan.groups.size();
  const at::Tensor& p = a.params[i];
  StepTensor& t = plan.tensors[i];
  const int64_t gi = a.tensor_group[i];
  TORCH_CHECK(gi >= 0 && static_cast<size_t>(gi) < G, op, ": tensor_group[", i, "] = ", gi,
              " is not a group index (", G, " groups)");
  TORCH_CHECK(p.defined() && is_param_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ",
              p.scalar_type(), "; expected float32, float64, bfloat16 or float16");
  TORCH_CHECK(p.device() == factors.device(), op, ": params[", i, "] is on ", p.device(),
              " but the factor vector is on ", factors.device());
  TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] (shape ", p.sizes(),
              ", strides ", p.strides(), ") is not dense; the fused step updates dense parameters");
  const at::Tensor& g = a.grads[i];
  TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined (skip parameters without a gradient)");
  TORCH_CHECK(g.layout() == at::kStrided, op, ": grads[", i, "] is sparse; the fused step needs dense gradients");
  TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but params[", i,
              "] has shape ", p.sizes());
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ", g.scalar_type(),
              " but params[", i, "] has dtype ", p.scalar_type());
  TORCH_CHECK(g.device() == p.device(), op, ": grads[", i, "] is on ", g.device(), " but params[", i,
              "] is on ", p.device());
  t.p = p.data_ptr();
  if (g.is_non_overlapping_and_dense() && same_layout(g, p)) {
    t.g = g.const_data_ptr();
  } else {
    // one explicit copy into the parameter's memory order (e.g. a contiguous gradient of a
    // channels_last parameter, or an expanded gradient)
    at::Tensor gc = at::empty_like(p);
    gc.copy_(g);
    t.g = gc.const_data_ptr();
    plan.keep_alive.push_back(gc);
  }
  t.s1 = t.s2 = t.s3 = nullptr;
  t.step = nullptr;
  t.numel = p.numel();
  t.group = static_cast<int32_t>(gi);
  t.fresh = 0;
  plan.dtypes[i] = p.scalar_type();
  return t;
}

// lwkd::layerwise_sgd_step: the typed per-group lists packed into the kernels' group record
// (hyper[kSgd*], booleans as 1.0 / 0.0), then the momentum buffers and fresh flags per tensor.
inline StepPlan make_sgd_step_plan(const StepArgs& a, at::TensorList momentum_buffer, at::IntArrayRef fresh,
                                   at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                                   at::ArrayRef<double> dampening, const c10::List<bool>& nesterov,
                                   const c10::List<bool>& maximize) {
  constexpr const char* op = "lwkd::layerwise_sgd_step";
  const auto fill = [&](StepPlan& plan, size_t k) {
    double* h = plan.groups[k].hyper;
    h[kSgdWeightDecay] = weight_decay[k];
    h[kSgdMomentum] = momentum[k];
    h[kSgdDampening] = dampening[k];
    h[kSgdNesterov] = nesterov.get(k) ? 1.0 : 0.0;
    h[kSgdMaximize] = maximize.get(k) ? 1.0 : 0.0;
    h[kSgdMaximize + 1] = 0.0;  // (unused)
    TORCH_CHECK(!(h[kSgdNesterov] != 0.0 && (h[kSgdMomentum] <= 0.0 || h[kSgdDampening] != 0.0)),
                op, ": group ", k, ": nesterov needs momentum > 0 and dampening = 0");
    plan.any_momentum |= h[kSgdMomentum] != 0.0;
  };
  StepPlan plan = begin_step_plan(op, Algorithm::kSgd, a,
                                  {{"weight_decay", weight_decay.size()}, {"momentum", momentum.size()},
                                   {"dampening", dampening.size()}, {"nesterov", nesterov.size()},
                                   {"maximize", maximize.size()}},
                                  fill);
  const size_t N = a.params.size();
  TORCH_CHECK(momentum_buffer.size() == N || (momentum_buffer.size() == 0 && !plan.any_momentum), op,
              ": SGD with momentum needs one momentum buffer per parameter (", N, "), got ",
              momentum_buffer.size());
  std::vector<char> is_fresh(N, 0);
  for (int64_t i : fresh) {
    TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < N, op, ": fresh index ", i, " out of range for ", N, " params");
    is_fresh[i] = 1;
  }
  for (size_t i = 0; i < N; ++i) {
    StepTensor& t = plan_tensor(plan, i, a);
    t.fresh = is_fresh[i];
    if (plan.groups[t.group].hyper[kSgdMomentum] != 0.0) {
      check_state_like(op, momentum_buffer[i], a.params[i], i, "momentum_buffers");
      t.s1 = momentum_buffer[i].data_ptr();
    } else {
      TORCH_CHECK(!t.fresh, op, ": fresh index ", i, " names a parameter whose group has no momentum");
    }
  }
  return plan;
}

// lwkd::layerwise_adamw_step: the typed per-group lists packed into the kernels' group record
// (hyper[kAdam*], booleans as 1.0 / 0.0), then the moments and step count per tensor.
inline StepPlan make_adamw_step_plan(const StepArgs& a, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                                     at::TensorList max_exp_avg_sq, at::TensorList steps,
                                     at::ArrayRef<double> weight_decay, at::ArrayRef<double> beta1,
                                     at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                                     const c10::List<bool>& amsgrad, const c10::List<bool>& maximize) {
  constexpr const char* op = "lwkd::layerwise_adamw_step";
  const auto fill = [&](StepPlan& plan, size_t k) {
    double* h = plan.groups[k].hyper;
    h[kAdamWeightDecay] = weight_decay[k];
    h[kAdamBeta1] = beta1[k];
    h[kAdamBeta2] = beta2[k];
    h[kAdamEps] = eps[k];
    h[kAdamAmsgrad] = amsgrad.get(k) ? 1.0 : 0.0;
    h[kAdamMaximize] = maximize.get(k) ? 1.0 : 0.0;
    plan.any_amsgrad |= h[kAdamAmsgrad] != 0.0;
  };
  StepPlan plan = begin_step_plan(op, Algorithm::kAdamW, a,
                                  {{"weight_decay", weight_decay.size()}, {"beta1", beta1.size()},
                                   {"beta2", beta2.size()}, {"eps", eps.size()}, {"amsgrad", amsgrad.size()},
                                   {"maximize", maximize.size()}},
                                  fill);
  const size_t N = a.params.size();
  TORCH_CHECK(exp_avg.size() == N && exp_avg_sq.size() == N && steps.size() == N, op,
              ": AdamW needs exp_avg, exp_avg_sq and step for every parameter (", N, "), got ",
              exp_avg.size(), ", ", exp_avg_sq.size(), " and ", steps.size());
  TORCH_CHECK(max_exp_avg_sq.size() == N || (max_exp_avg_sq.size() == 0 && !plan.any_amsgrad), op,
              ": AdamW with amsgrad needs max_exp_avg_sq for every parameter (", N, "), got ",
              max_exp_avg_sq.size());
  for (size_t i = 0; i < N; ++i) {
    StepTensor& t = plan_tensor(plan, i, a);
    const at::Tensor& p = a.params[i];
    check_state_like(op, exp_avg[i], p, i, "exp_avgs");
    check_state_like(op, exp_avg_sq[i], p, i, "exp_avg_sqs");
    t.s1 = exp_avg[i].data_ptr();
    t.s2 = exp_avg_sq[i].data_ptr();
    if (plan.groups[t.group].hyper[kAdamAmsgrad] != 0.0) {
      check_state_like(op, max_exp_avg_sq[i], p, i, "max_exp_avg_sqs");
      t.s3 = max_exp_avg_sq[i].data_ptr();
    }
    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.numel() == 1 && st.scalar_type() == at::kFloat, op, ": steps[", i,
                "] must be a one-element float32 tensor, got shape ", st.sizes(), " and dtype ",
                st.scalar_type());
    TORCH_CHECK(st.device() == p.device(), op, ": steps[", i, "] is on ", st.device(),
                " but params[", i, "] is on ", p.device(), " (the step count lives on the device)");
    t.step = st.data_ptr<float>();
  }
  return plan;
}

// The kernels of both step ops on one device type, written once: `Guard` is constructed from the
// factors' device before the plan is built (building it may copy a gradient into its
// parameter's layout), `Run` is the device's step over a checked plan.  Registered with
// m.impl("layerwise_sgd_step", &StepOps<...>::sgd) by csrc/cpu and csrc/cuda.
struct NoDeviceGuard {
  explicit NoDeviceGuard(const at::Device&) {}
};

template <typename Guard, void (*Run)(const StepPlan&)>
struct StepOps {
  static void sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffer,
                  const at::Tensor& factors, at::IntArrayRef tensor_group, at::IntArrayRef fresh,
                  at::IntArrayRef group_layer, at::ArrayRef<double> group_lr,
                  const c10::List<std::optional<at::Tensor>>& group_lr_tensor, at::ArrayRef<double> weight_decay,
                  at::ArrayRef<double> momentum, at::ArrayRef<double> dampening, const c10::List<bool>& nesterov,
                  const c10::List<bool>& maximize, const std::optional<at::Tensor>& found_inf) {
    const Guard guard(factors.device());
    const StepArgs a{params, grads, factors, tensor_group, group_layer, group_lr, group_lr_tensor, found_inf};
    Run(make_sgd_step_plan(a, momentum_buffer, fresh, weight_decay, momentum, dampening, nesterov, maximize));
  }

  static void adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList max_exp_avg_sq, at::TensorList steps, const at::Tensor& factors,
                    at::IntArrayRef tensor_group, at::IntArrayRef group_layer, at::ArrayRef<double> group_lr,
                    const c10::List<std::optional<at::Tensor>>& group_lr_tensor, at::ArrayRef<double> weight_decay,
                    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                    const c10::List<bool>& amsgrad, const c10::List<bool>& maximize,
                    const std::optional<at::Tensor>& found_inf) {
    const Guard guard(factors.device());
    const StepArgs a{params, grads, factors, tensor_group, group_layer, group_lr, group_lr_tensor, found_inf};
    Run(make_adamw_step_plan(a, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, weight_decay, beta1, beta2, eps,
                             amsgrad, maximize));
  }
};

}  // namespace lwkd
