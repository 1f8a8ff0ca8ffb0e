"""The real download path of d2r_lib.data (torchvision's CIFAR download), offline: a local HTTP
server on 127.0.0.1 serves an archive in torchvision's own format built from the bundle at test
time, and $D2R_DOWNLOAD_MIRROR points the download at it. The archive's md5 (and each file's) is
what torchvision and d2r_lib check, so the test sets torchvision's expected digests to the test
archive's, and a byte changed or missing must then fail that check.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import re
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from d2r_lib import _storage, data

BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCHIVE = "cifar-10-python.tar.gz"


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


@pytest.fixture(scope="module")
def archive() -> dict:
    """cifar-10-python.tar.gz as torchvision packs it: the bundle's 1,000 lossless test images at
    their original indices (zeros elsewhere), tiny placeholder training batches."""
    if not (BUNDLE / "cifar10_test_1000.npz").is_file():
        pytest.skip(f"offline data bundle not found at {BUNDLE}")
    test = np.load(BUNDLE / "cifar10_test_1000.npz")
    x = np.zeros((10000, 3, 32, 32), np.uint8)
    y = np.arange(10000) % 10
    x[test["idx"]] = test["x"].transpose(0, 3, 1, 2)
    y[test["idx"]] = test["y"]
    files = {"test_batch": pickle.dumps({"data": x.reshape(10000, -1), "labels": y.tolist()}),
             "batches.meta": pickle.dumps({"label_names": list(data.CIFAR10_CLASSES)})}
    for k in range(1, 6):
        files[f"data_batch_{k}"] = pickle.dumps({"data": x[:1].reshape(1, -1), "labels": [0]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    blob = buf.getvalue()
    return {"blob": blob, "md5": _md5(blob), "files": {n: _md5(p) for n, p in files.items()}}


@pytest.fixture
def expected_digests(archive, monkeypatch):
    """torchvision's CIFAR-10 digests replaced by the test archive's (its format is unchanged)."""
    import torchvision.datasets

    cls, md5 = torchvision.datasets.CIFAR10, archive["files"]
    monkeypatch.setattr(cls, "tgz_md5", archive["md5"])
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{k}", md5[f"data_batch_{k}"]]
                                            for k in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local HTTP server; `serve` sets what it answers for the archive ("ok", "404", "truncated",
    "corrupt"). Every request is counted. $D2R_DOWNLOAD_MIRROR points at it."""
    state = {"mode": "ok", "requests": [], "blob": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            state["requests"].append(self.path)
            blob = state["blob"]
            if self.path != f"/{ARCHIVE}" or state["mode"] == "404":
                self.send_error(404)
                return
            if state["mode"] == "corrupt":  # same length, one byte in the middle changed
                i = len(blob) // 2
                blob = blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            if state["mode"] == "truncated":  # announces the whole file, sends half, hangs up
                blob = blob[:len(blob) // 2]
                self.close_connection = True
            self.wfile.write(blob)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv(_storage.MIRROR_ENV, base + "/")
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    state["url"] = f"{base}/{ARCHIVE}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_from_the_server_equals_the_bundle_and_happens_once(archive, expected_digests,
                                                                      server, tmp_path):
    server["blob"] = archive["blob"]
    got = data.cifar10("test", "mini", data_dir=tmp_path / "dl", download=True)
    ref = data.cifar10("test", "mini", data_dir=BUNDLE)
    assert got.source == "torchvision:cifar-10-batches-py" and got.lossless
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
    assert torch.equal(got.indices, ref.indices)
    assert server["requests"] and set(server["requests"]) == {f"/{ARCHIVE}"}
    n = len(server["requests"])
    again = data.cifar10("test", "mini", data_dir=tmp_path / "dl", download=True)
    assert len(server["requests"]) == n  # the downloaded copy, no request
    assert torch.equal(again.images, got.images)
    assert (tmp_path / "dl" / "cifar-10-batches-py" / "test_batch").is_file()


@pytest.mark.parametrize("mode, why", [
    ("404", "the server answered HTTP 404 Not Found"),
    ("truncated", r"truncated"),
    ("corrupt", r"failed its md5 check \(truncated or corrupt\)"),
    ("refused", r"no connection to the server \(.*refused"),
])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_a_failed_download_names_the_url_and_the_fix_and_keeps_nothing(
        archive, expected_digests, server, tmp_path, monkeypatch, mode, why, existing):
    server["blob"], server["mode"] = archive["blob"], mode
    url = server["url"]
    if mode == "refused":  # a port on 127.0.0.1 that nothing listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/{ARCHIVE}"
        monkeypatch.setenv(_storage.MIRROR_ENV, f"http://127.0.0.1:{port}")
    root = tmp_path / "dl" / "data"
    if existing:
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    before = _tree(tmp_path / "dl")
    with pytest.raises(data.DataMissing) as err:
        data.cifar10("test", "mini", data_dir=root, download=True)
    last = str(err.value).splitlines()[-1]  # after the folders looked in: the download's line
    assert last.startswith(f"Could not download CIFAR10 from {url} (check $D2R_DOWNLOAD_MIRROR) "
                           f"into {root}: ")
    assert re.search(why, last), last
    assert "Nothing was kept" in last and f"download {url} yourself and extract it" in last
    assert _tree(tmp_path / "dl") == before  # no half-written file or folder
    assert err.value.__cause__ is None
