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
import errno
import fcntl
import io
import os
import pickle
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "Busy", "WriteError", "DISK_ERRNOS", "atomic_write",
    "exclusive", "first_non_finite", "regular_file", "save", "load", "strip_prefix",
    "load_state_strict", "check_meta", "check_fields", "RUN_FIELDS", "check_run", "check_momentum",
]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked: unsafe, corrupt, non-finite, or of another model /
    class count / method."""


class Busy(RuntimeError):
    """Another process holds the lock of a run folder (`exclusive`)."""


class WriteError(OSError):
    """A write that failed (disk full, file size limit, I/O error); the message names the file and
    says what was left intact."""

    def __str__(self) -> str:
        return str(self.strerror)


# errno values that mean the disk (not the request) failed: full, over quota, too large, I/O
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_HELD: dict[str, int] = {}  # locks this process holds (exclusive is reentrant): path -> depth


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | Path, name: str = "path") -> Path:
    """`path` if it is a regular file or does not exist yet (a symbolic link: its target, by the
    same rule); else ValueError naming `name`: a writer never replaces a device, a FIFO or a folder.
    Chapter 9."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there to replace
        return path
    if stat.S_ISLNK(mode):
        target = Path(os.path.realpath(path))
        if target == path or os.path.islink(target):
            raise ValueError(f"{name} {path} is a symbolic link loop; give another path")
        return regular_file(target, name)
    if not stat.S_ISREG(mode):
        raise ValueError(f"{name} {path} is {_kind(mode)}; only a regular file is written (or "
                         "created) there. Give a file name instead")
    return path


def _program() -> str:
    """How this process was started, for a Busy message: `d2r`, `python -m d2r_lib`, a script."""
    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    return f"python -m {first.parent.name}" if first.name == "__main__.py" else first.name


