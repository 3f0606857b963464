"""One plotting function per figure of the paper, one shared style, deterministic files.

Plotting never trains: every function takes trained models, histories or arrays and
returns a ``matplotlib.figure.Figure``; :func:`save` writes it as PDF and PNG.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .._checks import missing_extra

try:
    import matplotlib
    import matplotlib.lines
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.plotting", err) from err

from .. import stability
from .claims import settled
from .history import median_seed, per_layer

STYLE = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 110,
    "figure.constrained_layout.use": True,  # no clipped labels, no overlapping titles
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "lines.linewidth": 1.4,
    "svg.hashsalt": "irn",
}
SCHEME_LABELS = {"forward_euler": "forward Euler", "backward_euler": "backward Euler",
                 "trapezoidal": "trapezoidal", "verlet": "Verlet"}


def use_style() -> None:
    """Make the shared figure style global (``matplotlib.rcParams``), for inline figures and
    the caller's own plots; the notebooks call it. Nothing here calls it: every figure
    function of this module applies the style only while it draws (:func:`_styled`)."""
    matplotlib.rcParams.update(STYLE)


def _styled(function):
    """Run a figure function (or :func:`save`) with the shared style (a figure function also
    takes ``title=``, its figure's suptitle), then put back the
    caller's values of exactly the keys of ``STYLE``. (Not ``matplotlib.rc_context``: it
    restores every rcParam, ``interactive`` included, which IPython sets when a first figure
    activates its inline backend inside the context: later figures were then not shown.)"""
    @functools.wraps(function)
    def wrapper(*args, title: str | None = None, **kwargs):
        saved = {key: matplotlib.rcParams[key] for key in STYLE}
        matplotlib.rcParams.update(STYLE)
        try:
            fig = function(*args, **kwargs)
            if title is not None:  # every figure function takes title=, its figure's suptitle
                fig.suptitle(title)
            return fig
        finally:
            matplotlib.rcParams.update(saved)
    return wrapper


def theta_colors(thetas) -> dict:
    """A fixed colour per theta (viridis), the same in every figure."""
    cmap = plt.get_cmap("viridis")
    return {t: cmap(0.9 * t) for t in thetas}


@_styled
def save(fig, name: str, directory) -> None:
    """Write ``fig`` to ``directory/name.pdf`` and ``.png`` without timestamps (so a regenerated
    figure diffs cleanly), each through a temporary file and an atomic rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for ext, metadata in (("pdf", {"CreationDate": None, "ModDate": None, "Producer": None,
                                   "Creator": None}),
                          ("png", {"Software": None})):
        path = directory / f"{name}.{ext}"
        tmp = directory / f".{name}.tmp.{ext}"
        fig.savefig(tmp, format=ext, metadata=metadata)
        os.replace(tmp, path)


