"""The training-step checks of notebooks 2, 3, 4 and 6: a learner's step against methods.train_step.

The reference step is `methods.train_step`, the library's one training step. The learner's step may
draw the attack's random start in its own way: the check records the x′ the learner's loss saw (the
target's train-mode input that is not x) and, when it differs from the library's x′, checks x′
(ball, [0, 1], the attack's objective reached) and the loss at that x′ (`methods.compute_terms`)
instead of exact equality. Forward passes in train mode: the official count and the library's named
faster variant are both accepted.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import attacks, losses, methods
from .harness import (
    as_float,
    call_learner,
    close,
    fail,
    generator,
    passed,
    rand_images,
    rand_labels,
    sandbox,
    small_cnn,
)

__all__ = ["check_pgd_at_step", "check_trades_step", "check_lbgat_step", "check_d2r_step"]

_BUDGETS = {
    "pgd_at": dict(eps=8 / 255, step_size=2 / 255, steps=2),
    "trades": dict(eps=0.031, step_size=0.007, steps=2),
    "lbgat": dict(eps=0.031, step_size=0.007, steps=2),
    "d2r": dict(eps=0.031, step_size=0.007, steps=2),
}
# train-mode forward passes of one step: (official code, the library's faster named variant)
_PASSES = {
    "pgd_at": {"target": ({1: "f(x′)"}), "guide": {0: ""}},
    "trades": {"target": {3: "f(x), f(x′), f(x) (official)", 2: "f(x), f(x′)"}, "guide": {0: ""}},
    "lbgat": {"target": {2: "f(x′), f(x) (official)", 1: "f(x′)"}, "guide": {1: "g(x)"}},
    "d2r": {"target": {2: "f(x′), f(x)"}, "guide": {1: "g(x)"}},
}
_GUIDED = ("lbgat", "d2r")


def _lib_adv(method):
    return lambda t, g, x, y, k: methods.make_adversarial(method, t, g, x, y, **k)


def _lib_loss(method, **over):
    return lambda t, g, x, xa, y, k: methods.compute_terms(method, t, g, x, xa, y,
                                                           **{**k, **over})["loss"]


def _only(keys):
    return lambda k: {a: b for a, b in k.items() if a in keys}


_BUDGET = ("eps", "step_size", "steps")


_CE, _KL, _MSE = F.cross_entropy, losses.trades_kl, F.mse_loss


def _pgd_ce(start):
    return lambda t, g, x, y, k: attacks.pgd(t, x, y, start=start, **_only(_BUDGET)(k))


def _trades_like(ce_on_adv: bool, reverse: bool):
    """CE(f(x′) if ce_on_adv else f(x), y) + β·KL, the KL reversed if asked."""
    def loss(t, g, x, xa, y, k):
        zn, za = t(x), t(xa)
        kl = _KL(za, zn) if reverse else _KL(zn, za)
        return _CE(za if ce_on_adv else zn, y) + k["beta"] * kl
    return loss


# (message, attack, loss) of the common mistakes, per method; their loss *values* are compared,
# nothing is trained
_STEP_VARIANTS = {
    "pgd_at": [
        ("you trained on the clean batch: PGD-AT minimises CE(f(x′), y) on the adversarial examples", _lib_adv("pgd_at"), lambda t, g, x, xa, y, k: _CE(t(x), y)),
        ("you applied softmax before F.cross_entropy (which applies log-softmax itself)", _lib_adv("pgd_at"), lambda t, g, x, xa, y, k: _CE(F.softmax(t(xa), dim=1), y)),
        ("you generated x′ with FGSM; PGD-AT uses PGD (steps of size step_size from a uniform random start)", lambda t, g, x, y, k: attacks.fgsm(t, x, y, eps=k["eps"]), _lib_loss("pgd_at")),
        ("your PGD has no random start (start='clean'); PGD-AT starts uniformly in the ε-ball", _pgd_ce("clean"), _lib_loss("pgd_at")),
    ],
    "trades": [
        ("your CE term uses f(x′); TRADES takes CE on the clean logits: CE(f(x), y) + β·KL(p(x) ‖ p(x′))", _lib_adv("trades"), _trades_like(True, False)),
        ("KL direction reversed: TRADES' loss uses KL(p(x) ‖ p(x′))", _lib_adv("trades"), _trades_like(False, True)),
        ("you generated x′ with PGD on the cross-entropy; TRADES' x′ maximises KL(p(x) ‖ p(x′)) (attacks.trades_attack)", _pgd_ce("uniform"), _lib_loss("trades")),
        ("you ignored the `beta` argument (your loss matches β = 6)", _lib_adv("trades"), _lib_loss("trades", beta=6.0)),
        ("you trained on clean CE only: add β·KL(p(x) ‖ p(x′))", _lib_adv("trades"), lambda t, g, x, xa, y, k: _CE(t(x), y)),
    ],
    "lbgat": [
        ("you generated x′ with CAG (the guide's reference); LBGAT generates x′ with the target alone, as TRADES (attacks.trades_attack)", lambda t, g, x, y, k: attacks.cag(t, g, x, **_only(_BUDGET)(k)), _lib_loss("lbgat")),
        ("your MSE uses the target's clean logits f(x); LBGAT matches the adversarial logits f(x′) to g(x)", _lib_adv("lbgat"), lambda t, g, x, xa, y, k: _CE(g(x), y) + _MSE(t(x), g(x))),
        ("your CE term uses the target's logits f(x′); LBGAT puts CE on the guide: CE(g(x), y)", _lib_adv("lbgat"), lambda t, g, x, xa, y, k: (lambda za: _CE(za, y) + _MSE(za, g(x)))(t(xa))),
        ("you generated x′ with PGD on the cross-entropy; LBGAT uses TRADES generation (attacks.trades_attack)", _pgd_ce("uniform"), _lib_loss("lbgat")),
    ],
    "d2r": [
        ("you generated x′ with the target alone (TRADES/LBGAT generation); D2R uses CAG, whose reference is the guide's p_g(x) (attacks.cag)", _lib_adv("d2r_trades_gen"), _lib_loss("d2r_trades_gen")),
        ("your KL terms use 'batchmean' (the per-sample KL); the official D2R averages them over batch × classes", _lib_adv("d2r"), _lib_loss("d2r", kl_reduction="batchmean")),
        ("you used the LBGAT loss (CE + MSE); D2R adds w_clean·|K̄L(p_f‖p_g) − K̄L(p_g‖p_f)| + w_adv·K̄L(p_f(x′) ‖ p_g(x)) (losses.d2r_loss)", _lib_adv("d2r"), lambda t, g, x, xa, y, k: losses.lbgat_loss(t(xa), g(x), y)),
        ("you generated x′ with PGD on the cross-entropy; D2R uses CAG (attacks.cag)", _pgd_ce("uniform"), _lib_loss("d2r")),
    ],
}


def _params(t, g):
    return [p.detach().clone() for m in (t, g) if m is not None for p in m.parameters()]


def _max_diff(a, b) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b))


class _Recorder:
    """Counts each model's train-mode forward passes and keeps the target's train-mode inputs."""

    def __init__(self, models: dict):
        self.calls = {role: 0 for role in models}
        self.inputs = []
        self.hooks = [m.register_forward_pre_hook(self._hook(role)) for role, m in models.items()]

    def _hook(self, role):
        def hook(module, args):
            if module.training:
                self.calls[role] += 1
                if role == "target":
                    self.inputs.append(args[0].detach().clone())

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def _objective(method, t, g, x, y, x_adv) -> float:
    """What the method's attack raises, for x′ (eval mode, no graph)."""
    with attacks.eval_mode(t), torch.no_grad():
        z = t(x_adv)
        if method == "pgd_at":
            return F.cross_entropy(z, y, reduction="sum").item()
        ref = t(x) if method in ("trades", "lbgat") else None
    if ref is None:
        with attacks.eval_mode(g), torch.no_grad():
            ref = g(x)
    return attacks.official_kl_sum(F.softmax(ref, dim=1), z).item()


