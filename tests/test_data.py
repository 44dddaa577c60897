"""qmse.data on fixture files written in the exact official formats, downloads from a
loopback HTTP server, and (when Debian's package is installed) the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import idx_bytes, write_mnist

from qmse import data, download, sources
from qmse.cli import main

# ---- fixture files ---------------------------------------------------------------------------


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _py2_obj(o: object) -> bytes:
    if isinstance(o, dict):
        return b"}(" + b"".join(_py2_obj(k) + _py2_obj(v) for k, v in o.items()) + b"u"
    if isinstance(o, list):
        return b"](" + b"".join(_py2_obj(x) for x in o) + b"e"
    if isinstance(o, int):
        return b"J" + struct.pack("<i", o)
    if isinstance(o, bytes):
        return _py2_str(o)
    if isinstance(o, np.ndarray):
        assert o.dtype == np.uint8
        shape = b"(" + b"".join(_py2_obj(s) for s in o.shape) + b"t"
        dtype = (
            b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
            b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        )
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
            + _py2_str(b"b")
            + b"\x87R(K\x01"
            + shape
            + dtype
            + b"\x89"
            + _py2_str(o.tobytes())
            + b"tb"
        )
    raise TypeError(type(o))


def py2_pickle(obj: object) -> bytes:
    """Pickle protocol 2 as Python 2's cPickle wrote the CIFAR files: str as BINSTRING and
    numpy arrays through numpy.core.multiarray._reconstruct (Python 3's pickler would
    route bytes through _codecs.encode instead)."""
    return b"\x80\x02" + _py2_obj(obj) + b"."


def cifar_members(name: str, seed: int = 0, per_batch: int = 3) -> tuple[dict, dict]:
    """{member name: pickle bytes} for a tiny CIFAR release, and the arrays it holds."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, train, test, key, classes = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
            10,
        )
        extra = {"batches.meta": {b"label_names": [b"airplane"] * 10, b"num_vis": 3072}}
    else:
        folder, train, test, key, classes = (
            "cifar-100-python",
            ["train"],
            ["test"],
            b"fine_labels",
            100,
        )
        extra = {"meta": {b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": []}}
    members, arrays = {}, {}
    for m in train + test:
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, per_batch)]
        batch = {b"batch_label": m.encode(), key: labels, b"data": pixels}
        batch[b"filenames"] = [f"img_{i}.png".encode() for i in range(per_batch)]
        if name == "cifar100":
            batch[b"coarse_labels"] = [(x + 1) % 20 for x in labels]
        members[f"{folder}/{m}"] = py2_pickle(batch)
        arrays[m] = (pixels, labels)
    for m, obj in extra.items():
        members[f"{folder}/{m}"] = py2_pickle(obj)
    return members, arrays


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, blob in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def write_cifar(root: Path, name: str, *, archive: bool = True, members: dict | None = None):
    """A CIFAR fixture in `root/<name>/`, as the .tar.gz or as its extracted folder."""
    arrays = None
    if members is None:
        members, arrays = cifar_members(name)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        (archive_name,) = sources.SOURCES[name].files
        (folder / archive_name).write_bytes(tar_gz(members))
    else:
        for member, blob in members.items():
            (folder / member).parent.mkdir(parents=True, exist_ok=True)
            (folder / member).write_bytes(blob)
    return arrays


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No test sees the real data dir, Debian's folder, or waits between retries."""
    monkeypatch.delenv("QMSE_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)


# ---- locations -------------------------------------------------------------------------------


def test_resolve_data_dir_prefers_argument_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "qmse"
    monkeypatch.setenv("QMSE_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(None) == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir("~/x") == tmp_path / "home" / "x"


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="name='svhn'.*mnist"):
        data.load("svhn", tmp_path, allow_unverified=True)


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load("mnist", tmp_path, allow_unverified=True)
    msg = str(e.value)
    assert str(tmp_path / "mnist") in msg and "qmse data download mnist" in msg
    assert "train-images-idx3-ubyte.gz" in msg
    with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
        data.load("fashion-mnist", tmp_path, allow_unverified=True)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", tmp_path, allow_unverified=True)


def test_a_given_data_dir_is_used_or_refused(tmp_path, monkeypatch):
    """An incomplete set in a data dir the user named is an error naming what is missing,
    not a silent switch to another copy."""
    write_mnist(tmp_path / "debian", seed=1)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (tmp_path / "debian",)})
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"only part of mnist: t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", tmp_path, allow_unverified=True)
    with pytest.raises(FileNotFoundError, match="--data-dir names it, so no other folder"):
        data.load("mnist", tmp_path / "elsewhere", allow_unverified=True)
    monkeypatch.setenv("QMSE_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"\$QMSE_DATA names it"):
        data.load("mnist", allow_unverified=True)


def test_only_the_default_data_dir_falls_back_to_the_system_folder(tmp_path, monkeypatch):
    system = write_mnist(tmp_path / "debian", seed=1)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "debian",)})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds = data.load("fashion-mnist", allow_unverified=True)
    assert ds.source == str(tmp_path / "debian")
    assert torch.equal(ds.train_labels, torch.from_numpy(system["train-labels-idx1-ubyte"]).long())
    default = tmp_path / "home" / ".cache" / "qmse" / "fashion-mnist"
    own = write_mnist(default, seed=2)  # the default folder comes first
    ds = data.load("fashion-mnist", allow_unverified=True)
    assert ds.source == str(default)
    assert torch.equal(ds.test_labels, torch.from_numpy(own["t10k-labels-idx1-ubyte"]).long())


