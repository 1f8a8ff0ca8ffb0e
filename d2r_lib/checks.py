"""Self-checks used by the exercise notebooks (``exercises/NN_topic.ipynb``).

After each task a notebook calls ``checks.check_<thing>(your_function)``. The check

* runs your function on fresh random inputs (seeded inside the check, several trials: batch 1, 10 and
  100 classes, models in train and in eval mode, ...), without touching your notebook's random state;
* compares it with d2r_lib's own implementation (``d2r_lib.attacks``, ``d2r_lib.losses``,
  ``d2r_lib.methods``) and with the invariants the result must satisfy (‖x′ − x‖ ≤ ε, x′ ∈ [0, 1], shapes,
  detached attack outputs, gradients flowing into every input a loss depends on, loss values to 1e-8
  relative on float64 inputs);
* on success prints one line starting with ``✓``;
* on failure raises :class:`CheckFailed` (an ``AssertionError``) whose message names the mistake. To do
  so it also evaluates the common *wrong* variants (KL in the wrong direction, a mean where a sum belongs,
  a projection without the clamp to [0, 1], ...) and says which one your function computed.

The reference values always come from the library; the wrong variants live only in this module, to
recognise mistakes. ``NotImplementedError`` from an unsolved exercise passes through unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks, losses, methods, models

__all__ = [
    "CheckFailed",
    # chapter 1
    "check_fgsm", "check_project_linf", "check_project_l2", "check_pgd_linf", "check_pgd_l2",
    # chapter 2
    "check_pgd_at_loss", "check_pgd_at_step", "check_robust_accuracy",
    # chapter 3
    "check_trades_kl", "check_trades_loss", "check_trades_attack", "check_trades_step",
    # chapter 4
    "check_lbgat0_loss", "check_lbgat_loss", "check_make_optimizer", "check_lbgat_step",
    # chapter 5
    "check_official_kl", "check_d2r_clean_term", "check_d2r_adv_term", "check_d2r_loss",
    # chapter 6
    "check_guide_reference", "check_cag_objective", "check_cag", "check_d2r_step",
    # chapter 8
    "check_accuracy", "check_eps_sweep", "check_transfer_accuracy", "check_gradient_masking",
]


class CheckFailed(AssertionError):
    """Your function disagrees with d2r_lib; the message says how (and, when recognised, which mistake)."""


# ================================================================================================
# Plumbing
# ================================================================================================
def _fail(task: str, message: str):
    raise CheckFailed(f"✗ {task}: {message}")


def _passed(task: str, detail: str) -> None:
    print(f"✓ {task}: {detail}")


def _pct(frac: float) -> str:
    return f"{100 * frac:.3g} %"


def _call(task: str, fn: Callable, *args, **kwargs):
    """Run the learner's function; an unsolved stub's NotImplementedError passes through unchanged."""
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - any error of the learner's code becomes a verdict
        raise CheckFailed(f"✗ {task}: your function raised {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _sandbox(task: str, fn):
    """Own random state (the notebook's is left alone), gradients on, one thread (tiny tensors)."""
    if not callable(fn):
        raise TypeError(f"{task}: pass your function itself (e.g. check(my_function)), not {type(fn).__name__}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(g: torch.Generator, b: int, size: int = 16) -> torch.Tensor:
    """Random images in [0, 1] with some pixels exactly 0 or 1 (so a missing clamp shows)."""
    x = torch.rand(b, 3, size, size, generator=g)
    u = torch.rand(b, 3, size, size, generator=g)
    x = torch.where(u < 0.1, torch.zeros_like(x), x)
    return torch.where(u > 0.9, torch.ones_like(x), x)


def _cnn(num_classes: int = 10, seed: int = 0, width: int = 8) -> nn.Module:
    """A small_cnn (d2r_lib.models.SmallCNN) whose BatchNorm statistics make train and eval mode differ."""
    torch.manual_seed(seed)
    m = models.SmallCNN(num_classes, width=width)
    g = _gen(seed + 7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(0.2 * (2 * torch.rand(n, generator=g) - 1))
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(0.2 * (2 * torch.rand(n, generator=g) - 1))
    return m


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _mode_name(flags: list[bool]) -> str:
    return "train" if all(flags) else "eval" if not any(flags) else "a mix of train and eval"


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in model.named_buffers()]


def _bn_changed(before, model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, _bn_state(model)))


def _bn_count(model: nn.Module) -> int:
    """Training-mode forward passes seen by the model (its first BatchNorm's num_batches_tracked)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return int(m.num_batches_tracked)
    return 0


def _set_mode(model: nn.Module, mode: str) -> nn.Module:
    model.train(mode == "train")
    return model


def _copies(base: dict, mode: str) -> dict:
    return {k: _set_mode(copy.deepcopy(m), mode) for k, m in base.items()}


def _check_modes(task: str, before: dict, mods: dict) -> None:
    for role, model in mods.items():
        now = _modes(model)
        if now != before[role]:
            _fail(task, f"your function left the {role} in {_mode_name(now)} mode, but it came in "
                        f"{_mode_name(before[role])} mode: restore it (`with attacks.eval_mode({role}):` "
                        f"restores every module's mode when the block ends)")


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The library's clean accuracy (d2r_lib.evaluate.accuracy: eval mode, no graph, modes restored)."""
    from .evaluate import accuracy
    return accuracy(model, x, y)


def _as_float(task: str, value, what: str = "the accuracy") -> float:
    if isinstance(value, bool) or value is None:
        _fail(task, f"your function returned {value!r}; return {what} as a Python float")
    if isinstance(value, torch.Tensor):
        _fail(task, f"your function returned a tensor ({tuple(value.shape)}); return {what} as a Python float "
                    f"(use .item())")
    try:
        out = float(value)
    except (TypeError, ValueError):
        _fail(task, f"your function returned {type(value).__name__}; return {what} as a Python float")
    if not math.isfinite(out):
        _fail(task, f"your function returned {out}; expected a finite number")
    return out


# ================================================================================================
# Losses: one framework
# ================================================================================================
@dataclass
class _Variant:
    message: str                     # may use {B}, {C}, {got}, {want}
    fn: Callable                     # same arguments as the reference; returns a tensor or None (n/a)


@dataclass
class _LossSpec:
    task: str
    names: tuple[str, ...]           # positional argument names
    reference: Callable
    make_case: Callable              # trial -> (args tuple, kwargs dict)
    variants: list[_Variant]
    trials: int
    grad_names: tuple[str, ...]      # inputs whose gradient must match the library's
    grad_hints: dict = field(default_factory=dict)
    passed: str = ""
    rtol: float = 1e-8          # float64 inputs: a different but equivalent formula agrees to ~1e-14
    atol: float = 1e-12


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def _run_loss_check(spec: _LossSpec, fn) -> None:
    task = spec.task
    with _sandbox(task, fn):
        for trial in range(spec.trials):
            args, kwargs = spec.make_case(trial)
            first = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            info = {"B": first.shape[0], "C": first.shape[1]}
            learner_args, ref_args, leaves = [], [], []
            for name, a in zip(spec.names, args):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    la = a.detach().clone().requires_grad_(name in spec.grad_names)
                    ra = a.detach().clone().requires_grad_(name in spec.grad_names)
                    if name in spec.grad_names:
                        leaves.append((name, la, ra))
                else:
                    la = a.clone() if isinstance(a, torch.Tensor) else a
                    ra = a
                learner_args.append(la)
                ref_args.append(ra)
            snapshots = [(n, a.detach().clone()) for n, a in zip(spec.names, learner_args) if isinstance(a, torch.Tensor)]
            out = _call(task, fn, *learner_args, **kwargs)
            if not isinstance(out, torch.Tensor):
                _fail(task, f"your function returned {type(out).__name__}; return the loss as a torch tensor "
                            f"(a 0-dim scalar; .item() or float() would cut the graph)")
            if out.dim() != 0:
                _fail(task, f"your function returned a tensor of shape {tuple(out.shape)}; the loss is one "
                            f"0-dim scalar: reduce over the batch (and the classes)")
            for (name, before), a in zip(snapshots, [a for a in learner_args if isinstance(a, torch.Tensor)]):
                if not torch.equal(a.detach(), before):
                    _fail(task, f"your function modified its input `{name}` in place; compute new tensors instead")
            got = out.item()
            if not math.isfinite(got):
                _fail(task, f"your function returned {got} (batch {info['B']}, {info['C']} classes); expected a "
                            f"finite value: check for log(0) or a division by zero")
            expected = spec.reference(*ref_args, **kwargs)
            want = expected.item()
            info.update(got=got, want=want)
            if not _close(got, want, spec.rtol, spec.atol):
                with torch.no_grad():
                    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in ref_args]
                    for v in spec.variants:
                        val = v.fn(*plain, **kwargs)
                        if val is None:
                            continue
                        val = float(val)
                        if _close(got, val, spec.rtol, spec.atol) and not _close(val, want, spec.rtol, spec.atol):
                            _fail(task, v.message.format_map(info))
                extra = "".join(f", {k}={v}" for k, v in kwargs.items())
                _fail(task, f"your value {got:.8g} differs from the library's {want:.8g} (batch {info['B']}, "
                            f"{info['C']} classes{extra}); none of the common mistakes this check knows matches, "
                            f"so compare your formula with the task's statement term by term")
            if not leaves:
                continue
            if not out.requires_grad:
                _fail(task, "your loss carries no graph (requires_grad=False), so training could not "
                            "backpropagate through it: don't use .item(), .detach(), numpy or torch.no_grad() inside")
            g_l = torch.autograd.grad(out, [la for _, la, _ in leaves], allow_unused=True)
            g_r = torch.autograd.grad(expected, [ra for _, _, ra in leaves], allow_unused=True)
            for (name, _, _), gl, gr in zip(leaves, g_l, g_r):
                hint = spec.grad_hints.get(name, "")
                ref_zero = gr is None or not gr.abs().gt(0).any()
                if ref_zero:
                    if gl is not None and gl.abs().gt(1e-12).any():
                        _fail(task, f"gradient flows into `{name}`, which the library's loss does not depend on")
                    continue
                if gl is None or not gl.abs().gt(0).any():
                    _fail(task, f"no gradient reaches `{name}`: the loss must backpropagate into it (don't "
                                f".detach() it, don't go through numpy or .item(), no torch.no_grad()). {hint}".strip())
                if not torch.allclose(gl, gr, rtol=1e-5, atol=1e-9):
                    diff = (gl - gr).abs().max().item()
                    _fail(task, f"your value is right but the gradient w.r.t. `{name}` differs from the library's "
                                f"(max |Δ| = {diff:.3g}): did you .detach() part of a term? {hint}".strip())
        _passed(task, spec.passed)


def _logits(g: torch.Generator, b: int, c: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=g, dtype=torch.float64)


