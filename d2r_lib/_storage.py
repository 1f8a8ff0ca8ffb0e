"""Where the data lives (used through :mod:`d2r_lib.data`, chapter 1): folders searched, the
bundle's formats (npz, CIFAR-10 JPEG zip, Tiny ImageNet zip) and their SHA256 check against the
digests d2r_lib ships (a local ``SHA256SUMS`` may add files, never replace a shipped digest; cached
by path, size, mtime, ctime and inode, with a full check again after ``RECHECK_DAYS``),
torchvision downloads (md5-checked by torchvision), the decoded-image cache. A fault raises one
:class:`DataError` naming the file, what was expected and the fix."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import pickle
import re
import shutil
import stat
import time
import urllib.error
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write
from .validate import D2RWarning

__all__ = [
    "BUNDLE_SHA256", "CACHE_ENV", "CACHE_MIN_IMAGES", "CIFAR10_CLASSES", "DATA_ENV", "MIRROR_ENV",
    "TINY_BUNDLE_PER_CLASS", "TINY_BUNDLE_ZIP", "TINY_FOLDER", "TINY_MD5", "TINY_TRAIN_PER_CLASS",
    "TINY_URL", "DataCorrupt", "DataError", "DataMissing", "as_dir", "cache_dir",
    "cached", "candidate_dirs", "check_md5", "decode_jpeg", "download_cifar", "download_root",
    "download_tiny", "find_file", "locate", "read_cifar10_train_jpeg", "read_cifar_folder",
    "read_npz", "read_tiny", "source_key", "verify_file",
]

DATA_ENV = "D2R_DATA_DIR"
CACHE_ENV = "D2R_CACHE_DIR"
MIRROR_ENV = "D2R_DOWNLOAD_MIRROR"  # a base URL serving the CIFAR archives (tests: a local server)
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_BUNDLE_ZIP = "tiny-imagenet-200_val10000_train50pc.zip"
TINY_FOLDER = "tiny-imagenet-200"
TINY_TRAIN_PER_CLASS = 500  # train index = 500 * class + k, for the file <wnid>_<k>.JPEG
TINY_BUNDLE_PER_CLASS = 50
CACHE_MIN_IMAGES = 20000  # decoded JPEG splits at least this large are cached as .npz
RECHECK_DAYS = 7  # a verified file is hashed again after this long (bit rot changes no timestamp)
_CACHE_VERSION = 1

# The bundle's SHA256SUMS, used when a bundle file sits in a folder without that list.
BUNDLE_SHA256 = {
    "cifar100_test_20.npz": "140b103457829c2219e758492073053b51ade036ea09c1392c26bf871e463e7c",
    "cifar10_test_1000.npz": "a28732ac7db22785627716f868bdf31619dfb859143decaacacaa4ed25b605f3",
    "cifar10_test_10000_jpeg.npz":
        "648ab86c878650e790fbe35a67260892acfac56db49315015ad751381e609f07",
    "cifar10_train_7897.npz": "dbb63a26e029cec8facc5f09e0a44b72fc2a1f0845769ad4cfdb4007f639862c",
    "cifar10_train_50000_jpeg.zip":
        "04acbcc2894285ad6da9944748ed4714411ef95a71605bb3503e923b5dff3cab",
    TINY_BUNDLE_ZIP: "f6abf07cb7707fa13c4370ea62f4ec1d35dc296a4e6aa95ee890ae0850a436a3",
}
_BUNDLE_SIZE = {"cifar100_test_20.npz": 59156, "cifar10_test_1000.npz": 2830662,
                "cifar10_test_10000_jpeg.npz": 28518380, "cifar10_train_7897.npz": 22373278,
                "cifar10_train_50000_jpeg.zip": 52194371, TINY_BUNDLE_ZIP: 42576340}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


class DataError(RuntimeError):
    """Data that cannot be used: missing, damaged or not what its name says."""


class DataMissing(DataError, FileNotFoundError):
    """The data is in none of the folders searched (the message lists them and the fix)."""


class DataCorrupt(DataError):
    """A data file is truncated, damaged or modified (the message says how to get a good copy)."""


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------
def _default_download_dir() -> Path:  # ~/.cache/d2r_lib/data
    return Path.home() / ".cache" / "d2r_lib" / "data"


def cache_dir() -> Path:
    """$D2R_CACHE_DIR, else ~/.cache/d2r_lib (decoded images, verified checksums)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "d2r_lib"


