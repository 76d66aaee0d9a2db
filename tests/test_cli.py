"""The `lwkd-fast` command line: info and check (pass table and failing exit status)."""

import torch

from lwkd_fast import check, cli
from lwkd_fast.testing import Verdict

from conftest import NATIVE


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lwkd_fast" in out and "torch" in out and "backend" in out
    native_line = next(line for line in out.splitlines() if line.startswith("native "))
    assert ("True" in native_line) == NATIVE
    if NATIVE:
        assert "lwkd::attention_discrepancy" in out and "CPU" in out


def test_check_passes_and_prints_table(capsys):
    backends = ["native"] if NATIVE else ["reference"]
    args = ["check", "--quiet", "--device", "cpu"] + sum((["--backend", b] for b in backends), [])
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "attention_discrepancy" in out and "map_discrepancy" in out and "PASS" in out
    assert "FAIL" not in out


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    def failing(backend, device):
        yield check.Case("attention_discrepancy", "planted failure", torch.float32,
                         lambda: {"forward": Verdict(False, 1.0, 1e-6, "planted")})
        yield check.Case("attention_discrepancy", "planted crash", torch.float32,
                         lambda: (_ for _ in ()).throw(ValueError("boom")))

    monkeypatch.setattr(check, "lwkd_checks", failing)
    monkeypatch.setattr(check, "PROVIDERS", ("lwkd_fast.check",))
    assert cli.main(["check", "--quiet", "--backend", "reference", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "planted failure" in out and "ValueError: boom" in out
    assert "0/2 cases passed" in out


def test_unknown_backend_exit_code(capsys):
    assert cli.main(["check", "--backend", "gpu"]) == 2
