"""sync="all_reduce" across two gloo processes on loopback: DDP, FSDP2 (DTensor parameters),
torch.distributed.checkpoint, and ranks that differ in passing a skip flag.

One ``mp.spawn`` of two ranks runs every scenario (process start-up dominates the cost) and
writes its results; the tests below compare them with single-process runs of the same model on
the concatenated batch (the collectives average the gradients, the optimizer averages the
discrepancies; the model has no batch-coupled layers, so both runs compute the same thing).
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import lwkd_fast as lw
from optim_helpers import optim_backends

STEPS = 10
RESUME_AT = 5
BATCH_PER_RANK = 4
WORLD = 2
BACKENDS = optim_backends("layerwise_sgd_step")
# FSDP2 on every backend here; under the Triton interpreter (about a second per step) only AdamW,
# the algorithm with the most state, and compared with the native one-process run (every backend
# equals torch.optim to float32 tolerance), which saves a second interpreted run
FSDP_CASES = [(b, k) for b in BACKENDS for k in ("sgd", "adamw") if b != "triton" or k == "adamw"]
RESUME_BACKEND = "native" if "native" in BACKENDS else "reference"
OPT_KW = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
          "adamw": dict(lr=1e-2, weight_decay=1e-2)}

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="gloo backend unavailable")


class Net(nn.Module):
    """Three conv stages (the matched layers) and a linear head; no BatchNorm.  ``scale`` has
    one row, so under a two-rank FSDP2 sharding rank 1 holds an empty shard of it."""

    def __init__(self, widths, classes=5):
        super().__init__()
        c = 3
        self.convs = nn.ModuleList()
        for w in widths:
            self.convs.append(nn.Conv2d(c, w, 3, padding=1))
            c = w
        self.fc = nn.Linear(c, classes)
        self.scale = nn.Parameter(torch.ones(1, classes))

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return self.fc(x.mean(dim=(2, 3))) * self.scale, feats


def make_models():
    torch.manual_seed(1234)
    student = Net((6, 8, 10))
    teacher = Net((12, 16, 20)).requires_grad_(False)
    return student, teacher


def make_data():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(STEPS, WORLD * BATCH_PER_RANK, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (STEPS, WORLD * BATCH_PER_RANK), generator=g)
    return x, y


def groups_of(student):
    return [{"params": list(conv.parameters()), "layer": j} for j, conv in enumerate(student.convs)] + [
        {"params": list(student.fc.parameters()) + [student.scale], "layer": None}
    ]


def make_opt(kind, student, **kw):
    cls = lw.optim.LayerwiseSGD if kind == "sgd" else lw.optim.LayerwiseAdamW
    return cls(groups_of(student), **OPT_KW[kind], **kw)


def train(student, teacher, opt, xs, ys, forward, steps=range(STEPS), backend="native"):
    for s in steps:
        logits, fs = forward(xs[s])
        with torch.no_grad():
            _, ft = teacher(xs[s])
        d = lw.attention_discrepancy(fs, ft)  # (K,) mean over this process's samples
        loss = F.cross_entropy(logits, ys[s]) + d.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with lw.use_backend(backend):
            opt.step(d.detach())


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(student, opt):
    return {"params": [full(p.detach()).clone() for p in student.parameters()], "rates": opt.rates.clone(),
            "factors": opt.factors.clone(), "nonfinite": opt.nonfinite_steps.clone(),
            "skipped": opt.skipped_steps.clone()}


# ------------------------------------------------------------------------------------------------
# What each rank runs
# ------------------------------------------------------------------------------------------------


def _ddp(rank, x, y, sl):
    student, teacher = make_models()
    ddp = nn.parallel.DistributedDataParallel(student)
    opt = make_opt("sgd", student, sync="all_reduce")
    train(student, teacher, opt, x[:, sl], y[:, sl], ddp)
    return snapshot(student, opt)


def _fsdp_student():
    from torch.distributed.fsdp import fully_shard

    student, teacher = make_models()
    for conv in student.convs:
        fully_shard(conv)
    fully_shard(student)
    return student, teacher


def _fsdp(backend, kind, x, y, sl):
    student, teacher = _fsdp_student()
    opt = make_opt(kind, student, sync="all_reduce")
    train(student, teacher, opt, x[:, sl], y[:, sl], student, backend=backend)
    return snapshot(student, opt)


def _fsdp_resume(backend, kind, x, y, sl):
    """Train 5 steps, save with torch.distributed.checkpoint's state_dict helpers, train 5 more;
    then restore the saved state into a fresh FSDP2 model and optimizer and train the last 5."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    student, teacher = _fsdp_student()
    opt = make_opt(kind, student, sync="all_reduce")
    train(student, teacher, opt, x[:, sl], y[:, sl], student, range(RESUME_AT), backend)
    msd = copy.deepcopy(get_model_state_dict(student))
    osd = copy.deepcopy(get_optimizer_state_dict(student, opt))
    train(student, teacher, opt, x[:, sl], y[:, sl], student, range(RESUME_AT, STEPS), backend)
    straight = snapshot(student, opt)

    student2, _ = _fsdp_student()
    opt2 = make_opt(kind, student2, sync="all_reduce")  # a fresh optimizer: DCP initialises its state first
    set_model_state_dict(student2, msd)
    set_optimizer_state_dict(student2, opt2, osd)
    train(student2, teacher, opt2, x[:, sl], y[:, sl], student2, range(RESUME_AT, STEPS), backend)
    resumed = snapshot(student2, opt2)
    state_keys = sorted(get_optimizer_state_dict(student2, opt2)["state"])
    return {"straight": straight, "resumed": resumed, "state_keys": state_keys}


