"""``lwkd-fast bench``: every kernel side by side with what a user would otherwise run.

One process, one run: each suite times the project's path and its baselines on the same inputs,
after checking that they agree, and reports median, spread (IQR), effective GB/s and the fraction
of the memory-bandwidth roofline measured in the same run (``torch.sum`` over the same bytes).

Suites are plain functions registered in :data:`SUITES`; the pytest-benchmark files in
``benchmarks/`` import the same case builders, so every baseline exists once (in
:mod:`lwkd_fast.reference` and the suites below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import ops, reference
from .benchmarking import Stats, machine_info, measure, read_bandwidth

# ------------------------------------------------------------------------------------------------
# Rows and suites
# ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    suite: str
    case: str               # problem description (shape, K, dtype)
    impl: str               # implementation name
    stats: Stats
    baseline: str           # impl the speedup is relative to
    nbytes: int = 0         # bytes the fused op must move (0: not a bandwidth-bound case)
    size: float = 0.0       # problem size for the speedup-vs-size plot (elements)
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self, read_bw: float, base_median: Optional[float]) -> Dict[str, object]:
        d = {"suite": self.suite, "case": self.case, "impl": self.impl, "baseline": self.baseline,
             "size": self.size, **self.stats.as_dict(), **self.extra}
        if self.nbytes:
            d["gbps"] = self.nbytes / self.stats.median / 1e9
            d["roofline"] = self.nbytes / self.stats.median / read_bw
        if base_median:
            d["speedup"] = base_median / self.stats.median
        return d


@dataclass
class Ctx:
    quick: bool
    device: torch.device
    repeat: int
    progress: Callable[[str], None]


SUITES: Dict[str, Callable[[Ctx], List[Row]]] = {}


def suite(name: str):
    def deco(fn):
        SUITES[name] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------------------------
# Attention discrepancy: native vs the eager per-layer code of KD repositories vs torch.compile
# ------------------------------------------------------------------------------------------------


def attention_inputs(K: int, B: int, C: int, H: int, W: int, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(K)]
    t = [torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device) for _ in range(K)]
    return s, t


def attention_step_native(s, t):
    with ops.use_backend("native"):
        d = ops.attention_discrepancy(s, t)
    return torch.autograd.grad(d.sum(), s)


def attention_step_eager(s, t):
    return torch.autograd.grad(reference.eager_at_loss(s, t), s)


_compiled_at_loss = None


def attention_step_compiled(s, t):
    global _compiled_at_loss
    if _compiled_at_loss is None:
        _compiled_at_loss = torch.compile(reference.eager_at_loss)
    return torch.autograd.grad(_compiled_at_loss(s, t), s)


def attention_bytes(s, t) -> int:
    """Forward reads student and teacher once; backward reads the student and writes its grad."""
    fs = sum(x.numel() * x.element_size() for x in s)
    ft = sum(x.numel() * x.element_size() for x in t)
    return 3 * fs + ft


@suite("attention")
def attention_suite(ctx: Ctx) -> List[Row]:
    rows: List[Row] = []
    shapes = [(4, 128, 64, 32, 32)] if not ctx.quick else [(4, 128, 64, 32, 32)]
    sweep = [(4, 64, 64, 8, 8), (4, 64, 64, 16, 16), (4, 64, 64, 24, 24)] if ctx.quick else \
        [(4, 128, 64, 8, 8), (4, 128, 64, 16, 16), (4, 128, 64, 24, 24), (4, 128, 64, 48, 48)]
    impls: List[tuple] = [("eager", attention_step_eager), ("torch.compile", attention_step_compiled)]
    if ops.backend_status("native", "attention_discrepancy", ctx.device.type)[0]:
        impls.append(("native", attention_step_native))
    for shape in shapes + sweep:
        K, B, C, H, W = shape
        s, t = attention_inputs(K, B, C, H, W, ctx.device)
        ref = attention_step_eager(s, t)
        case = f"K={K} x ({B}, {C}, {H}, {W}) fp32 fwd+bwd"
        for name, fn in impls:
            ctx.progress(f"attention {case}: {name}")
            got = fn(s, t)  # also warms up torch.compile
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
            st = measure(lambda fn=fn: fn(s, t), repeat=ctx.repeat, warmup=2, device=ctx.device)
            rows.append(Row("attention", case, name, st, "eager", attention_bytes(s, t), float(K * B * C * H * W)))
    return rows


# ------------------------------------------------------------------------------------------------
# Runner, table, JSON, plot
# ------------------------------------------------------------------------------------------------


def run(names: Sequence[str], ctx: Ctx) -> Dict[str, object]:
    t0 = time.perf_counter()
    rows: List[Row] = []
    for name in names:
        rows += SUITES[name](ctx)
    largest = max((r.nbytes for r in rows), default=1 << 26)
    read_bw = read_bandwidth(max(largest // 3, 1 << 24), device=ctx.device)
    base = {(r.suite, r.case): r.stats.median for r in rows if r.impl == r.baseline}
    out_rows = [r.as_dict(read_bw, base.get((r.suite, r.case))) for r in rows]
    return {
        "machine": machine_info(),
        "device": str(ctx.device),
        "quick": ctx.quick,
        "repeat": ctx.repeat,
        "read_bandwidth_gbps": read_bw / 1e9,
        "seconds": time.perf_counter() - t0,
        "rows": out_rows,
    }


def format_table(result: Dict[str, object]) -> str:
    m = result["machine"]
    lines = [
        f"lwkd-fast bench on {m['cpu']} ({m['torch_threads']} threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f", device {result['device']}, torch {m['torch']}, median of {result['repeat']} runs",
        f"read roofline (torch.sum): {result['read_bandwidth_gbps']:.1f} GB/s",
        "",
        f"{'suite':<11} {'case':<38} {'impl':<16} {'median':>10} {'IQR':>9} {'GB/s':>7} {'roofline':>8} {'speedup':>8}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        gbps = f"{r['gbps']:7.1f}" if "gbps" in r else f"{'':7}"
        roof = f"{r['roofline']:8.0%}" if "roofline" in r else f"{'':8}"
        sp = f"{r['speedup']:7.2f}x" if "speedup" in r else f"{'':8}"
        lines.append(
            f"{r['suite']:<11} {r['case'][:38]:<38} {r['impl']:<16} {r['median'] * 1e3:8.2f}ms "
            f"{r['iqr'] * 1e3:7.2f}ms {gbps} {roof} {sp}"
        )
    return "\n".join(lines)


def plot(result: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("size") and "speedup" in r and r["impl"] != r["baseline"]]
    suites = sorted({r["suite"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(suites)), figsize=(5 * max(1, len(suites)), 4), squeeze=False)
    for ax, name in zip(axes[0], suites):
        for impl in sorted({r["impl"] for r in rows if r["suite"] == name}):
            pts = sorted((r["size"], r["speedup"]) for r in rows if r["suite"] == name and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("problem size (elements)")
        ax.set_ylabel("speedup over the eager baseline")
        ax.set_title(name)
        ax.legend()
    m = result["machine"]
    fig.suptitle(f"lwkd-fast bench, {m['cpu']}, device {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller problems and fewer repeats (under 2 minutes on 2 cores)")
    p.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 20, --quick 7)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG plot of speedup against problem size")


def _run_cmd(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeat = args.repeat or (7 if args.quick else 20)
    try:
        from tqdm import tqdm

        bar = tqdm(total=None, bar_format="{desc}", file=sys.stderr, leave=False)

        def progress(msg):
            bar.set_description_str(f"bench: {msg}")
    except ImportError:  # pragma: no cover
        bar = None

        def progress(msg):
            print(f"bench: {msg}", file=sys.stderr)

    ctx = Ctx(quick=args.quick, device=device, repeat=repeat, progress=progress)
    result = run(args.suite or list(SUITES), ctx)
    if bar is not None:
        bar.close()
    print(format_table(result))
    print(f"\n({result['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        plot(result, args.plot)
    return 0


def _register() -> None:
    from .cli import register_command

    register_command("bench", "side-by-side benchmark of every kernel against what users would use instead",
                     _add_arguments, _run_cmd)


_register()
