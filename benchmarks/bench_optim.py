"""One layer-wise optimizer step over a ResNet-18-sized parameter list: fused native vs
torch.optim foreach (+ host sync) vs torch.optim fused with tensor rates (issue 3).

    python benchmarks/bench_optim.py [--repeat N] [--json FILE]
    python -m pytest benchmarks/bench_optim.py           # pytest-benchmark suite

Both use lwkd_fast.bench.optim, the code behind `lwkd-fast bench --suite optimizer`.
"""

import sys

import pytest
import torch

from lwkd_fast.bench import optim as O


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("variant", list(O.variants(torch.device("cpu"))))
def test_optimizer_step(benchmark, kind, variant):
    step = O.variants(torch.device("cpu"))[variant](kind, device="cpu")
    step()  # state allocation
    benchmark.group = f"{kind} step, ResNet-18 parameters"
    benchmark.extra_info["bytes"] = O.step_bytes(kind, O.numel())
    benchmark(step)


def test_read_bandwidth(benchmark):
    buf = torch.rand(O.step_bytes("sgd", O.numel()) // 4)
    benchmark.group = "sgd step, ResNet-18 parameters"
    benchmark(buf.sum)


if __name__ == "__main__":
    from lwkd_fast.bench import script_main

    sys.exit(script_main(["optimizer"]))