def _loss_value(t, g, x, xa, y, k, loss_fn) -> float:
    t.train()
    if g is not None:
        g.train()
    with torch.no_grad():
        return float(loss_fn(t, g, x, xa, y, k))


def _check_passes(task, method, rec) -> None:
    for role, allowed in _PASSES[method].items():
        n = rec.calls.get(role, 0)
        if n in allowed:
            continue
        want = (
            " or ".join(f"{c} ({d})" for c, d in allowed.items()) if any(allowed.values()) else "0"
        )
        if n > max(allowed):
            fail(task, f"the {role} made {n} training-mode forward passes; this method's step makes {want}: run the attack with the models in eval mode and only the loss's forward passes in train mode")
        fail(task, f"the {role} made {n} training-mode forward passes; this method's step makes {want}: after the attack put the models in train mode (`model.train()`) and run each forward pass of the loss separately")


class _Trial:
    """One trial's batch, models (with stale gradients to show a missing zero_grad), budget."""

    lr = 0.05

    def __init__(self, method: str, trial: int, b: int, beta: float):
        g = generator(1700 + trial)
        self.seed = 1800 + trial
        self.x, self.y = rand_images(g, b), rand_labels(g, b, 10)
        self.base_t = small_cnn(10, 1750 + trial, width=4)
        self.base_g = small_cnn(10, 1760 + trial, width=4) if method in _GUIDED else None
        self.junk = [torch.randn(p.shape, generator=g)
                     for m in (self.base_t, self.base_g) if m is not None for p in m.parameters()]
        self.k = {**_BUDGETS[method], **({"beta": beta} if method == "trades" else {})}

    def fresh(self):
        t = copy.deepcopy(self.base_t).train()
        g = copy.deepcopy(self.base_g).train() if self.base_g is not None else None
        for p, j in zip(_params_of(t, g), self.junk):
            p.grad = j.clone()  # stale gradients: a step without zero_grad() shows
        return t, g, methods.make_optimizer(t, g, lr=self.lr)


