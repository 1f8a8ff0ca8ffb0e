"""Fault injection through the command line (issue 11): every bad input is refused with one line
that names the flag, exit code 2 (1 for a diverged run), before any work; nothing on disk changes.

Cases run `cli.main([...])` in-process inside a sandbox folder (the working directory, the
checkpoint cache and every path of a case live there); a real process is used where one is needed
(no traceback, SIGKILL during a checkpoint write).
"""

import contextlib
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from d2r_lib import (
    attacks,
    checkpoint,
    evaluate,
    experiments,
    methods,
    models,
    train,
    validate,
)
from d2r_lib.lab import cli

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

def _unwritable() -> str | None:
    """A folder this process cannot write in, or None (root writes nearly everywhere)."""
    for candidate in ("/sys", "/proc"):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    return None


UNWRITABLE = _unwritable()
NEEDS_UNWRITABLE = pytest.mark.skipif(UNWRITABLE is None, reason="no unwritable folder here")


# ------------------------------------------------------------------------------------- sandbox
def _tiny_run(cfg: train.TrainConfig, *, nan: bool = False) -> dict:
    """A checkpoint payload as `train.fit` writes it, without training (optionally NaN weights)."""
    torch.manual_seed(0)
    target = models.build_model(cfg.target_model)
    guide = models.build_model(cfg.guide_model) if cfg.uses_guide else None
    if nan:
        with torch.no_grad():
            next(target.parameters()).fill_(float("nan"))
    opt = methods.make_optimizer(target, guide)
    return {"kind": "d2r_lib.train", "config": cfg.as_dict(), "epoch": 1, "epochs": cfg.epochs,
            "method": cfg.method, "target_model": cfg.target_model,
            "guide_model": cfg.guide_model if guide is not None else None, "num_classes": 10,
            "dataset": cfg.dataset, "target": target.state_dict(),
            "guide": guide.state_dict() if guide is not None else None,
            "optimizer": opt.state_dict(), "rng": {}, "history": [], "format_version": 1}


class Thing:
    """Not a tensor: saving it pickles a Python object."""


CORRUPT_SEEDS = (0, 2, 20)  # torch.load: UnpicklingError, IndexError, KeyError


def _make_template(root: Path) -> None:
    root.mkdir()
    (root / "afile").write_text("not a folder\n")
    (root / "emptydir").mkdir()
    cfg = train.TrainConfig(method="standard", epochs=1, train_size=64, batch_size=32)
    payload = _tiny_run(cfg)
    (root / "ckpt").mkdir()
    torch.save(payload, root / "ckpt" / "last.pt")
    good = (root / "ckpt" / "last.pt").read_bytes()
    for seed in CORRUPT_SEEDS:  # random bytes that fail in different places inside torch.load
        (root / f"corrupt{seed}.pt").write_bytes(random.Random(seed).randbytes(4096))
    (root / "corrupt_utf8.pt").write_bytes(b"\xfc" + random.Random(1).randbytes(4095))
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "empty.pt").write_bytes(b"")
    torch.save({"kind": "d2r_lib.train", "thing": Thing()}, root / "pickled.pt")
    torch.save({"weights": torch.zeros(3)}, root / "notrun.pt")
    wrong = dict(payload, target={k: v for k, v in payload["target"].items() if "bias" not in k})
    torch.save(wrong, root / "wrongkeys.pt")
    (root / "nan").mkdir()
    torch.save(_tiny_run(cfg, nan=True), root / "nan" / "last.pt")
    (root / "out_lastdir" / "last.pt").mkdir(parents=True)
    (root / "qs_file").mkdir()
    (root / "qs_file" / "d2r").write_text("a file where a run folder goes\n")
    (root / "qs_resultsdir" / "results.json").mkdir(parents=True)
    for seed in CORRUPT_SEEDS:
        (root / f"resume_corrupt{seed}").mkdir()
        junk = random.Random(seed).randbytes(4096)
        (root / f"resume_corrupt{seed}" / "last.pt").write_bytes(junk)
    (root / "resume_other").mkdir()
    other = train.TrainConfig(method="standard", epochs=7, train_size=64, batch_size=32)
    torch.save(_tiny_run(other), root / "resume_other" / "last.pt")
    (root / "qs_other" / "d2r").mkdir(parents=True)
    torch.save(_tiny_run(other), root / "qs_other" / "d2r" / "last.pt")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "template"
    _make_template(root)
    return root


