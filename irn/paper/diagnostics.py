"""Solvers compared on a trained network: iterations, residual histories and wall time of
each forward solver, and iterations of each backward linear solver, on the same inputs."""

from __future__ import annotations

import time

import numpy as np
from .._checks import missing_extra

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.diagnostics", err) from err
import torch

from .. import solvers as S
from .._checks import choice, require
from ..models import ImplicitModel
from .losses import LOSSES

#: short names of option values in the display names of :data:`FORWARD_CONFIGS`
SHORT_NAMES = {"polak_ribiere": "PR+", "fletcher_reeves": "FR"}


def solver_configs() -> dict:
    """Every forward solver of the registry (``irn.solvers.FORWARD_SOLVERS``, in its order)
    with its default options, and one configuration per value of an option with a fixed set
    of values (``nonlinear_cg (PR+)``, ``nonlinear_cg (FR)``), by display name."""
    configs = {}
    for name in S.FORWARD_SOLVERS:
        choices = S.option_values(name)
        if not choices:
            configs[name] = dict(solver=name)
        for option, values in choices.items():
            for value in values:
                configs[f"{name} ({SHORT_NAMES.get(value, value)})"] = dict(
                    solver=name, solver_options={option: value})
    return configs


#: the forward solvers compared by default, read from the registry
FORWARD_CONFIGS = solver_configs()


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _differences(results, table, num_layers):
    """Max abs difference of each result from that of the first row whose every layer
    converged (NaN everywhere if none did)."""
    done = np.flatnonzero(table.converged_layers.to_numpy() == num_layers)
    if len(done) == 0:
        return np.nan
    return [float((r - results[done[0]]).abs().max()) for r in results]


def compare_forward_solvers(model: ImplicitModel, x: torch.Tensor, configs: dict | None = None,
                            *, repeats: int = 5, **block_kwargs):
    """Solve the hidden layers of ``model`` on inputs ``x`` with each solver of ``configs``
    (display name -> settings for :meth:`irn.ImplicitResNet.with_settings`; default
    :data:`FORWARD_CONFIGS`), ``block_kwargs`` (e.g. ``max_iters``) applying to all.

    Returns ``(table, residuals)``: ``table`` has one row per solver with ``iterations``
    (mean per layer), ``max_iterations``, ``converged_layers``, ``ms`` (median wall time of
    the whole forward over ``repeats``) and ``max_output_difference`` from the output of the
    first solver whose every layer converged (NaN if none did); ``residuals[name][l]`` is the batch-mean residual ``||y^k - g(y^k)||`` of layer
    ``l`` per iteration ``k``.
    """
    require(isinstance(repeats, int) and repeats >= 1, f"repeats must be an int >= 1, got {repeats!r}")
    configs = FORWARD_CONFIGS if configs is None else configs
    rows, residuals, outputs = [], {}, []
    with torch.no_grad():
        y0 = model.embed(x)
        for name, settings in configs.items():
            net = model.net.with_settings(**(block_kwargs | settings))
            net.keep_iterates = True
            out = net(y0)
            residuals[name] = [[float(r) for r in block.iterate_residuals] for block in net.blocks]
            stats = [block.last_stats for block in net.blocks]
            net.keep_iterates = False
            outputs.append(out)
            rows.append({"solver": name,
                         "iterations": float(np.mean([s.iterations for s in stats])),
                         "max_iterations": max(s.iterations for s in stats),
                         "converged_layers": sum(s.converged for s in stats),
                         "ms": 1e3 * _median_seconds(lambda: net(y0), repeats)})
    table = pd.DataFrame(rows)
    table["max_output_difference"] = _differences(outputs, table, model.net.num_layers)
    return table, residuals


def compare_backward_solvers(model: ImplicitModel, x, y, backwards=("neumann", "gmres"), *,
                             loss: str = "mse", repeats: int = 5, **block_kwargs) -> pd.DataFrame:
    """The gradient of ``loss(model(x), y)`` with respect to the parameters, with each
    backward linear solver: one row per backward with ``iterations`` (mean per layer),
    ``max_iterations``, ``converged_layers``, ``ms`` (median wall time of forward + backward)
    and ``max_gradient_difference`` from the gradient of the first backward whose every
    layer converged."""
    choice("loss", loss, LOSSES)
    params = [p for p in model.parameters() if p.requires_grad]
    rows, gradients = [], []
    for name in backwards:
        candidate = ImplicitModel(model.embed, model.net.with_settings(backward=name, **block_kwargs),
                                  model.readout)

        def step():
            return torch.autograd.grad(LOSSES[loss](candidate(x), y), params, allow_unused=True,
                                       materialize_grads=True)

        grads = torch.cat([g.reshape(-1) for g in step()])
        stats = [block.last_stats for block in candidate.net.blocks]
        converged = [block.backward_converged for block in candidate.net.blocks]
        gradients.append(grads)
        rows.append({"backward": name,
                     "iterations": float(np.mean([s.backward_iterations or 0 for s in stats])),
                     "max_iterations": max(s.backward_iterations or 0 for s in stats),
                     "converged_layers": sum(c is not False for c in converged),
                     "ms": 1e3 * _median_seconds(step, repeats)})
    table = pd.DataFrame(rows)
    table["max_gradient_difference"] = _differences(gradients, table, model.net.num_layers)
    return table
