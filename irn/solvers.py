"""Solvers for the implicit block: nonlinear (forward) and linear (backward).

Every forward solver finds a fixed point ``y = g(y)`` of a map ``g`` acting on a batch
(shape ``(B, *)``), starting at ``y0``, with one stopping rule (docs/design.md, section 2):

    R(y) = y - g(y),   converged when  max_b ||R_b(y)||_2 <= tol,   at most max_iters iterations.

Contract of a forward solver::

    solver(g, y0, *, tol, max_iters, differentiable=False, record=None, **options)
        -> (y_star, SolveInfo)

Each iteration evaluates the residual of the current iterate ``y^k`` (one application of
``g`` for ``fixed_point``), stops if it is small enough, otherwise moves to ``y^{k+1}``.
``y_star`` is the last iterate whose residual is known, so ``SolveInfo.residual`` is
exactly ``max_b ||R_b(y_star)||``. With ``differentiable=True`` the iterates keep their
autograd graph (for ``unrolled`` backward and the fixed-point regulariser); ``record``,
when given, is a list that receives the per-sample residual norms ``||R_b(y^k)||`` of
every iterate (for ``fixed_point`` these are ``||y^{k+1} - y^k||``).

Every linear solver solves ``(I - J^T) v = b`` for the Jacobian ``J`` of the map at the
solution, given only the vector-Jacobian product ``vjp(u) = J^T u``::

    solver(vjp, b, *, tol, max_iters) -> (v, SolveInfo)

stopping when ``max_b ||b_b - (I - J^T) v_b|| <= tol * max(1, max_b ||b_b||)``.

Convergence is tested once per iteration on one scalar, the batch maximum of the residual
norm; that scalar is also the NaN/inf check, so a loop does one device-to-host transfer
per iteration and no other.

Ensembles (docs/design.md, section 5): with ``active`` given (one bool per member, on the host), the
states have shape ``(E, B, *)``, ``E`` independent members of ``B`` samples each, and the
stopping rule holds per member: member ``e`` stops when ``max_b ||R_{e,b}|| <= tol``, after
which its iterate is frozen, bit for bit, while the others go on (members with ``active[e]``
False never move). The ``E`` residual maxima still cross to the host in one transfer per
iteration. ``SolveInfo`` then holds one entry per member.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import choice, integer, number, require

Tensor = torch.Tensor


class SolverError(RuntimeError):
    """A solve failed: non-finite values, or non-convergence under ``on_nonconvergence="raise"``."""


class ConvergenceWarning(UserWarning):
    """A solve stopped at its iteration cap with the residual above the tolerance."""


@dataclass
class SolveStats:
    """Statistics of a block's latest solve (backward fields filled in by the backward pass)."""

    iterations: int
    residual: float
    converged: bool
    backward_iterations: int | None = None
    backward_residual: float | None = None
    solver: str | None = None  # with a fallback (a tuple of solvers): the one that finished


@dataclass
class SolveInfo:
    """What one solver call reports: iterations done, final residual (a 0-d tensor), converged.
    For an ensemble (``active`` given) each field is a list with one entry per member, the
    residuals as floats."""

    iterations: int | list[int]
    residual: Tensor | list[float]
    converged: bool | list[bool]
    solver: str | list[str] | None = None  # set by a fallback: the solver that finished


def per_sample_norm(t: Tensor, lead: int = 1) -> Tensor:
    """Per-sample Euclidean norm ``||t_b||_2`` over all but the ``lead`` leading dimensions:
    shape ``(B,)`` for a batch-first tensor, ``(E, B)`` for an ensemble's with ``lead=2``."""
    if t.dim() == lead + 1:
        return torch.linalg.vector_norm(t, dim=-1)
    return torch.linalg.vector_norm(t.reshape(t.shape[:lead] + (-1,)), dim=-1)


def batch_dot(a: Tensor, b: Tensor, lead: int = 1) -> Tensor:
    """Per-sample inner product ``<a_b, b_b>`` (over all but the ``lead`` leading dimensions),
    shaped ``(B, 1, ..., 1)`` (``(E, B, 1, ..., 1)``) to broadcast against ``a``."""
    dots = (a * b).reshape(a.shape[:lead] + (-1,)).sum(dim=-1)
    return dots.reshape(a.shape[:lead] + (1,) * (a.dim() - lead))


