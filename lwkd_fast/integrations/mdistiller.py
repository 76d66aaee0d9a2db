"""mdistiller adapter: ``LWKD``, a ``Distiller`` for mdistiller's trainer (megvii-research/mdistiller).

mdistiller's models return ``(logits, feats)`` with ``feats["feats"]`` the list of stage features
(``feats["preact_feats"]`` before the last ReLU, ``feats["pooled_feat"]``); a distiller's
``forward_train(image, target, **kwargs)`` returns ``(logits, losses_dict)``, and the trainer sums
``losses_dict`` values, backpropagates and calls ``optimizer.step()`` with no arguments.  ``LWKD``
computes the per-layer discrepancies D of the chosen stage features in one fused op (attention
maps; or input Jacobians / Hessian-vector products of the stage modules), publishes D and the
non-finite flag of the total loss for the attached layer-wise optimizer, and returns
``{"loss_ce", "loss_feat"[, "loss_kd"]}``.

Recipe: ``python tools/train.py --cfg configs/cifar100/lwkd.yaml``, mdistiller's own entry point.
In ``tools/train.py``, one line among the imports (it must run before ``cfg.merge_from_file``)::

    from lwkd_fast.integrations.mdistiller import register; register()

and the config is ``configs/cifar100/at.yaml`` with two changes, ``TYPE: "LWKD"`` and
``TRAINER: "lwkd"``::

    EXPERIMENT:
      NAME: ""
      TAG: "lwkd,res32x4,res8x4"
      PROJECT: "cifar100_baselines"
    DISTILLER:
      TYPE: "LWKD"
      TEACHER: "resnet32x4"
      STUDENT: "resnet8x4"
    SOLVER:
      TRAINER: "lwkd"
      BATCH_SIZE: 64
      EPOCHS: 240
      LR: 0.05
      LR_DECAY_STAGES: [150, 180, 210]
      LR_DECAY_RATE: 0.1
      WEIGHT_DECAY: 0.0005
      MOMENTUM: 0.9
      TYPE: "SGD"

``register()`` adds ``LWKD`` to mdistiller's ``distiller_dict``, the trainer ``"lwkd"`` (mdistiller's
``BaseTrainer`` whose ``init_optimizer`` builds ``LayerwiseSGD`` -- ``SOLVER.TYPE: "ADAMW"``:
``LayerwiseAdamW`` -- from ``SOLVER.LR / MOMENTUM / WEIGHT_DECAY``, over the student's SPEC-4
parameter groups, on the student's device) to ``trainer_dict``, and the node ``CFG.LWKD`` (every key
of :data:`CFG_DEFAULTS`, all optional in a config) to mdistiller's ``CFG``.  Nothing else changes:
``adjust_learning_rate`` writes every group's ``lr``, the base rate the layer factors multiply, and
the trainer's checkpoints hold the optimizer's state dict.

Defaults replace ``TYPE: "AT"`` like for like: ``USE: "rates+loss"`` and, unless ``CFG.LWKD`` sets
them, ``P``, ``CE_WEIGHT`` and ``FEAT_WEIGHT`` are those of the config's ``AT`` node (mdistiller's
defaults 2, 1.0, 1000.0), so at ``p = 2`` ``loss_ce + loss_feat`` is exactly mdistiller's AT loss
(``loss_feat`` is what AT calls ``loss_kd``); the layer-wise rates come on top.

Attention maps use ``|A|^p`` (Zagoruyko & Komodakis' definition, SPEC section 1); mdistiller's AT
uses ``A.pow(p)``.  They agree for even ``p`` (the default 2) and for non-negative features
(``feats`` after ReLU); for odd ``p`` on signed features (``preact_feats``) they differ.  This
package keeps ``|A|^p``: ``A^p`` of a signed map is not an attention (its mass can cancel).

Under ``nn.DataParallel`` over several GPUs the replicas' D would not reach the module: use one
GPU per process (DDP; ``SYNC: "all_reduce"`` averages D across ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import DiscrepancySource, make_layerwise_optimizer, producing_modules

try:  # the real base class when mdistiller is installed (it is not on PyPI)
    from mdistiller.distillers._base import Distiller as _DistillerBase

    HAS_MDISTILLER = True
except ImportError:
    HAS_MDISTILLER = False

    class _DistillerBase(nn.Module):
        """Used without mdistiller: the interface its trainer relies on -- ``student`` and
        ``teacher`` attributes, a teacher that stays in eval mode, ``forward(**batch)`` that
        trains while ``self.training`` and otherwise returns the student's logits, and the two
        parameter queries."""

        def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
            super().__init__()
            self.student, self.teacher = student, teacher

        def train(self, mode: bool = True):
            super().train(mode)  # (nn.Module.train refuses a non-bool mode)
            self.teacher.eval()
            return self

        def get_learnable_parameters(self):
            return list(self.student.parameters())

        def get_extra_parameters(self):
            return 0

        def forward_test(self, image):
            return self.student(image)[0]

        def forward(self, **kwargs):
            return self.forward_train(**kwargs) if self.training else self.forward_test(kwargs["image"])


__all__ = ["LWKD", "HAS_MDISTILLER", "CFG_DEFAULTS", "feature_modules", "register", "cfg_node"]

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
    Raises ValueError naming the feature when no module returned it (pass module names then:
    ``student_layers=`` / ``teacher_layers=``)."""
    op = "feature_modules"

    def pick(out):
        feats = _unpack(op, "model", out)[1]
        if key not in feats:
            raise KeyError(f"{op}: feats has no {key!r}; it has {sorted(feats)}")
        seq = feats[key]
        idx = range(len(seq)) if indices is None else indices
        return [(f"feats[{key!r}][{i}]", seq[i]) for i in idx]

    return producing_modules(op, model, lambda m: m(x), pick,
                             hint="pass the module names explicitly (student_layers= / teacher_layers=)")


