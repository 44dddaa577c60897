"""The one figure of hyper-parameter sweeps (`qmse.tuning` stage records), for the CNN grid's
step sizes and the escape benchmark's tuning alike."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from qmse.runs import save_figure

MARKERS = "osD^v<>p"  # with 8 colours: 64 distinct curves before a style repeats


class Sweep(NamedTuple):
    """One method's sweep for the figure: the panel row it belongs to (e.g. "momentum 0.9",
    "random-init, k=8"), its legend label, its stage records, and a colour (None: by order)."""

    panel: str
    label: str
    stages: Sequence[dict]
    colour: str | None = None


def plot_sweeps(
    sweeps: Sequence[Sweep],
    path: str | os.PathLike,
    *,
    ylabel: str,
    log_y: bool,
    title: str = "",
) -> bool:
    """Every stage of every sweep: its score against the swept value (log x), one panel per
    (row, parameter). A parameter's last stage (the one that fixed it) is solid, earlier
    passes faint and dashed; the chosen value is ringed; an unusable value (score inf: every
    run diverged) is an × on the panel's top edge; on a linear score axis (failure rates) the
    share of diverged runs is dotted. A joint search's stage (`qmse.tuning.search`) is a
    scatter against each parameter, the others varying. Colours by label (8, then markers
    change). Returns
    False (and writes nothing) when no stage has finished."""
    rows = list(dict.fromkeys(s.panel for s in sweeps if s.stages))
    params = list(dict.fromkeys(st["param"] for s in sweeps for st in s.stages))
    if not rows:
        return False
    labels = list(dict.fromkeys(s.label for s in sweeps))
    fig = Figure(figsize=(5.2 * len(params), 3.8 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), len(params), squeeze=False)
    for sweep in (s for s in sweeps if s.stages):
        i = labels.index(sweep.label)
        colour = sweep.colour or f"C{i % 8}"
        marker = MARKERS[(i // 8) % len(MARKERS)]
        for ax, param in zip(axes[rows.index(sweep.panel)], params):
            stages = [st for st in sweep.stages if st["param"] == param]
            for n, stage in enumerate(stages):
                _draw_stage(ax, stage, colour, marker, sweep.label, n == len(stages) - 1, log_y)
    for r, row in enumerate(rows):
        for c, param in enumerate(params):
            ax = axes[r, c]
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_formatter(NullFormatter())
            if log_y:
                ax.set_yscale("log")
            else:
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{row}: sweeps of {param}", fontsize=9)
            ax.set_xlabel(param)
            ax.grid(alpha=0.3, which="both")
            if ax.lines:
                ax.legend(fontsize=6, ncol=2)
        axes[r, 0].set_ylabel(ylabel)
    note = "ringed: chosen; ×: every run diverged; dashed: an earlier pass"
    if not log_y:
        note += "; dotted: share diverged"
    fig.suptitle(f"{title} ({note})" if title else note, fontsize=10)
    fig.tight_layout()
    save_figure(path, fig)
    return True


def _draw_stage(ax, stage: dict, colour: str, marker: str, label: str, final: bool, log_y):
    """One stage's curve on `ax` (see plot_sweeps)."""
    points = stage["points"]
    finite = [(p["value"], p["score"]) for p in points if math.isfinite(p["score"])]
    style = dict(color=colour, alpha=1.0 if final else 0.35, lw=1.2 if final else 0.9)
    line = "" if stage.get("joint") else "-" if final else "--"  # a joint search: a scatter
    if finite:
        ax.plot(*zip(*finite), line, marker=marker, ms=4, label=label if final else None,
                **style)  # fmt: skip
    if not log_y and not stage.get("joint"):
        ax.plot([p["value"] for p in points], [p["diverged"] for p in points], ":", **style)
    for p in points:
        if not math.isfinite(p["score"]):
            ax.plot(p["value"], 1, "x", ms=7, mew=1.5, transform=ax.get_xaxis_transform(),
                    clip_on=False, **style)  # fmt: skip
        elif final and p["value"] == stage["chosen"]:
            ax.plot(p["value"], p["score"], "o", ms=11, mfc="none", mec=colour, mew=1.5)
