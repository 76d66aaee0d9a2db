"""What the Triton modules of this package share: the device guard of every op call, dense-layout
tests, and correctly rounded float32 arithmetic.

Device guard.  Triton launches a kernel on the *current* device and that device's *current*
stream (``torch.cuda.current_device()`` / the current raw stream), whatever device the tensors
are on.  Every op of this package therefore runs its host code and launches under
:func:`on_device` of its tensors' device: ``torch.cuda.device(d)`` makes ``d`` current, so the
kernels run on the tensors' GPU and on the stream the caller made current there (tensors on
``cuda:1`` while device 0 is current run on device 1's current stream, as a native op would).
CPU tensors (the interpreter) need no guard.  ``GUARDS`` maps a device type to its guard; the
tests replace the CPU entry to watch every launch happen inside one.

IEEE arithmetic.  ``tl.sqrt`` and ``/`` on float32 compile to approximate PTX instructions
(``sqrt.approx``, ``div.full``), while CUDA C++ -- torch's kernels and csrc/cuda -- compiles
``sqrt`` and ``/`` to the correctly rounded ``sqrt.rn`` / ``div.rn``.  :func:`sqrt_rn` and
:func:`div_rn` are the correctly rounded operations for float32 (``tl.sqrt_rn`` /
``tl.div_rn``) and the plain ones for float64, which are correctly rounded already (the
``_rn`` builtins take float32 only).  Both operands of :func:`div_rn` have one dtype.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["GUARDS", "on_device", "launch", "is_dense", "same_layout", "sqrt_rn", "div_rn", "INTERPRETED"]


def _no_guard(device: torch.device):
    return contextlib.nullcontext()


# device type -> factory of the context manager that makes a device (and its stream) current
GUARDS = {"cpu": _no_guard, "cuda": torch.cuda.device}


def on_device(device: torch.device, op: str):
    """Context manager under which ``op`` launches its kernels for tensors on ``device``."""
    guard = GUARDS.get(device.type)
    if guard is None:
        raise ValueError(f"lwkd_triton::{op}: tensors on {device} (the Triton kernels run on CUDA tensors, "
                         "or on CPU tensors under TRITON_INTERPRET=1)")
    return guard(device)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Every kernel of this package is launched here (tests/triton_aot_compile.py replaces this
    function to record the launches instead of running them)."""
    kernel[grid](*args, **kwargs)


def is_dense(x: torch.Tensor) -> bool:
    """The elements fill one contiguous memory range exactly once, in any dimension order (an
    empty tensor addresses nothing: dense, as torch's is_non_overlapping_and_dense says)."""
    if x.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension that has more than one element (the
    strides of size-1 dimensions never address anything), as csrc/common/host_prep.h's."""
    return a.shape == b.shape and all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] > 1)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded square root (float32 through tl.sqrt_rn; float64 tl.sqrt already is)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_rn(a, b):
    """Correctly rounded a / b (float32 through tl.div_rn; float64 division already is)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        a, b = tl.broadcast(a, b)  # (tl.div_rn does not broadcast a scalar operand itself)
        return tl.div_rn(a, b)


# True when these helpers were created by the Triton interpreter (TRITON_INTERPRET=1 at import):
# kernels created in the other mode cannot call them (lwkd_fast.triton.status checks).
INTERPRETED = type(sqrt_rn).__name__ == "InterpretedFunction"
