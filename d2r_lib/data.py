"""Datasets and loaders (introduced in chapter 1).

CIFAR-10, CIFAR-100 and Tiny ImageNet, from the offline bundle or a torchvision download, plus a
synthetic set for unit tests. The paper's pipeline: pixels in [0, 1], no mean/std normalisation,
training augmentation RandomCrop(size, padding=4) + RandomHorizontalFlip.

Data folders are searched in this order: the ``data_dir`` argument, else ``$D2R_DATA_DIR``, else
known local folders (see :func:`candidate_dirs`). Nothing ever falls back to random data.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import validate

DATA_ENV = "D2R_DATA_DIR"
CACHE_ENV = "D2R_CACHE_DIR"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The lossless CIFAR-10 training subset ("mini"): original training indices (torchvision order).
MINI_TRAIN_RANGES = ((0, 3999), (10000, 10931), (20000, 20931), (30000, 31100), (40000, 40931))
MINI_TRAIN_INDICES = np.concatenate([np.arange(a, b + 1, dtype=np.int64) for a, b in MINI_TRAIN_RANGES])
MINI_TRAIN_INDICES.flags.writeable = False
MINI_TEST_INDICES = np.arange(1000, dtype=np.int64)
MINI_TEST_INDICES.flags.writeable = False
CIFAR100_TEST20_INDICES = np.arange(20, dtype=np.int64)
CIFAR100_TEST20_INDICES.flags.writeable = False

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_BUNDLE_ZIP = "tiny-imagenet-200_val10000_train50pc.zip"
TINY_FOLDER = "tiny-imagenet-200"
TINY_TRAIN_PER_CLASS = 500  # train index = 500 * class + k, for the file <wnid>_<k>.JPEG
TINY_BUNDLE_PER_CLASS = 50

DATASETS = {
    "cifar10": {"num_classes": 10, "image_size": 32, "splits": ("train", "test"),
                "subsets": ("mini", "full"), "default_subset": {"train": "mini", "test": "mini"}},
    "cifar100": {"num_classes": 100, "image_size": 32, "splits": ("train", "test"),
                 "subsets": ("test20", "full"), "default_subset": {"train": "full", "test": "test20"}},
    "tinyimagenet": {"num_classes": 200, "image_size": 64, "splits": ("train", "val"),
                     "subsets": ("bundle", "full"), "default_subset": {"train": "bundle", "val": "bundle"}},
    "synthetic": {"num_classes": 10, "image_size": 32, "splits": ("train", "test"),
                  "subsets": ("default",), "default_subset": {"train": "default", "test": "default"}},
}

_JPEG_WARNED = False
_CACHE_MIN_IMAGES = 20000  # decoded JPEG splits at least this large are cached as .npz
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """Images kept as uint8 (N, 3, H, W); items are (float image in [0, 1], int label)."""

    def __init__(self, images, labels, *, classes, indices=None, name="dataset", source="memory",
                 lossless=True, transform=None, path=None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3:
            raise ValueError("images must be a uint8 tensor of shape (N, 3, H, W); got "
                             f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        n = images.shape[0]
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
        classes = [str(c) for c in classes]
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes) - 1}] (one per class name)")
        indices = torch.arange(n, dtype=torch.int64) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        if indices.shape != (n,):
            raise ValueError(f"indices must have shape ({n},); got {tuple(indices.shape)}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
        self.images, self.labels, self.indices, self.classes = images, labels, indices, classes
        self.name, self.source, self.lossless, self.transform = str(name), str(source), bool(lossless), transform
        self.path = None if path is None else Path(path)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    def tensors(self, device=None):
        """All images as float (N, 3, H, W) in [0, 1], without augmentation, and int64 labels."""
        x = self.images if device is None else self.images.to(device)
        y = self.labels.clone() if device is None else self.labels.to(device)
        return x.float().div_(255), y

    def class_counts(self) -> list[int]:
        """Number of images of each class, in class order."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def _with(self, positions, name, transform="keep") -> "ImageDataset":
        if positions is None:
            images, labels, indices = self.images, self.labels, self.indices
        else:
            images, labels, indices = self.images[positions], self.labels[positions], self.indices[positions]
        return ImageDataset(images, labels, classes=self.classes, indices=indices, name=name, source=self.source,
                            lossless=self.lossless, path=self.path,
                            transform=self.transform if transform == "keep" else transform)

    def subset(self, n=None, *, positions=None, per_class=None, seed=0, random=False) -> "ImageDataset":
        """First ``n`` rows, explicit ``positions``, or ``per_class`` images of each class.

        Selection is deterministic (the first rows, in dataset order); ``random=True`` draws them
        instead with a generator seeded by ``seed`` (kept in dataset order). No argument: everything.
        """
        given = [k for k, v in (("n", n), ("positions", positions), ("per_class", per_class)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of n, positions, per_class; got {', '.join(given)}")
        validate.number("seed", seed, integer=True)
        if not isinstance(random, bool):
            raise TypeError(f"random must be True or False; got {random!r}")
        size = len(self)
        gen = torch.Generator().manual_seed(seed)
        if n is not None:
            validate.number("n", n, min=1, integer=True)
            if n > size:
                raise ValueError(f"n must be <= {size} (the size of {self.name}); got {n}")
            pos = torch.randperm(size, generator=gen)[:n].sort().values if random else torch.arange(n)
            return self._with(pos, f"{self.name}[:{n}]" if not random else f"{self.name}[random {n}, seed={seed}]")
        if positions is not None:
            try:
                pos = torch.as_tensor(positions)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"positions must be a sequence of integers; got {type(positions).__name__}") from e
            if pos.dim() != 1 or pos.is_floating_point() or pos.dtype == torch.bool or pos.is_complex():
                raise TypeError(f"positions must be a 1-D sequence of integers; got {pos.dtype} {tuple(pos.shape)}")
            pos = pos.long()
            if pos.numel() and (pos.min() < 0 or pos.max() >= size):
                raise ValueError(f"positions must lie in [0, {size - 1}] for {self.name}; "
                                 f"got values in [{pos.min().item()}, {pos.max().item()}]")
            return self._with(pos, f"{self.name}[{pos.numel()} positions]")
        if per_class is not None:
            validate.number("per_class", per_class, min=1, integer=True)
            counts = torch.bincount(self.labels, minlength=self.num_classes)
            smallest = int(counts.argmin())
            if per_class > counts[smallest]:
                raise ValueError(f"per_class must be <= {int(counts[smallest])}, the size of the smallest class "
                                 f"({self.classes[smallest]!r}) in {self.name}; got {per_class}")
            chosen = []
            for c in range(self.num_classes):
                where = torch.nonzero(self.labels == c).flatten()
                if random:
                    where = where[torch.randperm(where.numel(), generator=gen)]
                chosen.append(where[:per_class])
            pos = torch.cat(chosen).sort().values
            tag = f"per_class={per_class}" + (f", random, seed={seed}" if random else "")
            return self._with(pos, f"{self.name}[{tag}]")
        return self._with(None, self.name)

    def with_augmentation(self, enabled=True) -> "ImageDataset":
        """The same images (shared tensors) with the paper's augmentation on (or off)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False; got {enabled!r}")
        return self._with(None, self.name, transform=paper_augmentation(self.image_size) if enabled else None)

    def __repr__(self) -> str:
        aug = "none" if self.transform is None else "on"
        return (f"ImageDataset(name={self.name!r}, size={len(self)}, classes={self.num_classes}, "
                f"image_size={self.image_size}, source={self.source!r}, lossless={self.lossless}, augmentation={aug})")


def paper_augmentation(image_size=32, padding=4):
    """RandomCrop(image_size, padding) + RandomHorizontalFlip on one (3, H, W) tensor; global torch RNG."""
    from torchvision.transforms import v2

    validate.number("image_size", image_size, min=1, integer=True)
    validate.number("padding", padding, min=0, integer=True)
    return v2.Compose([v2.RandomCrop(image_size, padding=padding), v2.RandomHorizontalFlip()])


# --------------------------------------------------------------------------------------------------
# Where the data lives
# --------------------------------------------------------------------------------------------------
def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _default_download_dir() -> Path:
    return Path.home() / ".cache" / "d2r_lib" / "data"


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "d2r_lib"


def _as_dir(data_dir) -> Path:
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path (str or Path) or None; got {type(data_dir).__name__}")
    return Path(os.path.abspath(Path(data_dir).expanduser()))


def _candidates(data_dir=None) -> list[tuple[Path, str]]:
    if data_dir is not None:
        return [(_as_dir(data_dir), "data_dir argument")]
    env = os.environ.get(DATA_ENV)
    if env:
        return [(_as_dir(env), f"${DATA_ENV}")]
    cwd, pkg = Path.cwd(), _package_root()
    known = [cwd / "data", cwd / ".." / "shared" / "data", cwd / ".." / ".." / "shared" / "data",
             pkg / "data", pkg / ".." / "shared" / "data", _default_download_dir()]
    out, seen = [], set()
    for d in known:
        d = Path(os.path.abspath(d))
        if d not in seen:
            seen.add(d)
            out.append((d, "known folder"))
    return out


def candidate_dirs(data_dir=None) -> list[Path]:
    """Folders searched for data: ``data_dir`` only if given, else ``$D2R_DATA_DIR`` only, else known folders.

    Known folders, in order: ./data, ../shared/data, ../../shared/data (relative to the working directory),
    <package root>/data, <package root>/../shared/data, ~/.cache/d2r_lib/data (the download default).
    """
    return [d for d, _ in _candidates(data_dir)]


def _missing_message(what, filenames, candidates, download_ok) -> str:
    lines = [f"Could not find {what}: looked for any of {', '.join(map(repr, filenames))} in:"]
    for d, origin in candidates:
        lines.append(f"  {d}  ({origin}{'' if d.is_dir() else ', does not exist'})")
    lines.append("Fix: set the environment variable D2R_DATA_DIR to the folder holding these files "
                 "(e.g. the offline bundle ../shared/data), or pass data_dir=\"/path/to/data\"")
    lines[-1] += (", or pass download=True to fetch it (needs internet)." if download_ok
                  else "; this file is only in the offline bundle (download=True cannot fetch it).")
    return "\n".join(lines)


def _locate(groups: Sequence[Sequence[str]], data_dir, what, download_ok=True) -> Path:
    cands = _candidates(data_dir)
    for group in groups:
        for d, _ in cands:
            for name in group:
                p = d / name
                if p.exists():
                    return p
    names = [n for g in groups for n in g]
    raise FileNotFoundError(_missing_message(what, names, cands, download_ok))


def find_file(filenames, data_dir=None) -> Path:
    """Path of the first of ``filenames`` (files or folders) found in :func:`candidate_dirs` order.

    Raises FileNotFoundError listing every folder looked in, the names expected and how to fix it.
    """
    if isinstance(filenames, (str, os.PathLike)):
        filenames = [filenames]
    filenames = [os.fspath(f) for f in filenames]
    if not filenames:
        raise ValueError("filenames must name at least one file or folder")
    return _locate([filenames], data_dir, "the data", download_ok=True)


def _download_root(data_dir) -> Path:
    """Where download=True writes: data_dir, else $D2R_DATA_DIR, else ~/.cache/d2r_lib/data."""
    if data_dir is not None:
        return _as_dir(data_dir)
    env = os.environ.get(DATA_ENV)
    return _as_dir(env) if env else _default_download_dir()


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def _check_dir(data_dir) -> None:
    if data_dir is not None:
        _as_dir(data_dir)


def _flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def _from_nhwc(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()


def _read_npz(path: Path, expected_idx=None) -> dict:
    with np.load(path) as d:
        missing = {"x", "y", "idx", "classes"} - set(d.files)
        if missing:
            raise ValueError(f"{path} is not a bundle file: keys {sorted(missing)} are missing")
        out = {k: d[k] for k in ("x", "y", "idx", "classes")}
    if expected_idx is not None and not np.array_equal(out["idx"], expected_idx):
        raise ValueError(f"{path} does not hold the expected original indices "
                         f"({len(expected_idx)} images); the file is not the bundle's")
    return out


def _check_md5(path: Path, md5: str) -> None:
    from torchvision.datasets.utils import check_integrity

    if not check_integrity(str(path), md5):
        raise RuntimeError(f"{path} is not the original file (md5 mismatch: truncated or modified). "
                           f"Delete {path.parent} and load again with download=True.")


def _read_cifar_folder(folder: Path, which: str, split: str) -> dict:
    """Read torchvision's cifar-10-batches-py / cifar-100-python pickles (md5-checked first)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    files = cls.train_list if split == "train" else cls.test_list
    label_key = "labels" if which == "cifar10" else "fine_labels"
    xs, ys = [], []
    for name, md5 in list(files) + [[cls.meta["filename"], cls.meta["md5"]]]:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is incomplete: {name} is missing. Delete it and use download=True.")
        _check_md5(folder / name, md5)
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
        raise RuntimeError(f"{folder} holds {len(x)} {split} images; expected {expected}")
    return {"x_nchw": x, "y": y, "idx": np.arange(expected, dtype=np.int64), "classes": np.array(classes)}


def _download_cifar(which: str, split: str, data_dir) -> Path:
    from torchvision import datasets

    root = _download_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    cls(str(root), train=(split == "train"), download=True)
    return root / cls.base_folder


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _source_key(path: Path, names: Sequence[str] = ()) -> str:
    """Cache key of a zip (name, size, mtime) or a folder (name, file list, newest mtime)."""
    if path.is_file():
        st = path.stat()
        return f"{path.name}|{st.st_size}|{st.st_mtime_ns}"
    h = hashlib.sha1("\n".join(names).encode()).hexdigest()
    newest = max((os.stat(path / n).st_mtime_ns for n in names), default=0)
    return f"{path.name}|{len(names)}|{h}|{newest}"


def _cached(key: str, tag: str, decode: Callable[[], dict], enabled: bool = True) -> dict:
    """Decoded arrays from the cache (.npz under $D2R_CACHE_DIR or ~/.cache/d2r_lib), else decode + store."""
    if not enabled:
        return decode()
    digest = hashlib.sha1(f"{_CACHE_VERSION}|{tag}|{key}".encode()).hexdigest()[:16]
    cache = _cache_dir() / f"{tag}-{digest}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as d:
                return {k: d[k] for k in d.files}
        except Exception:  # a damaged cache file: decode again and overwrite it
            pass
    arrays = decode()
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{tag}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, cache)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache {cache}: {e}", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return arrays


