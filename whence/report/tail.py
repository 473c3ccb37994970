"""The power-law fit of a query's score tail (Clauset, Shalizi & Newman 2009)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Tail fit: the share of the positive scores (largest first) treated as the power-law tail, and the fewest
# points a fit is attempted on (below it the exponent is reported as nan rather than as noise).
DEFAULT_TAIL_FRACTION = 0.1
MIN_TAIL_POINTS = 5


def fit_power_law_tail(
    values: Sequence[float] | np.ndarray, tail_fraction: float = DEFAULT_TAIL_FRACTION
) -> tuple[float, float]:
    """Fit a power law p(x) ~ x^-alpha to the largest positive values; return (alpha, xmin).

    xmin is the smallest value of the tail, the top `tail_fraction` of the positive values (at least
    MIN_TAIL_POINTS of them). alpha is the continuous maximum-likelihood estimate of Clauset, Shalizi & Newman
    2009 (Eq. 3.1): alpha = 1 + n / sum_i log(x_i / xmin) over the n tail values x_i >= xmin. The complementary
    CDF of the tail then falls as x^-(alpha - 1). Returns (nan, nan) when fewer than MIN_TAIL_POINTS values are
    positive or the tail is degenerate (all equal).
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = np.sort(x[np.isfinite(x) & (x > 0)])[::-1]  # positive values, largest first
    if x.shape[0] < MIN_TAIL_POINTS:
        return math.nan, math.nan
    n = min(x.shape[0], max(MIN_TAIL_POINTS, math.ceil(tail_fraction * x.shape[0])))
    tail = x[:n]
    xmin = float(tail[-1])
    log_ratio_sum = float(np.sum(np.log(tail / xmin)))
    if log_ratio_sum <= 0.0:
        return math.nan, xmin
    return 1.0 + n / log_ratio_sum, xmin
