"""The step ops ``layerwise_sgd_step`` and ``layerwise_adamw_step``: their names and the call to the
chosen backend (native, triton or the reference: the rows of ``lwkd_fast.ops.OP_TABLE``).  Their fake
kernels are registered in ``lwkd_fast/registry.py`` with those of every other native op."""

from __future__ import annotations

from .. import ops

SGD_OP = "layerwise_sgd_step"
ADAMW_OP = "layerwise_adamw_step"
OPS = (SGD_OP, ADAMW_OP)


def _run_step(backend: str, op: str, *args, found_inf=None) -> None:
    """``op(*args)`` on ``backend``; ``found_inf`` is passed (last) only when given."""
    if found_inf is not None:
        args = (*args, found_inf)
    ops.run_op(backend, op, *args)
