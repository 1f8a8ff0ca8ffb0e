"""Comparing a learner's loss with the library's: value, gradients, the common wrong variants."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import losses
from .harness import call_learner, close, fail, generator, passed, sandbox

__all__ = ["Variant", "LossSpec", "run_loss_check", "GradientSpec", "run_gradient_check",
           "rand_logits", "SHAPES", "exact_kl_mean", "kbar"]


# ================================================================================================
# Losses: one framework
# ================================================================================================
@dataclass
class Variant:
    message: str  # may use {B}, {C}, {got}, {want}
    fn: Callable  # same arguments as the reference; returns a tensor or None (n/a)


@dataclass
class LossSpec:
    task: str
    names: tuple[str, ...]  # positional argument names
    reference: Callable
    make_case: Callable  # trial -> (args tuple, kwargs dict)
    variants: list[Variant]
    trials: int
    grad_names: tuple[str, ...]  # inputs whose gradient must match the library's
    grad_hints: dict = field(default_factory=dict)
    passed: str = ""
    rtol: float = 1e-8  # float64 inputs: a different but equivalent formula agrees to ~1e-14
    atol: float = 1e-12


def _prepare(spec: LossSpec, args):
    """Separate copies of the case's arguments for the learner and the library; the leaves whose
    gradients are compared, as (name, learner's, library's)."""
    learner_args, ref_args, leaves = [], [], []
    for name, a in zip(spec.names, args):
        la, ra = (a.clone() if isinstance(a, torch.Tensor) else a), a
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            grad = name in spec.grad_names
            la, ra = (a.detach().clone().requires_grad_(grad) for _ in range(2))
            if grad:
                leaves.append((name, la, ra))
        learner_args.append(la)
        ref_args.append(ra)
    return learner_args, ref_args, leaves


def _learner_value(task: str, spec: LossSpec, fn, learner_args, kwargs, info):
    """The learner's loss on the case: a finite 0-dim tensor that left its inputs alone."""
    tensors = [(n, a) for n, a in zip(spec.names, learner_args) if isinstance(a, torch.Tensor)]
    snapshots = [a.detach().clone() for _, a in tensors]
    out = call_learner(task, fn, *learner_args, **kwargs)
    if not isinstance(out, torch.Tensor):
        fail(task, f"your function returned {type(out).__name__}; return the loss as a torch tensor (a 0-dim scalar; .item() or float() would cut the graph)")
    if out.dim() != 0:
        fail(task, f"your function returned a tensor of shape {tuple(out.shape)}; the loss is one 0-dim scalar: reduce over the batch (and the classes)")
    for (name, a), before in zip(tensors, snapshots):
        if not torch.equal(a.detach(), before):
            fail(task, f"your function modified its input `{name}` in place; compute new tensors instead")
    if not math.isfinite(out.item()):
        fail(task, f"your function returned {out.item()} (batch {info['B']}, {info['C']} classes); expected a finite value: check for log(0) or a division by zero")
    return out


def _wrong_value(task: str, spec: LossSpec, ref_args, kwargs, info) -> None:
    """The learner's value is not the library's: name the known mistake it matches, if any."""
    got, want = info["got"], info["want"]
    with torch.no_grad():
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in ref_args]
        for v in spec.variants:
            val = v.fn(*plain, **kwargs)
            if val is not None and close(got, float(val), spec.rtol, spec.atol) and not close(
                    float(val), want, spec.rtol, spec.atol):
                fail(task, v.message.format_map(info))
    extra = "".join(f", {k}={v}" for k, v in kwargs.items())
    fail(task, f"your value {got:.8g} differs from the library's {want:.8g} (batch {info['B']}, {info['C']} classes{extra}); none of the common mistakes this check knows matches, so compare your formula with the task's statement term by term")


