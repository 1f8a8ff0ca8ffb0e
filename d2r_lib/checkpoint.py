"""Safe checkpoints: atomic writes, tensor-only loading, strict key and metadata checks. Chapter 2.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, list, dict, None),
written to a temporary file and renamed into place, so a killed process never leaves half a file.
Loading uses `torch.load(weights_only=True)`: a file that carries pickled objects is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked: unsafe, corrupt, or of another model / class count / method."""


def save(payload: dict, path: str | Path) -> Path:
    """Write `payload` to `path` atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; give a file name such as {path / 'last.pt'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; refuse pickled objects with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it carries pickled Python objects, which can run arbitrary code. "
            f"Only checkpoints of tensors and plain values (as d2r_lib writes) are accepted. Details: {err}"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a d2r_lib checkpoint dict")
    return payload


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """Remove a DataParallel/DDP ("module.") or torch.compile ("_orig_mod.") prefix from every key."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_state_strict(model: nn.Module, state: dict, what: str = "model") -> None:
    """load_state_dict with every key required to match; the error lists what is missing or unexpected."""
    own = set(model.state_dict())
    given = set(state)
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" … (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise CheckpointError(
            f"{what}: checkpoint keys do not match the model (no silent strict=False here). "
            f"missing {len(missing)}: [{show(missing)}]; unexpected {len(unexpected)}: [{show(unexpected)}]"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{what}: checkpoint tensors do not fit the model: {err}") from None


def check_meta(payload: dict, path, **expected) -> None:
    """Every expected metadata value (model name, num_classes, method, ...) must equal the stored one."""
    wrong = [f"{k}: stored {payload.get(k)!r}, asked {v!r}" for k, v in expected.items()
             if v is not None and payload.get(k) != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not match what was asked: " + "; ".join(wrong))


def atomic_write(path: str | Path, write) -> Path:
    """`write(tmp_path)` fills a temporary file in `path`'s folder, which is fsync'ed and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