def _labels(g: torch.Generator, b: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=g)


# (batch, classes, logit scale) per trial: batch 1, 10 and 100 classes, flat and peaked distributions
_SHAPES = [(8, 10, 1.0), (1, 10, 2.0), (16, 100, 1.5), (5, 100, 0.7), (32, 10, 4.0), (3, 10, 0.3)]


def _exact_kl_mean(p, log_q):
    """The exact KL summand p·(log p − log q) averaged over batch × classes (no +1e-5)."""
    return (p * (torch.log(p) - log_q)).mean()


def _kbar(z_p, z_q, reduction="mean"):
    """K̄L(softmax(z_p) ‖ softmax(z_q)) via the library's official_kl."""
    return losses.official_kl(F.softmax(z_p, dim=1), F.log_softmax(z_q, dim=1), reduction)


# ------------------------------------------------------------------------------------------ ch. 2
def check_pgd_at_loss(fn) -> None:
    """Task: ``pgd_at_loss(logits_adv, y)`` = CE(f(x′), y), mean over the batch (losses.pgd_at_loss)."""
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(100 + t)
        return (_logits(g, b, c, 2 * s), _labels(g, b, c)), {}

    _run_loss_check(_LossSpec(
        task="pgd_at_loss", names=("logits_adv", "y"), reference=losses.pgd_at_loss, make_case=case, trials=6,
        grad_names=("logits_adv",),
        variants=[
            _Variant("you applied softmax before F.cross_entropy, which applies log-softmax itself: pass the raw "
                     "logits", lambda z, y: F.cross_entropy(F.softmax(z, dim=1), y)),
            _Variant("you summed the cross-entropy over the batch (your value is {B}× the library's); PGD-AT "
                     "averages over the batch (reduction='mean')", lambda z, y: F.cross_entropy(z, y, reduction="sum")),
            _Variant("F.nll_loss expects log-probabilities but you gave it raw logits: use F.cross_entropy(logits, y) "
                     "(or F.log_softmax first)", lambda z, y: F.nll_loss(z, y)),
            _Variant("you took the log-softmax over the batch (dim=0); probabilities are over the classes: dim=1",
                     lambda z, y: F.nll_loss(F.log_softmax(z, dim=0), y)),
        ],
        passed="CE(f(x′), y) averaged over the batch, as losses.pgd_at_loss (6 trials, batch 1–32, 10 and 100 "
               "classes, value and gradient)"), fn)


# ------------------------------------------------------------------------------------------ ch. 3
def _trades_variants():
    kl = losses.trades_kl
    return [
        _Variant("KL direction reversed: you computed KL(p(x′) ‖ p(x)); TRADES' regulariser is KL(p(x) ‖ p(x′)) "
                 "= Σ p(x)·(log p(x) − log p(x′)), i.e. F.kl_div(F.log_softmax(logits_adv), F.softmax(logits_nat))",
                 lambda zn, za: kl(za, zn)),
        _Variant("you averaged over batch × classes (F.kl_div's reduction='mean'), so your value is 1/{C} of "
                 "TRADES' KL, which sums over the classes and averages over the batch (reduction='batchmean', or "
                 "'sum' divided by the batch size)", lambda zn, za: kl(zn, za) / zn.shape[1]),
        _Variant("you summed over the batch as well (your value is {B}× too large): divide by the batch size "
                 "(reduction='batchmean')", lambda zn, za: kl(zn, za) * zn.shape[0]),
        _Variant("F.kl_div's first argument must be log-probabilities: you passed probabilities (use "
                 "F.log_softmax(logits_adv, dim=1))",
                 lambda zn, za: F.kl_div(F.softmax(za, dim=1), F.softmax(zn, dim=1), reduction="sum") / zn.shape[0]),
        _Variant("F.kl_div's first argument must be log-probabilities: you passed the raw logits (use "
                 "F.log_softmax(logits_adv, dim=1))",
                 lambda zn, za: F.kl_div(za, F.softmax(zn, dim=1), reduction="sum") / zn.shape[0]),
        _Variant("you took the softmax over the batch (dim=0); the distributions are over the classes: dim=1",
                 lambda zn, za: F.kl_div(F.log_softmax(za, dim=0), F.softmax(zn, dim=0), reduction="sum") / zn.shape[0]),
    ]


def _pair_case(base_seed):
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(base_seed + t)
        z_nat = _logits(g, b, c, 2 * s)
        return (z_nat, z_nat + _logits(g, b, c, s)), {}
    return case


def check_trades_kl(fn) -> None:
    """Task: ``trades_kl(logits_nat, logits_adv)`` = KL(p(x) ‖ p(x′)), batchmean (losses.trades_kl)."""
    _run_loss_check(_LossSpec(
        task="trades_kl", names=("logits_nat", "logits_adv"), reference=losses.trades_kl, make_case=_pair_case(200),
        trials=6, grad_names=("logits_nat", "logits_adv"), variants=_trades_variants(),
        grad_hints={"logits_nat": "TRADES backpropagates through p(x) as well: don't detach the clean distribution."},
        passed="KL(p(x) ‖ p(x′)) summed over classes, averaged over the batch, as losses.trades_kl (value and "
               "gradients, 6 trials)"), fn)


_BETAS = [6.0, 6.0, 1.0, 6.0, 2.5, 0.5]


def check_trades_loss(fn) -> None:
    """Task: ``trades_loss(logits_nat, logits_adv, y, beta=6.0)`` = CE(f(x), y) + β·KL(p(x) ‖ p(x′))."""
    pair = _pair_case(300)

    def case(t):
        (zn, za), _ = pair(t)
        return (zn, za, _labels(_gen(350 + t), *zn.shape)), {"beta": _BETAS[t]}

    ce, kl = F.cross_entropy, losses.trades_kl
    _run_loss_check(_LossSpec(
        task="trades_loss", names=("logits_nat", "logits_adv", "y"), reference=losses.trades_loss, make_case=case,
        trials=6, grad_names=("logits_nat", "logits_adv"),
        variants=[
            _Variant("your CE term uses the adversarial logits f(x′); TRADES takes the CE on the clean logits: "
                     "CE(f(x), y) + β·KL(p(x) ‖ p(x′))",
                     lambda zn, za, y, beta: ce(za, y) + beta * kl(zn, za)),
            _Variant("KL direction reversed: you computed KL(p(x′) ‖ p(x)); TRADES uses KL(p(x) ‖ p(x′))",
                     lambda zn, za, y, beta: ce(zn, y) + beta * kl(za, zn)),
            _Variant("your KL averages over batch × classes (reduction='mean'), 1/{C} of TRADES' KL, which sums over "
                     "the classes and averages over the batch ('batchmean')",
                     lambda zn, za, y, beta: ce(zn, y) + beta * kl(zn, za) / zn.shape[1]),
            _Variant("your KL is summed over the batch too (reduction='sum' without dividing by the batch size {B})",
                     lambda zn, za, y, beta: ce(zn, y) + beta * kl(zn, za) * zn.shape[0]),
            _Variant("β multiplies the wrong term: TRADES is CE + β·KL, not β·CE + KL",
                     lambda zn, za, y, beta: beta * ce(zn, y) + kl(zn, za)),
            _Variant("you ignored the `beta` argument (your value matches β = 6): use the beta passed in",
                     lambda zn, za, y, beta: None if beta == 6.0 else ce(zn, y) + 6.0 * kl(zn, za)),
            _Variant("you left out the KL term β·KL(p(x) ‖ p(x′))", lambda zn, za, y, beta: ce(zn, y)),
            _Variant("you left out the CE term CE(f(x), y)", lambda zn, za, y, beta: beta * kl(zn, za)),
            _Variant("you used CE on x′ and the reversed KL: TRADES is CE(f(x), y) + β·KL(p(x) ‖ p(x′))",
                     lambda zn, za, y, beta: ce(za, y) + beta * kl(za, zn)),
        ],
        grad_hints={"logits_nat": "TRADES backpropagates through p(x) in the KL too: don't detach it."},
        passed="CE(f(x), y) + β·KL(p(x) ‖ p(x′)) as losses.trades_loss (β ∈ {0.5, 1, 2.5, 6}, value and "
               "gradients)"), fn)


# ------------------------------------------------------------------------------------------ ch. 4
def _triple_case(base_seed, with_beta=False):
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(base_seed + t)
        z_nat = _logits(g, b, c, 2 * s)
        z_adv = z_nat + _logits(g, b, c, s)
        z_guide = _logits(g, b, c, 2 * s)
        y = _labels(g, b, c)
        if with_beta:
            return (z_adv, z_guide, y), {"beta": [6.0, 0.0, 2.0, 6.0, 1.0, 6.0][t], "logits_nat": z_nat}
        return (z_adv, z_guide, y), {}
    return case


def check_lbgat0_loss(fn) -> None:
    """Task: ``lbgat0_loss(logits_adv, logits_guide, y)`` = CE(g(x), y) + MSE(f(x′), g(x)) (LBGAT, β = 0)."""
    ce, mse = F.cross_entropy, F.mse_loss
    _run_loss_check(_LossSpec(
        task="lbgat0_loss", names=("logits_adv", "logits_guide", "y"), reference=losses.lbgat_loss,
        make_case=_triple_case(400), trials=6, grad_names=("logits_adv", "logits_guide"),
        variants=[
            _Variant("your CE term uses the target's adversarial logits f(x′); LBGAT puts the label loss on the "
                     "guide: CE(g(x), y)", lambda za, zg, y: ce(za, y) + mse(za, zg)),
            _Variant("your MSE compares probabilities (softmax); LBGAT's MSE is between the logits f(x′) and g(x)",
                     lambda za, zg, y: ce(zg, y) + mse(F.softmax(za, dim=1), F.softmax(zg, dim=1))),
            _Variant("your MSE sums the squared error over the classes ({C}× too large); nn.MSELoss / F.mse_loss "
                     "averages over batch × classes", lambda za, zg, y: ce(zg, y) + za.shape[1] * mse(za, zg)),
            _Variant("your MSE sums over batch and classes; F.mse_loss averages them (reduction='mean')",
                     lambda za, zg, y: ce(zg, y) + za.numel() * mse(za, zg)),
            _Variant("you left out CE(g(x), y): without it nothing ties the guide to the labels",
                     lambda za, zg, y: mse(za, zg)),
            _Variant("you left out MSE(f(x′), g(x)), the term through which the target learns from the guide",
                     lambda za, zg, y: ce(zg, y)),
        ],
        grad_hints={"logits_guide": "LBGAT trains the guide through both CE and MSE: don't detach g(x) in the MSE.",
                    "logits_adv": "The target learns only through MSE(f(x′), g(x)): keep f(x′) in the graph."},
        passed="CE(g(x), y) + MSE(f(x′), g(x)) as losses.lbgat_loss with β = 0 (value and gradients, 6 trials)"), fn)


