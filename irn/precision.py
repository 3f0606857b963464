"""Mixed precision (``torch.autocast``) in an implicit block."""

from __future__ import annotations

import torch

from ._checks import require


def under_autocast(block, solve, step, device_type: str):
    """Mixed precision (``torch.autocast``): ``F`` runs in the low precision the caller
    asked for, while the solver's own arithmetic (residual norms, Anderson's Gram system,
    Broyden's updates, the stopping rule) runs with autocast off, in the iterates' dtype
    (float32 for float32 inputs). A tolerance below the low precision's machine epsilon
    cannot be met: ``ValueError``."""
    low = torch.get_autocast_dtype(device_type)
    eps = torch.finfo(low).eps
    for name, value in (("tol", block.tol), ("lin_tol", block.lin_tol)):
        require(value >= eps, f"{block.name}: {name}={value:g} is below what {low} resolves "
                              f"under autocast (machine epsilon {eps:.1e}), so the solve "
                              f"cannot converge: use {name} >= {eps:.1e}")

    def step_in_low_precision(y):
        with torch.autocast(device_type, dtype=low):
            return step(y)

    def solve_in_full_precision(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return solve(*args, **kwargs)
    return solve_in_full_precision, step_in_low_precision
