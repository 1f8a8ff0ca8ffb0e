"""What a page shows of a result: tables, differences with their intervals, noise-aware verdicts
and numbers for the prose. Course layer; chapter 1 introduces it, every chapter uses it.

- `table(rows, columns=None, caption=...)`: a real table in a notebook and in the book (Markdown),
  aligned plain text in a console. The one table helper of the chapters.
- `paired(correct_a, correct_b)`: the accuracy difference of two models on the *same* images, with a
  normal-approximation interval from the per-image differences (`evaluate.correct` gives them).
- `over_seeds(a, b)`: the mean of per-seed differences with a Student-t interval.
- `verdict(low, high, higher=..., lower=...)`: "undecided" when the interval holds 0 or is NaN.
- `glue(name, value)`: a number (or a clause) for the prose, through MyST-NB's glue; nothing happens
  where MyST-NB is not installed (Colab), so the chapters run everywhere.

An interval says something about the images and seeds it was computed on, nothing more: every
`Difference` carries that in `about`.

>>> t = table([{"model": "standard", "clean (%)": 61.2}], caption="Accuracy")
>>> print(t)
Accuracy
model     clean (%)
--------  ---------
standard       61.2
>>> verdict(-1.0, 2.0, higher="more robust", lower="less robust")
'undecided'
"""
from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Table", "table", "Difference", "paired", "over_seeds", "verdict", "glue", "plain"]

UNDECIDED = "undecided"


# ------------------------------------------------------------------------------------------- tables
def plain(value):
    """A Python int / float / bool / str for a tensor, NumPy scalar or number; others unchanged."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _cell(value, fmt) -> str:
    value = plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if callable(fmt):
        return str(fmt(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return format(value, fmt or ",")
    if isinstance(value, float):
        return format(value, fmt or ".3g")
    return str(value)


def _is_number(value) -> bool:
    value = plain(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Table:
    """Rows of cells under named columns; shows as a Markdown table in notebooks and in the book.

    `rows` holds the values (for code that reads them back), `text` the formatted cells. Numeric
    columns are right-aligned. Build one with `table`.
    """

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence], *,
                 caption: str | None = None, formats=None):
        self.columns = [str(c) for c in columns]
        self.rows = [list(r) for r in rows]
        for i, r in enumerate(self.rows):
            if len(r) != len(self.columns):
                raise ValueError(f"row {i} has {len(r)} cells; the table has {len(self.columns)} "
                                 f"columns ({', '.join(self.columns)})")
        self.caption = caption
        if isinstance(formats, Mapping):
            unknown = set(formats) - set(self.columns)
            if unknown:
                raise ValueError(f"formats names unknown column(s) {sorted(unknown)}; columns: "
                                 f"{', '.join(self.columns)}")
            per_column = [formats.get(c) for c in self.columns]
        else:
            per_column = [formats] * len(self.columns)
        self.text = [[_cell(v, f) for v, f in zip(r, per_column)] for r in self.rows]
        self.numeric = [bool(self.rows) and all(_is_number(r[j]) or plain(r[j]) is None
                                                 for r in self.rows)
                        for j in range(len(self.columns))]

    def column(self, name: str) -> list:
        """The values of one column, in row order."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        j = self.columns.index(name)
        return [r[j] for r in self.rows]

    def to_markdown(self) -> str:
        def esc(text):
            return str(text).replace("|", "\\|")

        lines = [] if not self.caption else [f"**{self.caption}**", ""]
        lines.append("| " + " | ".join(esc(c) for c in self.columns) + " |")
        lines.append("|" + "|".join("---:" if n else ":---" for n in self.numeric) + "|")
        lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.text]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        cells = [self.columns] + self.text
        widths = [max(len(r[j]) for r in cells) for j in range(len(self.columns))]

        def fmt(r):
            return "  ".join(c.rjust(w) if n else c.ljust(w)
                             for c, w, n in zip(r, widths, self.numeric)).rstrip()

        lines = [] if not self.caption else [self.caption]
        lines += [fmt(self.columns), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in self.text]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def __len__(self) -> int:
        return len(self.rows)


def table(rows, columns: Sequence[str] | None = None, *, caption: str | None = None,
          formats=None, index: str = "") -> Table:
    """A table from `rows`, shown as a real (Markdown) table in notebooks and in the book.
    Chapter 1.

    rows: a list of dicts (column → value; columns in first-seen order unless `columns` is given),
    a dict {row name: dict} (the row name becomes the first column, titled `index`), or a list of
    sequences (then `columns` names them). An `evaluate.ResultsTable` gives its accuracies in %.
    formats: a format spec for every float (".1f") or a dict {column: spec or callable}; the
    defaults are ",", for ints and ".3g" for floats; None and NaN show as "—", bools as yes / no.

    >>> str(table({"a": {"x": 1.25}}, index="row", formats=".1f")).splitlines()[-1]
    'a    1.2'
    """
    if hasattr(rows, "rows") and hasattr(rows, "columns") and hasattr(rows, "to_dict"):
        from .evaluate import DISPLAY_NAMES  # an evaluate.ResultsTable: accuracies in %
        cols = list(rows.columns)
        rows = {name: {f"{DISPLAY_NAMES.get(c, c)} (%)": (None if r.get(c) is None
                                                          else 100 * r[c]) for c in cols}
                for name, r in rows.rows.items()}
        index = index or "model"
        formats = ".1f" if formats is None else formats
    if isinstance(rows, Mapping):
        rows = [{index: name, **dict(values)} for name, values in rows.items()]
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        if columns is None:
            columns = list(dict.fromkeys(k for r in rows for k in r))
        return Table(columns, [[r.get(c) for c in columns] for r in rows], caption=caption,
                     formats=formats)
    if columns is None:
        raise ValueError("rows given as sequences need `columns`, the column names")
    return Table(columns, rows, caption=caption, formats=formats)


