"""Measured phase diagrams of escape from certified minima against the linear-stability
prediction of `qmse.stability`: does a minimum's predicted escape band say at which step
sizes SGD and heavy ball leave it?

Problem: the escape benchmark's teacher–student problem at width k (n = k, scalar output,
identity teacher). Minima: gd-population (`gd_population`) from the Xavier seeds 0 … S−1,
the end points that are certified strict minima (`certify_minima`) with population loss ≥
STUCK_LOSS, grouped by their loss to 6 digits (as the benchmark's minima report does): one
group per distinct minimum, up to the problem's symmetries.

Per distinct minimum and (β, B): the prediction (`stability.escape_band` for MSE at the
group's first point and at the teacher, from `samples` Monte Carlo inputs) and, on an lr grid
STEP = 2^(1/8) apart from `below` steps under the lower of the two predicted edges to `above`
steps over the upper one, `starts` runs of `steps` steps of SGD (β = 0) or heavy ball (β > 0,
b ← βb + g, w ← w − lr·b) from the group's points, cycled when there are fewer (every start
draws its own inputs: `qmse.escape.run_method`). B = None is the population gradient (the
closed form, deterministic: one start; its prediction is the mean map's). Each run ends
escaped (population loss < STUCK_LOSS), diverged (‖W‖ beyond DIVERGED_NORM) or stuck (neither).

Verdict (`classify`, `confusion`). A cell (minimum, β, B, lr) is measured "left" when more
than half of its starts escaped or diverged, else "stuck"; its outcome is the most frequent
of escaped / diverged / stuck (ties in that order). A rule predicts the minimum unstable
when lr is at or above its threshold there, and the outcome escaped when the minimum is
unstable and the global minimum stable, diverged when both are, stuck otherwise. Rules
(`RULES`): "second moment" (the stochastic threshold), "mean map" (2(1 + β)/λ_max), and
"lr/(1-β)" (lr/(1 − β) against 2/λ_max, i.e. 2(1 − β)/λ_max, the simple rule). The grid's
step sizes have 6 significant digits, and one of them is a predicted edge: thresholds are
compared at that precision, so that this point counts as at the edge, not below it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor

from qmse import stability as st
from qmse import teacher_student as ts
from qmse.errors import UserError
from qmse.escape import problems
from qmse.escape.engine import DIVERGED_NORM, STUCK_LOSS, run_method
from qmse.escape.population import certify_minima, gd_population
from qmse.runs import progress, save_figure, save_json

STEP = 2 ** (1 / 8)
OUTCOMES = ("escaped", "diverged", "stuck")
RULES = ("second moment", "mean map", "lr/(1-β)")


def certified_minima(k: int, seeds: Sequence[int]) -> tuple[Tensor, list[int]]:
    """The gd-population end points of the Xavier `seeds` at width k that are certified
    spurious minima (converged, loss ≥ STUCK_LOSS, smallest Hessian eigenvalue > 0): (M, k, k)
    float64, and their seeds."""
    p = ts.make_problem(k)
    seeds = [int(s) for s in seeds]
    result = gd_population(ts.init_weights(seeds, k, k), p, quiet=True)
    stuck = (result["converged"] & (result["loss"] >= STUCK_LOSS)).tolist()
    W = result["W"][torch.tensor(stuck, dtype=torch.bool)]
    strict = [e > 0 for e in certify_minima(W, p)]
    chosen = [s for s, keep in zip(seeds, stuck) if keep]
    return W[torch.tensor(strict, dtype=torch.bool)], [s for s, ok in zip(chosen, strict) if ok]


def lr_grid(lo: float, hi: float, below: int, above: int) -> list[float]:
    """lo·STEP^i from i = −below to `above` steps past hi (lo ≤ hi), 6 significant digits."""
    top = math.ceil(math.log(hi / lo) / math.log(STEP) - 1e-9) + above
    return [float(f"{lo * STEP**i:.6g}") for i in range(-below, top + 1)]


def _population_runs(W0: Tensor, k: int, lrs: Sequence[float], beta: float, steps: int):
    """Heavy ball on the closed-form population gradient from each start at each lr:
    (final losses, diverged), rows g·m + i as `run_method`'s."""
    p = ts.make_problem(k)
    m = len(W0)
    W = W0.double().repeat(len(lrs), 1, 1)  # (G·m, k, k)
    lr = torch.tensor(lrs, dtype=torch.float64).repeat_interleave(m).view(-1, 1, 1)
    buf, diverged = torch.zeros_like(W), torch.zeros(len(W), dtype=torch.bool)
    for _ in range(steps):
        buf = beta * buf + ts.population_grad(W, p)
        new = W - lr * buf
        diverged |= ~(new.flatten(1).norm(dim=1) <= DIVERGED_NORM)
        W = torch.where(diverged.view(-1, 1, 1), W, new)
    loss = ts.population_loss(W, p)
    return loss.masked_fill(diverged, float("inf")), diverged


