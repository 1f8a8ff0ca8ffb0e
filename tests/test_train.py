"""The training loop: schedule, resume = uninterrupted, NaN stop, safe checkpoints, DDP with gloo."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2r_lib import checkpoint, losses, methods, models, train

ROOT = Path(__file__).resolve().parents[1]


def tiny(method="d2r", epochs=3, **kw):
    return train.TrainConfig(method=method, dataset="synthetic", subset="default", train_size=96, epochs=epochs,
                             batch_size=32, held_out=16, method_params={"steps": 2} if method != "standard" else {},
                             **kw)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("epoch,lr", [(1, 0.02), (2, 0.1), (75, 0.1), (76, 0.01), (90, 0.01), (91, 0.001),
                                      (100, 0.001)])
def test_paper_schedule_boundaries_for_100_epochs(epoch, lr):
    assert train.paper_lr(epoch, 100) == pytest.approx(lr)


def test_paper_schedule_scales_and_cosine():
    assert [round(train.paper_lr(e, 10), 6) for e in range(1, 11)] == [0.02] + [0.1] * 6 + [0.01] * 2 + [0.001]
    assert train.cosine_lr(1, 10) == pytest.approx(0.1)
    assert train.cosine_lr(10, 10) < train.cosine_lr(5, 10) < 0.1
    with pytest.raises(ValueError, match="epoch must be <= 10"):
        train.paper_lr(11, 10)


def test_fit_records_history_and_saves_target_and_guide(tmp_path):
    result = train.fit(tiny(epochs=2), tmp_path, progress=False, log=lambda *a: None)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for key in ("train_loss", "train_ce", "train_mse", "train_clean", "train_adv", "clean_acc", "pgd_acc", "lr"):
        assert key in result.history[0]
    assert all(0 <= r["pgd_acc"] <= r["clean_acc"] + 1e-9 for r in result.history)
    target, guide, payload = train.load_run(tmp_path)
    assert guide is not None and payload["epoch"] == 2 and payload["method"] == "d2r"
    assert states_equal(target.state_dict(), result.target.state_dict())
    assert states_equal(guide.state_dict(), result.guide.state_dict())
    assert json.loads((tmp_path / "history.json").read_text()) == result.history


def test_resume_equals_uninterrupted_exactly(tmp_path):
    full = train.fit(tiny(), tmp_path / "full", progress=False, log=lambda *a: None)
    for _ in range(3):  # one epoch per call, as if killed after each checkpoint
        part = train.fit(tiny(), tmp_path / "parts", progress=False, log=lambda *a: None, max_epochs=1)
    assert states_equal(full.target.state_dict(), part.target.state_dict())
    assert states_equal(full.guide.state_dict(), part.guide.state_dict())
    assert full.history == part.history or [r["train_loss"] for r in full.history] == \
        [r["train_loss"] for r in part.history]


def test_killed_process_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the command line mid-run, run the same command again: same weights as an uninterrupted run."""
    cmd = [sys.executable, "-m", "d2r_lib", "train", "--method", "pgd_at", "--dataset", "synthetic", "--subset",
           "default", "--train-size", "256", "--epochs", "3", "--batch-size", "32", "--steps", "2",
           "--eval-size", "16", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(ckpt)["epoch"] < 3, "the run finished before it could be killed"
    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    whole, _, _ = train.load_run(tmp_path / "whole")
    resumed, _, payload = train.load_run(tmp_path / "killed")
    assert payload["epoch"] == 3
    assert states_equal(whole.state_dict(), resumed.state_dict())


def test_nan_loss_stops_with_epoch_batch_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(epochs=3)
    train.fit(cfg, tmp_path, progress=False, log=lambda *a: None, max_epochs=1)
    before = (tmp_path / "last.pt").read_bytes()
    real = losses.d2r_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            terms["adv"] = terms["adv"] * float("nan")
            terms["loss"] = terms["loss"] + terms["adv"]
        return terms
    monkeypatch.setattr(losses, "d2r_terms", poisoned)
    with pytest.raises(train.TrainingDiverged, match=r"epoch 2, batch 2: term 'adv' = nan.*last good checkpoint"):
        train.fit(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_collapse_to_a_constant_prediction_warns(tmp_path, monkeypatch):
    import warnings

    class Constant(torch.nn.Module):
        def forward(self, x):
            return 1e-3 * x.flatten(1)[:, :10] + torch.zeros(10).index_fill_(0, torch.tensor([3]), 10.0)

    torch.manual_seed(0)
    x, y = torch.rand(40, 3, 8, 8), torch.randint(0, 10, (40,))
    record = train.held_out_check(Constant(), x, y)
    assert record["predicted_classes"] == 1
    assert record["clean_acc"] == pytest.approx((y == 3).float().mean().item())
    with pytest.warns(train.TrainingCollapsed, match=r"epoch 4: the target predicts one class for all 40 held-out "
                                                     r"images.*lr = 0.1 now, e.g. 0.05"):
        assert train.warn_if_collapsed({**record, "epoch": 4}, 40, 0.1)

    varied = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    record = train.held_out_check(varied, x, y)
    assert record["predicted_classes"] > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not train.warn_if_collapsed({**record, "epoch": 1}, 40, 0.1)

    # the loop checks every epoch
    monkeypatch.setattr(train, "held_out_check", lambda *a, **k: {"clean_acc": 0.1, "pgd_acc": 0.0,
                                                                  "predicted_classes": 1})
    with pytest.warns(train.TrainingCollapsed, match="epoch 1: "):
        import dataclasses
        train.fit(dataclasses.replace(tiny(epochs=1), held_out=32), tmp_path, progress=False, log=lambda *a: None)


class Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "d2r_lib.train", "target": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="carries pickled Python objects"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="carries pickled Python objects"):
        train.load_run(path)


def test_strict_keys_and_metadata_checks(tmp_path):
    train.fit(tiny(method="standard", epochs=1), tmp_path, progress=False, log=lambda *a: None)
    with pytest.raises(checkpoint.CheckpointError, match="target_model: stored 'small_cnn', asked 'resnet18'"):
        train.load_run(tmp_path, target_model="resnet18")
    with pytest.raises(checkpoint.CheckpointError, match="num_classes: stored 10, asked 100"):
        train.load_run(tmp_path, num_classes=100)
    with pytest.raises(checkpoint.CheckpointError, match="method: stored 'standard', asked 'd2r'"):
        train.load_run(tmp_path, method="d2r")
    state = models.build_model("small_cnn").state_dict()
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \d+: \[.*unexpected \d+"):
        checkpoint.load_state_strict(models.build_model("resnet18_standard"), state, "target")
    with pytest.raises(checkpoint.CheckpointError, match="do not fit the model"):
        checkpoint.load_state_strict(models.build_model("small_cnn", 100), state, "target")


def test_other_settings_in_out_dir_are_not_overwritten(tmp_path):
    train.fit(tiny(epochs=1), tmp_path, progress=False, log=lambda *a: None)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match=r"other settings \(epochs: stored 1, asked 2\)"):
        train.fit(tiny(epochs=2), tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_bad_training_requests(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        train.fit(tiny(), afile, progress=False)
    with pytest.raises(FileNotFoundError, match="resume='always' but there is no checkpoint"):
        train.fit(tiny(), tmp_path / "empty", resume="always", progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        train.fit(train.TrainConfig(method="fast_at"), tmp_path / "x")
    with pytest.raises(ValueError, match="schedule must be one of 'paper', 'cosine'"):
        tiny(schedule="step").validate()
    with pytest.raises(ValueError, match="resume must be one of"):
        train.fit(tiny(), tmp_path / "y", resume="maybe")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_rejects_unknown_options_and_bad_values(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "d2r_lib", *args], capture_output=True, text=True)
    r = run("train", "--out", str(tmp_path), "--bogus", "1")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    r = run("train", "--out", str(tmp_path / "a"), "--method", "pgd_at", "--eps", "-1")
    assert r.returncode == 2 and "eps must be >= 0" in r.stderr
    r = run("train", "--out", str(tmp_path / "b"), "--method", "d2r", "--beta", "6")
    assert r.returncode == 2 and "method 'd2r' has no parameter beta" in r.stderr
    r = run("evaluate", "--checkpoint", str(tmp_path / "nothing.pt"))
    assert r.returncode == 1 and "no checkpoint at" in r.stderr
    r = run("train", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "--w-clean" in r.stdout
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ddp_two_cpu_processes_with_gloo_stay_identical_and_save_once(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "ranks.json").read_text())
    assert info == {**info, "world": 2, "identical": True, "nonzero": True}
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last.pt", "ranks.json"]
    assert r.stdout.count("epoch   1 ") == 1 and r.stdout.count("epoch   2 ") == 1  # logged by rank 0 only
    payload = checkpoint.load(out / "last.pt")
    assert payload["epoch"] == 2 and payload["guide"] is not None


def test_bench_prints_images_per_second_and_rejects_bad_pairs(capsys):
    import re
    from d2r_lib.__main__ import main
    assert main(["bench", "--pairs", "small_cnn:small_cnn:4", "--steps", "1", "--eval-models", "small_cnn",
                 "--eval-batch-size", "4", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rates = [float(r) for r in re.findall(r"([\d.]+) images/s", out)]
    assert "d2r train step  target small_cnn" in out and "PGD-20 evaluation  model small_cnn" in out
    assert len(rates) == 2 and all(r > 0 for r in rates)
    for args, message in [(["--pairs", "small_cnn"], "--pairs entries must be target:guide or target:guide:batch"),
                          (["--pairs", "small_cnn:small_cnn:4", "small_cnn:vgg:4"], "guide must be one of"),
                          (["--eval-models", "vgg"], "--eval-models must be one of")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *args, "--repeats", "1", "--device", "cpu"])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and message in captured.err
        assert captured.out == ""  # checked before anything is measured
