"""One driver for every forward solver (docs/design.md, section 2): the loop, the stopping rule,
per-member stopping, the NaN check, the lowest-residual iterate and the fallback.

States have shape ``(E, B, *)``: ``E`` members (one network is ``E = 1``), ``B`` samples each.
The stopping rule holds per member:

    R(y) = y - g(y),   member e stops when  ||R_{e,b}(y)||_2 <= tol + rtol ||y_{e,b}||_2
                       for every sample b,   at most max_iters,

(``rtol = 0``: section 1's ``max_b ||R_{e,b}|| <= tol``), after which its iterate is frozen, bit
for bit, while the others go on (members with ``active[e]`` False never move). Convergence is
tested once per iteration on the ``E`` residual maxima (and, with ``rtol``, the ``E`` maxima
of ``||R_{e,b}|| - rtol ||y_{e,b}||``), which cross to the host in one transfer; that transfer
is also the NaN/inf check. The reported residual is ``max_b ||R_{e,b}||`` either way.

A forward solver is a small class (:class:`ForwardSolver`): its state (attributes), how it
evaluates the residual of the current iterate, and its step to the next one; its options are
the keyword arguments of its ``__init__``, each with a check. :func:`forward_solver` registers
it by name, and :func:`solve` runs it, or a tuple of them tried in order.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import choice, number, require
from .errors import SolverError

Tensor = torch.Tensor
#: the smallest ``rtol`` a precision resolves, and the default of precisions below float64, in
#: machine epsilons of the precision ``F`` computes in (docs/design.md, section 2)
MIN_RTOL_EPS, DEFAULT_RTOL_EPS = 4, 16


@dataclass
class SolveInfo:
    """What one solve reports, one entry per member: iterations done, final residual
    (``max_b ||R_{e,b}||``), converged, (from a fallback) the solver that finished, and (for a
    warning, where a member did not converge) ``resolution``: ``eps max_b ||y*_{e,b}||``, the
    residual that rounding in the precision of ``F`` alone leaves."""

    iterations: list[int]
    residual: list[float]
    converged: list[bool | None]
    solver: list[str] | None = None
    resolution: list[float] | None = None


def per_sample_norm(t: Tensor, lead: int = 2) -> Tensor:
    """Per-sample Euclidean norm ``||t_{e,b}||_2`` over all but the ``lead`` leading dimensions:
    shape ``(E, B)`` for a state ``(E, B, *)``."""
    if t.dim() == lead + 1:
        return torch.linalg.vector_norm(t, dim=-1)
    return torch.linalg.vector_norm(t.reshape(t.shape[:lead] + (-1,)), dim=-1)


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product ``<a_{e,b}, b_{e,b}>``, shaped ``(E, B, 1, ..., 1)`` to broadcast
    against ``a``."""
    dots = (a * b).reshape(a.shape[:2] + (-1,)).sum(dim=-1)
    return dots.reshape(a.shape[:2] + (1,) * (a.dim() - 2))


def as_column(values: Tensor, like: Tensor) -> Tensor:
    """A per-member ``(E,)`` tensor shaped ``(E, 1, ..., 1)`` to broadcast against ``like``."""
    return values.reshape(values.shape + (1,) * (like.dim() - 1))


def failure(message: str, member: int) -> SolverError:
    """A SolverError; ``member`` travels as an attribute so that the block can name it beside
    itself (only for an ensemble: one network's message names the block alone)."""
    err = SolverError(message)
    err.member = member
    return err


def labelled(name: str, what: str, labels: bool, solve: Callable, *args, **kwargs):
    """``solve(*args, **kwargs)``, its SolverError renamed ``"<name>[, member e]: <what> solve
    failed: ..."`` (the member named where ``labels``: an ensemble's blocks)."""
    try:
        return solve(*args, **kwargs)
    except SolverError as err:
        member = getattr(err, "member", None)
        label = f"{name}, member {member}" if labels and member is not None else name
        raise SolverError(f"{label}: {what} solve failed: {err}") from None


