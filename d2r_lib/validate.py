"""Argument checks shared by every module: each error names the parameter and what is allowed.

The one vocabulary of messages. The API passes its parameter names (`eps`, `n`), the command line
the flags the user typed (`--eps`, `--n`). Path checks look before anything is written: they never
create a file or folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a check needs it: `d2r` starts without it
    import torch

__all__ = [
    "D2RWarning",
    "FLOAT32_MAX",
    "SEED_MAX",
    "checkpoint_file",
    "choice",
    "eps",
    "existing_dir",
    "images",
    "labels",
    "logits",
    "lr",
    "number",
    "output_dir",
    "output_file",
    "same_batch",
    "same_run",
    "same_shape",
    "seed",
    "step_size",
    "steps",
    "values_checked",
]

FLOAT32_MAX = 3.4028234663852886e38  # float(torch.finfo(torch.float32).max)
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit; torch and random accept these too


class D2RWarning(UserWarning):
    """A warning of d2r_lib. It is shown as `Name: message`, without the file and line that raised
    it: the rendered book never shows a path of the machine that built it. Chapter 1."""


_format_warning = warnings.formatwarning


def _format_d2r_warning(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, D2RWarning):
        return f"{category.__name__}: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _format_d2r_warning


def choice(name: str, value, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def number(name: str, value, *, min=None, max=None, min_open: bool = False, integer: bool = False):
    """Check a real (or integer) number against bounds; min_open=True makes the lower bound strict.

    A real number must also fit a 32-bit float (the models' precision): 1e300 would become inf.
    """
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise TypeError(f"{name} must be {kind}; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if not integer and abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"{name} must fit a 32-bit float (magnitude at most {FLOAT32_MAX:.4g}); got {value!r}"
        )
    if min is not None and (value <= min if min_open else value < min):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {min}; got {value!r}")
    if max is not None and value > max:
        raise ValueError(f"{name} must be <= {max}; got {value!r}")
    return value


def eps(value, name: str = "eps", *, norm: str | None = None):
    """An attack radius >= 0; with norm="linf" also <= 1 (pixels in [0, 1]). L∞ callers pass it."""
    number(name, value, min=0)
    if norm == "linf" and value > 1:
        raise ValueError(f"{name} must be <= 1: an L∞ radius on pixels in [0, 1] lies in [0, 1] "
                         f"(e.g. 8/255 ≈ 0.0314); got {value!r}")
    return value


def step_size(value, name: str = "step_size"):
    return number(name, value, min=0, min_open=True)


def steps(value, name: str = "steps"):
    return number(name, value, min=1, integer=True)


def lr(value, name: str = "lr"):
    """A learning rate: > 0, finite and representable as a 32-bit float."""
    return number(name, value, min=0, min_open=True)


def seed(value, name: str = "seed") -> int:
    """The one seed rule of training and the demo: an integer in [0, 2**32 - 1]."""
    return number(name, value, min=0, max=SEED_MAX, integer=True)


def flag(name: str, value) -> bool:
    """A yes/no setting: exactly True or False (not 1, "yes" or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


_VALUES_CHECKED = contextvars.ContextVar("values_checked", default=False)


@contextlib.contextmanager
def values_checked():
    """Inside, `images` and `labels` check only types and shapes: the caller checked the values at
    its door, and reading them back to the host (a synchronisation that stalls a GPU) is skipped.
    `methods.step` runs in it. Chapter 9."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def images(x, name: str = "x") -> torch.Tensor:
    """x must be a float tensor (N, C, H, W) with every value finite and in [0, 1] (the values are
    not read inside `values_checked`)."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have shape (batch, channels, height, width); got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with pixels in [0, 1]; got dtype {x.dtype}")
    if x.numel() and not _VALUES_CHECKED.get():
        finite = torch.isfinite(x)
        if not finite.all():
            bad = int((~finite).sum())
            raise ValueError(
                f"{name} must have finite pixels in [0, 1]; got {bad} NaN or infinite value(s)"
            )
        if x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"{name} must have pixels in [0, 1] (no mean/std normalisation); "
                f"got values in [{x.min().item():.4g}, {x.max().item():.4g}]"
            )
    return x


