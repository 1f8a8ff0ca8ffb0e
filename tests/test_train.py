"""The training loop: schedule, resume = uninterrupted, NaN stop, safe checkpoints, DDP with
gloo."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2r_lib import checkpoint, fast, losses, methods, models, train

ROOT = Path(__file__).resolve().parents[1]


def tiny(method="d2r", epochs=3, **kw):
    return train.TrainConfig(method=method, dataset="synthetic", subset="default", train_size=96,
                             epochs=epochs,
                             batch_size=32, held_out=16,
                             method_params={"steps": 2} if method != "standard" else {},
                             **kw)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("epoch,lr", [(1, 0.02), (2, 0.1), (75, 0.1), (76, 0.01), (90, 0.01),
                                      (91, 0.001), (100, 0.001)])
def test_paper_schedule_boundaries_for_100_epochs(epoch, lr):
    assert train.paper_lr(epoch, 100) == pytest.approx(lr)


def test_paper_schedule_scales_and_cosine():
    lrs = [round(train.paper_lr(e, 10), 6) for e in range(1, 11)]
    assert lrs == [0.02] + [0.1] * 6 + [0.01] * 2 + [0.001]
    assert train.cosine_lr(1, 10) == pytest.approx(0.1)
    assert train.cosine_lr(10, 10) < train.cosine_lr(5, 10) < 0.1
    with pytest.raises(ValueError, match="epoch must be <= 10"):
        train.paper_lr(11, 10)


def test_fit_records_history_and_saves_target_and_guide(tmp_path):
    result = train.fit(tiny(epochs=2), tmp_path, progress=False, log=lambda *a: None)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for key in ("train_loss", "train_ce", "train_mse", "train_clean", "train_adv", "clean_acc",
                "pgd_acc", "lr"):
        assert key in result.history[0]
    # counts over the 16 held-out images (not robust <= clean: PGD's random start can turn a wrong
    # prediction of this barely trained model right, depending on the CPU's rounding)
    for r in result.history:
        for key in ("clean_acc", "pgd_acc"):
            assert 0 <= r[key] <= 1 and (r[key] * 16) == round(r[key] * 16), (key, r[key])
    target, guide, payload = train.load_run(tmp_path)
    assert guide is not None and payload["epoch"] == 2 and payload["method"] == "d2r"
    assert states_equal(target.state_dict(), result.target.state_dict())
    assert states_equal(guide.state_dict(), result.guide.state_dict())
    assert json.loads((tmp_path / "history.json").read_text()) == result.history


def test_resume_equals_uninterrupted_exactly(tmp_path):
    full = train.fit(tiny(), tmp_path / "full", progress=False, log=lambda *a: None)
    for _ in range(3):  # one epoch per call, as if killed after each checkpoint
        part = train.fit(tiny(), tmp_path / "parts", progress=False, log=lambda *a: None,
                         max_epochs=1)
    assert states_equal(full.target.state_dict(), part.target.state_dict())
    assert states_equal(full.guide.state_dict(), part.guide.state_dict())
    assert full.history == part.history or [r["train_loss"] for r in full.history] == \
        [r["train_loss"] for r in part.history]


def test_killed_process_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the command line mid-run, run the same command again: same weights as an
    uninterrupted run."""
    cmd = [sys.executable, "-m", "d2r_lib", "train", "--method", "pgd_at", "--dataset",
           "synthetic", "--subset",
           "default", "--train-size", "256", "--epochs", "3", "--batch-size", "32", "--steps", "2",
           "--held-out", "16", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(ckpt)["epoch"] < 3, "the run finished before it could be killed"
    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], check=True, env=env,
                   capture_output=True)
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
    with pytest.raises(train.TrainingDiverged,
                       match=r"epoch 2, batch 2: term 'adv' = nan.*last good checkpoint"):
        train.fit(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_collapse_to_a_constant_prediction_warns(tmp_path, monkeypatch):
    import warnings

    class Constant(torch.nn.Module):
        def forward(self, x):
            constant = torch.zeros(10).index_fill_(0, torch.tensor([3]), 10.0)
            return 1e-3 * x.flatten(1)[:, :10] + constant

    torch.manual_seed(0)
    x, y = torch.rand(40, 3, 8, 8), torch.randint(0, 10, (40,))
    record = train.held_out_check(Constant(), x, y)
    assert record["predicted_classes"] == 1
    assert record["clean_acc"] == pytest.approx((y == 3).float().mean().item())
    with pytest.warns(train.TrainingCollapsed,
                      match=r"epoch 4: the target predicts one class for all 40 held-out "
                            r"images.*lr = 0.1 now, e.g. 0.05"):
        assert train.warn_if_collapsed({**record, "epoch": 4}, 40, 0.1)

    varied = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    record = train.held_out_check(varied, x, y)
    assert record["predicted_classes"] > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not train.warn_if_collapsed({**record, "epoch": 1}, 40, 0.1)

    # the loop checks every epoch
    collapsed = {"clean_acc": 0.1, "pgd_acc": 0.0, "predicted_classes": 1}
    monkeypatch.setattr(train, "held_out_check", lambda *a, **k: collapsed)
    with pytest.warns(train.TrainingCollapsed, match="epoch 1: "):
        import dataclasses
        train.fit(dataclasses.replace(tiny(epochs=1), held_out=32), tmp_path, progress=False,
                  log=lambda *a: None)


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
    with pytest.raises(checkpoint.CheckpointError,
                       match="target_model: stored 'small_cnn', asked 'resnet18'"):
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
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"other settings \(epochs: stored 1, asked 2\)"):
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


