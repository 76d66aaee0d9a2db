"""`lwkd-fast check` cases of the derivative strategies (``input_jacobians`` / ``input_hvps``):
every strategy against the ``loop`` oracle in float64 on a train-mode BatchNorm CNN."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from ..derivatives import input_hvps, input_jacobians, rademacher
from ..testing import compare
from .case import Case


class _CheckCNN(nn.Module):
    """Tiny CNN with train-mode BatchNorm, a residual add and a head (the check's model)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn1(self.conv1(x)))
        h = torch.tanh(self.bn2(self.conv2(h)) + h)
        return self.head(h.mean((2, 3)))


def _check_setup(device: torch.device):
    g = torch.Generator().manual_seed(3)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(5)
        model = _CheckCNN()
    finally:
        torch.random.set_rng_state(torch_state)
    x = torch.randn(3, 2, 5, 4, generator=g)
    v = rademacher(x.shape, generator=g, dtype=torch.float64)
    return model.to(device).train(), x.to(device), v.to(device)


CHECK_LAYERS = ("bn1", "conv2", "head")


def lwkd_checks(backend: str, device: torch.device) -> Iterable:
    """Cases for ``lwkd-fast check``: every strategy against the ``loop`` oracle in float64, in
    float64 and float32, on a train-mode BatchNorm CNN.  The strategies are not backends, so only
    the ``reference`` pass yields cases."""
    if backend != "reference":
        return
    for kind in ("jacobian", "hvp"):
        for strategy in ("batched_backward", "vmap"):
            for dtype in (torch.float64, torch.float32):
                def run(kind=kind, strategy=strategy, dtype=dtype):
                    model, x, v = _check_setup(device)
                    probes = ["energy", "max", "logit"]
                    labels = torch.tensor([0, 2, 1], device=device)
                    m64 = copy.deepcopy(model).double()
                    fn = input_jacobians if kind == "jacobian" else input_hvps
                    extra = {} if kind == "jacobian" else {"v": v}
                    ref = fn(m64, x.double(), list(CHECK_LAYERS), probe=probes, labels=labels,
                             strategy="loop", **extra)
                    m = model.to(dtype)
                    extra = {} if kind == "jacobian" else {"v": v.to(dtype)}
                    got = fn(m, x.to(dtype), list(CHECK_LAYERS), probe=probes, labels=labels,
                             strategy=strategy, **extra)
                    return {f"{name}": compare(a, r, dtype) for name, a, r in zip(CHECK_LAYERS, got, ref)}

                yield Case("derivatives", f"{kind} {strategy} vs loop (train-mode BN CNN)", dtype, run)
