"""``LayerwiseSGD``: torch.optim.SGD with per-layer rates."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .. import rule
from .base import DEFAULT_RATE_NORMALIZE, _LayerwiseOptimizer, _split_arguments
from .step_op import SGD_OP, _run_step
from .tensors import _is_number, _local
from .worklist import _WorkList


class LayerwiseSGD(_LayerwiseOptimizer):
    """SGD with per-layer learning rates driven by layer discrepancies (SPEC sections 4-5).

    ``groups``: dicts with ``"params"`` and ``"layer"`` (j in 0..K-1, or None for the head, factor
    1) and optionally any SGD hyper-parameter of their own.  ``lr`` is the base rate (a float or
    a 0-dim tensor; schedulers drive ``param_groups[i]["lr"]``).  ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``, ``maximize`` mean exactly what they mean for
    ``torch.optim.SGD``.  ``rate_momentum`` (mu), ``gamma``, ``s_min``, ``s_max`` (and
    ``rate_eps``) parameterise the rule; ``rate_normalize`` chooses it: ``"running"`` (the
    default: each layer's D divided by its own bias-corrected running mean, decay
    ``rate_ref_momentum``, first: rates that do not depend on a layer's scale; the reference is
    optimizer state, :attr:`rate_reference`) or ``"none"`` (rates from D itself, the
    earlier default; SPEC section 4 says why the default changed).  ``sync="all_reduce"`` averages the discrepancies over
    the ``torch.distributed`` group (``process_group``) before the rule.  ``num_layers`` fixes K
    (default: one past the largest layer index of the groups).

    ``opt.step(discrepancies)`` with a (K,) tensor on the parameters' device.
    """

    __module__ = "lwkd_fast.optim"  # where pickles (and old checkpoints' pickles) find the class
    _algorithm = "sgd"
    _op = SGD_OP
    _name = "LayerwiseSGD"
    _DEFAULT_KEYS = ('lr', 'momentum', 'dampening', 'weight_decay', 'nesterov', 'maximize')  # torch.optim's defaults, in this order
    _STATE_KEYS = ("momentum_buffer",)

    def __init__(self, groups, lr: Union[float, torch.Tensor], momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, rate_momentum: float = 0.9, gamma: float = 1.0,
                 s_min: float = 0.1, s_max: float = 10.0, sync: Optional[str] = None, *,
                 num_layers: Optional[int] = None, rate_eps: float = 1e-12, process_group=None,
                 rate_normalize: str = DEFAULT_RATE_NORMALIZE,
                 rate_ref_momentum: float = rule.DEFAULT_REF_MOMENTUM) -> None:
        defaults, options = _split_arguments(locals(), self._DEFAULT_KEYS)
        super().__init__(groups, defaults, **options)

    def _check_hyper(self, n: str, i: int, group: Dict[str, Any]) -> None:
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

    def _hyper_lists(self, groups) -> Tuple[List[float], List[float], List[float], List[bool], List[bool]]:
        """weight_decay, momentum, dampening, nesterov, maximize of ``layerwise_sgd_step``."""
        return ([float(g["weight_decay"]) for g in groups], [float(g["momentum"]) for g in groups],
                [float(g["dampening"]) for g in groups], [bool(g["nesterov"]) for g in groups],
                [bool(g["maximize"]) for g in groups])

    def _launch(self, backend, work, params, grads, groups_args, found_inf) -> None:
        self._sgd_call(backend, params, grads, work.s1, work.tgroup, work.fresh, groups_args, found_inf)

    def _sgd_call(self, backend, params, grads, bufs, tgroup, fresh, groups_args, found_inf) -> None:
        """``layerwise_sgd_step`` on these tensors (also the split step's, see .skipping)."""
        _run_step(backend, SGD_OP, params, grads, bufs, self._factors, tgroup, fresh, *groups_args,
                  found_inf=found_inf)

    def _state_flags(self, group) -> bool:
        return group["momentum"] != 0

    def _gather(self, flat, grads) -> _WorkList:
        owners, gs, bufs, tgroup, fresh, pending = [], [], [], [], [], []
        any_mom = False
        state = self.state
        groups = self.param_groups
        for op, p, gi, g in self._with_grads(flat, grads):
            if groups[gi]["momentum"] != 0:
                any_mom = True
                st = state.get(p)  # (a plain lookup: does not create an entry)
                buf = st.get("momentum_buffer") if st else None
                if buf is None:
                    # (zeros when the step may be skipped: the buffer then stays unused but defined)
                    new = torch.zeros_like if self._zero_fresh else torch.empty_like
                    buf = new(p, memory_format=torch.preserve_format)
                    fresh.append(len(owners))
                    pending.append((p, buf))
                else:
                    buf = st["momentum_buffer"] = self._placed_state(op, gi, p, "momentum_buffer", buf)
                bufs.append(_local(buf))
            else:
                bufs.append(self._placeholder)
            owners.append(p)
            gs.append(g)
            tgroup.append(gi)
        # buffers enter the state only once the step has run (see _WorkList.commit)
        return _WorkList(owners, gs, bufs if any_mom else [], [], [], [], tgroup, fresh, pending)
