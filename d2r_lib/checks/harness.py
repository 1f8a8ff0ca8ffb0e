"""The checks' shared machinery: run a learner's function on reference inputs, compare, report.

Every ``check_*`` of the exercise notebooks is built from these pieces:

* :func:`sandbox` gives a check its own random state (the notebook's is left alone) and one thread;
  :func:`call_learner` runs the learner's function, letting an unsolved stub's ``NotImplementedError``
  through and turning any other error into a verdict;
* :func:`passed` prints one line starting with ✓, :func:`advise` one starting with 💡 (efficiency or style
  advice: the answer is correct, nothing fails), :func:`fail` raises :class:`CheckFailed` naming the mistake;
* :func:`run_loss_check` compares a loss's value and gradients with the library's and recognises the common
  wrong variants; :func:`run_attack_check` compares an attack with the library's, and when the learner draws
  the random start differently, compares what any correct attack reaches (in the ball, in [0, 1], the
  objective raised about as much as the library's attack raises it).

The reference values come from the library (``attacks``, ``losses``, ``methods``); the wrong variants live
only here, to recognise mistakes. Chapter modules (``ch01`` ... ``ch09``) hold the checks themselves.
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

from .. import attacks, losses, models

__all__ = [
    "CheckFailed",
    "fail",
    "passed",
    "pct",
    "advise",
    "call_learner",
    "sandbox",
    "generator",
    "rand_images",
    "small_cnn",
    "mode_flags",
    "mode_name",
    "bn_state",
    "bn_changed",
    "bn_count",
    "set_mode",
    "copies",
    "assert_modes_restored",
    "library_accuracy",
    "as_float",
    "Variant",
    "LossSpec",
    "close",
    "run_loss_check",
    "rand_logits",
    "rand_labels",
    "exact_kl_mean",
    "kbar",
    "project_wrong",
    "random_start",
    "wrong_attack",
    "ce_sum",
    "AttackCase",
    "AttackSpec",
    "same_image",
    "run_attack_check",
    "attack_cases",
    "ce_objective",
    "p_clean",
    "p_logits",
    "Prototype",
    "eval_setup",
    "eval_common",
    "fraction_verdict",
    "SHAPES",
]


class CheckFailed(AssertionError):
    """Your function disagrees with d2r_lib; the message says how (and, when recognised, which mistake)."""


# ================================================================================================
# Plumbing
# ================================================================================================
def fail(task: str, message: str):
    raise CheckFailed(f"✗ {task}: {message}")


def passed(task: str, detail: str) -> None:
    print(f"✓ {task}: {detail}")


def pct(frac: float) -> str:
    return f"{100 * frac:.3g} %"


def advise(task: str, message: str) -> None:
    """Advice on a correct answer (efficiency, style): printed, never a failure."""
    print(f"💡 {task}: {message}")


def call_learner(task: str, fn: Callable, *args, **kwargs):
    """Run the learner's function; an unsolved stub's NotImplementedError passes through unchanged."""
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - any error of the learner's code becomes a verdict
        raise CheckFailed(f"✗ {task}: your function raised {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def sandbox(task: str, fn):
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


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(g: torch.Generator, b: int, size: int = 16) -> torch.Tensor:
    """Random images in [0, 1] with some pixels exactly 0 or 1 (so a missing clamp shows)."""
    x = torch.rand(b, 3, size, size, generator=g)
    u = torch.rand(b, 3, size, size, generator=g)
    x = torch.where(u < 0.1, torch.zeros_like(x), x)
    return torch.where(u > 0.9, torch.ones_like(x), x)


def small_cnn(num_classes: int = 10, seed: int = 0, width: int = 8) -> nn.Module:
    """A small_cnn (d2r_lib.models.SmallCNN) whose BatchNorm statistics make train and eval mode differ."""
    torch.manual_seed(seed)
    m = models.SmallCNN(num_classes, width=width)
    g = generator(seed + 7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(0.2 * (2 * torch.rand(n, generator=g) - 1))
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(0.2 * (2 * torch.rand(n, generator=g) - 1))
    return m


def mode_flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def mode_name(flags: list[bool]) -> str:
    return "train" if all(flags) else "eval" if not any(flags) else "a mix of train and eval"


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in model.named_buffers()]


def bn_changed(before, model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, bn_state(model)))


def bn_count(model: nn.Module) -> int:
    """Training-mode forward passes seen by the model (its first BatchNorm's num_batches_tracked)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return int(m.num_batches_tracked)
    return 0


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    model.train(mode == "train")
    return model


def copies(base: dict, mode: str) -> dict:
    return {k: set_mode(copy.deepcopy(m), mode) for k, m in base.items()}


def assert_modes_restored(task: str, before: dict, mods: dict) -> None:
    for role, model in mods.items():
        now = mode_flags(model)
        if now != before[role]:
            fail(task, f"your function left the {role} in {mode_name(now)} mode, but it came in "
                        f"{mode_name(before[role])} mode: restore it (`with attacks.eval_mode({role}):` "
                        f"restores every module's mode when the block ends)")


def library_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The library's clean accuracy (d2r_lib.evaluate.accuracy: eval mode, no graph, modes restored)."""
    from ..evaluate import accuracy
    return accuracy(model, x, y)


def as_float(task: str, value, what: str = "the accuracy") -> float:
    if isinstance(value, bool) or value is None:
        fail(task, f"your function returned {value!r}; return {what} as a Python float")
    if isinstance(value, torch.Tensor):
        fail(task, f"your function returned a tensor ({tuple(value.shape)}); return {what} as a Python float "
                    f"(use .item())")
    try:
        out = float(value)
    except (TypeError, ValueError):
        fail(task, f"your function returned {type(value).__name__}; return {what} as a Python float")
    if not math.isfinite(out):
        fail(task, f"your function returned {out}; expected a finite number")
    return out


# ================================================================================================
# Losses: one framework
# ================================================================================================
@dataclass
class Variant:
    message: str                     # may use {B}, {C}, {got}, {want}
    fn: Callable                     # same arguments as the reference; returns a tensor or None (n/a)


@dataclass
class LossSpec:
    task: str
    names: tuple[str, ...]           # positional argument names
    reference: Callable
    make_case: Callable              # trial -> (args tuple, kwargs dict)
    variants: list[Variant]
    trials: int
    grad_names: tuple[str, ...]      # inputs whose gradient must match the library's
    grad_hints: dict = field(default_factory=dict)
    passed: str = ""
    rtol: float = 1e-8          # float64 inputs: a different but equivalent formula agrees to ~1e-14
    atol: float = 1e-12


def close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def run_loss_check(spec: LossSpec, fn) -> None:
    task = spec.task
    with sandbox(task, fn):
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
            out = call_learner(task, fn, *learner_args, **kwargs)
            if not isinstance(out, torch.Tensor):
                fail(task, f"your function returned {type(out).__name__}; return the loss as a torch tensor "
                            f"(a 0-dim scalar; .item() or float() would cut the graph)")
            if out.dim() != 0:
                fail(task, f"your function returned a tensor of shape {tuple(out.shape)}; the loss is one "
                            f"0-dim scalar: reduce over the batch (and the classes)")
            for (name, before), a in zip(snapshots, [a for a in learner_args if isinstance(a, torch.Tensor)]):
                if not torch.equal(a.detach(), before):
                    fail(task, f"your function modified its input `{name}` in place; compute new tensors instead")
            got = out.item()
            if not math.isfinite(got):
                fail(task, f"your function returned {got} (batch {info['B']}, {info['C']} classes); expected a "
                            f"finite value: check for log(0) or a division by zero")
            expected = spec.reference(*ref_args, **kwargs)
            want = expected.item()
            info.update(got=got, want=want)
            if not close(got, want, spec.rtol, spec.atol):
                with torch.no_grad():
                    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in ref_args]
                    for v in spec.variants:
                        val = v.fn(*plain, **kwargs)
                        if val is None:
                            continue
                        val = float(val)
                        if close(got, val, spec.rtol, spec.atol) and not close(val, want, spec.rtol, spec.atol):
                            fail(task, v.message.format_map(info))
                extra = "".join(f", {k}={v}" for k, v in kwargs.items())
                fail(task, f"your value {got:.8g} differs from the library's {want:.8g} (batch {info['B']}, "
                            f"{info['C']} classes{extra}); none of the common mistakes this check knows matches, "
                            f"so compare your formula with the task's statement term by term")
            if not leaves:
                continue
            if not out.requires_grad:
                fail(task, "your loss carries no graph (requires_grad=False), so training could not "
                            "backpropagate through it: don't use .item(), .detach(), numpy or torch.no_grad() inside")
            g_l = torch.autograd.grad(out, [la for _, la, _ in leaves], allow_unused=True)
            g_r = torch.autograd.grad(expected, [ra for _, _, ra in leaves], allow_unused=True)
            for (name, _, _), gl, gr in zip(leaves, g_l, g_r):
                hint = spec.grad_hints.get(name, "")
                ref_zero = gr is None or not gr.abs().gt(0).any()
                if ref_zero:
                    if gl is not None and gl.abs().gt(1e-12).any():
                        fail(task, f"gradient flows into `{name}`, which the library's loss does not depend on")
                    continue
                if gl is None or not gl.abs().gt(0).any():
                    fail(task, f"no gradient reaches `{name}`: the loss must backpropagate into it (don't "
                                f".detach() it, don't go through numpy or .item(), no torch.no_grad()). {hint}".strip())
                if not torch.allclose(gl, gr, rtol=1e-5, atol=1e-9):
                    diff = (gl - gr).abs().max().item()
                    fail(task, f"your value is right but the gradient w.r.t. `{name}` differs from the library's "
                                f"(max |Δ| = {diff:.3g}): did you .detach() part of a term? {hint}".strip())
        passed(task, spec.passed)


