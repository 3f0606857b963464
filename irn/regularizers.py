"""The two regularisers of the paper (section 2.2; reconstructed in docs/design.md, section 4)
and the Jacobian regulariser of the equilibrium-model literature.

On an ensemble (``irn.ImplicitResNet.stack``) each returns one value per member, shape
``(E,)``, and its settings (``alpha``, ``sigma``, ``beta``) may be a float or one float per
member; ``generator`` may then be one ``torch.Generator`` per member, which draws that
member's perturbations exactly as its solo run draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import per_member, require
from .driver import per_sample_norm
from .summary import implicit_blocks


def _setting(name: str, value, members: int | None, like: torch.Tensor, check, allowed: str):
    """A regulariser setting checked (``check(v)`` for each value, ``allowed`` names the
    range), as an ``(E,)`` tensor on ``like``'s dtype and device (``E = 1`` for one network,
    ``members`` None, which takes one value)."""
    values = per_member(name, value, members)
    values = [values] if members is None else values
    for v in values:
        require(check(v), f"{name} must be {allowed}, got {v!r}")
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _public(members: int | None, values: torch.Tensor) -> torch.Tensor:
    """Per-member values (leading dimension ``E``) as the public layout shows them: the one
    member's for one network (``members`` None)."""
    return values[0] if members is None else values


def fixed_point(model, alpha: float) -> torch.Tensor:
    """Fixed-point regulariser (paper eq. 9)::

        R_fp = (1/L) sum_l sum_{k=1}^{K_l - 1} relu(r_l^k - alpha r_l^{k-1})

    with ``r_l^k`` the batch mean of ``||y_l^{k+1} - y_l^k||`` over the iterates of layer
    ``l`` in the latest forward. Zero when every layer contracts at rate ``alpha`` or faster.
    Needs ``net.keep_iterates = True`` during that forward (``ValueError`` otherwise);
    ``model`` is any module holding implicit blocks (:func:`irn.summary.implicit_blocks`). On an
    ensemble: shape ``(E,)``, each member's own sum (its recorded residuals are zero past its
    own iteration count, where ``relu(0 - alpha r) = 0`` adds nothing).
    """
    blocks, members = implicit_blocks(model)
    p = next(model.parameters())
    alpha = _setting("alpha", alpha, members, p, lambda a: 0 < a < 1, "in (0, 1)")
    means = [block.record.iterate_means for block in blocks]  # (K_l, E) each
    require(any(m is not None for m in means),
            "no iterates recorded: set keep_iterates = True on the network (or on each "
            "block of another module) and run a forward pass before calling "
            "irn.regularizers.fixed_point")
    total = torch.zeros(alpha.shape, dtype=p.dtype, device=p.device)
    for r in means:
        if r is not None and len(r) > 1:  # a layer that converged at its first iterate adds 0
            total = total + torch.relu(r[1:] - alpha * r[:-1]).sum(dim=0)
    return _public(members, total / len(means))


