"""Seed statistics: paired differences between arms with Student-t intervals.

Every arm of an experiment shares its seeds (data order, RNG of every phase, the same base), so
two arms are compared *per seed*: for seeds s = 1..n with values a_s and b_s,

    d_s = a_s - b_s,   mean  d = (1/n) sum_s d_s,   se = sd(d_s) / sqrt(n)   (sd with ddof 1),
    95 % interval      d -/+ t_{0.975, n-1} * se,

the paired t-interval. Pairing removes the between-seed variance both arms share (a seed whose
SFT happens to go well lifts every arm), which an unpaired comparison of two means would count
twice. The counts of seeds where a > b, a < b and a == b go beside it: with six or twelve seeds
the sign count says as much as the interval.

The seed interval is not the whole uncertainty when every seed is scored on the same finite
prompt set: a prompt that happens to favour one arm does so on every seed, so that part of the
error is shared by all seeds and no number of seeds averages it away. With hits x_si, y_si in
{0, 1} of arms a and b on prompt i = 1..N under seed s = 1..k,

    D_i = (1/k) sum_s (x_si - y_si),   mean_i D_i = d (the paired mean above),
    prompt-sampling se = sd_i(D_i) / sqrt(N)   (sd with ddof 1),

the standard error of d over draws of N prompts from the same generator with the trained models
held fixed (:func:`prompt_sampling_se`). It also holds the seed-by-prompt noise divided by k,
which the seed se already counts, so adding the two in quadrature overstates the total a little.
When it is comparable to the seed se, more prompts narrow the interval more cheaply than more
seeds (an evaluation costs seconds, a seed a full training run).

No SciPy: the t quantile comes from the t distribution's tail,

    P(|T| > t) = I_x(nu/2, 1/2),   x = nu / (nu + t^2),

with I the regularised incomplete beta function (continued fraction, modified Lentz), inverted by
bisection; both are exact to ~1e-10, far below what a handful of seeds can resolve.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        # Even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # Odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    # Use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges faster.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - front * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: float, confidence: float = 0.95) -> float:
    """The two-sided critical value t_{(1+confidence)/2, df} (t_critical(5) = 2.5706...)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:  # the tail falls monotonically in t
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_difference(a: Mapping[object, float], b: Mapping[object, float],
                      confidence: float = 0.95) -> Optional[Dict[str, object]]:
    """Per-seed difference a - b over the seeds both have a finite value for.

    Returns ``{"mean", "se", "ci_low", "ci_high", "n", "a_higher", "b_higher", "ties", "seeds"}``
    (``se`` and the interval are NaN for a single seed), or None when no seed is shared.
    """
    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))

    seeds = [s for s in a if s in b and finite(a[s]) and finite(b[s])]
    if not seeds:
        return None
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        se = sd / math.sqrt(n)
        half = t_critical(n - 1, confidence) * se
        low, high = mean - half, mean + half
    else:
        se = low = high = math.nan
    # Rates over a few hundred prompts: differences below 1e-12 are the same count.
    return {"mean": mean, "se": se, "ci_low": low, "ci_high": high, "n": n,
            "a_higher": sum(d > 1e-12 for d in diffs), "b_higher": sum(d < -1e-12 for d in diffs),
            "ties": sum(abs(d) <= 1e-12 for d in diffs), "seeds": list(seeds)}


def prompt_sampling_se(a: Mapping[object, Sequence[object]],
                       b: Mapping[object, Sequence[object]]) -> Optional[Dict[str, object]]:
    """Prompt-sampling standard error of the paired mean difference a - b (module docstring).

    ``a`` and ``b`` map a seed to that arm's per-prompt hits (bools or 0/1, the same prompts in
    the same order for every seed and arm). Uses the seeds both have; returns
    ``{"se", "n_prompts", "n_seeds", "mean"}`` (``mean`` is d, equal to the paired mean), or None
    when no seed is shared or fewer than two prompts are. Hit lists of different lengths are an
    error: they were scored on different prompt sets, and pairing them would be meaningless.
    """
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    if not seeds:
        return None
    lengths = {len(a[s]) for s in seeds} | {len(b[s]) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"per-prompt hits of different lengths {sorted(lengths)}: not the same prompt set")
    n = lengths.pop()
    if n < 2:
        return None
    k = len(seeds)
    per_prompt = [sum(float(a[s][i]) - float(b[s][i]) for s in seeds) / k for i in range(n)]
    mean = sum(per_prompt) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in per_prompt) / (n - 1))
    return {"se": sd / math.sqrt(n), "n_prompts": n, "n_seeds": k, "mean": mean}
