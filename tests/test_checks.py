"""d2r_lib.checks has teeth, and accepts every correct answer.

The library's own implementations and at least one differently written correct answer (the official
code's transcription where one exists) pass every check; at least two deliberately wrong answers per
check are rejected with the specific message that names the mistake."""

import contextlib
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from d2r_lib import attacks, checks, losses, methods


@pytest.fixture(autouse=True)
def _one_thread():
    """The checks use tiny tensors: one thread is fastest and avoids oversubscription under pytest
    -n."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _norm(t):
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


class Args(tuple):
    """Several arguments for one check (a reading with the scores it reads, a prediction with its
    run)."""


def _check(name, answer):
    fn = getattr(checks, f"check_{name}")
    return fn(*answer) if isinstance(answer, Args) else fn(answer)


_BASE, _ABL = [0.70, 0.66, 0.71, 0.68], [0.74, 0.69, 0.75, 0.72]  # ablation higher, paired
_NOISE = [0.70, 0.75, 0.66, 0.72]  # ablation − baseline straddles 0


def _toy_runs(d2r, other):
    """Runs shaped like toy.compare's: D2R and d2r_trades_gen, one exact accuracy per seed."""
    return [{"method": m, "seed": s, "metrics": {"clean": 0.9, "exact": v}}
            for m, values in (("d2r", d2r), ("d2r_trades_gen", other))
            for s, v in enumerate(values)]


_CAG_LOWER = _toy_runs([0.60, 0.62, 0.61, 0.63], [0.75, 0.78, 0.74, 0.77])
_CAG_NOISE = _toy_runs([0.60, 0.80, 0.61, 0.75], [0.75, 0.62, 0.74, 0.70])


def _sweep(exact_high, prob_high):
    """A w_adv sweep over 3 seeds: at w_adv 30 the given values, at 0 fixed ones."""
    rows = [{"w_adv": 0.0, "seed": s, "exact": e, "guide_true_prob": p}
            for s, (e, p) in enumerate(zip([0.80, 0.77, 0.79], [0.80, 0.82, 0.79]))]
    return rows + [{"w_adv": 30.0, "seed": s, "exact": e, "guide_true_prob": p}
                   for s, (e, p) in enumerate(zip(exact_high, prob_high))]


_SWEEP_FALLS = _sweep([0.62, 0.60, 0.61], [0.59, 0.64, 0.58])
_SWEEP_MIXED = _sweep([0.62, 0.90, 0.70], [0.59, 0.64, 0.58])  # robustness undecided
_BOTH_FALL = {"robustness": "falls", "guide_confidence": "falls"}


def _diagnose(probs, y, confidence_of=lambda p, y: p.max(1).values, against=None, flip=False):
    conf = confidence_of(probs, y).mean().item()
    ref = (probs.argmax(1) == y).float().mean().item() if against is None else against(probs)
    gap = (conf - ref) if flip else (ref - conf)
    return "under-confident" if gap > 0.05 else "over-confident" if gap < -0.05 else "calibrated"


def _diagnose_no_tolerance(probs, y):
    conf = probs.max(1).values.mean().item()
    acc = (probs.argmax(1) == y).float().mean().item()
    return "under-confident" if conf < acc else "over-confident" if conf > acc else "calibrated"


def _diagnose_stdlib(probs, y):
    rows = probs.tolist()
    top = [max(r) for r in rows]
    right = [r.index(max(r)) == int(t) for r, t in zip(rows, y)]
    gap = statistics.mean(right) - statistics.mean(top)
    return "calibrated" if abs(gap) <= 0.05 else "under-confident" if gap > 0 else "over-confident"


def _guide_rows(d2r, lbgat):
    return [{"method": m, "seed": s, "diagnosis": v}
            for m, values in (("d2r", d2r), ("lbgat", lbgat)) for s, v in enumerate(values)]


def _std_runs(pgd_at, standard):
    return [{"method": m, "seed": s, "metrics": {"clean": v}}
            for m, values in (("pgd_at", pgd_at), ("standard", standard))
            for s, v in enumerate(values)]


_AT_LOWER = _std_runs([0.84, 0.86, 0.83], [0.97, 0.98, 0.96])
_AT_NOISE = _std_runs([0.90, 0.99, 0.93], [0.97, 0.91, 0.96])
_PER_SEED_FALLS = [{"seed": s, "mean": m, "batchmean": b}
                   for s, (m, b) in enumerate([(0.80, 0.70), (0.78, 0.69), (0.81, 0.72)])]
_FLAT_WEAKER = [{"seed": s, "cag": c, "trades": t}
                for s, (c, t) in enumerate([(0.95, 0.60), (0.97, 0.62), (0.96, 0.58)])]
_PGD_ABOVE = [{"seed": s, "pgd": p, "exact": e}
              for s, (p, e) in enumerate([(0.30, 0.20), (0.35, 0.22), (0.28, 0.19)])]
_PGD_EQUAL = [{"seed": s, "pgd": 0.3, "exact": 0.3} for s in range(3)]
_IMAGES_PGD = [{"fgsm": 1.0 if i % 2 else 0.0, "pgd": 0.0} for i in range(40)]
_CORRECT_A, _CORRECT_B = [1] * 80 + [0] * 20, [1] * 40 + [0] * 60  # a − b = +40 points
_CORRECT_C = [1] * 50 + [0] * 50  # vs _CORRECT_D: 3 images lost, 4 won: undecided
_CORRECT_D = [0] * 3 + [1] * 47 + [1] * 4 + [0] * 46
_BETA_RISES = [{"seed": s, "beta0": a, "beta6": b}
               for s, (a, b) in enumerate([(0.70, 0.81), (0.64, 0.77), (0.68, 0.79)])]


def _kl_grad(z_nat, z_adv):
    return (F.softmax(z_adv, 1) - F.softmax(z_nat, 1)) / len(z_adv)


def _l2_max(grad, eps):
    norm = grad.norm(dim=1, keepdim=True)
    return eps * grad / norm, eps * norm.squeeze(1)


_UNDER = {"d2r": "under-confident", "lbgat": "under-confident"}
_ROWS_UNDER = _guide_rows(["under-confident"] * 3, ["under-confident"] * 3)
_ROWS_MIXED = _guide_rows(["under-confident"] * 3, ["calibrated", "under-confident", "calibrated"])


# ================================================================================ correct
# implementations
def _accuracy(model, x, y):
    with attacks.eval_mode(model), torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _lib_robust_accuracy(model, x, y, *, eps, step_size, steps):
    return _accuracy(model, attacks.pgd(model, x, y, eps=eps, step_size=step_size, steps=steps), y)


def _lib_masked(model, x, y, surrogate):
    pgd = attacks.ATTACKS["pgd"]
    white = _accuracy(model, pgd(model, x, y, 0.3), y)
    return white > 0.1 or _accuracy(model, pgd(surrogate, x, y, 0.3), y) < white - 0.05


LIBRARY = {
    "fgsm": lambda m, x, y, eps: attacks.fgsm(m, x, y, eps=eps),
    "project_linf": lambda xa, x, eps: attacks.project(xa, x, eps, "linf"),
    "project_l2": lambda xa, x, eps: attacks.project(xa, x, eps, "l2"),
    "pgd_linf": lambda m, x, y, eps, a, k: attacks.pgd(m, x, y, eps=eps, step_size=a, steps=k),
    "pgd_l2": lambda m, x, y, eps, a, k: attacks.pgd(
        m, x, y, eps=eps, step_size=a, steps=k, norm="l2"
    ),
    "pgd_at_loss": losses.pgd_at_loss,
    "pgd_at_step": lambda m, o, x, y, **k: methods.train_step("pgd_at", m, None, o, x, y, **k)[
        "loss"
    ],
    "robust_accuracy": _lib_robust_accuracy,
    "trades_kl": losses.trades_kl,
    "trades_loss": losses.trades_loss,
    "trades_attack": lambda m, x, eps, a, k: attacks.trades_attack(
        m, x, eps=eps, step_size=a, steps=k
    ),
    "trades_step": lambda m, o, x, y, **k: methods.train_step("trades", m, None, o, x, y, **k)[
        "loss"
    ],
    "lbgat0_loss": losses.lbgat_loss,
    "lbgat_loss": losses.lbgat_loss,
    "make_optimizer": methods.make_optimizer,
    "lbgat_step": lambda t, g, o, x, y, **k: methods.train_step("lbgat", t, g, o, x, y, **k)[
        "loss"
    ],
    "official_kl": losses.official_kl,
    "d2r_clean_term": lambda zn, zg: losses.d2r_terms(
        zn, zn, zg, torch.zeros(len(zn), dtype=torch.long)
    )["clean"],
    "d2r_adv_term": lambda za, zg: losses.d2r_terms(
        za, za, zg, torch.zeros(len(za), dtype=torch.long)
    )["adv"],
    "d2r_loss": losses.d2r_loss,
    "guide_reference": lambda g, x: (lambda p: p)(_guide_ref(g, x)),
    "cag_objective": lambda za, pg: attacks.official_kl_sum(pg, za),
    "cag": lambda t, g, x, eps, a, k: attacks.cag(t, g, x, eps=eps, step_size=a, steps=k),
    "d2r_step": lambda t, g, o, x, y, **k: methods.train_step("d2r", t, g, o, x, y, **k)["loss"],
    "accuracy": _accuracy,
    "eps_sweep": lambda m, x, y, attack, eps_values: [
        _accuracy(m, attack(m, x, y, e), y) for e in eps_values
    ],
    "transfer_accuracy": lambda s, t, x, y, attack, eps: _accuracy(t, attack(s, x, y, eps), y),
    "gradient_masking": _lib_masked,
    "linearised_max": lambda g, eps: (eps * g.sign(), eps * g.abs().sum(1)),
    "kl_mean_ratio": lambda b, c: 1 / c,
    "clean_term_leading_order": lambda pf, pg: ((pg - pf) ** 3 / (6 * pf**2)).mean().abs(),
    "soft_label_ce": lambda za, pg: F.cross_entropy(za, pg, reduction="sum"),
    "cag_copy_prediction": 1.0,
    "bpda_attack": lambda m, x, y, eps, a, k: _bpda(m, x, y, eps, a, k),
    "logit_attack": lambda m, x, y, eps, a, k: attacks.pgd(
        m.inner, x, y, eps=eps, step_size=a, steps=k, objective="cw"
    ),
    "fgsm_overfitting": lambda m, o, x, y, eps, rs: _fgsm_train_step(m, o, x, y, eps, rs),
    "beta_prediction": "falls",
    "paired_t": lambda a, b: _paired_t(a, b),
    "decision": lambda a, b, *, t_crit, min_effect: _decide(a, b, t_crit, min_effect),
    "reading": Args(("ablation higher", _BASE, _ABL)),
    "trades_gen_prediction": Args(("lower", _CAG_LOWER)),
    "pgd_at_clean_prediction": Args(("lower", _AT_LOWER)),
    "beta_robust_prediction": Args(("rises", _BETA_RISES)),
    "kl_adv_gradient": _kl_grad,
    "gap_reading": Args(("higher", _CORRECT_A, _CORRECT_B)),
    "reduction_prediction": Args(("falls", _PER_SEED_FALLS)),
    "flat_guide_prediction": Args(("weaker", _FLAT_WEAKER)),
    "linearised_max_l2": _l2_max,
    "pgd_vs_exact_prediction": Args(("higher", _PGD_ABOVE)),
    "fgsm_vs_pgd_prediction": Args(("pgd stronger", _IMAGES_PGD)),
    "diagnose_guide": _diagnose,
    "guide_diagnosis_prediction": Args((_UNDER, _ROWS_UNDER)),
    "mse_guide_gradient": lambda za, zg: 2 * (zg - za) / zg.numel(),
    "w_adv_prediction": Args((_BOTH_FALL, _SWEEP_FALLS)),
    "preregistration": {
        "baseline": "d2r",
        "ablation": "d2r_no_clean",
        "seeds": [0, 1, 2, 3, 4],
        "metric": "pgd",
        "t_crit": 2.776,
        "min_effect": 0.01,
    },
    "epoch_seconds": lambda a, b, c, k, n: n * (a + b * (k + c)),
    "outer_steps": lambda p, r: (3 * p + r) / 2,
    "cost_prediction": 2.0,
    "mart_loss": losses.mart_loss,
    "k_prediction": 10,
    "guide_width_prediction": 128,
}


