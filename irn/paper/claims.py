"""The paper's claims as rows with a verdict (docs/design.md, section 7).

Each claim is read as a per-seed quantity (a paired difference: the same seed, hence the same
initial weights, under the two models compared) whose centre the paper puts on one side of a
threshold; claim 4 as a share of runs. :func:`row` and :func:`share_row` estimate it with an
interval that keeps its coverage at ten seeds (:mod:`irn.paper.statistics`) and a p-value;
:func:`frame` decides the verdicts, the p-values of one claim's rows adjusted together (Holm):
**holds** or **contradicted** when the adjusted test rejects the threshold, on the claimed or
the other side; **equivalent** when it does not but the 95% interval lies within the claim's
margin of the threshold (no difference of consequence either way); **inconclusive** otherwise.
The ``*_rows`` functions compute the per-seed quantities from the notebooks' results;
:func:`table` collects the rows every notebook saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import statistics
from .._checks import choice, missing_extra, require

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.claims", err) from err

COLUMNS = ["claim", "setup", "statement", "source", "metric", "estimate", "low", "high", "p",
           "p_holm", "seeds", "seeds_needed", "not_converged", "trained", "runs", "verdict",
           "figure"]
#: family-wise error rate of the tests of one claim's rows (Holm), and the intervals' level
ALPHA = 0.05
#: fewer seeds than this give no verdict (inconclusive), whatever the test says
MIN_SEEDS = 8
#: a run has finished training when its training loss moved by at most SETTLED (relative)
#: over its last SETTLED_TAIL share of epochs
SETTLED, SETTLED_TAIL = 0.01, 0.1

# Margins: the smallest difference we call one (ours; reasons in docs/design.md, section 7).
#: in decades of a loss, gain or gradient: 26%, less than the seed-to-seed spread of one model
DECADES = 0.1
#: in accuracy points: about one validation point of the two spirals (97 points)
POINTS = 1.0


@dataclass(frozen=True)
class Claim:
    """``statement``: the paper's words (verbatim; ``[...]`` marks our insertions) or, where
    ``source`` starts with "ours", our reading of them. Read as: the centre over seeds of
    ``metric`` lies on ``side`` (``"<"`` or ``">"``) of ``threshold``; ``margin`` is the
    smallest difference from the threshold that counts (0: none, no ``equivalent`` verdict);
    ``figure`` the figure it rests on (a file stem in ``figures/``); ``holds_as`` the word for
    a claim that holds (``equivalent`` where the claim itself is one of equivalence)."""

    statement: str
    source: str
    metric: str
    side: str
    threshold: float
    margin: float
    figure: str
    holds_as: str = "holds"


_EX1, _EX2 = "Section 3, Example 1", "Section 3, Example 2"
CLAIMS = {
    "1a": Claim("explicit ResNet has the best training accuracy among networks with [L = 5] "
                "layers", _EX1, "log10 train MSE: explicit minus the best implicit", "<", 0.0,
                DECADES, "figure4_losses"),
    "1b": Claim("but is second worst on the validation dataset", _EX1,
                "log10 val. MSE: explicit minus the second worst implicit (explicit worse than "
                "3 of the 4)", ">", 0.0, DECADES, "figure4_losses"),
    "2": Claim("explicit ResNet is unstable, same figure [7] shows that all implicit networks "
               "are stable", _EX1, "log10 gain of a perturbation through the L = 5 layers: "
               "explicit minus the implicit network named", ">", 0.0, DECADES,
               "figure7_shallow_dynamics"),
    "2-max": Claim("explicit ResNet is unstable, same figure [7] shows that all implicit networks "
                   "are stable", f"{_EX1}; the earlier measure, kept where it alters the verdict",
                   "log10 gain: explicit minus the largest implicit", ">", 0.0, DECADES,
                   "figure7_shallow_dynamics"),
    "3a": Claim("all the networks with [L = 20] layers perform equally well as expected except "
                "the explicit ResNet which, according to Figure 6 is stuck at the local minimum",
                _EX1, "log10 train MSE: explicit minus the median implicit", ">", 0.0, DECADES,
                "figure4_losses"),
    "3b": Claim("and is struggling in propagating its gradients", _EX1,
                "log10 of the first- to last-layer mean |gradient|: explicit minus the median "
                "implicit", "<", 0.0, DECADES, "figure6_gradients"),
    "3c": Claim("all the networks with [L = 20] layers perform equally well", _EX1,
                "log10 train MSE: the worst minus the best implicit (equivalence margin ours: a "
                "factor of 2)", "<", np.log10(2), 0.0, "figure4_losses", holds_as="equivalent"),
    "4": Claim("Figure 5 shows the convergence of fixed-point and Neumann iterations",
               f"{_EX1}; the share 0.9 is ours",
               "share of implicit runs whose every solve converged (unit: runs)", ">", 0.9, 0.0,
               "figure5_iterations"),
    "5a": Claim("Minimization of [R_fp] leads to the reduction of the number of iterations "
                "required for the convergence", "Section 2.1",
                "forward iterations per layer (last 10% of epochs): with minus without R_fp",
                "<", 0.0, 1.0, "figure5b_fixed_point_regularizer"),
    "5b": Claim("R_fp costs no training loss", "ours (the paper says nothing of its cost)",
                "log10 train MSE: with minus without R_fp (equivalent: no cost)", "<", 0.0,
                DECADES, "figure5b_fixed_point_regularizer"),
    "5b-pooled": Claim("R_fp costs no training loss", "ours; the earlier measure, kept where it "
                       "alters the verdict", "log10 train MSE: with minus without R_fp, averaged "
                       "over theta", "<", 0.0, DECADES, "figure5b_fixed_point_regularizer"),
    "6a": Claim("the proposed regularization technique results in a more accurate [...] "
                "networks than original ResNet", _EX2,
                "validation accuracy (points): with minus without R_stab", ">", 0.0, POINTS,
                "figure9_decision_regions"),
    "6b": Claim("the proposed regularization technique results in a more [...] robust "
                "networks than original ResNet", _EX2,
                "PGD accuracy (points): with minus without R_stab", ">", 0.0, POINTS,
                "figure9_decision_regions"),
    "7a": Claim("this choice leads to the improved stability of both forward [...] propagations",
                "Abstract (forward only: backward untested)",
                "mean per-layer growth of a hidden-state perturbation: theta = 1 minus theta = 0",
                "<", 0.0, 0.01, "figure_perturbation_growth"),
    "7b": Claim("fully implicit residual architecture which [...] is unconditionally stable and "
                "robust", "Section 1", "PGD accuracy (points): theta = 1 minus theta = 0", ">",
                0.0, POINTS, "figure_robustness_curves"),
    "7c": Claim("allows to control the robustness of the network with only a few "
                "hyperparameters", "Abstract; R_stab's sigma as that hyperparameter is ours",
                "PGD accuracy (points) at the theta named: with minus without R_stab", ">", 0.0,
                POINTS, "figure_robustness_curves"),
}
def row(claim: str, setup: str, per_seed, *, not_converged: int = 0, trained: int = 0,
        runs: int = 0, figure: str | None = None) -> dict:
    """One row of the claims table: ``claim`` (a key of :data:`CLAIMS`) on ``setup``, from
    the per-seed values ``per_seed`` (a Series indexed by seed, or a sequence; NaN seeds, e.g. a
    loss that overflowed, are left out and not counted in ``seeds``): the signed-rank estimate,
    95% interval and p-value against the claim's threshold (:mod:`irn.paper.statistics`), and the
    seeds a test at the family's strictest Holm level would need. Of the ``runs`` behind the
    row, ``not_converged`` count those whose solves did not all converge (kept, and counted)
    and ``trained`` those whose training settled (:func:`settled`); ``figure`` overrides the
    claim's. The verdict is decided by :func:`frame`, with the other rows of the claim."""
    choice("claim", claim, CLAIMS)
    spec = CLAIMS[claim]
    values = per_seed if isinstance(per_seed, pd.Series) else pd.Series(np.asarray(per_seed, float))
    values = values.astype(float)[np.isfinite(values.astype(float))]
    estimate = low = high = p = float("nan")
    if len(values):
        estimate, low, high = statistics.signed_rank_interval(values.to_numpy(), 1 - ALPHA)
        p = statistics.signed_rank_p(values.to_numpy(), spec.threshold)
    return _row(claim, setup, spec, estimate, low, high, p, len(values), values,
                not_converged, trained, runs, figure)


