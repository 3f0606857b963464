"""How an implicit block's gradient is computed (docs/design.md, section 3).

A backward is a small strategy chosen by name (:data:`BACKWARDS`):

- implicit differentiation with a linear solver of ``irn.linear`` (``neumann``, ``gmres``,
  ``direct``): with ``g = dL/dy`` solve ``(I - h theta J_F(y*)^T) v = g``, then hand ``v`` to the
  graph of ``x + h(1-theta)F(x)`` and ``h theta (dF(y*)/dw)^T v`` to F's parameters;
- ``jacobian_free``: the same with ``v = g`` (the inverse dropped);
- ``unrolled``: autograd through every forward iteration (no solve).

Each says whether it is twice differentiable and whether it needs the forward's iterates on
the graph, and attaches itself to the block's output (:meth:`Backward.output`). The autograd
Functions live here and get what they need as one :class:`Adjoint` (``F``, the linear solve's
settings, who solves, and where the statistics go), not the block.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .driver import SolveInfo, labelled, vjp
from .linear import LINEAR_SOLVERS


def axpy(a: torch.Tensor, c, b: torch.Tensor) -> torch.Tensor:
    """``a + c b`` for a float ``c`` (shared by every member) or a per-member column ``c``."""
    return torch.add(a, b, alpha=c) if isinstance(c, float) else torch.addcmul(a, c, b)


class OneMember:
    """The residual function ``F`` of one network (on ``(B, *)``) as that of an ensemble of one
    (on ``(1, B, *)``): the public layout's boundary, where the member axis is squeezed for the
    user's ``F`` and restored after it."""

    def __init__(self, F: nn.Module):
        self.F = F

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.F(y.squeeze(0)).unsqueeze(0)

    def parameters(self):
        return self.F.parameters()


def on_members(F: nn.Module, members: int | None):
    """A block's residual function ``F`` on the member layout ``(E, B, *)``: an ensemble
    block's (``members`` E) as it is; one network's (``members`` None) lifted by
    :class:`OneMember`, unless it declares that it acts on any leading dimensions
    (``F.any_leading_dims = True``, as :class:`irn.functions.Perceptron`), which it then does
    on ``(1, B, *)`` as it is."""
    lifted = members is None and not getattr(F, "any_leading_dims", False)
    return OneMember(F) if lifted else F


def linearize(F, y: torch.Tensor, scale: float = 1.0, create_graph: bool = False):
    """The two products of the backward at ``y``, built once and applied many times::

        input_vjp(u)     = scale * J_F(y)^T u                 (the adjoint linear solve)
        parameter_vjp(u) = scale * (dF(y)/dw)^T u, one tensor per parameter w of F
                           (None for a parameter that does not require grad)

    A residual function may provide its own, as a method ``F.linearize(y, scale)`` (the
    library's :class:`irn.functions.Perceptron` does: a few tensor operations per product instead
    of autograd calls); otherwise one graph of ``F(y)`` is built and serves both. With
    ``create_graph`` the products are themselves differentiable, in ``y`` (which then keeps its
    own graph), ``u`` and the parameters: second derivatives (an own ``linearize`` is when it is
    made of differentiable tensor operations, as the library's are).
    """
    if isinstance(F, OneMember):  # F's own products, on the one member's samples
        input_vjp, parameter_vjp = linearize(F.F, y[0], scale, create_graph)
        return (lambda u: input_vjp(u[0]).unsqueeze(0)), (lambda u: parameter_vjp(u[0]))
    own = getattr(F, "linearize", None)
    if own is not None:
        return own(y, scale)
    with torch.enable_grad():
        if create_graph:
            # fresh nodes on the graphs of y and of the parameters: the products are partial
            # derivatives (only the paths through F's own inputs; y* also depends on w) and
            # stay differentiable in y and w
            y_in = y.view_as(y) if y.requires_grad else y.detach().requires_grad_()
            views = {name: p.view_as(p) for name, p in F.named_parameters()}
            params = list(views.values())
            fy = torch.func.functional_call(F, views, (y_in,))
        else:
            params = list(F.parameters())
            y_in = y.detach().requires_grad_()
            fy = F(y_in)

    def parameter_vjp(u):
        wanted = [p for p in params if p.requires_grad]
        if not (wanted and fy.requires_grad):
            return [None] * len(params)
        grads = iter(torch.autograd.grad(fy, wanted, scale * u, retain_graph=True,
                                         create_graph=create_graph, allow_unused=True,
                                         materialize_grads=True))
        return [next(grads) if p.requires_grad else None for p in params]

    return (lambda u: scale * vjp(fy, y_in, u, create_graph=create_graph)), parameter_vjp


