// CPU kernels of the discrepancy ops (SPEC sections 1-2): all K layer pairs in one call,
// at::parallel_for over (sample, layer) tiles, float64 accumulation for every input dtype.
//
// Tiles are numbered sample-major / layer-minor, so the contiguous chunk each thread receives
// holds every layer in equal measure: layers of very different sizes (a ResNet's stages) still
// balance across threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/host_prep.h"
#include "cpu/buffer_pool.h"

namespace lwkd {
namespace {

// Gradient buffers come from the pool; each backward call is one of its rounds (see buffer_pool.h).
at::Tensor pooled_empty_like(const at::Tensor& x) { return CpuBufferPool::instance().empty_like(x); }

using acc_t = double;  // CPU accumulator of every reduction (see reduce_channels_impl)

// ---------------------------------------------------------------------------------------------
// Channel reduction: out[i] = (1/C) sum_c |x[c, i]|^p for one sample of a (C, N) strided map.
//
// Precision/speed: blocks of 8 channels are summed in `op_t` (the input's opmath type, float for
// float16/bfloat16/float32: a pairwise tree, relative error <= 3 ulp per block) and every block
// is added into a float64 accumulator.  Converting each element to double instead costs 2x in
// this memory-bound loop; a plain float accumulator would grow its error with C.  A call whose
// output is float64 (some input is float64) uses op_t = double for every tensor, so a float32
// teacher beside a float64 student loses nothing (SPEC section 6, mixed dtypes).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kBlock = 8;

template <typename scalar_t, PowMode M, typename op_t>
void reduce_channels_impl(const scalar_t* __restrict__ x, int64_t C, int64_t N, int64_t sc,
                          int64_t sn, acc_t p, acc_t* __restrict__ out) {
  const op_t pp = op_t(p);
  auto f = [pp](scalar_t v) { return abs_pow<M>(op_t(v), pp); };
  std::fill(out, out + N, acc_t(0));
  if (sn == 1) {
    // NCHW: stream 8 rows of N contiguous values per sweep over `out`.
    int64_t c = 0;
    for (; c + kBlock <= C; c += kBlock) {
      const scalar_t* __restrict__ r0 = x + c * sc;
      const scalar_t* __restrict__ r1 = r0 + sc;
      const scalar_t* __restrict__ r2 = r1 + sc;
      const scalar_t* __restrict__ r3 = r2 + sc;
      const scalar_t* __restrict__ r4 = r3 + sc;
      const scalar_t* __restrict__ r5 = r4 + sc;
      const scalar_t* __restrict__ r6 = r5 + sc;
      const scalar_t* __restrict__ r7 = r6 + sc;
      for (int64_t i = 0; i < N; ++i) {
        const op_t v = ((f(r0[i]) + f(r1[i])) + (f(r2[i]) + f(r3[i]))) +
                       ((f(r4[i]) + f(r5[i])) + (f(r6[i]) + f(r7[i])));
        out[i] += acc_t(v);
      }
    }
    for (; c < C; ++c) {
      const scalar_t* __restrict__ r = x + c * sc;
      for (int64_t i = 0; i < N; ++i) out[i] += acc_t(f(r[i]));
    }
  } else if (sc == 1) {
    // channels_last / token layout: each location holds C contiguous channel values.
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t* __restrict__ r = x + i * sn;
      acc_t total = 0;
      int64_t c = 0;
      for (; c + kBlock <= C; c += kBlock)
        total += acc_t(((f(r[c]) + f(r[c + 1])) + (f(r[c + 2]) + f(r[c + 3]))) +
                       ((f(r[c + 4]) + f(r[c + 5])) + (f(r[c + 6]) + f(r[c + 7]))));
      for (; c < C; ++c) total += acc_t(f(r[c]));
      out[i] = total;
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < N; ++i) out[i] += acc_t(f(x[c * sc + i * sn]));
  }
  const acc_t inv_c = acc_t(1) / acc_t(C);
  for (int64_t i = 0; i < N; ++i) out[i] *= inv_c;
}

// g[c, i] = h[i] * d|x|^p/dx at x[c, i]   (h already carries the 1/C of the channel mean)
template <typename scalar_t, PowMode M>
void channel_grad_impl(const scalar_t* __restrict__ x, int64_t C, int64_t N, int64_t sc, int64_t sn,
                       scalar_t* __restrict__ g, int64_t gsc, int64_t gsn,
                       const at::opmath_type<scalar_t>* __restrict__ h,
                       at::opmath_type<scalar_t> p) {
  using op_t = at::opmath_type<scalar_t>;
  if (sn == 1 && gsn == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* __restrict__ r = x + c * sc;
      scalar_t* __restrict__ o = g + c * gsc;
      for (int64_t i = 0; i < N; ++i) o[i] = scalar_t(h[i] * abs_pow_grad<M>(op_t(r[i]), p));
    }
  } else if (sc == 1 && gsc == 1) {
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t* __restrict__ r = x + i * sn;
      scalar_t* __restrict__ o = g + i * gsn;
      const op_t hi = h[i];
      for (int64_t c = 0; c < C; ++c) o[c] = scalar_t(hi * abs_pow_grad<M>(op_t(r[c]), p));
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < N; ++i)
        g[c * gsc + i * gsn] = scalar_t(h[i] * abs_pow_grad<M>(op_t(x[c * sc + i * sn]), p));
  }
}

