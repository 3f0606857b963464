"""The statistics behind the claims table, chosen for ten seeds (docs/design.md, section 7).

A claim compares two models trained from the same seed, so its evidence is a handful of paired
differences ``d_1, ..., d_n``. With n = 10 a percentile bootstrap covers about 91% where it
says 95%, and a t-interval about 84% on skewed (lognormal) data. The signed-rank procedure
does not lean on n being large:

- the **estimate** is the Hodges-Lehmann estimate, the median of the Walsh averages
  ``(d_i + d_j) / 2, i <= j``;
- the **interval** ``[W_(k), W_(N + 1 - k)]`` (``W`` the N = n(n+1)/2 sorted Walsh averages) has
  exact coverage for any continuous distribution symmetric about its centre, ``k`` read off the
  exact null distribution of Wilcoxon's statistic; on skewed data it covers its centre (the
  pseudo-median) to within a point (tests/test_statistics.py simulates normal, t3, lognormal);
- the **p-value** of "centred at ``c``" is Wilcoxon's exact signed-rank test (zeros dropped,
  ties given mid-ranks), the same test the interval inverts; one-sided where a claim names a
  direction (:func:`signed_rank_p` with ``side``), its matching one-sided bound
  (:func:`one_sided_bound`); values that are counts in disguise (accuracy points of a
  97-point set) are compared as whole multiples of their ``resolution``, so that differences
  of equal counts tie exactly;
- **equivalence** within ``(low, high)`` is two one-sided tests (:func:`tost_p`), and a
  conjunction of claims ("every implicit network") the intersection-union test
  (:func:`intersection_union_p`): it holds when every component holds at the same level.

Shares (how many of ``n`` runs converged) get Clopper-Pearson bounds and an exact binomial
test; p-values of the rows of one claim are adjusted together with Holm's step-down method.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from .._checks import choice, require


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    require(values.ndim == 1 and np.isfinite(values).all(),
            f"values must be a 1-d array of finite numbers, got {values!r}")
    return values


def _signed_rank_null(doubled_ranks) -> np.ndarray:
    """Null distribution of twice Wilcoxon's statistic ``T+`` (the sum of the ranks of the
    positive values) for the given doubled (integer) ranks: each sign equally likely, all
    ``2^n`` patterns counted by dynamic programming. Returns probabilities indexed by 2 T+."""
    counts = np.zeros(int(sum(doubled_ranks)) + 1)
    counts[0] = 1.0
    for r in doubled_ranks:
        counts[r:] = counts[r:] + counts[:-r]
    return counts / counts.sum()


def _critical_rank(n: int, level: float) -> int:
    """The largest ``k`` with ``P(T+ <= k - 1) <= (1 - level) / 2`` for ``n`` untied values (0
    when none: the interval is unbounded)."""
    cdf = np.cumsum(_signed_rank_null(2 * np.arange(1, n + 1))[::2])
    return int(np.searchsorted(cdf, (1 - level) / 2 + 1e-12, side="right"))


def signed_rank_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """The Hodges-Lehmann estimate of the centre of ``values`` and its signed-rank interval at
    ``level`` (module docstring): ``(estimate, low, high)``; ``(-inf, inf)`` bounds when there
    are too few values for ``level`` (fewer than 6 at 95%)."""
    values = _finite(values)
    require(len(values) >= 1, "values must hold at least one number")
    require(0 < level < 1, f"level must be in (0, 1), got {level!r}")
    i, j = np.triu_indices(len(values))
    walsh = np.sort((values[i] + values[j]) / 2)
    k = _critical_rank(len(values), level)
    low, high = (walsh[k - 1], walsh[-k]) if k else (-math.inf, math.inf)
    return float(np.median(walsh)), float(low), float(high)


SIDES = ("two-sided", "greater", "less")


def _differences(values, centre: float, resolution: float | None) -> np.ndarray:
    """``values - centre`` without zeros; with a ``resolution``, as whole multiples of it
    (rounded), so that differences of equal counts are equal numbers."""
    d = _finite(values) - centre
    if resolution is not None:
        require(resolution > 0, f"resolution must be > 0, got {resolution!r}")
        d = np.round(d / resolution)
    return d[d != 0]


def signed_rank_p(values, centre: float = 0.0, side: str = "two-sided",
                  resolution: float | None = None) -> float:
    """Exact p-value of Wilcoxon's signed-rank test that ``values`` are symmetric about
    ``centre``, against the alternative ``side``: ``"two-sided"``, ``"greater"`` (the centre
    exceeds ``centre``: ``P(T+ >= t)``) or ``"less"`` (``P(T+ <= t)``), ``T+`` the sum of the
    ranks of the positive differences. Differences equal to ``centre`` are dropped, tied ones
    share their mean rank; with ``resolution`` the differences are first rounded to whole
    multiples of it (counts: exact ties). 1.0 when nothing is left."""
    choice("side", side, SIDES)
    d = _differences(values, centre, resolution)
    if not len(d):
        return 1.0
    doubled = (2 * stats.rankdata(np.abs(d))).astype(int)  # mid-ranks are halves: doubled, integers
    null = _signed_rank_null(doubled)
    observed = int(doubled[d > 0].sum())
    support = np.arange(len(null))
    if side == "greater":
        return float(min(1.0, null[support >= observed].sum()))
    if side == "less":
        return float(min(1.0, null[support <= observed].sum()))
    mean = doubled.sum() / 2
    extreme = abs(observed - mean)
    return float(min(1.0, null[np.abs(support - mean) >= extreme - 1e-9].sum()))


def one_sided_bound(values, side: str, level: float = 0.95) -> float:
    """The confidence bound that inverts the one-sided signed-rank test at ``1 - level``: for
    ``side="greater"`` the lower bound ``W_(k)`` of the Walsh averages (every centre below it
    is rejected in favour of a larger one), for ``"less"`` the upper bound ``W_(N + 1 - k)``;
    ``-inf`` (``inf``) when there are too few values for ``level``."""
    choice("side", side, SIDES[1:])
    values = _finite(values)
    require(len(values) >= 1 and 0 < level < 1, f"need values and a level in (0, 1), got "
                                                f"{len(values)} values, level {level!r}")
    i, j = np.triu_indices(len(values))
    walsh = np.sort((values[i] + values[j]) / 2)
    k = _critical_rank(len(values), 1 - 2 * (1 - level))  # one tail of 1 - level
    if not k:
        return -math.inf if side == "greater" else math.inf
    return float(walsh[k - 1] if side == "greater" else walsh[-k])


def tost_p(values, low: float, high: float, resolution: float | None = None) -> float:
    """Two one-sided signed-rank tests of equivalence: the p-value that the centre of
    ``values`` lies outside ``(low, high)``, ``max(p(centre > low), p(centre < high))``; at
    level ``alpha`` per side it rejects exactly when both one-sided tests do."""
    require(low < high, f"low must be below high, got {low!r}, {high!r}")
    return max(signed_rank_p(values, low, "greater", resolution),
               signed_rank_p(values, high, "less", resolution))


def intersection_union_p(pvalues) -> float:
    """The p-value of a conjunction ("every component holds") from its components' p-values:
    their maximum. The conjunction holds at level ``alpha`` when every component does at
    ``alpha``, with no adjustment for their number (Berger's intersection-union test)."""
    p = np.asarray(pvalues, dtype=float)
    require(p.ndim == 1 and len(p) >= 1 and np.all((p >= 0) & (p <= 1)),
            f"pvalues must be a non-empty 1-d array in [0, 1], got {pvalues!r}")
    return float(p.max())


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float, float]:
    """The share ``successes / trials`` and its exact (Clopper-Pearson) interval at ``level``:
    the shares for which the observed count is not in either ``(1 - level) / 2`` tail."""
    require(trials >= 1 and 0 <= successes <= trials,
            f"successes and trials must satisfy 0 <= successes <= trials, trials >= 1, "
            f"got {successes!r} of {trials!r}")
    tail = (1 - level) / 2
    low = stats.beta.ppf(tail, successes, trials - successes + 1) if successes else 0.0
    high = stats.beta.ppf(1 - tail, successes + 1, trials - successes) if successes < trials else 1.0
    return successes / trials, float(low), float(high)


def binomial_p(successes: int, trials: int, share: float) -> float:
    """Two-sided exact binomial p-value that ``successes`` of ``trials`` come from ``share``."""
    return float(stats.binomtest(int(successes), int(trials), share).pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values: the ``i``-th smallest becomes
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; reject where the adjusted value is <= alpha."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted
