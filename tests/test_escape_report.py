"""qmse.escape.report: the paired tests stored per row (McNemar against each reference,
Holm-adjusted per protocol), the tables and the figures. The statistics themselves (Wilson,
McNemar, Holm) are tested in tests/test_stats.py."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import escape_row as row

from qmse.cli import main
from qmse.escape.cells import add_paired_tests, declared_tests
from qmse.escape.report import (
    wall_times,
    write_table,
)
from qmse.escape.rows import Row
from qmse.stats import holm, mcnemar, wilson


def test_exploratory_paired_tests_pair_rows_of_the_same_starts_with_raw_p(tmp_path):
    rows = [
        row("gd-population", 8, "1" * 12 + "0" * 88, "random-init", published_rate=0.126),
        row("sgd", 8, "1" * 20),
        row("qmse", 8, "1" * 18 + "00"),
        row("pgd", 8, "0" * 15 + "1" * 5, hyper={"radius": 1.0}),
        row("pgd", 10, "0" * 20),  # no reference at k = 10: no test
        row("sgd", 8, "1" * 20, protocol="random-init"),
    ]
    rows[0].failed = None  # gd-population: other starts, no per-start outcomes
    add_paired_tests(rows, ["sgd", "momentum", "qmse"])
    gd, sgd, qmse, pgd, pgd10, _ = rows
    assert gd.paired == {}  # no per-start outcomes: not paired
    assert set(pgd.paired) == {"sgd", "qmse"} and pgd10.paired == {}
    assert set(qmse.paired) == {"sgd"} and set(sgd.paired) == {"qmse"}
    assert (pgd.paired["sgd"]["better"], pgd.paired["sgd"]["worse"]) == (15, 0)
    assert pgd.paired["sgd"]["p"] == pytest.approx(2 * 0.5**15)  # McNemar: 15 of 15 one way
    assert all("p_holm" not in t for r in rows for t in r.paired.values())  # exploratory
    text = write_table(rows, tmp_path / "table.md")
    assert "| pgd | 0.1 (radius=1) / 0.1 |" in text
    assert "#### Exploratory: paired against sgd (spurious-minima)" in text
    assert "| pgd | +15 −0 p=6.1e-05 |" in text  # raw p, not bold: no claim is made of it
    assert "800 sample gradients per start" in text
    assert "; published 0.126" in text


def test_wall_times_sum_each_problem_by_kind(tmp_path):
    timings = {
        "gd-population/eval_k8_n8_C1": 30.0,
        "gd-population/tune_k8_n8_C1": 10.25,
        "tuning/random-init_sgd_k8_n8_C1": 7.25,
        "tuning/spurious-minima_sgd_k8_n8_C1": 2.75,
        "eval_random-init_k10_n10_C1": 5.0,
        "eval_random-init_k8_n8_C1": 100.0,
        "eval_random-init_k8_n9_C1": 1200.4,
    }
    lines = wall_times(timings)
    assert "| k=8 | 40 | 10 | 100 | 150 |" in lines
    assert "| k=8, n=9 | 0 | 0 | 1,200 | 1,200 |" in lines
    assert "| all | 40 | 10 | 1,305 | 1,356 |" in lines  # totals of unrounded seconds
    assert lines.index("| k=8 | 40 | 10 | 100 | 150 |") < lines.index("| k=10 | 0 | 0 | 5 | 5 |")
    assert wall_times({}) == []
    text = write_table([], tmp_path / "table.md", timings)
    assert text.endswith("\n".join(lines))
    with pytest.raises(ValueError, match="'notes' that does not end in _k<k>_n<n>_C<C>"):
        wall_times({"notes": 1.0})


DOCS = Path(__file__).parent.parent / "docs"
COMMITTED = sorted(p.parent for p in DOCS.glob("escape-*/**/table.md"))


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_committed_table_is_rewritten_byte_for_byte_from_its_files(folder, tmp_path):
    """`qmse escape --report-only` on a copy of a committed benchmark: table.md from
    results.json and timings.json alone, equal to the committed one."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.png"))
    assert main(["escape", "--report-only", "--out", str(copy)]) == 0
    assert (copy / "table.md").read_bytes() == (folder / "table.md").read_bytes()
    assert (copy / "figure.png").stat().st_size > 0


def test_a_row_round_trips_through_json_with_its_extras():
    pgd = row("pgd", 8, "0110", mean_perturbations=1.5)
    data = pgd.to_json()
    assert data["mean_perturbations"] == 1.5 and "extra" not in data and data["failed"] == "0110"
    assert Row.from_json(data) == pgd
    assert "failed" not in pgd.to_json(outcomes=False)


