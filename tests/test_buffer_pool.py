"""The CPU gradient-buffer pool (csrc/cpu/buffer_pool.h): never hands out memory someone holds,
reuses buffers in the steady state, and holds no more than the last few backward calls used."""

import os
import subprocess
import sys

import torch

import lwkd_fast as lw

from conftest import requires_native

pytestmark = requires_native

SHAPE = (8, 64, 32, 32)  # 2 MiB of float32: above the pool's 1 MiB floor
IDLE_ROUNDS = 4  # backward calls a buffer may stay idle before it is released (buffer_pool.h)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env("0"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0"


def _env(pool_mb=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LWKD_CPU_POOL_MB", None)
    if pool_mb is not None:
        env["LWKD_CPU_POOL_MB"] = pool_mb
    return env


def test_buffers_survive_a_few_rounds_of_other_sizes_then_go():
    """Kept while recent (several backward calls per step still reuse), released when idle for
    more than IDLE_ROUNDS backward calls."""
    torch.ops.lwkd.cpu_buffer_pool(True)
    s, t = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE)
    other = torch.randn(2 * SHAPE[0], *SHAPE[1:], requires_grad=True)
    first = grad_of(s, t).data_ptr()
    for _ in range(IDLE_ROUNDS - 1):
        grad_of(other, torch.randn(other.shape))
    assert grad_of(s, t).data_ptr() == first  # idle for IDLE_ROUNDS - 1 rounds: reused
    for _ in range(IDLE_ROUNDS + 1):
        grad_of(other, torch.randn(other.shape))
    other_bytes = other.numel() * 4
    assert torch.ops.lwkd.cpu_buffer_pool(False) == other_bytes  # s's buffer was released


# Variable batch sizes 8..64 of a (B, 32, 32, 32) float32 layer (B x 128 KiB gradients), every
# size twice in a scrambled order: the workload of issue 11 item 8 (2,000 steps of batches 8..64)
# at a seventeenth of the steps, enough for every size to recur (previously each one stayed).
_WORKLOAD = """
import os, sys, torch, lwkd_fast as lw
torch.set_num_threads(1)
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base_s, base_t = torch.randn(64, 32, 32, 32), torch.randn(64, 8, 32, 32)
def step(B):
    s = base_s[:B].detach().requires_grad_()
    with lw.use_backend("native"):
        d = lw.attention_discrepancy(s, base_t[:B])
    d.sum().backward()
    return s.grad.data_ptr()
sizes = [8 + (23 * i) % 57 for i in range(2 * 57)]
step(64)
before = rss()
for B in sizes:
    step(B)
print(rss() - before, torch.ops.lwkd.cpu_buffer_pool(False))
"""


def test_memory_stays_bounded_under_varying_batch_sizes():
    """RSS growth over the varying-batch workload: with the pool it stays within a few rounds'
    buffers of the pool-off run (previously every size ever seen stayed pooled: 256 MiB here)."""
    procs = {mb: subprocess.Popen([sys.executable, "-c", _WORKLOAD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env(mb)) for mb in (None, "0")}
    out = {}
    for mb, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        out[mb] = [int(v) for v in stdout.split()]
    (rss_on, pooled), (rss_off, pooled_off) = out[None], out["0"]
    mib = 1 << 20
    largest = 64 * 128 * 1024  # the largest gradient of the workload: 8 MiB
    assert pooled_off == 0
    assert pooled <= (IDLE_ROUNDS + 1) * largest, f"pool holds {pooled / mib:.0f} MiB"
    assert rss_on - rss_off <= (IDLE_ROUNDS + 1) * largest, (
        f"RSS grew by {rss_on / mib:.0f} MiB with the pool, {rss_off / mib:.0f} MiB without")