def save_table(frame: pd.DataFrame, name: str, directory, index: bool = True) -> None:
    """Write ``frame`` to ``directory/name.csv`` (through a temporary file and an atomic
    rename, like :func:`save`), floats with 6 significant digits so that reruns diff cleanly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp.csv"
    frame.to_csv(tmp, index=index, float_format="%.6g")
    os.replace(tmp, directory / f"{name}.csv")


# --------------------------------------------------------------------- notebook 1: stability

@_styled
def phase_diagrams(h: float, steps: int, z0=(1.0, 0.0)):
    """Figure 2: orbits of the four schemes on ``u' = v, v' = -u`` with the exact flow."""
    fig, axes = plt.subplots(1, 4, figsize=(10, 3.0), sharex=True, sharey=True)
    exact = stability.exact_orbit(h / 20, z0, 20 * steps)
    limit = 1.0
    for ax, scheme in zip(axes, stability.SCHEMES):
        orbit = stability.orbit(scheme, h, z0, steps)
        limit = max(limit, np.abs(orbit).max())
        ax.plot(exact[:, 0], exact[:, 1], color="0.5", lw=1, ls="--", label="exact flow")
        ax.plot(orbit[:, 0], orbit[:, 1], "o-", ms=1.8, lw=0.6, color="C0", label="scheme")
        ax.plot(*orbit[0], "o", color="C3", ms=5, label="$z_0$")
        rho = stability.spectral_radius(scheme, h)
        ax.set_title(f"{SCHEME_LABELS[scheme]}\n$\\rho(M) = {rho:.3f}$")
        ax.set_xlabel("$u$")
        ax.set_aspect("equal")
    axes[0].set_ylabel("$v$")
    axes[0].set_xlim(-1.1 * limit, 1.1 * limit)
    axes[0].set_ylim(-1.1 * limit, 1.1 * limit)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(f"Phase diagrams of $u' = v,\\ v' = -u$, step $h = {h}$, {steps} steps")
    return fig


@_styled
def spectral_radii(h_max: float = 4.0, points: int = 401):
    """Spectral radius of one step of each scheme against the step size ``h``."""
    hs = np.linspace(0, h_max, points)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    # Verlet dashed and on top: it coincides with the trapezoidal rule up to h = 2
    for scheme, style in zip(stability.SCHEMES, ("-", "-", "-", (0, (4, 2)))):
        ax.plot(hs, [stability.spectral_radius(scheme, h) for h in hs], ls=style,
                label=SCHEME_LABELS[scheme])
    ax.axhline(1, color="0.3", lw=0.8, ls=":")
    ax.set_xlabel("step size $h$")
    ax.set_ylabel(r"spectral radius $\rho(M(h))$")
    ax.set_ylim(0, 2.5)
    ax.legend(frameon=False)
    return fig


@_styled
def stability_regions(thetas=(0.0, 0.25, 0.5, 0.75, 1.0), extent: float = 4.0):
    """Stability regions ``|R(z)| <= 1`` of the theta-method in the complex ``z = h lambda`` plane."""
    x = np.linspace(-extent, extent, 401)
    zr, zi = np.meshgrid(x, x)
    z = zr + 1j * zi
    fig, axes = plt.subplots(1, len(thetas), figsize=(2.1 * len(thetas), 2.4), sharey=True)
    for ax, theta in zip(axes, thetas):
        amp = np.abs(stability.theta_amplification(theta, z))
        ax.contourf(zr, zi, np.where(np.isfinite(amp), amp, 1e9) <= 1, levels=[0.5, 1.5],
                    colors=["C0"], alpha=0.35)
        ax.contour(zr, zi, np.where(np.isfinite(amp), amp, 1e9), levels=[1.0], colors="C0",
                   linewidths=1)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.axvline(0, color="0.3", lw=0.6)
        ax.set_title(rf"$\theta = {theta}$")
        ax.set_xlabel(r"Re $h\lambda$")
        ax.set_aspect("equal")
        ax.grid(False)
    axes[0].set_ylabel(r"Im $h\lambda$")
    fig.suptitle(r"Stability regions $|R(z)| \leq 1$ (shaded) of the $\theta$-method")
    return fig


# ------------------------------------------------------------ notebook 2: function approximation

def _band(ax, x, values, color, label, log=True):
    """Median over seeds with the interquartile band (with ten seeds and more the min-max
    bands of different models overlap everywhere)."""
    values = np.asarray(values, dtype=float)
    measured = ~np.isnan(values).any(axis=0)  # validation losses may skip epochs (val_every)
    x, values = np.asarray(x)[measured], values[:, measured]
    ax.plot(x, np.median(values, axis=0), color=color, label=label)
    if values.shape[0] > 1:
        low, high = np.percentile(values, [25, 75], axis=0)
        ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")


def _by_model(histories: pd.DataFrame):
    """Group a long history frame (columns ``depth``, ``theta``, ``seed``, ``epoch``, ...)."""
    return histories.groupby(["depth", "theta"], sort=True)


def _per_epoch_grid(histories: pd.DataFrame, quantities: dict, ylabel: str, log: bool,
                    notes: dict | None = None):
    """One row per depth, one column per quantity (``{title: history -> values per epoch}``);
    one curve per theta, median over seeds with the interquartile band. ``notes``
    (``{(depth, theta): text}``) are added to the curves' labels, with one legend per row."""
    depths = sorted(histories.depth.unique())
    colors = theta_colors(sorted(histories.theta.unique()))
    fig, axes = plt.subplots(len(depths), len(quantities), figsize=(8, 2.7 * len(depths)),
                             sharex=True, squeeze=False)
    for (depth, theta), group in _by_model(histories):
        seeds = [g for _, g in group.groupby("seed")]
        label = rf"$\theta = {theta}$" + (f" ({notes[depth, theta]})" if notes else "")
        for col, value in enumerate(quantities.values()):
            _band(axes[depths.index(depth), col], seeds[0].epoch.to_numpy(),
                  [value(g) for g in seeds], colors[theta], label, log=log)
    for row, depth in enumerate(depths):
        for col, title in enumerate(quantities):
            axes[row, col].set_title(f"{title}, $L = {depth}$")
        axes[row, 0].set_ylabel(ylabel)
        if notes:
            axes[row, -1].legend(frameon=False, loc="upper right", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    if not notes:
        axes[0, -1].legend(frameon=False, loc="upper right")
    return fig


@_styled
def losses(histories: pd.DataFrame):
    """Figure 4: training and validation loss per epoch, one panel per depth and loss,
    median over seeds with the interquartile band; each curve's label counts the seeds whose
    training settled (:func:`irn.paper.claims.settled`: loss within 1% over the last 10% of
    epochs), so curves still falling at the end are marked."""

    done = settled(histories)
    notes = {key: f"{int(runs.sum())}/{len(runs)} settled"
             for key, runs in done.groupby(["depth", "theta"])}
    return _per_epoch_grid(histories, {"training loss": lambda h: h.train_loss.to_numpy(),
                                       "validation loss": lambda h: h.val_loss.to_numpy()},
                           "MSE", log=True, notes=notes)


@_styled
def solver_iterations(histories: pd.DataFrame):
    """Figure 5: mean fixed-point (forward) and Neumann (backward) iterations per layer and
    epoch, implicit models only, median over seeds with the interquartile band."""
    return _per_epoch_grid(
        histories[histories.theta > 0],
        {"fixed-point iterations": lambda h: per_layer(h, "forward_iterations").mean(axis=1),
         "Neumann iterations": lambda h: per_layer(h, "backward_iterations").mean(axis=1)},
        "mean per layer", log=False)


@_styled
def gradient_magnitudes(histories: pd.DataFrame):
    """Figure 6: mean absolute gradient of each layer's parameters, averaged over epochs,
    against the layer index; median over seeds with the interquartile band."""
    depths = sorted(histories.depth.unique())
    colors = theta_colors(sorted(histories.theta.unique()))
    fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 2.9), squeeze=False)
    for (depth, theta), group in _by_model(histories):
        ax = axes[0, depths.index(depth)]
        per_seed = [per_layer(g, "grad").mean(axis=0) for _, g in group.groupby("seed")]
        _band(ax, np.arange(1, depth + 1), per_seed, colors[theta], rf"$\theta = {theta}$")
        ax.set_title(f"$L = {depth}$")
        ax.set_xlabel("layer $l$")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0, 0].set_ylabel(r"mean $|\partial \mathcal{L} / \partial w_l|$")
    axes[0, -1].legend(frameon=False, loc="best")
    return fig


