"""``lwkd-fast demo``: does layer-wise distillation with layer-wise rates help?  On real data, end
to end, on the CPU.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download).
A wide teacher CNN is trained once on the whole training split and cached in the user cache
directory under a key that covers everything that determines it.  Thin students then learn from
few of the training images, in two settings on the same data (``SETTINGS``):

    limited     a fifth of the training images (240, 24 per class; with all of them every
                student reaches ~99% and there is nothing left to distil)
    scarce      5 labelled images per class (50): the harder setting, where the labels alone
                teach least and distillation matters most (Hinton KD gains ~5 points here)

with the losses

    ce          plain cross-entropy                                  (baseline, fixed rate)
    kd          Hinton knowledge distillation (T = 4)                (baseline, fixed rate)
    attention   cross-entropy + attention-map matching of the paired stages
    jacobian    cross-entropy + input-Jacobian matching of the paired stages
    hessian     cross-entropy + Hessian-vector-product matching of the paired stages

and, for the three matching losses, three arms: a fixed rate, layer-wise rates with the rule
``rate_normalize="none"`` and with ``"running"`` (SPEC section 4).  Every arm runs on the same
seeds (a seed fixes the initial weights, the data order and the HVP vectors), so arms are compared
*paired*: per-seed differences, t intervals made simultaneous over every comparison of the run
(Bonferroni), and a verdict that says "not enough seeds" where the interval cannot tell.
Output: the accuracy table, the paired comparisons, each layer's rate trajectory, a PNG figure and
a JSON file of every number (including the exact number of training images used).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__

# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


def load_digits_split(seed: int = 0, test_fraction: float = 1 / 3):
    """(x_train, y_train, x_test, y_test): float32 (N, 1, 8, 8) in [0, 1], stratified split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return x[tr], y[tr], x[te], y[te]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False),
    )


