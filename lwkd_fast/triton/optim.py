"""Triton kernels of the optimizer ops: the per-layer rate rule and the fused per-layer step.

Both are wrapped as ``torch.library.custom_op`` (namespace ``lwkd_triton``) with fake kernels and
take exactly the arguments of the native ops ``torch.ops.lwkd.layerwise_rates`` /
``layerwise_sgd_step`` / ``layerwise_adamw_step`` (see csrc/ops.cpp), so the Python front ends call
every backend the same way.

The step (either op: their named per-group lists are packed once, by ``_pack_hyper``, into the
kernel's group table) is ONE launch per parameter dtype present for all tensors of all groups,
through a pointer table: an int64 table holds, per tensor, the addresses of the parameter, the
gradient, the state tensors and the step count; each program takes one (tensor, chunk) task,
casts the addresses to typed pointers (``int.to(tl.pointer_type(...))``) and updates its chunk.
Per-tensor options (weight decay, momentum, fresh buffer, nesterov, amsgrad, maximize) are runtime
values applied through ``tl.where`` and load/store masks, so one compiled kernel serves every
group.  The rate of a tensor is read on the device: ``factors[layer] * lr`` (rounded to the
factors' dtype) with the group's base rate ``lr``.  AdamW step counts are incremented on the
device with ``torch._foreach_add_`` before the launch, as torch's fused AdamW does.  The AdamW
update uses correctly rounded square roots and divisions (``tl.sqrt_rn`` / ``tl.div_rn`` in
float32), as CUDA C++ compiles them in csrc/common/optim_math.h and in torch's AdamW kernels.

Checks.  The host code makes the checks of the native ops (csrc/common/optim_host.h) before
anything is launched: list lengths, group indices and layers within range, and every state tensor
the kernel addresses (momentum buffer, exp_avg, exp_avg_sq, max_exp_avg_sq) with its parameter's
shape, dtype, device and memory layout -- the kernel walks it by the parameter's element offsets,
so a state of another size or order is refused by name (``exp_avgs[3]``) instead of being read
out of bounds or in the wrong order; step counts are one float32 element on the device.  A base
rate given as a tensor is read where it lives: on the device when it is on the parameters'
device, on the host (from its memory: no copy, no synchronisation) when it is a CPU tensor next
to device parameters.  Every call runs under the device guard of its tensors (see ._common).

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
import ctypes
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import div_rn, is_dense, on_device, same_layout, sqrt_rn
from ._host import _interpreting

__all__ = ["layerwise_rates", "layerwise_sgd_step", "layerwise_adamw_step", "OPS", "INTERPRETED"]

INTERPRETED = _interpreting()

OPS = ("layerwise_rates", "layerwise_sgd_step", "layerwise_adamw_step")


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
_HYPER = 6  # doubles per group in the kernel's group table (csrc/common/optim_math.h's kHyperStride)


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
    """Triton implementation of ``lwkd::layerwise_rates`` (same arguments, checks and result)."""
    _check_rates_args(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min, s_max, eps, found_inf,
                      ref_state, ref_momentum)
    with on_device(state.device, _RATES):
        return _rates(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min, s_max, eps, found_inf,
                      ref_state, ref_momentum)


_RATES = "layerwise_rates"
_SGD_OP = "layerwise_sgd_step"
_ADAMW_OP = "layerwise_adamw_step"


def _fail(op: str, msg: str):
    raise ValueError(f"lwkd_triton::{op}: {msg}")


def _check_found_inf(op: str, found_inf: Optional[torch.Tensor], device: torch.device) -> None:
    """The skip flag: one float32 element on the op's device (read there, never on the host)."""
    if found_inf is None:
        return
    if found_inf.numel() != 1 or found_inf.dim() > 1:
        _fail(op, f"found_inf must be a 0-dim (or one-element) tensor, got shape {tuple(found_inf.shape)}")
    if found_inf.dtype != torch.float32:
        _fail(op, f"found_inf has dtype {found_inf.dtype}; expected float32")
    if found_inf.device != device:
        _fail(op, f"found_inf is on {found_inf.device} but the op runs on {device}")


