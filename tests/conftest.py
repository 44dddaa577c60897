"""Fixtures shared by the test modules: a tiny learnable image set, IDX files of it in the
official MNIST format, small models and a small training config, and the shared cases of the
curvature tests (`CASES`: a model, a criterion and data each, curvlinops-style) with a dense
Hessian reference.

`prose` gives a document's prose for the docs tests (tests/test_docs.py and the tests of
each document's numbers). The helpers are plain functions (importable as
`from conftest import ...`, also from the subprocesses some tests start) with pytest
fixtures around the common cases.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from qmse import curvature
from qmse.config import TrainConfig
from qmse.escape.rows import Row
from qmse.models import MLP, SimpleCNN
from qmse.stats import wilson

TESTS = Path(__file__).resolve().parent
IDX_IMAGES, IDX_LABELS = 2051, 2049  # IDX magic numbers: uint8 3-D images, uint8 1-D labels
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def tiny_images(
    seed: int = 0, n_train: int = 96, n_test: int = 40, size: int = 8, classes: int = 3
) -> SimpleNamespace:
    """A learnable image set in qmse.data.Dataset's layout (uint8 (N, 1, size, size), int64
    labels): class k images are brighter in a k-dependent band of rows."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=g)
        noise = torch.randint(0, 120, (n, 1, size, size), generator=g)
        rows = torch.arange(size).view(1, 1, size, 1)
        band = (rows * classes // size) == labels.view(n, 1, 1, 1)  # (n, 1, size, 1)
        return (noise + 120 * band).to(torch.uint8), labels

    train_images, train_labels = make(n_train)
    test_images, test_labels = make(n_test)
    return SimpleNamespace(
        name="tiny",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=classes,
    )


def tiny_config(**kw) -> TrainConfig:
    """A TrainConfig for `tiny_images` (a SimpleCNN with 2 and 4 channels, 8 hidden units)."""
    base = dict(dataset="tiny", loss="qmse", lr=0.05, momentum=0.9, batch_size=16, epochs=2)
    return TrainConfig(**{**base, "channels": (2, 4), "hidden": 8, **kw})


def tiny_cnn(seed: int = 0, classes: int = 3, size: int = 8) -> SimpleCNN:
    """The SimpleCNN of `tiny_config` for `tiny_images`, initialised from `seed`."""
    torch.manual_seed(seed)
    return SimpleCNN(1, size, num_classes=classes, channels=(2, 4), hidden=8)


def tiny_mlp(seed: int = 0, d: int = 4, h: int = 6, c: int = 3) -> MLP:
    """A float64 tanh MLP d → h → c, initialised from `seed`."""
    torch.manual_seed(seed)
    return MLP(d, [h], c, activation="tanh").double()


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file: big-endian int32 magic and sizes, then the uint8 data."""
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes()


def write_idx_set(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool = True) -> None:
    """Write {IDX base name: uint8 array} into `folder` as the official files (gzipped or not)."""
    folder.mkdir(parents=True, exist_ok=True)
    for base, array in arrays.items():
        payload = idx_bytes(IDX_IMAGES if array.ndim == 3 else IDX_LABELS, array)
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(payload, mtime=0))
        else:
            (folder / base).write_bytes(payload)


def write_mnist(
    folder: Path,
    *,
    gz: bool = True,
    seed: int = 0,
    n_train: int = 7,
    n_test: int = 4,
    size: int = 28,
    learnable: bool = False,
) -> dict[str, np.ndarray]:
    """The four MNIST files in `folder` with random content (`learnable`: class k brighter
    in row band k, as `tiny_images`); returns the arrays written, by IDX base name."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 120 if learnable else 256, (n, size, size), dtype=np.uint8)
        if learnable:
            for i, k in enumerate(labels):
                images[i, (k * size) // 10] += 120
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels
    write_idx_set(folder, arrays, gz=gz)
    return arrays


def write_tiny_mnist(root: Path, n_train: int = 48, n_test: int = 24, size: int = 8) -> Path:
    """A learnable 8×8 'mnist' in root/mnist (IDX .gz files); returns root, a data dir.
    Its MD5s are not the published ones: load it with allow_unverified=True."""
    write_mnist(root / "mnist", n_train=n_train, n_test=n_test, size=size, learnable=True)
    return root


@pytest.fixture
def tiny_dataset() -> SimpleNamespace:
    """`tiny_images()`: 96 training and 40 test images of 8×8, 3 classes."""
    return tiny_images()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """qmse's caches (the data files' MD5s) in a folder of the test session, never the
    user's ~/.cache; subprocesses inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


def per_sample_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, P): each sample's output Jacobian with respect to the flattened trainable
    weights, by autograd one sample at a time (the reference the diagnostics are checked
    against)."""
    w, f = curvature.model_fn(model)
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda wv, xi=xi: f(wv, xi[None])[0], w) for xi in x]
    )  # (N, C, P)