def dynamics_of(runs: pd.DataFrame, models: dict, keys: list[str], data, target=None,
                title: str | None = None):
    """:func:`dynamics` of the runs in a history frame (one per theta): the models keyed by the
    frame's columns ``keys``, those whose solves did not all converge in training marked."""
    unconverged = [theta for theta, h in runs.groupby("theta") if not h.converged.all()]
    chosen = runs[keys].drop_duplicates().itertuples(index=False)
    return dynamics({key.theta: models[tuple(key)] for key in chosen}, data,
                    unconverged=unconverged, target=target, title=title)


@_styled
@torch.no_grad()
def dynamics(models: dict, data, grid: int = 17, extent: float = 6.0, unconverged=(),
             target=None):
    """Figures 7 and 8: for each model (``{theta: model}``) the trajectories ``y_0, ..., y_L`` of
    the training inputs in the plane of the first two state components, over the vector field
    ``F_0`` of the first layer when the state is that plane (top), and the output against ``x``
    with the training points and, if given, the ``target`` function (bottom). Models whose
    theta is in ``unconverged`` are marked in their title. The models are evaluated where they
    are (their device and dtype), not moved."""
    thetas = sorted(models)
    colors = theta_colors(thetas)
    fig, axes = plt.subplots(2, len(thetas), figsize=(2.3 * len(thetas), 4.8), squeeze=False)
    x_dense = torch.linspace(float(data.x_val.min()), float(data.x_val.max()), 200,
                             dtype=data.x_val.dtype).unsqueeze(1)
    u, v = np.meshgrid(np.linspace(-extent, extent, grid), np.linspace(-extent, extent, grid))
    planar = all(model.net.dim == 2 for model in models.values())
    for col, theta in enumerate(thetas):
        model = models[theta]
        parameter = next(model.parameters())

        def run(function, tensor):  # on the model's device and dtype; numpy on the host
            return function(tensor.to(parameter.device, parameter.dtype)).cpu().numpy()

        ax = axes[0, col]
        if planar:  # F_0 is a field on this plane only when the state is two-dimensional
            field = run(model.net.blocks[0].F, torch.tensor(np.stack([u.ravel(), v.ravel()], 1)))
            ax.quiver(u, v, field[:, 0], field[:, 1], color="0.55", angles="xy", width=0.004)
            ax.set_xlim(-extent, extent)
            ax.set_ylim(-extent, extent)
        traj = run(model.trajectory, data.x_train)  # (L+1, B, dim)
        for b in range(traj.shape[1]):
            ax.plot(traj[:, b, 0], traj[:, b, 1], "-", color=colors[theta], lw=0.7, alpha=0.8)
        ax.plot(traj[0, :, 0], traj[0, :, 1], "o", ms=2, color="k")
        ax.plot(traj[-1, :, 0], traj[-1, :, 1], "o", ms=2, color="C3")
        ax.set_title(rf"$\theta = {theta}$" + ("\n(solves not converged)" if theta in unconverged
                                                 else ""))
        ax.set_xlabel("$y_1$")
        ax = axes[1, col]
        if target is not None:
            ax.plot(x_dense.numpy(), target(x_dense).numpy(), color="0.6", ls="--",
                    label="target")
        ax.plot(x_dense.numpy(), run(model, x_dense), color=colors[theta], label="model")
        ax.plot(data.x_train.numpy(), data.y_train.numpy(), "o", ms=2.5, color="k",
                label="training")
        ax.set_ylim(-1.6, 1.6)
        ax.set_xlabel("$x$")
    axes[0, 0].set_ylabel("$y_2$")
    axes[1, 0].set_ylabel("output $y_L[2]$" if planar else "output")
    axes[1, 0].legend(frameon=False, loc="lower left", fontsize=7)
    return fig


