"""Helpers shared by test_rule.py, test_optim.py and test_distributed.py."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from lwkd_fast import ops

def optim_backends(op: str, device_type: str = "cpu"):
    """Backends that can run ``op`` here (the Triton kernels under the interpreter on CPU)."""
    return [b for b in ops.BACKENDS if ops.backend_status(b, op, device_type)[0]]


class HostSyncError(AssertionError):
    pass


_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class NoHostSync(TorchFunctionMode):
    """Fail on every Tensor method that reads device data on the host (``.item()``, ``.cpu()``,
    ``.tolist()``, ``.numpy()``, ``bool/float/int(tensor)``), and on ``.to()`` / ``.copy_()`` that
    move data from a non-CPU device to the CPU.  Also patches the methods on ``torch.Tensor``
    itself, so calls that bypass ``__torch_function__`` are caught too."""

    def __init__(self):
        super().__init__()
        self._saved = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SYNC_METHODS:
            raise HostSyncError(f"host synchronisation: Tensor.{name} called")
        if name in ("to", "copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[0] if name == "to" else (args[1] if len(args) > 1 else kwargs.get("src"))
            dst_cpu = False
            if name == "to":
                for a in list(args[1:]) + [kwargs.get("device")]:
                    if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
                        dst_cpu = True
            else:
                dst_cpu = args[0].device.type == "cpu"
            if dst_cpu and isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta"):
                raise HostSyncError(f"host synchronisation: Tensor.{name} to the CPU")
        return func(*args, **kwargs)

    def __enter__(self):
        for m in _SYNC_METHODS:
            self._saved[m] = getattr(torch.Tensor, m)

            def boom(*a, _m=m, **k):
                raise HostSyncError(f"host synchronisation: Tensor.{_m} called")

            setattr(torch.Tensor, m, boom)
        return super().__enter__()

    def __exit__(self, *exc):
        for m, f in self._saved.items():
            setattr(torch.Tensor, m, f)
        self._saved.clear()
        return super().__exit__(*exc)


def built_with_cuda() -> bool:
    """Whether lwkd_fast._C was linked against the CUDA runtime (i.e. built with its .cu files)."""
    if ops._C is None:
        return False
    with open(ops._C.__file__, "rb") as fh:
        data = fh.read()
    return b"libcudart" in data or b"libtorch_cuda" in data
