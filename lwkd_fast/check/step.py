"""`lwkd-fast check` cases of the fused step (``layerwise_sgd_step`` / ``layerwise_adamw_step``) against
torch.optim in float64 with the oracle's rates, and the device-side skip flag against the run that omits the skipped steps."""

from __future__ import annotations

from typing import Any, Dict, Iterable

import torch

from .. import rule
from ..optim import DEFAULT_RATE_NORMALIZE, LayerwiseAdamW, LayerwiseSGD
from ..optim.step_op import ADAMW_OP, SGD_OP
from ..testing import Verdict, compare
from .case import Case

_OP = {"sgd": SGD_OP, "adamw": ADAMW_OP}  # the step op of each case kind
_RULE_KEYS = ("rate_momentum", "gamma", "s_min", "s_max", "rate_normalize")  # a case's options of the rule, not of torch.optim


def _check_params(device, dtype):
    """A small ResNet-like list: 4-D conv weights, 1-D norms/biases, a 0-dim scalar, a 2-D head,
    ragged sizes; returns (tensors, layer of each, which ones never get a gradient)."""
    g = torch.Generator().manual_seed(21)
    shapes = [((8, 3, 3, 3), 0), ((8,), 0), ((), 0), ((16, 8, 3, 3), 1), ((16,), 1), ((13,), 1),
              ((24, 16, 1, 1), 2), ((24,), 2), ((10, 24), None), ((10,), None)]
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s, _ in shapes]
    return tensors, [j for _, j in shapes], {5}


def _check_run(kind: str, cfg: Dict[str, Any], device, dtype, steps: int = 4):
    base, layers, no_grad = _check_params(device, dtype)
    K = 3
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in base] for _ in range(steps)]
    # every run starts from the same dtype-representable values (SPEC section 6: the float64
    # reference computes from the low-precision inputs)
    base = [t.to(dtype).double() for t in base]
    grads = [[t.to(dtype).double() for t in row] for row in grads]
    ds = [(torch.rand(K, generator=gen, dtype=torch.float64) + 0.05).to(torch.float32) for _ in range(steps)]

    def groups_of(ts):
        out = []
        for j in list(range(K)) + [None]:
            out.append({"params": [t for t, l in zip(ts, layers) if l == j], "layer": j})
        return out

    def run_ours():
        ps = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True) for t in base]
        cls = LayerwiseSGD if kind == "sgd" else LayerwiseAdamW
        opt = cls(groups_of(ps), **cfg)
        for s in range(steps):
            for i, p in enumerate(ps):
                p.grad = None if i in no_grad else grads[s][i].to(device=device, dtype=dtype)
            opt.step(ds[s].to(device))
        return ps

    def run_torch(tdtype, foreach):
        ps = [t.detach().to(tdtype, copy=True).requires_grad_(True) for t in base]
        tcfg = {k: v for k, v in cfg.items() if k not in _RULE_KEYS}
        lr = tcfg.pop("lr")
        cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
        opt = cls(groups_of(ps), lr=lr, foreach=foreach, **tcfg)
        m = [1.0] * K
        rm = {k: cfg[k] for k in ("gamma", "s_min", "s_max") if k in cfg}
        mu = cfg.get("rate_momentum", 0.9)
        # the optimizer's rule: its running reference (a, w) when it normalises, as the optimizer keeps it
        ref = [[0.0] * K, [0.0] * K] if cfg.get("rate_normalize", DEFAULT_RATE_NORMALIZE) == "running" else None
        for s in range(steps):
            eta, m, _ = rule.oracle_rates([float(x) for x in ds[s].double()], m, lr, mu,
                                          rm.get("gamma", 1.0), rm.get("s_min", 0.1), rm.get("s_max", 10.0), ref=ref)
            # the optimizer's factors, reference and rates are float32: hand torch the same rate values
            m = torch.tensor(m, dtype=torch.float32).double().tolist()
            if ref is not None:
                ref = torch.tensor(ref, dtype=torch.float32).double().tolist()
            eta = torch.tensor(eta, dtype=torch.float32).double().tolist()
            for grp in opt.param_groups:
                grp["lr"] = lr if grp["layer"] is None else eta[grp["layer"]]
            for i, p in enumerate(ps):
                p.grad = None if i in no_grad else grads[s][i].to(tdtype)
            opt.step()
        return ps

    ours = run_ours()
    ref = run_torch(torch.float64, False)
    if dtype in (torch.float32, torch.float64):
        return {f"param[{i}]": compare(o.detach(), r.detach(), dtype) for i, (o, r) in enumerate(zip(ours, ref))}
    # low precision: the "2 x eager error" rule over all parameters at once (a single element's
    # eager error is a matter of rounding luck; eager torch also rounds lr to the parameter dtype)
    eager = run_torch(dtype, False)

    def flat(ts):
        return torch.cat([t.detach().reshape(-1).double() for t in ts])

    return {"params": compare(flat(ours), flat(ref), dtype, flat(eager))}


