"""The training-step checks of notebooks 2, 3, 4 and 6: a learner's step against methods.train_step."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import attacks, losses, methods
from .harness import (
    fail,
    passed,
    call_learner,
    sandbox,
    generator,
    rand_images,
    small_cnn,
    bn_count,
    as_float,
    close,
    rand_labels,
)

__all__ = ["check_pgd_at_step", "check_trades_step", "check_lbgat_step", "check_d2r_step"]


# ================================================================================================
# Training steps
# ================================================================================================
_STEP_INFO = {
    "pgd_at": dict(guide=False, passes={"target": "f(x′)"},
                   budget=dict(eps=8 / 255, step_size=2 / 255, steps=2)),
    "trades": dict(guide=False, passes={"target": "f(x) and f(x′)"},
                   budget=dict(eps=0.031, step_size=0.007, steps=2)),
    "lbgat": dict(guide=True, passes={"target": "f(x′)", "guide": "g(x)"},
                  budget=dict(eps=0.031, step_size=0.007, steps=2)),
    "d2r": dict(guide=True, passes={"target": "f(x′) and f(x)", "guide": "g(x)"},
                budget=dict(eps=0.031, step_size=0.007, steps=2)),
}


def _lib_adv(method):
    return lambda t, g, x, y, k: methods.make_adversarial(method, t, g, x, y, **k)


def _lib_loss(method, **over):
    return lambda t, g, x, xa, y, k: methods.compute_terms(method, t, g, x, xa, y, **{**k, **over})["loss"]


def _only(keys):
    return lambda k: {a: b for a, b in k.items() if a in keys}


_BUDGET = ("eps", "step_size", "steps")


def _step_variants(method):
    b = _only(_BUDGET)
    ce, kl, mse = F.cross_entropy, losses.trades_kl, F.mse_loss
    pgd_ce = lambda start: (lambda t, g, x, y, k: attacks.pgd(t, x, y, start=start, **b(k)))  # noqa: E731
    if method == "pgd_at":
        return [
            ("you trained on the clean batch: PGD-AT minimises CE(f(x′), y) on the adversarial examples",
             _lib_adv(method), lambda t, g, x, xa, y, k: ce(t(x), y)),
            ("you applied softmax before F.cross_entropy (which applies log-softmax itself)",
             _lib_adv(method), lambda t, g, x, xa, y, k: ce(F.softmax(t(xa), dim=1), y)),
            ("you generated x′ with FGSM; PGD-AT uses PGD (steps of size step_size from a uniform random start)",
             lambda t, g, x, y, k: attacks.fgsm(t, x, y, eps=k["eps"]), _lib_loss(method)),
            ("your PGD has no random start (start='clean'); PGD-AT starts uniformly in the ε-ball",
             pgd_ce("clean"), _lib_loss(method)),
        ]
    if method == "trades":
        return [
            ("your CE term uses f(x′); TRADES takes CE on the clean logits: CE(f(x), y) + β·KL(p(x) ‖ p(x′))",
             _lib_adv(method), lambda t, g, x, xa, y, k: (lambda zn, za: ce(za, y) + k["beta"] * kl(zn, za))(
                 t(x), t(xa))),
            ("KL direction reversed: TRADES' loss uses KL(p(x) ‖ p(x′))",
             _lib_adv(method), lambda t, g, x, xa, y, k: (lambda zn, za: ce(zn, y) + k["beta"] * kl(za, zn))(
                 t(x), t(xa))),
            ("you generated x′ with PGD on the cross-entropy; TRADES' x′ maximises KL(p(x) ‖ p(x′)) "
             "(attacks.trades_attack)", pgd_ce("uniform"), _lib_loss(method)),
            ("you ignored the `beta` argument (your loss matches β = 6)", _lib_adv(method), _lib_loss(method, beta=6.0)),
            ("you trained on clean CE only: add β·KL(p(x) ‖ p(x′))", _lib_adv(method),
             lambda t, g, x, xa, y, k: ce(t(x), y)),
        ]
    if method == "lbgat":
        return [
            ("you generated x′ with CAG (the guide's reference); LBGAT generates x′ with the target alone, "
             "as TRADES (attacks.trades_attack)", lambda t, g, x, y, k: attacks.cag(t, g, x, **b(k)),
             _lib_loss(method)),
            ("your MSE uses the target's clean logits f(x); LBGAT matches the adversarial logits f(x′) to g(x)",
             _lib_adv(method), lambda t, g, x, xa, y, k: ce(g(x), y) + mse(t(x), g(x))),
            ("your CE term uses the target's logits f(x′); LBGAT puts CE on the guide: CE(g(x), y)",
             _lib_adv(method), lambda t, g, x, xa, y, k: (lambda za: ce(za, y) + mse(za, g(x)))(t(xa))),
            ("you generated x′ with PGD on the cross-entropy; LBGAT uses TRADES generation (attacks.trades_attack)",
             pgd_ce("uniform"), _lib_loss(method)),
        ]
    return [  # d2r
        ("you generated x′ with the target alone (TRADES/LBGAT generation); D2R uses CAG, whose reference is the "
         "guide's p_g(x) (attacks.cag)", _lib_adv("d2r_trades_gen"), _lib_loss("d2r_trades_gen")),
        ("your KL terms use 'batchmean' (the per-sample KL); the official D2R averages them over batch × classes",
         _lib_adv(method), _lib_loss(method, kl_reduction="batchmean")),
        ("you used the LBGAT loss (CE + MSE); D2R adds w_clean·|K̄L(p_f‖p_g) − K̄L(p_g‖p_f)| + w_adv·K̄L(p_f(x′) ‖ "
         "p_g(x)) (losses.d2r_loss)", _lib_adv(method), lambda t, g, x, xa, y, k: losses.lbgat_loss(t(xa), g(x), y)),
        ("you generated x′ with PGD on the cross-entropy; D2R uses CAG (attacks.cag)", pgd_ce("uniform"),
         _lib_loss(method)),
    ]


def _manual_step(t, g, opt, x, y, k, attack, loss_fn, zero_grad=True) -> float:
    xa = attack(t, g, x, y, k)
    t.train()
    if g is not None:
        g.train()
    loss = loss_fn(t, g, x, xa, y, k)
    if zero_grad:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _params(t, g):
    return [p.detach().clone() for m in (t, g) if m is not None for p in m.parameters()]


def _max_diff(a, b) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def _run_step_check(task: str, method: str, fn) -> None:
    info = _STEP_INFO[method]
    with sandbox(task, fn):
        for trial, (b, beta) in enumerate([(8, 6.0), (4, 2.0)]):
            g = generator(1700 + trial)
            x, y = rand_images(g, b), rand_labels(g, b, 10)
            base_t = small_cnn(10, 1750 + trial, width=4)
            base_g = small_cnn(10, 1760 + trial, width=4) if info["guide"] else None
            junk = [torch.randn(p.shape, generator=g) for m in (base_t, base_g) if m is not None
                    for p in m.parameters()]
            k = dict(info["budget"])
            if method == "trades":
                k["beta"] = beta

            def fresh():
                t = copy.deepcopy(base_t).train()
                gg = copy.deepcopy(base_g).train() if base_g is not None else None
                for p, j in zip([p for m in (t, gg) if m is not None for p in m.parameters()], junk):
                    p.grad = j.clone()          # stale gradients: a step without zero_grad() shows
                return t, gg, methods.make_optimizer(t, gg, lr=0.05)

            t_l, g_l, opt_l = fresh()
            counts0 = {"target": bn_count(t_l), "guide": bn_count(g_l) if g_l is not None else 0}
            torch.manual_seed(1800 + trial)
            args = (t_l, g_l, opt_l, x.clone(), y.clone()) if info["guide"] else (t_l, opt_l, x.clone(), y.clone())
            ret = call_learner(task, fn, *args, **k)
            t_r, g_r, opt_r = fresh()
            torch.manual_seed(1800 + trial)
            want = methods.train_step(method, t_r, g_r, opt_r, x, y, **k)["loss"]
            got = as_float(task, ret.item() if isinstance(ret, torch.Tensor) and ret.numel() == 1 else ret,
                            "the loss")
            bn_problem = None
            for role, model, ref_model in [("target", t_l, t_r), ("guide", g_l, g_r)]:
                if model is None or bn_problem:
                    continue
                n, m = bn_count(model) - counts0[role], bn_count(ref_model) - counts0[role]
                if n > m:
                    bn_problem = (f"the {role}'s BatchNorm saw {n} training-mode forward passes, the library's "
                                  f"step {m} ({info['passes'][role]}): run the attack with the models in eval mode "
                                  f"(the library's attacks do it for you) and only the loss's forward passes in "
                                  f"train mode")
                elif n < m:
                    bn_problem = (f"the {role}'s BatchNorm saw {n} training-mode forward passes, the library's "
                                  f"step {m} ({info['passes'][role]}): after the attack put the models in train "
                                  f"mode (`model.train()`) and run each forward pass of the loss separately")
            params_l, params_r = _params(t_l, g_l), _params(t_r, g_r)
            if not close(got, want, 1e-4, 1e-5):
                for message, attack, loss_fn in _step_variants(method):
                    t_v, g_v, opt_v = fresh()
                    torch.manual_seed(1800 + trial)
                    v = _manual_step(t_v, g_v, opt_v, x, y, k, attack, loss_fn)
                    if close(got, v, 1e-4, 1e-5) and not close(v, want, 1e-4, 1e-5):
                        fail(task, message)
            if bn_problem:
                fail(task, bn_problem)
            if not close(got, want, 1e-4, 1e-5):
                fail(task, f"your loss {got:.6g} differs from the library's {want:.6g} for the same batch and "
                            f"random seed (methods.train_step({method!r}, ...)); use the library's attack "
                            f"(it draws the random start the same way) and compare your loss term by term")
            if _max_diff(params_l, _params(base_t, base_g)) == 0:
                fail(task, "your step did not change the parameters: call loss.backward(), then optimizer.step()")
            if _max_diff(params_l, params_r) > 1e-5:
                t_v, g_v, opt_v = fresh()
                torch.manual_seed(1800 + trial)
                _manual_step(t_v, g_v, opt_v, x, y, k, _lib_adv(method), _lib_loss(method), zero_grad=False)
                if _max_diff(params_l, _params(t_v, g_v)) <= 1e-5:
                    fail(task, "you forgot optimizer.zero_grad(): gradients left from the previous step were "
                                "added to this one")
                fail(task, f"your loss is right but the parameters after your step differ from the library's "
                            f"(max |Δ| = {_max_diff(params_l, params_r):.3g}): zero the gradients, then exactly one "
                            f"loss.backward() and one optimizer.step() with the optimizer passed in")
        passed(task, f"same loss and same parameters after one step as methods.train_step({method!r}, ...) "
                      f"(attack in eval mode, loss in train mode, stale gradients cleared; 2 trials)")


def check_pgd_at_step(fn) -> None:
    """Task: ``pgd_at_step(model, optimizer, x, y, *, eps, step_size, steps)`` → loss (float)."""
    _run_step_check("pgd_at_step", "pgd_at", fn)


def check_trades_step(fn) -> None:
    """Task: ``trades_step(model, optimizer, x, y, *, beta, eps, step_size, steps)`` → loss (float)."""
    _run_step_check("trades_step", "trades", fn)


def check_lbgat_step(fn) -> None:
    """Task: ``lbgat_step(target, guide, optimizer, x, y, *, eps, step_size, steps)`` → loss (float)."""
    _run_step_check("lbgat_step", "lbgat", fn)


def check_d2r_step(fn) -> None:
    """Task: ``d2r_step(target, guide, optimizer, x, y, *, eps, step_size, steps)`` → loss (float)."""
    _run_step_check("d2r_step", "d2r", fn)

