"""qmse.reproduce: the grid's configs, the verdict's statistics against scipy, and a tiny
grid end to end (figure, report numbers recomputed from the metrics, skip, divergence, CLI)."""

import dataclasses
import math
import re

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import tiny_images as tiny_dataset
from conftest import write_mnist
from scipy import stats

from qmse import runs
from qmse.cli import main
from qmse.reproduce import grid_configs, load_results, run_grid, verdict, write_report
from qmse.rundir import run_name
from qmse.train import train_run


def test_grid_configs_follow_the_paper():
    configs = grid_configs("fashion-mnist", seeds=3, epochs=7)
    assert len(configs) == 2 * 2 * 3
    assert {(c.loss, c.momentum) for c in configs} == {
        (loss, m) for loss in ("mse", "qmse") for m in (0.0, 0.9)
    }
    assert {c.lr for c in configs} == {0.01} and {c.epochs for c in configs} == {7}
    assert {c.lr for c in grid_configs("cifar100", seeds=1)} == {0.1}
    ablation = grid_configs("mnist", seeds=1, with_ablation=True, lr=0.2)
    assert {c.loss for c in ablation} == {"mse", "qmse", "expected-qmse", "ce"}
    assert {c.lr for c in ablation} == {0.2}
    assert len({run_name(c) for c in ablation}) == len(ablation)
    with pytest.raises(ValueError, match="lr"):
        grid_configs("tiny", seeds=1)


def test_verdict_uses_the_student_t_interval():
    deltas = [0.010, 0.013, 0.008, 0.011, 0.012]
    word, m, lo, hi = verdict(deltas)
    ref_lo, ref_hi = stats.t.interval(
        0.95, len(deltas) - 1, loc=np.mean(deltas), scale=stats.sem(deltas)
    )
    assert word == "higher" and math.isclose(m, np.mean(deltas))
    assert math.isclose(lo, ref_lo) and math.isclose(hi, ref_hi)
    assert verdict([-d for d in deltas])[0] == "lower"
    assert verdict([0.01, -0.012, 0.004])[0] == "equal within noise"
    assert verdict([0.5])[0].startswith("undetermined")
    assert verdict([])[0].startswith("undetermined")


def _tiny_grid(seeds: int = 2, epochs: int = 2) -> list:
    configs = grid_configs("tiny", seeds=seeds, epochs=epochs, lr=0.05, batch_size=16)
    return [dataclasses.replace(c, channels=(2, 4), hidden=8) for c in configs]


def _table_rows(report: str, momentum: str, loss: str) -> list[list[str]]:
    """The cells of every table row starting with (momentum, loss): final table, then paired."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()]
    return [cells for cells in rows if cells[:2] == [momentum, loss]]


def test_tiny_grid_end_to_end(tmp_path):
    configs = _tiny_grid()
    paths = run_grid(configs, tmp_path, dataset=tiny_dataset(), device="cpu", quiet=True)
    image = matplotlib.image.imread(paths["figure"])
    assert image.ndim == 3 and image.shape[0] > 500  # two stacked panels
    report = paths["report"].read_text()

    def final(loss: str, momentum: float, key: str) -> list[float]:
        return [
            runs.read_jsonl(tmp_path / run_name(c) / "metrics.jsonl")[-1][key]
            for c in configs
            if c.loss == loss and c.momentum == momentum
        ]

    train = np.array(final("qmse", 0.9, "train_acc"))
    cells, paired = _table_rows(report, "0.9", "qmse")
    assert cells[2] == "2" and paired[2] == "2"
    assert cells[3] == f"{100 * train.mean():.2f} ± {100 * train.std(ddof=1):.2f}"
    delta = train - np.array(final("mse", 0.9, "train_acc"))
    lo, hi = stats.t.interval(0.95, 1, loc=delta.mean(), scale=stats.sem(delta))
    if delta.std() == 0:
        lo = hi = delta.mean()
    assert paired[3] == f"{100 * delta.mean():.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
    assert len(re.findall(r"^- Momentum", report, flags=re.M)) == 2
    assert (tmp_path / "grid.json").exists()

    # finished runs are skipped: checkpoints untouched
    def stamps() -> list[int]:
        return [(tmp_path / run_name(c) / "checkpoint.pt").stat().st_mtime_ns for c in configs]

    before = stamps()
    run_grid(configs, tmp_path, dataset=tiny_dataset(), device="cpu", quiet=True)
    assert stamps() == before

    # a diverged run is excluded and named
    runs.save_json(tmp_path / "qmse-m0-s1" / "diverged.json", {"epoch": 2, "message": "x"})
    report = run_grid(configs, tmp_path, dataset=tiny_dataset(), quiet=True)["report"]
    text = report.read_text()
    assert "Diverged (non-finite loss, excluded): qmse-m0-s1." in text
    assert [row[2] for row in _table_rows(text, "0", "qmse")] == ["1", "1"]
    assert "undetermined" in text

    # an unfinished run (fewer epochs than planned) is excluded and named
    metrics = tmp_path / "mse-m0.9-s0" / "metrics.jsonl"
    runs.write_jsonl(metrics, runs.read_jsonl(metrics)[:1])
    text = write_report(load_results(tmp_path, configs), tmp_path / "r.md").read_text()
    assert "Unfinished (excluded): mse-m0.9-s0 (1/2 epochs)." in text
    assert _table_rows(text, "0.9", "mse")[0][2] == "1"


def test_cli_reproduce_on_idx_fixture_files(tmp_path, capsys):
    write_mnist(tmp_path / "data" / "fashion-mnist", n_train=48, n_test=24)
    out = tmp_path / "grid"
    argv = ["reproduce", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--quiet"]
    argv += ["--seeds", "2", "--epochs", "1", "--train-subset", "32", "--test-subset", "16"]
    argv += ["--parallel", "4", "--allow-unverified-data"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"figure: {out / 'figure.png'}" in printed and f"report: {out / 'report.md'}" in printed
    config = runs.load_json(out / "mse-m0.9-s1" / "config.json")
    assert config["num_train"] == 32 and config["num_test"] == 16 and config["lr"] == 0.01
    assert torch.load(out / "mse-m0.9-s1" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_parallel_grid_runs_every_config_like_train_run(tmp_path):
    configs = _tiny_grid(seeds=2, epochs=2)
    run_grid(configs, tmp_path / "par", dataset=tiny_dataset(), parallel=3, quiet=True)
    for c in configs:
        assert len(runs.read_jsonl(tmp_path / "par" / run_name(c) / "metrics.jsonl")) == 2
    last = configs[-1]  # trained in the group of two left over after two groups of three
    par = runs.read_jsonl(tmp_path / "par" / run_name(last) / "metrics.jsonl")
    alone = train_run(last, tmp_path / "alone", dataset=tiny_dataset(), quiet=True)
    for a, b in zip(par, alone):
        for key in ("train_acc", "test_acc", "train_mse", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6)
    other = [dataclasses.replace(c, lr=0.07) for c in configs]
    with pytest.raises(ValueError, match="lr=0.05"):
        run_grid(other, tmp_path / "par", dataset=tiny_dataset(), quiet=True)
