"""The escape benchmark's tuning: every method's declared search space (`Method.space`),
searched on tuning starts disjoint from the evaluation starts.

The default protocol gives every method the same number of trials (`EscapeConfig.tune_budget`):
a joint search of its whole space (`qmse.tuning.search`: quasi-random Sobol points, the
same for every method, widening past a limit the best touches, a local refinement 2^(±1/4),
2^(±1/2) around the best), each trial scored as below, the stops of rule 3 applying to the
widening. A method with a `parent` (label noise → SGD) is searched after it, and its first
trial is its noise-free limit: the parent's chosen settings with the bottom of its own extra
grids, so that a noise baseline can never lose to its parent only for want of a trial.
Without a budget, the second edition's coordinate passes (`qmse.tuning.plan`):

1. The method's space: lr over its `lr_grid`, then each further hyperparameter over its grid
   (the others at the middle of their grids while lr is swept); values fixed by the user are
   not swept. The coordinate passes repeat until one changes nothing (at most 3).
2. Each value is scored by its failure rate on the tuning starts, decided as the rows decide
   it: a start fails when the problem's exact objective does not end below its `success`
   threshold (teacher–student: population loss ≥ 1e-3; Burer–Monteiro: cost above
   f* + 10⁻³|f*|), divergence included; ties go to a value with neighbours on both sides,
   then to the lowest median log₁₀ final loss, the objective above the problem's `optimum`
   (0 but for Burer–Monteiro's cost; a diverged start counts as 10³⁰).
3. While an edge of the swept values has the lowest failure rate (alone or tied: when every
   value fails on every start, larger steps or more noise may still escape), the sweep
   widens past it by a factor of 2 (`qmse.tuning`), at most 8 values past each edge of the
   grid ("limit"), unless `stop` says:
   - high side: most starts (more than half) diverged at the top value ("most diverged"), or
     doubling the value changed neither the failures nor the median log₁₀ final loss (by
     more than FLAT_LOG10; "flat");
   - low side: nothing moves at the bottom value: the median relative displacement
     ‖W_T − W_0‖_F / ‖W_0‖_F is below FROZEN ("frozen"), or (with at most half of its starts
     diverged) halving the value changed neither the failures nor the median log₁₀ loss.
   So a chosen value lies strictly inside its swept range unless one of those stops ended
   the widening with an edge value alone in having the fewest failures (recorded per stage).

Every setting of every round runs on the same tuning starts and input batches (common
random numbers) with `qmse.escape.engine.run_methods`, all methods of a round in lockstep,
the settings of a method stacked in one job: each setting's numbers are those it gets run
alone (`qmse.escape.engine`), so a point's score does not depend on its round.
Every swept point is saved (out/tuning/*.json) after each round, so a killed sweep resumes;
a record whose key (method, starts, budget, fixed values, thresholds, how the engine stacks
settings) differs is recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from qmse.escape.engine import STACKING, Job, engine_key, make_job, run_methods
from qmse.escape.methods import Method, method_key
from qmse.escape.problems import Problem
from qmse.keys import FORMAT, content_key
from qmse.runs import load_json, save_json
from qmse.tuning import Plan, Rule, Trial, search
from qmse.tuning import plan as tuning_plan

FROZEN = 1e-3  # median ‖W_T − W_0‖ / ‖W_0‖ below this: nothing moves
FLAT_LOG10 = 0.01  # halving changed the median log₁₀ loss by at most this: nothing moves
MAX_PASSES = 3  # passes over (lr, hyperparameters) until one changes nothing


def summarize(
    loss: Tensor, success: Tensor, diverged: Tensor, moved: Tensor, optimum: float | Tensor
) -> dict:
    """One setting's score on m starts (m,) each, from the engine's result: failures (starts
    without `success`, the problem's own rule), divergences, median log₁₀ final loss above
    the problem's `optimum` (a number, or one per start) (a diverged start counts as 10³⁰),
    median relative displacement."""
    log = torch.log10((loss.double() - optimum).clamp_min(1e-30)).nan_to_num(posinf=30.0)
    return {
        "failures": int((~success).sum()),
        "seeds": int(loss.numel()),
        "diverged": int(diverged.sum()),
        "median_log10_loss": float(log.median()),
        "moved": float(moved.double().median()),
    }


def trial(point: dict) -> Trial:
    """A saved point (`summarize` and its params) as a `qmse.tuning.Trial`."""
    seeds = point["seeds"]
    return Trial(
        score=point["failures"] / seeds,
        tiebreak=point["median_log10_loss"],
        diverged=point["diverged"] / seeds,
        info={k: point[k] for k in ("failures", "seeds", "median_log10_loss", "moved")},
    )


def stop(side: str, edge: Trial, inner: Trial | None) -> str | None:
    """Rule 3 of the module docstring: why not to widen past `edge`, or None."""
    flat = inner is not None and (
        edge.info["failures"] == inner.info["failures"]
        and abs(edge.tiebreak - inner.tiebreak) <= FLAT_LOG10
    )
    if side == "top":
        if edge.diverged > 0.5:
            return "most diverged"
        return "flat" if flat else None
    if edge.info["moved"] < FROZEN:
        return "frozen"
    return "flat" if flat and edge.diverged <= 0.5 else None  # diverging is not "nothing moves"


RULE = Rule(stop=stop, max_passes=MAX_PASSES)
SOBOL_SEED = 0  # every method's joint search draws the same quasi-random points


def plan(
    method: Method,
    fixed: Mapping[str, float],
    points: Sequence[dict],
    budget: int | None = None,
    anchors: Sequence[Mapping[str, float]] = (),
) -> Plan:
    """Where a method's sweep stands, from the points run so far (a pure function of them,
    so a resumed sweep continues exactly), over the method's space without the `fixed`
    values: with a `budget`, `qmse.tuning.search` (a joint search with exactly that many
    trials: the protocol of equal budgets, trying `anchors` first); without,
    `qmse.tuning.plan` (coordinate passes from the middle of each grid: the second
    edition's protocol)."""
    space = method.space(exclude=fixed)
    found = {_settings_key(p["params"]): trial(p) for p in points}

    def lookup(settings: Mapping[str, float]) -> Trial | None:
        return found.get(_settings_key(settings))

    if not space.params:  # everything fixed: nothing to tune
        return Plan([], dict(fixed), [], converged=True)
    if budget is not None:
        return search(
            space, fixed, lookup, budget=budget, seed=SOBOL_SEED, rule=RULE, anchors=anchors
        )
    start = {p.name: p.grid[len(p.grid) // 2] for p in space.params} | dict(fixed)
    return tuning_plan(space, start, lookup, RULE)


def _settings_key(settings: Mapping[str, float]) -> tuple:
    return tuple(sorted(settings.items()))


def run_pooled(
    jobs: Sequence[Job], W0: Tensor, problems: Sequence[Problem], owner: Tensor, **kw
) -> list[dict[str, Tensor]]:
    """`qmse.escape.engine.run_methods` on starts of several problems (a cell's teachers):
    start i of W0 (m, *shape) trains on problems[owner[i]], each problem's starts in one run
    of their own (the same seeds `kw` for each), the results put back in the order of W0
    (rows g·m + i, as run_methods gives them). One problem: run_methods itself."""
    if len(problems) == 1:
        return run_methods(jobs, W0, problems[0], **kw)
    m, parts = len(W0), []
    for t, problem in enumerate(problems):
        index = (owner == t).nonzero().flatten()  # (m_t,)
        if len(index):
            parts.append((index, run_methods(jobs, W0[index.to(W0.device)], problem, **kw)))
    out = []
    for j, job in enumerate(jobs):
        merged = {}
        for name, first in parts[0][1][j].items():
            rest = first.shape[1:]
            whole = first.new_empty((job.settings, m, *rest))  # (G, m, ...)
            for index, results in parts:
                part = results[j][name].view(job.settings, len(index), *rest)
                whole[:, index.to(whole.device)] = part
            merged[name] = whole.reshape(job.settings * m, *rest)
        out.append(merged)
    return out


def tune_methods(
    methods: Sequence[Method],
    fixed: Mapping[str, Mapping[str, float]],
    W0: Tensor,
    problem: Problem | Sequence[Problem],
    *,
    owner: Tensor | None = None,
    path: Callable[[str], Path],
    steps: int,
    batch: int,
    seed: int,
    method_seed: int,
    budget: int | None = None,
    meta: Mapping[str, object] | None = None,
    label: str = "tune",
    quiet: bool = False,
) -> dict[str, dict]:
    """Sweep every method on the tuning starts W0 (m, *shape) of the registered `problem`
    (or of several, start i on problem[owner[i]]: a cell's teachers, `run_pooled`) until
    each is settled (module docstring), each setting's failures decided by the engine's
    `success` (the problem's own rule, as in the rows); the rounds run all methods that
    still need settings in lockstep. `fixed`:
    method -> values not to sweep; `budget`: trials per method of a joint search (`plan`),
    None for coordinate passes. The record of method M is saved at path(M) after every
    round, with `meta` (e.g. protocol and k); returns method -> record ("chosen", "stages",
    "points", "space", "budget", ...)."""
    pool = [problem] if isinstance(problem, Problem) else list(problem)
    owner = torch.zeros(len(W0), dtype=torch.long) if owner is None else owner.cpu()
    optimum = torch.tensor([p.optimum for p in pool], dtype=torch.float64)[owner]  # (m,)
    named = [(p.name, dict(p.instance), p.success, p.optimum) for p in pool]
    records = {}
    for method in methods:
        pinned = dict(fixed.get(method.name, {}))
        key = content_key(
            "tune",
            method_key(method),
            W0,
            named,
            owner,
            steps,
            batch,
            seed,
            method_seed,
            pinned,
            engine_key(),
            STACKING,
            {"frozen": FROZEN, "flat_log10": FLAT_LOG10, "max_passes": MAX_PASSES},
            {"budget": budget, "sobol_seed": SOBOL_SEED},
        )
        record = {"key": key, "format": FORMAT, "method": method.name, "starts": int(W0.shape[0])}
        record |= {"problem": pool[0].name, "instances": [i for _, i, _, _ in named]}
        record["points"] = []
        record |= dict(meta or {}) | {"fixed": pinned, "steps": steps, "batch": batch}
        record |= {"budget": budget, "space": method.space(exclude=pinned).describe()}
        record["seconds"] = 0.0
        file = path(method.name)
        if file.exists():
            saved = load_json(file)
            if saved.get("key") == key:
                record = saved
        records[method.name] = record
    by_name = {m.name: m for m in methods}

    def anchors(name: str) -> list[dict[str, float]] | None:
        """A method's anchor (its parent's limit, `Method.parent`): [] without a parent in
        this sweep; None while the parent's own search is unfinished."""
        method = by_name[name]
        parent = records.get(method.parent or "")
        if budget is None or parent is None:
            return []
        found = plan(by_name[method.parent], parent["fixed"], parent["points"], budget)
        if found.need:
            return None
        space = method.space(exclude=records[name]["fixed"])
        return [{p.name: found.chosen.get(p.name, p.grid[0]) for p in space.params}]

    while True:
        todo = {}
        for name, record in records.items():
            if (anchor := anchors(name)) is None:
                continue  # its parent's search comes first
            found = plan(by_name[name], record["fixed"], record["points"], budget, anchor)
            if found.need:
                todo[name] = found.need
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
        results = run_pooled(
            jobs,
            W0,
            pool,
            owner,
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
                    *(result[r][rows_g].cpu() for r in ("loss", "success", "diverged", "moved")),
                    optimum,
                )
                record["points"].append({"params": params, **score, "round": round_})
            record["seconds"] += seconds * len(settings) / rows  # its share of the round
            save_json(path(name), record)
    for name, record in records.items():
        anchor = anchors(name)
        found = plan(by_name[name], record["fixed"], record["points"], budget, anchor)
        if record.get("chosen") != found.chosen or record.get("stages") != found.stages:
            record |= {"chosen": found.chosen, "stages": found.stages, "anchors": anchor}
            save_json(path(name), record)
    return records
