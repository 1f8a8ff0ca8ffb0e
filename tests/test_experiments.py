"""experiments: the profiles, resolve (no silent acceptance, no hidden global change), results
files."""

import dataclasses
import json
import warnings

import nbformat
import pytest
import torch

from d2r_lib import evaluate, experiments, train
from d2r_lib.lab import runner


@pytest.fixture(autouse=True)
def no_profile_env(monkeypatch):
    monkeypatch.delenv(experiments.PROFILE_ENV, raising=False)


def test_every_profile_is_a_frozen_profile_that_resolves():
    assert list(experiments.PROFILES) == [
        "smoke",
        "cpu",
        "gpu-short",
        "full",
        "full-preact",
        "full-cifar100",
        "full-tiny",
        "reference",
    ]
    for name, profile in experiments.PROFILES.items():
        assert isinstance(profile, experiments.Profile)
        cfg = experiments.resolve(name, device="cpu", verbose=False)
        assert cfg.profile == name and cfg.target_model == profile.target_model
    with pytest.raises(dataclasses.FrozenInstanceError):
        experiments.PROFILES["full"].epochs = 3


def test_paper_profiles_hold_the_papers_settings():
    p = experiments.PROFILES
    assert (p["full"].target_model, p["full"].guide_model, p["full"].dataset, p["full"].epochs) == (
        "wrn34_10",
        "resnet18",
        "cifar10",
        100,
    )
    assert (
        p["full-preact"].target_model == "preact_resnet18" and p["full-preact"].dataset == "cifar10"
    )
    assert (
        p["full-cifar100"].dataset == "cifar100" and p["full-cifar100"].target_model == "wrn34_10"
    )
    assert (p["full-tiny"].dataset, p["full-tiny"].target_model) == (
        "tinyimagenet",
        "preact_resnet18",
    )
    assert p["gpu-short"].target_model == "wrn34_10" and p["gpu-short"].epochs < 10
    assert p["gpu-short"].train_size < 50_000


def test_resolve_refuses_unknown_overrides_listing_the_allowed_names():
    with pytest.raises(ValueError) as info:
        experiments.resolve("smoke", epoch=3, verbose=False)
    message = str(info.value)
    assert "unknown setting(s) 'epoch'" in message
    assert (
        "epochs, batch_size" in message and "attacked, held_out" in message and "extras=" in message
    )


def test_resolve_keeps_declared_extras_and_applies_overrides():
    cfg = experiments.resolve(
        "smoke",
        seed=3,
        device="cpu",
        verbose=False,
        epochs=2,
        attacked=8,
        held_out=None,
        extras={"beta_values": [1.0, 6.0]},
    )
    assert (cfg.seed, cfg.epochs, cfg.attacked, cfg.held_out) == (3, 2, 8, 32)
    assert cfg.extra == {"beta_values": [1.0, 6.0]}
    assert "attacked 8" in cfg.describe()
    with pytest.raises(TypeError, match="extras must be a dict"):
        experiments.resolve("smoke", verbose=False, extras=[1])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"attacked": 2.5}, "attacked must be an integer"),
        ({"eps": 2.0}, "eps must be <= 1"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"target_model": "vgg"}, "target_model must be one of"),
        ({"subset": "huge"}, "subset must be one of"),
        ({"autoattack": "best"}, "autoattack must be one of"),
        ({"lr": -1.0}, "lr must be > 0"),
    ],
)
def test_resolve_validates_every_value(override, message):
    with pytest.raises((TypeError, ValueError), match=message):
        experiments.resolve("smoke", device="cpu", verbose=False, **override)


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(ValueError, match="profile must be one of 'smoke', 'cpu', 'gpu-short'"):
        experiments.resolve("huge", verbose=False)


def test_the_environment_replaces_the_profile_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv(experiments.PROFILE_ENV, "smoke")
    cfg = experiments.resolve("cpu", device="cpu")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "D2R_PROFILE=smoke replaces this notebook's profile='cpu'"
    assert lines[1].startswith("device: cpu | profile=smoke") and len(lines) == 2
    assert cfg.profile == "smoke"
    experiments.resolve("smoke", device="cpu")
    assert "replaces" not in capsys.readouterr().out
    monkeypatch.setenv(experiments.PROFILE_ENV, "nope")
    with pytest.raises(ValueError, match="D2R_PROFILE must be one of"):
        experiments.resolve("cpu")