def _warn_jpeg(what: str) -> None:
    global _JPEG_WARNED
    if not _JPEG_WARNED:
        _JPEG_WARNED = True
        warnings.warn(
            f"{what} comes from JPEG copies (quality 75), not the lossless originals: the mean pixel error "
            "(~6/255) is comparable to the usual eps = 8/255, so robust accuracy on it is not comparable to "
            "published numbers. Report robust numbers on the lossless 'mini' subsets (cifar10(subset='mini')).",
            UserWarning, stacklevel=3)


_CIFAR_JPEG_RE = re.compile(r"(?:^|/)train/([^/]+)/(\d+)\.jpg$")


def _read_cifar10_train_jpeg(path: Path) -> dict:
    """The 50,000 JPEG training images (zip or extracted folder), ordered by torchvision index."""
    zf = zipfile.ZipFile(path) if path.is_file() else None
    try:
        if zf is not None:
            names = [m for m in zf.namelist() if _CIFAR_JPEG_RE.search(m)]
            read = zf.read
        else:
            names = sorted(str(p.relative_to(path)).replace(os.sep, "/") for p in (path / "train").glob("*/*.jpg"))
            read = lambda n: (path / n).read_bytes()  # noqa: E731
        if len(names) != 50000:
            raise RuntimeError(f"{path} holds {len(names)} training JPEGs; expected 50000")

        def decode():
            x = np.empty((50000, 32, 32, 3), np.uint8)
            y = np.full(50000, -1, np.int64)
            for n in names:
                cls, idx = _CIFAR_JPEG_RE.search(n).groups()
                if cls not in CIFAR10_CLASSES:
                    raise RuntimeError(f"{path}: unknown class folder {cls!r} in {n}")
                x[int(idx)] = _decode_jpeg(read(n))
                y[int(idx)] = CIFAR10_CLASSES.index(cls)
            if (y < 0).any():
                raise RuntimeError(f"{path}: the file names do not cover the indices 0..49999 exactly")
            return {"x": x, "y": y}

        arrays = _cached(_source_key(path, names), "cifar10_train_jpeg", decode)
    finally:
        if zf is not None:
            zf.close()
    return {"x": arrays["x"], "y": arrays["y"], "idx": np.arange(50000, dtype=np.int64),
            "classes": np.array(CIFAR10_CLASSES)}


