"""Bad input gets a clear error naming the argument, the pair index and the shapes (issue item 6).

The checks run before any backend, so every backend raises the same error; the tests run them
under each available backend anyway, so no backend can skip validation.
"""

import pytest
import torch

import lwkd_fast as lw

from conftest import available_backends

BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    with lw.use_backend(request.param):
        yield request.param


def feats(B=2, C=3, H=4, W=4, dtype=torch.float32):
    return torch.randn(B, C, H, W).to(dtype)


def test_list_lengths_differ(backend):
    with pytest.raises(ValueError, match=r"2 student tensors \(student_feats\) but 1 teacher"):
        lw.attention_discrepancy([feats(), feats()], [feats()])
    with pytest.raises(ValueError, match=r"1 student tensors \(student_maps\) but 2 teacher"):
        lw.map_discrepancy([feats()], [feats(), feats()])


def test_batch_size_mismatch_names_pair_and_shapes(backend):
    with pytest.raises(ValueError, match=r"pair 1: batch sizes differ: student_feats\[1\] has shape \(2, 3, 4, 4\) "
                                         r"and teacher_feats\[1\] has shape \(5, 3, 4, 4\)"):
        lw.attention_discrepancy([feats(), feats()], [feats(), feats(B=5)])


def test_batch_size_differs_across_pairs(backend):
    with pytest.raises(ValueError, match=r"pair 1 has batch size 3 .* pair 0 has 2"):
        lw.attention_discrepancy([feats(), feats(B=3)], [feats(), feats(B=3)])


def test_spatial_mismatch_suggests_resize(backend):
    with pytest.raises(ValueError, match=r"pair 0: spatial sizes differ: student_feats\[0\] has shape \(2, 3, 4, 4\) "
                                         r"\(spatial \(4, 4\)\) and teacher_feats\[0\] has shape \(2, 3, 8, 8\).*resize='pool'"):
        lw.attention_discrepancy(feats(), feats(H=8, W=8))


def test_rank_mismatch(backend):
    with pytest.raises(ValueError, match=r"pair 0: student_feats\[0\] has shape \(2, 3, 4, 4\) but teacher_feats\[0\] has shape \(2, 3, 16\)"):
        lw.attention_discrepancy(feats(), torch.randn(2, 3, 16))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_dtypes(backend, dtype):
    bad = torch.ones(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"teacher_feats\[0\] has dtype {dtype} \(shape \(2, 3, 4, 4\)\); expected a floating dtype"):
        lw.attention_discrepancy(feats(), bad)
    with pytest.raises(TypeError, match=rf"student_maps\[0\] has dtype {dtype}"):
        lw.map_discrepancy(bad, feats())


def test_devices_differ(backend):
    meta = torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"pair 0: student_feats\[0\] is on cpu but teacher_feats\[0\] is on meta"):
        lw.attention_discrepancy(feats(), meta)
    with pytest.raises(ValueError, match=r"pair 1 is on meta but pair 0 is on cpu"):
        lw.attention_discrepancy([feats(), meta], [feats(), torch.empty(2, 3, 4, 4, device="meta")])


def test_empty_batch(backend):
    with pytest.raises(ValueError, match=r"pair 0: batch size is 0 \(student_feats\[0\] has shape \(0, 3, 4, 4\)\)"):
        lw.attention_discrepancy(feats(B=0), feats(B=0))
    with pytest.raises(ValueError, match=r"batch size is 0"):
        lw.map_discrepancy(torch.empty(0, 5), torch.empty(0, 5))
    with pytest.raises(ValueError, match=r"batch size is 0"):
        lw.attention_maps(feats(B=0))


