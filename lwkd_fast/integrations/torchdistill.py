"""torchdistill adapter: a registered mid-level loss, a high-level loss and optimizer builders.

Importing this module registers, in torchdistill's registries:

* mid-level loss ``LayerwiseDiscrepancyLoss`` -- the per-layer discrepancies D of the configured
  student/teacher pairs (``ATLoss``'s ``at_pairs`` / ``mode: 'code'`` configuration is accepted as
  is), computed by one :func:`lwkd_fast.attention_discrepancy` call for all K pairs.  ``use:
  rates+loss`` (default): the term is ``sum_j weight_j * D_j``, and for ``metric: at`` each ``D_j``
  equals ``ATLoss``'s per-pair term in ``mode: 'code'``, so the loss is exactly ``ATLoss``'s;
  ``use: rates``: D only steers the layer-wise rates and the term is a zero that supports
  ``backward``.
* high-level loss ``LayerwiseWeightedSumLoss`` -- torchdistill's ``WeightedSumLoss`` that also
  reports the total loss to its ``LayerwiseDiscrepancyLoss`` terms, so a non-finite total
  (e.g. a diverging cross-entropy) makes the optimizer skip that update on the device.
* optimizers ``LayerwiseSGD`` and ``LayerwiseAdamW`` -- builders that group the student's
  parameters by forward-execution order (SPEC section 4) over the layers of the loss's pairs and
  attach the optimizer to that loss, so torchdistill's plain ``optimizer.step()`` reads the
  latest D.  (torchdistill builds the criterion before the optimizer, so the optimizer needs no
  pair list of its own.)

Recipe: torchdistill's own entry point, ``python examples/torchvision/image_classification.py
--config <config>``, with an AT config (e.g. ``configs/sample/ilsvrc2012/at/
resnet18_from_resnet34.yaml``) changed in three places.  At the top, so that the script imports
this module (its ``dependencies`` list)::

    dependencies:
      - name: 'lwkd_fast.integrations.torchdistill'

in ``train:``, the optimizer (``example_input_size``: one batch shape of the training inputs)::

      optimizer:
        key: 'LayerwiseSGD'
        filters_params: False
        kwargs:
          lr: 0.0001
          momentum: 0.9
          weight_decay: 0.0001
          example_input_size: [2, 3, 224, 224]

and in ``criterion:`` two keys: ``key: 'WeightedSumLoss'`` becomes
``key: 'LayerwiseWeightedSumLoss'`` and the AT term's ``key: 'ATLoss'`` becomes
``key: 'LayerwiseDiscrepancyLoss'`` (its ``at_pairs``, ``mode: 'code'`` and ``weight: 1000.0``
stay)::

      criterion:
        key: 'LayerwiseWeightedSumLoss'
        kwargs:
          sub_terms:
            ce:
              criterion:
                key: 'CrossEntropyLoss'
                kwargs:
                  reduction: 'mean'
              criterion_wrapper:
                key: 'SimpleLossWrapper'
                kwargs:
                  input:
                    is_from_teacher: False
                    module_path: '.'
                    io: 'output'
                  target:
                    uses_label: True
              weight: 1.0
            at_loss:
              criterion:
                key: 'LayerwiseDiscrepancyLoss'
                kwargs:
                  at_pairs:
                    pair1:
                      teacher:
                        io: 'output'
                        path: 'layer3'
                      student:
                        io: 'output'
                        path: 'layer3'
                      weight: 1
                    pair2:
                      teacher:
                        io: 'output'
                        path: 'layer4'
                      student:
                        io: 'output'
                        path: 'layer4'
                      weight: 1
                  mode: 'code'
              weight: 1000.0

The scheduler writes every group's ``lr``, the base rate the layer factors multiply.

Why ``filters_params: False``: with torchdistill's default ``filters_params: True``,
``get_optimizer`` hands a builder a flat list of tensors, from which the student's module
structure (needed for the execution-order groups) cannot be recovered.  With ``False`` the
builder receives torchdistill's ``ModuleList([student(, teacher)])`` and skips parameters that do
not require a gradient itself, which is what ``filters_params: True`` does.  Explicit groups are
accepted too: ``module_wise_configs`` entries whose ``kwargs`` carry ``layer: j`` (or ``layer:
null`` for the head).

Attention maps use ``|A|^p`` (Zagoruyko & Komodakis' definition, SPEC section 1); torchdistill's
``ATLoss`` squares (``pow(2)``), which is the same at ``p = 2`` (the only ``p`` ATLoss has).  For
odd ``p`` on signed features ``A.pow(p)`` and ``|A|^p`` differ; this package keeps ``|A|^p``.

Derivative maps (``method: jacobian`` / ``hessian``) are not available here, by construction: a
torchdistill mid-level loss receives only the io_dicts -- tensors recorded by forward hooks, the
teacher's recorded under ``torch.no_grad()`` -- and no model.  Input Jacobians and Hessian-vector
products need fresh per-sample backward passes through both models on the input batch (with
batch statistics frozen, SPEC section 3), i.e. the models themselves, which torchdistill's
config cannot hand to a loss.  Use :class:`lwkd_fast.LayerwiseDistiller` or the mdistiller
adapter (:class:`lwkd_fast.integrations.mdistiller.LWKD`) for derivative matching.

Gradient accumulation (``grad_accum_step > 1``): the step uses D and ``found_inf`` of the last
micro-batch.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

try:
    from torchdistill.losses.high_level import WeightedSumLoss
    from torchdistill.losses.registry import register_high_level_loss, register_mid_level_loss
    from torchdistill.optim.registry import register_optimizer
except ImportError as exc:  # pragma: no cover - exercised only without torchdistill
    raise ImportError(
        "lwkd_fast.integrations.torchdistill needs torchdistill (pip install torchdistill); "
        f"importing it failed: {exc}"
    ) from exc

from .. import ops
from . import DiscrepancySource, layerwise_param_groups, unwrap_model

log = logging.getLogger("lwkd_fast")

__all__ = ["LayerwiseDiscrepancyLoss", "LayerwiseWeightedSumLoss", "layerwise_sgd", "layerwise_adamw",
           "build_layerwise_optimizer", "NamedSource"]

_IO_TYPES = ("output", "input")
_DERIVATIVE_METHODS = ("jacobian", "hessian")

# losses by source name; the optimizer reads through a named proxy, so a later stage's loss of the
# same name (MultiStagesDistillationBox rebuilds the criterion per stage) takes over automatically
_SOURCES: "weakref.WeakValueDictionary[str, LayerwiseDiscrepancyLoss]" = weakref.WeakValueDictionary()


def _pair_list(op: str, pairs) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(pair_name, pair_config)]`` from torchdistill's dict-of-pairs style (or a list)."""
    if isinstance(pairs, dict):
        items = list(pairs.items())
    elif isinstance(pairs, (list, tuple)):
        items = [(f"pair{j}", pc) for j, pc in enumerate(pairs)]
    else:
        raise ValueError(f"{op}: pairs must be a dict {{name: {{student: {{io, path}}, teacher: {{io, path}}, "
                         f"weight}}}} (as for ATLoss) or a list of such pair configs, got {type(pairs).__name__}")
    if not items:
        raise ValueError(f"{op}: pairs is empty; configure at least one student/teacher pair")
    for name, pc in items:
        if not isinstance(pc, dict):
            raise ValueError(f"{op}: pair {name!r} must be a dict with 'student', 'teacher' and optionally "
                             f"'weight', got {pc!r}")
        for side in ("student", "teacher"):
            cfg = pc.get(side)
            if not isinstance(cfg, dict) or not isinstance(cfg.get("path"), str):
                raise ValueError(f"{op}: pair {name!r} needs {side}: {{io: output, path: <module path>}}, got {cfg!r}")
            if cfg.get("io", "output") not in _IO_TYPES:
                raise ValueError(f"{op}: pair {name!r}: {side} io must be 'output' or 'input', got {cfg.get('io')!r}")
        w = pc.get("weight", 1)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"{op}: pair {name!r}: weight must be a number, got {w!r}")
    return items


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, torch.Tensor):
                return v
    return None


