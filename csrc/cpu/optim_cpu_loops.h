// Per-chunk loops of the fused CPU optimizer step.
//
// NO include guard on purpose: csrc/cpu/optim_cpu.cpp includes this file several times, each
// time inside its own namespace and under its own `#pragma GCC target` (baseline x86-64, AVX2,
// AVX-512), and picks one version at run time from the CPU's features.  Every header this file
// needs is included by optim_cpu.cpp before, so nothing below pulls in new declarations.
//
// The loops are branch-free per element (the per-tensor options are template parameters, the
// per-element arithmetic comes from common/optim_math.h), so the compiler vectorises them for
// the target's vector width.  bfloat16 is converted with explicit bit operations (round to
// nearest even, NaN kept quiet), which vectorise, instead of c10::BFloat16's branchy scalar
// conversion; the results are identical.

// ---- element access in op-math precision --------------------------------------------------------
inline float load_op(const float* p, int64_t i) { return p[i]; }
inline double load_op(const double* p, int64_t i) { return p[i]; }
inline float load_op(const c10::Half* p, int64_t i) { return float(p[i]); }
inline float load_op(const c10::BFloat16* p, int64_t i) {
  const uint32_t u = uint32_t(p[i].x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void store_op(float* p, int64_t i, float v) { p[i] = v; }
inline void store_op(double* p, int64_t i, double v) { p[i] = v; }
inline void store_op(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
inline void store_op(c10::BFloat16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? 0x7FC0u : r;
  p[i].x = static_cast<uint16_t>(r);
}

// ---- SGD ----------------------------------------------------------------------------------------
template <typename scalar_t, bool kWd, SgdVariant V, bool kNesterov>
void sgd_chunk(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
               int64_t n, const SgdScalars<at::opmath_type<scalar_t>> c) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    op_t pi = load_op(p, i);
    op_t bi = V == SgdVariant::kMomentum ? load_op(buf, i) : op_t(0);
    sgd_element<kWd, V, kNesterov>(pi, load_op(g, i), bi, c);
    store_op(p, i, pi);
    if (V != SgdVariant::kPlain) store_op(buf, i, bi);
  }
}

// ---- AdamW --------------------------------------------------------------------------------------
template <typename scalar_t, bool kWd, bool kAmsgrad>
void adamw_chunk(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                 scalar_t* __restrict__ v, scalar_t* __restrict__ vmax, int64_t n,
                 const AdamScalars<at::opmath_type<scalar_t>> c) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    op_t pi = load_op(p, i);
    op_t mi = load_op(m, i);
    op_t vi = load_op(v, i);
    op_t wi = kAmsgrad ? load_op(vmax, i) : op_t(0);
    adamw_element<kWd, kAmsgrad>(pi, load_op(g, i), mi, vi, wi, c);
    store_op(p, i, pi);
    store_op(m, i, mi);
    store_op(v, i, vi);
    if (kAmsgrad) store_op(vmax, i, wi);
  }
}

// ---- one chunk of one tensor: pick the variant --------------------------------------------------
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

inline void dispatch_chunk(const StepPlan& plan, size_t i, const TensorStepInfo& info, int64_t begin,
                           int64_t end) {
  const StepTensor& t = plan.tensors[i];
  switch (plan.dtypes[i]) {
    case at::kFloat: run_chunk<float>(plan, t, info, begin, end); break;
    case at::kDouble: run_chunk<double>(plan, t, info, begin, end); break;
    case at::kBFloat16: run_chunk<c10::BFloat16>(plan, t, info, begin, end); break;
    case at::kHalf: run_chunk<c10::Half>(plan, t, info, begin, end); break;
    default: TORCH_CHECK(false, plan.op, ": unsupported dtype ", plan.dtypes[i], " (", LWKD_ISA_NAME, ")");
  }
}
