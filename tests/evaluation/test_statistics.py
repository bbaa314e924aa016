"""Seed statistics: the t quantile against published values, the incomplete beta against closed
forms, and the paired difference against a hand computation."""

import math

import pytest

from synthunlearn.evaluation.statistics import (paired_difference, regularized_incomplete_beta, t_critical,
                                                t_two_sided_p)


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (11, 2.2010), (30, 2.0423),
                                         (120, 1.9799)])
def test_t_critical_matches_the_published_table(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=1e-4)


def test_t_critical_other_levels_and_the_normal_limit():
    assert t_critical(10, 0.99) == pytest.approx(3.1693, abs=1e-4)
    assert t_critical(4, 0.90) == pytest.approx(2.1318, abs=1e-4)
    assert t_critical(1e6) == pytest.approx(1.959964, abs=1e-5)   # z_{0.975}
    # The Cauchy case (df 1) has a closed form: P(|T| > t) = 1 - 2 atan(t) / pi.
    for t in (0.3, 1.0, 4.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        t_critical(5, 1.5)
    with pytest.raises(ValueError, match="df"):
        t_two_sided_p(1.0, 0)


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.5, 1.0), (1.0, 3.5), (0.5, 0.5), (7.0, 0.5)])
def test_incomplete_beta_closed_forms(a, b):
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        value = regularized_incomplete_beta(a, b, x)
        if b == 1.0:
            assert value == pytest.approx(x ** a, abs=1e-12)
        if a == 1.0:
            assert value == pytest.approx(1 - (1 - x) ** b, abs=1e-12)
        if a == b == 0.5:   # the arcsine distribution
            assert value == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)
        # Symmetry I_x(a, b) = 1 - I_{1-x}(b, a), across the branch the code switches at.
        assert value == pytest.approx(1 - regularized_incomplete_beta(b, a, 1 - x), abs=1e-12)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(a, b, 1.5)


def test_paired_difference_by_hand():
    a = {0: 0.50, 1: 0.60, 2: 0.40, 3: 0.45}
    b = {0: 0.40, 1: 0.40, 2: 0.45, 3: 0.45, 9: 0.99}   # seed 9 has no partner: left out
    stats = paired_difference(a, b)
    diffs = [0.10, 0.20, -0.05, 0.0]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert stats["n"] == 4 and stats["seeds"] == [0, 1, 2, 3]
    assert stats["mean"] == pytest.approx(mean) and stats["se"] == pytest.approx(sd / 2)
    assert stats["ci_low"] == pytest.approx(mean - 3.1824 * sd / 2, abs=1e-4)
    assert stats["ci_high"] == pytest.approx(mean + 3.1824 * sd / 2, abs=1e-4)
    assert (stats["a_higher"], stats["b_higher"], stats["ties"]) == (2, 1, 1)


def test_pairing_removes_the_shared_seed_variance():
    # The arms differ by exactly 0.05 on every seed while the seeds themselves vary a lot.
    b = {s: v for s, v in enumerate([0.2, 0.6, 0.35, 0.9])}
    a = {s: v + 0.05 for s, v in b.items()}
    stats = paired_difference(a, b)
    assert stats["mean"] == pytest.approx(0.05) and stats["se"] == pytest.approx(0.0, abs=1e-12)
    assert stats["a_higher"] == 4


def test_paired_difference_edge_cases():
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    single = paired_difference({0: 0.3, 1: float("nan")}, {0: 0.1, 1: 0.2})
    assert single["n"] == 1 and single["mean"] == pytest.approx(0.2) and math.isnan(single["se"])
    assert math.isnan(single["ci_low"]) and math.isnan(single["ci_high"])
    assert paired_difference({0: None}, {0: 0.5}) is None
