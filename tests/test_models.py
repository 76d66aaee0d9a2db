"""Real architectures (issue 12): torchvision, timm and Hugging Face transformers models, tiny
random-init configs from :mod:`lwkd_fast.zoo` (nothing is downloaded: HF_HUB_OFFLINE=1).

Per family: the pairs ``pairs="auto"`` chooses (distinct, once-run, non-flat stage/block
outputs, checked with plain hooks), every method runs a training step, maps have no randomness,
captured outputs are what the modules returned, padded tokens do not count, and the errors for
what torch cannot do are clear.
"""

import copy
import functools
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lwkd_fast as lw  # noqa: E402
from lwkd_fast import derivatives as D  # noqa: E402
from lwkd_fast import zoo  # noqa: E402
from lwkd_fast.distill import find_pairs  # noqa: E402
from lwkd_fast.integrations.transformers import attention_pairs, hidden_state_pairs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*bos_token_id.*", "ignore:.*eos_token_id.*")

EXPECTED_PAIRS = {
    "tv_resnet": [("relu", "relu"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")],
    "tv_mobilenet": [("features.0", "relu"), ("features.1", "layer1"), ("features.3", "layer2"),
                     ("features.8", "layer3")],
    "timm_resnet": [("act1", "act1"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")],
    # stage 0's output is flat at init (LayerNorm stem + layer scale 1e-6): its MLP branch instead
    "timm_convnext": [("stages.0.blocks.0.mlp", "stages.0.blocks.1.mlp"), ("stages.1", "stages.1"),
                      ("stages.2", "stages.2")],
    "timm_vit": [("patch_embed.proj", "patch_embed.proj"), ("blocks.0", "blocks.1"), ("blocks.1", "blocks.3")],
    "timm_swin": [("layers.0", "layers.0"), ("layers.1", "layers.1"), ("layers.2", "layers.2")],
    # post-LayerNorm layer outputs are flat at init: each layer's FFN output instead
    "hf_bert": [("bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"),
                ("bert.encoder.layer.1.output.dense", "bert.encoder.layer.3.output.dense")],
    "hf_gpt2": [("transformer.h.0", "transformer.h.1"), ("transformer.h.1", "transformer.h.3")],
}
FAMILIES = list(EXPECTED_PAIRS)
assert sorted(FAMILIES) == sorted(zoo.FAMILIES)


@functools.lru_cache(maxsize=None)
def case(family):
    return zoo.build(family)


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _plain_outputs(model, x, names):
    """{name: (number of calls, first tensor output)} with plain hooks, eval mode, no grad."""
    got = {n: [0, None] for n in names}
    mods = dict(model.named_modules())

    def hook(n):
        def h(m, i, o):
            got[n][0] += 1
            got[n][1] = (o if isinstance(o, torch.Tensor) else o[0]).clone()
        return h

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    was = model.training
    try:
        with torch.no_grad():
            _call(model.eval(), x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return got


def _channel_dim(family, name, out):
    """Where the expected pairs keep their channels: tokens and timm's Swin stages and ConvNeXt
    MLPs last, everything else first."""
    channels_last = out.dim() == 3 or family == "timm_swin" or name.endswith(".mlp")
    return -1 if channels_last else 1


def _rel_spread(t, cd):
    a = t.movedim(cd, 1).flatten(2).double().pow(2).mean(1)
    return float((a.std(1, correction=0) / a.mean(1)).min())


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_pairs_are_distinct_once_run_non_flat_stage_or_block_outputs(family):
    c = case(family)
    pairs, report = find_pairs(c.student, c.teacher, c.x)
    assert pairs == EXPECTED_PAIRS[family], report
    for side, model in ((0, c.student), (1, c.teacher)):
        names = [pr[side] for pr in pairs]
        assert len(set(names)) == len(names)
        got = _plain_outputs(model, c.x, names)
        for n in names:
            calls, out = got[n]
            assert calls == 1, (n, calls)
            assert _rel_spread(out, _channel_dim(family, n, out)) > 1e-3, n  # not flat
    for k, (s, t) in enumerate(pairs):
        assert f"pair {k}: student '{s}'" in report and f"teacher '{t}'" in report


def _step(c, method, use, student=None, **kw):
    """One training step; returns (distiller, output, whether every paired group's parameters moved)."""
    student = copy.deepcopy(c.student) if student is None else student
    d = lw.LayerwiseDistiller(student, c.teacher, method=method, use=use, example_input=c.x,
                              generator=torch.Generator().manual_seed(0), sketch_rank=16, **kw)
    opt = d.make_optimizer("sgd", lr=1e-3)
    out = d(c.x, c.y)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    groups = [g for g in d.parameter_groups() if g["layer"] is not None]
    before = [[p.detach().clone() for p in g["params"]] for g in groups]
    opt.step()
    moved = all(any(not torch.equal(b, p.detach()) for b, p in zip(bs, g["params"])) for bs, g in zip(before, groups))
    return d, out, moved


METHOD_USE = [("attention", "rates+loss"), ("jacobian", "rates+loss"), ("hessian", "rates")]


@pytest.mark.parametrize("method,use", METHOD_USE)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains(family, method, use):
    c = case(family)
    student = copy.deepcopy(c.student)
    if family == "tv_mobilenet" and method != "attention":
        # Hardsigmoid has no second derivative: a Jacobian loss and HVP maps fail clearly (before
        # any backward); first-order Jacobian rates work, HVPs after replace_hardsigmoid
        with pytest.raises(D.NotDifferentiableError, match=r"aten::hardsigmoid_backward .*'features.1.block.1."
                                                           r"scale_activation' \(Hardsigmoid\).*replace_hardsigmoid"):
            _step(c, method, "rates+loss", student=copy.deepcopy(student))
        if method == "jacobian":
            use = "rates"
        else:
            D.replace_hardsigmoid(student)
    d, out, moved = _step(c, method, use, student=student)
    K = len(EXPECTED_PAIRS[family])
    assert d.num_layers == K and out.discrepancies.shape == (K,)
    assert torch.isfinite(out.discrepancies).all() and torch.isfinite(out.loss)
    assert (out.discrepancies > 0).all()
    if use == "rates+loss":  # the matching term is part of the loss (maps with a graph)
        assert out.match is not None and out.loss.requires_grad
    assert moved
    assert all(p.grad is None for p in c.teacher.parameters())


# ------------------------------------------------------------------------------------------------
# Item 3: no randomness in derivative maps
# ------------------------------------------------------------------------------------------------


def _embeds_input(model, x):
    return {"inputs_embeds": model.get_input_embeddings()(x["input_ids"]).detach(),
            "attention_mask": x["attention_mask"]}


def _hf(kind, impl, dropout=0.2):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    if kind == "bert":
        return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=dropout,
                                    attention_probs_dropout_prob=dropout, attn_implementation=impl))
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=dropout,
                                embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=impl))


RANDOM_MODELS = ["timm_vit", "timm_convnext", "hf_bert_eager", "hf_bert_sdpa", "hf_gpt2_eager", "hf_gpt2_sdpa"]


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_derivative_maps_have_no_randomness(name):
    torch.manual_seed(0)
    if name.startswith("hf_"):
        _, kind, impl = name.split("_")
        model = _hf(kind, impl).train()
        layers = ["encoder.layer.1.output.dense" if kind == "bert" else "h.1"]
        x = _embeds_input(model, zoo._tokens(2, 7, 50))
        kw = {"channel_dim": -1}
    else:
        model = copy.deepcopy(case(name).student).train()  # drop_path (and attention dropout for ViT)
        for m in model.modules():
            if type(m).__name__ == "DropPath":
                m.drop_prob = 0.5
        layers = EXPECTED_PAIRS[name][-1][0:1]
        x = case(name).x
        kw = {"channel_dim": -1 if name == "timm_vit" else 1}
    # the model itself is random in train mode (so the test can fail)
    with torch.no_grad():
        torch.manual_seed(1)
        a = _call(model, x)
        b = _call(model, x)
    first = (lambda o: o if isinstance(o, torch.Tensor) else o[0])
    assert not torch.equal(first(a), first(b))
    maps = [D.input_jacobians(model, x, layers, **kw)[0] for _ in range(2)]
    hvps = [D.input_hvps(model, x, layers, generator=torch.Generator().manual_seed(3), **kw)[0] for _ in range(2)]
    assert torch.equal(maps[0], maps[1]) and torch.equal(hvps[0], hvps[1])
    assert maps[0].abs().max() > 0
    ref = D.input_jacobians(copy.deepcopy(model).eval(), x, layers, **kw)[0]
    torch.testing.assert_close(maps[0], ref, rtol=1e-5, atol=1e-7)
    assert model.training and all(m.training for m in model.modules())


# ------------------------------------------------------------------------------------------------
# Item 4: captured outputs are what the module returned
# ------------------------------------------------------------------------------------------------


def test_attention_capture_is_what_the_module_returned():
    c = case("tv_resnet")
    student = copy.deepcopy(c.student).train()
    # layer1.0.bn2's output is modified in place by `out += identity` (and relu) later; layer1 is not
    pairs = [("layer1.0.bn2", "layer1.0.bn2"), ("layer1", "layer1")]
    d = lw.LayerwiseDistiller(student, c.teacher, pairs=pairs, example_input=c.x)

    def returned(model):
        store = {}
        mods = dict(model.named_modules())
        hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o.detach().clone()))
              for n in ("layer1.0.bn2", "layer1")]
        with torch.no_grad():
            model(c.x)
        for h in hs:
            h.remove()
        return [store["layer1.0.bn2"], store["layer1"]]

    ref = lw.attention_discrepancy(returned(student), returned(c.teacher))
    for _ in range(2):  # the first forward copies everything and learns; the second copies bn2 only
        got = d(c.x, c.y).discrepancies
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)
    assert d._captures[0].copied[True] == {0} and d._captures[1].copied[False] == {0}
    # what an uncopied capture would have given (the mutated tensor) differs: the test can fail
    mutated = {}
    h = dict(student.named_modules())["layer1.0.bn2"].register_forward_hook(
        lambda m, i, o: mutated.__setitem__("t", o))
    with torch.no_grad():
        student(c.x)
    h.remove()
    assert not torch.allclose(mutated["t"], returned(student)[0])
    # derivative maps see the same returned value
    s_maps, _ = lw.derivative_maps(student.eval(), c.teacher, c.x, ["layer1.0.bn2"], ["layer1.0.bn2"])
    x = c.x.clone().requires_grad_(True)
    out = {}
    h = dict(student.named_modules())["layer1.0.bn2"].register_forward_hook(
        lambda m, i, o: out.__setitem__("t", o.clone()))
    student(x)
    h.remove()
    (g,) = torch.autograd.grad(out["t"].pow(2).mean(1).sum(), x)
    torch.testing.assert_close(s_maps[0], g, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Item 2: flat attention maps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,pair", [
    ("hf_bert", ("bert.encoder.layer.0", "bert.encoder.layer.1")),
    ("timm_vit", ("norm", "norm")),
    ("timm_convnext", ("stages.1.downsample.0", "stages.1.downsample.0")),
])
def test_flat_pairs_warn_once_with_the_layer_name(family, pair):
    c = case(family)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = lw.LayerwiseDistiller(copy.deepcopy(c.student), c.teacher, pairs=[pair], example_input=c.x)
        d(c.x, c.y)
        d(c.x, c.y)
    flat = [str(m.message) for m in w if "flat attention map" in str(m.message)]
    assert len(flat) == 2, flat  # student and teacher side, once each
    assert f"the student's '{pair[0]}'" in flat[0] and "Pair another layer" in flat[0]
    # D of a flat pair is ~0: that is why it is flagged
    assert float(d.latest_discrepancies[0]) < 1e-6


