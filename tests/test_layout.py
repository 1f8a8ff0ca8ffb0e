"""The package shows core and tooling apart: the modules a learner reads (d2r_lib/*.py, checks/)
never import the tooling in d2r_lib/lab/ at import time, and the tooling is where README says."""
import ast
from pathlib import Path

import d2r_lib

PACKAGE = Path(d2r_lib.__file__).resolve().parent
TOOLING = {"cli", "runner", "notebook_run", "reference_run", "bench", "projection"}


def _module_level_imports(path: Path) -> list[str]:
    """Every module a file imports outside functions, as dotted names relative to d2r_lib."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base + ("" if base.endswith(".") else ".") + a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_core_modules_do_not_import_the_tooling():
    core = sorted(PACKAGE.glob("*.py")) + sorted((PACKAGE / "checks").glob("*.py"))
    assert core, PACKAGE
    for path in core:
        for name in _module_level_imports(path):
            parts = set(name.replace("d2r_lib", "").strip(".").split("."))
            assert "lab" not in parts and not parts & TOOLING, f"{path.name} imports {name}"


def test_the_tooling_lives_in_lab():
    assert {p.stem for p in (PACKAGE / "lab").glob("*.py")} == TOOLING | {"__init__"}
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem in TOOLING]


def test_the_checker_sees_a_module_level_import_of_the_tooling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .lab import runner\nfrom . import cli, data\n\ndef f():\n"
                   "    from .lab import bench\n")
    assert _module_level_imports(bad) == [".lab.runner", ".cli", ".data"]
