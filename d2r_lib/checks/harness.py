"""The checks' shared machinery: run a learner's answer on reference inputs, compare, report.

* `sandbox` gives a check its own random state (the notebook's is left alone) and one thread;
  `call_learner` runs the learner's function: an unsolved stub's NotImplementedError passes through,
  any other error becomes a verdict;
* `passed` prints one line starting with ✓; `advise` one starting with 💡 (advice on a correct
  answer, e.g. efficiency: nothing fails); `fail` raises `CheckFailed` naming the mistake;
* reference inputs: images with exact 0/1 pixels, small CNNs whose BatchNorm makes train and eval
  mode differ, prototype classifiers with honest gradients; helpers for modes and BatchNorm.

Losses are compared in `losscheck`, attacks in `attackcheck`; the checks are in `ch01` ... `ch09`
and `steps`. Reference values come from the library; wrong variants live only here.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import evaluate, models, toy

__all__ = ["CheckFailed", "fail", "passed", "pct", "advise", "call_learner", "sandbox", "generator",
           "rand_images", "small_cnn", "mode_flags", "mode_name", "bn_state", "bn_changed",
           "bn_count", "set_mode", "copies", "assert_modes_restored", "modes_advice",
           "library_accuracy", "as_float", "close", "rand_labels", "Prototype", "eval_setup",
           "eval_common", "fraction_verdict", "prediction_verdict", "interval_verdict",
           "paired_diffs", "row_diffs", "PairedPrediction", "grade_prediction", "toy_train",
           "toy_test", "toy_scores"]


class CheckFailed(AssertionError):
    """Your function disagrees with d2r_lib; the message says how (and, when recognised, which
    mistake)."""


# ================================================================================================
# Plumbing
# ================================================================================================
def fail(task: str, message: str):
    raise CheckFailed(f"✗ {task}: {message}")


def passed(task: str, detail: str) -> None:
    print(f"✓ {task}: {detail}")


def pct(frac: float) -> str:
    return f"{100 * frac:.3g} %"


def advise(task: str, message: str) -> None:
    """Advice on a correct answer (efficiency, style): printed, never a failure."""
    print(f"💡 {task}: {message}")


def call_learner(task: str, fn: Callable, *args, **kwargs):
    """Run the learner's function; an unsolved stub's NotImplementedError passes through
    unchanged."""
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - any error of the learner's code becomes a verdict
        raise CheckFailed(f"✗ {task}: your function raised {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def sandbox(task: str, fn):
    """Own random state (the notebook's is left alone), gradients on, one thread (tiny tensors)."""
    if not callable(fn):
        raise TypeError(
            f"{task}: pass your function itself (e.g. check(my_function)), not {type(fn).__name__}"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(g: torch.Generator, b: int, size: int = 16) -> torch.Tensor:
    """Random images in [0, 1] with some pixels exactly 0 or 1 (so a missing clamp shows)."""
    x = torch.rand(b, 3, size, size, generator=g)
    u = torch.rand(b, 3, size, size, generator=g)
    x = torch.where(u < 0.1, torch.zeros_like(x), x)
    return torch.where(u > 0.9, torch.ones_like(x), x)


def small_cnn(num_classes: int = 10, seed: int = 0, width: int = 8) -> nn.Module:
    """A small_cnn (d2r_lib.models.SmallCNN) whose BatchNorm statistics make train and eval mode
    differ."""
    torch.manual_seed(seed)
    m = models.SmallCNN(num_classes, width=width)
    g = generator(seed + 7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(0.2 * (2 * torch.rand(n, generator=g) - 1))
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(0.2 * (2 * torch.rand(n, generator=g) - 1))
    return m


def mode_flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def mode_name(flags: list[bool]) -> str:
    return "train" if all(flags) else "eval" if not any(flags) else "a mix of train and eval"


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in model.named_buffers()]


def bn_changed(before, model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, bn_state(model)))


def bn_count(model: nn.Module) -> int:
    """Training-mode forward passes seen by the model (its first BatchNorm's
    num_batches_tracked)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return int(m.num_batches_tracked)
    return 0


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    model.train(mode == "train")
    return model


def copies(base: dict, mode: str) -> dict:
    return {k: set_mode(copy.deepcopy(m), mode) for k, m in base.items()}


def assert_modes_restored(task: str, before: dict, mods: dict) -> None:
    for role, model in mods.items():
        now = mode_flags(model)
        if now != before[role]:
            fail(task, f"your function left the {role} in {mode_name(now)} mode, but it came in {mode_name(before[role])} mode: restore it (`with attacks.eval_mode({role}):` restores every module's mode when the block ends)")


def modes_advice(before: dict, mods: dict) -> list[str]:
    """Advice, not a failure: an attack left a model's mode changed, as the official code does."""
    out = []
    for role, model in mods.items():
        now = mode_flags(model)
        if now != before[role]:
            out.append(f"your attack left the {role} in {mode_name(now)} mode (it came in {mode_name(before[role])} mode). The official code does the same and relies on the training loop's model.train(); `with attacks.eval_mode({role}):` restores the caller's mode for you")
    return out


def library_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The library's clean accuracy (d2r_lib.evaluate.accuracy: eval mode, no graph, modes
    restored)."""
    from ..evaluate import accuracy

    return accuracy(model, x, y)


def as_float(task: str, value, what: str = "the accuracy") -> float:
    if isinstance(value, bool) or value is None:
        fail(task, f"your function returned {value!r}; return {what} as a Python float")
    if isinstance(value, torch.Tensor):
        fail(task, f"your function returned a tensor ({tuple(value.shape)}); return {what} as a Python float (use .item())")
    try:
        out = float(value)
    except (TypeError, ValueError):
        fail(
            task, f"your function returned {type(value).__name__}; return {what} as a Python float"
        )
    if not math.isfinite(out):
        fail(task, f"your function returned {out}; expected a finite number")
    return out


def close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def rand_labels(g: torch.Generator, b: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=g)


class Prototype(nn.Module):
    """A linear nearest-prototype classifier: logits_c = ⟨x, μ_c⟩ − ‖μ_c‖²/2 (honest gradients)."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", prototypes.flatten(1).clone())

    def forward(self, x):
        return x.flatten(1) @ self.mu.T - 0.5 * (self.mu**2).sum(1)


