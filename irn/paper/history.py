"""Reading the per-epoch training histories of :func:`irn.paper.training.train` (one row per
epoch, per-layer columns ``{name}_{l}``) without importing the training loop."""

from __future__ import annotations

import numpy as np

from .._checks import missing_extra, require

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.history", err) from err


def per_layer(history: pd.DataFrame, name: str) -> np.ndarray:
    """The per-layer columns ``{name}_0 .. {name}_{L-1}`` of a training history: ``(epochs, L)``.
    ``name`` is ``forward_iterations``, ``backward_iterations`` or ``grad``."""
    columns = [c for c in history.columns if c.rsplit("_", 1)[0] == name and c.rsplit("_", 1)[1].isdigit()]
    require(bool(columns), f"name must be one of ('forward_iterations', "
                            f"'backward_iterations', 'grad'), got {name!r}")
    columns.sort(key=lambda c: int(c.rsplit("_", 1)[1]))
    # histories of deeper models concatenated with this one leave its extra columns empty
    return history[columns].dropna(axis=1, how="all").to_numpy()


def median_seed(values: pd.Series):
    """The index (a seed) of the median of ``values`` (the lower median for an even count,
    ties broken by the smaller index): the run to show as representative."""
    ordered = values.sort_index().sort_values(kind="stable")
    return ordered.index[(len(ordered) - 1) // 2]
