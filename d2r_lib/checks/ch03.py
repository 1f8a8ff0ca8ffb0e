"""Checks of exercise notebook 3 (chapter 3): TRADES' KL, loss, attack and step."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import attacks, losses
from .attackcheck import (
    AttackSpec,
    attack_cases,
    p_clean,
    p_logits,
    run_attack_check,
    wrong_attack,
)
from .harness import (
    PairedPrediction,
    generator,
    grade_prediction,
    prediction_verdict,
    rand_labels,
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

__all__ = ["check_beta_robust_prediction", "check_kl_adv_gradient", "check_gap_reading",
           "check_beta_prediction", "check_trades_kl", "check_trades_loss", "check_trades_attack"]


# ------------------------------------------------------------------------------------------ ch. 3
def _trades_variants():
    kl = losses.trades_kl
    return [
        Variant("KL direction reversed: you computed KL(p(x′) ‖ p(x)); TRADES' regulariser is KL(p(x) ‖ p(x′)) = Σ p(x)·(log p(x) − log p(x′)), i.e. F.kl_div(F.log_softmax(logits_adv), F.softmax(logits_nat))", lambda zn, za: kl(za, zn)),
        Variant("you averaged over batch × classes (F.kl_div's reduction='mean'), so your value is 1/{C} of TRADES' KL, which sums over the classes and averages over the batch (reduction='batchmean', or 'sum' divided by the batch size)", lambda zn, za: kl(zn, za) / zn.shape[1]),
        Variant("you summed over the batch as well (your value is {B}× too large): divide by the batch size (reduction='batchmean')", lambda zn, za: kl(zn, za) * zn.shape[0]),
        Variant(
            "F.kl_div's first argument must be log-probabilities: you passed probabilities (use F.log_softmax(logits_adv, dim=1))",
            lambda zn, za: (
                F.kl_div(F.softmax(za, dim=1), F.softmax(zn, dim=1), reduction="sum") / zn.shape[0]
            ),
        ),
        Variant("F.kl_div's first argument must be log-probabilities: you passed the raw logits (use F.log_softmax(logits_adv, dim=1))", lambda zn, za: F.kl_div(za, F.softmax(zn, dim=1), reduction="sum") / zn.shape[0]),
        Variant(
            "you took the softmax over the batch (dim=0); the distributions are over the classes: dim=1",
            lambda zn, za: (
                F.kl_div(F.log_softmax(za, dim=0), F.softmax(zn, dim=0), reduction="sum")
                / zn.shape[0]
            ),
        ),
    ]


def _pair_case(base_seed):
    def case(t):
        b, c, s = SHAPES[t]
        g = generator(base_seed + t)
        z_nat = rand_logits(g, b, c, 2 * s)
        return (z_nat, z_nat + rand_logits(g, b, c, s)), {}

    return case


def check_trades_kl(fn) -> None:
    """Task: ``trades_kl(logits_nat, logits_adv)`` = KL(p(x) ‖ p(x′)), batchmean
    (losses.trades_kl)."""
    run_loss_check(
        LossSpec(
            task="trades_kl",
            names=("logits_nat", "logits_adv"),
            reference=losses.trades_kl,
            make_case=_pair_case(200),
            trials=6,
            grad_names=("logits_nat", "logits_adv"),
            variants=_trades_variants(),
            grad_hints={
                "logits_nat": "TRADES backpropagates through p(x) as well: don't detach the clean distribution."
            },
            passed="KL(p(x) ‖ p(x′)) summed over classes, averaged over the batch, as losses.trades_kl (value and gradients, 6 trials)",
        ),
        fn,
    )


_BETAS = [6.0, 6.0, 1.0, 6.0, 2.5, 0.5]


def check_trades_loss(fn) -> None:
    """Task: ``trades_loss(logits_nat, logits_adv, y, beta=6.0)`` = CE(f(x), y) + β·KL(p(x) ‖
    p(x′))."""
    pair = _pair_case(300)

    def case(t):
        (zn, za), _ = pair(t)
        return (zn, za, rand_labels(generator(350 + t), *zn.shape)), {"beta": _BETAS[t]}

    ce, kl = F.cross_entropy, losses.trades_kl
    run_loss_check(
        LossSpec(
            task="trades_loss",
            names=("logits_nat", "logits_adv", "y"),
            reference=losses.trades_loss,
            make_case=case,
            trials=6,
            grad_names=("logits_nat", "logits_adv"),
            variants=[
                Variant("your CE term uses the adversarial logits f(x′); TRADES takes the CE on the clean logits: CE(f(x), y) + β·KL(p(x) ‖ p(x′))", lambda zn, za, y, beta: ce(za, y) + beta * kl(zn, za)),
                Variant("KL direction reversed: you computed KL(p(x′) ‖ p(x)); TRADES uses KL(p(x) ‖ p(x′))", lambda zn, za, y, beta: ce(zn, y) + beta * kl(za, zn)),
                Variant("your KL averages over batch × classes (reduction='mean'), 1/{C} of TRADES' KL, which sums over the classes and averages over the batch ('batchmean')", lambda zn, za, y, beta: ce(zn, y) + beta * kl(zn, za) / zn.shape[1]),
                Variant("your KL is summed over the batch too (reduction='sum' without dividing by the batch size {B})", lambda zn, za, y, beta: ce(zn, y) + beta * kl(zn, za) * zn.shape[0]),
                Variant("β multiplies the wrong term: TRADES is CE + β·KL, not β·CE + KL", lambda zn, za, y, beta: beta * ce(zn, y) + kl(zn, za)),
                Variant("you ignored the `beta` argument (your value matches β = 6): use the beta passed in", lambda zn, za, y, beta: None if beta == 6.0 else ce(zn, y) + 6.0 * kl(zn, za)),
                Variant(
                    "you left out the KL term β·KL(p(x) ‖ p(x′))", lambda zn, za, y, beta: ce(zn, y)
                ),
                Variant("you left out the CE term CE(f(x), y)",
                        lambda zn, za, y, beta: beta * kl(zn, za)),
                Variant("you used CE on x′ and the reversed KL: TRADES is CE(f(x), y) + β·KL(p(x) ‖ p(x′))", lambda zn, za, y, beta: ce(za, y) + beta * kl(za, zn)),
            ],
            grad_hints={
                "logits_nat": "TRADES backpropagates through p(x) in the KL too: don't detach it."
            },
            passed="CE(f(x), y) + β·KL(p(x) ‖ p(x′)) as losses.trades_loss (β ∈ {0.5, 1, 2.5, 6}, value and gradients)",
        ),
        fn,
    )


def check_trades_attack(fn) -> None:
    """Task: ``trades_attack(model, x, eps, step_size, steps)``: ascend Σ KL(p(x) ‖ p(x′)) from x +
    0.001·N(0, I)."""

    def kl_obj(model, x, reverse=False):
        p = p_clean(model, x)
        if reverse:
            return lambda z: F.kl_div(
                p.clamp_min(1e-30).log(), F.softmax(z, dim=1), reduction="sum"
            )
        return lambda z: F.kl_div(F.log_softmax(z, dim=1), p, reduction="sum")

    def wrong(reverse=False, **kw):
        options = {"start": "gaussian", **kw}
        return lambda mods, x, y, k: wrong_attack(
            mods["target"], x, kl_obj(mods["target"], x, reverse), **k, **options
        )

    def lib_pgd(start):
        return lambda mods, x, y, k: attacks.pgd(mods["target"], x, objective="kl", start=start,
                                                 reference=p_clean(mods["target"], x), **k)

    def objective(mods, x, y, xa):
        m = mods["target"]
        return F.kl_div(
            F.log_softmax(p_logits(m, xa), dim=1), p_clean(m, x), reduction="sum"
        ).item()

    run_attack_check(
        AttackSpec(
            task="trades_attack",
            norm="linf",
            random=True,
            cases=attack_cases("kl"),
            learner=lambda fn, mods, x, y, k: fn(
                mods["target"], x, k["eps"], k["step_size"], k["steps"]
            ),
            library=lambda mods, x, y, k: attacks.trades_attack(mods["target"], x, **k),
            objective=objective,
            variants=[
                ("you started from a uniformly random point of the ε-ball; TRADES starts at x + 0.001·N(0, I) (x + 0.001 * torch.randn_like(x))", lib_pgd("uniform")),
                ("no random start: TRADES starts at x + 0.001·N(0, I) (at x itself the KL's gradient is zero)", lib_pgd("clean")),
                ("KL direction reversed: you ascended KL(p(x′) ‖ p(x)); TRADES' attack ascends KL(p(x) ‖ p(x′))", wrong(reverse=True)),
                ("you stepped along the raw gradient α·∇; TRADES steps along its sign: α·sign(∇)", wrong(step="grad")),
                ("your steps go *down* the KL; the attack ascends it", wrong(descend=True)),
            ],
            passed="x + 0.001·N(0, I), sign steps on Σ KL(p(x) ‖ p(x′)), projection, [0, 1], eval mode, detached, as attacks.trades_attack (3 trials)",
        ),
        fn,
    )


# ------------------------------------------------------------------------------------ predict
_BETA_EPS = 0.05


@functools.lru_cache(maxsize=1)
def _beta_runs() -> tuple:
    """(β, clean, PGD-20) of TRADES on two moons, seed 0, β 0 → 24 (run once per process)."""
    eps = _BETA_EPS
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        return tuple((beta, *toy_scores(toy_train("trades", beta=beta, eps=eps, step_size=eps / 4,
                                                  steps=5, lr=0.05).target, eps))
                     for beta in (0.0, 1.0, 6.0, 24.0))


def check_beta_prediction(predicted_clean_trend) -> None:
    """Task (predict): how TRADES' clean accuracy moves as β grows (two-moons runs, β 0 → 24)."""
    task = "predict: TRADES β sweep"
    allowed = ("rises", "falls", "flat")
    if predicted_clean_trend not in allowed:
        prediction_verdict(task, predicted_clean_trend, allowed, None, "")
    eps, rows = _BETA_EPS, _beta_runs()
    change = rows[-1][1] - rows[0][1]
    measured = "falls" if change < -0.02 else "rises" if change > 0.02 else "flat"
    table = ", ".join(f"β {b:g}: clean {c:.1%} / PGD-20 {r:.1%}" for b, c, r in rows)
    why = (f"two moons, seed 0, ε = {eps}: {table}. β weighs the KL that pulls p(x′) towards p(x) against the CE that fits the labels: the larger β, the smoother the boundary near the data, at the price of clean accuracy (the trade-off TRADES is named after)")
    prediction_verdict(task, predicted_clean_trend, allowed, measured, why)