def rand_logits(g: torch.Generator, b: int, c: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=g, dtype=torch.float64)


def rand_labels(g: torch.Generator, b: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=g)


# (batch, classes, logit scale) per trial: batch 1, 10 and 100 classes, flat and peaked distributions
SHAPES = [(8, 10, 1.0), (1, 10, 2.0), (16, 100, 1.5), (5, 100, 0.7), (32, 10, 4.0), (3, 10, 0.3)]


def exact_kl_mean(p, log_q):
    """The exact KL summand p·(log p − log q) averaged over batch × classes (no +1e-5)."""
    return (p * (torch.log(p) - log_q)).mean()


def kbar(z_p, z_q, reduction="mean"):
    """K̄L(softmax(z_p) ‖ softmax(z_q)) via the library's official_kl."""
    return losses.official_kl(F.softmax(z_p, dim=1), F.log_softmax(z_q, dim=1), reduction)



# ================================================================================================
# Attacks: one framework
# ================================================================================================
def project_wrong(x_adv, x, eps, norm, clamp=True):
    if clamp:
        return attacks.project(x_adv, x, eps, norm)
    delta = x_adv - x
    if norm == "linf":
        return x + delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return x + delta * (eps / n).clamp(max=1.0)


def random_start(x, eps, norm="linf", start="uniform"):
    """The start points the wrong-variant attacks use (the library's conventions, for recognising mistakes)."""
    if start == "clean":
        return x.clone()
    if start == "gaussian":
        return x + 0.001 * torch.randn_like(x)
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    radius = eps * torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype)
    return (x + direction * radius).clamp(0.0, 1.0)


