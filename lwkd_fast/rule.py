"""The per-layer learning-rate rule (SPEC section 4).

For discrepancies ``D`` (K,), momentum factors ``m`` (K,) (the *state*, starting at 1) and the
base rate ``eta0`` (a float, or a 0-dim tensor driven by a schedule)::

    V     = { j : D_j finite and D_j >= 0 }                       (usable discrepancies)
    x_j   = D_j                                                    (rate_normalize="none")
    x_j   = D_j / R_j  (1 while R_j = 0)                           (rate_normalize="running")
            with R_j = a_j / w_j after  a_j <- rho a_j + (1 - rho) D_j,  w_j <- rho w_j + (1 - rho)
    r_j   = |V| * x_j / sum_{k in V} x_k      if that sum > eps, else 1      (j in V)
    s_j   = clamp(r_j ** gamma, s_min, s_max)                                (j in V)
    m_j  <- mu * m_j + (1 - mu) * s_j                                        (j in V)
    eta_j = eta0 * m_j

``"none"``: layers that disagree most with the teacher learn fastest.  ``"running"``: each layer
is measured against its own history first (``R_j``, the bias-corrected running mean of its own
usable D, kept in the *reference state* ``ref_state`` (2, K): row 0 the moving averages ``a``,
row 1 the accumulated weights ``w = 1 - rho^n``, zeros at the start), so the rates do not depend
on a layer's scale: multiplying a layer's D by a constant at every step changes no rate, and
``r_j > 1`` means "this layer disagrees more than it used to, relative to the others".

The momentum ``mu`` keeps a rate from collapsing in one step; an unusable discrepancy (non-finite
or negative) leaves its layer's factor and reference exactly unchanged and is counted in an
optional on-device counter.  Everything stays on the device: no backend reads a value back to the
host, so the rule never synchronises.

Skipped steps: with ``found_inf`` (a 0-dim float32 tensor on the state's device, e.g. "the loss
was not finite") nonzero, nothing is updated -- ``m``, the reference and the counter keep their
values bit for bit -- and the result is ``eta = eta0 * m`` with the unchanged ``m``.  The flag is
read by the kernels on the device (apex's device-side skip flag), never on the host.

Backends (``lwkd_fast.use_backend`` / ``LWKD_BACKEND``, op name ``"layerwise_rates"``):
``reference`` (plain torch ops, below), ``native`` (``torch.ops.lwkd.layerwise_rates``, C++ on
CPU, one CUDA block on GPU) and ``triton`` (:mod:`lwkd_fast.triton.optim`).  All of them run
the arithmetic in float64 in the order of csrc/common/optim_math.h and round once into the dtype
of ``state``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from . import ops

__all__ = ["layerwise_rates", "reference_rates", "new_reference_state", "RATE_NORMALIZE"]

OP = "layerwise_rates"

Number = Union[int, float]

RATE_NORMALIZE = ("none", "running")
DEFAULT_REF_MOMENTUM = 0.99


def new_reference_state(K: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The initial reference state of ``rate_normalize="running"``: zeros of shape (2, K)."""
    return torch.zeros(2, K, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Reference backend: plain torch ops on the device, float64 arithmetic, one rounding into state
# ------------------------------------------------------------------------------------------------


def reference_rates(
    discrepancies: torch.Tensor,
    state: torch.Tensor,
    nonfinite: Optional[torch.Tensor],
    base_lr: Sequence[float],
    base_lr_tensor: Optional[torch.Tensor],
    momentum: float,
    gamma: float,
    s_min: float,
    s_max: float,
    eps: float,
    found_inf: Optional[torch.Tensor] = None,
    ref_state: Optional[torch.Tensor] = None,
    ref_momentum: float = DEFAULT_REF_MOMENTUM,
) -> torch.Tensor:
    """The rule in plain torch; same arguments as ``torch.ops.lwkd.layerwise_rates``.

    ``base_lr`` holds 1 or K host values and is used when ``base_lr_tensor`` (0-dim or (K,)) is
    None.  Updates ``state``, ``ref_state`` (when given: normalize "running") and ``nonfinite``
    in place and returns ``eta`` in ``state.dtype``.  With ``found_inf`` nonzero (decided on the
    device with ``torch.where``) they keep their values and ``eta`` is computed from the
    unchanged state.
    """
    K = discrepancies.shape[0]
    if K == 0:
        return torch.empty_like(state, memory_format=torch.contiguous_format)
    d = discrepancies.detach().to(torch.float64)
    ok = torch.isfinite(d) & (d >= 0)  # usable (NaN fails d >= 0)
    dz = torch.where(ok, d, torch.zeros_like(d))
    skip = None if found_inf is None else found_inf.detach().reshape(()) != 0
    keep = ~ok if skip is None else (~ok) | skip  # entries whose state must not change
    if ref_state is not None:
        old = ref_state.detach().to(torch.float64)  # (exact: also what a kept entry restores)
        a = ref_momentum * old[0] + (1.0 - ref_momentum) * dz
        w = ref_momentum * old[1] + (1.0 - ref_momentum)
        R = a / w
        # the division is evaluated everywhere; torch.where keeps only the branch the rule takes
        x = torch.where(ok, torch.where(R > 0, dz / R, torch.ones_like(dz)), torch.zeros_like(dz))
        ref_state.copy_(torch.where(keep, old, torch.stack([a, w])))
    else:
        x = dz
    total = x.sum()
    count = ok.sum().to(torch.float64)
    r = torch.where(total > eps, count * x / total, torch.ones_like(x))
    if gamma == 1.0:
        s = r
    elif gamma == 0.0:
        s = torch.ones_like(r)
    else:
        s = r.pow(gamma)
    s = s.clamp(min=s_min, max=s_max)
    m = state.detach().to(torch.float64)  # (exact: also the saved copy a kept entry restores)
    state.copy_(torch.where(keep, m, momentum * m + (1.0 - momentum) * s))
    mq = state.detach().to(torch.float64)  # the rounded factors, as the kernels use them
    if base_lr_tensor is not None:
        lr = base_lr_tensor.detach().to(device=mq.device, dtype=torch.float64, non_blocking=True).reshape(-1)
        eta = mq * (lr if lr.numel() == K else lr[0])
    elif len(base_lr) == 1:
        eta = mq * float(base_lr[0])
    else:
        eta = mq * torch.tensor(list(base_lr), dtype=torch.float64).to(mq.device, non_blocking=True)
    if nonfinite is not None:
        bad = (~ok).any()
        if skip is not None:
            bad = bad & ~skip
        nonfinite.add_(bad.to(nonfinite.dtype).reshape(nonfinite.shape))
    return eta.to(state.dtype).contiguous()


# ------------------------------------------------------------------------------------------------
# Validation and the public function
# ------------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor):
    return tuple(x.shape)


def check_rule_options(op: str, momentum, gamma, s_min, s_max, eps, *, momentum_name="momentum",
                       rate_normalize="none", ref_momentum=DEFAULT_REF_MOMENTUM,
                       ref_momentum_name="ref_momentum") -> None:
    """Validate the rule's hyper-parameters (host numbers), raising with the argument name."""
    if not isinstance(rate_normalize, str) or rate_normalize not in RATE_NORMALIZE:
        raise ValueError(f"{op}: rate_normalize must be one of {', '.join(map(repr, RATE_NORMALIZE))}, "
                         f"got {rate_normalize!r}")
    for name, v in ((momentum_name, momentum), ("gamma", gamma), ("s_min", s_min), ("s_max", s_max), ("eps", eps),
                    (ref_momentum_name, ref_momentum)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: {name} must be a Python number, got {type(v).__name__}")
        if math.isnan(v):
            raise ValueError(f"{op}: {name} is NaN")
    for name, v in ((momentum_name, momentum), (ref_momentum_name, ref_momentum)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{op}: {name} must lie in [0, 1), got {v!r}")
    if not (0.0 <= gamma < math.inf):
        raise ValueError(f"{op}: gamma must be finite and >= 0, got {gamma!r}")
    if not s_min <= s_max:
        raise ValueError(f"{op}: need s_min <= s_max, got s_min={s_min!r}, s_max={s_max!r}")
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps!r}")


def check_discrepancies(op: str, d, K: Optional[int], device: Optional[torch.device]) -> torch.Tensor:
    """``discrepancies`` must be a floating (K,) tensor on ``device``; returns it detached."""
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"{op}: discrepancies must be a torch.Tensor of shape (K,), got {type(d).__name__}")
    if d.dim() != 1 or (K is not None and d.shape[0] != K):
        want = f"({K},)" if K is not None else "(K,)"
        raise ValueError(f"{op}: discrepancies must have shape {want}, got shape {_shape(d)}")
    if not d.is_floating_point():
        raise TypeError(f"{op}: discrepancies has dtype {d.dtype}; expected a floating dtype (float32 or float64)")
    if device is not None and d.device != device:
        raise ValueError(
            f"{op}: discrepancies (shape {_shape(d)}) are on {d.device} but the rate state is on {device}; "
            "compute them on the parameters' device"
        )
    return d.detach()


def check_found_inf(op: str, found_inf, device: torch.device,
                    what: str = "the optimizer state") -> Optional[torch.Tensor]:
    """``found_inf`` must be None or a 0-dim (or one-element) float32 tensor on ``device``;
    returns it as a 0-dim detached tensor (a view: no copy, no host read)."""
    if found_inf is None:
        return None
    if not isinstance(found_inf, torch.Tensor):
        raise TypeError(f"{op}: found_inf must be None or a 0-dim float32 tensor, got {type(found_inf).__name__}")
    if found_inf.numel() != 1 or found_inf.dim() > 1:
        raise ValueError(f"{op}: found_inf must be a 0-dim tensor (one flag for the whole step), "
                         f"got shape {_shape(found_inf)}")
    if found_inf.dtype != torch.float32:
        raise TypeError(f"{op}: found_inf (shape {_shape(found_inf)}) has dtype {found_inf.dtype}; expected "
                        "torch.float32 (e.g. (~torch.isfinite(loss)).float())")
    if found_inf.device != device:
        raise ValueError(f"{op}: found_inf (shape {_shape(found_inf)}) is on {found_inf.device} but {what} is on "
                         f"{device}; keep the flag on the device (no host copy)")
    return found_inf.detach().reshape(())


def check_reference_state(op: str, ref_state, state: torch.Tensor, rate_normalize: str,
                          what: str = "ref_state") -> Optional[torch.Tensor]:
    """``ref_state`` must be given exactly for ``rate_normalize="running"``: a (2, K) tensor with
    the dtype and device of ``state``; returns it (or None for ``"none"``)."""
    if rate_normalize == "none":
        if ref_state is not None:
            raise ValueError(f"{op}: {what} is only used with rate_normalize='running' (got rate_normalize='none')")
        return None
    K = state.shape[0]
    if ref_state is None:
        raise ValueError(f"{op}: rate_normalize='running' needs {what}, the (2, {K}) running reference "
                         f"(start it with lwkd_fast.rule.new_reference_state({K}) and keep passing the same tensor)")
    if not isinstance(ref_state, torch.Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor of shape (2, {K}), got {type(ref_state).__name__}")
    if ref_state.shape != (2, K):
        raise ValueError(f"{op}: {what} has shape {_shape(ref_state)} but state has shape {_shape(state)}; "
                         f"expected (2, {K}) (running mean; accumulated weight)")
    if ref_state.dtype != state.dtype:
        raise TypeError(f"{op}: {what} (shape {_shape(ref_state)}) has dtype {ref_state.dtype} but state has dtype "
                        f"{state.dtype}; they must match")
    if ref_state.device != state.device:
        raise ValueError(f"{op}: {what} (shape {_shape(ref_state)}) is on {ref_state.device} but state is on "
                         f"{state.device}")
    return ref_state


def _backend_call(backend: str, d, state, nonfinite, base_lr: List[float], base_lr_tensor, momentum, gamma,
                  s_min, s_max, eps, found_inf=None, ref_state=None,
                  ref_momentum: float = DEFAULT_REF_MOMENTUM) -> torch.Tensor:
    args = (d, state, nonfinite, base_lr, base_lr_tensor, float(momentum), float(gamma), float(s_min),
            float(s_max), float(eps))
    if found_inf is not None or ref_state is not None:
        args = args + (found_inf,)
    if ref_state is not None:
        args = args + (ref_state, float(ref_momentum))
    return ops.run_op(backend, OP, *args)


def layerwise_rates(
    discrepancies: torch.Tensor,
    state: torch.Tensor,
    base_lr: Union[Number, torch.Tensor],
    *,
    momentum: float = 0.9,
    gamma: float = 1.0,
    s_min: float = 0.1,
    s_max: float = 10.0,
    eps: float = 1e-12,
    nonfinite: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    rate_normalize: str = "none",
    ref_state: Optional[torch.Tensor] = None,
    ref_momentum: float = DEFAULT_REF_MOMENTUM,
) -> torch.Tensor:
    """Per-layer learning rates ``eta = base_lr * m`` from discrepancies (SPEC section 4).

    Args:
        discrepancies: (K,) floating tensor ``D`` (``D_j >= 0``); unusable entries (non-finite or
            negative) leave their layer's factor and reference unchanged and are counted.
        state: (K,) float32/float64 tensor of momentum factors ``m`` on the same device, updated
            in place (initialise it with ``torch.ones(K)``).
        base_lr: the base rate ``eta0``: a Python number, or a 0-dim tensor (e.g. one a
            schedule writes into) on the same device or the CPU.  It is read on the device.
        momentum: ``mu`` in [0, 1).
        gamma: exponent ``>= 0`` applied to the normalised discrepancy.
        s_min, s_max: clamp of the target factor, ``s_min <= s_max``.
        eps: the normalising sum must exceed ``eps``, otherwise every finite layer targets 1.
        nonfinite: optional one-element int64 tensor on the same device, incremented (on the
            device) whenever any discrepancy is unusable (non-finite or negative).
        found_inf: optional 0-dim float32 tensor on the same device; when it is nonzero the step
            is skipped on the device: ``state``, ``ref_state`` and ``nonfinite`` keep their values
            and the result is ``base_lr * state``.  None costs nothing.
        rate_normalize: ``"none"`` (the rule on D itself) or ``"running"`` (each D_j divided by its
            layer's bias-corrected running mean first: scale-invariant rates).
        ref_state: with ``"running"``, the (2, K) reference state (dtype and device of ``state``,
            start it with :func:`new_reference_state`), updated in place; None with ``"none"``.
        ref_momentum: ``rho`` in [0, 1), the decay of the running mean (``"running"`` only).

    Returns:
        ``eta`` (K,) in ``state.dtype``.  No host synchronisation happens on any backend.
    """
    op = "layerwise_rates"
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{op}: state must be a torch.Tensor of shape (K,), got {type(state).__name__}")
    if state.dim() != 1:
        raise ValueError(f"{op}: state must be 1-D (K,), got shape {_shape(state)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: state has dtype {state.dtype}; expected float32 or float64")
    K = state.shape[0]
    if not isinstance(discrepancies, torch.Tensor):
        raise TypeError(f"{op}: discrepancies must be a torch.Tensor of shape (K,), got {type(discrepancies).__name__}")
    if discrepancies.dim() != 1 or discrepancies.shape[0] != K:
        raise ValueError(
            f"{op}: discrepancies has shape {_shape(discrepancies)} but state has shape {_shape(state)}; "
            "both must be (K,) with one entry per matched layer"
        )
    d = check_discrepancies(op, discrepancies, K, state.device)
    check_rule_options(op, momentum, gamma, s_min, s_max, eps, rate_normalize=rate_normalize,
                       ref_momentum=ref_momentum)
    ref = check_reference_state(op, ref_state, state, rate_normalize)
    lr_list: List[float] = [1.0]
    lr_tensor: Optional[torch.Tensor] = None
    if isinstance(base_lr, torch.Tensor):
        if base_lr.numel() != 1 or base_lr.dim() > 1:
            raise ValueError(f"{op}: base_lr must be a number or a 0-dim tensor, got a tensor of shape {_shape(base_lr)}")
        if not base_lr.is_floating_point():
            raise TypeError(f"{op}: base_lr tensor has dtype {base_lr.dtype}; expected a floating dtype")
        if base_lr.device != state.device and base_lr.device.type != "cpu":
            raise ValueError(f"{op}: base_lr is on {base_lr.device} but state is on {state.device}")
        lr_tensor = base_lr.detach().reshape(())
        if lr_tensor.dtype not in (torch.float32, torch.float64):
            lr_tensor = lr_tensor.to(torch.float32)
    elif isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)):
        raise TypeError(f"{op}: base_lr must be a Python number or a 0-dim tensor, got {type(base_lr).__name__}")
    else:
        lr_list = [float(base_lr)]
    if nonfinite is not None:
        if not isinstance(nonfinite, torch.Tensor) or nonfinite.numel() != 1 or nonfinite.dtype != torch.int64:
            raise TypeError(f"{op}: nonfinite must be a one-element int64 tensor")
        if nonfinite.device != state.device:
            raise ValueError(f"{op}: nonfinite is on {nonfinite.device} but state is on {state.device}")
    fi = check_found_inf(op, found_inf, state.device, "state")
    backend = ops.select_backend(OP, state.device)
    return _backend_call(backend, d, state, nonfinite, lr_list, lr_tensor, momentum, gamma, s_min, s_max, eps, fi,
                         ref, ref_momentum)


