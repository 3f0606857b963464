"""How a block solves, as one validated value (docs/design.md, section 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import solvers  # noqa: F401 (registers the forward solvers)
from ._checks import choice, integer, keywords, number, require
from .backward import BACKWARDS
from .driver import DEFAULT_RTOL_EPS, FORWARD_SOLVERS, MIN_RTOL_EPS, check_options

POLICIES = ("warn", "raise", "ignore")


@dataclass(frozen=True)
class SolveConfig:
    """How a block solves: the forward ``solver`` (a name, or a tuple of names tried in order
    where the previous one did not converge, ``irn.driver.solve``) with its
    ``solver_options`` (for a tuple: ``{name: options}``), the ``backward``
    (``neumann``, ``gmres``, ``direct``, ``unrolled``, ``jacobian_free``), the stopping rules
    (forward within ``max_iters``, backward within ``lin_max_iters``, None: the forward's; see
    :class:`Stopping` and :meth:`stopping`) and the ``on_nonconvergence`` policy.

    Tolerances: ``tol`` given is the absolute rule ``max_b ||R_b|| <= tol`` exactly; otherwise
    each sample's ``||R_b|| <= atol + rtol ||y_b||`` with ``atol`` (default ``1e-6``) and
    ``rtol`` (default: 0 in float64, so that the rule is ``tol = 1e-6``; ``16 eps`` of the
    precision ``F`` computes in otherwise, which rounding lets a solve reach). ``lin_tol``
    given is the absolute backward rule; otherwise the backward follows the forward's
    ``atol``, ``rtol``. Every field is checked here, once, option values included; a block
    holds one (``block.config``), and :meth:`changed` changes some fields of it."""

    solver: str | tuple = "fixed_point"
    backward: str = "neumann"
    tol: float | None = None
    max_iters: int = 50
    lin_tol: float | None = None
    lin_max_iters: int | None = None
    solver_options: dict = field(default_factory=dict)
    on_nonconvergence: str = "warn"
    atol: float | None = None
    rtol: float | None = None

    def __post_init__(self):
        names = (self.solver,) if isinstance(self.solver, str) else self.solver
        require(isinstance(names, (tuple, list)) and len(names) >= 1
                and len(set(map(str, names))) == len(names),
                f"solver must be a solver's name or a tuple of distinct names, got {self.solver!r}")
        for name in names:
            choice("solver", name, FORWARD_SOLVERS)
        choice("backward", self.backward, BACKWARDS)
        for name in ("tol", "lin_tol"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), lambda v: v > 0, "None or a finite number > 0")
        for name in ("atol", "rtol"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), lambda v: v >= 0, "None or a finite number >= 0")
        require(self.tol is None or self.atol is None and self.rtol is None,
                f"give tol (the absolute rule max_b ||R_b|| <= tol) or atol and rtol, not both: "
                f"tol={self.tol!r}, atol={self.atol!r}, rtol={self.rtol!r}")
        require(self.tol is not None or self.atol is None or self.rtol is None
                or self.atol + self.rtol > 0, "atol and rtol cannot both be 0")
        integer("max_iters", self.max_iters)
        lin_max_iters = self.max_iters if self.lin_max_iters is None else self.lin_max_iters
        integer("lin_max_iters", lin_max_iters)
        require(self.solver_options is None or isinstance(self.solver_options, dict),
                f"solver_options must be a dict or None, got {self.solver_options!r}")
        options = dict(self.solver_options or {})
        if isinstance(self.solver, str):
            check_options(self.solver, options)
        else:
            require(set(options) <= set(names) and all(isinstance(o, dict) for o in options.values()),
                    f"solver_options for the solvers {tuple(names)} must map some of their "
                    f"names to their options, got {self.solver_options!r}")
            for name, own in options.items():
                check_options(name, own)
        choice("on_nonconvergence", self.on_nonconvergence, POLICIES)
        floats = {name: float(getattr(self, name)) for name in ("tol", "lin_tol", "atol", "rtol")
                  if getattr(self, name) is not None}
        for name, value in (*floats.items(), ("lin_max_iters", lin_max_iters),
                            ("solver_options", options),
                            ("solver", self.solver if isinstance(self.solver, str) else tuple(names))):
            object.__setattr__(self, name, value)  # resolved once, here
        object.__setattr__(self, "_stopping", {})  # per precision, made at the first call

    def stopping(self, dtype: torch.dtype, low: torch.dtype | None = None,
                 name: str | None = None) -> "Stopping":
        """The stopping rules for iterates of ``dtype`` with ``F`` computed in ``low`` (a
        ``torch.autocast`` dtype; None: ``dtype``), made once per pair. The precision that
        bounds what a solve can reach is ``low``'s (or ``dtype``'s) machine epsilon ``eps``:
        an ``rtol`` in ``(0, 4 eps)``, or under autocast an absolute tolerance below ``eps``,
        is a ``ValueError`` (the solve could not converge), naming the block ``name``."""
        key = (dtype, low)
        if key not in self._stopping:
            try:
                self._stopping[key] = Stopping.of(self, dtype, low)
            except ValueError as err:
                raise ValueError(f"{name}: {err}" if name else str(err)) from None
        return self._stopping[key]

    def tolerances(self) -> str:
        """The forward's tolerances as given: ``"tol=1e-06"``, or ``atol`` and ``rtol`` (None:
        their defaults)."""
        if self.tol is not None:
            return f"tol={self.tol:g}"
        return ", ".join(f"{name}={'default' if value is None else format(value, 'g')}"
                         for name, value in (("atol", self.atol), ("rtol", self.rtol)))

    def absolute_tolerances(self) -> tuple[float, float]:
        """The absolute parts of the forward and backward rules, whatever the precision: ``tol``
        (else ``atol``, else 1e-6) and ``lin_tol`` (else the forward's)."""
        tol = self.tol if self.tol is not None else DEFAULT_ATOL if self.atol is None else self.atol
        return tol, tol if self.lin_tol is None else self.lin_tol

    def solvers(self) -> tuple[tuple[str, ...], dict]:
        """The forward solvers' names, tried in order, and ``{name: options}``."""
        if isinstance(self.solver, str):
            return (self.solver,), {self.solver: self.solver_options}
        return self.solver, self.solver_options

    def changed(self, **changes) -> "SolveConfig":
        """``dataclasses.replace`` with ``changes``, where solver options are dropped when
        ``solver`` changes (options belong to a solver), and ``lin_tol`` (``lin_max_iters``)
        follows a changed ``tol`` (``max_iters``) when it was equal to it, as the default is."""
        if "solver" in changes:
            changes.setdefault("solver_options", None)
        if "tol" in changes and changes["tol"] is not None:  # the absolute rule replaces these
            changes.setdefault("atol", None)
            changes.setdefault("rtol", None)
        if {"atol", "rtol"} & set(changes):
            changes.setdefault("tol", None)
        for forward, backward in (("tol", "lin_tol"), ("max_iters", "lin_max_iters")):
            if forward in changes and getattr(self, backward) == getattr(self, forward):
                changes.setdefault(backward, None)
        return dataclasses.replace(self, **changes)



#: the absolute part of the default rule (section 2's ``tol``)
DEFAULT_ATOL = 1e-6


@dataclass(frozen=True)
class Stopping:
    """A block's stopping rules in one precision (docs/design.md, section 2):

    - forward, per sample: ``||R_b(y)|| <= atol + rtol ||y_b||`` at the iterate ``y`` whose
      residual ``R(y) = y - g(y)`` is evaluated; a member stops when all its samples do;
    - backward, per sample: ``||r_b|| <= lin_atol max(1, max_b ||g_b||) + lin_rtol ||g_b||``
      for the linear solve's residual ``r`` and right-hand side ``g`` (section 1's rule when
      ``lin_rtol = 0``).

    ``eps`` is the machine epsilon of the precision ``F`` computes in (for the warning of a
    solve that stalls at rounding level)."""

    atol: float
    rtol: float
    lin_atol: float
    lin_rtol: float
    eps: float

    @staticmethod
    def of(config: SolveConfig, dtype: torch.dtype, low: torch.dtype | None) -> "Stopping":
        eps = torch.finfo(low or dtype).eps
        atol, lin_atol = config.absolute_tolerances()
        full = dtype == torch.float64 and low in (None, torch.float64)
        rtol = (0.0 if config.tol is not None else config.rtol if config.rtol is not None
                else 0.0 if full else DEFAULT_RTOL_EPS * eps)
        lin_rtol = rtol if config.lin_tol is None else 0.0
        precision = low or dtype
        require(atol + rtol > 0, f"atol={atol:g} with rtol={rtol:g} in {precision}: a rule no "
                                 f"solve can meet; give atol > 0 or rtol > 0")
        require(rtol == 0 or rtol >= MIN_RTOL_EPS * eps,
                f"rtol={rtol:g} is below what {precision} resolves ({MIN_RTOL_EPS} x its machine "
                f"epsilon, {MIN_RTOL_EPS * eps:.1e}): the solve could not converge; use rtol >= "
                f"{MIN_RTOL_EPS * eps:.1e} or leave it at its default ({DEFAULT_RTOL_EPS} eps)")
        if low is not None:  # an absolute tolerance alone under autocast
            for name, value, relative in (("tol", atol, rtol), ("lin_tol", lin_atol, lin_rtol)):
                require(relative > 0 or value >= eps,
                        f"{name}={value:g} is below what {low} resolves under autocast (machine "
                        f"epsilon {eps:.1e}), so the solve cannot converge: use {name} >= "
                        f"{eps:.1e}, or atol and rtol")
        return Stopping(atol, rtol, lin_atol, lin_rtol, eps)


SolveConfig.__init__ = keywords()(SolveConfig.__init__)  # a misspelled setting names the right one
#: the settings a block passes to its SolveConfig
SOLVE_SETTINGS = tuple(f.name for f in dataclasses.fields(SolveConfig))
