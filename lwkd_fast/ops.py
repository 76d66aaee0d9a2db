"""Operator layer of lwkd_fast: native-library loading, backend selection, fake kernels,
autograd registration, input validation and the public discrepancy functions.

Backends (ARCHITECTURE "Backends and dispatch"):

``reference``  pure torch (:mod:`lwkd_fast.reference`), runs anywhere, autograd through torch;
``native``     the C++/CUDA extension ``lwkd_fast._C`` (``torch.ops.lwkd.*``);
``triton``     Triton kernels (:mod:`lwkd_fast.triton`) for CUDA tensors, or CPU tensors under
               ``TRITON_INTERPRET=1``.

``auto`` (the default) picks native when the extension loaded and has a kernel for the device,
else Triton on CUDA tensors, else the reference, and logs the reason for a fallback once.
``LWKD_BACKEND=reference|native|triton`` or :func:`use_backend` force one backend; a forced
backend that cannot run raises with the reason instead of falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import reference

log = logging.getLogger("lwkd_fast")

# Every backend name; register_native_backend() appends the CUDA execution layer's "cuda_emu".
BACKENDS = ["reference", "native", "triton"]

# ------------------------------------------------------------------------------------------------
# Soft loading of the native library
# ------------------------------------------------------------------------------------------------
#
# _C_STATE is one of
#   "loaded"    the extension is imported and registered torch.ops.lwkd.*;
#   "disabled"  LWKD_DISABLE_NATIVE=1 (the user's choice: no warning);
#   "absent"    it was never built (LWKD_NO_EXT=1): the pure-Python package, as installed;
#   "broken"    it exists but cannot serve this torch (built against another torch, or the import
#               failed): ONE RuntimeWarning with the reason and the fix, then the reference backend.
# _C_ERROR says why it is not loaded; _C_BUILD is what setup.py recorded beside it.


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _build_record() -> Dict[str, object]:
    try:
        from ._build_info import BUILD
    except ImportError:  # built by an older setup.py, or never built
        return {}
    return dict(BUILD)


_C_BUILD = _build_record()


def _rebuild_hint() -> str:
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = src if os.path.exists(os.path.join(src, "setup.py")) else "<the lwkd_fast source tree>"
    return f"pip install --no-build-isolation -e {where}"


def _load_native():
    """(module or None, state, reason)."""
    if _truthy(os.environ.get("LWKD_DISABLE_NATIVE")):
        return None, "disabled", "disabled by LWKD_DISABLE_NATIVE=1"
    if importlib.util.find_spec("lwkd_fast._C") is None:
        return None, "absent", "lwkd_fast._C is not built (installed with LWKD_NO_EXT=1, or the build was skipped)"
    built = _C_BUILD.get("torch")
    if built and built != torch.__version__:  # loading it could fail obscurely, or crash
        return None, "broken", f"it was built against torch {built}, and this is torch {torch.__version__}"
    try:
        return importlib.import_module("lwkd_fast._C"), "loaded", None  # registers torch.ops.lwkd.*
    except Exception as exc:  # noqa: BLE001 - an unloadable library (ImportError, OSError), a failed registration
        return None, "broken", f"{type(exc).__name__}: {exc}"


_C, _C_STATE, _why = _load_native()
_C_ERROR = f"lwkd_fast._C exists but cannot be used: {_why}" if _C_STATE == "broken" else _why
if _C_STATE == "broken":
    warnings.warn(
        f"lwkd_fast: the native extension lwkd_fast._C is not used: {_why}. Every op runs on the slower "
        f"pure-torch reference backend. Fix: rebuild it against this torch with `{_rebuild_hint()}` "
        "(or set LWKD_DISABLE_NATIVE=1 to use the reference backend without this warning).",
        RuntimeWarning,
    )


def _no_cuda_reason() -> str:
    """Why the extension has no CUDA kernels, as far as it is known."""
    if _C_BUILD.get("cuda_skipped"):
        return str(_C_BUILD["cuda_skipped"])
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    return "built without CUDA kernels"


# every op of csrc/ops.cpp that has kernels per device type (not the pool / ISA utilities)
NATIVE_OPS = (
    "attention_discrepancy",
    "attention_discrepancy_backward",
    "map_discrepancy",
    "map_discrepancy_backward",
    "layerwise_rates",
    "layerwise_sgd_step",
    "layerwise_adamw_step",
)


# Backends served by a build of the csrc kernels: backend -> (torch.ops namespace, device types).
# "native" is lwkd_fast._C; the CUDA execution layer (lwkd_fast.cuda_emu) adds "cuda_emu", the
# csrc/cuda kernels compiled for the CPU (torch.ops.lwkd_emu, CPU tensors).
NATIVE_NAMESPACES: Dict[str, Tuple[str, Tuple[str, ...]]] = {"native": ("lwkd", ("cpu", "cuda"))}


def native_ops(backend: str = "native"):
    """The ``torch.ops`` namespace of a native backend (``torch.ops.lwkd`` for ``"native"``)."""
    return getattr(torch.ops, NATIVE_NAMESPACES[backend][0])


def _has_native_kernel(op: str, dispatch_key: str, namespace: str = "lwkd") -> bool:
    if namespace == "lwkd" and _C is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op}", dispatch_key))
    except RuntimeError:  # schema not defined
        return False


def native_kernels() -> Dict[str, List[str]]:
    """``{op: [dispatch keys with a native kernel]}`` for every ``lwkd::`` op."""
    return {op: [k for k in ("CPU", "CUDA") if _has_native_kernel(op, k)] for op in NATIVE_OPS}


# ------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------

_forced_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lwkd_backend", default=None)


def _check_backend_name(name: str, source: str) -> str:
    name = (name or "auto").strip().lower()
    requests = ["auto"] + BACKENDS
    if name not in requests:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(requests)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend (``"reference"``, ``"native"``, ``"triton"`` or ``"auto"``) inside a
    ``with`` block.  Overrides ``LWKD_BACKEND``.  A forced backend that cannot run an op raises."""
    token = _forced_backend.set(_check_backend_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced_backend.reset(token)


def requested_backend() -> str:
    """The backend asked for right now: :func:`use_backend`, else ``LWKD_BACKEND``, else ``auto``."""
    forced = _forced_backend.get()
    if forced is not None:
        return forced
    return _check_backend_name(os.environ.get("LWKD_BACKEND", "auto"), "LWKD_BACKEND")


def _native_status(op: str, device_type: str, backend: str = "native") -> Tuple[bool, str]:
    namespace, devices = NATIVE_NAMESPACES[backend]
    if backend == "native" and _C is None:
        return False, _C_ERROR or "lwkd_fast._C is not loaded"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or device_type not in devices:
        return False, f"no {backend} kernels for device type {device_type!r}"
    if not _has_native_kernel(op, key, namespace):
        if key == "CUDA":
            return False, f"the extension has no CUDA kernel for lwkd::{op} ({_no_cuda_reason()})"
        return False, f"the {backend} library has no {key} kernel for {namespace}::{op}"
    return True, ""


def _triton_status(op: str, device_type: str) -> Tuple[bool, str]:
    try:
        mod = importlib.import_module("lwkd_fast.triton")
    except ModuleNotFoundError as exc:
        if exc.name in ("lwkd_fast.triton", "triton"):
            return False, "the Triton backend is not part of this build"
        raise
    status = getattr(mod, "status", None)
    if status is None:
        return False, "the Triton backend is not part of this build"
    return status(op, device_type)


def backend_status(backend: str, op: str, device_type: str) -> Tuple[bool, str]:
    """``(available, reason)`` of one backend for one op on one device type."""
    if backend == "reference":
        return True, ""
    if backend in NATIVE_NAMESPACES:
        return _native_status(op, device_type, backend)
    if backend == "triton":
        return _triton_status(op, device_type)
    raise ValueError(f"unknown backend {backend!r}")


_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def _auto_choice(op: str, device_type: str) -> str:
    ok, why = _native_status(op, device_type)
    if ok:
        return "native"
    if device_type == "cuda":
        ok_t, why_t = _triton_status(op, device_type)
        if ok_t:
            _log_once(f"lwkd_fast: {op} on cuda uses the Triton backend (native: {why})")
            return "triton"
        why = f"{why}; triton: {why_t}"
    _log_once(f"lwkd_fast: {op} on {device_type} uses the reference backend ({why})")
    return "reference"


# torch.compile treats the automatic choice as a constant of (op, device type), so tracing never
# enters the availability probes.  This is exactly what torch.compiler.assume_constant_result
# does (it sets this marker); calling it would import torch._dynamo -- 1.1 s added to
# `import lwkd_fast`, and triton imported before `lwkd-fast check --interpret` can select the
# interpreter.  tests/test_discrepancy.py::test_compiles_fullgraph guards the mechanism.
_auto_choice._dynamo_marked_constant = True  # type: ignore[attr-defined]
# likewise the request itself (use_backend's ContextVar, LWKD_BACKEND): torch 2.13's dynamo cannot
# trace ContextVar.get, and the request is a constant of the traced region anyway
requested_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def select_backend(op: str, device: torch.device) -> str:
    """The backend that will run ``op`` on ``device`` now (raises if a forced one cannot)."""
    req = requested_backend()
    if req == "auto":
        return _auto_choice(op, device.type)
    ok, why = backend_status(req, op, device.type)
    if not ok:
        raise RuntimeError(f"lwkd_fast: backend {req!r} was forced but cannot run {op} on {device.type}: {why}")
    return req


def backends() -> Dict[str, Dict[str, object]]:
    """What can run here: ``{backend: {"available", "devices", "reason"}}``.

    ``devices`` lists the device types the backend serves for the discrepancy ops;
    ``reason`` says why a backend (or one of its devices) is unavailable.
    """
    cuda_here = torch.cuda.is_available()
    out: Dict[str, Dict[str, object]] = {}
    for b in BACKENDS:
        devices, reasons = [], []
        for dev in ("cpu", "cuda"):
            ok, why = backend_status(b, "attention_discrepancy", dev)
            if ok and dev == "cuda" and not cuda_here:
                ok, why = False, "no GPU visible here" + (" (CUDA kernels are built)" if b == "native" else "")
            if ok:
                devices.append(dev)
            elif why:
                reasons.append(f"{dev}: {why}")
        if b == "reference":
            devices = ["cpu", "cuda"] if cuda_here else ["cpu"]
        out[b] = {"available": bool(devices), "devices": devices, "reason": "; ".join(reasons)}
    out["native"]["kernels"] = native_kernels()
    return out


# ------------------------------------------------------------------------------------------------
# The dispatch table: how each backend runs each op
# ------------------------------------------------------------------------------------------------
#
# Every backend takes an op's arguments as its csrc/ops.cpp schema names them (lists positional,
# options by schema name or position).  A native backend runs torch.ops.<namespace>.<op>; Triton
# and the reference name a function "module:attribute", imported on first use (lwkd_fast.triton
# imports triton only then).  ``result``: the native output that is the op's result (the attention
# forward also returns the maps its backward reuses); None for the whole output.


@dataclass(frozen=True)
class OpRow:
    triton: str
    reference: str
    result: Optional[int] = None


OP_TABLE: Dict[str, OpRow] = {
    "attention_discrepancy": OpRow("lwkd_fast.triton:attention_discrepancy",
                                   "lwkd_fast.reference:attention_discrepancy", result=0),
    "map_discrepancy": OpRow("lwkd_fast.triton:map_discrepancy", "lwkd_fast.reference:map_discrepancy"),
    "layerwise_rates": OpRow("lwkd_fast.triton.optim:layerwise_rates", "lwkd_fast.rule:reference_rates"),
    "layerwise_sgd_step": OpRow("lwkd_fast.triton.optim:layerwise_sgd_step",
                                "lwkd_fast.optim.reference:reference_sgd_step"),
    "layerwise_adamw_step": OpRow("lwkd_fast.triton.optim:layerwise_adamw_step",
                                  "lwkd_fast.optim.reference:reference_adamw_step"),
}


def run_op(backend: str, op: str, *args, **kwargs):
    """``op(*args, **kwargs)`` on ``backend`` (a name :func:`select_backend` returns)."""
    row = OP_TABLE[op]
    if backend in NATIVE_NAMESPACES:
        out = getattr(native_ops(backend), op)(*args, **kwargs)
        return out if row.result is None else out[row.result]
    module, attr = getattr(row, backend).split(":")
    return getattr(importlib.import_module(module), attr)(*args, **kwargs)


def dispatch(op: str, device: torch.device, *args, **kwargs):
    """``op`` on the backend :func:`select_backend` picks for ``device``."""
    return run_op(select_backend(op, device), op, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Native operator libraries (lwkd, and the ones register_native_backend adds); the fake kernels and
# autograd formulas of their ops are in lwkd_fast/registry.py
# ------------------------------------------------------------------------------------------------


_NAMESPACE_HOOKS: List = []


def on_native_namespace(register) -> None:
    """Run ``register(namespace)`` for every native operator library: now for ``lwkd`` (when the
    extension loaded) and later for each one :func:`register_native_backend` adds.  The fake
    kernels and autograd formulas of each op module are registered this way, once per library."""
    _NAMESPACE_HOOKS.append(register)
    for backend, (ns, _devices) in NATIVE_NAMESPACES.items():
        if backend != "native" or _C is not None:
            register(ns)


def register_native_backend(name: str, namespace: str, device_types: Sequence[str]) -> None:
    """Add a backend served by another build of the csrc kernels whose schemas live in
    ``torch.ops.<namespace>`` (used by :mod:`lwkd_fast.cuda_emu`).  It is never chosen by
    ``auto``; :func:`use_backend` selects it."""
    if name in NATIVE_NAMESPACES:
        return
    NATIVE_NAMESPACES[name] = (namespace, tuple(device_types))
    BACKENDS.append(name)
    for register in _NAMESPACE_HOOKS:
        register(namespace)

# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(x: TensorOrList, name: str, op: str) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{op}: {name} must be a tensor or a list/tuple of tensors, got {type(x).__name__}")


def _shape(x: torch.Tensor) -> Tuple[int, ...]:
    return tuple(x.shape)


def _check_choice(op: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: unknown {name} {value!r}; expected one of {', '.join(repr(a) for a in allowed)}")


def _check_float(op: str, name: str, value, *, lo: float, hi: float = math.inf, lo_open: bool = True,
                 hi_open: bool = True) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    bad = (
        not math.isfinite(v)
        or (v <= lo if lo_open else v < lo)
        or (v >= hi if hi_open else v > hi)
    )
    if bad:
        lb = "(" if lo_open else "["
        hb = ")" if hi_open else "]"
        raise ValueError(f"{op}: {name} must lie in {lb}{lo}, {hi}{hb} and be finite, got {value!r}")
    return v


def _check_tensor(op: str, name: str, x, min_dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{op}: {name} has dtype {x.dtype} (shape {_shape(x)}); expected a floating dtype "
            "(float16, bfloat16, float32 or float64)"
        )
    if x.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimensions, got shape {_shape(x)}")


def _check_common(op: str, s: List[torch.Tensor], t: List[torch.Tensor], s_name: str, t_name: str,
                  min_dim: int) -> None:
    """List lengths, tensor types/dtypes, devices and batch sizes (shared by both ops)."""
    if len(s) != len(t):
        raise ValueError(
            f"{op}: got {len(s)} student tensors ({s_name}) but {len(t)} teacher tensors ({t_name}); "
            "pass one tensor per matched layer pair"
        )
    B0 = dev0 = None
    for k, (a, b) in enumerate(zip(s, t)):
        _check_tensor(op, f"{s_name}[{k}]", a, min_dim)
        _check_tensor(op, f"{t_name}[{k}]", b, min_dim)
        if a.device != b.device:
            raise ValueError(
                f"{op}: pair {k}: {s_name}[{k}] is on {a.device} but {t_name}[{k}] is on {b.device} "
                f"(shapes {_shape(a)} and {_shape(b)}); move both to one device"
            )
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"{op}: pair {k}: batch sizes differ: {s_name}[{k}] has shape {_shape(a)} and "
                f"{t_name}[{k}] has shape {_shape(b)}"
            )
        if a.shape[0] == 0:
            raise ValueError(f"{op}: pair {k}: batch size is 0 ({s_name}[{k}] has shape {_shape(a)})")
        if k == 0:
            B0, dev0 = a.shape[0], a.device
        else:
            if a.device != dev0:
                raise ValueError(
                    f"{op}: pair {k} is on {a.device} but pair 0 is on {dev0}; all pairs must share one device"
                )
            if a.shape[0] != B0:
                raise ValueError(
                    f"{op}: pair {k} has batch size {a.shape[0]} (shape {_shape(a)}) but pair 0 has {B0}; "
                    "all pairs must come from one batch"
                )


def _spatial(x: torch.Tensor, cd: int) -> Tuple[int, ...]:
    return tuple(s for d, s in enumerate(x.shape) if d not in (0, cd))


def _check_extent(op: str, name: str, x: torch.Tensor, cd: Optional[int], k: Optional[int] = None) -> None:
    """A non-empty extent (SPEC section 6): a feature tensor needs at least one channel and one
    location (``cd`` its channel dimension), a derivative map at least one element per sample."""
    where = f"pair {k}: " if k is not None else ""
    if cd is None:
        if x[0].numel() == 0:
            raise ValueError(f"{op}: {where}{name} has shape {_shape(x)}, 0 elements per sample; every "
                             "derivative map needs at least one element")
        return
    n = math.prod(_spatial(x, cd))
    if x.shape[cd] == 0 or n == 0:
        raise ValueError(f"{op}: {where}{name} has shape {_shape(x)} ({x.shape[cd]} channels, {n} locations); "
                         "every pair needs at least one channel and one location")


def _pool_to(x: torch.Tensor, cd: int, target: Tuple[int, ...]) -> torch.Tensor:
    if _spatial(x, cd) == target:
        return x
    y = x.movedim(cd, 1)
    n = len(target)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(n)
    if pool is None:  # flatten extra leading spatial dims is not meaningful; pool per axis instead
        raise ValueError(f"resize='pool' supports 1 to 3 spatial dimensions, got {n}")
    return pool(y, target).movedim(1, cd)


def _check_features(op: str, s: List[torch.Tensor], t: List[torch.Tensor], channel_dim: int,
                    resize: Optional[str]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    _check_common(op, s, t, "student_feats", "teacher_feats", min_dim=2)
    out_s, out_t = [], []
    for k, (a, b) in enumerate(zip(s, t)):
        if a.dim() != b.dim():
            raise ValueError(
                f"{op}: pair {k}: student_feats[{k}] has shape {_shape(a)} but teacher_feats[{k}] has "
                f"shape {_shape(b)}; both need the layout (B, C, *S) (or channel_dim={channel_dim})"
            )
        if not -a.dim() <= channel_dim < a.dim() or channel_dim % a.dim() == 0:
            raise ValueError(
                f"{op}: channel_dim={channel_dim} is not a channel dimension of pair {k} (shape {_shape(a)})"
            )
        cd = channel_dim % a.dim()
        _check_extent(op, f"student_feats[{k}]", a, cd, k)
        _check_extent(op, f"teacher_feats[{k}]", b, cd, k)
        Ss, St = _spatial(a, cd), _spatial(b, cd)
        if Ss != St:
            if resize != "pool":
                raise ValueError(
                    f"{op}: pair {k}: spatial sizes differ: student_feats[{k}] has shape {_shape(a)} "
                    f"(spatial {Ss}) and teacher_feats[{k}] has shape {_shape(b)} (spatial {St}); "
                    "pass resize='pool' to adaptive-average-pool the larger map to the smaller size"
                )
            target = tuple(min(x, y) for x, y in zip(Ss, St))
            a, b = _pool_to(a, cd, target), _pool_to(b, cd, target)
        out_s.append(a)
        out_t.append(b)
    return out_s, out_t


def _check_options(op: str, *, metric: str, metrics: Sequence[str], beta, reduction: str, eps,
                   p=None, normalize: str = "sum", tau=1.0, resize=None) -> None:
    _check_choice(op, "metric", metric, metrics)
    _check_choice(op, "reduction", reduction, ("mean", "none"))
    _check_choice(op, "normalize", normalize, ("sum", "softmax"))
    _check_choice(op, "resize", resize, (None, "pool"))
    _check_float(op, "beta", beta, lo=0.0, hi=1.0)
    _check_float(op, "eps", eps, lo=0.0)
    _check_float(op, "tau", tau, lo=0.0)
    if p is not None:
        _check_float(op, "p", p, lo=0.0)


# ------------------------------------------------------------------------------------------------
# Masks of valid locations (SPEC section 2, "Masked locations")
# ------------------------------------------------------------------------------------------------

MaskArg = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]

def _mask_list(op: str, mask: MaskArg, K: int) -> List[Optional[torch.Tensor]]:
    if isinstance(mask, torch.Tensor):
        return [mask] * K
    if isinstance(mask, (list, tuple)):
        if len(mask) != K:
            raise ValueError(f"{op}: got {len(mask)} masks for {K} layer pairs; pass one mask (applied to "
                             "every pair), or a list with one mask (or None) per pair")
        return list(mask)
    raise TypeError(f"{op}: mask must be None, a tensor or a list of tensors/None (one per pair), "
                    f"got {type(mask).__name__}")


def mask_as_bool(op: str, where: str, m) -> torch.Tensor:
    """A mask of valid locations as a bool tensor: ``m`` must be a tensor that is bool or holds
    only 0 and 1 (checked on the values: a device sync for non-bool masks).  ``where`` names it in
    errors (e.g. ``"pair 0: mask[0]"``)."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{op}: {where.split(': ')[-1]} must be a torch.Tensor or None, got {type(m).__name__}")
    if m.is_complex():
        raise TypeError(f"{op}: {where.split(': ')[-1]} has dtype {m.dtype}; expected bool (or 0/1 integers or floats)")
    if m.dtype == torch.bool:
        return m
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{op}: {where} (dtype {m.dtype}, shape {_shape(m)}) must hold only 0 and 1 (or be a "
                         "bool tensor): 1 or True marks a valid location")
    return m != 0


def _check_mask(op: str, k: int, m, ref: torch.Tensor, ref_name: str, shapes: Sequence[Tuple[int, ...]],
                expected: str) -> torch.Tensor:
    """One pair's mask: :func:`mask_as_bool`, on ``ref``'s device, with one of ``shapes``."""
    name = f"mask[{k}]"
    if isinstance(m, torch.Tensor) and not m.is_complex():
        if m.device != ref.device:
            raise ValueError(f"{op}: pair {k}: {name} is on {m.device} but {ref_name}[{k}] is on {ref.device} "
                             f"(shape {_shape(ref)}); move the mask to that device")
        if _shape(m) not in shapes:
            raise ValueError(f"{op}: pair {k}: {name} has shape {_shape(m)} but {ref_name}[{k}] has shape "
                             f"{_shape(ref)}; expected {expected}")
    return mask_as_bool(op, f"pair {k}: {name}", m)


def _per_pair_masks(op: str, mask: MaskArg, s: List[torch.Tensor], one) -> Optional[List[Optional[torch.Tensor]]]:
    """``one(k, m, s[k])`` for every pair given a mask (a pair without one stays None); None when
    no pair has a mask."""
    if mask is None:
        return None
    out = [None if m is None else one(k, m, a) for k, (m, a) in enumerate(zip(_mask_list(op, mask, len(s)), s))]
    return out if any(m is not None for m in out) else None


def _feature_masks(op: str, mask: MaskArg, s: List[torch.Tensor], channel_dim: int) -> Optional[List[Optional[torch.Tensor]]]:
    """(B, N) bool masks of the K pairs' locations (after any resize), or None without masks."""
    def one(k: int, m, a: torch.Tensor) -> torch.Tensor:
        cd = channel_dim % a.dim()
        B, S = a.shape[0], _spatial(a, cd)
        N = reference.bcn_locations(a, channel_dim)
        shapes = {(B, N), (B, *S)}
        expected = f"(B, N) = ({B}, {N}) or (B, *S) = {(B, *S)} (one entry per location, True = valid)"
        return _check_mask(op, k, m, a, "student_feats", shapes, expected).reshape(B, N)

    return _per_pair_masks(op, mask, s, one)


def _map_masks(op: str, mask: MaskArg, s: List[torch.Tensor]) -> Optional[List[Optional[torch.Tensor]]]:
    """Masks of the K pairs' map entries, each broadcastable to its map: (B, *P) with P a leading
    part of the map's per-sample shape (e.g. (B, T) for (B, T, r) token maps)."""
    def one(k: int, m, a: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(a.shape[:d]) for d in range(min(2, a.dim()), a.dim() + 1)]
        expected = (f"(B, *P) with P a leading part of the map's per-sample shape {tuple(a.shape[1:])}, "
                    f"e.g. {shapes[0]} (True = valid)")
        m = _check_mask(op, k, m, a, "student_maps", shapes, expected)
        return m.reshape(*m.shape, *([1] * (a.dim() - m.dim())))

    return _per_pair_masks(op, mask, s, one)


def _reduce(d: torch.Tensor, reduction: str) -> torch.Tensor:
    return d.mean(dim=1) if reduction == "mean" else d


def _empty_result(reduction: str) -> torch.Tensor:
    return torch.empty((0,) if reduction == "mean" else (0, 0), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def attention_maps(feat: torch.Tensor, *, p: float = 2.0, channel_dim: int = 1) -> torch.Tensor:
    """Attention map ``a[b, i] = (1/C) sum_c |feat[b, c, i]|^p`` of one feature tensor, (B, N).

    Computed in float32 (float64 for float64 input) and differentiable.
    """
    op = "attention_maps"
    _check_tensor(op, "feat", feat, 2)
    _check_float(op, "p", p, lo=0.0)
    if not -feat.dim() <= channel_dim < feat.dim() or channel_dim % feat.dim() == 0:
        raise ValueError(f"{op}: channel_dim={channel_dim} is not a channel dimension of shape {_shape(feat)}")
    if feat.shape[0] == 0:
        raise ValueError(f"{op}: batch size is 0 (feat has shape {_shape(feat)})")
    _check_extent(op, "feat", feat, channel_dim % feat.dim())
    return reference.attention_maps(feat, p=p, channel_dim=channel_dim)


def attention_discrepancy(
    student_feats: TensorOrList,
    teacher_feats: TensorOrList,
    *,
    p: float = 2.0,
    metric: str = "at",
    beta: float = 0.5,
    normalize: str = "sum",
    tau: float = 1.0,
    channel_dim: int = 1,
    resize: Optional[str] = None,
    reduction: str = "mean",
    eps: float = 1e-12,
    mask: MaskArg = None,
) -> torch.Tensor:
    """Per-layer attention-map discrepancy of K student/teacher layer pairs (SPEC sections 1-2).

    ``student_feats[j]`` is (B, C_s, *S) and ``teacher_feats[j]`` is (B, C_t, *S) (channels may
    differ; ``channel_dim=-1`` for token layouts (B, N, D)).  All K pairs run in one op call.
    Returns D of shape (K,) (``reduction="mean"``) or per-sample values (K, B)
    (``reduction="none"``), float32 (float64 for float64 inputs).  Differentiable with respect to
    the student features; the teacher features are constants and never receive a gradient.
    Non-finite inputs propagate to D (the layer-wise rate rule skips such layers).

    ``mask`` marks the valid locations (e.g. a token map's ``attention_mask``: padded tokens do
    not count): one (B, N) or (B, *S) tensor for every pair, or a list with one tensor (or None)
    per pair; bool, or 0/1 integers/floats (their values are checked, a device sync: pass bool to
    avoid it).  SPEC section 2 defines the masked metrics: "at" averages over the valid locations
    of each sample, "jsd" normalises over them, a sample without valid locations gives 0.  The
    mask refers to the locations after ``resize``.  Every backend's kernels take the mask (one
    pass over the features, as without it).
    """
    op = "attention_discrepancy"
    s = _as_list(student_feats, "student_feats", op)
    t = _as_list(teacher_feats, "teacher_feats", op)
    _check_options(op, metric=metric, metrics=("at", "jsd"), beta=beta, reduction=reduction, eps=eps, p=p,
                   normalize=normalize, tau=tau, resize=resize)
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise TypeError(f"{op}: channel_dim must be an int, got {type(channel_dim).__name__}")
    if not s and not t:
        return _empty_result(reduction)
    s, t = _check_features(op, s, t, channel_dim, resize)
    masks = _feature_masks(op, mask, s, channel_dim)
    d = dispatch(op, s[0].device, s, t, p=float(p), metric=metric, beta=float(beta), normalize=normalize,
                 tau=float(tau), eps=float(eps), channel_dim=channel_dim, masks=masks)
    return _reduce(d, reduction)


def map_discrepancy(
    student_maps: TensorOrList,
    teacher_maps: TensorOrList,
    *,
    metric: str = "cos",
    beta: float = 0.5,
    reduction: str = "mean",
    eps: float = 1e-12,
    mask: MaskArg = None,
) -> torch.Tensor:
    """Per-layer discrepancy of per-sample derivative maps (input Jacobians, Hessian-vector
    products), SPEC section 2.

    ``student_maps[j]`` and ``teacher_maps[j]`` have the same shape (B, *); each sample is
    flattened.  ``metric="cos"`` is ``||u/|u| - w/|w| ||^2`` (``2 - 2 cos``), ``"jsd"`` the
    Jensen-Shannon divergence of ``|u| / sum |u|``.  Returns (K,) or (K, B); differentiable with
    respect to the student maps only.

    ``mask`` drops map entries (e.g. the padded tokens of (B, T, r) token maps): one tensor for
    every pair or a list with one (or None) per pair, of shape (B, *P) with P a leading part of
    the map's per-sample shape ((B, T) for (B, T, r)), broadcast over the rest; bool or 0/1.
    Dropping entries is the same as zeroing them in both maps (SPEC section 2), which is how every
    backend computes it.
    """
    op = "map_discrepancy"
    s = _as_list(student_maps, "student_maps", op)
    t = _as_list(teacher_maps, "teacher_maps", op)
    _check_options(op, metric=metric, metrics=("cos", "jsd"), beta=beta, reduction=reduction, eps=eps)
    if not s and not t:
        return _empty_result(reduction)
    _check_common(op, s, t, "student_maps", "teacher_maps", min_dim=1)
    for k, (a, b) in enumerate(zip(s, t)):
        if a.shape != b.shape:
            raise ValueError(
                f"{op}: pair {k}: student_maps[{k}] has shape {_shape(a)} but teacher_maps[{k}] has shape "
                f"{_shape(b)}; derivative maps of one pair must have the same shape"
            )
        _check_extent(op, f"student_maps[{k}]", a, None, k)
    masks = _map_masks(op, mask, s)
    if masks is not None:  # dropping entries == zeroing them in both maps, on every backend
        s = [a if m is None else a * m.to(a.dtype) for a, m in zip(s, masks)]
        t = [b if m is None else b.detach() * m.to(b.dtype) for b, m in zip(t, masks)]
    d = dispatch(op, s[0].device, s, t, metric=metric, beta=float(beta), eps=float(eps))
    return _reduce(d, reduction)


# the fake kernels and autograd of every native op (csrc/ops.cpp names that module)
from . import registry  # noqa: E402,F401
