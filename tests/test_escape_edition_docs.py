"""docs/escape.md's third edition says only what the committed benchmarks give.

The section "## The third edition" quotes `qmse escape summary`'s tables of the directories
its summary command names (docs/escape-3/...): each table is rebuilt here from those
directories and must be in the text as written, and docs/escape-3/summary/summary.md must be
what the command writes now. Every statement of its verdicts is derived here from the
declared comparisons of results.json; the reproductions from the rows. Then the guard: with
the quoted snippets taken out, no number may be left in the section but the few tokens of
WHITELIST (sizes, the protocol's constants). The sections on the three-output teacher–student
set, the batch and budget variants and the second edition are checked the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import Doc

from qmse.escape.summary import (
    VERDICTS,
    cells_table,
    family,
    load_benchmark,
    settings_table,
    verdict_counts,
    verdict_kind,
    verdict_table,
    wall_table,
    write_summary,
)

ROOT = Path(__file__).resolve().parent.parent
E3 = ROOT / "docs" / "escape-3"
DOC = "docs/escape.md"
START, END = "## The third edition", "## The teacher–student problem"


def summary_dirs(start: str = START, end: str = END) -> list[str]:
    """The benchmark directories the summary command of a section names, in its order."""
    text = (ROOT / DOC).read_text()
    section = text[text.index(start) : text.index(end)]
    (names,) = re.findall(r"qmse escape summary docs/escape-3/\{([^}]*)\}", section)
    return names.split(",")


VARIANTS = ("## Batch size and budget", "## The second edition")


@pytest.fixture(scope="module")
def benches() -> list[dict]:
    return [load_benchmark(E3 / name) for name in summary_dirs()]


def test_the_committed_summary_is_what_the_command_writes_now(benches, tmp_path):
    write_summary([E3 / name for name in summary_dirs()], tmp_path)
    assert (tmp_path / "summary.md").read_text() == (E3 / "summary" / "summary.md").read_text()
    assert (E3 / "summary" / "profiles.png").stat().st_size > 0


def test_the_third_edition_section_is_the_committed_benchmarks(benches):
    doc = Doc(DOC, [(START, END)])
    for table in (settings_table, cells_table, verdict_table, wall_table):
        doc.quote(*table(benches).splitlines())
    report = json.loads((C3 / "minima" / "k6_n8_C3.json").read_text())
    found = every_trial()
    best = {n: min(t["failures"] for t in found[n]["trials"]) for n in found}
    doc.quote(
        f"hold {report['distinct']} distinct certified strict minima",
        f"fail on {best['qmse-momentum']} and {best['momentum']} of {report['count']})",
    )
    ms = config_of(MS)["problem_args"]["delta"]
    (ms_minima,) = (json.loads(p.read_text())["distinct"] for p in (MS / "minima").glob("*"))
    assert ms_minima == 1
    doc.quote(f"(δ = {ms}, one distinct strict minimum)", f"(matrix sensing at δ = {ms},")
    ts_verdict(doc, benches)
    inventory(doc)
    second_draw(doc)
    divergence(doc, nc_verdict(doc))
    across(doc, benches)
    budget_batch(doc)
    beta_space(doc)
    reproductions(doc)
    bm = comparisons_of(BM)
    largest = max(abs(t["failures"][0] - t["failures"][1]) for (p, _), t in bm.items() if p == RI)
    doc.quote(f"each by at most {largest} starts in {num(rows_of(BM)[RI, 'sgd']['seeds'])}")
    not_run = [r"k = 14 for gd-population", r"p = 25",  # the plan, not results
               r"the 30,000-step budget outside", r"batch 256 at the matrix"]  # fmt: skip
    doc.check(WHITELIST + not_run)


WHITELIST = [
    r"\bk = \d+(?:, \d+)*(?: and \d+)?\b",  # sizes
    r"\bn = k(?: \+ \d)?\b",
    r"\bn = \d+\b",
    r"\bδ = 1/2\b",
    r"R³",
    r"±0\.05",  # the declared margin
    r"90 %",
    r"2-core",
    r"\(NeurIPS 20\d\d\)|\(ICML 20\d\d\)|NeurIPS 20\d\d|ICML 20\d\d",  # citations
    r"escape-3\b",
    r"\bk8-random\b",  # a benchmark's name
]


def counts(benches) -> dict:
    return verdict_counts(benches)


# ---------------------------------------------------------------- three outputs

C3 = E3 / "k6-n8-c3"
SM, RI = "spurious-minima", "random-init"


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def rows_of(folder: Path) -> dict[tuple[str, str], dict]:
    results = json.loads((folder / "results.json").read_text())
    return {(r["protocol"], r["method"]): r for r in results["rows"]}


def comparisons_of(folder: Path) -> dict[tuple[str, str], dict]:
    results = json.loads((folder / "results.json").read_text())
    return {(t["protocol"], t["comparison"]): t for t in results["comparisons"]}


def rate(r: dict) -> str:
    return f"{r['failures']} of {num(r['seeds'])} = {r['failure_rate']:.3f}"


def wilson(r: dict) -> str:
    return f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"


def diff(t: dict) -> str:
    """A − B with its 95 % interval, typographic minus."""
    return f"{sign(t['difference'])} [{sign(t['ci95_low'])}, {sign(t['ci95_high'])}]"


def sign(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def sci(x: float) -> str:
    """4.5·10⁻⁴."""
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}·10{str(int(exp)).translate(str.maketrans('-0123456789', '⁻⁰¹²³⁴⁵⁶⁷⁸⁹'))}"


def num(x: float) -> str:
    return f"{round(x):,}"


def c3_minima(doc: Doc) -> None:
    report = json.loads((C3 / "minima" / "k6_n8_C3.json").read_text())
    rows, tests = rows_of(C3), comparisons_of(C3)
    tune = rows[SM, "sgd"]["tuning"]
    assert report["isolated"] and not report["excluded"] and report["count"] == report["stuck"]
    per = report["distinct_per_teacher"]
    doc.quote(
        f"{report['count']} starts at {report['distinct']} distinct certified strict minima "
        f"({', '.join(map(str, per[:-1]))} and {per[-1]} per teacher; losses "
        f"{min(report['distinct_losses']):.4f} to {max(report['distinct_losses']):.3f}, smallest "
        f"Hessian eigenvalue {sci(min(report['min_hessian_eigenvalues']))})",
        f"the sweeps ran on {tune['tune_starts']} minima of the teachers' tuning pools "
        f"({tune['tune_minima']} distinct, none of them an evaluation minimum)",
    )
    assert tune["disjoint_minima"]
    sample = {m: r for (p, m), r in rows.items() if p == SM}
    order = sorted(sample.values(), key=lambda r: r["failures"])
    best = order[:3]
    assert [r["method"] for r in best] == ["restart", "homotopy", "pgd"]
    edge = [r["method"] for r in sample.values() if r["tuning"]["edge"]]
    assert edge == ["pgd"]
    radius = sample["pgd"]["hyper"]["radius"]
    rest = order[3:]
    doc.quote(
        f"restart (a fresh start for half the budget) fails on {rate(best[0])} {wilson(best[0])}",
        f"homotopy (a smoothed landscape) on {best[1]['failures']} = "
        f"{best[1]['failure_rate']:.3f} {wilson(best[1])}",
        f"PGD (kicks of up to {radius:.2f}‖W‖_F, a radius chosen on the top edge of its search, "
        f"†) on {best[2]['failures']} = {best[2]['failure_rate']:.3f} {wilson(best[2])}",
        f"every other method fails on at least {min(r['failure_rate'] for r in rest):.3f} of them",
    )
    allfail = sorted(m for m, r in sample.items() if r["failures"] == r["seeds"])
    assert {"qmse", "expected-qmse"} <= set(allfail)
    doc.quote(f"QMSE and expected-QMSE fail on all {num(sample['qmse']['seeds'])}")
    d = {c: tests[SM, c] for c in ("qmse:sgd", "qmse:label-noise", "qmse-momentum:momentum",
                                   "qmse-momentum:label-noise-momentum", "qmse:expected-qmse",
                                   "qmse-momentum:expected-qmse-momentum")}  # fmt: skip
    assert d["qmse:sgd"]["verdict"] == "qmse fails more" == d["qmse:label-noise"]["verdict"]
    nd = (d["qmse-momentum:momentum"], d["qmse-momentum:label-noise-momentum"])
    assert all(t["verdict"] == "not determined" for t in nd)
    assert nd[0]["difference"] == nd[1]["difference"] and nd[0]["p_holm"] == nd[1]["p_holm"]
    assert d["qmse:expected-qmse"]["equivalent"] and d["qmse-momentum:expected-qmse-momentum"][
        "verdict"
    ].startswith("equivalent")
    doc.quote(
        f"QMSE fails more often than SGD ({diff(d['qmse:sgd'])}) and than label noise "
        f"({diff(d['qmse:label-noise'])})",
        f"not determined ({sign(nd[0]['difference'])}, Holm p {nd[0]['p_holm']:.2g} both)",
    )
    escaped = set()
    for r in sample.values():
        escaped |= {i for i, (s, f) in enumerate(zip(r["minima"], r["minima_failures"])) if f < s}
    never = [i for i in range(report["distinct"]) if i not in escaped]
    starts_never = sum(report["starts_per_minimum"][i] for i in never)
    doc.quote(
        f"{len(escaped)} of the {report['distinct']} distinct minima are left by some method",
        f"{len(never)} ({starts_never} starts) by none",
    )


QMSE_FAMILY = ("qmse", "qmse-momentum", "expected-qmse", "expected-qmse-momentum")


def c3_random(doc: Doc) -> None:
    rows, tests = rows_of(C3), comparisons_of(C3)
    sample = {m: r for (p, m), r in rows.items() if p == RI and m != "gd-population"}
    gd = rows[RI, "gd-population"]
    far = ("restart", "pgd")
    others = [r["failure_rate"] for m, r in sample.items() if m not in far + QMSE_FAMILY]
    assert max(sample[m]["failure_rate"] for m in far) < min(others)
    assert min(sample[m]["failure_rate"] for m in QMSE_FAMILY) > max(others)
    q, qm = sample["qmse"], sample["qmse-momentum"]
    doc.quote(
        f"({num(q['seeds'])}, {num(q['seeds'] // 4)} per teacher)",
        f"gradient descent fails on {rate(gd)}",
        f"SGD on {sample['sgd']['failure_rate']:.3f}",
        f"{min(others):.3f}–{max(others):.3f}",
        f"restart and PGD on {sample['restart']['failure_rate']:.3f} and "
        f"{sample['pgd']['failure_rate']:.3f}",
        f"QMSE on {q['failure_rate']:.3f} ({q['diverged']} diverged)",
        f"QMSE with momentum on {qm['failure_rate']:.3f} ({qm['diverged']} diverged)",
    )
    more = ("qmse:sgd", "qmse:label-noise", "qmse-momentum:momentum",
            "qmse-momentum:label-noise-momentum")  # fmt: skip
    assert all(tests[RI, c]["verdict"].endswith("fails more") for c in more)
    assert tests[RI, "qmse:expected-qmse"]["verdict"].startswith("equivalent")
    less = tests[RI, "qmse-momentum:expected-qmse-momentum"]
    assert less["verdict"] == "qmse-momentum fails less"
    doc.quote(
        f"QMSE fails more often than SGD ({diff(tests[RI, 'qmse:sgd'])}) and than label noise "
        f"({diff(tests[RI, 'qmse:label-noise'])})",
        f"QMSE with momentum more often than momentum ({diff(tests[RI, more[2]])}) and than "
        f"label noise with momentum ({diff(tests[RI, more[3]])})",
        f"less often than expected-QMSE with momentum ({diff(less)})",
    )


# ---------------------------------------------------------------- the commands


CONFIG_KEYS = ("ks", "problem", "problem_args", "outputs", "teachers", "n_extra", "seeds",
               "sample_seeds", "protocols", "steps", "batch", "tune_seeds", "tune_pool",
               "max_gd_steps", "tune_budget")  # fmt: skip


def commands() -> dict[str, list[str]]:
    """--out name -> the `qmse escape` arguments of each command in the section's code block
    (continued lines joined, its shell variables expanded)."""
    text = (ROOT / DOC).read_text()
    section = text[text.index(START) : text.index(END)]
    code = [line.strip() for line in section.split("\n") if line.startswith("    ")]
    shell = dict(re.fullmatch(r'(\w+)="?([^"]*)"?', line).groups()
                 for line in code if re.fullmatch(r"\w+=.*", line))  # fmt: skip
    block = " ".join(line.rstrip("\\") for line in code if line and "=" not in line.split()[0])
    out = {}
    for cmd in block.split("qmse escape ")[1:]:
        words = cmd.split()
        words = " ".join(shell.get(w[1:], w) if w.startswith("$") else w for w in words).split()
        if "summary" in words[:1]:
            continue
        name = Path(words[words.index("--out") + 1]).name
        out[name] = words
    return out


def test_each_benchmark_was_written_by_the_command_the_section_gives(benches):
    from qmse.cli import build_parser

    given = commands()
    variants = [load_benchmark(E3 / name) for name in summary_dirs(*VARIANTS)]
    named = {b["name"]: b for b in [*benches, *variants]}
    assert set(given) == set(named)
    for bench in named.values():
        argv = ["escape", *given[bench["name"]]]
        args = build_parser(argv).parse_args(argv)
        got = {
            "ks": args.teacher_widths, "problem": args.problem, "problem_args": args.problem_args,
            "outputs": args.outputs, "teachers": args.teachers, "n_extra": args.n_extra,
            "seeds": args.population_seeds, "sample_seeds": args.sample_seeds,
            "protocols": args.protocols, "steps": args.steps, "batch": args.batch_size,
            "tune_seeds": args.tune_seeds, "tune_pool": args.tune_pool,
            "max_gd_steps": args.max_gd_steps, "tune_budget": args.tune_budget,
        }  # fmt: skip
        saved = bench["config"]
        for key in CONFIG_KEYS:
            assert got[key] == saved.get(key, got[key]), (bench["name"], key)
        assert set(args.methods) == set(saved["methods"]), bench["name"]


EVERY = ("qmse", "expected-qmse", "sgd", "label-noise", "qmse-momentum",
         "expected-qmse-momentum", "momentum", "label-noise-momentum")  # fmt: skip


def every_trial() -> dict[str, dict]:
    found = {}
    for path in sorted((C3 / "every-trial").glob("*.json")):
        found |= json.loads(path.read_text())["methods"]
    return found


def test_every_trial_reruns_the_chosen_one_exactly():
    """The chosen trial, run again among all of its method's trials, fails on exactly the
    starts its row failed on (same starts, same streams): the count must match."""
    rows, found = rows_of(C3), every_trial()
    assert set(found) == set(EVERY)
    for name, v in found.items():
        (chosen,) = [t for t in v["trials"] if t["settings"] == v["chosen"]]
        assert chosen["failures"] == rows[SM, name]["failures"], name
        assert len(v["trials"]) == 32 and v["starts"] == rows[SM, name]["seeds"]


def c3_every_trial(doc: Doc) -> None:
    rows, found = rows_of(C3), every_trial()
    m = rows[SM, "qmse"]["seeds"]
    head = "| method | chosen trial fails on | best of its trials fails on | trials failing on all"
    lines = [head + " |", "|---|---|---|---|"]
    for name in EVERY:
        v = found[name]
        best = min(t["failures"] for t in v["trials"])
        every = sum(t["failures"] == m for t in v["trials"])
        lines.append(f"| {name} | {rows[SM, name]['failures']} | {best} | {every} of "
                     f"{len(v['trials'])} |")  # fmt: skip
    doc.quote(*lines)
    q = found["qmse"]
    assert all(t["failures"] == m for t in q["trials"])
    assert all(t["tune_failures"] == t["tune_starts"] for t in q["trials"])
    best = {n: min(t["failures"] for t in found[n]["trials"]) for n in EVERY}
    assert best["qmse"] > max(rows[SM, "sgd"]["failures"], best["sgd"], best["label-noise"])
    doc.quote(
        f"every one of QMSE's {len(q['trials'])} trials fails on all {m}",
        f"QMSE with momentum's best trial fails on {best['qmse-momentum']}, momentum's on "
        f"{best['momentum']}",
    )


def c3_config(doc: Doc) -> None:
    cfg = config_of(C3)
    found = every_trial()
    seconds = [v["seconds"] for v in found.values()]
    report = json.loads((C3 / "minima" / "k6_n8_C3.json").read_text())
    doc.quote(
        f"QMSE's own noise on {report['distinct']} distinct minima",
        f"run from the {report['count']} evaluation minima",
        f"(problem seeds {cfg['problem_seed']}–{cfg['problem_seed'] + cfg['teachers'] - 1})",
        f"gradient descent from {cfg['seeds']} Xavier seeds each (a {num(cfg['max_gd_steps'])}"
        f"-step cap",
        f"{num(cfg['steps'])} steps × batch {cfg['batch']}, {cfg['tune_budget']} trials each",
        f"(one thread, {min(seconds):.0f}–{max(seconds):.0f} s a method)",
        f"Each method's {cfg['tune_budget']} trials",
    )


def test_the_three_output_section_is_the_committed_benchmark():
    doc = Doc(DOC, [("## Three outputs", "## Matrix sensing and Burer–Monteiro, every")])
    for check in (c3_config, c3_minima, c3_random, c3_every_trial):
        check(doc)
    doc.check(WHITELIST + [r"\bC = \d\b", r"\bone output\b"])


# ---------------------------------------------------------------- other families, every method

BM = E3 / "burer-monteiro-0.3"


def bm_section(doc: Doc) -> None:
    rows, tests = rows_of(BM), comparisons_of(BM)
    report = json.loads(next((BM / "minima").glob("*.json")).read_text())
    gd = rows[RI, "gd-population"]
    sm = {m: r for (p, m), r in rows.items() if p == SM}
    ri = {m: r for (p, m), r in rows.items() if p == RI and m != "gd-population"}
    worst_sm = max(sm.values(), key=lambda r: r["failures"])
    worst_ri = max(r["failures"] for r in ri.values())
    names_ri = sorted(m for m, r in ri.items() if r["failures"] == worst_ri)
    assert not report["isolated"] and report["count"] == gd["failures"]
    assert all(r["diverged"] == 0 for r in [*sm.values(), *ri.values()])
    doc.quote(
        f"from {gd['failures']} of the {num(gd['seeds'])} perturbed starts",
        f"from those {report['count']} points ({report['distinct']} distinct points of the set) "
        f"at most {worst_sm['failures']} fail ({worst_sm['method']})",
        f"from the perturbed starts at most {worst_ri} of {num(gd['seeds'])} "
        f"({', '.join(names_ri)})",
    )
    assert all(tests[SM, c]["verdict"].startswith("equivalent") for c in COMPARISONS)
    verdicts = {c: tests[RI, c]["verdict"] for c in COMPARISONS}
    assert verdicts == {
        "qmse:sgd": "qmse fails less", "qmse:label-noise": "qmse fails less",
        "qmse-momentum:momentum": "qmse-momentum fails more",
        "qmse-momentum:label-noise-momentum": "qmse-momentum fails more",
        "qmse-momentum:expected-qmse-momentum": "qmse-momentum fails more",
        "qmse:expected-qmse": "equivalent within ±0.05",
    }  # fmt: skip
    t = {c: tests[RI, c] for c in COMPARISONS}
    largest = max(abs(x["failures"][0] - x["failures"][1]) for x in t.values())
    doc.quote(
        f"QMSE fails less often than SGD ({diff(t['qmse:sgd'])}) and than label noise "
        f"({diff(t['qmse:label-noise'])})",
        f"QMSE with momentum more often than momentum ({diff(t['qmse-momentum:momentum'])}), "
        f"than label noise with momentum ({diff(t['qmse-momentum:label-noise-momentum'])}) and "
        f"than expected-QMSE with momentum ({diff(t['qmse-momentum:expected-qmse-momentum'])})",
        f"at most {largest} starts in {num(gd['seeds'])}",
    )


COMPARISONS = ("qmse:sgd", "qmse-momentum:momentum", "qmse:expected-qmse",
               "qmse-momentum:expected-qmse-momentum", "qmse:label-noise",
               "qmse-momentum:label-noise-momentum")  # fmt: skip


# ---------------------------------------------------------------- the verdicts


def per_family(benches, family: str, comparison: str) -> dict[str, int]:
    """Verdict kind -> cells, over both protocols, for one family and comparison."""
    total: dict[str, int] = {}
    for (fam, _, c), counted in verdict_counts(benches).items():
        if (fam, c) == (family, comparison):
            for kind, n in counted.items():
                total[kind] = total.get(kind, 0) + n
    return total


def ts_verdict(doc: Doc, benches) -> None:
    fam = "teacher-student"
    v = {c: per_family(benches, fam, c) for c in COMPARISONS}
    n = sum(v["qmse:sgd"].values())
    s, m = v["qmse:sgd"], v["qmse-momentum:momentum"]
    assert s == v["qmse:label-noise"] and set(s) == {"fails more", "equivalent"}
    assert m == v["qmse-momentum:label-noise-momentum"]
    assert set(m) == {"fails more", "equivalent", "not determined"}

    def where(comparison: str, verdict: str) -> list[tuple[str, str]]:
        return [(b["name"], t["protocol"]) for b in benches for t in b["comparisons"]
                if family(b["config"]) == fam and t["comparison"] == comparison
                and verdict_kind(t) == verdict]  # fmt: skip

    k12 = rows_of(E3 / "k12")
    assert where("qmse:sgd", "equivalent") == [("k12", SM)]
    assert where("qmse-momentum:momentum", "equivalent") == [("k12", SM)]
    assert k12[SM, "qmse"]["failures"] == k12[SM, "sgd"]["failures"] == k12[SM, "sgd"]["seeds"]
    assert where("qmse-momentum:momentum", "not determined") == [("k6-n8-c3", SM)]
    e, em = v["qmse:expected-qmse"], v["qmse-momentum:expected-qmse-momentum"]
    wide = rows_of(E3 / "k8-n9")
    assert config_of(E3 / "k8-n9")["n_extra"] == 1
    assert all(r["seeds"] == 0 for (p, _), r in wide.items() if p == SM)  # no minima cell
    gd, sgd, q = wide[RI, "gd-population"], wide[RI, "sgd"], wide[RI, "qmse"]
    doc.quote(
        f"stops at a spurious minimum on {'none' if gd['failures'] == 0 else gd['failures']} "
        f"of {num(gd['seeds'])} seeds and SGD fails on {sgd['failures']}, but QMSE fails on "
        f"{q['failures']} ({q['diverged']} of them diverged)"
    )

    def spread(c: dict) -> str:
        words = {"fails more": "worse in", "fails less": "better in", "equivalent":
                 "equivalent in", "not determined": "not determined in"}  # fmt: skip
        return ", ".join(f"{words[k]} {c[k]}" for k in VERDICTS if c.get(k))

    tune = k12[SM, "sgd"]["tuning"]
    assert tune["disjoint_minima"] and tune["tune_minima"] < tune["eval_minima"]
    best = {}
    for method in ("sgd", "qmse"):
        record = json.loads((E3 / "k12" / "tuning" / f"{SM}_{method}_k12_n12_C1.json").read_text())
        assert record["starts"] == tune["tune_starts"] == k12[SM, method]["tuning"]["tune_starts"]
        best[method] = min(p["failures"] for p in record["points"])
    doc.quote(
        f"the sweeps ran on the {tune['tune_starts']} starts at its {tune['tune_minima']} other "
        f"distinct minima (the best trial of SGD fails on {best['sgd']} of them, of QMSE on "
        f"{best['qmse']}), a small tuning set for {len(record['points'])} trials",
        f"at k = 6 over four teachers: {n} cells",
        f"QMSE fails more often than SGD and than label noise in {s['fails more']}, equivalent "
        f"in {s['equivalent']} (the k = 12 minima, which neither leaves from any start)",
        f"in {m['fails more']}, equivalent in {m['equivalent']} (the k = 12 minima), not "
        f"determined in {m['not determined']} (the three-output minima",
        f"against expected-QMSE: {spread(e)}; with momentum: {spread(em)}",
    )


def minima_report(name: str) -> dict:
    (path,) = (E3 / name / "minima").glob("*.json")
    return json.loads(path.read_text())


def inventory(doc: Doc) -> None:
    """The k = 14 gradient-descent piece and the count of distinct minima over every
    teacher–student piece (their minima reports; n = 9 has none)."""
    gd = rows_of(E3 / "k14-gd")[RI, "gd-population"]
    k14 = minima_report("k14-gd")
    assert k14["count"] == gd["failures"] and k14["isolated"] and not k14["excluded"]
    one = {k: minima_report(f"k{k}")["distinct"] for k in (8, 10, 12)} | {14: k14["distinct"]}
    three, wide = minima_report("k6-n8-c3")["distinct"], minima_report("k8-n9")["distinct"]
    assert wide == 0
    rotated = minima_report("k8-random")["distinct"]
    doc.quote(
        f"and the random teacher's {rotated}",
        f"{gd['failures']} of {num(gd['seeds'])} seeds stop at a spurious minimum, at "
        f"{k14['distinct']} distinct certified strict minima",
        f"hold {three + sum(one.values())} distinct certified minima ({three} with three "
        f"outputs, and {', '.join(str(one[k]) for k in (8, 10, 12))} and {one[14]} at",
    )


def second_draw(doc: Doc) -> None:
    """k8-random against k8: the same problem rotated, so other seeds of one problem."""
    cfg = config_of(E3 / "k8-random")
    assert cfg["teacher"] == "random" and config_of(E3 / "k8")["teacher"] == "identity"
    a, b = comparisons_of(E3 / "k8"), comparisons_of(E3 / "k8-random")
    assert set(a) == set(b)
    differ = sorted(c for c in a if verdict_kind(a[c]) != verdict_kind(b[c]))
    assert differ == [(RI, "qmse:expected-qmse"), (SM, "qmse:expected-qmse")]
    ri, sm = differ
    assert [verdict_kind(a[ri]), verdict_kind(b[ri])] == ["fails more", "equivalent"]
    assert [verdict_kind(a[sm]), verdict_kind(b[sm])] == ["not determined", "equivalent"]
    ra, rb = rows_of(E3 / "k8"), rows_of(E3 / "k8-random")
    ma, mb = ra[RI, "momentum"], rb[RI, "momentum"]
    gap = "one_minus_beta"
    doc.quote(
        f"gradient descent stops on {rb[RI, 'gd-population']['failures']} of "
        f"{num(rb[RI, 'gd-population']['seeds'])} there, {ra[RI, 'gd-population']['failures']} "
        "with V = I",
        f"Of the {len(a)} declared verdicts {len(a) - len(differ)} are the same",
        f'"fails more" ({sign(a[ri]["difference"]).replace("−", "-")}) from random starts',
        f"Momentum's own failures from random starts move from {ma['failures']} to "
        f"{mb['failures']} of {num(ma['seeds'])}",
        f"(lr {ma['lr']:.4f}, 1 − β {ma['hyper'][gap]:.4f} against lr {mb['lr']:.4f}, 1 − β "
        f"{mb['hyper'][gap]:.4f})",
        f"the setting its {cfg['tune_budget']} trials chose",
    )


def reproductions(doc: Doc) -> None:
    """The table of published numbers: gd-population's rows at k = 8, 10 (Safran & Shamir),
    SGD's on Zhang et al.'s instance, gd-population's at O'Carroll et al.'s t = 0.30."""
    from qmse.escape.burer_monteiro import PUBLISHED as BM_PUBLISHED
    from qmse.escape.burer_monteiro import TRIALS
    from qmse.escape.matrix_sensing import PUBLISHED_FAILURE

    def here(r: dict) -> str:
        return f"{r['failure_rate']:.3f} {wilson(r)}"

    def inside(r: dict, published: float) -> str:
        return "yes" if r["ci95_low"] <= published <= r["ci95_high"] else "no"

    lines = [
        "| source | what fails | published | here [Wilson 95 %] | inside |",
        "|---|---|---|---|---|",
    ]
    for k in (8, 10, 12):
        r = rows_of(E3 / f"k{k}")[RI, "gd-population"]
        rate = r["published_rate"]
        lines.append(f"| Safran & Shamir (2018), Table 1 | gradient descent, k = {k} | "
                     f"{rate} | {here(r)} | {inside(r, rate)} |")  # fmt: skip
    r = rows_of(E3 / "matrix-sensing" / "published")[RI, "sgd"]
    lines.append(f"| Zhang et al. (2018), abstract | SGD at δ = 1/2 | {PUBLISHED_FAILURE} | "
                 f"{here(r)} | {inside(r, PUBLISHED_FAILURE)} |")  # fmt: skip
    r = rows_of(E3 / "burer-monteiro" / "perturbation-0.3")[RI, "gd-population"]
    theirs = BM_PUBLISHED[2][0] / TRIALS[2]
    lines.append(f"| O'Carroll et al. (2022), summary.txt | trust regions (here gradient "
                 f"descent), p = 2, t = 0.30 | {theirs:.3f} | {here(r)} | "
                 f"{inside(r, theirs)} |")  # fmt: skip
    doc.quote(*lines)