def share_row(claim: str, setup: str, outcomes, *, not_converged: int = 0, trained: int = 0,
              runs: int = 0, figure: str | None = None) -> dict:
    """A row whose quantity is a share of runs: ``outcomes``, one boolean per run (a Series
    indexed by (..., seed)), estimated by their share with its Clopper-Pearson interval and an
    exact binomial p-value against the claim's threshold; ``seeds`` counts the distinct seeds.
    Other arguments as :func:`row`."""
    choice("claim", claim, CLAIMS)
    spec = CLAIMS[claim]
    outcomes = pd.Series(outcomes).astype(bool)
    require(len(outcomes) >= 1, "outcomes must hold at least one run")
    k, n = int(outcomes.sum()), len(outcomes)
    estimate, low, high = statistics.clopper_pearson(k, n, 1 - ALPHA)
    seeds = (outcomes.index.get_level_values("seed").nunique()
             if "seed" in (outcomes.index.names or []) else n)
    return _row(claim, setup, spec, estimate, low, high, statistics.binomial_p(k, n, spec.threshold),
                seeds, outcomes.astype(float), not_converged, trained, runs, figure)


def _row(claim, setup, spec, estimate, low, high, p, seeds, values, not_converged,
         trained, runs, figure) -> dict:
    return dict(claim=claim, setup=setup, statement=spec.statement, source=spec.source,
                metric=f"{spec.metric} ({spec.side} {spec.threshold:.3g} claimed"
                       + (f", margin {spec.margin:g})" if spec.margin else ")"),
                estimate=estimate, low=low, high=high, p=p, p_holm=float("nan"), seeds=seeds,
                seeds_needed=float("nan"), not_converged=int(not_converged), trained=int(trained),
                runs=int(runs), verdict="inconclusive", figure=figure or spec.figure,
                values=values)


