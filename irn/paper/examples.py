"""The networks of the paper's examples (section 3), built from the library's
:class:`irn.ImplicitResNet` and :class:`irn.models.ImplicitModel`: Example 1's function
approximator in two layouts, Example 2's spiral classifier, and the digits classifier of
notebook 4."""

from __future__ import annotations

from torch import nn

from .._checks import choice, integer, number, require
from ..models import ImplicitModel, ImplicitResNet, PadEmbedding, SelectComponent

LAYOUTS = ("state", "embedded")


def _network(dim: int, num_layers: int, T: float, theta: float, activation: str,
             **block_kwargs) -> ImplicitResNet:
    """``L = num_layers`` blocks of step ``h = T / L`` on states of width ``dim``."""
    integer("num_layers", num_layers)
    number("T", T, lambda v: v > 0, "a finite number > 0")
    return ImplicitResNet(dim, num_layers, T / num_layers, theta, activation=activation,
                          **block_kwargs)


def function_approximator(num_layers: int, theta: float, *, T: float = 5.0,
                          activation: str | None = None, layout: str = "state", width: int = 5,
                          **block_kwargs) -> ImplicitModel:
    """Example 1, in one of two layouts (docs/design.md, section 6); ``L`` blocks of step ``h = T / L``.

    ``layout="state"``: ``y0 = (x, 0)`` in R^2, output ``y_L[1]``, tanh by default.
    ``layout="embedded"`` (the authors' code of May 2019): a learned affine embedding
    ``R -> R^width``, ``y_L`` read out by a learned affine map ``R^width -> R``, the paper's
    ReLU by default; the residual layers keep the stationary initialisation, the embedding and
    readout ``nn.Linear``'s default one.
    """
    choice("layout", layout, LAYOUTS)
    if layout == "state":
        net = _network(2, num_layers, T, theta, activation or "tanh", **block_kwargs)
        return ImplicitModel(PadEmbedding(1, 2), net, SelectComponent(1))
    require(isinstance(width, int) and width >= 1, f"width must be an int >= 1, got {width!r}")
    net = _network(width, num_layers, T, theta, activation or "relu", **block_kwargs)
    return ImplicitModel(nn.Linear(1, width), net, nn.Linear(width, 1))


def spiral_classifier(num_layers: int = 100, theta: float = 0.0, *, T: float = 10.0,
                      dim: int = 4, activation: str = "relu", **block_kwargs) -> ImplicitModel:
    """Example 2: ``y0 = (x1, x2, 0, 0)``, ``L`` blocks of step ``T / L``, linear readout to
    two logits."""
    net = _network(dim, num_layers, T, theta, activation, **block_kwargs)
    return ImplicitModel(PadEmbedding(2, dim), net, nn.Linear(dim, 2))


def digits_classifier(num_layers: int = 10, theta: float = 0.0, *, T: float = 5.0,
                      dim: int = 32, activation: str = "relu", in_features: int = 64,
                      classes: int = 10, **block_kwargs) -> ImplicitModel:
    """8x8 digits: a linear embedding ``R^64 -> R^dim``, ``L`` blocks of step ``T / L``, a
    linear readout to ``classes`` logits."""
    net = _network(dim, num_layers, T, theta, activation, **block_kwargs)
    return ImplicitModel(nn.Linear(in_features, dim), net, nn.Linear(dim, classes))
