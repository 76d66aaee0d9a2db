"""End-to-end distillation step: student and teacher forward, attention maps and discrepancies,
backward, optimizer -- with layer-wise rates vs the same step with a fixed rate, and vs the eager
per-layer KD code plus ``torch.optim.SGD`` that users write today.

Models: CIFAR ResNet-8 student (width 16) and teacher (width 32) from
:mod:`lwkd_fast.bench.derivatives`; K = 3 paired stages (``pairs="auto"``), batch of 3x32x32.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..benchmarking import measure_round_robin
from ..distill import LayerwiseDistiller
from ..reference import eager_at_loss
from .core import Ctx, Row, suite
from .derivatives import SmallResNet


def make_models(device, seed: int = 0):
    torch.manual_seed(seed)
    student = SmallResNet(width=16).to(device).train()
    teacher = SmallResNet(width=32).to(device).eval()
    return student, teacher


def distiller_step(batch: int, device, gamma: float, seed: int = 0):
    """One LayerwiseDistiller + LayerwiseSGD step (gamma=0 keeps every rate at lr: a fixed rate
    through the same code path)."""
    student, teacher = make_models(device, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    d = LayerwiseDistiller(student, teacher, use="rates+loss", example_input=x[:2])
    opt = d.make_optimizer("sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, gamma=gamma)

    def step():
        out = d(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step(out.discrepancies)
    return step


def eager_step(batch: int, device, seed: int = 0):
    """What KD repositories write: hooks, a per-layer eager attention-transfer loss, torch SGD."""
    student, teacher = make_models(device, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    names = ["layer1", "layer2", "layer3"]
    fs, ft = {}, {}
    for n in names:
        getattr(student, n).register_forward_hook(lambda m, i, o, n=n: fs.__setitem__(n, o))
        getattr(teacher, n).register_forward_hook(lambda m, i, o, n=n: ft.__setitem__(n, o))
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)

    def step():
        logits = student(x)
        with torch.no_grad():
            teacher(x)
        loss = F.cross_entropy(logits, y) + eager_at_loss([fs[n] for n in names], [ft[n] for n in names])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


@suite("e2e")
def e2e_suite(ctx: Ctx) -> List[Row]:
    batch = 32 if ctx.quick else 128
    case = f"KD step ResNet-8 16->32 wide, K=3, batch {batch}"
    ctx.progress(f"e2e {case}")
    fns = {
        "eager KD + torch SGD": eager_step(batch, ctx.device),
        "lwkd fixed rate": distiller_step(batch, ctx.device, gamma=0.0),
        "lwkd layer-wise rates": distiller_step(batch, ctx.device, gamma=1.0),
    }
    stats = measure_round_robin(fns, repeat=ctx.repeat, device=ctx.device)
    rows = [Row("e2e", case, name, st, "eager KD + torch SGD") for name, st in stats.items()]
    overhead = stats["lwkd layer-wise rates"].median / stats["lwkd fixed rate"].median - 1.0
    rows[-1].extra["overhead_vs_fixed"] = overhead
    return rows
