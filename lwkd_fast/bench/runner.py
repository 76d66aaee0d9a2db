"""The runner behind ``lwkd-fast bench`` (:mod:`lwkd_fast.bench`): runs the suites, judges the
issues' performance targets on the run's own numbers, prints the table, writes JSON, Markdown and
a plot.

A target compares two medians (a speedup, a roofline fraction, an overhead).  It is judged only
when both are trustworthy: enough runs, a spread (IQR / median) below ``MAX_SPREAD``, no more torch
threads than usable cores, and no contention from other processes while they were timed
(:func:`lwkd_fast.benchmarking.noise`).  Then "met" / "missed" needs the ratio to clear the goal by
two standard errors of the ratio of medians; closer than that it is "unclear".  Otherwise the
target is "not judged", with the reason -- a run on a loaded machine prints no verdict at all.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from typing import Dict, List, Sequence

import torch

from ..benchmarking import CpuClock, load_average, machine_info, read_bandwidth
from . import attention, derivatives, e2e, optim
from .core import SUITES, Ctx, Row

SUITE_MODULES = (attention, derivatives, optim, e2e)  # importing them registers their suites

__all__ = ["run", "targets", "judge", "format_table", "format_markdown", "plot", "run_command"]


def run(names: Sequence[str], ctx: Ctx) -> Dict[str, object]:
    t0 = time.perf_counter()
    load_start, clock = load_average(), CpuClock()
    rows: List[Row] = []
    for name in names:
        rows += SUITES[name](ctx)
    read_bw = read_bandwidth(1 << 27, device=ctx.device)  # for rows without their own in-run proxy
    base = {(r.suite, r.case): r.stats.median for r in rows if r.impl == r.baseline}
    out_rows = [r.as_dict(read_bw, base.get((r.suite, r.case))) for r in rows]
    result = {
        "machine": machine_info(),
        "state": {"load_average_start": load_start, "load_average_end": load_average(),
                  "other_cpu_whole_run": clock.other_share(), "threads_requested": ctx.threads,
                  "noisy_rows": sum(1 for r in out_rows if r.get("noise"))},
        "device": str(ctx.device),
        "quick": ctx.quick,
        "repeat": ctx.repeat,
        "read_bandwidth_gbps": read_bw / 1e9,
        "rows": out_rows,
    }
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------


def _row(result, suite, impl, case_prefix=""):
    for r in result["rows"]:
        if r["suite"] == suite and r["impl"] == impl and r["case"].startswith(case_prefix):
            return r
    return None


def _rel_se(r: Dict[str, object], prefix: str = "") -> float:
    """Relative standard error of a row's median (``prefix="read_"``: of its roofline proxy)."""
    return 0.9290 * r[prefix + "spread"] / math.sqrt(max(r[prefix + "n"], 1))


def judge(ratio: float, goal: float, rel_se: float, relation: str, noise: List[str]) -> Dict[str, object]:
    """The verdict on ``ratio`` (a ratio of two medians) against ``goal`` (``relation`` ">=" or
    "<="): "not judged" when ``noise`` names a reason, else "met"/"missed" when the ratio clears
    the goal by two standard errors (``rel_se``, relative) and "unclear" when it does not."""
    if noise:
        return {"verdict": "not judged", "met": None, "why": "; ".join(noise)}
    margin = math.log(ratio / goal) * (1 if relation == ">=" else -1)
    if abs(margin) < 2 * rel_se:
        return {"verdict": "unclear", "met": None,
                "why": f"within two standard errors ({2 * rel_se:.0%}) of the goal"}
    return {"verdict": "met" if margin > 0 else "missed", "met": margin > 0, "why": ""}


def _noise(*rows) -> List[str]:
    """The noise reasons of ``rows``, each once, with the implementations it concerns."""
    by_reason: Dict[str, List[str]] = {}
    for r in rows:
        if r.get("noise"):
            by_reason.setdefault(r["noise"], []).append(r["impl"])
    return [f"{why} ({', '.join(impls)})" for why, impls in by_reason.items()]


