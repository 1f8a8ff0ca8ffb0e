"""One training loop for every method of the registry. Chapter 2 introduces it; chapter 9 scales it up.

`fit(TrainConfig(...))` trains the target (and the guide, for guided methods) with the paper's recipe by
default: one SGD over [target, guide] (lr 0.1, momentum 0.9, weight decay 2e-4, batch 128) and the
official schedule scaled to any number of epochs. Each epoch it records every loss term, clean accuracy
and PGD accuracy on a fixed held-out subset, and writes an atomic checkpoint holding target, guide,
optimizer, RNG states and history, so running the same call again resumes where it stopped.
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

from . import checkpoint, data, methods, models, validate

SCHEDULES = ("paper", "cosine")
RESUME = ("auto", "always", "never")
CHECKPOINT_NAME = "last.pt"


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
    method_params: dict = field(default_factory=dict)   # eps / step_size / steps / beta / w_clean / w_adv ...
    seed: int = 1                          # the official code's effective torch seed
    held_out: int = 200                    # held-out test images for the per-epoch clean / PGD-20 accuracy
    augment: bool = True
    amp: bool = False                      # bfloat16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False

    def validate(self) -> "TrainConfig":
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
        validate.number("seed", self.seed, min=0, integer=True)
        validate.number("lr", self.lr, min=0, min_open=True)
        validate.number("momentum", self.momentum, min=0, max=1)
        validate.number("weight_decay", self.weight_decay, min=0)
        validate.choice("schedule", self.schedule, SCHEDULES)
        method.resolve(**self.method_params)
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash of every field (method parameters with their defaults filled in) and of the library
        code that trains: the checkpoint-cache key. Passing a default explicitly gives the same key."""
        fields = {**self.as_dict(), "method_params": methods.get_method(self.method).resolve(**self.method_params)}
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
    """Hash of the modules whose code decides what a run trains: a change there invalidates cached runs."""
    digest = hashlib.sha256()
    for name in ("attacks", "data", "losses", "methods", "models", "train"):
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- helpers
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
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1) start the process group: nccl on GPUs, gloo on CPUs. Chapter 9."""
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


def _batches(dataset, batch_size: int, seed: int, epoch: int, rank: int, world: int):
    """This process's shuffled batches of an epoch; the order depends only on (seed, epoch)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = batch_size // world
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        mine = chunk[rank * per_rank:(rank + 1) * per_rank] if world > 1 else chunk
        if len(mine) == 0 or (world > 1 and len(chunk) < batch_size):
            continue  # every rank takes equal shares; a short last batch is dropped under DDP
        items = [dataset[int(i)] for i in mine]
        yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def held_out_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> dict:
    """Clean and PGD-20 accuracy (ε 8/255, the evaluation protocol) on a fixed subset, and how many distinct
    classes the model predicts there (1 = collapsed to a constant); RNG state untouched."""
    from . import attacks, evaluate
    with attacks.eval_mode(model), torch.no_grad():
        predicted = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return {"clean_acc": (predicted == y).sum().item() / len(y),
            "pgd_acc": evaluate.robust_accuracy(model, x, y, "pgd20", seed=seed),
            "predicted_classes": int(predicted.unique().numel())}


class TrainingCollapsed(RuntimeWarning):
    """The target predicts a single class on the whole held-out subset."""


def warn_if_collapsed(record: dict, n_images: int, lr: float) -> bool:
    """Warn when an epoch ends with the target predicting one class for every held-out image (a collapse the
    remaining epochs rarely undo: with small models and lr 0.1 it happens for some seeds). Chapter 7."""
    if record.get("predicted_classes") != 1 or n_images < 20:
        return False
    warnings.warn(f"epoch {record['epoch']}: the target predicts one class for all {n_images} held-out images, "
                  f"so training has collapsed to a constant output (held-out clean accuracy "
                  f"{100 * record['clean_acc']:.1f}%). Try a lower learning rate (lr = {lr:g} now, e.g. "
                  f"{lr / 2:g}) or another seed.", TrainingCollapsed, stacklevel=3)
    return True


# ------------------------------------------------------------------------------------------------ the loop
def build_models(cfg: TrainConfig, num_classes: int, device) -> tuple[nn.Module, nn.Module | None]:
    target = models.build_model(cfg.target_model, num_classes).to(device)
    guide = models.build_model(cfg.guide_model, num_classes).to(device) if cfg.uses_guide else None
    return target, guide


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} exists and is a file; give a directory for checkpoints")