#: The ``CFG.LWKD`` node :func:`register` declares (yacs needs every key a config may set).
#: None means "the default": for ``P``, ``CE_WEIGHT``, ``FEAT_WEIGHT`` the config's ``AT`` values;
#: for ``FEAT_INDICES`` all features but the first (as AT); for ``METRIC`` the method's
#: ("at" / "cos"); for ``INPUT_SIZE`` (the batch shape of the one forward pass that finds the
#: parameter groups) ``[2, 3, H, H]`` with ``H`` from ``DATASET.TYPE`` (cifar100 32,
#: tiny_imagenet 64, imagenet 224).  ``RATE_MOMENTUM``, ``GAMMA``, ``S_MIN``, ``S_MAX``, ``SYNC``
#: go to the optimizer; the rest to :class:`LWKD`.
CFG_DEFAULTS: Dict[str, Any] = {
    "METHOD": "attention", "USE": "rates+loss", "FEAT_KEY": "feats", "FEAT_INDICES": None, "METRIC": None,
    "P": None, "CE_WEIGHT": None, "FEAT_WEIGHT": None, "KD_WEIGHT": 0.0, "TEMPERATURE": 4.0, "RESIZE": "pool",
    "RATE_MOMENTUM": 0.9, "GAMMA": 1.0, "S_MIN": 0.1, "S_MAX": 10.0, "SYNC": None, "INPUT_SIZE": None,
}
_OPTIMIZER_KEYS = ("rate_momentum", "gamma", "s_min", "s_max", "sync")
_AT_DEFAULTS = {"p": 2.0, "ce_weight": 1.0, "feat_weight": 1000.0}  # mdistiller's CFG.AT defaults
_INPUT_SIDE = {"cifar100": 32, "tiny_imagenet": 64, "imagenet": 224}


def _node(cfg, key: str):
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def _options_from_cfg(cfg) -> Dict[str, Any]:
    """``cfg.LWKD`` as lower-case options (None values dropped), with AT's P / CE_WEIGHT /
    FEAT_WEIGHT filling in what the node leaves unset."""
    node = _node(cfg, "LWKD")
    items = {} if node is None else (node.items() if isinstance(node, Mapping) else vars(node).items())
    opts = {str(k).lower(): v for k, v in items if v is not None}
    at = _node(cfg, "AT")
    at_loss = _node(at, "LOSS")
    for key, value in (("p", _node(at, "P")), ("ce_weight", _node(at_loss, "CE_WEIGHT")),
                       ("feat_weight", _node(at_loss, "FEAT_WEIGHT"))):
        if key not in opts and value is not None:
            opts[key] = value
    return opts


def _default_input_size(cfg) -> Optional[List[int]]:
    side = _INPUT_SIDE.get(str(_node(_node(cfg, "DATASET"), "TYPE")))
    return None if side is None else [2, 3, side, side]


