"""One training loop for every method of the registry. Chapter 2 introduces it; chapter 9 scales it
up.

`fit(TrainConfig(...))` trains the target (and the guide, for guided methods) with the paper's
recipe by default: one SGD over [target, guide] (lr 0.1, momentum 0.9, weight decay 2e-4, batch 128)
and the official schedule scaled to any number of epochs. Each epoch it records every loss term,
clean accuracy and PGD accuracy on a fixed held-out subset, and writes an atomic checkpoint holding
target, guide, optimizer, RNG states and history, so running the same call again resumes where it
stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint, data, fast, methods, models, validate

__all__ = [
    "SCHEDULES", "RESUME", "CHECKPOINT_NAME", "LOCK_NAME", "TrainingDiverged", "TrainingCollapsed",
    "paper_lr", "cosine_lr", "TrainConfig", "TrainResult", "code_fingerprint", "seed_everything",
    "setup_distributed", "confidence", "held_out_check", "warn_if_collapsed", "build_models",
    "check_finite",
    "fit", "save_run", "load_run", "cache_dir", "cache_path", "load_or_train", "load_cached",
]

SCHEDULES = ("paper", "cosine")
RESUME = ("auto", "always", "never")
CHECKPOINT_NAME = "last.pt"
LOCK_NAME = ".lock"  # held by the run writing a folder (checkpoint.exclusive)
SHOW_LOSS_EVERY = 20
"""The progress bar shows the loss every this many batches: reading it waits for the device."""


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; the last good checkpoint is left as it was."""


def paper_lr(epoch: int, epochs: int, base_lr: float = 0.1) -> float:
    """The official schedule scaled to `epochs` (epoch is 1-based). Chapter 2.

    Epoch 1 at 0.2·base (0.02), then base (0.1), ×0.1 from 76 % of the run, ×0.01 from 91 %:
    for 100 epochs exactly 1 → 0.02, 2–75 → 0.1, 76–90 → 0.01, 91–100 → 0.001.
    """
    validate.number("epoch", epoch, min=1, max=epochs, integer=True)
    if epoch == 1:
        return 0.2 * base_lr
    if epoch >= 0.91 * epochs:
        return 0.01 * base_lr
    if epoch >= 0.76 * epochs:
        return 0.1 * base_lr
    return base_lr


def cosine_lr(epoch: int, epochs: int, base_lr: float = 0.1) -> float:
    """Cosine decay from base_lr (epoch 1) towards 0 (after the last epoch)."""
    validate.number("epoch", epoch, min=1, max=epochs, integer=True)
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


