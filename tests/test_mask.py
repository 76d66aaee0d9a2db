"""Masked locations (SPEC section 2): ``mask=`` of attention_discrepancy and map_discrepancy.

Oracle: the unmasked float64 reference run sample by sample on the features with the masked
locations *dropped* (an independent computation: no masked code path involved), plus plain eager
formulas for the all-masked edge case.
"""

import logging

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import ops
from lwkd_fast.testing import compare, verify_op

from conftest import available_backends

F64 = torch.float64
ATT_BACKENDS = available_backends("attention_discrepancy")
MAP_BACKENDS = available_backends("map_discrepancy")
METRICS = [("at", "sum"), ("jsd", "sum"), ("jsd", "softmax")]


def _case(dtype=F64, seed=0):
    """Two pairs: a token layout (B, N, D) and an image layout (B, C, H, W); ragged masks, one
    sample of pair 0 entirely masked, one sample of pair 1 entirely valid."""
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(4, 9, 5, generator=g, dtype=F64), torch.randn(4, 3, 3, 5, generator=g, dtype=F64)]
    t = [torch.randn(4, 9, 7, generator=g, dtype=F64), torch.randn(4, 6, 3, 5, generator=g, dtype=F64)]
    m0 = torch.ones(4, 9, dtype=torch.bool)
    m0[1, 6:] = False
    m0[2] = False
    m0[3, ::2] = False
    m1 = torch.rand(4, 3, 5, generator=g) > 0.4
    m1[0] = True
    s = [x.to(dtype) for x in s]
    t = [x.to(dtype) for x in t]
    return s, t, [m0, m1]


def _dropped(s, t, masks, metric, normalize, cds=(-1, 1)):
    """(K, B) float64 per-sample values of the unmasked reference on the valid locations only."""
    rows = []
    for fs, ft, m, cd in zip(s, t, masks, cds):
        vals = []
        for b in range(fs.shape[0]):
            a = fs[b:b + 1].movedim(cd, 1).flatten(2)
            c = ft[b:b + 1].movedim(cd, 1).flatten(2)
            keep = m[b].flatten()
            if not keep.any():
                vals.append(torch.zeros((), dtype=F64))
                continue
            with lw.use_backend("reference"):
                vals.append(lw.attention_discrepancy(a[:, :, keep], c[:, :, keep], metric=metric,
                                                     normalize=normalize, tau=0.7, reduction="none")[0, 0])
        rows.append(torch.stack(vals))
    return torch.stack(rows)


def _masked(s, t, masks, metric, normalize, backend="reference"):
    """Both pairs in one call each (channel_dim differs between the two layouts)."""
    with lw.use_backend(backend):
        d0 = lw.attention_discrepancy(s[0], t[0], metric=metric, normalize=normalize, tau=0.7, channel_dim=-1,
                                      reduction="none", mask=masks[0])
        d1 = lw.attention_discrepancy(s[1], t[1], metric=metric, normalize=normalize, tau=0.7,
                                      reduction="none", mask=masks[1])
    return torch.cat([d0, d1])


@pytest.mark.parametrize("metric,normalize", METRICS)
def test_masked_equals_dropping_the_masked_locations(metric, normalize):
    s, t, masks = _case()
    got = _masked(s, t, masks, metric, normalize)
    ref = _dropped(s, t, masks, metric, normalize)
    assert compare(got, ref, F64).ok, (got, ref)
    assert got[0, 2] == 0  # the all-masked sample
    # the mask matters: the unmasked values differ
    with lw.use_backend("reference"):
        plain = lw.attention_discrepancy(s[0], t[0], metric=metric, normalize=normalize, tau=0.7, channel_dim=-1,
                                         reduction="none")
    assert not compare(plain[0], got[0], F64).ok


@pytest.mark.parametrize("metric,normalize", METRICS)
def test_masked_gradients_equal_dropping(metric, normalize):
    s, t, masks = _case()
    w = torch.linspace(0.5, 1.5, 4, dtype=F64)
    s_leaf = [x.clone().requires_grad_(True) for x in s]
    d = _masked(s_leaf, t, masks, metric, normalize)
    grads = torch.autograd.grad((d * w).sum(), s_leaf)
    s_ref = [x.clone().requires_grad_(True) for x in s]
    ref = _dropped(s_ref, t, masks, metric, normalize)
    grads_ref = torch.autograd.grad((ref * w).sum(), s_ref)
    for k, (g, r, m, cd) in enumerate(zip(grads, grads_ref, masks, (-1, 1))):
        assert torch.isfinite(g).all()
        assert compare(g, r, F64).ok, k
        # masked locations receive exactly no gradient (dropped) and valid ones some
        locs = g.movedim(cd, 1).flatten(2).abs().sum(1)  # (B, N)
        assert torch.all(locs[~m.reshape(m.shape[0], -1)] == 0)
        assert torch.all(locs[m.reshape(m.shape[0], -1)] > 0)


