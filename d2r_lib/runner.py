"""`d2r run`: chapters as parameterised experiments, on a laptop, on several GPUs or on a Slurm cluster.
Chapter 9 shows it.

    d2r run --profile P [--chapters 05 07] [-p name=value ...] [--device cuda] [--force] --out DIR
            [--nproc-per-node N] [--cluster local|slurm ...]

Every `-p` name must be a parameter of each selected chapter (its `parameters` cell), with the default's type
and, for the common names, a range; everything is checked before anything runs or is written. A value with
commas is a sweep: `-p w_clean=0,10 -p seed=0,1` gives four runs, each in its own folder
`DIR/<chapter>/<profile>__w_clean=0__seed=0/` holding the executed notebook, `manifest.json` (parameters,
code version, versions, device, times, peak memory, status) and the chapter's saved results. `DIR/results.csv`
and `DIR/results.md` gather every results table of every run in DIR. A run that completed with the same
parameters is skipped (`--force` reruns it); training inside a chapter resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import experiments

__all__ = ["RunnerError", "Range", "RANGES", "Run", "CHAPTER_DIR", "MANIFEST", "chapters", "notebook_parameters",
           "parse_values", "plan", "execute", "run", "write_results", "git_commit", "add_arguments", "main",
           "train_declared"]

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_DIR = ROOT / "book"
MANIFEST = "manifest.json"
CLUSTERS = ("none", "local", "slurm")
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
        if value != value or (self.min is not None and (value <= self.min if self.min_open else value < self.min)):
            return allowed
        if self.max is not None and value > self.max:
            return allowed
        return None


RANGES = {
    "seed": Range(int, 0), "epochs": Range(int, 1), "steps": Range(int, 1), "batch_size": Range(int, 1),
    "train_size": Range(int, 1), "test_size": Range(int, 1), "attacked": Range(int, 1), "held_out": Range(int, 1),
    "eps": Range(float, 0, 1, min_open=True), "step_size": Range(float, 0, 1, min_open=True),
    "lr": Range(float, 0, min_open=True), "beta": Range(float, 0), "w_clean": Range(float, 0),
    "w_adv": Range(float, 0), "w_mse": Range(float, 0),
}
"""Declared ranges of the common parameters (a None value is allowed where the chapter's default is None)."""


@dataclass
class Run:
    """One execution of one chapter with one set of parameters (one point of a sweep)."""
    chapter: str                   # the notebook's file stem, e.g. "07_d2r_end_to_end"
    notebook: Path
    profile: str
    passed: dict                   # what papermill injects: profile, device and the -p values
    parameters: dict               # every parameter of the chapter after injection
    overrides: dict                # the -p values of this run
    folder: Path
    out: Path
    nproc_per_node: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.folder.relative_to(self.out))


# ------------------------------------------------------------------------------------ what to run
def chapters() -> list[Path]:
    """The book's chapter notebooks, in order."""
    return sorted(CHAPTER_DIR.glob("[0-9][0-9]_*.ipynb"))


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
        found = [p for p in known if p.stem.startswith(str(item))]
        if not found:
            raise RunnerError(f"--chapters {item}: no chapter matches; chapters: "
                              f"{', '.join(p.stem for p in known)} (or give a path to a .ipynb)")
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
        raise RunnerError(f"cannot read {text!r} as a Python literal (quote strings: 'name=\"a b\"')") from None


def parse_values(text: str) -> list:
    """The values of one `-p name=value`: a Python literal, or several separated by commas (a sweep)."""
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
            raise RunnerError(f"-p {item}: write name=value (e.g. -p epochs=3, or -p seed=0,1,2 for a sweep)")
        name, text = item.split("=", 1)
        name = name.strip()
        if not name.isidentifier():
            raise RunnerError(f"-p {item}: {name!r} is not a parameter name")
        if name in params:
            raise RunnerError(f"-p {name} is given twice; give all its values once, separated by commas")
        try:
            params[name] = parse_values(text)
        except RunnerError as err:
            raise RunnerError(f"-p {item}: {err}") from None
    return params