@dataclass
class TrainConfig:
    """Everything that determines a training run (and so its checkpoint-cache key)."""
    method: str = "d2r"
    target_model: str = "small_cnn"
    guide_model: str = "small_cnn"
    dataset: str = "cifar10"
    subset: str = "mini"
    train_size: int | None = None          # first n training images; None = the whole split
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: str = "paper"
    method_params: dict = field(default_factory=dict)  # eps, step_size, steps, beta, w_clean ...
    seed: int = 1                          # the official code's effective torch seed
    held_out: int = 200                   # held-out images of the per-epoch clean / PGD-20 check
    augment: bool = True
    amp: bool = False                      # bfloat16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False
    fold_batchnorm: bool = False           # the attack on BatchNorm-folded copies (fast.py)

    def validate(self) -> TrainConfig:
        method = methods.get_method(self.method)
        validate.choice("target_model", self.target_model, models.MODELS)
        if method.uses_guide:
            validate.choice("guide_model", self.guide_model, models.MODELS)
        validate.choice("dataset", self.dataset, data.DATASETS)
        validate.choice("subset", self.subset, data.DATASETS[self.dataset]["subsets"])
        if self.train_size is not None:
            validate.number("train_size", self.train_size, min=1, integer=True)
        for key in ("epochs", "batch_size", "held_out"):
            validate.number(key, getattr(self, key), min=1, integer=True)
        validate.seed(self.seed)
        validate.lr(self.lr)
        validate.number("momentum", self.momentum, min=0, max=1)
        validate.number("weight_decay", self.weight_decay, min=0)
        validate.choice("schedule", self.schedule, SCHEDULES)
        for key in ("augment", "amp", "channels_last", "compile", "fold_batchnorm"):
            validate.flag(key, getattr(self, key))
        method.resolve(**self.method_params)
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash of every field (method parameters with their defaults filled in) and of the
        library code that trains: the checkpoint-cache key. Passing a default explicitly gives the
        same key."""
        fields = {**self.as_dict(),
                  "method_params": methods.get_method(self.method).resolve(**self.method_params)}
        blob = json.dumps(fields, sort_keys=True, default=str) + code_fingerprint()
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def uses_guide(self) -> bool:
        return methods.get_method(self.method).uses_guide


@dataclass
class TrainResult:
    target: nn.Module
    guide: nn.Module | None
    history: list[dict]
    checkpoint: Path | None
    config: TrainConfig


def code_fingerprint() -> str:
    """Hash of the modules whose code decides what a run trains: a change there invalidates cached
    runs."""
    digest = hashlib.sha256()
    for name in ("attacks", "data", "losses", "methods", "models", "train"):
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2] if random.getstate()[2] is not None else -1,
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos = state["python_pos"]
    random.setstate((3, tuple(state["python"]), None if pos == -1 else pos))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1) start the process group: nccl on GPUs, gloo on CPUs.
    Chapter 9."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
    rank, world = _dist_info()
    return rank, world, device


def confidence(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """How sure a model is on its own clean images: accuracy, the mean probability of the true class
    and the mean entropy of its soft labels (nats; ln C for a uniform prediction). Chapter 7 reads
    it for the target and for the guide, whose soft labels D2R's loss makes the target match."""
    probs = torch.softmax(logits.float(), dim=1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
    return {"acc": (logits.argmax(1) == y).sum().item() / len(y),
            "true_prob": probs.gather(1, y[:, None]).mean().item(),
            "entropy": entropy.mean().item()}


def held_out_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
                   guide: nn.Module | None = None) -> dict:
    """Clean and PGD-20 accuracy (ε 8/255, the evaluation protocol) on a fixed subset, and how many
    distinct classes the model predicts there (1 = collapsed to a constant); the target's mean
    true-class probability and soft-label entropy there (`confidence`), and with `guide` the guide's
    clean accuracy, true-class probability and entropy. Eval mode, modes restored, RNG state
    untouched."""
    from . import attacks, evaluate

    def clean_logits(net):
        with attacks.eval_mode(net), torch.no_grad():
            return torch.cat([net(x[i:i + 256]) for i in range(0, len(x), 256)])

    logits = clean_logits(model)
    if not bool(torch.isfinite(logits).all()):
        raise TrainingDiverged("the target's clean logits on the held-out images are NaN or "
                               "infinite (its weights are finite but too large)")
    predicted = logits.argmax(1)
    target = confidence(logits, y)
    record = {"clean_acc": target["acc"],
              "pgd_acc": evaluate.robust_accuracy(model, x, y, "pgd20", seed=seed),
              "predicted_classes": int(predicted.unique().numel()),
              "target_true_prob": target["true_prob"], "target_entropy": target["entropy"]}
    if guide is not None:
        record.update({f"guide_{k}": v for k, v in confidence(clean_logits(guide), y).items()})
    return record


class TrainingCollapsed(validate.D2RWarning, RuntimeWarning):
    """The target predicts a single class on the whole held-out subset."""


def warn_if_collapsed(record: dict, n_images: int, lr: float) -> bool:
    """Warn when an epoch ends with the target predicting one class for every held-out image (a
    collapse the remaining epochs rarely undo: with small models and lr 0.1 it happens for some
    seeds). Chapter 7."""
    if record.get("predicted_classes") != 1 or n_images < 20:
        return False
    warnings.warn(f"epoch {record['epoch']}: the target predicts one class for all {n_images} "
                  "held-out images, so training has collapsed to a constant output (held-out "
                  f"clean accuracy {100 * record['clean_acc']:.1f}%). Try a lower learning rate "
                  f"(lr = {lr:g} now, e.g. {lr / 2:g}) or another seed.", TrainingCollapsed,
                  stacklevel=3)
    return True


