"""Benchmark of the fused per-layer optimizer step (issue 3).

One optimizer step over a ResNet-18-sized parameter list (11.69M parameters in 62 tensors; four
layer groups -- stem + layer1, layer2, layer3, layer4 -- plus the fc head), comparing in one
process and one run:

* ``lwkd fused``            ``LayerwiseSGD.step(D)``: rule + every tensor in one native call;
* ``torch foreach + sync``  what users write today: the rule in torch, the per-group rates
                            copied to the host (``.tolist()``, a host sync) into
                            ``group["lr"]``, then ``torch.optim.SGD(foreach=True).step()``;
* ``torch fused + tensor lr`` the rule in torch, rates copied on the device into 0-dim tensor
                            ``group["lr"]``, then ``torch.optim.SGD(fused=True).step()``;

and the same three for AdamW.  Every row reports the median and spread (25th-75th percentile) of
the step time, the effective bandwidth (bytes the step must move / time) and the fraction of the
memory-bandwidth roofline, where the achievable bandwidth is measured in the same run as a
``torch.sum`` over the same number of bytes ("roofline").  A single read stream per thread
often draws less bandwidth than the several read and write streams of an optimizer step, so
the column can exceed 100%; "copy-roof" uses ``dst.copy_(src)`` moving the same bytes (half
read, half written) as a second reference.

Run ``python benchmarks/bench_optim.py [--reps N] [--json FILE]`` for the table, or
``pytest benchmarks/bench_optim.py`` for the pytest-benchmark suite.  Numbers taken on a shared
machine are preliminary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:  # the benchmark runs from a checkout (PYTHONPATH) or an install
    import lwkd_fast as lw
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import lwkd_fast as lw

from lwkd_fast import rule

# ------------------------------------------------------------------------------------------------
# The parameter list
# ------------------------------------------------------------------------------------------------


def resnet18_shapes() -> List[Tuple[str, Tuple[int, ...], Optional[int]]]:
    """(name, shape, layer group) of torchvision's resnet18 parameters in registration order:
    62 tensors, 11,689,512 elements; the stem joins group 0, ``fc`` is the head (None)."""
    out = [("conv1.weight", (64, 3, 7, 7), 0), ("bn1.weight", (64,), 0), ("bn1.bias", (64,), 0)]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            pre = f"layer{stage + 1}.{block}"
            first_in = cin if block == 0 else cout
            out += [(f"{pre}.conv1.weight", (cout, first_in, 3, 3), stage), (f"{pre}.bn1.weight", (cout,), stage),
                    (f"{pre}.bn1.bias", (cout,), stage), (f"{pre}.conv2.weight", (cout, cout, 3, 3), stage),
                    (f"{pre}.bn2.weight", (cout,), stage), (f"{pre}.bn2.bias", (cout,), stage)]
            if block == 0 and stage > 0:
                out += [(f"{pre}.downsample.0.weight", (cout, cin, 1, 1), stage),
                        (f"{pre}.downsample.1.weight", (cout,), stage), (f"{pre}.downsample.1.bias", (cout,), stage)]
        cin = cout
    out += [("fc.weight", (1000, 512), None), ("fc.bias", (1000,), None)]
    return out


K = 4


def make_params(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for _, shape, _ in resnet18_shapes():
        p = (torch.randn(shape, generator=g) * 0.05).to(dtype).requires_grad_(True)
        p.grad = (torch.randn(shape, generator=g) * 1e-2).to(dtype)
        ps.append(p)
    return ps


def make_groups(ps, lr):
    layers = [j for _, _, j in resnet18_shapes()]
    groups = []
    for j in list(range(K)) + [None]:
        groups.append({"params": [p for p, l in zip(ps, layers) if l == j], "layer": j,
                       "lr": lr() if callable(lr) else lr})
    return groups


def discrepancies():
    return torch.tensor([0.8, 1.3, 0.4, 2.1], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], None], reps: int, warmup: int = 3) -> List[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarise(ts: List[float]) -> Dict[str, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), statistics.median(ts), max(ts)]
    return {"median": statistics.median(ts), "p25": q[0], "p75": q[2], "min": min(ts), "max": max(ts)}


# ------------------------------------------------------------------------------------------------
# The variants
# ------------------------------------------------------------------------------------------------

SGD_CFG = dict(momentum=0.9, weight_decay=5e-4)
ADAMW_CFG = dict(weight_decay=1e-2)
LR = {"sgd": 0.1, "adamw": 1e-3}


def step_bytes(kind: str, numel: int, elem: int = 4) -> int:
    """Bytes one step must move: SGD+momentum reads p, g, buf and writes p, buf; AdamW reads p,
    g, m, v and writes p, m, v."""
    return (5 if kind == "sgd" else 7) * numel * elem


def lwkd_fused(kind: str, backend: str = "native"):
    ps = make_params()
    groups = make_groups(ps, LR[kind])
    opt = (lw.optim.LayerwiseSGD(groups, lr=LR[kind], **SGD_CFG) if kind == "sgd"
           else lw.optim.LayerwiseAdamW(groups, lr=LR[kind], **ADAMW_CFG))
    d = discrepancies()

    def step():
        with lw.use_backend(backend):
            opt.step(d)
    return step


def _torch_rule(kind):
    m = torch.ones(K)
    d = discrepancies()

    def rates():
        return rule.reference_rates(d, m, None, [LR[kind]], None, 0.9, 1.0, 0.1, 10.0, 1e-12)
    return rates


def torch_foreach_sync(kind: str):
    ps = make_params()
    groups = make_groups(ps, LR[kind])
    opt = (torch.optim.SGD(groups, lr=LR[kind], foreach=True, **SGD_CFG) if kind == "sgd"
           else torch.optim.AdamW(groups, lr=LR[kind], foreach=True, **ADAMW_CFG))
    rates = _torch_rule(kind)

    def step():
        eta = rates().tolist()  # the host sync
        for g in opt.param_groups:
            if g["layer"] is not None:
                g["lr"] = eta[g["layer"]]
        opt.step()
    return step


def torch_fused_tensor_lr(kind: str):
    ps = make_params()
    groups = make_groups(ps, lambda: torch.tensor(LR[kind]))
    opt = (torch.optim.SGD(groups, lr=torch.tensor(LR[kind]), fused=True, **SGD_CFG) if kind == "sgd"
           else torch.optim.AdamW(groups, lr=torch.tensor(LR[kind]), fused=True, **ADAMW_CFG))
    rates = _torch_rule(kind)

    def step():
        eta = rates()
        for g in opt.param_groups:
            if g["layer"] is not None:
                g["lr"].copy_(eta[g["layer"]])
        opt.step()
    return step


VARIANTS = {
    "lwkd fused (native)": lwkd_fused,
    "torch foreach + sync": torch_foreach_sync,
    "torch fused + tensor lr": torch_fused_tensor_lr,
}


def run(reps: int = 15, kinds=("sgd", "adamw"), warmup: int = 3) -> List[Dict[str, object]]:
    """Time every variant (and the torch.sum proxy) round-robin, one step at a time, so that a
    change of load on a shared machine hits all of them alike."""
    numel = sum(torch.Size(s).numel() for _, s, _ in resnet18_shapes())
    rows = []
    for kind in kinds:
        nbytes = step_bytes(kind, numel)
        buf = torch.rand(max(1, nbytes // 4), dtype=torch.float32)
        fns = {name: make(kind) for name, make in VARIANTS.items()}
        fns["torch.sum (read roofline)"] = lambda: buf.sum()
        # a second, read+write proxy: copy nbytes/2 into another nbytes/2
        src = buf[: buf.numel() // 2]
        dst = torch.empty_like(src)
        fns["copy (read+write proxy)"] = lambda: dst.copy_(src)
        times: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        results = {name: summarise(ts) for name, ts in times.items()}
        roof = results.pop("torch.sum (read roofline)")
        copy = results.pop("copy (read+write proxy)")
        foreach = results["torch foreach + sync"]["median"]
        best_torch = min(results["torch foreach + sync"]["median"], results["torch fused + tensor lr"]["median"])
        for name, s in results.items():
            rows.append({
                "optimizer": kind, "variant": name, "median_ms": s["median"] * 1e3,
                "p25_ms": s["p25"] * 1e3, "p75_ms": s["p75"] * 1e3,
                "GB/s": nbytes / s["median"] / 1e9, "roofline": roof["median"] / s["median"],
                "vs_foreach": foreach / s["median"], "vs_best_torch": best_torch / s["median"],
                "read_GB/s": nbytes / roof["median"] / 1e9, "bytes": nbytes, "numel": numel,
                "copy_roofline": copy["median"] / s["median"], "copy_GB/s": nbytes / copy["median"] / 1e9,
            })
        del fns, buf, src, dst
    return rows


def format_rows(rows) -> str:
    head = (f"{'optimizer':<9} {'variant':<24} {'median ms':>10} {'p25-p75 ms':>15} {'GB/s':>7} "
            f"{'roofline':>9} {'copy-roof':>10} {'x foreach':>10} {'x best torch':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['optimizer']:<9} {r['variant']:<24} {r['median_ms']:>10.2f} "
            f"{r['p25_ms']:>7.2f}-{r['p75_ms']:<7.2f} {r['GB/s']:>7.1f} {r['roofline']:>8.0%} "
            f"{r['copy_roofline']:>9.0%} "
            f"{r['vs_foreach']:>9.2f}x {r['vs_best_torch']:>12.2f}x"
        )
    seen = set()
    for r in rows:
        if r["optimizer"] not in seen:
            seen.add(r["optimizer"])
            lines.append(f"{r['optimizer']}: {r['numel']:,} params, {r['bytes'] / 1e6:.0f} MB moved per step, "
                         f"torch.sum read bandwidth {r['read_GB/s']:.1f} GB/s (roofline), "
                         f"copy {r['copy_GB/s']:.1f} GB/s (copy-roof)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--only", choices=("sgd", "adamw"), action="append")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads "
          "(preliminary if the machine is shared)")
    rows = run(args.reps, tuple(args.only or ("sgd", "adamw")))
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return 0


# ------------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ------------------------------------------------------------------------------------------------

try:
    import pytest

    @pytest.mark.parametrize("kind", ["sgd", "adamw"])
    @pytest.mark.parametrize("variant", list(VARIANTS))
    def test_optimizer_step(benchmark, kind, variant):
        step = VARIANTS[variant](kind)
        step()  # warm-up (state allocation)
        benchmark.extra_info["bytes"] = step_bytes(kind, sum(torch.Size(s).numel() for _, s, _ in resnet18_shapes()))
        benchmark(step)

    def test_read_bandwidth(benchmark):
        nbytes = step_bytes("sgd", sum(torch.Size(s).numel() for _, s, _ in resnet18_shapes()))
        buf = torch.rand(nbytes // 4)
        benchmark.extra_info["bytes"] = nbytes
        benchmark(buf.sum)
except ImportError:  # pragma: no cover - pytest is a dev dependency
    pass


if __name__ == "__main__":
    sys.exit(main())
