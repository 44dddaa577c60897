"""Where a step of `qmse escape` goes, and what a committed benchmark's whole computation costs.

Per step at teacher width k, S starts, batch B, on one thread, timed round-robin (median of
--repeats rounds):
- draw, teacher: the input batch (S, B, d) and the teacher's outputs on it, made once per
  step for every method of a cell (common random numbers);
- each built-in method's own step: its gradient (`qmse.escape.engine.job_gradient`), update
  and divergence check, plus its share of the closed-form evaluation every 50 steps and of
  its hooks (PGD's held-out losses every 500 steps, restart's at the end of a 3,000-step run);
- "previous": the engine before the lockstep one paid per method and step a draw of its own
  and autograd through the sample loss (shown for SGD and QMSE);
- end to end: `run_methods` with every built-in method without hooks in lockstep, per
  method and step (shared parts included).

With --replay DIR ... (committed benchmark directories of one k each, e.g. docs/escape-2/k6
... k12), their whole computation is replayed piece by piece: every round of every sweep
(its methods and settings, read from tuning/*.json) and every evaluation cell (its methods'
chosen settings and number of starts, from rows/*.json) runs `run_methods` for
STEPS_TIMED steps from random starts, and its CPU seconds per step, times the benchmark's
step budget, plus the held-out losses of PGD's and restart's hooks, is the piece's
estimated time; gd-population's seconds are those recorded in the directory's timings.json
(its code is not timed here). Each tree is timed in a process of its own; with --baseline
SRC (another tree's src/, e.g. `git archive <commit> src | tar -x -C /tmp/old`) the two
trees alternate --pairs times and each piece's ratio is the median of its paired ratios.
CPU time, not wall time: on a shared machine it is what one idle core would take (cache
and memory contention still inflate it). Cells are independent, so two processes share
two cores: the whole estimate on two cores is half the sum.

    python -m benchmarks.escape_speed --k 6 8 10 12 --starts 1000 --batch 64
    python -m benchmarks.escape_speed --replay docs/escape-2/k6 docs/escape-2/k8 \
        docs/escape-2/k10 docs/escape-2/k12 --baseline /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
        state = {"rng": torch.Generator().manual_seed(1)} | dict(method.constants)
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


STEPS_TIMED = 50  # steps timed per replayed piece: one evaluation of the exact objective, as
# in every 50 steps of a run; PGD's window (500 steps) and restart's halfway point not reached


def pieces(dirs: list[Path]) -> list[dict]:
    """A committed benchmark's computation, piece by piece (module docstring): each sweep
    round and evaluation cell as {name, kind, k, n, C, m starts, jobs [[method, [settings]]],
    steps, batch}; gd-population as {name, kind, k, recorded seconds}."""
    out = []
    for folder in dirs:
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("problem", "teacher-student") != "teacher-student" or cfg.get("teachers", 1) > 1:
            raise SystemExit(f"{folder}: only single-teacher teacher-student benchmarks replay")
        (k,) = cfg["ks"]
        shape = {"k": k, "n": k + cfg.get("n_extra", 0), "C": cfg.get("outputs", 1)}
        shape |= {"steps": cfg["steps"], "batch": cfg["batch"]}
        for protocol in cfg["protocols"]:
            records = [
                json.loads(p.read_text()) for p in sorted(folder.glob(f"tuning/{protocol}_*"))
            ]
            for r in sorted({p["round"] for record in records for p in record["points"]}):
                jobs = [[rec["method"], [p["params"] for p in rec["points"] if p["round"] == r]]
                        for rec in records]  # fmt: skip
                jobs = [j for j in jobs if j[1]]
                out.append({"name": f"sweeps {protocol} round {r}", "kind": "sweeps", **shape,
                            "m": records[0]["starts"], "jobs": jobs})  # fmt: skip
            rows = [json.loads(p.read_text()) for p in sorted(folder.glob(f"rows/{protocol}_*"))]
            rows = [row for row in rows if row["seeds"]]
            if rows:
                jobs = [[row["method"], [{"lr": row["lr"], **row["hyper"]}]] for row in rows]
                out.append({"name": f"evaluation {protocol}", "kind": "evaluation", **shape,
                            "m": rows[0]["seeds"], "jobs": jobs})  # fmt: skip
        timings = json.loads((folder / "timings.json").read_text())
        gd = sum(v for name, v in timings.items() if name.startswith("gd-population/"))
        out.append({"name": "gd-population (recorded)", "kind": "gd-population", "k": k,
                    "recorded": gd})  # fmt: skip
    return out


def measure(todo: list[dict]) -> dict[str, float]:
    """Each timed piece's estimated CPU seconds (module docstring), keyed "k name"; in the
    tree this process imports (so only calls both engines have)."""
    torch.set_num_threads(1)
    out = {}
    for piece in todo:
        k, n, m, C = piece["k"], piece["n"], piece["m"], piece["C"]
        problem = make_problem(k, n, outputs=C)
        W0 = init_weights(range(m), n, k)
        jobs = []
        for name, settings in piece["jobs"]:
            hyper = get_method(name).hyper
            values = {h: [s[h] for s in settings] for h in hyper if h in settings[0]}
            # restart is SGD with hooks that fire once per run (halfway and at the end): timed
            # as SGD, its held-out losses added below, not scaled with the steps
            timed = "sgd" if name == "restart" else name
            jobs.append(make_job(timed, [s["lr"] for s in settings], values))
        kw = {"batch": piece["batch"], "seed": 0, "method_seed": 1, "quiet": True}
        run_methods(jobs, W0, problem, steps=2, **kw)  # warm up
        started = time.process_time()
        run_methods(jobs, W0, problem, steps=STEPS_TIMED, **kw)
        seconds = (time.process_time() - started) / STEPS_TIMED * piece["steps"]
        lanes = {name: len(s) for name, s in piece["jobs"]}
        calls = 2 * lanes.get("pgd", 0) * piece["steps"] // PGD["window"]
        calls += 2 * lanes.get("restart", 0)  # at most two per window; two at the end
        if calls:
            run = Run(piece["steps"], piece["batch"], problem.to(torch.float32), None)
            gen = torch.Generator().manual_seed(0)
            started = time.process_time()
            run.held_out_loss(W0.float(), gen)
            seconds += calls * (time.process_time() - started)
        out[f"{k} {piece['name']}"] = seconds
    return out


def _measure_in(src: Path | None, todo: list[dict]) -> dict[str, float]:
    """`measure` in a process of its own that imports qmse from `src` (None: this tree)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "pieces.json", Path(tmp) / "seconds.json"
        spec.write_text(json.dumps(todo))
        cmd = [sys.executable, "-m", "benchmarks.escape_speed", "--measure", str(spec), str(result)]
        subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(result.read_text())