def _sharded_without_sync():
    student, _ = _fsdp_student()
    try:
        make_opt("sgd", student)
    except ValueError as e:
        return str(e)
    return None


def _flag_on_one_rank(rank, x, y):
    """Rank 0 never passes found_inf; rank 1 passes a flag on every step, nonzero at step 2.
    Both ranks see the same data (replicated model, no DDP), so both must end where a run
    that omits step 2 ends."""
    student, teacher = make_models()
    opt = make_opt("sgd", student, sync="all_reduce")
    for s in range(4):
        logits, fs = student(x[s])
        with torch.no_grad():
            _, ft = teacher(x[s])
        d = lw.attention_discrepancy(fs, ft)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(logits, y[s]) + d.sum()).backward()
        if rank == 0:
            opt.step(d.detach())
        else:
            opt.step(d.detach(), found_inf=torch.full((), 1.0 if s == 2 else 0.0))
    return snapshot(student, opt)


def _worker(rank, world, port, out_dir, fsdp_cases):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if any(b == "cuda_emu" for b, _ in fsdp_cases):  # (the parent's conftest built it; this loads it)
        from lwkd_fast import cuda_emu

        cuda_emu.load()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = make_data()
        sl = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        out = {"ddp": _ddp(rank, x, y, sl), "fsdp": {}, "flag": _flag_on_one_rank(rank, x, y),
               "no_sync_error": _sharded_without_sync()}
        out["resume"] = {kind: _fsdp_resume(RESUME_BACKEND, kind, x, y, sl) for kind in ("sgd", "adamw")}
        for backend, kind in fsdp_cases:
            key = f"{backend}-{kind}"
            # (the uninterrupted half of the checkpoint scenario is that backend's 10-step run)
            out["fsdp"][key] = (out["resume"][kind]["straight"] if backend == RESUME_BACKEND
                                else _fsdp(backend, kind, x, y, sl))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend unavailable")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(WORLD, _free_port(), out, FSDP_CASES), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def single_process(kind, backend="native", steps=range(STEPS)):
    """The same model and optimizer in one process on the concatenated batch."""
    student, teacher = make_models()
    opt = make_opt(kind, student)
    x, y = make_data()
    train(student, teacher, opt, x, y, student, steps, backend)
    return snapshot(student, opt)


