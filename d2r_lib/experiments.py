"""Profiles and parameter validation for the chapters, and the papermill runner. Every chapter uses it.

A chapter's `parameters` cell holds literals; `resolve(...)` fills whatever is None from the profile,
validates every value with a clear error, and prints the device once.

| profile | purpose                         | scale                                                      |
|---------|---------------------------------|------------------------------------------------------------|
| smoke   | tests and nbval                 | seconds per notebook on 2 CPU cores                        |
| cpu     | the rendered book, a laptop     | a few minutes per chapter; the lossless CIFAR-10 `mini` split |
| full    | the paper                       | WRN-34-10 target, ResNet-18 guide, 100 epochs, GPU hours  |
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import validate

PROFILES: dict[str, dict] = {
    "smoke": dict(dataset="cifar10", subset="mini", train_size=256, test_size=64, eval_size=32, epochs=1,
                  batch_size=64, target_model="small_cnn", guide_model="small_cnn", eps=8 / 255,
                  step_size=2 / 255, steps=2, eval_steps=5, autoattack="apgd-ce", lr=0.1),
    "cpu": dict(dataset="cifar10", subset="mini", train_size=4000, test_size=1000, eval_size=500, epochs=5,
                batch_size=128, target_model="small_cnn", guide_model="small_cnn", eps=8 / 255,
                step_size=2 / 255, steps=5, eval_steps=20, autoattack="apgd-ce", lr=0.1),
    "full": dict(dataset="cifar10", subset="full", train_size=None, test_size=None, eval_size=None, epochs=100,
                 batch_size=128, target_model="wrn34_10", guide_model="resnet18", eps=8 / 255,
                 step_size=2 / 255, steps=10, eval_steps=20, autoattack="standard", lr=0.1),
}
"""Defaults per profile. train/test/eval sizes of None mean the whole split. The `cpu` profile trains
on the first 4,000 lossless `mini` training images and reports robust numbers on the 1,000 lossless
test images (attacks on the first `eval_size`). `steps`/`step_size` are the training attack's; the
evaluation always uses the official protocol (ε = 8/255, step 2/255, `eval_steps` steps)."""

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Config:
    """A chapter's resolved parameters: every value set and checked."""
    profile: str
    seed: int
    device: str
    dataset: str
    subset: str
    train_size: int | None
    test_size: int | None
    eval_size: int | None
    epochs: int
    batch_size: int
    target_model: str
    guide_model: str
    eps: float
    step_size: float
    steps: int
    eval_steps: int
    autoattack: str
    lr: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line naming profile, seed, data and budget: printed beside every table."""
        size = "all" if self.train_size is None else self.train_size
        test = "all" if self.test_size is None else self.test_size
        return (f"profile={self.profile} seed={self.seed} data={self.dataset}/{self.subset} "
                f"(train {size}, test {test}) target={self.target_model} guide={self.guide_model} "
                f"epochs={self.epochs} batch={self.batch_size} eps={self.eps:.4f} steps={self.steps}")


def pick_device(device: str = "auto") -> str:
    validate.choice("device", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'")
    return device


def resolve(profile: str = "cpu", *, seed: int = 0, device: str = "auto", verbose: bool = True, **overrides) -> Config:
    """Fill every None override from the profile, validate all values, pick and print the device."""
    from . import data, methods, models  # local: keep `import d2r_lib.experiments` light

    validate.choice("profile", profile, PROFILES)
    validate.number("seed", seed, min=0, integer=True)
    known = set(PROFILES[profile])
    extra = {k: v for k, v in overrides.items() if k not in known}
    values = dict(PROFILES[profile])
    values.update({k: v for k, v in overrides.items() if k in known and v is not None})

    validate.choice("dataset", values["dataset"], data.DATASETS)
    validate.choice("subset", values["subset"], data.DATASETS[values["dataset"]]["subsets"])
    for key in ("train_size", "test_size", "eval_size"):
        if values[key] is not None:
            validate.number(key, values[key], min=1, integer=True)
    for key in ("epochs", "batch_size", "steps", "eval_steps"):
        validate.number(key, values[key], min=1, integer=True)
    validate.choice("target_model", values["target_model"], models.MODELS)
    validate.choice("guide_model", values["guide_model"], models.MODELS)
    validate.eps(values["eps"])
    validate.step_size(values["step_size"])
    validate.number("lr", values["lr"], min=0, min_open=True)
    validate.choice("autoattack", values["autoattack"], ("standard", "apgd-ce", "apgd-t", "off"))
    if "method" in extra:
        validate.choice("method", extra["method"], methods.METHODS)
    cfg = Config(profile=profile, seed=seed, device=pick_device(device), extra=extra, **values)
    if verbose:
        print(f"device: {cfg.device} | {cfg.describe()}")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.as_dict(), indent=2))
