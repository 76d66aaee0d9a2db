"""Parameter groups: each group's layer, device, dtype and rate checked; the base rate of each layer."""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Tuple

import torch

from .tensors import _is_dtensor, _is_number, _scalar_on


class _Groups:
    """Mixin of :class:`~lwkd_fast.optim.base._LayerwiseOptimizer`: ``param_groups`` with a
    ``"layer"`` each."""

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
        self._check_hyper(self._name, i, group)

    def _check_hyper(self, n: str, i: int, group: Dict[str, Any]) -> None:
        """The algorithm's own hyper-parameters of group ``i`` (``n``: the optimizer's name)."""
        raise NotImplementedError

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
