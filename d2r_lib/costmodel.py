"""How long will a run take? Time one training step, fit a linear cost model, predict epochs and
runs. Chapter 9.

One training step of an adversarial method costs K attack steps (a forward and a backward pass of
the target to its input) plus an outer part (the loss's forward passes, their backward pass, the SGD
update). Per image:

    t(K) ≈ a + b·(K + c)

- b: seconds of one attack step per image (for this target, batch size and device): what `fit`
  measures;
- c: the outer part in units of attack steps, fixed by the method's structure (`outer_steps`: the
  train-mode passes the method declares, weighted by the models' multiply-accumulate counts);
- a: what is left per image (data handling, Python overhead, the optimizer), fitted beside b.

Timings at several K determine only the line's intercept a + b·c and its slope b, so c is given,
not fitted.

`measure_step` times real training steps (`methods.train_step`) on random images on the current
device, `fit` solves the least-squares line, `epoch_time` / `run_time` predict, and `extrapolate`
carries a fitted model to bigger networks through their multiply-accumulate (MAC) ratio: an estimate
that assumes the device runs the bigger network at the same MACs per second, which is only roughly
true (measure on the device you will use).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from . import attacks, fast, methods, models, validate

__all__ = [
    "TRAIN_PASS", "ATTACK_PASS", "count_macs", "model_macs", "outer_steps", "measure_step",
    "measure_pgd",
    "CostModel", "fit", "extrapolate", "epoch_time", "run_time",
]

TRAIN_PASS = 3.0
"""A training pass (forward, backward to activations and to weights) ≈ 3 forward passes."""
ATTACK_PASS = 2.0
"""An attack step (forward, backward to the input) ≈ 2 forward passes: the unit of `outer_steps`."""



# ----------------------------------------------------------------------------------------- counting
def count_macs(model: nn.Module, image_size: int = 32, channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linear layers).
    Chapter 9.

    Counted from the layer shapes with forward hooks on a single zero image (a model on the "meta"
    device costs nothing); every module's train/eval mode is restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    validate.number("image_size", image_size, min=1, integer=True)
    validate.number("channels", channels, min=1, integer=True)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with attacks.eval_mode(model), torch.no_grad():
            model(torch.zeros(1, channels, image_size, image_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return int(total)


def model_macs(name: str, num_classes: int = 10, image_size: int = 32) -> int:
    """MACs of one forward pass of the library model `name` (built on the meta device: no memory, no
    compute). Chapter 9."""
    validate.choice("name", name, models.MODELS)
    validate.number("num_classes", num_classes, min=2, integer=True)
    validate.number("image_size", image_size, min=1, integer=True)
    with torch.device("meta"):
        model = models.build_model(name, num_classes)
    return count_macs(model, image_size)


def outer_steps(method: str, target_macs: float = 1.0, guide_macs: float | None = None,
                **params) -> float:
    """c of the cost model: the outer part of one training step, in attack steps of the target.

    Reads the step's train-mode passes from the method (`Method.step_passes`, ≈ 3 forward passes
    each) and its attack's one gradient-free reference pass (`methods.REFERENCE_PASSES`), weighted
    by each model's forward MACs, divided by one attack step (≈ 2 forward passes of the target).
    `params` are method parameters (e.g. official_passes=False). With target = guide: standard /
    pgd_at 1.5, mart 3, trades / lbgat / the d2r family 5 (trades / lbgat 3.5 with
    official_passes=False). Chapter 9.
    """
    m = methods.get_method(method)
    passes = m.step_passes(m.resolve(**params))
    validate.number("target_macs", target_macs, min=0, min_open=True)
    if guide_macs is None:
        guide_macs = target_macs
    validate.number("guide_macs", guide_macs, min=0, min_open=True)
    cost = {"target": target_macs, "guide": guide_macs}
    outer = TRAIN_PASS * sum(cost[p.model] for p in passes)
    reference = sum(cost[model] for model in methods.REFERENCE_PASSES[m.attack_kind])
    return (outer + reference) / (ATTACK_PASS * target_macs)


# ---------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_step(method: str = "d2r", target: str = "small_cnn", guide: str = "small_cnn", *,
                 steps: int | None = 10, batch_size: int = 32, image_size: int = 32,
                 num_classes: int = 10, device: str = "cpu", warmup: int = 1, repeats: int = 3,
                 amp: bool = False, channels_last: bool = False, fold_batchnorm: bool = False,
                 seed: int = 0, method_params: dict | None = None) -> float:
    """Seconds per image of one training step of `method` (K = `steps` attack steps, loss, SGD).

    Builds fresh `target` / `guide` models on `device`, runs `warmup` untimed steps, then `repeats`
    timed steps of `methods.train_step` on one batch of random images, and returns the fastest step
    time (the one least disturbed by other work on a shared machine) divided by `batch_size`.
    `steps`=None keeps the method's own K; `standard` has no attack (steps must be None or 0). amp:
    bfloat16 autocast as `train --amp`; channels_last as `--channels-last`; fold_batchnorm: the
    attack on BatchNorm-folded copies (`TrainConfig.fold_batchnorm`). The global RNG is
    untouched. method_params: other method parameters (e.g. {"official_passes": False}), checked
    before timing. Chapter 9.
    """
    m = methods.get_method(method)
    validate.choice("target", target, models.MODELS)
    if m.uses_guide:
        validate.choice("guide", guide, models.MODELS)
    if steps is not None:
        validate.number("steps", steps, min=0, integer=True)
        if m.attack_kind == "none" and steps != 0:
            raise ValueError(f"steps must be None or 0 for method {method!r}, which makes no "
                             f"attack; got {steps}")
        if m.attack_kind != "none" and steps == 0:
            raise ValueError(f"steps must be >= 1 for method {method!r} (its attack needs K ≥ 1); "
                             "got 0")
    for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 8),
                             ("num_classes", num_classes, 2), ("warmup", warmup, 0),
                             ("repeats", repeats, 1), ("seed", seed, 0)):
        validate.number(name, value, min=low, integer=True)
    for name, value in (("amp", amp), ("channels_last", channels_last),
                        ("fold_batchnorm", fold_batchnorm)):
        validate.flag(name, value)
    if not isinstance(device, (str, torch.device)):
        raise TypeError("device must be a string such as 'cpu' or 'cuda'; got "
                        f"{type(device).__name__}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available")

    params = {**(method_params or {}),
              **({"steps": steps} if steps is not None and m.attack_kind != "none"
                                           else {})}
    m.resolve(**params)
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        f = models.build_model(target, num_classes).to(dev)
        g = models.build_model(guide, num_classes).to(dev) if m.uses_guide else None
        x = torch.rand(batch_size, 3, image_size, image_size, device=dev)
        y = torch.randint(0, num_classes, (batch_size,), device=dev)
        if channels_last:
            f.to(memory_format=torch.channels_last)
            if g is not None:
                g.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer = methods.make_optimizer(f, g)

        def one_step():
            with fast.folding(fold_batchnorm), fast.autocast(dev, enabled=amp):
                methods.train_step(m, f, g, optimizer, x, y, **params)

        return _fastest(one_step, dev, warmup, repeats) / batch_size


def _fastest(run, device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds of the fastest of `repeats` timed calls of `run()` after `warmup` untimed ones (the
    fastest is the one least disturbed by other work on a shared machine)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def measure_pgd(model: str = "small_cnn", *, steps: int = 20, batch_size: int = 256,
                num_classes: int = 10, device: str = "cpu", warmup: int = 1, repeats: int = 3,
                seed: int = 0) -> float:
    """Seconds per image of L∞ PGD evaluation (ε 8/255, α 2/255, all `steps` steps, no early stop)
    of a fresh `model` on random images: the fastest of `repeats` runs. The global RNG is untouched.
    Chapter 9."""
    validate.choice("model", model, models.MODELS)
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("num_classes", num_classes, 2), ("warmup", warmup, 0),
                             ("repeats", repeats, 1), ("seed", seed, 0)):
        validate.number(name, value, min=low, integer=True)
    dev = torch.device(device)
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        f = models.build_model(model, num_classes).to(dev).eval()
        x = torch.rand(batch_size, 3, 32, 32, device=dev)
        y = torch.randint(0, num_classes, (batch_size,), device=dev)
        return _fastest(lambda: attacks.pgd(f, x, y, eps=8 / 255, step_size=2 / 255, steps=steps),
                        dev,
                        warmup, repeats) / batch_size


# ---------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class CostModel:
    """t(K) = a + b·(K + c) seconds per training image; `steps` / `seconds` are the points it was
    fitted on."""
    a: float
    b: float
    c: float
    steps: tuple = ()
    seconds: tuple = ()
    note: str = "fitted"
    meta: dict = field(default_factory=dict)

    def seconds_per_image(self, steps: float) -> float:
        """Predicted seconds of one training step per image with K = `steps` attack steps."""
        validate.number("steps", steps, min=0)
        return self.a + self.b * (steps + self.c)

    @property
    def rmse(self) -> float:
        """Root-mean-square error of the fit on its own points (s per image); nan without points."""
        if not self.steps:
            return float("nan")
        squares = [(self.seconds_per_image(k) - t) ** 2 for k, t in zip(self.steps, self.seconds)]
        return math.sqrt(sum(squares) / len(self.steps))

    def __str__(self) -> str:
        return (f"t(K) = {self.a * 1e3:.4g} ms + {self.b * 1e3:.4g} ms·(K + {self.c:.3g}) per "
                f"image ({self.note})")


def _points(steps, seconds_per_image) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        ks, ts = [float(k) for k in steps], [float(t) for t in seconds_per_image]
    except TypeError:
        raise TypeError("steps and seconds_per_image must be sequences of numbers") from None
    if len(ks) != len(ts):
        raise ValueError(f"steps and seconds_per_image must have the same length; got {len(ks)} "
                         f"and {len(ts)}")
    for k in ks:
        validate.number("steps entry", k, min=0)
    for t in ts:
        validate.number("seconds_per_image entry", t, min=0, min_open=True)
    if len(set(ks)) < 2:
        raise ValueError("steps must hold at least two different K values to fit a line; got "
                         f"{sorted(set(ks))}")
    return tuple(ks), tuple(ts)


def fit(steps: Sequence[float], seconds_per_image: Sequence[float], *, c: float = 0.0,
        **meta) -> CostModel:
    """Least-squares fit of t = a + b·(K + c) to timings (`measure_step` at several K). Chapter 9.

    c is given (`outer_steps(method, ...)`): timings at several K fix only the slope b and the
    intercept a + b·c. `meta` (method, target, guide, batch_size, device, ...) is kept on the
    returned CostModel.
    """
    ks, ts = _points(steps, seconds_per_image)
    validate.number("c", c, min=0)
    n = len(ks)
    mean_k, mean_t = sum(ks) / n, sum(ts) / n
    sxx = sum((k - mean_k) ** 2 for k in ks)
    b = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts)) / sxx
    a = mean_t - b * (mean_k + c)
    return CostModel(a=a, b=b, c=float(c), steps=ks, seconds=ts, note="fitted", meta=dict(meta))


def extrapolate(model: CostModel, method: str, *, measured_macs: tuple[float, float],
                target_macs: float, guide_macs: float | None = None) -> CostModel:
    """Carry `model` (fitted on a pair with forward MACs `measured_macs` = (target, guide)) to a
    pair with `target_macs` / `guide_macs`: b scales with the target's MAC ratio, c is recomputed by
    `outer_steps`, a (per-image overhead) is kept. An extrapolation: assumes the same MACs per
    second on the same device. Chapter 9.
    """
    if not isinstance(model, CostModel):
        raise TypeError(f"model must be a CostModel (from fit); got {type(model).__name__}")
    if not isinstance(measured_macs, (tuple, list)) or len(measured_macs) != 2:
        raise ValueError("measured_macs must be a pair (target MACs, guide MACs); got "
                         f"{measured_macs!r}")
    f0, g0 = measured_macs
    validate.number("measured_macs[0]", f0, min=0, min_open=True)
    validate.number("measured_macs[1]", g0, min=0, min_open=True)
    validate.number("target_macs", target_macs, min=0, min_open=True)
    c = outer_steps(method, target_macs, guide_macs)
    return replace(model, b=model.b * target_macs / f0, c=c, steps=(), seconds=(),
                   note=f"extrapolated ×{target_macs / f0:.3g} target MACs",
                   meta={**model.meta, "method": method})


def epoch_time(model: CostModel, *, steps: float, images: int) -> float:
    """Predicted seconds of one training epoch over `images` images with K = `steps`. Chapter 9."""
    if not isinstance(model, CostModel):
        raise TypeError(f"model must be a CostModel (from fit); got {type(model).__name__}")
    validate.number("images", images, min=1, integer=True)
    return images * model.seconds_per_image(steps)


def run_time(model: CostModel, *, steps: float, images: int, epochs: int) -> float:
    """Predicted seconds of a training run: `epochs` epochs of `images` images with K = `steps`.
    Chapter 9."""
    validate.number("epochs", epochs, min=1, integer=True)
    return epochs * epoch_time(model, steps=steps, images=images)
