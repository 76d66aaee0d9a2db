// CUDA kernels of the discrepancy ops (SPEC sections 1-2), registered for the CUDA dispatch key.
//
// Launch structure: every phase is ONE launch for all layers of the call (up to kMaxLayers = 32
// layers per launch; longer lists are processed 32 layers at a time).  The work list travels in
// the kernel arguments (a `__grid_constant__` LayerTable of per-layer pointers, strides, sizes and
// the index of each layer's first tile, cuda/work_table.cuh), so a launch needs no host-to-device
// copy and no host synchronisation.  A block finds its layer by binary search over the first-tile
// column.  The host picks the accumulation type once per launch batch (dispatch_acc) and runs
// one templated host function per kernel family (launch_attn_forward, ..., launch_map_backward).
//
//   attention forward   attn_maps_kernel      tile = (layer, sample, <= 1024 positions): channel
//                                             reduction a[i] = mean_c |x[c, i]|^p of student and
//                                             teacher -> maps (B, N)
//                       attn_rows_fwd_kernel  block = (layer, sample): normalisers and metric
//                                             terms over the maps -> d[k, b]
//   attention backward  attn_rows_bwd_kernel  block = (layer, sample): normalisers and the
//                                             projection term of the normaliser's Jacobian
//                       attn_grad_kernel      tile: map gradient for the tile's positions, then
//                                             d|x|^p/dx over all channels -> student gradient
//   map op forward      map_stats_kernel -> map_terms_kernel -> map_rows_kernel
//   map op backward     map_stats_kernel -> map_proj_kernel  -> map_grad_kernel
//                       (tiles of <= 1/64 of a sample, at least 8192 elements; the row statistics
//                       and projections are second passes over the per-tile partials)
//
// Memory access: each tensor's layout is classified on the host -- positions contiguous (NCHW),
// channels contiguous (channels_last, (B, N, D) tokens) or general strides -- and the kernels
// walk the contiguous axis with 8-element accesses that become 16-byte vector loads/stores when
// the base pointer and strides allow (checked on the host).  NCHW tiles with few positions
// (7x7 maps) split the channels across thread groups and reduce the groups in shared memory;
// channels_last tiles give each position a group of up to 32 lanes reduced with shuffles.
//
// Determinism: no atomics; every reduction has a fixed order (per-thread sequential, fixed
// shuffle pattern, warps in index order, tiles in index order).
//
// Precision: float32 accumulation for float16/bfloat16/float32 inputs, float64 when any input of
// the call is float64 (SPEC section 2).  All arithmetic of the metrics and of their gradients is
// taken from csrc/common/lwkd_common.h, the header the CPU kernels use.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/host_prep.h"
#include "common/lwkd_common.h"
#include "cuda/device_utils.cuh"
#include "cuda/work_table.cuh"

