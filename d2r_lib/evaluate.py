"""Robust evaluation with the official protocol, result tables and sanity checks. Introduced in
chapter 8.

Defaults follow the official evaluation script (`auto_attack_eval1.py`): L∞, ε = 8/255, eval mode,
one restart, uniform random start. PGD-20 / CW-20 take 20 steps of size ε/4 (= 2/255 at ε = 8/255)
with the per-example early stop; FGSM is `attacks.fgsm`; AutoAttack is the authors' code (PyPI
`pyautoattack`). Accuracies are fractions in [0, 1]. Every function runs the model in eval mode and
restores each module's mode; `evaluate` seeds torch with `seed` and leaves the global RNG state as
it found it.

Sanity checks (`sanity_checks`, run by `evaluate`) warn with `RobustnessWarning` when the numbers
look like a broken evaluation: attack ordering violated, PGD at ε = 0.5 not near 0 (gradient
masking), the model returns probabilities, or the model was left in train mode. `transfer_check`
compares a transfer attack with the white-box one.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from . import attacks as _attacks
from . import checkpoint, validate

__all__ = [
    "ATTACKS", "DEFAULT_ATTACKS", "DISPLAY_NAMES", "AUTOATTACK_ATTACKS", "AUTOATTACK_VERSIONS",
    "PGD_STEPS", "LARGE_EPS", "LARGE_EPS_MAX_ACCURACY", "RobustnessWarning", "accuracy",
    "robust_accuracy", "correct", "evaluate", "sanity_checks", "TransferResult", "transfer_check",
    "eps_sweep", "ResultsTable", "evaluate_many",
]

ATTACKS = ("clean", "fgsm", "pgd20", "cw20", "autoattack")
"""Attack names accepted by `robust_accuracy`, `evaluate` and `evaluate_many`."""

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20")

DISPLAY_NAMES = {"clean": "Clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw20": "CW-20",
                 "autoattack": "AutoAttack"}

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AUTOATTACK_VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),  # the official L∞ "standard" version
    # CPU profile: the two APGD attacks (usually within a few tenths of a % of standard)
    "fast": ("apgd-ce", "apgd-t"),
    "apgd-ce": ("apgd-ce",),  # one APGD-CE run (100 iterations): a smoke test
}
"""`autoattack_version`: a name above, or a sequence of pyautoattack attack names (run as
version="custom" with the standard version's settings: 1 restart, 100 iterations, 9 target classes,
5000 Square queries)."""

PGD_STEPS = 20
LARGE_EPS = 0.5
LARGE_EPS_MAX_ACCURACY = 0.05


class RobustnessWarning(validate.D2RWarning):
    """A robustness evaluation looks unreliable (see `sanity_checks`)."""


# ------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch with `seed` inside; restore the CPU (and CUDA) global RNG states on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _any_training(model: nn.Module) -> bool:
    return any(m.training for m in model.modules())


def _check_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}")
    return model


def _check_data(model: nn.Module, x, y, name: str = "model") -> int:
    """Validate x (images in [0, 1]) and y (labels matching x and the model's classes); return
    #classes."""
    _check_model(model, name)
    validate.images(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError("y must be an integer torch.Tensor of class indices; got "
                        f"{type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape (batch,); got {tuple(y.shape)}")
    validate.same_batch(x=x, y=y)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one image; got an empty batch")
    with _attacks.eval_mode(model), torch.no_grad():
        out = model(x[:1])
    validate.logits(out, f"{name}(x)")
    _check_finite_logits(out, name)
    validate.labels(y, out.shape[1], x.shape[0])
    return out.shape[1]


def _check_finite_logits(logits: torch.Tensor, name: str = "model") -> None:
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} returns NaN or infinite logits on clean images (diverged "
                         "weights?): refusing to evaluate it; retrain, or load an earlier "
                         "checkpoint")


def _check_batch_and_seed(batch_size, seed=0) -> None:
    validate.number("batch_size", batch_size, min=1, integer=True)
    validate.number("seed", seed, integer=True)


def _check_attacks(attacks) -> tuple[str, ...]:
    if isinstance(attacks, str):
        attacks = (attacks,)
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError(f"attacks must name at least one of {', '.join(map(repr, ATTACKS))}")
    for a in attacks:
        validate.choice("attack", a, ATTACKS)
    return tuple(dict.fromkeys(attacks))  # drop duplicates, keep order


def _autoattack_list(version) -> tuple[str, ...]:
    if isinstance(version, str):
        validate.choice("autoattack_version", version, AUTOATTACK_VERSIONS)
        return AUTOATTACK_VERSIONS[version]
    names = tuple(version)
    if not names:
        raise ValueError("autoattack_version must be 'standard', 'fast', 'apgd-ce' or a non-empty "
                         "sequence of attack names from "
                         f"{', '.join(map(repr, AUTOATTACK_ATTACKS))}")
    for a in names:
        validate.choice("autoattack_version entry", a, AUTOATTACK_ATTACKS)
    return names


def _import_autoattack():
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise ImportError(
            "attack 'autoattack' needs the authors' AutoAttack, packaged on PyPI as pyautoattack: "
            "pip install pyautoattack  (or: pip install 'd2r_lib[autoattack]')"
        ) from err
    return AutoAttack


def _check_differentiable(model: nn.Module, x: torch.Tensor) -> None:
    """Gradient attacks need model(x) to depend on x through autograd; say so clearly if it does
    not."""
    x0 = x[:1].detach().clone().requires_grad_(True)
    with _attacks.eval_mode(model), torch.enable_grad():
        out = model(x0)
    if not out.requires_grad:
        raise ValueError(
            "model(x) has no gradient with respect to x (a torch.no_grad() or detach inside "
            "forward?): gradient attacks cannot run. This is gradient masking; evaluate with a "
            "differentiable forward")


class _LogitsModel(nn.Module):
    """What AutoAttack sees: the wrapped model's logits (the caller keeps the model in eval
    mode)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        validate.logits(out, "model(x)")
        return out


def _craft(attack: str, source: nn.Module, x, y, eps: float, *, stop_on_success: bool = True):
    step = eps / 4  # = 2/255 at ε = 8/255, the official step
    if attack == "fgsm":
        return _attacks.fgsm(source, x, y, eps=eps)
    objective = {"pgd20": "ce", "cw20": "cw"}[attack]
    return _attacks.pgd(source, x, y, eps=eps, step_size=step, steps=PGD_STEPS, objective=objective,
                        start="uniform", stop_on_success=stop_on_success)


def _count_correct(model, x, y, *, clean: bool = False) -> int:
    with torch.no_grad():
        logits = model(x)
    if clean:
        _check_finite_logits(logits)
    return int((logits.argmax(1) == y).sum().item())


def _autoattack_accuracy(model, x, y, eps, batch_size, seed, version, num_classes) -> float:
    AutoAttack = _import_autoattack()
    names = _autoattack_list(version)
    wrapped = _LogitsModel(model)
    if version == "standard":
        adversary = AutoAttack(wrapped, norm="Linf", eps=eps, version="standard", seed=seed,
                               device=x.device)
    else:  # custom: the standard version's settings, restricted to `names`
        adversary = AutoAttack(wrapped, norm="Linf", eps=eps, version="custom",
                               attacks=list(names), seed=seed,
                               device=x.device)
        targets = min(9, num_classes - 1)
        adversary.apgd.n_restarts = 1
        adversary.apgd_targeted.n_restarts = 1
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_restarts = 1
        adversary.fab.n_target_classes = targets
        adversary.square.n_queries = 5000
    # pyautoattack's dynamic-defence check calls sys.settrace(None): keep coverage / debuggers
    tracer = sys.gettrace()
    try:
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        sys.settrace(tracer)
    return (y_adv.to(y.device) == y).float().mean().item()


# ----------------------------------------------------------------------------------------- accuracy
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> float:
    """Clean accuracy (fraction) in eval mode, batched, without gradients; modes are restored.
    A model with non-finite clean logits is refused."""
    _check_batch_and_seed(batch_size)
    _check_data(model, x, y)
    return _accuracy(model, x, y, batch_size)


def _accuracy(model, x, y, batch_size) -> float:
    correct = 0
    with _attacks.eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            correct += _count_correct(model, x[i:i + batch_size], y[i:i + batch_size], clean=True)
    return correct / x.shape[0]


def _check_attack_args(model, x, y, attacks, eps, batch_size, seed, autoattack_version) -> int:
    """The one validation of a public entry point (one forward pass of one image); returns
    #classes."""
    attacks = _check_attacks(attacks)
    validate.eps(eps, norm="linf")
    _check_batch_and_seed(batch_size, seed)
    if "autoattack" in attacks:
        _autoattack_list(autoattack_version)
    num_classes = _check_data(model, x, y)
    if eps > 0 and any(a in ("fgsm", "pgd20", "cw20") for a in attacks):
        _check_differentiable(model, x)
    return num_classes


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, *,
                    eps: float = 8 / 255, batch_size: int = 256, seed: int = 0,
                    autoattack_version="standard") -> float:
    """Accuracy (fraction) under one attack of ATTACKS at L∞ radius eps; seeded, RNG state restored.

    pgd20 / cw20: 20 steps of ε/4 from a uniform start with per-example early stop; fgsm: one step
    of ε; autoattack: pyautoattack with `autoattack_version` (see AUTOATTACK_VERSIONS). eps = 0
    gives clean accuracy.
    """
    validate.choice("attack", attack, ATTACKS)
    num_classes = _check_attack_args(model, x, y, (attack,), eps, batch_size, seed,
                                     autoattack_version)
    return _robust_accuracy(model, x, y, attack, eps, batch_size, seed, autoattack_version,
                            num_classes)


