"""The escape benchmark's cells and their caches: `qmse escape`.

A cell is (k, protocol) on the benchmark's problem (`EscapeConfig.problem`, instance of size
k; for teacher–student, one or several teachers, whose starts the cell pools, each trained
on its own teacher: `qmse.escape.tuning.run_pooled`). Protocols: "random-init" (failure
rate from random starts) and "spurious-minima" (failure to escape from gd-population's
certified spurious minima, the direct test of the paper's claim; its rows count the
distinct minima modulo symmetry, the starts and failures of each, and a rate that weighs
every distinct minimum the same). In a cell every
sample-based method is tuned on tuning starts (disjoint from the evaluation starts,
`qmse.escape.tuning`) and then evaluated on the same evaluation starts and input batches
(common random numbers, `qmse.escape.engine`).
Every cached piece (gd-population end points, sweeps, rows) stores the key of what it was
computed from and is recomputed when it differs, so an interrupted run resumes and a changed
argument never gets stale results. `run_benchmark` writes results.json, table.md (Wilson
intervals, paired McNemar tests), figure.png and sweeps.png.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from scipy.stats import fisher_exact

from qmse.errors import UserError
from qmse.escape.config import (
    PROTOCOLS,
    TEACHER_STUDENT,
    EscapeConfig,
    cell_name,
    first_of_each,
    instance_of,
    is_benchmark_dir,
    key_of_starts,
    minima,
    population,
    problem_of,
    problems_of,
    saved_settings,
    spurious_minima,
    starts,
    streams,
    tuning_minima,
)
from qmse.escape.engine import engine_key, make_job
from qmse.escape.methods import get_method, load_plugin, method_key
from qmse.escape.population import PUBLISHED
from qmse.escape.problems import Problem
from qmse.escape.rows import Row
from qmse.escape.tuning import run_pooled, tune_methods
from qmse.keys import FORMAT, content_key, stale
from qmse.runs import claim, load_json, load_torch, provenance, save_json
from qmse.stats import holm, mcnemar, paired_rate_difference, tost_rates, wilson
from qmse.sweep import ray_session, run_tasks
from qmse.tuning import final_stages


def _sweeps(cfg: EscapeConfig, name: str) -> bool:
    """Whether a method has anything left to sweep (lr or a hyperparameter not fixed)."""
    return bool({"lr", *get_method(name).hyper} - set(cfg.fixed(name)))


def tuning(out: Path, cfg: EscapeConfig, k: int, protocol: str, names: list[str], quiet=False):
    """The sweeps of `names` at (k, protocol) on the tuning starts (cached per method in
    out/tuning/): method -> sweep record, for the methods with something to sweep."""
    methods = [get_method(n) for n in names if _sweeps(cfg, n)]
    if not methods:
        return {}
    found = problems_of(cfg, k)
    W0, owner = starts(out, cfg, k, protocol, tuning=True, quiet=quiet)
    if len(W0) == 0:
        raise RuntimeError(
            f"no spurious minima among the {cfg.tune_pool} tuning seeds at k={k}; raise "
            f"--tune-pool or tune at another k (--tune-k)"
        )
    seed, method_seed = streams(cfg, k, protocol, tuning=True)
    cell = cell_name(cfg, k)
    return tune_methods(
        methods,
        {m.name: cfg.fixed(m.name) for m in methods},
        W0.to(cfg.device),
        found,
        owner=owner,
        path=lambda name: out / "tuning" / f"{protocol}_{name}_{cell}.json",
        steps=cfg.steps,
        batch=cfg.batch,
        seed=seed,
        method_seed=method_seed,
        budget=cfg.tune_budget,
        meta={"protocol": protocol, "k": k, "n": found[0].shape[0], "outputs": found[0].outputs},
        label=f"tune {protocol} k={k}",
        quiet=quiet,
    )


def _tuning_summary(
    cfg: EscapeConfig, name: str, record: dict | None, k: int, minima: dict | None
) -> dict:
    """What a row says about how its settings were chosen (and, tuned on certified minima,
    whether they were distinct minima other than the evaluation ones: `tuning_minima`)."""
    if record is None:
        return {"fixed": True}
    stages = final_stages(record["stages"])
    return {
        "fixed": False,
        "tuned_at_k": k,
        "tune_starts": record["starts"],
        "range": {s["param"]: s["range"] for s in stages},
        "edge": not all(s["interior"] for s in stages),
        **(minima or {}),
    }


def _row(cfg, k, method, protocol, result, settings, tuned, starts_key, key, problem, labels, info):
    """A sample method's results row (with the per-start outcomes for the paired tests);
    `labels` (m,): each start's distinct minimum, None for random starts; `info`: whether
    those minima are strict and the kinds of stuck points left out (`config.minima`). Its
    cost, grad_evals, is the sample gradients per start that the engine counted (SAM's and
    homotopy's steps take two batch gradients); None without starts."""
    loss = result["loss"].cpu()
    seeds = int(loss.numel())
    success = result["success"].cpu()
    failed = ~success
    failures = int(failed.sum())
    lo, hi = wilson(failures, seeds)
    first = result["first_success"].cpu()[success].double()
    by_minimum = {}
    if labels is not None:
        count = int(labels.max()) + 1 if len(labels) else 0
        starts_of = torch.bincount(labels, minlength=count)
        fails_of = torch.bincount(labels, weights=failed.double(), minlength=count).long()
        rates = fails_of.double() / starts_of.clamp_min(1)
        by_minimum = {
            "minima": starts_of.tolist(),
            "minima_failures": fails_of.tolist(),
            "weighted_failure_rate": float(rates.mean()) if count else None,
        }
    reported = {
        f"mean_{name}": float(result[name].double().mean()) if seeds else None
        for name in get_method(method).report
    }
    reported |= info or {}
    return Row(
        k=k,
        n=problem.shape[0],
        outputs=problem.outputs,
        method=method,
        protocol=protocol,
        seeds=seeds,
        failures=failures,
        failure_rate=failures / seeds if seeds else float("nan"),
        ci95_low=lo,
        ci95_high=hi,
        diverged=int(result["diverged"].sum()) if seeds else 0,
        lr=settings.get("lr"),
        hyper={h: v for h, v in settings.items() if h != "lr"},
        batch=cfg.batch,
        steps=cfg.steps,
        median_loss=float(loss.median()) if seeds else float("nan"),
        grad_evals=int(result["gradients"][0]) * cfg.batch if seeds else None,
        median_first_success=float(first.median()) if len(first) else None,
        tuning=tuned,
        starts_key=starts_key,
        key=key,
        format=FORMAT,
        failed="".join("1" if f else "0" for f in failed.tolist()),
        family=get_method(method).family,
        problem=problem.name,
        instance=instance_of(cfg, k),
        **by_minimum,
        extra=reported,
    )


def row_key(method, starts_key, problem: Problem, cfg, seed, method_seed, settings) -> str:
    """The key of an evaluation row: the method's declared definition, the starts, the
    problem (name, instance, success threshold), the budget, the streams, the settings, the
    device and the engine's thresholds."""
    return content_key(
        "row",
        method_key(method),
        starts_key,
        problem.name,
        dict(problem.instance),
        problem.success,
        cfg.steps,
        cfg.batch,
        seed,
        method_seed,
        settings,
        cfg.device,
        engine_key(),
    )


def _stale(path: Path, saved: dict, key: str, quiet: bool) -> bool:
    """Whether a cached file is stale; says why when it was written by an older format."""
    reason = stale(saved, key)
    if reason is not None and saved.get("format") != FORMAT and not quiet:
        print(f"{path}: recomputed: {reason}", file=sys.stderr)
    return reason is not None


def add_paired_tests(rows: list[Row], references: Sequence[str]) -> None:
    """For every sample-method row, McNemar's test against each reference method's row of
    the same cell (same starts), stored in place as row.paired[reference] = {worse, better,
    p}: the exploratory comparisons, raw p (the declared ones are `declared_tests`)."""
    for protocol in PROTOCOLS:
        cells = [r for r in rows if r.protocol == protocol and r.failed]
        for row in cells:
            row.paired = {}
            for ref in references:
                other = next(
                    (
                        r
                        for r in cells
                        if r.method == ref
                        and (r.k, r.n, r.outputs) == (row.k, row.n, row.outputs)
                        and r.starts_key == row.starts_key
                    ),
                    None,
                )
                if other is None or ref == row.method:
                    continue
                row.paired[ref] = mcnemar(row.failed, other.failed)


def declared_tests(rows: list[Row], pairs: Sequence[tuple[str, str]], margin: float) -> list[dict]:
    """The declared comparisons (the primary family) in every cell where both methods ran on
    the same starts: A's failure rate minus B's with Newcombe's paired 95 % interval,
    McNemar's exact p, Holm over the family of each protocol, the equivalence test with the
    declared `margin` (two one-sided tests at 5 %: the 90 % interval within ± margin), and
    a verdict: "A fails more" / "A fails less" (Holm p < 0.05), "equivalent within
    ±margin", or "not determined"."""
    tests = []
    for protocol in PROTOCOLS:
        family = []
        for a, b in pairs:
            for ra in (r for r in rows if r.protocol == protocol and r.method == a and r.failed):
                rb = next(
                    (
                        r
                        for r in rows
                        if r.protocol == protocol and r.method == b and r.failed
                        and (r.k, r.n, r.outputs, r.starts_key)
                        == (ra.k, ra.n, ra.outputs, ra.starts_key)
                    ),
                    None,
                )  # fmt: skip
                if rb is None:
                    continue
                test = mcnemar(ra.failed, rb.failed)
                diff, lo, hi = paired_rate_difference(ra.failed, rb.failed)
                equal = tost_rates(ra.failed, rb.failed, margin)
                family.append(
                    {
                        "comparison": f"{a}:{b}",
                        "family": "primary",
                        "protocol": protocol,
                        "k": ra.k,
                        "n": ra.n,
                        "outputs": ra.outputs,
                        "seeds": ra.seeds,
                        "failures": [ra.failures, rb.failures],
                        "a_worse": test["worse"],
                        "a_better": test["better"],
                        "difference": diff,
                        "ci95_low": lo,
                        "ci95_high": hi,
                        "p": test["p"],
                        "margin": margin,
                        "ci90_low": equal["low"],
                        "ci90_high": equal["high"],
                        "equivalent": equal["equivalent"],
                    }
                )
        for test, p in zip(family, holm([t["p"] for t in family])):
            test["p_holm"] = p
            a, b = test["comparison"].split(":")
            if p < 0.05:
                test["verdict"] = f"{a} fails {'more' if test['difference'] > 0 else 'less'}"
            elif test["equivalent"]:
                test["verdict"] = f"equivalent within ±{margin:g}"
            else:
                test["verdict"] = "not determined"
        tests += family
    return tests


def _record_time(out: Path, part: str, seconds: float) -> None:
    save_json(out / "timings" / f"{part}.json", {"part": part, "seconds": round(seconds, 3)})


def evaluate_cell(
    out: Path, cfg: EscapeConfig, k: int, protocol: str, names: list[str], quiet: bool = False
) -> tuple[list[Row], list[dict]]:
    """Rows of the sample methods `names` at (k, protocol), each cached in out/rows/ under
    the key of its inputs; the missing ones run together on the same evaluation starts and
    input batches. Returns (rows, the sweep records they used)."""
    out = Path(out)
    cell = cell_name(cfg, k)
    problem = problem_of(cfg, k)
    W0, owner = starts(out, cfg, k, protocol, tuning=False, quiet=quiet)
    labels, info = None, None
    if protocol == "spurious-minima":
        found = minima(out, cfg, k, tag="eval", quiet=quiet)
        labels = found["labels"][first_of_each(found["owner"], cfg.sample_seeds)]
        excluded = {kind: found["excluded"].count(kind) for kind in sorted(set(found["excluded"]))}
        info = {"minima_isolated": found["isolated"], "minima_excluded": excluded}
    if len(W0) == 0:  # no minima to start from (e.g. k = 6)
        empty = {"loss": torch.zeros(0), "success": torch.zeros(0, dtype=torch.bool)}
        empty |= {"first_success": torch.zeros(0), "diverged": None}
        rows = []
        for name in names:
            result = empty | {r: torch.zeros(0) for r in get_method(name).report}
            rows.append(
                _row(cfg, k, name, protocol, result, {}, None, None, None, problem, labels, info)
            )
        return rows, []
    tune_k = cfg.tune_k or k
    records = tuning(out, cfg, tune_k, protocol, names, quiet=quiet)
    tune_minima = None
    if records and protocol == "spurious-minima":
        tune_minima = tuning_minima(out, cfg, tune_k, quiet=quiet)[2]
    seed, method_seed = streams(cfg, k, protocol, tuning=False)
    starts_key = key_of_starts(W0, owner, cfg, k)
    rows, todo = {}, {}
    for name in names:
        record = records.get(name)
        settings = record["chosen"] if record else cfg.fixed(name)
        key = row_key(get_method(name), starts_key, problem, cfg, seed, method_seed, settings)
        path = out / "rows" / f"{protocol}_{name}_{cell}.json"
        if path.exists() and not _stale(path, load_json(path), key, quiet):
            rows[name] = Row.from_json(load_json(path))
            rows[name].family = get_method(name).family  # presentation: not in the key
        else:
            tuned = _tuning_summary(cfg, name, record, tune_k, tune_minima)
            todo[name] = (settings, tuned, key, path)
    if todo:
        jobs = [
            make_job(name, s["lr"], {h: v for h, v in s.items() if h != "lr"})
            for name, (s, *_) in todo.items()
        ]
        started = time.perf_counter()
        results = run_pooled(
            jobs,
            W0.to(cfg.device),
            problems_of(cfg, k),
            owner,
            steps=cfg.steps,
            batch=cfg.batch,
            seed=seed,
            method_seed=method_seed,
            quiet=quiet,
            desc=f"{protocol} k={k}: {len(jobs)} methods",
        )
        _record_time(out, f"eval_{protocol}_{cell}", time.perf_counter() - started)
        for (name, (settings, tuned, key, path)), result in zip(todo.items(), results):
            rows[name] = _row(
                cfg, k, name, protocol, result, settings, tuned, starts_key, key, problem, labels,
                info,
            )  # fmt: skip
            save_json(path, rows[name].to_json())
    return [rows[n] for n in names], [records[n] for n in names if n in records]


def gd_row(out: Path, cfg: EscapeConfig, k: int, quiet: bool = False) -> Row:
    """The reproduction's row: gd-population (gradient descent at the problem's
    `descent_lr`) from the evaluation seeds of every teacher (a
    failure: loss not below the problem's success threshold), with Safran & Shamir's
    published rate (teacher–student, n = k, scalar output) and Fisher's exact test
    against it."""
    problem = problem_of(cfg, k)
    runs = population(out, cfg, k, tag="eval", quiet=quiet)
    loss = torch.cat([r["loss"] for r in runs])
    steps = torch.cat([r["steps"] for r in runs])
    seeds = len(loss)
    fails = int((~(loss < problem.success)).sum())  # a non-finite loss fails too
    lo, hi = wilson(fails, seeds)
    extra = {
        "capped": sum(int((~r["converged"]).sum()) for r in runs),
        "median_gd_steps": float(steps.double().median()),
        "max_gd_steps": int(steps.max()),
    }
    classic = cfg.problem == TEACHER_STUDENT and cfg.n_extra == 0 and cfg.outputs == 1
    published = PUBLISHED.get(k) if classic else None
    if published is not None:
        pub_fails = round(published * 1000)
        table = [[fails, cfg.seeds - fails], [pub_fails, 1000 - pub_fails]]
        extra |= {
            "published_rate": published,
            "published_in_ci95": bool(lo <= published <= hi),
            "fisher_p_vs_published": float(fisher_exact(table)[1]),
        }
    return Row(
        k=k,
        n=problem.shape[0],
        outputs=problem.outputs,
        method="gd-population",
        protocol="random-init",
        seeds=seeds,
        failures=fails,
        failure_rate=fails / seeds,
        ci95_low=lo,
        ci95_high=hi,
        diverged=int((~torch.isfinite(loss)).sum()),
        lr=problem.descent_lr,
        hyper={},
        batch=None,
        steps=None,
        median_loss=float(loss.median()),
        family="MSE optimisers",
        problem=problem.name,
        instance=instance_of(cfg, k),
        extra=extra,
    )


def minima_report(out: Path, cfg: EscapeConfig, k: int, *, quiet=False) -> dict:
    """The spurious-minima protocol's starting points at k (out/minima/, keyed): how many
    stuck end points, how many certified strict minima and how many distinct ones modulo
    symmetry (`config.minima`; per teacher too), the starts each distinct minimum has among
    the evaluation starts, its objective and smallest Hessian eigenvalue, and the kinds of
    the stuck classes left out (degenerate, saddle, not stationary)."""
    out = Path(out)
    problem, instance = problem_of(cfg, k), instance_of(cfg, k)
    found = minima(out, cfg, k, tag="eval", quiet=quiet)
    W, owner = found["W"], found["owner"]
    labels = found["labels"][first_of_each(owner, cfg.sample_seeds)]
    key = content_key("minima", problem.name, instance, W, cfg.sample_seeds)
    path = out / "minima" / f"{cell_name(cfg, k)}.json"
    if path.exists() and (saved := load_json(path)).get("key") == key:
        return saved
    certificates = found["certificates"]
    report = {
        "problem": problem.name,
        "instance": instance,
        "k": k,
        "n": problem.shape[0],
        "count": len(W),
        "of_seeds": cfg.seeds * cfg.teachers,
        "stuck": found["stuck"],
        "excluded": found["excluded"],
        "isolated": found["isolated"],
        "distinct": len(certificates),
        "distinct_per_teacher": [
            len(found["labels"][owner == t].unique()) for t in range(cfg.teachers)
        ],
        "starts_per_minimum": torch.bincount(labels, minlength=len(certificates)).tolist(),
        "distinct_losses": [c["objective"] for c in certificates],
        "min_hessian_eigenvalues": [c["min_eigenvalue"] for c in certificates],
        "key": key,
    }
    save_json(path, report)
    return report


def _check_config(out: Path, cfg: EscapeConfig) -> None:
    """A finished benchmark keeps its settings: cells, methods, fixed values and plug-ins may
    be added; any other difference from its config.json is refused, naming the keys. An
    unfinished one (killed, or failed) is judged on the new arguments: its caches are keyed
    by what they were computed from, so whatever still matches is reused."""
    saved = out / "config.json"
    if not (saved.exists() and (out / "results.json").exists()):
        return
    old = saved_settings(out)
    new = asdict(cfg)
    free = {"ks", "methods", "protocols", "lr", "hyper", "plugins", "references", "comparisons"}
    free |= {"equivalence_margin"}
    diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
    if diff:
        what = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
        raise UserError(f"{out} holds a benchmark with other settings ({what}); use another --out")


def _remote_phases(out: Path, cfg: EscapeConfig) -> Iterator[list[tuple]]:
    """The benchmark's cached pieces in dependency order, for Ray (each phase is finished
    before the next is asked for): gd-population from the evaluation seeds; the tuning
    pools' runs where the spurious-minima protocol has minima; the sweeps per (protocol,
    tuning k); the cells and minima reports. No two tasks of a phase write the same file."""
    sample = cfg.sample_methods
    minima = "spurious-minima" in cfg.protocols
    yield [("population", k, "eval") for k in cfg.ks if minima or "gd-population" in cfg.methods]
    sweeps = set()
    if any(_sweeps(cfg, m) for m in sample):
        for protocol in cfg.protocols:
            for k in cfg.ks:
                if protocol == "random-init" or len(spurious_minima(out, cfg, k, tag="eval")):
                    sweeps.add((protocol, cfg.tune_k or k))
    yield [("population", k, "tune") for p, k in sorted(sweeps) if p == "spurious-minima"]
    yield [("tune", p, k) for p, k in sorted(sweeps)]
    cells = [("cell", p, k) for p in cfg.protocols for k in cfg.ks] if sample else []
    yield cells + [("minima", k) for k in cfg.ks if minima]


def _remote_task(task: tuple) -> None:
    """One piece of `_remote_phases` (a Ray task): it fills the cache files that
    run_benchmark's loop then reads."""
    out, cfg, kind, *args = task
    out = Path(out)
    for path in cfg.plugins:  # a worker process imports the plug-ins itself
        load_plugin(path)
    sample = cfg.sample_methods
    if kind == "population":
        population(out, cfg, args[0], tag=args[1], quiet=True)
    elif kind == "tune":
        tuning(out, cfg, args[1], args[0], sample, quiet=True)
    elif kind == "minima":
        minima_report(out, cfg, args[0], quiet=True)
    else:
        evaluate_cell(out, cfg, args[1], args[0], sample, quiet=True)


def run_benchmark(
    out: str | os.PathLike,
    cfg: EscapeConfig,
    *,
    backend: str = "local",
    address: str | None = None,
    cpus_per_task: float = 1,
    gpus_per_task: float = 0,
    quiet: bool = False,
) -> list[Row]:
    """Every (k, protocol) cell, each piece cached so an interrupted run resumes; then
    results.json (the rows with their paired tests, without the per-start outcomes, which
    stay in rows/), sweeps.json (the sweeps the rows used) and timings.json, from which
    `qmse.escape.report.write_outputs` writes the tables and figures. The plug-ins are
    loaded and the methods checked first (`EscapeConfig.check_methods`); config.json is
    written once that passed and the configuration matches the directory's.

    `backend="ray"` computes the pieces as Ray tasks (`qmse.sweep.run_tasks`: the cluster at
    `address`, else a local one; `cpus_per_task` CPUs and `gpus_per_task` GPUs each; a task
    whose worker dies is retried) in dependency order; the same files result."""
    out = Path(out)
    cfg.check_methods()
    with claim(out, "escape-benchmark", recognise=is_benchmark_dir):
        _check_config(out, cfg)
        save_json(out / "config.json", asdict(cfg))
        save_json(out / "provenance.json", provenance(cfg.device))
        if backend != "local":  # fill the caches on Ray; the loop below then only reads them
            kw = {"num_cpus_per_task": cpus_per_task, "num_gpus_per_task": gpus_per_task}
            with ray_session(address, quiet=quiet):
                for i, phase in enumerate(_remote_phases(out, cfg)):
                    tasks = [(str(out), cfg, *task) for task in phase]
                    run_tasks(
                        _remote_task,
                        tasks,
                        backend=backend,
                        quiet=quiet,
                        desc=f"phase {i + 1}",
                        **kw,
                    )
        sample = cfg.sample_methods
        rows, records = [], []
        for protocol in cfg.protocols:
            for k in cfg.ks:
                if protocol == "spurious-minima":
                    minima_report(out, cfg, k, quiet=quiet)
                if protocol == "random-init" and "gd-population" in cfg.methods:
                    rows.append(gd_row(out, cfg, k, quiet=quiet))
                if sample:
                    cell_rows, cell_records = evaluate_cell(out, cfg, k, protocol, sample, quiet)
                    rows += cell_rows
                    records += [r for r in cell_records if r not in records]
        add_paired_tests(rows, cfg.paired_references())
        tests = declared_tests(rows, cfg.declared_comparisons(), cfg.equivalence_margin)
        _write_timings(out)
        sweeps = [{k: r[k] for k in ("method", "protocol", "k", "stages")} for r in records]
        save_json(out / "sweeps.json", sweeps)
        results = {"rows": [r.to_json(outcomes=False) for r in rows], "comparisons": tests}
        save_json(out / "results.json", results)
    return rows


def _write_timings(out: Path) -> dict[str, float]:
    """timings.json: the wall time of every computed piece found in the directory; returned."""
    parts = {}
    for path in sorted((out / "gd-population").glob("*.pt")):
        seconds = load_torch(path).get("seconds")
        if seconds is not None:
            parts[f"gd-population/{path.stem}"] = seconds
    for path in sorted((out / "tuning").glob("*.json")):
        parts[f"tuning/{path.stem}"] = round(load_json(path).get("seconds", math.nan), 3)
    for path in sorted((out / "timings").glob("*.json")):
        parts[path.stem] = load_json(path)["seconds"]
    save_json(out / "timings.json", parts)
    return parts
