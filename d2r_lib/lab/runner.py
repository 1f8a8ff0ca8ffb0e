"""`d2r run`: the chapters and the reference runs as parameterised experiments, at any scale.
On a laptop, on several GPUs or on a Slurm cluster; chapter 9 shows it.

    d2r run [chapters] --profile P [--chapters 05 07] [-p name=value ...] [--device cuda] [--force]
            --out DIR [--nproc-per-node N] [--cluster local|slurm ...]
    d2r run reference --profile reference -p method=pgd_at,trades -p seed=0,1,2 --out book/reference

Every `-p` name must be a parameter of each selected chapter (its `parameters` cell), with the
default's type and, for the common names, a range; everything is checked before anything runs or is
written. A value with commas is a sweep: `-p w_clean=0,10 -p seed=0,1` gives four runs, each in its
own folder `DIR/<chapter>/<profile>__w_clean=0__seed=0/` holding the executed notebook,
`manifest.json` (parameters, code version, versions, device, times, peak memory, status) and the
chapter's saved results. `DIR/results.csv` and `DIR/results.md` gather every results table of every
run in DIR. A run that completed with the same parameters is skipped (`--force` reruns it); training
inside a chapter resumes from its checkpoint.
`d2r run reference` runs the reference runs instead (`reference_run`): the profile is a
`reference.CONFIGS` name, the parameters are method, seed, name and the methods' parameters, and
each run writes `DIR/<method>-seed<k>/` with the same manifest format.
Executing one run, its manifest and the results tables: `notebook_run`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint, experiments
from . import notebook_run, reference_run
from .notebook_run import MANIFEST, write_json, write_results

__all__ = [
    "CHAPTER_DIR",
    "RANGES",
    "Range",
    "Run",
    "RunnerError",
    "add_arguments",
    "chapters",
    "main",
    "make_executor",
    "notebook_parameters",
    "parse_values",
    "plan",
    "run",
]

ROOT = Path(__file__).resolve().parents[2]
CHAPTER_DIR = ROOT / "book"
CLUSTERS = ("none", "local", "slurm")
KINDS = ("chapters", reference_run.KIND)
RESERVED = {"profile": "--profile", "device": "--device"}


class RunnerError(ValueError):
    """A bad request to the runner: raised before anything runs or is written."""


@dataclass(frozen=True)
class Range:
    """The type and the allowed values of a chapter parameter that many chapters share."""

    kind: type
    min: float | None = None
    max: float | None = None
    min_open: bool = False

    def check(self, value) -> str | None:
        """None when `value` fits, else what is allowed."""
        what = {int: "an integer", float: "a number"}.get(self.kind, self.kind.__name__)
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_open else '>='} {self.min}")
        if self.max is not None:
            bounds.append(f"<= {self.max}")
        allowed = what + (" " + " and ".join(bounds) if bounds else "")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (self.kind is int and not isinstance(value, int)):
            return allowed
        if value != value or (
            self.min is not None and (value <= self.min if self.min_open else value < self.min)
        ):
            return allowed
        if self.max is not None and value > self.max:
            return allowed
        return None


def _method_range(name: str) -> Range | None:
    """The range of a method parameter from its declaration (`methods.Param`), the first registered
    method's that declares `name` with a number type; None for other names."""
    from .. import methods

    for m in methods.METHODS.values():
        p = m.params.get(name)
        if p is not None and p.kind in (int, float):
            return Range(p.kind, p.min, p.max, p.min_open)
    return None


RANGES = {
    "seed": Range(int, 0, 2**32 - 1),  # validate.SEED_MAX: the seed rule of training
    "epochs": Range(int, 1),
    "batch_size": Range(int, 1),
    "train_size": Range(int, 1),
    "test_size": Range(int, 1),
    "attacked": Range(int, 1),
    "held_out": Range(int, 1),
    "lr": Range(float, 0, min_open=True),
    "w_mse": Range(float, 0),
    **{name: _method_range(name) for name in ("eps", "step_size", "steps", "beta", "w_clean",
                                              "w_adv")},
}
"""Declared ranges of the common parameters (None is allowed where the default is None); the method
parameters' ranges come from their declarations (`methods.PARAMS`), also for a method registered
later (`_method_range`)."""


@dataclass
class Run:
    """One execution of one chapter with one set of parameters (one point of a sweep)."""

    chapter: str  # the notebook's file stem, e.g. "07_d2r_end_to_end"; "reference": reference run
    notebook: Path | None  # None for a reference run
    profile: str
    passed: dict  # what papermill injects: profile, device and the -p values
    parameters: dict  # every parameter of the chapter after injection
    overrides: dict  # the -p values of this run
    folder: Path
    out: Path
    nproc_per_node: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.folder.relative_to(self.out))


