"""The SPEC section 6 tolerance rule, shared by the test-suite and ``lwkd-fast check``.

* float64 inputs: within rtol = atol = 1e-10 of the float64 reference;
* float32 inputs: within rtol 1e-5, atol 1e-6 of the float64 reference (elementwise,
  ``|x - ref| <= atol + rtol |ref|``);
* float16 / bfloat16 inputs: the maximum error against the float64 reference is at most twice
  the maximum error of the eager torch reference run in that same dtype, plus atol 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Verdict", "compare", "tolerances"]

_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-6)}
LOWP_ATOL = 1e-3


def tolerances(dtype: torch.dtype):
    """(rtol, atol) for float32/float64; None for the low-precision rule."""
    return _TOL.get(dtype)


@dataclass
class Verdict:
    ok: bool
    max_err: float       # max |actual - ref|
    bound: float         # the allowance it was held to (max over elements for rtol/atol)
    rule: str

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.ok

    def __str__(self) -> str:
        return f"{'ok' if self.ok else 'FAIL'}: max error {self.max_err:.3g} vs allowed {self.bound:.3g} ({self.rule})"


def compare(actual: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
            eager: Optional[torch.Tensor] = None, *, row_ulps: float = 0.0) -> Verdict:
    """Hold ``actual`` (computed from ``dtype`` inputs) against the float64 reference ``ref64``.

    For float16/bfloat16 ``eager`` must be the same quantity computed by plain eager torch in
    that dtype.  Non-finite values must match exactly in position (NaN where the reference is NaN).
    ``row_ulps`` (float32/float64 only) adds ``row_ulps * eps(dtype) * max |ref|`` per sample (the
    first dimension) to the allowance: SPEC section 6's known float32 limit of the JSD gradient.
    """
    a = actual.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    if a.shape != r.shape:
        return Verdict(False, float("inf"), 0.0, f"shape {tuple(a.shape)} != reference {tuple(r.shape)}")
    fin = torch.isfinite(r)
    if not torch.equal(torch.isfinite(a), fin) or not torch.equal(torch.isnan(a), torch.isnan(r)):
        return Verdict(False, float("inf"), 0.0, "non-finite values differ from the reference")
    if not torch.equal(a[torch.isinf(r)], r[torch.isinf(r)]):
        return Verdict(False, float("inf"), 0.0, "infinite values differ from the reference")
    floor = None
    if row_ulps and r.dim() > 0 and r.numel() > 0:
        rows = torch.where(fin, r, torch.zeros_like(r)).abs().reshape(r.shape[0], -1).amax(dim=1)
        floor = (row_ulps * torch.finfo(dtype).eps * rows).reshape((-1,) + (1,) * (r.dim() - 1)).expand_as(r)[fin]
    a, r = a[fin], r[fin]
    if a.numel() == 0:
        return Verdict(True, 0.0, 0.0, "empty")
    err = (a - r).abs()
    max_err = float(err.max())
    tol = tolerances(dtype)
    if tol is not None:
        rtol, atol = tol
        allowed = atol + rtol * r.abs() + (floor if floor is not None else 0.0)
        ok = bool((err <= allowed).all())
        rule = f"rtol {rtol:g}, atol {atol:g}" + (f", {row_ulps:g} ulp of the sample's max" if floor is not None else "")
        return Verdict(ok, max_err, float(allowed.max()), rule)
    if eager is None:
        raise ValueError(f"compare: dtype {dtype} needs the eager result in that dtype")
    e = eager.detach().to(torch.float64).cpu()[fin]
    # an eager element that overflowed is counted as exact: that can only tighten the bound
    e = torch.where(torch.isfinite(e), e, r)
    eager_err = float((e - r).abs().max())
    bound = 2.0 * eager_err + LOWP_ATOL
    return Verdict(max_err <= bound, max_err, bound, f"2 x eager {dtype} error + {LOWP_ATOL:g}")


# ------------------------------------------------------------------------------------------------
# One op, one backend, held against the float64 reference (forward and backward)
# ------------------------------------------------------------------------------------------------


def _leaves(xs, dtype=None):
    """Fresh leaf tensors that keep the strides of ``xs`` (non-contiguous stays non-contiguous)."""
    out = []
    for x in xs:
        y = x.detach() if dtype is None else x.detach().to(dtype)
        out.append(y.requires_grad_(True))
    return out


def verify_op(public, ref, student, teacher, *, backend: str, weights: Optional[torch.Tensor] = None):
    """Run ``public(student, teacher) -> (K, B)`` under ``backend`` and hold its values and its
    gradients with respect to every student tensor against the float64 reference
    ``ref(student, teacher, compute_dtype)``.

    The backward is driven by ``sum(weights * d)`` with per-(layer, sample) weights, so every
    upstream gradient differs.  Returns ``{"forward": Verdict, "grad[k]": Verdict, ...}``.
    """
    from .ops import use_backend

    dtype = student[0].dtype
    K, B = len(student), student[0].shape[0]
    if weights is None:
        g = torch.Generator().manual_seed(1234)
        weights = torch.rand(K, B, generator=g, dtype=torch.float64) + 0.5

    s_b = _leaves(student)
    with use_backend(backend):
        d = public(s_b, list(teacher))
    grads = torch.autograd.grad((d * weights.to(d.device, d.dtype)).sum(), s_b, allow_unused=True)

    s64 = _leaves(student, torch.float64)
    t64 = [x.detach().to(torch.float64) for x in teacher]
    d64 = ref(s64, t64, None)
    g64 = torch.autograd.grad((d64 * weights.to(d64.device)).sum(), s64, allow_unused=True)

    d_e, g_e = None, [None] * K
    if tolerances(dtype) is None:  # low precision: eager torch in that dtype sets the bar
        s_e = _leaves(student)
        d_e = ref(s_e, list(teacher), dtype)
        g_e = torch.autograd.grad((d_e * weights.to(d_e.device, d_e.dtype)).sum(), s_e, allow_unused=True)

    def z(g, like):
        return torch.zeros_like(like) if g is None else g

    out = {"forward": compare(d, d64, dtype, d_e)}
    for k in range(K):
        out[f"grad[{k}]"] = compare(
            z(grads[k], student[k]), z(g64[k], s64[k]), dtype,
            None if tolerances(dtype) is not None else z(g_e[k], student[k]),
        )
    return out
