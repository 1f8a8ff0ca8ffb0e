"""Datasets, augmentation and loaders (introduced in chapter 1).

CIFAR-10, CIFAR-100 and Tiny ImageNet from the offline bundle or a torchvision download, plus a
synthetic set for unit tests. The paper's pipeline: pixels in [0, 1], no mean/std normalisation,
training augmentation RandomCrop(size, padding=4) + RandomHorizontalFlip on whole batches.
Where files live and how they are read and verified is ``_storage`` (re-exported names here).
Nothing falls back to other data; nothing is downloaded unless ``download=True``.
"""
from __future__ import annotations

import queue
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from . import _storage, validate

__all__ = [
    "CACHE_ENV", "CIFAR10_CLASSES", "CIFAR100_TEST20_INDICES", "DATASETS", "DATA_ENV",
    "MINI_TEST_INDICES", "MINI_TRAIN_INDICES", "MINI_TRAIN_RANGES", "TINY_BUNDLE_PER_CLASS",
    "TINY_BUNDLE_ZIP", "TINY_FOLDER", "TINY_MD5", "TINY_TRAIN_PER_CLASS", "TINY_URL",
    "BatchLoader", "DataCorrupt", "DataError", "DataMissing", "ImageDataset", "PaperAugmentation",
    "candidate_dirs", "cifar10", "cifar100", "crop_flip", "find_file", "load", "make_loader",
    "paper_augmentation", "random_crop_flip", "synthetic", "tinyimagenet", "verify_file",
]

# where the data lives, re-exported
CACHE_ENV, DATA_ENV, TINY_URL, TINY_MD5 = (_storage.CACHE_ENV, _storage.DATA_ENV,
                                          _storage.TINY_URL, _storage.TINY_MD5)
CIFAR10_CLASSES, TINY_FOLDER = _storage.CIFAR10_CLASSES, _storage.TINY_FOLDER
TINY_BUNDLE_ZIP, TINY_BUNDLE_PER_CLASS = _storage.TINY_BUNDLE_ZIP, _storage.TINY_BUNDLE_PER_CLASS
TINY_TRAIN_PER_CLASS = _storage.TINY_TRAIN_PER_CLASS
DataError, DataMissing, DataCorrupt = _storage.DataError, _storage.DataMissing, _storage.DataCorrupt
candidate_dirs, find_file = _storage.candidate_dirs, _storage.find_file
verify_file = _storage.verify_file

# The lossless CIFAR-10 training subset ("mini"): original training indices (torchvision order).
MINI_TRAIN_RANGES = ((0, 3999), (10000, 10931), (20000, 20931), (30000, 31100), (40000, 40931))
MINI_TRAIN_INDICES = np.concatenate([np.arange(a, b + 1) for a, b in MINI_TRAIN_RANGES])
MINI_TRAIN_INDICES = MINI_TRAIN_INDICES.astype(np.int64)
MINI_TEST_INDICES = np.arange(1000, dtype=np.int64)
CIFAR100_TEST20_INDICES = np.arange(20, dtype=np.int64)
for _a in (MINI_TRAIN_INDICES, MINI_TEST_INDICES, CIFAR100_TEST20_INDICES):
    _a.flags.writeable = False


def _spec(num_classes, image_size, splits, subsets, defaults):
    return {"num_classes": num_classes, "image_size": image_size, "splits": splits,
            "subsets": subsets, "default_subset": dict(zip(splits, defaults))}


DATASETS = {
    "cifar10": _spec(10, 32, ("train", "test"), ("mini", "full"), ("mini", "mini")),
    "cifar100": _spec(100, 32, ("train", "test"), ("test20", "full"), ("full", "test20")),
    "tinyimagenet": _spec(200, 64, ("train", "val"), ("bundle", "full"), ("bundle", "bundle")),
    "synthetic": _spec(10, 32, ("train", "test"), ("default",), ("default", "default")),
}