# ------------------------------------------------------------------------------------- what to run
def chapters() -> list[Path]:
    """The book's chapter notebooks, in order."""
    return sorted(CHAPTER_DIR.glob("[0-9][0-9]_*.ipynb"))


def _names(chapter: Path, item: str) -> bool:
    """`--chapters` item 5, 05 or the notebook's whole stem names a chapter; nothing else does
    (0 names no chapter, not every one starting with 0)."""
    number = chapter.stem.split("_")[0]
    return item == chapter.stem or (item.isdigit() and number.isdigit()
                                    and int(item) == int(number))


def _select(selection) -> list[Path]:
    known = chapters()
    if not selection:
        return known
    picked = []
    for item in selection:
        path = Path(str(item))
        if path.suffix == ".ipynb":
            if not path.is_file():
                raise RunnerError(f"--chapters {item}: no such notebook")
            picked.append(path.resolve())
            continue
        found = [p for p in known if _names(p, str(item))]
        if not found:
            raise RunnerError(
                f"--chapters {item}: no chapter matches; chapters: "
                f"{', '.join(p.stem for p in known)} (or give a path to a .ipynb)"
            )
        picked += found
    return list(dict.fromkeys(picked))


def notebook_parameters(path: str | Path) -> dict:
    """The chapter's `parameters` cell as {name: default value} (papermill's inspect_notebook)."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    params = {}
    for name, info in found.items():
        try:
            params[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            params[name] = info["default"]
    return params


def _literal(text: str):
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[A-Za-z_][\w.\-]*", text):
            return text  # a bare word is a string: -p target_model=wrn34_10
        raise RunnerError(
            f"cannot read {text!r} as a Python literal (quote strings: 'name=\"a b\"')"
        ) from None


def parse_values(text: str) -> list:
    """The values of one `-p name=value`: a Python literal, or several, comma-separated."""
    text = text.strip()
    try:
        value = ast.literal_eval(text)
        if isinstance(value, tuple) and not text.startswith("("):
            return list(value)
        return [value]
    except (ValueError, SyntaxError):
        return [_literal(part) for part in text.split(",")]


def _parse_cli(items) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise RunnerError(
                f"-p {item}: write name=value (e.g. -p epochs=3, or -p seed=0,1,2 for a sweep)"
            )
        name, text = item.split("=", 1)
        name = name.strip()
        if not name.isidentifier():
            raise RunnerError(f"-p {item}: {name!r} is not a parameter name")
        if name in params:
            raise RunnerError(
                f"-p {name} is given twice; give all its values once, separated by commas"
            )
        try:
            params[name] = parse_values(text)
        except RunnerError as err:
            raise RunnerError(f"-p {item}: {err}") from None
    return params


def _check_value(name: str, value, default, chapter: str) -> object:
    declared = RANGES.get(name) or _method_range(name)
    if value is None and (default is None or declared is None):
        return value
    if isinstance(default, bool) or (default is not None and not isinstance(default, (int, float))):
        if not isinstance(value, type(default)):
            raise RunnerError(
                f"-p {name}={value!r}: chapter {chapter} expects {type(default).__name__} "
                f"(its default is {default!r}); got {type(value).__name__}"
            )
        return value
    if declared is None and isinstance(default, (int, float)):
        declared = Range(type(default))
    if declared is not None:
        problem = declared.check(value)
        if problem:
            none = " or None" if default is None else ""
            raise RunnerError(f"-p {name}={value!r}: chapter {chapter} allows {problem}{none}")
        if declared.kind is float:
            value = float(value)
    return value


def _folder_name(profile: str, overrides: dict) -> str:
    parts = [profile] + [f"{k}={v}" for k, v in overrides.items()]
    name = "__".join(parts)
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", name)
    if safe != name or len(safe) > 120:
        digest = hashlib.sha256(
            json.dumps(overrides, sort_keys=True, default=str).encode()
        ).hexdigest()[:8]
        safe = f"{safe[:100]}__{digest}"
    return safe


def check_out(out: Path, *, foreign_manifests: str = f"*/{MANIFEST}",
              layout: str = "`d2r run` keeps its manifests in <out>/<chapter>/<run>/") -> None:
    """Refuse an --out that is a file, holds another kind of run (a manifest matching
    `foreign_manifests`, or a training run's files) or cannot be written; `layout` says where this
    kind keeps its manifests."""
    if out.exists() and not out.is_dir():
        raise RunnerError(f"--out {out}: is a file; give a folder")
    foreign = [p for p in ("manifest.json", "last.pt", "history.json") if (out / p).exists()]
    foreign += [str(p.relative_to(out)) for p in out.glob(foreign_manifests)][:1]
    if foreign:  # a run folder of another kind (a training run, a shipped reference run)
        raise RunnerError(f"--out {out} holds the files of another run or kind ({foreign[0]}; "
                          f"{layout}); nothing was overwritten: give another folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RunnerError(f"--out {out}: {parent} is not writable")


def plan(
    profile: str,
    *,
    out,
    chapters=None,
    params: dict | None = None,
    device: str = "auto",
    nproc_per_node: int | None = None,
    kind: str = "chapters",
) -> list[Run]:
    """Check everything and list the runs (a sweep: one run per combination). Writes nothing.
    `kind` "reference": the reference runs (`reference_run.plan`)."""
    if kind not in KINDS:
        raise RunnerError(f"d2r run {kind}: allowed: {', '.join(KINDS)} (default chapters)")
    if kind == "chapters" and profile not in experiments.PROFILES:
        raise RunnerError(
            f"--profile {profile}: unknown profile; allowed: {', '.join(experiments.PROFILES)}"
        )
    if device not in experiments.DEVICES:
        raise RunnerError(f"--device {device}: allowed: {', '.join(experiments.DEVICES)}")
    try:  # a device that is not here is refused now, not inside every kernel
        experiments.pick_device(device)
    except ValueError:
        raise RunnerError(f"--device {device}: no {device.upper()} device here; use auto or "
                          "cpu") from None
    if nproc_per_node is not None and (
        isinstance(nproc_per_node, bool)
        or not isinstance(nproc_per_node, int)
        or nproc_per_node < 1
    ):
        raise RunnerError(f"--nproc-per-node {nproc_per_node}: give an integer >= 1")
    params = {
        k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in (params or {}).items()
    }
    for name, values in params.items():
        if name in RESERVED:
            raise RunnerError(f"-p {name}: set it with {RESERVED[name]}, not -p")
        if not values:
            raise RunnerError(f"-p {name}: give at least one value")
    if kind == reference_run.KIND:
        if chapters:
            raise RunnerError("--chapters: the reference runs are no chapter; leave it out")
        if nproc_per_node is not None:
            raise RunnerError("--nproc-per-node: the reference runs train in the runner's "
                              "process; leave it out")
        return reference_run.plan(profile, out=out, params=params, device=device)
    out = Path(out).absolute()
    check_out(out)
    runs = []
    for notebook in _select(chapters):
        chapter = notebook.stem
        defaults = notebook_parameters(notebook)
        if not defaults:
            raise RunnerError(
                f"chapter {chapter} has no 'parameters' cell, so it takes no parameters"
            )
        allowed = [n for n in defaults if n not in RESERVED]
        checked = {}
        for name, values in params.items():
            if name not in defaults:
                raise RunnerError(
                    f"-p {name}: chapter {chapter} has no parameter {name!r}; its parameters: "
                    + ", ".join(f"{n}={defaults[n]!r}" for n in allowed)
                )
            values = [_check_value(name, v, defaults[name], chapter) for v in values]
            unique = {(type(v).__name__, repr(v)): v for v in values}  # a sweep runs each once
            checked[name] = list(unique.values())
        for combo in itertools.product(*checked.values()):
            overrides = dict(zip(checked, combo))
            passed = {"profile": profile, "device": device, **overrides}
            folder = out / chapter / _folder_name(profile, overrides)
            runs.append(
                Run(
                    chapter=chapter,
                    notebook=notebook,
                    profile=profile,
                    passed=passed,
                    parameters={**defaults, **passed},
                    overrides=overrides,
                    folder=folder,
                    out=out,
                    nproc_per_node=nproc_per_node,
                )
            )
    return runs


def _job(r: Run, kernel, one_thread: bool) -> dict:
    """What a submitit job runs: one run (a local job keeps to one thread)."""
    if one_thread:
        os.environ["OMP_NUM_THREADS"] = "1"
    return _execute(r, kernel, one_thread=one_thread)


def _execute(r: Run, kernel, one_thread: bool = False, log=print, force: bool = False) -> dict:
    """One run: a chapter's notebook (`notebook_run`) or a reference run (`reference_run`)."""
    if r.notebook is None:
        return reference_run.execute(r, log=log, force=force)
    return notebook_run.execute(r, kernel=kernel, one_thread=one_thread, log=log)


def _is_complete(r: Run) -> bool:
    return (reference_run if r.notebook is None else notebook_run).is_complete(r)


def make_executor(cluster: str, options: dict, out: Path):
    """submitit's executor for `--cluster local|slurm`, with the job options; a clear error (and
    nothing written) where submitit or Slurm is missing. Chapter 9."""
    try:
        import submitit
    except ImportError:
        raise RunnerError(f"--cluster {cluster} needs submitit: pip install submitit") from None
    folder = Path(out) / "logs" / "%j"
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.get("time_min", 240))
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as err:  # no srun: not on a Slurm cluster
        raise RunnerError(f"--cluster slurm: {err} Use --cluster local or none here.") from None
    slurm = {
        "timeout_min": options.get("time_min", 240),
        "gpus_per_node": options.get("gpus", 1),
        "name": "d2r",
        "tasks_per_node": 1,
    }
    for key, name in (
        ("partition", "slurm_partition"),
        ("cpus", "cpus_per_task"),
        ("parallel", "slurm_array_parallelism"),
    ):
        if options.get(key) is not None:
            slurm[name] = options[key]
    executor.update_parameters(**slurm)
    return executor


