"""LayerwiseSGD / LayerwiseAdamW (SPEC section 5) on every backend available here.

The independent reference is torch.optim.SGD / torch.optim.AdamW whose group rates are set each
step from the reference rule; equivalence is SPEC's rtol 1e-5 / atol 1e-6 in float32 after 20
steps.  The parameter list is ResNet-like: 4-D convolutions (one channels_last), 1-D norms,
0-dim scalars, a 2-D head, and parameters whose grad is None (always, or on some steps).
"""

from __future__ import annotations

import copy
import io
import types

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import optim, rule
from lwkd_fast.check import step as check_step
from lwkd_fast.optim import LayerwiseAdamW, LayerwiseSGD
from lwkd_fast.testing import compare

from conftest import requires_native
from optim_helpers import NoHostSync, optim_backends

BACKENDS = optim_backends("layerwise_sgd_step")
K = 3



# ------------------------------------------------------------------------------------------------
# A ResNet-like parameter list with two groups per layer (decay / no decay) and a head
# ------------------------------------------------------------------------------------------------

# (shape, layer, decays, grad policy: "always" | "never" | "odd" (only on odd steps))
SPEC_LIST = [
    ((8, 3, 3, 3), 0, True, "always"),
    ((8,), 0, False, "always"),
    ((8,), 0, False, "always"),
    ((), 0, False, "always"),             # a learnable scalar
    ((16, 8, 3, 3), 1, True, "always"),
    ((16,), 1, False, "always"),
    ((16, 8, 1, 1), 1, True, "odd"),
    ((5,), 1, False, "never"),            # unused parameter: grad stays None
    ((24, 16, 3, 3), 2, True, "always"),  # channels_last
    ((24,), 2, False, "always"),
    ((10, 24), None, True, "always"),
    ((10,), None, False, "always"),
    ((), None, False, "never"),
]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, (shape, *_rest) in enumerate(SPEC_LIST):
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if i == 8:
            t = t.contiguous(memory_format=torch.channels_last)
        ps.append(t.requires_grad_(True))
    return ps


def make_groups(ps, wd_value):
    groups = []
    for j in list(range(K)) + [None]:
        for decays in (True, False):
            members = [p for p, (_s, l, d, _g) in zip(ps, SPEC_LIST) if l == j and d == decays]
            if members:
                groups.append({"params": members, "layer": j, "weight_decay": wd_value if decays else 0.0})
    return groups


def make_grads(steps, seed=1, odd=True):
    """Per-step gradients; ``odd=False`` gives the "odd" parameter a gradient on every step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        row = []
        for (shape, _l, _d, policy) in SPEC_LIST:
            gr = torch.randn(shape, generator=g, dtype=torch.float64)
            use = policy == "always" or (policy == "odd" and (s % 2 == 1 or not odd))
            row.append(gr if use else None)
        out.append(row)
    return out


def make_ds(steps, seed=2, nan_at=(7,)):
    g = torch.Generator().manual_seed(seed)
    ds = [(torch.rand(K, generator=g, dtype=torch.float64) * 2 + 0.01).float() for _ in range(steps)]
    for s in nan_at:
        if s < steps:
            ds[s][1] = float("nan")
    return ds


def set_grads(ps, row, dtype, match_layout=False):
    for p, gr in zip(ps, row):
        if gr is None:
            p.grad = None
        else:
            gg = gr.to(dtype)
            if match_layout:
                gg = torch.empty_like(p).copy_(gg)
            elif p.dim() == 4 and not p.is_contiguous():
                gg = gg.contiguous()  # a gradient whose layout differs from its parameter
            p.grad = gg


SGD_CFGS = [
    ("plain", dict(lr=0.1), 0.0),
    ("momentum+wd", dict(lr=0.05, momentum=0.9), 1e-2),
    ("dampening", dict(lr=0.05, momentum=0.8, dampening=0.3), 5e-3),
    ("nesterov", dict(lr=0.05, momentum=0.9, nesterov=True), 1e-2),
    ("maximize", dict(lr=0.02, momentum=0.5, maximize=True), 1e-2),
]
ADAMW_CFGS = [
    ("default", dict(lr=1e-2), 1e-2),
    ("amsgrad", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True), 0.1),
    ("maximize", dict(lr=5e-3, eps=1e-6, maximize=True), 0.0),
]
RULE = dict(rate_momentum=0.7, gamma=1.5, s_min=0.2, s_max=5.0)


def make_ours(kind, ps, cfg, wd, **extra):
    cls = LayerwiseSGD if kind == "sgd" else LayerwiseAdamW
    return cls(make_groups(ps, wd), **cfg, **RULE, **extra)


def make_torch(kind, ps, cfg, wd, **extra):
    cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    return cls(make_groups(ps, wd), **cfg, foreach=False, **extra)


class RefRule:
    """The reference rule on its own state, feeding torch.optim's group rates each step; by
    default the optimizers' default rule (``optim.DEFAULT_RATE_NORMALIZE``)."""

    def __init__(self, rate_normalize=optim.DEFAULT_RATE_NORMALIZE):
        self.m = torch.ones(K)
        self.nf = torch.zeros((), dtype=torch.int64)
        self.ref = rule.new_reference_state(K) if rate_normalize == "running" else None

    def rates(self, d, base_lr):
        return rule.reference_rates(d, self.m, self.nf, [base_lr], None, RULE["rate_momentum"], RULE["gamma"],
                                    RULE["s_min"], RULE["s_max"], 1e-12, ref_state=self.ref)

    def apply(self, opt, d, base_lr):
        eta = self.rates(d, base_lr).tolist()
        for g in opt.param_groups:
            g["lr"] = base_lr if g["layer"] is None else eta[g["layer"]]
        return eta


def assert_states_close(ours, ref, ps_ours, ps_ref, rtol=1e-5, atol=1e-6):
    for i, (a, b) in enumerate(zip(ps_ours, ps_ref)):
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert set(sa) == set(k for k in sb if sb[k] is not None), f"param {i}: state keys {set(sa)} vs {set(sb)}"
        for key in sa:
            torch.testing.assert_close(sa[key].cpu().to(sb[key].dtype), sb[key], rtol=rtol, atol=atol,
                                       msg=lambda m, i=i, key=key: f"param {i} state {key}: {m}")


# ------------------------------------------------------------------------------------------------
# Equivalence with torch.optim
# ------------------------------------------------------------------------------------------------

