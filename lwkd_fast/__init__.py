"""lwkd_fast: fast derivative-matching kernels and layer-wise learning rates for knowledge
distillation in PyTorch.  See README.md and SPEC.md.

The public API below is imported on first use (PEP 562): ``import lwkd_fast`` costs nothing, so
the ``lwkd-fast`` command line answers ``--help`` and argument errors without importing torch.
``lw.<name>`` imports the module that defines it on first access; ``torch.ops.lwkd.*`` are
registered once ``lwkd_fast.ops`` is imported (by any ``lw.*`` function, or ``import lwkd_fast.ops``).
"""

from ._version import __version__

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
