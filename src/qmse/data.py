"""The paper's image datasets (section 4) as uint8 tensors, read from the official files.

MNIST and Fashion-MNIST are four IDX files each (gzipped or raw); CIFAR-10 and CIFAR-100
are the official `*-python.tar.gz` archives of Python 2 pickles, read in place or from
their extracted folder with an unpickler that accepts nothing but uint8 numpy arrays. No
torchvision. Files live in `<data dir>/<name>/`, the data dir being `--data-dir`, else
`$QMSE_DATA`, else `~/.cache/qmse`; Fashion-MNIST is also found where Debian's
`dataset-fashion-mnist` package puts it.

`download` fetches the official files from their mirrors, resumes an interrupted transfer
with an HTTP Range request, checks the published MD5 and renames the file into place, so a
kill never leaves a half file under the real name. Batching and normalisation belong to
the trainer, not here.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import re
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from qmse.runs import progress

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")


class Source(NamedTuple):
    """A dataset's published files with their MD5s, the mirrors serving them, its classes."""

    files: dict[str, str]
    mirrors: tuple[str, ...]
    num_classes: int


# File names and MD5s as the datasets' own pages and torchvision publish them.
SOURCES: dict[str, Source] = {
    "mnist": Source(
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        10,
    ),
    "fashion-mnist": Source(
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        10,
    ),
    "cifar10": Source(
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        ("https://www.cs.toronto.edu/~kriz/",),
        10,
    ),
    "cifar100": Source(
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        ("https://www.cs.toronto.edu/~kriz/",),
        100,
    ),
}

# MD5s of the decompressed IDX files, so that a re-compressed copy (Debian's Fashion-MNIST
# .gz files differ from the published ones byte for byte, not in content) or a gunzipped
# one still verifies.
IDX_CONTENT_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

# Folders searched after `<data dir>/<name>/`: where system packages install a dataset.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

RETRY_WAIT_S = 1.0  # retry k of a mirror waits k * RETRY_WAIT_S seconds first
_USER_AGENT = "qmse-data (python urllib)"

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x0803 (uint8, 3 dims), 0x0801 (1 dim)


class _CifarLayout(NamedTuple):
    folder: str  # top folder inside the archive
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes  # CIFAR-100: its 100 fine labels, as in the paper


_CIFAR = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
    ),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels"),
}


@dataclass
class Dataset:
    """A labelled image dataset: images uint8 (N, Ch, H, W), labels int64 (N,) in [0, C)."""

    name: str
    train_images: Tensor = field(repr=False)
    train_labels: Tensor = field(repr=False)
    test_images: Tensor = field(repr=False)
    test_labels: Tensor = field(repr=False)
    num_classes: int
    source: str = ""  # the folder or archive it was read from, for provenance


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: `data_dir` if given, else `$QMSE_DATA`, else `~/.cache/qmse`."""
    if data_dir is not None and str(data_dir):
        return Path(data_dir).expanduser()
    env = os.environ.get("QMSE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qmse"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"dataset name={name!r} is not supported; expected one of {DATASETS}")


def _fix(name: str) -> str:
    """How to replace a bad file: the end of every corrupt-file message."""
    return (
        f"delete it and run `qmse data download {name}`, or replace it with the official "
        f"file (`qmse data list` checks MD5s)"
    )


def _missing(name: str, searched: list[Path]) -> FileNotFoundError:
    source = SOURCES[name]
    if name in _CIFAR:
        (archive,) = source.files
        wanted = f"{archive} (or its extracted folder {_CIFAR[name].folder}/)"
    else:
        wanted = ", ".join(source.files) + " (gzipped or not)"
    debian = (
        "; on Debian/Ubuntu `apt install dataset-fashion-mnist` provides it"
        if name == "fashion-mnist"
        else ""
    )
    return FileNotFoundError(
        f"{name} not found (looked in {', '.join(str(p) for p in searched)}). Run "
        f"`qmse data download {name}` (it honours --data-dir and $QMSE_DATA), or put "
        f"{wanted} in {searched[0]}/ by hand, from {source.mirrors[0]}{debian}"
    )


def _locate(name: str, data_dir: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    """(where the dataset is, its files): the first folder holding all of them."""
    folder = resolve_data_dir(data_dir) / name
    if name in _CIFAR:
        (archive,) = SOURCES[name].files
        for path in (folder / archive, folder / _CIFAR[name].folder):
            if path.exists():
                return path, [path]
        raise _missing(name, [folder])
    searched = [folder, *SYSTEM_DIRS.get(name, ())]
    for candidate in searched:
        found = []
        for base in _IDX_FILES:
            paths = [p for p in (candidate / f"{base}.gz", candidate / base) if p.is_file()]
            found += paths[:1]
        if len(found) == len(_IDX_FILES):
            return candidate, found
    raise _missing(name, searched)


# ---- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------


def _read_bytes(path: Path, name: str) -> bytes:
    """The file's bytes, gunzipped if it is gzip (recognised by content, not by name)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(
            f"{path}: corrupt or truncated gzip ({type(e).__name__}: {e}); {_fix(name)}"
        ) from e


