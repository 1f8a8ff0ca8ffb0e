"""`d2r bench`: how fast training runs here, against the official code, the floor and the peak.

Chapter 9 uses it. Per target:guide pair, in one interleaved run (each candidate timed once per
round, the fastest round kept, so load from other work hits all candidates alike): ours
(`methods.train_step`, every method on the first pair, D2R on the others); official
(`official_d2r_step`); the floor (the summed time of only the passes a step needs: one gradient-free
reference pass, K target forward + backward-to-input passes, the training forward/backward, the SGD
update) and the fp32 peak (`peak_flops`) against the step's FLOPs (`step_flops`, from `costmodel`).
Then `train.fit` against the step alone, PGD-20 evaluation, peak memory, the fast paths of `fast`,
and scaling tables (`scaling_table`, whose rows `costmodel.fit` reads).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import attacks, costmodel, fast, methods, models, validate

__all__ = [
    "DEFAULTS", "QUICK", "add_arguments", "format_report", "main", "official_d2r_step",
    "peak_flops", "run", "scaling_table", "step_flops",
]

DEFAULTS = {
    "pairs": ["small_cnn:small_cnn:64", "preact_resnet18:resnet18:8", "wrn34_10:resnet18:4"],
    "repeats": 3, "fit_images": 1280, "eval_models": ["small_cnn", "preact_resnet18"],
    "eval_batch_size": 128, "scaling_batches": [16, 32, 64, 128], "scaling_steps": [1, 2, 5, 10]}
"""Sizes of a full run (minutes to hours on a CPU: the big pairs dominate)."""
QUICK = {"pairs": ["small_cnn:small_cnn:32", "preact_resnet18:resnet18:2:3",
                   "wrn34_10:resnet18:1:2"],
         "repeats": 2, "fit_images": 256, "eval_models": ["small_cnn"], "eval_batch_size": 64,
         "scaling_batches": [16, 32, 64], "scaling_steps": [1, 5, 10]}
"""Sizes of `--quick` (about a minute on an idle 2-core CPU): batch 2 / 1, K = 3 / 2 on big ones."""


# ---------------------------------------------------------------------------------------- the steps
def _k(log_p, p_ref):
    """The official helper k(a, b) = b·(log(b + 1e-5) − a), elementwise."""
    return p_ref * (torch.log(p_ref + 1e-5) - log_p)


def official_d2r_step(target, guide, optimizer, x, y, *, eps=0.031, step_size=0.007,
                      steps=10) -> float:
    """The official D2R step (D2R.py) transcribed for timing only, never for training. Chapter 9.

    CAG in eval mode with g(x) recomputed with a graph inside every attack step, then train mode,
    three forward passes f(x′), f(x), g(x), the D2R loss (with its unused KL), backward, SGD; fp32.
    """
    target.eval(), guide.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = _k(F.log_softmax(target(x_adv), dim=1), F.softmax(guide(x), dim=1)).sum()
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    target.train(), guide.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    out_adv, out_nat, out_g = target(x_adv), target(x), guide(x)
    log_f, log_g, log_adv = (F.log_softmax(z, dim=1) for z in (out_nat, out_g, out_adv))
    p_f, p_g, p_adv = (F.softmax(z, dim=1) for z in (out_nat, out_g, out_adv))
    kl1, kl2 = torch.mean(_k(log_g, p_f)), torch.mean(_k(log_f, p_g))
    kl3, kl5 = torch.mean(_k(log_adv, p_g)), torch.mean(_k(log_g, p_adv))
    _unused = torch.abs(kl2 - kl3)
    loss = (F.cross_entropy(out_g, y) + F.mse_loss(out_adv, out_g) + 20.0 * torch.abs(kl1 - kl2)
            + 30.0 * kl5)
    loss.backward()
    optimizer.step()
    return loss.item()


def _attack_kind(m) -> str:
    return getattr(m, "attack_kind", None) or m.attack


def _floor_parts(m, f, g, opt, x, y, steps) -> dict:
    """Closures of the passes `m` needs, each alone: reference, one attack step, train, update."""
    kind = _attack_kind(m)
    ref_model = {"trades": f, "cag": g}.get(kind)
    params = {"steps": steps} if kind != "none" else {}
    if "official_passes" in m.resolve():
        params["official_passes"] = False
    x_adv = x if kind == "none" else (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    trained = [f] + ([g] if m.uses_guide else [])
    grads: list = []

    def reference():
        with attacks.eval_mode(ref_model), torch.no_grad():
            ref_model(x)

    def attack_step():
        with attacks.eval_mode(f):
            xa = x_adv.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(f(xa), y, reduction="sum"), xa)

    def train():
        for model in trained:
            model.train()
        terms = methods.compute_terms(m, f, g if m.uses_guide else None, x, x_adv, y, **params)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grads[:] = [(p, p.grad) for group in opt.param_groups for p in group["params"]]

    def update():
        if not grads:
            train()
        for p, grad in grads:
            p.grad = grad
        opt.step()

    parts = {"train": train, "update": update}
    if kind != "none":
        parts["attack_step"] = attack_step
        if ref_model is not None:
            parts["reference"] = reference
    return parts


def _floor_seconds(parts: dict, steps: int) -> float:
    return sum(t * (steps if name == "attack_step" else 1) for name, t in parts.items())


# ------------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _interleaved(candidates: dict, *, device, warmup: int, repeats: int,
                 memory: bool = False) -> dict:
    """{name: fastest seconds} of each candidate closure, timed round-robin `repeats` times after
    `warmup` rounds; "rounds": {name: [seconds of each round]}; with memory=True on CUDA also
    {(name, "memory"): peak bytes}."""
    for _ in range(warmup):
        for run_ in candidates.values():
            run_()
    best: dict = {name: float("inf") for name in candidates}
    best["rounds"] = {name: [] for name in candidates}
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        for name, run_ in candidates.items():
            if cuda and memory:
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            started = time.perf_counter()
            run_()
            _sync(device)
            best["rounds"][name].append(time.perf_counter() - started)
            best[name] = min(best[name], best["rounds"][name][-1])
            if cuda and memory:
                best[(name, "memory")] = torch.cuda.max_memory_allocated()
    return best


def _paired(best: dict, numerator, denominator, scale=None) -> float:
    """Median over rounds of numerator / denominator time (each a key, or a function of the round
    index), both from the same round: robust to load that changes between rounds."""
    def at(key, r):
        return key(r) if callable(key) else best["rounds"][key][r]
    n = len(best["rounds"][next(iter(best["rounds"]))])
    return statistics.median(at(numerator, r) / at(denominator, r) for r in range(n))


def peak_flops(device="cpu", *, n: int | None = None, repeats: int = 5) -> float:
    """The measured fp32 peak: FLOP/s of the fastest of `repeats` n×n matmuls. Chapter 9."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    validate.number("n", n, min=16, integer=True)
    validate.number("repeats", repeats, min=1, integer=True)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = _interleaved({"mm": lambda: a @ b}, device=device, warmup=1, repeats=repeats)["mm"]
    return 2 * n ** 3 / best


