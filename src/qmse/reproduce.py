"""The paper's experiment grid (sec. 4, figs. 1-3), its figure and an honest report.

Grid: losses {mse, qmse} (+ expected-qmse and ce as the ablation) × SGD momentum {0, 0.9}
× seeds. Runs with the same seed share their initial weights and batch order, so QMSE − MSE
is a paired difference per seed; the report gives its mean with a 95 % Student-t interval
and says plainly whether QMSE's final train accuracy is higher, equal within noise, or lower.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qmse import runs
from qmse.rundir import (
    NonFiniteLossError,
    TrainConfig,
    differing_keys,
    load_dataset,
    resolve_device,
    run_name,
)
from qmse.stacked import train_many
from qmse.stats import mean_ci, mean_std
from qmse.sweep import run_tasks, train_task
from qmse.train import PAPER_LR, train_run

LOSSES = ("mse", "qmse")
ABLATION = ("expected-qmse", "ce")
MOMENTA = (0.0, 0.9)
_STYLE = {  # loss -> (colour, label)
    "mse": ("tab:blue", "MSE"),
    "qmse": ("tab:red", "QMSE"),
    "expected-qmse": ("tab:green", "expected-QMSE"),
    "ce": ("tab:gray", "CE"),
}


def grid_configs(
    dataset: str,
    *,
    seeds: int = 5,
    epochs: int = 100,
    lr: float | None = None,
    with_ablation: bool = False,
    batch_size: int = 128,
    train_subset: int | None = None,
    test_subset: int | None = None,
    data_dir: str | None = None,
    allow_unverified_data: bool = False,
) -> list[TrainConfig]:
    """The grid's run configs: losses × momenta × seeds 0..seeds−1, at the paper's learning
    rate for `dataset` (PAPER_LR) unless `lr` is given."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds}; need at least one seed (the report wants >= 2)")
    if lr is None:
        if dataset not in PAPER_LR:
            raise ValueError(f"no paper learning rate for dataset {dataset!r}; pass lr")
        lr = PAPER_LR[dataset]
    losses = LOSSES + ABLATION if with_ablation else LOSSES
    return [
        TrainConfig(
            dataset=dataset,
            data_dir=data_dir,
            train_subset=train_subset,
            test_subset=test_subset,
            loss=loss,
            lr=lr,
            momentum=momentum,
            batch_size=batch_size,
            epochs=epochs,
            seed=seed,
            allow_unverified_data=allow_unverified_data,
        )
        for seed in range(seeds)  # seed-major: an interrupted grid has whole seeds
        for momentum in MOMENTA
        for loss in losses
    ]


def run_grid(
    configs: Sequence[TrainConfig],
    out_dir: str | Path,
    *,
    dataset: Any = None,
    device: torch.device | str = "auto",
    parallel: int = 1,
    backend: str = "local",
    address: str | None = None,
    cpus_per_task: float = 1,
    gpus_per_task: float = 0,
    quiet: bool = False,
) -> dict[str, Path]:
    """Train every config into `out_dir/<run_name>` (finished runs are skipped, unfinished
    ones continued), then write figure.png and report.md; returns their paths. `out_dir`
    is claimed as a grid (`qmse.runs.claim`) for the whole call; a run in it that holds
    other settings is refused before anything is trained.

    `backend="ray"` trains each group of runs as a Ray task (`qmse.sweep.run_tasks`: the
    cluster at `address`, else a local one; `cpus_per_task` CPUs and `gpus_per_task` GPUs
    each; a task whose worker dies is retried and resumes). Its workers read the data set
    from the configs' data_dir and resolve `device` themselves; the files are the same.

    `dataset` (a qmse.data.Dataset) is loaded once from configs[0] when not given.
    `parallel` > 1 trains up to that many runs at once with `train_many` (one stacked model);
    the run directories are the same either way.
    """
    if parallel < 1:
        raise ValueError(f"parallel={parallel}; expected a positive number of runs at once")
    if backend != "local" and dataset is not None:
        raise ValueError("dataset= is for backend='local'; Ray workers load it from data_dir")
    if not configs:
        raise ValueError("configs is empty; grid_configs makes the paper's grid")
    out, remote_device = Path(out_dir), str(device)
    # Ray workers resolve `device` themselves; this process only writes files then
    device = resolve_device(device) if backend == "local" else torch.device("cpu")
    if dataset is None and backend == "local":
        dataset = load_dataset(configs[0])
    with runs.claim(out, "grid", recognise=lambda d: (d / "grid.json").exists()):
        return _run_grid(configs, out, dataset, device, remote_device, parallel, backend, address,
                         cpus_per_task, gpus_per_task, quiet)  # fmt: skip