def _failure(message: str, member: int | None = None) -> SolverError:
    """A SolverError; ``member`` (of an ensemble) travels as an attribute so that the block
    can name it beside itself."""
    err = SolverError(message)
    err.member = member
    return err


def labelled(name: str, what: str, solve: Callable, *args, **kwargs):
    """``solve(*args, **kwargs)``, its SolverError renamed ``"<name>[, member e]: <what> solve
    failed: ..."`` so that the message names the block (and the ensemble member)."""
    try:
        return solve(*args, **kwargs)
    except SolverError as err:
        member = getattr(err, "member", None)
        label = name if member is None else f"{name}, member {member}"
        raise SolverError(f"{label}: {what} solve failed: {err}") from None


def _check_finite(res: float, iteration: int, member: int | None = None) -> None:
    if not math.isfinite(res):
        raise _failure(f"non-finite value (NaN or inf) at iteration {iteration}", member)


def _stops(value: float, threshold: float, iteration: int, cap: float,
           member: int | None = None) -> bool:
    """The stopping rule every solver shares, for one network or one member: a non-finite
    residual is an error naming the iteration (and the member); otherwise stop when the
    residual is within ``threshold`` or ``iteration`` has reached ``cap``."""
    _check_finite(value, iteration, member)
    return value <= threshold or iteration >= cap


def _as_column(mask: Tensor, like: Tensor) -> Tensor:
    """A per-member ``(E,)`` tensor shaped ``(E, 1, ..., 1)`` to broadcast against ``like``."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


class _Monitor:
    """The shared stopping rule: one residual scalar per iteration, stop at tol or max_iters.

    ``tol`` is a float, or for an ensemble one threshold per member. With ``active`` (one
    bool per member: who iterates) the rule holds per member: ``running`` says who still
    moves, ``counts`` and ``values`` hold each member's iterations and final residual, and
    :meth:`freeze` keeps the stopped members' iterates where they stopped. An iteration in
    which no member stops costs one transfer of the members' residuals and two C-level passes
    over them (a stopped member's threshold is -inf, so it never stops again); a device copy
    of the running mask (``mask``) is made only when a member stops, and while every member
    runs there is none and nothing to freeze."""

    def __init__(self, tol, max_iters: int, record: list | None = None, active=None,
                 device=None):
        self.tol, self.max_iters, self.record = tol, max_iters, record
        self.iteration = 0
        self.residual = self.norms = None
        self.ensemble = active is not None
        self.lead = 2 if self.ensemble else 1
        self.mask = None  # device mask of the running members; None while all run
        if self.ensemble:
            members = len(active)
            self.running = [bool(a) for a in active]
            self.counts, self.values = [0] * members, [0.0] * members
            self.tols = list(tol) if isinstance(tol, (list, tuple)) else [tol] * members
            self.thresholds = [t if run else -math.inf for t, run in zip(self.tols, self.running)]
            self.device = device
            if not all(self.running):  # members that never move (an ensemble's explicit ones)
                self.mask = torch.tensor(self.running, device=device)

    def done(self, residual: Tensor) -> bool:
        """Register the residual ``R(y^k)`` of the current iterate; True when the loop must stop."""
        self.iteration += 1
        self.norms = norms = per_sample_norm(residual, self.lead)  # per sample, for solvers that need them
        if self.record is not None:
            self.record.append(norms)
        if not self.ensemble:
            self.residual = norms.max()
            if self.residual.requires_grad:
                self.residual = self.residual.detach()
            res = float(self.residual)  # the one host transfer of this iteration
            return _stops(res, self.tol, self.iteration, self.max_iters)
        values = norms.detach().amax(dim=1).tolist()  # the one host transfer of this iteration
        if (self.iteration < self.max_iters and math.isfinite(sum(values))
                and not any(map(operator.le, values, self.thresholds))):
            self.latest = values  # no member stops (the common case)
            return False
        for e, running in enumerate(self.running):
            if running and _stops(values[e], self.tols[e], self.iteration, self.max_iters, e):
                self.running[e] = False
                self.thresholds[e] = -math.inf
                self.counts[e], self.values[e] = self.iteration, values[e]
        if not any(self.running):
            return True
        self.mask = torch.tensor(self.running, device=self.device)
        return False

    def freeze(self, new: Tensor, old: Tensor, moving: Tensor | None = None) -> Tensor:
        """``new`` for the members that still iterate (or those in ``moving``, a mask taken
        earlier from :attr:`mask`), ``old`` for the stopped ones; just ``new`` for a single
        network or while every member runs."""
        mask = self.mask if moving is None else moving
        if mask is None:
            return new
        return torch.where(_as_column(mask, new), new, old)

    def info(self) -> SolveInfo:
        if not self.ensemble:
            return SolveInfo(self.iteration, self.residual, bool(self.residual <= self.tol))
        return SolveInfo(list(self.counts), list(self.values),
                         [v <= t for v, t in zip(self.values, self.tols)])


def vjp(output: Tensor, inputs: Tensor, u: Tensor, create_graph: bool = False) -> Tensor:
    """``J^T u`` for ``J = d output / d inputs`` on an existing graph (kept for reuse);
    zero where ``output`` does not depend on ``inputs``."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    return torch.autograd.grad(output, inputs, u, retain_graph=True, create_graph=create_graph,
                               allow_unused=True, materialize_grads=True)[0]


