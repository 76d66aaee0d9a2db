"""Shared test configuration.

Triton kernels run on CPU tensors under the Triton interpreter when no GPU is present; the
variable must be set before anything imports triton, hence here at collection start.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import lwkd_fast  # noqa: E402
from lwkd_fast import ops  # noqa: E402

NATIVE = ops._C is not None

requires_native = pytest.mark.skipif(not NATIVE, reason=f"native extension not loaded: {ops._C_ERROR}")


def available_backends(op: str = "attention_discrepancy", device_type: str = "cpu"):
    """Backends that can run `op` on `device_type` here (reference always)."""
    return [b for b in ops.BACKENDS if ops.backend_status(b, op, device_type)[0]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