class LWKD(DiscrepancySource, _DistillerBase):
    """Layer-wise KD with per-layer learning rates as an mdistiller ``Distiller``.

    Args:
        student, teacher: mdistiller-style models returning ``(logits, feats)``.
        cfg: mdistiller's config: ``cfg.LWKD.*`` (upper-case keys, :data:`CFG_DEFAULTS`) set the
            options below, ``cfg.AT`` the defaults of ``p``, ``ce_weight`` and ``feat_weight``,
            ``cfg.DATASET.TYPE`` the default ``input_size``; keyword arguments override ``cfg``.
            Optional.
        feat_key: which list of ``feats`` to match (``"feats"``, or ``"preact_feats"``).
        feat_indices: which entries (default: all but the first, as mdistiller's ``AT`` does).
        method: ``"attention"``, ``"jacobian"`` or ``"hessian"`` (derivative maps of the modules
            that produce those features, SPEC section 3).
        use: ``"rates+loss"`` (default, AT's loss: ``loss_feat = feat_weight * sum_j weights[j] *
            D_j`` is added) or ``"rates"`` (D only steers the rates).
        p, ce_weight, feat_weight: default 2, 1.0, 1000.0 (mdistiller's AT defaults, or the
            config's ``AT`` values); ``loss_ce = ce_weight * CE``.
        kd_weight, temperature: with ``kd_weight > 0`` ``loss_kd = kd_weight * T^2 *
            KL(teacher || student)`` (Hinton KD) is added.
        metric, beta, normalize, tau, resize: as for :func:`lwkd_fast.attention_discrepancy` /
            :func:`lwkd_fast.map_discrepancy`; ``resize="pool"`` by default, as mdistiller's AT pools
            the larger map to the smaller size.
        probe, strategy, generator, chunk_size: derivative options (:func:`lwkd_fast.derivative_maps`).
        student_layers, teacher_layers: module names of the matched features, when they are not
            found automatically by :func:`feature_modules` (needed for the parameter groups and
            the derivative methods).
        input_size: batch shape of the one forward pass :meth:`make_optimizer` uses to find the
            parameter groups (default from ``cfg.DATASET.TYPE``).
        rate_momentum, gamma, s_min, s_max, sync: defaults of :meth:`make_optimizer`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg=None, **options) -> None:
        super().__init__(student, teacher)
        opts = {**_AT_DEFAULTS, **_options_from_cfg(cfg), **options}
        op = "LWKD"
        self._optimizer_options = {k: opts.pop(k) for k in _OPTIMIZER_KEYS if k in opts}
        size = opts.pop("input_size", None)
        self.input_size: Optional[List[int]] = list(size) if size is not None else _default_input_size(cfg)
        known = {"feat_key", "feat_indices", "method", "use", "weights", "ce_weight", "feat_weight", "kd_weight",
                 "temperature", "metric", "p", "beta", "normalize", "tau", "resize", "probe", "strategy",
                 "generator", "chunk_size", "student_layers", "teacher_layers"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise TypeError(f"{op}: unknown option(s) {', '.join(unknown)}; expected some of "
                            f"{', '.join(sorted(known | {'input_size'} | set(_OPTIMIZER_KEYS)))}")
        self.method = opts.get("method", "attention")
        if self.method not in _METHODS:
            raise ValueError(f"{op}: unknown method {self.method!r}; expected one of {', '.join(_METHODS)}")
        self.use = opts.get("use", "rates+loss")
        if self.use not in ("rates", "rates+loss"):
            raise ValueError(f"{op}: unknown use {self.use!r}; expected 'rates' or 'rates+loss'")
        self.metric = opts.get("metric") or ("at" if self.method == "attention" else "cos")
        self.feat_key = opts.get("feat_key", "feats")
        fi = opts.get("feat_indices")
        self.feat_indices: Optional[List[int]] = None if fi is None else [int(i) for i in fi]
        self.ce_weight = float(opts["ce_weight"])
        self.feat_weight = float(opts["feat_weight"])
        self.kd_weight = float(opts.get("kd_weight", 0.0))
        self.temperature = float(opts.get("temperature", 4.0))
        if not self.temperature > 0:
            raise ValueError(f"{op}: temperature must be positive, got {self.temperature}")
        self.p, self.beta = float(opts["p"]), float(opts.get("beta", 0.5))
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
        one batch the student accepts (default: zeros of ``input_size`` on the student's device
        and dtype).  Other kwargs go to the optimizer (``momentum``, ``weight_decay``,
        ``rate_momentum``, ``gamma``, ``sync``, ...), over the defaults from ``cfg.LWKD``."""
        if example_input is None:
            if self.input_size is None:
                raise RuntimeError("LWKD.make_optimizer: pass example_input= (one batch the student accepts) or "
                                   "input_size= / cfg.LWKD.INPUT_SIZE; the execution order of the student's modules "
                                   "comes from one forward pass")
            ref = next(self.student.parameters(), None)
            example_input = torch.zeros(self.input_size, device=None if ref is None else ref.device,
                                        dtype=None if ref is None else ref.dtype)
        if self.student_layers is None or self.feat_indices is None:
            self._resolve_layers(example_input, need_teacher=False)
        return make_layerwise_optimizer(kind, self.student, self.student_layers, example_input, lr, source=self,
                                        extra_params=None, **{**self._optimizer_options, **kwargs})

    def optimizer_from_cfg(self, cfg) -> torch.optim.Optimizer:
        """The optimizer mdistiller's ``cfg.SOLVER`` describes, made layer-wise: ``TYPE`` "SGD"
        (``LR``, ``MOMENTUM``, ``WEIGHT_DECAY``) or "ADAMW" (``LR``, ``WEIGHT_DECAY``); what the
        ``"lwkd"`` trainer's ``init_optimizer`` returns."""
        solver = _node(cfg, "SOLVER")
        kind = str(_node(solver, "TYPE")).upper()
        if kind == "SGD":
            return self.make_optimizer("sgd", _node(solver, "LR"), momentum=_node(solver, "MOMENTUM"),
                                       weight_decay=_node(solver, "WEIGHT_DECAY"))
        if kind == "ADAMW":
            return self.make_optimizer("adamw", _node(solver, "LR"), weight_decay=_node(solver, "WEIGHT_DECAY"))
        raise NotImplementedError(f"LWKD: SOLVER.TYPE {kind!r}; the layer-wise optimizers are 'SGD' and 'ADAMW'")

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, metric={self.metric!r}, use={self.use!r}, feat_key={self.feat_key!r}, "
                f"feat_indices={self.feat_indices}")