def _host_values(t: torch.Tensor, device: torch.device, op: str, what: str) -> Optional[List[float]]:
    """The values of a CPU rate tensor that is used beside tensors on another device, read on the
    host -- host memory, so no copy and no device synchronisation, as the native ops do; None when
    ``t`` is on ``device`` (the kernels read it there)."""
    if t.device == device:
        return None
    if t.device.type != "cpu":
        _fail(op, f"{what} is on {t.device} but the op runs on {device}")
    # straight from the tensor's memory, as native's read_host_scalar (Tensor.tolist() / item()
    # would be flagged as device reads by the tests' NoHostSync guard, which cannot tell them apart)
    flat = t.detach().reshape(-1)
    ctype = ctypes.c_double if flat.dtype == torch.float64 else ctypes.c_float
    step = flat.stride(0) * flat.element_size() if flat.numel() > 1 else 0
    return [float(ctype.from_address(flat.data_ptr() + i * step).value) for i in range(flat.numel())]


def _check_rates_args(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min, s_max, eps,
                      found_inf, ref_state=None, ref_momentum=0.99) -> None:
    """The checks of csrc/common/optim_host.h's check_rates_args."""
    op = _RATES
    if d.dim() != 1 or not d.is_floating_point():
        _fail(op, f"discrepancies must be a 1-D floating tensor (K,), got shape {tuple(d.shape)} and dtype {d.dtype}")
    K = d.shape[0]
    if state.dim() != 1 or state.shape[0] != K:
        _fail(op, f"state must have shape ({K},) like the discrepancies, got {tuple(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        _fail(op, f"state has dtype {state.dtype}; expected float32 or float64")
    if state.device != d.device:
        _fail(op, f"state is on {state.device} but the discrepancies are on {d.device}")
    if nonfinite is not None:
        if nonfinite.numel() != 1 or nonfinite.dtype != torch.int64:
            _fail(op, f"nonfinite must be a one-element int64 tensor, got shape {tuple(nonfinite.shape)} and "
                      f"dtype {nonfinite.dtype}")
        if nonfinite.device != d.device:
            _fail(op, f"nonfinite is on {nonfinite.device} but the discrepancies are on {d.device}")
    if base_lr_tensor is not None:
        t = base_lr_tensor
        if not (t.numel() == 1 or (t.dim() == 1 and t.shape[0] == K)):
            _fail(op, f"base_lr must be a 0-dim tensor or have shape ({K},), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            _fail(op, f"base_lr tensor has dtype {t.dtype}; expected float32 or float64")
        if t.device != d.device and t.device.type != "cpu":
            _fail(op, f"base_lr tensor is on {t.device} but the discrepancies are on {d.device}")
    elif len(base_lr) not in (1, K):
        _fail(op, f"base_lr must hold 1 or K={K} values, got {len(base_lr)}")
    if not 0.0 <= momentum < 1.0:
        _fail(op, f"momentum must lie in [0, 1), got {momentum}")
    if not (gamma >= 0.0 and math.isfinite(gamma)):
        _fail(op, f"gamma must be finite and >= 0, got {gamma}")
    if not s_min <= s_max:  # (False for a NaN bound too)
        _fail(op, f"need s_min <= s_max, got s_min={s_min}, s_max={s_max}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        _fail(op, f"eps must be finite and >= 0, got {eps}")
    if K > 65536:
        _fail(op, f"K={K} layers exceeds the single-program limit 65536")
    _check_found_inf(op, found_inf, d.device)
    if ref_state is not None:
        r = ref_state
        if r.dim() != 2 or tuple(r.shape) != (2, K):
            _fail(op, f"ref_state must have shape (2, {K}) (running mean; accumulated weight) for K={K} "
                      f"discrepancies, got {tuple(r.shape)}")
        if r.dtype != state.dtype:
            _fail(op, f"ref_state has dtype {r.dtype} but state has dtype {state.dtype}; they must match")
        if r.device != d.device:
            _fail(op, f"ref_state is on {r.device} but the discrepancies are on {d.device}")
        if not 0.0 <= ref_momentum < 1.0:
            _fail(op, f"ref_momentum must lie in [0, 1), got {ref_momentum}")


def _rates(d, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min, s_max, eps, found_inf,
           ref_state=None, ref_momentum=0.99):
    K = d.shape[0]
    device = state.device
    eta = torch.empty(K, dtype=state.dtype, device=device)
    if K == 0:
        return eta
    host_lr = list(base_lr)
    lr_ptr, lr_stride, from_ptr = eta, 0, False
    if base_lr_tensor is not None:
        values = _host_values(base_lr_tensor, device, _RATES, "the base_lr tensor")
        per_layer = base_lr_tensor.numel() != 1 or (base_lr_tensor.dim() == 1 and K == 1)
        if values is None:  # read on the device
            lr_ptr, lr_stride, from_ptr = base_lr_tensor.reshape(-1), (1 if per_layer else 0), True
        else:
            host_lr = values
    if len(host_lr) == K and K > 1 and not from_ptr:
        lr_ptr, lr_stride, from_ptr = _as_table(host_lr, torch.float64, device), 1, True
    scalar_lr = float(host_lr[0]) if host_lr else 1.0
    gamma_mode = 0 if gamma == 0.0 else (1 if gamma == 1.0 else 2)
    nf = nonfinite if nonfinite is not None else eta
    prm = _as_table([scalar_lr, momentum, gamma, s_min, s_max, eps, ref_momentum], torch.float64, device)
    ref = ref_state if ref_state is not None else state
    with _quiet():
        _common.launch(
            _rates_kernel, (1,),
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
# Tables of one call: ptr_table (int64, per tensor: addresses of parameter, gradient, state1-3 and
# step count, 0 where unused), numel / group / fresh tables (per tensor), task_table (int32 pairs
# (tensor, chunk), per dtype), glayer_table (per group) and gfloat_table (float64, per group: base
# lr and the six hyper-parameters).


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
        # IEEE square root and divisions, as CUDA C++ compiles csrc/common/optim_math.h (and
        # torch its AdamW kernels): tl.sqrt and / would be approximate in float32
        denom = div_rn(sqrt_rn(vv), c_bc2) + c_eps
        p = p - c_step * div_rn(m, denom)
        _store_op(p_addr, offs, p, mask, DT)
        _store_op(m_addr, offs, m, mask, DT)
        _store_op(v_addr, offs, v, mask, DT)
        _store_op(w_addr, offs, vmax_new, mask & ams, DT)


def _as_table(rows, dtype, device) -> torch.Tensor:
    """A host list as a tensor on ``device``: pinned memory and a copy that does not wait."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type != "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


@torch.library.custom_op("lwkd_triton::layerwise_sgd_step", mutates_args=("params", "momentum_buffer"))
def layerwise_sgd_step(params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffer: List[torch.Tensor],
                       factors: torch.Tensor, tensor_group: List[int], fresh: List[int], group_layer: List[int],
                       group_lr: List[float], group_lr_tensor: List[Optional[torch.Tensor]],
                       weight_decay: List[float], momentum: List[float], dampening: List[float],
                       nesterov: List[bool], maximize: List[bool], found_inf: Optional[torch.Tensor] = None) -> None:
    """Triton implementation of ``lwkd::layerwise_sgd_step`` (same arguments and checks; see csrc/ops.cpp)."""
    hyper = (("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening),
             ("nesterov", nesterov), ("maximize", maximize))
    plan = _StepPlan(_SGD_OP, params, grads, (momentum_buffer, [], [], []), factors, tensor_group, fresh,
                     group_layer, group_lr, group_lr_tensor, hyper, found_inf)
    with on_device(factors.device, _SGD_OP):
        plan.run()


@torch.library.custom_op("lwkd_triton::layerwise_adamw_step",
                         mutates_args=("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"))
def layerwise_adamw_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avg: List[torch.Tensor],
                         exp_avg_sq: List[torch.Tensor], max_exp_avg_sq: List[torch.Tensor],
                         steps: List[torch.Tensor], factors: torch.Tensor, tensor_group: List[int],
                         group_layer: List[int], group_lr: List[float],
                         group_lr_tensor: List[Optional[torch.Tensor]], weight_decay: List[float],
                         beta1: List[float], beta2: List[float], eps: List[float], amsgrad: List[bool],
                         maximize: List[bool], found_inf: Optional[torch.Tensor] = None) -> None:
    """Triton implementation of ``lwkd::layerwise_adamw_step`` (same arguments and checks; see csrc/ops.cpp)."""
    hyper = (("weight_decay", weight_decay), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
             ("amsgrad", amsgrad), ("maximize", maximize))
    plan = _StepPlan(_ADAMW_OP, params, grads, (exp_avg, exp_avg_sq, max_exp_avg_sq, steps), factors,
                     tensor_group, [], group_layer, group_lr, group_lr_tensor, hyper, found_inf)
    with on_device(factors.device, _ADAMW_OP):
        plan.run()


def _pack_hyper(op: str, G: int, named) -> List[List[float]]:
    """The kernel's per-group record from the op's named lists (``(name, values)`` in the order of
    csrc/common/optim_math.h's kSgd* / kAdam* indices; booleans as 1.0 / 0.0, unused slots 0.0)."""
    for name, values in named:
        if len(values) != G:
            _fail(op, f"{name} must hold one value per group ({G}), got {len(values)}")
    rows = [[float(values[k]) for _, values in named] for k in range(G)]
    return [row + [0.0] * (_HYPER - len(row)) for row in rows]


class _StepPlan:
    """The checked work list of one step call -- the checks of csrc/common/optim_host.h's
    make_sgd_step_plan / make_adamw_step_plan, so that the kernel never addresses memory a tensor
    does not own -- and its launch.  ``states``: (s1, s2, s3, steps) -- SGD's momentum buffers and
    three empty lists, or AdamW's exp_avg, exp_avg_sq, max_exp_avg_sq and step counts."""

    def __init__(self, op, params, grads, states, factors, tensor_group, fresh, group_layer, group_lr,
                 group_lr_tensor, hyper, found_inf):
        self.op, self.sgd = op, op == _SGD_OP
        self.params, self.steps, self.factors, self.found_inf = params, states[3], factors, found_inf
        self.device = factors.device
        self._check_lists(params, grads, tensor_group, group_layer, group_lr, group_lr_tensor)
        self.hyper = _pack_hyper(op, len(group_layer), hyper)
        self._check_factors(group_layer)
        _check_found_inf(op, found_inf, self.device)
        self.group_lr = self._group_rates(group_layer, group_lr, group_lr_tensor)
        self.group_layer = [int(x) for x in group_layer]
        self._check_state_lists(len(params), *states)
        fresh_set = self._check_fresh(fresh, len(params))
        self.rows, self.numels, self.tgroups, self.fresh_flags = [], [], [], []
        self.keep_alive = []  # gradient copies made to match a parameter's layout (live until the launch)
        for i, (p, g) in enumerate(zip(params, grads)):
            self._add_tensor(i, p, g, int(tensor_group[i]), i in fresh_set, *states)

    def _check_lists(self, params, grads, tensor_group, group_layer, group_lr, group_lr_tensor):
        N, G = len(params), len(group_layer)
        if len(grads) != N or len(tensor_group) != N:
            _fail(self.op, f"{N} params but {len(grads)} grads and {len(tensor_group)} tensor_group entries")
        if len(group_lr) != G or len(group_lr_tensor) not in (0, G):
            _fail(self.op, f"{G} groups (group_layer) but {len(group_lr)} group_lr values and "
                           f"{len(group_lr_tensor)} group_lr_tensor entries")

    def _check_factors(self, group_layer):
        f = self.factors
        if f.dim() != 1 or f.dtype not in (torch.float32, torch.float64) or not f.is_contiguous():
            _fail(self.op, f"factors must be a contiguous 1-D float32 or float64 tensor (K,), got shape "
                           f"{tuple(f.shape)}, dtype {f.dtype}, strides {f.stride()}")
        K = f.shape[0]
        for k, layer in enumerate(group_layer):
            if not -1 <= layer < K:
                _fail(self.op, f"group {k} has layer {layer} but the factor vector has K={K} entries "
                               "(use -1 for the head group)")

    def _group_rates(self, group_layer, group_lr, group_lr_tensor):
        """Base rate of each group as a host float, or None where the kernel reads a 0-dim device
        tensor (gathered into the group table on the device, see run()); a CPU tensor beside
        device parameters is read on the host.  Also checks SGD's nesterov condition per group."""
        rates = []
        self.device_lr = []  # (group, tensor) read on the device
        for k in range(len(group_layer)):
            h = self.hyper[k]
            if self.sgd and h[3] != 0.0 and (h[1] <= 0.0 or h[2] != 0.0):
                _fail(self.op, f"group {k}: nesterov needs momentum > 0 and dampening = 0")
            t = group_lr_tensor[k] if group_lr_tensor else None
            rate = float(group_lr[k])
            if t is not None:
                if t.numel() != 1 or t.dtype not in (torch.float32, torch.float64):
                    _fail(self.op, f"group {k}: lr tensor must be one float32 or float64 element, got shape "
                                    f"{tuple(t.shape)} and dtype {t.dtype}")
                values = _host_values(t, self.device, self.op, f"group {k}'s lr tensor")
                if values is None:
                    self.device_lr.append((k, t))
                else:
                    rate = values[0]
            rates.append(rate)
        return rates

    def _check_state_lists(self, N, state1, state2, state3, steps):
        any_mom = any(h[1] != 0.0 for h in self.hyper)
        any_ams = any(h[4] != 0.0 for h in self.hyper)
        if self.sgd:
            if not (len(state1) == N or (len(state1) == 0 and not any_mom)):
                _fail(self.op, f"SGD with momentum needs one momentum buffer per parameter ({N}), got {len(state1)}")
        else:
            if not (len(state1) == N and len(state2) == N and len(steps) == N):
                _fail(self.op, f"AdamW needs exp_avg, exp_avg_sq and step for every parameter ({N}), got "
                                f"{len(state1)}, {len(state2)} and {len(steps)}")
            if not (len(state3) == N or (len(state3) == 0 and not any_ams)):
                _fail(self.op, f"AdamW with amsgrad needs max_exp_avg_sq for every parameter ({N}), got {len(state3)}")

    def _check_fresh(self, fresh, N):
        for i in fresh:
            if not 0 <= i < N:
                _fail(self.op, f"fresh index {i} out of range for {N} params")
        return set(int(i) for i in fresh)

    def _add_tensor(self, i, p, g, gi, is_fresh, state1, state2, state3, steps):
        G = len(self.group_layer)
        if not 0 <= gi < G:
            _fail(self.op, f"tensor_group[{i}] = {gi} is not a group index ({G} groups)")
        if p.dtype not in _DTYPE_CODE:
            _fail(self.op, f"params[{i}] has dtype {p.dtype}; expected float32, float64, bfloat16 or float16")
        if p.device != self.device:
            _fail(self.op, f"params[{i}] is on {p.device} but the factor vector is on {self.device}")
        if not is_dense(p):
            _fail(self.op, f"params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) is not dense; the fused "
                            "step updates dense parameters")
        if g.layout != torch.strided:
            _fail(self.op, f"grads[{i}] is sparse; the fused step needs dense gradients")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            _fail(self.op, f"grads[{i}] has shape {tuple(g.shape)}, dtype {g.dtype} on {g.device} but params[{i}] "
                            f"has shape {tuple(p.shape)}, dtype {p.dtype} on {p.device}")
        if not (is_dense(g) and same_layout(g, p)):
            g = torch.empty_like(p).copy_(g)  # one copy into the parameter's memory order
            self.keep_alive.append(g)
        h = self.hyper[gi]
        s1 = s2 = s3 = st = None
        if self.sgd:
            if h[1] != 0.0:
                s1 = _state_like(self.op, state1[i], p, i, "momentum_buffers")
            elif is_fresh:
                _fail(self.op, f"fresh index {i} names a parameter whose group has no momentum")
        else:
            s1 = _state_like(self.op, state1[i], p, i, "exp_avgs")
            s2 = _state_like(self.op, state2[i], p, i, "exp_avg_sqs")
            if h[4] != 0.0:
                s3 = _state_like(self.op, state3[i], p, i, "max_exp_avg_sqs")
            st = steps[i]
            if st.numel() != 1 or st.dtype != torch.float32:
                _fail(self.op, f"steps[{i}] must be a one-element float32 tensor, got shape {tuple(st.shape)} and "
                                f"dtype {st.dtype}")
            if st.device != p.device:
                _fail(self.op, f"steps[{i}] is on {st.device} but params[{i}] is on {p.device} (the step count "
                                "lives on the device)")
        self.rows.append([p.data_ptr(), g.data_ptr()] + [0 if x is None else x.data_ptr() for x in (s1, s2, s3, st)])
        self.numels.append(p.numel())
        self.tgroups.append(gi)
        self.fresh_flags.append(1 if is_fresh else 0)

    def run(self) -> None:
        if not self.params:
            return
        device, factors, found_inf = self.device, self.factors, self.found_inf
        gtable = _as_table([[lr] + h for lr, h in zip(self.group_lr, self.hyper)], torch.float64, device)
        if self.device_lr:  # 0-dim device rates: gathered into the table on the device, no host read
            idx = _as_table([k for k, _ in self.device_lr], torch.int64, device)
            vals = torch.stack([t.detach().reshape(()).to(torch.float64) for _, t in self.device_lr])
            gtable[:, 0].index_copy_(0, idx, vals)
        glayer = _as_table(self.group_layer, torch.int64, device)
        ptr_table = _as_table(self.rows, torch.int64, device)
        numel_table = _as_table(self.numels, torch.int64, device)
        tgroup_table = _as_table(self.tgroups, torch.int64, device)
        fresh_table = _as_table(self.fresh_flags, torch.int64, device)
        if not self.sgd:  # the step counts advance even when every tensor is empty (as torch.optim)
            if found_inf is None:
                torch._foreach_add_(list(self.steps), 1.0)
            else:  # + 1.0 or + 0.0 (exact either way), decided on the device
                torch._foreach_add_(list(self.steps), (found_inf.reshape(()) == 0).to(torch.float32))
        # K = 0 (head groups only): an empty tensor has no address to hand the kernel; the masked
        # load never reads this stand-in
        fac = factors if factors.numel() else torch.ones(1, dtype=factors.dtype, device=device)
        for dt, code in _DTYPE_CODE.items():
            tasks = [(i, c) for i, p in enumerate(self.params) if p.dtype == dt
                     for c in range(triton.cdiv(p.numel(), _STEP_BLOCK))]
            if not tasks:
                continue
            task_table = _as_table([x for pair in tasks for x in pair], torch.int32, device)
            with _quiet():
                _common.launch(
                    _step_kernel, (len(tasks),),
                    ptr_table, numel_table, tgroup_table, fresh_table, task_table, glayer, gtable, fac,
                    found_inf if found_inf is not None else fac,
                    ALGO=0 if self.sgd else 1, DT=code, FAC_F64=factors.dtype == torch.float64,
                    HAS_FI=found_inf is not None, BLOCK=_STEP_BLOCK, num_warps=_STEP_WARPS,
                )


def _state_like(op: str, s: torch.Tensor, p: torch.Tensor, i: int, name: str) -> torch.Tensor:
    """A state tensor shares its parameter's shape, dtype, device and memory order (the kernel
    walks it by the parameter's element offsets), as native's check_state_like demands."""
    if s.shape != p.shape:
        _fail(op, f"{name}[{i}] has shape {tuple(s.shape)} but params[{i}] has shape {tuple(p.shape)}")
    if s.dtype != p.dtype:
        _fail(op, f"{name}[{i}] has dtype {s.dtype} but params[{i}] has dtype {p.dtype}")
    if s.device != p.device:
        _fail(op, f"{name}[{i}] is on {s.device} but params[{i}] is on {p.device}")
    if not (is_dense(s) and same_layout(s, p)):
        _fail(op, f"{name}[{i}] (strides {s.stride()}) must have the memory layout of params[{i}] "
                   f"(strides {p.stride()})")
    return s


@layerwise_sgd_step.register_fake
def _(params, grads, momentum_buffer, factors, tensor_group, fresh, group_layer, group_lr, group_lr_tensor,
      weight_decay, momentum, dampening, nesterov, maximize, found_inf=None):
    return None


@layerwise_adamw_step.register_fake
def _(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, factors, tensor_group, group_layer, group_lr,
      group_lr_tensor, weight_decay, beta1, beta2, eps, amsgrad, maximize, found_inf=None):
    return None
