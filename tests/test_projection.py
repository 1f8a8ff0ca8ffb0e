"""`d2r run --estimate` (d2r_lib.lab.projection): projected training cost, before anything runs."""
from __future__ import annotations

import math

import pytest

from d2r_lib import costmodel, data, experiments
from d2r_lib.lab import projection, runner
from d2r_lib.lab.cli import main as d2r

BASE = costmodel.CostModel(a=0.0, b=1e-3, c=costmodel.outer_steps("pgd_at"))


def _rows(profile, chapters, **params):
    runs = runner.plan(profile, out="/nonexistent-but-unused", chapters=chapters,
                       params=params, device="cpu")
    return projection.project(runs, BASE)


def test_shared_runs_are_counted_once_and_variants_are_kept():
    rows = _rows("cpu", ["02", "07"])
    keys = [(r["method"], tuple(sorted(r["changed"].items()))) for r in rows]
    assert len(keys) == len(set(keys))
    assert [r["chapter"] for r in rows if r["method"] == "pgd_at"] == ["02_adversarial_training"]
    swept = _rows("cpu", ["03"], betas="1, 6")                    # chapter 3's β sweep
    assert [(r["method"], r["changed"].get("beta")) for r in swept if r["method"] == "trades"] == [
        ("trades", None), ("trades", 1.0)]


def test_seconds_follow_the_cost_model():
    (row,) = _rows("cpu", ["02"], epochs=2)[1:]  # pgd_at: 4,000 images, 2 epochs, K = 5
    assert (row["method"], row["images"], row["epochs"], row["steps"]) == ("pgd_at", 4000, 2, 5)
    assert math.isclose(row["seconds"], 2 * 4000 * 1e-3 * (5 + costmodel.outer_steps("pgd_at")))
    (standard,) = _rows("cpu", ["01"])
    assert standard["steps"] == 0


def test_paper_profiles_carry_the_model_by_its_macs_at_the_data_sets_image_size():
    for profile, chapter, method in (("full", "02", "pgd_at"), ("full-tiny", "05", "d2r"),
                                     ("full-cifar100", "05", "d2r")):
        (row,) = [r for r in _rows(profile, [chapter]) if r["method"] == method]
        p = experiments.PROFILES[profile]
        spec = data.DATASETS[p.dataset]
        f = costmodel.model_macs(p.target_model, spec["num_classes"], spec["image_size"])
        g = costmodel.model_macs(p.guide_model, spec["num_classes"], spec["image_size"])
        images = projection.FULL_TRAIN_IMAGES[p.dataset]
        assert (row["images"], row["epochs"], row["steps"]) == (images, 100, 10)
        b = BASE.b * f / costmodel.model_macs("small_cnn")
        expected = 100 * images * b * (10 + costmodel.outer_steps(method, f, g))
        assert math.isclose(row["seconds"], expected, rel_tol=1e-12), profile


def test_estimate_refuses_a_bad_parameter_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert d2r(["run", "--profile", "full", "--chapters", "07", "-p", "epohcs=3", "--estimate",
                "--out", str(out)]) == 2
    assert "-p epohcs" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("profile", ["smoke"])
def test_estimate_prints_a_table_and_writes_nothing(tmp_path, capsys, profile):
    out = tmp_path / "out"
    assert d2r(["run", "--profile", profile, "--chapters", "02", "--estimate", "--out",
                str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "cost model here" in text and "pgd_at" in text and "total: 2 training run(s)" in text
    assert not out.exists()
