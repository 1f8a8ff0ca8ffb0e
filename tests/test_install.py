"""A learner's install, outside the checkout: the wheel built from a clean copy of the tree,
installed (no -e) by the exact Colab shim of an exercise into a fresh environment that cannot see
the checkout, then `d2r --help`, `d2r demo`, a solution notebook and a chapter run from a temporary
folder.

The fresh environment reuses the installed torch (and the other dependencies) through a .pth file
pointing at a folder of links to the current site-packages, d2r_lib left out, so it costs seconds,
not a download; pip runs with --no-index, so nothing is fetched. Kernels use one thread each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch
from notebook_lint import INSTALL_ENV, install_lines, install_spec

import d2r_lib
from d2r_lib import shipped

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = ROOT / "exercises" / "01_fgsm_pgd.ipynb"  # its first cell: the shim, then the imports
SOLUTION = ROOT / "solutions" / "01_fgsm_pgd.ipynb"
CHAPTER = ROOT / "book" / "07_d2r_end_to_end.ipynb"  # reads the shipped runs (d2r_lib/_book)
HIDDEN = ("d2r_lib", "__editable__", "_distutils_hack")  # never visible in the fresh environment

# Run in the fresh kernel after a notebook: where d2r_lib and the shipped runs come from, and any
# imported module whose file is inside the checkout.
LEAK_CHECK = """\
import json, os, sys
import d2r_lib
from d2r_lib import shipped
_root = os.environ["D2R_TEST_CHECKOUT"] + os.sep
_files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
print("LEAK-CHECK " + json.dumps({
    "inside": sorted({f for f in _files if os.path.abspath(f).startswith(_root)}),
    "d2r_lib": d2r_lib.__file__, "reference": str(shipped.find("reference")),
}))
"""

# Runs inside the fresh environment's Python: executes a notebook in a fresh kernel of that Python.
EXECUTE = """\
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=900, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[1])
"""


def _files_of_the_tree() -> list[str]:
    """Tracked and untracked-but-not-ignored files (what a fresh clone plus new work holds)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    skip = {".venv", "_build", ".git", "runs", "__pycache__", "_vendor"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def _clean_environ() -> dict:
    """os.environ without what would let a fresh environment see the checkout's packages."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("D2R_", "PYTHON", "VIRTUAL_ENV", "JUPYTER", "PIP_"))}


def _run(cmd, *, env, cwd, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a clean copy of the tree with the installed setuptools (offline)."""
    ask = "import setuptools; print(setuptools.__version__)"
    found = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True).stdout
    found = found.strip()
    if int((found or "0").split(".")[0]) < 77:
        pytest.fail(f"building the wheel needs setuptools >= 77 (pyproject.toml), found {found!r}: "
                    "pip install 'setuptools>=77' (requirements.txt lists it)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in _files_of_the_tree():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", tmp / "dist", src], env=env, cwd=tmp)
    (found,) = (tmp / "dist").glob("d2r_lib-*.whl")
    return found


def _dependency_view(folder: Path) -> Path:
    """Links to every entry of the site-packages holding torch, d2r_lib and .pth files left out."""
    site = Path(torch.__file__).resolve().parents[1]
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(HIDDEN) or entry.suffix == ".pth":
            continue
        (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return folder


@pytest.fixture(scope="module")
def learner(tmp_path_factory, wheel, shared_data):
    """A fresh environment where d2r_lib is missing, then installed by the exact first cell of an
    exercise (the Colab shim, pointed at the wheel by $D2R_INSTALL_SPEC) run in a fresh kernel,
    followed by the exercise's imports. Returns (python, env, work folder, executed shim)."""
    tmp = tmp_path_factory.mktemp("learner")
    venv, work = tmp / "venv", tmp / "work"
    work.mkdir()
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=os.environ, cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        env=os.environ, cwd=tmp).stdout.strip())
    (purelib / "zz_dependencies.pth").write_text(f"{_dependency_view(tmp / 'deps')}\n")
    kernel = venv / "share" / "jupyter" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh environment", "language": "python"}))
    env = {**_clean_environ(), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "JUPYTER_PATH": str(venv / "share" / "jupyter"), "IPYTHONDIR": str(tmp / "ipython"),
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "D2R_PROFILE": "smoke",
           "D2R_DATA_DIR": str(shared_data), "D2R_CACHE_DIR": str(tmp / "cache"),
           "D2R_TEST_CHECKOUT": str(ROOT), INSTALL_ENV: f"d2r_lib[autoattack] @ {wheel.as_uri()}"}
    missing = subprocess.run([python, "-c", "import d2r_lib"], env=env, cwd=work,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'd2r_lib'" in missing.stderr
    first = next(c for c in nbformat.read(EXERCISE, as_version=4).cells if c.cell_type == "code")
    shim = _execute(python, env, work, nbformat.v4.new_notebook(cells=[first]), "shim.ipynb")
    return python, env, work, shim


def _execute(python, env, work, nb, name: str) -> dict:
    """Execute the notebook with LEAK_CHECK appended, alone in the work folder (as Colab opens it),
    in a fresh kernel of the fresh environment; the check's result."""
    nb.cells.append(nbformat.v4.new_code_cell(LEAK_CHECK))
    path = work / name
    nbformat.write(nb, path)
    _run([python, "-c", EXECUTE, path, work], env=env, cwd=work)
    text = "".join(o.get("text", "") for o in nbformat.read(path, as_version=4).cells[-1].outputs)
    return json.loads(text.split("LEAK-CHECK ", 1)[1])


def _notebook(python, env, work, source: Path) -> dict:
    return _execute(python, env, work, nbformat.read(source, as_version=4), source.name)


def _installed(result, python) -> None:
    venv = Path(python).parents[1]
    assert result["inside"] == [], "modules imported from the checkout"
    assert Path(result["d2r_lib"]).is_relative_to(venv), result["d2r_lib"]


# ------------------------------------------------------------------------------------ the wheel
def test_the_wheel_holds_every_module_and_the_shipped_runs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "d2r_lib").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert "d2r_lib/checks/__init__.py" in names
    for folder in ("reference", "followups"):
        shipped_files = {f"d2r_lib/_book/{folder}/{p.relative_to(ROOT / 'book' / folder)}"
                         for p in (ROOT / "book" / folder).rglob("*")
                         if p.is_file() and not p.name.startswith(".")
                         and "partial" not in p.relative_to(ROOT / "book").parts}
        assert shipped_files and shipped_files <= set(names), folder
    # unfinished runs (saved to resume in a later sitting) are not shipped
    assert not [n for n in names if "/partial/" in n or n.endswith("/.lock")]
    assert wheel.name == f"d2r_lib-{d2r_lib.__version__}-py3-none-any.whl"