def test_the_k8_k10_section_has_no_number_its_files_do_not_give():
    """Its statements are checked in tests/test_docs.py; here its numbers."""
    cfg = config_of(E3 / "k8")
    assert cfg == {**cfg, **config_of(E3 / "k10"), "ks": cfg["ks"]}
    doc = Doc(DOC, [("## The third protocol at k = 8 and 10", "## Three outputs")])
    budget = cfg["tune_budget"]
    doc.quote(
        f"({num(cfg['steps'])} steps, batch {cfg['batch']})",
        f"the same budget of {budget} trials",
        f"among its {budget} trials",
        f"exactly its {budget} trials",
    )
    doc.check(WHITELIST + [r"\bsix\b"])


NC = E3 / "negative-control-v2"


def nc_verdict(doc: Doc) -> tuple[int, int]:
    results = json.loads((NC / "results.json").read_text())
    by = {(t["comparison"], t["n"]): t["verdict"] for t in results["comparisons"]}
    ns = sorted({n for _, n in by})
    for c in ("qmse:sgd", "qmse:label-noise"):
        assert [by[c, n] for n in ns] == ["equivalent within ±0.05", "qmse fails more",
                                          "qmse fails more"]  # fmt: skip
    others = [c for c in COMPARISONS if c not in ("qmse:sgd", "qmse:label-noise")]
    assert all(by[c, n].startswith("equivalent") for c in others for n in ns)
    fails = [r for r in results["rows"] if r["method"] == "qmse"]  # one row per n
    failures, diverged = sum(r["failures"] for r in fails), sum(r["diverged"] for r in fails)
    assert 2 * diverged > failures  # most of them divergence
    doc.quote(f"at n = {ns[1]} and {ns[2]}", f"at n = {ns[0]}")
    return failures, diverged


