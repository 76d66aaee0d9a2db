"""Triton kernels of the discrepancy ops (SPEC sections 1-2), forward and backward.

Design
======

*One launch per phase for all K layers.*  Every call builds one int64 **work table** on the host:
a header with the float parameters (p, beta, tau, eps stored as float64 bit patterns, so float64
inputs see the exact float64 values -- Triton would pass Python floats as float32), then one row
per layer with its base pointers, strides, sizes and the index of its first tile.  A program of a
tile kernel finds its layer by comparing its tile index with the layers' first-tile column (a
vectorised search over at most a few dozen entries), then reads everything else from that row.
The table is built once per call and copied to the device in one transfer.  The alternative --
concatenating all layers into one buffer -- would cost a full extra read and write of every
feature map, i.e. more than the kernels themselves move; the table costs one small copy.

Pointer element types are compile-time in Triton, so layers are launched in **groups** of equal
(student dtype, teacher dtype, memory layout) -- normally there is exactly one group, so one
launch per phase.  The memory layout ("positions contiguous" = NCHW, "channels contiguous" =
channels_last / token layouts, or general strides) is a compile-time constant so that the
contiguous axis is visible to the compiler (stride literal 1).  Strided and channels_last inputs
are read in place through their strides; a copy is made only when the spatial dimensions cannot
be merged into one axis (``reshape`` semantics), exactly as in the CPU kernels.

*Vector loads.*  Pointers and strides read from a table carry no alignment facts, so the host
computes for every tensor the largest power-of-two divisibility (up to 16 bytes) of its base
pointer and strides, a group is compiled with the smallest value among its layers (still one
launch), and the kernels state it with ``tl.multiple_of``; loops run unmasked full blocks and one
masked tail.  The generated PTX of aligned inputs holds 128-bit ``ld.global.v4`` loads (and
``st.global.v4`` stores in the gradient kernels) -- checked by tests/triton_aot_compile.py, which
compiles every code path the tests launch for sm_80 and sm_90 without a GPU.  Ragged tails and unaligned
tensors (e.g. 7x7 float16 maps) use scalar accesses, still coalesced across a warp.

*Phases.*

attention, forward   1. tiles (layer, sample, chunk of positions): channel reduction
                        ``a[i] = mean_c |x[c, i]|^p`` of student and teacher -> maps (B, N) per layer
                     2. rows (layer, sample): statistics (norms, sums, max/normaliser) and the
                        metric terms over the maps -> d[k, b]
attention, backward  1. rows: statistics and the projection term of the normaliser's Jacobian
                     2. tiles: the map gradient for a chunk of positions, then d|x|^p/dx over all
                        channels -> student gradient (written through its own strides)
map op, forward      1. tiles (layer, sample, chunk of elements): partial norms / sums
                     2. tiles: row statistics from the partials, partial metric terms
                     3. rows: d[k, b] from the partial terms
map op, backward     1. tiles: partial projections (the row statistics are saved by the forward)
                     2. tiles: gradient

*Determinism.*  No atomics at all: every reduction is a fixed-shape ``tl.reduce`` (sum / max) over
per-lane accumulators, and cross-tile reductions are second passes that read the per-tile
partials in index order.  Results are bit-identical run to run.

*Precision.*  float16 / bfloat16 / float32 inputs accumulate in float32; float64 inputs (any
float64 tensor in the call) in float64, matching the SPEC.  The attention maps are kept in the
accumulation dtype.  Gradients are written in the student's dtype.

*Checks and device.*  The host code refuses, by op, pair and shape, what it cannot compute: a
feature map with no channel or no location per sample, a derivative map with no element per
sample (the means would be 0/0, and the tiling divides by those sizes), besides the checks of
batch sizes, dtypes and devices.  Every call runs under the device guard of its tensors
(._common.on_device): Triton launches on the current device's current stream.

*Conventions.*  The gradient conventions are those of csrc/common/lwkd_common.h (the CPU and
CUDA kernels): d|x|^p/dx = 0 at x = 0, clamp_min semantics at eps (the gradient flows through a
norm or sum only when it is >= eps), the JSD gradient at zero probability is -beta when M > 0.

*Interpreter.*  Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.  Its float32 ->
bfloat16 cast truncates (and its round-to-nearest path drops the mantissa carry), so in that mode
bfloat16 stores round to nearest even with explicit bit arithmetic; on a GPU the native
conversion is used.
"""

import contextlib
import math
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from . import _common
from ._common import is_dense, on_device, same_layout, sqrt_rn

