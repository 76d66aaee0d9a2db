"""Tiny random-init student/teacher pairs of real architectures (torchvision, timm, Hugging Face
transformers), built from configs: nothing is downloaded.

They are what the model tests, the README's "Distilling your model" section and
``python -m lwkd_fast.zoo`` (the per-family report of the pairs ``pairs="auto"`` chooses and
whether every method trains) run on.  Each family needs its package (``pip install
"lwkd-fast[dev]"``); :func:`build` imports it only when that family is built.

``build(family)`` returns a :class:`ZooCase`: ``student``, ``teacher`` (eval mode), an input
batch ``x`` (a tensor, or a dict of tensors for the language models) and targets ``y``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

__all__ = ["FAMILIES", "ZooCase", "build"]


@dataclass
class ZooCase:
    family: str
    student: nn.Module
    teacher: nn.Module
    x: Any
    y: torch.Tensor
    note: str


def _images(batch: int, size: int, classes: int = 10, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Token ids and an attention mask whose last sample is right-padded (3 pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3:] = 0
    ids[-1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _tv_resnet():
    from torchvision.models import resnet18, resnet50

    x, y = _images(2, 32)
    return resnet18(num_classes=10), resnet50(num_classes=10), x, y, "torchvision resnet18 <- resnet50, 32x32"


def _tv_mobilenet():
    from torchvision.models import mobilenet_v3_small, resnet18

    x, y = _images(2, 32)
    return (mobilenet_v3_small(num_classes=10), resnet18(num_classes=10), x, y,
            "torchvision mobilenet_v3_small <- resnet18, 32x32")


def _timm_resnet():
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    x, y = _images(2, 32)
    s = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
    t = ResNet(Bottleneck, [2, 2, 2, 2], num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
    return s, t, x, y, "timm ResNet basic [1,1,1,1] <- bottleneck [2,2,2,2], 32x32"


def _timm_convnext():
    from timm.models.convnext import ConvNeXt

    x, y = _images(2, 32)
    s = ConvNeXt(depths=(1, 1, 1, 1), dims=(24, 32, 40, 48), num_classes=10, drop_path_rate=0.1)
    t = ConvNeXt(depths=(2, 2, 2, 2), dims=(32, 40, 56, 64), num_classes=10)
    return s, t, x, y, "timm ConvNeXt depths 1x4 <- 2x4, 32x32 (student drop_path 0.1)"


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    x, y = _images(2, 32)
    kw = dict(img_size=32, patch_size=8, num_classes=10, mlp_ratio=2.0)
    s = VisionTransformer(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1, attn_drop_rate=0.1,
                          proj_drop_rate=0.1, **kw)
    t = VisionTransformer(embed_dim=48, depth=4, num_heads=3, **kw)
    return s, t, x, y, "timm ViT depth 2, width 32 <- depth 4, width 48, 32x32 / patch 8 (student dropouts 0.1)"


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    x, y = _images(2, 32)
    kw = dict(img_size=32, patch_size=4, window_size=2, num_classes=10, mlp_ratio=2.0)
    s = SwinTransformer(embed_dim=20, depths=(1, 1, 1), num_heads=(1, 2, 4), drop_path_rate=0.1, **kw)
    t = SwinTransformer(embed_dim=28, depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0, **kw)
    return s, t, x, y, "timm Swin depths (1,1,1), width 20 <- (2,2,2), width 28, 32x32 / patch 4"


def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    def cfg(width, layers, heads):
        return BertConfig(vocab_size=97, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=2 * width, max_position_embeddings=32, num_labels=3,
                          attn_implementation="eager")

    x = _tokens(2, 12, 97)
    y = torch.tensor([0, 2])
    s = BertForSequenceClassification(cfg(32, 2, 2))
    t = BertForSequenceClassification(cfg(48, 4, 3))
    return s, t, x, y, "HF BertForSequenceClassification 2 layers, width 32 <- 4 layers, width 48, 12 tokens"


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    def cfg(width, layers, heads):
        return GPT2Config(vocab_size=97, n_embd=width, n_layer=layers, n_head=heads, n_positions=32,
                          attn_implementation="eager")

    x = _tokens(2, 12, 97)
    s = GPT2LMHeadModel(cfg(32, 2, 2))
    t = GPT2LMHeadModel(cfg(48, 4, 3))
    return s, t, x, x["input_ids"].clone(), "HF GPT2LMHeadModel 2 layers, width 32 <- 4 layers, width 48, 12 tokens"


FAMILIES: Dict[str, Callable] = {
    "tv_resnet": _tv_resnet,
    "tv_mobilenet": _tv_mobilenet,
    "timm_resnet": _timm_resnet,
    "timm_convnext": _timm_convnext,
    "timm_vit": _timm_vit,
    "timm_swin": _timm_swin,
    "hf_bert": _hf_bert,
    "hf_gpt2": _hf_gpt2,
}


def build(family: str, seed: int = 0) -> ZooCase:
    """Student (train mode), teacher (eval mode), batch and targets of one family."""
    if family not in FAMILIES:
        raise ValueError(f"lwkd_fast.zoo.build: unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        s, t, x, y, note = FAMILIES[family]()
    finally:
        torch.random.set_rng_state(state)
    return ZooCase(family, s.train(), t.eval(), x, y, note)


# ------------------------------------------------------------------------------------------------
# The one-hot view of a language model (the exact maps the sketch projects)
# ------------------------------------------------------------------------------------------------


class OneHotLM(nn.Module):
    """A Hugging Face language model as a function of one-hot tokens (B, T, V): its input
    embeddings are ``onehot @ E``.  Derivative maps with respect to ``onehot`` are the exact maps
    that :func:`lwkd_fast.derivatives.sketched_derivative_maps` projects on its sketch; their
    layer names are the model's with the prefix ``"lm."``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, onehot=None, attention_mask=None):
        return self.lm(inputs_embeds=onehot @ self.lm.get_input_embeddings().weight, attention_mask=attention_mask)