@dataclass(frozen=True)
class Adjoint:
    """What the backward of a block needs: its residual function ``F`` on the member layout
    ``(E, B, *)``, its ``backward`` strategy, the linear solve's stopping rule ``lin_atol``,
    ``lin_rtol`` (:class:`irn.config.Stopping`) and ``lin_max_iters``, ``implicit`` (one bool per member: who solves), ``name`` and ``labels``
    (how errors name the block, and whether they name the member: an ensemble's) and
    ``report(info, stats)``, which hands a backward's :class:`irn.driver.SolveInfo` to the
    statistics of its forward (``stats``; None for a solve of second derivatives) and applies
    the block's ``on_nonconvergence`` policy."""

    F: object
    backward: "Backward"
    lin_atol: float
    lin_rtol: float
    lin_max_iters: int
    implicit: tuple[bool, ...]
    name: str
    labels: bool
    report: Callable[[SolveInfo, object], None]

    def nothing_solved(self) -> SolveInfo:
        """The statistics of a backward that solves nothing: 0 iterations, residual 0, and
        ``converged`` None, per member (an explicit member is None too)."""
        count = len(self.implicit)
        return SolveInfo([0] * count, [0.0] * count, [None] * count)


class Backward:
    """A backward strategy. ``twice_differentiable``: second derivatives (``create_graph``)
    go through it; ``unrolls``: it differentiates the forward iterations, which must then keep
    their graph."""

    name: str
    twice_differentiable = False
    unrolls = False

    def output(self, adjoint: Adjoint, explicit, y_star, scale, stats, evaluate_F):
        """The block's output ``explicit + scale F(y*)`` with this backward attached.
        ``explicit = x + h(1-theta)F(x)`` (on the graph), ``scale = h theta``, ``stats`` the
        forward's statistics (completed by the backward), ``evaluate_F`` the forward's
        evaluation of ``F`` (which reuses its last value at ``y*``)."""
        with torch.no_grad():
            f_star = evaluate_F(y_star)
        return _ImplicitBackward.apply(explicit, y_star.detach(), f_star, scale, adjoint, stats,
                                       *adjoint.F.parameters())

    def adjoint(self, adjoint: Adjoint, y_star, grad, scale, create_graph: bool):
        """``(v, parameter gradients, statistics)`` for the incoming gradient ``grad``."""
        raise NotImplementedError


class ImplicitDifferentiation(Backward):
    """``v`` solving ``(I - h theta J_F(y*)^T) v = g`` with the linear solver ``name``."""

    def __init__(self, name: str, twice_differentiable: bool):
        self.name, self.twice_differentiable = name, twice_differentiable

    def adjoint(self, adjoint, y_star, grad, scale, create_graph):
        input_vjp, parameter_vjp = linearize(adjoint.F, y_star, scale, create_graph)
        # a backward called under autocast: the linear solver's own arithmetic in full precision
        device_type = grad.device.type
        with (torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type)
              else contextlib.nullcontext()):
            v, info = labelled(adjoint.name, "backward", adjoint.labels,
                               LINEAR_SOLVERS[self.name], input_vjp, grad, tol=adjoint.lin_atol,
                               max_iters=adjoint.lin_max_iters, active=adjoint.implicit,
                               rtol=adjoint.lin_rtol)
        if not all(adjoint.implicit):  # explicit members: v = grad (GMRES left them at zero)
            mask = torch.tensor(adjoint.implicit, device=v.device)
            v = torch.where(mask.reshape((-1,) + (1,) * (v.dim() - 1)), v, grad)
            info = SolveInfo(info.iterations, info.residual,
                             [ok if t else None for ok, t in zip(info.converged, adjoint.implicit)])
        return v, parameter_vjp(v), info


class JacobianFree(Backward):
    """``v = g``: the inverse dropped (the cheap approximate gradient of DEQ libraries)."""

    name = "jacobian_free"

    def adjoint(self, adjoint, y_star, grad, scale, create_graph):
        _, parameter_vjp = linearize(adjoint.F, y_star, scale, create_graph)
        return grad, parameter_vjp(grad), adjoint.nothing_solved()


class Unrolled(Backward):
    """Autograd through every forward iteration (memory grows with the iterations)."""

    name = "unrolled"
    twice_differentiable = True
    unrolls = True

    def output(self, adjoint, explicit, y_star, scale, stats, evaluate_F):
        out = axpy(explicit, scale, adjoint.F(y_star))  # one more application, on the graph
        return _UnrolledBackward.apply(out, adjoint, stats)


