"""qmse.escape.figures: the budget curve against brute force over subsets, performance
profiles on a hand-made table, and every figure drawn from rows and records (one k as
categories, several ks, older records)."""

import itertools
import math

import pytest
from conftest import escape_row as row

from qmse.escape.figures import (
    _trials,
    budget_curve,
    performance_profile,
    plot_budgets,
    plot_profiles,
    plot_results,
    plot_tuning,
)


def test_the_budget_curve_is_the_mean_best_over_every_subset():
    scores = [0.7, 0.2, 0.9, 0.2, 0.5]
    curve = budget_curve(scores)
    for n, value in enumerate(curve, start=1):
        subsets = list(itertools.combinations(scores, n))
        assert value == pytest.approx(sum(min(s) for s in subsets) / len(subsets))
    assert curve[0] == pytest.approx(sum(scores) / 5) and curve[-1] == min(scores)
    assert all(a >= b for a, b in zip(curve, curve[1:]))  # more trials never hurt


def test_performance_profiles_count_cells_within_a_factor_of_the_best():
    rows = [
        row("a", 8, "1" * 1 + "0" * 99), row("b", 8, "1" * 4 + "0" * 96),  # a best; b 3x
        row("a", 10, "1" * 49 + "0" * 51), row("b", 10, "1" * 9 + "0" * 91),  # b best; a 5.2x
        row("a", 12, "0" * 100),  # b did not run at k = 12
    ]  # fmt: skip
    assert (4 + 0.5) / (1 + 0.5) == 3.0 and 5 < (49 + 0.5) / (9 + 0.5) < 6  # (f + ½)/(S + 1)
    profile = performance_profile(rows, [1.0, 2.0, 4.0, 6.0])
    assert profile["a"] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1.0])
    assert profile["b"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])  # never at k = 12


def test_performance_profiles_keep_cells_of_different_problems_apart():
    rows = [row("a", 3, "1" + "0" * 99, problem="p"), row("b", 3, "1" * 4 + "0" * 96, problem="p"),
            row("a", 3, "1" * 9 + "0" * 91, problem="q"),
            row("b", 3, "0" * 100, problem="q")]  # fmt: skip
    profile = performance_profile(rows, [1.0])
    assert profile == {"a": [0.5], "b": [0.5]}  # each best in one; as one cell, a in none


def test_the_figures_are_drawn(tmp_path):
    rows = [row(m, k, "1" * f + "0" * (20 - f), family=fam)
            for m, fam, f in (("sgd", "MSE", 4), ("qmse", "QMSE", 12), ("momentum", "MSE", 1))
            for k in (8, 10)]  # fmt: skip
    rows[1].diverged = 6
    for name, subset in (("one-k", [r for r in rows if r.k == 8]), ("ks", rows)):
        plot_results(subset, tmp_path / f"{name}.png", {8: 0.126})
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert plot_profiles(rows, tmp_path / "profiles.png")
    stage = {
        "param": "lr", "chosen": 0.2, "interior": True, "range": [0.1, 0.4],
        "points": [{"value": v, "failures": f, "seeds": 10, "diverged": d}
                   for v, f, d in ((0.1, 5, 0), (0.2, 2, 0), (0.4, 9, 8))],
    }  # fmt: skip
    new = {**stage, "points": [p | {"score": p["failures"] / 10} for p in stage["points"]]}
    points = [{"failures": f, "seeds": 10} for f in (5, 2, 9)]
    records = [
        {"method": "sgd", "protocol": "random-init", "k": 8, "stages": [stage]},  # older
        {"method": "qmse", "protocol": "random-init", "k": 8, "stages": [new], "points": points},
    ]
    plot_tuning(records, tmp_path / "sweeps.png")
    assert (tmp_path / "sweeps.png").stat().st_size > 0
    assert plot_budgets(records, tmp_path / "budgets.png")
    joint = {"points": points * 2, "stages": [{"joint": True, "points": points}]}
    assert _trials(joint) == points  # the search's own trials, not every point kept
    assert not plot_budgets(records[:1], tmp_path / "none.png")  # no points: no figure
    assert not (tmp_path / "none.png").exists() and not math.isnan(budget_curve([1.0])[0])
