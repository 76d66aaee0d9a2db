"""Derivative maps (SPEC section 3): per-layer input Jacobians and Hessian-vector products.

Oracles, all float64:
* the ``loop`` strategy (one sample, one layer, one plain autograd call at a time);
* independently of this package: ``torch.autograd.functional`` on one sample of an eval-mode
  model, finite differences, HVP symmetry, and ``gradcheck`` for the second-order gradients;
* for train-mode BatchNorm: the eval-mode maps of a copy whose running statistics are set to the
  batch's mean and biased variance.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwkd_fast as lw
from lwkd_fast import derivatives as D
from lwkd_fast.check import derivatives as check_derivatives
from lwkd_fast.testing import compare

F64 = torch.float64
STRATEGIES = ("batched_backward", "vmap", "auto")


def assert_maps_close(actual, expected):
    assert len(actual) == len(expected)
    for j, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, (j, a.shape, e.shape)
        verdict = compare(a, e, F64)
        assert verdict.ok, f"layer {j}: {verdict}"


# ------------------------------------------------------------------------------------------------
# Models (float64, tiny)
# ------------------------------------------------------------------------------------------------


def mlp():
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(6, 8), act1=nn.Tanh(), fc2=nn.Linear(8, 8), act2=nn.Softplus(), out=nn.Linear(8, 3),
    ))


class CNN(nn.Module):
    def __init__(self, cin=2, w=4, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(w)
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        h = F.silu(self.bn1(self.conv1(x)))
        h = torch.tanh(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class ResidualBlock(nn.Module):
    """conv-bn-relu(inplace)-conv-bn + skip: the in-place ReLU overwrites bn1's output."""

    def __init__(self, c=3):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return F.softplus(self.bn2(self.conv2(h)) + x)


class Transformer(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.2, batch_first=True)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.enc(x))


def _randomize_bn(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=F64) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=F64) - 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=F64) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=F64) + 0.5)
    return model


# name -> (factory of (model, x, labels), layers, probe, channel_dim)
def _case(name):
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(3)
    if name == "mlp":
        model = mlp().double()
        x = torch.randn(5, 6, generator=g, dtype=F64)
        return model, x, torch.tensor([0, 2, 1, 1, 0]), ["act1", "fc2", "out"], ["energy", "max", "logit"], 1
    if name == "cnn_bn_eval":
        model = _randomize_bn(CNN().double()).eval()
        x = torch.randn(4, 2, 6, 5, generator=g, dtype=F64)
        return model, x, torch.tensor([2, 0, 1, 2]), ["bn1", "conv2", "fc"], ["energy", "max", "logit"], 1
    if name == "residual":
        model = _randomize_bn(ResidualBlock().double()).eval()
        x = torch.randn(3, 3, 5, 5, generator=g, dtype=F64)
        return model, x, None, ["bn1", "conv2", ""], ["energy", "max", "energy"], 1
    if name == "transformer":
        model = Transformer().double().eval()
        x = torch.randn(3, 4, 8, generator=g, dtype=F64)
        return (model, x, torch.tensor([4, 0, 3]), ["enc.self_attn", "enc.linear1", "enc", "head"],
                ["energy", "max", "energy", "energy"], -1)
    raise KeyError(name)


MODELS = ("mlp", "cnn_bn_eval", "residual", "transformer")


