"""Checks of exercise notebook 8 (chapter 8): accuracy, ε sweeps, transfer attacks, gradient
masking."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks
from .harness import (
    Prototype,
    as_float,
    call_learner,
    close,
    eval_common,
    eval_setup,
    fail,
    fraction_verdict,
    generator,
    library_accuracy,
    passed,
    sandbox,
)

__all__ = ["check_accuracy", "check_eps_sweep", "check_transfer_accuracy", "check_gradient_masking",
           "check_bpda_attack", "check_logit_attack"]


def check_accuracy(fn) -> None:
    """Task: ``accuracy(model, x, y)`` → fraction of correct predictions, eval mode, no graph, mode
    restored."""
    task = "accuracy"
    with sandbox(task, fn):
        for i, (b, mode) in enumerate([(32, "train"), (1, "eval"), (50, "train")]):
            model, x, y = eval_setup(2000 + i, b)
            grad_calls = []

            def call(m, x=x, y=y, grad_calls=grad_calls):
                h = m.register_forward_pre_hook(
                    lambda mod, inp: grad_calls.append(torch.is_grad_enabled())
                )
                try:
                    return call_learner(task, fn, m, x.clone(), y.clone())
                finally:
                    h.remove()

            out = eval_common(task, call, model, mode)
            got = as_float(task, out)
            if any(grad_calls):
                fail(task, "your forward pass ran with gradients enabled: evaluate under torch.no_grad() (no graph, less memory)")
            want = library_accuracy(model, x, y)
            fraction_verdict(task, got, want)
            if not close(got, want, 0, 1e-6):
                fail(task, f"your accuracy {got:.4g} differs from the library's {want:.4g} (batch {b}): count argmax(model(x), dim=1) == y and divide by the batch size")
        passed(task, "fraction of argmax(f(x)) == y in eval mode under torch.no_grad(), mode restored (3 trials)")


def _recording_attack(log: list):
    def attack(model, x, y, eps):
        log.append((model, x.detach().clone(), float(eps)))
        return attacks.fgsm(model, x, y, eps=eps)

    return attack


def check_eps_sweep(fn) -> None:
    """Task: ``eps_sweep(model, x, y, attack, eps_values)`` → one accuracy per ε (attack called on
    clean x)."""
    task = "eps_sweep"
    with sandbox(task, fn):
        for i, (b, eps_values) in enumerate(
            [(32, [0.0, 0.02, 0.05, 0.1]), (16, [0.05, 0.01, 0.2])]
        ):
            model, x, y = eval_setup(2200 + i, b)
            log = []
            out = eval_common(
                task,
                lambda m, x=x, y=y, log=log, eps_values=eps_values: call_learner(
                    task, fn, m, x.clone(), y.clone(), _recording_attack(log), list(eps_values)
                ),
                model,
                "train",
            )
            if isinstance(out, torch.Tensor):
                out = out.tolist()
            try:
                values = [float(v) for v in out]
            except TypeError:
                fail(task, f"return a list of accuracies, one per ε; got {type(out).__name__}")
            if len(values) != len(eps_values):
                fail(task, f"you returned {len(values)} values for {len(eps_values)} ε values: one accuracy per ε")
            if len(log) != len(eps_values):
                fail(task, f"you called the attack {len(log)} times for {len(eps_values)} ε values: once per ε")
            got_eps = [e for _, _, e in log]
            if any(not close(a, e, 0, 1e-12) for a, e in zip(got_eps, eps_values)):
                fail(task, f"you called the attack with ε = {[round(e, 5) for e in got_eps]}; the sweep's values are {[round(e, 5) for e in eps_values]}, in that order")
            for _, xx, _ in log:
                if not torch.equal(xx, x):
                    fail(task, "you attacked the previous ε's adversarial images (x′ accumulates over the sweep); attack the clean x at every ε")
            want = [
                library_accuracy(model, attacks.fgsm(model, x, y, eps=e), y) for e in eps_values
            ]
            clean = library_accuracy(model, x, y)
            for e, a, w in zip(eps_values, values, want):
                fraction_verdict(task, a, w, clean=clean)
                if not close(a, w, 0, 1e-6):
                    fail(task, f"at ε = {e:.4g} your accuracy is {a:.4g}, the library's {w:.4g}: evaluate model(attack(model, x, y, ε)) in eval mode")
        passed(task, "one accuracy per ε, the attack called once per ε on the clean images, eval mode (2 trials)")


def check_transfer_accuracy(fn) -> None:
    """Task: ``transfer_accuracy(source, target, x, y, attack, eps)``: the target's accuracy on x′
    made on source."""
    task = "transfer_accuracy"
    with sandbox(task, fn):
        for i, (b, eps) in enumerate([(32, 0.05), (20, 0.04)]):
            target, x, y = eval_setup(2300 + i, b)
            source, _, _ = eval_setup(2300 + i, b)
            with torch.no_grad():  # a source whose prototypes differ a little from the target's
                mu = source[1].mu
                mu.add_(0.03 * torch.randn(mu.shape, generator=generator(2350 + i))).clamp_(0, 1)
            log = []
            src = copy.deepcopy(source).eval()
            out = eval_common(
                task,
                lambda m, src=src, x=x, y=y, log=log, eps=eps: call_learner(
                    task, fn, src, m, x.clone(), y.clone(), _recording_attack(log), eps
                ),
                target,
                "train",
            )
            got = as_float(task, out)
            if any(m is not src for m, _, _ in log):
                fail(task, "you attacked the target itself (white-box); a transfer attack crafts x′ on the source model and evaluates the target on it")
            if len(log) != 1:
                fail(task, f"you called the attack {len(log)} times; once is enough: x′ = attack(source, x, y, eps)")
            x_src = attacks.fgsm(source, x, y, eps=eps)
            want = library_accuracy(target, x_src, y)
            fraction_verdict(
                task, got, want, clean=library_accuracy(target, x, y), what="transfer accuracy"
            )
            if not close(got, want, 0, 1e-6):
                if close(got, library_accuracy(source, x_src, y), 0, 1e-6):
                    fail(task, "you evaluated the source model on its own adversarial examples; the transfer accuracy is the *target's* accuracy on them")
                fail(
                    task, f"your transfer accuracy {got:.4g} differs from the library's {want:.4g}"
                )
        passed(task, "the target's accuracy on x′ crafted on the source, eval mode (2 trials)")


class _Quantised(nn.Module):
    """Rounds the input to a few grey levels first: torch.round's gradient is zero, so the gradient
    vanishes."""

    def __init__(self, inner: nn.Module, levels: int = 4):
        super().__init__()
        self.inner, self.levels = inner, levels

    def quantise(self, x):
        return torch.round(x * self.levels) / self.levels

    def forward(self, x):
        return self.inner(self.quantise(x))


class _SoftmaxOut(nn.Module):
    """Returns softmax(T·logits) as its "logits": saturated, so the gradient of any loss on it is
    ~0."""

    def __init__(self, inner: nn.Module, temperature: float = 1000.0):
        super().__init__()
        self.inner, self.temperature = inner, temperature

    def forward(self, x):
        return F.softmax(self.temperature * self.inner(x), dim=1)


def _masking_zoo(seed: int):
    g = generator(seed)
    c, size, n = 10, 8, 60
    proto = 0.2 + 0.6 * torch.rand(c, 3, size, size, generator=g)
    y = torch.arange(n) % c
    x = (proto[y] + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    surrogate = Prototype((proto + 0.1 * torch.randn(proto.shape, generator=g)).clamp(0, 1))
    pooled = nn.Sequential(nn.AvgPool2d(2), Prototype(F.avg_pool2d(proto, 2)))
    zoo = {
        "linear (honest)": (Prototype(proto), False),
        "pooled linear (honest)": (pooled, False),
        "quantised input (torch.round)": (_Quantised(Prototype(proto)), True),
        "softmax output ×1000": (_SoftmaxOut(Prototype(proto)), True),
    }
    return zoo, x, y, surrogate


def check_gradient_masking(fn) -> None:
    """Task: ``looks_gradient_masked(model, x, y, surrogate)`` → True for gradient-masked models
    only."""
    task = "looks_gradient_masked"
    with sandbox(task, fn):
        zoo, x, y, surrogate = _masking_zoo(2400)
        for name, (model, masked) in zoo.items():
            verdict = call_learner(task, fn, model, x.clone(), y.clone(), surrogate)
            if not isinstance(verdict, bool) and type(verdict).__name__ not in ("bool_", "bool"):
                fail(task, f"return True or False; got {type(verdict).__name__} for {name!r}")
            if bool(verdict) == masked:
                continue
            eps = 0.3
            pgd = attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10)
            clean, white = library_accuracy(model, x, y), library_accuracy(model, pgd, y)
            transfer = library_accuracy(
                model, attacks.pgd(surrogate, x, y, eps=eps, step_size=eps / 4, steps=10), y
            )
            if masked:
                fail(task, f"you did not flag {name!r}: white-box PGD leaves its accuracy at {white:.0%} (clean {clean:.0%}) even at ε = {eps}, while PGD on the surrogate transfers to {transfer:.0%} — its gradients are (almost) zero, so gradient attacks cannot move: compare the white-box attack with a transfer or random-noise attack, and check that accuracy falls towards 0 at large ε")
            fail(task, f"you flagged the honest model {name!r}: white-box PGD takes it from {clean:.0%} to {white:.0%} at ε = {eps} (a transfer attack from the surrogate: {transfer:.0%}) — a robust-looking number is not masking unless a weaker attack does better than the white-box one")
        passed(
            task, f"flags exactly the gradient-masked models among {len(zoo)} ({', '.join(zoo)})"
        )


# ------------------------------------------------------------------------------------ break it
def _pgd_signed(model, x, y, eps, step_size, steps, forward=None):
    """Plain L∞ PGD from x (no random start) on CE of `forward(x′)` (default: the model's
    output)."""
    forward = forward or model
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(forward(x_adv), y), x_adv)
        x_adv = attacks.project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def _run_break_check(task, fn, kind) -> None:
    """A break-it task: the learner's attack must bring the masked model's accuracy down where PGD
    fails."""
    eps, step_size, steps = 0.2, 0.05, 10
    with sandbox(task, fn):
        zoo, x, y, _ = _masking_zoo(2500)
        model = zoo["quantised input (torch.round)" if kind == "bpda" else "softmax output ×1000"][
            0
        ]
        torch.manual_seed(2550)
        out = call_learner(task, fn, model, x.clone(), y.clone(), eps, step_size, steps)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            fail(task, f"return x′ shaped like x {tuple(x.shape)}")
        out = out.detach()
        if ((out < -1e-6) | (out > 1 + 1e-6)).any():
            fail(task, "your x′ has pixels outside [0, 1]: clamp")
        if (out - x).abs().max().item() > eps + 1e-6:
            fail(task, f"your x′ leaves the ε-ball (max |x′ − x| = {(out - x).abs().max().item():.3g} > ε = {eps}): a break that changes the image more than ε proves nothing")
        clean = library_accuracy(model, x, y)
        mine = library_accuracy(model, out, y)
        plain = library_accuracy(model, _pgd_signed(model, x, y, eps, step_size, steps), y)
        if kind == "bpda":
            ref_x = _pgd_signed(
                model,
                x,
                y,
                eps,
                step_size,
                steps,
                forward=lambda z: model.inner(z + (model.quantise(z) - z).detach()),
            )
        else:
            ref_x = _pgd_signed(model, x, y, eps, step_size, steps, forward=model.inner)
        ref = library_accuracy(model, ref_x, y)
        if mine > ref + 0.25:
            how = ("the gradient of torch.round is zero almost everywhere, so every step is sign(0) = 0. BPDA: run the rounding forward but let the gradient pass as if it were the identity, z + (model.quantise(z) − z).detach(), then attack model.inner on that")
            if kind != "bpda":
                how = ("softmax(1000·z) is saturated: the loss on it has a gradient of about 0. Attack the logits behind it (model.inner) instead: the decision is the same argmax")
            same = " — the same as plain PGD" if abs(mine - plain) < 0.05 else ""
            fail(task, f"the masked model keeps {mine:.0%} accuracy under your attack{same} (clean {clean:.0%}, plain PGD {plain:.0%}, a working break {ref:.0%} at ε = {eps}): {how}")
        passed(task, f"your attack takes the masked model from {clean:.0%} to {mine:.0%} at ε = {eps}, where plain PGD leaves {plain:.0%}: its robustness was gradient masking")


def check_bpda_attack(fn) -> None:
    """Task (break it): ``bpda_pgd(model, x, y, eps, step_size, steps)`` defeats input rounding."""
    _run_break_check("bpda_pgd", fn, "bpda")


def check_logit_attack(fn) -> None:
    """Task (break it): ``logit_pgd(model, x, y, eps, step_size, steps)`` defeats a saturated
    softmax."""
    _run_break_check("logit_pgd", fn, "logits")
