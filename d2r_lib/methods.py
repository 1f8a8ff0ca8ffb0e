"""The registry of training methods and the one training step they all share. Chapter 2 onwards.

A `Method` is data: how it makes x′ (`attack`, a callable of kind `attack_kind`), which train-mode
forward passes its step makes, in order (`passes`), and the loss it takes of their logits (`loss`, a
callable). `train_step` runs the attack with the models in eval mode, then the passes in train mode,
then the loss, then one step of a single SGD optimizer over target and guide parameters (as the
official D2R code does). It is the only code in the library that backpropagates a training loss and
steps an optimizer.

Adding a method is one `register(Method(...))` call (see CONTRIBUTING.md).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import attacks, fast, losses, validate

__all__ = [
    "ATTACK_KINDS", "PASS_MODELS", "PASS_INPUTS", "BUDGET", "REFERENCE_PASSES", "Pass", "Param",
    "PARAMS", "SETTING_NAMES", "Method",
    "METHODS", "register", "unregister", "get_method", "make_adversarial", "compute_terms",
    "make_optimizer", "check_step", "step", "train_step",
]

ATTACK_KINDS = ("none", "pgd", "trades", "cag")
"""none: no x′; pgd: ascent on a label loss of the target; trades: ascent on KL(p_f(x) ‖ p_f(x′))
with the target alone; cag: D2R's collaborative generation, ascent on KL(p_g(x) ‖ p_f(x′))."""
PASS_MODELS = ("target", "guide")
PASS_INPUTS = ("x", "x_adv")
BUDGET = ("eps", "step_size", "steps")
"""The attack's parameters, passed to `Method.attack`; every other one goes to `Method.loss`."""
REFERENCE_PASSES = {"none": (), "pgd": (), "trades": ("target",), "cag": ("guide",)}
"""Gradient-free eval-mode passes on x that an attack of each kind makes once: TRADES p_f(x),
CAG p_g(x)."""

_ATTACK_TEXT = {
    "none": "no attack",
    "pgd": "x′ by projected gradient ascent on a label loss of the target (eval mode)",
    "trades": "x′ by ascent on KL(p_f(x) ‖ p_f(x′)) with the target alone (TRADES generation)",
    "cag": "x′ by collaborative generation (CAG): ascent on KL(p_g(x) ‖ p_f(x′)), both models in "
           "eval mode",
}


@dataclass(frozen=True)
class Pass:
    """One train-mode forward pass of a step: `model` ("target" | "guide") on `input` ("x" or
    "x_adv")."""
    model: str
    input: str

    def __post_init__(self):
        validate.choice("Pass model", self.model, PASS_MODELS)
        validate.choice("Pass input", self.input, PASS_INPUTS)

    def __str__(self) -> str:
        return f"{'f' if self.model == 'target' else 'g'}({'x' if self.input == 'x' else 'x′'})"


F_X, F_XADV, G_X = Pass("target", "x"), Pass("target", "x_adv"), Pass("guide", "x")


@dataclass(frozen=True)
class Param:
    """One method parameter, declared once: its type (`kind`: float, int, bool or str), default,
    allowed range (or `choices`) and one line of help. `d2r train`'s flag, the runner's range and
    every check (`Method.resolve`) derive from it. `note` says why the upper bound holds; the error
    for a value above it quotes it."""
    kind: type
    default: object
    help: str = ""
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    choices: tuple | None = None
    note: str = ""

    def check(self, name: str, value):
        """`value` if it fits, else a TypeError / ValueError naming `name` and what is allowed."""
        if self.kind is bool:
            return validate.flag(name, value)
        if self.choices is not None:
            return validate.choice(name, value, self.choices)
        if self.kind is str:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string; got {value!r}")
            return value
        validate.number(name, value, min=self.min, min_open=self.min_open,
                        integer=self.kind is int)
        if self.max is not None and value > self.max:
            why = f": {self.note}" if self.note else ""
            raise ValueError(f"{name} must be <= {self.max}{why}; got {value!r}")
        return value

    def allowed(self) -> str:
        """What the check accepts, in words ("a number > 0 and <= 1")."""
        if self.kind is bool:
            return "True or False"
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.kind is str:
            return "a string"
        bounds = ([f"{'>' if self.min_open else '>='} {self.min}"] if self.min is not None else [])
        bounds += [f"<= {self.max}"] if self.max is not None else []
        what = "an integer" if self.kind is int else "a number"
        return what + (" " + " and ".join(bounds) if bounds else "")


