"""The statistics of a depth study: intervals on accuracy and paired comparisons between points.

Two designs, two sets of methods (as in the literature on comparing learners):

- k-fold cross-validation (`data.folds=K`): one score per fold. The folds' training sets overlap, so the plain
  t-interval over folds is too narrow; the corrected resampled t-test (Nadeau & Bengio 2003, as used by Bouckaert
  & Frank 2004) inflates the variance by n_test / n_train: var = (1/K + n_test/n_train) * s^2, t with K - 1 degrees
  of freedom. A paired comparison applies it to the per-fold differences.
- one fixed split (seeds on the same test images): a percentile bootstrap over test images for intervals, and
  McNemar's exact test (a binomial test on the images exactly one of the two gets right) for paired p-values.

The comparisons of one study are a family: their p-values are Holm-adjusted (`holm`) before any is called
significant.

Every function is plain numpy/scipy on fixed inputs, checked against scipy and hand-worked values in
tests/test_stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the level a Holm-adjusted p-value is held to
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under a point between seeds of the resampler


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval and, for a difference, the p-value of "no difference".

    Attributes:
        mean: the estimate (a mean accuracy, or a mean difference).
        low, high: the ends of the interval (CONFIDENCE, 95%).
        p: two-sided p-value of a zero mean; None where not computed.
        n: what the estimate is over (folds, or test images).
    """

    mean: float
    low: float
    high: float
    p: float | None = None
    n: int = 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """The interval excludes zero. Unadjusted: a study calls a difference significant by its Holm-adjusted
        p-value (`finetune.study.analysis.Comparison.significant`)."""
        return self.low > 0 or self.high < 0

    def __neg__(self) -> Estimate:
        """The same difference the other way round (b - a for a - b)."""
        return Estimate(-self.mean, -self.high, -self.low, self.p, self.n)


def corrected_t(values: Sequence[float], n_train: float, n_test: float, confidence: float = CONFIDENCE) -> Estimate:
    """The corrected resampled t-interval and p-value of the mean of per-fold scores (or per-fold differences).

    Args:
        values: one score (or paired difference) per fold.
        n_train: images the models trained on, per fold (the mean over folds).
        n_test: images tested, per fold.
        confidence: the interval's coverage.

    Returns:
        The mean, its interval and the two-sided p-value of a zero mean; with one fold, an unbounded interval.
    """
    x = np.asarray(values, dtype=float)
    k, mean = len(x), float(np.mean(x)) if len(x) else math.nan
    if k < 2:
        return Estimate(mean, -math.inf, math.inf, None, k)
    variance = (1 / k + n_test / n_train) * float(np.var(x, ddof=1))
    scale = math.sqrt(variance)
    critical = float(scipy_stats.t.ppf(0.5 + confidence / 2, k - 1))
    if scale == 0:  # every fold gave the same value
        return Estimate(mean, mean, mean, 1.0 if mean == 0 else 0.0, k)
    p = 2 * float(scipy_stats.t.sf(abs(mean) / scale, k - 1))
    return Estimate(mean, mean - critical * scale, mean + critical * scale, p, k)


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """A percentile bootstrap interval (`scipy.stats.bootstrap`) of `statistic` over n items (test images).

    Args:
        statistic: maps an index array (which items, with repeats) to a number; the estimate is its value on
            every item once.
        n: the number of items.

    Returns:
        The statistic on all items, the percentile interval, and (for a difference) a two-sided bootstrap p-value:
        twice the share of resamples on the far side of zero.
    """
    everything = float(statistic(np.arange(n)))
    if n < 2:  # scipy needs two items to resample
        return Estimate(everything, -math.inf, math.inf, None, n)
    # The items are resampled as their indices, so a statistic can pair them with anything (labels, seeds).
    result = scipy_stats.bootstrap(
        (np.arange(n),),
        statistic,
        n_resamples=resamples,
        vectorized=False,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    draws = result.bootstrap_distribution
    p = min(1.0, 2 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0))))
    interval = result.confidence_interval
    return Estimate(everything, float(interval.low), float(interval.high), p, n)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """McNemar's exact test: the two-sided p-value that A and B are equally accurate on the same images.

    Only the images exactly one of them gets right count: under "equally accurate" each of those is A's with
    probability 1/2, so the p-value is a two-sided binomial test (`scipy.stats.binomtest`) on them.
    """
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: not tested, left out of the family).

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)): it controls the chance of
    any false "significant" in the family at the nominal level, without assuming the tests independent. scipy has
    only the false-discovery-rate adjustments (`scipy.stats.false_discovery_control`).
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def images_to_resolve(n_images: int, half_width: float, difference: float) -> int | None:
    """Roughly how many images would make an interval of `half_width` narrow enough to exclude zero for a true
    difference of `difference`, assuming the half-width shrinks as 1/sqrt(images); None for no difference."""
    if not difference or not math.isfinite(half_width):
        return None
    return math.ceil(n_images * (half_width / abs(difference)) ** 2)
