"""The results prose says only what the committed files give.

docs/escape-2/edition.md, docs/results.md and README.md quote numbers from committed
outputs: docs/escape-2/** (the escape benchmark), docs/fmnist-end/**, docs/fmnist-300/**,
docs/fmnist-full/**, docs/fmnist-long/** and docs/fmnist-grid/report.md (the CNN grids). For
every quoted number a check below computes it from those files (failure counts and paired
tests from the per-start outcomes in rows/, statistics from `qmse.stats`) and asserts that
its exact text is in the document; a table copied from a committed table.md or report.md
must be rows of that file, and a table built from results.json must be what the check
builds. Then a guard: with every checked snippet taken out, no number may be left in the
checked sections except those on a short list of tokens that are not results (k values,
section numbers, the protocol's thresholds). A new number in the prose fails here until a
check computes it.

Checked: docs/escape-2/edition.md's paragraph on the second edition's sweeps and everything
from "Results of the second edition" on; docs/results.md but its GPU plan (what would run, not
what was measured); README.md's two paragraphs on what was found. Code blocks, inline code
(commands, flags, file names) and link targets are not prose.

The finer-grid runs (docs/escape-2/fine, fine-ri) have no committed rows: their numbers are
checked against their results.json and table.md only, as table values.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from conftest import Doc

from qmse import stats
from qmse.escape.population import PUBLISHED

ROOT = Path(__file__).resolve().parent.parent
E2 = ROOT / "docs" / "escape-2"
END = ROOT / "docs" / "fmnist-end"
LONG = ROOT / "docs" / "fmnist-long"
SHORT = ROOT / "docs" / "fmnist-grid" / "report.md"  # the 20-epoch grid: its report only
MARGIN = 0.05  # equivalence margin of two failure rates: ±5 points
MSE_MARGIN = 0.001  # equivalence margin of two final train ½‖r‖² (CNN grid)
ALPHA = 0.05  # each one-sided test of an equivalence: a 90 % interval
LEVEL = 0.05  # a difference: (Holm-adjusted) p below this
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PUBLISHED_RUNS = 1000  # Safran & Shamir (2018), Table 1: the runs behind each published rate
SUP = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


# ---------------------------------------------------------------- the document and its guard


# ---------------------------------------------------------------- formats


def num(x: float) -> str:
    """A count with thousands separators: 1,074."""
    return f"{round(x):,}"


def p_fmt(p: float) -> str:
    """A p-value: two significant digits, 2.7·10⁻⁸ below 0.001."""
    if p >= 0.001:
        return f"{p:.2g}"
    mant, exp = f"{p:.1e}".split("e")
    return f"{mant}·10{str(int(exp)).translate(SUP)}"


def p_ceil(p: float) -> str:
    """A bound 'p ≤ x' (p ≥ 0.001): x is p rounded up to two significant digits."""
    assert p >= 0.001
    step = 10.0 ** (math.floor(math.log10(p)) - 1)
    return f"{math.ceil(p / step) * step:.2g}"


def p_below(p: float) -> str:
    """The power of ten a p-value lies below: 10⁻¹⁹ for 3·10⁻²⁰."""
    return "10" + str(-math.floor(-math.log10(p))).translate(SUP)


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def sig(x: float, digits: int = 3) -> str:
    """Fixed point with `digits` significant digits: 0.0000610."""
    return f"{x:.{max(digits - 1 - math.floor(math.log10(abs(x))), 0)}f}"


def three(xs: list) -> str:
    """'a, b and c'."""
    return f"{', '.join(map(str, xs[:-1]))} and {xs[-1]}"


def span(xs: list[float]) -> str:
    """'0.237–1.000': the range of rates."""
    return f"{min(xs):.3f}–{max(xs):.3f}"


def signed(x: float) -> str:
    """The typographic minus; '+' for a positive number."""
    return ("+" if x >= 0 else "−") + sig(abs(x))


def ci_text(m: float, lo: float, hi: float) -> str:
    """'+0.00294 [0.000910, 0.00496]'."""
    bound = lambda x: ("−" if x < 0 else "") + sig(abs(x))  # noqa: E731
    return f"{signed(m)} [{bound(lo)}, {bound(hi)}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def load(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the escape benchmark's files


RI, SM = "random-init", "spurious-minima"


def rows_of(*parts: str) -> dict:
    """(protocol, method, k) → the row with its per-start outcomes ("failed")."""
    out = {}
    for part in parts:
        for f in sorted((E2 / part / "rows").glob("*.json")):
            r = load(f)
            out[(r["protocol"], r["method"], r["k"])] = r
    return out


def results_of(part: str = ".") -> dict:
    return {(r["protocol"], r["method"], r["k"]): r for r in load(E2 / part / "results.json")}


MAIN = rows_of("k6", "k8", "k10", "k12")  # 3,000 steps
LONGROWS = rows_of("long/k8", "long/k10")  # 30,000 steps
N1 = rows_of("n1/k8", "n1/k10", "n1/k12")  # student n = k + 1
CFG, LCFG = load(E2 / "config.json"), load(E2 / "long/config.json")


def paired(rows: dict, protocol: str, method: str, ref: str, k: int) -> dict:
    """McNemar of method against ref on the same starts, with 'text' the won / lost starts
    '+c −b' and 'tost' the equivalence of the two rates within MARGIN."""
    a, b = rows[(protocol, method, k)]["failed"], rows[(protocol, ref, k)]["failed"]
    mc = stats.mcnemar(a, b)
    tost = stats.tost_rates(a, b, MARGIN, ALPHA)
    return mc | {"text": f"+{mc['better']} −{mc['worse']}", "tost": tost}


def escapes(rows: dict, method: str, k: int) -> int:
    r = rows[(SM, method, k)]
    return r["seeds"] - r["failures"]


def rate(r: dict) -> str:
    """'9.5 %': a failure rate of a row in percent."""
    return f"{100 * r['failures'] / r['seeds']:g} %"


def holm_family(protocol: str) -> dict:
    """Holm over every paired comparison the main table records for a protocol (what its
    table.md shows), recomputed from the rows: (method, ref, k) → adjusted p."""
    keys = [
        (r["method"], ref, r["k"])
        for r in load(E2 / "results.json")
        if r["protocol"] == protocol and r.get("paired")
        for ref in r["paired"]
    ]
    ps = [paired(MAIN, protocol, m, ref, k)["p"] for m, ref, k in keys]
    return dict(zip(keys, stats.holm(ps)))


NOISE = [  # does QMSE's noise matter: QMSE against expected-QMSE, each k of both protocols
    (p, m, k)
    for p, ks in ((RI, (6, 8, 10, 12)), (SM, (8, 10, 12)))
    for m in ("qmse", "qmse-momentum")
    for k in ks
]


def noise_family() -> dict:
    """The NOISE comparisons at 3,000 steps: McNemar with Holm over these, and equivalence;
    each sorted into 'differ', 'equivalent' or 'open' (not determined)."""
    pr = {key: paired(MAIN, key[0], key[1], "expected-" + key[1], key[2]) for key in NOISE}
    for key, h in zip(NOISE, stats.holm([pr[key]["p"] for key in NOISE])):
        pr[key]["holm"] = h
        if h < LEVEL:
            pr[key]["kind"] = "differ"
        else:
            pr[key]["kind"] = "equivalent" if pr[key]["tost"]["equivalent"] else "open"
    return pr


def rate_cell(r: dict, lr: bool = False, edge: bool = True) -> str:
    """'0.978 (228)†': failure rate, diverged starts, † for a value chosen on an edge."""
    cell = f"{r['failures'] / r['seeds']:.3f}"
    if r["diverged"]:
        cell += f" ({r['diverged']})"
    if edge and (r.get("tuning") or {}).get("edge"):
        cell += "†"
    if lr:
        cell += f"; lr {r['lr']:.3g}"
    return cell


NAMES = {"sgd": "sgd (MSE)", "momentum": "momentum (MSE)"}
BOLD = {"qmse", "qmse-momentum"}  # the paper's method in the main tables


def name(method: str, bold: bool = False) -> str:
    name = NAMES.get(method, method)
    return f"**{name}**" if bold and method in BOLD else name


def wall(part: str) -> list[int]:
    """The 'all' row of a part's wall-time table (table.md): gd-population, sweeps,
    evaluation, total, in seconds."""
    text = (E2 / part / "table.md").read_text()
    line = next(x for x in text.split("\n") if x.startswith("| all |"))
    return [int(c.strip().replace(",", "")) for c in line.strip("|").split("|")[1:]]


def last_point(path: Path) -> dict:
    """The chosen value of a sweep record chosen at its top: its last stage's last point."""
    rec = load(path)
    top = rec["stages"][-1]["points"][-1]
    assert top["value"] == rec["chosen"]["lr"]
    return top


# ---------------------------------------------------------------- docs/escape.md


def escape_sweeps(doc: Doc) -> None:
    """The paragraph on the main table's sweeps (tuning/*.json of the four pieces)."""
    recs = [load(f) for k in CFG["ks"] for f in sorted((E2 / f"k{k}/tuning").glob("*.json"))]
    values = sum(len(r["points"]) for r in recs)
    stages = sum(len(r["stages"]) for r in recs)
    edges = []
    for r in recs:
        last = {s["param"]: s for s in r["stages"]}  # the stage that fixed each parameter
        edges += [(r, s) for s in last.values() if not s["interior"]]
    assert len(edges) == 1, "the prose names one value chosen on an edge"
    r, s = edges[0]
    assert (r["protocol"], r["method"], r["k"]) == (SM, "qmse-momentum", 10)
    top = max(s["points"], key=lambda p: p["value"])
    assert top["value"] == s["chosen"] and s["stopped"]["top"] == "most diverged"
    assert 2 * top["diverged"] > top["seeds"]  # the chosen value itself diverged on most
    hopeless = [r for r in recs if all(p["failures"] == p["seeds"] for p in r["points"])]
    doc.quote(
        f"{num(values)} swept values over {stages} stages",
        f"chose lr {s['chosen']:g}, the top of its range, where {top['diverged']} of the "
        f"{top['seeds']} tuning minima diverged and {top['failures']} failed",
        f"({len(hopeless)} of the {len(recs)} sweeps",
    )


def escape_intro(doc: Doc) -> None:
    """The machine (provenance.json) and the rule for reading the comparisons."""
    prov = load(E2 / "provenance.json")
    arch, cpus = re.fullmatch(r"(\S+) \((\d+) cpus\)", prov["device_name"]).groups()
    assert prov["torch_threads"] == 1 and prov["cuda"] is None
    # the margin and level of every equivalence claimed (tost_rates), wherever quoted
    doc.quote(
        f"{cpus}-core {arch} CPU (torch {prov['torch']}",
        f"±{100 * MARGIN:g} points",
        f"{100 * (1 - 2 * ALPHA):g} % interval",
    )


