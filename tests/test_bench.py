"""bench: the quick path prints the table and writes the JSON report; bad arguments are refused
before anything is measured or written; the official-style step is the official D2R step."""
import argparse
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from d2r_lib import costmodel, methods, models
from d2r_lib.lab import bench

DATA_DIRS = [Path(__file__).resolve().parents[1].parent / "shared" / "data",
             Path(os.environ.get("D2R_DATA_DIR", "/nonexistent"))]
SHARED_DATA = next((d for d in DATA_DIRS if (d / "cifar10_train_7897.npz").exists()), None)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


TINY = ["--quick", "--pairs", "small_cnn:small_cnn:4:1", "small_cnn:small_cnn:2:2",
        "--methods", "standard,trades,d2r", "--repeats", "1", "--warmup", "0",
        "--eval-batch-size", "4", "--scaling-batches", "2,4", "--scaling-steps", "1,2",
        "--device", "cpu"]


def test_quick_path_prints_the_table_and_writes_the_json(tmp_path, capsys):
    """With the offline data the train.fit epoch is timed; without it the report says skipped."""
    data_dir = SHARED_DATA or tmp_path / "no_data"
    data_dir.mkdir(exist_ok=True)
    out = tmp_path / "reports" / "bench.json"
    out.parent.mkdir()
    fit = ["--fit-images", "8", "--data-dir", str(data_dir)]
    assert bench.main(_args(*TINY, *fit, "--json", str(out))) == 0
    printed = capsys.readouterr().out
    for text in ("ours img/s", "official", "ours/off", "floor/ours", "of peak", "PGD-20 evaluation",
                 "scaling against batch size", "scaling against steps", f"report: {out}",
                 "with both (the cpu profile's fast paths) the d2r step runs at about"):
        assert text in printed
    report = json.loads(out.read_text())
    assert set(report) >= {"meta", "peak_flops", "pairs", "fast", "scaling"}
    assert report["meta"]["quick"] is True and report["meta"]["device"] == "cpu"
    assert report["peak_flops"] > 0
    first, second = report["pairs"]
    assert (first["batch_size"], first["steps"]) == (4, 1)
    assert (second["batch_size"], second["steps"]) == (2, 2)
    assert [r["method"] for r in first["rows"]] == ["standard", "trades", "d2r"]
    assert [r["method"] for r in second["rows"]] == ["d2r"]  # D2R only after the first pair
    for row in first["rows"] + second["rows"]:
        assert row["images_per_s"] > 0 and row["floor_seconds"] > 0 and 0 < row["fraction_of_peak"]
        assert row["floor_over_ours"] == pytest.approx(row["floor_seconds"] / row["seconds"])
        assert ("official_seconds" in row) == (row["method"] == "d2r")
    d2r = first["rows"][2]
    assert d2r["ours_over_official"] == pytest.approx(d2r["official_seconds"] / d2r["seconds"])
    assert set(d2r["floor_parts"]) == {"reference", "attack_step", "train", "update"}
    assert set(first["rows"][0]["floor_parts"]) == {"train", "update"}  # standard: no attack
    flops = bench.step_flops("d2r", "small_cnn", "small_cnn", steps=1)
    assert d2r["step_gflop"] == pytest.approx(flops * 4 / 1e9)
    fast = report["fast"]
    assert fast["cag_fold_speedup"] > 0 and fast["eval"][0]["model"] == "small_cnn"
    scaling = report["scaling"]
    assert [(r["batch_size"], r["steps"]) for r in scaling["batch_size"]] == [(2, 1), (4, 1)]
    assert [(r["batch_size"], r["steps"]) for r in scaling["steps"]] == [(4, 1), (4, 2)]
    if SHARED_DATA is not None:
        assert report["fit"]["fit_images_per_s"] > 0 and report["fit"]["fit_over_step"] > 0
        assert "train.fit: " in printed and "× the step alone" in printed
    else:
        assert report["fit"]["skipped"].startswith("no data")
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left