def _bpda(m, x, y, eps, a, k, *, straight_through=True):
    x_adv = x.clone()
    for _ in range(k):
        x_adv.requires_grad_(True)
        z = x_adv + (m.quantise(x_adv) - x_adv).detach() if straight_through else m.quantise(x_adv)
        (grad,) = torch.autograd.grad(F.cross_entropy(m.inner(z), y), x_adv)
        x_adv = attacks.project(x_adv.detach() + a * grad.sign(), x, eps)
    return x_adv.detach()


def _guide_ref(guide, x):
    with attacks.eval_mode(guide), torch.no_grad():
        return F.softmax(guide(x), dim=1)


def test_every_check_has_a_library_implementation():
    names = {n[len("check_") :] for n in checks.__all__ if n.startswith("check_")}
    assert names == set(LIBRARY)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_implementation_passes(name, capsys):
    _check(name, LIBRARY[name])
    out = capsys.readouterr().out
    assert out.startswith("✓ "), out


def test_not_implemented_passes_through():
    def stub(*args, **kwargs):
        raise NotImplementedError("Task 1: write the body of `fgsm`")

    for name in (
        "fgsm",
        "trades_loss",
        "cag",
        "d2r_step",
        "accuracy",
        "gradient_masking",
        "make_optimizer",
    ):
        with pytest.raises(NotImplementedError, match="Task 1"):
            getattr(checks, f"check_{name}")(stub)


def test_other_errors_become_verdicts_and_the_rng_is_untouched():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with pytest.raises(checks.CheckFailed, match=r"your function raised ZeroDivisionError"):
        checks.check_trades_kl(lambda a, b: 1 / 0)
    checks.check_trades_kl(losses.trades_kl)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert issubclass(checks.CheckFailed, AssertionError)


def test_a_non_callable_is_a_type_error():
    with pytest.raises(TypeError, match="pass your function itself"):
        checks.check_fgsm(torch.zeros(3))


# ================================================================================ wrong
# implementations
def _grad(model, x, y, objective=None, reduction="sum"):
    x = x.detach().clone().requires_grad_(True)
    with attacks.eval_mode(model):
        z = model(x)
        loss = F.cross_entropy(z, y, reduction=reduction) if objective is None else objective(z)
        return torch.autograd.grad(loss, x)[0]


# -- chapter 1
def fgsm_raw_gradient(m, x, y, eps):
    return (x + eps * _grad(m, x, y)).clamp(0, 1)


def fgsm_no_clamp(m, x, y, eps):
    return x + eps * _grad(m, x, y).sign()


def fgsm_descent(m, x, y, eps):
    return (x - eps * _grad(m, x, y).sign()).clamp(0, 1)


def fgsm_train_mode(m, x, y, eps):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(m(x), y), x)
    return (x.detach() + eps * grad.sign()).clamp(0, 1)


def fgsm_not_detached(m, x, y, eps):
    x = x.clone().requires_grad_(True)
    with attacks.eval_mode(m):
        (grad,) = torch.autograd.grad(F.cross_entropy(m(x), y), x, retain_graph=True)
    return (x + eps * grad.sign()).clamp(0, 1)


def fgsm_leaves_eval_mode(m, x, y, eps):
    m.eval()
    return fgsm_train_mode(m, x, y, eps)


def linf_no_clamp(xa, x, eps):
    return x + (xa - x).clamp(-eps, eps)


def linf_no_ball(xa, x, eps):
    return xa.clamp(0, 1)


def linf_rescaled(xa, x, eps):
    d = xa - x
    m = d.flatten(1).abs().max(dim=1).values.view(-1, 1, 1, 1)
    return (x + d * (eps / m).clamp(max=1.0)).clamp(0, 1)


def linf_in_place(xa, x, eps):
    xa -= x
    return (x + xa.clamp_(-eps, eps)).clamp(0, 1)


def l2_batch_norm(xa, x, eps):
    d = xa - x
    return (x + d * (eps / d.norm().clamp_min(1e-12)).clamp(max=1.0)).clamp(0, 1)


def l2_always_rescale(xa, x, eps):
    d = xa - x
    return (x + d * eps / _norm(d)).clamp(0, 1)


def l2_clip_pixels(xa, x, eps):
    return attacks.project(xa, x, eps, "linf")


def l2_unguarded(xa, x, eps):
    d = xa - x
    n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x + d / n * n.clamp(max=eps)).clamp(0, 1)  # 0/0 when δ = 0


def l2_no_clamp(xa, x, eps):
    d = xa - x
    return x + d * (eps / _norm(d)).clamp(max=1.0)


def _pgd(m, x, y, eps, a, k, *, start="uniform", step="sign", project="each", norm="linf"):
    x = x.detach()
    with attacks.eval_mode(m):
        if start == "uniform" and norm == "linf":
            xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        elif start == "uniform":
            d = torch.randn_like(x)
            d = d / _norm(d)
            xa = (x + d * eps * torch.rand(x.shape[0], 1, 1, 1)).clamp(0, 1)
        elif start == "randn":
            xa = (x + eps * torch.randn_like(x).clamp(-1, 1)).clamp(0, 1)
        elif start == "gaussian":
            xa = x + 0.001 * torch.randn_like(x)
        else:
            xa = x.clone()
        for _ in range(k):
            g = _grad(m, xa, y)
            d = {"sign": g.sign(), "grad": g, "l2": g / _norm(g), "l2batch": g / g.norm()}[step]
            xa = xa + a * d
            if project == "each":
                xa = attacks.project(xa, x, eps, norm)
            elif project == "linf":
                xa = attacks.project(xa, x, eps, "linf")
            elif project == "noclamp":
                xa = x + (xa - x).clamp(-eps, eps)
        if project == "end":
            xa = attacks.project(xa, x, eps, norm)
    return xa.detach()


def pgd_no_random_start(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, start="clean")


def pgd_gaussian_start(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, start="gaussian")


def pgd_no_projection(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, project="none").clamp(0, 1)


def pgd_project_once(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, project="end")


def pgd_raw_gradient(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, step="grad")


def pgd_no_clamp(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, project="noclamp")


def pgd_other_rng(m, x, y, eps, a, k):
    """Correct PGD whose random start uses other random numbers than the library's."""
    return _pgd(m, x, y, eps, a, k, start="randn")


def pgd_other_rng_raw_gradient(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, start="randn", step="grad")


def pgd_l2_sign(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, norm="l2", step="sign")


def pgd_l2_batch(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, norm="l2", step="l2batch")


def pgd_l2_linf_projection(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, norm="l2", step="l2", project="linf")


def pgd_l2_no_start(m, x, y, eps, a, k):
    return _pgd(m, x, y, eps, a, k, norm="l2", step="l2", start="clean")


# -- chapter 2
def step_factory(
    method, *, attack=None, loss=None, zero_grad=True, eval_after=False, attack_train_mode=False
):
    """A training step built from library pieces with one piece swapped for a mistake."""

    def step(*args, **k):
        if method in ("lbgat", "d2r"):
            t, g, opt, x, y = args
        else:
            (t, opt, x, y), g = args, None
        budget = {a: k[a] for a in ("eps", "step_size", "steps")}
        if attack_train_mode:
            stack = contextlib.ExitStack()
            for mod in (t, g):
                if mod is not None:
                    stack.enter_context(_no_eval(mod))
            with stack:
                xa = methods.make_adversarial(method, t, g, x, y, **budget)
        elif attack is None:
            xa = methods.make_adversarial(method, t, g, x, y, **budget)
        else:
            xa = attack(t, g, x, y, budget)
        if eval_after:  # a learner who switched to eval for the attack and never back
            t.eval()
            if g is not None:
                g.eval()
        else:
            t.train()
            if g is not None:
                g.train()
        value = (
            methods.compute_terms(
                method, t, g, x, xa, y, **{a: b for a, b in k.items() if a == "beta"}
            )["loss"]
            if loss is None
            else loss(t, g, x, xa, y, k)
        )
        if zero_grad:
            opt.zero_grad()
        value.backward()
        opt.step()
        return value.item()

    return step


@contextlib.contextmanager
def _no_eval(module):
    """Make module.eval() a no-op (a learner who forgot eval mode), restoring the class method
    afterwards."""
    original = module.train

    def train(mode=True):
        return original(True)

    module.train = train
    try:
        yield
    finally:
        del module.train


def robust_percent(m, x, y, *, eps, step_size, steps):
    return 100 * _lib_robust_accuracy(m, x, y, eps=eps, step_size=step_size, steps=steps)


def robust_clean(m, x, y, *, eps, step_size, steps):
    attacks.pgd(m, x, y, eps=eps, step_size=step_size, steps=steps)
    return _accuracy(m, x, y)


