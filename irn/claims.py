"""The paper's claims as rows with a verdict (docs/design.md, section 7).

Each claim is read as a per-seed quantity (a paired difference: the same seed, hence the same
initial weights, under the two models compared) whose mean the paper puts on one side of a
threshold. :func:`row` estimates that mean with a percentile bootstrap over seeds (a fixed
generator, so the table is deterministic) and gives the verdict: **holds** when the 95%
interval lies on the claimed side, **contradicted** when it lies on the other side,
**inconclusive** otherwise. The ``*_rows`` functions compute the per-seed quantities from
the notebooks' results; :func:`table` collects the rows every notebook saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._checks import choice, missing_extra, require

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.claims", err) from err

COLUMNS = ["claim", "setup", "statement", "metric", "estimate", "low", "high", "seeds",
           "not_converged", "trained", "runs", "verdict", "figure"]
VERDICTS = ("holds", "contradicted", "inconclusive")
#: fewer seeds than this give no verdict (inconclusive), whatever the interval: the percentile
#: bootstrap of a handful of values is far too narrow (two seeds give two distinct means)
MIN_SEEDS = 8
#: a run has finished training when its training loss moved by at most SETTLED (relative)
#: over its last SETTLED_TAIL share of epochs
SETTLED, SETTLED_TAIL = 0.01, 0.1


@dataclass(frozen=True)
class Claim:
    """``statement`` (the paper's words, shortened) read as: the mean over seeds of
    ``metric`` lies on ``side`` (``"<"`` or ``">"``) of ``threshold``; ``figure`` is the
    figure it rests on (a file stem in ``figures/``)."""

    statement: str
    metric: str
    side: str
    threshold: float
    figure: str


CLAIMS = {
    "1a": Claim("L = 5: the explicit ResNet has the best training loss",
                "log10 train MSE: explicit minus the best implicit", "<", 0.0, "figure4_losses"),
    "1b": Claim("L = 5: the explicit ResNet is second worst on validation",
                "log10 val. MSE: explicit minus the median implicit", ">", 0.0, "figure4_losses"),
    "2": Claim("Figure 7: the explicit ResNet is unstable, all implicit networks are stable",
               "log10 gain of a perturbation through the L = 5 layers: explicit minus the "
               "largest implicit", ">", 0.0, "figure7_shallow_dynamics"),
    "3a": Claim("L = 20: the explicit ResNet is stuck in a local minimum",
                "log10 train MSE: explicit minus the median implicit", ">", 0.0, "figure4_losses"),
    "3b": Claim("L = 20: ... and struggles to propagate its gradients",
                "log10 mean |gradient|: explicit minus the median implicit", "<", 0.0,
                "figure6_gradients"),
    "4": Claim("Figure 5: the fixed-point and Neumann iterations converge",
               "share of implicit models whose every solve converged", ">", 0.9,
               "figure5_iterations"),
    "5a": Claim("Eq. 9: R_fp reduces the fixed-point iterations",
                "forward iterations per layer (last 10% of epochs): with minus without R_fp",
                "<", 0.0, "figure5b_fixed_point_regularizer"),
    "5b": Claim("Eq. 9: ... at no cost in loss",
                "log10 train MSE: with minus without R_fp (0.1: 26% worse)", "<", 0.1,
                "figure5b_fixed_point_regularizer"),
    "6a": Claim("Figure 9: R_stab gives more accurate networks than the original ResNet",
                "validation accuracy (points): with minus without R_stab", ">", 0.0,
                "figure9_decision_regions"),
    "6b": Claim("Figure 9: R_stab gives more robust networks than the original ResNet",
                "PGD accuracy (points): with minus without R_stab", ">", 0.0,
                "figure9_decision_regions"),
    "7a": Claim("Abstract: implicit layers improve the stability of forward propagation",
                "mean per-layer growth of a hidden-state perturbation: theta = 1 minus theta = 0",
                "<", 0.0, "figure_perturbation_growth"),
    "7b": Claim("Abstract: implicit layers make networks robust",
                "PGD accuracy (points): theta = 1 minus theta = 0", ">", 0.0,
                "figure_robustness_curves"),
    "7c": Claim("Abstract: robustness is controlled by a few hyperparameters (R_stab)",
                "PGD accuracy (points), theta = 0: with minus without R_stab", ">", 0.0,
                "figure_robustness_curves"),
}


def bootstrap_interval(values, *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` (one per seed) and its percentile bootstrap interval: the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the means of ``resamples``
    resamples with replacement, drawn from ``numpy.random.default_rng(seed)``."""
    values = np.asarray(values, dtype=float)
    require(values.ndim == 1 and len(values) >= 1 and np.isfinite(values).all(),
            f"values must be a non-empty 1-d array of finite numbers, got {values!r}")
    require(0 < level < 1, f"level must be in (0, 1), got {level!r}")
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def verdict(low: float, high: float, side: str, threshold: float) -> str:
    """``holds`` when ``[low, high]`` lies strictly on ``side`` of ``threshold``,
    ``contradicted`` when it lies strictly on the other side, else ``inconclusive``."""
    choice("side", side, ("<", ">"))
    below, above = high < threshold, low > threshold
    if below or above:
        return "holds" if below == (side == "<") else "contradicted"
    return "inconclusive"


def row(claim: str, setup: str, per_seed, *, not_converged: int = 0, trained: int = 0,
        runs: int = 0, figure: str | None = None, seed: int = 0) -> dict:
    """One row of the claims table: ``claim`` (a key of :data:`CLAIMS`) on ``setup``, from
    the per-seed values ``per_seed`` (NaN seeds, e.g. a loss that overflowed, are left out
    and so not counted in ``seeds``); of the ``runs`` behind the row, ``not_converged`` count
    those whose solves did not all converge (kept, and counted) and ``trained`` those whose
    training settled (:func:`settled`); ``figure`` overrides the claim's. With fewer than
    :data:`MIN_SEEDS` seeds the estimate and interval are given and the verdict is
    ``inconclusive``."""
    choice("claim", claim, CLAIMS)
    spec = CLAIMS[claim]
    values = np.asarray(per_seed, dtype=float)
    values = values[np.isfinite(values)]
    estimate = low = high = float("nan")
    if len(values):
        estimate, low, high = bootstrap_interval(values, seed=seed)
    result = (verdict(low, high, spec.side, spec.threshold) if len(values) >= MIN_SEEDS
              else "inconclusive")
    return dict(claim=claim, setup=setup, statement=spec.statement,
                metric=f"{spec.metric} ({spec.side} {spec.threshold:g} claimed)",
                estimate=estimate, low=low, high=high, seeds=len(values),
                not_converged=int(not_converged), trained=int(trained), runs=int(runs),
                verdict=result, figure=figure or spec.figure)


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a table with the columns :data:`COLUMNS`."""
    return pd.DataFrame(rows, columns=COLUMNS)


def show(rows) -> str:
    """The rows as a fixed-width text table (what the notebooks print)."""
    table = rows if isinstance(rows, pd.DataFrame) else frame(rows)
    return pd.DataFrame({
        "claim": table.claim, "setup": table.setup,
        "estimate [95% interval]": [_interval(r) for r in table.itertuples()],
        "seeds": table.seeds, "not conv.": table.not_converged, "verdict": table.verdict,
    }).to_string(index=False)


def _interval(r) -> str:
    return f"{r.estimate:+.3g} [{r.low:+.3g}, {r.high:+.3g}]"


def save(rows: list[dict], name: str, directory) -> Path:
    """Write the rows of one notebook to ``directory/claims/name.csv`` (see :func:`table`)."""
    directory = Path(directory) / "claims"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.csv"
    tmp = directory / f".{name}.tmp.csv"
    frame(rows).to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    return path


def table(directory) -> pd.DataFrame:
    """Every notebook's rows (``directory/claims/*.csv``, in name order): the claims table."""
    paths = sorted((Path(directory) / "claims").glob("*.csv"))
    require(bool(paths), f"directory must hold claims/*.csv written by the notebooks, "
                         f"found none in {directory}")
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)[COLUMNS]


