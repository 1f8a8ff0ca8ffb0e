"""Tests of d2r_lib.data's whole-batch augmentation and loaders (chapter 1's pipeline)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from d2r_lib import data


def test_augmentation_range_shape_change_and_determinism():
    ds = data.synthetic(64, seed=1)
    aug = ds.with_augmentation()
    assert aug.images is ds.images and ds.transform is None and aug.transform is not None
    torch.manual_seed(0)
    a = torch.stack([aug[i][0] for i in range(len(aug))])
    torch.manual_seed(0)
    b = torch.stack([aug[i][0] for i in range(len(aug))])
    clean, _ = ds.tensors()
    assert a.shape == clean.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a != clean).flatten(1).any(1).float().mean() > 0.5
    assert aug.with_augmentation(False).transform is None
    big = data.paper_augmentation(64)(torch.rand(3, 64, 64))
    assert big.shape == (3, 64, 64)
    assert data.synthetic(8, augment=True).transform is not None


def test_make_loader_order():
    ds = data.synthetic(64)

    def order(seed):
        labels = [y for _, y in data.make_loader(ds, 8, shuffle=True, seed=seed)]
        return torch.cat(labels).tolist(), \
            torch.cat([x for x, _ in data.make_loader(ds, 8, shuffle=True, seed=seed)])

    (l1, x1), (l2, x2), (_, x3) = order(0), order(0), order(1)
    assert l1 == l2 and torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    plain = torch.cat([x for x, _ in data.make_loader(ds, 10, shuffle=False)])
    assert torch.equal(plain, ds.tensors()[0])
    assert len(data.make_loader(ds, 10, shuffle=False, drop_last=True)) == 6


# ------------------------------------------------------------------------------------------------
# Whole-batch augmentation and the BatchLoader
# ------------------------------------------------------------------------------------------------
def _reference_crop_flip(img, top, left, flip, padding):
    """One image, the plain way: zero-pad, slice, mirror."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (padding,) * 4)
    out = padded[:, top:top + h, left:left + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_equals_per_image_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 10, 7), generator=g).to(dtype)
    offsets = torch.randint(0, 7, (12, 2), generator=g)
    flips = torch.arange(12) % 2 == 0
    out = data.crop_flip(x, offsets, flips, padding=3)
    assert out.shape == x.shape and out.dtype == dtype
    for i in range(12):
        ref = _reference_crop_flip(x[i], int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]), 3)
        assert torch.equal(out[i], ref), i


def test_random_crop_flip_is_a_shifted_crop_with_zero_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 32, 32, generator=g) * 0.9 + 0.05  # no zeros in the images themselves
    out = data.random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    seen_shift, seen_flip = set(), set()
    for i in range(len(x)):  # exactly one (top, left, flip) reproduces each output
        found = [(t, le, f) for t in range(9) for le in range(9) for f in (False, True)
                 if torch.equal(out[i], _reference_crop_flip(x[i], t, le, f, 4))]
        assert len(found) == 1, (i, found)
        t, le, f = found[0]
        seen_shift.add((t, le))
        seen_flip.add(f)
        zeros = (out[i] == 0).all(0)  # the padding: whole zero rows/columns, nothing else
        assert zeros.sum() == 32 * 32 - (32 - abs(t - 4)) * (32 - abs(le - 4))
    assert seen_flip == {False, True} and len(seen_shift) > 20
    again = data.random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(7))
    other = data.random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, again) and not torch.equal(out, other)
    offsets, flips = data._draw(20000, 4, torch.Generator().manual_seed(0))
    assert offsets.min() == 0 and offsets.max() == 8 and len(offsets.unique()) == 9
    assert 0.48 < flips.float().mean() < 0.52  # RandomHorizontalFlip(p=0.5)