// A (B, C, N) strided tensor as raw pointer + strides.
struct Bcn {
  const void* ptr;
  void* mut;
  at::ScalarType dtype;
  int64_t C, N, sb, sc, sn;
};

Bcn bcn_of(const at::Tensor& t3) {
  return Bcn{t3.const_data_ptr(), nullptr, t3.scalar_type(), t3.size(1), t3.size(2),
             t3.stride(0), t3.stride(1), t3.stride(2)};
}

Bcn bcn_of_mut(at::Tensor& t3) {
  Bcn b = bcn_of(t3);
  b.mut = t3.mutable_data_ptr();
  return b;
}

#define LWKD_DISPATCH_POW(pm, ...)                              \
  switch (pm) {                                                 \
    case PowMode::kTwo: { constexpr PowMode kM = PowMode::kTwo; __VA_ARGS__; break; } \
    case PowMode::kOne: { constexpr PowMode kM = PowMode::kOne; __VA_ARGS__; break; } \
    default: { constexpr PowMode kM = PowMode::kGeneral; __VA_ARGS__; break; }        \
  }

// `exact`: accumulate in double throughout (the call's output is float64).
void reduce_channels(const Bcn& f, int64_t b, PowMode pm, acc_t p, acc_t* out, bool exact) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.dtype, "lwkd_reduce_channels", [&] {
    const scalar_t* x = static_cast<const scalar_t*>(f.ptr) + b * f.sb;
    if (exact) {
      LWKD_DISPATCH_POW(pm, reduce_channels_impl<scalar_t, kM, double>(x, f.C, f.N, f.sc, f.sn, p, out));
    } else {
      using op_t = at::opmath_type<scalar_t>;
      LWKD_DISPATCH_POW(pm, reduce_channels_impl<scalar_t, kM, op_t>(x, f.C, f.N, f.sc, f.sn, p, out));
    }
  });
}

