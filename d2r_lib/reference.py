"""The shipped reference runs: every method, several seeds, full evaluation. Chapters 7 and 8 read
them.

They are runs of the runner, a profile (a `CONFIGS` name) and a sweep of method × seed:

    d2r run reference --profile reference -p method=pgd_at,trades -p seed=0,1,2 --out book/reference

(without `-p method` / `-p seed`: all nine methods, seeds 0, 1, 2). Each run trains and evaluates
once (`train_and_evaluate`, on CPU in minutes to an hour) and writes one folder:

    book/reference/<method>-seed<k>/
        manifest.json   the runner's manifest: parameters, commit, versions, device, times, the
                        configuration, deviations from the official settings
        metrics.json    clean, PGD-20, CW-20 (official protocol) and AutoAttack
        history.json    the per-epoch record of `train.fit`
        target.pt       the target's weights (when under MAX_CHECKPOINT_BYTES)

Training checkpoints live in the checkpoint cache (outside the repository), so an interrupted run
resumes where it stopped; a complete folder is skipped. `load(folder)` reads the runs back,
`summary(runs)` gives mean ± sd over seeds per method and `paired(runs)` the pre-registered
comparisons: per-seed differences on the same test images with a t-interval (PREREGISTERED, fixed
before any result).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import (
    checkpoint,
    data,
    evaluate,
    experiments,
    methods,
    models,
    shipped,
    train,
    validate,
)

__all__ = [
    "AUTOATTACK_STEPS_PER_IMAGE",
    "CONFIGS",
    "METHODS",
    "METRICS",
    "PREREGISTERED",
    "SEEDS",
    "ReferenceConfig",
    "estimate",
    "interval",
    "load",
    "is_complete",
    "load_target",
    "paired",
    "partial_dir",
    "per_epoch_validation",
    "resume_from_partial",
    "save_partial",
    "summary",
    "t_quantile",
    "train_and_evaluate",
]

METHODS = ("standard", "pgd_at", "trades", "mart", "lbgat", "d2r", "d2r_no_clean", "d2r_no_adv",
           "d2r_trades_gen")
SEEDS = (0, 1, 2)
METRICS = ("clean", "pgd20", "cw20", "autoattack")
FILES = ("manifest.json", "metrics.json", "history.json")
MAX_CHECKPOINT_BYTES = 1_000_000
AUTOATTACK_STEPS_PER_IMAGE = 1200
"""Rough attack-step equivalents per image of AutoAttack standard on a model with about 30 % robust
images: APGD-CE 100 on all, then on the survivors APGD-T 9 × 100, FAB-T 9 × 100 (≈ 2 steps each)
and Square 5,000 queries (forward passes, ≈ 1/3 step each). Used only by `estimate`."""
EVAL_SEED = 0  # every attack of every run uses this seed: the same random starts for every method

PREREGISTERED = {
    "method": "d2r",
    "baselines": ("pgd_at", "trades", "mart", "lbgat"),
    "ablations": ("d2r_no_clean", "d2r_no_adv", "d2r_trades_gen"),
    "metrics": METRICS,
    "primary_metric": "autoattack",
    "level": 0.95,
    "interval": "two-sided Student t-interval of the mean per-seed difference (method − other), "
    "n − 1 df",
    "pairing": "same seed (same initialisation seed and batch order), same test images, "
    "same attack seed",
    "multiplicity": "none: every comparison listed here is reported, none is picked after the fact",
}
"""The comparisons of chapter 7, written down on 2026-11-30 before any reference run existed: D2R
minus each baseline and minus each ablation, on every metric, with 95 % t-intervals. `standard` is
reported but not compared (it is not a robust baseline)."""


@dataclass(frozen=True)
class ReferenceConfig:
    """Everything that determines the reference runs (training via `train.TrainConfig`, evaluation
    here)."""
    name: str
    train_size: int | None      # first n images of the full CIFAR-10 training set (JPEG copies);
                                # None = all
    epochs: int
    steps: int | None           # K of every training attack; None = each method's official K (10)
    batch_size: int = 128
    target_model: str = "small_cnn"
    guide_model: str = "small_cnn"
    lr: float = 0.1
    schedule: str = "paper"
    held_out: int = 500         # per-epoch clean / PGD-20 check of `fit` (first images of the JPEG
                                # test copy)
    test_images: int = 1000     # the lossless CIFAR-10 test images: clean, PGD-20, CW-20
    autoattack_images: int = 500  # AutoAttack on the first n of them
    autoattack_version: str = "standard"
    subset: str = "full"

    def train_config(self, method: str, seed: int, params: dict | None = None) -> train.TrainConfig:
        """The training run of `method` at `seed`: the `reference` profile with this configuration's
        sizes, through `experiments.train_config` (the one profile → TrainConfig mapping); `params`
        adds method parameters (a registered follow-up's dose, e.g. {"w_adv": 10.0})."""
        cfg = experiments.run_config("reference", {"seed": seed}, device="cpu")
        cfg = dataclasses.replace(cfg, **{k: getattr(self, k) for k in _PROFILE_SETTINGS})
        tc = experiments.train_config(cfg, method, **(params or {}))
        return dataclasses.replace(tc, schedule=self.schedule).validate()

    def deviations(self, method: str) -> list[str]:
        """The named ways this configuration departs from the method's official settings."""
        m = methods.get_method(method)
        out = []
        if self.steps is not None and "steps" in m.defaults and self.steps != m.defaults["steps"]:
            reach = self.steps * m.defaults["step_size"]
            out.append(f"training attack K = {self.steps} instead of the official "
                       f"{m.defaults['steps']} (CPU budget); step size unchanged "
                       f"({m.defaults['step_size']:.4g}, K·step = {reach:.4g} "
                       f"{'≥' if reach >= m.defaults['eps'] else '<'} ε = "
                       f"{m.defaults['eps']:.4g})")
        images = (f"{self.train_size or 50000} "
                  f"{'JPEG ' if self.subset == 'full' else 'lossless '}training images")
        out.append(f"{self.epochs} epochs on {images} with the official "
                   f"schedule scaled (instead of 100 epochs on the 50,000 originals); "
                   f"target {self.target_model}, "
                   f"guide {self.guide_model} (instead of WRN-34-10 / ResNet-18)")
        if self.autoattack_images < self.test_images:
            out.append(f"AutoAttack ({self.autoattack_version}) on the first "
                       f"{self.autoattack_images} of the {self.test_images} test images "
                       f"(CPU budget); PGD-20 and CW-20 on all of them")
        return out


_PROFILE_SETTINGS = ("subset", "train_size", "epochs", "steps", "batch_size", "target_model",
                     "guide_model", "lr", "held_out")
"""The fields of a ReferenceConfig that replace the `reference` profile's."""

CONFIGS = {
    # Sized from measurements (1 thread, small_cnn, batch 128): a training step costs about 1.7 ms
    # per image for standard, 5.7 for PGD-AT and 7.8 for D2R at K = 5 (9.7 / 11.8 at the official
    # K = 10), so 5 epochs of 20,000 images take 3 / 10 / 13 minutes; with evaluation (AutoAttack on
    # 500 images) the 27 runs need about 7-8 core-hours, under 4 hours on 2 cores. K = 5 keeps every
    # official step size (K·step ≥ ε). Measured: standard reaches 60.0 % clean (seed 1), below the
    # 65 % aim. `--dry-run --estimate` re-measures on your machine.
    "reference": ReferenceConfig("reference", train_size=20000, epochs=5, steps=5),
    # the registered budget follow-ups (followups.FOLLOWUPS["budget"]): the same setting, longer
    "reference_e10": ReferenceConfig("reference_e10", train_size=20000, epochs=10, steps=5),
    "reference_e20": ReferenceConfig("reference_e20", train_size=20000, epochs=20, steps=5),
    # the pipeline in seconds (tests): a few batches, a few images
    "tiny": ReferenceConfig("tiny", train_size=64, epochs=1, steps=2, batch_size=32, held_out=16,
                            test_images=24, autoattack_images=8, autoattack_version="apgd-ce",
                            subset="mini"),
}


# ------------------------------------------------------------------------------------------ writing
def _write_json(path: Path, value) -> None:
    """Atomically (checkpoint.atomic_write): a reader never sees half a file."""
    text = json.dumps(value, indent=1) + "\n"
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def run_dir(out: Path, method: str, seed: int) -> Path:
    return Path(out) / f"{method}-seed{seed}"


def is_complete(folder: Path) -> bool:
    """All files of a run are written and its manifest, written last, says so: `"status": "ok"`
    (the runner's manifests) or `"complete": true` (the manifests written before the runner ran
    the reference runs; both are read)."""
    folder = Path(folder)
    if not all((folder / f).is_file() for f in FILES):
        return False
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except json.JSONDecodeError:
        return False
    return manifest.get("status") == "ok" or manifest.get("complete") is True


# ------------------------------------------------------------------------------------------ running
def _evaluate(target, config: ReferenceConfig, partial_path: Path, log) -> tuple[dict, dict]:
    """Every metric of the protocol, one at a time; finished metrics are kept in `partial_path`
    (resume)."""
    test = data.cifar10("test", "mini").subset(config.test_images)
    x, y = test.tensors(next(target.parameters()).device)
    done = (json.loads(partial_path.read_text()) if partial_path.is_file()
            else {"metrics": {}, "seconds": {}})
    for metric in METRICS:
        if metric in done["metrics"]:
            continue
        started = time.perf_counter()
        if metric == "clean":
            value = evaluate.accuracy(target, x, y)
        elif metric == "autoattack":
            n = config.autoattack_images
            value = evaluate.robust_accuracy(target, x[:n], y[:n], "autoattack",
                                             seed=EVAL_SEED,
                                             autoattack_version=config.autoattack_version)
        else:
            value = evaluate.robust_accuracy(target, x, y, metric, seed=EVAL_SEED)
        done["metrics"][metric] = value
        done["seconds"][metric] = round(time.perf_counter() - started, 2)
        log(f"  {metric}: {100 * value:.2f}% ({done['seconds'][metric]:.0f}s)")
        _write_json(partial_path, done)
    n = config.autoattack_images
    done["metrics"]["pgd20_on_autoattack_images"] = done["metrics"].get(
        "pgd20_on_autoattack_images")
    if done["metrics"]["pgd20_on_autoattack_images"] is None:
        done["metrics"]["pgd20_on_autoattack_images"] = evaluate.robust_accuracy(
            target, x[:n], y[:n], "pgd20", seed=EVAL_SEED)
        _write_json(partial_path, done)
    return done["metrics"], done["seconds"]


PARTIAL_FILES = ("last.pt", "history.json")


def partial_dir(folder: Path) -> Path:
    """Where an unfinished run's last epoch is kept between sittings: <root>/partial/<kind>/<run>
    (committed with the shipped runs, removed when the run completes)."""
    folder = Path(folder)
    return folder.parent.parent / "partial" / folder.parent.name / folder.name


def save_partial(folder: Path, cache: Path) -> Path | None:
    """Copy an unfinished run's last checkpoint from the cache beside the shipped runs, so that a
    later sitting resumes it (the cache does not outlive a machine). Returns the copy's folder."""
    if is_complete(folder) or not (Path(cache) / "last.pt").is_file():
        return None
    dst = partial_dir(folder)
    dst.mkdir(parents=True, exist_ok=True)
    for name in PARTIAL_FILES:
        if (Path(cache) / name).is_file():
            shutil.copyfile(Path(cache) / name, dst / name)
    return dst


def _epochs_done(folder: Path) -> int:
    path = Path(folder) / "history.json"
    return len(json.loads(path.read_text())) if path.is_file() else 0


def resume_from_partial(folder: Path, cache: Path, log=print) -> bool:
    """Seed the cache with the partial run saved beside `folder` when it holds more epochs than the
    cache; `train.fit` then resumes it (and checks it matches the configuration)."""
    src = partial_dir(folder)
    if not (src / "last.pt").is_file() or _epochs_done(src) <= _epochs_done(cache):
        return False
    Path(cache).mkdir(parents=True, exist_ok=True)
    for name in PARTIAL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(cache) / name)
    log(f"{Path(folder).name}: resuming from the partial run in {src} "
        f"({_epochs_done(src)} epochs)")
    return True