def _read_idx(path: Path, name: str, magic: int, ndim: int) -> np.ndarray:
    """An IDX file of uint8 as an array: big-endian int32 magic, `ndim` sizes, then data."""
    data = _read_bytes(path, name)
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ValueError(
            f"{path}: {len(data)} bytes, too short for an IDX header of {header}; {_fix(name)}"
        )
    seen, *dims = struct.unpack(f">{1 + ndim}i", data[:header])
    if seen != magic:
        kind = "images" if magic == _IDX_IMAGES else "labels"
        raise ValueError(
            f"{path}: IDX magic number {seen}, expected {magic} ({kind}); it is not an "
            f"MNIST-format {kind} file or it is corrupt; {_fix(name)}"
        )
    if min(dims) < 0:
        raise ValueError(f"{path}: negative sizes {dims} in its IDX header; {_fix(name)}")
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{path}: {len(data)} bytes but its header (sizes {dims}) implies {expected}: the "
            f"file is {what}; {_fix(name)}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _labels(labels: np.ndarray, where: str, num_classes: int, name: str) -> Tensor:
    """Labels as int64 (N,), checked to lie in [0, num_classes)."""
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}) "
            f"for {name}; {_fix(name)}"
        )
    return torch.from_numpy(labels)


def _load_idx(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    folder, paths = _locate(name, data_dir)
    by_base = {p.name.removesuffix(".gz"): p for p in paths}
    num_classes = SOURCES[name].num_classes

    def split(prefix: str) -> tuple[Tensor, Tensor]:
        image_path = by_base[f"{prefix}-images-idx3-ubyte"]
        label_path = by_base[f"{prefix}-labels-idx1-ubyte"]
        images = _read_idx(image_path, name, _IDX_IMAGES, 3)  # (N, H, W)
        labels = _read_idx(label_path, name, _IDX_LABELS, 1)  # (N,)
        if len(labels) != len(images):
            raise ValueError(
                f"{label_path}: {len(labels)} labels but {image_path} holds {len(images)} "
                f"images; the two files come from different releases or one is damaged; "
                f"{_fix(name)}"
            )
        images_t = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W)
        return images_t, _labels(labels, str(label_path), num_classes, name)

    train_images, train_labels = split("train")
    test_images, test_labels = split("t10k")
    return Dataset(
        name, train_images, train_labels, test_images, test_labels, num_classes, str(folder)
    )


# ---- CIFAR ---------------------------------------------------------------------------------


def _uint8_dtype(spec: str | bytes, align: int = 0, copy: int = 1) -> np.dtype:
    """Stands in for `numpy.dtype` while unpickling: only uint8, the CIFAR pixels, exists."""
    if spec not in ("u1", b"u1"):
        raise pickle.UnpicklingError(f"dtype {spec!r} is not allowed in a CIFAR pickle")
    return np.dtype("u1", align=bool(align), copy=True)


def _empty_ndarray(subtype: type, shape: tuple, typecode: bytes) -> np.ndarray:
    """Stands in for numpy's `_reconstruct`: a plain empty array that BUILD then fills."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed")
    return np.empty(0, np.uint8)


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _empty_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _empty_ndarray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _uint8_dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR files hold: dicts, lists, strings, ints, uint8 arrays.

    Every other global (os.system, builtins.eval, ...) is refused before it is imported,
    so a crafted file cannot run code; the array globals are replaced by the checked
    stand-ins above.
    """

    def find_class(self, module: str, name: str) -> object:
        allowed = _PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return allowed