def as_dir(data_dir) -> Path:
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError("data_dir must be a path (str or Path) or None; "
                        f"got {type(data_dir).__name__}")
    return Path(os.path.abspath(Path(data_dir).expanduser()))


def _candidates(data_dir=None) -> list[tuple[Path, str]]:
    if data_dir is not None:
        return [(as_dir(data_dir), "data_dir argument")]
    env = os.environ.get(DATA_ENV)
    if env:
        return [(as_dir(env), f"${DATA_ENV}")]
    cwd, pkg = Path.cwd(), Path(__file__).resolve().parent.parent
    known = [cwd / "data", cwd / ".." / "shared" / "data", cwd / ".." / ".." / "shared" / "data",
             pkg / "data", pkg / ".." / "shared" / "data", _default_download_dir()]
    return [(d, "known folder") for d in dict.fromkeys(Path(os.path.abspath(k)) for k in known)]


def candidate_dirs(data_dir=None) -> list[Path]:
    """Folders searched: ``data_dir`` only if given, else ``$D2R_DATA_DIR`` only, else known ones.

    Known folders, in order: ./data, ../shared/data, ../../shared/data (from the working
    directory), <package root>/data, <package root>/../shared/data, ~/.cache/d2r_lib/data.
    """
    return [d for d, _ in _candidates(data_dir)]


def download_root(data_dir) -> Path:
    """Where download=True writes: data_dir, else $D2R_DATA_DIR, else ~/.cache/d2r_lib/data."""
    if data_dir is not None:
        return as_dir(data_dir)
    env = os.environ.get(DATA_ENV)
    return as_dir(env) if env else _default_download_dir()


def locate(groups: Sequence[Sequence[str]], data_dir, what, download_call: str) -> Path:
    """First existing name, group by group, over the candidate folders; else :class:`DataMissing`
    listing every folder looked in and the fix, offering ``data.<download_call>``."""
    cands = _candidates(data_dir)
    for group in groups:
        for d, _ in cands:
            for name in group:
                if (d / name).exists():
                    return d / name
    names = ", ".join(repr(n) for g in groups for n in g)
    lines = [f"Could not find {what}: looked for any of {names} in:"]
    lines += [f"  {d}  ({origin}{'' if d.is_dir() else ', does not exist'})" for d, origin in cands]
    lines.append("Fix: set the environment variable D2R_DATA_DIR to the folder holding these files "
                 "(e.g. the offline bundle ../shared/data), or pass data_dir=\"/path/to/data\", "
                 "or pass download=True to fetch it (needs internet), e.g.\n"
                 f"  python -c \"from d2r_lib import data; data.{download_call}\"")
    raise DataMissing("\n".join(lines))


def find_file(filenames, data_dir=None) -> Path:
    """Path of the first of ``filenames`` (files or folders) found in :func:`candidate_dirs` order.

    Raises :class:`DataMissing` listing every folder looked in, the names and how to fix it.
    """
    if isinstance(filenames, (str, os.PathLike)):
        filenames = [filenames]
    filenames = [os.fspath(f) for f in filenames]
    if not filenames:
        raise ValueError("filenames must name at least one file or folder")
    return locate([filenames], data_dir, "the data", "cifar10('train', 'full', download=True)")


# --------------------------------------------------------------------------------------------
# Verification against SHA256SUMS
# --------------------------------------------------------------------------------------------
_VERIFIED: dict[str, tuple] = {}  # this process: real path -> entry (see _entry)


def _good_copy(path: Path) -> str:
    return (f"Get a good copy: copy {path.name} again from the offline bundle (the folder with "
            "SHA256SUMS, e.g. ../shared/data; `sha256sum -c SHA256SUMS` there checks it), "
            f"replacing {path}.")