__all__ = ["attention_discrepancy", "map_discrepancy", "CONFIG", "Config"]

# ------------------------------------------------------------------------------------------------
# Work-table layout (int64).  Header: float parameters as float64 bit patterns.
# ------------------------------------------------------------------------------------------------
_H_P = tl.constexpr(0)
_H_BETA = tl.constexpr(1)
_H_TAU = tl.constexpr(2)
_H_EPS = tl.constexpr(3)
HDR = 4

# attention layer rows
_A_TSTART = tl.constexpr(0)   # global index of the layer's first tile
_A_N = tl.constexpr(1)        # positions per sample
_A_CHUNK = tl.constexpr(2)    # positions per tile
_A_NCH = tl.constexpr(3)      # tiles per sample
_A_ORIG = tl.constexpr(4)     # layer index k in the caller's order
_A_MOFF = tl.constexpr(5)     # element offset of the layer's (B, N) maps in the map buffers
_A_SPTR = tl.constexpr(6)     # student (B, C, N): pointer, C, strides
_A_SC = tl.constexpr(7)
_A_SSB = tl.constexpr(8)
_A_SSC = tl.constexpr(9)
_A_SSN = tl.constexpr(10)
_A_TPTR = tl.constexpr(11)    # teacher (forward) / gradient (backward) (B, C, N)
_A_TC = tl.constexpr(12)
_A_TSB = tl.constexpr(13)
_A_TSC = tl.constexpr(14)
_A_TSN = tl.constexpr(15)
A_NCOL = 16
_A_NCOL = tl.constexpr(A_NCOL)

# map-op layer rows
_M_TSTART = tl.constexpr(0)
_M_N = tl.constexpr(1)
_M_CHUNK = tl.constexpr(2)
_M_NCH = tl.constexpr(3)
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


@dataclass
class Config:
    """Block sizes and tiling targets (tests shrink them to exercise ragged / multi-tile paths)."""

    # (BLOCK_N positions, BLOCK_C channels) of a feature tile, by layout
    block_pos_contig: Tuple[int, int] = (128, 16)
    block_chan_contig: Tuple[int, int] = (16, 64)
    block_general: Tuple[int, int] = (64, 16)
    tile_elems: int = 32768        # target elements of one feature tile (positions x channels)
    block_rows: int = 1024         # elements per step of the per-(layer, sample) map kernels
    block_flat: int = 1024         # elements per step of the map-op tiles
    flat_chunk_min: int = 8192     # smallest chunk of a map-op tile
    max_flat_chunks: int = 64      # most tiles per (layer, sample) of the map op
    num_warps: int = 4


CONFIG = Config()

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


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