def verdict(estimate: float, low: float, high: float, p_holm: float, claim: str) -> str:
    """The verdict of a row of ``claim`` (see the module docstring): the Holm-adjusted
    ``p_holm`` against :data:`ALPHA` decides a side by ``estimate``; otherwise the interval
    ``[low, high]`` within the claim's margin of its threshold reads ``equivalent``."""
    spec = CLAIMS[claim]
    if p_holm <= ALPHA and estimate != spec.threshold:
        return spec.holds_as if (estimate < spec.threshold) == (spec.side == "<") else "contradicted"
    if spec.margin and spec.threshold - spec.margin < low and high < spec.threshold + spec.margin:
        return "equivalent"
    return "inconclusive"


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a table with the columns :data:`COLUMNS`, decided: the p-values of each
    claim's rows Holm-adjusted together (``p_holm``), the verdicts (:func:`verdict`), and for
    each row of per-seed values the seeds a test at the family's strictest Holm level
    (``ALPHA`` / rows) would need to find an effect as large as the one measured or the
    claim's margin, whichever is larger (:func:`irn.paper.statistics.seeds_needed`)."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    for claim, family in table.groupby("claim", sort=False):
        tested = family.p.notna() & (family.seeds >= MIN_SEEDS)
        adjusted = pd.Series(np.nan, index=family.index)
        adjusted[tested] = statistics.holm(family.p[tested])
        table.loc[family.index, "p_holm"] = adjusted
        for i in family.index:
            r = table.loc[i]
            table.loc[i, "verdict"] = (verdict(r.estimate, r.low, r.high, r.p_holm, claim)
                                       if tested[i] else "inconclusive")
            values = rows[i].get("values") if isinstance(rows, list) else None
            if values is not None and np.isnan(r.seeds_needed) and claim != "4" and tested[i]:
                spec = CLAIMS[claim]
                effect = max(abs(r.estimate - spec.threshold), spec.margin)
                table.loc[i, "seeds_needed"] = (statistics.seeds_needed(
                    values.to_numpy(), effect, alpha=ALPHA / len(family)) if effect > 0 else np.nan)
    return _without_redundant_earlier(table, rows)