def divergence(doc: Doc, nc: tuple[int, int]) -> None:
    rows = {n: rows_of(E3 / n) for n in ("k8", "k10", "k6-n8-c3", "burer-monteiro-0.3")}
    k8, c3 = rows["k8"][RI, "qmse"], rows["k6-n8-c3"][RI, "qmse"]
    assert all(r["diverged"] == 0 for r in rows["burer-monteiro-0.3"].values())
    doc.quote(
        f"teacher–student ({k8['diverged']} of {num(k8['seeds'])} at k = 8, "
        f"{c3['diverged']} of {num(c3['seeds'])} with three outputs)",
        f"matrix sensing below δ = 1/2 ({nc[1]} of its {nc[0]} failures)",
    )


def beta_space(doc: Doc) -> None:
    from qmse.escape.methods import get_method

    (param,) = [p for p in get_method("momentum").space().params if p.name == "one_minus_beta"]
    doc.quote(f"1 − β from {param.grid[0]:g} to {param.grid[-1]:g}")


# ---------------------------------------------------------------- batch and budget at k = 10

BATCHES = {8: "k10-batch8", 64: "k10", 256: "k10-batch256"}


def variants(doc: Doc) -> None:
    sm = {b: {m: r for (p, m), r in rows_of(E3 / name).items() if p == SM}
          for b, name in BATCHES.items()}  # fmt: skip
    tests = {b: comparisons_of(E3 / name) for b, name in BATCHES.items()}
    seeds = {r["seeds"] for rows in sm.values() for r in rows.values()}
    (m,) = seeds
    assert all(rows["qmse"]["failures"] == m for rows in sm.values())

    def three(method: str) -> str:
        return ", ".join(str(sm[b][method]["failures"]) for b in BATCHES)

    verdict = {b: tests[b][SM, "qmse:sgd"]["verdict"] for b in BATCHES}
    assert verdict == {8: "qmse fails more", 64: "qmse fails more",
                       256: "equivalent within ±0.05"}  # fmt: skip
    assert tests[256][SM, "qmse:label-noise"]["verdict"].startswith("equivalent")
    assert all(tests[b][SM, "qmse-momentum:momentum"]["verdict"] == "qmse-momentum fails more"
               for b in BATCHES)  # fmt: skip
    assert sm[256]["sgd"]["failures"] == sm[256]["label-noise"]["failures"] == m
    more = [b for b in BATCHES if verdict[b] == "qmse fails more"]
    doc.quote(
        f'"fails more" at batch {more[0]} and {more[1]} to "equivalent" at {max(BATCHES)}',
        f"QMSE fails on all {m} starts at batch 8, 64 and 256",
        f"SGD fails on {three('sgd')} of them (label noise: {three('label-noise')})",
        f"momentum escapes at every batch (it fails on {three('momentum')})",
    )