_JPEG_WARNED = False


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """Images kept as uint8 (N, 3, H, W); items are (float image in [0, 1], int label)."""

    def __init__(self, images, labels, *, classes, indices=None, name="dataset", source="memory",
                 lossless=True, transform=None, path=None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
                or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("images must be a uint8 tensor of shape (N, 3, H, W); got "
                             f"{getattr(images, 'dtype', type(images))} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        n = images.shape[0]
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
        classes = [str(c) for c in classes]
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes) - 1}] (one per class name)")
        indices = torch.arange(n) if indices is None else torch.as_tensor(indices)
        indices = indices.to(torch.int64)
        if indices.shape != (n,):
            raise ValueError(f"indices must have shape ({n},); got {tuple(indices.shape)}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
        self.images, self.labels, self.indices, self.classes = images, labels, indices, classes
        self.name, self.source, self.lossless = str(name), str(source), bool(lossless)
        self.transform = transform
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

    def _with(self, positions, name, transform="keep") -> ImageDataset:
        images, labels, indices = self.images, self.labels, self.indices
        if positions is not None:
            images, labels, indices = images[positions], labels[positions], indices[positions]
        return ImageDataset(images, labels, classes=self.classes, indices=indices, name=name,
                            source=self.source, lossless=self.lossless, path=self.path,
                            transform=self.transform if transform == "keep" else transform)

    def subset(self, n=None, *, positions=None, per_class=None, seed=0, random=False):
        """First ``n`` rows, explicit ``positions``, or ``per_class`` images of each class.

        ``n`` larger than the dataset (or None) takes everything. Selection is deterministic (the
        first rows, in dataset order); ``random=True`` draws them with a generator seeded by
        ``seed`` (kept in dataset order).
        """
        given = [k for k, v in (("n", n), ("positions", positions), ("per_class", per_class))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of n, positions, per_class; got {', '.join(given)}")
        validate.number("seed", seed, integer=True)
        validate.flag("random", random)
        size = len(self)
        gen = torch.Generator().manual_seed(seed)
        if n is not None:
            validate.number("n", n, min=1, integer=True)
            if n >= size:
                return self._with(None, self.name)
            if random:
                pos = torch.randperm(size, generator=gen)[:n].sort().values
                return self._with(pos, f"{self.name}[random {n}, seed={seed}]")
            return self._with(torch.arange(n), f"{self.name}[:{n}]")
        if positions is not None:
            try:
                pos = torch.as_tensor(positions)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError("positions must be a sequence of integers; got "
                                f"{type(positions).__name__}") from e
            if pos.dim() != 1 or pos.is_floating_point() or pos.dtype == torch.bool \
                    or pos.is_complex():
                raise TypeError("positions must be a 1-D sequence of integers; got "
                                f"{pos.dtype} {tuple(pos.shape)}")
            pos = pos.long()
            if pos.numel() and (pos.min() < 0 or pos.max() >= size):
                raise ValueError(f"positions must lie in [0, {size - 1}] for {self.name}; got "
                                 f"values in [{pos.min().item()}, {pos.max().item()}]")
            return self._with(pos, f"{self.name}[{pos.numel()} positions]")
        if per_class is not None:
            validate.number("per_class", per_class, min=1, integer=True)
            counts = torch.bincount(self.labels, minlength=self.num_classes)
            smallest = int(counts.argmin())
            if per_class > counts[smallest]:
                raise ValueError(f"per_class must be <= {int(counts[smallest])}, the size of the "
                                 f"smallest class ({self.classes[smallest]!r}) in {self.name}; "
                                 f"got {per_class}")
            chosen = []
            for c in range(self.num_classes):
                where = torch.nonzero(self.labels == c).flatten()
                if random:
                    where = where[torch.randperm(where.numel(), generator=gen)]
                chosen.append(where[:per_class])
            tag = f"per_class={per_class}" + (f", random, seed={seed}" if random else "")
            return self._with(torch.cat(chosen).sort().values, f"{self.name}[{tag}]")
        return self._with(None, self.name)

    def with_augmentation(self, enabled=True) -> ImageDataset:
        """The same images (shared tensors) with the paper's augmentation on (or off)."""
        validate.flag("enabled", enabled)
        aug = paper_augmentation(self.image_size) if enabled else None
        return self._with(None, self.name, transform=aug)

    def __repr__(self) -> str:
        aug = "none" if self.transform is None else "on"
        return (f"ImageDataset(name={self.name!r}, size={len(self)}, classes={self.num_classes}, "
                f"image_size={self.image_size}, source={self.source!r}, "
                f"lossless={self.lossless}, augmentation={aug})")


# --------------------------------------------------------------------------------------------
# The paper's augmentation, on whole batches
# --------------------------------------------------------------------------------------------
def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Crop each image of a (B, C, H, W) batch from its zero-padded copy, then maybe flip it.

    ``offsets`` (B, 2): the crop's top-left (row, column) in the padded image, in [0, 2 * padding];
    ``flips`` (B,) bool: mirror left-right. No Python loop over images: every output row is a
    window of the padded batch laid flat (or of its reverse, for a flipped image), so the whole
    batch is one ``index_select``.
    """
    b, c, h, w = images.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = images.new_zeros(b, c, hp, wp)
    padded[:, :, padding:padding + h, padding:padding + w] = images
    flat = padded.reshape(-1)
    n = flat.numel()
    both = torch.cat([flat, flat.flip(0)])  # reversed: a mirrored row is a forward window there
    windows = both.as_strided((2 * n - w + 1, w), (1, 1))
    dev = images.device
    oy, ox = offsets[:, 0].to(dev).view(b, 1, 1), offsets[:, 1].to(dev).view(b, 1, 1)
    plane = torch.arange(b * c, device=dev).view(b, c, 1)
    start = (plane * hp + oy + torch.arange(h, device=dev).view(1, 1, h)) * wp + ox
    start = torch.where(flips.to(dev).view(b, 1, 1), 2 * n - w - start, start)
    return windows.index_select(0, start.reshape(-1)).view(b, c, h, w)


def _draw(batch: int, padding: int, generator=None):
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator)
    flips = torch.randint(0, 2, (batch,), generator=generator).bool()
    return offsets, flips


def random_crop_flip(images: torch.Tensor, *, padding: int = 4, generator=None) -> torch.Tensor:
    """RandomCrop(H, padding) + RandomHorizontalFlip(0.5) for every image of a batch.

    Offsets and flips come from ``generator`` (a CPU ``torch.Generator``; None: the global RNG),
    so the result is deterministic for a seed and the same on every device.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a (B, C, H, W) tensor; got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    validate.number("padding", padding, min=0, integer=True)
    return crop_flip(images, *_draw(images.shape[0], padding, generator), padding)


class PaperAugmentation:
    """The paper's training augmentation for one (C, H, W) image or a (B, C, H, W) batch."""

    def __init__(self, image_size: int = 32, padding: int = 4):
        self.image_size = validate.number("image_size", image_size, min=1, integer=True)
        self.padding = validate.number("padding", padding, min=0, integer=True)

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) \
                or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"x must be a (C, {self.image_size}, {self.image_size}) image or a "
                             f"batch of them; got {tuple(getattr(x, 'shape', ()))}")
        one = x.dim() == 3
        out = random_crop_flip(x[None] if one else x, padding=self.padding, generator=generator)
        return out[0] if one else out