def _without_redundant_earlier(table: pd.DataFrame, rows) -> pd.DataFrame:
    """``table`` without the rows of an earlier measure (a row whose dict names the setups of
    the new measure's rows, ``replaced_by``) whose verdict every one of those rows shares: an
    earlier measure is kept only where the change of measure alters a verdict."""
    if not isinstance(rows, list):
        return table
    drop = []
    for i, r in enumerate(rows):
        if "replaced_by" in r:
            base = r["claim"].split("-")[0]
            new = table[(table.claim == base) & table.setup.isin(r["replaced_by"])]
            if len(new) and (new.verdict == table.loc[i, "verdict"]).all():
                drop.append(i)
    return table.drop(index=drop).reset_index(drop=True)


def per_seed(rows: list[dict]) -> pd.DataFrame:
    """The values behind each row, one line per seed (per run for shares): ``claim``,
    ``setup``, ``seed``, ``unit`` (the run's keys where a seed has several) and ``value``, so
    a row can be recomputed by hand."""
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
    """The rows as a fixed-width text table (what the notebooks print)."""
    table = rows if isinstance(rows, pd.DataFrame) else frame(rows)
    return pd.DataFrame({
        "claim": table.claim, "setup": table.setup,
        "estimate [95% interval]": [_interval(r) for r in table.itertuples()],
        "p (Holm)": [f"{p:.2g}" for p in table.p_holm],
        "seeds": table.seeds, "needed": [_count(n) for n in table.seeds_needed],
        "not conv.": table.not_converged, "verdict": table.verdict,
    }).to_string(index=False)


def _interval(r) -> str:
    return f"{r.estimate:+.3g} [{r.low:+.3g}, {r.high:+.3g}]"


def _count(n) -> str:
    return "-" if pd.isna(n) else f"{int(n)}" if n <= 1000 else ">1000"


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
    frames = [pd.read_csv(p) for p in paths]
    return pd.concat(frames, ignore_index=True) if per_seed_values else \
        pd.concat(frames, ignore_index=True)[COLUMNS]


