"""Checks of exercise notebook 9 (chapter 9): predict a run's cost with the cost model, measure."""

from __future__ import annotations

import time

import torch

from .. import costmodel, methods, models
from .harness import as_float, call_learner, close, fail, passed, sandbox

__all__ = ["check_outer_steps", "check_epoch_seconds", "check_cost_prediction", "measure_epoch",
           "COST_RUN"]

# the run whose epoch the learner predicts (random images: only the time matters)
COST_RUN = {"method": "pgd_at", "model": "small_cnn", "steps": 2, "images": 128, "batch_size": 32}


def check_epoch_seconds(fn) -> None:
    """Task: ``epoch_seconds(a, b, c, steps, images)``: one epoch from t(K) = a + b·(K + c)."""
    task = "epoch_seconds"
    cases = [(2e-4, 1e-3, 5.0, 10, 50_000), (1e-5, 3e-4, 1.5, 1, 128), (0.0, 2e-3, 3.5, 0, 1000)]
    with sandbox(task, fn):
        for a, b, c, k, n in cases:
            got = as_float(task, call_learner(task, fn, a, b, c, k, n), "the seconds")
            model = costmodel.CostModel(a=a, b=b, c=c, note="check")
            want = costmodel.epoch_time(model, steps=k, images=n)
            if close(got, want, 1e-9, 1e-12):
                continue
            for value, message in [(n * (a + b * k), "you left out c: the loss's passes and the update cost c attack steps"), (n * b * (k + c), "you left out a, the per-image overhead"), (a + b * (k + c), "that is one image; an epoch has `images` of them"), (n * (a + b * k + c), "c is counted in attack steps: multiply it by b as well")]:
                if close(got, value, 1e-9, 1e-12):
                    fail(task, f"{message} (a={a}, b={b}, c={c}, K={k}, images={n})")
            fail(task, f"your {got:.6g} s differs from {want:.6g} s (a={a}, b={b}, c={c}, K={k}, images={n}): t(K) = a + b·(K + c) per image")
        passed(task, "images · (a + b·(K + c)), as costmodel.epoch_time (3 cases)")


def measure_epoch(run: dict = COST_RUN) -> float:
    """Seconds of one epoch of `run` on random images (methods.train_step, CPU), measured now."""
    m = methods.get_method(run["method"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        target = models.build_model(run["model"])
        guide = models.build_model(run["model"]) if m.uses_guide else None
        optimizer = methods.make_optimizer(target, guide)
        x = torch.rand(run["images"], 3, 32, 32)
        y = torch.randint(0, 10, (run["images"],))
        bs = run["batch_size"]
        methods.train_step(
            m, target, guide, optimizer, x[:bs], y[:bs], steps=run["steps"]
        )  # warm-up
        start = time.perf_counter()
        for i in range(0, run["images"], bs):
            methods.train_step(
                m, target, guide, optimizer, x[i : i + bs], y[i : i + bs], steps=run["steps"]
            )
        return time.perf_counter() - start


def check_cost_prediction(predicted_seconds, measured_seconds: float | None = None) -> None:
    """Task (predict, then measure): your prediction of COST_RUN's epoch against a measured epoch.

    measured_seconds: a measurement to compare with (default: `measure_epoch()`, now).
    """
    task = "predict: one epoch's cost"
    if (
        isinstance(predicted_seconds, bool)
        or not isinstance(predicted_seconds, (int, float))
        or not predicted_seconds > 0
    ):
        fail(task, f"set predicted_seconds to your predicted number of seconds (> 0) before measuring; got {predicted_seconds!r}")
    measured = measure_epoch() if measured_seconds is None else measured_seconds
    ratio = predicted_seconds / measured
    run = ", ".join(f"{k} {v}" for k, v in COST_RUN.items())
    line = (f"you predicted {predicted_seconds:.3g} s; one epoch ({run}) took {measured:.3g} s (ratio {ratio:.2f})")
    if not 1 / 3 <= ratio <= 3:
        fail(task, f"{line}: off by more than a factor of 3. Fit the cost model on timings of the same method, model and batch size on this machine (costmodel.measure_step at two K), use c = costmodel.outer_steps(method) and the run's K and images")
    passed(task, f"{line}: within a factor of 3 — close enough to plan a run (timings on a shared machine vary by tens of per cent)")


def check_outer_steps(fn) -> None:
    """Task (derive): ``outer_steps(train_passes, reference_passes)`` = c for equal-size models."""
    task = "outer_steps"
    tp, ap = costmodel.TRAIN_PASS, costmodel.ATTACK_PASS
    with sandbox(task, fn):
        for p, r in [(1, 0), (3, 1), (2, 1), (2, 0), (5, 2)]:
            got = as_float(task, call_learner(task, fn, p, r), "c")
            want = (tp * p + r) / ap
            if close(got, want, 1e-9, 1e-12):
                continue
            for value, message in [
                (tp * p / ap, "you left out the reference pass (TRADES' p_f(x), CAG's p_g(x))"),
                ((p + r) / ap, "a training pass costs about 3 forward passes, not 1"),
                (tp * p + r, "c is in units of attack steps: divide by one attack step (2 forwards)"),
                ((tp * p + 2 * r) / ap, "a reference pass is a forward pass without backward: 1, not 2"),
            ]:
                if close(got, value, 1e-9, 1e-12):
                    fail(task, f"{message} ({p} train passes, {r} reference passes)")
            fail(task, f"your c = {got:.4g} for {p} train and {r} reference passes; expected {want:.4g}")
        passed(task, f"c = (3·train + reference) / 2: PGD-AT {costmodel.outer_steps('pgd_at'):g}, D2R {costmodel.outer_steps('d2r'):g} attack steps, as costmodel.outer_steps")
