"""qmse.scale: Ray sweeps give the local backend's files, also when a worker is SIGKILLed
mid-run; a run under torchrun on 2 gloo processes gives the metrics of 1 process."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import TESTS, write_tiny_mnist

from qmse import distributed, runs, sweep
from qmse.cli import main
from qmse.config import TrainConfig
from qmse.reproduce import grid_configs
from qmse.rundir import run_name
from qmse.train import METRIC_KEYS, train_run, train_task

GRID = ["--dataset", "mnist", "--seeds", "2", "--epochs", "2", "--lr", "0.05"]
GRID += ["--batch-size", "16", "--device", "cpu", "--quiet"]  # 8 runs
GRID += ["--allow-unverified-data"]  # the fixture's files are not the published MNIST


def grid_tasks(out: Path, data_dir: Path) -> list[dict]:
    """GRID's runs as train_task tasks, one run each."""
    configs = grid_configs(
        "mnist",
        seeds=2,
        epochs=2,
        lr=0.05,
        batch_size=16,
        data_dir=str(data_dir),
        allow_unverified_data=True,
    )
    return [{"configs": [asdict(c)], "out_dirs": [str(out / run_name(c))]} for c in configs]


def metrics(out: Path) -> dict[str, list[dict]]:
    """run name -> metric rows."""
    return {p.parent.name: runs.read_jsonl(p) for p in sorted(out.glob("*/metrics.jsonl"))}


def report(out: Path) -> str:
    """report.md without its one measured time."""
    return re.sub(r"time summed over runs: [0-9.]+ s", "", (out / "report.md").read_text())


def test_local_backend_runs_in_order_and_checks_its_arguments():
    assert sweep.run_tasks(lambda t: t * t, range(5), quiet=True) == [0, 1, 4, 9, 16]
    for bad, match in (
        (dict(backend="dask"), "backend"),
        (dict(address="auto"), "address"),
        (dict(num_cpus_per_task=0), "num_cpus_per_task"),
        (dict(num_gpus_per_task=-1), "num_gpus_per_task"),
        (dict(max_retries=-1), "max_retries"),
    ):
        with pytest.raises(ValueError, match=match):
            sweep.run_tasks(abs, [1], **bad)


def test_ray_backend_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(ImportError, match=r"qmse\[ray\]"):
        sweep.run_tasks(abs, [1], backend="ray")


