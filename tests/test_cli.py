"""The `qmse` command's errors: what the user or the environment got wrong ends in one line
naming the file and the fix, exit status 2, no traceback; a bug keeps its traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_mnist

from qmse import cli, runs
from qmse.cli import main
from qmse.cli import run as cli_run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("data"))


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", "mnist", "--data-dir", str(data_dir), "--allow-unverified-data",
        "--loss", "mse", "--lr", "0.05", "--epochs", "1", "--batch-size", "16",
        "--channels", "2", "4", "--hidden", "8", "--device", "cpu", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmse train: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_run_then_the_same_call_continues_it(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out)) == 0
    assert f"{out}: epoch 1 train acc" in capsys.readouterr().out
    assert runs.load_json(out / "kind.json") == {"kind": "train-run"}
    config = runs.load_json(out / "config.json")
    assert config["allow_unverified_data"] is True
    assert config["data"]["path"] == str(data_dir / "mnist")
    assert all(f["verified"] is False for f in config["data"]["files"].values())
    assert main(train_args(data_dir, out, "--epochs", "2")) == 0  # no --resume needed
    assert len(runs.read_jsonl(out / "metrics.jsonl")) == 2
    assert main(train_args(data_dir, out, "--epochs", "2", "--resume")) == 0  # a no-op flag


def test_data_that_does_not_verify_needs_the_flag(data_dir, tmp_path, capsys):
    args = [a for a in train_args(data_dir, tmp_path / "run") if a != "--allow-unverified-data"]
    assert main(args) == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz: MD5", "--allow-unverified-data")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_out_under_proc_is_one_line(data_dir, capsys):
    assert main(train_args(data_dir, Path("/proc/x"))) == 2
    one_line_error(capsys, "/proc/x", "No such file or directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(data_dir, tmp_path, capsys):
    argv = train_args(data_dir, tmp_path / "run")
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 2
    one_line_error(capsys, "device cuda: no CUDA device is visible", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_an_unreadable_data_dir_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(train_args(not_a_dir, tmp_path / "a")) == 2
    one_line_error(capsys, "mnist not found", str(not_a_dir / "mnist"))
    # no permission to read (simulated: chmod does not stop root)
    real = Path.is_file

    def denied(self: Path) -> bool:
        if self.is_relative_to(data_dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)
    assert main(train_args(data_dir, tmp_path / "b")) == 2
    one_line_error(capsys, str(data_dir / "mnist"), "Permission denied", "check its permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_data_dir_without_read_permission_is_one_line(data_dir, tmp_path, capsys):
    folder = data_dir / "mnist"
    folder.chmod(0)
    try:
        assert main(train_args(data_dir, tmp_path / "run")) == 2
    finally:
        folder.chmod(0o755)
    one_line_error(capsys, str(folder), "Permission denied")


def test_a_full_disk_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    def full(fd: int, payload: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs, "_write_all", full)
    assert main(train_args(data_dir, tmp_path / "run")) == 2
    one_line_error(capsys, str(tmp_path / "run"), "No space left on device", "free space")


def test_other_kinds_and_damaged_run_directories_are_one_line(data_dir, tmp_path, capsys):
    grid = tmp_path / "grid"
    with runs.claim(grid, "grid"):
        pass
    assert main(train_args(data_dir, grid)) == 2
    one_line_error(capsys, f"{grid} holds a grid (kind.json), not a train-run")
    run = tmp_path / "run"
    assert main(train_args(data_dir, run)) == 0
    capsys.readouterr()
    config = runs.load_json(run / "config.json")
    runs.save_json(run / "config.json", {k: v for k, v in config.items() if k != "model"})
    assert main(train_args(data_dir, run, "--epochs", "2")) == 2
    one_line_error(capsys, f"{run / 'config.json'}: not the config.json of a qmse train run")
    runs.save_json(run / "config.json", config)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    assert main(train_args(data_dir, run, "--epochs", "2")) == 2
    one_line_error(capsys, f"{run / 'checkpoint.pt'}: unreadable checkpoint", "truncated")


def test_a_bug_keeps_its_traceback(data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_run, "train_run", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(train_args(data_dir, tmp_path / "run"))


def test_the_installed_command_prints_one_line_without_a_traceback(data_dir, tmp_path):
    """The same through the console script in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "qmse.cli", *train_args(data_dir, Path("/proc/x"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "qmse train: error: /proc/x: No such file or directory; check the path"
    ]


def test_loss_choices_come_from_the_registry_and_sigma_is_checked(data_dir, tmp_path, capsys):
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "label-noise" in help_text and "--sigma SIGMA" in help_text
    assert main(train_args(data_dir, tmp_path / "a", "--loss", "label-noise")) == 2
    one_line_error(capsys, "loss 'label-noise' needs sigma", "--sigma")
    argv = train_args(data_dir, tmp_path / "b", "--loss", "label-noise", "--sigma", "0.2")
    assert main(argv) == 0
    assert runs.load_json(tmp_path / "b" / "config.json")["loss_params"] == {"sigma": 0.2}
