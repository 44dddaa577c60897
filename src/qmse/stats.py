"""The project's statistics, in one place, built on scipy.stats.

Both halves of qmse compare methods on paired data: the training grid runs every loss from
the same seeds (same initial weights, same batches), the escape benchmark every method from
the same starts (common random numbers). Pairing removes the seed's or the start's own effect,
so every comparison here is a paired one:

- seed-level values of the training reports (`qmse.report`): `mean_std`, `mean_ci` (Student
  t), `paired_log_ratio` (the geometric-mean ratio of positive values), `tost_mean`
  (equivalence of a paired mean difference);
- failure rates of the escape benchmark (`qmse.escape.report`): `wilson` (the interval of one
  rate), `mcnemar` (exact test of two paired rates), `holm` (multiplicity),
  `paired_rate_difference` (Newcombe's interval for the difference of two paired rates) and
  `tost_rates` (their equivalence within a margin).

Paired binary outcomes are given per start as a string of "0"/"1" (a results row's "failed",
kept in the benchmark's rows/) or as a sequence of bools, 1/True where the run failed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _st

from qmse.errors import UserError

Outcomes = str | Sequence[bool]  # per start: "1"/True failed, "0"/False succeeded


def _check_level(name: str, value: float, upper: float = 1.0) -> None:
    """A confidence level (or test level) must lie strictly inside (0, upper)."""
    if not 0 < value < upper:
        raise UserError(f"{name} must lie strictly between 0 and {upper:g}, not {value!r}")


def _check_margin(margin: float, upper: float = math.inf) -> None:
    """An equivalence margin must be positive (and below `upper`, finite)."""
    if not 0 < margin < upper:
        bound = " and finite" if upper == math.inf else f" and below {upper:g}"
        raise UserError(f"the equivalence margin must be positive{bound}, not {margin!r}")


def _check_finite(name: str, xs: Sequence[float]) -> None:
    """NaN or ±inf (a diverged run) has no place in a mean or a t-interval."""
    if not all(math.isfinite(x) for x in xs):
        raise UserError(f"{name} holds a value that is not finite: drop the diverged runs first")


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(xs)
    if n == 0:
        raise UserError("mean_std needs at least one value, got none")
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def mean_ci(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval; (m, nan, nan) with fewer than two values."""
    _check_level("confidence", confidence)
    m, s = mean_std(xs)
    n = len(xs)
    if n < 2:
        return m, math.nan, math.nan
    half = _st.t.ppf(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    return m, m - half, m + half


def paired_log_ratio(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Geometric-mean ratio of paired positive values a_i / b_i, with the Student-t interval
    of the mean of log(a_i / b_i), exponentiated: (ratio, lo, hi); lo = hi = nan from a
    single pair (as `mean_ci`).

    Why: values such as a training ½‖r‖² differ 20× between runs, so a mean of differences
    is ruled by the largest ones; a ratio per seed is scale-free, and its logarithm is the
    scale on which a t-interval is symmetric. Zero or negative values have no logarithm and
    are refused (UserError)."""
    if len(a) != len(b):
        raise UserError(f"paired values differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise UserError("paired_log_ratio needs at least one pair, got none")
    _check_finite("the paired values", [*a, *b])
    if min(*a, *b) <= 0:
        raise UserError(
            "paired_log_ratio needs positive values (a ratio of logarithms): "
            f"got {min(*a, *b)!r}; compare differences (tost_mean) instead"
        )
    m, lo, hi = mean_ci([math.log(x) - math.log(y) for x, y in zip(a, b)], confidence)
    return math.exp(m), math.exp(lo), math.exp(hi)


def tost_mean(deltas: Sequence[float], margin: float, alpha: float = 0.05) -> dict:
    """Equivalence of a paired mean difference to 0 within ±margin: Schuirmann's two
    one-sided t-tests (scipy.stats.ttest_1samp) of H0 mean ≤ −margin and H0 mean ≥ margin.

    Why: "no significant difference" is not evidence of no difference; equivalence is shown
    only when both one-sided nulls are rejected. Returns p (the larger one-sided p-value),
    mean, low and high (the 1 − 2α Student-t interval, which lies inside (−margin, margin)
    exactly when p < α), margin and equivalent (p < α). With every difference the same the
    interval has no width and p is 0 inside the margin, 1 outside."""
    _check_margin(margin)
    _check_level("alpha", alpha, 0.5)
    if len(deltas) < 2:
        raise UserError(f"tost_mean needs at least two paired differences, got {len(deltas)}")
    _check_finite("the paired differences", deltas)
    m, lo, hi = mean_ci(deltas, 1 - 2 * alpha)
    if max(deltas) == min(deltas):  # no spread: the t statistics are ±inf or 0/0
        lo = hi = m
        p = 0.0 if -margin < m < margin else 1.0
    else:
        p_low = _st.ttest_1samp(deltas, -margin, alternative="greater").pvalue
        p_high = _st.ttest_1samp(deltas, margin, alternative="less").pvalue
        p = float(max(p_low, p_high))
    return {"p": p, "mean": m, "low": lo, "high": hi, "margin": margin, "equivalent": p < alpha}


def wilson(failures: int, seeds: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of failures / seeds; (0, 1) when there are no seeds."""
    _check_level("confidence", confidence)
    if not 0 <= failures <= seeds:
        raise UserError(f"failures must lie in [0, seeds]: got {failures} of {seeds}")
    if seeds == 0:
        return (0.0, 1.0)
    ci = _st.binomtest(failures, seeds).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def _outcomes(name: str, failed: Outcomes) -> list[bool]:
    """Per-start failures as bools, from a "0"/"1" string or a sequence of bools (or 0/1)."""
    if isinstance(failed, str):
        if set(failed) - {"0", "1"}:
            raise UserError(f'{name} must hold only "0" and "1" (one per start): {failed!r}')
        return [c == "1" for c in failed]
    if not all(x in (0, 1) for x in failed):  # True == 1, False == 0
        raise UserError(f"{name} must hold bools (or 0/1), one per start")
    return [bool(x) for x in failed]


def _paired_table(failed: Outcomes, failed_ref: Outcomes) -> tuple[int, int, int, int]:
    """The 2x2 table of paired outcomes: (both failed, only the method failed, only the
    reference failed, neither failed)."""
    x, y = _outcomes("failed", failed), _outcomes("failed_ref", failed_ref)
    if len(x) != len(y):
        raise UserError(
            f"paired outcomes differ in length: {len(x)} vs {len(y)} "
            "(give one outcome per start, for the same starts)"
        )
    both = sum(a and b for a, b in zip(x, y))
    worse = sum(a and not b for a, b in zip(x, y))
    better = sum(b and not a for a, b in zip(x, y))
    return both, worse, better, len(x) - both - worse - better


def mcnemar(failed: Outcomes, failed_ref: Outcomes) -> dict:
    """McNemar's exact test of a method against a reference on the same starts. `failed`,
    `failed_ref`: one character per start, "1" failed, "0" succeeded (or bools). Returns
    worse (b: the method failed where the reference succeeded), better (c: the reverse) and
    the two-sided exact p-value of b against Binomial(b + c, ½) (1 when there is no
    discordant start): under the null hypothesis each discordant start is equally likely
    to go either way."""
    _, worse, better, _ = _paired_table(failed, failed_ref)
    p = _st.binomtest(better, worse + better, 0.5).pvalue if worse + better else 1.0
    return {"worse": worse, "better": better, "p": float(p)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values becomes
    max over j ≤ i of min(1, (m − j + 1)·p_(j)); returned in the input's order. It keeps
    the chance of any false rejection among all m tests at most α, whatever their
    dependence."""
    if not all(0 <= p <= 1 for p in pvalues):
        raise UserError(f"p-values must lie in [0, 1]: {list(pvalues)!r}")
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _phi(both: int, worse: int, better: int, neither: int) -> float:
    """Newcombe's (1998) correlation of the paired table for method 10: the phi coefficient
    with its positive part shrunk by n/2, max(AD − BC − n/2, 0)/√(margins), negative values
    kept; 0 when a margin is empty (one of the two rates is 0 or 1)."""
    margins = (both + worse) * (better + neither) * (both + better) * (worse + neither)
    if margins == 0:
        return 0.0
    n = both + worse + better + neither
    cross = both * neither - worse * better
    return (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)


def paired_rate_difference(
    failed: Outcomes, failed_ref: Outcomes, confidence: float = 0.95
) -> tuple[float, float, float]:
    """The difference of two failure rates measured on the same starts, method − reference,
    with Newcombe's (1998) hybrid score interval for paired proportions ("method 10",
    Statistics in Medicine 17:2635): (diff, lo, hi).

    Why this interval: the two rates come from the same starts, so they are correlated and
    an unpaired interval has the wrong width (too wide when they move together); the Wald
    interval of the paired difference collapses to zero width without discordant starts
    and leaves [−1, 1] near the edges. Newcombe's interval squares and adds the distances
    of each rate to its own Wilson limits (good coverage for small n and rates near 0 or
    1), less twice their product times the phi correlation of the 2x2 table (`_phi`). It
    stays inside [−1, 1] and keeps a width where the Wald interval has none: with no
    discordant start it narrows as the concordant starts correlate the two rates; when no
    start fails it is ±(the Wilson upper limit of 0 of n), when every start fails ±(1 − the
    Wilson lower limit of n of n). With no start at all the difference is nan and the
    interval (−1, 1): nothing is known."""
    _check_level("confidence", confidence)
    both, worse, better, neither = _paired_table(failed, failed_ref)
    n = both + worse + better + neither
    if n == 0:
        return math.nan, -1.0, 1.0
    p1, p2 = (both + worse) / n, (both + better) / n
    l1, u1 = wilson(both + worse, n, confidence)
    l2, u2 = wilson(both + better, n, confidence)
    phi = _phi(both, worse, better, neither)
    # the lower limit pairs the method's distance down with the reference's distance up
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = (worse - better) / n
    return diff, diff - down, diff + up


def tost_rates(failed: Outcomes, failed_ref: Outcomes, margin: float, alpha: float = 0.05) -> dict:
    """Equivalence of two failure rates measured on the same starts within ±margin, by
    interval inclusion: equivalent when the 1 − 2α paired interval of their difference
    (`paired_rate_difference`) lies inside (−margin, margin), the interval form of two
    one-sided tests at level α each.

    Why: McNemar's test can say that two methods differ, never that they do not; this says
    that any difference is smaller than a margin stated in advance. Returns diff, low, high,
    margin and equivalent. The margin must lie in (0, 1): a rate difference lies in
    [−1, 1], so a margin of 1 or more would call any two methods equivalent."""
    _check_margin(margin, 1.0)
    _check_level("alpha", alpha, 0.5)
    diff, lo, hi = paired_rate_difference(failed, failed_ref, 1 - 2 * alpha)
    equivalent = -margin < lo and hi < margin
    return {"diff": diff, "low": lo, "high": hi, "margin": margin, "equivalent": equivalent}