def _unpickle_batch(
    blob: bytes, where: str, name: str, label_key: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: data uint8 (N, 3072) and labels (N,)."""
    try:
        # Written by Python 2: its str become bytes (keys b"data", ...), as CIFAR's page says.
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any failure to parse untrusted bytes means a bad file
        raise ValueError(
            f"{where}: refused or corrupt pickle ({type(e).__name__}: {e}); {_fix(name)}"
        ) from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{where}: not a {name} batch (expected keys b'data' and {label_key!r}, got "
            f"{keys}); {_fix(name)}"
        )
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"{where}: b'data' is {shape}, expected (N, 3072) uint8; {_fix(name)}")
    if not isinstance(labels, list) or not all(type(x) is int for x in labels):
        raise ValueError(f"{where}: {label_key!r} is not a list of ints; {_fix(name)}")
    if len(labels) != len(data):
        raise ValueError(f"{where}: {len(labels)} labels for {len(data)} images; {_fix(name)}")
    return data, np.asarray(labels, dtype=np.int64)


def _cifar_members(path: Path, name: str) -> dict[str, bytes]:
    """The batch files' bytes, by member name, from the archive or its extracted folder."""
    layout = _CIFAR[name]
    members = layout.train + layout.test
    if path.is_dir():
        missing = [m for m in members if not (path / m).is_file()]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}: the extracted folder is incomplete; {_fix(name)}"
            )
        return {m: (path / m).read_bytes() for m in members}
    wanted = {f"{layout.folder}/{m}": m for m in members}
    blobs = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:  # one pass: a .tar.gz cannot seek cheaply
                if info.name in wanted and info.isfile():
                    blobs[wanted[info.name]] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(
            f"{path}: unreadable archive ({type(e).__name__}: {e}); it is truncated or "
            f"corrupt; {_fix(name)}"
        ) from e
    missing = [m for m in wanted if wanted[m] not in blobs]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: not the official archive or truncated; {_fix(name)}"
        )
    return blobs


