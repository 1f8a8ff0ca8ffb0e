"""The registry of training methods and the one training step they all share. Chapter 2 onwards.

A method says which models it trains, how it makes x′ (its attack) and which loss it takes. `train_step`
runs the attack with the models in eval mode, then the loss with them in train mode, then one step of a
single SGD optimizer over target and guide parameters (as the official D2R code does).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import attacks, losses, validate

ATTACK_KINDS = ("none", "pgd", "trades", "cag")

_ATTACK_DEFAULTS = {
    "none": {},
    "pgd": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10},
    "trades": {"eps": 0.031, "step_size": 0.007, "steps": 10},
    "cag": {"eps": 0.031, "step_size": 0.007, "steps": 10},
}


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    chapter: int
    attack: str                     # one of ATTACK_KINDS
    loss: str                       # "ce" | "pgd_at" | "trades" | "mart" | "lbgat" | "d2r"
    uses_guide: bool = False
    loss_params: dict = field(default_factory=dict)
    pgd_start: str = "uniform"      # random start of the "pgd" attack ("gaussian" for MART)

    @property
    def defaults(self) -> dict:
        """Every tunable parameter of this method with its default value."""
        return {**_ATTACK_DEFAULTS[self.attack], **self.loss_params}

    def resolve(self, **overrides) -> dict:
        """Defaults updated by overrides; an unknown or invalid parameter raises naming what is allowed."""
        params = self.defaults
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(params)) or 'none'}")
        params.update(overrides)
        if "eps" in params:
            validate.eps(params["eps"])
            validate.step_size(params["step_size"])
            validate.steps(params["steps"])
        for key in ("beta", "w_clean", "w_adv"):
            if key in params:
                validate.number(key, params[key], min=0)
        if "kl_reduction" in params:
            validate.choice("kl_reduction", params["kl_reduction"], losses.KL_REDUCTIONS)
        return params


_D2R = {"w_clean": 20.0, "w_adv": 30.0, "kl_reduction": "mean"}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("standard", "cross-entropy on clean images, no attack", 1, "none", "ce"),
    Method("pgd_at", "Madry et al.: CE on PGD-10 examples (uniform start, ε 8/255, step 2/255)", 2, "pgd", "pgd_at"),
    Method("trades", "TRADES: CE(f(x)) + β·KL(p_f(x) ‖ p_f(x′)), β = 6", 3, "trades", "trades",
           loss_params={"beta": 6.0}),
    Method("mart", "MART: boosted CE on x′ + β·KL weighted by 1 − p(x)_y, β = 6", 7, "pgd", "mart",
           loss_params={"beta": 6.0}, pgd_start="gaussian"),
    Method("lbgat", "LBGAT0: CE(g(x)) + MSE(f(x′), g(x)); x′ from the target alone (TRADES generation)", 4,
           "trades", "lbgat", uses_guide=True, loss_params={"beta": 0.0}),
    Method("d2r", "D2R loss with collaborative adversarial generation (CAG), official settings", 6,
           "cag", "d2r", uses_guide=True, loss_params=dict(_D2R)),
    Method("d2r_no_clean", "ablation: D2R + CAG without the clean-distribution term (w_clean = 0)", 7,
           "cag", "d2r", uses_guide=True, loss_params={**_D2R, "w_clean": 0.0}),
    Method("d2r_no_adv", "ablation: D2R + CAG without the adversarial-distribution term (w_adv = 0)", 7,
           "cag", "d2r", uses_guide=True, loss_params={**_D2R, "w_adv": 0.0}),
    Method("d2r_trades_gen", "ablation: D2R loss with TRADES/LBGAT generation (target alone) instead of CAG", 7,
           "trades", "d2r", uses_guide=True, loss_params=dict(_D2R)),
]}


def get_method(name: str) -> Method:
    validate.choice("method", name, METHODS)
    return METHODS[name]


def _check_guide(method: Method, guide):
    if method.uses_guide and guide is None:
        raise ValueError(f"method {method.name!r} trains a guide model: pass guide=")


def make_adversarial(method: str | Method, target: nn.Module, guide: nn.Module | None, x: torch.Tensor,
                     y: torch.Tensor, **params) -> torch.Tensor | None:
    """x′ for this method (None for `standard`); the attack runs in eval mode and restores modes."""
    m = method if isinstance(method, Method) else get_method(method)
    p = m.resolve(**params)
    _check_guide(m, guide)
    if m.attack == "none":
        return None
    budget = {k: p[k] for k in ("eps", "step_size", "steps")}
    if m.attack == "pgd":
        return attacks.pgd(target, x, y, start=m.pgd_start, **budget)
    if m.attack == "trades":
        return attacks.trades_attack(target, x, **budget)
    return attacks.cag(target, guide, x, **budget)


def compute_terms(method: str | Method, target: nn.Module, guide: nn.Module | None, x: torch.Tensor,
                  x_adv: torch.Tensor | None, y: torch.Tensor, **params) -> dict[str, torch.Tensor]:
    """The method's loss and its terms (key "loss" is the scalar to minimise); models as they are (train mode)."""
    m = method if isinstance(method, Method) else get_method(method)
    p = m.resolve(**params)
    _check_guide(m, guide)
    if m.loss == "ce":
        return {"loss": losses.ce_loss(target(x), y)}
    if m.loss == "pgd_at":
        return {"loss": losses.pgd_at_loss(target(x_adv), y)}
    if m.loss in ("trades", "mart"):
        logits_nat = target(x)
        logits_adv = target(x_adv)
        terms_fn = losses.trades_terms if m.loss == "trades" else losses.mart_terms
        return terms_fn(logits_nat, logits_adv, y, beta=p["beta"])
    if m.loss == "lbgat":
        logits_adv = target(x_adv)
        logits_nat = target(x) if p["beta"] > 0 else None
        return losses.lbgat_terms(logits_adv, guide(x), y, beta=p["beta"], logits_nat=logits_nat)
    # d2r: three forward passes in the official order: f(x′), f(x), g(x)
    logits_adv = target(x_adv)
    logits_nat = target(x)
    logits_guide = guide(x)
    return losses.d2r_terms(logits_adv, logits_nat, logits_guide, y, w_clean=p["w_clean"], w_adv=p["w_adv"],
                            kl_reduction=p["kl_reduction"])


def make_optimizer(target: nn.Module, guide: nn.Module | None = None, *, lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 2e-4) -> torch.optim.SGD:
    """One SGD over two parameter groups [target, guide], as the official code (lr 0.1, momentum 0.9, wd 2e-4)."""
    validate.number("lr", lr, min=0, min_open=True)
    validate.number("momentum", momentum, min=0, max=1)
    validate.number("weight_decay", weight_decay, min=0)
    groups = [{"params": list(target.parameters())}]
    if guide is not None:
        groups.append({"params": list(guide.parameters())})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(method: str | Method, target: nn.Module, guide: nn.Module | None, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, **params) -> dict[str, float]:
    """One full training step of any method: attack (eval mode), loss (train mode), SGD step. Chapter 2.

    Returns every loss term as a float. Models are left in train mode, as a training loop expects.
    """
    m = method if isinstance(method, Method) else get_method(method)
    validate.images(x)
    validate.same_batch(x=x, y=y)
    x_adv = make_adversarial(m, target, guide, x, y, **params)
    models = [target] + ([guide] if m.uses_guide else [])
    for model in models:
        model.train()
    terms = compute_terms(m, target, guide, x, x_adv, y, **params)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: v.item() for k, v in terms.items()}
