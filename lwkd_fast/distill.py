"""``LayerwiseDistiller``: pairs student and teacher layers, computes the per-layer discrepancies
(attention maps, input Jacobians or Hessian-vector products), builds the loss and the parameter
groups of SPEC section 4, and makes the layer-wise optimizer.

A training loop needs at most these lines::

    d = lw.LayerwiseDistiller(student, teacher, pairs="auto", method="attention", example_input=x0)
    opt = d.make_optimizer("sgd", lr=0.05, momentum=0.9)
    for x, y in loader:
        out = d(x, y)                     # out.loss, out.discrepancies (K,), out.logits
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step(out.discrepancies)       # rates from D on the device, one fused update
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference
from .derivatives import select_output, tap_name

log = logging.getLogger("lwkd_fast")

__all__ = ["LayerwiseDistiller", "DistillOutput", "Layout", "OutputCapture", "Trace", "attention_map_is_flat",
           "auto_pairs", "call_model", "depth_map", "detect_layout", "execution_order_groups", "find_pairs",
           "input_extent", "layout_candidates", "logits_of", "stage_boundaries"]

METHODS = ("attention", "jacobian", "hessian")
USES = ("rates", "rates+loss")


@dataclass
class DistillOutput:
    """What one distillation forward returns.

    ``loss`` is the scalar to backpropagate; ``discrepancies`` the (K,) per-layer D (a device
    tensor, detached); ``logits`` the student's output.  The parts of the loss are kept for logging:
    ``ce`` (cross-entropy), ``kd`` (Hinton KD term, None when ``kd_weight == 0``) and ``match``
    (the weighted discrepancy term, None for ``use="rates"``).  ``found_inf`` is a 0-dim float
    device tensor, 1.0 when the loss is not finite (the optimizer from :meth:`make_optimizer`
    then skips the update).
    """

    loss: torch.Tensor
    discrepancies: torch.Tensor
    logits: torch.Tensor
    ce: torch.Tensor
    kd: Optional[torch.Tensor]
    match: Optional[torch.Tensor]
    found_inf: torch.Tensor


# ------------------------------------------------------------------------------------------------
# Calling models, and what a module returned
# ------------------------------------------------------------------------------------------------


def call_model(model: nn.Module, x):
    """``model(**x)`` for a dict of keyword arguments (Hugging Face inputs), ``model(x)`` otherwise."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def _first_tensor(out):
    t = select_output(out)
    return t if isinstance(t, torch.Tensor) else None


def _batch_size(x) -> int:
    t = x if isinstance(x, torch.Tensor) else next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
    if t is None or t.dim() == 0:
        raise ValueError("LayerwiseDistiller: the input must be a tensor batch or a dict holding tensor batches")
    return int(t.shape[0])


class _temporarily_eval:
    """Evaluate a model in eval mode and restore every module's own training flag after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, f in self.flags:
            m.training = f


Tap = Tuple[str, Optional[Union[int, str]]]


def _tap_str(tap: Tap) -> str:
    return tap_name(*tap)


# ------------------------------------------------------------------------------------------------
# Layouts: where the channels and the locations of an activation are
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """What the input's locations are: ``"grid"`` (an image or signal, spatial size ``size``) or
    ``"sequence"`` (``size = (T,)`` tokens)."""

    kind: str
    size: Tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """Where an activation keeps its channels (``channel_dim``) and what its locations are:
    ``key`` = (kind, extent) is what two models' activations must share to be paired, ``kind`` is
    ``"grid"`` (B, C, *S) / (B, *S, C), ``"tokens"`` (B, N, D) or ``"token_pairs"`` (B, H, T, T)
    (attention probabilities: heads as channels, query x key locations)."""

    channel_dim: int
    kind: str
    extent: Tuple[int, ...]

    @property
    def key(self) -> Tuple[str, Tuple[int, ...]]:
        return (self.kind, self.extent)

    def describe(self) -> str:
        if self.kind == "grid":
            return "x".join(map(str, self.extent)) + (" (channels last)" if self.channel_dim == -1 else "")
        if self.kind == "tokens":
            return f"{self.extent[0]} tokens"
        return f"{self.extent[0]}x{self.extent[0]} token pairs"


def input_extent(x) -> Optional[Extent]:
    """The locations of a model input: token ids (B, T) or a (B, T, D) float sequence give
    ``sequence (T,)``; a (B, C, *S) tensor with at least two spatial dims gives ``grid S``; a dict
    is judged by its ``input_ids`` (else ``pixel_values``, else its first tensor)."""
    if isinstance(x, Mapping):
        for key in ("input_ids", "inputs_embeds", "pixel_values"):
            if isinstance(x.get(key), torch.Tensor):
                return input_extent(x[key])
        t = next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
        return None if t is None else input_extent(t)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    if not x.is_floating_point() and x.dim() == 2:
        return Extent("sequence", (int(x.shape[1]),))
    if x.dim() == 3:
        return Extent("sequence", (int(x.shape[1]),))
    if x.dim() >= 4:
        return Extent("grid", tuple(int(s) for s in x.shape[2:]))
    return None


def _strided(dims: Sequence[int], size: Sequence[int]) -> bool:
    """Whether ``dims`` is ``size`` divided by one integer stride (rounded either way)."""
    if len(dims) != len(size) or any(d < 1 for d in dims):
        return False
    s = max(1, round(size[0] / dims[0]))
    return all(d in (sz // s, -(-sz // s)) for d, sz in zip(dims, size))


def layout_candidates(shape: Sequence[int], extent: Optional[Extent],
                      channel_dim: Optional[int] = None) -> List[Layout]:
    """Every layout an activation of ``shape`` may have for a model whose input has ``extent``
    (empty when it is not a map: fewer than 3 dims, unrelated locations, a single location).

    With ``channel_dim`` given it is used as is.  Otherwise: for a grid input, (B, C, *S) when S
    is the input size divided by one stride, and (B, *S, C) (timm's Swin, ConvNeXt's MLPs) when
    the dims before the channels are -- both when C equals a spatial size; a 3-dim activation of
    an image model is a token sequence (B, N, D) (a vision transformer).  For a sequence input of
    T tokens, (B, T, D) are tokens and (B, H, T, T) token pairs (attention probabilities)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        return []
    if channel_dim is not None:
        cd = channel_dim % len(shape)
        spatial = tuple(s for d, s in enumerate(shape) if d not in (0, cd))
        if extent is not None and extent.kind == "sequence" and spatial == extent.size:
            return [Layout(channel_dim, "tokens", spatial)]
        if extent is not None and extent.kind == "sequence" and spatial == extent.size * 2:
            return [Layout(channel_dim, "token_pairs", extent.size)]
        if len(spatial) == 1 and cd == len(shape) - 1:
            return [Layout(channel_dim, "tokens", spatial)] if spatial[0] > 1 else []
        return [Layout(channel_dim, "grid", spatial)] if math.prod(spatial) > 1 else []
    if extent is None:
        return []
    if extent.kind == "sequence":
        T = extent.size[0]
        if len(shape) == 3 and shape[1] == T and T > 1:
            return [Layout(-1, "tokens", (T,))]
        if len(shape) == 4 and shape[2] == shape[3] == T and T > 1:
            return [Layout(1, "token_pairs", (T,))]
        return []
    n = len(extent.size)
    if len(shape) == n + 2:
        return [Layout(cd, "grid", tuple(dims)) for cd, dims in ((1, shape[2:]), (-1, shape[1:-1]))
                if _strided(dims, extent.size) and math.prod(dims) > 1]
    if len(shape) == 3 and n >= 2 and shape[1] > 1:
        return [Layout(-1, "tokens", (shape[1],))]
    return []


