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
- end to end: `run_methods` with every built-in method without hooks in lockstep, per
  method and step (shared parts included).

With --project RUN (a finished default run at one k: `qmse escape --teacher-widths 8 --out
RUN`), the whole table of the second edition (k = 6-12, every built-in method, both
protocols, 1,000 evaluation starts per cell or all the minima, sweeps on 100 tuning starts
per value, 3,000 steps) is projected part by part: RUN's measured seconds of sweeps and
evaluation per protocol, scaled to each k by the measured cost of a step of every method at
that k and by the number of minima; gd-population's measured seconds per k from --gd runs.
Cells are independent, so two processes share two cores.

    python -m benchmarks.escape_speed --k 6 8 10 12 --starts 1000 --batch 64
    python -m benchmarks.escape_speed --k 6 8 10 12 --project runs/escape-k8 --gd runs/escape-gd
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
from qmse.escape.rules import PGD
from qmse.teacher_student import (
    init_weights,
    make_problem,
    population_loss,
    sample_inputs,
    sample_loss,
)

STEPS = 3000  # the second edition's budget


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
    run = Run(STEPS, batch, problem, torch.zeros(starts, dtype=torch.bool))
    # timed on its own: its large draws would disturb the parts timed round-robin
    held_out = _median_ms(lambda: run.held_out_loss(W0, gen), 3)
    out["pgd"] += 2 * held_out / PGD["window"]  # at most two held-out losses per window
    out["restart"] += 2 * held_out / STEPS  # two at the end of the run
    plain = [n for n in BUILTIN_METHODS if not get_method(n).after_step]  # no hooks' extras
    jobs = [make_job(n, get_method(n).lr_grid[0] / 10) for n in plain]
    steps = max(2, repeats // 2)

    def lockstep():
        run_methods(jobs, W0, p64, steps=steps, batch=batch, seed=0, method_seed=1, quiet=True)

    out["end to end, per method (no hooks)"] = _median_ms(lockstep, 3) / steps / len(jobs)
    return out


def _cost(parts: dict[str, float]) -> float:
    """Milliseconds per step of a cell with every built-in method: shared parts once, each
    method's step and evaluation share."""
    methods = sum(parts[n] + parts["evaluation (every 50)"] for n in BUILTIN_METHODS)
    return parts["draw"] + parts["teacher"] + methods


def _timings(run: Path) -> dict[str, float]:
    return json.loads((run / "timings.json").read_text())


def _minima(runs: list[Path], k: int) -> int | None:
    for run in runs:
        report = run / "minima" / f"k{k}_n{k}_C1.json"
        if report.exists():
            return json.loads(report.read_text())["count"]
    return None


def project(costs: dict[int, dict[str, float]], base: Path, gd: list[Path]) -> list[tuple]:
    """The whole table, part by part, from a finished default run at one k (`base`: its
    measured tuning and evaluation seconds per protocol), scaled to every k by the measured
    cost of a step (`costs`) and by the number of minima, plus gd-population's measured
    seconds per k (its tuning pool of 1,000 seeds taken to cost what the evaluation seeds
    cost). Returns (k, part, seconds) rows."""
    config = json.loads((base / "config.json").read_text())
    (k0,) = config["ks"]
    timings = _timings(base)
    gd_seconds = {}
    for run in [base, *gd]:
        for key, seconds in _timings(run).items():
            if key.startswith("gd-population/eval_k"):
                gd_seconds[int(key.split("_k")[1].split("_")[0])] = seconds
    minima0 = _minima([base], k0)
    rows = []
    for k, parts in costs.items():
        scale = _cost(parts) / _cost(costs[k0])
        minima = _minima([base, *gd], k) or 0
        for protocol, count in (("random-init", 1), ("spurious-minima", minima / minima0)):
            if count == 0:
                continue
            tune = sum(v for key, v in timings.items() if key.startswith(f"tuning/{protocol}_"))
            evaluation = timings[f"eval_{protocol}_k{k0}_n{k0}_C1"]
            rows.append((k, f"sweeps, {protocol}", tune * scale))
            rows.append((k, f"evaluation, {protocol}", evaluation * scale * count))
        if k in gd_seconds:
            rows.append((k, "gd-population", gd_seconds[k] * (2 if minima else 1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8])
    parser.add_argument("--starts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--project", type=Path, default=None, help="a finished default run at one k (timings.json)"
    )
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
        rows = project(costs, args.project, args.gd)
        print("\n| k | part | seconds (one core) |")
        print("|---|---|---|")
        for k, part, seconds in rows:
            print(f"| {k} | {part} | {seconds:.0f} |")
        total = sum(r[2] for r in rows)
        print(f"\nwhole table: {total:.0f} s on one core; {total / 2:.0f} s as two processes")


if __name__ == "__main__":
    main()
