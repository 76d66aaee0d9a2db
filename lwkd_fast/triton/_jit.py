"""Work-table layout and the @triton.jit helpers shared by the attention and map kernels of
lwkd_fast.triton.discrepancy (the arithmetic of csrc/common/lwkd_common.h, vectorised).

The table column constants are tl.constexpr so that the kernels can index rows with them; the
host code (._host, .attention, .maps) builds rows with the same indices.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------
# Work-table layout (int64).  Header: float parameters as float64 bit patterns.
# ------------------------------------------------------------------------------------------------
_H_P = tl.constexpr(0)
_H_BETA = tl.constexpr(1)
_H_TAU = tl.constexpr(2)
_H_EPS = tl.constexpr(3)
HDR = 4

# the columns every layer row begins with (attention and map rows alike; _layer_tile reads them)
_R_TSTART = tl.constexpr(0)   # global index of the layer's first tile
_R_N = tl.constexpr(1)        # positions (elements) per sample
_R_CHUNK = tl.constexpr(2)    # positions per tile
_R_NCH = tl.constexpr(3)      # tiles per sample

# attention layer rows
_A_TSTART = _R_TSTART
_A_N = _R_N
_A_CHUNK = _R_CHUNK
_A_NCH = _R_NCH
_A_ORIG = tl.constexpr(4)     # layer index k in the caller's order
_A_KOFF = tl.constexpr(5)     # element offset of the layer's (B, N) block in the flat mask buffer
_A_MSPTR = tl.constexpr(6)    # the layer's contiguous (B, N) maps: student, teacher (pointers)
_A_MTPTR = tl.constexpr(7)
_A_SPTR = tl.constexpr(8)     # student (B, C, N): pointer, C, strides
_A_SC = tl.constexpr(9)
_A_SSB = tl.constexpr(10)
_A_SSC = tl.constexpr(11)
_A_SSN = tl.constexpr(12)
_A_TPTR = tl.constexpr(13)    # teacher (forward) / gradient (backward) (B, C, N)
_A_TC = tl.constexpr(14)
_A_TSB = tl.constexpr(15)
_A_TSC = tl.constexpr(16)
_A_TSN = tl.constexpr(17)
A_NCOL = 18
_A_NCOL = tl.constexpr(A_NCOL)

# map-op layer rows
_M_TSTART = _R_TSTART
_M_N = _R_N
_M_CHUNK = _R_CHUNK
_M_NCH = _R_NCH
_M_ORIG = tl.constexpr(4)
_M_SPTR = tl.constexpr(5)
_M_SSB = tl.constexpr(6)
_M_TPTR = tl.constexpr(7)
_M_TSB = tl.constexpr(8)
_M_GPTR = tl.constexpr(9)
_M_GSB = tl.constexpr(10)
M_NCOL = 11
_M_NCOL = tl.constexpr(M_NCOL)
_M_NCH_I = 3  # host-side index of the NCH column

_I64_MAX = tl.constexpr(9223372036854775807)

# metric codes (as in lwkd_common.h)
AT, COS, JSD = 0, 1, 2
# memory layouts of a (B, C, N) feature view
POS_CONTIG, CHAN_CONTIG, GENERAL = 0, 1, 2
# how a value is stored: plain cast, bf16 via float32 (GPU), bf16 with explicit rounding (interpreter)
STORE_CAST, STORE_BF16, STORE_BF16_RNE = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# Device helpers (the arithmetic of csrc/common/lwkd_common.h, vectorised)
# ------------------------------------------------------------------------------------------------


# Reductions: tl.reduce with the combiners of tl.sum / tl.max, rather than tl.sum / tl.max (or
# tl.zeros) themselves.  Those are @jit functions of triton.language, created in whatever mode
# triton was first imported in, and `lwkd-fast check --interpret` can only set TRITON_INTERPRET=1
# after torch._dynamo has imported triton: compiled-mode helpers cannot be called from interpreted
# kernels.  The combiners are never called by the interpreter -- it recognises them by identity and
# reduces with numpy (any other combiner takes its element-by-element Python path, ~100x slower)
# -- and on a GPU they compile exactly as inside tl.sum / tl.max.
@triton.jit
def _sum(x):
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _max(x):
    return tl.reduce(x, 0, tl.standard._elementwise_max)


@triton.jit
def _find_layer(tab, n_layers, gt, COL: tl.constexpr, NCOL: tl.constexpr, KPAD: tl.constexpr):
    """Index (within ``tab``) of the layer whose tile range holds global tile ``gt``."""
    ks = tl.arange(0, KPAD)
    starts = tl.load(tab + ks * NCOL + COL, mask=ks < n_layers, other=_I64_MAX)
    return _sum((starts <= gt).to(tl.int32)) - 1


@triton.jit
def _layer_tile(tab, n_layers, tile0, NCOL: tl.constexpr, KPAD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of a work table whose rows are NCOL wide: (global tile gt, layer row,
    sample b, chunk ci of nch per sample, positions N, and the chunk's begin, end of its full
    BLOCK blocks, and end)."""
    gt = tl.program_id(0).to(tl.int64) + tile0
    row = tab + _find_layer(tab, n_layers, gt, _R_TSTART, NCOL, KPAD) * NCOL
    local = gt - tl.load(row + _R_TSTART)
    N = tl.load(row + _R_N)
    chunk = tl.load(row + _R_CHUNK)
    nch = tl.load(row + _R_NCH)
    b = local // nch
    ci = local - b * nch
    i_begin = tl.multiple_of(ci * chunk, BLOCK)  # the host makes chunk a multiple of BLOCK
    i_end = tl.minimum(i_begin + chunk, N)
    i_full = i_begin + (i_end - i_begin) // BLOCK * BLOCK
    return gt, row, b, ci, nch, N, i_begin, i_full, i_end


