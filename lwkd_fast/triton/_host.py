"""Host helpers of the Triton discrepancy ops (lwkd_fast.triton.discrepancy): block sizes
(:data:`CONFIG`), validation by op, pair and shape, (B, C, N) views and their layout and
divisibility, the int64 work table, gradient buffers and the launch wrapper.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import triton.language as tl

from .. import reference
from . import _common
from ._common import on_device
from ._jit import (AT, CHAN_CONTIG, COS, GENERAL, HDR, JSD, POS_CONTIG, STORE_BF16, STORE_BF16_RNE,
    STORE_CAST)


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
    """A tensor the forward saved for the backward: the kernels read it as one contiguous buffer."""
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