@_styled
def regularizer_effect(runs: dict):
    """Effect of a regulariser: mean forward iterations per layer and training loss against the
    epoch, for each labelled long history frame (``{label: frame}`` with ``theta`` and
    ``seed`` columns): colour is theta, line style the label; median over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    thetas = sorted({t for frame in runs.values() for t in frame.theta.unique()})
    colors = theta_colors(thetas)
    for style, (label, frame) in zip(("-", "--", ":"), runs.items()):
        for theta, group in frame.groupby("theta", sort=True):
            seeds = [g for _, g in group.groupby("seed")]
            epoch = seeds[0].epoch.to_numpy()
            iterations = np.median([per_layer(g, "forward_iterations").mean(axis=1) for g in seeds], axis=0)
            loss = np.median([g.train_loss.to_numpy() for g in seeds], axis=0)
            axes[0].plot(epoch, iterations, style, color=colors[theta],
                         label=rf"$\theta = {theta}$, {label}")
            axes[1].plot(epoch, loss, style, color=colors[theta])
    axes[0].set_ylabel("fixed-point iterations per layer")
    axes[1].set_ylabel("training MSE")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(frameon=False, fontsize=7)
    return fig


@_styled
def activation_comparison(histories: dict, outputs: dict, data):
    """Training loss and fitted output for the same model with different activations
    (``{label: history}``, ``{label: (x, y)}``)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for i, (label, history) in enumerate(histories.items()):
        axes[0].plot(history.epoch, history.train_loss, color=f"C{i}", label=label)
        x, y = outputs[label]
        axes[1].plot(x, y, color=f"C{i}", label=label)
    axes[1].plot(data.x_train.numpy(), data.y_train.numpy(), "o", ms=2.5, color="k",
                 label="training")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training MSE")
    axes[1].set_xlabel("$x$")
    axes[1].set_ylabel("output")
    axes[0].legend(frameon=False)
    axes[1].legend(frameon=False, fontsize=7)
    return fig


def decision_regions_of(accuracy: pd.DataFrame, models: dict, data, row: str, labels: dict,
                        key) -> plt.Figure:
    """Figure 9 for one dataset from its final validation ``accuracy`` (one row per seed, one
    column per variant): each variant's classifier of the median seed
    (:func:`irn.paper.history.median_seed`), ``models[key(variant, seed)]``, in a column
    ``labels[variant]`` of the row ``row``, and every seed's accuracy in the last panel."""
    panels = {}
    for variant, label in labels.items():
        seed = median_seed(accuracy[variant])
        panels[row, label] = (models[key(variant, seed)], float(accuracy.loc[seed, variant]))
    return decision_regions(panels, data, accuracies={label: accuracy[variant].to_numpy()
                                                      for variant, label in labels.items()})


# ---------------------------------------------------------------------- notebook 3: spirals

