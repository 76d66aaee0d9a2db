"""Layer-wise optimizers: ``LayerwiseSGD`` and ``LayerwiseAdamW`` (SPEC sections 4-5).

One parameter group per matched layer (``"layer": j`` with ``j`` in ``0..K-1``) plus the head
group (``"layer": None``, factor 1).  ``opt.step(discrepancies)`` first updates the per-layer
factors ``m`` with the rule of :mod:`lwkd_fast.rule` on the device, then updates every parameter
of every group in ONE fused pass in which each tensor reads its rate from device memory::

    eta_g = group["lr"] * m[group["layer"]]      (rounded to float32, the dtype of m)
    eta_g = group["lr"]                          (head group, layer None)

and applies exactly ``torch.optim.SGD`` / ``torch.optim.AdamW`` with ``lr = eta_g``.

Learning-rate schedulers
    ``param_groups[i]["lr"]`` is the *base* rate ``eta0`` of the group (the user's schedule);
    the layer factor is applied on top of it and never written back.  Any
    ``torch.optim.lr_scheduler`` therefore works unchanged: it reads and writes
    ``group["lr"]`` (float or 0-dim tensor) exactly as for ``torch.optim.SGD``, and chainable
    schedulers do not compound the factors.  ``opt.rates`` is the (K,) device tensor of the
    rates the last step applied, ``eta_j = lr_j * m_j`` with ``lr_j`` the base rate of the
    first group of layer ``j`` (all groups of a layer normally share it).

State layout (``opt.state[p]``, torch's names so checkpoints read the same)
    SGD:   ``momentum_buffer`` (only for groups with ``momentum != 0``);
    AdamW: ``step`` (0-dim float32 **on the parameter's device**), ``exp_avg``,
           ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``; all in the parameter's dtype.
    ``state_dict()["layerwise"]`` holds the factors ``m``, the rule's running reference
    ``rate_reference`` ((2, K), used by ``rate_normalize="running"``), the last ``rates``, the
    on-device ``nonfinite_steps`` and ``skipped_steps`` counters and the rule's hyper-parameters
    (checkpoints written before ``skipped_steps`` existed load with it at 0, those written before
    ``rate_normalize`` existed with the rule ``"none"``).  Checkpoints contain only
    tensors, numbers, strings, None, tuples, lists and dicts, so they load with
    ``torch.load(..., weights_only=True)``; resuming is bit-identical.  As with torch.optim,
    ``state_dict()`` returns references to the live tensors: save (or deep-copy) it before the
    next step.

Skipping a step (non-finite loss, fp16 overflow) without a host synchronisation
    ``opt.step(discrepancies, found_inf=flag)`` with ``flag`` a 0-dim float32 tensor on the
    parameters' device (e.g. ``(~torch.isfinite(loss)).float()``, or torch.amp's found_inf).
    When it is nonzero the step is skipped ON THE DEVICE (apex's skip-flag pattern): no
    parameter, no optimizer state (momentum buffers, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, AdamW step counts) and no rule state (factors ``m``, the running
    reference, the non-finite counter, ``rates``) changes -- the run is bit-identical to one that
    never called ``step()`` there -- and ``opt.skipped_steps`` (0-dim int64 device tensor, in the checkpoint) counts it.
    The kernels read the flag themselves, so a skipped step costs next to nothing and a
    ``found_inf`` of None costs nothing at all.  State a skipped step had to create for
    parameters seen for the first time (AdamW zeros; SGD momentum buffers, whose first update is
    ``buf = g`` in torch) is tracked until the host learns the flag without waiting, and dropped
    if it never got initialised, so even a skipped *first* step is exact.  With
    ``sync="all_reduce"`` the flag is all-reduced with the discrepancies (one collective), so a
    non-finite loss on any rank skips the step on every rank; every rank all-reduces the same K + 1
    values whether or not it passes a flag, so ranks that differ in passing one cannot diverge.

Discrepancy sources (KD frameworks call ``optimizer.step()`` with no arguments)
    ``opt.attach(source)``: ``source`` is any object with ``latest_discrepancies`` ((K,) tensor
    or None) and ``found_inf`` (0-dim tensor or None), e.g. a ``LayerwiseDistiller`` (its
    ``make_optimizer`` attaches itself).  ``opt.step()`` then uses
    ``source.latest_discrepancies``, and ``source.found_inf`` whenever no ``found_inf`` is
    passed; ``opt.detach_source()`` undoes it.  Without a source, ``step()`` needs its
    ``discrepancies``.

Parameters as torch.optim takes them (SPEC section 5)
    * Every state tensor is checked against its parameter (shape, dtype, DTensor placements)
      when the work list is built and by ``load_state_dict`` before anything is loaded; a
      mismatch (another model's checkpoint, ``p.data`` resized or re-typed between steps) raises
      naming ``param_groups[g]['params'][i]``, the state key and both shapes.  Device and memory
      layout follow the parameter.
    * The rate state follows the parameters' device: built before ``model.cuda()``, it moves at
      the next step (asynchronously); ``load_state_dict`` places state like torch.optim.
    * Non-dense parameters (strided slices used as leaves) are updated through a dense working
      copy inside the step.
    * DTensor parameters (FSDP2): the step runs on the local shards, one fused call, the rates
      replicated; sharded parameters need ``sync="all_reduce"``.  ``state_dict()`` also puts the
      ``"layerwise"`` record into ``param_groups[0]`` for torch.distributed.checkpoint's
      ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, and a step whose every base
      rate is 0 needs no discrepancies (how those helpers create a fresh optimizer's state).

No host synchronisation: ``step()`` reads no device value on the host (``.item()``,
``.cpu()``, ``.tolist()``, ``bool(tensor)``); all decisions use host metadata (shapes, dtypes,
which parameters have a gradient).  Parameters whose ``grad`` is None are skipped and their
state is untouched, as in torch.

Backends (op name ``"layerwise_step"``): ``native`` (``torch.ops.lwkd.layerwise_step``: C++
CPU work list under ``at::parallel_for``; CUDA multi-tensor apply), ``triton``
(:mod:`lwkd_fast.triton.optim`, a pointer-table kernel) and ``reference`` (below, built on
``torch._foreach_*``).  All take the same arguments, the optional skip flag ``found_inf``
last (native CPU: read from host memory, early return; CUDA: every kernel -- the rule, the
step-count bump, the step -- reads the device flag first and returns; Triton: the flag is loaded
in the kernel and folded into every load/store mask; reference: ``torch.where`` with saved copies).
"""

from __future__ import annotations

import importlib
import itertools
import math
import numbers
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import ops, rule

__all__ = ["LayerwiseSGD", "LayerwiseAdamW", "reference_step"]

OP = "layerwise_step"
if OP not in ops._EXTRA_NATIVE_OPS:
    ops._EXTRA_NATIVE_OPS.append(OP)

HYPER = 6  # doubles per group in the step op's `group_hyper` (see csrc/ops.cpp)
DEFAULT_RATE_NORMALIZE = "none"  # the rule of the optimizers unless told otherwise (SPEC section 4)
_SYNC_CHOICES = (None, "all_reduce")


# ------------------------------------------------------------------------------------------------
# Reference backend (torch._foreach_*), same arguments as torch.ops.lwkd.layerwise_step
# ------------------------------------------------------------------------------------------------


def _group_rate(factors: torch.Tensor, layer: int, lr: float, lr_tensor: Optional[torch.Tensor]):
    """The group's rate: a Python float for a float-lr head group, else a 0-dim float64 tensor
    on the factors' device holding ``float32(lr * m[layer])`` (the kernels' rounding)."""
    if lr_tensor is not None:
        base = lr_tensor.detach().reshape(()).to(device=factors.device, dtype=torch.float64)
        if layer < 0:
            return base
        return (base * factors[layer].to(torch.float64)).to(factors.dtype).to(torch.float64)
    if layer < 0:
        return float(lr)
    return (factors[layer].to(torch.float64) * float(lr)).to(factors.dtype).to(torch.float64)


def _scale(xs: List[torch.Tensor], s) -> List[torch.Tensor]:
    return torch._foreach_mul(xs, s)


