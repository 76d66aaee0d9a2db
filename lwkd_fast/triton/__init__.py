"""Triton backend of lwkd_fast (imported lazily; importing this package does not import triton).

Availability is asked per op and device type through :func:`status`:

* triton must be importable;
* ``device_type == "cuda"``: a GPU must be visible, and the Triton interpreter must be off (the
  kernels read pointer tables holding device addresses, which the interpreter cannot follow);
* ``device_type == "cpu"``: only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
  triton is imported), which runs the same kernels on CPU tensors -- that is how CI verifies them.

Each op lives in a module of this package; a module that is not present in this build makes its
ops unavailable with a reason instead of failing at import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Tuple

__all__ = ["status", "attention_discrepancy", "map_discrepancy", "OP_MODULES"]

# op name -> module of this package that implements it
OP_MODULES = {
    "attention_discrepancy": ".discrepancy",
    "map_discrepancy": ".discrepancy",
    "layerwise_rates": ".optim",
    "layerwise_sgd_step": ".optim",
    "layerwise_adamw_step": ".optim",
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_problem() -> str:
    """Empty string when triton imports, else why not (cached after the first call)."""
    global _TRITON_PROBLEM
    if _TRITON_PROBLEM is None:
        if importlib.util.find_spec("triton") is None:
            _TRITON_PROBLEM = "triton is not installed"
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
                _TRITON_PROBLEM = f"triton does not import ({type(exc).__name__}: {exc})"
            else:
                _TRITON_PROBLEM = ""
    return _TRITON_PROBLEM


_TRITON_PROBLEM = None


def _module_present(rel: str) -> bool:
    return importlib.util.find_spec(rel, __name__) is not None


def status(op: str, device_type: str) -> Tuple[bool, str]:
    """``(available, reason)`` of the Triton backend for ``op`` on ``device_type``."""
    rel = OP_MODULES.get(op)
    if rel is None:
        return False, f"the Triton backend has no kernel for {op!r}"
    if not _module_present(rel):
        return False, f"the Triton kernels for {op} (lwkd_fast.triton{rel}) are not part of this build"
    problem = _triton_problem()
    if problem:
        return False, problem
    import sys

    for mod, loaded in list(sys.modules.items()):  # every kernel module already created
        if mod.startswith(__name__ + ".") and getattr(loaded, "INTERPRETED", _interpreting()) != _interpreting():
            return False, (f"{mod} was imported with TRITON_INTERPRET="
                           f"{'1' if loaded.INTERPRETED else '0'} but it is now "
                           f"{os.environ.get('TRITON_INTERPRET', 'unset')}; set it before the first use")
    if device_type == "cuda":
        if _interpreting():
            return False, ("TRITON_INTERPRET=1 is set: the interpreter runs the Triton kernels on CPU "
                           "tensors only (their pointer tables hold device addresses otherwise)")
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""
    if device_type == "cpu":
        if not _interpreting():
            return False, ("Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported (lwkd-fast check --interpret does)")
        return True, ""
    return False, f"the Triton backend does not run on device type {device_type!r}"


def attention_discrepancy(*args, **kwargs):
    """Per-sample (K, B) attention discrepancy through the Triton kernels: the arguments of
    lwkd_triton::attention_discrepancy (the native schema), by position or name (see .discrepancy)."""
    return importlib.import_module(".discrepancy", __name__).attention_discrepancy(*args, **kwargs)


def map_discrepancy(*args, **kwargs):
    """Per-sample (K, B) derivative-map discrepancy through the Triton kernels (see .discrepancy)."""
    return importlib.import_module(".discrepancy", __name__).map_discrepancy(*args, **kwargs)
