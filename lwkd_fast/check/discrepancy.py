"""`lwkd-fast check` cases of the discrepancy ops (``attention_discrepancy``, ``map_discrepancy``):
ragged pairs in NCHW / channels_last against the float64 reference, every metric, every dtype."""

from __future__ import annotations

from typing import Iterable

import torch

from .. import ops, reference
from ..testing import verify_op
from .case import DTYPES, Case


def _feature_pairs(device, dtype, B=3):
    """K = 3 ragged pairs: NCHW, channels_last, and odd sizes; student/teacher channels differ."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    s = [r(B, 5, 7, 9), r(B, 16, 4, 4).to(memory_format=torch.channels_last), r(B, 33, 3, 5)]
    t = [r(B, 8, 7, 9), r(B, 3, 4, 4), r(B, 17, 3, 5).to(memory_format=torch.channels_last)]
    return s, t


def _map_pairs(device, dtype, B=3):
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    return [r(B, 3, 5, 7), r(B, 10), r(B, 2, 17)], [r(B, 3, 5, 7), r(B, 10), r(B, 2, 17)]


ATTENTION_CONFIGS = (
    dict(metric="at", p=2.0),
    dict(metric="at", p=1.5),
    dict(metric="jsd", p=2.0, normalize="sum", beta=0.3),
    dict(metric="jsd", p=1.0, normalize="softmax", tau=0.5),
)
MAP_CONFIGS = (dict(metric="cos"), dict(metric="jsd", beta=0.7))


def _case_fns(public_op, reference_op, cfg):
    """(public, reference) callables returning per-sample (K, B) values for one config."""
    def public(s, t):
        return public_op(s, t, reduction="none", **cfg)

    def ref(s, t, compute_dtype):
        return reference_op(s, t, compute_dtype=compute_dtype, **cfg)

    return public, ref


def attention_case_fns(cfg):
    return _case_fns(ops.attention_discrepancy, reference.attention_discrepancy, cfg)


def map_case_fns(cfg):
    return _case_fns(ops.map_discrepancy, reference.map_discrepancy, cfg)


def _label(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def lwkd_checks(backend: str, device: torch.device) -> Iterable[Case]:
    for dtype in DTYPES:
        for cfg in ATTENTION_CONFIGS:
            public, ref = attention_case_fns(cfg)
            yield Case("attention_discrepancy", _label(cfg), dtype,
                       lambda public=public, ref=ref, dtype=dtype: verify_op(
                           public, ref, *_feature_pairs(device, dtype), backend=backend))
        for cfg in MAP_CONFIGS:
            public, ref = map_case_fns(cfg)
            yield Case("map_discrepancy", _label(cfg), dtype,
                       lambda public=public, ref=ref, dtype=dtype: verify_op(
                           public, ref, *_map_pairs(device, dtype), backend=backend))
    # eps boundary: an all-zero student map (every metric)
    for cfg in ATTENTION_CONFIGS[::2]:
        public, ref = attention_case_fns(cfg)

        def zero_case(public=public, ref=ref):
            s, t = _feature_pairs(device, torch.float32)
            s[1] = torch.zeros_like(s[1])
            return verify_op(public, ref, s, t, backend=backend)

        yield Case("attention_discrepancy", _label(cfg) + " zero-map", torch.float32, zero_case)
