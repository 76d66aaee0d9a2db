"""LayerwiseDistiller: pairing, parameter groups (SPEC section 4), losses, errors, training."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwkd_fast as lw
from lwkd_fast.demo import DigitsCNN
from lwkd_fast.distill import LayerwiseDistiller, find_pairs, stage_boundaries


def models(sw=4, tw=8):
    torch.manual_seed(0)
    return DigitsCNN(sw), DigitsCNN(tw).eval()


X = torch.rand(16, 1, 8, 8)
Y = torch.arange(16) % 10


def test_stage_boundaries_pick_the_last_module_per_spatial_size():
    s, _ = models()
    sb = stage_boundaries(s, X[:2])
    assert list(sb) == [(8, 8), (4, 4), (2, 2)]
    assert [v[0] for v in sb.values()] == ["stage1", "stage2", "stage3"]


def test_auto_pairs_and_report():
    s, t = models()
    pairs, report = find_pairs(s, t, X[:2])
    assert pairs == [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
    assert "pair 2: student 'stage3' (2, 16, 2, 2) <-> teacher 'stage3' (2, 32, 2, 2)" in report
    d = LayerwiseDistiller(s, t, example_input=X[:2])
    assert d.pairs == pairs and d.pairs_report == report


def test_auto_pairs_none_found_lists_candidates():
    s, _ = models()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"found no student and teacher stage boundaries.*Student candidates: stage1 \(2, 4, 8, 8\)"):
        find_pairs(s, mlp, X[:2])


def test_explicit_pairs_unknown_name_lists_available():
    s, t = models()
    with pytest.raises(ValueError, match=r"the teacher has no module named 'layer9'; available: stage1, stage1.0"):
        LayerwiseDistiller(s, t, pairs=[("stage1", "layer9")])
    with pytest.raises(ValueError, match=r"pairs\[0\] must be a \(student_name, teacher_name\) pair"):
        LayerwiseDistiller(s, t, pairs=["stage1"])


def test_parameter_groups_follow_execution_order():
    s, t = models()
    d = LayerwiseDistiller(s, t, pairs=[("stage1", "stage1"), ("stage3", "stage3")], example_input=X[:2])
    groups = d.parameter_groups()
    assert [g["layer"] for g in groups] == [0, 1, None]
    names = {id(p): n for n, p in s.named_parameters()}
    got = [[names[id(p)] for p in g["params"]] for g in groups]
    assert all(n.startswith("stage1.") for n in got[0])
    assert all(n.startswith(("stage2.", "stage3.")) for n in got[1]) and any(n.startswith("stage2.") for n in got[1])
    assert got[2] == ["head.weight", "head.bias"]
    # every parameter exactly once
    flat = [n for g in got for n in g]
    assert sorted(flat) == sorted(n for n, _ in s.named_parameters())


def test_parameter_groups_root_parameter_goes_first():
    class WithRootParam(DigitsCNN):
        def __init__(self):
            super().__init__(4)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return super().forward(x * self.scale)

    s = WithRootParam()
    _, t = models()
    d = LayerwiseDistiller(s, t, example_input=X[:2])
    g0 = d.parameter_groups()[0]
    assert any(p is s.scale for p in g0["params"])


def test_group_discovery_does_not_change_model_state():
    s, t = models()
    s.train()
    before = {k: v.clone() for k, v in s.state_dict().items()}
    LayerwiseDistiller(s, t, example_input=X[:4])
    assert s.training and all(m.training for m in s.modules())
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_attention_forward_matches_manual_computation():
    s, t = models()
    d = LayerwiseDistiller(s, t, use="rates+loss", weights=[1.0, 2.0, 3.0], kd_weight=0.5, temperature=3.0,
                           example_input=X[:2])
    out = d(X, Y)
    feats_s, feats_t = {}, {}
    hs = [getattr(s, n).register_forward_hook(lambda m, i, o, n=n: feats_s.__setitem__(n, o)) for n in ("stage1", "stage2", "stage3")]
    ht = [getattr(t, n).register_forward_hook(lambda m, i, o, n=n: feats_t.__setitem__(n, o)) for n in ("stage1", "stage2", "stage3")]
    logits = s(X)
    with torch.no_grad():
        tl = t(X)
    for h in hs + ht:
        h.remove()
    D = torch.stack([lw.reference.eager_at_loss([feats_s[n]], [feats_t[n]]) for n in ("stage1", "stage2", "stage3")])
    torch.testing.assert_close(out.discrepancies, D.detach(), rtol=1e-5, atol=1e-7)
    ce = F.cross_entropy(logits, Y)
    kd = F.kl_div(F.log_softmax(logits / 3, 1), F.softmax(tl / 3, 1), reduction="batchmean") * 9
    expect = 0.5 * ce + 0.5 * kd + (D * torch.tensor([1.0, 2.0, 3.0])).sum()
    torch.testing.assert_close(out.loss, expect, rtol=1e-5, atol=1e-6)
    assert out.match is not None and out.kd is not None
    assert not out.discrepancies.requires_grad and out.loss.requires_grad


def test_rates_only_does_not_backprop_through_matching():
    s, t = models()
    d = LayerwiseDistiller(s, t, use="rates", example_input=X[:2])
    out = d(X, Y)
    torch.testing.assert_close(out.loss, F.cross_entropy(s(X), Y))
    assert out.match is None


def test_teacher_left_in_train_mode_warns_once_and_is_evaluated():
    s, t = models()
    t.train()
    d = LayerwiseDistiller(s, t, example_input=X[:2])
    with pytest.warns(UserWarning, match="teacher is in train mode"):
        d(X, Y)
    assert not t.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.train()
        d(X, Y)
    assert not t.training and s.training


def test_teacher_gets_no_gradient():
    s, t = models()
    d = LayerwiseDistiller(s, t, use="rates+loss", example_input=X[:2])
    d(X, Y).loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None for p in s.parameters())


def test_incompatible_explicit_pair_suggests_resize():
    s, t = models()
    d = LayerwiseDistiller(s, t, pairs=[("stage1", "stage2")], example_input=X[:2])
    with pytest.raises(ValueError, match="resize='pool'"):
        d(X, Y)
    d2 = LayerwiseDistiller(s, t, pairs=[("stage1", "stage2")], resize="pool", example_input=X[:2])
    assert torch.isfinite(d2(X, Y).discrepancies).all()


def test_bad_options():
    s, t = models()
    with pytest.raises(ValueError, match="unknown method 'gradients'"):
        LayerwiseDistiller(s, t, method="gradients")
    with pytest.raises(ValueError, match="metric 'cos' does not apply to method 'attention'"):
        LayerwiseDistiller(s, t, metric="cos")
    with pytest.raises(ValueError, match="unknown use 'loss'"):
        LayerwiseDistiller(s, t, use="loss")
    with pytest.raises(ValueError, match="got 2 weights for 3 layer pairs"):
        LayerwiseDistiller(s, t, weights=[1, 2], example_input=X[:2])
    d = LayerwiseDistiller(s, t)
    with pytest.raises(RuntimeError, match="pass example_input="):
        d.parameter_groups()


@pytest.mark.parametrize("method", ["jacobian", "hessian"])
def test_derivative_methods_match_direct_maps(method):
    s, t = models()
    s.train()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = LayerwiseDistiller(s, t, method=method, use="rates+loss", generator=g1, example_input=X[:2])
    out = d(X, Y)
    names = ["stage1", "stage2", "stage3"]
    kind = "jacobian" if method == "jacobian" else "hvp"
    sm, tm = lw.derivative_maps(s, t, X, names, names, kind=kind, generator=g2, labels=Y)
    torch.testing.assert_close(out.discrepancies, lw.map_discrepancy(sm, tm), rtol=1e-5, atol=1e-7)
    out.loss.backward()  # create_graph=True maps: the matching term reaches the student
    assert all(p.grad is not None for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())


def test_derivative_rates_only_builds_no_second_order_graph():
    s, t = models()
    d = LayerwiseDistiller(s, t, method="jacobian", use="rates", example_input=X[:2])
    out = d(X, Y)
    assert out.match is None and not out.discrepancies.requires_grad
    torch.testing.assert_close(out.loss, F.cross_entropy(s(X), Y))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("bad_step", [0, 2])
def test_nonfinite_loss_skips_the_step_on_the_device(kind, bad_step):
    """A batch whose loss is NaN (a student hook poisons the logits on that call): the attached
    optimizer's plain opt.step() leaves every student parameter and the optimizer state as they
    were, counts it (d.nonfinite_losses, opt.skipped_steps), and training goes on finitely."""
    import copy

    s, t = models()
    d = LayerwiseDistiller(s, t, use="rates+loss", example_input=X[:2])
    opt = d.make_optimizer(kind, lr=0.05, **({"momentum": 0.9} if kind == "sgd" else {}))
    assert opt.source is d and d.latest_discrepancies is None and d.found_inf is None
    calls = []

    def poison(mod, inp, out):
        calls.append(1)
        if len(calls) == bad_step + 1:
            return out * float("nan")

    hook = s.head.register_forward_hook(poison)
    try:
        for step in range(5):
            out = d(X, Y)
            assert d.latest_discrepancies is out.discrepancies and d.found_inf is out.found_inf
            assert out.found_inf.dtype == torch.float32 and out.found_inf.shape == ()
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if step == bad_step:
                assert not torch.isfinite(out.loss) and float(out.found_inf) == 1.0
                params = [p.detach().clone() for p in s.parameters()]
                state = copy.deepcopy(opt.state_dict())
            opt.step()  # KD-framework style: everything comes from the attached distiller
            if step == bad_step:
                assert all(torch.equal(a, b.detach()) for a, b in zip(params, s.parameters()))
                after = opt.state_dict()
                assert sorted(after["state"]) == sorted(state["state"])
                for i, st in state["state"].items():
                    for k, v in st.items():
                        assert torch.equal(after["state"][i][k], v), (i, k)
                for k in ("factors", "rates", "nonfinite_steps"):
                    assert torch.equal(after["layerwise"][k], state["layerwise"][k]), k
            else:
                assert torch.isfinite(out.loss)
    finally:
        hook.remove()
    assert int(d.nonfinite_losses) == 1 and int(opt.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in s.parameters())
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(params, s.parameters()))  # it kept learning
    assert torch.isfinite(d(X, Y).loss)


# ------------------------------------------------------------------------------------------------
# Issue 12: layouts, depth map, safe capture, taps, tasks (the model families: tests/test_models.py)
# ------------------------------------------------------------------------------------------------

from lwkd_fast.distill import Extent, OutputCapture, depth_map, detect_layout, layout_candidates  # noqa: E402


def test_depth_map_pairs_distinct_blocks_of_the_deeper_stack():
    assert depth_map(2, 4) == [(0, 1), (1, 3)]
    assert depth_map(3, 4) == [(0, 0), (1, 2), (2, 3)]  # round((i+1)*4/3)-1 with halves up
    assert depth_map(4, 2) == [(1, 0), (3, 1)]
    assert depth_map(6, 12) == [(i, 2 * i + 1) for i in range(6)]


def test_layout_detection():
    img = Extent("grid", (32, 32))
    assert detect_layout((2, 16, 8, 8), img).channel_dim == 1
    assert detect_layout((2, 8, 8, 20), img).channel_dim == -1           # Swin, channels last
    assert detect_layout((2, 17, 32), img).kind == "tokens"              # ViT tokens
    assert detect_layout((2, 2, 17, 16), img) is None                    # attention internals
    assert detect_layout((2, 64, 1, 1), img) is None                     # one location
    assert len(layout_candidates((2, 8, 8, 8), img)) == 2                # C == H: ambiguous
    assert detect_layout((2, 8, 8, 8), img) is None
    assert detect_layout((2, 8, 8, 8), img, prefer=-1).channel_dim == -1
    seq = Extent("sequence", (12,))
    assert detect_layout((2, 12, 32), seq) == lw.distill.Layout(-1, "tokens", (12,))
    assert detect_layout((2, 3, 12, 12), seq).kind == "token_pairs"
    assert detect_layout((2, 13, 32), seq) is None
    assert detect_layout((2, 5, 7), None, channel_dim=1).extent == (7,)


def test_ambiguous_layout_follows_the_producing_module():
    s, t = models(8, 8)  # 8 channels at 8x8: the ReLU and stage outputs are ambiguous by shape
    pairs, _ = find_pairs(s, t, X[:2])
    assert pairs[0] == ("stage1", "stage1")


def test_capture_raises_on_an_unexpected_in_place_change():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.mutate = False

        def forward(self, x):
            h = self.lin(x)
            if self.mutate:
                h.mul_(2)
            return h.sum(1)

    net = Net()
    cap = OutputCapture(net, [("lin", None)], "student")
    x = torch.randn(2, 3)
    with torch.no_grad():
        _, (first,) = cap.run(lambda: net(x))
        assert cap.copied[True] == set()
        net.mutate = True
        with pytest.raises(RuntimeError, match="pair 0: the output of student module 'lin' was modified in place"):
            cap.run(lambda: net(x))
        cap2 = OutputCapture(net, [("lin", None)], "student")
        _, (got,) = cap2.run(lambda: net(x))  # learned on the first forward: copied
    assert cap2.copied[True] == {0} and torch.equal(got, first)


def test_explicit_tap_with_output_index_and_tasks():
    class Pair(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.body = DigitsCNN(w)

        def forward(self, x):
            return {"logits": self.body(x), "aux": self.body.stage1(x)}

    s, t = Pair(4), Pair(8).eval()
    d = LayerwiseDistiller(s, t, pairs=[(("", "aux"), ("", "aux"))], example_input=X[:2])
    out = d(X, Y)
    assert 'pair 0: student "[\'aux\']" (8x8) <-> teacher "[\'aux\']" (8x8)' in d.pairs_report
    torch.testing.assert_close(out.ce, F.cross_entropy(s(X)["logits"], Y))
    with pytest.raises(ValueError, match=r"task 'classification' needs \(B, C\) logits and \(B,\) targets"):
        d(X, Y[:, None].expand(16, 3))
    with pytest.raises(ValueError, match="unknown task 'lm'"):
        LayerwiseDistiller(s, t, task="lm")
    with pytest.raises(ValueError, match=r"pairs\[0\] student side must be a module name"):
        LayerwiseDistiller(s, t, pairs=[(3, "body")])
