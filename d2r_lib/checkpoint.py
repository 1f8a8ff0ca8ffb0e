"""Safe checkpoints: atomic writes, tensor-only loading, finite tensors, strict key and metadata
checks. Chapter 2.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, list, dict, None),
written to a temporary file and renamed into place (`atomic_write`), so a killed process never
leaves half a file. Loading uses `torch.load(weights_only=True)`: a file that carries pickled
objects is refused, and so is one holding a NaN or infinite tensor (a diverged run is never
evaluated or resumed).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "Busy", "atomic_write", "exclusive", "first_non_finite",
    "save", "load", "strip_prefix", "load_state_strict", "check_meta",
]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked: unsafe, corrupt, non-finite, or of another model /
    class count / method."""


class Busy(RuntimeError):
    """Another process holds the lock of a run folder (`exclusive`)."""


@contextlib.contextmanager
def exclusive(lock: str | Path) -> Iterator[Path]:
    """Hold an advisory lock (`flock`) on the file `lock` for the block: one writer per run. The
    lock dies with its process, so a killed run never leaves a stale one. Raises `Busy` naming the
    holder's pid when another process holds it."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Busy(f"{lock.parent} is in use by another process (pid {holder}); wait for it "
                       "to finish or stop it, or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp_path)` fills a temporary file in `path`'s folder, which is then fsync'ed and
    renamed onto `path` (os.replace): readers see the old file or the new one, never half of one.
    Chapter 2."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as "
                                f"{path / 'out.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def first_non_finite(tree, prefix: str = "") -> str | None:
    """The name (a dotted path) of the first floating tensor in a nested dict / list holding a NaN
    or an infinity, or None when all are finite."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            return None if bool(torch.isfinite(tree).all()) else (prefix or "tensor")
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save(payload: dict, path: str | Path) -> Path:
    """Write `payload` to `path` atomically (see `atomic_write`)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; give a file name such as "
                              f"{path / 'last.pt'}")
    payload = {"format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | Path, map_location="cpu", *, check_finite: bool = True) -> dict:
    """Load a checkpoint with weights_only=True; refuse pickled objects, and (check_finite) any NaN
    or infinite tensor, with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it carries pickled Python objects, which can run "
            "arbitrary code. Only checkpoints of tensors and plain values (as d2r_lib writes) are "
            f"accepted. Details: {err}"
        ) from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, UnicodeDecodeError,
            OSError) as err:  # torch.load's ways of failing on a corrupt or truncated file
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or truncated "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict):
        kind = type(payload).__name__
        raise CheckpointError(f"{path} holds a {kind}, not a d2r_lib checkpoint dict")
    bad = first_non_finite(payload) if check_finite else None
    if bad is not None:
        raise CheckpointError(f"refusing to load {path}: tensor {bad} holds NaN or infinite "
                              "values (a diverged run); retrain, or resume from an earlier "
                              "checkpoint")
    return payload


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """Remove a DataParallel/DDP ("module.") or torch.compile ("_orig_mod.") prefix from every
    key."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_state_strict(model: nn.Module, state: dict, what: str = "model") -> None:
    """load_state_dict with every key required to match; the error lists what is missing or
    unexpected."""
    own = set(model.state_dict())
    given = set(state)
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" … (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise CheckpointError(
            f"{what}: checkpoint keys do not match the model (no silent strict=False here). "
            f"missing {len(missing)}: [{show(missing)}]; unexpected {len(unexpected)}: "
            f"[{show(unexpected)}]"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{what}: checkpoint tensors do not fit the model: {err}") from None


def check_meta(payload: dict, path, **expected) -> None:
    """Every expected metadata value (model name, num_classes, method, ...) must equal the stored
    one."""
    wrong = [f"{k}: stored {payload.get(k)!r}, asked {v!r}" for k, v in expected.items()
             if v is not None and payload.get(k) != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not match what was asked: "
                              "" + "; ".join(wrong))