def _params_of(t, g):
    return [p for m in (t, g) if m is not None for p in m.parameters()]


def _learner_step(task: str, method: str, fn, tr: _Trial):
    """Run the learner's step: (its loss, its models, the recorder of train-mode passes, the x′
    its loss saw or None)."""
    t_l, g_l, opt_l = tr.fresh()
    rec = _Recorder({"target": t_l, **({"guide": g_l} if g_l is not None else {})})
    torch.manual_seed(tr.seed)
    x, y = tr.x.clone(), tr.y.clone()
    args = (t_l, g_l, opt_l, x, y) if g_l is not None else (t_l, opt_l, x, y)
    try:
        ret = call_learner(task, fn, *args, **tr.k)
    finally:
        rec.remove()
    got = as_float(task, ret.item() if isinstance(ret, torch.Tensor) and ret.numel() == 1 else ret,
                   "the loss")
    x_l = next((i for i in rec.inputs if i.shape == tr.x.shape and not torch.equal(i, tr.x)), None)
    return got, (t_l, g_l), rec, x_l


def _name_variant(task: str, method: str, tr: _Trial, got: float, want: float, x_l, x_ref):
    """The learner's loss is not the library's: fail with the known mistake it matches, if any.
    Variants whose attack gives the learner's x′ (or any, without one) are scored at that x′."""
    x, y, k = tr.x, tr.y, tr.k
    for message, attack, loss_fn in _STEP_VARIANTS[method]:
        t_v, g_v, _ = tr.fresh()
        if x_l is None or torch.allclose(x_l, x_ref, atol=1e-6):
            xa = x_ref
        else:
            torch.manual_seed(tr.seed)
            xa = attack(t_v, g_v, x, y, k)
            if not torch.allclose(xa, x_l, atol=1e-6):
                continue
        v = _loss_value(t_v, g_v, x, xa, y, k, loss_fn)
        if close(got, v, 1e-4, 1e-5) and not close(v, want, 1e-4, 1e-5):
            fail(task, message)


def _check_own_loss(task: str, method: str, tr: _Trial, got: float, x_l, x_ref) -> None:
    """A learner's x′ from other random numbers: check x′, then the loss at it."""
    _check_own_x_adv(task, method, tr.base_t, tr.base_g, tr.x, tr.y, tr.k, x_l, x_ref)
    t_c, g_c, _ = tr.fresh()
    at_yours = methods.compute_terms(method, t_c, g_c, tr.x, x_l, tr.y, **tr.k)["loss"].item()
    if not close(got, at_yours, 1e-4, 1e-5):
        fail(task, f"your loss {got:.6g} differs from the method's loss at your own x′, {at_yours:.6g} (methods.compute_terms): compare your loss term by term")


def _check_same_step(task: str, method: str, tr: _Trial, got, want, params_l, models_r) -> None:
    if not close(got, want, 1e-4, 1e-5):
        fail(task, f"your loss {got:.6g} differs from the library's {want:.6g} for the same batch, x′ and parameters (methods.train_step({method!r}, ...)): compare your loss term by term with the chapter's")
    params_r = _params(*models_r)
    if _max_diff(params_l, params_r) > 1e-5:
        stale = [r - tr.lr * j for r, j in zip(params_r, tr.junk)]
        if _max_diff(params_l, stale) <= 1e-5:
            fail(task, "you forgot optimizer.zero_grad(): gradients left from the previous step were added to this one")
        fail(task, f"your loss is right but the parameters after your step differ from the library's (max |Δ| = {_max_diff(params_l, params_r):.3g}): zero the gradients, then exactly one loss.backward() and one optimizer.step() with the optimizer passed in")