def robust_train_mode(m, x, y, *, eps, step_size, steps):
    xa = attacks.pgd(m, x, y, eps=eps, step_size=step_size, steps=steps)
    with torch.no_grad():
        return (m(xa).argmax(1) == y).float().mean().item()


def robust_fgsm(m, x, y, *, eps, step_size, steps):
    return _accuracy(m, attacks.fgsm(m, x, y, eps=eps), y)


# -- chapter 3
def trades_kl_reversed(zn, za):
    return F.kl_div(F.log_softmax(zn, 1), F.softmax(za, 1), reduction="batchmean")


def trades_kl_mean(zn, za):
    return F.kl_div(F.log_softmax(za, 1), F.softmax(zn, 1))


def trades_kl_sum(zn, za):
    return F.kl_div(F.log_softmax(za, 1), F.softmax(zn, 1), reduction="sum")


def trades_kl_probs(zn, za):
    return F.kl_div(F.softmax(za, 1), F.softmax(zn, 1), reduction="batchmean")


def trades_kl_dim0(zn, za):
    return F.kl_div(F.log_softmax(za, 0), F.softmax(zn, 0), reduction="batchmean")


def trades_ce_adv(zn, za, y, beta=6.0):
    return F.cross_entropy(za, y) + beta * losses.trades_kl(zn, za)


def trades_reversed(zn, za, y, beta=6.0):
    return F.cross_entropy(zn, y) + beta * trades_kl_reversed(zn, za)


def trades_mean(zn, za, y, beta=6.0):
    return F.cross_entropy(zn, y) + beta * trades_kl_mean(zn, za)


def trades_beta_ignored(zn, za, y, beta=6.0):
    return F.cross_entropy(zn, y) + 6.0 * losses.trades_kl(zn, za)


def trades_detached_nat(zn, za, y, beta=6.0):
    return F.cross_entropy(zn, y) + beta * losses.trades_kl(zn.detach(), za)