def test_the_batch_and_budget_section_is_the_committed_benchmarks(tmp_path):
    dirs = [E3 / name for name in summary_dirs(*VARIANTS)]
    write_summary(dirs, tmp_path)
    committed = E3 / "summary-variants" / "summary.md"
    assert (tmp_path / "summary.md").read_text() == committed.read_text()
    benches = [load_benchmark(d) for d in dirs]
    doc = Doc(DOC, [VARIANTS])
    doc.quote(*cells_table(benches).splitlines())
    cfg = config_of(E3 / "k10")
    report = json.loads((E3 / "k10" / "minima" / "k10_n10_C1.json").read_text())
    doc.quote(
        f"({report['count']} starts at {report['distinct']} distinct minima)",
        f"({cfg['tune_budget']} trials on {cfg['tune_seeds']} tuning minima)",
        f"batch 8 and 256 at {num(cfg['steps'])} steps",
        f"steps at batch {cfg['batch']}",
    )
    variants(doc)
    steps_variant(doc)
    other_batches(doc)
    batch256_every_trial(doc)
    doc.check(WHITELIST + [r"\bbatch (?:8|64|256)(?:, 64)?(?: and 256)?\b", r"\bone output\b"])


def test_the_benchmarks_page_gives_the_wall_times_of_the_pieces(benches):
    doc = Doc("docs/benchmarks.md", [("## The escape benchmark, third edition", None)])
    doc.quote(*wall_table(benches).splitlines())
    variants = [load_benchmark(E3 / name) for name in summary_dirs(*VARIANTS)]
    doc.quote(*wall_table(variants).splitlines())
    doc.check(WHITELIST + [r"x86_64", r"torch \d+\.\d+\.\d+\+cpu", r"two to four"])


