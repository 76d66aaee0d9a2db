"""Attention discrepancy, forward + backward: native vs the eager per-layer code of KD
repositories (:func:`lwkd_fast.reference.eager_at_loss`) vs ``torch.compile`` of that code."""

from __future__ import annotations

from typing import List

import torch

from .. import ops, reference
from ..benchmarking import measure_round_robin
from .core import ROOFLINE, Ctx, Row, read_proxy, suite


def attention_inputs(K: int, B: int, C: int, H: int, W: int, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(K)]
    t = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device) for _ in range(K)]
    return s, t


def step_native(s, t):
    with ops.use_backend("native"):
        d = ops.attention_discrepancy(s, t)
    return torch.autograd.grad(d.sum(), s)


def step_triton(s, t):
    with ops.use_backend("triton"):
        d = ops.attention_discrepancy(s, t)
    return torch.autograd.grad(d.sum(), s)


def step_eager(s, t):
    return torch.autograd.grad(reference.eager_at_loss(s, t), s)


_compiled = None


def step_compiled(s, t):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(reference.eager_at_loss)
    return torch.autograd.grad(_compiled(s, t), s)


def attention_bytes(s, t) -> int:
    """Forward reads student and teacher once; backward reads the student and writes its grad."""
    fs = sum(x.numel() * x.element_size() for x in s)
    ft = sum(x.numel() * x.element_size() for x in t)
    return 3 * fs + ft


MAIN_SHAPE = (4, 128, 64, 32, 32)  # the issues' reference problem: K = 4 x (128, 64, 32, 32) float32


def implementations(device: torch.device):
    impls = [("eager", step_eager), ("torch.compile", step_compiled)]
    if ops.backend_status("native", "attention_discrepancy", device.type)[0]:
        impls.append(("native", step_native))
    if device.type == "cuda" and ops.backend_status("triton", "attention_discrepancy", "cuda")[0]:
        impls.append(("triton", step_triton))
    return impls


@suite("attention")
def attention_suite(ctx: Ctx) -> List[Row]:
    rows: List[Row] = []
    sweep = [(4, 64, 64, 8, 8), (4, 64, 64, 16, 16), (4, 64, 64, 24, 24)] if ctx.quick else \
        [(4, 128, 64, 8, 8), (4, 128, 64, 16, 16), (4, 128, 64, 24, 24), (4, 128, 64, 48, 48)]
    impls = implementations(ctx.device)
    for shape in [MAIN_SHAPE] + sweep:
        K, B, C, H, W = shape
        s, t = attention_inputs(K, B, C, H, W, ctx.device)
        case = f"K={K} x ({B}, {C}, {H}, {W}) fp32 fwd+bwd"
        ref = step_eager(s, t)
        fns = {}
        for name, fn in impls:
            ctx.progress(f"attention {case}: {name} (check)")
            got = fn(s, t)  # agreement first; also warms up torch.compile
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
            fns[name] = lambda fn=fn, s=s, t=t: fn(s, t)
        nbytes = attention_bytes(s, t)
        fns[ROOFLINE] = read_proxy(nbytes, ctx.device)
        ctx.progress(f"attention {case}: timing")
        stats = measure_round_robin(fns, repeat=ctx.repeat, device=ctx.device)
        bw = nbytes / stats.pop(ROOFLINE).median
        for name, st in stats.items():
            rows.append(Row("attention", case, name, st, "eager", nbytes, float(K * B * C * H * W), read_bw=bw))
    return rows
