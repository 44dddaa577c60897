"""qmse.stats against independent references: Wilson against its closed formula, McNemar
against a brute-force binomial sum, Holm against hand-computed cases, Newcombe's paired
interval against a published worked example, its limiting cases in closed form and its
Monte Carlo coverage, the TOSTs against direct computations with scipy.stats.t, the log
ratio against a t-interval of the logarithms; and every function's refusal of bad input."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from qmse.errors import UserError
from qmse.stats import (
    holm,
    mcnemar,
    mean_ci,
    mean_std,
    paired_log_ratio,
    paired_rate_difference,
    tost_mean,
    tost_rates,
    wilson,
)


def _strings(both: int, worse: int, better: int, neither: int) -> tuple[str, str]:
    """The per-start outcomes of a paired 2x2 table: (method's, reference's) "0"/"1"."""
    method = "1" * both + "1" * worse + "0" * better + "0" * neither
    ref = "1" * both + "0" * worse + "1" * better + "0" * neither
    return method, ref


def _wilson_closed_form(x: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n**2)) / (1 + z * z / n)
    return centre - half, centre + half


# ---------------------------------------------------------------- Wilson, McNemar, Holm


@pytest.mark.parametrize("failures,seeds", [(0, 100), (12, 100), (100, 100), (3, 7)])
def test_wilson_matches_the_closed_form(failures, seeds):
    z = 1.959963984540054
    p = failures / seeds
    centre = (p + z * z / (2 * seeds)) / (1 + z * z / seeds)
    half = z * math.sqrt(p * (1 - p) / seeds + z * z / (4 * seeds**2)) / (1 + z * z / seeds)
    assert wilson(failures, seeds) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(failures, seeds, 0.8) == pytest.approx(
        _wilson_closed_form(failures, seeds, 0.8), abs=1e-12
    )


def test_mcnemar_matches_a_hand_computed_case():
    """10 starts: the method fails on 1 where the reference succeeds and succeeds on 9 where
    it fails (b = 1, c = 9), 3 concordant. Two-sided exact p = 2·P(X ≤ 1), X ~ Bin(10, ½)
    = 2·(1 + 10)/1024 = 22/1024."""
    method = "1" + "0" * 9 + "110"
    ref = "0" + "1" * 9 + "110"
    test = mcnemar(method, ref)
    assert (test["worse"], test["better"]) == (1, 9)
    assert test["p"] == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar("0101", "0101")["p"] == 1.0  # no discordant start
    assert mcnemar("1", "0")["p"] == 1.0  # one discordant start: P(X ≤ 0)·2 = 1
    with pytest.raises(ValueError, match="length"):
        mcnemar("01", "011")


@pytest.mark.parametrize("worse,better", [(0, 3), (2, 9), (7, 7), (15, 4), (30, 12), (1, 40)])
def test_mcnemar_matches_a_brute_force_binomial_sum(worse, better):
    """The two-sided exact p-value summed term by term in exact arithmetic: the probability,
    under Binomial(b + c, ½), of every split at most as likely as the observed one."""
    m = worse + better
    pmf = [Fraction(math.comb(m, i), 2**m) for i in range(m + 1)]
    brute = float(sum(q for q in pmf if q <= pmf[worse]))
    method, ref = _strings(5, worse, better, 11)
    order = np.random.default_rng(worse * 100 + better).permutation(len(method))
    method, ref = "".join(method[i] for i in order), "".join(ref[i] for i in order)
    test = mcnemar(method, ref)
    assert (test["worse"], test["better"]) == (worse, better)
    assert test["p"] == pytest.approx(min(1.0, brute), rel=1e-12)
    as_bools = mcnemar([c == "1" for c in method], [c == "1" for c in ref])
    assert as_bools == test


def test_holm_matches_a_hand_computed_case():
    """p = (0.01, 0.04, 0.03): sorted 0.01·3 = 0.03, 0.03·2 = 0.06, max(0.06, 0.04·1)."""
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    # sorted 0.001·4 = 0.004, 0.02·3 = 0.06, 0.03·2 = 0.06, max(0.06, 0.04·1) = 0.06
    assert holm([0.04, 0.001, 0.03, 0.02]) == pytest.approx([0.06, 0.004, 0.06, 0.06])


# ---------------------------------------------------------------- Newcombe's paired interval


def test_paired_rate_difference_matches_a_published_worked_example():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8,
    complete response before and after consolidation therapy (Cavo et al. 2012), table
    [[59, 6], [16, 80]]: Newcombe's square-and-add interval (Newcombe 1998, method 10)
    -0.0621 (95 % CI -0.1186 to -0.0046), printed to four decimals."""
    diff, lo, hi = paired_rate_difference(*_strings(59, 6, 16, 80))
    assert diff == pytest.approx(-10 / 161, abs=1e-15)
    assert (round(diff, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)


def test_paired_rate_difference_of_degenerate_tables_is_finite_in_closed_form():
    z2 = stats.norm.ppf(0.975) ** 2
    n = 20
    upper0 = z2 / (n + z2)  # Wilson upper limit of 0 of n; 1 − (lower limit of n of n)
    for table in [(0, 0, 0, n), (n, 0, 0, 0)]:  # none fails; every start fails
        assert paired_rate_difference(*_strings(*table)) == pytest.approx(
            (0.0, -upper0, upper0), abs=1e-12
        )
    # every start discordant, one way: diff ±1, one limit on the edge, the other at the
    # Wilson distances (phi = 0, an empty margin): 1 − √((1 − l(n of n))² + u(0 of n)²)
    far = 1 - math.sqrt(2) * upper0
    assert paired_rate_difference(*_strings(0, n, 0, 0)) == pytest.approx((1.0, far, 1.0))
    assert paired_rate_difference(*_strings(0, 0, n, 0)) == pytest.approx((-1.0, -1.0, -far))
    # no discordant start but both outcomes: the interval has a width, none of it NaN
    diff, lo, hi = paired_rate_difference(*_strings(6, 0, 0, 14))
    assert diff == 0.0 and -1 < lo < 0 < hi < 1
    # no start at all: nothing is known
    diff, lo, hi = paired_rate_difference("", "")
    assert math.isnan(diff) and (lo, hi) == (-1.0, 1.0)


def test_paired_rate_difference_holds_its_estimate_inside_minus_one_one():
    """Every table of up to 7 starts: a finite interval around the estimate, within [-1, 1],
    and the same from "0"/"1" strings as from bools."""
    for n in range(1, 8):
        for both, worse, better in itertools.product(range(n + 1), repeat=3):
            neither = n - both - worse - better
            if neither < 0:
                continue
            method, ref = _strings(both, worse, better, neither)
            diff, lo, hi = paired_rate_difference(method, ref)
            assert all(map(math.isfinite, (diff, lo, hi)))
            assert -1 - 1e-12 <= lo <= diff <= hi <= 1 + 1e-12
    bools = paired_rate_difference([c == "1" for c in method], [c == "1" for c in ref])
    assert bools == paired_rate_difference(method, ref)


@pytest.mark.parametrize(
    "cells,n,seed",
    [
        ((0.40, 0.05, 0.15, 0.40), 150, 0),  # strongly correlated, theta = -0.10
        ((0.10, 0.20, 0.10, 0.60), 150, 1),  # theta = +0.10
        ((0.25, 0.25, 0.25, 0.25), 200, 2),  # independent outcomes, theta = 0
    ],
)
def test_paired_rate_difference_covers_95_percent_by_monte_carlo(cells, n, seed):
    """Simulated paired tables (probabilities of both failed, only the method, only the
    reference, neither): the 95 % interval covers theta in 95 % of them within 3 standard
    errors. (Exact coverages by enumeration of all tables: 0.9506, 0.9520, 0.9496; ignoring
    the correlation, phi = 0, would give 0.998 in the first setting.)"""
    sims = 1200
    theta = cells[1] - cells[2]
    tables = np.random.default_rng(seed).multinomial(n, cells, size=sims)
    cache: dict[tuple, bool] = {}
    for table in map(tuple, tables.tolist()):
        if table not in cache:
            _, lo, hi = paired_rate_difference(*_strings(*table))
            cache[table] = lo <= theta <= hi
    coverage = np.mean([cache[tuple(t)] for t in tables.tolist()])
    se = math.sqrt(0.95 * 0.05 / sims)
    assert abs(coverage - 0.95) < 3 * se, (coverage, se)


def test_tost_rates_is_the_inclusion_of_the_one_minus_two_alpha_interval():
    method, ref = _strings(30, 4, 6, 160)  # diff -0.01 on 200 starts
    diff, lo, hi = paired_rate_difference(method, ref, 0.90)
    for margin in (0.02, 0.05, 0.1):
        result = tost_rates(method, ref, margin)
        assert result == {
            "diff": diff,
            "low": lo,
            "high": hi,
            "margin": margin,
            "equivalent": -margin < lo and hi < margin,
        }
    assert not tost_rates(method, ref, 0.02)["equivalent"]  # 90 % interval (-0.039, 0.018)
    assert tost_rates(method, ref, 0.1)["equivalent"]
    assert not tost_rates(*_strings(30, 40, 6, 124), 0.1)["equivalent"]  # diff +0.17
    assert tost_rates(method, ref, 0.05, alpha=0.025)["low"] == pytest.approx(
        paired_rate_difference(method, ref, 0.95)[1]
    )


# ---------------------------------------------------------------- means and ratios


def test_tost_mean_matches_two_one_sided_t_tests_computed_with_scipy_t():
    rng = np.random.default_rng(7)
    for shift, margin in [(0.0, 0.5), (0.3, 0.5), (0.45, 0.5), (-0.8, 0.5), (0.1, 0.05)]:
        deltas = (shift + 0.4 * rng.standard_normal(12)).tolist()
        n = len(deltas)
        m, sem = np.mean(deltas), np.std(deltas, ddof=1) / math.sqrt(n)
        p_low = stats.t.sf((m + margin) / sem, n - 1)  # H0: mean <= -margin
        p_high = stats.t.cdf((m - margin) / sem, n - 1)  # H0: mean >= margin
        lo, hi = stats.t.interval(0.90, n - 1, loc=m, scale=sem)
        result = tost_mean(deltas, margin)
        assert result["p"] == pytest.approx(max(p_low, p_high), rel=1e-9)
        assert (result["mean"], result["low"], result["high"]) == pytest.approx((m, lo, hi))
        assert result["margin"] == margin
        assert result["equivalent"] == (max(p_low, p_high) < 0.05) == (-margin < lo < hi < margin)


def test_tost_mean_of_identical_differences_has_no_width():
    assert tost_mean([0.2, 0.2, 0.2], 0.5) == {
        "p": 0.0, "mean": pytest.approx(0.2), "low": pytest.approx(0.2),
        "high": pytest.approx(0.2), "margin": 0.5, "equivalent": True,
    }  # fmt: skip
    assert tost_mean([0.7, 0.7], 0.5)["p"] == 1.0


def test_paired_log_ratio_is_a_t_interval_of_the_logarithms():
    rng = np.random.default_rng(3)
    b = np.exp(rng.normal(0, 2, size=6))  # values spread over orders of magnitude
    a = 20 * b * np.exp(rng.normal(0, 0.3, size=6))
    logs = np.log(a) - np.log(b)
    lo, hi = stats.t.interval(0.95, 5, loc=logs.mean(), scale=stats.sem(logs))
    ratio = paired_log_ratio(a.tolist(), b.tolist())
    assert ratio == pytest.approx((math.exp(logs.mean()), math.exp(lo), math.exp(hi)))
    scaled = paired_log_ratio((a * b).tolist(), (b * b).tolist())  # a common factor per pair
    assert scaled == pytest.approx(ratio)
    assert paired_log_ratio([20.0, 40.0, 2.0], [1.0, 2.0, 0.1]) == pytest.approx((20, 20, 20))
    one = paired_log_ratio([3.0], [1.5])
    assert one[0] == pytest.approx(2.0) and math.isnan(one[1]) and math.isnan(one[2])


def test_mean_ci_is_the_student_t_interval():
    xs = [1.0, 2.5, 2.0, 4.0]
    lo, hi = stats.t.interval(0.9, 3, loc=np.mean(xs), scale=stats.sem(xs))
    assert mean_ci(xs, 0.9) == pytest.approx((np.mean(xs), lo, hi))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_the_functions_are_deterministic():
    method, ref = _strings(7, 3, 9, 31)
    deltas, a, b = [0.1, -0.2, 0.05, 0.3], [1.0, 3.0, 2.0], [0.5, 1.0, 4.0]
    for call in (
        lambda: paired_rate_difference(method, ref),
        lambda: tost_rates(method, ref, 0.1),
        lambda: tost_mean(deltas, 0.5),
        lambda: paired_log_ratio(a, b),
        lambda: mcnemar(method, ref),
    ):
        assert call() == call()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: wilson(5, 3), "failures"),
        (lambda: wilson(-1, 3), "failures"),
        (lambda: wilson(1, 3, 1.0), "confidence"),
        (lambda: mcnemar("01", "011"), "length"),
        (lambda: mcnemar("0a", "01"), '"0" and "1"'),
        (lambda: mcnemar([True, 2], [True, False]), "bools"),
        (lambda: holm([0.5, 1.5]), r"\[0, 1\]"),
        (lambda: holm([math.nan]), r"\[0, 1\]"),
        (lambda: paired_rate_difference("01", "0"), "length"),
        (lambda: paired_rate_difference("01", "10", 0.0), "confidence"),
        (lambda: paired_rate_difference("01", "10", math.nan), "confidence"),
        (lambda: tost_rates("01", "10", 0.0), "margin"),
        (lambda: tost_rates("01", "10", 1.0), "margin"),
        (lambda: tost_rates("01", "10", 0.1, alpha=0.5), "alpha"),
        (lambda: tost_mean([0.1, 0.2], -1.0), "margin"),
        (lambda: tost_mean([0.1, 0.2], math.inf), "margin"),
        (lambda: tost_mean([0.1], 1.0), "two"),
        (lambda: tost_mean([0.1, math.nan], 1.0), "finite"),
        (lambda: tost_mean([0.1, 0.2], 1.0, alpha=0.0), "alpha"),
        (lambda: paired_log_ratio([1.0, 0.0], [1.0, 2.0]), "positive"),
        (lambda: paired_log_ratio([1.0, 2.0], [-1.0, 2.0]), "positive"),
        (lambda: paired_log_ratio([1.0], [1.0, 2.0]), "length"),
        (lambda: paired_log_ratio([], []), "pair"),
        (lambda: paired_log_ratio([1.0, 2.0], [1.0, 2.0], 1.5), "confidence"),
        (lambda: mean_std([]), "one value"),
        (lambda: mean_ci([1.0, 2.0], 0.0), "confidence"),
    ],
)
def test_bad_input_is_a_user_error(call, match):
    with pytest.raises(UserError, match=match):
        call()
