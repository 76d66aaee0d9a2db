"""mdistiller adapter: ``LWKD``, a ``Distiller`` for mdistiller's trainer (megvii-research/mdistiller).

mdistiller's models return ``(logits, feats)`` with ``feats["feats"]`` the list of stage features
(``feats["preact_feats"]`` before the last ReLU, ``feats["pooled_feat"]``); a distiller's
``forward_train(image, target, **kwargs)`` returns ``(logits, losses_dict)``, and the trainer sums
``losses_dict`` values, backpropagates and calls ``optimizer.step()`` with no arguments.  ``LWKD``
computes the per-layer discrepancies D of the chosen stage features in one fused op (attention
maps; or input Jacobians / Hessian-vector products of the stage modules), publishes D and the
non-finite flag of the total loss for the attached layer-wise optimizer, and returns
``{"loss_ce", ["loss_kd"], ["loss_feat"]}``.

When mdistiller is importable, ``LWKD`` subclasses its real ``mdistiller.distillers._base.Distiller``;
otherwise a stand-in with the same interface (``train`` keeping the teacher in eval,
``get_learnable_parameters``, ``get_extra_parameters``, ``forward_test``, ``forward(**kwargs)``
dispatching on ``self.training``).

Use with mdistiller's trainer (override only ``init_optimizer``)::

    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.trainer import BaseTrainer
    from lwkd_fast.integrations.mdistiller import LWKD

    distiller_dict["LWKD"] = LWKD                      # cfg.DISTILLER.TYPE = "LWKD"

    class LWKDTrainer(BaseTrainer):
        def init_optimizer(self, cfg):
            return self.distiller.module.make_optimizer(
                "sgd", lr=cfg.SOLVER.LR, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                example_input=torch.zeros(2, 3, 32, 32, device="cuda"))

mdistiller's ``adjust_learning_rate`` writes every group's ``lr``, which is the base rate the
layer factors multiply, so its schedule works unchanged.  Under ``nn.DataParallel`` over several
GPUs the replicas' D would not reach the module: use one GPU per process (DDP; ``sync="all_reduce"``
averages D across ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import DiscrepancySource, make_layerwise_optimizer

try:  # the real base class when mdistiller is installed (it is not on PyPI)
    from mdistiller.distillers._base import Distiller as _DistillerBase

    HAS_MDISTILLER = True
except ImportError:
    HAS_MDISTILLER = False

    class _DistillerBase(nn.Module):
        """Stand-in with mdistiller's documented ``Distiller`` interface."""

        def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
            super().__init__()
            self.student = student
            self.teacher = teacher

        def train(self, mode: bool = True):
            if not isinstance(mode, bool):
                raise ValueError("training mode is expected to be boolean")
            self.training = mode
            for module in self.children():
                module.train(mode)
            self.teacher.eval()
            return self

        def get_learnable_parameters(self):
            return [v for _k, v in self.student.named_parameters()]

        def get_extra_parameters(self):
            return 0

        def forward_train(self, **kwargs):
            raise NotImplementedError()

        def forward_test(self, image):
            return self.student(image)[0]

        def forward(self, **kwargs):
            if self.training:
                return self.forward_train(**kwargs)
            return self.forward_test(kwargs["image"])


__all__ = ["LWKD", "HAS_MDISTILLER", "feature_modules"]

_METHODS = ("attention", "jacobian", "hessian")


def _unpack(op: str, who: str, out):
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise TypeError(f"{op}: the {who} must return (logits, feats) with feats a dict (mdistiller's model "
                        f"convention), got {type(out).__name__}")
    return out[0], out[1]


def _features(op: str, who: str, feats: Mapping, key: str, indices: Sequence[int]) -> List[torch.Tensor]:
    if key not in feats:
        raise KeyError(f"{op}: the {who}'s feats has no {key!r}; it has {sorted(feats)}")
    seq = feats[key]
    if isinstance(seq, torch.Tensor):
        seq = [seq]
    n = len(seq)
    out = []
    for i in indices:
        if not -n <= i < n:
            raise IndexError(f"{op}: feature index {i} is out of range for the {who}'s feats[{key!r}] ({n} features)")
        out.append(seq[i])
    return out


def feature_modules(model: nn.Module, x: torch.Tensor, key: str = "feats",
                    indices: Optional[Sequence[int]] = None) -> List[str]:
    """Names of the sub-modules whose outputs are ``model(x)[1][key][i]``, found by tensor identity
    on one forward pass (eval mode, no grad, the model's flags restored).  A tensor several modules
    return (a stage container and its last block) maps to the one that finishes last, the stage.
    Raises ValueError naming the feature when no module returned it (pass module names then)."""
    from ..distill import _temporarily_eval

    op = "feature_modules"
    produced: Dict[int, Any] = {}
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor):
                    produced[id(t)] = (name, t)  # keeps t alive, so ids stay unique during the pass

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), _temporarily_eval(model):
            _logits, feats = _unpack(op, "model", model(x))
    finally:
        for h in handles:
            h.remove()
    seq = feats[key] if key in feats else None
    if seq is None:
        raise KeyError(f"{op}: feats has no {key!r}; it has {sorted(feats)}")
    if indices is None:
        indices = range(len(seq))
    names = []
    for i in indices:
        t = seq[i]
        hit = produced.get(id(t))
        if hit is None or hit[1] is not t:
            raise ValueError(
                f"{op}: feats[{key!r}][{i}] (shape {tuple(t.shape)}) is not the output of any sub-module of "
                f"{type(model).__name__}; pass the module names explicitly (student_layers= / teacher_layers=)"
            )
        names.append(hit[0])
    return names