def fit(cfg: TrainConfig, out_dir: str | Path | None = None, *, device: str = "cpu", resume: str = "auto",
        progress: bool = True, data_dir=None, download: bool = True, log=print,
        max_epochs: int | None = None) -> TrainResult:
    """Train (or resume, or just load a finished run) as `cfg` says; returns models and history. Chapter 2.

    out_dir: where `last.pt` and `history.json` go (None: keep nothing on disk).
    resume: "auto" continues a matching run in out_dir; "always" requires one; "never" starts afresh.
    max_epochs: stop after this many epochs in this call (the run stays resumable), e.g. to show resuming.
    """
    cfg.validate()
    validate.choice("resume", resume, RESUME)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        _check_out_dir(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    if resume == "always" and (ckpt_path is None or not ckpt_path.exists()):
        raise FileNotFoundError(f"resume='always' but there is no checkpoint at {ckpt_path}; "
                                f"start the run first, or use resume='auto'")

    rank, world, device = setup_distributed(device)
    is_main = rank == 0
    say = log if is_main else (lambda *a, **k: None)
    seed_everything(cfg.seed)

    train_set = data.load(cfg.dataset, "train", cfg.subset, data_dir=data_dir, download=download)
    if cfg.train_size is not None:
        train_set = train_set.subset(cfg.train_size)
    if cfg.augment:
        train_set = train_set.with_augmentation(True)
    eval_split = "val" if cfg.dataset == "tinyimagenet" else "test"
    eval_subset = cfg.subset if cfg.dataset != "cifar100" else None
    held_out = data.load(cfg.dataset, eval_split, eval_subset, data_dir=data_dir, download=download)
    held_out = held_out.subset(min(cfg.held_out, len(held_out)))
    x_eval, y_eval = held_out.tensors(device)
    num_classes = train_set.num_classes

    target, guide = build_models(cfg, num_classes, device)
    trained = [target] + ([guide] if guide is not None else [])
    optimizer = methods.make_optimizer(target, guide, lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start_epoch = 1

    if ckpt_path is not None and ckpt_path.exists() and resume != "never":
        payload = checkpoint.load(ckpt_path, map_location=device)
        if payload.get("config") != cfg.as_dict():
            stored = payload.get("config") or {}
            diff = [f"{k}: stored {stored.get(k)!r}, asked {v!r}" for k, v in cfg.as_dict().items()
                    if stored.get(k) != v]
            raise checkpoint.CheckpointError(
                f"{ckpt_path} belongs to a run with other settings ({'; '.join(diff)}). Nothing was overwritten: "
                f"use another out_dir, or resume='never' to start this one afresh there")
        checkpoint.load_state_strict(target, payload["target"], "target")
        if guide is not None:
            checkpoint.load_state_strict(guide, payload["guide"], "guide")
        optimizer.load_state_dict(payload["optimizer"])
        _set_rng_state(payload["rng"])
        history = payload["history"]
        start_epoch = payload["epoch"] + 1
        finished = payload["epoch"] >= cfg.epochs
        say(f"{'loaded the finished run' if finished else 'resumed'} {ckpt_path} "
            f"{'' if finished else 'after '}epoch {payload['epoch']}/{cfg.epochs}")

    if cfg.channels_last:
        target.to(memory_format=torch.channels_last)
        if guide is not None:
            guide.to(memory_format=torch.channels_last)
    # the attack runs on the plain (or compiled) modules; under torchrun the loss runs through DDP wrappers,
    # which broadcast rank 0's weights and buffers and average the gradients
    attack_target = torch.compile(target) if cfg.compile else target
    attack_guide = torch.compile(guide) if (cfg.compile and guide is not None) else guide
    loss_target, loss_guide = attack_target, attack_guide
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        loss_target = DDP(target)
        loss_guide = DDP(guide) if guide is not None else None
    amp_dtype = torch.bfloat16 if cfg.amp else None
    device_type = torch.device(device).type

    from tqdm.auto import tqdm

    method = methods.get_method(cfg.method)
    last_epoch = cfg.epochs if max_epochs is None else min(cfg.epochs, start_epoch - 1 + max_epochs)
    for epoch in range(start_epoch, last_epoch + 1):
        schedule = paper_lr if cfg.schedule == "paper" else cosine_lr
        lr = schedule(epoch, cfg.epochs, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        n_batches = math.ceil(len(train_set) / cfg.batch_size)
        bar = tqdm(_batches(train_set, cfg.batch_size, cfg.seed, epoch, rank, world), total=n_batches,
                   desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}", disable=not (progress and is_main),
                   leave=False)
        started = time.perf_counter()
        seen = 0
        for batch, (x, y) in enumerate(bar, start=1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                x_adv = methods.make_adversarial(method, attack_target, attack_guide, x, y, **cfg.method_params)
                for module in trained:
                    module.train()
                terms = methods.compute_terms(method, loss_target, loss_guide, x, x_adv, y, **cfg.method_params)
            bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
            if bad:
                good = f"{ckpt_path} (after epoch {start_epoch - 1 if not history else history[-1]['epoch']})" \
                    if ckpt_path is not None and ckpt_path.exists() else "none written yet"
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch}, batch {batch}: "
                    + ", ".join(f"term {k!r} = {terms[k].item()}" for k in bad)
                    + f". Training stopped; the last good checkpoint is intact: {good}")
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        elapsed = time.perf_counter() - started
        record = {"epoch": epoch, "lr": lr, "time_s": round(elapsed, 2),
                  "images_per_s": round(seen * world / max(elapsed, 1e-9), 1),
                  **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()}}
        if is_main:
            record.update(held_out_check(target, x_eval, y_eval, seed=cfg.seed))
        history.append(record)
        say(_format_record(record))
        if is_main:
            warn_if_collapsed(record, len(y_eval), cfg.lr)
        if is_main and ckpt_path is not None:
            save_run(ckpt_path, cfg, target, guide, optimizer, epoch, history, num_classes)
        if world > 1:
            dist.barrier()

    for module in trained:
        module.eval()
    return TrainResult(target, guide, history, ckpt_path, cfg)


