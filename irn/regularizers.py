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

from ._checks import per_member, require
from .solvers import per_sample_norm


def _setting(name: str, value, members: int | None, like: torch.Tensor, check, allowed: str):
    """A regulariser setting checked (``check(v)`` for each value, ``allowed`` names the
    range): a float for one network; for an ensemble an ``(E,)`` tensor on ``like``'s device."""
    values = per_member(name, value, members)
    for v in (values if members else [values]):
        require(check(v), f"{name} must be {allowed}, got {v!r}")
    if members is None:
        return values
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def fixed_point(net, alpha: float) -> torch.Tensor:
    """Fixed-point regulariser (paper eq. 9)::

        R_fp = (1/L) sum_l sum_{k=1}^{K_l - 1} relu(r_l^k - alpha r_l^{k-1})

    with ``r_l^k`` the batch mean of ``||y_l^{k+1} - y_l^k||`` over the iterates of layer
    ``l`` in the latest forward. Zero when every layer contracts at rate ``alpha`` or faster.
    Needs ``net.keep_iterates = True`` during that forward (``ValueError`` otherwise). On an
    ensemble: shape ``(E,)``, each member's own sum (its recorded residuals are zero past its
    own iteration count, where ``relu(0 - alpha r) = 0`` adds nothing).
    """
    p = next(net.parameters())
    alpha = _setting("alpha", alpha, net.members, p, lambda a: 0 < a < 1, "in (0, 1)")
    blocks = list(net.blocks)
    require(any(block.iterate_residuals is not None for block in blocks),
             "no iterates recorded: set net.keep_iterates = True and run a forward pass "
             "before calling irn.regularizers.fixed_point")
    total = None
    for block in blocks:
        r = block.iterate_residuals or []
        for k in range(1, len(r)):
            term = torch.relu(r[k] - alpha * r[k - 1])
            total = term if total is None else total + term
    if total is None:  # every layer converged at its first iterate (or is explicit)
        shape = () if net.members is None else (net.members,)
        return torch.zeros(shape, dtype=p.dtype, device=p.device)
    return total / len(blocks)


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
    members = net.members
    sigma = _setting("sigma", sigma, members, y0, lambda s: s >= 0, ">= 0")
    require(isinstance(streams, int) and streams >= 1,
             f"streams must be an int >= 1, got {streams!r}")
    if members is None:
        batch = y0.shape[0]
        xi = noise((streams,) + tuple(y0.shape), y0, generator)
        inputs = torch.cat([y0.unsqueeze(0), y0 + sigma * xi]).reshape((-1,) + y0.shape[1:])
        states = net.trajectory(inputs)  # (L + 1, (S + 1) B, dim)
        states = states.reshape(states.shape[0], streams + 1, batch, *states.shape[2:])
        clean, perturbed = states[:, :1], states[:, 1:]
        d = per_sample_norm((perturbed - clean).reshape(-1, *states.shape[3:]))
        return d.reshape(states.shape[0], streams, batch), states[-1, 0]
    net._check_input(y0)
    batch = y0.shape[1]
    shape = (streams,) + tuple(y0.shape[1:])
    if isinstance(generator, Sequence):
        require(len(generator) == members,
                f"generator must be one generator or one per member ({members}), got {len(generator)}")
        xi = torch.stack([noise(shape, y0, g) for g in generator])  # (E, S, B, dim)
    else:
        xi = noise((members,) + shape, y0, generator)
    sigma = sigma.reshape((-1,) + (1,) * (xi.dim() - 1))
    inputs = torch.cat([y0.unsqueeze(1), y0.unsqueeze(1) + sigma * xi], dim=1)
    states = net.trajectory(inputs.reshape(members, (streams + 1) * batch, -1))
    states = states.reshape(states.shape[0], members, streams + 1, batch, -1)
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
    beta = _setting("beta", beta, net.members, y0, lambda b: b > 0, "> 0")
    d, output = perturbation_distances(net, y0, sigma, streams, generator)  # d[l, (e,) s, b]
    num_layers = d.shape[0] - 1
    if net.members is None:
        value = torch.relu(d[1:] - beta * d[:-1]).mean(dim=2).sum() / (num_layers * streams)
    else:  # one value per member
        beta = beta.reshape(1, -1, 1, 1)
        value = (torch.relu(d[1:] - beta * d[:-1]).mean(dim=3).sum(dim=(0, 2))
                 / (num_layers * streams))
    if return_output:
        return value, output
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
    ``net.keep_solutions = True`` was set before the forward (``ValueError`` otherwise);
    ``model`` is an ``ImplicitResNet`` or a model with one as ``.net``. Differentiable in the
    parameters, directly and through ``y*_l`` (the implicit backward). On an ensemble:
    shape ``(E,)``, each member's own value.
    """
    net = getattr(model, "net", model)
    require(isinstance(probes, int) and not isinstance(probes, bool) and probes >= 1,
            f"probes must be an int >= 1, got {probes!r}")
    blocks = list(net.blocks)
    require(all(block.solution is not None for block in blocks),
            "no solutions kept: set net.keep_solutions = True and run a forward pass before "
            "calling irn.regularizers.jacobian")
    total = 0
    for block in blocks:
        y = block.solution
        lead = 1 if block.members is None else 2
        with torch.enable_grad():
            y_in = y if y.requires_grad else y.detach().requires_grad_()
            fy = block.F(y_in)
            for _ in range(probes):
                eps = _rademacher(y, generator)
                row = torch.autograd.grad(fy, y_in, eps, create_graph=True)[0]  # eps^T J
                total = total + per_sample_norm(row, lead).pow(2).mean(dim=-1)
    return total / (probes * len(blocks))


def _rademacher(like: torch.Tensor, generator) -> torch.Tensor:
    """Entries +-1 with equal probability, shaped like ``like``; ``generator`` may be one per
    member of an ensemble (``like`` of shape ``(E, B, dim)``)."""
    if isinstance(generator, Sequence):
        require(len(generator) == like.shape[0],
                f"generator must be one generator or one per member ({like.shape[0]}), "
                f"got {len(generator)}")
        return torch.stack([_rademacher(member, g) for member, g in zip(like, generator)])
    return 2 * (noise(like.shape, like, generator, uniform=True) < 0.5).to(like.dtype) - 1
