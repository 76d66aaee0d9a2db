"""`lwkd-fast demo`: data split, teacher cache, the paired statistics and their verdicts (held
against simulations with and without a real effect), the figure, argument checks, and a tiny
end-to-end run whose results must not depend on the number of worker processes."""

import json
import random

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
    for n in (240, 50, 37, 10):  # exactly n images, every class in proportion
        sub = demo.student_subset(a, n)
        counts = torch.bincount(sub[1], minlength=10)
        assert len(sub[0]) == n and torch.equal(sub[2], xte)
        assert int(counts.min()) >= 1 and int(counts.max()) - int(counts.min()) <= 1 + n // 60
    assert torch.equal(demo.student_subset(a, 50)[0], demo.student_subset(a, 50)[0])
    with pytest.raises(ValueError, match="student_subset: need at least one image per class"):
        demo.student_subset(a, 9)


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


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def _table(rng, seeds, effect=None, sd=1.5, seed_sd=1.0, setting="scarce"):
    """Synthetic results of one setting: every (loss, arm) on the same seeds; a seed shifts all
    arms alike (shared initial weights); ``effect`` maps arm -> true difference in points."""
    effect = effect or {}
    out = []
    for s in range(seeds):
        base = 80.0 + rng.gauss(0, seed_sd)
        for loss in demo.LOSSES:
            for arm in demo.arms_of(loss):
                acc = base + effect.get(arm, 0.0) + rng.gauss(0, sd)
                out.append(demo.RunResult(setting, loss, arm, s, acc / 100))
    return out


def _called(summary):
    return [c for c in summary["comparisons"] if c["verdict"] != "not enough seeds"
            and not c["verdict"].startswith("no difference")]


@pytest.mark.parametrize("seeds", [3, 10])
def test_no_effect_gives_a_false_verdict_in_at_most_5_percent_of_tables(seeds):
    """The issue's simulation: with no real effect, unpaired 2-SE verdicts called 11.5% of rows
    and 46% of tables.  Paired, simultaneous intervals keep false "helped"/"hurt" to the
    family-wise 5% (Bonferroni is conservative: far fewer)."""
    rng = random.Random(seeds)
    tables = 300
    false_tables = 0
    rows = 0
    for _ in range(tables):
        summ = demo.summarize(_table(rng, seeds))
        rows = len(summ["comparisons"])
        false_tables += bool(_called(summ))
    assert rows == 9
    assert false_tables / tables <= 0.05 + 3 * (0.05 * 0.95 / tables) ** 0.5


def test_real_effect_is_found_with_enough_seeds():
    """'running' 3 points better than both others, 'none' equal to fixed: with 12 seeds the
    intervals call the first and rule out a 1-point difference for the second."""
    summ = demo.summarize(_table(random.Random(1), 12, effect={"running": 3.0}, sd=0.4))
    by = {(c["loss"], c["a"], c["b"]): c for c in summ["comparisons"]}
    for loss in demo.MATCHING:
        assert by[(loss, "running", "fixed")]["verdict"] == "helped"
        assert by[(loss, "running", "none")]["verdict"] == "'running' better"
        assert by[(loss, "none", "fixed")]["verdict"] == "no difference > 1 pt"
        c = by[(loss, "running", "fixed")]
        assert c["lo"] < 3.0 < c["hi"] and c["n"] == 12 and len(c["diffs"]) == 12
    assert summ["family_size"] == 9 and abs(summ["interval_level"] - (1 - 0.05 / 9)) < 1e-12
    text = demo.format_table(summ, 0.99, {"scarce": "synthetic"})
    assert "helped" in text and "'running' better" in text and "Bonferroni over the 9 comparisons" in text


@pytest.mark.parametrize("seeds", [1, 2])
def test_too_few_seeds_give_no_verdict(seeds):
    """One seed has no spread (the old table called any difference "helped"); two have one degree
    of freedom: every comparison says "not enough seeds", even for a large difference."""
    summ = demo.summarize(_table(random.Random(0), seeds, effect={"running": 5.0}, sd=0.01))
    assert {c["verdict"] for c in summ["comparisons"]} == {"not enough seeds"}
    text = demo.format_table(summ, 0.99, {"scarce": "synthetic"})
    assert f"cannot be decided with {seeds} seed" in text and "a verdict needs at least 3" in text


