"""Checks of exercise notebook 6 (chapter 6): the guide's reference, the CAG objective, CAG, the D2R
step."""

from __future__ import annotations

import copy

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
    assert_modes_restored,
    bn_changed,
    bn_state,
    call_learner,
    copies,
    fail,
    generator,
    grade_prediction,
    mode_flags,
    passed,
    rand_images,
    sandbox,
    small_cnn,
)
from .losscheck import SHAPES, LossSpec, Variant, rand_logits, run_loss_check

__all__ = ["check_flat_guide_prediction", "check_trades_gen_prediction", "check_cag_objective",
           "check_guide_reference", "check_cag", "check_soft_label_ce", "check_cag_copy_prediction"]


# ------------------------------------------------------------------------------------------ ch. 6
def check_cag_objective(fn) -> None:
    """Task: ``cag_objective(logits_adv, p_guide)`` = Σ_i Σ_c p_g·(log(p_g + 1e-5) − log
    p_f(x′))."""

    def case(t):
        b, c, s = SHAPES[t]
        g = generator(1000 + t)
        return (rand_logits(g, b, c, 2 * s), F.softmax(rand_logits(g, b, c, 2 * s), dim=1)), {}

    ref = lambda za, pg: attacks.official_kl_sum(pg, za)  # noqa: E731
    run_loss_check(
        LossSpec(
            task="cag_objective",
            names=("logits_adv", "p_guide"),
            reference=ref,
            make_case=case,
            trials=6,
            grad_names=("logits_adv",),
            variants=[
                Variant("KL direction reversed: you computed Σ KL(p_f(x′) ‖ p_g(x)), the direction of D2R's adversarial *training* term; CAG ascends Σ KL(p_g(x) ‖ p_f(x′)) = Σ p_g·(log(p_g + 1e-5) − log p_f(x′))", lambda za, pg: losses.official_k(F.softmax(za, dim=1), torch.log(pg)).sum()),
                Variant("you averaged over batch × classes; the CAG objective is a plain sum over batch and classes (the official code's .sum())", lambda za, pg: attacks.official_kl_sum(pg, za) / za.numel()),
                Variant("you averaged over the batch; the CAG objective is a plain sum over batch and classes", lambda za, pg: attacks.official_kl_sum(pg, za) / za.shape[0]),
                Variant("you computed the exact KL (as F.kl_div does); the official objective uses log(p_g + 1e-5). The gradient is the same, but keep the official form: losses.official_k(p_guide, log p_f(x′))", lambda za, pg: F.kl_div(F.log_softmax(za, dim=1), pg, reduction="sum")),
                Variant(
                    "you applied softmax to p_guide again: it is already a probability vector",
                    lambda za, pg: losses.official_k(
                        F.softmax(pg, dim=1), F.log_softmax(za, dim=1)
                    ).sum(),
                ),
                Variant("you used the raw logits f(x′) where log p_f(x′) belongs: apply F.log_softmax(logits_adv, dim=1)", lambda za, pg: losses.official_k(pg, za).sum()),
            ],
            passed="Σ_batch Σ_classes p_g·(log(p_g + 1e-5) − log p_f(x′)) as attacks.official_kl_sum (value and gradient)",
        ),
        fn,
    )


