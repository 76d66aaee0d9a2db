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

__all__ = [
    "__version__",
    "attention_discrepancy",
    "attention_maps",
    "backends",
    "derivative_maps",
    "input_hvps",
    "input_jacobians",
    "map_discrepancy",
    "rademacher",
    "use_backend",
]