def _trades_like(
    m, x, eps, a, k, *, start="gaussian", reverse=False, eval_mode=True, detach=True, project=True
):
    x = x.detach()
    ctx = attacks.eval_mode(m) if eval_mode else contextlib.nullcontext()
    with ctx:
        with torch.no_grad():
            p = F.softmax(m(x), 1)
        xa = (
            x + 0.001 * torch.randn_like(x)
            if start == "gaussian"
            else (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        )
        for _ in range(k):
            xa = xa.detach().requires_grad_(True)
            z = m(xa)
            obj = (
                F.kl_div(p.log(), F.softmax(z, 1), reduction="sum")
                if reverse
                else F.kl_div(F.log_softmax(z, 1), p, reduction="sum")
            )
            (g,) = torch.autograd.grad(obj, xa, create_graph=not detach)
            xa = xa + a * g.sign() if not detach else xa.detach() + a * g.sign()
            if project:
                xa = torch.min(torch.max(xa, x - eps), x + eps)
            xa = xa.clamp(0, 1)
    return xa.detach() if detach else xa


def trades_uniform_start(m, x, eps, a, k):
    return _trades_like(m, x, eps, a, k, start="uniform")


def trades_attack_reversed(m, x, eps, a, k):
    return _trades_like(m, x, eps, a, k, reverse=True)


def trades_attack_train_mode(m, x, eps, a, k):
    return _trades_like(m, x, eps, a, k, eval_mode=False)


def trades_attack_not_detached(m, x, eps, a, k):
    return _trades_like(m, x, eps, a, k, detach=False)


def trades_attack_no_projection(m, x, eps, a, k):
    return _trades_like(m, x, eps, a, k, project=False)


# -- chapter 4
def lbgat0_ce_target(za, zg, y):
    return F.cross_entropy(za, y) + F.mse_loss(za, zg)


def lbgat0_mse_probs(za, zg, y):
    return F.cross_entropy(zg, y) + F.mse_loss(F.softmax(za, 1), F.softmax(zg, 1))


def lbgat0_mse_class_sum(za, zg, y):
    return F.cross_entropy(zg, y) + ((za - zg) ** 2).sum(1).mean()


def lbgat0_detached_guide(za, zg, y):
    return F.cross_entropy(zg, y) + F.mse_loss(za, zg.detach())


def lbgat_kl_reversed(za, zg, y, beta=0.0, logits_nat=None):
    loss = losses.lbgat_loss(za, zg, y)
    return loss + beta * trades_kl_reversed(logits_nat, za) if beta > 0 else loss


def lbgat_kl_guide(za, zg, y, beta=0.0, logits_nat=None):
    loss = losses.lbgat_loss(za, zg, y)
    return loss + beta * losses.trades_kl(zg, za) if beta > 0 else loss


def lbgat_no_beta(za, zg, y, beta=0.0, logits_nat=None):
    return losses.lbgat_loss(za, zg, y)


def lbgat_beta_fixed(za, zg, y, beta=0.0, logits_nat=None):
    loss = losses.lbgat_loss(za, zg, y)
    return loss + 6.0 * losses.trades_kl(logits_nat, za) if beta > 0 else loss


def optimizer_target_only(t, g):
    return torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def optimizer_wd_5e4(t, g):
    return torch.optim.SGD(
        [*t.parameters(), *g.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4
    )


def optimizer_adam(t, g):
    return torch.optim.Adam([*t.parameters(), *g.parameters()], lr=0.1)


def optimizer_nesterov(t, g):
    return torch.optim.SGD(
        [*t.parameters(), *g.parameters()], lr=0.1, momentum=0.9, weight_decay=2e-4, nesterov=True
    )


# -- chapter 5
def okl_no_eps(p, lq):
    return (p * (torch.log(p) - lq)).mean()


def okl_batchmean(p, lq):
    return (p * (torch.log(p + 1e-5) - lq)).sum() / p.shape[0]


def okl_reversed(p, lq):
    q = lq.exp()
    return (q * (torch.log(q + 1e-5) - torch.log(p))).mean()


def okl_eps_both(p, lq):
    return (p * (torch.log(p + 1e-5) - torch.log(lq.exp() + 1e-5))).mean()


def _okl(zp, zq, reduction="mean"):
    return losses.official_kl(F.softmax(zp, 1), F.log_softmax(zq, 1), reduction)


def clean_no_abs(zn, zg):
    return _okl(zn, zg) - _okl(zg, zn)


def clean_sum(zn, zg):
    return _okl(zn, zg) + _okl(zg, zn)


def clean_batchmean(zn, zg):
    return (_okl(zn, zg, "batchmean") - _okl(zg, zn, "batchmean")).abs()


def clean_single(zn, zg):
    return _okl(zn, zg)


def clean_no_eps(zn, zg):
    return (
        okl_no_eps(F.softmax(zn, 1), F.log_softmax(zg, 1))
        - okl_no_eps(F.softmax(zg, 1), F.log_softmax(zn, 1))
    ).abs()


def adv_reversed(za, zg):
    return _okl(zg, za)


def adv_batchmean(za, zg):
    return _okl(za, zg, "batchmean")


def adv_no_eps(za, zg):
    return okl_no_eps(F.softmax(za, 1), F.log_softmax(zg, 1))


def _d2r(za, zn, zg, y, w_clean=20.0, w_adv=30.0, *, ce=None, clean=None, adv=None, swap=False):
    ce_term = F.cross_entropy(zg if ce is None else ce(za, zn), y)
    clean_term = (clean or (lambda: (_okl(zn, zg) - _okl(zg, zn)).abs()))()
    adv_term = (adv or (lambda: _okl(za, zg)))()
    if swap:
        w_clean, w_adv = w_adv, w_clean
    return ce_term + F.mse_loss(za, zg) + w_clean * clean_term + w_adv * adv_term


def d2r_ce_nat(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    return _d2r(za, zn, zg, y, w_clean, w_adv, ce=lambda a, n: n)


def d2r_swapped(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    return _d2r(za, zn, zg, y, w_clean, w_adv, swap=True)


def d2r_adv_trades_direction(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    return _d2r(za, zn, zg, y, w_clean, w_adv, adv=lambda: _okl(zg, za))


def d2r_no_abs(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    return _d2r(za, zn, zg, y, w_clean, w_adv, clean=lambda: _okl(zn, zg) - _okl(zg, zn))


def d2r_batchmean(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    return losses.d2r_loss(za, zn, zg, y, w_clean=w_clean, w_adv=w_adv, kl_reduction="batchmean")


def d2r_fixed_weights(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    return losses.d2r_loss(za, zn, zg, y)


def d2r_detached_guide(za, zn, zg, y, w_clean=20.0, w_adv=30.0):
    t = losses.d2r_terms(za, zn, zg.detach(), y, w_clean=w_clean, w_adv=w_adv)
    return F.cross_entropy(zg, y) + t["mse"] + w_clean * t["clean"] + w_adv * t["adv"]


# -- chapter 6
def ref_train_mode(g, x):
    with torch.no_grad():
        return F.softmax(g(x), 1)


def ref_with_graph(g, x):
    with attacks.eval_mode(g):
        return F.softmax(g(x), 1)


def ref_logits(g, x):
    with attacks.eval_mode(g), torch.no_grad():
        return g(x)


def ref_log_probs(g, x):
    with attacks.eval_mode(g), torch.no_grad():
        return F.log_softmax(g(x), 1)


def ref_twice(g, x):
    with attacks.eval_mode(g), torch.no_grad():
        g(x)
        return F.softmax(g(x), 1)


def ref_leaves_eval(g, x):
    g.eval()
    with torch.no_grad():
        return F.softmax(g(x), 1)


def cagobj_reversed(za, pg):
    return (F.softmax(za, 1) * (torch.log(F.softmax(za, 1) + 1e-5) - torch.log(pg))).sum()


def cagobj_mean(za, pg):
    return (pg * (torch.log(pg + 1e-5) - F.log_softmax(za, 1))).mean()


def cagobj_exact(za, pg):
    return F.kl_div(F.log_softmax(za, 1), pg, reduction="sum")


def cagobj_raw_logits(za, pg):
    return (pg * (torch.log(pg + 1e-5) - za)).sum()


def _cag(
    t,
    g,
    x,
    eps,
    a,
    k,
    *,
    reference="guide",
    eval_mode=True,
    per_step=False,
    grad_guide=False,
    restore=True,
    start="gaussian",
    reverse=False,
):
    x = x.detach()

    def ref():
        if reference == "target":
            src = t
        else:
            src = g
        if grad_guide:
            return F.softmax(src(x), 1).detach()
        with torch.no_grad():
            return F.softmax(src(x), 1)

    if eval_mode:
        stack = attacks.eval_mode(t, g) if restore else contextlib.nullcontext()
        if not restore:
            t.eval()
            g.eval()
    else:
        stack = contextlib.nullcontext()
    with stack:
        p = ref()
        xa = (
            x + 0.001 * torch.randn_like(x)
            if start == "gaussian"
            else (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        )
        for _ in range(k):
            if per_step:
                p = ref()
            xa = xa.detach().requires_grad_(True)
            z = t(xa)
            obj = (
                losses.official_k(F.softmax(z, 1), torch.log(p)).sum()
                if reverse
                else losses.official_k(p, F.log_softmax(z, 1)).sum()
            )
            (grad,) = torch.autograd.grad(obj, xa)
            xa = torch.min(torch.max(xa.detach() + a * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def cag_target_reference(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, reference="target")


def cag_train_mode(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, eval_mode=False)


def cag_guide_every_step(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, per_step=True)


def cag_guide_with_graph(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, grad_guide=True)


def cag_modes_not_restored(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, restore=False)


def cag_uniform_start(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, start="uniform")


def cag_reversed(t, g, x, eps, a, k):
    return _cag(t, g, x, eps, a, k, reverse=True)


# -- chapter 8
def accuracy_percent(m, x, y):
    return 100 * _accuracy(m, x, y)


def accuracy_train_mode(m, x, y):
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


def accuracy_with_grad(m, x, y):
    with attacks.eval_mode(m):
        return (m(x).argmax(1) == y).float().mean().item()


def accuracy_error_rate(m, x, y):
    return 1 - _accuracy(m, x, y)


def accuracy_leaves_eval(m, x, y):
    m.eval()
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


def sweep_cumulative(m, x, y, attack, eps_values):
    out = []
    for e in eps_values:
        x = attack(m, x, y, e)
        out.append(_accuracy(m, x, y))
    return out


def sweep_percent(m, x, y, attack, eps_values):
    return [100 * _accuracy(m, attack(m, x, y, e), y) for e in eps_values]


def sweep_clean(m, x, y, attack, eps_values):
    return [_accuracy(m, x, y) for _ in eps_values]


def sweep_wrong_eps(m, x, y, attack, eps_values):
    return [_accuracy(m, attack(m, x, y, 8 / 255), y) for _ in eps_values]


def transfer_whitebox(s, t, x, y, attack, eps):
    return _accuracy(t, attack(t, x, y, eps), y)


def transfer_source_evaluated(s, t, x, y, attack, eps):
    return _accuracy(s, attack(s, x, y, eps), y)


def transfer_percent(s, t, x, y, attack, eps):
    return 100 * _accuracy(t, attack(s, x, y, eps), y)


def masked_never(model, x, y, surrogate):
    return False


def masked_always(model, x, y, surrogate):
    return True


def masked_small_eps(model, x, y, surrogate):
    """Tests at ε = 0.1, where an honest model may still be robust."""
    pgd = attacks.ATTACKS["pgd"]
    return _accuracy(model, pgd(model, x, y, 0.1), y) > 0.1


def masked_returns_number(model, x, y, surrogate):
    return _accuracy(model, attacks.ATTACKS["pgd"](model, x, y, 0.3), y)


# ============================================================ helpers of the new tasks' answers
def _mart_official(logits, logits_adv, y, beta, *, weight=True, boosted=True):
    """A transcription of mart_loss in YisenWang/MART (train_wideresnet.py's loss), β as given."""
    kl = torch.nn.KLDivLoss(reduction="none")
    batch_size = len(logits)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y)
    if boosted:
        loss_adv = loss_adv + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze(1)
    w = (1.0000001 - true_probs) if weight else 1.0
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * w
    )
    return loss_adv + float(beta) * loss_robust


def _fgsm_train_step(model, optimizer, x, y, eps, random_start):
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) if random_start else x.clone()
    start.requires_grad_(True)
    with attacks.eval_mode(model):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(start), y), start)
    alpha = 1.25 * eps if random_start else eps
    x_adv = attacks.project(start.detach() + alpha * grad.sign(), x, eps)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _fgsm_train_step_delta(model, optimizer, x, y, eps, random_start):
    """Written on δ, with torch.rand for the start and model.eval()/train() by hand."""
    delta = eps * (2 * torch.rand_like(x) - 1) if random_start else torch.zeros_like(x)
    delta.requires_grad_(True)
    model.eval()
    (grad,) = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
    step = 1.25 * eps if random_start else eps
    delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(model((x + delta).clamp(0, 1)), y).backward()
    optimizer.step()


def _paired_t(a, b, ddof=1):
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    mean = d.mean().item()
    sd = d.std(correction=ddof).item()
    if sd == 0:
        return mean, 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean, mean / (sd / math.sqrt(len(d)))


def _paired_t_stdlib(a, b):
    d = [y - x for x, y in zip(a, b)]
    if len(set(d)) == 1:
        return d[0], 0.0 if d[0] == 0 else math.copysign(math.inf, d[0])
    return statistics.mean(d), statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))


def _welch_t(a, b):
    n = len(a)
    ma, mb = statistics.mean(a), statistics.mean(b)
    return mb - ma, (mb - ma) / math.sqrt(statistics.variance(a) / n + statistics.variance(b) / n)


def _decide(a, b, t_crit, min_effect, test=_paired_t):
    mean, t = test(a, b)
    if abs(t) < t_crit:
        return "undecided"
    if abs(mean) < min_effect:
        return "too small"
    return "ablation better" if mean > 0 else "baseline better"


def _decide_no_difference(a, b, t_crit, min_effect):
    verdict = _decide(a, b, t_crit, min_effect)
    return "no difference" if verdict in ("undecided", "too small") else verdict


def _decide_unpaired(a, b, t_crit, min_effect):
    return _decide(a, b, t_crit, min_effect, test=_welch_t)


def _decide_stdlib(a, b, t_crit, min_effect):
    mean, t = _paired_t_stdlib(a, b)
    if abs(t) < t_crit:
        return "undecided"
    return ("ablation better" if mean > 0 else "baseline better") if abs(mean) >= min_effect \
        else "too small"


def _project_l2_renorm(xa, x, eps):
    d = xa - x
    n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x + torch.where(n > eps, d * eps / n.clamp_min(1e-12), d)).clamp(0, 1)


def _pgd_l2_other_rng(m, x, y, eps, a, k):
    torch.rand(3)
    return attacks.pgd(m, x, y, eps=eps, step_size=a, steps=k, norm="l2")


def _robust_other(m, x, y, eps, step_size, steps):
    """Robust accuracy whose PGD start comes from other random numbers than the library's."""
    torch.rand(5)
    x_adv = attacks.pgd(m, x, y, eps=eps, step_size=step_size, steps=steps)
    return _accuracy_counted(m, x_adv, y)


def _accuracy_counted(m, x, y):
    flags = [mod.training for mod in m.modules()]
    m.eval()
    with torch.no_grad():
        correct = int((m(x).argmax(1) == y).sum())
    for mod, f in zip(m.modules(), flags):
        mod.training = f
    return correct / len(y)


def _guide_ref_other(g, x):
    with attacks.eval_mode(g), torch.no_grad():
        z = g(x)
        return torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))


def _masked_by_sweep(model, x, y, surrogate):
    pgd = attacks.ATTACKS["pgd"]
    big = _accuracy(model, pgd(model, x, y, 0.3), y)
    transfer = _accuracy(model, pgd(surrogate, x, y, 0.3), y)
    return big > 0.1 or transfer + 0.05 < big


def _pgd_at_step_fn(m, o, x, y, *, eps, step_size, steps):
    x_adv = attacks.pgd(m, x, y, eps=eps, step_size=step_size, steps=steps)
    m.train()
    loss = losses.pgd_at_loss(m(x_adv), y)
    o.zero_grad()
    loss.backward()
    o.step()
    return loss.item()


WRONG = [
    # chapter 1
    ("fgsm", fgsm_raw_gradient, r"raw gradient, ε·∇; FGSM steps along its sign"),
    ("fgsm", fgsm_no_clamp, r"forgets the clamp to \[0, 1\]: [\d.]+ % of the pixels"),
    ("fgsm", fgsm_descent, r"stepped \*down\* the loss"),
    ("fgsm", fgsm_train_mode, r"the model ran in train mode during your attack"),
    ("fgsm", fgsm_not_detached, r"still carries a graph .*x_adv.detach\(\)"),
    (
        "project_linf",
        linf_no_clamp,
        r"forgets the clamp to \[0, 1\]: [\d.]+ % of the pixels are outside",
    ),
    ("project_linf", linf_no_ball, r"leaves [\d.]+ % of the pixels outside the ε-ball"),
    ("project_linf", linf_rescaled, r"rescaled δ as a whole"),
    ("project_linf", linf_in_place, r"modified its inputs in place"),
    ("project_l2", l2_batch_norm, r"norm of the whole batch; the L2 ball is per example"),
    ("project_l2", l2_always_rescale, r"scaled every δ to norm ε, also those already inside"),
    ("project_l2", l2_clip_pixels, r"clipped each pixel to \[−ε, ε\] \(the L∞ projection\)"),
    ("project_l2", l2_unguarded, r"NaN/inf when δ = 0"),
    ("project_l2", l2_no_clamp, r"forgets the clamp to \[0, 1\]"),
    ("pgd_linf", pgd_no_random_start, r"no random start"),
    ("pgd_linf", pgd_gaussian_start, r"the TRADES start"),
    ("pgd_linf", pgd_no_projection, r"leaves [\d.]+ % of the pixels outside the ε-ball"),
    ("pgd_linf", pgd_project_once, r"projected only once, after the loop"),
    ("pgd_linf", pgd_raw_gradient, r"raw gradient α·∇; L∞ PGD steps along its sign"),
    ("pgd_linf", pgd_no_clamp, r"forgets the clamp to \[0, 1\]"),
    ("pgd_linf", pgd_other_rng_raw_gradient, r"raises its objective much less than the library's"),
    ("pgd_l2", pgd_l2_sign, r"stepped along sign\(∇\) \(the L∞ step\)"),
    ("pgd_l2", pgd_l2_batch, r"norm of the whole batch; normalise per example"),
    ("pgd_l2", pgd_l2_linf_projection, r"projected onto the L∞ ball"),
    ("pgd_l2", pgd_l2_no_start, r"no random start"),
    # chapter 2
    (
        "pgd_at_loss",
        lambda z, y: F.cross_entropy(F.softmax(z, 1), y),
        r"softmax before F.cross_entropy",
    ),
    (
        "pgd_at_loss",
        lambda z, y: F.cross_entropy(z, y, reduction="sum"),
        r"summed the cross-entropy over the batch",
    ),
    ("pgd_at_loss", lambda z, y: F.nll_loss(z, y), r"F.nll_loss expects log-probabilities"),
    (
        "pgd_at_loss",
        lambda z, y: F.cross_entropy(z, y).item(),
        r"return the loss as a torch tensor",
    ),
    (
        "pgd_at_step",
        step_factory("pgd_at", loss=lambda t, g, x, xa, y, k: F.cross_entropy(t(x), y)),
        r"trained on the clean batch",
    ),
    ("pgd_at_step", step_factory("pgd_at", zero_grad=False), r"forgot optimizer.zero_grad\(\)"),
    (
        "pgd_at_step",
        step_factory("pgd_at", attack_train_mode=True),
        r"the target made 3 training-mode forward passes; this method's step makes 1",
    ),
    (
        "pgd_at_step",
        step_factory("pgd_at", eval_after=True),
        r"made 0 training-mode forward passes.*model.train\(\)",
    ),
    (
        "pgd_at_step",
        step_factory("pgd_at", attack=lambda t, g, x, y, b: attacks.fgsm(t, x, y, eps=b["eps"])),
        r"generated x′ with FGSM",
    ),
    ("robust_accuracy", robust_percent, r"returned a percentage"),
    ("robust_accuracy", robust_clean, r"measured the clean accuracy"),
    ("robust_accuracy", robust_train_mode, r"the model ran in train mode"),
    ("robust_accuracy", robust_fgsm, r"attacked with FGSM"),
    # chapter 3
    (
        "trades_kl",
        trades_kl_reversed,
        r"KL direction reversed: you computed KL\(p\(x′\) ‖ p\(x\)\)",
    ),
    ("trades_kl", trades_kl_mean, r"averaged over batch × classes \(F.kl_div's reduction='mean'\)"),
    ("trades_kl", trades_kl_sum, r"summed over the batch as well"),
    (
        "trades_kl",
        trades_kl_probs,
        r"first argument must be log-probabilities: you passed probabilities",
    ),
    ("trades_kl", trades_kl_dim0, r"softmax over the batch \(dim=0\)"),
    ("trades_loss", trades_ce_adv, r"CE term uses the adversarial logits"),
    ("trades_loss", trades_reversed, r"KL direction reversed"),
    ("trades_loss", trades_mean, r"KL averages over batch × classes"),
    ("trades_loss", trades_beta_ignored, r"ignored the `beta` argument"),
    ("trades_loss", trades_detached_nat, r"gradient w.r.t. `logits_nat` differs.*don't detach it"),
    (
        "trades_attack",
        trades_uniform_start,
        r"uniformly random point of the ε-ball; TRADES starts at x \+ 0.001",
    ),
    (
        "trades_attack",
        trades_attack_reversed,
        r"KL direction reversed: you ascended KL\(p\(x′\) ‖ p\(x\)\)",
    ),
    ("trades_attack", trades_attack_train_mode, r"target ran in train mode during your attack"),
    ("trades_attack", trades_attack_not_detached, r"still carries a graph"),
    ("trades_attack", trades_attack_no_projection, r"outside the ε-ball"),
    (
        "trades_step",
        step_factory(
            "trades", loss=lambda t, g, x, xa, y, k: trades_ce_adv(t(x), t(xa), y, k["beta"])
        ),
        r"CE term uses f\(x′\)",
    ),
    (
        "trades_step",
        step_factory("trades", attack=lambda t, g, x, y, b: attacks.pgd(t, x, y, **b)),
        r"generated x′ with PGD on the cross-entropy",
    ),
    (
        "trades_step",
        step_factory("trades", loss=lambda t, g, x, xa, y, k: losses.trades_loss(t(x), t(xa), y)),
        r"ignored the `beta` argument",
    ),
    (
        "trades_step",
        step_factory("trades", attack_train_mode=True),
        r"made \d+ training-mode forward passes.*eval mode",
    ),
    # chapter 4
    ("lbgat0_loss", lbgat0_ce_target, r"CE term uses the target's adversarial logits"),
    ("lbgat0_loss", lbgat0_mse_probs, r"MSE compares probabilities"),
    (
        "lbgat0_loss",
        lbgat0_mse_class_sum,
        r"MSE sums the squared error over the classes \((10|100)× too large\)",
    ),
    (
        "lbgat0_loss",
        lbgat0_detached_guide,
        r"gradient w.r.t. `logits_guide` differs.*don't detach g\(x\)",
    ),
    (
        "lbgat_loss",
        lbgat_kl_reversed,
        r"KL direction reversed: you computed KL\(p_f\(x′\) ‖ p_f\(x\)\)",
    ),
    ("lbgat_loss", lbgat_kl_guide, r"β-term compares the guide with the target"),
    ("lbgat_loss", lbgat_no_beta, r"dropped the β-term"),
    ("lbgat_loss", lbgat_beta_fixed, r"ignored the `beta` argument"),
    (
        "make_optimizer",
        optimizer_target_only,
        r"guide's parameter tensors are not in the optimizer",
    ),
    ("make_optimizer", optimizer_wd_5e4, r"weight_decay = 0.0005; the official code uses 0.0002"),
    ("make_optimizer", optimizer_adam, r"you built Adam; the official code uses torch.optim.SGD"),
    ("make_optimizer", optimizer_nesterov, r"nesterov = True"),
    (
        "lbgat_step",
        step_factory("lbgat", attack=lambda t, g, x, y, b: attacks.cag(t, g, x, **b)),
        r"generated x′ with CAG",
    ),
    (
        "lbgat_step",
        step_factory(
            "lbgat",
            loss=lambda t, g, x, xa, y, k: (
                lambda zg: F.cross_entropy(zg, y) + F.mse_loss(t(x), zg)
            )(g(x)),
        ),
        r"MSE uses the target's clean logits",
    ),
    (
        "lbgat_step",
        step_factory(
            "lbgat",
            loss=lambda t, g, x, xa, y, k: (
                lambda zg: F.cross_entropy(zg, y) + F.mse_loss(t(xa), zg)
            )(g.eval()(x)),
        ),
        r"the guide made 0 training-mode forward passes",
    ),
    # chapter 5
    ("official_kl", okl_no_eps, r"left out the \+1e-5"),
    ("official_kl", okl_batchmean, r"'batchmean'\), so your value is (10|100)× the official"),
    ("official_kl", okl_reversed, r"KL direction reversed: you computed K̄L\(Q ‖ P\)"),
    ("official_kl", okl_eps_both, r"added 1e-5 inside log q as well"),
    ("d2r_clean_term", clean_no_abs, r"dropped the absolute value"),
    ("d2r_clean_term", clean_sum, r"added the two KLs"),
    (
        "d2r_clean_term",
        clean_batchmean,
        r"'batchmean' \(sum over classes\), (10|100)× the official",
    ),
    ("d2r_clean_term", clean_single, r"returned a single KL"),
    ("d2r_clean_term", clean_no_eps, r"left out the \+1e-5"),
    (
        "d2r_adv_term",
        adv_reversed,
        r"KL direction reversed: you computed K̄L\(p_g\(x\) ‖ p_f\(x′\)\)",
    ),
    ("d2r_adv_term", adv_batchmean, r"'batchmean'"),
    ("d2r_adv_term", adv_no_eps, r"left out the \+1e-5"),
    ("d2r_loss", d2r_ce_nat, r"CE term uses the target's clean logits f\(x\)"),
    ("d2r_loss", d2r_swapped, r"weights are swapped"),
    ("d2r_loss", d2r_adv_trades_direction, r"adversarial term in the TRADES/CAG direction"),
    ("d2r_loss", d2r_no_abs, r"clean term lost its absolute value"),
    ("d2r_loss", d2r_batchmean, r"KL terms use 'batchmean'"),
    ("d2r_loss", d2r_fixed_weights, r"ignored w_clean / w_adv"),
    ("d2r_loss", d2r_detached_guide, r"gradient w.r.t. `logits_guide` differs"),
    # chapter 6
    ("guide_reference", ref_train_mode, r"guide ran in train mode"),
    ("guide_reference", ref_with_graph, r"ran with gradients enabled.*torch.no_grad\(\)"),
    ("guide_reference", ref_logits, r"returned the logits g\(x\)"),
    ("guide_reference", ref_log_probs, r"returned log-probabilities"),
    ("guide_reference", ref_twice, r"the guide ran 2 times"),
    ("guide_reference", ref_leaves_eval, r"left the guide in eval mode"),
    (
        "cag_objective",
        cagobj_reversed,
        r"KL direction reversed: you computed Σ KL\(p_f\(x′\) ‖ p_g\(x\)\)",
    ),
    (
        "cag_objective",
        cagobj_mean,
        r"averaged over batch × classes; the CAG objective is a plain sum",
    ),
    ("cag_objective", cagobj_exact, r"computed the exact KL"),
    ("cag_objective", cagobj_raw_logits, r"raw logits f\(x′\) where log p_f\(x′\) belongs"),
    (
        "cag",
        cag_target_reference,
        r"target's own p_f\(x\) as the reference.*TRADES/LBGAT generation",
    ),
    ("cag", cag_train_mode, r"ran in train mode during your attack"),
    ("cag", cag_uniform_start, r"CAG starts at x \+ 0.001·N\(0, I\)"),
    ("cag", cag_reversed, r"KL direction reversed: you ascended KL\(p_f\(x′\) ‖ p_g\(x\)\)"),
    (
        "d2r_step",
        step_factory("d2r", attack=lambda t, g, x, y, b: attacks.trades_attack(t, x, **b)),
        r"generated x′ with the target alone \(TRADES/LBGAT generation\); D2R uses CAG",
    ),
    (
        "d2r_step",
        step_factory(
            "d2r",
            loss=lambda t, g, x, xa, y, k: losses.d2r_loss(
                t(xa), t(x), g(x), y, kl_reduction="batchmean"
            ),
        ),
        r"KL terms use 'batchmean'",
    ),
    (
        "d2r_step",
        step_factory("d2r", loss=lambda t, g, x, xa, y, k: losses.lbgat_loss(t(xa), g(x), y)),
        r"used the LBGAT loss",
    ),
    (
        "d2r_step",
        step_factory(
            "d2r",
            loss=lambda t, g, x, xa, y, k: (
                lambda z: losses.d2r_loss(z[: len(x)], z[len(x) :], g(x), y)
            )(t(torch.cat([xa, x]))),
        ),
        r"the target made 1 training-mode forward passes; this method's step makes 2",
    ),
    (
        "d2r_step",
        step_factory("d2r", attack_train_mode=True),
        r"made \d+ training-mode forward passes.*eval mode",
    ),
    # chapter 8
    ("accuracy", accuracy_percent, r"returned a percentage"),
    ("accuracy", accuracy_train_mode, r"the model ran in train mode"),
    ("accuracy", accuracy_with_grad, r"ran with gradients enabled"),
    ("accuracy", accuracy_error_rate, r"returned the error rate"),
    ("accuracy", accuracy_leaves_eval, r"left the model in eval mode"),
    ("eps_sweep", sweep_cumulative, r"attacked the previous ε's adversarial images"),
    ("eps_sweep", sweep_percent, r"returned a percentage"),
    ("eps_sweep", sweep_clean, r"called the attack 0 times"),
    ("eps_sweep", sweep_wrong_eps, r"called the attack with ε = "),
    ("transfer_accuracy", transfer_whitebox, r"attacked the target itself \(white-box\)"),
    (
        "transfer_accuracy",
        transfer_source_evaluated,
        r"evaluated the source model on its own adversarial examples",
    ),
    ("transfer_accuracy", transfer_percent, r"returned a percentage"),
    ("gradient_masking", masked_never, r"did not flag 'quantised input \(torch.round\)'"),
    ("gradient_masking", masked_always, r"flagged the honest model 'linear \(honest\)'"),
    ("gradient_masking", masked_small_eps, r"flagged the honest model"),
    ("gradient_masking", masked_returns_number, r"return True or False"),
    # derive / predict / break it
    (
        "linearised_max",
        lambda g, eps: (eps * g / g.norm(dim=1, keepdim=True), eps * g.norm(dim=1)),
        r"ε·g/‖g‖₂ reaches ε‖g‖₂, the maximum over the L2 ball",
    ),
    (
        "linearised_max",
        lambda g, eps: (eps * g.sign(), eps * g.norm(dim=1)),
        r"\*dual\* norm of L∞.*L1",
    ),
    ("linearised_max", lambda g, eps: (-eps * g.sign(), eps * g.abs().sum(1)), r"\*minimises\*"),
    (
        "linearised_max",
        lambda g, eps: (eps * g, eps * g.abs().sum(1)),
        r"leaves the L∞ ball.*scaled g itself",
    ),
    ("kl_mean_ratio", lambda b, c: c, r"inverted"),
    ("kl_mean_ratio", lambda b, c: 1 / (b * c), r"already divides by the batch size"),
    ("kl_mean_ratio", lambda b, c: 1 / b, r"both reductions average over the batch"),
    (
        "clean_term_leading_order",
        lambda pf, pg: ((pg - pf) ** 2 / (2 * pf)).mean(),
        r"Σ δ²/\(2p\): the leading order of \*each\* KL",
    ),
    (
        "clean_term_leading_order",
        lambda pf, pg: ((pg - pf) ** 3 / pf**2).mean().abs(),
        r"6× the clean term",
    ),
    (
        "clean_term_leading_order",
        lambda pf, pg: ((pg - pf) ** 3 / (3 * pf**2)).mean().abs(),
        r"2× the clean term",
    ),
    (
        "soft_label_ce",
        lambda za, pg: F.cross_entropy(za, pg.argmax(1), reduction="sum"),
        r"hard labels",
    ),
    ("soft_label_ce", lambda za, pg: F.cross_entropy(za, pg), r"averaged over the batch"),
    (
        "soft_label_ce",
        lambda za, pg: attacks.official_kl_sum(pg, za),
        r"returned the CAG objective itself",
    ),
    ("cag_copy_prediction", 0.5, r"you predicted 50%; the run gives 100.0%"),
    ("cag_copy_prediction", 1.5, r"a fraction in \[0, 1\]"),
    (
        "bpda_attack",
        lambda m, x, y, eps, a, k: _bpda(m, x, y, eps, a, k, straight_through=False),
        r"keeps 100% accuracy under your attack — the same as plain PGD.*BPDA",
    ),
    ("bpda_attack", lambda m, x, y, eps, a, k: _bpda(m, x, y, 2 * eps, a, k), r"leaves the ε-ball"),
    (
        "logit_attack",
        lambda m, x, y, eps, a, k: attacks.pgd(m, x, y, eps=eps, step_size=a, steps=k),
        r"softmax\(1000·z\) is saturated.*model.inner",
    ),
    (
        "logit_attack",
        lambda m, x, y, eps, a, k: _bpda_logprob(m, x, y, eps, a, k),
        r"keeps 100% accuracy",
    ),
    (
        "fgsm_overfitting",
        lambda m, o, x, y, eps, rs: _fgsm_train_step(m, o, x, y, eps, False),
        r"The random start should repair it",
    ),
    (
        "fgsm_overfitting",
        lambda m, o, x, y, eps, rs: _fgsm_train_step(m, o, x, y, eps / 4, rs),
        r"Without the random start FGSM training should overfit",
    ),
    ("beta_prediction", "rises", r"you predicted 'rises'; the run gives 'falls'"),
    ("beta_prediction", "down", r"set your prediction to one of 'rises', 'falls', 'flat'"),
    ("paired_t", lambda a, b: _paired_t(b, a), r"your differences are baseline − ablation"),
    ("paired_t", lambda a, b: _welch_t(a, b), r"independent samples \(Welch's t\)"),
    (
        "paired_t",
        lambda a, b: _paired_t(a, b, ddof=0),
        r"divides by n; the sample standard deviation",
    ),
    (
        "decision",
        lambda a, b, *, t_crit, min_effect: _decide(a, b, t_crit, 0.0),
        r"below min_effect = 0.05: 'too small' to report",
    ),
    (
        "decision",
        lambda a, b, *, t_crit, min_effect: _decide_no_difference(a, b, t_crit, min_effect),
        r"has not shown that there is none; say 'undecided'",
    ),
    ("reading", Args(("undecided", _BASE, _ABL)), r"lies entirely on one side of 0"),
    ("reading", Args(("ablation higher", _BASE, _NOISE)), r"contains 0: these seeds cannot tell"),
    ("reading", Args(("ablation lower", _BASE, _ABL)), r"mind the sign"),
    ("reading", Args(("no difference", _BASE, _NOISE)), r"set reading to one of"),
    ("trades_gen_prediction", Args(("higher", _CAG_LOWER)),
     r"you predicted 'higher'; the run gives 'lower'"),
    ("trades_gen_prediction", Args(("worse", _CAG_LOWER)), r"set your prediction to one of"),
    ("pgd_at_clean_prediction", Args(("higher", _AT_LOWER)),
     r"you predicted 'higher'; the run gives 'lower'"),
    ("pgd_at_clean_prediction", Args(("lower", [1, 2])), r"pass the list that toy.compare"),
    ("beta_robust_prediction", Args(("falls", _BETA_RISES)),
     r"you predicted 'falls'; the run gives 'rises'"),
    ("beta_robust_prediction", Args(("up", _BETA_RISES)), r"set your prediction to one of"),
    ("kl_adv_gradient", lambda zn, za: -_kl_grad(zn, za), r"the sign is flipped"),
    ("kl_adv_gradient", lambda zn, za: _kl_grad(zn, za) * len(za), r"misses the 1/B"),
    ("kl_adv_gradient", lambda zn, za: (F.log_softmax(za, 1) - F.log_softmax(zn, 1)) / len(za),
     r"difference of log-probabilities"),
    ("gap_reading", Args(("undecided", _CORRECT_A, _CORRECT_B)), r"lies on one side of 0"),
    ("gap_reading", Args(("lower", _CORRECT_C, _CORRECT_D)), r"the gap is 'undecided', not"),
    ("gap_reading", Args(("lower", _CORRECT_A, _CORRECT_B)), r"mind the sign"),
    ("reduction_prediction", Args(("rises", _PER_SEED_FALLS)),
     r"you predicted 'rises'; the run gives 'falls'"),
    ("reduction_prediction", Args(("falls", [{"seed": 0}])), r"rows must be the list of dicts"),
    ("flat_guide_prediction", Args(("stronger", _FLAT_WEAKER)),
     r"you predicted 'stronger'; the run gives 'weaker'"),
    ("flat_guide_prediction", Args(("same", _FLAT_WEAKER)), r"set your prediction to one of"),
    ("linearised_max_l2", lambda g, eps: (eps * g.sign(), eps * g.abs().sum(1)),
     r"ε·sign\(g\) is the L∞ answer"),
    ("linearised_max_l2", lambda g, eps: (_l2_max(g, eps)[0], eps * g.abs().sum(1)),
     r"ε·‖g‖₁ is the L∞ maximum"),
    ("linearised_max_l2", lambda g, eps: (g / g.norm(dim=1, keepdim=True), g.norm(dim=1)),
     r"δ\* is wrong"),
    ("pgd_vs_exact_prediction", Args(("lower", _PGD_ABOVE)),
     r"you predicted 'lower'; the run gives 'higher'"),
    ("pgd_vs_exact_prediction", Args(("higher", [{"pgd": 0.3}])), r"rows must be the list"),
    ("fgsm_vs_pgd_prediction", Args(("fgsm stronger", _IMAGES_PGD)),
     r"you predicted 'fgsm stronger'; the run gives 'pgd stronger'"),
    ("fgsm_vs_pgd_prediction", Args(("pgd", _IMAGES_PGD)), r"set your prediction to one of"),
    ("diagnose_guide", lambda p, y: _diagnose(p, y, confidence_of=lambda p, y: p.gather(
        1, y[:, None])), r"the probability of the predicted class \(the largest one\), not of"),
    ("diagnose_guide", lambda p, y: _diagnose(p, y, flip=True), r"mind the sign"),
    ("diagnose_guide", lambda p, y: _diagnose_no_tolerance(p, y), r"within the 0.05 tolerance"),
    ("diagnose_guide", lambda p, y: "under", r"return one of 'under-confident'"),
    ("guide_diagnosis_prediction", Args(({"d2r": "under-confident", "lbgat": "calibrated"},
                                         _ROWS_UNDER)),
     r"you predicted lbgat's guide 'calibrated'; every seed says 'under-confident'"),
    ("guide_diagnosis_prediction", Args(({"d2r": "unsure"}, _ROWS_UNDER)),
     r"prediction must be a dict"),
    ("guide_diagnosis_prediction", Args((_UNDER, _ROWS_UNDER[:1] + _ROWS_UNDER[3:])),
     r"rows hold 1 run\(s\) of 'd2r'; run at least 2 seeds"),
    ("mse_guide_gradient", lambda za, zg: 2 * (zg - za), r"sums over the elements"),
    ("mse_guide_gradient", lambda za, zg: (zg - za) / zg.numel(), r"misses the 2"),
    ("mse_guide_gradient", lambda za, zg: 2 * (za - zg) / zg.numel(), r"the sign is flipped"),
    ("mse_guide_gradient", lambda za, zg: 2 * (zg - za) / len(zg), r"divides by B only"),
    ("trades_gen_prediction", Args(("lower", {"d2r": 0.6})), r"pass the list that toy.compare"),
    ("trades_gen_prediction", Args(("lower", _CAG_LOWER[:1] + _CAG_LOWER[4:5])),
     r"hold 1 seed\(s\) with both 'd2r' and 'd2r_trades_gen'; run at least 2"),
    ("w_adv_prediction", Args(({"robustness": "rises", "guide_confidence": "falls"}, _SWEEP_FALLS)),
     r"\(robustness\): you predicted 'rises'; the run gives 'falls'"),
    ("w_adv_prediction", Args(({"robustness": "falls", "guide_confidence": "rises"}, _SWEEP_FALLS)),
     r"\(guide_confidence\): you predicted 'rises'; the run gives 'falls'"),
    ("w_adv_prediction", Args(("falls", _SWEEP_FALLS)), r"prediction must be a dict with the keys"),
    ("w_adv_prediction", Args((_BOTH_FALL, _SWEEP_FALLS[:3])), r"at least two w_adv values"),
    (
        "decision",
        lambda a, b, *, t_crit, min_effect: _decide(b, a, t_crit, min_effect),
        r"mind the sign of ablation − baseline",
    ),
    (
        "decision",
        lambda a, b, *, t_crit, min_effect: _decide_unpaired(a, b, t_crit, min_effect),
        r"a paired test sees it \(an unpaired one would not",
    ),
    (
        "preregistration",
        {
            "baseline": "d2r",
            "ablation": "d2r_no_clean",
            "seeds": [0, 1, 2, 3, 4],
            "metric": "pgd",
            "t_crit": 1.96,
            "min_effect": 0.01,
        },
        r"t_crit = 1.96 for 5 seeds; the two-sided 5 % critical value .* is 2.776",
    ),
    (
        "preregistration",
        {
            "baseline": "d2r",
            "ablation": "d2r_no_clean",
            "seeds": [0, 1],
            "metric": "pgd",
            "t_crit": 12.7,
            "min_effect": 0.01,
        },
        r"2 seeds: use 3 to 10",
    ),
    (
        "preregistration",
        {
            "baseline": "d2r",
            "ablation": "d2r",
            "seeds": [0, 1, 2],
            "metric": "pgd",
            "t_crit": 4.303,
            "min_effect": 0.01,
        },
        r"baseline and ablation are the same method",
    ),
    ("epoch_seconds", lambda a, b, c, k, n: n * (a + b * k), r"you left out c"),
    ("epoch_seconds", lambda a, b, c, k, n: a + b * (k + c), r"that is one image"),
    ("epoch_seconds", lambda a, b, c, k, n: n * (a + b * k + c), r"multiply it by b as well"),
    ("outer_steps", lambda p, r: 3 * p / 2, r"you left out the reference pass"),
    ("outer_steps", lambda p, r: (p + r) / 2, r"a training pass costs about 3 forward passes"),
    ("outer_steps", lambda p, r: 3 * p + r, r"divide by one attack step"),
    (
        "cost_prediction",
        20.0,
        r"you predicted 20 s; one epoch .* took 2 s .*off by more than a factor of 3",
    ),
    ("cost_prediction", -1.0, r"set predicted_seconds to your predicted number of seconds"),
    ("k_prediction", 1, r"you predicted 1; the run gives 10"),
    ("guide_width_prediction", 4, r"you predicted 4; the run gives 128"),
    ("guide_width_prediction", "wider", r"set your prediction to one of 4, 128, 'same'"),
    ("k_prediction", True, r"set your prediction to one of 1, 10, 'same'"),
    (
        "mart_loss",
        lambda zn, za, y, beta=6.0: _mart_official(zn, za, y, beta, weight=False),
        r"you left out the weight 1 − p\(x\)_y",
    ),
    (
        "mart_loss",
        lambda zn, za, y, beta=6.0: _mart_official(zn, za, y, beta, boosted=False),
        r"you left out the boosted term",
    ),
    (
        "mart_loss",
        lambda zn, za, y, beta=6.0: _mart_official(zn, za, y, 6.0),
        r"you ignored the `beta` argument",
    ),
    # existing checks: more wrong answers are listed above
]


def _bpda_logprob(m, x, y, eps, a, k):
    """PGD on the log of the saturated softmax output: still masked."""
    x_adv = x.clone()
    for _ in range(k):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.nll_loss(torch.log(m(x_adv) + 1e-30), y), x_adv)
        x_adv = attacks.project(x_adv.detach() + a * grad.sign(), x, eps)
    return x_adv.detach()


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize(
    "name,wrong,pattern",
    WRONG,
    ids=[f"{n}-{getattr(w, '__name__', 'lambda')}-{i}" for i, (n, w, _) in enumerate(WRONG)],
)
def test_wrong_implementation_rejected_with_specific_message(name, wrong, pattern):
    with pytest.raises(checks.CheckFailed, match=pattern):
        _check(name, wrong)


