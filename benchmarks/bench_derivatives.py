"""Derivative maps: ``batched_backward`` vs ``vmap`` vs ``loop`` (SPEC section 3, issue 7).

Workload: input Jacobian maps and Hessian-vector maps of K = 3 layers (``layer1``, ``layer2``,
``layer3``) of a small CIFAR ResNet (3 stages of 16/32/64 channels, BasicBlocks) in train mode
(BatchNorm with frozen batch statistics, as a distillation student runs), batch 128 of 3x32x32,
float32, CPU.

Two ways to run it:

* ``python benchmarks/bench_derivatives.py`` prints a table: median, inter-quartile range and
  minimum of repeated runs per strategy (the strategies run interleaved, round-robin, so a shared
  machine's background load hits them alike), peak memory, and the speed ratios against
  ``batched_backward`` (the targets: >= 10x faster than ``loop`` and >= 1.5x faster than
  ``vmap``).  ``--threads 1`` makes timings far less sensitive to other processes on a busy
  machine; ``--size`` changes the input resolution.
  ``--json PATH`` also writes the numbers.
* ``pytest benchmarks/bench_derivatives.py`` runs the same cases as a pytest-benchmark suite.

Peak memory: PyTorch has no CPU peak-allocation counter (and ``tracemalloc`` does not see its
allocator), so each (kind, strategy) runs once in a fresh subprocess that builds the model and
the batch, resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs the
strategy once and reports ``VmHWM - VmRSS`` from ``/proc/self/status``: the extra resident memory
at the peak of one call.  It counts every page the call touched (allocator caches, thread-pool
buffers, one-time lazy initialisation), so it is an upper bound on tensor memory, measured the
same way for every strategy.  Linux only; elsewhere the column reads "n/a".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import lwkd_fast  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lwkd_fast import derivatives as D  # noqa: E402

LAYERS = ["layer1", "layer2", "layer3"]
STRATEGIES = ("batched_backward", "vmap", "loop")
KINDS = ("jacobian", "hvp")

# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR ResNet-8: stem, three stages of one BasicBlock (16, 32, 64 channels), linear head."""

    def __init__(self, width: int = 16, blocks: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

        def stage(cin, cout, stride):
            return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                   for i in range(blocks)])

        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_workload(batch: int = 128, mode: str = "train", seed: int = 0, size: int = 32):
    torch.manual_seed(seed)
    model = SmallResNet()
    model.train(mode == "train")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=g)
    v = D.rademacher(x.shape, generator=g, dtype=x.dtype)
    return model, x, v


def jacobian_conv_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Convolution FLOPs (2 x multiply-adds) of one Jacobian call on the whole batch: one forward,
    plus for each layer j the input-gradient of every convolution that ran before layer j's output
    (exact for this sequential ResNet, where all of them lie on a path to layer j).  The same
    arithmetic for every strategy, so time -> achieved GFLOP/s, a roofline for the CPU."""
    events: List[tuple] = []
    hooks = []
    model = copy.deepcopy(model).eval()  # no running-stat updates on the benchmarked model
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, i, o: events.append(
                ("conv", o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]))))
        if name in LAYERS:
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: events.append(("layer", name))))
    with torch.no_grad():
        model(x[:1])
    total, running = 0, 0
    for kind, val in events:
        if kind == "conv":
            running += val
        else:
            total += running
    return 2.0 * x.shape[0] * (running + total)


def runner(kind: str, strategy: str, model, x, v) -> Callable[[], List[torch.Tensor]]:
    if kind == "jacobian":
        return lambda: D.input_jacobians(model, x, LAYERS, strategy=strategy)
    return lambda: D.input_hvps(model, x, LAYERS, v=v, strategy=strategy)


# ------------------------------------------------------------------------------------------------
# Timing and memory helpers (local until a shared benchmarking helper exists)
# ------------------------------------------------------------------------------------------------


def summarize(times: List[float]) -> Dict[str, float]:
    ts = sorted(times)
    if len(ts) >= 4:
        q = statistics.quantiles(ts, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ts[-1] - ts[0]  # range when too few runs for quartiles
    return {"median": statistics.median(ts), "iqr": iqr, "min": ts[0], "max": ts[-1], "runs": len(ts)}


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _child_peak(kind: str, strategy: str, batch: int, mode: str, size: int) -> Dict[str, object]:
    """Runs in the subprocess: peak extra resident memory of one call, in MiB."""
    model, x, v = make_workload(batch, mode, size=size)
    fn = runner(kind, strategy, model, x, v)
    import torch.func  # noqa: F401  (import cost is not the strategy's memory)

    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    rss0 = _proc_status_kib("VmRSS")
    fn()
    hwm = _proc_status_kib("VmHWM")
    if rss0 is None or hwm is None:
        return {"peak_mib": None, "note": "no /proc/self/status"}
    return {"peak_mib": (hwm - rss0) / 1024.0, "hwm_reset": reset}


def peak_memory_mib(kind: str, strategy: str, batch: int, mode: str, size: int) -> Optional[float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", kind, strategy,
           "--batch", str(batch), "--mode", mode, "--size", str(size), "--threads", str(torch.get_num_threads())]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"memory child failed for {kind}/{strategy}: {res.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return data.get("peak_mib")


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------


def check_agreement(kind: str, model, x, v, strategies) -> Dict[str, float]:
    """Max relative difference of each strategy's maps to batched_backward's (sanity check that
    the timed strategies compute the same thing; float32)."""
    ref = runner(kind, "batched_backward", model, x, v)()
    out = {}
    for s in strategies:
        if s == "batched_backward":
            continue
        maps = runner(kind, s, model, x, v)()
        out[s] = max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-30)) for a, r in zip(maps, ref))
    return out


def time_round_robin(fns: Dict[str, Callable[[], object]], repeats: Dict[str, int]) -> Dict[str, List[float]]:
    """Time several functions interleaved: round r runs every function that still needs runs, so
    all of them see the same background load on a shared machine.  One untimed warm-up each."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(max(repeats.values())):
        for k, fn in fns.items():
            if r < repeats[k]:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return times


