"""Fault injection for the data layer: every damaged or missing file gives one clear DataError.

Each case builds a data folder in tmp_path from copies of the real bundle files (the bundle itself
is never touched), injects one fault, loads, and checks the error text and that nothing on disk
was created or changed.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from d2r_lib import _storage, data

BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEST_NPZ = "cifar10_test_1000.npz"
GOOD = _storage.BUNDLE_SHA256[TEST_NPZ]
COPY_FIX = f"copy {TEST_NPZ} again from the offline bundle"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Caches and home under tmp_path (so the snapshot sees them); no ambient data folder."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_storage, "_VERIFIED", {})


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not (BUNDLE / TEST_NPZ).is_file():
        pytest.skip(f"offline data bundle not found at {BUNDLE}")
    return BUNDLE


def _snapshot(root: Path) -> dict:
    """Every file and folder below root: size, mtime and content digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            out[p.relative_to(root).as_posix() + "/"] = None
        elif not p.is_file():  # a FIFO: never opened
            out[p.relative_to(root).as_posix()] = stat.S_IFMT(os.lstat(p).st_mode)
        else:
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns,
                                                   hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _copy(bundle: Path, d: Path, name=TEST_NPZ, sums=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle / name, d / name)
    if sums:
        shutil.copyfile(bundle / "SHA256SUMS", d / "SHA256SUMS")
    return d / name