def paper_augmentation(image_size=32, padding=4) -> PaperAugmentation:
    """RandomCrop(image_size, padding) + RandomHorizontalFlip, for images or whole batches."""
    return PaperAugmentation(image_size, padding)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
_DONE = object()


class BatchLoader:
    """Batches (x, y) straight from an ImageDataset's in-memory tensors (chapter 1).

    Epoch ``e`` (``set_epoch``, else 0, 1, ... per pass) shuffles with a generator seeded
    ``seed * 100_003 + e`` (the order ``train.fit`` uses) and draws the augmentation of each
    batch from the same generator: the batches depend only on (seed, epoch). The dataset's
    transform must be None or ``PaperAugmentation`` (run on whole batches). ``prefetch`` builds
    the next batch in a background thread; None (the default): on CUDA only, since on a CPU the
    thread takes cores from the step (measured 2-50 % slower on 2 cores). On CUDA batches are
    pinned and copied with ``non_blocking``. ``rank``/``world``: this process's share under DDP
    (no short last batch).
    """

    def __init__(self, dataset, batch_size, *, shuffle=True, seed=0, drop_last=False,
                 device=None, prefetch=None, rank=0, world=1):
        if not isinstance(dataset, ImageDataset):
            raise TypeError("dataset must be an ImageDataset (data.load, data.cifar10, ...); got "
                            f"{type(dataset).__name__}")
        if dataset.transform is not None and not isinstance(dataset.transform, PaperAugmentation):
            raise TypeError("dataset.transform must be None or the paper's augmentation; for "
                            "another transform use make_loader(..., num_workers=1) (a DataLoader)")
        validate.number("batch_size", batch_size, min=1, integer=True)
        self.shuffle = validate.flag("shuffle", shuffle)
        self.drop_last = validate.flag("drop_last", drop_last)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if prefetch is not None and not isinstance(prefetch, bool):
            raise TypeError(f"prefetch must be True, False or None (None: on CUDA only); got "
                            f"{prefetch!r}")
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.seed = validate.number("seed", seed, integer=True)
        self.world = validate.number("world", world, min=1, integer=True)
        self.rank = validate.number("rank", rank, min=0, max=world - 1, integer=True)
        if world > 1 and batch_size % world:
            raise ValueError(f"batch_size must be a multiple of world={world}; got {batch_size}")
        self.dataset, self.batch_size, self.epoch = dataset, batch_size, 0
        self.pin = self.device.type == "cuda"

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last and self.world == 1 else 0)

    def set_epoch(self, epoch: int) -> None:  # the next pass is epoch ``epoch``
        self.epoch = validate.number("epoch", epoch, min=0, integer=True)

    def _batches(self, epoch):
        """CPU batches of one epoch: (uint8 or float x, y, augmentation parameters or None)."""
        ds, bs = self.dataset, self.batch_size
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n, aug, share = len(ds), ds.transform, bs // self.world
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if len(idx) < bs and (self.drop_last or self.world > 1):
                return
            params = None if aug is None else _draw(len(idx), aug.padding, gen)
            if self.world > 1:
                mine = slice(self.rank * share, (self.rank + 1) * share)
                idx = idx[mine]
                params = None if params is None else (params[0][mine], params[1][mine])
            x, y = ds.images.index_select(0, idx), ds.labels.index_select(0, idx)
            if not self.pin:  # on the CPU, finish here (in the prefetch thread)
                x = x if aug is None else crop_flip(x, *params, aug.padding)
                x, params = x.float().div_(255), None
            yield (x.pin_memory(), y.pin_memory(), params) if self.pin else (x, y, params)

    def _finish(self, x, y, params):
        if self.pin:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if params is not None:
                x = crop_flip(x, *params, self.dataset.transform.padding)
            x = x.float().div_(255)
        return x, y

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.prefetch:
            for item in self._batches(epoch):
                yield self._finish(*item)
            return
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce():
            try:
                for item in self._batches(epoch):
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="d2r-batch-prefetch")
        thread.start()
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield self._finish(*item)
        finally:  # stopped early: unblock the producer so that it sees the stop and ends
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)


