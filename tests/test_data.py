"""Tests of d2r_lib.data: the offline bundle formats, directory resolution, subsets."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2r_lib import _storage, data

BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MINI_TRAIN_COUNTS = [795, 754, 791, 763, 840, 769, 786, 785, 814, 800]
MINI_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not (BUNDLE / "cifar10_train_7897.npz").is_file():
        pytest.skip(f"offline data bundle not found at {BUNDLE} (../shared/data beside this)")
    return BUNDLE


@pytest.fixture(autouse=True)
def _no_ambient_data_dir(monkeypatch):
    """Tests decide themselves whether $D2R_DATA_DIR is set."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)


def _link(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / src.name).symlink_to(src)
    return dst_dir / src.name


# ------------------------------------------------------------------------------------------------
# The offline formats
# ------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_cifar10_mini_train(bundle):
    ds = data.cifar10("train", "mini", data_dir=bundle)
    assert len(ds) == 7897 and ds.images.dtype == torch.uint8
    assert ds.images.shape == (7897, 3, 32, 32)
    assert ds.class_counts() == MINI_TRAIN_COUNTS
    assert np.array_equal(ds.indices.numpy(), data.MINI_TRAIN_INDICES)
    assert ds.lossless and ds.source == "bundle:cifar10_train_7897.npz"
    assert ds.name == "cifar10/train/mini"
    assert ds.classes == list(data.CIFAR10_CLASSES) and ds.num_classes == 10 and ds.image_size == 32
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int)


def test_mini_train_indices_constant():
    idx = data.MINI_TRAIN_INDICES
    assert len(idx) == 7897 and idx.dtype == np.int64 and not idx.flags.writeable
    for a, b in [(0, 3999), (10000, 10931), (20000, 20931), (30000, 31100), (40000, 40931)]:
        assert np.isin(np.arange(a, b + 1), idx).all()


@pytest.mark.data
def test_cifar10_mini_test(bundle):
    ds = data.cifar10("test", data_dir=bundle)
    assert len(ds) == 1000 and ds.class_counts() == MINI_TEST_COUNTS
    assert [ds.classes[i] for i in ds.labels[:5]] == ["cat", "ship", "ship", "airplane", "frog"]
    assert ds.indices.tolist() == list(range(1000)) and ds.lossless


@pytest.mark.data
def test_cifar10_full_test_jpeg_warns_once(bundle, monkeypatch):
    monkeypatch.setattr(data, "_JPEG_WARNED", False)
    with pytest.warns(UserWarning, match=r"JPEG.*8/255.*lossless 'mini'"):
        ds = data.cifar10("test", "full", data_dir=bundle)
    assert len(ds) == 10000 and ds.class_counts() == [1000] * 10 and not ds.lossless
    assert ds.source == "bundle:cifar10_test_10000_jpeg.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.cifar10("test", "full", data_dir=bundle)  # only once per process
    mini = data.cifar10("test", "mini", data_dir=bundle)
    assert torch.equal(ds.labels[:1000], mini.labels)