PARAMS: dict[str, Param] = {
    "eps": Param(float, 8 / 255, "L∞ radius ε of the training attack", min=0, max=1,
                 min_open=True,
                 note="an L∞ radius on pixels in [0, 1] lies in [0, 1] (e.g. 8/255 ≈ 0.0314)"),
    "step_size": Param(float, 2 / 255, "step α of the training attack", min=0, min_open=True),
    "steps": Param(int, 10, "steps K of the training attack", min=1),
    "beta": Param(float, 6.0, "β, the weight of the KL term (trades, mart, lbgat)", min=0),
    "w_clean": Param(float, 20.0, "D2R's clean-distribution term weight", min=0),
    "w_adv": Param(float, 30.0, "D2R's adversarial-distribution term weight", min=0),
    "kl_reduction": Param(str, "mean", "D2R's KL: mean over batch×classes (official) or "
                          "batchmean", choices=losses.KL_REDUCTIONS),
    "official_passes": Param(bool, True, "make the forward pass the official step makes without "
                             "needing it (off: faster, BatchNorm statistics differ)"),
}
"""The parameters the built-in methods share. A method's plain default for one of these names takes
this declaration with that default; any other plain default gets a declaration from its type (see
`Method`)."""


SETTING_NAMES = frozenset({
    "method", "target_model", "guide_model", "target", "guide", "dataset", "subset", "train_size",
    "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "method_params", "seed",
    "held_out", "augment", "no_augment", "amp", "channels_last", "compile", "fold_batchnorm",
    "profile", "device", "out", "resume", "data_dir", "no_progress", "help"})
"""Names a method parameter cannot take: the settings of `train.TrainConfig` and the options of
`d2r train` (a parameter's flag is `--name`)."""


def _declare(name: str, default) -> Param:
    """The declaration of a parameter given only its default."""
    if isinstance(default, Param):
        return default
    if name in PARAMS:
        return dataclasses.replace(PARAMS[name], default=default)
    kind = next((t for t in (bool, int, float, str) if isinstance(default, t)), object)
    return Param(kind, default, name.replace("_", " "))


