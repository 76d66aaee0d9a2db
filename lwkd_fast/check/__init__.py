"""``lwkd-fast check``: every available backend against the float64 reference, on this hardware.

One module of this package per op family contributes cases through ``lwkd_checks(backend,
device)``, which yields :class:`~lwkd_fast.check.case.Case` objects; a case returns named
:class:`~lwkd_fast.testing.Verdict` objects (forward, each gradient, ...), judged by the tolerance
module the tests use too (``lwkd_fast.testing``).

    discrepancy.py   attention_discrepancy, map_discrepancy
    rule.py          layerwise_rates (the rate rule)
    step.py          layerwise_sgd_step, layerwise_adamw_step (the fused optimizer step)
    derivatives.py   the Jacobian / HVP strategies (reference backend only)
"""

from __future__ import annotations

import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import ops
from . import derivatives, discrepancy, rule, step
from .case import DTYPES, Case, Result
# the discrepancy cases' fixtures, reached as check.<name> by the discrepancy tests
from .discrepancy import (ATTENTION_CONFIGS, MAP_CONFIGS, _feature_pairs, _label, _map_pairs,  # noqa: F401
                          attention_case_fns, map_case_fns)

__all__ = ["Case", "Result", "DTYPES", "PROVIDERS", "run_checks", "format_table"]

# the case modules, in the order `lwkd-fast check` runs them
PROVIDERS = (discrepancy, rule, step, derivatives)


# ------------------------------------------------------------------------------------------------
# Runner
# ------------------------------------------------------------------------------------------------


def run_checks(devices: Sequence[str], backends: Sequence[str] = ops.BACKENDS,
               progress: Optional[Callable[[Result], None]] = None) -> List[Result]:
    results: List[Result] = []
    for dev in devices:
        device = torch.device(dev)
        for backend in backends:
            for mod in PROVIDERS:
                for case in mod.lwkd_checks(backend, device):
                    ok_b, _why = ops.backend_status(backend, case.op, device.type)
                    if not ok_b:
                        continue
                    res = Result(case.op, case.label, backend, device.type, str(case.dtype).replace("torch.", ""), True)
                    t0 = time.perf_counter()
                    try:
                        with ops.use_backend(backend):
                            verdicts = case.run()
                    except Exception as exc:  # a crash is a failure, reported with its message
                        res.ok = False
                        res.error = f"{type(exc).__name__}: {exc}"
                        res.verdicts = {"traceback": traceback.format_exc(limit=3)}
                    else:
                        res.ok = all(v.ok for v in verdicts.values())
                        worst_name, worst = max(
                            verdicts.items(), key=lambda kv: (not kv[1].ok, kv[1].max_err / max(kv[1].bound, 1e-300))
                        )
                        res.worst, res.max_err, res.bound = worst_name, worst.max_err, worst.bound
                        res.verdicts = {k: str(v) for k, v in verdicts.items()}
                    res.seconds = time.perf_counter() - t0
                    results.append(res)
                    if progress:
                        progress(res)
    return results


def format_table(results: Sequence[Result]) -> str:
    """Pass/fail table grouped by (op, backend, device, dtype) with the largest errors."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.backend, r.device, r.dtype), []).append(r)
    header = f"{'op':<24} {'backend':<10} {'device':<6} {'dtype':<9} {'cases':>5} {'status':<6} {'max err':>10} {'allowed':>10}  worst case"
    lines = [header, "-" * len(header)]
    for (op, backend, device, dtype), rs in groups.items():
        bad = [r for r in rs if not r.ok]
        worst = max(rs, key=lambda r: (not r.ok, r.max_err / max(r.bound, 1e-300)))
        status = "PASS" if not bad else "FAIL"
        detail = worst.error or f"{worst.label} [{worst.worst}]"
        lines.append(
            f"{op:<24} {backend:<10} {device:<6} {dtype:<9} {len(rs):>5} {status:<6} "
            f"{worst.max_err:>10.2e} {worst.bound:>10.2e}  {detail}"
        )
    return "\n".join(lines)
