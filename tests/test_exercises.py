"""Exercises and solutions, proven open and complete.

* the committed exercise notebooks are exactly what `exercises/make_exercises.py` generates from the
  solutions;
* every notebook has one `parameters` cell of literals, no outputs, and the Colab shim installs from
  the URL in `_config.yml` (`repository.url`);
* every solution notebook executes at the `smoke` profile with every check ✓: nbval runs them (the
  README's test command), and a failing check raises `CheckFailed`, so it fails there;
* every exercise notebook, executed, stops at its first task with NotImplementedError;
* for each task separately, replacing only that task's solution by its stub makes execution fail at
  that task (in-process: the notebook's code cells are exec'd in a fresh namespace, magics replaced
  by `pass`), after every earlier task's check passed.

The kernel runs are the slow part (about 5–15 s each on 2 cores). Under `pytest -n 2 --dist
loadfile` this whole module goes to one worker; the kernels run with one thread each
(OMP_NUM_THREADS=1), which avoids oversubscribing the cores the other worker uses (tiny tensors are
also fastest on one thread).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from notebook_lint import install_lines

import d2r_lib

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS, EXERCISES = ROOT / "solutions", ROOT / "exercises"
STEMS = [
    "01_fgsm_pgd",
    "02_pgd_at",
    "03_trades",
    "04_lbgat",
    "05_d2r_loss",
    "06_cag",
    "07_experiment_design",
    "08_evaluation",
    "09_cost_model",
]
SMOKE = {"profile": "smoke", "seed": 0, "device": "cpu"}
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_exercises", EXERCISES / "make_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def _tasks(nb) -> list[tuple[int, int]]:
    """(solution cell index, check cell index) per task, in order; the check is the next code
    cell."""
    out = []
    for i, cell in enumerate(nb.cells):
        if GEN.is_solution_cell(cell) or (
            cell.cell_type == "code"
            and 'raise NotImplementedError("Task' in cell.source.replace("'", '"')
        ):
            j = next(k for k in range(i + 1, len(nb.cells)) if nb.cells[k].cell_type == "code")
            out.append((i, j))
    return out


def _cases():
    return [
        (stem, task)
        for stem in STEMS
        for task in range(1, len(_tasks(_read(SOLUTIONS / f"{stem}.ipynb"))) + 1)
    ]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ======================================== structure
def test_the_expected_notebooks_exist():
    assert sorted(p.stem for p in SOLUTIONS.glob("[0-9][0-9]_*.ipynb")) == STEMS
    assert sorted(p.stem for p in EXERCISES.glob("[0-9][0-9]_*.ipynb")) == STEMS
    for folder in (SOLUTIONS, EXERCISES):
        index = (folder / "index.md").read_text()
        for stem in STEMS:
            assert f"{stem}.ipynb" in index, f"{folder.name}/index.md does not link {stem}"


def test_every_check_is_used_by_a_notebook_and_every_task_states_its_kind():
    from d2r_lib import checks

    used = set()
    for stem in STEMS:
        nb = _read(SOLUTIONS / f"{stem}.ipynb")
        used |= set(re.findall(r"checks\.(check_\w+)\(", "\n".join(c.source for c in nb.cells)))
    assert used == {n for n in checks.__all__ if n.startswith("check_")}
    kinds = set()
    for stem in STEMS:
        nb = _read(SOLUTIONS / f"{stem}.ipynb")
        for sol, _ in _tasks(nb):
            kinds |= {_kind(nb, sol)}
    # the new kinds of task are spread over the notebooks (transcription tasks state no kind)
    assert {"derive and check", "predict, then run", "break it", "experiment design"} <= kinds, (
        kinds
    )


# the kinds of task that ask for more than transcribing what a chapter showed
THINKING = {"derive and check", "predict, then run", "break it", "experiment design", "diagnose",
            "read the result"}


def _kind(nb, sol: int) -> str:
    """The kind a task states (`*Kind: ….*` in the nearest markdown cell above its solution)."""
    md = next(nb.cells[k] for k in range(sol - 1, -1, -1) if nb.cells[k].cell_type == "markdown")
    found = re.findall(r"\*Kind: ([a-z ,]+?)\.\*", md.source)
    return found[0] if found else "transcribe"


@pytest.mark.parametrize("stem", STEMS)
def test_thinking_tasks_are_at_least_half(stem):
    """Each notebook has at least as many predict / break / derive / design / diagnose / read tasks
    as transcriptions."""
    nb = _read(SOLUTIONS / f"{stem}.ipynb")
    kinds = [_kind(nb, sol) for sol, _ in _tasks(nb)]
    thinking = sum(k in THINKING for k in kinds)
    assert thinking >= len(kinds) - thinking, (stem, kinds)


def test_committed_exercises_are_what_the_generator_makes():
    problems = GEN.stale_files()
    assert not problems, "stale; run `python exercises/make_exercises.py`:\n" + "\n".join(problems)


def test_generator_stubs_keep_indentation_and_number_tasks():
    source = (
        'def f(x):\n    """Doc."""\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n'
        "    ### END SOLUTION"
    )
    stub = GEN.stub_source(source, 3)
    assert stub == (
        'def f(x):\n    """Doc."""\n'
        "    raise NotImplementedError('Task 3: write the body of `f`')"
    )
    compile(stub, "<stub>", "exec")
    with pytest.raises(ValueError, match="without"):
        GEN.stub_source("### BEGIN SOLUTION\nx = 1", 1)
    md = (
        "# Title\n<!-- EXERCISE: shown in exercises -->\n<!-- BEGIN SOLUTION -->\n"
        "only in solutions\n<!-- END SOLUTION -->\nend"
    )
    assert GEN.exercise_markdown(md) == "# Title\nshown in exercises\nend"


def test_check_mode_reports_a_stale_exercise(tmp_path):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises").mkdir()
    src = SOLUTIONS / "02_pgd_at.ipynb"
    (tmp_path / "solutions" / src.name).write_text(src.read_text())
    original = GEN.ROOT
    GEN.ROOT = tmp_path
    try:
        assert any(
            "missing" in p for p in GEN.stale_files(tmp_path / "solutions", tmp_path / "exercises")
        )
        for path, text in GEN.expected_files(
            tmp_path / "solutions", tmp_path / "exercises"
        ).items():
            path.write_text(text)
        assert GEN.stale_files(tmp_path / "solutions", tmp_path / "exercises") == []
        edited = (tmp_path / "exercises" / src.name).read_text().replace("Task 1", "Task one")
        (tmp_path / "exercises" / src.name).write_text(edited)
        assert GEN.stale_files(tmp_path / "solutions", tmp_path / "exercises") == [
            "exercises/02_pgd_at.ipynb: differs from the generated version"
        ]
    finally:
        GEN.ROOT = original


@pytest.mark.parametrize("kind", ["solutions", "exercises"])
@pytest.mark.parametrize("stem", STEMS)
def test_notebook_structure(stem, kind):
    nb = _read(ROOT / kind / f"{stem}.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "committed outputs"
    # exactly one parameters cell, of literals only, right after the Colab shim
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[1]
    tree = ast.parse(params[0].source)
    assert {t.id for node in tree.body for t in node.targets} == set(SMOKE)
    assert all(
        isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) for node in tree.body
    )
    # the Colab shim installs from the repository URL of _config.yml
    shim = code[0].source
    assert "import d2r_lib" in shim and "except ImportError" in shim
    # ... pinned to the library's version tag, so a notebook and the library it runs always match
    assert f"@ git+{_repository_url()}@v{d2r_lib.__version__}" in shim
    assert "\n".join(install_lines()) in shim
    # tasks: 3–9, each a solution (or stub) cell followed by a cell that ends with its check (a
    # predict-then-run task runs the experiment first, in the same cell); the statement is the
    # nearest markdown cell above the solution
    tasks = _tasks(nb)
    assert 3 <= len(tasks) <= 9
    for n, (sol, chk) in enumerate(tasks, start=1):
        last = nb.cells[chk].source.strip().splitlines()[-1]
        assert re.fullmatch(r"checks\.check_\w+\([\w, \[\]\.]+\)", last), nb.cells[chk].source
        statement = next(nb.cells[k] for k in range(sol - 1, -1, -1)
                         if nb.cells[k].cell_type == "markdown")
        assert f"Task {n} ·" in statement.source
        tags = nb.cells[sol].metadata.get("tags", [])
        if kind == "solutions":
            assert "hide-input" in tags
        else:
            assert "hide-input" not in tags and BEGIN not in nb.cells[sol].source
            assert f"raise NotImplementedError('Task {n}: " in nb.cells[sol].source


# ======================================== in-process execution
def _runnable(source: str) -> str:
    """IPython magics (%pip, !cmd) become `pass`, keeping the indentation."""
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines())


def _exec_notebook(nb, stem: str):
    """Exec the code cells in a fresh namespace; returns (index of the failing cell or None, error,
    outputs)."""
    import matplotlib

    matplotlib.use("Agg")
    ns = {"__name__": "__main__"}
    outputs = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        source = _runnable(cell.source)
        if "parameters" in cell.metadata.get("tags", []):
            source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in SMOKE.items())
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(source, f"<{stem} cell {i}>", "exec"), ns)
        except BaseException as exc:  # noqa: BLE001 - the failure is the result under test
            outputs[i] = buffer.getvalue()
            return i, exc, outputs
        outputs[i] = buffer.getvalue()
    return None, None, outputs


@pytest.mark.parametrize("stem,task", _cases())
def test_removing_one_solution_fails_at_that_task(stem, task):
    solution = _read(SOLUTIONS / f"{stem}.ipynb")
    exercise = _read(EXERCISES / f"{stem}.ipynb")
    tasks = _tasks(solution)
    sol_cell, check_cell = tasks[task - 1]
    assert _tasks(exercise)[task - 1] == (sol_cell, check_cell)
    solution.cells[sol_cell] = exercise.cells[sol_cell]  # only this task is unsolved
    index, error, outputs = _exec_notebook(solution, stem)
    assert isinstance(error, NotImplementedError), (
        f"expected NotImplementedError at task {task}, got {error!r}"
    )
    assert str(error).startswith(f"Task {task}:"), str(error)
    assert index in (sol_cell, check_cell), (
        f"failed in cell {index}, task {task} is cells {sol_cell}-{check_cell}"
    )
    for _, earlier_check in tasks[: task - 1]:  # a run prints its table first, then the ✓ lines
        lines = outputs[earlier_check].splitlines()
        assert any(line.startswith("✓") for line in lines), outputs[earlier_check]


# ======================================== kernel execution
def _papermill(path: Path, out: Path):
    papermill = pytest.importorskip("papermill")
    return papermill.execute_notebook(
        str(path),
        str(out),
        parameters=dict(SMOKE),
        kernel_name="python3",
        cwd=str(path.parent),
        progress_bar=False,
        log_output=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_exercise_notebook_stops_at_its_first_task(stem, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    exercise = _read(EXERCISES / f"{stem}.ipynb")
    first_solution, first_check = _tasks(exercise)[0]
    out = tmp_path / f"{stem}.ipynb"
    with pytest.raises(PapermillExecutionError) as info:
        _papermill(EXERCISES / f"{stem}.ipynb", out)
    assert info.value.ename == "NotImplementedError"
    assert "Task 1:" in info.value.evalue
    executed = _read(out)
    failing = [
        c
        for c in executed.cells
        if any(o.get("output_type") == "error" for o in c.get("outputs", []))
    ]
    assert len(failing) == 1
    assert failing[0].source in (
        exercise.cells[first_solution].source,
        exercise.cells[first_check].source,
    )
