"""What a block's solves leave behind, and how a solve that misses its tolerance is reported
(docs/design.md, sections 2 and 5).

A :class:`SolveRecord` holds a block's latest forward, member by member (one network is one
member): its :class:`SolveStats`, completed by the backward that belongs to it, the residuals
of the iterates for ``R_fp`` when they were kept, whether the latest backward converged, and
the kept solution. Each unconverged solve goes through the block's ``on_nonconvergence``
policy: a warning, an error, or nothing.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import torch

from .driver import DEFAULT_RTOL_EPS, SolveInfo
from .errors import ConvergenceWarning, SolverError

#: code a warning must not be attributed to: the library's own and PyTorch's (its module call,
#: autograd's backward), so that it points at the user's line that ran the solve
_NOT_THE_CALLER = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def caller_stacklevel() -> int:
    """The ``stacklevel`` (for ``warnings.warn`` called by this function's caller) of the first
    frame outside irn and torch: the user's line, however deep the library's own calls."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_NOT_THE_CALLER):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class SolveStats:
    """Statistics of a block's latest solve: the forward's ``iterations``, ``residual``
    (``max_b ||R_b(y*)||``), whether it ``converged`` (met its stopping rule) and the
    ``solver`` that finished it (with a fallback, the one that converged; None where nothing
    was solved); the backward's fields (None until a backward of this forward runs; 0
    iterations for backwards without a solve, whose ``backward_converged`` stays None)."""

    iterations: int
    residual: float
    converged: bool
    backward_iterations: int | None = None
    backward_residual: float | None = None
    solver: str | None = None
    backward_converged: bool | None = None


class SolveRecord:
    """The latest solve of a block of ``members`` whose members with ``theta > 0`` solve,
    under ``policy`` (``warn``, ``raise`` or ``ignore``); ``labels`` says whether messages
    name the member (an ensemble's blocks do, one network's do not)."""

    # a plain object with slots: nn.Module's own __setattr__ is slow enough to show in a
    # 100-layer network's training step
    __slots__ = ("members", "solving", "policy", "labels", "stats", "iterate_means",
                 "solution", "_unsolved")

    def __init__(self, members: int, theta, policy: str, labels: bool):
        self.members, self.policy, self.labels = members, policy, labels
        self.solving = [e for e, t in enumerate(theta) if t > 0]
        self.stats = self.iterate_means = self.solution = None
        self._unsolved = None  # the statistics of a forward without a solve, made once

    def _new_stats(self) -> list[SolveStats]:
        return [SolveStats(0, 0.0, True) for _ in range(self.members)]

    def no_solve(self, keep_iterates: bool) -> None:
        """A forward that solved nothing (every member explicit, or an empty batch)."""
        self.iterate_means = torch.zeros(0, self.members) if keep_iterates else None
        # no backward writes to them (nothing was solved), so one set serves every such
        # forward: a 100-layer explicit ensemble of 40 would make 4000 per step otherwise
        if self._unsolved is None:
            self._unsolved = self._new_stats()
        self.stats = self._unsolved

    def forward(self, info: SolveInfo, record: list | None, name: str) -> None:
        """A forward solve's statistics ``info`` (and the per-sample residual norms of its
        iterates, ``record``, when kept); warns (or raises) per unconverged member."""
        self.iterate_means = None if record is None else self._means(record, info)
        solvers = info.solver or [None] * self.members
        if len(self.solving) == self.members:  # every member solves (one object each)
            self.stats = list(map(SolveStats, info.iterations, info.residual, info.converged,
                                  [None] * self.members, [None] * self.members, solvers))
        else:
            self.stats = self._new_stats()  # explicit members: those of an explicit block
            for e in self.solving:
                self.stats[e] = SolveStats(info.iterations[e], info.residual[e],
                                           info.converged[e], solver=solvers[e])
        if not all(info.converged[e] for e in self.solving):
            for e in self.solving:
                if not info.converged[e]:
                    floor = None if info.resolution is None else info.resolution[e]
                    self._nonconvergence(name, "forward", info.iterations[e], info.residual[e], e,
                                         floor)

    @property
    def backward_converged(self) -> list[bool | None] | None:
        """Whether the latest forward's backward met its rule, per member (None for a member
        that does not solve); None before that backward, or where it solved nothing."""
        if self.stats is None:
            return None
        flags = [s.backward_converged for s in self.stats]
        return None if all(f is None for f in flags) else flags

    @property
    def iterate_residuals(self) -> list[torch.Tensor] | None:
        """The rows of :attr:`iterate_means`: one ``(E,)`` tensor per iterate."""
        return None if self.iterate_means is None else list(self.iterate_means.unbind(0))

    def _means(self, record, info):
        """Batch means of the recorded residual norms ``(E, B)`` of the ``K`` iterates, as one
        ``(K, E)`` tensor, zero past each member's own iteration count (so that R_fp sums only
        its terms)."""
        counts = [0] * self.members
        for e in self.solving:
            counts[e] = info.iterations[e]
        means = torch.stack(record).mean(dim=2)
        if min(counts) >= len(record):  # every member iterated to the end: nothing to mask
            return means
        counts = torch.tensor(counts, device=means.device)
        return torch.where(torch.arange(len(record), device=means.device)[:, None] < counts,
                           means, 0)

    def backward(self, info: SolveInfo, stats, name: str) -> None:
        """Hand a backward's statistics ``info`` (per member; ``converged`` None where nothing
        was solved) to the ``stats`` of its forward (None: a solve of second derivatives,
        recorded nowhere), for the members that solve; warn (or raise) per unconverged
        member."""
        iterations, residuals, converged = info.iterations, info.residual, info.converged
        if stats is not None:
            for e in self.solving:
                stats[e].backward_iterations, stats[e].backward_residual = iterations[e], residuals[e]
                stats[e].backward_converged = converged[e]
        if any(converged[e] is False for e in self.solving):
            for e in self.solving:
                if converged[e] is False:
                    self._nonconvergence(name, "backward", iterations[e], residuals[e], e)

    def _nonconvergence(self, name: str, what: str, iterations: int, residual: float,
                        member: int, floor: float | None = None) -> None:
        """Apply the policy to one unconverged solve; ``floor`` (``eps max_b ||y*_b||``) adds
        that the tolerance is below the precision's resolution where the residual is within
        ``DEFAULT_RTOL_EPS`` of it (rounding, not the solver, stopped it)."""
        label = f"{name}, member {member}" if self.labels else name
        message = (f"{label}: {what} solve did not converge in {iterations} "
                   f"iterations (residual {residual:.3e})")
        if floor is not None and residual <= DEFAULT_RTOL_EPS * floor:
            message += (f": the tolerance is below what the precision resolves at this |y| "
                        f"(eps max_b ||y_b|| = {floor:.1e}); give a relative tolerance, rtol >= "
                        f"{DEFAULT_RTOL_EPS} eps (the default below float64 when no tol is "
                        f"given)")
        if self.policy == "raise":
            raise SolverError(message)
        if self.policy == "warn":
            warnings.warn(message, ConvergenceWarning, stacklevel=caller_stacklevel())
