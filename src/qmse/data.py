"""The paper's image datasets (section 4) as uint8 tensors, read from the official files.

MNIST and Fashion-MNIST are four IDX files each (gzipped or raw); CIFAR-10 and CIFAR-100
are the official `*-python.tar.gz` archives of Python 2 pickles, read in place or from
their extracted folder with an unpickler that accepts nothing but uint8 numpy arrays. No
torchvision. Files live in `<data dir>/<name>/`, the data dir being `--data-dir`, else
`$QMSE_DATA`, else `~/.cache/qmse`; Fashion-MNIST is also found where Debian's
`dataset-fashion-mnist` package puts it, unless a data dir was given. Every file read is
checked against its published MD5 (`qmse.sources`) and recorded; fetching the files is
`qmse.download`'s. Batching and normalisation belong to the
trainer, not here.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.sources import (
    DATASETS,
    IDX_CONTENT_MD5,
    MEMBER_MD5,
    SOURCES,
    bytes_md5,
    digests,
    file_md5,
)

# Folders searched after `<data dir>/<name>/`: where system packages install a dataset.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

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
    files: dict[str, dict] = field(default_factory=dict, repr=False)  # path -> md5, verified


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: `data_dir` if given, else `$QMSE_DATA`, else `~/.cache/qmse`."""
    if data_dir is not None and str(data_dir):
        return Path(data_dir).expanduser()
    env = os.environ.get("QMSE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qmse"


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"dataset name={name!r} is not supported; expected one of {DATASETS}")


def _fix(name: str) -> str:
    """How to replace a bad file: the end of every corrupt-file message."""
    return (
        f"delete it and run `qmse data download {name}`, or replace it with the official "
        f"file (`qmse data list` checks MD5s)"
    )


def _given(data_dir: str | os.PathLike | None) -> str | None:
    """How the user named the data folder ("--data-dir", "$QMSE_DATA"), or None."""
    if data_dir is not None and str(data_dir):
        return "--data-dir"
    return "$QMSE_DATA" if os.environ.get("QMSE_DATA") else None


def _missing(name: str, searched: list[Path], given: str | None) -> FileNotFoundError:
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
    only = f"; {given} names it, so no other folder is searched" if given else ""
    return FileNotFoundError(
        f"{name} not found (looked in {', '.join(str(p) for p in searched)}{only}). Run "
        f"`qmse data download {name}` (it honours --data-dir and $QMSE_DATA), or put "
        f"{wanted} in {searched[0]}/ by hand, from {source.mirrors[0]}{debian}"
    )


