"""``lwkd-fast demo``: layer-wise distillation on real data, end to end, on the CPU.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download).
A wide teacher CNN is trained once on the whole training split and cached in the user cache
directory under a key that covers everything that determines it.  Thin students then learn from
a fifth of the training images -- the limited-data transfer setting the method targets (with all
of them every student reaches ~99% and there is nothing left to distil) -- with

    ce          plain cross-entropy
    kd          Hinton knowledge distillation (T = 4)
    attention   cross-entropy + attention-map matching of the paired stages
    jacobian    cross-entropy + input-Jacobian matching of the paired stages
    hessian     cross-entropy + Hessian-vector-product matching of the paired stages

each once with a fixed learning rate and once with layer-wise rates (SPEC section 4; for ce and
kd the rates come from the attention discrepancy, which then only steers the rates), over several
seeds.  Output: an accuracy table (mean and spread over seeds) that says whether layer-wise rates
helped in this run, each layer's rate trajectory, a PNG plot and a JSON file of every number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

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
    """The students' training images: a fixed stratified subset of ``n`` training images (the
    same for every student and seed); the test split is unchanged."""
    xtr, ytr, xte, yte = data
    if n >= len(xtr):
        return data
    g = torch.Generator().manual_seed(seed)
    per_class = [(ytr == c).nonzero().flatten() for c in range(10)]
    keep = torch.cat([idx[torch.randperm(len(idx), generator=g)[: max(1, round(n * len(idx) / len(xtr)))]]
                      for idx in per_class])
    return xtr[keep], ytr[keep], xte, yte

LOSSES = ("ce", "kd", "attention", "jacobian", "hessian")


@dataclass
class RunResult:
    loss: str
    rates: str                      # "fixed" | "layerwise"
    seed: int
    test_acc: float
    curve: List[float] = field(default_factory=list)             # test accuracy per epoch
    rate_traj: List[List[float]] = field(default_factory=list)   # per epoch: eta_j of every layer
    factor_traj: List[List[float]] = field(default_factory=list)  # per epoch: m_j = eta_j / eta0
    seconds: float = 0.0
    nonfinite_losses: int = 0


def train_student(loss: str, rates: str, seed: int, data, teacher: nn.Module, cfg: Dict,
                  progress=None) -> RunResult:
    """One student run; ``progress.update(1)`` after every epoch."""
    from .distill import LayerwiseDistiller

    xtr, ytr, xte, yte = student_subset(data, cfg["train_images"])
    torch.manual_seed(1000 + seed)
    student = DigitsCNN(cfg["student_width"])
    method = {"ce": "attention", "kd": "attention"}.get(loss, loss)
    use = "rates" if loss in ("ce", "kd") else "rates+loss"
    gen = torch.Generator().manual_seed(2000 + seed)
    d = LayerwiseDistiller(
        student, teacher, pairs="auto", method=method, use=use,
        weights=[cfg["match_weight"][method]] * 3,
        kd_weight=0.7 if loss == "kd" else 0.0, temperature=4.0,
        generator=gen, example_input=xtr[:8],
    )
    opt = d.make_optimizer("sgd", lr=cfg["lr"], momentum=0.9, weight_decay=5e-4,
                           gamma=cfg["gamma"] if rates == "layerwise" else 0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"])
    g = torch.Generator().manual_seed(3000 + seed)
    res = RunResult(loss, rates, seed, 0.0)
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        d.train()
        for idx in _batches(len(xtr), cfg["batch"], g):
            out = d(xtr[idx], ytr[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step(out.discrepancies)
        sched.step()
        res.curve.append(accuracy(student, xte, yte))
        res.rate_traj.append([float(v) for v in opt.rates])
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
    loss, rates, seed, cfg = job
    return train_student(loss, rates, seed, _WORKER["data"], _WORKER["teacher"], cfg, _QueueTicks(_WORKER["queue"]))


def train_students(runs, data, teacher: nn.Module, cfg: Dict, jobs: int, bar=None) -> List[RunResult]:
    """Train every (loss, rates, seed) run; results in the order of ``runs``."""
    if jobs <= 1:
        torch.set_num_threads(1)
        out = []
        for loss, rates, seed in runs:
            if bar is not None:
                bar.set_description(f"{loss}/{rates}/seed {seed}")
            out.append(train_student(loss, rates, seed, data, teacher, cfg, bar))
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(teacher.state_dict(), data, q)) as pool:
        futures = [pool.submit(_run_in_worker, (loss, rates, seed, cfg)) for loss, rates, seed in runs]
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
                f.result()  # a failed run fails the demo, with its traceback
        return [f.result() for f in futures]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _mean_std(vals: List[float]) -> Tuple[float, float]:
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def summarize(results: List[RunResult]) -> Dict[str, Dict[str, object]]:
    out: Dict[str, Dict[str, object]] = {}
    for loss in LOSSES:
        row: Dict[str, object] = {}
        for rates in ("fixed", "layerwise"):
            accs = [r.test_acc for r in results if r.loss == loss and r.rates == rates]
            if accs:
                m, s = _mean_std(accs)
                row[rates] = {"mean": m, "std": s, "n": len(accs), "accs": accs}
        if "fixed" in row and "layerwise" in row:
            f, l = row["fixed"], row["layerwise"]
            diff = l["mean"] - f["mean"]
            # a difference counts only beyond two standard errors of the difference of the means
            se = math.sqrt((f["std"] ** 2) / f["n"] + (l["std"] ** 2) / l["n"])
            row["diff"] = diff
            row["se"] = se
            row["verdict"] = ("helped" if diff > 2 * se and diff > 0 else
                              "hurt" if diff < -2 * se and diff < 0 else "no clear difference")
        if row:
            out[loss] = row
    return out


def format_table(summary, teacher_acc: float, seeds: int) -> str:
    lines = [f"teacher test accuracy: {teacher_acc:.2%}",
             f"student test accuracy after training, mean ± std over {seeds} seeds "
             "(verdict: a difference beyond 2 standard errors):",
             f"{'loss':<10} {'fixed rate':>16} {'layer-wise rates':>18} {'difference':>11}  verdict"]
    lines.append("-" * 72)
    for loss, row in summary.items():
        f = row.get("fixed")
        lw_ = row.get("layerwise")
        fs = f"{f['mean']:.2%} ± {f['std']:.2%}" if f else "-"
        ls = f"{lw_['mean']:.2%} ± {lw_['std']:.2%}" if lw_ else "-"
        diff = f"{row['diff'] * 100:+.2f} pts" if "diff" in row else ""
        lines.append(f"{loss:<10} {fs:>16} {ls:>18} {diff:>11}  {row.get('verdict', '')}")
    helped = [k for k, r in summary.items() if r.get("verdict") == "helped"]
    hurt = [k for k, r in summary.items() if r.get("verdict") == "hurt"]
    if helped:
        lines.append(f"In this run layer-wise rates helped for: {', '.join(helped)}"
                     + (f"; they hurt for: {', '.join(hurt)}." if hurt else "; for the others the difference "
                        "was within the seed-to-seed spread."))
    elif hurt:
        lines.append(f"In this run layer-wise rates did not help; they hurt for: {', '.join(hurt)}.")
    else:
        lines.append("In this run layer-wise rates did not help: every difference is within the seed-to-seed spread.")
    if helped or hurt:
        lines[-1] += " (With this few seeds, treat single verdicts with care.)"
    return "\n".join(lines)


def format_rates(results: List[RunResult], epochs: int) -> str:
    """Per-layer rate trajectories (mean over seeds) of the layer-wise runs at a few epochs: the
    factors m_j = eta_j / eta0 (the base rate eta0 follows the cosine schedule)."""
    marks = sorted({1, max(1, epochs // 4), max(1, epochs // 2), epochs})
    lines = ["per-layer rate factors m_j = eta_j / eta0 of the layer-wise runs (mean over seeds; eta0 follows "
             "a cosine schedule from 0.05), at epochs " + ", ".join(map(str, marks)) + ":"]
    for loss in LOSSES:
        rs = [r for r in results if r.loss == loss and r.rates == "layerwise"]
        if not rs:
            continue
        K = len(rs[0].rate_traj[0])
        cells = []
        for j in range(K):
            vals = [sum(r.factor_traj[e - 1][j] for r in rs) / len(rs) for e in marks]
            cells.append(f"layer {j}: " + " -> ".join(f"{v:.2f}" for v in vals))
        lines.append(f"  {loss:<10} " + " | ".join(cells))
    return "\n".join(lines)


def plot(results: List[RunResult], path: str, teacher_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    colors = dict(zip(LOSSES, ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for loss in LOSSES:
        for rates, ls in (("fixed", "--"), ("layerwise", "-")):
            rs = [r for r in results if r.loss == loss and r.rates == rates]
            if not rs:
                continue
            E = len(rs[0].curve)
            mean = [sum(r.curve[e] for r in rs) / len(rs) for e in range(E)]
            ax.plot(range(1, E + 1), mean, ls=ls, color=colors[loss], label=f"{loss} ({rates})")
    ax.axhline(teacher_acc, color="black", lw=0.8, ls=":", label="teacher")
    ax.set_ylim(0.85, 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("students on sklearn digits")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for loss in LOSSES:
        rs = [r for r in results if r.loss == loss and r.rates == "layerwise"]
        if not rs:
            continue
        E, K = len(rs[0].factor_traj), len(rs[0].factor_traj[0])
        for j in range(K):
            mean = [sum(r.factor_traj[e][j] for r in rs) / len(rs) for e in range(E)]
            ax.plot(range(1, E + 1), mean, color=colors[loss], lw=1.2, ls=["-", "--", ":", "-."][j % 4],
                    label=f"{loss} layer {j}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("m_j = eta_j / eta0 (end of epoch)")
    ax.set_title("per-layer rate factors (layer-wise runs)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------

# match weights: the largest that still train well on this data (a sweep: attention 50,
# jacobian 0.5 and hessian 5 already drive students below 90% with either rate rule)
STUDENT_CFG = dict(student_width=8, train_images=240, epochs=40, lr=0.05, batch=64, gamma=1.0,
                   match_weight={"attention": 1.0, "jacobian": 0.02, "hessian": 0.5})
FULL = dict(epochs=80, seeds=5)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    p.add_argument("--full", action="store_true", help=f"longer run: {FULL['epochs']} epochs, {FULL['seeds']} seeds")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per configuration (default 3; --full 5)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"student epochs (default {STUDENT_CFG['epochs']}; --full {FULL['epochs']})")
    p.add_argument("--train-images", type=positive_int, default=STUDENT_CFG["train_images"],
                   help="training images the students see (default %(default)s of the 1198; the teacher sees all)")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--out", default="lwkd_results", help="directory for demo.json and demo.png (default ./lwkd_results)")
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one thread each (default: min(2, cores))")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    bad = [s for s in losses if s not in LOSSES]
    if bad:
        from .cli import UsageError

        raise UsageError(f"--losses {args.losses!r}: unknown loss {bad[0]!r}; expected a comma-separated "
                         f"subset of {','.join(LOSSES)}")
    seeds = args.seeds if args.seeds is not None else (FULL["seeds"] if args.full else 3)
    epochs = args.epochs if args.epochs is not None else (FULL["epochs"] if args.full else STUDENT_CFG["epochs"])
    cfg = dict(STUDENT_CFG, epochs=epochs,
               train_images=args.train_images)
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
    n_student = len(student_subset(data, cfg["train_images"])[0])
    print(f"lwkd-fast demo: sklearn digits, {len(data[0])} train / {len(data[2])} test images; {how}; "
          f"students learn from {n_student} of the training images")
    # the slowest runs first, so the workers finish together
    cost = {"hessian": 8, "jacobian": 4}
    runs = sorted(((loss, rates, seed) for loss in losses for rates in ("fixed", "layerwise") for seed in range(seeds)),
                  key=lambda r: -cost.get(r[0], 1))
    overall = bar(len(runs) * cfg["epochs"], f"{len(runs)} students, {args.jobs} jobs")
    results = train_students(runs, data, teacher, cfg, args.jobs, overall)
    if overall is not None:
        overall.close()
    summary = summarize(results)
    print()
    print(format_table(summary, teacher_acc, seeds))
    print()
    print(format_rates(results, cfg["epochs"]))
    nonfinite = sum(r.nonfinite_losses for r in results)
    if nonfinite:
        print(f"\n{nonfinite} non-finite losses were skipped (parameters left untouched at those steps)")
    json_path = os.path.join(args.out, "demo.json")
    png_path = os.path.join(args.out, "demo.png")
    with open(json_path, "w") as fh:
        json.dump({"teacher_acc": teacher_acc, "teacher_cfg": TEACHER_CFG, "student_cfg": cfg, "seeds": seeds,
                   "summary": summary, "runs": [asdict(r) for r in results],
                   "seconds": time.perf_counter() - t0, "lwkd_fast": __version__, "torch": torch.__version__},
                  fh, indent=1)
    plot(results, png_path, teacher_acc)
    print(f"\nwrote {png_path} and {json_path} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _register() -> None:
    from .cli import register_command

    register_command("demo", "layer-wise distillation on sklearn's digits: accuracy table, rate trajectories, plot",
                     _add_arguments, run_demo)


_register()
