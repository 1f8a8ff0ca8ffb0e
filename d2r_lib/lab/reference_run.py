"""The reference runs as runs of the runner: `d2r run reference --profile P -p method=...
-p seed=...` plans one run per (method, seed) of the configuration `reference.CONFIGS[P]` and
executes each into `<out>/<name>-seed<k>/` (name: the method's, or `-p name=...`), the folders
chapters 7 and 8 read. Training and evaluating one run is `reference.train_and_evaluate`; here are
the checks, the skip of complete runs, the lock of each run and its manifest
(`notebook_run.start_manifest`, the one format of every run). Chapter 9.
"""

from __future__ import annotations

import itertools
import json
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import checkpoint, experiments, methods, reference, train
from .notebook_run import MANIFEST, cpu_name, finish_manifest, start_manifest, write_json

__all__ = ["KIND", "estimate", "execute", "is_complete", "plan"]

KIND = "reference"
NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def _error(message: str) -> Exception:
    from .runner import RunnerError

    return RunnerError(message)


def _method_names(values) -> list[str]:
    for value in values:
        if value not in methods.METHODS:
            raise _error(f"-p method={value!r}: the reference runs train a registered method; "
                         f"allowed: {', '.join(methods.METHODS)}")
    return list(dict.fromkeys(values))


def _check(name: str, values: list, chosen: list[str]) -> list:
    """The checked values of `-p name=...` (seed, name or a parameter of every chosen method)."""
    from .runner import RANGES

    out = []
    for value in values:
        if name == "seed":
            problem = RANGES["seed"].check(value)
            if problem:
                raise _error(f"-p seed={value!r}: the reference runs allow {problem}")
        elif name == "name":
            if not isinstance(value, str) or not NAME.fullmatch(value) or len(chosen) != 1:
                raise _error(f"-p name={value!r}: give one folder name (letters, digits, "
                             "_ . + -) for a single -p method")
        else:
            lacking = [m for m in chosen if name not in methods.get_method(m).params]
            if lacking:
                raise _error(f"-p {name}: the reference runs take method, seed, name and "
                             f"parameters every chosen method declares; {', '.join(lacking)} "
                             f"declare(s) no {name!r}")
            param = methods.get_method(chosen[0]).params[name]
            try:
                value = param.check(name, value)
            except (TypeError, ValueError):
                raise _error(f"-p {name}={value!r}: allowed: {param.allowed()}") from None
            value = float(value) if param.kind is float else value
        out.append(value)
    return list(dict.fromkeys(out))


def plan(profile: str, *, out, params: dict, device: str) -> list:
    """Check everything and list the runs, one per (method, seed). Writes nothing."""
    from .runner import Run

    if profile not in reference.CONFIGS:
        raise _error(f"--profile {profile}: the reference runs' profiles: "
                     f"{', '.join(reference.CONFIGS)}")
    config = reference.CONFIGS[profile]
    params = dict(params)
    chosen = _method_names(params.pop("method", reference.METHODS))
    seeds = _check("seed", params.pop("seed", reference.SEEDS), chosen)
    names = _check("name", params.pop("name"), chosen) if "name" in params else [None]
    if len(names) > 1:
        raise _error(f"-p name={','.join(names)}: give one folder name, not a sweep")
    checked = {k: _check(k, v, chosen) for k, v in params.items()}
    out = Path(out).absolute()
    from . import runner

    runner.check_out(out, foreign_manifests=f"*/*/{MANIFEST}",
                     layout="the reference runs keep their manifests in <out>/<name>-seed<k>/")
    runs = []
    for seed, method, *combo in itertools.product(seeds, chosen, *checked.values()):
        extra = dict(zip(checked, combo))
        name = names[0] or method + "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}"
                                            for k, v in extra.items())
        try:  # every run's training configuration, checked now
            config.train_config(method, seed, extra or None)
        except (TypeError, ValueError) as err:
            raise _error(f"-p {', '.join(checked) or 'method'}: {err}") from None
        overrides = {"method": method, "seed": seed, **({"name": name} if names[0] else {}),
                     **extra}
        runs.append(Run(chapter=KIND, notebook=None, profile=profile,
                        passed={"profile": profile, "device": device, **overrides},
                        parameters={"name": name, **overrides}, overrides=overrides,
                        folder=reference.run_dir(out, name, seed), out=out))
    if len({r.folder for r in runs}) < len(runs):
        raise _error(f"-p name={names[0]}: one folder name for {len(runs) // len(seeds)} runs "
                     "per seed; leave -p name out to name each run by its parameters")
    for r in runs:
        _check_same(r)
    return runs