def _run_grid(
    configs: Sequence[TrainConfig],
    out: Path,
    dataset: Any,
    device: torch.device,
    remote_device: str,
    parallel: int,
    backend: str,
    address: str | None,
    cpus_per_task: float,
    gpus_per_task: float,
    quiet: bool,
) -> dict[str, Path]:
    """run_grid's work once its directory is claimed."""
    groups = _groups(configs, out, parallel)  # checks the runs already there first
    runs.save_json(
        out / "grid.json",
        {
            "runs": [run_name(c) for c in configs],
            "configs": [asdict(c) for c in configs],
            "provenance": runs.provenance(device),
        },
    )
    t0 = time.perf_counter()
    if backend != "local":  # the loop below then finds every run finished or diverged
        tasks = [
            {
                "configs": [asdict(c) for c in group],
                "out_dirs": [str(out / run_name(c)) for c in group],
                "device": remote_device,
            }
            for group in groups
        ]
        run_tasks(
            train_task,
            tasks,
            backend=backend,
            address=address,
            num_cpus_per_task=cpus_per_task,
            num_gpus_per_task=gpus_per_task,
            quiet=quiet,
            desc="grid",
        )
    if backend != "local":  # what the tasks left: diverged runs only, or nothing
        groups = _groups(configs, out, parallel)
    kw = {"quiet": quiet}
    bar = runs.progress(total=len(configs), quiet=quiet, desc="grid", unit="run")
    for group in groups:
        dirs = [out / run_name(c) for c in group]
        try:
            if len(group) == 1:
                rows = [train_run(group[0], dirs[0], dataset=dataset, device=device, **kw)]
            else:
                rows = train_many(group, dirs, dataset=dataset, device=device, **kw)
        except NonFiniteLossError as e:
            bar.write(f"diverged: {e}")
            rows = [[] for _ in group]
        for cfg, r in zip(group, rows):
            if not quiet and r:
                bar.write(
                    f"{run_name(cfg)}: epoch {r[-1]['epoch']} train acc {r[-1]['train_acc']:.4f} "
                    f"test acc {r[-1]['test_acc']:.4f}"
                )
        bar.update(len(group))
    if not quiet:
        bar.write(f"grid done in {time.perf_counter() - t0:.0f} s")
    results = load_results(out, configs)
    figure = write_figure(results, out / "figure.png")
    report = write_report(results, out / "report.md")
    return {"figure": figure, "report": report}


def _groups(configs: Sequence[TrainConfig], out: Path, parallel: int) -> list[list[TrainConfig]]:
    """The runs still to train, in order, in groups `train_many` accepts: same epoch reached,
    at most `parallel` each. Finished and diverged runs are left out; a diverged one is
    reported by `load_results`."""
    by_epoch: dict[int, list[TrainConfig]] = {}
    for cfg in configs:
        run = out / run_name(cfg)
        if (run / "config.json").exists():
            saved = runs.load_json(run / "config.json")
            wanted = json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists
            if diff := [k for k in differing_keys(saved, wanted) if k != "model"]:
                settings = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{run} holds a run with other settings ({settings}); use another "
                    f"output directory for this grid"
                )
        done = len(runs.read_jsonl(run / "metrics.jsonl"))
        if done < cfg.epochs and not (run / "diverged.json").exists():
            by_epoch.setdefault(done, []).append(cfg)
    return [
        group[i : i + parallel]
        for group in by_epoch.values()
        for i in range(0, len(group), parallel)
    ]


