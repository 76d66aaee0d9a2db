// Host-side argument parsing and tensor preparation shared by the CPU and CUDA implementations
// (host code only: it uses ATen).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "common/lwkd_common.h"

namespace lwkd {

// How an implementation allocates its gradient outputs (the CPU uses its buffer pool).
using OutputAlloc = at::Tensor (*)(const at::Tensor&);
inline at::Tensor plain_empty_like(const at::Tensor& x) { return at::empty_like(x); }

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

// Every tensor of a pair needs a non-empty extent (SPEC section 6): at least one channel and one
// location for the attention ops (`channel_dim` given), at least one element per sample for the
// map ops.  An empty extent would be a 0/0 in the metric and a division by zero in the work
// tables of the GPU kernels.  Call after B > 0 is known.
inline void check_extent(const at::Tensor& x, const char* op, size_t k, const char* who,
                         std::optional<int64_t> channel_dim) {
  if (!channel_dim.has_value()) {
    TORCH_CHECK(x.numel() > 0, "lwkd::", op, ": pair ", k, ": ", who, " tensor has shape ", x.sizes(),
                ", 0 elements per sample; every derivative map needs at least one element");
    return;
  }
  if (x.dim() < 2) return;  // (B,): one channel, one location
  const int64_t cd = wrap_dim(*channel_dim, x.dim());
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d)
    if (d != cd) n *= x.size(d);
  TORCH_CHECK(x.size(cd) > 0 && n > 0, "lwkd::", op, ": pair ", k, ": ", who, " tensor has shape ", x.sizes(),
              " (", x.size(cd), " channels, ", n, " locations); every pair needs at least one channel and "
              "one location");
}

// Checks shared by every discrepancy op: equal list lengths, same device, floating dtypes,
// one batch size B > 0 across all pairs, non-empty extents (check_extent; `channel_dim` for
// the attention ops).
inline int64_t check_pair_lists(at::TensorList s, at::TensorList t, const char* op,
                                std::optional<int64_t> channel_dim = std::nullopt) {
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
  for (size_t k = 0; k < s.size(); ++k) {
    check_extent(s[k], op, k, "student", channel_dim);
    check_extent(t[k], op, k, "teacher", channel_dim);
  }
  return B;
}

// Argument checks shared by the CPU and CUDA attention backward; returns B (0 when K == 0).
inline int64_t check_attention_backward(const at::Tensor& grad, at::TensorList student,
                                        at::TensorList maps_s, at::TensorList maps_t, int64_t channel_dim) {
  constexpr const char* op = "attention_discrepancy_backward";
  const int64_t K = static_cast<int64_t>(student.size());
  TORCH_CHECK(maps_s.size() == student.size() && maps_t.size() == student.size(),
              "lwkd::", op, ": list lengths differ");
  if (K == 0) return 0;
  const int64_t B = student[0].dim() > 0 ? student[0].size(0) : 0;
  TORCH_CHECK(B > 0, "lwkd::", op, ": batch size must be > 0");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == K && grad.size(1) == B,
              "lwkd::", op, ": grad must be (", K, ", ", B, "), got ", grad.sizes());
  for (size_t k = 0; k < student.size(); ++k) {
    TORCH_CHECK(student[k].dim() >= 1 && student[k].size(0) == B, "lwkd::", op, ": pair ", k,
                ": student tensor has shape ", student[k].sizes(), " but the batch size is ", B);
    check_extent(student[k], op, k, "student", channel_dim);
  }
  return B;
}

// Masks of valid locations of the attention ops (SPEC section 2, "Masked locations"): None, or
// one entry per pair, each undefined (no mask) or a (B, N) tensor of 0/1 on the op's device.
// Returns K tensors (undefined where there is no mask), contiguous, in `dtype` (the call's
// accumulation dtype, which the kernels read them in).
using MaskList = std::optional<c10::List<std::optional<at::Tensor>>>;

