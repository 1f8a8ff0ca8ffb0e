"""A local Sphinx extension: a code cell's figure caption goes to its images only.

A figure cell carries its caption and alt text in its metadata (`mystnb.figure.caption`,
`mystnb.image.alt`). MyST-NB wraps *every* display output of such a cell in a figure with that
caption, so a results table or an ipywidgets explorer displayed by the same cell would be captioned
as the plot too (and numbered as a figure). This transform unwraps the notebook-output figures that
hold no image: the caption then appears once, under the image.

Such a cell carries no `mystnb.figure.name`: MyST-NB would give the name to each output's figure
(a duplicate label, which fails the -W build); tests/test_book.py checks that.
"""
from __future__ import annotations

from docutils import nodes
from docutils.transforms import Transform


def _is_cell_output(node) -> bool:
    return isinstance(node, nodes.container) and node.get("nb_element") == "cell_code_output"


def _has_image(figure: nodes.figure) -> bool:
    return any(str(c.get("mime_type", "")).startswith("image/")
               for c in figure.findall(nodes.container)) or any(figure.findall(nodes.image))


class ImageOnlyFigures(Transform):
    # before Sphinx's doctree-read event (880): figure numbers and labels see the result
    default_priority = 700

    def apply(self, **kwargs):
        for figure in list(self.document.findall(nodes.figure)):
            if not _is_cell_output(figure.parent) or _has_image(figure):
                continue
            content = [c for c in figure.children
                       if not isinstance(c, nodes.caption | nodes.legend)]
            if content:
                # keep the figure's ids (an anchor) on what it held
                content[0]["ids"].extend(figure["ids"])
                content[0]["names"].extend(figure["names"])
                for node_id in figure["ids"]:
                    self.document.ids[node_id] = content[0]
            figure.replace_self(content)


def setup(app):
    app.add_transform(ImageOnlyFigures)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
