"""Shared helpers: small residual functions with known Jacobians, and independent references."""

import os

import pytest
import torch
from torch import nn

import tolerant_nbval

DT = torch.float64


class Linear(nn.Module):
    """``F(y) = y W^T + b`` (no activation): the block equation is linear with a closed form."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype)
                                 if bias is None else bias.clone())

    def forward(self, y):
        return y @ self.weight.T + self.bias


class TanhLayer(nn.Module):
    """``F(y) = tanh(y W^T + b)``: a nonlinear residual function."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, y):
        return torch.tanh(y @ self.weight.T + self.bias)


def linear_solution(weight, bias, x, h, theta):
    """Exact block output for ``F(y) = W y + b``:
    ``(I - h theta W) y = (I + h(1-theta) W) x + h b``."""
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)
    rhs = (eye + h * (1 - theta) * weight) @ x.T + h * bias[:, None]
    return torch.linalg.solve(eye - h * theta * weight, rhs).T


def newton_solution(F, x, h, theta, iters=50):
    """Block solution by Newton's method with dense per-sample Jacobians (independent of irn)."""
    y = x.clone()
    with torch.no_grad():
        for _ in range(iters):
            for b in range(x.shape[0]):
                def residual(z):
                    return z - x[b] - h * ((1 - theta) * F(x[b:b + 1])[0] + theta * F(z[None])[0])
                jac = torch.autograd.functional.jacobian(residual, y[b])
                y[b] = y[b] - torch.linalg.solve(jac, residual(y[b]))
    return y


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def random_tanh(dim, rng, scale=0.5):
    w = torch.randn(dim, dim, generator=rng, dtype=DT) * scale / dim ** 0.5
    b = torch.randn(dim, generator=rng, dtype=DT) * 0.1
    return TanhLayer(w, b)


@pytest.fixture(autouse=True)
def seed_global_rng():
    """Every test starts from the same global RNG state (model initialisations draw from it)."""
    torch.manual_seed(0)


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: one torch thread each (the parallel
    compiled kernels are tested where a test sets more). nbval compares the numbers of checked notebook cells within their declared tolerances
    (tests/tolerant_nbval.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    if config.pluginmanager.hasplugin("nbval"):
        tolerant_nbval.install()