WALL_PARTS = {  # the wall-time table's rows: the part each comes from
    "main table, k = 6": "k6",
    "main table, k = 8": "k8",
    "main table, k = 10": "k10",
    "main table, k = 12": "k12",
    "main table, all": ".",
    "gd-population, k = 14 and 16": "wide",
    "30,000 steps, k = 8": "long/k8",
    "30,000 steps, k = 10": "long/k10",
    "n = k + 1, k = 8": "n1/k8",
    "n = k + 1, k = 10": "n1/k10",
    "n = k + 1, k = 12": "n1/k12",
    "finer lr grid, minima at k = 10 and 12": "fine",
    "finer lr grid, random starts at k = 12": "fine-ri",
}


def escape_wall_time(doc: Doc) -> None:
    """Each row's seconds are its part's table.md; the command column is not checked."""
    seen, total = set(), 0
    for line in doc.table_after("### Wall time")[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        part = WALL_PARTS[cells[0]]
        gd, sweeps, evaluation, tot = wall(part)
        if part.startswith("fine"):  # gd-population reused from the main table's pieces
            gd, tot = None, sweeps + evaluation
        want = [f"{x:,} s" if x else "–" for x in (gd, sweeps, evaluation, tot)]
        if gd is None:
            want[0] = "(reused)"
        if part == ".":
            want[-1] = f"**{want[-1]}**"
        assert cells[2:] == want, f"wall time of {cells[0]}: {cells[2:]} != {want}"
        doc.quote(line)
        seen.add(part)
        if not re.fullmatch(r"k\d+", part):  # the main table's pieces are in its 'all'
            total += tot
    assert seen == set(WALL_PARTS.values())
    main = wall(".")
    doc.quote(
        f"each swept value runs the full budget on {CFG['tune_seeds']} tuning starts",
        f"All parts together took {num(total)} s of one core ({total / 3600:.1f} hours)",
        f"an hour of one core ({num(main[3])} s)",
        f"The sweeps are {pct(main[1] / main[3])} of it",
    )


def escape_gd_population(doc: Doc) -> None:
    """Section 1: gd-population against the published rates; the certified minima."""
    res = [
        r
        for r in load(E2 / "results.json") + load(E2 / "wide/results.json")
        if r["method"] == "gd-population"
    ]
    rows = []
    for r in res:
        published = r.get("published_rate")
        assert published == PUBLISHED.get(r["k"])
        if published is not None:
            assert r["published_in_ci95"] and r["fisher_p_vs_published"] > LEVEL
        steps = f"{num(r['median_gd_steps'])} / {num(r['max_gd_steps'])}"
        if r["capped"]:
            steps += f" ({r['capped']} seeds at the cap)"
        rows.append(
            [
                str(r["k"]),
                f"{r['failures']}/{r['seeds']}",
                f"{r['failure_rate']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]",
                f"{published:.3f}" if published is not None else "– (none in the code's table)",
                f"{r['fisher_p_vs_published']:.2f}" if published is not None else "–",
                steps,
            ]
        )
    header = [
        "k = n",
        "stuck / seeds",
        "our rate [Wilson 95 %]",
        f"published ({num(PUBLISHED_RUNS)} runs)",
        "Fisher exact p",
        "median / max GD steps",
    ]
    capped = [r for r in res if r["capped"]]
    assert [r["k"] for r in capped] == [16]
    minima = {k: load(E2 / f"k{k}/minima/k{k}_n{k}_C1.json") for k in (8, 10, 12)}
    eigen = [f"{min(minima[k]['min_hessian_eigenvalues']):.4f} at k = {k}" for k in minima]
    levels = []
    for k in minima:
        ls = sorted(minima[k]["distinct_losses"])
        shown = ", ".join(f"{x:.4f}" for x in ls) if len(ls) < 3 else f"{ls[0]:.4f} … {ls[-1]:.4f}"
        levels.append(f"{WORDS[len(ls)]} at k = {k} ({shown})")
    assert results_of()[(RI, "gd-population", 6)]["failures"] == 0
    doc.quote(
        table(header, rows),
        f"step {res[0]['lr']:g}, float64",
        f"(cap {num(CFG['max_gd_steps'])} steps)",
        f"{num(CFG['seeds'])} Xavier initialisations per k (seeds 0–{CFG['seeds'] - 1})",
        f"At k = 16, {capped[0]['capped']} seeds reached the {num(CFG['max_gd_steps'])}-step cap",
        "(" + ", ".join(eigen) + ", from",
        ", ".join(levels),
        f"({', '.join(str(minima[k]['count']) for k in minima)}); k = 6 has none",
    )


def escape_random_init(doc: Doc) -> None:
    """Section 2: the random starts at 3,000 steps."""
    res, ks = results_of(), CFG["ks"]
    methods = [m for m in CFG["methods"] if m != "gd-population"]
    rows = [[name(m, bold=True)] + [rate_cell(res[(RI, m, k)]) for k in ks] for m in methods]
    half = max(
        max(r["failure_rate"] - r["ci95_low"], r["ci95_high"] - r["failure_rate"])
        for (p, m, k), r in res.items()
        if p == RI and m in methods
    )
    doc.quote(
        table(["method"] + [f"k = {k}" for k in ks], rows),
        f"### 2. From random initialisations ({num(CFG['steps'])} steps, batch {CFG['batch']}, "
        f"{num(CFG['sample_seeds'])} starts per cell)",
        f"half-widths are at most {half:.3f} at {num(CFG['sample_seeds'])} starts",
    )
    for method, ref in (("qmse", "sgd"), ("qmse-momentum", "momentum")):
        pr = [paired(MAIN, RI, method, ref, k) for k in ks]
        assert all(x["worse"] > x["better"] for x in pr)
        doc.quote(
            ", ".join(x["text"] for x in pr) + f"; every raw p < {p_below(max(x['p'] for x in pr))}"
        )
    q = [MAIN[(RI, "qmse", k)] for k in ks]
    lrs = [res[(RI, "qmse", k)]["lr"] for k in ks]
    assert len(set(lrs[:-1])) == 1 and lrs[-1] < lrs[0] and q[-1]["failures"] == q[-1]["seeds"]
    doc.quote(
        three([pct(r["diverged"] / r["seeds"]) for r in q]) + " of the starts diverge",
        "(" + three([pct(r["diverged"] / r["failures"]) for r in q]) + " of its failures)",
        f"at lr {lrs[-1]:g} (against {lrs[0]:g} at k ≤ 10), where "
        f"{pct(q[-1]['diverged'] / q[-1]['seeds'])} diverge",
    )
    pr = [paired(MAIN, RI, "expected-qmse", "qmse", k) for k in ks]
    assert all(x["tost"]["equivalent"] for x in pr)
    doc.quote("expected-QMSE against QMSE, " + ", ".join(x["text"] for x in pr) + ";")
    for m in ("momentum", "pgd", "restart"):  # "fail least"
        assert all(res[(RI, m, k)]["failures"] <= res[(RI, "sgd", k)]["failures"] for k in ks)
    # every other MSE method against SGD: a difference (Holm over the protocol, as in
    # table.md), equivalence within the margin, or neither
    holm = holm_family(RI)
    others = [
        "adam",
        "label-noise",
        "label-noise-momentum",
        "gradient-noise",
        "gradient-noise-momentum",
        "anticorrelated",
        "anticorrelated-momentum",
    ]
    differ, equivalent, open_ = [], 0, 0
    for m in others:
        for k in ks:
            if holm[(m, "sgd", k)] < LEVEL:
                differ.append((m, k))
            elif paired(MAIN, RI, m, "sgd", k)["tost"]["equivalent"]:
                equivalent += 1
            else:
                open_ += 1
    assert differ == [
        ("label-noise", 6),
        ("label-noise", 8),
        ("label-noise", 10),
        ("gradient-noise", 6),
        ("anticorrelated-momentum", 12),
    ]

    def against_sgd(m: str, k: int) -> str:
        return f"{paired(MAIN, RI, m, 'sgd', k)['text']}, Holm p = {p_fmt(holm[(m, 'sgd', k)])}"

    doc.quote(
        f"(k = 10: {res[(RI, 'label-noise', 10)]['failure_rate']:.3f} against "
        f"{res[(RI, 'sgd', 10)]['failure_rate']:.3f}, {against_sgd('label-noise', 10)})",
        f"gradient noise at k = 6 ({against_sgd('gradient-noise', 6)})",
        f"less often at k = 12 ({against_sgd('anticorrelated-momentum', 12)})",
        f"Of the other {equivalent + open_} comparisons of these methods with SGD, {equivalent} "
        f"are equivalent within ±{100 * MARGIN:g} points and {open_} not determined",
    )


def escape_minima(doc: Doc) -> None:
    """Section 3: the certified minima at 3,000 steps."""
    res, ks = results_of(), (8, 10, 12)
    methods = [m for m in CFG["methods"] if m != "gd-population"]
    n = {k: res[(SM, "sgd", k)]["seeds"] for k in ks}
    rows = [[name(m, bold=True)] + [rate_cell(res[(SM, m, k)]) for k in ks] for m in methods]
    header = ["method", f"k = 8 ({n[8]} minima)", f"k = 10 ({n[10]})", f"k = 12 ({n[12]})"]
    assert res[(SM, "qmse-momentum", 10)]["tuning"]["edge"]
    top = last_point(E2 / "k10/tuning/spurious-minima_qmse-momentum_k10_n10_C1.json")
    doc.quote(
        table(header, rows),
        f"{num(CFG['steps'])} steps, batch {CFG['batch']}, every minimum of the "
        f"{num(CFG['seeds'])} evaluation seeds",
        f"diverged on {top['diverged']} of the {top['seeds']} tuning minima",
    )
    esc = {m: [escapes(MAIN, m, k) for k in ks] for m in methods}
    assert esc["qmse"][1:] == [0, 0] and esc["sgd"] == [0, 0, 0]
    qm, mo = esc["qmse-momentum"], esc["momentum"]
    assert qm[2] == mo[2] == 0
    pr = [paired(MAIN, SM, "qmse-momentum", "momentum", k) for k in ks]
    nz = paired(MAIN, SM, "expected-qmse-momentum", "qmse-momentum", 8)
    at12 = {m: esc[m][2] for m in methods}
    best = sorted(at12, key=at12.get, reverse=True)
    assert best[:3] == ["pgd", "restart", "adam"] and at12[best[3]] == 0
    doc.quote(
        f"escapes {esc['qmse'][0]} of {n[8]} minima at k = 8 and none at k = 10 and 12",
        "(QMSE against SGD: " + ", ".join(paired(MAIN, SM, "qmse", "sgd", k)["text"] for k in ks),
        f"QMSE with momentum escapes {three(qm)}; MSE with momentum escapes {three(mo)} "
        "(QMSE-momentum against momentum: " + ", ".join(x["text"] for x in pr) + f"; raw p = "
        f"{p_fmt(pr[0]['p'])} and {p_fmt(pr[1]['p'])} at k = 8 and 10;",
        f"escapes {esc['expected-qmse-momentum'][0]} against QMSE with momentum's {qm[0]} "
        f"({nz['text']} against it, raw p = {p_fmt(nz['p'])}",
        f"({at12['pgd']} and {at12['restart']} of {n[12]})",
        f"except Adam ({at12['adam']})",
    )


FINE = [
    "sgd",
    "momentum",
    "adam",
    "qmse",
    "qmse-momentum",
    "expected-qmse",
    "expected-qmse-momentum",
    "label-noise-momentum",
    "anticorrelated-momentum",
]


def escape_fine(doc: Doc) -> None:
    """Section 4, the finer lr grid: its results.json only (no rows committed)."""
    pts = {
        p["value"]: p
        for p in load(E2 / "k12/tuning/spurious-minima_momentum_k12_n12_C1.json")["stages"][-1][
            "points"
        ]
    }
    assert pts[0.08]["failures"] == pts[0.08]["seeds"]
    assert pts[0.16]["diverged"] == pts[0.16]["seeds"]
    main, fine, fine_ri = results_of(), results_of("fine"), results_of("fine-ri")
    rows = []
    for m in FINE:
        cells = [
            rate_cell(res[(SM, mm, k)], lr=True, edge=False)
            for k in (10, 12)
            for res, mm in ((main, m), (fine, m + "-fine"))
        ]
        rows.append([name(m)] + cells)
    header = [
        "method",
        "k = 10, factor 2",
        "k = 10, 2^(1/4)",
        "k = 12, factor 2",
        "k = 12, 2^(1/4)",
    ]
    mo = fine[(SM, "momentum-fine", 12)]
    esc = mo["seeds"] - mo["failures"]
    holm = set()
    for q in ("qmse", "qmse-momentum", "expected-qmse", "expected-qmse-momentum"):
        pq = fine[(SM, q + "-fine", 12)]["paired"]["momentum-fine"]
        assert (pq["worse"], pq["better"]) == (esc, 0)
        holm.add(pq["p_holm"])
    assert len(holm) == 1 and 0.08 < mo["lr"] < 0.16
    sgd = fine[(SM, "sgd-fine", 10)]
    change = max(
        abs(fine[(SM, q + "-fine", k)]["failures"] - main[(SM, q, k)]["failures"])
        for q in ("qmse", "qmse-momentum", "expected-qmse", "expected-qmse-momentum")
        for k in (10, 12)
    )

    def ri(m: str, fine: bool = False) -> dict:
        return fine_ri[(RI, m + "-fine", 12)] if fine else main[(RI, m, 12)]

    doc.quote(
        "failed on every tuning minimum at lr 0.08 and diverged on every one at 0.16",
        "the one that fails everywhere (0.08) and the one that diverges everywhere (0.16)",
        table(header, rows),
        f"from escaping none of the {mo['seeds']} minima to escaping {esc} (its table.md: "
        f"+{esc} −0 against every QMSE variant, Holm-adjusted p = {p_fmt(holm.pop())})",
        f"escape {sgd['seeds'] - sgd['failures']} of the {sgd['seeds']} minima at k = 10 while "
        f"diverging on {sgd['diverged']}",
        f"by more than {change} minima",
        f"the finer grid's {mo['lr']:.3g} lies between them",
        f"MSE with momentum fails on {ri('momentum', True)['failures']} of "
        f"{num(ri('momentum', True)['seeds'])} starts at lr {ri('momentum', True)['lr']:.3g} "
        f"instead of {ri('momentum')['failures']} at {ri('momentum')['lr']:g}, SGD on "
        f"{ri('sgd', True)['failures']} instead of {ri('sgd')['failures']}, Adam on "
        f"{ri('adam', True)['failures']} instead of {ri('adam')['failures']}, while QMSE "
        f"fails on {ri('qmse', True)['failures']} ({num(ri('qmse')['failures'])} on the "
        f"factor-2 grid), QMSE with momentum on {ri('qmse-momentum', True)['failures']} "
        f"({ri('qmse-momentum')['failures']}) and expected-QMSE with momentum on "
        f"{ri('expected-qmse-momentum', True)['failures']} "
        f"({ri('expected-qmse-momentum')['failures']})",
    )


def escape_long(doc: Doc) -> None:
    """Section 5, 30,000 steps: long/k8 and long/k10, their rows."""
    res, main = results_of("long"), results_of()
    assert len(LCFG["methods"]) == 6 and LCFG["steps"] == 10 * CFG["steps"]
    n = {k: LONGROWS[(SM, "sgd", k)]["seeds"] for k in (8, 10)}
    rows = [
        [name(m)] + [rate_cell(res[(p, m, k)]) for p in (RI, SM) for k in (8, 10)]
        for m in LCFG["methods"]
    ]
    tops = [
        last_point(E2 / f"long/k{k}/tuning/{SM}_{m}_k{k}_n{k}_C1.json")
        for m in LCFG["methods"]
        for k in (8, 10)
        if res[(SM, m, k)]["tuning"]["edge"]
    ]
    assert len(tops) == 2 and all(2 * t["diverged"] > t["seeds"] for t in tops)
    doc.quote(
        f"Ten times the budget: {num(LCFG['steps'])} steps",
        f"{LCFG['sample_seeds']} evaluation starts per cell (all {n[8]} minima at k = 8, "
        f"{n[10]} of the {main[(SM, 'sgd', 10)]['seeds']} at k = 10)",
        f"a budget of {num(LCFG['steps'])} steps × batch {LCFG['batch']} = "
        f"{num(res[(RI, 'sgd', 8)]['grad_evals'])} sample gradients per start",
        table(["method", "random-init k = 8", "k = 10", "minima k = 8", "k = 10"], rows),
        f"diverged on {tops[0]['diverged']} and {tops[1]['diverged']} of the "
        f"{tops[0]['seeds']} tuning minima",
    )
    # QMSE against SGD from random starts: neither a difference nor equivalence
    q = [LONGROWS[(RI, "qmse", k)] for k in (8, 10)]
    s = [LONGROWS[(RI, "sgd", k)] for k in (8, 10)]
    pr = [paired(LONGROWS, RI, "qmse", "sgd", k) for k in (8, 10)]
    assert not any(x["tost"]["equivalent"] for x in pr)
    assert all(res[(RI, "qmse", k)]["paired"]["sgd"]["p_holm"] > LEVEL for k in (8, 10))
    lr, lr3 = res[(RI, "qmse", 8)]["lr"], main[(RI, "qmse", 8)]["lr"]
    assert res[(RI, "qmse", 10)]["lr"] == lr and lr3 == 4 * lr  # "four times smaller"
    mo = [res[(p, "momentum", k)] for p in (RI, SM) for k in (8, 10)]
    assert all(r["failures"] == 0 and r["lr"] == mo[0]["lr"] for r in mo)
    worst = max(
        paired(LONGROWS, p, "momentum", m, k)["p"]
        for p in (RI, SM)
        for k in (8, 10)
        for m in LCFG["methods"]
        if m != "momentum"
    )
    qm8 = paired(LONGROWS, SM, "qmse-momentum", "momentum", 8)

    def e(m: str, k: int) -> int:
        return escapes(LONGROWS, m, k)

    assert e("sgd", 8) == e("sgd", 10) == e("label-noise", 8) == e("label-noise", 10) == 0
    doc.quote(
        f"({lr:g} instead of {lr3:g}), where it diverges on {q[0]['diverged']} and "
        f"{q[1]['diverged']} of the {q[0]['seeds']} starts and fails on {rate(q[0])} and "
        f"{rate(q[1])} against SGD's {rate(s[0])} and {rate(s[1])} (paired {pr[0]['text']} and "
        f"{pr[1]['text']} against SGD, raw p = {p_fmt(pr[0]['p'])} and {p_fmt(pr[1]['p'])})",
        f"is shown on {q[0]['seeds']} starts",
        f"At {num(CFG['steps'])} steps it failed on {pct(main[(RI, 'qmse', 8)]['failure_rate'])} "
        f"and {pct(main[(RI, 'qmse', 10)]['failure_rate'])}",
        f"at lr {mo[0]['lr']:g} (paired against every other method, raw p ≤ {p_ceil(worst)})",
        f"({e('qmse-momentum', 8)} of {n[8]}, against momentum's {e('momentum', 8)}; paired "
        f"{qm8['text']}, raw p = {p_fmt(qm8['p'])})",
        f"({e('qmse-momentum', 10)} of {n[10]}, against {e('momentum', 10)})",
        f"({e('qmse', 8)} and {e('expected-qmse', 8)} at k = 8, {e('qmse', 10)} and "
        f"{e('expected-qmse', 10)} at k = 10)",
    )


def escape_noise(doc: Doc) -> None:
    """Section 6: QMSE against expected-QMSE (the noise family); label noise and others."""
    pr = noise_family()
    kinds = {
        kind: [key for key in NOISE if pr[key]["kind"] == kind]
        for kind in ("differ", "equivalent", "open")
    }
    assert kinds["differ"] == [(SM, "qmse-momentum", 8)]
    assert kinds["open"] == [(RI, "qmse-momentum", 8)]
    d, o = pr[kinds["differ"][0]], pr[kinds["open"][0]]
    assert d["worse"] > d["better"] and o["tost"]["diff"] > 0  # the noise hurts
    t = o["tost"]

    def esc(m: str) -> list[int]:
        return [escapes(MAIN, m, k) for k in (8, 10, 12)]

    assert esc("label-noise") == [0, 0, 0] and esc("label-noise-momentum")[1:] == [0, 0]
    assert esc("gradient-noise") == esc("gradient-noise-momentum") == [0, 0, 0]
    ln = results_of()[(SM, "label-noise-momentum", 8)]
    level = f"{100 * (1 - 2 * ALPHA):g} %"
    doc.quote(
        f"by {len(NOISE)} paired comparisons at {num(CFG['steps'])} steps",
        f"McNemar's p below {LEVEL:g}",
        f"Holm's correction over these {len(NOISE)}",
        f"not the {len(holm_family(SM))} comparisons of the minima's",
        f"the {level} interval of the paired rate difference inside ±{100 * MARGIN:g} points",
        f"Of the {len(NOISE)}:",
        f"{len(kinds['equivalent'])} are equivalent within ±{100 * MARGIN:g} points",
        f"escapes {escapes(MAIN, 'expected-qmse-momentum', 8)} against QMSE with momentum's "
        f"{escapes(MAIN, 'qmse-momentum', 8)} (+{d['worse']} −{d['better']} against it, raw "
        f"p = {p_fmt(d['p'])}, Holm p = {p_fmt(d['holm'])})",
        f"fails {100 * t['diff']:.1f} points more often ({level} interval "
        f"[{100 * t['low']:.1f}, {100 * t['high']:.1f}] points, raw p = {p_fmt(o['p'])}, Holm "
        f"p = {p_fmt(o['holm'])})",
        f"({esc('label-noise-momentum')[0]} of {ln['seeds']}, σ = {ln['hyper']['sigma']:g})",
        f"with momentum escape {three(esc('anticorrelated-momentum'))} at k = 8, 10, 12, "
        f"against momentum alone's {three(esc('momentum'))}",
    )


MSE_METHODS = ["sgd", "momentum", "adam", "pgd", "label-noise-momentum", "anticorrelated-momentum"]


def escape_n1(doc: Doc) -> None:
    """Section 7: the student n = k + 1."""
    cfg, res, ks = load(E2 / "n1/config.json"), results_of("n1"), (8, 10, 12)
    methods = [m for m in cfg["methods"] if m != "gd-population"]
    assert len(methods) == 9
    minima = load(E2 / "n1/k12/minima/k12_n13_C1.json")
    assert all(res[(SM, "sgd", k)]["seeds"] == 0 for k in (8, 10))
    gd = [res[(RI, "gd-population", k)] for k in ks]
    assert gd[0]["failures"] == gd[1]["failures"] == 0
    rows = [
        ["gd-population"]
        + [f"{gd[0]['failure_rate']:.3f} ({gd[0]['capped']} at the step cap)"]
        + [f"{r['failure_rate']:.3f} ({r['capped']})" for r in gd[1:]]
        + ["–"]
    ]
    for m in methods:
        r12 = res[(SM, m, 12)]
        rows.append(
            [name(m)]
            + [rate_cell(res[(RI, m, k)]) for k in ks]
            + [f"{r12['failures']}/{r12['seeds']}"]
        )
    header = ["method"] + [f"k = {k}, n = {k + 1}" for k in ks]
    header.append(f"minima, k = 12 ({minima['count']})")
    worst = max(res[(RI, m, k)]["failure_rate"] for m in MSE_METHODS for k in ks)
    q, qm = ([res[(RI, m, k)] for k in ks] for m in ("qmse", "qmse-momentum"))
    pr = [paired(N1, RI, m, "sgd", k) for m in ("qmse", "qmse-momentum") for k in ks]
    assert all(
        paired(N1, RI, "expected-qmse-momentum", "qmse-momentum", k)["tost"]["equivalent"]
        for k in ks
    )
    m12 = {m: res[(SM, m, 12)] for m in methods}
    assert m12["momentum"]["failures"] == m12["anticorrelated-momentum"]["failures"] == 0
    assert all(m12[m]["failures"] == m12[m]["seeds"] for m in methods if "qmse" in m)

    def rates(rs: list[dict]) -> str:
        return span([r["failure_rate"] for r in rs])

    def diverged(rs: list[dict]) -> str:
        return ", ".join(pct(r["diverged"] / r["seeds"]) for r in rs)

    doc.quote(
        f"{num(cfg['sample_seeds'])} random starts per cell and every certified minimum "
        f"({minima['count']}, all at k = 12)",
        table(header, rows),
        f"none of {num(gd[0]['seeds'])} seeds at k = 8 and 10 and on {gd[2]['failures']} at "
        f"k = 12, of which {minima['count']} are certified minima (smallest Hessian eigenvalue "
        f"{min(minima['min_hessian_eigenvalues']):.4f}",
        f"(at k = 8, {gd[0]['capped']} of {num(gd[0]['seeds'])} reached the "
        f"{num(cfg['max_gd_steps'])}-step cap",
        f"({num(wall('n1')[0])} s of {num(wall('n1')[3])})",
        f"fail on at most {worst:.3f} of the random starts",
        f"QMSE fails on {rates(q)} of them (diverging on {diverged(q)} of the starts at k = 8, "
        f"10, 12) and QMSE with momentum on {rates(qm)} ({diverged(qm)}); paired against SGD, "
        f"every raw p < {p_below(max(x['p'] for x in pr))}",
        f"On the {minima['count']} minima at k = 12 (too few to test)",
    )


def escape_verdict(doc: Doc) -> None:
    """The verdict: each bullet's numbers, from the sections above."""
    main, long_, fine, n1 = results_of(), results_of("long"), results_of("fine"), results_of("n1")
    ks = (8, 10, 12)
    steps, lsteps = num(CFG["steps"]), num(LCFG["steps"])
    # plain QMSE
    n = sum(main[(SM, "qmse", k)]["seeds"] for k in ks)
    assert all(
        fine[(SM, "qmse-fine", k)]["failures"] == fine[(SM, "qmse-fine", k)]["seeds"]
        for k in (10, 12)
    )  # none escaped on the finer grid
    assert all(escapes(MAIN, "sgd", k) == 0 for k in ks)
    assert all(escapes(LONGROWS, "sgd", k) == 0 for k in (8, 10))
    sgd_fine = fine[(SM, "sgd-fine", 10)]
    doc.quote(
        f"it escapes {sum(escapes(MAIN, 'qmse', k) for k in ks)} of {num(n)} at {steps} steps "
        f"(k = 8, 10, 12), {escapes(LONGROWS, 'qmse', 8)} of "
        f"{LONGROWS[(SM, 'qmse', 8)]['seeds']} at k = 8 and {escapes(LONGROWS, 'qmse', 10)} of "
        f"{LONGROWS[(SM, 'qmse', 10)]['seeds']} at k = 10 with ten times the budget",
        f"(against QMSE at {lsteps} steps, k = 8: {paired(LONGROWS, SM, 'sgd', 'qmse', 8)['text']}"
        f", raw p = {p_fmt(paired(LONGROWS, SM, 'sgd', 'qmse', 8)['p'])}, Holm p = "
        f"{p_fmt(long_[(SM, 'sgd', 8)]['paired']['qmse']['p_holm'])}: not determined)",
        f"it escapes {sgd_fine['seeds'] - sgd_fine['failures']} of {sgd_fine['seeds']} at "
        f"k = 10 at the edge of divergence, where QMSE escapes none (its table.md: Holm p = "
        f"{p_fmt(fine[(SM, 'qmse-fine', 10)]['paired']['sgd-fine']['p_holm'])})",
    )
    # QMSE with momentum against MSE with momentum, wherever either escapes any
    mo12 = fine[(SM, "momentum-fine", 12)]
    assert 12 not in LCFG["ks"]

    def vs(rows: dict, k: int) -> str:
        return f"{escapes(rows, 'qmse-momentum', k)} against {escapes(rows, 'momentum', k)}"

    worst = max(
        paired(rows, SM, "qmse-momentum", "momentum", k)["p"]
        for rows in (MAIN, LONGROWS)
        for k in (8, 10)
    )
    doc.quote(
        f"{vs(MAIN, 8)} of {MAIN[(SM, 'sgd', 8)]['seeds']} at k = 8 and {steps} steps, "
        f"{vs(LONGROWS, 8)} at {lsteps} steps; {vs(MAIN, 10)} of {MAIN[(SM, 'sgd', 10)]['seeds']}"
        f" at k = 10, {vs(LONGROWS, 10)} of {LONGROWS[(SM, 'sgd', 10)]['seeds']} at {lsteps} "
        f"steps; at k = 12 none against {mo12['seeds'] - mo12['failures']} of {mo12['seeds']} "
        "on the finer grid",
        f"and k = 12 was not run at {lsteps} steps",
        f"raw p ≤ {p_ceil(worst)}",
    )
    # the noise
    pr = noise_family()
    n_eq = sum(pr[key]["kind"] == "equivalent" for key in NOISE)
    doc.quote(
        f"Of the {len(NOISE)} paired comparisons of QMSE with expected-QMSE (section 6), "
        f"{n_eq} show the two equivalent within ±{100 * MARGIN:g} points",
        f"on the k = 8 minima the noise hurts ({escapes(MAIN, 'expected-qmse-momentum', 8)} "
        f"against {escapes(MAIN, 'qmse-momentum', 8)} escapes)",
    )
    # random starts
    qr = [main[(RI, "qmse", k)] for k in CFG["ks"]]
    sr = [main[(RI, "sgd", k)] for k in CFG["ks"]]
    lq = [LONGROWS[(RI, m, k)] for m in ("qmse", "sgd") for k in (8, 10)]
    assert (
        LONGROWS[(RI, "momentum", 8)]["failures"] == LONGROWS[(RI, "momentum", 10)]["failures"] == 0
    )
    p_mo = max(paired(LONGROWS, RI, "qmse", "momentum", k)["p"] for k in (8, 10))
    doc.quote(
        f"At {steps} steps it fails on {span([r['failure_rate'] for r in qr])} of the starts "
        f"against SGD's {span([r['failure_rate'] for r in sr])}, diverging on "
        f"{span([r['diverged'] / r['seeds'] for r in qr])} of them",
        f"at {lsteps} steps ({lq[0]['seeds']} starts) it fails on {rate(lq[0])} against SGD's "
        f"{rate(lq[2])} at k = 8 and on {rate(lq[1])} against {rate(lq[3])} at k = 10",
        f"than MSE with momentum ({rate(LONGROWS[(RI, 'momentum', 8)])}; raw p < {p_below(p_mo)})",
        f"(at k = 12, {escapes(MAIN, 'pgd', 12)} and {escapes(MAIN, 'restart', 12)} of "
        f"{MAIN[(SM, 'pgd', 12)]['seeds']} minima)",
    )
    assert all(escapes(MAIN, m, k) > 0 for m in ("pgd", "restart") for k in ks)  # every k
    # n = k + 1
    gd = [n1[(RI, "gd-population", k)] for k in ks]
    assert gd[0]["failures"] == gd[1]["failures"] == 0
    worst_mse = max(n1[(RI, m, k)]["failure_rate"] for m in MSE_METHODS for k in ks)
    q1 = [n1[(RI, "qmse", k)]["failure_rate"] for k in ks]
    qm1 = [n1[(RI, "qmse-momentum", k)]["failure_rate"] for k in ks]
    doc.quote(
        f"({load(E2 / 'n1/k12/minima/k12_n13_C1.json')['count']} in {num(gd[2]['seeds'])} "
        "seeds at k = 12, none at k = 8 and 10)",
        f"fail on at most {worst_mse:.3f} of the starts and QMSE still fails on {span(q1)} and "
        f"QMSE with momentum on {span(qm1)}",
    )
    # the settings
    doc.quote(
        f"batch {CFG['batch']}, success",
        f"budgets of {steps} and {lsteps} steps",
        f"tuned per k and protocol on {CFG['tune_seeds']} starts",
    )


def escape_limits(doc: Doc) -> None:
    fcfg, ncfg = load(E2 / "fine/config.json"), load(E2 / "n1/config.json")
    assert len(LCFG["methods"]) == 6 and len(fcfg["methods"]) == 9
    assert len([m for m in ncfg["methods"] if m != "gd-population"]) == 9
    doc.quote(
        f"The {num(LCFG['steps'])}-step budget covers six methods at k = 8 and 10 on "
        f"{LCFG['sample_seeds']} starts per cell",
        f"the batch ({LCFG['batch']})",
    )


ESCAPE_WHITELIST = [
    r"k ?[=≤] ?\d+(?:(?:, | and |, and | to )\d+)*",  # problem sizes
    r"n = k \+ 1",
    r"n = \d+",
    r"C = \d",
    r"section \d",  # section numbers
    r"(?m)^#+ \d\.",
    r"10⁻[³⁹]",  # the protocol's success threshold and gradient tolerance (defined above)
    r"2\^\(1/4\)",  # the grids' spacings
    r"factor-2",
    r"momentum 0\.9",  # heavy-ball momentum, fixed
    r"\(0\.9\)",
    r"500-step",  # PGD's definition
    r"4,096 fresh",
    r"Jin et al\. \(2017\)",
    r"‖r‖²/2",  # formulas
    r"2v r²",
    r"95 %",  # the confidence level of the Wilson intervals
    r"escape-2/",  # the results' folder
]


def test_escape_doc_numbers_are_the_committed_results():
    doc = Doc(
        "docs/escape-2/edition.md",
        [
            ("The sweeps of the second edition's main table", "## Running the second edition"),
            ("## Results of the second edition", None),
        ],
    )
    for check in (
        escape_sweeps,
        escape_intro,
        escape_wall_time,
        escape_gd_population,
        escape_random_init,
        escape_minima,
        escape_fine,
        escape_long,
        escape_noise,
        escape_n1,
        escape_verdict,
        escape_limits,
    ):
        check(doc)
    doc.check(ESCAPE_WHITELIST)


# ---------------------------------------------------------------- the CNN grid's files


def report_tables(path: Path) -> dict[str, list[dict]]:
    """A report.md's tables by the heading above them: rows as {column: cell}."""
    tables, heading, header = {}, None, None
    for line in path.read_text().split("\n"):
        if line.startswith("#"):
            heading, header = line.lstrip("# ").strip(), None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header, tables[heading] = cells, []
            else:
                tables[heading].append(dict(zip(header, cells)))
        elif not line.startswith("|"):
            header = None
    return tables


REPORT = report_tables(END / "report.md")
OWN, PAPER = "At each method's own lr", "At lr 0.01 (the paper's) for every method"
STOP, FINAL, DIFF = "Where the runs stopped", "Final epoch", "Paired differences"
R2, ACC, TEST = "Δ train ½‖r‖² [95 % CI]", "Δ train acc [95 % CI]", "Δ test acc [95 % CI]"
FIT = "‖r_i‖ < 0.1 (full set, %)"
GRID = load(END / "grid.json")
CONFIGS = dict(zip(GRID["runs"], GRID["configs"]))
BASE = CONFIGS[GRID["runs"][-1]]  # the settings every run shares
SQUARED = ("mse", "qmse", "expected-qmse", "label-noise")  # minimised where outputs = targets
(SWEEP_SEED,) = {load(r / "config.json")["seed"] for r in (END / "sweep").iterdir()}


def cell(setting: str, kind: str, momentum: str, loss: str, column: str) -> str:
    """One cell of the end-of-training report: setting OWN or PAPER, kind FINAL, STOP or
    DIFF."""
    key = next(h for h in REPORT if h.startswith(f"{setting}: {kind}"))
    return next(
        r[column]
        for r in REPORT[key]
        if (r["momentum"], r.get("loss", r.get("loss − MSE"))) == (momentum, loss)
    )


def mean_of(c: str) -> str:
    """'0.0004974 ± 0.00028' → '0.0004974'; '0.0426 [0.0257, 0.0595]' → '0.0426'."""
    return c.split(" ")[0]


def lower(c: str) -> float:
    """The lower bound of '0.0426 [0.0257, 0.0595]'."""
    return float(c.split("[")[1].split(",")[0])


def upper(c: str) -> float:
    """The upper bound of '0.0426 [0.0257, 0.0595]'."""
    return float(c.split(", ")[1].rstrip("]"))


def minus(c: str) -> str:
    """A report cell with the typographic minus of the prose (not in exponents)."""
    return re.sub(r"(?<![e\d])-", "−", c)


def plus(c: str) -> str:
    return c if c.startswith("-") else "+" + c


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x.strip()]


