"""The value range of SPEC section 6 at the edge of each dtype: inside the documented range every
backend gives the right D; beyond it a sample is non-finite or still right -- never a finite wrong
value (a normaliser that overflowed used to normalise the map to zeros and give e.g. 1/N).

The oracle uses the scale invariance of "at", "jsd" (sum normalisation), "cos" and map "jsd":
D(c x) = D(x), evaluated in float64 on x / c."""

from __future__ import annotations

import pytest
import torch

import lwkd_fast as lw

from conftest import available_backends

# beyond the range the Triton interpreter's numpy arithmetic warns about the overflow it computes
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
ATT = available_backends("attention_discrepancy")
MAPS = available_backends("map_discrepancy")
# dtype -> (scales inside the documented range, scales beyond it); small scales stay well above
# the eps clamp of the normalisers (below it D is not scale invariant, by definition)
SCALES = {
    torch.float16: ((1e-2, 1e4), ()),             # |x| <= 65504: float32 accumulation always holds
    torch.bfloat16: ((1e-3, 1e8), (1e20, 1e30)),
    torch.float32: ((1e-3, 1e8), (1e12, 1e20, 1e30)),
    torch.float64: ((1e-3, 1e70), (1e100, 1e160)),
}
TOL = {torch.float16: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5), torch.float32: (1e-5, 1e-6),
       torch.float64: (1e-10, 1e-10)}


def _cases():
    for dtype, (inside, outside) in SCALES.items():
        for c in inside:
            yield pytest.param(dtype, c, True, id=f"{str(dtype)[6:]}-{c:g}-inside")
        for c in outside:
            yield pytest.param(dtype, c, False, id=f"{str(dtype)[6:]}-{c:g}-beyond")


def _hold(fn, s, t, dtype, c, inside, backend):
    xs = [(c * z).to(dtype) for z in s]
    xt = [(c * z).to(dtype) for z in t]
    assert all(torch.isfinite(x).all() for x in xs + xt)
    with lw.use_backend(backend):
        d = fn(xs, xt).double()
    with lw.use_backend("reference"):
        ref = fn([x.double() / c for x in xs], [x.double() / c for x in xt])
    rtol, atol = TOL[dtype]
    right = (d - ref).abs() <= atol + rtol * ref.abs()
    if inside:
        assert right.all(), f"inside the range: {d.tolist()} vs {ref.tolist()}"
    else:
        wrong = torch.isfinite(d) & ~right
        assert not wrong.any(), f"finite wrong values beyond the range: {d[wrong].tolist()} vs {ref[wrong].tolist()}"


@pytest.mark.parametrize("backend", ATT)
@pytest.mark.parametrize("metric", ["at", "jsd"])
@pytest.mark.parametrize("dtype, c, inside", list(_cases()))
def test_attention_range(backend, metric, dtype, c, inside):
    g = torch.Generator().manual_seed(8)
    s = [torch.randn(3, 6, 5, 6, generator=g, dtype=torch.float64)]
    t = [torch.randn(3, 9, 5, 6, generator=g, dtype=torch.float64)]
    _hold(lambda a, b: lw.attention_discrepancy(a, b, metric=metric, reduction="none"), s, t, dtype, c, inside,
          backend)


@pytest.mark.parametrize("backend", MAPS)
@pytest.mark.parametrize("metric", ["cos", "jsd"])
@pytest.mark.parametrize("dtype, c, inside", list(_cases()))
def test_map_range(backend, metric, dtype, c, inside):
    g = torch.Generator().manual_seed(9)
    s = [torch.randn(3, 4, 40, generator=g, dtype=torch.float64)]
    t = [torch.randn(3, 4, 40, generator=g, dtype=torch.float64)]
    _hold(lambda a, b: lw.map_discrepancy(a, b, metric=metric, reduction="none"), s, t, dtype, c, inside, backend)
