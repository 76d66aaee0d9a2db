"""The CPU gradient-buffer pool (csrc/cpu/buffer_pool.h) never hands out memory someone holds."""

import os
import subprocess
import sys

import torch

import lwkd_fast as lw

from conftest import requires_native

pytestmark = requires_native

SHAPE = (8, 64, 32, 32)  # 2 MiB of float32: above the pool's 1 MiB floor


def grad_of(s, t):
    with lw.use_backend("native"):
        return torch.autograd.grad(lw.attention_discrepancy(s, t).sum(), s)[0]


def test_reuses_a_released_gradient_buffer():
    s, t = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE)
    p1 = grad_of(s, t).data_ptr()
    p2 = grad_of(s, t).data_ptr()
    assert p1 == p2  # nobody held the first gradient: its buffer came back


def test_held_gradients_and_views_are_never_overwritten():
    s, t = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE)
    g1 = grad_of(s, t)
    keep = g1.clone()
    view = g1[1:3]            # a view keeps the storage alive after g1 goes
    arr = g1.numpy()          # so does a numpy export
    ptr = g1.data_ptr()
    del g1
    s2 = torch.randn(SHAPE, requires_grad=True)
    g2 = grad_of(s2, t)
    assert g2.data_ptr() != ptr
    torch.testing.assert_close(view, keep[1:3], rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(arr), keep, rtol=0, atol=0)
    # and the values of the new gradient are right
    with lw.use_backend("reference"):
        ref = torch.autograd.grad(lw.attention_discrepancy(s2, t).sum(), s2)[0]
    torch.testing.assert_close(g2, ref)


def test_fresh_tensor_metadata_and_layout():
    s = torch.randn(SHAPE).to(memory_format=torch.channels_last).requires_grad_()
    t = torch.randn(SHAPE)
    g1 = grad_of(s, t)
    g1.requires_grad_(True)  # a previous life's metadata must not leak into the next hand-out
    del g1
    g2 = grad_of(s, t)
    assert not g2.requires_grad
    assert g2.is_contiguous(memory_format=torch.channels_last)


def test_release_and_disable():
    s, t = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE)
    grad_of(s, t)
    assert torch.ops.lwkd.cpu_buffer_pool(False) >= s.numel() * 4
    held = grad_of(s, t)
    after = torch.ops.lwkd.cpu_buffer_pool(True)
    assert after == held.numel() * 4  # only the buffer still in use stays referenced
    code = (
        "import torch, lwkd_fast as lw\n"
        "s, t = torch.randn(8, 64, 32, 32, requires_grad=True), torch.randn(8, 64, 32, 32)\n"
        "g = lambda: torch.autograd.grad(lw.attention_discrepancy(s, t).sum(), s)[0]\n"
        "g(); g()\n"
        "print(torch.ops.lwkd.cpu_buffer_pool(False))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LWKD_CPU_POOL_MB="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0"