_BETA_ROBUST = PairedPrediction("predict: TRADES β, robustness", "beta6", "beta0", ("rises", "falls"), "β = 6 − β = 0 over {n} seeds, exact robust accuracy. At β = 0 TRADES is plain training on clean points (x′ plays no role); the KL term is what makes the boundary keep its distance from the data")


def check_beta_robust_prediction(predicted_robust_trend, rows) -> None:
    """Task (predict, then run): exact robust accuracy of TRADES at β = 6 minus at β = 0, per seed,
    on the 2-D world (rows: dicts with 'beta0' and 'beta6')."""
    grade_prediction(_BETA_ROBUST, predicted_robust_trend, rows)


_KL_ADV_GRADIENT = GradientSpec(
    task="kl_adv_gradient", names=("logits_nat", "logits_adv"), loss=losses.trades_kl,
    seed_scale=100, mistakes=[
        (lambda want, zn, za: -want, "the sign is flipped: which softmax enters with a minus sign?", (1e-5, 1e-6)),
        (lambda want, zn, za: len(za) * want, "your gradient misses the 1/B of the batch mean (B = {B})", (1e-4, 1e-6)),
        (lambda want, zn, za: (F.log_softmax(za, 1) - F.log_softmax(zn, 1)) / len(za), "that is a difference of log-probabilities; differentiate through the softmax: ∂ log p_c(x′) / ∂ z_k = 1[c = k] − p_k(x′)", (1e-5, 1e-5)),
    ],
    passed="(p(x′) − p(x)) / B, as autograd: zero at x′ = x, which is why TRADES' attack starts from x plus a little noise")


