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
from lwkd_fast import cuda_emu, ops  # noqa: E402

NATIVE = ops._C is not None

# The CUDA kernels of csrc/cuda, executed on the CPU (lwkd_fast/cuda_emu.py): loading registers
# the backend "cuda_emu", which every backend-parametrized test then covers (marked `cuda_emu`).
# LWKD_TEST_CUDA_EMU=0 leaves it out (tests/test_cuda_emu.py then fails, saying so);
# LWKD_TEST_CUDA_EMU_VARIANT=sanitize loads the sanitizer build (test_cuda_emu.py runs it so);
# LWKD_EMU_CUDA_DIR builds another copy of csrc/cuda (tests/cuda_mutation.py).
CUDA_EMU_ERROR = None
if os.environ.get("LWKD_TEST_CUDA_EMU", "1") != "0":
    try:
        cuda_emu.load(os.environ.get("LWKD_TEST_CUDA_EMU_VARIANT", "default"),
                      cuda_dir=os.environ.get("LWKD_EMU_CUDA_DIR") or None)
    except Exception as exc:  # reported by tests/test_cuda_emu.py::test_the_execution_layer_loads
        CUDA_EMU_ERROR = f"{type(exc).__name__}: {exc}"
else:
    CUDA_EMU_ERROR = "disabled by LWKD_TEST_CUDA_EMU=0"

requires_native = pytest.mark.skipif(not NATIVE, reason=f"native extension not loaded: {ops._C_ERROR}")


def available_backends(op: str = "attention_discrepancy", device_type: str = "cpu"):
    """Backends that can run `op` on `device_type` here (reference always)."""
    return [b for b in ops.BACKENDS if ops.backend_status(b, op, device_type)[0]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Every test that runs the emulated CUDA kernels runs under three schedules of the threads of a
# block and of the blocks of a grid (lwkd_fast/cuda_emu.py): a result that depends on the order
# is a race.  Global memory from at::empty is NaN-filled there too (torch's deterministic fill),
# so an output element a kernel never writes shows up.
EMU_SCHEDULES = ("default", "random:1", "random:2")


def _runs_on_emu(item) -> bool:
    spec = getattr(item, "callspec", None)
    return spec is not None and any(v == cuda_emu.BACKEND for k, v in spec.params.items() if k != "emu_schedule")


def pytest_generate_tests(metafunc):
    if "emu_schedule" not in metafunc.fixturenames:
        return
    emu = any(cuda_emu.BACKEND in (m.args[1] if len(m.args) > 1 else ())
              for m in metafunc.definition.iter_markers("parametrize"))
    if emu:
        metafunc.parametrize("emu_schedule", EMU_SCHEDULES, indirect=True, ids=lambda s: f"emu-{s}")


def pytest_collection_modifyitems(config, items):
    """Tests that run an op on the emulated CUDA kernels carry the `cuda_emu` marker; the other
    backends of such a test run once, not once per schedule."""
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        sched = spec.params.get("emu_schedule", "default") if spec is not None else "default"
        if _runs_on_emu(item):
            item.add_marker(pytest.mark.cuda_emu)
        elif sched != "default":
            drop.append(item)
            continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def emu_schedule(request):
    """The schedule of the emulated launches of this test, and NaN-filled fresh memory."""
    sched = getattr(request, "param", "default")
    if not _runs_on_emu(request.node):
        yield sched
        return
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    cuda_emu.schedule(sched)
    try:
        yield sched
    finally:
        cuda_emu.schedule("default")
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