def targets(result: Dict[str, object]) -> List[Dict[str, object]]:
    """The issues' performance targets, judged on this run's numbers."""
    out = []

    def add(name, top, bottom, goal, noise, rel_se, unit="x", relation=">=", shown=None):
        ratio = top / bottom
        value = ratio if shown is None else shown(ratio)
        out.append({"target": name, "value": value, "goal": goal if shown is None else shown(goal),
                    "unit": unit, "relation": relation, **judge(ratio, goal, rel_se, relation, noise)})

    def speedup(name, fast, slow, goal, also=()):
        add(name, slow["median"], fast["median"], goal, _noise(fast, slow, *also),
            math.hypot(_rel_se(fast), _rel_se(slow)))

    def roofline(name, r, goal):
        proxy = {"impl": "torch.sum roofline", "noise": r.get("read_noise")}
        add(name, r["read_median"], r["median"], goal, _noise(r, proxy),
            math.hypot(_rel_se(r), _rel_se(r, "read_")), unit="")

    main = "K=4 x (128, 64, 32, 32)"
    nat = _row(result, "attention", "native", main)
    if nat:
        speedup("attention fwd+bwd: native vs eager", nat, _row(result, "attention", "eager", main), 3.0)
        comp = _row(result, "attention", "torch.compile", main)
        if comp:
            speedup("attention fwd+bwd: native vs torch.compile", nat, comp, 1.0)
        roofline("attention fwd+bwd: fraction of read roofline", nat, 0.6)
    for kind in ("jacobian", "hvp"):
        b = _row(result, "derivatives", "batched_backward", kind)
        if b:
            speedup(f"{kind} maps: batched_backward vs loop", b, _row(result, "derivatives", "loop", kind), 10.0)
            speedup(f"{kind} maps: batched_backward vs vmap", b, _row(result, "derivatives", "vmap", kind), 1.5)
    for kind in ("sgd", "adamw"):
        ours = _row(result, "optimizer", "lwkd fused (native)", kind)
        if ours:
            foreach = _row(result, "optimizer", "torch foreach + sync", kind)
            fused = _row(result, "optimizer", "torch fused + tensor lr", kind)
            best, other = sorted((foreach, fused), key=lambda r: r["median"])
            speedup(f"{kind} step: fused vs best torch.optim ({best['impl']})", ours, best, 1.0, also=[other])
            speedup(f"{kind} step: fused vs foreach", ours, foreach, 1.5)
            roofline(f"{kind} step: fraction of read roofline", ours, 0.6)
    lw_ = _row(result, "e2e", "lwkd layer-wise rates")
    if lw_:
        fixed = _row(result, "e2e", "lwkd fixed rate")
        add("e2e step: layer-wise rates overhead vs fixed rate", lw_["median"], fixed["median"], 1.05,
            _noise(lw_, fixed),
            math.hypot(_rel_se(lw_), _rel_se(fixed)), unit="", relation="<=", shown=lambda r: r - 1.0)
    return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

COLUMNS = ("suite", "case", "impl", "median", "IQR", "GB/s", "roof", "speedup", "notes")


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 10 else f"{t:.2f} s"


def _notes(r: Dict[str, object]) -> str:
    notes = []
    if r.get("gflops_per_s"):
        notes.append(f"{r['gflops_per_s']:.1f} GFLOP/s")
    if r.get("peak_mib") is not None:
        notes.append(f"peak {r['peak_mib']:.0f} MiB")
    if "overhead_vs_fixed" in r:
        notes.append(f"{r['overhead_vs_fixed']:+.1%} vs fixed rate")
    if r.get("noise"):
        notes.append(f"NOISY: {r['noise']}")
    if r.get("read_noise"):
        notes.append(f"NOISY roofline: {r['read_noise']}")
    return ", ".join(notes)


def _cells(r: Dict[str, object]) -> List[str]:
    return [r["suite"], r["case"], r["impl"], _fmt_time(r["median"]), _fmt_time(r["iqr"]),
            f"{r['gbps']:.1f}" if "gbps" in r else "", f"{r['roofline']:.0%}" if "roofline" in r else "",
            f"{r['speedup']:.2f}x" if "speedup" in r else "", _notes(r)]


def _fmt_target(t: Dict[str, object]) -> str:
    def val(v):
        return f"{v:.2f}{t['unit']}" if t["unit"] else f"{v:.1%}"

    label = "MISSED" if t["verdict"] == "missed" else t["verdict"]
    why = f" -- {t['why']}" if t["why"] else ""
    return f"  {label:<10} {t['target']}: {val(t['value'])} ({t['relation']} {val(t['goal'])}){why}"


def _load(la) -> str:
    return "/".join(f"{v:.2f}" for v in la) if la else "unknown"


def machine_line(result: Dict[str, object]) -> str:
    m, st = result["machine"], result["state"]
    other = st.get("other_cpu_whole_run")
    used = f"{other:.0%} of the {m['logical_cores']} cores" if other is not None else "an unknown share of the cores"
    asked = f" (--threads {st['threads_requested']})" if st.get("threads_requested") else ""
    return (f"machine state: load average {_load(st.get('load_average_start'))} before the run, "
            f"{_load(st.get('load_average_end'))} after; other processes used {used} over the whole run; "
            f"{m['torch_threads']} torch threads on {m['usable_cores']} usable cores{asked}")


