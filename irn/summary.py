"""What the latest solves of a model's implicit blocks did, in one record
(:func:`solve_summary`): for any module that holds blocks, a network, an ensemble, an
``nn.Sequential`` or a user's model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._checks import require
from .layers import ImplicitResidualBlock


def implicit_blocks(model: nn.Module) -> tuple[list[ImplicitResidualBlock], int | None]:
    """The implicit residual blocks of ``model`` (an ``ImplicitResNet``, an ``ImplicitModel``,
    an ``nn.Sequential``, any module), in the order of ``model.modules()``, and their number of
    members (None: one network); a ``ValueError`` where there is none or they mix one network
    with ensembles."""
    blocks = model.__dict__.get("_modules", {}).get("blocks")  # a network's, without a walk
    blocks = (list(blocks) if isinstance(blocks, nn.ModuleList) else
              [m for m in model.modules() if isinstance(m, ImplicitResidualBlock)])
    require(blocks, f"{type(model).__name__} holds no irn.ImplicitResidualBlock")
    members = {block.members for block in blocks}
    require(len(members) == 1, f"the blocks of {type(model).__name__} mix ensembles of different "
                               f"sizes and single networks: members {sorted(members, key=str)}")
    return blocks, members.pop()


@dataclass
class SolveSummary:
    """The latest forward (and its backward, once it ran) of every implicit block of a model,
    block by block in the order of ``model.modules()``; per member where the model is an
    ensemble (the per-block entries are then lists of ``E``).

    ``path``: ``"compiled"`` or ``"torch"``, the path the networks' latest call ran (None where
    no ``ImplicitResNet`` ran the blocks: blocks called on their own); ``reason``: why it was
    the generic one. ``converged``: every forward solve met its rule (per member: a list);
    ``residual``: the largest forward residual; ``backward_converged``: every backward solve
    met its rule (None while no backward has run for these forwards, and for a member that
    solves nothing: an explicit network)."""

    path: str | None
    reason: str | None
    iterations: list
    residual: float
    converged: bool | list[bool]
    backward_iterations: list
    backward_converged: bool | list[bool] | None


def solve_summary(model: nn.Module) -> SolveSummary:
    """One record of the latest solves of ``model``'s implicit blocks (:class:`SolveSummary`);
    a ``ValueError`` before the blocks' first forward."""
    blocks, members = implicit_blocks(model)
    stats = [b.record.stats for b in blocks]  # per block, one SolveStats per member
    require(all(s is not None for s in stats), f"{type(model).__name__}: no forward has run yet")
    count = members or 1

    def per_member(values):  # [[block 0's E values], ...] -> the public layout
        return values if members is not None else [v[0] for v in values]

    def every(flags):  # per member: all of its flags (None where any is, or there is none)
        columns = [[f[e] for f in flags if e in f] for e in range(count)]
        out = [None if None in c or not c else all(c) for c in columns]
        return out if members is not None else out[0]

    # a member's backward flags where it solves (an explicit block has no backward solve)
    backward = [{e: st[e].backward_converged for e in b.record.solving}
                for b, st in zip(blocks, stats)]
    networks = [m for m in model.modules() if "_last_path" in m.__dict__]
    paths = {m.__dict__["_last_path"] for m in networks}
    path, reason = paths.pop() if len(paths) == 1 else (None, None)
    return SolveSummary(
        path, reason, per_member([[s.iterations for s in st] for st in stats]),
        max(s.residual for st in stats for s in st),
        every([dict(enumerate(s.converged for s in st)) for st in stats]),
        per_member([[s.backward_iterations for s in st] for st in stats]), every(backward))