namespace lwkd {
namespace cuda {
namespace {

constexpr int kMaxChunk = 1024;     // positions per attention tile
constexpr int64_t kTileElems = 32768;  // target elements (positions x channels) per attention tile
constexpr int kRowScal = 8;         // per-(layer, sample) scalars of the attention backward
constexpr int64_t kFlatChunkMin = 8192;
constexpr int64_t kMaxFlatChunks = 64;

// ---------------------------------------------------------------------------------------------
// Work tables
// ---------------------------------------------------------------------------------------------
struct Feat {         // one (B, C, N) strided view
  const void* ptr;
  int64_t sb, sc, sn;
  int64_t C;
  int32_t dtype, layout, vec, pad_;
};

struct AttnLayer {
  Feat x;             // student features
  Feat y;             // teacher features (forward) / gradient buffer (backward, writable)
  void* maps_s;       // (B, N) maps in the accumulation dtype
  void* maps_t;
  const void* mask;   // (B, N) 0/1 mask of valid locations in the accumulation dtype, or null
  int64_t N;
  int64_t chunk;      // positions per tile: multiple of kVec, <= kMaxChunk
  int64_t nchunks;    // tiles per sample
  int64_t k;          // layer index in the call
};

using AttnParams = LayerTable<AttnLayer>;

struct MapLayer {     // flat per-sample vectors: element (b, i) at ptr + b * N + i
  const void* s;
  const void* t;
  void* g;
  int64_t N, chunk, nchunks, k;
  int32_t ds, dt, vs, vt, vg, pad_;
};

using MapParams = LayerTable<MapLayer>;

static_assert(sizeof(AttnParams) < 32000, "kernel parameter space is 32 KB (sm_70+, CUDA >= 12.1)");
static_assert(sizeof(MapParams) < 32000, "kernel parameter space is 32 KB");

struct AttnTile {
  int l;
  int64_t b, i0;
  int cnt;
};

__device__ __forceinline__ AttnTile attn_tile(const AttnParams& P) {
  const int64_t t = blockIdx.x;
  AttnTile r;
  r.l = find_layer(P, t);
  const AttnLayer& L = P.layer[r.l];
  const int64_t local = t - P.tile_start[r.l];
  r.b = local / L.nchunks;
  r.i0 = (local - r.b * L.nchunks) * L.chunk;
  r.cnt = static_cast<int>(L.chunk < L.N - r.i0 ? L.chunk : L.N - r.i0);
  return r;
}

template <typename T>
__device__ __forceinline__ T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// ---------------------------------------------------------------------------------------------
// Attention forward: channel reduction of one tile of one feature tensor
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, PowMode M>
__device__ void chan_mean_tile(const Feat& f, int64_t b, int64_t i0, int cnt, acc_t p,
                               acc_t* __restrict__ out, acc_t* __restrict__ scratch) {
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(f.ptr) + b * f.sb;
  const int64_t C = f.C;
  const acc_t inv_c = acc_t(1) / acc_t(C);
  const int tid = threadIdx.x;
  const bool vec = f.vec != 0;
  if (f.layout == kPosContig) {
    // PT position-threads x CG channel groups; each thread owns kVec consecutive positions
    x += i0;
    const int nvec = (cnt + kVec - 1) / kVec;
    int PT = 32;
    while (PT < nvec && PT < kThreads) PT <<= 1;
    const int CG = kThreads / PT;
    const int g = tid / PT, j = tid % PT;
    for (int base = 0; base < cnt; base += PT * kVec) {
      const int i = base + j * kVec;
      const int valid = cnt - i < kVec ? cnt - i : kVec;
      acc_t acc[kVec];
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc[q] = acc_t(0);
      if (valid > 0) {
        for (int64_t c = g; c < C; c += CG) {
          acc_t v[kVec];
          load8(x + c * f.sc + i, vec, valid, v);
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc[q] += abs_pow<M>(v[q], p);
        }
      }
      if (CG == 1) {
#pragma unroll
        for (int q = 0; q < kVec; ++q)
          if (q < valid) out[i + q] = acc[q] * inv_c;
      } else {  // channel groups reduced in shared memory, in group order
#pragma unroll
        for (int q = 0; q < kVec; ++q) scratch[g * PT * kVec + j * kVec + q] = acc[q];
        __syncthreads();
        for (int e = tid; e < PT * kVec; e += kThreads) {
          if (base + e < cnt) {
            acc_t s = acc_t(0);
            for (int gg = 0; gg < CG; ++gg) s += scratch[gg * PT * kVec + e];
            out[base + e] = s * inv_c;
          }
        }
        __syncthreads();
      }
    }
  } else if (f.layout == kChanContig) {
    // G lanes per position (power of two <= 32), kVec consecutive channels per access
    const int64_t nvec = (C + kVec - 1) / kVec;
    int G = 1;
    while (G < nvec && G < 32) G <<= 1;
    const int slots = kThreads / G;
    const int slot = tid / G, lane = tid % G;
    for (int ib = 0; ib < cnt; ib += slots) {  // uniform trip count: the shuffles need every lane
      const int i = ib + slot;
      acc_t acc = acc_t(0);
      if (i < cnt) {
        const scalar_t* __restrict__ r = x + (i0 + i) * f.sn;
        for (int64_t c = lane * kVec; c < C; c += G * kVec) {
          acc_t v[kVec];
          load8(r + c, vec, C - c < kVec ? static_cast<int>(C - c) : kVec, v);
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc += abs_pow<M>(v[q], p);
        }
      }
      for (int off = G >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0 && i < cnt) out[i] = acc * inv_c;
    }
  } else {
    for (int i = tid; i < cnt; i += kThreads) {
      acc_t acc = acc_t(0);
      for (int64_t c = 0; c < C; ++c) acc += abs_pow<M>(to_acc<acc_t>(x[c * f.sc + (i0 + i) * f.sn]), p);
      out[i] = acc * inv_c;
    }
  }
}

template <typename acc_t, PowMode M>
__global__ void __launch_bounds__(kThreads) attn_maps_kernel(const __grid_constant__ AttnParams P, acc_t p) {
  __shared__ acc_t scratch[kThreads * kVec];
  const AttnTile tl = attn_tile(P);
  const AttnLayer& L = P.layer[tl.l];
  acc_t* ms = static_cast<acc_t*>(L.maps_s) + tl.b * L.N + tl.i0;
  acc_t* mt = static_cast<acc_t*>(L.maps_t) + tl.b * L.N + tl.i0;
  acc_t* sc = scratch;
  dispatch_dtype(L.x.dtype, [&](auto tag) {
    chan_mean_tile<decltype(tag), acc_t, M>(L.x, tl.b, tl.i0, tl.cnt, p, ms, sc);
  });
  __syncthreads();
  dispatch_dtype(L.y.dtype, [&](auto tag) {
    chan_mean_tile<decltype(tag), acc_t, M>(L.y, tl.b, tl.i0, tl.cnt, p, mt, sc);
  });
}

// ---------------------------------------------------------------------------------------------
// Per-(layer, sample) statistics of two maps (one block per row)
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowStats {
  acc_t inv_s, inv_t;  // 1/max(norm or sum, eps), or 1/Z for softmax
  acc_t r_s, r_t;      // norm / sum / Z
  acc_t mx_s, mx_t;    // softmax only: row maxima
};

// 1 at a valid location of the sample's mask row `m` (every location without a mask), else 0
template <typename acc_t>
__device__ __forceinline__ acc_t valid(const acc_t* __restrict__ m, int64_t i) {
  return m == nullptr ? acc_t(1) : m[i];
}

// The sample's mask row, or null (uniform over the block).
template <typename acc_t>
__device__ __forceinline__ const acc_t* mask_row(const AttnLayer& L, int64_t b) {
  return L.mask == nullptr ? nullptr : static_cast<const acc_t*>(L.mask) + b * L.N;
}

// The scale of "at": 1/N_valid (0 without a valid location: d = 0); 1 for the other metrics.
template <typename acc_t>
__device__ acc_t at_scale(const MetricParams& mp, const acc_t* m, int64_t N, acc_t* red) {
  if (mp.metric != Metric::kAt) return acc_t(1);
  acc_t n = acc_t(N);
  if (m != nullptr) {
    acc_t c = 0;
    for (int64_t i = threadIdx.x; i < N; i += kThreads) c += m[i];
    n = block_sum(c, red);
  }
  return n > acc_t(0) ? acc_t(1) / n : acc_t(0);
}

// Sums over the valid locations only (SPEC section 2, "Masked locations"; m null: all valid).
template <typename acc_t>
__device__ RowStats<acc_t> row_stats(const acc_t* __restrict__ as, const acc_t* __restrict__ at,
                                     int64_t N, const MetricParams& mp, acc_t* red, const acc_t* m) {
  RowStats<acc_t> st;
  const int tid = threadIdx.x;
  if (mp.metric == Metric::kJsd && mp.normalize == Normalize::kSoftmax) {
    const acc_t inv_tau = acc_t(1) / acc_t(mp.tau);
    acc_t ms = neg_inf<acc_t>(), mt = neg_inf<acc_t>();
    for (int64_t i = tid; i < N; i += kThreads) {
      if (valid(m, i) == acc_t(0)) continue;
      ms = lwkd_max(ms, as[i]);
      mt = lwkd_max(mt, at[i]);
    }
    st.mx_s = block_max(ms, red);
    st.mx_t = block_max(mt, red);
    acc_t zs = 0, zt = 0;
    for (int64_t i = tid; i < N; i += kThreads) {
      if (valid(m, i) == acc_t(0)) continue;
      zs += lwkd_exp((as[i] - st.mx_s) * inv_tau);
      zt += lwkd_exp((at[i] - st.mx_t) * inv_tau);
    }
    st.r_s = block_sum(zs, red);
    st.r_t = block_sum(zt, red);
    st.inv_s = acc_t(1) / st.r_s;
    st.inv_t = acc_t(1) / st.r_t;
  } else {
    const bool l2 = mp.metric != Metric::kJsd;
    acc_t ss = 0, tt = 0;
    for (int64_t i = tid; i < N; i += kThreads) {
      const acc_t v = valid(m, i);
      ss += v * (l2 ? as[i] * as[i] : as[i]);
      tt += v * (l2 ? at[i] * at[i] : at[i]);
    }
    ss = block_sum(ss, red);
    tt = block_sum(tt, red);
    st.r_s = l2 ? lwkd_sqrt(ss) : ss;
    st.r_t = l2 ? lwkd_sqrt(tt) : tt;
    const acc_t eps = acc_t(mp.eps);
    st.inv_s = acc_t(1) / clamp_eps(st.r_s, eps);
    st.inv_t = acc_t(1) / clamp_eps(st.r_t, eps);
    st.mx_s = st.mx_t = acc_t(0);
  }
  return st;
}

// P = a / max(S, eps) (sum) or exp((a - max) / tau) / Z (softmax), as the CPU's to_distribution;
// 0 at a masked location (v = 0)
template <typename acc_t>
__device__ __forceinline__ acc_t distribution(acc_t a, acc_t inv, acc_t mx, acc_t inv_tau, bool softmax, acc_t v) {
  if (v == acc_t(0)) return acc_t(0);
  return softmax ? lwkd_exp((a - mx) * inv_tau) * inv : a * inv;
}

// The (layer, sample) row of this block, shared by the forward and backward row kernels: the
// layer, the sample, its student / teacher map rows and mask row, their statistics, and the
// metric's constants.
template <typename acc_t>
struct AttnRow {
  const AttnLayer& L;
  int64_t b;
  const acc_t* as;
  const acc_t* at;
  const acc_t* m;
  RowStats<acc_t> st;
  bool jsd, softmax;
  acc_t inv_tau, beta;
};

template <typename acc_t>
__device__ __forceinline__ AttnRow<acc_t> attn_row(const AttnParams& P, const MetricParams& mp, acc_t* red) {
  const int64_t row = blockIdx.x;
  const int l = static_cast<int>(row / P.B);
  const int64_t b = row - l * P.B;
  const AttnLayer& L = P.layer[l];
  const acc_t* as = static_cast<const acc_t*>(L.maps_s) + b * L.N;
  const acc_t* at = static_cast<const acc_t*>(L.maps_t) + b * L.N;
  const acc_t* m = mask_row<acc_t>(L, b);
  const bool jsd = mp.metric == Metric::kJsd;
  return AttnRow<acc_t>{L, b, as, at, m, row_stats(as, at, L.N, mp, red, m), jsd,
                        jsd && mp.normalize == Normalize::kSoftmax, acc_t(1) / acc_t(mp.tau), acc_t(mp.beta)};
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) attn_rows_fwd_kernel(const __grid_constant__ AttnParams P,
                                                                 MetricParams mp, acc_t* __restrict__ d) {
  __shared__ acc_t red[kWarps];
  const AttnRow<acc_t> r = attn_row(P, mp, red);
  const RowStats<acc_t>& st = r.st;
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < r.L.N; i += kThreads) {
    const acc_t v = valid(r.m, i);
    if (r.jsd) {
      acc += jsd_term(distribution(r.as[i], st.inv_s, st.mx_s, r.inv_tau, r.softmax, v),
                      distribution(r.at[i], st.inv_t, st.mx_t, r.inv_tau, r.softmax, v), r.beta);
    } else {
      acc += v * sqdist_term(r.as[i], r.at[i], st.inv_s, st.inv_t);
    }
  }
  acc = block_sum(acc, red);
  const acc_t scale = at_scale(mp, r.m, r.L.N, red);
  if (threadIdx.x == 0) d[r.L.k * P.B + r.b] = unless_overflow(acc * scale, st.r_s, st.r_t);
}

// ---------------------------------------------------------------------------------------------
// Attention backward
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) attn_rows_bwd_kernel(const __grid_constant__ AttnParams P,
                                                                 MetricParams mp,
                                                                 const acc_t* __restrict__ grad,
                                                                 acc_t* __restrict__ rowscal) {
  __shared__ acc_t red[kWarps];
  const AttnRow<acc_t> r = attn_row(P, mp, red);
  const RowStats<acc_t>& st = r.st;
  const acc_t gd = grad[r.L.k * P.B + r.b];
  const acc_t two_scale_gd = acc_t(2) * at_scale(mp, r.m, r.L.N, red) * gd;
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < r.L.N; i += kThreads) {
    const acc_t v = valid(r.m, i);
    if (r.jsd) {
      const acc_t ps = distribution(r.as[i], st.inv_s, st.mx_s, r.inv_tau, r.softmax, v);
      const acc_t pt = distribution(r.at[i], st.inv_t, st.mx_t, r.inv_tau, r.softmax, v);
      acc += gd * jsd_grad_ps(ps, pt, r.beta) * ps;
    } else {
      acc += v * r.as[i] * st.inv_s * sqdist_grad_q(r.as[i], r.at[i], st.inv_s, st.inv_t, two_scale_gd);
    }
  }
  acc_t proj = block_sum(acc, red);
  if (!r.softmax && !passes_clamp(st.r_s, acc_t(mp.eps))) proj = acc_t(0);
  if (threadIdx.x == 0) {
    acc_t* o = rowscal + (r.L.k * P.B + r.b) * kRowScal;
    o[0] = st.inv_s;
    o[1] = st.inv_t;
    o[2] = proj;
    o[3] = st.mx_s;
    o[4] = st.mx_t;
    o[5] = gd;
    o[6] = two_scale_gd;
  }
}