# ------------------------------------------------------------------------------------------------
# Float64 oracle (plain Python arithmetic, independent of every backend) and `lwkd-fast check`
# ------------------------------------------------------------------------------------------------


def oracle_rates(d: Sequence[float], m: Sequence[float], base_lr: float, momentum: float, gamma: float,
                 s_min: float, s_max: float, eps: float = 1e-12, *, ref: Optional[List[List[float]]] = None,
                 ref_momentum: float = DEFAULT_REF_MOMENTUM):
    """The SPEC formula evaluated element by element in Python floats: ``(eta, new_m, any_unusable)``.

    ``ref`` (normalize "running"): ``[a, w]``, two lists of K floats, updated in place (the
    values the op would store, before any rounding into the state's dtype)."""
    ok = [math.isfinite(x) and x >= 0.0 for x in d]
    if ref is None:
        xs = [x if f else 0.0 for x, f in zip(d, ok)]
    else:
        a_old, w_old = list(ref[0]), list(ref[1])
        xs = []
        for j, (x, f) in enumerate(zip(d, ok)):
            if not f:
                xs.append(0.0)
                continue
            a = ref_momentum * a_old[j] + (1.0 - ref_momentum) * x
            w = ref_momentum * w_old[j] + (1.0 - ref_momentum)
            R = a / w
            xs.append(x / R if R > 0.0 else 1.0)
            ref[0][j], ref[1][j] = a, w
    total = sum(xs)
    n = sum(ok)
    new_m = []
    for x, mj, f in zip(xs, m, ok):
        if not f:
            new_m.append(mj)
            continue
        r = n * x / total if total > eps else 1.0
        s = min(max(r ** gamma, s_min), s_max)
        new_m.append(momentum * mj + (1.0 - momentum) * s)
    return [base_lr * x for x in new_m], new_m, not all(ok)