# -------------------------------------------------------------------------- differences, verdicts
def verdict(low: float, high: float, *, higher: str = "higher", lower: str = "lower",
            undecided: str = UNDECIDED) -> str:
    """`higher` when the whole interval is above 0, `lower` when below, else `undecided` (an
    interval that holds 0, or NaN for too little data). Chapter 1."""
    low, high = plain(low), plain(high)
    if low is None or high is None or math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return undecided
    return higher if low > 0 else lower


@dataclass(frozen=True)
class Difference:
    """A difference a − b (`mean`) with its interval [low, high] at `level`, from `n` pairs.

    Accuracies are fractions; `scale` and `unit` say how to show them (100, "points"). `about`
    names what the interval is about (these test images, these seeds)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95
    about: str = ""
    scale: float = 100.0
    unit: str = "points"

    def verdict(self, higher: str = "higher", lower: str = "lower",
                undecided: str = UNDECIDED) -> str:
        """See `verdict`: "undecided" unless the whole interval is on one side of zero."""
        return verdict(self.low, self.high, higher=higher, lower=lower, undecided=undecided)

    @property
    def decided(self) -> bool:
        return self.verdict() != UNDECIDED

    def shown(self, value: float, digits: int = 1) -> str:
        """`value` in display units with its sign ("+3.2", "−0.4")."""
        if math.isnan(value):
            return "n/a"
        text = f"{self.scale * value:+.{digits}f}"
        return text.replace("-", "−")

    def interval(self, digits: int = 1) -> str:
        """ "−1.2 to +3.4" in display units."""
        return f"{self.shown(self.low, digits)} to {self.shown(self.high, digits)}"

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        about = f"; {self.about}" if self.about else ""
        return (f"{self.shown(self.mean)}{unit} ({100 * self.level:g} % interval "
                f"{self.interval()}{about})")


def _values(name, v) -> list[float]:
    if hasattr(v, "detach"):
        v = v.detach().float().flatten().cpu().tolist()
    out = [float(plain(x)) for x in v]
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def paired(correct_a, correct_b, *, level: float = 0.95, about: str | None = None) -> Difference:
    """Accuracy of model a minus model b on the same images, with a normal-approximation interval
    from the per-image differences (each −1, 0 or +1). Chapter 2.

    correct_a, correct_b: per-image correctness (bools or 0/1) of the two models on the same images,
    in the same order (`evaluate.correct`). The interval is about these images only: it does not
    include the noise of training (another seed gives other models).
    """
    a, b = _values("correct_a", correct_a), _values("correct_b", correct_b)
    if len(a) != len(b):
        raise ValueError(f"correct_a and correct_b must describe the same images; got {len(a)} "
                         f"and {len(b)} values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        low = high = float("nan")
    else:
        sd = statistics.stdev(d)
        half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    text = about if about is not None else f"{n} test images, one training seed"
    return Difference(mean, low, high, n, level, text)


def over_seeds(a, b=None, *, level: float = 0.95, about: str | None = None, scale: float = 100.0,
               unit: str = "points") -> Difference:
    """Mean of the per-seed differences a[i] − b[i] (or of a alone) with a Student-t interval.
    Chapter 3.

    Fewer than two seeds give a NaN interval (the verdict is then "undecided").
    """
    a = _values("a", a)
    d = a if b is None else [x - y for x, y in zip(a, _values("b", b))]
    if b is not None and len(_values("b", b)) != len(a):
        raise ValueError("a and b must hold one value per seed, the same seeds in the same order")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        low = high = float("nan")
    else:
        from .reference import t_quantile
        half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
        low, high = mean - half, mean + half
    text = about if about is not None else f"{n} seed{'s' if n != 1 else ''}"
    return Difference(mean, low, high, n, level, text, scale, unit)


# ------------------------------------------------------------------------------ numbers in prose
_glue = None


def glue(name: str, value) -> None:
    """Make `value` available to the page's prose as {glue:text}`name` (MyST-NB glue, not
    displayed in the cell). Tensors and NumPy scalars become Python numbers first, so a format
    spec ({glue:text}`name:.1f`) applies. Where MyST-NB is not installed (Colab) it does nothing.
    Chapter 1."""
    global _glue
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise ValueError(f"glue name must be letters, digits and underscores; got {name!r}")
    if _glue is None:
        try:
            from myst_nb import glue as myst_glue
        except ImportError:  # not building the book: nothing reads the value
            myst_glue = False
        _glue = myst_glue
    if _glue:
        _glue(name, plain(value), display=False)