def _value_and_gradient(g: Callable, y: Tensor, differentiable: bool):
    """Residual ``R(y) = y - g(y)`` and the gradient of ``phi = 1/2 ||R||^2``: ``R - J_g(y)^T R``."""
    with torch.enable_grad():
        # a fresh node for y: the gradient must not follow other paths from y's ancestors
        # (the first iterate is x itself, on which g also depends through x + h(1-theta)F(x))
        y_in = y.view_as(y) if differentiable and y.requires_grad else y.detach().requires_grad_()
        gy = g(y_in)
        residual = y_in - gy
        jtr = vjp(gy, y_in, residual, create_graph=differentiable)
    if not differentiable:
        residual = residual.detach()
    return residual, residual - jtr


# ----------------------------------------------------------------------------- forward solvers

#: what the block passes to every forward solver; the rest of a solver's keywords are its options
SOLVER_ARGUMENTS = ("g", "y0", "tol", "max_iters", "differentiable", "record", "active")
#: name -> forward solver, filled by :func:`forward_solver`
FORWARD_SOLVERS: dict[str, Callable] = {}
#: name -> the keys its ``solver_options`` accept, in the order of the solver's signature
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {}
_OPTION_CHECKS: dict[str, dict[str, Callable]] = {}


def forward_solver(name: str, **checks: Callable):
    """Register a forward solver under ``name`` (the block's ``solver=name``). ``checks`` maps
    each of its options, the keywords after :data:`SOLVER_ARGUMENTS`, to ``check(label,
    value)``, which raises a ValueError naming ``label``; an option without a check (or a
    check without an option) fails at registration. Adding a solver is this decorator on one
    function."""
    def register(solver: Callable) -> Callable:
        parameters = list(inspect.signature(solver).parameters)
        options = tuple(parameters[len(SOLVER_ARGUMENTS):])
        if parameters[:len(SOLVER_ARGUMENTS)] != list(SOLVER_ARGUMENTS) or set(options) != set(checks):
            raise TypeError(f"forward solver {name!r}: arguments must start with "
                            f"{SOLVER_ARGUMENTS} and each option needs a check; options "
                            f"{options}, checks {tuple(checks)}")
        FORWARD_SOLVERS[name], SOLVER_OPTIONS[name], _OPTION_CHECKS[name] = solver, options, checks
        return solver
    return register


def _positive(label, value):
    number(label, value, lambda v: v > 0, "a finite number > 0")


def _non_negative(label, value):
    number(label, value, lambda v: v >= 0, "a finite number >= 0")


class _OneOf:
    """The check of an option with a fixed set of values (``allowed``, readable: a comparison
    of solvers can try each)."""

    def __init__(self, *allowed):
        self.allowed = allowed

    def __call__(self, label, value):
        choice(label, value, self.allowed)


def option_values(solver: str) -> dict[str, tuple]:
    """The options of ``solver`` that take one of a fixed set of values, with those values
    (``{"variant": ("polak_ribiere", "fletcher_reeves")}`` for ``nonlinear_cg``)."""
    return {option: check.allowed for option, check in _OPTION_CHECKS[solver].items()
            if isinstance(check, _OneOf)}


def check_options(solver: str, options: dict) -> None:
    """Every key and value of ``solver_options`` for ``solver``, checked once (a block does it
    at construction): ``ValueError`` naming the option and what it allows."""
    checks = _OPTION_CHECKS[solver]
    for key, value in options.items():
        require(key in checks, f"solver_options key {key!r} is not known to solver "
                               f"{solver!r}; allowed keys: {SOLVER_OPTIONS[solver]}")
        checks[key](f"solver_options[{key!r}]", value)


