"""Checks of exercise notebook 2 (chapter 2): the PGD-AT loss and step, robust accuracy."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import attacks, losses
from .harness import (
    PairedPrediction,
    as_float,
    call_learner,
    close,
    eval_common,
    eval_setup,
    fail,
    fraction_verdict,
    generator,
    grade_prediction,
    library_accuracy,
    passed,
    prediction_verdict,
    rand_labels,
    sandbox,
    toy_scores,
    toy_test,
    toy_train,
)
from .losscheck import SHAPES, LossSpec, Variant, rand_logits, run_loss_check

__all__ = ["check_pgd_at_clean_prediction", "check_k_prediction", "check_fgsm_overfitting",
           "check_pgd_at_loss", "check_robust_accuracy"]


# ------------------------------------------------------------------------------------------ ch. 2
def check_pgd_at_loss(fn) -> None:
    """Task: ``pgd_at_loss(logits_adv, y)`` = CE(f(x′), y), mean over the batch
    (losses.pgd_at_loss)."""

    def case(t):
        b, c, s = SHAPES[t]
        g = generator(100 + t)
        return (rand_logits(g, b, c, 2 * s), rand_labels(g, b, c)), {}

    run_loss_check(
        LossSpec(
            task="pgd_at_loss",
            names=("logits_adv", "y"),
            reference=losses.pgd_at_loss,
            make_case=case,
            trials=6,
            grad_names=("logits_adv",),
            variants=[
                Variant("you applied softmax before F.cross_entropy, which applies log-softmax itself: pass the raw logits", lambda z, y: F.cross_entropy(F.softmax(z, dim=1), y)),
                Variant("you summed the cross-entropy over the batch (your value is {B}× the library's); PGD-AT averages over the batch (reduction='mean')", lambda z, y: F.cross_entropy(z, y, reduction="sum")),
                Variant("F.nll_loss expects log-probabilities but you gave it raw logits: use F.cross_entropy(logits, y) (or F.log_softmax first)", lambda z, y: F.nll_loss(z, y)),
                Variant("you took the log-softmax over the batch (dim=0); probabilities are over the classes: dim=1", lambda z, y: F.nll_loss(F.log_softmax(z, dim=0), y)),
            ],
            passed="CE(f(x′), y) averaged over the batch, as losses.pgd_at_loss (6 trials, batch 1–32, 10 and 100 classes, value and gradient)",
        ),
        fn,
    )


def check_robust_accuracy(fn) -> None:
    """Task: ``robust_accuracy(model, x, y, *, eps, step_size, steps)`` = accuracy on attacks.pgd's
    x′."""
    task = "robust_accuracy"
    with sandbox(task, fn):
        for i, (b, mode, k) in enumerate(
            [
                (32, "train", dict(eps=0.05, step_size=0.05 / 3, steps=4)),
                (1, "eval", dict(eps=0.05, step_size=0.02, steps=3)),
                (40, "train", dict(eps=0.05, step_size=0.05 / 3, steps=4)),
            ]
        ):
            model, x, y = eval_setup(2100 + i, b)
            torch.manual_seed(2150 + i)
            out = eval_common(
                task,
                lambda m, x=x, y=y, k=k: call_learner(task, fn, m, x.clone(), y.clone(), **k),
                model,
                mode,
            )
            got = as_float(task, out)
            runs = []  # the library's PGD under several random starts: any correct PGD lands here
            for s in range(5):
                torch.manual_seed(2150 + i + 1000 * s)
                runs.append(library_accuracy(model, attacks.pgd(model, x, y, **k), y))
            want, low, high = runs[0], min(runs) - 1 / b, max(runs) + 1 / b
            if low - 1e-9 <= got <= high + 1e-9:
                continue
            clean = library_accuracy(model, x, y)
            fraction_verdict(task, got, want, clean=clean, what="robust accuracy")
            fgsm = library_accuracy(model, attacks.fgsm(model, x, y, eps=k["eps"]), y)
            if close(got, fgsm, 0, 1e-6):
                fail(task, f"you attacked with FGSM ({got:.4g}); robust accuracy here is under PGD (with the given eps, step_size and steps): {min(runs):.4g}–{max(runs):.4g}")
            fail(task, f"your robust accuracy {got:.4g} is outside what PGD with this budget gives ({min(runs):.4g}–{max(runs):.4g} over 5 random starts; clean {clean:.4g}): attack once with PGD (eps, step_size, steps as given), then the accuracy on x′ in eval mode")
        passed(task, "accuracy on PGD's x′ (within what 5 random starts of attacks.pgd give), eval mode, mode restored, as a fraction (3 trials)")


# ------------------------------------------------------------------------------------ break it
def _fgsm_training(task, fn, *, random_start, eps=0.2):
    """Train a two-moons MLP (seed 2, width 64, 30 epochs) with the learner's FGSM step; returns
    clean, FGSM, PGD-20 accuracy."""
    run = toy_train("standard", seed=2, width=64, epochs=30, batch_size=100, lr=0.1,
                    step=lambda m, o, x, y: call_learner(task, fn, m, o, x, y, eps, random_start))
    x, y = toy_test()
    clean, pgd = toy_scores(run.target, eps)
    return clean, library_accuracy(run.target, attacks.fgsm(run.target, x, y, eps=eps), y), pgd


def check_fgsm_overfitting(fn) -> None:
    """Break it, repair it: ``fgsm_train_step(model, optimizer, x, y, eps, random_start)``."""
    task = "fgsm_train_step"
    with sandbox(task, fn):
        plain = _fgsm_training(task, fn, random_start=False)
        fixed = _fgsm_training(task, fn, random_start=True)
    line = (f"two moons, seed 2, ε = 0.2, 30 epochs — without random start: clean {plain[0]:.0%}, FGSM {plain[1]:.0%}, PGD-20 {plain[2]:.0%}; with it: clean {fixed[0]:.0%}, FGSM {fixed[1]:.0%}, PGD-20 {fixed[2]:.0%}")
    if plain[1] - plain[2] < 0.3:
        fail(task, f"{line}. Without the random start FGSM training should overfit to its own attack (FGSM accuracy far above PGD's); here it does not: does your step start at x when random_start is False, take one signed step of size ε on the loss, and train on that x′ in train mode?")
    if fixed[2] < plain[2] + 0.05:
        fail(task, f"{line}. The random start should repair it (PGD-20 accuracy well above the run without): with random_start=True, start from a uniform point of the ε-ball and take the signed step from there, projected back onto the ball")
    passed(task, f"{line}: FGSM training overfits to its own one-step attack (catastrophic overfitting), and the random start repairs much of it")


# ------------------------------------------------------------------------------------ predict
_K_EPS = 0.08


@functools.lru_cache(maxsize=1)
def _k_runs() -> tuple:
    """(K, clean, PGD-20) of PGD-AT on two moons, seed 0, K = 1 (step ε) and K = 10 (step ε/4)."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        return tuple((k, *toy_scores(toy_train("pgd_at", lr=0.05, eps=_K_EPS, step_size=a * _K_EPS,
                                               steps=k).target, _K_EPS))
                     for k, a in ((1, 1.0), (10, 0.25)))


