// Host-side argument parsing and tensor preparation shared by the CPU and CUDA implementations
// (host code only: it uses ATen).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "common/lwkd_common.h"

namespace lwkd {

inline MetricParams parse_params(c10::string_view metric, c10::string_view normalize, double beta,
                                 double tau, double eps, bool attention) {
  MetricParams prm{};
  const std::string m(metric);
  if (attention && m == "at") {
    prm.metric = Metric::kAt;
  } else if (!attention && m == "cos") {
    prm.metric = Metric::kCos;
  } else if (m == "jsd") {
    prm.metric = Metric::kJsd;
  } else {
    TORCH_CHECK(false, "lwkd: unknown metric '", m, "' for ",
                attention ? "attention_discrepancy (expected 'at' or 'jsd')"
                          : "map_discrepancy (expected 'cos' or 'jsd')");
  }
  const std::string nm(normalize);
  TORCH_CHECK(nm == "sum" || nm == "softmax", "lwkd: unknown normalize '", nm,
              "' (expected 'sum' or 'softmax')");
  prm.normalize = nm == "softmax" ? Normalize::kSoftmax : Normalize::kSum;
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "lwkd: beta must lie in (0, 1), got ", beta);
  TORCH_CHECK(tau > 0.0 && std::isfinite(tau), "lwkd: tau must be a positive finite number, got ", tau);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "lwkd: eps must be a positive finite number, got ", eps);
  prm.beta = beta;
  prm.tau = tau;
  prm.eps = eps;
  return prm;
}

inline int64_t wrap_dim(int64_t d, int64_t ndim) {
  TORCH_CHECK(d >= -ndim && d < ndim, "lwkd: channel_dim ", d, " out of range for a ", ndim,
              "-d tensor");
  return d < 0 ? d + ndim : d;
}

// Checks shared by every discrepancy op: equal list lengths, same device, floating dtypes,
// one batch size B > 0 across all pairs.
inline int64_t check_pair_lists(at::TensorList s, at::TensorList t, const char* op) {
  TORCH_CHECK(s.size() == t.size(), "lwkd::", op, ": ", s.size(), " student tensors but ",
              t.size(), " teacher tensors");
  TORCH_CHECK(!s.empty(), "lwkd::", op, ": needs at least one layer pair");
  const auto dev = s[0].device();
  const int64_t B = s[0].dim() > 0 ? s[0].size(0) : 0;
  for (size_t k = 0; k < s.size(); ++k) {
    for (const at::Tensor* x : {&s[k], &t[k]}) {
      const char* who = x == &s[k] ? "student" : "teacher";
      TORCH_CHECK(x->dim() >= 1, "lwkd::", op, ": pair ", k, ": ", who, " tensor must have a batch dimension");
      TORCH_CHECK(at::isFloatingType(x->scalar_type()), "lwkd::", op, ": pair ", k, ": ", who,
                  " tensor has dtype ", x->scalar_type(), "; expected a floating dtype");
      TORCH_CHECK(x->device() == dev, "lwkd::", op, ": pair ", k, ": ", who, " tensor is on ",
                  x->device(), " but pair 0 is on ", dev);
      TORCH_CHECK(x->size(0) == B, "lwkd::", op, ": pair ", k, ": ", who, " batch size ",
                  x->size(0), " differs from ", B);
    }
  }
  TORCH_CHECK(B > 0, "lwkd::", op, ": batch size must be > 0");
  return B;
}

// float64 if any input is float64, else float32 (SPEC section 2).
inline at::ScalarType acc_dtype(at::TensorList s, at::TensorList t) {
  for (const auto& x : s) if (x.scalar_type() == at::kDouble) return at::kDouble;
  for (const auto& x : t) if (x.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline std::vector<int64_t> bcn_shape(const at::Tensor& x, int64_t cd) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d)
    if (d != cd) n *= x.size(d);
  return {x.size(0), x.dim() > 1 ? x.size(cd) : 1, n};
}

// (B, C, N) strided view of a feature tensor whose channel dimension is `cd`.  A view whenever
// the spatial dimensions can be merged (contiguous, channels_last, token layouts, slices); one
// explicit copy otherwise.
inline at::Tensor bcn_view(const at::Tensor& x, int64_t cd) {
  if (x.dim() == 1) return x.view({x.size(0), 1, 1});
  const auto shape = bcn_shape(x, cd);
  return x.movedim(cd, 1).reshape(shape);
}

// Gradient buffer of the same shape as x (strides of x where it is dense) and its (B, C, N)
// view to write into.
inline std::pair<at::Tensor, at::Tensor> bcn_grad_buffer(const at::Tensor& x, int64_t cd) {
  at::Tensor g = at::empty_like(x);
  if (x.dim() == 1) return {g, g.view({x.size(0), 1, 1})};
  at::Tensor g3 = bcn_view(g, cd);
  if (!g3.is_alias_of(g)) {  // spatial dims not mergeable in x's layout: write (B, C, N) directly
    g3 = at::empty(bcn_shape(x, cd), x.options());
    std::vector<int64_t> full{x.size(0), x.size(cd)};
    for (int64_t d = 1; d < x.dim(); ++d)
      if (d != cd) full.push_back(x.size(d));
    g = g3.view(full).movedim(1, cd);
  }
  return {g, g3};
}

// Per-sample flat view (B, N) of a derivative map pair.  The metrics are sums over elements
// paired index by index, so any element order works as long as student and teacher use the
// same one: when both are dense with identical strides the kernels walk memory order (no copy,
// channels_last included); otherwise both are made contiguous (one copy, documented).
struct FlatPair {
  at::Tensor s, t;   // dense tensors in matching memory order
  int64_t N;         // elements per sample
};

inline bool dense_batch_outer(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return false;
  if (x.dim() == 0) return false;
  const int64_t n = x.numel() / std::max<int64_t>(x.size(0), 1);
  return x.size(0) == 1 || x.stride(0) == n;
}

// Same strides on every dimension that has more than one element.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

inline FlatPair flat_pair(const at::Tensor& s, const at::Tensor& t) {
  TORCH_CHECK(s.sizes() == t.sizes(), "lwkd::map_discrepancy: student map shape ", s.sizes(),
              " differs from teacher map shape ", t.sizes());
  FlatPair fp;
  if (dense_batch_outer(s) && dense_batch_outer(t) && same_layout(s, t)) {
    fp.s = s;
    fp.t = t;
  } else {
    fp.s = s.contiguous();
    fp.t = t.contiguous();
  }
  fp.N = s.numel() / s.size(0);
  return fp;
}

}  // namespace lwkd
