"""Attention discrepancy fwd+bwd: native vs eager per-layer torch vs torch.compile (issue 2/6).

    python benchmarks/bench_attention.py [--quick] [--repeat N] [--json FILE] [--plot FILE]
    python -m pytest benchmarks/bench_attention.py        # pytest-benchmark suite

Both use lwkd_fast.bench.attention, the code behind `lwkd-fast bench --suite attention`.
"""

import sys

import pytest
import torch

from lwkd_fast import ops
from lwkd_fast.bench import attention as A


@pytest.fixture(scope="module")
def inputs():
    return A.attention_inputs(*A.MAIN_SHAPE, torch.device("cpu"))


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "native"])
def test_attention_fwd_bwd(benchmark, inputs, impl):
    fn = {"eager": A.step_eager, "torch.compile": A.step_compiled, "native": A.step_native}[impl]
    if impl == "native" and not ops.backend_status("native", "attention_discrepancy", "cpu")[0]:
        pytest.skip("native extension not loaded")
    benchmark.group = "attention K=4 x (128, 64, 32, 32) fp32 fwd+bwd"
    benchmark.extra_info["bytes"] = A.attention_bytes(*inputs)
    benchmark.pedantic(fn, args=inputs, rounds=20, warmup_rounds=2)


if __name__ == "__main__":
    from lwkd_fast.bench import script_main

    sys.exit(script_main(["attention"]))