// g[c, i] = h[i] * d|x|^p/dx (x, g: one sample's (C, N) views; h carries the 1/C of the mean)
template <typename scalar_t, typename op_t, typename acc_t, PowMode M>
__device__ void grad_tile(const Feat& fx, const Feat& fg, int64_t b, int64_t i0, int cnt,
                          const acc_t* __restrict__ h, op_t p) {
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(fx.ptr) + b * fx.sb;
  scalar_t* __restrict__ g = static_cast<scalar_t*>(const_cast<void*>(fg.ptr)) + b * fg.sb;
  const int64_t C = fx.C;
  const int tid = threadIdx.x;
  const bool vec = fx.vec != 0 && fg.vec != 0;
  if (fx.layout == kPosContig && fg.layout == kPosContig) {
    x += i0;
    g += i0;
    const int nvec = (cnt + kVec - 1) / kVec;
    int PT = 32;
    while (PT < nvec && PT < kThreads) PT <<= 1;
    const int CG = kThreads / PT;
    const int gr = tid / PT, j = tid % PT;
    for (int i = j * kVec; i < cnt; i += PT * kVec) {
      const int valid = cnt - i < kVec ? cnt - i : kVec;
      op_t hv[kVec];
#pragma unroll
      for (int q = 0; q < kVec; ++q) hv[q] = q < valid ? op_t(h[i + q]) : op_t(0);
      for (int64_t c = gr; c < C; c += CG) {
        op_t v[kVec];
        load8(x + c * fx.sc + i, vec, valid, v);
#pragma unroll
        for (int q = 0; q < kVec; ++q) v[q] = hv[q] * abs_pow_grad<M>(v[q], p);
        store8(g + c * fg.sc + i, vec, valid, v);
      }
    }
  } else if (fx.layout == kChanContig && fg.layout == kChanContig) {
    const int64_t nvec = (C + kVec - 1) / kVec;
    int G = 1;
    while (G < nvec && G < 32) G <<= 1;
    const int slots = kThreads / G;
    const int slot = tid / G, lane = tid % G;
    for (int i = slot; i < cnt; i += slots) {
      const scalar_t* __restrict__ xr = x + (i0 + i) * fx.sn;
      scalar_t* __restrict__ gr = g + (i0 + i) * fg.sn;
      const op_t hi = op_t(h[i]);
      for (int64_t c = lane * kVec; c < C; c += G * kVec) {
        const int valid = C - c < kVec ? static_cast<int>(C - c) : kVec;
        op_t v[kVec];
        load8(xr + c, vec, valid, v);
#pragma unroll
        for (int q = 0; q < kVec; ++q) v[q] = hi * abs_pow_grad<M>(v[q], p);
        store8(gr + c, vec, valid, v);
      }
    }
  } else {
    const int64_t total = C * cnt;
    for (int64_t e = tid; e < total; e += kThreads) {
      const int64_t c = e / cnt;
      const int64_t i = e - c * cnt;
      const op_t v = to_acc<op_t>(x[c * fx.sc + (i0 + i) * fx.sn]);
      g[c * fg.sc + (i0 + i) * fg.sn] = from_acc<scalar_t>(op_t(h[i]) * abs_pow_grad<M>(v, p));
    }
  }
}

