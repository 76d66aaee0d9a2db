"""lwkd_fast: fast derivative-matching kernels and layer-wise learning rates for knowledge
distillation in PyTorch.  See README.md and SPEC.md."""

from ._version import __version__
from .derivatives import derivative_maps, input_hvps, input_jacobians, rademacher
from .ops import (
    attention_discrepancy,
    attention_maps,
    backends,
    map_discrepancy,
    use_backend,
)
from . import optim, reference, rule  # lw.optim.LayerwiseSGD / LayerwiseAdamW; the rate rule
from .distill import DistillOutput, LayerwiseDistiller
from .rule import layerwise_rates

__all__ = [
    "__version__",
    "DistillOutput",
    "LayerwiseDistiller",
    "attention_discrepancy",
    "attention_maps",
    "backends",
    "derivative_maps",
    "input_hvps",
    "input_jacobians",
    "layerwise_rates",
    "map_discrepancy",
    "optim",
    "rademacher",
    "reference",
    "rule",
    "use_backend",
]
