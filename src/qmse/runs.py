"""Run bookkeeping shared by every command: atomic writes, output directories that know whose
they are, provenance, progress bars.

Nothing is ever written half-way: each file is written to a temporary sibling, flushed and
renamed over the target, so a kill leaves either the old file or the new one. Files get the
permissions the umask allows (0644 under umask 022), like any file a program creates.

An output directory is claimed (`claim`) by the command that writes it: an exclusive lock
(a second writer fails at once, naming the holder) and a kind, recorded in kind.json, that a
command of another kind refuses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import platform
import secrets
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from qmse import __version__
from qmse.errors import QmseError, UserError

KIND_FILE = "kind.json"  # {"kind": ...}: what wrote the directory
LOCK_FILE = ".lock"  # flock'ed by the writer; holds its pid, host and command
# the kinds of directory qmse's commands write
KINDS = (
    "train-run",
    "grid",
    "escape-benchmark",
    "diagnosis",
    "weight-matching",
    "landscape",
    "convexity",
    "benchmark",
)


def _write_all(fd: int, payload: bytes) -> None:
    """os.write until all of `payload` is written (a short write is not an error)."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename), with
    the permissions the umask allows. An OSError (a full disk, no permission) names `path`."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None or Path(e.filename) == tmp:
            e.filename, e.filename2 = str(path), None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a file that is not JSON (damaged, truncated) is a ValueError
    naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{path}: not valid JSON ({e}); the file is damaged or was not written by qmse: "
                f"restore it, or delete the directory to start afresh"
            ) from e


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """Atomically `torch.save` `obj` (checkpoints survive a kill mid-write)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load` with weights_only=True: tensors, numbers, strings and containers only, so
    a crafted file cannot run code, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says. A file
    that is truncated, damaged or holds anything else is a ValueError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: refused checkpoint: it holds objects other than tensors and plain data, "
            f"and loading them could run code; it was not written by qmse: delete it, or "
            f"restore the run's own"
        ) from e
    except (RuntimeError, EOFError, IndexError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"{path}: unreadable checkpoint ({reason}); it is truncated or damaged: delete it "
            f"to start afresh, or restore it"
        ) from e


class DirectoryBusyError(QmseError, RuntimeError):
    """Another process holds the output directory's lock."""


class DirectoryKindError(QmseError, ValueError):
    """The output directory belongs to a command of another kind."""


def _holder(lock: Path) -> str:
    try:
        h = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "another process (not yet recorded)"
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')} ({h.get('command')})"


@contextlib.contextmanager
def claim(
    directory: str | os.PathLike,
    kind: str,
    *,
    accept: Iterable[str] = (),
    recognise: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Hold `directory` (created if missing) for writing, as a directory of `kind`, until the
    block ends.

    The lock is an exclusive `flock` on `directory/.lock`, released when the block ends or
    the process dies (also by SIGKILL): a second writer raises DirectoryBusyError at once,
    naming the holder's pid, host and command. The kind is recorded in kind.json; a
    directory of another kind raises DirectoryKindError unless that kind is in `accept`
    (e.g. a diagnosis written into the train run it diagnoses). A non-empty directory without
    kind.json is taken only if `recognise(directory)` says it is an older one of this kind.
    Call it after the arguments are validated, before the first file is written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryBusyError(
                f"{directory} is being written by {_holder(lock)}; wait for it to finish, or "
                f"write elsewhere (another --out)"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _check_kind(directory, kind, accept, recognise)
        yield directory
    finally:
        os.close(fd)  # releases the flock


def _check_kind(
    directory: Path, kind: str, accept: Iterable[str], recognise: Callable[[Path], bool] | None
) -> None:
    """Refuse `directory` if it belongs to another kind; record `kind` if it is new."""
    path = directory / KIND_FILE
    if path.exists():
        found = load_json(path).get("kind")
        if found != kind and found not in set(accept):
            raise DirectoryKindError(
                f"{directory} holds a {found} ({KIND_FILE}), not a {kind}: write the {kind} "
                f"elsewhere (another --out)"
            )
        return
    others = [p.name for p in directory.iterdir() if p.name != LOCK_FILE]
    if others and not (recognise is not None and recognise(directory)):
        raise DirectoryKindError(
            f"{directory} already holds files ({', '.join(sorted(others)[:4])}) but no "
            f"{KIND_FILE}: it is not a qmse {kind} directory; write the {kind} elsewhere "
            f"(another --out)"
        )
    save_json(path, {"kind": kind})


def describe_os_error(e: OSError) -> str:
    """One line for an OSError from the environment: the file, what happened, what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e)
    fixes = {
        errno.ENOSPC: "free space on that filesystem, or write elsewhere (--out)",
        errno.EDQUOT: "free space within your quota, or write elsewhere (--out)",
        errno.EACCES: "check its permissions, or use another path",
        errno.EPERM: "check its permissions, or use another path",
        errno.EROFS: "the filesystem is read-only: write elsewhere (--out)",
        errno.ENOTDIR: "a component of the path is a file, not a folder: use another path",
        errno.EISDIR: "it is a folder where a file was expected: use another path",
        errno.ENOENT: "check the path",
    }
    fix = fixes.get(e.errno, "check the path and the filesystem")
    return f"{where}: {what}; {fix}" if where else f"{what}; {fix}"


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