_STEP_CASES = (
    ("sgd", "plain", dict(lr=0.1)),
    ("sgd", "momentum+wd+dampening", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("sgd", "nesterov+maximize", dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True, gamma=0.5)),
    ("sgd", "momentum, rule 'none'", dict(lr=0.05, momentum=0.9, rate_normalize="none")),
    ("adamw", "default", dict(lr=1e-2)),
    ("adamw", "amsgrad+maximize", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True,
                                       maximize=True)),
)


def _check_skip(kind: str, cfg: Dict[str, Any], device, steps: int = 5, skipped=(0, 2)):
    """Steps with ``found_inf=1`` (and NaN gradients and discrepancies) against the same run
    without them: parameters, optimizer state, factors and rates must agree bit for bit (the
    skipped steps include the first, which creates the state)."""

    base, layers, no_grad = _check_params(device, torch.float32)
    K = 3
    gen = torch.Generator().manual_seed(9)
    grads = [[torch.randn(t.shape, generator=gen).float() for t in base] for _ in range(steps)]
    ds = [torch.rand(K, generator=gen) + 0.05 for _ in range(steps)]
    cls = LayerwiseSGD if kind == "sgd" else LayerwiseAdamW

    def run(skip_them: bool):
        ps = [t.detach().to(device=device, dtype=torch.float32, copy=True).requires_grad_(True) for t in base]
        opt = cls([{"params": [t for t, l in zip(ps, layers) if l == j], "layer": j}
                   for j in list(range(K)) + [None]], **cfg)
        one, zero = torch.ones((), device=device), torch.zeros((), device=device)
        for s in range(steps):
            if s in skipped:
                if not skip_them:
                    continue
                for p in ps:
                    p.grad = torch.full_like(p, float("nan"))
                opt.step(torch.full((K,), float("nan"), device=device), found_inf=one)
                continue
            for i, p in enumerate(ps):
                p.grad = None if i in no_grad else grads[s][i].to(device)
            opt.step(ds[s].to(device), found_inf=zero if skip_them else None)
        sd = opt.state_dict()
        flat = [p.detach() for p in ps] + [opt.factors, opt.rates]
        for i in sorted(sd["state"]):
            flat.extend(v.reshape(-1) for _, v in sorted(sd["state"][i].items()))
        return flat, sorted(sd["state"]), int(opt.skipped_steps)

    a, keys_a, n_skipped = run(True)
    b, keys_b, _ = run(False)
    same = keys_a == keys_b and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    err = 0.0
    if not same:  # how far apart (inf: different state layout, or NaN where the other is not)
        err = float("inf")
        if keys_a == keys_b and len(a) == len(b):
            diffs = [float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()]
            err = max(diffs) if all(v == v for v in diffs) else float("inf")
    return {"params+state": Verdict(same, err, 0.0, "bit-identical to omitting the skipped steps"),
            "skipped_steps": Verdict(n_skipped == len(skipped), float(abs(n_skipped - len(skipped))), 0.0,
                                     "exact count")}


def lwkd_checks(backend: str, device: torch.device) -> Iterable:
    """Cases for ``lwkd-fast check``: 4 fused steps against torch.optim in float64 (rates from the
    rule's Python oracle) on a ragged ResNet-like parameter list with a grad=None parameter; and
    the device-side skip flag (``found_inf``) against the run that omits the skipped steps."""
    for dtype in (torch.float32, torch.bfloat16):
        for kind, label, cfg in _STEP_CASES:
            yield Case(_OP[kind], f"{kind} {label}", dtype,
                       lambda kind=kind, cfg=cfg, dtype=dtype: _check_run(kind, cfg, device, dtype))
    for kind, label, cfg in (("sgd", "momentum+nesterov+wd", dict(lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=1e-2)),
                             ("adamw", "amsgrad", dict(lr=1e-2, amsgrad=True))):
        yield Case(_OP[kind], f"{kind} {label}: skipped steps (found_inf)", torch.float32,
                   lambda kind=kind, cfg=cfg: _check_skip(kind, cfg, device))