void channel_grad(const Bcn& f, const Bcn& g, int64_t b, PowMode pm, acc_t p, const acc_t* ga,
                  std::vector<double>& hbuf) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.dtype, "lwkd_channel_grad", [&] {
    using op_t = at::opmath_type<scalar_t>;
    op_t* h = reinterpret_cast<op_t*>(hbuf.data());  // hbuf holds N doubles >= N op_t
    const acc_t inv_c = acc_t(1) / acc_t(f.C);
    for (int64_t i = 0; i < f.N; ++i) h[i] = op_t(ga[i] * inv_c);
    const scalar_t* x = static_cast<const scalar_t*>(f.ptr) + b * f.sb;
    scalar_t* o = static_cast<scalar_t*>(g.mut) + b * g.sb;
    LWKD_DISPATCH_POW(pm, channel_grad_impl<scalar_t, kM>(x, f.C, f.N, f.sc, f.sn, o, g.sc, g.sn, h, op_t(p)));
  });
}

// ---------------------------------------------------------------------------------------------
// Per-sample metric on two maps a_s, a_t of length N (double buffers), SPEC section 2.
//
// `m` (null: every location valid) is the sample's mask of valid locations (0/1, SPEC section 2,
// "Masked locations"): every sum over locations runs over the valid ones only, which for "at"
// and the sum-normalised JSD is the unmasked formula on m*a (with 1/N_valid for "at"), and for
// the softmax a softmax over the valid locations (P = 0 elsewhere).  A sample without a valid
// location gives 0 with zero gradient.
// ---------------------------------------------------------------------------------------------
inline acc_t valid(const acc_t* m, int64_t i) { return m == nullptr ? acc_t(1) : m[i]; }

acc_t count_valid(const acc_t* m, int64_t N) {
  if (m == nullptr) return acc_t(N);
  acc_t n = 0;
  for (int64_t i = 0; i < N; ++i) n += m[i];
  return n;
}

// P = m a / max(sum m a, eps) or the softmax of a / tau over the valid locations; returns the
// normaliser (sum m a, or the partition function; 0 for a sample without valid location).
acc_t to_distribution(const acc_t* a, int64_t N, const MetricParams& prm, acc_t* P, const acc_t* m) {
  if (prm.normalize == Normalize::kSum) {
    acc_t s = 0;
    for (int64_t i = 0; i < N; ++i) s += valid(m, i) * a[i];
    const acc_t inv = acc_t(1) / clamp_eps(s, acc_t(prm.eps));
    for (int64_t i = 0; i < N; ++i) P[i] = valid(m, i) * a[i] * inv;
    return s;
  }
  const acc_t inv_tau = acc_t(1) / acc_t(prm.tau);
  bool any = false;
  acc_t mx = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (valid(m, i) == acc_t(0)) continue;
    mx = any ? lwkd_max(mx, a[i]) : a[i];
    any = true;
  }
  acc_t z = 0;
  for (int64_t i = 0; i < N; ++i) {
    P[i] = valid(m, i) == acc_t(0) ? acc_t(0) : lwkd_exp((a[i] - mx) * inv_tau);
    z += P[i];
  }
  if (!any) return z;  // no valid location: P = 0
  const acc_t inv_z = acc_t(1) / z;
  for (int64_t i = 0; i < N; ++i) P[i] *= inv_z;
  return z;
}

acc_t l2norm(const acc_t* a, int64_t N, const acc_t* m) {
  acc_t s = 0;
  for (int64_t i = 0; i < N; ++i) s += valid(m, i) * a[i] * a[i];
  return lwkd_sqrt(s);
}

// 1/N_valid for "at" (0 without valid location: d = 0), 1 for "cos"
acc_t sqdist_scale(const MetricParams& prm, const acc_t* m, int64_t N) {
  if (prm.metric != Metric::kAt) return acc_t(1);
  const acc_t n = count_valid(m, N);
  return n > acc_t(0) ? acc_t(1) / n : acc_t(0);
}