def _dataset(arrays: dict, *, name, source, lossless, path, augment, select=None) -> ImageDataset:
    x = torch.from_numpy(arrays["x_nchw"]) if "x_nchw" in arrays else _from_nhwc(arrays["x"])
    y, idx = torch.from_numpy(np.asarray(arrays["y"], np.int64)), torch.from_numpy(np.asarray(arrays["idx"], np.int64))
    if select is not None:
        sel = torch.from_numpy(np.array(select, dtype=np.int64))
        x, y, idx = x[sel], y[sel], idx[sel]
    ds = ImageDataset(x.contiguous(), y.clone(), classes=[str(c) for c in arrays["classes"]], indices=idx.clone(),
                      name=name, source=source, lossless=lossless, path=path)
    return ds.with_augmentation(True) if augment else ds


def _check_split_subset(name, split, subset):
    spec = DATASETS[name]
    validate.choice("split", split, spec["splits"])
    validate.choice("subset", subset, spec["subsets"])


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------------
def cifar10(split="train", subset="mini", *, data_dir=None, download=False, augment=False) -> ImageDataset:
    """CIFAR-10. ``mini``: the lossless subsets (train: MINI_TRAIN_INDICES, 7,897; test: 0-999).

    ``full``: torchvision's ``cifar-10-batches-py`` (lossless) if present, else the bundle's JPEG copies
    (``lossless=False``, warns once), else a torchvision download when ``download=True``.
    """
    _check_split_subset("cifar10", split, subset)
    _flag("download", download)
    _flag("augment", augment)
    _check_dir(data_dir)
    name = f"cifar10/{split}/{subset}"
    if subset == "mini":
        npz = "cifar10_train_7897.npz" if split == "train" else "cifar10_test_1000.npz"
        expected = MINI_TRAIN_INDICES if split == "train" else MINI_TEST_INDICES
        try:
            path = _locate([[npz, "cifar-10-batches-py"]], data_dir, f"CIFAR-10 {split} (mini)")
        except FileNotFoundError:
            if not download:
                raise
            path = _download_cifar("cifar10", split, data_dir)
        if path.suffix == ".npz":
            arrays = _read_npz(path, expected)
            return _dataset(arrays, name=name, source=f"bundle:{path.name}", lossless=True, path=path, augment=augment)
        arrays = _read_cifar_folder(path, "cifar10", split)
        return _dataset(arrays, name=name, source="torchvision:cifar-10-batches-py", lossless=True, path=path,
                        augment=augment, select=expected)
    jpeg = ["cifar10_train_50000_jpeg.zip", "cifar10_train_50000_jpeg"] if split == "train" \
        else ["cifar10_test_10000_jpeg.npz"]
    try:  # what is on disk first (lossless before JPEG), so offline machines never try the network
        path = _locate([["cifar-10-batches-py"], jpeg], data_dir, f"CIFAR-10 {split} (full)")
    except FileNotFoundError:
        if not download:
            raise
        path = _download_cifar("cifar10", split, data_dir)
    if path.name == "cifar-10-batches-py":
        arrays = _read_cifar_folder(path, "cifar10", split)
        return _dataset(arrays, name=name, source="torchvision:cifar-10-batches-py", lossless=True, path=path,
                        augment=augment)
    if split == "test":
        arrays = _read_npz(path, np.arange(10000, dtype=np.int64))
    else:
        arrays = _read_cifar10_train_jpeg(path)
    _warn_jpeg(f"CIFAR-10 {split} (full)")
    kind = "bundle" if path.is_file() else "folder"
    return _dataset(arrays, name=name, source=f"{kind}:{path.name}", lossless=False, path=path, augment=augment)