@triton.jit
def _param(hdr, idx: tl.constexpr, ACC: tl.constexpr):
    return tl.load(hdr + idx).to(tl.float64, bitcast=True).to(ACC)


@triton.jit
def _to_acc(x, IS_BF16: tl.constexpr, ACC: tl.constexpr):
    if IS_BF16:  # bf16 -> fp32 is exact; the interpreter converts bf16 only to/from fp32
        return x.to(tl.float32).to(ACC)
    else:
        return x.to(ACC)


@triton.jit
def _from_acc(v, OUT_DT: tl.constexpr, STORE: tl.constexpr):
    if STORE == 2:  # bf16, round to nearest even by bit arithmetic (interpreter)
        f = v.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(f != f, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif STORE == 1:
        return v.to(tl.float32).to(tl.bfloat16)
    else:
        return v.to(OUT_DT)


@triton.jit
def _sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _abs_pow(x, p, POW_MODE: tl.constexpr):
    """|x|^p (lwkd::abs_pow): x*x for p == 2, |x| for p == 1, 0 at x == 0 otherwise."""
    if POW_MODE == 0:
        return x * x
    elif POW_MODE == 1:
        return tl.abs(x)
    else:
        # general p: exp(p log|x|) in float64.  In float32 the argument's rounding error grows with
        # |log|x|| (30 eps for |x| ~ 1e-9), enough to break the float32 tolerance where the metric
        # cancels; libdevice.pow would do, but the interpreter that verifies these kernels lacks it.
        # (only an exact zero is special: a NaN stays NaN, as in lwkd::abs_pow)
        ax = tl.abs(x).to(tl.float64)
        pos = ax != 0
        return tl.where(pos, tl.exp(p * tl.log(tl.where(pos, ax, 1.0))), 0.0).to(x.dtype)


@triton.jit
def _abs_pow_grad(x, p, POW_MODE: tl.constexpr):
    """d|x|^p/dx (lwkd::abs_pow_grad), 0 at x == 0."""
    if POW_MODE == 0:
        return 2.0 * x
    elif POW_MODE == 1:
        return _sign(x)
    else:
        ax = tl.abs(x).to(tl.float64)  # float64 power: see _abs_pow
        pos = ax != 0
        d = tl.where(pos, p * tl.exp((p - 1.0) * tl.log(tl.where(pos, ax, 1.0))), 0.0)
        return d.to(x.dtype) * _sign(x)


@triton.jit
def _unless_overflow(d, r_s, r_t):
    """lwkd::unless_overflow: NaN when a normaliser overflowed (SPEC section 6, range)."""
    ok = ((r_s - r_s) == 0) & ((r_t - r_t) == 0)
    return tl.where(ok, d, float("nan"))


@triton.jit
def _inv_clamp(r, eps):
    """1 / max(r, eps) with the comparison of lwkd::clamp_eps (a NaN r stays NaN)."""
    return 1.0 / tl.where(r < eps, eps, r)


@triton.jit
def _jsd_term(ps, pt, beta):
    """lwkd::jsd_term: beta ps log(ps/M) + (1-beta) pt log(pt/M), 0 log 0 = 0 for exact zeros
    only (a NaN probability makes the term NaN: SPEC section 2)."""
    m = beta * ps + (1.0 - beta) * pt
    ms = tl.where(m != 0, m, 1.0)
    r = tl.where(ps != 0, beta * ps * tl.log(tl.where(ps != 0, ps, 1.0) / ms), 0.0)
    return r + tl.where(pt != 0, (1.0 - beta) * pt * tl.log(tl.where(pt != 0, pt, 1.0) / ms), 0.0)


@triton.jit
def _jsd_grad_ps(ps, pt, beta):
    """lwkd::jsd_grad_ps: beta log(ps/M) where ps != 0, else -beta if M > 0, else 0."""
    m = beta * ps + (1.0 - beta) * pt
    pos = ps != 0
    g = beta * tl.log(tl.where(pos, ps, 1.0) / tl.where(pos, m, 1.0))
    return tl.where(pos, g, tl.where(m > 0, -beta, 0.0 * beta))


# Divisibility hints (tl.multiple_of, values checked on the host) let loads along a contiguous axis
# become 16-byte vectors.  A hint attaches to the op that defines the value, so it is written where
# the value is produced: a hint on a function argument or a loop induction variable (block
# arguments, no defining op) is silently dropped.  Loops hint their lower bound instead; with a
# constexpr step the compiler derives the induction variable's divisibility from it.
# tests/triton_aot_compile.py checks for the vector loads in the generated PTX.


@triton.jit
def _base(row, COL_PTR: tl.constexpr, COL_SB: tl.constexpr, b, DT: tl.constexpr, DIV: tl.constexpr,
          ALIGN: tl.constexpr):
    """Pointer to sample b of the tensor in table columns (COL_PTR, COL_SB).  The alignment hint
    goes on the pointer (in bytes): int-to-pointer casts drop an integer's divisibility."""
    ptr = tl.multiple_of(tl.load(row + COL_PTR).to(tl.pointer_type(DT)), ALIGN)
    return ptr + b * tl.multiple_of(tl.load(row + COL_SB), DIV)


@triton.jit
def _map_row(row, COL_PTR: tl.constexpr, b, N, ACC: tl.constexpr):
    """Pointer to row b of the contiguous (B, N) map whose address is in table column COL_PTR."""
    return tl.load(row + COL_PTR).to(tl.pointer_type(ACC)) + b * N


@triton.jit
def _tile_ptrs(base, cc, offs_n, sc, sn, LAYOUT: tl.constexpr):
    """(BLOCK_C, BLOCK_N) pointers of a (C, N) strided sample; the contiguous axis is literal."""
    if LAYOUT == 0:
        return base + cc[:, None] * sc + offs_n[None, :]
    elif LAYOUT == 1:
        return base + cc[:, None] + offs_n[None, :] * sn
    else:
        return base + cc[:, None] * sc + offs_n[None, :] * sn


@triton.jit
def _load_tile(ptrs, cc, C, mask_n, MASK_C: tl.constexpr, MASK_N: tl.constexpr):
    """Masks only where needed: a mask that varies along the contiguous axis prevents vector loads,
    one broadcast along it does not."""
    if MASK_C:
        if MASK_N:
            x = tl.load(ptrs, mask=(cc < C)[:, None] & mask_n[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(cc < C)[:, None], other=0.0)
    else:
        if MASK_N:
            x = tl.load(ptrs, mask=mask_n[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, v, cc, C, mask_n, MASK_C: tl.constexpr, MASK_N: tl.constexpr):
    if MASK_C:
        if MASK_N:
            tl.store(ptrs, v, mask=(cc < C)[:, None] & mask_n[None, :])
        else:
            tl.store(ptrs, v, mask=(cc < C)[:, None])
    else:
        if MASK_N:
            tl.store(ptrs, v, mask=mask_n[None, :])
        else:
            tl.store(ptrs, v)


@triton.jit
def _chan_acc(acc, base, cc, C, sc, sn, offs_n, mask_n, p, IS_BF16: tl.constexpr, ACC: tl.constexpr,
              POW_MODE: tl.constexpr, LAYOUT: tl.constexpr, MASK_C: tl.constexpr, MASK_N: tl.constexpr):
    x = _load_tile(_tile_ptrs(base, cc, offs_n, sc, sn, LAYOUT), cc, C, mask_n, MASK_C, MASK_N)
    return acc + _abs_pow(_to_acc(x, IS_BF16, ACC), p, POW_MODE)


@triton.jit
def _chan_mean(base, C, sc, sn, offs_n, mask_n, p, IS_BF16: tl.constexpr, ACC: tl.constexpr,
               POW_MODE: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr, MASK_N: tl.constexpr):
    """(1/C) sum_c |x[c, i]|^p for a block of positions of one (C, N) strided sample."""
    acc = tl.full([BLOCK_C, BLOCK_N], 0, ACC)
    offs_c = tl.arange(0, BLOCK_C)
    if LAYOUT == 1:  # channels contiguous: full channel blocks unmasked along them, then the tail
        c_full = C - C % BLOCK_C
        for c0 in range(0, c_full, BLOCK_C):
            acc = _chan_acc(acc, base, c0 + offs_c, C, sc, sn, offs_n, mask_n, p, IS_BF16,
                            ACC, POW_MODE, LAYOUT, False, MASK_N)
        for c0 in range(c_full, C, BLOCK_C):
            acc = _chan_acc(acc, base, c0 + offs_c, C, sc, sn, offs_n, mask_n, p, IS_BF16, ACC, POW_MODE,
                            LAYOUT, True, MASK_N)
    else:
        for c0 in range(0, C, BLOCK_C):
            acc = _chan_acc(acc, base, c0 + offs_c, C, sc, sn, offs_n, mask_n, p, IS_BF16, ACC, POW_MODE,
                            LAYOUT, True, MASK_N)
    return _sum(acc) * (1.0 / C.to(ACC))


# True when these helpers were created by the Triton interpreter (TRITON_INTERPRET=1 at import);
# lwkd_fast.triton.status compares it with the environment now
INTERPRETED = type(_sum).__name__ == "InterpretedFunction"