def train_and_evaluate(folder: Path, method: str, seed: int,
                       config: ReferenceConfig = CONFIGS["reference"], *,
                       params: dict | None = None, device: str = "cpu", log=print) -> dict:
    """Train (or resume, also from a partial run saved beside `folder`) and evaluate one reference
    run; write its history.json, metrics.json and target.pt (when under MAX_CHECKPOINT_BYTES)
    into `folder`. Returns what the run's manifest records of it; the runner (`d2r run reference`)
    writes that manifest, last, and holds the run's lock."""
    folder = Path(folder)
    cfg = config.train_config(method, seed, params)
    cache = train.cache_path(cfg)
    resume_from_partial(folder, cache, log)
    log(f"{folder.name}: training ({cfg.epochs} epochs, cache {cache})")
    result = train.fit(cfg, cache, device=device, progress=False, log=log)
    train_seconds = sum(r.get("time_s", 0.0) for r in result.history)
    metrics, eval_seconds = _evaluate(result.target, config, cache / "reference_metrics.json", log)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "history.json", result.history)
    state = {k: v.detach().cpu() for k, v in result.target.state_dict().items()}
    payload = {"kind": "d2r_lib.reference", "method": method, "seed": seed,
               "target_model": cfg.target_model, "num_classes": 10, "target": state}
    ckpt = folder / "target.pt"
    checkpoint.save(payload, ckpt)
    if ckpt.stat().st_size > MAX_CHECKPOINT_BYTES:
        ckpt.unlink()
        ckpt = None
    metrics = {**metrics, "eps": 8 / 255, "test_images": config.test_images,
               "autoattack_images": config.autoattack_images,
               "autoattack_version": config.autoattack_version,
               "eval_seed": EVAL_SEED,
               "test_set": "cifar10/test/mini (lossless test images 0-999)"}
    _write_json(folder / "metrics.json", metrics)
    return {"method": method, "seed": seed, "config": dataclasses.asdict(config),
            "train_config": cfg.as_dict(),
            "method_params": methods.get_method(method).resolve(**cfg.method_params),
            "deviations": config.deviations(method),
            "timings": {"train": round(train_seconds, 1), "evaluate": eval_seconds},
            "torch_threads": torch.get_num_threads(),
            "checkpoint": ckpt.name if ckpt else None}