def _listed_sha256(sums: Path, name: str) -> str | None:
    """The digest `sums` (a SHA256SUMS file) lists for `name`, or None."""
    try:
        text = sums.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise DataCorrupt(f"{sums} cannot be read ({e}); " + _good_copy(sums)) from None
    for line in text.splitlines():
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if m and m.group(2) == name:
            return m.group(1).lower()
    return None


def _expected_sha256(path: Path) -> tuple[str | None, str]:
    """(digest, where it comes from) for a bundle file; (None, "") for anything else. The digests
    d2r_lib ships are the authority: a local SHA256SUMS only adds files it does not know."""
    sums = path.parent / "SHA256SUMS"
    listed = _listed_sha256(sums, path.name) if sums.is_file() else None
    shipped = BUNDLE_SHA256.get(path.name)
    if shipped is None:
        return (listed, str(sums)) if listed else (None, "")
    if listed is not None and listed != shipped:
        warnings.warn(f"{sums} lists another SHA256 for {path.name} than the one d2r_lib ships; "
                      "the shipped digest is the one checked (a local SHA256SUMS may add files, "
                      "never replace a known digest)", D2RWarning, stacklevel=4)
    return shipped, "the bundle's SHA256SUMS (built into d2r_lib)"


def _read_verified() -> dict:
    try:
        with open(cache_dir() / "verified.json") as f:
            got = json.load(f)
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(found: tuple | None) -> None:
    """Record a verified (real path, entry) in memory and the JSON cache."""
    if found is None or _VERIFIED.get(found[0]) == tuple(found[1]):
        return
    _VERIFIED[found[0]] = tuple(found[1])
    known = _read_verified()
    known[found[0]] = found[1]

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(known, f, indent=0, sort_keys=True)

    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir() / "verified.json", write)
    except OSError as e:  # verified all the same; only the next run hashes again
        warnings.warn(f"could not record a checksum in {cache_dir()}: {e}", RuntimeWarning,
                      stacklevel=3)


def _entry(st: os.stat_result, digest: str) -> list:
    """What a verified file is remembered by: any write changes its ctime (which no program can set
    back, unlike mtime), a replaced file has another inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest, time.time_ns()]


def _still_verified(old, st: os.stat_result, digest: str) -> bool:
    """A remembered entry vouches for the file while nothing changed, it is not older than
    RECHECK_DAYS, and the file's last change was over a second before the check (a change in
    the same clock tick as the check would not show)."""
    if not isinstance(old, (list, tuple)) or len(old) != 6:
        return False
    checked = old[5]
    return (list(old[:5]) == _entry(st, digest)[:5] and isinstance(checked, int)
            and 0 <= time.time_ns() - checked < RECHECK_DAYS * 86400 * 10**9
            and st.st_ctime_ns < checked - 10**9)


def _regular(path: Path) -> None:
    """A data path is a regular file or a folder; a FIFO or a device would block a reader."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataCorrupt(f"{path} is not a regular file (a FIFO, a device or a socket); "
                          + _good_copy(path))


def _verify(path: Path) -> tuple | None:
    """(real path, entry) of a bundle file matching its digest, None outside the bundle."""
    _regular(path)
    if not path.is_file():
        return None
    expected, origin = _expected_sha256(path)
    if expected is None:
        return None
    real = os.path.realpath(path)
    st = os.stat(real)
    for old in (_VERIFIED.get(real), _read_verified().get(real)):
        if _still_verified(old, st, expected):
            _VERIFIED[real] = tuple(old)
            return real, list(old)
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != expected:
        size = _BUNDLE_SIZE[path.name] if expected == BUNDLE_SHA256.get(path.name) else st.st_size
        detail = (f" It has {st.st_size:,} bytes, the bundle's file {size:,}"
                  + (" (truncated)." if st.st_size < size else ".")) if size != st.st_size else ""
        sums = path.parent / "SHA256SUMS"
        if sums.is_file() and origin != str(sums) and _listed_sha256(sums, path.name) == \
                h.hexdigest():
            detail += (f" ({sums} lists this file's digest, but a local SHA256SUMS may only add "
                       "files, never replace a digest d2r_lib ships.)")
        raise DataCorrupt(f"{path} is damaged or modified: its SHA256 is {h.hexdigest()}, but "
                          f"{origin} expects {expected}.{detail} " + _good_copy(path))
    return real, _entry(st, expected)