def reference_step(algorithm: str, params: List[torch.Tensor], grads: List[torch.Tensor],
                   state1: List[torch.Tensor], state2: List[torch.Tensor], state3: List[torch.Tensor],
                   steps: List[torch.Tensor], factors: torch.Tensor, tensor_group: Sequence[int],
                   fresh: Sequence[int], group_layer: Sequence[int], group_lr: Sequence[float],
                   group_lr_tensor: Sequence[Optional[torch.Tensor]], group_hyper: Sequence[float],
                   found_inf: Optional[torch.Tensor] = None) -> None:
    """The fused step written with ``torch._foreach_*`` ops, one batch of calls per group.

    Mirrors torch.optim's multi-tensor SGD / AdamW with the group's device rate; low-precision
    parameters round after every foreach op (eager torch semantics).  With ``found_inf`` (the
    reference: clarity over speed) every tensor the step writes is saved first, the step runs,
    and ``torch.where(found_inf != 0, saved, updated)`` puts the saved values back on the device.
    """
    if algorithm not in ("sgd", "adamw"):
        raise ValueError(f"reference_step: unknown algorithm {algorithm!r} (expected 'sgd' or 'adamw')")
    args = (algorithm, params, grads, state1, state2, state3, steps, factors, tensor_group, fresh, group_layer,
            group_lr, group_lr_tensor, group_hyper)
    if found_inf is None:
        _reference_step(*args)
        return
    skip = found_inf.detach().reshape(()) != 0
    written: Dict[int, torch.Tensor] = {}
    for t in itertools.chain(params, state1, state2, state3, steps):
        if t.numel():
            written.setdefault(id(t), t)
    saved = [(t, t.clone()) for t in written.values()]
    _reference_step(*args)
    for t, old in saved:
        t.copy_(torch.where(skip, old, t))


def _reference_step(algorithm, params, grads, state1, state2, state3, steps, factors, tensor_group, fresh,
                    group_layer, group_lr, group_lr_tensor, group_hyper) -> None:
    members: Dict[int, List[int]] = {}
    for i, g in enumerate(tensor_group):
        members.setdefault(int(g), []).append(i)
    fresh_set = set(int(i) for i in fresh)
    if algorithm == "adamw" and steps:
        torch._foreach_add_(list(steps), 1.0)
    for k, idx in members.items():
        hyper = group_hyper[k * HYPER:(k + 1) * HYPER]
        lr_t = group_lr_tensor[k] if group_lr_tensor else None
        rate = _group_rate(factors, int(group_layer[k]), group_lr[k], lr_t)
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        if algorithm == "sgd":
            wd, mom, damp, nesterov, maximize = hyper[0], hyper[1], hyper[2], hyper[3] != 0, hyper[4] != 0
            if maximize:
                gs = torch._foreach_neg(gs)
            if wd != 0:
                gs = torch._foreach_add(gs, ps, alpha=wd)
            if mom != 0:
                bufs = [state1[i] for i in idx]
                new = [j for j, i in enumerate(idx) if i in fresh_set]
                old = [j for j, i in enumerate(idx) if i not in fresh_set]
                if new:
                    torch._foreach_copy_([bufs[j] for j in new], [gs[j] for j in new])
                if old:
                    ob = [bufs[j] for j in old]
                    torch._foreach_mul_(ob, mom)
                    torch._foreach_add_(ob, [gs[j] for j in old], alpha=1 - damp)
                gs = torch._foreach_add(gs, bufs, alpha=mom) if nesterov else bufs
            if isinstance(rate, float):
                torch._foreach_add_(ps, gs, alpha=-rate)
            else:
                torch._foreach_sub_(ps, _scale(gs, rate))
        else:
            wd, beta1, beta2, eps, amsgrad, maximize = (hyper[0], hyper[1], hyper[2], hyper[3], hyper[4] != 0,
                                                        hyper[5] != 0)
            ms = [state1[i] for i in idx]
            vs = [state2[i] for i in idx]
            st = torch.stack([steps[i].reshape(()) for i in idx]).to(torch.float64)
            # (torch.full is a fill kernel; torch.tensor(x, device=cuda) would be a synchronous copy)
            rate64 = rate if isinstance(rate, torch.Tensor) else torch.full((), rate, dtype=torch.float64,
                                                                            device=st.device)
            if maximize:
                gs = torch._foreach_neg(gs)
            if wd != 0:
                torch._foreach_mul_(ps, 1.0 - rate64 * wd)
            torch._foreach_lerp_(ms, gs, 1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
            step_size = rate64 / (1.0 - torch.pow(beta1, st))
            bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, st))
            if amsgrad:
                ws = [state3[i] for i in idx]
                torch._foreach_maximum_(ws, vs)
                denom = torch._foreach_sqrt(ws)
            else:
                denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, list(bc2_sqrt.unbind()))
            torch._foreach_add_(denom, eps)
            upd = torch._foreach_div(ms, denom)
            torch._foreach_mul_(upd, list(step_size.unbind()))
            torch._foreach_sub_(ps, upd)


