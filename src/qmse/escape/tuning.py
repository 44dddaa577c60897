"""Tuning that cannot be fooled: sweeps on log grids that widen themselves past their edges.

For one method, k and protocol, on tuning starts disjoint from the evaluation starts:

1. lr is swept over the method's `lr_grid` (neighbours at most 2x apart), its other
   hyperparameters at their defaults (the middle of their grids); then each further
   hyperparameter over its grid at the chosen lr; then lr again at the chosen values, and so
   on until a pass changes nothing (at most MAX_PASSES passes). Values fixed by the user are
   not swept.
2. Each value is scored by its failures on the tuning starts (population loss ≥ 1e-3 at
   the end, divergence included).
3. While an edge of the swept values has the fewest failures (alone or tied: when every
   value fails on every start, larger steps or more noise may still escape), the grid is
   widened on that side by a factor of 2 and the new value is run, unless
   - high side: most starts (more than half) diverged at the top value, or doubling the
     value changed neither the failures nor the median log₁₀ final loss (by more than
     FLAT_LOG10);
   - low side: nothing moves at the bottom value: the median relative displacement
     ‖W_T − W_0‖_F / ‖W_0‖_F is below FROZEN, or (with at most half of its starts diverged)
     halving the value changed neither the failures nor the median log₁₀ final loss;
   - MAX_EXTEND values have been added on that side.
4. The chosen value has the fewest failures; ties go to a value with swept neighbours on
   both sides, then to the lowest median log₁₀ final loss (a diverged start counts as
   10³⁰). So a chosen value lies strictly inside its swept range unless one of the stops of
   rule 3 ended the widening with an edge value alone in having the fewest failures
   (recorded per stage).

Every setting of every round runs on the same tuning starts and input batches (common
random numbers) with `qmse.escape.engine.run_methods`, all methods of a round in lockstep.
Every swept point is saved (out/tuning/*.json) after each round, so a killed sweep resumes;
a record whose key (method definition, starts, budget, fixed values) differs is recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from qmse.escape.engine import STUCK_LOSS, make_job, run_methods
from qmse.escape.keys import content_key
from qmse.escape.methods import Method, method_key
from qmse.runs import load_json, save_json
from qmse.teacher_student import Problem

MAX_EXTEND = 8  # values added beyond the initial grid on one side (a factor 2⁸ = 256)
FROZEN = 1e-3  # median ‖W_T − W_0‖ / ‖W_0‖ below this: nothing moves
FLAT_LOG10 = 0.01  # halving changed the median log₁₀ loss by at most this: nothing moves
WIDEN = 2.0  # factor of each widening step
MAX_PASSES = 3  # passes over (lr, hyperparameters) until one changes nothing


def summarize(loss: Tensor, diverged: Tensor, moved: Tensor) -> dict:
    """One setting's score on m starts: failures, divergences, median log₁₀ final loss
    (a diverged start counts as 10³⁰), median relative displacement."""
    log = torch.log10(loss.double().clamp_min(1e-30)).nan_to_num(posinf=30.0)
    return {
        "failures": int((~(loss < STUCK_LOSS)).sum()),
        "seeds": int(loss.numel()),
        "diverged": int(diverged.sum()),
        "median_log10_loss": float(log.median()),
        "moved": float(moved.double().median()),
    }


def _flat(a: dict, b: dict) -> bool:
    """Two neighbouring values gave the same failures and median log₁₀ loss (±FLAT_LOG10)."""
    return a["failures"] == b["failures"] and (
        abs(a["median_log10_loss"] - b["median_log10_loss"]) <= FLAT_LOG10
    )


def _widen(values: list[float], done: Mapping[float, dict], grid: Sequence[float]):
    """The values to add to a stage (rule 3 of the module docstring) and why each side
    stopped: "inside" (that edge does not have the fewest failures), "most diverged",
    "frozen", "flat" or "cap"."""
    fewest = min(done[v]["failures"] for v in values)
    top, bottom = done[values[-1]], done[values[0]]
    add, stopped = [], {}
    if top["failures"] != fewest:
        stopped["top"] = "inside"
    elif top["diverged"] > top["seeds"] / 2:
        stopped["top"] = "most diverged"
    elif len(values) > 1 and _flat(top, done[values[-2]]):
        stopped["top"] = "flat"
    elif sum(v > max(grid) for v in values) >= MAX_EXTEND:
        stopped["top"] = "cap"
    else:
        add.append(values[-1] * WIDEN)
    if bottom["failures"] != fewest:
        stopped["bottom"] = "inside"
    elif bottom["moved"] < FROZEN:
        stopped["bottom"] = "frozen"
    elif (
        len(values) > 1
        and bottom["diverged"] <= bottom["seeds"] / 2  # diverging is not "nothing moves"
        and _flat(bottom, done[values[1]])
    ):
        stopped["bottom"] = "flat"
    elif sum(v < min(grid) for v in values) >= MAX_EXTEND:
        stopped["bottom"] = "cap"
    else:
        add.append(values[0] / WIDEN)
    return add, stopped


def _choose(values: list[float], done: Mapping[float, dict]) -> float:
    """Rule 4: fewest failures, then a value with swept neighbours on both sides, then the
    lowest median log₁₀ final loss (then the smaller value)."""
    edges = (values[0], values[-1])
    return min(
        values, key=lambda v: (done[v]["failures"], v in edges, done[v]["median_log10_loss"], v)
    )


def final_stages(stages: Sequence[dict]) -> list[dict]:
    """The last stage of each swept parameter: the one that fixed its value."""
    return list({s["param"]: s for s in stages}.values())


def plan(
    method: Method, fixed: Mapping[str, float], points: Sequence[dict]
) -> tuple[list[dict], dict | None, list[dict]]:
    """Where a method's sweep stands, from the points run so far (a pure function of them,
    so a resumed sweep continues exactly): (settings still to run, the chosen settings when
    none are left, one report per finished stage).

    The parameters are swept in turn (lr, then each hyperparameter), and the passes repeat
    until one changes no value (at most MAX_PASSES): a step size chosen at a poor default
    of another hyperparameter is chosen again at that hyperparameter's chosen value."""
    current = {"lr": fixed.get("lr")} | {h: fixed.get(h, method.default(h)) for h in method.hyper}
    params = [p for p in ("lr", *method.hyper) if p not in fixed]
    stages = []
    for sweep in range(1, MAX_PASSES + 1):
        changed = False
        for param in params:
            grid = tuple(method.lr_grid if param == "lr" else method.hyper[param])
            others = {k: v for k, v in current.items() if k != param}
            done = {
                p["params"][param]: p
                for p in points
                if all(p["params"][k] == v for k, v in others.items())
            }
            values = sorted(set(grid) | set(done))
            if missing := [v for v in values if v not in done]:
                return [others | {param: v} for v in missing], None, stages
            add, stopped = _widen(values, done, grid)
            if add:
                return [others | {param: v} for v in add], None, stages
            chosen = _choose(values, done)
            edges = (values[0], values[-1])
            changed |= chosen != current[param]
            current[param] = chosen
            stages.append(
                {
                    "param": param,
                    "pass": sweep,
                    "others": others,
                    "chosen": chosen,
                    "interior": chosen not in edges,
                    "range": [values[0], values[-1]],
                    "stopped": stopped,
                    "points": [
                        {"value": v, **{s: done[v][s] for s in ("failures", "seeds", "diverged")}}
                        for v in values
                    ],
                }
            )
        if not changed or len(params) < 2:
            break
    return [], current, stages


