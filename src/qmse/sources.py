"""The datasets' official files: their names, published MD5s and mirrors, and the MD5 of a file.

The published values are those of the datasets' own pages and of torchvision. IDX files also
have the MD5 of their decompressed content, so that a re-compressed copy (Debian's
Fashion-MNIST .gz files differ from the published ones byte for byte, not in content) or a
gunzipped one is recognised.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

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


def file_md5(path: Path) -> str:
    """The MD5 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
