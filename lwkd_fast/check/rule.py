"""`lwkd-fast check` cases of the rate rule (``layerwise_rates``): the op on the device against
the rule's Python float64 oracle (``lwkd_fast.rule.oracle_rates``), both normalisations."""

from __future__ import annotations

from typing import Dict, Iterable

import torch

from ..rule import OP, layerwise_rates, new_reference_state, oracle_rates
from ..testing import Verdict, compare
from .case import Case

_RUNNING = dict(rate_normalize="running", ref_momentum=0.9)
_CHECK_CASES = (
    ("ragged K=7, one NaN, one inf", [0.3, 1.7, float("nan"), 0.02, 4.0, float("inf"), 0.9],
     dict(momentum=0.9, gamma=1.0, s_min=0.1, s_max=10.0)),
    ("gamma=0.5, tight clamp", [0.3, 1.7, 0.0, 0.02, 4.0], dict(momentum=0.5, gamma=0.5, s_min=0.5, s_max=2.0)),
    ("negative D skipped, gamma=0.5", [0.3, -0.5, 1.2, -0.0], dict(momentum=0.9, gamma=0.5, s_min=0.1, s_max=10.0)),
    ("all zero (sum <= eps)", [0.0, 0.0, 0.0], dict(momentum=0.8, gamma=2.0, s_min=0.1, s_max=10.0)),
    ("all non-finite", [float("nan"), float("-inf")], dict(momentum=0.9, gamma=1.0, s_min=0.1, s_max=10.0)),
    ("running: ragged K=7, NaN, inf, negative", [0.3, 170.0, float("nan"), 0.002, -4.0, float("inf"), 0.9],
     dict(momentum=0.9, gamma=1.5, s_min=0.1, s_max=10.0, **_RUNNING)),
    ("running: all zero (no reference yet)", [0.0, 0.0, 0.0], dict(momentum=0.8, gamma=1.0, s_min=0.1, s_max=10.0,
                                                                    **_RUNNING)),
)


def lwkd_checks(backend: str, device: torch.device) -> Iterable:
    """Cases for ``lwkd-fast check``: the rule on ``device`` against the Python float64 oracle,
    float32 and float64 state, both normalisations, three consecutive steps (the momentum and
    the running reference carry over)."""
    def rounded(xs, dtype):
        return [float(x) for x in torch.tensor(xs, dtype=dtype).double()]

    def make(label, dvals, opts, sdtype):
        def run() -> Dict[str, Verdict]:
            K = len(dvals)
            g = torch.Generator().manual_seed(3)
            m0 = (0.5 + torch.rand(K, generator=g, dtype=torch.float64)).tolist()
            state = torch.tensor(m0, dtype=sdtype, device=device)
            running = opts.get("rate_normalize") == "running"
            ref_state = new_reference_state(K, sdtype, device) if running else None
            ref = [[0.0] * K, [0.0] * K] if running else None
            oracle_opts = {k: v for k, v in opts.items() if k != "rate_normalize"}
            nf = torch.zeros((), dtype=torch.int64, device=device)
            m_ref, count, out = list(m0), 0, {}
            for step in range(3):
                dv = [x * (1.0 + 0.25 * step) for x in dvals]
                lr = 0.1 / (1 + step)
                eta = layerwise_rates(torch.tensor(dv, dtype=torch.float32, device=device), state, lr,
                                      nonfinite=nf, ref_state=ref_state, **opts)
                # the oracle sees the same float32 inputs and the rounded factors and reference
                dv32 = torch.tensor(dv, dtype=torch.float32).double().tolist()
                if running:
                    ref = [rounded(ref[0], sdtype), rounded(ref[1], sdtype)]
                eta_ref, m_ref, bad = oracle_rates(dv32, rounded(m_ref, sdtype), lr, ref=ref, **oracle_opts)
                count += int(bad)
                out[f"eta[{step}]"] = compare(eta, torch.tensor(eta_ref, dtype=torch.float64), sdtype)
                out[f"state[{step}]"] = compare(state, torch.tensor(m_ref, dtype=torch.float64), sdtype)
                if running:
                    out[f"ref_state[{step}]"] = compare(ref_state, torch.tensor(ref, dtype=torch.float64), sdtype)
            got = int(nf.cpu())
            out["nonfinite"] = Verdict(got == count, float(abs(got - count)), 0.0, "exact count")
            return out

        return run

    for sdtype in (torch.float32, torch.float64):
        for label, dvals, opts in _CHECK_CASES:
            yield Case(OP, label, sdtype, make(label, dvals, opts, sdtype))