def _v(x, seed=5):
    return D.rademacher(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def _maps(model, x, layers, kind, **kw):
    if kind == "jacobian":
        return D.input_jacobians(model, x, layers, **kw)
    return D.input_hvps(model, x, layers, **kw)


@functools.lru_cache(maxsize=None)
def _loop_reference(name, kind):
    model, x, y, layers, probe, cd = _case(name)
    extra = {"v": _v(x)} if kind == "hvp" else {}
    return _maps(model, x, layers, kind, probe=probe, labels=y, channel_dim=cd, strategy="loop", **extra)


# ------------------------------------------------------------------------------------------------
# Strategies against the loop oracle, and the oracle against plain torch.autograd.functional
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("strategy,chunk", [("batched_backward", None), ("vmap", None), ("auto", None),
                                            ("batched_backward", 2), ("vmap", 2)])
def test_strategies_agree_with_loop(name, kind, strategy, chunk):
    model, x, y, layers, probe, cd = _case(name)
    extra = {"v": _v(x)} if kind == "hvp" else {}
    got = _maps(model, x, layers, kind, probe=probe, labels=y, channel_dim=cd, strategy=strategy,
                chunk_size=chunk, **extra)
    ref = _loop_reference(name, kind)
    assert all(g.shape == x.shape and g.dtype == x.dtype for g in got)
    assert not any(g.requires_grad for g in got)
    assert_maps_close(got, ref)


def _plain_probe(model, layer, probe, cd, x1, y1):
    """phi(x1) for ONE sample, with plain hooks and plain torch (no lwkd_fast code)."""
    mod = dict(model.named_modules())[layer]
    box = {}
    # clone: the residual block's in-place ReLU overwrites bn1's output later in the forward
    h = mod.register_forward_hook(lambda m, i, o: box.__setitem__("a", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        model(x1.unsqueeze(0))
    finally:
        h.remove()
    a = box["a"]
    if probe == "logit":
        return a[0, y1]
    a = a.movedim(cd, 1)
    att = a.reshape(a.shape[0], a.shape[1], -1).pow(2).mean(1)[0]
    return att.sum() if probe == "energy" else att.max()


@pytest.mark.parametrize("name", MODELS)
def test_loop_oracle_matches_torch_autograd_functional(name):
    model, x, y, layers, probe, cd = _case(name)
    v = _v(x)
    jac = _loop_reference(name, "jacobian")
    hvp = _loop_reference(name, "hvp")
    for j, (layer, pr) in enumerate(zip(layers, probe)):
        for b in range(x.shape[0]):
            def f(x1):
                return _plain_probe(model, layer, pr, cd, x1, None if y is None else y[b])

            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                J = torch.autograd.functional.jacobian(f, x[b])
                _, Hv = torch.autograd.functional.hvp(f, x[b], v[b])
            assert compare(jac[j][b], J, F64).ok, (layer, b)
            assert compare(hvp[j][b], Hv, F64).ok, (layer, b)


# ------------------------------------------------------------------------------------------------
# HVP properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["batched_backward", "vmap"])
def test_hvp_symmetry(strategy):
    model, x, y, layers, probe, cd = _case("cnn_bn_eval")
    g = torch.Generator().manual_seed(9)
    u = torch.randn(x.shape, generator=g, dtype=F64)
    w = torch.randn(x.shape, generator=g, dtype=F64)
    Hu = D.input_hvps(model, x, layers[:2], v=u, strategy=strategy)
    Hw = D.input_hvps(model, x, layers[:2], v=w, strategy=strategy)
    for a, b in zip(Hu, Hw):
        uHw = (u * b).flatten(1).sum(1)
        wHu = (w * a).flatten(1).sum(1)
        assert uHw.abs().max() > 1e-3  # non-trivial curvature
        torch.testing.assert_close(uHw, wHu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "residual"])
def test_hvp_finite_difference(name):
    model, x, y, layers, probe, cd = _case(name)
    layers, probe = layers[:2], probe[:1] * 2  # energy: smooth
    v = _v(x, seed=2)
    H = D.input_hvps(model, x, layers, v=v, probe=probe)
    h = 1e-5
    Jp = D.input_jacobians(model, x + h * v, layers, probe=probe)
    Jm = D.input_jacobians(model, x - h * v, layers, probe=probe)
    for Hj, a, b in zip(H, Jp, Jm):
        fd = (a - b) / (2 * h)
        assert Hj.abs().max() > 1e-3
        torch.testing.assert_close(Hj, fd, rtol=1e-6, atol=1e-7 * float(Hj.abs().max()))


# ------------------------------------------------------------------------------------------------
# Gradients to the student (create_graph=True)
# ------------------------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    """Parameters given as plain tensors so gradcheck can perturb them."""

    def __init__(self, w1, b1, w2):
        super().__init__()
        self.w1, self.b1, self.w2 = w1, b1, w2
        self.hidden = nn.Identity()
        self.out = nn.Identity()

    def forward(self, x):
        h = self.hidden(torch.tanh(x @ self.w1.T + self.b1))
        return self.out(torch.sin(h @ self.w2.T))


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
@pytest.mark.parametrize("strategy", ["batched_backward", "vmap", "loop"])
def test_gradcheck_parameters_and_input(kind, strategy):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, generator=g, dtype=F64)
    w1 = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    b1 = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    w2 = torch.randn(2, 4, generator=g, dtype=F64, requires_grad=True)
    v = _v(x)
    extra = {"v": v} if kind == "hvp" else {}

    def f(w1, b1, w2, x):
        maps = _maps(_TinyNet(w1, b1, w2), x, ["hidden", "out"], kind, create_graph=True, strategy=strategy,
                     **extra)
        return tuple(maps)

    assert torch.autograd.gradcheck(f, (w1, b1, w2, x.clone().requires_grad_(True)))


def test_create_graph_reaches_student_parameters():
    torch.manual_seed(0)
    model = _randomize_bn(CNN().double()).train()
    x = torch.randn(4, 2, 6, 5, dtype=F64)
    maps = D.input_jacobians(model, x, ["bn1", "bn2"], create_graph=True)
    assert all(m.requires_grad for m in maps)
    sum(m.pow(2).sum() for m in maps).backward()
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "conv2.weight", "bn2.weight", "bn2.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name
    # conv1.bias is cancelled by a BatchNorm with *batch* statistics, but not with frozen ones
    assert model.fc.weight.grad is None  # after the last matched layer: untouched

    model.zero_grad(set_to_none=True)
    maps = D.input_jacobians(model, x, ["bn1", "bn2"])  # create_graph=False: no graph, no .grad
    assert not any(m.requires_grad for m in maps)
    assert all(p.grad is None for p in model.parameters())


def test_create_graph_matches_loop_gradients():
    """d/dtheta of a loss of the maps agrees between batched_backward, vmap and loop."""
    torch.manual_seed(0)
    base = _randomize_bn(CNN().double()).train()
    x = torch.randn(3, 2, 5, 4, dtype=F64)
    v = _v(x)
    grads = {}
    for strategy in ("loop", "batched_backward", "vmap"):
        model = copy.deepcopy(base)
        maps = D.input_hvps(model, x, ["bn1", "conv2"], v=v, create_graph=True, strategy=strategy)
        sum((m * torch.linspace(-1, 1, m.numel(), dtype=F64).view_as(m)).sum() for m in maps).backward()
        grads[strategy] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for strategy in ("batched_backward", "vmap"):
        assert_maps_close(grads[strategy], grads["loop"])


# ------------------------------------------------------------------------------------------------
# Train-mode BatchNorm: frozen batch statistics; the model's state is left untouched
# ------------------------------------------------------------------------------------------------


def _eval_copy_with_batch_stats(model, x):
    """Eval-mode copy whose BatchNorm running stats are the train-mode batch mean / biased var."""
    probe_model = copy.deepcopy(model).train()
    stats = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, inp, name=name: stats.__setitem__(
                name, (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=False))))
        for name, m in probe_model.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        probe_model(x)
    for h in hooks:
        h.remove()
    frozen = copy.deepcopy(model).eval()
    mods = dict(frozen.named_modules())
    for name, (mean, var) in stats.items():
        mods[name].running_mean.copy_(mean)
        mods[name].running_var.copy_(var)
    return frozen


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_train_mode_batchnorm_equals_eval_copy_with_batch_stats(kind):
    torch.manual_seed(0)
    model = _randomize_bn(CNN().double()).train()
    model.bn1.momentum = None  # cumulative average: exercises num_batches_tracked too
    x = torch.randn(5, 2, 6, 5, dtype=F64) * 2 + 1
    y = torch.tensor([0, 1, 2, 0, 1])
    layers, probe = ["bn1", "conv2", "fc"], ["energy", "max", "logit"]
    extra = {"v": _v(x)} if kind == "hvp" else {}
    frozen = _eval_copy_with_batch_stats(model, x)
    ref = _maps(frozen, x, layers, kind, probe=probe, labels=y, strategy="loop", **extra)
    # the eval copy must differ from eval with the original running stats (the test can fail)
    plain_eval = _maps(copy.deepcopy(model).eval(), x, layers, kind, probe=probe, labels=y, **extra)
    assert not compare(plain_eval[0], ref[0], F64).ok
    for strategy in ("loop", "batched_backward", "vmap", "auto"):
        for chunk in (None, 2):
            got = _maps(model, x, layers, kind, probe=probe, labels=y, strategy=strategy, chunk_size=chunk,
                        **extra)
            assert_maps_close(got, ref)


