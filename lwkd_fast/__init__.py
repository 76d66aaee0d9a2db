"""lwkd_fast: fast derivative-matching kernels and layer-wise learning rates for knowledge
distillation in PyTorch.  See README.md and SPEC.md.

``import lwkd_fast`` imports :mod:`lwkd_fast.ops`, which loads the native library and registers
``torch.ops.lwkd.*`` (usable right after the import, like any torch operator library); the rest of
the public API below is imported on first use (PEP 562).  Only the ``lwkd-fast`` command line
process defers ``lwkd_fast.ops`` too, so it answers ``--help`` and argument errors without
importing torch (each sub-command imports what it needs).
"""

import os as _os
import sys as _sys

from ._version import __version__


def _cli_process() -> bool:
    """This process is the ``lwkd-fast`` console script or ``python -m lwkd_fast``."""
    if _sys.argv and _os.path.basename(_sys.argv[0]) == "lwkd-fast":
        return True
    orig = list(getattr(_sys, "orig_argv", []))
    return "-m" in orig and orig[orig.index("-m") + 1:orig.index("-m") + 2] == ["lwkd_fast"]


if not _cli_process():
    from . import ops  # noqa: F401  (registers torch.ops.lwkd.*)

# public name -> the module that defines it
_API = {
    "attention_discrepancy": "ops",
    "attention_maps": "ops",
    "backends": "ops",
    "map_discrepancy": "ops",
    "use_backend": "ops",
    "derivative_maps": "derivatives",
    "input_hvps": "derivatives",
    "input_jacobians": "derivatives",
    "rademacher": "derivatives",
    "layerwise_rates": "rule",
    "DistillOutput": "distill",
    "LayerwiseDistiller": "distill",
}
_SUBMODULES = ("optim", "reference", "rule")  # lw.optim.LayerwiseSGD / LayerwiseAdamW; the rate rule

__all__ = ["__version__", *sorted(_API), *_SUBMODULES]


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'lwkd_fast' has no attribute {name!r}")
    globals()[name] = value  # later accesses are plain attribute lookups
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