def _load_cifar(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    path, _ = _locate(name, data_dir)
    layout = _CIFAR[name]
    blobs = _cifar_members(path, name)
    num_classes = SOURCES[name].num_classes

    def split(members: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        batches = [
            _unpickle_batch(blobs[m], f"{path}: {m}", name, layout.label_key) for m in members
        ]
        data = np.concatenate([d for d, _ in batches])  # (N, 3072), rows channel-major
        labels = np.concatenate([lab for _, lab in batches])  # (N,)
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
        return images, _labels(labels, f"{path}: {', '.join(members)}", num_classes, name)

    train_images, train_labels = split(layout.train)
    test_images, test_labels = split(layout.test)
    return Dataset(
        name, train_images, train_labels, test_images, test_labels, num_classes, str(path)
    )


def load(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Read dataset `name` from `<data dir>/<name>/` into tensors.

    MNIST-style: images (N, 1, 28, 28); CIFAR: (N, 3, 32, 32); uint8, labels int64. Files
    are checked for structure (magic numbers, sizes, label counts and range), not MD5
    (`status` does that). Missing files raise FileNotFoundError saying where to put them;
    corrupt ones ValueError naming the file and the fix.
    """
    _check_name(name)
    return _load_cifar(name, data_dir) if name in _CIFAR else _load_idx(name, data_dir)


# ---- verification and download -------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(name: str, path: Path) -> bool | None:
    """Whether `path` is the published file: by its MD5, or for IDX files by the MD5 of its
    content (a re-compressed or gunzipped copy counts). None where nothing is published
    (an extracted CIFAR folder)."""
    if path.is_dir():
        return None
    published = SOURCES[name].files.get(path.name)
    if published is not None and _md5(path) == published:
        return True
    content = IDX_CONTENT_MD5.get(name, {}).get(path.name.removesuffix(".gz"))
    if content is None:
        return False if published is not None else None
    try:
        data = _read_bytes(path, name)
    except ValueError:
        return False
    return hashlib.md5(data, usedforsecurity=False).hexdigest() == content


def status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per dataset for `qmse data list`: name, present, verified (True/False, or
    None where no checksum is published), location, detail."""
    rows = []
    for name in DATASETS:
        try:
            location, paths = _locate(name, data_dir)
        except FileNotFoundError:
            folder = resolve_data_dir(data_dir) / name
            rows.append(
                dict(
                    name=name,
                    present=False,
                    verified=False,
                    location=str(folder),
                    detail=f"run `qmse data download {name}`",
                )
            )
            continue
        checks = {p: _verify(name, p) for p in paths}
        bad = [p.name for p, ok in checks.items() if ok is False]
        if bad:
            verified, detail = False, f"MD5 mismatch: {', '.join(bad)}"
        elif None in checks.values():
            verified, detail = None, "extracted folder: no published MD5 to check"
        else:
            verified, detail = True, f"{len(paths)} file(s) match the published MD5"
        rows.append(
            dict(name=name, present=True, verified=verified, location=str(location), detail=detail)
        )
    return rows


def _receive(response: http.client.HTTPResponse, part: Path, have: int) -> None:
    """Append the response body to `part` (a 206 continuing at byte `have`), or restart it
    (a 200: the server ignored the Range). Raises IncompleteRead if the body is short."""
    if response.status == 206:
        start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if start is None or int(start.group(1)) != have:
            part.unlink(missing_ok=True)
            raise http.client.HTTPException(
                f"Content-Range {response.headers.get('Content-Range')!r} does not continue "
                f"at byte {have}"
            )
    else:
        have = 0
    length = response.headers.get("Content-Length")
    total = have + int(length) if length is not None else None
    with (
        open(part, "ab" if have else "wb") as f,
        progress(total=total, initial=have, unit="B", unit_scale=True, desc=part.name) as bar,
    ):
        while chunk := response.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def _fetch(
    name: str, filename: str, md5: str, dest: Path, urls: list[str], retries: int, timeout: float
) -> None:
    """Download one file into `dest` via `.<filename>.part`, trying mirrors in order."""
    part = dest.with_name(f".{filename}.part")
    if part.is_file() and _md5(part) == md5:  # a run killed just before its rename
        os.replace(part, dest)
        return
    errors = []
    for base in urls:
        url = f"{base.rstrip('/')}/{filename}"
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(RETRY_WAIT_S * attempt)
            have = part.stat().st_size if part.exists() else 0
            headers = {"User-Agent": _USER_AGENT}
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                response = urllib.request.urlopen(
                    urllib.request.Request(url, headers=headers), timeout=timeout
                )
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
                if e.code == 416:  # our partial file is no prefix of theirs: start over
                    part.unlink(missing_ok=True)
                    continue
                if e.code < 500 and e.code != 429:
                    break  # permanent on this mirror (404, 403, ...)
                continue
            except (OSError, http.client.HTTPException) as e:  # DNS, refused, timeout, bad reply
                errors.append(f"{url}: unreachable ({getattr(e, 'reason', e)})")
                if attempt == 0:
                    break
                continue
            try:
                with response:
                    _receive(response, part, have)
            except (OSError, http.client.HTTPException) as e:  # keep the part, resume it
                errors.append(f"{url}: interrupted ({type(e).__name__}: {e})")
                continue
            got = _md5(part)
            if got == md5:
                os.replace(part, dest)
                return
            part.unlink()
            errors.append(f"{url}: MD5 {got}, expected {md5} (corrupt transfer or wrong file)")
    raise RuntimeError(
        f"could not download {filename} for {name}:\n  "
        + "\n  ".join(errors)
        + f"\nPut the official files by hand in {dest.parent}/: "
        + ", ".join(f"{f} (MD5 {m})" for f, m in SOURCES[name].files.items())
        + f", from {SOURCES[name].mirrors[0]} or another mirror; `qmse data list` checks them."
        + (
            " On Debian/Ubuntu `apt install dataset-fashion-mnist` also works."
            if name == "fashion-mnist"
            else ""
        )
    )


def download(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    mirrors: list[str] | None = None,
    retries: int = 3,
    timeout: float = 10.0,
) -> Path:
    """Fetch dataset `name`'s official files into `<data dir>/<name>/` and return that folder.

    Files already there with the right MD5 are kept. Each other file is tried on `mirrors`
    (base URLs; default the official ones) in order: written to a hidden `.part` file that
    an interrupted transfer resumes with an HTTP Range request (or restarts if the server
    ignores it), checked against the published MD5, then renamed into place atomically. A
    mirror is retried `retries` times after a failed transfer, but dropped at once when it
    cannot be reached, so with no network this fails in about `timeout` seconds per mirror
    (`timeout` also bounds each wait for data), with a RuntimeError that says where to put
    the files by hand.
    """
    _check_name(name)
    if retries < 0:
        raise ValueError(f"retries={retries} must be >= 0")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    urls = list(mirrors) if mirrors else list(SOURCES[name].mirrors)
    folder = resolve_data_dir(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in SOURCES[name].files.items():
        dest = folder / filename
        if dest.is_file() and _verify(name, dest):
            continue
        _fetch(name, filename, md5, dest, urls, retries, timeout)
    return folder
