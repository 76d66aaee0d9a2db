"""The per-layer learning-rate rule (SPEC section 4) on every backend available here, held
against a float64 oracle written in plain Python arithmetic (lwkd_fast.rule.oracle_rates)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lwkd_fast as lw
from lwkd_fast import ops, rule
from lwkd_fast.check import rule as check_rule
from lwkd_fast.testing import compare

from conftest import requires_native
from optim_helpers import NoHostSync, built_with_cuda, optim_backends

BACKENDS = optim_backends("layerwise_rates")
NAN, INF = float("nan"), float("inf")



def run_rule(backend, d, state, base_lr, **kw):
    with lw.use_backend(backend):
        return lw.layerwise_rates(d, state, base_lr, **kw)


def assert_close_to_oracle(actual, expected, dtype, what):
    v = compare(actual, torch.tensor(expected, dtype=torch.float64), dtype)
    assert v.ok, f"{what}: {v}"
    # tighter than the SPEC's rtol: the kernels round once from float64
    a = actual.detach().double().cpu()
    e = torch.tensor(expected, dtype=torch.float64)
    fin = torch.isfinite(e)
    rel = ((a - e).abs() / e.abs().clamp_min(1e-30))[fin]
    bound = 1.2e-7 if dtype == torch.float32 else 1e-14
    assert rel.numel() == 0 or float(rel.max()) <= bound, f"{what}: relative error {float(rel.max()):.3g}"


def _rounded(xs, dtype):
    return [float(x) for x in torch.tensor(xs, dtype=dtype).double()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("normalize", rule.RATE_NORMALIZE)
def test_rule_matches_oracle_over_steps(backend, sdtype, gamma, normalize):
    g = torch.Generator().manual_seed(11)
    K = 9
    running = normalize == "running"
    opts = dict(momentum=0.8, gamma=gamma, s_min=0.2, s_max=4.0)
    m0 = (0.5 + torch.rand(K, generator=g, dtype=torch.float64)).to(sdtype)
    state = m0.clone()
    ref_state = rule.new_reference_state(K, sdtype) if running else None
    ref = [[0.0] * K, [0.0] * K] if running else None
    nf = torch.zeros((), dtype=torch.int64)
    m_ref = m0.double().tolist()
    count = 0
    for step in range(6):
        d = torch.rand(K, generator=g) * 3 * torch.logspace(-3, 3, K)  # layers of very different scales
        d[step % K] = 0.0
        if step == 2:
            d[4] = NAN
        if step == 4:
            d[1], d[7] = INF, -INF
        if step == 5:
            d[3] = -0.25  # negative: unusable, like a non-finite value
        lr = 0.1 * 0.7 ** step
        state_in = _rounded(m_ref, sdtype)
        ref_in = [_rounded(ref[0], sdtype), _rounded(ref[1], sdtype)] if running else None
        ref = [list(ref_in[0]), list(ref_in[1])] if running else None
        before = state.clone()
        ref_before = ref_state.clone() if running else None
        eta = run_rule(backend, d, state, lr, nonfinite=nf, rate_normalize=normalize, ref_state=ref_state,
                       ref_momentum=0.7, **opts)
        eta_ref, m_ref, bad = rule.oracle_rates(d.double().tolist(), state_in, lr, ref=ref, ref_momentum=0.7,
                                                **opts)
        count += bad
        assert eta.dtype == sdtype and eta.shape == (K,)
        assert_close_to_oracle(eta, eta_ref, sdtype, f"eta step {step}")
        assert_close_to_oracle(state, m_ref, sdtype, f"state step {step}")
        if running:
            assert_close_to_oracle(ref_state, ref, sdtype, f"ref_state step {step}")
        # unusable layers keep the backend's own factor (and reference) bit for bit
        for j in range(K):
            dj = float(d[j])
            if not (math.isfinite(dj) and dj >= 0):
                assert torch.equal(state[j], before[j]), f"step {step}: layer {j} (d={dj}) changed its factor"
                if running:
                    assert torch.equal(ref_state[:, j], ref_before[:, j]), \
                        f"step {step}: layer {j} (d={dj}) changed its reference"
    assert int(nf) == count == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_edge_cases(backend):
    # sum <= eps: every finite layer targets clamp(1) = 1 -> momentum towards 1
    state = torch.tensor([2.0, 0.5, 1.0])
    eta = run_rule(backend, torch.zeros(3), state, 0.5, momentum=0.5)
    torch.testing.assert_close(state, torch.tensor([1.5, 0.75, 1.0]), rtol=0, atol=0)
    torch.testing.assert_close(eta, 0.5 * state, rtol=0, atol=0)
    # the clamp binds: r = [3*10/10.2, ...]
    state = torch.ones(3)
    run_rule(backend, torch.tensor([10.0, 0.1, 0.1]), state, 1.0, momentum=0.0, s_min=0.5, s_max=2.0)
    torch.testing.assert_close(state, torch.tensor([2.0, 0.5, 0.5]), rtol=0, atol=0)
    # all non-finite: nothing changes, the counter moves by one
    state = torch.tensor([0.3, 3.0])
    nf = torch.tensor(5, dtype=torch.int64)
    eta = run_rule(backend, torch.tensor([NAN, INF]), state, 2.0, nonfinite=nf)
    assert torch.equal(state, torch.tensor([0.3, 3.0])) and int(nf) == 6
    torch.testing.assert_close(eta, torch.tensor([0.6, 6.0]))
    # K = 0
    empty = torch.empty(0)
    nf = torch.zeros((), dtype=torch.int64)
    out = run_rule(backend, torch.empty(0), empty, 0.1, nonfinite=nf)
    assert out.shape == (0,) and int(nf) == 0
    # one layer: r = 1 whatever D is
    state = torch.tensor([0.5])
    run_rule(backend, torch.tensor([123.0]), state, 1.0, momentum=0.5)
    assert float(state) == 0.75


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_rule_tensor_base_lr(backend, lr_dtype):
    """A 0-dim tensor base rate (what a schedule writes into) gives the float result."""
    d = torch.tensor([0.2, 1.0, 0.6, 2.2])
    s1, s2 = torch.ones(4), torch.ones(4)
    lr_t = torch.tensor(0.05, dtype=lr_dtype)
    e1 = run_rule(backend, d, s1, lr_t)
    e2 = run_rule(backend, d, s2, float(lr_t.double()))
    assert torch.equal(s1, s2)
    assert torch.equal(e1, e2)
    lr_t.fill_(0.5)  # the tensor is read at call time
    e3 = run_rule(backend, d, s1, lr_t)
    torch.testing.assert_close(e3, 0.5 * s1, rtol=1e-7, atol=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.lists(st.one_of(st.floats(0.0, 1e6, allow_subnormal=False), st.sampled_from([NAN, INF, 0.0, 1e-20])),
               min_size=1, max_size=12),
    m=st.floats(0.05, 20.0),
    mu=st.floats(0.0, 0.99),
    gamma=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    lims=st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 20.0)).map(sorted),
)
def test_rule_property(d, m, mu, gamma, lims):
    """Random discrepancies (with NaN/inf/zeros/tiny values) on every backend against the oracle."""
    s_min, s_max = lims
    d32 = torch.tensor(d, dtype=torch.float32)
    m0 = torch.full((len(d),), m, dtype=torch.float32)
    eta_ref, m_ref, bad = rule.oracle_rates(d32.double().tolist(), m0.double().tolist(), 0.3, mu, gamma,
                                            s_min, s_max)
    for backend in BACKENDS:
        state = m0.clone()
        nf = torch.zeros((), dtype=torch.int64)
        eta = run_rule(backend, d32, state, 0.3, momentum=mu, gamma=gamma, s_min=s_min, s_max=s_max,
                       nonfinite=nf)
        assert_close_to_oracle(state, m_ref, torch.float32, backend)
        assert_close_to_oracle(eta, eta_ref, torch.float32, backend)
        assert int(nf) == int(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_backends_agree_bitwise_float64(backend):
    """All backends round the same float64 arithmetic once: float64 state agrees to 1 ulp."""
    g = torch.Generator().manual_seed(3)
    d = torch.rand(33, generator=g, dtype=torch.float64) * 5
    ref_state = torch.ones(33, dtype=torch.float64)
    ref = run_rule("reference", d, ref_state, 0.1, gamma=1.7)
    state = torch.ones(33, dtype=torch.float64)
    out = run_rule(backend, d, state, 0.1, gamma=1.7)
    torch.testing.assert_close(state, ref_state, rtol=4e-16, atol=0)
    torch.testing.assert_close(out, ref, rtol=4e-16, atol=0)


def test_rule_errors():
    state = torch.ones(3)
    with pytest.raises(ValueError, match=r"discrepancies has shape \(4,\) but state has shape \(3,\)"):
        lw.layerwise_rates(torch.ones(4), state, 0.1)
    with pytest.raises(TypeError, match="discrepancies has dtype torch.int64"):
        lw.layerwise_rates(torch.ones(3, dtype=torch.int64), state, 0.1)
    with pytest.raises(ValueError, match="discrepancies .* are on meta but the rate state is on cpu"):
        lw.layerwise_rates(torch.ones(3, device="meta"), state, 0.1)
    with pytest.raises(TypeError, match="state has dtype torch.float16"):
        lw.layerwise_rates(torch.ones(3), torch.ones(3, dtype=torch.float16), 0.1)
    with pytest.raises(ValueError, match="state must be 1-D"):
        lw.layerwise_rates(torch.ones(3), torch.ones(3, 1), 0.1)
    with pytest.raises(ValueError, match="momentum must lie in"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="s_min <= s_max"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, s_min=2.0, s_max=1.0)
    with pytest.raises(ValueError, match="gamma"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, gamma=-1.0)
    with pytest.raises(ValueError, match=r"base_lr must be a number or a 0-dim tensor, got a tensor of shape \(2,\)"):
        lw.layerwise_rates(torch.ones(3), state, torch.ones(2))
    with pytest.raises(TypeError, match="base_lr must be a Python number"):
        lw.layerwise_rates(torch.ones(3), state, "0.1")
    with pytest.raises(TypeError, match="nonfinite must be a one-element int64 tensor"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, nonfinite=torch.zeros(()))
    assert torch.equal(state, torch.ones(3))  # nothing ran


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_rule_no_host_sync(backend):
    d = torch.tensor([0.5, NAN, 2.0])
    state = torch.ones(3)
    nf = torch.zeros((), dtype=torch.int64)
    lr = torch.tensor(0.1)
    with NoHostSync():
        with pytest.raises(AssertionError, match="host synchronisation"):  # the detector works
            bool(d.sum() > 0)
        run_rule(backend, d, state, lr, nonfinite=nf)
        run_rule(backend, d, state, 0.1, nonfinite=nf)
    assert int(nf) == 2


@requires_native
def test_native_rule_opcheck():
    args = (torch.tensor([0.5, NAN, 2.0, 0.1]), torch.ones(4), torch.zeros((), dtype=torch.int64), [0.1], None,
            0.9, 1.0, 0.1, 10.0, 1e-12)
    torch.library.opcheck(torch.ops.lwkd.layerwise_rates.default, args)
    args_t = (torch.tensor([0.5, 1.0]), torch.ones(2, dtype=torch.float64), None, [1.0], torch.tensor(0.3),
              0.5, 2.0, 0.1, 10.0, 1e-12)
    torch.library.opcheck(torch.ops.lwkd.layerwise_rates.default, args_t)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels unavailable here")
def test_triton_rule_opcheck():
    from lwkd_fast.triton import optim as tri

    args = (torch.tensor([0.5, NAN, 2.0, 0.1]), torch.ones(4), torch.zeros((), dtype=torch.int64), [0.1], None,
            0.9, 1.0, 0.1, 10.0, 1e-12)
    torch.library.opcheck(tri.layerwise_rates, args, test_utils=("test_schema", "test_faketensor"))


@requires_native
def test_native_kernels_registered():
    """CPU kernels always; CUDA kernels whenever the extension was built with its .cu files."""
    for op in ("layerwise_rates", "layerwise_sgd_step", "layerwise_adamw_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lwkd::{op}", "CPU")
        if built_with_cuda():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lwkd::{op}", "CUDA"), op
    assert all(op in ops.native_kernels() for op in ("layerwise_rates", "layerwise_sgd_step", "layerwise_adamw_step"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_check_cases_pass(backend):
    """The `lwkd-fast check` cases of the rule pass on this backend."""
    for case in check_rule.lwkd_checks(backend, torch.device("cpu")):
        with lw.use_backend(backend):
            verdicts = case.run()
        bad = {k: str(v) for k, v in verdicts.items() if not v.ok}
        assert not bad, f"{case.label} ({case.dtype}): {bad}"


# ------------------------------------------------------------------------------------------------
# The device-side skip flag (found_inf)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
def test_rule_found_inf_keeps_state_and_counter(backend, sdtype):
    """found_inf != 0: m and the counter keep their bits, eta = base_lr * m; found_inf = 0 is
    the plain rule, bit for bit."""
    d = torch.tensor([0.3, NAN, 2.0, 0.7, 0.01])
    m0 = torch.tensor([0.7, 1.3, 2.1, 0.45, 1.0], dtype=sdtype)
    for lr in (0.1, torch.tensor(0.25, dtype=torch.float64)):
        for flag in (torch.ones(()), torch.tensor(float("nan")), torch.tensor(-2.0)):
            state, nf = m0.clone(), torch.tensor(4, dtype=torch.int64)
            eta = run_rule(backend, d, state, lr, nonfinite=nf, found_inf=flag)
            assert torch.equal(state, m0) and int(nf) == 4
            lr64 = lr.double() if isinstance(lr, torch.Tensor) else lr
            assert torch.equal(eta, (m0.double() * lr64).to(sdtype))
        s_plain, nf_plain = m0.clone(), torch.zeros((), dtype=torch.int64)
        s_zero, nf_zero = m0.clone(), torch.zeros((), dtype=torch.int64)
        e_plain = run_rule(backend, d, s_plain, lr, nonfinite=nf_plain, gamma=1.5)
        e_zero = run_rule(backend, d, s_zero, lr, nonfinite=nf_zero, gamma=1.5, found_inf=torch.zeros(()))
        assert torch.equal(s_plain, s_zero) and torch.equal(e_plain, e_zero) and int(nf_zero) == int(nf_plain) == 1
        assert not torch.equal(s_zero, m0)


def test_rule_found_inf_errors():
    state = torch.ones(3)
    with pytest.raises(ValueError, match=r"layerwise_rates: found_inf must be a 0-dim tensor .*got shape \(3,\)"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, found_inf=torch.zeros(3))
    with pytest.raises(TypeError, match=r"found_inf \(shape \(\)\) has dtype torch.bool; expected torch.float32"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, found_inf=torch.tensor(False))
    with pytest.raises(ValueError, match=r"found_inf \(shape \(\)\) is on meta but state is on cpu"):
        lw.layerwise_rates(torch.ones(3), state, 0.1, found_inf=torch.zeros((), device="meta"))
    assert torch.equal(state, torch.ones(3))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_rule_found_inf_no_host_sync(backend):
    d = torch.tensor([0.5, NAN, 2.0])
    state = torch.ones(3)
    nf = torch.zeros((), dtype=torch.int64)
    with NoHostSync():
        run_rule(backend, d, state, torch.tensor(0.1), nonfinite=nf, found_inf=torch.ones(()))
        run_rule(backend, d, state, 0.1, nonfinite=nf, found_inf=torch.zeros(()))
    assert int(nf) == 1


@requires_native
def test_native_rule_opcheck_with_found_inf():
    for flag in (torch.zeros(()), torch.ones(())):
        args = (torch.tensor([0.5, NAN, 2.0, 0.1]), torch.ones(4), torch.zeros((), dtype=torch.int64), [0.1], None,
                0.9, 1.0, 0.1, 10.0, 1e-12, flag)
        torch.library.opcheck(torch.ops.lwkd.layerwise_rates.default, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels unavailable here")
def test_triton_rule_opcheck_with_found_inf():
    from lwkd_fast.triton import optim as tri

    args = (torch.tensor([0.5, NAN, 2.0, 0.1]), torch.ones(4), torch.zeros((), dtype=torch.int64), [0.1], None,
            0.9, 1.0, 0.1, 10.0, 1e-12, torch.ones(()))
    torch.library.opcheck(tri.layerwise_rates, args, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# Properties of the rule (issue 14): scale invariance of "running", a stalled layer gains rate,
# unusable discrepancies (non-finite, negative) leave their layer's state alone
# ------------------------------------------------------------------------------------------------


def run_steps(backend, ds, normalize, sdtype=torch.float32, **opts):
    """Apply the rule to the rows of ``ds`` (T, K) in turn; returns (factors per step (T, K),
    eta per step, final state, final reference state)."""
    K = ds.shape[1]
    state = torch.ones(K, dtype=sdtype)
    ref = rule.new_reference_state(K, sdtype) if normalize == "running" else None
    factors, etas = [], []
    for d in ds:
        etas.append(run_rule(backend, d, state, 0.1, rate_normalize=normalize, ref_state=ref, **opts))
        factors.append(state.clone())
    return torch.stack(factors), torch.stack(etas), state, ref


def _discrepancy_run(T=40, K=4, seed=5):
    """Noisy, falling per-layer discrepancies of very different scales (like "at" over layers of
    different spatial size)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    scale = torch.tensor([3e-2, 1e-3, 4.0, 0.5], dtype=torch.float64)[:K]
    fall = torch.tensor([0.02, 0.05, 0.01, 0.03], dtype=torch.float64)[:K]
    noise = 1 + 0.3 * torch.rand(T, K, generator=g, dtype=torch.float64)
    return (scale * torch.exp(-fall * t) * noise).to(torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
def test_running_rule_is_scale_invariant(backend, sdtype):
    """Multiplying one layer's D by a constant at every step leaves every rate unchanged: bit for
    bit for a power of two (exact in floating point), to rounding for 100 and 1e-3 (fewer factors
    under the Triton interpreter, where every step costs milliseconds)."""
    ds = _discrepancy_run(T=16)
    opts = dict(gamma=1.5, s_min=0.05, s_max=20.0)
    base_f, base_eta, _, base_ref = run_steps(backend, ds, "running", sdtype, **opts)
    assert float((base_f - 1).abs().max()) > 0.05  # the rates do move
    for c in (2.0 ** 7, 2.0 ** -9, 100.0, 1e-3) if backend != "triton" else (2.0 ** -9, 100.0):
        scaled = ds.clone()
        scaled[:, 2] *= c
        f, eta, _, ref = run_steps(backend, scaled, "running", sdtype, **opts)
        if math.log2(c).is_integer():
            assert torch.equal(f, base_f) and torch.equal(eta, base_eta)
            assert torch.equal(ref[0, 2], base_ref[0, 2] * c) and torch.equal(ref[1], base_ref[1])
        else:
            # the scaled inputs are rounded to float32 once: a few float32 ulps
            torch.testing.assert_close(f, base_f, rtol=2e-6, atol=0)
            torch.testing.assert_close(eta, base_eta, rtol=2e-6, atol=0)
    # the old rule is not: the same scaling moves the rates
    none_f = run_steps(backend, ds, "none", sdtype, **opts)[0]
    scaled = ds.clone()
    scaled[:, 2] *= 2.0 ** 7
    assert float((run_steps(backend, scaled, "none", sdtype, **opts)[0] - none_f).abs().max()) > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_rule_constant_multiple_gets_the_same_rate(backend):
    """A layer whose D is a constant multiple of another layer's at every step gets that layer's
    rate under "running"; under "none" the 100x copy takes the rate of both (issue 14: 0.14 and
    2.85 for the two)."""
    base = _discrepancy_run(T=40, K=2)
    ds = torch.cat([base, 100.0 * base[:, :1]], dim=1)  # layer 2 = 100 x layer 0
    f_run = run_steps(backend, ds, "running")[0]
    torch.testing.assert_close(f_run[:, 2], f_run[:, 0], rtol=2e-6, atol=0)
    f_none = run_steps(backend, ds, "none")[0]
    assert float(f_none[-1, 2]) > 2.5 and float(f_none[-1, 0]) < 0.2 and float(f_none[-1, 1]) < 0.2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", rule.RATE_NORMALIZE)
def test_stalled_layer_gains_rate(backend, normalize):
    """All layers fall alike, then layer 1 stops falling while the others keep falling: its factor
    rises above every other layer's and above where it stood when it stalled.  "running" shows it
    whatever the layers' scales (here 1e-3 next to 5); "none" only for layers of similar scale."""
    T, stall = 50, 20
    t = torch.arange(T, dtype=torch.float64)
    scale = [0.2, 1e-3, 5.0] if normalize == "running" else [0.2, 0.15, 0.3]
    ds = torch.stack([c * torch.exp(-0.05 * t) for c in scale], 1)
    ds[stall:, 1] = ds[stall, 1]
    f = run_steps(backend, ds.to(torch.float32), normalize, gamma=1.0)[0]
    assert float(f[-1, 1]) > float(f[stall, 1]) + 0.3
    assert float(f[-1, 1]) > 1.0 > max(float(f[-1, 0]), float(f[-1, 2]))
    assert float(f[-1, 1]) == float(f[:, 1].max())  # it kept gaining


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", rule.RATE_NORMALIZE)
@pytest.mark.parametrize("bad", [NAN, INF, -0.3, -1e-30])
def test_unusable_discrepancy_leaves_its_layer_alone(backend, normalize, bad):
    """A non-finite or negative D_j (with gamma = 0.5, where a negative D once gave NaN) leaves
    layer j's factor and reference bit for bit, is counted, and the other layers follow the rule
    over the usable layers only (the oracle)."""
    ds = _discrepancy_run(T=6, K=4)
    opts = dict(gamma=0.5, momentum=0.7, ref_momentum=0.8)
    K = 4
    state = torch.ones(K)
    ref_state = rule.new_reference_state(K) if normalize == "running" else None
    nf = torch.zeros((), dtype=torch.int64)
    for step, d in enumerate(ds):
        if step == 4:
            d = d.clone()
            d[1] = bad
            m_before = state.clone()
            r_before = None if ref_state is None else ref_state.clone()
            m_oracle = state.double().tolist()
            ref = None if ref_state is None else ref_state.double().tolist()
            _, m_want, was_bad = rule.oracle_rates(d.double().tolist(), m_oracle, 0.1, 0.7, 0.5, 0.1, 10.0,
                                                   ref=ref, ref_momentum=0.8)
        eta = run_rule(backend, d, state, 0.1, nonfinite=nf, rate_normalize=normalize, ref_state=ref_state, **opts)
        assert bool(torch.isfinite(eta).all()) and bool(torch.isfinite(state).all())
        if step == 4:
            assert was_bad and int(nf) == 1
            assert state[1].item() == m_before[1].item()
            if ref_state is not None:
                assert torch.equal(ref_state[:, 1], r_before[:, 1])
                assert not torch.equal(ref_state[:, 0], r_before[:, 0])
            assert not torch.equal(state[[0, 2, 3]], m_before[[0, 2, 3]])
            assert_close_to_oracle(state, m_want, torch.float32, "state")
    assert int(nf) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_discrepancy_is_skipped_not_nan_in_the_optimizer(backend):
    """Issue 11 item 3: a negative D with gamma = 0.5 used to give factor NaN and NaN parameters.
    Now the layer's rate stays, its parameters take a finite step with it, and the step is
    counted in nonfinite_steps -- decided on the device."""
    w = [torch.ones(3, requires_grad=True) for _ in range(3)]
    for normalize in rule.RATE_NORMALIZE:
        with lw.use_backend(backend):
            opt = lw.optim.LayerwiseSGD([{"params": [p], "layer": j} for j, p in enumerate(w)], lr=0.1,
                                        gamma=0.5, rate_normalize=normalize)
            for p in w:
                p.grad = torch.ones(3)
            opt.step(torch.tensor([0.5, -0.3, 1.0]))
        assert int(opt.nonfinite_steps) == 1
        assert float(opt.factors[1]) == 1.0 and float(opt.rates[1]) == pytest.approx(0.1)
        assert all(bool(torch.isfinite(p).all()) for p in w)
        assert torch.equal(opt.rate_reference[:, 1], torch.zeros(2))


# ------------------------------------------------------------------------------------------------
# rate_normalize="running": arguments, skip flag, no host sync, opcheck
# ------------------------------------------------------------------------------------------------


def test_running_rule_errors():
    state = torch.ones(3)
    d = torch.ones(3)
    ref = rule.new_reference_state(3)
    cases = [
        (ValueError, r"layerwise_rates: rate_normalize must be one of 'none', 'running', got 'mean'",
         dict(rate_normalize="mean")),
        (ValueError, r"layerwise_rates: rate_normalize='running' needs ref_state, the \(2, 3\) running reference",
         dict(rate_normalize="running")),
        (ValueError, r"layerwise_rates: ref_state is only used with rate_normalize='running'", dict(ref_state=ref)),
        (ValueError, r"layerwise_rates: ref_state has shape \(3,\) but state has shape \(3,\); expected \(2, 3\)",
         dict(rate_normalize="running", ref_state=torch.zeros(3))),
        (TypeError, r"layerwise_rates: ref_state \(shape \(2, 3\)\) has dtype torch.float64 but state has dtype "
                    r"torch.float32", dict(rate_normalize="running", ref_state=ref.double())),
        (ValueError, r"layerwise_rates: ref_state \(shape \(2, 3\)\) is on meta but state is on cpu",
         dict(rate_normalize="running", ref_state=ref.to("meta"))),
        (ValueError, r"layerwise_rates: ref_momentum must lie in \[0, 1\), got 1.0",
         dict(rate_normalize="running", ref_state=ref, ref_momentum=1.0)),
        (TypeError, r"layerwise_rates: ref_state must be a torch.Tensor of shape \(2, 3\), got list",
         dict(rate_normalize="running", ref_state=[[0.0] * 3] * 2)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            lw.layerwise_rates(d, state, 0.1, **kw)
    assert torch.equal(state, torch.ones(3)) and torch.equal(ref, torch.zeros(2, 3))  # nothing ran
    for cls in (lw.optim.LayerwiseSGD, lw.optim.LayerwiseAdamW):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: rate_normalize must be one of"):
            cls([{"params": [torch.ones(2, requires_grad=True)], "layer": 0}], lr=0.1, rate_normalize="Running")
        with pytest.raises(ValueError, match=rf"{cls.__name__}: rate_ref_momentum must lie in \[0, 1\)"):
            cls([{"params": [torch.ones(2, requires_grad=True)], "layer": 0}], lr=0.1, rate_normalize="running",
                rate_ref_momentum=-0.5)


@requires_native
def test_native_running_rule_errors():
    """The op checks its reference state itself (a direct torch.ops call skips the Python checks)."""
    op = torch.ops.lwkd.layerwise_rates
    args = (torch.ones(3), torch.ones(3), None, [0.1], None, 0.9, 1.0, 0.1, 10.0, 1e-12, None)
    with pytest.raises(RuntimeError, match=r"lwkd::layerwise_rates: ref_state must have shape \(2, 3\).*got \[3\]"):
        op(*args, torch.zeros(3), 0.9)
    with pytest.raises(RuntimeError, match=r"ref_state has dtype Double but state has dtype Float"):
        op(*args, torch.zeros(2, 3, dtype=torch.float64), 0.9)
    with pytest.raises(RuntimeError, match=r"ref_momentum must lie in \[0, 1\), got 1"):
        op(*args, torch.zeros(2, 3), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_rule_found_inf_keeps_reference(backend):
    d = torch.tensor([0.3, NAN, 2.0, 0.7])
    state, ref = torch.ones(4), rule.new_reference_state(4)
    run_rule(backend, d, state, 0.1, rate_normalize="running", ref_state=ref)
    m0, r0 = state.clone(), ref.clone()
    for flag in (torch.ones(()), torch.tensor(NAN)):
        eta = run_rule(backend, 2 * d, state, 0.1, rate_normalize="running", ref_state=ref, found_inf=flag)
        assert torch.equal(state, m0) and torch.equal(ref, r0)
        assert torch.equal(eta, (0.1 * m0.double()).float())
    run_rule(backend, 2 * d, state, 0.1, rate_normalize="running", ref_state=ref, found_inf=torch.zeros(()))
    assert not torch.equal(ref, r0) and torch.equal(ref[:, 1], r0[:, 1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_running_rule_no_host_sync(backend):
    d = torch.tensor([0.5, NAN, 2.0])
    state, ref = torch.ones(3), rule.new_reference_state(3)
    nf = torch.zeros((), dtype=torch.int64)
    with NoHostSync():
        run_rule(backend, d, state, torch.tensor(0.1), nonfinite=nf, rate_normalize="running", ref_state=ref)
        run_rule(backend, -d, state, 0.1, nonfinite=nf, rate_normalize="running", ref_state=ref,
                 found_inf=torch.zeros(()))
    assert int(nf) == 2


@requires_native
def test_native_running_rule_opcheck():
    for flag in (None, torch.zeros(()), torch.ones(())):
        args = (torch.tensor([0.5, NAN, 2.0, -0.1]), torch.ones(4), torch.zeros((), dtype=torch.int64), [0.1], None,
                0.9, 1.0, 0.1, 10.0, 1e-12, flag, torch.rand(2, 4), 0.9)
        torch.library.opcheck(torch.ops.lwkd.layerwise_rates.default, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels unavailable here")
def test_triton_running_rule_opcheck():
    from lwkd_fast.triton import optim as tri

    args = (torch.tensor([0.5, NAN, 2.0, -0.1]), torch.ones(4), torch.zeros((), dtype=torch.int64), [0.1], None,
            0.9, 1.0, 0.1, 10.0, 1e-12, None, torch.rand(2, 4), 0.9)
    torch.library.opcheck(tri.layerwise_rates, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_rule_strided_reference(backend):
    """A reference state that is a transposed view gives the numbers of a contiguous one."""
    ds = _discrepancy_run(T=5, K=4)
    s1, s2 = torch.ones(4), torch.ones(4)
    r1, r2 = rule.new_reference_state(4), torch.zeros(4, 2).t()
    for d in ds:
        run_rule(backend, d, s1, 0.1, rate_normalize="running", ref_state=r1)
        run_rule(backend, d, s2, 0.1, rate_normalize="running", ref_state=r2)
    assert torch.equal(s1, s2) and torch.equal(r1, r2)


# ------------------------------------------------------------------------------------------------
# rate_normalize in the optimizers: the reference state is optimizer state
# ------------------------------------------------------------------------------------------------


def _tiny_opt(kind="sgd", normalize="running", **kw):
    torch.manual_seed(4)
    ps = [torch.randn(5, requires_grad=True) for _ in range(4)]
    groups = [{"params": [p], "layer": j} for j, p in enumerate(ps[:3])] + [{"params": [ps[3]], "layer": None}]
    cls = lw.optim.LayerwiseSGD if kind == "sgd" else lw.optim.LayerwiseAdamW
    extra = dict(momentum=0.9) if kind == "sgd" else {}
    return ps, cls(groups, lr=0.05, rate_normalize=normalize, rate_ref_momentum=0.8, **extra, **kw)


def _opt_steps(ps, opt, ds, start, stop, flags=None):
    g = torch.Generator().manual_seed(8)
    grads = [[torch.randn(5, generator=g) for _ in ps] for _ in range(stop)]
    for s in range(start, stop):
        for p, gr in zip(ps, grads[s]):
            p.grad = gr.clone()
        fi = None if flags is None else torch.tensor(float(flags[s]))
        opt.step(ds[s], found_inf=fi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_running_rule_matches_the_function(backend):
    """The optimizer's factors and rates are those of layerwise_rates with the same reference."""
    ds = _discrepancy_run(T=6, K=3)
    ds[3, 1] = NAN
    with lw.use_backend(backend):
        ps, opt = _tiny_opt()
        _opt_steps(ps, opt, ds, 0, 6)
        _, _, state, ref = run_steps(backend, ds, "running", momentum=0.9, ref_momentum=0.8)
    assert torch.equal(opt.factors, state) and torch.equal(opt.rate_reference, ref)
    assert torch.equal(opt.rates, (0.05 * state.double()).float())
    assert int(opt.nonfinite_steps) == 1
    assert "rate_normalize='running'" in repr(opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_running_reference_checkpoint_resume_is_bit_identical(backend, kind):
    ds = _discrepancy_run(T=8, K=3)
    with lw.use_backend(backend):
        ps, opt = _tiny_opt(kind)
        _opt_steps(ps, opt, ds, 0, 4)
        buf = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        lwst = ck["opt"]["layerwise"]
        assert lwst["rate_normalize"] == "running" and lwst["rate_ref_momentum"] == 0.8
        assert torch.equal(lwst["rate_reference"], opt.rate_reference) and bool((lwst["rate_reference"] > 0).all())
        ps2, opt2 = _tiny_opt(kind, normalize="none")  # the checkpoint's rule wins, as for gamma
        with torch.no_grad():
            for p, q in zip(ps2, ck["params"]):
                p.copy_(q)
        opt2.load_state_dict(ck["opt"])
        assert opt2.rate_normalize == "running" and torch.equal(opt2.rate_reference, opt.rate_reference)
        assert opt2.rate_reference.data_ptr() != lwst["rate_reference"].data_ptr()
        copied = copy.deepcopy(opt)
        assert copied.rate_normalize == "running" and torch.equal(copied.rate_reference, opt.rate_reference)
        _opt_steps(ps, opt, ds, 4, 8)
        _opt_steps(ps2, opt2, ds, 4, 8)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    assert torch.equal(opt.factors, opt2.factors) and torch.equal(opt.rate_reference, opt2.rate_reference)


def test_checkpoint_without_rate_normalize_loads_as_the_old_rule():
    ps, opt = _tiny_opt(normalize="none")
    _opt_steps(ps, opt, _discrepancy_run(T=2, K=3), 0, 2)
    sd = opt.state_dict()
    for key in ("rate_normalize", "rate_ref_momentum", "rate_reference"):
        del sd["layerwise"][key]
    ps2, opt2 = _tiny_opt(normalize="running")
    opt2.load_state_dict(sd)
    assert opt2.rate_normalize == "none" and torch.equal(opt2.rate_reference, torch.zeros(2, 3))
    bad = opt.state_dict()
    bad["layerwise"] = dict(bad["layerwise"], rate_reference=torch.zeros(3))
    with pytest.raises(ValueError, match=r"LayerwiseSGD.load_state_dict: layerwise\['rate_reference'\] has shape "
                                         r"\(3,\), expected \(2, 3\)"):
        opt2.load_state_dict(bad)
    bad["layerwise"] = dict(opt.state_dict()["layerwise"], rate_normalize="median")
    with pytest.raises(ValueError, match=r"LayerwiseSGD.load_state_dict: rate_normalize must be one of"):
        opt2.load_state_dict(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_steps_leave_the_reference(backend):
    """Steps skipped with found_inf (NaN discrepancies and gradients) equal omitted steps, the
    running reference included."""
    ds = _discrepancy_run(T=6, K=3)
    with lw.use_backend(backend):
        ps, opt = _tiny_opt()
        ps2, opt2 = _tiny_opt()
        skip = [0, 0, 1, 0, 1, 0]
        nan_ds = ds.clone()
        nan_ds[2] = NAN
        nan_ds[4] = -1.0
        _opt_steps(ps, opt, nan_ds, 0, 6, flags=skip)
        g = torch.Generator().manual_seed(8)
        grads = [[torch.randn(5, generator=g) for _ in ps2] for _ in range(6)]
        for s in range(6):
            if skip[s]:
                continue
            for p, gr in zip(ps2, grads[s]):
                p.grad = gr.clone()
            opt2.step(ds[s])
    assert int(opt.skipped_steps) == 2 and int(opt.nonfinite_steps) == 0
    assert torch.equal(opt.rate_reference, opt2.rate_reference) and torch.equal(opt.factors, opt2.factors)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


def test_all_reduce_running_reference_is_the_same_on_every_rank(monkeypatch):
    """sync='all_reduce' (a mocked world of two): the reference follows the averaged D, exactly
    like m, and a skip on the other rank leaves it unchanged here too."""
    import torch.distributed as dist

    K = 3
    remote = {"d": torch.tensor([0.2, 4e-3, 60.0]), "flag": 0.0}

    def all_reduce(t, op=None, group=None):
        t.add_(torch.cat([remote["d"], torch.tensor([remote["flag"]])]) if t.shape[0] == K + 1 else remote["d"])

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ps, opt = _tiny_opt(sync="all_reduce")
    ps2, single = _tiny_opt()
    local = torch.tensor([1.0, 8e-3, 20.0])
    for s, remote_flag in enumerate((0.0, 1.0, 0.0, 0.0)):
        remote["flag"] = remote_flag
        for p, q in zip(ps, ps2):
            p.grad, q.grad = torch.ones(5), torch.ones(5)
        opt.step(local * (1 + s), found_inf=torch.zeros(()))
        if not remote_flag:
            single.step((local * (1 + s) + remote["d"]) / 2)
    assert int(opt.skipped_steps) == 1
    assert torch.equal(opt.rate_reference, single.rate_reference) and torch.equal(opt.factors, single.factors)


def test_triton_rates_kernel_compiles_for_gpu():
    """Every launched variant of the Triton rule kernel (both normalisations, skip flag, float32 and
    float64 state, the gamma modes) compiles to an sm_80 cubin with Triton's real compiler; the
    tests above run it under the interpreter.  See tests/triton_rates_compile.py."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "triton_rates_compile.py"), "80"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DONE 4" in proc.stdout
