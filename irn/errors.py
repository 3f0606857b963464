"""What a failed or unconverged solve raises or warns."""


class SolverError(RuntimeError):
    """A solve failed: non-finite values, or non-convergence under ``on_nonconvergence="raise"``."""


class ConvergenceWarning(UserWarning):
    """A solve stopped at its iteration cap with the residual above the tolerance."""