def _module_state(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "patched": [sorted(m.__dict__.keys() & {"forward"}) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


@pytest.mark.parametrize("strategy", ["batched_backward", "vmap", "loop"])
@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_batch_forward_and_running_stats_unchanged(strategy, kind):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        body=_randomize_bn(CNN().double()), drop=nn.Dropout(0.5),
    )).train()
    model.body.bn2.track_running_stats = False  # batch statistics even in eval mode
    model.body.bn2.running_mean = model.body.bn2.running_var = None
    x = torch.randn(4, 2, 6, 5, dtype=F64)
    twin = copy.deepcopy(model)
    before = _module_state(model)
    _maps(model, x, ["body.bn1", "body.bn2", "drop"], kind, strategy=strategy,
          **({"v": _v(x)} if kind == "hvp" else {}))
    after = _module_state(model)
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["training"] == after["training"]
    assert before["patched"] == after["patched"]
    assert before["hooks"] == after["hooks"]
    # the training step's own forward: same outputs, same running-stat updates as an untouched twin
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    out_twin = twin(x)
    assert torch.equal(out, out_twin)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.body.bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_train_mode_instance_norm_is_per_sample_and_keeps_running_stats(kind):
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 3, 3), norm=nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        act=nn.Tanh(),
    )).double().train()
    x = torch.randn(3, 2, 5, 6, dtype=F64)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    extra = {"v": _v(x)} if kind == "hvp" else {}
    ref = _maps(model, x, ["norm", "act"], kind, strategy="loop", **extra)
    for strategy in ("batched_backward", "vmap"):
        assert_maps_close(_maps(model, x, ["norm", "act"], kind, strategy=strategy, **extra), ref)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    # instance statistics (train mode) differ from the running statistics (eval mode)
    assert not compare(_maps(copy.deepcopy(model).eval(), x, ["act"], kind, **extra)[0], ref[1], F64).ok