@_styled
@torch.no_grad()
def decision_regions(models: dict, data, accuracies: dict | None = None, resolution: int = 200,
                     extent: float = 1.3):
    """Figure 9: decision regions of classifiers ``{(row_label, col_label): (model, accuracy)}``
    on a grid (column labels on top, row labels on the left), with the training (filled) and
    validation (hollow) points and the validation accuracy in each panel title. With
    ``accuracies`` (``{col_label: validation accuracies over seeds}``) a last panel shows
    their distribution per column: one dot per seed, the median as a bar."""
    rows = list(dict.fromkeys(r for r, _ in models))
    cols = list(dict.fromkeys(c for _, c in models))
    extra = accuracies is not None
    fig, axes = plt.subplots(len(rows), len(cols) + extra,
                             figsize=(2.4 * (len(cols) + 1.3 * extra), 2.5 * len(rows)),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * len(cols)
                                                         + [1.3] * extra})
    g = np.linspace(-extent, extent, resolution)
    gx, gy = np.meshgrid(g, g)
    for (r, c), (model, accuracy) in models.items():
        ax = axes[rows.index(r), cols.index(c)]
        parameter = next(model.parameters())
        points = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=parameter.dtype,
                              device=parameter.device)  # evaluated where the model lives
        prob = torch.softmax(model(points), dim=1)[:, 1].cpu().numpy().reshape(gx.shape)
        ax.contourf(gx, gy, prob, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.55)
        ax.contour(gx, gy, prob, levels=[0.5], colors="k", linewidths=0.8)
        for split, style in (("train", dict(edgecolors="k", linewidths=0.4, s=9)),
                             ("val", dict(facecolors="none", linewidths=0.8, s=9))):
            x = getattr(data, f"x_{split}").numpy()
            y = getattr(data, f"y_{split}").numpy()
            for label, color in ((0, "C0"), (1, "C3")):
                pts = x[y == label]
                if split == "train":
                    ax.scatter(pts[:, 0], pts[:, 1], c=color, **style)
                else:
                    ax.scatter(pts[:, 0], pts[:, 1], edgecolors=color, **style)
        title = f"val. acc. {accuracy:.0%}"
        ax.set_title(f"{c}\n{title}" if rows.index(r) == 0 else title)
        ax.set_aspect("equal")
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.grid(False)
        if cols.index(c) > 0:
            ax.set_yticklabels([])
    for ax in axes[-1, :len(cols)]:
        ax.set_xlabel("$x_1$")
    for ax, r in zip(axes[:, 0], rows):
        ax.set_ylabel(f"{r}\n$x_2$")
    if extra:
        ax = axes[0, -1]
        for i, c in enumerate(cols):
            values = 100 * np.asarray(accuracies[c], dtype=float)
            offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(i + np.asarray(offsets), np.sort(values), s=12, color="0.3", zorder=3)
            ax.hlines(np.median(values), i - 0.3, i + 0.3, color="C3", lw=2, zorder=4)
        ax.set_xticks(range(len(cols)), [c.replace(", ", "\n") for c in cols], fontsize=7)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"all {len(values)} seeds (bar: median)")
        for ax in axes[1:, -1]:
            ax.axis("off")
    return fig


# ------------------------------------------------------------------- notebook 4: robustness

PERTURBATION_LABELS = {"gaussian": r"Gaussian noise, $\sigma$",
                       "fgsm": r"FGSM, $\epsilon$ ($L_\infty$)",
                       "pgd": r"PGD, $\epsilon$ ($L_\infty$)"}
REGULARIZER_DASHES = {"none": "", "R_stab": (4, 2)}


def _model_lines(ax, frame: pd.DataFrame, x: str, y: str, colors: dict):
    """Mean over seeds with a +-1 standard deviation band (seaborn, ``errorbar="sd"``: no
    bootstrap, so no randomness), one colour per theta, dashed with ``R_stab``."""
    import seaborn as sns  # imported here: only the robustness figures use it

    sns.lineplot(data=frame, x=x, y=y, hue="theta", style="regularizer", palette=colors,
                 dashes=REGULARIZER_DASHES, errorbar="sd", err_kws={"alpha": 0.15, "lw": 0},
                 marker="o", markersize=3, ax=ax, legend=False)


