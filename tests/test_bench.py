"""`lwkd-fast bench`: noise detection (spread, contention, threads), verdicts only on numbers
that can be judged, machine state in the JSON, full case names, the token-layout case's
agreement check, and the progress line / message capture."""

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from lwkd_fast import benchmarking as bm
from lwkd_fast import bench, cli, reference
from lwkd_fast.bench import attention as A
from lwkd_fast.bench import core, runner

from conftest import NATIVE


def stats(median=1.0, iqr=0.1, n=20, other_cpu=0.0, threads=1):
    return bm.Stats(median, median - iqr / 2, median + iqr / 2, median - iqr, median + iqr, n, [],
                    other_cpu, threads)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bm, "usable_cores", lambda: 2)


def test_suite_names_are_the_registered_suites():
    assert sorted(bench.SUITE_NAMES) == sorted(core.SUITES)


@pytest.mark.parametrize("kw, reason", [
    (dict(), None),
    (dict(n=2), "only 2 timed runs"),
    (dict(iqr=0.4), "IQR 40% of the median"),
    (dict(threads=4), "4 torch threads on 2 usable cores"),
    # 2 threads on 2 cores: any real background load takes cores the run needs
    (dict(threads=2, other_cpu=0.3), "contended: other processes used 0.6 of 2 cores beside 2 torch threads"),
    (dict(threads=2, other_cpu=0.05), None),   # within the slack
    (dict(threads=1, other_cpu=0.5), None),    # one busy core, one thread: like for like
    (dict(threads=1, other_cpu=0.8), "contended: other processes used 1.6 of 2 cores beside 1 torch threads"),
    (dict(other_cpu=None), None),              # unknown (not Linux): not held against the run
])
def test_noise_reasons(two_cores, kw, reason):
    assert bm.noise(stats(**kw)) == reason


@pytest.mark.parametrize("ratio, goal, rel_se, relation, noise, verdict", [
    (3.5, 3.0, 0.02, ">=", [], "met"),
    (2.5, 3.0, 0.02, ">=", [], "missed"),
    (3.05, 3.0, 0.02, ">=", [], "unclear"),      # 1.7% above the goal, 2 SE = 4%
    (1.02, 1.05, 0.005, "<=", [], "met"),        # overhead 2% <= 5%
    (1.10, 1.05, 0.005, "<=", [], "missed"),
    (30.0, 3.0, 0.02, ">=", ["contended: ..."], "not judged"),
])
def test_judge(ratio, goal, rel_se, relation, noise, verdict):
    j = runner.judge(ratio, goal, rel_se, relation, noise)
    assert j["verdict"] == verdict
    assert j["met"] == {"met": True, "missed": False}.get(verdict)


def _attention_rows(native, eager, compiled, read):
    case = "K=4 x (128, 64, 32, 32) fp32 fwd+bwd"
    rows = [core.Row("attention", case, name, st, "eager", nbytes=1 << 20, read_stats=read)
            for name, st in (("eager", eager), ("torch.compile", compiled), ("native", native))]
    base = eager.median
    return [r.as_dict(1e9, base) for r in rows]


def _result(rows):
    return {"machine": bm.machine_info(), "device": "cpu", "quick": False, "repeat": 20,
            "read_bandwidth_gbps": 1.0, "rows": rows,
            "state": {"load_average_start": (0.1, 0.2, 0.3), "load_average_end": (0.4, 0.5, 0.6),
                      "other_cpu_whole_run": 0.01, "threads_requested": None, "noisy_rows": 0}}


def test_targets_judged_on_steady_numbers(two_cores):
    rows = _attention_rows(native=stats(0.02, 0.001), eager=stats(0.2, 0.01), compiled=stats(0.05, 0.002),
                           read=stats(0.01, 0.0005))
    ts = {t["target"]: t for t in runner.targets(_result(rows))}
    assert ts["attention fwd+bwd: native vs eager"]["verdict"] == "met"
    assert ts["attention fwd+bwd: native vs eager"]["value"] == pytest.approx(10.0)
    assert ts["attention fwd+bwd: native vs torch.compile"]["verdict"] == "met"
    assert ts["attention fwd+bwd: fraction of read roofline"]["verdict"] == "missed"   # 50% < 60%