def eval_setup(seed: int, b: int, c: int = 10, contrast: float = 0.04):
    """BatchNorm (identity in eval mode) + a nearest-prototype classifier, images near the
    prototypes and
    labels 15 % wrong: honest gradients, clean accuracy ≈ 85 %, and FGSM/PGD at ε = 0.05 change
    it."""
    g = generator(seed)
    proto = (0.5 + contrast * torch.randn(c, 3, 8, 8, generator=g)).clamp(0, 1)
    y = torch.randint(0, c, (b,), generator=g)
    x = (proto[y] + 0.02 * torch.randn(b, 3, 8, 8, generator=g)).clamp(0, 1)
    model = nn.Sequential(nn.BatchNorm2d(3), Prototype(proto))
    flip = torch.rand(b, generator=g) < 0.15
    return model, x, torch.where(flip, (y + 1) % c, y)


def eval_common(task, fn_call, model, mode):
    """Call the learner on a copy of `model` in `mode`; check the mode is restored and BatchNorm
    untouched."""
    mods = copies({"model": model}, mode)
    modes, bn = {"model": mode_flags(mods["model"])}, bn_state(mods["model"])
    out = fn_call(mods["model"])
    assert_modes_restored(task, modes, mods)
    if bn_changed(bn, mods["model"]):
        fail(task, "the model ran in train mode: BatchNorm used the batch's statistics and updated its running averages; evaluate in eval mode (`with attacks.eval_mode(model):`)")
    return out


def fraction_verdict(task, got, want, *, clean=None, what="accuracy"):
    if close(got, want, 0, 1e-6):
        return
    if close(got, 100 * want, 0, 1e-4):
        fail(task, f"you returned a percentage ({got:.4g}); return the {what} as a fraction in [0, 1]")
    if close(got, 1 - want, 0, 1e-6):
        fail(task, f"you returned the error rate (1 − {what}): {got:.4g} instead of {want:.4g}")
    if clean is not None and close(got, clean, 0, 1e-6) and not close(clean, want, 0, 1e-6):
        fail(task, f"you measured the clean accuracy ({clean:.4g}); the {what} is measured on the attacked images x′")


def prediction_verdict(task: str, predicted, allowed: tuple, measured, why: str) -> None:
    """Predict-then-run: a right prediction passes with its explanation, a wrong one fails."""
    if isinstance(predicted, bool) or predicted not in allowed:
        fail(task, f"set your prediction to one of {', '.join(map(repr, allowed))} before running; got {predicted!r}")
    if predicted != measured:
        fail(task, f"you predicted {predicted!r}; the run gives {measured!r}: {why}")
    passed(task, f"you predicted {predicted!r}: right — {why}")


