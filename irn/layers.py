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
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from . import solvers as S
from ._checks import choice, integer, number, per_member, require
from .backward import BACKWARDS, Adjoint, axpy, linearize  # noqa: F401 (linearize: public here)
from .records import SolveRecord
from .solvers import ConvergenceWarning, SolverError, SolveStats  # noqa: F401 (public here)

POLICIES = ("warn", "raise", "ignore")


@dataclass(frozen=True)
class SolveConfig:
    """How a block solves: the forward ``solver`` (a name, or a tuple of names tried in order
    where the previous one did not converge, ``irn.solvers.fallback``) with its
    ``solver_options`` (for a tuple: ``{name: options}``), the ``backward``
    (``neumann``, ``gmres``, ``direct``, ``unrolled``, ``jacobian_free``), the stopping rules
    ``max_b ||R_b|| <= tol`` within ``max_iters`` (forward) and ``lin_tol``,
    ``lin_max_iters`` (backward; None: the forward's), and the ``on_nonconvergence`` policy.
    Every field is checked here, once, option values included; a block holds one
    (``block.config``), and ``dataclasses.replace`` changes some fields of it."""

    solver: str | tuple = "fixed_point"
    backward: str = "neumann"
    tol: float = 1e-6
    max_iters: int = 50
    lin_tol: float | None = None
    lin_max_iters: int | None = None
    solver_options: dict = field(default_factory=dict)
    on_nonconvergence: str = "warn"

    def __post_init__(self):
        names = (self.solver,) if isinstance(self.solver, str) else self.solver
        require(isinstance(names, (tuple, list)) and len(names) >= 1
                and len(set(map(str, names))) == len(names),
                f"solver must be a solver's name or a tuple of distinct names, got {self.solver!r}")
        for name in names:
            choice("solver", name, S.FORWARD_SOLVERS)
        choice("backward", self.backward, BACKWARDS)
        number("tol", self.tol, lambda v: v > 0, "a finite number > 0")
        integer("max_iters", self.max_iters)
        lin_tol = self.tol if self.lin_tol is None else self.lin_tol
        lin_max_iters = self.max_iters if self.lin_max_iters is None else self.lin_max_iters
        number("lin_tol", lin_tol, lambda v: v > 0, "a finite number > 0")
        integer("lin_max_iters", lin_max_iters)
        require(self.solver_options is None or isinstance(self.solver_options, dict),
                f"solver_options must be a dict or None, got {self.solver_options!r}")
        options = dict(self.solver_options or {})
        if isinstance(self.solver, str):
            S.check_options(self.solver, options)
        else:
            require(set(options) <= set(names) and all(isinstance(o, dict) for o in options.values()),
                    f"solver_options for the solvers {tuple(names)} must map some of their "
                    f"names to their options, got {self.solver_options!r}")
            for name, own in options.items():
                S.check_options(name, own)
        choice("on_nonconvergence", self.on_nonconvergence, POLICIES)
        for name, value in (("tol", float(self.tol)), ("lin_tol", float(lin_tol)),
                            ("lin_max_iters", lin_max_iters), ("solver_options", options),
                            ("solver", self.solver if isinstance(self.solver, str) else tuple(names))):
            object.__setattr__(self, name, value)  # resolved once, here