def _submit(runs: list[Run], cluster: str, executor, out: Path, kernel, log) -> list[dict]:
    one = cluster == "local"
    jobs = executor.map_array(_job, runs, [kernel] * len(runs), [one] * len(runs))
    log(
        f"submitted {len(jobs)} job(s) to {cluster}: {', '.join(j.job_id for j in jobs)}; logs in "
        f"{out.name}/logs/"
    )
    manifests = []
    for r, job in zip(runs, jobs):
        try:
            manifests.append(job.result())
        except Exception as err:  # the job itself died (time limit, node failure)
            manifests.append(
                {
                    "chapter": r.chapter,
                    "run": r.name,
                    "status": "failed",
                    "error": {"ename": type(err).__name__, "evalue": str(err)[:2000]},
                }
            )
            write_json(r.folder / MANIFEST, manifests[-1])
    return manifests


def run(
    profile: str = "cpu",
    *,
    out,
    chapters=None,
    params: dict | None = None,
    device: str = "auto",
    force: bool = False,
    nproc_per_node: int | None = None,
    cluster: str = "none",
    cluster_options: dict | None = None,
    kernel: str | None = None,
    kind: str = "chapters",
    log=print,
) -> list[dict]:
    """Plan (every check first), execute the runs not complete yet, and write the results tables.
    Returns one manifest per run; the skipped ones carry `"skipped": True`. One runner per `--out`
    for chapters; reference runs lock each run instead, so that two processes share a plan (one
    core each). Chapter 9."""
    if cluster not in CLUSTERS:
        raise RunnerError(f"--cluster {cluster}: allowed: {', '.join(CLUSTERS)}")
    runs = plan(
        profile,
        out=out,
        chapters=chapters,
        params=params,
        device=device,
        nproc_per_node=nproc_per_node,
        kind=kind,
    )
    out = Path(out).absolute()
    executor = (
        make_executor(cluster, dict(cluster_options or {}), out) if cluster != "none" else None
    )
    if kind == reference_run.KIND:
        return _run_all(runs, out, force, cluster, executor, kernel, log)
    try:
        with checkpoint.exclusive(out / ".lock"):  # one runner per --out
            return _run_all(runs, out, force, cluster, executor, kernel, log)
    except checkpoint.Busy as err:
        raise RunnerError(f"--out {err}") from None