def measure(
    W0: Tensor,
    k: int,
    lrs: Sequence[float],
    beta: float,
    batch: int | None,
    *,
    steps: int,
    seed: int = 0,
) -> dict[str, list]:
    """How many of the starts W0 (m, k, k) escaped, diverged or stuck at each lr, and the
    median final population loss of those stuck (None if none: is it still the minimum's?):
    SGD (β = 0) or heavy ball on MSE with fresh batches of `batch` inputs (`run_method`,
    inputs from `seed`), or on the population gradient (batch None)."""
    G, m = len(lrs), len(W0)
    if batch is None:
        loss, diverged = _population_runs(W0, k, lrs, beta, steps)
    else:
        method, hyper = ("sgd", None) if beta == 0 else ("momentum", {"one_minus_beta": 1 - beta})
        out = run_method(method, W0, ts.make_problem(k), steps=steps, lr=list(lrs), hyper=hyper,
                         batch=batch, seed=seed, quiet=True)  # fmt: skip
        loss, diverged = out["loss"], out["diverged"]
    loss, diverged = loss.view(G, m), diverged.view(G, m)
    escaped = loss < STUCK_LOSS
    stuck = ~escaped & ~diverged
    return {
        "escaped": escaped.sum(1).tolist(),
        "diverged": diverged.sum(1).tolist(),
        "stuck": stuck.sum(1).tolist(),
        "stuck_loss": [float(v[s].median()) if s.any() else None for v, s in zip(loss, stuck)],
    }