# ------------------------------------------------------------------------------------------------
# Registration with mdistiller (tools/train.py)
# ------------------------------------------------------------------------------------------------

_TRAINER: Any = None


def cfg_node():
    """A yacs ``CfgNode`` holding :data:`CFG_DEFAULTS` (what :func:`register` adds as ``CFG.LWKD``)."""
    from yacs.config import CfgNode

    return CfgNode(dict(CFG_DEFAULTS))


def trainer_class():
    """mdistiller's ``BaseTrainer`` whose ``init_optimizer`` is :meth:`LWKD.optimizer_from_cfg`."""
    global _TRAINER
    if _TRAINER is None:
        from mdistiller.engine.trainer import BaseTrainer

        class LWKDTrainer(BaseTrainer):
            """mdistiller's ``BaseTrainer`` with the LWKD distiller's layer-wise optimizer."""

            def init_optimizer(self, cfg):
                distiller = getattr(self.distiller, "module", self.distiller)  # (tools/train.py: DataParallel)
                if not isinstance(distiller, LWKD):
                    raise TypeError(f"SOLVER.TRAINER 'lwkd' needs DISTILLER.TYPE 'LWKD', got {type(distiller).__name__}")
                return distiller.optimizer_from_cfg(cfg)

        _TRAINER = LWKDTrainer
    return _TRAINER


def register(name: str = "LWKD", trainer: str = "lwkd") -> None:
    """Make ``DISTILLER.TYPE: "LWKD"`` and ``SOLVER.TRAINER: "lwkd"`` available to mdistiller's
    ``tools/train.py``: adds :class:`LWKD` to ``distiller_dict``, :func:`trainer_class` to
    ``trainer_dict`` and :func:`cfg_node` as ``CFG.LWKD`` (kept if already there).  Call it once,
    before ``cfg.merge_from_file`` (with the imports); calling it again changes nothing."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.engine.cfg import CFG

    distiller_dict[name] = LWKD
    trainer_dict[trainer] = trainer_class()
    if "LWKD" not in CFG:
        if CFG.is_frozen():
            raise RuntimeError("lwkd_fast.integrations.mdistiller.register: mdistiller's CFG is frozen; call register() "
                               "before cfg.merge_from_file / cfg.freeze (with the imports of tools/train.py)")
        CFG.LWKD = cfg_node()
