"""The real download path of d2r_lib.data (torchvision's CIFAR download), offline: a local HTTP
server on 127.0.0.1 serves archives in torchvision's own format (CIFAR-10 and CIFAR-100) built from
the bundle at test time, and $D2R_DOWNLOAD_MIRROR points the download at it. The archive's md5 (and
each file's) is what torchvision and d2r_lib check, so the test sets torchvision's expected digests
to the test archive's, and a byte changed or missing must then fail that check.
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
# torchvision's layout of each archive, and how d2r_lib asks for the bundle's images from it
SETS = {
    "cifar10": {"npz": "cifar10_test_1000.npz", "cls": "CIFAR10", "labels": "labels",
                "meta": ("batches.meta", "label_names"), "test": "test_batch",
                "train": [f"data_batch_{k}" for k in range(1, 6)],
                "load": lambda **kw: data.cifar10("test", "mini", **kw)},
    "cifar100": {"npz": "cifar100_test_20.npz", "cls": "CIFAR100", "labels": "fine_labels",
                 "meta": ("meta", "fine_label_names"), "test": "test", "train": ["train"],
                 "load": lambda **kw: data.cifar100("test", "test20", **kw)},
}


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _archive(which: str) -> dict:
    """The archive as torchvision packs it: the bundle's lossless test images at their original
    indices (zeros elsewhere), tiny placeholder training files."""
    import torchvision.datasets

    spec = SETS[which]
    cls = getattr(torchvision.datasets, spec["cls"])
    if not (BUNDLE / spec["npz"]).is_file():
        pytest.skip(f"offline data bundle not found at {BUNDLE}")
    test = np.load(BUNDLE / spec["npz"])
    x = np.zeros((10000, 3, 32, 32), np.uint8)
    y = np.arange(10000) % len(test["classes"])
    x[test["idx"]] = test["x"].transpose(0, 3, 1, 2)
    y[test["idx"]] = test["y"]
    files = {spec["test"]: pickle.dumps({"data": x.reshape(10000, -1), spec["labels"]: y.tolist()}),
             spec["meta"][0]: pickle.dumps({spec["meta"][1]: [str(c) for c in test["classes"]]})}
    for name in spec["train"]:
        files[name] = pickle.dumps({"data": x[:1].reshape(1, -1), spec["labels"]: [0]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{cls.base_folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    blob = buf.getvalue()
    return {"blob": blob, "md5": _md5(blob), "files": {n: _md5(p) for n, p in files.items()},
            "name": cls.filename, "cls": cls, "spec": spec}


@pytest.fixture(scope="module", params=list(SETS))
def archive(request) -> dict:
    return _archive(request.param)


@pytest.fixture(scope="module")
def archive10() -> dict:
    return _archive("cifar10")


def _expect(archive, monkeypatch) -> None:
    """torchvision's digests replaced by the test archive's (its format is unchanged)."""
    cls, md5, spec = archive["cls"], archive["files"], archive["spec"]
    monkeypatch.setattr(cls, "tgz_md5", archive["md5"])
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n in spec["train"]])
    monkeypatch.setattr(cls, "test_list", [[spec["test"], md5[spec["test"]]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[spec["meta"][0]]})


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local HTTP server; `serve` sets what it answers for the archive ("ok", "404", "truncated",
    "corrupt"). Every request is counted. $D2R_DOWNLOAD_MIRROR points at it."""
    state = {"mode": "ok", "requests": [], "blob": b"", "name": "cifar-10-python.tar.gz"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            state["requests"].append(self.path)
            blob = state["blob"]
            if self.path != f"/{state['name']}" or state["mode"] == "404":
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
    state["base"] = base
    yield state
    httpd.shutdown()
    httpd.server_close()


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_from_the_server_equals_the_bundle_and_happens_once(archive, server, tmp_path,
                                                                      monkeypatch):
    _expect(archive, monkeypatch)
    server["blob"], server["name"] = archive["blob"], archive["name"]
    load = archive["spec"]["load"]
    got = load(data_dir=tmp_path / "dl", download=True)
    ref = load(data_dir=BUNDLE)
    assert got.source == f"torchvision:{archive['cls'].base_folder}" and got.lossless
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
    assert torch.equal(got.indices, ref.indices)
    assert server["requests"] and set(server["requests"]) == {f"/{archive['name']}"}
    n = len(server["requests"])
    again = load(data_dir=tmp_path / "dl", download=True)
    assert len(server["requests"]) == n  # the downloaded copy, no request
    assert torch.equal(again.images, got.images)
    assert (tmp_path / "dl" / archive["cls"].base_folder / archive["spec"]["test"]).is_file()


@pytest.mark.parametrize("mode, why", [
    ("404", "the server answered HTTP 404 Not Found"),
    ("truncated", r"truncated"),
    ("corrupt", r"failed its md5 check \(truncated or corrupt\)"),
    ("refused", r"no connection to the server \(.*refused"),
])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_a_failed_download_names_the_url_and_the_fix_and_keeps_nothing(
        archive10, server, tmp_path, monkeypatch, mode, why, existing):
    _expect(archive10, monkeypatch)
    server["blob"], server["mode"] = archive10["blob"], mode
    url = f"{server['base']}/{archive10['name']}"
    if mode == "refused":  # a port on 127.0.0.1 that nothing listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/{archive10['name']}"
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
