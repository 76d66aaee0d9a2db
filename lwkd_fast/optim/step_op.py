"""The step op ``layerwise_step``: its name and the call to the chosen backend (native, triton or
the reference: the row of ``lwkd_fast.ops.OP_TABLE``).  Its fake kernel is registered in ``lwkd_fast/optim/__init__.py``: csrc/ops.cpp
names ``lwkd_fast.optim`` as the module of the op's fake (``m.set_python_module``)."""

from __future__ import annotations

from .. import ops

OP = "layerwise_step"


def _run_step(backend: str, *args, found_inf=None) -> None:
    """``layerwise_step(*args)`` on ``backend``; ``found_inf`` is passed (last) only when given."""
    if found_inf is not None:
        args = (*args, found_inf)
    ops.run_op(backend, OP, *args)
