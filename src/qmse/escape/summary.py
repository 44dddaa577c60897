"""Several escape benchmarks read together: an edition's summary across problems
(docs/escape.md's third edition).

Each benchmark is a directory `qmse escape` wrote. Nothing is recomputed; everything comes
from its config.json, results.json (the rows and the declared comparisons), minima/ (the
distinct certified minima per size) and timings.json:

- `settings_table`: what each benchmark ran: the problem and its sizes, the protocols, the
  methods, the budget (steps × batch) and the tuning (trials per method, tuning starts);
- `cells_table`: one line per cell (benchmark, protocol, size): the problem, the starts, the
  distinct certified minima the starts sit at (spurious-minima protocol), and every declared
  comparison's paired difference A − B of failure rates with its verdict;
- `verdict_table`: per problem family and declared comparison, how many cells gave each
  verdict, so an answer across cells says which settings it rests on;
- `wall_table`: every benchmark's summed wall time, and the total;
- `summary_rows`: every row of every benchmark, for `qmse.escape.figures.plot_profiles`
  (performance profiles over all cells of all problems).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from qmse.errors import UserError
from qmse.escape.config import COMPARISONS, PROTOCOLS
from qmse.escape.figures import plot_profiles
from qmse.escape.report import read_benchmark
from qmse.escape.rows import Row
from qmse.runs import atomic_write

VERDICTS = ("fails more", "fails less", "equivalent", "not determined")
SHORT = {"fails more": "more", "fails less": "less", "equivalent": "equiv.",
         "not determined": "n.d."}  # fmt: skip


def load_benchmark(path: str | os.PathLike) -> dict:
    """A benchmark directory's config, rows, declared comparisons, minima reports (by size)
    and summed wall time; a UserError naming what is missing if it is not a finished one."""
    path = Path(path)
    if not (path / "results.json").exists() or not (path / "config.json").exists():
        raise UserError(
            f"{path}: no results.json and config.json; give directories that `qmse escape` finished"
        )
    found = read_benchmark(path)
    return {"name": path.name, **found, "seconds": sum(found["timings"].values())}


def family(config: Mapping) -> str:
    """The problem family a benchmark ran (config.json's problem; teacher–student before
    config.json named it)."""
    return config.get("problem", "teacher-student")


def describe(config: Mapping, k: int) -> str:
    """A cell's problem in a few words: its size and what else defines it."""
    problem = family(config)
    if problem == "teacher-student":
        words = [f"k={k}", f"n={k + config['n_extra']}", f"C={config['outputs']}"]
        if config.get("teachers", 1) > 1:
            words.append(f"{config['teachers']} teachers")
        if config.get("teacher", "identity") != "identity":
            words.append(f"{config['teacher']} V")
        return f"{problem} {', '.join(words)}"
    args = ", ".join(
        f"{a}={v:g}" if isinstance(v, float) else f"{a}={v}"
        for a, v in config.get("problem_args", {}).items()
    )
    return f"{problem} size {k}" + (f", {args}" if args else "")


def verdict_kind(test: Mapping) -> str:
    """One of VERDICTS for a declared comparison (`qmse.escape.cells.declared_tests`)."""
    return next(v for v in VERDICTS if v in test["verdict"])


