"""Reference backend of the step ops (``torch._foreach_*``): :func:`reference_sgd_step` and
:func:`reference_adamw_step`, same arguments as ``torch.ops.lwkd.layerwise_sgd_step`` /
``layerwise_adamw_step``."""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch


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


def reference_sgd_step(params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffer: List[torch.Tensor],
                       factors: torch.Tensor, tensor_group: Sequence[int], fresh: Sequence[int],
                       group_layer: Sequence[int], group_lr: Sequence[float],
                       group_lr_tensor: Sequence[Optional[torch.Tensor]], weight_decay: Sequence[float],
                       momentum: Sequence[float], dampening: Sequence[float], nesterov: Sequence[bool],
                       maximize: Sequence[bool], found_inf: Optional[torch.Tensor] = None) -> None:
    """The fused SGD step written with ``torch._foreach_*`` ops, one batch of calls per group:
    torch.optim's multi-tensor SGD with the group's device rate (see :func:`_with_skip`)."""
    fresh_set = set(int(i) for i in fresh)

    def group_step(k, idx, rate, ps, gs):
        _sgd_group(k, idx, rate, ps, gs, momentum_buffer, fresh_set, weight_decay, momentum, dampening,
                   nesterov, maximize)

    _with_skip(found_inf, (params, momentum_buffer),
               lambda: _per_group(factors, tensor_group, group_layer, group_lr, group_lr_tensor, params, grads,
                                  group_step))


def reference_adamw_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avg: List[torch.Tensor],
                         exp_avg_sq: List[torch.Tensor], max_exp_avg_sq: List[torch.Tensor],
                         steps: List[torch.Tensor], factors: torch.Tensor, tensor_group: Sequence[int],
                         group_layer: Sequence[int], group_lr: Sequence[float],
                         group_lr_tensor: Sequence[Optional[torch.Tensor]], weight_decay: Sequence[float],
                         beta1: Sequence[float], beta2: Sequence[float], eps: Sequence[float],
                         amsgrad: Sequence[bool], maximize: Sequence[bool],
                         found_inf: Optional[torch.Tensor] = None) -> None:
    """The fused AdamW step written with ``torch._foreach_*`` ops, one batch of calls per group:
    torch.optim's multi-tensor AdamW with the group's device rate (see :func:`_with_skip`)."""
    def group_step(k, idx, rate, ps, gs):
        _adamw_group(k, idx, rate, ps, gs, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, weight_decay, beta1, beta2,
                     eps, amsgrad, maximize)

    def run():
        if steps:
            torch._foreach_add_(list(steps), 1.0)
        _per_group(factors, tensor_group, group_layer, group_lr, group_lr_tensor, params, grads, group_step)

    _with_skip(found_inf, (params, exp_avg, exp_avg_sq, max_exp_avg_sq, steps), run)


def _with_skip(found_inf: Optional[torch.Tensor], written_lists, run) -> None:
    """``run()``; low-precision parameters round after every foreach op (eager torch semantics).
    With ``found_inf`` (the reference: clarity over speed) every tensor the step writes is saved
    first, the step runs, and ``torch.where(found_inf != 0, saved, updated)`` puts the saved values
    back on the device."""
    if found_inf is None:
        run()
        return
    skip = found_inf.detach().reshape(()) != 0
    written: Dict[int, torch.Tensor] = {}
    for t in itertools.chain(*written_lists):
        if t.numel():
            written.setdefault(id(t), t)
    saved = [(t, t.clone()) for t in written.values()]
    run()
    for t, old in saved:
        t.copy_(torch.where(skip, old, t))


def _per_group(factors, tensor_group, group_layer, group_lr, group_lr_tensor, params, grads, group_step) -> None:
    """``group_step(k, idx, rate, ps, gs)`` for each group k with tensors (indices ``idx``)."""
    members: Dict[int, List[int]] = {}
    for i, g in enumerate(tensor_group):
        members.setdefault(int(g), []).append(i)
    for k, idx in members.items():
        lr_t = group_lr_tensor[k] if group_lr_tensor else None
        rate = _group_rate(factors, int(group_layer[k]), group_lr[k], lr_t)
        group_step(k, idx, rate, [params[i] for i in idx], [grads[i] for i in idx])


def _sgd_group(k, idx, rate, ps, gs, momentum_buffer, fresh_set, weight_decay, momentum, dampening, nesterov,
               maximize) -> None:
    wd, mom, damp = weight_decay[k], momentum[k], dampening[k]
    if maximize[k]:
        gs = torch._foreach_neg(gs)
    if wd != 0:
        gs = torch._foreach_add(gs, ps, alpha=wd)
    if mom != 0:
        bufs = [momentum_buffer[i] for i in idx]
        new = [j for j, i in enumerate(idx) if i in fresh_set]
        old = [j for j, i in enumerate(idx) if i not in fresh_set]
        if new:
            torch._foreach_copy_([bufs[j] for j in new], [gs[j] for j in new])
        if old:
            ob = [bufs[j] for j in old]
            torch._foreach_mul_(ob, mom)
            torch._foreach_add_(ob, [gs[j] for j in old], alpha=1 - damp)
        gs = torch._foreach_add(gs, bufs, alpha=mom) if nesterov[k] else bufs
    if isinstance(rate, float):
        torch._foreach_add_(ps, gs, alpha=-rate)
    else:
        torch._foreach_sub_(ps, _scale(gs, rate))


def _adamw_group(k, idx, rate, ps, gs, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, weight_decay, beta1, beta2,
                 eps, amsgrad, maximize) -> None:
    wd, b1, b2 = weight_decay[k], beta1[k], beta2[k]
    ms = [exp_avg[i] for i in idx]
    vs = [exp_avg_sq[i] for i in idx]
    st = torch.stack([steps[i].reshape(()) for i in idx]).to(torch.float64)
    # (torch.full is a fill kernel; torch.tensor(x, device=cuda) would be a synchronous copy)
    rate64 = rate if isinstance(rate, torch.Tensor) else torch.full((), rate, dtype=torch.float64,
                                                                    device=st.device)
    if maximize[k]:
        gs = torch._foreach_neg(gs)
    if wd != 0:
        torch._foreach_mul_(ps, 1.0 - rate64 * wd)
    torch._foreach_lerp_(ms, gs, 1.0 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, 1.0 - b2)
    step_size = rate64 / (1.0 - torch.pow(b1, st))
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, st))
    if amsgrad[k]:
        ws = [max_exp_avg_sq[i] for i in idx]
        torch._foreach_maximum_(ws, vs)
        denom = torch._foreach_sqrt(ws)
    else:
        denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, list(bc2_sqrt.unbind()))
    torch._foreach_add_(denom, eps[k])
    upd = torch._foreach_div(ms, denom)
    torch._foreach_mul_(upd, list(step_size.unbind()))
    torch._foreach_sub_(ps, upd)