@register_mid_level_loss(key="LayerwiseDiscrepancyLoss")
class LayerwiseDiscrepancyLoss(DiscrepancySource, nn.Module):
    """Per-layer discrepancies of torchdistill io_dicts, and the source of the layer-wise rates.

    Args (the criterion's ``kwargs`` in a torchdistill config):
        pairs (or ``at_pairs``, ATLoss's name): ``{name: {student: {io, path}, teacher: {io, path},
            weight}}`` as for ``ATLoss`` (or a list of pair configs); the order is the order of D
            and of the parameter groups.
        mode: ``"code"`` (ATLoss's mode that ``metric="at"`` computes; accepted for drop-in configs).
        method: ``"attention"`` (the only one available in torchdistill; see the module docstring
            for why derivative maps are not).
        use: ``"rates+loss"`` (default: the term is ``sum_j weight_j * D_j`` and backpropagates into
            the student, ATLoss's loss) or ``"rates"`` (the returned term is 0 and D only steers
            the rates).
        metric, p, beta, normalize, tau, resize, channel_dim, eps: as for
            :func:`lwkd_fast.attention_discrepancy` (``metric="at"`` or ``"jsd"``).
        teacher_channel_dim: channel dimension of the teacher features, if different.
        source: the name the optimizer builder attaches to (default ``"default"``).

    After each forward: ``latest_discrepancies`` is D (K,), detached; ``found_inf`` is the
    non-finite flag of this term (``rates+loss``) or None (``rates``), and becomes the flag of the
    total loss when a :class:`LayerwiseWeightedSumLoss` (or ``observe_loss``) reports it.
    """

    def __init__(self, pairs=None, method: str = "attention", use: str = "rates+loss", metric: str = "at",
                 p: float = 2.0, beta: float = 0.5, normalize: str = "sum", tau: float = 1.0,
                 resize: Optional[str] = None, channel_dim: int = 1, teacher_channel_dim: Optional[int] = None,
                 eps: float = 1e-12, source: str = "default", at_pairs=None, mode: str = "code") -> None:
        super().__init__()
        op = "LayerwiseDiscrepancyLoss"
        if (pairs is None) == (at_pairs is None):
            raise ValueError(f"{op}: give the layer pairs as pairs (or as ATLoss's at_pairs), exactly one of them")
        pairs = at_pairs if pairs is None else pairs
        if mode != "code":
            raise ValueError(f"{op}: mode {mode!r}: metric 'at' is ATLoss's mode 'code' (the mean squared difference of "
                             "the normalised maps, the authors' implementation); mode 'paper' is not available")
        if method in _DERIVATIVE_METHODS:
            raise ValueError(
                f"{op}: method {method!r} is not available in torchdistill: a mid-level loss receives only the "
                "io_dicts (tensors recorded by forward hooks, the teacher's under torch.no_grad()), not the models, "
                "and input Jacobians / Hessian-vector products need fresh per-sample backward passes through both "
                "models. Use method='attention' here, or lwkd_fast.LayerwiseDistiller / "
                "lwkd_fast.integrations.mdistiller.LWKD for derivative matching."
            )
        if method != "attention":
            raise ValueError(f"{op}: unknown method {method!r}; expected 'attention'")
        if use not in ("rates", "rates+loss"):
            raise ValueError(f"{op}: unknown use {use!r}; expected 'rates' or 'rates+loss'")
        if not isinstance(source, str) or not source:
            raise ValueError(f"{op}: source must be a non-empty name, got {source!r}")
        self.pairs = _pair_list(op, pairs)
        self.use, self.metric, self.p, self.beta = use, metric, float(p), float(beta)
        self.normalize, self.tau, self.resize, self.eps = normalize, float(tau), resize, float(eps)
        self.channel_dim = channel_dim
        self.teacher_channel_dim = channel_dim if teacher_channel_dim is None else teacher_channel_dim
        self.source = source
        self.weights = [float(pc.get("weight", 1)) for _, pc in self.pairs]
        self._weights_t: Optional[torch.Tensor] = None
        self.latest_discrepancies = None
        self.found_inf = None
        _SOURCES[source] = self

    @property
    def num_layers(self) -> int:
        return len(self.pairs)

    @property
    def student_paths(self) -> List[str]:
        """The student module paths of the pairs, in the order of D."""
        return [pc["student"]["path"] for _, pc in self.pairs]

    def _extract(self, io_dict: Dict[str, Any], side: str, name: str, cfg: Dict[str, Any]) -> torch.Tensor:
        path, io = cfg["path"], cfg.get("io", "output")
        entry = io_dict.get(path)
        if not isinstance(entry, dict) or io not in entry:
            recorded = sorted(f"{p}:{'/'.join(sorted(v))}" for p, v in io_dict.items() if isinstance(v, dict) and v)
            raise KeyError(
                f"LayerwiseDiscrepancyLoss: pair {name!r}: the {side}'s io_dict has no {io!r} for path {path!r}; "
                f"add {path!r} to {side}.forward_hook.{io} in the config (recorded: {', '.join(recorded) or 'nothing'})"
            )
        t = _first_tensor(entry[io])
        if t is None:
            raise TypeError(f"LayerwiseDiscrepancyLoss: pair {name!r}: the {side}'s {io} of {path!r} holds no tensor "
                            f"({type(entry[io]).__name__})")
        return t

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        s = [self._extract(student_io_dict, "student", n, pc["student"]) for n, pc in self.pairs]
        t = [self._extract(teacher_io_dict, "teacher", n, pc["teacher"]).detach() for n, pc in self.pairs]
        with_loss = self.use == "rates+loss"
        if not with_loss:
            s = [f.detach() for f in s]
        if self.teacher_channel_dim != self.channel_dim:
            t = [f.movedim(self.teacher_channel_dim, self.channel_dim) for f in t]
        D = ops.attention_discrepancy(s, t, p=self.p, metric=self.metric, beta=self.beta, normalize=self.normalize,
                                      tau=self.tau, channel_dim=self.channel_dim, resize=self.resize, eps=self.eps)
        if with_loss:
            w = self._weights_t
            if w is None or w.device != D.device or w.dtype != D.dtype:
                w = self._weights_t = torch.tensor(self.weights, dtype=D.dtype, device=D.device)
            term = (D * w).sum()
            self._publish(D, term)
        else:
            # a zero that supports backward (torchdistill sums and backpropagates every term)
            term = torch.zeros((), dtype=D.dtype, device=D.device, requires_grad=True)
            self._publish(D, None)
        return term

    def extra_repr(self) -> str:
        names = ", ".join(n for n, _ in self.pairs)
        return f"pairs=[{names}], use={self.use!r}, metric={self.metric!r}, source={self.source!r}"


