"""Attention discrepancy on Triton (SPEC section 1): the map, row and gradient kernels, their
host code (forward / backward), and the ``lwkd_triton::attention_discrepancy`` ops, defined with
the native schema and served by the native fake kernels and autograd (lwkd_fast.registry).  The
design is described in lwkd_fast.triton.discrepancy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference, registry
from ._common import sqrt_rn
from ._jit import (A_NCOL, JSD, _A_KOFF, _A_MSPTR, _A_MTPTR, _A_N, _A_NCOL, _A_ORIG, _A_SC,
    _A_SPTR, _A_SSB, _A_SSC, _A_SSN, _A_TC, _A_TPTR, _A_TSB, _A_TSC, _A_TSN, _H_BETA, _H_EPS, _H_P,
    _H_TAU, _abs_pow_grad, _base, _chan_mean, _from_acc, _inv_clamp, _jsd_grad_ps, _jsd_term, _layer_tile,
    _load_tile, _map_row, _max, _param, _store_tile, _sum, _tile_ptrs, _to_acc, _unless_overflow)
from ._host import (CONFIG, _TL_DTYPES, _Table, _acc_dtype, _blocks, _cdiv, _check_features_nonempty,
    _check_params, _check_saved, _feat_desc, _grad_view, _guard, _launch, _metric_code, _next_pow2,
    _pair_lists, _pos_chunk, _pow_mode, _scatter_back, _store_mode)


# ------------------------------------------------------------------------------------------------
# Attention: forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _strides(row, COL_SC: tl.constexpr, COL_SN: tl.constexpr, DIV: tl.constexpr):
    """(channel stride, position stride) of a tensor of the layer row, with their divisibility."""
    return tl.multiple_of(tl.load(row + COL_SC), DIV), tl.multiple_of(tl.load(row + COL_SN), DIV)


@triton.jit
def _maps_block(offs, mask, MASK_N: tl.constexpr, s_base, s_C, s_sc, s_sn, t_base, t_C, t_sc, t_sn,
                ms, mt, p, S_BF16: tl.constexpr, T_BF16: tl.constexpr, ACC: tl.constexpr,
                POW_MODE: tl.constexpr, S_LAYOUT: tl.constexpr, T_LAYOUT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    a_s = _chan_mean(s_base, s_C, s_sc, s_sn, offs, mask, p, S_BF16, ACC, POW_MODE, S_LAYOUT, BLOCK_N,
                     BLOCK_C, MASK_N)
    a_t = _chan_mean(t_base, t_C, t_sc, t_sn, offs, mask, p, T_BF16, ACC, POW_MODE, T_LAYOUT, BLOCK_N,
                     BLOCK_C, MASK_N)
    tl.store(ms + offs, a_s, mask=mask)
    tl.store(mt + offs, a_t, mask=mask)


@triton.jit
def _attn_maps_kernel(hdr, tab, n_layers, tile0,
                      S_DT: tl.constexpr, T_DT: tl.constexpr, S_BF16: tl.constexpr,
                      T_BF16: tl.constexpr, ACC: tl.constexpr, POW_MODE: tl.constexpr,
                      S_LAYOUT: tl.constexpr, T_LAYOUT: tl.constexpr, S_DIV: tl.constexpr,
                      S_ALIGN: tl.constexpr, T_DIV: tl.constexpr, T_ALIGN: tl.constexpr,
                      KPAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    _gt, row, b, _ci, _nch, N, i_begin, i_full, i_end = _layer_tile(tab, n_layers, tile0, _A_NCOL, KPAD, BLOCK_N)
    p = _param(hdr, _H_P, ACC)

    s_base = _base(row, _A_SPTR, _A_SSB, b, S_DT, S_DIV, S_ALIGN)
    s_C = tl.load(row + _A_SC)
    s_sc, s_sn = _strides(row, _A_SSC, _A_SSN, S_DIV)
    t_base = _base(row, _A_TPTR, _A_TSB, b, T_DT, T_DIV, T_ALIGN)
    t_C = tl.load(row + _A_TC)
    t_sc, t_sn = _strides(row, _A_TSC, _A_TSN, T_DIV)
    ms = _map_row(row, _A_MSPTR, b, N, ACC)
    mt = _map_row(row, _A_MTPTR, b, N, ACC)

    for i0 in range(i_begin, i_full, BLOCK_N):  # full position blocks: no mask along positions
        offs = i0 + tl.arange(0, BLOCK_N)
        _maps_block(offs, offs < i_end, False, s_base, s_C, s_sc, s_sn, t_base, t_C, t_sc, t_sn, ms, mt, p,
                    S_BF16, T_BF16, ACC, POW_MODE, S_LAYOUT, T_LAYOUT, BLOCK_N, BLOCK_C)
    for i0 in range(i_full, i_end, BLOCK_N):    # ragged tail (at most one block)
        offs = i0 + tl.arange(0, BLOCK_N)
        _maps_block(offs, offs < i_end, True, s_base, s_C, s_sc, s_sn, t_base, t_C, t_sc, t_sn, ms, mt, p,
                    S_BF16, T_BF16, ACC, POW_MODE, S_LAYOUT, T_LAYOUT, BLOCK_N, BLOCK_C)


@triton.jit
def _valid(mk, idx, m, ACC: tl.constexpr, MASKED: tl.constexpr):
    """1 at a valid location (the mask row ``mk``; every location in range without a mask), else 0."""
    if MASKED:
        return tl.load(mk + idx, mask=m, other=0.0)
    else:
        return tl.where(m, 1.0, 0.0).to(ACC)


@triton.jit
def _row_stats(ms, mt, mk, N, eps, inv_tau, ACC: tl.constexpr, METRIC: tl.constexpr,
               SOFTMAX: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row normalisers of two maps: (inv_s, inv_t, r_s, r_t, max_s, max_t, n_valid).

    l2 metrics: r = ||a||, inv = 1/max(r, eps); JSD-sum: r = sum a, inv = 1/max(r, eps);
    JSD-softmax: max = max a, r = sum exp((a - max)/tau), inv = 1/r.  Every sum runs over the
    valid locations of the mask row ``mk`` only (SPEC section 2, "Masked locations").
    """
    offs = tl.arange(0, BLOCK)
    zero = tl.full([BLOCK], 0, ACC)
    nv = zero
    if SOFTMAX:
        vs = zero - float("inf")
        vt = zero - float("inf")
        for i0 in range(0, N, BLOCK):
            idx = i0 + offs
            ok = _valid(mk, idx, idx < N, ACC, MASKED) != 0
            vs = tl.maximum(vs, tl.load(ms + idx, mask=ok, other=-float("inf")))
            vt = tl.maximum(vt, tl.load(mt + idx, mask=ok, other=-float("inf")))
        mx_s = _max(vs)
        mx_t = _max(vt)
        zs = zero
        zt = zero
        for i0 in range(0, N, BLOCK):
            idx = i0 + offs
            v = _valid(mk, idx, idx < N, ACC, MASKED)
            ok = v != 0
            nv += v
            zs += tl.where(ok, tl.exp((tl.load(ms + idx, mask=ok, other=0.0) - mx_s) * inv_tau), 0.0)
            zt += tl.where(ok, tl.exp((tl.load(mt + idx, mask=ok, other=0.0) - mx_t) * inv_tau), 0.0)
        r_s = _sum(zs)
        r_t = _sum(zt)
        inv_s = 1.0 / tl.where(r_s > 0, r_s, 1.0)  # r = 0 only without a valid location (P = 0 there)
        inv_t = 1.0 / tl.where(r_t > 0, r_t, 1.0)
    else:
        acc_s = zero
        acc_t = zero
        for i0 in range(0, N, BLOCK):
            idx = i0 + offs
            m = idx < N
            v = _valid(mk, idx, m, ACC, MASKED)
            nv += v
            a = tl.load(ms + idx, mask=m, other=0.0)
            c = tl.load(mt + idx, mask=m, other=0.0)
            if METRIC == 2:
                acc_s += v * a
                acc_t += v * c
            else:
                acc_s += v * a * a
                acc_t += v * c * c
        r_s = _sum(acc_s)
        r_t = _sum(acc_t)
        if METRIC != 2:
            r_s = sqrt_rn(r_s)
            r_t = sqrt_rn(r_t)
        inv_s = _inv_clamp(r_s, eps)
        inv_t = _inv_clamp(r_t, eps)
        mx_s = r_s * 0.0
        mx_t = r_t * 0.0
    return inv_s, inv_t, r_s, r_t, mx_s, mx_t, _sum(nv)


