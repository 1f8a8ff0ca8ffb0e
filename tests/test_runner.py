"""`d2r run` (d2r_lib.lab.runner): parameters checked before anything runs, sweeps, manifests,
results tables, failures, skipping, torchrun pre-training, submitit, and every paper profile's path
through chapter 7.

Tiny notebooks written into tmp stand in for chapters where a real one would be slow; each kernel
still starts, imports d2r_lib and saves a results table through experiments.save_results, as a
chapter does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from d2r_lib import data, experiments
from d2r_lib.lab import runner

TINY_PARAMETERS = (
    'profile = "cpu"\nseed = 0\ndevice = "auto"\nepochs = None\nw_clean = 10.0\neps = 0.031\n'
    'label = "x"\ntrain_size = None\nheld_out = None'
)
TINY_BODY = """cfg = experiments.resolve(profile, seed=seed, device=device, epochs=epochs,
                          train_size=train_size, held_out=held_out,
                          extras={"w_clean": w_clean, "label": label})
table = evaluate.ResultsTable(meta={"describe": cfg.describe()})
table.add("d2r", {"clean": w_clean / 100, "pgd20": seed / 10})
experiments.save_results(cfg, "tiny_table", table)
print("threads", os.environ.get("OMP_NUM_THREADS"))"""


def tiny_notebook(path: Path, *extra_cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nfrom d2r_lib import evaluate, experiments"),
        nbformat.v4.new_code_cell(TINY_PARAMETERS),
        nbformat.v4.new_code_cell(TINY_BODY),
        *[nbformat.v4.new_code_cell(source) for source in extra_cells],
    ]
    nb.cells[1].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(experiments.PROFILE_ENV, raising=False)
    return tmp_path / "cache"


def cli(argv: list[str]) -> int:
    return runner.main(runner.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# -------------------------------------------------------------------------------- values and checks
def test_parse_values_literals_sweeps_and_bare_words():
    assert runner.parse_values("30") == [30]
    assert runner.parse_values("0.031") == [0.031]
    assert runner.parse_values("0,10,20,40") == [0, 10, 20, 40]
    assert runner.parse_values("(1, 2)") == [(1, 2)]
    assert runner.parse_values("[1, 2]") == [[1, 2]]
    assert runner.parse_values('"1, 6"') == ["1, 6"]
    assert runner.parse_values("wrn34_10") == ["wrn34_10"]
    assert runner.parse_values("wrn34_10,resnet18") == ["wrn34_10", "resnet18"]
    assert runner.parse_values("None") == [None]
    with pytest.raises(runner.RunnerError, match="cannot read 'a b' as a Python literal"):
        runner.parse_values("a b")


def test_ranges_of_the_common_names():
    assert runner.RANGES["seed"].check(0) is None
    assert runner.RANGES["seed"].check(-1) == "an integer >= 0 and <= 4294967295"
    assert runner.RANGES["seed"].check(1.5) == "an integer >= 0 and <= 4294967295"
    assert runner.RANGES["seed"].check(True) == "an integer >= 0 and <= 4294967295"
    assert runner.RANGES["eps"].check(0.031) is None
    assert runner.RANGES["eps"].check(0) == "a number > 0 and <= 1"
    assert runner.RANGES["eps"].check(2) == "a number > 0 and <= 1"
    assert runner.RANGES["epochs"].check(0) == "an integer >= 1"


def test_plan_expands_a_sweep_into_one_folder_per_combination(tmp_path):
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    runs = runner.plan(
        "smoke", out=tmp_path / "out", chapters=[nb], params={"w_clean": [0, 10], "seed": [0, 1]}
    )
    assert [r.overrides for r in runs] == [
        {"w_clean": 0.0, "seed": 0},
        {"w_clean": 0.0, "seed": 1},
        {"w_clean": 10.0, "seed": 0},
        {"w_clean": 10.0, "seed": 1},
    ]
    assert [r.name for r in runs][:2] == [
        "tiny/smoke__w_clean=0.0__seed=0",
        "tiny/smoke__w_clean=0.0__seed=1",
    ]
    assert runs[0].parameters == {
        "profile": "smoke",
        "seed": 0,
        "device": "auto",
        "epochs": None,
        "w_clean": 0.0,
        "eps": 0.031,
        "label": "x",
        "train_size": None,
        "held_out": None,
    }
    assert not (tmp_path / "out").exists()


REFUSALS = [
    (
        ["--chapters", "07", "-p", "epoch=3"],
        "-p epoch: chapter 07_d2r_end_to_end has no parameter 'epoch'; its parameters: seed=0, "
        "epochs=None",
    ),
    (
        ["--chapters", "07", "-p", "epochs=2.5"],
        "-p epochs=2.5: chapter 07_d2r_end_to_end allows an integer >= 1 or None",
    ),
    (
        ["--chapters", "07", "-p", "seed=-1"],
        "-p seed=-1: chapter 07_d2r_end_to_end allows an integer >= 0",
    ),
    (
        ["--chapters", "07", "-p", "seed=0,x"],
        "-p seed='x': chapter 07_d2r_end_to_end allows an integer >= 0",
    ),
    (
        ["--chapters", "08", "-p", "method_names=3"],
        "-p method_names=3: chapter 08_robust_evaluation expects str (its default is "
        "'standard pgd_at",
    ),
    (["--chapters", "07", "-p", "profile=full"], "-p profile: set it with --profile, not -p"),
    (["--chapters", "07", "-p", "epochs"], "-p epochs: write name=value"),
    (
        ["--profile", "huge", "--chapters", "07"],
        "--profile huge: unknown profile; allowed: smoke, cpu, gpu-short, "
        "full, full-preact, full-cifar100, full-tiny, reference",
    ),
    (["--chapters", "42"], "--chapters 42: no chapter matches; chapters: 01_adversarial_examples"),
    (["--chapters", "07", "--device", "tpu"], "--device tpu: allowed: auto, cpu, cuda, mps"),
    (["--chapters", "07", "--cluster", "k8s"], "--cluster k8s: allowed: none, local, slurm"),
    (["--chapters", "07", "--nproc-per-node", "0"], "--nproc-per-node 0: give an integer >= 1"),
]


@pytest.mark.parametrize("argv, message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_requests_are_refused_before_anything_runs(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli(
            ["--profile", "smoke", *argv, "--out", str(out)]
            if "--profile" not in argv
            else [*argv, "--out", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("error:") == 1
    assert not out.exists(), "nothing may be written"


def test_range_of_a_tiny_chapters_eps_and_type_of_its_string(tmp_path, capsys):
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    assert (
        cli(
            [
                "--profile",
                "smoke",
                "--chapters",
                str(nb),
                "-p",
                "eps=2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "-p eps=2: chapter tiny allows a number > 0 and <= 1" in capsys.readouterr().err
    assert (
        cli(
            [
                "--profile",
                "smoke",
                "--chapters",
                str(nb),
                "-p",
                "label=3",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert (
        "-p label=3: chapter tiny expects str (its default is 'x'); got int"
        in capsys.readouterr().err
    )
    file = tmp_path / "file"
    file.write_text("")
    assert cli(["--profile", "smoke", "--chapters", str(nb), "--out", str(file)]) == 2
    assert f"--out {file}: is a file; give a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ execution (kernels)
@pytest.mark.slow
def test_a_failing_chapter_is_reported_with_its_cell_and_the_other_completes(
    tmp_path, cache, capsys
):
    good = tiny_notebook(tmp_path / "good.ipynb")
    bad = tiny_notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('boom in cell five')")
    out = tmp_path / "out"
    assert (
        cli(
            [
                "--profile",
                "smoke",
                "--chapters",
                str(bad),
                str(good),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    failed = json.loads((out / "bad" / "smoke" / "manifest.json").read_text())
    assert failed["status"] == "failed"
    # cell 5 of the notebook as committed; execution count 6 because papermill's injected cell ran
    # too
    assert failed["error"] == {
        "cell": 5,
        "execution_count": 6,
        "ename": "ValueError",
        "evalue": "boom in cell five",
    }
    ok = json.loads((out / "good" / "smoke" / "manifest.json").read_text())
    assert ok["status"] == "ok" and "error" not in ok
    assert "FAILED bad/smoke, cell 5: ValueError" in capsys.readouterr().err
    # only complete runs are in the results table; every run is in the runs table
    assert [r["chapter"] for r in read_csv(out / "results.csv")] == ["good"]
    runs = read_csv(out / "runs.csv")
    assert [(r["chapter"], r["status"]) for r in runs] == [("bad", "failed"), ("good", "ok")]


@pytest.mark.slow
def test_a_2x2_sweep_gives_four_runs_one_table_and_a_rerun_skips_them(tmp_path, cache):
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    out = tmp_path / "out"
    argv = [
        "--profile",
        "smoke",
        "--chapters",
        str(nb),
        "-p",
        "w_clean=0,20",
        "-p",
        "seed=0,1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    rows = read_csv(out / "results.csv")
    assert [(r["w_clean"], r["seed"], r["clean"], r["pgd20"]) for r in rows] == [
        ("0.0", "0", "0.0", "0.0"),
        ("0.0", "1", "0.0", "0.1"),
        ("20.0", "0", "0.2", "0.0"),
        ("20.0", "1", "0.2", "0.1"),
    ]
    assert {r["table"] for r in rows} == {"tiny_table"} and {r["profile"] for r in rows} == {
        "smoke"
    }
    md = (out / "results.md").read_text()
    assert "| tiny | smoke | 1 | 20.0 | d2r | 20.00 | 10.00 |" in md
    manifests = sorted(out.rglob("manifest.json"))
    assert len(manifests) == 4
    stamps = {p: p.stat().st_mtime_ns for p in manifests}
    first = json.loads(manifests[0].read_text())
    assert (
        first["config"]["extra"] == {"w_clean": 0.0, "label": "x"}
        and first["config"]["profile"] == "smoke"
    )
    manifests_again = runner.run(
        "smoke", out=out, chapters=[nb], params={"w_clean": [0, 20], "seed": [0, 1]}, device="cpu"
    )
    assert [m.get("skipped") for m in manifests_again] == [True] * 4
    assert {p: p.stat().st_mtime_ns for p in manifests} == stamps
    assert len(read_csv(out / "results.csv")) == 4
    forced = runner.run(
        "smoke",
        out=out,
        chapters=[nb],
        params={"w_clean": [0], "seed": [0]},
        device="cpu",
        force=True,
    )
    assert forced[0]["status"] == "ok" and not forced[0].get("skipped")


@pytest.mark.slow
@pytest.mark.data
def test_two_chapters_at_smoke_end_to_end(tmp_path, cache, shared_data):
    out = tmp_path / "out"
    manifests = runner.run(
        "smoke", out=out, chapters=["02", "04"], params={"seed": [1]}, device="cpu"
    )
    assert [m["status"] for m in manifests] == ["ok", "ok"], [m.get("error") for m in manifests]
    for m, chapter in zip(manifests, ("02_adversarial_training", "04_lbgat")):
        assert m["chapter"] == chapter and m["run"] == f"{chapter}/smoke__seed=1"
        assert m["parameters"]["profile"] == "smoke" and m["parameters"]["seed"] == 1
        assert (
            m["config"]["profile"] == "smoke"
            and m["config"]["seed"] == 1
            and m["config"]["train_size"] == 256
        )
        assert m["git_commit"] is None or len(m["git_commit"]) == 40
        assert m["git_commit"] is not None or m["git_commit_reason"]
        assert set(m["versions"]) >= {"python", "torch", "torchvision", "d2r_lib"}
        assert m["peak_memory_mb"]["rss"] > 50 and m["seconds"] > 0 and m["device"] == "cpu"
        assert m["started"] <= m["ended"]
        assert str(cache) not in (out / m["run"] / "notebook.ipynb").read_text(), (
            "the cache folder is shown"
        )
    rows = read_csv(out / "results.csv")
    assert {r["table"] for r in rows} == {"02_adversarial_training", "04_lbgat"}
    assert {r["seed"] for r in rows} == {"1"}
    for r in rows:
        assert 0 <= float(r["clean"]) <= 1
    assert "### 04_lbgat" in (out / "results.md").read_text()


TORCHRUN_CHECK = """run = experiments.cached(cfg, "standard")
assert run is not None, "the torchrun run is not in the cache"
print("loaded from the cache, epochs:", [r["epoch"] for r in run.history])"""


@pytest.mark.slow
@pytest.mark.data
def test_torchrun_trains_a_declared_run_that_the_chapter_loads_from_the_cache(
    tmp_path, cache, shared_data, monkeypatch
):
    nb = tiny_notebook(tmp_path / "ddp.ipynb", TORCHRUN_CHECK)
    declared = nbformat.read(nb, as_version=4)  # the runs cell the runner reads (declare_runs)
    runs_cell = nbformat.v4.new_code_cell(
        'declared_runs = experiments.declare_runs(cfg, [("standard", {})])')
    runs_cell.metadata["tags"] = [experiments.RUNS_TAG]
    declared.cells.insert(3, runs_cell)
    nbformat.write(declared, nb)
    out = tmp_path / "out"
    manifests = runner.run(
        "smoke",
        out=out,
        chapters=[nb],
        params={"train_size": [64], "held_out": [8]},
        device="cpu",
        nproc_per_node=2,
    )
    m = manifests[0]
    assert m["status"] == "ok", m.get("error")
    assert m["torchrun"] == {"nproc_per_node": 2, "runs": 1, "exit_code": 0}
    log = (out / m["run"] / "torchrun.log").read_text()
    assert "epoch   1" in log and str(cache) not in log
    executed = (out / m["run"] / "notebook.ipynb").read_text()
    assert "loaded from the cache, epochs: [1]" in executed


@pytest.mark.slow
def test_a_two_point_sweep_through_submitits_local_executor(tmp_path, cache):
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    out = tmp_path / "out"
    manifests = runner.run(
        "smoke",
        out=out,
        chapters=[nb],
        params={"seed": [0, 1]},
        device="cpu",
        cluster="local",
        cluster_options={"time_min": 10},
    )
    assert [m["status"] for m in manifests] == ["ok", "ok"], [m.get("error") for m in manifests]
    assert [r["seed"] for r in read_csv(out / "results.csv")] == ["0", "1"]
    assert any((out / "logs").rglob("*_log.out")), "submitit's logs belong in the output folder"
    for m in manifests:
        assert "threads 1" in (out / m["run"] / "notebook.ipynb").read_text()


# --------------------------------------------------------------------- the paper profiles, on a CPU
SHRINK = {
    "train_size": [2],
    "test_size": [2],
    "attacked": [1],
    "held_out": [1],
    "batch_size": [2],
    "steps": [1],
    "epochs": [1],
}
PAPER_PROFILES = ["gpu-short", "full", "full-preact", "full-cifar100", "full-tiny"]


def _available(dataset: str, subset: str) -> bool:
    split = "val" if dataset == "tinyimagenet" else "test"
    try:
        data.load(dataset, "train", subset, download=False)
        data.load(dataset, split, subset, download=False)
        return True
    except (FileNotFoundError, RuntimeError, ValueError, OSError):
        return False


@pytest.fixture(scope="module")
def paper_cache(tmp_path_factory):
    """One cache folder for the paper profiles: the full CIFAR-10 is decoded from JPEG once."""
    return tmp_path_factory.mktemp("paper_cache")


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("profile", PAPER_PROFILES)
def test_every_paper_profile_runs_chapter_7_on_the_cpu_when_shrunk(
    profile, tmp_path, paper_cache, shared_data, monkeypatch
):
    """The real models, datasets and code path of each paper profile; only the sizes shrink."""
    monkeypatch.setenv("D2R_CACHE_DIR", str(paper_cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(experiments.PROFILE_ENV, raising=False)
    cache = paper_cache
    p = experiments.PROFILES[profile]
    params = dict(SHRINK)
    if not _available(p.dataset, p.subset):
        fallback = {"tinyimagenet": "bundle"}.get(p.dataset)
        if fallback is None or not _available(p.dataset, fallback):
            pytest.skip(
                f"{p.dataset}/{p.subset} is not on this machine and cannot be downloaded here"
            )
        # same image size, classes and models; the part of the split that is offline
        params["subset"] = [fallback]
    try:
        _paper_profile_checks(profile, p, params, tmp_path, cache)
    finally:  # nine checkpoints of the paper's models take gigabytes: never keep them
        shutil.rmtree(cache / "runs", ignore_errors=True)


def _paper_profile_checks(profile, p, params, tmp_path, cache):
    manifests = runner.run(
        profile, out=tmp_path / "out", chapters=["07"], params=params, device="cpu"
    )
    m = manifests[0]
    assert m["status"] == "ok", m.get("error")
    assert (m["config"]["target_model"], m["config"]["guide_model"], m["config"]["dataset"]) == (
        p.target_model,
        p.guide_model,
        p.dataset,
    )
    cached = sorted(path.name.rsplit("-", 1)[0] for path in (cache / "runs").iterdir())
    declared = experiments.chapter_runs(
        "07_d2r_end_to_end", experiments.Config(**m["config"]), m["parameters"]
    )
    assert cached == sorted(f"{c.method}-{c.target_model}" for c in declared), (
        "chapter 7 trained runs its cell tagged `runs` does not declare"
    )
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert len(rows) == len(declared) and {r["profile"] for r in rows} == {profile}


def test_slurm_is_refused_cleanly_where_there_is_no_slurm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    out = tmp_path / "out"
    assert (
        cli(["--profile", "smoke", "--chapters", str(nb), "--cluster", "slurm", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        '--cluster slurm: Could not detect "srun"' in err and "Use --cluster local or none" in err
    )
    assert not out.exists()


def test_slurm_jobs_get_the_options_as_sbatch_lines(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    options = {"time_min": 90, "gpus": 2, "partition": "gpu", "cpus": 8, "parallel": 3}
    executor = runner.make_executor("slurm", options, tmp_path / "out")
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --time=90",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --job-name=d2r",
    ):
        assert line in text, text
    assert f"{tmp_path / 'out' / 'logs'}" in text