def _step_trial(task: str, method: str, fn, tr: _Trial) -> bool:
    """One trial; True when the learner's x′ came from other random numbers than the library's."""
    got, models_l, rec, x_l = _learner_step(task, method, fn, tr)
    t_r, g_r, opt_r = tr.fresh()
    torch.manual_seed(tr.seed)
    x_ref = methods.make_adversarial(method, copy.deepcopy(t_r), copy.deepcopy(g_r), tr.x, tr.y,
                                     **tr.k)
    torch.manual_seed(tr.seed)
    want = methods.train_step(method, t_r, g_r, opt_r, tr.x, tr.y, **tr.k)["loss"]
    same_x_adv = x_l is None or torch.allclose(x_l, x_ref, atol=1e-6)
    if not close(got, want, 1e-4, 1e-5):
        _name_variant(task, method, tr, got, want, x_l, x_ref)
    _check_passes(task, method, rec)
    if x_l is None:
        fail(task, "the target never ran in train mode on an adversarial x′: make x′ with the attack, then put the models in train mode (`model.train()`) and compute the loss on x′")
    params_l = _params(*models_l)
    if _max_diff(params_l, _params(tr.base_t, tr.base_g)) == 0:
        fail(task, "your step did not change the parameters: call loss.backward(), then optimizer.step()")
    if not same_x_adv:
        _check_own_loss(task, method, tr, got, x_l, x_ref)
        return True
    _check_same_step(task, method, tr, got, want, params_l, (t_r, g_r))
    return False


def _run_step_check(task: str, method: str, fn) -> None:
    with sandbox(task, fn):
        own_rng = [_step_trial(task, method, fn, _Trial(method, trial, b, beta))
                   for trial, (b, beta) in enumerate([(8, 6.0), (4, 2.0)])]
        note = " — your attack drew its random numbers differently, so x′ was checked for the ε-ball, [0, 1] and the objective it reaches, and the loss at your x′"
        passed(task, f"same loss and parameters after one step as methods.train_step({method!r}, ...) (attack in eval mode, loss in train mode, stale gradients cleared; 2 trials){note if any(own_rng) else ''}")


def _check_own_x_adv(task, method, base_t, base_g, x, y, k, x_l, x_ref) -> None:
    eps = k["eps"]
    if ((x_l < -1e-6) | (x_l > 1 + 1e-6)).any():
        fail(task, "your x′ has pixels outside [0, 1]: clamp after every step")
    if (x_l - x).abs().max().item() > eps + 1e-6:
        fail(task, f"your x′ leaves the ε-ball (max |x′ − x| = {(x_l - x).abs().max().item():.4g} > ε = {eps:.4g}): project after every step")
    t, g = copy.deepcopy(base_t), copy.deepcopy(base_g) if base_g is not None else None
    base = _objective(method, t, g, x, y, x)
    mine, lib = (
        _objective(method, t, g, x, y, x_l) - base,
        _objective(method, t, g, x, y, x_ref) - base,
    )
    if mine < 0.75 * lib:
        fail(task, f"your x′ raises the attack's objective much less than the library's attack ({mine:.3g} vs {lib:.3g}): make x′ with the chapter's attack for this method")


def check_pgd_at_step(fn) -> None:
    """Task: ``pgd_at_step(model, optimizer, x, y, *, eps, step_size, steps)`` → loss (float)."""
    _run_step_check("pgd_at_step", "pgd_at", fn)


def check_trades_step(fn) -> None:
    """Task: ``trades_step(model, optimizer, x, y, *, beta, eps, step_size, steps)`` → loss
    (float)."""
    _run_step_check("trades_step", "trades", fn)


def check_lbgat_step(fn) -> None:
    """Task: ``lbgat_step(target, guide, optimizer, x, y, *, eps, step_size, steps)`` → loss
    (float)."""
    _run_step_check("lbgat_step", "lbgat", fn)


def check_d2r_step(fn) -> None:
    """Task: ``d2r_step(target, guide, optimizer, x, y, *, eps, step_size, steps)`` → loss
    (float)."""
    _run_step_check("d2r_step", "d2r", fn)