acc_t metric_forward(const acc_t* as, const acc_t* at, int64_t N, const MetricParams& prm,
                     acc_t* ps, acc_t* pt, const acc_t* m = nullptr) {
  const acc_t eps = prm.eps;
  if (prm.metric == Metric::kJsd) {
    const acc_t rs = to_distribution(as, N, prm, ps, m);
    const acc_t rt = to_distribution(at, N, prm, pt, m);
    const acc_t beta = prm.beta;
    acc_t d = 0;
    for (int64_t i = 0; i < N; ++i) d += jsd_term(ps[i], pt[i], beta);
    return unless_overflow(d, rs, rt);
  }
  const acc_t rs = l2norm(as, N, m), rt = l2norm(at, N, m);
  const acc_t inv_ns = acc_t(1) / clamp_eps(rs, eps);
  const acc_t inv_nt = acc_t(1) / clamp_eps(rt, eps);
  acc_t d = 0;
  for (int64_t i = 0; i < N; ++i) d += valid(m, i) * sqdist_term(as[i], at[i], inv_ns, inv_nt);
  return unless_overflow(d * sqdist_scale(prm, m, N), rs, rt);
}

// ga[i] = gd * d(metric)/d(a_s[i])  (0 at masked locations)
void metric_backward(const acc_t* as, const acc_t* at, int64_t N, const MetricParams& prm,
                     acc_t gd, acc_t* ga, acc_t* ps, acc_t* pt, const acc_t* m = nullptr) {
  const acc_t eps = prm.eps;
  if (prm.metric == Metric::kJsd) {
    const acc_t s = to_distribution(as, N, prm, ps, m);
    to_distribution(at, N, prm, pt, m);
    const acc_t beta = prm.beta;
    acc_t proj = 0;
    for (int64_t i = 0; i < N; ++i) {
      ga[i] = gd * jsd_grad_ps(ps[i], pt[i], beta);
      proj += ga[i] * ps[i];
    }
    if (prm.normalize == Normalize::kSum) {
      if (!passes_clamp(s, eps)) proj = 0;
      const acc_t inv_n = acc_t(1) / clamp_eps(s, eps);
      for (int64_t i = 0; i < N; ++i) ga[i] = valid(m, i) * sumnorm_grad_a(ga[i], inv_n, proj);
    } else {
      const acc_t inv_tau = acc_t(1) / acc_t(prm.tau);
      for (int64_t i = 0; i < N; ++i) ga[i] = softmax_grad_a(ga[i], ps[i], proj, inv_tau);
    }
    return;
  }
  const acc_t rs = l2norm(as, N, m);
  const acc_t inv_ns = acc_t(1) / clamp_eps(rs, eps);
  const acc_t inv_nt = acc_t(1) / clamp_eps(l2norm(at, N, m), eps);
  const acc_t two_scale_gd = acc_t(2) * sqdist_scale(prm, m, N) * gd;
  acc_t proj = 0;
  if (passes_clamp(rs, eps))
    for (int64_t i = 0; i < N; ++i)
      proj += valid(m, i) * as[i] * inv_ns * sqdist_grad_q(as[i], at[i], inv_ns, inv_nt, two_scale_gd);
  for (int64_t i = 0; i < N; ++i)
    ga[i] = valid(m, i) * sqdist_grad_a(sqdist_grad_q(as[i], at[i], inv_ns, inv_nt, two_scale_gd), as[i], inv_ns, proj);
}

// ---------------------------------------------------------------------------------------------
// Helpers for reading / writing one sample of a map.
// ---------------------------------------------------------------------------------------------
void load_row(const at::Tensor& m, int64_t b, int64_t N, acc_t* out, bool absval) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "lwkd_load_row", [&] {
    const scalar_t* r = m.const_data_ptr<scalar_t>() + b * N;
    if (absval)
      for (int64_t i = 0; i < N; ++i) out[i] = lwkd_abs(acc_t(r[i]));
    else
      for (int64_t i = 0; i < N; ++i) out[i] = acc_t(r[i]);
  });
}

void store_value(at::Tensor& d, int64_t idx, acc_t v) {
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "lwkd_store_value", [&] { d.mutable_data_ptr<scalar_t>()[idx] = scalar_t(v); });
}

