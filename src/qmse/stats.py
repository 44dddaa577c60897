"""Small statistics used by every report: intervals for rates and for paired differences."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _st


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sound at rates near 0 and 1)."""
    if n <= 0:
        return (0.0, 1.0)
    z = _st.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def mean_ci(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval; (m, nan, nan) with fewer than two values."""
    m, s = mean_std(xs)
    n = len(xs)
    if n < 2:
        return m, math.nan, math.nan
    half = _st.t.ppf(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    return m, m - half, m + half
