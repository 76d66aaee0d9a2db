"""Derivative maps of K = 3 layers of a small CIFAR ResNet: ``batched_backward`` vs ``vmap`` vs
``loop`` (SPEC section 3), input Jacobians and Hessian-vector products, plus peak memory.

Peak memory: torch has no CPU peak-allocation counter (and ``tracemalloc`` does not see its
allocator), so each (kind, strategy) runs once in a fresh subprocess (``python -m
lwkd_fast.bench.derivatives KIND STRATEGY ...``) that builds the model and the batch, resets the
resident-set high-water mark (``/proc/self/clear_refs``), runs the strategy once and reports
``VmHWM - VmRSS``: the extra resident memory at the peak of one call.  It counts every page the
call touched, so it is an upper bound on tensor memory, measured the same way for every
strategy.  Linux only.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import derivatives as D
from ..benchmarking import measure_round_robin
from .core import Ctx, Row, suite

LAYERS = ["layer1", "layer2", "layer3"]
STRATEGIES = ("batched_backward", "vmap", "loop")
KINDS = ("jacobian", "hvp")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR ResNet-8: stem, three stages of BasicBlocks (width, 2 width, 4 width), linear head."""

    def __init__(self, width: int = 16, blocks: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

        def stage(cin, cout, stride):
            return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                   for i in range(blocks)])

        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_workload(batch: int = 128, mode: str = "train", seed: int = 0, size: int = 32, device="cpu"):
    torch.manual_seed(seed)
    model = SmallResNet().to(device)
    model.train(mode == "train")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    v = D.rademacher(x.shape, generator=g, dtype=x.dtype).to(device)
    return model, x, v


def runner(kind: str, strategy: str, model, x, v) -> Callable[[], List[torch.Tensor]]:
    if kind == "jacobian":
        return lambda: D.input_jacobians(model, x, LAYERS, strategy=strategy)
    return lambda: D.input_hvps(model, x, LAYERS, v=v, strategy=strategy)


def jacobian_conv_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Convolution FLOPs (2 x multiply-adds) of one Jacobian call on the whole batch: one forward,
    plus for each layer j the input-gradient of every convolution that ran before layer j's output
    (exact for this sequential ResNet).  The same arithmetic for every strategy, so time gives the
    achieved GFLOP/s, a compute roofline."""
    events: List[tuple] = []
    hooks = []
    model = copy.deepcopy(model).eval()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, i, o: events.append(
                ("conv", o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]))))
        if name in LAYERS:
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: events.append(("layer", name))))
    with torch.no_grad():
        model(x[:1])
    total, running = 0, 0
    for kind, val in events:
        if kind == "conv":
            running += val
        else:
            total += running
    return 2.0 * x.shape[0] * (running + total)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _memory_child(kind: str, strategy: str, batch: int, mode: str, size: int) -> Dict[str, object]:
    model, x, v = make_workload(batch, mode, size=size)
    fn = runner(kind, strategy, model, x, v)
    torch.func.vmap  # import torch.func now: its import cost is not the strategy's memory

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return {"peak_mib": None}
    rss0 = _status_kib("VmRSS")
    fn()
    hwm = _status_kib("VmHWM")
    return {"peak_mib": None if rss0 is None or hwm is None else (hwm - rss0) / 1024.0}


def peak_memory_mib(kind: str, strategy: str, batch: int, mode: str, size: int) -> Optional[float]:
    cmd = [sys.executable, "-m", "lwkd_fast.bench.derivatives", kind, strategy, str(batch), mode, str(size),
           str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1]).get("peak_mib")


@suite("derivatives")
def derivatives_suite(ctx: Ctx) -> List[Row]:
    batch, size = (32, 16) if ctx.quick else (128, 32)
    size = ctx.derivative_size or size
    model, x, v = make_workload(batch, "train", size=size, device=ctx.device)
    flops = jacobian_conv_flops(model, x)
    rows: List[Row] = []
    for kind in KINDS:
        case = f"{kind} K=3 ResNet-8 {batch}x3x{size}x{size}"
        fns = {s: runner(kind, s, model, x, v) for s in STRATEGIES}
        ctx.progress(f"derivatives {case}: check")
        ref = fns["batched_backward"]()
        for s in ("vmap", "loop"):
            for a, b in zip(fns[s](), ref):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))
        ctx.progress(f"derivatives {case}: timing")
        loops = 2 if ctx.quick else 3
        stats = measure_round_robin(fns, repeat=max(3, ctx.repeat // 2), warmup=1, repeats={"loop": loops},
                                    device=ctx.device)
        for s in STRATEGIES:
            extra: Dict[str, object] = {}
            if kind == "jacobian":
                extra["gflops_per_s"] = flops / stats[s].median / 1e9
            if ctx.memory and ctx.device.type == "cpu":
                ctx.progress(f"derivatives {case}: peak memory of {s}")
                extra["peak_mib"] = peak_memory_mib(kind, s, batch, "train", size)
            rows.append(Row("derivatives", case, s, stats[s], "loop", extra=extra))
    return rows


if __name__ == "__main__":  # the peak-memory child
    kind, strategy, batch, mode, size, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    print(json.dumps(_memory_child(kind, strategy, int(batch), mode, int(size))))