def _robust_accuracy(model, x, y, attack, eps, batch_size, seed, autoattack_version,
                     num_classes) -> float:
    if attack == "clean" or eps == 0:
        return _accuracy(model, x, y, batch_size)
    x, y = x.detach(), y.detach()
    with _seeded(seed), _attacks.eval_mode(model):
        if attack == "autoattack":
            return _autoattack_accuracy(model, x, y, eps, batch_size, seed, autoattack_version,
                                        num_classes)
    return int(_correct(model, x, y, attack, eps, batch_size, seed).sum().item()) / x.shape[0]


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "clean", *,
            eps: float = 8 / 255, batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """Per-image correctness (a bool tensor, one entry per image) under "clean", "fgsm", "pgd20" or
    "cw20", with the seeding and batches of `robust_accuracy`: its mean is that accuracy. Two
    models' masks on the same images give a paired comparison (`report.paired`). Chapter 2."""
    validate.choice("attack", attack, ("clean", "fgsm", "pgd20", "cw20"))
    _check_attack_args(model, x, y, (attack,), eps, batch_size, seed, "standard")
    return _correct(model, x.detach(), y.detach(), attack, eps, batch_size, seed)


def _correct(model, x, y, attack, eps, batch_size, seed) -> torch.Tensor:
    clean = attack == "clean" or eps == 0
    parts = []
    with _seeded(seed), _attacks.eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if not clean:
                xb = _craft(attack, model, xb, yb, eps)
            with torch.no_grad():
                logits = model(xb)
            if clean:
                _check_finite_logits(logits)
            parts.append(logits.argmax(1) == yb)
    return torch.cat(parts)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             attacks: Sequence[str] = DEFAULT_ATTACKS, *, eps: float = 8 / 255,
             batch_size: int = 256, seed: int = 0, autoattack_version="standard",
             sanity: bool = True, sanity_images: int = 64) -> dict[str, float]:
    """Accuracy under each of `attacks` (fractions, keyed by attack name), official protocol by
    default.

    Every attack is seeded with `seed` (same numbers as `robust_accuracy`); the global RNG state and
    every module's mode are restored. sanity=True runs `sanity_checks` (the ε = 0.5 check on ≤
    sanity_images images). Arguments are checked once, here; a model with non-finite clean logits is
    refused.
    """
    attacks = _check_attacks(attacks)
    validate.number("sanity_images", sanity_images, min=1, integer=True)
    num_classes = _check_attack_args(model, x, y, attacks + (("pgd20",) if sanity else ()), eps,
                                     batch_size,
                                     seed, autoattack_version)
    was_training = _any_training(model)
    results = {}
    with _seeded(seed), _attacks.eval_mode(model):
        for attack in attacks:
            results[attack] = _robust_accuracy(model, x, y, attack, eps, batch_size, seed,
                                               autoattack_version,
                                               num_classes)
        if sanity:
            _sanity_checks(model, x, y, results, was_training, LARGE_EPS, sanity_images,
                           batch_size, seed,
                           stacklevel=3)
    return results