def phase_diagram(
    k: int,
    betas: Sequence[float],
    batches: Sequence[int | None],
    *,
    seeds: int = 200,
    starts: int = 64,
    steps: int = 3000,
    below: int = 16,
    above: int = 6,
    samples: int = 2**14,
    groups: int = 8,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """The predicted thresholds and the measured outcomes of every (distinct minimum, β, B)
    panel on its lr grid (module docstring), as plain data with the wall-clock seconds each
    part took."""
    clock = time.perf_counter()
    W, found = certified_minima(k, range(seeds))
    if not len(W):
        raise UserError(f"k={k}: none of gd-population's seeds 0..{seeds - 1} ends at a "
                        "certified spurious minimum; give more seeds")  # fmt: skip
    losses = ts.population_loss(W, ts.make_problem(k)).tolist()
    classes = list(dict.fromkeys(round(v, 6) for v in losses))
    seconds = {"minima": time.perf_counter() - clock, "prediction": 0.0, "measurement": 0.0}
    problem = problems.teacher_student(k)
    V = ts.make_problem(k).V
    kw = dict(samples=samples, groups=groups, seed=seed)
    glob = st.linearise(problem, V, **kw)
    minima, panels = [], []
    todo = [(i, b, B) for i in range(len(classes)) for b in betas for B in batches]
    bar = progress(total=len(todo), quiet=quiet, desc=f"phase k={k}")
    for i, value in enumerate(classes):
        rows = [j for j, v in enumerate(losses) if round(v, 6) == value]
        clock = time.perf_counter()
        lin = st.linearise(problem, W[rows[0]], **kw)
        seconds["prediction"] += time.perf_counter() - clock
        minima.append({
            "loss": value, "count": len(rows), "seeds": [found[j] for j in rows],
            "eigenvalues": _extremes(lin.hessian),
        })  # fmt: skip
        for beta in betas:
            for batch in batches:
                clock = time.perf_counter()
                if batch is None:
                    pair = [st.mean_threshold(x.hessian, beta) for x in (lin, glob)]
                    pred = [dict(beta=beta, batch=None, mean=t, mean_se=0.0, second=t,
                                 second_se=0.0) for t in pair]  # fmt: skip
                else:
                    band = st.escape_band(lin, glob, beta, batch)
                    pred = [asdict(band.minimum), asdict(band.global_minimum)]
                seconds["prediction"] += time.perf_counter() - clock
                edges = sorted(t["second"] for t in pred)
                lrs = lr_grid(edges[0], edges[1], below, above)
                count = 1 if batch is None else starts
                W0 = W[[rows[j % len(rows)] for j in range(count)]]
                clock = time.perf_counter()
                counts = measure(W0, k, lrs, beta, batch, steps=steps, seed=seed)
                seconds["measurement"] += time.perf_counter() - clock
                panels.append({"minimum": i, "beta": beta, "batch": batch, "starts": count,
                               "predicted": {"minimum": pred[0], "global_minimum": pred[1]},
                               "lrs": lrs, **counts})  # fmt: skip
                bar.update()
    bar.close()
    return {
        "protocol": {
            "k": k, "seeds": seeds, "starts": starts, "steps": steps, "step": "2^(1/8)",
            "below": below, "above": above, "samples": samples, "groups": groups,
            "seed": seed, "stuck_loss": STUCK_LOSS, "diverged_norm": DIVERGED_NORM,
        },
        "minima": minima,
        "global_minimum": {"eigenvalues": _extremes(glob.hessian)},
        "panels": panels,
        "seconds": {name: round(s, 1) for name, s in seconds.items()},
    }  # fmt: skip


def _extremes(H: np.ndarray) -> list[float]:
    lam = np.linalg.eigvalsh(H)
    return [float(lam[0]), float(lam[-1])]


def thresholds(data: dict, panel: dict, rule: str) -> tuple[float, float]:
    """The lr at which `rule` predicts the panel's minimum, and the global minimum, unstable."""
    if rule == "second moment":
        return panel["predicted"]["minimum"]["second"], panel["predicted"]["global_minimum"][
            "second"
        ]
    lam = (data["minima"][panel["minimum"]]["eigenvalues"][1],
           data["global_minimum"]["eigenvalues"][1])  # fmt: skip
    beta = panel["beta"]
    if rule == "mean map":
        return tuple(2 * (1 + beta) / x for x in lam)
    if rule == "lr/(1-β)":
        return tuple(2 * (1 - beta) / x for x in lam)
    raise UserError(f"rule {rule!r}: expected one of {', '.join(RULES)}")


def classify(data: dict, rule: str) -> list[dict]:
    """Every measured cell: its panel's (minimum, β, B), lr, the measured class ("left" or
    "stuck") and outcome, and `rule`'s predicted stability and outcome (module docstring)."""
    cells = []
    for panel in data["panels"]:
        lo, glob = (float(f"{t:.6g}") for t in thresholds(data, panel, rule))
        for j, lr in enumerate(panel["lrs"]):
            counts = [panel[o][j] for o in OUTCOMES]
            unstable = lr >= lo
            predicted = ("diverged" if lr >= glob else "escaped") if unstable else "stuck"
            cells.append({
                "minimum": panel["minimum"], "beta": panel["beta"], "batch": panel["batch"],
                "lr": lr, "predicted_unstable": unstable, "predicted": predicted,
                "left": counts[0] + counts[1] > panel["starts"] / 2,
                "outcome": OUTCOMES[counts.index(max(counts))],
            })  # fmt: skip
    return cells


def confusion(data: dict, rule: str) -> dict[str, int | float]:
    """`rule`'s 2 × 2 table over every cell (predicted unstable/stable × measured left/stuck),
    its accuracy there, and the share of cells whose predicted outcome (escaped, diverged,
    stuck) is the measured one."""
    cells = classify(data, rule)
    table = {
        f"{'unstable' if u else 'stable'}/{'left' if left else 'stuck'}": sum(
            c["predicted_unstable"] == u and c["left"] == left for c in cells
        )
        for u in (True, False)
        for left in (True, False)
    }
    right = table["unstable/left"] + table["stable/stuck"]
    return table | {
        "cells": len(cells),
        "accuracy": right / len(cells),
        "outcome_accuracy": sum(c["predicted"] == c["outcome"] for c in cells) / len(cells),
    }


def measured_edges(panel: dict) -> dict[str, float | None]:
    """The smallest lr of the panel's grid at which more than half of the starts escaped,
    left (escaped or diverged), or diverged (None where none did)."""
    half = panel["starts"] / 2

    def first(counts: list[int]) -> float | None:
        return next((lr for lr, c in zip(panel["lrs"], counts) if c > half), None)

    left = [e + d for e, d in zip(panel["escaped"], panel["diverged"])]
    return {"escaped": first(panel["escaped"]), "left": first(left),
            "diverged": first(panel["diverged"])}  # fmt: skip


def plot(data: dict, path: str | os.PathLike) -> None:
    """One panel per (minimum, β, B): the escaped and diverged fractions against lr (log),
    with the predicted edges drawn over them: the second-moment thresholds of the minimum
    (solid) and of the global minimum (dashed), the band between them shaded, the mean map's
    2(1 + β)/λ_max (dotted) and lr/(1 − β) = 2/λ_max (dash-dot) at the minimum."""
    panels = data["panels"]
    betas = list(dict.fromkeys(p["beta"] for p in panels))
    cols = list(dict.fromkeys((p["minimum"], p["batch"]) for p in panels))
    fig = Figure(figsize=(3.6 * len(cols), 2.9 * len(betas) + 1.0))
    axes = fig.subplots(len(betas), len(cols), squeeze=False)
    for p in panels:
        ax = axes[betas.index(p["beta"])][cols.index((p["minimum"], p["batch"]))]
        n = p["starts"]
        ax.plot(p["lrs"], [e / n for e in p["escaped"]], "o-", ms=3, color="C2", label="escaped")
        ax.plot(p["lrs"], [d / n for d in p["diverged"]], "s:", ms=3, color="C3",
                mfc="none", label="diverged")  # fmt: skip
        lo, hi = thresholds(data, p, "second moment")
        if lo < hi:
            ax.axvspan(lo, hi, color="C0", alpha=0.15, label="predicted band")
        ax.axvline(lo, color="C0", label="minimum unstable (2nd moment)")
        ax.axvline(hi, color="C0", ls="--", label="global unstable (2nd moment)")
        ax.axvline(thresholds(data, p, "mean map")[0], color="k", ls=":", label="2(1+β)/λ_max")
        ax.axvline(thresholds(data, p, "lr/(1-β)")[0], color="C1", ls="-.",
                   label="lr/(1−β) = 2/λ_max")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the decades: no overlapping labels
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(p["lrs"][0] / STEP, p["lrs"][-1] * STEP)
        batch = "population" if p["batch"] is None else f"B = {p['batch']}"
        many = len(data["minima"]) > 1
        ax.set_title(f"β = {p['beta']:g}, {batch}" + (f", minimum {p['minimum']}" if many else ""),
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("lr")
        ax.set_ylabel(f"share of {n} start{'s' if n > 1 else ''}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    k = data["protocol"]["k"]
    steps = data["protocol"]["steps"]
    title = f"Escape from the certified minima, teacher–student k = {k}, {steps} steps"
    fig.suptitle(f"{title}: measured vs predicted", fontsize=10)
    fig.tight_layout(rect=(0, 0.09 * 2 / (len(betas) + 1), 1, 1))
    save_figure(path, fig)


def write(data: dict, out: str | os.PathLike, name: str) -> list[Path]:
    """out/NAME.json and out/NAME.png; returns their paths."""
    out = Path(out)
    paths = [out / f"{name}.json", out / f"{name}.png"]
    save_json(paths[0], data)
    plot(data, paths[1])
    return paths


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def markdown(data: dict) -> str:
    """Two Markdown tables: per panel the predicted edges against the measured ones
    (`measured_edges`), and per rule its confusion table (`confusion`)."""
    many = len(data["minima"]) > 1
    head = ("| " + ("minimum | " if many else "") + "β | B | onset, 2nd moment (min) | "
            "global unstable | escaped > ½ from | diverged > ½ from | 2(1−β)/λ_max | "
            "2(1+β)/λ_max |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in data["panels"]:
        lo, glob = p["predicted"]["minimum"], p["predicted"]["global_minimum"]
        edges = measured_edges(p)
        se = f" ± {lo['second_se']:.2g}" if lo["second_se"] else ""
        cells = [
            *([str(p["minimum"])] if many else []),
            f"{p['beta']:g}",
            "population" if p["batch"] is None else str(p["batch"]),
            f"{lo['second']:.4g}{se}",
            f"{glob['second']:.4g}",
            _g(edges["escaped"]),
            _g(edges["diverged"]),
            f"{thresholds(data, p, 'lr/(1-β)')[0]:.4g}",
            f"{thresholds(data, p, 'mean map')[0]:.4g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| rule | unstable, left | unstable, stuck | stable, left | stable, stuck | "
        "accuracy | outcome accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        c = confusion(data, rule)
        lines.append(
            f"| {rule} | {c['unstable/left']} | {c['unstable/stuck']} | {c['stable/left']} | "
            f"{c['stable/stuck']} | {c['accuracy']:.0%} | {c['outcome_accuracy']:.0%} |"
        )
    return "\n".join(lines)
