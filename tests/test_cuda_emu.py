"""The CUDA CPU execution layer itself (lwkd_fast/cuda_emu.py, csrc/emu): that it executes every
kernel of csrc/cuda, that its device model has CUDA's semantics and catches what a GPU gets wrong
(barrier and warp divergence, reads of unwritten shared memory, races, misaligned vector access,
launch limits), that the source rewriting is mechanical, and that the sanitizer build runs a grid
of the real kernels clean.

The kernels' numerics are tested where every backend's are (test_discrepancy.py, test_optim.py,
test_rule.py, ...): the backend "cuda_emu" is one of their parameters, under three schedules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import cuda_emu

import conftest

pytestmark = pytest.mark.cuda_emu
ROOT = Path(__file__).resolve().parent.parent


def selftest(case: str, x=None):
    return torch.ops.lwkd_emu._selftest(case, torch.zeros(1) if x is None else x)


def test_the_execution_layer_loads():
    assert conftest.CUDA_EMU_ERROR is None, conftest.CUDA_EMU_ERROR
    assert cuda_emu.BACKEND in lw.backends()


needs_emu = pytest.mark.skipif(conftest.CUDA_EMU_ERROR is not None, reason="see test_the_execution_layer_loads")


# ------------------------------------------------------------------------------------------------
# Every kernel of csrc/cuda runs
# ------------------------------------------------------------------------------------------------


def _drive_every_op():
    s = [torch.randn(3, 5, 7, 9, requires_grad=True),
         torch.randn(3, 6, 4, 4).to(memory_format=torch.channels_last).requires_grad_(True)]
    t = [torch.randn(3, 8, 7, 9), torch.randn(3, 2, 4, 4)]
    for kw in (dict(metric="at"), dict(metric="at", p=1.5), dict(metric="jsd", p=1.0, normalize="softmax")):
        lw.attention_discrepancy(s, t, **kw).sum().backward()
    u = [torch.randn(4, 3, 5, requires_grad=True)]
    w = [torch.randn(4, 3, 5)]
    for metric in ("cos", "jsd"):
        lw.map_discrepancy(u, w, metric=metric).sum().backward()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for cls in (lw.optim.LayerwiseSGD, lw.optim.LayerwiseAdamW):
        opt = cls([{"params": model[0].parameters(), "layer": 0}, {"params": model[1].parameters(), "layer": None}],
                  lr=0.1)
        model(torch.randn(5, 4)).sum().backward()
        opt.step(torch.tensor([0.5]))


@needs_emu
def test_every_kernel_in_csrc_cuda_executes():
    names = cuda_emu.kernels_in_sources()
    assert len(names) >= 12, names  # the parser found the kernels
    cuda_emu.stats(reset=True)
    with lw.use_backend(cuda_emu.BACKEND):
        _drive_every_op()
    ran = cuda_emu.stats()
    missing = [k for k in names if ran.get(k, (0, 0, 0))[0] == 0]
    assert not missing, f"kernels of csrc/cuda that never ran: {missing}"
    # 256-thread blocks for the discrepancy kernels: every thread of every block was a fiber
    launches, blocks, threads = ran["attn_maps_kernel"]
    assert threads == 256 * blocks and blocks >= launches > 0


# ------------------------------------------------------------------------------------------------
# The device model
# ------------------------------------------------------------------------------------------------


@needs_emu
def test_warp_collectives_follow_cuda_semantics():
    x = torch.arange(64, dtype=torch.float32) * 0.25 - 3.0
    out = selftest("warp_ops", x)
    for t in range(64):
        lane, base = t % 32, t // 32 * 32
        v = lambda i: float(x[base + i])  # noqa: E731 - value of lane i of this warp
        seg16, seg8 = lane // 16 * 16, lane // 8 * 8
        want = [
            v(lane + 3) if lane + 3 < 32 else v(lane),                       # shfl_down 3
            v(lane - 5) if lane >= 5 else v(lane),                           # shfl_up 5
            v(lane ^ 9),                                                     # shfl_xor 9
            v(7),                                                            # shfl lane 7
            v(lane + 3) if lane - seg16 + 3 < 16 else v(lane),               # shfl_down 3, width 16
            v(lane ^ 5) if (lane ^ 5) < seg8 + 8 else v(lane),               # shfl_xor 5, width 8
            float(sum(1 << i for i in range(16) if v(i) > 0)),               # ballot, low 16 bits
            float(any(v(i) > 2.5 for i in range(32))) + 2.0 * float(all(v(i) > -10 for i in range(32))),
        ]
        assert out[t].tolist() == want, (t, out[t].tolist(), want)


@needs_emu
def test_thread_and_block_indices_are_32_bit_unsigned():
    out = selftest("unsigned_index")
    assert out[0].item() == 2**32 - 1  # threadIdx.x - 1 for thread 0 wraps as on the GPU
    assert out[1:64].tolist() == list(range(63))
    assert out[64:].tolist() == [2 * 64 + i for i in range(64)]


@pytest.mark.parametrize("case, message", [
    ("barrier_after_exit", r"wait at __syncthreads .*selftest.cu:\d+\) but 128 exited before reaching it .*"
                           r"\(barrier divergence\)"),
    ("barrier_two_sites", r"threads wait at different __syncthreads: .*selftest.cu:\d+, this one at .*selftest.cu:\d+"),
    ("shuffle_exited_lane", r"waits at __shfl_down_sync .* for lane 31 .* which has exited \(warp divergence\)"),
    ("shuffle_outside_mask", r"reads lane 20, which is not in the mask 0xffff"),
    ("misaligned_store", r"misaligned address in a vector store"),
    ("empty_grid", r"empty grid \(0, 1, 1\)"),
    ("grid_y_too_large", r"grid \(1, 65536, 1\) exceeds the limits"),
    ("block_too_large", r"block \(1025, 1, 1\) exceeds the limits"),
    ("block_z_too_large", r"block \(1, 1, 65\) exceeds the limits"),
    ("grid_truncated", r"does not fit the unsigned int of dim3"),
    ("huge_params", r"33008 bytes of kernel parameters exceed the 32764-byte limit"),
    ("big_shared", r"static shared memory to 56000 bytes \(limit 49152\)"),
])
@needs_emu
def test_faults_a_gpu_would_raise_or_hang_on(case, message):
    with pytest.raises(RuntimeError, match=message) as info:
        selftest(case)
    assert "lwkd_emu" in str(info.value)
    # the layer is usable again after a failed launch
    assert selftest("block_sum", torch.ones(300)).tolist() == [300.0] * 4


@needs_emu
def test_shared_memory_is_poisoned_at_every_block():
    out = selftest("shared_partly_written")[: 2 * 256].view(2, 256)
    assert (out[:, :128] == 2.0).all()
    assert torch.isnan(out[:, 128:]).all()  # never written in this block
    out = selftest("shared_from_previous_block")[: 3 * 256].view(3, 256)
    assert (out[0] == 3.0).all() and torch.isnan(out[1:]).all()  # block 1 and 2 do not see block 0's data


@needs_emu
def test_schedules_expose_a_missing_barrier():
    x = torch.rand(1000)
    want = float(x.sum())
    results = {}
    try:
        for sched in ("default", "reverse", "random:1", "random:2"):
            cuda_emu.schedule(sched)
            for case in ("block_sum", "block_sum_drop1", "block_sum_drop2"):
                results[case, sched] = selftest(case, x)
    finally:
        cuda_emu.schedule("default")
    for sched in ("default", "reverse", "random:1", "random:2"):  # the correct kernel: same result always
        torch.testing.assert_close(results["block_sum", sched], torch.full((4,), want), rtol=1e-5, atol=1e-4)
    for bug in ("block_sum_drop1", "block_sum_drop2"):  # each bug changes the result under some schedule
        wrong = [s for s in ("default", "reverse", "random:1", "random:2")
                 if not torch.allclose(results[bug, s], torch.full((4,), want), rtol=1e-5, atol=1e-4)]
        assert wrong, f"{bug}: no schedule exposed the missing __syncthreads"


@needs_emu
def test_schedule_selection():
    assert cuda_emu.schedule() == "default"
    try:
        assert cuda_emu.schedule("random:7") == "random:7"
        with pytest.raises(RuntimeError, match="'random:x' is not a schedule"):
            cuda_emu.schedule("random:x")
        assert cuda_emu.schedule() == "random:7"
    finally:
        cuda_emu.schedule("default")
    r = subprocess.run([sys.executable, "-c", "import torch; from lwkd_fast import cuda_emu; cuda_emu.load(); "
                        "print(cuda_emu.schedule())"], capture_output=True, text=True,
                       env=dict(os.environ, LWKD_EMU_SCHEDULE="reverse"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "reverse"


# ------------------------------------------------------------------------------------------------
# The rewriting is mechanical
# ------------------------------------------------------------------------------------------------


def test_rewrite_keeps_lines_and_touches_only_cuda_syntax():
    src = (
        "// a comment with k<<<1, 2>>>() and __shared__ float c[3];\n"
        "template <typename T> __global__ void k(T* x) {\n"
        "  __shared__ T red[8];\n"
        "  __shared__ union {\n    float a;\n    double b;\n  } sc;\n"
        "  extern __shared__ float dyn[];\n"
        "  const char* s = \"<<<not a launch>>>\";\n"
        "}\n"
        "void host(at::Tensor t, cudaStream_t st) {\n"
        "  TORCH_CHECK(t.is_cuda());\n"
        "  auto h = at::empty({4}, at::TensorOptions().pinned_memory(true));\n"
        "  k<ns::Foo<int, 2>><<<grid_of(n), 256, 0,\n      st>>>(t.data_ptr<float>());\n"
        "}\n"
        "TORCH_LIBRARY_IMPL(lwkd, CUDA, m) { m.impl(\"op\", &host); }\n"
    )
    out, counts = cuda_emu.rewrite_cuda_source(src, "csrc/cuda/x.cu")
    body = out.split("\n", 1)[1]
    assert out.startswith('#line 1 "csrc/cuda/x.cu"\n')
    assert body.count("\n") == src.count("\n")  # diagnostics name the original lines
    assert counts["launches"] == 1 and counts["shared"] == 3
    assert '::lwkd_emu::launcher(k<ns::Foo<int, 2>>, "k<ns::Foo<int, 2>>", __FILE__, __LINE__, grid_of(n), 256, 0,\n      st)(t.data_ptr<float>());' in body
    assert "static T red[8]; LWKD_EMU_SHARED(red);" in body
    assert "static union {\n    float a;\n    double b;\n  } sc; LWKD_EMU_SHARED(sc);" in body
    assert "float* dyn = LWKD_EMU_DYNAMIC_SHARED(float);" in body
    assert body.splitlines()[0] == src.splitlines()[0]  # comments and strings untouched
    assert '"<<<not a launch>>>"' in body
    assert "t.is_cpu()" in body and "pinned_memory(false)" in body
    assert "TORCH_LIBRARY_IMPL(lwkd_emu, CPU, m)" in body


def test_schemas_are_the_ones_of_ops_cpp():
    src = (ROOT / "csrc" / "ops.cpp").read_text()
    out = cuda_emu.rewrite_schema_source(src)
    assert "TORCH_LIBRARY(lwkd_emu, m)" in out and "m.set_python_module" not in out
    defs = [line for line in src.splitlines() if "m.def(" in line]
    assert defs and all(d in out for d in defs)


def test_kernel_list_matches_the_sources():
    names = cuda_emu.kernels_in_sources()
    for f in (ROOT / "csrc" / "cuda").glob("*.cu"):
        text = f.read_text()
        for n in names:
            if n in text:
                break
        else:
            pytest.fail(f"no kernel of {f.name} was found")
    assert {"attn_maps_kernel", "map_grad_kernel", "rates_kernel", "step_kernel", "bump_steps_kernel"} <= set(names)


# ------------------------------------------------------------------------------------------------
# The sanitizer build (ASan + UBSan): a grid of the real kernels, and a misaligned 16-byte load
# that only the sanitizer can see on x86
# ------------------------------------------------------------------------------------------------

SANITIZER_TESTS = [
    "tests/test_discrepancy.py::test_attention_against_reference",
    "tests/test_discrepancy.py::test_maps_against_reference",
    "tests/test_discrepancy.py::test_attention_eps_boundaries",
    "tests/test_optim.py::test_matches_torch_optim_20_steps",
    "tests/test_rule.py",
]


def _sanitized(args, timeout=1500):
    env = cuda_emu.sanitizer_env()
    env["LWKD_TEST_CUDA_EMU_VARIANT"] = "sanitize"
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@needs_emu
def test_sanitizer_build_catches_a_misaligned_vector_load():
    code = ("import torch; from lwkd_fast import cuda_emu; cuda_emu.load('sanitize'); "
            "torch.ops.lwkd_emu._selftest('misaligned_load', torch.arange(16.))")
    r = _sanitized(["-c", code])
    assert r.returncode != 0, r.stdout + r.stderr
    assert "misaligned address" in r.stderr and "selftest.cu" in r.stderr, r.stderr[-3000:]


@needs_emu
def test_sanitizer_build_runs_the_kernel_grid_clean():
    r = _sanitized(["-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", "-m", "cuda_emu", "-k",
                    "emu-default and (float32 or float16 or not torch)", *SANITIZER_TESTS])
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, tail
    assert " passed" in r.stdout, tail
