"""`lwkd-fast demo`: data split, teacher cache, verdict logic, and a tiny end-to-end run whose
results must not depend on the number of worker processes."""

import json
import os

import pytest
import torch

from lwkd_fast import cli, demo


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A 2-epoch teacher in a private cache directory."""
    monkeypatch.setenv("LWKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "TEACHER_CFG", dict(demo.TEACHER_CFG, epochs=2))
    return tmp_path


def test_split_is_stratified_and_deterministic():
    a = demo.load_digits_split(0)
    b = demo.load_digits_split(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    xtr, ytr, xte, yte = a
    assert xtr.shape[1:] == (1, 8, 8) and len(xtr) + len(xte) == 1797
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
    for c in range(10):  # every class in both splits, in proportion
        frac = float((yte == c).sum()) / float((ytr == c).sum() + (yte == c).sum())
        assert abs(frac - 1 / 3) < 0.02
    sub = demo.student_subset(a, 240)
    assert abs(len(sub[0]) - 240) <= 5 and torch.equal(sub[2], xte)
    assert torch.bincount(sub[1], minlength=10).min() >= 20


def test_teacher_is_cached_and_a_corrupt_cache_is_rebuilt(tiny):
    data = demo.load_digits_split(0)
    m1, acc1, how1 = demo.get_teacher(data, demo.TEACHER_CFG, log=lambda *_: None)
    m2, acc2, how2 = demo.get_teacher(data, demo.TEACHER_CFG, log=lambda *_: None)
    assert how1.startswith("trained") and how2.startswith("cached") and acc1 == acc2
    for (k, v), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    path = how2.split("cached teacher ")[1]
    with open(path, "wb") as fh:
        fh.write(b"not a checkpoint")
    msgs = []
    _, _, how3 = demo.get_teacher(data, demo.TEACHER_CFG, log=msgs.append)
    assert how3.startswith("trained") and "unreadable" in msgs[0]
    # the key covers the configuration
    assert demo.teacher_key(demo.TEACHER_CFG) != demo.teacher_key(dict(demo.TEACHER_CFG, epochs=3))


def _r(loss, rates, acc):
    return demo.RunResult(loss, rates, 0, acc)


def test_verdict_needs_two_standard_errors():
    rs = [_r("ce", "fixed", a) for a in (0.90, 0.91, 0.92)] + [_r("ce", "layerwise", a) for a in (0.95, 0.96, 0.97)]
    rs += [_r("kd", "fixed", a) for a in (0.90, 0.95, 0.92)] + [_r("kd", "layerwise", a) for a in (0.93, 0.91, 0.95)]
    rs += [_r("attention", "fixed", a) for a in (0.95, 0.96, 0.97)] + [_r("attention", "layerwise", a) for a in (0.90, 0.91, 0.92)]
    s = demo.summarize(rs)
    assert s["ce"]["verdict"] == "helped" and abs(s["ce"]["diff"] - 0.05) < 1e-9
    assert s["kd"]["verdict"] == "no clear difference"
    assert s["attention"]["verdict"] == "hurt"
    table = demo.format_table(s, 0.99, 3)
    assert "helped for: ce" in table and "they hurt for: attention" in table


def _run(tmp_path, jobs, name):
    out = tmp_path / name
    code = cli.main(["demo", "--losses", "ce,hessian", "--seeds", "1", "--epochs", "2", "--train-images", "100",
                     "--jobs", str(jobs), "--no-progress", "--out", str(out)])
    assert code == 0
    return json.loads((out / "demo.json").read_text()), out


def test_tiny_demo_end_to_end_and_independent_of_jobs(tiny, capsys):
    r1, out1 = _run(tiny, 1, "one")
    text = capsys.readouterr().out
    assert "student test accuracy" in text and "layer-wise rates" in text and "rate factors" in text
    assert (out1 / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = r1["runs"]
    assert sorted((r["loss"], r["rates"]) for r in runs) == [
        ("ce", "fixed"), ("ce", "layerwise"), ("hessian", "fixed"), ("hessian", "layerwise")]
    for r in runs:
        assert len(r["curve"]) == 2 and all(0.0 <= a <= 1.0 for a in r["curve"])
        assert len(r["factor_traj"]) == 2 and len(r["factor_traj"][0]) == 3
        if r["rates"] == "fixed":  # gamma = 0: every factor stays exactly 1
            assert all(m == 1.0 for row in r["factor_traj"] for m in row)
        else:
            assert any(m != 1.0 for row in r["factor_traj"] for m in row)
    r2, _ = _run(tiny, 2, "two")
    key = lambda r: (r["loss"], r["rates"], r["seed"])  # noqa: E731
    for a, b in zip(sorted(r1["runs"], key=key), sorted(r2["runs"], key=key)):
        assert a["curve"] == b["curve"] and a["factor_traj"] == b["factor_traj"]