def check_lbgat_loss(fn) -> None:
    """Task: ``lbgat_loss(logits_adv, logits_guide, y, beta=0.0, logits_nat=None)``
    = CE(g(x), y) + MSE(f(x′), g(x)) + β·KL(p_f(x) ‖ p_f(x′))."""
    lb0, kl = (lambda za, zg, y: losses.lbgat_loss(za, zg, y)), losses.trades_kl

    def ref(za, zg, y, beta, logits_nat):
        return losses.lbgat_loss(za, zg, y, beta=beta, logits_nat=logits_nat)

    _run_loss_check(_LossSpec(
        task="lbgat_loss", names=("logits_adv", "logits_guide", "y"), reference=ref,
        make_case=_triple_case(500, with_beta=True), trials=6, grad_names=("logits_adv", "logits_guide"),
        variants=[
            _Variant("KL direction reversed: you computed KL(p_f(x′) ‖ p_f(x)); LBGAT's β-term is TRADES' "
                     "KL(p_f(x) ‖ p_f(x′))",
                     lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(za, logits_nat)),
            _Variant("your β-term compares the guide with the target (KL(p_g(x) ‖ p_f(x′))); LBGAT's β-term is the "
                     "target's own TRADES KL(p_f(x) ‖ p_f(x′)), with logits_nat = f(x)",
                     lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(zg, za)),
            _Variant("your KL averages over batch × classes (1/{C} of the per-sample KL); LBGAT's β-term is TRADES' "
                     "KL summed over classes and averaged over the batch",
                     lambda za, zg, y, beta, logits_nat: lb0(za, zg, y) + beta * kl(logits_nat, za) / za.shape[1]),
            _Variant("you ignored the `beta` argument (your value matches β = 6): use the beta passed in",
                     lambda za, zg, y, beta, logits_nat: None if beta == 6.0
                     else lb0(za, zg, y) + 6.0 * kl(logits_nat, za)),
            _Variant("you dropped the β-term: with β > 0 add β·KL(p_f(x) ‖ p_f(x′)) (logits_nat = f(x))",
                     lambda za, zg, y, beta, logits_nat: lb0(za, zg, y)),
            _Variant("your CE term uses the target's clean logits f(x); LBGAT puts the label loss on the guide g(x)",
                     lambda za, zg, y, beta, logits_nat: F.cross_entropy(logits_nat, y) + F.mse_loss(za, zg)
                     + beta * kl(logits_nat, za)),
        ],
        grad_hints={"logits_guide": "LBGAT trains the guide through CE and MSE: don't detach g(x)."},
        passed="CE(g(x), y) + MSE(f(x′), g(x)) + β·KL(p_f(x) ‖ p_f(x′)) as losses.lbgat_loss (β ∈ {0, 1, 2, 6})"), fn)


# ------------------------------------------------------------------------------------------ ch. 5
def _dist_case(base_seed):
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(base_seed + t)
        return (F.softmax(_logits(g, b, c, 2 * s), dim=1), F.log_softmax(_logits(g, b, c, 2 * s), dim=1)), {}
    return case


def check_official_kl(fn) -> None:
    """Task: ``official_kl(p, log_q)`` = mean over batch × classes of p·(log(p + 1e-5) − log q)."""
    _run_loss_check(_LossSpec(
        task="official_kl", names=("p", "log_q"), reference=losses.official_kl, make_case=_dist_case(600),
        trials=6, grad_names=("p", "log_q"),
        variants=[
            _Variant("you left out the +1e-5: the official helper computes p·(log(p + 1e-5) − log q), a slight upper "
                     "bound of the exact KL that F.kl_div would give", _exact_kl_mean),
            _Variant("you summed over the classes and averaged over the batch ('batchmean'), so your value is {C}× "
                     "the official K̄L, which averages over all batch × classes elements (torch.mean)",
                     lambda p, lq: losses.official_kl(p, lq, "batchmean")),
            _Variant("you summed over everything; the official K̄L is the mean over batch × classes (torch.mean)",
                     lambda p, lq: losses.official_k(p, lq).sum()),
            _Variant("KL direction reversed: you computed K̄L(Q ‖ P); the expectation is under the first argument p: "
                     "p·(log(p + 1e-5) − log q)", lambda p, lq: losses.official_kl(lq.exp(), torch.log(p))),
            _Variant("you added 1e-5 inside log q as well; the official code has it only in log(p + 1e-5) (log q "
                     "arrives as a log-softmax)",
                     lambda p, lq: (p * (torch.log(p + 1e-5) - torch.log(lq.exp() + 1e-5))).mean()),
            _Variant("you exchanged the roles of the two logs: the formula is p·(log(p + 1e-5) − log q), not "
                     "p·(log q − log(p + 1e-5))", lambda p, lq: -losses.official_kl(p, lq)),
        ],
        passed="p·(log(p + 1e-5) − log q) averaged over batch × classes, as losses.official_kl (value and "
               "gradients, 10 and 100 classes)"), fn)


def _nat_guide_case(base_seed, want_negative: tuple[int, ...]):
    """Clean/guide logits; in the trials listed, K̄L(p_f‖p_g) < K̄L(p_g‖p_f) (so a missing |·| shows)."""
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(base_seed + t)
        zn, zg = _logits(g, b, c, 2 * s), _logits(g, b, c, 1.3 * s)
        diff = (_kbar(zn, zg) - _kbar(zg, zn)).item()
        if (diff < 0) != (t in want_negative):
            zn, zg = zg, zn
        return zn, zg, g
    return case


def check_d2r_clean_term(fn) -> None:
    """Task: ``d2r_clean_term(logits_nat, logits_guide)`` = |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|."""
    base = _nat_guide_case(700, want_negative=(1, 3, 4))

    def case(t):
        zn, zg, _ = base(t)
        return (zn, zg), {}

    def terms(zn, zg, **kw):
        return losses.d2r_terms(zn, zn, zg, torch.zeros(zn.shape[0], dtype=torch.long), **kw)

    _run_loss_check(_LossSpec(
        task="d2r_clean_term", names=("logits_nat", "logits_guide"), make_case=case, trials=6,
        reference=lambda zn, zg: terms(zn, zg)["clean"], grad_names=("logits_nat", "logits_guide"),
        variants=[
            _Variant("you dropped the absolute value: the clean term is |K̄L(p_f ‖ p_g) − K̄L(p_g ‖ p_f)|, and "
                     "yours is negative here ({got:.3g})",
                     lambda zn, zg: terms(zn, zg)["kl_fg"] - terms(zn, zg)["kl_gf"]),
            _Variant("you dropped the absolute value (and subtracted the other way round): the clean term is "
                     "|K̄L(p_f ‖ p_g) − K̄L(p_g ‖ p_f)|, and yours is negative here ({got:.3g})",
                     lambda zn, zg: terms(zn, zg)["kl_gf"] - terms(zn, zg)["kl_fg"]),
            _Variant("you added the two KLs (a symmetric divergence); the official clean term is the absolute "
                     "*difference* |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|",
                     lambda zn, zg: terms(zn, zg)["kl_fg"] + terms(zn, zg)["kl_gf"]),
            _Variant("your KLs use 'batchmean' (sum over classes), {C}× the official K̄L, which averages over batch "
                     "× classes", lambda zn, zg: terms(zn, zg, kl_reduction="batchmean")["clean"]),
            _Variant("you left out the +1e-5 inside log(p + 1e-5): use your official_kl from Task 1 (or "
                     "losses.official_kl)",
                     lambda zn, zg: (_exact_kl_mean(F.softmax(zn, dim=1), F.log_softmax(zg, dim=1))
                                     - _exact_kl_mean(F.softmax(zg, dim=1), F.log_softmax(zn, dim=1))).abs()),
            _Variant("you returned a single KL, K̄L(p_f(x) ‖ p_g(x)); the clean term is the absolute difference "
                     "of the two directions", lambda zn, zg: terms(zn, zg)["kl_fg"]),
            _Variant("you returned a single KL, K̄L(p_g(x) ‖ p_f(x)); the clean term is the absolute difference "
                     "of the two directions", lambda zn, zg: terms(zn, zg)["kl_gf"]),
            _Variant("you squared the difference; the official term takes its absolute value",
                     lambda zn, zg: (terms(zn, zg)["kl_fg"] - terms(zn, zg)["kl_gf"]) ** 2),
        ],
        passed="|K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))| as losses.d2r_terms(...)['clean'] (both signs of the "
               "difference, value and gradients)"), fn)


def check_d2r_adv_term(fn) -> None:
    """Task: ``d2r_adv_term(logits_adv, logits_guide)`` = K̄L(p_f(x′) ‖ p_g(x))."""
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(800 + t)
        return (_logits(g, b, c, 2 * s), _logits(g, b, c, 1.5 * s)), {}

    def terms(za, zg, **kw):
        return losses.d2r_terms(za, za, zg, torch.zeros(za.shape[0], dtype=torch.long), **kw)

    _run_loss_check(_LossSpec(
        task="d2r_adv_term", names=("logits_adv", "logits_guide"), make_case=case, trials=6,
        reference=lambda za, zg: terms(za, zg)["adv"], grad_names=("logits_adv", "logits_guide"),
        variants=[
            _Variant("KL direction reversed: you computed K̄L(p_g(x) ‖ p_f(x′)), the TRADES/CAG direction; D2R's "
                     "adversarial term is K̄L(p_f(x′) ‖ p_g(x)) = official_kl(p_f(x′), log p_g(x))",
                     lambda za, zg: _kbar(zg, za)),
            _Variant("your KL uses 'batchmean' (sum over classes), {C}× the official K̄L, which averages over batch × "
                     "classes", lambda za, zg: terms(za, zg, kl_reduction="batchmean")["adv"]),
            _Variant("you left out the +1e-5 inside log(p + 1e-5): use your official_kl from Task 1",
                     lambda za, zg: _exact_kl_mean(F.softmax(za, dim=1), F.log_softmax(zg, dim=1))),
            _Variant("you computed TRADES' KL(p_g(x) ‖ p_f(x′)) (batchmean, exact): D2R's adversarial term is "
                     "K̄L(p_f(x′) ‖ p_g(x)), averaged over batch × classes, with the +1e-5",
                     lambda za, zg: losses.trades_kl(zg, za)),
            _Variant("you computed TRADES' per-sample KL(p_f(x′) ‖ p_g(x)) (batchmean, no +1e-5): the official K̄L "
                     "averages over batch × classes and has log(p + 1e-5)", lambda za, zg: losses.trades_kl(za, zg)),
        ],
        passed="K̄L(p_f(x′) ‖ p_g(x)) as losses.d2r_terms(...)['adv'] (value and gradients, 6 trials)"), fn)