def cifar100(split="test", subset="test20", *, data_dir=None, download=False, augment=False) -> ImageDataset:
    """CIFAR-100 (fine labels). ``test20``: test images 0-19 (bundle or torchvision); ``full``: torchvision."""
    _check_split_subset("cifar100", split, subset)
    _flag("download", download)
    _flag("augment", augment)
    if subset == "test20" and split != "test":
        raise ValueError(f"subset='test20' exists only for split='test'; got split={split!r} "
                         "(use subset='full' for the training set)")
    _check_dir(data_dir)
    name = f"cifar100/{split}/{subset}"
    names = ["cifar100_test_20.npz", "cifar-100-python"] if subset == "test20" else ["cifar-100-python"]
    try:
        path = _locate([names], data_dir, f"CIFAR-100 {split} ({subset})")
    except FileNotFoundError:
        if not download:
            raise
        path = _download_cifar("cifar100", split, data_dir)
    if path.suffix == ".npz":
        arrays = _read_npz(path, CIFAR100_TEST20_INDICES)
        return _dataset(arrays, name=name, source=f"bundle:{path.name}", lossless=True, path=path, augment=augment)
    arrays = _read_cifar_folder(path, "cifar100", split)
    return _dataset(arrays, name=name, source="torchvision:cifar-100-python", lossless=True, path=path,
                    augment=augment, select=CIFAR100_TEST20_INDICES if subset == "test20" else None)