def markdown(table: pd.DataFrame, figures_url: str = "figures") -> str:
    """The claims table in Markdown, each row linking the figure it rests on; a row whose
    verdict at half the training budget (column ``verdict_half``, when present) differs reads
    **budget-dependent** instead of a verdict."""
    lines = ["| claim | setup | what is measured (claimed side) | estimate [95% interval] | "
             "p (Holm) | seeds (needed) | not converged | trained | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        half = getattr(r, "verdict_half", r.verdict)
        shown = (f"**{r.verdict}**" if half == r.verdict
                 else f"**budget-dependent** ({r.verdict}; {half} at half the budget)")
        statement = r.statement if r.source.startswith("ours") else f'"{r.statement}"'
        lines.append(f"| {r.claim}. [{statement}]({figures_url}/{r.figure}.png) ({r.source}) | "
                     f"{r.setup} | {r.metric} | {_interval(r)} | {r.p_holm:.2g} | "
                     f"{r.seeds} ({_count(r.seeds_needed)}) | {r.not_converged} | "
                     f"{r.trained}/{r.runs} | {shown} |")
    return "\n".join(lines + ["", seeds_summary(table)]) + "\n"


def seeds_summary(table: pd.DataFrame) -> str:
    """One sentence per claim: how many seeds its rows would need (see :func:`frame`) against
    the ten they have, so the reader sees which claims more seeds could decide."""
    parts = []
    for claim, family in table.groupby("claim", sort=False):
        needed = family.seeds_needed.dropna()
        if needed.empty:
            continue
        more = int((needed > family.seeds.loc[needed.index]).sum())
        parts.append(f"{claim}: {_count(needed.min())} to {_count(needed.max())} "
                     f"({more} of {len(needed)} rows need more than they have)")
    return ("Seeds needed for 80% power at each claim's Holm level, per claim (the rows' range): "
            + "; ".join(parts) + ".")


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
    ``(claim, setup)`` found in both, each table's interval and verdict, and ``changed`` when
    the verdicts differ. Rows found in only one table are left out (their setups differ)."""
    require(len(labels) == 2 and labels[0] != labels[1], f"labels must be two different names, "
                                                         f"got {labels!r}")
    keys = ["claim", "setup"]
    for name, t in zip(labels, (first, second)):
        require(not t.duplicated(keys).any(), f"{name}: (claim, setup) must identify a row")
    both = first.merge(second, on=keys, suffixes=[f"_{label}" for label in labels])
    out = both[keys].copy()
    for label in labels:
        out[label] = [_interval(r) for r in both[[f"estimate_{label}", f"low_{label}", f"high_{label}"]]
                      .set_axis(["estimate", "low", "high"], axis=1).itertuples()]
        out[f"verdict {label}"] = both[f"verdict_{label}"]
    out["changed"] = both[f"verdict_{labels[0]}"] != both[f"verdict_{labels[1]}"]
    return out.reset_index(drop=True)


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


def _explicit_minus(values: pd.Series, reduce) -> pd.Series:
    """Per seed: the explicit model's value minus ``reduce`` (a DataFrame method name such as
    ``"min"`` or ``"median"``, or a function of the implicit models' (seed x theta) table)
    over the implicit ones; ``values`` indexed by (theta, seed)."""
    table = values.unstack("theta")
    implicit = table[[t for t in table.columns if t > 0]]
    reduced = reduce(implicit) if callable(reduce) else getattr(implicit, reduce)(axis=1)
    return table[0.0] - reduced


def _second_worst(implicit: pd.DataFrame) -> pd.Series:
    """Per seed, the second largest value over the implicit models: the explicit model's
    value above it means it is worse than all but one of them."""
    return implicit.apply(lambda r: np.sort(r.to_numpy())[-min(2, len(r))], axis=1)


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
    depths ``shallow`` and ``deep``). ``gains``: the log10 gain of a perturbation through
    each trained network (:func:`irn.paper.robustness.perturbation_gain`), indexed by (depth,
    theta, seed) (claim 2, one row per implicit theta, or per theta in ``gain_thetas``).
    ``regularized``: histories of models
    retrained with R_fp (same keys, a subset of the implicit ones; claim 5). Each row links
    its claim's figure with ``figure_suffix`` appended."""
    train = np.log10(_final(histories, "train_loss"))
    val = np.log10(_final(histories, "val_loss"))
    converged, trained = _converged(histories), settled(histories)
    rows = []

    def linked(claim, setup, per_seed, runs, make=row):
        return make(claim, setup, per_seed, **runs, figure=CLAIMS[claim].figure + figure_suffix)

    def behind(depth, thetas=None):
        """The runs behind a row at ``depth`` (``thetas``: all): how many, unconverged, trained."""
        c, t = converged.loc[depth], trained.loc[depth]
        if thetas is not None:
            keep = c.index.get_level_values("theta").isin(list(thetas))
            c, t = c[keep], t[keep]
        return dict(not_converged=int((~c).sum()), trained=int(t.sum()), runs=len(c))

    implicit = sorted(t for t in train.loc[shallow].index.get_level_values("theta").unique() if t > 0)
    rows.append(linked("1a", setup, _explicit_minus(train.loc[shallow], "min"), behind(shallow)))
    rows.append(linked("1b", setup, _explicit_minus(val.loc[shallow], _second_worst),
                       behind(shallow)))
    if gains is not None:
        table = gains.loc[shallow].unstack("theta")
        thetas = implicit if gain_thetas is None else sorted(gain_thetas)
        for theta in thetas:
            rows.append(linked("2", f"{setup}, theta = {theta:g}", table[0.0] - table[theta],
                               behind(shallow, (0.0, theta))))
        earlier = linked("2-max", setup, table[0.0] - table[thetas].max(axis=1),
                         behind(shallow, [0.0] + list(thetas)))
        rows.append(earlier | {"replaced_by": [r["setup"] for r in rows[-len(thetas):]]})
    if deep in train.index.get_level_values("depth"):
        rows.append(linked("3a", setup, _explicit_minus(train.loc[deep], "median"), behind(deep)))
        rows.append(linked("3b", setup, _explicit_minus(_gradient_ratio(histories, deep), "median"),
                           behind(deep)))
        deep_implicit = train.loc[deep].unstack("theta")
        deep_implicit = deep_implicit[[t for t in deep_implicit.columns if t > 0]]
        rows.append(linked("3c", setup, deep_implicit.max(axis=1) - deep_implicit.min(axis=1),
                           behind(deep, deep_implicit.columns)))
    for depth in (shallow, deep):
        if depth is None or depth not in converged.index.get_level_values("depth"):
            continue
        runs = converged.loc[depth]
        runs = runs[runs.index.get_level_values("theta") > 0]
        rows.append(linked("4", f"{setup}, L = {depth}", runs,
                           behind(depth, runs.index.get_level_values("theta").unique()),
                           make=share_row))
    if regularized is not None:
        rows += [r | {"figure": r["figure"] + figure_suffix}
                 for r in _fixed_point_rows(histories, regularized, setup)]
    return rows


def _fixed_point_rows(plain: pd.DataFrame, regularized: pd.DataFrame, setup: str) -> list[dict]:
    """Claim 5 per (depth, theta) retrained with R_fp: per seed, the difference with minus
    without it; 5a once more on the seeds whose two runs converged in every solve, where some
    did not (an unconverged run stops at the iteration cap, which R_fp cannot lower)."""
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
        rows.append(row("5a", label, group.droplevel(["depth", "theta"]), **behind(runs)))
        ok = (converged[0].loc[runs] & converged[1].loc[runs]).to_numpy()
        if 0 < ok.sum() < len(ok):
            rows.append(row("5a", f"{label}, converged pairs ({int(ok.sum())})",
                            group[ok].droplevel(["depth", "theta"]), **behind(runs[ok])))
        rows.append(row("5b", label, loss_change_.loc[runs].droplevel(["depth", "theta"]),
                        **behind(runs)))
    pooled = [r for r in rows if r["claim"] == "5b"]
    if len(pooled) > 1:  # the earlier measure: the mean over the retrained (depth, theta)
        depths = ", ".join(map(str, sorted({d for d, _, _ in keys})))
        earlier = row("5b-pooled", f"{setup}, R_fp at L = {depths}",
                      loss_change_.groupby("seed").mean(), **behind(keys))
        rows.append(earlier | {"replaced_by": [r["setup"] for r in pooled]})
    return rows


def classification_rows(results: pd.DataFrame, setup: str, *, reference="none",
                        figure_suffix: str = "") -> list[dict]:
    """Claim 6 from one row per (variant, seed) with columns ``variant``, ``seed``,
    ``val_accuracy`` and ``pgd_accuracy`` (fractions), ``converged`` and ``trained``
    (:func:`settled`): each variant against ``reference`` (the unregularised ResNet), per
    seed, in accuracy points. Each row links its claim's figure with ``figure_suffix``
    appended."""
    table = results.set_index(["variant", "seed"]).sort_index()
    rows = []
    for variant in [v for v in results.variant.unique() if v != reference]:
        both = table.loc[[variant, reference]]
        runs = dict(not_converged=int((~both.converged).sum()), trained=int(both.trained.sum()),
                    runs=len(both))
        for claim, column in (("6a", "val_accuracy"), ("6b", "pgd_accuracy")):
            change = 100 * (table[column].loc[variant] - table[column].loc[reference])
            rows.append(row(claim, f"{setup}, {variant}", change, **runs,
                            figure=CLAIMS[claim].figure + figure_suffix))
    return rows


def robustness_rows(summary: pd.DataFrame, setup: str) -> list[dict]:
    """Claim 7 from one row per (theta, regularizer, seed) of one dataset with columns
    ``theta``, ``regularizer`` (``none``/``R_stab``), ``seed``, ``growth`` (mean per-layer
    growth), ``pgd`` (accuracy, %), ``converged`` and ``trained`` (:func:`settled`); claim
    7c once per theta trained with R_stab."""
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
            row("7b", setup, change("pgd", plain_high, plain_low), **behind(plain_low, plain_high))]
    for theta in sorted(table.xs("R_stab", level="regularizer").index.get_level_values("theta").unique()):
        rows.append(row("7c", f"{setup}, theta = {theta:g}",
                        change("pgd", (theta, "R_stab"), (theta, "none")),
                        **behind((theta, "none"), (theta, "R_stab"))))
    return rows