def at_epoch(run: Path, epoch: int) -> dict:
    return next(r for r in metrics(run) if r["epoch"] == epoch and "train_mse" in r)


def own_config(loss: str, momentum: float) -> dict:
    """The config of a loss at its own (swept) lr."""
    return next(
        c
        for n, c in CONFIGS.items()
        if c["loss"] == loss and c["momentum"] == momentum and "-lr" in n
    )


def run_dir(loss: str, momentum: str, seed: int, own: bool) -> Path:
    lr = f"-lr{own_config(loss, float(momentum))['lr']:g}" if own else ""
    return END / f"{loss}-m{momentum}-s{seed}{lr}"


def paired_deltas(loss: str, ref: str, momentum: str, own: bool) -> list[float]:
    """loss − ref in the final train ½‖r‖², seed by seed, where neither diverged."""
    out = []
    for seed in sorted({c["seed"] for c in GRID["configs"]}):
        a, b = run_dir(loss, momentum, seed, own), run_dir(ref, momentum, seed, own)
        if (a / "metrics.jsonl").exists() and (b / "metrics.jsonl").exists():
            out.append(metrics(a)[-1]["train_mse"] - metrics(b)[-1]["train_mse"])
    return out


def sweep_runs(loss: str, momentum: str) -> list[Path]:
    return [r for r in (END / "sweep").iterdir() if r.name.startswith(f"{loss}-m{momentum}-")]


