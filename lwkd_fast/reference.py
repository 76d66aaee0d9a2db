"""Pure-torch reference implementations (SPEC sections 1-2).

This module is three things at once:

* the **oracle** of the test-suite (run in float64),
* the **fallback backend** that runs anywhere (autograd through plain torch ops),
* the **baseline** of the benchmarks: it is written the way knowledge-distillation repositories
  write attention transfer -- one Python iteration per layer of ``pow``/``mean``/``normalize``.

Every function takes already-validated inputs (see :mod:`lwkd_fast.ops` for the public,
validated entry points).  ``compute_dtype`` selects the precision of the arithmetic; ``None``
means the SPEC's policy (float64 inputs in float64, everything else in float32).  Passing the
input dtype (e.g. ``torch.float16``) reproduces plain eager torch in that precision, which the
tests use for the SPEC's "twice the error of eager torch" tolerance rule.

Teacher tensors are constants: they are detached, so no gradient ever reaches the teacher.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "acc_dtype",
    "attention_maps",
    "attention_discrepancy",
    "map_discrepancy",
    "eager_at_loss",
]


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (SPEC section 2)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def to_bcn(feat: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(B, C, N) view of a feature map whose channel dimension is ``channel_dim`` (a copy only
    when its spatial dimensions cannot merge)."""
    if feat.dim() == 1:
        return feat.reshape(feat.shape[0], 1, 1)
    x = feat.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def bcn_locations(feat: torch.Tensor, channel_dim: int) -> int:
    """N, the number of locations of :func:`to_bcn` (product of the non-batch, non-channel dims)."""
    if feat.dim() == 1:
        return 1
    cd = channel_dim % feat.dim()
    n = 1
    for d in range(1, feat.dim()):
        if d != cd:
            n *= feat.shape[d]
    return n


