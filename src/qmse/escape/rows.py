"""The escape benchmark's result record: one method (or the reproduction, gd-population) in
one cell (problem instance of size k, protocol), as `qmse.escape.cells` computes it,
results.json and rows/ hold it, and `qmse.escape.report` reads it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """A method's results in one cell: its failures on `seeds` starts with their Wilson 95 %
    interval and divergences, the settings it ran at and how they were chosen (`tuning`),
    its paired tests against each reference (`paired`: reference -> {worse, better, p,
    p_holm}), the per-start outcomes (`failed`, "1" failed / "0" escaped, kept in rows/ and
    left out of results.json), and what only some rows have (`extra`: a method's reported
    means, mean_<name>; gd-population's step counts and the published rate).

    The problem: its registered name and `instance` (what defines it); None in a file
    written before rows named it (teacher–student). From certified minima (spurious-minima),
    the starts are grouped by distinct minimum modulo symmetry: `minima` (starts per distinct
    minimum, in order of first appearance), `minima_failures` (failures per distinct
    minimum) and `weighted_failure_rate` (their rates' mean: each distinct minimum weighs
    the same, however many starts it got); None elsewhere."""

    k: int
    n: int
    outputs: int
    method: str
    protocol: str
    seeds: int
    failures: int
    failure_rate: float
    ci95_low: float
    ci95_high: float
    diverged: int
    lr: float | None
    hyper: dict[str, float]
    batch: int | None
    steps: int | None
    median_loss: float
    grad_evals: int | None = None  # sample gradients per start: the budget
    median_first_success: float | None = None
    tuning: dict[str, Any] | None = None
    starts_key: str | None = None
    key: str | None = None
    format: int | None = None
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: str | None = None
    family: str | None = None  # the method's family (`Method.family`); None in older files
    problem: str | None = None
    instance: dict[str, Any] | None = None
    minima: list[int] | None = None
    minima_failures: list[int] | None = None
    weighted_failure_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, outcomes: bool = True) -> dict[str, Any]:
        """The row as JSON (extra's entries at the top level); without the per-start
        outcomes unless `outcomes`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out |= out.pop("extra")
        if not outcomes:
            out.pop("failed")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        """A row from its JSON (an older file's missing fields take their defaults; keys
        that are not fields go to `extra`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})
