"""``lwkd-fast check``: every available backend against the float64 reference, on this hardware.

Each *provider* module contributes cases through a function ``lwkd_checks(backend, device)``
that yields :class:`Case` objects; this module provides the discrepancy-op cases itself and
imports the others listed in :data:`PROVIDERS` when they exist in this build.  A case returns
named :class:`~lwkd_fast.testing.Verdict` objects (forward, each gradient, ...).
"""

from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import ops, reference
from .testing import Verdict, verify_op

# modules that may contribute cases (missing ones are skipped)
PROVIDERS = ("lwkd_fast.check", "lwkd_fast.rule", "lwkd_fast.optim", "lwkd_fast.derivatives")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Case:
    op: str                                   # op name, used for backend availability
    label: str                                # what the case exercises
    dtype: torch.dtype
    run: Callable[[], Dict[str, Verdict]]     # called with the backend already selected


@dataclass
class Result:
    op: str
    label: str
    backend: str
    device: str
    dtype: str
    ok: bool
    worst: str = ""
    max_err: float = 0.0
    bound: float = 0.0
    seconds: float = 0.0
    error: Optional[str] = None
    verdicts: Dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Built-in cases: the discrepancy ops
# ------------------------------------------------------------------------------------------------


def _feature_pairs(device, dtype, B=3):
    """K = 3 ragged pairs: NCHW, channels_last, and odd sizes; student/teacher channels differ."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    s = [r(B, 5, 7, 9), r(B, 16, 4, 4).to(memory_format=torch.channels_last), r(B, 33, 3, 5)]
    t = [r(B, 8, 7, 9), r(B, 3, 4, 4), r(B, 17, 3, 5).to(memory_format=torch.channels_last)]
    return s, t


def _map_pairs(device, dtype, B=3):
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    return [r(B, 3, 5, 7), r(B, 10), r(B, 2, 17)], [r(B, 3, 5, 7), r(B, 10), r(B, 2, 17)]


ATTENTION_CONFIGS = (
    dict(metric="at", p=2.0),
    dict(metric="at", p=1.5),
    dict(metric="jsd", p=2.0, normalize="sum", beta=0.3),
    dict(metric="jsd", p=1.0, normalize="softmax", tau=0.5),
)
MAP_CONFIGS = (dict(metric="cos"), dict(metric="jsd", beta=0.7))


def attention_case_fns(cfg):
    """(public, reference) callables returning per-sample (K, B) values for one config."""
    def public(s, t):
        return ops.attention_discrepancy(s, t, reduction="none", **cfg)

    def ref(s, t, compute_dtype):
        return reference.attention_discrepancy(s, t, compute_dtype=compute_dtype, **cfg)

    return public, ref


def map_case_fns(cfg):
    def public(s, t):
        return ops.map_discrepancy(s, t, reduction="none", **cfg)

    def ref(s, t, compute_dtype):
        return reference.map_discrepancy(s, t, compute_dtype=compute_dtype, **cfg)

    return public, ref


def _label(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def lwkd_checks(backend: str, device: torch.device) -> Iterable[Case]:
    for dtype in DTYPES:
        for cfg in ATTENTION_CONFIGS:
            public, ref = attention_case_fns(cfg)
            yield Case("attention_discrepancy", _label(cfg), dtype,
                       lambda public=public, ref=ref, dtype=dtype: verify_op(
                           public, ref, *_feature_pairs(device, dtype), backend=backend))
        for cfg in MAP_CONFIGS:
            public, ref = map_case_fns(cfg)
            yield Case("map_discrepancy", _label(cfg), dtype,
                       lambda public=public, ref=ref, dtype=dtype: verify_op(
                           public, ref, *_map_pairs(device, dtype), backend=backend))
    # eps boundary: an all-zero student map (every metric)
    for cfg in ATTENTION_CONFIGS[::2]:
        public, ref = attention_case_fns(cfg)

        def zero_case(public=public, ref=ref):
            s, t = _feature_pairs(device, torch.float32)
            s[1] = torch.zeros_like(s[1])
            return verify_op(public, ref, s, t, backend=backend)

        yield Case("attention_discrepancy", _label(cfg) + " zero-map", torch.float32, zero_case)


# ------------------------------------------------------------------------------------------------
# Runner
# ------------------------------------------------------------------------------------------------


def _providers():
    mods = []
    for name in PROVIDERS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        if hasattr(mod, "lwkd_checks"):
            mods.append(mod)
    return mods


def run_checks(devices: Sequence[str], backends: Sequence[str] = ops.BACKENDS,
               progress: Optional[Callable[[Result], None]] = None) -> List[Result]:
    results: List[Result] = []
    for dev in devices:
        device = torch.device(dev)
        for backend in backends:
            for mod in _providers():
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