def attention_maps(
    feat: torch.Tensor,
    *,
    p: float = 2.0,
    channel_dim: int = 1,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``a[b, i] = (1/C) sum_c |A[b, c, i]|^p`` as a (B, N) tensor (SPEC section 1)."""
    dtype = compute_dtype or acc_dtype(feat)
    x = to_bcn(feat, channel_dim).to(dtype)
    x = x.pow(2) if p == 2 else x.abs().pow(p)
    return x.mean(1)


def _safe_plogp_over_m(P: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``P * log(P / M)`` with ``0 log 0 = 0`` and finite gradients everywhere.

    The masked positions use a safe value inside the logarithms (the double-``where`` idiom), so
    autograd never multiplies a zero by an infinite ``log 0``.  Only exact zeros are masked: a NaN
    probability (from a NaN or infinite activation) stays NaN, so a corrupted sample is never a
    perfect match (SPEC section 2).
    """
    pos = P != 0
    one = torch.ones((), dtype=P.dtype, device=P.device)
    P_safe = torch.where(pos, P, one)
    M_safe = torch.where(pos, M, one)
    return torch.where(pos, P * (torch.log(P_safe) - torch.log(M_safe)), torch.zeros_like(P))


def _unless_overflow(d: torch.Tensor, r_s: torch.Tensor, r_t: torch.Tensor) -> torch.Tensor:
    """NaN for the samples whose normaliser (a norm or sum of a map) overflowed the compute dtype:
    the normalised map would silently be zeros and d a finite wrong value (SPEC section 6)."""
    ok = torch.isfinite(r_s.reshape(-1)) & torch.isfinite(r_t.reshape(-1))
    return torch.where(ok, d, torch.full_like(d, float("nan")))


def _distribution(a: torch.Tensor, normalize: str, tau: float, eps: float,
                  mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(P, normaliser)``: ``P`` of SPEC section 2 over the locations of each sample and the sum
    it was normalised by (the range guard's input; softmax, stable for every finite map, reports
    0).  With a (B, N) bool ``mask`` only the valid locations carry probability (masked ones get
    exactly 0; an all-masked sample gets P = 0)."""
    if normalize == "softmax":
        none = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        if mask is None:
            return torch.softmax(a / tau, dim=1), none
        z = torch.where(mask, a / tau, float("-inf"))
        any_valid = mask.any(dim=1, keepdim=True)
        z = torch.where(any_valid, z, torch.zeros_like(z))  # no all -inf row: no NaN anywhere
        return torch.where(mask, torch.softmax(z, dim=1), torch.zeros_like(z)), none
    if mask is not None:
        a = a * mask.to(a.dtype)
    S = a.sum(dim=1, keepdim=True)
    return a / S.clamp_min(eps), S


def _jsd(Ps: Tuple[torch.Tensor, torch.Tensor], Pt: Tuple[torch.Tensor, torch.Tensor], beta: float) -> torch.Tensor:
    (Ps, rs), (Pt, rt) = Ps, Pt
    M = beta * Ps + (1.0 - beta) * Pt
    d = (beta * _safe_plogp_over_m(Ps, M) + (1.0 - beta) * _safe_plogp_over_m(Pt, M)).sum(1)
    return _unless_overflow(d, rs, rt)


def _sqdist(u: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample ``sum_i (u/max(|u|,eps) - w/max(|w|,eps))^2`` of (B, N) tensors (the
    ``F.normalize`` of the official AT loss, with its norms kept for the range guard)."""
    nu, nw = u.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    d = (u / nu.clamp_min(eps) - w / nw.clamp_min(eps)).pow(2).sum(1)
    return _unless_overflow(d, nu, nw)


def attention_discrepancy(
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    *,
    p: float = 2.0,
    metric: str = "at",
    beta: float = 0.5,
    normalize: str = "sum",
    tau: float = 1.0,
    channel_dim: int = 1,
    eps: float = 1e-12,
    compute_dtype: Optional[torch.dtype] = None,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Per-sample attention discrepancy of every layer pair, as a (K, B) tensor.

    ``masks`` (one entry per pair, each None or a (B, N) bool tensor of valid locations) restricts
    every sum over locations to the valid ones (SPEC section 2, "Masked locations"): "at" divides
    by the number of valid locations of the sample, "jsd" normalises over the valid locations
    only, and a sample without valid locations gives 0."""
    dtype = compute_dtype or acc_dtype(*student_feats, *teacher_feats)
    rows = []
    for k, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        m = None if masks is None else masks[k]
        a_s = attention_maps(fs, p=p, channel_dim=channel_dim, compute_dtype=dtype)
        a_t = attention_maps(ft.detach(), p=p, channel_dim=channel_dim, compute_dtype=dtype)
        if metric == "at":
            if m is None:
                rows.append(_sqdist(a_s, a_t, eps) / a_s.shape[1])
            else:
                mf = m.to(dtype)
                rows.append(_sqdist(a_s * mf, a_t * mf, eps) / mf.sum(1).clamp_min(1.0))
        elif metric == "jsd":
            rows.append(_jsd(_distribution(a_s, normalize, tau, eps, m),
                             _distribution(a_t, normalize, tau, eps, m), beta))
        else:
            raise ValueError(f"unknown metric {metric!r}")
    return torch.stack(rows)


def map_discrepancy(
    student_maps: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    *,
    metric: str = "cos",
    beta: float = 0.5,
    eps: float = 1e-12,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-sample discrepancy of derivative maps (Jacobians, HVPs), as a (K, B) tensor."""
    dtype = compute_dtype or acc_dtype(*student_maps, *teacher_maps)
    rows = []
    for us, ut in zip(student_maps, teacher_maps):
        u = us.reshape(us.shape[0], -1).to(dtype)
        w = ut.detach().reshape(ut.shape[0], -1).to(dtype)
        if metric == "cos":
            rows.append(_sqdist(u, w, eps))
        elif metric == "jsd":
            rows.append(_jsd(_distribution(u.abs(), "sum", 1.0, eps), _distribution(w.abs(), "sum", 1.0, eps), beta))
        else:
            raise ValueError(f"unknown metric {metric!r}")
    return torch.stack(rows)


def eager_at_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                  channel_dim: int = 1) -> torch.Tensor:
    """Attention-transfer loss exactly as KD repositories write it (Zagoruyko & Komodakis):

    ``sum_j (at(s_j) - at(t_j)).pow(2).mean()`` with ``at(x) = F.normalize(x.pow(2).mean(1).view(B, -1))``
    (``mean(-1)`` over the hidden size for token layouts (B, N, D), ``channel_dim=-1``).

    The per-layer Python loop with one chain of eager ops per layer is the baseline the
    benchmarks compare against.  It equals ``attention_discrepancy(...).sum()`` for p=2, "at".
    """
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        a_s = F.normalize(fs.pow(2).mean(channel_dim).view(fs.size(0), -1))
        a_t = F.normalize(ft.pow(2).mean(channel_dim).view(ft.size(0), -1))
        term = (a_s - a_t).pow(2).mean()
        total = term if total is None else total + term
    return total