CASES = [("sgd",) + c for c in SGD_CFGS] + [("adamw",) + c for c in ADAMW_CFGS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,label,cfg,wd", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_matches_torch_optim_20_steps(backend, kind, label, cfg, wd):
    steps = 20
    ps_a, ps_b = make_params(), make_params()
    ours = make_ours(kind, ps_a, cfg, wd)
    ref = make_torch(kind, ps_b, cfg, wd)
    ref_rule = RefRule()
    grads, ds = make_grads(steps), make_ds(steps)
    for s in range(steps):
        set_grads(ps_a, grads[s], torch.float32)
        set_grads(ps_b, grads[s], torch.float32)
        with lw.use_backend(backend):
            ours.step(ds[s])
        eta = ref_rule.apply(ref, ds[s], cfg["lr"])
        ref.step()
        torch.testing.assert_close(ours.rates, torch.tensor(eta), rtol=0, atol=0)  # same float32 rates
    for i, (a, b) in enumerate(zip(ps_a, ps_b)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")
    assert_states_close(ours, ref, ps_a, ps_b)
    torch.testing.assert_close(ours.factors, ref_rule.m, rtol=0, atol=0)
    assert int(ours.nonfinite_steps) == 1
    # the never-used parameters are untouched and have no state
    for i, (_s, _l, _d, policy) in enumerate(SPEC_LIST):
        if policy == "never":
            assert ps_a[i] not in ours.state or not ours.state[ps_a[i]]
            assert torch.equal(ps_a[i].detach(), make_params()[i].detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,cfg,wd", [("sgd", dict(lr=0.05, momentum=0.9), 1e-2),
                                         ("adamw", dict(lr=1e-2, amsgrad=True), 1e-2)])
def test_bfloat16_params(backend, kind, cfg, wd):
    """bfloat16 parameters: at most twice the error of eager torch.optim in bfloat16 (plus 1e-3)
    against torch.optim in float64 (SPEC section 6), and close to torch's fused bf16 step."""
    steps = 8
    ps = make_params(torch.bfloat16)
    ps64 = [p.detach().double().requires_grad_(True) for p in ps]
    ps_eager = [p.detach().clone().requires_grad_(True) for p in ps]
    ps_fused = [p.detach().clone().requires_grad_(True) for p in ps]
    ours = make_ours(kind, ps, cfg, wd)
    ref64, eager = make_torch(kind, ps64, cfg, wd), make_torch(kind, ps_eager, cfg, wd)
    cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    fused = cls(make_groups(ps_fused, wd), **cfg, fused=True)
    rules = [RefRule() for _ in range(3)]
    # torch's fused SGD cannot start a momentum buffer after the first step: no late gradients
    grads, ds = make_grads(steps, odd=False), make_ds(steps)
    for s in range(steps):
        set_grads(ps, grads[s], torch.bfloat16)
        set_grads(ps_eager, grads[s], torch.bfloat16)
        # (torch's fused kernels assume a gradient laid out like its parameter)
        set_grads(ps_fused, grads[s], torch.bfloat16, match_layout=True)
        for p, gr in zip(ps64, grads[s]):
            p.grad = None if gr is None else gr.to(torch.bfloat16).double()
        with lw.use_backend(backend):
            ours.step(ds[s])
        for r, o in zip(rules, (ref64, eager, fused)):
            r.apply(o, ds[s], cfg["lr"])
            o.step()
    for i in range(len(ps)):
        v = compare(ps[i].detach(), ps64[i].detach(), torch.bfloat16, eager=ps_eager[i].detach())
        assert v.ok, f"param {i}: {v}"
        assert ps[i].dtype == torch.bfloat16
        # torch's fused step rounds once per store like the native and Triton kernels (the
        # reference backend rounds after every foreach op, like eager torch): a few bf16 ulps
        # (only where torch's fused step itself holds the float64 rule: torch 2.13's fused bf16
        # SGD on the CPU does not -- found by .ci/second-torch -- and the float64 run is the oracle)
        fused_ok = compare(ps_fused[i].detach(), ps64[i].detach(), torch.bfloat16, eager=ps_eager[i].detach()).ok
        # An element that ends near 0 after passing through larger values can differ by more than
        # that from torch's fused step (its earlier ulps persist); there ours must then be at
        # least as close to the float64 run as torch's fused step is.
        if backend != "reference" and fused_ok:
            a, f, r = ps[i].detach().double(), ps_fused[i].detach().double(), ps64[i].detach()
            close = (a - f).abs() <= 1e-3 + 3 * 2 ** -8 * f.abs()
            no_worse = (a - r).abs() <= (f - r).abs()
            assert bool((close | no_worse).all()), (
                f"param {i}: ours {a[~(close | no_worse)].tolist()} vs torch fused "
                f"{f[~(close | no_worse)].tolist()}, float64 {r[~(close | no_worse)].tolist()}")


def _native_run(kind, cfg, wd, dtype, steps=4):
    ps = make_params(dtype)
    opt = make_ours(kind, ps, cfg, wd)
    grads, ds = make_grads(steps), make_ds(steps)
    for s in range(steps):
        set_grads(ps, grads[s], dtype)
        with lw.use_backend("native"):
            opt.step(ds[s])
    return ps


@requires_native
def test_native_every_cpu_isa():
    """Each compiled instruction-set version of the CPU loops (baseline, AVX2, AVX-512) gives the
    reference's float32 result and the bfloat16 result of the version chosen by default (the
    one the other tests hold against torch), up to rounding (FMA contraction differs)."""
    current = torch.ops.lwkd._optim_cpu_isa("")
    configs = (("sgd", dict(lr=0.05, momentum=0.9, nesterov=True), 1e-2),
               ("adamw", dict(lr=1e-2, amsgrad=True), 1e-2))
    expected = {}
    for kind, cfg, wd in configs:
        ps = make_params()
        opt = make_ours(kind, ps, cfg, wd)
        grads, ds = make_grads(4), make_ds(4)
        for s in range(4):
            set_grads(ps, grads[s], torch.float32)
            with lw.use_backend("reference"):
                opt.step(ds[s])
        expected[kind, torch.float32] = ps
        expected[kind, torch.bfloat16] = _native_run(kind, cfg, wd, torch.bfloat16)
    supported = []
    try:
        for isa in ("default", "avx2", "avx512"):
            try:
                torch.ops.lwkd._optim_cpu_isa(isa)
            except RuntimeError:
                continue
            supported.append(isa)
            for kind, cfg, wd in configs:
                for dtype in (torch.float32, torch.bfloat16):
                    got = _native_run(kind, cfg, wd, dtype)
                    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
                    for i, (a, b) in enumerate(zip(got, expected[kind, dtype])):
                        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{isa} {kind} {dtype} param {i}: {m}")
    finally:
        torch.ops.lwkd._optim_cpu_isa(current)
    assert supported[0] == "default" and current in supported


@requires_native
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_native_parallel_partition(kind):
    """Tensors larger than a thread's share are split between threads at arbitrary offsets;
    the result equals the reference for every element."""
    torch.manual_seed(0)
    shapes = [(70001,), (5,), (100003,), (33,), (3, 40000)]
    ps_a = [torch.randn(s).requires_grad_(True) for s in shapes]
    ps_b = [p.detach().clone().requires_grad_(True) for p in ps_a]
    groups = lambda ps: [{"params": ps[:2], "layer": 0}, {"params": ps[2:4], "layer": 1}, {"params": ps[4:], "layer": None}]
    cls, cfg = (LayerwiseSGD, dict(lr=0.1, momentum=0.9)) if kind == "sgd" else (LayerwiseAdamW, dict(lr=1e-2))
    a, b = cls(groups(ps_a), **cfg), cls(groups(ps_b), **cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for s in range(3):
            for pa, pb in zip(ps_a, ps_b):
                pa.grad = torch.randn(pa.shape)
                pb.grad = pa.grad.clone()
            d = torch.tensor([0.3, 1.2])
            with lw.use_backend("native"):
                a.step(d)
            with lw.use_backend("reference"):
                b.step(d)
    finally:
        torch.set_num_threads(threads)
    for pa, pb in zip(ps_a, ps_b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Learning-rate schedulers act on the base rate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler_drives_base_rate(backend, tensor_lr):
    steps = 7
    lr0 = 0.1
    ps_a, ps_b = make_params(), make_params()
    lr_arg = torch.tensor(lr0, dtype=torch.float64) if tensor_lr else lr0
    ours = LayerwiseSGD(make_groups(ps_a, 1e-2), lr=lr_arg, momentum=0.9, **RULE)
    sched = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    ref = make_torch("sgd", ps_b, dict(lr=lr0, momentum=0.9), 1e-2)
    ref_rule = RefRule()
    grads, ds = make_grads(steps), make_ds(steps, nan_at=())
    for s in range(steps):
        base = lr0 * 0.5 ** (s // 3)
        for g in ours.param_groups:  # the scheduler writes the base rate, never the layer rate
            assert float(g["lr"]) == pytest.approx(base, rel=1e-12)
        set_grads(ps_a, grads[s], torch.float32)
        set_grads(ps_b, grads[s], torch.float32)
        with lw.use_backend(backend):
            ours.step(ds[s])
        sched.step()
        ref_rule.apply(ref, ds[s], base)
        ref.step()
    for a, b in zip(ps_a, ps_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sched.get_last_lr()[0] == pytest.approx(lr0 * 0.5 ** (steps // 3))


def test_chainable_scheduler_does_not_compound_factors():
    ps = make_params()
    opt = LayerwiseAdamW(make_groups(ps, 0.0), lr=1e-2, **RULE)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    grads, ds = make_grads(5), make_ds(5, nan_at=())
    for s in range(5):
        set_grads(ps, grads[s], torch.float32)
        opt.step(ds[s] * (1 + s))
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-2 * 0.9 ** 5, rel=1e-12)
    # the factors moved away from 1, the base rates did not pick them up
    assert not torch.allclose(opt.factors, torch.ones(K))


# ------------------------------------------------------------------------------------------------
# grad=None, no host sync, checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_grad_none_leaves_state_untouched(backend, kind):
    ps = make_params()
    cfg = dict(lr=0.05, momentum=0.9) if kind == "sgd" else dict(lr=1e-2, amsgrad=True)
    opt = make_ours(kind, ps, cfg, 1e-2)
    grads, ds = make_grads(4), make_ds(4, nan_at=())
    with lw.use_backend(backend):
        for s in range(2):
            set_grads(ps, grads[s], torch.float32)
            opt.step(ds[s])
        frozen = 4
        before_p = ps[frozen].detach().clone()
        before_s = {k: v.clone() for k, v in opt.state[ps[frozen]].items()}
        for s in range(2, 4):
            set_grads(ps, grads[s], torch.float32)
            ps[frozen].grad = None
            opt.step(ds[s])
    assert torch.equal(ps[frozen].detach(), before_p)
    for k, v in opt.state[ps[frozen]].items():
        assert torch.equal(v, before_s[k]), k
    if kind == "adamw":
        assert float(opt.state[ps[0]]["step"]) == 4.0 and float(opt.state[ps[frozen]]["step"]) == 2.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_step_makes_no_host_sync(backend, kind):
    """step() calls none of .item(), .cpu(), .tolist(), .numpy(), bool/float/int(tensor).

    (The Triton backend is left out here: under TRITON_INTERPRET its launcher itself copies
    kernel arguments to the host, which is the interpreter's doing, not the step's.)"""
    ps = make_params()
    cfg = dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True) if kind == "sgd" else dict(lr=1e-2, amsgrad=True)
    opt = make_ours(kind, ps, cfg, 1e-2)
    grads, ds = make_grads(3), make_ds(3, nan_at=(1,))
    with lw.use_backend(backend):
        for s in range(3):
            set_grads(ps, grads[s], torch.float32)
            with NoHostSync():
                with pytest.raises(AssertionError, match="host synchronisation"):
                    ds[s].sum().item()  # the detector is live
                opt.step(ds[s])
    assert int(opt.nonfinite_steps) == 1


def _run_steps(opt, ps, grads, ds, backend, start, stop):
    with lw.use_backend(backend):
        for s in range(start, stop):
            set_grads(ps, grads[s], torch.float32)
            opt.step(ds[s])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,cfg", [("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                      ("adamw", dict(lr=1e-2, amsgrad=True))])
def test_checkpoint_resume_is_bit_identical(backend, kind, cfg):
    grads, ds = make_grads(10), make_ds(10, nan_at=(3,))
    ps = make_params()
    opt = make_ours(kind, ps, cfg, 1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    _run_steps(opt, ps, grads, ds, backend, 0, 5)
    for _ in range(5):
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in ps]}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    ps2 = [p.clone().requires_grad_(True) for p in ck["params"]]
    opt2 = make_ours(kind, ps2, cfg, 1e-2)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.95)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert torch.equal(opt2.factors, opt.factors) and torch.equal(opt2.rates, opt.rates)
    assert int(opt2.nonfinite_steps) == int(opt.nonfinite_steps) == 1
    _run_steps(opt, ps, grads, ds, backend, 5, 10)
    _run_steps(opt2, ps2, grads, ds, backend, 5, 10)
    for a, b in zip(ps, ps2):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(ps, ps2):
        sa, sb = opt.state.get(a, {}), opt2.state.get(b, {})
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
            if k == "step":
                assert sb[k].dtype == torch.float32 and sb[k].device == b.device
    assert torch.equal(opt.factors, opt2.factors) and torch.equal(opt.rates, opt2.rates)


def test_load_state_dict_copies_and_checks():
    ps = make_params()
    opt = make_ours("adamw", ps, dict(lr=1e-2), 1e-2)
    grads, ds = make_grads(2), make_ds(2, nan_at=())
    _run_steps(opt, ps, grads, ds, "reference", 0, 2)
    ps2 = make_params()
    opt2 = make_ours("adamw", ps2, dict(lr=1e-2), 1e-2)
    sd = opt.state_dict()
    opt2.load_state_dict(sd)
    st_a, st_b = opt.state[ps[0]], opt2.state[ps2[0]]
    assert st_a["exp_avg"].data_ptr() != st_b["exp_avg"].data_ptr()  # no shared storage
    assert torch.equal(st_a["exp_avg"], st_b["exp_avg"])
    # a copy survives a round trip through copy.deepcopy as well
    opt3 = copy.deepcopy(opt)
    assert torch.equal(opt3.factors, opt.factors) and opt3.num_layers == K
    bad = dict(sd)
    bad["layerwise"] = dict(sd["layerwise"], num_layers=K + 1)
    with pytest.raises(ValueError, match="num_layers=4 but this optimizer has 3"):
        opt2.load_state_dict(bad)
    plain = torch.optim.AdamW(make_params(), lr=1e-2).state_dict()
    with pytest.raises(ValueError, match="no 'layerwise' entry"):
        opt2.load_state_dict(plain)
    sgd = make_ours("sgd", make_params(), dict(lr=0.1), 0.0)
    with pytest.raises(ValueError, match="saved by a 'adamw' optimizer"):
        sgd.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# Other behaviour
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_equals_float_lr(backend):
    grads, ds = make_grads(4), make_ds(4, nan_at=())
    out = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):
        ps = make_params()
        opt = make_ours("adamw", ps, dict(lr=lr), 1e-2)
        _run_steps(opt, ps, grads, ds, backend, 0, 4)
        out.append((ps, opt.rates.clone()))
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_discrepancy_keeps_layer_rate(backend):
    ps = make_params()
    opt = make_ours("sgd", ps, dict(lr=0.1), 0.0)
    grads = make_grads(2)
    with lw.use_backend(backend):
        set_grads(ps, grads[0], torch.float32)
        opt.step(torch.tensor([0.5, 1.0, 2.0]))
        r0, ref0 = opt.rates.clone(), opt.rate_reference.clone()
        set_grads(ps, grads[1], torch.float32)
        opt.step(torch.tensor([1.5, float("inf"), 2.0]))  # (layer 0 rises: its rate moves under both rules)
    assert opt.rates[1] == r0[1] and opt.rates[0] != r0[0]
    assert torch.equal(opt.rate_reference[:, 1], ref0[:, 1]) and not torch.equal(opt.rate_reference[:, 0], ref0[:, 0])
    assert int(opt.nonfinite_steps) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_step(backend):
    """float32 and bfloat16 parameters in one optimizer give what they give separately."""
    torch.manual_seed(3)
    a32, b16 = torch.randn(50).requires_grad_(True), torch.randn(7, 9).bfloat16().requires_grad_(True)
    c32, d16 = a32.detach().clone().requires_grad_(True), b16.detach().clone().requires_grad_(True)
    both = LayerwiseAdamW([{"params": [a32], "layer": 0}, {"params": [b16], "layer": 1}], lr=1e-2)
    only32 = LayerwiseAdamW([{"params": [c32], "layer": 0}, {"params": [], "layer": 1}], lr=1e-2)
    only16 = LayerwiseAdamW([{"params": [], "layer": 0}, {"params": [d16], "layer": 1}], lr=1e-2)
    with lw.use_backend(backend):
        for _ in range(3):
            g32, g16 = torch.randn(50), torch.randn(7, 9).bfloat16()
            a32.grad, c32.grad, b16.grad, d16.grad = g32, g32.clone(), g16, g16.clone()
            d = torch.tensor([0.4, 1.1])
            both.step(d)
            only32.step(d)
            only16.step(d)
    assert torch.equal(a32, c32) and torch.equal(b16, d16)