def test_targets_not_judged_on_a_loaded_machine(two_cores):
    loaded = dict(other_cpu=0.8, threads=2)
    rows = _attention_rows(native=stats(0.02, 0.001, **loaded), eager=stats(0.6, 0.01, **loaded),
                           compiled=stats(0.05, 0.002, **loaded), read=stats(0.01, 0.0005, **loaded))
    result = _result(rows)
    result["targets"] = runner.targets(result)
    assert {t["verdict"] for t in result["targets"]} == {"not judged"}
    assert all(t["met"] is None and "contended" in t["why"] for t in result["targets"])
    table = runner.format_table(result)
    target_lines = [line for line in table.split("targets (")[1].splitlines() if line.startswith("  ")]
    assert len(target_lines) == 3 and all(line.startswith("  not judged ") for line in target_lines)
    assert "3 of 3 targets not judged: this run was too noisy to judge them" in table
    assert "NOISY: contended" in table


def test_a_noisy_row_blocks_only_its_targets(two_cores):
    rows = _attention_rows(native=stats(0.02, 0.001), eager=stats(0.2, 0.01), compiled=stats(0.05, 0.03),
                           read=stats(0.01, 0.0005))
    ts = {t["target"]: t for t in runner.targets(_result(rows))}
    assert ts["attention fwd+bwd: native vs eager"]["verdict"] == "met"
    vs_compile = ts["attention fwd+bwd: native vs torch.compile"]
    assert vs_compile["verdict"] == "not judged" and vs_compile["why"] == "IQR 60% of the median (torch.compile)"


def test_table_keeps_whole_case_names_and_states_the_machine():
    long_case = "sgd step, ResNet-18 (11.7M params, 62 tensors) and a much longer description"
    row = core.Row("optimizer", long_case, "lwkd fused (native) with a long name", stats(0.005, 0.0001),
                   "lwkd fused (native) with a long name").as_dict(1e9, 0.005)
    table = runner.format_table(_result([row]))
    assert long_case in table and "lwkd fused (native) with a long name" in table
    assert "machine state: load average 0.10/0.20/0.30 before the run, 0.40/0.50/0.60 after; " \
           "other processes used 1% of the" in table
    md = runner.format_markdown(_result([row]))
    assert f"| optimizer | {long_case} | lwkd fused (native) with a long name | 5.00 ms |" in md


def test_cpu_clock_counts_other_processes():
    clock = bm.CpuClock()
    if clock.other_share() is None:
        pytest.skip("no /proc/stat")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    clock.start()
    # wait for the child to finish without reaping it: a reaped child's CPU time would count as
    # this process's own (RUSAGE_CHILDREN), an unreaped one's as another process's
    os.waitid(os.P_PID, busy.pid, os.WEXITED | os.WNOWAIT)
    share = clock.other_share()
    busy.wait()
    assert 0.5 / os.cpu_count() <= share <= 1.0  # the busy child had one core


def test_measure_round_robin_records_the_window():
    x = torch.ones(1000)
    st = bm.measure_round_robin({"a": x.sum, "b": x.mean}, repeat=5, warmup=1)
    for s in st.values():
        assert s.n == 5 and s.threads == torch.get_num_threads()
        assert s.other_cpu is None or 0.0 <= s.other_cpu <= 1.0
        assert "noise" in s.as_dict() and "other_cpu" in s.as_dict()


