"""One optimizer step over a ResNet-18-sized parameter list (11.69M parameters in 62 tensors;
four layer groups -- stem + layer1, layer2, layer3, layer4 -- plus the fc head):

* ``lwkd fused``             ``LayerwiseSGD/AdamW.step(D)``: the rule and every tensor in one
                             native call (no host sync);
* ``torch foreach + sync``   what users write today: the rule in torch, the per-group rates copied
                             to the host (``.tolist()``) into ``group["lr"]``, then
                             ``torch.optim.*(foreach=True).step()``;
* ``torch fused + tensor lr`` the rule in torch, rates copied on the device into 0-dim tensor
                             ``group["lr"]``, then ``torch.optim.*(fused=True).step()``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import ops, optim, rule
from ..benchmarking import measure_round_robin
from ..optim.step_op import OPS as STEP_OPS
from .core import ROOFLINE, Ctx, Row, read_proxy, suite

K = 4
SGD_CFG = dict(momentum=0.9, weight_decay=5e-4)
ADAMW_CFG = dict(weight_decay=1e-2)
LR = {"sgd": 0.1, "adamw": 1e-3}


def resnet18_shapes() -> List[Tuple[str, Tuple[int, ...], Optional[int]]]:
    """(name, shape, layer group) of torchvision's resnet18 parameters in registration order:
    62 tensors, 11,689,512 elements; the stem joins group 0, ``fc`` is the head (None)."""
    out = [("conv1.weight", (64, 3, 7, 7), 0), ("bn1.weight", (64,), 0), ("bn1.bias", (64,), 0)]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            pre = f"layer{stage + 1}.{block}"
            first_in = cin if block == 0 else cout
            out += [(f"{pre}.conv1.weight", (cout, first_in, 3, 3), stage), (f"{pre}.bn1.weight", (cout,), stage),
                    (f"{pre}.bn1.bias", (cout,), stage), (f"{pre}.conv2.weight", (cout, cout, 3, 3), stage),
                    (f"{pre}.bn2.weight", (cout,), stage), (f"{pre}.bn2.bias", (cout,), stage)]
            if block == 0 and stage > 0:
                out += [(f"{pre}.downsample.0.weight", (cout, cin, 1, 1), stage),
                        (f"{pre}.downsample.1.weight", (cout,), stage), (f"{pre}.downsample.1.bias", (cout,), stage)]
        cin = cout
    out += [("fc.weight", (1000, 512), None), ("fc.bias", (1000,), None)]
    return out


def numel() -> int:
    return sum(torch.Size(s).numel() for _, s, _ in resnet18_shapes())


def make_params(dtype=torch.float32, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for _, shape, _ in resnet18_shapes():
        p = (torch.randn(shape, generator=g) * 0.05).to(device=device, dtype=dtype).requires_grad_(True)
        p.grad = (torch.randn(shape, generator=g) * 1e-2).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def make_groups(ps, lr):
    layers = [j for _, _, j in resnet18_shapes()]
    return [{"params": [p for p, l in zip(ps, layers) if l == j], "layer": j, "lr": lr() if callable(lr) else lr}
            for j in list(range(K)) + [None]]


def discrepancies(device="cpu"):
    return torch.tensor([0.8, 1.3, 0.4, 2.1], dtype=torch.float32, device=device)


def step_bytes(kind: str, n: int, elem: int = 4) -> int:
    """Bytes one step must move: SGD+momentum reads p, g, buf and writes p, buf; AdamW reads p,
    g, m, v and writes p, m, v."""
    return (5 if kind == "sgd" else 7) * n * elem


def lwkd_fused(kind: str, backend: str = "native", device="cpu"):
    ps = make_params(device=device)
    groups = make_groups(ps, LR[kind])
    opt = (optim.LayerwiseSGD(groups, lr=LR[kind], **SGD_CFG) if kind == "sgd"
           else optim.LayerwiseAdamW(groups, lr=LR[kind], **ADAMW_CFG))
    d = discrepancies(device)

    def step():
        with ops.use_backend(backend):
            opt.step(d)
    return step


def _torch_rule(kind, device):
    """The optimizers' default rule (with its running reference when that is ``"running"``) in
    plain torch: the rates a user without the fused step computes each step."""
    m = torch.ones(K, device=device)
    ref = rule.new_reference_state(K, device=device) if optim.DEFAULT_RATE_NORMALIZE == "running" else None
    d = discrepancies(device)
    return lambda: rule.reference_rates(d, m, None, [LR[kind]], None, 0.9, 1.0, 0.1, 10.0, 1e-12, ref_state=ref)


def torch_foreach_sync(kind: str, device="cpu"):
    ps = make_params(device=device)
    groups = make_groups(ps, LR[kind])
    opt = (torch.optim.SGD(groups, lr=LR[kind], foreach=True, **SGD_CFG) if kind == "sgd"
           else torch.optim.AdamW(groups, lr=LR[kind], foreach=True, **ADAMW_CFG))
    rates = _torch_rule(kind, device)

    def step():
        eta = rates().tolist()  # the host sync
        for g in opt.param_groups:
            if g["layer"] is not None:
                g["lr"] = eta[g["layer"]]
        opt.step()
    return step


def torch_fused_tensor_lr(kind: str, device="cpu"):
    ps = make_params(device=device)
    groups = make_groups(ps, lambda: torch.tensor(LR[kind], device=device))
    opt = (torch.optim.SGD(groups, lr=torch.tensor(LR[kind], device=device), fused=True, **SGD_CFG) if kind == "sgd"
           else torch.optim.AdamW(groups, lr=torch.tensor(LR[kind], device=device), fused=True, **ADAMW_CFG))
    rates = _torch_rule(kind, device)

    def step():
        eta = rates()
        for g in opt.param_groups:
            if g["layer"] is not None:
                g["lr"].copy_(eta[g["layer"]])
        opt.step()
    return step


def variants(device: torch.device):
    v = {"torch foreach + sync": torch_foreach_sync, "torch fused + tensor lr": torch_fused_tensor_lr}
    if all(ops.backend_status("native", op, device.type)[0] for op in STEP_OPS):
        v["lwkd fused (native)"] = lambda kind, device: lwkd_fused(kind, "native", device)
    if device.type == "cuda" and all(ops.backend_status("triton", op, "cuda")[0] for op in STEP_OPS):
        v["lwkd fused (triton)"] = lambda kind, device: lwkd_fused(kind, "triton", device)
    return v


@suite("optimizer")
def optimizer_suite(ctx: Ctx) -> List[Row]:
    rows: List[Row] = []
    n = numel()
    for kind in ("sgd", "adamw"):
        nbytes = step_bytes(kind, n)
        case = f"{kind} step, ResNet-18 ({n / 1e6:.1f}M params, 62 tensors)"
        ctx.progress(f"optimizer {case}")
        fns = {name: make(kind, device=ctx.device) for name, make in variants(ctx.device).items()}
        fns[ROOFLINE] = read_proxy(nbytes, ctx.device)
        stats = measure_round_robin(fns, repeat=ctx.repeat, device=ctx.device)
        proxy = stats.pop(ROOFLINE)
        for name, st in stats.items():
            rows.append(Row("optimizer", case, name, st, "torch foreach + sync", nbytes, read_stats=proxy))
        del fns
    return rows
