"""Helpers shared by the notebook tests: find notebooks, read the repository URL, lint a notebook."""
import ast
import inspect
import re
from pathlib import Path

import nbformat
import yaml

import d2r_lib
from d2r_lib import (attacks, checkpoint, checks, costmodel, data, evaluate, experiments, losses, methods, models,
                     plot, train, widgets)

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def library_function_names() -> set[str]:
    names = set()
    for module in (attacks, checkpoint, checks, costmodel, data, evaluate, experiments, losses, methods, models, plot,
                   train, widgets):
        names |= {n for n, obj in vars(module).items()
                  if not n.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__}
    return names


def code_without_magics(source: str) -> str:
    """IPython magics (%pip, !ls) become `pass` at the same indentation, so the cell parses as Python."""
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines())


def lint(path: Path) -> list[str]:
    """Problems of one chapter notebook (empty list: fine)."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells tagged 'parameters' (exactly one wanted)")
    elif code[1] is not tagged[0]:
        problems.append("the 'parameters' cell must be the second code cell")
    else:
        for node in ast.parse(tagged[0].source).body:
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant | ast.UnaryOp)):
                problems.append(f"parameters cell holds a non-literal statement: {ast.unparse(node)!r}")
    for i, c in enumerate(code):
        if c.get("outputs") or c.get("execution_count") is not None:
            problems.append(f"code cell {i} has committed outputs or an execution count")
    first = code[0].source if code else ""
    if repository_url() not in first or "import d2r_lib" not in first:
        problems.append("the first code cell must be the Colab shim (import d2r_lib, else %pip install from "
                        f"{repository_url()})")
    if not re.search(r"from d2r_lib import|import d2r_lib\.", "\n".join(c.source for c in code)):
        problems.append("the notebook never imports d2r_lib modules")
    library = library_function_names()
    defined = {}
    for i, c in enumerate(code):
        tree = ast.parse(code_without_magics(c.source))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                defined[node.name] = i
                if node.name in library:
                    problems.append(f"cell {i} redefines the library function {node.name}(); call d2r_lib instead "
                                    "(an inline derivation is named *_by_hand and compared with the library)")
    for name, i in defined.items():
        if name.endswith("_by_hand"):
            after = "\n".join(c.source for c in code[i:]).split(f"def {name}", 1)[-1]
            compared = any(f"{name}(" in c.source and re.search(r"assert_close|torch\.equal|allclose|assert ", c.source)
                           for c in code[i:])
            if f"{name}(" not in after or not compared:
                problems.append(f"{name} is never compared with the library (assert_close / torch.equal)")
    return problems
