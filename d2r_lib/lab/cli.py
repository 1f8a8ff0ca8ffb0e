"""The course's one command line, `d2r <command>` or `python -m d2r_lib <command>`. Chapter 9.

Commands: train, evaluate, run (d2r_lib.lab.runner), bench (d2r_lib.lab.bench), quickstart, demo,
profiles.
Each checks all its arguments, output paths and data before it trains or evaluates anything; an
error prints one line `error: ...` to stderr and exits with a code that says what happened
(`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import signal
import sys
import time
import urllib.error
from fractions import Fraction
from pathlib import Path

from .. import validate

__all__ = ["EXIT_CODES", "UsageError", "build_parser", "main", "train_config"]

# every exit code of `d2r`, and what it means (documented in `d2r --help`)
EXIT_CODES = {
    0: "done",
    1: "training diverged (d2r run: a run failed); the last good checkpoint is intact",
    2: "bad input, refused before any work, nothing written (also: --out in use by another run)",
    3: "out of disk space or an I/O error; the message names the file and what is left intact",
    4: "internal error, a bug in d2r_lib: please report it (D2R_TRACEBACK=1 shows where)",
    130: "interrupted (Ctrl-C or SIGTERM); files written so far are complete: rerun to resume",
}

CHECKPOINT_NAME = "last.pt"


class UsageError(Exception):
    """A bad command line (unknown option or choice, unparsable value): exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: exit code 130."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message, still exit code 2
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _number(text: str) -> float:
    """A float, also written as a fraction such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        message = f"expected a number such as 0.031 or 8/255; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _path(text: str) -> Path:
    """A path argument; an empty one would mean the current folder, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return Path(text)


def _pick_device(value: str) -> str:
    """The device of `--device`, refused by flag when it is not available here."""
    import torch

    from .. import experiments

    mps = getattr(torch.backends, "mps", None)
    available = {"cuda": torch.cuda.is_available(), "mps": mps is not None and mps.is_available()}
    if not available.get(value, True):
        raise ValueError(f"--device {value}: no {value.upper()} device here; use auto or cpu")
    return experiments.pick_device(value)


def _profile(name: str) -> dict:
    """A profile of experiments.PROFILES as a plain dict."""
    from .. import experiments

    return dataclasses.asdict(experiments.PROFILES[name])


def _defaults() -> dict:
    """TrainConfig's fields and their defaults."""
    from .. import train

    return {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}


def _default(name: str):
    return _defaults()[name]


def _positive(flag: str, value) -> None:
    if value is not None:
        validate.number(flag, value, min=1, integer=True)


def _data_dir(a) -> None:
    if getattr(a, "data_dir", None) is not None:
        validate.existing_dir("--data-dir", a.data_dir)


def _load_test(dataset: str, subset: str | None, a, device):
    """The evaluation split of a dataset (first --n images); the data is found before any work."""
    from .. import data

    split = "val" if dataset == "tinyimagenet" else "test"
    subset = subset if dataset != "cifar100" else None
    ds = data.load(dataset, split, subset, data_dir=getattr(a, "data_dir", None), download=True)
    n = getattr(a, "n", None)
    if n is not None and n < len(ds):
        ds = ds.subset(n)
    return ds, *ds.tensors(device)