def _check_value(name: str, value, default, chapter: str) -> object:
    declared = RANGES.get(name)
    if value is None and (default is None or declared is None):
        return value
    if isinstance(default, bool) or (default is not None and not isinstance(default, (int, float))):
        if not isinstance(value, type(default)):
            raise RunnerError(f"-p {name}={value!r}: chapter {chapter} expects {type(default).__name__} "
                              f"(its default is {default!r}); got {type(value).__name__}")
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
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
        safe = f"{safe[:100]}__{digest}"
    return safe


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunnerError(f"--out {out}: is a file; give a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RunnerError(f"--out {out}: {parent} is not writable")


def plan(profile: str, *, out, chapters=None, params: dict | None = None, device: str = "auto",
         nproc_per_node: int | None = None) -> list[Run]:
    """Check everything and list the runs (a sweep expands to one run per combination). Writes nothing."""
    if profile not in experiments.PROFILES:
        raise RunnerError(f"--profile {profile}: unknown profile; allowed: {', '.join(experiments.PROFILES)}")
    if device not in experiments.DEVICES:
        raise RunnerError(f"--device {device}: allowed: {', '.join(experiments.DEVICES)}")
    if nproc_per_node is not None and (isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int)
                                       or nproc_per_node < 1):
        raise RunnerError(f"--nproc-per-node {nproc_per_node}: give an integer >= 1")
    out = Path(out).absolute()
    _check_out(out)
    params = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in (params or {}).items()}
    for name, values in params.items():
        if name in RESERVED:
            raise RunnerError(f"-p {name}: set it with {RESERVED[name]}, not -p")
        if not values:
            raise RunnerError(f"-p {name}: give at least one value")
    runs = []
    for notebook in _select(chapters):
        chapter = notebook.stem
        defaults = notebook_parameters(notebook)
        if not defaults:
            raise RunnerError(f"chapter {chapter} has no 'parameters' cell, so it takes no parameters")
        allowed = [n for n in defaults if n not in RESERVED]
        checked = {}
        for name, values in params.items():
            if name not in defaults:
                raise RunnerError(f"-p {name}: chapter {chapter} has no parameter {name!r}; its parameters: "
                                  + ", ".join(f"{n}={defaults[n]!r}" for n in allowed))
            checked[name] = [_check_value(name, v, defaults[name], chapter) for v in values]
        for combo in itertools.product(*checked.values()):
            overrides = dict(zip(checked, combo))
            passed = {"profile": profile, "device": device, **overrides}
            folder = out / chapter / _folder_name(profile, overrides)
            runs.append(Run(chapter=chapter, notebook=notebook, profile=profile, passed=passed,
                            parameters={**defaults, **passed}, overrides=overrides, folder=folder, out=out,
                            nproc_per_node=nproc_per_node))
    return runs


# ---------------------------------------------------------------------------------------- provenance
def git_commit() -> tuple[str | None, str | None, bool | None]:
    """(commit, reason when None, dirty) of the checkout that holds d2r_lib."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"git could not run ({type(err).__name__})", None
    commit = done.stdout.strip()
    if done.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None, "d2r_lib is not installed from a git checkout", None
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=20)
    return commit, None, bool(status.stdout.strip())


def _versions() -> dict:
    import importlib.metadata as md
    found = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "d2r_lib", "papermill"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, blob) -> None:
    from . import checkpoint
    text = json.dumps(blob, indent=1, default=str)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _notebook_label(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name


# ------------------------------------------------------------------------------------------ execution
PROBE = """import json as _j, resource as _r, sys as _s
_t = _s.modules.get("torch")
_m = {"rss_max_mb": _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / (2 ** 20 if _s.platform == "darwin" else 2 ** 10)}
if _t is not None and _t.cuda.is_available() and _t.cuda.is_initialized():
    _m.update(cuda_max_allocated_mb=_t.cuda.max_memory_allocated() / 2 ** 20, device_name=_t.cuda.get_device_name())
print("D2R_PROBE" + _j.dumps(_m))"""


def _execute_notebook(nb, cwd: Path, kernel: str | None, env: dict) -> tuple[dict | None, dict]:
    """Run every cell in one fresh kernel, then the memory probe; (error or None, probe)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    kernel = kernel or nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(nb, timeout=None, kernel_name=kernel, allow_errors=False,
                            resources={"metadata": {"path": str(cwd)}})
    error, probe = None, {}
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as err:
                error = {"index": index, "execution_count": cell.get("execution_count"),
                         "ename": err.ename, "evalue": str(err.evalue)[:2000]}
                break
        nb.cells.append(nbformat.v4.new_code_cell(PROBE))
        try:  # the probe runs after the chapter (also after a failed cell) and is not kept
            client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
            text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
            probe = json.loads(text.split("D2R_PROBE", 1)[1]) if "D2R_PROBE" in text else {}
        except CellExecutionError:
            probe = {}
        finally:
            nb.cells.pop()
    return error, probe


