"""Discrepancy ops (SPEC sections 1, 2, 6): every backend x dtype x layout against the float64
reference, eps edge cases, reductions, opcheck, gradcheck, one-call-for-K-layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lwkd_fast as lw
from lwkd_fast import check, reference
from lwkd_fast.testing import compare, verify_op

from conftest import available_backends, requires_native

ATT_BACKENDS = available_backends("attention_discrepancy")
MAP_BACKENDS = available_backends("map_discrepancy")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _assert_verdicts(verdicts):
    bad = {k: str(v) for k, v in verdicts.items() if not v.ok}
    assert not bad, bad


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------
# Layouts: each returns (student list, teacher list, channel_dim) with ragged sizes (no size is a
# multiple of a vector width) and channel counts that differ between student and teacher.
# ------------------------------------------------------------------------------------------------


def layout_contiguous(dtype):
    return [_rand(3, 5, 7, 9, dtype=dtype), _rand(3, 19, 3, 3, dtype=dtype)], \
           [_rand(3, 8, 7, 9, dtype=dtype), _rand(3, 4, 3, 3, dtype=dtype)], 1


def layout_channels_last(dtype):
    s = [_rand(3, 6, 5, 7, dtype=dtype).to(memory_format=torch.channels_last),
         _rand(3, 17, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)]
    t = [_rand(3, 9, 5, 7, dtype=dtype), _rand(3, 5, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)]
    return s, t, 1


def layout_strided(dtype):
    # slices and a transpose: neither channel nor spatial stride is 1
    big = _rand(3, 12, 9, 16, dtype=dtype)
    # the third student: rows of 13 positions 16 elements apart -- 16-byte aligned rows (vector
    # loads), while its gradient, laid out densely (13 apart), is not (no vector stores)
    s = [big[:, ::2, :, ::2], _rand(3, 11, 6, dtype=dtype).transpose(1, 2).transpose(1, 2)[:, :, 1:],
         _rand(3, 5, 16, dtype=dtype)[:, :, :13]]
    t = [_rand(3, 4, 9, 8, dtype=dtype)[:, :, :, :], _rand(3, 7, 13, dtype=dtype)[:, :, ::2][:, :, :5],
         _rand(3, 6, 13, dtype=dtype)]
    return s, t, 1


def layout_tokens(dtype):
    # transformer token layout (B, N, D) with channel_dim=-1
    return [_rand(3, 10, 12, dtype=dtype), _rand(3, 7, 5, dtype=dtype)], \
           [_rand(3, 10, 24, dtype=dtype), _rand(3, 7, 33, dtype=dtype)], -1


def layout_3d(dtype):
    # (B, C, T, H, W) video-like maps and a 1-d sequence map
    return [_rand(2, 4, 3, 5, 6, dtype=dtype), _rand(2, 6, 11, dtype=dtype)], \
           [_rand(2, 3, 3, 5, 6, dtype=dtype), _rand(2, 2, 11, dtype=dtype)], 1


LAYOUTS = [layout_contiguous, layout_channels_last, layout_strided, layout_tokens, layout_3d]


@pytest.mark.parametrize("backend", ATT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", check.ATTENTION_CONFIGS, ids=check._label)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__[7:])
def test_attention_against_reference(backend, dtype, cfg, layout):
    s, t, cd = layout(dtype)
    cfg = dict(cfg, channel_dim=cd)
    public, ref = check.attention_case_fns(cfg)
    _assert_verdicts(verify_op(public, ref, s, t, backend=backend))


def map_shapes(dtype, strided=False):
    s = [_rand(4, 3, 5, 7, dtype=dtype), _rand(4, 10, dtype=dtype), _rand(4, 2, 17, dtype=dtype)]
    t = [_rand(4, 3, 5, 7, dtype=dtype), _rand(4, 10, dtype=dtype), _rand(4, 2, 17, dtype=dtype)]
    if strided:
        s[0] = s[0].to(memory_format=torch.channels_last)          # dense, other order than teacher
        t[2] = _rand(4, 2, 34, dtype=dtype)[:, :, ::2]            # non-dense
        s[1] = _rand(10, 4, dtype=dtype).t()                        # transposed
    return s, t


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", check.MAP_CONFIGS, ids=check._label)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_maps_against_reference(backend, dtype, cfg, strided):
    public, ref = check.map_case_fns(cfg)
    _assert_verdicts(verify_op(public, ref, *map_shapes(dtype, strided), backend=backend))


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_maps_channels_last_pairs_memory_order(backend):
    """Student and teacher both channels_last: the kernel walks memory order, which must pair the
    same logical elements (values equal the contiguous computation)."""
    s = [_rand(2, 5, 4, 3)]
    t = [_rand(2, 5, 4, 3)]
    with lw.use_backend(backend):
        for metric in ("cos", "jsd"):
            a = lw.map_discrepancy(s, t, metric=metric, reduction="none")
            b = lw.map_discrepancy([x.to(memory_format=torch.channels_last) for x in s],
                                   [x.to(memory_format=torch.channels_last) for x in t],
                                   metric=metric, reduction="none")
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# eps edge cases: all-zero maps, maps whose norm / sum falls below eps, exactly representable
# ------------------------------------------------------------------------------------------------

ZERO_CASES = {
    "student-zero": lambda s, t: ([torch.zeros_like(s[0]), s[1]], t),
    "teacher-zero": lambda s, t: (s, [torch.zeros_like(t[0]), t[1]]),
    "both-zero": lambda s, t: ([torch.zeros_like(s[0]), s[1]], [torch.zeros_like(t[0]), t[1]]),
    "below-eps": lambda s, t: ([s[0] * 1e-9, s[1]], t),          # |a| ~ 1e-18 < eps = 1e-12
    "zero-rows": lambda s, t: ([s[0] * (torch.arange(s[0].shape[2]) % 2).view(1, 1, -1, 1), s[1]], t),
}


@pytest.mark.parametrize("backend", ATT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cfg", check.ATTENTION_CONFIGS, ids=check._label)
@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_attention_eps_boundaries(backend, dtype, cfg, case):
    s, t, _ = layout_contiguous(dtype)
    s, t = ZERO_CASES[case](s, t)
    public, ref = check.attention_case_fns(cfg)
    v = verify_op(public, ref, s, t, backend=backend)
    _assert_verdicts(v)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("cfg", check.MAP_CONFIGS, ids=check._label)
@pytest.mark.parametrize("which", ["student", "teacher", "both", "partial"])
def test_map_eps_boundaries(backend, cfg, which):
    s, t = map_shapes(torch.float64)
    if which in ("student", "both"):
        s[0] = torch.zeros_like(s[0])
    if which in ("teacher", "both"):
        t[0] = torch.zeros_like(t[0])
    if which == "partial":  # a few zero entries: |u| has exact zeros where sign() is 0
        s[1] = s[1] * (torch.arange(10) % 3 != 0)
    public, ref = check.map_case_fns(cfg)
    _assert_verdicts(verify_op(public, ref, s, t, backend=backend))


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_zero_student_values(backend):
    """Exact values at the boundary, not only agreement: a zero student map gives q_s = 0, so
    "at" equals mean(q_t^2) = 1/N, and the gradient w.r.t. zero features is exactly 0."""
    s = [torch.zeros(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)]
    t = [_rand(2, 6, 4, 5, dtype=torch.float64)]
    with lw.use_backend(backend):
        d = lw.attention_discrepancy(s, t, reduction="none")
        (g,) = torch.autograd.grad(d.sum(), s)
    torch.testing.assert_close(d, torch.full((1, 2), 1 / 20, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(g) == 0
    # jsd with a zero student: P_s = 0, M = (1-beta) P_t, d = (1-beta) log(1/(1-beta))
    with lw.use_backend(backend):
        d = lw.attention_discrepancy(s, t, metric="jsd", beta=0.25, reduction="none")
    torch.testing.assert_close(d, torch.full((1, 2), 0.75 * math.log(1 / 0.75), dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Definitions: the official AT loss, metric ranges, reductions, resize, K = 0
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_equals_official_attention_transfer_loss(backend):
    s = [_rand(4, 8, 6, 6, dtype=torch.float64), _rand(4, 16, 3, 3, dtype=torch.float64)]
    t = [_rand(4, 12, 6, 6, dtype=torch.float64), _rand(4, 32, 3, 3, dtype=torch.float64)]
    with lw.use_backend(backend):
        D = lw.attention_discrepancy(s, t)
    torch.testing.assert_close(D.sum(), reference.eager_at_loss(s, t), rtol=1e-12, atol=1e-15)
    for j in range(2):
        at = lambda x: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))  # noqa: E731
        torch.testing.assert_close(D[j], (at(s[j]) - at(t[j])).pow(2).mean(), rtol=1e-12, atol=1e-15)


def test_jsd_matches_textbook_formula():
    """JSD against an independent numpy-free float64 evaluation with scipy-style definition."""
    s, t = _rand(2, 3, 4, 4, dtype=torch.float64), _rand(2, 5, 4, 4, dtype=torch.float64)
    beta = 0.3
    d = lw.attention_discrepancy(s, t, metric="jsd", beta=beta, reduction="none")[0]
    for b in range(2):
        ps = s[b].pow(2).mean(0).flatten()
        pt = t[b].pow(2).mean(0).flatten()
        ps, pt = ps / ps.sum(), pt / pt.sum()
        m = beta * ps + (1 - beta) * pt
        kl = lambda p, q: (p * (p / q).log()).sum()  # noqa: E731
        torch.testing.assert_close(d[b], beta * kl(ps, m) + (1 - beta) * kl(pt, m), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_softmax_normalisation(backend):
    s, t = _rand(2, 3, 4, 4, dtype=torch.float64), _rand(2, 5, 4, 4, dtype=torch.float64)
    with lw.use_backend(backend):
        d = lw.attention_discrepancy(s, t, metric="jsd", normalize="softmax", tau=0.7, reduction="none")[0]
    ps = torch.softmax(s.pow(2).mean(1).flatten(1) / 0.7, 1)
    pt = torch.softmax(t.pow(2).mean(1).flatten(1) / 0.7, 1)
    m = 0.5 * (ps + pt)
    expect = 0.5 * (ps * (ps / m).log()).sum(1) + 0.5 * (pt * (pt / m).log()).sum(1)
    torch.testing.assert_close(d, expect, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_cos_metric_is_two_minus_two_cos(backend):
    u, w = _rand(5, 3, 7, dtype=torch.float64), _rand(5, 3, 7, dtype=torch.float64)
    with lw.use_backend(backend):
        d = lw.map_discrepancy(u, w, reduction="none")[0]
    torch.testing.assert_close(d, 2 - 2 * F.cosine_similarity(u.flatten(1), w.flatten(1)), rtol=1e-12, atol=1e-14)
    with lw.use_backend(backend):
        assert lw.map_discrepancy(u, u.clone(), reduction="none").abs().max() < 1e-14
        torch.testing.assert_close(lw.map_discrepancy(u, -u, reduction="none"), torch.full((1, 5), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_reductions_and_single_tensor(backend):
    s, t, _ = layout_contiguous(torch.float32)
    with lw.use_backend(backend):
        none = lw.attention_discrepancy(s, t, reduction="none")
        mean = lw.attention_discrepancy(s, t)
        single = lw.attention_discrepancy(s[1], t[1])
    assert none.shape == (2, 3) and mean.shape == (2,) and single.shape == (1,)
    assert none.dtype == torch.float32
    torch.testing.assert_close(mean, none.mean(1))
    torch.testing.assert_close(single, mean[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_output_dtype(dtype):
    s, t, _ = layout_contiguous(dtype)
    expect = torch.float64 if dtype == torch.float64 else torch.float32
    assert lw.attention_discrepancy(s, t).dtype == expect
    assert lw.map_discrepancy(s[0], s[0]).dtype == expect
    # mixed: float64 teacher with float32 student accumulates in float64
    assert lw.attention_discrepancy(s[0].float(), t[0].double()).dtype == torch.float64


def test_empty_pairs():
    assert lw.attention_discrepancy([], []).shape == (0,)
    assert lw.attention_discrepancy([], [], reduction="none").shape == (0, 0)
    assert lw.map_discrepancy([], []).shape == (0,)


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_resize_pool(backend):
    s = _rand(2, 4, 8, 8, dtype=torch.float64, scale=1.0).requires_grad_()
    t = _rand(2, 6, 4, 4, dtype=torch.float64)
    with lw.use_backend(backend):
        d = lw.attention_discrepancy(s, t, resize="pool")
        expect = lw.attention_discrepancy(F.adaptive_avg_pool2d(s, (4, 4)), t)
        d.sum().backward()
    torch.testing.assert_close(d, expect)
    assert s.grad is not None and s.grad.shape == s.shape
    # teacher larger, token layout
    ts = _rand(2, 9, 5, dtype=torch.float64)
    tt = _rand(2, 3, 7, dtype=torch.float64)
    with lw.use_backend(backend):
        d2 = lw.attention_discrepancy(ts, tt, channel_dim=-1, resize="pool")
        e2 = lw.attention_discrepancy(F.adaptive_avg_pool1d(ts.transpose(1, 2), 3).transpose(1, 2), tt, channel_dim=-1)
    torch.testing.assert_close(d2, e2)


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_teacher_never_receives_gradient(backend):
    s = _rand(2, 3, 4, 4).requires_grad_()
    t = _rand(2, 5, 4, 4).requires_grad_()   # a teacher run without torch.no_grad()
    with lw.use_backend(backend):
        lw.attention_discrepancy(s, t).sum().backward()
    assert s.grad is not None and t.grad is None
    u = _rand(2, 7).requires_grad_()
    w = _rand(2, 7).requires_grad_()
    with lw.use_backend(backend):
        lw.map_discrepancy(u, w).sum().backward()
    assert u.grad is not None and w.grad is None


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 4), C_s=st.integers(1, 9), C_t=st.integers(1, 9),
    H=st.integers(1, 6), W=st.integers(1, 6), beta=st.floats(0.05, 0.95),
    metric=st.sampled_from(["at", "jsd"]), p=st.sampled_from([1.0, 2.0, 3.0]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_property_native_matches_reference(B, C_s, C_t, H, W, beta, metric, p, scale):
    s = [_rand(B, C_s, H, W, dtype=torch.float64, scale=scale)]
    t = [_rand(B, C_t, H, W, dtype=torch.float64)]
    cfg = dict(metric=metric, p=p, beta=beta)
    public, ref = check.attention_case_fns(cfg)
    for backend in ATT_BACKENDS:
        _assert_verdicts(verify_op(public, ref, s, t, backend=backend))
    d = lw.attention_discrepancy(s, t, **cfg, reduction="none")
    assert (d >= -1e-15).all()
    if metric == "jsd":  # weighted JSD is bounded by the entropy of (beta, 1 - beta)
        h = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert (d <= h + 1e-12).all()
    else:  # |q_s - q_t|^2 <= 2 for nonnegative unit vectors, divided by N
        assert (d <= 2.0 / (H * W) + 1e-12).all()


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), n=st.integers(1, 40), metric=st.sampled_from(["cos", "jsd"]),
       zero_frac=st.floats(0.0, 1.0))
def test_property_maps(B, n, metric, zero_frac):
    u = _rand(B, n, dtype=torch.float64)
    u = u * (torch.rand(B, n, dtype=torch.float64) >= zero_frac)
    w = _rand(B, n, dtype=torch.float64)
    public, ref = check.map_case_fns(dict(metric=metric))
    for backend in MAP_BACKENDS:
        _assert_verdicts(verify_op(public, ref, [u], [w], backend=backend))
    d = lw.map_discrepancy(u, w, metric=metric, reduction="none")
    assert (d >= -1e-15).all() and (d <= (4 if metric == "cos" else math.log(2)) + 1e-12).all()


def test_nonfinite_inputs_propagate():
    """Non-finite features give a non-finite D for that layer only (the rate rule skips it)."""
    s, t, _ = layout_contiguous(torch.float32)
    s[0] = s[0].clone()
    s[0][1, 0, 0, 0] = float("nan")
    d = lw.attention_discrepancy(s, t, reduction="none")
    assert torch.isnan(d[0, 1]) and torch.isfinite(d[0, [0, 2]]).all() and torch.isfinite(d[1]).all()


# ------------------------------------------------------------------------------------------------
# Native op machinery: opcheck, gradcheck, one call for K layers, compile
# ------------------------------------------------------------------------------------------------


def _native_samples():
    s, t, _ = layout_contiguous(torch.float32)
    s = [x.requires_grad_() for x in s]
    cl_s, cl_t, _ = layout_channels_last(torch.float64)
    tok_s, tok_t, _ = layout_tokens(torch.float16)
    return [
        (s, t, 2.0, "at", 0.5, "sum", 1.0, 1e-12, 1),
        ([x.requires_grad_() for x in cl_s], cl_t, 1.5, "jsd", 0.3, "softmax", 0.5, 1e-12, 1),
        (tok_s, tok_t, 2.0, "jsd", 0.5, "sum", 1.0, 1e-6, -1),
    ]


@requires_native
@pytest.mark.parametrize("i", range(3))
def test_opcheck_attention(i):
    torch.library.opcheck(torch.ops.lwkd.attention_discrepancy.default, _native_samples()[i])


@requires_native
@pytest.mark.parametrize("metric", ["cos", "jsd"])
def test_opcheck_maps(metric):
    s, t = map_shapes(torch.float32, strided=True)
    s = [x.detach().requires_grad_() for x in s]
    torch.library.opcheck(torch.ops.lwkd.map_discrepancy.default, (s, t, metric, 0.4, 1e-12))
    g = torch.rand(3, 4)
    s = [x.detach() for x in s]  # the backward op is first-order only (double backward raises)
    torch.library.opcheck(torch.ops.lwkd.map_discrepancy_backward.default, (g, s, t, metric, 0.4, 1e-12))


@requires_native
def test_opcheck_attention_backward():
    s, t, _ = layout_channels_last(torch.float32)
    d, ms, mt = torch.ops.lwkd.attention_discrepancy(s, t, 2.0, "at", 0.5, "sum", 1.0, 1e-12, 1)
    torch.library.opcheck(
        torch.ops.lwkd.attention_discrepancy_backward.default,
        (torch.rand_like(d), s, ms, mt, 2.0, "at", 0.5, "sum", 1.0, 1e-12, 1),
    )


# The gradchecks: float64 finite differences against each backend's own backward, at tiny ragged
# shapes (the float32/16/bf16 gradients are held to the float64 reference by the grids above).
# Backends compiled for this CPU get the full gradcheck (one forward per input element and sign);
# those whose kernels run under an interpreter or emulator (Triton: ~0.2 s a call) get gradcheck's
# fast mode, which compares one random projection of the Jacobian per input, two forwards and
# one backward per input tensor: the same property at a fiftieth of the cost.
_FULL_GRADCHECK = ("reference", "native")


def _gradcheck(f, inputs, backend):
    return torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=backend not in _FULL_GRADCHECK)


@pytest.mark.parametrize("backend", ATT_BACKENDS)
@pytest.mark.parametrize("cfg", check.ATTENTION_CONFIGS, ids=check._label)
def test_gradcheck_attention(backend, cfg):
    s = [_rand(2, 3, 3, 4, dtype=torch.float64).requires_grad_(), _rand(2, 2, 5, dtype=torch.float64).requires_grad_()]
    t = [_rand(2, 4, 3, 4, dtype=torch.float64), _rand(2, 3, 5, dtype=torch.float64)]

    def f(a, b):
        with lw.use_backend(backend):
            return lw.attention_discrepancy([a, b], t, reduction="none", **cfg)

    assert _gradcheck(f, tuple(s), backend)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("metric", ["cos", "jsd"])
def test_gradcheck_maps(backend, metric):
    u = [_rand(3, 2, 5, dtype=torch.float64).requires_grad_(), _rand(3, 7, dtype=torch.float64).requires_grad_()]
    w = [_rand(3, 2, 5, dtype=torch.float64), _rand(3, 7, dtype=torch.float64)]

    def f(a, b):
        with lw.use_backend(backend):
            return lw.map_discrepancy([a, b], w, metric=metric, reduction="none")

    assert _gradcheck(f, tuple(u), backend)


class _CountLwkdOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lwkd":
            self.calls.append(func._opname)
        return func(*args, **(kwargs or {}))


@requires_native
@pytest.mark.parametrize("op", ["attention", "maps"])
def test_twelve_layers_cost_one_native_call_each_way(op):
    K = 12
    if op == "attention":
        s = [_rand(2, 3 + k, 4 + k % 3, 5).requires_grad_() for k in range(K)]
        t = [_rand(2, 2 + k, 4 + k % 3, 5) for k in range(K)]
        fn = lw.attention_discrepancy
    else:
        s = [_rand(2, 3 + k).requires_grad_() for k in range(K)]
        t = [_rand(2, 3 + k) for k in range(K)]
        fn = lw.map_discrepancy
    with lw.use_backend("native"), _CountLwkdOps() as mode:
        D = fn(s, t)
        D.sum().backward()
    names = [c for c in mode.calls]
    base = "attention_discrepancy" if op == "attention" else "map_discrepancy"
    assert names == [base, base + "_backward"], names
    assert all(x.grad is not None for x in s)


@requires_native
def test_compiles_fullgraph():
    s, t, _ = layout_contiguous(torch.float32)
    s = [x.requires_grad_() for x in s]

    def f(s, t):
        return lw.attention_discrepancy(s, t).sum() + lw.map_discrepancy(s[0], s[0].detach() * 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(s, t)
    out.backward()
    g_c = [x.grad.clone() for x in s]
    for x in s:
        x.grad = None
    f(s, t).backward()
    torch.testing.assert_close(out, f(s, t))
    for a, b in zip(g_c, [x.grad for x in s]):
        torch.testing.assert_close(a, b)


@requires_native
def test_native_uses_float64_accumulation_for_float32():
    """A float32 input whose channel sums lose precision in float32 arithmetic: large C, values
    of very different magnitude.  Native (float64 accumulation) stays within the float32 rule."""
    C = 4096
    x = torch.ones(1, C, 2, 2)
    x[:, 0] = 1e4
    y = torch.rand(1, 3, 2, 2)
    d = lw.attention_discrepancy(x, y, reduction="none")
    ref = reference.attention_discrepancy([x.double()], [y.double()])
    assert compare(d, ref, torch.float32).ok


@requires_native
def test_double_backward_raises_clearly():
    s = _rand(2, 3, 4, 4, dtype=torch.float64).requires_grad_()
    t = _rand(2, 5, 4, 4, dtype=torch.float64)
    with lw.use_backend("native"):
        (g,) = torch.autograd.grad(lw.attention_discrepancy(s, t).sum(), s, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.pow(2).sum().backward()
    # the reference backend supports it (plain autograd)
    with lw.use_backend("reference"):
        (g,) = torch.autograd.grad(lw.attention_discrepancy(s, t).sum(), s, create_graph=True)
        g.pow(2).sum().backward()
    assert s.grad is not None
