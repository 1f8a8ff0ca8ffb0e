"""Checks of exercise notebook 7 (chapter 7): a paired multi-seed test of an ablation, decided
before looking at the results."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .. import losses, methods
from .harness import (
    as_float,
    call_learner,
    close,
    fail,
    generator,
    passed,
    rand_labels,
    sandbox,
    toy_scores,
    toy_train,
)
from .losscheck import SHAPES, LossSpec, Variant, rand_logits, run_loss_check

__all__ = ["check_mart_loss", "check_paired_t", "check_decision", "check_preregistration",
           "run_registered_plan", "check_reading", "T_CRIT_5PCT"]

# two-sided 5 % critical values of Student's t with n − 1 degrees of freedom, by n
T_CRIT_5PCT = {3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
_REGISTERED: dict = {}
_VERDICTS = ("ablation better", "baseline better", "too small", "undecided")


def _paired(a, b):
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0:
        return mean, 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean, mean / (sd / math.sqrt(n))


def _welch(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((v - ma) ** 2 for v in a) / (n - 1)
    vb = sum((v - mb) ** 2 for v in b) / (n - 1)
    return mb - ma, (mb - ma) / math.sqrt(va / n + vb / n)


# (baseline, ablation) per seed: seed effects shared by both arms; only a paired test sees the gap
_SCORES = [
    ([0.71, 0.64, 0.69, 0.75, 0.66], [0.73, 0.655, 0.705, 0.77, 0.68]),
    ([0.50, 0.52, 0.47], [0.49, 0.50, 0.475]),
    ([0.8, 0.82, 0.79, 0.81, 0.83, 0.78], [0.81, 0.80, 0.80, 0.80, 0.84, 0.79]),
    ([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]),
]


def _as_pair(task, out):
    if not (isinstance(out, tuple) and len(out) == 2):
        fail(task, "return a pair (mean difference, t statistic)")
    return as_float(task, out[0], "the mean difference"), as_float(task, out[1], "the t statistic")


def check_paired_t(fn) -> None:
    """Task: ``paired_t(baseline, ablation)`` → (mean of ablation − baseline per seed, paired t)."""
    task = "paired_t"
    with sandbox(task, fn):
        for a, b in _SCORES:
            mean, t = _as_pair(task, call_learner(task, fn, list(a), list(b)))
            want_mean, want_t = _paired(a, b)
            if (
                want_mean != 0
                and close(mean, -want_mean, 1e-9, 1e-12)
                and close(t, -want_t, 1e-6, 1e-9)
            ):
                fail(task, "your differences are baseline − ablation; the task asks ablation − baseline (a positive mean: the ablation scores higher)")
            if not close(mean, want_mean, 1e-9, 1e-12):
                fail(task, f"your mean difference {mean:.6g} differs from {want_mean:.6g}: average the per-seed differences")
            if math.isnan(t) or (want_t == 0 and t != 0):
                fail(task, f"identical arms (every difference 0) gave t = {t}: with s_d = 0 and d̄ = 0 there is no difference, t = 0")
            if close(t, want_t, 1e-6, 1e-9) or (math.isinf(want_t) and t == want_t):
                continue
            n = len(a)
            if close(t, _welch(a, b)[1], 1e-6, 1e-9):
                fail(task, "you compared the two groups as independent samples (Welch's t); the same seed trains both arms, so the runs come in pairs: test the per-seed differences")
            if close(t, want_t * math.sqrt(n / (n - 1)), 1e-6, 1e-9):
                fail(task, "your standard deviation divides by n; the sample standard deviation of the differences divides by n − 1")
            if close(t, want_t / math.sqrt(n), 1e-6, 1e-9):
                fail(task, "your t is the mean over the *standard deviation*; divide by the standard error s / √n")
            fail(task, f"your t {t:.6g} differs from the paired t {want_t:.6g} (n = {n})")
        passed(task, "mean per-seed difference and t = d̄ / (s/√n) with the sample standard deviation (3 data sets; Welch's unpaired t would miss the gap in the first)")


def check_decision(fn) -> None:
    """Task: ``decide(baseline, ablation, *, t_crit, min_effect)``: the paired test's verdict."""
    task = "decide"
    cases = [  # (baseline, ablation, t_crit, min_effect, verdict, what it tests)
        (*_SCORES[0], 2.776, 0.005, "ablation better", "a consistent gain"),
        ([0.73, 0.655, 0.705, 0.77, 0.68], [0.71, 0.64, 0.69, 0.75, 0.66], 2.776, 0.005,
         "baseline better", "a consistent loss"),
        (*_SCORES[0], 2.776, 0.05, "too small", "a significant gain below the minimum effect"),
        (*_SCORES[2], 2.571, 0.005, "undecided", "noise"),
        (*_SCORES[1], 4.303, 0.005, "undecided", "three seeds, noise"),
    ]
    with sandbox(task, fn):
        for a, b, t_crit, min_effect, want, what in cases:
            got = call_learner(task, fn, list(a), list(b), t_crit=t_crit, min_effect=min_effect)
            if got == "no difference":
                fail(task, f"for {what} you said 'no difference': a test that fails to find a difference has not shown that there is none; say 'undecided' (or 'too small' for a significant difference below min_effect)")
            if got not in _VERDICTS:
                fail(task, f"return one of {', '.join(map(repr, _VERDICTS))}; got {got!r}")
            if got == want:
                continue
            mean, t = _paired(a, b)
            if want == "too small":
                fail(task, f"for {what} (mean difference {mean:+.3g}, t = {t:.3g}) you said {got!r}: it is significant (|t| ≥ {t_crit}) but below min_effect = {min_effect}: 'too small' to report")
            if want == "undecided":
                fail(task, f"for {what} (t = {t:.3g} < t_crit = {t_crit}) you said {got!r}: the data cannot tell the arms apart, so the verdict is 'undecided'")
            if {got, want} == {"ablation better", "baseline better"}:
                fail(task, f"for {what} you said {got!r}: mind the sign of ablation − baseline")
            fail(task, f"for {what} (mean difference {mean:+.3g}, t = {t:.3g} ≥ {t_crit}) you said {got!r}: a paired test sees it (an unpaired one would not: seed effects are shared by both arms)")
        passed(task, "gain, loss, significant-but-too-small and noise (undecided) all decided as planned")