@contextlib.contextmanager
def exclusive(lock: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold an advisory lock (`flock`) on the file `lock` for the block: one writer per run. The
    lock dies with its process, so a killed run never leaves a stale one; the lock file (and the
    folders made for it) are removed on release. Reentrant within a process. When another process
    holds it: wait for it (`wait`), else raise `Busy` naming the holder's pid and command."""
    lock = Path(lock)
    key = os.path.abspath(lock)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    made = next((p for p in reversed([lock.parent, *lock.parent.parents]) if not p.exists()),
                None)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        while fd is None:  # the file locked must still be the one at `lock` (not one unlinked)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
                pid, _, command = holder.partition(" ")
                by = f"pid {pid}" + (f", `{command}`" if command else "")
                raise Busy(f"{lock.parent} is in use by another run ({by}); wait for it to "
                           "finish or stop it, or use another folder") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        command = " ".join([_program(), *sys.argv[1:]])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}"[:500].encode(), 0)
        _HELD[key] = 1
        try:
            yield lock
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        if fd is not None:
            os.close(fd)
        if made is not None:  # folders made for the lock and left empty go again
            for folder in [lock.parent, *lock.parent.parents]:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
                if folder == made:
                    break


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp_path)` fills a temporary file in `path`'s folder, which is then fsync'ed and
    renamed onto `path` (os.replace): readers see the old file or the new one, never half of one.
    Only a regular file is replaced (`regular_file`); a failed write raises `WriteError` naming the
    file and what was left intact. Chapter 2."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as "
                                f"{path / 'out.json'}")
    path = regular_file(path)
    existed = path.is_file()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            kept = ("the previous version is intact" if existed else "nothing was written there")
            raise WriteError(err.errno, f"could not write {path}: {err.strerror or err}; {kept}",
                             str(path)) from None
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

    def write(tmp: Path) -> None:  # through Python's file writes: a full disk is an OSError
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        tmp.write_bytes(buffer.getbuffer())

    return atomic_write(path, write)


def _check_archive(path: Path) -> None:
    """A d2r_lib checkpoint is torch's zip archive of uncompressed records: refuse anything else,
    and records declaring more bytes than the file holds, before torch inflates a tensor."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a checkpoint written by "
                              f"torch.save (not a complete zip archive: {err}); it is corrupt, "
                              "truncated or another kind of file") from None
    size = path.stat().st_size
    if declared > 2 * size + (1 << 20):
        raise CheckpointError(f"refusing to load {path}: its records declare {declared:,} bytes in "
                              f"a file of {size:,} bytes (compressed data, which torch.save never "
                              "writes); it is not a d2r_lib checkpoint")


def load(path: str | Path, map_location="cpu", *, check_finite: bool = True) -> dict:
    """Load a checkpoint with weights_only=True; refuse pickled objects, and (check_finite) any NaN
    or infinite tensor, with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt (its data cannot "
                                  "be unpickled)") from None
        raise CheckpointError(
            f"refusing to load {path}: it carries pickled Python objects ({found.group(1)}), "
            "which can run arbitrary code. Only checkpoints of tensors and plain values (as "
            "d2r_lib writes) are accepted") from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, UnicodeDecodeError,
            OSError) as err:  # torch.load's ways of failing on a corrupt or truncated file
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or truncated "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                              ) from None
    if not isinstance(payload, dict):
        kind = type(payload).__name__
        raise CheckpointError(f"{path} holds a {kind}, not a d2r_lib checkpoint dict")
    bad = first_non_finite(payload) if check_finite else None
    if bad is not None:
        raise CheckpointError(f"refusing to load {path}: tensor {bad} holds NaN or infinite "
                              "values (a diverged run); retrain, or resume from an earlier "
                              "checkpoint")
    return payload


def check_fields(payload: dict, path, fields: dict) -> None:
    """Every `fields` entry (name -> a type or tuple of types) is present in `payload` with that
    type; else one CheckpointError listing each fault. Run before a field is used."""
    faults = []
    for key, kind in fields.items():
        if key not in payload:
            faults.append(f"field {key!r} is missing")
        elif not isinstance(payload[key], kind) or (
                isinstance(payload[key], bool) and bool not in (kind if isinstance(kind, tuple)
                                                               else (kind,))):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            faults.append(f"field {key!r} is a {type(payload[key]).__name__}, not {names}")
    if faults:
        raise CheckpointError(f"{path} is damaged or not a complete d2r_lib checkpoint: "
                              + "; ".join(faults))


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


# ------------------------------------------------------------------------------------ training runs
RUN_FIELDS = {"kind": str, "config": dict, "epoch": int, "epochs": int, "method": str,
              "target_model": str, "num_classes": int, "dataset": str, "target": dict,
              "guide": (dict, type(None)), "optimizer": dict, "rng": dict, "history": list}
RNG_FIELDS = {"torch": torch.Tensor, "python": list, "python_pos": int, "numpy": torch.Tensor,
              "numpy_pos": int}


def check_run(payload: dict, path, *, epochs: int, uses_guide: bool) -> None:
    """Every field that resuming a `train.fit` run uses, checked before use: one CheckpointError
    listing the faults. Chapter 9."""
    check_fields(payload, path, RUN_FIELDS)
    rng = payload["rng"]
    check_fields(rng, f"{path} (rng)", RNG_FIELDS)
    faults = []
    if not 1 <= payload["epoch"] <= epochs:
        faults.append(f"epoch {payload['epoch']} is not in [1, {epochs}]")
    if uses_guide and payload["guide"] is None:
        faults.append("the guide's weights are missing")
    if not all(isinstance(r, dict) for r in payload["history"]):
        faults.append("history is not a list of records")
    if not (isinstance(payload["optimizer"].get("state"), dict)
            and isinstance(payload["optimizer"].get("param_groups"), list)):
        faults.append("the optimizer has no 'state' dict and 'param_groups' list")
    if (rng["torch"].shape != torch.get_rng_state().shape or rng["torch"].dtype != torch.uint8
            or len(rng["python"]) != 625 or rng["numpy"].shape != (624,)):
        faults.append("a random-number state has the wrong size")
    if faults:
        raise CheckpointError(f"{path} is damaged: " + "; ".join(faults))


def check_momentum(payload: dict, path, optimizer) -> None:
    """Each stored momentum has its parameter's shape (checked once the models are built)."""
    state = payload["optimizer"]["state"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        entry = state.get(i)
        buf = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        if entry is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape):
            raise CheckpointError(
                f"{path} is damaged: the optimizer's momentum of parameter {i} has shape "
                f"{tuple(getattr(buf, 'shape', ()))}, not {tuple(p.shape)}")