@contextlib.contextmanager
def leaves_untouched(model: nn.Module):
    """Asserts that the block leaves `model`'s weights, requires_grad flags, modes and .grad
    exactly as they were."""
    before = {k: p.clone() for k, p in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    yield
    for k, p in model.state_dict().items():
        assert torch.equal(p, before[k])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def dense_hessian(model: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇² of criterion(model(x), y) in the flat trainable weights (P, P), by
    torch.func.hessian on a function written here (not qmse.curvature.loss_fn): the
    independent reference of every curvature test."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    w = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(wv):
        chunks = wv.split([math.prod(s) for s in shapes])
        params = {k: c.view(s) for (k, _), c, s in zip(named, chunks, shapes)}
        return criterion(functional_call(model, params, (x,)), y)

    return torch.func.hessian(loss)(w)


def _case_mlp_mse():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g)
    return tiny_mlp(), "mse", x, y.double()


def _case_mlp_ce():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    return tiny_mlp(seed=1), nn.CrossEntropyLoss(), x, torch.randint(0, 3, (9,), generator=g)


def _case_cnn_mse():
    images = tiny_images(n_train=6, n_test=1)
    x = images.train_images.double() / 255
    y = nn.functional.one_hot(images.train_labels, 3).double()
    return tiny_cnn().double(), "mse", x, y


def _case_scalar_bce():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return model, nn.BCEWithLogitsLoss(), x, torch.randint(0, 2, (8,), generator=g).double()


CASES = {  # name -> () -> (model, criterion, x, y): float64, small enough for a dense Hessian
    "mlp-mse": _case_mlp_mse,
    "mlp-ce": _case_mlp_ce,
    "cnn-mse": _case_cnn_mse,
    "scalar-bce": _case_scalar_bce,
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> SimpleNamespace:
    """One shared curvature case: model, criterion, x, y (see CASES)."""
    model, criterion, x, y = CASES[request.param]()
    return SimpleNamespace(name=request.param, model=model, criterion=criterion, x=x, y=y)


def escape_row(method, k, failed, protocol="spurious-minima", **extra):
    """An escape benchmark Row with per-start outcomes `failed` ("1" failed), for report and
    figure tests; `extra` sets any other field."""
    n = len(failed)
    f = failed.count("1")
    lo, hi = wilson(f, n)
    return Row.from_json({
        "k": k, "n": k, "outputs": 1, "method": method, "protocol": protocol, "seeds": n,
        "failures": f, "failure_rate": f / n, "ci95_low": lo, "ci95_high": hi, "diverged": 0,
        "lr": 0.1, "hyper": {}, "steps": 100, "batch": 8, "grad_evals": 800,
        "median_loss": 0.01, "starts_key": f"s{k}", "failed": failed,
        "tuning": {"fixed": False, "edge": False}, **extra,
    })  # fmt: skip


# ---------------------------------------------------------------- prose of the docs


def superscript(x: float) -> str:
    """10⁻⁵ for 1e-5."""
    exponent = round(math.log10(x))
    assert x == 10.0**exponent
    return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def join_lines(text: str) -> str:
    """A paragraph's (or list item's) lines as one line, so that a quoted sentence matches
    wherever the document wraps it; table rows, headings and new items keep their lines."""
    out: list[str] = []
    for line in text.split("\n"):
        prev = out[-1] if out else ""
        new_block = not line.strip() or not prev.strip() or line.startswith(("|", "#", "- "))
        if new_block or prev.startswith(("|", "#")):
            out.append(line)
        else:
            out[-1] = prev.rstrip() + " " + line.strip()
    return "\n".join(out)


def prose(text: str) -> str:
    """Prose only: fenced and indented code blocks, images, link targets and inline code
    removed (commands, flags and file names are not results), paragraphs on one line."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = "\n".join(line for line in text.split("\n") if not line.startswith("    "))
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", text)
    text = re.sub(r"\]\([^)]*\)", "] ", text)
    return join_lines(re.sub(r"`[^`]*`", " ", text))


def leftover(region: str, quoted: list[str], whitelist: list[str]) -> list[str]:
    """Numbers still in `region` once the quoted snippets (longest first) and the whitelisted
    patterns are taken out, each with its context: what no check computes."""
    rest = region
    for s in sorted(set(quoted), key=len, reverse=True):
        rest = rest.replace(s, " ¤ ")
    for pattern in whitelist:
        rest = re.sub(pattern, " ", rest)
    return [
        rest[max(0, m.start() - 50) : m.end() + 30].replace("\n", " ")
        for m in re.finditer(r"\d[\d,.]*", rest)
    ]


class Doc:
    """A document's checked sections (`spans`: from each start string to its end string, or
    to the end), the snippets quoted from them and those missing; `check` then asserts that
    every snippet was found and that no number is left unquoted (`leftover`)."""

    def __init__(self, path: str, spans: list[tuple[str, str | None]]):
        text = (Path(__file__).resolve().parent.parent / path).read_text()
        parts = []
        for start, end in spans:
            i = text.index(start)
            parts.append(text[i : text.index(end, i) if end else len(text)])
        self.path = path
        self.region = prose("\n".join(parts))
        self.quoted: list[str] = []
        self.missing: list[str] = []

    def quote(self, *snippets: str) -> None:
        """Each snippet must be in the checked sections, as written."""
        for s in snippets:
            (self.quoted if s in self.region else self.missing).append(s)

    def table_after(self, heading: str) -> list[str]:
        """The rows of the first table after `heading` in the checked sections."""
        lines = self.region[self.region.index(heading) :].split("\n")
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
        return lines[start:end]

    def tables_under(self, heading: str) -> list[str]:
        """Every table row from `heading` to the next heading of its level or above."""
        part = self.region[self.region.index(heading) :]
        level = heading.split(" ")[0]
        ends = [part.find(f"\n{'#' * n} ", 1) for n in range(1, len(level) + 1)]
        part = part[: min([e for e in ends if e > 0], default=len(part))]
        return [line for line in part.split("\n") if line.startswith("|")]

    def check(self, whitelist: list[str]) -> None:
        assert not self.missing, f"{self.path}: not found as written:\n" + "\n".join(self.missing)
        left = leftover(self.region, self.quoted, whitelist)
        assert not left, f"{self.path}: numbers no check computes:\n" + "\n".join(left)