def make_loader(dataset, batch_size, *, shuffle, seed=0, drop_last=False, num_workers=0,
                device=None, prefetch=True):
    """Batches of ``dataset`` with shuffling seeded by ``seed``.

    An :class:`ImageDataset` (no transform or the paper's) gets a :class:`BatchLoader`; any
    other Dataset or transform, or ``num_workers > 0``, a ``torch.utils.data.DataLoader``.
    """
    if not isinstance(dataset, torch.utils.data.Dataset):
        raise TypeError("dataset must be a torch Dataset (e.g. an ImageDataset); got "
                        f"{type(dataset).__name__}")
    validate.number("batch_size", batch_size, min=1, integer=True)
    validate.flag("shuffle", shuffle)
    validate.flag("drop_last", drop_last)
    validate.number("seed", seed, integer=True)
    validate.number("num_workers", num_workers, min=0, integer=True)
    if isinstance(dataset, ImageDataset) and num_workers == 0 and (
            dataset.transform is None or isinstance(dataset.transform, PaperAugmentation)):
        return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           device=device, prefetch=prefetch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
        num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------
def _check_spec(arrays, name: str, path) -> None:
    """The arrays read from `path` match the dataset's declared spec (DATASETS): uint8 images of the
    declared size, one int label per image in range, the declared class count. One DataCorrupt
    naming the file and every fault."""
    spec = DATASETS[name.split("/")[0]]
    size, k = spec["image_size"], spec["num_classes"]
    x, y = arrays.get("x_nchw", arrays.get("x")), np.asarray(arrays["y"])
    want = (3, size, size) if "x_nchw" in arrays else (size, size, 3)
    faults = []
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != want:
        faults.append(f"images are {x.dtype} {x.shape}, not uint8 (N, {', '.join(map(str, want))})")
    if y.ndim != 1 or len(y) != len(x) or len(np.asarray(arrays["idx"])) != len(x):
        faults.append(f"{len(x)} images but {y.shape} labels and {len(arrays['idx'])} indices")
    elif not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= k)):
        faults.append(f"labels must be integers in [0, {k - 1}]; got {y.dtype} values in "
                      f"[{y.min() if len(y) else '-'}, {y.max() if len(y) else '-'}]")
    if len(arrays["classes"]) != k:
        faults.append(f"{len(arrays['classes'])} class names, not {k}")
    if faults:
        raise DataCorrupt(f"{path} does not hold {name.split('/')[0]} {name.split('/', 1)[1]} as "
                          "declared: " + "; ".join(faults) + ". Get a good copy of the file "
                          "(the offline bundle, or a download)")