def _options_from_cfg(cfg) -> Dict[str, Any]:
    if cfg is None:
        return {}
    node = cfg.get("LWKD") if isinstance(cfg, Mapping) else getattr(cfg, "LWKD", None)
    if node is None:
        return {}
    items = node.items() if isinstance(node, Mapping) else vars(node).items()
    return {str(k).lower(): v for k, v in items}


class LWKD(DiscrepancySource, _DistillerBase):
    """Layer-wise KD with per-layer learning rates as an mdistiller ``Distiller``.

    Args:
        student, teacher: mdistiller-style models returning ``(logits, feats)``.
        cfg: mdistiller's config (``cfg.LWKD.*`` keys, upper-case, override the defaults below;
            keyword arguments override ``cfg``).  Optional.
        feat_key: which list of ``feats`` to match (``"feats"``, or ``"preact_feats"``).
        feat_indices: which entries (default: all but the first, as mdistiller's ``AT`` does).
        method: ``"attention"``, ``"jacobian"`` or ``"hessian"`` (derivative maps of the modules
            that produce those features, SPEC section 3).
        use: ``"rates"`` (D only steers the rates) or ``"rates+loss"`` (``loss_feat =
            feat_weight * sum_j weights[j] * D_j`` is added).
        ce_weight, kd_weight, temperature: ``loss_ce = ce_weight * CE``; with ``kd_weight > 0``
            ``loss_kd = kd_weight * T^2 * KL(teacher || student)`` (Hinton KD).
        metric, p, beta, normalize, tau, resize: as for :func:`lwkd_fast.attention_discrepancy` /
            :func:`lwkd_fast.map_discrepancy`; ``resize="pool"`` by default, as mdistiller's AT pools
            the larger map to the smaller size.
        probe, strategy, generator, chunk_size: derivative options (:func:`lwkd_fast.derivative_maps`).
        student_layers, teacher_layers: module names of the matched features, when they are not
            found automatically by :func:`feature_modules` (needed for the parameter groups and
            the derivative methods).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg=None, **options) -> None:
        super().__init__(student, teacher)
        opts = {**_options_from_cfg(cfg), **options}
        op = "LWKD"
        known = {"feat_key", "feat_indices", "method", "use", "weights", "ce_weight", "feat_weight", "kd_weight",
                 "temperature", "metric", "p", "beta", "normalize", "tau", "resize", "probe", "strategy",
                 "generator", "chunk_size", "student_layers", "teacher_layers"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise TypeError(f"{op}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        self.method = opts.get("method", "attention")
        if self.method not in _METHODS:
            raise ValueError(f"{op}: unknown method {self.method!r}; expected one of {', '.join(_METHODS)}")
        self.use = opts.get("use", "rates")
        if self.use not in ("rates", "rates+loss"):
            raise ValueError(f"{op}: unknown use {self.use!r}; expected 'rates' or 'rates+loss'")
        self.metric = opts.get("metric") or ("at" if self.method == "attention" else "cos")
        self.feat_key = opts.get("feat_key", "feats")
        fi = opts.get("feat_indices")
        self.feat_indices: Optional[List[int]] = None if fi is None else [int(i) for i in fi]
        self.ce_weight = float(opts.get("ce_weight", 1.0))
        self.feat_weight = float(opts.get("feat_weight", 1.0))
        self.kd_weight = float(opts.get("kd_weight", 0.0))
        self.temperature = float(opts.get("temperature", 4.0))
        if not self.temperature > 0:
            raise ValueError(f"{op}: temperature must be positive, got {self.temperature}")
        self.p, self.beta = float(opts.get("p", 2.0)), float(opts.get("beta", 0.5))
        self.normalize, self.tau = opts.get("normalize", "sum"), float(opts.get("tau", 1.0))
        self.resize = opts.get("resize", "pool")
        self.probe, self.strategy = opts.get("probe", "energy"), opts.get("strategy", "auto")
        self.generator, self.chunk_size = opts.get("generator"), opts.get("chunk_size")
        w = opts.get("weights")
        self.weights: Optional[List[float]] = None if w is None else [float(v) for v in w]
        sl, tl = opts.get("student_layers"), opts.get("teacher_layers")
        self.student_layers: Optional[List[str]] = None if sl is None else list(sl)
        self.teacher_layers: Optional[List[str]] = None if tl is None else list(tl)
        self.latest_discrepancies = None
        self.found_inf = None
        for p_ in self.teacher.parameters():
            p_.requires_grad_(False)

    # ---- layers ----------------------------------------------------------------------------------
    def _indices(self, feats: Mapping) -> List[int]:
        if self.feat_indices is None:
            seq = feats.get(self.feat_key)
            n = 1 if isinstance(seq, torch.Tensor) else len(seq or [])
            self.feat_indices = list(range(1, n)) if n > 1 else list(range(n))
        return self.feat_indices

    def _resolve_layers(self, image: torch.Tensor, need_teacher: bool) -> None:
        if self.feat_indices is None:
            with torch.no_grad():
                _, feats = _unpack("LWKD", "student", self.student(image))
            self._indices(feats)
        if self.student_layers is None:
            self.student_layers = feature_modules(self.student, image, self.feat_key, self.feat_indices)
        if need_teacher and self.teacher_layers is None:
            self.teacher_layers = feature_modules(self.teacher, image, self.feat_key, self.feat_indices)
        K = len(self.feat_indices)
        for side, names in (("student_layers", self.student_layers), ("teacher_layers", self.teacher_layers)):
            if names is not None and len(names) != K:
                raise ValueError(f"LWKD: {side} names {len(names)} modules but {K} features are matched")

    @property
    def num_layers(self) -> Optional[int]:
        """K, once the matched features are known (after the first forward or ``make_optimizer``)."""
        return None if self.feat_indices is None else len(self.feat_indices)

    # ---- training --------------------------------------------------------------------------------
    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        op = "LWKD"
        with_loss = self.use == "rates+loss"
        self.teacher.eval()
        t_logits = None
        if self.method == "attention":
            logits, feats_s = _unpack(op, "student", self.student(image))
            with torch.no_grad():
                t_logits, feats_t = _unpack(op, "teacher", self.teacher(image))
            idx = self._indices(feats_s)
            s = _features(op, "student", feats_s, self.feat_key, idx)
            t = [f.detach() for f in _features(op, "teacher", feats_t, self.feat_key, idx)]
            if not with_loss:
                s = [f.detach() for f in s]
            D = ops.attention_discrepancy(s, t, p=self.p, metric=self.metric, beta=self.beta,
                                          normalize=self.normalize, tau=self.tau, resize=self.resize)
        else:
            from ..derivatives import derivative_maps

            self._resolve_layers(image, need_teacher=True)
            kind = "jacobian" if self.method == "jacobian" else "hvp"
            s_maps, t_maps = derivative_maps(
                self.student, self.teacher, image, self.student_layers, self.teacher_layers, kind=kind,
                generator=self.generator, probe=self.probe, labels=target, create_graph=with_loss,
                strategy=self.strategy, chunk_size=self.chunk_size, p=self.p)
            D = ops.map_discrepancy(s_maps, t_maps, metric=self.metric, beta=self.beta)
            logits, _ = _unpack(op, "student", self.student(image))
            if self.kd_weight > 0:
                with torch.no_grad():
                    t_logits, _ = _unpack(op, "teacher", self.teacher(image))
        losses: Dict[str, torch.Tensor] = {"loss_ce": self.ce_weight * F.cross_entropy(logits, target)}
        if self.kd_weight > 0:
            T = self.temperature
            kd = F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(t_logits.detach() / T, dim=1),
                          reduction="batchmean") * (T * T)
            losses["loss_kd"] = self.kd_weight * kd
        if with_loss:
            if self.weights is not None:
                if len(self.weights) != D.numel():
                    raise ValueError(f"LWKD: got {len(self.weights)} weights for {D.numel()} matched features")
                term = (D * torch.tensor(self.weights, dtype=D.dtype, device=D.device)).sum()
            else:
                term = D.sum()
            losses["loss_feat"] = self.feat_weight * term
        total = sum(v.detach().to(torch.float32) for v in losses.values())
        self._publish(D, total)
        return logits, losses

    # ---- optimizer -------------------------------------------------------------------------------
    def make_optimizer(self, kind: str = "sgd", lr: Union[float, torch.Tensor] = 0.05, *,
                       example_input: Optional[torch.Tensor] = None, **kwargs) -> torch.optim.Optimizer:
        """``LayerwiseSGD`` / ``LayerwiseAdamW`` over the student's SPEC-4 parameter groups (one
        group per matched feature module, by execution order, plus the head), attached to this
        distiller so mdistiller's plain ``optimizer.step()`` reads the latest D.  ``example_input``:
        one batch the student accepts.  Other kwargs go to the optimizer (``momentum``, ``weight_decay``,
        ``rate_momentum``, ``gamma``, ``sync``, ...)."""
        if example_input is None:
            raise RuntimeError("LWKD.make_optimizer: pass example_input= (one batch the student accepts); the "
                               "execution order of the student's modules comes from one forward pass")
        if self.student_layers is None or self.feat_indices is None:
            self._resolve_layers(example_input, need_teacher=False)
        return make_layerwise_optimizer(kind, self.student, self.student_layers, example_input, lr, source=self,
                                        extra_params=None, **kwargs)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, metric={self.metric!r}, use={self.use!r}, feat_key={self.feat_key!r}, "
                f"feat_indices={self.feat_indices}")