# ------------------------------------------------------------------------------------------------
# Item 5: Hugging Face models as they come
# ------------------------------------------------------------------------------------------------


def _repadded(x):
    """The same batch with other token ids at the padded positions."""
    ids = x["input_ids"].clone()
    ids[x["attention_mask"] == 0] = 7
    return {**x, "input_ids": ids}


@pytest.mark.parametrize("pairing", ["auto", "attention"])
@pytest.mark.parametrize("family", ["hf_bert", "hf_gpt2"])
def test_padded_tokens_do_not_count(family, pairing):
    c = case(family)
    pairs = "auto" if pairing == "auto" else attention_pairs(c.student, c.teacher)
    x2 = _repadded(c.x)
    for method in ("attention", "jacobian", "hessian") if pairing == "auto" else ("attention",):
        d = lw.LayerwiseDistiller(c.student, c.teacher, pairs=pairs, method=method, example_input=c.x,
                                  sketch_rank=8).eval()
        d.generator = torch.Generator().manual_seed(0)
        a = d(c.x, c.y)
        d.generator = torch.Generator().manual_seed(0)
        b = d(x2, c.y)
        torch.testing.assert_close(a.discrepancies, b.discrepancies, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-7)
    # the padded positions' own activations did change: the mask is what makes D equal
    with torch.no_grad():
        h1, h2 = (c.student.eval()(**x, output_hidden_states=True).hidden_states[-1] for x in (c.x, x2))
    c.student.train()
    pad = c.x["attention_mask"] == 0
    assert not torch.allclose(h1[pad], h2[pad]) and torch.allclose(h1[~pad], h2[~pad], atol=1e-6)