# --------------------------------------------------------------------------------------------------
# Tiny ImageNet
# --------------------------------------------------------------------------------------------------
class _Tree:
    """Uniform read access to a tiny-imagenet-200 folder or a zip holding one."""

    def __init__(self, path: Path):
        self.path, self.zip, self.prefix = path, None, ""
        if path.is_file():
            self.zip = zipfile.ZipFile(path)
            self.all = self.zip.namelist()
            tops = [n[: -len("wnids.txt")] for n in self.all if n.endswith("wnids.txt")]
            if not tops:
                raise RuntimeError(f"{path} holds no wnids.txt: not a Tiny ImageNet archive")
            self.prefix = min(tops, key=len)

    def close(self):
        if self.zip is not None:
            self.zip.close()

    def exists(self, rel: str) -> bool:
        return (self.prefix + rel) in self.all if self.zip is not None else (self.path / rel).is_file()

    def read(self, rel: str) -> bytes:
        return self.zip.read(self.prefix + rel) if self.zip is not None else (self.path / rel).read_bytes()

    def files(self, under: str) -> list[str]:
        """Relative names of every file below the folder ``under``."""
        if self.zip is not None:
            p = self.prefix + under + "/"
            return [n[len(self.prefix):] for n in self.all if n.startswith(p) and not n.endswith("/")]
        base = self.path / under
        out = []
        for dirpath, _, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.path).as_posix()
            out.extend(f"{rel}/{f}" for f in filenames)
        return out