def assert_same_run(a, b, exact=False, what=""):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for key in ("rates", "factors"):
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m: f"{what} {key}: {m}")
    for i, (p, q) in enumerate(zip(a["params"], b["params"])):
        torch.testing.assert_close(p, q, **tol, msg=lambda m, i=i: f"{what} param {i}: {m}")
    assert int(a["nonfinite"]) == int(b["nonfinite"]) and int(a["skipped"]) == int(b["skipped"])


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------


@needs_gloo
def test_ddp_two_ranks_match_each_other_and_one_process(ranks):
    r0, r1 = ranks[0]["ddp"], ranks[1]["ddp"]
    assert_same_run(r0, r1, exact=True, what="rank 0 vs rank 1")
    assert not torch.allclose(r0["factors"], torch.ones(3))  # the rule moved the rates: not vacuous
    assert_same_run(r0, single_process("sgd", RESUME_BACKEND), what="DDP vs one process")


@needs_gloo
@pytest.mark.parametrize("backend,kind", FSDP_CASES, ids=[f"{b}-{k}" for b, k in FSDP_CASES])
def test_fsdp2_two_ranks_equal_one_process(ranks, backend, kind):
    """fully_shard per conv and on the root: every parameter is a DTensor sharded over two ranks
    (one with an empty shard on rank 1); 10 fused steps on the local shards equal one process on
    the concatenated batch, and both ranks hold the same rates."""
    r0, r1 = ranks[0]["fsdp"][f"{backend}-{kind}"], ranks[1]["fsdp"][f"{backend}-{kind}"]
    assert_same_run(r0, r1, exact=True, what="rank 0 vs rank 1")
    assert not torch.allclose(r0["factors"], torch.ones(3))
    one = single_process(kind, RESUME_BACKEND if backend == "triton" else backend)
    assert_same_run(r0, one, what=f"FSDP2 {backend} {kind} vs one process")


@needs_gloo
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fsdp2_distributed_checkpoint_resumes_bit_identically(ranks, kind):
    for rank in ranks:
        r = rank["resume"][kind]
        assert_same_run(r["straight"], r["resumed"], exact=True, what=f"{kind} resumed")
        assert len(r["state_keys"]) == 9  # every parameter's state went through the checkpoint


@needs_gloo
def test_sharded_parameters_need_sync(ranks):
    msg = ranks[0]["no_sync_error"]
    assert msg is not None and "sharded over 2 ranks" in msg and "sync='all_reduce'" in msg


@needs_gloo
def test_a_flag_on_one_rank_skips_the_step_on_both(ranks):
    """Rank 0 calls step(D), rank 1 step(D, found_inf=flag): one collective of the same size on
    both, so both skip step 2 and end where a run without step 2 ends."""
    r0, r1 = ranks[0]["flag"], ranks[1]["flag"]
    assert int(r0["skipped"]) == 1 and int(r1["skipped"]) == 1
    assert_same_run(r0, r1, exact=True, what="rank 0 vs rank 1")
    ref = single_skipping_step_2()
    assert_same_run(r0, ref, what="both ranks vs a run without step 2")


def single_skipping_step_2():
    student, teacher = make_models()
    opt = make_opt("sgd", student)
    x, y = make_data()
    for s in range(4):
        logits, fs = student(x[s])
        with torch.no_grad():
            _, ft = teacher(x[s])
        d = lw.attention_discrepancy(fs, ft)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(logits, y[s]) + d.sum()).backward()
        if s != 2:
            opt.step(d.detach())
    out = snapshot(student, opt)
    out["skipped"] = torch.ones((), dtype=torch.int64)  # (the skipped step is not run here at all)
    return out


def test_all_reduce_single_process_group_is_identity():
    """With a world of one, sync='all_reduce' equals sync=None (and makes no collective call)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend unavailable")
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        out = []
        for sync in (None, "all_reduce"):
            p = torch.ones(4, requires_grad=True)
            opt = lw.optim.LayerwiseSGD([{"params": [p], "layer": 0}, {"params": [], "layer": 1}], lr=0.1, sync=sync)
            p.grad = torch.full((4,), 0.5)
            opt.step(torch.tensor([0.2, 0.9]))
            out.append((p.detach().clone(), opt.rates.clone()))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    finally:
        dist.destroy_process_group()