@dataclass(frozen=True, eq=False)
class Method:
    """A training method as data. Chapter 2.

    - attack: `attack(target, guide, x, y, *, eps, step_size, steps) -> x′`; None when
      attack_kind is "none". It runs its models in eval mode.
    - loss: `loss(logits, y, **params) -> {"loss": scalar, other terms...}` (or a scalar tensor);
      `logits` is the tuple of outputs of `passes`, in order; params: every default but the budget.
    - passes: the official step's train-mode forward passes, in order (they decide BatchNorm's
      running statistics, so an exact reproduction makes even the redundant ones).
    - defaults: every parameter with its default (eps, step_size, steps for an attack). A plain
      value takes its declaration from `PARAMS` (same name) or from its type; a `Param` is a full
      declaration (type, default, range, help). After construction `defaults` holds the values and
      `params` every declaration: the CLI's flags and every check derive from `params`.
    - fast_passes: only for a method whose official step makes a pass the loss value does not need:
      the passes with `official_passes=False`, a function of the resolved parameters (defaults then
      hold `official_passes: True`).
    """
    name: str
    description: str
    attack_kind: str
    attack: Callable | None
    loss: Callable
    passes: tuple[Pass, ...]
    defaults: dict = field(default_factory=dict)
    chapter: int | None = None
    fast_passes: Callable[[dict], tuple[Pass, ...]] | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        params = dict(self.params)
        for key, value in self.defaults.items():
            if key in params and not isinstance(value, Param):
                params[key] = dataclasses.replace(params[key], default=value)
            else:
                params[key] = _declare(key, value)
        for key, param in params.items():
            if not isinstance(param, Param):
                raise TypeError(f"method {self.name!r}: params[{key!r}] must be a methods.Param; "
                                f"got {type(param).__name__}")
            if param.kind is not object:
                param.check(f"method {self.name!r}: default {key}", param.default)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "defaults", {k: p.default for k, p in params.items()})

    @property
    def uses_guide(self) -> bool:
        """Whether the step trains (and needs) a guide model."""
        return self.attack_kind == "cag" or any(p.model == "guide" for p in self.passes)

    def resolve(self, **overrides) -> dict:
        """Defaults updated by overrides, each checked against its declaration; an unknown or
        invalid parameter raises, naming what is allowed."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(self.params)) or 'none'}")
        for key, value in overrides.items():
            if self.params[key].kind is not object:
                self.params[key].check(key, value)
        return {**self.defaults, **overrides}

    def step_passes(self, params: Mapping) -> tuple[Pass, ...]:
        """The passes one step makes with these (resolved) parameters."""
        if self.fast_passes is not None and not params.get("official_passes", True):
            return tuple(self.fast_passes(params))
        return self.passes

    def describe(self) -> str:
        """One paragraph saying what one training step of this method does. Chapter 2."""
        params = self.defaults
        budget = ", ".join(f"{k} {params[k]:.4g}" for k in BUDGET if k in params)
        attack = _ATTACK_TEXT[self.attack_kind] + (f" ({budget})" if budget else "")
        loss_doc = " ".join((self.loss.__doc__ or self.loss.__name__).split("\n\n")[0].split())
        others = ", ".join(f"{k}={v!r}" for k, v in params.items() if k not in BUDGET) or "none"
        trained = "target and guide" if self.uses_guide else "the target"
        skip = (" (official_passes=False skips the passes the loss value does not need)"
                if self.fast_passes is not None else "")
        return (f"{self.name}: {self.description}. One step: {attack}; then "
                f"{len(self.passes)} train-mode forward pass{'es' if len(self.passes) > 1 else ''} "
                f"{', '.join(map(str, self.passes))}{skip}; loss: {loss_doc}; one SGD step on "
                f"{trained}. Loss parameters: {others}.")


# ----------------------------------------------------------------------------- the built-in methods
def _pgd(target, guide, x, y, *, eps, step_size, steps):
    return attacks.pgd(target, x, y, eps=eps, step_size=step_size, steps=steps, start="uniform")


def _mart_attack(target, guide, x, y, *, eps, step_size, steps):
    return attacks.mart_attack(target, x, y, eps=eps, step_size=step_size, steps=steps)


def _trades_attack(target, guide, x, y, *, eps, step_size, steps):
    return attacks.trades_attack(target, x, eps=eps, step_size=step_size, steps=steps)


def _cag(target, guide, x, y, *, eps, step_size, steps):
    return attacks.cag(target, guide, x, eps=eps, step_size=step_size, steps=steps)


def ce_step(logits, y):
    """CE(f(x), y)"""
    return {"loss": losses.ce_loss(logits[0], y)}


def pgd_at_step(logits, y):
    """CE(f(x′), y)"""
    return {"loss": losses.pgd_at_loss(logits[0], y)}


def trades_step(logits, y, *, beta, official_passes):
    """CE(f(x), y) + β·KL(p_f(x) ‖ p_f(x′)), the KL on the second f(x) as in the official code"""
    if official_passes:
        nat, adv, nat_kl = logits
    else:
        (nat, adv), nat_kl = logits, None
    return losses.trades_terms(nat, adv, y, beta=beta, logits_nat_kl=nat_kl)


def mart_step(logits, y, *, beta):
    """BCE(p_f(x′), y) + β·KL(p_f(x) ‖ p_f(x′))·(1 − p_f(x)_y)"""
    nat, adv = logits
    return losses.mart_terms(nat, adv, y, beta=beta)


def lbgat_step(logits, y, *, beta, official_passes):
    """MSE(f(x′), g(x)) + CE(g(x), y) + β·KL(p_f(x) ‖ p_f(x′))"""
    if official_passes or beta > 0:
        adv, nat, guide = logits
    else:
        (adv, guide), nat = logits, None
    return losses.lbgat_terms(adv, guide, y, beta=beta, logits_nat=nat)


def d2r_step(logits, y, *, w_clean, w_adv, kl_reduction):
    """CE(g(x), y) + MSE(f(x′), g(x)) + w_clean·|K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|
    + w_adv·K̄L(p_f(x′) ‖ p_g(x))"""
    adv, nat, guide = logits
    return losses.d2r_terms(adv, nat, guide, y, w_clean=w_clean, w_adv=w_adv,
                            kl_reduction=kl_reduction)


def _lbgat_fast(params):
    return (F_XADV, F_X, G_X) if params["beta"] > 0 else (F_XADV, G_X)


_KL_BUDGET = {"eps": 0.031, "step_size": 0.007, "steps": 10}
_D2R = {**_KL_BUDGET, "w_clean": 20.0, "w_adv": 30.0, "kl_reduction": "mean"}
_D2R_PASSES = (F_XADV, F_X, G_X)

_BUILTIN = [
    Method("standard", "cross-entropy on clean images, no attack", chapter=1,
           attack_kind="none", attack=None, passes=(F_X,), loss=ce_step),
    Method("pgd_at", "Madry et al.: CE on PGD-10 examples (uniform start, ε 8/255, step 2/255)",
           chapter=2, attack_kind="pgd", attack=_pgd, passes=(F_XADV,), loss=pgd_at_step,
           defaults={"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}),
    Method("trades", "TRADES: CE(f(x)) + β·KL(p_f(x) ‖ p_f(x′)), β = 6", chapter=3,
           attack_kind="trades", attack=_trades_attack, passes=(F_X, F_XADV, F_X),
           loss=trades_step, fast_passes=lambda params: (F_X, F_XADV),
           defaults={**_KL_BUDGET, "beta": 6.0, "official_passes": True}),
    Method("mart", "MART: boosted CE on x′ + β·KL weighted by 1 − p(x)_y, β = 6 (official ε 0.031, "
           "step 0.007, start x + 0.001·N(0, I))", chapter=7,
           attack_kind="pgd", attack=_mart_attack, passes=(F_X, F_XADV), loss=mart_step,
           defaults={**_KL_BUDGET, "beta": 6.0}),
    Method("lbgat", "LBGAT0: CE(g(x)) + MSE(f(x′), g(x)); x′ from the target alone (TRADES "
           "generation)", chapter=4,
           attack_kind="trades", attack=_trades_attack, passes=_D2R_PASSES, loss=lbgat_step,
           fast_passes=_lbgat_fast, defaults={**_KL_BUDGET, "beta": 0.0, "official_passes": True}),
    Method("d2r", "D2R loss with collaborative adversarial generation (CAG), official settings",
           chapter=6, attack_kind="cag", attack=_cag, passes=_D2R_PASSES, loss=d2r_step,
           defaults=dict(_D2R)),
    Method("d2r_no_clean", "ablation: D2R + CAG without the clean-distribution term (w_clean = 0)",
           chapter=7, attack_kind="cag", attack=_cag, passes=_D2R_PASSES, loss=d2r_step,
           defaults={**_D2R, "w_clean": 0.0}),
    Method("d2r_no_adv", "ablation: D2R + CAG without the adversarial-distribution term "
           "(w_adv = 0)", chapter=7, attack_kind="cag", attack=_cag, passes=_D2R_PASSES,
           loss=d2r_step, defaults={**_D2R, "w_adv": 0.0}),
    Method("d2r_trades_gen", "ablation: D2R loss with TRADES/LBGAT generation (target alone) "
           "instead of CAG", chapter=7, attack_kind="trades", attack=_trades_attack,
           passes=_D2R_PASSES, loss=d2r_step, defaults=dict(_D2R)),
]
_BUILTIN_NAMES = frozenset(m.name for m in _BUILTIN)

METHODS: dict[str, Method] = {}
"""Every registered method by name (the built-in ones, then those added with `register`)."""


# -------------------------------------------------------------------------------------- registering
def _as_terms(out, name: str) -> dict:
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, Mapping) or "loss" not in out:
        raise TypeError(f"method {name!r}: loss must return a scalar tensor or a dict of terms "
                        f"with key 'loss'; got {type(out).__name__}")
    return dict(out)


def _check_scalar_terms(terms: dict, name: str) -> None:
    for key, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"method {name!r}: loss term {key!r} must be a scalar (0-dim) float "
                             f"tensor; got {shape}")
    if not terms["loss"].requires_grad:
        raise ValueError(f"method {name!r}: the 'loss' term does not depend on the logits (no "
                         "gradient)")


def _probe_loss(method: Method) -> None:
    """Call the loss once on random logits (4 images, 3 classes; a private generator): it must
    return scalar terms with a gradient."""
    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(4, 3, generator=gen).requires_grad_() for _ in method.passes)
    y = torch.tensor([0, 1, 2, 0])
    params = {k: v for k, v in method.defaults.items() if k not in BUDGET}
    try:
        out = method.loss(logits, y, **params)
    except Exception as err:
        raise ValueError(f"method {method.name!r}: its loss failed on a probe with {len(logits)} "
                         f"random (4, 3) logits (one per pass) and its default parameters: "
                         f"{type(err).__name__}: {err}") from err
    _check_scalar_terms(_as_terms(out, method.name), method.name)


def register(method: Method) -> Method:
    """Add `method` to METHODS after checking it: name, attack kind, passes, defaults, and a probe
    of its loss. Refuses a duplicate name, an unknown attack kind, or a loss that does not return a
    scalar. Chapter 2."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a methods.Method; got {type(method).__name__}")
    name = method.name
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError("method name must be lowercase letters, digits and '_' (e.g. "
                         f"'my_method'); got {name!r}")
    if name in METHODS:
        raise ValueError(f"a method named {name!r} is already registered; choose another name")
    if method.attack_kind not in ATTACK_KINDS:
        raise ValueError(f"method {name!r}: attack_kind must be one of "
                         f"{', '.join(map(repr, ATTACK_KINDS))}; got {method.attack_kind!r}")
    if (method.attack is None) != (method.attack_kind == "none"):
        raise ValueError(f"method {name!r}: attack must be None exactly when attack_kind is 'none'")
    if method.attack is not None and not callable(method.attack):
        raise TypeError(f"method {name!r}: attack must be callable")
    if not callable(method.loss):
        raise TypeError(f"method {name!r}: loss must be callable")
    if (not isinstance(method.passes, tuple) or not method.passes
            or not all(isinstance(p, Pass) for p in method.passes)):
        raise ValueError(f"method {name!r}: passes must be a non-empty tuple of methods.Pass")
    if method.attack_kind == "none" and any(p.input == "x_adv" for p in method.passes):
        raise ValueError(f"method {name!r}: a pass on x_adv needs an attack (attack_kind is "
                         "'none')")
    taken = sorted(SETTING_NAMES & set(method.params))
    if taken:
        raise ValueError(f"method {name!r}: parameter name {', '.join(map(repr, taken))} is a "
                         "training setting (TrainConfig / `d2r train`); choose another name")
    missing = [k for k in BUDGET if method.attack_kind != "none" and k not in method.defaults]
    if missing:
        raise ValueError(f"method {name!r}: defaults must give the attack's {', '.join(missing)}")
    if (method.fast_passes is not None) != (method.defaults.get("official_passes") is True):
        raise ValueError(f"method {name!r}: give fast_passes exactly when defaults hold "
                         "official_passes=True")
    _probe_loss(method)
    METHODS[name] = method
    return method


