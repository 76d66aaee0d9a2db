"""Installs that never fail silently: the build uses the torch the user has (or stops with the
exact command), records what it compiled against, and an extension that exists but cannot serve
this torch gives ONE loud warning at import, with the reason and the fix, and `lwkd-fast info`
says which backend runs instead.

The install on a second torch version (a fresh virtual environment with torch 2.13.0, CPU build)
is too slow for the test-suite; it is `.ci/second-torch`, documented in the README."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("lwkd_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the module-level setup() runs only as __main__
    return mod


def test_torch_is_not_a_build_requirement():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    block = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", block, re.M | re.S).group(1)
    assert "torch" not in requires and "setuptools" in requires


def test_build_without_torch_stops_with_the_exact_command(setup_py, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(SystemExit) as exc:
        setup_py._import_torch()
    msg = str(exc.value)
    assert "cannot build the native extension: torch is not importable here" in msg
    assert f"pip install --no-build-isolation -e {ROOT}" in msg
    assert f"LWKD_NO_EXT=1 pip install -e {ROOT}" in msg


def test_build_with_too_old_torch_stops(setup_py, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(SystemExit, match=r"torch 2\.5\.1\+cpu is too old; lwkd_fast needs torch >= 2\.6"):
        setup_py._import_torch()


def test_build_records_what_it_compiled_against(setup_py, tmp_path, monkeypatch):
    class FakeBuildExt:  # stands in for torch's BuildExtension: run() is the compile
        def __init__(self, build_lib, inplace):
            self.build_lib, self.inplace = build_lib, inplace

        def run(self):
            os.makedirs(os.path.join(self.build_lib, "lwkd_fast"), exist_ok=True)

    record = {"torch": "9.9.9+cpu", "torch_cuda": None, "cuda_kernels": False,
              "cuda_skipped": "torch 9.9.9+cpu is a CPU-only build"}
    monkeypatch.setattr(setup_py, "ROOT", str(tmp_path / "src"))
    os.makedirs(tmp_path / "src" / "lwkd_fast")
    setup_py._recording(FakeBuildExt, record)(str(tmp_path / "build"), inplace=True).run()
    for where in ("build", "src"):
        ns = {}
        exec((tmp_path / where / "lwkd_fast" / "_build_info.py").read_text(), ns)
        assert ns["BUILD"] == record


def _package_copy(tmp_path, so_bytes=None, build_info=None):
    """A copy of lwkd_fast with a planted extension / build record, importable from tmp_path."""
    src = os.path.join(ROOT, "lwkd_fast")
    dst = tmp_path / "lwkd_fast"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "_build_info.py",
                                                            *([] if so_bytes is None else ["*.so"])))
    if so_bytes is not None:
        (dst / "_C.abi3.so").write_bytes(so_bytes)
    if build_info is not None:
        (dst / "_build_info.py").write_text(f"BUILD = {build_info!r}\n")
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)  # a source tree: the fix names it
    return tmp_path


PROBE = r"""
import io, json, sys, warnings, contextlib
# only the copy: an editable install's finder would supply the checkout's lwkd_fast._C otherwise
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lwkd_fast.ops as ops
    import lwkd_fast.optim, lwkd_fast.rule
from lwkd_fast import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = cli.main(["info"])
print(json.dumps({"state": ops._C_STATE, "loaded": ops._C is not None, "rc": rc, "info": out.getvalue(),
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                               and "lwkd_fast" in str(w.message)]}))
"""


def _probe(path):
    env = dict(os.environ, PYTHONPATH=str(path))
    env.pop("LWKD_DISABLE_NATIVE", None)
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=str(path))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _info_lines(info):
    return [" ".join(line.split()) for line in info.splitlines()]


def test_unloadable_extension_warns_once_with_reason_and_fix(tmp_path):
    got = _probe(_package_copy(tmp_path, so_bytes=b"not a shared object"))
    assert got["state"] == "broken" and not got["loaded"] and got["rc"] == 0
    assert len(got["warnings"]) == 1
    w = got["warnings"][0]
    assert w.startswith("lwkd_fast: the native extension lwkd_fast._C is not used: ImportError: ")
    assert "Every op runs on the slower pure-torch reference backend" in w
    assert "Fix: rebuild it against this torch with `pip install --no-build-isolation -e" in w
    lines = _info_lines(got["info"])
    assert any(line.startswith("extension NOT USED -- lwkd_fast._C exists but cannot be used: ImportError")
               for line in lines)
    assert any(line.startswith("cpu discrepancy ops -> reference: native: lwkd_fast._C exists but cannot be used")
               for line in lines)


@pytest.mark.skipif(importlib.util.find_spec("lwkd_fast._C") is None, reason="no built extension to copy")
def test_extension_built_for_another_torch_is_refused(tmp_path):
    other = {"torch": "2.6.0+planted", "torch_cuda": None, "cuda_kernels": False,
             "cuda_skipped": "torch 2.6.0+planted is a CPU-only build"}
    got = _probe(_package_copy(tmp_path, build_info=other))
    assert got["state"] == "broken" and not got["loaded"]
    assert got["warnings"] == [
        f"lwkd_fast: the native extension lwkd_fast._C is not used: it was built against torch 2.6.0+planted, "
        f"and this is torch {torch.__version__}. Every op runs on the slower pure-torch reference backend. Fix: "
        f"rebuild it against this torch with `pip install --no-build-isolation -e {tmp_path}` (or set "
        f"LWKD_DISABLE_NATIVE=1 to use the reference backend without this warning)."]


def test_absent_extension_is_quiet(tmp_path):
    path = _package_copy(tmp_path, so_bytes=b"")
    os.remove(path / "lwkd_fast" / "_C.abi3.so")  # never built (LWKD_NO_EXT=1)
    got = _probe(path)
    assert got["state"] == "absent" and got["warnings"] == []
    assert any("-> reference: native: lwkd_fast._C is not built" in line for line in _info_lines(got["info"]))