# ---------------------------------------------------------------- docs/results.md


def results_answer(doc: Doc) -> None:
    """ "The answer at this scale": each bullet's numbers from report.md or the run files."""
    seeds = sorted({c["seed"] for c in GRID["configs"]})
    assert sorted({c["momentum"] for c in GRID["configs"]}) == [0.0, 0.9]
    diag = load(run_dir("mse", "0.9", 0, True) / "diagnosis.json")
    tol = diag["stop"]["tolerances"]["tol_gradient"]
    norms = [
        mean_of(cell(s, STOP, m, loss, "‖∇ ½‖r‖²‖ (full set)"))
        for s in (OWN, PAPER)
        for m in ("0", "0.9")
        for loss in SQUARED
    ]
    assert all(
        float(mean_of(cell(s, STOP, m, loss, "λ_min"))) < 0
        for s in (OWN, PAPER)
        for m in ("0", "0.9")
        for loss in SQUARED + ("ce",)
    )
    mse_own = cell(OWN, FINAL, "0.9", "mse", "train ½‖r‖²")
    q_own = cell(OWN, FINAL, "0.9", "qmse", "train ½‖r‖²")
    doc.quote(
        f"{BASE['epochs']} epochs",
        f"{BASE['epochs']}-epoch",
        "momentum 0 and 0.9",
        f"SimpleCNN on {num(BASE['train_subset'])} Fashion-MNIST images, {BASE['epochs']} "
        f"epochs, {len(seeds)} seeds",
        f"norm below 10{str(round(math.log10(tol))).translate(SUP)}",
        f"lies between {min(norms, key=float)} and {max(norms, key=float)} across the settings",
        f"({minus(cell(OWN, STOP, '0.9', 'mse', 'λ_min'))}, against a largest eigenvalue of "
        f"{mean_of(cell(OWN, STOP, '0.9', 'mse', 'λ_max'))})",
        f"There MSE fits {mean_of(cell(OWN, STOP, '0.9', 'mse', FIT))} % of the training images",
        f"½‖r‖² = {mse_own}, still falling",
    )

    def d(s: str, m: str, loss: str, c: str = R2) -> str:
        return cell(s, DIFF, m, loss, c)

    # QMSE above MSE in all four settings; its train accuracy lower or equal
    assert all(lower(d(s, m, "qmse")) > 0 for s in (OWN, PAPER) for m in ("0", "0.9"))
    assert d(OWN, "0.9", "qmse", ACC) == "0.00 (same in all 5)"
    assert all(cell(OWN, FINAL, "0.9", x, "train acc") == "100.00 ± 0.00" for x in ("mse", "qmse"))
    ratio = float(mean_of(q_own)) / float(mean_of(mse_own))
    for m in ("0", "0.9"):  # on the sweep seed QMSE ends above MSE at every common lr
        ends = {}
        for run in sweep_runs("mse", m) + sweep_runs("qmse", m):
            if (run / "metrics.jsonl").exists():
                cfg = load(run / "config.json")
                ends.setdefault(cfg["lr"], {})[cfg["loss"]] = metrics(run)[-1]["train_mse"]
        both = [v for v in ends.values() if len(v) == 2]
        assert both and all(v["qmse"] > v["mse"] for v in both)
    doc.quote(
        f"train ½‖r‖² {plus(d(PAPER, '0', 'qmse'))} (momentum 0) and "
        f"{plus(d(PAPER, '0.9', 'qmse'))} (momentum 0.9) at the paper's lr 0.01; "
        f"{plus(d(OWN, '0', 'qmse'))} and {plus(d(OWN, '0.9', 'qmse'))} at each method's own lr",
        f"{mean_of(q_own)} against MSE's {mean_of(mse_own)}: {ratio:.0f} times higher)",
        f"{minus(d(PAPER, '0', 'qmse', ACC))} and {minus(d(PAPER, '0.9', 'qmse', ACC))} points "
        f"at lr 0.01, {minus(d(OWN, '0', 'qmse', ACC))} and 0.00 (100 % for both in all 5 seeds)",
    )
    # QMSE's noise: QMSE − expected-QMSE, seed by seed
    noise = {
        (own, m): paired_deltas("qmse", "expected-qmse", m, own)
        for own in (False, True)
        for m in ("0", "0.9")
    }
    ci = {key: stats.mean_ci(v) for key, v in noise.items()}
    settled = (False, "0")
    assert ci[settled][1] > 0
    for key, v in noise.items():
        if key != settled:  # not determined: the interval holds 0, no equivalence
            assert ci[key][1] < 0 < ci[key][2]
            assert not stats.tost_mean(v, MSE_MARGIN, ALPHA)["equivalent"]
    doc.quote(
        f"also ends above MSE at lr 0.01 ({mean_of(plus(d(PAPER, '0', 'expected-qmse')))} and "
        f"{mean_of(plus(d(PAPER, '0.9', 'expected-qmse')))})",
        f"QMSE ends above expected-QMSE, {ci_text(*ci[settled])} (QMSE − expected-QMSE, "
        f"{len(noise[settled])} pairs)",
        f"({ci_text(*ci[(False, '0.9')])} at lr 0.01 with momentum; {ci_text(*ci[(True, '0')])} "
        f"and {ci_text(*ci[(True, '0.9')])} at the own lr, {len(noise[(True, '0')])} pairs each)",
        f"{mean_of(cell(OWN, STOP, '0', 'qmse', FIT))} % (QMSE) and "
        f"{mean_of(cell(OWN, STOP, '0', 'expected-qmse', FIT))} % (expected-QMSE) against "
        f"{mean_of(cell(OWN, STOP, '0', 'mse', FIT))} % (MSE)",
    )
    # label noise: its σ, the smaller σ tried, and its equivalence with MSE at lr 0.01
    ln0, ln9 = own_config("label-noise", 0.0), own_config("label-noise", 0.9)
    sig0, sig9 = ln0["loss_params"]["sigma"], ln9["loss_params"]["sigma"]

    def score(sigma: float) -> float:
        run = END / f"sweep/label-noise-m0-s{SWEEP_SEED}-lr{ln0['lr']:g}-sigma{sigma:g}"
        return metrics(run)[-1]["train_mse"]

    assert sig0 / 2 == sig9 and score(sig9) > score(sig0)
    tost = [
        stats.tost_mean(paired_deltas("label-noise", "mse", m, False), MSE_MARGIN, ALPHA)
        for m in ("0", "0.9")
    ]
    assert all(x["equivalent"] for x in tost)
    doc.quote(
        f"σ = {sig0:g} without momentum (the smaller {sig9:g}, also tried, scored "
        f"{score(sig9):.4g} against {score(sig0):.4g}) and with momentum {sig9:g}, the bottom "
        "of its range",
        f"the paired differences {minus(d(PAPER, '0', 'label-noise'))} and "
        f"{minus(d(PAPER, '0.9', 'label-noise'))} are equivalent to zero within ±{MSE_MARGIN:g} "
        f"(p = {p_fmt(tost[0]['p'])} and {p_fmt(tost[1]['p'])})",
        f"below MSE ({minus(d(OWN, '0', 'label-noise'))})",
    )
    # test accuracy, and the runs that diverged
    doc.quote(
        f"{plus(d(OWN, '0.9', 'qmse', TEST))} points "
        f"({mean_of(cell(OWN, FINAL, '0.9', 'qmse', 'test acc'))} % against "
        f"{mean_of(cell(OWN, FINAL, '0.9', 'mse', 'test acc'))} %)",
        f"best ({own_config('mse', 0.9)['lr']:g})",
        f"differ by {minus(d(PAPER, '0', 'qmse', TEST))} and "
        f"{minus(d(PAPER, '0.9', 'qmse', TEST))} points",
    )
    diverged = sorted(p.parent.name for p in END.glob("*/diverged.json"))
    assert diverged == [
        "expected-qmse-m0-s0-lr0.2",
        "expected-qmse-m0.9-s0-lr0.16",
        "qmse-m0-s0-lr0.2",
    ]
    assert all(load(END / n / "diverged.json")["epoch"] == 1 and "-s0-" in n for n in diverged)
    assert all((run_dir("mse", m, 0, True) / "metrics.jsonl").exists() for m in ("0", "0.9"))
    doc.quote(
        f"(QMSE at lr {own_config('qmse', 0.0)['lr']:g} without momentum, expected-QMSE at lr "
        f"{own_config('expected-qmse', 0.0)['lr']:g} and "
        f"{own_config('expected-qmse', 0.9)['lr']:g})",
        "(4 pairs instead of 5)",
        "in the first epoch on seed 0",
    )


