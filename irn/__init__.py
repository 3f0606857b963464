"""irn: implicit residual networks (Reshniak & Webster, arXiv:1905.10479).

The front door::

    block = irn.ImplicitResidualBlock(F, h=0.5, theta=0.5)   # y = x + h((1-theta)F(x) + theta F(y))
    net = irn.ImplicitResNet(dim=4, num_layers=10, h=0.1, theta=0.5)
"""

from . import regularizers, stability
from .config import SolveConfig
from .errors import ConvergenceWarning, SolverError
from .layers import ImplicitResidualBlock
from .models import ImplicitModel, ImplicitResNet
from .records import SolveStats
from .summary import SolveSummary, solve_summary

__version__ = "0.1.0"
__all__ = ["ImplicitResidualBlock", "ImplicitResNet", "ImplicitModel", "SolveConfig", "SolveStats",
           "SolveSummary", "solve_summary", "ConvergenceWarning", "SolverError", "regularizers",
           "stability", "__version__"]
