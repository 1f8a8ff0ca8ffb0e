"""Helpers of the notebook tests: find notebooks, read the repository URL, lint a notebook."""
import ast
import importlib
import inspect
import json
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


INSTALL_ENV = "D2R_INSTALL_SPEC"  # the shim installs from there instead (a local wheel, in tests)


def install_spec() -> str:
    """What the Colab shim installs: the repository of _config.yml at the tag v{__version__}, with
    AutoAttack's package (the `autoattack` extra)."""
    return f"d2r_lib[autoattack] @ git+{repository_url()}@v{d2r_lib.__version__}"


def install_lines() -> list[str]:
    """The shim's install lines (inside `except ImportError:`); $D2R_INSTALL_SPEC replaces the
    spec."""
    return [f"    import os  # ${INSTALL_ENV}: install from elsewhere, such as a local wheel",
            f'    spec = "{install_spec()}"',
            f"    %pip install -q \"{{os.environ.get('{INSTALL_ENV}', spec)}}\""]


_INSTALL_LINE = re.compile(r'^\s*(import os  # \$D2R_INSTALL_SPEC|spec = "d2r_lib|%pip install)')


def fix_install(path: Path) -> bool:
    """Write `install_lines()` in place of the shim's install lines, editing only those lines of
    the file (the rest of the JSON is left byte for byte); True when the file changed."""
    text = path.read_text(encoding="utf-8")
    code = [c for c in nbformat.reads(text, as_version=4).cells if c.cell_type == "code"]
    lines = code[0].source.splitlines() if code else []
    old = [line for line in lines if _INSTALL_LINE.match(line)]
    if not old or old == install_lines():
        return False
    rows = text.splitlines(keepends=True)
    at = [i for i, row in enumerate(rows) if row.strip().rstrip(",") in
          {json.dumps(line + "\n", ensure_ascii=False) for line in old}]
    indent = rows[at[0]][:len(rows[at[0]]) - len(rows[at[0]].lstrip())]
    new = [f"{indent}{json.dumps(line + chr(10), ensure_ascii=False)},\n"
           for line in install_lines()]
    if not rows[at[-1]].rstrip().endswith(","):  # the cell's last line: no comma after it
        new[-1] = new[-1].rstrip().rstrip(",") + "\n"
    path.write_text("".join(rows[:at[0]] + new + rows[at[-1] + 1:]), encoding="utf-8")
    return True


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
    elif "\n".join(install_lines()) not in first:
        problems.append("the Colab shim must install with install_lines() (the spec of "
                        "_config.yml and __version__): python tests/notebook_lint.py --fix")
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
        others = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb")) + sorted(
            (ROOT / "book" / "experiments").glob("*.ipynb"))
        for nb_path in notebooks + others:
            if fix_install(nb_path):
                print(f"wrote the install lines of {nb_path.relative_to(ROOT)}")
    for nb_path in CHAPTERS:
        for problem in lint(nb_path):
            print(f"{nb_path.relative_to(ROOT)}: {problem}")
