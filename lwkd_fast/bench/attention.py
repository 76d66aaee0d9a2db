"""Attention discrepancy, forward + backward: native vs the eager per-layer code of KD
repositories (:func:`lwkd_fast.reference.eager_at_loss`) vs ``torch.compile`` of that code, on
NCHW feature maps (the issues' reference problem and a size sweep, float32) and on token layouts
(B, N, D) with ``channel_dim=-1`` (a ViT/LLM-sized case, float32 and bfloat16).  Before timing,
every implementation's gradients are held against the float64 reference
(:func:`check_agreement`)."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from .. import ops, reference, testing
from ..benchmarking import measure_round_robin
from .core import ROOFLINE, Ctx, Row, read_proxy, suite


def attention_inputs(K: int, B: int, C: int, H: int, W: int, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(K)]
    t = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device) for _ in range(K)]
    return s, t


def token_inputs(K: int, B: int, N: int, Cs: int, Ct: int, device, dtype=torch.float32, seed=0):
    """K pairs of token features: student (B, N, Cs), teacher (B, N, Ct)."""
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, N, Cs, generator=g).to(device, dtype).requires_grad_() for _ in range(K)]
    t = [torch.randn(B, N, Ct, generator=g).to(device, dtype) for _ in range(K)]
    return s, t


def step_native(s, t, channel_dim=1):
    with ops.use_backend("native"):
        d = ops.attention_discrepancy(s, t, channel_dim=channel_dim)
    return torch.autograd.grad(d.sum(), s)


def step_triton(s, t, channel_dim=1):
    with ops.use_backend("triton"):
        d = ops.attention_discrepancy(s, t, channel_dim=channel_dim)
    return torch.autograd.grad(d.sum(), s)


def step_eager(s, t, channel_dim=1):
    return torch.autograd.grad(reference.eager_at_loss(s, t, channel_dim), s)


_compiled = None


def step_compiled(s, t, channel_dim=1):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(reference.eager_at_loss)
    return torch.autograd.grad(_compiled(s, t, channel_dim), s)


def attention_bytes(s, t) -> int:
    """Forward reads student and teacher once; backward reads the student and writes its grad."""
    fs = sum(x.numel() * x.element_size() for x in s)
    ft = sum(x.numel() * x.element_size() for x in t)
    return 3 * fs + ft


MAIN_SHAPE = (4, 128, 64, 32, 32)  # the issues' reference problem: K = 4 x (128, 64, 32, 32) float32
TOKEN_SHAPE = (4, 4, 1024, 512, 1024)  # K = 4 x (B=4, N=1024 tokens, D 512 student -> 1024 teacher)
TOKEN_DTYPES = (torch.float32, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def implementations(device: torch.device):
    impls = [("eager", step_eager), ("torch.compile", step_compiled)]
    if ops.backend_status("native", "attention_discrepancy", device.type)[0]:
        impls.append(("native", step_native))
    if device.type == "cuda" and ops.backend_status("triton", "attention_discrepancy", "cuda")[0]:
        impls.append(("triton", step_triton))
    return impls


CHECK_BATCH = 8  # samples whose gradients the agreement check holds against float64 (1/16 of the cost)
CHECK_RTOL = 1e-4  # float32/float64: max |error| / max |reference gradient|


def _agreement(got, ref, eager, dtype) -> testing.Verdict:
    """float16/bfloat16: the SPEC section 6 rule (at most twice eager torch's error in that dtype,
    plus 1e-3); float32/float64: within CHECK_RTOL.  All three gradients come divided by the
    reference's largest magnitude: on large problems every element is far below the SPEC's
    absolute atol of 1e-6, which would make an absolute check vacuous (the tests hold the
    kernels to the SPEC rule itself on small problems)."""
    if testing.tolerances(dtype) is None:
        return testing.compare(got, ref, dtype, eager)
    err = float((got.double() - ref).abs().max())
    return testing.Verdict(err <= CHECK_RTOL, err, CHECK_RTOL, "max error relative to the largest gradient")


def check_agreement(case: str, impls: Sequence, s, t, channel_dim: int = 1) -> None:
    """Each implementation's gradients against the float64 reference (:func:`_agreement`).

    Every implementation runs on the timed problem itself (which also warms it up: torch.compile
    compiles for exactly the timed shapes); the gradients of its first CHECK_BATCH samples are
    compared, against the reference run on those samples alone (D is a batch mean, so the full
    batch's gradient of a sample is the slice's times n / B).  Raises AssertionError naming the
    case, the implementation and the gradient."""
    B = s[0].shape[0]
    n = min(CHECK_BATCH, B)
    s64 = [x.detach()[:n].double().requires_grad_() for x in s]
    D64 = reference.attention_discrepancy(s64, [x.detach()[:n].double() for x in t], channel_dim=channel_dim)
    ref = [g * (n / B) for g in torch.autograd.grad(D64.mean(1).sum(), s64)]
    scale = [float(r.abs().max()) or 1.0 for r in ref]
    eager = step_eager(s, t, channel_dim)
    for name, fn in impls:
        for k, (got, r, e) in enumerate(zip(fn(s, t, channel_dim), ref, eager)):
            verdict = _agreement(got[:n] / scale[k], r / scale[k], e[:n] / scale[k], s[0].dtype)
            if not verdict.ok:
                raise AssertionError(f"bench attention {case}: {name} grad[{k}] disagrees with the float64 "
                                     f"reference: {verdict}")


def time_case(ctx: Ctx, case: str, impls: Sequence, s, t, channel_dim: int, size: float) -> List[Row]:
    ctx.progress(f"attention {case}: check against float64")
    check_agreement(case, impls, s, t, channel_dim)
    fns: Dict[str, Callable[[], object]] = {
        name: (lambda fn=fn: fn(s, t, channel_dim)) for name, fn in impls}
    nbytes = attention_bytes(s, t)
    fns[ROOFLINE] = read_proxy(nbytes, ctx.device)
    ctx.progress(f"attention {case}: timing")
    stats = measure_round_robin(fns, repeat=ctx.repeat, device=ctx.device)
    proxy = stats.pop(ROOFLINE)
    return [Row("attention", case, name, st, "eager", nbytes, size, read_stats=proxy) for name, st in stats.items()]


@suite("attention")
def attention_suite(ctx: Ctx) -> List[Row]:
    rows: List[Row] = []
    sweep = [(4, 64, 64, 8, 8), (4, 64, 64, 16, 16), (4, 64, 64, 24, 24)] if ctx.quick else \
        [(4, 128, 64, 8, 8), (4, 128, 64, 16, 16), (4, 128, 64, 24, 24), (4, 128, 64, 48, 48)]
    impls = implementations(ctx.device)
    for shape in [MAIN_SHAPE] + sweep:
        K, B, C, H, W = shape
        s, t = attention_inputs(K, B, C, H, W, ctx.device)
        rows += time_case(ctx, f"K={K} x ({B}, {C}, {H}, {W}) fp32 fwd+bwd", impls, s, t, 1,
                          float(K * B * C * H * W))
    K, B, N, Cs, Ct = TOKEN_SHAPE
    for dtype in TOKEN_DTYPES:
        s, t = token_inputs(K, B, N, Cs, Ct, ctx.device, dtype)
        # size 0: not on the size-sweep plot (another layout and dtype)
        rows += time_case(ctx, f"K={K} x ({B}, {N}, {Cs}->{Ct}) tokens {DTYPE_NAMES[dtype]} fwd+bwd", impls,
                          s, t, -1, 0.0)
    return rows
