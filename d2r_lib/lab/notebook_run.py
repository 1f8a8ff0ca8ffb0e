"""One run of a chapter notebook for the runner (`d2r run`): a fresh kernel, the manifest
(parameters, code version, versions, device, times, peak memory, status; `start_manifest` writes
every run's, the reference runs' too), and the results tables of an output folder. Also the entry
point that `--nproc-per-node` starts under torchrun: `python -m d2r_lib.lab.notebook_run SPEC.json`.
Chapter 9.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .. import experiments
from ..validate import D2RWarning

__all__ = [
    "MANIFEST",
    "execute",
    "finish_manifest",
    "git_commit",
    "versions",
    "is_complete",
    "start_manifest",
    "train_declared",
    "write_json",
    "write_results",
]

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"


# -------------------------------------------------------------------------------------- provenance
def git_commit() -> tuple[str | None, str | None, bool | None]:
    """(commit, reason when None, dirty) of the checkout that holds d2r_lib."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"git could not run ({type(err).__name__})", None
    commit = done.stdout.strip()
    if done.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None, "d2r_lib is not installed from a git checkout", None
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return commit, None, bool(status.stdout.strip())


def versions() -> dict:
    """Python's version and those of the packages a run depends on (None: not installed); every
    manifest records them."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for key, name in (("torch", "torch"), ("torchvision", "torchvision"), ("d2r_lib", "d2r_lib"),
                      ("papermill", "papermill"), ("autoattack", "pyautoattack")):
        try:
            found[key] = md.version(name)
        except md.PackageNotFoundError:
            found[key] = None
    return found


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, blob) -> None:
    """Write `blob` as JSON atomically."""
    from .. import checkpoint

    text = json.dumps(blob, indent=1, default=str)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def start_manifest(r, **fields) -> dict:
    """The manifest of a run as it starts, the one format of every run of the runner (a chapter's
    notebook or a reference run): `fields` (what ran), then the run, its parameters, the code's
    commit, the versions and the host. `finish_manifest` completes it."""
    commit, reason, dirty = git_commit()
    manifest = {**fields, "run": r.name, "profile": r.profile, "overrides": r.overrides,
                "passed": r.passed, "parameters": r.parameters, "git_commit": commit,
                "git_dirty": dirty, "versions": versions(), "status": "running",
                "started": _now(), "host_threads": os.cpu_count()}
    if reason:
        manifest["git_commit_reason"] = reason
    return manifest


def finish_manifest(manifest: dict, status: str, seconds: float, **fields) -> dict:
    """Complete a run's manifest: when it ended, how long it took, its status and `fields`."""
    manifest.update(ended=_now(), seconds=round(seconds, 2), status=status, **fields)
    return manifest


def cpu_name() -> str:
    return f"{platform.machine()} CPU ({os.cpu_count()} threads)"


