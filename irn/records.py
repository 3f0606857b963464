"""What a block's solves leave behind, and how a solve that misses its tolerance is reported
(docs/design.md, sections 2 and 5).

A :class:`SolveRecord` holds a block's latest forward: its :class:`irn.SolveStats` (one per
member of an ensemble), completed by the backward that belongs to it, the residuals of the
iterates for ``R_fp`` when they were kept, and whether the latest backward converged. Each
unconverged solve goes through the block's ``on_nonconvergence`` policy: a warning, an error,
or nothing.
"""

from __future__ import annotations

import warnings

import torch

from .solvers import ConvergenceWarning, SolveInfo, SolverError, SolveStats


class SolveRecord:
    """The latest solve of a block of ``members`` (None: one network) whose members with
    ``theta > 0`` solve, under ``policy`` (``warn``, ``raise`` or ``ignore``)."""

    # a plain object with slots: nn.Module's own __setattr__ is slow enough to show in a
    # 100-layer network's training step
    __slots__ = ("members", "solving", "policy", "stats", "iterate_residuals",
                 "backward_converged", "solution", "_unsolved")

    def __init__(self, members: int | None, theta, policy: str):
        self.members, self.policy = members, policy
        self.solving = [None] if members is None else [e for e, t in enumerate(theta) if t > 0]
        self.stats = self.iterate_residuals = self.backward_converged = self.solution = None
        self._unsolved = None  # the statistics of a forward without a solve, made once

    def _new_stats(self):
        return (SolveStats(0, 0.0, True) if self.members is None
                else [SolveStats(0, 0.0, True) for _ in range(self.members)])

    def no_solve(self, keep_iterates: bool) -> None:
        """A forward that solved nothing (every member explicit, or an empty batch)."""
        self.iterate_residuals = [] if keep_iterates else None
        self.backward_converged = None
        # no backward writes to them (nothing was solved), so one set serves every such
        # forward: a 100-layer explicit ensemble of 40 would make 4000 per step otherwise
        if self._unsolved is None:
            self._unsolved = self._new_stats()
        self.stats = self._unsolved

    def forward(self, info: SolveInfo, record: list | None, name: str) -> None:
        """A forward solve's statistics ``info`` (and the per-sample residual norms of its
        iterates, ``record``, when kept); warns (or raises) per unconverged member."""
        self.iterate_residuals = None if record is None else self._means(record, info)
        self.backward_converged = None
        if self.members is None:
            self.stats = SolveStats(info.iterations, float(info.residual), info.converged,
                                    solver=info.solver)
            if not info.converged:
                self._nonconvergence(name, "forward", info.iterations, self.stats.residual)
        else:
            self.stats = self._new_stats()  # explicit members: those of an explicit block
            for e in self.solving:
                self.stats[e] = SolveStats(info.iterations[e], info.residual[e], info.converged[e],
                                           solver=None if info.solver is None else info.solver[e])
                if not info.converged[e]:
                    self._nonconvergence(name, "forward", info.iterations[e], info.residual[e], e)

    def _means(self, record, info):
        """Batch means of the recorded residual norms; an ensemble's are ``(E,)`` tensors,
        zero past each member's own iteration count (so that R_fp sums only its terms)."""
        if self.members is None:
            return [r.mean() for r in record]
        counts = [0] * self.members
        for e in self.solving:
            counts[e] = info.iterations[e]
        counts = torch.tensor(counts, device=record[0].device)
        return [torch.where(k < counts, r.mean(dim=1), 0) for k, r in enumerate(record)]

    def backward(self, info: SolveInfo, stats, name: str) -> None:
        """Hand a backward's statistics ``info`` (per member for an ensemble; ``converged``
        None where nothing was solved) to the ``stats`` of its forward (None: a solve of second
        derivatives, recorded nowhere), for the members that solve, and to
        ``backward_converged`` when that forward is the latest one and solved something; warn
        (or raise) per unconverged member."""
        if self.members is None:
            entries = [(None, info.iterations, info.residual, info.converged)]
        else:
            entries = [(e, info.iterations[e], info.residual[e], info.converged[e])
                       for e in self.solving]
        if stats is not None:
            targets = [stats] if self.members is None else stats
            for member, iterations, residual, _ in entries:
                target = targets[0 if member is None else member]
                target.backward_iterations, target.backward_residual = iterations, residual
            solved = [(member, ok) for member, _, _, ok in entries if ok is not None]
            if stats is self.stats and solved:
                if self.members is None:
                    self.backward_converged = solved[0][1]
                else:
                    converged = [None] * self.members
                    for member, ok in solved:
                        converged[member] = ok
                    self.backward_converged = converged
        for member, iterations, residual, ok in entries:
            if ok is False:
                self._nonconvergence(name, "backward", iterations, residual, member)

    def _nonconvergence(self, name: str, what: str, iterations: int, residual: float,
                        member: int | None = None) -> None:
        label = name if member is None else f"{name}, member {member}"
        message = (f"{label}: {what} solve did not converge in {iterations} "
                   f"iterations (residual {residual:.3e})")
        if self.policy == "raise":
            raise SolverError(message)
        if self.policy == "warn":
            warnings.warn(message, ConvergenceWarning, stacklevel=5)  # the caller of block(x)