def test_all_masked_sample_is_zero_with_zero_gradient():
    s = torch.randn(2, 4, 6, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 6, dtype=F64)
    m = torch.zeros(2, 6, dtype=torch.bool)
    for metric, normalize in METRICS:
        with lw.use_backend("reference"):
            d = lw.attention_discrepancy(s, t, metric=metric, normalize=normalize, mask=m)
        assert torch.equal(d, torch.zeros(1, dtype=F64))
        (g,) = torch.autograd.grad(d.sum(), s)
        assert torch.equal(g, torch.zeros_like(g))


def test_full_mask_equals_no_mask_and_one_mask_serves_every_pair():
    s, t, _ = _case()
    ones = torch.ones(4, 9, dtype=torch.long)  # 0/1 integers (an HF attention_mask) work too
    for metric, normalize in METRICS:
        with lw.use_backend("reference"):
            a = lw.attention_discrepancy([s[0], s[0] * 2], [t[0], t[0]], metric=metric, normalize=normalize,
                                         channel_dim=-1, mask=ones)
            b = lw.attention_discrepancy([s[0], s[0] * 2], [t[0], t[0]], metric=metric, normalize=normalize,
                                         channel_dim=-1)
        assert compare(a, b, F64).ok


def test_mask_list_with_none_entries_and_reshaped_masks():
    s, t, masks = _case()
    with lw.use_backend("reference"):
        d = lw.attention_discrepancy([s[1], s[1]], [t[1], t[1]], mask=[None, masks[1].flatten(1)],
                                     reduction="none")
        plain = lw.attention_discrepancy(s[1], t[1], reduction="none")
        spatial = lw.attention_discrepancy(s[1], t[1], reduction="none", mask=masks[1])  # (B, H, W)
    assert torch.equal(d[0], plain[0]) and torch.equal(d[1], spatial[0])


@pytest.mark.parametrize("backend", ATT_BACKENDS)
def test_mask_list_with_none_entries_differentiates_on_every_backend(backend):
    """A mask list holding None (pair 0 unmasked, pair 1 masked): values and gradients of every
    backend against the reference backend in float64 (the native autograd once failed on the
    structure of such a list)."""
    s, t, masks = _case()
    sp, tp = [s[1], s[1].flip(0)], [t[1], t[1].flip(0)]
    w = torch.linspace(0.5, 1.5, 4, dtype=F64)
    out = {}
    for b in (backend, "reference"):
        leaves = [x.clone().requires_grad_(True) for x in sp]
        with lw.use_backend(b):
            d = lw.attention_discrepancy(leaves, tp, mask=[None, masks[1]], reduction="none")
        out[b] = (d, torch.autograd.grad((d * w).sum(), leaves))
    (d, grads), (d_ref, grads_ref) = out[backend], out["reference"]
    assert compare(d, d_ref, F64).ok
    for k, (g, r) in enumerate(zip(grads, grads_ref)):
        v = compare(g, r, F64)
        assert v.ok, f"grad[{k}]: {v}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric,normalize", METRICS)
def test_masked_low_precision_within_spec_tolerance(dtype, metric, normalize):
    s, t, masks = _case(dtype)

    def public(sb, tb):
        return lw.attention_discrepancy(sb, tb, metric=metric, normalize=normalize, tau=0.7, channel_dim=-1,
                                        reduction="none", mask=masks[0])

    def ref(sb, tb, compute_dtype):
        return lw.reference.attention_discrepancy(sb, tb, metric=metric, normalize=normalize, tau=0.7,
                                                  channel_dim=-1, compute_dtype=compute_dtype, masks=[masks[0]])

    verdicts = verify_op(public, ref, [s[0]], [t[0]], backend="reference")
    assert all(v.ok for v in verdicts.values()), {k: str(v) for k, v in verdicts.items()}


