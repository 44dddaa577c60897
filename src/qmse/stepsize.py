"""Each method at its own step size: the sweep that chooses a run's lr (and its loss's
parameters, e.g. label noise's σ) on a held-out seed.

The rule (docs/theory.md, "Fair baselines for escaping": a value chosen at the edge of its
grid is not yet chosen):

- a knob (lr, then each parameter of the loss) is swept on a factor-2 grid around its
  current value, v·2^k for k = −1, 0, 1; every point is a full run (all epochs) on the
  held-out seed, judged on its final `yardstick`, lower is better, a diverged run worst;
- while the best point sits on an edge of the grid, the grid grows one point past that
  edge, up to v·2^±(1 + max_extend) around the knob's starting value v; a best point at
  that limit is reported as bounded out;
- with several knobs, they are swept in turn (coordinate descent) until a full pass changes
  nothing, at most `max_passes` passes.

`tune` replays that rule from the start against the scores known so far and returns either
the runs it needs next or the choice. It is a pure function of the scores, so a sweep
killed half-way resumes by calling it again, and a report recomputes the choice from the
runs' metrics files alone. Powers of two keep every grid value exact in floating point, so
a value found twice is the same run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qmse.loss import get_loss
from qmse.rundir import TrainConfig, run_name


@dataclass(frozen=True)
class Tuning:
    """How `tune` sweeps: the held-out `seed` its runs use (not an evaluation seed), how far
    a grid may grow past each edge, how many coordinate passes at most."""

    seed: int = 100
    max_extend: int = 4  # points past the first grid's edges at most: lr within 2^±5 of start
    max_passes: int = 3
    # the step lr/(1 − momentum) each lr sweep starts at (0.1: the paper's lr 0.01 with
    # momentum 0.9), so that momentum 0 starts near its best lr; None: at the base's lr
    start_step: float | None = None

    def start(self, base: TrainConfig) -> TrainConfig:
        """`base` at the held-out seed and the lr its sweep starts at."""
        lr = base.lr
        if self.start_step is not None:  # rounded: 0.1·(1 − 0.9) is 0.01, not 0.00999…
            lr = float(f"{self.start_step * (1 - base.momentum):.12g}")
        return dataclasses.replace(base, seed=self.seed, lr=lr)


def yardstick(loss: str) -> str:
    """The metric a run of `loss` is judged on: the train ½‖r‖² ("train_mse"), the quantity
    the paper's claim is about, for every loss that is minimised where the outputs equal the
    targets (its deterministic value, or its expectation's for a random loss, is 0 at f = y:
    MSE, QMSE, expected-QMSE, label noise); the run's own train loss ("train_loss") for any
    other, e.g. cross-entropy, whose infimum lies at infinite logits so that ½‖r‖² of its
    logits measures nothing it minimises."""
    spec = get_loss(loss)
    if spec.random and spec.mean_gradient_loss is None:
        return "train_loss"
    deterministic = get_loss(spec.mean_gradient_loss) if spec.random else spec
    y = torch.eye(3, dtype=torch.float64)  # (3, 3): three samples of C = 3, f = y
    return "train_mse" if bool((deterministic.expected(y, y) == 0).all()) else "train_loss"


def sweep_name(cfg: TrainConfig) -> str:
    """A sweep run's directory name: run_name with the knobs' values, e.g.
    "label-noise-m0.9-s100-lr0.02-sigma0.05"."""
    params = "".join(f"-{k}{v:g}" for k, v in sorted(cfg.loss_params.items()))
    return f"{run_name(cfg)}-lr{cfg.lr:g}{params}"


def knobs(base: TrainConfig) -> tuple[str, ...]:
    """What `tune` sweeps for `base`: the lr, then each parameter of its loss."""
    return ("lr", *sorted(base.loss_params))


def with_knob(cfg: TrainConfig, knob: str, value: float) -> TrainConfig:
    """`cfg` with the lr or one loss parameter set to `value`."""
    if knob == "lr":
        return dataclasses.replace(cfg, lr=value)
    return dataclasses.replace(cfg, loss_params={**cfg.loss_params, knob: value})


def knob_value(cfg: TrainConfig, knob: str) -> float:
    return cfg.lr if knob == "lr" else cfg.loss_params[knob]


@dataclass
class Tuned:
    """`tune`'s answer: the runs still needed (`need`, empty once decided), the chosen config
    (None until decided, or when every run of a grid diverged), and one record per knob
    sweep: {"knob", "values", "scores", "best", "bounded"} (scores: inf = diverged)."""

    need: list[TrainConfig]
    chosen: TrainConfig | None
    sweeps: list[dict]
    passes: int = 0
    converged: bool = False


def tune(base: TrainConfig, score: Callable[[TrainConfig], float | None], tuning: Tuning) -> Tuned:
    """Replay the sweep of `base`'s knobs (module docstring), starting from
    `tuning.start(base)`, with `score(cfg)` the final yardstick of a finished run, math.inf
    for a diverged one, None for one not trained yet. Each knob's values are v·2^j, v its
    starting value, |j| <= 1 + tuning.max_extend: a range fixed for all passes, so that
    passes end and a choice at its edge is bounded out."""
    limit = 1 + tuning.max_extend
    base = current = tuning.start(base)
    position = dict.fromkeys(knobs(base), 0)  # j of each knob's current value
    sweeps: list[dict] = []
    for done in range(tuning.max_passes):
        changed = False
        for knob in knobs(base):
            start, j = knob_value(base, knob), position[knob]
            lo, hi = max(j - 1, -limit), min(j + 1, limit)
            while True:
                grid = {k: with_knob(current, knob, start * 2.0**k) for k in range(lo, hi + 1)}
                scores = {k: score(c) for k, c in grid.items()}
                if missing := [grid[k] for k, s in scores.items() if s is None]:
                    return Tuned(need=missing, chosen=None, sweeps=sweeps, passes=done)
                best = min(scores, key=lambda k: (scores[k], k))
                if math.isinf(scores[best]):  # every point diverged
                    sweeps.append(_record(knob, grid, scores, None, bounded=False))
                    return Tuned(need=[], chosen=None, sweeps=sweeps, passes=done + 1)
                if best == lo > -limit:
                    lo -= 1
                elif best == hi < limit:
                    hi += 1
                else:
                    break
            sweeps.append(_record(knob, grid, scores, best, bounded=abs(best) == limit))
            changed |= best != j
            position[knob], current = best, grid[best]
        if not changed or len(position) == 1:
            return Tuned(need=[], chosen=current, sweeps=sweeps, passes=done + 1, converged=True)
    return Tuned(need=[], chosen=current, sweeps=sweeps, passes=tuning.max_passes)


def _record(
    knob: str, grid: dict, scores: dict, best: int | None, *, bounded: bool
) -> dict[str, object]:
    ks = sorted(grid)
    return {
        "knob": knob,
        "values": [knob_value(grid[k], knob) for k in ks],
        "scores": [scores[k] for k in ks],
        "best": None if best is None else knob_value(grid[best], knob),
        "bounded": bounded,
    }