def _register_fake(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::layerwise_step")
    def _step_fake(algorithm, params, grads, state1, state2, state3, steps, factors, tensor_group, fresh,
                   group_layer, group_lr, group_lr_tensor, group_hyper, found_inf=None):
        return None


ops.on_native_namespace(_register_fake)


def _run_step(backend: str, *args) -> None:
    if backend in ops.NATIVE_NAMESPACES:
        ops.native_ops(backend).layerwise_step(*args)
    elif backend == "triton":
        importlib.import_module("lwkd_fast.triton.optim").layerwise_step(*args)
    else:
        reference_step(*args)


# ------------------------------------------------------------------------------------------------
# The optimizers
# ------------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- parameters as the kernels see them: DTensor shards, non-dense parameters ------------------

_DTENSOR: Any = False  # torch.distributed.tensor.DTensor once looked up (None: not available)


def _dtensor_type():
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:  # (torch built without distributed support)
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


def _is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _local(t: torch.Tensor) -> torch.Tensor:
    """What a kernel updates: a DTensor's local shard (a view of its storage), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory (any dimension order)."""
    if t.is_contiguous():
        return True
    expect = 1
    for stride, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expect:
            return False
        expect *= n
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same sizes and the same memory order (strides of dimensions of size 1 do not matter)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _work_layout(p: torch.Tensor) -> torch.Tensor:
    """A tensor with the memory layout the kernels use for parameter ``p`` (local shard): ``p``
    itself when it is dense, else the layout ``torch.empty_like(p)`` gives (a meta tensor, no
    storage) -- the layout of the dense working copy a non-dense parameter is updated through,
    and of the state created for it (``torch.zeros_like``)."""
    return p if _is_dense(p) else torch.empty_like(p, device="meta")


def _describe(t) -> str:
    kind = "DTensor " if _is_dtensor(t) else ""
    return f"{kind}shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """Shared machinery of :class:`LayerwiseSGD` and :class:`LayerwiseAdamW`."""

    _algorithm = ""
    _name = ""

    def __init__(self, groups, defaults: Dict[str, Any], *, rate_momentum: float, gamma: float,
                 s_min: float, s_max: float, sync: Optional[str], num_layers: Optional[int],
                 rate_eps: float, process_group=None, rate_normalize: str = "none",
                 rate_ref_momentum: float = rule.DEFAULT_REF_MOMENTUM) -> None:
        name = self._name
        rule.check_rule_options(name, rate_momentum, gamma, s_min, s_max, rate_eps, momentum_name="rate_momentum",
                                rate_normalize=rate_normalize, ref_momentum=rate_ref_momentum,
                                ref_momentum_name="rate_ref_momentum")
        if sync not in _SYNC_CHOICES:
            raise ValueError(f"{name}: unknown sync {sync!r}; expected None or 'all_reduce'")
        if isinstance(groups, torch.Tensor):
            raise TypeError(f"{name}: groups must be a list of dicts with 'params' and 'layer', got a Tensor")
        groups = list(groups)
        if not groups:
            raise ValueError(f"{name}: got an empty list of parameter groups")
        layers = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict):
                raise TypeError(
                    f"{name}: group {i} is a {type(g).__name__}; every group must be a dict with 'params' and "
                    "'layer' (j in 0..K-1, or None for the head)"
                )
            if "layer" not in g:
                raise ValueError(
                    f"{name}: group {i} has no 'layer' key; give each group 'layer': j (its matched layer, "
                    "0..K-1) or 'layer': None for the head group"
                )
            layers.append(self._check_layer(i, g["layer"], None))
        inferred = 1 + max((j for j in layers if j is not None), default=-1)
        if num_layers is None:
            num_layers = inferred
        elif not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < inferred:
            raise ValueError(f"{name}: num_layers={num_layers!r} but the groups use layers up to {inferred - 1}")
        self._num_layers = int(num_layers)
        self._device: Optional[torch.device] = None
        self.rate_momentum, self.gamma, self.s_min, self.s_max = (float(rate_momentum), float(gamma),
                                                                  float(s_min), float(s_max))
        self.rate_eps = float(rate_eps)
        self.rate_normalize, self.rate_ref_momentum = rate_normalize, float(rate_ref_momentum)
        self.sync = sync
        self.process_group = process_group
        self._version = 0            # bumped whenever the cached work list may be stale
        self._flat_key = None
        self._flat: List[Tuple[torch.Tensor, int]] = []
        self._flat_params: List[torch.Tensor] = []
        self._work: Optional[_WorkList] = None
        super().__init__(groups, defaults)
        self._source = None
        # state entries created on a step that may have been skipped (see _Unsettled)
        self._unsettled: Dict[torch.Tensor, _Unsettled] = {}
        self._zero_fresh = False
        self._init_rate_state(self._device or torch.device("cpu"))

    def _init_rate_state(self, dev: torch.device) -> None:
        """The rule's state on ``dev``: factors m = 1, counters 0, rates = the base rates."""
        K = self._num_layers
        self._device = dev
        self._factors = torch.ones(K, dtype=torch.float32, device=dev)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self._skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self._rate_ref = rule.new_reference_state(K, torch.float32, dev)  # used by rate_normalize="running"
        lrs, lr_t = self._layer_base_lrs()
        if lr_t is not None:
            self._rates = lr_t.to(torch.float32).clone()
        else:
            self._rates = torch.tensor(lrs if len(lrs) == K else lrs * K, dtype=torch.float32).to(dev)
        self._placeholder = torch.empty(0, dtype=torch.float32, device=dev)

    # ---- properties ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """K, the number of matched layers (length of ``discrepancies``)."""
        return self._num_layers

    @property
    def rates(self) -> torch.Tensor:
        """(K,) float32 device tensor: the per-layer rates ``eta_j`` the last step applied."""
        return self._rates

    @property
    def factors(self) -> torch.Tensor:
        """(K,) float32 device tensor: the rule's momentum factors ``m_j`` (``eta_j = lr_j m_j``)."""
        return self._factors

    @property
    def rate_reference(self) -> torch.Tensor:
        """(2, K) float32 device tensor: the rule's running reference of ``rate_normalize="running"``
        (row 0 the moving averages of each layer's D, row 1 their accumulated weights; the
        reference is ``R_j = row0[j] / row1[j]``).  Zeros, and unused, with ``"none"``."""
        return self._rate_ref

    @property
    def nonfinite_steps(self) -> torch.Tensor:
        """0-dim int64 device tensor: steps at which some discrepancy was unusable (non-finite or
        negative)."""
        return self._nonfinite

    @property
    def skipped_steps(self) -> torch.Tensor:
        """0-dim int64 device tensor: steps skipped on the device because ``found_inf`` was nonzero."""
        return self._skipped

    # ---- the discrepancy source ------------------------------------------------------------------
    def attach(self, source) -> "_LayerwiseOptimizer":
        """Pull the step's inputs from ``source`` when ``step()`` is called without them (KD
        frameworks call ``optimizer.step()`` with no arguments).

        ``source`` is any object with the attribute ``latest_discrepancies`` (a (K,) tensor, or
        None before its first forward) and, optionally, ``found_inf`` (a 0-dim float32 device
        tensor or None), e.g. a :class:`~lwkd_fast.LayerwiseDistiller`.  Both are read at every
        ``step()``: ``discrepancies`` defaults to ``source.latest_discrepancies`` and
        ``found_inf`` to ``source.found_inf``.  Returns the optimizer.  Copies of the optimizer
        (``copy.deepcopy``, pickling) are not attached."""
        if not hasattr(source, "latest_discrepancies"):
            raise TypeError(f"{self._name}.attach: {type(source).__name__} has no attribute 'latest_discrepancies'; "
                            "a source exposes latest_discrepancies ((K,) tensor or None) and found_inf "
                            "(0-dim tensor or None)")
        self._source = source
        return self

    def detach_source(self) -> None:
        """Forget the source set by :meth:`attach` (``step()`` then needs its arguments again)."""
        self._source = None

    @property
    def source(self):
        """The object set by :meth:`attach`, or None."""
        return self._source

    # ---- groups ----------------------------------------------------------------------------------
    def _check_layer(self, i, layer, K):
        name = self._name
        if layer is None:
            return None
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"{name}: group {i} has layer {layer!r}; expected an int in 0..K-1 or None (head)")
        layer = int(layer)
        if layer < 0 or (K is not None and layer >= K):
            bound = f"0..{K - 1}" if K is not None else "0..K-1"
            raise ValueError(f"{name}: group {i} has layer {layer}; expected {bound} or None for the head")
        return layer

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        name = self._name
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: a parameter group must be a dict, got {type(param_group).__name__}")
        i = len(self.param_groups)
        if "layer" not in param_group:
            raise ValueError(f"{name}: group {i} has no 'layer' key (j in 0..K-1, or None for the head)")
        layer = self._check_layer(i, param_group["layer"], self._num_layers)
        param_group["layer"] = layer  # a plain int (or None): checkpoints stay weights_only-loadable
        ref = self._params_device()  # where the parameters are now (they may have moved since construction)
        super().add_param_group(param_group)
        self._version += 1
        group = self.param_groups[-1]
        for p in group["params"]:
            if ref is None:
                ref = self._device = p.device
            elif p.device != ref:
                raise ValueError(
                    f"{name}: group {i} has a parameter on {p.device} but others are on {ref}; "
                    "the fused step runs on one device"
                )
            if _is_dtensor(p) and self.sync is None and p.device_mesh.size() > 1:
                raise ValueError(
                    f"{name}: group {i} has a parameter sharded over {p.device_mesh.size()} ranks (a DTensor, e.g. "
                    "from fully_shard) but sync=None: every rank computes the discrepancies of its own batch, so "
                    "the shards of one layer would step with different rates. Pass sync='all_reduce' (D is "
                    "averaged over the process group before the rule, so every rank applies the same rates)"
                )
            if p.is_complex():
                raise TypeError(f"{name}: group {i}: complex parameters are not supported")
            if p.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                raise TypeError(f"{name}: group {i}: parameter dtype {p.dtype} is not supported "
                                "(float32, bfloat16, float16, float64)")
        self._check_group(i, group)

    def _check_group(self, i: int, group: Dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"{self._name}: group {i}: a tensor lr must be a floating 0-dim tensor, "
                                 f"got shape {tuple(lr.shape)} dtype {lr.dtype}")
        elif not _is_number(lr) or not lr >= 0.0:
            raise ValueError(f"{self._name}: group {i}: invalid learning rate {lr!r}")

    def _layer_base_lrs(self) -> Tuple[List[float], Optional[torch.Tensor]]:
        """Base rate of each layer: the lr of its first group (else of group 0).  Returns
        ``([x], None)`` when one float serves all layers, ``([x_0..x_K-1], None)`` for distinct
        floats, and ``([], tensor (K,))`` when some of them are tensors."""
        K = self._num_layers
        first: List[Any] = [None] * K
        for g in self.param_groups:
            j = None if g["layer"] is None else int(g["layer"])
            if j is not None and first[j] is None:
                first[j] = g["lr"]
        default = self.param_groups[0]["lr"]
        lrs = [default if x is None else x for x in first]
        if any(isinstance(x, torch.Tensor) for x in lrs):
            dev = self._device or torch.device("cpu")
            # rates that all live in host memory stay there: every rule backend reads a CPU
            # base-rate tensor on the host, so no blocking host-to-device copy happens per step
            if all(x.device.type == "cpu" for x in lrs if isinstance(x, torch.Tensor)):
                dev = torch.device("cpu")
            vals = [_scalar_on(x, dev) for x in lrs]
            return [], torch.stack(vals) if vals else torch.empty(0, dtype=torch.float64, device=dev)
        lrs_f = [float(x) for x in lrs]
        if all(x == lrs_f[0] for x in lrs_f):
            return lrs_f[:1] or [float(default)], None
        return lrs_f, None

    # ---- the step --------------------------------------------------------------------------------
    def _hyper(self, group: Dict[str, Any]) -> List[float]:
        raise NotImplementedError

    def _state_flags(self, group) -> bool:
        """Whether the group needs the optional state list (SGD momentum / AdamW amsgrad)."""
        raise NotImplementedError

    def _gather(self, flat, grads) -> "_WorkList":
        """Build the work list from the flat (param, group index) list and its gradients,
        creating state that is due (slow path, run when the set of gradients changes)."""
        raise NotImplementedError

    def _work_list(self) -> Tuple["_WorkList", List[torch.Tensor]]:
        """The work list of this step and the gradients of its tensors.

        The flat parameter list and the work list are cached; a step only reads ``p.grad`` of
        every parameter (one list comprehension) and reuses the cached lists while the same
        parameters have gradients, so there is no per-tensor Python bookkeeping (state look-ups,
        list building) on the hot path.  The cache is rebuilt when the groups, their parameter
        lists, the state dict or the set of parameters with a gradient change."""
        groups = self.param_groups
        key = (id(self.state), self._version,
               tuple((id(g["params"]), len(g["params"]), self._state_flags(g)) for g in groups))
        if self._flat_key != key:
            self._flat = [(p, gi) for gi, g in enumerate(groups) for p in g["params"]]
            self._flat_params = [p for p, _ in self._flat]
            self._flat_key = key
            self._work = None
        grads = [p.grad for p in self._flat_params]
        present = [g is not None for g in grads]
        work = self._work
        if work is None or work.present != present or not work.same_params():
            work = self._gather(self._flat, grads)
            work.present = present
            self._work = work
            return work, work.grads
        return work, list(itertools.compress(grads, present))

    def _sync_discrepancies(self, d: torch.Tensor, found_inf: Optional[torch.Tensor] = None):
        """All-reduce ``d`` (mean over the group) and the skip flag (nonzero on every rank as
        soon as it is nonzero on one: after a gradient all-reduce a non-finite loss on one rank
        reaches every rank's gradients).  ONE collective of K + 1 values on every rank, whether
        or not this rank has a flag (a rank without one contributes 0), so ranks that differ in
        passing ``found_inf`` still run the same collective and skip together.  Returns the
        averaged D and the reduced flag (the number of ranks that skip; None only in a world of
        one without a flag)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{self._name}: sync='all_reduce' needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, or pass sync=None)"
            )
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return d, found_inf
        dt = torch.float64 if d.dtype == torch.float64 else torch.float32
        flag = (torch.zeros(1, dtype=dt, device=d.device) if found_inf is None
                else (found_inf != 0).to(dt).reshape(1))
        buf = torch.cat([d.to(dt), flag])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        return buf[:-1].div_(world), buf[-1].to(torch.float32)

    def _update_rates(self, d: torch.Tensor, found_inf: Optional[torch.Tensor],
                      skip: Optional[torch.Tensor]) -> None:  # runs under torch.no_grad() (see step)
        lrs, lr_t = self._layer_base_lrs()
        backend = ops.select_backend(rule.OP, self._factors.device)
        ref = self._rate_ref if self.rate_normalize == "running" else None
        eta = rule._backend_call(backend, d, self._factors, self._nonfinite, lrs or [1.0], lr_t,
                                 self.rate_momentum, self.gamma, self.s_min, self.s_max, self.rate_eps, found_inf,
                                 ref, self.rate_ref_momentum)
        if skip is None:
            self._rates.copy_(eta)
        else:  # a skipped step leaves the applied rates as they were (the base rate may have moved)
            self._rates.copy_(torch.where(skip, self._rates, eta))

    def step(self, discrepancies: Optional[torch.Tensor] = None, closure=None, *,
             found_inf: Optional[torch.Tensor] = None):
        """Update the per-layer rates from ``discrepancies`` (K,) on the device, then every
        parameter of every group in one fused pass.

        ``discrepancies`` defaults to ``source.latest_discrepancies`` of the object set by
        :meth:`attach`.  ``found_inf`` (0-dim float32 tensor on the parameters' device, default
        ``source.found_inf`` when a source is attached, else None): when it is nonzero the step
        is skipped on the device -- no parameter, optimizer state, rule state or rate changes,
        as if ``step()`` had not been called -- and :attr:`skipped_steps` counts it; no host
        synchronisation either way.  ``closure`` (optional) is re-evaluated with gradients
        enabled first, as in torch.optim, and its loss is returned (the source is read after
        it).  ``step(closure)`` with a callable as the only argument is ``step(closure=closure)``.

        A step whose every base rate ``group["lr"]`` is 0 needs no discrepancies (that is how
        ``torch.distributed.checkpoint.state_dict`` creates an optimizer's state): without them
        the rule is not applied and only the state is created, as by ``torch.optim``."""
        name = f"{self._name}.step"
        if closure is None and callable(discrepancies) and not isinstance(discrepancies, torch.Tensor):
            discrepancies, closure = None, discrepancies
        src = self._source
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if discrepancies is None and src is not None:
            discrepancies = src.latest_discrepancies
        if discrepancies is None and not self._all_base_rates_zero():
            if src is None:
                raise RuntimeError(f"{name}: no discrepancies given and no source attached; call "
                                   "opt.step(discrepancies) with the (K,) tensor, or opt.attach(distiller) once")
            raise RuntimeError(f"{name}: the attached source ({type(src).__name__}) has latest_discrepancies=None; "
                               "run its forward pass before the step")
        if found_inf is None and src is not None:
            found_inf = getattr(src, "found_inf", None)
        with torch.no_grad():
            self._follow_params()
            dev = self._factors.device
            d = None if discrepancies is None else rule.check_discrepancies(name, discrepancies, self._num_layers,
                                                                            dev)
            fi = rule.check_found_inf(name, found_inf, dev)
            if self.sync == "all_reduce" and d is not None:
                d, fi = self._sync_discrepancies(d, fi)
            skip = None if fi is None else fi != 0
            if self._unsettled:
                self._settle()
            if d is not None:
                self._update_rates(d, fi, skip)
            group_layer, group_lr, group_lr_tensor, hyper = [], [], [], []
            for group in self.param_groups:
                group_layer.append(-1 if group["layer"] is None else int(group["layer"]))
                lr = group["lr"]
                if isinstance(lr, torch.Tensor):
                    group_lr.append(0.0)
                    group_lr_tensor.append(lr)
                else:
                    group_lr.append(float(lr))
                    group_lr_tensor.append(None)
                hyper.extend(self._hyper(group))
            self._zero_fresh = fi is not None
            work, grads = self._work_list()
            if work.params:
                params, grads, copies = work.kernel_inputs(grads)
                backend = ops.select_backend(OP, dev)
                groups_args = (group_layer, group_lr, group_lr_tensor, hyper)
                if self._unsettled and self._algorithm == "sgd" and work.s1:
                    self._split_step(backend, work, params, grads, groups_args, fi, skip)
                else:
                    _run_step(backend, self._algorithm, params, grads, work.s1, work.s2, work.s3, work.steps,
                              self._factors, work.tgroup, work.fresh, *groups_args, *([fi] if fi is not None else []))
                for param, dense in copies:  # copy-out of the non-dense parameters' working copies
                    param.copy_(dense)
            created = work.commit(self.state)
            if skip is not None:
                self._skipped.add_(skip)
            if self._unsettled or (created and skip is not None):
                self._track(work, created, skip)
        return loss

    def _all_base_rates_zero(self) -> bool:
        """Whether every group's base rate is 0 (a tensor rate is read only from host memory)."""
        for g in self.param_groups:
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device.type != "cpu" or lr.numel() != 1 or lr.detach().reshape(()).item() != 0.0:
                    return False
            elif lr != 0:
                return False
        return True

    # ---- placement: the rate state follows the parameters ----------------------------------------
    def _params_device(self) -> Optional[torch.device]:
        first = next((p for g in self.param_groups for p in g["params"]), None)
        return None if first is None else first.device

    def _follow_params(self) -> None:
        """Move the rate state (factors, rates, counters) to the parameters' device when they
        moved after construction (``model.cuda()`` after building the optimizer, as RepDistiller
        does).  A copy of K + 3 numbers, queued without waiting (non-blocking) when it goes to
        an accelerator; per-parameter state follows when its parameter is next stepped."""
        dev = self._params_device()
        if dev is None or dev == self._factors.device:
            return
        if self._factors.device.type == "meta":  # built on a meta model: there are no values to keep
            self._unsettled = {}
            self._init_rate_state(dev)
        else:
            if self._unsettled:
                self._settle(block=True)  # (their flags live on the old device)
            for attr in ("_factors", "_nonfinite", "_skipped", "_rates", "_rate_ref"):
                setattr(self, attr, getattr(self, attr).to(dev, non_blocking=True))
            self._placeholder = torch.empty(0, dtype=torch.float32, device=dev)
            self._device = dev
        self._version += 1

    # ---- every state tensor against its parameter ------------------------------------------------
    def _param_name(self, gi: int, p: torch.Tensor) -> str:
        k = next((i for i, q in enumerate(self.param_groups[gi]["params"]) if q is p), "?")
        return f"param_groups[{gi}]['params'][{k}] ({_describe(p)})"

    def _check_grad(self, op: str, gi: int, p: torch.Tensor, g: torch.Tensor) -> None:
        if g.is_sparse:
            raise RuntimeError(f"{op}: {self._param_name(gi, p)} has a sparse gradient; the fused step needs dense "
                               "gradients")
        if _is_dtensor(p) != _is_dtensor(g) or (_is_dtensor(p) and (g.placements != p.placements
                                                                     or g.device_mesh != p.device_mesh)):
            what = f"placements {g.placements}" if _is_dtensor(g) else "a plain tensor"
            raise ValueError(f"{op}: the gradient of {self._param_name(gi, p)} is {what} but the parameter is "
                             f"{'sharded as ' + str(p.placements) if _is_dtensor(p) else 'a plain tensor'}; the "
                             "fused step updates each rank's local shard and needs the gradient laid out like "
                             "its parameter")

    def _placed_state(self, op: str, gi: int, p: torch.Tensor, key: str, v) -> torch.Tensor:
        """``state[p][key]`` checked against its parameter -- shape, dtype, DTensor placements --
        and returned on the parameter's device in the kernels' memory layout (moved or re-laid
        out when the parameter moved or changed layout).  A mismatch raises naming the
        parameter, the key and both shapes: such state was not made for this parameter."""
        lp = _local(p)
        if key == "step":
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or _is_dtensor(v):
                got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{op}: state['step'] of {self._param_name(gi, p)} must be a one-element tensor "
                                 f"(the parameter's step count), got {got}")
            if v.dtype != torch.float32 or v.device != lp.device or v.dim() != 0:
                v = v.detach().to(device=lp.device, dtype=torch.float32).reshape(())
            return v
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{op}: state[{key!r}] of {self._param_name(gi, p)} is a {type(v).__name__}, "
                            "expected a tensor like the parameter")
        fits = _is_dtensor(v) == _is_dtensor(p) and v.shape == p.shape and v.dtype == p.dtype
        if fits and _is_dtensor(p):
            fits = v.placements == p.placements and v.device_mesh == p.device_mesh and _local(v).shape == lp.shape
        if not fits:
            raise ValueError(
                f"{op}: state[{key!r}] of {self._param_name(gi, p)} has {_describe(v)}"
                f"{' placements ' + str(v.placements) if _is_dtensor(v) else ''} but the parameter has shape "
                f"{tuple(p.shape)}, dtype {p.dtype}{' placements ' + str(p.placements) if _is_dtensor(p) else ''}: "
                "this state was not made for this parameter (an optimizer checkpoint of another model, or a "
                "parameter resized or re-typed after the optimizer stepped)")
        lv = _local(v)
        if lv.device == lp.device and _is_dense(lv) and _same_layout(lv, _work_layout(lp)):
            return v
        if _is_dtensor(p):
            raise ValueError(f"{op}: state[{key!r}] of {self._param_name(gi, p)}: its local shard (strides "
                             f"{lv.stride()}, {lv.device}) is not laid out like the parameter's (strides "
                             f"{lp.stride()}, {lp.device})")
        return torch.empty_like(p).copy_(v, non_blocking=True)

    # ---- state created on a step that may have been skipped --------------------------------------
    # The device decides whether a step with `found_inf` ran; the host, which must not wait for
    # it, still has to create state for parameters seen for the first time (AdamW moments, SGD
    # momentum buffers).  Such entries are "unsettled": a device flag says whether every step
    # they took part in was skipped (then they are still uninitialised).  AdamW's initial state
    # (zeros, step 0) is exact either way; an SGD buffer is not (torch's first step sets
    # buf = g), so while unsettled the step runs its tensors twice, once as fresh and once as
    # continuing, each call skipped on the device unless it is the right one (_split_step).
    # The host learns the flag without waiting (CPU: at once; CUDA: a pinned copy and an event)
    # and then drops never-initialised entries (torch would have none), so state_dict() matches
    # the run without the skipped steps.

    def _settle(self, block: bool = False) -> None:
        """Drop unsettled entries whose flag is known (``block=True``: wait for it)."""
        done: Dict[int, Optional[bool]] = {}
        dropped = False
        for p, u in list(self._unsettled.items()):
            if id(u) not in done:
                done[id(u)] = u.value(block)
            uninit = done[id(u)]
            if uninit is None:
                continue
            del self._unsettled[p]
            if uninit:
                st = self.state.get(p)
                if st is not None:
                    if self._algorithm == "sgd":
                        st.pop("momentum_buffer", None)
                    else:
                        st.clear()
                    if not st:
                        del self.state[p]
                dropped = True
        if dropped:
            self._version += 1  # the cached work list refers to dropped state

    def _track(self, work: "_WorkList", created: List[torch.Tensor], skip: Optional[torch.Tensor]) -> None:
        """After a step: entries created now (with a skip flag) become unsettled; unsettled
        entries that took part are initialised unless this step was skipped too."""
        new: Dict[int, _Unsettled] = {}
        unsettled = self._unsettled
        if unsettled:
            sgd = self._algorithm == "sgd"
            for i, p in enumerate(work.owners):
                u = unsettled.get(p)
                if u is None or (sgd and (not work.s1 or work.s1[i] is self._placeholder)):
                    continue  # (an SGD tensor whose group has no momentum now leaves its buffer alone)
                if skip is None:  # this step certainly ran: the entry is initialised
                    del unsettled[p]
                    continue
                if id(u) not in new:
                    new[id(u)] = _Unsettled(u.flag & skip)
                unsettled[p] = new[id(u)]
        if created and skip is not None:
            fresh = _Unsettled(skip.clone())
            for p in created:
                unsettled[p] = fresh
        if unsettled and _EAGER_HOST_READ:
            self._settle()

    def _split_step(self, backend, work: "_WorkList", params, grads, groups_args, fi, skip) -> None:
        """SGD step while some momentum buffers are unsettled: those tensors run in two calls,
        as fresh (``buf = g``) and as continuing, and the device skips the wrong one."""
        rest: List[int] = []
        cohorts: Dict[int, Tuple[_Unsettled, List[int]]] = {}
        fresh_set = set(work.fresh)
        for i, p in enumerate(work.owners):
            u = self._unsettled.get(p)
            if u is None or i in fresh_set or work.s1[i] is self._placeholder:
                rest.append(i)
            else:
                cohorts.setdefault(id(u), (u, []))[1].append(i)

        def call(idx, fresh, flag):
            pos = {i: k for k, i in enumerate(idx)}
            _run_step(backend, "sgd", [params[i] for i in idx], [grads[i] for i in idx],
                      [work.s1[i] for i in idx], [], [], [], self._factors, [work.tgroup[i] for i in idx],
                      [pos[i] for i in fresh], *groups_args, *([flag] if flag is not None else []))

        if rest:
            call(rest, [i for i in rest if i in fresh_set], fi)
        for u, idx in cohorts.values():
            as_fresh = ~u.flag if skip is None else (~u.flag) | skip       # skip unless still uninitialised
            as_continuing = u.flag if skip is None else u.flag | skip       # skip unless initialised
            call(idx, idx, as_fresh.to(torch.float32))
            call(idx, [], as_continuing.to(torch.float32))

    # ---- checkpoints -------------------------------------------------------------------------------
    def _layerwise_state(self) -> Dict[str, Any]:
        return {
            "factors": self._factors,
            "rates": self._rates,
            "nonfinite_steps": self._nonfinite,
            "skipped_steps": self._skipped,
            "num_layers": self._num_layers,
            "rate_momentum": self.rate_momentum,
            "gamma": self.gamma,
            "s_min": self.s_min,
            "s_max": self.s_max,
            "rate_eps": self.rate_eps,
            "rate_normalize": self.rate_normalize,
            "rate_ref_momentum": self.rate_ref_momentum,
            "rate_reference": self._rate_ref,
            "sync": self.sync,
            "algorithm": self._algorithm,
        }

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state dict plus ``"layerwise"``: factors, rates, the non-finite and
        skipped-step counters and the rule's hyper-parameters (references to the live tensors,
        as torch does).  The same record is also ``param_groups[0]["layerwise"]``, because
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only
        ``state`` and ``param_groups``.  If state was created on steps whose skip flag the host
        has not seen yet, this waits for the flag once (so the dict holds no never-initialised
        entries)."""
        if self._unsettled:
            self._settle(block=True)
        sd = super().state_dict()
        record = self._layerwise_state()
        sd["layerwise"] = record
        if sd["param_groups"]:
            sd["param_groups"][0]["layerwise"] = record
        return sd

    _STATE_KEYS: Tuple[str, ...] = ()  # the per-parameter state keys the step uses

    @staticmethod
    def _find_layerwise(op: str, state_dict) -> Dict[str, Any]:
        lw = state_dict.get("layerwise") if isinstance(state_dict, dict) else None
        if lw is None and isinstance(state_dict, dict):
            groups = state_dict.get("param_groups") or []
            lw = next((g["layerwise"] for g in groups if isinstance(g, dict) and "layerwise" in g), None)
        if not isinstance(lw, dict):
            raise ValueError(f"{op}: the state dict has no 'layerwise' entry (it was not saved by a LayerwiseSGD / "
                             "LayerwiseAdamW)")
        return lw

    def _check_loaded_shapes(self, op: str, sd: Dict[str, Any]) -> None:
        """Before anything is loaded: every state tensor has its parameter's shape (torch.optim
        would load another model's state whenever the group sizes agree)."""
        saved = sd.get("param_groups") or []
        if len(saved) != len(self.param_groups):
            return  # torch's load_state_dict raises for this
        ids = itertools.chain.from_iterable(g.get("params", ()) for g in saved)
        mine = ((gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"])
        where = dict(zip(ids, mine))
        for k, st in (sd.get("state") or {}).items():
            if k not in where or not isinstance(st, dict):
                continue
            gi, p = where[k]
            for key, v in st.items():
                if key not in self._STATE_KEYS or v is None:
                    continue
                if key == "step":
                    ok = isinstance(v, numbers.Number) or (isinstance(v, torch.Tensor) and v.numel() == 1)
                else:
                    ok = isinstance(v, torch.Tensor) and v.shape == p.shape
                if not ok:
                    got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(
                        f"{op}: state[{key!r}] of {self._param_name(gi, p)} in the checkpoint has {got} but the "
                        f"parameter has shape {tuple(p.shape)}: the checkpoint was saved for another model (or "
                        "with other parameter groups)")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one that went through torch.distributed.checkpoint,
        which carries the layer-wise record in ``param_groups[0]``).  Every state tensor is
        checked against its parameter first (shape; then dtype, placements) and placed like
        torch.optim places it -- on the parameter's device, floating state in its dtype -- and
        in the kernels' memory layout; the rate state goes to the parameters' device.  State
        tensors are copied (the optimizer never shares storage with the dict it loaded from).
        ``sync`` and ``process_group`` stay as constructed: they describe this run, not the
        checkpoint."""
        name = self._name
        op = f"{name}.load_state_dict"
        lw = self._find_layerwise(op, state_dict)
        if lw.get("algorithm", self._algorithm) != self._algorithm:
            raise ValueError(f"{op}: the state dict was saved by a {lw.get('algorithm')!r} optimizer, this one is "
                             f"{self._algorithm!r}")
        K = int(lw["num_layers"])
        if K != self._num_layers:
            raise ValueError(f"{op}: the state dict has num_layers={K} but this optimizer has {self._num_layers}")
        for key in ("factors", "rates"):
            if tuple(lw[key].shape) != (K,):
                raise ValueError(f"{op}: layerwise[{key!r}] has shape {tuple(lw[key].shape)}, expected ({K},)")
        # (checkpoints written before rate_normalize existed used the rule "none")
        normalize = lw.get("rate_normalize", "none")
        ref_momentum = float(lw.get("rate_ref_momentum", rule.DEFAULT_REF_MOMENTUM))
        rule.check_rule_options(op, self.rate_momentum, self.gamma, self.s_min, self.s_max,
                                self.rate_eps, rate_normalize=normalize, ref_momentum=ref_momentum,
                                ref_momentum_name="rate_ref_momentum")
        reference = lw.get("rate_reference")
        if reference is not None and tuple(reference.shape) != (2, K):
            raise ValueError(f"{op}: layerwise['rate_reference'] has shape {tuple(reference.shape)}, expected (2, {K})")
        sd = {k: v for k, v in state_dict.items() if k != "layerwise"}
        sd["param_groups"] = [{k: v for k, v in g.items() if k != "layerwise"} for g in state_dict["param_groups"]]
        self._check_loaded_shapes(op, sd)
        source_ids = {id(v) for s in state_dict["state"].values() for v in s.values() if isinstance(v, torch.Tensor)}
        super().load_state_dict(sd)
        for i, g in enumerate(self.param_groups):
            self._check_layer(i, g.get("layer", "missing"), K)
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                st = self.state.get(p)
                for key, v in list(st.items()) if st else ():
                    if key in self._STATE_KEYS and v is not None:
                        v = st[key] = self._placed_state(op, gi, p, key, v)
                    if isinstance(v, torch.Tensor) and id(v) in source_ids:
                        st[key] = v.clone()
        self._version += 1
        dev = self._params_device() or self._factors.device
        if dev != self._factors.device:
            self._init_rate_state(dev)
        self._factors.copy_(lw["factors"])
        self._rates.copy_(lw["rates"])
        if reference is None:
            self._rate_ref.zero_()
        else:
            self._rate_ref.copy_(reference)
        self.rate_normalize, self.rate_ref_momentum = normalize, ref_momentum
        self._nonfinite.copy_(lw["nonfinite_steps"].reshape(()))
        skipped = lw.get("skipped_steps")  # (absent from checkpoints written before it existed)
        if skipped is None:
            self._skipped.zero_()
        else:
            self._skipped.copy_(skipped.reshape(()))
        self._unsettled = {}
        self.rate_momentum = float(lw["rate_momentum"])
        self.gamma = float(lw["gamma"])
        self.s_min = float(lw["s_min"])
        self.s_max = float(lw["s_max"])
        self.rate_eps = float(lw.get("rate_eps", self.rate_eps))

    # copy.deepcopy / pickle keep the layer-wise attributes too
    _EXTRA = ("_num_layers", "_device", "rate_momentum", "gamma", "s_min", "s_max", "rate_eps", "sync",
              "process_group", "_factors", "_nonfinite", "_skipped", "_rates", "_placeholder", "_version",
              "rate_normalize", "rate_ref_momentum", "_rate_ref")

    def __getstate__(self) -> Dict[str, Any]:
        if getattr(self, "_unsettled", None):
            self._settle(block=True)
        state = super().__getstate__()
        for k in self._EXTRA:
            if hasattr(self, k):
                state[k] = getattr(self, k)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # the work-list cache refers to the original's tensors: start a fresh one
        self._flat_key, self._flat, self._flat_params, self._work = None, [], [], None
        self._source, self._unsettled, self._zero_fresh = None, {}, False  # a copy is not attached
        if not hasattr(self, "_skipped"):
            self._skipped = torch.zeros((), dtype=torch.int64, device=self._factors.device)
        if not hasattr(self, "_rate_ref"):  # pickled before rate_normalize existed: the rule "none"
            self.rate_normalize, self.rate_ref_momentum = "none", rule.DEFAULT_REF_MOMENTUM
            self._rate_ref = rule.new_reference_state(self._num_layers, torch.float32, self._factors.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(K={self._num_layers}, groups={len(self.param_groups)}, "
                f"rate_momentum={self.rate_momentum}, gamma={self.gamma}, s_min={self.s_min}, "
                f"s_max={self.s_max}, rate_normalize={self.rate_normalize!r}, sync={self.sync!r})")


def _scalar_on(x, device: torch.device) -> torch.Tensor:
    """A base rate (float or 0-dim tensor) as a 0-dim float64 tensor on ``device``; a CPU tensor
    goes to an accelerator through pinned memory, without blocking the host."""
    if not isinstance(x, torch.Tensor):
        return torch.full((), float(x), dtype=torch.float64, device=device)
    x = x.detach().reshape(()).to(torch.float64)
    if x.device == device:
        return x
    if x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


_EAGER_HOST_READ = True  # learn skip flags on the host as soon as that costs no wait (tests turn it off)


class _Unsettled:
    """Whether state entries created on a possibly skipped step are still uninitialised: a
    0-dim bool device flag (True: every step they took part in was skipped), and its value on
    the host once that is known without waiting -- at once on the CPU (host memory, read
    through a numpy view rather than a tensor method), after a pinned copy's event on CUDA."""

    __slots__ = ("flag", "_np", "_host", "_event")

    def __init__(self, flag: torch.Tensor) -> None:
        self.flag = flag
        self._np = self._host = self._event = None
        if not _EAGER_HOST_READ:
            return
        if flag.device.type == "cpu":
            self._np = np.zeros((), dtype=np.bool_)
            torch.from_numpy(self._np).copy_(flag)
        elif flag.device.type == "cuda":
            # the copy runs on the current stream of the flag's device, which need not be the
            # current device: the event is recorded on that same stream
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))

    def value(self, block: bool = False) -> Optional[bool]:
        """True / False once known; None while the device has not got there (``block``: wait)."""
        if self._np is not None:
            return bool(self._np)
        if self._event is not None and (block or self._event.query()):
            self._event.synchronize()  # (returns at once after a successful query)
            return bool(self._host)
        if block:
            return bool(self.flag)  # a host synchronisation: checkpoints only
        return None


