"""The floor any library must beat: a plain, careful implicit block, written the obvious way.

Forward: the fixed-point loop under ``no_grad``. Backward: a custom ``autograd.Function``
whose backward runs the Neumann series with one ``torch.autograd.grad`` call per iteration,
then pushes ``v`` through one step. Same stopping rules as ``irn`` (max over the batch of
per-sample norms), so iteration counts match.
"""

import torch
from torch import nn


class _Neumann(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, y_star, F, scale, tol, max_iters):
        ctx.save_for_backward(y_star)
        ctx.F, ctx.scale, ctx.tol, ctx.max_iters = F, scale, tol, max_iters
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (y_star,) = ctx.saved_tensors
        with torch.enable_grad():
            y = y_star.detach().requires_grad_()
            fy = ctx.F(y)
        threshold = ctx.tol * max(1.0, grad.flatten(1).norm(dim=1).max().item())
        v = grad
        for _ in range(ctx.max_iters):
            (jtv,) = torch.autograd.grad(fy, y, v, retain_graph=True)
            v_next = grad + ctx.scale * jtv
            done = (v_next - v).flatten(1).norm(dim=1).max().item() <= threshold
            v = v_next
            if done:
                break
        return v, None, None, None, None, None


class PlainImplicitBlock(nn.Module):
    """``y = x + h((1-theta)F(x) + theta F(y))``: fixed point forward, Neumann backward."""

    def __init__(self, F, h, theta, tol=1e-6, max_iters=50):
        super().__init__()
        self.F, self.h, self.theta, self.tol, self.max_iters = F, h, theta, tol, max_iters

    def forward(self, x):
        h, theta = self.h, self.theta
        with torch.no_grad():
            explicit = x + h * (1 - theta) * self.F(x)
            y = x
            for _ in range(self.max_iters):
                y_next = explicit + h * theta * self.F(y)
                done = (y_next - y).flatten(1).norm(dim=1).max().item() <= self.tol
                if done:
                    break
                y = y_next
        out = x + h * (1 - theta) * self.F(x) + h * theta * self.F(y)
        return _Neumann.apply(out, y, self.F, h * theta, self.tol, self.max_iters)