def estimate(config: ReferenceConfig, method_names=METHODS, *,
             device: str = "cpu") -> dict[str, float]:
    """Projected seconds of one run of each method on this machine (1 thread for CPU): a training
    step measured with `costmodel.measure_step` at the configuration's K, and PGD-20 measured with
    `costmodel.measure_pgd` for the per-epoch checks, PGD-20 / CW-20 and (roughly,
    AUTOATTACK_STEPS_PER_IMAGE) AutoAttack. Chapter 9's cost model; takes a few seconds per
    method."""
    from . import costmodel
    pgd_step = costmodel.measure_pgd(config.target_model, steps=20, batch_size=128,
                                     device=device) / 20
    images = (config.train_size or 50000) * config.epochs
    checks = pgd_step * (20 * config.held_out * config.epochs + 40 * config.test_images
                         + AUTOATTACK_STEPS_PER_IMAGE * config.autoattack_images)
    out = {}
    for name in method_names:
        m = methods.get_method(name)
        steps = config.steps if "steps" in m.defaults else None
        step = costmodel.measure_step(name, config.target_model, config.guide_model,
                                      steps=steps, batch_size=config.batch_size, device=device,
                                      repeats=2)
        out[name] = step * images + (
            checks if name != "standard" else
            pgd_step * (20 * config.held_out * config.epochs + 40 * config.test_images
                        + 100 * config.autoattack_images))
    return out


