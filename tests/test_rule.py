"""The per-layer learning-rate rule (SPEC section 4) on every backend available here, held
against a float64 oracle written in plain Python arithmetic (lwkd_fast.rule.oracle_rates)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lwkd_fast as lw
from lwkd_fast import ops, rule
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.5])
def test_rule_matches_oracle_over_steps(backend, sdtype, gamma):
    g = torch.Generator().manual_seed(11)
    K = 9
    opts = dict(momentum=0.8, gamma=gamma, s_min=0.2, s_max=4.0)
    m0 = (0.5 + torch.rand(K, generator=g, dtype=torch.float64)).to(sdtype)
    state = m0.clone()
    nf = torch.zeros((), dtype=torch.int64)
    m_ref = m0.double().tolist()
    count = 0
    for step in range(6):
        d = torch.rand(K, generator=g) * 3
        d[step % K] = 0.0
        if step == 2:
            d[4] = NAN
        if step == 4:
            d[1], d[7] = INF, -INF
        lr = 0.1 * 0.7 ** step
        eta = run_rule(backend, d, state, lr, nonfinite=nf, **opts)
        eta_ref, m_ref, bad = rule.oracle_rates(d.double().tolist(), state_in := [float(x) for x in
                                                torch.tensor(m_ref, dtype=sdtype).double()], lr, **opts)
        count += bad
        assert eta.dtype == sdtype and eta.shape == (K,)
        assert_close_to_oracle(eta, eta_ref, sdtype, f"eta step {step}")
        assert_close_to_oracle(state, m_ref, sdtype, f"state step {step}")
        # non-finite layers keep their factor bit for bit
        bad_idx = [j for j in range(K) if not math.isfinite(float(d[j]))]
        for j in bad_idx:
            assert float(state[j].double()) == state_in[j]
    assert int(nf) == count == 2


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
    for op in ("layerwise_rates", "layerwise_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lwkd::{op}", "CPU")
        if built_with_cuda():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lwkd::{op}", "CUDA"), op
    assert "layerwise_rates" in ops.native_kernels() and "layerwise_step" in ops.native_kernels()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_check_cases_pass(backend):
    """The `lwkd-fast check` cases of the rule pass on this backend."""
    for case in rule.lwkd_checks(backend, torch.device("cpu")):
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