def noise(shape, like: torch.Tensor, generator: torch.Generator | None = None,
          uniform: bool = False) -> torch.Tensor:
    """``N(0, 1)`` (or, with ``uniform``, ``U[0, 1)``) samples of ``shape`` with ``like``'s dtype
    and device, drawn from ``generator`` on its own device (so a CPU generator seeds CUDA runs)."""
    draw = torch.rand if uniform else torch.randn
    device = generator.device if generator is not None else like.device
    return draw(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def perturbation_distances(net, y0: torch.Tensor, sigma, streams: int,
                           generator=None):
    """Distances ``d_l^s = ||y~_l^s - y_l||`` between the hidden states of ``S = streams``
    perturbed copies ``y~_0^s = y0 + sigma xi^s`` (``xi^s ~ N(0, I)``) and those of ``y0``,
    for ``l = 0..L``: shape ``(L + 1, S, B)``. The clean input and the perturbed copies go
    through ``net`` in one batched pass. Returns ``(d, net(y0))``.

    On an ensemble (``y0`` of shape ``(E, B, dim)``): ``d`` has shape ``(L + 1, E, S, B)``;
    ``sigma`` may be one value per member and ``generator`` one generator per member (a
    single generator draws the whole ``(E, S, B, dim)`` noise at once)."""
    d, output = _member_distances(net, y0, sigma, streams, generator)
    return (d[:, 0], output[0]) if net.members is None else (d, output)


def _check_network(net) -> None:
    """R_stab compares the hidden states of every layer: a network's (``ImplicitResNet.states``),
    not those of any module with blocks."""
    require(callable(getattr(net, "states", None)) and hasattr(net, "_compiled_distances"),
            f"net must be an irn.ImplicitResNet (ImplicitResNet.from_blocks makes one of your "
            f"own blocks), got {type(net).__name__}")


def _member_distances(net, y0, sigma, streams, generator):
    """:func:`perturbation_distances` in the member layout: ``d`` of shape
    ``(L + 1, E, S, B)`` and the clean output ``(E, B, dim)``, ``E = 1`` for one network."""
    _check_network(net)
    members = net.members
    sigma = _setting("sigma", sigma, members, y0, lambda s: s >= 0, ">= 0")
    require(isinstance(streams, int) and streams >= 1,
             f"streams must be an int >= 1, got {streams!r}")
    net._check_input(y0)
    y0 = y0 if members is not None else y0.unsqueeze(0)  # the member layout (E, B, dim)
    count, batch = y0.shape[:2]
    shape = (streams,) + tuple(y0.shape[1:])
    if isinstance(generator, Sequence):
        require(len(generator) == count,
                f"generator must be one generator or one per member ({count}), got {len(generator)}")
        xi = torch.stack([noise(shape, y0, g) for g in generator])  # (E, S, B, dim)
    else:
        xi = noise((count,) + shape, y0, generator)
    sigma = sigma.reshape((-1,) + (1,) * (xi.dim() - 1))
    inputs = torch.cat([y0.unsqueeze(1), y0.unsqueeze(1) + sigma * xi], dim=1)
    inputs = inputs.reshape(count, (streams + 1) * batch, -1)
    fused = net._compiled_distances(inputs, batch) if inputs.dim() == 3 else None
    if fused is not None:  # the compiled path: no state of a copy passes through autograd
        return fused
    states = net.states(inputs)
    states = states.reshape(states.shape[0], count, streams + 1, batch, -1)
    d = per_sample_norm(states[:, :, 1:] - states[:, :, :1], 4)  # (L + 1, E, S, B)
    return d, states[-1, :, 0]


def perturbation(net, y0: torch.Tensor, sigma: float, beta: float, streams: int,
                 generator: torch.Generator | None = None, return_output: bool = False):
    """Perturbation (stability) regulariser (paper eq. 10)::

        R_stab = (1/(L S)) sum_s sum_{l=1}^{L} mean_b relu(d_l^s - beta d_{l-1}^s),
        d_l^s = ||y~_l^s - y_l||,   y~_0^s = y0 + sigma xi^s,  xi^s ~ N(0, I)

    (the distances of :func:`perturbation_distances`, fresh noise per call). With
    ``return_output=True`` returns ``(R_stab, net(y0))``, the clean output of that same
    batched pass, so the data loss needs no second forward.
    """
    _check_network(net)
    beta = _setting("beta", beta, net.members, y0, lambda b: b > 0, "> 0")
    d, output = _member_distances(net, y0, sigma, streams, generator)  # d[l, e, s, b]
    num_layers = d.shape[0] - 1
    beta = beta.reshape(1, -1, 1, 1)
    value = _public(net.members, torch.relu(d[1:] - beta * d[:-1]).mean(dim=3).sum(dim=(0, 2))
                    / (num_layers * streams))
    if return_output:
        return value, _public(net.members, output)
    return value


def jacobian(model, probes: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Jacobian regulariser, Hutchinson's estimate of the mean squared Frobenius norm of the
    residual functions' Jacobians at the latest forward's solutions::

        R_J = (1/L) sum_l mean_b (1/K) sum_k ||eps_k^T J_{F_l}(y*_l,b)||^2
            ~ (1/L) sum_l mean_b ||J_{F_l}(y*_l,b)||_F^2

    with ``K = probes`` Rademacher vectors ``eps_k`` (entries +-1, so ``E[eps eps^T] = I`` and
    each term's expectation is exactly ``||J||_F^2``) drawn from ``generator`` (on an
    ensemble, one generator per member draws that member's vectors as its solo run would). Small
    ``||J_F||`` keeps ``h theta J_F`` a contraction, so fixed-point solves keep converging.
    ``y*_l`` is block ``l``'s output (its fixed point within ``tol``), kept when
    ``net.keep_solution = True`` was set before the forward (``ValueError`` otherwise);
    ``model`` is any module holding implicit blocks (:func:`irn.summary.implicit_blocks`: an
    ``ImplicitResNet``, an ``ImplicitModel``, an ``nn.Sequential`` of blocks). Differentiable in the
    parameters, directly and through ``y*_l`` (the implicit backward). On an ensemble:
    shape ``(E,)``, each member's own value.
    """
    require(isinstance(probes, int) and not isinstance(probes, bool) and probes >= 1,
            f"probes must be an int >= 1, got {probes!r}")
    blocks, members = implicit_blocks(model)
    require(all(block.record.solution is not None for block in blocks),
            "no solutions kept: set net.keep_solution = True and run a forward pass before "
            "calling irn.regularizers.jacobian")
    total = 0
    for block in blocks:
        y = block.record.solution  # (E, B, *)
        with torch.enable_grad():
            y_in = y if y.requires_grad else y.detach().requires_grad_()
            fy = block.F_members(y_in)
            for _ in range(probes):
                eps = _rademacher(y, generator)
                row = torch.autograd.grad(fy, y_in, eps, create_graph=True)[0]  # eps^T J
                total = total + per_sample_norm(row).pow(2).mean(dim=-1)
    return _public(members, total / (probes * len(blocks)))


def _rademacher(like: torch.Tensor, generator) -> torch.Tensor:
    """Entries +-1 with equal probability, shaped like ``like``; ``generator`` may be one per
    member of an ensemble (``like`` of shape ``(E, B, dim)``)."""
    if isinstance(generator, Sequence):
        require(len(generator) == like.shape[0],
                f"generator must be one generator or one per member ({like.shape[0]}), "
                f"got {len(generator)}")
        return torch.stack([_rademacher(member, g) for member, g in zip(like, generator)])
    return 2 * (noise(like.shape, like, generator, uniform=True) < 0.5).to(like.dtype) - 1
