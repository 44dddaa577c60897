"""The figures of a grid: accuracy per epoch in the paper's layout, and train ½‖r‖² per
epoch on a log scale, the quantity the paper's claim is about. Each draws
`qmse.results.RunResult`s with the object API of matplotlib and saves through
`qmse.runs.save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qmse import runs
from qmse.results import RunResult, curves, losses_of, lr_label
from qmse.stepsize import yardstick
from qmse.tuningplot import Sweep, plot_sweeps

STYLE = {  # loss -> (colour, label); other registered losses get PALETTE colours
    "mse": ("tab:blue", "MSE"),
    "qmse": ("tab:red", "QMSE"),
    "expected-qmse": ("tab:green", "expected-QMSE"),
    "label-noise": ("tab:purple", "label noise"),
    "ce": ("tab:gray", "CE"),
}
PALETTE = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def style(loss: str, losses: Sequence[str]) -> tuple[str, str]:
    """(colour, label) of `loss` among the `losses` drawn."""
    if loss in STYLE:
        return STYLE[loss]
    others = [x for x in losses if x not in STYLE]
    return PALETTE[others.index(loss) % len(PALETTE)], loss


def write_figure(results: list[RunResult], path: str | Path, title: str = "") -> Path:
    """The paper's layout: one row per momentum (top 0, bottom 0.9), train (solid) and test
    (dashed) accuracy per evaluated epoch for each loss, mean over seeds with a min–max band;
    beside each panel a zoom on the last 20 % of epochs (shaded in the panel)."""
    path = Path(path)
    losses = losses_of(results)
    momenta = sorted({r.config.momentum for r in results})
    fig = Figure(figsize=(11, 3.8 * len(momenta) + 0.8))
    axes = fig.subplots(len(momenta), 2, gridspec_kw={"width_ratios": [3, 1]}, squeeze=False)
    for (ax, zoom), momentum in zip(axes, momenta):
        last = 0
        for loss in losses:
            colour, label = style(loss, losses)
            for key, line, what in (("train_acc", "-", "train"), ("test_acc", "--", "test")):
                epochs, values = curves(results, loss, momentum, key)  # (E,), (seeds, E)
                if values.size == 0:
                    continue
                for a in (ax, zoom):
                    a.plot(epochs, values.mean(0), line, color=colour, lw=1.5)
                    a.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.2)
                ax.lines[-1].set_label(f"{label} {what} (n={values.shape[0]})")
                last = max(last, int(epochs[-1]))
        if last:
            lo = max(1, last - max(1, round(0.2 * last)))  # 100 epochs: 80–100, as the paper
            zoom.set_xlim(lo, last) if last > lo else zoom.set_xlim(lo - 0.5, lo + 0.5)
            shown = [y for line in zoom.lines for x, y in zip(*line.get_data()) if lo <= x <= last]
            if shown:  # the zoom's y-range follows the mean lines
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
    fig.suptitle(f"{_setup_title(results)}{title}; mean and min–max over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.03 * math.ceil(len(labels) / 4) + 0.01, 1, 1))
    runs.save_figure(path, fig)
    return path


def write_mse_figure(sets: dict[str, list[RunResult]], path: str | Path) -> Path:
    """Train ½‖r‖² per evaluated epoch on a log scale, the quantity the paper's claim is
    about: one panel per momentum (rows) and per set of runs (columns), one line per method
    (mean over seeds, min–max band). Losses not minimised at f = y (`qmse.stepsize.yardstick`:
    cross-entropy, whose logits grow without bound) are left out and named in the title."""
    path = Path(path)
    everything = [r for rs in sets.values() for r in rs]
    losses = [x for x in losses_of(everything) if yardstick(x) == "train_mse"]
    omitted = [x for x in losses_of(everything) if x not in losses]
    momenta = sorted({r.config.momentum for r in everything})
    fig = Figure(figsize=(5.5 * len(sets), 3.6 * len(momenta) + 0.6))
    axes = fig.subplots(len(momenta), len(sets), squeeze=False, sharey=True)
    for row, momentum in enumerate(momenta):
        for col, (title, results) in enumerate(sets.items()):
            ax = axes[row, col]
            for i, loss in enumerate(losses):
                epochs, values = curves(results, loss, momentum, "train_mse")
                if values.size == 0:
                    continue
                colour, label = style(loss, losses)
                ax.plot(epochs, values.mean(0), color=colour, lw=1.5, zorder=3 if i == 0 else 2,
                        label=f"{label} ({lr_label(results, loss, momentum)})")  # fmt: skip
                ax.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.2)
            ax.set_yscale("log")
            ax.set_title(f"{title}, momentum {momentum:g}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3, which="both")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=7)
        axes[row, 0].set_ylabel("train ½‖r‖² (mean per sample)")
    note = f" ({', '.join(omitted)}: not minimised at f = y, not drawn)" if omitted else ""
    fig.suptitle(f"{_setup_title(everything)}; mean and min–max over seeds{note}", fontsize=10)
    fig.tight_layout()
    runs.save_figure(path, fig)
    return path


def write_sweep_figure(sweeps: Sequence[tuple], path: str | Path) -> Path | None:
    """The step-size sweeps (`qmse.stepsize.replay_sweeps`: (base config, `Tuned`) pairs)
    drawn by `qmse.tuningplot.plot_sweeps`: the final score of each swept run against its
    knob's value, one row of panels per momentum; None (no figure) before any sweep run has
    finished."""
    losses = list(dict.fromkeys(base.loss for base, _ in sweeps))
    drawn = []
    for base, tuned in sorted(sweeps, key=lambda s: s[0].momentum):
        colour, label = style(base.loss, losses)
        name = f"{label} ({_judged_on(base.loss)})"
        drawn.append(Sweep(f"momentum {base.momentum:g}", name, tuned.stages, colour))
    title = "Sweeps on the held-out seed: final score per run"
    if not plot_sweeps(drawn, path, ylabel="final score", log_y=True, title=title):
        return None
    return Path(path)


def _judged_on(loss: str) -> str:
    """What a loss's sweep is judged on (`qmse.stepsize.yardstick`), for a legend."""
    return "train ½‖r‖²" if yardstick(loss) == "train_mse" else "its train loss"


def _setup_title(results: list[RunResult]) -> str:
    cfg = results[0].config
    subset = f", first {cfg.train_subset} train images" if cfg.train_subset else ""
    return f"SimpleCNN on {cfg.dataset}{subset}, batch {cfg.batch_size}"