LONG_EPOCHS = (100, 200, 300)  # the epochs the long runs' table quotes


def results_grid(doc: Doc) -> None:
    """The grid's settings (its configs), the tables copied from report.md, the 300-epoch
    runs, the step sizes, the wall time and the scale."""
    diag = load(run_dir("mse", "0.9", 0, True) / "diagnosis.json")
    model = load(run_dir("mse", "0", 0, False) / "config.json")["model"]
    doc.quote(
        f"conv3×3({model['channels'][0]}) → ReLU → maxpool → conv3×3({model['channels'][1]}) → "
        f"ReLU → maxpool → fc({model['hidden']}) → ReLU → fc({model['num_classes']})",
        f"first {num(BASE['train_subset'])} training images, first {num(BASE['test_subset'])} "
        "test images",
        f"batch {BASE['batch_size']}, {BASE['epochs']} epochs; the full train and test subsets "
        f"measured every {BASE['eval_every']} epochs",
        f"| seeds | 0–{max(c['seed'] for c in GRID['configs'])};",
        f"on the held-out seed {SWEEP_SEED}",
        f"(chosen on seed {SWEEP_SEED};",
        f"by {diag['config']['lanczos_steps']} Lanczos steps on a fixed subset of "
        f"{diag['n_samples']} training images",
        f"on all {num(BASE['train_subset'])}",
        f"on {diag['n_samples']} of them",
    )
    # the tables copied from the report: every row a row of report.md
    report_lines = set((END / "report.md").read_text().split("\n"))
    for heading in ("### Results (copied from the report)", "### Where the runs stopped"):
        rows = doc.tables_under(heading)
        assert rows and all(x in report_lines for x in rows), heading
        doc.quote(*rows)
    results_long(doc)
    results_step_sizes(doc)
    # wall time: the report's summary line
    line = (END / "report.md").read_text().split("\n")[2]
    pattern = r"summed over runs: (\d+) s; step-size sweep runs: (\d+) s; diagnoses: (\d+) s"
    train, sweep_s, diag_s = (int(x) for x in re.search(pattern, line).groups())
    complete, planned = (int(x) for x in re.search(r"(\d+) of (\d+) runs complete", line).groups())
    assert planned == len(GRID["runs"])
    n_sweep = len(list((END / "sweep").iterdir()))
    n_diag = len(list(END.glob("*/diagnosis.json")))
    prov = load(run_dir("mse", "0", 0, False) / "config.json")["provenance"]
    arch, cpus = re.fullmatch(r"(\S+) \((\d+) cpus\)", prov["device_name"]).groups()
    total = train + sweep_s + diag_s
    doc.quote(
        f"Machine: {cpus}-core {arch} CPU, torch {prov['torch']}, no GPU",
        f"{num(train)} s for the {planned} evaluation runs (training and evaluation; the "
        f"{planned - complete} that diverged stopped in their first epoch), {num(sweep_s)} s "
        f"for the {n_sweep} sweep runs, {num(diag_s)} s for the {n_diag} diagnoses",
        f"**{num(total)} s, {total / 3600:.1f} hours of one core**, about "
        f"{train / complete:.0f} s per {BASE['epochs']}-epoch run and {diag_s / n_diag:.0f} s "
        "per diagnosis",
    )
    # the scale: the grid's own runs at lr 0.01 over their last 20 epochs
    last, end = BASE["epochs"] - 20, BASE["epochs"]
    fall = {
        (loss, m): sum(
            1
            - at_epoch(run_dir(loss, m, s, False), end)["train_mse"]
            / at_epoch(run_dir(loss, m, s, False), last)["train_mse"]
            for s in range(5)
        )
        / 5
        for loss in ("mse", "qmse")
        for m in ("0", "0.9")
    }
    doc.quote(
        f"over their last {end - last} epochs the mean ½‖r‖² still falls by "
        f"{pct(fall[('mse', '0.9')])} (MSE) and {pct(fall[('qmse', '0.9')])} (QMSE) with "
        f"momentum 0.9, by {pct(fall[('mse', '0')])} and {pct(fall[('qmse', '0')])} without "
        f"(epoch {last} → {end}",
        f"(MSE with momentum 0.9: {mean_of(cell(OWN, FINAL, '0.9', 'mse', 'train ½‖r‖²'))} at "
        f"its own lr against {mean_of(cell(PAPER, FINAL, '0.9', 'mse', 'train ½‖r‖²'))} at lr "
        "0.01)",
    )


