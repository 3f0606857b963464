"""The forward solvers of the implicit block, each a state and a step under one driver
(:mod:`irn.driver`, docs/design.md, section 2).

Every solver finds a fixed point ``y = g(y)`` of a map acting on states ``(E, B, *)``, from
``y^0 = x``; for the theta-block ``g(y) = x + h(1-theta) F(x) + h theta F(y)``. One iteration
evaluates the residual of the current iterate (one application of ``g`` for ``fixed_point``);
the driver stops per member and freezes the members that stopped. The registry and the
driver are re-exported here: ``irn.solvers.forward_solver`` registers a new solver,
``irn.solvers.FORWARD_SOLVERS`` lists them, ``irn.solvers.solve`` runs one.
"""

from __future__ import annotations

import torch

from ._checks import integer
from .driver import (FORWARD_SOLVERS, SOLVER_OPTIONS, ForwardSolver, OneOf,  # noqa: F401
                     batch_dot, forward_solver, non_negative, option_values, positive, solve, vjp)

Tensor = torch.Tensor


@forward_solver("fixed_point")
class FixedPoint(ForwardSolver):
    """Picard iteration ``y^{k+1} = g(y^k)`` (paper section 2.1; its eq. 8 is the equivalent
    minimisation problem that ``gradient_descent`` and ``nonlinear_cg`` solve), i.e.
    ``y^{k+1} = x + h(1-theta) F(x) + h theta F(y^k)`` for the theta-block."""

    def residual(self, y):
        self.gy = self.g(y)
        return y - self.gy

    def step(self, y, residual, monitor):
        return self.gy


class _OnPhi(ForwardSolver):
    """Solvers that minimise ``phi(y) = 1/2 ||R(y)||^2``: the residual comes with the gradient
    ``grad phi = R - J_g(y)^T R`` (one vector-Jacobian product)."""

    def value_and_gradient(self, y):
        with torch.enable_grad():
            # a fresh node for y: the gradient must not follow other paths from y's ancestors
            # (the first iterate is x itself, on which g also depends through x + h(1-theta)F(x))
            y_in = (y.view_as(y) if self.differentiable and y.requires_grad
                    else y.detach().requires_grad_())
            gy = self.g(y_in)
            residual = y_in - gy
            jtr = vjp(gy, y_in, residual, create_graph=self.differentiable)
        if not self.differentiable:
            residual = residual.detach()
        return residual, residual - jtr

    def residual(self, y):
        residual, self.grad = self.value_and_gradient(y)
        return residual


@forward_solver("gradient_descent", step_size=positive)
class GradientDescent(_OnPhi):
    """Fixed-step gradient descent on ``phi(y) = 1/2 ||R(y)||^2``:
    ``y^{k+1} = y^k - step_size * (R - h theta J_F(y^k)^T R)``."""

    def __init__(self, g, differentiable=False, *, step_size=0.5):
        super().__init__(g, differentiable)
        self.step_size = step_size

    def step(self, y, residual, monitor):
        return y - self.step_size * self.grad


@forward_solver("nonlinear_cg", variant=OneOf("polak_ribiere", "fletcher_reeves"))
class NonlinearCG(_OnPhi):
    """Nonlinear conjugate gradients on ``phi(y) = 1/2 ||R(y)||^2``, per sample.

    Direction ``d^{k+1} = -grad^{k+1} + beta_k d^k`` with Fletcher-Reeves
    ``beta = |grad^{k+1}|^2 / |grad^k|^2`` or Polak-Ribiere+
    ``beta = max(0, <grad^{k+1}, grad^{k+1} - grad^k> / |grad^k|^2)``; restart with steepest
    descent when ``d`` is not a descent direction. Step length by one secant step on the
    directional derivative, ``alpha = -s phi'(0) / (phi'(s) - phi'(0))`` with trial step
    ``s = 1``, which is exact when ``F`` is linear (``phi`` quadratic).
    """

    def __init__(self, g, differentiable=False, *, variant="polak_ribiere"):
        super().__init__(g, differentiable)
        self.variant = variant
        self.grad_old = self.direction = None

    def step(self, y, residual, monitor):
        grad = self.grad
        if self.direction is None:
            direction = -grad
        else:
            grad_old = self.grad_old
            denom = batch_dot(grad_old, grad_old)
            numer = batch_dot(grad, grad - grad_old if self.variant == "polak_ribiere" else grad)
            beta = torch.where(denom > 0, numer / torch.where(denom > 0, denom, 1), 0).clamp_min(0)
            direction = -grad + beta * self.direction
            descent = batch_dot(grad, direction) < 0
            direction = torch.where(descent, direction, -grad)
        slope0 = batch_dot(grad, direction)
        _, grad_trial = self.value_and_gradient(y + direction)
        curvature = batch_dot(grad_trial, direction) - slope0
        # secant step; where the curvature is not positive fall back to the trial step s = 1
        good = curvature > 0
        alpha = torch.where(good, -slope0 / torch.where(good, curvature, 1), 1.0)
        self.direction, self.grad_old = direction, grad
        return y + alpha * direction