def test_every_check_rejects_at_least_two_mistakes():
    counts = {}
    for name, _, _ in WRONG:
        counts[name] = counts.get(name, 0) + 1
    assert set(counts) == set(LIBRARY)
    assert min(counts.values()) >= 2, counts


def test_random_start_with_other_random_numbers_passes_on_invariants(capsys):
    """A correct PGD that draws its start differently is accepted (invariants + loss reached), with
    a note."""
    checks.check_pgd_linf(pgd_other_rng)
    assert "your random numbers differ from the library's" in capsys.readouterr().out


# ================================================================ correct but differently written
# answers
def cag_official(t, g, x, eps, a, k):
    """A transcription of the official D2R CAG: both models in eval mode, the guide evaluated inside
    every step under enable_grad (its graph unused), the start x + 0.001·N(0, I), min/max
    projection, then the clamp."""
    t.eval()
    g.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(k):
        x_adv.requires_grad_()
        with torch.enable_grad():
            p_g = F.softmax(g(x), dim=1)
            loss = (p_g * (torch.log(p_g + 1e-5) - F.log_softmax(t(x_adv), dim=1))).sum()
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + a * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def _official_trades_attack(model, x, eps, a, k):
    model.eval()
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(k):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + a * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def trades_step_official(model, optimizer, x, y, *, beta, eps, step_size, steps):
    """TRADES' trades_loss (yaodongyu/TRADES): train-mode passes on x, x′ and x again."""
    x_adv = _official_trades_attack(model, x, eps, step_size, steps)
    model.train()
    optimizer.zero_grad()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    loss_robust = (1.0 / len(x)) * criterion_kl(
        F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1)
    )
    loss = loss_natural + beta * loss_robust
    loss.backward()
    optimizer.step()
    return loss.item()


