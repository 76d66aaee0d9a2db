"""The `lwkd-fast` command line: info and check (pass table and failing exit status), every bad
value refused in one line with exit status 2, missing extras named, and a start-up that imports
no torch for --help and argument errors."""

import os
import subprocess
import sys
import types

import pytest
import torch

from lwkd_fast import check, cli, ops
from lwkd_fast.testing import Verdict

from conftest import NATIVE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lwkd_fast" in out and "torch" in out and "backend" in out
    native_line = next(line for line in out.splitlines() if line.startswith("native "))
    assert ("True" in native_line) == NATIVE
    if NATIVE:
        assert "lwkd::attention_discrepancy" in out and "CPU" in out


def _lines(out):
    return [" ".join(line.split()) for line in out.splitlines()]


def test_info_says_which_backend_runs_and_why(capsys):
    assert cli.main(["info"]) == 0
    lines = _lines(capsys.readouterr().out)
    if NATIVE:
        assert "cpu discrepancy ops -> native: the CPU kernels of lwkd_fast._C" in lines
        assert "cpu rate rule + optimizer step -> native: the CPU kernels of lwkd_fast._C" in lines
    else:
        assert "cpu discrepancy ops -> reference: native: " + ops._C_ERROR in lines
    if not torch.cuda.is_available():
        assert "cuda discrepancy ops -> nothing: no GPU is visible here" in lines


