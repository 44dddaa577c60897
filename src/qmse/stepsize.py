"""Each method of the CNN grid at its own step size: the sweep that chooses a run's lr (and
its loss's parameters, e.g. label noise's σ) on a held-out seed, with `qmse.tuning`.

The search space of a run (`space`): the lr, then each parameter of its loss, each on a
factor-2 grid v·2^{−1, 0, 1} around its current value (re-centred at every stage), within
v·2^±(1 + max_extend) of its starting value v; every trial is a full run (all epochs) on the
held-out seed, scored by its final `yardstick`, lower is better, a diverged run unusable. The
sweep is `qmse.tuning.plan` with no stop rule beyond the limits: a best value at a limit is
reported as bounded out. Powers of two keep every grid value exact in floating point, so a
value found twice is the same run.

`tune` replays that sweep against the scores of the runs finished so far and returns either
the runs it needs next or the choice; `replay_sweeps` does so for every sweep of a grid from
its sweep runs' metrics files alone, so a killed sweep resumes and a report recomputes every
choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qmse import runs
from qmse.config import TrainConfig
from qmse.loss import get_loss
from qmse.rundir import run_name
from qmse.tuning import Param, Rule, Space, Trial, plan

SWEEP_DIR = "sweep"  # the sweeps' runs, in <grid>/sweep/<sweep_name>


@dataclass(frozen=True)
class Tuning:
    """How `tune` sweeps: the held-out `seed` its runs use (not an evaluation seed), how far
    a grid may grow past each edge, how many coordinate passes at most."""

    seed: int = dataclasses.field(
        default=100, metadata={"help": "the held-out seed of the sweep's runs (no evaluation seed)"}
    )
    max_extend: int = dataclasses.field(
        default=4,
        metadata={
            "help": "grid points past the first grid's edges at most: each value within "
            "start·2^±(1 + N)"
        },
    )
    max_passes: int = dataclasses.field(
        default=3, metadata={"help": "coordinate passes over the searched values at most"}
    )
    start_step: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "start each lr sweep at lr = STEP·(1 − momentum) (0.1: the paper's lr 0.01 "
            "with momentum 0.9), so that momentum 0 starts near its best lr; None: at the "
            "base's lr"
        },
    )

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


def space(base: TrainConfig, tuning: Tuning) -> Space:
    """The search space of `base`'s sweep: lr, then each parameter of its loss, each a
    centred factor-2 grid around its starting value (`tuning.start(base)`)."""
    start = tuning.start(base)

    def param(name: str, v: float) -> Param:
        return Param(name, (v * 0.5, v, v * 2.0), max_extend=tuning.max_extend, centred=True)

    return Space(tuple(param(k, knob_value(start, k)) for k in knobs(start)))


@dataclass
class Tuned:
    """`tune`'s answer: the runs still needed (`need`, empty once decided), the chosen config
    (None until decided, or when every run of a stage diverged), one `qmse.tuning.Stage`
    record per finished stage (points scored by the final yardstick, inf = diverged)."""

    need: list[TrainConfig]
    chosen: TrainConfig | None
    stages: list[dict]
    passes: int = 0
    converged: bool = False


def tune(base: TrainConfig, score: Callable[[TrainConfig], float | None], tuning: Tuning) -> Tuned:
    """Replay the sweep of `base`'s knobs (module docstring) from `tuning.start(base)`, with
    `score(cfg)` the final yardstick of a finished run, math.inf for a diverged one, None for
    one not trained yet."""
    start = tuning.start(base)

    def config(settings: dict[str, float]) -> TrainConfig:
        cfg = start
        for knob, value in settings.items():
            cfg = with_knob(cfg, knob, value)
        return cfg

    def lookup(settings: dict[str, float]) -> Trial | None:
        s = score(config(settings))
        return None if s is None else Trial(s, diverged=float(math.isinf(s)))

    found = plan(
        space(base, tuning),
        {k: knob_value(start, k) for k in knobs(start)},
        lookup,
        Rule(max_passes=tuning.max_passes),
    )
    return Tuned(
        need=[config(s) for s in found.need],
        chosen=None if found.chosen is None else config(found.chosen),
        stages=found.stages,
        passes=found.passes,
        converged=found.converged,
    )


def sweep_score(out_dir: str | Path) -> Callable[[TrainConfig], float | None]:
    """`tune`'s score from the sweep runs in out_dir/sweep: the final value of the run's
    yardstick, math.inf if it diverged, None if it is not finished."""
    folder = Path(out_dir) / SWEEP_DIR

    def score(cfg: TrainConfig) -> float | None:
        run = folder / sweep_name(cfg)
        if (run / "diverged.json").exists():
            return math.inf
        rows = runs.read_jsonl(run / "metrics.jsonl")
        if len(rows) < cfg.epochs:
            return None
        return rows[cfg.epochs - 1][yardstick(cfg.loss)]

    return score


def replay_sweeps(out_dir: str | Path, grid: dict) -> list[tuple[TrainConfig, Tuned]]:
    """Every step-size sweep of grid.json replayed from the sweep runs' metrics (no
    checkpoints): (its base config, `tune`'s answer), in grid.json's order; [] without one."""
    if not grid.get("tuning"):
        return []
    tuning = Tuning(**grid["tuning"]["settings"])
    score = sweep_score(out_dir)
    bases = [TrainConfig.from_dict(c) for c in grid["tuning"]["bases"]]
    return [(base, tune(base, score, tuning)) for base in bases]
