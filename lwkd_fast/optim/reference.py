"""Reference backend of ``layerwise_step`` (``torch._foreach_*``), same arguments as
``torch.ops.lwkd.layerwise_step``."""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch

from .worklist import HYPER


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