def interval_verdict(task: str, predicted, allowed: tuple, diffs: list[float], labels: tuple,
                     why: str) -> str:
    """Grade a predicted sign against per-seed differences: labels = (name if the 95 % interval is
    above 0, name if below). An interval containing 0 is "undecided": it grades nothing."""
    from .. import reference

    if isinstance(predicted, bool) or predicted not in allowed:
        fail(task, f"set your prediction to one of {', '.join(map(repr, allowed))} before running; got {predicted!r}")
    row = reference.interval(diffs)
    if len(diffs) < 2:
        fail(task, f"the run has {len(diffs)} paired seed(s); an interval needs at least 2")
    span = f"mean {row['mean']:+.3f}, 95 % interval [{row['low']:+.3f}, {row['high']:+.3f}]"
    measured = labels[0] if row["low"] > 0 else labels[1] if row["high"] < 0 else "undecided"
    if measured == "undecided":
        passed(task, f"undecided: {span} contains 0, so these seeds neither confirm nor refute {predicted!r}; run more seeds to decide ({why})")
    else:
        prediction_verdict(task, predicted, allowed, measured, f"{span}; {why}")
    return measured


def paired_diffs(task: str, runs, a: str, b: str, metric: str) -> list[float]:
    """Per-seed differences a − b of `metric` in `runs` (the list `toy.compare` returns)."""
    ok = isinstance(runs, (list, tuple)) and all(
        isinstance(r, dict) and {"method", "seed", "metrics"} <= set(r) for r in runs)
    if not ok:
        fail(task, f"pass the list that toy.compare([{a!r}, {b!r}], seeds) returned; got {type(runs).__name__}")
    by = {(r["method"], r["seed"]): r["metrics"] for r in runs}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    if len(seeds) < 2:
        fail(task, f"the runs hold {len(seeds)} seed(s) with both {a!r} and {b!r}; run at least 2")
    if metric not in by[(a, seeds[0])]:
        fail(task, f"the runs have no {metric!r} metric; use toy.compare")
    return [by[(a, s)][metric] - by[(b, s)][metric] for s in seeds]


def row_diffs(task: str, rows, a: str, b: str) -> list[float]:
    """Per-row differences rows[i][a] − rows[i][b] (one row per seed, or per image)."""
    try:
        return [float(r[a]) - float(r[b]) for r in rows]
    except (TypeError, KeyError, ValueError):
        fail(task, f"rows must be the list of dicts with the keys {a!r} and {b!r} that the cell above builds")



@dataclass(frozen=True)
class PairedPrediction:
    """A predict-then-run task graded on the learner's own runs: the differences a − b per seed
    (or per image) decide between labels[0] (a − b > 0) and labels[1] (< 0)."""
    task: str
    a: str
    b: str
    labels: tuple
    why: str  # the explanation shown with the verdict; {n} is the number of pairs
    metric: str | None = None  # set: the data are `toy.compare` runs; None: rows of dicts


def grade_prediction(spec: PairedPrediction, predicted, data):
    """Grade `predicted` against the interval of the paired differences in `data`."""
    if spec.metric is None:
        diffs = row_diffs(spec.task, data, spec.a, spec.b)
    else:
        diffs = paired_diffs(spec.task, data, spec.a, spec.b, spec.metric)
    why = spec.why.replace("{n}", str(len(diffs)))
    return interval_verdict(spec.task, predicted, spec.labels, diffs, spec.labels, why)

# ================================================================================================
# The 2-D world of `d2r_lib.toy`, in the checks' short setting
# ================================================================================================
TOY_NOISE = 0.05
"""The checks' moons: 600 training points and 500 test points (seed 999) with noise 0.05."""


def toy_train(method, *, seed: int = 0, **kw) -> toy.ToyRun:
    """`toy.train` on 600 moons points: 15 epochs, batches of 200, constant learning rate."""
    kw = {"epochs": 15, "batch_size": 200, "schedule": "constant", **kw}
    return toy.train(method, seed=seed, data=toy.make_data(600, seed=seed, noise=TOY_NOISE), **kw)


def toy_test() -> tuple[torch.Tensor, torch.Tensor]:
    return toy.make_data(500, seed=999, noise=TOY_NOISE)


def toy_scores(model: nn.Module, eps: float, seed: int = 0) -> tuple[float, float]:
    """(clean, PGD-20) accuracy of `model` on `toy_test()`."""
    x, y = toy_test()
    return evaluate.accuracy(model, x, y), toy.pgd_accuracy(model, x, y, eps, seed=seed)