def test_resolve_changes_no_global_setting(monkeypatch):
    def refuse(*args):
        raise AssertionError("resolve must not call torch.set_flush_denormal")

    monkeypatch.setattr(torch, "set_flush_denormal", refuse)
    threads = torch.get_num_threads()
    experiments.resolve("smoke", device="cpu", verbose=False)
    assert torch.get_num_threads() == threads
    monkeypatch.undo()
    assert experiments.flush_denormals(False) in (True, False)


def test_train_config_carries_held_out_and_the_profile_budget():
    cfg = experiments.resolve("smoke", device="cpu", verbose=False, held_out=7)
    tc = experiments.train_config(cfg, "d2r", w_clean=5.0)
    assert tc.held_out == 7 and tc.method_params == {"steps": 2, "w_clean": 5.0}
    assert experiments.train_config(cfg, "standard").method_params == {}


def test_chapter_runs_reads_chapter_7s_own_cell():
    cfg = experiments.resolve("smoke", device="cpu", verbose=False)
    default = runner.notebook_parameters(runner.CHAPTER_DIR / "07_d2r_end_to_end.ipynb")
    runs = experiments.chapter_runs("07_d2r_end_to_end", cfg, default)
    assert [r.method for r in runs] == default["live_methods"].split()
    assert [r.as_dict() for r in runs] == [experiments.train_config(cfg, name).as_dict()
                                           for name in default["live_methods"].split()]
    more = experiments.chapter_runs(runner.CHAPTER_DIR / "07_d2r_end_to_end.ipynb", cfg,
                                    {**default, "live_methods": "standard d2r d2r_no_adv"})
    assert [r.method for r in more] == ["standard", "d2r", "d2r_no_adv"]
    # without parameters, the chapter's own defaults (its `parameters` cell) apply
    assert [r.as_dict() for r in experiments.chapter_runs("07", cfg)] == [r.as_dict()
                                                                          for r in runs]
    assert experiments.chapter_runs("no_such_chapter", cfg) == []


CHAPTER_METHODS = {
    "01_adversarial_examples": ["standard"], "02_adversarial_training": ["standard", "pgd_at"],
    "03_trades": ["standard", "trades", "pgd_at"],
    "04_lbgat": ["lbgat", "pgd_at", "trades", "standard"], "05_d2r_loss": ["d2r"],
    "06_cag": ["d2r"],
    "07_d2r_end_to_end": ["standard", "pgd_at", "trades", "mart", "lbgat", "d2r"],
    "08_robust_evaluation": ["standard", "pgd_at", "trades", "mart", "lbgat", "d2r"],
    "09_scaling_up": ["d2r"],
}


@pytest.mark.parametrize("chapter", [p.stem for p in runner.chapters()])
def test_every_chapter_declares_its_runs_in_one_cell(chapter):
    """Each chapter has one cell tagged `runs` right after the cell that resolves its profile; at
    its default parameters it declares these runs. That every run a chapter trains is declared is
    checked when the chapter executes (`trained` refuses an undeclared run)."""
    path = runner.CHAPTER_DIR / f"{chapter}.ipynb"
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(cells) if experiments.RUNS_TAG in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "experiments.resolve(" in cells[tagged[0] - 1].source
    cfg = experiments.resolve("smoke", device="cpu", verbose=False)
    runs = experiments.chapter_runs(path, cfg, runner.notebook_parameters(path))
    assert [r.method for r in runs] == CHAPTER_METHODS[chapter]
    assert [r.as_dict() for r in runs] == [experiments.train_config(cfg, m).as_dict()
                                           for m in CHAPTER_METHODS[chapter]]


def test_chapter_3s_beta_sweep_declares_one_run_per_new_beta():
    cfg = experiments.resolve("smoke", device="cpu", verbose=False)
    runs = experiments.chapter_runs("03", cfg, {"betas": "1, 6,3"})
    assert [(r.method, r.method_params.get("beta")) for r in runs] == [
        ("standard", None), ("trades", None), ("pgd_at", None), ("trades", 1.0), ("trades", 3.0)]