def _spec(name: str, path):
    """The spec check of dataset `name` read from `path`, for a reader to run before it records
    the file as verified."""
    return lambda arrays: _check_spec(arrays, name, path)


def _dataset(arrays, *, name, source, lossless, path, augment, select=None) -> ImageDataset:
    _check_spec(arrays, name, path)
    if "x_nchw" in arrays:
        x = torch.from_numpy(arrays["x_nchw"])
    else:
        x = torch.from_numpy(np.ascontiguousarray(arrays["x"], np.uint8)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.asarray(arrays["y"], np.int64))
    idx = torch.from_numpy(np.asarray(arrays["idx"], np.int64))
    if select is not None:
        sel = torch.from_numpy(np.array(select, dtype=np.int64))
        x, y, idx = x[sel], y[sel], idx[sel]
    ds = ImageDataset(x.contiguous(), y.clone(), classes=[str(c) for c in arrays["classes"]],
                      indices=idx.clone(), name=name, source=source, lossless=lossless, path=path)
    return ds.with_augmentation(True) if augment else ds


def _check(name, split, subset, download, augment, data_dir) -> None:
    spec = DATASETS[name]
    validate.choice("split", split, spec["splits"])
    validate.choice("subset", subset, spec["subsets"])
    validate.flag("download", download)
    validate.flag("augment", augment)
    if data_dir is not None:
        _storage.as_dir(data_dir)


def _find(groups, data_dir, what, download, fetch, call):
    """The data on disk; else, only with download=True, ``fetch()``; else DataMissing."""
    try:
        return _storage.locate(groups, data_dir, what, call)
    except DataMissing as missing:
        if not download:
            raise
        try:
            return fetch()
        except DataMissing as failed:
            raise DataMissing(f"{missing}\n{failed}") from None


def _warn_jpeg(what: str) -> None:
    global _JPEG_WARNED
    if not _JPEG_WARNED:
        _JPEG_WARNED = True
        warnings.warn(
            f"{what} comes from JPEG copies (quality 75), not the lossless originals: the mean "
            "pixel error (~6/255) is comparable to the usual eps = 8/255, so robust accuracy on "
            "it is not comparable to published numbers. Report robust numbers on the lossless "
            "'mini' subsets (cifar10(subset='mini')).", validate.D2RWarning, stacklevel=3)