def load_results(out_dir: str | Path, configs: Sequence[TrainConfig]) -> list[dict]:
    """One entry per config: its settings, metric rows, seconds of its epochs (timings.jsonl),
    whether it diverged, and whether it is complete (finished all its epochs without
    diverging; only those enter figure and tables)."""
    out = Path(out_dir)
    results = []
    for cfg in configs:
        rows = runs.read_jsonl(out / run_name(cfg) / "metrics.jsonl")
        timings = runs.read_jsonl(out / run_name(cfg) / "timings.jsonl")
        diverged = (out / run_name(cfg) / "diverged.json").exists()
        results.append(
            {
                "config": cfg,
                "rows": rows[: cfg.epochs],
                "wall_s": sum(t["wall_s"] for t in timings[: cfg.epochs]),
                "diverged": diverged,
                "complete": len(rows) >= cfg.epochs and not diverged,
            }
        )
    return results


def _curves(results: list[dict], loss: str, momentum: float, key: str) -> np.ndarray:
    """(seeds, epochs) array of `key` for the complete runs of a setting."""
    rows = [
        r["rows"]
        for r in results
        if r["config"].loss == loss and r["config"].momentum == momentum and r["complete"]
    ]
    if not rows:
        return np.zeros((0, 0))
    return np.array([[row[key] for row in r] for r in rows])


def write_figure(results: list[dict], path: str | Path) -> Path:
    """The paper's layout: one row per momentum (top 0, bottom 0.9), train (solid) and test
    (dashed) accuracy per epoch for each loss, mean over seeds with a min–max band; beside
    each panel a zoom on the last 20 % of epochs (shaded in the panel)."""
    path = Path(path)
    losses = [loss for loss in _STYLE if any(r["config"].loss == loss for r in results)]
    momenta = sorted({r["config"].momentum for r in results})
    fig = Figure(figsize=(11, 3.8 * len(momenta) + 0.8))
    axes = fig.subplots(len(momenta), 2, gridspec_kw={"width_ratios": [3, 1]}, squeeze=False)
    for (ax, zoom), momentum in zip(axes, momenta):
        last = 0
        for loss in losses:
            colour, label = _STYLE[loss]
            for key, style, what in (("train_acc", "-", "train"), ("test_acc", "--", "test")):
                values = _curves(results, loss, momentum, key)  # (seeds, epochs)
                if values.size == 0:
                    continue
                epochs = np.arange(1, values.shape[1] + 1)
                for a in (ax, zoom):
                    a.plot(epochs, values.mean(0), style, color=colour, lw=1.5)
                    a.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.2)
                ax.lines[-1].set_label(f"{label} {what} (n={values.shape[0]})")
                last = max(last, len(epochs))
        if last:
            lo = max(1, last - max(1, round(0.2 * last)))  # 100 epochs: 80–100, as the paper
            zoom.set_xlim(lo, last) if last > lo else zoom.set_xlim(lo - 0.5, lo + 0.5)
            shown = [
                y
                for line in zoom.lines
                for x, y in zip(*line.get_data())
                if lo <= x <= last  # the zoom's y-range follows the mean lines
            ]
            pad = max(1e-3, 0.1 * (max(shown) - min(shown)))
            zoom.set_ylim(min(shown) - pad, max(shown) + pad)
            zoom.set_title(f"last 20 %: epochs {lo}–{last}", fontsize=9)
            ax.axvspan(lo, last, color="0.94", zorder=0)
        ax.set_title(f"SGD momentum {momentum:g}")
        for a in (ax, zoom):
            a.set_xlabel("epoch")
            a.grid(alpha=0.3)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    cfg = results[0]["config"]
    subset = f", first {cfg.train_subset} train images" if cfg.train_subset else ""
    fig.suptitle(
        f"SimpleCNN on {cfg.dataset}{subset}: lr {cfg.lr:g}, batch {cfg.batch_size}; "
        f"mean and min–max over seeds",
        fontsize=10,
    )
    rows_of_legend = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0.03 * rows_of_legend + 0.01, 1, 1))
    runs.save_figure(path, fig)
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _final(results: list[dict], loss: str, momentum: float) -> dict[int, dict]:
    """seed -> last metric row, for the complete runs of a setting."""
    return {
        r["config"].seed: r["rows"][-1]
        for r in results
        if r["config"].loss == loss and r["config"].momentum == momentum and r["complete"]
    }


