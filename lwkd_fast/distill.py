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
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

log = logging.getLogger("lwkd_fast")

__all__ = ["LayerwiseDistiller", "DistillOutput", "stage_boundaries", "find_pairs", "execution_order_groups"]

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
# Layer discovery
# ------------------------------------------------------------------------------------------------


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


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


def _trace_outputs(model: nn.Module, x: torch.Tensor) -> List[Tuple[int, str, Tuple[int, ...]]]:
    """(completion order, module name, output shape) of every sub-module on one forward pass
    (eval mode, no grad, no state change)."""
    records: List[Tuple[int, str, Tuple[int, ...]]] = []
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            t = _first_tensor(out)
            if t is not None:
                records.append((len(records), name, tuple(t.shape)))

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), _temporarily_eval(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return records


def stage_boundaries(model: nn.Module, x: torch.Tensor, *, channel_dim: int = 1) -> "OrderedDict[Tuple[int, ...], Tuple[str, Tuple[int, ...]]]":
    """The last module producing each spatial size, in execution order: ``{S: (name, shape)}``.

    Candidates are sub-modules whose output is a (B, C, *S) tensor with at least one spatial
    dimension and more than one location (``channel_dim`` says where C is).  Module forward hooks
    fire when a module finishes, so a stage container (``layer1``) wins over its last child.
    """
    best: Dict[Tuple[int, ...], Tuple[int, str, Tuple[int, ...]]] = {}
    for order, name, shape in _trace_outputs(model, x):
        if len(shape) < 3:
            continue
        cd = channel_dim % len(shape)
        S = tuple(s for d, s in enumerate(shape) if d not in (0, cd))
        n = 1
        for s in S:
            n *= s
        if n <= 1:
            continue
        best[S] = (order, name, shape)
    ordered = sorted(best.items(), key=lambda kv: kv[1][0])
    return OrderedDict((S, (name, shape)) for S, (order, name, shape) in ordered)


def find_pairs(student: nn.Module, teacher: nn.Module, x: torch.Tensor, *, channel_dim: int = 1,
               teacher_channel_dim: Optional[int] = None) -> Tuple[List[Tuple[str, str]], str]:
    """Pair the stage boundaries of student and teacher whose spatial sizes match.

    Returns ``(pairs, report)`` where ``report`` is a human-readable table of the choice.
    """
    tcd = channel_dim if teacher_channel_dim is None else teacher_channel_dim
    sb = stage_boundaries(student, x, channel_dim=channel_dim)
    tb = stage_boundaries(teacher, x, channel_dim=tcd)
    pairs, lines = [], []
    for S, (sname, sshape) in sb.items():
        if S in tb:
            tname, tshape = tb[S]
            pairs.append((sname, tname))
            lines.append(f"  pair {len(pairs) - 1}: student {sname!r} {sshape} <-> teacher {tname!r} {tshape}")
    if not pairs:
        cand_s = ", ".join(f"{n} {sh}" for n, sh in sb.values()) or "none"
        cand_t = ", ".join(f"{n} {sh}" for n, sh in tb.values()) or "none"
        raise ValueError(
            "LayerwiseDistiller: pairs='auto' found no student and teacher stage boundaries with the same "
            f"spatial size. Student candidates: {cand_s}. Teacher candidates: {cand_t}. Pass explicit "
            "pairs=[(student_name, teacher_name), ...] (with resize='pool' for different sizes)."
        )
    report = "LayerwiseDistiller: pairs='auto' matched stage boundaries by spatial size:\n" + "\n".join(lines)
    return pairs, report


def _resolve(model: nn.Module, name: str, who: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        cands = [n for n, m in model.named_modules() if n]
        shown = ", ".join(cands[:40]) + (" ..." if len(cands) > 40 else "")
        raise ValueError(f"LayerwiseDistiller: {who} has no module named {name!r}; available: {shown}")
    return modules[name]


def execution_order_groups(student: nn.Module, layers: Sequence[str], x: torch.Tensor, *,
                           op: str = "LayerwiseDistiller", stacklevel: int = 2) -> List[List[int]]:
    """The parameter groups of SPEC section 4 as index lists into ``list(student.parameters())``.

    ``layers`` are the K matched student module names (in the order of D).  Group j (j < K) holds
    the parameters of the modules that start after matched layer j-1 finished and no later than
    matched layer j finishes (forward-execution order on one pass of ``x``, eval mode, no grad, no
    state change); group K (the head) holds the rest, including modules that never ran.  Every
    parameter appears exactly once; groups may be empty.  ``op`` names the caller in the warning
    issued when the layers do not run in the given order.
    """
    K = len(layers)
    matched = {s: j for j, s in enumerate(layers)}
    events: List[Tuple[str, Any]] = []
    handles = []
    modules = dict(student.named_modules())
    for name, m in modules.items():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: events.append(("start", name))))
        if name in matched:
            handles.append(m.register_forward_hook(lambda mod, inp, out, j=matched[name]: events.append(("end", j))))
    try:
        with torch.no_grad(), _temporarily_eval(student):
            student(x)
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
# The distiller
# ------------------------------------------------------------------------------------------------


