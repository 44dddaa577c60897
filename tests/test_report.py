"""qmse.report: the verdict's statistics against scipy, the rules for few seeds and for
identical differences, a report written from hand-made metrics files checked number by
number, and the committed docs/fmnist-end/ report regenerated from its committed files."""

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from scipy import stats

from qmse import runs
from qmse.report import interval_cell, verdict, write_outputs
from qmse.rundir import run_name

DOCS_GRID = Path(__file__).resolve().parent.parent / "docs" / "fmnist-end"


def test_verdict_uses_the_student_t_interval():
    deltas = [0.010, 0.013, 0.008, 0.011, 0.012]
    word, m, lo, hi = verdict(deltas)
    ref_lo, ref_hi = stats.t.interval(
        0.95, len(deltas) - 1, loc=np.mean(deltas), scale=stats.sem(deltas)
    )
    assert word == "higher" and math.isclose(m, np.mean(deltas))
    assert math.isclose(lo, ref_lo) and math.isclose(hi, ref_hi)
    assert verdict([-d for d in deltas])[0] == "lower"
    assert verdict([0.01, -0.012, 0.004])[0].startswith("not determined")


def test_one_or_two_seeds_are_undetermined_never_equal():
    assert verdict([])[0].startswith("undetermined")
    assert verdict([0.5])[0].startswith("undetermined")
    word, m, lo, hi = verdict([0.01, -0.012])  # an interval exists, the verdict does not
    assert word.startswith("undetermined") and lo < 0 < hi
    assert verdict([0.3, 0.31])[0].startswith("undetermined")  # even if it excludes 0


def test_identical_differences_have_no_interval_of_zero_width():
    word, m, lo, hi = verdict([0.0] * 5)
    assert word.startswith("equal in every seed") and math.isnan(lo) and math.isnan(hi)
    assert verdict([0.02] * 4)[0].startswith("higher in every seed")
    assert verdict([0.02, 0.02])[0].startswith("undetermined")
    assert interval_cell([0.0] * 5, "pct") == "0.00 (same in all 5)"
    assert interval_cell([0.25], "pct") == "25.00 (1 pair)"
    assert interval_cell([], "g") == "–"


def test_interval_ends_get_the_digits_that_tell_them_apart():
    deltas = [1e-5, 2e-5, 1.5e-5]  # in points: [0.00026, 0.0027]; 2 decimals would read 0.00
    ref = stats.t.interval(0.95, 2, loc=np.mean(deltas), scale=stats.sem(deltas))
    cell = interval_cell(deltas, "pct")
    ends = cell.split("[")[1].rstrip("]").split(", ")
    assert ends == [f"{100 * ref[0]:.4f}", f"{100 * ref[1]:.4f}"] and ends[0] != ends[1]
    assert cell.startswith(f"{100 * np.mean(deltas):.4f} [")
    big = [0.5, 0.7, 0.6]  # a wide interval keeps 2 decimals
    ref = stats.t.interval(0.95, 2, loc=0.6, scale=stats.sem(big))
    assert interval_cell(big, "pct") == f"60.00 [{100 * ref[0]:.2f}, {100 * ref[1]:.2f}]"
    close = [1.0001, 1.0002, 1.00015]  # "g": enough significant digits for the width
    ref = stats.t.interval(0.95, 2, loc=np.mean(close), scale=stats.sem(close))
    assert interval_cell(close, "g") == f"{np.mean(close):.6g} [{ref[0]:.6g}, {ref[1]:.6g}]"