def _compare_gradients(task: str, spec: LossSpec, out, expected, leaves) -> None:
    if not out.requires_grad:
        fail(task, "your loss carries no graph (requires_grad=False), so training could not backpropagate through it: don't use .item(), .detach(), numpy or torch.no_grad() inside")
    g_l = torch.autograd.grad(out, [la for _, la, _ in leaves], allow_unused=True)
    g_r = torch.autograd.grad(expected, [ra for _, _, ra in leaves], allow_unused=True)
    for (name, _, _), gl, gr in zip(leaves, g_l, g_r):
        hint = spec.grad_hints.get(name, "")
        if gr is None or not gr.abs().gt(0).any():
            if gl is not None and gl.abs().gt(1e-12).any():
                fail(task, f"gradient flows into `{name}`, which the library's loss does not depend on")
            continue
        if gl is None or not gl.abs().gt(0).any():
            fail(task, f"no gradient reaches `{name}`: the loss must backpropagate into it (don't .detach() it, don't go through numpy or .item(), no torch.no_grad()). {hint}".strip())
        if not torch.allclose(gl, gr, rtol=1e-5, atol=1e-9):
            diff = (gl - gr).abs().max().item()
            fail(task, f"your value is right but the gradient w.r.t. `{name}` differs from the library's (max |Δ| = {diff:.3g}): did you .detach() part of a term? {hint}".strip())


def run_loss_check(spec: LossSpec, fn) -> None:
    """Run the learner's loss `fn` on every trial of `spec`: value, then gradients."""
    task = spec.task
    with sandbox(task, fn):
        for trial in range(spec.trials):
            args, kwargs = spec.make_case(trial)
            first = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            info = {"B": first.shape[0], "C": first.shape[1]}
            learner_args, ref_args, leaves = _prepare(spec, args)
            out = _learner_value(task, spec, fn, learner_args, kwargs, info)
            expected = spec.reference(*ref_args, **kwargs)
            info.update(got=out.item(), want=expected.item())
            if not close(info["got"], info["want"], spec.rtol, spec.atol):
                _wrong_value(task, spec, ref_args, kwargs, info)
            if leaves:
                _compare_gradients(task, spec, out, expected, leaves)
        passed(task, spec.passed)


@dataclass(frozen=True)
class GradientSpec:
    """A derive-the-gradient task: fn(a, b) returns ∂ loss(a, b) / ∂ b, compared with autograd on
    standard-normal a, b of shape (B, C) for three (B, C)."""
    task: str
    names: tuple[str, str]  # the argument names; the gradient is w.r.t. the second
    loss: Callable  # (a, b) -> scalar
    seed_scale: int  # case (B, C) draws from generator(seed_scale·B + C)
    mistakes: list  # (wrong(want, a, b) -> tensor, message with {B} and {C}, (rtol, atol))
    passed: str


def run_gradient_check(spec: GradientSpec, fn) -> None:
    task = spec.task
    with sandbox(task, fn):
        for b, c in ((4, 10), (7, 3), (16, 100)):
            g = generator(spec.seed_scale * b + c)
            z1, z2 = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)
            leaf = z2.clone().requires_grad_(True)
            spec.loss(z1, leaf).backward()
            want = leaf.grad
            got = call_learner(task, fn, z1.clone(), z2.clone())
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                fail(task, f"return a tensor shaped like {spec.names[1]} {tuple(want.shape)}; got {getattr(got, 'shape', type(got).__name__)}")
            if torch.allclose(got, want, atol=1e-6):
                continue
            for wrong, message, (rtol, atol) in spec.mistakes:
                if torch.allclose(got, wrong(want, z1, z2), rtol=rtol, atol=atol):
                    fail(task, message.format(B=b, C=c))
            fail(task, f"at B = {b}, C = {c} your gradient differs from autograd's by up to {(got - want).abs().max().item():.3g}")
        passed(task, spec.passed)


def rand_logits(g: torch.Generator, b: int, c: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=g, dtype=torch.float64)


# (batch, classes, logit scale) per trial: batch 1, 10 and 100 classes, flat and peaked
# distributions
SHAPES = [(8, 10, 1.0), (1, 10, 2.0), (16, 100, 1.5), (5, 100, 0.7), (32, 10, 4.0), (3, 10, 0.3)]


def exact_kl_mean(p, log_q):
    """The exact KL summand p·(log p − log q) averaged over batch × classes (no +1e-5)."""
    return (p * (torch.log(p) - log_q)).mean()


def kbar(z_p, z_q, reduction="mean"):
    """K̄L(softmax(z_p) ‖ softmax(z_q)) via the library's official_kl."""
    return losses.official_kl(F.softmax(z_p, dim=1), F.log_softmax(z_q, dim=1), reduction)
