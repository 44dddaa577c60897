"""The escape benchmark's tables (its figures are `qmse.escape.figures`), with the
statistics of `qmse.stats`.

Rates carry Wilson 95 % intervals (`qmse.stats.wilson`). Methods are
compared on the same starts (common random numbers), so each comparison is paired: McNemar's
exact test on the discordant starts (those where exactly one of the two methods failed; under
the null hypothesis each is equally likely to go either way, so their split is Binomial(b + c,
½)), against each reference method (MSE-SGD, momentum, QMSE by default), with Holm's
correction over every comparison of a protocol (docs/theory.md, "Fair baselines for
escaping").

Every table names its problem and instance (rows written before rows named it: the
teacher–student problem, unnamed). Starts at certified minima are counted by distinct
minimum modulo the problem's symmetries: how many a cell has and how many starts each got,
whether the tuning minima were other ones, and escape per distinct minimum with the rate
that weighs each distinct minimum the same beside the per-start rate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from qmse.errors import UserError
from qmse.escape.config import PROTOCOLS
from qmse.escape.figures import plot_budgets, plot_profiles, plot_results, plot_tuning
from qmse.escape.population import PUBLISHED
from qmse.escape.rows import Row
from qmse.runs import atomic_write, load_json


def _settings(row: Row) -> str:
    """A row's step size and hyperparameters: 0.2 (sigma=0.4), * where fixed by the user,
    † where the sweep stopped with the value on an edge of its range."""
    if row.lr is None:
        return ""
    text = f"{row.lr:g}"
    if row.hyper:
        text += " (" + ", ".join(f"{k}={v:g}" for k, v in row.hyper.items()) + ")"
    tuned = row.tuning or {}
    if tuned.get("fixed"):
        text += "*"
    if tuned.get("edge"):
        text += "†"
    return text


def _budget(rows: Sequence[Row], steps: int, batch: int) -> str:
    """The step budget and what it cost per start in sample gradients (a row's grad_evals),
    naming the methods whose steps take more than one batch gradient (SAM, homotopy)."""
    base = steps * batch
    more = {r.method: r.grad_evals for r in rows if r.grad_evals and r.grad_evals != base}
    text = f"{steps} steps × batch {batch} = {base} sample gradients per start"
    if more:
        text += " (" + ", ".join(f"{m}: {g}" for m, g in more.items()) + ")"
    return text


def wall_times(timings: Mapping[str, float]) -> list[str]:
    """Markdown lines: the seconds of `timings` (timings.json: piece -> seconds, the pieces
    named like "gd-population/eval_k8_n8_C1", "tuning/random-init_sgd_k8_n8_C1",
    "eval_random-init_k8_n8_C1", or "..._k2_n2_C1_matrix-sensing" for a problem other than
    teacher–student) summed by problem and kind, with a total row."""
    kinds = ("gd-population", "sweeps", "evaluation")
    sums: dict[tuple[int, int, int], dict[str, float]] = {}
    for piece, seconds in timings.items():
        match = re.search(r"_k(\d+)_n(\d+)_C(\d+)(?:_([A-Za-z0-9.-]+))?$", piece)
        if match is None:
            raise UserError(
                f"timings.json names a piece {piece!r} that does not end in _k<k>_n<n>_C<C>: "
                "it was not written by qmse.escape (remove it from timings/ and rerun)"
            )
        k, n, C = map(int, match.groups()[:3])
        kind = "gd-population" if piece.startswith("gd-population/") else (
            "sweeps" if piece.startswith("tuning/") else "evaluation")  # fmt: skip
        row = sums.setdefault((match[4] or "", k, n, C), dict.fromkeys(kinds, 0.0))
        row[kind] += seconds
    if not sums:
        return []
    total = {kind: sum(row[kind] for row in sums.values()) for kind in kinds}
    named = {
        (f"{name} " if name else "")
        + f"k={k}"
        + (f", n={n}" if n != k or name else "")
        + (f", C={C}" if C != 1 else ""): sums[name, k, n, C]
        for name, k, n, C in sorted(sums)
    }
    lines = [
        "### Wall time (s): each computed piece, from timings.json, summed by problem and kind",
        "",
        "| problem | " + " | ".join(kinds) + " | total |",
        "|---" * (len(kinds) + 2) + "|",
    ]
    for problem, row in [*named.items(), ("all", total)]:
        cells = [f"{row[kind]:,.0f}" for kind in kinds] + [f"{sum(row.values()):,.0f}"]
        lines.append(f"| {problem} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_table(
    rows: list[Row],
    path: str | os.PathLike,
    timings: Mapping[str, float] | None = None,
    comparisons: Sequence[dict] = (),
    minima: Mapping[int, dict] | None = None,
) -> str:
    """Markdown: failure rate with Wilson 95 % interval (and divergences), method × k, one
    table per protocol; then the paired tests against each reference method; then, given
    `timings`, the wall time of the pieces (`wall_times`). `minima`: the minima reports by k
    (minima/*.json), whose distinct-minima counts stand in for rows written before rows
    carried them."""
    lines = []
    for protocol in PROTOCOLS:
        sel = [r for r in rows if r.protocol == protocol]
        if not sel:
            continue
        ks = sorted({r.k for r in sel})
        methods = list(dict.fromkeys(r.method for r in sel))
        what = "failure rate" if protocol == "random-init" else "failure to escape"
        budget = next((r for r in sel if r.steps), None)
        lines += [f"### Protocol {protocol}: {what} [Wilson 95 %] (diverged)", ""]
        lines += _problem_lines(sel, ks)
        if budget:
            lines += [f"Budget: {_budget(sel, budget.steps, budget.batch)}. Settings per k: * "
                      f"fixed by the user, † chosen on an edge of its sweep.", ""]  # fmt: skip
        lines.append("| method | settings per k | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---" * (len(ks) + 2) + "|")
        for m in methods:
            cells, settings = [], []
            for k in ks:
                r = next((r for r in sel if r.method == m and r.k == k), None)
                if r is None or r.seeds == 0:
                    cells.append("–" if r is None else "no minima")
                    continue
                settings.append(_settings(r))
                published = r.extra.get("published_rate")
                cells.append(
                    f"{r.failures}/{r.seeds} = {r.failure_rate:.3f} "
                    f"[{r.ci95_low:.3f}, {r.ci95_high:.3f}]"
                    + (f" ({r.diverged})" if r.diverged else "")
                    + (f"; published {published:g}" if published is not None else "")
                    + (
                        f"; weighted {r.weighted_failure_rate:.3f} over {len(r.minima)} "
                        f"distinct minima"
                        if r.minima
                        else ""
                    )
                )
            lines.append(f"| {m} | {' / '.join(settings)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _minima_lines(sel, ks, methods, protocol)
        if protocol == "spurious-minima" and all(r.minima is None for r in sel):
            lines += _reported_minima(minima or {}, ks)
        declared = [t for t in comparisons if t["protocol"] == protocol]
        lines += _declared_lines(declared, protocol)
        refs = [m for m in methods if any(m in r.paired for r in sel)]
        # the second edition adjusted these by Holm; they are exploratory now: raw p
        adjusted = any("p_holm" in t for r in sel for t in r.paired.values())
        for ref in refs:
            lines += [
                f"#### Paired against {ref} ({protocol}): starts won / lost "
                f"against {ref}, McNemar exact p Holm-adjusted (bold: < 0.05)"
                if adjusted
                else f"#### Exploratory: paired against {ref} ({protocol}): starts won / lost "
                f"against {ref}, McNemar exact p, raw (not corrected for multiple tests)",
                "",
            ]
            lines += _by_method_and_k(
                sel,
                ks,
                methods,
                lambda r, ref=ref, adjusted=adjusted: _paired_cell(r.paired.get(ref), adjusted),
                drop_empty=True,
            )
    lines += wall_times(timings or {})
    text = "\n".join(lines)
    atomic_write(path, text)
    return text


def _reported_minima(minima: Mapping[int, dict], ks: Sequence[int]) -> list[str]:
    """The distinct minima per k from the minima reports, for rows that predate counting
    them (only reports that count them: `distinct` and `starts_per_minimum`)."""
    found = {k: minima[k] for k in ks if "starts_per_minimum" in minima.get(k, {})}
    if not found:
        return []
    each = "; ".join(
        f"k={k}: {m['distinct']} ({', '.join(map(str, m['starts_per_minimum']))})"
        for k, m in found.items()
    )
    return [f"Distinct minima modulo symmetry (starts at each; from minima/): {each}.", ""]


def _paired_cell(test: dict | None, adjusted: bool) -> str | None:
    """A paired test as a table cell: starts won and lost, p (Holm-adjusted: bold below
    0.05); None without a test."""
    if test is None:
        return None
    value = test["p_holm"] if adjusted else test["p"]
    p = f"p={value:.2g}"
    return f"+{test['better']} −{test['worse']} " + (f"**{p}**" if adjusted and value < 0.05 else p)


def _problem_lines(rows: Sequence[Row], ks: Sequence[int]) -> list[str]:
    """The problem the rows ran on and its instance at each k (rows written before rows named
    their problem say nothing: teacher–student)."""
    named = {r.k: r for r in rows if r.problem is not None}
    if not named:
        return []
    names = sorted({r.problem for r in named.values()})
    cells = [
        f"k={k}: " + ", ".join(f"{a}={v}" for a, v in (named[k].instance or {}).items() if a != "k")
        for k in ks
        if k in named
    ]
    return [f"Problem: {', '.join(names)} ({'; '.join(cells)}).", ""]


def _minima_lines(
    rows: Sequence[Row], ks: Sequence[int], methods: Sequence[str], protocol: str
) -> list[str]:
    """For starts at certified minima: how many distinct minima (modulo the problem's
    symmetries) each cell has and how many starts each got; whether the tuning minima
    were other distinct minima; and a table of escape per distinct minimum with the rate
    that weighs every distinct minimum the same beside the per-start rate."""
    counted = [r for r in rows if r.minima is not None]
    if not counted:
        return []
    per_k = {r.k: r.minima for r in counted}
    lines = [
        "Distinct minima modulo symmetry (starts at each): "
        + "; ".join(
            f"k={k}: {len(per_k[k])} ({', '.join(map(str, per_k[k])) or 'none'})"
            for k in ks
            if k in per_k
        )
        + ".",
        "",
    ]
    loose = sorted({r.k for r in counted if r.extra.get("minima_isolated") is False})
    if loose:
        lines += [
            f"Not isolated at k={', '.join(map(str, loose))}: the minima there have a singular "
            f"Hessian (a set of minima, not points), so a start counts as stuck by the "
            f"problem's own test of its value, and distinct minima are points of that set "
            f"apart by more than the tolerance.",
            "",
        ]
    left = {r.k: r.extra["minima_excluded"] for r in counted if r.extra.get("minima_excluded")}
    if left:
        lines += [
            "Stuck points left out, not certified strict minima: "
            + "; ".join(
                f"k={k}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
                for k, kinds in sorted(left.items())
            )
            + " (a minimum that is not isolated counts only for a problem with a stuck test "
            "of its value).",
            "",
        ]
    tuned = {r.k: r.tuning for r in counted if r.tuning and "disjoint_minima" in r.tuning}
    if tuned:
        lines += [
            "Tuning minima: "
            + "; ".join(
                f"k={k}: {t['tune_minima']} distinct, "
                + (
                    "other than the evaluation minima"
                    if t["disjoint_minima"]
                    else f"the same as evaluation minima (the problem has no other at k="
                    f"{t['tuned_at_k']})"
                )
                for k, t in sorted(tuned.items())
            )
            + ".",
            "",
        ]
    lines += [
        f"#### Escape per distinct minimum ({protocol}): weighted failure rate (the mean of "
        f"the distinct minima's rates, each minimum weighing the same), per-start rate, then "
        f"failures / starts at each distinct minimum",
        "",
    ]

    def per_minimum(r: Row) -> str | None:
        if not r.minima:
            return None
        each = ", ".join(f"{f}/{n}" for f, n in zip(r.minima_failures, r.minima))
        return f"{r.weighted_failure_rate:.3f} (per start {r.failure_rate:.3f}): {each}"

    return lines + _by_method_and_k(counted, ks, methods, per_minimum)


def _by_method_and_k(
    rows: Sequence[Row],
    ks: Sequence[int],
    methods: Sequence[str],
    cell: Callable[[Row], str | None],
    *,
    drop_empty: bool = False,
) -> list[str]:
    """A markdown table, a line per method and a column per k: `cell` of the method's row
    at k, "–" where it has none or `cell` says None; with `drop_empty`, a method with
    nothing in any column is left out. Ends with an empty line."""
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for m in methods:
        cells = []
        for k in ks:
            r = next((r for r in rows if r.method == m and r.k == k), None)
            text = None if r is None else cell(r)
            cells.append("–" if text is None else text)
        if not drop_empty or any(c != "–" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _declared_lines(tests: Sequence[dict], protocol: str) -> list[str]:
    """The declared comparisons of a protocol (`qmse.escape.cells.declared_tests`) as a
    table: A's failure rate minus B's with its paired 95 % interval, raw and Holm p, the
    equivalence test's 90 % interval, the verdict."""
    if not tests:
        return []
    margin = tests[0]["margin"]
    lines = [
        f"#### Declared comparisons ({protocol}): the primary family, Holm over its "
        f"{len(tests)} tests; equivalent: the 90 % interval within ±{margin:g}",
        "",
        "| A:B | k | failures A / B of starts | A − B [95 %] | A lost / won | p | Holm p | "
        "90 % interval | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        fa, fb = t["failures"]
        lines.append(
            f"| {t['comparison']} | {t['k']} | {fa} / {fb} of {t['seeds']} | "
            f"{t['difference']:+.3f} [{t['ci95_low']:+.3f}, {t['ci95_high']:+.3f}] | "
            f"{t['a_worse']} / {t['a_better']} | {t['p']:.2g} | {t['p_holm']:.2g} | "
            f"[{t['ci90_low']:+.3f}, {t['ci90_high']:+.3f}] | {t['verdict']} |"
        )
    return [*lines, ""]


def read_benchmark(out: str | os.PathLike) -> dict:
    """A finished benchmark's files: "rows" (Row), "comparisons" (the declared tests; none
    in a results.json written before them, which is the list of rows alone), "timings"
    (timings.json, {} without it), "config" (config.json) and "minima" (the minima/*.json
    reports by k)."""
    out = Path(out)
    results = load_json(out / "results.json")
    if isinstance(results, list):  # written before the declared comparisons
        results = {"rows": results, "comparisons": []}
    return {
        "rows": [Row.from_json(r) for r in results["rows"]],
        "comparisons": results["comparisons"],
        "timings": load_json(out / "timings.json") if (out / "timings.json").exists() else {},
        "config": load_json(out / "config.json"),
        "minima": {m["k"]: m for m in map(load_json, sorted((out / "minima").glob("*.json")))},
    }


def write_outputs(out: str | os.PathLike) -> dict[str, Path]:
    """table.md and the figures (`qmse.escape.figures`: figure.png, sweeps.png, budgets.png,
    profiles.png) of the benchmark in `out`, from its files alone:
    results.json (the rows with their exploratory paired tests, and the declared
    comparisons; an older results.json is the list of rows alone), timings.json,
    config.json and
    sweeps.json (the sweeps the rows used; a directory written before it: tuning/*.json).
    Returns the paths written, by kind."""
    out = Path(out)
    found = read_benchmark(out)
    rows, cfg = found["rows"], found["config"]
    write_table(rows, out / "table.md", found["timings"], found["comparisons"], found["minima"])
    classic = cfg.get("problem", "teacher-student") == "teacher-student"
    classic &= cfg.get("n_extra", 0) == 0 and cfg.get("outputs", 1) == 1
    published = PUBLISHED if classic else None
    plot_results(rows, out / "figure.png", published)
    paths = {"table": out / "table.md", "figure": out / "figure.png"}
    if (out / "sweeps.json").exists():
        records = load_json(out / "sweeps.json")
    else:
        records = [load_json(p) for p in sorted((out / "tuning").glob("*.json"))]
    if any(r.get("stages") for r in records):
        plot_tuning(records, out / "sweeps.png")
        paths["sweeps"] = out / "sweeps.png"
    if plot_budgets(records, out / "budgets.png"):
        paths["budgets"] = out / "budgets.png"
    if plot_profiles(rows, out / "profiles.png"):
        paths["profiles"] = out / "profiles.png"
    return paths