def test_info_backend_forced_by_environment(monkeypatch, capsys):
    monkeypatch.setenv("LWKD_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    assert "cpu discrepancy ops -> reference: forced: reference (LWKD_BACKEND / use_backend)" in \
        _lines(capsys.readouterr().out)
    monkeypatch.setenv("LWKD_BACKEND", "fast")
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LWKD_BACKEND: unknown backend 'fast'" in err[0]


def test_cuda_reason_is_the_known_one(monkeypatch):
    """A CPU-only torch (or a build that skipped CUDA) says so, not "built without CUDA?"."""
    monkeypatch.setattr(ops, "_C_BUILD", {})
    monkeypatch.setattr(torch.version, "cuda", None)
    assert ops._no_cuda_reason() == f"torch {torch.__version__} is a CPU-only build"
    monkeypatch.setattr(ops, "_C_BUILD", {"cuda_skipped": "nvcc (the CUDA toolkit) was not found at build time"})
    assert ops._no_cuda_reason() == "nvcc (the CUDA toolkit) was not found at build time"


def test_check_passes_and_prints_table(capsys):
    backends = ["native"] if NATIVE else ["reference"]
    args = ["check", "--quiet", "--device", "cpu"] + sum((["--backend", b] for b in backends), [])
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "attention_discrepancy" in out and "map_discrepancy" in out and "PASS" in out
    assert "FAIL" not in out
    assert "what runs here:" in out and "lwkd_fast._C: " in out


def _planted(monkeypatch, *cases):
    planted = types.SimpleNamespace(lwkd_checks=lambda backend, device: iter(cases))
    monkeypatch.setattr(check, "PROVIDERS", (planted,))


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    _planted(monkeypatch,
             check.Case("attention_discrepancy", "planted failure", torch.float32,
                        lambda: {"forward": Verdict(False, 1.0, 1e-6, "planted")}),
             check.Case("attention_discrepancy", "planted crash", torch.float32,
                        lambda: (_ for _ in ()).throw(ValueError("boom"))))
    assert cli.main(["check", "--quiet", "--backend", "reference", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "planted failure" in out and "ValueError: boom" in out
    assert "0/2 cases passed" in out


def test_check_fails_when_the_extension_exists_but_cannot_be_used(monkeypatch, capsys):
    _planted(monkeypatch, check.Case("attention_discrepancy", "planted pass", torch.float32,
                                     lambda: {"forward": Verdict(True, 0.0, 1e-6, "planted")}))
    monkeypatch.setattr(ops, "_C_STATE", "broken")
    monkeypatch.setattr(ops, "_C_ERROR", "lwkd_fast._C exists but cannot be used: planted")
    assert cli.main(["check", "--quiet", "--backend", "reference", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "1/1 cases passed" in out
    assert "FAIL install: lwkd_fast._C exists but cannot be used: planted; rebuild with `pip install " \
           "--no-build-isolation -e" in out


def _one_error_line(capsys):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")


@pytest.mark.parametrize("argv, flag, value, accepted", [
    (["check", "--device", "foo"], "--device", "'foo'", "expected cpu, cuda or cuda:N"),
    (["check", "--device", "cuda:"], "--device", "'cuda:'", "expected cpu, cuda or cuda:N"),
    (["check", "--backend", "gpu"], "--backend", "'gpu'", "choose from 'reference', 'native', 'triton'"),
    (["info", "--json", "/nonexistent/x"], "--json", "'/nonexistent/x'", "directory /nonexistent does not exist"),
    (["check", "--json", "/"], "--json", "'/'", "it is a directory"),
    (["bench", "--repeat", "-3"], "--repeat", "'-3'", "expected an integer >= 3"),
    (["bench", "--repeat", "0"], "--repeat", "'0'", "expected an integer >= 3"),
    (["bench", "--repeat", "x"], "--repeat", "'x'", "expected an integer >= 3"),
    (["bench", "--threads", "0"], "--threads", "'0'", "expected an integer >= 1"),
    (["bench", "--derivative-size", "-1"], "--derivative-size", "'-1'", "expected an integer >= 1"),
    (["bench", "--device", "tpu"], "--device", "'tpu'", "expected cpu, cuda or cuda:N"),
    (["bench", "--suite", "nope"], "--suite", "'nope'", "choose from 'attention'"),
    (["bench", "--plot", "/nonexistent/p.png"], "--plot", "'/nonexistent/p.png'", "does not exist"),
    (["demo", "--seeds", "0"], "--seeds", "'0'", "expected an integer >= 1"),
    (["demo", "--epochs", "0"], "--epochs", "'0'", "expected an integer >= 1"),
    (["demo", "--jobs", "-2"], "--jobs", "'-2'", "expected an integer >= 1"),
    (["demo", "--losses", "ce,nope"], "--losses", "'ce,nope'", "expected a comma-separated subset of ce,kd"),
    pytest.param(["check", "--device", "cuda"], "--device", "'cuda'", "no GPU is visible here", marks=NO_GPU),
    pytest.param(["bench", "--device", "cuda:0"], "--device", "'cuda:0'", "no GPU is visible here", marks=NO_GPU),
])
def test_bad_value_is_one_line_naming_flag_value_and_accepted(argv, flag, value, accepted, capsys, monkeypatch):
    monkeypatch.setattr(cli.COMMANDS["demo"], "needs", ())  # values are judged with or without the demo extra
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"lwkd-fast {argv[0]}: error: ")
    assert flag in line and value in line and accepted in line


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in _one_error_line(capsys)
    assert cli.main([]) == 2
    assert "the following arguments are required: COMMAND" in _one_error_line(capsys)


def test_missing_extra_names_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(cli.COMMANDS["demo"], "needs", (("lwkd_no_such_module", "no-such-package"),))
    assert cli.main(["demo", "--seeds", "1"]) == 1
    line = _one_error_line(capsys)
    assert line == ("lwkd-fast demo: needs no-such-package, which is not installed: "
                    "pip install 'lwkd-fast[demo]'")


def test_bench_plot_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["bench", "--plot", str(tmp_path / "p.png")]) == 2
    line = _one_error_line(capsys)
    assert "--plot" in line and "matplotlib is not installed: pip install 'lwkd-fast[demo]'" in line


def test_demo_needs_are_its_imports():
    """The modules `demo` is refused without are the ones lwkd_fast.demo imports lazily."""
    src = open(os.path.join(ROOT, "lwkd_fast", "demo.py")).read()
    for mod, _pip in cli.COMMANDS["demo"].needs:
        assert f"from {mod}" in src or f"import {mod}" in src


def test_help_and_argument_errors_import_no_torch():
    """--help and argument errors are answered before torch is imported (the ~3 s of start-up)."""
    code = (
        "import sys\n"
        "sys.argv[0] = '/venv/bin/lwkd-fast'  # as the console script runs it\n"
        "from lwkd_fast import cli\n"
        "for argv in (['--help'], ['bench', '--help'], ['check', '--help'], ['info', '--help'],\n"
        "             ['bench', '--repeat', '-3'], ['check', '--device', 'foo'], ['info', '--json', '/nonexistent/x'],\n"
        "             ['nope']):\n"
        "    rc = cli.main(argv)\n"
        "    assert rc in (0, 2), (argv, rc)\n"
        "    assert 'torch' not in sys.modules, argv\n"
        "print('no torch')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("no torch")
    assert "usage: lwkd-fast bench" in res.stdout and "--threads N" in res.stdout


def test_importing_the_package_registers_the_operator_library():
    """Outside the command line, ``import lwkd_fast`` registers torch.ops.lwkd.* at once (users call
    the ops directly, e.g. to benchmark them)."""
    code = "import lwkd_fast, torch\nprint(torch.ops.lwkd.attention_discrepancy.default._schema.name)\n"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if ops._C is None:
        pytest.skip(f"native extension not loaded: {ops._C_ERROR}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("lwkd::attention_discrepancy")


def test_backend_names_match_ops():
    assert list(cli.BACKEND_NAMES[:3]) == ops.BACKENDS[:3]
    assert set(ops.BACKENDS) <= set(cli.BACKEND_NAMES)


def test_check_runs_the_cuda_kernels_through_the_execution_layer(capsys):
    """`lwkd-fast check --backend cuda_emu` loads the CPU execution layer and holds the CUDA kernels
    to the SPEC tolerances like any backend."""
    rc = cli.main(["check", "--backend", "cuda_emu", "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "cuda_emu" in out and "FAIL" not in out
