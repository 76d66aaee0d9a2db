"""SPEC section 6's known float32 limit of the JSD gradient: with a small map sum or a custom eps
that clamps it, the float32 kernels and the float32 eager reference are within a few ulp of the
sample's largest gradient element; the CPU kernels (float64 inside) meet the elementwise rule."""

from __future__ import annotations

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast.testing import compare

from conftest import available_backends

ATT = available_backends("attention_discrepancy")
MAPS = available_backends("map_discrepancy")


def _grads(fn, s, t, backend, dtype):
    x = [v.to(dtype).requires_grad_(True) for v in s]
    with lw.use_backend(backend):
        d = fn(x, [v.to(dtype) for v in t])
    w = torch.rand(d.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) + 0.5
    return torch.autograd.grad((d * w.to(d.dtype)).sum(), x)


def _hold(fn, s, t, backend):
    s = [v.float().double() for v in s]  # exact float32 values: the oracle sees the same inputs
    t = [v.float().double() for v in t]
    ref = _grads(fn, s, t, "reference", torch.float64)
    got = _grads(fn, s, t, backend, torch.float32)
    row_ulps = 0.0 if backend == "native" else 4.0
    for k, (g, r) in enumerate(zip(got, ref)):
        v = compare(g, r, torch.float32, row_ulps=row_ulps)
        assert v.ok, f"grad[{k}]: {v}"


@pytest.mark.parametrize("backend", ATT)
@pytest.mark.parametrize("scale", [3e-4, 3e-3, 1e-2])
def test_attention_jsd_gradient_with_a_clamping_eps(backend, scale):
    g = torch.Generator().manual_seed(12)
    s = [torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64) * scale]
    t = [torch.randn(4, 7, 3, 3, generator=g, dtype=torch.float64) * scale]
    _hold(lambda a, b: lw.attention_discrepancy(a, b, metric="jsd", eps=1e-3, reduction="none"), s, t, backend)


@pytest.mark.parametrize("backend", MAPS)
@pytest.mark.parametrize("scale", [1e-6, 1e-5, 1e-4, 3e-4])
def test_map_jsd_gradient_with_a_clamping_eps(backend, scale):
    g = torch.Generator().manual_seed(13)
    s = [torch.randn(8, 7, generator=g, dtype=torch.float64) * scale]
    t = [torch.randn(8, 7, generator=g, dtype=torch.float64) * scale]
    _hold(lambda a, b: lw.map_discrepancy(a, b, metric="jsd", eps=1e-3, reduction="none"), s, t, backend)


def test_row_allowance_is_per_sample():
    ref = torch.tensor([[1000.0, 0.25], [1.0, 0.25]], dtype=torch.float64)
    bad = ref.clone()
    bad[1, 1] += 1e-4  # large next to its own row's max of 1: not covered by row 0's max
    assert compare(ref + torch.tensor([[0.0, 1e-4], [0.0, 0.0]], dtype=torch.float64), ref, torch.float32,
                   row_ulps=4).ok
    assert not compare(bad, ref, torch.float32, row_ulps=4).ok