def _source_cell(nb, index: int) -> int:
    """1-based position in the chapter as committed of output cell `index` (papermill adds one cell)."""
    injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    return index + 1 - (1 if injected and index > injected[0] else 0)


def _pretrain(r: Run, env: dict, log) -> None:
    """Under torchrun, train the runs the chapter declares (experiments.CHAPTER_RUNS) into the cache."""
    fields = {k: v for k, v in r.parameters.items() if k in experiments.PROFILE_FIELDS}
    cfg = experiments.resolve(r.profile, seed=r.parameters.get("seed", 0), device=r.passed["device"],
                              verbose=False, **fields)
    configs = experiments.chapter_runs(r.chapter, cfg, r.parameters)
    if not configs:
        log(f"{r.name}: the chapter declares no training runs; --nproc-per-node has nothing to train")
        return
    spec = r.folder / "torchrun_runs.json"
    _write_json(spec, {"device": cfg.device, "runs": [c.as_dict() for c in configs]})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(r.nproc_per_node), "-m", "d2r_lib.runner", str(spec)]
    log(f"{r.name}: training {len(configs)} declared run(s) with torchrun on {r.nproc_per_node} processes")
    with open(r.folder / "torchrun.log", "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    r.meta["torchrun"] = {"nproc_per_node": r.nproc_per_node, "runs": len(configs), "exit_code": done.returncode}
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {done.returncode}; see {r.name}/torchrun.log")


def execute(r: Run, *, kernel: str | None = None, one_thread: bool = False, log=print) -> dict:
    """Execute one run into its folder and return its manifest (status "ok" or "failed")."""
    import nbformat
    import papermill.parameterize as pm
    commit, reason, dirty = git_commit()
    manifest = {"chapter": r.chapter, "notebook": _notebook_label(r.notebook), "run": r.name,
                "profile": r.profile, "overrides": r.overrides, "passed": r.passed, "parameters": r.parameters,
                "git_commit": commit, "git_dirty": dirty, "versions": _versions(), "status": "running",
                "started": _now(), "host_threads": os.cpu_count()}
    if reason:
        manifest["git_commit_reason"] = reason
    results = r.folder / "results"
    if results.is_dir():
        for old in results.glob("*.json"):
            old.unlink()
    r.folder.mkdir(parents=True, exist_ok=True)
    _write_json(r.folder / MANIFEST, manifest)
    env = {k: v for k, v in os.environ.items() if k != experiments.PROFILE_ENV}
    env[experiments.RESULTS_ENV] = str(results)
    if one_thread:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    started = time.perf_counter()
    nb = nbformat.read(r.notebook, as_version=4)
    nb.metadata.setdefault("papermill", {})
    for cell in nb.cells:
        cell.metadata.setdefault("tags", [])
    error, probe = None, {}
    try:
        nb = pm.parameterize_notebook(nb, r.passed)
        if r.nproc_per_node:
            _pretrain(r, env, log)
        error, probe = _execute_notebook(nb, r.notebook.parent, kernel, env)
    except Exception as err:  # a kernel that died, torchrun that failed: reported, the other runs go on
        error = {"index": None, "execution_count": None, "ename": type(err).__name__, "evalue": str(err)[:2000]}
    seconds = time.perf_counter() - started
    nbformat.write(nb, r.folder / "notebook.ipynb")
    saved = experiments.load_results(results) if results.is_dir() else []
    manifest.update(
        ended=_now(), seconds=round(seconds, 2), status="failed" if error else "ok",
        device=saved[0]["config"]["device"] if saved else r.passed["device"],
        device_name=probe.get("device_name") or f"{platform.machine()} CPU ({os.cpu_count()} threads)",
        peak_memory_mb={"rss": probe.get("rss_max_mb"), "cuda_max_allocated": probe.get("cuda_max_allocated_mb")},
        config=saved[0]["config"] if saved else None, results=[item["name"] for item in saved], **r.meta)
    if error:
        if error["index"] is not None:
            error["cell"] = _source_cell(nb, error.pop("index"))
        else:
            error.pop("index")
        manifest["error"] = error
    _write_json(r.folder / MANIFEST, manifest)
    return manifest


def _complete(r: Run) -> bool:
    path = r.folder / MANIFEST
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return old.get("status") == "ok" and old.get("passed") == json.loads(json.dumps(r.passed, default=str))


def _job(r: Run, kernel, one_thread: bool) -> dict:
    """What a submitit job runs: one run (a local job keeps to one thread)."""
    if one_thread:
        os.environ["OMP_NUM_THREADS"] = "1"
    return execute(r, kernel=kernel, one_thread=one_thread)


def _submit(runs: list[Run], cluster: str, options: dict, out: Path, kernel, log) -> list[dict]:
    import submitit
    folder = out / "logs" / "%j"
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.get("time_min", 240))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        slurm = {"timeout_min": options.get("time_min", 240), "gpus_per_node": options.get("gpus", 1),
                 "name": "d2r", "tasks_per_node": 1}
        for key, name in (("partition", "slurm_partition"), ("cpus", "cpus_per_task"),
                          ("parallel", "slurm_array_parallelism")):
            if options.get(key) is not None:
                slurm[name] = options[key]
        executor.update_parameters(**slurm)
    one = cluster == "local"
    jobs = executor.map_array(_job, runs, [kernel] * len(runs), [one] * len(runs))
    log(f"submitted {len(jobs)} job(s) to {cluster}: {', '.join(j.job_id for j in jobs)}; logs in "
        f"{out.name}/logs/")
    manifests = []
    for r, job in zip(runs, jobs):
        try:
            manifests.append(job.result())
        except Exception as err:  # the job itself died (time limit, node failure)
            manifests.append({"chapter": r.chapter, "run": r.name, "status": "failed",
                              "error": {"ename": type(err).__name__, "evalue": str(err)[:2000]}})
            _write_json(r.folder / MANIFEST, manifests[-1])
    return manifests