void store_row(at::Tensor& m, int64_t b, int64_t N, const acc_t* in) {
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "lwkd_store_row", [&] {
    scalar_t* r = m.mutable_data_ptr<scalar_t>() + b * N;
    for (int64_t i = 0; i < N; ++i) r[i] = scalar_t(in[i]);
  });
}

struct Scratch {
  std::vector<acc_t> a, b, c, d, e, m;
  explicit Scratch(int64_t n) : a(n), b(n), c(n), d(n), e(n), m(n) {}
};

// The sample's mask row in w.m (null when the pair has no mask).
const acc_t* mask_row(const std::vector<at::Tensor>& masks, int64_t k, int64_t b, int64_t N, Scratch& w) {
  if (!masks[k].defined()) return nullptr;
  load_row(masks[k], b, N, w.m.data(), false);
  return w.m.data();
}

// Runs f(k, b, scratch) over every (layer k, sample b) tile.  Tiles are numbered sample-major /
// layer-minor (see the file comment); tiny problems stay on one thread because a parallel
// region costs a few microseconds.
template <typename F>
void parallel_tiles(int64_t K, int64_t B, int64_t elems_all_layers, int64_t nmax, const F& f) {
  const int64_t per_tile = std::max<int64_t>(1, elems_all_layers / std::max<int64_t>(K, 1));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_tile);
  at::parallel_for(0, K * B, grain, [&](int64_t begin, int64_t end) {
    Scratch w(nmax);
    for (int64_t t = begin; t < end; ++t) f(t % K, t / K, w);
  });
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> attention_discrepancy_cpu(
    at::TensorList student, at::TensorList teacher, double p, c10::string_view metric,
    double beta, c10::string_view normalize, double tau, double eps, int64_t channel_dim, const MaskList& masks) {
  const MetricParams prm = parse_params(metric, normalize, beta, tau, eps, /*attention=*/true);
  TORCH_CHECK(p > 0.0 && std::isfinite(p), "lwkd::attention_discrepancy: p must be positive and finite, got ", p);
  const int64_t B = check_pair_lists(student, teacher, "attention_discrepancy", channel_dim);
  const int64_t K = static_cast<int64_t>(student.size());
  const auto out_dt = acc_dtype(student, teacher);
  const auto opts = student[0].options().dtype(out_dt);

  std::vector<at::Tensor> s3(K), t3(K), maps_s(K), maps_t(K);
  std::vector<Bcn> fs(K), ft(K);
  int64_t nmax = 1, total = 0;
  for (int64_t k = 0; k < K; ++k) {
    s3[k] = bcn_view(student[k], wrap_dim(channel_dim, student[k].dim()));
    t3[k] = bcn_view(teacher[k], wrap_dim(channel_dim, teacher[k].dim()));
    TORCH_CHECK(s3[k].size(2) == t3[k].size(2), "lwkd::attention_discrepancy: pair ", k,
                ": student has ", s3[k].size(2), " locations but teacher has ", t3[k].size(2));
    fs[k] = bcn_of(s3[k]);
    ft[k] = bcn_of(t3[k]);
    const int64_t N = fs[k].N;
    maps_s[k] = at::empty({B, N}, opts);
    maps_t[k] = at::empty({B, N}, opts);
    nmax = std::max(nmax, N);
    total += (fs[k].C + ft[k].C) * N;
  }
  at::Tensor d = at::empty({K, B}, opts);
  const PowMode pm = pow_mode(p);
  const bool exact = out_dt == at::kDouble;
  std::vector<int64_t> Ns(K);
  for (int64_t k = 0; k < K; ++k) Ns[k] = fs[k].N;
  const std::vector<at::Tensor> mk =
      check_masks(masks, K, B, Ns, student[0].device(), at::kDouble, "attention_discrepancy");

  parallel_tiles(K, B, total, nmax, [&](int64_t k, int64_t b, Scratch& w) {
    const int64_t N = fs[k].N;
    reduce_channels(fs[k], b, pm, p, w.a.data(), exact);
    reduce_channels(ft[k], b, pm, p, w.b.data(), exact);
    const acc_t v = metric_forward(w.a.data(), w.b.data(), N, prm, w.c.data(), w.d.data(), mask_row(mk, k, b, N, w));
    store_row(maps_s[k], b, N, w.a.data());
    store_row(maps_t[k], b, N, w.b.data());
    store_value(d, k * B + b, v);
  });
  return {d, maps_s, maps_t};
}