template <typename acc_t, PowMode M>
__global__ void __launch_bounds__(kThreads) attn_grad_kernel(const __grid_constant__ AttnParams P, MetricParams mp,
                                                             const acc_t* __restrict__ rowscal, double p) {
  __shared__ acc_t h[kMaxChunk];
  const AttnTile tl = attn_tile(P);
  const AttnLayer& L = P.layer[tl.l];
  const acc_t* rs = rowscal + (L.k * P.B + tl.b) * kRowScal;
  const acc_t inv_s = rs[0], inv_t = rs[1], proj = rs[2], mx_s = rs[3], mx_t = rs[4], gd = rs[5],
              two_scale_gd = rs[6];
  const acc_t* as = static_cast<const acc_t*>(L.maps_s) + tl.b * L.N + tl.i0;
  const acc_t* at = static_cast<const acc_t*>(L.maps_t) + tl.b * L.N + tl.i0;
  const acc_t* mrow = mask_row<acc_t>(L, tl.b);
  const acc_t* m = mrow == nullptr ? nullptr : mrow + tl.i0;
  const bool jsd = mp.metric == Metric::kJsd;
  const bool softmax = jsd && mp.normalize == Normalize::kSoftmax;
  const acc_t inv_tau = acc_t(1) / acc_t(mp.tau), beta = acc_t(mp.beta);
  const acc_t inv_c = acc_t(1) / acc_t(L.x.C);
  for (int i = threadIdx.x; i < tl.cnt; i += kThreads) {
    const acc_t v = valid(m, i);
    acc_t ga;
    if (jsd) {
      const acc_t ps = distribution(as[i], inv_s, mx_s, inv_tau, softmax, v);
      const acc_t pt = distribution(at[i], inv_t, mx_t, inv_tau, softmax, v);
      const acc_t gp = gd * jsd_grad_ps(ps, pt, beta);
      ga = softmax ? softmax_grad_a(gp, ps, proj, inv_tau) : sumnorm_grad_a(gp, inv_s, proj);
    } else {
      ga = sqdist_grad_a(sqdist_grad_q(as[i], at[i], inv_s, inv_t, two_scale_gd), as[i], inv_s, proj);
    }
    h[i] = v * ga * inv_c;
  }
  __syncthreads();
  const acc_t* hp = h;
  dispatch_dtype(L.x.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using op_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
    grad_tile<scalar_t, op_t, acc_t, M>(L.x, L.y, tl.b, tl.i0, tl.cnt, hp, op_t(p));
  });
}

// ---------------------------------------------------------------------------------------------
// Map op (flat per-sample vectors)
// ---------------------------------------------------------------------------------------------
struct FlatTile {
  int l;
  int64_t b, i_begin, i_end, first;  // first: tile index of the sample's chunk 0
};

__device__ __forceinline__ FlatTile flat_tile(const MapParams& P) {
  const int64_t t = blockIdx.x;
  FlatTile r;
  r.l = find_layer(P, t);
  const MapLayer& L = P.layer[r.l];
  const int64_t local = t - P.tile_start[r.l];
  r.b = local / L.nchunks;
  const int64_t ci = local - r.b * L.nchunks;
  r.i_begin = ci * L.chunk;
  r.i_end = r.i_begin + L.chunk < L.N ? r.i_begin + L.chunk : L.N;
  r.first = t - ci;
  return r;
}

// sum of the per-tile partials part[(first + c) * stride + col], c < n, in tile order
template <typename acc_t>
__device__ __forceinline__ acc_t combine(const acc_t* __restrict__ part, int64_t first, int64_t n, int stride,
                                         int col, acc_t* red) {
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < n; c += kThreads) s += part[(first + c) * stride + col];
  return block_sum(s, red);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) map_stats_kernel(const __grid_constant__ MapParams P, int32_t metric,
                                                             acc_t* __restrict__ part) {
  __shared__ acc_t red[kWarps];
  const FlatTile ft = flat_tile(P);
  const MapLayer& L = P.layer[ft.l];
  const bool jsd = metric == static_cast<int32_t>(Metric::kJsd);
  const int64_t off = ft.b * L.N;
  acc_t su = 0, sw = 0;
  for (int64_t i = ft.i_begin + threadIdx.x * kVec; i < ft.i_end; i += kThreads * kVec) {
    const int valid = ft.i_end - i < kVec ? static_cast<int>(ft.i_end - i) : kVec;
    acc_t u[kVec], w[kVec];
    load8_any(L.s, L.ds, off + i, L.vs != 0, valid, u);
    load8_any(L.t, L.dt, off + i, L.vt != 0, valid, w);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      su += jsd ? lwkd_abs(u[q]) : u[q] * u[q];
      sw += jsd ? lwkd_abs(w[q]) : w[q] * w[q];
    }
  }
  su = block_sum(su, red);
  sw = block_sum(sw, red);
  if (threadIdx.x == 0) {
    part[blockIdx.x * 2] = su;
    part[blockIdx.x * 2 + 1] = sw;
  }
}