def batch256_every_trial(doc: Doc) -> None:
    """Every trial of the tie-broken methods at batch 256, from the k = 10 minima."""
    big = E3 / "k10-batch256"
    rows = rows_of(big)
    (path,) = (big / "every-trial").glob("*.json")
    found = json.loads(path.read_text())["methods"]
    assert sorted(found) == ["label-noise", "qmse", "sgd"]
    m = {rows[SM, name]["seeds"] for name in found}.pop()
    for name, v in found.items():
        assert all(t["tune_failures"] == t["tune_starts"] for t in v["trials"]), name
        assert all(t["failures"] == m for t in v["trials"]), name
        (chosen,) = [t for t in v["trials"] if t["settings"] == v["chosen"]]
        assert chosen["failures"] == rows[SM, name]["failures"]
    (tune,) = {t["tune_starts"] for v in found.values() for t in v["trials"]}
    (trials,) = {len(v["trials"]) for v in found.values()}
    doc.quote(
        f"At batch {config_of(big)['batch']} SGD, label noise and "
        f"QMSE each failed on all {tune} tuning minima at every one of their {trials} trials",
        f"from the {m} starts",
        f"each fails on all {m} at every trial",
    )


def other_batches(doc: Doc) -> None:
    """Batch 8 on the matrix-sensing minimum and Burer–Monteiro's stuck set, against batch 64."""
    small = E3 / "matrix-sensing-0.7-batch8"
    cfg, base = (config_of(d) for d in (small, MS))
    assert cfg["problem_args"] == base["problem_args"] and cfg["tune_seeds"] == base["tune_seeds"]
    assert cfg["batch"] == 8 and base["batch"] == 64
    a = {m: r for (p, m), r in rows_of(small).items() if p == SM}
    b = {m: r for (p, m), r in rows_of(MS).items() if p == SM}
    ta, tb = comparisons_of(small), comparisons_of(MS)
    changed = [c for c in COMPARISONS if verdict_kind(ta[SM, c]) != verdict_kind(tb[SM, c])]
    assert changed == ["qmse-momentum:momentum", "qmse-momentum:expected-qmse-momentum"]
    assert all(verdict_kind(ta[SM, c]) == "equivalent" for c in changed)
    c = changed[1]
    assert verdict_kind(tb[SM, changed[0]]) == "not determined"
    assert verdict_kind(tb[SM, c]) == "fails less"
    m = a["sgd"]["seeds"]
    allfail = ("sgd", "qmse", "expected-qmse", "label-noise")
    assert all(a[x]["failures"] == b[x]["failures"] == m for x in allfail)
    mom = ("momentum", "qmse-momentum", "expected-qmse-momentum", "label-noise-momentum")
    assert max(a[x]["failures"] for x in mom) <= 2 and b["expected-qmse-momentum"]["failures"] == m
    bm = {m: r for (p, m), r in rows_of(E3 / "burer-monteiro-0.3-batch8").items() if p == SM}
    big = E3 / "burer-monteiro-0.3-batch256"
    bm256 = {m: r for (p, m), r in rows_of(big).items() if p == SM}
    assert config_of(big)["batch"] == 256
    runs = [comparisons_of(d) for d in (BM, E3 / "burer-monteiro-0.3-batch8", big)]
    assert all(verdict_kind(t[SM, c]) == "equivalent" for t in runs for c in COMPARISONS)
    doc.quote(
        f"minima of matrix sensing at δ = {cfg['problem_args']['delta']} and of Burer–Monteiro, "
        f"and at batch 256 on Burer–Monteiro's (tuned as their main runs, {cfg['tune_seeds']} "
        "tuning starts)",
        f"At the matrix-sensing minimum ({m} starts, δ = {cfg['problem_args']['delta']}) batch "
        f"{cfg['batch']} changes {len(changed)} verdicts of {len(COMPARISONS)}",
        f"fail on every start at batch {cfg['batch']} as at {base['batch']}",
        f"momentum fails on {a['momentum']['failures']} ({b['momentum']['failures']} at batch "
        f"{base['batch']}), QMSE with momentum on {a['qmse-momentum']['failures']} "
        f"({b['qmse-momentum']['failures']}), expected-QMSE with momentum on "
        f"{a['expected-qmse-momentum']['failures']} (all {m} at batch {base['batch']})",
        f'({sign(tb[SM, c]["difference"])} at batch {base["batch"]}) is "equivalent" at batch '
        f"{cfg['batch']}",
        f'helps with momentum at the δ = {cfg["problem_args"]["delta"]} minimum"',
        f"all but at most {max(r['failures'] for r in bm.values())} of the "
        f"{bm['sgd']['seeds']} starts at batch {cfg['batch']}, as at {base['batch']}, and all "
        f"but at most {max(r['failures'] for r in bm256.values())} at batch 256",
    )