def test_declared_comparisons_holm_over_their_family_and_test_equivalence():
    """Per protocol: A − B with Newcombe's interval, McNemar, Holm over the declared pairs
    only, and the equivalence test at the declared margin; the verdicts follow."""
    far = "1" * 60 + "0" * 140  # 60 of 200 fail
    near = "1" * 58 + "0" * 2 + "0" * 140  # the same starts but two
    other = "0" * 100 + "1" * 60 + "0" * 40  # 60 of 200 fail, other starts
    rows = [
        row("qmse", 8, far), row("sgd", 8, near), row("expected-qmse", 8, other),
        row("qmse", 10, far), row("sgd", 10, far),
        row("qmse", 8, far, protocol="random-init"),  # its partner did not run: no test
    ]  # fmt: skip
    tests = declared_tests(rows, [("qmse", "sgd"), ("qmse", "expected-qmse")], 0.05)
    assert [(t["comparison"], t["k"]) for t in tests] == [
        ("qmse:sgd", 8), ("qmse:sgd", 10), ("qmse:expected-qmse", 8),
    ]  # fmt: skip
    p = [t["p"] for t in tests]
    assert [t["p_holm"] for t in tests] == pytest.approx(holm(p))  # a family of three
    by = {(t["comparison"], t["k"]): t for t in tests}
    close = by[("qmse:sgd", 8)]
    assert close["difference"] == pytest.approx(0.01) and close["a_worse"] == 2
    assert close["equivalent"] and close["verdict"] == "equivalent within ±0.05"
    assert by[("qmse:sgd", 10)]["difference"] == 0 and by[("qmse:sgd", 10)]["p"] == 1.0
    apart = by[("qmse:expected-qmse", 8)]  # 60 vs 60 failures but on other starts
    assert apart["difference"] == 0 and apart["p"] == 1.0 and not apart["equivalent"]
    assert apart["verdict"] == "not determined"  # wide interval: neither shown
    text = write_table(rows, Path(tempfile.mkdtemp()) / "t.md", comparisons=tests)
    assert "Holm over its 3 tests" in text and "| qmse:sgd | 8 | 60 / 58 of 200 | +0.010" in text


WITH_ROWS = sorted(p.parent for p in DOCS.glob("escape-*/**/rows"))


@pytest.mark.parametrize("folder", WITH_ROWS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_committed_result_is_recomputed_from_its_per_start_outcomes(folder):
    """results.json of a committed benchmark, from its rows/ (one file per method and cell,
    with the per-start outcomes): each count, Wilson interval and paired test recomputed by
    qmse.stats (the Holm family of an older file: every paired test of its protocol)."""
    results = json.loads((folder / "results.json").read_text())
    rows = results["rows"] if isinstance(results, dict) else results
    files = {
        (r["protocol"], r["method"], r["k"]): r
        for r in (json.loads(p.read_text()) for p in (folder / "rows").glob("*.json"))
    }
    tests = []
    for r in rows:
        if r["method"] == "gd-population" or r["seeds"] == 0:  # no per-start outcomes
            continue
        failed = files[r["protocol"], r["method"], r["k"]]["failed"]
        assert (r["failures"], r["seeds"]) == (failed.count("1"), len(failed))
        assert (r["ci95_low"], r["ci95_high"]) == pytest.approx(wilson(r["failures"], r["seeds"]))
        for ref, test in r.get("paired", {}).items():
            other = files[r["protocol"], ref, r["k"]]["failed"]
            assert {k: test[k] for k in ("worse", "better", "p")} == mcnemar(failed, other)
            tests.append((r["protocol"], test))
    for protocol in {p for p, _ in tests}:
        family = [t for p, t in tests if p == protocol and "p_holm" in t]
        assert [t["p_holm"] for t in family] == pytest.approx(holm([t["p"] for t in family]))
    if isinstance(results, dict):  # the declared comparisons, from the same outcomes
        config = json.loads((folder / "config.json").read_text())
        typed = [Row.from_json(files[r["protocol"], r["method"], r["k"]]) for r in rows
                 if r["method"] != "gd-population" and r["seeds"]]  # fmt: skip
        pairs = sorted({tuple(t["comparison"].split(":")) for t in results["comparisons"]})
        again = declared_tests(typed, pairs, config["equivalence_margin"])
        key = lambda t: (t["protocol"], t["comparison"], t["k"])  # noqa: E731
        again = json.loads(json.dumps(sorted(again, key=key)))  # as JSON holds it
        assert again == sorted(results["comparisons"], key=key)


def test_rows_that_predate_minima_counts_take_them_from_the_minima_reports(tmp_path):
    rows = [row("sgd", 8, "1" * 5 + "0" * 3), row("qmse", 8, "1" * 8)]  # no minima fields
    report = {"k": 8, "distinct": 2, "starts_per_minimum": [6, 2]}
    text = write_table(rows, tmp_path / "t.md", minima={8: report})
    assert "Distinct minima modulo symmetry (starts at each; from minima/): k=8: 2 (6, 2)." in text
    old = {"k": 8, "count": 8, "distinct_losses": [0.02]}  # a report that did not count them
    assert "from minima/" not in write_table(rows, tmp_path / "u.md", minima={8: old})
    counted = [row("sgd", 8, "1" * 8, minima=[6, 2], minima_failures=[6, 2],
                   weighted_failure_rate=1.0)]  # fmt: skip
    text = write_table(counted, tmp_path / "v.md", minima={8: report})
    assert "from minima/" not in text and "k=8: 2 (6, 2)." in text