def stops(value: float, threshold: float, iteration: int, cap: float, member: int) -> bool:
    """The stopping rule every solver shares, for one member: a non-finite residual is an
    error naming the iteration (and the member); otherwise stop when the residual is within
    ``threshold`` or ``iteration`` has reached ``cap``."""
    if not math.isfinite(value):
        raise failure(f"non-finite value (NaN or inf) at iteration {iteration}", member)
    return value <= threshold or iteration >= cap


class Monitor:
    """The stopping rule, per member: one transfer of the members' residual maxima per
    iteration, stop at ``tol`` (one threshold, or one per member) or ``max_iters``; with
    ``rtol``, each sample's threshold grows by ``rtol`` times the norm of a reference (the
    iterate, for a forward solve; the right-hand side, for a linear one) given to :meth:`done`.

    ``running`` says who still moves, ``counts`` and ``values`` hold each member's iterations
    and final residual (``tol`` as given: a forward solve's one float), ``norms`` the latest
    per-sample residual norms ``(E, B)`` and :meth:`within` which samples meet their threshold
    (for solvers that need them), and :meth:`freeze` keeps the stopped members' iterates where
    they stopped.
    An iteration in which no member stops costs one transfer and two C-level passes over the
    maxima (a stopped member's threshold is -inf, so it never stops again); a device copy of
    the running mask (``mask``) is made only when a member stops, and while every member runs
    there is none and nothing to freeze."""

    def __init__(self, tol, max_iters: int, active, device=None, record: list | None = None,
                 rtol: float = 0.0):
        members = len(active)
        self.tol, self.max_iters, self.record, self.device = tol, max_iters, record, device
        self.rtol = rtol
        self.iteration = 0
        self.norms = self.slack = None  # slack: rtol ||reference_b||, (E, B), with rtol only
        self.running = [bool(a) for a in active]
        self.counts, self.values = [0] * members, [0.0] * members
        self.tested = [0.0] * members  # what the rule compared with tol (values, for rtol 0)
        self.tols = list(tol) if isinstance(tol, (list, tuple)) else [tol] * members
        self.thresholds = [t if run else -math.inf for t, run in zip(self.tols, self.running)]
        self.mask = None  # device mask of the running members; None while all run
        if not all(self.running):  # members that never move (an ensemble's explicit ones)
            self.mask = torch.tensor(self.running, device=device)

    def done(self, residual: Tensor, reference: Tensor | None = None) -> bool:
        """Register the residual ``R(y^k)`` of the current iterate (and, with ``rtol``, the
        ``reference`` its thresholds scale with); True when every member has stopped."""
        self.iteration += 1
        self.norms = norms = per_sample_norm(residual)
        if self.record is not None:
            self.record.append(norms)
        plain = norms.detach() if norms.requires_grad else norms
        if self.rtol:
            self.slack = self.rtol * per_sample_norm(reference.detach())
            values, tested = torch.stack((plain.amax(dim=1), (plain - self.slack).amax(dim=1))
                                         ).tolist()  # the one host transfer of this iteration
        else:
            values = tested = plain.amax(dim=1).tolist()  # the one host transfer
        if (self.iteration < self.max_iters and math.isfinite(sum(values))
                and not any(map(operator.le, tested, self.thresholds))):
            return False  # no member stops (the common case)
        for e, running in enumerate(self.running):
            if running and stops(tested[e], self.tols[e], self.iteration, self.max_iters, e):
                self.running[e] = False
                self.thresholds[e] = -math.inf
                self.counts[e], self.values[e], self.tested[e] = self.iteration, values[e], tested[e]
        if not any(self.running):
            return True
        self.mask = torch.tensor(self.running, device=self.device)
        return False

    def within(self) -> Tensor:
        """Which samples of the latest iteration meet their threshold, ``(E, B)`` (a forward
        solve's, whose ``tol`` is one float)."""
        return self.norms <= (self.tol if self.slack is None else self.tol + self.slack)

    def freeze(self, new: Tensor, old: Tensor, moving: Tensor | None = None) -> Tensor:
        """``new`` for the members that still iterate (or those in ``moving``, a mask taken
        earlier from :attr:`mask`), ``old`` for the stopped ones; just ``new`` while every
        member runs."""
        mask = self.mask if moving is None else moving
        if mask is None:
            return new
        return torch.where(as_column(mask, new), new, old)

    def info(self) -> SolveInfo:
        return SolveInfo(list(self.counts), list(self.values),
                         [v <= t for v, t in zip(self.tested, self.tols)])


