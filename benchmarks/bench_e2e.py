"""A whole distillation step (forwards, attention discrepancies, backward, optimizer): layer-wise
rates vs a fixed rate vs eager KD code with torch.optim.SGD (issue 6).

    python benchmarks/bench_e2e.py [--repeat N] [--json FILE]
    python -m pytest benchmarks/bench_e2e.py             # pytest-benchmark suite

Both use lwkd_fast.bench.e2e, the code behind `lwkd-fast bench --suite e2e`.
"""

import sys

import pytest
import torch

from lwkd_fast.bench import e2e as E


@pytest.mark.parametrize("variant", ["eager", "fixed", "layerwise"])
def test_kd_step(benchmark, variant):
    dev = torch.device("cpu")
    step = {"eager": lambda: E.eager_step(128, dev), "fixed": lambda: E.distiller_step(128, dev, gamma=0.0),
            "layerwise": lambda: E.distiller_step(128, dev, gamma=1.0)}[variant]()
    benchmark.group = "KD step, ResNet-8 16->32, K=3, batch 128"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


if __name__ == "__main__":
    from lwkd_fast.bench import script_main

    sys.exit(script_main(["e2e"]))