def detect_layout(shape: Sequence[int], extent: Optional[Extent], channel_dim: Optional[int] = None,
                  prefer: Optional[int] = None) -> Optional[Layout]:
    """The layout of an activation (:func:`layout_candidates`); when both channel positions fit,
    ``prefer`` (1 or -1) decides, else None (ambiguous)."""
    cands = layout_candidates(shape, extent, channel_dim)
    if len(cands) == 2 and prefer is not None:
        cands = [c for c in cands if c.channel_dim == prefer]
    return cands[0] if len(cands) == 1 else None


def _channel_convention(m: nn.Module) -> Optional[int]:
    """Where a module type keeps channels: first for convolutions and batch/group/instance norms,
    last for linear layers and LayerNorm; None when its type does not say (containers)."""
    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                      nn.modules.instancenorm._InstanceNorm)):
        return 1
    if isinstance(m, (nn.Linear, nn.LayerNorm)):
        return -1
    return None


FLAT_TOL = 1e-3


def attention_map_is_flat(t: torch.Tensor, channel_dim: int, p: float = 2.0, tol: float = FLAT_TOL) -> bool:
    """Whether every sample's attention map is constant over its locations -- standard deviation
    at most ``tol`` times the mean -- or zero: after a LayerNorm over channels each location's
    energy is ~1, so attention discrepancies are ~0 and Jacobian maps of the energy are rounding
    noise."""
    with torch.no_grad():
        a = reference.attention_maps(t.detach(), p=p, channel_dim=channel_dim)
        if a.shape[1] < 2 or not bool(torch.isfinite(a).all()):
            return False
        std, mean = a.std(1, correction=0), a.mean(1)
        return bool((std <= tol * mean).all()) or bool((mean == 0).all())


# ------------------------------------------------------------------------------------------------
# Tracing one forward pass
# ------------------------------------------------------------------------------------------------

# modules whose output is (in eval mode) their input: never a pairing target of their own
PASS_THROUGH = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                "FeatureAlphaDropout", "DropPath", "StochasticDepth", "DropBlock2d", "Flatten")


@dataclass
class _Rec:
    name: str
    cls: str
    calls: int = 0
    order: int = -1                    # completion order of the last call
    shape: Optional[Tuple[int, ...]] = None
    layout: Optional[Layout] = None
    flat: bool = False
    in_ptr: Optional[int] = None
    out_ptr: Optional[int] = None
    options: List[Tuple[Layout, bool]] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return self.calls == 1 and self.layout is not None and not self.flat and self.cls not in PASS_THROUGH


def _first_arg(args, kwargs) -> Optional[torch.Tensor]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


class Trace:
    """Every sub-module's calls, output shape, layout and flatness on one forward pass of ``x``
    (eval mode, no grad, the model's flags restored)."""

    def __init__(self, model: nn.Module, x, *, channel_dim: Optional[int] = None, p: float = 2.0):
        self.model, self.extent = model, input_extent(x)
        self.batch = _batch_size(x)
        self.recs: Dict[str, _Rec] = {n: _Rec(n, type(m).__name__) for n, m in model.named_modules() if n}
        self.children: Dict[str, List[str]] = {}
        for n in self.recs:
            self.children.setdefault(n.rpartition(".")[0], []).append(n)
        handles, counter = [], [0]
        for name, m in model.named_modules():
            if not name:
                continue
            rec = self.recs[name]

            def pre(mod, args, kwargs, rec=rec):
                a = _first_arg(args, kwargs)
                rec.in_ptr = None if a is None else a.data_ptr()

            def post(mod, args, kwargs, out, rec=rec):
                rec.calls += 1
                rec.order = counter[0]
                counter[0] += 1
                t = _first_tensor(out)
                if t is None:
                    return
                rec.shape, rec.out_ptr = tuple(t.shape), t.data_ptr()
                rec.layout, rec.options = None, []
                if t.shape[0] == self.batch and t.is_floating_point():
                    cands = layout_candidates(t.shape, self.extent, channel_dim)
                    convention = _channel_convention(mod)
                    if len(cands) == 2 and convention is not None:
                        cands = [c for c in cands if c.channel_dim == convention]
                    # (layout, flat) per candidate; two of them are resolved after the pass
                    rec.options = [(c, attention_map_is_flat(t, c.channel_dim, p)) for c in cands]
                    if len(rec.options) == 1:
                        rec.layout, rec.flat = rec.options[0]

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        try:
            with torch.no_grad(), _temporarily_eval(model):
                call_model(model, x)
        finally:
            for h in handles:
                h.remove()
        self._resolve_ambiguous()

    def _resolve_ambiguous(self) -> None:
        """Channel positions of activations whose channel count equals a spatial size: those of
        the module that produced the same tensor (a container's last part) or this module's
        input of the same shape (an elementwise activation), else the model's majority."""
        by_ptr: Dict[int, List[_Rec]] = {}
        done = [r for r in self.recs.values() if r.layout is not None and r.layout.kind == "grid"]
        votes = [r.layout.channel_dim for r in done]
        majority = max(set(votes), key=votes.count) if votes else None
        for r in sorted(self.recs.values(), key=lambda r: r.order):
            if len(r.options) == 2:
                source = [q for q in by_ptr.get(r.out_ptr, []) + by_ptr.get(r.in_ptr, [])
                          if q.layout is not None and q.shape == r.shape]
                cd = source[-1].layout.channel_dim if source else majority
                for layout, flat in r.options:
                    if layout.channel_dim == cd:
                        r.layout, r.flat = layout, flat
            if r.out_ptr is not None:
                by_ptr.setdefault(r.out_ptr, []).append(r)

    def ran(self, name: str) -> bool:
        return name == "" or self.recs[name].calls > 0

    def kids(self, name: str) -> List[str]:
        """The sub-modules that ran as parts of ``name``, in completion order; the children of a
        container that never ran itself (a ModuleList) count as children of its parent."""
        out = []
        for c in self.children.get(name, []):
            if self.recs[c].calls > 0:
                out.append(c)
            else:
                out.extend(self.kids(c))
        return sorted(out, key=lambda n: self.recs[n].order)

    def key(self, name: str):
        rec = self.recs.get(name)
        return None if rec is None or rec.layout is None else rec.layout.key

    def descendants(self, name: str) -> List[str]:
        pre = name + "."
        return sorted((n for n, r in self.recs.items() if n.startswith(pre) and r.calls > 0),
                      key=lambda n: self.recs[n].order)

    # -- the main path ------------------------------------------------------------------------------

    def spine(self, name: str = "") -> List[str]:
        """The modules along the forward's main path, in order: a module is split into its parts
        when it is the model, when its parts produce other location sizes than its own output (a
        container of stages such as ``features`` / ``stages`` / ``layers``), or when it is not a
        map itself but its parts produce maps of two or more sizes (a backbone returning pooled
        features); otherwise it stands for all of them (a stage, a block, a head)."""
        kids = self.kids(name)
        if not kids:
            return [name] if name else []
        own = self.key(name) if name else None
        kid_keys = {self.key(k) for k in kids} - {None}
        if name and (kid_keys <= {own} or (own is None and len(kid_keys) < 2)):
            return [name]
        out: List[str] = []
        for k in kids:
            out.extend(self.spine(k))
        return out

    def tap_in(self, names: Sequence[str], key) -> Tuple[Optional[str], List[str]]:
        """The last eligible module among ``names`` (latest first) with location key ``key``; a
        flat one is passed over for its own last eligible part of that key (a post-LayerNorm
        block: its last non-flat sub-module).  Returns (name or None, the flat modules skipped)."""
        skipped = []
        for n in reversed(names):
            rec = self.recs[n]
            if rec.layout is None or rec.layout.key != key:
                continue
            if rec.eligible:
                return n, skipped
            if rec.flat:
                skipped.append(n)
                for d in reversed(self.descendants(n)):
                    if self.recs[d].eligible and self.recs[d].layout.key == key:
                        return d, skipped
        return None, skipped

    def stack(self, key) -> List[str]:
        """The longest chain of sibling blocks of one class whose locations have ``key``: each ran
        once, all outputs have one shape, and each block's input is the previous one's output
        (transformer blocks; q/k/v projections share an input and do not chain)."""
        best: List[str] = []
        for parent in list(self.children):
            sibs = [c for c in self.children[parent]  # blocks: composite modules that ran once
                    if self.recs[c].calls == 1 and self.key(c) == key and self.children.get(c)]
            sibs.sort(key=lambda n: self.recs[n].order)
            run: List[str] = []
            for c in sibs:
                prev = self.recs[run[-1]] if run else None
                r = self.recs[c]
                if prev is not None and r.cls == prev.cls and r.shape == prev.shape and r.in_ptr == prev.out_ptr:
                    run.append(c)
                else:
                    if len(run) > len(best) or (len(run) == len(best) and run and best and
                                                 run[0].count(".") < best[0].count(".")):
                        best = run
                    run = [c]
            if len(run) > len(best) or (len(run) == len(best) and run and best and
                                         run[0].count(".") < best[0].count(".")):
                best = run
        return best if len(best) >= 2 else []