def check_kl_adv_gradient(fn) -> None:
    """Task (derive): ``kl_adv_gradient(logits_nat, logits_adv)`` = ∂ KL(p(x) ‖ p(x′)) / ∂ f(x′)
    (batchmean)."""
    run_gradient_check(_KL_ADV_GRADIENT, fn)


_GAP_READINGS = ("higher", "lower", "undecided")


def check_gap_reading(reading, correct_a, correct_b) -> None:
    """Task (read the result): model a − model b in clean accuracy on the same points, read from
    the paired interval."""
    from .. import report
    from .harness import fail, passed

    task = "read the gap"
    if reading not in _GAP_READINGS:
        fail(task, f"set reading to one of {', '.join(map(repr, _GAP_READINGS))}; got {reading!r}")
    try:
        d = report.paired(correct_a, correct_b)
    except (TypeError, ValueError) as e:
        fail(task, f"pass the two per-point correctness vectors of the cell above ({e})")
    want = d.verdict()
    if reading == want:
        passed(task, f"{reading}: {d}")
        return
    if want == "undecided":
        fail(task, f"{d}: the interval contains 0, so the gap is 'undecided', not {reading!r}; a gap of a few points is what two models on these points differ by anyway")
    if reading == "undecided":
        fail(task, f"{d}: the interval lies on one side of 0, so the points decide it ({want!r})")
    fail(task, f"{d}: mind the sign; the difference is a − b, so it reads {want!r}")
