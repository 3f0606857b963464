"""The implicit residual block (paper eq. 7, the theta-method):

    y = x + h * ((1 - theta) * F(x) + theta * F(y))

Forward: a solver (:mod:`irn.driver`, :mod:`irn.solvers`) finds ``y*`` without building a
graph. The block then returns one more application of the map,
``x + h(1-theta)F(x) + h theta F(y*)`` with ``y*`` held constant (``F(x)`` and ``F(y*)`` are the
evaluations the solve made already). Backward (:mod:`irn.backward`): the incoming gradient
``g`` becomes ``v`` solving ``(I - h theta J_F(y*)^T) v = g`` (implicit function theorem);
nothing of the iterations is saved for it.

One layout (docs/design.md, section 5): inside the block every state has shape
``(E, B, *)``, ``E`` members of ``B`` samples. A block whose ``h`` or ``theta`` is a sequence of
``E`` values is ``E`` independent blocks at once, its ``F`` mapping ``(E, B, *)`` to
``(E, B, *)``; one network is the ensemble of one, its ``F`` (on ``(B, *)``) lifted by
:class:`OneMember`, and its input and statistics squeezed at the public boundary
(``forward``, ``last_stats``, ...). Every solve stops per member.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools

import torch
from torch import nn

from ._checks import keywords, number, per_member, require
from .backward import BACKWARDS, Adjoint, axpy, on_members
from .config import SOLVE_SETTINGS, SolveConfig, Stopping
from .driver import labelled, per_sample_norm, solve
from .errors import ConvergenceWarning, SolverError  # noqa: F401 (public here)
from .precision import under_autocast
from .records import SolveRecord, SolveStats


def steps(h, theta):
    """``(members, h, theta)`` checked: floats and ``members`` None for one network, tuples of
    ``E`` values (one may be given for all) and ``members = E`` for an ensemble block."""
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
    return members, h, theta


def coefficients(hs: tuple, thetas: tuple, x: torch.Tensor):
    """``(h(1-theta), h theta, implicit)`` for members with steps ``hs`` and implicitness
    ``thetas``: floats where every member shares them (one network always), per-member columns
    ``(E, 1, ..., 1)`` on ``x``'s dtype and device otherwise; ``implicit`` one bool per member
    (``theta > 0``, on the host). Computed in float64, as the compiled path does."""
    h = torch.tensor(hs, dtype=torch.float64)
    theta = torch.tensor(thetas, dtype=torch.float64)
    shape = (-1,) + (1,) * (x.dim() - 1)
    shared = len(set(hs)) == 1 and len(set(thetas)) == 1
    columns = [float(c[0]) if shared else c.reshape(shape).to(x.device, x.dtype)
               for c in (h * (1 - theta), h * theta)]
    return (*columns, tuple(t > 0 for t in thetas))


def check_shape(fy: torch.Tensor, y: torch.Tensor, one_network: bool) -> bool:
    """``F`` must return its input's shape (the message in the public layout: one network's
    states without the member axis)."""
    shown = (lambda t: tuple(t.shape[1:])) if one_network else (lambda t: tuple(t.shape))
    require(fy.shape == y.shape, f"F must return a tensor of its input's shape: got "
                                  f"{shown(fy)} for input {shown(y)}")
    return True


def refuse_functorch(name: str) -> None:
    """torch.func transforms cannot trace a solve that stops on data-dependent residuals."""
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            f"{name}: torch.func transforms (vmap, grad, jvp, ...) cannot trace an implicit "
            f"block, whose solvers stop on data-dependent residuals; for many networks at once "
            f"stack them (irn.ImplicitResNet.stack), for gradients use torch.autograd")


class ImplicitResidualBlock(nn.Module):
    """``y = x + h((1-theta) F(x) + theta F(y))`` for any residual function ``F``.

    Args:
        F: module mapping a batch ``(B, *)`` to a batch of the same shape.
        h: step size, > 0 (``E`` values, for ``h`` or ``theta``, make an ensemble block of
            ``E`` members: inputs ``(E, B, *)``, per-member stopping; see the module doc).
        theta: implicitness in [0, 1]; 0 is the explicit ResNet step (no solve). The block's
            default is the trapezoidal rule, 0.5 (:class:`irn.ImplicitResNet`'s is 0.0).

    How it solves (``solver``, ``backward``, ``tol``, ``atol``, ``rtol``, ``max_iters``,
    ``lin_tol``, ``lin_max_iters``, ``solver_options``, ``on_nonconvergence``): :class:`irn.SolveConfig`.

    After a forward, ``last_stats`` holds the solve's :class:`irn.SolveStats`; ``keep_iterates``
    records ``iterate_residuals`` for :func:`irn.regularizers.fixed_point`, ``keep_solution``
    keeps ``solution`` for :func:`irn.regularizers.jacobian`."""

    @keywords()
    def __init__(self, F: nn.Module, h: float = 1.0, theta: float = 0.5, *,
                 solver: str = "fixed_point", backward: str = "neumann",
                 tol: float | None = None, max_iters: int = 50, lin_tol: float | None = None,
                 lin_max_iters: int | None = None, solver_options: dict | None = None,
                 on_nonconvergence: str = "warn", atol: float | None = None,
                 rtol: float | None = None):
        super().__init__()
        require(isinstance(F, nn.Module), f"F must be a torch.nn.Module, got {type(F).__name__}")
        members, h, theta = steps(h, theta)
        self.config = SolveConfig(solver, backward, tol, max_iters, lin_tol, lin_max_iters,
                                  solver_options, on_nonconvergence, atol, rtol)
        self.F = F
        self.members = members  # None: one network (the public layout); E: an ensemble block
        self.h, self.theta = h, theta
        self.name = "block"  # ImplicitResNet renames its blocks "block 0", "block 1", ...
        self.keep_iterates = self.keep_solution = False
        self._checked_shape = False
        self._columns = None  # per-member coefficients, built at the first call

    @property
    def config(self) -> SolveConfig:
        """How the block solves (:class:`irn.SolveConfig`); a replaced one takes effect whole."""
        return self.__dict__["_config"]

    @config.setter
    def config(self, value: SolveConfig) -> None:
        require(isinstance(value, SolveConfig), f"config must be an irn.SolveConfig, got {value!r}")
        self.__dict__["_config"] = value
        if "record" in self.__dict__:
            self.record.policy = value.on_nonconvergence

    thetas = property(lambda self: (self.theta,) if self.members is None else self.theta)
    hs = property(lambda self: (self.h,) if self.members is None else self.h)

    settings = property(lambda self: dataclasses.asdict(self.config),
                        doc="The solver settings (:class:`SolveConfig`'s fields) as a dict.")

    @keywords("h", "theta", *SOLVE_SETTINGS)
    def with_settings(self, **block_kwargs) -> "ImplicitResidualBlock":
        """A block on the same ``F`` (shared, not copied) with some settings changed (any
        keyword of the constructor but ``F``), see :meth:`irn.SolveConfig.changed`."""
        h, theta = block_kwargs.pop("h", self.h), block_kwargs.pop("theta", self.theta)
        block = ImplicitResidualBlock(self.F, h, theta,
                                      **dataclasses.asdict(self.config.changed(**block_kwargs)))
        block.name, block.keep_iterates, block.keep_solution = (self.name, self.keep_iterates,
                                                                 self.keep_solution)
        return block

    @property
    def F_members(self):
        """``F`` on the member layout ``(E, B, *)``: :func:`irn.backward.on_members`."""
        F = self._modules["F"]
        if self.__dict__.get("_F_members", (None,))[0] is not F:  # made again for a new F
            self._F_members = (F, on_members(F, self.members))
        return self._F_members[1]

    @functools.cached_property
    def record(self) -> SolveRecord:
        """The latest solve, member by member (:class:`irn.records.SolveRecord`)."""
        return SolveRecord(len(self.thetas), self.thetas, self.on_nonconvergence,
                           labels=self.members is not None)

    def _public(self, values):  # a per-member list as the public layout shows it
        return values[0] if self.members is None and values is not None else values

    last_stats = property(lambda self: self._public(self.record.stats), doc=(
        ":class:`irn.SolveStats` of the latest forward (an ensemble's: one per member)."))
    backward_converged = property(lambda self: self._public(self.record.backward_converged), doc=(
        "Whether the latest backward met ``lin_tol`` (None before any, or without a solve)."))

    @property
    def iterate_residuals(self) -> list[torch.Tensor] | None:
        """Batch means of ``||R(y^k)||`` of the latest forward's iterates, differentiable (None
        unless ``keep_iterates``); an ensemble's ``(E,)``, zero past each member's count."""
        kept = self.record.iterate_residuals
        return kept if self.members is not None or kept is None else [r[0] for r in kept]

    @property
    def solution(self) -> torch.Tensor | None:
        """The output of the latest forward (on the autograd graph), for
        :func:`irn.regularizers.jacobian`; None unless ``keep_solution`` was set."""
        return self._public(self.record.solution)

    def extra_repr(self) -> str:
        members = "" if self.members is None else f"members={self.members}, "
        return (f"{members}h={self.h}, theta={self.theta}, solver={self.solver!r}, "
                f"backward={self.backward!r}, {self.config.tolerances()}, "
                f"max_iters={self.max_iters}")

    def _residual_function(self, y: torch.Tensor) -> torch.Tensor:
        fy = self.F_members(y)
        if not self._checked_shape:
            self._checked_shape = check_shape(fy, y, self.members is None)
        return fy

    def _coefficients(self, x: torch.Tensor):
        """:func:`coefficients` for ``x``'s dtype, device and rank, made once."""
        key = (x.dtype, x.device, x.dim(), self.hs, self.thetas)  # h, theta may be reassigned
        if self._columns is None or self._columns[0] != key:
            self._columns = (key, coefficients(self.hs, self.thetas, x))
            self.record.solving = [e for e, t in enumerate(self.thetas) if t > 0]
        return self._columns[1]

    def _adjoint(self, rules: Stopping) -> Adjoint:
        """What the backward needs, with the forward's ``rules`` (rebuilt when they change)."""
        key = (self.name, self.config, self._modules["F"], self.thetas, rules)
        if self.__dict__.get("_adjoint_of", (None,))[0] != key:  # one assignment: thread-safe
            self._adjoint_of = (key, Adjoint(
                self.F_members, BACKWARDS[self.backward], rules.lin_atol, rules.lin_rtol,
                self.lin_max_iters,
                tuple(t > 0 for t in self.thetas), self.name, self.record.labels,
                functools.partial(self.record.backward, name=self.name)))
        return self._adjoint_of[1]

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + h((1-theta) F(x) + theta F(y*))`` with ``y*`` solving the block equation."""
        check_input(x, self.members)
        if self.members is None:  # the public layout's boundary: one network is one member
            return self.solve_members(x.unsqueeze(0))[0]
        return self.solve_members(x)

    def solve_members(self, x: torch.Tensor) -> torch.Tensor:
        """The block on the member layout, ``x`` of shape ``(E, B, *)`` (``E = 1`` for one
        network); what a network calls, layer after layer."""
        refuse_functorch(self.name)
        y = self._solve(x)
        self.record.solution = y if self.keep_solution else None
        return y

    def _solve(self, x: torch.Tensor) -> torch.Tensor:
        h_explicit, h_implicit, implicit = self._coefficients(x)
        if x.numel() == 0 or not any(implicit):  # an empty batch, or explicit members only
            self.record.no_solve(self.keep_iterates)
            return x.clone() if x.numel() == 0 else resnet_step(x, h_explicit,
                                                                self._residual_function(x))
        grad_on = torch.is_grad_enabled()
        strategy = BACKWARDS[self.backward]
        differentiable = grad_on and (strategy.unrolls or self.keep_iterates)
        fx = self._residual_function(x)
        explicit = axpy(x, h_explicit, fx)  # x + h(1-theta)F(x), on the graph when wanted
        step, evaluate_F = fixed_point_map(self._residual_function, x, fx, explicit, h_implicit,
                                           differentiable)
        record = [] if self.keep_iterates else None
        run, low = solve, None
        if torch.is_autocast_enabled(x.device.type):  # mixed precision: see irn.precision
            run, step, low = under_autocast(solve, step, x.device.type)
            low = low if x.dtype == torch.float32 else None  # autocast casts float32 only
        rules = self.config.stopping(x.dtype, low, self.name)
        with torch.set_grad_enabled(differentiable):
            y_star, info = labelled(self.name, "forward", self.record.labels, run,
                                    *self.config.solvers(), step, x, tol=rules.atol,
                                    rtol=rules.rtol, max_iters=self.max_iters, active=implicit,
                                    differentiable=differentiable, record=record)
        if rules.rtol == 0 and not all(info.converged[e] for e in self.record.solving):
            info.resolution = (rules.eps * per_sample_norm(y_star.detach()).amax(dim=1)).tolist()
        self.record.forward(info, record, self.name)
        if not grad_on:
            return step(y_star)
        # one more application of the map at y*, with the backward strategy attached
        return strategy.output(self._adjoint(rules), explicit, y_star, h_implicit,
                               self.record.stats, evaluate_F)


def check_input(x: torch.Tensor, members: int | None) -> None:
    """A block's input: batch-first, ``(E, B, ...)`` for an ensemble block of ``E`` members,
    finite (:func:`check_finite`)."""
    require(x.dim() >= 1, "x must be batch-first with at least one dimension")
    if members is not None and not (x.dim() >= 2 and x.shape[0] == members):
        raise ValueError(f"x must have shape (members={members}, batch, ...) for an "
                         f"ensemble block, got {tuple(x.shape)}")
    check_finite("x", x, members is not None)


#: set while a network runs its blocks on an input it has checked already
INPUT_CHECKED = contextvars.ContextVar("irn_input_checked", default=False)


def check_finite(name: str, x: torch.Tensor, ensemble: bool) -> None:
    """A ``ValueError`` naming ``name`` and the first sample (and member, for an ensemble's
    input ``(E, B, ...)``) that holds a NaN or inf: one reduction when all are finite; none
    while a network runs its blocks on an input it checked (:data:`INPUT_CHECKED`), nor under a
    ``torch.func`` transform (the solver's check then names the iteration)."""
    if (INPUT_CHECKED.get() or x.numel() == 0 or torch._C._are_functorch_transforms_active()
            or bool(torch.isfinite(x).all())):
        return
    lead = 2 if ensemble and x.dim() >= 2 else 1
    bad = (~torch.isfinite(x)).reshape(x.shape[:lead] + (-1,)).any(dim=-1).nonzero()[0].tolist()
    where = f"member {bad[0]}, sample {bad[1]}" if lead == 2 else f"sample {bad[0]}"
    raise ValueError(f"{name} holds a non-finite value (NaN or inf) at {where}: the input, not "
                     f"the solver")


def resnet_step(x: torch.Tensor, c, fx: torch.Tensor) -> torch.Tensor:
    """The explicit step ``x + h F(x)`` (``c = h``), rounded exactly as the ResNet's."""
    return x + c * fx if isinstance(c, float) else axpy(x, c, fx)


def fixed_point_map(F, x, fx, explicit, h_implicit, differentiable: bool):
    """``step(y) = x + h(1-theta)F(x) + h theta F(y)`` (``explicit`` holds the first two terms)
    and the evaluation of ``F`` it uses.

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
        fy = F(y)
        if not differentiable:
            latest_f[:] = y, fy
        return fy

    constant = explicit if differentiable else explicit.detach()

    def step(y):
        return axpy(constant, h_implicit, evaluate_F(y))
    return step, evaluate_F


# the block's settings (solver, backward, max_iters, ...), read from its SolveConfig
for _name in (f.name for f in dataclasses.fields(SolveConfig)):
    setattr(ImplicitResidualBlock, _name,
            property(lambda self, _name=_name: getattr(self.config, _name)))
ImplicitResidualBlock.tol = property(lambda self: self.config.absolute_tolerances()[0], doc=(
    "The forward rule's absolute part: ``tol`` as given, else ``atol`` (default 1e-6)."))
ImplicitResidualBlock.lin_tol = property(lambda self: self.config.absolute_tolerances()[1], doc=(
    "The backward rule's absolute part: ``lin_tol`` as given, else the forward's."))