def run(profile: str = "cpu", *, out, chapters=None, params: dict | None = None, device: str = "auto",
        force: bool = False, nproc_per_node: int | None = None, cluster: str = "none",
        cluster_options: dict | None = None, kernel: str | None = None, log=print) -> list[dict]:
    """Plan (every check first), execute the runs that are not complete yet, and write the results tables.
    Returns one manifest per run; the skipped ones carry `"skipped": True`. Chapter 9."""
    if cluster not in CLUSTERS:
        raise RunnerError(f"--cluster {cluster}: allowed: {', '.join(CLUSTERS)}")
    runs = plan(profile, out=out, chapters=chapters, params=params, device=device, nproc_per_node=nproc_per_node)
    out = Path(out).absolute()
    todo, manifests = [], {}
    for r in runs:
        if not force and _complete(r):
            manifests[r.name] = {**json.loads((r.folder / MANIFEST).read_text()), "skipped": True}
            log(f"{r.name}: complete with the same parameters, skipped (--force reruns it)")
        else:
            todo.append(r)
    if todo and cluster != "none":
        for r, m in zip(todo, _submit(todo, cluster, dict(cluster_options or {}), out, kernel, log)):
            manifests[r.name] = m
    else:
        for r in todo:
            log(f"{r.name}: running")
            manifests[r.name] = execute(r, kernel=kernel, log=log)
    for r in runs:
        m = manifests[r.name]
        if not m.get("skipped"):
            where = f" at cell {m['error'].get('cell')}" if m.get("error", {}).get("cell") else ""
            detail = f"{m['error']['ename']}{where}: {m['error']['evalue'][:300]}" if m["status"] != "ok" else ""
            log(f"{r.name}: {m['status']} in {m.get('seconds', '?')} s {detail}".rstrip())
    write_results(out)
    return [manifests[r.name] for r in runs]


# -------------------------------------------------------------------------------------------- results
def _rows(out: Path) -> tuple[list[dict], list[str], list[str]]:
    rows, params, metrics = [], [], []
    for path in sorted(out.rglob(MANIFEST)):
        m = json.loads(path.read_text())
        if m.get("status") != "ok" or not (path.parent / "results").is_dir():
            continue
        for item in experiments.load_results(path.parent / "results"):
            for row_name, values in item["table"].rows.items():
                row = {"run": str(path.parent.relative_to(out)), "chapter": m["chapter"], "profile": m["profile"],
                       "seed": item["config"]["seed"], **m.get("overrides", {}), "table": item["name"],
                       "row": row_name, **values}
                params += [k for k in m.get("overrides", {}) if k not in params and k != "seed"]
                metrics += [k for k in values if k not in metrics]
                rows.append(row)
    return rows, params, metrics