def test_identical_differences_are_not_infinitely_precise():
    """Differences equal on every seed (sd 0) use one test image as the smallest spread."""
    rs = _table(random.Random(0), 3, sd=0.0)
    summ = demo.summarize(rs, resolution=100 / 599)
    for c in summ["comparisons"]:
        assert c["sd"] == 0.0 and c["hi"] - c["lo"] > 2 * 100 / 599


def test_seeds_needed_gives_the_promised_power():
    """With the seeds seeds_needed() asks for, a true 1-point difference is called in about 80%
    of simulated runs (9 comparisons, paired sd 1 point)."""
    n = demo.seeds_needed(1.0, 9)
    assert n == demo.seeds_needed(1.0, 9) and demo.seeds_needed(2.0, 9) > n > demo.seeds_needed(0.5, 9)
    rng = random.Random(7)
    hits, trials = 0, 150
    for _ in range(trials):
        diffs = [1.0 + rng.gauss(0, 1.0) for _ in range(n)]
        m, sd = demo._mean_std(diffs)
        half = demo.t_quantile(1 - 0.05 / 18, n - 1) * sd / n ** 0.5
        hits += m - half > 0
    assert 0.68 <= hits / trials <= 0.95


# ------------------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------------------


def _synthetic_runs(epochs=6):
    rng = random.Random(3)
    out = []
    for st in demo.SETTINGS:
        for r in _table(rng, 3, setting=st):
            r.curve = [min(0.99, r.test_acc * (1 - 0.5 ** (e + 1))) for e in range(epochs)]
            r.test_acc = r.curve[-1]
            r.factor_traj = [[1.0] * 3 if r.arm == "fixed" else [1 + 0.05 * e * (j - 1) for j in range(3)]
                             for e in range(epochs)]
            out.append(r)
    return out


def test_plot_legend_covers_no_data_and_each_encoding_has_one_meaning(tmp_path):
    runs = _synthetic_runs()
    summ = demo.summarize(runs)
    settings = {st: dict(cfg) for st, cfg in demo.SETTINGS.items()}
    fig = demo.plot(runs, summ, str(tmp_path / "demo.png"), 0.995, settings)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # (plot() closed the figure after saving it)
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:  # the legend sits outside every panel
        assert not legend.overlaps(ax.get_window_extent(renderer))
    colour, style, seen = {}, {}, 0
    for ax in fig.axes:
        for line in ax.get_lines():
            gid = line.get_gid() or ""
            if gid.startswith(("acc|", "factor|")):
                _, _, loss, arm = gid.split("|")[:4]
                colour.setdefault(loss, set()).add(line.get_color())
                style.setdefault(arm, set()).add(line.get_linestyle())
                seen += 1
    assert seen > 20
    assert all(len(v) == 1 for v in colour.values()) and all(len(v) == 1 for v in style.values())
    assert len({next(iter(v)) for v in colour.values()}) == len(colour)  # distinct per loss
    assert len({next(iter(v)) for v in style.values()}) == len(style)    # distinct per arm
    # the accuracy panels plot test error on a log axis fitted to every curve and band
    acc_axes = [ax for ax in fig.axes if any((ln.get_gid() or "").startswith("acc|") for ln in ax.get_lines())]
    assert len(acc_axes) == 2
    for ax in acc_axes:
        lo, hi = ax.get_ylim()
        values = [v for ln in ax.get_lines() if (ln.get_gid() or "").startswith("acc|") for v in ln.get_ydata()]
        assert ax.get_yscale() == "log" and lo <= min(values) and max(values) <= hi <= 100.0
        assert min(min(values), 100 * (1 - 0.995)) < 1.3 * lo  # fitted to the curves and the teacher


# ------------------------------------------------------------------------------------------------
# The command, end to end (tiny: 1 epoch, 1-2 seeds)
# ------------------------------------------------------------------------------------------------