@register_high_level_loss(key="LayerwiseWeightedSumLoss")
class LayerwiseWeightedSumLoss(WeightedSumLoss):
    """torchdistill's ``WeightedSumLoss`` (same config) that reports the total loss to every
    :class:`LayerwiseDiscrepancyLoss` term, so the attached optimizer skips the update (on the
    device) when the total loss is not finite."""

    def forward(self, io_dict, model_loss_dict, targets):
        total = super().forward(io_dict, model_loss_dict, targets)
        if isinstance(total, torch.Tensor):
            for criterion, _factor in self.term_dict.values():
                if isinstance(criterion, DiscrepancySource):
                    criterion.observe_loss(total)
        return total


class NamedSource:
    """The discrepancy source registered under ``name``, resolved at every read (what the builder
    attaches: the latest ``LayerwiseDiscrepancyLoss`` built with ``source=name``)."""

    def __init__(self, name: str = "default") -> None:
        self.name = name

    def current(self) -> LayerwiseDiscrepancyLoss:
        loss = _SOURCES.get(self.name)
        if loss is None:
            raise RuntimeError(
                f"lwkd_fast torchdistill adapter: no LayerwiseDiscrepancyLoss with source={self.name!r} exists; "
                "configure one in the criterion (torchdistill builds the criterion before the optimizer)"
            )
        return loss

    @property
    def latest_discrepancies(self) -> Optional[torch.Tensor]:
        return self.current().latest_discrepancies

    @property
    def found_inf(self) -> Optional[torch.Tensor]:
        return self.current().found_inf

    def __repr__(self) -> str:
        return f"NamedSource({self.name!r})"


