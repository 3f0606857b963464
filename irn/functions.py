"""The residual functions of the paper's networks (section 3): ``F(y) = act(W y + b)``, one
layer (:class:`Perceptron`) or ``E`` of them at once (:class:`StackedPerceptron`), each with the
products its implicit backward needs (``linearize``). The compiled path
(:mod:`irn.compiled`) runs networks of these layers."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import choice

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
               "identity": lambda t: t}
# derivative of each activation, as a function of its input z
DERIVATIVES = {
    "relu": lambda z: (z > 0).to(z.dtype),
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "identity": lambda z: torch.ones_like(z),
}


class Perceptron(nn.Module):
    """The residual function of one layer: ``F(y) = act(W y + b)``; ``linear`` holds ``W, b``.
    It acts on the last dimension only, so a block runs it on the member layout ``(1, B, dim)``
    of one network as it is (``any_leading_dims``)."""

    any_leading_dims = True

    def __init__(self, dim: int, activation: str = "relu"):
        super().__init__()
        choice("activation", activation, ACTIVATIONS)
        self.linear = nn.Linear(dim, dim)
        self.activation = activation

    def forward(self, y):
        """``act(W y + b)`` on the last dimension."""
        # functional call: this runs once per solver iteration, a module call costs as much
        return ACTIVATIONS[self.activation](
            nn.functional.linear(y, self.linear.weight, self.linear.bias))

    def linearize(self, y, scale: float = 1.0):
        """The products of the backward (see :func:`irn.backward.linearize`), with
        ``s(u) = scale * act'(W y + b) * u``: ``u -> scale J_F(y)^T u = s(u) W`` and
        ``u -> (dF/dW^T, dF/db^T) scale u = (s(u)^T y, sum_batch s(u))``. Plain tensor
        operations: differentiable in ``y``, ``W``, ``b`` and ``u`` when called in grad mode
        (second derivatives; the first-order backward runs without it)."""
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


class StackedPerceptron(nn.Module):
    """``E`` perceptrons at once: ``F(y)[e] = act(W_e y[e] + b_e)`` for ``y`` of shape
    ``(E, B, dim)``; ``weight`` is ``(E, dim, dim)``, ``bias`` ``(E, dim)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str):
        super().__init__()
        choice("activation", activation, ACTIVATIONS)
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.activation = activation

    @classmethod
    def stack(cls, perceptrons: list[Perceptron]) -> "StackedPerceptron":
        """The perceptrons' weights copied into one module (member order kept)."""
        with torch.no_grad():
            weight = torch.stack([p.linear.weight for p in perceptrons]).clone()
            bias = torch.stack([p.linear.bias for p in perceptrons]).clone()
        return cls(weight, bias, perceptrons[0].activation)

    def member(self, e: int) -> Perceptron:
        """A standalone copy of member ``e``."""
        dim = self.weight.shape[-1]
        with torch.random.fork_rng(devices=[]):  # nn.Linear's init must not move the caller's RNG
            perceptron = Perceptron(dim, self.activation).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            perceptron.linear.weight.copy_(self.weight[e])
            perceptron.linear.bias.copy_(self.bias[e])
        return perceptron

    def _affine(self, y):
        return torch.baddbmm(self.bias.unsqueeze(1), y, self.weight.transpose(1, 2))

    def forward(self, y):
        return ACTIVATIONS[self.activation](self._affine(y))

    def linearize(self, y, scale=1.0):
        """:meth:`Perceptron.linearize` per member (``scale`` a float or an ``(E, 1, 1)``
        column): ``u -> s(u) W_e`` and ``u -> (s(u)^T y, sum_batch s(u))`` member by member."""
        slope = scale * DERIVATIVES[self.activation](self._affine(y))

        def parameter_vjp(u):
            s = slope * u
            return [torch.bmm(s.transpose(1, 2), y) if self.weight.requires_grad else None,
                    s.sum(dim=1) if self.bias.requires_grad else None]

        return (lambda u: torch.bmm(slope * u, self.weight)), parameter_vjp

    def extra_repr(self) -> str:
        return f"members={self.weight.shape[0]}, activation={self.activation!r}"