@forward_solver("fixed_point")
def fixed_point(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None):
    """Picard iteration ``y^{k+1} = g(y^k)`` (paper section 2.1; its eq. 8 is the equivalent
    minimisation problem that ``gradient_descent`` and ``nonlinear_cg`` solve), i.e.
    ``y^{k+1} = x + h(1-theta) F(x) + h theta F(y^k)`` for the theta-block."""
    monitor, y = _Monitor(tol, max_iters, record, active, y0.device), y0
    while True:
        gy = g(y)
        if monitor.done(y - gy):
            return y, monitor.info()
        y = gy if monitor.mask is None else monitor.freeze(gy, y)


@forward_solver("gradient_descent", step_size=_positive)
def gradient_descent(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None,
                     step_size=0.5):
    """Fixed-step gradient descent on ``phi(y) = 1/2 ||R(y)||^2``:
    ``y^{k+1} = y^k - step_size * (R - h theta J_F(y^k)^T R)``."""
    monitor, y = _Monitor(tol, max_iters, record, active, y0.device), y0
    while True:
        residual, grad = _value_and_gradient(g, y, differentiable)
        if monitor.done(residual):
            return y, monitor.info()
        y = monitor.freeze(y - step_size * grad, y)


@forward_solver("nonlinear_cg", variant=_OneOf("polak_ribiere", "fletcher_reeves"))
def nonlinear_cg(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None,
                 variant="polak_ribiere"):
    """Nonlinear conjugate gradients on ``phi(y) = 1/2 ||R(y)||^2``, per sample.

    Direction ``d^{k+1} = -grad^{k+1} + beta_k d^k`` with Fletcher-Reeves
    ``beta = |grad^{k+1}|^2 / |grad^k|^2`` or Polak-Ribiere+
    ``beta = max(0, <grad^{k+1}, grad^{k+1} - grad^k> / |grad^k|^2)``; restart with steepest
    descent when ``d`` is not a descent direction. Step length by one secant step on the
    directional derivative, ``alpha = -s phi'(0) / (phi'(s) - phi'(0))`` with trial step
    ``s = 1``, which is exact when ``F`` is linear (``phi`` quadratic).
    """
    monitor, y = _Monitor(tol, max_iters, record, active, y0.device), y0
    lead = monitor.lead
    grad_old = direction = None
    while True:
        residual, grad = _value_and_gradient(g, y, differentiable)
        if monitor.done(residual):
            return y, monitor.info()
        if direction is None:
            direction = -grad
        else:
            denom = batch_dot(grad_old, grad_old, lead)
            numer = batch_dot(grad, grad - grad_old if variant == "polak_ribiere" else grad, lead)
            beta = torch.where(denom > 0, numer / torch.where(denom > 0, denom, 1), 0).clamp_min(0)
            direction = -grad + beta * direction
            descent = batch_dot(grad, direction, lead) < 0
            direction = torch.where(descent, direction, -grad)
        slope0 = batch_dot(grad, direction, lead)
        _, grad_trial = _value_and_gradient(g, y + direction, differentiable)
        curvature = batch_dot(grad_trial, direction, lead) - slope0
        # secant step; where the curvature is not positive fall back to the trial step s = 1
        good = curvature > 0
        alpha = torch.where(good, -slope0 / torch.where(good, curvature, 1), 1.0)
        y = monitor.freeze(y + alpha * direction, y)
        grad_old = grad


