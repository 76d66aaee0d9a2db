"""Triton kernels of the discrepancy ops (SPEC sections 1-2), forward and backward.

This module is the entry point (lwkd_fast.triton's OP_MODULES name it) and re-exports the names
callers and tests use; the code lives by concern in four modules of this package:

    _jit.py       the work-table layout (column constants) and the @triton.jit helpers both ops'
                  kernels call (reductions, layer search, dtype conversions, |x|^p, JSD terms, tiles)
    _host.py      host helpers: block sizes (CONFIG), validation, (B, C, N) views and their
                  layout / divisibility, the work table (_Table), gradient buffers, the launch wrapper
    attention.py  the attention kernels, their host code, the lwkd_triton::attention_discrepancy
                  ops: the native schema (csrc/ops.cpp), fakes and autograd of lwkd_fast.registry
    maps.py       the derivative-map kernels, their host code, the lwkd_triton::map_discrepancy
                  custom ops with their own schema, fakes and autograd (the backward reuses the
                  forward's row statistics; the native backward recomputes them)

Design
======

*One launch per phase for all K layers.*  Every call builds one int64 **work table** on the host:
a header with the float parameters (p, beta, tau, eps stored as float64 bit patterns, so float64
inputs see the exact float64 values -- Triton would pass Python floats as float32), then one row
per layer with its base pointers, strides, sizes and the index of its first tile (an attention
row also holds the addresses of the layer's two (B, N) maps, one tensor each).  A program of a
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

from __future__ import annotations

import torch

# re-exported: callers, tests and tests/triton_aot_compile.py reach these through this module
from ._host import CONFIG, Config
from ._jit import AT, CHAN_CONTIG, COS, GENERAL, JSD, POS_CONTIG, STORE_BF16, STORE_BF16_RNE, STORE_CAST  # noqa: F401
from .attention import (SCHEMAS, _attention_backward_impl, _attention_forward_impl, _attn_grad_kernel,  # noqa: F401
                        _attn_maps_kernel, _attn_rows_bwd_kernel, _attn_rows_fwd_kernel)  # noqa: F401
from .maps import (_map_backward_impl, _map_forward_impl, _map_grad_kernel, _map_proj_kernel,  # noqa: F401
                   _map_rows_kernel, _map_stats_kernel, _map_terms_kernel, map_discrepancy_backward_op,  # noqa: F401
                   map_discrepancy_op)  # noqa: F401

__all__ = ["attention_discrepancy", "map_discrepancy", "CONFIG", "Config"]

# True when these kernels were created by the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = type(_attn_maps_kernel).__name__ == "InterpretedFunction"


def attention_discrepancy(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks=None):
    """Per-sample (K, B) attention discrepancy; differentiable w.r.t. the student features.  The
    op returns (D, maps_s, maps_t) as the native one does; the maps serve its backward."""
    return torch.ops.lwkd_triton.attention_discrepancy(
        list(student), [t.detach() for t in teacher], float(p), metric, float(beta), normalize,
        float(tau), float(eps), int(channel_dim), None if masks is None else list(masks))[0]


def map_discrepancy(student, teacher, metric, beta, eps):
    """Per-sample (K, B) derivative-map discrepancy; differentiable w.r.t. the student maps."""
    return torch.ops.lwkd_triton.map_discrepancy(
        list(student), [t.detach() for t in teacher], metric, float(beta), float(eps))[0]
