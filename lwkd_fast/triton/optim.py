"""Triton kernels of the optimizer ops: the per-layer rate rule and the fused per-layer step.

Both are wrapped as ``torch.library.custom_op`` (namespace ``lwkd_triton``) with fake kernels and
take exactly the arguments of the native ops ``torch.ops.lwkd.layerwise_rates`` /
``torch.ops.lwkd.layerwise_step`` (see csrc/ops.cpp), so the Python front ends call every backend
the same way.

``layerwise_step`` is ONE launch per parameter dtype present for all tensors of all groups,
through a pointer table: an int64 table holds, per tensor, the addresses of the parameter, the
gradient, the state tensors and the step count; each program takes one (tensor, chunk) task,
casts the addresses to typed pointers (``int.to(tl.pointer_type(...))``) and updates its chunk.
Per-tensor options (weight decay, momentum, fresh buffer, nesterov, amsgrad, maximize) are runtime
values applied through ``tl.where`` and load/store masks, so one compiled kernel serves every
group.  The rate of a tensor is read on the device: ``factors[layer] * lr`` (rounded to the
factors' dtype) with the group's base rate ``lr``.  AdamW step counts are incremented on the
device with ``torch._foreach_add_`` before the launch, as torch's fused AdamW does.

Skip flag: both ops take an optional ``found_inf`` (0-dim float32 on the device).  The kernels
load it once per program and fold it into their load/store masks, so a skipped step writes
nothing (and reads next to nothing); the rule still writes its output ``eta = lr * m`` from the
unchanged ``m``, and the AdamW step counts are incremented by ``found_inf == 0`` (a 0 or 1 tensor)
instead of 1.  No value is read on the host.

The same code runs on CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter reads the raw
addresses of CPU tensors).  Under the interpreter bfloat16 values are converted by explicit bit
manipulation (round to nearest even), because the interpreter's own bfloat16 casts truncate; the
bit path is used on GPUs too so that both give identical results.
"""

from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