def step_flops(method: str, target: str, guide: str, *, steps: int, num_classes: int = 10) -> float:
    """FLOPs per image of the passes one step of `method` needs (2 per MAC; `costmodel`: an attack
    step ≈ `ATTACK_PASS` target forward passes, the rest `outer_steps` attack steps). Chapter 9."""
    tm = costmodel.model_macs(target, num_classes)
    gm = costmodel.model_macs(guide, num_classes)
    k = steps if _attack_kind(methods.get_method(method)) != "none" else 0
    return 2.0 * costmodel.ATTACK_PASS * tm * (k + costmodel.outer_steps(method, tm, gm))


def _setup(target, guide, batch, device, seed, num_classes=10):
    torch.manual_seed(seed)
    f = models.build_model(target, num_classes).to(device)
    g = models.build_model(guide, num_classes).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    return f, g, methods.make_optimizer(f, g, lr=0.01), x, y


def scaling_table(method: str = "d2r", target: str = "small_cnn", guide: str = "small_cnn", *,
                  batch_sizes=(32,), steps=(10,), device="cpu", warmup: int = 1, repeats: int = 2,
                  seed: int = 0) -> list[dict]:
    """Images/s of `methods.train_step` at each (batch size, K) of the grid, interleaved. Chapter 9.

    Rows: method, target, guide, batch_size, steps, seconds_per_step, seconds_per_image,
    images_per_s. The time model reads them at one batch size: `costmodel.fit([r["steps"] ...],
    [r["seconds_per_image"] ...], c=costmodel.outer_steps(method, ...))`.
    """
    m = methods.get_method(method)
    validate.choice("target", target, models.MODELS)
    validate.choice("guide", guide, models.MODELS)
    batch_sizes, steps = list(batch_sizes), list(steps)
    if not batch_sizes or not steps:
        raise ValueError("batch_sizes and steps must each hold at least one value")
    for name, v in [*(("batch_sizes entry", b) for b in batch_sizes),
                    *(("steps entry", k) for k in steps)]:
        validate.number(name, v, min=1, integer=True)
    validate.number("warmup", warmup, min=0, integer=True)
    validate.number("repeats", repeats, min=1, integer=True)
    attack = _attack_kind(m) != "none"
    f, g, opt, _, _ = _setup(target, guide, 1, device, seed)
    gm = g if m.uses_guide else None
    candidates = {}
    for b in batch_sizes:
        xb = torch.rand(b, 3, 32, 32, device=device)
        yb = torch.randint(0, 10, (b,), device=device)
        for k in (steps if attack else [0]):
            params = {"steps": k} if attack else {}
            candidates[(b, k)] = (lambda xb=xb, yb=yb, params=params:
                                  methods.train_step(m, f, gm, opt, xb, yb, **params))
    best = _interleaved(candidates, device=device, warmup=warmup, repeats=repeats)
    del best["rounds"]
    return [{"method": method, "target": target, "guide": guide, "batch_size": b, "steps": k,
             "seconds_per_step": best[(b, k)], "seconds_per_image": best[(b, k)] / b,
             "images_per_s": b / best[(b, k)]} for (b, k) in candidates]