class LayerwiseDistiller(nn.Module):
    """Layer-wise knowledge distillation with per-layer learning rates (Kokane, Uddin & Xu 2024).

    Args:
        student, teacher: the two models.  The teacher is a frozen constant: evaluated in eval
            mode (a teacher left in train mode triggers a warning and is switched to eval) and never
            receives gradients.
        pairs: ``"auto"`` (pair the stage boundaries with matching spatial size; needs
            ``example_input`` or happens on the first forward, and ``pairs_report`` says what was
            chosen) or a list of ``(student_module_name, teacher_module_name)`` pairs (names as
            ``named_modules()`` gives them).
        method: ``"attention"`` (attention maps of the paired activations), ``"jacobian"`` (input
            Jacobians of a per-sample probe of each paired layer) or ``"hessian"`` (Hessian-vector
            products with a Rademacher v shared by student and teacher).
        metric: ``"at"`` / ``"jsd"`` for attention (default ``"at"``), ``"cos"`` / ``"jsd"`` for
            derivative maps (default ``"cos"``).
        probe: the per-sample scalar of SPEC section 3 for derivative methods (``"energy"``,
            ``"max"``, ``"logit"`` or a callable).
        use: ``"rates"``: D only drives the layer-wise rates (the loss is the base loss);
            ``"rates+loss"``: ``sum_j weights[j] * D_j`` is also added to the loss.
        weights: per-layer weights of the matching term (default 1 each).
        kd_weight, temperature: Hinton KD; the base loss is
            ``(1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher || student)``.
        p, beta, normalize, tau, resize: as in :func:`lwkd_fast.attention_discrepancy`.
        channel_dim, teacher_channel_dim: where the channels are in the paired activations.
        strategy, generator, chunk_size: derivative strategy, the generator of the HVP vectors,
            and the vmap/batched chunk size (see :mod:`lwkd_fast.derivatives`).
        example_input: a batch used once to resolve ``pairs="auto"`` and the parameter groups.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Union[str, Sequence[Tuple[str, str]]] = "auto",
        *,
        method: str = "attention",
        metric: Optional[str] = None,
        probe: Any = "energy",
        use: str = "rates",
        weights: Optional[Sequence[float]] = None,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        p: float = 2.0,
        beta: float = 0.5,
        normalize: str = "sum",
        tau: float = 1.0,
        resize: Optional[str] = None,
        channel_dim: int = 1,
        teacher_channel_dim: Optional[int] = None,
        strategy: str = "auto",
        generator: Optional[torch.Generator] = None,
        chunk_size: Optional[int] = None,
        example_input: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        name = "LayerwiseDistiller"
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError(f"{name}: student and teacher must be nn.Module instances")
        if method not in METHODS:
            raise ValueError(f"{name}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if use not in USES:
            raise ValueError(f"{name}: unknown use {use!r}; expected 'rates' or 'rates+loss'")
        metric = metric or ("at" if method == "attention" else "cos")
        allowed = ("at", "jsd") if method == "attention" else ("cos", "jsd")
        if metric not in allowed:
            raise ValueError(f"{name}: metric {metric!r} does not apply to method {method!r}; expected one of {allowed}")
        if not 0.0 <= float(kd_weight) <= 1.0:
            raise ValueError(f"{name}: kd_weight must lie in [0, 1], got {kd_weight}")
        if not float(temperature) > 0:
            raise ValueError(f"{name}: temperature must be positive, got {temperature}")
        self.student = student
        self.teacher = teacher
        self.method, self.metric, self.probe, self.use = method, metric, probe, use
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)
        self.p, self.beta, self.normalize, self.tau, self.resize = float(p), float(beta), normalize, float(tau), resize
        self.channel_dim = channel_dim
        self.teacher_channel_dim = channel_dim if teacher_channel_dim is None else teacher_channel_dim
        self.strategy, self.generator, self.chunk_size = strategy, generator, chunk_size
        self._weights_arg = weights
        self.pairs: Optional[List[Tuple[str, str]]] = None
        self.pairs_report = ""
        self._groups: Optional[List[List[int]]] = None  # parameter indices per group (K groups + head)
        self._warned_teacher = False
        # the last forward's outputs that an attached optimizer reads (LayerwiseSGD.attach):
        # the (K,) discrepancies and the 0-dim float32 "loss was not finite" flag
        self.latest_discrepancies: Optional[torch.Tensor] = None
        self.found_inf: Optional[torch.Tensor] = None
        self.register_buffer("nonfinite_losses", torch.zeros((), dtype=torch.int64), persistent=True)
        for p_ in self.teacher.parameters():
            p_.requires_grad_(False)
        if pairs == "auto":
            if example_input is not None:
                self._auto_pairs(example_input)
        else:
            self._set_pairs(pairs)
        if example_input is not None:
            self._build_groups(example_input)

    # ---- pairs ---------------------------------------------------------------------------------
    def _set_pairs(self, pairs) -> None:
        if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)) or not pairs:
            raise ValueError("LayerwiseDistiller: pairs must be 'auto' or a non-empty list of "
                             "(student_module_name, teacher_module_name) pairs")
        out = []
        for k, pr in enumerate(pairs):
            if not (isinstance(pr, (tuple, list)) and len(pr) == 2 and all(isinstance(n, str) for n in pr)):
                raise ValueError(f"LayerwiseDistiller: pairs[{k}] must be a (student_name, teacher_name) pair, got {pr!r}")
            _resolve(self.student, pr[0], "the student")
            _resolve(self.teacher, pr[1], "the teacher")
            out.append((pr[0], pr[1]))
        self.pairs = out
        self.pairs_report = "LayerwiseDistiller: explicit pairs:\n" + "\n".join(
            f"  pair {k}: student {s!r} <-> teacher {t!r}" for k, (s, t) in enumerate(out))
        self._check_weights()

    def _auto_pairs(self, x: torch.Tensor) -> None:
        pairs, report = find_pairs(self.student, self.teacher, x, channel_dim=self.channel_dim,
                                   teacher_channel_dim=self.teacher_channel_dim)
        self.pairs, self.pairs_report = pairs, report
        log.info(report)
        self._check_weights()

    def _check_weights(self) -> None:
        K = len(self.pairs)
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
        if self.pairs is None:
            raise RuntimeError("LayerwiseDistiller: pairs='auto' is resolved on the first batch; "
                               "pass example_input= or call the distiller once")
        return len(self.pairs)

    # ---- parameter groups (SPEC section 4) -------------------------------------------------------
    def _build_groups(self, x: torch.Tensor) -> None:
        if self.pairs is None:
            self._auto_pairs(x)
        self._groups = execution_order_groups(self.student, [s for s, _t in self.pairs], x, stacklevel=4)

    def parameter_groups(self, example_input: Optional[torch.Tensor] = None) -> List[Dict[str, Any]]:
        """``[{"params": [...], "layer": j}, ..., {"params": [...], "layer": None}]`` (SPEC 4).

        Empty groups are omitted; the head group has ``"layer": None``."""
        if self._groups is None:
            if example_input is None:
                raise RuntimeError("LayerwiseDistiller: the parameter groups come from one forward pass; pass "
                                   "example_input= here or to the constructor, or call the distiller once first")
            self._build_groups(example_input)
        params = list(self.student.parameters())
        K = len(self.pairs)
        out = []
        for j, idx in enumerate(self._groups):
            if idx:
                out.append({"params": [params[i] for i in idx], "layer": j if j < K else None})
        return out

    def make_optimizer(self, kind: str = "sgd", lr: Union[float, torch.Tensor] = 0.01, *,
                       example_input: Optional[torch.Tensor] = None, **kwargs) -> torch.optim.Optimizer:
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
        opt = kinds[kind](groups, lr, num_layers=len(self.pairs), **kwargs)
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

    def _capture(self, model: nn.Module, names: List[str], store: List[Optional[torch.Tensor]]):
        handles = []
        modules = dict(model.named_modules())
        for j, n in enumerate(names):
            def hook(mod, inp, out, j=j):
                store[j] = _first_tensor(out)
            handles.append(modules[n].register_forward_hook(hook))
        return handles

    def _base_loss(self, logits, t_logits, y):
        ce = F.cross_entropy(logits, y)
        if self.kd_weight == 0.0:
            return ce, ce, None
        T = self.temperature
        kd = F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(t_logits.detach() / T, dim=1),
                      reduction="batchmean") * (T * T)
        return (1.0 - self.kd_weight) * ce + self.kd_weight * kd, ce, kd

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> DistillOutput:
        if self.pairs is None:
            self._auto_pairs(x)
        if self._groups is None:
            self._build_groups(x)
        self._teacher_eval()
        s_names = [s for s, _ in self.pairs]
        t_names = [t for _, t in self.pairs]
        K = len(self.pairs)
        with_loss = self.use == "rates+loss"

        if self.method == "attention":
            s_feats: List[Optional[torch.Tensor]] = [None] * K
            t_feats: List[Optional[torch.Tensor]] = [None] * K
            hs = self._capture(self.student, s_names, s_feats)
            ht = self._capture(self.teacher, t_names, t_feats)
            try:
                logits = self.student(x)
                with torch.no_grad():
                    t_logits = self.teacher(x)
            finally:
                for h in hs + ht:
                    h.remove()
            for j, (a, b) in enumerate(zip(s_feats, t_feats)):
                if a is None or b is None:
                    raise RuntimeError(f"LayerwiseDistiller: pair {j} {self.pairs[j]} produced no tensor output in this forward")
            feats = s_feats if with_loss else [f.detach() for f in s_feats]
            if self.teacher_channel_dim != self.channel_dim:  # one layout for both sides of the op
                t_feats = [f.movedim(self.teacher_channel_dim, self.channel_dim) for f in t_feats]
            D = ops.attention_discrepancy(
                feats, t_feats, p=self.p, metric=self.metric, beta=self.beta, normalize=self.normalize,
                tau=self.tau, channel_dim=self.channel_dim, resize=self.resize,
            )
        else:
            from .derivatives import derivative_maps

            kind = "jacobian" if self.method == "jacobian" else "hvp"
            s_maps, t_maps = derivative_maps(
                self.student, self.teacher, x, s_names, t_names, kind=kind, generator=self.generator,
                probe=self.probe, labels=y, create_graph=with_loss, strategy=self.strategy,
                chunk_size=self.chunk_size, p=self.p, channel_dim=self.channel_dim,
                teacher_channel_dim=self.teacher_channel_dim,
            )
            D = ops.map_discrepancy(s_maps, t_maps, metric=self.metric, beta=self.beta)
            logits = self.student(x)
            t_logits = None
            if self.kd_weight > 0:
                with torch.no_grad():
                    t_logits = self.teacher(x)

        base, ce, kd = self._base_loss(logits, t_logits, y)
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
        pairs = "auto (unresolved)" if self.pairs is None else f"{len(self.pairs)} pairs"
        return f"method={self.method!r}, metric={self.metric!r}, use={self.use!r}, pairs={pairs}"