@forward_solver("anderson", memory=integer, regularization=_non_negative)
def anderson(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None,
             memory=5, regularization=1e-4):
    """Anderson acceleration of ``y = g(y)`` with window ``m = memory``:
    ``y^{k+1} = sum_i a_i g(y^{k-i})``, where ``a`` minimises ``||sum_i a_i R(y^{k-i})||^2
    + regularization * min_i ||R(y^{k-i})||^2 * ||a||^2`` subject to ``sum_i a_i = 1``
    (per sample; the Tikhonov weight is relative, so the method is scale-invariant). With
    ``M = Gram + ridge I`` (symmetric positive definite) the minimiser is
    ``a = M^{-1} 1 / (1^T M^{-1} 1)``, one Cholesky solve per iteration."""
    monitor, y = _Monitor(tol, max_iters, record, active, y0.device), y0
    batch = y0.shape[:monitor.lead].numel()  # samples (of every member), each mixed on its own
    residuals, values = [], []  # the window, flattened per sample: (B, D) each
    while True:
        gy = g(y)
        residual = gy - y
        if monitor.done(residual):
            return y, monitor.info()
        residuals = (residuals + [residual.reshape(batch, -1)])[-memory:]
        values = (values + [gy.reshape(batch, -1)])[-memory:]
        n = len(values)
        if n == 1:
            y = monitor.freeze(gy, y)
            continue
        res = torch.stack(residuals, dim=1)  # (B, n, D)
        gram = res @ res.transpose(1, 2)     # (B, n, n)
        # Tikhonov term relative to the smallest squared residual in the window: scale-invariant,
        # so it does not swamp the system once the residuals are small (floored, so that a
        # sample whose residuals are exactly zero keeps a solvable system)
        scale = gram.diagonal(dim1=1, dim2=2).amin(dim=1)
        ridge = (regularization * scale).clamp_min(torch.finfo(y.dtype).tiny ** 0.5)
        gram = gram + ridge.reshape(batch, 1, 1) * torch.eye(n, dtype=y.dtype, device=y.device)
        factor, failed = torch.linalg.cholesky_ex(gram)
        weights = torch.cholesky_solve(torch.ones_like(gram[:, :, :1]), factor)  # (B, n, 1)
        weights = weights / weights.sum(dim=1, keepdim=True)
        mixed = (weights.transpose(1, 2) @ torch.stack(values, dim=1)).reshape(y0.shape)
        # samples already within tol (their window is numerically rank-deficient) and any
        # system the factorisation rejects take the plain fixed-point step instead
        plain = ((monitor.norms <= tol).reshape(-1) | (failed != 0)).reshape(monitor.norms.shape)
        plain = plain.reshape(plain.shape + (1,) * (y.dim() - plain.dim()))
        y = monitor.freeze(torch.where(plain, gy, mixed), y)


@forward_solver("broyden", memory=integer)
def broyden(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None, memory=30):
    """Limited-memory ("good") Broyden method for ``r(y) = g(y) - y = 0``, per sample.

    An approximate inverse Jacobian ``H ~ (dr/dy)^{-1}``, starting at ``H_0 = -I`` (exact
    when ``h theta F = 0``, so the first step is the fixed-point step), gives the step
    ``y^{k+1} = y^k - H r(y^k)``; after it ``H`` takes the rank-one update
    ``H += (dy - H dr) (dy^T H) / (dy^T H dr)`` (Sherman-Morrison form of Broyden's first
    method; ``dy``, ``dr`` the changes of ``y`` and ``r``), skipped where ``dy^T H dr`` vanishes.
    ``H = -I + sum_i u_i v_i^T`` keeps its last ``memory`` updates. On a linear ``g`` it
    converges in at most ``2 n`` steps for ``n`` unknowns per sample, where fixed-point
    iteration needs ``h theta J_F`` to contract."""
    monitor, y = _Monitor(tol, max_iters, record, active, y0.device), y0
    batch = y0.shape[:monitor.lead].numel()
    us = vs = None  # (B, m, D): the updates u_i and v_i, per sample

    def times_h(x, transpose=False):  # H x (or H^T x) for x of shape (B, D)
        if us is None:
            return -x
        left, right = (vs, us) if transpose else (us, vs)
        return -x + (left.transpose(1, 2) @ (right @ x.unsqueeze(-1))).squeeze(-1)

    r = g(y) - y
    while True:
        if monitor.done(r):
            return y, monitor.info()
        flat = r.reshape(batch, -1)
        y_next = monitor.freeze(y - times_h(flat).reshape(y.shape), y)
        r_next = g(y_next) - y_next
        dy, dr = (y_next - y).reshape(batch, -1), (r_next - r).reshape(batch, -1)
        h_dr, v = times_h(dr), times_h(dy, transpose=True)
        denom = (v * dr).sum(dim=-1, keepdim=True)  # dy^T H dr
        usable = denom.abs() > torch.finfo(y.dtype).eps * (dy.norm(dim=-1, keepdim=True)
                                                            * h_dr.norm(dim=-1, keepdim=True))
        u = torch.where(usable, (dy - h_dr) / torch.where(usable, denom, 1), 0)
        v = torch.where(usable, v, 0)  # a frozen member (dy = 0) or a degenerate step: no update
        us = u.unsqueeze(1) if us is None else torch.cat([us, u.unsqueeze(1)], dim=1)[:, -memory:]
        vs = v.unsqueeze(1) if vs is None else torch.cat([vs, v.unsqueeze(1)], dim=1)[:, -memory:]
        y, r = y_next, r_next


