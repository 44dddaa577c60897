"""The finished runs of a grid, read from their files: one typed `RunResult` per run (config,
metric rows, wall time, diagnosis, whether it diverged or is complete), and the selections
the report and the figures make of them. No checkpoint is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmse import runs
from qmse.config import TrainConfig
from qmse.rundir import run_name

STYLED = ("mse", "qmse", "expected-qmse", "label-noise", "ce")  # shown first, in this order


@dataclass(frozen=True)
class RunResult:
    """One run of a grid as its files give it: its folder `name`, its `config`, its metric
    rows (metrics.jsonl, one per epoch, up to the config's epochs), the seconds of those
    epochs (timings.jsonl), its diagnosis.json (None if absent), whether it diverged
    (diverged.json) and whether it is complete (all its epochs, the last one measured, not
    diverged: only complete runs enter figures and tables)."""

    name: str
    config: TrainConfig
    rows: list[dict]
    wall_s: float
    diverged: bool
    complete: bool
    diagnosis: dict | None


def load_results(
    out_dir: str | Path, configs: Sequence[TrainConfig], names: Sequence[str] | None = None
) -> list[RunResult]:
    """One `RunResult` per config, from its folder in `out_dir` (default run_name)."""
    out = Path(out_dir)
    names = [run_name(c) for c in configs] if names is None else list(names)
    results = []
    for cfg, name in zip(configs, names, strict=True):
        run = out / name
        rows = runs.read_jsonl(run / "metrics.jsonl")[: cfg.epochs]
        timings = runs.read_jsonl(run / "timings.jsonl")[: cfg.epochs]
        diverged = (run / "diverged.json").exists()
        # a run extended past the grid's epochs may not have measured the grid's last one
        complete = len(rows) >= cfg.epochs and not diverged and "train_mse" in rows[-1]
        diagnosis = None
        if complete and (run / "diagnosis.json").exists():
            diagnosis = runs.load_json(run / "diagnosis.json")
        wall = sum(t["wall_s"] for t in timings)
        results.append(RunResult(name, cfg, rows, wall, diverged, complete, diagnosis))
    return results


def runs_of(results: list[RunResult], loss: str, momentum: float) -> list[RunResult]:
    """The complete runs of a setting (loss, momentum)."""
    return [
        r for r in results if r.config.loss == loss and r.config.momentum == momentum and r.complete
    ]


def curves(
    results: list[RunResult], loss: str, momentum: float, key: str
) -> tuple[np.ndarray, ...]:
    """(epochs (E,), values (seeds, E)) of `key` over the epochs where it was measured, for
    the complete runs of a setting; empty arrays without any."""
    rows = [r.rows for r in runs_of(results, loss, momentum)]
    if not rows:
        return np.zeros(0), np.zeros((0, 0))
    epochs = np.array([row["epoch"] for row in rows[0] if key in row])
    return epochs, np.array([[row[key] for row in r if key in row] for r in rows])


def losses_of(results: list[RunResult]) -> list[str]:
    """The losses of `results`, the built-in ones first in STYLED's order, then the others."""
    seen = list(dict.fromkeys(r.config.loss for r in results))
    return [x for x in STYLED if x in seen] + [x for x in seen if x not in STYLED]


def lr_label(results: list[RunResult], loss: str, momentum: float) -> str:
    """'lr 0.01' (or 'lr 0.01/0.02' if a setting mixes them) of a setting's complete runs."""
    lrs = sorted({r.config.lr for r in runs_of(results, loss, momentum)})
    return "lr " + "/".join(f"{x:g}" for x in lrs)