def tune_methods(
    methods: Sequence[Method],
    fixed: Mapping[str, Mapping[str, float]],
    W0: Tensor,
    problem: Problem,
    *,
    path: Callable[[str], Path],
    steps: int,
    batch: int,
    seed: int,
    method_seed: int,
    meta: Mapping[str, object] | None = None,
    label: str = "tune",
    quiet: bool = False,
) -> dict[str, dict]:
    """Sweep every method on the tuning starts W0 (m, n, d) until each is settled (module
    docstring); the rounds run all methods that still need settings in lockstep. `fixed`:
    method -> values not to sweep. The record of method M is saved at path(M) after every
    round, with `meta` (e.g. protocol and k); returns method -> record ("chosen", "stages",
    "points", ...)."""
    records = {}
    for method in methods:
        pinned = dict(fixed.get(method.name, {}))
        key = content_key("tune", method_key(method), W0, problem.V, problem.A_teacher)
        key = content_key(key, problem.A_student, steps, batch, seed, method_seed, pinned)
        record = {"key": key, "method": method.name, "starts": int(W0.shape[0]), "points": []}
        record |= dict(meta or {}) | {"fixed": pinned, "steps": steps, "batch": batch}
        record["seconds"] = 0.0
        file = path(method.name)
        if file.exists():
            saved = load_json(file)
            if saved.get("key") == key:
                record = saved
        records[method.name] = record
    by_name = {m.name: m for m in methods}
    while True:
        todo = {}
        for name, record in records.items():
            settings, _, _ = plan(by_name[name], record["fixed"], record["points"])
            if settings:
                todo[name] = settings
        if not todo:
            break
        jobs = [
            make_job(
                by_name[name],
                [s["lr"] for s in settings],
                {h: [s[h] for s in settings] for h in by_name[name].hyper},
            )
            for name, settings in todo.items()
        ]
        started = time.perf_counter()
        results = run_methods(
            jobs,
            W0,
            problem,
            steps=steps,
            batch=batch,
            seed=seed,
            method_seed=method_seed,
            quiet=quiet,
            desc=f"{label}: {len(jobs)} methods, {sum(len(s) for s in todo.values())} settings",
        )
        seconds = time.perf_counter() - started
        m = W0.shape[0]
        rows = sum(len(s) for s in todo.values())
        for (name, settings), result in zip(todo.items(), results):
            record = records[name]
            round_ = 1 + max((p["round"] for p in record["points"]), default=0)
            for g, params in enumerate(settings):
                rows_g = slice(g * m, (g + 1) * m)
                score = summarize(
                    result["loss"][rows_g].cpu(),
                    result["diverged"][rows_g].cpu(),
                    result["moved"][rows_g].cpu(),
                )
                record["points"].append({"params": params, **score, "round": round_})
            record["seconds"] += seconds * len(settings) / rows  # its share of the round
            save_json(path(name), record)
    for name, record in records.items():
        _, chosen, stages = plan(by_name[name], record["fixed"], record["points"])
        if record.get("chosen") != chosen or record.get("stages") != stages:
            record |= {"chosen": chosen, "stages": stages}
            save_json(path(name), record)
    return records