def _run_all(runs: list[Run], out: Path, force: bool, cluster: str, executor, kernel,
             log) -> list[dict]:
    todo, manifests = [], {}
    for r in runs:
        if not force and _is_complete(r):
            manifests[r.name] = {**json.loads((r.folder / MANIFEST).read_text()), "skipped": True}
            log(f"{r.name}: complete with the same parameters, skipped (--force reruns it)")
        else:
            todo.append(r)
    if todo and cluster != "none":
        for r, m in zip(todo, _submit(todo, cluster, executor, out, kernel, log)):
            manifests[r.name] = m
    else:
        for r in todo:
            log(f"{r.name}: running")
            manifests[r.name] = _execute(r, kernel, log=log, force=force)
    for r in runs:
        m = manifests[r.name]
        if not m.get("skipped"):
            where = f" at cell {m['error'].get('cell')}" if m.get("error", {}).get("cell") else ""
            detail = (
                f"{m['error']['ename']}{where}: {m['error']['evalue'][:300]}"
                if m["status"] != "ok"
                else ""
            )
            log(f"{r.name}: {m['status']} in {m.get('seconds', '?')} s {detail}".rstrip())
    write_results(out)
    return [manifests[r.name] for r in runs]


# ------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `d2r run`."""
    parser.add_argument(
        "kind",
        nargs="?",
        default="chapters",
        help="chapters (default: the book's notebooks) or reference (the shipped reference runs: "
        "-p method=... -p seed=..., one folder <out>/<method>-seed<k> each)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help=f"one of {', '.join(experiments.PROFILES)} (default cpu); for reference runs one of "
        "reference.CONFIGS (default reference)",
    )
    parser.add_argument(
        "--chapters",
        nargs="+",
        default=None,
        metavar="NN",
        help="chapter prefixes such as 05 07, or paths to notebooks (default: every chapter)",
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the chapters' parameters cell, as a Python literal; commas make a "
        "sweep (-p seed=0,1,2)",
    )
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(experiments.DEVICES)}")
    parser.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (one subfolder per run)"
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="train the chapter's declared runs under torchrun with N processes first",
    )
    parser.add_argument(
        "--cluster",
        default="none",
        help="none (here, one after another), local (submitit's "
        "local executor, jobs side by side, one thread each) or slurm (a job array)",
    )
    parser.add_argument(
        "--gpus-per-job", type=int, default=1, help="Slurm: GPUs per job (default 1)"
    )
    parser.add_argument(
        "--time-min", type=int, default=240, help="minutes per job before it is stopped"
    )
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--cpus-per-job", type=int, default=None, help="Slurm: CPUs per job")
    parser.add_argument(
        "--max-parallel", type=int, default=None, help="Slurm: jobs of the array at once"
    )
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's)")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="run nothing: time a few training steps here and print the projected training "
        "hours of every run the chapters declare (d2r_lib.lab.projection)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """`d2r run`: 0 when every run completed, 1 when one failed, 2 for a bad request (none ran)."""
    for flag, value in (
        ("--gpus-per-job", args.gpus_per_job),
        ("--time-min", args.time_min),
        ("--cpus-per-job", args.cpus_per_job),
        ("--max-parallel", args.max_parallel),
    ):
        if value is not None and value < (0 if flag == "--gpus-per-job" else 1):
            print(
                f"error: {flag} {value}: give an integer >= {0 if flag == '--gpus-per-job' else 1}",
                file=sys.stderr,
            )
            return 2
    options = {
        "gpus": args.gpus_per_job,
        "time_min": args.time_min,
        "partition": args.partition,
        "cpus": args.cpus_per_job,
        "parallel": args.max_parallel,
    }
    reference = args.kind == reference_run.KIND
    profile = args.profile or ("reference" if reference else "cpu")
    try:
        if args.estimate:
            runs = plan(profile, out=args.out, chapters=args.chapters, kind=args.kind,
                        params=_parse_cli(args.param), device=args.device)
            if reference:
                print(reference_run.estimate(runs, args.device))
                return 0
            return _estimate(runs, args.device)
        manifests = run(
            profile,
            out=args.out,
            chapters=args.chapters,
            params=_parse_cli(args.param),
            device=args.device,
            force=args.force,
            nproc_per_node=args.nproc_per_node,
            cluster=args.cluster,
            cluster_options=options,
            kernel=args.kernel,
            kind=args.kind,
        )
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [m for m in manifests if m.get("status") not in ("ok", "busy")]
    busy = sum(m.get("status") == "busy" for m in manifests)
    print(
        f"{len(manifests) - len(failed) - busy} of {len(manifests)} run(s) complete"
        + (f", {busy} run by another process" if busy else "")
        + f"; tables in {args.out}/results.md"
    )
    for m in failed:
        where = f", cell {m['error']['cell']}" if m.get("error", {}).get("cell") else ""
        print(f"FAILED {m['run']}{where}: {m['error']['ename']}", file=sys.stderr)
    return 1 if failed else 0


def _estimate(runs: list[Run], device: str) -> int:
    """`d2r run --estimate`: the checked plan's projected training hours; writes nothing."""
    from . import projection

    base = projection.fit_here(experiments.pick_device(device))
    print(projection.table(projection.project(runs, base), base))
    return 0
