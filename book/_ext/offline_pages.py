"""A local Sphinx extension: book pages that need no network and load without console errors.

Jupyter Book 1 always loads sphinx-thebe, which declares `const THEBE_JS_URL` in an inline
script that it adds twice (a JavaScript error on every page) and that points at unpkg. The
course does not use Thebe (its launch buttons are Colab and Binder), so its scripts are dropped
from every page. The theme's colour mode defaults to "" under Jupyter Book, which the theme's
script reports as a console error: it becomes "auto".
"""
from __future__ import annotations


def _is_thebe(script) -> bool:
    body = getattr(script, "attributes", {}).get("body", "") or ""
    return "THEBE_JS_URL" in body or "sphinx-thebe" in str(script) or "thebe@" in str(script)


def _page_context(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [s for s in scripts if not _is_thebe(s)]
    for key in ("default_mode", "theme_default_mode"):
        if not context.get(key):
            context[key] = "auto"


def setup(app):
    app.connect("html-page-context", _page_context)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