def locate(name: str, data_dir: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    """(where the dataset is, its files) in `<data dir>/<name>/`. A data dir given by the user
    (`data_dir`, or $QMSE_DATA) is used or refused: an incomplete set there is an error
    naming the missing files. Only the default one (~/.cache/qmse) falls back to the
    folders of system packages (SYSTEM_DIRS)."""
    given = _given(data_dir)
    folder = resolve_data_dir(data_dir) / name
    if name in _CIFAR:
        (archive,) = SOURCES[name].files
        for path in (folder / archive, folder / _CIFAR[name].folder):
            if path.exists():
                return path, [path]
        raise _missing(name, [folder], given)
    searched = [folder] if given else [folder, *SYSTEM_DIRS.get(name, ())]
    for candidate in searched:
        found, missing = [], []
        for base in _IDX_FILES:
            paths = [p for p in (candidate / f"{base}.gz", candidate / base) if p.is_file()]
            found += paths[:1]
            missing += [] if paths else [f"{base}.gz"]
        if not missing:
            return candidate, found
        if given and found:
            raise FileNotFoundError(
                f"{candidate} (named by {given}) holds only part of {name}: {', '.join(missing)} "
                f"missing; run `qmse data download {name} --data-dir {resolve_data_dir(data_dir)}` "
                f"or put the missing files there"
            )
    raise _missing(name, searched, given)


# ---- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------


def read_bytes(path: Path, name: str) -> bytes:
    """The file's bytes, gunzipped if it is gzip (recognised by content, not by name)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(
            f"{path}: corrupt or truncated gzip ({type(e).__name__}: {e}); {_fix(name)}"
        ) from e


def _read_idx(path: Path, name: str, magic: int, ndim: int) -> np.ndarray:
    """An IDX file of uint8 as an array: big-endian int32 magic, `ndim` sizes, then data."""
    data = read_bytes(path, name)
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise UserError(
            f"{path}: {len(data)} bytes, too short for an IDX header of {header}; {_fix(name)}"
        )
    seen, *dims = struct.unpack(f">{1 + ndim}i", data[:header])
    if seen != magic:
        kind = "images" if magic == _IDX_IMAGES else "labels"
        raise UserError(
            f"{path}: IDX magic number {seen}, expected {magic} ({kind}); it is not an "
            f"MNIST-format {kind} file or it is corrupt; {_fix(name)}"
        )
    if min(dims) < 0:
        raise UserError(f"{path}: negative sizes {dims} in its IDX header; {_fix(name)}")
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(
            f"{path}: {len(data)} bytes but its header (sizes {dims}) implies {expected}: the "
            f"file is {what}; {_fix(name)}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _labels(labels: np.ndarray, where: str, num_classes: int, name: str) -> Tensor:
    """Labels as int64 (N,), checked to lie in [0, num_classes)."""
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{where}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}) "
            f"for {name}; {_fix(name)}"
        )
    return torch.from_numpy(labels)


def _load_idx(name: str, data_dir: str | os.PathLike | None) -> tuple[Dataset, list[Path]]:
    """The dataset and the files it was read from."""
    folder, paths = locate(name, data_dir)
    by_base = {p.name.removesuffix(".gz"): p for p in paths}
    num_classes = SOURCES[name].num_classes

    def split(prefix: str) -> tuple[Tensor, Tensor]:
        image_path = by_base[f"{prefix}-images-idx3-ubyte"]
        label_path = by_base[f"{prefix}-labels-idx1-ubyte"]
        images = _read_idx(image_path, name, _IDX_IMAGES, 3)  # (N, H, W)
        labels = _read_idx(label_path, name, _IDX_LABELS, 1)  # (N,)
        if len(labels) != len(images):
            raise UserError(
                f"{label_path}: {len(labels)} labels but {image_path} holds {len(images)} "
                f"images; the two files come from different releases or one is damaged; "
                f"{_fix(name)}"
            )
        images_t = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W)
        return images_t, _labels(labels, str(label_path), num_classes, name)

    train_images, train_labels = split("train")
    test_images, test_labels = split("t10k")
    dataset = Dataset(
        name, train_images, train_labels, test_images, test_labels, num_classes, str(folder)
    )
    return dataset, paths


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
        raise UserError(
            f"{where}: refused or corrupt pickle ({type(e).__name__}: {e}); {_fix(name)}"
        ) from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(
            f"{where}: not a {name} batch (expected keys b'data' and {label_key!r}, got "
            f"{keys}); {_fix(name)}"
        )
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise UserError(f"{where}: b'data' is {shape}, expected (N, 3072) uint8; {_fix(name)}")
    if not isinstance(labels, list) or not all(type(x) is int for x in labels):
        raise UserError(f"{where}: {label_key!r} is not a list of ints; {_fix(name)}")
    if len(labels) != len(data):
        raise UserError(f"{where}: {len(labels)} labels for {len(data)} images; {_fix(name)}")
    return data, np.asarray(labels, dtype=np.int64)


def _cifar_members(path: Path, name: str) -> dict[str, bytes]:
    """The batch files' bytes, by member name, from the archive or its extracted folder."""
    layout = _CIFAR[name]
    members = layout.train + layout.test
    if path.is_dir():
        missing = [m for m in members if not (path / m).is_file()]
        if missing:
            raise UserError(
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
        raise UserError(
            f"{path}: unreadable archive ({type(e).__name__}: {e}); it is truncated or "
            f"corrupt; {_fix(name)}"
        ) from e
    missing = [m for m in wanted if wanted[m] not in blobs]
    if missing:
        raise UserError(
            f"{path} lacks {missing}: not the official archive or truncated; {_fix(name)}"
        )
    return blobs


def _load_cifar(name: str, data_dir: str | os.PathLike | None) -> tuple[Dataset, list[Path]]:
    """The dataset and the files it was read from (the archive, or the folder's members)."""
    path, _ = locate(name, data_dir)
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
    dataset = Dataset(
        name, train_images, train_labels, test_images, test_labels, num_classes, str(path)
    )
    read = [path / m for m in layout.train + layout.test] if path.is_dir() else [path]
    return dataset, read


def load(
    name: str, data_dir: str | os.PathLike | None = None, *, allow_unverified: bool = False
) -> Dataset:
    """Read dataset `name` from `<data dir>/<name>/` (see `locate`) into tensors.

    MNIST-style: images (N, 1, 28, 28); CIFAR: (N, 3, 32, 32); uint8, labels int64. Files
    are checked for structure (magic numbers, sizes, label counts and range), then against
    their published MD5 (`verify`): a file that differs (damaged, modified, another release)
    is a ValueError unless `allow_unverified`. The Dataset records every file read, with its
    MD5 and whether it verified, in `files`. Missing files raise FileNotFoundError saying
    where to put them; corrupt ones ValueError naming the file and the fix.
    """
    check_name(name)
    if name in _CIFAR:
        dataset, paths = _load_cifar(name, data_dir)
    else:
        dataset, paths = _load_idx(name, data_dir)
    for path in paths:
        verified = verify(name, path)
        md5 = _digests(name, path)["md5"]
        dataset.files[str(path.resolve())] = {"md5": md5, "verified": verified}
        if verified is False and not allow_unverified:
            raise UserError(
                f"{path}: MD5 {md5} is not the published one of {name} (the file differs from "
                f"the official release: damaged, modified or another version); {_fix(name)}; "
                f"or pass --allow-unverified-data (allow_unverified=True) to use it anyway, "
                f"which the run records"
            )
    return dataset


def fingerprint(dataset: Dataset) -> str:
    """The MD5 of a dataset's four tensors (shapes, dtypes and bytes of the train and test
    images and labels): the identity of the data a run trains on, whatever the files'
    compression, copy or folder. Any object with those four tensors will do."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        t = getattr(dataset, name).detach().cpu().contiguous()
        digest.update(f"{name} {tuple(t.shape)} {t.dtype};".encode())
        digest.update(t.numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()


# ---- verification ----------------------------------------------------------------------------


def _digests(name: str, path: Path) -> dict[str, str]:
    """{"md5": the file's MD5, "content_md5": for IDX files, the MD5 of the decompressed
    bytes (absent if they cannot be decompressed)}, cached (`qmse.sources.digests`)."""

    def compute(p: Path) -> dict[str, str]:
        out = {"md5": file_md5(p)}
        if name in IDX_CONTENT_MD5:
            with contextlib.suppress(ValueError):
                out["content_md5"] = bytes_md5(read_bytes(p, name))
        return out

    return digests(path, compute)


def verify(name: str, path: Path) -> bool | None:
    """Whether `path` is a published file of `name`: by its MD5 (the archive, an IDX .gz, a
    member of an extracted CIFAR folder), or for IDX files by the MD5 of its content (a
    re-compressed or gunzipped copy counts). None where nothing is published (a folder)."""
    if path.is_dir():
        return None
    published = SOURCES[name].files.get(path.name) or MEMBER_MD5.get(name, {}).get(path.name)
    content = IDX_CONTENT_MD5.get(name, {}).get(path.name.removesuffix(".gz"))
    if published is None and content is None:
        return None
    found = _digests(name, path)
    return found["md5"] == published or (
        content is not None and found.get("content_md5") == content
    )