# ------------------------------------------------------------------------------------------------
# Automatic pairing
# ------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One matched layer pair: the two taps, their layouts, and why it was chosen."""

    student: Tap
    teacher: Tap
    student_layout: Optional[Layout] = None
    teacher_layout: Optional[Layout] = None
    why: str = ""


def depth_map(n_student: int, n_teacher: int) -> List[Tuple[int, int]]:
    """Block pairs of two stacks: student block i <-> teacher block round((i+1) Lt/Ls) - 1 when the
    student is shallower, the mirror image otherwise; min(Ls, Lt) pairs, all distinct."""
    if n_student <= n_teacher:
        return [(i, math.floor((i + 1) * n_teacher / n_student + 0.5) - 1) for i in range(n_student)]
    return [(math.floor((j + 1) * n_student / n_teacher + 0.5) - 1, j) for j in range(n_teacher)]


def _segments(tr: Trace) -> "OrderedDict[Any, List[str]]":
    """Spine modules grouped by location key, in order of first appearance."""
    seg: "OrderedDict[Any, List[str]]" = OrderedDict()
    for n in tr.spine():
        k = tr.key(n)
        if k is not None:
            seg.setdefault(k, []).append(n)
    return seg


def _describe(tr: Trace, name: str) -> str:
    return f"{name!r} {tr.recs[name].shape}"


def auto_pairs(student: nn.Module, teacher: nn.Module, x, *, channel_dim: Optional[int] = None,
               teacher_channel_dim: Optional[int] = None, p: float = 2.0) -> Tuple[List[Pair], str]:
    """The pairs ``pairs="auto"`` chooses, and the report that says why (see :func:`find_pairs`)."""
    ts = Trace(student, x, channel_dim=channel_dim, p=p)
    tt = Trace(teacher, x, channel_dim=channel_dim if teacher_channel_dim is None else teacher_channel_dim, p=p)
    seg_s, seg_t = _segments(ts), _segments(tt)
    pairs: List[Pair] = []
    notes: List[str] = []
    flat_noted = set()

    def note_flat(tr, who, names):
        for n in names:
            if (who, n) not in flat_noted:
                flat_noted.add((who, n))
                notes.append(f"  passed over {who} {n!r}: flat attention map (constant energy over its locations, "
                             "e.g. after a LayerNorm over channels)")

    for key, s_names in seg_s.items():
        if key not in seg_t:
            continue
        t_names = seg_t[key]
        note_flat(ts, "student", [n for n in s_names if ts.recs[n].flat])
        note_flat(tt, "teacher", [n for n in t_names if tt.recs[n].flat])
        st_s, st_t = (ts.stack(key), tt.stack(key)) if key[0] != "grid" else ([], [])
        if st_s and st_t:
            for i, j in depth_map(len(st_s), len(st_t)):
                a, fa = ts.tap_in([st_s[i]], key)
                b, fb = tt.tap_in([st_t[j]], key)
                note_flat(ts, "student", fa)
                note_flat(tt, "teacher", fb)
                if a is None or b is None:
                    continue
                sub = "" if (a, b) == (st_s[i], st_t[j]) else \
                    " (a flat block output is replaced by its last non-flat part)"
                why = (f"block {i + 1} of {len(st_s)} <-> block {j + 1} of {len(st_t)} of the {key[1][0]}-token "
                       f"stacks, teacher block round((i+1)*{max(len(st_s), len(st_t))}/"
                       f"{min(len(st_s), len(st_t))})-1{sub}")
                pairs.append(Pair((a, None), (b, None), ts.recs[a].layout, tt.recs[b].layout, why))
            continue
        a, fa = ts.tap_in(s_names, key)
        b, fb = tt.tap_in(t_names, key)
        note_flat(ts, "student", fa)
        note_flat(tt, "teacher", fb)
        if a is None or b is None:
            continue
        why = f"last once-run output at {ts.recs[a].layout.describe()} in both models"
        pairs.append(Pair((a, None), (b, None), ts.recs[a].layout, tt.recs[b].layout, why))
    head = (f"LayerwiseDistiller: pairs='auto' ({type(student).__name__} <- {type(teacher).__name__}): stage outputs "
            "matched by location size, blocks of token stacks matched by depth; never a module that runs more "
            "than once or whose attention map is flat")
    lines = [f"  pair {k}: student {_describe(ts, pr.student[0])} <-> teacher {_describe(tt, pr.teacher[0])}: {pr.why}"
             for k, pr in enumerate(pairs)]
    unmatched_s = [f"{n} ({ts.recs[n].layout.describe()})" for k, v in seg_s.items() if k not in seg_t for n in v[-1:]]
    if unmatched_s:
        notes.append("  no teacher stage of the same size for student " + ", ".join(unmatched_s))
    if not pairs:
        cand_s = ", ".join(f"{n} {ts.recs[n].shape}" for v in seg_s.values() for n in v[-1:]) or "none"
        cand_t = ", ".join(f"{n} {tt.recs[n].shape}" for v in seg_t.values() for n in v[-1:]) or "none"
        raise ValueError(
            "LayerwiseDistiller: pairs='auto' found no student and teacher stage boundaries with the same "
            f"location size. Student candidates: {cand_s}. Teacher candidates: {cand_t}."
            + ("\n" + "\n".join(notes) if notes else "")
            + "\nPass explicit pairs=[(student_name, teacher_name), ...] (with resize='pool' for different sizes)."
        )
    return pairs, "\n".join([head] + lines + notes)


