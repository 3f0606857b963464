"""The analysis plan: how many fresh seeds the confirmatory run trains, fixed from the pilot
before any of them exists (docs/design.md, section 7).

Each row of the pilot's claims table (the `pilot` profile, seeds 0-9) gets the seeds its test
needs for :data:`POWER` against the smallest effect of interest, its claim's margin
(:data:`irn.paper.claims.MARGINS`, fixed before this count), at its family's Bonferroni level
``ALPHA / m`` (``m``: the family's rows and ``every`` conjunctions, Holm's first step, so a
lower bound on Holm's power). The power is simulated from the pilot's own spread: its per-seed
values resampled with replacement (:data:`DRAWS` data sets per count, one generator seeded by
the row's name, the same draws for every count), moved so that their Hodges-Lehmann centre is
where the effect of interest puts it:

- **directional**: a margin beyond the threshold on the claimed side; the one-sided
  signed-rank test;
- **non-inferiority** ("no cost"): at the threshold (no cost at all), tested against the
  threshold plus the margin;
- **equivalence**: at the threshold, TOST within the margin;
- **share** (claim 4): every seed converging, the best case; the exact binomial test against
  the share named.

A row's count is the smallest ``n <= MAX_SEEDS`` whose power reaches :data:`POWER`; a row that
needs more is **undecidable at this scale** (listed; it still gets its verdict, which can be
a contradiction), and one with fewer than ``MIN_SEEDS`` pilot seeds, or whose pilot seeds all
gave the same value, is not planned (no spread to plan from). A family trains the largest
count of its planned rows, or ``MAX_SEEDS`` where none is decidable below it (the most power
this scale allows); a notebook trains the largest count of the families it feeds, and every
row of a notebook is analysed on all of its seeds.

The confirmatory seeds derive from the plan file's SHA-256 (:func:`seeds`), so they cannot
exist before the plan: integers drawn without replacement from ``[FIRST_SEED, LAST_SEED)``,
disjoint from the pilot's, a notebook of ``n`` taking the first ``n``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import claims, statistics
from .._checks import require

POWER = 0.8
DRAWS = 1000
#: the confirmatory seeds are drawn from [FIRST_SEED, LAST_SEED); the pilot's are 0-9
FIRST_SEED, LAST_SEED = 10, 1_000_000


#: how the confirmatory data are analysed, fixed with the plan (irn/paper/claims.py as committed
#: with it; docs/design.md, section 7)
RULES = {
    "tests": "directional rows: one-sided exact Wilcoxon signed-rank test (mid-ranks, zeros "
             "dropped, accuracies compared as whole validation points); equivalence: TOST, 5% "
             "per side; no cost: one-sided against the threshold plus the margin; shares: exact "
             "one-sided binomial test against the share named, seeds as the unit",
    "families": "Holm over each family's rows and its 'every' conjunctions (intersection-union "
                "p, the largest of its components'); 'all but one' from the Holm-adjusted "
                "component verdicts; contradicted by the opposite one-sided tests, Holm-adjusted",
    "level": "0.05 one-sided (TOST: per side) after Holm",
    "seeds analysed": "every confirmatory seed its notebook trains; the pilot's seeds are "
                      "reported beside, never pooled",
    "budget": "the same seeds trained half as long (params/half.yaml): a row whose verdict "
              "differs there reads budget-dependent",
}


def level(family_size: int) -> float:
    """The Bonferroni level of one row in a family of ``family_size`` tested hypotheses."""
    require(family_size >= 1, f"family_size must be >= 1, got {family_size!r}")
    return claims.ALPHA / family_size


def _rejects(spec: claims.Claim, side: str, sample: np.ndarray, alpha: float) -> bool:
    """Whether the row's test (as :func:`irn.paper.claims.frame` applies it, before Holm)
    decides for the claim on ``sample`` at ``alpha``."""
    t, margin = spec.threshold, claims.MARGINS[spec.margin][0]
    if spec.test == "equivalence":
        return statistics.tost_p(sample, t - margin, t + margin) <= alpha
    centre = t + margin if spec.test == "non-inferiority" else t
    return statistics.signed_rank_p(sample, centre, claims._ALTERNATIVE[side]) <= alpha


def _centred(spec: claims.Claim, side: str, values: np.ndarray) -> np.ndarray:
    """``values`` moved so that their Hodges-Lehmann centre is the effect of interest, their
    deviations from it widened by ``sqrt(n / (n - 1))`` (resampling ``n`` values narrows
    their spread by that factor)."""
    t, margin = spec.threshold, claims.MARGINS[spec.margin][0]
    target = t + (margin if side == ">" else -margin) if spec.test == "directional" else t
    centre = statistics.signed_rank_interval(values)[0]
    return target + (values - centre) * math.sqrt(len(values) / (len(values) - 1))


def _samples(spec: claims.Claim, side: str, values, rng_seed: int, draws: int) -> np.ndarray:
    """``draws`` resamples of the centred ``values`` (:func:`_centred`), each ``MAX_SEEDS``
    long: a count ``n`` takes the first ``n`` of each, so every count sees the same draws."""
    values = _centred(spec, side, np.asarray(values, dtype=float))
    picks = np.random.default_rng(rng_seed).integers(len(values), size=(draws, claims.MAX_SEEDS))
    return values[picks]


def _power(spec: claims.Claim, side: str, samples: np.ndarray, n: int, alpha: float) -> float:
    """The share of ``samples`` whose first ``n`` values the row's test decides for the claim."""
    return float(np.mean([_rejects(spec, side, x[:n], alpha) for x in samples]))


