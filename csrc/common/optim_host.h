// Host-side argument checking and work-list construction of the optimizer ops
// (lwkd::layerwise_rates, lwkd::layerwise_step), shared by the CPU and CUDA implementations.
// Host code only (uses ATen); the per-element arithmetic lives in optim_math.h.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <optional>

#include <cmath>
#include <string>
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
// layerwise_step
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

inline Algorithm parse_algorithm(c10::string_view algorithm) {
  const std::string a(algorithm);
  if (a == "sgd") return Algorithm::kSgd;
  if (a == "adamw") return Algorithm::kAdamW;
  TORCH_CHECK(false, "lwkd::layerwise_step: unknown algorithm '", a, "' (expected 'sgd' or 'adamw')");
}

inline bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A state tensor must share the parameter's shape, dtype, device and memory order.
inline void check_state_like(const at::Tensor& s, const at::Tensor& p, size_t i, const char* name) {
  constexpr const char* op = "lwkd::layerwise_step";
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

inline StepPlan make_step_plan(c10::string_view algorithm, at::TensorList params, at::TensorList grads,
                               at::TensorList state1, at::TensorList state2, at::TensorList state3,
                               at::TensorList steps, const at::Tensor& factors,
                               at::IntArrayRef tensor_group, at::IntArrayRef fresh,
                               at::IntArrayRef group_layer, at::ArrayRef<double> group_lr,
                               const c10::List<std::optional<at::Tensor>>& group_lr_tensor,
                               at::ArrayRef<double> group_hyper,
                               const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "lwkd::layerwise_step";
  StepPlan plan;
  plan.algo = parse_algorithm(algorithm);
  const bool sgd = plan.algo == Algorithm::kSgd;
  const size_t N = params.size();
  const size_t G = group_layer.size();
  TORCH_CHECK(grads.size() == N, op, ": ", N, " params but ", grads.size(), " grads");
  TORCH_CHECK(tensor_group.size() == N, op, ": ", N, " params but ", tensor_group.size(),
              " tensor_group entries");
  TORCH_CHECK(group_lr.size() == G, op, ": ", G, " groups (group_layer) but ", group_lr.size(),
              " group_lr values");
  TORCH_CHECK(group_lr_tensor.size() == G || group_lr_tensor.size() == 0, op, ": ", G,
              " groups but ", group_lr_tensor.size(), " group_lr_tensor entries");
  TORCH_CHECK(group_hyper.size() == G * kHyperStride, op, ": group_hyper must hold ", kHyperStride,
              " values per group (", G * kHyperStride, "), got ", group_hyper.size());
  TORCH_CHECK(factors.dim() == 1, op, ": factors must be 1-D (K,), got shape ", factors.sizes());
  TORCH_CHECK(factors.scalar_type() == at::kFloat || factors.scalar_type() == at::kDouble, op,
              ": factors has dtype ", factors.scalar_type(), "; expected float32 or float64");
  TORCH_CHECK(factors.is_contiguous(), op, ": factors must be contiguous");
  plan.factors = factors;
  plan.found_inf = check_found_inf(op, found_inf, factors.device());
  const int64_t K = factors.size(0);

  plan.groups.resize(G);
  for (size_t k = 0; k < G; ++k) {
    StepGroup& g = plan.groups[k];
    const int64_t layer = group_layer[k];
    TORCH_CHECK(layer >= -1 && layer < K, op, ": group ", k, " has layer ", layer,
                " but the factor vector has K=", K, " entries (use -1 for the head group)");
    g.layer = static_cast<int32_t>(layer);
    g.lr = group_lr[k];
    g.lr_ptr = nullptr;
    g.lr_is_double = 0;
    for (int h = 0; h < kHyperStride; ++h) g.hyper[h] = group_hyper[k * kHyperStride + h];
    if (group_lr_tensor.size() == G) {
      const std::optional<at::Tensor> t = group_lr_tensor.get(k);
      if (t.has_value() && t->defined()) {
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
    }
    if (sgd) {
      TORCH_CHECK(!(g.hyper[kSgdNesterov] != 0.0 &&
                    (g.hyper[kSgdMomentum] <= 0.0 || g.hyper[kSgdDampening] != 0.0)),
                  op, ": group ", k, ": nesterov needs momentum > 0 and dampening = 0");
      plan.any_momentum |= g.hyper[kSgdMomentum] != 0.0;
    } else {
      plan.any_amsgrad |= g.hyper[kAdamAmsgrad] != 0.0;
    }
  }

  if (sgd) {
    TORCH_CHECK(state1.size() == N || (state1.size() == 0 && !plan.any_momentum), op,
                ": SGD with momentum needs one momentum buffer per parameter (", N, "), got ",
                state1.size());
    TORCH_CHECK(state2.size() == 0 && state3.size() == 0 && steps.size() == 0, op,
                ": SGD takes no exp_avg_sq / max_exp_avg_sq / step lists");
  } else {
    TORCH_CHECK(state1.size() == N && state2.size() == N && steps.size() == N, op,
                ": AdamW needs exp_avg, exp_avg_sq and step for every parameter (", N, "), got ",
                state1.size(), ", ", state2.size(), " and ", steps.size());
    TORCH_CHECK(state3.size() == N || (state3.size() == 0 && !plan.any_amsgrad), op,
                ": AdamW with amsgrad needs max_exp_avg_sq for every parameter (", N, "), got ",
                state3.size());
  }

  std::vector<char> is_fresh(N, 0);
  for (int64_t i : fresh) {
    TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < N, op, ": fresh index ", i, " out of range for ", N, " params");
    is_fresh[i] = 1;
  }

  plan.tensors.resize(N);
  plan.dtypes.resize(N);
  for (size_t i = 0; i < N; ++i) {
    const at::Tensor& p = params[i];
    StepTensor& t = plan.tensors[i];
    const int64_t gi = tensor_group[i];
    TORCH_CHECK(gi >= 0 && static_cast<size_t>(gi) < G, op, ": tensor_group[", i, "] = ", gi,
                " is not a group index (", G, " groups)");
    const StepGroup& grp = plan.groups[gi];
    TORCH_CHECK(p.defined() && is_param_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ",
                p.scalar_type(), "; expected float32, float64, bfloat16 or float16");
    TORCH_CHECK(p.device() == factors.device(), op, ": params[", i, "] is on ", p.device(),
                " but the factor vector is on ", factors.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] (shape ", p.sizes(),
                ", strides ", p.strides(), ") is not dense; the fused step updates dense parameters");
    const at::Tensor& g = grads[i];
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
    t.fresh = is_fresh[i];
    plan.dtypes[i] = p.scalar_type();
    if (sgd) {
      if (grp.hyper[kSgdMomentum] != 0.0) {
        check_state_like(state1[i], p, i, "momentum_buffers");
        t.s1 = state1[i].data_ptr();
      } else {
        TORCH_CHECK(!t.fresh, op, ": fresh index ", i, " names a parameter whose group has no momentum");
      }
    } else {
      TORCH_CHECK(!t.fresh, op, ": fresh indices apply to SGD only");
      check_state_like(state1[i], p, i, "exp_avgs");
      check_state_like(state2[i], p, i, "exp_avg_sqs");
      t.s1 = state1[i].data_ptr();
      t.s2 = state2[i].data_ptr();
      if (grp.hyper[kAdamAmsgrad] != 0.0) {
        check_state_like(state3[i], p, i, "max_exp_avg_sqs");
        t.s3 = state3[i].data_ptr();
      }
      const at::Tensor& st = steps[i];
      TORCH_CHECK(st.numel() == 1 && st.scalar_type() == at::kFloat, op, ": steps[", i,
                  "] must be a one-element float32 tensor, got shape ", st.sizes(), " and dtype ",
                  st.scalar_type());
      TORCH_CHECK(st.device() == p.device(), op, ": steps[", i, "] is on ", st.device(),
                  " but params[", i, "] is on ", p.device(), " (the step count lives on the device)");
      t.step = st.data_ptr<float>();
    }
  }
  return plan;
}

}  // namespace lwkd
