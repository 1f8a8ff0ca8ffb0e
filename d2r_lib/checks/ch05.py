"""Checks of exercise notebook 5 (chapter 5): the official KL helper and the D2R loss's terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import losses
from .harness import (
    PairedPrediction,
    as_float,
    call_learner,
    close,
    fail,
    generator,
    grade_prediction,
    interval_verdict,
    passed,
    rand_labels,
    sandbox,
)
from .losscheck import (
    SHAPES,
    LossSpec,
    Variant,
    exact_kl_mean,
    kbar,
    rand_logits,
    run_loss_check,
)

__all__ = ["check_reduction_prediction", "check_w_adv_prediction", "check_kl_mean_ratio",
           "check_clean_term_leading_order", "check_official_kl", "check_d2r_clean_term",
           "check_d2r_adv_term", "check_d2r_loss"]


# ------------------------------------------------------------------------------------------ ch. 5
def _dist_case(base_seed):
    def case(t):
        b, c, s = SHAPES[t]
        g = generator(base_seed + t)
        return (
            F.softmax(rand_logits(g, b, c, 2 * s), dim=1),
            F.log_softmax(rand_logits(g, b, c, 2 * s), dim=1),
        ), {}

    return case


def check_official_kl(fn) -> None:
    """Task: ``official_kl(p, log_q)`` = mean over batch × classes of p·(log(p + 1e-5) − log q)."""
    run_loss_check(
        LossSpec(
            task="official_kl",
            names=("p", "log_q"),
            reference=losses.official_kl,
            make_case=_dist_case(600),
            trials=6,
            grad_names=("p", "log_q"),
            variants=[
                Variant("you left out the +1e-5: the official helper computes p·(log(p + 1e-5) − log q), a slight upper bound of the exact KL that F.kl_div would give", exact_kl_mean),
                Variant("you summed over the classes and averaged over the batch ('batchmean'), so your value is {C}× the official K̄L, which averages over all batch × classes elements (torch.mean)", lambda p, lq: losses.official_kl(p, lq, "batchmean")),
                Variant("you summed over everything; the official K̄L is the mean over batch × classes (torch.mean)", lambda p, lq: losses.official_k(p, lq).sum()),
                Variant("KL direction reversed: you computed K̄L(Q ‖ P); the expectation is under the first argument p: p·(log(p + 1e-5) − log q)", lambda p, lq: losses.official_kl(lq.exp(), torch.log(p))),
                Variant("you added 1e-5 inside log q as well; the official code has it only in log(p + 1e-5) (log q arrives as a log-softmax)", lambda p, lq: (p * (torch.log(p + 1e-5) - torch.log(lq.exp() + 1e-5))).mean()),
                Variant("you exchanged the roles of the two logs: the formula is p·(log(p + 1e-5) − log q), not p·(log q − log(p + 1e-5))", lambda p, lq: -losses.official_kl(p, lq)),
            ],
            passed="p·(log(p + 1e-5) − log q) averaged over batch × classes, as losses.official_kl (value and gradients, 10 and 100 classes)",
        ),
        fn,
    )


def _nat_guide_case(base_seed, want_negative: tuple[int, ...]):
    """Clean/guide logits; in the trials listed, K̄L(p_f‖p_g) < K̄L(p_g‖p_f) (so a missing |·|
    shows)."""

    def case(t):
        b, c, s = SHAPES[t]
        g = generator(base_seed + t)
        zn, zg = rand_logits(g, b, c, 2 * s), rand_logits(g, b, c, 1.3 * s)
        diff = (kbar(zn, zg) - kbar(zg, zn)).item()
        if (diff < 0) != (t in want_negative):
            zn, zg = zg, zn
        return zn, zg, g

    return case


def check_d2r_clean_term(fn) -> None:
    """Task: ``d2r_clean_term(logits_nat, logits_guide)`` = |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖
    p_f(x))|."""
    base = _nat_guide_case(700, want_negative=(1, 3, 4))

    def case(t):
        zn, zg, _ = base(t)
        return (zn, zg), {}

    def terms(zn, zg, **kw):
        return losses.d2r_terms(zn, zn, zg, torch.zeros(zn.shape[0], dtype=torch.long), **kw)

    run_loss_check(
        LossSpec(
            task="d2r_clean_term",
            names=("logits_nat", "logits_guide"),
            make_case=case,
            trials=6,
            reference=lambda zn, zg: terms(zn, zg)["clean"],
            grad_names=("logits_nat", "logits_guide"),
            variants=[
                Variant("you dropped the absolute value: the clean term is |K̄L(p_f ‖ p_g) − K̄L(p_g ‖ p_f)|, and yours is negative here ({got:.3g})", lambda zn, zg: terms(zn, zg)["kl_fg"] - terms(zn, zg)["kl_gf"]),
                Variant("you dropped the absolute value (and subtracted the other way round): the clean term is |K̄L(p_f ‖ p_g) − K̄L(p_g ‖ p_f)|, and yours is negative here ({got:.3g})", lambda zn, zg: terms(zn, zg)["kl_gf"] - terms(zn, zg)["kl_fg"]),
                Variant("you added the two KLs (a symmetric divergence); the official clean term is the absolute *difference* |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|", lambda zn, zg: terms(zn, zg)["kl_fg"] + terms(zn, zg)["kl_gf"]),
                Variant("your KLs use 'batchmean' (sum over classes), {C}× the official K̄L, which averages over batch × classes", lambda zn, zg: terms(zn, zg, kl_reduction="batchmean")["clean"]),
                Variant(
                    "you left out the +1e-5 inside log(p + 1e-5): use your official_kl from Task 1 (or losses.official_kl)",
                    lambda zn, zg: (
                        exact_kl_mean(F.softmax(zn, dim=1), F.log_softmax(zg, dim=1))
                        - exact_kl_mean(F.softmax(zg, dim=1), F.log_softmax(zn, dim=1))
                    ).abs(),
                ),
                Variant("you returned a single KL, K̄L(p_f(x) ‖ p_g(x)); the clean term is the absolute difference of the two directions", lambda zn, zg: terms(zn, zg)["kl_fg"]),
                Variant("you returned a single KL, K̄L(p_g(x) ‖ p_f(x)); the clean term is the absolute difference of the two directions", lambda zn, zg: terms(zn, zg)["kl_gf"]),
                Variant("you squared the difference; the official term takes its absolute value", lambda zn, zg: (terms(zn, zg)["kl_fg"] - terms(zn, zg)["kl_gf"]) ** 2),
            ],
            passed="|K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))| as losses.d2r_terms(...)['clean'] (both signs of the difference, value and gradients)",
        ),
        fn,
    )


def check_d2r_adv_term(fn) -> None:
    """Task: ``d2r_adv_term(logits_adv, logits_guide)`` = K̄L(p_f(x′) ‖ p_g(x))."""

    def case(t):
        b, c, s = SHAPES[t]
        g = generator(800 + t)
        return (rand_logits(g, b, c, 2 * s), rand_logits(g, b, c, 1.5 * s)), {}

    def terms(za, zg, **kw):
        return losses.d2r_terms(za, za, zg, torch.zeros(za.shape[0], dtype=torch.long), **kw)

    run_loss_check(
        LossSpec(
            task="d2r_adv_term",
            names=("logits_adv", "logits_guide"),
            make_case=case,
            trials=6,
            reference=lambda za, zg: terms(za, zg)["adv"],
            grad_names=("logits_adv", "logits_guide"),
            variants=[
                Variant("KL direction reversed: you computed K̄L(p_g(x) ‖ p_f(x′)), the TRADES/CAG direction; D2R's adversarial term is K̄L(p_f(x′) ‖ p_g(x)) = official_kl(p_f(x′), log p_g(x))", lambda za, zg: kbar(zg, za)),
                Variant("your KL uses 'batchmean' (sum over classes), {C}× the official K̄L, which averages over batch × classes", lambda za, zg: terms(za, zg, kl_reduction="batchmean")["adv"]),
                Variant("you left out the +1e-5 inside log(p + 1e-5): use your official_kl from Task 1", lambda za, zg: exact_kl_mean(F.softmax(za, dim=1), F.log_softmax(zg, dim=1))),
                Variant("you computed TRADES' KL(p_g(x) ‖ p_f(x′)) (batchmean, exact): D2R's adversarial term is K̄L(p_f(x′) ‖ p_g(x)), averaged over batch × classes, with the +1e-5", lambda za, zg: losses.trades_kl(zg, za)),
                Variant("you computed TRADES' per-sample KL(p_f(x′) ‖ p_g(x)) (batchmean, no +1e-5): the official K̄L averages over batch × classes and has log(p + 1e-5)", lambda za, zg: losses.trades_kl(za, zg)),
            ],
            passed="K̄L(p_f(x′) ‖ p_g(x)) as losses.d2r_terms(...)['adv'] (value and gradients, 6 trials)",
        ),
        fn,
    )


_WEIGHTS = [(20.0, 30.0), (20.0, 30.0), (5.0, 7.0), (20.0, 30.0), (1.0, 2.0), (20.0, 30.0)]


def _d2r_with(**swap):
    """A variant of the D2R loss in which some of ce, mse, clean, adv are replaced: each swap is
    a function (terms, za, zn, zg, y) -> value; the weights multiply clean and adv as usual, unless
    `weights` swaps them."""
    def variant(za, zn, zg, y, w_clean, w_adv):
        t = losses.d2r_terms(za, zn, zg, y)
        part = {k: (swap[k](t, za, zn, zg, y) if k in swap else t[k])
                for k in ("ce", "mse", "clean", "adv")}
        wc, wa = (w_adv, w_clean) if swap.get("weights") == "swapped" else (w_clean, w_adv)
        return part["ce"] + part["mse"] + wc * part["clean"] + wa * part["adv"]
    return variant


_ZERO = lambda t, *_: 0.0
_NO_ABS = "the clean term lost its absolute value: it is |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|"
_D2R_VARIANTS = [
    Variant("your CE term uses the target's clean logits f(x); D2R (like LBGAT) puts the label loss on the guide: CE(g(x), y)", _d2r_with(ce=lambda t, za, zn, zg, y: F.cross_entropy(zn, y))),
    Variant("your CE term uses the target's adversarial logits f(x′); D2R puts the label loss on the guide: CE(g(x), y)", _d2r_with(ce=lambda t, za, zn, zg, y: F.cross_entropy(za, y))),
    Variant("your MSE compares f(x) with g(x); D2R's MSE is between the adversarial logits f(x′) and g(x)", _d2r_with(mse=lambda t, za, zn, zg, y: F.mse_loss(zn, zg))),
    Variant("the weights are swapped: w_clean multiplies the clean term |K̄L(p_f‖p_g) − K̄L(p_g‖p_f)| and w_adv the adversarial term K̄L(p_f(x′) ‖ p_g(x))", _d2r_with(weights="swapped")),
    Variant("adversarial term in the TRADES/CAG direction: you computed K̄L(p_g(x) ‖ p_f(x′)); D2R's adversarial term is K̄L(p_f(x′) ‖ p_g(x))", _d2r_with(adv=lambda t, za, zn, zg, y: kbar(zg, za))),
    Variant(_NO_ABS, _d2r_with(clean=lambda t, *_: t["kl_fg"] - t["kl_gf"])),
    Variant(_NO_ABS, _d2r_with(clean=lambda t, *_: t["kl_gf"] - t["kl_fg"])),
    Variant("your KL terms use 'batchmean' (the per-sample KL), {C}× the official K̄L, which averages over batch × classes", lambda za, zn, zg, y, w_clean, w_adv: losses.d2r_loss(za, zn, zg, y, w_clean=w_clean, w_adv=w_adv, kl_reduction="batchmean")),
    Variant("you ignored w_clean / w_adv (your value matches the defaults 20 and 30): use the weights passed in", lambda za, zn, zg, y, w_clean, w_adv: None if (w_clean, w_adv) == (20.0, 30.0) else losses.d2r_loss(za, zn, zg, y)),
    Variant("you left out the clean-distribution term w_clean·|K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|", _d2r_with(clean=_ZERO)),
    Variant("you left out the adversarial-distribution term w_adv·K̄L(p_f(x′) ‖ p_g(x))", _d2r_with(adv=_ZERO)),
    Variant("you left out MSE(f(x′), g(x)) (LBGAT's core term, kept by D2R)", _d2r_with(mse=_ZERO)),
]


def check_d2r_loss(fn) -> None:
    """Task: ``d2r_loss(logits_adv, logits_nat, logits_guide, y, w_clean=20.0, w_adv=30.0)``
    (losses.d2r_loss)."""
    base = _nat_guide_case(900, want_negative=(0, 2))

    def case(t):
        zn, zg, g = base(t)
        b, c = zn.shape
        za = zn + rand_logits(g, b, c, 1.0)
        w_clean, w_adv = _WEIGHTS[t]
        return (za, zn, zg, rand_labels(g, b, c)), {"w_clean": w_clean, "w_adv": w_adv}

    run_loss_check(LossSpec(
        task="d2r_loss", names=("logits_adv", "logits_nat", "logits_guide", "y"),
        reference=losses.d2r_loss, make_case=case, trials=6,
        grad_names=("logits_adv", "logits_nat", "logits_guide"), variants=_D2R_VARIANTS,
        grad_hints={"logits_guide": "In D2R nothing is detached: g(x) gets gradients from CE, MSE and both KL terms.", "logits_nat": "f(x) enters only the clean term; keep it in the graph."},
        passed="CE(g(x), y) + MSE(f(x′), g(x)) + w_clean·|K̄L(p_f‖p_g) − K̄L(p_g‖p_f)| + w_adv·K̄L(p_f(x′) ‖ p_g(x)) as losses.d2r_loss (weights 20/30 and others, value and gradients w.r.t. all three logits)",
    ), fn)


# ------------------------------------------------------------------------------------ derive
def check_kl_mean_ratio(fn) -> None:
    """Task (derive): ``kl_mean_ratio(batch, classes)`` = official K̄L ('mean') / per-sample KL
    ('batchmean')."""
    task = "kl_mean_ratio"
    with sandbox(task, fn):
        for trial, (b, c) in enumerate([(8, 10), (3, 100), (32, 7)]):
            g = generator(2700 + trial)
            p = F.softmax(rand_logits(g, b, c, 2.0), dim=1)
            log_q = F.log_softmax(rand_logits(g, b, c, 2.0), dim=1)
            measured = (
                losses.official_kl(p, log_q, "mean") / losses.official_kl(p, log_q, "batchmean")
            ).item()
            got = as_float(task, call_learner(task, fn, b, c), "the ratio")
            if close(got, measured, 1e-9, 1e-12):
                continue
            for wrong, message in [
                (c, "inverted: 'batchmean' sums over the classes, so it is the *larger* one"),
                (1 / (b * c), "'batchmean' already divides by the batch size; only the classes remain"),
                (1 / b, "both reductions average over the batch; they differ in what they do over the classes"),
                (b, "both reductions average over the batch; they differ in what they do over the classes"),
            ]:
                if close(got, wrong, 1e-9, 1e-12):
                    fail(task, f"your ratio {got:.4g} for batch {b}, {c} classes is {message}")
            fail(task, f"your ratio {got:.4g} differs from the measured {measured:.4g} (batch {b}, {c} classes): write both reductions as sums over i and c and divide")
        passed(task, "K̄L (mean over batch × classes) = KL (batchmean) / C: the official D2R weights 20 and 30 act on KL/10 for CIFAR-10 (3 shapes)")


def _exact_clean(p_f, p_g):
    """|mean(p_f log(p_f/p_g)) − mean(p_g log(p_g/p_f))|: the clean term without the +1e-5."""
    return (p_f * (p_f.log() - p_g.log()) - p_g * (p_g.log() - p_f.log())).mean().abs()


def check_clean_term_leading_order(fn) -> None:
    """Task (derive): ``clean_term_leading_order(p_f, p_g)``: the small-difference law of D2R's
    clean term."""
    task = "clean_term_leading_order"
    with sandbox(task, fn):
        g = generator(2800)
        b, c = 6, 10
        p_f = F.softmax(rand_logits(g, b, c, 1.0), dim=1)
        direction = rand_logits(g, b, c, 1.0)
        rows = []
        for t in (1e-2, 1e-3, 1e-4):
            p_g = F.softmax(p_f.log() + t * direction, dim=1)
            got = call_learner(task, fn, p_f.clone(), p_g.clone())
            got = as_float(task, got.item() if isinstance(got, torch.Tensor) and got.numel() == 1
                           else got, "the leading-order value")
            exact = _exact_clean(p_f, p_g).item()
            delta = p_g - p_f
            second = (delta**2 / (2 * p_f)).mean().item()
            if close(got, second, 0.05, 0):
                fail(task, "your value is Σ δ²/(2p): the leading order of *each* KL. In the difference of the two directions these second-order terms cancel; expand both KLs one order further")
            if close(got, 6 * exact, 0.05, 0):
                fail(task, "your value is 6× the clean term: check the coefficient of the third-order term (−1/3 from one direction, −1/6 from the other)")
            if close(got, 2 * exact, 0.05, 0):
                fail(task, "your value is 2× the clean term: check the coefficient of the third-order term")
            rows.append((t, got, exact))
        t, got, exact = rows[-1]
        if not close(got, exact, 0.03, 0):
            fail(task, f"at a difference of size {t:g} your value {got:.4g} differs from the exact clean term {exact:.4g} by {abs(got / exact - 1):.0%}: a leading-order law must agree more and more closely as the difference shrinks")
        order = math.log(rows[0][2] / rows[-1][2]) / math.log(rows[0][0] / rows[-1][0])
        passed(task, f"your law matches the exact clean term to {abs(got / exact - 1):.1%} at δ ~ {t:g}; the term shrinks like δ^{order:.2f}: third order, where each KL alone is second order")


_W_ADV_KEYS = ("robustness", "guide_confidence")


def check_w_adv_prediction(prediction, rows) -> None:
    """Task (predict, then run): how the 2-D world's exact robust accuracy and the guide's
    true-class probability move from the smallest to the largest w_adv, graded against the
    learner's sweep (`rows`: dicts with w_adv, seed, exact, guide_true_prob)."""
    task = "predict: the w_adv sweep"
    if not isinstance(prediction, dict) or set(prediction) != set(_W_ADV_KEYS):
        fail(task, f"prediction must be a dict with the keys {', '.join(map(repr, _W_ADV_KEYS))}, each 'rises' or 'falls'; got {prediction!r}")
    try:
        by = {(float(r["w_adv"]), int(r["seed"])): r for r in rows}
    except (TypeError, KeyError, ValueError):
        fail(task, "rows must be the sweep's list of dicts with the keys 'w_adv', 'seed', 'exact' and 'guide_true_prob'")
    doses = sorted({w for w, _ in by})
    low, high = doses[0], doses[-1]
    seeds = sorted(s for w, s in by if w == low and (high, s) in by)
    if low == high or len(seeds) < 2:
        fail(task, "the sweep needs at least two w_adv values and two seeds run at both ends")
    for key, metric, what in (("robustness", "exact", "exact robust accuracy"),
                              ("guide_confidence", "guide_true_prob",
                               "the guide's mean probability of the true class")):
        diffs = [by[(high, s)][metric] - by[(low, s)][metric] for s in seeds]
        why = (f"{what} at w_adv = {high:g} minus at w_adv = {low:g}, {len(seeds)} seeds. The adversarial term pulls the guide's clean prediction towards the target's uncertain prediction on x′ (nothing is detached), so the guide's soft labels flatten, and a target that copies flat soft labels learns a softer boundary")
        interval_verdict(f"{task} ({key})", prediction[key], ("rises", "falls"), diffs,
                         ("rises", "falls"), why)


_REDUCTION = PairedPrediction("predict: the KL reduction", "batchmean", "mean", ("rises", "falls"), "'batchmean' − 'mean' over {n} seeds, exact robust accuracy. 'batchmean' multiplies both KL weights by C (2 on this world): the same dose as a larger w_adv")


def check_reduction_prediction(predicted_trend, rows) -> None:
    """Task (predict, then run): exact robust accuracy of D2R with every KL 'batchmean' minus with
    the official 'mean', per seed, on the 2-D world."""
    grade_prediction(_REDUCTION, predicted_trend, rows)