class DigitsCNN(nn.Module):
    """Three stages at 8x8, 4x4 and 2x2 (``stage1..3``), global average pool, linear head."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stage1 = _block(1, w)
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = _block(w, 2 * w)
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = _block(2 * w, 4 * w)
        self.head = nn.Linear(4 * w, 10)

    def forward(self, x):
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        x = self.stage3(x)
        return self.head(x.mean(dim=(2, 3)))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


# ------------------------------------------------------------------------------------------------
# Teacher (cached)
# ------------------------------------------------------------------------------------------------

TEACHER_CFG = dict(width=32, epochs=30, lr=0.05, batch=64, seed=0, split_seed=0, weight_decay=5e-4)


def cache_dir() -> str:
    base = os.environ.get("LWKD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lwkd_fast")
    os.makedirs(base, exist_ok=True)
    return base


def teacher_key(cfg: Dict) -> str:
    """Everything that determines the teacher: the config, the package version, torch's version."""
    blob = json.dumps({"cfg": cfg, "lwkd_fast": __version__, "torch": torch.__version__.split("+")[0],
                       "arch": "DigitsCNN-v1"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _batches(n: int, batch: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch):
        yield perm[i:i + batch]


def train_teacher(data, cfg: Dict, progress=None) -> Tuple[nn.Module, float]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(cfg["seed"])
    model = DigitsCNN(cfg["width"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"])
    g = torch.Generator().manual_seed(cfg["seed"])
    for _ in range(cfg["epochs"]):
        model.train()
        for idx in _batches(len(xtr), cfg["batch"], g):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if progress:
            progress.update(1)
    model.eval()
    return model, accuracy(model, xte, yte)


def get_teacher(data, cfg: Dict = TEACHER_CFG, progress_factory=None, log=print) -> Tuple[nn.Module, float, str]:
    path = os.path.join(cache_dir(), f"digits-teacher-{teacher_key(cfg)}.pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            model = DigitsCNN(cfg["width"])
            model.load_state_dict(blob["state_dict"])
            model.eval()
            return model, float(blob["test_acc"]), f"cached teacher {path}"
        except Exception as exc:  # a corrupt cache entry is rebuilt, never trusted
            log(f"ignoring unreadable teacher cache {path}: {type(exc).__name__}: {exc}")
    bar = progress_factory(total=cfg["epochs"], desc="teacher") if progress_factory else None
    model, acc = train_teacher(data, cfg, bar)
    if bar:
        bar.close()
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"state_dict": model.state_dict(), "test_acc": acc, "cfg": cfg}, tmp)
    os.replace(tmp, path)
    return model, acc, f"trained teacher, cached at {path}"


# ------------------------------------------------------------------------------------------------
# Students
# ------------------------------------------------------------------------------------------------


def student_subset(data, n: int, seed: int = 0):
    """The students' training images: a fixed stratified subset of exactly ``n`` training images
    (the same for every student and seed; each class gets its share of ``n``, rounded by largest
    remainder, and at least one image); the test split is unchanged."""
    xtr, ytr, xte, yte = data
    if n >= len(xtr):
        return data
    if n < 10:
        raise ValueError(f"student_subset: need at least one image per class (10), got n={n}")
    g = torch.Generator().manual_seed(seed)
    per_class = [(ytr == c).nonzero().flatten() for c in range(10)]
    quota = [n * len(idx) / len(xtr) for idx in per_class]
    take = [max(1, int(q)) for q in quota]
    by_remainder = sorted(range(10), key=lambda c: (-(quota[c] - int(quota[c])), c))
    k = 0
    while sum(take) < n:
        take[by_remainder[k % 10]] += 1
        k += 1
    while sum(take) > n:  # (only when the one-image minimum overshoots)
        c = max(range(10), key=lambda c: take[c])
        take[c] -= 1
    keep = torch.cat([idx[torch.randperm(len(idx), generator=g)[:t]] for idx, t in zip(per_class, take)])
    return xtr[keep], ytr[keep], xte, yte


LOSSES = ("ce", "kd", "attention", "jacobian", "hessian")
MATCHING = ("attention", "jacobian", "hessian")
# "fixed": one rate for every layer (gamma = 0); "none" / "running": layer-wise rates with that
# rate_normalize (SPEC section 4).  ce and kd are baselines: fixed rate only.
ARMS = ("fixed", "none", "running")
ARM_LABEL = {"fixed": "fixed rate", "none": "layer-wise, rule 'none'", "running": "layer-wise, rule 'running'"}
# the settings: the same bundled data, students that see few of the training images (the teacher
# sees all of them); "scarce" is the harder one, where the labels alone teach least
SETTINGS = {
    "limited": dict(train_images=240, batch=64, epochs=40,
                    about="a fifth of the training images (24 per class)"),
    "scarce": dict(train_images=50, batch=25, epochs=40, about="5 labelled images per class"),
}


def arms_of(loss: str) -> Tuple[str, ...]:
    return ARMS if loss in MATCHING else ("fixed",)


@dataclass
class RunResult:
    setting: str
    loss: str
    arm: str                        # "fixed" | "none" | "running"
    seed: int
    test_acc: float
    curve: List[float] = field(default_factory=list)             # test accuracy per epoch
    factor_traj: List[List[float]] = field(default_factory=list)  # per epoch: m_j = eta_j / eta0
    seconds: float = 0.0
    nonfinite_losses: int = 0


def train_student(setting: str, loss: str, arm: str, seed: int, data, teacher: nn.Module, cfg: Dict,
                  progress=None) -> RunResult:
    """One student run; ``progress.update(1)`` after every epoch.  ``cfg["settings"][setting]``
    gives the training images, batch size and epochs; the seed fixes the student's initial weights,
    the data order and the HVP vectors, the same for every arm (so arms are paired by seed)."""
    from .distill import LayerwiseDistiller

    st = cfg["settings"][setting]
    xtr, ytr, xte, yte = student_subset(data, st["train_images"])
    torch.manual_seed(1000 + seed)
    student = DigitsCNN(cfg["student_width"])
    method = loss if loss in MATCHING else "attention"
    gen = torch.Generator().manual_seed(2000 + seed)
    d = LayerwiseDistiller(
        student, teacher, pairs="auto", method=method, use="rates+loss" if loss in MATCHING else "rates",
        weights=[cfg["match_weight"][method]] * 3,
        kd_weight=0.7 if loss == "kd" else 0.0, temperature=4.0,
        generator=gen, example_input=xtr[:8],
    )
    opt = d.make_optimizer("sgd", lr=cfg["lr"], momentum=0.9, weight_decay=5e-4,
                           gamma=0.0 if arm == "fixed" else cfg["gamma"],
                           rate_normalize="none" if arm == "fixed" else arm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, st["epochs"])
    g = torch.Generator().manual_seed(3000 + seed)
    res = RunResult(setting, loss, arm, seed, 0.0)
    t0 = time.perf_counter()
    for _ in range(st["epochs"]):
        d.train()
        for idx in _batches(len(xtr), st["batch"], g):
            out = d(xtr[idx], ytr[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step(out.discrepancies)
        sched.step()
        res.curve.append(accuracy(student, xte, yte))
        res.factor_traj.append([float(v) for v in opt.factors])
        if progress:
            progress.update(1)
    res.seconds = time.perf_counter() - t0
    res.test_acc = res.curve[-1]
    res.nonfinite_losses = int(d.nonfinite_losses)
    return res


# ------------------------------------------------------------------------------------------------
# Running many students: worker processes, one thread each
# ------------------------------------------------------------------------------------------------
#
# These models are tiny: an intra-op thread pool costs more in synchronisation than it saves, and
# on a busy machine its barriers stall for whole scheduler time slices.  The demo therefore runs
# independent students in `jobs` processes with one thread each.  Every run seeds its own
# generators, so the numbers do not depend on the number of jobs.

_WORKER: Dict[str, object] = {}


def _init_worker(teacher_state, data, progress_queue) -> None:
    torch.set_num_threads(1)
    teacher = DigitsCNN(TEACHER_CFG["width"])
    teacher.load_state_dict(teacher_state)
    teacher.eval()
    _WORKER.update(teacher=teacher, data=data, queue=progress_queue)


class _QueueTicks:
    def __init__(self, q):
        self.q = q

    def update(self, n=1):
        self.q.put(n)


def _run_in_worker(job) -> RunResult:
    run, cfg = job
    return train_student(*run, _WORKER["data"], _WORKER["teacher"], cfg, _QueueTicks(_WORKER["queue"]))


def train_students(runs, data, teacher: nn.Module, cfg: Dict, jobs: int, bar=None,
                   on_done=None) -> List[RunResult]:
    """Train every (setting, loss, arm, seed) run; results in the order of ``runs``.
    ``on_done(result)`` is called in this process as each run finishes (the run record)."""
    on_done = on_done or (lambda r: None)
    if jobs <= 1:
        torch.set_num_threads(1)
        out = []
        for run in runs:
            if bar is not None:
                bar.set_description("/".join(map(str, run)))
            out.append(train_student(*run, data, teacher, cfg, bar))
            on_done(out[-1])
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(teacher.state_dict(), data, q)) as pool:
        futures = [pool.submit(_run_in_worker, (run, cfg)) for run in runs]
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2)
            try:
                while True:
                    n = q.get_nowait()
                    if bar is not None:
                        bar.update(n)
            except queue_mod.Empty:
                pass
            for f in done:
                on_done(f.result())  # a failed run fails the demo, with its traceback
        return [f.result() for f in futures]


# ------------------------------------------------------------------------------------------------
# The run record: every finished run, so that a long evidence run survives an interruption
# ------------------------------------------------------------------------------------------------
#
# <out>/runs.jsonl gets one line per run as it finishes: the run and the fingerprint of everything
# that determines it besides its seed (the teacher's and the students' configuration, the setting,
# the versions of lwkd_fast and torch).  A run is a deterministic function of these and its seed
# (the same numbers with any number of jobs), so `--resume` takes the recorded runs whose
# fingerprint matches instead of training them again: `--full`, hours on 2 cores, can be stopped
# and continued.  Lines of other configurations, and a line cut short by an interruption, are
# ignored.

RUN_RECORD = "runs.jsonl"


def run_fingerprint(cfg: Dict, setting: str) -> str:
    blob = json.dumps({"teacher": TEACHER_CFG, "student": {k: v for k, v in cfg.items() if k != "settings"},
                       "setting": cfg["settings"][setting], "lwkd_fast": __version__, "torch": torch.__version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_run_record(path: str, cfg: Dict) -> Dict[Tuple, RunResult]:
    """The runs recorded in ``path`` for ``cfg``'s settings, keyed (setting, loss, arm, seed)."""
    want = {st: run_fingerprint(cfg, st) for st in cfg["settings"]}
    found: Dict[Tuple, RunResult] = {}
    if not os.path.exists(path):
        return found
    with open(path) as fh:
        for line in fh:
            try:
                entry = json.loads(line)
                r = RunResult(**entry["run"])
            except (ValueError, TypeError, KeyError):
                continue
            if want.get(r.setting) == entry.get("fingerprint"):
                found[(r.setting, r.loss, r.arm, r.seed)] = r
    return found


# ------------------------------------------------------------------------------------------------
# Statistics: paired comparisons with simultaneous intervals
# ------------------------------------------------------------------------------------------------
#
# Every arm of a (setting, loss) runs on the same seeds, and a seed fixes the student's initial
# weights, the data order and the HVP vectors: the arms are paired by seed, so the comparison of
# two arms is a one-sample problem on the per-seed differences d_s = acc_A(s) - acc_B(s).  Each
# comparison gets a two-sided t interval for the mean of d; the intervals are simultaneous over
# all m comparisons of the run (Bonferroni: each at level 1 - alpha/m), so the chance that any
# verdict of the table is a false "helped"/"hurt" is at most alpha (5%) when the differences are
# roughly normal.  The verdict follows the interval [lo, hi] (percentage points):
#
#     lo > 0                     "helped"   (A better than B)
#     hi < 0                     "hurt"
#     -margin < lo, hi < margin  "no difference > 1 pt" (equivalence within the margin, 1 point)
#     otherwise                  "not enough seeds": the interval holds both 0 and a difference
#                                that matters, so this many seeds cannot tell
#
# A verdict needs at least 3 seeds (with 2 the interval rests on one degree of freedom; with 1
# there is none).  Accuracies are counts of test images, so differences move in steps of
# 100 / (test images) points; a spread below one such step (e.g. identical differences on every
# seed) is not evidence of precision, and the interval uses one step as the smallest sd.

COMPARISONS = (("none", "fixed"), ("running", "fixed"), ("running", "none"))
FAMILY_ALPHA = 0.05
MARGIN_PTS = 1.0
MIN_SEEDS = 3


def _mean_std(vals: List[float]) -> Tuple[float, float]:
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, df))


def verdict(n: int, lo: float, hi: float, margin: float = MARGIN_PTS, better: str = "helped",
            worse: str = "hurt") -> str:
    """The verdict of one comparison from its simultaneous interval [lo, hi] (points)."""
    if n < MIN_SEEDS:
        return "not enough seeds"
    if lo > 0:
        return better
    if hi < 0:
        return worse
    if -margin < lo and hi < margin:
        return f"no difference > {margin:g} pt"
    return "not enough seeds"


def seeds_needed(sd: float, m: int, margin: float = MARGIN_PTS, alpha: float = FAMILY_ALPHA,
                 power: float = 0.8, cap: int = 1000) -> Optional[int]:
    """Smallest number of seeds with which a true paired difference of ``margin`` is called
    (the simultaneous interval excludes 0) with probability ``power``, for paired differences of
    standard deviation ``sd`` and ``m`` comparisons (the usual t approximation)."""
    if not sd > 0:
        return 2
    for n in range(2, cap + 1):
        if (t_quantile(1 - alpha / (2 * m), n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n) <= margin:
            return n
    return None


def _accs(results, setting, loss, arm) -> Dict[int, float]:
    return {r.seed: r.test_acc for r in results if (r.setting, r.loss, r.arm) == (setting, loss, arm)}


def summarize(results: List[RunResult], alpha: float = FAMILY_ALPHA, margin: float = MARGIN_PTS,
              resolution: float = 100 / 599) -> Dict[str, object]:
    """Accuracy per (setting, loss, arm) and the paired comparisons of the layer-wise arms;
    ``resolution``: one test image in percentage points (the smallest sd an interval uses)."""
    settings = [s for s in SETTINGS if any(r.setting == s for r in results)]
    arms_table = []
    for st in settings:
        for loss in LOSSES:
            for arm in arms_of(loss):
                accs = _accs(results, st, loss, arm)
                if accs:
                    m, sd = _mean_std([100 * a for a in accs.values()])
                    arms_table.append(dict(setting=st, loss=loss, arm=arm, n=len(accs), mean=m, sd=sd,
                                           accs=[100 * accs[k] for k in sorted(accs)]))
    comps = []
    for st in settings:
        for loss in MATCHING:
            for a, b in COMPARISONS:
                acc_a, acc_b = _accs(results, st, loss, a), _accs(results, st, loss, b)
                seeds = sorted(set(acc_a) & set(acc_b))
                if seeds:
                    diffs = [100 * (acc_a[k] - acc_b[k]) for k in seeds]
                    comps.append(dict(setting=st, loss=loss, a=a, b=b, seeds=seeds, diffs=diffs))
    m = len(comps)
    level = 1 - alpha / max(m, 1)
    for c in comps:
        n = len(c["diffs"])
        mean, sd = _mean_std(c["diffs"])
        half = t_quantile(1 - alpha / (2 * m), n - 1) * max(sd, resolution) / math.sqrt(n) if n > 1 else math.inf
        better, worse = (("helped", "hurt") if c["b"] == "fixed" else
                         (f"'{c['a']}' better", f"'{c['a']}' worse"))
        c.update(n=n, mean=mean, sd=sd, lo=mean - half, hi=mean + half,
                 verdict=verdict(n, mean - half, mean + half, margin, better, worse))
    sds = sorted(c["sd"] for c in comps if c["n"] > 1)
    typical_sd = sds[len(sds) // 2] if sds else None
    return dict(arms=arms_table, comparisons=comps, family_size=m, family_alpha=alpha, interval_level=level,
                margin_pts=margin, min_seeds=MIN_SEEDS, resolution_pts=resolution, typical_sd=typical_sd,
                seeds_for_1pt=(seeds_needed(max(typical_sd, resolution), m, margin, alpha)
                               if typical_sd is not None else None))


def _comparison_name(c) -> str:
    name = lambda arm: "fixed" if arm == "fixed" else f"'{arm}'"  # noqa: E731
    return f"{name(c['a'])} - {name(c['b'])}"


def format_table(summary, teacher_acc: float, setting_lines: Dict[str, str]) -> str:
    lines = [f"teacher test accuracy: {teacher_acc:.2%}", ""]
    for st in setting_lines:
        rows = [r for r in summary["arms"] if r["setting"] == st]
        if not rows:
            continue
        lines.append(f"setting {st!r}: {setting_lines[st]}")
        lines.append(f"  {'loss':<10} {'rates':<28} {'test accuracy, mean ± sd over seeds':>36}")
        for r in rows:
            lines.append(f"  {r['loss']:<10} {ARM_LABEL[r['arm']]:<28} {r['mean']:>27.2f}% ± {r['sd']:.2f}  (n={r['n']})")
        lines.append("")
    comps = summary["comparisons"]
    if not comps:
        return "\n".join(lines).rstrip()
    m = summary["family_size"]
    lines.append(f"paired differences in percentage points (same seeds: same initial weights, data order and HVP vectors), "
                 f"with simultaneous {1 - summary['family_alpha']:.0%} intervals")
    lines.append(f"(t intervals, Bonferroni over the {m} comparisons: each at {summary['interval_level']:.2%}; "
                 f"'not enough seeds': the interval holds 0 and a {summary['margin_pts']:g}-point difference):")
    lines.append(f"  {'setting':<9} {'loss':<10} {'comparison':<22} {'n':>3} {'mean':>7} {'interval':>18}  verdict")
    for c in comps:
        lo = f"{c['lo']:+.2f}" if math.isfinite(c["lo"]) else "-inf"
        hi = f"{c['hi']:+.2f}" if math.isfinite(c["hi"]) else "+inf"
        lines.append(f"  {c['setting']:<9} {c['loss']:<10} {_comparison_name(c):<22} {c['n']:>3} {c['mean']:>+7.2f} "
                     f"{'[' + lo + ', ' + hi + ']':>18}  {c['verdict']}")
    lines.append("")
    lines.append(conclusion(summary))
    return "\n".join(lines)


def conclusion(summary) -> str:
    """The plain statement of what this run shows."""
    comps = summary["comparisons"]
    called = [c for c in comps if c["verdict"] not in ("not enough seeds",) and not c["verdict"].startswith("no diff")]
    same = [c for c in comps if c["verdict"].startswith("no diff")]
    open_ = [c for c in comps if c["verdict"] == "not enough seeds"]
    parts = []
    if called:
        parts.append("; ".join(f"{c['setting']}/{c['loss']}, {_comparison_name(c).replace(' - ', ' vs ')}: "
                               f"{c['verdict']} ({c['mean']:+.2f} pts, interval [{c['lo']:+.2f}, {c['hi']:+.2f}])"
                               for c in called))
    else:
        parts.append(f"no comparison shows a difference at the {summary['family_alpha']:.0%} family-wise level")
    if same:
        parts.append(f"{len(same)} of {len(comps)} comparisons rule out a difference larger than "
                     f"{summary['margin_pts']:g} point")
    if open_:
        need = summary.get("seeds_for_1pt")
        more = (f"; at the typical spread of the paired differences ({summary['typical_sd']:.2f} pts) about {need} seeds "
                f"would detect a {summary['margin_pts']:g}-point difference with 80% power" if need else "")
        n = max(c["n"] for c in comps)
        few = f" (a verdict needs at least {MIN_SEEDS})" if n < MIN_SEEDS else ""
        parts.append(f"{len(open_)} of {len(comps)} cannot be decided with {n} seed{'s' if n != 1 else ''}{few}{more}")
    return "In this run: " + ". ".join(parts) + "."


def format_rates(results: List[RunResult], settings: Dict[str, Dict]) -> str:
    """Per-layer factor trajectories m_j = eta_j / eta0 (mean over seeds) of the layer-wise arms at
    a few epochs (the base rate eta0 follows the cosine schedule)."""
    lines = []
    for st, cfg in settings.items():
        epochs = cfg["epochs"]
        marks = sorted({1, max(1, epochs // 4), max(1, epochs // 2), epochs})
        block = []
        for loss in MATCHING:
            for arm in ("none", "running"):
                rs = [r for r in results if (r.setting, r.loss, r.arm) == (st, loss, arm)]
                if not rs:
                    continue
                K = len(rs[0].factor_traj[0])
                cells = []
                for j in range(K):
                    vals = [sum(r.factor_traj[e - 1][j] for r in rs) / len(rs) for e in marks]
                    cells.append(f"layer {j}: " + " -> ".join(f"{v:.2f}" for v in vals))
                block.append(f"  {loss:<10} {arm:<8} " + " | ".join(cells))
        if block:
            lines.append(f"rate factors m_j = eta_j / eta0 in setting {st!r} (mean over seeds), at epochs "
                         + ", ".join(map(str, marks)) + ":")
            lines.extend(block)
    return "\n".join(lines)


# one visual encoding per meaning, in every panel: colour = loss, line style = rates (arm)
COLORS = {"ce": "#7f7f7f", "kd": "#9467bd", "attention": "#ff7f0e", "jacobian": "#2ca02c", "hessian": "#d62728"}
LINESTYLES = {"fixed": "-", "none": "--", "running": ":"}


def _band(ax, xs, rows, color, ls, gid):
    """Mean over seeds as a line, mean ± sd as a band of the same colour."""
    n = len(rows)
    mean = [sum(r[e] for r in rows) / n for e in range(len(xs))]
    sd = [_mean_std([r[e] for r in rows])[1] for e in range(len(xs))]
    line, = ax.plot(xs, mean, color=color, ls=ls, lw=1.6, gid=gid)
    if n > 1:
        ax.fill_between(xs, [m - v for m, v in zip(mean, sd)], [m + v for m, v in zip(mean, sd)], color=color,
                        alpha=0.12, lw=0, gid=gid)
    return mean, sd


def _error_panel(ax, results, st, n_images, teacher_acc):
    """Test error per epoch of every (loss, arm) in one setting, on a log axis fitted to the
    students: the whole run is visible and the last epochs still resolve fractions of a point."""
    from matplotlib.ticker import MaxNLocator, NullFormatter, PercentFormatter

    values = []
    for loss in LOSSES:
        for arm in arms_of(loss):
            rs = [r for r in results if (r.setting, r.loss, r.arm) == (st, loss, arm)]
            if not rs:
                continue
            xs = list(range(1, len(rs[0].curve) + 1))
            mean, sd = _band(ax, xs, [[100 * (1 - a) for a in r.curve] for r in rs], COLORS[loss],
                             LINESTYLES[arm], f"acc|{st}|{loss}|{arm}")
            values += [v for m, d in zip(mean, sd) for v in (m - d, m + d, m) if v > 0]
    ax.set_yscale("log")
    title = f"{st}: {n_images} training images"
    if values:
        lo, hi = min(values) / 1.15, min(100.0, max(values) * 1.15)
        ax.set_ylim(lo, hi)
        teacher_err = 100 * (1 - teacher_acc)
        if lo <= teacher_err <= hi:
            ax.axhline(teacher_err, color="black", lw=0.8, ls=(0, (1, 3)))
            ax.text(1, teacher_err, " teacher", va="bottom", ha="left", fontsize=7)
        else:
            title += f" (teacher: {teacher_err:.1f}% error)"
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0 if lo >= 1 else 1))
        if hi / lo < 12:  # label the minor ticks too when the axis spans about a decade or less
            ax.yaxis.set_minor_formatter(PercentFormatter(decimals=0 if lo >= 1 else 1))
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.set_xlabel("epoch")
    ax.set_ylabel("student test error (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25, lw=0.5, which="both")
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _interval_panel(ax, summary):
    """The paired differences with their simultaneous intervals (a forest plot); each label sits
    above its interval, intervals beyond the axis end in an arrow."""
    comps = summary["comparisons"]
    finite = [abs(v) for c in comps for v in (c["lo"], c["hi"]) if math.isfinite(v)]
    lim = max(3.0, min(20.0, max(finite, default=3.0) * 1.05))
    ax.axvspan(-summary["margin_pts"], summary["margin_pts"], color="0.9", lw=0)
    ax.axvline(0, color="black", lw=0.8)
    for y, c in enumerate(comps):
        color = COLORS[c["loss"]]
        lo, hi = max(c["lo"], -lim), min(c["hi"], lim)
        ax.plot([lo, hi], [y, y], color=color, lw=2, solid_capstyle="butt", gid=f"diff|{c['setting']}|{c['loss']}")
        ax.plot([c["mean"]], [y], "o", color=color, ms=4)
        for edge, bound, mark in ((c["lo"], -lim, "<"), (c["hi"], lim, ">")):
            if not -lim <= edge <= lim:
                ax.plot([bound], [y], mark, color=color, ms=5)
        ax.text(-lim * 0.98, y - 0.2, f"{c['setting']}, {c['loss']}: {_comparison_name(c)} -- {c['verdict']}",
                fontsize=6.5, va="bottom", ha="left")
    ax.set_yticks([])
    ax.set_ylim(len(comps) - 0.5, -0.9)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("paired difference in test accuracy (points)")
    ax.set_title(f"paired differences, simultaneous {1 - summary['family_alpha']:.0%} intervals\n"
                 f"(Bonferroni over {summary['family_size']}; grey: ±{summary['margin_pts']:g} point)", fontsize=10)
    ax.grid(axis="x", alpha=0.25, lw=0.5)


def _factor_panel(ax, results, st, j):
    from matplotlib.ticker import MaxNLocator

    for loss in MATCHING:
        for arm in ("none", "running"):
            rs = [r for r in results if (r.setting, r.loss, r.arm) == (st, loss, arm)]
            if rs:
                xs = list(range(1, len(rs[0].factor_traj) + 1))
                _band(ax, xs, [[row[j] for row in r.factor_traj] for r in rs], COLORS[loss], LINESTYLES[arm],
                      f"factor|{st}|{loss}|{arm}|{j}")
    ax.axhline(1.0, color="black", lw=0.8, ls=LINESTYLES["fixed"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"rate factor m{j} = eta{j} / eta0")
    ax.set_title(f"layer {j} ({st})", fontsize=10)
    ax.grid(alpha=0.25, lw=0.5)


def plot(results: List[RunResult], summary, path: str, teacher_acc: float, settings: Dict[str, Dict]):
    """The figure: test error per epoch in each setting (mean and ± 1 sd over seeds), the paired
    differences with their simultaneous intervals, and each layer's rate factor in the harder
    setting.  Colour means the loss and line style the rates (arm) in every panel; the legend sits
    below all panels.  Returns the matplotlib figure (closed after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = [st for st in settings if any(r.setting == st for r in results)]
    K = max((len(r.factor_traj[0]) for r in results if r.factor_traj), default=0)
    fig = plt.figure(figsize=(15, 8.4))
    left, right = fig.subfigures(1, 2, width_ratios=[2.3, 1], wspace=0.02)
    top, bottom = left.subfigures(2, 1, hspace=0.04)
    for ax, st in zip(np.atleast_1d(top.subplots(1, max(len(names), 1))), names):
        _error_panel(ax, results, st, settings[st]["train_images"], teacher_acc)
    fst = "scarce" if "scarce" in names else (names[0] if names else None)
    if K:
        for j, ax in enumerate(np.atleast_1d(bottom.subplots(1, K))):
            _factor_panel(ax, results, fst, j)
    _interval_panel(right.subplots(1, 1), summary)
    top.subplots_adjust(left=0.11, right=0.98, bottom=0.17, top=0.84, wspace=0.32)
    bottom.subplots_adjust(left=0.11, right=0.98, bottom=0.2, top=0.9, wspace=0.32)
    right.subplots_adjust(left=0.04, right=0.98, bottom=0.1, top=0.9)
    handles = [Line2D([], [], color=COLORS[loss], lw=2.5, label=loss) for loss in LOSSES]
    handles += [Line2D([], [], color="black", ls=LINESTYLES[arm], lw=1.6, label=ARM_LABEL[arm]) for arm in ARMS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Layer-wise rates on sklearn digits: students distilled from a wide CNN (bands: ± 1 sd over seeds)",
                 fontsize=11, y=0.995)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return fig


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------

# match weights: the largest that still train well on this data (a sweep: attention 50,
# jacobian 0.5 and hessian 5 already drive students below 90% with either rate rule)
STUDENT_CFG = dict(student_width=8, lr=0.05, gamma=1.0,
                   match_weight={"attention": 1.0, "jacobian": 0.02, "hessian": 0.5})
DEFAULT_SETTINGS = ("scarce",)   # what fits in ~2 minutes on 2 cores (CI runs it)
DEFAULT_SEEDS = 3
# --full: enough seeds that a 1-point paired difference is called with ~80% power at the spread
# of the paired differences measured in 'scarce' (1.84 points over its first 20 seeds; README), so
# seeds_needed(1.84, 18) = 54 over both settings' 18 comparisons
FULL = dict(settings=tuple(SETTINGS), seeds=54)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    p.add_argument("--full", action="store_true",
                   help=f"the evidence run: settings {','.join(FULL['settings'])}, {FULL['seeds']} seeds")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help=f"seeds per configuration, >= 1 (default {DEFAULT_SEEDS}; --full {FULL['seeds']}); "
                        "a verdict needs at least 2")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="student epochs, >= 1, for every setting (default: the setting's own, "
                        + ", ".join(f"{k} {v['epochs']}" for k, v in SETTINGS.items()) + ")")
    p.add_argument("--settings", default=None,
                   help=f"comma-separated subset of {','.join(SETTINGS)} (default {','.join(DEFAULT_SETTINGS)}; "
                        f"--full {','.join(FULL['settings'])})")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--out", default="lwkd_results", help="directory for demo.json and demo.png (default ./lwkd_results)")
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one thread each (default: min(2, cores))")
    p.add_argument("--resume", action="store_true",
                   help=f"take the runs of this configuration already recorded in OUT/{RUN_RECORD} (each run is "
                        "recorded as it finishes) instead of training them again: an interrupted run continues")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _subset(arg: str, allowed, what: str) -> List[str]:
    items = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad[0]!r}" if bad else f"no {what} given")
    return items


def run_demo(args: argparse.Namespace) -> int:
    from .cli import UsageError

    try:
        losses = _subset(args.losses, LOSSES, "loss")
    except ValueError as exc:
        raise UsageError(f"--losses {args.losses!r}: {exc}; expected a comma-separated subset of "
                         f"{','.join(LOSSES)}") from None
    try:
        chosen = _subset(args.settings, SETTINGS, "setting") if args.settings else list(
            FULL["settings"] if args.full else DEFAULT_SETTINGS)
    except ValueError as exc:
        raise UsageError(f"--settings {args.settings!r}: {exc}; expected a comma-separated subset of "
                         f"{','.join(SETTINGS)}") from None
    seeds = args.seeds if args.seeds is not None else (FULL["seeds"] if args.full else DEFAULT_SEEDS)
    settings = {st: dict(SETTINGS[st], **({"epochs": args.epochs} if args.epochs is not None else {}))
                for st in chosen}
    cfg = dict(STUDENT_CFG, settings=settings)
    os.makedirs(args.out, exist_ok=True)

    def bar(total, desc):
        if args.no_progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: see "Running many students" above
    data = load_digits_split(TEACHER_CFG["split_seed"])
    teacher, teacher_acc, how = get_teacher(data, TEACHER_CFG, bar)
    for st, sc in settings.items():  # the exact number of images each setting's students see
        sc["train_images"] = len(student_subset(data, sc["train_images"])[0])
    print(f"lwkd-fast demo: sklearn digits, {len(data[0])} train / {len(data[2])} test images; {how}")
    # seed by seed (an interrupted run leaves whole seeds recorded), the slowest runs of a seed first
    cost = {"hessian": 8, "jacobian": 4}
    runs = sorted(((st, loss, arm, seed) for st in settings for loss in losses for arm in arms_of(loss)
                   for seed in range(seeds)),
                  key=lambda r: (r[3], -cost.get(r[1], 1) * settings[r[0]]["epochs"] * settings[r[0]]["train_images"]))
    record_path = os.path.join(args.out, RUN_RECORD)
    done = load_run_record(record_path, cfg) if args.resume else {}
    todo = [r for r in runs if r not in done]
    if args.resume:
        print(f"resumed {len(runs) - len(todo)} of {len(runs)} runs from {record_path}")
    fingerprint = {st: run_fingerprint(cfg, st) for st in settings}
    overall = bar(sum(settings[r[0]]["epochs"] for r in todo), f"{len(todo)} students, {args.jobs} jobs")
    with open(record_path, "a" if args.resume else "w") as rec:
        def record(r: RunResult) -> None:
            rec.write(json.dumps({"fingerprint": fingerprint[r.setting], "run": asdict(r)}) + "\n")
            rec.flush()

        for r in train_students(todo, data, teacher, cfg, args.jobs, overall, on_done=record):
            done[(r.setting, r.loss, r.arm, r.seed)] = r
    if overall is not None:
        overall.close()
    results = [done[r] for r in runs]
    summary = summarize(results, resolution=100 / len(data[2]))
    lines = {st: f"{sc['train_images']} training images, {sc['about']}; batch {sc['batch']}, {sc['epochs']} epochs, "
                 f"{seeds} seed{'s' if seeds != 1 else ''}" for st, sc in settings.items()}
    print()
    print(format_table(summary, teacher_acc, lines))
    print()
    print(format_rates(results, settings))
    nonfinite = sum(r.nonfinite_losses for r in results)
    if nonfinite:
        print(f"\n{nonfinite} non-finite losses were skipped (parameters left untouched at those steps)")
    json_path = os.path.join(args.out, "demo.json")
    png_path = os.path.join(args.out, "demo.png")
    with open(json_path, "w") as fh:
        json.dump({"teacher_acc": teacher_acc, "teacher_cfg": TEACHER_CFG, "student_cfg": cfg, "seeds": seeds,
                   "summary": summary, "runs": [asdict(r) for r in results], "resumed_runs": len(runs) - len(todo),
                   "seconds": time.perf_counter() - t0, "lwkd_fast": __version__, "torch": torch.__version__},
                  fh, indent=1)
    plot(results, summary, png_path, teacher_acc, settings)
    print(f"\nwrote {png_path} and {json_path} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _register() -> None:
    from .cli import register_command

    register_command("demo", "layer-wise distillation on sklearn's digits: accuracy table, rate trajectories, plot",
                     _add_arguments, run_demo)


_register()