def test_causal_lm_loss_matches_the_model_own_loss():
    c = case("hf_gpt2")
    d = lw.LayerwiseDistiller(c.student, c.teacher, example_input=c.x).eval()
    out = d(c.x)  # causal LM: the targets are the input ids, shifted inside
    labels = c.x["input_ids"].masked_fill(c.x["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = c.student(**c.x, labels=labels).loss
    c.student.train()
    torch.testing.assert_close(out.ce.detach(), ref, rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (2, 12, 97)
    kd = lw.LayerwiseDistiller(c.student, c.teacher, example_input=c.x, kd_weight=0.5).eval()(c.x)
    assert torch.isfinite(kd.kd) and kd.kd > 0


def test_logits_rule_and_tasks():
    c = case("hf_bert")
    d = lw.LayerwiseDistiller(c.student, c.teacher, example_input=c.x, logits=lambda out: out.logits * 2).eval()
    out = d(c.x, c.y)
    with torch.no_grad():
        ref = c.student(**c.x).logits * 2
    c.student.train()
    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.ce, F.cross_entropy(ref, c.y))
    with pytest.raises(ValueError, match=r"task 'causal_lm' needs \(B, T, C\) logits"):
        lw.LayerwiseDistiller(c.student, c.teacher, example_input=c.x, task="causal_lm")(c.x, c.y)
    with pytest.raises(TypeError, match="cannot find the logits in the model output"):
        lw.LayerwiseDistiller(c.student, c.teacher, example_input=c.x, logits=lambda out: None)(c.x, c.y)


def test_hf_adapter_pairings():
    c = case("hf_bert")
    assert hidden_state_pairs(c.student, c.teacher) == [("bert.encoder.layer.0", "bert.encoder.layer.1"),
                                                         ("bert.encoder.layer.1", "bert.encoder.layer.3")]
    assert attention_pairs(c.student, c.teacher) == [
        (("bert.encoder.layer.0.attention.self", 1), ("bert.encoder.layer.1.attention.self", 1)),
        (("bert.encoder.layer.1.attention.self", 1), ("bert.encoder.layer.3.attention.self", 1))]
    g = case("hf_gpt2")
    assert attention_pairs(g.teacher, g.student) == [(("transformer.h.1.attn", 1), ("transformer.h.0.attn", 1)),
                                                      (("transformer.h.3.attn", 1), ("transformer.h.1.attn", 1))]
    d = lw.LayerwiseDistiller(c.student, c.teacher, pairs=attention_pairs(c.student, c.teacher), example_input=c.x)
    assert "12x12 token pairs" in d.pairs_report
    with pytest.raises(ValueError, match="attn_implementation='sdpa'.*attn_implementation='eager'"):
        attention_pairs(_hf("bert", "sdpa"), c.teacher)
    with pytest.raises(TypeError, match="not a Hugging Face transformers model"):
        hidden_state_pairs(case("timm_vit").student, c.teacher)


# ------------------------------------------------------------------------------------------------
# Item 6: sketched maps of a real language model
# ------------------------------------------------------------------------------------------------


def test_gpt2_sketched_maps_are_the_projected_one_hot_maps():
    c = case("hf_gpt2")
    student = copy.deepcopy(c.student).double().eval()
    teacher = copy.deepcopy(c.teacher).double()
    r, V = 16, 97
    s_maps, t_maps = D.sketched_derivative_maps(student, teacher, c.x, ["transformer.h.1"], ["transformer.h.3"],
                                                rank=r, generator=torch.Generator().manual_seed(2),
                                                mask=c.x["attention_mask"])
    bucket, sign = D.count_sketch(V, r, generator=torch.Generator().manual_seed(2))
    R = torch.zeros(V, r, dtype=torch.float64)
    R[torch.arange(V), bucket] = sign.double()
    onehot = {"onehot": F.one_hot(c.x["input_ids"], V).double(), "attention_mask": c.x["attention_mask"]}
    for model, layer, maps in ((student, "transformer.h.1", s_maps), (teacher, "transformer.h.3", t_maps)):
        exact = D.input_jacobians(zoo.OneHotLM(model), onehot, ["lm." + layer], channel_dim=-1,
                                  mask=c.x["attention_mask"])[0]
        assert exact.shape == (2, 12, V)
        torch.testing.assert_close(maps[0], exact @ R, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Item 7: what torch cannot do, said clearly
# ------------------------------------------------------------------------------------------------


def test_pair_that_never_runs_under_fused_attention():
    c = case("timm_vit")
    d = lw.LayerwiseDistiller(copy.deepcopy(c.student), c.teacher,
                              pairs=[("blocks.0.attn.attn_drop", "blocks.1.attn.attn_drop")])
    with pytest.raises(RuntimeError, match=r"pair 0: student module 'blocks.0.attn.attn_drop' did not run in this "
                                           r"forward .*set_fused_attn\(False\)"):
        d(c.x, c.y)