#: every backward by name; a block's ``backward=`` is one of these
BACKWARDS = {strategy.name: strategy for strategy in (
    ImplicitDifferentiation("neumann", twice_differentiable=True),
    ImplicitDifferentiation("gmres", twice_differentiable=False),
    ImplicitDifferentiation("direct", twice_differentiable=True),
    Unrolled(),
    JacobianFree(),
)}


def _solve_adjoint(ctx, grad):
    """The backward shared by the two functions below: ``v`` with
    ``(I - h theta J_F(y*)^T) v = grad`` and ``h theta (dF(y*)/dw)^T v``, and the solve's
    statistics. Asked for a graph (``create_graph=True``; autograd then runs the backward in
    grad mode), the solve is built from differentiable operations at ``y*`` carrying its own
    implicit derivative (:class:`_ImplicitSolution`), so that ``v`` is differentiable in ``x``,
    the parameters and ``grad``: second (and higher) derivatives."""
    adjoint = ctx.adjoint
    explicit, y_star = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    if create_graph:
        if not adjoint.backward.twice_differentiable:
            names = [repr(n) for n, b in BACKWARDS.items() if b.twice_differentiable]
            allowed = ", ".join(names[:-1]) + " or " + names[-1]
            raise NotImplementedError(
                f"{adjoint.name}: a second derivative (create_graph=True) through an implicit "
                f"block is not supported with backward={adjoint.backward.name!r}; build the "
                f"block with backward={allowed}")
        y_star = _ImplicitSolution.apply(explicit, y_star.detach(), ctx.scale, adjoint,
                                         *adjoint.F.parameters())
    return adjoint.backward.adjoint(adjoint, y_star, grad, ctx.scale, create_graph)


class _ImplicitBackward(torch.autograd.Function):
    """The last application of the map, ``explicit + h theta F(y*)``, with its own backward.

    Forward keeps only ``explicit`` and ``y*`` (no graph of ``F(y*)``). Backward solves
    ``(I - h theta J_F(y*)^T) v = g`` and returns ``v`` for ``explicit`` (autograd pushes it
    through ``x + h(1-theta)F(x)``) and ``h theta (dF(y*)/dw)^T v`` for F's parameters ``w``;
    the solve's statistics complete the forward's ``SolveStats``.
    """

    @staticmethod
    def forward(ctx, explicit, y_star, f_star, scale, adjoint, stats, *params):
        # f_star = F(y*), evaluated by the solver already; scale = h theta (a float, or a
        # per-member column of an ensemble); explicit is kept for second derivatives only
        ctx.adjoint, ctx.stats, ctx.scale = adjoint, stats, scale  # this forward's
        ctx.save_for_backward(explicit, y_star)
        return axpy(explicit, scale, f_star)

    @staticmethod
    def backward(ctx, grad):
        v, param_grads, info = _solve_adjoint(ctx, grad)
        ctx.adjoint.report(info, ctx.stats)
        return (v, None, None, None, None, None, *param_grads)


class _ImplicitSolution(torch.autograd.Function):
    """``y*`` as a function of ``explicit = x + h(1-theta)F(x)`` and F's parameters, for second
    derivatives: ``y* = explicit + h theta F(y*)`` gives
    ``dy* = (I - h theta J_F(y*))^{-1} (d explicit + h theta (dF/dw) dw)``, so its backward is
    the block's adjoint solve again (and differentiable again under ``create_graph``)."""

    @staticmethod
    def forward(ctx, explicit, y_star, scale, adjoint, *params):
        ctx.adjoint, ctx.scale = adjoint, scale
        ctx.save_for_backward(explicit, y_star)
        return y_star.clone()

    @staticmethod
    def backward(ctx, grad):
        v, param_grads, info = _solve_adjoint(ctx, grad)
        ctx.adjoint.report(info, None)  # a solve of its own: warns, records nothing
        return (v, None, None, None, *param_grads)


class _UnrolledBackward(torch.autograd.Function):
    """Identity; its backward (autograd through the iterations, no linear solve) completes
    the statistics of the matching forward: no backward iterations."""

    @staticmethod
    def forward(ctx, out, adjoint, stats):
        ctx.adjoint, ctx.stats = adjoint, stats
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # the identity: differentiable again (double backward works)
        ctx.adjoint.report(ctx.adjoint.nothing_solved(), ctx.stats)
        return grad, None, None