def test_outside_a_process_group_data_parallel_is_the_forward_itself():
    def forward(params, x):
        return x

    grads = [torch.ones(2), torch.zeros(3, 1)]
    assert distributed.world() == (0, 1)
    assert distributed.data_parallel(forward, dim=1) is forward
    assert all(s is g for s, g in zip(distributed.sum_over_ranks(grads), grads, strict=True))
    assert distributed.init_distributed("cpu") == torch.device("cpu")  # no WORLD_SIZE: nothing
    distributed.close_distributed()  # no group: nothing to leave
    assert distributed.world() == (0, 1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory, data_dir) -> Path:
    """`qmse reproduce` on the local backend, with one torch thread like a 1-CPU Ray task."""
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["reproduce", *GRID, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(metrics(out)) == 8
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray instance on the loopback interface for this module's tests;
    workers import this file (for the trapped task) through PYTHONPATH."""
    ray = pytest.importorskip("ray")
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_ray_grid_gives_the_local_backends_files(ray_cluster, local_grid, data_dir, tmp_path):
    args = ["reproduce", *GRID, "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert main([*args, "--backend", "ray"]) == 0
    assert metrics(tmp_path) == metrics(local_grid)
    assert report(tmp_path) == report(local_grid)
    assert (tmp_path / "figure.png").exists()


def test_a_group_task_trains_its_runs_together(local_grid, data_dir, tmp_path):
    """Two runs in one task go through train_many: the same metrics to float tolerance."""
    tasks = grid_tasks(tmp_path, data_dir)[:2]
    group = {
        "configs": [t["configs"][0] for t in tasks],
        "out_dirs": [t["out_dirs"][0] for t in tasks],
    }
    assert train_task({**group, "device": "cpu"}) == [
        {"out_dir": d, "epochs": 2, "diverged": False} for d in group["out_dirs"]
    ]
    for name, rows in metrics(tmp_path).items():
        for a, b in zip(rows, metrics(local_grid)[name], strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


@pytest.mark.integration
def test_ray_escape_benchmark_gives_the_local_files(ray_cluster, tmp_path):
    """`qmse escape --backend ray` (its cells as Ray tasks in dependency order, a fixed
    tuning k so that cells share tunings) writes the local backend's files, byte for byte."""
    argv = [
        "escape", "--teacher-widths", "3,4", "--population-seeds", "8", "--sample-seeds", "3",
        "--steps", "40", "--methods", "gd-population,sgd,pgd,qmse", "--tune-k", "3",
        "--tune-seeds", "2", "--tune-pool", "8", "--max-gd-steps", "2000", "--batch-size", "16",
        "--quiet",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--out", str(tmp_path / "local")]) == 0
        assert main([*argv, "--out", str(tmp_path / "ray"), "--backend", "ray"]) == 0
    finally:
        torch.set_num_threads(threads)
    files = {
        name: sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*"))
        for name in ("local", "ray")
    }
    assert files["local"] == files["ray"]
    assert (tmp_path / "ray" / "results.json").read_bytes() == (
        tmp_path / "local" / "results.json"
    ).read_bytes()
    wall = "### Wall time"  # table.md ends with the seconds each backend took
    tables = [(tmp_path / name / "table.md").read_text() for name in ("ray", "local")]
    assert all(wall in t for t in tables)
    assert tables[0].split(wall)[0] == tables[1].split(wall)[0]
    for row in (tmp_path / "local" / "rows").iterdir():
        assert (tmp_path / "ray" / "rows" / row.name).read_bytes() == row.read_bytes()


def trapped_train_task(task: dict) -> dict:
    """train_task, except that the first attempt at a task with a "trap" path writes
    its pid there after saving its epoch-1 checkpoint (before metrics.jsonl) and waits to be
    killed. A retry finds the trap file and runs normally: it must resume from epoch 1."""
    trap = Path(task.pop("trap", os.devnull))
    if trap.name != os.devnull and not trap.exists():
        save_torch = runs.save_torch

        def save_then_wait(path, obj):
            save_torch(path, obj)
            trap.write_text(str(os.getpid()))
            time.sleep(600)

        runs.save_torch = save_then_wait  # this worker process is about to die with it
    return train_task(task)


@pytest.mark.integration
def test_sigkilled_worker_is_retried_and_resumes(ray_cluster, local_grid, data_dir, tmp_path):
    out, trap = tmp_path / "grid", tmp_path / "pid"
    tasks = grid_tasks(out, data_dir)
    victim = tasks[5]
    victim["trap"] = str(trap)
    killed = []

    def kill_when_trapped() -> None:
        deadline = time.monotonic() + 180
        while not trap.exists() or not trap.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        pid = int(trap.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_when_trapped, daemon=True)
    killer.start()
    results = sweep.run_tasks(trapped_train_task, tasks, backend="ray", max_retries=2, quiet=True)
    killer.join(timeout=1)
    assert killed, "the trapped task never reached its epoch-1 checkpoint"
    assert [r["epochs"] for [r] in results] == [2] * 8
    assert metrics(out) == metrics(local_grid)
    run = Path(victim["out_dirs"][0])
    assert len(runs.load_json(run / "config.json")["resumed"]) == 1  # resumed, not restarted

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    again = sweep.run_tasks(train_task, grid_tasks(out, data_dir), backend="ray", quiet=True)
    assert [r["epochs"] for [r] in again] == [2] * 8
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished runs: not retrained


@pytest.mark.integration
def test_train_under_torchrun_on_two_gloo_processes_matches_one(data_dir, tmp_path):
    """`qmse train` under torchrun, 2 CPU ranks, batches of 15 (uneven shares, a short last
    batch): the metrics of one process to float tolerance; its checkpoint resumes in one.
    torchrun exits 0: no rank aborts in its teardown (this failed 1 run in about 30)."""
    args = ["--dataset", "mnist", "--data-dir", str(data_dir), "--loss", "qmse", "--lr", "0.05"]
    args += ["--momentum", "0.9", "--batch-size", "15", "--channels", "2", "4", "--hidden", "8"]
    args += ["--allow-unverified-data"]
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "qmse.cli", "train", *args, "--epochs", "2", "--device", "cpu"]
        + ["--out", str(out), "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count(f"{out}: epoch 2") == 1, done.stdout  # rank 0 alone reports
    cfg = TrainConfig(
        dataset="mnist",
        data_dir=str(data_dir),
        loss="qmse",
        lr=0.05,
        momentum=0.9,
        batch_size=15,
        epochs=3,
        channels=(2, 4),
        hidden=8,
        allow_unverified_data=True,
    )
    one = train_run(cfg, tmp_path / "one", quiet=True)
    resumed = train_run(cfg, out, quiet=True)  # continues: epoch 3 in one process
    assert len(runs.read_jsonl(out / "metrics.jsonl")) == 3
    for a, b in zip(resumed, one):
        assert a.keys() == b.keys() == set(METRIC_KEYS)
        for key in METRIC_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)