@_styled
def robustness_curves(curves: pd.DataFrame):
    """Validation accuracy against the size of the perturbation, one row per dataset and one
    column per perturbation (Gaussian noise, FGSM, PGD); one line per model (colour: theta,
    dashed: trained with ``R_stab``), mean over seeds with a +-1 std band. ``curves`` has
    columns ``dataset``, ``perturbation``, ``size``, ``accuracy``, ``theta``,
    ``regularizer``, ``seed``."""
    datasets = list(dict.fromkeys(curves.dataset))
    kinds = [k for k in PERTURBATION_LABELS if k in set(curves.perturbation)]
    colors = theta_colors(sorted(curves.theta.unique()))
    fig, axes = plt.subplots(len(datasets), len(kinds), figsize=(2.8 * len(kinds), 2.6 * len(datasets)),
                             squeeze=False, sharey=True)
    for r, dataset in enumerate(datasets):
        for c, kind in enumerate(kinds):
            ax = axes[r, c]
            frame = curves[(curves.dataset == dataset) & (curves.perturbation == kind)]
            _model_lines(ax, frame, "size", "accuracy", colors)
            ax.set_xlabel(PERTURBATION_LABELS[kind])
            ax.set_ylabel(f"{dataset}\nvalidation accuracy" if c == 0 else "")
            ax.set_ylim(0, 1.02)
    _model_legend(axes[0, -1], colors, list(dict.fromkeys(curves.regularizer)), "lower left")
    return fig


def _model_legend(ax, colors: dict, regularizers, loc: str):
    """One entry per theta (colour) and per regulariser (line style)."""
    handles = [matplotlib.lines.Line2D([], [], color=color, label=rf"$\theta$ = {theta}")
               for theta, color in colors.items()]
    handles += [matplotlib.lines.Line2D([], [], color="0.3", label=name,
                                        dashes=REGULARIZER_DASHES[name] or (None, None))
                for name in regularizers]
    ax.legend(handles=handles, frameon=False, fontsize=7, loc=loc)


@_styled
def perturbation_growth(growth: pd.DataFrame):
    """Per-layer growth ``d_l / d_{l-1}`` of a hidden-state perturbation through the trained
    networks, one panel per dataset, same lines as :func:`robustness_curves` (above 1: the
    layer amplifies the perturbation). ``growth`` has columns ``dataset``, ``layer``,
    ``growth``, ``theta``, ``regularizer``, ``seed``."""
    datasets = list(dict.fromkeys(growth.dataset))
    colors = theta_colors(sorted(growth.theta.unique()))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 2.8), squeeze=False)
    for c, dataset in enumerate(datasets):
        ax = axes[0, c]
        _model_lines(ax, growth[growth.dataset == dataset], "layer", "growth", colors)
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set_yscale("log")  # growth is a ratio; one exploding seed must not flatten the rest
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.2, 1.5, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(dataset)
        ax.set_xlabel("layer $l$")
        ax.set_ylabel(r"$d_l / d_{l-1}$" if c == 0 else "")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    _model_legend(axes[0, -1], colors, list(dict.fromkeys(growth.regularizer)), "best")
    return fig


@_styled
def solver_comparison(forward: pd.DataFrame, residuals: dict, backward: pd.DataFrame,
                      layer: int | None = None):
    """Forward solvers on one trained network: the residual history of one layer (default:
    the layer the first solver needed most iterations for), the median wall time of a whole
    forward, and the mean iterations of each backward linear solver (tables and histories of
    :mod:`irn.paper.diagnostics`)."""
    names = list(forward.solver)
    if layer is None:
        layer = int(np.argmax([len(r) for r in residuals[names[0]]]))
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.9), width_ratios=(1.4, 1, 0.7))
    for i, name in enumerate(names):
        history = residuals[name][layer]
        axes[0].plot(np.arange(1, len(history) + 1), history, color=f"C{i}", label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("iteration $k$")
    axes[0].set_ylabel(r"mean $\|y^k - g(y^k)\|$")
    axes[0].set_title(f"forward residual, layer {layer + 1}")
    axes[0].legend(frameon=False, fontsize=7)
    bars = axes[1].barh(names, forward.ms, color=[f"C{i}" for i in range(len(names))])
    axes[1].bar_label(bars, [f"{it:.1f} it." for it in forward.iterations], fontsize=7, padding=2)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("forward wall time (ms)")
    axes[1].set_title("whole network, median")
    axes[1].margins(x=0.3)
    axes[2].bar(backward.backward, backward.iterations, color="0.5")
    axes[2].set_ylabel("iterations per layer (mean)")
    axes[2].set_title("backward linear solve")
    for ax in axes[1:]:
        ax.grid(axis="y" if ax is axes[2] else "x")
    return fig