std::vector<at::Tensor> attention_discrepancy_backward_cpu(
    const at::Tensor& grad, at::TensorList student, at::TensorList maps_s, at::TensorList maps_t,
    double p, c10::string_view metric, double beta, c10::string_view normalize, double tau,
    double eps, int64_t channel_dim, const MaskList& masks) {
  const MetricParams prm = parse_params(metric, normalize, beta, tau, eps, /*attention=*/true);
  const int64_t K = static_cast<int64_t>(student.size());
  const int64_t B = check_attention_backward(grad, student, maps_s, maps_t, channel_dim);
  if (K == 0) return {};
  CpuBufferPool::instance().begin_round();
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();

  std::vector<at::Tensor> s3(K), ms(K), mt(K);
  std::vector<GradBuffer> gbuf(K);
  std::vector<Bcn> fs(K), fg(K);
  int64_t nmax = 1, total = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t cd = wrap_dim(channel_dim, student[k].dim());
    s3[k] = bcn_view(student[k], cd);
    gbuf[k] = bcn_grad_buffer(student[k], cd, &pooled_empty_like);
    fs[k] = bcn_of(s3[k]);
    fg[k] = bcn_of_mut(gbuf[k].work);
    ms[k] = maps_s[k].contiguous();
    mt[k] = maps_t[k].contiguous();
    TORCH_CHECK(ms[k].numel() == B * fs[k].N && mt[k].numel() == B * fs[k].N,
                "lwkd::attention_discrepancy_backward: pair ", k, ": saved maps do not match the student");
    nmax = std::max(nmax, fs[k].N);
    total += fs[k].C * fs[k].N;
  }
  const PowMode pm = pow_mode(p);
  std::vector<int64_t> Ns(K);
  for (int64_t k = 0; k < K; ++k) Ns[k] = fs[k].N;
  const std::vector<at::Tensor> mk =
      check_masks(masks, K, B, Ns, student[0].device(), at::kDouble, "attention_discrepancy_backward");
  parallel_tiles(K, B, total, nmax, [&](int64_t k, int64_t b, Scratch& w) {
    const int64_t N = fs[k].N;
    load_row(ms[k], b, N, w.a.data(), false);
    load_row(mt[k], b, N, w.b.data(), false);
    metric_backward(w.a.data(), w.b.data(), N, prm, gp[k * B + b], w.e.data(), w.c.data(), w.d.data(),
                    mask_row(mk, k, b, N, w));
    channel_grad(fs[k], fg[k], b, pm, p, w.e.data(), w.c);
  });
  std::vector<at::Tensor> grads(K);
  for (int64_t k = 0; k < K; ++k) {
    gbuf[k].finish();
    grads[k] = gbuf[k].out;
  }
  return grads;
}