# ------------------------------------------------------------------------------------------------
# The report: `python -m lwkd_fast.zoo [--sketch]`
# ------------------------------------------------------------------------------------------------


def _train_check(c: ZooCase, method: str, steps: int):
    """(status, first loss, last loss) of ``steps`` AdamW steps of ``use="rates+loss"`` on one
    batch (one HVP vector for all steps): "trains" when every loss is finite, every paired
    group's parameters moved and the last loss is below the first."""
    import copy

    import lwkd_fast as lw

    from .derivatives import NotDifferentiableError, replace_hardsigmoid

    def run(student, teacher):
        g = torch.Generator().manual_seed(0)
        d = lw.LayerwiseDistiller(student, teacher, method=method, use="rates+loss", example_input=c.x,
                                  generator=g, sketch_rank=64)
        opt = d.make_optimizer("adamw", lr=1e-3)
        groups = [g_ for g_ in d.parameter_groups() if g_["layer"] is not None]
        start = [[p.detach().clone() for p in g_["params"]] for g_ in groups]
        losses = []
        for _ in range(steps):
            g.manual_seed(0)
            out = d(c.x, c.y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step(out.discrepancies)
            losses.append(float(out.loss.detach()))
        moved = all(any(not torch.equal(s, p.detach()) for s, p in zip(ss, g_["params"]))
                    for ss, g_ in zip(start, groups))
        ok = all(map(lambda v: v == v and abs(v) != float("inf"), losses)) and moved and losses[-1] < losses[0]
        return ("trains" if ok else "does not train"), losses[0], losses[-1]

    student = copy.deepcopy(c.student)
    try:
        return run(student, c.teacher)
    except NotDifferentiableError as exc:
        if "hardsigmoid" not in str(exc):
            raise
        status, first, last = run(replace_hardsigmoid(student), replace_hardsigmoid(copy.deepcopy(c.teacher)))
        return f"{status} after replace_hardsigmoid (no second derivative of Hardsigmoid)", first, last


def families_report(families=None, steps: int = 3, out=print) -> Dict[str, dict]:
    """Per family: the pairs ``pairs="auto"`` chooses and whether each method trains."""
    import time

    from .distill import find_pairs

    results = {}
    for fam in families or FAMILIES:
        c = build(fam)
        pairs, report = find_pairs(c.student, c.teacher, c.x)
        out(f"== {fam}: {c.note}")
        out(report)
        res = {"pairs": pairs, "methods": {}}
        for method in ("attention", "jacobian", "hessian"):
            t0 = time.perf_counter()
            status, first, last = _train_check(c, method, steps)
            res["methods"][method] = {"status": status, "first_loss": first, "last_loss": last}
            out(f"  {method:9s} {status}: loss {first:.4f} -> {last:.4f} in {steps} steps "
                f"({time.perf_counter() - t0:.1f} s)")
        results[fam] = res
    return results


def _gpt2_pair(vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    def cfg(layers, width):
        return GPT2Config(vocab_size=vocab, n_positions=64, n_layer=layers, n_embd=width, n_head=4,
                          bos_token_id=0, eos_token_id=0)

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg(2, 64)).eval(), GPT2LMHeadModel(cfg(4, 128)).eval()
    finally:
        torch.random.set_rng_state(state)


def sketch_accuracy(vocab: int = 1000, ranks=(32, 64, 128, 256, 512), seeds: int = 10, batch: int = 2,
                    length: int = 16, out=print) -> Dict[int, dict]:
    """How well sketched Jacobian maps reproduce the exact one-hot ones on a small vocabulary:
    for each rank r, over ``seeds`` sketches and both layer pairs of a GPT-2 student (2 layers,
    width 64) and teacher (4, 128): the error of the sketched discrepancy D = 2 - 2 cos (metric
    "cos") against the exact one, and the norm ratio |J R| / |J|."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import derivatives as D
    from .ops import map_discrepancy

    import copy

    s, t = _gpt2_pair(vocab)
    close = copy.deepcopy(s)  # a teacher close to the student: its weights perturbed by 3%
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in close.parameters():
            prm.add_(0.03 * prm.std().nan_to_num() * torch.randn(prm.shape, generator=g))
    x = _tokens(batch, length, vocab)
    mask = x["attention_mask"]
    onehot = {"onehot": torch.nn.functional.one_hot(x["input_ids"], vocab).float(), "attention_mask": mask}
    layers_s = ["transformer.h.0", "transformer.h.1"]
    results: Dict[str, Dict[int, dict]] = {}
    for label, teacher, layers_t in (("unrelated teacher (GPT-2 4x128)", t, ["transformer.h.1", "transformer.h.3"]),
                                     ("close teacher (the student, weights +3% noise)", close, layers_s)):
        exact_s = D.input_jacobians(OneHotLM(s), onehot, ["lm." + n for n in layers_s], channel_dim=-1, mask=mask)
        exact_t = D.input_jacobians(OneHotLM(teacher), onehot, ["lm." + n for n in layers_t], channel_dim=-1,
                                    mask=mask)
        d_exact = map_discrepancy(exact_s, exact_t, reduction="none", mask=mask)
        out(f"sketched vs exact one-hot Jacobian maps, student GPT-2 2x64, {label}: V = {vocab}, B x T = {batch} x "
            f"{length}, metric 'cos' (D = 2 - 2 cos), exact D = {d_exact.min():.3f} .. {d_exact.max():.3f}; over "
            f"{seeds} sketches x 2 layer pairs x {batch} samples:")
        out(f"  {'rank r':>7} {'r/V':>6} {'|D_sketch - D_exact| mean':>26} {'max':>7} {'|JR|/|J| mean':>14} {'std':>6}")
        rows = {}
        for r in ranks:
            errs, ratios = [], []
            for seed in range(seeds):
                ss, ts = D.sketched_derivative_maps(s, teacher, x, layers_s, layers_t, rank=r,
                                                    generator=torch.Generator().manual_seed(seed), mask=mask)
                errs.append((map_discrepancy(ss, ts, reduction="none", mask=mask) - d_exact).abs().flatten())
                for a, e in zip(ss + ts, exact_s + exact_t):
                    ratios.append(a.flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1))
            err, ratio = torch.cat(errs), torch.cat(ratios)
            rows[r] = {"d_err_mean": float(err.mean()), "d_err_max": float(err.max()),
                       "norm_ratio_mean": float(ratio.mean()), "norm_ratio_std": float(ratio.std())}
            out(f"  {r:7d} {r / vocab:6.3f} {rows[r]['d_err_mean']:26.4f} {rows[r]['d_err_max']:7.4f} "
                f"{rows[r]['norm_ratio_mean']:14.3f} {rows[r]['norm_ratio_std']:6.3f}")
        results[label] = rows
    return results


def _peak_child(mode: str, vocab: int, batch: int, length: int, rank: int) -> None:
    """Subprocess body: extra resident memory at the peak of one exact / sketched map call."""
    import json

    from . import derivatives as D

    s, t = (m.transformer for m in _gpt2_pair(vocab))  # the bodies: no (B, T, V) logits in the forward
    x = _tokens(batch, length, vocab)
    layers_s, layers_t = ["h.1"], ["h.3"]
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    rss0 = _status_kib("VmRSS")
    if mode == "exact":
        onehot = {"onehot": torch.nn.functional.one_hot(x["input_ids"], vocab).float(),
                  "attention_mask": x["attention_mask"]}
        D.input_jacobians(OneHotLM(s), onehot, ["lm." + n for n in layers_s], channel_dim=-1)
        D.input_jacobians(OneHotLM(t), onehot, ["lm." + n for n in layers_t], channel_dim=-1)
    else:
        D.sketched_derivative_maps(s, t, x, layers_s, layers_t, rank=rank)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - rss0) / 1024.0}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def sketch_memory(vocab: int = 50257, batch: int = 8, length: int = 64, rank: int = 256, out=print) -> dict:
    """Memory of one student + teacher map pair: the sizes of exact one-hot and sketched maps at
    this vocabulary and at a 128k one (B*T = 4096), and the measured peak extra resident memory
    of computing them (Linux; each in a fresh subprocess)."""
    import json
    import subprocess
    import sys

    def gib(n):
        return n * 4 / 2 ** 30

    out("memory per map (float32): exact one-hot B*T*V, sketched B*T*r (+ one (D, r) matrix per model)")
    for bt, v in ((batch * length, vocab), (4096, 128256)):
        out(f"  B*T = {bt}, V = {v}: exact {gib(bt * v):.3f} GiB, sketched r = {rank}: {gib(bt * rank) * 1024:.2f} MiB")
    res = {}
    for mode in ("exact", "sketched"):
        cmd = [sys.executable, "-c", f"from lwkd_fast.zoo import _peak_child; _peak_child({mode!r}, {vocab}, {batch}, "
               f"{length}, {rank})"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"] if proc.returncode == 0 else None
    out(f"  measured peak extra memory of one layer pair's student + teacher Jacobian maps, GPT-2 bodies 2x64 + "
        f"4x128, V = {vocab}, B x T = {batch} x {length}: exact {res['exact']:.0f} MiB, sketched (r = {rank}) "
        f"{res['sketched']:.0f} MiB")
    return res


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lwkd_fast.zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", choices=list(FAMILIES), help="default: all")
    ap.add_argument("--steps", type=int, default=3, help="training steps per method (default 3)")
    ap.add_argument("--sketch", action="store_true", help="only the sketched-map accuracy and memory figures")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.sketch:
        sketch_accuracy()
        sketch_memory()
        return
    families_report(args.families, args.steps)


if __name__ == "__main__":
    main()