def lbgat_step_official(target, guide, optimizer, x, y, *, eps, step_size, steps):
    """LBGAT's step at β = 0: x′ from the target alone; train-mode passes f(x′), f(x), g(x)."""
    x_adv = _official_trades_attack(target, x, eps, step_size, steps)
    target.train()
    guide.train()
    optimizer.zero_grad()
    out_adv = target(x_adv)
    out_natural = target(x)  # noqa: F841 - computed by the official code even at β = 0
    out_guide = guide(x)
    loss = F.cross_entropy(out_guide, y) + torch.nn.MSELoss()(out_adv, out_guide)
    loss.backward()
    optimizer.step()
    return loss.item()


def d2r_step_official(target, guide, optimizer, x, y, *, eps, step_size, steps):
    """D2R.py's step: the official CAG, then f(x′), f(x), g(x) in train mode, the D2R loss."""
    x_adv = cag_official(target, guide, x, eps, step_size, steps)
    target.train()
    guide.train()
    optimizer.zero_grad()
    loss = losses.d2r_loss(target(x_adv), target(x), guide(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def pgd_at_step_other_rng(model, optimizer, x, y, *, eps, step_size, steps):
    """A PGD-AT step whose attack draws its start after other random numbers (so x′ differs from the
    library's)."""
    torch.rand(7)
    start = (x + eps * (2 * torch.rand(x.shape) - 1)).clamp(0, 1)
    with attacks.eval_mode(model):
        x_adv = start
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
            x_adv = attacks.project(x_adv.detach() + step_size * grad.sign(), x, eps)
    model.train()
    loss = F.cross_entropy(model(x_adv.detach()), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


CORRECT = [
    ("cag", cag_official),
    ("cag", cag_modes_not_restored),
    ("fgsm", fgsm_leaves_eval_mode),
    ("cag", cag_guide_every_step),
    ("cag", cag_guide_with_graph),
    ("trades_step", trades_step_official),
    ("lbgat_step", lbgat_step_official),
    ("d2r_step", d2r_step_official),
    ("pgd_at_step", pgd_at_step_other_rng),
    ("pgd_linf", pgd_other_rng),
    ("trades_attack", _official_trades_attack),
    (
        "linearised_max",
        lambda g, eps: (
            torch.where(g >= 0, eps, -eps) * torch.ones_like(g),
            (g * torch.where(g >= 0, eps, -eps)).sum(1),
        ),
    ),
    ("kl_mean_ratio", lambda b, c: b / (b * c)),
    ("clean_term_leading_order", lambda pf, pg: ((pg - pf) ** 3 / (6 * pg**2)).mean().abs()),
    ("clean_term_leading_order", lambda pf, pg: ((pg - pf) ** 3 / (6 * pf * pg)).mean().abs()),
    ("soft_label_ce", lambda za, pg: -(pg * F.log_softmax(za, dim=1)).sum()),
    ("cag_copy_prediction", 0.98),
    (
        "bpda_attack",
        lambda m, x, y, eps, a, k: attacks.pgd(m.inner, x, y, eps=eps, step_size=a, steps=k),
    ),
    (
        "logit_attack",
        lambda m, x, y, eps, a, k: attacks.pgd(m.inner, x, y, eps=eps, step_size=a, steps=k),
    ),
    ("official_kl", lambda p, lq: torch.mean(p * (torch.log(p + 1e-5) - lq))),
    (
        "trades_kl",
        lambda zn, za: F.kl_div(F.log_softmax(za, 1), F.softmax(zn, 1), reduction="batchmean"),
    ),
    (
        "fgsm",
        lambda m, x, y, eps: attacks.pgd(m, x, y, eps=eps, step_size=eps, steps=1, start="clean"),
    ),
    ("fgsm_overfitting", lambda m, o, x, y, eps, rs: _fgsm_train_step_delta(m, o, x, y, eps, rs)),
    ("beta_prediction", "falls"),
    ("paired_t", lambda a, b: _paired_t_stdlib(a, b)),
    ("decision", lambda a, b, *, t_crit, min_effect: _decide_stdlib(a, b, t_crit, min_effect)),
    ("reading", Args(("undecided", _BASE, _NOISE))),
    ("trades_gen_prediction", Args(("higher", _CAG_NOISE))),
    ("pgd_at_clean_prediction", Args(("higher", _AT_NOISE))),
    ("beta_robust_prediction", Args(("falls", _BETA_RISES[:1] + [
        {"seed": 1, "beta0": 0.9, "beta6": 0.6}, {"seed": 2, "beta0": 0.7, "beta6": 0.8}]))),
    ("kl_adv_gradient", lambda zn, za: torch.func.grad(lambda z: F.kl_div(
        F.log_softmax(z, 1), F.softmax(zn, 1), reduction="batchmean"))(za)),
    ("gap_reading", Args(("undecided", _CORRECT_C, _CORRECT_D))),
    ("reduction_prediction", Args(("falls", _PER_SEED_FALLS))),
    ("flat_guide_prediction", Args(("weaker", _FLAT_WEAKER))),
    ("linearised_max_l2", lambda g, eps: (eps * F.normalize(g, dim=1),
                                          eps * torch.linalg.vector_norm(g, dim=1))),
    ("pgd_vs_exact_prediction", Args(("lower", _PGD_EQUAL))),
    ("fgsm_vs_pgd_prediction", Args(("fgsm stronger", [{"fgsm": 0, "pgd": 0}] * 3))),
    ("diagnose_guide", _diagnose_stdlib),
    ("guide_diagnosis_prediction", Args(({"d2r": "under-confident", "lbgat": "over-confident"},
                                         _ROWS_MIXED))),
    ("mse_guide_gradient", lambda za, zg: torch.func.grad(
        lambda g: F.mse_loss(za, g))(zg)),
    ("w_adv_prediction", Args(({"robustness": "rises", "guide_confidence": "falls"},
                               _SWEEP_MIXED))),
    (
        "preregistration",
        {
            "baseline": "d2r",
            "ablation": "d2r_no_adv",
            "seeds": [3, 1, 4],
            "metric": "clean",
            "t_crit": 4.3,
            "min_effect": 0.02,
        },
    ),
    ("epoch_seconds", lambda a, b, c, k, n: n * a + n * b * k + n * b * c),
    ("outer_steps", lambda p, r: 1.5 * p + 0.5 * r),
    ("cost_prediction", 2.5),
    ("mart_loss", lambda zn, za, y, beta=6.0: _mart_official(zn, za, y, beta)),
    ("k_prediction", 10.0),
    ("guide_width_prediction", 128.0),
    ("project_linf", lambda xa, x, eps: torch.max(torch.min(xa, x + eps), x - eps).clamp(0, 1)),
    ("project_l2", lambda xa, x, eps: _project_l2_renorm(xa, x, eps)),
    ("pgd_l2", lambda m, x, y, eps, a, k: _pgd_l2_other_rng(m, x, y, eps, a, k)),
    ("pgd_at_loss", lambda z, y: -F.log_softmax(z, dim=1).gather(1, y[:, None]).mean()),
    (
        "robust_accuracy",
        lambda m, x, y, *, eps, step_size, steps: _robust_other(m, x, y, eps, step_size, steps),
    ),
    (
        "trades_loss",
        lambda zn, za, y, beta=6.0: (
            F.cross_entropy(zn, y)
            + beta
            * (F.softmax(zn, 1) * (F.log_softmax(zn, 1) - F.log_softmax(za, 1))).sum(1).mean()
        ),
    ),
    ("lbgat0_loss", lambda za, zg, y: F.cross_entropy(zg, y) + ((za - zg) ** 2).mean()),
    (
        "lbgat_loss",
        lambda za, zg, y, beta=0.0, logits_nat=None: (
            F.cross_entropy(zg, y)
            + torch.nn.MSELoss()(za, zg)
            + (
                beta
                * F.kl_div(F.log_softmax(za, 1), F.softmax(logits_nat, 1), reduction="batchmean")
                if beta > 0
                else 0.0
            )
        ),
    ),
    (
        "make_optimizer",
        lambda t, g: torch.optim.SGD(
            list(t.parameters()) + list(g.parameters()), lr=0.1, momentum=0.9, weight_decay=2e-4
        ),
    ),
    ("d2r_clean_term", lambda zn, zg: torch.abs(_okl(zn, zg) - _okl(zg, zn))),
    (
        "d2r_adv_term",
        lambda za, zg: torch.mean(
            F.softmax(za, 1) * (torch.log(F.softmax(za, 1) + 1e-5) - F.log_softmax(zg, 1))
        ),
    ),
    (
        "d2r_loss",
        lambda za, zn, zg, y, w_clean=20.0, w_adv=30.0: losses.d2r_terms(
            za, zn, zg, y, w_clean=w_clean, w_adv=w_adv
        )["loss"],
    ),
    ("guide_reference", lambda g, x: _guide_ref_other(g, x)),
    (
        "cag_objective",
        lambda za, pg: (pg * torch.log(pg + 1e-5)).sum() - (pg * F.log_softmax(za, dim=1)).sum(),
    ),
    ("accuracy", lambda m, x, y: _accuracy_counted(m, x, y)),
    (
        "eps_sweep",
        lambda m, x, y, attack, eps_values: list(
            map(lambda e: _accuracy(m, attack(m, x, y, e), y), eps_values)
        ),
    ),
    (
        "transfer_accuracy",
        lambda s, t, x, y, attack, eps: _accuracy_counted(t, attack(s, x, y, eps), y),
    ),
    ("gradient_masking", lambda m, x, y, s: _masked_by_sweep(m, x, y, s)),
    ("pgd_at_step", lambda m, o, x, y, **k: _pgd_at_step_fn(m, o, x, y, **k)),
]


@pytest.mark.parametrize(
    "name,answer", CORRECT, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CORRECT)]
)
def test_correct_but_differently_written_answer_passes(name, answer, capsys):
    _check(name, answer)
    assert capsys.readouterr().out.startswith("✓ ")


def test_an_attack_that_leaves_eval_mode_gets_advice_like_the_official_code(capsys):
    checks.check_cag(cag_official)
    out = capsys.readouterr().out
    assert out.startswith("✓ cag:")
    assert "💡 cag: your attack left the target in eval mode" in out
    assert "💡 cag: the guide ran" in out


def test_official_cag_gets_advice_not_a_failure(capsys):
    checks.check_cag(cag_guide_every_step)
    out = capsys.readouterr().out
    assert out.startswith("✓ cag:")
    assert "💡 cag: the guide ran" in out and "compute it once, before the loop" in out


def test_official_steps_are_accepted_with_their_extra_passes(capsys):
    checks.check_trades_step(trades_step_official)
    checks.check_lbgat_step(lbgat_step_official)
    out = capsys.readouterr().out
    assert out.count("✓ ") == 2


def test_a_step_with_other_random_numbers_is_checked_on_its_own_x_adv(capsys):
    checks.check_pgd_at_step(pgd_at_step_other_rng)
    assert "checked for the ε-ball, [0, 1] and the objective it reaches" in capsys.readouterr().out


def test_predictions_get_their_verdicts(capsys):
    checks.check_cag_copy_prediction(1.0)
    assert "right" in capsys.readouterr().out
    with pytest.raises(checks.CheckFailed, match=r"you predicted 0%; the run gives"):
        checks.check_cag_copy_prediction(0.0)


@pytest.fixture(autouse=True)
def _no_timing(monkeypatch):
    """The cost-prediction check measures an epoch; tests give it a fixed 2 s (no timed tests)."""
    from d2r_lib.checks import ch09

    monkeypatch.setattr(ch09, "measure_epoch", lambda run=ch09.COST_RUN: 2.0)


def test_every_check_accepts_at_least_two_correct_answers():
    """The library's answer and one written differently (the official code where it exists)."""
    assert {name for name, _ in CORRECT} == set(LIBRARY)


def test_measure_epoch_times_a_real_epoch():
    from d2r_lib.checks import ch09

    seconds = ch09.measure_epoch({**ch09.COST_RUN, "images": 16, "batch_size": 8, "steps": 1})
    assert isinstance(seconds, float) and seconds > 0


def test_run_registered_plan_refuses_an_unregistered_or_changed_plan(capsys):
    from d2r_lib.checks import ch07

    ch07._REGISTERED.clear()
    plan = dict(LIBRARY["preregistration"])
    with pytest.raises(RuntimeError, match="register the plan first"):
        checks.run_registered_plan(plan)
    checks.check_preregistration(plan)
    with pytest.raises(RuntimeError, match="the plan changed after it was registered"):
        checks.run_registered_plan({**plan, "metric": "clean"})
    assert "plan registered" in capsys.readouterr().out


def test_beta_prediction_right_and_wrong(capsys):
    checks.check_beta_prediction("falls")
    assert "you predicted 'falls': right" in capsys.readouterr().out
    with pytest.raises(checks.CheckFailed, match=r"you predicted 'flat'; the run gives 'falls'"):
        checks.check_beta_prediction("flat")


def test_cost_prediction_right_and_wrong(capsys):
    checks.check_cost_prediction(1.5, measured_seconds=2.0)
    assert "within a factor of 3" in capsys.readouterr().out
    with pytest.raises(checks.CheckFailed, match=r"off by more than a factor of 3"):
        checks.check_cost_prediction(0.5, measured_seconds=2.0)


def test_an_undecided_run_grades_no_prediction(capsys):
    """An interval that contains 0 neither confirms nor refutes: either prediction passes, said
    undecided."""
    for guess in ("higher", "lower"):
        checks.check_trades_gen_prediction(guess, _CAG_NOISE)
        out = capsys.readouterr().out
        assert out.startswith("✓ ") and "undecided" in out and "right" not in out