def steps_variant(doc: Doc) -> None:
    long = E3 / "k10-steps30000"
    cfg = config_of(long)
    sm = {m: r for (p, m), r in rows_of(long).items() if p == SM}
    tests = comparisons_of(long)
    q, sgd, mom = sm["qmse"], sm["sgd"], sm["momentum"]
    assert sgd["failures"] == sgd["diverged"]
    more = ("qmse:sgd", "qmse:label-noise", "qmse-momentum:momentum",
            "qmse-momentum:label-noise-momentum")  # fmt: skip
    assert all(tests[SM, c]["verdict"].endswith("fails more") for c in more)
    assert all(tests[SM, c]["verdict"].startswith("equivalent")
               for c in ("qmse:expected-qmse", "qmse-momentum:expected-qmse-momentum"))  # fmt: skip
    doc.quote(
        f"At {num(cfg['steps'])} steps (batch {cfg['batch']}) QMSE escapes "
        f"{q['seeds'] - q['failures']} of the {q['seeds']} (it fails on {q['failures']}, "
        f"{q['diverged']} diverged), SGD fails on {sgd['failures']} (every failure a divergence), "
        f"momentum on {mom['failures']}",
        f"and {num(cfg['steps'])} steps at batch {cfg['batch']}",
    )
    short = comparisons_of(E3 / "k10")
    changed = [c for c in COMPARISONS if short[SM, c]["verdict"] != tests[SM, c]["verdict"]]
    assert changed == ["qmse-momentum:expected-qmse-momentum"]
    assert short[SM, changed[0]]["verdict"] == "not determined"
    base = config_of(E3 / "k10")["steps"]
    assert cfg["steps"] == 10 * base
    doc.quote(
        f"Of the {len(COMPARISONS)} verdicts, ten times the budget changes one",
        f"as at {num(base)} steps",
        f"not determined at {num(base)} steps",
    )