class _WorkList:
    """The tensors one fused step updates (those with a gradient), their state tensors and
    their group indices, as handed to the step op; plus what to record in ``opt.state`` once
    the step has run (SGD momentum buffers created by this step) and which parameters' state
    this work list created (``created``).

    ``owners`` are the parameters themselves, ``params`` what the kernels update: the same
    tensor, or -- resolved again at every step (:meth:`kernel_inputs`) for the indices in
    ``special`` -- a DTensor's local shard, or a dense working copy of a non-dense parameter
    (copied in before the call and out after it).  ``shapes`` / ``dtypes`` are the owners'
    at build time: :meth:`same_params` tells a parameter resized or re-typed since."""

    __slots__ = ("owners", "params", "grads", "s1", "s2", "s3", "steps", "tgroup", "fresh", "pending", "present",
                 "created", "special", "shapes", "dtypes", "plain", "ptrs", "special_ptrs")

    def __init__(self, owners, params, grads, s1, s2, s3, steps, tgroup, fresh=(), pending=(), created=()):
        self.owners, self.params, self.grads, self.s1, self.s2, self.s3 = owners, params, grads, s1, s2, s3
        self.steps, self.tgroup = steps, tgroup
        self.fresh, self.pending = list(fresh), list(pending)
        self.created = list(created) + [p for p, _ in self.pending]
        self.present: Optional[List[bool]] = None
        self.special = [i for i, p in enumerate(owners) if _is_dtensor(p) or not _is_dense(p)]
        special = set(self.special)
        self.plain = [p for i, p in enumerate(owners) if i not in special]
        self.shapes = [p.shape for p in owners]
        self.dtypes = [p.dtype for p in owners]
        self.ptrs = [p.data_ptr() for p in self.plain]
        self.special_ptrs = self._special_ptrs()

    def _special_ptrs(self) -> List[int]:
        return [_local(self.owners[i]).data_ptr() for i in self.special]

    def same_params(self) -> bool:
        """No parameter was replaced under the optimizer since the list was built (``p.data =
        ...``, ``model.to(...)``): same shapes and dtypes, same storage addresses (a new
        storage is what a change of device, dtype or memory layout makes)."""
        owners = self.owners
        return ([p.shape for p in owners] == self.shapes and [p.data_ptr() for p in self.plain] == self.ptrs
                and [p.dtype for p in owners] == self.dtypes
                and (not self.special or self._special_ptrs() == self.special_ptrs))

    def kernel_inputs(self, grads):
        """``(params, grads, copies)`` for this step's kernel call; ``copies`` pairs each
        non-dense parameter with the dense working copy to copy back after the call."""
        if not self.special:
            return self.params, grads, ()
        params, grads, copies = list(self.params), list(grads), []
        for i in self.special:
            p = _local(self.owners[i])
            grads[i] = _local(grads[i])
            if not _is_dense(p):
                dense = torch.empty_like(p)  # the layout of the state created for p (zeros_like)
                dense.copy_(p)
                copies.append((p, dense))
                p = dense
            params[i] = p
        return params, grads, copies

    def commit(self, state) -> List[torch.Tensor]:
        """Record the step's new state; returns the parameters whose state it created."""
        if self.pending:
            for p, buf in self.pending:
                state[p]["momentum_buffer"] = buf
            self.pending = []
            self.fresh = []  # from now on these buffers carry momentum
        self.grads = []  # do not keep this step's gradients alive
        created, self.created = self.created, []
        return created