# ----------------------------------------------------------------------------------------- the loop
def build_models(cfg: TrainConfig, num_classes: int, device) -> tuple[nn.Module, nn.Module | None]:
    target = models.build_model(cfg.target_model, num_classes).to(device)
    guide = models.build_model(cfg.guide_model, num_classes).to(device) if cfg.uses_guide else None
    return target, guide


def _checkpoint_path(out_dir, resume: str) -> Path | None:
    validate.choice("resume", resume, RESUME)
    if out_dir is None:
        if resume == "always":
            raise FileNotFoundError("resume='always' needs out_dir, the folder of the run to "
                                    "resume")
        return None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} exists and is a file; give a directory for "
                                 "checkpoints")
    path = out_dir / CHECKPOINT_NAME
    if (out_dir / "history.json").exists() and not path.exists():
        raise checkpoint.CheckpointError(
            f"out_dir {out_dir} holds a history.json but no {CHECKPOINT_NAME}: the files of "
            "another run or tool (a shipped reference run, say). Nothing was overwritten: use "
            "another folder")
    if resume == "always" and not path.exists():
        raise FileNotFoundError(f"resume='always' but there is no checkpoint at {path}; "
                                f"start the run first, or use resume='auto'")
    return path


def _datasets(cfg: TrainConfig, device, data_dir, download: bool):
    """The (augmented) training set and the fixed held-out tensors of the per-epoch check."""
    train_set = data.load(cfg.dataset, "train", cfg.subset, data_dir=data_dir, download=download)
    if cfg.train_size is not None:
        train_set = train_set.subset(cfg.train_size)
    if cfg.augment:
        train_set = train_set.with_augmentation(True)
    eval_split = "val" if cfg.dataset == "tinyimagenet" else "test"
    eval_subset = cfg.subset if cfg.dataset != "cifar100" else None
    held_out = data.load(cfg.dataset, eval_split, eval_subset, data_dir=data_dir, download=download)
    return train_set, held_out.subset(min(cfg.held_out, len(held_out))).tensors(device)


def _read_run(path: Path | None, resume: str, cfg: TrainConfig, device) -> dict | None:
    """The checkpoint of this run in `path` to resume, every field checked before the data is read;
    None when there is none (or resume="never")."""
    if path is None or not path.exists() or resume == "never":
        return None
    payload = checkpoint.load(path, map_location=device)
    if payload.get("config") != cfg.as_dict():
        stored = payload.get("config") or {}
        diff = [f"{k}: stored {stored.get(k)!r}, asked {v!r}" for k, v in cfg.as_dict().items()
                if stored.get(k) != v]
        raise checkpoint.CheckpointError(
            f"{path} belongs to a run with other settings ({'; '.join(diff)}). Nothing was "
            "overwritten: use another out_dir, or resume='never' to start this one afresh there")
    checkpoint.check_run(payload, path, epochs=cfg.epochs, uses_guide=cfg.uses_guide)
    return payload


def _resume(payload: dict | None, path: Path | None, cfg: TrainConfig, target, guide, optimizer,
            say) -> tuple[list[dict], int]:
    """Load the run `_read_run` found into the models and optimizer: (history, first epoch to
    run)."""
    if payload is None:
        return [], 1
    checkpoint.check_momentum(payload, path, optimizer)
    checkpoint.load_state_strict(target, payload["target"], "target")
    if guide is not None:
        checkpoint.load_state_strict(guide, payload["guide"], "guide")
    optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(payload["rng"])
    done = payload["epoch"]
    run = path.parent.name  # the run's folder name: a page never shows this machine's paths
    say(f"loaded the finished run {run} (epoch {done}/{cfg.epochs})" if done >= cfg.epochs
        else f"resumed the run {run} after epoch {done}/{cfg.epochs}")
    return payload["history"], done + 1