def test_errors_name_the_problem():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="group 0 has no 'layer' key"):
        LayerwiseSGD([{"params": [p]}], lr=0.1)
    with pytest.raises(TypeError, match="group 0 is a Tensor"):
        LayerwiseSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="group 0 has layer -1"):
        LayerwiseSGD([{"params": [p], "layer": -1}], lr=0.1)
    with pytest.raises(TypeError, match="group 0 has layer 1.5"):
        LayerwiseSGD([{"params": [p], "layer": 1.5}], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        LayerwiseSGD([{"params": [p], "layer": 0}], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="invalid beta parameter at index 1"):
        LayerwiseAdamW([{"params": [p], "layer": 0}], lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="rate_momentum must lie in"):
        LayerwiseSGD([{"params": [p], "layer": 0}], lr=0.1, rate_momentum=1.5)
    with pytest.raises(ValueError, match="unknown sync 'allreduce'"):
        LayerwiseSGD([{"params": [p], "layer": 0}], lr=0.1, sync="allreduce")
    with pytest.raises(ValueError, match="parameter on meta but others are on cpu"):
        LayerwiseSGD([{"params": [p], "layer": 0}, {"params": [torch.zeros(2, device="meta")], "layer": None}], lr=0.1)
    opt = LayerwiseSGD([{"params": [p], "layer": 0}, {"params": [torch.zeros(2, requires_grad=True)], "layer": 1}],
                       lr=0.1)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"discrepancies must have shape \(2,\), got shape \(3,\)"):
        opt.step(torch.ones(3))
    with pytest.raises(TypeError, match="discrepancies has dtype torch.int64"):
        opt.step(torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="are on meta but the rate state is on cpu"):
        opt.step(torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match="discrepancies must be a torch.Tensor"):
        opt.step([0.1, 0.2])
    with pytest.raises(ValueError, match="group 2 has layer 5; expected 0..1"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "layer": 5})
    with pytest.raises(RuntimeError, match="sync='all_reduce' needs an initialised"):
        LayerwiseSGD([{"params": [p], "layer": 0}], lr=0.1, sync="all_reduce").step(torch.ones(1))
    assert torch.equal(p.detach(), torch.zeros(3))


