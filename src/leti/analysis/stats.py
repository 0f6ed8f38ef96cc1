"""Uncertainty of evaluation results: bootstrap confidence intervals over problems and paired tests.

The unit of resampling is the problem, never the sample: the samples of one problem are
correlated, so a problem is one observation (its pass rate c/n, or its counts). Every
statistic is a function of per-problem columns, which covers a mean (pass@k), a ratio of sums
(the share of an outcome among samples) and a micro F1 alike.

Everything is computed by scipy.stats (bootstrap, binomtest, permutation_test) with a fixed
seed, so the same results give the same intervals and p-values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from leti.records import Estimate

CONFIDENCE_LEVEL = 0.95
RESAMPLES = 9999
SEED = 0

# Maps per-problem columns (each of shape (..., problems)) to the statistic along the last axis.
Statistic = Callable[..., np.ndarray]


def mean(values: np.ndarray) -> np.ndarray:
    return np.mean(values, axis=-1)


def ratio_of_sums(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """Sum over problems of one column divided by the sum of another (a share among samples)."""
    totals = np.sum(denominators, axis=-1)
    return np.divide(
        np.sum(numerators, axis=-1), totals, out=np.zeros_like(totals, dtype=float), where=totals > 0
    )


def ratio_of_means(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """Mean over problems of one signed column divided by the mean of another (the share of one shift
    that another keeps); NaN where the denominator's mean is 0."""
    means = np.mean(denominators, axis=-1)
    return np.divide(
        np.mean(numerators, axis=-1), means, out=np.full_like(means, np.nan, dtype=float), where=means != 0
    )


@dataclass(frozen=True)
class PairedComparison:
    """a - b on the same problems: the difference, its paired-bootstrap CI and a paired test's p-value."""

    value_a: float
    value_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    num_problems: int


def estimate(columns: list[np.ndarray], statistic: Statistic = mean) -> Estimate:
    """The statistic of per-problem columns and its 95% bootstrap CI (BCa, scipy's default;
    resampling problems)."""
    data = [np.asarray(column, dtype=float) for column in columns]
    _check_columns(data)
    low, high = _bootstrap_interval(data, statistic)
    return Estimate(value=float(statistic(*data)), ci_low=low, ci_high=high)


def compare(
    columns_a: list[np.ndarray], columns_b: list[np.ndarray], statistic: Statistic = mean
) -> PairedComparison:
    """Compare two policies on the same problems (row i of every column is problem i).

    The CI resamples problems, keeping each problem's pair together (percentile method: a
    difference is mostly zeros, and BCa's acceleration, estimated from a handful of discordant
    problems, overcorrects; with 3 of 16 problems discordant, all one way, BCa gave
    [-0.44, -0.06] against an exact p of 0.25, percentile [-0.38, 0.00]). The p-value is exact
    McNemar (a two-sided binomial test on the discordant problems) when each problem's values
    are a single 0/1 outcome, and otherwise a paired permutation test that swaps a and b
    within problems.
    """
    data_a = [np.asarray(column, dtype=float) for column in columns_a]
    data_b = [np.asarray(column, dtype=float) for column in columns_b]
    _check_columns(data_a + data_b)
    if len(data_a) != len(data_b):
        raise ValueError("both policies need the same per-problem columns")
    width = len(data_a)

    def difference(*columns: np.ndarray) -> np.ndarray:
        return statistic(*columns[:width]) - statistic(*columns[width:])

    value_a, value_b = float(statistic(*data_a)), float(statistic(*data_b))
    low, high = _bootstrap_interval(data_a + data_b, difference, method="percentile")
    if statistic is mean and width == 1 and _is_binary(data_a[0]) and _is_binary(data_b[0]):
        p_value, test = _mcnemar_exact(data_a[0], data_b[0]), "mcnemar-exact"
    else:
        p_value, test = _paired_permutation(data_a, data_b, statistic), "paired-permutation"
    return PairedComparison(
        value_a, value_b, value_a - value_b, low, high, p_value, test, num_problems=len(data_a[0])
    )


def false_discovery_adjusted(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy.stats.false_discovery_control) of one family of
    tests: the share of false discoveries among those with an adjusted p <= q is at most q."""
    p_values = np.asarray(p_values, dtype=float)
    if p_values.size == 0:
        return p_values
    return stats.false_discovery_control(p_values, method="bh")


def _bootstrap_interval(
    data: list[np.ndarray], statistic: Statistic, method: str = "BCa"
) -> tuple[float, float]:
    point = float(statistic(*data))
    if len(data[0]) < 2 or all(np.ptp(column) == 0 for column in data):
        # Every resample is the original: the interval is the point (scipy would give NaN).
        return point, point
    result = _bootstrap(data, statistic, method)
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        # BCa cannot estimate its acceleration on some near-degenerate data; percentile can.
        low, high = _bootstrap(data, statistic, "percentile").confidence_interval
    return float(low), float(high)


def _bootstrap(data: list[np.ndarray], statistic: Statistic, method: str):
    import warnings

    with warnings.catch_warnings():
        # Degenerate resamples are handled by the caller (it falls back to percentile).
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return stats.bootstrap(
            tuple(data),
            lambda *columns, axis=-1: statistic(*columns),
            paired=True,
            vectorized=True,
            n_resamples=RESAMPLES,
            confidence_level=CONFIDENCE_LEVEL,
            method=method,
            rng=np.random.default_rng(SEED),
        )


def _mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, p=0.5).pvalue)


def _paired_permutation(data_a: list[np.ndarray], data_b: list[np.ndarray], statistic: Statistic) -> float:
    """Two-sided test of "a and b are exchangeable within each problem". The samples handed to
    scipy are problem indices into the stacked columns, so that a problem's columns move together
    (scipy would otherwise permute each column on its own)."""
    problems = len(data_a[0])
    stacked = [np.concatenate([a, b]) for a, b in zip(data_a, data_b, strict=True)]
    if problems < 2 or all(np.array_equal(a, b) for a, b in zip(data_a, data_b, strict=True)):
        # One problem has two arrangements, +d and -d, so a two-sided p of 1 (scipy refuses it).
        return 1.0

    def difference(index_a: np.ndarray, index_b: np.ndarray, axis: int = -1) -> np.ndarray:
        index_a, index_b = index_a.astype(int), index_b.astype(int)
        return statistic(*(column[index_a] for column in stacked)) - statistic(
            *(column[index_b] for column in stacked)
        )

    result = stats.permutation_test(
        (np.arange(problems), np.arange(problems, 2 * problems)),
        difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=RESAMPLES,
        alternative="two-sided",
        rng=np.random.default_rng(SEED),
    )
    return float(min(1.0, result.pvalue))


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))


def _check_columns(columns: list[np.ndarray]) -> None:
    if not columns or len(columns[0]) == 0:
        raise ValueError("no problems to compute a statistic over")
    if any(column.ndim != 1 or len(column) != len(columns[0]) for column in columns):
        raise ValueError("every per-problem column needs one value per problem")