class _Lowest:
    """Wraps the map ``g`` of a solve to remember, per member (one network: one), the
    evaluated point with the lowest residual ``max_b ||y - g(y)||`` and that residual, on the
    device (no host transfer)."""

    def __init__(self, g: Callable, lead: int):
        self.g, self.lead = g, lead
        self.y = self.value = None

    def __call__(self, y: Tensor) -> Tensor:
        gy = self.g(y)
        norms = per_sample_norm((y - gy).detach(), self.lead)
        value = norms.amax(dim=-1)  # () or (E,)
        if self.value is None:
            self.y, self.value = y, value
        else:
            better = value < self.value
            self.y = torch.where(_as_column(better, y) if self.lead == 2 else better, y, self.y)
            self.value = torch.where(better, value, self.value)
        return gy


def fallback(names: tuple[str, ...], options: dict) -> Callable:
    """A forward solver that tries the solvers ``names`` in order (a block's
    ``solver=("fixed_point", "anderson")``): each gets ``max_iters`` iterations, per layer and
    per member, and starts where the previous one did not meet ``tol`` from the lowest-residual
    point evaluated so far; a member stops with the first solver that converges. If none
    does, the lowest-residual point is returned with its residual. ``SolveInfo.solver`` names
    the solver that finished (the last one tried where none converged), per member;
    iterations add up over the solvers tried. ``options`` maps a solver's name to its
    options."""
    def solve(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None):
        ensemble = active is not None
        lowest = _Lowest(g, 2 if ensemble else 1)
        if not ensemble:
            iterations = 0
            for name in names:
                y, info = FORWARD_SOLVERS[name](lowest, y0, tol=tol, max_iters=max_iters,
                                                differentiable=differentiable, record=record,
                                                **options.get(name, {}))
                iterations += info.iterations
                if info.converged:
                    return y, SolveInfo(iterations, info.residual, True, name)
                y0 = lowest.y
            return lowest.y, SolveInfo(iterations, lowest.value, False, names[-1])
        members = len(active)
        running = [bool(a) for a in active]
        counts, residuals = [0] * members, [0.0] * members
        converged, finished = [not r for r in running], [names[0]] * members
        done = None  # the converged members' iterates
        for name in names:
            y, info = FORWARD_SOLVERS[name](lowest, y0, tol=tol, max_iters=max_iters,
                                            differentiable=differentiable, record=record,
                                            active=running, **options.get(name, {}))
            for e in range(members):
                if running[e]:
                    counts[e] += info.iterations[e]
                    residuals[e], converged[e], finished[e] = info.residual[e], info.converged[e], name
            newly = torch.tensor([r and c for r, c in zip(running, converged)], device=y.device)
            done = y if done is None else torch.where(_as_column(newly, y), y, done)
            running = [r and not c for r, c in zip(running, converged)]
            if not any(running):
                return done, SolveInfo(counts, residuals, converged, finished)
            y0 = torch.where(_as_column(torch.tensor(running, device=y.device), y), lowest.y, done)
        best = lowest.value.tolist()
        for e in range(members):
            if running[e]:
                residuals[e] = best[e]
        return y0, SolveInfo(counts, residuals, converged, finished)
    return solve


def resolve(solver, options: dict) -> tuple[Callable, dict]:
    """The forward solver a block calls for its ``solver`` setting (a name, or a tuple of
    names tried in order: :func:`fallback`) and the options to call it with."""
    if isinstance(solver, str):
        return FORWARD_SOLVERS[solver], options
    return fallback(tuple(solver), options), {}


# ------------------------------------------------------------------------------ linear solvers

def _linear_threshold(b: Tensor, tol: float, active: Tensor | None = None):
    """``tol * max(1, max_b ||b_b||)``: a float, or for an ensemble a list, one per member."""
    b = b.detach()  # a differentiable (create_graph) solve still stops on plain numbers
    if active is None:
        return tol * max(1.0, float(per_sample_norm(b).max()))
    return [tol * max(1.0, norm) for norm in per_sample_norm(b, 2).amax(dim=1).tolist()]