# ------------------------------------------------------------------------------------------ the run
def _bench_pair(spec: dict, method_names: list, *, device, warmup, repeats, peak, seed,
                say) -> dict:
    target, guide, batch, steps = spec["target"], spec["guide"], spec["batch_size"], spec["steps"]
    f, g, opt, x, y = _setup(target, guide, batch, device, seed)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    candidates, parts_of = {"peak": lambda: a @ b}, {}  # the peak under this pair's load
    for name in method_names:  # a method's candidates side by side: ratios within one round
        m = methods.get_method(name)
        params = {"steps": steps} if _attack_kind(m) != "none" else {}
        gm = g if m.uses_guide else None
        candidates[("ours", name)] = lambda m=m, gm=gm, params=params: methods.train_step(
            m, f, gm, opt, x, y, **params)
        if name == "d2r":
            candidates[("official", name)] = lambda: official_d2r_step(f, g, opt, x, y, steps=steps)
        parts_of[name] = _floor_parts(m, f, g, opt, x, y, steps)
        candidates.update({(name, part): run_ for part, run_ in parts_of[name].items()})
    say(f"  timing {target} + {guide}, batch {batch}, K = {steps}: {len(candidates)} candidates, "
        f"interleaved, {warmup} + {repeats} rounds")
    best = _interleaved(candidates, device=device, warmup=warmup, repeats=repeats, memory=True)
    rounds = best["rounds"]
    peak = max(peak, 2 ** 34 / best["peak"])
    rows = []
    for name in method_names:
        ours = best[("ours", name)]
        k = steps if _attack_kind(methods.get_method(name)) != "none" else 0
        parts = {part: best[(name, part)] for part in parts_of[name]}
        floor_at = (lambda r, name=name, k=k: _floor_seconds(
            {part: rounds[(name, part)][r] for part in parts_of[name]}, k))
        flops = step_flops(name, target, guide, steps=k or 1) * batch
        row = {"method": name, "seconds": ours, "images_per_s": batch / ours,
               "floor_seconds": _floor_seconds(parts, k), "floor_parts": parts,
               "floor_over_ours": _paired(best, floor_at, ("ours", name)),
               "step_gflop": flops / 1e9,
               "fraction_of_peak": _paired(  # FLOP/s of the step / the matmul's, same round
                   best, lambda r, fl=flops: fl * rounds["peak"][r] / 2 ** 34, ("ours", name)),
               "peak_memory_bytes": best.get((("ours", name), "memory"))}
        if ("official", name) in candidates:
            official = best[("official", name)]
            row.update(official_seconds=official, official_images_per_s=batch / official,
                       ours_over_official=_paired(best, ("official", name), ("ours", name)),
                       official_peak_memory_bytes=best.get((("official", name), "memory")))
        rows.append(row)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    macs = {"target": costmodel.model_macs(target), "guide": costmodel.model_macs(guide)}
    return {**spec, "macs": macs, "peak_flops": peak, "rows": rows, "process_peak_rss_bytes": rss}


