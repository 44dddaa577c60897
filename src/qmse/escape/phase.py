"""Measured phase diagrams of escape from certified minima against the linear-stability
prediction of `qmse.stability`: does a minimum's predicted escape band say at which step
sizes SGD and heavy ball leave it?

Families (`Family`: a problem, its certified minima, its global minimum, and how to linearise,
follow and finish it):
- `teacher_student(k)`: the escape benchmark's problem at width k (n = k, scalar output,
  identity teacher). Minima: gd-population (`gd_population`) from the Xavier seeds
  0 … S−1, the end points that are certified strict minima (`certify_minima`) with
  population loss ≥ STUCK_LOSS. The prediction is Monte Carlo (`stability.linearise`).
- `matrix_sensing(delta, n, seed, m)`: rank-1 matrix sensing
  (`qmse.escape.matrix_sensing`), m measurements, RIP constant δ > 1/2, whose constructed
  point √δ·e₂ (rotated) is a strict spurious minimum. Minima: gradient descent on f
  (`descend`) from the problem's starts of seeds 0 … S−1, the end points certified strict
  minima (`problems.certify`) that did not succeed. The engine trains it by its generic path,
  one sample a measurement, MSE ½r² averaged over the batch: the mean field is ∇f/(2m), and
  the prediction is exact (`stability.finite_sum` over the m measurements).
Minima are grouped by their objective to 6 digits (as the benchmark's minima report does):
one group per distinct minimum, up to the problem's symmetries.

The loss trained (`LOSS_METHODS`) is MSE by default; teacher–student also takes QMSE and
expected-QMSE (the engine's `qmse`, `qmse-momentum`, … methods, and `stability.linearise` of
that loss, its noise included), from the same minima of MSE: does the loss get out of them?
Their mean field has no closed form here, so they have no population panel, and the mean-map
rules read λ_max of their Monte Carlo H̄.

Per distinct minimum and (β, B), a panel: the prediction (`stability.escape_band` for MSE
at the group's first point and at the global minimum) and, on an lr grid STEP = 2^(1/8)
apart from `below` steps under the lower of the two predicted edges to `above` steps over
the upper one, `starts` runs of `steps` steps of SGD (β = 0) or heavy ball (β > 0,
b ← βb + g, w ← w − lr·b) from the group's points, cycled when there are fewer (every start
draws its own samples: `qmse.escape.run_method`). B = None is the population gradient (the
closed-form mean field, deterministic: one start; its prediction is the mean map's).

Outcomes (`measure`). A run that ends beyond DIVERGED_NORM (or non-finite) diverged. Any
other end point is finished by gradient descent on the problem's exact objective (step
GD_LR, until the gradient norm, each neuron's for teacher–student, is ≤ FINISH_TOL, or
FINISH_STEPS steps), which says which basin it ended in, not where in its oscillation the
budget caught it (heavy ball at β = 0.99 still swings after 3000 steps): escaped if the
finished objective is below the problem's success threshold, moved if it is a spurious point
other than the start's minimum (objective differing by more than MOVED relative), else
stuck. `end_escaped` counts the runs whose objective was below the success threshold at the
end of the budget itself (the escape benchmark's rule), for comparison.

Verdict (`classify`, `confusion`). A cell (minimum, β, B, lr) is measured "left" when more
than half of its starts escaped, diverged or moved, else "stuck"; its outcome is the most
frequent of OUTCOMES (ties in that order). A rule predicts the minimum unstable when lr is
at or above its threshold there, and the outcome escaped when the minimum is unstable and
the global minimum stable, diverged when both are, stuck otherwise. Rules (`RULES`): "second
moment" (the stochastic threshold), "mean map" (2(1 + β)/λ_max), and "lr/(1-β)" (lr/(1 − β)
against 2/λ_max, i.e. 2(1 − β)/λ_max, the simple rule); λ_max of the mean field's Hessian.
The grid's step sizes have 6 significant digits, and one of them is a predicted edge:
thresholds are compared at that precision, so that this point counts as at the edge.

Resuming (`phase_diagram` with `path`): the diagram is rewritten to its JSON after each
panel, and a run that finds a diagram of the same family and protocol there computes only
the panels it lacks.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor

from qmse import stability as st
from qmse import teacher_student as ts
from qmse.errors import UserError
from qmse.escape import matrix_sensing as ms
from qmse.escape import problems
from qmse.escape.engine import DIVERGED_NORM, STUCK_LOSS, run_method
from qmse.escape.population import GD_LR, certify_minima, descend, gd_population
from qmse.runs import load_json, progress, save_figure, save_json

STEP = 2 ** (1 / 8)
OUTCOMES = ("escaped", "diverged", "moved", "stuck")
RULES = ("second moment", "mean map", "lr/(1-β)")
FINISH_TOL, FINISH_STEPS = 1e-6, 20_000  # the finishing gradient descent's stop
MOVED = 1e-4  # a finished objective this far (relative) from the start's is another point
LOSS_METHODS = {  # loss -> the engine's methods for SGD (β = 0) and heavy ball
    "mse": ("sgd", "momentum"),
    "qmse": ("qmse", "qmse-momentum"),
    "expected-qmse": ("expected-qmse", "expected-qmse-momentum"),
}


@dataclass(frozen=True)
class Family:
    """What a phase diagram needs of one problem instance (module docstring).

    name: the files' stem (phase-NAME.json); title: the figure's; protocol: what defines
    the family's part of the diagram (JSON). problem: the registered Problem the engine
    trains. minima (M, *shape) float64: certified strict spurious minima, from the starts of
    `seeds` (one per point). global_minimum (*shape). hessian(w): the mean field's Hessian
    (P, P) float64; linearise(w, loss): the loss's per-sample field there
    (`stability.Linearisation`; matrix sensing: MSE only);
    field(W (S, *shape)): the mean field (the population gradient of MSE as the engine
    averages it); finish(W): gradient descent on the exact objective from each point,
    (objective (S,), converged (S,) bool). seconds: the wall-clock time finding the minima
    took."""

    name: str
    title: str
    protocol: dict
    problem: problems.Problem
    minima: Tensor
    seeds: list[int]
    global_minimum: Tensor
    hessian: Callable[[Tensor], Tensor]
    linearise: Callable[[Tensor, str], st.Linearisation]
    field: Callable[[Tensor], Tensor]
    finish: Callable[[Tensor], tuple[Tensor, Tensor]]
    seconds: float


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


def teacher_student(
    k: int, *, seeds: int = 200, samples: int = 2**14, groups: int = 8, sample_seed: int = 0
) -> Family:
    """The teacher–student family at width k (module docstring); the prediction from
    `samples` Monte Carlo inputs in `groups` groups, seeded `sample_seed`."""
    clock = time.perf_counter()
    W, found = certified_minima(k, range(seeds))
    if not len(W):
        raise UserError(f"k={k}: none of gd-population's seeds 0..{seeds - 1} ends at a "
                        "certified spurious minimum; give more seeds")  # fmt: skip
    p, problem = ts.make_problem(k), problems.teacher_student(k)

    def finish(W: Tensor) -> tuple[Tensor, Tensor]:
        out = gd_population(W.double(), p, tol=FINISH_TOL, max_steps=FINISH_STEPS, quiet=True)
        return out["loss"], out["converged"]

    kw = dict(samples=samples, groups=groups, seed=sample_seed)
    return Family(
        name=f"k{k}",
        title=f"teacher–student k = {k}",
        protocol={
            "problem": "teacher-student",
            "k": k,
            "seeds": seeds,
            "samples": samples,
            "groups": groups,
            "sample_seed": sample_seed,
        },  # fmt: skip
        problem=problem,
        minima=W,
        seeds=found,
        global_minimum=p.V,
        hessian=lambda w: ts.population_hessian(w.double(), p),
        linearise=lambda w, loss: st.linearise(problem, w, loss, **kw),
        field=lambda W: ts.population_grad(W, p),
        finish=finish,
        seconds=time.perf_counter() - clock,
    )


def matrix_sensing(delta: float, n: int, seed: int, m: int, *, seeds: int = 64) -> Family:
    """The rank-1 matrix sensing family of `ms.make_instance(delta, n, seed, m)` (module
    docstring); minima from gradient descent on f from the starts of seeds 0 … seeds−1."""
    clock = time.perf_counter()
    inst = ms.make_instance(delta, n, seed, m)
    problem = ms.matrix_sensing_problem(delta, n, seed, m)
    scale = 2 * inst.m  # f = Σ rᵢ², the engine's mean field that of mean ½rᵢ²

    def finish(W: Tensor) -> tuple[Tensor, Tensor]:
        out = descend(problem, W.double(), tol=FINISH_TOL, max_steps=FINISH_STEPS, quiet=True)
        return out["loss"], out["converged"]

    ends = descend(problem, problem.init(range(seeds)), quiet=True)
    keep = (ends["converged"] & ends["stuck"]).tolist()
    W = ends["W"][torch.tensor(keep, dtype=torch.bool)]
    strict = [c["kind"] == "strict minimum" for c in problems.certify(problem, W)]
    found = [s for s, ok in zip([s for s, k in zip(range(seeds), keep) if k], strict) if ok]
    if not found:
        raise UserError(
            f"matrix sensing δ={delta}, n={n}, m={m}, seed {seed}: gradient descent from "
            f"seeds 0..{seeds - 1} ends at no certified spurious minimum"
        )
    return Family(
        name="sensing",
        title=f"rank-1 matrix sensing δ = {delta:g}, n = {n}, m = {inst.m}",
        protocol={
            "problem": "matrix-sensing",
            "delta": delta,
            "n": n,
            "seed": seed,
            "m": inst.m,
            "seeds": seeds,
        },  # fmt: skip
        problem=problem,
        minima=W[torch.tensor(strict, dtype=torch.bool)],
        seeds=found,
        global_minimum=inst.z,
        hessian=lambda w: ms.hessian(inst, w) / scale,
        linearise=lambda w, loss: (
            st.finite_sum(problem, w, inst.A, inst.b[:, None]) if loss == "mse" else _only_mse(loss)
        ),
        field=lambda W: problems.gradient(problem, W) / scale,
        finish=finish,
        seconds=time.perf_counter() - clock,
    )


def _only_mse(loss: str) -> st.Linearisation:
    raise UserError(f"loss {loss!r}: matrix sensing's exact linearisation is MSE's only")


def lr_grid(lo: float, hi: float, below: int, above: int) -> list[float]:
    """lo·STEP^i from i = −below to `above` steps past hi (lo ≤ hi), 6 significant digits."""
    top = math.ceil(math.log(hi / lo) / math.log(STEP) - 1e-9) + above
    return [float(f"{lo * STEP**i:.6g}") for i in range(-below, top + 1)]


def _population_runs(family: Family, W0: Tensor, lrs: Sequence[float], beta: float, steps: int):
    """Heavy ball on the family's mean field from each start at each lr: (end points,
    diverged), rows g·m + i as `run_method`'s."""
    m = len(W0)
    W = W0.double().repeat(len(lrs), *(1,) * (W0.dim() - 1))  # (G·m, *shape)
    flat = (-1,) + (1,) * (W0.dim() - 1)
    lr = torch.tensor(lrs, dtype=torch.float64).repeat_interleave(m).view(flat)
    buf, diverged = torch.zeros_like(W), torch.zeros(len(W), dtype=torch.bool)
    for _ in range(steps):
        buf = beta * buf + family.field(W)
        new = W - lr * buf
        diverged |= ~(new.flatten(1).norm(dim=1) <= DIVERGED_NORM)
        W = torch.where(diverged.view(flat), W, new)
    return W, diverged


