"""Checks of exercise notebook 4 (chapter 4): the LBGAT losses, the shared optimizer, the LBGAT
step."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import losses, methods
from . import toy2d
from .harness import (
    call_learner,
    fail,
    generator,
    passed,
    prediction_verdict,
    rand_labels,
    sandbox,
    small_cnn,
)
from .losscheck import (
    SHAPES,
    LossSpec,
    Variant,
    rand_logits,
    run_loss_check,
)

__all__ = [
    "check_guide_width_prediction",
    "check_lbgat0_loss",
    "check_lbgat_loss",
    "check_make_optimizer",
]


# ------------------------------------------------------------------------------------------ ch. 4
def _triple_case(base_seed, with_beta=False):
    def case(t):
        b, c, s = SHAPES[t]
        g = generator(base_seed + t)
        z_nat = rand_logits(g, b, c, 2 * s)
        z_adv = z_nat + rand_logits(g, b, c, s)
        z_guide = rand_logits(g, b, c, 2 * s)
        y = rand_labels(g, b, c)
        if with_beta:
            return (z_adv, z_guide, y), {
                "beta": [6.0, 0.0, 2.0, 6.0, 1.0, 6.0][t],
                "logits_nat": z_nat,
            }
        return (z_adv, z_guide, y), {}

    return case


def check_lbgat0_loss(fn) -> None:
    """Task: ``lbgat0_loss(logits_adv, logits_guide, y)`` = CE(g(x), y) + MSE(f(x′), g(x)) (LBGAT, β
    = 0)."""
    ce, mse = F.cross_entropy, F.mse_loss
    run_loss_check(
        LossSpec(
            task="lbgat0_loss",
            names=("logits_adv", "logits_guide", "y"),
            reference=losses.lbgat_loss,
            make_case=_triple_case(400),
            trials=6,
            grad_names=("logits_adv", "logits_guide"),
            variants=[
                Variant(
                    "your CE term uses the target's adversarial logits f(x′); LBGAT puts the label "
                    "loss on the "
                    "guide: CE(g(x), y)",
                    lambda za, zg, y: ce(za, y) + mse(za, zg),
                ),
                Variant(
                    "your MSE compares probabilities (softmax); LBGAT's MSE is between the logits "
                    "f(x′) and g(x)",
                    lambda za, zg, y: ce(zg, y) + mse(F.softmax(za, dim=1), F.softmax(zg, dim=1)),
                ),
                Variant(
                    "your MSE sums the squared error over the classes ({C}× too large); nn.MSELoss "
                    "/ F.mse_loss "
                    "averages over batch × classes",
                    lambda za, zg, y: ce(zg, y) + za.shape[1] * mse(za, zg),
                ),
                Variant(
                    "your MSE sums over batch and classes; F.mse_loss averages them "
                    "(reduction='mean')",
                    lambda za, zg, y: ce(zg, y) + za.numel() * mse(za, zg),
                ),
                Variant(
                    "you left out CE(g(x), y): without it nothing ties the guide to the labels",
                    lambda za, zg, y: mse(za, zg),
                ),
                Variant(
                    "you left out MSE(f(x′), g(x)), the term through which the target learns from "
                    "the guide",
                    lambda za, zg, y: ce(zg, y),
                ),
            ],
            grad_hints={
                "logits_guide": "LBGAT trains the guide through both CE and MSE: don't detach g(x) "
                "in the MSE.",
                "logits_adv": "The target learns only through MSE(f(x′), g(x)): keep f(x′) in the "
                "graph.",
            },
            passed="CE(g(x), y) + MSE(f(x′), g(x)) as losses.lbgat_loss with β = 0 (value and "
            "gradients, 6 trials)",
        ),
        fn,
    )


def check_lbgat_loss(fn) -> None:
    """Task: ``lbgat_loss(logits_adv, logits_guide, y, beta=0.0, logits_nat=None)``
    = CE(g(x), y) + MSE(f(x′), g(x)) + β·KL(p_f(x) ‖ p_f(x′))."""
    lb0, kl = (lambda za, zg, y: losses.lbgat_loss(za, zg, y)), losses.trades_kl

    def ref(za, zg, y, beta, logits_nat):
        return losses.lbgat_loss(za, zg, y, beta=beta, logits_nat=logits_nat)

    run_loss_check(
        LossSpec(
            task="lbgat_loss",
            names=("logits_adv", "logits_guide", "y"),
            reference=ref,
            make_case=_triple_case(500, with_beta=True),
            trials=6,
            grad_names=("logits_adv", "logits_guide"),
            variants=[
                Variant(
                    "KL direction reversed: you computed KL(p_f(x′) ‖ p_f(x)); LBGAT's β-term is "
                    "TRADES' "
                    "KL(p_f(x) ‖ p_f(x′))",
                    lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(za, logits_nat),
                ),
                Variant(
                    "your β-term compares the guide with the target (KL(p_g(x) ‖ p_f(x′))); "
                    "LBGAT's β-term is the "
                    "target's own TRADES KL(p_f(x) ‖ p_f(x′)), with logits_nat = f(x)",
                    lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(zg, za),
                ),
                Variant(
                    "your KL averages over batch × classes (1/{C} of the per-sample KL); LBGAT's "
                    "β-term is TRADES' "
                    "KL summed over classes and averaged over the batch",
                    lambda za, zg, y, beta, logits_nat: (
                        lb0(za, zg, y) + beta * kl(logits_nat, za) / za.shape[1]
                    ),
                ),
                Variant(
                    "you ignored the `beta` argument (your value matches β = 6): use the beta "
                    "passed in",
                    lambda za, zg, y, beta, logits_nat: (
                        None if beta == 6.0 else lb0(za, zg, y) + 6.0 * kl(logits_nat, za)
                    ),
                ),
                Variant(
                    "you dropped the β-term: with β > 0 add β·KL(p_f(x) ‖ p_f(x′)) (logits_nat = "
                    "f(x))",
                    lambda za, zg, y, beta, logits_nat: lb0(za, zg, y),
                ),
                Variant(
                    "your CE term uses the target's clean logits f(x); LBGAT puts the label loss "
                    "on the guide g(x)",
                    lambda za, zg, y, beta, logits_nat: (
                        F.cross_entropy(logits_nat, y)
                        + F.mse_loss(za, zg)
                        + beta * kl(logits_nat, za)
                    ),
                ),
            ],
            grad_hints={
                "logits_guide": "LBGAT trains the guide through CE and MSE: don't detach g(x)."
            },
            passed="CE(g(x), y) + MSE(f(x′), g(x)) + β·KL(p_f(x) ‖ p_f(x′)) as losses.lbgat_loss "
            "(β ∈ {0, 1, 2, 6})",
        ),
        fn,
    )


def check_make_optimizer(fn) -> None:
    """Task: ``make_optimizer(target, guide)``: one SGD over both models with the official
    hyperparameters."""
    task = "make_optimizer"
    with sandbox(task, fn):
        t, g = small_cnn(10, 1900, width=4), small_cnn(10, 1901, width=4)
        opt = call_learner(task, fn, t, g)
        ref = methods.make_optimizer(t, g)
        if not isinstance(opt, torch.optim.Optimizer):
            fail(task, f"return a torch.optim optimizer; got {type(opt).__name__}")
        if not isinstance(opt, type(ref)):
            fail(task, f"you built {type(opt).__name__}; the official code uses torch.optim.SGD")
        ids = [id(p) for group in opt.param_groups for p in group["params"]]
        if len(ids) != len(set(ids)):
            fail(task, "a parameter appears twice in your optimizer")
        for role, model in [("target", t), ("guide", g)]:
            missing = sum(id(p) not in set(ids) for p in model.parameters())
            if missing:
                fail(
                    task,
                    f"{missing} of the {role}'s parameter tensors are not in the optimizer: "
                    "LBGAT/D2R train "
                    "target *and* guide with one SGD over [target.parameters(), "
                    "guide.parameters()]",
                )
        want = ref.param_groups[0]
        names = {
            "lr": "the learning rate lr",
            "momentum": "momentum",
            "weight_decay": "weight_decay",
            "nesterov": "nesterov",
            "dampening": "dampening",
        }
        for group in opt.param_groups:
            for key, label in names.items():
                if group.get(key) != want[key]:
                    extra = (
                        " (5e-4 is a common default, but LBGAT and D2R use 2e-4)"
                        if key == "weight_decay"
                        else ""
                    )
                    fail(
                        task,
                        f"{label} = {group.get(key)!r}; the official code uses "
                        f"{want[key]!r}{extra}",
                    )
        passed(
            task,
            f"SGD over target and guide, lr {want['lr']}, momentum {want['momentum']}, weight "
            "decay "
            f"{want['weight_decay']}, no Nesterov, as methods.make_optimizer",
        )


# ------------------------------------------------------------------------------------ predict
@functools.lru_cache(maxsize=1)
def _width_runs() -> tuple:
    """(guide width, target clean, target PGD-20, guide clean) of LBGAT0 on two moons, seed 0."""
    x_test, y_test = toy2d.moons(500, 999)
    rows = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for width in (4, 128):
            target, guide = toy2d.train(
                "lbgat", seed=0, lr=0.05, guide_width=width, eps=0.05, step_size=0.0125, steps=5
            )
            rows.append(
                (
                    width,
                    toy2d.accuracy(target, x_test, y_test),
                    toy2d.pgd_accuracy(target, x_test, y_test, 0.05),
                    toy2d.accuracy(guide, x_test, y_test),
                )
            )
    return tuple(rows)


def check_guide_width_prediction(predicted_better_width) -> None:
    """Task (predict): the guide width (4 or 128) with which LBGAT's target is more accurate."""
    task = "predict: LBGAT's guide width"
    allowed = (4, 128, "same")
    if isinstance(predicted_better_width, bool) or predicted_better_width not in allowed:
        prediction_verdict(task, predicted_better_width, allowed, None, "")
    (_, t4, r4, g4), (_, t128, r128, g128) = _width_runs()
    measured = 128 if t128 > t4 + 0.02 else 4 if t4 > t128 + 0.02 else "same"
    why = (
        f"two moons, seed 0, target width 32, ε = 0.05: guide width 4 — guide {g4:.1%}, target "
        f"clean {t4:.1%} / PGD-20 {r4:.1%}; guide width 128 — guide {g128:.1%}, target clean "
        f"{t128:.1%} / PGD-20 {r128:.1%}. In LBGAT0 the target never sees the labels: it learns "
        f"only by matching the guide's logits (MSE), so it inherits the guide's accuracy"
    )
    prediction_verdict(task, predicted_better_width, allowed, measured, why)
