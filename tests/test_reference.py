"""The reference runs: runs of the runner (`d2r run reference`, tiny) end to end, skip and resume,
refusals, the statistics, and the shipped runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from d2r_lib import data, evaluate, reference
from d2r_lib.lab import cli

SHIPPED = Path(__file__).resolve().parents[1] / "book" / "reference"
TINY = reference.CONFIGS["tiny"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def d2r_run(out, *argv) -> int:
    """`d2r run reference ... --out out`, the one command of every run."""
    return cli.main(["run", "reference", *argv, "--out", str(out)])


def _run(out, *extra):
    return d2r_run(out, "--profile", "tiny", "-p", "method=pgd_at", "-p", "seed=3", "--device",
                   "cpu", *extra)


def test_one_d2r_run_writes_a_complete_reference_folder(tmp_path, cache):
    out = tmp_path / "ref"
    assert _run(out) == 0
    folder = out / "pgd_at-seed3"
    assert sorted(p.name for p in folder.iterdir()) == ["history.json", "manifest.json",
                                                       "metrics.json", "target.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    # the runner's manifest, as every run's
    assert manifest["kind"] == "reference" and manifest["status"] == "ok"
    assert manifest["run"] == "pgd_at-seed3" and manifest["profile"] == "tiny"
    assert manifest["overrides"] == {"method": "pgd_at", "seed": 3}
    assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
    assert {"python", "torch", "autoattack", "d2r_lib"} <= set(manifest["versions"])
    assert manifest["device"] == "cpu" and manifest["seconds"] > 0
    assert manifest["peak_memory_mb"]["rss"] > 0
    # and what the reference run adds
    assert manifest["method"] == "pgd_at" and manifest["seed"] == 3
    assert manifest["train_config"]["seed"] == 3
    assert manifest["train_config"]["method_params"] == {"steps": 2}
    assert manifest["method_params"] == {"eps": 8 / 255, "step_size": 2 / 255, "steps": 2}
    assert manifest["config"]["name"] == "tiny"
    assert set(manifest["timings"]["evaluate"]) == set(reference.METRICS)
    assert any("K = 2 instead of the official 10" in d for d in manifest["deviations"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(reference.METRICS) <= set(metrics)
    assert metrics["test_images"] == TINY.test_images
    assert metrics["autoattack_images"] == TINY.autoattack_images
    assert all(0 <= metrics[m] <= 1 for m in reference.METRICS)
    history = json.loads((folder / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1]
    # the results table of the folder has the run
    assert "| reference | tiny | 3 | pgd_at | pgd_at |" in (out / "results.md").read_text()
    # reference.load reads it (as chapters 7 and 8 do); the checkpoint reproduces clean accuracy
    (run,) = reference.load(out)
    assert run["method"] == "pgd_at" and run["seed"] == 3
    assert run["commit"].startswith(manifest["git_commit"] or "unknown")
    assert run["seconds"] == manifest["timings"]
    x, y = data.cifar10("test", "mini").subset(TINY.test_images).tensors()
    assert evaluate.accuracy(reference.load_target(run), x, y) == metrics["clean"]


def test_the_reference_configuration_is_the_reference_profile(monkeypatch):
    """One mapping: every reference run trains what `experiments.train_config` gives at the
    `reference` profile (so the profile and reference.CONFIGS cannot drift apart)."""
    from d2r_lib import experiments

    monkeypatch.delenv("D2R_PROFILE", raising=False)
    for seed in reference.SEEDS:
        cfg = experiments.resolve("reference", seed=seed, device="cpu", verbose=False)
        for method in reference.METHODS:
            ours = reference.CONFIGS["reference"].train_config(method, seed)
            assert ours.as_dict() == experiments.train_config(cfg, method).as_dict()
    dose = reference.CONFIGS["reference_e10"].train_config("d2r", 1, {"w_adv": 10.0})
    assert (dose.epochs, dose.method_params) == (10, {"steps": 5, "w_adv": 10.0})


def test_a_second_d2r_run_skips_the_complete_folder(tmp_path, cache, capsys):
    out = tmp_path / "ref"
    _run(out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "pgd_at-seed3").iterdir()}
    capsys.readouterr()
    assert _run(out) == 0
    assert "pgd_at-seed3: complete with the same parameters, skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "pgd_at-seed3").iterdir()} == before
    metrics = (out / "pgd_at-seed3" / "metrics.json").read_text()
    assert _run(out, "--force") == 0  # written again, from the checkpoint cache: the same result
    assert "loaded the finished run" in capsys.readouterr().out
    assert (out / "pgd_at-seed3" / "metrics.json").read_text() == metrics


def test_a_run_another_process_holds_is_left_to_it(tmp_path, cache, capsys):
    """Two processes given the same command share the runs: each run is locked while it runs."""
    import subprocess
    import sys

    from d2r_lib import train

    lock = train.cache_path(TINY.train_config("pgd_at", 3)) / "run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom d2r_lib import checkpoint\n"
         f"with checkpoint.exclusive({str(lock)!r}):\n    print('held', flush=True)\n"
         "    sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _run(tmp_path / "ref") == 0
    finally:
        holder.communicate("")
    out = capsys.readouterr().out
    assert "pgd_at-seed3: another process is running it, skipped" in out
    assert "0 of 1 run(s) complete, 1 run by another process" in out
    assert not (tmp_path / "ref" / "pgd_at-seed3").exists()


def test_the_plan_is_method_by_seed_and_a_follow_up_names_its_folder(tmp_path):
    from d2r_lib.lab import runner

    runs = runner.plan("reference", kind="reference", out=tmp_path / "ref",
                       params={"method": ["pgd_at", "trades"], "seed": [0, 1, 2]})
    assert [r.name for r in runs] == [f"{m}-seed{s}" for s in (0, 1, 2)
                                      for m in ("pgd_at", "trades")]
    every = runner.plan("reference", kind="reference", out=tmp_path / "ref")
    assert len(every) == len(reference.METHODS) * len(reference.SEEDS)
    (dose,) = runner.plan("reference", kind="reference", out=tmp_path / "dose",
                          params={"method": "d2r", "seed": 1, "w_adv": 10, "name": "d2r_w_adv10"})
    assert dose.name == "d2r_w_adv10-seed1" and dose.parameters["w_adv"] == 10.0
    named = runner.plan("reference", kind="reference", out=tmp_path / "dose",
                        params={"method": "d2r", "seed": 0, "w_adv": [3, 10]})
    assert [r.name for r in named] == ["d2r_w_adv3-seed0", "d2r_w_adv10-seed0"]
    assert not (tmp_path / "ref").exists() and not (tmp_path / "dose").exists()


def test_resume_after_an_interruption(tmp_path, cache, monkeypatch, capsys):
    out = tmp_path / "ref"
    real = evaluate.robust_accuracy
    calls, interrupt = [], [True]

    def interrupted(model, x, y, attack, **kw):
        calls.append(attack)
        if attack == "cw20" and interrupt:
            interrupt.pop()
            raise KeyboardInterrupt
        return real(model, x, y, attack, **kw)

    monkeypatch.setattr(evaluate, "robust_accuracy", interrupted)
    assert _run(out) == 130
    folder = out / "pgd_at-seed3"
    assert not reference.is_complete(folder) and not (folder / "manifest.json").exists()
    calls.clear()
    capsys.readouterr()
    assert _run(out) == 0
    log = capsys.readouterr().out
    assert "loaded the finished run" in log  # training is not repeated
    # only PGD-20 on the AutoAttack images, the one not yet done
    assert calls.count("pgd20") == 1
    assert calls.count("cw20") == 1 and calls.count("autoattack") == 1
    assert reference.is_complete(folder)


REFUSALS = [
    (["-p", "method=fgsm_at"], "-p method='fgsm_at': the reference runs train a registered method"),
    (["-p", "method=pgd_at,nonsense"], "-p method='nonsense'"),
    (["-p", "seed=-1"], "-p seed=-1: the reference runs allow an integer >= 0"),
    (["-p", "seed=1.5"], "-p seed=1.5: the reference runs allow an integer"),
    (["-p", "method=pgd_at", "-p", "w_adv=3"], "-p w_adv: the reference runs take method, seed"),
    (["-p", "method=d2r", "-p", "w_adv=-3"], "-p w_adv=-3: allowed: a number >= 0"),
    (["-p", "method=d2r,pgd_at", "-p", "name=x"], "-p name='x': give one folder name"),
    (["-p", "method=d2r", "-p", "w_adv=3,10", "-p", "name=x"], "-p name=x: one folder name for 2"),
    (["--profile", "huge"], "--profile huge: the reference runs' profiles: reference, "
                            "reference_e10, reference_e20, tiny"),
    (["--chapters", "07"], "--chapters: the reference runs are no chapter"),
    (["--device", "tpu"], "--device tpu: allowed: auto, cpu, cuda, mps"),
]


@pytest.mark.parametrize("argv, message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_inputs_name_the_flag_and_write_nothing(argv, message, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr(reference, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "ref"
    assert d2r_run(out, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err
    assert not out.exists()


def test_an_out_holding_chapter_runs_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "07_d2r_end_to_end" / "cpu").mkdir(parents=True)
    (out / "07_d2r_end_to_end" / "cpu" / "manifest.json").write_text("{}")
    assert d2r_run(out, "-p", "method=pgd_at") == 2
    assert "holds the files of another run or kind" in capsys.readouterr().err


def test_a_folder_holding_another_run_is_refused_not_skipped(tmp_path, capsys):
    out = tmp_path / "ref"
    folder = out / "pgd_at-seed3"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "status": "ok", "profile": "reference", "overrides": {"method": "pgd_at", "seed": 3}}))
    assert _run(out) == 2
    assert "pgd_at-seed3 holds another run (profile reference" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def test_estimate_projects_every_run_to_do(tmp_path, capsys):
    argv = ["--profile", "tiny", "-p", "method=standard,pgd_at", "-p", "seed=0,1", "--estimate"]
    assert d2r_run(tmp_path / "ref", *argv) == 0
    text = capsys.readouterr().out
    assert text.count("to run") == 4
    assert "projected standard" in text and "projected pgd_at" in text and "projected total" in text
    assert not (tmp_path / "ref").exists()
    per_run = reference.estimate(TINY, ["standard", "pgd_at"])
    assert set(per_run) == {"standard", "pgd_at"} and 0 < per_run["standard"] < per_run["pgd_at"]


# --------------------------------------------------------------------------------------- statistics
def _fake(root: Path, method: str, seed: int, **metrics):
    folder = root / f"{method}-seed{seed}"
    folder.mkdir(parents=True)
    full = {m: 0.5 for m in reference.METRICS} | metrics
    (folder / "metrics.json").write_text(json.dumps(full))
    (folder / "history.json").write_text("[]")
    (folder / "manifest.json").write_text(json.dumps({"method": method, "seed": seed,
                                                      "complete": True, "checkpoint": None}))


def test_t_quantile_matches_tables():
    for df, expected in ((1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139),
                         (29, 2.045230)):
        assert reference.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="df"):
        reference.t_quantile(0.975, 0)


def test_load_summary_paired_by_hand(tmp_path):
    for seed, (d, p) in enumerate(((0.30, 0.28), (0.32, 0.31), (0.34, 0.30))):
        _fake(tmp_path, "d2r", seed, autoattack=d, clean=0.6 + seed / 100)
        _fake(tmp_path, "pgd_at", seed, autoattack=p, clean=0.6)
    _fake(tmp_path, "trades", 0, autoattack=0.25)
    runs = reference.load(tmp_path)
    assert [(r["method"], r["seed"]) for r in runs] == [("d2r", 0), ("d2r", 1), ("d2r", 2),
                                                        ("pgd_at", 0), ("pgd_at", 1), ("pgd_at", 2),
                                                        ("trades", 0)]
    table = reference.summary(runs)
    assert list(table) == ["pgd_at", "trades", "d2r"]  # the registry's order
    assert table["d2r"]["n"] == 3 and table["d2r"]["seeds"] == [0, 1, 2]
    mean, sd = table["d2r"]["autoattack"]
    assert mean == pytest.approx(0.32) and sd == pytest.approx(0.02)
    assert table["trades"]["n"] == 1 and math.isnan(table["trades"]["autoattack"][1])
    rows = {(r["baseline"], r["metric"]): r
            for r in reference.paired(runs, baselines=("pgd_at", "trades"))}
    aa = rows[("pgd_at", "autoattack")]
    assert aa["n"] == 3 and aa["differences"] == pytest.approx([0.02, 0.01, 0.04])
    assert aa["mean"] == pytest.approx(0.023333333333333334)
    assert aa["sd"] == pytest.approx(0.015275252316519486)
    assert aa["low"] == pytest.approx(-0.014612497002635134, abs=1e-7)
    assert aa["high"] == pytest.approx(0.061279163669301806, abs=1e-7)
    clean = rows[("pgd_at", "clean")]
    assert clean["mean"] == pytest.approx(0.01)
    assert clean["low"] == pytest.approx(0.01 - 4.302653 * 0.01 / 3 ** .5)
    one = rows[("trades", "autoattack")]
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.05) and math.isnan(one["low"])


def test_preregistered_comparisons_are_fixed():
    p = reference.PREREGISTERED
    assert p["method"] == "d2r" and p["level"] == 0.95 and p["primary_metric"] == "autoattack"
    assert p["baselines"] == ("pgd_at", "trades", "mart", "lbgat")
    assert p["ablations"] == ("d2r_no_clean", "d2r_no_adv", "d2r_trades_gen")
    rows = reference.paired([], metrics=reference.METRICS)
    # default: every baseline and ablation, every metric
    assert len(rows) == 7 * len(reference.METRICS)


def test_load_refuses_a_half_written_run(tmp_path):
    _fake(tmp_path, "d2r", 0)
    (tmp_path / "d2r-seed0" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a complete reference run"):
        reference.load(tmp_path)


# ------------------------------------------------------------------------------------- shipped runs
def test_shipped_runs_reproduce_their_metrics():
    """Every shipped checkpoint's clean accuracy and PGD-20 of two runs (robust first), re-run.

    With nothing shipped, nothing may claim a result: no run folder and no metrics file under
    book/reference."""
    folders = sorted(p for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.is_dir() else []
    runs = reference.load(SHIPPED)  # raises on any half-written folder
    assert len(runs) == len(folders)
    if not runs:
        assert not (SHIPPED.is_dir() and list(SHIPPED.rglob("metrics.json")))
        return
    test = data.cifar10("test", "mini")
    checked = 0
    for run in runs:
        n = run["metrics"]["test_images"]
        x, y = test.subset(n).tensors()
        assert run["checkpoint"] is not None and run["checkpoint"].is_file(), (
            f"{run['folder']} ships no weights")
        model = reference.load_target(run)
        assert abs(evaluate.accuracy(model, x, y) - run["metrics"]["clean"]) <= 1 / n, run["folder"]
        checked += 1
    assert checked == len(folders)
    # PGD-20 of two shipped runs, robust ones first (a standard model's PGD-20 is near 0)
    pair = sorted(runs, key=lambda r: r["method"] == "standard")[:2]
    assert len(pair) == min(2, len(runs))
    for run in pair:
        n = run["metrics"]["test_images"]
        x, y = test.subset(n).tensors()
        pgd = evaluate.robust_accuracy(reference.load_target(run), x, y, "pgd20",
                                       seed=run["metrics"]["eval_seed"])
        assert abs(pgd - run["metrics"]["pgd20"]) <= 2 / n, run["folder"]


def test_per_epoch_validation_records_one_value_per_epoch_and_is_cached(tmp_path, cache,
                                                                        monkeypatch):
    from d2r_lib import train
    cfg = train.TrainConfig(method="pgd_at", subset="mini", train_size=32, epochs=2, batch_size=16,
                            held_out=8, method_params={"steps": 1}, seed=0)
    val = data.cifar10("train", "mini").subset(positions=list(range(4000, 4008)))
    x_val, y_val = val.tensors()
    result, curve = reference.per_epoch_validation(cfg, x_val, y_val)
    assert len(curve) == len(result.history) == 2 and all(0 <= v <= 1 for v in curve)
    assert curve[-1] == evaluate.robust_accuracy(result.target, x_val, y_val, "pgd20",
                                                 seed=reference.EVAL_SEED)
    calls = []
    monkeypatch.setattr(evaluate, "robust_accuracy", lambda *a, **k: calls.append(a) or 0.0)
    again, curve_again = reference.per_epoch_validation(cfg, x_val, y_val)
    assert curve_again == curve and again.history == result.history and calls == []