def labels(y, num_classes: int, batch: int, name: str = "y") -> torch.Tensor:
    """y must be an integer tensor of shape (batch,) with values in [0, num_classes) (the values are
    not read inside `values_checked`)."""
    import torch

    int_types = (torch.int64, torch.int32, torch.int16, torch.uint8)
    if not isinstance(y, torch.Tensor) or y.dtype not in int_types:
        raise TypeError(
            f"{name} must be an integer torch.Tensor of class indices; "
            f"got {getattr(y, 'dtype', type(y))}"
        )
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch; got "
                         f"{tuple(y.shape)}")
    if y.numel() and not _VALUES_CHECKED.get() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes - 1}]; "
            f"got values in [{y.min().item()}, {y.max().item()}]"
        )
    return y


def logits(z, name: str) -> torch.Tensor:
    import torch

    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        shape = getattr(z, "shape", type(z))
        raise ValueError(f"{name} must be a (batch, classes) tensor of logits; got {shape}")
    return z


def same_shape(**tensors) -> None:
    """All named tensors must have the same shape (same batch and class count)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"mismatched batch or class sizes: {listed}; they must be equal")


def same_batch(**tensors) -> None:
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} has {n}" for k, n in sizes.items())
        raise ValueError(f"mismatched batch sizes: {listed}; they must be equal")


# ------------------------------------------------------------------------------------------- paths
def _creatable(name: str, path: Path, start: Path) -> None:
    """The nearest existing folder from `start` up must be writable (nothing is created)."""
    ancestor = start
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            f"{name} {path}: {ancestor} is a file, so no folder can be created there; give "
            "another path"
        )
    problem = None
    if not os.access(ancestor, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        try:  # a nameless temporary file (O_TMPFILE on Linux): also catches read-only mounts
            with tempfile.TemporaryFile(dir=ancestor):
                pass
        except OSError as err:
            problem = err.strerror or str(err)
    if problem:
        raise PermissionError(f"{name} {path}: cannot write in {ancestor} ({problem}); give "
                              "another path")


def output_dir(name: str, path, files: Iterable[str] = ()) -> Path:
    """`path` is, or can become, a writable folder where each of `files` can be written."""
    from .checkpoint import regular_file

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise NotADirectoryError(f"{name} {path} is a symbolic link to nothing (or a loop); give "
                                 "a folder")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name} {path} is a file; give a folder")
    _creatable(name, path, path)
    for file in files:
        if (path / file).is_dir():
            raise IsADirectoryError(
                f"{name} {path}: {path / file} is a folder, but a file is written there"
            )
        regular_file(path / file, name)
    return path


def output_file(name: str, path) -> Path:
    """`path` can be written as a file: not a folder, and its folder exists or can be created."""
    from .checkpoint import regular_file

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{name} {path} is a folder; give a file name such as "
                                f"{path / 'out.json'}")
    _creatable(name, path, path.parent)
    regular_file(path, name)
    return path


def existing_dir(name: str, path) -> Path:
    """`path` must be an existing folder (for inputs: nothing is created)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} {path} does not exist; give an existing folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{name} {path} is a file; give a folder")
    return path


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_file(name: str, path, load=None):
    """load(path) (default checkpoint.load); a failure to read it is a CheckpointError naming it."""
    from . import checkpoint  # local: checkpoint may use this module

    try:
        return (load or checkpoint.load)(path)
    except (checkpoint.CheckpointError, OSError):
        raise
    except Exception as err:  # a corrupt file can fail anywhere inside torch.load
        raise checkpoint.CheckpointError(
            f"{name} {path} cannot be read as a d2r_lib checkpoint ({type(err).__name__}: {err}); "
            "it is corrupt or not a checkpoint") from None


def same_run(name: str, path, config: dict, hint: str) -> None:
    """A checkpoint already at `path` must be readable and hold the run `config` describes."""
    from . import checkpoint

    if not Path(path).is_file():
        return
    stored = checkpoint_file(name, path).get("config") or {}
    diff = [f"{k}: stored {stored.get(k)!r}, asked {v!r}" for k, v in config.items()
            if stored.get(k) != v]
    if diff:
        raise checkpoint.CheckpointError(f"{path} belongs to a run with other settings "
                                         f"({'; '.join(diff)}). Nothing was overwritten: {hint}")