# ------------------------------------------------------------------------------------------------
# Backends: auto routes masked calls to a backend that takes the mask; forced ones without
# support raise.  Written over every available backend, so kernels are covered once they can.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ATT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("metric,normalize", METRICS)
def test_every_backend_takes_the_mask(backend, dtype, metric, normalize):
    """The kernels of every backend take the mask (values and gradients against the float64
    computation that drops the masked locations sample by sample)."""
    s, t, masks = _case(dtype)
    w = torch.linspace(0.5, 1.5, 4, dtype=F64)
    s_leaf = [x.clone().requires_grad_(True) for x in s]
    got = _masked(s_leaf, t, masks, metric, normalize, backend)
    grads = torch.autograd.grad((got * w.to(got.dtype)).sum(), s_leaf)
    s64 = [x.detach().double().requires_grad_(True) for x in s]
    ref = _dropped(s64, [x.double() for x in t], masks, metric, normalize)
    grads_ref = torch.autograd.grad((ref * w).sum(), s64)
    v = compare(got, ref, dtype)
    assert v.ok, v
    for k, (g, r) in enumerate(zip(grads, grads_ref)):
        v = compare(g, r, dtype)
        assert v.ok, f"grad[{k}]: {v}"
        assert torch.isfinite(g).all()


def test_auto_with_mask_runs_the_kernels_of_its_backend(caplog):
    s, t, masks = _case(torch.float32)
    ops._logged.clear()
    auto = ops.select_backend("attention_discrepancy", torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="lwkd_fast"):
        got = _masked(s, t, masks, "at", "sum", backend="auto")
    assert torch.equal(got, _masked(s, t, masks, "at", "sum", backend=auto))
    assert not [r for r in caplog.records if "mask" in r.getMessage()]


# ------------------------------------------------------------------------------------------------
# map_discrepancy: dropping entries == zeroing them in both maps, exact on every backend
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("metric", ["cos", "jsd"])
def test_map_mask_equals_dropping_entries_on_every_backend(backend, metric):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(3, 7, 4, generator=g)
    w = torch.randn(3, 7, 4, generator=g)
    m = torch.ones(3, 7, dtype=torch.bool)
    m[0, 5:] = False
    m[2, :3] = False
    ul = u.clone().requires_grad_(True)
    with lw.use_backend(backend):
        d = lw.map_discrepancy(ul, w, metric=metric, mask=m, reduction="none")[0]
    (grad,) = torch.autograd.grad(d.sum(), ul)
    ref, ref_grad = [], torch.zeros(3, 7, 4, dtype=F64)
    for b in range(3):
        ub = u[b, m[b]].double().reshape(1, -1).requires_grad_(True)
        with lw.use_backend("reference"):
            db = lw.map_discrepancy(ub, w[b, m[b]].double().reshape(1, -1), metric=metric)[0]
        ref.append(db)
        ref_grad[b, m[b]] = torch.autograd.grad(db, ub)[0].reshape(-1, 4)
    assert compare(d, torch.stack(ref).detach(), torch.float32).ok
    assert compare(grad, ref_grad, torch.float32).ok
    assert torch.all(grad[~m] == 0)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def test_mask_errors_name_the_op_pair_and_shapes():
    s, t, masks = _case(torch.float32)
    att = lw.attention_discrepancy
    with pytest.raises(ValueError, match=r"attention_discrepancy: pair 1: mask\[1\] has shape \(4, 14\) but "
                                         r"student_feats\[1\] has shape \(4, 3, 3, 5\); expected \(B, N\) = "
                                         r"\(4, 15\) or \(B, \*S\) = \(4, 3, 5\)"):
        att(s[1:] * 2, t[1:] * 2, mask=[None, torch.ones(4, 14, dtype=torch.bool)])
    with pytest.raises(ValueError, match="got 3 masks for 2 layer pairs"):
        att(s[1:] * 2, t[1:] * 2, mask=[None] * 3)
    with pytest.raises(ValueError, match=r"pair 0: mask\[0\] .* must hold only 0 and 1"):
        att(s[1], t[1], mask=torch.full((4, 15), 2))
    with pytest.raises(ValueError, match=r"pair 0: mask\[0\] is on meta but student_feats\[0\] is on cpu"):
        att(s[1], t[1], mask=torch.ones(4, 15, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match=r"mask\[0\] has dtype torch.complex64"):
        att(s[1], t[1], mask=torch.ones(4, 15, dtype=torch.complex64))
    with pytest.raises(TypeError, match="mask must be None, a tensor or a list"):
        att(s[1], t[1], mask="tokens")
    with pytest.raises(ValueError, match=r"map_discrepancy: pair 0: mask\[0\] has shape \(3, 4\) but "
                                         r"student_maps\[0\] has shape \(3, 7, 4\); expected \(B, \*P\)"):
        lw.map_discrepancy(torch.ones(3, 7, 4), torch.ones(3, 7, 4), mask=torch.ones(3, 4))
