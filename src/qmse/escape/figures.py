"""The escape benchmark's figures, from its files alone: failure rates by method family,
every sweep, the expected best tuning score against the tuning budget, and performance
profiles across cells (DeepOBS, AlgoPerf and Sivaprasad et al. 2020 report these).

Each panel draws at most 8 methods (one family: `Method.family`, recorded in each row), so
that no two curves share a colour; divergence is marked; a benchmark of one k draws the
methods as categories, not spread along a fractional k axis; the published rates of
gd-population are drawn only where gd-population ran.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from qmse.escape.config import PROTOCOLS
from qmse.escape.rows import Row
from qmse.runs import save_figure
from qmse.tuningplot import Sweep, plot_sweeps

MARKERS = "osD^v<>p"


def families(rows: Sequence[Row]) -> list[str]:
    """The method families of `rows`, in order of first appearance ("methods" for rows of
    older files, which record none)."""
    return list(dict.fromkeys(r.family or "methods" for r in rows))


def plot_results(rows: Sequence[Row], path: str | os.PathLike, published: Mapping | None = None):
    """Failure rate with Wilson 95 % error bars, one panel per (protocol, family), one curve
    per method; the share of starts that diverged as hollow markers on a dotted line; one k:
    the methods as categories; `published` rates (k -> rate) as stars where gd-population
    ran."""
    protocols = [p for p in PROTOCOLS if any(r.protocol == p and r.seeds for r in rows)]
    groups = families(rows)
    if not protocols:
        return
    ks = sorted({r.k for r in rows})
    fig = Figure(figsize=(4.6 * len(groups), 3.8 * len(protocols) + 0.5))
    axes = fig.subplots(len(protocols), len(groups), squeeze=False)
    for row_axes, protocol in zip(axes, protocols):
        for ax, group in zip(row_axes, groups):
            sel = [r for r in rows if r.protocol == protocol and r.seeds > 0]
            sel = [r for r in sel if (r.family or "methods") == group]
            names = list(dict.fromkeys(r.method for r in sel))
            for i, name in enumerate(names):
                _draw_method(ax, sorted((r for r in sel if r.method == name), key=lambda r: r.k),
                             i, len(names), name, single=len(ks) == 1)  # fmt: skip
            ran = {r.k for r in sel if r.method == "gd-population"}
            stars = [(k, p) for k, p in (published or {}).items() if k in ran]
            if protocol == "random-init" and stars:
                xs = [0.0] if len(ks) == 1 else [k for k, _ in stars]
                ax.plot(xs, [p for _, p in stars], "k*", ms=10, label="Safran & Shamir 2018")
            if len(ks) == 1:
                ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
                ax.set_xlabel(f"k = {ks[0]}")
            else:
                ax.set_xlabel("k (teacher width)")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("failure rate" if protocol == "random-init" else "failure to escape")
            ax.set_title(f"{protocol}: {group}", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.lines and len(ks) > 1:
                ax.legend(fontsize=6)
    fig.suptitle("Failure rate [Wilson 95 %]; hollow on dotted: share diverged", fontsize=10)
    fig.tight_layout()
    save_figure(path, fig)


def _draw_method(ax, pts: list[Row], i: int, count: int, name: str, *, single: bool) -> None:
    """One method's failure rates (and diverged shares) on `ax`."""
    colour, marker = f"C{i % 8}", MARKERS[(i // 8) % len(MARKERS)]
    xs = [float(i)] if single else [r.k + 0.06 * (i - (count - 1) / 2) for r in pts]
    rate = [r.failure_rate for r in pts]
    err = [[max(0.0, r.failure_rate - r.ci95_low) for r in pts],
           [max(0.0, r.ci95_high - r.failure_rate) for r in pts]]  # fmt: skip
    ax.errorbar(xs, rate, yerr=err, marker=marker, ms=4, capsize=2, color=colour,
                ls="none" if single else "-", label=name)  # fmt: skip
    diverged = [r.diverged / r.seeds for r in pts]
    if any(diverged):
        ax.plot(xs, diverged, marker=marker, ms=5, mfc="none", color=colour,
                ls="none" if single else ":")  # fmt: skip


def plot_tuning(records: Sequence[dict], path: str | os.PathLike) -> None:
    """Every sweep (`qmse.tuningplot.plot_sweeps`, one row of panels per (protocol, tuning
    k)): the failure rate on the tuning starts against each swept value — a method's
    sensitivity to its step size and hyperparameters."""
    order = sorted(records, key=lambda r: (PROTOCOLS.index(r["protocol"]), r["k"]))
    sweeps = [
        Sweep(f"{r['protocol']}, k={r['k']}", r["method"], [_stage(s) for s in r["stages"]])
        for r in order
        if r.get("stages")
    ]
    plot_sweeps(sweeps, path, ylabel="failure rate on the tuning starts", log_y=False)


def _stage(stage: dict) -> dict:
    """A stage record in `qmse.tuning`'s format; records written before it (points with
    failure and divergence counts, no score) are converted."""
    if all("score" in p for p in stage["points"]):
        return stage
    points = [
        p | {"score": p["failures"] / p["seeds"], "diverged": p["diverged"] / p["seeds"]}
        for p in stage["points"]
    ]
    return stage | {"points": points}


def budget_curve(scores: Sequence[float]) -> list[float]:
    """E[best of N trials drawn without replacement from the finished ones], N = 1 … T:
    what a method would have reached with a smaller tuning budget (Sivaprasad et al. 2020).
    Exact, by order statistics: with the scores sorted s₁ ≤ … ≤ s_T, the best of a random
    N-subset is s_i with probability C(T − i, N − 1) / C(T, N)."""
    s = sorted(scores)
    T = len(s)
    return [
        sum(s[i - 1] * math.comb(T - i, N - 1) for i in range(1, T + 1)) / math.comb(T, N)
        for N in range(1, T + 1)
    ]


def plot_budgets(records: Sequence[dict], path: str | os.PathLike) -> bool:
    """The expected best failure rate on the tuning starts after N trials (`budget_curve` of
    the trials the choice rests on), one panel per (protocol, tuning k), one curve per
    method; False (no figure) without tuning points."""
    panels: dict[tuple, list[tuple[str, list[float]]]] = {}
    for r in records:
        scores = [p["failures"] / p["seeds"] for p in _trials(r)]
        if scores:
            key = (PROTOCOLS.index(r["protocol"]), r["k"])
            panels.setdefault(key, []).append((r["method"], budget_curve(scores)))
    if not panels:
        return False
    keys = sorted(panels)
    fig = Figure(figsize=(5.2 * len(keys), 4.0))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for i, (name, curve) in enumerate(panels[key]):
            ax.plot(range(1, len(curve) + 1), curve, marker=MARKERS[(i // 8) % len(MARKERS)],
                    ms=3, color=f"C{i % 8}", label=name)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("tuning trials N")
        ax.set_ylabel("expected best failure rate (tuning starts)")
        ax.set_title(f"{PROTOCOLS[key[0]]}, k={key[1]}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    save_figure(path, fig)
    return True


def _trials(record: dict) -> list[dict]:
    """The trials a sweep's choice rests on: a joint search's (its stages hold exactly its
    budget; the record may keep more points, run under an earlier replay); else every point
    of the record (coordinate passes)."""
    stages = record.get("stages") or []
    if stages and stages[0].get("joint"):
        return stages[0]["points"]
    return record.get("points") or []


def performance_profile(rows: Sequence[Row], taus: Sequence[float]) -> dict[str, list[float]]:
    """For each sample-based method, the fraction of cells (problem and instance, protocol, k,
    n, C) in which its failure rate is within a factor τ of the best method's, for each τ
    (Dolan & Moré 2002).
    Rates are taken as (failures + ½) / (seeds + 1), so that a cell whose best method never
    fails still orders the others. A method missing from a cell counts as not within."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.method != "gd-population" and r.seeds:
            rate = (r.failures + 0.5) / (r.seeds + 1)
            instance = json.dumps(r.instance, sort_keys=True, default=str)
            cell = (r.problem, instance, r.protocol, r.k, r.n, r.outputs)
            cells.setdefault(cell, {})[r.method] = rate
    methods = list(dict.fromkeys(m for c in cells.values() for m in c))
    ratios = {m: [c[m] / min(c.values()) if m in c else math.inf for c in cells.values()]
              for m in methods}  # fmt: skip
    return {m: [float(np.mean([x <= t for x in ratios[m]])) for t in taus] for m in methods}


def plot_profiles(rows: Sequence[Row], path: str | os.PathLike) -> bool:
    """Performance profiles (`performance_profile`) over τ from 1 to 64, one curve per method,
    one panel per family; False (no figure) without cells."""
    taus = list(np.geomspace(1, 64, 49))
    profile = performance_profile(rows, taus)
    if not profile:
        return False
    family = {r.method: r.family or "methods" for r in rows}
    groups = list(dict.fromkeys(family[m] for m in profile))
    fig = Figure(figsize=(4.6 * len(groups), 3.8))
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        for i, name in enumerate(m for m in profile if family[m] == group):
            ax.step(taus, profile[name], where="post", color=f"C{i % 8}", label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("τ: within this factor of the best failure rate")
        ax.set_ylabel("fraction of cells")
        ax.set_title(group, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(path, fig)
    return True