def _check_cifar10_full_train(ds, mini):
    assert len(ds) == 50000 and ds.class_counts() == [5000] * 10 and not ds.lossless
    assert ds.indices.tolist() == list(range(50000))
    err = (ds.images[:4000].float() - mini.images[:4000].float()).abs().mean(dim=(1, 2, 3))
    assert err.max() < 13, f"worst per-image error {err.max():.2f}/255: the JPEG mapping is wrong"
    assert torch.equal(ds.labels[torch.tensor(data.MINI_TRAIN_INDICES)], mini.labels)


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_full_train_jpeg_zip(bundle, monkeypatch):
    """Decodes 50k JPEGs only when the decoded-image cache is missing (first run)."""
    monkeypatch.setattr(data, "_JPEG_WARNED", True)
    ds = data.cifar10("train", "full", data_dir=bundle)
    assert ds.source == "bundle:cifar10_train_50000_jpeg.zip"
    _check_cifar10_full_train(ds, data.cifar10("train", "mini", data_dir=bundle))


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_full_train_jpeg_folder(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_JPEG_WARNED", True)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    with zipfile.ZipFile(bundle / "cifar10_train_50000_jpeg.zip") as z:
        jpgs = [m for m in z.namelist() if m.endswith(".jpg")]
        z.extractall(tmp_path / "d" / "cifar10_train_50000_jpeg", jpgs)
    ds = data.cifar10("train", "full", data_dir=tmp_path / "d")
    assert ds.source == "folder:cifar10_train_50000_jpeg"
    _check_cifar10_full_train(ds, data.cifar10("train", "mini", data_dir=bundle))


@pytest.mark.data
def test_cifar100_test20(bundle):
    ds = data.cifar100(data_dir=bundle)
    assert len(ds) == 20 and ds.num_classes == 100 and ds.lossless
    assert ds.labels.tolist()[:5] == [49, 33, 72, 51, 71]
    assert ds.classes[49] == "mountain" and ds.indices.tolist() == list(range(20))


@pytest.mark.data
@pytest.mark.parametrize("split", ["val", "train"])
def test_tinyimagenet_bundle(bundle, split):
    ds = data.tinyimagenet(split, data_dir=bundle)
    assert len(ds) == 10000 and ds.images.shape == (10000, 3, 64, 64) and ds.image_size == 64
    assert ds.num_classes == 200 and ds.class_counts() == [50] * 200
    assert ds.classes[0] == "Egyptian cat"
    if split == "val":
        assert ds.indices.tolist() == list(range(10000))
    else:
        assert ds.indices[:3].tolist() == [0, 1, 2] and ds.indices[50].item() == 500


@pytest.mark.data
def test_tinyimagenet_full_train_needs_full_set(bundle):
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        data.tinyimagenet("train", "full", data_dir=bundle)


@pytest.mark.data
def test_load_dispatch_and_default_dirs(bundle, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # known folder ../shared/data
    ds = data.load("cifar10", "test")
    assert ds.name == "cifar10/test/mini"
    assert ds.path.resolve() == (bundle / "cifar10_test_1000.npz").resolve()
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        data.load("cifar100", "train", data_dir=bundle)  # default subset for train is "full"


# ------------------------------------------------------------------------------------------------
# torchvision folders (built from the bundle: identical mini split wherever it is computed)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fake_cifar10_root(bundle, tmp_path_factory) -> Path:
    """A cifar-10-batches-py folder in torchvision's format: bundle images at their indices."""
    root = tmp_path_factory.mktemp("tv")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    train = np.load(bundle / "cifar10_train_7897.npz")
    test = np.load(bundle / "cifar10_test_1000.npz")
    xs = np.zeros((50000, 3, 32, 32), np.uint8)
    ys = np.arange(50000) % 10
    xs[train["idx"]] = train["x"].transpose(0, 3, 1, 2)
    ys[train["idx"]] = train["y"]
    for k in range(5):
        part = slice(10000 * k, 10000 * (k + 1))
        with open(folder / f"data_batch_{k + 1}", "wb") as f:
            pickle.dump({"data": xs[part].reshape(10000, -1), "labels": ys[part].tolist()}, f)
    xt = np.zeros((10000, 3, 32, 32), np.uint8)
    xt[:1000] = test["x"].transpose(0, 3, 1, 2)
    yt = np.arange(10000) % 10
    yt[:1000] = test["y"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": xt.reshape(10000, -1), "labels": yt.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.CIFAR10_CLASSES)}, f)
    return root


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(_storage, "check_md5", lambda path, md5: None)


@pytest.mark.data
@pytest.mark.parametrize("split", ["train", "test"])
def test_mini_from_torchvision_folder_equals_bundle(bundle, fake_cifar10_root, no_md5, split):
    tv = data.cifar10(split, "mini", data_dir=fake_cifar10_root)
    ref = data.cifar10(split, "mini", data_dir=bundle)
    assert tv.source == "torchvision:cifar-10-batches-py" and tv.lossless
    assert torch.equal(tv.images, ref.images) and torch.equal(tv.labels, ref.labels)
    assert torch.equal(tv.indices, ref.indices)


@pytest.mark.data
def test_full_prefers_lossless_torchvision_folder(bundle, fake_cifar10_root, no_md5, tmp_path,
                                                  monkeypatch):
    d = tmp_path / "both"
    _link(bundle / "cifar10_test_10000_jpeg.npz", d)
    _link(fake_cifar10_root / "cifar-10-batches-py", d)
    monkeypatch.setattr(data, "_JPEG_WARNED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = data.cifar10("test", "full", data_dir=d)
    assert ds.lossless and len(ds) == 10000 and ds.source.startswith("torchvision")


@pytest.mark.data
def test_torchvision_folder_is_md5_checked(fake_cifar10_root):
    with pytest.raises(RuntimeError, match="md5 mismatch"):
        data.cifar10("test", "mini", data_dir=fake_cifar10_root)


@pytest.mark.data
def test_download_goes_through_torchvision(bundle, fake_cifar10_root, no_md5, tmp_path,
                                           monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        base_folder = "cifar-10-batches-py"
        real = torchvision.datasets.CIFAR10
        train_list, test_list, meta = (real.train_list, real.test_list,
                                       torchvision.datasets.CIFAR10.meta)

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            target = Path(root) / "cifar-10-batches-py"
            if not target.exists():
                target.symlink_to(fake_cifar10_root / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = data.cifar10("test", "mini", data_dir=tmp_path / "dl", download=True)
    assert calls == [(str(tmp_path / "dl"), False, True)]
    assert torch.equal(ds.images, data.cifar10("test", data_dir=bundle).images)
    data.cifar10("test", "mini", data_dir=bundle, download=True)  # present: no download
    assert len(calls) == 1


def test_download_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _storage.download_root(None) == tmp_path / ".cache" / "d2r_lib" / "data"
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert _storage.download_root(None) == tmp_path / "env"
    assert _storage.download_root(tmp_path / "x") == tmp_path / "x"


# ------------------------------------------------------------------------------------------------
# Tiny ImageNet reader and the decoded-image cache, on a small fake archive
# ------------------------------------------------------------------------------------------------
def _jpeg(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def fake_tiny(tmp_path, monkeypatch) -> Path:
    # a fake bundle: d2r_lib's shipped digest would refuse it, so it is made a file d2r_lib has no
    # digest for, which the local SHA256SUMS may add
    monkeypatch.delitem(_storage.BUNDLE_SHA256, data.TINY_BUNDLE_ZIP)
    wnids = [f"n{c:08d}" for c in range(200)]
    rng = np.random.default_rng(0)
    d = tmp_path / "tinydata"
    d.mkdir()
    with zipfile.ZipFile(d / data.TINY_BUNDLE_ZIP, "w") as z:
        r = "tiny-imagenet-200/"
        z.writestr(r + "wnids.txt", "\n".join(wnids) + "\n")
        words = f"{wnids[0]}\tEgyptian cat\n{wnids[1]}\trocking chair, rocker\n"
        z.writestr(r + "words.txt", words)
        ann = []
        for n, c in [(2, 1), (0, 0), (1, 5)]:
            ann.append(f"val_{n}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            z.writestr(f"{r}val/images/val_{n}.JPEG", _jpeg(img))
        z.writestr(r + "val/val_annotations.txt", "\n".join(ann) + "\n")
        for c, k in [(0, 0), (0, 1), (0, 60), (2, 3)]:
            img = rng.integers(0, 256, (64, 64), dtype=np.uint8)
            z.writestr(f"{r}train/{wnids[c]}/images/{wnids[c]}_{k}.JPEG", _jpeg(img, "L"))
    digest = hashlib.sha256((d / data.TINY_BUNDLE_ZIP).read_bytes()).hexdigest()
    (d / "SHA256SUMS").write_text(f"{digest}  {data.TINY_BUNDLE_ZIP}\n")  # a bundle lists its files
    return d


def test_tinyimagenet_reader(fake_tiny):
    val = data.tinyimagenet("val", data_dir=fake_tiny)
    assert val.indices.tolist() == [0, 1, 2] and val.labels.tolist() == [0, 5, 1]
    assert val.classes[:3] == ["Egyptian cat", "rocking chair", "n00000002"]
    train = data.tinyimagenet("train", data_dir=fake_tiny)
    assert train.indices.tolist() == [0, 1, 1003] and train.labels.tolist() == [0, 0, 2]
    x = train.images[0]  # a grayscale JPEG comes back as RGB with equal channels
    assert x.shape == (3, 64, 64) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_tinyimagenet_extracted_folder(fake_tiny, tmp_path):
    with zipfile.ZipFile(fake_tiny / data.TINY_BUNDLE_ZIP) as z:
        z.extractall(tmp_path / "ex")
    from_zip = data.tinyimagenet("train", data_dir=fake_tiny)
    from_dir = data.tinyimagenet("train", data_dir=tmp_path / "ex")
    assert from_dir.source == "folder:tiny-imagenet-200"
    assert torch.equal(from_zip.images, from_dir.images)
    assert torch.equal(from_zip.indices, from_dir.indices)
    with pytest.raises(FileNotFoundError, match="500 images per class"):
        data.tinyimagenet("train", "full", data_dir=tmp_path / "ex")
    with pytest.raises(FileNotFoundError, match="needs all 10000"):
        data.tinyimagenet("val", "full", data_dir=tmp_path / "ex")


def test_decoded_image_cache(fake_tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    monkeypatch.setattr(_storage, "CACHE_MIN_IMAGES", 1)
    first = data.tinyimagenet("val", data_dir=fake_tiny)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2  # no tmp file left
    assert re.fullmatch(r"tinyimagenet-[0-9a-f]{16}\.npz", files[0])
    assert files[1] == "verified.json"  # the zip's checksum, checked once

    def no_decode(_):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(_storage, "decode_jpeg", no_decode)
    assert torch.equal(data.tinyimagenet("val", data_dir=fake_tiny).images, first.images)
    zpath = fake_tiny / data.TINY_BUNDLE_ZIP
    os.utime(zpath, ns=(zpath.stat().st_atime_ns, zpath.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although cached"):  # new mtime: decodes
        data.tinyimagenet("val", data_dir=fake_tiny)


# ------------------------------------------------------------------------------------------------
# Directory resolution
# ------------------------------------------------------------------------------------------------
def test_resolution_order(tmp_path, monkeypatch):
    for d in ("explicit", "env", "cwd/data"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "x.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "cwd")
    assert data.find_file(["x.npz"]) == tmp_path / "cwd" / "data" / "x.npz"  # known folders
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.candidate_dirs() == [tmp_path / "env"]
    assert data.find_file(["x.npz"]) == tmp_path / "env" / "x.npz"  # env beats known folders
    explicit = tmp_path / "explicit"
    assert data.find_file(["x.npz"], data_dir=explicit) == explicit / "x.npz"
    assert data.candidate_dirs(str(tmp_path / "explicit")) == [tmp_path / "explicit"]
    (tmp_path / "explicit" / "x.npz").unlink()
    with pytest.raises(FileNotFoundError):  # explicit only: no fallback to the env folder
        data.find_file(["x.npz"], data_dir=tmp_path / "explicit")


def test_known_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pkg = Path(data.__file__).resolve().parents[1]
    dirs = data.candidate_dirs()
    expected = [tmp_path / "data", tmp_path.parent / "shared" / "data",
                tmp_path.parent.parent / "shared" / "data", pkg / "data",
                pkg.parent / "shared" / "data", tmp_path / "home" / ".cache" / "d2r_lib" / "data"]
    assert dirs == list(dict.fromkeys(Path(os.path.abspath(p)) for p in expected))


def test_missing_data_names_every_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as err:
        data.find_file(["nothing_here.npz"])
    msg = str(err.value)
    for d in data.candidate_dirs():
        assert str(d) in msg
    assert "nothing_here.npz" in msg and "D2R_DATA_DIR" in msg
    assert "data_dir=" in msg and "download=True" in msg


def test_loader_missing_data_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty)) + r".*\n.*D2R_DATA_DIR"):
        data.cifar10("train", "mini", data_dir=empty)
    with pytest.raises(FileNotFoundError, match="cifar10_test_10000_jpeg.npz"):
        data.cifar10("test", "full", data_dir=empty)
    with pytest.raises(FileNotFoundError, match="cifar100_test_20.npz"):
        data.cifar100(data_dir=empty)
    with pytest.raises(FileNotFoundError, match=data.TINY_BUNDLE_ZIP):
        data.tinyimagenet(data_dir=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.cifar10(data_dir=tmp_path / "nowhere")
    assert list(empty.iterdir()) == [] and not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------
# Augmentation, subsets, synthetic data, loaders
# ------------------------------------------------------------------------------------------------
def test_tensors_and_repr():
    ds = data.synthetic(20, num_classes=4, image_size=16)
    x, y = ds.tensors(device="cpu")
    assert x.shape == (20, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, ds.images.float() / 255) and x.min() >= 0 and x.max() <= 1
    r = repr(ds)
    assert "synthetic" in r and "size=20" in r and "classes=4" in r and "lossless=True" in r


def test_subset():
    ds = data.synthetic(100, seed=3)
    first = ds.subset(10)
    assert len(first) == 10 and first.indices.tolist() == list(range(10))
    assert torch.equal(first.images, ds.images[:10])
    pc = ds.subset(per_class=3)
    assert len(pc) == 30 and pc.class_counts() == [3] * 10
    assert pc.indices.tolist() == sorted(pc.indices.tolist())
    for c in range(10):  # the first 3 of each class
        first3 = torch.nonzero(ds.labels == c).flatten()[:3]
        assert pc.indices[pc.labels == c].tolist() == first3.tolist()
    pos = ds.subset(positions=[5, 2])
    assert pos.indices.tolist() == [5, 2] and pos.classes == ds.classes
    assert len(ds.subset()) == 100
    for big in (ds.subset(1000), ds.subset(1000, random=True), ds.subset(100)):  # clamped
        assert big.name == ds.name and torch.equal(big.indices, ds.indices)
    r1, r2 = ds.subset(10, random=True, seed=1), ds.subset(10, random=True, seed=2)
    assert torch.equal(r1.indices, ds.subset(10, random=True, seed=1).indices)
    assert not torch.equal(r1.indices, r2.indices)
    assert ds.subset(per_class=2, random=True, seed=5).class_counts() == [2] * 10
    assert pos.subset(1).indices.tolist() == [5]  # indices stay the original ones


@pytest.mark.data
def test_subset_of_bundle_keeps_indices(bundle):
    ds = data.cifar10("train", data_dir=bundle).subset(per_class=5)
    assert ds.class_counts() == [5] * 10
    assert set(ds.indices.tolist()) <= set(data.MINI_TRAIN_INDICES.tolist())


def test_synthetic():
    a, b, c = data.synthetic(50, seed=0), data.synthetic(50, seed=0), data.synthetic(50, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.dtype == torch.uint8 and a.images.shape == (50, 3, 32, 32)
    assert a.source == "synthetic"
    assert a.class_counts() == [5] * 10
    x, _ = a[0]
    assert x.min() >= 0 and x.max() <= 1
    t = data.synthetic(20, num_classes=200, image_size=64)
    assert t.images.shape == (20, 3, 64, 64) and t.num_classes == 200
    # learnable: a nearest-class-mean classifier generalises from one seed to another
    tr, te = data.synthetic(500, seed=0), data.load("synthetic", "test", n=200)
    xtr, ytr = tr.tensors()
    xte, yte = te.tensors()
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(xte.flatten(1), means).argmin(1)
    assert (pred == yte).float().mean() > 0.9
    assert not torch.equal(te.images[:20], data.load("synthetic", "train", n=200).images[:20])


def test_datasets_table():
    assert set(data.DATASETS) == {"cifar10", "cifar100", "tinyimagenet", "synthetic"}
    assert data.DATASETS["tinyimagenet"]["image_size"] == 64
    assert data.DATASETS["cifar100"]["num_classes"] == 100
    for spec in data.DATASETS.values():
        assert set(spec["default_subset"]) == set(spec["splits"])
        assert set(spec["default_subset"].values()) <= set(spec["subsets"])


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: data.load("imagenet", "train"), ValueError,
     r"name must be one of 'cifar10', 'cifar100', 'tinyimagenet'"),
    (lambda: data.load("cifar10", "val"), ValueError,
     r"split must be one of 'train', 'test'; got 'val'"),
    (lambda: data.cifar10("train", "tiny"), ValueError,
     r"subset must be one of 'mini', 'full'; got 'tiny'"),
    (lambda: data.cifar100("test", "mini"), ValueError, r"subset must be one of 'test20', 'full'"),
    (lambda: data.cifar100("train", "test20"), ValueError,
     r"subset='test20' exists only for split='test'"),
    (lambda: data.tinyimagenet("test"), ValueError, r"split must be one of 'train', 'val'"),
    (lambda: data.tinyimagenet("val", "mini"), ValueError,
     r"subset must be one of 'bundle', 'full'"),
    (lambda: data.cifar10(download="yes"), TypeError, r"download must be True or False"),
    (lambda: data.cifar10(data_dir=3), TypeError, r"data_dir must be a path"),
    (lambda: data.synthetic(10).subset(0), ValueError, r"n must be >= 1"),
    (lambda: data.synthetic(10).subset(2.5), TypeError, r"n must be an integer"),
    (lambda: data.synthetic(20).subset(per_class=3), ValueError,
     r"per_class must be <= 2, the size of the smallest"),
    (lambda: data.synthetic(20).subset(per_class=0), ValueError, r"per_class must be >= 1"),
    (lambda: data.synthetic(20).subset(2, per_class=1), ValueError,
     r"only one of n, positions, per_class"),
    (lambda: data.synthetic(20).subset(positions=[0, 20]), ValueError,
     r"positions must lie in \[0, 19\]"),
    (lambda: data.synthetic(20).subset(positions=[0.5]), TypeError,
     r"positions must be a 1-D sequence of integers"),
    (lambda: data.make_loader(data.synthetic(8), 0, shuffle=True), ValueError,
     r"batch_size must be >= 1"),
    (lambda: data.make_loader(data.synthetic(8), -2, shuffle=True), ValueError,
     r"batch_size must be >= 1"),
    (lambda: data.make_loader(data.synthetic(8), 2.0, shuffle=True), TypeError,
     r"batch_size must be an integer"),
    (lambda: data.make_loader(data.synthetic(8), "8", shuffle=True), TypeError,
     r"batch_size must be an integer"),
    (lambda: data.make_loader(data.synthetic(8), True, shuffle=True), TypeError,
     r"batch_size must be an integer"),
    (lambda: data.make_loader([1, 2], 2, shuffle=True), TypeError,
     r"dataset must be a torch Dataset"),
    (lambda: data.make_loader(data.synthetic(8), 2, shuffle=1), TypeError,
     r"shuffle must be True or False"),
    (lambda: data.synthetic(0), ValueError, r"n must be >= 1"),
    (lambda: data.synthetic(8, num_classes=1), ValueError, r"num_classes must be >= 2"),
    (lambda: data.find_file([]), ValueError, r"filenames must name at least one"),
    (lambda: data.BatchLoader([1, 2], 2), TypeError, r"dataset must be an ImageDataset"),
    (lambda: data.BatchLoader(data.synthetic(8), 0), ValueError, r"batch_size must be >= 1"),
    (lambda: data.BatchLoader(data.synthetic(8), 3, world=2), ValueError,
     r"batch_size must be a multiple of world=2; got 3"),
    (lambda: data.BatchLoader(data.synthetic(8), 2, rank=2, world=2), ValueError,
     r"rank must be <= 1"),
    (lambda: data.BatchLoader(data.synthetic(8), 2, prefetch="yes"), TypeError,
     r"prefetch must be True, False or None \(None: on CUDA only\); got 'yes'"),
    (lambda: data.BatchLoader(data.synthetic(8), 2).set_epoch(-1), ValueError,
     r"epoch must be >= 0"),
    (lambda: data.random_crop_flip(torch.zeros(3, 8, 8)), ValueError,
     r"images must be a \(B, C, H, W\) tensor"),
    (lambda: data.paper_augmentation(32)(torch.zeros(3, 30, 30)), ValueError,
     r"x must be a \(C, 32, 32\) image"),
    (lambda: data.paper_augmentation(32, padding=-1), ValueError, r"padding must be >= 0"),
])
def test_bad_input(call, exc, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(exc, match=pattern):
        call()
    assert list(tmp_path.iterdir()) == []  # wrote nothing
