"""Generate the exercise notebooks from the solution notebooks (the solutions are the source).

    python exercises/make_exercises.py          # write exercises/NN_*.ipynb, normalise solutions/
    python exercises/make_exercises.py --check  # change nothing; exit 1 listing every stale file

The nbgrader convention:

* In a code cell, the lines from ``### BEGIN SOLUTION`` to ``### END SOLUTION`` (markers included)
  become ``raise NotImplementedError("Task N: write the body of `name`")`` at
  the indentation of the BEGIN marker. N counts the solution cells of the notebook in order; `name`
  is the function the region sits in.
* In a markdown cell, the lines from ``<!-- BEGIN SOLUTION -->`` to ``<!-- END SOLUTION -->`` are
  dropped from the exercise, and a line ``<!-- EXERCISE: text -->`` becomes ``text`` in the exercise
  (it stays an invisible comment in the solution).

Both notebooks are normalised so that the comparison is exact: nbformat 4.5, no outputs, no
execution counts, deterministic cell ids, minimal metadata (kernel ``python3``), cell tags sorted.
A code cell's ``mystnb`` metadata (figure caption and name, image alt text) is kept; in the
exercise the figure name's ``fig-sol`` prefix becomes ``fig-ex`` (a name is a label, unique in the
whole book).
Solution cells get the tag ``hide-input`` in the solution notebook (the book folds them away) and
lose it in the exercise.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
MD_EXERCISE = re.compile(r"^<!-- EXERCISE: (.*) -->$")
HIDE = "hide-input"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def is_solution_cell(cell) -> bool:
    return cell.cell_type == "code" and any(
        line.strip() == BEGIN for line in cell.source.splitlines()
    )


def _task_name(source: str, begin_line: int) -> str:
    """Name of the innermost function around the BEGIN marker (None at top level)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    best = None
    for node in ast.walk(tree):
        if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef)
        ) and node.lineno <= begin_line <= (node.end_lineno or node.lineno):
            if best is None or node.lineno > best.lineno:
                best = node
    return None if best is None else best.name


def stub_source(source: str, task: int) -> str:
    """Replace every BEGIN/END SOLUTION region of a code cell by a NotImplementedError stub."""
    lines, out, inside = source.splitlines(), [], False
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN!r} in:\n{source}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            name = _task_name(source, i)
            what = f"the body of `{name}`" if name else "your code"
            message = f"Task {task}: write {what}"
            out.append(f"{indent}raise NotImplementedError({message!r})")
        elif stripped == END:
            if not inside:
                raise ValueError(f"{END!r} without {BEGIN!r} in:\n{source}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN!r} without {END!r} in:\n{source}")
    return "\n".join(out)


def exercise_markdown(source: str) -> str:
    out, inside = [], False
    for line in source.splitlines():
        if line.strip() == MD_BEGIN:
            inside = True
        elif line.strip() == MD_END:
            inside = False
        elif not inside:
            m = MD_EXERCISE.match(line.strip())
            out.append(m.group(1) if m else line)
    return "\n".join(out).strip("\n")


def _cell(kind: str, source: str, tags: list[str], index: int, stem: str, mystnb=None):
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cell = make(source=source)
    cell.id = f"{stem.replace('_', '-')}-{index:02d}"
    cell.metadata = nbformat.NotebookNode({"tags": sorted(set(tags))} if tags else {})
    if kind == "code":
        cell.outputs, cell.execution_count = [], None
        if mystnb:  # the figure caption and image alt text of the book page
            cell.metadata["mystnb"] = copy.deepcopy(mystnb)
    return cell


def _exercise_mystnb(mystnb):
    """The solution cell's `mystnb` metadata for the exercise: its figure name made unique."""
    if not mystnb or "name" not in mystnb.get("figure", {}):
        return mystnb
    out = copy.deepcopy(mystnb)
    name = out["figure"]["name"]
    out["figure"]["name"] = ("fig-ex" + name[len("fig-sol"):] if name.startswith("fig-sol")
                             else name + "-exercise")
    return out


def _notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.NotebookNode(
        {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    )
    nb.cells = cells
    return nb


def normalise_solution(nb, stem: str):
    """The solution notebook as it must be committed (deterministic, stripped, solution cells
    `hide-input`)."""
    cells = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type not in ("code", "markdown"):
            continue
        tags = [t for t in cell.metadata.get("tags", []) if t != HIDE]
        if is_solution_cell(cell):
            tags.append(HIDE)
        cells.append(_cell(cell.cell_type, cell.source.strip("\n"), tags, i, stem,
                           cell.metadata.get("mystnb")))
    return _notebook(cells)


def make_exercise(nb, stem: str):
    """The exercise notebook generated from a (normalised) solution notebook."""
    cells, task = [], 0
    for i, cell in enumerate(normalise_solution(nb, stem).cells):
        tags = [t for t in cell.metadata.get("tags", []) if t != HIDE]
        if is_solution_cell(cell):
            task += 1
            source = stub_source(cell.source, task)
        elif cell.cell_type == "markdown":
            source = exercise_markdown(cell.source)
        else:
            source = cell.source
        cells.append(_cell(cell.cell_type, source, tags, i, stem,
                           _exercise_mystnb(cell.metadata.get("mystnb"))))
    if task == 0:
        raise ValueError(f"{stem}: no `{BEGIN}` region found; every solution notebook has tasks")
    return _notebook(cells)


def dumps(nb) -> str:
    nbformat.validate(nb)
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def expected_files(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES) -> dict[Path, str]:
    """Every generated file (normalised solutions + exercises) with the exact text it must have."""
    out = {}
    for path in sorted(solutions.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        out[path] = dumps(normalise_solution(nb, path.stem))
        out[exercises / path.name] = dumps(make_exercise(nb, path.stem))
    return out


def stale_files(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES) -> list[str]:
    """Readable list of the files that differ from what the generator makes (empty: up to date)."""
    problems = []
    expected = expected_files(solutions, exercises)
    for path, text in expected.items():
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.relative_to(ROOT)}: differs from the generated version")
    for path in sorted(exercises.glob("[0-9][0-9]_*.ipynb")):
        if path not in expected:
            problems.append(f"{path.relative_to(ROOT)}: has no solutions/{path.name}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 and list stale files; write nothing"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files()
        for p in problems:
            print(p)
        if problems:
            print("run `python exercises/make_exercises.py` to regenerate", file=sys.stderr)
            return 1
        print(f"exercises up to date ({len(expected_files()) // 2} notebooks)")
        return 0
    for path, text in expected_files().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
