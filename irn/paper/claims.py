"""The paper's claims as rows with a verdict (docs/design.md, section 7).

Each quoted sentence of the paper is one **family** (:data:`CLAIMS`). A row of it is a
per-seed quantity (a paired difference: the same seed, hence the same initial weights, under
the two models compared; for claim 4 a share of seeds), tested the way the sentence asks,
chosen before the data:

- **directional** ("more accurate", "best"): a one-sided signed-rank test toward the claimed
  side of the threshold; **holds** when its Holm-adjusted p (over the family) is at most
  :data:`ALPHA`, **contradicted** when the opposite one-sided test's is;
- **equivalence** ("equally well"): two one-sided tests (TOST, :data:`ALPHA` per side) within
  the margin; **equivalent** when they reject, **contradicted** when the centre lies beyond the
  margin (two-sided, Holm-adjusted);
- **non-inferiority** ("no cost"): one-sided, the centre below the threshold plus the margin;
- **share** (claim 4): per theta, the share of seeds whose solves all converged, an exact
  one-sided binomial test against the share named.

A sentence about every network ("all implicit networks are stable") becomes one row per
network and a **conjunction** row (``every ...``): it holds when every component's own
one-sided test holds at :data:`ALPHA` (the intersection-union rule: no adjustment for the
number of components; its p-value joins the family's Holm adjustment), and is contradicted
where a component is (Holm-adjusted). A row's
``p_holm`` is the adjusted p-value of the test that decided it (the opposite one's for a
contradicted row). "Second
worst" holds when all components but one hold, by their Holm-adjusted verdicts. Every row
prints the bound of the test that decided it, compatible with Holm's decisions
(:func:`_compatible_levels`; for equivalence an interval), and an inconclusive row what its
data exclude. Margins are fixed with
their reasons (:data:`MARGINS`); the seeds each row was planned for (80% power against its
margin at the family's level, :mod:`irn.paper.plan`, from the pilot) are added by
:func:`with_plan` (more than :data:`MAX_SEEDS` reads as undecidable at this scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from . import statistics
from .._checks import choice, missing_extra, require

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.claims", err) from err

COLUMNS = ["claim", "setup", "statement", "source", "metric", "test", "estimate", "bound",
           "excludes", "p", "p_holm", "seeds", "seeds_planned", "not_converged", "trained",
           "runs", "verdict", "figure"]
#: the level of every test (one-sided; TOST: per side); a family's rows are Holm-adjusted
ALPHA = 0.05
#: fewer seeds than this give no verdict (inconclusive), whatever the test says
MIN_SEEDS = 8
#: the most seeds a row may plan for; a row that needs more is undecidable at this scale
MAX_SEEDS = 50
#: a run has finished training when its training loss moved by at most SETTLED (relative)
#: over its last SETTLED_TAIL share of epochs
SETTLED, SETTLED_TAIL = 0.01, 0.1
#: accuracy points per validation point of the two spirals (97 points; the coarsest set)
VALIDATION_POINT = 100 / 97

#: the smallest effect of interest per quantity, and why (fixed before any seed count)
MARGINS = {
    "decades": (0.1, "0.1 decades (a factor 1.26) of a loss, gain or gradient ratio: below "
                     "the seed-to-seed spread of one model in Example 1, above rounding"),
    "points": (2 * VALIDATION_POINT, "two validation points of the coarsest set, the two "
                                     "spirals' 97 (2.06 accuracy points): one point is its "
                                     "resolution; the same margin on the finer sets"),
    "iterations": (1.0, "one iteration per layer: the resolution of an iteration count"),
    "growth": (0.01, "0.01 per layer of the perturbation's growth factor: 10% over ten layers"),
    "factor 2": (math.log10(2), "a factor of 2 in training MSE between two networks (ours: "
                                "'equally well' names no tolerance)"),
    "share": (0.0, "none: the share 0.9 is ours"),
}
TESTS = ("directional", "equivalence", "non-inferiority", "share")


@dataclass(frozen=True)
class Claim:
    """One quoted sentence, one family of rows. ``statement``: the paper's words (verbatim;
    ``[...]`` marks our insertions) or, where ``source`` starts with "ours", our reading of
    them; ``metric`` the quantity per seed; ``test`` one of :data:`TESTS`; ``side`` (``"<"``
    or ``">"``) the claimed side of ``threshold``; ``margin`` a key of :data:`MARGINS`;
    ``combine`` how component rows make the sentence's conjunction row (None, ``"every"`` or
    ``"all but one"``); ``resolution`` the per-seed quantity's resolution (accuracy points:
    ties of counts are exact); ``figure`` the figure it rests on (a file stem in
    ``figures/``)."""

    statement: str
    source: str
    metric: str
    test: str
    side: str
    threshold: float
    margin: str
    figure: str
    combine: str | None = None
    resolution: float | None = None


_EX1, _EX2 = "Section 3, Example 1", "Section 3, Example 2"
_UNSTABLE = ("explicit ResNet is unstable, same figure [7] shows that all implicit networks are "
             "stable")
CLAIMS = {
    "1a": Claim("explicit ResNet has the best training accuracy among networks with [L = 5] "
                "layers", _EX1, "log10 train MSE: explicit minus the implicit network named",
                "directional", "<", 0.0, "decades", "figure4_losses", combine="every"),
    "1b": Claim("but is second worst on the validation dataset", _EX1,
                "log10 val. MSE: explicit minus the implicit network named (second worst: "
                "worse than all but one)", "directional", ">", 0.0, "decades", "figure4_losses",
                combine="all but one"),
    "2": Claim(_UNSTABLE, _EX1, "log10 gain of a perturbation through the L = 5 layers: "
               "explicit minus the implicit network named; or a network's own gain (> 0: "
               "unstable)", "directional", ">", 0.0, "decades", "figure7_shallow_dynamics",
               combine="every"),
    "3a": Claim("all the networks with [L = 20] layers perform equally well as expected except "
                "the explicit ResNet which, according to Figure 6 is stuck at the local minimum",
                _EX1, "log10 train MSE: explicit minus the implicit network named",
                "directional", ">", 0.0, "decades", "figure4_losses", combine="every"),
    "3b": Claim("and is struggling in propagating its gradients", _EX1,
                "log10 of the first- to last-layer mean |gradient|: explicit minus the implicit "
                "network named", "directional", "<", 0.0, "decades", "figure6_gradients",
                combine="every"),
    "3c": Claim("all the networks with [L = 20] layers perform equally well", _EX1,
                "log10 train MSE: one implicit network minus another", "equivalence", "<", 0.0,
                "factor 2", "figure4_losses", combine="every"),
    "4": Claim("Figure 5 shows the convergence of fixed-point and Neumann iterations",
               f"{_EX1}; the share 0.9 is ours", "share of seeds whose every solve converged "
               "(unit: seeds)", "share", ">", 0.9, "share", "figure5_iterations",
               combine="every"),
    "5a": Claim("Minimization of [R_fp] leads to the reduction of the number of iterations "
                "required for the convergence", "Section 2.1",
                "forward iterations per layer (last 10% of epochs): with minus without R_fp "
                "(all runs: an unconverged run counts its cap, a lower bound; or converged "
                "pairs only)", "directional", "<", 0.0, "iterations",
                "figure5b_fixed_point_regularizer"),
    "5b": Claim("R_fp costs no training loss", "ours (the paper says nothing of its cost)",
                "log10 train MSE: with minus without R_fp", "non-inferiority", "<", 0.0,
                "decades", "figure5b_fixed_point_regularizer"),
    "6a": Claim("the proposed regularization technique results in a more accurate [...] "
                "networks than original ResNet", _EX2,
                "validation accuracy (points): with minus without R_stab", "directional", ">",
                0.0, "points", "figure9_decision_regions"),
    "6b": Claim("the proposed regularization technique results in a more [...] robust "
                "networks than original ResNet", f"{_EX2}; robust read as PGD accuracy (ours)",
                "PGD accuracy (points): with minus without R_stab", "directional", ">", 0.0,
                "points", "figure9_decision_regions"),
    "7a": Claim("this choice leads to the improved stability of both forward [...] propagations",
                "Abstract (forward only: backward untested)",
                "mean per-layer growth of a hidden-state perturbation: theta = 1 minus theta = 0",
                "directional", "<", 0.0, "growth", "figure_perturbation_growth"),
    "7b": Claim("fully implicit residual architecture which [...] is unconditionally stable and "
                "robust", "Section 1", "PGD accuracy (points): theta = 1 minus theta = 0",
                "directional", ">", 0.0, "points", "figure_robustness_curves"),
    "7c": Claim("allows to control the robustness of the network with only a few "
                "hyperparameters", "Abstract; R_stab's sigma as that hyperparameter is ours",
                "PGD accuracy (points) at the theta named: with minus without R_stab",
                "directional", ">", 0.0, "points", "figure_robustness_curves"),
}


def row(claim: str, setup: str, per_seed, *, component: str | None = None,
        side: str | None = None, conjunction: str | None = None, not_converged: int = 0,
        trained: int = 0, runs: int = 0, figure: str | None = None,
        resolution: float | None = None) -> dict:
    """One row of the claims table: ``claim`` (a key of :data:`CLAIMS`) on ``setup``, from
    the per-seed values ``per_seed`` (a Series indexed by seed, or a sequence; NaN seeds are
    left out and not counted in ``seeds``); ``component`` names the network (or pair, or
    reading) of a sentence about several, whose conjunction (named ``conjunction``; default
    "every network named") :func:`frame` adds; ``side`` overrides the claim's (a network's
    own gain in claim 2). Of the ``runs`` behind the row,
    ``not_converged`` count those whose solves did not all converge (kept, and counted) and
    ``trained`` those whose training settled (:func:`settled`); ``figure`` overrides the
    claim's, ``resolution`` the claim's resolution. The verdict is decided by :func:`frame`,
    with the other rows of the family."""
    choice("claim", claim, CLAIMS)
    spec = CLAIMS[claim]
    values = per_seed if isinstance(per_seed, pd.Series) else pd.Series(np.asarray(per_seed, float))
    values = values.astype(float)[np.isfinite(values.astype(float))]
    return dict(claim=claim, setup=setup if component is None else f"{setup}, {component}",
                group=setup, component=component, side=side or spec.side,
                conjunction=conjunction or ("every pair" if spec.test == "equivalence" else
                                            "all but one network named"
                                            if spec.combine == "all but one"
                                            else "every network named"),
                resolution=resolution if resolution is not None else spec.resolution,
                statement=spec.statement, source=spec.source, figure=figure or spec.figure,
                seeds=len(values), values=values, not_converged=int(not_converged),
                trained=int(trained), runs=int(runs))


def share_row(claim: str, setup: str, outcomes, **kwargs) -> dict:
    """A row whose quantity is a share of seeds: ``outcomes``, one boolean per seed (whether
    every solve of that seed's run converged). Other arguments as :func:`row`."""
    outcomes = pd.Series(outcomes).astype(bool)
    require(len(outcomes) >= 1, "outcomes must hold at least one seed")
    return row(claim, setup, outcomes.astype(float), **kwargs)


_ALTERNATIVE = {">": "greater", "<": "less"}
_OTHER = {">": "<", "<": ">"}


def _tests(r: dict) -> dict:
    """The row's tests, unadjusted: ``p`` for the claimed verdict, ``p_against`` for the
    opposite one, the estimate, the bound of the test at ``level`` (a function) and ``far``,
    the 95% bound on the other side (what an undecided row's data exclude)."""
    spec = CLAIMS[r["claim"]]
    values, side, res = r["values"].to_numpy(), r["side"], r["resolution"]
    margin = MARGINS[spec.margin][0]
    t = spec.threshold
    if spec.test == "share":
        k, n = int(values.sum()), len(values)
        return dict(estimate=k / n,
                    p=stats.binomtest(k, n, t, alternative="greater").pvalue,
                    p_against=stats.binomtest(k, n, t, alternative="less").pvalue,
                    bound=lambda level: float(stats.beta.ppf(1 - level, k, n - k + 1)) if k else 0.0,
                    opposite=lambda level: float(stats.beta.ppf(level, k + 1, n - k))
                    if k < n else 1.0,
                    far=float(stats.beta.ppf(1 - ALPHA, k + 1, n - k)) if k < n else 1.0)
    estimate = statistics.signed_rank_interval(values)[0]
    if spec.test == "equivalence":
        against = min(statistics.signed_rank_p(values, t + margin, "greater", res),
                      statistics.signed_rank_p(values, t - margin, "less", res))
        return dict(estimate=estimate, p=statistics.tost_p(values, t - margin, t + margin, res),
                    p_against=min(1.0, 2 * against),
                    bound=lambda level: statistics.signed_rank_interval(values, 2 * level - 1)[1:],
                    opposite=lambda level: statistics.signed_rank_interval(values, level)[1:],
                    far=float("nan"))
    centre = t + margin if spec.test == "non-inferiority" else t
    return dict(estimate=estimate,
                p=statistics.signed_rank_p(values, centre, _ALTERNATIVE[side], res),
                p_against=statistics.signed_rank_p(values, centre, _ALTERNATIVE[_OTHER[side]], res),
                bound=lambda level: statistics.one_sided_bound(values, _ALTERNATIVE[side], level),
                opposite=lambda level: statistics.one_sided_bound(
                    values, _ALTERNATIVE[_OTHER[side]], level),
                # what an undecided row excludes: a direction, the effect beyond the far bound;
                # no cost, the costs above its own upper bound
                far=statistics.one_sided_bound(
                    values, _ALTERNATIVE[side if spec.test == "non-inferiority" else _OTHER[side]],
                    1 - ALPHA))


def frame(rows: list[dict]) -> pd.DataFrame:
    """The rows decided, with the columns :data:`COLUMNS` (module docstring). Per family (a
    claim's rows): the tested rows and the sentence's ``every`` conjunctions (their
    intersection-union p-values) Holm-adjusted together on the claimed side, the rows alone on
    the other; an ``all but one`` conjunction from its components' verdicts; bounds compatible
    with Holm's decisions (Strassburger and Bretz 2008: a rejected row's bound is its
    threshold unless every row is rejected, a row not rejected gets ``ALPHA / (m - r)`` with
    ``r`` rejections), what an inconclusive row excludes, and the seeds a row would need."""
    out = []
    for claim, family in _families(rows):
        spec = CLAIMS[claim]
        tested = [r for r in family if r["seeds"] >= MIN_SEEDS]
        tests = {id(r): _tests(r) for r in family if r["seeds"]}
        groups = _conjunction_groups(spec, family)
        every = [(key, parts) for key, parts in groups if spec.combine == "every"
                 and all(r["seeds"] >= MIN_SEEDS for r in parts)]
        conj_p = [statistics.intersection_union_p([tests[id(r)]["p"] for r in parts])
                  for _, parts in every]
        claimed = statistics.holm([tests[id(r)]["p"] for r in tested] + conj_p) \
            if tested or conj_p else np.array([])
        adjusted = dict(zip(map(id, tested), claimed[:len(tested)]))
        against = dict(zip(map(id, tested), statistics.holm(
            [tests[id(r)]["p_against"] for r in tested]) if tested else []))
        levels = _compatible_levels(list(claimed))
        levels_against = _compatible_levels(list(against.values()))
        position = {id(r): i for i, r in enumerate(tested)}
        for r in family:
            t = tests.get(id(r))
            p_holm, level, side = adjusted.get(id(r), float("nan")), 1 - ALPHA, "claimed"
            verdict = "inconclusive"
            if id(r) in adjusted:
                i = position[id(r)]
                level = levels[i]
                if p_holm <= ALPHA:
                    verdict = "equivalent" if spec.test == "equivalence" else "holds"
                elif against[id(r)] <= ALPHA:  # the table shows the p that decided
                    verdict, p_holm = "contradicted", against[id(r)]
                    level, side = levels_against[i], "against"
            out.append(_decided(r, spec, t, p_holm, verdict, level, side))
        decided = dict(zip(map(id, family), out[-len(family):]))
        conj_levels = dict(zip((key for key, _ in every),
                               zip(claimed[len(tested):], levels[len(tested):])))
        out += _conjunctions(spec, groups, decided, tests, conj_levels)
    return pd.DataFrame(out, columns=COLUMNS)


def _families(rows):
    order = list(dict.fromkeys(r["claim"] for r in rows))
    return [(c, [r for r in rows if r["claim"] == c]) for c in order]


def _compatible_levels(adjusted) -> list:
    """Per Holm-adjusted p-value of a family, the confidence level of a bound compatible with
    Holm's decisions (Strassburger and Bretz 2008): ``None`` for a rejected hypothesis while
    some are not (its bound is the threshold itself), ``1 - ALPHA / m`` for every one when all
    are rejected (the bound clipped at the threshold), and ``1 - ALPHA / (m - r)`` for one not
    rejected, ``r`` the number rejected."""
    m = len(adjusted)
    rejected = sum(p <= ALPHA for p in adjusted)
    if m and rejected == m:
        return [("all", 1 - ALPHA / m)] * m
    return [None if p <= ALPHA else ("free", 1 - ALPHA / (m - rejected)) for p in adjusted]


def _decided(r, spec, t, p_holm, verdict, level, side) -> dict:
    margin = MARGINS[spec.margin][0]
    bound = excludes = float("nan")
    if t is not None:
        bound = _compatible_bound(spec, t, level, side)
        # an undecided row: the bound beyond which its data exclude the effect
        excludes = t["far"] if verdict == "inconclusive" else float("nan")
    test = {"directional": f"one-sided {r['side']} {spec.threshold:g}",
            "equivalence": f"TOST within {spec.threshold:g} +- {margin:.3g}",
            "non-inferiority": f"one-sided < {spec.threshold + margin:.3g} (no worse than the "
                               f"margin)",
            "share": f"one-sided binomial > {spec.threshold:g}"}[spec.test]
    return dict(claim=r["claim"], setup=r["setup"], statement=r["statement"],
                source=r["source"], metric=spec.metric, test=test,
                estimate=float("nan") if t is None else t["estimate"],
                bound=_format_bound(bound), excludes=_format_bound(excludes),
                p=float("nan") if t is None else t["p"], p_holm=p_holm, seeds=r["seeds"],
                seeds_planned=float("nan"), not_converged=r["not_converged"], trained=r["trained"],
                runs=r["runs"], verdict=verdict, figure=r["figure"])


def _limit(spec, side: str):
    """The value a row's test is tested against on ``side`` (``claimed`` or ``against``)."""
    margin = MARGINS[spec.margin][0]
    if spec.test == "equivalence":
        return (spec.threshold - margin, spec.threshold + margin)
    return spec.threshold + (margin if spec.test == "non-inferiority" else 0.0)


def _compatible_bound(spec, t, level, side: str):
    """The bound printed beside a row: of its claimed test (``side="claimed"``) or, for a
    contradicted row, of the opposite one, at the Holm-compatible ``level``
    (:func:`_compatible_levels`; a plain level for an untested row)."""
    bound_of = t["bound"] if side == "claimed" else t["opposite"]
    if level is None:  # rejected while others are not: the threshold is the bound
        return _limit(spec, side)
    if isinstance(level, tuple):
        kind, level = level
        value = bound_of(level)
        if kind == "all" and not isinstance(value, tuple):
            limit = _limit(spec, side)
            upward = (spec.side == ">") == (side == "claimed")
            value = max(value, limit) if upward else min(value, limit)
        return value
    return bound_of(level)


def _format_bound(bound) -> str:
    if isinstance(bound, tuple):
        return f"[{bound[0]:+.3g}, {bound[1]:+.3g}]"
    return "" if bound is None or pd.isna(bound) else f"{bound:+.3g}"


def _conjunction_groups(spec, family) -> list:
    """``[((setup, name), component rows)]``: the sentence's conjunctions, two components or
    more each (none unless the claim has ``combine``)."""
    if spec.combine is None:
        return []
    keys = dict.fromkeys((r["group"], r["conjunction"]) for r in family if r["component"])
    groups = [(key, [r for r in family if r["component"] and (r["group"], r["conjunction"]) == key])
              for key in keys]
    return [(key, parts) for key, parts in groups if len(parts) >= 2]


def _conjunctions(spec, groups, decided, tests, conj_levels) -> list[dict]:
    """The sentence's conjunction rows (module docstring). ``every``: its intersection-union p
    (the largest of its components' own p-values), Holm-adjusted with the family
    (``conj_levels``: its adjusted p and compatible level); it holds (reads equivalent) when
    that is at most ALPHA, and is contradicted when a component is. ``all but one``: holds
    when all but one component hold, contradicted when two are, by the components'
    Holm-adjusted verdicts. Its estimate and bound are the weakest component's (the one with
    the largest p), the bound at the conjunction's own level."""
    out = []
    for key, parts in groups:
        rows = [decided[id(r)] for r in parts]
        verdicts = [d["verdict"] for d in rows]
        weakest = max(parts, key=lambda r: -1 if math.isnan(decided[id(r)]["p"])
                      else decided[id(r)]["p"])
        shown = dict(decided[id(weakest)])
        p = p_holm = float("nan")
        if spec.combine == "every":
            if key in conj_levels:
                p_holm, level = conj_levels[key]
                p = statistics.intersection_union_p([decided[id(r)]["p"] for r in parts])
                shown["bound"] = _format_bound(_compatible_bound(spec, tests[id(weakest)], level,
                                                                 "claimed"))
            good, bad = p_holm <= ALPHA, "contradicted" in verdicts
        else:
            good = verdicts.count("holds") >= len(parts) - 1
            bad = verdicts.count("contradicted") >= 2
        verdict = ("equivalent" if spec.test == "equivalence" else "holds") if good else \
            "contradicted" if bad else "inconclusive"
        out.append(shown | dict(
            setup=f"{key[0]}, {key[1]} (conjunction: weakest row shown)", p=p, p_holm=p_holm,
            seeds_planned=float("nan"), runs=sum(d["runs"] for d in rows),
            not_converged=sum(d["not_converged"] for d in rows),
            trained=sum(d["trained"] for d in rows), excludes="", verdict=verdict))
    return out


def per_seed(rows: list[dict]) -> pd.DataFrame:
    """The values behind each row, one line per seed: ``claim``, ``setup``, ``seed``,
    ``unit`` (the run's keys where a seed has several) and ``value``, so a row can be
    recomputed by hand."""
    lines = []
    for r in rows:
        values = r["values"]
        names = list(values.index.names)
        for key, value in values.items():
            key = key if isinstance(key, tuple) else (key,)
            named = dict(zip(names, key))
            unit = ", ".join(f"{n} {k}" for n, k in named.items() if n not in (None, "seed"))
            lines.append(dict(claim=r["claim"], setup=r["setup"],
                              seed=named.get("seed", named.get(None)), unit=unit, value=value))
    return pd.DataFrame(lines, columns=["claim", "setup", "seed", "unit", "value"])


def show(rows) -> str:
    """The rows as a fixed-width text table (what the notebooks print): estimate, the bound of
    the test that decided the row, what an inconclusive row's data exclude, adjusted p."""
    table = rows if isinstance(rows, pd.DataFrame) else frame(rows)
    return pd.DataFrame({
        "claim": table.claim, "setup": table.setup,
        "estimate": ["-" if pd.isna(e) else f"{e:+.3g}" for e in table.estimate],
        "bound": table.bound.fillna(""), "excludes": table.excludes.fillna(""),
        "p (Holm)": ["-" if pd.isna(p) else f"{p:.2g}" for p in table.p_holm],
        "seeds": table.seeds,
        "not conv.": table.not_converged, "verdict": table.verdict,
    }).to_string(index=False)


def _count(n) -> str:
    return "-" if pd.isna(n) else f"{int(n)}" if n <= MAX_SEEDS else f">{MAX_SEEDS}"


def save(rows: list[dict], name: str, directory) -> Path:
    """Write the rows of one notebook, decided (:func:`frame`), to ``directory/claims/name.csv``
    and their per-seed values (:func:`per_seed`) to ``directory/claims/per_seed/name.csv``
    (see :func:`table`)."""
    directory = Path(directory) / "claims"
    (directory / "per_seed").mkdir(parents=True, exist_ok=True)
    for path, data in ((directory / f"{name}.csv", frame(rows)),
                       (directory / "per_seed" / f"{name}.csv", per_seed(rows))):
        tmp = path.with_name(f".{name}.tmp.csv")
        data.to_csv(tmp, index=False, float_format="%.6g")
        tmp.replace(path)
    return directory / f"{name}.csv"


def table(directory, per_seed_values: bool = False) -> pd.DataFrame:
    """Every notebook's rows (``directory/claims/*.csv``, in name order): the claims table;
    with ``per_seed_values``, the values behind them (``directory/claims/per_seed/*.csv``)."""
    folder = Path(directory) / "claims"
    paths = sorted((folder / "per_seed" if per_seed_values else folder).glob("*.csv"))
    require(bool(paths), f"directory must hold claims/*.csv written by the notebooks, "
                         f"found none in {folder}")
    frames = [pd.read_csv(p, dtype={"bound": str, "excludes": str}) for p in paths]
    return pd.concat(frames, ignore_index=True) if per_seed_values else \
        pd.concat(frames, ignore_index=True)[COLUMNS]


def _estimate(r) -> str:
    """The estimate with the bound of its test, and, where inconclusive, what it excludes."""
    if pd.isna(r.estimate):
        return "-"
    bound, excludes = _text(r.bound), _text(r.excludes)
    return (f"{r.estimate:+.3g}" + (f" [{bound}]" if bound else "")
            + (f"; excludes beyond {excludes}" if excludes else ""))


def _text(value) -> str:
    """A bound as the table prints it, whether kept as text or read back as a number."""
    return value if isinstance(value, str) else _format_bound(value)


def markdown(table: pd.DataFrame, figures_url: str = "figures") -> str:
    """The claims table in Markdown, each row linking the figure it rests on; a row whose
    verdict at half the training budget (column ``verdict_half``, when present) differs reads
    **budget-dependent** instead of a verdict."""
    lines = ["| claim | setup | what is measured | test | estimate [bound of the test] | "
             "p (Holm) | seeds (planned) | not converged | trained | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        half = getattr(r, "verdict_half", r.verdict)
        shown = (f"**{r.verdict}**" if half == r.verdict
                 else f"**budget-dependent** ({r.verdict}; {half} at half the budget)")
        statement = r.statement if r.source.startswith("ours") else f'"{r.statement}"'
        p_holm = "-" if pd.isna(r.p_holm) else f"{r.p_holm:.2g}"
        lines.append(f"| {r.claim}. [{statement}]({figures_url}/{r.figure}.png) ({r.source}) | "
                     f"{r.setup} | {r.metric} | {r.test} | {_estimate(r)} | {p_holm} | "
                     f"{r.seeds} ({_count(r.seeds_planned)}) | {r.not_converged} | "
                     f"{r.trained}/{r.runs} | {shown} |")
    summary = seeds_summary(table)
    return "\n".join(lines + (["", summary] if summary else [])) + "\n"


def seeds_summary(table: pd.DataFrame) -> str:
    """One sentence per claim: how many seeds its rows would need for 80% power against their
    margin at the family's level (see :func:`frame`), so the reader sees which claims more
    seeds could decide, and which none up to :data:`MAX_SEEDS` can."""
    parts = []
    for claim, family in table.groupby("claim", sort=False):
        needed = family.seeds_planned.dropna()
        if needed.empty:
            continue
        beyond = int((needed > MAX_SEEDS).sum())
        parts.append(f"{claim}: {_count(needed.min())} to {_count(needed.max())}"
                     + (f" ({beyond} of {len(needed)} rows undecidable at {MAX_SEEDS} seeds)"
                        if beyond else ""))
    if not parts:
        return ""
    return ("Seeds planned from the pilot for 80% power against each row's margin at its "
            "family's level (params/plan.yaml), per claim (the rows' range): " + "; ".join(parts) + ".")


def with_plan(table: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """``table`` with each row's planned seed count (``seeds_planned``) from the analysis plan
    ``plan`` (the parsed params/plan.yaml, :mod:`irn.paper.plan`): a number, ``inf`` where
    the plan found the row undecidable at :data:`MAX_SEEDS` seeds, NaN where it did not plan
    the row (a conjunction, or a pilot row without spread)."""
    planned = {(claim, setup): float("inf") if isinstance(n, str) else float(n)
               for claim, family in plan["families"].items()
               for setup, n in family["rows"].items()}
    return table.assign(seeds_planned=[planned.get((c, s), float("nan"))
                                       for c, s in zip(table.claim, table.setup)])


def with_half_budget(table: pd.DataFrame, half: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the verdict of each row at half the training budget (``half``, the
    table of the same runs trained half as long) as ``verdict_half``; a row missing there
    keeps its own verdict."""
    keys = ["claim", "setup"]
    require(not half.duplicated(keys).any(), "half: (claim, setup) must identify a row")
    merged = table.merge(half[keys + ["verdict"]].rename(columns={"verdict": "verdict_half"}),
                         on=keys, how="left")
    merged["verdict_half"] = merged.verdict_half.fillna(merged.verdict)
    return merged


def compare(first: pd.DataFrame, second: pd.DataFrame, labels=("first", "second")) -> pd.DataFrame:
    """The rows of two claims tables side by side (e.g. two training budgets): per
    ``(claim, setup)`` found in both, each table's estimate, bound and verdict, and ``changed`` when
    the verdicts differ. Rows found in only one table are left out (their setups differ)."""
    require(len(labels) == 2 and labels[0] != labels[1], f"labels must be two different names, "
                                                         f"got {labels!r}")
    keys = ["claim", "setup"]
    for name, t in zip(labels, (first, second)):
        require(not t.duplicated(keys).any(), f"{name}: (claim, setup) must identify a row")
    both = first.merge(second, on=keys, suffixes=[f"_{label}" for label in labels])
    out = both[keys].copy()
    for label in labels:
        out[label] = [f"{e:+.3g} [{b}]" for e, b in zip(both[f"estimate_{label}"],
                                                        both[f"bound_{label}"].fillna(""))]
        out[f"verdict {label}"] = both[f"verdict_{label}"]
    out["changed"] = both[f"verdict_{labels[0]}"] != both[f"verdict_{labels[1]}"]
    return out.reset_index(drop=True)


VERDICTS = ("holds", "equivalent", "contradicted", "inconclusive")


def agreement(first: pd.DataFrame, second: pd.DataFrame, labels=("pilot", "confirmation")) -> str:
    """Where two claims tables (the pilot's and the confirmation's) agree, in Markdown: the
    rows found in both counted by their verdict in each (a cross table: the diagonal agrees),
    and the rows found in only one of them."""
    both = compare(first, second, labels)
    counts = pd.crosstab(both[f"verdict {labels[0]}"], both[f"verdict {labels[1]}"])
    counts = counts.reindex(index=VERDICTS, columns=VERDICTS, fill_value=0)
    lines = [f"| {labels[0]} \\ {labels[1]} | " + " | ".join(VERDICTS) + " | rows |",
             "|---|" + "---|" * (len(VERDICTS) + 1)]
    for verdict, row_ in counts.iterrows():
        cells = [f"**{n}**" if v == verdict else str(n) for v, n in row_.items()]
        lines.append(f"| {verdict} | " + " | ".join(cells) + f" | {row_.sum()} |")
    keys = ["claim", "setup"]
    alone = [len(t.merge(o[keys], on=keys, how="left", indicator=True).query("_merge == 'left_only'"))
             for t, o in ((first, second), (second, first))]
    first_verdict = both[f"verdict {labels[0]}"]
    decided = first_verdict != "inconclusive"
    kept = int((decided & ~both.changed).sum())
    newly = int((~decided & both.changed).sum())
    return ("\n".join(lines) + f"\n\nOf the {int(decided.sum())} rows the {labels[0]} decided, "
            f"{kept} read the same in the {labels[1]}; of its {int((~decided).sum())} inconclusive "
            f"rows, the {labels[1]} decided {newly}. {alone[0]} rows are only in the "
            f"{labels[0]}'s table and {alone[1]} only in the {labels[1]}'s.\n")


# ------------------------------------------------------------------ per-seed quantities

def _final(histories: pd.DataFrame, column: str) -> pd.Series:
    """``column`` after the last epoch, indexed by (depth, theta, seed)."""
    last = histories[histories.epoch == histories.epoch.max()]
    return last.set_index(["depth", "theta", "seed"])[column]


def _converged(histories: pd.DataFrame) -> pd.Series:
    """Whether every solve of every epoch converged, per (depth, theta, seed)."""
    return histories.groupby(["depth", "theta", "seed"]).converged.all()


def loss_change(history: pd.DataFrame, tail: float = SETTLED_TAIL) -> float:
    """Relative change of one run's training loss over its last ``tail`` share of epochs:
    ``|L_last - L_start| / |L_start|``, ``L_start`` the loss ``ceil(tail * epochs)`` epochs
    before the last (NaN for a non-finite loss)."""
    losses = history.sort_values("epoch").train_loss.to_numpy()
    back = min(len(losses) - 1, max(1, int(np.ceil(tail * len(losses)))))
    start, last = losses[-1 - back], losses[-1]
    return float(abs(last - start) / abs(start)) if np.isfinite([start, last]).all() and start else float("nan")


def of_runs(values: pd.Series, runs: pd.DataFrame, keys: list[str],
            index=("depth", "theta", "seed")) -> pd.Series:
    """The ``values`` (one per run, indexed by the columns ``keys``) of the runs in a history
    frame, indexed by its columns ``index``: what the rows of a claim take."""
    chosen = runs[keys].drop_duplicates()
    return pd.Series([values[tuple(k)] for k in chosen.itertuples(index=False)],
                     index=pd.MultiIndex.from_frame(chosen[list(index)]))


def settled(histories: pd.DataFrame, by=("depth", "theta", "seed"),
            tolerance: float = SETTLED) -> pd.Series:
    """Per run (the groups of ``by``): whether its training loss changed by at most
    ``tolerance`` (relative) over the last 10% of its epochs (:func:`loss_change`): the
    budget let it finish training."""
    changes = histories.groupby(list(by)).apply(loss_change, include_groups=False)
    return changes <= tolerance


def _explicit_minus_each(values: pd.Series) -> dict:
    """Per implicit theta: the explicit model's value minus that model's, per seed;
    ``values`` indexed by (theta, seed)."""
    table = values.unstack("theta")
    return {theta: table[0.0] - table[theta] for theta in table.columns if theta > 0}


def _gradient_ratio(histories: pd.DataFrame, depth: int) -> pd.Series:
    """log10 of the first layer's over the last layer's mean |gradient| (averaged over
    epochs), per (theta, seed) at ``depth``: below 0, gradients shrink on their way back."""
    runs = histories[histories.depth == depth].groupby(["theta", "seed"])
    first, last = runs["grad_0"].mean(), runs[f"grad_{depth - 1}"].mean()
    return np.log10(first / last)


def function_approximation_rows(histories: pd.DataFrame, setup: str, *, shallow: int,
                                deep: int | None = None, gains: pd.Series | None = None,
                                regularized: pd.DataFrame | None = None,
                                figure_suffix: str = "", gain_thetas=None) -> list[dict]:
    """Claims 1-5 on Example 1 from the histories of :func:`irn.paper.training.train` (with
    ``depth``, ``theta``, ``seed`` columns; ``theta = 0`` and some ``theta > 0`` at the
    depths ``shallow`` and ``deep``), one row per implicit network where the sentence is about
    several (their conjunction added by :func:`frame`). ``gains``: the log10 gain of a
    perturbation through each trained network (:func:`irn.paper.robustness.perturbation_gain`),
    indexed by (depth, theta, seed) (claim 2: the explicit network against each implicit theta,
    or each in ``gain_thetas``, and every network's own gain against 0). ``regularized``:
    histories of models retrained with R_fp (same keys, a subset of the implicit ones; claim
    5). Each row links its claim's figure with ``figure_suffix`` appended."""
    train = np.log10(_final(histories, "train_loss"))
    val = np.log10(_final(histories, "val_loss"))
    converged, trained = _converged(histories), settled(histories)
    rows = []

    def linked(claim, where, per_seed, runs, **kwargs):
        return row(claim, where, per_seed, **runs, figure=CLAIMS[claim].figure + figure_suffix,
                   **kwargs)

    def behind(depth, thetas):
        """The runs behind a row at ``depth``: how many, unconverged, trained."""
        c, t = converged.loc[depth], trained.loc[depth]
        keep = c.index.get_level_values("theta").isin(list(thetas))
        c, t = c[keep], t[keep]
        return dict(not_converged=int((~c).sum()), trained=int(t.sum()), runs=len(c))

    for claim, values in (("1a", train), ("1b", val)):
        for theta, diff in _explicit_minus_each(values.loc[shallow]).items():
            rows.append(linked(claim, setup, diff, behind(shallow, (0.0, theta)),
                               component=f"theta = {theta:g}"))
    if gains is not None:
        table = gains.loc[shallow].unstack("theta")
        thetas = sorted(t for t in table.columns if t > 0) if gain_thetas is None \
            else sorted(gain_thetas)
        for theta in thetas:
            rows.append(linked("2", setup, table[0.0] - table[theta],
                               behind(shallow, (0.0, theta)), component=f"theta = {theta:g}"))
        rows.append(linked("2", f"{setup}, explicit network's own gain (> 0: unstable)",
                           table[0.0], behind(shallow, (0.0,))))
        for theta in thetas:
            rows.append(linked("2", setup, table[theta], behind(shallow, (theta,)),
                               component=f"theta = {theta:g}, own gain (< 0: stable)", side="<",
                               conjunction="every implicit network stable"))
    if deep in train.index.get_level_values("depth"):
        for claim, values in (("3a", train.loc[deep]), ("3b", _gradient_ratio(histories, deep))):
            for theta, diff in _explicit_minus_each(values).items():
                rows.append(linked(claim, setup, diff, behind(deep, (0.0, theta)),
                                   component=f"theta = {theta:g}"))
        deep_train = train.loc[deep].unstack("theta")
        implicit = [t for t in deep_train.columns if t > 0]
        for i, a in enumerate(implicit):
            for b in implicit[i + 1:]:
                rows.append(linked("3c", setup, deep_train[a] - deep_train[b], behind(deep, (a, b)),
                                   component=f"theta = {a:g} vs {b:g}"))
    for depth in (shallow, deep):
        if depth is None or depth not in converged.index.get_level_values("depth"):
            continue
        runs = converged.loc[depth]
        for theta in sorted(t for t in runs.index.get_level_values("theta").unique() if t > 0):
            rows.append(linked("4", f"{setup}, L = {depth}", runs.loc[theta],
                               behind(depth, (theta,)), component=f"theta = {theta:g}"))
    if regularized is not None:
        rows += [r | {"figure": r["figure"] + figure_suffix}
                 for r in _fixed_point_rows(histories, regularized, setup)]
    return rows


def _fixed_point_rows(plain: pd.DataFrame, regularized: pd.DataFrame, setup: str) -> list[dict]:
    """Claim 5 per (depth, theta) retrained with R_fp: per seed, the difference with minus
    without it. 5a is read twice, both in its family: over all runs (an unconverged run counts
    its iteration cap, a lower bound of what converging would take) and over the pairs whose
    two runs converged in every solve (what "iterations required for the convergence" counts
    where it is defined), where those differ."""
    def iterations(histories):
        columns = [c for c in histories.columns if c.startswith("forward_iterations_")]
        tail = histories[histories.epoch > 0.9 * histories.epoch.max()]
        return tail.assign(i=tail[columns].mean(axis=1)).groupby(["depth", "theta", "seed"]).i.mean()

    keys = regularized.groupby(["depth", "theta", "seed"]).size().index
    # per run, once: whether its solves all converged and its training settled, both models
    converged = [_converged(h).loc[keys] for h in (plain, regularized)]
    done = [settled(h).loc[keys] for h in (plain, regularized)]

    def behind(runs):
        """The runs (with and without R_fp) behind a row over the keys ``runs``."""
        return dict(not_converged=int(sum((~c.loc[runs]).sum() for c in converged)),
                    trained=int(sum(t.loc[runs].sum() for t in done)), runs=2 * len(runs))

    iteration_change = iterations(regularized) - iterations(plain).loc[keys]
    loss_change_ = (np.log10(_final(regularized, "train_loss"))
                    - np.log10(_final(plain, "train_loss")).loc[keys])
    rows = []
    for (depth, theta), group in iteration_change.groupby(["depth", "theta"]):
        runs = group.index
        label = f"{setup}, R_fp at L = {depth}, theta = {theta:g}"
        rows.append(row("5a", f"{label}, all runs", group.droplevel(["depth", "theta"]),
                        **behind(runs)))
        ok = (converged[0].loc[runs] & converged[1].loc[runs]).to_numpy()
        if ok.sum() < len(ok):
            rows.append(row("5a", f"{label}, converged pairs ({int(ok.sum())})",
                            group[ok].droplevel(["depth", "theta"]), **behind(runs[ok])))
        rows.append(row("5b", label, loss_change_.loc[runs].droplevel(["depth", "theta"]),
                        **behind(runs)))
    return rows


def classification_rows(results: pd.DataFrame, setup: str, *, reference="none",
                        figure_suffix: str = "", validation_points: int | None = None) -> list[dict]:
    """Claim 6 from one row per (variant, seed) with columns ``variant``, ``seed``,
    ``val_accuracy`` and ``pgd_accuracy`` (fractions), ``converged`` and ``trained``
    (:func:`settled`): each variant against ``reference`` (the unregularised ResNet), per
    seed, in accuracy points, compared as whole validation points where
    ``validation_points`` (the validation set's size) is given. Each row links its claim's
    figure with ``figure_suffix`` appended."""
    resolution = None if validation_points is None else 100 / validation_points
    table = results.set_index(["variant", "seed"]).sort_index()
    rows = []
    for variant in [v for v in results.variant.unique() if v != reference]:
        both = table.loc[[variant, reference]]
        runs = dict(not_converged=int((~both.converged).sum()), trained=int(both.trained.sum()),
                    runs=len(both))
        for claim, column in (("6a", "val_accuracy"), ("6b", "pgd_accuracy")):
            change = 100 * (table[column].loc[variant] - table[column].loc[reference])
            rows.append(row(claim, f"{setup}, {variant}", change, **runs,
                            figure=CLAIMS[claim].figure + figure_suffix, resolution=resolution))
    return rows


def robustness_rows(summary: pd.DataFrame, setup: str, *,
                    validation_points: int | None = None) -> list[dict]:
    """Claim 7 from one row per (theta, regularizer, seed) of one dataset with columns
    ``theta``, ``regularizer`` (``none``/``R_stab``), ``seed``, ``growth`` (mean per-layer
    growth), ``pgd`` (accuracy, %), ``converged`` and ``trained`` (:func:`settled`); claim
    7c once per theta trained with R_stab. PGD accuracies are compared as whole validation
    points where ``validation_points`` (the validation set's size) is given."""
    resolution = None if validation_points is None else 100 / validation_points
    table = summary.set_index(["theta", "regularizer", "seed"]).sort_index()
    low, high = table.index.get_level_values("theta").min(), table.index.get_level_values("theta").max()

    def change(column, a, b):
        return table[column].loc[a] - table[column].loc[b]

    def behind(*keys):
        both = pd.concat([table.loc[k] for k in keys])
        return dict(not_converged=int((~both.converged).sum()), trained=int(both.trained.sum()),
                    runs=len(both))

    plain_low, plain_high = (low, "none"), (high, "none")
    rows = [row("7a", setup, change("growth", plain_high, plain_low), **behind(plain_low, plain_high)),
            row("7b", setup, change("pgd", plain_high, plain_low), **behind(plain_low, plain_high),
                resolution=resolution)]
    for theta in sorted(table.xs("R_stab", level="regularizer").index.get_level_values("theta").unique()):
        rows.append(row("7c", f"{setup}, theta = {theta:g}",
                        change("pgd", (theta, "R_stab"), (theta, "none")),
                        **behind((theta, "none"), (theta, "R_stab")), resolution=resolution))
    return rows
