"""The study's statistics against values worked by hand and by scipy on fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from finetune.study.stats import bootstrap, corrected_t, holm, images_to_resolve, mcnemar_exact


def test_corrected_t_matches_the_hand_worked_nadeau_bengio_interval():
    # Five folds, 320 training and 80 test images: var = (1/5 + 80/320) * s^2 = 0.45 s^2.
    scores = [0.80, 0.85, 0.75, 0.90, 0.80]
    mean, s2 = 0.82, 0.00325  # s^2 = (0.0004 + 0.0009 + 0.0049 + 0.0064 + 0.0004) / 4
    scale = math.sqrt(0.45 * s2)  # 0.038243...
    critical = 2.7764451051977987  # t(0.975, 4)
    estimate = corrected_t(scores, n_train=320, n_test=80)
    assert estimate.mean == pytest.approx(mean)
    assert estimate.low == pytest.approx(mean - critical * scale)
    assert estimate.high == pytest.approx(mean + critical * scale)
    assert estimate.half_width == pytest.approx(0.10618, abs=1e-4)
    assert estimate.p == pytest.approx(2 * scipy_stats.t.sf(mean / scale, 4))
    assert estimate.n == 5


def test_corrected_t_is_wider_than_the_plain_t_interval():
    scores = [0.03, 0.06, 0.01, 0.04, 0.01]
    plain = scipy_stats.t.interval(0.95, 4, loc=np.mean(scores), scale=scipy_stats.sem(scores))
    corrected = corrected_t(scores, n_train=320, n_test=80)
    # The correction multiplies the variance by (1/5 + 1/4) / (1/5) = 2.25: the interval by 1.5.
    assert corrected.half_width == pytest.approx(1.5 * (plain[1] - plain[0]) / 2)
    # Here the plain interval excludes zero, the corrected one does not: overlapping training sets fool the first.
    assert plain[0] > 0
    assert not corrected.excludes_zero and corrected.p > 0.05


def test_mcnemar_exact_is_the_binomial_test_on_discordant_images():
    a = [True] * 10 + [True] * 7 + [False] * 2 + [False] * 5  # 7 only A right, 2 only B right
    b = [True] * 10 + [False] * 7 + [True] * 2 + [False] * 5
    # By hand: 2 * P(X <= 2), X ~ Bin(9, 1/2) = 2 * (1 + 9 + 36) / 512 = 0.1796875.
    assert mcnemar_exact(a, b) == pytest.approx(0.1796875)
    assert mcnemar_exact(a, b) == pytest.approx(scipy_stats.binomtest(2, 9, 0.5).pvalue)
    assert mcnemar_exact(a, a) == 1.0


def test_holm_adjustment_matches_the_hand_computation():
    # Four tested comparisons (None: one without a p-value, outside the family). Sorted: 0.005, 0.01, 0.03, 0.04,
    # times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04; step-down keeps them non-decreasing, so the last is 0.06 too.
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]  # a family of one is not adjusted


def test_bootstrap_interval_of_an_accuracy_is_near_the_normal_approximation():
    correct = np.array([1] * 60 + [0] * 20, dtype=float)  # 0.75 on 80 images
    estimate = bootstrap(lambda idx: correct[idx].mean(), len(correct), seed=0)
    half = 1.96 * math.sqrt(0.75 * 0.25 / 80)  # 0.0949
    assert estimate.mean == pytest.approx(0.75)
    assert estimate.low == pytest.approx(0.75 - half, abs=0.015)
    assert estimate.high == pytest.approx(0.75 + half, abs=0.015)
    assert estimate.p == 0.0  # no resample of an accuracy is <= 0


def test_images_to_resolve_scales_as_the_square_of_the_interval():
    # A +-6 point interval around a 3 point difference: four times the images halve it.
    assert images_to_resolve(400, 0.06, 0.03) == 1600
    assert images_to_resolve(400, 0.06, 0.0) is None