@pytest.mark.parametrize("kw,msg", [
    (dict(metric="kl"), r"unknown metric 'kl'; expected one of 'at', 'jsd'"),
    (dict(metric="cos"), r"unknown metric 'cos'"),          # cos is for derivative maps
    (dict(reduction="sum"), r"unknown reduction 'sum'; expected one of 'mean', 'none'"),
    (dict(normalize="l1"), r"unknown normalize 'l1'"),
    (dict(resize="bilinear"), r"unknown resize 'bilinear'; expected one of None, 'pool'"),
    (dict(p=0.0), r"p must lie in \(0.0, inf\)"),
    (dict(p=float("nan")), r"p must lie in .* and be finite"),
    (dict(beta=1.0), r"beta must lie in \(0.0, 1.0\)"),
    (dict(beta=0.0), r"beta must lie in"),
    (dict(tau=-1.0), r"tau must lie in"),
    (dict(eps=0.0), r"eps must lie in"),
    (dict(eps=float("inf")), r"eps must lie in"),
    (dict(p=torch.tensor(2.0)), r"p must be a Python number"),
    (dict(channel_dim=0), r"channel_dim=0 is not a channel dimension"),
    (dict(channel_dim=4), r"channel_dim=4 is not a channel dimension"),
])
def test_bad_options(backend, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        lw.attention_discrepancy(feats(), feats(), **kw)


def test_bad_map_options(backend):
    with pytest.raises(ValueError, match=r"unknown metric 'at'; expected one of 'cos', 'jsd'"):
        lw.map_discrepancy(feats(), feats(), metric="at")
    with pytest.raises(ValueError, match=r"pair 0: student_maps\[0\] has shape \(2, 3, 4, 4\) but teacher_maps\[0\] "
                                         r"has shape \(2, 48\)"):
        lw.map_discrepancy(feats(), torch.randn(2, 48))


def test_non_tensor_inputs(backend):
    with pytest.raises(TypeError, match=r"student_feats must be a tensor or a list/tuple of tensors, got ndarray"):
        import numpy as np

        lw.attention_discrepancy(np.zeros((2, 3, 4, 4)), feats())
    with pytest.raises(TypeError, match=r"teacher_feats\[1\] must be a torch.Tensor, got str"):
        lw.attention_discrepancy([feats(), feats()], [feats(), "x"])


def test_too_few_dims(backend):
    with pytest.raises(ValueError, match=r"student_feats\[0\] must have at least 2 dimensions, got shape \(5,\)"):
        lw.attention_discrepancy(torch.randn(5), torch.randn(5))


def test_native_op_checks_its_own_arguments():
    """The C++ op validates too (callers of torch.ops.lwkd.* bypass the Python checks)."""
    from conftest import NATIVE

    if not NATIVE:
        pytest.skip("native extension not loaded")
    with pytest.raises(RuntimeError, match="unknown metric 'kl'"):
        torch.ops.lwkd.attention_discrepancy([feats()], [feats()], 2.0, "kl", 0.5, "sum", 1.0, 1e-12, 1)
    with pytest.raises(RuntimeError, match="1 student tensors but 2 teacher tensors"):
        torch.ops.lwkd.map_discrepancy([feats()], [feats(), feats()], "cos", 0.5, 1e-12)
    with pytest.raises(RuntimeError, match="pair 0: teacher tensor has dtype Long"):
        torch.ops.lwkd.map_discrepancy([feats()], [torch.ones(2, 3, 4, 4, dtype=torch.long)], "cos", 0.5, 1e-12)
    with pytest.raises(RuntimeError, match="batch size must be > 0"):
        torch.ops.lwkd.map_discrepancy([torch.empty(0, 3)], [torch.empty(0, 3)], "cos", 0.5, 1e-12)
    with pytest.raises(RuntimeError, match="student has 16 locations but teacher has 64"):
        torch.ops.lwkd.attention_discrepancy([feats()], [feats(H=8, W=8)], 2.0, "at", 0.5, "sum", 1.0, 1e-12, 1)
    with pytest.raises(RuntimeError, match="beta must lie in"):
        torch.ops.lwkd.attention_discrepancy([feats()], [feats()], 2.0, "jsd", 1.5, "sum", 1.0, 1e-12, 1)