def markdown(table: pd.DataFrame, figures_url: str = "figures") -> str:
    """The claims table in Markdown, each row linking the figure it rests on; a row whose
    verdict at half the training budget (column ``verdict_half``, when present) differs reads
    **budget-dependent** instead of a verdict."""
    lines = ["| claim | setup | what is measured (claimed side) | estimate [95% interval] | "
             "seeds | not converged | trained | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        half = getattr(r, "verdict_half", r.verdict)
        shown = (f"**{r.verdict}**" if half == r.verdict
                 else f"**budget-dependent** ({r.verdict}; {half} at half the budget)")
        lines.append(f"| {r.claim}. [{r.statement}]({figures_url}/{r.figure}.png) | {r.setup} | "
                     f"{r.metric} | {_interval(r)} | {r.seeds} | {r.not_converged} | "
                     f"{r.trained}/{r.runs} | {shown} |")
    return "\n".join(lines) + "\n"


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


def settled(histories: pd.DataFrame, by=("depth", "theta", "seed"),
            tolerance: float = SETTLED) -> pd.Series:
    """Per run (the groups of ``by``): whether its training loss changed by at most
    ``tolerance`` (relative) over the last 10% of its epochs (:func:`loss_change`): the
    budget let it finish training."""
    changes = histories.groupby(list(by)).apply(loss_change, include_groups=False)
    return changes <= tolerance


def _explicit_minus(values: pd.Series, reduce: str) -> pd.Series:
    """Per seed: the explicit model's value minus ``reduce`` (min, max, median) over the
    implicit ones; ``values`` indexed by (theta, seed)."""
    table = values.unstack("theta")
    implicit = table[[t for t in table.columns if t > 0]]
    return table[0.0] - getattr(implicit, reduce)(axis=1)


def function_approximation_rows(histories: pd.DataFrame, setup: str, *, shallow: int,
                                deep: int | None = None, gains: pd.Series | None = None,
                                regularized: pd.DataFrame | None = None,
                                figure_suffix: str = "") -> list[dict]:
    """Claims 1-5 on Example 1 from the histories of :func:`irn.training.train` (with
    ``depth``, ``theta``, ``seed`` columns; ``theta = 0`` and some ``theta > 0`` at the
    depths ``shallow`` and ``deep``). ``gains``: the log10 gain of a perturbation through
    each trained network (:func:`irn.robustness.perturbation_gain`), indexed by (depth,
    theta, seed) (claim 2). ``regularized``: histories of models retrained with R_fp (same
    keys, a subset of the implicit ones; claim 5). Each row links its claim's figure with
    ``figure_suffix`` appended."""
    train = np.log10(_final(histories, "train_loss"))
    val = np.log10(_final(histories, "val_loss"))
    converged, trained = _converged(histories), settled(histories)
    rows = []

    def linked(claim, setup, per_seed, runs):
        return row(claim, setup, per_seed, **runs, figure=CLAIMS[claim].figure + figure_suffix)

    def behind(depth, implicit_only=False):
        """The runs behind a row at ``depth``: how many, unconverged, trained."""
        c, t = converged.loc[depth], trained.loc[depth]
        if implicit_only:
            keep = c.index.get_level_values("theta") > 0
            c, t = c[keep], t[keep]
        return dict(not_converged=int((~c).sum()), trained=int(t.sum()), runs=len(c))

    rows.append(linked("1a", setup, _explicit_minus(train.loc[shallow], "min"), behind(shallow)))
    rows.append(linked("1b", setup, _explicit_minus(val.loc[shallow], "median"), behind(shallow)))
    if gains is not None:
        rows.append(linked("2", setup, _explicit_minus(gains.loc[shallow], "max"), behind(shallow)))
    if deep in train.index.get_level_values("depth"):
        rows.append(linked("3a", setup, _explicit_minus(train.loc[deep], "median"), behind(deep)))
        grads = histories[[c for c in histories.columns if c.startswith("grad_")]]
        mean_grad = np.log10(histories.assign(g=grads.mean(axis=1))
                             .groupby(["depth", "theta", "seed"]).g.mean())
        rows.append(linked("3b", setup, _explicit_minus(mean_grad.loc[deep], "median"),
                           behind(deep)))
    for depth in (shallow, deep):
        if depth is None or depth not in converged.index.get_level_values("depth"):
            continue
        implicit = converged.loc[depth]
        implicit = implicit[implicit.index.get_level_values("theta") > 0]
        share = implicit.groupby("seed").mean()
        rows.append(linked("4", f"{setup}, L = {depth}", share, behind(depth, implicit_only=True)))
    if regularized is not None:
        rows += [r | {"figure": r["figure"] + figure_suffix}
                 for r in _fixed_point_rows(histories, regularized, setup)]
    return rows


def _fixed_point_rows(plain: pd.DataFrame, regularized: pd.DataFrame, setup: str) -> list[dict]:
    """Claim 5: per seed, the difference with minus without R_fp, averaged over the
    (depth, theta) models retrained with it."""
    def iterations(histories):
        columns = [c for c in histories.columns if c.startswith("forward_iterations_")]
        tail = histories[histories.epoch > 0.9 * histories.epoch.max()]
        return tail.assign(i=tail[columns].mean(axis=1)).groupby(["depth", "theta", "seed"]).i.mean()

    keys = regularized.groupby(["depth", "theta", "seed"]).size().index
    depths = sorted({d for d, _, _ in keys})
    thetas = sorted({t for _, t, _ in keys})
    label = f"{setup}, R_fp at L = {', '.join(map(str, depths))}, theta in {thetas}"
    both = pd.concat([_converged(plain).loc[keys], _converged(regularized)])
    trained = pd.concat([settled(plain).loc[keys], settled(regularized)])
    runs = dict(not_converged=int((~both).sum()), trained=int(trained.sum()), runs=len(both))
    iteration_change = (iterations(regularized) - iterations(plain).loc[keys]).groupby("seed").mean()
    loss_diff = (np.log10(_final(regularized, "train_loss"))
                 - np.log10(_final(plain, "train_loss")).loc[keys]).groupby("seed").mean()
    return [row("5a", label, iteration_change, **runs),
            row("5b", label, loss_diff, **runs)]


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
    growth), ``pgd`` (accuracy, %), ``converged`` and ``trained`` (:func:`settled`)."""
    table = summary.set_index(["theta", "regularizer", "seed"]).sort_index()
    low, high = table.index.get_level_values("theta").min(), table.index.get_level_values("theta").max()

    def change(column, a, b):
        return table[column].loc[a] - table[column].loc[b]

    def behind(*keys):
        both = pd.concat([table.loc[k] for k in keys])
        return dict(not_converged=int((~both.converged).sum()), trained=int(both.trained.sum()),
                    runs=len(both))

    plain_low, plain_high = (low, "none"), (high, "none")
    return [row("7a", setup, change("growth", plain_high, plain_low), **behind(plain_low, plain_high)),
            row("7b", setup, change("pgd", plain_high, plain_low), **behind(plain_low, plain_high)),
            row("7c", setup, change("pgd", (low, "R_stab"), plain_low),
                **behind(plain_low, (low, "R_stab")))]
