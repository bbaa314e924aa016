"""Seed statistics: the t quantile against published values, the incomplete beta against closed
forms, the paired difference against a hand computation, and the prompt-sampling error against a
float64 NumPy computation."""

import math

import pytest

import numpy as np

from synthunlearn.evaluation.statistics import (paired_difference, prompt_sampling_se, regularized_incomplete_beta,
                                                t_critical, t_two_sided_p)


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


def test_prompt_sampling_se_against_numpy():
    rng = np.random.default_rng(7)
    n_prompts, seeds = 37, [0, 2, 5]
    a = {s: (rng.random(n_prompts) < 0.4).astype(int).tolist() for s in seeds}
    b = {s: (rng.random(n_prompts) < 0.3).astype(int).tolist() for s in seeds}
    b[9] = [1] * n_prompts                                   # no partner in a: left out
    stats = prompt_sampling_se(a, b)
    diffs = np.array([a[s] for s in seeds], dtype=np.float64) - np.array([b[s] for s in seeds], dtype=np.float64)
    per_prompt = diffs.mean(axis=0)
    assert stats["n_prompts"] == n_prompts and stats["n_seeds"] == 3
    assert stats["se"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(n_prompts), rel=1e-12)
    # Its mean is the paired mean over seeds of the per-seed rates.
    paired = paired_difference({s: float(np.mean(a[s])) for s in seeds}, {s: float(np.mean(b[s])) for s in seeds})
    assert stats["mean"] == pytest.approx(paired["mean"], abs=1e-12)


def test_a_prompt_effect_shared_by_every_seed_is_invisible_to_the_seed_interval():
    # Arm a wins the same 3 of 20 prompts on every seed and ties the rest: the per-seed differences
    # are identical (seed se 0), yet another draw of 20 prompts could hold none of those 3.
    base = {s: [s % 2] * 20 for s in range(4)}
    a = {s: [1] * 3 + hits[3:] for s, hits in base.items()}
    b = {s: [0] * 3 + hits[3:] for s, hits in base.items()}
    seed_stats = paired_difference({s: sum(v) / 20 for s, v in a.items()}, {s: sum(v) / 20 for s, v in b.items()})
    assert seed_stats["mean"] == pytest.approx(0.15) and seed_stats["se"] == pytest.approx(0.0, abs=1e-12)
    sampling = prompt_sampling_se(a, b)
    # D = [1, 1, 1, 0 x 17]: sd = sqrt((3 * 0.85^2 + 17 * 0.15^2) / 19).
    assert sampling["se"] == pytest.approx(math.sqrt((3 * 0.85 ** 2 + 17 * 0.15 ** 2) / 19) / math.sqrt(20))
    assert prompt_sampling_se(a, a)["se"] == 0.0


def test_prompt_sampling_se_edge_cases():
    assert prompt_sampling_se({0: [1, 0]}, {1: [1, 0]}) is None
    assert prompt_sampling_se({0: [1]}, {0: [0]}) is None
    with pytest.raises(ValueError, match="not the same prompt set"):
        prompt_sampling_se({0: [1, 0, 1]}, {0: [1, 0]})