def neumann(vjp, b, *, tol, max_iters, active=None):
    """Neumann series for ``(I - J^T) v = b``: ``v_0 = b``, ``v_{k+1} = b + J^T v_k``,
    stopping when ``max_b ||v_{k+1} - v_k|| <= tol * max(1, max_b ||b_b||)``
    (``v_{k+1} - v_k`` is the residual of ``v_k``)."""
    monitor = _Monitor(_linear_threshold(b, tol, active), max_iters, active=active, device=b.device)
    v = b
    while True:
        v_next = b + vjp(v)
        moving = monitor.mask  # members that take this step, the last one included
        stop = monitor.done(v_next - v)
        v = v_next if moving is None else monitor.freeze(v_next, v, moving)
        if stop:
            return v, monitor.info()


def gmres(vjp, b, *, tol, max_iters, active=None, restart=30):
    """Matrix-free restarted GMRES for ``(I - J^T) v = b``, all samples at once.

    The operator is block-diagonal over the batch, so each sample has its own Krylov space;
    they are built in lockstep (per-sample inner products, Givens rotations and
    back-substitution), and a sample whose space is exhausted (happy breakdown) just stops
    moving. ``iterations`` counts operator applications in Arnoldi steps. For an ensemble
    each member stops on its own: it keeps only the Arnoldi steps its own rule asked for
    (the rest of its rotated right-hand side is dropped before the back-substitution), so
    it computes exactly what it computes alone.

    Length: one restart cycle (Arnoldi with modified Gram-Schmidt, Givens rotations,
    back-substitution) shares its state (basis, Hessenberg matrix, rotations, per-member step
    counts) across all its phases; split into functions, each would take and return most of
    it, and the textbook algorithm would no longer read top to bottom."""
    lead = 1 if active is None else 2
    shape = b.shape
    groups = 1 if active is None else shape[0]
    samples = shape[:lead].numel()
    per_group = samples // groups if groups else 0
    b_flat = b.reshape(samples, -1)
    n = b_flat.shape[1]
    thresholds = _linear_threshold(b, tol, active)
    thresholds = [thresholds] if active is None else thresholds
    running = [True] if active is None else [bool(a) for a in active]
    counts, values = [0] * groups, [0.0] * groups

    def operator(v_flat):
        return v_flat - vjp(v_flat.reshape(shape)).reshape(samples, -1)

    def group_max(t):  # (samples,) -> one value per group, on the host
        return t.reshape(groups, -1).amax(dim=1).tolist()

    def per_sample(flags):  # one flag per group -> a (samples, 1) mask
        return torch.tensor(flags, device=b.device).repeat_interleave(per_group).unsqueeze(1)

    def member(e):
        return None if active is None else e

    x = torch.zeros_like(b_flat)
    r = b_flat
    while True:
        beta = torch.linalg.vector_norm(r, dim=1)
        for e, res in enumerate(group_max(beta)):
            if running[e]:
                values[e] = res
                running[e] = not _stops(res, thresholds[e], counts[e], max_iters, member(e))
        if not any(running):
            if active is None:
                return x.reshape(shape), SolveInfo(counts[0], beta.max(), values[0] <= thresholds[0])
            return x.reshape(shape), SolveInfo(counts, values,
                                               [v <= t for v, t in zip(values, thresholds)])
        caps = [min(restart, n, max_iters - c) if go else 0 for c, go in zip(counts, running)]
        m = max(caps)
        basis = [r / torch.where(beta > 0, beta, 1).unsqueeze(1)]
        hess = torch.zeros(samples, m + 1, m, dtype=b.dtype, device=b.device)
        cs = torch.zeros(samples, m, dtype=b.dtype, device=b.device)
        sn = torch.zeros_like(cs)
        s = torch.zeros(samples, m + 1, dtype=b.dtype, device=b.device)
        s[:, 0] = beta
        steps = [0] * groups  # Arnoldi steps each group keeps in this cycle
        going = [cap > 0 for cap in caps]
        for j in range(m):
            w = operator(basis[j])
            for i in range(j + 1):  # modified Gram-Schmidt
                hess[:, i, j] = (w * basis[i]).sum(dim=1)
                w = w - hess[:, i, j, None] * basis[i]
            norm_w = torch.linalg.vector_norm(w, dim=1)
            hess[:, j + 1, j] = norm_w
            basis.append(w / torch.where(norm_w > 0, norm_w, 1).unsqueeze(1))
            for i in range(j):  # apply the earlier rotations to the new column
                top = cs[:, i] * hess[:, i, j] + sn[:, i] * hess[:, i + 1, j]
                hess[:, i + 1, j] = -sn[:, i] * hess[:, i, j] + cs[:, i] * hess[:, i + 1, j]
                hess[:, i, j] = top
            a, c = hess[:, j, j], hess[:, j + 1, j]
            radius = torch.hypot(a, c)
            safe = torch.where(radius > 0, radius, 1)
            cs[:, j] = torch.where(radius > 0, a / safe, 1)
            sn[:, j] = torch.where(radius > 0, c / safe, 0)
            hess[:, j, j] = radius
            hess[:, j + 1, j] = 0
            s[:, j + 1] = -sn[:, j] * s[:, j]
            s[:, j] = cs[:, j] * s[:, j]
            for e, estimate in enumerate(group_max(s[:, j + 1].abs())):
                if going[e]:
                    steps[e] = j + 1  # the cycle's cap counts from this member's iterations
                    going[e] = not _stops(estimate, thresholds[e], counts[e] + j + 1,
                                          counts[e] + caps[e], member(e))
            if not any(going):
                break
        k = max(steps)
        kept = torch.arange(k, device=b.device) < per_sample(steps)  # (samples, k)
        rhs = torch.where(kept, s[:, :k], 0)
        # back-substitution on the rotated (upper-triangular) Hessenberg matrix
        coef = torch.zeros(samples, k, dtype=b.dtype, device=b.device)
        for i in range(k - 1, -1, -1):
            acc = rhs[:, i] - (hess[:, i, i + 1:k] * coef[:, i + 1:k]).sum(dim=1)
            diag = hess[:, i, i]
            coef[:, i] = torch.where(diag != 0, acc / torch.where(diag != 0, diag, 1), 0)
        update = x + sum(coef[:, i, None] * basis[i] for i in range(k))
        x = update if active is None else torch.where(per_sample([k > 0 for k in steps]), update, x)
        counts = [c + k for c, k in zip(counts, steps)]
        r = b_flat - operator(x)  # true residual: restart from it (not an Arnoldi step)