def _bench_fast(spec: dict, eval_models: list, eval_batch: int, *, device, warmup, repeats,
                seed) -> dict:
    """BatchNorm folding, channels_last and inference mode against the plain paths, interleaved.
    `step_fold` is `train_step` under `fast.options(fold_batchnorm=True)`: it folds only where
    `methods` calls `fast.attack_model`."""
    f, g, opt, x, y = _setup(spec["target"], spec["guide"], spec["batch_size"], device, seed)
    k = spec["steps"]
    f_cl, g_cl = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (f, g))
    opt_cl = methods.make_optimizer(f_cl, g_cl, lr=0.01)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def step(cl=False, fold=False):
        with fast.options(fold_batchnorm=fold):
            methods.train_step("d2r", *((f_cl, g_cl, opt_cl, x_cl) if cl else (f, g, opt, x)), y,
                               steps=k)

    def ref(mode):
        with attacks.eval_mode(g), mode():
            p = F.softmax(g(x), dim=1)
        return p.clone() if mode is torch.inference_mode else p

    candidates = {
        "cag": lambda: attacks.cag(f, g, x, steps=k),
        "cag_folded": lambda: attacks.cag(fast.attack_model(f, enabled=True),
                                          fast.attack_model(g, enabled=True), x, steps=k),
        "reference_no_grad": lambda: ref(torch.no_grad),
        "reference_inference_mode": lambda: ref(torch.inference_mode),
        "step": step, "step_fold": lambda: step(fold=True), "step_cl": lambda: step(cl=True),
        "step_cl_fold": lambda: step(cl=True, fold=True),
    }
    for name in eval_models:
        torch.manual_seed(seed)
        model = models.build_model(name).to(device).eval()
        xe = torch.rand(eval_batch, 3, 32, 32, device=device)
        ye = torch.randint(0, 10, (eval_batch,), device=device)
        candidates[("pgd20", name)] = lambda m=model, xe=xe, ye=ye: attacks.pgd(
            m, xe, ye, eps=8 / 255, step_size=2 / 255, steps=20)
        candidates[("pgd20_folded", name)] = lambda m=model, xe=xe, ye=ye: attacks.pgd(
            fast.attack_model(m, enabled=True), xe, ye, eps=8 / 255, step_size=2 / 255, steps=20)
        for mode in (torch.no_grad, torch.inference_mode):
            def clean(m=model, xe=xe, mode=mode):
                with mode():
                    m(xe).argmax(1)
            candidates[(f"clean_{mode.__name__}", name)] = clean
    best = _interleaved(candidates, device=device, warmup=warmup, repeats=repeats)
    out = {"pair": f"{spec['target']}:{spec['guide']}", "batch_size": spec["batch_size"],
           "steps": k, "cag_seconds": best["cag"], "cag_folded_seconds": best["cag_folded"],
           "cag_fold_speedup": _paired(best, "cag", "cag_folded"),
           "reference_inference_mode_speedup": _paired(best, "reference_no_grad",
                                                       "reference_inference_mode"),
           **{f"{v}_speedup": _paired(best, "step", v)
              for v in ("step_fold", "step_cl", "step_cl_fold")},
           "eval": []}
    for name in eval_models:
        out["eval"].append({
            "model": name, "batch_size": eval_batch,
            "pgd20_images_per_s": eval_batch / best[("pgd20", name)],
            "pgd20_folded_images_per_s": eval_batch / best[("pgd20_folded", name)],
            "pgd20_fold_speedup": _paired(best, ("pgd20", name), ("pgd20_folded", name)),
            "clean_inference_mode_speedup": _paired(best, ("clean_no_grad", name),
                                                    ("clean_inference_mode", name))})
    return out


