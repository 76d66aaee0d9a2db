"""Mixed dtypes in one call (SPEC section 6): with any float64 input the whole computation is
float64, so D is within 1e-10 of the reference on the upcast inputs; each student gradient is held
to the rule of its own dtype."""

from __future__ import annotations

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import check, reference
from lwkd_fast.testing import compare

from conftest import available_backends

ATT = available_backends("attention_discrepancy")
MAPS = available_backends("map_discrepancy")
COMBOS = [(torch.float64, torch.float32), (torch.float64, torch.float16), (torch.float64, torch.bfloat16),
          (torch.float32, torch.float64)]


def _ids(c):
    return f"{str(c[0])[6:]}-{str(c[1])[6:]}"


def _hold(fn, s, t, backend):
    s_b = [x.detach().requires_grad_(True) for x in s]
    with lw.use_backend(backend):
        d = fn(s_b, t)
    assert d.dtype == torch.float64
    w = torch.rand(d.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    grads = torch.autograd.grad((d * w).sum(), s_b)
    s64 = [x.detach().double().requires_grad_(True) for x in s]
    with lw.use_backend("reference"):
        d64 = fn(s64, [x.double() for x in t])
    g64 = torch.autograd.grad((d64 * w).sum(), s64)
    v = compare(d, d64, torch.float64)
    assert v.ok, f"D: {v}"
    for k, (g, r, x) in enumerate(zip(grads, g64, s)):
        v = compare(g, r, x.dtype)
        assert v.ok, f"grad[{k}] ({x.dtype}): {v}"


@pytest.mark.parametrize("backend", ATT)
@pytest.mark.parametrize("cfg", check.ATTENTION_CONFIGS, ids=check._label)
@pytest.mark.parametrize("dtypes", COMBOS, ids=_ids)
def test_attention_mixed_dtypes(backend, cfg, dtypes):
    g = torch.Generator().manual_seed(6)
    s = [torch.randn(3, 9, 7, 7, generator=g, dtype=torch.float64).to(dtypes[0]),
         torch.randn(3, 5, 11, generator=g, dtype=torch.float64).to(dtypes[0])]
    t = [torch.randn(3, 24, 7, 7, generator=g, dtype=torch.float64).to(dtypes[1]),
         torch.randn(3, 16, 11, generator=g, dtype=torch.float64).to(dtypes[1])]
    _hold(lambda a, b: lw.attention_discrepancy(a, b, reduction="none", **cfg), s, t, backend)


@pytest.mark.parametrize("backend", MAPS)
@pytest.mark.parametrize("metric", ["cos", "jsd"])
@pytest.mark.parametrize("dtypes", COMBOS, ids=_ids)
def test_maps_mixed_dtypes(backend, metric, dtypes):
    g = torch.Generator().manual_seed(7)
    s = [torch.randn(3, 2, 9, 9, generator=g, dtype=torch.float64).to(dtypes[0])]
    t = [torch.randn(3, 2, 9, 9, generator=g, dtype=torch.float64).to(dtypes[1])]
    _hold(lambda a, b: lw.map_discrepancy(a, b, metric=metric, reduction="none"), s, t, backend)
