"""Small benchmarking toolkit shared by ``benchmarks/`` and ``lwkd-fast bench``.

* :func:`measure` times a callable (warm-up, then ``repeat`` timed runs; CUDA-synchronised when
  a GPU is in use) and returns median, quartiles and spread.
* :func:`read_bandwidth` measures the achievable read bandwidth of this machine in the same
  process: a plain ``torch.sum`` over a buffer of the given size (the ARCHITECTURE's proxy for
  the memory roofline).
* Noise: every timing window also records the share of the machine's CPU time that OTHER
  processes took meanwhile (``/proc/stat`` minus this process and its children), the number
  that decides whether a comparison can be judged.  Round-robin timing spreads background load
  over all implementations, but it does not make the comparison fair: a multi-threaded
  implementation whose threads lose their cores to other work slows far more than a
  single-threaded one, so speedups measured under load are not speedups.  See :func:`noise`.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Stats", "measure", "measure_round_robin", "stats_of", "read_bandwidth", "cpu_name", "machine_info",
           "CpuClock", "noise", "MAX_SPREAD", "MIN_RUNS"]

MAX_SPREAD = 0.25   # IQR / median above which a median is too unsteady to judge a target with
MIN_RUNS = 3        # fewer timed runs than this: no spread to speak of
CORE_SLACK = 0.1    # other processes may use this share of the machine's cores beyond the idle ones


@dataclass
class Stats:
    median: float            # seconds
    q1: float
    q3: float
    min: float
    max: float
    n: int
    times: List[float] = field(default_factory=list, repr=False)
    other_cpu: Optional[float] = None   # share of all cores other processes used while timed (None: unknown)
    threads: int = 0                    # torch threads while timed

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return self.iqr / self.median if self.median > 0 else 0.0

    @property
    def median_rel_se(self) -> float:
        """Relative standard error of the median: 1.2533 sigma / sqrt(n) with sigma = IQR / 1.349
        (normal approximation), over the median."""
        return 0.9290 * self.spread / math.sqrt(max(self.n, 1))

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d.pop("times")
        d["iqr"] = self.iqr
        d["spread"] = self.spread
        d["noise"] = noise(self)
        return d

    def ms(self) -> str:
        return f"{self.median * 1e3:8.2f} ms ± {self.iqr * 1e3 / 2:.2f}"


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def stats_of(times: List[float], other_cpu: Optional[float] = None) -> Stats:
    """Median, quartiles and extremes of a list of run times (seconds)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return Stats(statistics.median(times), q[0], q[2], min(times), max(times), len(times), list(times),
                 other_cpu, torch.get_num_threads())


class CpuClock:
    """CPU time of the whole machine and of this process (with its children), to tell how much of
    the machine other processes used in a window: ``start()`` ... ``other_share()``.  Linux
    (``/proc/stat``); elsewhere the share is None."""

    def __init__(self):
        self.start()

    @staticmethod
    def _machine_busy() -> Optional[float]:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        busy = sum(fields[:3]) + sum(fields[5:8])
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    def start(self) -> None:
        self._t, self._busy, self._self = time.perf_counter(), self._machine_busy(), self._own()

    def other_share(self) -> Optional[float]:
        """Share (0..1) of all cores' time used by other processes since ``start()``."""
        wall, busy = time.perf_counter() - self._t, self._machine_busy()
        if busy is None or self._busy is None or wall <= 0:
            return None
        other = (busy - self._busy) - (self._own() - self._self)
        return min(1.0, max(0.0, other / (wall * (os.cpu_count() or 1))))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def noise(stats: Stats) -> Optional[str]:
    """Why ``stats`` cannot be used to judge a comparison, or None when it can.

    * too few runs (< MIN_RUNS), or a spread above MAX_SPREAD (IQR / median);
    * more torch threads than usable cores (oversubscribed by configuration);
    * contention: other processes took more cores than this run left idle (cores - threads),
      beyond a slack of CORE_SLACK of the machine -- then multi-threaded implementations lose
      their cores and slow far more than single-threaded ones, whatever the round-robin does.
    """
    if stats.n < MIN_RUNS:
        return f"only {stats.n} timed runs"
    if stats.spread > MAX_SPREAD:
        return f"IQR {stats.spread:.0%} of the median"
    cores = usable_cores()
    if stats.threads > cores:
        return f"{stats.threads} torch threads on {cores} usable cores"
    if stats.other_cpu is not None:
        ncpu = os.cpu_count() or 1
        other_cores = stats.other_cpu * ncpu
        if other_cores > max(0, ncpu - stats.threads) + CORE_SLACK * ncpu:
            return f"contended: other processes used {other_cores:.1f} of {ncpu} cores beside {stats.threads} torch threads"
    return None


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


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
    clock = CpuClock()
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
    other = clock.other_share()
    return {k: stats_of(v, other) for k, v in times.items()}


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
    clock = CpuClock()
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
    return stats_of(times, clock.other_share())


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
    info: Dict[str, object] = {
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": load_average(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