@triton.jit
def _distribution(a, inv, mx, inv_tau, v, SOFTMAX: tl.constexpr):
    """P at one location (lwkd's distribution): 0 where the mask ``v`` is 0."""
    if SOFTMAX:
        return tl.where(v != 0, tl.exp((a - mx) * inv_tau) * inv, 0.0)
    else:
        return tl.where(v != 0, a * inv, 0.0)


@triton.jit
def _at_scale(nv, METRIC: tl.constexpr):
    """"at": 1/N_valid (0 without a valid location: d = 0); 1 for the other metrics."""
    if METRIC == 0:
        return tl.where(nv > 0, 1.0 / tl.where(nv > 0, nv, 1.0), 0.0)
    else:
        return nv * 0.0 + 1.0


@triton.jit
def _row_setup(hdr, tab, B, masks, ACC: tl.constexpr, METRIC: tl.constexpr, SOFTMAX: tl.constexpr,
               MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """The (layer, sample) row of this program, shared by the forward and backward row kernels:
    its layer k, sample b, N, the parameters, the map and mask rows and their statistics."""
    pid = tl.program_id(0).to(tl.int64)
    j = pid // B
    b = pid - j * B
    row = tab + j * _A_NCOL
    N = tl.load(row + _A_N)
    k = tl.load(row + _A_ORIG)
    eps = _param(hdr, _H_EPS, ACC)
    beta = _param(hdr, _H_BETA, ACC)
    inv_tau = 1.0 / _param(hdr, _H_TAU, ACC)
    ms = _map_row(row, _A_MSPTR, b, N, ACC)
    mt = _map_row(row, _A_MTPTR, b, N, ACC)
    mk = masks + tl.load(row + _A_KOFF) + b * N
    inv_s, inv_t, r_s, r_t, mx_s, mx_t, nv = _row_stats(ms, mt, mk, N, eps, inv_tau, ACC, METRIC, SOFTMAX,
                                                        MASKED, BLOCK)
    return k, b, N, eps, beta, inv_tau, ms, mt, mk, inv_s, inv_t, r_s, r_t, mx_s, mx_t, nv


@triton.jit
def _attn_rows_fwd_kernel(hdr, tab, B, masks, d, ACC: tl.constexpr, METRIC: tl.constexpr,
                          SOFTMAX: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    k, b, N, eps, beta, inv_tau, ms, mt, mk, inv_s, inv_t, r_s, r_t, mx_s, mx_t, nv = _row_setup(
        hdr, tab, B, masks, ACC, METRIC, SOFTMAX, MASKED, BLOCK)

    offs = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0, ACC)
    for i0 in range(0, N, BLOCK):
        idx = i0 + offs
        m = idx < N
        v = _valid(mk, idx, m, ACC, MASKED)
        a = tl.load(ms + idx, mask=m, other=0.0)
        c = tl.load(mt + idx, mask=m, other=0.0)
        if METRIC == 2:
            ps = _distribution(a, inv_s, mx_s, inv_tau, v, SOFTMAX)
            pt = _distribution(c, inv_t, mx_t, inv_tau, v, SOFTMAX)
            acc += tl.where(m, _jsd_term(ps, pt, beta), 0.0)
        else:
            diff = a * inv_s - c * inv_t
            acc += tl.where(m, v * diff * diff, 0.0)
    total = _sum(acc) * _at_scale(nv, METRIC)
    tl.store(d + k * B + b, _unless_overflow(total, r_s, r_t))


# ------------------------------------------------------------------------------------------------
# Attention: backward
# ------------------------------------------------------------------------------------------------

_RS = tl.constexpr(8)  # values per row in the backward row-scalar buffer


@triton.jit
def _attn_rows_bwd_kernel(hdr, tab, B, masks, grad, rowscal, ACC: tl.constexpr,
                          METRIC: tl.constexpr, SOFTMAX: tl.constexpr, MASKED: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Row statistics and the projection <g_P, P> (JSD) or [r_s >= eps] <q_s, g_q> (at)."""
    k, b, N, eps, beta, inv_tau, ms, mt, mk, inv_s, inv_t, r_s, r_t, mx_s, mx_t, nv = _row_setup(
        hdr, tab, B, masks, ACC, METRIC, SOFTMAX, MASKED, BLOCK)
    gd = tl.load(grad + k * B + b).to(ACC)
    tsg = 2.0 * gd * _at_scale(nv, METRIC)

    offs = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0, ACC)
    for i0 in range(0, N, BLOCK):
        idx = i0 + offs
        m = idx < N
        v = _valid(mk, idx, m, ACC, MASKED)
        a = tl.load(ms + idx, mask=m, other=0.0)
        c = tl.load(mt + idx, mask=m, other=0.0)
        if METRIC == 2:
            ps = _distribution(a, inv_s, mx_s, inv_tau, v, SOFTMAX)
            pt = _distribution(c, inv_t, mx_t, inv_tau, v, SOFTMAX)
            acc += tl.where(m, gd * _jsd_grad_ps(ps, pt, beta) * ps, 0.0)
        else:
            qs = a * inv_s
            acc += tl.where(m, v * qs * (tsg * (qs - c * inv_t)), 0.0)
    proj = _sum(acc)
    if not SOFTMAX:
        proj = tl.where(r_s >= eps, proj, 0.0)
    out = rowscal + (k * B + b) * _RS
    tl.store(out + 0, inv_s)
    tl.store(out + 1, inv_t)
    tl.store(out + 2, proj)
    tl.store(out + 3, mx_s)
    tl.store(out + 4, mx_t)
    tl.store(out + 5, gd)
    tl.store(out + 6, tsg)


@triton.jit
def _grad_chan(h, x_base, g_base, cc, C, x_sc, x_sn, g_sc, g_sn, offs, mask, p, S_DT: tl.constexpr,
               S_BF16: tl.constexpr, STORE: tl.constexpr, OPT: tl.constexpr, POW_MODE: tl.constexpr,
               X_LAYOUT: tl.constexpr, G_LAYOUT: tl.constexpr, MASK_C: tl.constexpr, MASK_N: tl.constexpr):
    x = _load_tile(_tile_ptrs(x_base, cc, offs, x_sc, x_sn, X_LAYOUT), cc, C, mask, MASK_C, MASK_N)
    g = h[None, :] * _abs_pow_grad(_to_acc(x, S_BF16, OPT), p, POW_MODE)
    _store_tile(_tile_ptrs(g_base, cc, offs, g_sc, g_sn, G_LAYOUT), _from_acc(g, S_DT, STORE), cc, C, mask,
                MASK_C, MASK_N)


@triton.jit
def _grad_block(offs, mask, MASK_N: tl.constexpr, ms, mt, mk, inv_s, inv_t, proj, mx_s, mx_t, gd, tsg,
                inv_tau, beta, inv_c, x_base, g_base, C, x_sc, x_sn, g_sc, g_sn, p, S_DT: tl.constexpr,
                S_BF16: tl.constexpr, STORE: tl.constexpr, ACC: tl.constexpr, OPT: tl.constexpr,
                POW_MODE: tl.constexpr, METRIC: tl.constexpr, SOFTMAX: tl.constexpr, MASKED: tl.constexpr,
                X_LAYOUT: tl.constexpr, G_LAYOUT: tl.constexpr, BLOCK_C: tl.constexpr):
    a = tl.load(ms + offs, mask=mask, other=0.0)
    c = tl.load(mt + offs, mask=mask, other=0.0)
    v = _valid(mk, offs, mask, ACC, MASKED)
    if METRIC == 2:
        ps = _distribution(a, inv_s, mx_s, inv_tau, v, SOFTMAX)
        pt = _distribution(c, inv_t, mx_t, inv_tau, v, SOFTMAX)
        gp = gd * _jsd_grad_ps(ps, pt, beta)
        if SOFTMAX:
            ga = ps * (gp - proj) * inv_tau        # lwkd::softmax_grad_a
        else:
            ga = (gp - proj) * inv_s               # lwkd::sumnorm_grad_a
    else:
        qs = a * inv_s
        gq = tsg * (qs - c * inv_t)                # lwkd::sqdist_grad_q
        ga = (gq - qs * proj) * inv_s              # lwkd::sqdist_grad_a
    h = (v * ga * inv_c).to(OPT)
    offs_c = tl.arange(0, BLOCK_C)
    if X_LAYOUT == 1 and G_LAYOUT == 1:  # channels contiguous: unmasked full channel blocks
        c_full = C - C % BLOCK_C
        for c0 in range(0, c_full, BLOCK_C):
            _grad_chan(h, x_base, g_base, c0 + offs_c, C, x_sc, x_sn, g_sc, g_sn, offs, mask,
                       p, S_DT, S_BF16, STORE, OPT, POW_MODE, X_LAYOUT, G_LAYOUT, False, MASK_N)
        for c0 in range(c_full, C, BLOCK_C):
            _grad_chan(h, x_base, g_base, c0 + offs_c, C, x_sc, x_sn, g_sc, g_sn, offs, mask, p, S_DT,
                       S_BF16, STORE, OPT, POW_MODE, X_LAYOUT, G_LAYOUT, True, MASK_N)
    else:
        for c0 in range(0, C, BLOCK_C):
            _grad_chan(h, x_base, g_base, c0 + offs_c, C, x_sc, x_sn, g_sc, g_sn, offs, mask, p, S_DT,
                       S_BF16, STORE, OPT, POW_MODE, X_LAYOUT, G_LAYOUT, True, MASK_N)


@triton.jit
def _attn_grad_kernel(hdr, tab, n_layers, tile0, B, masks, rowscal,
                      S_DT: tl.constexpr, S_BF16: tl.constexpr, STORE: tl.constexpr, ACC: tl.constexpr,
                      OPT: tl.constexpr, POW_MODE: tl.constexpr, METRIC: tl.constexpr,
                      SOFTMAX: tl.constexpr, MASKED: tl.constexpr, X_LAYOUT: tl.constexpr, G_LAYOUT: tl.constexpr,
                      X_DIV: tl.constexpr, X_ALIGN: tl.constexpr, G_DIV: tl.constexpr,
                      G_ALIGN: tl.constexpr, KPAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Student gradient of one (layer, sample, chunk of positions) tile; the table's second
    tensor slot holds the gradient buffer (B, C, N) view."""
    _gt, row, b, _ci, _nch, N, i_begin, i_full, i_end = _layer_tile(tab, n_layers, tile0, _A_NCOL, KPAD, BLOCK_N)
    k = tl.load(row + _A_ORIG)
    p = _param(hdr, _H_P, OPT)
    inv_tau = 1.0 / _param(hdr, _H_TAU, ACC)
    beta = _param(hdr, _H_BETA, ACC)

    rs = rowscal + (k * B + b) * _RS
    inv_s = tl.load(rs + 0)
    inv_t = tl.load(rs + 1)
    proj = tl.load(rs + 2)
    mx_s = tl.load(rs + 3)
    mx_t = tl.load(rs + 4)
    gd = tl.load(rs + 5)
    tsg = tl.load(rs + 6)

    x_base = _base(row, _A_SPTR, _A_SSB, b, S_DT, X_DIV, X_ALIGN)
    C = tl.load(row + _A_SC)
    x_sc, x_sn = _strides(row, _A_SSC, _A_SSN, X_DIV)
    g_base = _base(row, _A_TPTR, _A_TSB, b, S_DT, G_DIV, G_ALIGN)
    g_sc, g_sn = _strides(row, _A_TSC, _A_TSN, G_DIV)
    ms = _map_row(row, _A_MSPTR, b, N, ACC)
    mt = _map_row(row, _A_MTPTR, b, N, ACC)
    mk = masks + tl.load(row + _A_KOFF) + b * N
    inv_c = 1.0 / C.to(ACC)

    for i0 in range(i_begin, i_full, BLOCK_N):
        offs = i0 + tl.arange(0, BLOCK_N)
        _grad_block(offs, offs < i_end, False, ms, mt, mk, inv_s, inv_t, proj, mx_s, mx_t, gd, tsg, inv_tau,
                    beta, inv_c, x_base, g_base, C, x_sc, x_sn, g_sc, g_sn, p, S_DT, S_BF16, STORE, ACC, OPT,
                    POW_MODE, METRIC, SOFTMAX, MASKED, X_LAYOUT, G_LAYOUT, BLOCK_C)
    for i0 in range(i_full, i_end, BLOCK_N):
        offs = i0 + tl.arange(0, BLOCK_N)
        _grad_block(offs, offs < i_end, True, ms, mt, mk, inv_s, inv_t, proj, mx_s, mx_t, gd, tsg, inv_tau,
                    beta, inv_c, x_base, g_base, C, x_sc, x_sn, g_sc, g_sn, p, S_DT, S_BF16, STORE, ACC, OPT,
                    POW_MODE, METRIC, SOFTMAX, MASKED, X_LAYOUT, G_LAYOUT, BLOCK_C)


# ---- attention ---------------------------------------------------------------------------------


def _mask_buffer(op, masks, Ns, B, acc, dev):
    """The masks of the K pairs as one flat 0/1 buffer, layer k's (B, N_k) block at offset
    B * sum_{j<k} N_j (table column _A_KOFF; ones for a pair without mask), or None when no pair
    has one."""
    if masks is None or all(m is None for m in masks):
        return None
    if len(masks) != len(Ns):
        raise ValueError(f"lwkd_triton::{op}: {len(masks)} masks for {len(Ns)} layer pairs")
    parts = []
    for k, (m, N) in enumerate(zip(masks, Ns)):
        if m is None:
            parts.append(torch.ones(B * N, dtype=acc, device=dev))
            continue
        if tuple(m.shape) != (B, N) or m.device != dev:
            raise ValueError(f"lwkd_triton::{op}: pair {k}: masks[{k}] has shape {tuple(m.shape)} on {m.device} "
                             f"but the pair has (B, N) = ({B}, {N}) on {dev}")
        parts.append(m.to(acc).reshape(-1))
    return torch.cat(parts)


def _mask_offsets(Ns, B):
    """Offset of each layer's (B, N_k) block in the flat mask buffer."""
    offs, off = [], 0
    for N in Ns:
        offs.append(off)
        off += B * N
    return offs


def _check_saved_maps(op, maps_s, maps_t, K, B, Ns, dev):
    """The per-layer (B, N_k) maps the forward returned: K of each side, contiguous, in the
    accumulation dtype (float32 or float64, the dtype of maps_s[0]), on the students' device."""
    for name, maps in (("maps_s", maps_s), ("maps_t", maps_t)):
        if len(maps) != K:
            raise ValueError(f"lwkd_triton::{op}: {len(maps)} {name} tensors for {K} layer pairs")
    acc = maps_s[0].dtype
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"lwkd_triton::{op}: maps_s has dtype {acc}; the forward saves float32 or float64 maps")
    for k in range(K):
        for name, maps in (("maps_s", maps_s), ("maps_t", maps_t)):
            _check_saved(op, f"pair {k}: {name}", maps[k], acc, dev, B * Ns[k])
    return acc


def _attention_forward_impl(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks=None):
    """(d (K, B), maps_s, maps_t): the per-layer (B, N_k) maps, kept for the backward.  ``masks``:
    one (B, N_k) 0/1 mask of valid locations, or None, per pair (SPEC section 2)."""
    op = "attention_discrepancy"
    mcode = _metric_code(metric, True)
    _check_params(op, beta, tau, eps, normalize, p)
    B = _pair_lists(student, teacher, op)
    _check_features_nonempty(student, op, "student", channel_dim)
    _check_features_nonempty(teacher, op, "teacher", channel_dim)
    K = len(student)
    acc = _acc_dtype(list(student) + list(teacher))
    dev = student[0].device
    s3 = [reference.to_bcn(x, channel_dim) for x in student]
    t3 = [reference.to_bcn(x, channel_dim) for x in teacher]
    Ns = []
    for k in range(K):
        if s3[k].shape[2] != t3[k].shape[2]:
            raise ValueError(f"lwkd_triton::{op}: pair {k}: student has {s3[k].shape[2]} locations but "
                             f"teacher has {t3[k].shape[2]}")
        Ns.append(s3[k].shape[2])
    maps_s = [torch.empty((B, N), dtype=acc, device=dev) for N in Ns]
    maps_t = [torch.empty((B, N), dtype=acc, device=dev) for N in Ns]
    d = torch.empty((K, B), dtype=acc, device=dev)
    mbuf = _mask_buffer(op, masks, Ns, B, acc, dev)

    table = _Table(A_NCOL, (p, beta, tau, eps))
    keyed = []
    for k, koff in enumerate(_mask_offsets(Ns, B)):
        sd, sl, sdiv, salign = _feat_desc(s3[k])
        td, tlay, tdiv, talign = _feat_desc(t3[k])
        bn, bc = _blocks(sl, tlay)
        chunk = _pos_chunk(Ns[k], s3[k].shape[1] + t3[k].shape[1], bn)
        nch = _cdiv(Ns[k], chunk)
        key = (str(student[k].dtype), str(teacher[k].dtype), sl, tlay, sdiv, salign, tdiv, talign)
        maps = [maps_s[k].data_ptr(), maps_t[k].data_ptr()]
        keyed.append((key, [0, Ns[k], chunk, nch, k, koff] + maps + sd + td, B * nch))
    table.build(keyed, dev, n_hints=4)

    pm = _pow_mode(p)
    for key, r0, r1, tile0, ntiles in table.groups:
        sdt, tdt = getattr(torch, key[0][6:]), getattr(torch, key[1][6:])
        bn, bc = _blocks(key[2], key[3])
        _launch(_attn_maps_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0,
                S_DT=_TL_DTYPES[sdt], T_DT=_TL_DTYPES[tdt],
                S_BF16=sdt == torch.bfloat16, T_BF16=tdt == torch.bfloat16, ACC=_TL_DTYPES[acc],
                POW_MODE=pm, S_LAYOUT=key[2], T_LAYOUT=key[3], S_DIV=key[4], S_ALIGN=key[5],
                T_DIV=key[6], T_ALIGN=key[7], KPAD=_next_pow2(r1 - r0), BLOCK_N=bn, BLOCK_C=bc)
    _launch(_attn_rows_fwd_kernel, (K * B,), table.hdr, table.all_rows, B, d if mbuf is None else mbuf, d,
            ACC=_TL_DTYPES[acc], METRIC=mcode, SOFTMAX=(mcode == JSD and normalize == "softmax"),
            MASKED=mbuf is not None, BLOCK=CONFIG.block_rows)
    return d, maps_s, maps_t


def _attention_backward_impl(grad, student, maps_s, maps_t, p, metric, beta, normalize, tau, eps,
                             channel_dim, masks=None):
    op = "attention_discrepancy_backward"
    mcode = _metric_code(metric, True)
    _check_params(op, beta, tau, eps, normalize, p)
    B = _pair_lists(student, student, op)
    _check_features_nonempty(student, op, "student", channel_dim)
    K = len(student)
    dev = student[0].device
    if tuple(grad.shape) != (K, B):
        raise ValueError(f"lwkd_triton::{op}: grad must be ({K}, {B}), got {tuple(grad.shape)}")
    s3 = [reference.to_bcn(x, channel_dim) for x in student]
    Ns = [x.shape[2] for x in s3]
    acc = _check_saved_maps(op, maps_s, maps_t, K, B, Ns, dev)
    grad = grad.to(device=dev, dtype=acc).contiguous()
    grads, bufs = [], []
    table = _Table(A_NCOL, (p, beta, tau, eps))
    keyed = []
    for k, koff in enumerate(_mask_offsets(Ns, B)):
        g, g3, copy_back = _grad_view(student[k], channel_dim)
        grads.append(g)
        bufs.append((g3, copy_back))
        xd, xl, xdiv, xalign = _feat_desc(s3[k])
        gdsc, gl, gdiv, galign = _feat_desc(g3)
        bn, bc = _blocks(xl, gl)
        chunk = _pos_chunk(Ns[k], s3[k].shape[1], bn)
        nch = _cdiv(Ns[k], chunk)
        key = (str(student[k].dtype), xl, gl, xdiv, xalign, gdiv, galign)
        maps = [maps_s[k].data_ptr(), maps_t[k].data_ptr()]
        keyed.append((key, [0, Ns[k], chunk, nch, k, koff] + maps + xd + gdsc, B * nch))
    table.build(keyed, dev, n_hints=4)

    softmax = mcode == JSD and normalize == "softmax"
    mbuf = _mask_buffer(op, masks, Ns, B, acc, dev)
    rowscal = torch.empty(K * B * 8, dtype=acc, device=dev)
    mptr = rowscal if mbuf is None else mbuf
    _launch(_attn_rows_bwd_kernel, (K * B,), table.hdr, table.all_rows, B, mptr, grad, rowscal,
            ACC=_TL_DTYPES[acc], METRIC=mcode, SOFTMAX=softmax, MASKED=mbuf is not None, BLOCK=CONFIG.block_rows)
    pm = _pow_mode(p)
    for key, r0, r1, tile0, ntiles in table.groups:
        sdt = getattr(torch, key[0][6:])
        opt = torch.float64 if sdt == torch.float64 else torch.float32
        bn, bc = _blocks(key[1], key[2])
        _launch(_attn_grad_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0, B,
                mptr, rowscal, S_DT=_TL_DTYPES[sdt], S_BF16=sdt == torch.bfloat16,
                STORE=_store_mode(sdt), ACC=_TL_DTYPES[acc], OPT=_TL_DTYPES[opt], POW_MODE=pm,
                METRIC=mcode, SOFTMAX=softmax, MASKED=mbuf is not None, X_LAYOUT=key[1], G_LAYOUT=key[2], X_DIV=key[3],
                X_ALIGN=key[4], G_DIV=key[5], G_ALIGN=key[6], KPAD=_next_pow2(r1 - r0), BLOCK_N=bn,
                BLOCK_C=bc)
    for k in range(K):
        g3, copy_back = bufs[k]
        if copy_back:
            _scatter_back(grads[k], g3, channel_dim)
    return grads


# ------------------------------------------------------------------------------------------------
# The ops: the native schema (csrc/ops.cpp), implemented here for CPU tensors (interpreter) and
# CUDA tensors; their fake kernels and autograd are the native ones (lwkd_fast.registry)
# ------------------------------------------------------------------------------------------------

SCHEMAS = {
    "attention_discrepancy": (
        "attention_discrepancy(Tensor[] student, Tensor[] teacher, float p, str metric, float beta, "
        "str normalize, float tau, float eps, int channel_dim, Tensor?[]? masks=None) -> (Tensor, Tensor[], Tensor[])"),
    "attention_discrepancy_backward": (
        "attention_discrepancy_backward(Tensor grad, Tensor[] student, Tensor[] maps_s, "
        "Tensor[] maps_t, float p, str metric, float beta, str normalize, float tau, float eps, "
        "int channel_dim, Tensor?[]? masks=None) -> Tensor[]"),
}


def _under_guard(op, impl, student_pos):
    """``impl`` run under the device guard of its students (argument ``student_pos``)."""
    def run(*args, **kwargs):
        with _guard(args[student_pos], op):
            return impl(*args, **kwargs)

    return run


_LIB = torch.library.Library("lwkd_triton", "FRAGMENT")
for _name, _impl, _student_pos in (("attention_discrepancy", _attention_forward_impl, 0),
                                   ("attention_discrepancy_backward", _attention_backward_impl, 1)):
    _LIB.define(SCHEMAS[_name])
    for _key in ("CPU", "CUDA"):
        _LIB.impl(_name, _under_guard(_name, _impl, _student_pos), _key)
registry.register_attention_ops("lwkd_triton")
