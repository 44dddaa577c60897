"""qmse.reproduce: the grid's configs, a tiny grid end to end (figure, report numbers
recomputed from the metrics, skip, divergence, CLI, the report rewritten without
checkpoints), and a tuned, diagnosed grid run in pieces (sweeps first, choices inside their
grids, a killed sweep run retrained alone, diagnoses in the report)."""

import dataclasses
import math
import re
import shutil
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import tiny_images as tiny_dataset
from conftest import write_mnist, write_tiny_mnist
from scipy import stats

from qmse import runs
from qmse.cli import main
from qmse.report import write_outputs, write_report
from qmse.reproduce import grid_configs, loss_params_for, run_grid
from qmse.results import load_results
from qmse.rundir import run_name
from qmse.stepsize import SWEEP_DIR, Tuning, yardstick
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
    losses = ["mse", "label-noise", "ce"]
    end = grid_configs(
        "mnist", seeds=2, losses=losses, loss_params=loss_params_for(losses, {"sigma": 0.3}),
        eval_every=5, momenta=(0.9,),
    )  # fmt: skip
    assert [c.loss_params for c in end[:3]] == [{}, {"sigma": 0.3}, {}]
    assert {c.eval_every for c in end} == {5} and [c.seed for c in end] == [0] * 3 + [1] * 3
    with pytest.raises(ValueError, match="--loss-param sigma=VALUE"):
        loss_params_for(losses, {})


def _tiny_grid(seeds: int = 2, epochs: int = 2) -> list:
    configs = grid_configs("tiny", seeds=seeds, epochs=epochs, lr=0.05, batch_size=16)
    return [dataclasses.replace(c, channels=(2, 4), hidden=8) for c in configs]