class LayerwiseSGD(_LayerwiseOptimizer):
    """SGD with per-layer learning rates driven by layer discrepancies (SPEC sections 4-5).

    ``groups``: dicts with ``"params"`` and ``"layer"`` (j in 0..K-1, or None for the head, factor
    1) and optionally any SGD hyper-parameter of their own.  ``lr`` is the base rate (a float or
    a 0-dim tensor; schedulers drive ``param_groups[i]["lr"]``).  ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``, ``maximize`` mean exactly what they mean for
    ``torch.optim.SGD``.  ``rate_momentum`` (mu), ``gamma``, ``s_min``, ``s_max`` (and
    ``rate_eps``) parameterise the rule; ``rate_normalize`` chooses it: ``"none"`` (rates from D
    itself) or ``"running"`` (each layer's D divided by its own bias-corrected running mean,
    decay ``rate_ref_momentum``, first: rates that do not depend on a layer's scale; the
    reference is optimizer state, :attr:`rate_reference`).  ``sync="all_reduce"`` averages the discrepancies over
    the ``torch.distributed`` group (``process_group``) before the rule.  ``num_layers`` fixes K
    (default: one past the largest layer index of the groups).

    ``opt.step(discrepancies)`` with a (K,) tensor on the parameters' device.
    """

    _algorithm = "sgd"
    _name = "LayerwiseSGD"
    _STATE_KEYS = ("momentum_buffer",)

    def __init__(self, groups, lr: Union[float, torch.Tensor], momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, rate_momentum: float = 0.9, gamma: float = 1.0,
                 s_min: float = 0.1, s_max: float = 10.0, sync: Optional[str] = None, *,
                 num_layers: Optional[int] = None, rate_eps: float = 1e-12, process_group=None,
                 rate_normalize: str = DEFAULT_RATE_NORMALIZE,
                 rate_ref_momentum: float = rule.DEFAULT_REF_MOMENTUM) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(groups, defaults, rate_momentum=rate_momentum, gamma=gamma, s_min=s_min, s_max=s_max,
                         sync=sync, num_layers=num_layers, rate_eps=rate_eps, process_group=process_group,
                         rate_normalize=rate_normalize, rate_ref_momentum=rate_ref_momentum)

    def _check_group(self, i: int, group: Dict[str, Any]) -> None:
        super()._check_group(i, group)
        n = self._name
        for key in ("momentum", "dampening", "weight_decay"):
            v = group[key]
            if not _is_number(v) or math.isnan(v):
                raise ValueError(f"{n}: group {i}: {key} must be a number, got {v!r}")
        if group["momentum"] < 0.0:
            raise ValueError(f"{n}: group {i}: invalid momentum value {group['momentum']!r}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"{n}: group {i}: invalid weight_decay value {group['weight_decay']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{n}: group {i}: Nesterov momentum requires a momentum and zero dampening")

    def _hyper(self, group) -> List[float]:
        return [float(group["weight_decay"]), float(group["momentum"]), float(group["dampening"]),
                1.0 if group["nesterov"] else 0.0, 1.0 if group["maximize"] else 0.0, 0.0]

    def _state_flags(self, group) -> bool:
        return group["momentum"] != 0

    def _gather(self, flat, grads) -> _WorkList:
        op = f"{self._name}.step"
        owners, params, gs, bufs, tgroup, fresh, pending = [], [], [], [], [], [], []
        any_mom = False
        state = self.state
        groups = self.param_groups
        for (p, gi), g in zip(flat, grads):
            if g is None:
                continue
            self._check_grad(op, gi, p, g)
            if groups[gi]["momentum"] != 0:
                any_mom = True
                st = state.get(p)  # (a plain lookup: does not create an entry)
                buf = st.get("momentum_buffer") if st else None
                if buf is None:
                    # (zeros when the step may be skipped: the buffer then stays unused but defined)
                    new = torch.zeros_like if self._zero_fresh else torch.empty_like
                    buf = new(p, memory_format=torch.preserve_format)
                    fresh.append(len(params))
                    pending.append((p, buf))
                else:
                    buf = st["momentum_buffer"] = self._placed_state(op, gi, p, "momentum_buffer", buf)
                bufs.append(_local(buf))
            else:
                bufs.append(self._placeholder)
            owners.append(p)
            params.append(_local(p))
            gs.append(_local(g))
            tgroup.append(gi)
        # buffers enter the state only once the step has run (see _WorkList.commit)
        return _WorkList(owners, params, gs, bufs if any_mom else [], [], [], [], tgroup, fresh, pending)


class LayerwiseAdamW(_LayerwiseOptimizer):
    """AdamW with per-layer learning rates driven by layer discrepancies (SPEC sections 4-5).

    Groups, ``lr``, the rule options, ``sync`` and ``num_layers`` as for :class:`LayerwiseSGD`.
    ``betas``, ``eps``, ``weight_decay`` (decoupled, scaled by the layer's rate), ``amsgrad`` and
    ``maximize`` mean exactly what they mean for ``torch.optim.AdamW``; bias corrections use each
    parameter's own step count, kept on the device in ``state[p]["step"]``.
    """

    _algorithm = "adamw"
    _name = "LayerwiseAdamW"
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, groups, lr: Union[float, torch.Tensor], betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
                 rate_momentum: float = 0.9, gamma: float = 1.0, s_min: float = 0.1, s_max: float = 10.0,
                 sync: Optional[str] = None, *, num_layers: Optional[int] = None, rate_eps: float = 1e-12,
                 process_group=None, rate_normalize: str = DEFAULT_RATE_NORMALIZE,
                 rate_ref_momentum: float = rule.DEFAULT_REF_MOMENTUM) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(groups, defaults, rate_momentum=rate_momentum, gamma=gamma, s_min=s_min, s_max=s_max,
                         sync=sync, num_layers=num_layers, rate_eps=rate_eps, process_group=process_group,
                         rate_normalize=rate_normalize, rate_ref_momentum=rate_ref_momentum)

    def _check_group(self, i: int, group: Dict[str, Any]) -> None:
        super()._check_group(i, group)
        n = self._name
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_number(b) for b in betas):
            raise ValueError(f"{n}: group {i}: betas must be a pair of numbers, got {betas!r}")
        for k, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{n}: group {i}: invalid beta parameter at index {k}: {b!r}")
        if not _is_number(group["eps"]) or not group["eps"] >= 0.0:
            raise ValueError(f"{n}: group {i}: invalid epsilon value {group['eps']!r}")
        if not _is_number(group["weight_decay"]) or not group["weight_decay"] >= 0.0:
            raise ValueError(f"{n}: group {i}: invalid weight_decay value {group['weight_decay']!r}")

    def _hyper(self, group) -> List[float]:
        b1, b2 = group["betas"]
        return [float(group["weight_decay"]), float(b1), float(b2), float(group["eps"]),
                1.0 if group["amsgrad"] else 0.0, 1.0 if group["maximize"] else 0.0]

    def _state_flags(self, group) -> bool:
        return bool(group["amsgrad"])

    def _gather(self, flat, grads) -> _WorkList:
        op = f"{self._name}.step"
        owners, params, gs, ms, vs, ws, steps, tgroup, created = [], [], [], [], [], [], [], [], []
        any_ams = False
        state = self.state
        groups = self.param_groups
        for (p, gi), g in zip(flat, grads):
            if g is None:
                continue
            self._check_grad(op, gi, p, g)
            ams = bool(groups[gi]["amsgrad"])
            any_ams |= ams
            s = state[p]
            if len(s) == 0:  # lazy initialisation, exactly torch's initial state
                s["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                created.append(p)
            else:
                self._check_adamw_state(op, gi, p, s)
            if ams and "max_exp_avg_sq" not in s:
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            owners.append(p)
            params.append(_local(p))
            gs.append(_local(g))
            ms.append(_local(s["exp_avg"]))
            vs.append(_local(s["exp_avg_sq"]))
            ws.append(_local(s["max_exp_avg_sq"]) if ams else self._placeholder)
            steps.append(s["step"])
            tgroup.append(gi)
        return _WorkList(owners, params, gs, ms, vs, ws if any_ams else [], steps, tgroup, created=created)

    def _check_adamw_state(self, op: str, gi: int, p: torch.Tensor, s: Dict[str, Any]) -> None:
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in s]
        if missing:
            raise ValueError(f"{op}: the state of {self._param_name(gi, p)} has {sorted(s)} but lacks "
                             f"{', '.join(map(repr, missing))}; AdamW state holds step, exp_avg and exp_avg_sq")
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in s:
                s[key] = self._placed_state(op, gi, p, key, s[key])


