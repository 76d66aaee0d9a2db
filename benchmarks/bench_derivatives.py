"""Derivative maps, K = 3 layers of a CIFAR ResNet-8, batch 128 of 3x32x32: batched_backward vs
vmap vs loop, Jacobians and HVPs, with peak memory (issue 7).

    python benchmarks/bench_derivatives.py --memory [--repeat N] [--json FILE]
    python -m pytest benchmarks/bench_derivatives.py     # pytest-benchmark suite

Both use lwkd_fast.bench.derivatives, the code behind `lwkd-fast bench --suite derivatives`.
"""

import sys

import pytest

from lwkd_fast.bench import derivatives as D


@pytest.fixture(scope="module")
def workload():
    return D.make_workload(128)


@pytest.mark.parametrize("strategy", D.STRATEGIES)
@pytest.mark.parametrize("kind", D.KINDS)
def test_derivative_maps(benchmark, workload, kind, strategy):
    model, x, v = workload
    benchmark.group = f"derivative maps: {kind}, K=3, batch {x.shape[0]}"
    maps = benchmark.pedantic(D.runner(kind, strategy, model, x, v), rounds=1 if strategy == "loop" else 5,
                              iterations=1, warmup_rounds=1)
    assert len(maps) == len(D.LAYERS) and all(m.shape == x.shape for m in maps)


if __name__ == "__main__":
    from lwkd_fast.bench import script_main

    sys.exit(script_main(["derivatives"]))