class ImplicitResidualBlock(nn.Module):
    """``y = x + h((1-theta) F(x) + theta F(y))`` for any residual function ``F``.

    Args:
        F: module mapping a batch ``(B, *)`` to a batch of the same shape.
        h: step size, > 0.
        theta: implicitness in [0, 1]; 0 is the explicit ResNet step (no solve).
        (A sequence of ``E`` values for ``h`` or ``theta`` makes an ensemble block of ``E``
        members: inputs ``(E, B, *)``, per-member stopping and statistics; see the module doc.)
        solver: forward solver, one of ``irn.solvers.FORWARD_SOLVERS``, or a tuple of them
            tried in order per layer and member where the previous did not converge.
        backward: one of ``irn.backward.BACKWARDS``: ``neumann``, ``gmres``, ``direct``
            (implicit differentiation), ``unrolled`` (autograd through the iterations),
            ``jacobian_free`` (``v = g``).
        tol, max_iters: stopping rule of the forward solve, ``max_b ||R_b(y)|| <= tol``.
        lin_tol, lin_max_iters: same for the backward linear solve (default: tol, max_iters).
        solver_options: solver-specific settings (see ``irn.solvers.SOLVER_OPTIONS``).
        on_nonconvergence: ``warn`` | ``raise`` | ``ignore``.

    After a forward, ``last_stats`` holds the solve's :class:`irn.SolveStats`; the backward
    fills in its backward fields. With ``keep_iterates = True`` the forward also records the
    differentiable residual norms of the iterates (``iterate_residuals``) for
    :func:`irn.regularizers.fixed_point`; with ``keep_solution = True`` it keeps its output
    (``solution``) for :func:`irn.regularizers.jacobian`.
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
        h, theta = (float(v) if members is None else tuple(map(float, v))
                    for v in (per_member("h", h, members), per_member("theta", theta, members)))
        self.config = SolveConfig(solver, backward, tol, max_iters, lin_tol, lin_max_iters,
                                  solver_options, on_nonconvergence)
        self.F = F
        self.members = members  # None: one network; E: an ensemble block
        self.h, self.theta = h, theta
        self.name = "block"  # ImplicitResNet renames its blocks "block 0", "block 1", ...
        self.keep_iterates = False
        self.keep_solution = False
        self._latest = SolveRecord(members, theta if members else (theta,), on_nonconvergence)
        self._checked_shape = False
        self._columns = None  # an ensemble's per-member coefficients, built at the first call
        self._adjoint_of = None  # (name, Adjoint): what this block's backward needs

    @property
    def settings(self) -> dict:
        """The solver settings (:class:`SolveConfig`'s fields) as a dict."""
        return dataclasses.asdict(self.config)

    def with_settings(self, **block_kwargs) -> "ImplicitResidualBlock":
        """A block on the same ``F`` (shared, not copied) with some settings changed (any
        keyword of the constructor but ``F``): ``dataclasses.replace`` of its
        :class:`SolveConfig`, whose solver options are dropped when ``solver`` changes (options
        belong to a solver), and whose ``lin_tol`` (``lin_max_iters``) follows a changed ``tol``
        (``max_iters``) when it was equal to it, as the default is."""
        changes = {k: v for k, v in block_kwargs.items() if k not in ("h", "theta")}
        if "solver" in changes:
            changes.setdefault("solver_options", None)
        for forward, backward in (("tol", "lin_tol"), ("max_iters", "lin_max_iters")):
            if forward in changes and getattr(self.config, backward) == getattr(self.config, forward):
                changes.setdefault(backward, None)
        config = dataclasses.replace(self.config, **changes)
        block = ImplicitResidualBlock(self.F, block_kwargs.get("h", self.h),
                                      block_kwargs.get("theta", self.theta),
                                      **dataclasses.asdict(config))
        block.name, block.keep_iterates = self.name, self.keep_iterates
        block.keep_solution = self.keep_solution
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

    def _check_input(self, x: torch.Tensor) -> None:
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

    def _adjoint(self) -> Adjoint:
        """What this block's backward needs (rebuilt when the block is renamed)."""
        if self._adjoint_of is None or self._adjoint_of[0] != self.name:
            implicit = None if self.members is None else tuple(t > 0 for t in self.theta)
            self._adjoint_of = (self.name, Adjoint(
                self.F, BACKWARDS[self.backward], self.lin_tol, self.lin_max_iters, implicit,
                self.name, functools.partial(self._latest.backward, name=self.name)))
        return self._adjoint_of[1]

    @property
    def solution(self) -> torch.Tensor | None:
        """The output of the latest forward (``y*`` of an implicit block, within ``tol``; on
        the autograd graph), for :func:`irn.regularizers.jacobian`; None unless
        ``keep_solution`` was set."""
        return self._latest.solution

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._solve(x)
        self._latest.solution = out if self.keep_solution else None
        return out

    def _solve(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        h_explicit, h_implicit, implicit = self._coefficients(x)
        if x.numel() == 0:  # an empty batch: nothing to solve, an empty output
            self._latest.no_solve(self.keep_iterates)
            return x.clone()
        if h_implicit == 0 if self.members is None else self.theta == (0.0,) * self.members:
            self._latest.no_solve(self.keep_iterates)
            if self.members is None:
                return x + self.h * self._residual_function(x)  # exactly the ResNet step
            return axpy(x, h_explicit, self._residual_function(x))

        grad_on = torch.is_grad_enabled()
        strategy = BACKWARDS[self.backward]
        differentiable = grad_on and (strategy.unrolls or self.keep_iterates)
        fx = self._residual_function(x)
        explicit = axpy(x, h_explicit, fx)  # x + h(1-theta)F(x), on the graph when wanted
        step, evaluate_F = self._fixed_point_map(x, fx, explicit, h_implicit, differentiable)
        record = [] if self.keep_iterates else None
        solve, options = S.resolve(self.solver, self.solver_options)
        if torch.is_autocast_enabled(x.device.type):  # mixed precision: see _under_autocast
            solve, step = self._under_autocast(solve, step, x.device.type)
        with torch.set_grad_enabled(differentiable):
            y_star, info = S.labelled(
                self.name, "forward", solve, step, x, tol=self.tol, max_iters=self.max_iters,
                differentiable=differentiable, record=record, active=implicit, **options)
        self._latest.forward(info, record, self.name)
        if not grad_on:
            return step(y_star)
        # one more application of the map at y*, with the backward strategy attached
        return strategy.output(self._adjoint(), explicit, y_star, h_implicit, self._latest.stats,
                               evaluate_F)

    def _under_autocast(self, solve, step, device_type: str):
        """Mixed precision (``torch.autocast``): ``F`` runs in the low precision the caller
        asked for, while the solver's own arithmetic (residual norms, Anderson's Gram system,
        Broyden's updates, the stopping rule) runs with autocast off, in the iterates' dtype
        (float32 for float32 inputs). A tolerance below the low precision's machine epsilon
        cannot be met: ``ValueError``."""
        low = torch.get_autocast_dtype(device_type)
        eps = torch.finfo(low).eps
        for name, value in (("tol", self.tol), ("lin_tol", self.lin_tol)):
            require(value >= eps, f"{self.name}: {name}={value:g} is below what {low} resolves "
                                  f"under autocast (machine epsilon {eps:.1e}), so the solve "
                                  f"cannot converge: use {name} >= {eps:.1e}")

        def step_in_low_precision(y):
            with torch.autocast(device_type, dtype=low):
                return step(y)

        def solve_in_full_precision(*args, **kwargs):
            with torch.autocast(device_type, enabled=False):
                return solve(*args, **kwargs)
        return solve_in_full_precision, step_in_low_precision

    def _fixed_point_map(self, x, fx, explicit, h_implicit, differentiable: bool):
        """``step(y) = x + h(1-theta)F(x) + h theta F(y)`` (``explicit`` holds the first two
        terms) and the evaluation of ``F`` it uses.

        Without a graph, the latest evaluation of F is reused when asked for the same tensor
        again: the first iterate is x, whose F(x) the explicit term holds, and a solver's last
        evaluation is at the y* it returns, which the output needs: two of the 16 evaluations
        of F per layer and training step on the benchmark's W3. (On a graph a shared node would
        change the order in which gradients are summed, so there F is evaluated afresh and
        results stay bit for bit those of separate evaluations.)"""
        latest_f = [x, fx.detach()] if not differentiable else [None, None]

        def evaluate_F(y):
            if y is latest_f[0]:
                return latest_f[1]
            fy = self._residual_function(y)
            if not differentiable:
                latest_f[:] = y, fy
            return fy

        constant = explicit if differentiable else explicit.detach()
        if self.members is None:
            def step(y):
                return torch.add(constant, evaluate_F(y), alpha=h_implicit)
        else:
            def step(y):  # one coefficient per member
                return torch.addcmul(constant, h_implicit, evaluate_F(y))
        return step, evaluate_F