def cifar10(split="train", subset="mini", *, data_dir=None, download=False,
            augment=False) -> ImageDataset:
    """CIFAR-10. ``mini``: the lossless subsets (train: MINI_TRAIN_INDICES, 7,897; test: 0-999).

    ``full``: torchvision's ``cifar-10-batches-py`` (lossless) if present, else the bundle's JPEG
    copies (``lossless=False``, warns once), else a torchvision download when ``download=True``.
    """
    _check("cifar10", split, subset, download, augment, data_dir)
    name, call = f"cifar10/{split}/{subset}", f"cifar10({split!r}, {subset!r}, download=True)"

    def fetch():
        return _storage.download_cifar("cifar10", split, data_dir)

    tv = "torchvision:cifar-10-batches-py"
    if subset == "mini":
        npz = "cifar10_train_7897.npz" if split == "train" else "cifar10_test_1000.npz"
        expected = MINI_TRAIN_INDICES if split == "train" else MINI_TEST_INDICES
        path = _find([[npz, "cifar-10-batches-py"]], data_dir, f"CIFAR-10 {split} (mini)",
                     download, fetch, call)
        if path.suffix == ".npz":
            return _dataset(_storage.read_npz(path, expected, _spec(name, path)), name=name,
                            path=path,
                            source=f"bundle:{path.name}", lossless=True, augment=augment)
        return _dataset(_storage.read_cifar_folder(path, "cifar10", split), name=name, path=path,
                        source=tv, lossless=True, augment=augment, select=expected)
    jpeg = ["cifar10_train_50000_jpeg.zip", "cifar10_train_50000_jpeg"] if split == "train" \
        else ["cifar10_test_10000_jpeg.npz"]
    # lossless before JPEG, and what is on disk before any download
    path = _find([["cifar-10-batches-py"], jpeg], data_dir, f"CIFAR-10 {split} (full)", download,
                 fetch, call)
    if path.name == "cifar-10-batches-py":
        return _dataset(_storage.read_cifar_folder(path, "cifar10", split), name=name, path=path,
                        source=tv, lossless=True, augment=augment)
    if split == "test":
        arrays = _storage.read_npz(path, np.arange(10000, dtype=np.int64), _spec(name, path))
    else:
        arrays = _storage.read_cifar10_train_jpeg(path, _spec(name, path))
    _warn_jpeg(f"CIFAR-10 {split} (full)")
    kind = "bundle" if path.is_file() else "folder"
    return _dataset(arrays, name=name, source=f"{kind}:{path.name}", lossless=False, path=path,
                    augment=augment)


def cifar100(split="test", subset="test20", *, data_dir=None, download=False,
             augment=False) -> ImageDataset:
    """CIFAR-100 (fine labels). ``test20``: test images 0-19 (bundle or torchvision); ``full``:
    torchvision's ``cifar-100-python``."""
    _check("cifar100", split, subset, download, augment, data_dir)
    if subset == "test20" and split != "test":
        raise ValueError(f"subset='test20' exists only for split='test'; got split={split!r} "
                         "(use subset='full' for the training set)")
    name = f"cifar100/{split}/{subset}"
    names = ["cifar100_test_20.npz"] * (subset == "test20") + ["cifar-100-python"]
    path = _find([names], data_dir, f"CIFAR-100 {split} ({subset})", download,
                 lambda: _storage.download_cifar("cifar100", split, data_dir),
                 f"cifar100({split!r}, {subset!r}, download=True)")
    if path.suffix == ".npz":
        return _dataset(_storage.read_npz(path, CIFAR100_TEST20_INDICES, _spec(name, path)),
                        name=name, path=path,
                        source=f"bundle:{path.name}", lossless=True, augment=augment)
    return _dataset(_storage.read_cifar_folder(path, "cifar100", split), name=name, path=path,
                    source="torchvision:cifar-100-python", lossless=True, augment=augment,
                    select=CIFAR100_TEST20_INDICES if subset == "test20" else None)