template <typename acc_t>
struct MapNorm {
  acc_t r_u, r_w, inv_u, inv_w;
};

template <typename acc_t>
__device__ __forceinline__ MapNorm<acc_t> map_norm(const acc_t* part, const FlatTile& ft, int64_t nchunks,
                                                   bool jsd, acc_t eps, acc_t* red) {
  acc_t ru = combine(part, ft.first, nchunks, 2, 0, red);
  acc_t rw = combine(part, ft.first, nchunks, 2, 1, red);
  if (!jsd) {
    ru = lwkd_sqrt(ru);
    rw = lwkd_sqrt(rw);
  }
  return {ru, rw, acc_t(1) / clamp_eps(ru, eps), acc_t(1) / clamp_eps(rw, eps)};
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) map_terms_kernel(const __grid_constant__ MapParams P, MetricParams mp,
                                                             const acc_t* __restrict__ part,
                                                             acc_t* __restrict__ part2) {
  __shared__ acc_t red[kWarps];
  const FlatTile ft = flat_tile(P);
  const MapLayer& L = P.layer[ft.l];
  const bool jsd = mp.metric == Metric::kJsd;
  const MapNorm<acc_t> nm = map_norm(part, ft, L.nchunks, jsd, acc_t(mp.eps), red);
  const acc_t beta = acc_t(mp.beta);
  const int64_t off = ft.b * L.N;
  acc_t acc = 0;
  for (int64_t i = ft.i_begin + threadIdx.x * kVec; i < ft.i_end; i += kThreads * kVec) {
    const int valid = ft.i_end - i < kVec ? static_cast<int>(ft.i_end - i) : kVec;
    acc_t u[kVec], w[kVec];
    load8_any(L.s, L.ds, off + i, L.vs != 0, valid, u);
    load8_any(L.t, L.dt, off + i, L.vt != 0, valid, w);
#pragma unroll
    for (int q = 0; q < kVec; ++q)
      acc += jsd ? jsd_term(lwkd_abs(u[q]) * nm.inv_u, lwkd_abs(w[q]) * nm.inv_w, beta)
                 : sqdist_term(u[q], w[q], nm.inv_u, nm.inv_w);
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) part2[blockIdx.x] = unless_overflow(acc, nm.r_u, nm.r_w);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) map_rows_kernel(const __grid_constant__ MapParams P,
                                                            const acc_t* __restrict__ part2, acc_t* __restrict__ d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= P.num_layers * P.B) return;
  const int l = static_cast<int>(row / P.B);
  const int64_t b = row - l * P.B;
  const MapLayer& L = P.layer[l];
  const int64_t first = P.tile_start[l] + b * L.nchunks;
  acc_t s = 0;
  for (int64_t c = 0; c < L.nchunks; ++c) s += part2[first + c];
  d[L.k * P.B + b] = s;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) map_proj_kernel(const __grid_constant__ MapParams P, MetricParams mp,
                                                            const acc_t* __restrict__ part,
                                                            const acc_t* __restrict__ grad,
                                                            acc_t* __restrict__ part2) {
  __shared__ acc_t red[kWarps];
  const FlatTile ft = flat_tile(P);
  const MapLayer& L = P.layer[ft.l];
  const bool jsd = mp.metric == Metric::kJsd;
  const MapNorm<acc_t> nm = map_norm(part, ft, L.nchunks, jsd, acc_t(mp.eps), red);
  const acc_t beta = acc_t(mp.beta), gd = grad[L.k * P.B + ft.b], two_gd = acc_t(2) * gd;
  const int64_t off = ft.b * L.N;
  acc_t acc = 0;
  for (int64_t i = ft.i_begin + threadIdx.x * kVec; i < ft.i_end; i += kThreads * kVec) {
    const int valid = ft.i_end - i < kVec ? static_cast<int>(ft.i_end - i) : kVec;
    acc_t u[kVec], w[kVec];
    load8_any(L.s, L.ds, off + i, L.vs != 0, valid, u);
    load8_any(L.t, L.dt, off + i, L.vt != 0, valid, w);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      if (jsd) {
        const acc_t pu = lwkd_abs(u[q]) * nm.inv_u;
        acc += gd * jsd_grad_ps(pu, lwkd_abs(w[q]) * nm.inv_w, beta) * pu;
      } else {
        acc += u[q] * nm.inv_u * sqdist_grad_q(u[q], w[q], nm.inv_u, nm.inv_w, two_gd);
      }
    }
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) part2[blockIdx.x] = acc;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) map_grad_kernel(const __grid_constant__ MapParams P, MetricParams mp,
                                                            const acc_t* __restrict__ part,
                                                            const acc_t* __restrict__ grad,
                                                            const acc_t* __restrict__ part2) {
  __shared__ acc_t red[kWarps];
  const FlatTile ft = flat_tile(P);
  const MapLayer& L = P.layer[ft.l];
  const bool jsd = mp.metric == Metric::kJsd;
  const acc_t eps = acc_t(mp.eps);
  const MapNorm<acc_t> nm = map_norm(part, ft, L.nchunks, jsd, eps, red);
  acc_t proj = combine(part2, ft.first, L.nchunks, 1, 0, red);
  if (!passes_clamp(nm.r_u, eps)) proj = acc_t(0);
  const acc_t beta = acc_t(mp.beta), gd = grad[L.k * P.B + ft.b], two_gd = acc_t(2) * gd;
  const int64_t off = ft.b * L.N;
  for (int64_t i = ft.i_begin + threadIdx.x * kVec; i < ft.i_end; i += kThreads * kVec) {
    const int valid = ft.i_end - i < kVec ? static_cast<int>(ft.i_end - i) : kVec;
    acc_t u[kVec], w[kVec], g[kVec];
    load8_any(L.s, L.ds, off + i, L.vs != 0, valid, u);
    load8_any(L.t, L.dt, off + i, L.vt != 0, valid, w);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      if (jsd) {
        const acc_t gp = gd * jsd_grad_ps(lwkd_abs(u[q]) * nm.inv_u, lwkd_abs(w[q]) * nm.inv_w, beta);
        g[q] = sumnorm_grad_a(gp, nm.inv_u, proj) * lwkd_sign(u[q]);
      } else {
        g[q] = sqdist_grad_a(sqdist_grad_q(u[q], w[q], nm.inv_u, nm.inv_w, two_gd), u[q], nm.inv_u, proj);
      }
    }
    store8_any(L.g, L.ds, off + i, L.vg != 0, valid, g);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
int32_t dtype_code(at::ScalarType st, const char* op) {
  switch (st) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "lwkd::", op, ": unsupported dtype ", st, " (float16, bfloat16, float32, float64)");
  }
  return kF32;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Layout class and vector eligibility of a (B, C, N) view (same classification as the Triton
// backend: strides of size-1 dimensions are irrelevant and normalised).
Feat make_feat(const at::Tensor& x3, const char* op) {
  Feat f{};
  f.ptr = x3.data_ptr();
  const int64_t B = x3.size(0), C = x3.size(1), N = x3.size(2);
  f.sb = x3.stride(0);
  f.sc = x3.stride(1);
  f.sn = x3.stride(2);
  if (C == 1) f.sc = 1;
  f.C = C;
  f.dtype = dtype_code(x3.scalar_type(), op);
  if (N == 1) {  // one position: only the channel stride matters
    f.sn = 1;
    f.layout = f.sc == 1 ? kChanContig : kPosContig;
  } else {
    f.layout = f.sn == 1 ? kPosContig : (f.sc == 1 ? kChanContig : kGeneral);
  }
  const int64_t unit = 16 / static_cast<int64_t>(x3.element_size());
  const bool base_ok = aligned16(f.ptr) && (B == 1 || f.sb % unit == 0);
  f.vec = base_ok && ((f.layout == kPosContig && (C == 1 || f.sc % unit == 0)) ||
                      (f.layout == kChanContig && (N == 1 || f.sn % unit == 0)));
  return f;
}

int64_t attn_chunk(int64_t N, int64_t channels) {
  const int64_t want = round_up(std::max<int64_t>(1, kTileElems / std::max<int64_t>(1, channels)), 64);
  const int64_t chunk = std::min<int64_t>(std::max<int64_t>(64, want), kMaxChunk);
  return std::min(chunk, round_up(N, kVec));
}

// Grid size of a launch (one block per tile or row).
unsigned grid_of(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks < (int64_t(1) << 31), "lwkd: launch of ", blocks, " blocks is out of range");
  return static_cast<unsigned>(blocks);
}