def test_shipped_finds_the_checkout_first_and_the_packaged_copy_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped.find("reference") == ROOT / "book" / "reference"
    assert shipped.find(tmp_path / "nope") == tmp_path / "nope"  # absolute: as given
    assert shipped.find("nope") == Path("nope")
    (tmp_path / "reference").mkdir()
    assert shipped.find("reference") == Path("reference")  # the current folder first
    packaged = tmp_path / "pkg"
    (packaged / "followups").mkdir(parents=True)
    monkeypatch.setattr(shipped, "bases", lambda: [packaged])
    assert shipped.find("followups") == packaged / "followups"


# --------------------------------------------------------------------------- the learner's view
def test_colab_shim_installs_the_wheel_and_the_exercise_imports(learner):
    python, env, work, shim = learner
    _installed(shim, python)
    assert Path(shim["reference"]).is_relative_to(Path(python).parents[1])  # d2r_lib/_book
    first = next(c for c in nbformat.read(EXERCISE, as_version=4).cells if c.cell_type == "code")
    assert "\n".join(install_lines()) in first.source  # the shim that ran is the committed one
    out = _run([python, "-c", "import pyautoattack, d2r_lib.checks; print(d2r_lib.__version__)"],
               env=env, cwd=work).stdout
    assert out.strip() == d2r_lib.__version__


def test_d2r_command_from_outside_the_checkout(learner):
    python, env, work, _ = learner
    d2r = Path(python).parent / "d2r"
    assert "demo" in _run([d2r, "--help"], env=env, cwd=work).stdout
    out = _run([d2r, "demo"], env=env, cwd=work).stdout
    assert "loss" in out and "ε = 0.0310" in out


def test_a_solution_and_a_chapter_run_from_the_wheel(learner):
    python, env, work, _ = learner
    _installed(_notebook(python, env, work, SOLUTION), python)
    result = _notebook(python, env, work, CHAPTER)
    _installed(result, python)
    assert Path(result["reference"]).parts[-3:] == ("d2r_lib", "_book", "reference")


def test_installing_next_to_another_torch_installs_no_torch(wheel, tmp_path):
    """Colab ships its own torch: resolving the wheel's dependencies (with the autoattack extra)
    against an environment holding other versions of them must install nothing but d2r_lib."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=os.environ, cwd=tmp_path)
    purelib = Path(_run([venv / "bin" / "python", "-c",
                         "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        env=os.environ, cwd=tmp_path).stdout.strip())
    other = {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "numpy": "1.26.4",
             "tqdm": "4.66.5", "matplotlib": "3.8.0", "pyautoattack": "0.1.0"}
    assert torch.__version__ != other["torch"]
    for name, version in other.items():  # installed distributions, as pip sees them
        info = purelib / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
    report = tmp_path / "report.json"
    env = {**_clean_environ(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--dry-run",
          "--no-index", "--find-links", wheel.parent, "--report", report, "-q",
          f"d2r_lib[autoattack]=={d2r_lib.__version__}"], env=env, cwd=tmp_path)
    planned = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert planned == ["d2r_lib"]
    assert install_spec().startswith("d2r_lib[autoattack] @ git+")