def budget_batch(doc: Doc) -> None:
    """The edition's bullet on budget and batch, from the k = 10 variants."""
    base = config_of(E3 / "k10")
    long = E3 / "k10-steps30000"
    steps = config_of(long)["steps"]
    q = rows_of(long)[SM, "qmse"]
    runs = {**{b: E3 / n for b, n in BATCHES.items()}, "long": long}
    for run in runs.values():
        t = comparisons_of(run)
        assert t[SM, "qmse-momentum:momentum"]["verdict"] == "qmse-momentum fails more"
    doc.quote(
        f"every cell above ran {num(base['steps'])} steps at batch {base['batch']}",
        f"QMSE escapes none at batch 8, 64 and 256, and {q['seeds'] - q['failures']} of "
        f"{q['seeds']} at {num(steps)} steps",
        f'"fails more" at batch 8 and 64 and at {num(steps)} steps, "equivalent" at batch 256',
    )
    # the matrix-sensing minimum and Burer–Monteiro's stuck set at batch 8 (other_batches)
    small, big = (config_of(d)["batch"]
                  for d in (E3 / "matrix-sensing-0.7-batch8", MS))  # fmt: skip
    ta, tb = comparisons_of(E3 / "matrix-sensing-0.7-batch8"), comparisons_of(MS)
    mom = [c for c in COMPARISONS if c.startswith("qmse-momentum")]
    changed = [c for c in mom if verdict_kind(tb[SM, c]) != verdict_kind(ta[SM, c])]
    assert changed == ["qmse-momentum:momentum", "qmse-momentum:expected-qmse-momentum"]
    assert all(verdict_kind(ta[SM, c]) == "equivalent" for c in changed)
    assert rows_of(MS)[SM, "expected-qmse-momentum"]["failures"] == rows_of(MS)[SM, "sgd"]["seeds"]
    for name in ("burer-monteiro-0.3-batch8", "burer-monteiro-0.3-batch256"):
        other = comparisons_of(E3 / name)
        assert all(verdict_kind(other[k]) == verdict_kind(comparisons_of(BM)[k]) for k in other)
    doc.quote(
        f"(below) batch {small} makes {'two' if len(changed) == 2 else len(changed)} momentum",
        f"(not determined at batch {big})",
        f'("fails less" at batch {big}, where',
        f"there holds at batch {big} only",
        f"stuck set batch {small} and 256 change",
        f"(at batch {big}; at batch {small} both are equivalent, below)",
    )


MS = E3 / "matrix-sensing-0.7"
MOMENTUM = ("momentum", "qmse-momentum", "expected-qmse-momentum", "label-noise-momentum",
            "gradient-noise-momentum", "anticorrelated-momentum")  # fmt: skip


def ms_section(doc: Doc) -> None:
    from qmse.escape.matrix_sensing import DESCENT_LR

    rows, tests = rows_of(MS), comparisons_of(MS)
    report = json.loads(next((MS / "minima").glob("*.json")).read_text())
    cfg = config_of(MS)
    delta, seed = cfg["problem_args"]["delta"], cfg["problem_args"]["seed"]
    gd = rows[RI, "gd-population"]
    (loss,), (eig,) = report["distinct_losses"], report["min_hessian_eigenvalues"]
    assert math.isclose(loss, 1 - delta**2) and math.isclose(eig, 4 * (1 + delta) * (2 * delta - 1))
    assert report["distinct"] == 1 and report["count"] == gd["failures"]
    sm = {m: r for (p, m), r in rows.items() if p == SM}
    m = report["count"]
    stay = sorted(n for n, r in sm.items() if r["failures"] == m)
    assert set(stay) == set(sm) - set(MOMENTUM) - {"pgd", "restart"} | {"expected-qmse-momentum"}
    leave = [sm[n]["failures"] for n in MOMENTUM if n != "expected-qmse-momentum"]
    doc.quote(
        f"(δ = {delta}, n = {cfg['ks'][0]}, seed {seed:g};",
        f"{ {1: 'one'}[report['distinct']] } distinct minimum modulo x ↦ −x",
        f"(at the problem's step {DESCENT_LR:g})",
        f"(loss {loss:.2f} = 1 − δ², smallest Hessian eigenvalue {eig:.2f})",
        f"from {gd['failures']} of {num(gd['seeds'])} starts",
        f"PGD (fails on {sm['pgd']['failures']} of {m}) and restart ({sm['restart']['failures']})",
        f"fail on all {m}",
        f"(fails on {min(leave)}–{max(leave)})",
        f"which fails on all {m}",
    )
    t = {c: tests[SM, c] for c in COMPARISONS}
    for c in ("qmse:sgd", "qmse:label-noise", "qmse:expected-qmse"):
        assert t[c]["failures"] == [m, m] and t[c]["verdict"].startswith("equivalent")
    assert t["qmse-momentum:momentum"]["verdict"] == "not determined"
    assert t["qmse-momentum:label-noise-momentum"]["verdict"].startswith("equivalent")
    assert t["qmse-momentum:expected-qmse-momentum"]["verdict"] == "qmse-momentum fails less"
    doc.quote(
        f"not determined ({diff(t['qmse-momentum:momentum'])})",
        f"fails less often ({diff(t['qmse-momentum:expected-qmse-momentum'])})",
    )
    ri = {mm: r for (p, mm), r in rows.items() if p == RI}
    r = {c: tests[RI, c] for c in COMPARISONS}
    assert r["qmse:sgd"]["verdict"] == r["qmse:label-noise"]["verdict"] == "qmse fails more"
    assert r["qmse:sgd"]["difference"] == r["qmse:label-noise"]["difference"]
    assert r["qmse:expected-qmse"]["verdict"] == "qmse fails less"
    assert r["qmse-momentum:momentum"]["verdict"] == "qmse-momentum fails more"
    doc.quote(
        f"From the {num(gd['seeds'])} random starts: momentum and PGD fail on "
        f"{ri['momentum']['failure_rate']:.3f} and {ri['pgd']['failure_rate']:.3f}, SGD on "
        f"{ri['sgd']['failure_rate']:.3f}, QMSE on {ri['qmse']['failure_rate']:.3f} "
        f"({ri['qmse']['diverged']} diverged)",
        f"QMSE fails more often than SGD and label noise ({diff(r['qmse:sgd'])}) and less often "
        f"than expected-QMSE ({diff(r['qmse:expected-qmse'])})",
        f"QMSE with momentum more often than momentum ({diff(r['qmse-momentum:momentum'])})",
    )