def _check_same(r) -> None:
    """A folder already there must hold this run (a complete run is skipped, not replaced)."""
    try:
        old = json.loads((r.folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return
    if "status" in old:
        same = old.get("profile") == r.profile and old.get("overrides") == r.overrides
    else:  # a manifest written before the runner ran the reference runs
        same = old.get("config", {}).get("name") == r.profile and old.get("method") == \
            r.parameters["method"]
    if not same:
        raise _error(f"--out {r.out}: {r.name} holds another run (profile "
                     f"{old.get('profile') or old.get('config', {}).get('name')}, "
                     f"{old.get('overrides') or old.get('method')}); nothing was overwritten: give "
                     "another --out")


def is_complete(r) -> bool:
    return reference.is_complete(r.folder)


def execute(r, *, log=print, force: bool = False) -> dict:
    """Train and evaluate one reference run into its folder under the lock of its training run
    (another process running it: skipped, status "busy"); its manifest is written last. `force`:
    a complete run is written again (from the checkpoint cache where it still is)."""
    config = reference.CONFIGS[r.profile]
    p = r.parameters
    params = {k: v for k, v in p.items() if k not in ("method", "seed", "name")} or None
    cache = train.cache_path(config.train_config(p["method"], p["seed"], params))
    device = experiments.pick_device(r.passed["device"])
    experiments.flush_denormals()  # as every shipped reference run was trained
    try:
        with checkpoint.exclusive(cache / "run.lock"):
            if is_complete(r) and not force:  # another process finished it meanwhile
                return {**_read(r), "skipped": True}
            manifest = start_manifest(r, kind=KIND, name=p["name"])
            started = time.perf_counter()
            done = reference.train_and_evaluate(r.folder, p["method"], p["seed"], config,
                                                params=params, device=device, log=log)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
                2**20 if sys.platform == "darwin" else 2**10)  # this process's peak so far
            finish_manifest(manifest, "ok", time.perf_counter() - started, device=device,
                            device_name=(torch.cuda.get_device_name() if device == "cuda"
                                         else cpu_name()), peak_memory_mb={"rss": rss}, **done)
            write_json(r.folder / MANIFEST, manifest)
            shutil.rmtree(reference.partial_dir(r.folder), ignore_errors=True)
            log(f"{r.name}: written")
            return manifest
    except checkpoint.Busy:
        log(f"{r.name}: another process is running it, skipped")
        return {"run": r.name, "status": "busy", "skipped": True}


def _read(r) -> dict:
    return json.loads((r.folder / MANIFEST).read_text())


def estimate(runs: list, device: str) -> str:
    """`d2r run reference --estimate`: each planned run, complete or to run, and the projected
    hours of those to run (`reference.estimate` measures a few steps here); trains nothing."""
    todo = [r for r in runs if not is_complete(r)]
    lines = [f"{'complete' if r not in todo else 'to run':>9}  {r.folder}" for r in runs]
    if todo:
        config = reference.CONFIGS[todo[0].profile]
        per_run = reference.estimate(config, sorted({r.parameters["method"] for r in todo}),
                                     device=experiments.pick_device(device))
        total = sum(per_run[r.parameters["method"]] for r in todo)
        lines += [f"projected {name:<16}{seconds / 60:6.1f} min per run (1 thread, measured now)"
                  for name, seconds in per_run.items()]
        lines.append(f"projected total {total / 3600:.1f} h of one core; with two processes on "
                     f"two cores about {total / 7200:.1f} h")
    return "\n".join(lines)
