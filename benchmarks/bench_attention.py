"""Attention discrepancy, forward + backward: native kernels vs the eager per-layer torch code of
KD repositories (``lwkd_fast.reference.eager_at_loss``: normalize/pow/mean per layer, summed in
Python).

Run as a script for a table (median of >= 20 runs, spread, effective GB/s, fraction of the read
roofline measured in the same run):

    python benchmarks/bench_attention.py [--repeat 20] [--batch 128] [--channels 64] [--size 32] [--layers 4]

or as a pytest-benchmark suite:

    python -m pytest benchmarks/bench_attention.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lwkd_fast import ops
from lwkd_fast.benchmarking import machine_info, measure, read_bandwidth


from lwkd_fast.bench import attention_bytes as bytes_moved
from lwkd_fast.bench import attention_step_eager as step_eager
from lwkd_fast.bench import attention_step_native as step_native


def make_inputs(K=4, B=128, C=64, H=32, W=32):
    from lwkd_fast.bench import attention_inputs

    return attention_inputs(K, B, C, H, W, torch.device("cpu"))


def run(repeat=20, K=4, B=128, C=64, H=32, W=32):
    s, t = make_inputs(K, B, C, H, W)
    # correctness first: the two paths must agree before their speed means anything
    gn, ge = step_native(s, t), step_eager(s, t)
    for a, b in zip(gn, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    nbytes = bytes_moved(s, t)
    bw = read_bandwidth(sum(x.numel() * 4 for x in s))
    rows = {}
    for name, fn in (("eager (per-layer torch)", step_eager), ("native", step_native)):
        rows[name] = measure(lambda fn=fn: fn(s, t), repeat=repeat, warmup=3)
    return rows, nbytes, bw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--json", help="write the results to this file")
    a = ap.parse_args(argv)
    if ops._C is None:
        print(f"native extension not loaded: {ops._C_ERROR}", file=sys.stderr)
        return 1
    rows, nbytes, bw = run(a.repeat, a.layers, a.batch, a.channels, a.size, a.size)
    mi = machine_info()
    print(f"attention discrepancy fwd+bwd, K={a.layers} x ({a.batch}, {a.channels}, {a.size}, {a.size}) float32, "
          f"{mi['cpu']}, {mi['torch_threads']} threads, median of {a.repeat}")
    print(f"read roofline (torch.sum over the student bytes): {bw / 1e9:.1f} GB/s; the fused op moves {nbytes / 1e6:.0f} MB")
    base = rows["eager (per-layer torch)"].median
    print(f"{'path':<26} {'median':>10} {'IQR':>9} {'GB/s':>7} {'roofline':>9} {'speedup':>8}")
    out = {"machine": mi, "bytes": nbytes, "read_bw": bw, "rows": {}}
    for name, st in rows.items():
        gbs = nbytes / st.median / 1e9
        frac = nbytes / st.median / bw
        print(f"{name:<26} {st.median * 1e3:8.2f}ms {st.iqr * 1e3:7.2f}ms {gbs:7.1f} {frac:8.0%} {base / st.median:7.2f}x")
        out["rows"][name] = dict(st.as_dict(), gbps=gbs, roofline=frac, speedup=base / st.median)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


# ---- pytest-benchmark suite ------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def inputs():
        return make_inputs()

    @pytest.mark.parametrize("path", ["eager", "native"])
    def test_attention_fwd_bwd(benchmark, inputs, path):
        if path == "native" and ops._C is None:
            pytest.skip("native extension not loaded")
        fn = step_native if path == "native" else step_eager
        benchmark.pedantic(fn, args=inputs, rounds=20, warmup_rounds=3)


if __name__ == "__main__":
    sys.exit(main())