_TINY_TRAIN_RE = re.compile(r"^train/(n\d+)/images/(n\d+)_(\d+)\.JPEG$")
_TINY_VAL_RE = re.compile(r"^val/images/val_(\d+)\.JPEG$")


def _tiny_classes(tree: _Tree):
    if not tree.exists("wnids.txt"):
        raise RuntimeError(f"{tree.path}: wnids.txt is missing")
    wnids = tree.read("wnids.txt").decode().split()
    words = {}
    if tree.exists("words.txt"):
        for line in tree.read("words.txt").decode().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    return wnids, [words.get(w) or w for w in wnids]


def _tiny_train_entries(tree: _Tree, wnids):
    pos = {w: i for i, w in enumerate(wnids)}
    entries = []
    for n in tree.files("train"):
        m = _TINY_TRAIN_RE.match(n)
        if m and m.group(1) == m.group(2):
            if m.group(1) not in pos:
                raise RuntimeError(f"{tree.path}: training folder {m.group(1)} is not in wnids.txt")
            c, k = pos[m.group(1)], int(m.group(3))
            entries.append((TINY_TRAIN_PER_CLASS * c + k, c, n))
    return sorted(entries)


def _tiny_val_entries(tree: _Tree, wnids):
    pos = {w: i for i, w in enumerate(wnids)}
    if not tree.exists("val/val_annotations.txt"):
        raise RuntimeError(f"{tree.path}: val/val_annotations.txt is missing")
    ann = {}
    for line in tree.read("val/val_annotations.txt").decode().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            ann[parts[0]] = parts[1]
    entries = []
    for n in tree.files("val/images"):
        m = _TINY_VAL_RE.match(n)
        if m:
            fname = n.rsplit("/", 1)[1]
            if ann.get(fname) not in pos:
                raise RuntimeError(f"{tree.path}: {fname} has no annotation with a class from wnids.txt")
            entries.append((int(m.group(1)), pos[ann[fname]], n))
    return sorted(entries)


