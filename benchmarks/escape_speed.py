"""Where a step of `qmse escape` goes, and what the second edition's whole table costs.

Per step at teacher width k, S starts, batch B, on one thread, timed round-robin (median of
--repeats rounds):
- draw, teacher: the input batch (S, B, d) and the teacher's outputs on it, made once per
  step for every method of a cell (common random numbers);
- each built-in method's own step: its gradient (`qmse.escape.engine.job_gradient`), update
  and divergence check, plus its share of the closed-form evaluation every 50 steps and of
  its hooks (PGD's held-out losses every 500 steps, restart's at the end of a 3,000-step run);
- "previous": the engine this one replaced paid per method and step a draw of its own and
  autograd through the sample loss (shown for SGD and QMSE);
- end to end: `run_methods` with every built-in method in lockstep, per method and step.

With --project, the whole table of the second edition (k = 6-12, every built-in method, both
protocols, 1,000 evaluation starts per cell or all the minima, sweeps on 100 tuning starts
per value, 3,000 steps) is projected from these per-start costs, the number of swept values
per method read from a finished run's tuning/ (--sweeps DIR, e.g. a default run at one k),
the minima counts and gd-population times read from runs' minima/ and timings.json (--gd DIR
...). Cells are independent, so two processes share two cores.

    python -m benchmarks.escape_speed --k 6 8 10 12 --starts 1000 --batch 64
    python -m benchmarks.escape_speed --k 6 8 10 12 --project --sweeps runs/escape-k8 \
        --gd runs/escape-gd
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qmse.escape import BUILTIN_METHODS, get_method, make_job
from qmse.escape.engine import EVAL_EVERY, job_gradient, run_methods, teacher_outputs
from qmse.escape.methods import Run
from qmse.escape.rules import PGD_WINDOW
from qmse.teacher_student import (
    init_weights,
    make_problem,
    population_loss,
    sample_inputs,
    sample_loss,
)

STEPS = 3000  # the second edition's budget
TUNE_STARTS = 100  # tuning starts per swept value
EVAL_STARTS = 1000  # evaluation starts per cell (random-init; minima: all there are)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_parts(k: int, starts: int, batch: int, repeats: int) -> dict[str, float]:
    """Milliseconds per step of each part (see the module docstring)."""
    problem = make_problem(k).to(torch.float32)
    p64 = make_problem(k)
    W0 = init_weights(range(starts), k, k).float()
    gen = torch.Generator().manual_seed(0)
    x = sample_inputs(starts, batch, k, generator=gen)
    y = teacher_outputs(x, problem)
    parts = {
        "draw": lambda: sample_inputs(starts, batch, k, generator=gen),
        "teacher": lambda: teacher_outputs(x, problem),
        "evaluation (every 50)": lambda: population_loss(W0.double(), p64),
    }
    run = Run(STEPS, batch, problem, torch.zeros(starts, dtype=torch.bool))
    parts["held-out loss (one)"] = lambda: run.held_out_loss(W0, gen)
    for name in BUILTIN_METHODS:
        method = get_method(name)
        job = make_job(method, method.lr_grid[len(method.lr_grid) // 2] / 10)
        state = {"rng": torch.Generator().manual_seed(1)}
        state |= {
            h: v.float().repeat_interleave(starts).view(-1, 1, 1) for h, v in job.hyper.items()
        }
        lr = job.lr.float().repeat_interleave(starts).view(-1, 1, 1)

        def step(job=job, state=state, lr=lr, method=method):
            grad = job_gradient(job, W0, x, y, problem, state["rng"])
            new, _ = method.update(W0, grad, state, 1, lr)
            bad = ~(new.flatten(1).norm(dim=1) <= 1e4)
            return torch.where(bad.view(-1, 1, 1), W0, new)

        parts[name] = step
    for name in ("sgd", "qmse"):

        def previous(name=name):
            xs = sample_inputs(starts, batch, k, generator=gen)
            Wg = W0.clone().requires_grad_()
            loss = sample_loss(Wg, problem, xs, get_method(name).loss, generator=gen).sum()
            (g,) = torch.autograd.grad(loss, Wg)
            return W0 - 0.01 * g

        parts[f"previous: {name}"] = previous
    times = {name: [] for name in parts}
    for fn in parts.values():
        fn()
    for _ in range(repeats):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    out["evaluation (every 50)"] /= EVAL_EVERY
    held_out = out.pop("held-out loss (one)")
    out["pgd"] += 2 * held_out / PGD_WINDOW  # at most two held-out losses per window
    out["restart"] += 2 * held_out / STEPS  # two at the end of the run
    jobs = [make_job(n, get_method(n).lr_grid[0] / 10) for n in BUILTIN_METHODS]
    steps = max(2, repeats // 2)

    def lockstep():
        run_methods(jobs, W0, p64, steps=steps, batch=batch, seed=0, method_seed=1, quiet=True)

    out["end to end, per method"] = _median_ms(lockstep, 3) / steps / len(jobs)
    return out


def _swept_values(sweeps: Path | None) -> dict[str, float]:
    """Swept values per method and tuning cell: the mean over a finished run's tuning/
    records, else the initial grids plus two widenings."""
    counts: dict[str, list[int]] = {}
    if sweeps is not None:
        for path in sorted((sweeps / "tuning").glob("*.json")):
            record = json.loads(path.read_text())
            counts.setdefault(record["method"], []).append(len(record["points"]))
    out = {}
    for name in BUILTIN_METHODS:
        method = get_method(name)
        default = len(method.lr_grid) + sum(len(g) - 1 for g in method.hyper.values()) + 2
        out[name] = statistics.mean(counts[name]) if counts.get(name) else default
    return out


def _gd_info(dirs: list[Path], k: int) -> tuple[int | None, float | None]:
    """(minima among the 1,000 evaluation seeds, gd-population seconds for them) at k."""
    minima, seconds = None, None
    for d in dirs:
        report = d / "minima" / f"k{k}_n{k}_C1.json"
        if report.exists():
            minima = json.loads(report.read_text())["count"]
        timings = d / "timings.json"
        if timings.exists():
            seconds = json.loads(timings.read_text()).get(
                f"gd-population/eval_k{k}_n{k}_C1", seconds
            )
    return minima, seconds


def project(costs: dict[int, dict[str, float]], starts: int, sweeps: Path | None, gd: list[Path]):
    """Seconds of the whole second-edition table per part, from per-start-step costs."""
    values = _swept_values(sweeps)
    rows, total = [], 0.0
    for k, parts in costs.items():
        shared = (parts["draw"] + parts["teacher"]) / len(BUILTIN_METHODS)
        per_start_step = {  # seconds per start and step for each method
            n: (parts[n] + shared + parts["evaluation (every 50)"]) / 1e3 / starts
            for n in BUILTIN_METHODS
        }
        minima, gd_seconds = _gd_info(gd, k)
        protocols = {"random-init": EVAL_STARTS}
        if minima:
            protocols["spurious-minima"] = min(minima, EVAL_STARTS)
        evaluation = sum(STEPS * sum(per_start_step.values()) * m for m in protocols.values())
        sweep = sum(
            STEPS * TUNE_STARTS * values[n] * per_start_step[n] for n in BUILTIN_METHODS
        ) * len(protocols)
        gd_part = 0.0 if gd_seconds is None else gd_seconds * (2 if minima else 1)  # + pool
        rows.append((k, minima, evaluation, sweep, gd_part))
        total += evaluation + sweep + gd_part
    return rows, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8])
    parser.add_argument("--starts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--project", action="store_true", help="project the whole table")
    parser.add_argument("--sweeps", type=Path, default=None, help="a finished run's directory")
    parser.add_argument("--gd", type=Path, nargs="*", default=[], help="runs with gd-population")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    costs = {k: time_parts(k, args.starts, args.batch, args.repeats) for k in args.k}
    names = list(next(iter(costs.values())))
    print(f"ms per step, {args.starts} starts, batch {args.batch}, {args.threads} thread(s)\n")
    print("| part | " + " | ".join(f"k={k}" for k in costs) + " |")
    print("|---" * (len(costs) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{c[name]:.2f}" for c in costs.values()) + " |")
    if args.project:
        rows, total = project(costs, args.starts, args.sweeps, args.gd)
        print("\n| k | minima | evaluation s | sweeps s | gd-population s |")
        print("|---|---|---|---|---|")
        for k, minima, evaluation, sweep, gd_part in rows:
            print(f"| {k} | {minima} | {evaluation:.0f} | {sweep:.0f} | {gd_part:.0f} |")
        print(f"\nwhole table: {total:.0f} s on one core, {total / 2:.0f} s on two")


if __name__ == "__main__":
    main()
