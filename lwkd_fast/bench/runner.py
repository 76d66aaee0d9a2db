"""``lwkd-fast bench``: every kernel side by side with what a user would otherwise run.

One process, one run: each suite checks that its implementations agree, then times them
interleaved (round-robin, so background load hits them alike) and reports median, spread (IQR),
effective GB/s and the fraction of the memory-bandwidth roofline, where the roofline is a plain
``torch.sum`` over the same number of bytes measured in the same run.

Suites (one module each, registered in :data:`SUITES`; ``benchmarks/`` wraps the same code as
pytest-benchmark suites, so every baseline exists once):

``attention``    discrepancy fwd+bwd: native vs eager per-layer torch vs ``torch.compile``
``derivatives``  Jacobian / HVP maps: ``batched_backward`` vs ``vmap`` vs ``loop``
``optimizer``    fused layer-wise step vs ``torch.optim`` foreach (+ host sync) and fused
``e2e``          a whole distillation step: layer-wise rates vs fixed rate vs eager KD code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Sequence

import torch

from ..benchmarking import machine_info, read_bandwidth
from . import attention, derivatives, e2e, optim
from .core import SUITES, Ctx, Row

SUITE_MODULES = (attention, derivatives, optim, e2e)  # importing them registers their suites

__all__ = ["SUITES", "Ctx", "Row", "run", "format_table", "plot", "targets", "script_main"]


def run(names: Sequence[str], ctx: Ctx) -> Dict[str, object]:
    t0 = time.perf_counter()
    rows: List[Row] = []
    for name in names:
        rows += SUITES[name](ctx)
    read_bw = read_bandwidth(1 << 27, device=ctx.device)  # for rows without their own in-run proxy
    base = {(r.suite, r.case): r.stats.median for r in rows if r.impl == r.baseline}
    out_rows = [r.as_dict(read_bw, base.get((r.suite, r.case))) for r in rows]
    result = {
        "machine": machine_info(),
        "device": str(ctx.device),
        "quick": ctx.quick,
        "repeat": ctx.repeat,
        "read_bandwidth_gbps": read_bw / 1e9,
        "rows": out_rows,
    }
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - t0
    return result


def _row(result, suite, impl, case_prefix=""):
    for r in result["rows"]:
        if r["suite"] == suite and r["impl"] == impl and r["case"].startswith(case_prefix):
            return r
    return None


def targets(result: Dict[str, object]) -> List[Dict[str, object]]:
    """The issues' performance targets, evaluated on this run's numbers (met or not)."""
    out = []

    def add(name, value, goal, met, unit="x"):
        out.append({"target": name, "value": value, "goal": goal, "met": bool(met), "unit": unit})

    main = "K=4 x (128, 64, 32, 32)"
    nat = _row(result, "attention", "native", main)
    if nat:
        eager = _row(result, "attention", "eager", main)
        comp = _row(result, "attention", "torch.compile", main)
        add("attention fwd+bwd: native vs eager", eager["median"] / nat["median"], 3.0,
            eager["median"] / nat["median"] >= 3.0)
        if comp:
            add("attention fwd+bwd: native vs torch.compile", comp["median"] / nat["median"], 1.0,
                comp["median"] >= nat["median"])
        add("attention fwd+bwd: fraction of read roofline", nat["roofline"], 0.6, nat["roofline"] >= 0.6, "")
    for kind in ("jacobian", "hvp"):
        b = _row(result, "derivatives", "batched_backward", kind)
        if b:
            loop, vmap = _row(result, "derivatives", "loop", kind), _row(result, "derivatives", "vmap", kind)
            add(f"{kind} maps: batched_backward vs loop", loop["median"] / b["median"], 10.0,
                loop["median"] / b["median"] >= 10.0)
            add(f"{kind} maps: batched_backward vs vmap", vmap["median"] / b["median"], 1.5,
                vmap["median"] / b["median"] >= 1.5)
    for kind in ("sgd", "adamw"):
        ours = _row(result, "optimizer", "lwkd fused (native)", kind)
        if ours:
            foreach = _row(result, "optimizer", "torch foreach + sync", kind)
            fused = _row(result, "optimizer", "torch fused + tensor lr", kind)
            best = min(foreach["median"], fused["median"])
            add(f"{kind} step: fused vs best torch.optim", best / ours["median"], 1.0, best >= ours["median"])
            add(f"{kind} step: fused vs foreach", foreach["median"] / ours["median"], 1.5,
                foreach["median"] / ours["median"] >= 1.5)
            add(f"{kind} step: fraction of read roofline", ours["roofline"], 0.6, ours["roofline"] >= 0.6, "")
    lw_ = _row(result, "e2e", "lwkd layer-wise rates")
    if lw_:
        fixed = _row(result, "e2e", "lwkd fixed rate")
        over = lw_["median"] / fixed["median"] - 1.0
        add("e2e step: layer-wise rates overhead vs fixed rate", over, 0.05, over <= 0.05, "")
    return out


def format_table(result: Dict[str, object]) -> str:
    m = result["machine"]
    lines = [
        f"lwkd-fast bench on {m['cpu']} ({m['logical_cores']} logical cores, {m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f", device {result['device']}, torch {m['torch']}, {result['repeat']} timed runs per case"
        + (" (--quick)" if result["quick"] else ""),
        f"roof = effective GB/s / GB/s of a torch.sum over the same bytes, timed in the same round-robin "
        f"(an idle read: {result['read_bandwidth_gbps']:.1f} GB/s)",
        "",
        f"{'suite':<11} {'case':<44} {'impl':<24} {'median':>10} {'IQR':>9} {'GB/s':>6} {'roof':>5} {'speedup':>8}  notes",
    ]
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        gbps = f"{r['gbps']:6.1f}" if "gbps" in r else f"{'':6}"
        roof = f"{r['roofline']:5.0%}" if "roofline" in r else f"{'':5}"
        sp = f"{r['speedup']:7.2f}x" if "speedup" in r else f"{'':8}"
        notes = []
        if r.get("gflops_per_s"):
            notes.append(f"{r['gflops_per_s']:.1f} GFLOP/s")
        if r.get("peak_mib") is not None and "peak_mib" in r:
            notes.append(f"peak {r['peak_mib']:.0f} MiB")
        if "overhead_vs_fixed" in r:
            notes.append(f"{r['overhead_vs_fixed']:+.1%} vs fixed rate")
        med = f"{r['median'] * 1e3:8.2f}ms" if r["median"] < 10 else f"{r['median']:8.2f} s"
        lines.append(
            f"{r['suite']:<11} {r['case'][:44]:<44} {r['impl'][:24]:<24} {med} "
            f"{r['iqr'] * 1e3:7.2f}ms {gbps} {roof} {sp}  {', '.join(notes)}"
        )
    if result.get("targets"):
        lines += ["", "targets (issues 2, 3, 6, 7), evaluated on this run:"]
        for t in result["targets"]:
            val = f"{t['value']:.2f}{t['unit']}" if t["unit"] else f"{t['value']:.1%}"
            goal = f"{t['goal']:.2f}{t['unit']}" if t["unit"] else f"{t['goal']:.0%}"
            rel = "<=" if "overhead" in t["target"] else ">="
            lines.append(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {val} ({rel} {goal})")
    return "\n".join(lines)


def plot(result: Dict[str, object], path: str) -> None:
    """Speedup over each suite's baseline against problem size (suites with a size sweep)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("size") and "speedup" in r and r["impl"] != r["baseline"]]
    suites = sorted({r["suite"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(suites)), figsize=(6 * max(1, len(suites)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], suites):
        for impl in sorted({r["impl"] for r in rows if r["suite"] == name}):
            pts = sorted((r["size"], r["speedup"]) for r in rows if r["suite"] == name and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("problem size (elements of all student feature maps)")
        ax.set_ylabel("speedup over the eager per-layer code")
        ax.set_title(f"{name} (fwd+bwd)")
        ax.legend()
    m = result["machine"]
    fig.suptitle(f"lwkd-fast bench: {m['cpu']}, device {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller problems, fewer runs (under 2 minutes on 2 cores)")
    p.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 20; --quick 5)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the derivative strategies")
    p.add_argument("--derivative-size", type=int, default=0, metavar="N",
                   help="input height = width of the derivatives suite (default 32; --quick 16)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG plot of speedup against problem size")


def _run_cmd(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeat = args.repeat or (5 if args.quick else 20)
    from tqdm import tqdm

    bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", file=sys.stderr, leave=False)

    def progress(msg):
        bar.set_description_str(f"bench: {msg}")

    ctx = Ctx(quick=args.quick, device=device, repeat=repeat, progress=progress, memory=args.memory,
              derivative_size=args.derivative_size)
    try:
        result = run(args.suite or list(SUITES), ctx)
    finally:
        bar.close()
    print(format_table(result))
    print(f"\n({result['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        plot(result, args.plot)
    return 0


def script_main(suites: Sequence[str], argv=None) -> int:
    """Entry point of the ``benchmarks/bench_*.py`` scripts: the same runner as ``lwkd-fast
    bench``, restricted to ``suites``."""
    ap = argparse.ArgumentParser(description=f"lwkd-fast bench --suite {' --suite '.join(suites)}")
    _add_arguments(ap)
    args = ap.parse_args(argv)
    args.suite = args.suite or list(suites)
    return _run_cmd(args)


def _register() -> None:
    from ..cli import register_command

    register_command("bench", "side-by-side benchmark of every kernel against what users would use instead",
                     _add_arguments, _run_cmd)


_register()