def run_table(args) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, v = make_workload(args.batch, args.mode, size=args.size)
    results: Dict[str, object] = {
        "machine": {
            "cpu": _cpu_name(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "workload": {"model": "SmallResNet (CIFAR ResNet-8, 16/32/64)", "layers": LAYERS, "batch": args.batch,
                     "input": [3, args.size, args.size], "dtype": "float32", "mode": args.mode},
        "rows": [],
    }
    for kind in args.kinds:
        if args.verify:
            agree = check_agreement(kind, model, x, v, args.strategies)
            print(f"[{kind}] max relative difference to batched_backward: "
                  + ", ".join(f"{s}: {d:.1e}" for s, d in agree.items()), flush=True)
        fns = {s: runner(kind, s, model, x, v) for s in args.strategies}
        reps = {s: args.loop_repeats if s == "loop" else args.repeats for s in args.strategies}
        times = time_round_robin(fns, reps)
        for strategy in args.strategies:
            row = {"kind": kind, "strategy": strategy, **summarize(times[strategy]), "times": times[strategy]}
            if kind == "jacobian":
                row["gflops_per_s"] = jacobian_conv_flops(model, x) / row["min"] / 1e9
            row["peak_mib"] = None if args.no_memory else peak_memory_mib(kind, strategy, args.batch, args.mode,
                                                                           args.size)
            results["rows"].append(row)
            print(f"  {kind:<9} {strategy:<17} median {row['median']:.4f}s  (IQR {row['iqr']:.4f}s, "
                  f"min {row['min']:.4f}s, {row['runs']} runs)", flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


def format_table(results: Dict[str, object]) -> str:
    rows = results["rows"]
    base = {r["kind"]: r["median"] for r in rows if r["strategy"] == "batched_backward"}
    header = (f"{'maps':<9} {'strategy':<17} {'median s':>9} {'IQR s':>8} {'min s':>8} {'runs':>4} "
              f"{'peak MiB':>9} {'time / batched':>15} {'GFLOP/s':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        ratio = r["median"] / base[r["kind"]] if r["kind"] in base else float("nan")
        gf = f"{r['gflops_per_s']:.1f}" if r.get("gflops_per_s") else "-"
        lines.append(f"{r['kind']:<9} {r['strategy']:<17} {r['median']:>9.4f} {r['iqr']:>8.4f} {r['min']:>8.4f} "
                     f"{r['runs']:>4} {mem:>9} {ratio:>14.1f}x {gf:>8}")
    lines.append("(GFLOP/s: convolution arithmetic of a Jacobian call / min time; the loop does the same "
                 "arithmetic, so batched/loop can exceed 10x only where the loop is overhead-bound)")
    lines.append("")
    for kind, b in base.items():
        med = {r["strategy"]: r["median"] for r in rows if r["kind"] == kind}
        parts = []
        if "loop" in med:
            sp = med["loop"] / b
            parts.append(f"{sp:.1f}x faster than loop (target >= 10x: {'met' if sp >= 10 else 'MISSED'})")
        if "vmap" in med:
            sp = med["vmap"] / b
            parts.append(f"{sp:.2f}x faster than vmap (target >= 1.5x: {'met' if sp >= 1.5 else 'MISSED'})")
        lines.append(f"{kind}: batched_backward is " + "; ".join(parts))
    m = results["machine"]
    w = results["workload"]
    lines.append(f"workload: {w['model']}, layers {', '.join(w['layers'])}, batch {w['batch']} x "
                 f"{'x'.join(map(str, w['input']))} {w['dtype']}, {w['mode']} mode")
    load = lambda t: "n/a" if t is None else " ".join(f"{a:.2f}" for a in t)  # noqa: E731
    lines.append(f"machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} with "
                 f"{m['torch_threads']} threads; load average {load(m['load_avg_at_start'])} at start, "
                 f"{load(m.get('load_avg_at_end'))} at end")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32, help="input height = width (3 channels)")
    ap.add_argument("--mode", choices=("train", "eval"), default="train",
                    help="model mode (train: BatchNorm with frozen batch statistics)")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs of batched_backward and vmap")
    ap.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the (slow) loop strategy")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the check that all strategies agree")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_memory-child", nargs=2, metavar=("KIND", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(_child_peak(*args._memory_child, args.batch, args.mode, args.size)))
        return 0
    results = run_table(args)
    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


# ------------------------------------------------------------------------------------------------
# pytest-benchmark suite:  pytest benchmarks/bench_derivatives.py [--benchmark-only]
# ------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def workload():
        return make_workload(int(os.environ.get("LWKD_BENCH_BATCH", "128")))

    @pytest.mark.parametrize("strategy", STRATEGIES)
    @pytest.mark.parametrize("kind", KINDS)
    def test_derivative_maps(benchmark, workload, kind, strategy):
        model, x, v = workload
        fn = runner(kind, strategy, model, x, v)
        rounds = 1 if strategy == "loop" else 5
        benchmark.group = f"derivative maps: {kind}, K=3, batch {x.shape[0]}"
        benchmark.extra_info.update(kind=kind, strategy=strategy, batch=x.shape[0], layers=LAYERS)
        maps = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        assert len(maps) == len(LAYERS) and all(m.shape == x.shape for m in maps)


if __name__ == "__main__":
    sys.exit(main())
