"""What a `lwkd-fast check` case is and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from ..testing import Verdict

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Case:
    op: str                                   # op name, used for backend availability
    label: str                                # what the case exercises
    dtype: torch.dtype
    run: Callable[[], Dict[str, Verdict]]     # called with the backend already selected


@dataclass
class Result:
    op: str
    label: str
    backend: str
    device: str
    dtype: str
    ok: bool
    worst: str = ""
    max_err: float = 0.0
    bound: float = 0.0
    seconds: float = 0.0
    error: Optional[str] = None
    verdicts: Dict[str, str] = field(default_factory=dict)