void check_cuda_inputs(at::TensorList xs, const char* op) {
  for (const auto& x : xs)
    TORCH_CHECK(x.is_cuda(), "lwkd::", op, ": expected CUDA tensors, got one on ", x.device());
}

#define LWKD_CUDA_POW(pm, ...)                                                        \
  switch (pm) {                                                                       \
    case PowMode::kTwo: { constexpr PowMode kM = PowMode::kTwo; __VA_ARGS__; break; } \
    case PowMode::kOne: { constexpr PowMode kM = PowMode::kOne; __VA_ARGS__; break; } \
    default: { constexpr PowMode kM = PowMode::kGeneral; __VA_ARGS__; break; }        \
  }

// Fills an AttnParams table with layers [k0, k1) and returns the number of tiles.
int64_t fill_attn(AttnParams& P, int64_t B, int64_t k0, int64_t k1, const std::vector<Feat>& fx,
                  const std::vector<Feat>& fy, const std::vector<at::Tensor>& ms,
                  const std::vector<at::Tensor>& mt, const std::vector<at::Tensor>& masks,
                  const std::vector<int64_t>& Ns, bool teacher_channels) {
  return fill_layer_table(P, B, k0, k1, [&](AttnLayer& L, int64_t k) {
    L.x = fx[k];
    L.y = fy[k];
    L.maps_s = ms[k].data_ptr();
    L.maps_t = mt[k].data_ptr();
    L.mask = masks[k].defined() ? masks[k].const_data_ptr() : nullptr;
    L.N = Ns[k];
    L.chunk = attn_chunk(Ns[k], fx[k].C + (teacher_channels ? fy[k].C : 0));
    L.nchunks = cdiv(Ns[k], L.chunk);
    L.k = k;
    return L.nchunks;
  });
}

// ---------------------------------------------------------------------------------------------
// Launches, templated on the accumulation type (float32, or float64 when an input is float64)
// ---------------------------------------------------------------------------------------------
// Runs f(acc_t tag) with acc_t = double for a float64 accumulation dtype, float otherwise.
template <typename F>
void dispatch_acc(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) f(double());
  else f(float());
}