def test_unknown_setting_or_loss_is_refused(capsys):
    assert cli.main(["demo", "--settings", "scarce,tiny", "--no-progress"]) == 2
    assert "--settings 'scarce,tiny': unknown setting 'tiny'" in capsys.readouterr().err
    assert cli.main(["demo", "--losses", "mse", "--no-progress"]) == 2
    assert "--losses 'mse': unknown loss 'mse'" in capsys.readouterr().err


def _run(out, jobs, seeds=1, resume=False):
    code = cli.main(["demo", "--losses", "ce,hessian", "--seeds", str(seeds), "--epochs", "1", "--settings", "scarce",
                     "--jobs", str(jobs), "--no-progress", "--out", str(out)] + (["--resume"] if resume else []))
    assert code == 0
    return json.loads((out / "demo.json").read_text())


def _key(r):
    return (r["setting"], r["loss"], r["arm"], r["seed"])


def _numbers(r):
    return (r["test_acc"], r["curve"], r["factor_traj"])


def test_tiny_demo_end_to_end_and_independent_of_jobs(tiny, capsys):
    r1 = _run(tiny / "one", 1)
    text = capsys.readouterr().out
    assert "paired differences" in text and "layer-wise, rule 'running'" in text and "rate factors" in text
    assert "not enough seeds" in text and "helped" not in text
    assert (tiny / "one" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the exact number of images the students saw
    assert r1["student_cfg"]["settings"]["scarce"]["train_images"] == 50
    assert "scarce': 50 training images" in text
    runs = r1["runs"]
    assert sorted((r["loss"], r["arm"]) for r in runs) == [
        ("ce", "fixed"), ("hessian", "fixed"), ("hessian", "none"), ("hessian", "running")]
    for r in runs:
        assert len(r["curve"]) == 1 and all(0.0 <= a <= 1.0 for a in r["curve"])
        assert len(r["factor_traj"]) == 1 and len(r["factor_traj"][0]) == 3
        if r["arm"] == "fixed":  # gamma = 0: every factor stays exactly 1
            assert all(m == 1.0 for row in r["factor_traj"] for m in row)
        else:
            assert any(m != 1.0 for row in r["factor_traj"] for m in row)
    assert [c["verdict"] for c in r1["summary"]["comparisons"]] == ["not enough seeds"] * 3
    r2 = _run(tiny / "two", 2)
    for a, b in zip(sorted(r1["runs"], key=_key), sorted(r2["runs"], key=_key)):
        assert _key(a) == _key(b) and _numbers(a) == _numbers(b)


def test_resume_takes_the_recorded_runs_of_the_same_configuration(tiny, capsys):
    out = tiny / "run"
    first = _run(out, 1)
    record = (out / demo.RUN_RECORD).read_text().splitlines()
    assert len(record) == 4 and first["resumed_runs"] == 0
    # an interruption: the last run's line cut short, as a kill mid-write leaves it
    (out / demo.RUN_RECORD).write_text("\n".join(record[:-1] + [record[-1][:40]]) + "\n")
    capsys.readouterr()
    second = _run(out, 1, seeds=2, resume=True)
    assert "resumed 3 of 8 runs" in capsys.readouterr().out and second["resumed_runs"] == 3
    by_key = {_key(r): r for r in second["runs"]}
    assert sorted(by_key) == sorted((("scarce",) + k[1:3] + (s,)) for k in map(_key, first["runs"]) for s in (0, 1))
    for r in first["runs"]:  # resumed or trained again: the same numbers
        assert _numbers(by_key[_key(r)]) == _numbers(r)
    # every run of both seeds is now recorded: nothing left to train
    assert _run(out, 1, seeds=2, resume=True)["resumed_runs"] == 8
    # another configuration (2 epochs) takes none of them; without --resume the record starts over
    code = cli.main(["demo", "--losses", "ce", "--seeds", "1", "--epochs", "2", "--settings", "scarce",
                     "--jobs", "1", "--no-progress", "--out", str(out), "--resume"])
    assert code == 0 and json.loads((out / "demo.json").read_text())["resumed_runs"] == 0
    _run(out, 1)
    assert len((out / demo.RUN_RECORD).read_text().splitlines()) == 4
