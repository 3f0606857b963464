"""The notebooks' printed tables and the frames behind them: what a notebook shows, assembled
and formatted here so that the notebook keeps only the story."""

from __future__ import annotations

from .._checks import missing_extra

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.tables", err) from err

from . import claims, statistics


def example1_summary(table: pd.DataFrame) -> str:
    """Notebook 2's checked summary (a :func:`irn.paper.training.summarize` table with
    ``layout`` and ``variant``): converged seeds, and the median final losses and mean
    iterations of the models whose every seed converged ("-" for the others: chaotic)."""
    ok = table.converged_seeds == table.seeds

    def shown(column, form):
        return [form.format(v) if good else "-" for v, good in zip(table[column], ok)]

    return pd.DataFrame({
        "layout": table.layout, "variant": table.variant, "L": table.depth, "theta": table.theta,
        "converged seeds": [f"{c}/{n}" for c, n in zip(table.converged_seeds, table.seeds)],
        "train MSE": shown("train_loss", "{:.2e}"), "val MSE": shown("val_loss", "{:.2e}"),
        "fwd iters": shown("forward_iterations", "{:.1f}"),
        "bwd iters": shown("backward_iterations", "{:.1f}"),
    }).to_string(index=False)


def example1_spread(table: pd.DataFrame) -> str:
    """Notebook 2's unchecked summary of every model: the share of epochs whose solves
    converged, the final training loss's median and range over seeds, and the rest."""
    return pd.DataFrame({
        "layout": table.layout, "variant": table.variant, "L": table.depth, "theta": table.theta,
        "epochs converged": [f"{v:.0%}" for v in table.converged_epochs],
        "train MSE median [min, max]": [
            f"{m:.1e} [{lo:.1e}, {hi:.1e}]"
            for m, lo, hi in zip(table.train_loss, table.train_loss_min, table.train_loss_max)],
        "val MSE median": [f"{v:.1e}" for v in table.val_loss],
        "fwd iters": [f"{v:.1f}" for v in table.forward_iterations],
        "bwd iters": [f"{v:.1f}" for v in table.backward_iterations],
    }).to_string(index=False)


def final_accuracy(histories: pd.DataFrame, columns: list[str]) -> dict[str, pd.DataFrame]:
    """The final validation accuracy per seed (rows) and variant (``columns``), one frame per
    dataset, from histories with ``dataset``, ``variant`` and ``seed`` columns."""
    tables = {}
    for dataset, runs in histories.groupby("dataset", sort=False):
        last = runs[runs.epoch == runs.epoch.max()]
        tables[dataset] = last.pivot(index="seed", columns="variant", values="val_accuracy")[columns]
    return tables


def accuracy_per_seed(table: pd.DataFrame, learned: float) -> str:
    """A :func:`final_accuracy` frame in %, and how many seeds of each variant learn (reach
    ``learned``)."""
    counts = ", ".join(f"{c}: {n}/{len(table)}" for c, n in (table >= learned).sum().items())
    return f"{(100 * table).round(1).to_string()}\nseeds that learn: {counts}"


def measurements(models: dict, measured: list, histories: pd.DataFrame, keys: list[str],
                 with_training: bool = False):
    """The robustness measurements of ``models`` (``measured``: what
    :func:`irn.paper.robustness.measure_many` returned for them, in order) as three long
    frames ``(curves, growth, summary)`` with the models' ``keys`` (tags and seed) as columns.
    ``summary`` gains ``trained`` (the run's loss settled, :func:`irn.paper.claims.settled`)
    and, ``with_training``, ``converged`` counts every solve of the training too."""
    trained = claims.settled(histories, by=keys)
    trained_converged = histories.groupby(keys).converged.all() if with_training else None
    curves, growth, summary = [], [], []
    for key, (c, g, s) in zip(models, measured):
        tags = dict(zip(keys, key))
        curves.append(c.assign(**tags))
        growth.append(pd.DataFrame({"layer": range(1, len(g) + 1), "growth": g}).assign(**tags))
        converged = s["converged"] and (trained_converged is None or bool(trained_converged[key]))
        summary.append(tags | s | {"converged": converged, "trained": bool(trained[key])})
    return (pd.concat(curves, ignore_index=True), pd.concat(growth, ignore_index=True),
            pd.DataFrame(summary))