_WEIGHTS = [(20.0, 30.0), (20.0, 30.0), (5.0, 7.0), (20.0, 30.0), (1.0, 2.0), (20.0, 30.0)]


def check_d2r_loss(fn) -> None:
    """Task: ``d2r_loss(logits_adv, logits_nat, logits_guide, y, w_clean=20.0, w_adv=30.0)`` (losses.d2r_loss)."""
    base = _nat_guide_case(900, want_negative=(0, 2))

    def case(t):
        zn, zg, g = base(t)
        b, c = zn.shape
        za = zn + _logits(g, b, c, 1.0)
        w_clean, w_adv = _WEIGHTS[t]
        return (za, zn, zg, _labels(g, b, c)), {"w_clean": w_clean, "w_adv": w_adv}

    T = losses.d2r_terms
    ce, mse = F.cross_entropy, F.mse_loss

    def with_terms(build):
        def variant(za, zn, zg, y, w_clean, w_adv):
            return build(T(za, zn, zg, y), za, zn, zg, y, w_clean, w_adv)
        return variant

    _run_loss_check(_LossSpec(
        task="d2r_loss", names=("logits_adv", "logits_nat", "logits_guide", "y"), reference=losses.d2r_loss,
        make_case=case, trials=6, grad_names=("logits_adv", "logits_nat", "logits_guide"),
        variants=[
            _Variant("your CE term uses the target's clean logits f(x); D2R (like LBGAT) puts the label loss on the "
                     "guide: CE(g(x), y)", with_terms(lambda t, za, zn, zg, y, wc, wa: ce(zn, y) + t["mse"]
                                                      + wc * t["clean"] + wa * t["adv"])),
            _Variant("your CE term uses the target's adversarial logits f(x′); D2R puts the label loss on the guide: "
                     "CE(g(x), y)", with_terms(lambda t, za, zn, zg, y, wc, wa: ce(za, y) + t["mse"]
                                               + wc * t["clean"] + wa * t["adv"])),
            _Variant("your MSE compares f(x) with g(x); D2R's MSE is between the adversarial logits f(x′) and g(x)",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + mse(zn, zg) + wc * t["clean"]
                                + wa * t["adv"])),
            _Variant("the weights are swapped: w_clean multiplies the clean term |K̄L(p_f‖p_g) − K̄L(p_g‖p_f)| and "
                     "w_adv the adversarial term K̄L(p_f(x′) ‖ p_g(x))",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + t["mse"] + wa * t["clean"]
                                + wc * t["adv"])),
            _Variant("adversarial term in the TRADES/CAG direction: you computed K̄L(p_g(x) ‖ p_f(x′)); D2R's "
                     "adversarial term is K̄L(p_f(x′) ‖ p_g(x))",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + t["mse"] + wc * t["clean"]
                                + wa * _kbar(zg, za))),
            _Variant("the clean term lost its absolute value: it is |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + t["mse"]
                                + wc * (t["kl_fg"] - t["kl_gf"]) + wa * t["adv"])),
            _Variant("the clean term lost its absolute value: it is |K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + t["mse"]
                                + wc * (t["kl_gf"] - t["kl_fg"]) + wa * t["adv"])),
            _Variant("your KL terms use 'batchmean' (the per-sample KL), {C}× the official K̄L, which averages over "
                     "batch × classes",
                     lambda za, zn, zg, y, w_clean, w_adv: losses.d2r_loss(za, zn, zg, y, w_clean=w_clean,
                                                                         w_adv=w_adv, kl_reduction="batchmean")),
            _Variant("you ignored w_clean / w_adv (your value matches the defaults 20 and 30): use the weights "
                     "passed in", lambda za, zn, zg, y, w_clean, w_adv: None if (w_clean, w_adv) == (20.0, 30.0)
                     else losses.d2r_loss(za, zn, zg, y)),
            _Variant("you left out the clean-distribution term w_clean·|K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + t["mse"] + wa * t["adv"])),
            _Variant("you left out the adversarial-distribution term w_adv·K̄L(p_f(x′) ‖ p_g(x))",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + t["mse"] + wc * t["clean"])),
            _Variant("you left out MSE(f(x′), g(x)) (LBGAT's core term, kept by D2R)",
                     with_terms(lambda t, za, zn, zg, y, wc, wa: t["ce"] + wc * t["clean"] + wa * t["adv"])),
        ],
        grad_hints={"logits_guide": "In D2R nothing is detached: g(x) gets gradients from CE, MSE and both KL terms.",
                    "logits_nat": "f(x) enters only the clean term; keep it in the graph."},
        passed="CE(g(x), y) + MSE(f(x′), g(x)) + w_clean·|K̄L(p_f‖p_g) − K̄L(p_g‖p_f)| + w_adv·K̄L(p_f(x′) ‖ p_g(x)) "
               "as losses.d2r_loss (weights 20/30 and others, value and gradients w.r.t. all three logits)"), fn)


# ------------------------------------------------------------------------------------------ ch. 6
def check_cag_objective(fn) -> None:
    """Task: ``cag_objective(logits_adv, p_guide)`` = Σ_i Σ_c p_g·(log(p_g + 1e-5) − log p_f(x′))."""
    def case(t):
        b, c, s = _SHAPES[t]
        g = _gen(1000 + t)
        return (_logits(g, b, c, 2 * s), F.softmax(_logits(g, b, c, 2 * s), dim=1)), {}

    ref = lambda za, pg: attacks.official_kl_sum(pg, za)  # noqa: E731
    _run_loss_check(_LossSpec(
        task="cag_objective", names=("logits_adv", "p_guide"), reference=ref, make_case=case, trials=6,
        grad_names=("logits_adv",),
        variants=[
            _Variant("KL direction reversed: you computed Σ KL(p_f(x′) ‖ p_g(x)), the direction of D2R's adversarial "
                     "*training* term; CAG ascends Σ KL(p_g(x) ‖ p_f(x′)) = Σ p_g·(log(p_g + 1e-5) − log p_f(x′))",
                     lambda za, pg: losses.official_k(F.softmax(za, dim=1), torch.log(pg)).sum()),
            _Variant("you averaged over batch × classes; the CAG objective is a plain sum over batch and classes "
                     "(the official code's .sum())", lambda za, pg: attacks.official_kl_sum(pg, za) / za.numel()),
            _Variant("you averaged over the batch; the CAG objective is a plain sum over batch and classes",
                     lambda za, pg: attacks.official_kl_sum(pg, za) / za.shape[0]),
            _Variant("you computed the exact KL (as F.kl_div does); the official objective uses log(p_g + 1e-5). "
                     "The gradient is the same, but keep the official form: losses.official_k(p_guide, log p_f(x′))",
                     lambda za, pg: F.kl_div(F.log_softmax(za, dim=1), pg, reduction="sum")),
            _Variant("you applied softmax to p_guide again: it is already a probability vector",
                     lambda za, pg: losses.official_k(F.softmax(pg, dim=1), F.log_softmax(za, dim=1)).sum()),
            _Variant("you used the raw logits f(x′) where log p_f(x′) belongs: apply F.log_softmax(logits_adv, dim=1)",
                     lambda za, pg: losses.official_k(pg, za).sum()),
        ],
        passed="Σ_batch Σ_classes p_g·(log(p_g + 1e-5) − log p_f(x′)) as attacks.official_kl_sum (value and "
               "gradient)"), fn)


# ================================================================================================
# Attacks: one framework
# ================================================================================================
def _project_wrong(x_adv, x, eps, norm, clamp=True):
    if clamp:
        return attacks.project(x_adv, x, eps, norm)
    delta = x_adv - x
    if norm == "linf":
        return x + delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return x + delta * (eps / n).clamp(max=1.0)


def _wrong_attack(model, x, objective, *, eps, step_size, steps, start="clean", step="sign", descend=False,
                  project_norm="linf", start_norm="linf", project_each_step=True, clamp=True):
    """A deliberately configurable (and mostly wrong) gradient attack, used only to recognise mistakes."""
    x = x.detach()
    with attacks.eval_mode(model):
        x_adv = attacks._random_start(x, eps, start_norm, start).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = objective(model(x_adv))
            grad = torch.autograd.grad(loss, x_adv)[0]
            if step == "sign":
                d = grad.sign()
            elif step == "grad":
                d = grad
            elif step == "l2":
                d = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            else:  # "l2_batch": one norm for the whole batch
                d = grad / grad.norm().clamp_min(1e-12)
            x_adv = x_adv.detach() + (-step_size if descend else step_size) * d
            if project_each_step:
                x_adv = _project_wrong(x_adv, x, eps, project_norm, clamp)
        if not project_each_step:
            x_adv = _project_wrong(x_adv, x, eps, project_norm, clamp)
    return x_adv.detach()


def _ce_sum(y):
    return lambda z: F.cross_entropy(z, y, reduction="sum")


@dataclass
class _AttackCase:
    models: dict
    x: torch.Tensor
    y: torch.Tensor | None
    kwargs: dict
    seed: int
    mode: str


@dataclass
class _AttackSpec:
    task: str
    norm: str
    random: bool                       # random start: exact comparison may fail for other RNG use
    cases: list
    learner: Callable                  # (fn, models, x, y, kwargs) -> x_adv
    library: Callable                  # (models, x, y, kwargs) -> x_adv
    objective: Callable                # (models, x, y, x_adv) -> float, the quantity the attack raises
    variants: list                     # (message, (models, x, y, kwargs) -> x_adv)
    passed: str
    guide_once: bool = False


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().gt(1e-5).float().mean().item() <= 0.002