def measure(
    family: Family,
    W0: Tensor,
    lrs: Sequence[float],
    beta: float,
    batch: int | None,
    *,
    steps: int,
    seed: int = 0,
    loss: str = "mse",
) -> dict[str, list]:
    """How many of the starts W0 (m, *shape) escaped, diverged, moved or stuck at each lr
    (module docstring), how many had escaped at the end of the budget itself
    (`end_escaped`), how many finishing descents hit FINISH_STEPS (`unfinished`), and the
    median objective at the end of the budget of those stuck (`stuck_loss`: how far they
    wander) and the median finished objective of those moved (`moved_loss`), None where there
    are none: SGD (β = 0) or heavy ball on `loss` with fresh batches of `batch` samples
    (`run_method`, samples from `seed`), or on MSE's mean field (batch None)."""
    G, m = len(lrs), len(W0)
    if batch is None:
        _population_only_mse(loss)
        W, diverged = _population_runs(family, W0, lrs, beta, steps)
    else:
        plain, heavy = _methods(loss)
        method, hyper = (plain, None) if beta == 0 else (heavy, {"one_minus_beta": 1 - beta})
        out = run_method(method, W0, family.problem, steps=steps, lr=list(lrs), hyper=hyper,
                         batch=batch, seed=seed, quiet=True)  # fmt: skip
        W, diverged = out["W"].double(), out["diverged"]
    objective, success = family.problem.objective, family.problem.success
    end = objective(W).masked_fill(diverged, float("inf"))
    final, finished = end.clone(), torch.ones(len(W), dtype=torch.bool)
    if (~diverged).any():
        final[~diverged], finished[~diverged] = family.finish(W[~diverged])
    start = objective(W0.double()).repeat(G)
    escaped = final < success
    moved = ~escaped & ~diverged & ((final - start).abs() > MOVED * start)
    stuck = ~escaped & ~diverged & ~moved

    def median(values: Tensor, where: Tensor) -> list[float | None]:
        values, where = values.view(G, m), where.view(G, m)
        return [float(v[s].median()) if s.any() else None for v, s in zip(values, where)]

    def count(flags: Tensor) -> list[int]:
        return flags.view(G, m).sum(1).tolist()

    return {
        "escaped": count(escaped),
        "diverged": count(diverged),
        "moved": count(moved),
        "stuck": count(stuck),
        "end_escaped": count(end < success),
        "unfinished": count(~finished),
        "stuck_loss": median(end, stuck),
        "moved_loss": median(final, moved),
    }


