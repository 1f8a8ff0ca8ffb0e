"""The registered follow-ups: the registration, the plan, the statistics by hand, the 2-D study
runner (resume), and the shipped runs (re-evaluated like the reference runs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from d2r_lib import data, evaluate, findings, followups, reference, toy

ROOT = Path(__file__).resolve().parents[1] / "book" / "followups"


# ---------------------------------------------------------------------------------- registration
def test_registration_is_fixed():
    f = followups.FOLLOWUPS
    assert followups.REGISTERED_ON == "2026-12-07"
    assert set(f) == {"budget", "toy_budget", "dose", "toy_dose", "guide", "toy_guide"}
    assert {k: v["predicted_sign"] for k, v in f.items()} == {
        "budget": 1, "toy_budget": 1, "dose": -1, "toy_dose": -1, "guide": -1, "toy_guide": 1}
    for entry in f.values():
        assert {"question", "hypothesis", "runs", "comparison", "metric", "interval",
                "rule"} <= set(entry)
    assert followups.BUDGETS == {"reference": 5, "reference_e10": 10, "reference_e20": 20}
    for name, epochs in followups.BUDGETS.items():
        assert reference.CONFIGS[name].epochs == epochs
        base = reference.CONFIGS["reference"]
        assert reference.CONFIGS[name].train_size == base.train_size
        assert reference.CONFIGS[name].steps == base.steps
    assert followups.DOSE_W_ADV == (0.0, 3.0, 10.0, 30.0)


def test_plan_lists_every_registered_cifar_run_once():
    plan = followups.cifar_plan()
    labels = [p.label for p in plan]
    assert len(labels) == len(set(labels)) == 6 + 2 * 4 * 3 + 2 * 3
    assert labels[:3] == ["dose/d2r_w_adv10-seed0", "dose/d2r_w_adv10-seed1",
                          "dose/d2r_w_adv10-seed2"]
    assert {p.params["w_adv"] for p in plan if p.folder == "dose"} == {3.0, 10.0}
    budget = {(p.folder, p.method) for p in plan if p.folder != "dose"}
    assert budget == {(f, m) for f in ("e10", "e20")
                      for m in ("pgd_at", "trades", "lbgat", "d2r", "d2r_trades_gen")}
    assert len(followups.cifar_plan(include_optional=False)) == len(plan) - 6


def test_verdict_follows_the_registered_rule():
    v = followups.verdict
    assert v(0.01, 0.05, +1) == "supported" and v(0.01, 0.05, -1) == "contradicted"
    assert v(-0.05, -0.01, -1) == "supported" and v(-0.05, -0.01, +1) == "contradicted"
    assert v(-0.01, 0.05, +1) == "undecided" and v(0.0, 0.05, +1) == "undecided"
    assert v(float("nan"), float("nan"), +1) == "undecided"


# -------------------------------------------------------------------------------- statistics
def _run(method, seed, history=(), **metrics):
    full = {m: 0.5 for m in reference.METRICS} | metrics
    return {"method": method, "seed": seed, "metrics": full, "history": list(history),
            "manifest": {"method_params": {}}}


def test_budget_gaps_and_gap_change_by_hand():
    budgets = {
        5: [_run("d2r", s, autoattack=a) for s, a in enumerate((0.16, 0.17, 0.15))]
        + [_run("pgd_at", s, autoattack=a) for s, a in enumerate((0.20, 0.21, 0.20))],
        20: [_run("d2r", s, autoattack=a) for s, a in enumerate((0.22, 0.22, 0.21))]
        + [_run("pgd_at", s, autoattack=a) for s, a in enumerate((0.23, 0.24, 0.22))],
    }
    rows = findings.budget_gaps(budgets, "pgd_at")
    assert [r["epochs"] for r in rows] == [5, 20]
    assert rows[0]["differences"] == pytest.approx([-0.04, -0.04, -0.05])
    change = findings.gap_change(budgets)
    # (−0.01, −0.02, −0.01) minus the 5-epoch gaps
    assert change["differences"] == pytest.approx([0.03, 0.02, 0.04])
    assert change["mean"] == pytest.approx(0.03)
    half = reference.t_quantile(0.975, 2) * 0.01 / 3 ** 0.5
    assert change["low"] == pytest.approx(0.03 - half)
    assert change["high"] == pytest.approx(0.03 + half)
    assert change["verdict"] == "supported"
    assert findings.gap_change(budgets, end=10)["n"] == 0  # no 10-epoch runs: no interval
    assert findings.gap_change(budgets, end=10)["verdict"] == "undecided"


def test_dose_slope_by_hand():
    dose = []
    for seed, slope in enumerate((-0.02, -0.025, -0.03)):
        for w in (0.0, 3.0, 10.0, 30.0):
            run = _run("d2r", seed, clean=0.4 + slope * math.log1p(w))
            dose.append({**run, "w_adv": w})
    out = findings.dose_slope(dose, "clean")
    assert out["doses"] == [0.0, 3.0, 10.0, 30.0]
    assert out["differences"] == pytest.approx([-0.02, -0.025, -0.03])
    assert out["verdict"] == "supported"
    # a seed without every dose is left out, never interpolated
    assert findings.dose_slope(dose[:-1], "clean")["seeds"] == [0, 1]


def test_dose_runs_take_w_adv_from_the_manifest():
    shipped = [{**_run("d2r", 0), "manifest": {"method_params": {"w_adv": 30.0}}},
               {**_run("d2r_no_adv", 0), "manifest": {"method_params": {"w_adv": 0.0}}},
               {**_run("pgd_at", 0), "manifest": {"method_params": {}}}]
    dose = [{**_run("d2r_w_adv3", 0), "trained_method": "d2r",
             "manifest": {"method_params": {"w_adv": 3.0}}}]
    got = findings.dose_runs(shipped, dose)
    assert [(r["method"], r["w_adv"]) for r in got] == [("d2r_no_adv", 0.0), ("d2r_w_adv3", 3.0),
                                                       ("d2r", 30.0)]


def test_guide_gap_uses_the_last_logged_epoch_and_skips_runs_without_logs():
    runs = [_run("d2r", s, [{"guide_true_prob": 0.5}, {"guide_true_prob": p}])
            for s, p in enumerate((0.20, 0.22, 0.18))]
    runs += [_run("lbgat", s, [{"guide_true_prob": p}]) for s, p in enumerate((0.40, 0.45, 0.41))]
    runs += [_run("d2r", 3, [{"clean_acc": 0.3}]), _run("lbgat", 3, [{"clean_acc": 0.3}])]
    out = findings.guide_gap(runs)
    assert out["seeds"] == [0, 1, 2]
    assert out["differences"] == pytest.approx([-0.20, -0.23, -0.23])
    assert out["verdict"] == "supported"


def test_toy_helpers_by_hand():
    records = []
    for seed in range(3):
        for epochs, (d, p) in ((20, (0.6, 0.7)), (2000, (0.7, 0.72))):
            records.append({"setting": {"method": "d2r", "epochs": epochs}, "seed": seed,
                            "metrics": {"exact": d + seed / 100}})
            records.append({"setting": {"method": "pgd_at", "epochs": epochs}, "seed": seed,
                            "metrics": {"exact": p}})
    change = findings.toy_gap_change(records)
    assert change["differences"] == pytest.approx([0.08, 0.08, 0.08])
    assert change["verdict"] == "supported"
    pair = findings.toy_paired(records, {"method": "d2r", "epochs": 20},
                               {"method": "pgd_at", "epochs": 20})
    assert pair["differences"] == pytest.approx([-0.1, -0.09, -0.08]) and "verdict" not in pair
    assert findings.toy_mean(records, "exact", method="pgd_at", epochs=20)["mean"] == \
        pytest.approx(0.7)


def test_run_toy_writes_every_record_and_resumes(tmp_path, monkeypatch):
    settings = [{"method": "pgd_at", "epochs": 1}, {"method": "d2r", "epochs": 1,
                                                    "guide_width": 8}]
    monkeypatch.setattr(followups, "toy_settings", lambda study: settings)
    path = tmp_path / "toy_guide.json"
    records = followups.run_toy("toy_guide", path, seeds=[0, 1], log=lambda *a: None)
    assert len(records) == 4
    stored = json.loads(path.read_text())
    assert stored["study"] == "toy_guide" and stored["registered"] == \
        followups.FOLLOWUPS["toy_guide"]
    assert stored["records"] == json.loads(json.dumps(records))
    guided = [r for r in records if r["setting"]["method"] == "d2r"]
    assert all({"guide_true_prob", "guide_entropy"} <= set(r["metrics"]) for r in guided)
    for r in records:
        m = r["metrics"]
        assert 0 <= m["exact"] <= m["clean"] <= 1 and 0.5 <= m["target_true_prob"] + 0.5 <= 1.5
        assert 0 <= m["target_entropy"] <= math.log(2) + 1e-6
    calls = []
    monkeypatch.setattr(toy, "train", lambda *a, **k: calls.append(a))
    assert followups.run_toy("toy_guide", path, seeds=[0, 1], log=lambda *a: None) == records
    assert calls == []  # every record was already there


def test_run_toy_records_a_diverged_run_and_the_analysis_leaves_it_out(tmp_path, monkeypatch):
    settings = [{"method": "pgd_at", "epochs": 1}, {"method": "pgd_at", "epochs": 2}]
    monkeypatch.setattr(followups, "toy_settings", lambda study: settings)
    real = toy.train

    def diverging(method, *, seed, epochs, **kw):
        if epochs == 2 and seed == 1:
            raise FloatingPointError("toy.train('pgd_at'): non-finite loss at epoch 2")
        return real(method, seed=seed, epochs=epochs, **kw)

    monkeypatch.setattr(toy, "train", diverging)
    records = followups.run_toy("toy_budget", tmp_path / "b.json", seeds=[0, 1],
                                log=lambda *a: None)
    bad = [r for r in records if r["metrics"] is None]
    assert len(bad) == 1 and "non-finite" in bad[0]["diverged"] and bad[0]["seed"] == 1
    assert findings.toy_diverged(records, epochs=2) == [1]
    assert sorted(findings.toy_select(records, epochs=2)) == [0]
    pair = findings.toy_paired(records, {"epochs": 2}, {"epochs": 1})
    assert pair["seeds"] == [0]


def test_bad_arguments_name_the_flag_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "fu"
    with pytest.raises(SystemExit) as err:
        followups.main(["toy", "--out", str(out), "--studies", "toy_nonsense"])
    assert err.value.code == 2 and "--studies" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        followups.main(["cifar", "--out", str(out), "--device", "tpu"])
    assert err.value.code == 2 and "--device" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------- shipped runs
def _shipped() -> list[tuple[followups.Planned, dict]]:
    plan = {p.label: p for p in followups.cifar_plan()}
    out = []
    for folder, runs in findings.load(ROOT).items():
        for run in runs:
            label = f"{folder}/{run['folder'].name}"
            assert label in plan, f"{label} is shipped but not registered in followups.cifar_plan"
            out.append((plan[label], run))
    return out


def test_shipped_followup_runs_match_their_registration_and_reproduce_their_metrics():
    shipped = _shipped()
    folders = [p for p in ROOT.glob("*/*")
               if p.is_dir() and p.parent.name not in ("toy", "partial")]
    assert len(shipped) == len(folders)  # no half-written folder (load raises on one)
    test = data.cifar10("test", "mini")
    for planned, run in shipped:
        manifest = run["manifest"]
        assert manifest["config"]["name"] == planned.config
        assert manifest["config"]["epochs"] == followups.BUDGETS[planned.config]
        assert run["trained_method"] == planned.method and run["seed"] == planned.seed
        for key, value in planned.params.items():
            assert manifest["method_params"][key] == value
        assert len(run["history"]) == manifest["config"]["epochs"]
        logged = {"target_true_prob", "target_entropy"} | (
            {"guide_acc", "guide_true_prob", "guide_entropy"} if planned.method != "pgd_at"
            and planned.method != "trades" else set())
        assert all(logged <= set(h) for h in run["history"]), run["folder"]
        n = run["metrics"]["test_images"]
        for metric in ("pgd20", "cw20", "autoattack"):
            assert 0 <= run["metrics"][metric] <= run["metrics"]["clean"] + 1 / n
        name = f"{run['folder'].parent.name}/{run['folder'].name}"
        if name in followups.CHECKPOINTS_LOST:
            assert not (run["folder"] / "target.pt").exists(), f"{name} has its checkpoint again"
            continue
        x, y = test.subset(n).tensors()
        model = reference.load_target(run)
        assert abs(evaluate.accuracy(model, x, y) - run["metrics"]["clean"]) <= 1 / n, run["folder"]


def test_shipped_toy_studies_match_their_registration():
    for study in followups.TOY_STUDIES:
        records = findings.load_toy(ROOT / "toy" / f"{study}.json")
        if not records:
            continue
        stored = json.loads((ROOT / "toy" / f"{study}.json").read_text())
        assert stored["registered"] == json.loads(json.dumps(followups.FOLLOWUPS[study]))
        allowed = {json.dumps(s, sort_keys=True) for s in followups.toy_settings(study)}
        keys = [(json.dumps(r["setting"], sort_keys=True), r["seed"]) for r in records]
        assert len(keys) == len(set(keys))
        assert all(k in allowed and seed in followups.TOY_SEEDS for k, seed in keys)
        # whole seeds only: the runner writes after each seed
        per_seed = {}
        for _, seed in keys:
            per_seed[seed] = per_seed.get(seed, 0) + 1
        assert set(per_seed.values()) == {len(allowed)}
        for r in records:
            m = r["metrics"]
            if m is None:  # a diverged run says why
                assert "non-finite loss" in r["diverged"]
                continue
            assert 0 <= m["exact"] <= m["clean"] <= 1 and 0 <= m["pgd20"] <= 1


def test_an_unfinished_run_is_saved_beside_the_shipped_runs_and_resumed_from_there(tmp_path):
    folder, cache = tmp_path / "followups" / "e10" / "d2r-seed0", tmp_path / "cache"
    cache.mkdir()
    assert reference.save_partial(folder, cache) is None  # nothing in the cache yet
    (cache / "last.pt").write_bytes(b"epoch 3")
    (cache / "history.json").write_text(json.dumps([{"epoch": e} for e in (1, 2, 3)]))
    saved = reference.save_partial(folder, cache)
    assert saved == tmp_path / "followups" / "partial" / "e10" / "d2r-seed0"
    assert (saved / "last.pt").read_bytes() == b"epoch 3"
    fresh = tmp_path / "fresh-cache"  # another machine: an empty cache is seeded from the copy
    assert reference.resume_from_partial(folder, fresh, log=lambda *a: None)
    assert (fresh / "last.pt").read_bytes() == b"epoch 3"
    # a cache that is as far or further along is left alone
    (fresh / "last.pt").write_bytes(b"epoch 4")
    (fresh / "history.json").write_text(json.dumps([{"epoch": e} for e in (1, 2, 3, 4)]))
    assert not reference.resume_from_partial(folder, fresh, log=lambda *a: None)
    assert (fresh / "last.pt").read_bytes() == b"epoch 4"


def test_run_cifar_is_runs_of_the_runner(tmp_path, monkeypatch):
    """A follow-up run is a `d2r run reference` run: its folder, the runner's manifest with the
    follow-up's name and dose, and `reference.load` reads it back under that name."""
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path / "cache"))
    plan = [followups.Planned("dose", "tiny", "d2r_w_adv3", "d2r", 0, {"w_adv": 3.0})]
    (folder,) = followups.run_cifar(tmp_path / "fu", plan, log=lambda *a: None)
    assert folder == tmp_path / "fu" / "dose" / "d2r_w_adv3-seed0"
    (run,) = reference.load(tmp_path / "fu" / "dose")
    assert (run["method"], run["trained_method"], run["seed"]) == ("d2r_w_adv3", "d2r", 0)
    manifest = run["manifest"]
    assert manifest["status"] == "ok" and manifest["profile"] == "tiny"
    assert manifest["overrides"] == {"method": "d2r", "seed": 0, "name": "d2r_w_adv3", "w_adv": 3.0}
    assert manifest["method_params"]["w_adv"] == 3.0 and manifest["config"]["name"] == "tiny"
    assert findings.dose_runs([], [run])[0]["w_adv"] == 3.0
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert followups.run_cifar(tmp_path / "fu", plan, log=lambda *a: None) == [folder]
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp  # complete: skipped
