"""The command line (d2r_lib.lab.cli): commands, --profile, run / bench delegation, demo, end to
end.

Bad input is covered by tests/test_faults.py.
"""

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import tomllib

from d2r_lib import data, evaluate, experiments, methods, train
from d2r_lib.lab import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "evaluate", "run", "bench", "quickstart", "demo", "profiles")


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^    (\w+)", out, re.M)
    assert listed == list(COMMANDS)


def test_train_help_names_every_option(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--profile", "--resume", "--w-clean", "--held-out", "--no-official-passes",
                 "--data-dir", "--seed"):
        assert flag in out
    for device in experiments.DEVICES:  # the one list of devices
        assert device in out


def test_python_m_and_the_console_script_both_call_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"d2r": "d2r_lib.lab.cli:main"}
    import d2r_lib.__main__ as shim

    assert shim.main is cli.main and shim.build_parser is cli.build_parser
    assert "raise SystemExit(main())" in Path(shim.__file__).read_text()


def test_readme_lists_the_commands_that_exist(capsys):
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## More commands"):readme.index("The paper's setting")]
    listed = re.findall(r"^\.venv/bin/d2r (\w+)", block, re.M)
    assert sorted(listed) == sorted(COMMANDS)
    for command in listed:
        assert cli.main([command, "--help"]) == 0
    capsys.readouterr()