__all__ = ["layerwise_rates", "layerwise_step", "OPS", "INTERPRETED"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

OPS = ("layerwise_rates", "layerwise_step")


def _quiet():
    """The interpreter evaluates with numpy, which warns about inf - inf and log(0), values the
    kernels produce on purpose (finite tests, beta = 0); silence exactly those warnings."""
    if INTERPRETED:
        import numpy as np

        return np.errstate(invalid="ignore", divide="ignore", over="ignore")
    return contextlib.nullcontext()


# dtype codes of the kernels
_DT_F32, _DT_F64, _DT_BF16, _DT_F16 = 0, 1, 2, 3
_DTYPE_CODE = {torch.float32: _DT_F32, torch.float64: _DT_F64, torch.bfloat16: _DT_BF16, torch.float16: _DT_F16}

# elements per program: large under the interpreter (each program costs milliseconds of Python
# there, whatever its size), GPU-sized otherwise
_STEP_BLOCK = 16384 if INTERPRETED else 4096
_STEP_WARPS = 8
_HYPER = 6  # doubles per group in group_hyper (see csrc/ops.cpp)


# ------------------------------------------------------------------------------------------------
# Typed access through raw addresses
# ------------------------------------------------------------------------------------------------


@triton.jit
def _typed_ptr(addr, DT: tl.constexpr):
    if DT == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif DT == 1:
        return addr.to(tl.pointer_type(tl.float64))
    elif DT == 2:
        return addr.to(tl.pointer_type(tl.int16))
    else:
        return addr.to(tl.pointer_type(tl.float16))


@triton.jit
def _load_op(addr, offs, mask, DT: tl.constexpr):
    """Load elements of dtype DT as op-math values (float64 for float64, float32 otherwise)."""
    ptr = _typed_ptr(addr, DT)
    if DT == 2:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    elif DT == 1:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_op(addr, offs, val, mask, DT: tl.constexpr):
    ptr = _typed_ptr(addr, DT)
    if DT == 2:
        bits = val.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(val != val, 0x7FC0, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif DT == 1:
        tl.store(ptr + offs, val, mask=mask)
    elif DT == 3:
        tl.store(ptr + offs, val.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, val, mask=mask)


@triton.jit
def _flag(x):
    """``x != 0`` as a boolean that combines with block masks (under the interpreter a float
    comparison cannot be and-ed with a mask directly)."""
    return (x != 0.0).to(tl.int32) != 0


@triton.jit
def _zero(x):
    """``x == 0`` (NaN is not zero), combinable with block masks like :func:`_flag`."""
    return (x == 0.0).to(tl.int32) != 0


# ------------------------------------------------------------------------------------------------
# The rule: one program over all K layers, float64 arithmetic
# ------------------------------------------------------------------------------------------------


@triton.jit
def _rates_kernel(d_ptr, d_stride, m_ptr, m_stride, eta_ptr, nf_ptr, lr_ptr, lr_stride, K, prm_ptr, fi_ptr,
                  ref_ptr, ref_s0, ref_s1,
                  HAS_NF: tl.constexpr, LR_FROM_PTR: tl.constexpr, GAMMA_MODE: tl.constexpr,
                  M_F64: tl.constexpr, HAS_FI: tl.constexpr, RUNNING: tl.constexpr, BLOCK: tl.constexpr):
    # float64 scalars come through memory (scalar kernel arguments would be float32)
    base_lr = tl.load(prm_ptr + 0)
    momentum = tl.load(prm_ptr + 1)
    gamma = tl.load(prm_ptr + 2)
    s_min = tl.load(prm_ptr + 3)
    s_max = tl.load(prm_ptr + 4)
    eps = tl.load(prm_ptr + 5)
    rho = tl.load(prm_ptr + 6)
    offs = tl.arange(0, BLOCK)
    inb = offs < K
    d = tl.load(d_ptr + offs * d_stride, mask=inb, other=0.0).to(tl.float64)
    ok = ((d - d) == 0.0) & (d >= 0.0) & inb  # usable: finite and >= 0 (csrc/common: rule_usable)
    dz = tl.where(ok, d, 0.0)
    if HAS_FI:  # skipped step: nothing is stored but eta (from the unchanged m)
        store = ok & _zero(tl.load(fi_ptr))
    else:
        store = ok
    if RUNNING:  # csrc/common: rule_reference (same operations, same order)
        a_old = tl.load(ref_ptr + offs * ref_s1, mask=inb, other=0.0).to(tl.float64)
        w_old = tl.load(ref_ptr + ref_s0 + offs * ref_s1, mask=inb, other=0.0).to(tl.float64)
        a_new = rho * a_old + (1.0 - rho) * dz
        w_new = rho * w_old + (1.0 - rho)
        R = a_new / w_new
        x = tl.where(ok, tl.where(R > 0.0, dz / tl.where(R > 0.0, R, 1.0), 1.0), 0.0)
        if M_F64:
            tl.store(ref_ptr + offs * ref_s1, a_new, mask=store)
            tl.store(ref_ptr + ref_s0 + offs * ref_s1, w_new, mask=store)
        else:
            tl.store(ref_ptr + offs * ref_s1, a_new.to(tl.float32), mask=store)
            tl.store(ref_ptr + ref_s0 + offs * ref_s1, w_new.to(tl.float32), mask=store)
    else:
        x = dz
    total = tl.sum(x, axis=0)
    count = tl.sum(ok.to(tl.float64), axis=0)
    safe_total = tl.where(total > eps, total, 1.0)
    r = tl.where(total > eps, count * x / safe_total, 1.0)
    if GAMMA_MODE == 0:      # gamma == 0: r ** 0 = 1
        s = tl.full([BLOCK], 1.0, tl.float64)
    elif GAMMA_MODE == 1:    # gamma == 1
        s = r
    else:                    # r ** gamma for r >= 0 (r = 0 -> 0)
        s = tl.where(r > 0.0, tl.exp(gamma * tl.log(tl.where(r > 0.0, r, 1.0))), 0.0)
    s = tl.where(s < s_min, s_min, tl.where(s > s_max, s_max, s))
    m_old = tl.load(m_ptr + offs * m_stride, mask=inb, other=1.0).to(tl.float64)
    m_new = momentum * m_old + (1.0 - momentum) * s
    if M_F64:
        m_q = m_new
    else:
        m_q = m_new.to(tl.float32).to(tl.float64)
    # unusable layers and skipped steps keep m (exactly representable) and store nothing
    m_q = tl.where(store, m_q, m_old)
    tl.store(m_ptr + offs * m_stride, m_q, mask=store)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr + offs * lr_stride, mask=inb, other=0.0).to(tl.float64)
    else:
        lr = base_lr
    tl.store(eta_ptr + offs, lr * m_q, mask=inb)
    if HAS_NF:
        bad = tl.sum((inb & ~ok).to(tl.int32), axis=0)
        old = tl.load(nf_ptr)
        if HAS_FI:
            tl.store(nf_ptr, old + (bad > 0).to(tl.int64), mask=_zero(tl.load(fi_ptr)))
        else:
            tl.store(nf_ptr, old + (bad > 0).to(tl.int64))


@torch.library.custom_op("lwkd_triton::layerwise_rates", mutates_args=("state", "nonfinite", "ref_state"))
def layerwise_rates(d: torch.Tensor, state: torch.Tensor, nonfinite: Optional[torch.Tensor],
                    base_lr: List[float], base_lr_tensor: Optional[torch.Tensor], momentum: float,
                    gamma: float, s_min: float, s_max: float, eps: float,
                    found_inf: Optional[torch.Tensor] = None, ref_state: Optional[torch.Tensor] = None,
                    ref_momentum: float = 0.99) -> torch.Tensor:
    """Triton implementation of ``lwkd::layerwise_rates`` (same arguments and result)."""
    K = d.shape[0]
    eta = torch.empty(K, dtype=state.dtype, device=state.device)
    if K == 0:
        return eta
    if K > 65536:
        raise ValueError(f"lwkd_fast.triton.optim.layerwise_rates: K={K} layers exceeds the single-program limit 65536")
    lr_ptr, lr_stride, from_ptr = eta, 0, False
    scalar_lr = float(base_lr[0]) if len(base_lr) else 1.0
    if base_lr_tensor is not None:
        t = base_lr_tensor
        if t.device != state.device:  # a CPU scalar next to device state: move it without a sync
            t = t.to(state.device, non_blocking=True)
        lr_ptr, lr_stride, from_ptr = t.reshape(-1), (1 if t.numel() == K and t.dim() == 1 else 0), True
    elif len(base_lr) == K and K > 1:
        lr_ptr = torch.tensor(list(base_lr), dtype=torch.float64).to(state.device, non_blocking=True)
        lr_stride, from_ptr = 1, True
    gamma_mode = 0 if gamma == 0.0 else (1 if gamma == 1.0 else 2)
    nf = nonfinite if nonfinite is not None else eta
    prm = _as_table([scalar_lr, momentum, gamma, s_min, s_max, eps, ref_momentum], torch.float64, state.device)
    ref = ref_state if ref_state is not None else state
    with _quiet():
        _rates_kernel[(1,)](
            d, d.stride(0), state, state.stride(0), eta, nf, lr_ptr, lr_stride, K, prm,
            found_inf if found_inf is not None else eta, ref,
            ref.stride(0) if ref_state is not None else 0, ref.stride(-1),
            HAS_NF=nonfinite is not None, LR_FROM_PTR=from_ptr, GAMMA_MODE=gamma_mode,
            M_F64=state.dtype == torch.float64, HAS_FI=found_inf is not None, RUNNING=ref_state is not None,
            BLOCK=max(16, triton.next_power_of_2(K)),
        )
    return eta


@layerwise_rates.register_fake
def _(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min, s_max, eps, found_inf=None,
      ref_state=None, ref_momentum=0.99):
    return torch.empty(d.shape[0], dtype=state.dtype, device=state.device)


# ------------------------------------------------------------------------------------------------
# The fused step: one program per (tensor, chunk) task, all tensors in one launch per dtype
# ------------------------------------------------------------------------------------------------
# pointer table columns
_P, _G, _S1, _S2, _S3, _STEP = range(6)
# group table (float64) columns: base lr, then the six hyper-parameters
_GLR = 0


@triton.jit
def _step_kernel(ptr_table, numel_table, tgroup_table, fresh_table, task_table, glayer_table, gfloat_table,
                 factors_ptr, fi_ptr, ALGO: tl.constexpr, DT: tl.constexpr, FAC_F64: tl.constexpr,
                 HAS_FI: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(task_table + 2 * pid)
    chunk = tl.load(task_table + 2 * pid + 1).to(tl.int64)
    numel = tl.load(numel_table + t)
    grp = tl.load(tgroup_table + t)
    layer = tl.load(glayer_table + grp)
    base = gfloat_table + grp * 7
    lr0 = tl.load(base)
    h0 = tl.load(base + 1)
    h1 = tl.load(base + 2)
    h2 = tl.load(base + 3)
    h3 = tl.load(base + 4)
    h4 = tl.load(base + 5)
    h5 = tl.load(base + 6)
    # rate: lr * factors[layer] rounded to the factors' dtype; the head (layer < 0) uses lr
    f = tl.load(factors_ptr + tl.maximum(layer, 0), mask=layer >= 0, other=1.0).to(tl.float64)
    scaled = lr0 * f
    if not FAC_F64:
        scaled = scaled.to(tl.float32).to(tl.float64)
    rate = tl.where(layer >= 0, scaled, lr0)

    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if HAS_FI:
        # skipped step: every load and store below is masked off (nothing written, little read)
        mask = mask & _zero(tl.load(fi_ptr))
    row = ptr_table + 6 * t
    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    p = _load_op(p_addr, offs, mask, DT)
    grad = _load_op(g_addr, offs, mask, DT)

    if ALGO == 0:
        # SGD: h0 weight_decay, h1 momentum, h2 dampening, h3 nesterov, h4 maximize
        fresh_flag = tl.load(fresh_table + t)
        fresh = fresh_flag != 0
        c_lr = rate.to(p.dtype)
        c_wd = h0.to(p.dtype)
        c_mom = h1.to(p.dtype)
        c_omd = (1.0 - h2).to(p.dtype)
        sign = tl.where(_flag(h4), -1.0, 1.0).to(p.dtype)
        has_mom = _flag(h1)
        g = sign * grad
        g = tl.where(_flag(h0), g + c_wd * p, g)
        b_addr = tl.load(row + 2)
        buf_old = _load_op(b_addr, offs, mask & has_mom & (fresh_flag == 0), DT)
        buf = tl.where(fresh, g, c_mom * buf_old + c_omd * g)
        g_mom = tl.where(_flag(h3), g + c_mom * buf, buf)
        g = tl.where(has_mom, g_mom, g)
        p = p - c_lr * g
        _store_op(p_addr, offs, p, mask, DT)
        _store_op(b_addr, offs, buf, mask & has_mom, DT)
    else:
        # AdamW: h0 weight_decay, h1 beta1, h2 beta2, h3 eps, h4 amsgrad, h5 maximize
        step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32))).to(tl.float64)
        # beta ** step through exp/log (beta = 0 gives exp(-inf) = 0, as 0 ** step)
        pow1 = tl.exp(step * tl.log(h1))
        pow2 = tl.exp(step * tl.log(h2))
        c_decay = (1.0 - rate * h0).to(p.dtype)
        c_w = (1.0 - h1).to(p.dtype)
        c_b2 = h2.to(p.dtype)
        c_omb2 = (1.0 - h2).to(p.dtype)
        c_step = (rate / (1.0 - pow1)).to(p.dtype)
        c_bc2 = tl.sqrt(1.0 - pow2).to(p.dtype)
        c_eps = h3.to(p.dtype)
        sign = tl.where(_flag(h5), -1.0, 1.0).to(p.dtype)
        ams = _flag(h4)
        m_addr = tl.load(row + 2)
        v_addr = tl.load(row + 3)
        w_addr = tl.load(row + 4)
        m = _load_op(m_addr, offs, mask, DT)
        v = _load_op(v_addr, offs, mask, DT)
        vmax = _load_op(w_addr, offs, mask & ams, DT)
        g = sign * grad
        p = tl.where(_flag(h0), p * c_decay, p)
        diff = g - m
        m = tl.where(tl.abs(c_w) < 0.5, m + c_w * diff, g - diff * (1.0 - c_w))
        v = c_b2 * v + c_omb2 * (g * g)
        # torch.maximum: NaN if either side is NaN
        vmax_new = tl.where(vmax != vmax, vmax, tl.where(v != v, v, tl.maximum(vmax, v)))
        vv = tl.where(ams, vmax_new, v)
        denom = tl.sqrt(vv) / c_bc2 + c_eps
        p = p - c_step * (m / denom)
        _store_op(p_addr, offs, p, mask, DT)
        _store_op(m_addr, offs, m, mask, DT)
        _store_op(v_addr, offs, v, mask, DT)
        _store_op(w_addr, offs, vmax_new, mask & ams, DT)