def test_trained_refuses_a_run_the_chapter_did_not_declare(monkeypatch, tmp_path):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(experiments, "_DECLARED", {})  # this test's declaration ends with it
    cfg = experiments.resolve("smoke", seed=7, device="cpu", verbose=False, epochs=2)
    declared = experiments.declare_runs(cfg, [("standard", {}), ("trades", {"beta": 1.0}),
                                              ("standard", {})])
    assert [(r.method, r.method_params) for r in declared] == [
        ("standard", {}), ("trades", {"steps": 2, "beta": 1.0})]
    with pytest.raises(ValueError, match=r"this chapter trains trades with \{'steps': 2\} but its "
                                         r"cell tagged 'runs' does not declare it"):
        experiments.trained(cfg, "trades")
    assert not any(tmp_path.iterdir())  # refused before anything trained
    with pytest.raises(TypeError, match=r"runs must be \(method, \{parameters\}\) pairs; got "
                                        r"'standard'"):
        experiments.declare_runs(cfg, ["standard"])


def test_cache_label_hides_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path))
    text = f"loaded the finished run {train.cache_dir()}/d2r-small_cnn-abc/last.pt epoch 1/1"
    assert (
        experiments.cache_label(text)
        == "loaded the finished run <cache>/d2r-small_cnn-abc/last.pt epoch 1/1"
    )


def test_profiles_table_has_a_column_per_profile_and_a_row_per_setting():
    table = experiments.profiles_table().splitlines()
    assert table[0].count("|") == len(experiments.PROFILES) + 2
    assert len(table) == 2 + len(experiments.PROFILE_FIELDS) + 1
    assert any(
        row.startswith(
            "| `target_model` | small_cnn | small_cnn | wrn34_10 | wrn34_10 | preact_resnet18 |"
        )
        for row in table
    )
    assert "method's own" in experiments.profiles_table()


def test_save_and_load_results(monkeypatch, tmp_path):
    cfg = experiments.resolve("smoke", device="cpu", verbose=False)
    table = evaluate.ResultsTable({"d2r": {"clean": 0.5, "pgd20": 0.25}})
    monkeypatch.delenv(experiments.RESULTS_ENV, raising=False)
    assert experiments.save_results(cfg, "t", table) is None
    monkeypatch.setenv(experiments.RESULTS_ENV, str(tmp_path / "r"))
    path = experiments.save_results(cfg, "t", table)
    assert json.loads(path.read_text())["config"]["profile"] == "smoke"
    [item] = experiments.load_results(tmp_path / "r")
    assert item["name"] == "t" and item["table"]["d2r"] == {"clean": 0.5, "pgd20": 0.25}
    assert "t: profile=smoke seed=0" in experiments.collect_results(tmp_path / "r")


def test_trained_names_the_callers_line_in_warnings_and_the_cache_as_a_label(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path))
    seen = {}

    def fake_load_or_train(tc, *, device, progress, log):
        log(f"loaded the finished run {train.cache_path(tc)}/last.pt epoch 1/1")
        warnings.warn("collapsed", train.TrainingCollapsed, stacklevel=2)
        seen["config"] = tc
        return "run"

    monkeypatch.setattr(train, "load_or_train", fake_load_or_train)
    cfg = experiments.resolve("smoke", device="cpu", verbose=False)
    with pytest.warns(train.TrainingCollapsed) as record:
        assert experiments.trained(cfg, "d2r") == "run"
    assert record[0].filename == __file__
    assert seen["config"].method == "d2r" and seen["config"].held_out == 32
    printed = capsys.readouterr().out
    assert printed.startswith("loaded the finished run <cache>/d2r-small_cnn-")
    assert str(tmp_path) not in printed


@pytest.mark.parametrize("name,on", [("smoke", True), ("cpu", True), ("gpu-short", False),
                                     ("full", False), ("full-tiny", False), ("reference", False)])
def test_the_book_profiles_train_on_the_fast_paths_and_the_paper_profiles_do_not(
        name, on, monkeypatch):
    monkeypatch.delenv("D2R_PROFILE", raising=False)
    cfg = experiments.resolve(name, device="cpu", verbose=False)
    run = experiments.train_config(cfg, "d2r")
    assert (cfg.fast, run.channels_last, run.fold_batchnorm) == (on, on, on)
    assert ("fast-paths" in cfg.describe()) is on
    assert "| `fast` |" in experiments.profiles_table([name])


def test_fast_must_be_a_boolean(monkeypatch):
    monkeypatch.delenv("D2R_PROFILE", raising=False)
    with pytest.raises(TypeError, match="fast must be True or False; got 'yes'"):
        experiments.resolve("cpu", device="cpu", verbose=False, fast="yes")