def _numbered(n, image_size=32):
    """Images whose constant planes spell their row: (row % 256, row // 256, 0)."""
    images = torch.zeros(n, 3, image_size, image_size, dtype=torch.uint8)
    images[:, 0] = (torch.arange(n) % 256)[:, None, None]
    images[:, 1] = (torch.arange(n) // 256)[:, None, None]
    return data.ImageDataset(images, torch.arange(n) % 10, classes=[str(c) for c in range(10)])


def _rows(x):
    centre = (x[:, :2, 16, 16] * 255).round().long()  # never padding: shifts are at most 4
    return (centre[:, 0] + 256 * centre[:, 1]).tolist()


@pytest.mark.parametrize("prefetch", [False, True])
def test_batch_loader_covers_every_example_once_per_epoch(prefetch):
    ds = _numbered(1003).with_augmentation()
    loader = data.BatchLoader(ds, 64, seed=3, prefetch=prefetch)
    assert len(loader) == 16
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [64] * 15 + [43]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert x.dtype == torch.float32 and x.shape == (1003, 3, 32, 32) and y.dtype == torch.int64
        rows = _rows(x)
        assert sorted(rows) == list(range(1003)) and y.tolist() == [r % 10 for r in rows]
        assert (x == 0).any() and 0 <= x.min() and x.max() <= 1  # augmented: padding shows
        epochs.append((rows, x))
    assert epochs[0][0] != epochs[1][0]  # a new order each epoch
    same = data.BatchLoader(ds, 64, seed=3, prefetch=not prefetch)
    assert torch.equal(torch.cat([b[0] for b in same]), epochs[0][1])  # (seed, epoch) decide all
    same.set_epoch(1)
    assert torch.equal(torch.cat([b[0] for b in same]), epochs[1][1])
    dropped = data.BatchLoader(ds, 64, drop_last=True, shuffle=False, prefetch=prefetch)
    plain = data.BatchLoader(_numbered(1003), 64, shuffle=False, prefetch=prefetch)
    assert len(dropped) == 15 and sum(len(y) for _, y in dropped) == 960
    assert _rows(torch.cat([x for x, _ in plain])) == list(range(1003))


def test_batch_loader_ranks_split_each_batch():
    ds = _numbered(100).with_augmentation()
    whole = list(data.BatchLoader(ds, 20, seed=1, prefetch=False))
    halves = [list(data.BatchLoader(ds, 20, seed=1, rank=r, world=2)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 5
    for b in range(5):  # same images, same crops, split in two
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), whole[b][0])


def test_batch_loader_early_stop_and_errors(monkeypatch):
    ds = _numbered(50)
    it = iter(data.BatchLoader(ds, 4))
    next(it)
    it.close()  # the prefetch thread sees the stop and ends
    for _ in range(500):
        if not any(t.name == "d2r-batch-prefetch" for t in threading.enumerate()):
            break
        time.sleep(0.01)
    assert not any(t.name == "d2r-batch-prefetch" for t in threading.enumerate())
    custom = ds._with(None, "custom", transform=lambda img: 1 - img)  # another transform
    with pytest.raises(TypeError, match=r"dataset.transform must be None or the paper's"):
        data.BatchLoader(custom, 5)
    dl = data.make_loader(custom, 5, shuffle=False)  # goes through a DataLoader instead
    assert isinstance(dl, torch.utils.data.DataLoader)
    assert torch.equal(next(iter(dl))[0], 1 - ds.tensors()[0][:5])

    def boom(*_):
        raise ValueError("boom in the thread")

    monkeypatch.setattr(data, "crop_flip", boom)  # runs in the prefetch thread on the CPU
    with pytest.raises(ValueError, match="boom in the thread"):
        list(data.BatchLoader(ds.with_augmentation(), 2, prefetch=True))


def test_batch_loader_pinned_path_equals_cpu_path(monkeypatch):
    """The CUDA path (uint8 batch pinned, copied, cropped on the device) on the CPU device."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # no CUDA needed
    ds = _numbered(300).with_augmentation()
    cpu = torch.cat([x for x, _ in data.BatchLoader(ds, 64, seed=2)])
    pinned = data.BatchLoader(ds, 64, seed=2)
    pinned.pin = True
    assert torch.equal(torch.cat([x for x, _ in pinned]), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_loader_cuda_equals_cpu():
    ds = _numbered(300).with_augmentation()
    cpu = torch.cat([x for x, _ in data.BatchLoader(ds, 64, seed=2)])
    gpu = [b for b in data.BatchLoader(ds, 64, seed=2, device="cuda")]
    assert gpu[0][0].is_cuda and gpu[0][1].is_cuda
    assert torch.equal(torch.cat([x for x, _ in gpu]).cpu(), cpu)


def test_make_loader_chooses_batch_loader():
    ds = data.synthetic(40)
    assert isinstance(data.make_loader(ds, 8, shuffle=True), data.BatchLoader)
    tds = torch.utils.data.TensorDataset(torch.zeros(10, 3), torch.arange(10))
    dl = data.make_loader(tds, 4, shuffle=False)
    assert isinstance(dl, torch.utils.data.DataLoader) and len(dl) == 3
    assert isinstance(data.make_loader(ds, 8, shuffle=True, num_workers=1),
                      torch.utils.data.DataLoader)


def test_batch_loader_prefetches_on_cuda_only_by_default():
    ds = _numbered(64)
    assert data.BatchLoader(ds, 16).prefetch is False  # on a CPU the thread takes the step's cores
    assert data.BatchLoader(ds, 16, device="cuda").prefetch is True  # nothing is moved yet
    assert data.BatchLoader(ds, 16, prefetch=True).prefetch is True
    assert data.BatchLoader(ds, 16, device="cuda", prefetch=False).prefetch is False
