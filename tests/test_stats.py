"""The statistics against closed forms and against scipy called directly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from leti.analysis import stats


def test_identical_policies_differ_by_zero_with_a_ci_containing_zero() -> None:
    rng = np.random.default_rng(3)
    for scores in (rng.integers(0, 2, 40).astype(float), rng.integers(0, 5, 40) / 4):
        comparison = stats.compare([scores], [scores.copy()])
        assert comparison.difference == 0.0
        assert comparison.ci_low <= 0.0 <= comparison.ci_high
        assert comparison.p_value == 1.0


@pytest.mark.parametrize("problems", [6, 10, 30])
def test_solving_every_problem_the_other_fails_is_significant_once_there_are_enough(problems: int) -> None:
    solved_by_a = np.ones(problems)
    solved_by_b = np.zeros(problems)
    comparison = stats.compare([solved_by_a], [solved_by_b])
    # Exact McNemar: every problem discordant in a's favour, p = 2 * 0.5^m.
    assert comparison.test == "mcnemar-exact"
    assert comparison.p_value == pytest.approx(2 * 0.5**problems)
    assert comparison.p_value < 0.05
    assert comparison.difference == 1.0


def test_too_few_problems_are_not_significant() -> None:
    assert stats.compare([np.ones(5)], [np.zeros(5)]).p_value > 0.05


def test_one_problem_with_a_non_binary_score_has_p_1() -> None:
    comparison = stats.compare([np.array([0.75])], [np.array([0.25])])
    assert comparison.test == "paired-permutation"
    assert comparison.p_value == 1.0
    assert comparison.difference == pytest.approx(0.5)
    assert comparison.ci_low == comparison.ci_high == pytest.approx(0.5)


def test_mcnemar_counts_only_discordant_problems() -> None:
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0] * 3, dtype=float)
    b = np.array([1, 0, 0, 0, 0, 1, 1, 0, 1, 0] * 3, dtype=float)
    comparison = stats.compare([a], [b])
    only_a, only_b = 4 * 3, 1 * 3
    assert comparison.p_value == pytest.approx(scipy_stats.binomtest(only_a, only_a + only_b).pvalue)
    assert comparison.difference == pytest.approx((only_a - only_b) / 30)


def test_pass_rates_use_a_paired_permutation_test_matching_scipy() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 5, 60) / 4
    b = np.clip(a - rng.integers(0, 2, 60) / 4, 0, 1)
    comparison = stats.compare([a], [b])
    reference = scipy_stats.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=stats.RESAMPLES,
        rng=np.random.default_rng(stats.SEED),
    )
    assert comparison.test == "paired-permutation"
    assert comparison.p_value == pytest.approx(reference.pvalue, abs=0.01)
    assert comparison.p_value < 0.05
    assert comparison.ci_low > 0


def test_estimate_is_scipys_bootstrap_over_problems() -> None:
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 2, 80).astype(float)
    estimate = stats.estimate([scores])
    reference = scipy_stats.bootstrap(
        (scores,), np.mean, n_resamples=stats.RESAMPLES, rng=np.random.default_rng(stats.SEED)
    ).confidence_interval
    assert estimate.value == pytest.approx(scores.mean())
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((reference.low, reference.high), abs=0.02)
    # A 95% interval for a proportion near 0.5 over 80 problems is about +-0.11 (the normal approximation).
    half_width = 1.96 * np.sqrt(scores.mean() * (1 - scores.mean()) / 80)
    assert (estimate.ci_high - estimate.ci_low) / 2 == pytest.approx(half_width, rel=0.15)


def test_a_share_is_a_ratio_of_sums_resampled_by_problem() -> None:
    errors = np.array([0, 1, 2, 0, 4, 1, 0, 0, 3, 1] * 4, dtype=float)
    samples = np.full(40, 4.0)
    estimate = stats.estimate([errors, samples], stats.ratio_of_sums)
    assert estimate.value == pytest.approx(errors.sum() / samples.sum())
    assert estimate.ci_low < estimate.value < estimate.ci_high


def test_a_constant_column_has_a_point_interval() -> None:
    estimate = stats.estimate([np.zeros(12)])
    assert (estimate.value, estimate.ci_low, estimate.ci_high) == (0.0, 0.0, 0.0)


def test_columns_must_pair_problem_by_problem() -> None:
    with pytest.raises(ValueError, match="one value per problem"):
        stats.compare([np.ones(4)], [np.ones(5)])
    with pytest.raises(ValueError, match="no problems"):
        stats.estimate([np.array([])])


def test_a_few_discordant_problems_give_a_difference_ci_that_agrees_with_the_exact_test() -> None:
    # 3 of 16 problems solved by b only: McNemar p = 0.25, so the 95% CI must not exclude 0.
    a = np.array([0, 0, 0] + [1] * 8 + [0] * 5, dtype=float)
    b = np.array([1, 1, 1] + [1] * 8 + [0] * 5, dtype=float)
    comparison = stats.compare([a], [b])
    assert comparison.p_value == pytest.approx(0.25)
    assert comparison.difference == pytest.approx(-3 / 16)
    assert comparison.ci_low < -3 / 16 and comparison.ci_high >= 0.0


def test_a_family_of_one_test_is_its_own_adjustment_and_larger_ones_are_raised() -> None:
    assert stats.false_discovery_adjusted(np.array([0.03])).tolist() == [0.03]
    assert stats.false_discovery_adjusted(np.array([])).size == 0
    assert stats.false_discovery_adjusted(np.array([0.01, 0.04, 0.03])) == pytest.approx([0.03, 0.04, 0.04])