def _notebook_label(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name


# --------------------------------------------------------------------------------------- execution
PROBE = """import json as _j, resource as _r, sys as _s
_t = _s.modules.get("torch")
_u = 2 ** 20 if _s.platform == "darwin" else 2 ** 10
_m = {"rss_max_mb": _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / _u}
if _t is not None and _t.cuda.is_available() and _t.cuda.is_initialized():
    _m["cuda_max_allocated_mb"] = _t.cuda.max_memory_allocated() / 2 ** 20
    _m["device_name"] = _t.cuda.get_device_name()
print("D2R_PROBE" + _j.dumps(_m))"""


def _execute_notebook(
    nb, cwd: Path, kernel: str | None, env: dict, log_path: Path
) -> tuple[dict | None, dict]:
    """Run every cell in one fresh kernel, then the memory probe; (error or None, probe)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    kernel = kernel or nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(
        nb,
        timeout=None,
        kernel_name=kernel,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    error, probe = None, {}
    # the kernel process's own messages (not the notebook's output) go to kernel.log
    with open(log_path, "w") as kernel_log, client.setup_kernel(env=env, stderr=kernel_log):
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as err:
                error = {
                    "index": index,
                    "execution_count": cell.get("execution_count"),
                    "ename": err.ename,
                    "evalue": str(err.evalue)[:2000],
                }
                break
        nb.cells.append(nbformat.v4.new_code_cell(PROBE))
        try:  # the probe runs after the chapter (also after a failed cell) and is not kept
            client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
            text = "".join(
                o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream"
            )
            probe = json.loads(text.split("D2R_PROBE", 1)[1]) if "D2R_PROBE" in text else {}
        except CellExecutionError:
            probe = {}
        finally:
            nb.cells.pop()
    return error, probe


def _source_cell(nb, index: int) -> int:
    """1-based position in the chapter as committed of output cell `index` (papermill adds one)."""
    injected = [
        i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])
    ]
    return index + 1 - (1 if injected and index > injected[0] else 0)


def _pretrain(r, env: dict, log) -> None:
    """Train the runs the chapter declares (its cell tagged `runs`) under torchrun."""
    cfg = experiments.run_config(r.profile, r.parameters, r.passed["device"])
    configs = experiments.chapter_runs(r.notebook, cfg, r.parameters)
    if not configs:
        log(
            f"{r.name}: the chapter declares no training runs; --nproc-per-node has nothing "
            "to train"
        )
        return
    spec = r.folder / "torchrun_runs.json"
    write_json(spec, {"device": cfg.device, "runs": [c.as_dict() for c in configs]})
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(r.nproc_per_node),
        "-m",
        "d2r_lib.lab.notebook_run",
        str(spec),
    ]
    log(
        f"{r.name}: training {len(configs)} declared run(s) with torchrun on "
        f"{r.nproc_per_node} processes"
    )
    with open(r.folder / "torchrun.log", "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    r.meta["torchrun"] = {
        "nproc_per_node": r.nproc_per_node,
        "runs": len(configs),
        "exit_code": done.returncode,
    }
    if done.returncode != 0:
        raise RuntimeError(
            f"torchrun exited with code {done.returncode}; see {r.name}/torchrun.log"
        )


def execute(r, *, kernel: str | None = None, one_thread: bool = False, log=print) -> dict:
    """Execute one run into its folder and return its manifest (status "ok" or "failed")."""
    import nbformat
    import papermill.parameterize as pm

    manifest = start_manifest(r, chapter=r.chapter, notebook=_notebook_label(r.notebook))
    results = r.folder / "results"
    if results.is_dir():
        for old in results.glob("*.json"):
            old.unlink()
    r.folder.mkdir(parents=True, exist_ok=True)
    write_json(r.folder / MANIFEST, manifest)
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
        error, probe = _execute_notebook(
            nb, r.notebook.parent, kernel, env, r.folder / "kernel.log"
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the manifest says so, then the runner stops
        finish_manifest(manifest, "interrupted", time.perf_counter() - started)
        write_json(r.folder / MANIFEST, manifest)
        raise
    except (
        Exception
    ) as err:  # a kernel that died, torchrun that failed: reported, the other runs go on
        error = {
            "index": None,
            "execution_count": None,
            "ename": type(err).__name__,
            "evalue": str(err)[:2000],
        }
    seconds = time.perf_counter() - started
    nbformat.write(nb, r.folder / "notebook.ipynb")
    saved = experiments.load_results(results) if results.is_dir() else []
    finish_manifest(
        manifest,
        "failed" if error else "ok",
        seconds,
        device=saved[0]["config"]["device"] if saved else r.passed["device"],
        device_name=probe.get("device_name") or cpu_name(),
        peak_memory_mb={
            "rss": probe.get("rss_max_mb"),
            "cuda_max_allocated": probe.get("cuda_max_allocated_mb"),
        },
        config=saved[0]["config"] if saved else None,
        results=[item["name"] for item in saved],
        **r.meta,
    )
    if error:
        if error["index"] is not None:
            error["cell"] = _source_cell(nb, error.pop("index"))
        else:
            error.pop("index")
        manifest["error"] = error
    write_json(r.folder / MANIFEST, manifest)
    return manifest


def is_complete(r) -> bool:
    """Whether run `r` completed before with the same parameters (then the runner skips it)."""
    path = r.folder / MANIFEST
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return old.get("status") == "ok" and old.get("passed") == json.loads(
        json.dumps(r.passed, default=str)
    )


# ----------------------------------------------------------------------------------------- results
def _manifests(out: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(out.rglob(MANIFEST)):
        try:
            blob = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # written atomically, so never half: damaged
            warnings.warn(f"skipped the damaged manifest {path} ({type(err).__name__}: {err})",
                          D2RWarning, stacklevel=3)
            continue
        if isinstance(blob, dict):
            found.append((path.parent, _current(blob)))
        else:
            warnings.warn(f"skipped the damaged manifest {path} (not a JSON object)", D2RWarning,
                          stacklevel=3)
    return found


def _current(m: dict) -> dict:
    """A reference run's manifest written before the runner ran them, read as the runner's."""
    if "status" in m or m.get("complete") is not True:
        return m
    return {**m, "kind": "reference", "status": "ok", "profile": m["config"]["name"],
            "name": m.get("run", m["method"]),
            "overrides": {"method": m["method"], "seed": m["seed"]},
            "git_commit": m["commit"].split("+")[0], "seconds": m["seconds"].get("this_call")}


def _reference_row(folder: Path, m: dict, out: Path) -> dict:
    from ..reference import METRICS

    metrics = json.loads((folder / "metrics.json").read_text())
    return {"run": str(folder.relative_to(out)), "chapter": "reference",
            "profile": m.get("profile"), **m.get("overrides", {}), "seed": m.get("seed"),
            "table": "reference", "row": m.get("name"), **{k: metrics[k] for k in METRICS}}


def _rows(runs: list[tuple[Path, dict]], out: Path) -> list[dict]:
    rows = []
    for folder, m in runs:
        if m.get("kind") == "reference" and m.get("status") == "ok":
            rows.append(_reference_row(folder, m, out))
            continue
        if m.get("status") != "ok" or not (folder / "results").is_dir():
            continue
        for item in experiments.load_results(folder / "results"):
            for row_name, values in item["table"].rows.items():
                rows.append(
                    {
                        "run": str(folder.relative_to(out)),
                        "chapter": m.get("chapter"),
                        "profile": m.get("profile"),
                        "seed": item["config"].get("seed"),
                        **m.get("overrides", {}),
                        "table": item["name"],
                        "row": row_name,
                        **values,
                    }
                )
    return rows


def _markdown(columns: list[str], rows: list[dict], percent=()) -> list[str]:
    def cell(row, c):
        value = row.get(c, "")
        return f"{100 * value:.2f}" if c in percent and isinstance(value, float) else str(value)

    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows],
        "",
    ]


def _csv(columns: list[str], rows: list[dict]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out) -> tuple[Path, Path, Path] | None:
    """Gather the runs under `out` into runs.csv, and every results table of every completed run
    into results.csv; results.md shows both. Returns the three paths (None: `out` holds no run)."""
    from .. import checkpoint

    out = Path(out)
    runs = _manifests(out)
    if not runs:
        return None
    params = list(dict.fromkeys(k for _, m in runs for k in m.get("overrides", {}) if k != "seed"))
    summary = [
        {
            "run": str(folder.relative_to(out)),
            "chapter": m.get("chapter", m.get("kind")),
            "profile": m.get("profile"),
            "seed": (m.get("parameters") or m.get("overrides") or {}).get("seed"),
            **m.get("overrides", {}),
            "status": m.get("status"),
            "seconds": m.get("seconds"),
            "peak_rss_mb": round((m.get("peak_memory_mb") or {}).get("rss") or 0) or None,
            "git_commit": (m.get("git_commit") or "")[:10],
        }
        for folder, m in runs
    ]
    run_columns = [
        "chapter",
        "profile",
        "seed",
        *params,
        "status",
        "seconds",
        "peak_rss_mb",
        "git_commit",
    ]
    rows = _rows(runs, out)
    metrics = list(
        dict.fromkeys(
            k
            for r in rows
            for k in r
            if k not in {"run", "chapter", "profile", "seed", "table", "row", *params}
        )
    )
    lines = [f"### runs ({len(runs)})", "", *_markdown(run_columns, summary)]
    for table in dict.fromkeys(r["table"] for r in rows):
        mine = [r for r in rows if r["table"] == table]
        cols = [
            "chapter",
            "profile",
            "seed",
            *[p for p in params if any(p in r for r in mine)],
            "row",
            *[k for k in metrics if any(k in r for r in mine)],
        ]
        lines += [f"### {table} (accuracy, %)", "", *_markdown(cols, mine, percent=metrics)]
    paths = out / "runs.csv", out / "results.csv", out / "results.md"
    texts = (
        _csv(["run", *run_columns], summary),
        _csv(["run", "chapter", "profile", "seed", *params, "table", "row", *metrics], rows),
        "\n".join(lines),
    )
    for path, text in zip(paths, texts):
        checkpoint.atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
    return paths


def train_declared(spec: str | Path) -> int:
    """Run under torchrun by `--nproc-per-node`: train (or resume, or load) each run of the spec
    into the checkpoint cache."""
    from .. import train

    blob = json.loads(Path(spec).read_text())
    for fields in blob["runs"]:
        train.load_or_train(
            train.TrainConfig(**fields),
            device=blob["device"],
            progress=False,
            log=lambda msg="", *a, **k: print(experiments.cache_label(msg), *a, **k),
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(
            "usage: torchrun ... -m d2r_lib.lab.notebook_run SPEC.json "
            "(written by `d2r run --nproc-per-node`)"
        )
    sys.exit(train_declared(sys.argv[1]))
