"""Backend selection (ARCHITECTURE "Backends and dispatch") and soft loading of the extension."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import lwkd_fast as lw
from lwkd_fast import ops

from conftest import NATIVE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_native_backend_loaded_in_a_normal_install():
    """The CI installs with the extension: its absence is a failure there, not a skip."""
    if os.environ.get("LWKD_NO_EXT") == "1" or os.environ.get("LWKD_DISABLE_NATIVE") == "1":
        pytest.skip("pure-Python install requested")
    assert ops._C is not None, ops._C_ERROR
    info = lw.backends()
    assert info["native"]["available"] and "cpu" in info["native"]["devices"]
    for op in ops.NATIVE_OPS:
        assert "CPU" in info["native"]["kernels"][op]


def test_backends_report_structure():
    info = lw.backends()
    assert set(ops.BACKENDS) <= set(info)
    for name, st in info.items():
        assert isinstance(st["available"], bool) and isinstance(st["devices"], list)
        assert isinstance(st["reason"], str)
        if not st["available"]:
            assert st["reason"], f"{name} unavailable without a reason"
    assert info["reference"]["available"]


class _Count(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.namespace == "lwkd"
        return func(*args, **(kwargs or {}))


def _native_calls(**use):
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with _Count() as c:
        lw.attention_discrepancy(s, t)
    return c.n


@pytest.mark.skipif(not NATIVE, reason="native extension not loaded")
def test_auto_prefers_native_and_use_backend_overrides(monkeypatch):
    monkeypatch.delenv("LWKD_BACKEND", raising=False)
    assert ops.requested_backend() == "auto"
    assert ops.select_backend("attention_discrepancy", torch.device("cpu")) == "native"
    assert _native_calls() == 1
    with lw.use_backend("reference"):
        assert ops.requested_backend() == "reference"
        assert _native_calls() == 0
        with lw.use_backend("native"):
            assert _native_calls() == 1
        assert _native_calls() == 0
    assert ops.requested_backend() == "auto"


@pytest.mark.skipif(not NATIVE, reason="native extension not loaded")
def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("LWKD_BACKEND", "reference")
    assert _native_calls() == 0
    monkeypatch.setenv("LWKD_BACKEND", "native")
    assert _native_calls() == 1
    with lw.use_backend("reference"):  # the context manager wins over the environment
        assert _native_calls() == 0
    monkeypatch.setenv("LWKD_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match=r"LWKD_BACKEND: unknown backend 'cuda-please'; expected one of auto, reference, native, triton"):
        lw.attention_discrepancy(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend: unknown backend 'fast'"):
        with lw.use_backend("fast"):
            pass


def test_forced_backend_that_cannot_run_raises_with_reason():
    s = torch.empty(2, 3, 4, 4, device="meta")
    with lw.use_backend("native"):
        with pytest.raises(RuntimeError, match=r"backend 'native' was forced but cannot run attention_discrepancy on meta: "):
            lw.attention_discrepancy(s, s)


def test_auto_falls_back_to_reference_and_logs_once(caplog):
    ops._logged.clear()
    s = torch.empty(2, 3, 4, 4, device="meta")
    with caplog.at_level(logging.INFO, logger="lwkd_fast"):
        d1 = lw.attention_discrepancy(s, s)
        d2 = lw.attention_discrepancy(s, s)
    assert d1.device.type == "meta" and d1.shape == (1,) and d2.shape == (1,)
    msgs = [r.getMessage() for r in caplog.records if "reference backend" in r.getMessage()]
    assert len(msgs) == 1 and "attention_discrepancy on meta" in msgs[0], msgs


def test_import_without_native_records_why():
    code = (
        "import json, torch, lwkd_fast as lw\n"
        "from lwkd_fast import ops\n"
        "s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)\n"
        "d = lw.attention_discrepancy(s, t)\n"
        "ref = lw.reference.attention_discrepancy([s], [t]).mean(1)\n"
        "print(json.dumps({'native': lw.backends()['native'], 'err': ops._C_ERROR, 'close': bool(torch.allclose(d, ref))}))\n"
    )
    r = _run(code, LWKD_DISABLE_NATIVE="1", LWKD_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["native"]["available"] is False
    assert "LWKD_DISABLE_NATIVE" in out["native"]["reason"] and "LWKD_DISABLE_NATIVE" in out["err"]
    assert out["close"]
    r = _run("import lwkd_fast as lw, torch\nwith lw.use_backend('native'):\n  lw.attention_discrepancy(torch.randn(2,3,4), torch.randn(2,3,4))",
             LWKD_DISABLE_NATIVE="1")
    assert r.returncode != 0 and "backend 'native' was forced but cannot run" in r.stderr
