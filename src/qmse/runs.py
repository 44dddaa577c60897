"""Run bookkeeping shared by every command: atomic writes, provenance, progress bars.

Nothing is ever written half-way: each file is written to a temporary sibling, flushed
and renamed over the target, so a kill leaves either the old file or the new one.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from qmse import __version__


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """Atomically `torch.save` `obj` (checkpoints survive a kill mid-write)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def save_figure(path: str | os.PathLike, fig: Figure, *, dpi: int = 120) -> None:
    """Atomically save a matplotlib `Figure` (made with the object API, no pyplot, so the
    caller's backend is never switched); the format follows the file's suffix."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write(path, buf.getvalue())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomically (re)write a JSON-lines file: used so metrics never hold a torn last line."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def git_commit() -> str | None:
    """The qmse checkout's commit (with '-dirty' if modified), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def provenance(device: torch.device | str = "cpu") -> dict:
    """Versions, device, host and commit: recorded in every output directory."""
    return {
        "qmse": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def progress(iterable: Iterable | None = None, *, quiet: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on stderr, silenced by `quiet` (and off when stderr is not a tty
    unless QMSE_PROGRESS=1)."""
    show = not quiet and (sys.stderr.isatty() or os.environ.get("QMSE_PROGRESS") == "1")
    return tqdm(iterable, disable=not show, dynamic_ncols=True, leave=False, **kwargs)
