"""Figures are written as PDF and PNG, byte-identical when regenerated."""

from irn.paper import plotting
from irn.paper import examples


def test_save_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    for run in ("a", "b"):
        fig = plotting.spectral_radii(h_max=3.0, points=50)
        plotting.save(fig, "radius", tmp_path / run)
    for ext in ("pdf", "png"):
        a, b = (tmp_path / run / f"radius.{ext}" for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    assert b"CreationDate" not in (tmp_path / "a" / "radius.pdf").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["radius.pdf", "radius.png"]


def test_seaborn_bands_are_deterministic(tmp_path):
    # seaborn's default bootstrap bands are random; the robustness figures use errorbar="sd"
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [dict(dataset=d, perturbation=p, size=s, accuracy=rng.uniform(), theta=t,
                 regularizer=r, seed=seed)
            for d in ("a", "b") for p in ("gaussian", "fgsm", "pgd") for s in (0.0, 0.1)
            for t in (0.0, 1.0) for r in ("none", "R_stab") for seed in range(3)]
    curves = pd.DataFrame(rows)
    growth = curves.rename(columns={"size": "layer", "accuracy": "growth"})
    growth["layer"] = (growth.layer * 10 + 1).astype(int)
    growth["growth"] += 0.5
    for run in ("a", "b"):
        plotting.save(plotting.robustness_curves(curves), "curves", tmp_path / run)
        plotting.save(plotting.perturbation_growth(growth), "growth", tmp_path / run)
    for name in ("curves.png", "curves.pdf", "growth.png", "growth.pdf"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_save_table_creates_the_directory_and_rounds(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"a": [1 / 3, 2.0]}, index=["x", "y"])
    plotting.save_table(frame, "t", tmp_path / "new")
    assert (tmp_path / "new" / "t.csv").read_text() == ",a\nx,0.333333\ny,2\n"
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["t.csv"]


def test_importing_and_plotting_leave_the_callers_style_alone():
    """irn.paper.plotting applies its style only while it draws (issue: it used to restyle the
    user's matplotlib at import)."""
    import subprocess
    import sys

    code = ("import matplotlib; before = dict(matplotlib.rcParams); "
            "from irn.paper import plotting; assert dict(matplotlib.rcParams) == before; "
            "fig = plotting.spectral_radii(points=20); assert dict(matplotlib.rcParams) == before; "
            "assert fig.get_axes()[0].title.get_fontsize() == plotting.STYLE['axes.titlesize']")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"MPLBACKEND": "Agg", "PATH": ""})
    assert result.returncode == 0, result.stderr


def test_dynamics_leaves_the_models_where_they_are_and_draws_the_given_target():
    import torch

    from irn import models
    from irn.paper import data

    torch.manual_seed(0)
    float32 = examples.function_approximator(3, 0.5, on_nonconvergence="ignore").float()
    float64 = examples.function_approximator(3, 0.0).double()
    before = {id(p): (p.device, p.dtype) for m in (float32, float64) for p in m.parameters()}
    fig = plotting.dynamics({0.5: float32, 0.0: float64}, data.sine())
    assert {id(p): (p.device, p.dtype) for m in (float32, float64)
            for p in m.parameters()} == before
    assert not any(line.get_label() == "target" for ax in fig.axes for line in ax.lines)
    fig = plotting.dynamics({0.0: float64}, data.sine(), target=torch.sin)
    target = [line for ax in fig.axes for line in ax.lines if line.get_label() == "target"]
    assert len(target) == 1
    x, y = target[0].get_data()
    assert abs(y - __import__("numpy").sin(x)).max() < 1e-12


def test_dynamics_of_a_wide_state_draws_trajectories_without_a_field():
    import torch
    from matplotlib.quiver import Quiver

    from irn import models
    from irn.paper import data

    torch.manual_seed(0)
    wide = examples.function_approximator(3, 0.5, layout="embedded", on_nonconvergence="ignore").double()
    fig = plotting.dynamics({0.5: wide}, data.sine(), target=torch.sin)
    assert not any(isinstance(c, Quiver) for ax in fig.axes for c in ax.collections)
    trajectories = fig.axes[0].lines[:20]  # one per training input, in the first two components
    states = wide.trajectory(data.sine().x_train).detach().numpy()
    for b, line in enumerate(trajectories):
        x, y = line.get_data()
        assert abs(x - states[:, b, 0]).max() < 1e-12 and abs(y - states[:, b, 1]).max() < 1e-12
    planar = plotting.dynamics({0.5: examples.function_approximator(
        3, 0.5, on_nonconvergence="ignore").double()}, data.sine())
    assert any(isinstance(c, Quiver) for ax in planar.axes for c in ax.collections)


def test_regularizer_effect_draws_the_median_over_seeds_per_theta_and_run():
    import pandas as pd

    def run(level):
        return pd.DataFrame([dict(epoch=e, theta=t, seed=s, train_loss=level * (1 + s),
                                  forward_iterations_0=level * 10 * t)
                             for t in (0.5, 1.0) for s in range(3) for e in (1, 2)])

    fig = plotting.regularizer_effect({"without": run(1.0), "with": run(0.5)})
    iterations, losses = fig.axes
    assert len(iterations.lines) == 4 and len(losses.lines) == 4
    assert list(losses.lines[0].get_ydata()) == [2.0, 2.0]  # median of 1, 2, 3
    assert list(iterations.lines[3].get_ydata()) == [5.0, 5.0] and iterations.lines[3].get_linestyle() == "--"


def test_losses_draw_the_validation_curve_through_the_measured_epochs_only():
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame([dict(epoch=e, depth=5, theta=t, seed=s, train_loss=1.0 / e,
                               val_loss=2.0 / e if e % 3 == 0 or e == 7 else np.nan)
                          for t in (0.0, 1.0) for s in range(3) for e in range(1, 8)])
    fig = plotting.losses(frame)
    train, val = fig.axes
    assert len(train.lines[0].get_xdata()) == 7
    assert list(val.lines[0].get_xdata()) == [3, 6, 7]
    assert list(val.lines[0].get_ydata()) == [2 / 3, 2 / 6, 2 / 7]


def test_losses_mark_the_curves_whose_training_has_not_settled():
    import pandas as pd

    # theta = 0 flat over its last epochs in seeds 0 and 1, still falling in seed 2
    frame = pd.DataFrame([dict(epoch=e, depth=5, theta=t, seed=s, val_loss=1.0,
                               train_loss=(1.0 / e if (t == 1.0 or s == 2) else 1.0))
                          for t in (0.0, 1.0) for s in range(3) for e in range(1, 21)])
    fig = plotting.losses(frame)
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert labels == [r"$\theta = 0.0$ (2/3 settled)", r"$\theta = 1.0$ (0/3 settled)"]


def test_every_figure_function_takes_a_title():
    fig = plotting.spectral_radii(2.0, points=11, title="a title")
    assert fig._suptitle.get_text() == "a title"
    assert plotting.spectral_radii(2.0, points=11)._suptitle is None
