"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): do summed scores predict retraining?

Retrain the model on M random subsets S_1..S_M of the N training sequences (each a fraction F of them) and
measure every query's f_m(q) = log p(completion | prompt) under model m. A method's prediction for subset m is
the sum of its scores over the subset's sequences,
    g_m(q) = sum_{n in S_m} I(q, n)                          (M, Q) = masks (M, N) @ scores (Q, N)^T
and the score of query q is the rank correlation over subsets, LDS(q) = Spearman_m(g_m(q), f_m(q)). Why the sum:
to first order, removing R from the training set moves f by -sum_{n in R} I(q, n), so
f_m ~ f_full - sum_all I + g_m: the measured f is increasing in g_m, with slope 1 (a rank correlation
needs only the ordering). The reported LDS is the mean over queries, with its standard error over queries
std(LDS(q), ddof=1) / sqrt(Q').

Constant columns: when a query's predictions g_m(q) are equal for every subset (e.g. all its scores are zero),
or its measurements f_m(q) are (a model that never changes), Spearman is undefined (0 / 0). Such a query gets
LDS(q) = NaN (None in JSON), is left out of the mean and the standard error, and is counted in `undefined`;
when no query is defined the LDS itself is NaN. We never substitute 0, which would bias the mean towards 0.

Seeds: with S training seeds per subset, measurements are (M, S, Q); LDS correlates with their mean over
seeds. `noise_figures` says whether retraining noise leaves anything to measure: the across-subsets spread
(std over m of the seed-mean f, averaged over queries) should clearly exceed the across-seeds spread (std over
seeds of f for one subset, averaged over subsets and queries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from whence.evaluation.errors import EvaluationError

DEFAULT_SUBSETS = 50
DEFAULT_FRACTION = 0.5


def check_fraction(fraction: float) -> float:
    """The subset fraction F, which must lie strictly inside (0, 1)."""
    if not 0.0 < float(fraction) < 1.0:
        raise EvaluationError(f"--fraction must lie strictly between 0 and 1, got {fraction}")
    return float(fraction)


def sample_subsets(num_sequences: int, num_subsets: int, fraction: float, seed: int = 0) -> np.ndarray:
    """(M, N) bool masks, each holding exactly round(F * N) sequences (at least 1, at most N - 1), drawn
    without replacement by a numpy Generator seeded with `seed`: the same arguments give the same subsets,
    on any machine. Subset m is the m-th draw, so the first M' subsets of a larger M are the same."""
    fraction = check_fraction(fraction)
    if num_sequences < 2:
        raise EvaluationError(f"LDS needs at least 2 training sequences to form subsets, got {num_sequences}")
    if num_subsets < 2:
        raise EvaluationError(f"LDS needs at least 2 subsets for a rank correlation, got {num_subsets}")
    size = min(max(round(fraction * num_sequences), 1), num_sequences - 1)
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, num_sequences), dtype=bool)
    for m in range(num_subsets):
        masks[m, rng.permutation(num_sequences)[:size]] = True
    return masks


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(M, Q) g_m(q) = sum of query q's scores over subset m, from scores (Q, N) and masks (M, N)."""
    scores, masks = np.asarray(scores, dtype=np.float64), np.asarray(masks, dtype=bool)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores (Q, N) and masks (M, N) must share N, got {scores.shape} and {masks.shape}")
    return masks.astype(np.float64) @ scores.T


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation of column q of x (M, Q) with column q of y (M, Q): the Pearson correlation
    of their ranks (ties get their average rank); NaN for a column where x or y is constant."""
    return pearson_columns(rankdata(x, axis=0), rankdata(y, axis=0))


def pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(Q,) Pearson correlation of matching columns of x and y (M, Q); NaN where a column is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, dtype=np.float64) - np.mean(y, axis=0)
    norms = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))  # (Q,)
    # Exactly equal values only: a column that varies by rounding is data, and its correlation is reported.
    constant = (np.ptp(x, axis=0) == 0) | (np.ptp(y, axis=0) == 0) | (norms == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (x * y).sum(axis=0) / norms
    return np.where(constant, np.nan, np.clip(values, -1.0, 1.0))


@dataclass
class LDSResult:
    """One method's LDS: the mean over defined queries, its standard error, and every query's value."""

    lds: float
    stderr: float
    per_query: list[float]  # NaN where Spearman is undefined (a constant column)
    undefined: int  # queries left out of the mean

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        clean = lambda v: None if v is None or math.isnan(v) else float(v)  # noqa: E731
        return {"lds": clean(self.lds), "stderr": clean(self.stderr),
                "per_query": [clean(v) for v in self.per_query], "undefined": self.undefined}


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """(mean, std(ddof=1) / sqrt(n)) of the finite values; NaN when there are none (stderr: fewer than 2)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    stderr = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else math.nan
    return float(finite.mean()), stderr


def linear_datamodeling_score(scores: np.ndarray, masks: np.ndarray, measured: np.ndarray) -> LDSResult:
    """LDS of scores (Q, N) given subset masks (M, N) and measured f (M, Q), or (M, S, Q) with S seeds per
    subset (averaged over seeds). Invariant to any positive rescaling of the scores."""
    measured = np.asarray(measured, dtype=np.float64)
    if measured.ndim == 3:
        measured = measured.mean(axis=1)
    predicted = subset_predictions(scores, masks)  # (M, Q)
    if measured.shape != predicted.shape:
        raise ValueError(f"measured f must be (M, Q) = {predicted.shape}, got {measured.shape}")
    per_query = spearman_columns(predicted, measured)  # (Q,)
    lds, stderr = mean_and_stderr(per_query)
    return LDSResult(lds, stderr, per_query.tolist(), int(np.isnan(per_query).sum()))


def paired_difference(method: LDSResult, baseline: LDSResult) -> dict:
    """Method minus baseline, query by query, over the queries where both are defined: the mean difference of
    per-query LDS, its standard error (the pairing removes the spread between queries that both share, so this
    is the figure that says whether one method beats another on the same queries), and how many queries each
    side wins."""
    a, b = np.asarray(method.per_query, dtype=np.float64), np.asarray(baseline.per_query, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    mean, stderr = mean_and_stderr(a[both] - b[both])
    clean = lambda v: None if math.isnan(v) else v  # noqa: E731
    return {"mean_difference": clean(mean), "stderr": clean(stderr), "queries": int(both.sum()),
            "better": int((a[both] > b[both]).sum()), "worse": int((a[both] < b[both]).sum())}


def noise_figures(measured: np.ndarray) -> dict:
    """{"across_subsets_std", "across_seeds_std"} of measured f, (M, Q) or (M, S, Q).

    across_subsets_std: per query, the std (ddof=1) over subsets of the seed-mean f; averaged over queries.
    across_seeds_std: per (subset, query), the std (ddof=1) over its S seeds; averaged; None when S = 1.
    """
    measured = np.asarray(measured, dtype=np.float64)
    if measured.ndim == 2:
        measured = measured[:, None, :]
    if measured.ndim != 3 or measured.shape[0] < 2:
        raise ValueError(f"measured f must be (M, Q) or (M, S, Q) with M >= 2, got {measured.shape}")
    across_subsets = float(measured.mean(axis=1).std(axis=0, ddof=1).mean())
    across_seeds = float(measured.std(axis=1, ddof=1).mean()) if measured.shape[1] > 1 else None
    return {"across_subsets_std": across_subsets, "across_seeds_std": across_seeds}