def test_buffers_a_module_changes_in_forward_are_restored():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=F64))
            self.lin = nn.Linear(3, 3).double()

        def forward(self, x):
            self.calls += 1
            return torch.tanh(self.lin(x))

    model = Counter()
    x = torch.randn(4, 3, dtype=F64)
    for strategy in ("batched_backward", "loop"):
        D.input_jacobians(model, x, ["lin"], strategy=strategy)
        D.input_hvps(model, x, ["lin"], strategy=strategy)
    assert model.calls.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_lower_precision_within_spec_tolerance(dtype, kind):
    """SPEC 6: float32 within rtol 1e-5/atol 1e-6 of float64; half types within twice the error
    of the loop oracle run in that dtype, plus 1e-3 (relative to the maps' scale)."""
    torch.manual_seed(0)
    model = _randomize_bn(CNN().double()).train()
    x = torch.randn(3, 2, 6, 5, dtype=F64)
    extra = {"v": _v(x)} if kind == "hvp" else {}
    ref = _maps(model, x, ["bn1", "bn2"], kind, strategy="loop", **extra)
    low = copy.deepcopy(model).to(dtype)
    xl = x.to(dtype)
    extra_l = {"v": extra["v"].to(dtype)} if extra else {}
    eager = _maps(low, xl, ["bn1", "bn2"], kind, strategy="loop", **extra_l)
    for strategy in ("batched_backward", "vmap"):
        got = _maps(low, xl, ["bn1", "bn2"], kind, strategy=strategy, **extra_l)
        for g, r, e in zip(got, ref, eager):
            assert g.dtype == dtype
            scale = float(r.abs().max())
            verdict = compare(g / scale, r / scale, dtype, None if dtype == torch.float32 else e / scale)
            assert verdict.ok, (strategy, verdict)


def test_dropout_is_off_inside_maps():
    torch.manual_seed(0)
    model = Transformer().double().train()
    x = torch.randn(2, 3, 8, dtype=F64)
    a = D.input_jacobians(model, x, ["enc.linear2", "head"], channel_dim=-1)
    b = D.input_jacobians(copy.deepcopy(model).eval(), x, ["enc.linear2", "head"], channel_dim=-1)
    assert_maps_close(a, b)
    assert model.training and model.enc.dropout.training and model.enc.self_attn.training


def test_state_restored_after_an_error():
    model = _randomize_bn(CNN().double()).train()
    before = _module_state(model)

    def bad_probe(act, labels):
        raise RuntimeError("probe exploded")

    with pytest.raises(RuntimeError, match="probe exploded"):
        D.input_jacobians(model, torch.randn(2, 2, 4, 4, dtype=F64), ["bn1"], probe=bad_probe)
    after = _module_state(model)
    assert before["patched"] == after["patched"] and before["hooks"] == after["hooks"]
    assert before["training"] == after["training"]


# ------------------------------------------------------------------------------------------------
# API behaviour
# ------------------------------------------------------------------------------------------------


def test_probes_callable_list_and_single_layer():
    model, x, y, layers, probe, cd = _case("mlp")

    def l1(act, labels):
        return act.abs().sum(1)

    got = D.input_jacobians(model, x, "act1", probe=l1)
    ref = D.input_jacobians(model, x, ["act1"], probe=l1, strategy="loop")
    assert len(got) == 1
    assert_maps_close(got, ref)
    # "energy" of a 1-channel-per-position (B, D) activation: sum of squares / D
    e = D.input_jacobians(model, x, ["fc1"])[0]
    w = model.fc1.weight
    h = model.fc1(x)
    torch.testing.assert_close(e, (2.0 / 8) * h @ w, rtol=1e-12, atol=1e-12)
    assert D.input_jacobians(model, x, []) == []
    assert D.input_hvps(model, x, []) == []


def test_logit_probe_on_the_model_itself():
    model, x, y, *_ = _case("mlp")
    a = D.input_jacobians(model, x, [""], probe="logit", labels=y)[0]
    b = D.input_jacobians(model, x, ["out"], probe="logit", labels=y)[0]
    assert_maps_close([a], [b])
    # plain autograd: the label logit's gradient
    xi = x.clone().requires_grad_(True)
    model(xi).gather(1, y.view(-1, 1)).sum().backward()
    assert compare(a, xi.grad, F64).ok


def test_maps_inside_no_grad_and_for_grad_requiring_x():
    model, x, y, layers, probe, cd = _case("cnn_bn_eval")
    ref = _loop_reference("cnn_bn_eval", "jacobian")
    with torch.no_grad():
        got = D.input_jacobians(model, x, layers, probe=probe, labels=y)
    assert_maps_close(got, ref)
    xr = x.clone().requires_grad_(True)
    got = D.input_jacobians(model, xr, layers, probe=probe, labels=y)
    assert_maps_close(got, ref)
    assert xr.grad is None and not any(m.requires_grad for m in got)


