"""Mixed precision (``torch.autocast``) in an implicit block."""

from __future__ import annotations

import torch


def under_autocast(solve, step, device_type: str):
    """``(solve, step, low)``: mixed precision (``torch.autocast``): ``F`` runs in the low precision the caller
    asked for, while the solver's own arithmetic (residual norms, Anderson's Gram system,
    Broyden's updates, the stopping rule) runs with autocast off, in the iterates' dtype
    (float32 for float32 inputs). The stopping rules follow the low precision
    (:meth:`irn.SolveConfig.stopping`: a tolerance it cannot resolve is a ``ValueError``)."""
    low = torch.get_autocast_dtype(device_type)

    def step_in_low_precision(y):
        with torch.autocast(device_type, dtype=low):
            return step(y)

    def solve_in_full_precision(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return solve(*args, **kwargs)
    return solve_in_full_precision, step_in_low_precision, low
