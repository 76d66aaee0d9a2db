"""Rows, context and the suite registry of ``lwkd-fast bench``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..benchmarking import Stats, noise


@dataclass
class Row:
    """One timed implementation of one case."""

    suite: str
    case: str               # problem description (shape, K, dtype)
    impl: str               # implementation name
    stats: Stats
    baseline: str           # impl of the same case the speedup is relative to
    nbytes: int = 0         # bytes the fused op must move (0: not a bandwidth-bound case)
    size: float = 0.0       # problem size for the speedup-vs-size plot (elements); 0: not plotted
    read_stats: Optional[Stats] = None  # torch.sum over nbytes, timed in the same round-robin
    extra: Dict[str, object] = field(default_factory=dict)  # suite-specific numbers (peak MiB, GFLOP/s)

    def as_dict(self, read_bw: float, base_median: Optional[float]) -> Dict[str, object]:
        d = {"suite": self.suite, "case": self.case, "impl": self.impl, "baseline": self.baseline,
             "size": self.size, **self.stats.as_dict(), **self.extra}
        if self.read_stats is not None:
            rs = self.read_stats
            d.update(read_median=rs.median, read_spread=rs.spread, read_n=rs.n, read_noise=noise(rs))
        if self.nbytes:
            bw = self.nbytes / self.read_stats.median if self.read_stats is not None else read_bw
            d["bytes"] = self.nbytes
            d["gbps"] = self.nbytes / self.stats.median / 1e9
            d["read_gbps"] = bw / 1e9
            d["roofline"] = self.nbytes / self.stats.median / bw
        if base_median:
            d["speedup"] = base_median / self.stats.median
        return d


@dataclass
class Ctx:
    quick: bool
    device: torch.device
    repeat: int
    progress: Callable[[str], None]
    memory: bool = False    # also measure peak memory where a suite supports it (slow: subprocesses)
    derivative_size: int = 0  # input height = width of the derivatives suite (0: 32, --quick 16)
    threads: Optional[int] = None  # torch threads requested with --threads (None: torch's default)


SUITES: Dict[str, Callable[[Ctx], List[Row]]] = {}

ROOFLINE = "torch.sum over the same bytes"


def read_proxy(nbytes: int, device: torch.device) -> Callable[[], object]:
    """The achievable-read proxy of ARCHITECTURE: a plain torch.sum over ``nbytes`` (float32),
    to be timed in the same round-robin as the implementations it judges."""
    buf = torch.rand(max(1, nbytes // 4), device=device)
    return buf.sum


def suite(name: str):
    """Register ``fn(ctx) -> List[Row]`` as the suite ``name``."""
    def deco(fn):
        SUITES[name] = fn
        return fn
    return deco