def _run_attack_check(spec: _AttackSpec, fn) -> None:
    task = spec.task
    gains = []
    with _sandbox(task, fn):
        for case in spec.cases:
            mods = _copies(case.models, case.mode)
            modes = {r: _modes(m) for r, m in mods.items()}
            bn = {r: _bn_state(m) for r, m in mods.items()}
            calls = {r: [] for r in mods}
            hooks = [m.register_forward_pre_hook(lambda mod, inp, r=r: calls[r].append(torch.is_grad_enabled()))
                     for r, m in mods.items()]
            x_l = case.x.clone()
            torch.manual_seed(case.seed)
            try:
                out = _call(task, spec.learner, fn, mods, x_l, case.y, case.kwargs)
            finally:
                for h in hooks:
                    h.remove()
            torch.manual_seed(case.seed)
            ref = spec.library(_copies(case.models, case.mode), case.x, case.y, case.kwargs)
            x, eps = case.x, case.kwargs["eps"]
            if not isinstance(out, torch.Tensor):
                _fail(task, f"your function returned {type(out).__name__}; return x′ as a tensor shaped like x")
            if out.shape != x.shape:
                _fail(task, f"your x′ has shape {tuple(out.shape)}; it must have the shape of x, {tuple(x.shape)}")
            if out.requires_grad or out.grad_fn is not None:
                _fail(task, "your x′ still carries a graph (requires_grad=True): return x_adv.detach(); an "
                            "attack's output is a constant input for the next step")
            if not torch.equal(x_l, x):
                _fail(task, "your function modified x in place: build x′ in a new tensor (x.clone(), x + ...)")
            _check_modes(task, modes, mods)
            for role, model in mods.items():
                if _bn_changed(bn[role], model):
                    _fail(task, f"the {role} ran in train mode during your attack: BatchNorm used the batch's "
                                f"statistics and its running averages changed. Attacks run the models in eval "
                                f"mode (`with attacks.eval_mode({role}):`)")
            if spec.guide_once and "guide" in calls:
                n, grads = len(calls["guide"]), sum(calls["guide"])
                if n > 1:
                    _fail(task, f"the guide ran {n} times during your attack: p_g(x) does not change with x′, so "
                                f"compute it once, before the loop (the official code's per-step recomputation "
                                f"gives the same x′ at {n - 1} extra forward passes)")
                if grads:
                    _fail(task, "the guide's forward pass ran with gradients enabled, building a graph nobody uses: "
                                "compute p_g(x) under torch.no_grad()")
            if not torch.isfinite(out).all():
                _fail(task, "your x′ contains NaN or inf values")
            if _same(out, ref):
                continue
            for message, variant in spec.variants:
                torch.manual_seed(case.seed)
                v = variant(_copies(case.models, case.mode), x, case.y, case.kwargs)
                if _same(out, v) and not _same(v, ref):
                    _fail(task, message)
            outside = ((out < -1e-6) | (out > 1 + 1e-6)).float().mean().item()
            if outside > 0:
                _fail(task, f"your attack forgets the clamp to [0, 1]: {_pct(outside)} of the pixels of x′ are "
                            f"outside [0, 1]")
            delta = out - x
            if spec.norm == "linf":
                far = (delta.abs() > eps + 1e-6).float().mean().item()
                if far > 0:
                    _fail(task, f"your x′ leaves {_pct(far)} of the pixels outside the ε-ball (|x′ − x| > ε = "
                                f"{eps:.4g}): project back onto the ball after every step")
            else:
                norms = delta.flatten(1).norm(dim=1)
                far = int((norms > eps * (1 + 1e-5) + 1e-6).sum())
                if far:
                    _fail(task, f"{far} of {len(norms)} examples of your x′ lie outside the L2 ε-ball (largest "
                                f"‖x′ − x‖₂ = {norms.max().item():.4g} > ε = {eps:.4g}): project after every step")
            if not spec.random:
                diff = (out - ref).abs().gt(1e-5).float().mean().item()
                _fail(task, f"your x′ differs from the library's on {_pct(diff)} of the pixels (max |Δ| = "
                            f"{(out - ref).abs().max().item():.3g}); none of the common mistakes this check knows "
                            f"matches: compare your steps with the task's statement")
            # random start, other random numbers than the library's: compare what the attack achieves instead
            torch.manual_seed(case.seed + 999)
            again = _call(task, spec.learner, fn, _copies(case.models, case.mode), case.x.clone(), case.y, case.kwargs)
            if torch.equal(again, out):
                _fail(task, "no random start: two calls with different random seeds returned the same x′")
            base = spec.objective(case.models, x, case.y, x)
            gains.append((spec.objective(case.models, x, case.y, out) - base,
                          spec.objective(case.models, x, case.y, ref) - base))
        if gains:
            mine, lib = sum(g for g, _ in gains), sum(g for _, g in gains)
            if mine <= 0:
                _fail(task, f"your attack lowers the loss it should raise (change {mine:.3g}, the library's "
                            f"{lib:.3g}): step *up* the gradient, x′ + α·sign(∇)")
            if mine < 0.75 * lib:
                _fail(task, f"your attack raises its objective much less than the library's ({mine:.3g} vs "
                            f"{lib:.3g} over the trials): check the step direction and size")
            _passed(task, spec.passed + " — your random numbers differ from the library's, so the check compared "
                                        "invariants and the loss reached instead of exact values")
            return
        _passed(task, spec.passed)


def _attack_cases(kind: str) -> list[_AttackCase]:
    """Three trials: batch 8 / 1 / 5, 10 and 100 classes, models in train and in eval mode."""
    shapes = [(8, 10, "train"), (1, 10, "eval"), (5, 100, "train")]
    budgets = {
        "fgsm": [dict(eps=8 / 255), dict(eps=0.1), dict(eps=0.05)],
        "linf": [dict(eps=0.05, step_size=0.0125, steps=4), dict(eps=8 / 255, step_size=2 / 255, steps=3),
                 dict(eps=0.1, step_size=0.03, steps=3)],
        "l2": [dict(eps=0.5, step_size=0.15, steps=4), dict(eps=0.25, step_size=0.1, steps=3),
               dict(eps=1.0, step_size=0.3, steps=3)],
        "kl": [dict(eps=0.031, step_size=0.007, steps=4), dict(eps=0.031, step_size=0.007, steps=3),
               dict(eps=0.02, step_size=0.012, steps=3)],
    }[kind]
    cases = []
    for i, ((b, c, mode), kw) in enumerate(zip(shapes, budgets)):
        g = _gen(1100 + i)
        roles = {"target": _cnn(c, 1200 + i), "guide": _cnn(c, 1300 + i)} if kind == "kl" else {"model": _cnn(c, 1200 + i)}
        cases.append(_AttackCase(roles, _images(g, b), _labels(g, b, c), kw, 1400 + i, mode))
    return cases


def _ce_objective(mods, x, y, xa):
    m = mods["model"] if "model" in mods else mods["target"]
    with attacks.eval_mode(m), torch.no_grad():
        return F.cross_entropy(m(xa), y, reduction="sum").item()


# ------------------------------------------------------------------------------------------ ch. 1
def check_fgsm(fn) -> None:
    """Task: ``fgsm(model, x, y, eps)``: x′ = clamp(x + ε·sign(∇ₓ CE(f(x), y)), 0, 1), model in eval mode."""
    def wrong(objective=None, **kw):
        def run(mods, x, y, k):
            obj = _ce_sum(y) if objective is None else objective(y)
            return _wrong_attack(mods["model"], x, obj, eps=k["eps"], step_size=k["eps"], steps=1, **kw)
        return run

    _run_attack_check(_AttackSpec(
        task="fgsm", norm="linf", random=False, cases=_attack_cases("fgsm"),
        learner=lambda fn, mods, x, y, k: fn(mods["model"], x, y, k["eps"]),
        library=lambda mods, x, y, k: attacks.fgsm(mods["model"], x, y, eps=k["eps"]),
        objective=_ce_objective,
        variants=[
            ("you stepped along the raw gradient, ε·∇; FGSM steps along its sign: x + ε·sign(∇ₓ loss)",
             wrong(step="grad")),
            ("you stepped along the raw gradient of the mean loss, ε·∇; FGSM steps along its sign: "
             "x + ε·sign(∇ₓ loss)", wrong(step="grad", objective=lambda y: (lambda z: F.cross_entropy(z, y)))),
            ("you stepped *down* the loss (x − ε·sign(∇)); an attack ascends it: x + ε·sign(∇ₓ loss)",
             wrong(descend=True)),
            ("you applied softmax before F.cross_entropy (which applies log-softmax itself), so your gradient "
             "is the wrong one: use the raw logits",
             wrong(objective=lambda y: (lambda z: F.cross_entropy(F.softmax(z, dim=1), y, reduction="sum")))),
        ],
        passed="x + ε·sign(∇ₓ CE) clamped to [0, 1], eval mode, mode restored, detached, as attacks.fgsm "
               "(3 trials)"), fn)


def _projection_cases(norm: str):
    cases = []
    for i, (b, eps) in enumerate([(8, 8 / 255), (1, 0.1), (6, 0.03)] if norm == "linf"
                                 else [(8, 0.5), (1, 0.3), (6, 1.0)]):
        g = _gen(1500 + i + (10 if norm == "l2" else 0))
        x = _images(g, b)
        if norm == "linf":
            x_adv = x + 3 * eps * (2 * torch.rand(x.shape, generator=g) - 1)
        else:
            scale = (0.3 + 1.7 * torch.rand(b, 1, 1, 1, generator=g)) * eps / math.sqrt(x[0].numel())
            x_adv = x + scale * torch.randn(x.shape, generator=g)
            if b > 1:
                x_adv[0] = x[0]                   # a zero perturbation: the norm must be guarded
                x_adv[1] = x[1] + 3 * (x_adv[1] - x[1])
        cases.append((x_adv, x, eps))
    return cases


def _run_projection_check(task, fn, norm, variants, passed):
    with _sandbox(task, fn):
        for x_adv, x, eps in _projection_cases(norm):
            xa_l, x_l = x_adv.clone(), x.clone()
            out = _call(task, fn, xa_l, x_l, eps)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                _fail(task, f"return a tensor shaped like x {tuple(x.shape)}; got "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            if not torch.equal(xa_l, x_adv) or not torch.equal(x_l, x):
                _fail(task, "your projection modified its inputs in place: return a new tensor")
            if not torch.isfinite(out).all():
                _fail(task, "your projection returns NaN/inf when δ = 0 (x_adv == x): guard the division, e.g. "
                            "norm.clamp_min(1e-12)")
            ref = attacks.project(x_adv, x, eps, norm)
            if torch.allclose(out, ref, atol=1e-6):
                continue
            for message, variant in variants:
                v = variant(x_adv, x, eps)
                if torch.allclose(out, v, atol=1e-6) and not torch.allclose(v, ref, atol=1e-6):
                    _fail(task, message)
            outside = ((out < -1e-6) | (out > 1 + 1e-6)).float().mean().item()
            if outside > 0:
                _fail(task, f"your projection forgets the clamp to [0, 1]: {_pct(outside)} of the pixels are "
                            f"outside [0, 1]")
            delta = out - x
            if norm == "linf":
                far = (delta.abs() > eps + 1e-6).float().mean().item()
                if far > 0:
                    _fail(task, f"your projection leaves {_pct(far)} of the pixels outside the ε-ball (|x′ − x| > ε)")
            else:
                norms = delta.flatten(1).norm(dim=1)
                far = int((norms > eps * (1 + 1e-5) + 1e-6).sum())
                if far:
                    _fail(task, f"your projection leaves {far} of {len(norms)} examples outside the L2 ε-ball "
                                f"(largest ‖x′ − x‖₂ = {norms.max().item():.4g} > ε = {eps:.4g})")
            _fail(task, f"your result differs from attacks.project(..., norm={norm!r}) (max |Δ| = "
                        f"{(out - ref).abs().max().item():.3g}) although it stays in the ball and in [0, 1]: "
                        f"a projection returns the *closest* point of the ball, so points already inside must "
                        f"not move")
        _passed(task, passed)


def check_project_linf(fn) -> None:
    """Task: ``project_linf(x_adv, x, eps)``: clip δ = x_adv − x to [−ε, ε] per pixel, then clamp to [0, 1]."""
    def rescaled(xa, x, eps):
        d = xa - x
        m = d.flatten(1).abs().max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + d * (eps / m).clamp(max=1.0)).clamp(0, 1)

    _run_projection_check("project_linf", fn, "linf", [
        ("you rescaled δ as a whole (δ·ε/‖δ‖∞); the L∞ projection clips each pixel independently: "
         "x + clamp(x_adv − x, −ε, ε)", rescaled),
        ("you clipped x_adv itself to [−ε, ε]; clip the perturbation δ = x_adv − x, then add it to x",
         lambda xa, x, eps: xa.clamp(-eps, eps).clamp(0, 1)),
    ], "x + clamp(x_adv − x, −ε, ε), then clamp to [0, 1], as attacks.project(..., 'linf') (3 trials, "
           "batch 1 included)")