def settings_table(benches: Sequence[dict]) -> str:
    """Markdown: a line per benchmark with the settings its conclusions rest on."""
    head = ["benchmark", "problem", "sizes", "protocols", "methods", "steps × batch", "tuning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in benches:
        c = b["config"]
        ks = c["ks"]
        problem = describe(c, ks[0]).replace(f"k={ks[0]}, ", "").replace(f" size {ks[0]}", "")
        if family(c) == "teacher-student":
            extra = f"+{c['n_extra']}" if c["n_extra"] else ""
            problem = problem.replace(f"n={ks[0] + c['n_extra']}", f"n=k{extra}")
        budget = c.get("tune_budget")
        trials = f"{budget} trials" if budget else "coordinate passes"
        sample = sum(m != "gd-population" for m in c["methods"])  # gradient descent alone: –
        line = [b["name"], problem, ", ".join(map(str, ks)), ", ".join(c["protocols"]),
                str(sample), f"{c['steps']:,} × {c['batch']}" if sample else "–",
                f"{trials}, {c['tune_seeds']} starts" if sample else "–"]  # fmt: skip
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _distinct(bench: dict, k: int) -> str:
    report = bench["minima"].get(k)
    if report is None:
        return "–"
    if not report.get("isolated", True):
        return f"{report['distinct']} (not isolated)"
    return str(report["distinct"])


def _comparisons(benches: Sequence[dict]) -> list[str]:
    """The declared comparisons any benchmark ran, in COMPARISONS' order first."""
    ran = list(dict.fromkeys(t["comparison"] for b in benches for t in b["comparisons"]))
    return [c for c in COMPARISONS if c in ran] + [c for c in ran if c not in COMPARISONS]


def cells_table(benches: Sequence[dict]) -> str:
    """Markdown: a line per cell with declared comparisons (module docstring); each
    comparison's entry is A − B of the failure rates and the verdict (more, less: Holm
    p < 0.05; equiv.: the 90 % interval within the declared margin; n.d.: neither)."""
    names = _comparisons(benches)
    head = ["benchmark", "problem", "protocol", "starts", "distinct minima", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench in benches:
        tests = {(t["protocol"], t["k"], t["comparison"]): t for t in bench["comparisons"]}
        for protocol in PROTOCOLS:
            for k in dict.fromkeys(t["k"] for t in bench["comparisons"]):
                found = [tests.get((protocol, k, c)) for c in names]
                if not any(found):
                    continue
                seeds = next(t["seeds"] for t in found if t)
                distinct = _distinct(bench, k) if protocol == "spurious-minima" else "–"
                cells = [
                    f"{t['difference']:+.3f} {SHORT[verdict_kind(t)]}" if t else "–" for t in found
                ]
                line = [bench["name"], describe(bench["config"], k), protocol, f"{seeds:,}"]
                lines.append("| " + " | ".join([*line, distinct, *cells]) + " |")
    return "\n".join(lines)


def verdict_counts(benches: Sequence[dict]) -> dict[tuple[str, str, str], Counter]:
    """(family, protocol, comparison) -> how many cells gave each verdict kind."""
    counts: dict[tuple[str, str, str], Counter] = {}
    for bench in benches:
        for t in bench["comparisons"]:
            key = (family(bench["config"]), t["protocol"], t["comparison"])
            counts.setdefault(key, Counter())[verdict_kind(t)] += 1
    return counts


def verdict_table(benches: Sequence[dict]) -> str:
    """Markdown: per family and protocol, each declared comparison's cells of each verdict
    (e.g. "2 more, 1 equiv.")."""
    counts = verdict_counts(benches)
    names = _comparisons(benches)
    head = ["family", "protocol", "cells", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = sorted({(f, p) for f, p, _ in counts}, key=lambda g: (g[0], PROTOCOLS.index(g[1])))
    for fam, protocol in groups:
        found = [counts.get((fam, protocol, c), Counter()) for c in names]
        cells = max(c.total() for c in found)
        entries = [", ".join(f"{c[v]} {SHORT[v]}" for v in VERDICTS if c[v]) or "–" for c in found]
        lines.append("| " + " | ".join([fam, protocol, str(cells), *entries]) + " |")
    return "\n".join(lines)


def wall_table(benches: Sequence[dict]) -> str:
    """Markdown: every benchmark's wall time (the sum of its timings.json) and the total."""
    lines = ["| benchmark | problem | seconds | hours |", "|---|---|---|---|"]
    for b in benches:
        lines.append(f"| {b['name']} | {family(b['config'])} | {b['seconds']:,.0f} | "
                     f"{b['seconds'] / 3600:.2f} |")  # fmt: skip
    total = sum(b["seconds"] for b in benches)
    lines.append(f"| all | | {total:,.0f} | {total / 3600:.2f} |")
    return "\n".join(lines)


def summary_rows(benches: Sequence[dict]) -> list[Row]:
    """Every row of every benchmark, each naming its problem (older teacher–student rows
    did not), so cells of different problems stay apart in the profiles."""
    rows = []
    for bench in benches:
        for row in bench["rows"]:
            row.problem = row.problem or family(bench["config"])
            row.instance = row.instance or {"benchmark": bench["name"]}
            rows.append(row)
    return rows


def write_summary(dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Path]:
    """out/summary.md (the three tables) and out/profiles.png (every cell of every
    benchmark) from the benchmark directories `dirs`; returns the paths written."""
    benches = [load_benchmark(d) for d in dirs]
    if len({b["name"] for b in benches}) < len(benches):
        raise UserError("two benchmark directories share a name; the tables name them by it")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(
        [
            "# Summary across benchmarks",
            "## Settings",
            settings_table(benches),
            "## Declared comparisons per cell (A − B of failure rates, verdict)",
            cells_table(benches),
            "## Verdicts per family",
            verdict_table(benches),
            "## Wall time",
            wall_table(benches),
        ]
    )
    paths = {"summary": out / "summary.md"}
    atomic_write(paths["summary"], text + "\n")
    if plot_profiles(summary_rows(benches), out / "profiles.png"):
        paths["profiles"] = out / "profiles.png"
    return paths