def test_ddp_two_cpu_processes_with_gloo_stay_identical_and_save_once(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29517",
           str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "ranks.json").read_text())
    assert info == {**info, "world": 2, "identical": True, "nonzero": True}
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last.pt", "ranks.json"]
    # logged by rank 0 only
    assert r.stdout.count("epoch   1 ") == 1 and r.stdout.count("epoch   2 ") == 1
    payload = checkpoint.load(out / "last.pt")
    assert payload["epoch"] == 2 and payload["guide"] is not None


# ------------------------------------------------------------------------------- divergence on disk
def synthetic_cfg(**kw):
    fields = dict(method="standard", dataset="synthetic", subset="default", train_size=96,
                  epochs=2, batch_size=32, held_out=16)
    return train.TrainConfig(**{**fields, **kw})


def test_lr_1e6_diverges_before_anything_is_written(tmp_path):
    with pytest.raises(train.TrainingDiverged,
                       match=r"(non-finite loss at epoch 1|training diverged in epoch 1).*"
                             r"the last good checkpoint is intact: none written yet"):
        train.fit(synthetic_cfg(lr=1e6), tmp_path, progress=False, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_lr_1e6_with_one_batch_per_epoch_keeps_the_last_finite_checkpoint(tmp_path):
    """One batch per epoch: the loss of every step is finite, the weights are not; the run stops
    before the write, and the checkpoint on disk is the last finite one."""
    cfg = synthetic_cfg(lr=1e6, train_size=32, batch_size=64, epochs=5)
    with pytest.raises(train.TrainingDiverged,
                       match=r"training diverged in epoch (\d)( \(found after batch 1, the epoch's "
                             r"last\): (target|optimizer)\.\S+ holds NaN or infinite values|: the "
                             r"target's clean logits on the held-out images are NaN or infinite)"
                             r".* Nothing was saved") as info:
        train.fit(cfg, tmp_path, progress=False, log=lambda *a: None)
    epoch = int(str(info.value).split("epoch ")[1].split(" ")[0].rstrip(":"))
    if epoch > 1:
        payload = checkpoint.load(tmp_path / "last.pt")  # refuses non-finite tensors
        assert payload["epoch"] == epoch - 1
        assert f"(after epoch {epoch - 1})" in str(info.value)
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_non_finite_buffer_stops_the_run_before_the_checkpoint_write(tmp_path, monkeypatch):
    """A BatchNorm running_var of inf leaves every train-mode loss finite: only the check of every
    parameter and buffer before the write catches it."""
    cfg = synthetic_cfg(epochs=3)
    train.fit(cfg, tmp_path, progress=False, log=lambda *a: None, max_epochs=1)
    before = (tmp_path / "last.pt").read_bytes()
    real_step = methods.step

    def step_then_poison(method, target, guide, optimizer, x, y, params):
        terms = real_step(method, target, guide, optimizer, x, y, params)
        target.features[4].running_var.fill_(float("inf"))
        return terms

    monkeypatch.setattr(methods, "step", step_then_poison)
    with pytest.raises(train.TrainingDiverged,
                       match=r"training diverged in epoch 2 \(found after batch 3, the epoch's "
                             r"last\): target\.features\.4\.running_var holds NaN or infinite "
                             r"values\. Nothing was saved; the last good checkpoint is intact: "
                             r".*last\.pt \(after epoch 1\)"):
        train.fit(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_non_finite_optimizer_state_is_caught_too(tmp_path):
    target = models.build_model("small_cnn")
    optimizer = methods.make_optimizer(target)
    target(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    optimizer.state[next(target.parameters())]["momentum_buffer"][0] = float("nan")
    with pytest.raises(train.TrainingDiverged, match=r"epoch 7 .*batch 9.*optimizer\.0\."
                                                     r"momentum_buffer holds NaN"):
        train.check_finite(7, 9, target, None, optimizer)


def test_non_finite_checkpoints_are_refused_for_evaluation_and_resume(tmp_path):
    cfg = synthetic_cfg()
    train.fit(cfg, tmp_path, progress=False, log=lambda *a: None, max_epochs=1)
    path = tmp_path / "last.pt"
    payload = torch.load(path, weights_only=True)
    payload["target"]["linear.weight"][0, 0] = float("nan")
    torch.save(payload, path)
    message = r"refusing to load .*last\.pt: tensor target\.linear\.weight holds NaN or infinite"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        train.load_run(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        train.fit(cfg, tmp_path, progress=False, log=lambda *a: None)


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert checkpoint.atomic_write(path, lambda tmp: tmp.write_text("first")) == path
    assert path.read_text() == "first"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, half_then_fail)
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]  # no temporary file left
    with pytest.raises(IsADirectoryError, match="is a directory"):
        checkpoint.atomic_write(tmp_path, lambda tmp: None)


@pytest.mark.parametrize("amp, fold", [(True, True), (False, False)])
def test_each_step_runs_under_the_configs_autocast_and_folding(tmp_path, monkeypatch, amp, fold):
    seen = []
    real = methods.step

    def recording(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     fast.current().fold_batchnorm))
        return real(*args, **kwargs)
    monkeypatch.setattr(methods, "step", recording)
    train.fit(tiny(epochs=1, amp=amp, fold_batchnorm=fold), tmp_path, progress=False,
              log=lambda *a: None)
    assert seen and all(s[0] == amp and s[2] == fold for s in seen)
    assert all(s[1] == torch.bfloat16 for s in seen if s[0])
    assert fast.current().fold_batchnorm is False  # restored after every step