@forward_solver("anderson", memory=integer, regularization=non_negative)
class Anderson(ForwardSolver):
    """Anderson acceleration of ``y = g(y)`` with window ``m = memory``:
    ``y^{k+1} = sum_i a_i g(y^{k-i})``, where ``a`` minimises ``||sum_i a_i R(y^{k-i})||^2
    + regularization * min_i ||R(y^{k-i})||^2 * ||a||^2`` subject to ``sum_i a_i = 1``
    (per sample; the Tikhonov weight is relative, so the method is scale-invariant). With
    ``M = Gram + ridge I`` (symmetric positive definite) the minimiser is
    ``a = M^{-1} 1 / (1^T M^{-1} 1)``, one Cholesky solve per iteration."""

    def __init__(self, g, differentiable=False, *, memory=5, regularization=1e-4):
        super().__init__(g, differentiable)
        self.memory, self.regularization = memory, regularization
        self.residuals, self.values = [], []  # the window, flattened per sample: (E B, D) each

    def residual(self, y):
        self.gy = self.g(y)
        return self.gy - y

    def step(self, y, residual, monitor):
        gy, memory = self.gy, self.memory
        batch = y.shape[:2].numel()  # samples (of every member), each mixed on its own
        self.residuals = (self.residuals + [residual.reshape(batch, -1)])[-memory:]
        self.values = (self.values + [gy.reshape(batch, -1)])[-memory:]
        n = len(self.values)
        if n == 1:
            return gy
        res = torch.stack(self.residuals, dim=1)  # (E B, n, D)
        gram = res @ res.transpose(1, 2)          # (E B, n, n)
        # Tikhonov term relative to the smallest squared residual in the window: scale-invariant,
        # so it does not swamp the system once the residuals are small (floored, so that a
        # sample whose residuals are exactly zero keeps a solvable system)
        scale = gram.diagonal(dim1=1, dim2=2).amin(dim=1)
        ridge = (self.regularization * scale).clamp_min(torch.finfo(y.dtype).tiny ** 0.5)
        gram = gram + ridge.reshape(batch, 1, 1) * torch.eye(n, dtype=y.dtype, device=y.device)
        factor, failed = torch.linalg.cholesky_ex(gram)
        weights = torch.cholesky_solve(torch.ones_like(gram[:, :, :1]), factor)  # (E B, n, 1)
        weights = weights / weights.sum(dim=1, keepdim=True)
        mixed = (weights.transpose(1, 2) @ torch.stack(self.values, dim=1)).reshape(y.shape)
        # samples already within their tolerance (their window is numerically rank-deficient) and any
        # system the factorisation rejects take the plain fixed-point step instead
        norms = monitor.norms
        plain = (monitor.within().reshape(-1) | (failed != 0)).reshape(norms.shape)
        return torch.where(plain.reshape(plain.shape + (1,) * (y.dim() - 2)), gy, mixed)


@forward_solver("broyden", memory=integer)
class Broyden(ForwardSolver):
    """Limited-memory ("good") Broyden method for ``r(y) = g(y) - y = 0``, per sample.

    An approximate inverse Jacobian ``H ~ (dr/dy)^{-1}``, starting at ``H_0 = -I`` (exact
    when ``h theta F = 0``, so the first step is the fixed-point step), gives the step
    ``y^{k+1} = y^k - H r(y^k)``; after it ``H`` takes the rank-one update
    ``H += (dy - H dr) (dy^T H) / (dy^T H dr)`` (Sherman-Morrison form of Broyden's first
    method; ``dy``, ``dr`` the changes of ``y`` and ``r``), skipped where ``dy^T H dr`` vanishes.
    ``H = -I + sum_i u_i v_i^T`` keeps its last ``memory`` updates. On a linear ``g`` it
    converges in at most ``2 n`` steps for ``n`` unknowns per sample, where fixed-point
    iteration needs ``h theta J_F`` to contract."""

    def __init__(self, g, differentiable=False, *, memory=30):
        super().__init__(g, differentiable)
        self.memory = memory
        self.us = self.vs = None  # (E B, m, D): the updates u_i and v_i, per sample
        self.previous = None      # (y, r) of the previous iterate

    def times_h(self, x, transpose=False):
        """``H x`` (or ``H^T x``) for ``x`` of shape ``(E B, D)``."""
        if self.us is None:
            return -x
        left, right = (self.vs, self.us) if transpose else (self.us, self.vs)
        return -x + (left.transpose(1, 2) @ (right @ x.unsqueeze(-1))).squeeze(-1)

    def residual(self, y):
        r = self.g(y) - y
        if self.previous is not None:  # the update from the step that led here
            self.update(y, r)
        self.previous = (y, r)
        return r

    def update(self, y, r):
        y_old, r_old = self.previous
        batch = y.shape[:2].numel()
        dy, dr = (y - y_old).reshape(batch, -1), (r - r_old).reshape(batch, -1)
        h_dr, v = self.times_h(dr), self.times_h(dy, transpose=True)
        denom = (v * dr).sum(dim=-1, keepdim=True)  # dy^T H dr
        usable = denom.abs() > torch.finfo(y.dtype).eps * (dy.norm(dim=-1, keepdim=True)
                                                            * h_dr.norm(dim=-1, keepdim=True))
        u = torch.where(usable, (dy - h_dr) / torch.where(usable, denom, 1), 0)
        v = torch.where(usable, v, 0)  # a frozen member (dy = 0) or a degenerate step: no update
        memory = self.memory
        self.us = u.unsqueeze(1) if self.us is None else torch.cat([self.us, u.unsqueeze(1)], 1)[:, -memory:]
        self.vs = v.unsqueeze(1) if self.vs is None else torch.cat([self.vs, v.unsqueeze(1)], 1)[:, -memory:]

    def step(self, y, residual, monitor):
        batch = y.shape[:2].numel()
        return y - self.times_h(residual.reshape(batch, -1)).reshape(y.shape)
