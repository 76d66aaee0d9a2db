// Arithmetic of the per-layer learning-rate rule (SPEC section 4) and of the fused per-layer
// optimizer step (SPEC section 5), shared by the CPU and CUDA kernels.
//
// Everything is header-only and `__host__ __device__` under nvcc (LWKD_HD), so the CPU build,
// which runs in CI, exercises exactly the formulas the CUDA build compiles.  No ATen here.
//
// Precision policy
//   * the rule runs in double for every state dtype (K is tiny) and rounds once on store;
//   * the per-element updates run in the parameter's "op-math" type (float for float32 /
//     bfloat16 / float16 parameters, double for float64) with the per-tensor scalars computed
//     in double and rounded once, which is what torch.optim does with Python-float hyper-
//     parameters.  Low-precision parameters and state are rounded once per store (the
//     semantics of torch's fused=True optimizers).
#pragma once

#include "common/lwkd_common.h"

namespace lwkd {

// torch.maximum semantics: NaN if either input is NaN.
template <typename T>
LWKD_HD T lwkd_maximum(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (a < b ? b : a));
}

// =============================================================================================
// The per-layer learning-rate rule (SPEC section 4)
//
//   V     = { j : D_j finite and D_j >= 0 }                 (usable discrepancies)
//   x_j   = D_j                                              (normalize "none")
//   x_j   = D_j / R_j  (1 if R_j = 0), R_j = a_j / w_j       (normalize "running"; j in V) after
//           a_j <- rho a_j + (1 - rho) D_j,  w_j <- rho w_j + (1 - rho)
//   r_j   = |V| x_j / sum_{k in V} x_k   if that sum > eps, else 1          (j in V)
//   s_j   = clamp(r_j ^ gamma, s_min, s_max)                                (j in V)
//   m_j  <- mu m_j + (1 - mu) s_j                                           (j in V)
//   eta_j = eta0 m_j
//
// A layer outside V keeps m_j, a_j and w_j bit-for-bit (the kernels skip the stores instead of
// hoping that mu m + (1 - mu) m rounds back to m).  R_j is the bias-corrected running mean of
// the layer's own usable discrepancies (a_j: the exponential moving average started at 0, w_j:
// the total weight it has accumulated, 1 - rho^n after n usable steps), so x_j -- and with it
// every rate -- is unchanged when a layer's D is multiplied by a constant at every step.
// Every backend evaluates these functions in double, in this order, and rounds once on store.
// =============================================================================================
struct RuleParams {
  double momentum;      // mu in [0, 1)
  double gamma;         // >= 0
  double s_min;
  double s_max;
  double eps;           // the "sum > eps" threshold
  double ref_momentum;  // rho in [0, 1): decay of the running reference (normalize "running")
  bool running;         // normalize "running" (a reference state is given) or "none"
};

// Whether the rule can use a discrepancy: finite and >= 0 (SPEC: D_j >= 0).  A negative D (a
// broken metric, or a caller's bug) is treated like a non-finite one: skipped and counted,
// decided on the device, because refusing it would need a host read.  NaN fails `d >= 0`.
LWKD_HD bool rule_usable(double d) { return lwkd_isfinite(d) && d >= 0.0; }

// The running reference of one layer after this step's (usable) discrepancy d.
struct RuleReference {
  double a;  // new moving average (not bias-corrected)
  double w;  // new accumulated weight
  double x;  // the normalised discrepancy D_j / R_j (1 while R_j = 0)
};

LWKD_HD RuleReference rule_reference(double d, double a, double w, double rho) {
  RuleReference ref;
  ref.a = rho * a + (1.0 - rho) * d;
  ref.w = rho * w + (1.0 - rho);
  const double R = ref.a / ref.w;  // w > 0 after any update since rho < 1
  ref.x = R > 0.0 ? d / R : 1.0;
  return ref;
}

// The value x_j the rule normalises (0 for an unusable discrepancy, which then contributes to
// neither reduction), from the layer's stored reference (a, w) -- unused for "none".
LWKD_HD double rule_input(double d, double a, double w, const RuleParams& prm) {
  if (!rule_usable(d)) return 0.0;
  return prm.running ? rule_reference(d, a, w, prm.ref_momentum).x : d;
}

// r_j ^ gamma with pow(r, 0) = 1 (also for r = 0) as std::pow and torch.pow define it.
LWKD_HD double rule_power(double r, double gamma) {
  if (gamma == 1.0) return r;
  if (gamma == 0.0) return 1.0;
  return lwkd_pow(r, gamma);
}

// The new momentum state m_j of a usable layer given its x_j and the two reductions (sum of
// the usable x, number of usable layers).
LWKD_HD double rule_update(double x, double m, double sum_usable, int64_t n_usable, const RuleParams& prm) {
  const double r = sum_usable > prm.eps ? double(n_usable) * x / sum_usable : 1.0;
  double s = rule_power(r, prm.gamma);
  s = s < prm.s_min ? prm.s_min : (s > prm.s_max ? prm.s_max : s);
  return prm.momentum * m + (1.0 - prm.momentum) * s;
}

// =============================================================================================
// Effective rate of one tensor: its group's base rate times its layer's factor m_j, rounded
// to the dtype of the factor vector first (so that it is exactly the value of the optimizer's
// `rates` vector); the head group (layer < 0) uses the base rate itself, as torch.optim would.
// =============================================================================================
template <typename factor_t>
LWKD_HD double effective_rate(double base_lr, const factor_t* factors, int64_t layer) {
  if (layer < 0) return base_lr;
  return double(factor_t(base_lr * double(factors[layer])));
}

