"""Where the runs shipped with the book are found (chapters 7 and 8): the checkout's `book/` first,
the copy packaged in the wheel (`d2r_lib/_book/`, written by setup.py) otherwise, as in Colab."""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def bases() -> list[Path]:
    """The folders a relative shipped path is looked up in, in order."""
    found = [_CHECKOUT / "book"] if (_CHECKOUT / "pyproject.toml").is_file() else []
    return found + [_PACKAGE / "_book"]


def find(folder: str | Path) -> Path:
    """`folder` itself when it exists or is absolute; otherwise a relative folder such as the
    chapters' "reference" (relative to book/) from the checkout's book/ or the wheel's copy, and
    `folder` unchanged when neither has it."""
    folder = Path(folder)
    if folder.exists() or folder.is_absolute():
        return folder
    for base in bases():
        if (base / folder).exists():
            return base / folder
    return folder
