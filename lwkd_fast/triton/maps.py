"""Derivative-map discrepancy on Triton (SPEC section 2): the flat tile kernels, their host code
(forward / backward), and the ``lwkd_triton::map_discrepancy`` custom ops with their fakes and
autograd.  The design is described in lwkd_fast.triton.discrepancy.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import is_dense, same_layout, sqrt_rn
from ._jit import (M_NCOL, _H_BETA, _H_EPS, _M_GPTR, _M_GSB, _M_NCH, _M_NCH_I, _M_NCOL,
    _M_ORIG, _M_SPTR, _M_SSB, _M_TPTR, _M_TSB, _M_TSTART, _base, _from_acc, _inv_clamp,
    _jsd_grad_ps, _jsd_term, _layer_tile, _param, _sign, _sum, _to_acc, _unless_overflow)
from ._host import (CONFIG, _TL_DTYPES, _Table, _acc_dtype, _cdiv, _check_maps_nonempty, _check_params,
    _check_saved, _divisibility, _guard, _launch, _metric_code, _next_pow2, _pair_lists, _round_up,
    _store_mode)


# ------------------------------------------------------------------------------------------------
# Map op (flat per-sample vectors)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _flat_tile(tab, n_layers, tile0, KPAD: tl.constexpr, BLOCK: tl.constexpr):
    """The map rows' tile (``_layer_tile``) and the global index of its sample's first tile."""
    gt, row, b, ci, nch, _N, i_begin, i_full, i_end = _layer_tile(tab, n_layers, tile0, _M_NCOL, KPAD, BLOCK)
    return gt, row, b, ci, nch, i_begin, i_full, i_end, gt - ci


@triton.jit
def _flat_vals(u_base, w_base, i0, i_end, S_BF16: tl.constexpr, T_BF16: tl.constexpr, ACC: tl.constexpr,
               MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One block of u and w (masked only in the ragged tail; masked lanes read 0, which adds 0 to
    every statistic, term and projection)."""
    if MASK:
        idx = i0 + tl.arange(0, BLOCK)
        m = idx < i_end
        u = tl.load(u_base + idx, mask=m, other=0.0)
        w = tl.load(w_base + idx, mask=m, other=0.0)
    else:
        idx = i0 + tl.arange(0, BLOCK)
        u = tl.load(u_base + idx)
        w = tl.load(w_base + idx)
    return idx, _to_acc(u, S_BF16, ACC), _to_acc(w, T_BF16, ACC)


@triton.jit
def _stats_step(acc_u, acc_w, u, w, METRIC: tl.constexpr):
    if METRIC == 2:
        return acc_u + tl.abs(u), acc_w + tl.abs(w)
    else:
        return acc_u + u * u, acc_w + w * w