def _methods(loss: str) -> tuple[str, str]:
    if loss not in LOSS_METHODS:
        raise UserError(f"loss {loss!r}: expected one of {', '.join(LOSS_METHODS)}")
    return LOSS_METHODS[loss]


def _population_only_mse(loss: str) -> None:
    if loss != "mse":
        raise UserError(f"loss {loss!r}: the population gradient is MSE's only; drop it")


def _extremes(H: np.ndarray) -> list[float]:
    lam = np.linalg.eigvalsh(H)
    return [float(lam[0]), float(lam[-1])]


def _key(panel: dict) -> tuple:
    return (panel["minimum"], panel["beta"], panel["batch"])


def phase_diagram(
    family: Family,
    betas: Sequence[float],
    batches: Sequence[int | None],
    *,
    starts: int = 64,
    steps: int = 3000,
    below: int = 16,
    above: int = 6,
    seed: int = 0,
    loss: str = "mse",
    path: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict:
    """The predicted thresholds and the measured outcomes of every (distinct minimum, β, B)
    panel on its lr grid (module docstring), as plain data with the wall-clock seconds each
    panel's prediction, runs and finishing descents took, for `loss` (`LOSS_METHODS`). With
    `path`, resumable: the panels of a diagram of the same family and protocol there are
    kept, and the diagram is rewritten there after each new panel."""
    _methods(loss)
    if None in batches:
        _population_only_mse(loss)
    problem = family.problem
    losses = problem.objective(family.minima).tolist()
    classes = list(dict.fromkeys(round(v, 6) for v in losses))
    protocol = family.protocol | {
        "starts": starts, "steps": steps, "step": "2^(1/8)", "below": below, "above": above,
        "seed": seed, "success": problem.success, "diverged_norm": DIVERGED_NORM,
        "finish_lr": GD_LR, "finish_tol": FINISH_TOL, "finish_steps": FINISH_STEPS,
        "moved": MOVED, "loss": loss,
    }  # fmt: skip
    lins: dict = {}

    def linearised(key) -> st.Linearisation:
        if key not in lins:
            w = family.global_minimum if key == "global" else family.minima[key]
            lins[key] = family.linearise(w, loss)
        return lins[key]

    def hessian(key) -> np.ndarray:  # the mean field's: MSE's closed form, else Monte Carlo
        if loss != "mse":
            return linearised(key).hessian
        return family.hessian(family.global_minimum if key == "global" else family.minima[key])

    minima = []
    for value in classes:
        rows = [j for j, v in enumerate(losses) if round(v, 6) == value]
        seeds = [family.seeds[j] for j in rows]
        minima.append({"loss": value, "count": len(rows), "seeds": seeds,
                       "eigenvalues": _extremes(np.asarray(hessian(rows[0])))})  # fmt: skip
        if loss != "mse":  # the start is MSE's minimum, not the loss's stationary point
            minima[-1]["newton_shift"] = linearised(rows[0]).shift
    data = {
        "name": family.name,
        "title": family.title + ("" if loss == "mse" else f", trained on {loss}"),
        "protocol": protocol,
        "minima": minima,
        "global_minimum": {"eigenvalues": _extremes(np.asarray(hessian("global")))},
        "panels": [],
        "minima_seconds": round(family.seconds, 1),
    }
    if path is not None and Path(path).exists():
        old = load_json(path)
        same = [(m["loss"], m["seeds"]) for m in old["minima"]] == [
            (m["loss"], m["seeds"]) for m in minima
        ]
        if old["protocol"] != protocol or not same:
            raise UserError(f"{path}: a diagram of another protocol or other minima; move it "
                            "away, or write to another --out")  # fmt: skip
        data["panels"] = old["panels"]
    done = {_key(p) for p in data["panels"]}
    grid = [(i, b, B) for i in range(len(classes)) for b in betas for B in batches]
    order = {key: n for n, key in enumerate(grid)}
    todo = [key for key in grid if key not in done]
    for i, beta, batch in progress(todo, quiet=quiet, desc=f"phase {family.name}"):
        rows = [j for j, v in enumerate(losses) if round(v, 6) == classes[i]]
        clock = time.perf_counter()
        if batch is None:
            pair = [st.mean_threshold(family.hessian(w).numpy(), beta)
                    for w in (family.minima[rows[0]], family.global_minimum)]  # fmt: skip
            pred = [dict(beta=beta, batch=None, mean=t, mean_se=0.0, second=t, second_se=0.0)
                    for t in pair]  # fmt: skip
        else:
            band = st.escape_band(linearised(rows[0]), linearised("global"), beta, batch)
            pred = [asdict(band.minimum), asdict(band.global_minimum)]
        predicted = time.perf_counter() - clock
        edges = sorted(t["second"] for t in pred)
        lrs = lr_grid(edges[0], edges[1], below, above)
        count = 1 if batch is None else starts
        W0 = family.minima[[rows[j % len(rows)] for j in range(count)]]
        clock = time.perf_counter()
        counts = measure(family, W0, lrs, beta, batch, steps=steps, seed=seed, loss=loss)
        data["panels"].append({
            "minimum": i, "beta": beta, "batch": batch, "starts": count,
            "predicted": {"minimum": pred[0], "global_minimum": pred[1]}, "lrs": lrs, **counts,
            "seconds": {"prediction": round(predicted, 1),
                        "measurement": round(time.perf_counter() - clock, 1)},
        })  # fmt: skip
        data["panels"].sort(key=lambda p: order.get(_key(p), len(order)))
        if path is not None:
            save_json(path, data)
    return data


def seconds(data: dict) -> dict[str, float]:
    """The panels' wall-clock seconds, summed: prediction and measurement (runs and
    finishing descents)."""
    return {part: round(sum(p["seconds"][part] for p in data["panels"]), 1)
            for part in ("prediction", "measurement")}  # fmt: skip


def thresholds(data: dict, panel: dict, rule: str) -> tuple[float, float]:
    """The lr at which `rule` predicts the panel's minimum, and the global minimum, unstable."""
    if rule == "second moment":
        pred = panel["predicted"]
        return pred["minimum"]["second"], pred["global_minimum"]["second"]
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
                "left": sum(counts[:3]) > panel["starts"] / 2,
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
    left (escaped, diverged or moved), or diverged (None where none did)."""
    half = panel["starts"] / 2

    def first(counts: list[int]) -> float | None:
        return next((lr for lr, c in zip(panel["lrs"], counts) if c > half), None)

    left = [sum(c) for c in zip(*(panel[o] for o in OUTCOMES[:3]))]
    return {"escaped": first(panel["escaped"]), "left": first(left),
            "diverged": first(panel["diverged"])}  # fmt: skip


def plot(data: dict, path: str | os.PathLike) -> None:
    """One panel per (minimum, β, B): the escaped, moved and diverged fractions against lr
    (log), with the predicted edges drawn over them: the second-moment thresholds of the
    minimum (solid) and of the global minimum (dashed), the band between them shaded, the
    mean map's 2(1 + β)/λ_max (dotted) and lr/(1 − β) = 2/λ_max (dash-dot) at the minimum."""
    panels = data["panels"]
    betas = list(dict.fromkeys(p["beta"] for p in panels))
    cols = list(dict.fromkeys((p["minimum"], p["batch"]) for p in panels))
    fig = Figure(figsize=(max(3.2 * len(cols), 10.0), 2.5 * len(betas) + 1.0))  # title, legend
    axes = fig.subplots(len(betas), len(cols), squeeze=False)
    for p in panels:
        ax = axes[betas.index(p["beta"])][cols.index((p["minimum"], p["batch"]))]
        n = p["starts"]
        ax.plot(p["lrs"], [e / n for e in p["escaped"]], "o-", ms=3, color="C2", label="escaped")
        ax.plot(p["lrs"], [d / n for d in p["diverged"]], "s:", ms=3, color="C3",
                mfc="none", label="diverged")  # fmt: skip
        if any(p["moved"]):
            ax.plot(p["lrs"], [d / n for d in p["moved"]], "^--", ms=3, color="C4",
                    label="moved to another minimum")  # fmt: skip
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
        ax.set_xlabel("lr", fontsize=8)
        ax.set_ylabel(f"share of {n} start{'s' if n > 1 else ''}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    labels: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=4, fontsize=8)
    steps = data["protocol"]["steps"]
    fig.suptitle(f"Escape from the certified minima, {data['title']}, {steps} steps: measured "
                 "vs predicted", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0.6 / (2.5 * len(betas) + 1.0), 1, 1))
    save_figure(path, fig)


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def markdown(data: dict) -> str:
    """Two Markdown tables: per panel the predicted edges against the measured ones
    (`measured_edges`), and per rule its confusion table (`confusion`)."""
    many = len(data["minima"]) > 1
    head = ("| " + ("minimum | " if many else "") + "β | B | onset, 2nd moment (min) | "
            "global unstable | escaped > ½ from | left > ½ from | diverged > ½ from | "
            "2(1−β)/λ_max | 2(1+β)/λ_max |")  # fmt: skip
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
            _g(edges["left"]),
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
