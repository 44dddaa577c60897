"""qmse.runs: atomic writes with the umask's permissions and errors that name the file, the
lock and kind of an output directory (a second process really holding the lock), loading
files that are damaged or hostile."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qmse import runs


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_allows(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        runs.atomic_write(tmp_path / "a.txt", "x")
        runs.save_json(tmp_path / "b.json", {"x": 1})
        runs.save_torch(tmp_path / "c.pt", {"w": torch.zeros(2)})
        runs.write_jsonl(tmp_path / "d.jsonl", [{"x": 1}])
        runs.atomic_write(tmp_path / "a.txt", "rewritten")  # a replaced file too
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json", "c.pt", "d.jsonl"):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.pt", "d.jsonl"]


def test_a_failed_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    runs.atomic_write(target, "old\n")

    def full(fd: int, payload: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs, "_write_all", full)
    with pytest.raises(OSError) as e:
        runs.atomic_write(target, "new\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    line = runs.describe_os_error(e.value)
    assert line == f"{target}: No space left on device; free space on that filesystem, or " + (
        "write elsewhere (--out)"
    )
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from qmse import runs
    with runs.claim(sys.argv[1], "train-run"):
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        t0 = time.perf_counter()
        with pytest.raises(runs.DirectoryBusyError) as e, runs.claim(out, "train-run"):
            pass
        assert time.perf_counter() - t0 < 5  # at once, not after the holder finishes
        message = str(e.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert str(out) in message and "-c" in message and "another --out" in message
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with runs.claim(out, "train-run"):  # SIGKILL released the lock
        pass


def test_a_directory_keeps_its_kind(tmp_path):
    out = tmp_path / "grid"
    with runs.claim(out, "grid"):
        (out / "grid.json").write_text("{}")
    assert runs.load_json(out / runs.KIND_FILE) == {"kind": "grid"}
    refused = r"holds a grid \(kind.json\), not a train-run"
    with pytest.raises(runs.DirectoryKindError, match=refused), runs.claim(out, "train-run"):
        pass
    with runs.claim(out, "diagnosis", accept=("grid",)):  # a command that may write into it
        pass
    assert runs.load_json(out / runs.KIND_FILE) == {"kind": "grid"}
    with runs.claim(out, "grid"):  # the same kind again
        pass


def test_a_foreign_directory_is_refused_unless_recognised(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = r"notes.txt\) but no kind.json"
    with pytest.raises(runs.DirectoryKindError, match=refused), runs.claim(other, "train-run"):
        pass
    assert not (other / runs.KIND_FILE).exists()
    with runs.claim(other, "train-run", recognise=lambda d: (d / "notes.txt").exists()):
        pass
    assert runs.load_json(other / runs.KIND_FILE) == {"kind": "train-run"}


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_planted_checkpoint_is_refused_even_when_torch_is_told_to_trust_it(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns weights_only off where a caller does not set
    it; load_torch sets it, so the planted object is refused and its code never runs."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, planted = tmp_path / "marker", tmp_path / "checkpoint.pt"
    torch.save({"model": _Payload(marker)}, planted)
    with pytest.raises(ValueError, match=rf"{planted}: refused checkpoint: .* could run code"):
        runs.load_torch(planted)
    assert not marker.exists()
    torch.load(planted, weights_only=False)  # the same file does run code without it
    assert marker.read_text() == "code ran"


def test_damaged_files_are_errors_naming_them(tmp_path):
    runs.save_torch(tmp_path / "c.pt", {"w": torch.arange(1000.0)})
    blob = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'c.pt'}: unreadable checkpoint"):
        runs.load_torch(tmp_path / "c.pt")
    (tmp_path / "c.json").write_text('{"epochs": 3,')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'c.json'}: not valid JSON"):
        runs.load_json(tmp_path / "c.json")
