"""Comparing a learner's attack with the library's: the same x′, or, when the learner draws its
random numbers differently, what any correct attack reaches (ε-ball, [0, 1], the objective raised).
Also the wrong-variant attacks that recognise common mistakes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import attacks
from .harness import (
    advise,
    bn_changed,
    bn_state,
    call_learner,
    copies,
    fail,
    generator,
    mode_flags,
    modes_advice,
    passed,
    pct,
    rand_images,
    rand_labels,
    sandbox,
    small_cnn,
)

__all__ = ["project_wrong", "random_start", "wrong_attack", "ce_sum", "AttackCase", "AttackSpec",
           "same_image", "run_attack_check", "attack_cases", "ce_objective", "p_clean", "p_logits"]


# ================================================================================================
# Attacks: one framework
# ================================================================================================
def project_wrong(x_adv, x, eps, norm, clamp=True):
    if clamp:
        return attacks.project(x_adv, x, eps, norm)
    delta = x_adv - x
    if norm == "linf":
        return x + delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return x + delta * (eps / n).clamp(max=1.0)


def random_start(x, eps, norm="linf", start="uniform"):
    """The start points the wrong-variant attacks use (the library's conventions, for recognising
    mistakes)."""
    if start == "clean":
        return x.clone()
    if start == "gaussian":
        return x + 0.001 * torch.randn_like(x)
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    radius = eps * torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype)
    return (x + direction * radius).clamp(0.0, 1.0)


def wrong_attack(
    model,
    x,
    objective,
    *,
    eps,
    step_size,
    steps,
    start="clean",
    step="sign",
    descend=False,
    project_norm="linf",
    start_norm="linf",
    project_each_step=True,
    clamp=True,
):
    """A deliberately configurable (and mostly wrong) gradient attack, used only to recognise
    mistakes."""
    x = x.detach()
    with attacks.eval_mode(model):
        x_adv = random_start(x, eps, start_norm, start).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = objective(model(x_adv))
            grad = torch.autograd.grad(loss, x_adv)[0]
            if step == "sign":
                d = grad.sign()
            elif step == "grad":
                d = grad
            elif step == "l2":
                d = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            else:  # "l2_batch": one norm for the whole batch
                d = grad / grad.norm().clamp_min(1e-12)
            x_adv = x_adv.detach() + (-step_size if descend else step_size) * d
            if project_each_step:
                x_adv = project_wrong(x_adv, x, eps, project_norm, clamp)
        if not project_each_step:
            x_adv = project_wrong(x_adv, x, eps, project_norm, clamp)
    return x_adv.detach()


def ce_sum(y):
    return lambda z: F.cross_entropy(z, y, reduction="sum")


@dataclass
class AttackCase:
    models: dict
    x: torch.Tensor
    y: torch.Tensor | None
    kwargs: dict
    seed: int
    mode: str


@dataclass
class AttackSpec:
    task: str
    norm: str
    random: bool  # random start: exact comparison may fail for other RNG use
    cases: list
    learner: Callable  # (fn, models, x, y, kwargs) -> x_adv
    library: Callable  # (models, x, y, kwargs) -> x_adv
    objective: Callable  # (models, x, y, x_adv) -> float, the quantity the attack raises
    variants: list  # (message, (models, x, y, kwargs) -> x_adv)
    passed: str
    guide_once: bool = False


def same_image(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().gt(1e-5).float().mean().item() <= 0.002


def _run_learner(task: str, spec: AttackSpec, fn, case):
    """Run the learner's attack on copies of the case's models, recording modes, BatchNorm state
    and whether each model's forward pass built a graph."""
    mods = copies(case.models, case.mode)
    modes = {r: mode_flags(m) for r, m in mods.items()}
    bn = {r: bn_state(m) for r, m in mods.items()}
    calls = {r: [] for r in mods}
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp, r=r: calls[r].append(torch.is_grad_enabled())) for r, m in mods.items()]
    x_l = case.x.clone()
    torch.manual_seed(case.seed)
    try:
        out = call_learner(task, spec.learner, fn, mods, x_l, case.y, case.kwargs)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(out, torch.Tensor):
        fail(task, f"your function returned {type(out).__name__}; return x′ as a tensor shaped like x")
    if out.shape != case.x.shape:
        fail(task, f"your x′ has shape {tuple(out.shape)}; it must have the shape of x, {tuple(case.x.shape)}")
    if out.requires_grad or out.grad_fn is not None:
        fail(task, "your x′ still carries a graph (requires_grad=True): return x_adv.detach(); an attack's output is a constant input for the next step")
    if not torch.equal(x_l, case.x):
        fail(task, "your function modified x in place: build x′ in a new tensor (x.clone(), x + ...)")
    for role, model in mods.items():
        if bn_changed(bn[role], model):
            fail(task, f"the {role} ran in train mode during your attack: BatchNorm used the batch's statistics and its running averages changed. Attacks run the models in eval mode (`with attacks.eval_mode({role}):`)")
    return out, set(modes_advice(modes, mods)) | _guide_advice(spec, calls)


def _guide_advice(spec: AttackSpec, calls: dict) -> set:
    if not spec.guide_once or "guide" not in calls:
        return set()
    n, advice = len(calls["guide"]), set()
    if n > 1:
        advice.add(f"the guide ran {n} times in one attack: p_g(x) does not depend on x′, so compute it once, before the loop (the official code recomputes it at every step: the same x′ for {n - 1} extra forward passes)")
    if sum(calls["guide"]):
        advice.add("the guide's forward pass built a graph nobody uses: compute p_g(x) under torch.no_grad()")
    return advice


