"""Non-finite inputs are never a perfect match (SPEC section 2): a NaN or infinite element in one
sample of one layer makes that sample's value non-finite on every backend, and the other samples
and layers keep the values and gradients they have without it."""

from __future__ import annotations

import math

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import check

from conftest import available_backends

ATT = available_backends("attention_discrepancy")
MAPS = available_backends("map_discrepancy")
BAD = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
# where the bad element goes: both tensors of the pair (the same corrupted input reached both
# models), the student only, the teacher only
SIDES = ("both", "student", "teacher")


def _corrupt(s, t, side, value):
    s, t = [x.clone() for x in s], [x.clone() for x in t]
    if side in ("both", "student"):
        s[1][0].view(-1)[3] = value  # layer 1, sample 0
    if side in ("both", "teacher"):
        t[1][0].view(-1)[5] = value
    return s, t


def _check(fn, s, t, side, value, backend):
    clean_s = [x.detach().requires_grad_(True) for x in s]
    with lw.use_backend(backend):
        ref = fn(clean_s, t)
    ref_grads = torch.autograd.grad(ref.sum(), clean_s)
    bad_s, bad_t = _corrupt(s, t, side, value)
    bad_s = [x.detach().requires_grad_(True) for x in bad_s]
    with lw.use_backend(backend):
        d = fn(bad_s, bad_t)
    grads = torch.autograd.grad(d.sum(), bad_s)
    assert not torch.isfinite(d[1, 0]), f"{side} {value}: the corrupted sample gave the finite value {float(d[1, 0])}"
    keep = torch.ones_like(d, dtype=torch.bool)
    keep[1, 0] = False
    torch.testing.assert_close(d[keep], ref[keep], rtol=1e-6, atol=1e-7)
    for k in (0, 2):  # the other layers' gradients are untouched
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1][1:], ref_grads[1][1:], rtol=1e-6, atol=1e-7)  # other samples


@pytest.mark.parametrize("backend", ATT)
@pytest.mark.parametrize("cfg", check.ATTENTION_CONFIGS, ids=check._label)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("bad", list(BAD))
def test_attention_nonfinite_sample_is_nonfinite(backend, cfg, side, bad):
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(3, 4, 5, 6, generator=g) for _ in range(3)]
    t = [torch.randn(3, 7, 5, 6, generator=g) for _ in range(3)]
    _check(lambda a, b: lw.attention_discrepancy(a, b, reduction="none", **cfg), s, t, side, BAD[bad], backend)


@pytest.mark.parametrize("backend", MAPS)
@pytest.mark.parametrize("metric", ["cos", "jsd"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("bad", list(BAD))
def test_map_nonfinite_sample_is_nonfinite(backend, metric, side, bad):
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(3, 2, 5, 7, generator=g) for _ in range(3)]
    t = [torch.randn(3, 2, 5, 7, generator=g) for _ in range(3)]
    _check(lambda a, b: lw.map_discrepancy(a, b, metric=metric, reduction="none"), s, t, side, BAD[bad], backend)
