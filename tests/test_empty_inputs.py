"""Empty extents (SPEC section 6): a feature map with no location or no channel, a derivative map
with no element per sample, and an optimizer step whose tensors are all empty -- on every backend,
the emulated CUDA kernels included, and through the native ops called directly (where the GPU host
code used to divide by zero)."""

from __future__ import annotations

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import ops

from conftest import available_backends
from optim_helpers import optim_backends

ATT = available_backends("attention_discrepancy")
MAPS = available_backends("map_discrepancy")
NATIVE_LIBS = [b for b in ops.NATIVE_NAMESPACES if ops.backend_status(b, "attention_discrepancy", "cpu")[0]]

# (student shape, teacher shape, channel_dim, what the message says)
EMPTY_FEATURES = [
    ((2, 3, 0), (2, 5, 0), 1, r"\(3 channels, 0 locations\)"),
    ((2, 3, 0, 7), (2, 4, 0, 7), 1, r"\(3 channels, 0 locations\)"),
    ((2, 0, 4, 4), (2, 6, 4, 4), 1, r"student_feats\[1\] has shape \(2, 0, 4, 4\) \(0 channels, 16 locations\)"),
    ((2, 3, 4, 4), (2, 0, 4, 4), 1, r"teacher_feats\[1\] has shape \(2, 0, 4, 4\) \(0 channels, 16 locations\)"),
    ((2, 0, 8), (2, 0, 16), -1, r"\(8 channels, 0 locations\)"),
]


@pytest.mark.parametrize("backend", ATT)
@pytest.mark.parametrize("shapes", EMPTY_FEATURES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_attention_refuses_empty_extents(backend, shapes):
    s_shape, t_shape, cd, message = shapes
    good_s, good_t = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    with lw.use_backend(backend), pytest.raises(ValueError, match=r"attention_discrepancy: pair 1: .*" + message):
        lw.attention_discrepancy([good_s, torch.randn(s_shape)], [good_t, torch.randn(t_shape)], channel_dim=cd)
    with pytest.raises(ValueError, match=r"attention_maps: feat has shape .*locations\); every pair needs"):
        lw.attention_maps(torch.randn(s_shape if 0 in s_shape else t_shape), channel_dim=cd)


@pytest.mark.parametrize("backend", MAPS)
@pytest.mark.parametrize("shape", [(2, 0), (2, 3, 0), (3, 0, 5)])
def test_maps_refuse_zero_elements_per_sample(backend, shape):
    with lw.use_backend(backend), pytest.raises(
        ValueError, match=r"map_discrepancy: pair 0: student_maps\[0\] has shape .*, 0 elements per sample"
    ):
        lw.map_discrepancy([torch.randn(shape)], [torch.randn(shape)])


@pytest.mark.parametrize("backend", NATIVE_LIBS)
@pytest.mark.parametrize("shapes", EMPTY_FEATURES[:4], ids=lambda c: f"{c[0]}-{c[1]}")
def test_native_ops_called_directly_refuse_empty_extents(backend, shapes):
    """The C++ host code of the CPU and CUDA kernels checks too (the CUDA host code used to
    divide by zero sizing its tiles, which killed the process with SIGFPE)."""
    s_shape, t_shape, cd, _ = shapes
    lib = ops.native_ops(backend)
    s, t = [torch.randn(2, 3, 4), torch.randn(s_shape)], [torch.randn(2, 5, 4), torch.randn(t_shape)]
    with pytest.raises(RuntimeError, match=r"attention_discrepancy: pair 1: (student|teacher) tensor has shape"):
        lib.attention_discrepancy(s, t, 2.0, "at", 0.5, "sum", 1.0, 1e-12, cd)
    if 0 in s_shape:
        maps = [torch.ones(2, 4), torch.ones(2, 1 if len(s_shape) == 3 else 0)]
        with pytest.raises(RuntimeError, match=r"attention_discrepancy_backward: pair 1: student tensor has shape"):
            lib.attention_discrepancy_backward(torch.ones(2, 2), s, maps, maps, 2.0, "at", 0.5, "sum", 1.0, 1e-12, cd)


@pytest.mark.parametrize("backend", NATIVE_LIBS)
def test_native_map_ops_called_directly_refuse_empty_samples(backend):
    lib = ops.native_ops(backend)
    for metric in ("cos", "jsd"):
        s, t = [torch.randn(3, 4), torch.randn(3, 2, 0)], [torch.randn(3, 4), torch.randn(3, 2, 0)]
        with pytest.raises(RuntimeError, match=r"map_discrepancy: pair 1: student tensor has shape \[3, 2, 0\], 0 elements"):
            lib.map_discrepancy(s, t, metric, 0.5, 1e-12)
        with pytest.raises(RuntimeError, match=r"map_discrepancy_backward: pair 1: student tensor has shape"):
            lib.map_discrepancy_backward(torch.ones(2, 3), s, t, metric, 0.5, 1e-12)


@pytest.mark.parametrize("backend", optim_backends("layerwise_adamw_step"))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_counts_the_step_when_every_tensor_is_empty(backend, amsgrad):
    """torch.optim.AdamW increments the step count of a parameter with zero elements; so must the
    fused step, even when no tensor of the call has an element to update (the CUDA step used to
    return before its step-count launch)."""
    params = [torch.zeros(0, requires_grad=True), torch.zeros(3, 0, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    with lw.use_backend(backend):
        opt = lw.optim.LayerwiseAdamW([{"params": params, "layer": 0}], lr=0.1, amsgrad=amsgrad)
        torch_opt = torch.optim.AdamW(ref, lr=0.1, amsgrad=amsgrad)
        for step in range(1, 4):
            for p in params + ref:
                p.grad = torch.zeros_like(p)
            opt.step(torch.tensor([0.5]))
            torch_opt.step()
            for p, q in zip(params, ref):
                assert float(opt.state[p]["step"]) == float(torch_opt.state[q]["step"]) == step