def test_generator_gives_shared_replayable_v():
    model, x, y, layers, probe, cd = _case("residual")
    a = D.input_hvps(model, x, layers[:2], generator=torch.Generator().manual_seed(42))
    b = D.input_hvps(model, x, layers[:2], generator=torch.Generator().manual_seed(42))
    c = D.input_hvps(model, x, layers[:2], v=D.rademacher(x.shape, generator=torch.Generator().manual_seed(42),
                                                          dtype=F64))
    d = D.input_hvps(model, x, layers[:2], generator=torch.Generator().manual_seed(43))
    for i in range(2):
        assert torch.equal(a[i], b[i]) and torch.equal(a[i], c[i])
    assert not torch.equal(a[0], d[0])
    v = D.rademacher((1000,), generator=torch.Generator().manual_seed(0))
    assert set(v.unique().tolist()) == {-1.0, 1.0} and abs(float(v.mean())) < 0.15


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_derivative_maps_student_and_teacher(kind):
    torch.manual_seed(0)
    student = _randomize_bn(CNN().double()).train()
    teacher = _randomize_bn(CNN(w=6).double(), seed=2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    gen = torch.Generator().manual_seed(8)
    s, t = D.derivative_maps(student, teacher, x, ["bn1", "conv2"], ["bn1", "bn2"], kind=kind,
                             generator=gen, create_graph=True)
    assert all(m.requires_grad for m in s) and not any(m.requires_grad for m in t)
    extra = {"v": D.rademacher(x.shape, generator=torch.Generator().manual_seed(8), dtype=F64)} \
        if kind == "hvp" else {}
    assert_maps_close(s, _maps(student, x, ["bn1", "conv2"], kind, strategy="loop", **extra))
    assert_maps_close(t, _maps(teacher, x, ["bn1", "bn2"], kind, strategy="loop", **extra))
    # the same model as student and teacher: one shared v gives identical maps
    s2, t2 = D.derivative_maps(teacher, teacher, (x, x.clone()), ["bn1"], ["bn1"], kind=kind,
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(s2[0], t2[0])
    d = lw.map_discrepancy(s, t)
    d.sum().backward()
    assert student.conv1.weight.grad is not None


def test_public_exports():
    assert lw.input_jacobians is D.input_jacobians and lw.input_hvps is D.input_hvps
    assert lw.derivative_maps is D.derivative_maps


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_error_unknown_layer_lists_available_names():
    model = CNN().double()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match="conv9") as info:
        D.input_jacobians(model, x, ["conv1", "conv9"])
    msg = str(info.value)
    for name in ("'conv1'", "'bn1'", "'conv2'", "'bn2'", "'fc'"):
        assert name in msg
    with pytest.raises(KeyError):
        D.input_hvps(model, x, ["nope"])
    with pytest.raises(AttributeError):  # what model.get_submodule("nope") raises
        D.input_hvps(model, x, "nope")
    with pytest.raises(ValueError, match="'zz' in teacher_layers"):
        D.derivative_maps(model, model, x, ["conv1"], ["zz"])


@pytest.mark.parametrize("strategy", ["batched_backward", "vmap", "loop"])
@pytest.mark.parametrize("bad", ["per_position", "scalar", "integer"])
def test_error_probe_wrong_shape(strategy, bad):
    model = CNN().double()
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    probes = {
        "per_position": lambda a, y: a.flatten(1),
        "scalar": lambda a, y: a.sum(),
        "integer": lambda a, y: a.flatten(1).sum(1).long(),
    }
    with pytest.raises(ValueError, match=r"probe .* layer 'bn1'.*\((3|1),\)"):
        D.input_jacobians(model, x, ["bn1"], probe=probes[bad], strategy=strategy)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_error_input_without_grad(dtype):
    model = mlp()
    x = torch.ones(2, 6, dtype=dtype)
    with pytest.raises(TypeError, match=f"x has dtype {dtype}"):
        D.input_jacobians(model, x, ["fc1"])
    with pytest.raises(ValueError, match="does not allow gradients"):
        D.input_hvps(model, x, ["fc1"])
    with pytest.raises(RuntimeError, match="floating-point input"):  # what torch itself raises
        D.derivative_maps(model, model, x, ["fc1"], ["fc1"])
    with pytest.raises(ValueError, match="B >= 1"):
        D.input_jacobians(model, torch.ones(0, 6), ["fc1"])
    with torch.inference_mode():
        xi = torch.ones(2, 6)
        with pytest.raises(ValueError, match="inference_mode"):
            D.input_jacobians(model, xi, ["fc1"])


def test_error_student_and_teacher_fed_different_x():
    model = mlp().double()
    x = torch.randn(2, 6, dtype=F64)
    with pytest.raises(ValueError, match="same x.*different values"):
        D.derivative_maps(model, model, x, ["fc1"], ["fc1"], teacher_x=x + 1)
    with pytest.raises(ValueError, match="same x"):
        D.derivative_maps(model, model, (x, x[:1]), ["fc1"], ["fc1"])
    with pytest.raises(ValueError, match="same x"):
        D.derivative_maps(model, model, x, ["fc1"], ["fc1"], teacher_x=x.float(), kind="hvp")
    D.derivative_maps(model, model, x, ["fc1"], ["fc1"], teacher_x=x.clone())  # equal values: fine


def test_error_options():
    model, x, y, *_ = _case("mlp")
    with pytest.raises(ValueError, match="needs labels"):
        D.input_jacobians(model, x, ["out"], probe="logit")
    with pytest.raises(ValueError, match=r"\(B, num_classes\)"):
        D.input_jacobians(_randomize_bn(CNN().double()), torch.randn(2, 2, 4, 4, dtype=F64), ["bn1"],
                          probe="logit", labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown strategy"):
        D.input_jacobians(model, x, ["out"], strategy="fastest")
    with pytest.raises(ValueError, match="unknown probe"):
        D.input_jacobians(model, x, ["out"], probe="mass")
    with pytest.raises(ValueError, match="2 probes for 3 layers"):
        D.input_jacobians(model, x, ["fc1", "fc2", "out"], probe=["energy", "max"])
    with pytest.raises(ValueError, match=r"v has shape \(5,\)"):
        D.input_hvps(model, x, ["out"], v=torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="chunk_size"):
        D.input_jacobians(model, x, ["out"], chunk_size=0)
    with pytest.raises(ValueError, match="labels has shape"):
        D.input_jacobians(model, x, ["out"], probe="logit", labels=y[:2])
    with pytest.raises(ValueError, match="channel_dim=3"):
        D.input_jacobians(model, x, ["out"], channel_dim=3)
    with pytest.raises(ValueError, match="1 student_layers but 2 teacher_layers"):
        D.derivative_maps(model, model, x, ["out"], ["fc1", "out"])
    with pytest.raises(ValueError, match="unknown kind"):
        D.derivative_maps(model, model, x, ["out"], ["out"], kind="hessian")


# ------------------------------------------------------------------------------------------------
# lwkd-fast check cases
# ------------------------------------------------------------------------------------------------


def test_check_cases_pass_and_only_for_reference():
    cases = list(check_derivatives.lwkd_checks("reference", torch.device("cpu")))
    assert len(cases) == 8 and {c.op for c in cases} == {"derivatives"}
    for case in cases:
        verdicts = case.run()
        assert verdicts and all(v.ok for v in verdicts.values()), (case.label, case.dtype, verdicts)
    assert list(check_derivatives.lwkd_checks("native", torch.device("cpu"))) == []


# ------------------------------------------------------------------------------------------------
# Issue 12: no randomness, BatchNorm subclasses, dict inputs, masks, output taps, clear errors,
# sketched token maps
# ------------------------------------------------------------------------------------------------


class _RandomDepth(nn.Module):
    """Stochastic depth gated by its own training flag (timm DropPath style), and a residual
    branch whose attention dropout is gated by the *parent's* flag (timm/HF fused attention)."""

    def __init__(self, d=5):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.training:  # drop the branch per sample, and a functional dropout
            keep = (torch.rand(x.shape[0], 1, dtype=x.dtype) > 0.5).to(x.dtype)
            h = F.dropout(h, 0.5, training=True) * keep
        return self.out(x + h)


def test_every_train_only_random_part_is_off_and_restored():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(block=_RandomDepth(), act=nn.Tanh())).double().train()
    x = torch.randn(4, 5, dtype=F64)
    a = D.input_jacobians(model, x, ["block.lin", "block", "act"])
    b = D.input_jacobians(model, x, ["block.lin", "block", "act"])
    for s, t in zip(a, b):
        assert torch.equal(s, t)
    assert_maps_close(a, D.input_jacobians(copy.deepcopy(model).eval(), x, ["block.lin", "block", "act"]))
    assert model.training and model.block.training and model.act.training


class _BatchNormTanh(nn.BatchNorm2d):
    """A BatchNorm subclass with a fused activation (timm's BatchNormAct2d pattern)."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_batchnorm_subclass_keeps_its_own_forward():
    torch.manual_seed(0)
    plain = _randomize_bn(CNN().double()).train()
    fused = copy.deepcopy(plain)
    for name in ("bn1", "bn2"):
        old = getattr(fused, name)
        new = _BatchNormTanh(old.num_features).double()
        new.load_state_dict(old.state_dict())
        setattr(fused, name, new)
    x = torch.randn(4, 2, 6, 5, dtype=F64)
    # the reference: plain BatchNorm layers whose outputs a hook passes through tanh
    hooks = [getattr(plain, n).register_forward_hook(lambda m, i, o: torch.tanh(o)) for n in ("bn1", "bn2")]
    try:
        for strategy in ("batched_backward", "vmap", "loop"):
            ref = D.input_jacobians(plain, x, ["bn1", "conv2"], strategy=strategy)
            got = D.input_jacobians(fused, x, ["bn1", "conv2"], strategy=strategy)
            assert_maps_close(got, ref)
    finally:
        for h in hooks:
            h.remove()
    assert fused.bn1.running_mean is not None and fused.bn1.num_batches_tracked.item() == 0


class _KwargModel(nn.Module):
    """Called with keyword arguments (Hugging Face style): features, a per-sample gate, a flag."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, features=None, gate=None, scale=1.0):
        h = torch.tanh(self.enc(features)) * gate[:, :, None]
        return {"hidden": self.mix(h) * scale, "other": h}


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_dict_inputs_slice_every_batched_entry(kind):
    torch.manual_seed(0)
    model = _KwargModel().double()
    g = torch.Generator().manual_seed(1)
    x = {"features": torch.randn(3, 5, 4, generator=g, dtype=F64),
         "gate": torch.rand(3, 5, generator=g, dtype=F64), "scale": 2.0}
    extra = {"v": _v(x["features"]), "wrt": "features"} if kind == "hvp" else {"wrt": "features"}
    ref = _maps(model, x, ["mix", "enc"], kind, channel_dim=[-1, -1], strategy="loop", **extra)
    for strategy, chunk in (("batched_backward", None), ("batched_backward", 2), ("vmap", None)):
        got = _maps(model, x, ["mix", "enc"], kind, channel_dim=-1, strategy=strategy, chunk_size=chunk, **extra)
        assert all(m.shape == x["features"].shape for m in got)
        assert_maps_close(got, ref)
    # the oracle: plain autograd on one sample, with the gate sliced to it
    b = 1

    def f(z):
        out = model.mix(torch.tanh(model.enc(z.unsqueeze(0))) * x["gate"][b:b + 1, :, None])
        return out.pow(2).mean(-1).sum()

    J = torch.autograd.functional.jacobian(f, x["features"][b])
    if kind == "jacobian":
        assert compare(ref[0][b], J, F64).ok
    # the model's whole output is a dict: the first tensor ("hidden" = scale * mix) is the layer's
    # activation (the static scale=2.0 reached the model: 4x the energy), ("", "other") another entry
    whole = _maps(model, x, ["", ("", "other")], kind, channel_dim=-1, **extra)
    assert_maps_close(whole[:1], [4 * ref[0]])
    assert_maps_close(whole[1:], _maps(model, x, ["enc"], kind, channel_dim=-1, probe=lambda a, y: (
        (torch.tanh(a) * x["gate"][:a.shape[0], :, None]).pow(2).mean(-1).sum(1)), **extra))


def test_dict_input_errors():
    model = _KwargModel().double()
    x = {"features": torch.randn(2, 5, 4, dtype=F64), "gate": torch.rand(2, 5, dtype=F64)}
    with pytest.raises(ValueError, match=r"x is a dict with 2 floating-point tensors .*pass wrt="):
        D.input_jacobians(model, x, ["mix"])
    with pytest.raises(ValueError, match=r"wrt='nope' is not an entry of x"):
        D.input_jacobians(model, x, ["mix"], wrt="nope")
    ids = {"input_ids": torch.ones(2, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match="for token ids use lwkd_fast.derivatives.sketched_derivative_maps"):
        D.input_jacobians(model, ids, ["mix"])
    with pytest.raises(ValueError, match=r"entry 'gate' differs|x\['gate'\]"):
        D.derivative_maps(model, model, x, ["mix"], ["mix"], wrt="features",
                          teacher_x={**x, "gate": x["gate"] + 1})


def test_probe_masks_ignore_masked_locations():
    model, x, y, layers, probe, cd = _case("transformer")
    m = torch.ones(3, 4, dtype=torch.bool)
    m[0, 2:] = False
    m[2, 0] = False

    # the oracle probes get the mask as their per-sample "labels" (sliced like labels)
    def energy(a, mask):
        return (a.pow(2).mean(-1) * mask.to(F64)).sum(1)

    def top(a, mask):
        return torch.where(mask, a.pow(2).mean(-1), torch.tensor(-1e30, dtype=F64)).amax(1)

    layer = "enc.linear2"
    for strategy in ("batched_backward", "loop"):
        got = D.input_jacobians(model, x, [layer, layer], probe=["energy", "max"], channel_dim=-1, mask=m,
                                strategy=strategy)
        assert_maps_close(got[:1], D.input_jacobians(model, x, [layer], probe=energy, labels=m, strategy="loop"))
        assert_maps_close(got[1:], D.input_jacobians(model, x, [layer], probe=top, labels=m, strategy="loop"))
    plain = D.input_jacobians(model, x, [layer], channel_dim=-1)
    assert not compare(plain[0], got[0], F64).ok
    # a mask per layer (None: no mask), an all-masked sample gives a zero map
    empty = m.clone()
    empty[1] = False
    got = D.input_jacobians(model, x, [layer, layer], channel_dim=-1, mask=[None, empty])
    assert_maps_close(got[:1], plain)
    assert torch.equal(got[1][1], torch.zeros_like(got[1][1]))
    with pytest.raises(ValueError, match=r"the mask of layer 'enc.linear2' has 5 locations but its activation"):
        D.input_jacobians(model, x, [layer], channel_dim=-1, mask=torch.ones(3, 5, dtype=torch.bool))


def test_output_index_taps_a_tuple_element():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, batch_first=True).double().eval()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            out, weights = self.attn(x, x, x, need_weights=True, average_attn_weights=False)
            return out

    net = Net()
    x = torch.randn(2, 4, 6, dtype=F64)
    got = D.input_jacobians(net, x, [("attn", 1)], channel_dim=1)  # (B, heads, T, T) probabilities

    def probs_energy(a, labels):
        return a.pow(2).mean(1).flatten(1).sum(1)

    ref = D.input_jacobians(net, x, ("attn", 1), probe=probs_energy, strategy="loop")
    assert_maps_close(got, ref)
    assert D.tap_name("attn", 1) == "attn[1]"


def test_hardsigmoid_second_derivative_error_names_module_and_fix():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 3), gate=nn.Hardsigmoid(), out=nn.Conv2d(3, 2, 1))).double()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    D.input_jacobians(model, x, ["out"])  # first derivatives exist
    with pytest.raises(D.NotDifferentiableError, match=r"input_hvps: torch has no derivative of "
                                                       r"aten::hardsigmoid_backward .* used by 'gate' \(Hardsigmoid\)"
                                                       r" of Sequential.*replace_hardsigmoid\(model\)"):
        D.input_hvps(model, x, ["out"])
    # a Jacobian loss would fail only in the caller's backward: found up front instead (a
    # RuntimeError, as what torch raises)
    with pytest.raises(RuntimeError, match=r"input_jacobians: .* used by 'gate' \(Hardsigmoid\).*create_graph=True"):
        D.input_jacobians(model, x, ["out"], create_graph=True)
    D.input_jacobians(model, x, ["conv"], create_graph=True)  # upstream of the Hardsigmoid: fine
    ref = D.input_jacobians(model, x, ["out"])
    fixed = D.replace_hardsigmoid(copy.deepcopy(model))
    assert isinstance(fixed.gate, D.Relu6Hardsigmoid)
    assert torch.equal(fixed(x), model(x))
    # torch's hardsigmoid backward multiplies by a float32 1/6 (relative error 3e-8) even in float64
    torch.testing.assert_close(D.input_jacobians(fixed, x, ["out"])[0], ref[0], rtol=1e-7, atol=1e-12)
    H = D.input_hvps(fixed, x, ["out"], v=_v(x))
    assert all(torch.isfinite(h).all() for h in H)


