"""qmse.escape.summary: several benchmark directories read together. Checked on directories
written here from rows with known per-start outcomes, whose declared comparisons come from
`declared_tests`: each table entry is recomputed from the outcomes by hand."""

import json
from pathlib import Path

import pytest
from conftest import escape_row as row

from qmse.cli import main
from qmse.errors import UserError
from qmse.escape.cells import declared_tests
from qmse.escape.summary import (
    cells_table,
    describe,
    load_benchmark,
    settings_table,
    verdict_counts,
    wall_table,
    write_summary,
)

PAIRS = [("qmse", "sgd"), ("qmse", "expected-qmse")]


def bench(path: Path, config: dict, outcomes: dict, minima: dict, seconds: dict) -> Path:
    """A finished benchmark directory: rows from `outcomes` ((method, protocol, k) -> "0/1"
    string), their declared comparisons, minima/ reports (k -> report) and timings.json."""
    rows = [row(m, k, failed, protocol) for (m, protocol, k), failed in outcomes.items()]
    tests = declared_tests(rows, PAIRS, 0.05)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    results = {"rows": [r.to_json(outcomes=False) for r in rows], "comparisons": tests}
    (path / "results.json").write_text(json.dumps(results))
    (path / "minima").mkdir()
    for k, report in minima.items():
        (path / "minima" / f"k{k}.json").write_text(json.dumps({"k": k, **report}))
    (path / "timings.json").write_text(json.dumps(seconds))
    return path


@pytest.fixture
def two(tmp_path) -> list[Path]:
    """A teacher–student benchmark (k = 8: QMSE fails on 40 more of 60 minima than SGD and
    on as many as expected-QMSE) and a matrix-sensing one (random starts, all escape)."""
    run = {"ks": [8], "steps": 300, "batch": 8, "tune_budget": 32, "tune_seeds": 50}
    run |= {"methods": ["gd-population", "sgd", "qmse", "expected-qmse"]}
    ts = run | {"problem": "teacher-student", "n_extra": 2, "outputs": 3, "teachers": 4}
    ts |= {"protocols": ["spurious-minima"]}
    ms = run | {"problem": "matrix-sensing", "problem_args": {"delta": 0.7, "seed": 1.0}}
    ms |= {"ks": [3], "protocols": ["random-init"], "tune_budget": None}
    a = bench(
        tmp_path / "ts",
        ts,
        {
            ("qmse", "spurious-minima", 8): "1" * 50 + "0" * 10,
            ("sgd", "spurious-minima", 8): "1" * 10 + "0" * 50,
            ("expected-qmse", "spurious-minima", 8): "0" * 10 + "1" * 50,
        },
        {8: {"distinct": 7, "isolated": True}},
        {"tuning/a": 100.0, "eval": 50.5},
    )
    b = bench(
        tmp_path / "ms",
        ms,
        {(m, "random-init", 3): "0" * 200 for m in ("qmse", "sgd", "expected-qmse")},
        {},
        {"eval": 20.0},
    )
    return [a, b]


def test_each_cell_gives_its_paired_differences_verdicts_and_distinct_minima(two):
    benches = [load_benchmark(p) for p in two]
    lines = cells_table(benches).splitlines()
    assert len(lines) == 2 + 2  # header, rule, one cell each
    # QMSE − SGD on the same 60 minima: (50 − 10)/60; QMSE − expected-QMSE: 0, with 40 and 40
    # discordant starts: not decided, and no ±0.05 equivalence on 60 starts
    assert lines[2] == (
        "| ts | teacher-student k=8, n=10, C=3, 4 teachers | spurious-minima | 60 | 7 | "
        f"{40 / 60:+.3f} more | +0.000 n.d. |"
    )
    assert lines[3] == (
        "| ms | matrix-sensing size 3, delta=0.7, seed=1 | random-init | 200 | – | "
        "+0.000 equiv. | +0.000 equiv. |"
    )
    counts = verdict_counts(benches)
    assert counts["teacher-student", "spurious-minima", "qmse:sgd"] == {"fails more": 1}
    assert counts["teacher-student", "spurious-minima", "qmse:expected-qmse"] == {
        "not determined": 1
    }
    assert counts["matrix-sensing", "random-init", "qmse:sgd"] == {"equivalent": 1}


def test_the_settings_of_each_benchmark_are_listed(two):
    lines = settings_table([load_benchmark(p) for p in two]).splitlines()
    assert lines[2:] == [
        "| ts | teacher-student n=k+2, C=3, 4 teachers | 8 | spurious-minima | 3 | 300 × 8 | "
        "32 trials, 50 starts |",
        "| ms | matrix-sensing, delta=0.7, seed=1 | 3 | random-init | 3 | 300 × 8 | "
        "coordinate passes, 50 starts |",
    ]


def test_gradient_descent_alone_has_no_budget_or_tuning(tmp_path):
    run = {"ks": [14], "steps": 3000, "batch": 64, "tune_budget": 32, "tune_seeds": 100}
    run |= {"methods": ["gd-population"], "protocols": ["random-init"], "n_extra": 0}
    path = bench(tmp_path / "gd", run | {"problem": "teacher-student", "outputs": 1}, {}, {}, {})
    (line,) = settings_table([load_benchmark(path)]).splitlines()[2:]
    assert line == "| gd | teacher-student n=k, C=1 | 14 | random-init | 0 | – | – |"


def test_wall_time_is_each_benchmarks_summed_timings_and_their_total(two):
    table = wall_table([load_benchmark(p) for p in two])
    assert "| ts | teacher-student | 150 | 0.04 |" in table
    assert "| ms | matrix-sensing | 20 | 0.01 |" in table
    assert table.splitlines()[-1] == "| all | | 170 | 0.05 |"


def test_a_minimum_set_that_is_not_isolated_says_so(tmp_path):
    path = bench(
        tmp_path / "bm",
        {"problem": "burer-monteiro", "problem_args": {"perturbation": 0.3}},
        {(m, "spurious-minima", 2): "0" * 30 for m in ("qmse", "sgd")},
        {2: {"distinct": 29, "isolated": False}},
        {},
    )
    table = cells_table([load_benchmark(path)])
    assert "| bm | burer-monteiro size 2, perturbation=0.3 | spurious-minima | 30 | " in table
    assert "| 29 (not isolated) |" in table


def test_describe_names_what_defines_a_cell():
    assert describe({"n_extra": 0, "outputs": 1}, 8) == "teacher-student k=8, n=8, C=1"
    config = {"problem": "teacher-student", "n_extra": 1, "outputs": 3, "teacher": "random"}
    assert describe(config, 6) == "teacher-student k=6, n=7, C=3, random V"


def test_the_command_writes_the_summary_and_profiles_and_refuses_bad_input(two, tmp_path):
    out = tmp_path / "summary"
    assert main(["escape", "summary", *map(str, two), "--out", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert cells_table([load_benchmark(p) for p in two]) in text
    assert (out / "profiles.png").stat().st_size > 0
    with pytest.raises(UserError, match="no results.json"):
        write_summary([tmp_path / "missing"], out)
    (tmp_path / "other").mkdir()
    twin = bench(tmp_path / "other" / "ts", {}, {}, {}, {})
    with pytest.raises(UserError, match="share a name"):
        write_summary([two[0], twin], out)