inline std::vector<at::Tensor> check_masks(const MaskList& masks, int64_t K, int64_t B,
                                           const std::vector<int64_t>& Ns, const at::Device& device,
                                           at::ScalarType dtype, const char* op) {
  std::vector<at::Tensor> out(K);
  if (!masks.has_value()) return out;
  TORCH_CHECK(static_cast<int64_t>(masks->size()) == K, "lwkd::", op, ": ", masks->size(), " masks for ", K,
              " layer pairs (one entry, or None, per pair)");
  for (int64_t k = 0; k < K; ++k) {
    const std::optional<at::Tensor> m = masks->get(k);
    if (!m.has_value() || !m->defined()) continue;
    TORCH_CHECK(m->dim() == 2 && m->size(0) == B && m->size(1) == Ns[k], "lwkd::", op, ": pair ", k,
                ": masks[", k, "] has shape ", m->sizes(), " but the pair has (B, N) = (", B, ", ", Ns[k], ")");
    TORCH_CHECK(m->device() == device, "lwkd::", op, ": pair ", k, ": masks[", k, "] is on ", m->device(),
                " but the features are on ", device);
    TORCH_CHECK(at::isFloatingType(m->scalar_type()) || m->scalar_type() == at::kBool, "lwkd::", op, ": pair ",
                k, ": masks[", k, "] has dtype ", m->scalar_type(), "; expected bool or 0/1 floats");
    out[k] = m->to(dtype).contiguous();
  }
  return out;
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

// Gradient of a feature tensor x: `out` always has the layout of at::empty_like(x) (what the fake
// kernel promises); `work` is its (B, C, N) view for the kernel to write.  When x's layout does
// not let the spatial dims merge (channel dim in the middle of a contiguous tensor), `work` is a
// separate (B, C, N) buffer and finish() copies it into `out` once.
struct GradBuffer {
  at::Tensor out, work;
  int64_t cd = 1;
  bool copy_back = false;

  void finish() {
    if (!copy_back) return;
    std::vector<int64_t> full{out.size(0), out.size(cd)};
    for (int64_t d = 1; d < out.dim(); ++d)
      if (d != cd) full.push_back(out.size(d));
    out.copy_(work.view(full).movedim(1, cd));
  }
};

inline GradBuffer bcn_grad_buffer(const at::Tensor& x, int64_t cd, OutputAlloc alloc = &plain_empty_like) {
  GradBuffer gb;
  gb.cd = cd;
  gb.out = alloc(x);
  if (x.dim() == 1) {
    gb.work = gb.out.view({x.size(0), 1, 1});
    return gb;
  }
  gb.work = bcn_view(gb.out, cd);
  if (!gb.work.is_alias_of(gb.out)) {
    gb.work = at::empty(bcn_shape(x, cd), x.options());
    gb.copy_back = true;
  }
  return gb;
}

// Per-sample flat view (B, N) of a derivative map pair.  The metrics are sums over elements
// paired index by index, so any element order works as long as student and teacher use the
// same one: when both are dense with identical strides the kernels walk memory order (no copy,
// channels_last included); otherwise both are made contiguous (one copy, documented).
struct FlatPair {
  at::Tensor s, t;   // dense tensors in matching memory order
  int64_t N;         // elements per sample
  bool copied;       // s is a contiguous copy of the student (layouts differed)
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
    fp.copied = false;
  } else {
    fp.s = s.contiguous();
    fp.t = t.contiguous();
    fp.copied = !fp.s.is_same(s);
  }
  fp.N = s.numel() / s.size(0);
  return fp;
}

// Gradient of a derivative map: `out` has the layout of at::empty_like(student); `work` is dense
// in the memory order the kernel walks (fp.s's).  finish() copies when the two differ.
struct FlatGrad {
  at::Tensor out, work;
  void finish() {
    if (!work.is_same(out)) out.copy_(work);
  }
};

inline FlatGrad flat_grad_buffer(const at::Tensor& student, const FlatPair& fp,
                                 OutputAlloc alloc = &plain_empty_like) {
  FlatGrad g;
  g.out = alloc(student);
  g.work = (!fp.copied && same_layout(g.out, fp.s)) ? g.out : at::empty_like(fp.s);
  return g;
}

}  // namespace lwkd