def _step_models(cfg: TrainConfig, target, guide, world: int):
    """What `methods.train_step` runs: compiled modules (cfg.compile) and, under torchrun, DDP
    wrappers (they broadcast rank 0's weights and buffers and average the gradients; the attack runs
    unwrapped)."""
    step_models = []
    for model in (target, guide):
        if model is not None and cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if model is not None and cfg.compile:
            model = torch.compile(model)
        if model is not None and world > 1:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model)
        step_models.append(model)
    return step_models


def _last_good(path: Path | None, history: list[dict]) -> str:
    if path is None:
        return "none is kept (out_dir=None)"
    if not path.exists():
        return "none written yet"
    return f"{path} (after epoch {history[-1]['epoch'] if history else '?'})"


def _check_loss(terms: dict, epoch: int, batch: int, path, history) -> None:
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(
            f"non-finite loss at epoch {epoch}, batch {batch}: "
            + ", ".join(f"term {k!r} = {terms[k]}" for k in bad)
            + ". Training stopped; the last good checkpoint is intact: "
              f"{_last_good(path, history)}")


def check_finite(epoch: int, batch: int, target, guide, optimizer, path=None, history=()) -> None:
    """Raise TrainingDiverged naming the first parameter / buffer of target or guide, or optimizer
    state tensor, that holds NaN or infinity (checked before every checkpoint write). Chapter 9."""
    trees = {"target": target.state_dict(),
             "guide": guide.state_dict() if guide is not None else {},
             "optimizer": optimizer.state_dict()["state"]}
    bad = checkpoint.first_non_finite(trees)
    if bad is not None:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch} (found after batch {batch}, the epoch's last): "
            f"{bad} holds NaN or infinite values. Nothing was saved; the last good checkpoint is "
            f"intact: {_last_good(path, list(history))}. Try a lower learning rate")


def _held_out(target, guide, x_eval, y_eval, cfg: TrainConfig, epoch: int, path, history) -> dict:
    try:
        return held_out_check(target, x_eval, y_eval, seed=cfg.seed, guide=guide)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"training diverged in epoch {epoch}: {err}. Nothing was saved; the "
                               f"last good checkpoint is intact: {_last_good(path, history)}. Try "
                               f"a lower learning rate") from None