def check_preregistration(plan) -> None:
    """Task: the plan, written before any run: methods, seeds, metric, t_crit, min_effect."""
    task = "plan"
    if not isinstance(plan, dict):
        fail(task, f"plan must be a dict; got {type(plan).__name__}")
    keys = {"baseline", "ablation", "seeds", "metric", "t_crit", "min_effect"}
    if set(plan) != keys:
        fail(task, f"plan needs exactly the keys {sorted(keys)}; got {sorted(plan)}")
    for role in ("baseline", "ablation"):
        if plan[role] not in methods.METHODS:
            fail(task, f"plan[{role!r}] = {plan[role]!r} is not a method; one of {', '.join(methods.METHODS)}")
    if plan["baseline"] == plan["ablation"]:
        fail(task, "baseline and ablation are the same method: nothing to compare")
    seeds = plan["seeds"]
    if (
        not isinstance(seeds, (list, tuple))
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and s >= 0 for s in seeds)
    ):
        fail(task, f"plan['seeds'] must be a list of distinct non-negative integers; got {seeds!r}")
    if not 3 <= len(seeds) <= 10:
        fail(task, f"{len(seeds)} seeds: use 3 to 10 (with fewer than 3 the t test has no power)")
    if plan["metric"] not in ("clean", "pgd"):
        fail(task, f"plan['metric'] must be 'clean' or 'pgd'; got {plan['metric']!r}")
    want = T_CRIT_5PCT[len(seeds)]
    t_crit = as_float(task, plan["t_crit"], "t_crit")
    if not close(t_crit, want, 0, 0.01):
        fail(task, f"t_crit = {t_crit} for {len(seeds)} seeds; the two-sided 5 % critical value of Student's t with {len(seeds) - 1} degrees of freedom is {want}")
    if as_float(task, plan["min_effect"], "min_effect") <= 0:
        fail(task, "min_effect must be positive: decide how large a difference matters before looking")
    _REGISTERED.clear()
    _REGISTERED.update(copy.deepcopy(plan))
    passed(task, f"plan registered: {plan['ablation']} vs {plan['baseline']}, {len(seeds)} seeds, {plan['metric']} accuracy, t_crit {t_crit}, min_effect {plan['min_effect']}")


def run_registered_plan(plan, *, epochs: int = 10, eps: float = 0.05):
    """Run the registered plan on two moons: (baseline scores, ablation scores), one per seed.

    Refuses a plan that was not registered by `check_preregistration`, or was changed since.
    """
    if not _REGISTERED:
        raise RuntimeError("register the plan first: checks.check_preregistration(plan)")
    if plan != _REGISTERED:
        raise RuntimeError("the plan changed after it was registered: register the final plan before running, and keep it")
    scores = {"baseline": [], "ablation": []}
    budget = dict(eps=eps, step_size=eps / 4, steps=5)
    with torch.random.fork_rng(devices=[]):
        for seed in plan["seeds"]:
            for role in ("baseline", "ablation"):
                run = toy_train(plan[role], seed=seed, epochs=epochs, lr=0.02, **budget)
                clean, pgd = toy_scores(run.target, eps, seed=seed)
                scores[role].append(clean if plan["metric"] == "clean" else pgd)
    return scores["baseline"], scores["ablation"]