# ------------------------------------------------------------------------------------ sanity checks
_ORDER = (  # (a, b, why): accuracy under a must not exceed accuracy under b
    ("autoattack", "pgd20",
     "AutoAttack must be at least as strong as PGD-20 (same ε? same images? eval mode? "
                            "a randomized model?)"),
    ("pgd20", "fgsm",
     "20 PGD steps should beat one FGSM step; a weaker multi-step attack suggests gradient "
                      "masking"),
    ("autoattack", "clean", "an attack cannot raise accuracy: attack bug or a randomized model"),
    ("pgd20", "clean", "an attack cannot raise accuracy: attack bug or gradient masking"),
    ("cw20", "clean", "an attack cannot raise accuracy: attack bug or gradient masking"),
    ("fgsm", "clean", "an attack cannot raise accuracy: attack bug or gradient masking"),
)


def _warn(problems: list[str], message: str, stacklevel: int) -> None:
    problems.append(message)
    warnings.warn(message, RobustnessWarning, stacklevel=stacklevel + 1)


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, results: Mapping[str, float],
                  *, was_training: bool | None = None, large_eps: float | None = LARGE_EPS,
                  max_images: int = 64, batch_size: int = 256, seed: int = 0,
                  stacklevel: int = 2) -> list[str]:
    """Check `results` (attack → accuracy on x) and the model; warn RobustnessWarning for each
    problem found.

    1. ordering: AutoAttack ≤ PGD-20 ≤ FGSM, and every attack ≤ clean (tolerance: one example of x);
    2. PGD-20 at large_eps (L∞, default 0.5) on ≤ max_images images must be ≤ 5 % (large_eps=None
    skips it);
    3. model(x) must be logits, not probabilities;
    4. the model was in train mode (was_training; None = look at the model now): evaluation used
    eval mode. Returns the warning messages (empty when all is well).
    """
    _check_data(model, x, y)
    validate.number("max_images", max_images, min=1, integer=True)
    if large_eps is not None:
        validate.eps(large_eps, "large_eps")
    _check_batch_and_seed(batch_size, seed)
    return _sanity_checks(model, x, y, results, was_training, large_eps, max_images, batch_size,
                          seed,
                          stacklevel)