def tinyimagenet(split="val", subset="bundle", *, data_dir=None, download=False,
                 augment=False) -> ImageDataset:
    """Tiny ImageNet (64x64, 200 classes in wnids.txt order; grayscale converted to RGB).

    Source: an extracted ``tiny-imagenet-200/`` folder or the bundle zip. ``bundle``: all val
    images and training images ``<wnid>_0..49`` (also when the full set is there); ``full``: all
    val and the 500-per-class training set. ``indices``: val = N of ``val_N.JPEG``; train =
    500 * class + k for ``<wnid>_k.JPEG``.
    """
    _check("tinyimagenet", split, subset, download, augment, data_dir)
    need_full = split == "train" and subset == "full"
    names = [TINY_FOLDER] if need_full else [TINY_FOLDER, TINY_BUNDLE_ZIP]
    path = _find([names], data_dir, f"Tiny ImageNet {split} ({subset})", download,
                 lambda: _storage.download_tiny(data_dir),
                 f"tinyimagenet({split!r}, {subset!r}, download=True)")
    name = f"tinyimagenet/{split}/{subset}"
    try:
        arrays = _storage.read_tiny(path, split, subset, _spec(name, path))
    except DataMissing:  # a partial folder: only download=True may replace it
        if not download:
            raise
        path = _storage.download_tiny(data_dir)
        arrays = _storage.read_tiny(path, split, subset, _spec(name, path))
    kind = "bundle" if path.is_file() else "folder"
    return _dataset(arrays, name=name, source=f"{kind}:{path.name}",
                    lossless=True, path=path, augment=augment)


def synthetic(n=256, *, num_classes=10, image_size=32, seed=0, augment=False) -> ImageDataset:
    """A learnable toy set for unit tests: class colour + stripes + noise, balanced labels.

    The class prototypes depend only on (num_classes, image_size); ``seed`` draws labels and noise.
    """
    validate.number("n", n, min=1, integer=True)
    validate.number("num_classes", num_classes, min=2, integer=True)
    validate.number("image_size", image_size, min=4, integer=True)
    validate.number("seed", seed, integer=True)
    validate.flag("augment", augment)
    proto = torch.Generator().manual_seed(1_000_003 * num_classes + image_size)
    colours = torch.rand(num_classes, 3, generator=proto)
    angle = torch.rand(num_classes, generator=proto) * torch.pi
    freq = 1 + torch.rand(num_classes, generator=proto) * 3
    coords = torch.linspace(0, 1, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * freq[:, None, None] * proj)  # (C, H, W)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    clean = 0.1 + 0.5 * colours[labels][:, :, None, None] + 0.3 * stripes[labels][:, None]
    x = (clean + 0.08 * torch.randn(n, 3, image_size, image_size, generator=g)).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8)
    ds = ImageDataset(images, labels, classes=[f"class{c}" for c in range(num_classes)],
                      name="synthetic", source="synthetic", lossless=True)
    return ds.with_augmentation(True) if augment else ds


def load(name, split, subset=None, **kw) -> ImageDataset:
    """cifar10 / cifar100 / tinyimagenet / synthetic (test split: seed + 1,000,003) by name;
    subset=None: the split's default."""
    validate.choice("name", name, DATASETS)
    validate.choice("split", split, DATASETS[name]["splits"])
    subset = DATASETS[name]["default_subset"][split] if subset is None else subset
    validate.choice("subset", subset, DATASETS[name]["subsets"])
    if name == "synthetic":
        seed = kw.pop("seed", 0)
        validate.number("seed", seed, integer=True)
        kw.pop("data_dir", None), kw.pop("download", None)  # generated: nothing to find or fetch
        ds = synthetic(seed=seed + (0 if split == "train" else 1_000_003), **kw)
        ds.name = f"synthetic/{split}"
        return ds
    return {"cifar10": cifar10, "cifar100": cifar100, "tinyimagenet": tinyimagenet}[name](
        split, subset, **kw)