// =============================================================================================
// SGD: torch.optim.SGD semantics with lr = eta_j
//
//   g   = maximize ? -grad : grad
//   g   = g + weight_decay * p                          (weight_decay != 0)
//   buf = fresh ? g : momentum * buf + (1 - dampening) g   (momentum != 0)
//   g   = nesterov ? g + momentum * buf : buf            (momentum != 0)
//   p   = p - lr * g
// =============================================================================================
template <typename T>
struct SgdScalars {
  T lr;
  T weight_decay;
  T momentum;
  T one_minus_dampening;
  T grad_sign;  // -1 with maximize, else +1 (multiplying by -1 is exact)
};

// Hyper-parameter record of one group as the host passes it (six doubles per group).
enum SgdHyper : int { kSgdWeightDecay = 0, kSgdMomentum, kSgdDampening, kSgdNesterov, kSgdMaximize };
enum AdamHyper : int { kAdamWeightDecay = 0, kAdamBeta1, kAdamBeta2, kAdamEps, kAdamAmsgrad, kAdamMaximize };
constexpr int kHyperStride = 6;

template <typename T>
LWKD_HD SgdScalars<T> sgd_scalars(double lr, const double* hyper) {
  SgdScalars<T> c;
  c.lr = T(lr);
  c.weight_decay = T(hyper[kSgdWeightDecay]);
  c.momentum = T(hyper[kSgdMomentum]);
  c.one_minus_dampening = T(1.0 - hyper[kSgdDampening]);
  c.grad_sign = hyper[kSgdMaximize] != 0.0 ? T(-1) : T(1);
  return c;
}

// Code variant of one tensor's SGD update (the branches are uniform per tensor; the CPU loops
// are instantiated per variant so that they vectorise).
enum class SgdVariant : int {
  kPlain = 0,        // no momentum
  kMomentumFresh,    // momentum, first step for this buffer: buf = g
  kMomentum,         // momentum, buf = momentum buf + (1 - dampening) g
};

template <bool kWd, SgdVariant V, bool kNesterov, typename T>
LWKD_HD void sgd_element(T& p, T grad, T& buf, const SgdScalars<T>& c) {
  T g = c.grad_sign * grad;
  if (kWd) g = g + c.weight_decay * p;
  if (V != SgdVariant::kPlain) {
    if (V == SgdVariant::kMomentumFresh) {
      buf = g;
    } else {
      buf = c.momentum * buf + c.one_minus_dampening * g;
    }
    g = kNesterov ? g + c.momentum * buf : buf;
  }
  p = p - c.lr * g;
}

// =============================================================================================
// AdamW: torch.optim.AdamW semantics with lr = eta_j and the parameter's own step count t
// (already incremented for this step):
//
//   g      = maximize ? -grad : grad
//   p      = p (1 - lr wd)                                    (wd != 0: decoupled decay)
//   m      = lerp(m, g, 1 - beta1)                            (torch.lerp's two-sided formula)
//   v      = beta2 v + (1 - beta2) g^2
//   vmax   = maximum(vmax, v)                                 (amsgrad; denominators use vmax)
//   denom  = sqrt(v) / sqrt(1 - beta2^t) + eps
//   p      = p - lr / (1 - beta1^t) * m / denom
// =============================================================================================
template <typename T>
struct AdamScalars {
  T decay;            // 1 - lr * weight_decay
  T lerp_weight;      // 1 - beta1
  T beta2;
  T one_minus_beta2;
  T step_size;        // lr / (1 - beta1^t)
  T bc2_sqrt;         // sqrt(1 - beta2^t)
  T eps;
  T grad_sign;
};

template <typename T>
LWKD_HD AdamScalars<T> adam_scalars(double lr, double step, const double* hyper) {
  const double beta1 = hyper[kAdamBeta1];
  const double beta2 = hyper[kAdamBeta2];
  AdamScalars<T> c;
  c.decay = T(1.0 - lr * hyper[kAdamWeightDecay]);
  c.lerp_weight = T(1.0 - beta1);
  c.beta2 = T(beta2);
  c.one_minus_beta2 = T(1.0 - beta2);
  c.step_size = T(lr / (1.0 - lwkd_pow(beta1, step)));
  c.bc2_sqrt = T(lwkd_sqrt(1.0 - lwkd_pow(beta2, step)));
  c.eps = T(hyper[kAdamEps]);
  c.grad_sign = hyper[kAdamMaximize] != 0.0 ? T(-1) : T(1);
  return c;
}

// torch.lerp(self, end, w): w < 0.5 ? self + w (end - self) : end - (end - self)(1 - w)
template <typename T>
LWKD_HD T torch_lerp(T self, T end, T w) {
  const T diff = end - self;
  return lwkd_abs(w) < T(0.5) ? self + w * diff : end - diff * (T(1) - w);
}

template <bool kWd, bool kAmsgrad, typename T>
LWKD_HD void adamw_element(T& p, T grad, T& m, T& v, T& vmax, const AdamScalars<T>& c) {
  const T g = c.grad_sign * grad;
  if (kWd) p = p * c.decay;
  m = torch_lerp(m, g, c.lerp_weight);
  v = c.beta2 * v + c.one_minus_beta2 * (g * g);
  T vv = v;
  if (kAmsgrad) {
    vmax = lwkd_maximum(vmax, v);
    vv = vmax;
  }
  const T denom = lwkd_sqrt(vv) / c.bc2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

}  // namespace lwkd