def results_long(doc: Doc) -> None:
    """300 epochs, seed 1, momentum 0.9 (docs/fmnist-long)."""
    runs = [
        ("MSE", "mse", own_config("mse", 0.9)["lr"]),
        ("QMSE", "qmse", own_config("qmse", 0.9)["lr"]),
        ("MSE", "mse", 0.01),
        ("QMSE", "qmse", 0.01),
    ]
    rows, r2 = [], {}
    for label, loss, lr in runs:
        path = LONG / f"{loss}-lr{lr:g}"
        cfg = load(path / "config.json")
        assert (cfg["seed"], cfg["momentum"], cfg["epochs"]) == (1, 0.9, LONG_EPOCHS[-1])
        m = [at_epoch(path, e) for e in LONG_EPOCHS]
        r2[(loss, lr)] = [x["train_mse"] for x in m]
        grid_run = run_dir(loss, "0.9", 1, lr != 0.01)
        assert at_epoch(grid_run, LONG_EPOCHS[0]) == m[0]  # the grid's seed-1 run, bit for bit
        rows.append(
            [
                label,
                f"{lr:g}",
                " / ".join(sig(x["train_mse"]) for x in m),
                " / ".join(f"{100 * x['test_acc']:.2f}" for x in m) + " %",
            ]
        )
    ep = " / ".join(map(str, LONG_EPOCHS))
    pairs = [(runs[1][1:], runs[0][1:]), (runs[3][1:], runs[2][1:])]  # QMSE, MSE
    ratios = [[f"{q / m:.3g}" for q, m in zip(r2[a], r2[b])] for a, b in pairs]
    gaps = [(r2[a][0] - r2[b][0], r2[a][-1] - r2[b][-1]) for a, b in pairs]
    assert all(g1 < g0 for g0, g1 in gaps)
    doc.quote(
        table(["loss", "lr", f"train ½‖r‖² at epoch {ep}", f"test acc at {ep}"], rows),
        f"A longer budget: {LONG_EPOCHS[-1]} epochs",
        "Seed 1, momentum 0.9",
        f"but {LONG_EPOCHS[-1]} epochs",
        f"The epoch-{LONG_EPOCHS[0]} values",
        "the grid's seed-1 runs",
        f"QMSE's ½‖r‖² is {three(ratios[0])} times MSE's at their own lr, {three(ratios[1])} "
        "times at lr 0.01",
        f"{sig(gaps[0][0])} → {sig(gaps[0][1])} at the own lr, {sig(gaps[1][0])} → "
        f"{sig(gaps[1][1])} at lr 0.01 (epoch {LONG_EPOCHS[0]} → {LONG_EPOCHS[-1]})",
    )


