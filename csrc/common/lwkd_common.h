// Shared definitions for the CPU and CUDA kernels of lwkd_fast.
//
// Everything here is header-only and `__host__ __device__` when compiled by nvcc, so the CPU
// build (which runs in CI) exercises exactly the formulas the CUDA build (which only compiles in
// CI) uses.  See ../../SPEC.md sections 1-2 for the definitions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LWKD_HD __host__ __device__ __forceinline__
#else
#define LWKD_HD inline
#endif

namespace lwkd {

// ---------------------------------------------------------------------------------------------
// Option codes (parsed once from the op's string arguments on the host).
// ---------------------------------------------------------------------------------------------
enum class Metric : int32_t {
  kAt = 0,   // attention transfer: scale * ||a_s/|a_s| - a_t/|a_t| ||^2 with scale = 1/N
  kCos = 1,  // normalised squared distance of derivative maps: same formula with scale = 1
  kJsd = 2,  // weighted Jensen-Shannon divergence of the normalised maps
};

enum class Normalize : int32_t { kSum = 0, kSoftmax = 1 };

// |x|^p has three code paths: p == 2 (x*x), p == 1 (|x|) and the general power.
enum class PowMode : int32_t { kTwo = 0, kOne = 1, kGeneral = 2 };

LWKD_HD PowMode pow_mode(double p) {
  return p == 2.0 ? PowMode::kTwo : (p == 1.0 ? PowMode::kOne : PowMode::kGeneral);
}

// Parameters of one discrepancy call (same for every layer of the call).
struct MetricParams {
  Metric metric;
  Normalize normalize;  // only for kJsd
  double beta;          // JSD weight in (0, 1)
  double tau;           // softmax temperature (kSoftmax only)
  double eps;           // clamp for norms / sums
};

// ---------------------------------------------------------------------------------------------
// Small math wrappers with float and double overloads that work on host and device.
// ---------------------------------------------------------------------------------------------
LWKD_HD float lwkd_log(float x) { return logf(x); }
LWKD_HD double lwkd_log(double x) { return log(x); }
LWKD_HD float lwkd_exp(float x) { return expf(x); }
LWKD_HD double lwkd_exp(double x) { return exp(x); }
LWKD_HD float lwkd_sqrt(float x) { return sqrtf(x); }
LWKD_HD double lwkd_sqrt(double x) { return sqrt(x); }
LWKD_HD float lwkd_pow(float x, float y) { return powf(x, y); }
LWKD_HD double lwkd_pow(double x, double y) { return pow(x, y); }
template <typename T>
LWKD_HD T lwkd_abs(T x) { return x < T(0) ? -x : x; }
template <typename T>
LWKD_HD T lwkd_max(T a, T b) { return a < b ? b : a; }
template <typename T>
LWKD_HD T lwkd_sign(T x) { return T((T(0) < x) - (x < T(0))); }
// Finite test that needs neither <cmath> overloads on the device nor -ffinite-math semantics
// (the project never compiles with -ffast-math): x - x is 0 for finite x and NaN otherwise.
template <typename T>
LWKD_HD bool lwkd_isfinite(T x) { return (x - x) == T(0); }
template <typename T>
LWKD_HD T lwkd_nan() { return std::numeric_limits<T>::quiet_NaN(); }

// ---------------------------------------------------------------------------------------------
// Range guard (SPEC section 6).  The normalisers of a sample (the L2 norms or sums of its two
// maps; the softmax partition functions) are finite for every finite input inside the
// accumulation dtype's range.  When one overflows, the normalised map would silently become
// zeros and d_b a finite wrong value: the sample is NaN instead, which the rate rule skips.
// ---------------------------------------------------------------------------------------------
template <typename T>
LWKD_HD T unless_overflow(T d, T r_s, T r_t) {
  return (lwkd_isfinite(r_s) && lwkd_isfinite(r_t)) ? d : lwkd_nan<T>();
}

// ---------------------------------------------------------------------------------------------
// Attention map element: |x|^p, and its derivative p |x|^(p-1) sign(x).
// The derivative at x == 0 is 0 for every p (for p < 1 autograd through abs().pow() gives NaN
// there; the kernels use the subgradient 0 instead -- documented in the README).
// ---------------------------------------------------------------------------------------------
template <PowMode M, typename T>
LWKD_HD T abs_pow(T x, T p) {
  if (M == PowMode::kTwo) return x * x;
  if (M == PowMode::kOne) return lwkd_abs(x);
  return x == T(0) ? T(0) : lwkd_pow(lwkd_abs(x), p);
}

template <PowMode M, typename T>
LWKD_HD T abs_pow_grad(T x, T p) {
  if (M == PowMode::kTwo) return T(2) * x;
  if (M == PowMode::kOne) return lwkd_sign(x);
  return x == T(0) ? T(0) : p * lwkd_pow(lwkd_abs(x), p - T(1)) * lwkd_sign(x);
}

// ---------------------------------------------------------------------------------------------
// Normalisers.  All follow torch's clamp_min semantics, which the reference uses:
//   n = max(r, eps), and the gradient flows through r only when r >= eps.
// ---------------------------------------------------------------------------------------------
template <typename T>
LWKD_HD T clamp_eps(T r, T eps) { return r < eps ? eps : r; }

template <typename T>
LWKD_HD bool passes_clamp(T r, T eps) { return r >= eps; }

// ---------------------------------------------------------------------------------------------
// Squared distance of L2-normalised maps ("at" and "cos").
//   forward   d  = scale * sum_i (a_s[i]/n_s - a_t[i]/n_t)^2,  n = max(||a||_2, eps)
//   backward  g_q[i] = 2 * scale * gd * (q_s[i] - q_t[i])
//             g_a[i] = (g_q[i] - [r_s >= eps] q_s[i] * <q_s, g_q>) / n_s
// ---------------------------------------------------------------------------------------------
template <typename T>
LWKD_HD T sqdist_term(T as, T at, T inv_ns, T inv_nt) {
  const T d = as * inv_ns - at * inv_nt;
  return d * d;
}

template <typename T>
LWKD_HD T sqdist_grad_q(T as, T at, T inv_ns, T inv_nt, T two_scale_gd) {
  return two_scale_gd * (as * inv_ns - at * inv_nt);
}

// g_a from g_q; `proj` = [r_s >= eps] * <q_s, g_q>
template <typename T>
LWKD_HD T sqdist_grad_a(T gq, T as, T inv_ns, T proj) {
  return (gq - as * inv_ns * proj) * inv_ns;
}

// ---------------------------------------------------------------------------------------------
// Weighted Jensen-Shannon divergence of two distributions P_s, P_t with weight beta:
//   M = beta P_s + (1-beta) P_t
//   d = sum_i beta P_s log(P_s/M) + (1-beta) P_t log(P_t/M),  0 log 0 = 0
// d/dP_s[i] = beta log(P_s/M) where P_s != 0; where P_s == 0 the reference's autograd gives
// -beta if M > 0 (from the teacher term through M) and 0 otherwise.  The kernels reproduce
// exactly that convention.  Only an exact zero is skipped ("!= 0", not "> 0"): a NaN
// probability (a NaN or infinite activation) makes the term NaN, so a corrupted sample can
// never look like a perfect match (SPEC section 2).
// ---------------------------------------------------------------------------------------------
template <typename T>
LWKD_HD T jsd_term(T ps, T pt, T beta) {
  const T m = beta * ps + (T(1) - beta) * pt;
  T r = T(0);
  if (ps != T(0)) r += beta * ps * lwkd_log(ps / m);
  if (pt != T(0)) r += (T(1) - beta) * pt * lwkd_log(pt / m);
  return r;
}

template <typename T>
LWKD_HD T jsd_grad_ps(T ps, T pt, T beta) {
  const T m = beta * ps + (T(1) - beta) * pt;
  if (ps != T(0)) return beta * lwkd_log(ps / m);
  return m > T(0) ? -beta : T(0);
}

// Sum normalisation P = a / max(S, eps), S = sum a.  Backward from g_P to g_a:
//   S >= eps:  g_a = (g_P - <g_P, P>) / S        else:  g_a = g_P / eps
// `proj` = [S >= eps] * <g_P, P>
template <typename T>
LWKD_HD T sumnorm_grad_a(T gp, T inv_n, T proj) { return (gp - proj) * inv_n; }

// Softmax normalisation P = softmax(a / tau).  Backward: g_a = P (g_P - <g_P, P>) / tau.
template <typename T>
LWKD_HD T softmax_grad_a(T gp, T p, T proj, T inv_tau) { return p * (gp - proj) * inv_tau; }

}  // namespace lwkd