def per_epoch_validation(cfg: train.TrainConfig, x_val, y_val, *, device: str = "cpu",
                         log=lambda *a, **k: None) -> tuple[train.TrainResult, list[float]]:
    """Train `cfg` one epoch per `fit` call and, after each epoch, measure PGD-20 accuracy on a
    validation set the training never sees; both are kept in the checkpoint cache. Chapter 8 (robust
    overfitting, picking the epoch). Returns the finished run and the validation curve (one value
    per epoch)."""
    folder = train.cache_path(cfg)
    curve_path, history_path = folder / "validation.json", folder / "history.json"
    curve = json.loads(curve_path.read_text()) if curve_path.is_file() else []
    trained = len(json.loads(history_path.read_text())) if history_path.is_file() else 0
    resume = "auto"
    if trained != len(curve):  # a cached run without its validation curve: train it afresh
        curve, resume = [], "never"
    while True:
        result = train.fit(cfg, folder, device=device, progress=False, log=log, resume=resume,
                           max_epochs=1)
        resume = "auto"
        if len(curve) < len(result.history):
            curve.append(evaluate.robust_accuracy(result.target, x_val, y_val, "pgd20",
                                                  seed=EVAL_SEED))
            _write_json(curve_path, curve)
        if len(result.history) >= cfg.epochs:
            return result, curve


# ------------------------------------------------------------------------------------------ reading
def load(folder: str | Path) -> list[dict]:
    """Every complete run under `folder`: dicts with method (the run's name), trained_method, seed,
    metrics, history, manifest, checkpoint, and, from either manifest format, commit (a label) and
    seconds ({"train", "evaluate": {metric: s}}).

    A run folder with missing files raises (a half-written run is never read as a result). A
    relative `folder` missing here is looked up in the shipped copies (`shipped.find`)."""
    folder = shipped.find(folder)
    runs = []
    if not folder.is_dir():
        return runs
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not is_complete(sub):
            raise ValueError(f"{sub} is not a complete reference run (needs {', '.join(FILES)} "
                             f"and a complete manifest); finish it with `d2r run reference` or "
                             f"remove it")
        manifest = json.loads((sub / "manifest.json").read_text())
        ckpt = sub / manifest["checkpoint"] if manifest.get("checkpoint") else None
        runs.append({"folder": sub, "method": _run_name(manifest),
                     "trained_method": manifest["method"], "seed": manifest["seed"],
                     "manifest": manifest,
                     "metrics": json.loads((sub / "metrics.json").read_text()),
                     "history": json.loads((sub / "history.json").read_text()),
                     "checkpoint": ckpt, **_provenance(manifest)})
    return runs