def results_step_sizes(doc: Doc) -> None:
    """Each loss's chosen lr (and σ) and the sweep's diverged neighbours (sweep/)."""
    names = {
        "mse": "MSE",
        "qmse": "QMSE",
        "expected-qmse": "expected-QMSE",
        "label-noise": "label noise",
        "ce": "CE",
    }
    rows = []
    for m in ("0", "0.9"):
        row = [m]
        for loss in names:
            cfg = own_config(loss, float(m))
            swept = [load(r / "config.json")["lr"] for r in sweep_runs(loss, m)]
            assert min(swept) < cfg["lr"] < max(swept)  # a swept neighbour on both sides
            diverged = sorted(
                load(r / "config.json")["lr"]
                for r in sweep_runs(loss, m)
                if (r / "diverged.json").exists()
            )
            c = f"{cfg['lr']:g}"
            if diverged:
                c += " (" + ", ".join(f"{x:g}" for x in diverged) + " diverged)"
            if loss == "label-noise":
                c += f", σ {cfg['loss_params']['sigma']:g}"
                chosen = next(
                    r for r in REPORT["Step sizes"] if (r["momentum"], r["loss"]) == (m, loss)
                )
                if "bounded out" in chosen["chosen"]:
                    c += " (bounded out)"
            row.append(c)
        rows.append(row)
    assert own_config("label-noise", 0.9)["loss_params"]["sigma"] == 0.1 * 2**-5
    doc.quote(
        table(["momentum"] + list(names.values()), rows),
        "the bottom of its range, 0.1·2⁻⁵",
    )


def results_short_grid(doc: Doc) -> None:
    """The 20-epoch grid: only its report.md is committed."""
    text = SHORT.read_text()
    rows = doc.tables_under("## The 20-epoch grid")
    assert rows and all(x in text.split("\n") for x in rows), "not rows of fmnist-grid/report.md"
    epochs = int(re.search(r"(\d+) epochs planned", text)[1])
    train, test = (int(x) for x in re.findall(r"images: first (\d+)", text))
    runs = int(re.search(r"(\d+) of \d+ runs complete", text)[1])
    seconds = int(re.search(r"summed over runs: (\d+) s", text)[1])
    seeds = int(re.search(r"seeds 0–\d+ \((\d+)\)", text)[1])
    batch = int(re.search(r"batch (\d+)", text)[1])
    accs = [float(r.split("|")[4].split("±")[0]) for r in rows if "±" in r and r.count("|") == 7]
    doc.quote(
        *rows,
        f"{epochs} epochs ({epochs * math.ceil(train / batch)} steps) on the first "
        f"{num(train)} training and {num(test)} test images, {seeds} seeds",
        f"({num(seconds)} s summed over the {runs * epochs} run-epochs",
        f"### Final epoch ({epochs}), mean ± std over {seeds} seeds",
        f"An earlier {epochs}-epoch grid",
        f"The {epochs}-epoch grid (earlier",
        f"the scale of the {epochs}-epoch grid below",
        f"The grid uses {num(train)} images",
        f"({math.floor(min(accs))}–{math.ceil(max(accs))} % train accuracy)",
    )


LONGER = ROOT / "docs" / "fmnist-300"  # 300 epochs, step sizes re-tuned, 5 seeds
FULL = ROOT / "docs" / "fmnist-full"  # all 60,000 images, 100 epochs, lr 0.01


def diff_cell(path: Path, setting: str, momentum: str, column: str) -> str:
    """A QMSE − MSE cell of a grid report's paired table (setting "" for a grid with one)."""
    tables = report_tables(path / "report.md")
    key = next(h for h in tables if setting in h and "Paired differences" in h)
    return next(
        r[column] for r in tables[key] if (r["momentum"], r["loss − MSE"]) == (momentum, "qmse")
    )


def report_rows(doc: Doc, heading: str, grid: Path) -> None:
    """Every table row under `heading` is a row of the grid's report.md (which
    tests/test_report.py regenerates from the grid's files)."""
    rows = doc.tables_under(heading)
    lines = set((grid / "report.md").read_text().split("\n"))
    assert rows and all(x in lines for x in rows), heading
    doc.quote(*rows)


def summary_line(grid: Path) -> dict:
    """The numbers of a report's summary line."""
    line = (grid / "report.md").read_text().split("\n")[2]
    out = {
        "complete": int(re.search(r"(\d+) of \d+ runs complete", line)[1]),
        "planned": int(re.search(r"\d+ of (\d+) runs complete", line)[1]),
        "train": int(re.search(r"summed over runs: (\d+) s", line)[1]),
        "diag": int(re.search(r"diagnoses: (\d+) s", line)[1]),
    }
    sweep = re.search(r"step-size sweep runs: (\d+) s", line)
    out["sweep"] = int(sweep[1]) if sweep else 0
    return out


def results_longer(doc: Doc) -> None:
    """300 epochs with step sizes re-tuned (docs/fmnist-300) against the 100-epoch grid."""
    heading = "## 300 epochs, step sizes re-tuned for 300 epochs"
    report_rows(doc, heading, LONGER)
    grid = load(LONGER / "grid.json")
    seeds = sorted({c["seed"] for c in grid["configs"]})
    epochs = {c["epochs"] for c in grid["configs"]}
    assert epochs == {300} and len(seeds) == 5
    # the same step sizes as the 100-epoch grid's
    for loss in ("mse", "qmse"):
        for m in (0.0, 0.9):
            lr = next(
                c["lr"]
                for n, c in zip(grid["runs"], grid["configs"])
                if c["loss"] == loss and c["momentum"] == m and "-lr" in n
            )
            assert lr == own_config(loss, m)["lr"]
    # every 300-epoch run's epoch-100 values are the 100-epoch grid's final ones
    for run in LONGER.glob("*-s[0-9]*"):
        if (run / "metrics.jsonl").exists():
            assert at_epoch(run, 100) == metrics(END / run.name)[-1], run.name
    diagnosed = [load(d) for d in LONGER.glob("*/diagnosis.json")]
    assert all(d["stop"]["whole_set_label"] == "not-stationary" for d in diagnosed)
    ratio, delta = "train ½‖r‖² ÷ MSE's [95 % CI]", R2
    settings = [(OWN, "0"), (OWN, "0.9"), (PAPER, "0"), (PAPER, "0.9")]
    before = [cell(st, DIFF, m, "qmse", ratio) for st, m in settings]
    after = [diff_cell(LONGER, st, m, ratio) for st, m in settings]
    assert all(float(mean_of(a)) > float(mean_of(b)) for a, b in zip(after, before))
    d0 = [mean_of(cell(st, DIFF, m, "qmse", delta)) for st, m in settings]
    d1 = [mean_of(diff_cell(LONGER, st, m, delta)) for st, m in settings]
    assert float(d1[0]) < float(d0[0]) and float(d1[1]) < float(d0[1])
    assert float(d1[3]) < float(d0[3])
    s = summary_line(LONGER)
    total = s["train"] + s["sweep"] + s["diag"]
    doc.quote(
        heading.removeprefix("## "),
        f"trained for 300 epochs instead of {BASE['epochs']}",
        f"the 300-epoch budget (the same factor-2 sweep, widened past its edges), "
        f"{len(seeds)} seeds",
        f"all {len(diagnosed)} diagnosed runs are not-stationary",
        f"{before[0]} → {after[0]} at the own lr without momentum, {before[1]} → {after[1]} "
        f"with momentum 0.9, and at lr 0.01 {before[2]} → {after[2]} and {before[3]} → "
        f"{after[3]}",
        f"{d0[0]} → {d1[0]} and {d0[1]} → {d1[1]} at the own lr, {d0[2]} → {d1[2]} and "
        f"{d0[3]} → {d1[3]} at lr 0.01",
        f"from {BASE['epochs']} to 300 epochs",
        f"Against the {BASE['epochs']}-epoch grid",
        f"as for {BASE['epochs']} epochs",
        f"{num(s['train'])} s for the {s['complete']} evaluation runs that finished (the "
        f"{s['planned']}th diverged in its first epoch), about {s['train'] / s['complete']:.0f} s "
        f"per 300-epoch run; {num(s['sweep'])} s for the "
        f"{len(list((LONGER / 'sweep').iterdir()))} sweep runs; {num(s['diag'])} s for the "
        f"{len(diagnosed)} diagnoses: **{num(total)} s, {total / 3600:.1f} hours of one core**",
        "2-core x86_64 CPU",
        f"trained for 300 epochs with step sizes re-tuned for that budget ({len(seeds)} seeds)",
        "(momentum 0, 0.9)",
        f'("{heading.split(",")[0].removeprefix("## ")}" below)',
    )
    (diverged,) = [load(d.parent / "config.json") for d in LONGER.glob("*/diverged.json")]
    assert (diverged["loss"], diverged["momentum"]) == ("qmse", 0.0)
    assert diverged["lr"] == own_config("qmse", 0.0)["lr"]
    doc.quote(f"QMSE's seed-{diverged['seed']} run at its own lr without momentum diverged")


