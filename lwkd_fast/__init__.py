"""lwkd_fast: fast derivative-matching kernels and layer-wise learning rates for knowledge
distillation in PyTorch.  See README.md and SPEC.md."""

from ._version import __version__
from .ops import (
    attention_discrepancy,
    attention_maps,
    backends,
    map_discrepancy,
    use_backend,
)
from . import optim, rule  # noqa: E402  (LayerwiseSGD / LayerwiseAdamW, the rate rule)
from .rule import layerwise_rates  # noqa: E402

__all__ = [
    "__version__",
    "attention_discrepancy",
    "attention_maps",
    "backends",
    "map_discrepancy",
    "use_backend",
    "layerwise_rates",
    "optim",
]