def _train_one(cfg: TrainConfig, method, params, step_models, optimizer, x, y,
               device) -> dict[str, torch.Tensor]:
    """One batch through `methods.step` (bfloat16 autocast with cfg.amp, the attack on
    BatchNorm-folded copies with cfg.fold_batchnorm): the terms stay on the device."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with fast.folding(cfg.fold_batchnorm), fast.autocast(device, enabled=cfg.amp):
        return methods.step(method, *step_models, optimizer, x, y, params)


def _epoch_sums(steps: list, epoch: int, path, history) -> tuple[dict[str, float], int]:
    """The batch-weighted sums of every loss term over one epoch's `steps` [(terms, batch size)],
    read from the device once; the first batch with a non-finite term raises TrainingDiverged."""
    if not steps:
        return {}, 0
    keys = list(steps[0][0])
    rows = torch.stack([torch.stack([t[k] for k in keys]) for t, _ in steps]).tolist()
    sums: dict[str, float] = {}
    seen = 0
    for batch, (row, (_, n)) in enumerate(zip(rows, steps), start=1):
        terms = dict(zip(keys, row))
        _check_loss(terms, epoch, batch, path, history)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * n
        seen += n
    return sums, seen


def _set_lr(optimizer, cfg: TrainConfig, epoch: int) -> float:
    lr = (paper_lr if cfg.schedule == "paper" else cosine_lr)(epoch, cfg.epochs, cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def fit(cfg: TrainConfig, out_dir: str | Path | None = None, *, device: str = "cpu",
        resume: str = "auto", progress: bool = True, data_dir=None, download: bool = True,
        log=print, max_epochs: int | None = None, wait: bool = False) -> TrainResult:
    """Train (or resume, or just load a finished run) as `cfg` says; returns models and history.
    Chapter 2.

    Every batch is one `methods.step` (the body of `methods.train_step`): `cfg` is checked once
    here, and the loss terms are read from the device once per epoch. out_dir: where `last.pt` and
    `history.json` go (None: keep nothing on disk). resume: "auto" continues a matching run in
    out_dir; "always" requires one; "never" starts afresh. max_epochs: stop after this many epochs
    in this call (the run stays resumable). A non-finite loss, or non-finite weights before a
    checkpoint write, raise TrainingDiverged and leave the last checkpoint as it was. One process
    writes out_dir at a time: another one there raises checkpoint.Busy (with `wait`, it waits).
    """
    cfg.validate()
    path = _checkpoint_path(out_dir, resume)
    rank, world, device = setup_distributed(device)
    lock = (checkpoint.exclusive(path.parent / LOCK_NAME, wait=wait)
            if path is not None and rank == 0 else contextlib.nullcontext())
    with lock:  # one writer per out_dir: a second run there is refused (checkpoint.Busy)
        return _fit(cfg, path, rank, world, device, resume, progress, data_dir, download, log,
                    max_epochs)


def _fit(cfg: TrainConfig, path: Path | None, rank: int, world: int, device, resume: str,
         progress: bool, data_dir, download: bool, log, max_epochs: int | None) -> TrainResult:
    say = log if rank == 0 else (lambda *a, **k: None)
    payload = _read_run(path, resume, cfg, device)  # a damaged checkpoint: refused before the data
    seed_everything(cfg.seed)
    train_set, (x_eval, y_eval) = _datasets(cfg, device, data_dir, download)
    target, guide = build_models(cfg, train_set.num_classes, device)
    optimizer = methods.make_optimizer(target, guide, lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
    history, first = _resume(payload, path, cfg, target, guide, optimizer, say)
    step_models = _step_models(cfg, target, guide, world)
    method = methods.get_method(cfg.method)
    params = method.resolve(**cfg.method_params)  # checked once, here at the door
    last = cfg.epochs if max_epochs is None else min(cfg.epochs, first - 1 + max_epochs)

    loader = data.BatchLoader(train_set, cfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                              device=device)
    from tqdm.auto import tqdm
    for epoch in range(first, last + 1):
        lr = _set_lr(optimizer, cfg, epoch)
        steps, batch, started = [], 0, time.perf_counter()
        loader.set_epoch(epoch)
        batches = tqdm(loader, total=len(loader), leave=False,
                       desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}",
                       disable=not (progress and rank == 0))
        for batch, (x, y) in enumerate(batches, start=1):
            terms = _train_one(cfg, method, params, step_models, optimizer, x, y, device)
            steps.append((terms, len(y)))
            if not batches.disable and batch % SHOW_LOSS_EVERY == 0:  # one read per 20 batches
                batches.set_postfix(loss=f"{terms['loss'].item():.3f}")
        sums, seen = _epoch_sums(steps, epoch, path, history)
        check_finite(epoch, batch, target, guide, optimizer, path, history)
        elapsed = time.perf_counter() - started
        record = {"epoch": epoch, "lr": lr, "time_s": round(elapsed, 2),
                  "images_per_s": round(seen * world / max(elapsed, 1e-9), 1),
                  **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()}}
        if rank == 0:
            record.update(_held_out(target, guide, x_eval, y_eval, cfg, epoch, path, history))
        history.append(record)
        say(_format_record(record))
        if rank == 0:
            warn_if_collapsed(record, len(y_eval), cfg.lr)
            if path is not None:
                save_run(path, cfg, target, guide, optimizer, epoch, history, train_set.num_classes)
        if world > 1:
            dist.barrier()
    for model in (target, guide):
        if model is not None:
            model.eval()
    return TrainResult(target, guide, history, path, cfg)


def _format_record(r: dict) -> str:
    terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in r.items() if k.startswith("train_"))
    acc = ""
    if "clean_acc" in r:
        acc = f" | held-out clean {100 * r['clean_acc']:.1f}% PGD-20 {100 * r['pgd_acc']:.1f}%"
    return (f"epoch {r['epoch']:>3} lr {r['lr']:.4g} {terms}{acc} ({r['time_s']:.1f}s, "
            f"{r['images_per_s']:.0f} img/s)")


def save_run(path: Path, cfg: TrainConfig, target, guide, optimizer, epoch: int, history: list,
             num_classes: int) -> None:
    """Atomically write everything needed to resume (and to evaluate) the run, and history.json."""
    payload = {
        "kind": "d2r_lib.train", "config": cfg.as_dict(), "epoch": epoch, "epochs": cfg.epochs,
        "method": cfg.method, "target_model": cfg.target_model,
        "guide_model": cfg.guide_model if guide is not None else None, "num_classes": num_classes,
        "dataset": cfg.dataset, "target": target.state_dict(),
        "guide": guide.state_dict() if guide is not None else None,
        "optimizer": optimizer.state_dict(), "rng": _rng_state(), "history": history,
    }
    checkpoint.save(payload, path)
    text = json.dumps(history, indent=1)
    checkpoint.atomic_write(path.parent / "history.json", lambda tmp: tmp.write_text(text))


def load_run(path: str | Path, *, target_model: str | None = None, num_classes: int | None = None,
             method: str | None = None, device="cpu") -> tuple[nn.Module, nn.Module | None, dict]:
    """Rebuild target and guide from a checkpoint written by `fit`, checking what is asked against
    what is stored.

    Returns (target, guide or None, payload) with both models in eval mode.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = checkpoint.load(path, map_location=device)
    if payload.get("kind") != "d2r_lib.train":
        raise checkpoint.CheckpointError(f"{path} is not a d2r_lib training checkpoint (no "
                                         "kind='d2r_lib.train')")
    checkpoint.check_fields(payload, path, {k: checkpoint.RUN_FIELDS[k] for k in (
        "config", "epoch", "epochs", "method", "target_model", "num_classes", "dataset", "target",
        "guide")})
    faults = [f"{key} {payload[key]!r} is not one of d2r_lib's models" for key in
              ("target_model", "guide_model") if payload.get(key) is not None
              and payload[key] not in models.MODELS]
    if payload["num_classes"] < 2:
        faults.append(f"num_classes {payload['num_classes']} is below 2")
    if not isinstance(payload["config"].get("subset"), str):
        faults.append("its config has no subset")
    if faults:
        raise checkpoint.CheckpointError(f"{path} is damaged: " + "; ".join(faults))
    checkpoint.check_meta(payload, path, target_model=target_model, num_classes=num_classes,
                          method=method)
    target = models.build_model(payload["target_model"], payload["num_classes"]).to(device)
    checkpoint.load_state_strict(target, payload["target"], "target")
    guide = None
    if payload.get("guide") is not None:
        guide = models.build_model(payload["guide_model"], payload["num_classes"]).to(device)
        checkpoint.load_state_strict(guide, payload["guide"], "guide")
        guide.eval()
    return target.eval(), guide, payload