def _download_tiny(data_dir) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive

    root = _download_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    download_and_extract_archive(TINY_URL, download_root=str(root), filename="tiny-imagenet-200.zip", md5=TINY_MD5,
                                 remove_finished=True)
    return root / TINY_FOLDER


def tinyimagenet(split="val", subset="bundle", *, data_dir=None, download=False, augment=False) -> ImageDataset:
    """Tiny ImageNet (64x64, 200 classes in wnids.txt order; grayscale images converted to RGB).

    Source: an extracted ``tiny-imagenet-200/`` folder or the bundle zip. ``bundle``: all val images and
    training images ``<wnid>_0..49`` (the bundle's 50 per class, also when the full set is there);
    ``full``: all val and the full 500-per-class training set. ``indices``: val = N of ``val_N.JPEG``;
    train = 500 * class + k for ``<wnid>_k.JPEG``.
    """
    _check_split_subset("tinyimagenet", split, subset)
    _flag("download", download)
    _flag("augment", augment)
    _check_dir(data_dir)
    name = f"tinyimagenet/{split}/{subset}"
    need_full = split == "train" and subset == "full"
    names = [TINY_FOLDER] if need_full else [TINY_FOLDER, TINY_BUNDLE_ZIP]
    try:
        path = _locate([names], data_dir, f"Tiny ImageNet {split} ({subset})")
    except FileNotFoundError:
        if not download:
            raise
        path = _download_tiny(data_dir)
    tree = _Tree(path)
    try:
        wnids, classes = _tiny_classes(tree)
        if len(wnids) != 200:
            raise RuntimeError(f"{path}: wnids.txt lists {len(wnids)} classes; Tiny ImageNet has 200")
        entries = _tiny_train_entries(tree, wnids) if split == "train" else _tiny_val_entries(tree, wnids)
        if split == "train":
            counts = np.bincount([c for _, c, _ in entries], minlength=200)
            if need_full and counts.min() < TINY_TRAIN_PER_CLASS:
                if download:
                    tree.close()
                    tree = _Tree(_download_tiny(data_dir))
                    path = tree.path
                    entries = _tiny_train_entries(tree, wnids)
                    counts = np.bincount([c for _, c, _ in entries], minlength=200)
                if counts.min() < TINY_TRAIN_PER_CLASS:
                    raise FileNotFoundError(
                        f"subset='full' needs the full Tiny ImageNet training set (500 images per class); {path} has "
                        f"only {counts.min()} for some class (the offline bundle has 50). Use subset='bundle', "
                        "point data_dir at a full tiny-imagenet-200/ folder, or pass download=True.")
            if not need_full:
                entries = [e for e in entries if e[0] % TINY_TRAIN_PER_CLASS < TINY_BUNDLE_PER_CLASS]
        elif subset == "full" and len(entries) != 10000:
            raise FileNotFoundError(f"{path} holds {len(entries)} val images; subset='full' needs all 10000")
        if not entries:
            raise FileNotFoundError(f"{path} holds no {split} images")
        rels = [n for _, _, n in entries]

        def decode():
            x = np.empty((len(rels), 64, 64, 3), np.uint8)
            for i, n in enumerate(rels):
                img = _decode_jpeg(tree.read(n))
                if img.shape != (64, 64, 3):
                    raise RuntimeError(f"{path}: {n} is {img.shape[1]}x{img.shape[0]}, expected 64x64")
                x[i] = img
            return {"x": x}

        key = _source_key(path, rels) if path.is_dir() else _source_key(path)
        arrays = _cached(f"{key}|{split}|{subset}", "tinyimagenet", decode, enabled=len(rels) >= _CACHE_MIN_IMAGES)
    finally:
        tree.close()
    arrays = {"x": arrays["x"], "y": np.array([c for _, c, _ in entries], np.int64),
              "idx": np.array([i for i, _, _ in entries], np.int64), "classes": np.array(classes)}
    kind = "bundle" if path.is_file() else "folder"
    return _dataset(arrays, name=name, source=f"{kind}:{path.name}", lossless=True, path=path, augment=augment)