def _run_name(manifest: dict) -> str:
    if "status" in manifest:  # the runner's manifest
        return manifest["name"]
    return manifest.get("run", manifest["method"])  # before: "run" only for a follow-up's name


def _provenance(manifest: dict) -> dict:
    """commit and seconds of a run, from the runner's manifest or from one written before."""
    if "status" not in manifest:
        seconds = manifest.get("seconds", {})
        return {"commit": manifest.get("commit", "unknown"),
                "seconds": {k: seconds.get(k) for k in ("train", "evaluate")}}
    commit = manifest.get("git_commit")
    label = "unknown" if commit is None else commit + ("+dirty" if manifest.get("git_dirty")
                                                       else "")
    return {"commit": label, "seconds": manifest.get("timings")}


def load_target(run_record: dict, device: str = "cpu"):
    """The shipped target of one run (eval mode), checked against its manifest."""
    if run_record.get("checkpoint") is None:
        raise ValueError(f"run {run_record['folder']} ships no checkpoint")
    payload = checkpoint.load(run_record["checkpoint"], map_location=device)
    checkpoint.check_meta(payload, run_record["checkpoint"], kind="d2r_lib.reference",
                          method=run_record.get("trained_method", run_record["method"]),
                          seed=run_record["seed"])
    model = models.build_model(payload["target_model"], payload["num_classes"]).to(device)
    checkpoint.load_state_strict(model, payload["target"], "target")
    return model.eval()


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
          if len(values) > 1 else float("nan"))
    return mean, sd


def summary(runs: list[dict], metrics=METRICS) -> dict[str, dict]:
    """Per method: n seeds, the seeds, and mean and sample sd (n − 1) over seeds of each metric."""
    out: dict[str, dict] = {}
    for name in [m for m in METHODS if any(r["method"] == m for r in runs)] + \
            sorted({r["method"] for r in runs} - set(METHODS)):
        mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
        row = {"n": len(mine), "seeds": [r["seed"] for r in mine]}
        for metric in metrics:
            row[metric] = _mean_sd([r["metrics"][metric] for r in mine])
        out[name] = row
    return out


def _t_cdf(t: float, df: int) -> float:
    """Student t CDF by Simpson integration of the density (enough for interval quantiles)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 2000
    h = abs(t) / n
    pdf = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    area = h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))
    return 0.5 + math.copysign(area, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the CDF)."""
    validate.number("p", p, min=0.5, max=1)
    if p >= 1:
        raise ValueError(f"p must be < 1; got {p!r}")
    validate.number("df", df, min=1, integer=True)
    lo, hi = 0.0, 1e3
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def interval(values: list[float], level: float = PREREGISTERED["level"]) -> dict:
    """Mean, sample sd and the two-sided Student t-interval of the mean of `values` (n − 1 df):
    {"n", "mean", "sd", "low", "high"}; with fewer than 2 values the sd and the interval are NaN.
    Chapter 7."""
    values = list(values)
    nan = float("nan")
    if len(values) < 2:
        return {"n": len(values), "mean": values[0] if values else nan, "sd": nan, "low": nan,
                "high": nan}
    mean, sd = _mean_sd(values)
    half = t_quantile(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def paired(runs: list[dict], method: str = PREREGISTERED["method"],
           baselines=PREREGISTERED["baselines"] + PREREGISTERED["ablations"], metrics=METRICS,
           level: float = PREREGISTERED["level"]) -> list[dict]:
    """Per-seed paired differences `method` − baseline (seeds both have), mean, sd and a t-interval.

    One row per (baseline, metric). With fewer than 2 common seeds the interval is NaN (and `n` says
    why)."""
    by = {(r["method"], r["seed"]): r["metrics"] for r in runs}
    rows = []
    for base in baselines:
        seeds = sorted(s for (m, s) in by if m == method and (base, s) in by)
        for metric in metrics:
            diffs = [by[(method, s)][metric] - by[(base, s)][metric] for s in seeds]
            rows.append({"method": method, "baseline": base, "metric": metric, "seeds": seeds,
                         "differences": diffs, "level": level, **interval(diffs, level)})
    return rows
