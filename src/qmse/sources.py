"""The datasets' official files (names, published MD5s, mirrors) and the MD5s of a file on disk.

The published values are those of the datasets' own pages and of torchvision. IDX files also
have the MD5 of their decompressed content, so that a re-compressed copy (Debian's
Fashion-MNIST .gz files differ from the published ones byte for byte, not in content) or a
gunzipped one is recognised; the members of the CIFAR archives have theirs, so that an
extracted folder is checked too.

A file is hashed once: `digests` keeps its MD5s in a JSON file in the user's cache folder
(`md5_cache_path()`), keyed by the file's absolute path, inode, size, modification time and
inode change time (ctime), and hashes it again when any of them changes. The ctime is what
an edit in place cannot hide: restoring the modification time (`touch -d`, `os.utime`)
itself sets the ctime to now, and no call sets it back. (Hashing every file at every run
instead costs 0.4 s for Fashion-MNIST's four files on a 2-core machine, and about 2 s for
CIFAR's 170 MB archive: the stamp keeps a run's start free of it.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from qmse.runs import atomic_write

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

# MD5s of the decompressed IDX files (see the module docstring).
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


# MD5s of the members of the CIFAR archives (their extracted folders), as torchvision lists them.
MEMBER_MD5: dict[str, dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}


def md5_cache_path() -> Path:
    """The file of cached MD5s: `$XDG_CACHE_HOME/qmse/md5sums.json`, else
    `~/.cache/qmse/md5sums.json`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qmse" / "md5sums.json"


def bytes_md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_md5(path: Path) -> str:
    """The MD5 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digests(path: Path, compute: Callable[[Path], dict[str, str]]) -> dict[str, str]:
    """`compute(path)` (a dict of MD5s, e.g. {"md5": ..., "content_md5": ...}) from the cache
    file when it holds an entry for this path with the same stamp (inode, size, mtime,
    ctime: the module docstring), else computed
    and stored. The cache is an optimisation: an unreadable or unwritable one is ignored."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    cache_file = md5_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["digests"]
    result = compute(path)
    cache[key] = {"stamp": stamp, "digests": result}
    with contextlib.suppress(OSError):
        atomic_write(cache_file, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return result