@requires_native
def test_native_op_errors():
    q = torch.zeros(3)
    hyper = ([0.0], [0.9], [0.0], [False], [False])  # weight_decay, momentum, dampening, nesterov, maximize
    step = torch.ops.lwkd.layerwise_sgd_step
    sliced = torch.zeros(4, 6)[:, ::2]  # the op itself updates dense tensors (the optimizer copies in and out)
    with pytest.raises(RuntimeError, match=r"params\[0\] .* is not dense"):
        step([sliced], [torch.ones(4, 3)], [], torch.ones(1), [0], [], [0], [0.1], [None],
             [0.0], [0.0], [0.0], [False], [False])
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Double but params\[0\] has dtype Float"):
        step([q], [torch.ones(3, dtype=torch.float64)], [torch.zeros(3)], torch.ones(1), [0], [],
             [0], [0.1], [None], *hyper)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[4\] but params\[0\] has shape \[3\]"):
        step([q], [torch.ones(4)], [torch.zeros(3)], torch.ones(1), [0], [], [0], [0.1], [None], *hyper)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has shape \[2\] but params\[0\] has shape \[3\]"):
        step([q], [torch.ones(3)], [torch.zeros(2)], torch.ones(1), [0], [], [0], [0.1], [None], *hyper)
    with pytest.raises(RuntimeError, match="group 0 has layer 1 but the factor vector has K=1 entries"):
        step([q], [torch.ones(3)], [torch.zeros(3)], torch.ones(1), [0], [], [1], [0.1], [None], *hyper)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32 tensor"):
        torch.ops.lwkd.layerwise_adamw_step([q], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                                            [torch.zeros((), dtype=torch.int64)], torch.ones(1), [0], [0], [0.1],
                                            [None], [0.0], [0.9], [0.999], [1e-8], [False], [False])
    assert torch.equal(q, torch.zeros(3))


@requires_native
def test_native_step_opcheck():
    torch.manual_seed(0)
    ps = [torch.randn(5), torch.randn(2, 3)]
    gs = [torch.randn(5), torch.randn(2, 3)]
    ms = [torch.zeros(5), torch.zeros(2, 3)]
    vs = [torch.zeros(5), torch.zeros(2, 3)]
    steps = [torch.zeros(()), torch.zeros(())]
    args = (ps, gs, ms, vs, [], steps, torch.ones(2), [0, 1], [0, -1], [1e-2, 1e-2], [None, None],
            [1e-2] * 2, [0.9] * 2, [0.999] * 2, [1e-8] * 2, [False] * 2, [False] * 2)
    torch.library.opcheck(torch.ops.lwkd.layerwise_adamw_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_check_cases_pass(backend):
    """The `lwkd-fast check` cases of the fused step pass on this backend."""
    for case in check_step.lwkd_checks(backend, torch.device("cpu")):
        with lw.use_backend(backend):
            verdicts = case.run()
        bad = {k: str(v) for k, v in verdicts.items() if not v.ok}
        assert not bad, f"{case.label}: {bad}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_only_optimizer_is_plain_adamw(backend):
    """K = 0 (no matched layer, only the head): an ordinary AdamW step at the base rate."""
    torch.manual_seed(5)
    p = torch.randn(6, 4).requires_grad_(True)
    q = p.detach().clone().requires_grad_(True)
    ours = LayerwiseAdamW([{"params": [p], "layer": None}], lr=0.1, weight_decay=0.05)
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.05, foreach=False)
    assert ours.num_layers == 0 and ours.rates.shape == (0,)
    for _ in range(3):
        p.grad = torch.randn(6, 4)
        q.grad = p.grad.clone()
        with lw.use_backend(backend):
            ours.step(torch.empty(0))
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_work_list_cache_follows_group_and_grad_changes(backend):
    """The cached work list is rebuilt when a group is added, a group's parameter list or
    momentum changes, or a parameter gains or loses its gradient."""
    torch.manual_seed(7)
    a, b, c = (torch.randn(5).requires_grad_(True) for _ in range(3))
    opt = LayerwiseSGD([{"params": [a], "layer": 0}, {"params": [b], "layer": 1}], lr=0.1)
    shadow = {t: t.detach().clone() for t in (a, b, c)}

    def step(d, grads, momentum_of=None):
        for t in (a, b, c):
            t.grad = grads.get(t)
        with lw.use_backend(backend):
            opt.step(d)
        for t, g in grads.items():  # plain SGD (momentum 0) with the rates the optimizer applied
            if g is None:
                continue
            grp = next(gr for gr in opt.param_groups if any(t is q for q in gr["params"]))
            j = grp["layer"]
            shadow[t] -= (opt.rates[j] if j is not None else grp["lr"]) * g

    d = torch.tensor([0.5, 1.5])
    step(d, {a: torch.ones(5), b: torch.ones(5)})
    step(d, {a: torch.ones(5), b: None})                     # b loses its gradient
    opt.add_param_group({"params": [c], "layer": None})       # a new group after steps
    step(d, {a: torch.ones(5), b: torch.ones(5), c: torch.ones(5)})
    for t in (a, b, c):
        torch.testing.assert_close(t.detach(), shadow[t], rtol=1e-6, atol=1e-7)
    opt.param_groups[0]["momentum"] = 0.9                     # momentum switched on later
    a.grad, b.grad, c.grad = torch.ones(5), None, None
    with lw.use_backend(backend):
        opt.step(d)
    assert "momentum_buffer" in opt.state[a] and torch.equal(opt.state[a]["momentum_buffer"], torch.ones(5))
    assert "momentum_buffer" not in opt.state.get(b, {})