def _resave(path: Path, change) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _list_in_sums(path: Path) -> None:
    """A SHA256SUMS regenerated after the damage: the checksum passes, the reader must not."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / "SHA256SUMS").write_text(f"{digest}  {path.name}\n")


def _flip_byte_in_member(path: Path, member: str, at: int) -> None:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        pos = info.header_offset + 30 + int(name_len) + int(extra_len) + at
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))


# ------------------------------------------------------------------------------------------------
# The table: (case, make(bundle, folder) -> data_dir, load(data_dir), error type, patterns)
# ------------------------------------------------------------------------------------------------
def _zero_pixels(b, d):
    _resave(_copy(b, d), lambda a: a["x"].fill(0))
    return d


def _shift_labels(b, d):
    _resave(_copy(b, d), lambda a: a.update(y=np.roll(a["y"], 1)))
    return d


def _truncate(b, d):
    p = _copy(b, d)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return d


def _random_bytes(b, d):
    p = _copy(b, d)
    p.write_bytes(np.random.default_rng(0).integers(0, 256, p.stat().st_size, np.uint8).tobytes())
    return d


def _corrupt_zip_no_sums(b, d):  # no SHA256SUMS beside it: the built-in digests still apply
    p = _copy(b, d, sums=False)
    _flip_byte_in_member(p, "x.npy", 5000)
    return d


def _crc_error(b, d):
    p = _copy(b, d)
    _flip_byte_in_member(p, "x.npy", 5000)
    _list_in_sums(p)
    return d


def _random_bytes_listed(b, d):
    p = _copy(b, d)
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    _list_in_sums(p)
    return d


def _truncated_listed(b, d):
    p = _copy(b, d)
    p.write_bytes(p.read_bytes()[:100_000])
    _list_in_sums(p)
    return d


def _missing_keys_listed(b, d):
    p = _copy(b, d)
    _resave(p, lambda a: a.pop("idx"))
    _list_in_sums(p)
    return d


def _garbage_sums(b, d):
    _copy(b, d)
    (d / "SHA256SUMS").write_bytes(b"\xff\xfe\x00garbage")
    return d


def _fake_archive(name):
    def make(b, d):
        d.mkdir(parents=True)
        (d / name).write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)  # a zip header, no zip
        _list_in_sums(d / name)
        return d
    return make


def _missing_folder(b, d):
    return d / "nowhere"


def _missing_file(b, d):
    d.mkdir()
    return d


def _tampered_after_verified(b, d):
    p = _copy(b, d)
    data.verify_file(p)  # verified and cached: the cache must not hide a later change
    _resave(p, lambda a: a["x"][0].fill(0))
    return d


def _zeroed_listed(b, d):  # a regenerated SHA256SUMS cannot vouch for a file d2r_lib knows
    p = _copy(b, d)
    _resave(p, lambda a: a["x"].fill(0))
    _list_in_sums(p)
    return d


def _cropped_listed(b, d):  # the case: 20x20 images, 11 classes, sums regenerated
    p = _copy(b, d)
    _resave(p, lambda a: a.update(x=np.ascontiguousarray(a["x"][:, :20, :20]),
                                  classes=np.append(a["classes"], "extra")))
    _list_in_sums(p)
    return d


def _labels_out_of_range_listed(b, d):
    p = _copy(b, d)
    _resave(p, lambda a: a["y"].__setitem__(0, 10))
    _list_in_sums(p)
    return d


def _huge_header_listed(b, d):  # x.npy's header declares 10**12 images of 32x32x3
    p = _copy(b, d)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    with zipfile.ZipFile(p, "w") as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            if key == "x":
                np.lib.format.write_array_header_1_0(buffer, {
                    "descr": "|u1", "fortran_order": False, "shape": (10**12, 32, 32, 3)})
                buffer.write(value.tobytes())
            else:
                np.lib.format.write_array(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    _list_in_sums(p)
    return d


def _fifo(b, d):
    d.mkdir()
    os.mkfifo(d / TEST_NPZ)
    return d


def _same_size_edit_mtime_restored(b, d):
    p = _copy(b, d)
    data.verify_file(p)
    st = p.stat()
    raw = bytearray(p.read_bytes())
    raw[-5000] ^= 0xFF  # one byte, the same size
    p.write_bytes(bytes(raw))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -r`: the mtime as it was
    assert p.stat().st_mtime_ns == st.st_mtime_ns and p.stat().st_size == st.st_size
    return d


def _cifar_test(d):
    return data.cifar10("test", "mini", data_dir=d)


MISMATCH = [r"cifar10_test_1000\.npz is damaged or modified: its SHA256 is [0-9a-f]{64}",
            f"expects {GOOD}", COPY_FIX]
NOT_READABLE = [r"cifar10_test_1000\.npz cannot be read as a bundle \.npz file",
                "truncated or damaged", "SHA256SUMS"]

CASES = [
    ("zeroed pixels", _zero_pixels, _cifar_test, data.DataCorrupt, MISMATCH),
    ("shifted labels", _shift_labels, _cifar_test, data.DataCorrupt, MISMATCH),
    ("truncated", _truncate, _cifar_test, data.DataCorrupt,
     MISMATCH + [r"It has 1,415,331 bytes, the bundle's file 2,830,662 \(truncated\)"]),
    ("random bytes", _random_bytes, _cifar_test, data.DataCorrupt, MISMATCH),
    ("corrupt zip, no SHA256SUMS beside", _corrupt_zip_no_sums, _cifar_test, data.DataCorrupt,
     MISMATCH + ["the bundle's SHA256SUMS \\(built into d2r_lib\\)"]),
    ("zeroed, SHA256SUMS regenerated", _zeroed_listed, _cifar_test, data.DataCorrupt,
     MISMATCH + [r"SHA256SUMS lists this file's digest, but a local SHA256SUMS may only add files, "
                 "never replace a digest d2r_lib ships"]),
    ("same-size edit, mtime restored", _same_size_edit_mtime_restored, _cifar_test,
     data.DataCorrupt, MISMATCH),
    ("a FIFO named like the file", _fifo, _cifar_test, data.DataCorrupt,
     [r"cifar10_test_1000\.npz is not a regular file \(a FIFO, a device or a socket\)"]),
    ("cropped, 11 classes, no shipped digest", _cropped_listed, _cifar_test, data.DataCorrupt,
     [r"cifar10_test_1000\.npz does not hold cifar10 test/mini as declared: images are uint8 "
      r"\(1000, 20, 20, 3\), not uint8 \(N, 32, 32, 3\); 11 class names, not 10"]),
    ("label out of range, no shipped digest", _labels_out_of_range_listed, _cifar_test,
     data.DataCorrupt, [r"cifar10_test_1000\.npz does not hold cifar10 test/mini as declared: "
                        r"labels must be integers in \[0, 9\]; got int64 values in \[0, 10\]"]),
    ("huge header, no shipped digest", _huge_header_listed, _cifar_test, data.DataCorrupt,
     [r"cifar10_test_1000\.npz: x\.npy declares a uint8 array of shape \(1000000000000, 32, 32, "
      r"3\) \(3,072,000,000,000,000 bytes\) in 3,072,\d+ bytes; the file is damaged or forged"]),
    ("CRC error, SHA256SUMS regenerated, no shipped digest",
     _crc_error, _cifar_test, data.DataCorrupt,
     NOT_READABLE + [r"BadZipFile: Bad CRC-32 for file 'x\.npy'"]),
    ("truncated, SHA256SUMS regenerated, no shipped digest",
     _truncated_listed, _cifar_test, data.DataCorrupt,
     NOT_READABLE + ["BadZipFile"]),
    ("random bytes, SHA256SUMS regenerated, no shipped digest",
     _random_bytes_listed, _cifar_test, data.DataCorrupt,
     [r"is not an \.npz archive \(no zip header\)", COPY_FIX]),
    ("missing key, SHA256SUMS regenerated, no shipped digest",
     _missing_keys_listed, _cifar_test, data.DataCorrupt,
     [r"is not a bundle file: keys \['idx'\] are missing", COPY_FIX]),
    ("unreadable SHA256SUMS", _garbage_sums, _cifar_test, data.DataCorrupt,
     [r"SHA256SUMS cannot be read", "copy SHA256SUMS again from the offline bundle"]),
    ("corrupt JPEG zip, no shipped digest", _fake_archive("cifar10_train_50000_jpeg.zip"),
     lambda d: data.cifar10("train", "full", data_dir=d), data.DataCorrupt,
     [r"cifar10_train_50000_jpeg\.zip cannot be read as the CIFAR-10 JPEG training set",
      "BadZipFile", "copy cifar10_train_50000_jpeg.zip again"]),
    ("corrupt Tiny ImageNet zip, no shipped digest", _fake_archive(data.TINY_BUNDLE_ZIP),
     lambda d: data.tinyimagenet("val", data_dir=d), data.DataCorrupt,
     [r"tiny-imagenet-200_val10000_train50pc\.zip cannot be read as Tiny ImageNet",
      "BadZipFile"]),
    ("tampered after a verified load", _tampered_after_verified, _cifar_test, data.DataCorrupt,
     MISMATCH),
    ("missing folder", _missing_folder, _cifar_test, data.DataMissing,
     [r"Could not find CIFAR-10 test \(mini\)", r"nowhere  \(data_dir argument, does not exist\)",
      "'cifar10_test_1000.npz', 'cifar-10-batches-py'", "D2R_DATA_DIR",
      r"data\.cifar10\('test', 'mini', download=True\)"]),
    ("missing file", _missing_file, lambda d: data.cifar100(data_dir=d), data.DataMissing,
     [r"Could not find CIFAR-100 test \(test20\)", r"d  \(data_dir argument\)\n",
      "'cifar100_test_20.npz', 'cifar-100-python'",
      r"data\.cifar100\('test', 'test20', download=True\)"]),
    ("missing Tiny ImageNet", _missing_file, lambda d: data.tinyimagenet("train", data_dir=d),
     data.DataMissing, [f"'{data.TINY_FOLDER}', '{data.TINY_BUNDLE_ZIP}'"]),
]


@pytest.mark.data
@pytest.mark.parametrize("case, make, load, kind, patterns", CASES, ids=[c[0] for c in CASES])
def test_data_fault(case, make, load, kind, patterns, bundle, tmp_path, monkeypatch):
    if case.endswith("no shipped digest"):  # a file d2r_lib has no digest for: SHA256SUMS adds it
        for name in (TEST_NPZ, "cifar10_train_50000_jpeg.zip", data.TINY_BUNDLE_ZIP):
            monkeypatch.delitem(_storage.BUNDLE_SHA256, name)
    before_bundle = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    data_dir = make(bundle, tmp_path / "d")
    before = _snapshot(tmp_path)
    with pytest.raises(kind) as err:
        load(data_dir)
    msg = str(err.value)
    assert isinstance(err.value, data.DataError)
    for pattern in patterns:
        assert __import__("re").search(pattern, msg), f"{pattern!r} not in:\n{msg}"
    assert "pickle" not in msg and "Traceback" not in msg
    e = err.value  # one error: nothing chained that a traceback would show
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), case
    assert _snapshot(tmp_path) == before  # nothing created, nothing changed
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before_bundle


# ------------------------------------------------------------------------------------------------
# Downloads only when asked, and a failed one leaves nothing behind
# ------------------------------------------------------------------------------------------------
def test_no_download_unless_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(data.DataMissing, match="download=True"):
        data.cifar10("test", "full", data_dir=tmp_path / "none")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [
    lambda d: data.cifar10("test", "mini", data_dir=d, download=True),
    lambda d: data.cifar100("train", "full", data_dir=d, download=True),
])
def test_failed_download_leaves_nothing(call, tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        base_folder = "cifar-10-batches-py"

        def __init__(self, root, train, download):
            Path(root, "cifar-10-python.tar.gz").write_bytes(b"partial")  # half a download
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    before = _snapshot(tmp_path)
    with pytest.raises(data.DataMissing) as err:
        call(tmp_path / "new" / "data")
    msg = str(err.value)
    assert "Could not find CIFAR-1" in msg and "does not exist" in msg  # every place looked
    assert "Could not download CIFAR" in msg and "Temporary failure in name resolution" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert _snapshot(tmp_path) == before and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# The verification cache
# ------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_verification_is_cached_by_content_stamps(bundle, tmp_path, monkeypatch):
    """Cached by size, mtime, ctime and inode: a same-size edit with its mtime set back is hashed
    again and caught; every file is hashed again after RECHECK_DAYS (bit rot)."""
    p = _copy(bundle, tmp_path / "d")
    time.sleep(1.1)  # a file changed within a second of its check is never taken from the cache
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(_storage.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))
    assert data.verify_file(p) and len(hashed) == 1
    cache = tmp_path / "cache"
    assert sorted(x.name for x in cache.iterdir()) == ["verified.json"]  # no temporary file left
    monkeypatch.setattr(_storage, "_VERIFIED", {})  # a new process: only the JSON file remains
    assert data.verify_file(p) and data.verify_file(p) and len(hashed) == 1
    assert not data.verify_file(tmp_path / "d" / "SHA256SUMS")  # not a bundle data file
    (cache / "verified.json").write_text("{not json")  # a damaged cache only costs a re-check
    monkeypatch.setattr(_storage, "_VERIFIED", {})
    assert data.verify_file(p) and len(hashed) == 2
    now = time.time_ns()
    later = now + (_storage.RECHECK_DAYS * 86400 + 60) * 10**9
    monkeypatch.setattr(_storage.time, "time_ns", lambda: later)
    assert data.verify_file(p) and len(hashed) == 3  # a week on: hashed again
    assert data.verify_file(p) and len(hashed) == 3
    st = p.stat()
    raw = bytearray(p.read_bytes())
    raw[-5000] ^= 0xFF
    p.write_bytes(bytes(raw))  # the same size ...
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime (`touch -r`)
    with pytest.raises(data.DataCorrupt, match="is damaged or modified"):
        data.verify_file(p)
    assert len(hashed) == 4


@pytest.mark.data
def test_a_differing_local_sums_is_reported_and_ignored(bundle, tmp_path):
    p = _copy(bundle, tmp_path / "d", sums=False)
    (p.parent / "SHA256SUMS").write_text(f"{'0' * 64}  {TEST_NPZ}\n")
    with pytest.warns(UserWarning, match="lists another SHA256 for cifar10_test_1000.npz than the "
                      "one d2r_lib ships; the shipped digest is the one checked"):
        assert data.verify_file(p)


@pytest.mark.data
def test_good_copy_loads_and_symlink_shares_the_cache(bundle, tmp_path):
    d = tmp_path / "linked"
    d.mkdir()
    (d / TEST_NPZ).symlink_to(bundle / TEST_NPZ)  # no SHA256SUMS beside: built-in digest
    ds = data.cifar10("test", "mini", data_dir=d)
    assert len(ds) == 1000 and ds.lossless