def _mart_parts(zn, za, y):
    pa, pn = F.softmax(za, dim=1), F.softmax(zn, dim=1)
    top2 = torch.argsort(pa, dim=1)[:, -2:]
    other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    ce = F.cross_entropy(za, y)
    margin = F.nll_loss(torch.log(1.0001 - pa + 1e-12), other)
    kl = F.kl_div(torch.log(pa + 1e-12), pn, reduction="none").sum(1)
    weight = 1.0000001 - pn.gather(1, y[:, None]).squeeze(1)
    return ce, margin, kl, weight, pa


def check_mart_loss(fn) -> None:
    """Task: ``mart_loss(logits_nat, logits_adv, y, beta=6.0)`` as the official MART code."""

    def case(t):
        b, c, s = SHAPES[t]
        g = generator(3100 + t)
        zn = rand_logits(g, b, c, 2 * s)
        return (zn, zn + rand_logits(g, b, c, s), rand_labels(g, b, c)), {
            "beta": [6.0, 6.0, 1.0, 6.0, 3.0, 0.5][t]
        }

    def variant(build):
        def v(zn, za, y, beta):
            ce, margin, kl, weight, pa = _mart_parts(zn, za, y)
            return build(ce, margin, kl, weight, pa, zn, za, y, beta)

        return v

    run_loss_check(
        LossSpec(
            task="mart_loss",
            names=("logits_nat", "logits_adv", "y"),
            reference=losses.mart_loss,
            make_case=case,
            trials=6,
            grad_names=("logits_nat", "logits_adv"),
            variants=[
                Variant("you left out the weight 1 − p(x)_y: MART weighs each example's KL by how badly the clean prediction misses", variant(lambda ce, m, kl, w, pa, zn, za, y, beta: ce + m + beta * kl.mean())),
                Variant(
                    "the weight uses the adversarial prediction; MART's is 1 − p(x)_y on the clean image",
                    variant(
                        lambda ce, m, kl, w, pa, zn, za, y, beta: (
                            ce
                            + m
                            + beta * (kl * (1.0000001 - pa.gather(1, y[:, None]).squeeze(1))).mean()
                        )
                    ),
                ),
                Variant("you left out the boosted term −log(1 − max_{{k≠y}} p_k(x′)) of the BCE", variant(lambda ce, m, kl, w, pa, zn, za, y, beta: ce + beta * (kl * w).mean())),
                Variant(
                    "KL direction reversed: MART's KL is KL(p(x) ‖ p(x′)), the clean distribution first",
                    variant(
                        lambda ce, m, kl, w, pa, zn, za, y, beta: (
                            ce
                            + m
                            + beta
                            * (
                                F.kl_div(
                                    F.log_softmax(zn, 1), F.softmax(za, 1), reduction="none"
                                ).sum(1)
                                * w
                            ).mean()
                        )
                    ),
                ),
                Variant(
                    "you ignored the `beta` argument (your value matches β = 6)",
                    variant(
                        lambda ce, m, kl, w, pa, zn, za, y, beta: (
                            None if beta == 6.0 else ce + m + 6.0 * (kl * w).mean()
                        )
                    ),
                ),
            ],
            rtol=1e-6,
            passed="CE(f(x′), y) − log(1 − max_{k≠y} p_k(x′)) + β·mean[KL(p(x) ‖ p(x′))·(1 − p(x)_y)] as losses.mart_loss (value and gradients, β ∈ {0.5, 1, 3, 6})",
        ),
        fn,
    )


_READINGS = ("ablation higher", "ablation lower", "undecided")


def check_reading(reading, baseline_scores, ablation_scores) -> None:
    """Task (read the interval): the 95 % interval of ablation − baseline, read in words."""
    from .. import report

    task = "read the interval"
    if reading not in _READINGS:
        fail(task, f"set reading to one of {', '.join(map(repr, _READINGS))}; got {reading!r}")
    if len(baseline_scores) != len(ablation_scores) or len(baseline_scores) < 2:
        fail(task, "pass the two lists of scores that run_registered_plan returned (one per seed, at least 2 seeds)")
    d = report.over_seeds(ablation_scores, baseline_scores)
    want = d.verdict(higher="ablation higher", lower="ablation lower")
    span = f"mean {d.mean:+.4f}, 95 % interval [{d.low:+.4f}, {d.high:+.4f}]"
    if reading == want:
        passed(task, f"{reading}: {span}")
        return
    if want == "undecided":
        fail(task, f"{span} contains 0: these seeds cannot tell the arms apart, so the reading is 'undecided', not {reading!r}")
    if reading == "undecided":
        fail(task, f"{span} lies entirely on one side of 0: the seeds decide it ({want!r})")
    fail(task, f"{span}: mind the sign; the differences are ablation − baseline, so it reads {want!r}")