def _bench_fit(spec: dict, images: int, *, device, seed, data_dir, say) -> dict:
    """`train.fit` for one epoch of `images` CIFAR-10 mini images against the same steps in a bare
    loop."""
    from .. import train
    batch, steps = spec["batch_size"], spec["steps"]
    cfg = train.TrainConfig(method="d2r", target_model=spec["target"], guide_model=spec["guide"],
                            dataset="cifar10", subset="mini", train_size=images, epochs=1,
                            batch_size=batch, lr=0.01, method_params={"steps": steps}, seed=1,
                            held_out=1)
    f, g, opt, x, y = _setup(spec["target"], spec["guide"], batch, device, seed)
    n_steps = -(-images // batch)

    def loop() -> float:
        _sync(device)
        started = time.perf_counter()
        for _ in range(n_steps):
            methods.train_step("d2r", f, g, opt, x, y, steps=steps)
        _sync(device)
        return n_steps * batch / (time.perf_counter() - started)

    loop()  # warm-up
    say(f"  train.fit: 1 epoch of {images} CIFAR-10 mini images, between bare train_step loops")
    before = loop()
    try:
        result = train.fit(cfg, None, device=device, progress=False, data_dir=data_dir,
                           download=False, log=lambda *a, **k: None)
    except FileNotFoundError as err:
        return {"skipped": f"no data: {err}".splitlines()[0]}
    after = loop()
    fit_ips = result.history[-1]["images_per_s"]
    step_ips = (before + after) / 2
    return {"images": images, "batch_size": batch, "steps": steps, "fit_images_per_s": fit_ips,
            "step_images_per_s": step_ips, "fit_over_step": fit_ips / step_ips}


def run(*, pairs: list[str], methods_: list[str] | None = None, repeats: int = 3, warmup: int = 1,
        steps: int = 10, fit_images: int = 0, eval_models=(), eval_batch_size: int = 64,
        scaling_batches=(), scaling_steps=(), device: str = "cpu", seed: int = 0, data_dir=None,
        say=print) -> dict:
    """Measure everything the module docstring lists and return it as one JSON-ready dict. Chapter
    9."""
    specs = [_parse_pair(p, steps) for p in pairs]
    names = list(methods.METHODS) if methods_ is None else list(methods_)
    started = time.perf_counter()
    peak = peak_flops(device, repeats=max(3, repeats))
    say(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "repeats": repeats, "warmup": warmup, "seed": seed,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "timing": "images/s: fastest round; ratios: median over rounds of same-round ratios"}
    report = {"meta": meta, "peak_flops": peak, "pairs": []}
    for i, spec in enumerate(specs):
        pair_methods = names if i == 0 else [n for n in names if n == "d2r"] or names[:1]
        report["pairs"].append(_bench_pair(spec, pair_methods, device=device, warmup=warmup,
                                           repeats=repeats, peak=peak, seed=seed, say=say))
    first = specs[0]
    say("  fast paths: BatchNorm folding and inference mode")
    report["fast"] = _bench_fast(first, list(eval_models), eval_batch_size, device=device,
                                 warmup=warmup, repeats=repeats, seed=seed)
    if fit_images:
        report["fit"] = _bench_fit(first, fit_images, device=device, seed=seed,
                                   data_dir=data_dir, say=say)
    report["scaling"] = {}
    if scaling_batches:
        say("  scaling: images/s against batch size")
        report["scaling"]["batch_size"] = scaling_table(
            "d2r", first["target"], first["guide"], batch_sizes=scaling_batches,
            steps=[first["steps"]], device=device, warmup=warmup, repeats=repeats, seed=seed)
    if scaling_steps:
        say("  scaling: images/s against K")
        report["scaling"]["steps"] = scaling_table(
            "d2r", first["target"], first["guide"], batch_sizes=[first["batch_size"]],
            steps=scaling_steps, device=device, warmup=warmup, repeats=repeats, seed=seed)
    report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    return report


# ---------------------------------------------------------------------------------------- reporting
def format_report(report: dict) -> str:
    """The tables `d2r bench` prints."""
    meta = report["meta"]
    lines = [(f"peak (fp32 matmul): {report['peak_flops'] / 1e9:.1f} GFLOP/s; "
              f"{meta['threads']} threads; fastest of {meta['repeats']} interleaved rounds")]
    for pair in report["pairs"]:
        lines.append(f"\n{pair['target']} + {pair['guide']}, batch {pair['batch_size']}, "
                     f"K = {pair['steps']}")
        lines.append(f"  {'method':<15}{'ours img/s':>11}{'official':>10}{'ours/off':>9}"
                     f"{'floor img/s':>12}{'floor/ours':>11}{'GFLOP':>8}{'of peak':>9}")
        for r in pair["rows"]:
            off = (f"{r['official_images_per_s']:>10.3g}{r['ours_over_official']:>8.2f}×"
                   if "official_seconds" in r else f"{'':>10}{'':>9}")
            lines.append(f"  {r['method']:<15}{r['images_per_s']:>11.3g}{off}"
                         f"{pair['batch_size'] / r['floor_seconds']:>12.3g}"
                         f"{r['floor_over_ours']:>11.2f}"
                         f"{r['step_gflop']:>8.2f}{100 * r['fraction_of_peak']:>8.1f}%")
        rss = pair["process_peak_rss_bytes"] / 2 ** 20
        lines.append(f"  peak {pair['peak_flops'] / 1e9:.1f} GFLOP/s in this pair's rounds; "
                     f"process peak RSS so far {rss:.0f} MiB")
    fp = report["fast"]
    lines.append(f"\nfast paths on {fp['pair']}, batch {fp['batch_size']}, K = {fp['steps']}: "
                 f"CAG attack BatchNorm-folded {fp['cag_fold_speedup']:.2f}×; guide reference "
                 f"with inference_mode {fp['reference_inference_mode_speedup']:.2f}×")
    lines.append(f"  d2r train_step: channels_last {fp['step_cl_speedup']:.2f}×, fold option "
                 f"{fp['step_fold_speedup']:.2f}×, both {fp['step_cl_fold_speedup']:.2f}×")
    plain = next((r for r in report["pairs"][0]["rows"] if r["method"] == "d2r"), None)
    if plain is not None:  # the same FLOPs in less time: the plain step's share × the speedup
        both = plain["fraction_of_peak"] * fp["step_cl_fold_speedup"]
        lines.append(f"  with both (the cpu profile's fast paths) the d2r step runs at about "
                     f"{100 * both:.0f} % of the fp32 peak (plain: "
                     f"{100 * plain['fraction_of_peak']:.0f} %)")
    for e in fp["eval"]:
        lines.append(f"  PGD-20 evaluation {e['model']}, batch {e['batch_size']}: "
                     f"{e['pgd20_images_per_s']:.1f} images/s, "
                     f"folded {e['pgd20_folded_images_per_s']:.1f} "
                     f"({e['pgd20_fold_speedup']:.2f}×); clean forward with inference_mode "
                     f"{e['clean_inference_mode_speedup']:.2f}×")
    fit = report.get("fit")
    if fit:
        lines.append("\ntrain.fit: " + (f"skipped ({fit['skipped']})" if "skipped" in fit else
                     f"{fit['fit_images_per_s']:.1f} images/s, "
                     f"the bare step {fit['step_images_per_s']:.1f}: "
                     f"{fit['fit_over_step']:.2f}× the step alone"))
    for key, rows in report["scaling"].items():
        lines.append(f"\nscaling against {key.replace('_', ' ')} "
                     f"(d2r, {rows[0]['target']} + {rows[0]['guide']})")
        lines.append("  " + "  ".join(f"{r[key]:>6}" for r in rows) + f"   ({key})")
        lines.append("  " + "  ".join(f"{r['images_per_s']:>6.0f}" for r in rows) + "   (images/s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- command line
def _parse_pair(text: str, steps: int) -> dict:
    parts = text.split(":")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() and int(p) > 0 for p in parts[2:]):
        raise ValueError("--pairs entries must be target:guide[:batch[:steps]] with positive "
                         f"integers; got {text!r}")
    validate.choice("--pairs target", parts[0], models.MODELS)
    validate.choice("--pairs guide", parts[1], models.MODELS)
    batch = int(parts[2]) if len(parts) > 2 else 32
    return {"target": parts[0], "guide": parts[1], "batch_size": batch,
            "steps": int(parts[3]) if len(parts) > 3 else steps}


def _int_list(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers or 'none'; got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `d2r bench` (the cli module wires them)."""
    parser.add_argument("--quick", action="store_true", help="about a minute on an idle 2-core CPU")
    parser.add_argument("--pairs", nargs="+", default=None, metavar="TARGET:GUIDE[:BATCH[:K]]",
                        help=f"default {' '.join(DEFAULTS['pairs'])}; --quick "
                             f"{' '.join(QUICK['pairs'])}; all methods on the first, d2r on others")
    parser.add_argument("--methods", type=_name_list, default=None,
                        help="comma-separated methods of the registry (default: all)")
    parser.add_argument("--steps", type=int, default=10,
                        help="attack steps K where a pair names none (10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (3; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument("--fit-images", type=int, default=None,
                        help="images of the train.fit epoch (1280; --quick 256; 0 skips it)")
    parser.add_argument("--eval-models", type=_name_list, default=None,
                        help="PGD-20 models (small_cnn,preact_resnet18; --quick small_cnn)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="PGD-20 batch (128; --quick 64)")
    parser.add_argument("--scaling-batches", type=_int_list, default=None,
                        help="scaling table batch sizes (16,32,64,128; --quick 16,32,64; none)")
    parser.add_argument("--scaling-steps", type=_int_list, default=None,
                        help="K values of the scaling table (1,2,5,10; --quick 1,5,10; none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and images (0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data folder for the train.fit timing")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the report here (JSON, atomically)")


def _resolve(a) -> dict:
    """Every argument checked and defaults filled in, before anything is measured."""
    from .. import experiments
    sizes = QUICK if a.quick else DEFAULTS
    pick = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in sizes.items()}
    validate.number("--steps", a.steps, min=1, integer=True)
    specs = [_parse_pair(p, a.steps) for p in pick["pairs"]]
    names = a.methods
    for name in names or []:
        validate.choice("--methods", name, methods.METHODS)
    if names == []:
        raise ValueError("--methods must name at least one method")
    validate.number("--repeats", pick["repeats"], min=1, integer=True)
    validate.number("--warmup", a.warmup, min=0, integer=True)
    validate.number("--fit-images", pick["fit_images"], min=0, integer=True)
    if pick["fit_images"] and pick["fit_images"] < specs[0]["batch_size"]:
        raise ValueError(f"--fit-images must be 0 or at least the first pair's batch "
                         f"({specs[0]['batch_size']}); got {pick['fit_images']}")
    for name in pick["eval_models"]:
        validate.choice("--eval-models", name, models.MODELS)
    validate.number("--eval-batch-size", pick["eval_batch_size"], min=1, integer=True)
    for flag, key in (("--scaling-batches", "scaling_batches"),
                      ("--scaling-steps", "scaling_steps")):
        for v in pick[key]:
            validate.number(f"{flag} entry", v, min=1, integer=True)
    validate.number("--seed", a.seed, min=0, integer=True)
    device = experiments.pick_device(a.device)
    if a.json is not None:
        if a.json.is_dir():
            raise ValueError(f"--json must be a file path; {a.json} is a directory")
        if not a.json.parent.is_dir():
            raise ValueError(f"--json: the folder {a.json.parent} does not exist")
    if a.data_dir is not None and not a.data_dir.is_dir():
        raise ValueError(f"--data-dir: {a.data_dir} is not a folder")
    return {**pick, "methods_": names, "warmup": a.warmup, "steps": a.steps, "device": device,
            "seed": a.seed, "data_dir": a.data_dir}


def _write_json(path: Path, report: dict) -> None:
    """Through `checkpoint.atomic_write` (temporary file, fsync, rename): never half a file."""
    from .. import checkpoint
    text = json.dumps(report, indent=1, default=str) + "\n"
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main(args: argparse.Namespace) -> int:
    """`d2r bench`: check every argument, measure, print the tables, write --json. Chapter 9."""
    settings = _resolve(args)
    torch.set_flush_denormal(True)
    report = run(**settings, say=lambda text: print(text, flush=True))
    report["meta"]["quick"] = bool(args.quick)
    print(format_report(report))
    if args.json is not None:
        _write_json(args.json, report)
        print(f"report: {args.json}")
    return 0