def check_project_l2(fn) -> None:
    """Task: ``project_l2(x_adv, x, eps)``: δ·min(1, ε/‖δ‖₂) per example, then clamp to [0, 1]."""
    def per_norm(d):
        return d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    _run_projection_check("project_l2", fn, "l2", [
        ("you normalised with the norm of the whole batch; the L2 ball is per example: compute ‖δ‖₂ over each "
         "example's (C, H, W)", lambda xa, x, eps: (x + (xa - x) * (eps / (xa - x).norm().clamp_min(1e-12)).clamp(
             max=1.0)).clamp(0, 1)),
        ("you scaled every δ to norm ε, also those already inside the ball: multiply by min(1, ε/‖δ‖₂)",
         lambda xa, x, eps: (x + (xa - x) * eps / per_norm(xa - x)).clamp(0, 1)),
        ("you clipped each pixel to [−ε, ε] (the L∞ projection); the L2 projection rescales δ: "
         "δ·min(1, ε/‖δ‖₂)", lambda xa, x, eps: attacks.project(xa, x, eps, "linf")),
        ("you used the squared norm ‖δ‖₂² where ‖δ‖₂ belongs",
         lambda xa, x, eps: (x + (xa - x) * (eps / per_norm(xa - x) ** 2).clamp(max=1.0)).clamp(0, 1)),
    ], "δ·min(1, ε/‖δ‖₂) per example, then clamp to [0, 1], as attacks.project(..., 'l2') (3 trials, δ = 0 "
       "included)")


def _pgd_spec(task, norm, fn):
    step_kind = "sign" if norm == "linf" else "l2"

    def wrong(**kw):
        options = {"step": step_kind, "start": "uniform", "project_norm": norm, "start_norm": norm, **kw}
        return lambda mods, x, y, k: _wrong_attack(mods["model"], x, _ce_sum(y), **k, **options)

    lib = lambda start: (lambda mods, x, y, k: attacks.pgd(mods["model"], x, y, norm=norm, start=start, **k))  # noqa
    variants = [
        ("no random start: PGD starts from a uniformly random point of the ε-ball (Madry et al.), not from x",
         lib("clean")),
        ("you started at x + 0.001·N(0, I) (the TRADES start); PGD starts from a uniformly random point of the "
         "ε-ball", lib("gaussian")),
        ("you projected only once, after the loop; PGD projects back onto the ball after every step",
         wrong(project_each_step=False)),
        ("your steps go *down* the loss; PGD ascends it (x′ + α·step)", wrong(descend=True)),
    ]
    if norm == "linf":
        variants += [("you stepped along the raw gradient α·∇; L∞ PGD steps along its sign: α·sign(∇)",
                      wrong(step="grad"))]
    else:
        variants += [
            ("you stepped along sign(∇) (the L∞ step); the L2 step is α·∇/‖∇‖₂, normalised per example",
             wrong(step="sign")),
            ("you normalised the gradient by the norm of the whole batch; normalise per example: ∇ᵢ/‖∇ᵢ‖₂",
             wrong(step="l2_batch")),
            ("you stepped along the raw gradient α·∇; the L2 step is α·∇/‖∇‖₂, normalised per example",
             wrong(step="grad")),
            ("you projected onto the L∞ ball; PGD-L2 projects onto the L2 ball (δ·min(1, ε/‖δ‖₂))",
             wrong(project_norm="linf")),
        ]
    step_txt = "α·sign(∇)" if norm == "linf" else "α·∇/‖∇‖₂"
    return _AttackSpec(
        task=task, norm=norm, random=True, cases=_attack_cases(norm),
        learner=lambda fn, mods, x, y, k: fn(mods["model"], x, y, k["eps"], k["step_size"], k["steps"]),
        library=lambda mods, x, y, k: attacks.pgd(mods["model"], x, y, norm=norm, **k),
        objective=_ce_objective, variants=variants,
        passed=f"uniform random start, {step_txt} steps, projection after each step, [0, 1], eval mode, detached, "
               f"as attacks.pgd(norm={norm!r}) (3 trials)")


def check_pgd_linf(fn) -> None:
    """Task: ``pgd_linf(model, x, y, eps, step_size, steps)``: L∞ PGD with a uniform random start."""
    _run_attack_check(_pgd_spec("pgd_linf", "linf", fn), fn)


def check_pgd_l2(fn) -> None:
    """Task: ``pgd_l2(model, x, y, eps, step_size, steps)``: L2 PGD (normalised-gradient steps)."""
    _run_attack_check(_pgd_spec("pgd_l2", "l2", fn), fn)


# ------------------------------------------------------------------------------------------ ch. 3
def _p_clean(model, x):
    with attacks.eval_mode(model), torch.no_grad():
        return F.softmax(model(x), dim=1)


def check_trades_attack(fn) -> None:
    """Task: ``trades_attack(model, x, eps, step_size, steps)``: ascend Σ KL(p(x) ‖ p(x′)) from x + 0.001·N(0, I)."""
    def kl_obj(model, x, reverse=False):
        p = _p_clean(model, x)
        if reverse:
            return lambda z: F.kl_div(p.clamp_min(1e-30).log(), F.softmax(z, dim=1), reduction="sum")
        return lambda z: F.kl_div(F.log_softmax(z, dim=1), p, reduction="sum")

    def wrong(reverse=False, **kw):
        options = {"start": "gaussian", **kw}
        return lambda mods, x, y, k: _wrong_attack(mods["target"], x, kl_obj(mods["target"], x, reverse),
                                                   **k, **options)

    def lib_pgd(start):
        return lambda mods, x, y, k: attacks.pgd(mods["target"], x, objective="kl", start=start,
                                                 reference=_p_clean(mods["target"], x), **k)

    def objective(mods, x, y, xa):
        m = mods["target"]
        return F.kl_div(F.log_softmax(_p_logits(m, xa), dim=1), _p_clean(m, x), reduction="sum").item()

    _run_attack_check(_AttackSpec(
        task="trades_attack", norm="linf", random=True, cases=_attack_cases("kl"),
        learner=lambda fn, mods, x, y, k: fn(mods["target"], x, k["eps"], k["step_size"], k["steps"]),
        library=lambda mods, x, y, k: attacks.trades_attack(mods["target"], x, **k),
        objective=objective,
        variants=[
            ("you started from a uniformly random point of the ε-ball; TRADES starts at x + 0.001·N(0, I) "
             "(x + 0.001 * torch.randn_like(x))", lib_pgd("uniform")),
            ("no random start: TRADES starts at x + 0.001·N(0, I) (at x itself the KL's gradient is zero)",
             lib_pgd("clean")),
            ("KL direction reversed: you ascended KL(p(x′) ‖ p(x)); TRADES' attack ascends KL(p(x) ‖ p(x′))",
             wrong(reverse=True)),
            ("you stepped along the raw gradient α·∇; TRADES steps along its sign: α·sign(∇)", wrong(step="grad")),
            ("your steps go *down* the KL; the attack ascends it", wrong(descend=True)),
        ],
        passed="x + 0.001·N(0, I), sign steps on Σ KL(p(x) ‖ p(x′)), projection, [0, 1], eval mode, detached, as "
               "attacks.trades_attack (3 trials)"), fn)


def _p_logits(model, xa):
    with attacks.eval_mode(model), torch.no_grad():
        return model(xa)