# ------------------------------------------------------------------------------------------------
# `lwkd-fast check`: the fused step against torch.optim in float64 with the oracle's rates
# ------------------------------------------------------------------------------------------------


def _check_params(device, dtype):
    """A small ResNet-like list: 4-D conv weights, 1-D norms/biases, a 0-dim scalar, a 2-D head,
    ragged sizes; returns (tensors, layer of each, which ones never get a gradient)."""
    g = torch.Generator().manual_seed(21)
    shapes = [((8, 3, 3, 3), 0), ((8,), 0), ((), 0), ((16, 8, 3, 3), 1), ((16,), 1), ((13,), 1),
              ((24, 16, 1, 1), 2), ((24,), 2), ((10, 24), None), ((10,), None)]
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s, _ in shapes]
    return tensors, [j for _, j in shapes], {5}


def _check_run(kind: str, cfg: Dict[str, Any], device, dtype, steps: int = 4):
    from .testing import compare

    base, layers, no_grad = _check_params(device, dtype)
    K = 3
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in base] for _ in range(steps)]
    # every run starts from the same dtype-representable values (SPEC section 6: the float64
    # reference computes from the low-precision inputs)
    base = [t.to(dtype).double() for t in base]
    grads = [[t.to(dtype).double() for t in row] for row in grads]
    ds = [(torch.rand(K, generator=gen, dtype=torch.float64) + 0.05).to(torch.float32) for _ in range(steps)]

    def groups_of(ts):
        out = []
        for j in list(range(K)) + [None]:
            out.append({"params": [t for t, l in zip(ts, layers) if l == j], "layer": j})
        return out

    def run_ours():
        ps = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True) for t in base]
        cls = LayerwiseSGD if kind == "sgd" else LayerwiseAdamW
        opt = cls(groups_of(ps), **cfg)
        for s in range(steps):
            for i, p in enumerate(ps):
                p.grad = None if i in no_grad else grads[s][i].to(device=device, dtype=dtype)
            opt.step(ds[s].to(device))
        return ps

    def run_torch(tdtype, foreach):
        ps = [t.detach().to(tdtype, copy=True).requires_grad_(True) for t in base]
        tcfg = {k: v for k, v in cfg.items() if k not in ("rate_momentum", "gamma", "s_min", "s_max")}
        lr = tcfg.pop("lr")
        cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
        opt = cls(groups_of(ps), lr=lr, foreach=foreach, **tcfg)
        m = [1.0] * K
        rm = {k: cfg[k] for k in ("gamma", "s_min", "s_max") if k in cfg}
        mu = cfg.get("rate_momentum", 0.9)
        for s in range(steps):
            eta, m, _ = rule.oracle_rates([float(x) for x in ds[s].double()], m, lr, mu,
                                          rm.get("gamma", 1.0), rm.get("s_min", 0.1), rm.get("s_max", 10.0))
            # the optimizer's factors and rates are float32: hand torch the same rate values
            m = torch.tensor(m, dtype=torch.float32).double().tolist()
            eta = torch.tensor(eta, dtype=torch.float32).double().tolist()
            for grp in opt.param_groups:
                grp["lr"] = lr if grp["layer"] is None else eta[grp["layer"]]
            for i, p in enumerate(ps):
                p.grad = None if i in no_grad else grads[s][i].to(tdtype)
            opt.step()
        return ps

    ours = run_ours()
    ref = run_torch(torch.float64, False)
    if dtype in (torch.float32, torch.float64):
        return {f"param[{i}]": compare(o.detach(), r.detach(), dtype) for i, (o, r) in enumerate(zip(ours, ref))}
    # low precision: the "2 x eager error" rule over all parameters at once (a single element's
    # eager error is a matter of rounding luck; eager torch also rounds lr to the parameter dtype)
    eager = run_torch(dtype, False)

    def flat(ts):
        return torch.cat([t.detach().reshape(-1).double() for t in ts])

    return {"params": compare(flat(ours), flat(ref), dtype, flat(eager))}