BAD = [
    (["--pairs", "small_cnn"], "--pairs entries must be target:guide"),
    (["--pairs", "small_cnn:nope"], "--pairs guide must be one of"),
    (["--pairs", "nope:small_cnn:4"], "--pairs target must be one of"),
    (["--pairs", "small_cnn:small_cnn:0"], "positive integers"),
    (["--pairs", "small_cnn:small_cnn:4:x"], "positive integers"),
    (["--methods", "d2r,nope"], "--methods must be one of"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--fit-images", "-1"], "--fit-images must be >= 0"),
    (["--pairs", "small_cnn:small_cnn:8", "--fit-images", "3"], "--fit-images must be 0 or at"),
    (["--eval-models", "nope"], "--eval-models must be one of"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--scaling-batches", "4,0"], "--scaling-batches entry must be >= 1"),
    (["--scaling-steps", "0"], "--scaling-steps entry must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--data-dir", "/nonexistent/folder"], "--data-dir"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_are_refused_before_measuring(argv, message, tmp_path, monkeypatch):
    def measured(**kwargs):
        raise AssertionError("measured before every argument was checked")

    monkeypatch.setattr(bench, "run", measured)
    monkeypatch.setattr(bench, "peak_flops", measured)
    out = tmp_path / "bench.json"
    with pytest.raises((ValueError, TypeError), match=message):
        bench.main(_args("--quick", *argv, "--json", str(out)))
    assert list(tmp_path.iterdir()) == []


def test_json_path_is_checked_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda **kw: pytest.fail("measured"))
    with pytest.raises(ValueError, match="--json: the folder .* does not exist"):
        bench.main(_args("--quick", "--json", str(tmp_path / "missing" / "b.json")))
    with pytest.raises(ValueError, match="--json must be a file path"):
        bench.main(_args("--quick", "--json", str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        _args("--scaling-batches", "a,b")
    with pytest.raises(SystemExit):
        _args("--device", "tpu")


def test_official_style_step_is_the_official_d2r_step():
    """Same models, images and seed: the transcription and `methods.train_step` (which computes
    p_g(x) once) give the same loss and the same updated weights."""
    torch.manual_seed(0)
    f, g = models.build_model("small_cnn"), models.build_model("small_cnn")
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    results = []
    for official in (False, True):
        target, guide = copy.deepcopy(f), copy.deepcopy(g)
        opt = methods.make_optimizer(target, guide)
        torch.manual_seed(1)
        if official:
            loss = bench.official_d2r_step(target, guide, opt, x, y, steps=3)
        else:
            loss = methods.train_step("d2r", target, guide, opt, x, y, steps=3)["loss"]
        results.append((loss, torch.cat([p.flatten() for p in target.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-6)


def test_step_flops_counts_attack_steps_from_the_cost_model():
    macs = costmodel.model_macs("small_cnn")
    per_step = 2 * costmodel.ATTACK_PASS * macs
    ten = bench.step_flops("d2r", "small_cnn", "small_cnn", steps=10)
    four = bench.step_flops("d2r", "small_cnn", "small_cnn", steps=4)
    assert ten - four == pytest.approx(6 * per_step)
    assert ten == pytest.approx(per_step * (10 + costmodel.outer_steps("d2r", macs, macs)))
    standard = bench.step_flops("standard", "small_cnn", "small_cnn", steps=10)
    assert standard == pytest.approx(per_step * costmodel.outer_steps("standard", macs))


def test_scaling_table_rows_feed_the_cost_model():
    rows = bench.scaling_table("pgd_at", "small_cnn", "small_cnn", batch_sizes=[2], steps=[1, 2],
                               warmup=0, repeats=1)
    assert [(r["batch_size"], r["steps"]) for r in rows] == [(2, 1), (2, 2)]
    for r in rows:
        assert r["seconds_per_image"] == pytest.approx(r["seconds_per_step"] / 2)
        assert r["images_per_s"] == pytest.approx(1 / r["seconds_per_image"])
    model = costmodel.fit([r["steps"] for r in rows], [r["seconds_per_image"] for r in rows],
                          c=costmodel.outer_steps("pgd_at"))
    assert model.steps == (1.0, 2.0)
    with pytest.raises(ValueError, match="batch_sizes entry must be >= 1"):
        bench.scaling_table(batch_sizes=[0])
    with pytest.raises(ValueError, match="method must be one of"):
        bench.scaling_table("nope")


def test_peak_flops_is_positive_and_checks_its_arguments():
    assert bench.peak_flops("cpu", n=64, repeats=1) > 0
    with pytest.raises(ValueError, match="n must be >= 16"):
        bench.peak_flops("cpu", n=8)
