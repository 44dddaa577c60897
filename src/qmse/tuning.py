"""Hyper-parameter tuning for every experiment of qmse: declared search spaces, and sweeps
that are replayed from the finished trials and widen themselves past their edges.

A search space (`Space`) is declared before anything runs: a tuple of named `Param`s, each
with the grid its sweep starts from (increasing on a log scale, neighbours at most `factor`
apart), the factor by which a sweep widens past an edge, and how many values it may add past
each edge of that grid (`max_extend`): the space's limits. A `centred` parameter's grid is
re-centred on the parameter's current value at every stage (a local grid, e.g. lr·2^{−1,0,1}
around the current lr), clipped to the same limits.

`plan` replays a coordinate sweep from the trials known so far. The parameters are swept in
turn; a stage of parameter p (the others at their current values) runs p's grid, and then,
while an edge of the values run holds the best score (alone or tied) and the rule does not
stop that side, adds the next value past that edge, up to the limit. The stage chooses the
best score; ties go to a value with neighbours on both sides, then to the lower tie-break,
then to the smaller value. Passes repeat until one changes no value (at most
`Rule.max_passes`). A stage whose every value is unusable (score inf: every run diverged)
chooses nothing and ends the plan.

`search` is the other protocol, for equal tuning budgets: a joint search over all the
parameters at once with a fixed number of trials (quasi-random Sobol points over the space's
box, widening past a limit the best point touches, a local refinement 2^(±1/4), 2^(±1/2)
around the best, the rest of the budget in further Sobol points), so that no parameter is
tuned at a poor value of another, and every method gets the same number of trials.

Both are pure functions of what `lookup` returns, so a sweep killed half-way resumes by
calling it again, and a report recomputes every choice from the finished trials alone.
Their stages are the one record format of a sweep (`Stage`), read by both reports and drawn
by `qmse.tuningplot.plot_sweeps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import qmc

from qmse.errors import UserError

Settings = dict[str, float]


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a search space: its name, the grid its sweep starts from
    (increasing, neighbours at most `factor` apart), the widening factor, the values a sweep
    may add past each edge of the grid, and whether later stages re-centre the grid on the
    current value."""

    name: str
    grid: tuple[float, ...]
    factor: float = 2.0
    max_extend: int = 8
    centred: bool = False
    upper: float = math.inf  # the domain's end, never passed (1 − β ≤ 1: β ≥ 0)

    def __post_init__(self) -> None:
        grid = tuple(self.grid)
        if not grid or any(not (isinstance(v, (int, float)) and 0 < v < math.inf) for v in grid):
            raise UserError(f"{self.name}: grid {grid!r} needs positive finite numbers")
        for a, b in zip(grid, grid[1:]):
            if not a < b <= a * self.factor * (1 + 1e-9):
                raise UserError(
                    f"{self.name}: grid {grid!r} needs increasing values, neighbours at most "
                    f"{self.factor:g}x apart (a log grid such as (0.05, 0.1, 0.2)); {a} -> {b}"
                )
        if not self.factor > 1 or self.max_extend < 0:
            raise UserError(f"{self.name}: need factor > 1 and max_extend >= 0")
        if grid[-1] > self.upper:
            raise UserError(f"{self.name}: grid {grid!r} passes the domain's end {self.upper}")

    @property
    def limits(self) -> tuple[float, float]:
        """The smallest and largest value a sweep of this parameter may reach."""
        reach = self.factor**self.max_extend
        return self.grid[0] / reach, min(self.grid[-1] * reach, self.upper)

    def window(self, current: float) -> list[float]:
        """The values a stage starts from: the grid, or (centred) the grid scaled so that its
        middle value is `current`, clipped to the limits; always with `current` itself."""
        values = set(self.grid)
        if self.centred:
            middle = self.grid[len(self.grid) // 2]
            values = {_exact(v * current / middle) for v in self.grid}
        lo, hi = self.limits
        return sorted(v for v in values | {current} if _inside(v, lo, hi))


@dataclass(frozen=True)
class Space:
    """A declared search space: its parameters, swept in this order."""

    params: tuple[Param, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise UserError(f"a search space names a parameter twice: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def describe(self) -> dict[str, Any]:
        """The space as JSON: what a config records and a table shows."""
        return {
            p.name: {
                "grid": list(p.grid),
                "factor": p.factor,
                "max_extend": p.max_extend,
                "centred": p.centred,
                "limits": list(p.limits),
            }
            for p in self.params
        }


@dataclass(frozen=True)
class Trial:
    """A finished trial's summary: `score` (lower is better; inf: unusable, e.g. diverged),
    a `tiebreak` among equal scores (lower is better), the share of its runs that diverged,
    and whatever else the experiment records (`info`, kept in the stage records)."""

    score: float
    tiebreak: float = 0.0
    diverged: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)


# A stop rule: (side "top" | "bottom", the edge's trial, its inner neighbour's trial or None)
# -> why the sweep must not widen past that edge, or None to widen.
Stop = Callable[[str, Trial, Trial | None], str | None]


@dataclass(frozen=True)
class Rule:
    """How a sweep decides beyond its scores: when to stop widening an edge that holds the
    best score (besides the space's limits), and how many coordinate passes at most."""

    stop: Stop | None = None
    max_passes: int = 3


# The record of one finished stage (JSON): {"param", "pass", "others", "points": [{"value",
# "score", "diverged", **info}], "chosen" (None: every value unusable), "interior" (the
# chosen value has neighbours on both sides), "range" [lowest, highest value run],
# "stopped" {"top", "bottom"}: why each side stopped ("inside": it does not hold the best
# score, "limit": the space's limit, or the rule's reason)}.
Stage = dict[str, Any]


@dataclass
class Plan:
    """`plan`'s answer: the settings still to run (`need`, empty once decided), the chosen
    settings (None until decided, or when a stage's every value was unusable), one record
    per finished stage, the passes made and whether the last pass changed nothing."""

    need: list[Settings]
    chosen: Settings | None
    stages: list[Stage]
    passes: int = 0
    converged: bool = False


def plan(
    space: Space,
    start: Mapping[str, float],
    lookup: Callable[[Settings], Trial | None],
    rule: Rule = Rule(),
) -> Plan:
    """Replay the coordinate sweep of `space` (module docstring) from the settings `start`
    (a value for every parameter of the space, and any fixed values that go with every
    trial), with `lookup(settings)` the finished trial at those settings, None if not run."""
    current = dict(start)
    if missing := [n for n in space.names if n not in current]:
        raise UserError(f"plan: no start value for {missing}")
    stages: list[Stage] = []
    for done in range(rule.max_passes):
        changed = False
        for param in space.params:
            name = param.name
            others = {k: v for k, v in current.items() if k != name}
            values = param.window(current[name])
            while True:
                trials = {v: lookup(others | {name: v}) for v in values}
                if need := [others | {name: v} for v, t in trials.items() if t is None]:
                    return Plan(need, None, stages, passes=done)
                add, stopped = _widen(param, values, trials, rule.stop)
                if not add:
                    break
                values = sorted(values + add)
            chosen = _choose(values, trials)
            stages.append(_stage(name, done + 1, others, values, trials, chosen, stopped))
            if chosen is None:
                return Plan([], None, stages, passes=done + 1)
            changed |= chosen != current[name]
            current[name] = chosen
        if not changed or len(space.params) == 1:
            return Plan([], current, stages, passes=done + 1, converged=True)
    return Plan([], current, stages, passes=rule.max_passes)


def final_stages(stages: Sequence[Stage]) -> list[Stage]:
    """The last stage of each swept parameter: the one that fixed its value."""
    return list({s["param"]: s for s in stages}.values())


def _widen(
    param: Param, values: list[float], trials: Mapping[float, Trial], stop: Stop | None
) -> tuple[list[float], dict[str, str]]:
    """The values to add past the edges of a stage, and why each side stopped."""
    best = min(t.score for t in trials.values())
    lo, hi = param.limits
    add, stopped = [], {}
    for side, edge, inner, step in (
        ("top", values[-1], values[-2] if len(values) > 1 else None, param.factor),
        ("bottom", values[0], values[1] if len(values) > 1 else None, 1 / param.factor),
    ):
        trial = trials[edge]
        if trial.score != best or math.isinf(best):
            stopped[side] = "inside"
        elif not _inside(_exact(edge * step), lo, hi):
            stopped[side] = "limit"
        elif stop is not None and (
            reason := stop(side, trial, None if inner is None else trials[inner])
        ):
            stopped[side] = reason
        else:
            add.append(_exact(edge * step))
    return add, stopped


def _choose(values: list[float], trials: Mapping[float, Trial]) -> float | None:
    """The best score; then a value with neighbours on both sides; then the lower
    tie-break; then the smaller value. None when every value is unusable."""
    if all(math.isinf(trials[v].score) for v in values):
        return None
    edges = (values[0], values[-1])
    return min(values, key=lambda v: (trials[v].score, v in edges, trials[v].tiebreak, v))


def _stage(name, number, others, values, trials, chosen, stopped) -> Stage:
    return {
        "param": name,
        "pass": number,
        "others": dict(others),
        "points": [
            {"value": v, "score": trials[v].score, "diverged": trials[v].diverged}
            | dict(trials[v].info)
            for v in values
        ],
        "chosen": chosen,
        "interior": chosen is not None and chosen not in (values[0], values[-1]),
        "range": [values[0], values[-1]],
        "stopped": stopped,
    }


def _exact(v: float) -> float:
    """v rounded to 12 significant digits, so that a value reached by two products of
    factors (0.1·2·½) is the same float, and the same trial."""
    return float(f"{v:.12g}")


def _inside(v: float, lo: float, hi: float) -> bool:
    return lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)


def search(
    space: Space,
    fixed: Mapping[str, float],
    lookup: Callable[[Settings], Trial | None],
    *,
    budget: int,
    seed: int = 0,
    rule: Rule = Rule(),
    anchors: Sequence[Mapping[str, float]] = (),
) -> Plan:
    """A joint search of `space` with exactly `budget` trials (module docstring), the values
    `fixed` going with every trial; replayed from `lookup` like `plan`. The phases, in order:

    0. anchors: settings that must be tried (within the budget), e.g. a noise baseline at its
       noise-free parent's chosen step with the least noise of its space, so that the search
       always holds the parent's behaviour;
    1. global: the first ⌈budget/2⌉ points of a scrambled Sobol sequence (`seed`) over the
       box of the space, each parameter log-uniform between the ends of its grid;
    2. widen: while the best trial holds the largest (smallest) value tried of a parameter,
       that value doubled (halved) with the others at the best's is tried, within the
       space's limits and unless `rule.stop` says no (4·d trials stay reserved for 3);
    3. local: each parameter at 2^(±1/4) and 2^(±1/2) of the best's value, the others at
       the best's (4·d trials), once more around a new best if the budget allows;
    4. the rest of the budget: the next points of the Sobol sequence.

    The choice is the best score; among equal scores, the trial with the fewest parameters on
    an edge of the values tried (as `plan` prefers values with neighbours on both sides: an
    edge is where the space was left unexplored), then the lower tie-break. The phases follow
    the best score and lower tie-break alone. `stages` holds one record per
    parameter with every trial ("joint": a scatter of the score against that parameter's
    value, the others varying)."""
    if budget < 1:
        raise UserError(f"budget={budget}; need at least one trial")
    names, d = space.names, len(space.params)
    box = [(math.log(p.grid[0]), math.log(p.grid[-1])) for p in space.params]
    unit = qmc.Sobol(d, scramble=True, seed=seed).random(2 ** math.ceil(math.log2(budget)))
    sobol = [
        {n: _exact(math.exp(lo + u * (hi - lo))) for n, u, (lo, hi) in zip(names, row, box)}
        for row in unit
    ]
    tried: dict[tuple, tuple[Settings, Trial]] = {}

    def run(points: list[Settings]) -> list[Settings]:
        """Record `points` (at most what the budget has left); those not run yet."""
        fresh = [p for p in points if _key(p, fixed) not in tried][: budget - len(tried)]
        found = {_key(p, fixed): (p, lookup(dict(fixed) | p)) for p in fresh}
        tried.update({k: pt for k, pt in found.items() if pt[1] is not None})
        return [dict(fixed) | p for p, t in found.values() if t is None]

    def best() -> Settings:
        return min(tried.values(), key=lambda pt: (pt[1].score, pt[1].tiebreak, _order(pt[0])))[0]

    def pending(need: list[Settings]) -> Plan:
        return Plan(need, None, _joint_stages(space, tried, None), passes=1)

    if need := run([{n: _exact(a[n]) for n in names} for a in anchors]):
        return pending(need)
    if need := run(sobol[: (budget + 1) // 2]):
        return pending(need)
    while len(tried) < budget - 4 * d and (step := _widening(space, tried, best(), rule)):
        if need := run([step]):
            return pending(need)
    for _ in range(2):
        centre = best()
        if need := run(_local(space, centre)):
            return pending(need)
        if best() == centre:
            break
    if need := run([p for p in sobol if _key(p, fixed) not in tried]):
        return pending(need)
    chosen = _choice(space, tried)
    return Plan(
        [], dict(fixed) | chosen, _joint_stages(space, tried, chosen), passes=1, converged=True
    )


def _key(settings: Mapping[str, float], fixed: Mapping[str, float]) -> tuple:
    return tuple(sorted((dict(fixed) | dict(settings)).items()))


def _order(settings: Settings) -> tuple:
    return tuple(sorted(settings.items()))


def _choice(space: Space, tried: Mapping) -> Settings:
    """`search`'s choice: the best score, then the fewest parameters at the smallest or
    largest value tried, then the lower tie-break, then the smaller settings."""
    ranges = {
        p.name: (
            min(s[p.name] for s, _ in tried.values()),
            max(s[p.name] for s, _ in tried.values()),
        )
        for p in space.params
    }

    def edges(settings: Settings) -> int:
        return sum(settings[name] in ends for name, ends in ranges.items())

    return min(
        tried.values(), key=lambda pt: (pt[1].score, edges(pt[0]), pt[1].tiebreak, _order(pt[0]))
    )[0]


def _widening(space: Space, tried: Mapping, best: Settings, rule: Rule) -> Settings | None:
    """The next widening trial of `search` (phase 2), or None."""
    trials = {_order(s): t for s, t in tried.values()}
    for param in space.params:
        values = sorted({s[param.name] for s, _ in tried.values()})
        lo, hi = param.limits
        for side, edge, step in (
            ("top", values[-1], param.factor),
            ("bottom", values[0], 1 / param.factor),
        ):
            if best[param.name] != edge:
                continue
            value = _exact(edge * step)
            if not _inside(value, lo, hi):
                continue
            inner = [v for v in values if v != edge]
            near = None
            if inner:
                nearest = min(inner, key=lambda v: abs(math.log(v / edge)))
                near = trials.get(_order(best | {param.name: nearest}))
            if rule.stop is not None and rule.stop(side, trials[_order(best)], near):
                continue
            return best | {param.name: value}
    return None


def _local(space: Space, centre: Settings) -> list[Settings]:
    """Phase 3 of `search`: each parameter at 2^(±1/4), 2^(±1/2) of the centre's value."""
    points = []
    for param in space.params:
        lo, hi = param.limits
        for k in (-2, -1, 1, 2):
            value = _exact(centre[param.name] * 2 ** (k / 4))
            if _inside(value, lo, hi):
                points.append(centre | {param.name: value})
    return points


def _joint_stages(space: Space, tried: Mapping, chosen: Settings | None) -> list[Stage]:
    """One joint stage record per parameter: every trial, by that parameter's value."""
    stages = []
    for param in space.params:
        name = param.name
        rows = sorted(tried.values(), key=lambda pt: (pt[0][name], _order(pt[0])))
        values = [s[name] for s, _ in rows]
        value = None if chosen is None else chosen[name]
        stages.append(
            {
                "param": name,
                "pass": 1,
                "joint": True,
                "others": None,
                "points": [
                    {"value": s[name], "score": t.score, "diverged": t.diverged, "settings": s}
                    | dict(t.info)
                    for s, t in rows
                ],
                "chosen": value,
                "interior": value is not None and values[0] < value < values[-1],
                "range": [values[0], values[-1]] if values else None,
                "stopped": {},
            }
        )
    return stages