def test_profiles_prints_every_value_of_every_profile(capsys):
    assert cli.main(["profiles"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = list(experiments.PROFILES)
    assert lines[0] == "| setting | " + " | ".join(f"`{n}`" for n in names) + " |"
    rows = {line.split(" | ")[0].strip("| `"): [c.strip() for c in line.strip("|").split(" | ")[1:]]
            for line in lines[2:]}
    for i, name in enumerate(names):
        profile = experiments.PROFILES[name]
        assert rows["purpose"][i] == profile.purpose
        for key in experiments.PROFILE_FIELDS:
            value = getattr(profile, key)
            if value is not None:
                assert rows[key][i] == str(value), (name, key)


# ------------------------------------------------------------------------------ train --profile
def _parse(*argv):
    args, extra = cli.build_parser().parse_known_args(list(argv))
    assert extra == []
    return args


def _held_out(cfg):
    return cfg.held_out


def test_profile_fills_the_defaults_and_flags_override_it(tmp_path):
    smoke = experiments.PROFILES["smoke"]
    smoke = dataclasses.asdict(smoke) if dataclasses.is_dataclass(smoke) else smoke
    cfg = cli.train_config(_parse("train", "--profile", "smoke", "--method", "d2r", "--out",
                                  str(tmp_path)))
    assert (cfg.train_size, cfg.epochs, cfg.batch_size, cfg.lr) == (
        smoke["train_size"], smoke["epochs"], smoke["batch_size"], smoke["lr"])
    assert (cfg.target_model, cfg.guide_model, cfg.dataset, cfg.subset) == (
        smoke["target_model"], smoke["guide_model"], smoke["dataset"], smoke["subset"])
    assert _held_out(cfg) == smoke["held_out"]
    assert cfg.method_params == {"steps": smoke["steps"]}  # the profile's attack budget
    cfg = cli.train_config(_parse("train", "--profile", "smoke", "--method", "d2r", "--epochs",
                                  "3", "--steps", "4", "--out", str(tmp_path)))
    assert cfg.epochs == 3 and cfg.method_params == {"steps": 4}
    assert cfg.train_size == smoke["train_size"]
    # a method without an attack takes no attack budget from the profile
    cfg = cli.train_config(_parse("train", "--profile", "smoke", "--method", "standard", "--out",
                                  str(tmp_path)))
    assert cfg.method_params == {}


def test_train_profile_gives_the_chapters_configuration(tmp_path, monkeypatch):
    """`d2r train --profile smoke` trains exactly the run a chapter at the smoke profile caches."""
    monkeypatch.delenv("D2R_PROFILE", raising=False)
    resolved = experiments.resolve("smoke", seed=1, device="cpu", verbose=False)
    for method in ("standard", "pgd_at", "d2r"):
        chapters = experiments.train_config(resolved, method)
        ours = cli.train_config(_parse("train", "--profile", "smoke", "--method", method,
                                       "--out", str(tmp_path)))
        assert ours.as_dict() == chapters.as_dict()
        assert ours.key() == chapters.key()


_TINY = dataclasses.replace(experiments.PROFILES["smoke"], train_size=96, attacked=16, held_out=24,
                            epochs=2, batch_size=48, eps=4 / 255, step_size=None, steps=3,
                            lr=0.05, fast=False)


def test_a_new_profile_reaches_train_through_the_one_mapping(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "PROFILES", {"tiny": _TINY})
    cfg = cli.train_config(_parse("train", "--profile", "tiny", "--method", "trades", "--lr",
                                  "0.01", "--out", str(tmp_path)))
    got = (cfg.train_size, cfg.epochs, cfg.batch_size, cfg.lr, _held_out(cfg))
    assert got == (96, 2, 48, 0.01, 24)
    assert cfg.method_params == {"eps": 4 / 255, "steps": 3}


def test_without_profile_the_defaults_are_train_configs(tmp_path):
    cfg = cli.train_config(_parse("train", "--out", str(tmp_path)))
    assert cfg.as_dict() == train.TrainConfig().as_dict()


def test_method_options_reach_the_method(tmp_path):
    cfg = cli.train_config(_parse("train", "--method", "d2r", "--eps", "8/255", "--step-size",
                                  "2/255", "--steps", "3", "--w-clean", "1", "--w-adv", "2",
                                  "--kl-reduction", "batchmean", "--out", str(tmp_path)))
    assert cfg.method_params == {"eps": 8 / 255, "step_size": 2 / 255, "steps": 3,
                                 "w_clean": 1.0, "w_adv": 2.0, "kl_reduction": "batchmean"}


# -------------------------------------------------------------------------- run / bench delegation
def _fake_module(name, calls, code=0):
    mod = types.ModuleType(f"d2r_lib.{name}")
    mod.__doc__ = f"The fake {name} (a test double)."

    def add_arguments(parser):
        parser.add_argument("--profile", default="cpu")
        parser.add_argument("--eval-batch-size", type=int, default=256)

    def main(args):
        if args.eval_batch_size < 1:
            raise ValueError(f"--eval-batch-size must be >= 1; got {args.eval_batch_size}")
        calls.append(args)
        return code

    mod.add_arguments, mod.main = add_arguments, main
    return mod


@pytest.mark.parametrize("command, module", [("run", "runner"), ("bench", "bench")])
def test_run_and_bench_take_options_and_exit_code_from_their_module(command, module, monkeypatch,
                                                                    capsys):
    calls = []
    monkeypatch.setitem(sys.modules, f"d2r_lib.lab.{module}", _fake_module(module, calls, code=3))
    assert cli.main([command, "--profile", "smoke"]) == 3
    assert calls[0].profile == "smoke" and calls[0].command == command
    assert cli.main([command, "--eval-batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --eval-batch-size must be >= 1; got 0\n"
    assert cli.main([command, "--nope"]) == 2
    assert f"d2r {command}: unrecognized arguments: --nope" in capsys.readouterr().err
    assert cli.main([command, "--help"]) == 0
    assert f"The fake {module}" in capsys.readouterr().out


@pytest.mark.parametrize("command, module", [("run", "runner"), ("bench", "bench")])
def test_a_missing_delegate_is_one_clear_error(command, module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, f"d2r_lib.lab.{module}", None)  # import fails: missing
    assert cli.main([command, "--profile", "smoke"]) == 2
    assert capsys.readouterr().err == (
        f"error: `{command}` needs d2r_lib.lab.{module}, which this installation lacks; "
        "reinstall d2r_lib\n")
    assert cli.main(["profiles"]) == 0  # the other commands work


# ------------------------------------------------------------------------------------------ demo
@pytest.mark.data
def test_demo_runs_methods_train_step_once_and_prints_its_terms(shared_data, monkeypatch, capsys):
    calls = []
    real_step = methods.train_step

    def spy(method, target, guide, optimizer, x, y, **params):
        terms = real_step(method, target, guide, optimizer, x, y, **params)
        calls.append((getattr(method, "name", method), tuple(x.shape), terms))
        return terms

    monkeypatch.setattr(methods, "train_step", spy)
    assert cli.main(["demo", "--device", "cpu", "--batch-size", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1 and calls[0][:2] == ("d2r", (4, 3, 32, 32))
    printed = dict(re.findall(r"^  (\w+)\s+(-?[\d.]+)$", out, re.M))
    assert printed == {k: f"{v:.6f}" for k, v in calls[0][2].items()}
    linf = float(re.search(r"‖δ‖∞ max ([\d.]+)", out).group(1))
    assert 0 < linf <= methods.get_method("d2r").resolve()["eps"] + 1e-6
    assert "seed 3" in out


@pytest.mark.data
def test_demo_is_seeded_like_train(shared_data, capsys, tmp_path):
    outputs = []
    for seed in ("5", "5", "6"):
        assert cli.main(["demo", "--device", "cpu", "--batch-size", "2", "--seed", seed]) == 0
        out = capsys.readouterr().out
        first, *rest = out.splitlines()
        outputs.append([re.sub(r"[\d.]+s$", "", first), *rest])  # all but the time taken
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    for command in (["demo"], ["train", "--out", str(tmp_path / "o")]):  # one seed rule
        assert cli.main([*command, "--seed", "-1"]) == 2
        assert capsys.readouterr().err == "error: --seed must be >= 0; got -1\n"


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.data
def test_train_then_evaluate_end_to_end(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["train", "--method", "standard", "--epochs", "1", "--train-size", "64", "--batch-size",
            "32", "--held-out", "8", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert f"checkpoint: {out / 'last.pt'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last.pt"]
    assert cli.main(argv) == 0  # the same command again loads the finished run
    assert "loaded the finished run" in capsys.readouterr().out

    report = tmp_path / "eval" / "results.json"
    assert cli.main(["evaluate", "--checkpoint", str(out), "--n", "8", "--attacks", "clean,fgsm",
                     "--device", "cpu", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "standard (small_cnn, epoch 1/1) on" in printed and "8 images (lossless)" in printed
    table = evaluate.ResultsTable.from_dict(json.loads(report.read_text()))
    target, _, _ = train.load_run(out)
    x, y = data.load("cifar10", "test", "mini").subset(8).tensors()
    assert table.rows["standard"]["clean"] == pytest.approx(evaluate.accuracy(target, x, y))


@pytest.mark.data
def test_quickstart_trains_both_and_writes_the_table(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "qs"
    assert cli.main(["quickstart", "--epochs", "1", "--train-size", "32", "--batch-size", "32",
                     "--steps", "1", "--n", "8", "--attacks", "clean", "--eval-eps", "4/255",
                     "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "8 lossless CIFAR-10 test images, ε = 0.0157" in printed
    blob = json.loads((out / "results.json").read_text())
    table = evaluate.ResultsTable.from_dict(blob)
    assert set(table.rows) == {"standard", "d2r"}
    assert table.meta["eps"] == pytest.approx(4 / 255)  # --eval-eps reaches the evaluation
    assert (out / "standard" / "last.pt").is_file() and (out / "d2r" / "last.pt").is_file()


def test_errors_are_exit_code_1_for_a_diverged_run(monkeypatch, tmp_path, capsys):
    def diverge(*args, **kwargs):
        raise train.TrainingDiverged("non-finite loss at epoch 1, batch 1")

    monkeypatch.setattr(train, "fit", diverge)
    assert cli.main(["train", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "error: non-finite loss at epoch 1, batch 1\n"


def test_a_failed_download_is_one_line_naming_what_to_do(monkeypatch, capsys):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "load", offline)
    assert cli.main(["demo", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "error: the data is not here and downloading it failed (Name or service not known); "
        "give --data-dir with the offline bundle, or set $D2R_DATA_DIR\n")
    assert cli.main(["demo", "--device", "cpu", "--data-dir", "."]) == 2
    assert capsys.readouterr().err.startswith("error: the data is not in --data-dir . and ")


def test_data_errors_are_one_line(monkeypatch, capsys):
    class DataError(RuntimeError):  # the data module's family of errors (not a ValueError)
        pass

    def corrupt(*args, **kwargs):
        raise DataError("cifar10_test_1000.npz: SHA256 mismatch\nexpected abc, got def")

    monkeypatch.setattr(data, "DataError", DataError, raising=False)
    monkeypatch.setattr(data, "load", corrupt)
    assert cli.main(["demo", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "error: cifar10_test_1000.npz: SHA256 mismatch expected abc, got def\n")


def test_fold_batchnorm_flag_and_the_profiles_fast_paths(tmp_path):
    plain = cli.train_config(_parse("train", "--out", str(tmp_path)))
    assert (plain.fold_batchnorm, plain.channels_last) == (False, False)
    flagged = cli.train_config(_parse("train", "--fold-batchnorm", "--out", str(tmp_path)))
    assert (flagged.fold_batchnorm, flagged.channels_last) == (True, False)
    cpu = cli.train_config(_parse("train", "--profile", "cpu", "--out", str(tmp_path)))
    assert (cpu.fold_batchnorm, cpu.channels_last) == (True, True)
    full = cli.train_config(_parse("train", "--profile", "full", "--out", str(tmp_path)))
    assert (full.fold_batchnorm, full.channels_last) == (False, False)
