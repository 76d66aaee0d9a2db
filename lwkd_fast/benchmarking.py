"""Small benchmarking toolkit shared by ``benchmarks/`` and ``lwkd-fast bench``.

* :func:`measure` times a callable (warm-up, then ``repeat`` timed runs; CUDA-synchronised when
  a GPU is in use) and returns median, quartiles and spread.
* :func:`read_bandwidth` measures the achievable read bandwidth of this machine in the same
  process: a plain ``torch.sum`` over a buffer of the given size (the ARCHITECTURE's proxy for
  the memory roofline).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["Stats", "measure", "measure_round_robin", "stats_of", "read_bandwidth", "cpu_name", "machine_info"]


@dataclass
class Stats:
    median: float            # seconds
    q1: float
    q3: float
    min: float
    max: float
    n: int
    times: List[float] = field(default_factory=list, repr=False)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return self.iqr / self.median if self.median > 0 else 0.0

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d.pop("times")
        d["iqr"] = self.iqr
        d["spread"] = self.spread
        return d

    def ms(self) -> str:
        return f"{self.median * 1e3:8.2f} ms ± {self.iqr * 1e3 / 2:.2f}"


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def stats_of(times: List[float]) -> Stats:
    """Median, quartiles and extremes of a list of run times (seconds)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return Stats(statistics.median(times), q[0], q[2], min(times), max(times), len(times), list(times))


def measure_round_robin(fns: Dict[str, Callable[[], object]], *, repeat: int = 20, warmup: int = 2,
                        repeats: Optional[Dict[str, int]] = None,
                        device: Optional[torch.device] = None) -> Dict[str, Stats]:
    """Time several callables interleaved: round r runs every callable that still needs runs, so a
    change of background load on a shared machine hits all of them alike (the comparison a
    benchmark reports is then fair even when the absolute numbers drift).  ``repeats`` overrides
    the number of timed runs per name (e.g. fewer for a slow baseline)."""
    repeats = {k: (repeats or {}).get(k, repeat) for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(max(repeats.values(), default=0)):
            for k, fn in fns.items():
                if r < repeats[k]:
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return {k: stats_of(v) for k, v in times.items()}


def measure(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 3,
            device: Optional[torch.device] = None, max_seconds: Optional[float] = None) -> Stats:
    """Median-of-``repeat`` timing of ``fn()``; stops early (but after at least 5 runs) when
    ``max_seconds`` of timed runs have accumulated."""
    for _ in range(warmup):
        fn()
    _sync(device)
    gc_was = gc.isenabled()
    gc.disable()
    times: List[float] = []
    try:
        spent = 0.0
        for i in range(repeat):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
            if max_seconds is not None and spent > max_seconds and i >= 4:
                break
    finally:
        if gc_was:
            gc.enable()
    return stats_of(times)


def read_bandwidth(nbytes: int, *, device: Optional[torch.device] = None, repeat: int = 20) -> float:
    """Achievable read bandwidth in bytes/s: ``torch.sum`` over an ``nbytes`` float32 buffer."""
    device = device or torch.device("cpu")
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    st = measure(lambda: x.sum(), repeat=repeat, warmup=3, device=device)
    return x.numel() * 4 / st.median


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, object]:
    import os

    info: Dict[str, object] = {
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