def _check_bounds(task: str, spec: AttackSpec, out, x, eps: float) -> None:
    """x′ in [0, 1] and in the ε-ball of the spec's norm."""
    outside = ((out < -1e-6) | (out > 1 + 1e-6)).float().mean().item()
    if outside > 0:
        fail(task, f"your attack forgets the clamp to [0, 1]: {pct(outside)} of the pixels of x′ are outside [0, 1]")
    delta = out - x
    if spec.norm == "linf":
        far = (delta.abs() > eps + 1e-6).float().mean().item()
        if far > 0:
            fail(task, f"your x′ leaves {pct(far)} of the pixels outside the ε-ball (|x′ − x| > ε = {eps:.4g}): project back onto the ball after every step")
        return
    norms = delta.flatten(1).norm(dim=1)
    far = int((norms > eps * (1 + 1e-5) + 1e-6).sum())
    if far:
        fail(task, f"{far} of {len(norms)} examples of your x′ lie outside the L2 ε-ball (largest ‖x′ − x‖₂ = {norms.max().item():.4g} > ε = {eps:.4g}): project after every step")


def _check_case(task: str, spec: AttackSpec, fn, case):
    """One case: None when x′ equals the library's, else (learner's gain, library's gain) of
    the objective for a random attack whose random numbers differ; a known mistake fails."""
    out, advice = _run_learner(task, spec, fn, case)
    torch.manual_seed(case.seed)
    ref = spec.library(copies(case.models, case.mode), case.x, case.y, case.kwargs)
    x = case.x
    if not torch.isfinite(out).all():
        fail(task, "your x′ contains NaN or inf values")
    if same_image(out, ref):
        return None, advice
    for message, variant in spec.variants:
        torch.manual_seed(case.seed)
        v = variant(copies(case.models, case.mode), x, case.y, case.kwargs)
        if same_image(out, v) and not same_image(v, ref):
            fail(task, message)
    _check_bounds(task, spec, out, x, case.kwargs["eps"])
    if not spec.random:
        diff = (out - ref).abs().gt(1e-5).float().mean().item()
        fail(task, f"your x′ differs from the library's on {pct(diff)} of the pixels (max |Δ| = {(out - ref).abs().max().item():.3g}); none of the common mistakes this check knows matches: compare your steps with the task's statement")
    # random start, other random numbers than the library's: compare what the attack achieves
    torch.manual_seed(case.seed + 999)
    again = call_learner(task, spec.learner, fn, copies(case.models, case.mode), x.clone(), case.y,
                         case.kwargs)
    if torch.equal(again, out):
        fail(task, "no random start: two calls with different random seeds returned the same x′")
    base = spec.objective(case.models, x, case.y, x)
    return (spec.objective(case.models, x, case.y, out) - base,
            spec.objective(case.models, x, case.y, ref) - base), advice


def run_attack_check(spec: AttackSpec, fn) -> None:
    """Run the learner's attack `fn` on every case of `spec`; fail with the first mistake found."""
    task = spec.task
    gains, advice = [], set()
    with sandbox(task, fn):
        for case in spec.cases:
            gain, case_advice = _check_case(task, spec, fn, case)
            advice |= case_advice
            if gain is not None:
                gains.append(gain)
        if not gains:
            passed(task, spec.passed)
        else:
            mine, lib = sum(g for g, _ in gains), sum(g for _, g in gains)
            if mine <= 0:
                fail(task, f"your attack lowers the loss it should raise (change {mine:.3g}, the library's {lib:.3g}): step *up* the gradient, x′ + α·sign(∇)")
            if mine < 0.75 * lib:
                fail(task, f"your attack raises its objective much less than the library's ({mine:.3g} vs {lib:.3g} over the trials): check the step direction and size")
            passed(task, f"{spec.passed} — your random numbers differ from the library's, so the check compared invariants and the loss reached instead of exact values")
        for message in sorted(advice):
            advise(task, message)


def attack_cases(kind: str) -> list[AttackCase]:
    """Three trials: batch 8 / 1 / 5, 10 and 100 classes, models in train and in eval mode."""
    shapes = [(8, 10, "train"), (1, 10, "eval"), (5, 100, "train")]
    budgets = {
        "fgsm": [dict(eps=8 / 255), dict(eps=0.1), dict(eps=0.05)],
        "linf": [
            dict(eps=0.05, step_size=0.0125, steps=4),
            dict(eps=8 / 255, step_size=2 / 255, steps=3),
            dict(eps=0.1, step_size=0.03, steps=3),
        ],
        "l2": [
            dict(eps=0.5, step_size=0.15, steps=4),
            dict(eps=0.25, step_size=0.1, steps=3),
            dict(eps=1.0, step_size=0.3, steps=3),
        ],
        "kl": [
            dict(eps=0.031, step_size=0.007, steps=4),
            dict(eps=0.031, step_size=0.007, steps=3),
            dict(eps=0.02, step_size=0.012, steps=3),
        ],
    }[kind]
    cases = []
    for i, ((b, c, mode), kw) in enumerate(zip(shapes, budgets)):
        g = generator(1100 + i)
        roles = (
            {"target": small_cnn(c, 1200 + i), "guide": small_cnn(c, 1300 + i)}
            if kind == "kl"
            else {"model": small_cnn(c, 1200 + i)}
        )
        cases.append(AttackCase(roles, rand_images(g, b), rand_labels(g, b, c), kw, 1400 + i, mode))
    return cases


def ce_objective(mods, x, y, xa):
    m = mods["model"] if "model" in mods else mods["target"]
    with attacks.eval_mode(m), torch.no_grad():
        return F.cross_entropy(m(xa), y, reduction="sum").item()


def p_clean(model, x):
    with attacks.eval_mode(model), torch.no_grad():
        return F.softmax(model(x), dim=1)


def p_logits(model, xa):
    with attacks.eval_mode(model), torch.no_grad():
        return model(xa)
