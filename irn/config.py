"""How a block solves, as one validated value (docs/design.md, section 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import solvers  # noqa: F401 (registers the forward solvers)
from ._checks import choice, integer, keywords, number, require
from .backward import BACKWARDS
from .driver import FORWARD_SOLVERS, check_options

POLICIES = ("warn", "raise", "ignore")


@dataclass(frozen=True)
class SolveConfig:
    """How a block solves: the forward ``solver`` (a name, or a tuple of names tried in order
    where the previous one did not converge, ``irn.driver.solve``) with its
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
            choice("solver", name, FORWARD_SOLVERS)
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
            check_options(self.solver, options)
        else:
            require(set(options) <= set(names) and all(isinstance(o, dict) for o in options.values()),
                    f"solver_options for the solvers {tuple(names)} must map some of their "
                    f"names to their options, got {self.solver_options!r}")
            for name, own in options.items():
                check_options(name, own)
        choice("on_nonconvergence", self.on_nonconvergence, POLICIES)
        for name, value in (("tol", float(self.tol)), ("lin_tol", float(lin_tol)),
                            ("lin_max_iters", lin_max_iters), ("solver_options", options),
                            ("solver", self.solver if isinstance(self.solver, str) else tuple(names))):
            object.__setattr__(self, name, value)  # resolved once, here

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
        for forward, backward in (("tol", "lin_tol"), ("max_iters", "lin_max_iters")):
            if forward in changes and getattr(self, backward) == getattr(self, forward):
                changes.setdefault(backward, None)
        return dataclasses.replace(self, **changes)



SolveConfig.__init__ = keywords()(SolveConfig.__init__)  # a misspelled setting names the right one
#: the settings a block passes to its SolveConfig
SOLVE_SETTINGS = tuple(f.name for f in dataclasses.fields(SolveConfig))