// attn_maps_kernel -> attn_rows_fwd_kernel: maps and d (K, B) of one launch batch
template <typename acc_t>
void launch_attn_forward(const AttnParams& P, int64_t tiles, const MetricParams& prm, double p, PowMode pm,
                         at::Tensor& d, cudaStream_t stream) {
  const unsigned rows = grid_of(int64_t(P.num_layers) * P.B);
  LWKD_CUDA_POW(pm, attn_maps_kernel<acc_t, kM><<<grid_of(tiles), kThreads, 0, stream>>>(P, static_cast<acc_t>(p)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attn_rows_fwd_kernel<acc_t><<<rows, kThreads, 0, stream>>>(P, prm, d.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// attn_rows_bwd_kernel -> attn_grad_kernel: the student gradients of one launch batch
template <typename acc_t>
void launch_attn_backward(const AttnParams& P, int64_t tiles, const MetricParams& prm, double p, PowMode pm,
                          const at::Tensor& g, at::Tensor& rowscal, cudaStream_t stream) {
  const unsigned rows = grid_of(int64_t(P.num_layers) * P.B);
  attn_rows_bwd_kernel<acc_t><<<rows, kThreads, 0, stream>>>(P, prm, g.const_data_ptr<acc_t>(),
                                                              rowscal.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  LWKD_CUDA_POW(pm, attn_grad_kernel<acc_t, kM><<<grid_of(tiles), kThreads, 0, stream>>>(
                        P, prm, rowscal.const_data_ptr<acc_t>(), p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// map_stats_kernel: per-tile sums of both vectors -> part (2 per tile)
template <typename acc_t>
void launch_map_stats(const MapParams& P, int64_t tiles, int32_t mcode, at::Tensor& part, cudaStream_t stream) {
  map_stats_kernel<acc_t><<<grid_of(tiles), kThreads, 0, stream>>>(P, mcode, part.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// map_stats_kernel -> map_terms_kernel -> map_rows_kernel: d (K, B) of one launch batch
template <typename acc_t>
void launch_map_forward(const MapParams& P, int64_t tiles, const MetricParams& prm, at::Tensor& part,
                        at::Tensor& part2, at::Tensor& d, cudaStream_t stream) {
  const unsigned row_blocks = grid_of(cdiv(int64_t(P.num_layers) * P.B, kThreads));
  launch_map_stats<acc_t>(P, tiles, static_cast<int32_t>(prm.metric), part, stream);
  map_terms_kernel<acc_t><<<grid_of(tiles), kThreads, 0, stream>>>(P, prm, part.const_data_ptr<acc_t>(),
                                                                   part2.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  map_rows_kernel<acc_t><<<row_blocks, kThreads, 0, stream>>>(P, part2.const_data_ptr<acc_t>(),
                                                              d.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// map_stats_kernel -> map_proj_kernel -> map_grad_kernel: the student gradients of one launch batch
template <typename acc_t>
void launch_map_backward(const MapParams& P, int64_t tiles, const MetricParams& prm, const at::Tensor& g,
                         at::Tensor& part, at::Tensor& part2, cudaStream_t stream) {
  launch_map_stats<acc_t>(P, tiles, static_cast<int32_t>(prm.metric), part, stream);
  map_proj_kernel<acc_t><<<grid_of(tiles), kThreads, 0, stream>>>(P, prm, part.const_data_ptr<acc_t>(),
                                                                  g.const_data_ptr<acc_t>(),
                                                                  part2.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  map_grad_kernel<acc_t><<<grid_of(tiles), kThreads, 0, stream>>>(P, prm, part.const_data_ptr<acc_t>(),
                                                                  g.const_data_ptr<acc_t>(),
                                                                  part2.const_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> attention_discrepancy_cuda(
    at::TensorList student, at::TensorList teacher, double p, c10::string_view metric, double beta,
    c10::string_view normalize, double tau, double eps, int64_t channel_dim, const MaskList& masks) {
  const MetricParams prm = parse_params(metric, normalize, beta, tau, eps, /*attention=*/true);
  TORCH_CHECK(p > 0.0 && std::isfinite(p), "lwkd::attention_discrepancy: p must be positive and finite, got ", p);
  const int64_t B = check_pair_lists(student, teacher, "attention_discrepancy", channel_dim);
  check_cuda_inputs(student, "attention_discrepancy");
  check_cuda_inputs(teacher, "attention_discrepancy");
  const int64_t K = static_cast<int64_t>(student.size());
  const c10::cuda::CUDAGuard guard(student[0].device());
  const auto out_dt = acc_dtype(student, teacher);
  const auto opts = student[0].options().dtype(out_dt);

  std::vector<at::Tensor> s3(K), t3(K), maps_s(K), maps_t(K);
  std::vector<Feat> fs(K), ft(K);
  std::vector<int64_t> Ns(K);
  for (int64_t k = 0; k < K; ++k) {
    s3[k] = bcn_view(student[k], wrap_dim(channel_dim, student[k].dim()));
    t3[k] = bcn_view(teacher[k], wrap_dim(channel_dim, teacher[k].dim()));
    TORCH_CHECK(s3[k].size(2) == t3[k].size(2), "lwkd::attention_discrepancy: pair ", k, ": student has ",
                s3[k].size(2), " locations but teacher has ", t3[k].size(2));
    fs[k] = make_feat(s3[k], "attention_discrepancy");
    ft[k] = make_feat(t3[k], "attention_discrepancy");
    Ns[k] = s3[k].size(2);
    maps_s[k] = at::empty({B, Ns[k]}, opts);
    maps_t[k] = at::empty({B, Ns[k]}, opts);
  }
  at::Tensor d = at::empty({K, B}, opts);
  const std::vector<at::Tensor> mk = check_masks(masks, K, B, Ns, student[0].device(), out_dt, "attention_discrepancy");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const PowMode pm = pow_mode(p);
  for_each_layer_batch(K, [&](int64_t k0, int64_t k1) {
    AttnParams P;
    const int64_t tiles = fill_attn(P, B, k0, k1, fs, ft, maps_s, maps_t, mk, Ns, /*teacher_channels=*/true);
    dispatch_acc(out_dt, [&](auto acc) {
      launch_attn_forward<decltype(acc)>(P, tiles, prm, p, pm, d, stream);
    });
  });
  return {d, maps_s, maps_t};
}

std::vector<at::Tensor> attention_discrepancy_backward_cuda(
    const at::Tensor& grad, at::TensorList student, at::TensorList maps_s, at::TensorList maps_t,
    double p, c10::string_view metric, double beta, c10::string_view normalize, double tau,
    double eps, int64_t channel_dim, const MaskList& masks) {
  const MetricParams prm = parse_params(metric, normalize, beta, tau, eps, /*attention=*/true);
  const int64_t K = static_cast<int64_t>(student.size());
  const int64_t B = check_attention_backward(grad, student, maps_s, maps_t, channel_dim);
  if (K == 0) return {};
  check_cuda_inputs(student, "attention_discrepancy_backward");
  const c10::cuda::CUDAGuard guard(student[0].device());
  const auto acc = maps_s[0].scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "lwkd::attention_discrepancy_backward: saved maps must be float32 or float64");
  const at::Tensor g = grad.to(acc).contiguous();

  std::vector<at::Tensor> s3(K), ms(K), mt(K);
  std::vector<GradBuffer> gbuf(K);  // out: empty_like(student) layout (the fake kernel's promise)
  std::vector<Feat> fx(K), fg(K);
  std::vector<int64_t> Ns(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t cd = wrap_dim(channel_dim, student[k].dim());
    s3[k] = bcn_view(student[k], cd);
    gbuf[k] = bcn_grad_buffer(student[k], cd);
    fx[k] = make_feat(s3[k], "attention_discrepancy_backward");
    fg[k] = make_feat(gbuf[k].work, "attention_discrepancy_backward");
    Ns[k] = s3[k].size(2);
    ms[k] = maps_s[k].to(acc).contiguous();
    mt[k] = maps_t[k].to(acc).contiguous();
    TORCH_CHECK(ms[k].numel() == B * Ns[k] && mt[k].numel() == B * Ns[k],
                "lwkd::attention_discrepancy_backward: pair ", k, ": saved maps do not match the student");
  }
  at::Tensor rowscal = at::empty({K * B * kRowScal}, g.options());
  const std::vector<at::Tensor> mk =
      check_masks(masks, K, B, Ns, student[0].device(), acc, "attention_discrepancy_backward");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const PowMode pm = pow_mode(p);
  for_each_layer_batch(K, [&](int64_t k0, int64_t k1) {
    AttnParams P;
    const int64_t tiles = fill_attn(P, B, k0, k1, fx, fg, ms, mt, mk, Ns, /*teacher_channels=*/false);
    dispatch_acc(acc, [&](auto tag) {
      launch_attn_backward<decltype(tag)>(P, tiles, prm, p, pm, g, rowscal, stream);
    });
  });
  std::vector<at::Tensor> grads(K);
  for (int64_t k = 0; k < K; ++k) {
    gbuf[k].finish();  // a stream-ordered copy when the layout forced a separate work buffer
    grads[k] = gbuf[k].out;
  }
  return grads;
}

// Flat pairs of the map op: vectors allowed when the base is 16-byte aligned and every sample
// starts on a 16-byte boundary.
int32_t flat_vec(const at::Tensor& x, int64_t N) {
  const int64_t unit = 16 / static_cast<int64_t>(x.element_size());
  return aligned16(x.data_ptr()) && (x.size(0) == 1 || N % unit == 0) ? 1 : 0;
}

int64_t fill_map(MapParams& P, int64_t B, int64_t k0, int64_t k1, const std::vector<FlatPair>& fp,
                 const std::vector<at::Tensor>* grads) {
  return fill_layer_table(P, B, k0, k1, [&](MapLayer& L, int64_t k) {
    const int64_t N = fp[k].N;
    L.s = fp[k].s.data_ptr();
    L.t = fp[k].t.data_ptr();
    L.g = grads ? (*grads)[k].data_ptr() : nullptr;
    L.N = N;
    const int64_t n = std::max<int64_t>(1, std::min(kMaxFlatChunks, cdiv(N, kFlatChunkMin)));
    L.chunk = round_up(cdiv(N, n), kThreads * kVec);
    L.nchunks = cdiv(N, L.chunk);
    L.k = k;
    L.ds = dtype_code(fp[k].s.scalar_type(), "map_discrepancy");
    L.dt = dtype_code(fp[k].t.scalar_type(), "map_discrepancy");
    L.vs = flat_vec(fp[k].s, N);
    L.vt = flat_vec(fp[k].t, N);
    L.vg = grads ? flat_vec((*grads)[k], N) : 0;
    return L.nchunks;
  });
}

at::Tensor map_discrepancy_cuda(at::TensorList student, at::TensorList teacher, c10::string_view metric,
                                double beta, double eps) {
  const MetricParams prm = parse_params(metric, "sum", beta, 1.0, eps, /*attention=*/false);
  const int64_t B = check_pair_lists(student, teacher, "map_discrepancy");
  check_cuda_inputs(student, "map_discrepancy");
  check_cuda_inputs(teacher, "map_discrepancy");
  const int64_t K = static_cast<int64_t>(student.size());
  const c10::cuda::CUDAGuard guard(student[0].device());
  const auto out_dt = acc_dtype(student, teacher);
  std::vector<FlatPair> fp(K);
  for (int64_t k = 0; k < K; ++k) fp[k] = flat_pair(student[k], teacher[k]);
  const auto opts = student[0].options().dtype(out_dt);
  at::Tensor d = at::empty({K, B}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for_each_layer_batch(K, [&](int64_t k0, int64_t k1) {
    MapParams P;
    const int64_t tiles = fill_map(P, B, k0, k1, fp, nullptr);
    at::Tensor part = at::empty({2 * tiles}, opts);
    at::Tensor part2 = at::empty({tiles}, opts);
    dispatch_acc(out_dt, [&](auto acc) {
      launch_map_forward<decltype(acc)>(P, tiles, prm, part, part2, d, stream);
    });
  });
  return d;
}

std::vector<at::Tensor> map_discrepancy_backward_cuda(const at::Tensor& grad, at::TensorList student,
                                                      at::TensorList teacher, c10::string_view metric,
                                                      double beta, double eps) {
  const MetricParams prm = parse_params(metric, "sum", beta, 1.0, eps, /*attention=*/false);
  const int64_t B = check_pair_lists(student, teacher, "map_discrepancy_backward");
  check_cuda_inputs(student, "map_discrepancy_backward");
  check_cuda_inputs(teacher, "map_discrepancy_backward");
  const int64_t K = static_cast<int64_t>(student.size());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == K && grad.size(1) == B,
              "lwkd::map_discrepancy_backward: grad must be (", K, ", ", B, "), got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(student[0].device());
  const auto acc = acc_dtype(student, teacher);
  const at::Tensor g = grad.to(acc).contiguous();
  std::vector<FlatPair> fp(K);
  std::vector<FlatGrad> gbuf(K);
  std::vector<at::Tensor> work(K);  // dense, same memory order as fp[k].s
  for (int64_t k = 0; k < K; ++k) {
    fp[k] = flat_pair(student[k], teacher[k]);
    gbuf[k] = flat_grad_buffer(student[k], fp[k]);
    work[k] = gbuf[k].work;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for_each_layer_batch(K, [&](int64_t k0, int64_t k1) {
    MapParams P;
    const int64_t tiles = fill_map(P, B, k0, k1, fp, &work);
    at::Tensor part = at::empty({2 * tiles}, g.options());
    at::Tensor part2 = at::empty({tiles}, g.options());
    dispatch_acc(acc, [&](auto tag) {
      launch_map_backward<decltype(tag)>(P, tiles, prm, g, part, part2, stream);
    });
  });
  std::vector<at::Tensor> grads(K);
  for (int64_t k = 0; k < K; ++k) {
    gbuf[k].finish();
    grads[k] = gbuf[k].out;
  }
  return grads;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lwkd, CUDA, m) {
  m.impl("attention_discrepancy", &cuda::attention_discrepancy_cuda);
  m.impl("attention_discrepancy_backward", &cuda::attention_discrepancy_backward_cuda);
  m.impl("map_discrepancy", &cuda::map_discrepancy_cuda);
  m.impl("map_discrepancy_backward", &cuda::map_discrepancy_backward_cuda);
}

}  // namespace lwkd
