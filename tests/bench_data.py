"""Benchmark of the data pipeline (prints numbers, asserts nothing about speed).

    OMP_NUM_THREADS=1 python tests/bench_data.py [--batch-size 128] [--repeats 3]

1. SHA256SUMS verification of the offline bundle: first time, then cached (same process, and as
   a new process would see it: from the JSON cache file).
2. Images/s of one epoch of the CIFAR-10 mini training set with the paper's augmentation:
   the old per-image pipeline (torchvision v2 RandomCrop + flip on each image, batches stacked in
   Python as train.fit did, and through a DataLoader as make_loader did) against BatchLoader.
3. A training loop (small_cnn, plain cross-entropy steps) fed by each loader, against the same
   steps on batches prepared beforehand (the step alone): loop / step-alone images/s.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from d2r_lib import _storage, data


def _old_transform():
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])


def _old_python_batches(ds, batch_size, seed):
    """The loop train.fit used: one __getitem__ (and one transform) per image."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), batch_size):
        items = [ds[int(i)] for i in order[start:start + batch_size]]
        yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _epoch_rate(make_batches) -> float:
    started, n = time.perf_counter(), 0
    for x, _ in make_batches():
        n += len(x)
    return n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}")

    bundle = data.find_file("SHA256SUMS").parent
    files = sorted(f for f in _storage.BUNDLE_SHA256 if (bundle / f).is_file())
    with tempfile.TemporaryDirectory() as cache:
        os.environ[data.CACHE_ENV] = cache
        _storage._VERIFIED.clear()
        times = []
        for label in ("first time", "second time (same process)", "second time (new process)"):
            if label.endswith("(new process)"):
                _storage._VERIFIED.clear()  # what a new process knows: only the JSON file
            started = time.perf_counter()
            for f in files:
                assert data.verify_file(bundle / f)
            times.append((label, (time.perf_counter() - started) * 1000))
        del os.environ[data.CACHE_ENV]
    size = sum((bundle / f).stat().st_size for f in files) / 1e6
    print(f"\nSHA256SUMS check of {len(files)} bundle files ({size:.0f} MB) in {bundle}:")
    for label, ms in times:
        print(f"  {label:28s} {ms:10.2f} ms")

    train = data.cifar10("train", "mini")
    old_ds = train._with(None, train.name, transform=_old_transform())
    new_ds = train.with_augmentation()
    bs = a.batch_size
    candidates = {
        "old: per-image v2 + Python stack (train.fit)":
            lambda seed: _old_python_batches(old_ds, bs, seed),
        "old: DataLoader + per-image v2 (make_loader)":
            lambda seed: torch.utils.data.DataLoader(
                old_ds, bs, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        "new: BatchLoader, no prefetch":
            lambda seed: data.BatchLoader(new_ds, bs, seed=seed, prefetch=False),
        "new: BatchLoader, prefetch thread":
            lambda seed: data.BatchLoader(new_ds, bs, seed=seed, prefetch=True),
    }
    rates = {k: 0.0 for k in candidates}
    for r in range(a.repeats):  # interleaved, best of repeats
        for name, make in candidates.items():
            rates[name] = max(rates[name], _epoch_rate(lambda make=make, r=r: make(r)))
    base = rates["old: per-image v2 + Python stack (train.fit)"]
    print(f"\nOne epoch of {train.name} ({len(train)} images), batch {bs}, augmentation on; "
          f"best of {a.repeats}, interleaved:")
    for name, rate in rates.items():
        print(f"  {name:46s} {rate:12,.0f} images/s  ({rate / base:6.1f}x)")

    from d2r_lib import methods, models

    torch.manual_seed(0)
    model = models.build_model("small_cnn")
    opt = methods.make_optimizer(model, lr=0.01)
    part = new_ds.subset(2048)
    ready = list(data.BatchLoader(part, bs, prefetch=False))

    def loop(batches):
        for x, y in batches:
            methods.train_step("standard", model, None, opt, x, y)
            yield x, y

    old_part = part._with(None, part.name, transform=_old_transform())
    loops = {
        "step alone (batches ready)": lambda r: loop(ready),
        "old pipeline (train.fit)": lambda r: loop(_old_python_batches(old_part, bs, r)),
        "BatchLoader, no prefetch": lambda r: loop(data.BatchLoader(part, bs, seed=r,
                                                                    prefetch=False)),
        "BatchLoader, prefetch thread": lambda r: loop(data.BatchLoader(part, bs, seed=r)),
    }
    loop_rates = {k: 0.0 for k in loops}
    for r in range(a.repeats):
        for name, make in loops.items():
            loop_rates[name] = max(loop_rates[name], _epoch_rate(lambda make=make, r=r: make(r)))
    alone = loop_rates["step alone (batches ready)"]
    print(f"\nTraining loop, small_cnn, {len(part)} images, batch {bs}, best of {a.repeats}:")
    for name, rate in loop_rates.items():
        print(f"  {name:46s} {rate:12,.0f} images/s  ({rate / alone:6.2f} of the step alone)")


if __name__ == "__main__":
    main()