def find_pairs(student: nn.Module, teacher: nn.Module, x, *, channel_dim: Optional[int] = None,
               teacher_channel_dim: Optional[int] = None, p: float = 2.0) -> Tuple[List[Tuple[str, str]], str]:
    """Pair student and teacher layers automatically: ``(pairs, report)``.

    One forward pass of each model (eval mode, no grad) finds the main path of the forward
    (:meth:`Trace.spine`: stage containers are split into their stages, a stage stands for its
    blocks) and each activation's layout (:func:`detect_layout`).  For every location size both
    models produce (in the student's order): the last module of that size on the path that runs
    exactly once, is not a pass-through (Identity, Dropout, DropPath, ...) and whose attention
    map is not flat (:func:`attention_map_is_flat`; a flat block output is replaced by its last
    non-flat part).  Where both models hold a stack of transformer blocks at that size, block i of
    the shallower stack is paired with block round((i+1) L_deep / L_shallow) - 1 of the deeper one
    instead.  ``report`` lists the pairs and why each was chosen, and what was passed over.
    ``channel_dim`` / ``teacher_channel_dim`` force a layout instead of detecting it.
    """
    pairs, report = auto_pairs(student, teacher, x, channel_dim=channel_dim, teacher_channel_dim=teacher_channel_dim,
                               p=p)
    return [(pr.student[0], pr.teacher[0]) for pr in pairs], report


def stage_boundaries(model: nn.Module, x, *, channel_dim: Optional[int] = None) -> "OrderedDict[Tuple[int, ...], Tuple[str, Tuple[int, ...]]]":
    """The stage output of each location size on the model's main path, in execution order:
    ``{S: (name, shape)}`` with S the spatial size (``(N,)`` for tokens), chosen as in
    :func:`find_pairs` (run once, not a pass-through, not flat)."""
    tr = Trace(model, x, channel_dim=channel_dim)
    out: "OrderedDict[Tuple[int, ...], Tuple[str, Tuple[int, ...]]]" = OrderedDict()
    for key, names in _segments(tr).items():
        n, _flat = tr.tap_in(names, key)
        if n is not None:
            out[key[1] if key[0] != "token_pairs" else key[1] * 2] = (n, tr.recs[n].shape)
    return out