def _format_record(r: dict) -> str:
    terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in r.items() if k.startswith("train_"))
    acc = ""
    if "clean_acc" in r:
        acc = f" | held-out clean {100 * r['clean_acc']:.1f}% PGD-20 {100 * r['pgd_acc']:.1f}%"
    return f"epoch {r['epoch']:>3} lr {r['lr']:.4g} {terms}{acc} ({r['time_s']:.1f}s, {r['images_per_s']:.0f} img/s)"


def save_run(path: Path, cfg: TrainConfig, target, guide, optimizer, epoch: int, history: list, num_classes: int):
    """Atomically write everything needed to resume (and to evaluate) the run."""
    payload = {
        "kind": "d2r_lib.train", "config": cfg.as_dict(), "epoch": epoch, "epochs": cfg.epochs,
        "method": cfg.method, "target_model": cfg.target_model,
        "guide_model": cfg.guide_model if guide is not None else None, "num_classes": num_classes,
        "dataset": cfg.dataset, "target": target.state_dict(),
        "guide": guide.state_dict() if guide is not None else None,
        "optimizer": optimizer.state_dict(), "rng": _rng_state(), "history": history,
    }
    checkpoint.save(payload, path)
    (path.parent / "history.json").write_text(json.dumps(history, indent=1))


def load_run(path: str | Path, *, target_model: str | None = None, num_classes: int | None = None,
             method: str | None = None, device="cpu") -> tuple[nn.Module, nn.Module | None, dict]:
    """Rebuild target and guide from a checkpoint written by `fit`, checking what is asked against what is stored.

    Returns (target, guide or None, payload) with both models in eval mode.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = checkpoint.load(path, map_location=device)
    if payload.get("kind") != "d2r_lib.train":
        raise checkpoint.CheckpointError(f"{path} is not a d2r_lib training checkpoint (no kind='d2r_lib.train')")
    checkpoint.check_meta(payload, path, target_model=target_model, num_classes=num_classes, method=method)
    target = models.build_model(payload["target_model"], payload["num_classes"]).to(device)
    checkpoint.load_state_strict(target, payload["target"], "target")
    guide = None
    if payload.get("guide") is not None:
        guide = models.build_model(payload["guide_model"], payload["num_classes"]).to(device)
        checkpoint.load_state_strict(guide, payload["guide"], "guide")
        guide.eval()
    return target.eval(), guide, payload


def cache_dir() -> Path:
    """Where trained models are cached between chapters: $D2R_CACHE_DIR/runs or ~/.cache/d2r_lib/runs."""
    root = os.environ.get("D2R_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "d2r_lib") / "runs"


def cache_path(cfg: TrainConfig) -> Path:
    """The folder of `cfg`'s run in the checkpoint cache."""
    cfg.validate()
    return cache_dir() / f"{cfg.method}-{cfg.target_model}-{cfg.key()}"


def load_or_train(cfg: TrainConfig, **fit_kwargs) -> TrainResult:
    """The chapters' checkpoint cache: a finished run keyed by every setting is loaded, otherwise trained
    (or resumed). Chapter 2."""
    return fit(cfg, cache_path(cfg), **fit_kwargs)


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