at::Tensor map_discrepancy_cpu(at::TensorList student, at::TensorList teacher,
                               c10::string_view metric, double beta, double eps) {
  const MetricParams prm = parse_params(metric, "sum", beta, 1.0, eps, /*attention=*/false);
  const int64_t B = check_pair_lists(student, teacher, "map_discrepancy");
  const int64_t K = static_cast<int64_t>(student.size());
  const auto out_dt = acc_dtype(student, teacher);
  std::vector<FlatPair> fp(K);
  int64_t nmax = 1, total = 0;
  for (int64_t k = 0; k < K; ++k) {
    fp[k] = flat_pair(student[k], teacher[k]);
    nmax = std::max(nmax, fp[k].N);
    total += 2 * fp[k].N;
  }
  at::Tensor d = at::empty({K, B}, student[0].options().dtype(out_dt));
  const bool absval = prm.metric == Metric::kJsd;
  parallel_tiles(K, B, total, nmax, [&](int64_t k, int64_t b, Scratch& w) {
    const int64_t N = fp[k].N;
    load_row(fp[k].s, b, N, w.a.data(), absval);
    load_row(fp[k].t, b, N, w.b.data(), absval);
    store_value(d, k * B + b, metric_forward(w.a.data(), w.b.data(), N, prm, w.c.data(), w.d.data()));
  });
  return d;
}

std::vector<at::Tensor> map_discrepancy_backward_cpu(const at::Tensor& grad, at::TensorList student,
                                                     at::TensorList teacher, c10::string_view metric,
                                                     double beta, double eps) {
  const MetricParams prm = parse_params(metric, "sum", beta, 1.0, eps, /*attention=*/false);
  const int64_t B = check_pair_lists(student, teacher, "map_discrepancy_backward");
  const int64_t K = static_cast<int64_t>(student.size());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == K && grad.size(1) == B,
              "lwkd::map_discrepancy_backward: grad must be (", K, ", ", B, "), got ", grad.sizes());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  CpuBufferPool::instance().begin_round();
  std::vector<FlatPair> fp(K);
  std::vector<FlatGrad> gbuf(K);
  int64_t nmax = 1, total = 0;
  for (int64_t k = 0; k < K; ++k) {
    fp[k] = flat_pair(student[k], teacher[k]);
    gbuf[k] = flat_grad_buffer(student[k], fp[k], &pooled_empty_like);
    nmax = std::max(nmax, fp[k].N);
    total += 3 * fp[k].N;
  }
  const bool absval = prm.metric == Metric::kJsd;
  parallel_tiles(K, B, total, nmax, [&](int64_t k, int64_t b, Scratch& w) {
    const int64_t N = fp[k].N;
    load_row(fp[k].s, b, N, w.a.data(), absval);
    load_row(fp[k].t, b, N, w.b.data(), absval);
    metric_backward(w.a.data(), w.b.data(), N, prm, gp[k * B + b], w.e.data(), w.c.data(), w.d.data());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fp[k].s.scalar_type(), "lwkd_map_grad", [&] {
      const scalar_t* u = fp[k].s.const_data_ptr<scalar_t>() + b * N;
      scalar_t* o = gbuf[k].work.mutable_data_ptr<scalar_t>() + b * N;
      if (absval)
        for (int64_t i = 0; i < N; ++i) o[i] = scalar_t(w.e[i] * lwkd_sign(acc_t(u[i])));
      else
        for (int64_t i = 0; i < N; ++i) o[i] = scalar_t(w.e[i]);
    });
  });
  std::vector<at::Tensor> grads(K);
  for (int64_t k = 0; k < K; ++k) {
    gbuf[k].finish();
    grads[k] = gbuf[k].out;
  }
  return grads;
}

int64_t cpu_buffer_pool(bool release) { return CpuBufferPool::instance().report(release); }

}  // namespace

TORCH_LIBRARY_IMPL(lwkd, CompositeExplicitAutograd, m) {
  m.impl("cpu_buffer_pool", &cpu_buffer_pool);
}

TORCH_LIBRARY_IMPL(lwkd, CPU, m) {
  m.impl("attention_discrepancy", &attention_discrepancy_cpu);
  m.impl("attention_discrepancy_backward", &attention_discrepancy_backward_cpu);
  m.impl("map_discrepancy", &map_discrepancy_cpu);
  m.impl("map_discrepancy_backward", &map_discrepancy_backward_cpu);
}

}  // namespace lwkd