def _table_rows(report: str, momentum: str, loss: str) -> list[list[str]]:
    """The cells of every table row starting with (momentum, loss), in the report's order."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()]
    return [cells for cells in rows if cells[:2] == [momentum, loss]]


def test_tiny_grid_end_to_end(tmp_path):
    configs = _tiny_grid(seeds=3)
    grid = run_grid(configs, tmp_path, dataset=tiny_dataset(), device="cpu", quiet=True)
    paths = write_outputs(grid)
    image = matplotlib.image.imread(paths["figure"])
    assert image.ndim == 3 and image.shape[0] > 500  # two stacked panels
    assert paths["figure-mse"].exists()
    report = paths["report"].read_text()

    def final(loss: str, momentum: float, key: str) -> np.ndarray:
        return np.array([
            runs.read_jsonl(tmp_path / run_name(c) / "metrics.jsonl")[-1][key]
            for c in configs
            if c.loss == loss and c.momentum == momentum
        ])  # fmt: skip

    train = final("qmse", 0.9, "train_acc")
    cells, paired = _table_rows(report, "0.9", "qmse")
    assert cells[2:4] == ["0.05", "3"] and paired[2] == "3"
    assert cells[4] == f"{100 * train.mean():.2f} ± {100 * train.std(ddof=1):.2f}"
    delta = final("qmse", 0.9, "train_mse") - final("mse", 0.9, "train_mse")
    lo, hi = stats.t.interval(0.95, 2, loc=delta.mean(), scale=stats.sem(delta))
    assert re.fullmatch(r"\S+ \[\S+, \S+\]", paired[3])
    shown = [float(x) for x in re.findall(r"-?[0-9.e-]+", paired[3])]
    assert shown == pytest.approx([delta.mean(), lo, hi], rel=5e-3)
    assert len(re.findall(r"^- All runs, momentum", report, flags=re.M)) == 4
    assert (tmp_path / "grid.json").exists()

    # finished runs are skipped: checkpoints untouched
    def stamps() -> list[int]:
        return [(tmp_path / run_name(c) / "checkpoint.pt").stat().st_mtime_ns for c in configs]

    before = stamps()
    run_grid(configs, tmp_path, dataset=tiny_dataset(), device="cpu", quiet=True)
    assert stamps() == before

    # a diverged run is excluded and named; two pairs left: undetermined
    runs.save_json(tmp_path / "qmse-m0-s1" / "diverged.json", {"epoch": 2, "message": "x"})
    report = write_outputs(run_grid(configs, tmp_path, dataset=tiny_dataset(), quiet=True))[
        "report"
    ]
    text = report.read_text()
    assert "Diverged (non-finite loss, excluded): qmse-m0-s1." in text
    final, paired = _table_rows(text, "0", "qmse")
    assert final[3] == "2 (+1 diverged)" and paired[2] == "2"
    assert "- All runs, momentum 0: diverged, so left out of the pairs: qmse ×1." in text
    assert "momentum 0: QMSE's final train ½‖r‖² (the MSE yardstick) against MSE's: **undet" in text

    # an unfinished run (fewer epochs than planned) is excluded and named
    metrics = tmp_path / "mse-m0.9-s0" / "metrics.jsonl"
    runs.write_jsonl(metrics, runs.read_jsonl(metrics)[:1])
    text = write_report(load_results(tmp_path, configs), tmp_path / "r.md").read_text()
    assert "Unfinished (excluded): mse-m0.9-s0 (1/2 epochs)." in text
    assert _table_rows(text, "0.9", "mse")[0][3] == "2"


def test_cli_reproduce_on_idx_fixture_files(tmp_path, capsys, monkeypatch):
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

    # the report from the files alone: no checkpoints, no data
    report = (out / "report.md").read_text()
    for path in out.rglob("checkpoint.pt"):
        path.unlink()
    shutil.rmtree(tmp_path / "data")
    (out / "report.md").unlink()
    assert main(["reproduce", "--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report

    # a sweep piece: no evaluation run yet, so a report and the sweeps' figure only
    swept = ["--tune", "--max-extend", "0", "--piece", "sweep-m0", "--out", str(tmp_path / "t")]
    write_mnist(tmp_path / "data" / "fashion-mnist", n_train=48, n_test=24)
    capsys.readouterr()
    assert main([*argv, *swept]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"figure-sweeps: {tmp_path / 't' / 'figure-sweeps.png'}",
        f"report: {tmp_path / 't' / 'report.md'}",
    ]
    assert len(list((tmp_path / "t" / SWEEP_DIR).glob("*-m0-s100-*"))) == 2 * 3

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the extra is missing
    assert main([*argv, "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "qmse reproduce: error: --tensorboard needs TensorBoard" in capsys.readouterr().err


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
    with pytest.raises(ValueError, match="diagnosis reads each run's data from disk"):
        run_grid(configs, tmp_path / "d", dataset=tiny_dataset(), diagnosis={}, quiet=True)
    other = [dataclasses.replace(c, lr=0.07) for c in configs]
    with pytest.raises(ValueError, match="lr=0.05"):
        run_grid(other, tmp_path / "par", dataset=tiny_dataset(), quiet=True)


def _end_grid(data_dir) -> list:
    losses = ("mse", "qmse", "label-noise")
    configs = grid_configs(
        "mnist", seeds=3, epochs=2, lr=0.05, batch_size=16, losses=losses, momenta=(0.9,),
        loss_params=loss_params_for(losses, {"sigma": 0.2}), eval_every=2,
        data_dir=str(data_dir), allow_unverified_data=True,
    )  # fmt: skip
    return [dataclasses.replace(c, channels=(2, 4), hidden=8) for c in configs]


def test_a_tuned_diagnosed_grid_in_pieces(tmp_path):
    configs = _end_grid(write_tiny_mnist(tmp_path / "data"))
    out = tmp_path / "grid"
    tuning = Tuning(seed=50, max_extend=1, start_step=0.25)  # momentum 0.9: from lr 0.025
    kw = dict(tuning=tuning, device="cpu", quiet=True,
              diagnosis={"samples": 8, "lanczos_steps": 4, "trace_samples": 2})  # fmt: skip
    with pytest.raises(ValueError, match="pieces are all, sweep, sweep-m0.9, seed0"):
        run_grid(configs, out, piece="seed9", **kw)
    with pytest.raises(ValueError, match="held-out seed 2 is an evaluation seed"):
        run_grid(configs, out, **{**kw, "tuning": Tuning(seed=2)})
    assert tuning.start(configs[0]).lr == 0.025
    with pytest.raises(ValueError, match="--piece sweep"):
        run_grid(configs, out, piece="seed0", **kw)

    run_grid(configs, out, piece="sweep-m0.9", **kw)
    grid = runs.load_json(out / "grid.json")
    chosen = grid["tuning"]["chosen"]
    assert [c["loss"] for c in chosen] == ["mse", "qmse", "label-noise"]
    for c in chosen:  # brute force over the sweep's runs: the best at its σ, inside its grid
        scores = {}
        for path in (out / SWEEP_DIR).glob(f"{c['loss']}-m0.9-s50-*/metrics.jsonl"):
            run = runs.load_json(path.parent / "config.json")
            if run["loss_params"] == c["loss_params"]:
                scores[run["lr"]] = runs.read_jsonl(path)[-1][yardstick(c["loss"])]
        assert min(scores, key=scores.get) == c["lr"] and c["seed"] == 50
        for neighbour in (c["lr"] / 2, c["lr"] * 2):  # inside its grid, unless bounded out
            assert neighbour in scores or not 0.025 / 4 <= neighbour <= 0.025 * 4

    # a lost sweep run is retrained alone, to the same choice
    lost = next((out / SWEEP_DIR).glob("mse-*/metrics.jsonl")).parent
    shutil.rmtree(lost)
    kept = {p: p.stat().st_mtime_ns for p in (out / SWEEP_DIR).glob("*/checkpoint.pt")}
    run_grid(configs, out, piece="sweep", **kw)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (lost / "checkpoint.pt").exists()
    assert runs.load_json(out / "grid.json")["tuning"]["chosen"] == chosen

    for seed in range(3):
        paths = write_outputs(run_grid(configs, out, piece=f"seed{seed}", **kw))
    grid = runs.load_json(out / "grid.json")
    own, common = grid["sets"]
    assert own["name"] == "own-lr" and common["name"] == "common-lr" and len(own["runs"]) == 9
    for name in grid["runs"]:
        assert (out / name / "diagnosis.json").exists()
    mse_lr = chosen[0]["lr"]
    assert f"mse-m0.9-s1{'' if mse_lr == 0.05 else f'-lr{mse_lr:g}'}" in own["runs"]
    report = paths["report"].read_text()
    assert "## Step sizes" in report and "At lr 0.05 for every method" in report
    assert paths["figure-sweeps"].stat().st_size > 0 and "![figure-sweeps.png]" in report
    stops = [
        runs.load_json(out / n / "diagnosis.json")["stop"]["whole_set_label"]
        for n in own["runs"]
        if n.startswith("mse-")
    ]
    mse_rows = _table_rows(report, "0.9", "mse")  # step sizes, own-lr final, own-lr stops, ...
    assert mse_rows[2][3] == ", ".join(f"{c} ×{stops.count(c)}" for c in sorted(set(stops)))
    assert "At each method's own lr, momentum 0.9: MSE ended in the stopping case" in report

    # the report from the files a commit keeps: no checkpoints, no data
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint.pt", ".lock"))
    shutil.rmtree(tmp_path / "data")
    (copy / "report.md").unlink()
    write_outputs(copy)
    assert (copy / "report.md").read_text() == report