def results_full(doc: Doc) -> None:
    """All 60,000 images, 100 epochs at lr 0.01 (docs/fmnist-full)."""
    heading = "## All 60,000 images, 100 epochs"
    report_rows(doc, heading, FULL)
    cfg = load(FULL / "mse-m0-s0" / "config.json")
    assert (cfg["num_train"], cfg["num_test"], cfg["lr"], cfg["epochs"]) == (
        60000,
        10000,
        0.01,
        100,
    )
    done = sorted(
        {
            load(r / "config.json")["seed"]
            for r in FULL.glob("*-s*")
            if (r / "metrics.jsonl").exists()
        }
    )
    planned = sorted({c["seed"] for c in load(FULL / "grid.json")["configs"]})
    r_full = [diff_cell(FULL, "", m, R2) for m in ("0", "0.9")]
    ratio = "train ½‖r‖² ÷ MSE's [95 % CI]"
    q_full = [diff_cell(FULL, "", m, ratio) for m in ("0", "0.9")]
    q_end = [cell(PAPER, DIFF, m, "qmse", ratio) for m in ("0", "0.9")]
    assert all(lower(c) > 0 for c in r_full)  # "higher" in both momenta
    assert "**higher**" in (FULL / "report.md").read_text()
    acc = [diff_cell(FULL, "", m, "Δ train acc [95 % CI]") for m in ("0", "0.9")]
    assert upper(acc[0]) < 0 < upper(acc[1]) and lower(acc[1]) < 0
    # the ratio's intervals: disjoint from the 2,000-image grid's without momentum, not with
    assert lower(q_full[0]) > upper(q_end[0])
    assert lower(q_full[1]) <= upper(q_end[1]) and lower(q_end[1]) <= upper(q_full[1])
    full_mse = report_tables(FULL / "report.md")
    fin = next(
        r
        for r in full_mse["Final epoch, mean ± std over seeds"]
        if (r["momentum"], r["loss"]) == ("0.9", "mse")
    )
    stop = next(
        r
        for r in full_mse["Where the runs stopped"]
        if (r["momentum"], r["loss"]) == ("0.9", "mse")
    )
    steps = [math.ceil(n / BASE["batch_size"]) for n in (60000, BASE["train_subset"])]
    s = summary_line(FULL)
    per_epoch = s["train"] / s["complete"] / 100
    doc.quote(
        heading.removeprefix("## "),
        f"on all {num(cfg['num_train'])} Fashion-MNIST training images (test on all "
        f"{num(cfg['num_test'])})",
        f"seeds {three(done)} of the planned {planned[0]}–{planned[-1]}"
        if len(done) > 2
        else f"seeds {done[0]} and {done[1]} of the planned {planned[0]}–{planned[-1]} (seed "
        f"{planned[-1]}'s runs are not committed)",
        f"QMSE ends above MSE by {mean_of(r_full[0])} [{r_full[0].split('[')[1]} without momentum "
        f"and {mean_of(r_full[1])} [{r_full[1].split('[')[1]} with momentum 0.9, {q_full[0]} and "
        f"{q_full[1]} times MSE's, against {q_end[0]} and {q_end[1]} on "
        f"{num(BASE['train_subset'])} images after {BASE['epochs']} epochs",
        f"With {steps[0]} steps an epoch instead of {steps[1]}",
        f"½‖r‖² {mean_of(fin['train ½‖r‖²'])} with {stop[FIT]} % of the images".replace(
            f"{stop[FIT]} %", f"{stop[FIT].split(' ')[0]} %"
        ),
        f"against {mean_of(cell(PAPER, FINAL, '0.9', 'mse', 'train ½‖r‖²'))} and "
        f"{cell(PAPER, STOP, '0.9', 'mse', FIT).split(' ')[0]} %",
        f"With {WORDS[len(done)]} paired seeds the report's rule (at least 3 pairs) decides: "
        "QMSE ends higher on the MSE yardstick in both momenta",
        f"without momentum, {minus(acc[0])} points, and not determined with momentum 0.9",
        f"{num(s['train'])} s of one core for the {s['complete']} runs (about "
        f"{per_epoch * 100 / 60:.0f} minutes a run, {per_epoch:.0f} s an epoch;",
        f"{num(s['diag'])} s for their {len(list(FULL.glob('*/diagnosis.json')))} diagnoses",
        f"on {num(BASE['train_subset'])} images",
        f"on all {num(cfg['num_train'])} images",
        f"(100 epochs, lr 0.01, {WORDS[len(done)]} paired seeds) QMSE ends higher in both "
        f"momenta, by {r_full[0]} without momentum and {r_full[1]} with momentum 0.9, "
        f"{mean_of(q_full[0])} and {mean_of(q_full[1])} times MSE's",
        f"All {num(cfg['num_train'])} images",
        f"the {num(BASE['train_subset'])}-image grid",
        f"the {num(BASE['train_subset'])}-image grid)",
        f"the full train and test sets evaluated every {cfg['eval_every']} epochs",
    )


RESULTS_WHITELIST = [
    r"sec\. \d",  # the paper's sections and data sets
    r"figs\. \d–\d",
    r"CIFAR-10+",
    r"95 %",  # the confidence level of the report's intervals
    r"momentum 0(?:\.9)?",  # the grid's two momenta
    r"lr 0\.01",  # the paper's step size, the grid's common one
    r"‖r_i‖ < 0\.1",  # the fit threshold of the diagnosis (qmse.endstate)
    r"N\(0, σ²I\)",  # formulas
    r"(?<!l)r = 0(?!\.?\d)",
    r"factor-2",  # the sweep's rule (qmse.stepsize)
    r"lr = 0\.1·\(1 − momentum\)",
    r"2\^±5",
    r"\(from 0\.1\)",
    r"fc\(10\)",  # ten classes
    r"fmnist-(?:end|long|grid|300|full)/",  # the results' folders
]


def test_results_doc_numbers_are_the_committed_results():
    doc = Doc(
        "docs/results.md",
        [("# Results", "## On a GPU at the paper's scale"), ("## The 20-epoch grid", None)],
    )
    for check in (results_answer, results_grid, results_longer, results_full, results_short_grid):
        check(doc)
    doc.check(RESULTS_WHITELIST)


# ---------------------------------------------------------------- README.md


def readme_findings(doc: Doc) -> None:
    res = results_of()
    n = [res[(SM, "sgd", k)]["seeds"] for k in (8, 10, 12)]
    assert all(escapes(MAIN, "sgd", k) == 0 for k in (8, 10, 12))
    pr = noise_family()
    n_eq = sum(pr[key]["kind"] == "equivalent" for key in NOISE)
    assert all(pr[key]["worse"] > pr[key]["better"] for key in NOISE if pr[key]["kind"] == "differ")
    div = [MAIN[(RI, "qmse", k)]["diverged"] / MAIN[(RI, "qmse", k)]["seeds"] for k in CFG["ks"]]
    for s in (OWN, PAPER):  # QMSE ends above MSE in all four settings, accuracy lower or equal
        for m in ("0", "0.9"):
            assert lower(cell(s, DIFF, m, "qmse", R2)) > 0
            a = cell(s, DIFF, m, "qmse", ACC)
            assert a == "0.00 (same in all 5)" or float(a.split(", ")[1].rstrip("]")) < 0
    doc.quote(
        f"its CNN on {num(BASE['train_subset'])} Fashion-MNIST images, {BASE['epochs']} epochs, "
        f"{len({c['seed'] for c in GRID['configs']})} paired seeds",
        f"after {BASE['epochs']} epochs",
        "momentum 0 and 0.9",
        f"{len(CFG['methods']) - 1} methods each tuned",
        f"{num(CFG['sample_seeds'])} random starts per cell and every certified spurious "
        f"minimum, {three(n)} at k = 8, 10, 12",
        f"plain QMSE escapes {sum(escapes(MAIN, 'qmse', k) for k in (8, 10, 12))} of the "
        f"{num(sum(n))} minima",
        f"within ±{100 * MARGIN:g} points in {n_eq} of {len(NOISE)} paired comparisons",
        f"at {num(CFG['steps'])} steps (its gradient grows like ‖r‖³; "
        f"{100 * min(div):.0f}–{100 * max(div):.0f} % of the starts diverge)",
        f"at {num(LCFG['steps'])} steps its comparison with SGD is not determined",
    )


def test_readme_findings_are_the_committed_results():
    doc = Doc(
        "README.md",
        [("What it finds so far", "The paper: Anonymous"), ("**What we found so far**", "## Data")],
    )
    readme_findings(doc)
    doc.check(ESCAPE_WHITELIST + RESULTS_WHITELIST)


def test_third_protocol_statements_are_what_its_results_give():
    """docs/escape.md's section on the third protocol at k = 8 and 10: each statement from
    the committed results.json of docs/escape-3."""
    verdicts = {}
    edges = set()
    for k in (8, 10):
        results = json.loads((ROOT / "docs" / "escape-3" / f"k{k}" / "results.json").read_text())
        for t in results["comparisons"]:
            verdicts[t["comparison"], t["protocol"], k] = t["verdict"]
        edges |= {(r["method"], r["protocol"], k) for r in results["rows"]
                  if (r.get("tuning") or {}).get("edge")}  # fmt: skip
    cells = [(p, k) for p in ("random-init", "spurious-minima") for k in (8, 10)]
    for a, b in (("qmse", "sgd"), ("qmse", "label-noise"), ("qmse-momentum", "momentum"),
                 ("qmse-momentum", "label-noise-momentum")):  # fmt: skip
        assert all(verdicts[f"{a}:{b}", p, k] == f"{a} fails more" for p, k in cells)
    q = {(p, k): verdicts["qmse:expected-qmse", p, k] for p, k in cells}
    assert q == {
        ("random-init", 8): "qmse fails more", ("spurious-minima", 8): "not determined",
        ("random-init", 10): "equivalent within ±0.05",
        ("spurious-minima", 10): "equivalent within ±0.05",
    }  # fmt: skip
    m = {(p, k): verdicts["qmse-momentum:expected-qmse-momentum", p, k] for p, k in cells}
    assert m.pop(("random-init", 10)) == "qmse-momentum fails more"
    assert set(m.values()) == {"not determined"}
    assert edges == set()  # ties go inside (qmse.tuning.search)
    text = (ROOT / "docs" / "escape.md").read_text()
    assert "## The third protocol at k = 8 and 10" in text


def test_every_third_protocol_noise_baseline_tried_its_noise_free_limit():
    for path in sorted((ROOT / "docs" / "escape-3").glob("k*/tuning/*.json")):
        record = json.loads(path.read_text())
        if record["method"] not in ("label-noise", "label-noise-momentum", "gradient-noise",
                                    "gradient-noise-momentum", "anticorrelated",
                                    "anticorrelated-momentum", "pgd"):  # fmt: skip
            continue
        tried = [p["settings"] for p in record["stages"][0]["points"]]
        assert record["anchors"] and all(a in tried for a in record["anchors"]), path
        assert len(tried) == record["budget"] == 32