def check_k_prediction(predicted_more_robust_k) -> None:
    """Task (predict): which attack length K in PGD-AT gives the higher PGD-20 accuracy, 1 or 10."""
    task = "predict: PGD-AT with K = 1 or K = 10"
    allowed = (1, 10, "same")
    if isinstance(predicted_more_robust_k, bool) or predicted_more_robust_k not in allowed:
        prediction_verdict(task, predicted_more_robust_k, allowed, None, "")
    (_, clean1, rob1), (_, clean10, rob10) = _k_runs()
    measured = 10 if rob10 > rob1 + 0.02 else 1 if rob1 > rob10 + 0.02 else "same"
    why = (f"two moons, seed 0, ε = {_K_EPS}, evaluated with PGD-20: K = 1 (one step of ε, i.e. FGSM training) clean {clean1:.1%} / PGD-20 {rob1:.1%}; K = 10 (steps of ε/4) clean {clean10:.1%} / PGD-20 {rob10:.1%}. A longer inner maximisation finds stronger x′ to train on, so the model resists the stronger test attack better, at some clean accuracy")
    prediction_verdict(task, predicted_more_robust_k, allowed, measured, why)


_PGD_AT_CLEAN = PairedPrediction("predict: what PGD-AT costs", "pgd_at", "standard", ("higher", "lower"), "PGD-AT − standard over {n} seeds, clean accuracy on held-out points. PGD-AT fits the worst point of each ε-ball, not the point itself: near the boundary the two disagree, and the clean points pay for it", metric="clean")


def check_pgd_at_clean_prediction(predicted_sign, runs) -> None:
    """Task (predict, then run): the sign of PGD-AT − standard in clean accuracy on the 2-D world,
    graded against the learner's `toy.compare` runs."""
    grade_prediction(_PGD_AT_CLEAN, predicted_sign, runs)