# --------------------------------------------------------------------------------------------------
# Synthetic data, dispatch, loaders
# --------------------------------------------------------------------------------------------------
def synthetic(n=256, *, num_classes=10, image_size=32, seed=0, augment=False) -> ImageDataset:
    """A learnable toy set for unit tests: class colour + class stripe pattern + noise, uint8, balanced labels.

    The class prototypes depend only on (num_classes, image_size); ``seed`` draws labels and noise.
    """
    validate.number("n", n, min=1, integer=True)
    validate.number("num_classes", num_classes, min=2, integer=True)
    validate.number("image_size", image_size, min=4, integer=True)
    validate.number("seed", seed, integer=True)
    _flag("augment", augment)
    proto = torch.Generator().manual_seed(1_000_003 * num_classes + image_size)
    colours = torch.rand(num_classes, 3, generator=proto)
    angle = torch.rand(num_classes, generator=proto) * torch.pi
    freq = 1 + torch.rand(num_classes, generator=proto) * 3
    coords = torch.linspace(0, 1, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * freq[:, None, None] * proj)  # (C, H, W) in [0, 1]
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    clean = 0.1 + 0.5 * colours[labels][:, :, None, None] + 0.3 * stripes[labels][:, None]
    x = (clean + 0.08 * torch.randn(n, 3, image_size, image_size, generator=g)).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8)
    ds = ImageDataset(images, labels, classes=[f"class{c}" for c in range(num_classes)], name="synthetic",
                      source="synthetic", lossless=True)
    return ds.with_augmentation(True) if augment else ds


def load(name, split, subset=None, **kw) -> ImageDataset:
    """Dispatch to cifar10 / cifar100 / tinyimagenet / synthetic; subset=None takes the split's default.

    For "synthetic", ``kw`` goes to :func:`synthetic` and the test split uses other noise (seed + 1,000,003).
    """
    validate.choice("name", name, DATASETS)
    validate.choice("split", split, DATASETS[name]["splits"])
    subset = DATASETS[name]["default_subset"][split] if subset is None else subset
    _check_split_subset(name, split, subset)
    if name == "synthetic":
        seed = kw.pop("seed", 0)
        validate.number("seed", seed, integer=True)
        kw.pop("data_dir", None), kw.pop("download", None)  # generated, nothing to find or fetch
        ds = synthetic(seed=seed + (0 if split == "train" else 1_000_003), **kw)
        ds.name = f"synthetic/{split}"
        return ds
    return {"cifar10": cifar10, "cifar100": cifar100, "tinyimagenet": tinyimagenet}[name](split, subset, **kw)


def make_loader(dataset, batch_size, *, shuffle, seed=0, drop_last=False, num_workers=0):
    """A DataLoader whose shuffling (and worker seeds) come from a torch.Generator seeded with ``seed``."""
    if not isinstance(dataset, torch.utils.data.Dataset):
        raise TypeError(f"dataset must be a torch Dataset (e.g. an ImageDataset); got {type(dataset).__name__}")
    validate.number("batch_size", batch_size, min=1, integer=True)
    _flag("shuffle", shuffle)
    _flag("drop_last", drop_last)
    validate.number("seed", seed, integer=True)
    validate.number("num_workers", num_workers, min=0, integer=True)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=num_workers > 0)
