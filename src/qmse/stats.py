"""Small statistics of the training reports: mean ± std over seeds and t-intervals of paired
differences (the escape benchmark's rates use scipy.stats.binomtest's Wilson interval)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _st


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