# ------------------------------------------------------------------------------------------------
# Attention: forward
# ------------------------------------------------------------------------------------------------


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
def _attn_maps_kernel(hdr, tab, n_layers, tile0, maps_s, maps_t,
                      S_DT: tl.constexpr, T_DT: tl.constexpr, S_BF16: tl.constexpr,
                      T_BF16: tl.constexpr, ACC: tl.constexpr, POW_MODE: tl.constexpr,
                      S_LAYOUT: tl.constexpr, T_LAYOUT: tl.constexpr, S_DIV: tl.constexpr,
                      S_ALIGN: tl.constexpr, T_DIV: tl.constexpr, T_ALIGN: tl.constexpr,
                      KPAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    gt = tl.program_id(0).to(tl.int64) + tile0
    row = tab + _find_layer(tab, n_layers, gt, _A_TSTART, _A_NCOL, KPAD) * _A_NCOL
    local = gt - tl.load(row + _A_TSTART)
    N = tl.load(row + _A_N)
    chunk = tl.load(row + _A_CHUNK)
    nch = tl.load(row + _A_NCH)
    b = local // nch
    i_begin = tl.multiple_of((local - b * nch) * chunk, BLOCK_N)  # chunk is a multiple of BLOCK_N
    i_end = tl.minimum(i_begin + chunk, N)
    i_full = i_begin + (i_end - i_begin) // BLOCK_N * BLOCK_N
    p = _param(hdr, _H_P, ACC)

    s_base = _base(row, _A_SPTR, _A_SSB, b, S_DT, S_DIV, S_ALIGN)
    s_C = tl.load(row + _A_SC)
    s_sc = tl.multiple_of(tl.load(row + _A_SSC), S_DIV)
    s_sn = tl.multiple_of(tl.load(row + _A_SSN), S_DIV)
    t_base = _base(row, _A_TPTR, _A_TSB, b, T_DT, T_DIV, T_ALIGN)
    t_C = tl.load(row + _A_TC)
    t_sc = tl.multiple_of(tl.load(row + _A_TSC), T_DIV)
    t_sn = tl.multiple_of(tl.load(row + _A_TSN), T_DIV)
    moff = tl.load(row + _A_MOFF) + b * N
    ms = maps_s + moff
    mt = maps_t + moff

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
def _attn_rows_fwd_kernel(hdr, tab, B, maps_s, maps_t, masks, d, ACC: tl.constexpr, METRIC: tl.constexpr,
                          SOFTMAX: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    j = pid // B
    b = pid - j * B
    row = tab + j * _A_NCOL
    N = tl.load(row + _A_N)
    moff = tl.load(row + _A_MOFF) + b * N
    k = tl.load(row + _A_ORIG)
    eps = _param(hdr, _H_EPS, ACC)
    beta = _param(hdr, _H_BETA, ACC)
    inv_tau = 1.0 / _param(hdr, _H_TAU, ACC)
    ms = maps_s + moff
    mt = maps_t + moff
    mk = masks + moff
    inv_s, inv_t, r_s, r_t, mx_s, mx_t, nv = _row_stats(ms, mt, mk, N, eps, inv_tau, ACC, METRIC, SOFTMAX,
                                                        MASKED, BLOCK)

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
def _attn_rows_bwd_kernel(hdr, tab, B, maps_s, maps_t, masks, grad, rowscal, ACC: tl.constexpr,
                          METRIC: tl.constexpr, SOFTMAX: tl.constexpr, MASKED: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Row statistics and the projection <g_P, P> (JSD) or [r_s >= eps] <q_s, g_q> (at)."""
    pid = tl.program_id(0).to(tl.int64)
    j = pid // B
    b = pid - j * B
    row = tab + j * _A_NCOL
    N = tl.load(row + _A_N)
    moff = tl.load(row + _A_MOFF) + b * N
    k = tl.load(row + _A_ORIG)
    eps = _param(hdr, _H_EPS, ACC)
    beta = _param(hdr, _H_BETA, ACC)
    inv_tau = 1.0 / _param(hdr, _H_TAU, ACC)
    gd = tl.load(grad + k * B + b).to(ACC)
    ms = maps_s + moff
    mt = maps_t + moff
    mk = masks + moff
    inv_s, inv_t, r_s, r_t, mx_s, mx_t, nv = _row_stats(ms, mt, mk, N, eps, inv_tau, ACC, METRIC, SOFTMAX,
                                                        MASKED, BLOCK)
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
def _attn_grad_kernel(hdr, tab, n_layers, tile0, B, maps_s, maps_t, masks, rowscal,
                      S_DT: tl.constexpr, S_BF16: tl.constexpr, STORE: tl.constexpr, ACC: tl.constexpr,
                      OPT: tl.constexpr, POW_MODE: tl.constexpr, METRIC: tl.constexpr,
                      SOFTMAX: tl.constexpr, MASKED: tl.constexpr, X_LAYOUT: tl.constexpr, G_LAYOUT: tl.constexpr,
                      X_DIV: tl.constexpr, X_ALIGN: tl.constexpr, G_DIV: tl.constexpr,
                      G_ALIGN: tl.constexpr, KPAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Student gradient of one (layer, sample, chunk of positions) tile; the table's second
    tensor slot holds the gradient buffer (B, C, N) view."""
    gt = tl.program_id(0).to(tl.int64) + tile0
    row = tab + _find_layer(tab, n_layers, gt, _A_TSTART, _A_NCOL, KPAD) * _A_NCOL
    local = gt - tl.load(row + _A_TSTART)
    N = tl.load(row + _A_N)
    chunk = tl.load(row + _A_CHUNK)
    nch = tl.load(row + _A_NCH)
    k = tl.load(row + _A_ORIG)
    b = local // nch
    i_begin = tl.multiple_of((local - b * nch) * chunk, BLOCK_N)  # chunk is a multiple of BLOCK_N
    i_end = tl.minimum(i_begin + chunk, N)
    i_full = i_begin + (i_end - i_begin) // BLOCK_N * BLOCK_N
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
    x_sc = tl.multiple_of(tl.load(row + _A_SSC), X_DIV)
    x_sn = tl.multiple_of(tl.load(row + _A_SSN), X_DIV)
    g_base = _base(row, _A_TPTR, _A_TSB, b, S_DT, G_DIV, G_ALIGN)
    g_sc = tl.multiple_of(tl.load(row + _A_TSC), G_DIV)
    g_sn = tl.multiple_of(tl.load(row + _A_TSN), G_DIV)
    moff = tl.load(row + _A_MOFF) + b * N
    ms = maps_s + moff
    mt = maps_t + moff
    mk = masks + moff
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


# ------------------------------------------------------------------------------------------------
# Map op (flat per-sample vectors)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _flat_tile(tab, n_layers, tile0, KPAD: tl.constexpr, BLOCK: tl.constexpr):
    gt = tl.program_id(0).to(tl.int64) + tile0
    row = tab + _find_layer(tab, n_layers, gt, _M_TSTART, _M_NCOL, KPAD) * _M_NCOL
    local = gt - tl.load(row + _M_TSTART)
    N = tl.load(row + _M_N)
    chunk = tl.load(row + _M_CHUNK)
    nch = tl.load(row + _M_NCH)
    b = local // nch
    ci = local - b * nch
    i_begin = tl.multiple_of(ci * chunk, BLOCK)  # chunk is a multiple of BLOCK
    i_end = tl.minimum(i_begin + chunk, N)
    i_full = i_begin + (i_end - i_begin) // BLOCK * BLOCK
    first = gt - ci  # global index of the sample's first tile
    return gt, row, b, ci, nch, i_begin, i_full, i_end, first


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
INTERPRETED = type(_attn_maps_kernel).__name__ == "InterpretedFunction"

# ------------------------------------------------------------------------------------------------
# Host side: validation, (B, C, N) views, work tables, launches
# ------------------------------------------------------------------------------------------------


def _acc_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _next_pow2(n: int) -> int:
    return max(2, 1 << max(0, int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _check_dtype(x: torch.Tensor, op: str, what: str) -> None:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"lwkd_triton::{op}: {what} has dtype {x.dtype}; the Triton kernels take "
                        "float16, bfloat16, float32 or float64")


def _pair_lists(student, teacher, op: str) -> int:
    if len(student) != len(teacher):
        raise ValueError(f"lwkd_triton::{op}: {len(student)} student tensors but {len(teacher)} teacher tensors")
    if not student:
        raise ValueError(f"lwkd_triton::{op}: needs at least one layer pair")
    dev = student[0].device
    B = student[0].shape[0] if student[0].dim() > 0 else 0
    for k, (a, b) in enumerate(zip(student, teacher)):
        for x, who in ((a, "student"), (b, "teacher")):
            if x.dim() < 1:
                raise ValueError(f"lwkd_triton::{op}: pair {k}: {who} tensor must have a batch dimension")
            _check_dtype(x, op, f"pair {k} {who} tensor")
            if x.device != dev:
                raise ValueError(f"lwkd_triton::{op}: pair {k}: {who} tensor is on {x.device} but pair 0 is on {dev}")
            if x.shape[0] != B:
                raise ValueError(f"lwkd_triton::{op}: pair {k}: {who} batch size {x.shape[0]} differs from {B}")
    if B == 0:
        raise ValueError(f"lwkd_triton::{op}: batch size must be > 0")
    return B


def _check_features_nonempty(tensors, op: str, who: str, channel_dim: int) -> None:
    """Every sample of a feature map needs a channel and a location: an empty map would be a
    0/0 mean (and the host's tiling divides by its size)."""
    for k, x in enumerate(tensors):
        if x.dim() == 1:  # (B,): one channel, one location
            continue
        C = x.shape[channel_dim % x.dim()]
        N = reference.bcn_locations(x, channel_dim)
        if C == 0 or N == 0:
            what = "no channels" if C == 0 else "no locations (an empty spatial extent)"
            raise ValueError(f"lwkd_triton::{op}: pair {k}: {who} tensor of shape {tuple(x.shape)} has {what}; "
                             "every sample needs at least one channel and one location")


def _check_maps_nonempty(student, teacher, op: str) -> None:
    """A derivative map with no element per sample has no norm and no distribution."""
    for k, (a, b) in enumerate(zip(student, teacher)):
        for x, who in ((a, "student"), (b, "teacher")):
            if x.numel() == 0:  # the batch is > 0 (checked first): 0 elements per sample
                raise ValueError(f"lwkd_triton::{op}: pair {k}: {who} map of shape {tuple(x.shape)} has 0 "
                                 "elements per sample; every sample needs at least one")


def _check_saved(op: str, name: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device, numel: int) -> None:
    """A tensor the forward saved for the backward: the kernels read it as one flat buffer."""
    if x.dtype != dtype or x.device != device or x.numel() != numel or not x.is_contiguous():
        raise ValueError(f"lwkd_triton::{op}: {name} must be a contiguous {dtype} tensor of {numel} elements on "
                         f"{device} (as the forward returns it), got shape {tuple(x.shape)}, dtype {x.dtype}, "
                         f"device {x.device}")


def _divisibility(ptr: int, esize: int, strides) -> Tuple[int, int]:
    """(div, align): the largest power of two div <= 16 bytes / element such that the base pointer
    is div-element aligned and every stride is a multiple of div.  The kernels pass these to the
    compiler (tl.multiple_of) so that loads along a contiguous axis can be 16-byte vectors."""
    d = max(1, 16 // esize)
    while d > 1 and (ptr % (d * esize) or any(st % d for st in strides)):
        d //= 2
    return d, d * esize


def _feat_desc(x3: torch.Tensor):
    """([ptr, C, sb, sc, sn], layout, div, align) of a (B, C, N) strided view.

    Strides of size-1 dims are irrelevant and normalised so that the layout class is as specific as
    possible; strides the kernels never use (size-1 axes, and the contiguous axis, which they
    address with a literal 1) are stored as 0, so that the divisibility hints hold for every value
    in the table."""
    B, C, N = x3.shape
    sb, sc, sn = x3.stride()
    if C == 1:
        sc = 1
    if N == 1:  # one position: only the channel stride matters
        sn = 1
        layout = CHAN_CONTIG if sc == 1 else POS_CONTIG
    elif sn == 1:
        layout = POS_CONTIG
    elif sc == 1:
        layout = CHAN_CONTIG
    else:
        layout = GENERAL
    if B == 1:
        sb = 0
    if C == 1 or layout == CHAN_CONTIG:
        sc = 0
    if N == 1 or layout == POS_CONTIG:
        sn = 0
    esize = x3.element_size()
    div, align = (1, esize) if layout == GENERAL else _divisibility(x3.data_ptr(), esize, (sb, sc, sn))
    return [x3.data_ptr(), C, sb, sc, sn], layout, div, align


def _blocks(layout_a: int, layout_b: int) -> Tuple[int, int]:
    if layout_a == layout_b == POS_CONTIG:
        return CONFIG.block_pos_contig
    if layout_a == layout_b == CHAN_CONTIG:
        return CONFIG.block_chan_contig
    return CONFIG.block_general


def _pos_chunk(N: int, channels: int, block_n: int) -> int:
    per = max(block_n, _round_up(max(1, CONFIG.tile_elems // max(1, channels)), block_n))
    return min(per, _round_up(N, block_n))


def _store_mode(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16:
        return STORE_BF16_RNE if _interpreting() else STORE_BF16
    return STORE_CAST


def _pow_mode(p: float) -> int:
    return 0 if p == 2.0 else (1 if p == 1.0 else 2)


def _metric_code(metric: str, attention: bool) -> int:
    if attention and metric == "at":
        return AT
    if not attention and metric == "cos":
        return COS
    if metric == "jsd":
        return JSD
    allowed = "'at' or 'jsd'" if attention else "'cos' or 'jsd'"
    op = "attention_discrepancy" if attention else "map_discrepancy"
    raise ValueError(f"lwkd_triton::{op}: unknown metric {metric!r} (expected {allowed})")


def _check_params(op: str, beta: float, tau: float, eps: float, normalize: str = "sum", p: float = 2.0):
    if normalize not in ("sum", "softmax"):
        raise ValueError(f"lwkd_triton::{op}: unknown normalize {normalize!r} (expected 'sum' or 'softmax')")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"lwkd_triton::{op}: beta must lie in (0, 1), got {beta}")
    for name, v in (("tau", tau), ("eps", eps), ("p", p)):
        if not (v > 0.0 and math.isfinite(v)):
            raise ValueError(f"lwkd_triton::{op}: {name} must be a positive finite number, got {v}")


class _Table:
    """Header + layer rows (sorted into launch groups), one int64 tensor on the device."""

    def __init__(self, ncol: int, params: Sequence[float]):
        self.ncol = ncol
        self.header = [_f64_bits(v) for v in params] + [0] * (HDR - len(params))
        self.rows: List[List[int]] = []
        self.groups: List[Tuple[tuple, int, int, int, int]] = []  # (key, row0, row1, tile0, tiles)

    def build(self, keyed_rows, device, n_hints: int = 0):
        """``keyed_rows``: list of (key, row, n_tiles).  The last ``n_hints`` entries of a key are
        divisibility hints; the others (dtypes, layouts) decide the launch group.  Rows are ordered
        by group (stable), tile indices assigned in that order, and each group is launched with the
        smallest hints of its layers -- one launch per group, vectorised when all layers allow."""
        def group_of(key):
            return key[:len(key) - n_hints]

        order = sorted(range(len(keyed_rows)), key=lambda i: (group_of(keyed_rows[i][0]), i))
        tile = 0
        for pos, i in enumerate(order):
            key, row, n = keyed_rows[i]
            row = list(row)
            row[0] = tile
            self.rows.append(row)
            if self.groups and group_of(self.groups[-1][0]) == group_of(key):
                g = self.groups[-1]
                hints = tuple(min(a, b) for a, b in zip(g[0][len(key) - n_hints:], key[len(key) - n_hints:]))
                self.groups[-1] = (group_of(key) + hints, g[1], pos + 1, g[3], g[4] + n)
            else:
                self.groups.append((key, pos, pos + 1, tile, n))
            tile += n
        self.total_tiles = tile
        flat = self.header + [v for r in self.rows for v in r]
        t = torch.tensor(flat, dtype=torch.int64)
        self.tensor = t.to(device, non_blocking=True) if device.type != "cpu" else t
        self.hdr = self.tensor[:HDR]
        self.all_rows = self.tensor[HDR:]
        return self

    def group_rows(self, row0: int, row1: int) -> torch.Tensor:
        return self.tensor[HDR + row0 * self.ncol: HDR + row1 * self.ncol]


def _grad_view(x: torch.Tensor, channel_dim: int):
    """Gradient buffer with x's layout and its (B, C, N) view; when the view cannot alias the
    buffer, a (B, C, N) scratch buffer is written and copied into the gradient afterwards."""
    g = torch.empty_like(x)
    g3 = reference.to_bcn(g, channel_dim)
    if x.dim() == 1 or g3._base is g:
        return g, g3, False
    return g, torch.empty(g3.shape, dtype=x.dtype, device=x.device), True


def _scatter_back(g: torch.Tensor, g3: torch.Tensor, channel_dim: int) -> None:
    cd = channel_dim % g.dim()
    full = [g.shape[0], g.shape[cd]] + [s for d, s in enumerate(g.shape) if d not in (0, cd)]
    g.copy_(g3.view(full).movedim(1, cd))


def _launch(kernel, grid, *args, **kw):
    _common.launch(kernel, grid, *args, num_warps=CONFIG.num_warps, **kw)


def _guard(tensors, op: str):
    """The device guard of one op call (see _common.on_device); the impl checks that every
    tensor is on the first one's device."""
    return on_device(tensors[0].device, op) if tensors else contextlib.nullcontext()


# ---- attention ---------------------------------------------------------------------------------


def _mask_buffer(op, masks, Ns, B, acc, dev):
    """The masks of the K pairs as one flat 0/1 buffer laid out like the map buffers (ones for a
    pair without mask), or None when no pair has one."""
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


def _attention_forward_impl(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks=None):
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
    ntot = sum(Ns)
    maps_s = torch.empty(B * ntot, dtype=acc, device=dev)
    maps_t = torch.empty(B * ntot, dtype=acc, device=dev)
    d = torch.empty((K, B), dtype=acc, device=dev)
    mbuf = _mask_buffer(op, masks, Ns, B, acc, dev)

    table = _Table(A_NCOL, (p, beta, tau, eps))
    keyed = []
    moff = 0
    for k in range(K):
        sd, sl, sdiv, salign = _feat_desc(s3[k])
        td, tlay, tdiv, talign = _feat_desc(t3[k])
        bn, bc = _blocks(sl, tlay)
        chunk = _pos_chunk(Ns[k], s3[k].shape[1] + t3[k].shape[1], bn)
        nch = _cdiv(Ns[k], chunk)
        key = (str(student[k].dtype), str(teacher[k].dtype), sl, tlay, sdiv, salign, tdiv, talign)
        keyed.append((key, [0, Ns[k], chunk, nch, k, moff] + sd + td, B * nch))
        moff += B * Ns[k]
    table.build(keyed, dev, n_hints=4)

    pm = _pow_mode(p)
    for key, r0, r1, tile0, ntiles in table.groups:
        sdt, tdt = getattr(torch, key[0][6:]), getattr(torch, key[1][6:])
        bn, bc = _blocks(key[2], key[3])
        _launch(_attn_maps_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0,
                maps_s, maps_t, S_DT=_TL_DTYPES[sdt], T_DT=_TL_DTYPES[tdt],
                S_BF16=sdt == torch.bfloat16, T_BF16=tdt == torch.bfloat16, ACC=_TL_DTYPES[acc],
                POW_MODE=pm, S_LAYOUT=key[2], T_LAYOUT=key[3], S_DIV=key[4], S_ALIGN=key[5],
                T_DIV=key[6], T_ALIGN=key[7], KPAD=_next_pow2(r1 - r0), BLOCK_N=bn, BLOCK_C=bc)
    _launch(_attn_rows_fwd_kernel, (K * B,), table.hdr, table.all_rows, B, maps_s, maps_t,
            maps_s if mbuf is None else mbuf, d, ACC=_TL_DTYPES[acc], METRIC=mcode,
            SOFTMAX=(mcode == JSD and normalize == "softmax"), MASKED=mbuf is not None, BLOCK=CONFIG.block_rows)
    return d, maps_s, maps_t


def _attention_backward_impl(grad, student, maps_s, maps_t, p, metric, beta, normalize, tau, eps,
                             channel_dim, masks=None):
    op = "attention_discrepancy_backward"
    mcode = _metric_code(metric, True)
    _check_params(op, beta, tau, eps, normalize, p)
    B = _pair_lists(student, student, op)
    _check_features_nonempty(student, op, "student", channel_dim)
    K = len(student)
    acc = maps_s.dtype
    dev = student[0].device
    if tuple(grad.shape) != (K, B):
        raise ValueError(f"lwkd_triton::{op}: grad must be ({K}, {B}), got {tuple(grad.shape)}")
    s3 = [reference.to_bcn(x, channel_dim) for x in student]
    Ns = [x.shape[2] for x in s3]
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"lwkd_triton::{op}: maps_s has dtype {acc}; the forward saves float32 or float64 maps")
    for name, m in (("maps_s", maps_s), ("maps_t", maps_t)):
        _check_saved(op, name, m, acc, dev, B * sum(Ns))
    grad = grad.to(device=dev, dtype=acc).contiguous()
    grads, bufs = [], []
    table = _Table(A_NCOL, (p, beta, tau, eps))
    keyed = []
    moff = 0
    for k in range(K):
        g, g3, copy_back = _grad_view(student[k], channel_dim)
        grads.append(g)
        bufs.append((g3, copy_back))
        xd, xl, xdiv, xalign = _feat_desc(s3[k])
        gdsc, gl, gdiv, galign = _feat_desc(g3)
        bn, bc = _blocks(xl, gl)
        chunk = _pos_chunk(Ns[k], s3[k].shape[1], bn)
        nch = _cdiv(Ns[k], chunk)
        key = (str(student[k].dtype), xl, gl, xdiv, xalign, gdiv, galign)
        keyed.append((key, [0, Ns[k], chunk, nch, k, moff] + xd + gdsc, B * nch))
        moff += B * Ns[k]
    table.build(keyed, dev, n_hints=4)

    softmax = mcode == JSD and normalize == "softmax"
    mbuf = _mask_buffer(op, masks, Ns, B, acc, dev)
    mptr = maps_s if mbuf is None else mbuf
    rowscal = torch.empty(K * B * 8, dtype=acc, device=dev)
    _launch(_attn_rows_bwd_kernel, (K * B,), table.hdr, table.all_rows, B, maps_s, maps_t, mptr, grad,
            rowscal, ACC=_TL_DTYPES[acc], METRIC=mcode, SOFTMAX=softmax, MASKED=mbuf is not None,
            BLOCK=CONFIG.block_rows)
    pm = _pow_mode(p)
    for key, r0, r1, tile0, ntiles in table.groups:
        sdt = getattr(torch, key[0][6:])
        opt = torch.float64 if sdt == torch.float64 else torch.float32
        bn, bc = _blocks(key[1], key[2])
        _launch(_attn_grad_kernel, (ntiles,), table.hdr, table.group_rows(r0, r1), r1 - r0, tile0, B,
                maps_s, maps_t, mptr, rowscal, S_DT=_TL_DTYPES[sdt], S_BF16=sdt == torch.bfloat16,
                STORE=_store_mode(sdt), ACC=_TL_DTYPES[acc], OPT=_TL_DTYPES[opt], POW_MODE=pm,
                METRIC=mcode, SOFTMAX=softmax, MASKED=mbuf is not None, X_LAYOUT=key[1], G_LAYOUT=key[2], X_DIV=key[3],
                X_ALIGN=key[4], G_DIV=key[5], G_ALIGN=key[6], KPAD=_next_pow2(r1 - r0), BLOCK_N=bn,
                BLOCK_C=bc)
    for k in range(K):
        g3, copy_back = bufs[k]
        if copy_back:
            _scatter_back(grads[k], g3, channel_dim)
    return grads


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


# ------------------------------------------------------------------------------------------------
# torch.library custom ops (fake kernels + autograd), and the entry points used by lwkd_fast.ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("lwkd_triton::attention_discrepancy", mutates_args=())
def attention_discrepancy_op(student: List[torch.Tensor], teacher: List[torch.Tensor], p: float,
                             metric: str, beta: float, normalize: str, tau: float, eps: float,
                             channel_dim: int, masks: List[Optional[torch.Tensor]]
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d (K, B), maps_s, maps_t); the maps of layer k are the (B, N_k) block at offset
    B * sum_{j<k} N_j of the flat map buffers (kept for the backward).  ``masks``: one (B, N_k)
    0/1 mask of valid locations, or None, per pair (SPEC section 2)."""
    with _guard(student, "attention_discrepancy"):
        return _attention_forward_impl(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks)


@attention_discrepancy_op.register_fake
def _attention_fake(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks):
    acc = _acc_dtype(list(student) + list(teacher))
    B = student[0].shape[0]
    ntot = sum(reference.bcn_locations(x, channel_dim) for x in student)
    d = student[0].new_empty((len(student), B), dtype=acc)
    return d, student[0].new_empty((B * ntot,), dtype=acc), student[0].new_empty((B * ntot,), dtype=acc)


@torch.library.custom_op("lwkd_triton::attention_discrepancy_backward", mutates_args=())
def attention_discrepancy_backward_op(grad: torch.Tensor, student: List[torch.Tensor],
                                      maps_s: torch.Tensor, maps_t: torch.Tensor, p: float,
                                      metric: str, beta: float, normalize: str, tau: float,
                                      eps: float, channel_dim: int,
                                      masks: List[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    with _guard(student, "attention_discrepancy_backward"):
        return _attention_backward_impl(grad, student, maps_s, maps_t, p, metric, beta, normalize, tau,
                                        eps, channel_dim, masks)


@attention_discrepancy_backward_op.register_fake
def _attention_backward_fake(grad, student, maps_s, maps_t, p, metric, beta, normalize, tau, eps,
                             channel_dim, masks):
    return [torch.empty_like(x) for x in student]


def _attention_setup(ctx, inputs, output):
    student, _teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks = inputs
    _d, maps_s, maps_t = output
    ctx.mark_non_differentiable(maps_s, maps_t)  # kept for the backward only
    ctx.K = len(student)
    ctx.args = (p, metric, beta, normalize, tau, eps, channel_dim)
    ctx.masks = masks  # constants (no gradient)
    ctx.save_for_backward(*student, maps_s, maps_t)


def _attention_backward(ctx, grad_d, _grad_maps_s, _grad_maps_t):
    K = ctx.K
    saved = ctx.saved_tensors
    if grad_d is None:
        grads = [None] * K
    else:
        grads = torch.ops.lwkd_triton.attention_discrepancy_backward(
            grad_d, list(saved[:K]), saved[K], saved[K + 1], *ctx.args, ctx.masks)
    # the masks slot mirrors how torch flattened the input: a list holding any None is one leaf,
    # a list of tensors only is a list
    no_masks = [None] * K if all(m is not None for m in ctx.masks) else None
    return list(grads), [None] * K, None, None, None, None, None, None, None, no_masks


attention_discrepancy_op.register_autograd(_attention_backward, setup_context=_attention_setup)


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


def attention_discrepancy(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks=None):
    """Per-sample (K, B) attention discrepancy; differentiable w.r.t. the student features."""
    return torch.ops.lwkd_triton.attention_discrepancy(
        list(student), [t.detach() for t in teacher], float(p), metric, float(beta), normalize,
        float(tau), float(eps), int(channel_dim), [None] * len(student) if masks is None else list(masks))[0]


def map_discrepancy(student, teacher, metric, beta, eps):
    """Per-sample (K, B) derivative-map discrepancy; differentiable w.r.t. the student maps."""
    return torch.ops.lwkd_triton.map_discrepancy(
        list(student), [t.detach() for t in teacher], metric, float(beta), float(eps))[0]
