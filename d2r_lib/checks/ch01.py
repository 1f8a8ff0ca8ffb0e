"""Checks of exercise notebook 1 (chapter 1): FGSM, the projections, PGD in L∞ and L2."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import attacks
from .attackcheck import (
    AttackSpec,
    attack_cases,
    ce_objective,
    ce_sum,
    run_attack_check,
    wrong_attack,
)
from .harness import (
    PairedPrediction,
    call_learner,
    fail,
    generator,
    grade_prediction,
    passed,
    pct,
    rand_images,
    sandbox,
)

__all__ = ["check_linearised_max_l2", "check_pgd_vs_exact_prediction",
           "check_fgsm_vs_pgd_prediction", "check_linearised_max", "check_fgsm",
           "check_project_linf", "check_project_l2", "check_pgd_linf", "check_pgd_l2"]


# ------------------------------------------------------------------------------------------ ch. 1
def check_fgsm(fn) -> None:
    """Task: ``fgsm(model, x, y, eps)``: x′ = clamp(x + ε·sign(∇ₓ CE(f(x), y)), 0, 1), model in eval
    mode."""

    def wrong(objective=None, **kw):
        def run(mods, x, y, k):
            obj = ce_sum(y) if objective is None else objective(y)
            return wrong_attack(
                mods["model"], x, obj, eps=k["eps"], step_size=k["eps"], steps=1, **kw
            )

        return run

    run_attack_check(
        AttackSpec(
            task="fgsm",
            norm="linf",
            random=False,
            cases=attack_cases("fgsm"),
            learner=lambda fn, mods, x, y, k: fn(mods["model"], x, y, k["eps"]),
            library=lambda mods, x, y, k: attacks.fgsm(mods["model"], x, y, eps=k["eps"]),
            objective=ce_objective,
            variants=[
                ("you stepped along the raw gradient, ε·∇; FGSM steps along its sign: x + ε·sign(∇ₓ loss)", wrong(step="grad")),
                ("you stepped along the raw gradient of the mean loss, ε·∇; FGSM steps along its sign: x + ε·sign(∇ₓ loss)", wrong(step="grad", objective=lambda y: lambda z: F.cross_entropy(z, y))),
                ("you stepped *down* the loss (x − ε·sign(∇)); an attack ascends it: x + ε·sign(∇ₓ loss)", wrong(descend=True)),
                (
                    "you applied softmax before F.cross_entropy (which applies log-softmax itself), so your gradient is the wrong one: use the raw logits",
                    wrong(
                        objective=lambda y: (
                            lambda z: F.cross_entropy(F.softmax(z, dim=1), y, reduction="sum")
                        )
                    ),
                ),
            ],
            passed="x + ε·sign(∇ₓ CE) clamped to [0, 1], eval mode, mode restored, detached, as attacks.fgsm (3 trials)",
        ),
        fn,
    )


def _projection_cases(norm: str):
    cases = []
    for i, (b, eps) in enumerate(
        [(8, 8 / 255), (1, 0.1), (6, 0.03)] if norm == "linf" else [(8, 0.5), (1, 0.3), (6, 1.0)]
    ):
        g = generator(1500 + i + (10 if norm == "l2" else 0))
        x = rand_images(g, b)
        if norm == "linf":
            x_adv = x + 3 * eps * (2 * torch.rand(x.shape, generator=g) - 1)
        else:
            scale = (
                (0.3 + 1.7 * torch.rand(b, 1, 1, 1, generator=g)) * eps / math.sqrt(x[0].numel())
            )
            x_adv = x + scale * torch.randn(x.shape, generator=g)
            if b > 1:
                x_adv[0] = x[0]  # a zero perturbation: the norm must be guarded
                x_adv[1] = x[1] + 3 * (x_adv[1] - x[1])
        cases.append((x_adv, x, eps))
    return cases


def _run_projection_check(task, fn, norm, variants, summary):
    with sandbox(task, fn):
        for x_adv, x, eps in _projection_cases(norm):
            xa_l, x_l = x_adv.clone(), x.clone()
            out = call_learner(task, fn, xa_l, x_l, eps)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                fail(task, f"return a tensor shaped like x {tuple(x.shape)}; got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            if not torch.equal(xa_l, x_adv) or not torch.equal(x_l, x):
                fail(task, "your projection modified its inputs in place: return a new tensor")
            if not torch.isfinite(out).all():
                fail(task, "your projection returns NaN/inf when δ = 0 (x_adv == x): guard the division, e.g. norm.clamp_min(1e-12)")
            ref = attacks.project(x_adv, x, eps, norm)
            if torch.allclose(out, ref, atol=1e-6):
                continue
            for message, variant in variants:
                v = variant(x_adv, x, eps)
                if torch.allclose(out, v, atol=1e-6) and not torch.allclose(v, ref, atol=1e-6):
                    fail(task, message)
            outside = ((out < -1e-6) | (out > 1 + 1e-6)).float().mean().item()
            if outside > 0:
                fail(task, f"your projection forgets the clamp to [0, 1]: {pct(outside)} of the pixels are outside [0, 1]")
            delta = out - x
            if norm == "linf":
                far = (delta.abs() > eps + 1e-6).float().mean().item()
                if far > 0:
                    fail(task, f"your projection leaves {pct(far)} of the pixels outside the ε-ball (|x′ − x| > ε)")
            else:
                norms = delta.flatten(1).norm(dim=1)
                far = int((norms > eps * (1 + 1e-5) + 1e-6).sum())
                if far:
                    fail(task, f"your projection leaves {far} of {len(norms)} examples outside the L2 ε-ball (largest ‖x′ − x‖₂ = {norms.max().item():.4g} > ε = {eps:.4g})")
            fail(task, f"your result differs from attacks.project(..., norm={norm!r}) (max |Δ| = {(out - ref).abs().max().item():.3g}) although it stays in the ball and in [0, 1]: a projection returns the *closest* point of the ball, so points already inside must not move")
        passed(task, summary)


def check_project_linf(fn) -> None:
    """Task: ``project_linf(x_adv, x, eps)``: clip δ = x_adv − x to [−ε, ε] per pixel, then clamp to
    [0, 1]."""

    def rescaled(xa, x, eps):
        d = xa - x
        m = d.flatten(1).abs().max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + d * (eps / m).clamp(max=1.0)).clamp(0, 1)

    _run_projection_check(
        "project_linf",
        fn,
        "linf",
        [
            ("you rescaled δ as a whole (δ·ε/‖δ‖∞); the L∞ projection clips each pixel independently: x + clamp(x_adv − x, −ε, ε)", rescaled),
            ("you clipped x_adv itself to [−ε, ε]; clip the perturbation δ = x_adv − x, then add it to x", lambda xa, x, eps: xa.clamp(-eps, eps).clamp(0, 1)),
        ],
        "x + clamp(x_adv − x, −ε, ε), then clamp to [0, 1], as attacks.project(..., 'linf') (3 trials, batch 1 included)",
    )


def check_project_l2(fn) -> None:
    """Task: ``project_l2(x_adv, x, eps)``: δ·min(1, ε/‖δ‖₂) per example, then clamp to [0, 1]."""

    def per_norm(d):
        return d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    _run_projection_check(
        "project_l2",
        fn,
        "l2",
        [
            (
                "you normalised with the norm of the whole batch; the L2 ball is per example: compute ‖δ‖₂ over each example's (C, H, W)",
                lambda xa, x, eps: (
                    x + (xa - x) * (eps / (xa - x).norm().clamp_min(1e-12)).clamp(max=1.0)
                ).clamp(0, 1),
            ),
            ("you scaled every δ to norm ε, also those already inside the ball: multiply by min(1, ε/‖δ‖₂)", lambda xa, x, eps: (x + (xa - x) * eps / per_norm(xa - x)).clamp(0, 1)),
            ("you clipped each pixel to [−ε, ε] (the L∞ projection); the L2 projection rescales δ: δ·min(1, ε/‖δ‖₂)", lambda xa, x, eps: attacks.project(xa, x, eps, "linf")),
            (
                "you used the squared norm ‖δ‖₂² where ‖δ‖₂ belongs",
                lambda xa, x, eps: (
                    x + (xa - x) * (eps / per_norm(xa - x) ** 2).clamp(max=1.0)
                ).clamp(0, 1),
            ),
        ],
        "δ·min(1, ε/‖δ‖₂) per example, then clamp to [0, 1], as attacks.project(..., 'l2') (3 trials, δ = 0 included)",
    )


def _pgd_spec(task, norm, fn):
    step_kind = "sign" if norm == "linf" else "l2"

    def wrong(**kw):
        options = {
            "step": step_kind,
            "start": "uniform",
            "project_norm": norm,
            "start_norm": norm,
            **kw,
        }
        return lambda mods, x, y, k: wrong_attack(mods["model"], x, ce_sum(y), **k, **options)

    def lib(start):
        return lambda mods, x, y, k: attacks.pgd(mods["model"], x, y, norm=norm, start=start, **k)

    variants = [
        ("no random start: PGD starts from a uniformly random point of the ε-ball (Madry et al.), not from x", lib("clean")),
        ("you started at x + 0.001·N(0, I) (the TRADES start); PGD starts from a uniformly random point of the ε-ball", lib("gaussian")),
        ("you projected only once, after the loop; PGD projects back onto the ball after every step", wrong(project_each_step=False)),
        ("your steps go *down* the loss; PGD ascends it (x′ + α·step)", wrong(descend=True)),
    ]
    if norm == "linf":
        variants += [
            ("you stepped along the raw gradient α·∇; L∞ PGD steps along its sign: α·sign(∇)", wrong(step="grad"))
        ]
    else:
        variants += [
            ("you stepped along sign(∇) (the L∞ step); the L2 step is α·∇/‖∇‖₂, normalised per example", wrong(step="sign")),
            ("you normalised the gradient by the norm of the whole batch; normalise per example: ∇ᵢ/‖∇ᵢ‖₂", wrong(step="l2_batch")),
            ("you stepped along the raw gradient α·∇; the L2 step is α·∇/‖∇‖₂, normalised per example", wrong(step="grad")),
            ("you projected onto the L∞ ball; PGD-L2 projects onto the L2 ball (δ·min(1, ε/‖δ‖₂))", wrong(project_norm="linf")),
        ]
    step_txt = "α·sign(∇)" if norm == "linf" else "α·∇/‖∇‖₂"
    return AttackSpec(
        task=task,
        norm=norm,
        random=True,
        cases=attack_cases(norm),
        learner=lambda fn, mods, x, y, k: fn(
            mods["model"], x, y, k["eps"], k["step_size"], k["steps"]
        ),
        library=lambda mods, x, y, k: attacks.pgd(mods["model"], x, y, norm=norm, **k),
        objective=ce_objective,
        variants=variants,
        passed=f"uniform random start, {step_txt} steps, projection after each step, [0, 1], eval mode, detached, as attacks.pgd(norm={norm!r}) (3 trials)",
    )


def check_pgd_linf(fn) -> None:
    """Task: ``pgd_linf(model, x, y, eps, step_size, steps)``: L∞ PGD with a uniform random
    start."""
    run_attack_check(_pgd_spec("pgd_linf", "linf", fn), fn)


def check_pgd_l2(fn) -> None:
    """Task: ``pgd_l2(model, x, y, eps, step_size, steps)``: L2 PGD (normalised-gradient steps)."""
    run_attack_check(_pgd_spec("pgd_l2", "l2", fn), fn)


# ------------------------------------------------------------------------------------ derive
def check_linearised_max(fn) -> None:
    """Task (derive): ``linearised_max(grad, eps)`` → (δ*, value): the maximiser of ⟨g, δ⟩ over ‖δ‖∞
    ≤ ε."""
    task = "linearised_max"
    with sandbox(task, fn):
        for trial, (b, d, eps) in enumerate([(6, 50, 0.03), (1, 7, 0.5), (4, 300, 8 / 255)]):
            g = torch.randn(b, d, generator=generator(2600 + trial), dtype=torch.float64)
            g[:, 0] = 0.0  # a zero coordinate: any δ in [−ε, ε] is optimal there
            out = call_learner(task, fn, g.clone(), eps)
            if not (isinstance(out, tuple) and len(out) == 2):
                fail(task, "return a pair (delta, value): the maximiser δ* and the maximum ⟨g, δ*⟩ per example")
            delta, value = (torch.as_tensor(v, dtype=torch.float64) for v in out)
            if delta.shape != g.shape or value.shape != (b,):
                fail(task, f"delta must be shaped like grad {tuple(g.shape)} and value be one number per example {(b,)}; got {tuple(delta.shape)} and {tuple(value.shape)}")
            gain = (g * delta).sum(1)
            best = eps * g.abs().sum(1)
            if torch.allclose(gain, -best, rtol=1e-6):
                fail(task, "your δ *minimises* the linearised loss: the maximiser moves each coordinate along the sign of its gradient")
            if delta.abs().max().item() > eps * (1 + 1e-6):
                l2 = eps * g / g.norm(dim=1, keepdim=True)
                hint = (
                    " (you scaled g itself: that is not a point of the L∞ ball)"
                    if torch.allclose(delta, eps * g)
                    else ""
                )
                if torch.allclose(delta, l2):
                    hint = " (ε·g/‖g‖₂ is the maximiser over the L2 ball)"
                fail(task, f"your δ leaves the L∞ ball: max |δ_i| = {delta.abs().max().item():.4g} > ε = {eps}{hint}")
            if not torch.allclose(gain, best, rtol=1e-6, atol=1e-12):
                if torch.allclose(gain, eps * g.norm(dim=1), rtol=1e-6):
                    fail(task, "your δ = ε·g/‖g‖₂ reaches ε‖g‖₂, the maximum over the L2 ball; over the L∞ ball every coordinate can move by ε on its own, which reaches more")
                fail(task, f"your δ is in the ball but reaches ⟨g, δ⟩ = {gain.min().item():.4g} where {best.min().item():.4g} is possible: a linear function over a box is largest at a corner")
            if not torch.allclose(value, best, rtol=1e-6, atol=1e-12):
                if torch.allclose(value, eps * g.norm(dim=1), rtol=1e-6):
                    fail(task, "your value is ε‖g‖₂; the maximum over the L∞ ball is ε times the *dual* norm of L∞, which is the L1 norm: ε‖g‖₁")
                fail(task, f"your δ is right but your value {value[0].item():.4g} is not ⟨g, δ*⟩ = {best[0].item():.4g}: write it as a closed form in g and ε")
        passed(task, "δ* = ε·sign(g) reaches the maximum ε‖g‖₁ of the linearised loss over the L∞ ball: FGSM is its exact maximiser (3 trials, zero gradients included)")


def check_linearised_max_l2(fn) -> None:
    """Task (derive): the maximiser of ⟨g, δ⟩ over ‖δ‖₂ ≤ ε and the maximum, per row."""
    task = "linearised_max_l2"
    with sandbox(task, fn):
        for b, d in ((3, 5), (8, 64)):
            grad = torch.randn(b, d, generator=generator(b * 10 + d))
            grad[0, 1:] = 0  # one row along a single axis
            eps = 0.5
            norm = grad.norm(dim=1, keepdim=True)
            want_delta, want_max = eps * grad / norm, eps * norm.squeeze(1)
            out = call_learner(task, fn, grad.clone(), eps)
            if not (isinstance(out, tuple) and len(out) == 2):
                fail(task, "return the pair (δ*, maximum per row)")
            delta, value = out
            if torch.allclose(delta, eps * grad.sign(), atol=1e-6):
                fail(task, "ε·sign(g) is the L∞ answer (task 6): it leaves the L2 ball when more than one coordinate is non-zero")
            if not torch.allclose(delta, want_delta, atol=1e-5):
                fail(task, "δ* is wrong: over the L2 ball the best direction is g itself, scaled to length ε")
            if torch.allclose(torch.as_tensor(value).float(), eps * grad.abs().sum(1), atol=1e-5):
                fail(task, "ε·‖g‖₁ is the L∞ maximum; the L2 ball's dual norm is L2 itself")
            if not torch.allclose(torch.as_tensor(value).float(), want_max, atol=1e-5):
                fail(task, "the maximum is ⟨g, δ*⟩ per row")
        passed(task, "δ* = ε·g/‖g‖₂ and the maximum ε·‖g‖₂: L2 is its own dual norm")


_PGD_VS_EXACT = PairedPrediction("predict: PGD against the exact answer", "pgd", "exact", ("higher", "lower"), "PGD − exact over {n} seeds. PGD searches the ball from one start and can miss its worst point; the lattice checks the whole ball, so PGD's estimate is an over-estimate of robustness")


def check_pgd_vs_exact_prediction(predicted_sign, rows) -> None:
    """Task (predict, then run): PGD accuracy − exact robust accuracy per seed on the 2-D world."""
    grade_prediction(_PGD_VS_EXACT, predicted_sign, rows)


_FGSM_VS_PGD = PairedPrediction("predict: FGSM or PGD", "fgsm", "pgd", ("pgd stronger", "fgsm stronger"), "correct under FGSM − correct under PGD-10, over {n} images. FGSM takes one step along the sign of the gradient at x; PGD re-reads the gradient after every step, so it follows the loss where it curves")


def check_fgsm_vs_pgd_prediction(predicted, rows) -> None:
    """Task (predict, then run): which attack leaves the trained model less accurate, paired by
    image (rows: dicts with 'fgsm' and 'pgd' correctness, 0 or 1)."""
    grade_prediction(_FGSM_VS_PGD, predicted, rows)