def verdict(deltas: Sequence[float]) -> tuple[str, float, float, float]:
    """ "higher", "lower" or "equal within noise" from paired differences (95 % t-interval
    excludes 0 or not); "undetermined" with fewer than two pairs."""
    if not deltas:
        return "undetermined (no paired seeds)", math.nan, math.nan, math.nan
    m, lo, hi = mean_ci(deltas)
    if len(deltas) < 2:
        return "undetermined (fewer than two paired seeds)", m, lo, hi
    if lo > 0:
        return "higher", m, lo, hi
    if hi < 0:
        return "lower", m, lo, hi
    return "equal within noise", m, lo, hi


def write_report(results: list[dict], path: str | Path) -> Path:
    """report.md: final-epoch mean ± std per setting, the paired QMSE − MSE (and ablation −
    MSE) differences with 95 % t-intervals, and one plain verdict line per momentum."""
    path = Path(path)
    cfg = results[0]["config"]
    losses = [loss for loss in _STYLE if any(r["config"].loss == loss for r in results)]
    momenta = sorted({r["config"].momentum for r in results})
    wall = sum(r["wall_s"] for r in results)
    seeds = sorted({r["config"].seed for r in results})
    subset = f"first {cfg.train_subset}" if cfg.train_subset else "all"
    test = f"first {cfg.test_subset}" if cfg.test_subset else "all"
    lines = [
        f"# QMSE vs MSE on {cfg.dataset}: the paper's grid (sec. 4)",
        "",
        f"SimpleCNN, SGD lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.epochs} epochs planned, "
        f"seeds {seeds[0]}–{seeds[-1]} ({len(seeds)}), training images: {subset}, test "
        f"images: {test}. {sum(r['complete'] for r in results)} of {len(results)} runs "
        f"complete; training + evaluation time summed over runs: {wall:.0f} s.",
        "Accuracies in %, measured after the last epoch on the full (sub)sets in eval mode.",
        "",
        "## Final epoch, mean ± std over seeds",
        "",
        "| momentum | loss | seeds | train acc | test acc | train ½‖r‖² |",
        "|---|---|---|---|---|---|",
    ]
    for momentum in momenta:
        for loss in losses:
            final = _final(results, loss, momentum)
            if not final:
                lines.append(f"| {momentum:g} | {loss} | 0 | – | – | – |")
                continue
            cells = []
            for key, fmt in (
                ("train_acc", _pct),
                ("test_acc", _pct),
                ("train_mse", "{:.4f}".format),
            ):
                m, s = mean_std([row[key] for row in final.values()])
                cells.append(f"{fmt(m)} ± {fmt(s)}")
            lines.append(f"| {momentum:g} | {loss} | {len(final)} | " + " | ".join(cells) + " |")
    if "ce" in losses:
        lines += ["", "For CE, ½‖r‖² is measured on the raw logits (not probabilities)."]
    diverged = [run_name(r["config"]) for r in results if r["diverged"]]
    if diverged:
        lines += ["", f"Diverged (non-finite loss, excluded): {', '.join(diverged)}."]
    unfinished = [
        f"{run_name(r['config'])} ({len(r['rows'])}/{r['config'].epochs} epochs)"
        for r in results
        if not r["complete"] and not r["diverged"]
    ]
    if unfinished:
        lines += ["", f"Unfinished (excluded): {', '.join(unfinished)}."]

    lines += [
        "",
        "## Paired differences against MSE (same seed: same initial weights and batch order)",
        "",
        "| momentum | loss − MSE | pairs | Δ train acc [95 % CI] | Δ test acc [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for momentum in momenta:
        base = _final(results, "mse", momentum)
        for loss in losses[1:]:
            other = _final(results, loss, momentum)
            paired = sorted(set(base) & set(other))
            cells = []
            for key in ("train_acc", "test_acc"):
                word, m, lo, hi = verdict([other[s][key] - base[s][key] for s in paired])
                cells.append(f"{_pct(m)} [{_pct(lo)}, {_pct(hi)}]" if paired else "–")
                if loss == "qmse" and key == "train_acc":
                    verdicts.append(
                        f"- Momentum {momentum:g}: QMSE's final train accuracy against MSE's: "
                        f"**{word}** (Δ = {_pct(m)} points, 95 % CI [{_pct(lo)}, "
                        f"{_pct(hi)}], {len(paired)} paired seeds)."
                    )
            lines.append(f"| {momentum:g} | {loss} | {len(paired)} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdict", "", *verdicts, ""]
    runs.atomic_write(path, "\n".join(lines))
    return path
