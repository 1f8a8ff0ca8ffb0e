"""The chapters and solutions as experiments, checked without executing them.

Execution is nbval's job: the README's test command (`make test`) runs every chapter and every
solution notebook once under `pytest --nbval-lax` with D2R_PROFILE=smoke; a cell error fails the
test. Here: each notebook's parameters can be planned by the runner, and each chapter hands every
profile setting it declares to `experiments.resolve` (a declared but ignored parameter would make
`d2r run -p` silently do nothing).
"""

import ast
import re
from pathlib import Path

import nbformat
import pytest
from notebook_lint import CHAPTERS, ROOT, code_without_magics

from d2r_lib import experiments
from d2r_lib.lab import runner

SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
NOTEBOOKS = CHAPTERS + SOLUTIONS
RESOLVE_KEYWORDS = {"seed", "device", "verbose", "extras", *experiments.PROFILE_FIELDS}


def resolve_calls(path: Path) -> list[ast.Call]:
    nb = nbformat.read(path, as_version=4)
    calls = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(code_without_magics(cell.source))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "resolve"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "experiments"
            ):
                calls.append(node)
    return calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS])
def test_the_runner_can_plan_a_seed_sweep(path, tmp_path):
    runs = runner.plan("smoke", out=tmp_path / "out", chapters=[path], params={"seed": [0, 1]})
    assert [r.parameters["seed"] for r in runs] == [0, 1]
    assert all(r.parameters["profile"] == "smoke" for r in runs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS])
def test_resolve_gets_every_declared_profile_setting_and_nothing_else(path):
    calls = resolve_calls(path)
    assert len(calls) == 1, f"{len(calls)} calls of experiments.resolve (one wanted)"
    keywords = {k.arg: k.value for k in calls[0].keywords}
    assert set(keywords) <= RESOLVE_KEYWORDS, (
        f"not profile settings: {set(keywords) - RESOLVE_KEYWORDS}"
    )
    declared = set(runner.notebook_parameters(path)) & set(experiments.PROFILE_FIELDS)
    for name in declared:
        value = keywords.get(name)
        assert isinstance(value, ast.Name) and value.id == name, (
            f"parameter {name!r} is declared but not passed as resolve(..., {name}={name})"
        )


def test_the_test_command_runs_chapters_and_solutions_under_nbval_once():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "D2R_PROFILE=smoke" in recipe and "OMP_NUM_THREADS=1" in recipe
    assert "--nbval-lax" in recipe and "--dist loadfile" in recipe
    assert re.search(r"pytest .*\btests book solutions\b", recipe)
    assert "exercises" not in recipe  # exercise notebooks stop at their first task by design
