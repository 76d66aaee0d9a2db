"""Parameters as the kernels see them: DTensor shards, dense layouts, base rates as tensors."""

from __future__ import annotations

from typing import Any

import torch


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
