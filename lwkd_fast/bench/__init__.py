"""``lwkd-fast bench``: every kernel side by side with what a user would otherwise run.

One process, one run: each suite checks that its implementations agree with the float64
reference, then times them interleaved (round-robin) and reports median, spread (IQR), effective
GB/s and the fraction of the memory-bandwidth roofline, where the roofline is a plain
``torch.sum`` over the same number of bytes measured in the same run.  Every timing window also
records how much of the machine other processes used; a target is judged ("met" / "missed") only
on numbers that are steady and uncontended, and otherwise reported as "not judged" with the
reason (:func:`lwkd_fast.benchmarking.noise`).

Suites (one module each, registered in :data:`lwkd_fast.bench.core.SUITES`; ``benchmarks/``
wraps the same code as pytest-benchmark suites, so every baseline exists once):

``attention``    discrepancy fwd+bwd, NCHW maps and token layouts (fp32, bf16): native vs eager
                 per-layer torch vs ``torch.compile``
``derivatives``  Jacobian / HVP maps: ``batched_backward`` vs ``vmap`` vs ``loop``
``optimizer``    fused layer-wise step vs ``torch.optim`` foreach (+ host sync) and fused
``e2e``          a whole distillation step: layer-wise rates vs fixed rate vs eager KD code

This module is the command-line face only and imports no torch (``lwkd-fast bench --help`` and
argument errors answer at once); :mod:`lwkd_fast.bench.runner` runs the suites.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Sequence

from ..cli import (UsageError, device_name, int_at_least, output_file, positive_int, register_command,
                   require_device)

# the suites of lwkd_fast.bench.core.SUITES (tests/test_bench.py holds the two equal)
SUITE_NAMES = ("attention", "derivatives", "optimizer", "e2e")

__all__ = ["SUITE_NAMES", "add_arguments", "run_command", "script_main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="smaller problems, fewer runs (about 3-4 minutes on 2 idle cores)")
    p.add_argument("--suite", action="append", choices=SUITE_NAMES, help="run only this suite (repeatable)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch threads for every implementation (default: torch's own choice); "
                        "--threads 1 compares like for like on a machine that other work shares")
    p.add_argument("--repeat", type=int_at_least(3), default=None,
                   help="timed runs per case, at least 3 (default 20; --quick 5)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the derivative strategies")
    p.add_argument("--derivative-size", type=positive_int, default=None, metavar="N",
                   help="input height = width of the derivatives suite (default 32; --quick 16)")
    p.add_argument("--json", metavar="FILE", type=output_file, help="write every number as JSON")
    p.add_argument("--markdown", metavar="FILE", type=output_file, help="write the table as Markdown")
    p.add_argument("--plot", metavar="FILE", type=output_file,
                   help="write a PNG plot of speedup against problem size (needs matplotlib)")


def run_command(args: argparse.Namespace) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot {args.plot!r}: matplotlib is not installed: pip install 'lwkd-fast[demo]'")
    import torch

    args.device = str(require_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    from . import runner  # the suites: torch.compile, the models

    return runner.run_command(args)


def script_main(suites: Sequence[str], argv=None) -> int:
    """Entry point of the ``benchmarks/bench_*.py`` scripts: the same runner as ``lwkd-fast
    bench``, restricted to ``suites``."""
    from ..cli import PROG, _Parser

    ap = _Parser(prog=f"{PROG} bench --suite {' --suite '.join(suites)}")
    add_arguments(ap)
    args = ap.parse_args(argv)
    args.suite = args.suite or list(suites)
    try:
        return run_command(args)
    except UsageError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")


register_command("bench", "side-by-side benchmark of every kernel against what users would use instead",
                 add_arguments, run_command)
