"""Checks of exercise notebook 4 (chapter 4): the LBGAT losses, the shared optimizer, the LBGAT
step."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import losses, methods
from .harness import (
    call_learner,
    fail,
    generator,
    passed,
    prediction_verdict,
    rand_labels,
    sandbox,
    small_cnn,
    toy_scores,
    toy_train,
)
from .losscheck import (
    SHAPES,
    GradientSpec,
    LossSpec,
    Variant,
    rand_logits,
    run_gradient_check,
    run_loss_check,
)

__all__ = ["check_diagnose_guide", "check_guide_diagnosis_prediction", "check_mse_guide_gradient",
           "check_guide_width_prediction", "check_lbgat0_loss", "check_lbgat_loss",
           "check_make_optimizer"]


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
                Variant("your CE term uses the target's adversarial logits f(x′); LBGAT puts the label loss on the guide: CE(g(x), y)", lambda za, zg, y: ce(za, y) + mse(za, zg)),
                Variant("your MSE compares probabilities (softmax); LBGAT's MSE is between the logits f(x′) and g(x)", lambda za, zg, y: ce(zg, y) + mse(F.softmax(za, dim=1), F.softmax(zg, dim=1))),
                Variant("your MSE sums the squared error over the classes ({C}× too large); nn.MSELoss / F.mse_loss averages over batch × classes", lambda za, zg, y: ce(zg, y) + za.shape[1] * mse(za, zg)),
                Variant("your MSE sums over batch and classes; F.mse_loss averages them (reduction='mean')", lambda za, zg, y: ce(zg, y) + za.numel() * mse(za, zg)),
                Variant("you left out CE(g(x), y): without it nothing ties the guide to the labels", lambda za, zg, y: mse(za, zg)),
                Variant("you left out MSE(f(x′), g(x)), the term through which the target learns from the guide", lambda za, zg, y: ce(zg, y)),
            ],
            grad_hints={
                "logits_guide": "LBGAT trains the guide through both CE and MSE: don't detach g(x) in the MSE.",
                "logits_adv": "The target learns only through MSE(f(x′), g(x)): keep f(x′) in the graph.",
            },
            passed="CE(g(x), y) + MSE(f(x′), g(x)) as losses.lbgat_loss with β = 0 (value and gradients, 6 trials)",
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
                Variant("KL direction reversed: you computed KL(p_f(x′) ‖ p_f(x)); LBGAT's β-term is TRADES' KL(p_f(x) ‖ p_f(x′))", lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(za, logits_nat)),
                Variant("your β-term compares the guide with the target (KL(p_g(x) ‖ p_f(x′))); LBGAT's β-term is the target's own TRADES KL(p_f(x) ‖ p_f(x′)), with logits_nat = f(x)", lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(zg, za)),
                Variant(
                    "your KL averages over batch × classes (1/{C} of the per-sample KL); LBGAT's β-term is TRADES' KL summed over classes and averaged over the batch",
                    lambda za, zg, y, beta, logits_nat: (
                        lb0(za, zg, y) + beta * kl(logits_nat, za) / za.shape[1]
                    ),
                ),
                Variant(
                    "you ignored the `beta` argument (your value matches β = 6): use the beta passed in",
                    lambda za, zg, y, beta, logits_nat: (
                        None if beta == 6.0 else lb0(za, zg, y) + 6.0 * kl(logits_nat, za)
                    ),
                ),
                Variant("you dropped the β-term: with β > 0 add β·KL(p_f(x) ‖ p_f(x′)) (logits_nat = f(x))", lambda za, zg, y, beta, logits_nat: lb0(za, zg, y)),
                Variant(
                    "your CE term uses the target's clean logits f(x); LBGAT puts the label loss on the guide g(x)",
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
            passed="CE(g(x), y) + MSE(f(x′), g(x)) + β·KL(p_f(x) ‖ p_f(x′)) as losses.lbgat_loss (β ∈ {0, 1, 2, 6})",
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
                fail(task, f"{missing} of the {role}'s parameter tensors are not in the optimizer: LBGAT/D2R train target *and* guide with one SGD over [target.parameters(), guide.parameters()]")
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
                    fail(task, f"{label} = {group.get(key)!r}; the official code uses {want[key]!r}{extra}")
        passed(task, f"SGD over target and guide, lr {want['lr']}, momentum {want['momentum']}, weight decay {want['weight_decay']}, no Nesterov, as methods.make_optimizer")


# ------------------------------------------------------------------------------------ predict
@functools.lru_cache(maxsize=1)
def _width_runs() -> tuple:
    """(guide width, target clean, target PGD-20, guide clean) of LBGAT0 on two moons, seed 0."""
    rows = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for width in (4, 128):
            run = toy_train("lbgat", lr=0.05, guide_width=width, eps=0.05, step_size=0.0125,
                            steps=5)
            rows.append((width, *toy_scores(run.target, 0.05), toy_scores(run.guide, 0.05)[0]))
    return tuple(rows)


def check_guide_width_prediction(predicted_better_width) -> None:
    """Task (predict): the guide width (4 or 128) with which LBGAT's target is more accurate."""
    task = "predict: LBGAT's guide width"
    allowed = (4, 128, "same")
    if isinstance(predicted_better_width, bool) or predicted_better_width not in allowed:
        prediction_verdict(task, predicted_better_width, allowed, None, "")
    (_, t4, r4, g4), (_, t128, r128, g128) = _width_runs()
    measured = 128 if t128 > t4 + 0.02 else 4 if t4 > t128 + 0.02 else "same"
    why = (f"two moons, seed 0, target width 32, ε = 0.05: guide width 4 — guide {g4:.1%}, target clean {t4:.1%} / PGD-20 {r4:.1%}; guide width 128 — guide {g128:.1%}, target clean {t128:.1%} / PGD-20 {r128:.1%}. In LBGAT0 the target never sees the labels: it learns only by matching the guide's logits (MSE), so it inherits the guide's accuracy")
    prediction_verdict(task, predicted_better_width, allowed, measured, why)