class _TinyLM(nn.Module):
    """Token embedding, learned positions, a causal token mix and a head; accepts input_ids or
    inputs_embeds (the Hugging Face convention)."""

    def __init__(self, vocab=13, d=6, T=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.3)
        self.block = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.block(h + self.pos[:h.shape[1]]))
        h = torch.cumsum(h, 1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        return self.head(torch.sin(h))


class _OneHot(nn.Module):
    """The LM as a function of one-hot tokens (B, T, V): the exact map the sketch projects."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, onehot=None, attention_mask=None):
        return self.lm(inputs_embeds=onehot @ self.lm.emb.weight, attention_mask=attention_mask)


@pytest.mark.parametrize("kind", ["jacobian", "hvp"])
def test_sketched_maps_equal_projected_one_hot_maps(kind):
    torch.manual_seed(0)
    student, teacher = _TinyLM(d=4).double(), _TinyLM(d=7).double()
    ids = torch.randint(0, 13, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    r = 8
    s_maps, t_maps = D.sketched_derivative_maps(
        student, teacher, inputs, ["block", "head"], ["block", "head"], kind=kind, rank=r,
        generator=torch.Generator().manual_seed(3), channel_dim=-1, mask=[mask, None])
    assert all(m.shape == (2, 5, r) for m in s_maps + t_maps)
    # the same draws, dense: R (V, r), z (B, T, r)
    g = torch.Generator().manual_seed(3)
    bucket, sign = D.count_sketch(13, r, generator=g)
    R = torch.zeros(13, r, dtype=F64)
    R[torch.arange(13), bucket] = sign.double()
    extra = {}
    if kind == "hvp":
        z = D.rademacher((2, 5, r), generator=g, dtype=F64)
        extra = {"v": z @ R.t()}
    for model, maps in ((student, s_maps), (teacher, t_maps)):
        onehot = F.one_hot(ids, 13).double()
        exact = _maps(_OneHot(model), {"onehot": onehot, "attention_mask": mask}, ["lm.block", "lm.head"], kind,
                      channel_dim=-1, mask=[mask, None], strategy="loop", **extra)
        assert_maps_close(maps, [e @ R for e in exact])


def test_sketched_maps_train_the_student_embedding_and_errors():
    torch.manual_seed(0)
    student, teacher = _TinyLM(d=4).double(), _TinyLM(d=7).double()
    inputs = {"input_ids": torch.randint(0, 13, (2, 5))}
    s, t = D.sketched_derivative_maps(student, teacher, inputs, ["block"], ["block"], rank=4, create_graph=True,
                                      channel_dim=-1)
    assert s[0].requires_grad and not t[0].requires_grad
    lw.map_discrepancy(s, t).sum().backward()
    assert student.emb.weight.grad is not None and student.emb.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="the vocabularies differ"):
        D.sketched_derivative_maps(student, _TinyLM(vocab=11).double(), inputs, ["block"], ["block"])
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\] must be a \(B, T\) integer tensor"):
        D.sketched_derivative_maps(student, teacher, {"input_ids": torch.ones(2, 5)}, ["block"], ["block"])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        D.sketched_derivative_maps(student, teacher, inputs, ["block"], ["block"], rank=0)
