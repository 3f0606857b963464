"""Networks built from implicit residual blocks (paper section 3).

``ImplicitResNet`` discretises the hidden ODE ``y' = act(W(t) y + b(t))`` with ``L`` theta-blocks
of step ``h``: ``F_l(y) = act(W_l y + b_l)``. ``ImplicitModel`` wraps it with an input
embedding and a readout, which is all the examples of the paper need.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import choice, require
from .layers import ImplicitResidualBlock

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
               "identity": lambda t: t}
# derivative of each activation, as a function of its input z
DERIVATIVES = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "identity": lambda z: torch.ones_like(z),
}
INITS = ("stationary", "random", "pytorch")


class Perceptron(nn.Module):
    """The residual function of one layer: ``F(y) = act(W y + b)``; ``linear`` holds ``W, b``."""

    def __init__(self, dim: int, activation: str = "relu"):
        super().__init__()
        choice("activation", activation, ACTIVATIONS)
        self.linear = nn.Linear(dim, dim)
        self.activation = activation

    def forward(self, y):
        # functional call: this runs once per solver iteration, a module call costs as much
        return ACTIVATIONS[self.activation](
            nn.functional.linear(y, self.linear.weight, self.linear.bias))

    @torch.no_grad()
    def linearize(self, y, scale: float = 1.0):
        """The products of the backward (see :func:`irn.layers.linearize`), with
        ``s(u) = scale * act'(W y + b) * u``: ``u -> scale J_F(y)^T u = s(u) W`` and
        ``u -> (dF/dW^T, dF/db^T) scale u = (s(u)^T y, sum_batch s(u))``."""
        weight, bias = self.linear.weight, self.linear.bias
        slope = scale * DERIVATIVES[self.activation](self.linear(y))

        def parameter_vjp(u):
            s = (slope * u).reshape(-1, slope.shape[-1])
            grads = {"weight": s.T @ y.reshape(-1, y.shape[-1]), "bias": s.sum(dim=0)}
            return [grads[name] if p.requires_grad else None
                    for name, p in (("weight", weight), ("bias", bias))]

        return (lambda u: (slope * u) @ weight), parameter_vjp

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def normalized_gaussian(dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``dim x dim`` matrix with N(0, 1) entries divided by its spectral radius ``rho(W)``."""
    w = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return w / torch.linalg.eigvals(w).abs().max()


class ImplicitResNet(nn.Module):
    """``L`` implicit residual blocks ``y_{l+1} = y_l + h((1-theta) F_l(y_l) + theta F_l(y_{l+1}))``.

    ``init="stationary"`` (the paper's): one N(0,1) matrix divided by its spectral radius,
    ``b = 0``, copied into every layer; ``"random"``: an independent such matrix per layer;
    ``"pytorch"``: ``nn.Linear``'s default. Draws from torch's global generator (seed it).
    Further keyword arguments (``solver``, ``backward``, ``tol``, ...) go to every block.
    """

    def __init__(self, dim: int, num_layers: int, h: float = 1.0, theta: float = 0.0, *,
                 activation: str = "relu", init: str = "stationary", **block_kwargs):
        super().__init__()
        require(isinstance(dim, int) and dim >= 1, f"dim must be an int >= 1, got {dim!r}")
        require(isinstance(num_layers, int) and num_layers >= 1,
                 f"num_layers must be an int >= 1, got {num_layers!r}")
        choice("activation", activation, ACTIVATIONS)
        choice("init", init, INITS)
        self.dim, self.num_layers = dim, num_layers
        self.blocks = nn.ModuleList(
            ImplicitResidualBlock(Perceptron(dim, activation), h, theta, **block_kwargs)
            for _ in range(num_layers))
        for index, block in enumerate(self.blocks):
            block.name = f"block {index}"
        with torch.no_grad():
            shared = normalized_gaussian(dim) if init == "stationary" else None
            for block in self.blocks:
                if init == "pytorch":
                    continue
                weight = shared if shared is not None else normalized_gaussian(dim)
                block.F.linear.weight.copy_(weight)
                block.F.linear.bias.zero_()

    def with_settings(self, **block_kwargs) -> "ImplicitResNet":
        """The same network (the same residual functions ``F_l`` and parameters, shared, not
        copied) with other block settings, see :meth:`irn.ImplicitResidualBlock.with_settings`:
        e.g. ``net.with_settings(solver="anderson")`` solves a trained network with another
        solver."""
        clone = ImplicitResNet.__new__(ImplicitResNet)
        nn.Module.__init__(clone)
        clone.dim, clone.num_layers = self.dim, self.num_layers
        clone.blocks = nn.ModuleList(block.with_settings(**block_kwargs) for block in self.blocks)
        return clone

    @property
    def keep_iterates(self) -> bool:
        """Whether the blocks record their iterates (for ``irn.regularizers.fixed_point``)."""
        return all(block.keep_iterates for block in self.blocks)

    @keep_iterates.setter
    def keep_iterates(self, value: bool) -> None:
        for block in self.blocks:
            block.keep_iterates = bool(value)

    def _check_input(self, y0):
        if not (y0.dim() == 2 and y0.shape[1] == self.dim):  # (no message built per call)
            raise ValueError(f"y0 must have shape (batch, {self.dim}), got {tuple(y0.shape)}")

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        self._check_input(y0)
        y = y0
        for block in self.blocks:
            y = block(y)
        return y

    def trajectory(self, y0: torch.Tensor) -> torch.Tensor:
        """All hidden states ``(y_0, y_1, ..., y_L)`` stacked: shape ``(L + 1, B, dim)``."""
        self._check_input(y0)
        states = [y0]
        for block in self.blocks:
            states.append(block(states[-1]))
        return torch.stack(states)