def _fake_grid(out: Path, values: dict, epochs: int = 4) -> list:
    """A grid folder of hand-made metrics files: values[(loss, momentum, seed)] = final
    (train_acc, train_mse, test_acc); the epochs before count down to them."""
    configs = [
        tiny_config(loss=loss, momentum=m, seed=s, epochs=epochs, eval_every=3)
        for (loss, m, s) in values
    ]
    for c in configs:
        acc, mse, test = values[(c.loss, c.momentum, c.seed)]
        rows = []
        for e in range(1, epochs + 1):
            row = {"epoch": e}
            if e % 3 == 0 or e == epochs:
                scale = 2.0 ** (epochs - e)
                row |= {"train_acc": acc / scale, "train_loss": 2 * mse * scale,
                        "train_mse": mse * scale, "test_acc": test / scale,
                        "test_loss": 0.0, "test_mse": 0.0}  # fmt: skip
            row |= {"running_train_acc": 0.5, "running_train_loss": 1.0, "grad_norm": 1.0}
            rows.append(row)
        runs.write_jsonl(out / run_name(c) / "metrics.jsonl", rows)
        runs.write_jsonl(out / run_name(c) / "timings.jsonl", [{"epoch": 1, "wall_s": 1.5}])
    runs.save_json(
        out / "grid.json",
        {"runs": [run_name(c) for c in configs],
         "configs": [dataclasses.asdict(c) for c in configs]},
    )  # fmt: skip
    return configs


def _rows(report: str, momentum: str, loss: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()]
    return [cells for cells in rows if cells[:2] == [momentum, loss]]


def test_a_report_from_metrics_files_alone(tmp_path):
    rng = np.random.default_rng(0)
    values = {}
    for s in range(4):
        for m in (0.0, 0.9):
            values[("mse", m, s)] = (1.0, 0.01 + 0.001 * rng.random(), 0.8)
            values[("qmse", m, s)] = (1.0, 0.02 + 0.001 * rng.random(), 0.8 + 0.01 * s)
    _fake_grid(tmp_path, values)
    paths = write_outputs(tmp_path)
    assert {"figure", "figure-mse", "report"} <= set(paths)
    text = paths["report"].read_text()
    assert "training + evaluation time summed over runs: 24 s" in text
    assert "every 3 epochs and after the last" in text

    final, paired = _rows(text, "0.9", "qmse")
    q = np.array([values[("qmse", 0.9, s)][1] for s in range(4)])
    b = np.array([values[("mse", 0.9, s)][1] for s in range(4)])
    assert final[3] == "4" and final[6] == f"{q.mean():.4g} ± {q.std(ddof=1):.2g}"
    assert final[4] == "100.00 ± 0.00"  # the same accuracy everywhere: std 0 is a std
    d = q - b
    lo, hi = stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
    assert paired[3] == f"{d.mean():.3g} [{lo:.3g}, {hi:.3g}]"
    lr = np.log(q / b)  # the paired log-ratio, exponentiated
    rlo, rhi = np.exp(stats.t.interval(0.95, 3, loc=lr.mean(), scale=stats.sem(lr)))
    assert paired[4] == f"{np.exp(lr.mean()):.3g} [{rlo:.3g}, {rhi:.3g}]"
    assert paired[5] == "0.00 (same in all 4)"  # Δ train acc: 0 in every seed, no [0, 0]
    dt = np.array([0.01 * s for s in range(4)])
    tlo, thi = stats.t.interval(0.95, 3, loc=dt.mean(), scale=stats.sem(dt))
    assert paired[6] == f"{100 * dt.mean():.2f} [{100 * tlo:.2f}, {100 * thi:.2f}]"
    assert "QMSE's final train ½‖r‖² (the MSE yardstick) against MSE's: **higher**" in text
    assert "QMSE's final train accuracy against MSE's: **equal in every seed" in text
    assert "[0.00, 0.00]" not in text

    # two seeds only: undetermined, whatever the numbers say
    two = tmp_path / "two"
    _fake_grid(two, {k: v for k, v in values.items() if k[2] < 2})
    text = write_outputs(two)["report"].read_text()
    assert text.count("**undetermined (2 paired seeds; 3 needed)**") == 4
    assert "not determined" not in text


@pytest.mark.parametrize("name", ["fmnist-end", "fmnist-300", "fmnist-full"])
def test_the_committed_grid_reports_are_recomputed_from_their_files(tmp_path, name):
    grid = DOCS_GRID.parent / name
    if not (grid / "grid.json").exists():
        pytest.skip(f"docs/{name}/ is not committed yet: run its grid (Makefile)")
    copy = tmp_path / name
    shutil.copytree(grid, copy)
    assert not list(copy.rglob("checkpoint.pt"))  # the numbers come from metrics files
    write_outputs(copy)
    assert (copy / "report.md").read_text() == (grid / "report.md").read_text()
