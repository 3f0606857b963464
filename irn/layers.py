"""The implicit residual block (paper eq. 7, the theta-method):

    y = x + h * ((1 - theta) * F(x) + theta * F(y))

Forward: a solver from ``irn.solvers`` finds ``y*`` without building a graph. The block then
returns one more application of the map, ``x + h(1-theta)F(x) + h theta F(y*)`` with ``y*``
held constant (``F(x)`` and ``F(y*)`` are the evaluations the solve made already).
Backward: an ``autograd.Function`` computing the ``F(y*)`` term turns the incoming gradient
``g`` into ``v`` solving

    (I - h theta J_F(y*)^T) v = g,

returns ``h theta (dF(y*)/dw)^T v`` for the parameters and hands ``v`` to the graph of
``x + h(1-theta)F(x)``, which yields ``dL/dx = v + h(1-theta) J_F(x)^T v`` and
``dL/dw = h[(1-theta) dF(x)/dw + theta dF(y*)/dw]^T v`` (implicit function theorem). Nothing
of the iterations is saved for backward, and of the ``F(y*)`` term only ``y*`` and
``x + h(1-theta)F(x)``. Second derivatives (``create_graph=True``): with ``neumann`` and
``direct`` the adjoint solve is itself built from differentiable operations at a ``y*`` that
carries its implicit derivative ``dy* = (I - h theta J_F)^{-1}(...)``, another solve with the
same operator; ``unrolled`` differentiates the iterations.

Ensembles (docs/design.md, section 5): a block whose ``h`` or ``theta`` is a sequence of ``E`` values is
``E`` independent blocks at once. Its ``F`` maps ``(E, B, *)`` to ``(E, B, *)`` (member ``e``'s
residual function acting on ``x[e]``), every solve stops per member, and ``last_stats`` is a
list with one :class:`irn.SolveStats` per member. Members with ``theta = 0`` take the explicit
step, as a single explicit block does.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import solvers as S
from ._checks import choice, integer, number, require
from .solvers import ConvergenceWarning, SolverError, SolveStats

POLICIES = ("warn", "raise", "ignore")


def _axpy(a: torch.Tensor, c, b: torch.Tensor) -> torch.Tensor:
    """``a + c b`` for a float ``c`` (one network) or a per-member column ``c`` (an ensemble)."""
    return torch.add(a, b, alpha=c) if isinstance(c, float) else torch.addcmul(a, c, b)


@dataclass(frozen=True)
class SolveConfig:
    """How a block solves: the forward ``solver`` with its ``solver_options``, the ``backward``
    (``neumann``, ``gmres``, ``direct``, ``unrolled``, ``jacobian_free``), the stopping rules
    ``max_b ||R_b|| <= tol`` within ``max_iters`` (forward) and ``lin_tol``,
    ``lin_max_iters`` (backward; None: the forward's), and the ``on_nonconvergence`` policy.
    Every field is checked here, once, option values included; a block holds one
    (``block.config``), and ``dataclasses.replace`` changes some fields of it."""

    solver: str = "fixed_point"
    backward: str = "neumann"
    tol: float = 1e-6
    max_iters: int = 50
    lin_tol: float | None = None
    lin_max_iters: int | None = None
    solver_options: dict = field(default_factory=dict)
    on_nonconvergence: str = "warn"

    def __post_init__(self):
        choice("solver", self.solver, S.FORWARD_SOLVERS)
        choice("backward", self.backward, S.BACKWARDS)
        number("tol", self.tol, lambda v: v > 0, "a finite number > 0")
        integer("max_iters", self.max_iters)
        lin_tol = self.tol if self.lin_tol is None else self.lin_tol
        lin_max_iters = self.max_iters if self.lin_max_iters is None else self.lin_max_iters
        number("lin_tol", lin_tol, lambda v: v > 0, "a finite number > 0")
        integer("lin_max_iters", lin_max_iters)
        require(self.solver_options is None or isinstance(self.solver_options, dict),
                f"solver_options must be a dict or None, got {self.solver_options!r}")
        options = dict(self.solver_options or {})
        S.check_options(self.solver, options)
        choice("on_nonconvergence", self.on_nonconvergence, POLICIES)
        for name, value in (("tol", float(self.tol)), ("lin_tol", float(lin_tol)),
                            ("lin_max_iters", lin_max_iters), ("solver_options", options)):
            object.__setattr__(self, name, value)  # resolved once, here


def _per_member(name: str, value, members: int | None):
    """``value`` as a float (one network) or a tuple of ``members`` floats (an ensemble)."""
    if members is None:
        return float(value)
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * members
    require(len(values) == members, f"{name} must have one value per member ({members}), "
                                    f"got {len(values)}")
    return tuple(float(v) for v in values)


def linearize(F: nn.Module, y: torch.Tensor, scale: float = 1.0, create_graph: bool = False):
    """The two products of the backward at ``y``, built once and applied many times::

        input_vjp(u)     = scale * J_F(y)^T u                 (the adjoint linear solve)
        parameter_vjp(u) = scale * (dF(y)/dw)^T u, one tensor per parameter w of F
                           (None for a parameter that does not require grad)

    A residual function may provide its own, as a method ``F.linearize(y, scale)`` (the
    library's :class:`irn.models.Perceptron` does: a few tensor operations per product instead
    of autograd calls); otherwise one graph of ``F(y)`` is built and serves both. With
    ``create_graph`` the products are themselves differentiable, in ``y`` (which then keeps its
    own graph), ``u`` and the parameters: second derivatives (an own ``linearize`` is when it is
    made of differentiable tensor operations, as the library's are).
    """
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

    return (lambda u: scale * S.vjp(fy, y_in, u, create_graph=create_graph)), parameter_vjp


class _Latest:
    """Mutable record of a block's latest solve."""

    __slots__ = ("stats", "iterate_residuals", "backward_converged")

    def __init__(self):
        self.stats, self.iterate_residuals, self.backward_converged = None, None, None


#: the backwards whose adjoint solve is made of differentiable operations (create_graph=True)
TWICE_DIFFERENTIABLE = ("neumann", "direct", "unrolled")


def _adjoint(ctx, grad):
    """The backward shared by the two functions below: ``v`` with
    ``(I - h theta J_F(y*)^T) v = grad`` and ``h theta (dF(y*)/dw)^T v``, and the solve's
    statistics. Asked for a graph (``create_graph=True``; autograd then runs the backward in
    grad mode), the solve is built from differentiable operations at ``y*`` carrying its own
    implicit derivative (:class:`_ImplicitSolution`), so that ``v`` is differentiable in ``x``,
    the parameters and ``grad``: second (and higher) derivatives."""
    block = ctx.block
    explicit, y_star = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    if create_graph:
        if block.backward not in TWICE_DIFFERENTIABLE:
            raise NotImplementedError(
                f"{block.name}: a second derivative (create_graph=True) through an implicit "
                f"block is not supported with backward={block.backward!r}; build the block "
                f"with backward='neumann', 'direct' or 'unrolled'")
        y_star = _ImplicitSolution.apply(explicit, y_star.detach(), ctx.scale, block,
                                         *block.F.parameters())
    return block._solve_adjoint(y_star, grad, ctx.scale, create_graph=create_graph)


class _ImplicitBackward(torch.autograd.Function):
    """The last application of the map, ``explicit + h theta F(y*)``, with its own backward.

    Forward keeps only ``explicit`` and ``y*`` (no graph of ``F(y*)``). Backward solves
    ``(I - h theta J_F(y*)^T) v = g`` and returns ``v`` for ``explicit`` (autograd pushes it
    through ``x + h(1-theta)F(x)``) and ``h theta (dF(y*)/dw)^T v`` for F's parameters ``w``;
    the solve's statistics complete the forward's ``SolveStats``.
    """

    @staticmethod
    def forward(ctx, explicit, y_star, f_star, scale, block, stats, *params):
        # f_star = F(y*), evaluated by the solver already; scale = h theta (a float, or a
        # per-member column of an ensemble); explicit is kept for second derivatives only
        ctx.block, ctx.stats, ctx.scale = block, stats, scale  # this forward's, for its backward
        ctx.save_for_backward(explicit, y_star)
        return _axpy(explicit, scale, f_star)

    @staticmethod
    def backward(ctx, grad):
        v, param_grads, info = _adjoint(ctx, grad)
        ctx.block._record_backward(info, ctx.stats)
        return (v, None, None, None, None, None, *param_grads)


class _ImplicitSolution(torch.autograd.Function):
    """``y*`` as a function of ``explicit = x + h(1-theta)F(x)`` and F's parameters, for second
    derivatives: ``y* = explicit + h theta F(y*)`` gives
    ``dy* = (I - h theta J_F(y*))^{-1} (d explicit + h theta (dF/dw) dw)``, so its backward is
    the block's adjoint solve again (and differentiable again under ``create_graph``)."""

    @staticmethod
    def forward(ctx, explicit, y_star, scale, block, *params):
        ctx.block, ctx.scale = block, scale
        ctx.save_for_backward(explicit, y_star)
        return y_star.clone()

    @staticmethod
    def backward(ctx, grad):
        v, param_grads, info = _adjoint(ctx, grad)
        ctx.block._record_backward(info)  # a solve of its own: warns, records nothing
        return (v, None, None, None, *param_grads)


class _UnrolledBackward(torch.autograd.Function):
    """Identity; its backward (autograd through the iterations, no linear solve) completes
    the statistics of the matching forward: no backward iterations."""

    @staticmethod
    def forward(ctx, out, block, stats):
        ctx.block, ctx.stats = block, stats
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # the identity: differentiable again (double backward works)
        block = ctx.block
        block._record_backward([(e, 0, 0.0, None) for e in block._solving_members()], ctx.stats)
        return grad, None, None


class ImplicitResidualBlock(nn.Module):
    """``y = x + h((1-theta) F(x) + theta F(y))`` for any residual function ``F``.

    Args:
        F: module mapping a batch ``(B, *)`` to a batch of the same shape.
        h: step size, > 0.
        theta: implicitness in [0, 1]; 0 is the explicit ResNet step (no solve).
        (A sequence of ``E`` values for ``h`` or ``theta`` makes an ensemble block of ``E``
        members: inputs ``(E, B, *)``, per-member stopping and statistics; see the module doc.)
        solver: forward solver, one of ``irn.solvers.FORWARD_SOLVERS``.
        backward: ``neumann``, ``gmres``, ``direct`` (implicit differentiation),
            ``unrolled`` (autograd through the iterations), ``jacobian_free`` (``v = g``).
        tol, max_iters: stopping rule of the forward solve, ``max_b ||R_b(y)|| <= tol``.
        lin_tol, lin_max_iters: same for the backward linear solve (default: tol, max_iters).
        solver_options: solver-specific settings (see ``irn.solvers.SOLVER_OPTIONS``).
        on_nonconvergence: ``warn`` | ``raise`` | ``ignore``.

    After a forward, ``last_stats`` holds the solve's :class:`irn.SolveStats`; the backward
    fills in its backward fields. With ``keep_iterates = True`` the forward also records the
    differentiable residual norms of the iterates (``iterate_residuals``) for
    :func:`irn.regularizers.fixed_point`.
    """

    def __init__(self, F: nn.Module, h: float = 1.0, theta: float = 0.5, *,
                 solver: str = "fixed_point", backward: str = "neumann", tol: float = 1e-6,
                 max_iters: int = 50, lin_tol: float | None = None,
                 lin_max_iters: int | None = None, solver_options: dict | None = None,
                 on_nonconvergence: str = "warn"):
        super().__init__()
        require(isinstance(F, nn.Module), f"F must be a torch.nn.Module, got {type(F).__name__}")
        sequences = [len(v) for v in (h, theta) if isinstance(v, (list, tuple))]
        require(len(set(sequences)) <= 1 and all(sequences),
                f"h and theta given per member must have the same length >= 1, got {sequences}")
        members = sequences[0] if sequences else None
        for value in (h if isinstance(h, (list, tuple)) else (h,)):
            number("h", value, lambda v: v > 0, "a finite number > 0")
        for value in (theta if isinstance(theta, (list, tuple)) else (theta,)):
            number("theta", value, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        h, theta = _per_member("h", h, members), _per_member("theta", theta, members)
        self.config = SolveConfig(solver, backward, tol, max_iters, lin_tol, lin_max_iters,
                                  solver_options, on_nonconvergence)
        self.F = F
        self.members = members  # None: one network; E: an ensemble block
        self.h, self.theta = h, theta
        self.name = "block"  # ImplicitResNet renames its blocks "block 0", "block 1", ...
        self.keep_iterates = False
        # what the latest forward/backward left behind, in a plain object: nn.Module's own
        # __setattr__ is slow enough to show in a 100-layer network's training step
        self._latest = _Latest()
        self._checked_shape = False
        self._columns = None  # an ensemble's per-member coefficients, built at the first call

    @property
    def settings(self) -> dict:
        """The solver settings (:class:`SolveConfig`'s fields) as a dict."""
        return dataclasses.asdict(self.config)

    def with_settings(self, **block_kwargs) -> "ImplicitResidualBlock":
        """A block on the same ``F`` (shared, not copied) with some settings changed (any
        keyword of the constructor but ``F``): ``dataclasses.replace`` of its
        :class:`SolveConfig`, whose solver options are dropped when ``solver`` changes (options
        belong to a solver)."""
        changes = {k: v for k, v in block_kwargs.items() if k not in ("h", "theta")}
        if "solver" in changes:
            changes.setdefault("solver_options", None)
        config = dataclasses.replace(self.config, **changes)
        block = ImplicitResidualBlock(self.F, block_kwargs.get("h", self.h),
                                      block_kwargs.get("theta", self.theta),
                                      **dataclasses.asdict(config))
        block.name, block.keep_iterates = self.name, self.keep_iterates
        return block

    # the solver settings, read from the block's SolveConfig
    solver = property(lambda self: self.config.solver)
    backward = property(lambda self: self.config.backward)
    tol = property(lambda self: self.config.tol)
    max_iters = property(lambda self: self.config.max_iters)
    lin_tol = property(lambda self: self.config.lin_tol)
    lin_max_iters = property(lambda self: self.config.lin_max_iters)
    solver_options = property(lambda self: self.config.solver_options)
    on_nonconvergence = property(lambda self: self.config.on_nonconvergence)

    @property
    def last_stats(self) -> SolveStats | list[SolveStats] | None:
        """:class:`irn.SolveStats` of the latest forward (backward fields after its backward);
        for an ensemble a list, one per member."""
        return self._latest.stats

    @property
    def iterate_residuals(self) -> list[torch.Tensor] | None:
        """Batch means of ``||R(y^k)||`` of the latest forward's iterates (``= ||y^{k+1} - y^k||``
        for ``fixed_point``), differentiable; None unless ``keep_iterates`` was set. For an
        ensemble each entry has shape ``(E,)``, zero from each member's own count on."""
        return self._latest.iterate_residuals

    @property
    def backward_converged(self) -> bool | list | None:
        """Whether the latest backward linear solve met ``lin_tol`` (None before any; for an
        ensemble a list, None for members without a solve)."""
        return self._latest.backward_converged

    def extra_repr(self) -> str:
        members = "" if self.members is None else f"members={self.members}, "
        return (f"{members}h={self.h}, theta={self.theta}, solver={self.solver!r}, "
                f"backward={self.backward!r}, tol={self.tol}, max_iters={self.max_iters}")

    # -- helpers --------------------------------------------------------------------------
    def _residual_function(self, y: torch.Tensor) -> torch.Tensor:
        fy = self.F(y)
        if not self._checked_shape:
            require(fy.shape == y.shape, f"F must return a tensor of its input's shape: got "
                                          f"{tuple(fy.shape)} for input {tuple(y.shape)}")
            self._checked_shape = True
        return fy

    def _coefficients(self, x: torch.Tensor):
        """``(h(1-theta), h theta, implicit)``: floats and None for one network; for an ensemble
        per-member columns ``(E, 1, ..., 1)`` on ``x``'s dtype and device, and ``implicit``, one
        bool per member (``theta > 0``, on the host)."""
        if self.members is None:
            return self.h * (1 - self.theta), self.h * self.theta, None
        key = (x.dtype, x.device, x.dim())
        if self._columns is None or self._columns[0] != key:
            h = torch.tensor(self.h, dtype=torch.float64)
            theta = torch.tensor(self.theta, dtype=torch.float64)
            shape = (-1,) + (1,) * (x.dim() - 1)
            self._columns = (key, (h * (1 - theta)).reshape(shape).to(x.device, x.dtype),
                             (h * theta).reshape(shape).to(x.device, x.dtype),
                             tuple(t > 0 for t in self.theta))
        return self._columns[1:]

    def _label(self, member: int | None) -> str:
        return self.name if member is None else f"{self.name}, member {member}"

    def _nonconvergence(self, what: str, iterations: int, residual: float,
                        member: int | None = None) -> None:
        message = (f"{self._label(member)}: {what} solve did not converge in {iterations} "
                   f"iterations (residual {residual:.3e})")
        if self.on_nonconvergence == "raise":
            raise SolverError(message)
        if self.on_nonconvergence == "warn":
            warnings.warn(message, ConvergenceWarning, stacklevel=5)  # the caller of block(x)

    def _run(self, solve, *args, what: str, **kwargs):
        try:
            return solve(*args, **kwargs)
        except SolverError as err:
            label = self._label(getattr(err, "member", None))
            raise SolverError(f"{label}: {what} solve failed: {err}") from None

    def _record_stats(self, info, implicit):
        """One network: a :class:`SolveStats`; an ensemble: one per member (the explicit
        members' those of an explicit block). Warns (or raises) per unconverged member."""
        if implicit is None:
            stats = SolveStats(info.iterations, float(info.residual), info.converged)
            if not info.converged:
                self._nonconvergence("forward", info.iterations, stats.residual)
            return stats
        stats = []
        for e, is_implicit in enumerate(implicit):
            stats.append(SolveStats(info.iterations[e], info.residual[e], info.converged[e])
                         if is_implicit else SolveStats(0, 0.0, True))
            if is_implicit and not info.converged[e]:
                self._nonconvergence("forward", info.iterations[e], info.residual[e], e)
        return stats

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require(x.dim() >= 1, "x must be batch-first with at least one dimension")
        if torch._C._are_functorch_transforms_active():  # the solvers' stopping rule reads values
            raise NotImplementedError(
                f"{self.name}: torch.func transforms (vmap, grad, jvp, ...) cannot trace an "
                f"implicit block, whose solvers stop on data-dependent residuals; for many "
                f"networks at once stack them (irn.ImplicitResNet.stack), for gradients use "
                f"torch.autograd")
        members = self.members
        if members is not None and not (x.dim() >= 2 and x.shape[0] == members):
            raise ValueError(f"x must have shape (members={members}, batch, ...) for an ensemble "
                             f"block, got {tuple(x.shape)}")
        h_explicit, h_implicit, implicit = self._coefficients(x)
        latest = self._latest
        if x.numel() == 0:  # an empty batch: nothing to solve, an empty output
            latest.iterate_residuals = [] if self.keep_iterates else None
            latest.backward_converged = None
            latest.stats = (SolveStats(0, 0.0, True) if members is None
                            else [SolveStats(0, 0.0, True) for _ in range(members)])
            return x.clone()
        if h_implicit == 0 if members is None else self.theta == (0.0,) * members:
            latest.iterate_residuals = [] if self.keep_iterates else None
            latest.backward_converged = None
            if members is None:
                latest.stats = SolveStats(0, 0.0, True)
                return x + self.h * self._residual_function(x)  # exactly the ResNet step
            latest.stats = [SolveStats(0, 0.0, True) for _ in range(members)]
            return _axpy(x, h_explicit, self._residual_function(x))

        grad_on = torch.is_grad_enabled()
        unrolled = self.backward == "unrolled" and grad_on
        differentiable = unrolled or (self.keep_iterates and grad_on)
        # x + h(1-theta)F(x): evaluated once, on the graph when gradients are wanted
        fx = self._residual_function(x)
        explicit = _axpy(x, h_explicit, fx)
        # Without a graph, the latest evaluation of F is reused when asked for the same tensor
        # again: the first iterate is x, whose F(x) the explicit term holds, and a solver's
        # last evaluation is at the y* it returns, which the output needs: two of the 16
        # evaluations of F per layer and training step on the benchmark's W3. (On a graph a
        # shared node would change the order in which gradients are summed, so there F is
        # evaluated afresh and results stay bit for bit those of separate evaluations.)
        latest_f = [x, fx.detach()] if not differentiable else [None, None]

        def evaluate_F(y):
            if y is latest_f[0]:
                return latest_f[1]
            fy = self._residual_function(y)
            if not differentiable:
                latest_f[:] = y, fy
            return fy

        with torch.set_grad_enabled(differentiable):
            constant = explicit if differentiable else explicit.detach()

            if members is None:
                def step(y):  # the fixed-point map y -> x + h(1-theta)F(x) + h theta F(y)
                    return torch.add(constant, evaluate_F(y), alpha=h_implicit)
            else:
                def step(y):  # the same, one coefficient per member
                    return torch.addcmul(constant, h_implicit, evaluate_F(y))

            record = [] if self.keep_iterates else None
            y_star, info = self._run(S.FORWARD_SOLVERS[self.solver], step, x, tol=self.tol,
                                     max_iters=self.max_iters, differentiable=differentiable,
                                     record=record, active=implicit, **self.solver_options,
                                     what="forward")
        latest.iterate_residuals = self._iterate_residuals(record, info)
        latest.stats = self._record_stats(info, implicit)
        latest.backward_converged = None

        if not grad_on:
            return step(y_star)
        if unrolled:  # autograd through the iterations: one more application, on the graph
            out = _axpy(explicit, h_implicit, self._residual_function(y_star))
            return _UnrolledBackward.apply(out, self, latest.stats)
        # one more application of the map with y* held constant; its backward is implicit
        with torch.no_grad():
            f_star = evaluate_F(y_star)
        return _ImplicitBackward.apply(explicit, y_star.detach(), f_star, h_implicit, self,
                                       latest.stats, *self.F.parameters())

    def _iterate_residuals(self, record, info):
        """Batch means of the recorded residual norms; an ensemble's are ``(E,)`` tensors,
        zero past each member's own iteration count (so that R_fp sums only its terms)."""
        if record is None:
            return None
        if self.members is None:
            return [r.mean() for r in record]
        counts = torch.tensor([k if t > 0 else 0 for k, t in zip(info.iterations, self.theta)],
                              device=record[0].device)
        return [torch.where(k < counts, r.mean(dim=1), 0) for k, r in enumerate(record)]

    # -- backward -------------------------------------------------------------------------
    def _solve_adjoint(self, y_star: torch.Tensor, grad: torch.Tensor, scale,
                       create_graph: bool = False):
        """``v`` with ``(I - h theta J_F(y*)^T) v = grad`` (``v = grad`` for
        ``jacobian_free``), ``h theta (dF(y*)/dw)^T v`` for F's parameters (``scale`` is
        ``h theta``) and the solve's statistics: ``[(member, iterations, residual, converged)]``
        (``member`` None for one network; an ensemble's implicit members, its explicit ones
        passing ``grad`` on; ``converged`` None where nothing was solved). With
        ``create_graph`` every product is differentiable."""
        input_vjp, parameter_vjp = linearize(self.F, y_star, scale, create_graph)
        ensemble = self.members is not None
        implicit = self._coefficients(y_star)[2]
        if self.backward == "jacobian_free":
            return grad, parameter_vjp(grad), [(e, 0, 0.0, None) for e in self._solving_members()]
        v, info = self._run(S.LINEAR_SOLVERS[self.backward], input_vjp, grad, tol=self.lin_tol,
                            max_iters=self.lin_max_iters, active=implicit, what="backward")
        if not ensemble:
            return v, parameter_vjp(v), [(None, info.iterations, float(info.residual),
                                          info.converged)]
        if not all(implicit):  # explicit members: v = grad (GMRES left them at zero)
            mask = torch.tensor(implicit, device=v.device)
            v = torch.where(mask.reshape((-1,) + (1,) * (v.dim() - 1)), v, grad)
        return v, parameter_vjp(v), [(e, info.iterations[e], info.residual[e], info.converged[e])
                                     for e in self._solving_members()]

    def _solving_members(self) -> list:
        """The members whose backward solves (``theta > 0``); ``[None]`` for one network."""
        return [None] if self.members is None else [e for e, t in enumerate(self.theta) if t > 0]

    def _record_backward(self, info, stats=None) -> None:
        """Hand a backward's statistics ``info`` (``[(member, iterations, residual,
        converged)]``, as :meth:`_solve_adjoint` returns them) to the ``stats`` of its forward,
        and to ``backward_converged`` when that forward is the latest one and solved something;
        warn (or raise) per unconverged member."""
        if stats is not None:
            member_stats = stats if self.members is not None else [stats]
            for member, iterations, residual, _ in info:
                target = member_stats[0 if member is None else member]
                target.backward_iterations, target.backward_residual = iterations, residual
            solved = [(member, ok) for member, _, _, ok in info if ok is not None]
            if stats is self._latest.stats and solved:
                if self.members is None:
                    self._latest.backward_converged = solved[0][1]
                else:
                    converged = [None] * self.members
                    for member, ok in solved:
                        converged[member] = ok
                    self._latest.backward_converged = converged
        for member, iterations, residual, ok in info:
            if ok is False:
                self._nonconvergence("backward", iterations, residual, member)