# ---- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    ds = data.load("mnist", tmp_path, allow_unverified=True)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (7, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (4, 1, 28, 28)
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.shape == (7,)
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert "train_images" not in repr(ds)  # no tensor dump in the repr


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    labels = np.zeros(7, np.uint8)
    bad.write_bytes(idx_bytes(2051, labels))  # the images' magic on a labels file
    with pytest.raises(ValueError, match="magic number 2051, expected 2049") as e:
        data.load("mnist", tmp_path, allow_unverified=True)
    assert str(bad) in str(e.value) and "qmse data download mnist" in str(e.value)


def test_idx_truncated_raw_and_gz(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    raw = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as e:
        data.load("mnist", tmp_path, allow_unverified=True)
    assert str(raw) in str(e.value)
    raw.unlink()
    gz = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(bytes(16 + 4 * 784))[:-30])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as e:
        data.load("mnist", tmp_path, allow_unverified=True)
    assert str(gz) in str(e.value)


def test_idx_label_image_count_mismatch(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(2049, np.zeros(6, np.uint8)))
    with pytest.raises(ValueError, match="6 labels but .* holds 7 images") as e:
        data.load("mnist", tmp_path, allow_unverified=True)
    assert str(labels) in str(e.value)


def test_idx_label_out_of_range(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(
        idx_bytes(2049, np.array([0, 1, 10, 2], np.uint8))
    )
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        data.load("mnist", tmp_path, allow_unverified=True)


# ---- CIFAR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [True, False])
def test_cifar10_round_trip(tmp_path, archive):
    arrays = write_cifar(tmp_path, "cifar10", archive=archive)
    ds = data.load("cifar10", tmp_path, allow_unverified=True)
    assert ds.num_classes == 10
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (3, 3, 32, 32)
    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    pixels = np.concatenate([p for p, _ in train])
    labels = sum((lab for _, lab in train), [])
    assert ds.train_labels.tolist() == labels and ds.train_labels.dtype == torch.int64
    assert ds.test_labels.tolist() == arrays["test_batch"][1]
    # Rows are channel-major: 1024 red, then green, then blue values, each row by row.
    i, c, y, x = 4, 2, 5, 17
    assert ds.train_images[i, c, y, x].item() == pixels[i, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(ds.train_images.reshape(15, -1).numpy(), pixels)


def test_cifar100_uses_fine_labels(tmp_path):
    arrays = write_cifar(tmp_path, "cifar100")
    ds = data.load("cifar100", tmp_path, allow_unverified=True)
    assert ds.num_classes == 100
    assert ds.train_labels.tolist() == arrays["train"][1]
    assert ds.test_labels.tolist() == arrays["test"][1]
    np.testing.assert_array_equal(ds.test_images.reshape(3, -1).numpy(), arrays["test"][0])


def test_cifar_truncated_archive(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated") as e:
        data.load("cifar10", tmp_path, allow_unverified=True)
    assert str(path) in str(e.value) and "qmse data download cifar10" in str(e.value)


def test_cifar_archive_missing_member(tmp_path):
    members, _ = cifar_members("cifar10")
    del members["cifar-10-batches-py/data_batch_3"]
    write_cifar(tmp_path, "cifar10", members=members)
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load("cifar10", tmp_path, allow_unverified=True)


def test_cifar_label_count_mismatch(tmp_path):
    members, _ = cifar_members("cifar100")
    pixels = np.zeros((3, 3072), np.uint8)
    members["cifar-100-python/test"] = py2_pickle({b"data": pixels, b"fine_labels": [1, 2]})
    write_cifar(tmp_path, "cifar100", members=members, archive=False)
    with pytest.raises(ValueError, match="2 labels for 3 images") as e:
        data.load("cifar100", tmp_path, allow_unverified=True)
    assert "cifar-100-python: test" in str(e.value)


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_refuses_os_system_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _RunsShell(f"touch {marker}"), "labels": []}, protocol=protocol)
    members, _ = cifar_members("cifar10")
    members["cifar-10-batches-py/data_batch_2"] = evil
    write_cifar(tmp_path, "cifar10", members=members)
    with pytest.raises(ValueError, match=r"global (posix|os)\.system is not allowed") as e:
        data.load("cifar10", tmp_path, allow_unverified=True)
    assert "data_batch_2" in str(e.value)
    with pytest.raises(pickle.UnpicklingError):
        data._CifarUnpickler(io.BytesIO(evil), encoding="bytes").load()
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_unpickler_refuses_other_dtypes_and_globals():
    obj_array = np.array([None], dtype=object)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        data._CifarUnpickler(io.BytesIO(pickle.dumps(obj_array, protocol=2))).load()
    # A real-format pickle with float pixels: numpy.dtype('f8') is refused.
    blob = py2_pickle({b"data": np.zeros((1, 3072), np.uint8)}).replace(b"U\x02u1", b"U\x02f8")
    with pytest.raises(pickle.UnpicklingError, match="dtype b'f8' is not allowed"):
        data._CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    loaded = data._CifarUnpickler(
        io.BytesIO(py2_pickle({b"data": np.arange(3072, dtype=np.uint8).reshape(1, 3072) % 7})),
        encoding="bytes",
    ).load()
    assert loaded[b"data"].dtype == np.uint8 and loaded[b"data"][0, 9] == 2


# ---- verification --------------------------------------------------------------------------


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def _patch_mnist_md5(monkeypatch, folder: Path, mirrors=("http://unused/",)) -> dict[str, bytes]:
    """Make the fixture in `folder` the 'published' MNIST; returns its files' bytes."""
    blobs = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    files = {name: _md5(blob) for name, blob in blobs.items()}
    contents = {n.removesuffix(".gz"): _md5(gzip.decompress(b)) for n, b in blobs.items()}
    monkeypatch.setitem(sources.SOURCES, "mnist", sources.Source(files, tuple(mirrors), 10))
    monkeypatch.setitem(sources.IDX_CONTENT_MD5, "mnist", contents)
    return blobs


def test_status_reports_present_verified_and_mismatch(tmp_path, monkeypatch):
    write_mnist(tmp_path / "published" / "mnist")
    _patch_mnist_md5(monkeypatch, tmp_path / "published" / "mnist")
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for p in (tmp_path / "published" / "mnist").iterdir():  # a gunzipped copy verifies by content
        (root / "mnist" / p.name.removesuffix(".gz")).write_bytes(gzip.decompress(p.read_bytes()))
    write_cifar(root, "cifar10", archive=False)
    write_cifar(root, "cifar100")  # its MD5 is not the published one
    rows = {r["name"]: r for r in download.status(root)}
    assert rows["mnist"]["present"] and rows["mnist"]["verified"] is True
    assert rows["fashion-mnist"]["present"] is False
    assert rows["cifar10"]["present"] and rows["cifar10"]["verified"] is False  # fixture bytes
    assert "data_batch_1" in rows["cifar10"]["detail"]  # an extracted folder: member by member
    members = root / "cifar10" / "cifar-10-batches-py"
    monkeypatch.setitem(  # publish the fixture's members: the folder verifies
        sources.MEMBER_MD5, "cifar10", {p.name: _md5(p.read_bytes()) for p in members.iterdir()}
    )
    assert next(r for r in download.status(root) if r["name"] == "cifar10")["verified"] is True
    assert rows["cifar100"]["verified"] is False and "MD5 mismatch" in rows["cifar100"]["detail"]
    (root / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(2049, np.ones(4, np.uint8)))
    mnist = next(r for r in download.status(root) if r["name"] == "mnist")
    assert mnist["verified"] is False and "t10k-labels-idx1-ubyte" in mnist["detail"]


def test_a_file_that_differs_from_the_published_one_is_refused(tmp_path, monkeypatch):
    """500 labels set to 0 leave a well-formed file: only its MD5 tells."""
    write_mnist(tmp_path / "mnist", n_train=600)
    blobs = _patch_mnist_md5(monkeypatch, tmp_path / "mnist")
    ds = data.load("mnist", tmp_path)
    assert all(f["verified"] for f in ds.files.values()) and len(ds.files) == 4
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    assert ds.files[str(labels)]["md5"] == _md5(blobs[labels.name])
    poisoned = data.read_bytes(labels, "mnist")
    labels.write_bytes(gzip.compress(poisoned[:8] + bytes(500) + poisoned[508:]))
    with pytest.raises(ValueError, match=rf"{labels}: MD5 \w+ is not the published.*--allow-unv"):
        data.load("mnist", tmp_path)
    ds = data.load("mnist", tmp_path, allow_unverified=True)
    assert ds.files[str(labels)]["verified"] is False and (ds.train_labels[:500] == 0).all()


def test_md5s_are_cached_by_a_stamp_an_edit_in_place_cannot_fake(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist")
    _patch_mnist_md5(monkeypatch, tmp_path / "mnist")
    hashed = []
    real = data.file_md5
    monkeypatch.setattr(data, "file_md5", lambda p: hashed.append(p.name) or real(p))
    data.load("mnist", tmp_path)
    assert len(hashed) == 4  # each file once
    cache = sources.md5_cache_path()
    assert (
        cache.is_file()
        and str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in cache.read_text()
    )
    data.load("mnist", tmp_path)
    assert len(hashed) == 4  # nothing hashed again
    images = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    original = images.read_bytes()
    blob = gzip.decompress(original)
    images.write_bytes(gzip.compress(blob[:-1] + bytes([blob[-1] ^ 1]), mtime=0))  # same size
    os.utime(images, ns=(0, images.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="t10k-images.*is not the published"):
        data.load("mnist", tmp_path)  # the stale entry is not used
    assert hashed[4:] == ["t10k-images-idx3-ubyte.gz"]
    images.write_bytes(original)
    data.load("mnist", tmp_path)
    # an edit in place with its size and modification time restored is still seen (ctime)
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    before = labels.stat()
    blob = gzip.decompress(labels.read_bytes())
    edited = gzip.compress(blob[:-1] + bytes([blob[-1] ^ 1]), mtime=0)
    assert len(edited) == before.st_size
    with open(labels, "r+b") as f:  # same inode, same size
        f.write(edited)
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert labels.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(ValueError, match="t10k-labels.*is not the published"):
        data.load("mnist", tmp_path)


def test_an_extracted_cifar_folder_is_checked_member_by_member(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar100", archive=False)
    with pytest.raises(ValueError, match=r"cifar-100-python/train: MD5 .* not the published"):
        data.load("cifar100", tmp_path)
    folder = tmp_path / "cifar100" / "cifar-100-python"
    published = {m: _md5((folder / m).read_bytes()) for m in ("train", "test")}
    monkeypatch.setitem(sources.MEMBER_MD5, "cifar100", published)
    ds = data.load("cifar100", tmp_path)
    assert {Path(p).name: f["verified"] for p, f in ds.files.items()} == {
        "train": True,
        "test": True,
    }


# ---- download ------------------------------------------------------------------------------


class _Server:
    """A loopback HTTP server for `files`, with per-file scripted misbehaviour.

    plan[name] is a list of actions consumed one per request: "ok", "truncate" (announce
    the full length, send half, hang up), "no-range" (ignore Range), "500", "404".
    """

    def __init__(self, files: dict[str, bytes], plan: dict[str, list[str]] | None = None):
        self.files, self.plan, self.log = files, plan or {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.log.append((self.path, rng))
                actions = server.plan.get(name, [])
                action = actions.pop(0) if actions else "ok"
                if action in ("404", "500") or name not in server.files:
                    self.send_error(404 if action != "500" else 500)
                    return
                body, start = server.files[name], 0
                if rng and action != "no-range":
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                if action == "truncate":
                    self.wfile.write(rest[: len(rest) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A fixture MNIST 'published' by a loopback server at <url>/m/; yields (server, blobs)."""
    write_mnist(tmp_path / "published" / "mnist")
    server = _Server({})
    blobs = _patch_mnist_md5(monkeypatch, tmp_path / "published" / "mnist", [f"{server.url}/m/"])
    server.files.update(blobs)
    yield server, blobs
    server.close()


def _assert_downloaded(folder: Path, blobs: dict[str, bytes]):
    assert sorted(p.name for p in folder.iterdir()) == sorted(blobs)  # no .part left
    for name, blob in blobs.items():
        assert (folder / name).read_bytes() == blob


def test_download_then_load(tmp_path, published):
    server, blobs = published
    folder = download.download("mnist", tmp_path / "data")
    assert folder == tmp_path / "data" / "mnist"
    _assert_downloaded(folder, blobs)
    assert data.load("mnist", tmp_path / "data").train_images.shape == (7, 1, 28, 28)
    assert len(server.log) == 4
    download.download("mnist", tmp_path / "data")  # verified files are kept, not fetched again
    assert len(server.log) == 4


def test_download_checksum_mismatch_keeps_nothing(tmp_path, published):
    server, blobs = published
    server.files["train-labels-idx1-ubyte.gz"] = b"not the published bytes"
    with pytest.raises(RuntimeError, match="MD5 .*expected") as e:
        download.download("mnist", tmp_path / "data", retries=1)
    assert "by hand" in str(e.value) and str(tmp_path / "data" / "mnist") in str(e.value)
    folder = tmp_path / "data" / "mnist"
    assert not (folder / "train-labels-idx1-ubyte.gz").exists()
    assert not (folder / ".train-labels-idx1-ubyte.gz.part").exists()
    labels_requests = [p for p, _ in server.log if p.endswith("train-labels-idx1-ubyte.gz")]
    assert len(labels_requests) == 2  # first try and one retry


def test_download_resumes_a_truncated_transfer_with_range(tmp_path, published):
    server, blobs = published
    name = "train-images-idx3-ubyte.gz"
    server.plan[name] = ["truncate"]
    download.download("mnist", tmp_path / "data")
    _assert_downloaded(tmp_path / "data" / "mnist", blobs)
    ranges = [r for p, r in server.log if p.endswith(name)]
    assert ranges == [None, f"bytes={len(blobs[name]) // 2}-"]


def test_download_restarts_when_the_server_ignores_range(tmp_path, published):
    server, blobs = published
    name = "t10k-images-idx3-ubyte.gz"
    server.plan[name] = ["truncate", "no-range"]
    download.download("mnist", tmp_path / "data")
    _assert_downloaded(tmp_path / "data" / "mnist", blobs)
    assert len([p for p, _ in server.log if p.endswith(name)]) == 2


def test_download_resumes_a_part_left_by_a_killed_run(tmp_path, published):
    server, blobs = published
    name = "train-images-idx3-ubyte.gz"
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / f".{name}.part").write_bytes(blobs[name][:100])
    download.download("mnist", tmp_path / "data")
    _assert_downloaded(folder, blobs)
    assert (f"/m/{name}", "bytes=100-") in server.log


def test_download_restarts_a_stale_part_longer_than_the_file(tmp_path, published):
    server, blobs = published
    name = "t10k-labels-idx1-ubyte.gz"
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / f".{name}.part").write_bytes(bytes(len(blobs[name]) + 10))
    download.download("mnist", tmp_path / "data")  # HTTP 416 for the Range: start over
    _assert_downloaded(folder, blobs)
    assert [r for p, r in server.log if p.endswith(name)] == [
        f"bytes={len(blobs[name]) + 10}-",
        None,
    ]


def test_download_cifar_archive_then_load(tmp_path, monkeypatch):
    members, arrays = cifar_members("cifar100")
    blob = tar_gz(members)
    server = _Server({"cifar-100-python.tar.gz": blob}, {"cifar-100-python.tar.gz": ["truncate"]})
    try:
        source = sources.Source({"cifar-100-python.tar.gz": _md5(blob)}, (server.url,), 100)
        monkeypatch.setitem(sources.SOURCES, "cifar100", source)
        download.download("cifar100", tmp_path)
    finally:
        server.close()
    ds = data.load("cifar100", tmp_path)
    assert ds.train_labels.tolist() == arrays["train"][1]
    assert next(r for r in download.status(tmp_path) if r["name"] == "cifar100")["verified"] is True


def test_download_retries_server_errors_and_falls_back_to_the_next_mirror(tmp_path, published):
    server, blobs = published
    server.plan["train-labels-idx1-ubyte.gz"] = ["500"]
    server.plan["t10k-labels-idx1-ubyte.gz"] = ["404"]  # permanent: go to the next mirror
    download.download("mnist", tmp_path / "data", mirrors=[f"{server.url}/a", f"{server.url}/b/"])
    _assert_downloaded(tmp_path / "data" / "mnist", blobs)
    paths = [p for p, _ in server.log]
    assert paths.count("/a/train-labels-idx1-ubyte.gz") == 2
    assert paths.count("/a/t10k-labels-idx1-ubyte.gz") == 1
    assert paths.count("/b/t10k-labels-idx1-ubyte.gz") == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_without_network_fails_fast_with_instructions(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    port = _closed_port()
    mirrors = [f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"]
    with pytest.raises(RuntimeError, match="unreachable") as e:
        download.download("cifar10", tmp_path, mirrors=mirrors, retries=5)
    msg = str(e.value)
    assert msg.count("unreachable") == 2  # each mirror tried once, no retries
    assert waits == []
    assert "by hand" in msg and str(tmp_path / "cifar10") in msg
    assert "cifar-10-python.tar.gz (MD5 c58f30108f718f92721af3b95e74349a)" in msg


def test_download_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="retries=-1"):
        download.download("mnist", tmp_path, retries=-1)
    with pytest.raises(ValueError, match="timeout=0"):
        download.download("mnist", tmp_path, timeout=0)


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_data_download_and_list(tmp_path, published, capsys):
    server, _ = published
    root = str(tmp_path / "data")
    assert (
        main(["data", "download", "mnist", "--data-dir", root, "--mirror", server.url + "/m"]) == 0
    )
    assert main(["data", "list", "--data-dir", root]) == 0
    out = capsys.readouterr().out
    mnist = next(line for line in out.splitlines() if line.startswith("mnist"))
    assert "verified" in mnist and str(tmp_path / "data" / "mnist") in mnist
    cifar = next(line for line in out.splitlines() if line.startswith("cifar10"))
    assert "missing" in cifar and "qmse data download cifar10" in cifar
    port = _closed_port()
    mirror = f"http://127.0.0.1:{port}/"
    assert main(["data", "download", "cifar100", "--data-dir", root, "--mirror", mirror]) == 2
    assert "by hand" in capsys.readouterr().err


# ---- the real Fashion-MNIST ------------------------------------------------------------------

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="not installed")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion-mnist": (DEBIAN,)})
    monkeypatch.setenv("HOME", str(tmp_path))  # the default data dir, empty: Debian's is used
    ds = data.load("fashion-mnist")
    assert len(ds.files) == 4 and all(f["verified"] for f in ds.files.values())  # by content
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (
        10000,
        1,
        28,
        28,
    )
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert torch.equal(ds.train_labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(ds.test_labels.bincount(), torch.full((10,), 1000))
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    row = next(r for r in download.status() if r["name"] == "fashion-mnist")
    assert row["present"] and row["verified"] is True, row  # Debian re-gzipped: content MD5
