"""Where the optimizer's state lives, and every state tensor checked against its parameter."""

from __future__ import annotations

from typing import Optional

import torch

from .tensors import _describe, _is_dense, _is_dtensor, _local, _same_layout, _work_layout


class _Placement:
    """Mixin of :class:`~lwkd_fast.optim.base._LayerwiseOptimizer`: the rate state follows the
    parameters; state tensors fit their parameters."""

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