def _addr(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _as_table(rows, dtype, device) -> torch.Tensor:
    t = torch.tensor(rows, dtype=dtype)
    if device.type != "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


@torch.library.custom_op(
    "lwkd_triton::layerwise_step", mutates_args=("params", "state1", "state2", "state3", "steps")
)
def layerwise_step(algorithm: str, params: List[torch.Tensor], grads: List[torch.Tensor],
                   state1: List[torch.Tensor], state2: List[torch.Tensor], state3: List[torch.Tensor],
                   steps: List[torch.Tensor], factors: torch.Tensor, tensor_group: List[int],
                   fresh: List[int], group_layer: List[int], group_lr: List[float],
                   group_lr_tensor: List[Optional[torch.Tensor]], group_hyper: List[float],
                   found_inf: Optional[torch.Tensor] = None) -> None:
    """Triton implementation of ``lwkd::layerwise_step`` (same arguments; see csrc/ops.cpp)."""
    if algorithm not in ("sgd", "adamw"):
        raise ValueError(f"lwkd_triton::layerwise_step: unknown algorithm {algorithm!r} (expected 'sgd' or 'adamw')")
    N, G = len(params), len(group_layer)
    if N == 0:
        return
    if len(grads) != N or len(tensor_group) != N or len(group_hyper) != G * _HYPER or len(group_lr) != G:
        raise ValueError("lwkd_triton::layerwise_step: list lengths disagree (params, grads, tensor_group, groups)")
    device = factors.device
    sgd = algorithm == "sgd"
    fresh_set = set(fresh)

    # group table: base lr + hyper-parameters, float64; tensor rates are gathered on the device
    gfloat = [[float(group_lr[k])] + [float(x) for x in group_hyper[k * _HYPER:(k + 1) * _HYPER]] for k in range(G)]
    gtable = _as_table(gfloat, torch.float64, device)
    lr_tensors = [(k, t) for k, t in enumerate(group_lr_tensor or []) if t is not None]
    if lr_tensors:
        idx = torch.tensor([k for k, _ in lr_tensors], dtype=torch.int64).to(device, non_blocking=True)
        vals = torch.stack([t.detach().reshape(()).to(device=device, dtype=torch.float64) for _, t in lr_tensors])
        gtable[:, 0].index_copy_(0, idx, vals)
    glayer = _as_table([int(x) for x in group_layer], torch.int64, device)

    rows, numels, tgroups, fresh_flags = [], [], [], []
    keep_alive = []  # gradient copies made to match a parameter's layout (live until the launch)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(
                f"lwkd_triton::layerwise_step: grads[{i}] has shape {tuple(g.shape)} and dtype {g.dtype} but "
                f"params[{i}] has shape {tuple(p.shape)} and dtype {p.dtype}"
            )
        if not _same_dense_layout(p, p):
            raise ValueError(
                f"lwkd_triton::layerwise_step: params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) "
                "is not dense; the fused step updates dense parameters"
            )
        if not _same_dense_layout(g, p):
            g = torch.empty_like(p).copy_(g)  # one copy into the parameter's memory order
            keep_alive.append(g)
        s1 = state1[i] if (state1 and state1[i].numel() == p.numel()) else None
        s2 = state2[i] if state2 else None
        s3 = state3[i] if (state3 and state3[i].numel() == p.numel()) else None
        st = steps[i] if steps else None
        rows.append([p.data_ptr(), g.data_ptr(), _addr(s1), _addr(s2), _addr(s3), _addr(st)])
        numels.append(p.numel())
        tgroups.append(int(tensor_group[i]))
        fresh_flags.append(1 if i in fresh_set else 0)
    ptr_table = _as_table(rows, torch.int64, device)
    numel_table = _as_table(numels, torch.int64, device)
    tgroup_table = _as_table(tgroups, torch.int64, device)
    fresh_table = _as_table(fresh_flags, torch.int64, device)
    if not sgd:
        if found_inf is None:
            torch._foreach_add_(list(steps), 1.0)
        else:  # + 1.0 or + 0.0 (exact either way), decided on the device
            torch._foreach_add_(list(steps), (found_inf.reshape(()) == 0).to(torch.float32))
    # K = 0 (head groups only): an empty tensor has no address to hand the kernel; the masked
    # load never reads this stand-in
    fac = factors if factors.numel() else torch.ones(1, dtype=factors.dtype, device=device)

    for dt, code in _DTYPE_CODE.items():
        tasks = []
        for i, p in enumerate(params):
            if p.dtype == dt:
                tasks.extend((i, c) for c in range(triton.cdiv(p.numel(), _STEP_BLOCK)))
        if not tasks:
            continue
        task_table = _as_table([x for pair in tasks for x in pair], torch.int32, device)
        with _quiet():
            _step_kernel[(len(tasks),)](
                ptr_table, numel_table, tgroup_table, fresh_table, task_table, glayer, gtable, fac,
                found_inf if found_inf is not None else fac,
                ALGO=0 if sgd else 1, DT=code, FAC_F64=factors.dtype == torch.float64,
                HAS_FI=found_inf is not None, BLOCK=_STEP_BLOCK,
                num_warps=_STEP_WARPS,
            )


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Dense (no gaps, no overlap) and the same memory order as ``b``."""
    if a.shape != b.shape:
        return False
    if any(sa != sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1):
        return False
    # dense: the strides sorted by size form a contiguous layout
    dims = sorted((s, n) for s, n in zip(a.stride(), a.shape) if n > 1)
    expect = 1
    for s, n in dims:
        if s != expect:
            return False
        expect *= n
    return True


@layerwise_step.register_fake
def _(algorithm, params, grads, state1, state2, state3, steps, factors, tensor_group, fresh, group_layer,
      group_lr, group_lr_tensor, group_hyper, found_inf=None):
    return None
