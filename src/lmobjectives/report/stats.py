"""Means with 95% intervals over seeds, and Welch's t-test between two sets of seeds.

Every number in the comparison report is the mean over N seeds (each seed sets model
initialisation, data order and objective randomness) with a 95% Student-t interval,
``mean ± t(0.975, N-1) * s / sqrt(N)``. Two objectives differ measurably when Welch's
interval for the difference of their means excludes 0 (two-sided test at 5%, unequal
variances, Welch–Satterthwaite degrees of freedom). With one seed there is no interval and
no difference is called.

Trade-off: Welch over seeds asks only for independent seeds and treats everything a seed
changes as noise; with 2-3 seeds its intervals are wide (t(0.975, 1) = 12.71), so a call it
makes is a strong one and "no measurable difference" often means "too few seeds".

Worked example::

    interval([1.0, 2.0, 3.0]) -> Interval(mean=2.0, low=-0.484..., high=4.484..., n=3)
    welch([1, 2, 3], [11, 12, 13]).significant -> True  (difference -10 ± 2.77)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1..30 (standard tables, e.g.
# NIST/SEMATECH e-Handbook §1.3.6.7.2); beyond 30 the normal quantile 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t975(df: float) -> float:
    """t(0.975, df); a fractional df (Welch) interpolates linearly in 1/df between table rows."""
    if df <= 0 or math.isnan(df):
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if df >= len(_T975):
        return Z975 + (_T975[-1] - Z975) * len(_T975) / df  # t ≈ z + c/df for large df
    if df < 1:
        return _T975[0] * (1 / df)  # only a degenerate Welch df falls here: stay conservative
    lo = int(math.floor(df))
    if lo == df:
        return _T975[lo - 1]
    hi = lo + 1
    w = (1 / df - 1 / hi) / (1 / lo - 1 / hi)
    return w * _T975[lo - 1] + (1 - w) * _T975[hi - 1]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None with fewer than two samples
    high: float | None
    n: int

    @property
    def half(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, (sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan"))


def interval(samples: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval of ``samples`` (one value per seed)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples")
    m, var = _mean_var(xs)
    if len(xs) < 2:
        return Interval(m, None, None, len(xs))
    half = t975(len(xs) - 1) * math.sqrt(var / len(xs))
    return Interval(m, m - half, m + half, len(xs))


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's 95% interval; ``significant`` when it excludes 0."""

    diff: float
    low: float | None
    high: float | None

    @property
    def significant(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)  # type: ignore[operator]


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Welch's two-sample interval for mean(a) - mean(b)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(ma - mb, None, None)
    sa, sb = va / len(a), vb / len(b)
    se = math.sqrt(sa + sb)
    if se == 0:  # identical seeds on both sides: the difference is exact
        return Difference(ma - mb, ma - mb, ma - mb)
    df = (sa + sb) ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (len(b) - 1))
    half = t975(df) * se
    return Difference(ma - mb, ma - mb - half, ma - mb + half)