def across(doc: Doc, benches) -> None:
    tests = [t for b in benches for t in b["comparisons"]]
    cells = {(b["name"], t["protocol"], t["k"]) for b in benches for t in b["comparisons"]}
    count = {c: Counter(verdict_kind(t) for t in tests if t["comparison"] == c)
             for c in COMPARISONS}  # fmt: skip
    assert all(sum(v.values()) == len(cells) for v in count.values())
    s, m = count["qmse:sgd"], count["qmse-momentum:momentum"]
    ls, lm = count["qmse:label-noise"], count["qmse-momentum:label-noise-momentum"]
    assert m["fails less"] == lm["fails less"] == 0
    less = [(b["name"], t["protocol"]) for b in benches for t in b["comparisons"]
            if t["comparison"] == "qmse:sgd" and verdict_kind(t) == "fails less"]  # fmt: skip
    assert less == [("burer-monteiro-0.3", RI)]
    minima = [t for t in tests if t["protocol"] == SM and "expected" not in t["comparison"]]
    assert all(verdict_kind(t) != "fails less" for t in minima)
    own = [t for t in tests if "expected" in t["comparison"]]
    helps = sum(verdict_kind(t) == "fails less" for t in own)
    hurts = sum(verdict_kind(t) == "fails more" for t in own)
    doc.quote(
        f"**Across families** ({len(cells)} cells)",
        f"QMSE fails more often than SGD in {s['fails more']}, less often in {s['fails less']}",
        f"equivalent in {s['equivalent']}; QMSE with momentum fails more often than momentum in "
        f"{m['fails more']}, never less often, equivalent in {m['equivalent']}, not determined "
        f"in {m['not determined']}",
        f"QMSE fails more often in {ls['fails more']}, less often in {ls['fails less']}; QMSE "
        f"with momentum more often in {lm['fails more']}, never less often",
        f"From the certified minima ({len({(b, k) for b, p, k in cells if p == SM})} cells)",
        f"QMSE's noise helps in {helps} of the {len(own)} comparisons with expected-QMSE and "
        f"hurts in {hurts}",
    )


def test_the_other_families_section_is_the_committed_benchmarks():
    doc = Doc(DOC, [("## Matrix sensing and Burer–Monteiro, every method", VARIANTS[0])])
    cfg = config_of(MS)
    assert cfg["tune_seeds"] == config_of(BM)["tune_seeds"]
    doc.quote(f"({cfg['tune_budget']} trials", f"on {cfg['tune_seeds']} tuning starts")
    ms_section(doc)
    ms_every_trial(doc)
    bm_section(doc)
    doc.check(WHITELIST + [r"\bp = 2\b", r"perturbation 0\.3"])


def ms_every_trial(doc: Doc) -> None:
    """The methods that failed on every tuning start at every trial (their choice the
    tie-break's): every trial, run from the evaluation minimum, fails on every start too."""
    rows = rows_of(MS)
    for path in sorted((MS / "every-trial").glob("*.json")):
        for name, v in json.loads(path.read_text())["methods"].items():
            m = rows[SM, name]["seeds"]
            assert all(t["failures"] == m for t in v["trials"]), name
            assert all(t["tune_failures"] == t["tune_starts"] for t in v["trials"]), name
            (chosen,) = [t for t in v["trials"] if t["settings"] == v["chosen"]]
            assert chosen["failures"] == rows[SM, name]["failures"]
            doc.quote(f"fails on all {m} at every one of its {len(v['trials'])} trials")
    assert {p.stem for p in (MS / "every-trial").glob("*.json")} == {
        "sgd", "label-noise", "qmse", "expected-qmse", "expected-qmse-momentum"}  # fmt: skip


def test_the_readme_says_what_the_minima_cells_give(benches):
    """README's sentence on the escape benchmark: on the minima, QMSE (with or without
    momentum) never fails less often than the same optimiser on MSE."""
    mse = {"qmse:sgd", "qmse-momentum:momentum"}
    minima = [t for b in benches for t in b["comparisons"]
              if t["protocol"] == SM and t["comparison"] in mse]  # fmt: skip
    assert minima and all(verdict_kind(t) != "fails less" for t in minima)
    assert len({family(b["config"]) for b in benches}) == 3
    text = " ".join((ROOT / "README.md").read_text().split())
    assert (
        "On problems with certified spurious minima in three families (teacher–student, matrix "
        "sensing, Burer–Monteiro), QMSE escapes the minima no more often than the same optimiser "
        "on MSE in any cell"
    ) in text


def test_the_second_edition_paragraph_is_its_files():
    e2 = ROOT / "docs" / "escape-2"
    cfg = config_of(e2)
    long = config_of(e2 / "long")
    doc = Doc(DOC, [("## The second edition", None)])
    ks = cfg["ks"]
    doc.quote(
        f"at k = {', '.join(map(str, ks))}",
        f"budgets of {num(cfg['steps'])} and {num(long['steps'])} steps",
        f"failed more often at {num(cfg['steps'])} steps, and at {num(long['steps'])} its",
    )
    assert cfg.get("tune_budget") is None  # coordinate passes
    doc.check(WHITELIST + [r"factor-2", r"β fixed at 0\.9", r"escape-2/"])


def test_the_tuning_minima_are_the_evaluation_ones_where_the_edition_says_so():
    """Its 'What each conclusion depends on' names the runs whose sweeps had no other
    distinct minimum: their rows record it; the three-output set's were disjoint."""
    for name in ("matrix-sensing-0.7", "k10-batch8", "k10-batch256", "k10-steps30000"):
        tuned = [r["tuning"] for (p, _), r in rows_of(E3 / name).items() if p == SM]
        assert tuned and all(t["disjoint_minima"] is False for t in tuned), name
    assert all(r["tuning"]["disjoint_minima"] for (p, m), r in rows_of(C3).items()
               if p == SM and r["tuning"] and not r["tuning"]["fixed"])  # fmt: skip
    text = " ".join((ROOT / DOC).read_text().split())
    assert "(matrix sensing at δ = 0.7, teacher–student at k = 10)" in text