def _sanity_checks(model, x, y, results, was_training, large_eps, max_images, batch_size, seed,
                   stacklevel) -> list[str]:
    problems: list[str] = []
    n = x.shape[0]
    tol = 1.0 / n + 1e-9
    for a, b, why in _ORDER:
        if a in results and b in results and results[a] > results[b] + tol:
            _warn(problems, f"ordering violated: {DISPLAY_NAMES[a]} accuracy {results[a]:.2%} > "
                            f"{DISPLAY_NAMES[b]} accuracy {results[b]:.2%} (tolerance: one of {n} "
                            f"images); {why}", stacklevel)

    if was_training is None:
        was_training = _any_training(model)
    if was_training:
        _warn(problems,
              "model was in train mode: evaluation switched it to eval mode (BatchNorm running "
              "statistics, no dropout) and restored train mode afterwards; call model.eval() "
              "yourself when you evaluate", stacklevel)

    xs, ys = x[:max_images], y[:max_images]
    with _attacks.eval_mode(model), torch.no_grad():
        out = model(xs)
    sums = out.sum(1)
    if ((out >= 0) & (out <= 1)).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        _warn(problems,
              "model returns probabilities (rows in [0, 1] summing to 1), not logits: CE/CW "
              "attacks and AutoAttack then see flattened gradients and overestimate robustness; "
              "remove the softmax", stacklevel)

    if large_eps is not None:
        acc = _robust_accuracy(model, xs, ys, "pgd20", large_eps, batch_size, seed, None, None)
        if acc > LARGE_EPS_MAX_ACCURACY:
            _warn(problems,
                  f"gradient masking suspected: PGD-20 accuracy at eps={large_eps:g} (L-inf) is "
                  f"{acc:.2%} on {xs.shape[0]} images; an attack this large should reach ~0 % "
                  f"(≤ {LARGE_EPS_MAX_ACCURACY:.0%})", stacklevel)
    return problems