def cache_dir() -> Path:
    """Where trained models are cached between chapters: $D2R_CACHE_DIR/runs or
    ~/.cache/d2r_lib/runs."""
    root = os.environ.get("D2R_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "d2r_lib") / "runs"


def cache_path(cfg: TrainConfig) -> Path:
    """The folder of `cfg`'s run in the checkpoint cache."""
    cfg.validate()
    return cache_dir() / f"{cfg.method}-{cfg.target_model}-{cfg.key()}"


def load_or_train(cfg: TrainConfig, **fit_kwargs) -> TrainResult:
    """The chapters' checkpoint cache: a finished run keyed by every setting is loaded, otherwise
    trained (or resumed); a run another process is training is waited for. Chapter 2."""
    return fit(cfg, cache_path(cfg), **{"wait": True, **fit_kwargs})


def load_cached(cfg: TrainConfig, device: str = "cpu") -> TrainResult | None:
    """The finished run of `cfg` from the checkpoint cache, or None when it is missing or unfinished
    (nothing is trained)."""
    path = cache_path(cfg) / CHECKPOINT_NAME
    if not path.exists():
        return None
    target, guide, payload = load_run(path, device=device)
    if payload["config"] != cfg.as_dict() or payload["epoch"] < cfg.epochs:
        return None
    return TrainResult(target, guide, payload["history"], path, cfg)