def replay(dirs: list[Path], baseline: Path | None, pairs: int) -> None:
    """Print the replayed pieces' estimated seconds summed by k and kind (with the
    baseline's and the paired ratio), and the whole estimate on two cores."""
    every = pieces(dirs)
    timed = [p for p in every if p["kind"] != "gd-population"]
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    runs = {"new": [], "old": []}
    for _ in range(pairs):
        if baseline is not None:
            runs["old"].append(_measure_in(baseline, timed))
        runs["new"].append(_measure_in(None, timed))
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    groups: dict[tuple[int, str], list[str]] = {}
    for p in timed:
        groups.setdefault((p["k"], p["kind"]), []).append(f"{p['k']} {p['name']}")
    head = "| k | part | pieces | estimated s (one core) |"
    if baseline is not None:
        head += " baseline s | baseline / new (median of pairs) |"
    print(head + "\n" + "|---" * head.count(" | ") + "|---|")
    totals = {"new": 0.0, "old": 0.0}
    for (k, kind), names in sorted(groups.items()):
        new = [sum(r[n] for n in names) for r in runs["new"]]
        line = f"| {k} | {kind} | {len(names)} | {statistics.median(new):,.0f} |"
        totals["new"] += statistics.median(new)
        if baseline is not None:
            old = [sum(r[n] for n in names) for r in runs["old"]]
            ratio = statistics.median(o / n for o, n in zip(old, new))
            line += f" {statistics.median(old):,.0f} | {ratio:.2f} |"
            totals["old"] += statistics.median(old)
        print(line)
    gd = sum(p["recorded"] for p in every if p["kind"] == "gd-population")
    print(f"| all | gd-population, recorded wall s | {len(dirs)} | {gd:,.0f} |")
    whole = totals["new"] + gd
    print(f"\nwhole computation: {whole:,.0f} s on one core, {whole / 2:,.0f} s "
          f"({whole / 120:.1f} min) on two cores as two processes")  # fmt: skip
    if baseline is not None:
        pair = [sum(o.values()) / sum(n.values()) for o, n in zip(runs["old"], runs["new"])]
        before = totals["old"] + gd
        print(f"baseline: {before:,.0f} s on one core ({before / 120:.1f} min on two cores); "
              f"timed pieces baseline / new {statistics.median(pair):.2f} "
              f"(pairs: {', '.join(f'{r:.2f}' for r in pair)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8])
    parser.add_argument("--starts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--replay", type=Path, nargs="+", help="committed benchmark dirs, one k each"
    )
    parser.add_argument("--baseline", type=Path, help="another tree's src/ to time against")
    parser.add_argument("--pairs", type=int, default=1, help="timings of each tree (alternating)")
    parser.add_argument("--measure", type=Path, nargs=2, help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    if args.measure:
        spec, result = args.measure
        result.write_text(json.dumps(measure(json.loads(spec.read_text()))))
        return
    if args.replay:
        replay(args.replay, args.baseline, args.pairs)
        return
    torch.set_num_threads(args.threads)
    costs = {k: time_parts(k, args.starts, args.batch, args.repeats) for k in args.k}
    names = list(next(iter(costs.values())))
    print(f"ms per step, {args.starts} starts, batch {args.batch}, {args.threads} thread(s)\n")
    print("| part | " + " | ".join(f"k={k}" for k in costs) + " |")
    print("|---" * (len(costs) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{c[name]:.2f}" for c in costs.values()) + " |")


if __name__ == "__main__":
    main()
