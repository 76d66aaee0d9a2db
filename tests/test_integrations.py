"""Adapters for existing KD code (lwkd_fast.integrations).

torchdistill: against the real package (its registries, a DistillationBox, and its example
script's training flow on a YAML config); skipped when torchdistill is not importable.
mdistiller and RepDistiller (not on the package index): against their documented interfaces and
through minimal stand-ins of their entry points (tests/standins/, see its README), with each
adapter's documented recipe taken verbatim from its docstring.
"""

import copy
import math
import pathlib
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwkd_fast as lw
from lwkd_fast.demo import DigitsCNN
from lwkd_fast.distill import LayerwiseDistiller
from lwkd_fast.integrations import DiscrepancySource, layerwise_param_groups, make_layerwise_optimizer
from lwkd_fast.integrations.mdistiller import LWKD, feature_modules
from lwkd_fast.integrations.repdistiller import LayerwiseAttention

X = torch.rand(16, 1, 8, 8)
Y = torch.arange(16) % 10
STAGES = ["stage1", "stage2", "stage3"]


def at_term(f_s, f_t, p=2):
    """One layer of the AT loss as RepDistiller / mdistiller / torchdistill (mode 'code') write it,
    including their pooling of the larger map to the smaller."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    def at(f):
        return F.normalize(f.pow(p).mean(1).reshape(f.size(0), -1))

    return (at(f_s) - at(f_t)).pow(2).mean()


def names_of(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def test_importing_lwkd_fast_and_the_adapters_needs_no_framework():
    code = (
        "import sys, lwkd_fast\n"
        "assert 'lwkd_fast.integrations' not in sys.modules\n"
        "import lwkd_fast.integrations, lwkd_fast.integrations.repdistiller, lwkd_fast.integrations.mdistiller\n"
        "bad = [m for m in ('torchdistill', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layerwise_param_groups_reuse_the_distiller_grouping():
    torch.manual_seed(0)
    s, t = DigitsCNN(4), DigitsCNN(8).eval()
    s.stage2[0].weight.requires_grad_(False)
    groups = layerwise_param_groups(s, ["stage1", "stage3"], X[:2])
    ref = LayerwiseDistiller(s, t, pairs=[("stage1", "stage1"), ("stage3", "stage3")], example_input=X[:2])
    expect = [[n for n in g if n != "stage2.0.weight"] for g in names_of(s, ref.parameter_groups())]
    assert names_of(s, groups) == expect
    assert [g["layer"] for g in groups] == [0, 1, None]
    with pytest.raises(ValueError, match=r"layers\[1\] = 'stage9' is not a sub-module of the student; available: stage1"):
        layerwise_param_groups(s, ["stage1", "stage9"], X[:2])


def test_discrepancy_source_observe_loss():
    src = LayerwiseAttention()
    src([torch.rand(2, 3, 4, 4)], [torch.rand(2, 5, 4, 4)])
    assert isinstance(src, DiscrepancySource) and src.found_inf.item() == 0.0
    src.observe_loss(torch.tensor(float("nan")))
    assert src.found_inf.item() == 1.0 and src.found_inf.dim() == 0
    src.observe_loss(torch.tensor(2.0))
    assert src.found_inf.item() == 0.0


# ------------------------------------------------------------------------------------------------
# RepDistiller-style criterion
# ------------------------------------------------------------------------------------------------


def test_repdistiller_attention_matches_the_per_layer_list_and_gradients():
    g = torch.Generator().manual_seed(1)
    shapes_s = [(4, 3, 8, 8), (4, 5, 4, 4), (4, 6, 4, 4)]
    shapes_t = [(4, 7, 8, 8), (4, 9, 4, 4), (4, 2, 2, 2)]  # last pair: RepDistiller pools the larger map
    fs = [torch.randn(sh, generator=g).requires_grad_(True) for sh in shapes_s]
    ft = [torch.randn(sh, generator=g) for sh in shapes_t]
    crit = LayerwiseAttention()
    losses = crit(fs, ft)
    ref = [at_term(a, b) for a, b in zip(fs, ft)]
    assert isinstance(losses, list) and len(losses) == 3 and all(v.dim() == 0 for v in losses)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref).detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(crit.latest_discrepancies, torch.stack(ref).detach(), rtol=1e-5, atol=1e-7)
    assert not crit.latest_discrepancies.requires_grad
    got = torch.autograd.grad(sum(losses), fs)
    want = torch.autograd.grad(sum(ref), fs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert crit.found_inf.item() == 0.0


def test_repdistiller_rates_only_returns_zeros_that_backprop():
    fs = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    crit = LayerwiseAttention(use="rates")
    losses = crit(fs, [torch.randn(2, 3, 4, 4)])
    assert len(losses) == 1 and losses[0].item() == 0.0 and losses[0].requires_grad
    (sum(losses) + fs[0].sum()).backward()  # the loop's sum still backpropagates
    assert crit.latest_discrepancies.shape == (1,) and crit.latest_discrepancies.item() > 0
    assert crit.found_inf is None
    with pytest.raises(ValueError, match="2 student features but 1 teacher"):
        crit(fs * 2, [torch.randn(2, 3, 4, 4)])


def test_repdistiller_style_loop_with_attached_optimizer():
    """RepDistiller's loop: criterion on feature lists, sum, backward, plain optimizer.step()."""
    torch.manual_seed(0)
    s, t = DigitsCNN(4), DigitsCNN(8).eval()
    s0 = copy.deepcopy(s)
    crit = LayerwiseAttention()
    opt = make_layerwise_optimizer("sgd", s, STAGES, X[:2], lr=0.05, momentum=0.9, source=crit)
    ref = copy.deepcopy(s0)
    ref_opt = make_layerwise_optimizer("sgd", ref, STAGES, X[:2], lr=0.05, momentum=0.9)

    def feats(model, x):
        out = {}
        hs = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in STAGES]
        logits = model(x)
        for h in hs:
            h.remove()
        return logits, [out[n] for n in STAGES]

    for _ in range(3):
        logits, g_s = feats(s, X)
        with torch.no_grad():
            _, g_t = feats(t, X)
        loss = F.cross_entropy(logits, Y) + 10.0 * sum(crit(g_s, g_t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        # the same step by hand: explicit D
        logits, g_s = feats(ref, X)
        D = lw.attention_discrepancy(g_s, g_t)
        loss = F.cross_entropy(logits, Y) + 10.0 * D.sum()
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step(D.detach())
    for a, b in zip(s.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.rates, ref_opt.rates)
    assert not torch.equal(opt.rates, torch.full_like(opt.rates, 0.05))


# ------------------------------------------------------------------------------------------------
# mdistiller (documented interface; the stand-in base unless mdistiller is installed)
# ------------------------------------------------------------------------------------------------


class MDNet(nn.Module):
    """mdistiller-style CIFAR-like model: returns (logits, {"feats", "preact_feats", "pooled_feat"})."""

    def __init__(self, w=4, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        pooled = f3.mean(dim=(2, 3))
        feats = {"feats": [f0, f1, f2, f3], "preact_feats": [f0, f1, f2, f3], "pooled_feat": pooled}
        return self.fc(pooled), feats


def md_models():
    torch.manual_seed(0)
    return MDNet(4), MDNet(8).eval()


def test_mdistiller_interface():
    s, t = md_models()
    d = LWKD(s, t)
    from lwkd_fast.integrations import mdistiller as md

    base = md._DistillerBase
    assert isinstance(d, base) and isinstance(d, nn.Module)
    if md.HAS_MDISTILLER:
        from mdistiller.distillers._base import Distiller
        assert base is Distiller
    d.train()
    assert s.training and not t.training
    assert [id(p) for p in d.get_learnable_parameters()] == [id(p) for p in s.parameters()]
    assert d.get_extra_parameters() == 0
    preds, losses = d(image=X, target=Y, epoch=1)  # the trainer's call
    assert preds.shape == (16, 10) and set(losses) == {"loss_ce", "loss_feat"}  # AT's loss by default
    assert d.use == "rates+loss" and d.feat_weight == 1000.0 and d.p == 2.0 and d.ce_weight == 1.0
    d.eval()
    out = d(image=X)
    torch.testing.assert_close(out, s(X)[0])
    assert feature_modules(s, X[:2], "feats", [1, 2, 3]) == ["layer1", "layer2", "layer3"]
    assert feature_modules(s, X[:2], "feats", [0]) == ["relu"]

    class Functional(MDNet):
        def forward(self, x):
            logits, feats = super().forward(x)
            feats["feats"][2] = feats["feats"][2] * 2  # not any module's output
            return logits, feats

    with pytest.raises(ValueError, match=r"feats\['feats'\]\[2\] .* is not the output of any sub-module.*student_layers="):
        feature_modules(Functional(4), X[:2], "feats", [1, 2])
    f = Functional(4)
    d2 = LWKD(f, t, student_layers=["layer1", "layer2", "layer3"])
    assert [g["layer"] for g in d2.make_optimizer("sgd", lr=0.1, example_input=X[:2]).param_groups] == [0, 1, 2, None]


def test_mdistiller_attention_matches_mdistiller_at_and_publishes_d():
    s, t = md_models()
    d = LWKD(s, t, use="rates+loss", feat_weight=2.0, ce_weight=0.5, kd_weight=0.25, temperature=3.0).train()
    logits, losses = d(image=X, target=Y)
    _, fs = s(X)
    with torch.no_grad():
        tl, ft = t(X)
    D = torch.stack([at_term(a, b) for a, b in zip(fs["feats"][1:], ft["feats"][1:])])
    assert d.feat_indices == [1, 2, 3]
    torch.testing.assert_close(d.latest_discrepancies, D.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_feat"], 2.0 * D.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_ce"], 0.5 * F.cross_entropy(logits, Y))
    kd = F.kl_div(F.log_softmax(logits / 3, 1), F.softmax(tl / 3, 1), reduction="batchmean") * 9
    torch.testing.assert_close(losses["loss_kd"], 0.25 * kd)
    assert d.found_inf.item() == 0.0
    sum(v.mean() for v in losses.values()).backward()
    assert all(p.grad is not None for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())


def test_mdistiller_options_from_cfg_and_errors():
    s, t = md_models()
    cfg = {"LWKD": {"USE": "rates+loss", "FEAT_KEY": "preact_feats", "FEAT_INDICES": [2, 3]}}
    d = LWKD(s, t, cfg, metric="jsd").train()
    _, losses = d(image=X, target=Y)
    assert d.use == "rates+loss" and d.feat_key == "preact_feats" and d.metric == "jsd"
    assert d.latest_discrepancies.shape == (2,) and "loss_feat" in losses
    with pytest.raises(TypeError, match="unknown option"):
        LWKD(s, t, {"LWKD": {"TEMPERATURES": 2}})
    with pytest.raises(ValueError, match="unknown method"):
        LWKD(s, t, method="gradients")
    with pytest.raises(RuntimeError, match="example_input"):
        LWKD(s, t).make_optimizer("sgd", lr=0.1)


def test_mdistiller_jacobian_matches_derivative_maps():
    s, t = md_models()
    d = LWKD(s, t, method="jacobian", use="rates+loss").train()
    _, losses = d(image=X, target=Y)
    sm, tm = lw.derivative_maps(s, t, X, ["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3"],
                                kind="jacobian", labels=Y)
    torch.testing.assert_close(d.latest_discrepancies, lw.map_discrepancy(sm, tm), rtol=1e-5, atol=1e-7)
    losses["loss_feat"].backward()
    assert s.layer1[0].weight.grad is not None


def mdistiller_train_iter(distiller, optimizer, image, target, epoch=1):
    """mdistiller's BaseTrainer.train_iter, minus meters and CUDA transfers."""
    optimizer.zero_grad()
    preds, losses_dict = distiller(image=image, target=target, epoch=epoch)
    loss = sum([v.mean() for v in losses_dict.values()])
    loss.backward()
    optimizer.step()
    return preds, loss


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_mdistiller_trainer_loop_equals_explicit_steps(kind):
    s, t = md_models()
    s_ref = copy.deepcopy(s)
    d = LWKD(s, t)
    d.train()
    opt = d.make_optimizer(kind, lr=0.05, example_input=X[:2], weight_decay=1e-4)
    assert [g["layer"] for g in opt.param_groups] == [0, 1, 2, None]
    assert names_of(s, opt.param_groups)[0][:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    ref = make_layerwise_optimizer(kind, s_ref, ["layer1", "layer2", "layer3"], X[:2], 0.05, weight_decay=1e-4)
    s_ref.train()
    for _ in range(3):
        mdistiller_train_iter(d, opt, X, Y)
        logits, fs = s_ref(X)
        with torch.no_grad():
            _, ft = t(X)
        D = lw.attention_discrepancy(fs["feats"][1:], ft["feats"][1:], resize="pool")
        loss = F.cross_entropy(logits, Y) + 1000.0 * D.sum()  # mdistiller AT's feature weight
        ref.zero_grad()
        loss.backward()
        ref.step(D.detach())
    for a, b in zip(s.parameters(), s_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.rates, ref.rates)


def test_mdistiller_nonfinite_loss_skips_the_step():
    s, t = md_models()
    d = LWKD(s, t).train()
    opt = d.make_optimizer("sgd", lr=0.1, momentum=0.9, example_input=X[:2])
    mdistiller_train_iter(d, opt, X, Y)
    before = snapshot(s)
    rates = opt.rates.clone()
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    _, loss = mdistiller_train_iter(d, opt, bad, Y)
    assert not math.isfinite(loss.item()) and d.found_inf.item() == 1.0
    for a, b in zip(s.parameters(), before):
        assert torch.equal(a, b)
    mdistiller_train_iter(d, opt, X, Y)  # keeps going
    assert all(torch.isfinite(p).all() for p in s.parameters())
    assert torch.isfinite(opt.rates).all() and rates.shape == opt.rates.shape


# ------------------------------------------------------------------------------------------------
# torchdistill (the real package)
# ------------------------------------------------------------------------------------------------

PAIRS = {n: {"student": {"io": "output", "path": n}, "teacher": {"io": "output", "path": n}, "weight": w}
         for n, w in zip(STAGES, (1.0, 2.0, 0.5))}


@pytest.fixture(scope="module")
def td():
    pytest.importorskip("torchdistill", reason="torchdistill is not installed")
    import lwkd_fast.integrations.torchdistill as adapter

    return adapter


def io_dicts(s, t, x, paths=STAGES):
    """io_dicts as torchdistill's forward hooks record them ({path: {"output": tensor}})."""
    sd, tdd = {}, {}
    hs = [getattr(s, p).register_forward_hook(lambda m, i, o, p=p: sd.__setitem__(p, {"output": o})) for p in paths]
    hs += [getattr(t, p).register_forward_hook(lambda m, i, o, p=p: tdd.__setitem__(p, {"output": o})) for p in paths]
    logits = s(x)
    with torch.no_grad():
        t(x)
    for h in hs:
        h.remove()
    return logits, sd, tdd


def test_torchdistill_mid_level_loss_from_the_registry_matches_atloss(td):
    from torchdistill.losses.registry import get_mid_level_loss

    torch.manual_seed(0)
    s, t = DigitsCNN(4), DigitsCNN(8).eval()
    loss = get_mid_level_loss({"key": "LayerwiseDiscrepancyLoss",
                               "kwargs": {"pairs": PAIRS, "use": "rates+loss", "source": "t-mid"}})
    assert isinstance(loss, td.LayerwiseDiscrepancyLoss)
    at = get_mid_level_loss({"key": "ATLoss", "kwargs": {"at_pairs": PAIRS, "mode": "code"}})
    _, sd, tdd = io_dicts(s, t, X)
    term = loss(sd, tdd, Y)
    torch.testing.assert_close(term, at(sd, tdd), rtol=1e-5, atol=1e-7)  # weighted sum of the same terms
    per_pair = torch.stack([get_mid_level_loss({"key": "ATLoss", "kwargs": {"at_pairs": {n: PAIRS[n]}}})(sd, tdd)
                            / PAIRS[n]["weight"] for n in STAGES])
    torch.testing.assert_close(loss.latest_discrepancies, per_pair.detach(), rtol=1e-5, atol=1e-7)
    assert loss.found_inf.item() == 0.0 and loss.student_paths == STAGES
    term.backward()
    assert s.stage1[0].weight.grad is not None

    rates_only = get_mid_level_loss({"key": "LayerwiseDiscrepancyLoss",
                                     "kwargs": {"pairs": PAIRS, "use": "rates", "source": "t-mid2"}})
    zero = rates_only(sd, tdd, Y)
    assert zero.item() == 0.0 and zero.requires_grad and rates_only.found_inf is None
    torch.testing.assert_close(rates_only.latest_discrepancies, per_pair.detach(), rtol=1e-5, atol=1e-7)


def test_torchdistill_loss_errors(td):
    from torchdistill.losses.registry import get_mid_level_loss

    with pytest.raises(ValueError, match="method 'jacobian' is not available in torchdistill.*not the models"):
        get_mid_level_loss({"key": "LayerwiseDiscrepancyLoss", "kwargs": {"pairs": PAIRS, "method": "jacobian"}})
    with pytest.raises(ValueError, match="pair 'a' needs teacher"):
        get_mid_level_loss({"key": "LayerwiseDiscrepancyLoss",
                            "kwargs": {"pairs": {"a": {"student": {"io": "output", "path": "x"}}}}})
    loss = get_mid_level_loss({"key": "LayerwiseDiscrepancyLoss", "kwargs": {"pairs": PAIRS, "source": "t-err"}})
    with pytest.raises(KeyError, match=r"no 'output' for path 'stage3'; add 'stage3' to student.forward_hook.output"):
        loss({"stage1": {"output": X}, "stage2": {"output": X}}, {}, Y)


def test_torchdistill_optimizer_builder_from_the_registry(td):
    from torchdistill.losses.registry import get_mid_level_loss
    from torchdistill.optim.registry import get_optimizer

    torch.manual_seed(0)
    s, t = DigitsCNN(4), DigitsCNN(8).eval()
    s.stage2[0].weight.requires_grad_(False)  # a frozen module, as torchdistill's frozen_modules does
    loss = get_mid_level_loss({"key": "LayerwiseDiscrepancyLoss", "kwargs": {"pairs": PAIRS, "source": "t-opt"}})
    opt = get_optimizer(nn.ModuleList([s]), "LayerwiseSGD", filters_params=False, lr=0.1, momentum=0.9,
                        pairs=PAIRS, example_input_size=[2, 1, 8, 8], source="t-opt")
    assert isinstance(opt, lw.optim.LayerwiseSGD) and opt.num_layers == 3
    ref = LayerwiseDistiller(s, t, pairs=[(n, n) for n in STAGES], example_input=X[:2])
    expect = [[n for n in g if n != "stage2.0.weight"] for g in names_of(s, ref.parameter_groups())]
    assert names_of(s, opt.param_groups) == expect
    adamw = get_optimizer(nn.ModuleList([s]), "LayerwiseAdamW", filters_params=False, lr=1e-3,
                          example_input_size=[2, 1, 8, 8], source="t-opt")  # layers default to the loss's pairs
    assert isinstance(adamw, lw.optim.LayerwiseAdamW) and names_of(s, adamw.param_groups) == expect

    # explicit groups (module_wise_configs with layer in kwargs) are passed through
    mw = [{"params": s.stage1.parameters(), "layer": 0}, {"params": s.stage2.parameters(), "layer": 1},
          {"params": s.stage3.parameters(), "layer": 2}, {"params": s.head.parameters(), "layer": None}]
    opt2 = get_optimizer(mw, "LayerwiseSGD", lr=0.1, source="t-opt")
    assert [g["layer"] for g in opt2.param_groups] == [0, 1, 2, None]
    with pytest.raises(ValueError, match="filters_params: False"):
        get_optimizer(nn.ModuleList([s]), "LayerwiseSGD", lr=0.1, example_input_size=[2, 1, 8, 8], source="t-opt")
    with pytest.raises(ValueError, match="no LayerwiseDiscrepancyLoss with source='nope'"):
        get_optimizer(nn.ModuleList([s]), "LayerwiseSGD", filters_params=False, lr=0.1,
                      example_input_size=[2, 1, 8, 8], source="nope")
    with pytest.raises(ValueError, match="example_input_size"):
        get_optimizer(nn.ModuleList([s]), "LayerwiseSGD", filters_params=False, lr=0.1, source="t-opt")
    del loss


def test_torchdistill_optimizer_follows_the_latest_loss_of_its_source(td):
    """MultiStagesDistillationBox rebuilds the criterion per stage; an optimizer built in an
    earlier stage reads the loss that now carries the source name."""
    first = td.LayerwiseDiscrepancyLoss(PAIRS, use="rates", source="t-stage")
    proxy = td.NamedSource("t-stage")
    assert proxy.current() is first
    second = td.LayerwiseDiscrepancyLoss(PAIRS, use="rates", source="t-stage")
    _, sd, tdd = io_dicts(DigitsCNN(4), DigitsCNN(8).eval(), X[:4])
    second(sd, tdd)
    assert proxy.current() is second and proxy.latest_discrepancies is second.latest_discrepancies
    assert proxy.found_inf is None
    del first


def td_config(use, source, *, sgd=True):
    ce = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
          "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
              "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
              "target": {"uses_label": True}}},
          "weight": 1.0}
    return {
        "num_epochs": 1,
        "teacher": {"forward_proc": "forward_batch_only", "forward_hook": {"output": STAGES}, "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "forward_hook": {"output": STAGES}},
        "criterion": {"key": "LayerwiseWeightedSumLoss", "kwargs": {"sub_terms": {
            "ce": ce,
            "lwkd": {"criterion": {"key": "LayerwiseDiscrepancyLoss",
                                   "kwargs": {"pairs": PAIRS, "use": use, "source": source}}, "weight": 1.0}}}},
        "optimizer": {"key": "LayerwiseSGD" if sgd else "LayerwiseAdamW", "filters_params": False,
                      "kwargs": {"lr": 0.05, "momentum": 0.9, "pairs": PAIRS, "example_input_size": [2, 1, 8, 8],
                                 "source": source} if sgd else
                      {"lr": 1e-3, "pairs": PAIRS, "example_input_size": [2, 1, 8, 8], "source": source}},
    }


@pytest.mark.parametrize("use", ["rates", "rates+loss"])
def test_torchdistill_distillation_box_run_equals_explicit_steps(td, use):
    from torchdistill.core.distillation import get_distillation_box

    torch.manual_seed(0)
    s, t = DigitsCNN(4), DigitsCNN(8)
    s_ref = copy.deepcopy(s)
    box = get_distillation_box(t, s, {}, td_config(use, "t-box-" + use), torch.device("cpu"), None, False, 1)
    assert isinstance(box.optimizer, lw.optim.LayerwiseSGD)
    ref = make_layerwise_optimizer("sgd", s_ref, STAGES, X[:2], 0.05, momentum=0.9)
    w = torch.tensor([1.0, 2.0, 0.5])
    box.pre_epoch_process(epoch=0)
    s_ref.train()
    t.eval()
    for step in range(3):
        xb, yb = X[step::3], Y[step::3]
        loss = box.forward_process(xb, yb, {})
        box.post_forward_process(loss)  # backward, then torchdistill's plain optimizer.step()
        logits, sd, tdd = io_dicts(s_ref, t, xb)
        D = lw.attention_discrepancy([sd[n]["output"] for n in STAGES], [tdd[n]["output"] for n in STAGES])
        ref_loss = F.cross_entropy(logits, yb) + ((D * w).sum() if use == "rates+loss" else 0.0)
        ref.zero_grad()
        ref_loss.backward()
        ref.step(D.detach())
    for a, b in zip(s.parameters(), s_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(box.optimizer.rates, ref.rates)
    assert not torch.allclose(box.optimizer.rates, torch.full((3,), 0.05))


def test_torchdistill_box_skips_a_nonfinite_step(td):
    from torchdistill.core.distillation import get_distillation_box

    torch.manual_seed(0)
    s, t = DigitsCNN(4), DigitsCNN(8)
    box = get_distillation_box(t, s, {}, td_config("rates", "t-box-nan", sgd=False), torch.device("cpu"),
                               None, False, 1)
    box.pre_epoch_process(epoch=0)
    box.post_forward_process(box.forward_process(X[:8], Y[:8], {}))
    before = snapshot(s)
    bad = X[8:].clone()
    bad[0, 0, 0, 0] = float("inf")
    loss = box.forward_process(bad, Y[8:], {})
    assert not math.isfinite(loss.item())
    lwkd_term = box.criterion.term_dict["lwkd"][0]
    assert lwkd_term.found_inf.item() == 1.0  # the total loss, reported by LayerwiseWeightedSumLoss
    box.post_forward_process(loss)
    for a, b in zip(s.parameters(), before):
        assert torch.equal(a, b)
    box.post_forward_process(box.forward_process(X[8:], Y[8:], {}))  # keeps going
    assert all(torch.isfinite(p).all() for p in s.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(s.parameters(), before))


# ------------------------------------------------------------------------------------------------
# The documented recipes, verbatim, in each framework's own entry point
# ------------------------------------------------------------------------------------------------

HERE = pathlib.Path(__file__).resolve().parent
README = (HERE.parent / "README.md").read_text()


def literal_blocks(doc):
    """The reST literal blocks of a docstring (the indented block after a line ending in
    '::'), dedented: the recipe text exactly as a user copies it."""
    lines, blocks, i = doc.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].rstrip().endswith("::"):
            i += 1
            continue
        base = len(lines[i]) - len(lines[i].lstrip())
        j, block = i + 1, []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
            block.append(lines[j])
            j += 1
        blocks.append(textwrap.dedent("\n".join(block)).strip("\n"))
        i = j
    return blocks


def recipe(module):
    return literal_blocks(sys.modules[module].__doc__)


@pytest.fixture
def standin(monkeypatch):
    """Put a stand-in framework (tests/standins/<name>) on sys.path; its modules (and the
    mdistiller CFG it mutates) are dropped again afterwards."""
    import lwkd_fast.integrations.mdistiller as md

    roots = []

    def use(name):
        root = HERE / "standins" / name
        monkeypatch.syspath_prepend(str(root))
        roots.append(str(root))
        return root

    monkeypatch.setattr(md, "_TRAINER", None)
    yield use
    for key, mod in list(sys.modules.items()):
        if any(str(getattr(mod, "__file__", "") or "").startswith(r) for r in roots):
            del sys.modules[key]


@pytest.mark.parametrize("module", ["lwkd_fast.integrations.mdistiller", "lwkd_fast.integrations.repdistiller",
                                    "lwkd_fast.integrations.torchdistill"])
def test_readme_gives_each_adapter_recipe_verbatim(module):
    if module.endswith("torchdistill"):
        pytest.importorskip("torchdistill", reason="torchdistill is not installed")
    __import__(module)
    blocks = recipe(module)
    assert len(blocks) >= 2
    for block in blocks:
        assert block in README, f"{module}: README lacks the recipe block\n{block}"


def test_mdistiller_recipe_runs_in_tools_train(standin, tmp_path, monkeypatch):
    """tools/train.py --cfg <the docstring's config>: the registered trainer builds the layer-wise
    optimizer from SOLVER, trains through mdistiller's loop and checkpoints it; LWKD's loss on a
    batch is exactly AT's from the same merged config."""
    pytest.importorskip("yacs", reason="yacs (mdistiller's config system) is not installed")
    import lwkd_fast.integrations.mdistiller as md

    root = standin("mdistiller_repo")
    line, config = recipe("lwkd_fast.integrations.mdistiller")[:2]
    assert line in (root / "tools" / "train.py").read_text().splitlines()
    assert 'TYPE: "LWKD"' in config and 'TRAINER: "lwkd"' in config
    (tmp_path / "lwkd.yaml").write_text(config)
    monkeypatch.setattr(sys, "argv", ["tools/train.py", "--cfg", str(tmp_path / "lwkd.yaml"), "SOLVER.EPOCHS", "1",
                                      "SOLVER.BATCH_SIZE", "4", "LOG.PREFIX", str(tmp_path)])
    torch.manual_seed(0)
    run = runpy.run_path(str(root / "tools" / "train.py"), run_name="__main__")
    trainer, cfg = run["trainer"], run["cfg"]
    opt = trainer.optimizer
    assert isinstance(opt, lw.optim.LayerwiseSGD) and opt.source is trainer.distiller.module
    assert [g["layer"] for g in opt.param_groups] == [0, 1, 2, None]
    g0 = opt.param_groups[0]
    assert (g0["lr"], g0["momentum"], g0["weight_decay"]) == (0.05, 0.9, 0.0005)
    assert len(trainer.losses) == 3 and set(trainer.losses[0]) == {"loss_ce", "loss_feat"}
    assert not torch.allclose(opt.factors, torch.ones(3))  # the rates moved
    ck = torch.load(tmp_path / "cifar100_baselines" / "lwkd,res32x4,res8x4" / "latest", weights_only=True)
    assert torch.equal(ck["optimizer"]["layerwise"]["factors"], opt.factors)

    from mdistiller.dataset import get_dataset
    from mdistiller.distillers import distiller_dict
    from mdistiller.models import cifar_model_dict

    image, target, _ = next(iter(get_dataset(cfg)[0]))
    s, t = cifar_model_dict["resnet8x4"][0](), cifar_model_dict["resnet32x4"][0]()
    _, at = distiller_dict["AT"](s, t, cfg).train()(image=image, target=target, epoch=1)
    _, ours = distiller_dict["LWKD"](s, t, cfg).train()(image=image, target=target, epoch=1)
    torch.testing.assert_close(ours["loss_ce"], at["loss_ce"], rtol=0, atol=0)
    torch.testing.assert_close(ours["loss_feat"], at["loss_kd"], rtol=1e-5, atol=1e-7)
    assert md.HAS_MDISTILLER in (False, True)  # (either base class: the interface is the same)


def test_mdistiller_register_declares_the_config_node(standin):
    pytest.importorskip("yacs", reason="yacs (mdistiller's config system) is not installed")
    import lwkd_fast.integrations.mdistiller as md

    standin("mdistiller_repo")
    from mdistiller.engine.cfg import CFG

    md.register()
    md.register()  # idempotent
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict

    assert distiller_dict["LWKD"] is md.LWKD and trainer_dict["lwkd"] is md.trainer_class()
    assert set(CFG.LWKD) == set(md.CFG_DEFAULTS)
    cfg = CFG.clone()
    cfg.merge_from_other_cfg(type(CFG)({"LWKD": {"FEAT_INDICES": [2, 3], "P": 4.0, "GAMMA": 0.5}}))
    s, t = md_models()
    d = md.LWKD(s, t, cfg)
    assert d.feat_indices == [2, 3] and d.p == 4.0 and d.feat_weight == 1000.0  # AT's weight kept
    assert d.input_size == [2, 3, 32, 32]
    frozen = CFG.clone()
    del frozen["LWKD"]
    frozen.freeze()
    import mdistiller.engine.cfg as mcfg

    saved = mcfg.CFG
    mcfg.CFG = frozen
    try:
        with pytest.raises(RuntimeError, match="before cfg.merge_from_file"):
            md.register()
    finally:
        mcfg.CFG = saved


def test_repdistiller_recipe_runs_in_train_student(standin, monkeypatch):
    """train_student.py --distill attention with the docstring's three edits: every recipe line
    is in the script; the first loss equals the unedited script's (RepDistiller's Attention at
    p = 2, same seed), and the layer-wise optimizer trained through helper/loops.py."""
    root = standin("repdistiller_repo")
    script = (root / "train_student.py").read_text()
    stripped = {ln.strip() for ln in script.splitlines()}
    for block in recipe("lwkd_fast.integrations.repdistiller"):
        for ln in block.splitlines():
            assert ln.strip() in stripped, f"recipe line not in train_student.py: {ln!r}"
    import train_student

    argv = ["--path_t", "./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth", "--distill", "attention",
            "--model_s", "resnet8x4", "-a", "0", "-b", "1000", "--epochs", "1", "--batch_size", "4"]
    torch.manual_seed(0)
    ours = train_student.main(argv)
    monkeypatch.setattr(train_student, "LWKD", False)
    torch.manual_seed(0)
    upstream = train_student.main(argv)
    opt = ours["optimizer"]
    assert isinstance(opt, lw.optim.LayerwiseSGD) and isinstance(upstream["optimizer"], torch.optim.SGD)
    assert [g["layer"] for g in opt.param_groups] == [0, 1, 2, None]
    assert len(ours["losses"]) == 3
    assert ours["losses"][0] == pytest.approx(upstream["losses"][0], rel=1e-5)
    assert not torch.allclose(opt.factors, torch.ones(3))


def test_repdistiller_feature_layers_and_the_power_convention(standin):
    standin("repdistiller_repo")
    from distiller_zoo import Attention
    from models import model_dict

    from lwkd_fast.integrations.repdistiller import feature_layers

    net = model_dict["resnet8x4"]()
    x = torch.randn(2, 3, 32, 32)
    assert feature_layers(net, x) == ["layer1", "layer2", "layer3"]
    assert feature_layers(net, x, [0]) == ["relu"]
    # |A|^p (ours) and A.pow(p) (RepDistiller) agree for p = 2 and for non-negative features,
    # and differ for odd p on signed (pre-activation) features
    g = torch.Generator().manual_seed(0)
    signed = [torch.randn(2, 4, 8, 8, generator=g)], [torch.randn(2, 6, 8, 8, generator=g)]
    positive = [f.relu() for f in signed[0]], [f.relu() for f in signed[1]]
    for p, (fs, ft), same in ((2, signed, True), (3, positive, True), (3, signed, False)):
        ours, theirs = LayerwiseAttention(p)(fs, ft)[0], Attention(p)(fs, ft)[0]
        assert torch.allclose(ours, theirs, rtol=1e-5) == same, p
    want = Attention(3)([f.abs() for f in signed[0]], [f.abs() for f in signed[1]])[0]
    torch.testing.assert_close(LayerwiseAttention(3)(*signed)[0], want, rtol=1e-5, atol=1e-7)


class TinyTorchvisionNet(nn.Module):
    """torchvision ResNet module names (conv1 ... layer1-4, fc) at a few channels."""

    def __init__(self, w, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, stride=4, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(F.relu(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


TD_BASE = """\
datasets:
  &train lwkd/train: !import_call
    key: 'torchvision.datasets.FakeData'
    init:
      kwargs:
        size: 8
        image_size: [3, 224, 224]
        num_classes: 10
        transform: !import_call
          key: 'torchvision.transforms.ToTensor'
          init:
models:
  teacher_model:
    key: 'lwkd_tiny_teacher'
    kwargs:
      num_classes: 10
    src_ckpt:
  student_model:
    key: 'lwkd_tiny_student'
    kwargs:
      num_classes: 10
    src_ckpt:
    dst_ckpt:
train:
  log_freq: 1000
  num_epochs: 1
  train_data_loader:
    dataset_id: *train
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
    kwargs:
      batch_size: 4
      num_workers: 0
      drop_last: False
  teacher:
    forward_proc: 'forward_batch_only'
    forward_hook:
      input: []
      output: ['layer3', 'layer4']
    requires_grad: False
  student:
    forward_proc: 'forward_batch_only'
    forward_hook:
      input: []
      output: ['layer3', 'layer4']
    requires_grad: True
{optimizer}
  scheduler:
    key: 'MultiStepLR'
    kwargs:
      milestones: [5, 15]
      gamma: 0.1
{criterion}
"""

TD_SGD = """\
optimizer:
  key: 'SGD'
  kwargs:
    lr: 0.0001
    momentum: 0.9
    weight_decay: 0.0001"""


def td_example_run(config_path):
    """torchdistill's examples/torchvision/image_classification.py, its main(), train() and
    train_one_epoch() on the CPU (no evaluation, no checkpoints): load the YAML with
    torchdistill's loader, import the config's dependencies, build the models and the
    DistillationBox, and run the epochs through forward_process / post_forward_process."""
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.models.official import get_image_classification_model
    from torchdistill.models.registry import get_model

    config = yaml_util.load_yaml_file(str(config_path))
    import_dependencies(config.get("dependencies", None))
    device = torch.device("cpu")

    def load_model(model_config):
        model = get_image_classification_model(model_config, False)
        if model is None:
            model = get_model(model_config["key"], model_config.get("repo_or_dir", None), **model_config["kwargs"])
        return model.to(device)

    torch.manual_seed(0)
    teacher = load_model(config["models"]["teacher_model"])
    student = load_model(config["models"]["student_model"])
    box = get_distillation_box(teacher, student, config["datasets"], config["train"], device, None, False, 1)
    losses = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            losses.append(loss.item())
        box.post_epoch_process()
    return box, losses


def test_torchdistill_recipe_runs_in_the_example_script(td, tmp_path):
    """torchdistill's AT sample config with the docstring's three changes, through the example
    script's flow: the first loss is exactly the AT config's (ATLoss, mode 'code', weight 1000),
    and the layer-wise optimizer trains; reverting the two criterion keys gives the AT config."""
    from torchdistill.models.registry import MODEL_DICT, register_model

    for name, w in (("lwkd_tiny_teacher", 8), ("lwkd_tiny_student", 4)):
        if name not in MODEL_DICT:
            register_model(key=name)(lambda num_classes, w=w: TinyTorchvisionNet(w, num_classes))
    deps, optimizer, criterion = recipe("lwkd_fast.integrations.torchdistill")[:3]
    assert "lwkd_fast.integrations.torchdistill" in deps and "key: 'LayerwiseSGD'" in optimizer
    at_criterion = criterion.replace("'LayerwiseWeightedSumLoss'", "'WeightedSumLoss'").replace(
        "'LayerwiseDiscrepancyLoss'", "'ATLoss'")
    configs = {
        "lwkd": deps + "\n" + TD_BASE.format(optimizer=textwrap.indent(optimizer, "  "),
                                             criterion=textwrap.indent(criterion, "  ")),
        "at": TD_BASE.format(optimizer=textwrap.indent(TD_SGD, "  "), criterion=textwrap.indent(at_criterion, "  ")),
    }
    out = {}
    for name, text in configs.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        out[name] = td_example_run(tmp_path / f"{name}.yaml")
    (box, losses), (at_box, at_losses) = out["lwkd"], out["at"]
    assert isinstance(box.optimizer, lw.optim.LayerwiseSGD) and type(at_box.optimizer) is torch.optim.SGD
    assert [g["layer"] for g in box.optimizer.param_groups] == [0, 1, None]
    assert len(losses) == 2 and losses[0] == pytest.approx(at_losses[0], rel=1e-6)
    assert not torch.allclose(box.optimizer.factors, torch.ones(2))