# ------------------------------------------------------------------------------------------ train
def _add_train(sub) -> None:
    from .. import data, experiments, methods, models

    p = sub.add_parser("train", help="train any method; resumable", description="Train a method "
                       "of the registry. The same command again resumes from --out/last.pt. "
                       "--profile fills every unset option from a profile (`d2r profiles`).")
    about = "; ".join(f"{m.name}: {m.description}" for m in methods.METHODS.values())
    p.add_argument("--profile", default=None, choices=list(experiments.PROFILES),
                   help="fill the defaults from this profile; flags override it")
    p.add_argument("--method", default=_default("method"), choices=sorted(methods.METHODS),
                   help=f"training method (default %(default)s): {about}")
    p.add_argument("--target", default=None, choices=sorted(models.MODELS),
                   help=f"target model f (default {_default('target_model')}; the paper: wrn34_10)")
    p.add_argument("--guide", default=None, choices=sorted(models.MODELS),
                   help=f"guide model g of guided methods (default {_default('guide_model')}; "
                   "the paper: resnet18)")
    p.add_argument("--dataset", default=None, choices=sorted(data.DATASETS),
                   help=f"default {_default('dataset')}")
    p.add_argument("--subset", default=None,
                   help="cifar10: mini (lossless 7,897 train / 1,000 test) or full; cifar100: "
                   "full or test20; tinyimagenet: bundle or full "
                   f"(default {_default('subset')})")
    p.add_argument("--train-size", type=int, default=None,
                   help="use only the first N training images")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {_default('epochs')} (the paper: 100)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default {_default('batch_size')})")
    p.add_argument("--lr", type=_number, default=None,
                   help=f"base learning rate (default {_default('lr')})")
    p.add_argument("--schedule", default=_default("schedule"), choices=["paper", "cosine"],
                   help="paper (default): epoch 1 at 0.2·lr, ×0.1 from 76%%, ×0.01 from 91%%")
    _add_param_flags(p)
    p.add_argument("--seed", type=int, default=_default("seed"),
                   help="in [0, 2**32 - 1] (default %(default)s, the official effective seed)")
    p.add_argument("--held-out", type=int, default=None,
                   help="test images of the per-epoch clean / PGD-20 check "
                   f"(default {_default('held_out')})")
    p.add_argument("--no-augment", action="store_true", help="turn off RandomCrop(pad 4) + flip")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="attack BatchNorm-folded copies of the models (same function up to float "
                   "rounding; faster; on with --profile cpu or smoke, as --channels-last)")
    p.add_argument("--device", default="auto", choices=experiments.DEVICES,
                   help="default %(default)s")
    p.add_argument("--out", required=True, type=_path,
                   help="output folder (checkpoint last.pt, history.json)")
    p.add_argument("--resume", default="auto", choices=["auto", "always", "never"],
                   help="auto: continue a matching run in --out (default); always: fail if "
                   "there is none; never: start afresh")
    p.add_argument("--data-dir", type=_path, default=None,
                   help="data folder (else $D2R_DATA_DIR, then known folders)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)


def _param_flags() -> dict:
    """The flag of every parameter the registered methods declare: {name: (flag, Param, [method
    names])}; the declaration is the first method's (each method checks its own)."""
    from .. import methods

    out = {}
    for m in methods.METHODS.values():
        for name, param in m.params.items():
            if param.kind is not object:
                out.setdefault(name, ("--" + name.replace("_", "-"), param, []))[2].append(m.name)
    return out


def _add_param_flags(p) -> None:
    """One flag per method parameter, derived from its declaration (`methods.Param`): a method
    registered from outside gets its flags too."""
    for name, (flag, param, users) in _param_flags().items():
        used = f"; methods: {', '.join(users)}"
        if param.kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{param.help} (default: the method's{used})")
            continue
        kind = {int: int, float: _number}.get(param.kind, str)
        allowed = f": {param.allowed()}" if param.choices is None else ""  # argparse lists choices
        p.add_argument(flag, dest=name, type=kind, default=None, choices=param.choices,
                       help=f"{param.help}{allowed} (default: the method's{used})")


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    return flag.replace("--", "--no-", 1) if value is False else flag


def _method_params(a, method) -> dict:
    """The method parameters given on the command line, each checked under its flag against the
    method's own declaration."""
    given = {k: getattr(a, k) for k in _param_flags() if getattr(a, k, None) is not None}
    unknown = [_flag(k, v) for k, v in given.items() if k not in method.params]
    if unknown:
        own = ", ".join(_flag(k, None) for k in method.params) or "none"
        raise ValueError(f"{', '.join(unknown)} does not apply to method {method.name!r}; "
                         f"its options: {own}")
    for key, value in given.items():
        method.params[key].check(_flag(key, value), value)
    return given


def train_config(a):
    """The TrainConfig of parsed `train` arguments: flags, else the profile (mapped by
    `experiments.train_config`, the one profile → TrainConfig mapping), else TrainConfig's
    defaults. Each value is checked under its flag before the config's own (API-named) checks."""
    from .. import data, experiments, methods, train

    method = methods.get_method(a.method)
    params = _method_params(a, method)
    for flag in ("--train-size", "--epochs", "--batch-size", "--held-out"):
        _positive(flag, getattr(a, flag[2:].replace("-", "_")))
    if a.lr is not None:
        validate.lr(a.lr, "--lr")
    validate.seed(a.seed, "--seed")
    profile = _profile(a.profile) if a.profile is not None else {}
    try:
        subsets = data.DATASETS[a.dataset or profile.get("dataset") or _default("dataset")]
    except (KeyError, TypeError):  # argparse refuses unknown datasets; the config checks the rest
        subsets = None
    if subsets is not None:
        subset = a.subset or (profile.get("subset") if a.dataset is None else None)
        validate.choice("--subset", subset or _default("subset"), subsets["subsets"])

    names = {"target": "target_model", "guide": "guide_model"}
    options = ("target", "guide", "dataset", "subset", "train_size", "epochs", "batch_size", "lr",
               "held_out")
    given = {names.get(k, k): getattr(a, k) for k in options if getattr(a, k) is not None}
    settings = dict(schedule=a.schedule, augment=not a.no_augment, amp=a.amp,
                    compile=a.compile)
    if a.profile is None:
        return train.TrainConfig(**given, method=a.method, method_params=params, seed=a.seed,
                                 channels_last=a.channels_last,
                                 fold_batchnorm=a.fold_batchnorm, **settings).validate()
    cfg = experiments.run_config(a.profile, {**given, "seed": a.seed}, device="cpu")
    tc = experiments.train_config(cfg, a.method, **params)
    # a profile with fast=True (cpu, smoke) switches both fast paths on, as its chapters train
    return dataclasses.replace(tc, channels_last=a.channels_last or cfg.fast,
                               fold_batchnorm=a.fold_batchnorm or cfg.fast, **settings).validate()


def _check_run_folder(flag: str, out: Path) -> None:
    """A folder `train` writes must hold nothing of another run or kind: a history.json without
    last.pt, or a manifest.json (a shipped reference run, a `d2r run` folder)."""
    if (out / "manifest.json").exists() or ((out / "history.json").exists()
                                            and not (out / CHECKPOINT_NAME).exists()):
        found = "manifest.json" if (out / "manifest.json").exists() else "history.json"
        raise FileExistsError(f"{flag} {out} holds the files of another run or kind ({found} "
                              f"without {CHECKPOINT_NAME} of `d2r train`); nothing was "
                              "overwritten: give another folder")


def cmd_train(a) -> int:
    from .. import checkpoint, train

    cfg = train_config(a)
    validate.output_dir("--out", a.out, files=(CHECKPOINT_NAME, "history.json"))
    _check_run_folder("--out", a.out)
    if a.resume == "always" and not (a.out / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"--resume always: there is no checkpoint {a.out / 'last.pt'}; "
                                "start the run first, or use --resume auto")
    _data_dir(a)
    device = _pick_device(a.device)
    with checkpoint.exclusive(a.out / train.LOCK_NAME):  # one run per --out, held to the end
        if a.resume != "never":  # a checkpoint there must be this run's, checked before the data
            validate.same_run("--out", a.out / CHECKPOINT_NAME, cfg.as_dict(), "use another "
                              "--out, or --resume never to start this run afresh there")
        result = train.fit(cfg, a.out, device=device, resume=a.resume,
                           progress=not a.no_progress, data_dir=a.data_dir)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 0


# --------------------------------------------------------------------------------------- evaluate
def _add_eval_options(p, *, checkpoint: bool) -> None:
    from .. import evaluate, experiments

    if checkpoint:
        p.add_argument("--checkpoint", required=True, type=_path,
                       help="a last.pt written by `train` (or its folder)")
    p.add_argument("--attacks", default="clean,fgsm,pgd20,cw20,autoattack",
                   help=f"comma-separated, from {', '.join(evaluate.ATTACKS)} "
                   "(default %(default)s)")
    p.add_argument("--eval-eps", type=_number, default=8 / 255,
                   help="evaluation ε in [0, 1] (default 8/255)")
    p.add_argument("--n", type=int, default=None,
                   help="evaluate on the first N test images (default: all of the split; "
                   "cifar10 mini = the 1,000 lossless test images)")
    p.add_argument("--autoattack-version", default="standard",
                   choices=list(evaluate.AUTOATTACK_VERSIONS),
                   help="standard: APGD-CE, APGD-T, FAB-T, Square (default); the others are "
                   "faster subsets")
    p.add_argument("--eval-batch-size", type=int, default=256, help="default %(default)s")
    p.add_argument("--device", default="auto", choices=experiments.DEVICES,
                   help="default %(default)s")
    p.add_argument("--data-dir", type=_path, default=None, help="data folder")


def _check_eval_options(a) -> list[str]:
    """Attacks, ε, --n, batch size and data folder, checked by flag; returns the attack names."""
    from .. import evaluate

    names = [t.strip() for t in a.attacks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--attacks must name at least one of {', '.join(evaluate.ATTACKS)}")
    for name in names:
        validate.choice("--attacks", name, evaluate.ATTACKS)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--attacks names {', '.join(twice)} more than once")
    if "autoattack" in names and importlib.util.find_spec("pyautoattack") is None:
        raise ValueError("--attacks autoattack needs the authors' AutoAttack: "
                         "pip install pyautoattack (or leave autoattack out of --attacks)")
    validate.eps(a.eval_eps, "--eval-eps", norm="linf")
    _positive("--n", a.n)
    _positive("--eval-batch-size", a.eval_batch_size)
    _data_dir(a)
    return names


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="robust evaluation of a checkpoint",
                       description="Clean, FGSM, PGD-20, CW-20 and AutoAttack accuracy of a "
                                   "trained target.")
    _add_eval_options(p, checkpoint=True)
    p.add_argument("--json", type=_path, default=None, help="also write the results here (JSON)")
    p.set_defaults(run=cmd_evaluate)


def cmd_evaluate(a) -> int:
    from .. import evaluate, train

    attacks = _check_eval_options(a)
    path = a.checkpoint
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist; give a last.pt written by "
                                "`d2r train`, or its folder")
    if path.is_dir() and not (path / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"--checkpoint {path} is a folder without {CHECKPOINT_NAME}")
    if a.json is not None:
        validate.output_file("--json", a.json)
        if a.json.resolve() == (path / CHECKPOINT_NAME if path.is_dir() else path).resolve():
            raise ValueError(f"--json {a.json} is the checkpoint itself; give another file")
    device = _pick_device(a.device)
    target, _, payload = validate.checkpoint_file("--checkpoint", path,
                                                  lambda p: train.load_run(p, device=device))
    ds, x, y = _load_test(payload["dataset"], payload["config"]["subset"], a, device)
    started = time.perf_counter()
    results = evaluate.evaluate(target, x, y, attacks, eps=a.eval_eps, batch_size=a.eval_batch_size,
                                autoattack_version=a.autoattack_version)
    table = evaluate.ResultsTable({payload["method"]: results})
    kind = "lossless" if ds.lossless else "JPEG"
    print(f"{payload['method']} ({payload['target_model']}, epoch {payload['epoch']}/"
          f"{payload['epochs']}) on {ds.name}, {len(y)} images ({kind}), "
          f"ε = {a.eval_eps:.4f}, seed 0, {time.perf_counter() - started:.0f}s")
    print(table)
    if a.json is not None:
        table.save_json(a.json)
        print(f"results: {a.json}")
    return 0


# ------------------------------------------------------------------------------------- quickstart
def _add_quickstart(sub) -> None:
    from .. import models

    p = sub.add_parser("quickstart", help="train D2R + CAG and standard on CIFAR-10 mini, compare",
                       description="A short CPU run: D2R + CAG and a standard model trained "
                       "alike on the lossless CIFAR-10 mini split, evaluated on its 1,000 "
                       "lossless test images.")
    p.add_argument("--target", default="small_cnn", choices=sorted(models.MODELS))
    p.add_argument("--guide", default="small_cnn", choices=sorted(models.MODELS))
    p.add_argument("--epochs", type=int, default=5, help="default %(default)s")
    p.add_argument("--train-size", type=int, default=4000, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=128, help="default %(default)s")
    p.add_argument("--steps", type=int, default=10,
                   help="CAG steps during training (default %(default)s)")
    p.add_argument("--lr", type=_number, default=0.05,
                   help="base learning rate (default %(default)s: with the paper's 0.1 small_cnn "
                   "collapsed to a constant output under D2R for 1 of 4 seeds in 5 epochs)")
    p.add_argument("--seed", type=int, default=1, help="in [0, 2**32 - 1] (default %(default)s)")
    p.add_argument("--out", type=_path, default=Path("runs/quickstart"),
                   help="folder for both runs and results.json (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    _add_eval_options(p, checkpoint=False)
    p.set_defaults(run=cmd_quickstart)


def cmd_quickstart(a) -> int:
    """Train D2R + CAG and a standard model alike on CIFAR-10 mini; evaluate both."""
    from .. import evaluate, train

    attacks = _check_eval_options(a)
    for flag in ("--epochs", "--train-size", "--batch-size", "--steps"):
        _positive(flag, getattr(a, flag[2:].replace("-", "_")))
    validate.lr(a.lr, "--lr")
    validate.seed(a.seed, "--seed")
    validate.output_dir("--out", a.out, files=("results.json",))
    for method in ("standard", "d2r"):
        validate.output_dir("--out", a.out / method, files=(CHECKPOINT_NAME, "history.json"))
        _check_run_folder("--out", a.out / method)
    configs = {
        method: train.TrainConfig(
            method=method, target_model=a.target, guide_model=a.guide, dataset="cifar10",
            subset="mini", train_size=a.train_size, epochs=a.epochs, batch_size=a.batch_size,
            lr=a.lr, seed=a.seed, method_params={"steps": a.steps} if method != "standard" else {},
            held_out=200,
        ).validate()
        for method in ("standard", "d2r")
    }
    for method, cfg in configs.items():  # runs already in --out must be these
        validate.same_run("--out", a.out / method / CHECKPOINT_NAME, cfg.as_dict(),
                          "use another --out, or delete that folder")
    device = _pick_device(a.device)
    ds, x, y = _load_test("cifar10", "mini", a, device)  # the data is found before anything trains
    trained = {}
    for method, cfg in configs.items():
        print(f"== training {method}: {a.epochs} epochs on {a.train_size} lossless CIFAR-10 "
              f"training images, lr {a.lr:g}, seed {a.seed}")
        trained[method] = train.fit(cfg, a.out / method, device=device, progress=not a.no_progress,
                                    data_dir=a.data_dir).target
    print(f"== evaluating on {ds.name}: {len(y)} lossless CIFAR-10 test images, "
          f"ε = {a.eval_eps:.4f}, seed 0")
    table = evaluate.evaluate_many(trained, x, y, attacks, eps=a.eval_eps,
                                   batch_size=a.eval_batch_size,
                                   autoattack_version=a.autoattack_version)
    print(table)
    table.save_json(a.out / "results.json")
    print(f"results: {a.out / 'results.json'}")
    return 0


# ------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    from .. import experiments, methods, models

    p = sub.add_parser("demo", help="one training step on real CIFAR-10 images, every loss term",
                       description="One step of methods.train_step (D2R + CAG by default) on "
                       "the first --batch-size lossless CIFAR-10 test images; prints every loss "
                       "term and the perturbation's norms.")
    p.add_argument("--method", default="d2r", choices=sorted(methods.METHODS),
                   help="default %(default)s")
    p.add_argument("--target", default="small_cnn", choices=sorted(models.MODELS))
    p.add_argument("--guide", default="small_cnn", choices=sorted(models.MODELS))
    p.add_argument("--batch-size", type=int, default=8, help="at most 1000 (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="in [0, 2**32 - 1] (default %(default)s)")
    p.add_argument("--device", default="auto", choices=experiments.DEVICES,
                   help="default %(default)s")
    p.add_argument("--data-dir", type=_path, default=None, help="data folder")
    p.set_defaults(run=cmd_demo)


def cmd_demo(a) -> int:
    """One `methods.train_step` on real CIFAR-10 images: every loss term and δ's norms."""
    import torch

    from .. import data, methods, models, train

    method = methods.get_method(a.method)
    validate.number("--batch-size", a.batch_size, min=1, max=1000, integer=True)
    validate.seed(a.seed, "--seed")  # the same rule as `train`
    _data_dir(a)
    device = _pick_device(a.device)
    ds = data.load("cifar10", "test", "mini", data_dir=a.data_dir, download=True)
    x, y = ds.subset(a.batch_size).tensors(device)
    train.seed_everything(a.seed)  # the same seeding as `train`
    target = models.build_model(a.target, ds.num_classes).to(device)
    guide = models.build_model(a.guide, ds.num_classes).to(device) if method.uses_guide else None
    optimizer = methods.make_optimizer(target, guide)
    started = time.perf_counter()
    # the x' of this step, for its norms: the same attack from the same random state as train_step's
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        x_adv = methods.make_adversarial(method, target, guide, x, y)
    terms = methods.train_step(method, target, guide, optimizer, x, y)
    elapsed = time.perf_counter() - started
    models_used = f"target {a.target}" + (f", guide {a.guide}" if guide is not None else "")
    print(f"one {method.name} step (methods.train_step): {models_used}, {len(y)} lossless CIFAR-10 "
          f"test images, seed {a.seed}, device {device}, {elapsed:.2f}s")
    for key, value in terms.items():
        print(f"  {key:8s} {value:.6f}")
    if x_adv is not None:
        delta = (x_adv - x).flatten(1)
        eps = getattr(method, "defaults", {}).get("eps")
        bound = f" (ε = {eps:.4f})" if eps is not None else ""
        print(f"  ‖δ‖∞ max {delta.abs().max().item():.5f}{bound}   "
              f"‖δ‖₂ mean {delta.norm(dim=1).mean().item():.4f}")
    return 0


# --------------------------------------------------------------------------------------- profiles
def _experiments():
    from .. import experiments

    return experiments


def _add_profiles(sub) -> None:
    p = sub.add_parser("profiles", help="print the profiles as a table",
                       description="Every profile of experiments.PROFILES, one column each.")
    p.set_defaults(run=lambda a: print(_experiments().profiles_table()))


# ----------------------------------------------------------------------- run and bench: delegated
def _add_delegated(sub, command: str, module: str, help: str) -> None:
    """`command` takes its options from d2r_lib.<module>.add_arguments, runs <module>.main(args)."""
    try:
        mod = importlib.import_module(f"d2r_lib.lab.{module}")
    except ModuleNotFoundError as err:
        if err.name != f"d2r_lib.lab.{module}":
            raise
        mod = None
    if mod is None:
        p = sub.add_parser(command, help=f"{help} (unavailable: d2r_lib.lab.{module} is missing)")

        def missing(a):
            raise ValueError(f"`{command}` needs d2r_lib.lab.{module}, which this installation "
                             "lacks; reinstall d2r_lib")

        p.set_defaults(run=missing, unavailable=True)  # any options: the error is the module
        return
    about = (mod.__doc__ or help).strip().splitlines()[0]
    p = sub.add_parser(command, help=help, description=about)
    mod.add_arguments(p)
    p.set_defaults(run=mod.main)


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = _Parser(prog="d2r", description="The course's one command line (also: python -m "
                     "d2r_lib). `d2r <command> --help` lists a command's options.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Every command checks all its arguments, output paths and data before "
                     "it trains or evaluates anything;\none run writes a folder at a time. An "
                     f"error prints one line `error: ...`.\n\nExit codes:\n{codes}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_train(sub)
    _add_evaluate(sub)
    _add_delegated(sub, "run", "runner", "execute the chapters (papermill) or the reference runs "
                   "at a profile")
    _add_delegated(sub, "bench", "bench", "images/s of training steps and PGD-20 evaluation here")
    _add_quickstart(sub)
    _add_demo(sub)
    _add_profiles(sub)
    return parser


def _fail(err, code: int) -> int:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return code


def _interrupt(signum, frame):
    raise Interrupted("SIGTERM")


_CTRL_C: list[int] = []  # Ctrl-C seen by this process, even if a library's import swallowed it


def _ctrl_c(signum, frame):
    _CTRL_C.append(signum)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run one command; returns the exit code (`EXIT_CODES`). Ctrl-C and SIGTERM stop it with one
    line and code 130, at any moment."""
    _CTRL_C.clear()  # a Ctrl-C of an earlier call in this process is not this call's
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt), signal.signal(signal.SIGINT, _ctrl_c)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        return _main(argv)
    except KeyboardInterrupt as err:
        how = "SIGTERM" if isinstance(err, Interrupted) else "Ctrl-C"
        return _fail(f"interrupted ({how}); every file written so far is complete (writes are "
                     "atomic): run the same command again to resume", 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])


def _main(argv) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "unavailable", False):
            raise UsageError(f"d2r {args.command}: unrecognized arguments: {' '.join(extra)} "
                             f"(see `d2r {args.command} --help`)")
    except UsageError as err:
        return _fail(err, 2)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    import torch

    from .. import checkpoint, data, train

    if _CTRL_C:  # a Ctrl-C while torch was loading, which an extension's import may swallow
        raise KeyboardInterrupt
    refused = (ValueError, TypeError, OSError, checkpoint.CheckpointError, checkpoint.Busy,
               getattr(data, "DataError", ValueError))  # missing, corrupt or tampered data
    torch.set_flush_denormal(True)  # this process: barely trained models have slow denormal floats
    try:
        return int(args.run(args) or 0)
    except SystemExit as done:  # a delegated command that exits through its parser
        return done.code if isinstance(done.code, int) else 1
    except train.TrainingDiverged as err:
        return _fail(err, 1)
    except urllib.error.URLError as err:  # the data is missing here and could not be downloaded
        where = f"in --data-dir {args.data_dir}" if getattr(args, "data_dir", None) else "here"
        return _fail(f"the data is not {where} and downloading it failed ({err.reason}); give "
                     "--data-dir with the offline bundle, or set $D2R_DATA_DIR", 2)
    except OSError as err:
        if isinstance(err, checkpoint.WriteError):
            return _fail(err, 3)
        if err.errno in checkpoint.DISK_ERRNOS:
            return _fail(f"{err.strerror}: {err.filename or 'a file'}; every file written before "
                         "is complete (writes are atomic)", 3)
        return _fail(err, 2)
    except refused as err:
        return _fail(err, 2)
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("D2R_TRACEBACK"):
            raise
        return _fail(f"internal error ({type(err).__name__}: {err}); this is a bug in d2r_lib: "
                     "please report it with the command (D2R_TRACEBACK=1 shows where)", 4)