def wrong_attack(model, x, objective, *, eps, step_size, steps, start="clean", step="sign", descend=False,
                  project_norm="linf", start_norm="linf", project_each_step=True, clamp=True):
    """A deliberately configurable (and mostly wrong) gradient attack, used only to recognise mistakes."""
    x = x.detach()
    with attacks.eval_mode(model):
        x_adv = random_start(x, eps, start_norm, start).detach()
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
                x_adv = project_wrong(x_adv, x, eps, project_norm, clamp)
        if not project_each_step:
            x_adv = project_wrong(x_adv, x, eps, project_norm, clamp)
    return x_adv.detach()


def ce_sum(y):
    return lambda z: F.cross_entropy(z, y, reduction="sum")


@dataclass
class AttackCase:
    models: dict
    x: torch.Tensor
    y: torch.Tensor | None
    kwargs: dict
    seed: int
    mode: str


@dataclass
class AttackSpec:
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


def same_image(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().gt(1e-5).float().mean().item() <= 0.002


def run_attack_check(spec: AttackSpec, fn) -> None:
    task = spec.task
    gains, advice = [], set()
    with sandbox(task, fn):
        for case in spec.cases:
            mods = copies(case.models, case.mode)
            modes = {r: mode_flags(m) for r, m in mods.items()}
            bn = {r: bn_state(m) for r, m in mods.items()}
            calls = {r: [] for r in mods}
            hooks = [m.register_forward_pre_hook(lambda mod, inp, r=r: calls[r].append(torch.is_grad_enabled()))
                     for r, m in mods.items()]
            x_l = case.x.clone()
            torch.manual_seed(case.seed)
            try:
                out = call_learner(task, spec.learner, fn, mods, x_l, case.y, case.kwargs)
            finally:
                for h in hooks:
                    h.remove()
            torch.manual_seed(case.seed)
            ref = spec.library(copies(case.models, case.mode), case.x, case.y, case.kwargs)
            x, eps = case.x, case.kwargs["eps"]
            if not isinstance(out, torch.Tensor):
                fail(task, f"your function returned {type(out).__name__}; return x′ as a tensor shaped like x")
            if out.shape != x.shape:
                fail(task, f"your x′ has shape {tuple(out.shape)}; it must have the shape of x, {tuple(x.shape)}")
            if out.requires_grad or out.grad_fn is not None:
                fail(task, "your x′ still carries a graph (requires_grad=True): return x_adv.detach(); an "
                            "attack's output is a constant input for the next step")
            if not torch.equal(x_l, x):
                fail(task, "your function modified x in place: build x′ in a new tensor (x.clone(), x + ...)")
            assert_modes_restored(task, modes, mods)
            for role, model in mods.items():
                if bn_changed(bn[role], model):
                    fail(task, f"the {role} ran in train mode during your attack: BatchNorm used the batch's "
                                f"statistics and its running averages changed. Attacks run the models in eval "
                                f"mode (`with attacks.eval_mode({role}):`)")
            if spec.guide_once and "guide" in calls:
                n, grads = len(calls["guide"]), sum(calls["guide"])
                if n > 1:
                    advice.add(f"the guide ran {n} times in one attack: p_g(x) does not depend on x′, so "
                               f"compute it once, before the loop (the official code recomputes it at every "
                               f"step: the same x′ for {n - 1} extra forward passes)")
                if grads:
                    advice.add("the guide's forward pass built a graph nobody uses: compute p_g(x) under "
                               "torch.no_grad()")
            if not torch.isfinite(out).all():
                fail(task, "your x′ contains NaN or inf values")
            if same_image(out, ref):
                continue
            for message, variant in spec.variants:
                torch.manual_seed(case.seed)
                v = variant(copies(case.models, case.mode), x, case.y, case.kwargs)
                if same_image(out, v) and not same_image(v, ref):
                    fail(task, message)
            outside = ((out < -1e-6) | (out > 1 + 1e-6)).float().mean().item()
            if outside > 0:
                fail(task, f"your attack forgets the clamp to [0, 1]: {pct(outside)} of the pixels of x′ are "
                            f"outside [0, 1]")
            delta = out - x
            if spec.norm == "linf":
                far = (delta.abs() > eps + 1e-6).float().mean().item()
                if far > 0:
                    fail(task, f"your x′ leaves {pct(far)} of the pixels outside the ε-ball (|x′ − x| > ε = "
                                f"{eps:.4g}): project back onto the ball after every step")
            else:
                norms = delta.flatten(1).norm(dim=1)
                far = int((norms > eps * (1 + 1e-5) + 1e-6).sum())
                if far:
                    fail(task, f"{far} of {len(norms)} examples of your x′ lie outside the L2 ε-ball (largest "
                                f"‖x′ − x‖₂ = {norms.max().item():.4g} > ε = {eps:.4g}): project after every step")
            if not spec.random:
                diff = (out - ref).abs().gt(1e-5).float().mean().item()
                fail(task, f"your x′ differs from the library's on {pct(diff)} of the pixels (max |Δ| = "
                            f"{(out - ref).abs().max().item():.3g}); none of the common mistakes this check knows "
                            f"matches: compare your steps with the task's statement")
            # random start, other random numbers than the library's: compare what the attack achieves instead
            torch.manual_seed(case.seed + 999)
            again = call_learner(task, spec.learner, fn, copies(case.models, case.mode), case.x.clone(), case.y, case.kwargs)
            if torch.equal(again, out):
                fail(task, "no random start: two calls with different random seeds returned the same x′")
            base = spec.objective(case.models, x, case.y, x)
            gains.append((spec.objective(case.models, x, case.y, out) - base,
                          spec.objective(case.models, x, case.y, ref) - base))
        if gains:
            mine, lib = sum(g for g, _ in gains), sum(g for _, g in gains)
            if mine <= 0:
                fail(task, f"your attack lowers the loss it should raise (change {mine:.3g}, the library's "
                            f"{lib:.3g}): step *up* the gradient, x′ + α·sign(∇)")
            if mine < 0.75 * lib:
                fail(task, f"your attack raises its objective much less than the library's ({mine:.3g} vs "
                            f"{lib:.3g} over the trials): check the step direction and size")
            passed(task, spec.passed + " — your random numbers differ from the library's, so the check compared "
                                        "invariants and the loss reached instead of exact values")
            _advise_all(task, advice)
            return
        passed(task, spec.passed)
        _advise_all(task, advice)


def _advise_all(task, advice) -> None:
    for message in sorted(advice):
        advise(task, message)


def attack_cases(kind: str) -> list[AttackCase]:
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
        g = generator(1100 + i)
        roles = {"target": small_cnn(c, 1200 + i), "guide": small_cnn(c, 1300 + i)} if kind == "kl" else {"model": small_cnn(c, 1200 + i)}
        cases.append(AttackCase(roles, rand_images(g, b), rand_labels(g, b, c), kw, 1400 + i, mode))
    return cases


def ce_objective(mods, x, y, xa):
    m = mods["model"] if "model" in mods else mods["target"]
    with attacks.eval_mode(m), torch.no_grad():
        return F.cross_entropy(m(xa), y, reduction="sum").item()



def p_clean(model, x):
    with attacks.eval_mode(model), torch.no_grad():
        return F.softmax(model(x), dim=1)



def p_logits(model, xa):
    with attacks.eval_mode(model), torch.no_grad():
        return model(xa)



class Prototype(nn.Module):
    """A linear nearest-prototype classifier: logits_c = ⟨x, μ_c⟩ − ‖μ_c‖²/2 (honest gradients)."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", prototypes.flatten(1).clone())

    def forward(self, x):
        return x.flatten(1) @ self.mu.T - 0.5 * (self.mu ** 2).sum(1)



def eval_setup(seed: int, b: int, c: int = 10, contrast: float = 0.04):
    """BatchNorm (identity in eval mode) + a nearest-prototype classifier, images near the prototypes and
    labels 15 % wrong: honest gradients, clean accuracy ≈ 85 %, and FGSM/PGD at ε = 0.05 change it."""
    g = generator(seed)
    proto = (0.5 + contrast * torch.randn(c, 3, 8, 8, generator=g)).clamp(0, 1)
    y = torch.randint(0, c, (b,), generator=g)
    x = (proto[y] + 0.02 * torch.randn(b, 3, 8, 8, generator=g)).clamp(0, 1)
    model = nn.Sequential(nn.BatchNorm2d(3), Prototype(proto))
    flip = torch.rand(b, generator=g) < 0.15
    return model, x, torch.where(flip, (y + 1) % c, y)


def eval_common(task, fn_call, model, mode):
    """Call the learner on a copy of `model` in `mode`; check the mode is restored and BatchNorm untouched."""
    mods = copies({"model": model}, mode)
    modes, bn = {"model": mode_flags(mods["model"])}, bn_state(mods["model"])
    out = fn_call(mods["model"])
    assert_modes_restored(task, modes, mods)
    if bn_changed(bn, mods["model"]):
        fail(task, "the model ran in train mode: BatchNorm used the batch's statistics and updated its running "
                    "averages; evaluate in eval mode (`with attacks.eval_mode(model):`)")
    return out


def fraction_verdict(task, got, want, *, clean=None, what="accuracy"):
    if close(got, want, 0, 1e-6):
        return
    if close(got, 100 * want, 0, 1e-4):
        fail(task, f"you returned a percentage ({got:.4g}); return the {what} as a fraction in [0, 1]")
    if close(got, 1 - want, 0, 1e-6):
        fail(task, f"you returned the error rate (1 − {what}): {got:.4g} instead of {want:.4g}")
    if clean is not None and close(got, clean, 0, 1e-6) and not close(clean, want, 0, 1e-6):
        fail(task, f"you measured the clean accuracy ({clean:.4g}); the {what} is measured on the attacked "
                    f"images x′")