class TransferResult(NamedTuple):
    whitebox: float
    transfer: float
    problems: list


def transfer_check(source_model: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   eps: float = 8 / 255, *, whitebox: float | None = None, batch_size: int = 256,
                   seed: int = 0, tolerance: float | None = None) -> TransferResult:
    """Sanity check 5: PGD-20 crafted on `source_model` (all 20 steps, no early stop) and evaluated
    on `model` must not beat white-box PGD-20 on `model` by more than `tolerance` (default: one
    example).

    `whitebox` reuses a known white-box PGD-20 accuracy. Warns RobustnessWarning when the transfer
    is stronger.
    """
    validate.eps(eps, norm="linf")
    _check_batch_and_seed(batch_size, seed)
    _check_data(source_model, x, y, "source_model")
    _check_data(model, x, y)
    if eps > 0:
        _check_differentiable(source_model, x)
        if whitebox is None:
            _check_differentiable(model, x)
    if tolerance is None:
        tol = 1.0 / x.shape[0] + 1e-9
    else:
        tol = validate.number("tolerance", tolerance, min=0)
    if whitebox is None:
        whitebox = _robust_accuracy(model, x, y, "pgd20", eps, batch_size, seed, None, None)
    else:
        validate.number("whitebox", whitebox, min=0, max=1)
    x, y = x.detach(), y.detach()
    correct = 0
    with _seeded(seed), _attacks.eval_mode(source_model, model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = _craft("pgd20", source_model, xb, yb, eps, stop_on_success=False)
            correct += _count_correct(model, x_adv, yb)
    transfer = correct / x.shape[0]
    problems: list[str] = []
    if transfer < whitebox - tol:
        _warn(problems,
              f"transfer attack beats white-box: PGD-20 crafted on the source model leaves "
              f"{transfer:.2%} accuracy, white-box PGD-20 {whitebox:.2%}; the white-box "
              "gradients are uninformative (gradient masking suspected)", 2)
    return TransferResult(whitebox, transfer, problems)


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_values: Iterable[float], *,
              attack: str = "pgd20", batch_size: int = 256, seed: int = 0,
              autoattack_version="standard") -> list[tuple[float, float]]:
    """[(ε, accuracy under `attack` at ε)] for each ε (same numbers as `robust_accuracy`)."""
    validate.choice("attack", attack, ATTACKS)
    eps_values = list(eps_values)
    if not eps_values:
        raise ValueError("eps_values must hold at least one radius")
    for e in eps_values:
        validate.eps(e, "eps_values entry")
    num_classes = _check_attack_args(model, x, y, (attack,), max(eps_values), batch_size, seed,
                                     autoattack_version)
    return [(float(e), _robust_accuracy(model, x, y, attack, e, batch_size, seed,
                                        autoattack_version,
                                        num_classes)) for e in eps_values]