def test_status_line_only_on_a_terminal():
    plain = io.StringIO()
    line = runner.StatusLine(plain)
    line("attention: timing")
    line.close()
    assert plain.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    line = runner.StatusLine(tty)
    line("attention: timing")
    assert tty.getvalue().startswith("\r\x1b[Kbench [") and tty.getvalue().endswith("attention: timing")


def test_messages_during_the_run_are_kept_for_after_the_table(capsys):
    with runner.collect_messages() as caught:
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/x")
        warnings.warn("planted", UserWarning)
    assert capsys.readouterr().err == ""
    assert caught.messages == ["torch.utils.cpp_extension: No CUDA runtime is found, using CUDA_HOME='/x'",
                               "UserWarning: planted"]


def test_run_records_machine_state_and_threads(monkeypatch, capsys, tmp_path):
    """`lwkd-fast bench --threads 1 --json` on a tiny registered suite: the JSON carries the machine
    state, every row its window, and torch ran with the requested threads."""
    def tiny(ctx):
        x = torch.ones(4096)
        st = bm.measure_round_robin({"sum": x.sum, "mean": x.mean}, repeat=ctx.repeat)
        return [core.Row("tiny", "4096 floats", k, v, "sum") for k, v in st.items()]

    monkeypatch.setattr(core, "SUITES", {"tiny": tiny})
    monkeypatch.setattr(runner, "SUITES", core.SUITES)
    monkeypatch.setattr(bench, "SUITE_NAMES", ("tiny",))
    monkeypatch.setattr(runner, "read_bandwidth", lambda nbytes, device=None: 1e9)
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "b.json"
        assert cli.main(["bench", "--suite", "tiny", "--threads", "1", "--repeat", "3", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["state"]["threads_requested"] == 1 and result["machine"]["torch_threads"] == 1
    assert set(result["state"]) >= {"load_average_start", "load_average_end", "other_cpu_whole_run", "noisy_rows"}
    assert {r["impl"] for r in result["rows"]} == {"sum", "mean"}
    assert all(r["threads"] == 1 and r["n"] == 3 and "noise" in r for r in result["rows"])
    assert "machine state: " in capsys.readouterr().out


def test_eager_baseline_token_layout_is_the_reference():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 7, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)]
    t = [torch.randn(2, 7, 9, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g, dtype=torch.float64)]
    D = reference.attention_discrepancy(s, t, channel_dim=-1)  # (K, B)
    torch.testing.assert_close(reference.eager_at_loss(s, t, channel_dim=-1), D.mean(1).sum(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_case_agreement_check(dtype):
    s, t = A.token_inputs(4, 3, 33, 8, 16, "cpu", dtype)
    impls = [(n, f) for n, f in A.implementations(torch.device("cpu")) if n != "torch.compile"]
    assert [n for n, _ in impls] == (["eager", "native"] if NATIVE else ["eager"])
    A.check_agreement("tiny tokens", impls, s, t, -1)

    def off(s, t, channel_dim):
        return [g * 1.05 for g in A.step_eager(s, t, channel_dim)]

    with pytest.raises(AssertionError, match=r"bench attention tiny tokens: off grad\[0\] disagrees with the float64"):
        A.check_agreement("tiny tokens", [("off", off)], s, t, -1)


def test_agreement_check_slices_the_batch_exactly():
    """The check compares the first CHECK_BATCH samples of the full run with the reference on
    those samples scaled by n / B: a full-batch float64 run gives the same gradients."""
    s, t = A.attention_inputs(2, 20, 3, 4, 4, "cpu", dtype=torch.float64)
    A.check_agreement("float64 slice", [("eager", A.step_eager)], s, t, 1)
    assert A.CHECK_BATCH < 20


def test_readme_and_help_agree_on_the_quick_time():
    import argparse
    import re

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    quick = next(a.help for a in p._actions if "--quick" in a.option_strings)
    claim = re.search(r"\((about [^)]*)\)", quick).group(1)
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    assert f"`--quick` (smaller problems, 5 runs) takes {claim}" in " ".join(readme.split())