def unregister(name: str) -> Method:
    """Remove a method added with `register` (the built-in methods stay)."""
    if name in _BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in method and cannot be unregistered")
    added = [n for n in METHODS if n not in _BUILTIN_NAMES]
    if name not in added:
        raise ValueError(f"no method {name!r} was added with register; added: "
                         f"{', '.join(map(repr, added)) or 'none'}")
    return METHODS.pop(name)


for _method in _BUILTIN:
    register(_method)


def get_method(name: str) -> Method:
    """The registered method called `name`; an unknown name raises listing the registered ones."""
    validate.choice("method", name, METHODS)
    return METHODS[name]


# ----------------------------------------------------------------------------------------- the step
def _as_method(method: str | Method) -> Method:
    return method if isinstance(method, Method) else get_method(method)


def _check_guide(method: Method, guide) -> None:
    if method.uses_guide and guide is None:
        raise ValueError(f"method {method.name!r} trains a guide model: pass guide=")


def _plain(model):
    """The module an attack runs: the one inside a DistributedDataParallel wrapper (the attack
    needs no all-reduce), BatchNorm-folded when `fast.configure(fold_batchnorm=True)` (off by
    default: the official step, bit for bit)."""
    return fast.attack_model(model.module if isinstance(model, DistributedDataParallel) else model)