def verify_file(path) -> bool:
    """Check a bundle file against its SHA256 (cached by path, size, mtime, ctime and inode;
    hashed again after RECHECK_DAYS).

    False for a file outside the bundle (nothing to check), True when it matches;
    :class:`DataCorrupt` (naming the file, the expected digest and the fix) otherwise.
    """
    found = _verify(Path(path))
    _remember(found)
    return found is not None


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
                pickle.UnpicklingError, IndexError)


@contextmanager
def _reading(path: Path, what: str, fix: str | None = None):
    """Turns a low-level read error (bad zip, CRC, truncated npz, bad JPEG) into DataCorrupt."""
    try:
        yield
    except DataError:
        raise
    except _READ_ERRORS as err:
        why = "" if isinstance(err, PermissionError) else " the file is truncated or damaged."
        raise DataCorrupt(f"{path} cannot be read as {what} ({type(err).__name__}: {err});{why} "
                          + (fix or _good_copy(path))) from None


def _check_npz(path: Path) -> None:
    """Each array of an .npz must declare no more bytes than its member holds: a forged header
    (a huge shape) is refused before numpy allocates it."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(member, max_header_size=10000)
            nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if nbytes > info.file_size:
                raise DataCorrupt(f"{path}: {info.filename} declares a {dtype} array of shape "
                                  f"{shape} ({nbytes:,} bytes) in {info.file_size:,} bytes; the "
                                  "file is damaged or forged. " + _good_copy(path))


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def read_npz(path: Path, expected_idx=None, check: Callable[[dict], None] | None = None) -> dict:
    """x (N, H, W, 3) uint8, y, idx, classes of a bundle .npz (verified first). ``check(arrays)``
    (the dataset's spec) runs before the file is remembered as verified."""
    found = _verify(path)
    what = "a bundle .npz file (x, y, idx, classes)"
    with _reading(path, what), open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # never let np.load guess (it would try a pickle)
            raise DataCorrupt(f"{path} is not an .npz archive (no zip header): the file is "
                              "damaged or not the bundle's. " + _good_copy(path))
    with _reading(path, what):
        _check_npz(path)
    with _reading(path, what), np.load(path, allow_pickle=False) as d:
        missing = {"x", "y", "idx", "classes"} - set(d.files)
        if missing:
            raise DataCorrupt(f"{path} is not a bundle file: keys {sorted(missing)} are "
                              "missing. " + _good_copy(path))
        out = {k: d[k] for k in ("x", "y", "idx", "classes")}
    if expected_idx is not None and not np.array_equal(out["idx"], expected_idx):
        raise DataCorrupt(f"{path} does not hold the expected original indices "
                          f"({len(expected_idx)} images); the file is not the bundle's. "
                          + _good_copy(path))
    if out["x"].dtype != np.uint8 or out["x"].ndim != 4 or len(out["y"]) != len(out["x"]):
        raise DataCorrupt(f"{path}: x must be uint8 (N, H, W, 3) with one label each; got "
                          f"{out['x'].dtype} {out['x'].shape}, {len(out['y'])} labels. "
                          + _good_copy(path))
    if check is not None:
        check(out)
    _remember(found)
    return out


def check_md5(path: Path, md5: str) -> None:
    """torchvision's own integrity check of a downloaded file."""
    from torchvision.datasets.utils import check_integrity

    if not check_integrity(str(path), md5):
        raise DataCorrupt(f"{path} is not the original file (md5 mismatch: truncated or "
                          f"modified). Delete {path.parent} and load again with download=True.")


def read_cifar_folder(folder: Path, which: str, split: str) -> dict:
    """torchvision's cifar-10-batches-py / cifar-100-python pickles (md5-checked first)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    files = cls.train_list if split == "train" else cls.test_list
    label_key = "labels" if which == "cifar10" else "fine_labels"
    for name, md5 in list(files) + [[cls.meta["filename"], cls.meta["md5"]]]:
        if not (folder / name).is_file():
            raise DataMissing(f"{folder} is incomplete: {name} is missing. Delete {folder} and "
                              "load again with download=True.")
        check_md5(folder / name, md5)
    fix = f"Delete {folder} and load again with download=True."
    xs, ys = [], []
    with _reading(folder, f"torchvision's {cls.base_folder}", fix):
        for name, _ in files:
            with open(folder / name, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        with open(folder / cls.meta["filename"], "rb") as f:
            classes = pickle.load(f, encoding="latin1")[cls.meta["key"]]
    x, y = np.concatenate(xs), np.concatenate(ys)
    expected = 50000 if split == "train" else 10000
    if len(x) != expected or len(y) != expected:
        raise DataCorrupt(f"{folder} holds {len(x)} {split} images; expected {expected}. {fix}")
    return {"x_nchw": x, "y": y, "idx": np.arange(expected, dtype=np.int64),
            "classes": np.array(classes)}


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def source_key(path: Path, names: Sequence[str] = ()) -> str:
    """Cache key of a zip (name, size, mtime) or a folder (name, file list, newest mtime)."""
    if path.is_file():
        st = path.stat()
        return f"{path.name}|{st.st_size}|{st.st_mtime_ns}"
    h = hashlib.sha1("\n".join(names).encode()).hexdigest()
    newest = max((os.stat(path / n).st_mtime_ns for n in names), default=0)
    return f"{path.name}|{len(names)}|{h}|{newest}"


def cached(key: str, tag: str, decode: Callable[[], dict], enabled: bool = True) -> dict:
    """Decoded arrays from the cache (.npz under :func:`cache_dir`), else decode and store."""
    if not enabled:
        return decode()
    digest = hashlib.sha1(f"{_CACHE_VERSION}|{tag}|{key}".encode()).hexdigest()[:16]
    cache = cache_dir() / f"{tag}-{digest}.npz"
    if cache.is_file():
        try:
            _check_npz(cache)
            with np.load(cache, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}
        except (*_READ_ERRORS, DataCorrupt):  # a damaged cache file: decode again, overwrite it
            cache.unlink(missing_ok=True)
    arrays = decode()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, write)
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache {cache}: {e}", RuntimeWarning,
                      stacklevel=3)
    return arrays


_CIFAR_JPEG_RE = re.compile(r"(?:^|/)train/([^/]+)/(\d+)\.jpg$")


def read_cifar10_train_jpeg(path: Path, check: Callable[[dict], None] | None = None) -> dict:
    """The 50,000 JPEG training images (zip or extracted folder), in torchvision order; ``check``
    as for :func:`read_npz`."""
    found = _verify(path)
    with _reading(path, "the CIFAR-10 JPEG training set"):
        zf = zipfile.ZipFile(path) if path.is_file() else None
        try:
            if zf is not None:
                names = [m for m in zf.namelist() if _CIFAR_JPEG_RE.search(m)]
            else:
                names = sorted(p.relative_to(path).as_posix()
                               for p in (path / "train").glob("*/*.jpg"))
            read = zf.read if zf is not None else (lambda n: (path / n).read_bytes())
            if len(names) != 50000:
                raise DataCorrupt(f"{path} holds {len(names)} training JPEGs; expected 50000. "
                                  + _good_copy(path))

            def decode():
                x = np.empty((50000, 32, 32, 3), np.uint8)
                y = np.full(50000, -1, np.int64)
                for n in names:
                    cls, idx = _CIFAR_JPEG_RE.search(n).groups()
                    if cls not in CIFAR10_CLASSES:
                        raise DataCorrupt(f"{path}: unknown class folder {cls!r} in {n}")
                    x[int(idx)] = decode_jpeg(read(n))
                    y[int(idx)] = CIFAR10_CLASSES.index(cls)
                if (y < 0).any():
                    raise DataCorrupt(f"{path}: the file names do not cover 0..49999 exactly")
                return {"x": x, "y": y}

            arrays = cached(source_key(path, names), "cifar10_train_jpeg", decode)
        finally:
            if zf is not None:
                zf.close()
    out = {"x": arrays["x"], "y": arrays["y"], "idx": np.arange(50000, dtype=np.int64),
           "classes": np.array(CIFAR10_CLASSES)}
    if check is not None:
        check(out)
    _remember(found)
    return out


# --------------------------------------------------------------------------------------------
# Tiny ImageNet (a tiny-imagenet-200 folder or a zip holding one)
# --------------------------------------------------------------------------------------------
class _Tree:
    def __init__(self, path: Path):
        self.path, self.zip, self.prefix = path, None, ""
        if path.is_file():
            self.zip = zipfile.ZipFile(path)
            self.all = self.zip.namelist()
            tops = [n[: -len("wnids.txt")] for n in self.all if n.endswith("wnids.txt")]
            if not tops:
                raise DataCorrupt(f"{path} holds no wnids.txt: not a Tiny ImageNet archive. "
                                  + _good_copy(path))
            self.prefix = min(tops, key=len)

    def read(self, rel: str, default: bytes | None = None) -> bytes:
        """The bytes of ``rel``; ``default`` if given and the file is absent, else DataCorrupt."""
        try:
            if self.zip is not None:
                return self.zip.read(self.prefix + rel)
            return (self.path / rel).read_bytes()
        except (KeyError, FileNotFoundError):
            if default is not None:
                return default
            raise DataCorrupt(f"{self.path}: {rel} is missing. " + _good_copy(self.path)) from None

    def files(self, under: str) -> list[str]:
        """Relative names of every file below the folder ``under``."""
        if self.zip is not None:
            p = self.prefix + under + "/"
            return [n[len(self.prefix):] for n in self.all if n.startswith(p) and n[-1] != "/"]
        return [p.relative_to(self.path).as_posix() for p in (self.path / under).rglob("*")
                if p.is_file()]


_TINY_TRAIN_RE = re.compile(r"^train/(n\d+)/images/(n\d+)_(\d+)\.JPEG$")
_TINY_VAL_RE = re.compile(r"^val/images/val_(\d+)\.JPEG$")


def _tiny_entries(tree: _Tree, split: str, wnids) -> list[tuple[int, int, str]]:
    """Sorted (original index, class, relative name) of every image of ``split``."""
    pos = {w: i for i, w in enumerate(wnids)}
    entries = []
    if split == "train":
        for n in tree.files("train"):
            m = _TINY_TRAIN_RE.match(n)
            if m and m.group(1) == m.group(2):
                if m.group(1) not in pos:
                    raise DataCorrupt(f"{tree.path}: folder {m.group(1)} is not in wnids.txt")
                c = pos[m.group(1)]
                entries.append((TINY_TRAIN_PER_CLASS * c + int(m.group(3)), c, n))
        return sorted(entries)
    ann = dict(line.split("\t")[:2] for line in
               tree.read("val/val_annotations.txt").decode().splitlines() if "\t" in line)
    for n in tree.files("val/images"):
        m = _TINY_VAL_RE.match(n)
        if m:
            fname = n.rsplit("/", 1)[1]
            if ann.get(fname) not in pos:
                raise DataCorrupt(f"{tree.path}: {fname} has no annotation with a wnids.txt class")
            entries.append((int(m.group(1)), pos[ann[fname]], n))
    return sorted(entries)


def read_tiny(path: Path, split: str, subset: str,
              check: Callable[[dict], None] | None = None) -> dict:
    """Tiny ImageNet arrays of ``split`` ("train"/"val") and ``subset`` ("bundle"/"full");
    ``check`` as for :func:`read_npz`."""
    found = _verify(path)
    need_full = subset == "full"
    with _reading(path, "Tiny ImageNet"):
        tree = _Tree(path)
        try:
            wnids = tree.read("wnids.txt").decode().split()
            if len(wnids) != 200:
                raise DataCorrupt(f"{path}: wnids.txt lists {len(wnids)} classes; expected 200")
            words = {}
            for line in tree.read("words.txt", b"").decode().splitlines():
                wnid, _, text = line.partition("\t")
                words[wnid.strip()] = text.split(",")[0].strip()
            classes = [words.get(w) or w for w in wnids]
            entries = _tiny_entries(tree, split, wnids)
            if split == "train" and need_full:
                least = np.bincount([c for _, c, _ in entries], minlength=200).min()
                if least < TINY_TRAIN_PER_CLASS:
                    raise DataMissing(
                        "subset='full' needs the full Tiny ImageNet training set (500 images per "
                        f"class); {path} has only {least} for some class (the offline bundle has "
                        "50). Use subset='bundle', point data_dir at a full tiny-imagenet-200/ "
                        "folder, or pass download=True.")
            elif split == "train":
                keep = TINY_BUNDLE_PER_CLASS
                entries = [e for e in entries if e[0] % TINY_TRAIN_PER_CLASS < keep]
            elif need_full and len(entries) != 10000:
                raise DataMissing(f"{path} holds {len(entries)} val images; subset='full' needs "
                                  "all 10000")
            if not entries:
                raise DataMissing(f"{path} holds no {split} images")
            rels = [n for _, _, n in entries]

            def decode():
                x = np.empty((len(rels), 64, 64, 3), np.uint8)
                for i, n in enumerate(rels):
                    img = decode_jpeg(tree.read(n))
                    if img.shape != (64, 64, 3):
                        raise DataCorrupt(f"{path}: {n} is {img.shape[1]}x{img.shape[0]}, "
                                          "expected 64x64")
                    x[i] = img
                return {"x": x}

            key = source_key(path, rels) if path.is_dir() else source_key(path)
            arrays = cached(f"{key}|{split}|{subset}", "tinyimagenet", decode,
                            enabled=len(rels) >= CACHE_MIN_IMAGES)
        finally:
            if tree.zip is not None:
                tree.zip.close()
    out = {"x": arrays["x"], "y": np.array([c for _, c, _ in entries], np.int64),
           "idx": np.array([i for i, _, _ in entries], np.int64), "classes": np.array(classes)}
    if check is not None:
        check(out)
    _remember(found)
    return out


# --------------------------------------------------------------------------------------------
# Downloads (only with download=True; torchvision checks each file's md5)
# --------------------------------------------------------------------------------------------
def _why(e: Exception) -> str:
    """A download failure in words."""
    if isinstance(e, urllib.error.HTTPError):
        return f"the server answered HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"no connection to the server ({e.reason})"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed before the whole file arrived (truncated download)"
    if isinstance(e, RuntimeError) and "corrupted" in str(e):  # torchvision's md5 check
        return "the downloaded file failed its md5 check (truncated or corrupt)"
    return f"{type(e).__name__}: {e}"


def _download(what: str, url: str, data_dir, fetch: Callable[[Path], Path]) -> Path:
    """Run ``fetch(root)``; on failure remove every file and folder this call created (in ``root``
    and ``root`` itself, with any parent it made), then raise DataMissing naming the URL and the
    fix."""
    root = download_root(data_dir)
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return fetch(root)
    except Exception as e:  # noqa: BLE001 (URLError, full disk, torchvision's md5 check)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif root.is_dir():
            for path in set(root.iterdir()) - before:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        mirror = f" (check ${MIRROR_ENV})" if os.environ.get(MIRROR_ENV) else ""
        raise DataMissing(f"Could not download {what} from {url}{mirror} into {root}: {_why(e)}. "
                          "Nothing was kept. Check the internet connection and try again, or "
                          f"download {url} yourself and extract it into {root}, or use the "
                          "offline bundle (set D2R_DATA_DIR to its folder).") from None


def download_cifar(which: str, split: str, data_dir) -> Path:
    """torchvision's download of CIFAR-10/100 (its md5 checks included) into download_root, from
    ``$D2R_DOWNLOAD_MIRROR/<archive name>`` instead of the original URL when that is set."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        cls = type(cls.__name__, (cls,), {"url": f"{mirror.rstrip('/')}/{cls.filename}"})

    def fetch(root):
        cls(str(root), train=(split == "train"), download=True)
        return root / cls.base_folder

    return _download(which.upper(), getattr(cls, "url", "torchvision"), data_dir, fetch)


def download_tiny(data_dir) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive

    def fetch(root):
        download_and_extract_archive(TINY_URL, download_root=str(root), md5=TINY_MD5,
                                     filename="tiny-imagenet-200.zip", remove_finished=True)
        return root / TINY_FOLDER

    return _download("Tiny ImageNet", TINY_URL, data_dir, fetch)