def vjp(output: Tensor, inputs: Tensor, u: Tensor, create_graph: bool = False) -> Tensor:
    """``J^T u`` for ``J = d output / d inputs`` on an existing graph (kept for reuse);
    zero where ``output`` does not depend on ``inputs``."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    return torch.autograd.grad(output, inputs, u, retain_graph=True, create_graph=create_graph,
                               allow_unused=True, materialize_grads=True)[0]


# ------------------------------------------------------------------------ solvers as steps

class ForwardSolver:
    """A forward solver for ``y = g(y)``: a fresh instance per solve holds its state.

    ``residual(y)`` evaluates ``R(y^k)`` of the current iterate (``y - g(y)`` or its negative:
    only its norm is read), keeping what ``step`` needs; ``step(y, residual, monitor)`` returns
    the next iterate (the driver freezes the members that stopped). The options are the
    keyword-only arguments of ``__init__`` after ``g`` and ``differentiable`` (with
    ``differentiable`` the iterates keep their autograd graph)."""

    def __init__(self, g: Callable, differentiable: bool = False):
        self.g, self.differentiable = g, differentiable

    def residual(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, y: Tensor, residual: Tensor, monitor: Monitor) -> Tensor:
        raise NotImplementedError


#: name -> forward solver class, filled by :func:`forward_solver`
FORWARD_SOLVERS: dict[str, type[ForwardSolver]] = {}
#: name -> the keys its ``solver_options`` accept, in the order of its signature
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {}
OPTION_CHECKS: dict[str, dict[str, Callable]] = {}


def forward_solver(name: str, **checks: Callable):
    """Register a :class:`ForwardSolver` subclass under ``name`` (the block's ``solver=name``).
    ``checks`` maps each of its options (keyword-only arguments of ``__init__``) to
    ``check(label, value)``, which raises a ValueError naming ``label``; an option without a
    check (or a check without an option) fails at registration. Adding a solver is this
    decorator on one small class (docs/design.md, section 2)."""
    def register(cls: type[ForwardSolver]) -> type[ForwardSolver]:
        parameters = inspect.signature(cls.__init__).parameters.values()
        options = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
        if not issubclass(cls, ForwardSolver) or set(options) != set(checks):
            raise TypeError(f"forward solver {name!r}: a ForwardSolver subclass whose options "
                            f"(keyword-only arguments of __init__) each need a check; options "
                            f"{options}, checks {tuple(checks)}")
        FORWARD_SOLVERS[name], SOLVER_OPTIONS[name], OPTION_CHECKS[name] = cls, options, checks
        return cls
    return register


def positive(label, value):
    number(label, value, lambda v: v > 0, "a finite number > 0")


def non_negative(label, value):
    number(label, value, lambda v: v >= 0, "a finite number >= 0")


class OneOf:
    """The check of an option with a fixed set of values (``allowed``, readable: a comparison
    of solvers can try each)."""

    def __init__(self, *allowed):
        self.allowed = allowed

    def __call__(self, label, value):
        choice(label, value, self.allowed)


def option_values(solver: str) -> dict[str, tuple]:
    """The options of ``solver`` that take one of a fixed set of values, with those values
    (``{"variant": ("polak_ribiere", "fletcher_reeves")}`` for ``nonlinear_cg``)."""
    return {option: check.allowed for option, check in OPTION_CHECKS[solver].items()
            if isinstance(check, OneOf)}


def check_options(solver: str, options: dict) -> None:
    """Every key and value of ``solver_options`` for ``solver``, checked once (a block does it
    at construction): ``ValueError`` naming the option and what it allows."""
    checks = OPTION_CHECKS[solver]
    for key, value in options.items():
        require(key in checks, f"solver_options key {key!r} is not known to solver "
                               f"{solver!r}; allowed keys: {SOLVER_OPTIONS[solver]}")
        checks[key](f"solver_options[{key!r}]", value)


def iterate(solver: ForwardSolver, y0: Tensor, monitor: Monitor) -> Tensor:
    """The loop every forward solver shares: evaluate the residual of the current iterate,
    stop per ``monitor``, otherwise step (stopped members frozen). Returns ``y*``, the last
    iterate whose residual is known."""
    y = y0
    while True:
        residual = solver.residual(y)
        if monitor.done(residual, y):
            return y
        y = monitor.freeze(solver.step(y, residual, monitor), y)


class _Lowest:
    """Wraps the map ``g`` of a solve to remember, per member, the evaluated point with the
    lowest residual ``max_b ||y - g(y)||`` and that residual, on the device (no host
    transfer)."""

    def __init__(self, g: Callable):
        self.g = g
        self.y = self.value = None

    def __call__(self, y: Tensor) -> Tensor:
        gy = self.g(y)
        value = per_sample_norm((y - gy).detach()).amax(dim=-1)  # (E,)
        if self.value is None:
            self.y, self.value = y, value
        else:
            better = value < self.value
            self.y = torch.where(as_column(better, y), y, self.y)
            self.value = torch.where(better, value, self.value)
        return gy


def solve(names: tuple[str, ...], options: dict, g: Callable, y0: Tensor, *, tol: float,
          max_iters: int, active, differentiable: bool = False, record: list | None = None,
          rtol: float = 0.0):
    """Solve ``y = g(y)`` from ``y0`` (``(E, B, *)``) with the solver ``names[0]``, or, for
    several names (a block's ``solver=("fixed_point", "anderson")``), each in order where the
    previous one did not meet its rule (``tol``, ``rtol``: :class:`Monitor`): per member, each gets ``max_iters`` iterations from the
    lowest-residual point evaluated so far, a member stops with the first solver that
    converges, and where none does the lowest-residual point is returned with its residual;
    ``SolveInfo.solver`` names the solver that finished (the last one tried where none
    converged) and iterations add up. ``options`` maps a solver's name to its options.
    ``record``, when given, receives the per-sample residual norms ``(E, B)`` of every
    iterate. Returns ``(y*, SolveInfo)``."""
    def run(name, g, y0, running):
        monitor = Monitor(tol, max_iters, running, y0.device, record, rtol)
        solver = FORWARD_SOLVERS[name](g, differentiable, **options.get(name, {}))
        return iterate(solver, y0, monitor), monitor.info()

    if len(names) == 1:
        y, info = run(names[0], g, y0, active)
        info.solver = [names[0] if a else None for a in active]
        return y, info
    lowest = _Lowest(g)
    running = [bool(a) for a in active]
    members = len(running)
    counts, residuals = [0] * members, [0.0] * members
    converged, finished = [not r for r in running], [names[0]] * members
    done = None  # the converged members' iterates
    for name in names:
        y, info = run(name, lowest, y0, running)
        for e in range(members):
            if running[e]:
                counts[e] += info.iterations[e]
                residuals[e], converged[e], finished[e] = info.residual[e], info.converged[e], name
        newly = torch.tensor([r and c for r, c in zip(running, converged)], device=y.device)
        done = y if done is None else torch.where(as_column(newly, y), y, done)
        running = [r and not c for r, c in zip(running, converged)]
        if not any(running):
            return done, SolveInfo(counts, residuals, converged, finished)
        y0 = torch.where(as_column(torch.tensor(running, device=y.device), y), lowest.y, done)
    best = lowest.value.tolist()
    for e in range(members):
        if running[e]:
            residuals[e] = best[e]
    return y0, SolveInfo(counts, residuals, converged, finished)