# ---------------------------------------------------------------------------------------- the table
def _fmt(value, percent: bool, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits + 2}f}"


class ResultsTable:
    """Accuracies (fractions) by row (model / method name) and column (attack); `meta` holds the
    settings."""

    def __init__(self, rows: Mapping[str, Mapping[str, float]] | None = None, *,
                 meta: Mapping | None = None):
        self.rows: dict[str, dict[str, float]] = {}
        self.meta = dict(meta or {})
        for name, results in (rows or {}).items():
            self.add(name, results)

    def add(self, name: str, results: Mapping[str, float]) -> ResultsTable:
        """Add (or replace) the row `name`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"row name must be a non-empty string; got {name!r}")
        row = {}
        for k, v in results.items():
            validate.number(f"results[{name!r}][{k!r}]", v, min=0, max=1)
            row[str(k)] = float(v)
        self.rows[name] = row
        return self

    @property
    def names(self) -> list[str]:
        return list(self.rows)

    @property
    def columns(self) -> list[str]:
        cols = [a for a in ATTACKS if any(a in r for r in self.rows.values())]
        extra = [k for r in self.rows.values() for k in r if k not in ATTACKS]
        return cols + list(dict.fromkeys(extra))

    def __getitem__(self, name: str) -> dict[str, float]:
        return self.rows[name]

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other) -> bool:
        return isinstance(other, ResultsTable) and self.to_dict() == other.to_dict()

    def _cells(self, percent: bool, digits: int):
        unit = " (%)" if percent else ""
        header = ["model"] + [DISPLAY_NAMES.get(c, c) + unit for c in self.columns]
        body = [[name] + [_fmt(row.get(c), percent, digits) for c in self.columns]
                for name, row in self.rows.items()]
        return header, body

    def to_markdown(self, percent: bool = True, caption: str | None = None, digits: int = 2) -> str:
        """A Markdown table (percentages by default), with an optional caption line above it."""
        header, body = self._cells(percent, digits)
        lines = [] if caption is None else [f"**{caption}**", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        header, body = self._cells(True, 2)
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

        def fmt(r):
            cells = zip(r, widths)
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ResultsTable({len(self.rows)} rows × {len(self.columns)} attacks)\n{self}"

    def to_dict(self) -> dict:
        return {"columns": self.columns, "rows": {k: dict(v) for k, v in self.rows.items()},
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ResultsTable:
        """Inverse of `to_dict`; a plain {name: {attack: accuracy}} mapping is accepted too."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping; got {type(d).__name__}")
        if "rows" in d and isinstance(d["rows"], Mapping):
            return cls(d["rows"], meta=d.get("meta"))
        return cls(d)

    def save_json(self, path) -> Path:
        """Write the table as JSON atomically (`checkpoint.atomic_write`)."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        return checkpoint.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load_json(cls, path) -> ResultsTable:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def evaluate_many(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  attacks: Sequence[str] = DEFAULT_ATTACKS, **kw) -> ResultsTable:
    """`evaluate` each named model on the same (x, y); kw go to `evaluate`. Returns a
    ResultsTable."""
    if not isinstance(models, Mapping):
        raise TypeError(f"models must be a dict {{name: nn.Module}}; got {type(models).__name__}")
    if not models:
        raise ValueError("models must hold at least one {name: nn.Module} entry; got an empty dict")
    for name, model in models.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"models keys must be non-empty strings; got {name!r}")
        _check_model(model, f"models[{name!r}]")
    attacks = _check_attacks(attacks)
    meta = {"eps": kw.get("eps", 8 / 255),
            "n": int(x.shape[0]) if isinstance(x, torch.Tensor) else None,
            "seed": kw.get("seed", 0), "attacks": list(attacks)}
    if "autoattack" in attacks:
        version = kw.get("autoattack_version", "standard")
        meta["autoattack_version"] = version if isinstance(version, str) else list(version)
    table = ResultsTable(meta=meta)
    for name, model in models.items():
        table.add(name, evaluate(model, x, y, attacks, **kw))
    return table
