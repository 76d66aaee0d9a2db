"""The step op ``layerwise_step``: its name and the call to the chosen backend (native, triton or
the reference).  Its fake kernel is registered in ``lwkd_fast/optim/__init__.py``: csrc/ops.cpp
names ``lwkd_fast.optim`` as the module of the op's fake (``m.set_python_module``)."""

from __future__ import annotations

import importlib

from .. import ops
from .reference import reference_step

OP = "layerwise_step"
if OP not in ops._EXTRA_NATIVE_OPS:
    ops._EXTRA_NATIVE_OPS.append(OP)


def _run_step(backend: str, *args, found_inf=None) -> None:
    """``layerwise_step(*args)`` on ``backend``; ``found_inf`` is passed (last) only when given."""
    if found_inf is not None:
        args = (*args, found_inf)
    if backend in ops.NATIVE_NAMESPACES:
        ops.native_ops(backend).layerwise_step(*args)
    elif backend == "triton":
        importlib.import_module("lwkd_fast.triton.optim").layerwise_step(*args)
    else:
        reference_step(*args)
