"""The book: notebook lint, and a full `jupyter-book build` at the smoke profile with its HTML checked."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from notebook_lint import CHAPTERS, ROOT, lint, repository_url

EXPECTED = ["01_adversarial_examples", "02_adversarial_training", "03_trades", "04_lbgat", "05_d2r_loss",
            "06_cag", "07_d2r_end_to_end", "08_robust_evaluation", "09_scaling_up"]


def test_nine_chapters_in_the_toc():
    assert [p.stem for p in CHAPTERS] == EXPECTED
    toc = (ROOT / "_toc.yml").read_text()
    for stem in EXPECTED:
        assert f"book/{stem}" in toc


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_lint(path):
    assert lint(path) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_links_to_exercises(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert re.search(r"\.\./exercises/\w+", text), "every chapter links to its exercises"


def test_lint_catches_problems(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import torch"),
                nbformat.v4.new_code_cell("profile = 'cpu'\nx = torch.zeros(1)"),
                nbformat.v4.new_code_cell("def fgsm(model, x, y):\n    return x"),
                nbformat.v4.new_code_cell("def pgd_by_hand(x):\n    return x")]
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi")]
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    problems = "\n".join(lint(path))
    assert "non-literal statement" in problems
    assert "committed outputs" in problems
    assert "Colab shim" in problems and repository_url() in problems
    assert "redefines the library function fgsm()" in problems
    assert "pgd_by_hand is never compared" in problems


RESULTS_TABLES = ("02", "03", "04", "07", "08")  # chapters that display a results table (clean / robust %)


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    env = {**os.environ, "D2R_PROFILE": "smoke", "D2R_CACHE_DIR": str(out / "cache")}
    jb = Path(sys.executable).with_name("jupyter-book")
    started = time.perf_counter()
    r = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(out), "-W", "--keep-going"],
                       capture_output=True, text=True, env=env, timeout=1500)
    print(f"smoke book build: {time.perf_counter() - started:.0f} s")
    assert r.returncode == 0, (r.stdout[-4000:] + r.stderr[-4000:])
    return out / "_build" / "html"


def test_book_builds_with_every_chapter_and_figure(built_book):
    for stem in EXPECTED:
        page = built_book / "book" / f"{stem}.html"
        assert page.exists(), f"no page for {stem}"
        html = page.read_text()
        assert re.search(r"<img [^>]*src=\"[^\"]+\.(png|svg)\"", html), f"{stem}: no figure"
        for bad in ("Traceback (most recent call last)", "output_error", "NotImplementedError"):
            assert bad not in html, f"{stem}: error output ({bad}) in the page"
        prose = re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)  # code and printed text may contain pipes
        assert not re.search(r"\|\s*:?(---|—)", prose), f"{stem}: a Markdown table was rendered as text"
        if stem[:2] in RESULTS_TABLES:
            assert re.search(r"<table[^>]*>.*?\(%\)", html, re.S), f"{stem}: no rendered results table"
    assert (built_book / "index.html").exists()
    for folder in ("exercises", "solutions"):
        assert any((built_book / folder).glob("*.html")), f"no {folder} pages"


def test_book_has_launch_buttons_and_bibliography(built_book):
    html = (built_book / "book" / "01_adversarial_examples.html").read_text()
    assert "colab.research.google.com" in html
    assert "d2r-course/d2r-course" in html
    bib = (built_book / "book" / "bibliography.html").read_text()
    assert "Madry" in bib and "D2R" in bib


def test_hidden_folders_and_run_outputs_are_not_pages():
    """`make test` leaves .pytest_cache/README.md and the quickstart leaves runs/: neither may become a page
    (with -W, a document outside the toc fails the book build)."""
    import yaml
    from sphinx.util.matching import Matcher
    excluded = Matcher(yaml.safe_load((ROOT / "_config.yml").read_text())["exclude_patterns"])
    for folder in (".pytest_cache", ".venv", ".ci", "runs", "_build", "book/.ipynb_checkpoints",
                   "exercises/.ipynb_checkpoints"):
        assert excluded(folder), folder
    for page in ("book", "exercises", "solutions", "book/01_adversarial_examples.ipynb", "exercises/index.md"):
        assert not excluded(page), page