def power(spec: claims.Claim, side: str, values, n: int, alpha: float,
          rng_seed: int = 0, draws: int = DRAWS) -> float:
    """The simulated power of the row's test with ``n`` seeds at level ``alpha`` (module
    docstring), from the pilot's per-seed ``values``."""
    return _power(spec, side, _samples(spec, side, values, rng_seed, draws), n, alpha)


def seeds_for(spec: claims.Claim, side: str, values, alpha: float, rng_seed: int = 0,
              draws: int = DRAWS) -> int | None:
    """The smallest ``n <= MAX_SEEDS`` with :func:`power` at least :data:`POWER` (None: more
    than ``MAX_SEEDS``). Shares: the smallest ``n`` at which ``n`` of ``n`` converging seeds
    reject a share at most the one named, ``share^n <= alpha``."""
    if spec.test == "share":
        n = math.ceil(math.log(alpha) / math.log(spec.threshold))
        return n if n <= claims.MAX_SEEDS else None
    samples = _samples(spec, side, values, rng_seed, draws)

    def enough(n):
        return _power(spec, side, samples, n, alpha) >= POWER

    if not enough(claims.MAX_SEEDS):
        return None
    # below the smallest n whose exact test can reject at alpha at all (2^-n <= alpha), none can
    low, high = max(1, math.ceil(math.log2(1 / alpha)) - 1), claims.MAX_SEEDS
    while high - low > 1:  # enough(high), not enough(low): power grows with n on the same draws
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def _side(test: str) -> str:
    """The claimed side of a row from its test's text in the table ("one-sided < 0", ...)."""
    return "<" if "<" in test else ">"


def _rng_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def build(pilot: Path, draws: int = DRAWS) -> dict:
    """The plan from a pilot's figures folder (``claims/*.csv`` and ``claims/per_seed/*.csv``
    as the notebooks save them): per family its claim, test, side, margin, level and count,
    per row its count, and per notebook the seeds it trains."""
    pilot = Path(pilot)
    families, notebooks = {}, {}
    for path in sorted((pilot / "claims").glob("*.csv")):
        decided = pd.read_csv(path)
        values = pd.read_csv(pilot / "claims" / "per_seed" / path.name)
        conjunction = decided.setup.str.contains(r"\(conjunction: ")
        for claim, table in decided.groupby("claim", sort=False):
            spec = claims.CLAIMS[claim]
            rows = table[~conjunction.loc[table.index]]
            m = len(rows) + (int(conjunction.loc[table.index].sum())
                             if spec.combine == "every" else 0)
            alpha = level(m)
            planned, undecidable, unplanned = {}, [], []
            for r in rows.itertuples():
                pilot_values = values[(values.claim == claim) & (values.setup == r.setup)].value
                if len(pilot_values) < claims.MIN_SEEDS or (
                        spec.test != "share" and pilot_values.nunique() == 1):
                    unplanned.append(r.setup)
                    continue
                n = seeds_for(spec, _side(r.test), pilot_values.to_numpy(), alpha,
                              _rng_seed(f"{claim}/{r.setup}"), draws)
                planned[r.setup] = n if n is not None else f">{claims.MAX_SEEDS}"
                if n is None:
                    undecidable.append(r.setup)
            counts = [n for n in planned.values() if isinstance(n, int)]
            families[claim] = dict(
                statement=spec.statement, source=spec.source, metric=spec.metric,
                test=spec.test, side=spec.side, threshold=spec.threshold,
                margin=dict(name=spec.margin, value=round(claims.MARGINS[spec.margin][0], 6),
                            reason=claims.MARGINS[spec.margin][1]),
                notebook=path.stem, family_size=m, level=round(alpha, 8),
                seeds=max(counts) if counts else claims.MAX_SEEDS, rows=planned,
                undecidable_at_this_scale=undecidable, not_planned=unplanned)
            notebooks[path.stem] = max(notebooks.get(path.stem, 0), families[claim]["seeds"])
    return dict(power=POWER, alpha=claims.ALPHA, max_seeds=claims.MAX_SEEDS, draws=draws,
                min_seeds=claims.MIN_SEEDS, rules=RULES, seed_range=[FIRST_SEED, LAST_SEED],
                notebooks=notebooks, families=families)


def seeds(path, count: int) -> list[int]:
    """The first ``count`` confirmatory seeds of the plan file ``path``: integers drawn without
    replacement from ``[FIRST_SEED, LAST_SEED)`` by numpy's generator seeded with the file's
    SHA-256 (so they cannot exist before it), in the order drawn."""
    require(0 < count <= claims.MAX_SEEDS, f"count must be in 1..{claims.MAX_SEEDS}, got {count!r}")
    digest = hashlib.sha256(Path(path).read_bytes()).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    drawn = rng.choice(LAST_SEED - FIRST_SEED, size=claims.MAX_SEEDS, replace=False) + FIRST_SEED
    return [int(s) for s in drawn[:count]]