class PadEmbedding(nn.Module):
    """``x -> (x, 0, ..., 0)``: embeds ``(B, k)`` inputs into the ``dim``-dimensional state."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        require(dim >= in_features, f"dim must be >= in_features ({in_features}), got {dim}")
        self.in_features, self.dim = in_features, dim

    def forward(self, x):
        return nn.functional.pad(x, (0, self.dim - self.in_features))


class SelectComponent(nn.Module):
    """Readout ``y -> y[:, index:index+1]`` (the paper's Example 1 reads the 2nd component)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, y):
        return y[:, self.index:self.index + 1]


class ImplicitModel(nn.Module):
    """``readout(net(embed(x)))``: an input embedding, an :class:`ImplicitResNet`, a readout."""

    def __init__(self, embed: nn.Module, net: ImplicitResNet, readout: nn.Module):
        super().__init__()
        self.embed, self.net, self.readout = embed, net, readout

    def forward(self, x):
        return self.readout(self.net(self.embed(x)))

    def trajectory(self, x):
        """Hidden states of the network for inputs ``x``: ``(L + 1, B, dim)``."""
        return self.net.trajectory(self.embed(x))


def function_approximator(num_layers: int, theta: float, *, T: float = 5.0,
                          activation: str = "tanh", **block_kwargs) -> ImplicitModel:
    """Example 1: ``y0 = (x, 0)``, ``L`` blocks of step ``h = T / L`` in R^2, output ``y_L[1]``."""
    net = ImplicitResNet(2, num_layers, T / num_layers, theta, activation=activation,
                         **block_kwargs)
    return ImplicitModel(PadEmbedding(1, 2), net, SelectComponent(1))


def spiral_classifier(num_layers: int = 100, theta: float = 0.0, *, T: float = 10.0,
                      dim: int = 4, activation: str = "relu", **block_kwargs) -> ImplicitModel:
    """Example 2: ``y0 = (x1, x2, 0, 0)``, ``L`` blocks of step ``T / L``, linear readout to
    two logits."""
    net = ImplicitResNet(dim, num_layers, T / num_layers, theta, activation=activation,
                         **block_kwargs)
    return ImplicitModel(PadEmbedding(2, dim), net, nn.Linear(dim, 2))


def digits_classifier(num_layers: int = 10, theta: float = 0.0, *, T: float = 5.0,
                      dim: int = 32, activation: str = "relu", in_features: int = 64,
                      classes: int = 10, **block_kwargs) -> ImplicitModel:
    """8x8 digits: a linear embedding ``R^64 -> R^dim``, ``L`` blocks of step ``T / L``, a
    linear readout to ``classes`` logits."""
    net = ImplicitResNet(dim, num_layers, T / num_layers, theta, activation=activation,
                         **block_kwargs)
    return ImplicitModel(nn.Linear(in_features, dim), net, nn.Linear(dim, classes))