@triton.jit
def _map_stats_kernel(tab, n_layers, tile0, part, S_DT: tl.constexpr, T_DT: tl.constexpr,
                      S_BF16: tl.constexpr, T_BF16: tl.constexpr, ACC: tl.constexpr,
                      METRIC: tl.constexpr, S_DIV: tl.constexpr, S_ALIGN: tl.constexpr,
                      T_DIV: tl.constexpr, T_ALIGN: tl.constexpr, KPAD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Partial sum u^2, w^2 ("cos") or |u|, |w| ("jsd") of one tile."""
    gt, row, b, ci, nch, i_begin, i_full, i_end, first = _flat_tile(tab, n_layers, tile0, KPAD, BLOCK)
    u_base = _base(row, _M_SPTR, _M_SSB, b, S_DT, S_DIV, S_ALIGN)
    w_base = _base(row, _M_TPTR, _M_TSB, b, T_DT, T_DIV, T_ALIGN)
    acc_u = tl.full([BLOCK], 0, ACC)
    acc_w = tl.full([BLOCK], 0, ACC)
    for i0 in range(i_begin, i_full, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, False, BLOCK)
        acc_u, acc_w = _stats_step(acc_u, acc_w, u, w, METRIC)
    for i0 in range(i_full, i_end, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, True, BLOCK)
        acc_u, acc_w = _stats_step(acc_u, acc_w, u, w, METRIC)
    tl.store(part + gt * 2, _sum(acc_u))
    tl.store(part + gt * 2 + 1, _sum(acc_w))


@triton.jit
def _combine(part, first, nch, STRIDE: tl.constexpr, COL: tl.constexpr, MAXC: tl.constexpr):
    """Sum of the per-tile partials of one sample, in tile order (deterministic)."""
    cs = tl.arange(0, MAXC)
    return _sum(tl.load(part + (first + cs) * STRIDE + COL, mask=cs < nch, other=0.0))


@triton.jit
def _terms_step(acc, u, w, inv_u, inv_w, beta, METRIC: tl.constexpr):
    if METRIC == 2:
        return acc + _jsd_term(tl.abs(u) * inv_u, tl.abs(w) * inv_w, beta)
    else:
        diff = u * inv_u - w * inv_w
        return acc + diff * diff


@triton.jit
def _map_terms_kernel(hdr, tab, n_layers, tile0, B, part, part2, rowstats, S_DT: tl.constexpr,
                      T_DT: tl.constexpr, S_BF16: tl.constexpr, T_BF16: tl.constexpr,
                      ACC: tl.constexpr, METRIC: tl.constexpr, S_DIV: tl.constexpr,
                      S_ALIGN: tl.constexpr, T_DIV: tl.constexpr, T_ALIGN: tl.constexpr,
                      KPAD: tl.constexpr, MAXC: tl.constexpr, BLOCK: tl.constexpr):
    gt, row, b, ci, nch, i_begin, i_full, i_end, first = _flat_tile(tab, n_layers, tile0, KPAD, BLOCK)
    eps = _param(hdr, _H_EPS, ACC)
    beta = _param(hdr, _H_BETA, ACC)
    r_u = _combine(part, first, nch, 2, 0, MAXC)
    r_w = _combine(part, first, nch, 2, 1, MAXC)
    if METRIC != 2:
        r_u = sqrt_rn(r_u)
        r_w = sqrt_rn(r_w)
    inv_u = _inv_clamp(r_u, eps)
    inv_w = _inv_clamp(r_w, eps)
    u_base = _base(row, _M_SPTR, _M_SSB, b, S_DT, S_DIV, S_ALIGN)
    w_base = _base(row, _M_TPTR, _M_TSB, b, T_DT, T_DIV, T_ALIGN)
    acc = tl.full([BLOCK], 0, ACC)
    for i0 in range(i_begin, i_full, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, False, BLOCK)
        acc = _terms_step(acc, u, w, inv_u, inv_w, beta, METRIC)
    for i0 in range(i_full, i_end, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, True, BLOCK)
        acc = _terms_step(acc, u, w, inv_u, inv_w, beta, METRIC)
    tl.store(part2 + gt, _unless_overflow(_sum(acc), r_u, r_w))
    k = tl.load(row + _M_ORIG)
    tl.store(rowstats + (k * B + b) * 2, r_u, mask=ci == 0)
    tl.store(rowstats + (k * B + b) * 2 + 1, r_w, mask=ci == 0)


@triton.jit
def _map_rows_kernel(tab, B, part2, d, MAXC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    j = pid // B
    b = pid - j * B
    row = tab + j * _M_NCOL
    nch = tl.load(row + _M_NCH)
    first = tl.load(row + _M_TSTART) + b * nch
    tl.store(d + tl.load(row + _M_ORIG) * B + b, _combine(part2, first, nch, 1, 0, MAXC))


@triton.jit
def _map_bwd_common(hdr, row, b, B, grad, rowstats, ACC: tl.constexpr):
    k = tl.load(row + _M_ORIG)
    eps = _param(hdr, _H_EPS, ACC)
    beta = _param(hdr, _H_BETA, ACC)
    r_u = tl.load(rowstats + (k * B + b) * 2)
    r_w = tl.load(rowstats + (k * B + b) * 2 + 1)
    gd = tl.load(grad + k * B + b).to(ACC)
    return eps, beta, r_u, _inv_clamp(r_u, eps), _inv_clamp(r_w, eps), gd


@triton.jit
def _proj_step(acc, u, w, inv_u, inv_w, gd, beta, METRIC: tl.constexpr):
    if METRIC == 2:
        pu = tl.abs(u) * inv_u
        return acc + gd * _jsd_grad_ps(pu, tl.abs(w) * inv_w, beta) * pu
    else:
        q = u * inv_u
        return acc + q * (2.0 * gd * (q - w * inv_w))


@triton.jit
def _map_proj_kernel(hdr, tab, n_layers, tile0, B, grad, rowstats, part, S_DT: tl.constexpr,
                     T_DT: tl.constexpr, S_BF16: tl.constexpr, T_BF16: tl.constexpr,
                     ACC: tl.constexpr, METRIC: tl.constexpr, S_DIV: tl.constexpr,
                     S_ALIGN: tl.constexpr, T_DIV: tl.constexpr, T_ALIGN: tl.constexpr,
                     KPAD: tl.constexpr, BLOCK: tl.constexpr):
    gt, row, b, ci, nch, i_begin, i_full, i_end, first = _flat_tile(tab, n_layers, tile0, KPAD, BLOCK)
    eps, beta, r_u, inv_u, inv_w, gd = _map_bwd_common(hdr, row, b, B, grad, rowstats, ACC)
    u_base = _base(row, _M_SPTR, _M_SSB, b, S_DT, S_DIV, S_ALIGN)
    w_base = _base(row, _M_TPTR, _M_TSB, b, T_DT, T_DIV, T_ALIGN)
    acc = tl.full([BLOCK], 0, ACC)
    for i0 in range(i_begin, i_full, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, False, BLOCK)
        acc = _proj_step(acc, u, w, inv_u, inv_w, gd, beta, METRIC)
    for i0 in range(i_full, i_end, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, True, BLOCK)
        acc = _proj_step(acc, u, w, inv_u, inv_w, gd, beta, METRIC)
    tl.store(part + gt, _sum(acc))


@triton.jit
def _grad_vals(u, w, inv_u, inv_w, gd, proj, beta, METRIC: tl.constexpr):
    if METRIC == 2:
        gp = gd * _jsd_grad_ps(tl.abs(u) * inv_u, tl.abs(w) * inv_w, beta)
        return (gp - proj) * inv_u * _sign(u)     # lwkd::sumnorm_grad_a through |u|
    else:
        q = u * inv_u
        return (2.0 * gd * (q - w * inv_w) - q * proj) * inv_u   # lwkd::sqdist_grad_{q,a}


@triton.jit
def _map_grad_kernel(hdr, tab, n_layers, tile0, B, grad, rowstats, part, S_DT: tl.constexpr,
                     T_DT: tl.constexpr, S_BF16: tl.constexpr, T_BF16: tl.constexpr,
                     STORE: tl.constexpr, ACC: tl.constexpr, METRIC: tl.constexpr,
                     S_DIV: tl.constexpr, S_ALIGN: tl.constexpr, T_DIV: tl.constexpr,
                     T_ALIGN: tl.constexpr, G_DIV: tl.constexpr, G_ALIGN: tl.constexpr,
                     KPAD: tl.constexpr, MAXC: tl.constexpr, BLOCK: tl.constexpr):
    gt, row, b, ci, nch, i_begin, i_full, i_end, first = _flat_tile(tab, n_layers, tile0, KPAD, BLOCK)
    eps, beta, r_u, inv_u, inv_w, gd = _map_bwd_common(hdr, row, b, B, grad, rowstats, ACC)
    proj = _combine(part, first, nch, 1, 0, MAXC)
    proj = tl.where(r_u >= eps, proj, 0.0)
    u_base = _base(row, _M_SPTR, _M_SSB, b, S_DT, S_DIV, S_ALIGN)
    w_base = _base(row, _M_TPTR, _M_TSB, b, T_DT, T_DIV, T_ALIGN)
    g_base = _base(row, _M_GPTR, _M_GSB, b, S_DT, G_DIV, G_ALIGN)
    for i0 in range(i_begin, i_full, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, False, BLOCK)
        tl.store(g_base + idx, _from_acc(_grad_vals(u, w, inv_u, inv_w, gd, proj, beta, METRIC), S_DT, STORE))
    for i0 in range(i_full, i_end, BLOCK):
        idx, u, w = _flat_vals(u_base, w_base, i0, i_end, S_BF16, T_BF16, ACC, True, BLOCK)
        tl.store(g_base + idx, _from_acc(_grad_vals(u, w, inv_u, inv_w, gd, proj, beta, METRIC), S_DT, STORE),
                 mask=idx < i_end)


# True when these kernels were created by the Triton interpreter (TRITON_INTERPRET=1 at import).


# ---- map op ------------------------------------------------------------------------------------


def _dense_batch_outer(x: torch.Tensor) -> bool:
    if x.dim() == 0 or not is_dense(x):
        return False
    n = x.numel() // max(x.shape[0], 1)
    return x.shape[0] == 1 or x.stride(0) == n


def _flat_pair(s: torch.Tensor, t: torch.Tensor, op: str, k: int):
    """Per-sample flat views in one memory order (as lwkd::flat_pair): in place when both are
    dense, batch-outer and laid out alike (channels_last included), else one contiguous copy each."""
    if s.shape != t.shape:
        raise ValueError(f"lwkd_triton::{op}: pair {k}: student map shape {tuple(s.shape)} differs from "
                         f"teacher map shape {tuple(t.shape)}")
    if not (_dense_batch_outer(s) and _dense_batch_outer(t) and same_layout(s, t)):
        s, t = s.contiguous(), t.contiguous()
    return s, t, s.numel() // s.shape[0]


def _flat_chunks(N: int):
    blk = CONFIG.block_flat
    nch = max(1, min(CONFIG.max_flat_chunks, _cdiv(N, CONFIG.flat_chunk_min)))
    chunk = _round_up(_cdiv(N, nch), blk)
    return chunk, _cdiv(N, chunk)


def _map_table(student_flat, teacher_flat, Ns, B, params, grads=None):
    """Rows of the map op; sample b of a flat tensor starts at ptr + b * N (sb = 0 when B == 1,
    so that the divisibility hint on it holds)."""
    table = _Table(M_NCOL, params)
    keyed = []
    for k, (s, t) in enumerate(zip(student_flat, teacher_flat)):
        N = Ns[k]
        chunk, nch = _flat_chunks(N)
        sb = N if B > 1 else 0
        g = grads[k] if grads is not None else None
        divs = [_divisibility(x.data_ptr(), x.element_size(), (sb,)) for x in (s, t)]
        divs.append(_divisibility(g.data_ptr(), g.element_size(), (sb,)) if g is not None else (1, 1))
        row = [0, N, chunk, nch, k, s.data_ptr(), sb, t.data_ptr(), sb, g.data_ptr() if g is not None else 0, sb]
        key = (str(s.dtype), str(t.dtype)) + tuple(v for dv in divs for v in dv)
        keyed.append((key, row, B * nch))
    return table.build(keyed, student_flat[0].device, n_hints=6)


def _group_dtypes(key):
    """Compile-time constants of a map-op group: dtypes and divisibility hints of u and w (the
    gradient's hints are key[6:8])."""
    sdt, tdt = getattr(torch, key[0][6:]), getattr(torch, key[1][6:])
    return dict(S_DT=_TL_DTYPES[sdt], T_DT=_TL_DTYPES[tdt], S_BF16=sdt == torch.bfloat16,
                T_BF16=tdt == torch.bfloat16, S_DIV=key[2], S_ALIGN=key[3], T_DIV=key[4],
                T_ALIGN=key[5]), sdt


def _map_forward_impl(student, teacher, metric, beta, eps):
    op = "map_discrepancy"
    mcode = _metric_code(metric, False)
    _check_params(op, beta, 1.0, eps)
    B = _pair_lists(student, teacher, op)
    _check_maps_nonempty(student, teacher, op)
    K = len(student)
    acc = _acc_dtype(list(student) + list(teacher))
    dev = student[0].device
    pairs = [_flat_pair(s, t, op, k) for k, (s, t) in enumerate(zip(student, teacher))]
    Ns = [n for _, _, n in pairs]
    table = _map_table([p[0] for p in pairs], [p[1] for p in pairs], Ns, B, (1.0, beta, 1.0, eps))
    T = table.total_tiles
    maxc = _next_pow2(max(r[_M_NCH_I] for r in table.rows))
    part = torch.empty(2 * T, dtype=acc, device=dev)
    part2 = torch.empty(T, dtype=acc, device=dev)
    rowstats = torch.empty(K * B * 2, dtype=acc, device=dev)
    d = torch.empty((K, B), dtype=acc, device=dev)
    for key, r0, r1, tile0, ntiles in table.groups:
        dts, _ = _group_dtypes(key)
        _launch(_map_stats_kernel, (ntiles,), table.group_rows(r0, r1), r1 - r0, tile0, part,
                ACC=_TL_DTYPES[acc], METRIC=mcode, KPAD=_next_pow2(r1 - r0), BLOCK=CONFIG.block_flat, **dts)
    for key, r0, r1, tile0, ntiles in table.groups:
        dts, _ = _group_dtypes(key)
        _launch(_map_terms_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0, B,
                part, part2, rowstats, ACC=_TL_DTYPES[acc], METRIC=mcode, KPAD=_next_pow2(r1 - r0),
                MAXC=maxc, BLOCK=CONFIG.block_flat, **dts)
    _launch(_map_rows_kernel, (K * B,), table.all_rows, B, part2, d, MAXC=maxc)
    return d, rowstats


def _map_backward_impl(grad, student, teacher, rowstats, metric, beta, eps):
    op = "map_discrepancy_backward"
    mcode = _metric_code(metric, False)
    _check_params(op, beta, 1.0, eps)
    B = _pair_lists(student, teacher, op)
    _check_maps_nonempty(student, teacher, op)
    K = len(student)
    acc = rowstats.dtype
    dev = student[0].device
    if tuple(grad.shape) != (K, B):
        raise ValueError(f"lwkd_triton::{op}: grad must be ({K}, {B}), got {tuple(grad.shape)}")
    if acc != _acc_dtype(list(student) + list(teacher)):
        raise ValueError(f"lwkd_triton::{op}: rowstats has dtype {acc} but the maps accumulate in "
                         f"{_acc_dtype(list(student) + list(teacher))} (pass the forward's row statistics)")
    _check_saved(op, "rowstats", rowstats, acc, dev, K * B * 2)
    grad = grad.to(device=dev, dtype=acc).contiguous()
    pairs = [_flat_pair(s, t, op, k) for k, (s, t) in enumerate(zip(student, teacher))]
    Ns = [n for _, _, n in pairs]
    grads, bufs = [], []
    for k in range(K):
        g = torch.empty_like(student[k])
        fs = pairs[k][0]
        direct = fs is student[k] and g.stride() == fs.stride()
        grads.append(g)
        bufs.append(g if direct else torch.empty_like(fs))
    table = _map_table([p[0] for p in pairs], [p[1] for p in pairs], Ns, B, (1.0, beta, 1.0, eps), bufs)
    T = table.total_tiles
    maxc = _next_pow2(max(r[_M_NCH_I] for r in table.rows))
    part = torch.empty(T, dtype=acc, device=dev)
    for key, r0, r1, tile0, ntiles in table.groups:
        dts, _ = _group_dtypes(key)
        _launch(_map_proj_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0, B,
                grad, rowstats, part, ACC=_TL_DTYPES[acc], METRIC=mcode, KPAD=_next_pow2(r1 - r0),
                BLOCK=CONFIG.block_flat, **dts)
    for key, r0, r1, tile0, ntiles in table.groups:
        dts, sdt = _group_dtypes(key)
        _launch(_map_grad_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0, B,
                grad, rowstats, part, STORE=_store_mode(sdt), ACC=_TL_DTYPES[acc], METRIC=mcode,
                G_DIV=key[6], G_ALIGN=key[7], KPAD=_next_pow2(r1 - r0), MAXC=maxc,
                BLOCK=CONFIG.block_flat, **dts)
    for k in range(K):
        if bufs[k] is not grads[k]:
            grads[k].copy_(bufs[k])
    return grads


@torch.library.custom_op("lwkd_triton::map_discrepancy", mutates_args=())
def map_discrepancy_op(student: List[torch.Tensor], teacher: List[torch.Tensor], metric: str,
                       beta: float, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (d (K, B), row statistics (K * B * 2) kept for the backward)."""
    with _guard(student, "map_discrepancy"):
        return _map_forward_impl(student, teacher, metric, beta, eps)


@map_discrepancy_op.register_fake
def _map_fake(student, teacher, metric, beta, eps):
    acc = _acc_dtype(list(student) + list(teacher))
    K, B = len(student), student[0].shape[0]
    return student[0].new_empty((K, B), dtype=acc), student[0].new_empty((K * B * 2,), dtype=acc)


@torch.library.custom_op("lwkd_triton::map_discrepancy_backward", mutates_args=())
def map_discrepancy_backward_op(grad: torch.Tensor, student: List[torch.Tensor],
                                teacher: List[torch.Tensor], rowstats: torch.Tensor, metric: str,
                                beta: float, eps: float) -> List[torch.Tensor]:
    with _guard(student, "map_discrepancy_backward"):
        return _map_backward_impl(grad, student, teacher, rowstats, metric, beta, eps)


@map_discrepancy_backward_op.register_fake
def _map_backward_fake(grad, student, teacher, rowstats, metric, beta, eps):
    return [torch.empty_like(x) for x in student]


def _map_setup(ctx, inputs, output):
    student, teacher, metric, beta, eps = inputs
    ctx.K = len(student)
    ctx.args = (metric, beta, eps)
    ctx.mark_non_differentiable(output[1])  # row statistics, kept for the backward only
    ctx.save_for_backward(*student, *teacher, output[1])


def _map_backward(ctx, grad_d, _grad_stats):
    K = ctx.K
    saved = ctx.saved_tensors
    if grad_d is None:
        grads = [None] * K
    else:
        grads = torch.ops.lwkd_triton.map_discrepancy_backward(
            grad_d, list(saved[:K]), list(saved[K:2 * K]), saved[2 * K], *ctx.args)
    return list(grads), [None] * K, None, None, None


map_discrepancy_op.register_autograd(_map_backward, setup_context=_map_setup)
