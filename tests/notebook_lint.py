"""Helpers of the notebook tests: find notebooks, read the repository URL, lint a notebook."""
import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import nbformat
import yaml

import d2r_lib

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def library_function_names() -> set[str]:
    """Public functions defined anywhere in d2r_lib (subpackages such as checks included)."""
    names = set()
    for info in pkgutil.walk_packages(d2r_lib.__path__, "d2r_lib."):
        if info.name.split(".")[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        names |= {n for n, obj in vars(module).items()
                  if not n.startswith("_") and inspect.isfunction(obj)
                  and obj.__module__ == module.__name__}
    return names


def code_without_magics(source: str) -> str:
    """IPython magics (%pip, !ls) become `pass` at the same indentation: the cell parses."""
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines())


MAX_CODE_LINE = 90  # characters: a wider code line needs a horizontal scroll bar on the page
SHIM_TAG = "hide-cell"   # the Colab shim is folded on the rendered page


def fix_tags(path: Path) -> bool:
    """Fold the Colab shim (first code cell) on the rendered page; True when the file changed."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or SHIM_TAG in code[0].metadata.get("tags", []):
        return False
    code[0].metadata["tags"] = [*code[0].metadata.get("tags", []), SHIM_TAG]
    nbformat.write(nb, path)
    return True


def lint(path: Path) -> list[str]:
    """Problems of one chapter notebook (empty list: fine)."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    if code and SHIM_TAG not in code[0].metadata.get("tags", []):
        problems.append(f"the Colab shim (first code cell) must be tagged {SHIM_TAG!r}: "
                        "python tests/notebook_lint.py --fix")
    for i, c in enumerate(code):
        for n, line in enumerate(c.source.splitlines(), start=1):
            if len(line) > MAX_CODE_LINE:
                problems.append(f"code cell {i} line {n} has {len(line)} characters "
                                f"(at most {MAX_CODE_LINE}, or the page scrolls sideways)")
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells tagged 'parameters' (exactly one wanted)")
    elif code[1] is not tagged[0]:
        problems.append("the 'parameters' cell must be the second code cell")
    else:
        for node in ast.parse(tagged[0].source).body:
            literal = isinstance(node, ast.Assign) and isinstance(node.value,
                                                                  ast.Constant | ast.UnaryOp)
            if not literal:
                problems.append("parameters cell holds a non-literal statement: "
                                f"{ast.unparse(node)!r}")
    for i, c in enumerate(code):
        if c.get("outputs") or c.get("execution_count") is not None:
            problems.append(f"code cell {i} has committed outputs or an execution count")
    first = code[0].source if code else ""
    if repository_url() not in first or "import d2r_lib" not in first:
        problems.append("the first code cell must be the Colab shim (import d2r_lib, else %pip "
                        f"install from {repository_url()})")
    all_code = "\n".join(c.source for c in code)
    if not re.search(r"from d2r_lib import|import d2r_lib\.", all_code):
        problems.append("the notebook never imports d2r_lib modules")
    library = library_function_names()
    defined = {}
    for i, c in enumerate(code):
        tree = ast.parse(code_without_magics(c.source))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                defined[node.name] = i
                if node.name in library:
                    problems.append(f"cell {i} redefines the library function {node.name}(); "
                                    "call d2r_lib instead (an inline derivation is named "
                                    "*_by_hand and compared with the library)")
    for name, i in defined.items():
        if name.endswith("_by_hand"):
            after = "\n".join(c.source for c in code[i:]).split(f"def {name}", 1)[-1]
            check = r"assert_close|torch\.equal|allclose|assert "
            compared = any(f"{name}(" in c.source and re.search(check, c.source)
                           for c in code[i:])
            if f"{name}(" not in after or not compared:
                problems.append(f"{name} is never compared with the library "
                                "(assert_close / torch.equal)")
    return problems


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--fix"]:
        notebooks = CHAPTERS + sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
        for nb_path in notebooks:
            if fix_tags(nb_path):
                print(f"tagged the shim of {nb_path.relative_to(ROOT)}")
    for nb_path in CHAPTERS:
        for problem in lint(nb_path):
            print(f"{nb_path.relative_to(ROOT)}: {problem}")