def _attack(m: Method, target, guide, x, y, params: dict):
    if m.attack is None:
        return None
    budget = {k: params[k] for k in BUDGET}
    return m.attack(_plain(target), _plain(guide) if guide is not None else None, x, y, **budget)


def _terms(m: Method, target, guide, x, x_adv, y, params: dict) -> dict[str, torch.Tensor]:
    models = {"target": target, "guide": guide}
    inputs = {"x": x, "x_adv": x_adv}
    logits = tuple(models[p.model](inputs[p.input]) for p in m.step_passes(params))
    loss_params = {k: v for k, v in params.items() if k not in BUDGET}
    return _as_terms(m.loss(logits, y, **loss_params), m.name)


def make_adversarial(method: str | Method, target: nn.Module, guide: nn.Module | None,
                     x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor | None:
    """x′ for this method (None for `standard`); the attack runs in eval mode and restores modes."""
    m = _as_method(method)
    p = m.resolve(**params)
    _check_guide(m, guide)
    return _attack(m, target, guide, x, y, p)


def compute_terms(method: str | Method, target: nn.Module, guide: nn.Module | None, x: torch.Tensor,
                  x_adv: torch.Tensor | None, y: torch.Tensor, **params) -> dict[str, torch.Tensor]:
    """The method's train passes (models as they are) and its loss terms ("loss": the scalar)."""
    m = _as_method(method)
    p = m.resolve(**params)
    _check_guide(m, guide)
    return _terms(m, target, guide, x, x_adv, y, p)


def make_optimizer(target: nn.Module, guide: nn.Module | None = None, *, lr: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 2e-4) -> torch.optim.SGD:
    """One SGD over two parameter groups [target, guide], as the official code (lr 0.1, momentum
    0.9, weight decay 2e-4, no Nesterov)."""
    validate.number("lr", lr, min=0, min_open=True)
    validate.number("momentum", momentum, min=0, max=1)
    validate.number("weight_decay", weight_decay, min=0)
    groups = [{"params": list(target.parameters())}]
    if guide is not None:
        groups.append({"params": list(guide.parameters())})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def check_step(method: str | Method, guide: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
               **params) -> tuple[Method, dict]:
    """The door of `train_step`: the method, its resolved parameters, a guide when it needs one, and
    x (images in [0, 1]) and y of one batch. Returns (method, params) for `step`."""
    m = _as_method(method)
    p = m.resolve(**params)
    _check_guide(m, guide)
    validate.images(x)
    validate.same_batch(x=x, y=y)
    return m, p


def step(m: Method, target: nn.Module, guide: nn.Module | None, optimizer: torch.optim.Optimizer,
         x: torch.Tensor, y: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """The step itself on checked inputs (`check_step`): attack (eval mode), the train-mode passes,
    the loss, one SGD step. No check and no host synchronisation: the terms come back as detached
    tensors on the device (`validate.values_checked`). `fit` calls it once per batch after checking
    its config once."""
    with validate.values_checked():
        x_adv = _attack(m, target, guide, x, y, params)
        for model in [target] + ([guide] if m.uses_guide else []):
            model.train()
        terms = _terms(m, target, guide, x, x_adv, y, params)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


def train_step(method: str | Method, target: nn.Module, guide: nn.Module | None,
               optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               **params) -> dict[str, float]:
    """One full training step of any method: attack (eval mode), the train-mode passes, the loss,
    one SGD step. Chapter 2. Returns every loss term as a float; models are left in train mode.

    It checks its inputs (`check_step`), runs `step`, and reads the terms back as floats. target /
    guide may be DistributedDataParallel wrappers (the attack then runs on the wrapped modules).
    """
    m, p = check_step(method, guide, x, y, **params)
    return {k: v.item() for k, v in step(m, target, guide, optimizer, x, y, p).items()}