@pytest.fixture
def sandbox(template, tmp_path, monkeypatch):
    import shutil

    box = tmp_path / "box"
    shutil.copytree(template, box)
    # what no writer may replace (made here: copytree cannot copy a FIFO or a link loop)
    os.mkfifo(box / "fifo")
    (box / "fifo_out").mkdir()
    os.mkfifo(box / "fifo_out" / "last.pt")
    (box / "link_to_fifo").symlink_to("fifo")
    (box / "loop").symlink_to("loop")
    if os.geteuid() == 0:  # a copy of /dev/null, as Colab's root could name it
        os.mknod(box / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (box / "foreign").mkdir()  # another tool's history, no last.pt
    (box / "foreign" / "history.json").write_text("[]\n")
    (box / "refcopy").mkdir()  # a shipped reference run's files
    for name in ("history.json", "manifest.json", "metrics.json"):
        (box / "refcopy" / name).write_text("{}\n")
    monkeypatch.chdir(box)
    monkeypatch.setenv("D2R_CACHE_DIR", str(box / "cache"))
    monkeypatch.delenv("D2R_PROFILE", raising=False)
    return box


def snapshot(*roots) -> dict:
    """Every file (size, mtime, first bytes) and folder under roots, to compare."""
    seen = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            st = os.lstat(p)  # never follows a link, never opens a FIFO or a device
            if stat.S_ISDIR(st.st_mode):
                seen[str(p)] = "dir"
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    head = f.read(4096)
                seen[str(p)] = (st.st_size, st.st_mtime_ns, head)
            else:
                link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
                seen[str(p)] = (stat.S_IFMT(st.st_mode), st.st_rdev, link)
    return seen


def run_cli(argv, capsys, sandbox):
    """cli.main in-process; returns (exit code, stdout, stderr) after checking nothing changed."""
    watched = (sandbox, SHARED_DATA, ROOT / "data", ROOT / "runs",  # and the default folders
               ROOT / "book" / "reference")
    before = snapshot(*watched)
    code = cli.main([a.replace("{unwritable}", UNWRITABLE or "/nonexistent") for a in argv])
    out, err = capsys.readouterr()
    assert snapshot(*watched) == before, "a refused command changed files on disk"
    return code, out, err


def assert_refused(code, out, err, expected_code, message):
    assert code == expected_code, (code, err)
    assert message in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line, no traceback
    assert out == "", f"work was done before the error: {out!r}"


# ---------------------------------------------------------------------------------------- cases
# (kind, argv, exit code, fragment of the one-line message). T = train with a valid --out.
T = ["train", "--out", "o"]
E = ["evaluate", "--checkpoint", "ckpt/last.pt"]
Q = ["quickstart", "--out", "q"]
CASES = [
    # names: unknown commands, options and choices
    ("name", [], 2, "the following arguments are required: command"),
    ("name", ["fit"], 2, "argument command: invalid choice: 'fit'"),
    ("name", [*T, "--method", "fast_at"], 2, "argument --method: invalid choice: 'fast_at'"),
    ("name", [*T, "--target", "vgg"], 2, "argument --target: invalid choice: 'vgg'"),
    ("name", [*T, "--guide", "vgg"], 2, "argument --guide: invalid choice: 'vgg'"),
    ("name", [*T, "--dataset", "mnist"], 2, "argument --dataset: invalid choice: 'mnist'"),
    ("name", [*T, "--subset", "test20"], 2, "--subset must be one of 'mini', 'full'; got 'test20'"),
    ("name", [*T, "--profile", "huge"], 2, "argument --profile: invalid choice: 'huge'"),
    ("name", [*T, "--schedule", "step"], 2, "argument --schedule: invalid choice: 'step'"),
    ("name", [*T, "--resume", "maybe"], 2, "argument --resume: invalid choice: 'maybe'"),
    ("name", [*T, "--device", "tpu"], 2, "argument --device: invalid choice: 'tpu'"),
    ("name", [*T, "--bogus", "1"], 2, "d2r train: unrecognized arguments: --bogus 1"),
    ("name", [*T, "--method", "d2r", "--beta", "6"], 2,
     "--beta does not apply to method 'd2r'; its options: --eps"),
    ("name", [*T, "--method", "standard", "--eps", "0.03"], 2,
     "--eps does not apply to method 'standard'; its options: none"),
    ("name", [*T, "--method", "pgd_at", "--w-clean", "1"], 2, "--w-clean does not apply"),
    ("name", [*T, "--kl-reduction", "sum"], 2, "argument --kl-reduction: invalid choice: 'sum'"),
    ("name", ["train"], 2, "the following arguments are required: --out"),
    ("name", [*E, "--attacks", "clean,pgd"], 2,
     "--attacks must be one of 'clean', 'fgsm', 'pgd20', 'cw20', 'autoattack'; got 'pgd'"),
    ("name", [*E, "--attacks", ","], 2, "--attacks must name at least one of"),
    ("name", [*E, "--attacks", "clean,clean"], 2, "--attacks names clean more than once"),
    ("name", [*E, "--autoattack-version", "quick"], 2,
     "argument --autoattack-version: invalid choice: 'quick'"),
    ("name", ["evaluate"], 2, "the following arguments are required: --checkpoint"),
    ("name", [*Q, "--attacks", "clean,bpda"], 2, "--attacks must be one of"),
    ("name", [*Q, "--target", "vgg"], 2, "argument --target: invalid choice: 'vgg'"),
    ("name", ["demo", "--method", "fast_at"], 2, "argument --method: invalid choice: 'fast_at'"),
    ("name", ["demo", "--device", "tpu"], 2, "argument --device: invalid choice: 'tpu'"),
    ("name", ["profiles", "--all"], 2, "d2r profiles: unrecognized arguments: --all"),
    # ranges
    ("range", [*T, "--epochs", "0"], 2, "--epochs must be >= 1; got 0"),
    ("range", [*T, "--batch-size", "0"], 2, "--batch-size must be >= 1; got 0"),
    ("range", [*T, "--train-size", "-5"], 2, "--train-size must be >= 1; got -5"),
    ("range", [*T, "--held-out", "0"], 2, "--held-out must be >= 1; got 0"),
    ("range", [*T, "--lr", "0"], 2, "--lr must be > 0; got 0.0"),
    ("range", [*T, "--lr", "-0.1"], 2, "--lr must be > 0; got -0.1"),
    ("range", [*T, "--lr", "inf"], 2, "--lr must be finite; got inf"),
    ("range", [*T, "--lr", "nan"], 2, "--lr must be finite; got nan"),
    ("range", [*T, "--lr", "1e300"], 2, "--lr must fit a 32-bit float"),
    ("range", [*T, "--eps", "2"], 2, "--eps must be <= 1: an L∞ radius on pixels in [0, 1]"),
    ("range", [*T, "--eps", "1e9"], 2, "--eps must be <= 1: an L∞ radius"),
    ("range", [*T, "--eps", "-1"], 2, "--eps must be > 0; got -1.0"),
    ("range", [*T, "--step-size", "0"], 2, "--step-size must be > 0; got 0.0"),
    ("range", [*T, "--steps", "0"], 2, "--steps must be >= 1; got 0"),
    ("range", [*T, "--w-clean", "-1"], 2, "--w-clean must be >= 0; got -1.0"),
    ("range", [*T, "--method", "trades", "--beta", "-6"], 2, "--beta must be >= 0; got -6.0"),
    pytest.param("range", [*T, "--device", "cuda"], 2, "--device cuda: no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    ("range", [*T, "--seed", "-1"], 2, "--seed must be >= 0; got -1"),
    ("range", [*T, "--seed", "4294967296"], 2, "--seed must be <= 4294967295; got 4294967296"),
    ("range", ["demo", "--seed", "-1"], 2, "--seed must be >= 0; got -1"),
    ("range", ["demo", "--seed", "4294967296"], 2, "--seed must be <= 4294967295; got 4294967296"),
    ("range", ["demo", "--batch-size", "0"], 2, "--batch-size must be >= 1; got 0"),
    ("range", ["demo", "--batch-size", "1001"], 2, "--batch-size must be <= 1000; got 1001"),
    ("range", [*E, "--n", "0"], 2, "--n must be >= 1; got 0"),
    ("range", [*E, "--eval-eps", "9"], 2, "--eval-eps must be <= 1: an L∞ radius"),
    ("range", [*E, "--eval-eps", "nan"], 2, "--eval-eps must be finite; got nan"),
    ("range", [*E, "--eval-batch-size", "0"], 2, "--eval-batch-size must be >= 1; got 0"),
    ("range", [*Q, "--steps", "0"], 2, "--steps must be >= 1; got 0"),
    ("range", [*Q, "--n", "0"], 2, "--n must be >= 1; got 0"),
    ("range", [*Q, "--epochs", "0"], 2, "--epochs must be >= 1; got 0"),
    ("range", [*Q, "--train-size", "0"], 2, "--train-size must be >= 1; got 0"),
    ("range", [*Q, "--lr", "1e300"], 2, "--lr must fit a 32-bit float"),
    ("range", [*Q, "--seed", "-3"], 2, "--seed must be >= 0; got -3"),
    ("range", [*Q, "--eval-eps", "8"], 2, "--eval-eps must be <= 1"),
    pytest.param("range", ["bench", "--eval-batch-size", "0"], 2, "--eval-batch-size"),
    # types
    ("type", [*T, "--epochs", "1.5"], 2, "argument --epochs: invalid int value: '1.5'"),
    ("type", [*T, "--lr", "fast"], 2,
     "argument --lr: expected a number such as 0.031 or 8/255; got 'fast'"),
    ("type", [*T, "--eps", "8/0"], 2, "argument --eps: expected a number such as 0.031 or 8/255"),
    ("type", [*T, "--seed", "one"], 2, "argument --seed: invalid int value: 'one'"),
    ("type", [*E, "--n", "ten"], 2, "argument --n: invalid int value: 'ten'"),
    ("type", [*E, "--eval-eps", "8/255/2"], 2, "argument --eval-eps: expected a number"),
    ("type", [*Q, "--steps", "2.0"], 2, "argument --steps: invalid int value: '2.0'"),
    ("type", ["demo", "--batch-size", "eight"], 2, "argument --batch-size: invalid int value"),
    # paths
    ("path", ["train", "--out", "afile"], 2, "--out afile is a file; give a folder"),
    ("path", ["train", "--out", "afile/run"], 2, "--out afile/run: afile is a file"),
    ("path", ["train", "--out", "out_lastdir"], 2,
     "--out out_lastdir: out_lastdir/last.pt is a folder, but a file is written there"),
    pytest.param("path", ["train", "--out", "{unwritable}/d2r_run"], 2, "cannot write in",
                 marks=NEEDS_UNWRITABLE),
    ("path", [*T, "--resume", "always"], 2, "--resume always: there is no checkpoint o/last.pt"),
    ("path", [*T, "--data-dir", "nowhere"], 2, "--data-dir nowhere does not exist"),
    ("path", [*T, "--data-dir", "afile"], 2, "--data-dir afile is a file; give a folder"),
    ("path", ["evaluate", "--checkpoint", "missing.pt"], 2,
     "--checkpoint missing.pt does not exist"),
    ("path", ["evaluate", "--checkpoint", "emptydir"], 2,
     "--checkpoint emptydir is a folder without last.pt"),
    ("path", [*E, "--json", "emptydir"], 2, "--json emptydir is a folder; give a file name"),
    ("path", [*E, "--json", "afile/r.json"], 2, "--json afile/r.json: afile is a file"),
    pytest.param("path", [*E, "--json", "{unwritable}/r.json"], 2, "cannot write in",
                 marks=NEEDS_UNWRITABLE),
    ("path", [*E, "--data-dir", "nowhere"], 2, "--data-dir nowhere does not exist"),
    ("path", [*E, "--json", "ckpt/last.pt"], 2, "--json ckpt/last.pt is the checkpoint itself"),
    ("path", ["quickstart", "--out", "afile"], 2, "--out afile is a file; give a folder"),
    ("path", ["quickstart", "--out", "qs_file"], 2, "--out qs_file/d2r is a file; give a folder"),
    ("path", ["quickstart", "--out", "qs_resultsdir"], 2,
     "qs_resultsdir/results.json is a folder, but a file is written there"),
    pytest.param("path", ["quickstart", "--out", "{unwritable}/q"], 2, "cannot write in",
                 marks=NEEDS_UNWRITABLE),
    ("path", ["demo", "--data-dir", "afile"], 2, "--data-dir afile is a file; give a folder"),
    pytest.param("path", ["run", "--out", "afile"], 2, "afile"),
    # writers replace only regular files (issue 24)
    ("path", [*E, "--json", "fifo"], 2,
     "--json fifo is a FIFO (named pipe); only a regular file is written (or created) there"),
    ("path", [*E, "--json", "link_to_fifo"], 2, "is a FIFO (named pipe); only a regular file"),
    pytest.param("path", [*E, "--json", "null"], 2,
                 "--json null is a character device; only a regular file",
                 marks=pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")),
    ("path", ["train", "--out", "fifo_out"], 2, "--out fifo_out/last.pt is a FIFO (named pipe)"),
    ("path", ["train", "--out", "loop"], 2,
     "--out loop is a symbolic link to nothing (or a loop); give a folder"),
    ("path", ["train", "--out", ""], 2, "argument --out: an empty path; give a file or folder"),
    ("path", [*E, "--json", ""], 2, "argument --json: an empty path"),
    ("path", ["quickstart", "--out", ""], 2, "argument --out: an empty path"),
    # a folder holding another run's or another kind's files is never written into
    ("path", ["train", "--out", "foreign"], 2, "--out foreign holds the files of another run or "
     "kind (history.json without last.pt of `d2r train`); nothing was overwritten"),
    ("path", ["train", "--out", "refcopy"], 2, "--out refcopy holds the files of another run or "
     "kind (manifest.json without last.pt"),
    ("path", ["train", "--out", str(ROOT / "book" / "reference" / "d2r-seed0")], 2,
     "holds the files of another run or kind"),
    # the runner: every check before a kernel starts
    ("path", ["run", "--out", "foreign"], 2, "holds the files of another run or kind "
     "(history.json;"),
    ("path", ["run", "--out", "refcopy"], 2, "holds the files of another run or kind "
     "(manifest.json;"),
    ("path", ["run", "--out", str(ROOT / "book" / "reference")], 2,
     "holds the files of another run or kind"),
    ("name", ["run", "--profile", "smoke", "--chapters", "0", "--out", "r"], 2,
     "--chapters 0: no chapter matches"),
    ("range", ["run", "--profile", "smoke", "--chapters", "01", "-p", "seed=4294967296", "--out",
               "r"], 2, "allows an integer >= 0 and <= 4294967295"),
    pytest.param("range", ["run", "--profile", "smoke", "--device", "cuda", "--out", "r"], 2,
                 "--device cuda: no CUDA device here; use auto or cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    # checkpoints given to evaluate, or found in train's --out
    *[("checkpoint", ["evaluate", "--checkpoint", f"corrupt{seed}.pt"], 2, f"corrupt{seed}.pt")
      for seed in CORRUPT_SEEDS],
    ("checkpoint", ["evaluate", "--checkpoint", "corrupt_utf8.pt"], 2, "corrupt_utf8.pt"),
    ("checkpoint", ["evaluate", "--checkpoint", "truncated.pt"], 2, "truncated.pt"),
    ("checkpoint", ["evaluate", "--checkpoint", "empty.pt"], 2, "empty.pt"),
    ("checkpoint", ["evaluate", "--checkpoint", "pickled.pt"], 2,
     "refusing to load pickled.pt: it carries pickled Python objects"),
    ("checkpoint", ["evaluate", "--checkpoint", "notrun.pt"], 2,
     "notrun.pt is not a d2r_lib training checkpoint"),
    ("checkpoint", ["evaluate", "--checkpoint", "wrongkeys.pt"], 2,
     "target: checkpoint keys do not match the model"),
    pytest.param("checkpoint", ["evaluate", "--checkpoint", "nan", "--attacks", "clean"], 2,
                 "finite"),
]
# a bad checkpoint in --out: refused before the data is read
CASES += [
    *[("checkpoint", ["train", "--method", "standard", "--epochs", "1", "--train-size", "64",
                      "--batch-size", "32", "--out", f"resume_corrupt{seed}", "--no-progress"], 2,
       f"resume_corrupt{seed}/last.pt") for seed in CORRUPT_SEEDS],
    ("checkpoint", ["train", "--method", "standard", "--epochs", "1", "--train-size", "64",
                    "--batch-size", "32", "--out", "resume_other", "--no-progress"], 2,
     "resume_other/last.pt belongs to a run with other settings (epochs: stored 7, asked 1)"),
    ("checkpoint", ["quickstart", "--out", "qs_other"], 2,
     "qs_other/d2r/last.pt belongs to a run with other settings"),
]


def _case_id(case):
    values = case.values if hasattr(case, "values") else case
    return f"{values[0]}:{' '.join(values[1])}"[:80]


@pytest.mark.parametrize("kind, argv, code, message", CASES, ids=[_case_id(c) for c in CASES])
def test_refused_before_any_work(kind, argv, code, message, sandbox, capsys):
    assert_refused(*run_cli(argv, capsys, sandbox), code, message)


def test_missing_data_is_one_error_and_creates_nothing(sandbox, capsys):
    code, out, err = run_cli(["evaluate", "--checkpoint", "ckpt", "--data-dir", "emptydir",
                              "--attacks", "clean"], capsys, sandbox)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "emptydir" in err and out == ""


@pytest.mark.data
def test_diverged_training_exits_1_and_saves_nothing(sandbox, capsys, shared_data):
    """`--lr 1e6` with one batch per epoch: the weights turn non-finite after the last step."""
    code = cli.main(["train", "--method", "standard", "--lr", "1e6", "--epochs", "1",
                     "--train-size", "32", "--batch-size", "32", "--held-out", "8", "--out", "div",
                     "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and "finite" in err and err.startswith("error: ")
    assert not (sandbox / "div" / "last.pt").exists()


# ------------------------------------------------------------------------------------------ API
def _model():
    torch.manual_seed(0)
    return models.build_model("small_cnn").eval()


def _x(bad=None):
    x = torch.rand(2, 3, 32, 32)
    if bad is not None:
        x[1, 0, 5, 5] = bad
    return x


Y = torch.tensor([1, 2])
# (kind, call, exception, fragment): the API names the parameter, as the command line names the flag
API_CASES = [
    ("api", lambda: attacks.pgd(_model(), _x(float("nan")), Y), ValueError,
     "x must have finite pixels in [0, 1]; got 1 NaN or infinite value(s)"),
    ("api", lambda: attacks.fgsm(_model(), _x(float("inf")), Y), ValueError,
     "x must have finite pixels"),
    ("api", lambda: methods.train_step("standard", _model(), None,
                                       methods.make_optimizer(_model()), _x(float("nan")), Y),
     ValueError, "x must have finite pixels"),
    ("api", lambda: methods.make_optimizer(_model(), lr=1e300), ValueError,
     "lr must fit a 32-bit float (magnitude at most 3.403e+38); got 1e+300"),
    ("api", lambda: methods.make_optimizer(_model(), lr=float("inf")), ValueError,
     "lr must be finite; got inf"),
    ("api", lambda: train.TrainConfig(lr=1e300).validate(), ValueError,
     "lr must fit a 32-bit float"),
    ("api", lambda: train.TrainConfig(seed=-1).validate(), ValueError, "seed must be >= 0; got -1"),
    ("api", lambda: validate.seed(2**32), ValueError, "seed must be <= 4294967295"),
    ("api", lambda: validate.seed(1.0), TypeError, "seed must be an integer; got 1.0"),
    ("api", lambda: validate.eps(1e9, norm="linf"), ValueError,
     "eps must be <= 1: an L∞ radius on pixels in [0, 1] lies in [0, 1]"),
    ("api", lambda: validate.eps(float("nan")), ValueError, "eps must be finite; got nan"),
    ("api", lambda: validate.output_file("path", Path(tempfile.gettempdir())), IsADirectoryError,
     "is a folder; give a file name"),
    pytest.param("api", lambda: evaluate.robust_accuracy(_model(), _x(), Y, "pgd20", eps=1e9),
                 ValueError, "eps must be <= 1"),
    pytest.param("api", lambda: methods.get_method("pgd_at").resolve(eps=1e9), ValueError,
                 "eps must be <= 1"),
    pytest.param("api", lambda: experiments.resolve("smoke", epoch=3, verbose=False), ValueError,
                 "epoch"),
]


@pytest.mark.parametrize("kind, call, error, message", API_CASES,
                         ids=[f"api-{i}" for i in range(len(API_CASES))])
def test_api_refuses_with_the_parameter_name(kind, call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_l2_radius_may_exceed_one():
    assert validate.eps(2.5, norm="l2") == 2.5 and validate.eps(2.5) == 2.5


# ----------------------------------------------------------------------------- real processes
def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "d2r_lib", "train", "--out", str(tmp_path / "o"),
                        "--epochs", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: --epochs must be >= 1; got 0\n"
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys, torch
from d2r_lib import checkpoint
big = torch.zeros(5_000_000)  # 20 MB: each write takes long enough to be killed inside it
i = 0
while True:
    i += 1
    checkpoint.save({"i": i, "w": big.fill_(float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "last.pt"
    for _attempt in range(5):  # until the kill lands inside a write (a temporary file is left)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                                text=True, env=env)
        done = [int(proc.stdout.readline()) for _ in range(2)]  # two complete checkpoints
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [p for p in folder.iterdir() if p != path]:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        leftovers = [p for p in folder.iterdir() if p != path]
        if leftovers:
            break
        path.unlink()
    assert proc.returncode == -signal.SIGKILL
    assert leftovers, "the kill never landed inside a write"
    payload = checkpoint.load(path)  # the previous checkpoint loads, complete
    assert payload["i"] >= done[-1]
    assert torch.equal(payload["w"], torch.full((5_000_000,), float(payload["i"])))
    # the half-written temporary file is hidden and is not a .pt: never taken for a checkpoint
    assert all(p.name.startswith(".") and not p.name.endswith(".pt") for p in leftovers)
    assert sorted(folder.glob("*.pt")) == [path]


# --------------------------------------------------------------------- issue 24: nothing is lost
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = ["--method", "standard", "--train-size", "32", "--batch-size", "32", "--held-out", "8",
        "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("node", ["fifo", "link_to_fifo", "null"])
def test_no_writer_replaces_a_special_file(node, sandbox):
    if not os.path.lexists(sandbox / node):
        pytest.skip("mknod needs root")
    before = snapshot(sandbox)
    for write in (lambda p: checkpoint.atomic_write(p, lambda tmp: tmp.write_text("{}")),
                  lambda p: checkpoint.save({"w": torch.zeros(2)}, p),
                  lambda p: evaluate.ResultsTable({"m": {"clean": 0.5}}).save_json(p)):
        with pytest.raises(ValueError, match="only a regular file is written"):
            write(sandbox / node)
    assert snapshot(sandbox) == before


def test_a_link_to_a_regular_file_is_written_through(sandbox):
    (sandbox / "real.json").write_text("old")
    (sandbox / "link.json").symlink_to("real.json")
    checkpoint.atomic_write(sandbox / "link.json", lambda tmp: tmp.write_text("new"))
    assert (sandbox / "link.json").is_symlink() and (sandbox / "real.json").read_text() == "new"


def test_the_lock_is_reentrant_and_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    with checkpoint.exclusive(folder / ".lock") as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
        with checkpoint.exclusive(folder / ".lock"):  # the same process: no deadlock
            pass
        assert lock.exists()
    assert list(tmp_path.iterdir()) == []  # lock file and the folders made for it are gone


HOLDER = """
import sys
from d2r_lib import checkpoint
with checkpoint.exclusive(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_held_out_folder_refuses_a_second_run(sandbox, capsys):
    (sandbox / "busy").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(sandbox / "busy" / ".lock")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline() == "held\n"
        code, out, err = run_cli(["train", *TINY, "--epochs", "1", "--out", "busy"], capsys,
                                 sandbox)
        assert_refused(code, out, err, 2, f"busy is in use by another run (pid {proc.pid}")
        assert "wait for it to finish or stop it, or use another folder" in err
    finally:
        proc.communicate("")
    assert proc.returncode == 0 and sorted(os.listdir(sandbox / "busy")) == []


@pytest.mark.data
def test_two_concurrent_train_runs_one_refused_then_sigterm(tmp_path, shared_data):
    """The second `d2r train` into one --out is refused naming the first; SIGTERM then stops the
    first with one line and code 130; the checkpoint it leaves resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "d2r_lib", "train", *TINY, "--out", str(out)]
    first = subprocess.Popen([*cmd, "--epochs", "500"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the first run is under way: it has written a checkpoint
        assert (out / "last.pt").exists(), first.stderr.read() if first.poll() is not None else ""
        second = subprocess.run([*cmd, "--epochs", "500", "--seed", "2"], capture_output=True,
                                text=True, env=ENV, cwd=tmp_path, timeout=120)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.startswith(f"error: {out} is in use by another run (pid "
                                        f"{first.pid}, `python -m d2r_lib train")
        assert len(second.stderr.splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert err.splitlines()[-1] == ("error: interrupted (SIGTERM); every file written so far is "
                                    "complete (writes are atomic): run the same command again to "
                                    "resume")
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last.pt"]
    payload = checkpoint.load(out / "last.pt")
    assert payload["epoch"] >= 1 and payload["config"]["seed"] == 1


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "d2r_lib", "train", *TINY, "--out",
                             str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # until torch is being loaded
        with contextlib.suppress(OSError):
            if "libtorch" in maps.read_text():
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 2:  # finished before the signal: a missing data bundle, say
        pytest.skip(f"the command ended before the signal: {err}")
    assert proc.returncode == 130 and out == "", err
    assert err == ("error: interrupted (Ctrl-C); every file written so far is complete (writes "
                   "are atomic): run the same command again to resume\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.data
def test_a_full_disk_is_exit_3_naming_the_file_and_the_previous_checkpoint_survives(
        tmp_path, capsys, shared_data, monkeypatch):
    monkeypatch.setenv("D2R_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["train", *TINY, "--out", str(out)]
    cfg = cli.train_config(cli.build_parser().parse_args([*argv, "--epochs", "2"]))
    train.fit(cfg, out, max_epochs=1, progress=False, log=lambda *a, **k: None)  # epoch 1 of 2
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "last.pt"]
    before = snapshot(out)
    limit = (out / "last.pt").stat().st_size // 2  # every checkpoint write fails past this size

    def small_files():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "d2r_lib", *argv, "--epochs", "2"],
                       capture_output=True, text=True, env={**ENV, "D2R_CACHE_DIR":
                                                            str(tmp_path / "cache")},
                       preexec_fn=small_files, timeout=300)
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines()[-1] == (f"error: could not write {out / 'last.pt'}: File too "
                                         "large; the previous version is intact")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert snapshot(out) == before  # the checkpoint of epoch 1 is untouched, no temporary file
    assert checkpoint.load(out / "last.pt")["epoch"] == 1


# ---------------------------------------------------------- damaged checkpoints: one line each
SYNTH = ["train", "--method", "standard", "--dataset", "synthetic", "--subset", "default",
         "--epochs", "2", "--train-size", "32", "--batch-size", "32", "--held-out", "8",
         "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A real run of epoch 1 of 2 on the synthetic set (no data bundle needed)."""
    out = tmp_path_factory.mktemp("synth") / "run"
    cfg = cli.train_config(cli.build_parser().parse_args([*SYNTH, "--out", str(out)]))
    train.fit(cfg, out, max_epochs=1, progress=False, log=lambda *a, **k: None)
    return torch.load(out / "last.pt", weights_only=True)


def _drop(key):
    return lambda p: p.pop(key)


def _momentum(p):
    state = p["optimizer"]["state"]
    state[0]["momentum_buffer"] = state[0]["momentum_buffer"][:1]


TAMPERED = [
    ("no epoch", _drop("epoch"), "field 'epoch' is missing"),
    ("no optimizer", _drop("optimizer"), "field 'optimizer' is missing"),
    ("no rng", _drop("rng"), "field 'rng' is missing"),
    ("no history", _drop("history"), "field 'history' is missing"),
    ("two faults", lambda p: (p.pop("epoch"), p.update(history="x")),
     "field 'epoch' is missing; field 'history' is a str, not list"),
    ("epoch as text", lambda p: p.update(epoch="1"), "field 'epoch' is a str, not int"),
    ("epoch out of range", lambda p: p.update(epoch=9), "epoch 9 is not in [1, 2]"),
    ("rng without numpy", lambda p: p["rng"].pop("numpy"), "(rng) is damaged or not a complete"),
    ("short python rng", lambda p: p["rng"].update(python=[1, 2]),
     "a random-number state has the wrong size"),
    ("no optimizer state", lambda p: p["optimizer"].pop("state"),
     "the optimizer has no 'state' dict"),
    ("momentum of another shape", _momentum,
     "the optimizer's momentum of parameter 0 has shape (1, 3, 3, 3), not (16, 3, 3, 3)"),
]


@pytest.mark.parametrize("case, tamper, message", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_damaged_checkpoint_is_refused_with_one_line(case, tamper, message, synthetic_run,
                                                       sandbox, capsys):
    payload = {**synthetic_run, "optimizer": {
        "state": {k: dict(v) for k, v in synthetic_run["optimizer"]["state"].items()},
        "param_groups": synthetic_run["optimizer"]["param_groups"]},
        "rng": dict(synthetic_run["rng"])}
    tamper(payload)
    (sandbox / "t").mkdir()
    torch.save(payload, sandbox / "t" / "last.pt")
    code, out, err = run_cli([*SYNTH, "--out", "t"], capsys, sandbox)
    assert_refused(code, out, err, 2, message)
    assert "t/last.pt" in err


def test_damaged_metadata_is_refused_by_evaluate(synthetic_run, sandbox, capsys):
    torch.save({**synthetic_run, "target_model": "vgg", "num_classes": 1}, sandbox / "meta.pt")
    code, out, err = run_cli(["evaluate", "--checkpoint", "meta.pt"], capsys, sandbox)
    assert_refused(code, out, err, 2, "meta.pt is damaged: target_model 'vgg' is not one of "
                   "d2r_lib's models; num_classes 1 is below 2")


@pytest.mark.parametrize("name, content", [
    ("random.pt", random.Random(5).randbytes(2048)),
    ("json.pt", b'{"kind": "d2r_lib.train", "epoch": 1}'),
])
def test_not_a_checkpoint_is_not_called_pickled(name, content, sandbox, capsys):
    (sandbox / name).write_bytes(content)
    code, out, err = run_cli(["evaluate", "--checkpoint", name], capsys, sandbox)
    assert_refused(code, out, err, 2, f"cannot read checkpoint {name}: it is not a checkpoint "
                   "written by torch.save (not a complete zip archive")
    assert "pickle" not in err and "weights_only" not in err


def test_pickled_objects_are_named_without_torchs_advice(sandbox, capsys):
    code, out, err = run_cli(["evaluate", "--checkpoint", "pickled.pt"], capsys, sandbox)
    assert_refused(code, out, err, 2, "refusing to load pickled.pt: it carries pickled Python "
                   "objects (test_faults.Thing), which can run arbitrary code")
    assert "weights_only" not in err


def test_a_deflated_tensor_is_refused_before_it_is_inflated(sandbox, capsys):
    """A 40 MB tensor re-zipped with deflate: a 40 kB file declaring 40 MB (the same trick scales
    to gigabytes); refused from the zip directory, before torch reads a record."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(10_000_000)}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(sandbox / "bomb.pt", "w",
                                                          zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    size = (sandbox / "bomb.pt").stat().st_size
    assert size < 200_000
    code, out, err = run_cli(["evaluate", "--checkpoint", "bomb.pt"], capsys, sandbox)
    assert_refused(code, out, err, 2, "refusing to load bomb.pt: its records declare 40,00")
    assert f"in a file of {size:,} bytes" in err


def test_an_internal_error_is_exit_4_in_one_line(monkeypatch, capsys):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(experiments, "profiles_table", broken)
    monkeypatch.delenv("D2R_TRACEBACK", raising=False)
    assert cli.main(["profiles"]) == 4
    out, err = capsys.readouterr()
    assert err == ("error: internal error (RuntimeError: boom); this is a bug in d2r_lib: please "
                   "report it with the command (D2R_TRACEBACK=1 shows where)\n") and out == ""


def test_help_documents_every_exit_code(capsys):
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for code, meaning in cli.EXIT_CODES.items():
        assert f"{code} {' '.join(meaning.split())}" in text


# ------------------------------------------------------------------------------------ the runner
def test_the_runner_matches_chapters_exactly_and_runs_a_sweep_value_once(tmp_path):
    from d2r_lib.lab import runner

    five = [p.stem for p in runner._select(["5"])]
    assert five == [p.stem for p in runner._select(["05"])] == ["05_d2r_loss"]
    assert [p.stem for p in runner._select(["05_d2r_loss"])] == ["05_d2r_loss"]
    runs = runner.plan("smoke", out=tmp_path / "r", chapters=["01"], params={"seed": [0, 0, 1]})
    assert [r.overrides for r in runs] == [{"seed": 0}, {"seed": 1}]
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_results_file_is_skipped_with_a_warning(tmp_path):
    import json

    from d2r_lib.lab import notebook_run

    run = tmp_path / "01_x" / "smoke"
    (run / "results").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps(
        {"chapter": "01_x", "profile": "smoke", "status": "ok", "overrides": {}}))
    table = evaluate.ResultsTable({"m": {"clean": 0.5}})
    (run / "results" / "good.json").write_text(json.dumps(
        {"name": "good", "config": {"seed": 0}, "table": table.to_dict()}))
    (run / "results" / "bad.json").write_text("{not json")
    (tmp_path / "02_y" / "smoke").mkdir(parents=True)
    (tmp_path / "02_y" / "smoke" / "manifest.json").write_text("[1, 2]")
    with pytest.warns(UserWarning) as seen:
        paths = notebook_run.write_results(tmp_path)
    messages = sorted(str(w.message) for w in seen)
    assert messages[0].startswith(f"skipped the damaged manifest {tmp_path / '02_y'}")
    bad = run / "results" / "bad.json"
    assert messages[1].startswith(f"skipped the damaged results file {bad}")
    assert "good" in paths[1].read_text() and "bad" not in paths[1].read_text()


def test_an_interrupted_run_says_so_in_its_manifest(tmp_path, monkeypatch):
    import json

    from d2r_lib.lab import notebook_run, runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(notebook_run, "_execute_notebook", interrupted)
    (run,) = runner.plan("smoke", out=tmp_path / "r", chapters=["01"])
    with pytest.raises(KeyboardInterrupt):
        notebook_run.execute(run, log=lambda *a: None)
    manifest = json.loads((run.folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "ended" in manifest
