"""sync="all_reduce": two gloo processes with DistributedDataParallel, different data per rank.

After N steps both ranks hold identical rates and parameters, and they agree with one process
that trains on the concatenated batch (DDP averages the gradients, the optimizer averages the
discrepancies; the model has no batch-coupled layers, so the two runs compute the same thing).
"""

from __future__ import annotations

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

STEPS = 5
BATCH_PER_RANK = 4
WORLD = 2


class Net(nn.Module):
    """Three conv stages (the matched layers) and a linear head; no BatchNorm."""

    def __init__(self, widths, classes=5):
        super().__init__()
        c = 3
        self.convs = nn.ModuleList()
        for w in widths:
            self.convs.append(nn.Conv2d(c, w, 3, padding=1))
            c = w
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return self.fc(x.mean(dim=(2, 3))), feats


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
        {"params": list(student.fc.parameters()), "layer": None}
    ]


def train(student, teacher, opt, xs, ys, forward):
    for s in range(xs.shape[0]):
        logits, fs = forward(xs[s])
        with torch.no_grad():
            _, ft = teacher(xs[s])
        d = lw.attention_discrepancy(fs, ft)  # (K,) mean over this process's samples
        loss = F.cross_entropy(logits, ys[s]) + d.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(d.detach())


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        student, teacher = make_models()
        ddp = nn.parallel.DistributedDataParallel(student)
        opt = lw.optim.LayerwiseSGD(groups_of(student), lr=0.05, momentum=0.9, weight_decay=1e-3,
                                    sync="all_reduce")
        x, y = make_data()
        sl = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        train(student, teacher, opt, x[:, sl], y[:, sl], ddp)
        torch.save({"params": [p.detach() for p in student.parameters()], "rates": opt.rates,
                    "factors": opt.factors, "nonfinite": opt.nonfinite_steps},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo backend unavailable")
def test_all_reduce_two_ranks_match_each_other_and_one_process():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
        r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)

    # identical on both ranks (same averaged discrepancies, same all-reduced gradients)
    assert torch.equal(r0["rates"], r1["rates"]) and torch.equal(r0["factors"], r1["factors"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    # the rule did move the rates (so the agreement below is not vacuous)
    assert not torch.allclose(r0["factors"], torch.ones(3))

    # one process on the concatenated batch
    student, teacher = make_models()
    opt = lw.optim.LayerwiseSGD(groups_of(student), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = make_data()
    train(student, teacher, opt, x, y, student)
    torch.testing.assert_close(r0["rates"], opt.rates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["factors"], opt.factors, rtol=1e-5, atol=1e-6)
    for a, b in zip(r0["params"], student.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert int(r0["nonfinite"]) == 0


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