_STEP_CASES = (
    ("sgd", "plain", dict(lr=0.1)),
    ("sgd", "momentum+wd+dampening", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("sgd", "nesterov+maximize", dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True, gamma=0.5)),
    ("adamw", "default", dict(lr=1e-2)),
    ("adamw", "amsgrad+maximize", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True,
                                       maximize=True)),
)


def _check_skip(kind: str, cfg: Dict[str, Any], device, steps: int = 5, skipped=(0, 2)):
    """Steps with ``found_inf=1`` (and NaN gradients and discrepancies) against the same run
    without them: parameters, optimizer state, factors and rates must agree bit for bit (the
    skipped steps include the first, which creates the state)."""
    from .testing import Verdict

    base, layers, no_grad = _check_params(device, torch.float32)
    K = 3
    gen = torch.Generator().manual_seed(9)
    grads = [[torch.randn(t.shape, generator=gen).float() for t in base] for _ in range(steps)]
    ds = [torch.rand(K, generator=gen) + 0.05 for _ in range(steps)]
    cls = LayerwiseSGD if kind == "sgd" else LayerwiseAdamW

    def run(skip_them: bool):
        ps = [t.detach().to(device=device, dtype=torch.float32, copy=True).requires_grad_(True) for t in base]
        opt = cls([{"params": [t for t, l in zip(ps, layers) if l == j], "layer": j}
                   for j in list(range(K)) + [None]], **cfg)
        one, zero = torch.ones((), device=device), torch.zeros((), device=device)
        for s in range(steps):
            if s in skipped:
                if not skip_them:
                    continue
                for p in ps:
                    p.grad = torch.full_like(p, float("nan"))
                opt.step(torch.full((K,), float("nan"), device=device), found_inf=one)
                continue
            for i, p in enumerate(ps):
                p.grad = None if i in no_grad else grads[s][i].to(device)
            opt.step(ds[s].to(device), found_inf=zero if skip_them else None)
        sd = opt.state_dict()
        flat = [p.detach() for p in ps] + [opt.factors, opt.rates]
        for i in sorted(sd["state"]):
            flat.extend(v.reshape(-1) for _, v in sorted(sd["state"][i].items()))
        return flat, sorted(sd["state"]), int(opt.skipped_steps)

    a, keys_a, n_skipped = run(True)
    b, keys_b, _ = run(False)
    same = keys_a == keys_b and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    err = 0.0
    if not same:  # how far apart (inf: different state layout, or NaN where the other is not)
        err = float("inf")
        if keys_a == keys_b and len(a) == len(b):
            diffs = [float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()]
            err = max(diffs) if all(v == v for v in diffs) else float("inf")
    return {"params+state": Verdict(same, err, 0.0, "bit-identical to omitting the skipped steps"),
            "skipped_steps": Verdict(n_skipped == len(skipped), float(abs(n_skipped - len(skipped))), 0.0,
                                     "exact count")}


def lwkd_checks(backend: str, device: torch.device) -> Iterable:
    """Cases for ``lwkd-fast check``: 4 fused steps against torch.optim in float64 (rates from the
    rule's Python oracle) on a ragged ResNet-like parameter list with a grad=None parameter; and
    the device-side skip flag (``found_inf``) against the run that omits the skipped steps."""
    from .check import Case

    for dtype in (torch.float32, torch.bfloat16):
        for kind, label, cfg in _STEP_CASES:
            yield Case(OP, f"{kind} {label}", dtype,
                       lambda kind=kind, cfg=cfg, dtype=dtype: _check_run(kind, cfg, device, dtype))
    for kind, label, cfg in (("sgd", "momentum+nesterov+wd", dict(lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=1e-2)),
                             ("adamw", "amsgrad", dict(lr=1e-2, amsgrad=True))):
        yield Case(OP, f"{kind} {label}: skipped steps (found_inf)", torch.float32,
                   lambda kind=kind, cfg=cfg: _check_skip(kind, cfg, device))
