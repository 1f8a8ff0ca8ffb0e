"""Checks of exercise notebook 2 (chapter 2): the PGD-AT loss and step, robust accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import attacks, losses
from .harness import (
    as_float,
    call_learner,
    close,
    eval_common,
    eval_setup,
    fail,
    fraction_verdict,
    generator,
    library_accuracy,
    passed,
    rand_labels,
    sandbox,
)
from .losscheck import (
    SHAPES,
    LossSpec,
    Variant,
    rand_logits,
    run_loss_check,
)

__all__ = ["check_pgd_at_loss", "check_robust_accuracy"]


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
                Variant(
                    "you applied softmax before F.cross_entropy, which applies log-softmax itself: "
                    "pass the raw "
                    "logits",
                    lambda z, y: F.cross_entropy(F.softmax(z, dim=1), y),
                ),
                Variant(
                    "you summed the cross-entropy over the batch (your value is {B}× the "
                    "library's); PGD-AT "
                    "averages over the batch (reduction='mean')",
                    lambda z, y: F.cross_entropy(z, y, reduction="sum"),
                ),
                Variant(
                    "F.nll_loss expects log-probabilities but you gave it raw logits: use "
                    "F.cross_entropy(logits, y) "
                    "(or F.log_softmax first)",
                    lambda z, y: F.nll_loss(z, y),
                ),
                Variant(
                    "you took the log-softmax over the batch (dim=0); probabilities are over the "
                    "classes: dim=1",
                    lambda z, y: F.nll_loss(F.log_softmax(z, dim=0), y),
                ),
            ],
            passed="CE(f(x′), y) averaged over the batch, as losses.pgd_at_loss (6 trials, batch "
            "1–32, 10 and 100 "
            "classes, value and gradient)",
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
                task, lambda m: call_learner(task, fn, m, x.clone(), y.clone(), **k), model, mode
            )
            got = as_float(task, out)
            torch.manual_seed(2150 + i)
            want = library_accuracy(model, attacks.pgd(model, x, y, **k), y)
            clean = library_accuracy(model, x, y)
            fraction_verdict(task, got, want, clean=clean, what="robust accuracy")
            if not close(got, want, 0, 1e-6):
                fgsm = library_accuracy(model, attacks.fgsm(model, x, y, eps=k["eps"]), y)
                if close(got, fgsm, 0, 1e-6):
                    fail(
                        task,
                        f"you attacked with FGSM ({got:.4g}); robust accuracy here is under PGD "
                        f"(attacks.pgd with the given eps, step_size and steps): {want:.4g}",
                    )
                fail(
                    task,
                    f"your robust accuracy {got:.4g} differs from the library's {want:.4g} (clean "
                    f"{clean:.4g}): call attacks.pgd(model, x, y, eps=eps, step_size=step_size, "
                    "steps=steps) "
                    f"once, then the accuracy on x′ in eval mode",
                )
        passed(
            task, "accuracy on attacks.pgd's x′, eval mode, mode restored, as a fraction (3 trials)"
        )