# ------------------------------------------------------------------------------------ diagnose
_DIAGNOSES = ("under-confident", "over-confident", "calibrated")


def _soft_labels(n: int, c: int, right: float, confidence: float) -> tuple:
    """n soft labels over c classes, each putting `confidence` on its argmax; the argmax is the
    label for the first `right` fraction, another class for the rest."""
    y = torch.arange(n) % c
    top = torch.where(torch.arange(n) < round(right * n), y, (y + 1) % c)
    probs = torch.full((n, c), (1 - confidence) / (c - 1))
    probs[torch.arange(n), top] = confidence
    return probs, y


def check_diagnose_guide(fn) -> None:
    """Task (diagnose): ``diagnose_guide(probs, y)`` compares the mean top probability with the
    accuracy: 'under-confident' / 'over-confident' when it is below / above by more than 0.05."""
    task = "diagnose_guide"
    cases = [  # (probs, y, verdict, what, {wrong answer: why it is wrong})
        (*_soft_labels(200, 10, 1.0, 0.3), "under-confident",
         "a guide with flat soft labels that is always right",
         {"over-confident": "mind the sign: under-confident means the confidence (0.3) is below the accuracy (100 %)",
          "calibrated": "a confidence of 0.3 with 100 % accuracy is not calibrated"}),
        (*_soft_labels(200, 10, 0.5, 0.9), "over-confident",
         "a guide 90 % sure and right half the time",
         {"calibrated": "the confidence is the probability of the predicted class (the largest one), not of the true class: here 0.9, against 50 % accuracy",
          "under-confident": "mind the sign: over-confident means the confidence is above the accuracy"}),
        (*_soft_labels(200, 10, 0.8, 0.8), "calibrated",
         "a guide 80 % sure and right 80 % of the time",
         {"under-confident": "the confidence is the probability of the predicted class, not of the true class: 0.8 here, exactly the accuracy"}),
        (*_soft_labels(200, 10, 0.15, 0.15), "calibrated", "a near-uniform guide at chance",
         {"under-confident": "compare the confidence with the accuracy, not with 1/C: a guide at chance that says so is calibrated"}),
        (*_soft_labels(200, 10, 0.72, 0.7), "calibrated",
         "a guide 70 % sure and right 72 % of the time",
         {"under-confident": "a gap of 2 points is within the 0.05 tolerance: calibrated"}),
    ]
    with sandbox(task, fn):
        for probs, y, want, what, why in cases:
            got = call_learner(task, fn, probs.clone(), y.clone())
            if got not in _DIAGNOSES:
                fail(task, f"return one of {', '.join(map(repr, _DIAGNOSES))}; got {got!r}")
            if got != want:
                fail(task, f"for {what} you said {got!r}, not {want!r}: {why.get(got, 'compare the mean top probability with the accuracy')}")
        passed(task, "flat-but-right, sure-but-wrong, calibrated and chance-level guides all diagnosed")