def direct(vjp, b, *, tol, max_iters, active=None):
    """Dense solve of ``(I - J^T) v = b`` per sample: ``J^T`` is assembled from ``n``
    vector-Jacobian products with the unit vectors (all samples at once), then one batched
    ``torch.linalg.solve``. Reports 0 iterations; ``residual`` is the true residual."""
    lead = 1 if active is None else 2
    shape = b.shape
    samples = shape[:lead].numel()
    n = b.numel() // max(samples, 1)
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    # vjp(e_i) is J^T e_i, the i-th column of J^T
    columns = [vjp(eye[i].expand(samples, n).reshape(shape)).reshape(samples, n) for i in range(n)]
    jt = torch.stack(columns, dim=2)  # (samples, n, n) = J^T
    v, singular = torch.linalg.solve_ex(eye - jt, b.reshape(samples, n, 1))
    if bool((singular != 0).any()):  # I - J^T not invertible: no solution to report
        first = int((singular != 0).nonzero()[0, 0])
        raise _failure("I - J^T is singular (iteration 0)",
                       None if active is None else first // shape[1])
    with torch.no_grad():  # a statistic, also of a differentiable (create_graph) solve
        residual = torch.linalg.vector_norm(b.reshape(samples, n, 1) - (eye - jt) @ v,
                                            dim=(1, 2))
    threshold = _linear_threshold(b, tol, active)
    if active is None:  # the shared rule, with no iterations to cap
        converged = _stops(float(residual.max()), threshold, 0, math.inf)
        return v.reshape(shape), SolveInfo(0, residual.max(), converged)
    values = residual.reshape(shape[0], -1).amax(dim=1).tolist()
    return v.reshape(shape), SolveInfo([0] * shape[0], values,
                                       [_stops(v, t, 0, math.inf, e)
                                        for e, (v, t) in enumerate(zip(values, threshold))])


#: the linear solvers of the implicit backward by name (``irn.backward`` chooses among them)
LINEAR_SOLVERS = {"neumann": neumann, "gmres": gmres, "direct": direct}