def write_results(out) -> tuple[Path, Path] | None:
    """Gather every results table of every completed run under `out` into results.csv and results.md."""
    import csv
    import io
    out = Path(out)
    rows, params, metrics = _rows(out)
    if not rows:
        return None
    columns = ["run", "chapter", "profile", "seed", *params, "table", "row", *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    lines = [f"Results of {len(rows)} row(s) from the runs under this folder (accuracies in %; "
             f"each run's manifest.json holds its parameters and versions).", ""]
    for table in dict.fromkeys(r["table"] for r in rows):
        mine = [r for r in rows if r["table"] == table]
        cols = ["chapter", "profile", "seed", *[p for p in params if any(p in r for r in mine)], "row",
                *[k for k in metrics if any(k in r for r in mine)]]
        lines += [f"### {table}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in mine:
            cells = [f"{100 * r[c]:.2f}" if c in metrics and isinstance(r.get(c), float) else str(r.get(c, ""))
                     for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    from . import checkpoint
    csv_path, md_path = out / "results.csv", out / "results.md"
    checkpoint.atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    checkpoint.atomic_write(md_path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return csv_path, md_path


# ----------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `d2r run`."""
    parser.add_argument("--profile", default="cpu", help=f"one of {', '.join(experiments.PROFILES)} (default cpu)")
    parser.add_argument("--chapters", nargs="+", default=None, metavar="NN",
                        help="chapter prefixes such as 05 07, or paths to notebooks (default: every chapter)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of the chapters' parameters cell, as a Python literal; commas make a "
                             "sweep (-p seed=0,1,2)")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(experiments.DEVICES)}")
    parser.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    parser.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per run)")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="train the chapter's declared runs under torchrun with N processes first")
    parser.add_argument("--cluster", default="none", help="none (here, one after another), local (submitit's "
                        "local executor, jobs side by side, one thread each) or slurm (a job array)")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="Slurm: GPUs per job (default 1)")
    parser.add_argument("--time-min", type=int, default=240, help="minutes per job before it is stopped")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--cpus-per-job", type=int, default=None, help="Slurm: CPUs per job")
    parser.add_argument("--max-parallel", type=int, default=None, help="Slurm: jobs of the array at once")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's)")
    return parser


def main(args: argparse.Namespace) -> int:
    """`d2r run`: 0 when every run completed, 1 when one failed, 2 for a bad request (nothing ran)."""
    for flag, value in (("--gpus-per-job", args.gpus_per_job), ("--time-min", args.time_min),
                        ("--cpus-per-job", args.cpus_per_job), ("--max-parallel", args.max_parallel)):
        if value is not None and value < (0 if flag == "--gpus-per-job" else 1):
            print(f"error: {flag} {value}: give an integer >= {0 if flag == '--gpus-per-job' else 1}",
                  file=sys.stderr)
            return 2
    options = {"gpus": args.gpus_per_job, "time_min": args.time_min, "partition": args.partition,
               "cpus": args.cpus_per_job, "parallel": args.max_parallel}
    try:
        manifests = run(args.profile, out=args.out, chapters=args.chapters, params=_parse_cli(args.param),
                        device=args.device, force=args.force, nproc_per_node=args.nproc_per_node,
                        cluster=args.cluster, cluster_options=options, kernel=args.kernel)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [m for m in manifests if m.get("status") != "ok"]
    print(f"{len(manifests) - len(failed)} of {len(manifests)} run(s) complete; tables in {args.out}/results.md")
    for m in failed:
        where = f", cell {m['error']['cell']}" if m.get("error", {}).get("cell") else ""
        print(f"FAILED {m['run']}{where}: {m['error']['ename']}", file=sys.stderr)
    return 1 if failed else 0


def train_declared(spec: str | Path) -> int:
    """Run under torchrun by `--nproc-per-node`: train (or resume, or load) each run of the spec in the cache."""
    from . import train
    blob = json.loads(Path(spec).read_text())
    for fields in blob["runs"]:
        train.load_or_train(train.TrainConfig(**fields), device=blob["device"], progress=False,
                            log=lambda msg="", *a, **k: print(experiments.cache_label(msg), *a, **k))
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m d2r_lib.runner SPEC.json (written by `d2r run --nproc-per-node`)")
    sys.exit(train_declared(sys.argv[1]))