def _resolve(model: nn.Module, name: str, who: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        cands = [n for n, m in model.named_modules() if n]
        shown = ", ".join(cands[:40]) + (" ..." if len(cands) > 40 else "")
        raise ValueError(f"LayerwiseDistiller: {who} has no module named {name!r}; available: {shown}")
    return modules[name]


def execution_order_groups(student: nn.Module, layers: Sequence[str], x, *,
                           op: str = "LayerwiseDistiller", stacklevel: int = 2) -> List[List[int]]:
    """The parameter groups of SPEC section 4 as index lists into ``list(student.parameters())``.

    ``layers`` are the K matched student module names (in the order of D).  Group j (j < K) holds
    the parameters of the modules that start after matched layer j-1 finished and no later than
    matched layer j finishes (forward-execution order on one pass of ``x``, eval mode, no grad, no
    state change); group K (the head) holds the rest, including modules that never ran.  Every
    parameter appears exactly once; groups may be empty.  ``op`` names the caller in the warning
    issued when the layers do not run in the given order.  ``x`` may be a dict of keyword
    arguments (``student(**x)``).
    """
    K = len(layers)
    matched: Dict[str, List[int]] = {}
    for j, s in enumerate(layers):
        matched.setdefault(s, []).append(j)
    events: List[Tuple[str, Any]] = []
    handles = []
    modules = dict(student.named_modules())
    for name, m in modules.items():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: events.append(("start", name))))
        if name in matched:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, js=matched[name]: events.extend(("end", j) for j in js)))
    try:
        with torch.no_grad(), _temporarily_eval(student):
            call_model(student, x)
    finally:
        for h in handles:
            h.remove()
    ends = [e for kind, e in events if kind == "end"]
    if ends != sorted(ends):
        warnings.warn(f"{op}: the matched student layers do not run in the order of `pairs`; "
                      "parameter groups follow the execution order", stacklevel=stacklevel)
    group_of_module: Dict[str, int] = {}
    current = 0
    for kind, e in events:
        if kind == "end":
            current = max(current, e + 1)
        elif e not in group_of_module:
            group_of_module[e] = current if current < K else K
    params = list(student.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    groups: List[List[int]] = [[] for _ in range(K + 1)]
    seen = set()
    for name, m in modules.items():
        g = group_of_module.get(name, K)  # never executed: head
        for p_ in m.parameters(recurse=False):
            if id(p_) in seen:
                continue
            seen.add(id(p_))
            groups[g].append(index[id(p_)])
    return groups


# ------------------------------------------------------------------------------------------------
# Capturing what the paired modules returned
# ------------------------------------------------------------------------------------------------


def _did_not_run(who: str, tap: Tap, j: int) -> str:
    return (f"LayerwiseDistiller: pair {j}: {who} module {_tap_str(tap)!r} did not run in this forward (its forward "
            "hook never fired), so it has no output to match; fused kernels skip some modules -- e.g. timm's "
            "attention calls scaled_dot_product_attention and never runs 'attn_drop' "
            "(timm.layers.set_fused_attn(False) before building the model runs it) -- pair another module")


class OutputCapture:
    """Forward hooks that take what each tapped module returned, copying only when needed.

    A module's output may be modified in place later in the same forward (``out += identity``,
    ``ReLU(inplace=True)``); the matched value must be what the module returned.  The first
    forward in each mode (train / eval) copies every output and learns, from the tensors' version
    counters, which ones the forward modifies afterwards; later forwards copy only those and check
    the version counters of the others (a host-side integer compare, no device sync).  An output
    modified unexpectedly later (data-dependent in-place ops) raises instead of being used.
    """

    def __init__(self, model: nn.Module, taps: Sequence[Tap], who: str):
        self.model, self.taps, self.who = model, list(taps), who
        self.copied: Dict[bool, set] = {}
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n, _ in self.taps}

    def run(self, forward: Callable[[], Any]) -> Tuple[Any, List[Any]]:
        """``(forward(), [output of each tap])`` with the hooks in place during ``forward``."""
        mode = self.model.training
        learned = self.copied.get(mode)
        feats: List[Any] = [None] * len(self.taps)
        ran = [False] * len(self.taps)
        watch: Dict[int, Tuple[torch.Tensor, int]] = {}

        def hook_for(name):
            wanted = [(j, index) for j, (n, index) in enumerate(self.taps) if n == name]

            def hook(_mod, _inp, out):
                for j, index in wanted:
                    ran[j] = True
                    t = select_output(out, index)
                    if not isinstance(t, torch.Tensor):
                        feats[j] = t
                        continue
                    copy = learned is None or j in learned
                    feats[j] = t.clone() if copy else t
                    if learned is None or not copy:
                        watch[j] = (t, t._version)

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]
        try:
            result = forward()
        finally:
            for h in handles:
                h.remove()
        for j, did in enumerate(ran):
            if not did:
                raise RuntimeError(_did_not_run(self.who, self.taps[j], j))
        changed = {j for j, (t, version) in watch.items() if t._version != version}
        if learned is None:
            self.copied[mode] = changed
        elif changed:
            j = min(changed)
            raise RuntimeError(
                f"LayerwiseDistiller: pair {j}: the output of {self.who} module {_tap_str(self.taps[j])!r} was "
                f"modified in place later in this forward, which the first forward in "
                f"{'train' if mode else 'eval'} mode did not do (data-dependent in-place operations?); its value "
                "is no longer what the module returned. Pair another module or avoid the in-place operation")
        return result, feats


# ------------------------------------------------------------------------------------------------
# Models as they come: logits, tasks, masks
# ------------------------------------------------------------------------------------------------

TASKS = ("auto", "classification", "tokens", "causal_lm")


def logits_of(out, fn: Optional[Callable] = None) -> torch.Tensor:
    """The logits in a model's output: ``fn(out)`` when given; else the output itself when it is a
    tensor, its ``"logits"`` entry when it is a dict or ``ModelOutput``, the first tensor of a
    tuple/list."""
    if fn is not None:
        t = fn(out)
    elif isinstance(out, torch.Tensor):
        t = out
    elif isinstance(out, Mapping) and "logits" in out:
        t = out["logits"]
    elif isinstance(out, (tuple, list)):
        t = next((o for o in out if isinstance(o, torch.Tensor)), None)
    else:
        t = None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"LayerwiseDistiller: cannot find the logits in the model output ({type(out).__name__}); "
                        "pass logits=callable(output) -> tensor")
    return t


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _token_mask(x) -> Optional[torch.Tensor]:
    m = x.get("attention_mask") if isinstance(x, Mapping) else None
    return None if m is None else m != 0


# ------------------------------------------------------------------------------------------------
# The distiller
# ------------------------------------------------------------------------------------------------


def _as_pair_tap(k: int, side: str, v) -> Tap:
    if isinstance(v, str):
        return (v, None)
    if (isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], str)
            and isinstance(v[1], (int, str)) and not isinstance(v[1], bool)):
        return (v[0], v[1])
    raise ValueError(f"LayerwiseDistiller: pairs[{k}] {side} must be a module name or a (module name, output index) "
                     f"pair, got {v!r}")


