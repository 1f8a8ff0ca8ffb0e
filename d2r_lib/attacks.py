"""Adversarial attacks as plain functions: FGSM, PGD (L∞ / L2; CE, CW margin or KL objective) and
CAG.

Chapter 1 introduces `fgsm` and `pgd`; chapter 3 `trades_attack`; chapter 6 `cag`.
Every attack runs its models in eval mode and restores each module's mode afterwards, returns a
detached x′ with ‖x′ − x‖ ≤ ε and x′ ∈ [0, 1], and keeps to the device of its inputs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate
from .losses import official_k

__all__ = [
    "NORMS", "OBJECTIVES", "STARTS", "ATTACKS", "eval_mode", "official_kl_sum", "cw_margin",
    "project", "gaussian_start", "pgd", "fgsm", "trades_attack", "mart_attack", "cag",
]

NORMS = ("linf", "l2")
OBJECTIVES = ("ce", "cw", "kl")
STARTS = ("uniform", "gaussian", "clean")


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put every module of `models` in eval mode; restore each module's own flag on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def official_kl_sum(p_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_batch Σ_classes p_ref·(log(p_ref + 1e-5) − log_softmax(logits)) ≈ Σ_i KL(p_ref,i ‖ p_i).

    The CAG objective, exactly as the official code sums it (the 1e-5 only adds a constant in x′).
    """
    return official_k(p_ref, F.log_softmax(logits, dim=1)).sum()


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample CW margin max_{j≠y} z_j − z_y (positive ⇔ misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - z_y


def _objective(name, logits, y, reference):
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if name == "cw":
        return cw_margin(logits, y).sum()
    # Σ KL(reference ‖ p(x′))
    return F.kl_div(F.log_softmax(logits, dim=1), reference, reduction="sum")


def _l2_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """Project x_adv onto the ε-ball around x (L∞ or L2), then clamp to [0, 1]. Chapter 1."""
    validate.choice("norm", norm, NORMS)
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def gaussian_start(x: torch.Tensor) -> torch.Tensor:
    """x + 0.001·N(0, I), the official TRADES / MART / LBGAT / D2R start: the noise is drawn on the
    CPU generator and moved to x's device, as the official `torch.randn(x.shape).cuda()` (the same
    numbers; to a GPU through pinned memory, so the host does not wait for the copy). Chapter 3."""
    noise = torch.randn(x.shape)
    if x.is_cuda:
        noise = noise.pin_memory().to(x.device, non_blocking=True)
    return x + 0.001 * noise.to(device=x.device, dtype=x.dtype)


def _random_start(x, eps, norm, start):
    if start == "clean":
        return x.clone()
    if start == "gaussian":  # TRADES / MART / CAG: x + 0.001·N(0, 1), not projected first
        return gaussian_start(x)
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    direction = torch.randn_like(x)
    direction = direction / _l2_norm(direction)
    radius = eps * torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    return (x + direction * radius).clamp(0.0, 1.0)


def _check_common(x, eps, step_size, steps, norm):
    validate.images(x)
    validate.eps(eps, norm=norm)
    validate.step_size(step_size)
    validate.steps(steps)
    validate.choice("norm", norm, NORMS)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float = 8 / 255,
        step_size: float = 2 / 255, steps: int = 10, norm: str = "linf", objective: str = "ce",
        reference: torch.Tensor | None = None, start: str = "uniform",
        stop_on_success: bool = False) -> torch.Tensor:
    """Projected gradient ascent on `objective` inside the ε-ball. Chapter 1.

    objective: "ce" (cross-entropy with y), "cw" (margin max_{j≠y} z_j − z_y), or "kl"
    (Σ KL(reference ‖ p(x′)), `reference` = a (batch, classes) probability tensor, y not needed).
    start: "uniform" in the ε-ball, "gaussian" (x + 0.001·N(0,1), the TRADES start) or "clean".
    stop_on_success: freeze each example once it is misclassified (the official evaluation's PGD
    and CW).
    """
    _check_common(x, eps, step_size, steps, norm)
    validate.choice("objective", objective, OBJECTIVES)
    validate.choice("start", start, STARTS)
    if objective == "kl":
        if reference is None:
            raise ValueError("objective='kl' needs reference=, a (batch, classes) tensor of "
                             "probabilities")
        validate.same_batch(x=x, reference=reference)
    elif y is None:
        raise ValueError(f"objective={objective!r} needs labels y")
    if y is not None:
        validate.same_batch(x=x, y=y)
    if stop_on_success and y is None:
        raise ValueError("stop_on_success=True needs labels y")

    x = x.detach()
    with eval_mode(model):
        x_adv = _random_start(x, eps, norm, start).detach()
        checked = False
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_adv)
                if not checked and y is not None:
                    validate.labels(y, logits.shape[1], x.shape[0])
                    checked = True
                loss = _objective(objective, logits, y, reference)
                grad = torch.autograd.grad(loss, x_adv)[0]
            if norm == "linf":
                step = step_size * grad.sign()
            else:
                step = step_size * grad / _l2_norm(grad)
            x_new = project(x_adv.detach() + step, x, eps, norm)
            if stop_on_success:
                still_correct = logits.detach().argmax(1) == y
                if not still_correct.any():
                    break  # every example is fooled: the remaining steps would change nothing
                x_new = torch.where(still_correct.view(-1, *([1] * (x.dim() - 1))), x_new,
                                    x_adv.detach())
            x_adv = x_new.detach()
    return x_adv


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
         eps: float = 8 / 255) -> torch.Tensor:
    """Fast gradient sign method: one signed-gradient step of size ε from x. Chapter 1."""
    return pgd(model, x, y, eps=eps, step_size=max(eps, 1e-12), steps=1, start="clean")