def _student_of(op: str, module) -> Tuple[nn.Module, List[torch.Tensor]]:
    """The student and any other trainable parameters from what torchdistill's get_optimizer
    passes with ``filters_params: False`` (``ModuleList([student(, teacher)])``) or a bare module."""
    if isinstance(module, nn.ModuleList):
        if len(module) == 0:
            raise ValueError(f"{op}: got an empty ModuleList")
        student = unwrap_model(module[0])
        others = [p for m in module[1:] for p in m.parameters() if p.requires_grad]
        if others:
            log.warning("%s: %d parameters of the other modules torchdistill passed (an updatable teacher) go to the "
                        "head group at the base rate; set teacher.requires_grad: False to keep the teacher fixed",
                        op, len(others))
        return student, others
    return unwrap_model(module), []


def _example_input(op: str, student: nn.Module, example_input, example_input_size) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"{op}: example_input must be a tensor, got {type(example_input).__name__}")
        return example_input
    if example_input_size is None:
        raise ValueError(f"{op}: the parameter groups come from one forward pass of the student; give "
                         "example_input_size: [batch, channels, height, width] (or example_input= from Python)")
    if not isinstance(example_input_size, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in example_input_size):
        raise ValueError(f"{op}: example_input_size must be a list of positive ints, got {example_input_size!r}")
    ref = next((p for p in student.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    return torch.zeros(tuple(example_input_size), device=device, dtype=dtype)


def build_layerwise_optimizer(kind: str, module, lr: Union[float, torch.Tensor] = 0.01, *,
                              layers: Optional[Sequence[str]] = None, pairs=None,
                              example_input_size: Optional[Sequence[int]] = None,
                              example_input: Optional[torch.Tensor] = None, source_name: str = "default",
                              **kwargs) -> torch.optim.Optimizer:
    """Build ``LayerwiseSGD`` (``kind="sgd"``) / ``LayerwiseAdamW`` (``"adamw"``) the way
    torchdistill's ``get_optimizer`` calls a registered optimizer.

    ``module``: torchdistill's ``ModuleList([student(, teacher)])`` (``filters_params: False``), a
    bare student module, or a list of group dicts (``module_wise_configs`` whose kwargs carry
    ``layer``).  ``layers`` (student module paths in the order of D) or ``pairs`` (the loss's pair
    config) name the matched layers; ``example_input_size`` (or ``example_input``) is the batch
    shape of one forward pass that finds the execution order.  The optimizer is attached to the
    loss registered under ``source_name`` (``source`` in the config).  Other kwargs (``momentum``,
    ``weight_decay``, ``rate_momentum``, ``gamma``, ``s_min``, ``s_max``, ``sync``...) go to the
    optimizer."""
    from .. import optim

    cls = {"sgd": optim.LayerwiseSGD, "adamw": optim.LayerwiseAdamW}[kind]
    op = cls.__name__ + " (torchdistill builder)"
    if "source" in kwargs:
        source_name = kwargs.pop("source")
    if layers is not None and pairs is not None:
        raise ValueError(f"{op}: give either layers or pairs, not both")
    names = None
    if pairs is not None:
        names = [pc["student"]["path"] for _, pc in _pair_list(op, pairs)]
    elif layers is not None:
        names = list(layers)
    src = _SOURCES.get(source_name)
    if src is None:
        raise ValueError(
            f"{op}: no LayerwiseDiscrepancyLoss with source={source_name!r} was built; the optimizer reads D from it. "
            "Configure the loss in the criterion (torchdistill builds the criterion first), or give the same source "
            "name to both"
        )
    if names is None:
        names = src.student_paths
    if len(names) != src.num_layers:
        raise ValueError(f"{op}: {len(names)} matched layers but the loss {source_name!r} computes "
                         f"{src.num_layers} discrepancies; use the loss's pairs")

    if isinstance(module, nn.Module):
        student, others = _student_of(op, module)
        x = _example_input(op, student, example_input, example_input_size)
        groups = layerwise_param_groups(student, names, x, requires_grad_only=True, op=op)
        if others:
            groups.append({"params": others, "layer": None})
    elif isinstance(module, (list, tuple)) and module and all(isinstance(g, dict) for g in module):
        groups = [dict(g) for g in module]
        for i, g in enumerate(groups):
            if "layer" not in g:
                raise ValueError(f"{op}: module_wise_configs[{i}] has no 'layer' in its kwargs; give layer: j "
                                 f"(0..{len(names) - 1}, the pair index) or layer: null for the head")
            g["params"] = [p for p in g["params"] if p.requires_grad]
    else:
        raise ValueError(
            f"{op}: got a flat list of parameters (torchdistill's filters_params: True), which does not say which "
            "module each parameter belongs to; set filters_params: False in the optimizer config (the builder then "
            "skips parameters with requires_grad=False itself), or use module_wise_configs with layer: j in kwargs"
        )
    opt = cls(groups, lr, num_layers=len(names), **kwargs)
    opt.attach(NamedSource(source_name))
    return opt


@register_optimizer(key="LayerwiseSGD")
def layerwise_sgd(module, lr: Union[float, torch.Tensor] = 0.01, **kwargs) -> torch.optim.Optimizer:
    """torchdistill optimizer key ``LayerwiseSGD``: :func:`build_layerwise_optimizer` with SGD."""
    return build_layerwise_optimizer("sgd", module, lr, **kwargs)


@register_optimizer(key="LayerwiseAdamW")
def layerwise_adamw(module, lr: Union[float, torch.Tensor] = 1e-3, **kwargs) -> torch.optim.Optimizer:
    """torchdistill optimizer key ``LayerwiseAdamW``: :func:`build_layerwise_optimizer` with AdamW."""
    return build_layerwise_optimizer("adamw", module, lr, **kwargs)
