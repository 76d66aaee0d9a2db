"""``LayerwiseAdamW``: torch.optim.AdamW with per-layer rates."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .. import rule
from .base import DEFAULT_RATE_NORMALIZE, _LayerwiseOptimizer, _split_arguments
from .step_op import ADAMW_OP, _run_step
from .tensors import _is_number, _local
from .worklist import _WorkList


class LayerwiseAdamW(_LayerwiseOptimizer):
    """AdamW with per-layer learning rates driven by layer discrepancies (SPEC sections 4-5).

    Groups, ``lr``, the rule options, ``sync`` and ``num_layers`` as for :class:`LayerwiseSGD`.
    ``betas``, ``eps``, ``weight_decay`` (decoupled, scaled by the layer's rate), ``amsgrad`` and
    ``maximize`` mean exactly what they mean for ``torch.optim.AdamW``; bias corrections use each
    parameter's own step count, kept on the device in ``state[p]["step"]``.
    """

    __module__ = "lwkd_fast.optim"  # where pickles (and old checkpoints' pickles) find the class
    _algorithm = "adamw"
    _op = ADAMW_OP
    _name = "LayerwiseAdamW"
    _DEFAULT_KEYS = ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'maximize')  # torch.optim's defaults, in this order
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, groups, lr: Union[float, torch.Tensor], betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
                 rate_momentum: float = 0.9, gamma: float = 1.0, s_min: float = 0.1, s_max: float = 10.0,
                 sync: Optional[str] = None, *, num_layers: Optional[int] = None, rate_eps: float = 1e-12,
                 process_group=None, rate_normalize: str = DEFAULT_RATE_NORMALIZE,
                 rate_ref_momentum: float = rule.DEFAULT_REF_MOMENTUM) -> None:
        defaults, options = _split_arguments(locals(), self._DEFAULT_KEYS)
        super().__init__(groups, defaults, **options)

    def _check_hyper(self, n: str, i: int, group: Dict[str, Any]) -> None:
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

    def _hyper_lists(self, groups) -> Tuple[List[float], List[float], List[float], List[float], List[bool],
                                            List[bool]]:
        """weight_decay, beta1, beta2, eps, amsgrad, maximize of ``layerwise_adamw_step``."""
        return ([float(g["weight_decay"]) for g in groups], [float(g["betas"][0]) for g in groups],
                [float(g["betas"][1]) for g in groups], [float(g["eps"]) for g in groups],
                [bool(g["amsgrad"]) for g in groups], [bool(g["maximize"]) for g in groups])

    def _launch(self, backend, work, params, grads, groups_args, found_inf) -> None:
        _run_step(backend, ADAMW_OP, params, grads, work.s1, work.s2, work.s3, work.steps, self._factors,
                  work.tgroup, *groups_args, found_inf=found_inf)

    def _state_flags(self, group) -> bool:
        return bool(group["amsgrad"])

    def _gather(self, flat, grads) -> _WorkList:
        owners, gs, ms, vs, ws, steps, tgroup, created = [], [], [], [], [], [], [], []
        any_ams = False
        state = self.state
        groups = self.param_groups
        for op, p, gi, g in self._with_grads(flat, grads):
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
            gs.append(g)
            ms.append(_local(s["exp_avg"]))
            vs.append(_local(s["exp_avg_sq"]))
            ws.append(_local(s["max_exp_avg_sq"]) if ams else self._placeholder)
            steps.append(s["step"])
            tgroup.append(gi)
        return _WorkList(owners, gs, ms, vs, ws if any_ams else [], steps, tgroup, created=created)

    def _check_adamw_state(self, op: str, gi: int, p: torch.Tensor, s: Dict[str, Any]) -> None:
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in s]
        if missing:
            raise ValueError(f"{op}: the state of {self._param_name(gi, p)} has {sorted(s)} but lacks "
                             f"{', '.join(map(repr, missing))}; AdamW state holds step, exp_avg and exp_avg_sq")
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in s:
                s[key] = self._placed_state(op, gi, p, key, s[key])