def _official_linf_ascent(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, objective, *,
                          eps: float, step_size: float, steps: int) -> torch.Tensor:
    """The L∞ loop of the official TRADES / MART / LBGAT / D2R code, operation for operation:
    x′ ← x′ + α·sign(∇ objective(model(x′))), then min(max(x′, x − ε), x + ε), then clamp to
    [0, 1]."""
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = objective(model(x_adv))
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def trades_attack(model: nn.Module, x: torch.Tensor, *, eps: float = 0.031,
                  step_size: float = 0.007, steps: int = 10) -> torch.Tensor:
    """TRADES/LBGAT generation: ascent on Σ KL(p_f(x) ‖ p_f(x′)) with the target alone, from
    x + 0.001·N(0, 1), exactly as the official loop (p_f(x) is computed once, in eval mode).
    Chapter 3."""
    _check_common(x, eps, step_size, steps, "linf")
    x = x.detach()
    with eval_mode(model):
        with torch.no_grad():
            reference = F.softmax(model(x), dim=1)

        def objective(logits):
            return F.kl_div(F.log_softmax(logits, dim=1), reference, reduction="sum")

        start = gaussian_start(x)
        return _official_linf_ascent(model, x, start, objective, eps=eps, step_size=step_size,
                                     steps=steps)


def mart_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.031,
                step_size: float = 0.007, steps: int = 10) -> torch.Tensor:
    """MART generation, exactly as the official `mart_loss`: ascent on the batch-mean CE(f(x′), y)
    from x + 0.001·N(0, 1) (ε 0.031, step 0.007, 10 steps by default). Chapter 7."""
    _check_common(x, eps, step_size, steps, "linf")
    validate.same_batch(x=x, y=y)
    x = x.detach()
    with eval_mode(model):
        start = gaussian_start(x)
        return _official_linf_ascent(model, x, start, lambda logits: F.cross_entropy(logits, y),
                                     eps=eps, step_size=step_size, steps=steps)


def cag(target: nn.Module, guide: nn.Module, x: torch.Tensor, *, eps: float = 0.031,
        step_size: float = 0.007, steps: int = 10, norm: str = "linf") -> torch.Tensor:
    """Collaborative adversarial generation (D2R), exactly as the official code for norm="linf".
    Chapter 6.

    x′₀ = x + 0.001·N(0, 1) (one draw of x's shape on the global generator); then `steps` times:
    ascend Σ_i KL(p_g(x_i) ‖ p_f(x′_i)) (official form with log(p + 1e-5)), x′ ← x′ + α·sign(∇),
    project to the ε-ball around x, clamp to [0, 1]. Both models are in eval mode; p_g(x) is
    computed once per call without a graph (the official code recomputes it each step; the result is
    identical). norm="l2" is a corrected, batched L2 version (steps along the per-sample normalised
    gradient).
    """
    _check_common(x, eps, step_size, steps, norm)
    x = x.detach()
    with eval_mode(target, guide):
        with torch.no_grad():
            p_guide = F.softmax(guide(x), dim=1)

        def objective(logits):
            validate.same_shape(**{"target(x_adv)": logits, "guide(x)": p_guide})
            return official_kl_sum(p_guide, logits)

        x_adv = (gaussian_start(x)).detach()
        if norm == "linf":
            return _official_linf_ascent(target, x, x_adv, objective, eps=eps, step_size=step_size,
                                         steps=steps)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                grad = torch.autograd.grad(objective(target(x_adv)), x_adv)[0]
            x_adv = project(x_adv.detach() + step_size * grad / _l2_norm(grad), x, eps, "l2")
    return x_adv.detach()


ATTACKS = {
    "fgsm": lambda model, x, y, eps: fgsm(model, x, y, eps=eps),
    "pgd": lambda model, x, y, eps: pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10),
    "pgd_l2": lambda model, x, y, eps: pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10,
                                           norm="l2"),
    "cw": lambda model, x, y, eps: pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10,
                                       objective="cw"),
    "trades": lambda model, x, y, eps: trades_attack(model, x, eps=eps, step_size=eps / 4,
                                                     steps=10),
}
"""Every attack under one signature (model, x, y, eps) -> x_adv; used by the property tests and
chapter 8. `cag` needs a guide and is tested on its own."""