def check_guide_diagnosis_prediction(prediction, rows) -> None:
    """Task (predict, then run): the diagnosis of D2R's and LBGAT's guides on the 2-D world, graded
    against the learner's rows (dicts with method, seed, diagnosis)."""
    task = "predict: whose guide is under-confident"
    names = ("d2r", "lbgat")
    if not isinstance(prediction, dict) or set(prediction) != set(names) or any(
            v not in _DIAGNOSES for v in prediction.values()):
        fail(task, f"prediction must be a dict {{'d2r': ..., 'lbgat': ...}}, each one of {', '.join(map(repr, _DIAGNOSES))}; got {prediction!r}")
    try:
        seen = {m: [r["diagnosis"] for r in rows if r["method"] == m] for m in names}
    except (TypeError, KeyError):
        fail(task, "rows must be the list of dicts with 'method', 'seed' and 'diagnosis' that the cell above builds")
    for m in names:
        if len(seen[m]) < 2:
            fail(task, f"rows hold {len(seen[m])} run(s) of {m!r}; run at least 2 seeds")
        if len(set(seen[m])) > 1:
            passed(task, f"{m}: the seeds disagree ({', '.join(seen[m])}): undecided, so your {prediction[m]!r} is neither confirmed nor refuted")
            continue
        measured = seen[m][0]
        if prediction[m] != measured:
            fail(task, f"you predicted {m}'s guide {prediction[m]!r}; every seed says {measured!r}. CE is the only term that pulls a guide towards the labels; the MSE (and in D2R the KL terms) pull it towards the target's uncertain prediction on x′")
        passed(task, f"{m}'s guide is {measured} at every seed, as you predicted")


# ------------------------------------------------------------------------------------- derive
_MSE_GUIDE_GRADIENT = GradientSpec(
    task="mse_guide_gradient", names=("z_adv", "z_guide"), loss=F.mse_loss, seed_scale=1000,
    mistakes=[
        (lambda want, za, zg: -want, "the sign is flipped: the MSE grows when g(x) moves away from f(x′)", (1e-5, 1e-6)),
        (lambda want, za, zg: za.numel() * want, "your gradient sums over the elements: the MSE averages over B × C (B = {B}, C = {C})", (1e-4, 1e-7)),
        (lambda want, za, zg: 0.5 * want, "your gradient misses the 2 of the derivative of a square (B = {B}, C = {C})", (1e-4, 1e-7)),
        (lambda want, za, zg: za.shape[1] * want, "your gradient divides by B only: the MSE averages over B × C (B = {B}, C = {C})", (1e-4, 1e-7)),
        (lambda want, za, zg: za.shape[0] * want, "your gradient divides by C only: the MSE averages over B × C (B = {B}, C = {C})", (1e-4, 1e-7)),
    ],
    passed="∂MSE/∂g(x) = 2 (g(x) − f(x′)) / (B·C), as autograd: the guide is pulled towards the target's adversarial logits as much as the target towards it")


def check_mse_guide_gradient(fn) -> None:
    """Task (derive): ``mse_guide_gradient(z_adv, z_guide)`` = ∂ MSE(f(x′), g(x)) / ∂ g(x)."""
    run_gradient_check(_MSE_GUIDE_GRADIENT, fn)