# ------------------------------------------------------------------------------------------------
# The device-side skip flag (found_inf), skipped_steps, attach()
# ------------------------------------------------------------------------------------------------

SKIP_CASES = [
    ("sgd", "momentum+wd+dampening", dict(lr=0.05, momentum=0.9, dampening=0.3), 1e-2),
    ("sgd", "nesterov+wd", dict(lr=0.05, momentum=0.9, nesterov=True), 1e-2),
    ("adamw", "default", dict(lr=1e-2), 1e-2),
    ("adamw", "amsgrad", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True), 0.1),
]
SKIPPED = (0, 3, 4)  # the first step (it creates the state) and two in a row


def _skip_run(kind, cfg, wd, backend, steps, skip_them, flag_zero=True):
    """``steps`` steps; with ``skip_them`` the SKIPPED ones get NaN gradients and discrepancies
    (on every parameter, also those that never have a gradient otherwise) and found_inf = 1,
    the others found_inf = 0; without, the SKIPPED steps are left out and found_inf is None."""
    ps = make_params()
    opt = make_ours(kind, ps, cfg, wd)
    grads, ds = make_grads(steps), make_ds(steps, nan_at=(5,))
    one, zero = torch.ones(()), torch.zeros(())
    with lw.use_backend(backend):
        for s in range(steps):
            if s in SKIPPED:
                if skip_them:
                    for p in ps:
                        p.grad = torch.full_like(p, float("nan"))
                    opt.step(torch.full((K,), float("nan")), found_inf=one)
                continue
            set_grads(ps, grads[s], torch.float32)
            opt.step(ds[s], found_inf=(zero if flag_zero else None) if skip_them else None)
    return ps, opt