def verdict_summary(result: Dict[str, object]) -> List[str]:
    ts = result.get("targets") or []
    skipped = [t for t in ts if t["verdict"] == "not judged"]
    if not skipped:
        return []
    m, other = result["machine"], result["state"].get("other_cpu_whole_run") or 0.0
    free = max(1, int(m["logical_cores"] * (1.0 - other)))
    return [f"{len(skipped)} of {len(ts)} targets not judged: this run was too noisy to judge them. Rerun on an "
            f"idle machine, or with --threads {free} (the cores other work left free) to compare like for like."]


def format_table(result: Dict[str, object]) -> str:
    m = result["machine"]
    header = (f"lwkd-fast bench on {m['cpu']} ({m['logical_cores']} logical cores, {m['torch_threads']} torch threads)"
              + (f", GPU {m['gpu']}" if "gpu" in m else "")
              + f", device {result['device']}, torch {m['torch']}, {result['repeat']} timed runs per case"
              + (" (--quick)" if result["quick"] else ""))
    body = [list(COLUMNS)] + [_cells(r) for r in result["rows"]]
    widths = [max(len(row[i]) for row in body) for i in range(len(COLUMNS) - 1)]
    right = {3, 4, 5, 6, 7}

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out + [cells[-1]]).rstrip()

    lines = [header, machine_line(result),
             f"roof = effective GB/s / GB/s of a torch.sum over the same bytes, timed in the same round-robin "
             f"(torch.sum over 128 MiB on its own: {result['read_bandwidth_gbps']:.1f} GB/s)", "", line(body[0])]
    lines.append("-" * len(lines[-1]))
    lines += [line(cells) for cells in body[1:]]
    if result.get("targets"):
        lines += ["", "targets (issues 2, 3, 6, 7), judged on this run (met/missed: beyond two standard errors):"]
        lines += [_fmt_target(t) for t in result["targets"]]
        lines += verdict_summary(result)
    return "\n".join(lines)


def format_markdown(result: Dict[str, object]) -> str:
    """The table as Markdown (the README's form)."""
    head = ["suite", "case", "implementation", "median", "IQR", "GB/s", "roofline", "speedup", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


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


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


class StatusLine:
    """One self-overwriting progress line on stderr (only on a terminal: logs stay clean)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.live:
            self.stream.write(f"\r\x1b[Kbench [{time.perf_counter() - self.t0:.0f} s] {msg}")
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _Collect(logging.Handler):
    def __init__(self, sink: List[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage()}")


class collect_messages:
    """Warnings and WARNING+ log records raised during the run (torch's "No CUDA runtime is
    found", ...), kept for printing after the table instead of breaking the progress line.  Every
    logger that has handlers of its own (torch configures some) hands its records to the
    collector meanwhile; its handlers are put back afterwards."""

    def __init__(self):
        self.messages: List[str] = []

    def __enter__(self):
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("default")
        handler = _Collect(self.messages)
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger) and lg.handlers]
        self._saved = [(lg, lg.handlers) for lg in loggers]
        for lg in loggers:
            lg.handlers = [handler]
        return self

    def __exit__(self, *exc):
        for lg, handlers in self._saved:
            lg.handlers = handlers
        self._warnings.__exit__(*exc)
        self.messages += [f"{w.category.__name__}: {w.message}" for w in self._caught]
        self.messages[:] = list(dict.fromkeys(self.messages))  # each once (propagated records repeat)
        return False


def run_command(args: argparse.Namespace) -> int:
    from ..cli import write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = args.repeat or (5 if args.quick else 20)
    status = StatusLine()
    ctx = Ctx(quick=args.quick, device=device, repeat=repeat, progress=status, memory=args.memory,
              derivative_size=args.derivative_size or 0, threads=args.threads)
    try:
        with collect_messages() as caught:
            result = run(args.suite or list(SUITES), ctx)
    finally:
        status.close()
    result["messages"] = caught.messages
    print(format_table(result))
    if caught.messages:
        print("\nmessages raised during the run:")
        print("\n".join(f"  {m}" for m in caught.messages))
    print(f"\n({result['seconds']:.0f} s)")
    write_json(args.json, result)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(format_markdown(result))
    if args.plot:
        plot(result, args.plot)
    return 0