# ------------------------------------------------------------------------------------------ ch. 6
def check_guide_reference(fn) -> None:
    """Task: ``guide_reference(guide, x)`` = softmax(g(x)) in eval mode, without a graph, mode
    restored."""
    task = "guide_reference"
    with sandbox(task, fn):
        for i, (b, c, mode) in enumerate([(8, 10, "train"), (1, 10, "eval"), (6, 100, "train")]):
            g = generator(1600 + i)
            guide, x = small_cnn(c, 1650 + i), rand_images(g, b)
            mods = copies({"guide": guide}, mode)
            modes, bn = mode_flags(mods["guide"]), bn_state(mods["guide"])
            calls = []
            h = mods["guide"].register_forward_pre_hook(
                lambda m, inp, calls=calls: calls.append(torch.is_grad_enabled())
            )
            try:
                out = call_learner(task, fn, mods["guide"], x.clone())
            finally:
                h.remove()
            assert_modes_restored(task, {"guide": modes}, mods)
            if bn_changed(bn, mods["guide"]):
                fail(task, "the guide ran in train mode: BatchNorm used the batch's statistics and updated its running averages; compute p_g(x) in eval mode (`with attacks.eval_mode(guide):`)")
            if len(calls) != 1:
                fail(task, f"the guide ran {len(calls)} times; one forward pass g(x) is all p_g(x) needs")
            if calls[0]:
                fail(task, "the guide's forward pass ran with gradients enabled: compute p_g(x) under torch.no_grad() (a .detach() afterwards still builds and throws away a graph)")
            if not isinstance(out, torch.Tensor) or out.shape != (b, c):
                fail(task, f"return a (batch, classes) = {(b, c)} tensor of probabilities; got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            if out.requires_grad:
                fail(task, "your p_g(x) carries a graph (requires_grad=True); it is a constant for the attack")
            with attacks.eval_mode(guide), torch.no_grad():
                z = guide(x)
            ref = F.softmax(z, dim=1)
            if torch.allclose(out, ref, atol=1e-6):
                continue
            for message, v in [
                ("you returned the logits g(x); the reference is the probability vector softmax(g(x), dim=1)", z),
                ("you returned log-probabilities; CAG's reference is the probability vector softmax(g(x), dim=1)", F.log_softmax(z, dim=1)),
                ("you took the softmax over the batch (dim=0); probabilities are over the classes: dim=1", F.softmax(z, dim=0)),
            ]:
                if torch.allclose(out, v, atol=1e-6) and not torch.allclose(v, ref, atol=1e-6):
                    fail(task, message)
            if not torch.allclose(out.sum(1), torch.ones(b), atol=1e-4):
                fail(task, "the rows of your p_g(x) do not sum to 1: return softmax(g(x), dim=1)")
            fail(task, f"your p_g(x) differs from softmax(g(x)) in eval mode (max |Δ| = {(out - ref).abs().max().item():.3g})")
        passed(task, "softmax(g(x)) from one forward pass in eval mode under torch.no_grad(), mode restored (3 trials)")


def check_cag(fn) -> None:
    """Task: ``cag(target, guide, x, eps, step_size, steps)``: the collaborative adversarial
    generation of D2R."""

    def ref_guide(mods, x):
        return p_clean(mods["guide"], x)

    def cag_obj(mods, x, reverse=False):
        p = ref_guide(mods, x)
        if reverse:
            return lambda z: losses.official_k(F.softmax(z, dim=1), torch.log(p)).sum()
        return lambda z: attacks.official_kl_sum(p, z)

    def wrong(reverse=False, **kw):
        options = {"start": "gaussian", **kw}
        return lambda mods, x, y, k: wrong_attack(
            mods["target"], x, cag_obj(mods, x, reverse), **k, **options
        )

    def lib_pgd(start):
        return lambda mods, x, y, k: attacks.pgd(
            mods["target"], x, objective="kl", start=start, reference=ref_guide(mods, x), **k
        )

    def objective(mods, x, y, xa):
        return attacks.official_kl_sum(ref_guide(mods, x), p_logits(mods["target"], xa)).item()

    run_attack_check(
        AttackSpec(
            task="cag",
            norm="linf",
            random=True,
            cases=attack_cases("kl"),
            guide_once=True,
            learner=lambda fn, mods, x, y, k: fn(
                mods["target"], mods["guide"], x, k["eps"], k["step_size"], k["steps"]
            ),
            library=lambda mods, x, y, k: attacks.cag(mods["target"], mods["guide"], x, **k),
            objective=objective,
            variants=[
                ("you used the target's own p_f(x) as the reference: that is TRADES/LBGAT generation. CAG's reference is the guide's clean prediction p_g(x)", lambda mods, x, y, k: attacks.trades_attack(mods["target"], x, **k)),
                ("you started from a uniformly random point of the ε-ball; CAG starts at x + 0.001·N(0, I) (x + 0.001 * torch.randn_like(x))", lib_pgd("uniform")),
                ("no random start: CAG starts at x + 0.001·N(0, I)", lib_pgd("clean")),
                ("KL direction reversed: you ascended KL(p_f(x′) ‖ p_g(x)) (the direction of D2R's training term); CAG ascends KL(p_g(x) ‖ p_f(x′))", wrong(reverse=True)),
                ("you stepped along the raw gradient α·∇; CAG steps along its sign: α·sign(∇)", wrong(step="grad")),
                ("your steps go *down* the KL; CAG ascends it", wrong(descend=True)),
            ],
            passed="x + 0.001·N(0, I), sign steps on Σ KL(p_g(x) ‖ p_f(x′)), p_g(x) once without a graph, both models in eval mode and restored, projection, [0, 1], detached, as attacks.cag (3 trials)",
        ),
        fn,
    )


# ------------------------------------------------------------------------------------ derive /
# predict
def check_soft_label_ce(fn) -> None:
    """Task (derive): ``soft_label_ce(logits_adv, p_guide)`` = −Σ p_g log p_f(x′): CAG as a
    soft-label CE ascent."""

    def case(t):
        b, c, s = SHAPES[t]
        g = generator(2900 + t)
        return (rand_logits(g, b, c, 2 * s), F.softmax(rand_logits(g, b, c, 2 * s), dim=1)), {}

    def ref(za, pg):
        return -(pg * F.log_softmax(za, dim=1)).sum()

    run_loss_check(
        LossSpec(
            task="soft_label_ce",
            names=("logits_adv", "p_guide"),
            reference=ref,
            make_case=case,
            trials=6,
            grad_names=("logits_adv",),
            variants=[
                Variant("you used hard labels argmax p_g(x): the guide's whole distribution is the soft label", lambda za, pg: F.cross_entropy(za, pg.argmax(1), reduction="sum")),
                Variant("you averaged over the batch; CAG's objective is a sum over batch and classes", lambda za, pg: ref(za, pg) / za.shape[0]),
                Variant("you returned the CAG objective itself; the soft-label CE drops the guide's entropy term (a constant in x′): −Σ p_g log p_f(x′)", lambda za, pg: attacks.official_kl_sum(pg, za)),
                Variant("roles exchanged: the soft label is p_g(x) and the log-probabilities are the target's", lambda za, pg: -(F.softmax(za, dim=1) * torch.log(pg)).sum()),
            ],
            passed="−Σ p_g log p_f(x′) differs from CAG's objective only by Σ p_g log(p_g + 1e-5), a constant in x′: same gradient, so CAG is PGD on a soft-label cross-entropy",
        ),
        fn,
    )


def check_cag_copy_prediction(predicted_agreement) -> None:
    """Task (predict): the share of pixels where CAG and TRADES generation agree when the guide is
    the target."""
    task = "predict: CAG with a copied guide"
    if (
        isinstance(predicted_agreement, bool)
        or not isinstance(predicted_agreement, (int, float))
        or not 0 <= predicted_agreement <= 1
    ):
        fail(task, f"set predicted_agreement to a fraction in [0, 1] before running; got {predicted_agreement!r}")
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        g = generator(3000)
        x = rand_images(g, 8)
        target = small_cnn(10, 3010).eval()
        runs = {}
        for name, guide in [("copy", copy.deepcopy(target)), ("other", small_cnn(10, 3020).eval())]:
            torch.manual_seed(3030)
            d_cag = attacks.cag(target, guide, x, eps=0.031, step_size=0.007, steps=5) - x
            torch.manual_seed(3030)
            d_trades = attacks.trades_attack(target, x, eps=0.031, step_size=0.007, steps=5) - x
            runs[name] = (d_cag.sign() == d_trades.sign()).float().mean().item()
    measured = runs["copy"]
    why = (f"with g = f, p_g(x) = p_f(x): CAG's objective Σ KL(p_g(x) ‖ p_f(x′)) is TRADES' objective, so from the same start both attacks take the same steps ({measured:.1%} of the perturbation signs agree; with a different guide: {runs['other']:.1%})")
    if abs(predicted_agreement - measured) > 0.05:
        fail(task, f"you predicted {predicted_agreement:.0%}; the run gives {measured:.1%}: {why}")
    passed(task, f"you predicted {predicted_agreement:.0%}: right — {why}")


_TRADES_GEN = PairedPrediction("predict: CAG or TRADES generation", "d2r", "d2r_trades_gen", ("higher", "lower"), "D2R − d2r_trades_gen over {n} seeds, exact robust accuracy. The two differ only in x′: CAG pushes the target away from the guide's soft labels, TRADES generation away from the target's own prediction. Chapter 7 found the same sign over 20 seeds on this world and asks, in Part 3, why CAG costs robustness there", metric="exact")


def check_trades_gen_prediction(predicted_sign, runs) -> None:
    """Task (predict, then run): the sign of D2R − d2r_trades_gen in exact robust accuracy on the
    2-D world, graded against the learner's own `toy.compare` runs."""
    grade_prediction(_TRADES_GEN, predicted_sign, runs)


_FLAT_GUIDE = PairedPrediction("predict: CAG with a flat guide", "cag", "trades", ("weaker", "stronger"), "accuracy under CAG − under TRADES generation, {n} seeds. Against a uniform guide, CAG maximises −(1/C)·Σ_c log p_f(x′)_c, which grows when any class becomes unlikely: it makes the target more sure of its own answer instead of changing it")


def check_flat_guide_prediction(predicted, rows) -> None:
    """Task (predict, then run): with a uniform guide, is CAG a weaker or a stronger attack than
    TRADES generation (accuracy under CAG − under TRADES generation, per seed)?"""
    grade_prediction(_FLAT_GUIDE, predicted, rows)