class LayerwiseDistiller(nn.Module):
    """Layer-wise knowledge distillation with per-layer learning rates (Kokane, Uddin & Xu 2024).

    Args:
        student, teacher: the two models, called as ``model(x)`` or, for a dict batch,
            ``model(**x)`` (e.g. Hugging Face ``input_ids`` / ``attention_mask``).  The teacher is a
            frozen constant: evaluated in eval mode (a teacher left in train mode triggers a warning
            and is switched to eval) and never receives gradients.
        pairs: ``"auto"`` (see :func:`find_pairs`: stage outputs matched by location size, token
            blocks by depth; needs ``example_input`` or happens on the first forward, and
            ``pairs_report`` says what was chosen and why) or a list of ``(student, teacher)``
            pairs, each side a module name as ``named_modules()`` gives it or ``(name, index)`` for
            element ``index`` of a tuple/dict output (e.g. the attention probabilities of a
            Hugging Face eager attention module, index 1).
        method: ``"attention"`` (attention maps of the paired activations), ``"jacobian"`` (input
            Jacobians of a per-sample probe of each paired layer) or ``"hessian"`` (Hessian-vector
            products with a Rademacher v shared by student and teacher).  With token-id inputs
            the derivative maps are sketched (:func:`lwkd_fast.derivatives.sketched_derivative_maps`,
            rank ``sketch_rank``).
        metric: ``"at"`` / ``"jsd"`` for attention (default ``"at"``), ``"cos"`` / ``"jsd"`` for
            derivative maps (default ``"cos"``).
        probe: the per-sample scalar of SPEC section 3 for derivative methods (``"energy"``,
            ``"max"``, ``"logit"`` or a callable).
        use: ``"rates"``: D only drives the layer-wise rates (the loss is the base loss);
            ``"rates+loss"``: ``sum_j weights[j] * D_j`` is also added to the loss.
        weights: per-layer weights of the matching term (default 1 each).
        kd_weight, temperature: Hinton KD; the base loss is
            ``(1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher || student)``.
        task: what the logits predict: ``"classification"`` (logits (B, C), targets (B,)),
            ``"tokens"`` (logits (B, T, C), targets (B, T)), ``"causal_lm"`` (logits (B, T, V);
            position t predicts target t+1, targets default to the input ids) or ``"auto"``:
            2-dim logits classify, 3-dim logits are ``"causal_lm"`` for a student whose class name
            ends in ``ForCausalLM`` / ``LMHeadModel`` and ``"tokens"`` otherwise.  Token losses
            skip targets equal to -100 and padded positions (``attention_mask`` 0).
        logits: ``callable(output) -> tensor`` taking the logits from a model's output; by
            default the output itself, its ``"logits"`` entry (dicts, ``ModelOutput``) or the first
            tensor of a tuple.
        p, beta, normalize, tau, resize: as in :func:`lwkd_fast.attention_discrepancy`.
        channel_dim, teacher_channel_dim: where the channels are in the paired activations; None
            (default) detects each pair's layout (:func:`detect_layout`: (B, C, *S), channels-last
            grids, (B, N, D) tokens, (B, H, T, T) attention probabilities).
        strategy, generator, chunk_size: derivative strategy, the generator of the HVP vectors
            (and of the token sketch), and the vmap/batched chunk size (see
            :mod:`lwkd_fast.derivatives`).
        sketch_rank: the rank r of the sketched token maps (token-id inputs only).
        example_input: a batch used once to resolve the pairs, their layouts and the parameter
            groups.

    Token maps (tokens and token pairs of a token-id input) take the batch's ``attention_mask``:
    padded tokens count neither in the attention discrepancies (``mask=``), the probes, nor the
    derivative maps.  Pairs whose attention map is flat on the example batch (e.g. right after a
    LayerNorm over channels) are flagged with one warning each.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Union[str, Sequence[Tuple[Any, Any]]] = "auto",
        *,
        method: str = "attention",
        metric: Optional[str] = None,
        probe: Any = "energy",
        use: str = "rates",
        weights: Optional[Sequence[float]] = None,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        task: str = "auto",
        logits: Optional[Callable[[Any], torch.Tensor]] = None,
        p: float = 2.0,
        beta: float = 0.5,
        normalize: str = "sum",
        tau: float = 1.0,
        resize: Optional[str] = None,
        channel_dim: Optional[int] = None,
        teacher_channel_dim: Optional[int] = None,
        strategy: str = "auto",
        generator: Optional[torch.Generator] = None,
        chunk_size: Optional[int] = None,
        sketch_rank: int = 256,
        example_input: Any = None,
    ) -> None:
        super().__init__()
        name = "LayerwiseDistiller"
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError(f"{name}: student and teacher must be nn.Module instances")
        if method not in METHODS:
            raise ValueError(f"{name}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if use not in USES:
            raise ValueError(f"{name}: unknown use {use!r}; expected 'rates' or 'rates+loss'")
        if task not in TASKS:
            raise ValueError(f"{name}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if logits is not None and not callable(logits):
            raise TypeError(f"{name}: logits must be a callable(output) -> tensor, got {type(logits).__name__}")
        metric = metric or ("at" if method == "attention" else "cos")
        allowed = ("at", "jsd") if method == "attention" else ("cos", "jsd")
        if metric not in allowed:
            raise ValueError(f"{name}: metric {metric!r} does not apply to method {method!r}; expected one of {allowed}")
        if not 0.0 <= float(kd_weight) <= 1.0:
            raise ValueError(f"{name}: kd_weight must lie in [0, 1], got {kd_weight}")
        if not float(temperature) > 0:
            raise ValueError(f"{name}: temperature must be positive, got {temperature}")
        for arg, cd in (("channel_dim", channel_dim), ("teacher_channel_dim", teacher_channel_dim)):
            if cd is not None and (isinstance(cd, bool) or not isinstance(cd, int)):
                raise TypeError(f"{name}: {arg} must be None (detect) or an int, got {type(cd).__name__}")
        self.student = student
        self.teacher = teacher
        self.method, self.metric, self.probe, self.use = method, metric, probe, use
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)
        self.task, self.logits_fn = task, logits
        self.p, self.beta, self.normalize, self.tau, self.resize = float(p), float(beta), normalize, float(tau), resize
        self.channel_dim = channel_dim
        self.teacher_channel_dim = channel_dim if teacher_channel_dim is None else teacher_channel_dim
        self.strategy, self.generator, self.chunk_size, self.sketch_rank = strategy, generator, chunk_size, sketch_rank
        self._weights_arg = weights
        self.pairs: Optional[List[Tuple[Any, Any]]] = None
        self._pairs: Optional[List[Pair]] = None
        self.pairs_report = ""
        self._groups: Optional[List[List[int]]] = None  # parameter indices per group (K groups + head)
        self._captures: Optional[Tuple[OutputCapture, OutputCapture]] = None
        self._warned_teacher = False
        # the last forward's outputs that an attached optimizer reads (LayerwiseSGD.attach):
        # the (K,) discrepancies and the 0-dim float32 "loss was not finite" flag
        self.latest_discrepancies: Optional[torch.Tensor] = None
        self.found_inf: Optional[torch.Tensor] = None
        self.register_buffer("nonfinite_losses", torch.zeros((), dtype=torch.int64), persistent=True)
        for p_ in self.teacher.parameters():
            p_.requires_grad_(False)
        if pairs != "auto":
            self._set_pairs(pairs)
        if example_input is not None:
            self._resolve(example_input)

    # ---- pairs ---------------------------------------------------------------------------------
    def _set_pairs(self, pairs) -> None:
        if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)) or not pairs:
            raise ValueError("LayerwiseDistiller: pairs must be 'auto' or a non-empty list of "
                             "(student_module_name, teacher_module_name) pairs")
        out = []
        for k, pr in enumerate(pairs):
            if not (isinstance(pr, (tuple, list)) and len(pr) == 2):
                raise ValueError(f"LayerwiseDistiller: pairs[{k}] must be a (student_name, teacher_name) pair, got {pr!r}")
            s, t = _as_pair_tap(k, "student side", pr[0]), _as_pair_tap(k, "teacher side", pr[1])
            _resolve(self.student, s[0], "the student")
            _resolve(self.teacher, t[0], "the teacher")
            out.append(Pair(s, t))
        self._pairs = out
        self.pairs = [(tuple(pr[0]) if not isinstance(pr[0], str) else pr[0],
                       tuple(pr[1]) if not isinstance(pr[1], str) else pr[1]) for pr in pairs]
        self._check_weights()

    def _resolve(self, x) -> None:
        """Once, on the first batch: the pairs (``"auto"``) or the explicit pairs' layouts (with
        a warning per flat pair), the captures and the parameter groups."""
        if self._pairs is None:
            found, report = auto_pairs(self.student, self.teacher, x, channel_dim=self.channel_dim,
                                       teacher_channel_dim=self.teacher_channel_dim, p=self.p)
            self._pairs, self.pairs_report = found, report
            self.pairs = [(pr.student[0], pr.teacher[0]) for pr in found]
            log.info(report)
            self._check_weights()
        elif any(pr.student_layout is None for pr in self._pairs):
            self._explicit_layouts(x)
        self._captures = (OutputCapture(self.student, [pr.student for pr in self._pairs], "student"),
                          OutputCapture(self.teacher, [pr.teacher for pr in self._pairs], "teacher"))
        if self._groups is None:
            self._groups = execution_order_groups(self.student, [pr.student[0] for pr in self._pairs], x,
                                                  stacklevel=5)

    def _explicit_layouts(self, x) -> None:
        extent = input_extent(x)
        lines = []
        for who, model, cd, side in (("student", self.student, self.channel_dim, 0),
                                     ("teacher", self.teacher, self.teacher_channel_dim, 1)):
            taps = [pr.student if side == 0 else pr.teacher for pr in self._pairs]
            with _temporarily_eval(model), torch.no_grad():
                _out, feats = OutputCapture(model, taps, who).run(lambda: call_model(model, x))
            for j, (tap, f) in enumerate(zip(taps, feats)):
                if not isinstance(f, torch.Tensor) or not f.is_floating_point():
                    raise TypeError(f"LayerwiseDistiller: pair {j}: {who} module {_tap_str(tap)!r} returned "
                                    f"{type(f).__name__}, not a floating tensor; pair (name, index) to take one "
                                    "element of a tuple or dict output")
                layout = detect_layout(f.shape, extent, cd)
                if layout is None:
                    layout = Layout(1 if cd is None else cd, "grid", tuple(f.shape[2:]))
                pr = self._pairs[j]
                if side == 0:
                    pr.student_layout = layout
                else:
                    pr.teacher_layout = layout
                if f.dim() >= 2 and attention_map_is_flat(f, layout.channel_dim, self.p):
                    warnings.warn(
                        f"LayerwiseDistiller: pair {j}: the {who}'s {_tap_str(tap)!r} {tuple(f.shape)} has a flat "
                        f"attention map (every location carries the same energy to within {FLAT_TOL:g}, e.g. right "
                        "after a LayerNorm over channels): attention discrepancies of it are ~0, and Jacobian/HVP "
                        "maps of its energy are rounding noise that the 'cos' metric turns into D ~ 2 with huge "
                        "gradients. Pair another layer (pairs='auto' avoids flat ones) or use another probe",
                        stacklevel=5)
        for k, pr in enumerate(self._pairs):
            lines.append(f"  pair {k}: student {_tap_str(pr.student)!r} ({pr.student_layout.describe()}) <-> "
                         f"teacher {_tap_str(pr.teacher)!r} ({pr.teacher_layout.describe()})")
        self.pairs_report = "LayerwiseDistiller: explicit pairs:\n" + "\n".join(lines)

    def _check_weights(self) -> None:
        K = len(self._pairs)
        w = self._weights_arg
        if w is None:
            self._weights = None
            return
        w = torch.as_tensor(w, dtype=torch.float32).flatten()
        if w.numel() != K:
            raise ValueError(f"LayerwiseDistiller: got {w.numel()} weights for {K} layer pairs")
        self._weights = w

    @property
    def num_layers(self) -> int:
        if self._pairs is None:
            raise RuntimeError("LayerwiseDistiller: pairs='auto' is resolved on the first batch; "
                               "pass example_input= or call the distiller once")
        return len(self._pairs)

    # ---- parameter groups (SPEC section 4) -------------------------------------------------------
    def parameter_groups(self, example_input: Any = None) -> List[Dict[str, Any]]:
        """``[{"params": [...], "layer": j}, ..., {"params": [...], "layer": None}]`` (SPEC 4).

        Empty groups are omitted; the head group has ``"layer": None``."""
        if self._groups is None:
            if example_input is None:
                raise RuntimeError("LayerwiseDistiller: the parameter groups come from one forward pass; pass "
                                   "example_input= here or to the constructor, or call the distiller once first")
            self._resolve(example_input)
        params = list(self.student.parameters())
        K = len(self._pairs)
        out = []
        for j, idx in enumerate(self._groups):
            if idx:
                out.append({"params": [params[i] for i in idx], "layer": j if j < K else None})
        return out

    def make_optimizer(self, kind: str = "sgd", lr: Union[float, torch.Tensor] = 0.01, *,
                       example_input: Any = None, **kwargs) -> torch.optim.Optimizer:
        """``LayerwiseSGD`` or ``LayerwiseAdamW`` over :meth:`parameter_groups`; other keyword
        arguments go to the optimizer (``momentum``, ``weight_decay``, ``rate_momentum``,
        ``gamma``, ``sync``, ...).  ``gamma=0`` gives fixed rates (``eta_j = lr``) through the same
        code path.  The optimizer is attached to the distiller (``opt.attach(self)``): a plain
        ``opt.step()`` uses the last forward's discrepancies, and every step skips the update
        (parameters, optimizer and rule state untouched, counted in ``opt.skipped_steps``) when
        that forward's loss was not finite, without a host synchronisation."""
        from . import optim

        kinds = {"sgd": optim.LayerwiseSGD, "adamw": optim.LayerwiseAdamW}
        if kind not in kinds:
            raise ValueError(f"make_optimizer: unknown kind {kind!r}; expected 'sgd' or 'adamw'")
        groups = self.parameter_groups(example_input)
        opt = kinds[kind](groups, lr, num_layers=len(self._pairs), **kwargs)
        opt.attach(self)
        return opt

    # ---- forward ---------------------------------------------------------------------------------
    def _teacher_eval(self) -> None:
        if self.teacher.training:
            if not self._warned_teacher:
                warnings.warn("LayerwiseDistiller: the teacher is in train mode; it is evaluated in eval mode "
                              "(teacher.eval() was called)", stacklevel=3)
                self._warned_teacher = True
            self.teacher.eval()

    def _task_of(self, logits: torch.Tensor) -> str:
        if self.task != "auto":
            return self.task
        if logits.dim() == 2:
            return "classification"
        return "causal_lm" if _is_causal_lm(self.student) else "tokens"

    def _base_loss(self, logits, t_logits, x, y):
        task = self._task_of(logits)
        if task == "classification":
            if logits.dim() != 2 or y is None or y.dim() != 1:
                raise ValueError(f"LayerwiseDistiller: task 'classification' needs (B, C) logits and (B,) targets, got "
                                 f"logits {tuple(logits.shape)} and targets "
                                 f"{None if y is None else tuple(y.shape)}; pass task='tokens' or 'causal_lm' for "
                                 "per-token targets")
            ce = F.cross_entropy(logits, y)
            valid = None
        else:
            if logits.dim() != 3:
                raise ValueError(f"LayerwiseDistiller: task {task!r} needs (B, T, C) logits, got {tuple(logits.shape)}")
            mask = _token_mask(x)
            if y is None and task == "causal_lm" and isinstance(x, Mapping) and "input_ids" in x:
                y = x["input_ids"]
            if y is None or tuple(y.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"LayerwiseDistiller: task {task!r} needs (B, T) = {tuple(logits.shape[:2])} targets, "
                                 f"got {None if y is None else tuple(y.shape)}")
            valid = y != -100
            if mask is not None:
                valid = valid & mask
            if task == "causal_lm":  # position t predicts token t+1
                logits, y, valid = logits[:, :-1], y[:, 1:], valid[:, 1:]
                if t_logits is not None:
                    t_logits = t_logits[:, :-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 torch.where(valid, y, torch.full_like(y, -100)).reshape(-1), ignore_index=-100)
        if self.kd_weight == 0.0:
            return ce, ce, None
        T = self.temperature
        log_p = F.log_softmax(logits / T, dim=-1)
        q = F.softmax(t_logits.detach() / T, dim=-1)
        if valid is None:
            kd = F.kl_div(log_p, q, reduction="batchmean") * (T * T)
        else:  # mean over the valid positions
            kl = F.kl_div(log_p, q, reduction="none").sum(-1)
            vf = valid.to(kl.dtype)
            kd = (kl * vf).sum() / vf.sum().clamp_min(1.0) * (T * T)
        return (1.0 - self.kd_weight) * ce + self.kd_weight * kd, ce, kd

    def _masks(self, x) -> List[Optional[torch.Tensor]]:
        """Each pair's (B, N) mask of valid locations: the attention mask for tokens of a token-id
        input, its outer product for token pairs, None otherwise."""
        m = _token_mask(x)
        out = []
        for pr in self._pairs:
            kind = pr.student_layout.kind
            if m is None or kind == "grid" or pr.student_layout.extent != (m.shape[1],):
                out.append(None)
            elif kind == "tokens":
                out.append(m)
            else:
                out.append((m[:, :, None] & m[:, None, :]).reshape(m.shape[0], -1))
        return out

    def _attention(self, x, with_loss):
        cap_s, cap_t = self._captures
        student_out, s_feats = cap_s.run(lambda: call_model(self.student, x))
        with torch.no_grad():
            teacher_out, t_feats = cap_t.run(lambda: call_model(self.teacher, x))
        for j, (a, b) in enumerate(zip(s_feats, t_feats)):
            for who, f, tap in (("student", a, self._pairs[j].student), ("teacher", b, self._pairs[j].teacher)):
                if not isinstance(f, torch.Tensor):
                    raise RuntimeError(f"LayerwiseDistiller: pair {j}: {who} module {_tap_str(tap)!r} returned "
                                       f"{type(f).__name__}, not a tensor")
        # one layout for both sides of the op: channels first (views, no copies)
        s_feats = [f.movedim(pr.student_layout.channel_dim, 1) for f, pr in zip(s_feats, self._pairs)]
        t_feats = [f.movedim(pr.teacher_layout.channel_dim, 1) for f, pr in zip(t_feats, self._pairs)]
        feats = s_feats if with_loss else [f.detach() for f in s_feats]
        masks = self._masks(x)
        D = ops.attention_discrepancy(
            feats, t_feats, p=self.p, metric=self.metric, beta=self.beta, normalize=self.normalize,
            tau=self.tau, channel_dim=1, resize=self.resize,
            mask=[None if m is None else m for m in masks] if any(m is not None for m in masks) else None,
        )
        return D, student_out, teacher_out

    def _derivative(self, x, y, with_loss):
        from .derivatives import derivative_maps, sketched_derivative_maps

        kind = "jacobian" if self.method == "jacobian" else "hvp"
        masks = self._masks(x)
        common = dict(kind=kind, generator=self.generator, probe=self.probe, create_graph=with_loss,
                      strategy=self.strategy, chunk_size=self.chunk_size, p=self.p,
                      channel_dim=[pr.student_layout.channel_dim for pr in self._pairs],
                      teacher_channel_dim=[pr.teacher_layout.channel_dim for pr in self._pairs],
                      mask=masks if any(m is not None for m in masks) else None)
        s_taps = [pr.student for pr in self._pairs]
        t_taps = [pr.teacher for pr in self._pairs]
        labels = y if isinstance(y, torch.Tensor) and y.dim() >= 1 and y.shape[0] == _batch_size(x) else None
        token_ids = (isinstance(x, Mapping) and "input_ids" in x
                     and not any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in x.values()))
        map_mask = None
        if token_ids:
            s_maps, t_maps = sketched_derivative_maps(self.student, self.teacher, x, s_taps, t_taps,
                                                      rank=self.sketch_rank, labels=labels, **common)
            map_mask = _token_mask(x)
        else:
            s_maps, t_maps = derivative_maps(self.student, self.teacher, x, s_taps, t_taps, labels=labels, **common)
        D = ops.map_discrepancy(s_maps, t_maps, metric=self.metric, beta=self.beta, mask=map_mask)
        student_out = call_model(self.student, x)
        teacher_out = None
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher_out = call_model(self.teacher, x)
        return D, student_out, teacher_out

    def forward(self, x, y: Optional[torch.Tensor] = None) -> DistillOutput:
        """One distillation step's forward on the batch ``x`` (a tensor, or a dict of keyword
        arguments) with targets ``y`` (class labels, per-token targets, or None for a causal LM,
        whose targets are its input ids)."""
        if self._captures is None:
            self._resolve(x)
        self._teacher_eval()
        with_loss = self.use == "rates+loss"
        if self.method == "attention":
            D, s_out, t_out = self._attention(x, with_loss)
        else:
            D, s_out, t_out = self._derivative(x, y, with_loss)
        logits = logits_of(s_out, self.logits_fn)
        t_logits = None if t_out is None or self.kd_weight == 0 else logits_of(t_out, self.logits_fn)
        base, ce, kd = self._base_loss(logits, t_logits, x, y)
        match = None
        if with_loss:
            w = self._weights.to(D.device, D.dtype) if self._weights is not None else None
            match = (D * w).sum() if w is not None else D.sum()
            loss = base + match.to(base.dtype)
        else:
            loss = base
        found_inf = (~torch.isfinite(loss.detach())).to(torch.float32)
        self.nonfinite_losses.add_(found_inf.to(self.nonfinite_losses.device, torch.int64))
        D = D.detach()
        self.latest_discrepancies, self.found_inf = D, found_inf
        return DistillOutput(loss=loss, discrepancies=D, logits=logits, ce=ce, kd=kd, match=match,
                             found_inf=found_inf)

    def train(self, mode: bool = True) -> "LayerwiseDistiller":
        """Sets the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def extra_repr(self) -> str:
        pairs = "auto (unresolved)" if self._pairs is None else f"{len(self._pairs)} pairs"
        return f"method={self.method!r}, metric={self.metric!r}, use={self.use!r}, pairs={pairs}"