def assert_runs_identical(ps_a, opt_a, ps_b, opt_b):
    for i, (a, b) in enumerate(zip(ps_a, ps_b)):
        assert torch.equal(a.detach(), b.detach()), f"param {i}"
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i in sb["state"]:
        assert set(sa["state"][i]) == set(sb["state"][i]), f"param {i}"
        for k, v in sb["state"][i].items():
            assert torch.equal(sa["state"][i][k], v), f"param {i} state {k}"
    for key in ("factors", "rates", "nonfinite_steps"):
        assert torch.equal(sa["layerwise"][key], sb["layerwise"][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,label,cfg,wd", SKIP_CASES, ids=[f"{c[0]}-{c[1]}" for c in SKIP_CASES])
def test_skipped_steps_equal_omitted_steps(backend, kind, label, cfg, wd):
    """Steps with found_inf = 1 (and NaN gradients and discrepancies) leave parameters,
    optimizer state, factors, rates and counters exactly as if step() had not been called."""
    steps = 8
    ps_a, opt_a = _skip_run(kind, cfg, wd, backend, steps, skip_them=True)
    ps_b, opt_b = _skip_run(kind, cfg, wd, backend, steps, skip_them=False)
    assert int(opt_a.skipped_steps) == len(SKIPPED) and int(opt_b.skipped_steps) == 0
    assert int(opt_a.nonfinite_steps) == int(opt_b.nonfinite_steps) == 1  # only the NaN at step 5
    assert opt_a.skipped_steps.dtype == torch.int64 and opt_a.skipped_steps.shape == ()
    assert_runs_identical(ps_a, opt_a, ps_b, opt_b)
    if kind == "adamw":
        assert float(opt_a.state[ps_a[0]]["step"]) == steps - len(SKIPPED)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,label,cfg,wd", [SKIP_CASES[0], SKIP_CASES[3]], ids=["sgd", "adamw"])
def test_skipped_steps_when_the_host_learns_the_flag_late(backend, kind, label, cfg, wd, monkeypatch):
    """On CUDA the host learns a skip flag only once the device got there; state created on a
    possibly skipped step stays unsettled meanwhile (SGD buffers then run as fresh and as
    continuing, the device picks).  Simulated on CPU: the host never reads the flag until
    state_dict(), which settles it."""
    monkeypatch.setattr(optim, "_EAGER_HOST_READ", False)
    ps_a, opt_a = _skip_run(kind, cfg, wd, backend, 8, skip_them=True)
    assert opt_a._unsettled  # (the simulation is live)
    monkeypatch.setattr(optim, "_EAGER_HOST_READ", True)
    ps_b, opt_b = _skip_run(kind, cfg, wd, backend, 8, skip_them=False)
    assert_runs_identical(ps_a, opt_a, ps_b, opt_b)
    assert not opt_a._unsettled


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_zero_is_the_plain_step(backend):
    """found_inf = 0 gives bit for bit what found_inf=None gives (the flagged kernels compute
    the same numbers)."""
    cfg = dict(lr=1e-2, amsgrad=True)
    ps_a, opt_a = _skip_run("adamw", cfg, 1e-2, backend, 4, skip_them=False)
    ps_b = make_params()
    opt_b = make_ours("adamw", ps_b, cfg, 1e-2)
    grads, ds = make_grads(4), make_ds(4, nan_at=(5,))
    with lw.use_backend(backend):
        for s in range(4):
            if s in SKIPPED:
                continue
            set_grads(ps_b, grads[s], torch.float32)
            opt_b.step(ds[s], found_inf=torch.zeros(()))
    assert_runs_identical(ps_a, opt_a, ps_b, opt_b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("host_read", ["eager", "late"])
def test_step_with_found_inf_makes_no_host_sync(backend, kind, host_read, monkeypatch):
    """Skipped and unskipped steps, the first one skipped (it creates state), under the detector."""
    monkeypatch.setattr(optim, "_EAGER_HOST_READ", host_read == "eager")
    ps = make_params()
    cfg = dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True) if kind == "sgd" else dict(lr=1e-2, amsgrad=True)
    opt = make_ours(kind, ps, cfg, 1e-2, sync=None)
    grads, ds = make_grads(4), make_ds(4, nan_at=(1,))
    flags = [torch.ones(()), torch.zeros(()), torch.ones(()), torch.zeros(())]
    with lw.use_backend(backend):
        for s in range(4):
            set_grads(ps, grads[s], torch.float32)
            with NoHostSync():
                with pytest.raises(AssertionError, match="host synchronisation"):
                    flags[s].item()  # the detector is live
                opt.step(ds[s], found_inf=flags[s])
    assert int(opt.skipped_steps) == 2 and int(opt.nonfinite_steps) == 1


class _Source:
    def __init__(self, d=None, found_inf=None):
        self.latest_discrepancies, self.found_inf = d, found_inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_attach_step_without_arguments_uses_the_source(backend):
    grads, ds = make_grads(4), make_ds(4, nan_at=())
    flags = [torch.zeros(()), torch.ones(()), None, torch.zeros(())]
    ps_a, ps_b = make_params(), make_params()
    cfg = dict(lr=0.05, momentum=0.9)
    opt_a, opt_b = make_ours("sgd", ps_a, cfg, 1e-2), make_ours("sgd", ps_b, cfg, 1e-2)
    src = _Source()
    assert opt_a.attach(src) is opt_a and opt_a.source is src
    with lw.use_backend(backend):
        for s in range(4):
            set_grads(ps_a, grads[s], torch.float32)
            set_grads(ps_b, grads[s], torch.float32)
            src.latest_discrepancies, src.found_inf = ds[s], flags[s]
            opt_a.step()
            opt_b.step(ds[s], found_inf=flags[s])
    assert_runs_identical(ps_a, opt_a, ps_b, opt_b)
    assert int(opt_a.skipped_steps) == 1
    # explicit arguments win over the source's; a source without found_inf means "never skip"
    src.found_inf = torch.ones(())
    before = [p.detach().clone() for p in ps_a]
    set_grads(ps_a, grads[0], torch.float32)
    opt_a.step(found_inf=torch.zeros(()))
    assert not torch.equal(before[0], ps_a[0].detach()) and int(opt_a.skipped_steps) == 1
    # step(closure) with the closure as the only (positional) argument
    calls = []
    assert opt_a.step(lambda: calls.append(1) or torch.tensor(3.0)) == 3.0 and calls == [1]
    assert int(opt_a.skipped_steps) == 2  # the source's found_inf = 1 applied
    opt_a.attach(types.SimpleNamespace(latest_discrepancies=ds[1]))
    opt_a.step()
    assert int(opt_a.skipped_steps) == 2
    opt_a.detach_source()
    assert opt_a.source is None
    with pytest.raises(RuntimeError, match="no discrepancies given and no source attached"):
        opt_a.step()
    # a copy is not attached
    opt_a.attach(src)
    assert copy.deepcopy(opt_a).source is None


def test_found_inf_and_source_errors_name_the_problem():
    ps = make_params()
    opt = make_ours("sgd", ps, dict(lr=0.1, momentum=0.9), 0.0)
    set_grads(ps, make_grads(1)[0], torch.float32)
    d = torch.ones(K)
    with pytest.raises(RuntimeError, match=r"LayerwiseSGD.step: no discrepancies given and no source attached"):
        opt.step()
    with pytest.raises(ValueError, match=r"found_inf must be a 0-dim tensor .*got shape \(2,\)"):
        opt.step(d, found_inf=torch.zeros(2))
    with pytest.raises(TypeError, match=r"found_inf \(shape \(\)\) has dtype torch.int64; expected torch.float32"):
        opt.step(d, found_inf=torch.zeros((), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"found_inf \(shape \(\)\) is on meta but the optimizer state is on cpu"):
        opt.step(d, found_inf=torch.zeros((), device="meta"))
    with pytest.raises(TypeError, match="found_inf must be None or a 0-dim float32 tensor, got bool"):
        opt.step(d, found_inf=True)
    with pytest.raises(TypeError, match="has no attribute 'latest_discrepancies'"):
        opt.attach(object())
    opt.attach(_Source())
    with pytest.raises(RuntimeError, match=r"the attached source \(_Source\) has latest_discrepancies=None"):
        opt.step()
    opt.attach(_Source(d, found_inf=torch.zeros((1, 1))))
    with pytest.raises(ValueError, match=r"found_inf must be a 0-dim tensor .*got shape \(1, 1\)"):
        opt.step()
    # nothing ran
    for p, p0 in zip(ps, make_params()):
        assert torch.equal(p.detach(), p0.detach())
    assert not opt.state and int(opt.skipped_steps) == 0


@requires_native
def test_native_found_inf_errors():
    q = torch.zeros(3)
    step = torch.ops.lwkd.layerwise_sgd_step
    args = ([q], [torch.ones(3)], [], torch.ones(1), [0], [], [0], [0.1], [None], [0.0], [0.0], [0.0], [False],
            [False])
    with pytest.raises(RuntimeError, match=r"layerwise_sgd_step: found_inf must be a 0-dim .* got shape \[2\]"):
        step(*args, torch.zeros(2))
    with pytest.raises(RuntimeError, match="layerwise_sgd_step: found_inf has dtype Double; expected float32"):
        step(*args, torch.zeros((), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="layerwise_rates: found_inf has dtype Long; expected float32"):
        torch.ops.lwkd.layerwise_rates(torch.ones(2), torch.ones(2), None, [0.1], None, 0.9, 1.0, 0.1, 10.0, 1e-12,
                                       torch.zeros((), dtype=torch.int64))
    assert torch.equal(q, torch.zeros(3))
    step(*args, torch.ones(1))  # one element, as torch.amp keeps it: accepted (and skipped)
    assert torch.equal(q, torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_with_skipped_steps(backend):
    grads, ds = make_grads(6), make_ds(6, nan_at=())
    cfg = dict(lr=0.05, momentum=0.9)
    ps = make_params()
    opt = make_ours("sgd", ps, cfg, 1e-2)
    flags = [torch.ones(()), torch.zeros(()), torch.ones(()), torch.zeros(()), torch.ones(()), torch.zeros(())]
    with lw.use_backend(backend):
        for s in range(3):
            set_grads(ps, grads[s], torch.float32)
            opt.step(ds[s], found_inf=flags[s])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    assert int(ck["opt"]["layerwise"]["skipped_steps"]) == 2
    ps2 = [p.clone().requires_grad_(True) for p in ck["params"]]
    opt2 = make_ours("sgd", ps2, cfg, 1e-2)
    opt2.load_state_dict(ck["opt"])
    assert int(opt2.skipped_steps) == 2 and opt2.skipped_steps.dtype == torch.int64
    with lw.use_backend(backend):
        for o, pp in ((opt, ps), (opt2, ps2)):
            for s in range(3, 6):
                set_grads(pp, grads[s], torch.float32)
                o.step(ds[s], found_inf=flags[s])
    assert_runs_identical(ps, opt, ps2, opt2)
    assert int(opt.skipped_steps) == int(opt2.skipped_steps) == 3
    # a checkpoint written before skipped_steps existed still loads (the counter starts at 0)
    old = opt.state_dict()
    old["layerwise"] = {k: v for k, v in old["layerwise"].items() if k != "skipped_steps"}
    opt3 = make_ours("sgd", make_params(), cfg, 1e-2)
    opt3.load_state_dict(old)
    assert int(opt3.skipped_steps) == 0


@requires_native
def test_native_step_opcheck_with_found_inf():
    torch.manual_seed(0)
    for flag in (torch.zeros(()), torch.ones(())):
        ps = [torch.randn(5), torch.randn(2, 3)]
        args = (ps, [torch.randn(5), torch.randn(2, 3)], [torch.zeros(5), torch.zeros(2, 3)],
                [torch.zeros(5), torch.zeros(2, 3)], [], [torch.zeros(()), torch.zeros(())], torch.ones(2), [0, 1],
                [0, -1], [1e-2, 1e-2], [None, None], [1e-2] * 2, [0.9] * 2, [0.999] * 2, [1e-8] * 2, [False] * 2,
                [False] * 2, flag)
        torch.library.opcheck(torch.ops.lwkd.layerwise_adamw_step.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        sgd = ([torch.randn(4)], [torch.randn(4)], [torch.zeros(4)], torch.ones(1), [0], [0], [0],
               [0.1], [None], [0.0], [0.9], [0.0], [False], [False], flag)
        torch.library.opcheck(torch.ops.lwkd.layerwise_sgd_step.default, sgd,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels unavailable here")
def test_triton_step_opcheck_with_found_inf():
    from lwkd_fast.triton import optim as tri

    torch.manual_seed(0)
    args = ([torch.randn(5), torch.randn(2, 3)], [torch.randn(5), torch.randn(2, 3)],
            [torch.zeros(5), torch.zeros(2, 3)], [torch.zeros(5), torch.zeros(2, 3)], [],
            [torch.zeros(()), torch.zeros(())], torch.ones(2), [0, 1], [0, -1], [1e-2, 1e-2], [None, None],
            [1e-2] * 2, [0.9] * 2, [0.999] * 2, [1e-8] * 2, [False] * 2, [False] * 2, torch.ones(()))
    torch.library.opcheck(tri.layerwise_adamw_step, args, test_utils=("test_schema", "test_faketensor"))


def test_all_reduce_sync_skips_on_every_rank(monkeypatch):
    """sync='all_reduce': the skip flag travels with the discrepancies in one all-reduce, so a
    non-finite loss on another rank skips this rank's step too (a mocked world of two)."""
    import torch.distributed as dist

    remote = {"d": torch.tensor([0.2, 0.4, 0.6]), "flag": 0.0}
    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append(t.shape)
        t.add_(torch.cat([remote["d"], torch.tensor([remote["flag"]])]) if t.shape[0] == K + 1 else remote["d"])

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ps, ps_ref = make_params(), make_params()
    opt = make_ours("sgd", ps, dict(lr=0.05, momentum=0.9), 1e-2, sync="all_reduce")
    ref = make_ours("sgd", ps_ref, dict(lr=0.05, momentum=0.9), 1e-2)
    grads = make_grads(3)
    local = torch.tensor([1.0, 0.8, 0.2])
    with lw.use_backend("reference"):
        for s, remote_flag in enumerate((0.0, 1.0, 0.0)):
            remote["flag"] = remote_flag
            set_grads(ps, grads[s], torch.float32)
            opt.step(local, found_inf=torch.zeros(()))  # finite here; the other rank may not be
            if not remote_flag:
                set_grads(ps_ref, grads[s], torch.float32)
                ref.step((local + remote["d"]) / 2)
    assert calls == [(K + 1,)] * 3  # one collective per step
    assert int(opt.skipped_steps) == 1
    assert_runs_identical(ps, opt, ps_ref, ref)


# ------------------------------------------------------------------------------------------------
# State that does not belong to its parameter (issue 11 item 1)
# ------------------------------------------------------------------------------------------------


def _stepped(kind, ps, steps=2, **cfg):
    cfg = cfg or (dict(lr=0.05, momentum=0.9) if kind == "sgd" else dict(lr=1e-2, amsgrad=True))
    opt = make_ours(kind, ps, cfg, 1e-2)
    _run_steps(opt, ps, make_grads(steps), make_ds(steps, nan_at=()), "reference", 0, steps)
    return opt


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_checkpoint_of_another_model_is_refused_at_load(kind):
    """Same group sizes, other shapes: torch.optim would load it; we name the parameter, the
    state key and both shapes, and change nothing."""
    ps = make_params()
    sd = _stepped(kind, ps).state_dict()
    other = make_params()
    other[4] = torch.randn(16, 8, 5, 5, requires_grad=True)  # another model's layer-1 convolution
    opt = make_ours(kind, other, dict(lr=0.05), 1e-2)
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    with pytest.raises(ValueError, match=(rf"load_state_dict: state\['{key}'\] of param_groups\[2\]\['params'\]\[0\] "
                                          r"\(shape \(16, 8, 5, 5\).* has shape \(16, 8, 3, 3\) but the parameter has "
                                          r"shape \(16, 8, 5, 5\): the checkpoint was saved for another model")):
        opt.load_state_dict(sd)
    assert not opt.state and torch.equal(opt.factors, torch.ones(K))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("how", ["state of another model", "p.data resized", "p.data re-typed"])
def test_state_that_does_not_fit_is_refused_at_the_step(backend, kind, how):
    """State that bypassed load_state_dict (torch.optim's loader, direct assignment) or a
    parameter changed under the optimizer: every backend refuses before any kernel runs (the
    Triton kernels would read out of bounds), naming the parameter, the key and both shapes."""
    ps = make_params()
    opt = _stepped(kind, ps)
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    if how == "state of another model":  # e.g. loaded with torch.optim.Optimizer.load_state_dict
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][4][key] = torch.zeros(16, 8, 3, 5)  # (state index 4 is ps[4])
        torch.optim.Optimizer.load_state_dict(opt, sd)
        want = r"has shape \(16, 8, 3, 5\), dtype torch.float32.* but the parameter has shape \(16, 8, 3, 3\)"
    elif how == "p.data resized":
        ps[4].data = ps[4].data[:, :, :2]
        want = r"has shape \(16, 8, 3, 3\), dtype torch.float32.* but the parameter has shape \(16, 8, 2, 3\)"
    else:
        ps[4].data = ps[4].data.double()
        want = r"has shape \(16, 8, 3, 3\), dtype torch.float32.* but the parameter has shape \(16, 8, 3, 3\), dtype torch.float64"
    before = [p.detach().clone() for p in ps]
    row = make_grads(3)[2]
    row[4] = None
    set_grads(ps, row, torch.float32)
    ps[4].grad = torch.ones_like(ps[4])
    with lw.use_backend(backend), pytest.raises(
            ValueError, match=rf"step: state\['{key}'\] of param_groups\[2\]\['params'\]\[0\] .*{want}"):
        opt.step(make_ds(1, nan_at=())[0])
    for a, b in zip(ps, before):
        assert torch.equal(a.detach(), b.to(a.dtype)) if a.shape == b.shape else True


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_follows_a_layout_change_of_its_parameter(backend):
    """model.to(memory_format=channels_last) after some steps: the state is re-laid out like
    its parameter, and the run still equals torch.optim's."""
    ps_a, ps_b = make_params(), make_params()
    ours = make_ours("adamw", ps_a, dict(lr=1e-2), 1e-2)
    ref = make_torch("adamw", ps_b, dict(lr=1e-2), 1e-2)
    rule_ = RefRule()
    grads, ds = make_grads(4, odd=False), make_ds(4, nan_at=())  # (same gradients present: the cached work list)
    for s in range(4):
        if s == 2:
            for p in (ps_a[4], ps_b[4]):
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        set_grads(ps_a, grads[s], torch.float32)
        set_grads(ps_b, grads[s], torch.float32)
        with lw.use_backend(backend):
            ours.step(ds[s])
        rule_.apply(ref, ds[s], 1e-2)
        ref.step()
    assert ours.state[ps_a[4]]["exp_avg"].stride() == ps_a[4].stride()
    for a, b in zip(ps_a, ps_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_states_close(ours, ref, ps_a, ps_b)


# ------------------------------------------------------------------------------------------------
# Non-dense parameters (issue 11 item 9)
# ------------------------------------------------------------------------------------------------


def _sliced_params(seed=0):
    """Leaf views that are not dense, as torch.optim updates them in place: every other
    column of a matrix, a strided slice of a 4-D weight, and a plain dense tensor beside them."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(6, 10, generator=g), torch.randn(4, 3, 6, 6, generator=g)]
    ps = [bases[0][:, ::2].detach().requires_grad_(True), bases[1][:, :, 1::2].detach().requires_grad_(True),
          torch.randn(5, generator=g).requires_grad_(True)]
    return bases, ps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,cfg", [("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
                                      ("adamw", dict(lr=1e-2, amsgrad=True))])
def test_non_dense_parameters_update_like_torch_optim(backend, kind, cfg):
    (base_a, _), ps_a = _sliced_params()
    _, ps_b = _sliced_params()
    untouched = base_a[:, 1::2].clone()
    groups = lambda ps: [{"params": ps[:2], "layer": 0}, {"params": ps[2:], "layer": None}]  # noqa: E731
    ours = (LayerwiseSGD if kind == "sgd" else LayerwiseAdamW)(groups(ps_a), **cfg)
    ref = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(groups(ps_b), **cfg, foreach=False)
    m = torch.ones(1)
    g = torch.Generator().manual_seed(3)
    for s in range(5):
        for a, b in zip(ps_a, ps_b):
            gr = torch.randn(a.shape, generator=g)
            a.grad, b.grad = gr.clone(), gr.clone()
        d = torch.rand(1, generator=g) + 0.1
        with lw.use_backend(backend):
            ours.step(d)
        eta = rule.reference_rates(d, m, None, [cfg["lr"]], None, 0.9, 1.0, 0.1, 10.0, 1e-12)
        ref.param_groups[0]["lr"] = float(eta[0])
        ref.step()
    assert not ps_a[0].is_contiguous() and ps_a[0].data_ptr() == base_a.data_ptr()  # still the same view
    for a, b in zip(ps_a, ps_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(base_a[:, 1::2], untouched)  # the columns between the slices are untouched
    assert_states_close(ours, ref, ps_a, ps_b)


# ------------------------------------------------------------------------------------------------
# The optimizer follows its parameters (issue 13 item 2)
# ------------------------------------------------------------------------------------------------


def _meta_then_cpu(kind, cfg):
    """Build the model on meta, then the optimizer, then move the model (swap_tensors keeps the
    Parameter objects, as model.cuda() keeps them): RepDistiller's order, device move simulated."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 5, 1), torch.nn.Flatten(),
                                    torch.nn.Linear(5 * 4, 3))
    groups = [{"params": model[0].parameters(), "layer": 0}, {"params": model[1].parameters(), "layer": 1},
              {"params": model[3].parameters(), "layer": None}]
    opt = (LayerwiseSGD if kind == "sgd" else LayerwiseAdamW)(groups, **cfg)
    assert opt.factors.device.type == "meta"
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,cfg", [("sgd", dict(lr=0.05, momentum=0.9)), ("adamw", dict(lr=1e-2))])
def test_optimizer_built_before_the_model_moves(backend, kind, cfg):
    model, opt = _meta_then_cpu(kind, cfg)
    ref_model = copy.deepcopy(model)
    ref = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(
        [{"params": ref_model[0].parameters()}, {"params": ref_model[1].parameters()},
         {"params": ref_model[3].parameters()}], **cfg, foreach=False)
    m = torch.ones(2)
    ref_state = rule.new_reference_state(2) if optim.DEFAULT_RATE_NORMALIZE == "running" else None  # the default rule
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for s in range(3):
        d = torch.tensor([0.2 + s, 0.7])
        model(x).square().mean().backward()
        with lw.use_backend(backend), NoHostSync():
            opt.step(d)  # the rate state is created on the CPU here, without a host read
        opt.zero_grad()
        eta = rule.reference_rates(d, m, None, [cfg["lr"]], None, 0.9, 1.0, 0.1, 10.0, 1e-12, ref_state=ref_state)
        for gi in range(2):
            ref.param_groups[gi]["lr"] = float(eta[gi])
        ref_model(x).square().mean().backward()
        ref.step()
        ref.zero_grad()
    assert opt.factors.device.type == "cpu" and opt.rates.device.type == "cpu"
    torch.testing.assert_close(opt.factors, m, rtol=0, atol=0)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_state_dict_places_state_like_torch():
    """A float32 checkpoint into a bfloat16 copy of the model: floating state in the parameter's
    dtype (torch.optim's rule), step counts float32 on the parameter's device; and loading into
    an optimizer built before its model moved puts the rate state where the parameters are."""
    ps = make_params()
    sd = _stepped("adamw", ps).state_dict()
    ps16 = [p.detach().to(torch.bfloat16).requires_grad_(True) for p in ps]
    opt16 = make_ours("adamw", ps16, dict(lr=1e-2, amsgrad=True), 1e-2)
    opt16.load_state_dict(sd)
    st = opt16.state[ps16[0]]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["step"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], sd["state"][0]["exp_avg"].to(torch.bfloat16))
    model, opt = _meta_then_cpu("sgd", dict(lr=0.05, momentum=0.9))
    src = copy.deepcopy(model)
    src_opt = LayerwiseSGD([{"params": src[0].parameters(), "layer": 0}, {"params": src[1].parameters(), "layer": 1},
                            {"params": src[3].parameters(), "layer": None}], lr=0.05, momentum=0.9)
    src(torch.randn(2, 3, 4, 4)).sum().backward()
    src_opt.step(torch.tensor([0.3, 1.2]))
    opt.load_state_dict(src_opt.state_dict())
    assert opt.factors.device.type == "cpu" and torch.equal(opt.factors, src_opt.factors)


# ------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint conventions, sync collective shape
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_layerwise_record_travels_in_param_groups(kind):
    """torch.distributed.checkpoint's state_dict helpers keep only state and param_groups (with
    every group key): the record in param_groups[0] alone restores the rule state, and the
    live groups do not keep it."""
    ps = make_params()
    opt = _stepped(kind, ps, steps=3)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["layerwise"] is sd["layerwise"]
    dcp_like = {"state": sd["state"], "param_groups": copy.deepcopy(sd["param_groups"])}
    ps2 = make_params()
    opt2 = make_ours(kind, ps2, dict(lr=0.05), 1e-2)
    opt2.load_state_dict(dcp_like)
    assert torch.equal(opt2.factors, opt.factors) and torch.equal(opt2.rates, opt.rates)
    assert all("layerwise" not in g for g in opt2.param_groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_without_discrepancies_when_every_rate_is_zero(backend):
    """What torch.distributed.checkpoint does to create a fresh optimizer's state: zero
    gradients, every lr 0, step(closure=None).  The state appears, nothing else changes; with a
    nonzero rate a missing D is still an error."""
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = make_ours("adamw", ps, dict(lr=1e-2), 1e-2)
    for p in ps:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    with pytest.raises(RuntimeError, match="no discrepancies given and no source attached"):
        opt.step()
    for g in opt.param_groups:
        g["lr"] = 0.0
    with lw.use_backend(backend):
        opt.step(closure=None)
    assert len(opt.state) == len(ps) and all(int(opt.state[p]["step"]) == 1 for p in ps)
    assert all(torch.equal(a.detach(), b) for a, b in zip(ps, before))
    assert torch.equal(opt.factors, torch.ones(K)) and int(opt.nonfinite_steps) == 0
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr


def test_all_reduce_carries_the_flag_slot_without_found_inf(monkeypatch):
    """A rank that passes no found_inf still all-reduces K + 1 values, and skips when another
    rank's flag arrives in the last slot (a mocked world of two; tests/test_distributed.py runs
    the real two-rank case)."""
    import torch.distributed as dist

    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append(tuple(t.shape))
        t.add_(torch.tensor([0.2, 0.4, 0.6, 1.0]))  # the other rank skips

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = make_ours("sgd", ps, dict(lr=0.05, momentum=0.9), 1e-2, sync="all_reduce")
    set_grads(ps, make_grads(1)[0], torch.float32)
    opt.step(torch.tensor([1.0, 0.8, 0.2]))
    assert calls == [(K + 1,)] and int(opt.skipped_steps) == 1
    assert all(torch.equal(a.detach(), b) for a, b in zip(ps, before))
    assert not opt.state  # a skipped first step leaves no state behind