def accuracies(curves: pd.DataFrame, summary: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per model (of :func:`measurements` at one noise size and one attack size):
    ``val_accuracy`` (clean), ``noise_accuracy`` (Gaussian), ``pgd_accuracy``, ``converged``
    and ``trained``, with the models' ``keys`` as columns, in the models' order."""
    frame = summary.set_index(keys)
    at = curves.pivot_table(index=keys, columns="perturbation", values="accuracy").reindex(frame.index)
    return pd.DataFrame({"val_accuracy": frame.clean_accuracy, "noise_accuracy": at["gaussian"],
                         "pgd_accuracy": at["pgd"], "converged": frame.converged,
                         "trained": frame.trained}).reset_index()


def intervals(frame: pd.DataFrame, by: list[str], columns: list[str]) -> str:
    """``columns`` (shares) in %, per group of ``by``: the Hodges-Lehmann estimate over seeds
    and its 95% signed-rank interval (:func:`irn.paper.statistics.signed_rank_interval`)."""
    def interval(values):
        centre, low, high = statistics.signed_rank_interval(100 * values)
        return f"{centre:5.1f} [{low:5.1f}, {high:5.1f}]"

    return frame.groupby(by, sort=False)[columns].agg(interval).to_string()


def robustness_summary(table: pd.DataFrame, seeds: int, sigma: dict, epsilon: dict) -> str:
    """Notebook 4's summary (:func:`irn.paper.robustness.summary_table` at the noise ``sigma``
    and attack ``epsilon`` per dataset): mean +- standard deviation over seeds of each
    accuracy, mean iterations, converged seeds of ``seeds``."""
    metrics = ["clean_accuracy", "gaussian", "fgsm", "pgd"]
    shown = pd.DataFrame({m: [f"{a:5.1f} ± {s:4.1f}" for a, s in zip(table[m], table[f"{m}_std"])]
                          for m in metrics}, index=table.index)
    shown["iterations"] = table.forward_iterations.map("{:.0f}".format)
    shown["converged"] = table.converged_seeds.map(lambda n: f"{n}/{seeds}")
    return (f"validation accuracy (%), mean ± std over {seeds} seed(s); Gaussian at sigma = "
            f"{sigma} ; FGSM/PGD at epsilon = {epsilon}\n{shown.to_string()}")


def solver_iterations(forward: pd.DataFrame, backward: pd.DataFrame, layers: int) -> str:
    """Notebook 4's checked solver comparison (:mod:`irn.paper.diagnostics`' tables): mean and
    largest iterations per solver, forward and backward, and how many of the ``layers``
    converged with each."""
    columns = ["iterations", "max_iterations"]
    converged = ", ".join(f"{name} {n}/{layers}" for name, n in zip(
        [*forward.solver, *backward.backward], [*forward.converged_layers, *backward.converged_layers]))
    return (f"{forward.set_index('solver')[columns].round(1).to_string()}\n\n"
            f"{backward.set_index('backward')[columns].round(1).to_string()}\n\n"
            f"converged layers: {converged}")


def solver_costs(forward: pd.DataFrame, backward: pd.DataFrame) -> str:
    """Notebook 4's unchecked solver comparison: wall time per call and the largest difference
    from the reference solver's output (forward) or gradient (backward)."""
    form = "{:.2e}".format
    return (forward.set_index("solver")[["ms", "max_output_difference"]].to_string(float_format=form)
            + "\n" + backward.set_index("backward")[["ms", "max_gradient_difference"]]
            .to_string(float_format=form))


def other_network(paper: pd.Series, ours: pd.Series, described: str, ours_described: str,
                  learned: float) -> str:
    """Notebook 3's comparison of another network on the swiss roll with ours: the final
    validation accuracy per seed in %, the medians and how many seeds learn."""
    return (f"{described}, no regulariser:\n{(100 * paper.rename_axis(None)).round(1).to_string()}\n"
            f"median {100 * paper.median():.1f}%; seeds that learn: {(paper >= learned).sum()}/"
            f"{len(paper)}; {ours_described}, same settings: median {100 * ours.median():.1f}%, "
            f"{(ours >= learned).sum()}/{len(ours)} learn")