# ------------------------------------------------------------------------------------------ ch. 6
def check_guide_reference(fn) -> None:
    """Task: ``guide_reference(guide, x)`` = softmax(g(x)) in eval mode, without a graph, mode restored."""
    task = "guide_reference"
    with _sandbox(task, fn):
        for i, (b, c, mode) in enumerate([(8, 10, "train"), (1, 10, "eval"), (6, 100, "train")]):
            g = _gen(1600 + i)
            guide, x = _cnn(c, 1650 + i), _images(g, b)
            mods = _copies({"guide": guide}, mode)
            modes, bn = _modes(mods["guide"]), _bn_state(mods["guide"])
            calls = []
            h = mods["guide"].register_forward_pre_hook(lambda m, inp: calls.append(torch.is_grad_enabled()))
            try:
                out = _call(task, fn, mods["guide"], x.clone())
            finally:
                h.remove()
            _check_modes(task, {"guide": modes}, mods)
            if _bn_changed(bn, mods["guide"]):
                _fail(task, "the guide ran in train mode: BatchNorm used the batch's statistics and updated its "
                            "running averages; compute p_g(x) in eval mode (`with attacks.eval_mode(guide):`)")
            if len(calls) != 1:
                _fail(task, f"the guide ran {len(calls)} times; one forward pass g(x) is all p_g(x) needs")
            if calls[0]:
                _fail(task, "the guide's forward pass ran with gradients enabled: compute p_g(x) under "
                            "torch.no_grad() (a .detach() afterwards still builds and throws away a graph)")
            if not isinstance(out, torch.Tensor) or out.shape != (b, c):
                _fail(task, f"return a (batch, classes) = {(b, c)} tensor of probabilities; got "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            if out.requires_grad:
                _fail(task, "your p_g(x) carries a graph (requires_grad=True); it is a constant for the attack")
            with attacks.eval_mode(guide), torch.no_grad():
                z = guide(x)
            ref = F.softmax(z, dim=1)
            if torch.allclose(out, ref, atol=1e-6):
                continue
            for message, v in [
                ("you returned the logits g(x); the reference is the probability vector softmax(g(x), dim=1)", z),
                ("you returned log-probabilities; CAG's reference is the probability vector softmax(g(x), dim=1)",
                 F.log_softmax(z, dim=1)),
                ("you took the softmax over the batch (dim=0); probabilities are over the classes: dim=1",
                 F.softmax(z, dim=0)),
            ]:
                if torch.allclose(out, v, atol=1e-6) and not torch.allclose(v, ref, atol=1e-6):
                    _fail(task, message)
            if not torch.allclose(out.sum(1), torch.ones(b), atol=1e-4):
                _fail(task, "the rows of your p_g(x) do not sum to 1: return softmax(g(x), dim=1)")
            _fail(task, f"your p_g(x) differs from softmax(g(x)) in eval mode (max |Δ| = "
                        f"{(out - ref).abs().max().item():.3g})")
        _passed(task, "softmax(g(x)) from one forward pass in eval mode under torch.no_grad(), mode restored "
                      "(3 trials)")


def check_cag(fn) -> None:
    """Task: ``cag(target, guide, x, eps, step_size, steps)``: the collaborative adversarial generation of D2R."""
    def ref_guide(mods, x):
        return _p_clean(mods["guide"], x)

    def cag_obj(mods, x, reverse=False):
        p = ref_guide(mods, x)
        if reverse:
            return lambda z: losses.official_k(F.softmax(z, dim=1), torch.log(p)).sum()
        return lambda z: attacks.official_kl_sum(p, z)

    def wrong(reverse=False, **kw):
        options = {"start": "gaussian", **kw}
        return lambda mods, x, y, k: _wrong_attack(mods["target"], x, cag_obj(mods, x, reverse), **k, **options)

    def lib_pgd(start):
        return lambda mods, x, y, k: attacks.pgd(mods["target"], x, objective="kl", start=start,
                                                 reference=ref_guide(mods, x), **k)

    def objective(mods, x, y, xa):
        return attacks.official_kl_sum(ref_guide(mods, x), _p_logits(mods["target"], xa)).item()

    _run_attack_check(_AttackSpec(
        task="cag", norm="linf", random=True, cases=_attack_cases("kl"), guide_once=True,
        learner=lambda fn, mods, x, y, k: fn(mods["target"], mods["guide"], x, k["eps"], k["step_size"], k["steps"]),
        library=lambda mods, x, y, k: attacks.cag(mods["target"], mods["guide"], x, **k),
        objective=objective,
        variants=[
            ("you used the target's own p_f(x) as the reference: that is TRADES/LBGAT generation. CAG's reference "
             "is the guide's clean prediction p_g(x)",
             lambda mods, x, y, k: attacks.trades_attack(mods["target"], x, **k)),
            ("you started from a uniformly random point of the ε-ball; CAG starts at x + 0.001·N(0, I) "
             "(x + 0.001 * torch.randn_like(x))", lib_pgd("uniform")),
            ("no random start: CAG starts at x + 0.001·N(0, I)", lib_pgd("clean")),
            ("KL direction reversed: you ascended KL(p_f(x′) ‖ p_g(x)) (the direction of D2R's training term); CAG "
             "ascends KL(p_g(x) ‖ p_f(x′))", wrong(reverse=True)),
            ("you stepped along the raw gradient α·∇; CAG steps along its sign: α·sign(∇)", wrong(step="grad")),
            ("your steps go *down* the KL; CAG ascends it", wrong(descend=True)),
        ],
        passed="x + 0.001·N(0, I), sign steps on Σ KL(p_g(x) ‖ p_f(x′)), p_g(x) once without a graph, both models "
               "in eval mode and restored, projection, [0, 1], detached, as attacks.cag (3 trials)"), fn)


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
    with _sandbox(task, fn):
        for trial, (b, beta) in enumerate([(8, 6.0), (4, 2.0)]):
            g = _gen(1700 + trial)
            x, y = _images(g, b), _labels(g, b, 10)
            base_t = _cnn(10, 1750 + trial, width=4)
            base_g = _cnn(10, 1760 + trial, width=4) if info["guide"] else None
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
            counts0 = {"target": _bn_count(t_l), "guide": _bn_count(g_l) if g_l is not None else 0}
            torch.manual_seed(1800 + trial)
            args = (t_l, g_l, opt_l, x.clone(), y.clone()) if info["guide"] else (t_l, opt_l, x.clone(), y.clone())
            ret = _call(task, fn, *args, **k)
            t_r, g_r, opt_r = fresh()
            torch.manual_seed(1800 + trial)
            want = methods.train_step(method, t_r, g_r, opt_r, x, y, **k)["loss"]
            got = _as_float(task, ret.item() if isinstance(ret, torch.Tensor) and ret.numel() == 1 else ret,
                            "the loss")
            bn_problem = None
            for role, model, ref_model in [("target", t_l, t_r), ("guide", g_l, g_r)]:
                if model is None or bn_problem:
                    continue
                n, m = _bn_count(model) - counts0[role], _bn_count(ref_model) - counts0[role]
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
            if not _close(got, want, 1e-4, 1e-5):
                for message, attack, loss_fn in _step_variants(method):
                    t_v, g_v, opt_v = fresh()
                    torch.manual_seed(1800 + trial)
                    v = _manual_step(t_v, g_v, opt_v, x, y, k, attack, loss_fn)
                    if _close(got, v, 1e-4, 1e-5) and not _close(v, want, 1e-4, 1e-5):
                        _fail(task, message)
            if bn_problem:
                _fail(task, bn_problem)
            if not _close(got, want, 1e-4, 1e-5):
                _fail(task, f"your loss {got:.6g} differs from the library's {want:.6g} for the same batch and "
                            f"random seed (methods.train_step({method!r}, ...)); use the library's attack "
                            f"(it draws the random start the same way) and compare your loss term by term")
            if _max_diff(params_l, _params(base_t, base_g)) == 0:
                _fail(task, "your step did not change the parameters: call loss.backward(), then optimizer.step()")
            if _max_diff(params_l, params_r) > 1e-5:
                t_v, g_v, opt_v = fresh()
                torch.manual_seed(1800 + trial)
                _manual_step(t_v, g_v, opt_v, x, y, k, _lib_adv(method), _lib_loss(method), zero_grad=False)
                if _max_diff(params_l, _params(t_v, g_v)) <= 1e-5:
                    _fail(task, "you forgot optimizer.zero_grad(): gradients left from the previous step were "
                                "added to this one")
                _fail(task, f"your loss is right but the parameters after your step differ from the library's "
                            f"(max |Δ| = {_max_diff(params_l, params_r):.3g}): zero the gradients, then exactly one "
                            f"loss.backward() and one optimizer.step() with the optimizer passed in")
        _passed(task, f"same loss and same parameters after one step as methods.train_step({method!r}, ...) "
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


def check_make_optimizer(fn) -> None:
    """Task: ``make_optimizer(target, guide)``: one SGD over both models with the official hyperparameters."""
    task = "make_optimizer"
    with _sandbox(task, fn):
        t, g = _cnn(10, 1900, width=4), _cnn(10, 1901, width=4)
        opt = _call(task, fn, t, g)
        ref = methods.make_optimizer(t, g)
        if not isinstance(opt, torch.optim.Optimizer):
            _fail(task, f"return a torch.optim optimizer; got {type(opt).__name__}")
        if not isinstance(opt, type(ref)):
            _fail(task, f"you built {type(opt).__name__}; the official code uses torch.optim.SGD")
        ids = [id(p) for group in opt.param_groups for p in group["params"]]
        if len(ids) != len(set(ids)):
            _fail(task, "a parameter appears twice in your optimizer")
        for role, model in [("target", t), ("guide", g)]:
            missing = sum(id(p) not in set(ids) for p in model.parameters())
            if missing:
                _fail(task, f"{missing} of the {role}'s parameter tensors are not in the optimizer: LBGAT/D2R train "
                            f"target *and* guide with one SGD over [target.parameters(), guide.parameters()]")
        want = ref.param_groups[0]
        names = {"lr": "the learning rate lr", "momentum": "momentum", "weight_decay": "weight_decay",
                 "nesterov": "nesterov", "dampening": "dampening"}
        for group in opt.param_groups:
            for key, label in names.items():
                if group.get(key) != want[key]:
                    extra = " (5e-4 is a common default, but LBGAT and D2R use 2e-4)" if key == "weight_decay" else ""
                    _fail(task, f"{label} = {group.get(key)!r}; the official code uses {want[key]!r}{extra}")
        _passed(task, f"SGD over target and guide, lr {want['lr']}, momentum {want['momentum']}, weight decay "
                      f"{want['weight_decay']}, no Nesterov, as methods.make_optimizer")


# ================================================================================================
# Evaluation
# ================================================================================================
def _eval_setup(seed: int, b: int, c: int = 10, contrast: float = 0.04):
    """BatchNorm (identity in eval mode) + a nearest-prototype classifier, images near the prototypes and
    labels 15 % wrong: honest gradients, clean accuracy ≈ 85 %, and FGSM/PGD at ε = 0.05 change it."""
    g = _gen(seed)
    proto = (0.5 + contrast * torch.randn(c, 3, 8, 8, generator=g)).clamp(0, 1)
    y = torch.randint(0, c, (b,), generator=g)
    x = (proto[y] + 0.02 * torch.randn(b, 3, 8, 8, generator=g)).clamp(0, 1)
    model = nn.Sequential(nn.BatchNorm2d(3), _Prototype(proto))
    flip = torch.rand(b, generator=g) < 0.15
    return model, x, torch.where(flip, (y + 1) % c, y)


def _eval_common(task, fn_call, model, mode):
    """Call the learner on a copy of `model` in `mode`; check the mode is restored and BatchNorm untouched."""
    mods = _copies({"model": model}, mode)
    modes, bn = {"model": _modes(mods["model"])}, _bn_state(mods["model"])
    out = fn_call(mods["model"])
    _check_modes(task, modes, mods)
    if _bn_changed(bn, mods["model"]):
        _fail(task, "the model ran in train mode: BatchNorm used the batch's statistics and updated its running "
                    "averages; evaluate in eval mode (`with attacks.eval_mode(model):`)")
    return out


def _check_fraction(task, got, want, *, clean=None, what="accuracy"):
    if _close(got, want, 0, 1e-6):
        return
    if _close(got, 100 * want, 0, 1e-4):
        _fail(task, f"you returned a percentage ({got:.4g}); return the {what} as a fraction in [0, 1]")
    if _close(got, 1 - want, 0, 1e-6):
        _fail(task, f"you returned the error rate (1 − {what}): {got:.4g} instead of {want:.4g}")
    if clean is not None and _close(got, clean, 0, 1e-6) and not _close(clean, want, 0, 1e-6):
        _fail(task, f"you measured the clean accuracy ({clean:.4g}); the {what} is measured on the attacked "
                    f"images x′")


def check_accuracy(fn) -> None:
    """Task: ``accuracy(model, x, y)`` → fraction of correct predictions, eval mode, no graph, mode restored."""
    task = "accuracy"
    with _sandbox(task, fn):
        for i, (b, mode) in enumerate([(32, "train"), (1, "eval"), (50, "train")]):
            model, x, y = _eval_setup(2000 + i, b)
            grad_calls = []

            def call(m):
                h = m.register_forward_pre_hook(lambda mod, inp: grad_calls.append(torch.is_grad_enabled()))
                try:
                    return _call(task, fn, m, x.clone(), y.clone())
                finally:
                    h.remove()

            out = _eval_common(task, call, model, mode)
            got = _as_float(task, out)
            if any(grad_calls):
                _fail(task, "your forward pass ran with gradients enabled: evaluate under torch.no_grad() (no graph, "
                            "less memory)")
            want = _accuracy(model, x, y)
            _check_fraction(task, got, want)
            if not _close(got, want, 0, 1e-6):
                _fail(task, f"your accuracy {got:.4g} differs from the library's {want:.4g} (batch {b}): count "
                            f"argmax(model(x), dim=1) == y and divide by the batch size")
        _passed(task, "fraction of argmax(f(x)) == y in eval mode under torch.no_grad(), mode restored (3 trials)")


def check_robust_accuracy(fn) -> None:
    """Task: ``robust_accuracy(model, x, y, *, eps, step_size, steps)`` = accuracy on attacks.pgd's x′."""
    task = "robust_accuracy"
    with _sandbox(task, fn):
        for i, (b, mode, k) in enumerate([(32, "train", dict(eps=0.05, step_size=0.05 / 3, steps=4)),
                                          (1, "eval", dict(eps=0.05, step_size=0.02, steps=3)),
                                          (40, "train", dict(eps=0.05, step_size=0.05 / 3, steps=4))]):
            model, x, y = _eval_setup(2100 + i, b)
            torch.manual_seed(2150 + i)
            out = _eval_common(task, lambda m: _call(task, fn, m, x.clone(), y.clone(), **k), model, mode)
            got = _as_float(task, out)
            torch.manual_seed(2150 + i)
            want = _accuracy(model, attacks.pgd(model, x, y, **k), y)
            clean = _accuracy(model, x, y)
            _check_fraction(task, got, want, clean=clean, what="robust accuracy")
            if not _close(got, want, 0, 1e-6):
                fgsm = _accuracy(model, attacks.fgsm(model, x, y, eps=k["eps"]), y)
                if _close(got, fgsm, 0, 1e-6):
                    _fail(task, f"you attacked with FGSM ({got:.4g}); robust accuracy here is under PGD "
                                f"(attacks.pgd with the given eps, step_size and steps): {want:.4g}")
                _fail(task, f"your robust accuracy {got:.4g} differs from the library's {want:.4g} (clean "
                            f"{clean:.4g}): call attacks.pgd(model, x, y, eps=eps, step_size=step_size, steps=steps) "
                            f"once, then the accuracy on x′ in eval mode")
        _passed(task, "accuracy on attacks.pgd's x′, eval mode, mode restored, as a fraction (3 trials)")


def _recording_attack(log: list):
    def attack(model, x, y, eps):
        log.append((model, x.detach().clone(), float(eps)))
        return attacks.fgsm(model, x, y, eps=eps)
    return attack


def check_eps_sweep(fn) -> None:
    """Task: ``eps_sweep(model, x, y, attack, eps_values)`` → one accuracy per ε (attack called on clean x)."""
    task = "eps_sweep"
    with _sandbox(task, fn):
        for i, (b, eps_values) in enumerate([(32, [0.0, 0.02, 0.05, 0.1]), (16, [0.05, 0.01, 0.2])]):
            model, x, y = _eval_setup(2200 + i, b)
            log = []
            out = _eval_common(task, lambda m: _call(task, fn, m, x.clone(), y.clone(), _recording_attack(log),
                                                     list(eps_values)), model, "train")
            if isinstance(out, torch.Tensor):
                out = out.tolist()
            try:
                values = [float(v) for v in out]
            except TypeError:
                _fail(task, f"return a list of accuracies, one per ε; got {type(out).__name__}")
            if len(values) != len(eps_values):
                _fail(task, f"you returned {len(values)} values for {len(eps_values)} ε values: one accuracy per ε")
            if len(log) != len(eps_values):
                _fail(task, f"you called the attack {len(log)} times for {len(eps_values)} ε values: once per ε")
            got_eps = [e for _, _, e in log]
            if any(not _close(a, e, 0, 1e-12) for a, e in zip(got_eps, eps_values)):
                _fail(task, f"you called the attack with ε = {[round(e, 5) for e in got_eps]}; the sweep's values "
                            f"are {[round(e, 5) for e in eps_values]}, in that order")
            for j, (m, xx, _) in enumerate(log):
                if not torch.equal(xx, x):
                    _fail(task, "you attacked the previous ε's adversarial images (x′ accumulates over the sweep); "
                                "attack the clean x at every ε")
            want = [_accuracy(model, attacks.fgsm(model, x, y, eps=e), y) for e in eps_values]
            clean = _accuracy(model, x, y)
            for e, a, w in zip(eps_values, values, want):
                _check_fraction(task, a, w, clean=clean)
                if not _close(a, w, 0, 1e-6):
                    _fail(task, f"at ε = {e:.4g} your accuracy is {a:.4g}, the library's {w:.4g}: evaluate "
                                f"model(attack(model, x, y, ε)) in eval mode")
        _passed(task, "one accuracy per ε, the attack called once per ε on the clean images, eval mode (2 trials)")


def check_transfer_accuracy(fn) -> None:
    """Task: ``transfer_accuracy(source, target, x, y, attack, eps)``: the target's accuracy on x′ made on source."""
    task = "transfer_accuracy"
    with _sandbox(task, fn):
        for i, (b, eps) in enumerate([(32, 0.05), (20, 0.04)]):
            target, x, y = _eval_setup(2300 + i, b)
            source, _, _ = _eval_setup(2300 + i, b)
            with torch.no_grad():             # a source whose prototypes differ a little from the target's
                mu = source[1].mu
                mu.add_(0.03 * torch.randn(mu.shape, generator=_gen(2350 + i))).clamp_(0, 1)
            log = []
            src = copy.deepcopy(source).eval()
            out = _eval_common(task, lambda m: _call(task, fn, src, m, x.clone(), y.clone(), _recording_attack(log),
                                                     eps), target, "train")
            got = _as_float(task, out)
            if any(m is not src for m, _, _ in log):
                _fail(task, "you attacked the target itself (white-box); a transfer attack crafts x′ on the source "
                            "model and evaluates the target on it")
            if len(log) != 1:
                _fail(task, f"you called the attack {len(log)} times; once is enough: x′ = attack(source, x, y, eps)")
            x_src = attacks.fgsm(source, x, y, eps=eps)
            want = _accuracy(target, x_src, y)
            _check_fraction(task, got, want, clean=_accuracy(target, x, y), what="transfer accuracy")
            if not _close(got, want, 0, 1e-6):
                if _close(got, _accuracy(source, x_src, y), 0, 1e-6):
                    _fail(task, "you evaluated the source model on its own adversarial examples; the transfer "
                                "accuracy is the *target's* accuracy on them")
                _fail(task, f"your transfer accuracy {got:.4g} differs from the library's {want:.4g}")
        _passed(task, "the target's accuracy on x′ crafted on the source, eval mode (2 trials)")


# ------------------------------------------------------------------------------ gradient masking
class _Prototype(nn.Module):
    """A linear nearest-prototype classifier: logits_c = ⟨x, μ_c⟩ − ‖μ_c‖²/2 (honest gradients)."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", prototypes.flatten(1).clone())

    def forward(self, x):
        return x.flatten(1) @ self.mu.T - 0.5 * (self.mu ** 2).sum(1)


class _Quantised(nn.Module):
    """Rounds the input to a few grey levels first: torch.round's gradient is zero, so the gradient vanishes."""

    def __init__(self, inner: nn.Module, levels: int = 4):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner(torch.round(x * self.levels) / self.levels)


class _SoftmaxOut(nn.Module):
    """Returns softmax(T·logits) as its "logits": saturated, so the gradient of any loss on it is ~0."""

    def __init__(self, inner: nn.Module, temperature: float = 1000.0):
        super().__init__()
        self.inner, self.temperature = inner, temperature

    def forward(self, x):
        return F.softmax(self.temperature * self.inner(x), dim=1)


def _masking_zoo(seed: int):
    g = _gen(seed)
    c, size, n = 10, 8, 60
    proto = 0.2 + 0.6 * torch.rand(c, 3, size, size, generator=g)
    y = torch.arange(n) % c
    x = (proto[y] + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    surrogate = _Prototype((proto + 0.1 * torch.randn(proto.shape, generator=g)).clamp(0, 1))
    pooled = nn.Sequential(nn.AvgPool2d(2), _Prototype(F.avg_pool2d(proto, 2)))
    zoo = {
        "linear (honest)": (_Prototype(proto), False),
        "pooled linear (honest)": (pooled, False),
        "quantised input (torch.round)": (_Quantised(_Prototype(proto)), True),
        "softmax output ×1000": (_SoftmaxOut(_Prototype(proto)), True),
    }
    return zoo, x, y, surrogate


def check_gradient_masking(fn) -> None:
    """Task: ``looks_gradient_masked(model, x, y, surrogate)`` → True for gradient-masked models only."""
    task = "looks_gradient_masked"
    with _sandbox(task, fn):
        zoo, x, y, surrogate = _masking_zoo(2400)
        for name, (model, masked) in zoo.items():
            verdict = _call(task, fn, model, x.clone(), y.clone(), surrogate)
            if not isinstance(verdict, bool) and type(verdict).__name__ not in ("bool_", "bool"):
                _fail(task, f"return True or False; got {type(verdict).__name__} for {name!r}")
            if bool(verdict) == masked:
                continue
            eps = 0.3
            pgd = attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10)
            clean, white = _accuracy(model, x, y), _accuracy(model, pgd, y)
            transfer = _accuracy(model, attacks.pgd(surrogate, x, y, eps=eps, step_size=eps / 4, steps=10), y)
            if masked:
                _fail(task, f"you did not flag {name!r}: white-box PGD leaves its accuracy at {white:.0%} (clean "
                            f"{clean:.0%}) even at ε = {eps}, while PGD on the surrogate transfers to {transfer:.0%} "
                            f"— its gradients are (almost) zero, so gradient attacks cannot move: compare the "
                            f"white-box attack with a transfer or random-noise attack, and check that accuracy "
                            f"falls towards 0 at large ε")
            _fail(task, f"you flagged the honest model {name!r}: white-box PGD takes it from {clean:.0%} to "
                        f"{white:.0%} at ε = {eps} (a transfer attack from the surrogate: {transfer:.0%}) — a "
                        f"robust-looking number is not masking unless a weaker attack does better than the "
                        f"white-box one")
        _passed(task, f"flags exactly the gradient-masked models among {len(zoo)} ({', '.join(zoo)})")
