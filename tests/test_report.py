"""d2r_lib.report: tables, intervals, noise-aware verdicts and glue."""
import math

import pytest
import torch

from d2r_lib import evaluate, report


def test_table_from_dicts_renders_markdown_with_aligned_columns():
    t = report.table([{"model": "standard", "clean (%)": 61.25, "n": 1000},
                      {"model": "a|b", "clean (%)": None, "n": 250}],
                     caption="Accuracy", formats={"clean (%)": ".1f"})
    md = t._repr_markdown_()
    assert md.splitlines()[0] == "**Accuracy**"
    assert "| model | clean (%) | n |" in md
    assert "|:---|---:|---:|" in md
    assert "| standard | 61.2 | 1,000 |" in md
    assert "| a\\|b | — | 250 |" in md          # a pipe in a cell is escaped, None shows as —
    assert t.column("n") == [1000, 250]
    assert str(t).splitlines()[1].startswith("model")


def test_table_from_a_mapping_sequences_and_results_table():
    t = report.table({"β = 0": {"clean": 0.5, "ok": True}}, index="run")
    assert t.columns == ["run", "clean", "ok"] and t.text == [["β = 0", "0.5", "yes"]]
    s = report.table([[1, 2.0]], columns=["a", "b"])
    assert s.text == [["1", "2"]]
    with pytest.raises(ValueError, match="need `columns`"):
        report.table([[1, 2]])
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        report.table([[1]], columns=["a", "b"])
    with pytest.raises(ValueError, match="unknown column"):
        report.table([{"a": 1.0}], formats={"b": ".1f"})
    results = evaluate.ResultsTable({"std": {"clean": 0.612, "pgd20": 0.004}})
    r = report.table(results, caption="on 250 images")
    assert r.columns == ["model", "Clean (%)", "PGD-20 (%)"]
    assert r.text == [["std", "61.2", "0.4"]]


@pytest.mark.parametrize("low, high, expected", [
    (0.1, 0.3, "more"), (-0.3, -0.1, "less"), (-0.1, 0.2, "undecided"), (0.0, 0.2, "undecided"),
    (float("nan"), float("nan"), "undecided"), (torch.tensor(0.2), torch.tensor(0.4), "more")])
def test_verdict_is_undecided_when_the_interval_holds_zero(low, high, expected):
    assert report.verdict(low, high, higher="more", lower="less") == expected


def test_paired_interval_of_two_models_on_the_same_images():
    a = torch.tensor([1, 1, 1, 0] * 50, dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0] * 50, dtype=torch.bool)
    d = report.paired(a, b)
    assert d.n == 200 and d.mean == pytest.approx(0.25)
    sd = torch.tensor([0, 1, 0, 0] * 50).float().std().item()
    assert d.high - d.mean == pytest.approx(1.959964 * sd / math.sqrt(200), rel=1e-4)
    assert d.verdict() == "higher" and d.decided
    assert "200 test images, one training seed" in str(d)
    same = report.paired(a, a)
    assert same.verdict() == "undecided"        # no discordant image: no evidence either way
    small = report.paired([1, 0, 1], [0, 1, 1])
    assert small.verdict() == "undecided"
    with pytest.raises(ValueError, match="same images"):
        report.paired([1, 0], [1])


def test_over_seeds_uses_a_t_interval_and_one_seed_is_undecided():
    d = report.over_seeds([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert d.mean == pytest.approx(0.2)
    half = 4.302653 * 0.1 / math.sqrt(3)        # t(0.975, 2) · sd / √n
    assert (d.low, d.high) == pytest.approx((0.2 - half, 0.2 + half), rel=1e-4)
    assert d.about == "3 seeds" and d.verdict() == "undecided"   # 3 seeds this spread: too few
    assert report.over_seeds([0.5, 0.55, 0.6], [0.4] * 3).verdict() == "higher"
    one = report.over_seeds([0.5], [0.4])
    assert math.isnan(one.low) and one.verdict() == "undecided"
    assert str(one).startswith("+10.0 points (95 % interval n/a to n/a; 1 seed")
    raw = report.over_seeds([1.0, 2.0], scale=1, unit="")
    assert raw.shown(raw.mean) == "+1.5"


def test_glue_makes_plain_numbers_and_checks_the_name(monkeypatch):
    got = []
    monkeypatch.setattr(report, "_glue", lambda name, value, display: got.append((name, value)))
    report.glue("ch1_acc", torch.tensor(0.25))
    report.glue("ch1_word", "undecided")
    assert got == [("ch1_acc", 0.25), ("ch1_word", "undecided")]
    assert type(got[0][1]) is float
    with pytest.raises(ValueError, match="glue name"):
        report.glue("not a name", 1)
