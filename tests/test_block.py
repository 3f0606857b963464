"""ImplicitResidualBlock: forward solutions, gradients, statistics, policies, errors."""

import inspect
import warnings

import pytest
import torch
from conftest import DT, Linear, linear_solution, newton_solution, random_tanh
from torch import nn

import irn

SOLVER_CASES = [("fixed_point", None), ("gradient_descent", None), ("anderson", None),
                ("nonlinear_cg", {"variant": "polak_ribiere"}),
                ("nonlinear_cg", {"variant": "fletcher_reeves"}), ("broyden", {}),
                ("broyden", {"memory": 2})]
IMPLICIT_BACKWARDS = ["neumann", "gmres", "direct"]


def linear_problem(rng, dim=3, batch=5, scale=0.4):
    weight = torch.randn(dim, dim, generator=rng, dtype=DT) * scale
    bias = torch.randn(dim, generator=rng, dtype=DT)
    x = torch.randn(batch, dim, generator=rng, dtype=DT)
    return weight, bias, x


# ------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("solver,options", SOLVER_CASES)
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_linear_closed_form_every_solver(rng, solver, options, theta):
    """For linear F the block has the closed form (I - h theta W) y = (I + h(1-theta) W) x + h b."""
    weight, bias, x = linear_problem(rng)
    h = 0.8
    block = irn.ImplicitResidualBlock(Linear(weight, bias), h, theta, solver=solver,
                                      solver_options=options, tol=1e-10, max_iters=500)
    y = block(x)
    assert block.last_stats.converged and block.last_stats.residual <= 1e-10
    assert 1 <= block.last_stats.iterations <= 500
    torch.testing.assert_close(y, linear_solution(weight, bias, x, h, theta), atol=1e-9, rtol=0)


def test_nonlinear_cg_is_finite_termination_on_quadratics(rng):
    """On a linear problem phi is quadratic: CG with exact line search ends in <= dim + 1 steps."""
    weight, bias, x = linear_problem(rng, dim=4)
    block = irn.ImplicitResidualBlock(Linear(weight, bias), 1.0, 1.0, solver="nonlinear_cg",
                                      tol=1e-10, max_iters=100)
    block(x)
    assert block.last_stats.iterations <= 4 + 1


@pytest.mark.parametrize("solver,options", SOLVER_CASES)
def test_nonlinear_solution_matches_newton(rng, solver, options):
    F = random_tanh(4, rng, scale=1.0)
    x = torch.randn(6, 4, generator=rng, dtype=DT)
    block = irn.ImplicitResidualBlock(F, 0.9, 0.75, solver=solver, solver_options=options,
                                      tol=1e-11, max_iters=1000)
    y = block(x)
    torch.testing.assert_close(y, newton_solution(F, x, 0.9, 0.75), atol=1e-10, rtol=0)


def test_theta_zero_is_the_explicit_resnet_step(rng):
    F = random_tanh(3, rng)
    x = torch.randn(4, 3, generator=rng, dtype=DT)
    block = irn.ImplicitResidualBlock(F, 0.3, 0.0)
    assert torch.equal(block(x), x + 0.3 * F(x))  # bit for bit
    assert block.last_stats == irn.SolveStats(iterations=0, residual=0.0, converged=True,
                                              backward_iterations=None, backward_residual=None)


def test_first_fixed_point_iterate_is_the_explicit_step(rng):
    """y^0 = x, so with one map application the output is x + h F(x) and the residual is that of x."""
    F = random_tanh(3, rng)
    x = torch.randn(4, 3, generator=rng, dtype=DT)
    block = irn.ImplicitResidualBlock(F, 0.5, 0.5, max_iters=1, on_nonconvergence="ignore")
    y = block(x)
    torch.testing.assert_close(y, x + 0.5 * F(x), atol=1e-15, rtol=0)
    stats = block.last_stats
    assert stats.iterations == 1 and not stats.converged
    expected = torch.linalg.vector_norm(0.5 * F(x), dim=1).max().item()
    assert stats.residual == pytest.approx(expected, rel=1e-12)


def test_any_batch_first_shape(rng):
    """F acting on (B, C, H, W): the block works on any batch-first shape."""
    conv = nn.Conv2d(2, 2, 3, padding=1, dtype=DT)
    with torch.no_grad():
        conv.weight.mul_(0.3)
    x = torch.randn(3, 2, 5, 5, generator=rng, dtype=DT)
    block = irn.ImplicitResidualBlock(nn.Sequential(conv, nn.Tanh()), 0.5, 0.5, tol=1e-10)
    y = block(x)
    assert y.shape == x.shape
    residual = y - x - 0.5 * (0.5 * block.F(x) + 0.5 * block.F(y))
    assert residual.abs().max() < 1e-9


def test_float32_and_no_grad(rng):
    F = random_tanh(3, rng).float()
    x = torch.randn(4, 3, generator=rng).float()
    block = irn.ImplicitResidualBlock(F, 0.5, 0.5, tol=1e-5)
    with torch.no_grad():
        y = block(x)
    assert y.dtype == torch.float32 and not y.requires_grad
    assert block.last_stats.converged


# ----------------------------------------------------------------------------- gradients

def ift_reference_gradients(F, x, h, theta, g):
    """dL/dx and dL/dparams of L = <g, y*(x, params)> from the implicit function theorem with
    dense Jacobians (torch.autograd.functional.jacobian), y* from an independent Newton solve."""
    y = newton_solution(F, x, h, theta)
    names, params = zip(*F.named_parameters())

    def step(xx, yy, *ps):  # x + h((1-theta)F(x) + theta F(y)) as a function of everything
        values = {n: p for n, p in zip(names, ps)}
        call = lambda z: torch.func.functional_call(F, values, (z,))
        return xx + h * ((1 - theta) * call(xx) + theta * call(yy))

    jac = torch.autograd.functional.jacobian(step, (x, y) + tuple(p.detach() for p in params))
    n = x.numel()
    a = torch.eye(n, dtype=DT) - jac[1].reshape(n, n)          # I - d step / d y
    v = torch.linalg.solve(a.T, g.reshape(n))                  # adjoint solve
    grads = [v @ j.reshape(n, -1) for j in (jac[0],) + tuple(jac[2:])]
    return grads[0].reshape(x.shape), [gr.reshape(p.shape) for gr, p in zip(grads[1:], params)]


@pytest.mark.parametrize("backward", IMPLICIT_BACKWARDS + ["unrolled"])
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_gradients_match_implicit_function_theorem(rng, backward, theta):
    F = random_tanh(3, rng, scale=1.2)
    x = torch.randn(4, 3, generator=rng, dtype=DT)
    g = torch.randn(4, 3, generator=rng, dtype=DT)
    h = 0.9
    ref_x, ref_params = ift_reference_gradients(F, x, h, theta, g)
    block = irn.ImplicitResidualBlock(F, h, theta, backward=backward, tol=1e-13, max_iters=500)
    xg = x.clone().requires_grad_()
    (block(xg) * g).sum().backward()
    torch.testing.assert_close(xg.grad, ref_x, atol=1e-10, rtol=1e-9)
    for p, ref in zip(F.parameters(), ref_params):
        torch.testing.assert_close(p.grad, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("solver,options", SOLVER_CASES)
def test_unrolled_gradient_through_every_solver(rng, solver, options):
    """Autograd through converged iterations of any solver gives the implicit gradient (the
    first iterate is x itself: only the path through F(y) may count in the solver's steps)."""
    F = random_tanh(3, rng, scale=1.2)
    x = torch.randn(4, 3, generator=rng, dtype=DT)
    g = torch.randn(4, 3, generator=rng, dtype=DT)
    ref_x, ref_params = ift_reference_gradients(F, x, 0.8, 0.6, g)
    block = irn.ImplicitResidualBlock(F, 0.8, 0.6, solver=solver, solver_options=options,
                                      backward="unrolled", tol=1e-12, max_iters=1000)
    xg = x.clone().requires_grad_()
    y = block(xg)
    (y * g).sum().backward()
    torch.testing.assert_close(xg.grad, ref_x, atol=1e-9, rtol=1e-8)
    for p, ref in zip(F.parameters(), ref_params):
        torch.testing.assert_close(p.grad, ref, atol=1e-9, rtol=1e-8)
    # building the graph must not change the iterates: same iterations, same output
    plain = irn.ImplicitResidualBlock(F, 0.8, 0.6, solver=solver, solver_options=options,
                                      tol=1e-12, max_iters=1000)
    torch.testing.assert_close(plain(x), y.detach(), atol=1e-14, rtol=0)
    assert plain.last_stats.iterations == block.last_stats.iterations


@pytest.mark.parametrize("backward", IMPLICIT_BACKWARDS + ["unrolled"])
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_gradcheck(rng, backward, solver):
    """Finite differences of the whole block (input and weights) against its backward."""
    F = random_tanh(3, rng, scale=1.0)
    x = torch.randn(2, 3, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, 0.7, 0.6, solver=solver, backward=backward,
                                      tol=1e-13, max_iters=500)
    weight, bias = F.weight, F.bias

    def fn(xx, w, b):
        return torch.func.functional_call(block, {"F.weight": w, "F.bias": b}, (xx,))

    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_jacobian_free_drops_the_inverse(rng):
    """jacobian_free uses v = g: dL/dx = g + h(1-theta) J_F(x)^T g, not the exact gradient."""
    F = random_tanh(3, rng, scale=1.0)
    x = torch.randn(4, 3, generator=rng, dtype=DT, requires_grad=True)
    g = torch.randn(4, 3, generator=rng, dtype=DT)
    h, theta = 0.8, 0.5
    block = irn.ImplicitResidualBlock(F, h, theta, backward="jacobian_free", tol=1e-12)
    (block(x) * g).sum().backward()
    _, vjp = torch.func.vjp(F, x.detach())
    torch.testing.assert_close(x.grad, g + h * (1 - theta) * vjp(g)[0], atol=1e-12, rtol=0)
    exact, _ = ift_reference_gradients(F, x.detach(), h, theta, g)
    assert (x.grad - exact).abs().max() > 1e-3


def test_theta_zero_gradients_are_those_of_the_explicit_step(rng):
    F = random_tanh(3, rng)
    x = torch.randn(4, 3, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, 0.3, 0.0)
    block(x).pow(2).sum().backward()
    grad_block = x.grad.clone()
    x.grad = None
    (x + 0.3 * F(x)).pow(2).sum().backward()
    assert torch.equal(grad_block, x.grad)


# ---------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("backward,expect_iters", [("neumann", None), ("gmres", None),
                                                   ("direct", 0), ("unrolled", 0),
                                                   ("jacobian_free", 0)])
def test_backward_stats(rng, backward, expect_iters):
    F = random_tanh(3, rng, scale=1.0)
    x = torch.randn(4, 3, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, 0.8, 0.5, backward=backward, tol=1e-10)
    y = block(x)
    assert block.last_stats.backward_iterations is None
    assert block.last_stats.backward_residual is None
    y.sum().backward()
    stats = block.last_stats
    if expect_iters is None:
        assert 1 <= stats.backward_iterations <= block.lin_max_iters
        assert stats.backward_residual <= 1e-10 * max(1.0, 3 ** 0.5)
    else:
        assert stats.backward_iterations == expect_iters
        assert stats.backward_residual <= 1e-10


def test_backward_completes_the_stats_of_its_own_forward(rng):
    F = random_tanh(3, rng)
    x = torch.randn(4, 3, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, 0.8, 0.5, tol=1e-10)
    y = block(x)
    first = block.last_stats
    block(x.detach() * 2)  # a second forward (e.g. a validation pass) before the backward
    second = block.last_stats
    y.sum().backward()
    assert first.backward_iterations >= 1 and second.backward_iterations is None


def test_neumann_iterations_follow_the_contraction_rate(rng):
    """Linear F = c I: the Neumann residual is (h theta c)^k ||g||, so the iteration count is known."""
    c, h, theta, tol = 0.5, 1.0, 1.0, 1e-8
    F = Linear(c * torch.eye(2, dtype=DT))
    x = torch.randn(3, 2, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, h, theta, tol=tol, max_iters=200)
    g = torch.randn(3, 2, generator=rng, dtype=DT)
    (block(x) * g).sum().backward()
    q, gmax = h * theta * c, torch.linalg.vector_norm(g, dim=1).max().item()
    # residual after k iterations is q^k max||g||; stop at the first k with q^k gmax <= tol max(1, gmax)
    k = 1
    while q ** k * gmax > tol * max(1.0, gmax):
        k += 1
    assert block.last_stats.backward_iterations == k
    # and the gradient is the exact one: dL/dx = (1 + h(1-theta)c) / (1 - h theta c) g
    torch.testing.assert_close(x.grad, g / (1 - q), atol=1e-7, rtol=0)


def test_forward_iterations_follow_the_contraction_rate(rng):
    """Linear F = c I with fixed_point: ||R(y^k)|| = q^k ||R(x)||, q = h theta c."""
    c, h, theta, tol = 0.5, 1.0, 0.8, 1e-9
    F = Linear(c * torch.eye(2, dtype=DT))
    x = torch.randn(3, 2, generator=rng, dtype=DT)
    block = irn.ImplicitResidualBlock(F, h, theta, tol=tol, max_iters=200)
    block(x)
    q, r0 = h * theta * c, (h * c * torch.linalg.vector_norm(x, dim=1)).max().item()
    k = 0
    while q ** k * r0 > tol:
        k += 1
    assert block.last_stats.iterations == k + 1  # residual of y^k needs the (k+1)-th map application
    assert block.last_stats.residual == pytest.approx(q ** k * r0, rel=1e-9)


def test_keep_iterates_records_fixed_point_differences(rng):
    F = random_tanh(3, rng, scale=1.0)
    x = torch.randn(5, 3, generator=rng, dtype=DT)
    h, theta = 0.8, 0.7
    block = irn.ImplicitResidualBlock(F, h, theta, tol=1e-8)
    block(x)
    assert block.iterate_residuals is None
    block.keep_iterates = True
    block(x)
    r = block.iterate_residuals
    assert len(r) == block.last_stats.iterations
    ys = [x]  # independent fixed-point iteration
    for _ in range(len(r)):
        ys.append(x + h * ((1 - theta) * F(x) + theta * F(ys[-1])))
    for k, rk in enumerate(r):
        expected = torch.linalg.vector_norm(ys[k + 1] - ys[k], dim=1).mean()
        torch.testing.assert_close(rk, expected, atol=1e-13, rtol=0)
        assert rk.requires_grad


# ------------------------------------------------------------------------------ policies

def diverging_block(policy, c=2.5, **kw):
    """F = c I with h theta = 1: the fixed-point map expands for c > 1, contracts slowly for c < 1."""
    kw.setdefault("max_iters", 3)
    return irn.ImplicitResidualBlock(Linear(c * torch.eye(2, dtype=DT)), 1.0, 1.0,
                                     on_nonconvergence=policy, **kw)


def test_nonconvergence_warns_naming_block_iterations_residual():
    net = irn.ImplicitResNet(2, 3, h=1.0, theta=1.0, max_iters=2, activation="identity")
    with torch.no_grad():
        net.blocks[2].F.linear.weight.copy_(3 * torch.eye(2))
    x = torch.ones(1, 2)
    with pytest.warns(irn.ConvergenceWarning) as record:
        net(x)
    messages = [str(w.message) for w in record]
    assert any("block 2" in m and "2 iterations" in m and "residual" in m for m in messages)
    assert issubclass(irn.ConvergenceWarning, UserWarning)


def test_nonconvergence_raise_and_ignore():
    x = torch.ones(2, 2, dtype=DT)
    with pytest.raises(irn.SolverError, match="block.*3 iterations.*residual"):
        diverging_block("raise")(x)
    assert issubclass(irn.SolverError, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block = diverging_block("ignore")
        block(x)
    assert not block.last_stats.converged and block.last_stats.iterations == 3


def test_backward_nonconvergence_policy():
    x = torch.ones(2, 2, dtype=DT, requires_grad=True)
    block = diverging_block("warn", c=0.5, lin_max_iters=2, max_iters=100)
    with pytest.warns(irn.ConvergenceWarning, match="backward"):
        block(x).sum().backward()
    assert block.last_stats.backward_iterations == 2
    block = diverging_block("raise", c=0.5, lin_max_iters=2, max_iters=100)
    with pytest.raises(irn.SolverError, match="backward"):
        block(x).sum().backward()


class NaNAfter(nn.Module):
    """Finite for the first ``n`` calls, NaN afterwards."""

    def __init__(self, n, value=float("nan")):
        super().__init__()
        self.n, self.calls, self.value = n, 0, value

    def forward(self, y):
        self.calls += 1
        return 0.1 * y if self.calls <= self.n else torch.full_like(y, self.value)


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_raises_naming_block_and_iteration(policy, value):
    net = irn.ImplicitResNet(2, 2, h=1.0, theta=0.5, on_nonconvergence=policy)
    net.blocks[1].F = NaNAfter(1, value)  # F(x) = F(y^0) finite (evaluated once), then non-finite
    with pytest.raises(irn.SolverError, match=r"block 1.*iteration 2"):
        net(torch.ones(3, 2))


@pytest.mark.parametrize("solver", ["gradient_descent", "nonlinear_cg", "anderson"])
def test_nan_raises_for_every_solver(solver):
    block = irn.ImplicitResidualBlock(NaNAfter(0), 1.0, 0.5, solver=solver)
    with pytest.raises(irn.SolverError, match="iteration 1"):
        block(torch.ones(2, 2))


# ------------------------------------------------------------------------ bad arguments

BAD_ARGUMENTS = [
    (dict(theta=-0.1), "theta"), (dict(theta=1.5), "theta"), (dict(h=0.0), "h"),
    (dict(h=-1.0), "h"), (dict(tol=0.0), "tol"), (dict(tol=-1e-3), "tol"),
    (dict(max_iters=0), "max_iters"), (dict(solver="newton"), "solver"),
    (dict(backward="adjoint"), "backward"), (dict(on_nonconvergence="panic"), "on_nonconvergence"),
    (dict(lin_tol=0.0), "lin_tol"), (dict(lin_max_iters=0), "lin_max_iters"),
    (dict(solver_options={"step_size": 0.1}), "step_size"),
    (dict(solver="anderson", solver_options={"memroy": 3}), "memroy"),
    (dict(solver="nonlinear_cg", solver_options={"variant": "hestenes"}), "variant"),
    # option values, bools, infinities and strings are refused when the setting is given
    (dict(solver="gradient_descent", solver_options={"step_size": 0}), "step_size"),
    (dict(solver="gradient_descent", solver_options={"step_size": float("nan")}), "step_size"),
    (dict(solver="anderson", solver_options={"memory": 0}), "memory"),
    (dict(solver="anderson", solver_options={"memory": True}), "memory"),
    (dict(solver="anderson", solver_options={"memory": 2.5}), "memory"),
    (dict(solver="anderson", solver_options={"regularization": -1e-3}), "regularization"),
    (dict(solver_options="anderson"), "solver_options"),
    (dict(max_iters=True), "max_iters"), (dict(lin_max_iters=False), "lin_max_iters"),
    (dict(max_iters=10.0), "max_iters"),
    (dict(h=float("inf")), "h"), (dict(h=float("nan")), "h"), (dict(h="1"), "h"),
    (dict(h=True), "h"), (dict(theta="0.5"), "theta"), (dict(tol=float("inf")), "tol"),
    (dict(lin_tol="1e-6"), "lin_tol"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        irn.ImplicitResidualBlock(nn.Identity(), **kwargs)


def test_unknown_name_error_lists_allowed_values():
    with pytest.raises(ValueError, match="fixed_point.*gradient_descent.*nonlinear_cg.*anderson"):
        irn.ImplicitResidualBlock(nn.Identity(), solver="newton")
    with pytest.raises(ValueError, match="neumann.*gmres.*direct.*unrolled.*jacobian_free"):
        irn.ImplicitResidualBlock(nn.Identity(), backward="x")


@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_shape_changing_F_is_rejected_at_first_call(theta):
    block = irn.ImplicitResidualBlock(nn.Linear(3, 2), theta=theta)
    with pytest.raises(ValueError, match="shape"):
        block(torch.ones(4, 3))


def test_valid_solver_options_are_accepted(rng):
    weight, bias, x = linear_problem(rng)
    for solver, options in [("gradient_descent", {"step_size": 0.7}),
                            ("anderson", {"memory": 3, "regularization": 1e-6})]:
        block = irn.ImplicitResidualBlock(Linear(weight, bias), 0.5, 0.5, solver=solver,
                                          solver_options=options, tol=1e-9, max_iters=300)
        torch.testing.assert_close(block(x), linear_solution(weight, bias, x, 0.5, 0.5),
                                   atol=1e-8, rtol=0)


def test_block_exposes_F():
    F = nn.Identity()
    assert irn.ImplicitResidualBlock(F).F is F
    assert irn.ImplicitResidualBlock(F).keep_iterates is False


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.calls = nn.Linear(3, 3).double(), 0

    def forward(self, y):
        self.calls += 1
        return torch.tanh(self.linear(y))


@pytest.mark.parametrize("grad", [False, True])
def test_forward_evaluates_F_once_per_iteration(grad):
    # F(x) serves both the explicit term and the first iterate y^0 = x, and the solver's
    # last evaluation, at y*, serves the output: k iterations cost k evaluations of F
    torch.manual_seed(0)
    F = Counting()
    block = irn.ImplicitResidualBlock(F, 0.5, 0.5, tol=1e-10)
    x = torch.randn(4, 3, dtype=DT, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = block(x)
    assert block.last_stats.iterations > 3
    assert F.calls == block.last_stats.iterations
    # the output is still one more application of the map at y*
    with torch.no_grad():
        explicit = torch.add(x, F(x), alpha=0.25)
        y_star = irn.solvers.solve(("fixed_point",), {},
                                   lambda y: torch.add(explicit, F(y[0]), alpha=0.25)[None],
                                   x[None], tol=1e-10, max_iters=50, active=[True])[0][0]
        torch.testing.assert_close(out, torch.add(explicit, F(y_star), alpha=0.25),
                                   rtol=0, atol=1e-14)


@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_an_empty_batch_gives_an_empty_output(theta):
    block = irn.ImplicitResidualBlock(nn.Linear(3, 3).double(), 0.5, theta)
    x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    y = block(x)
    assert y.shape == (0, 3) and block.last_stats == irn.SolveStats(0, 0.0, True)
    y.sum().backward()
    assert x.grad.shape == (0, 3)
    ens = irn.ImplicitResNet.stack([irn.ImplicitResNet(3, 2, 0.5, theta).double()] * 2)
    assert ens(torch.zeros(2, 0, 3, dtype=torch.float64)).shape == (2, 0, 3)


def test_second_derivatives_through_unrolled_match_finite_differences():
    """backward='unrolled' is differentiable twice (gradient penalties, Hessian-vector
    products): torch's gradgradcheck against float64 finite differences of the gradient."""
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    block = irn.ImplicitResidualBlock(F, 0.3, 0.5, backward="unrolled", tol=1e-30, max_iters=30,
                                      on_nonconvergence="ignore")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: block(t), (x,), eps=1e-6, atol=1e-5)
    # and the Hessian-vector product of a scalar loss equals the one of the plain iteration
    plain = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(block(x).tanh().sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad(g.square().sum(), x)
    y = plain
    explicit = plain + 0.3 * 0.5 * F(plain)
    for _ in range(30):
        y = explicit + 0.3 * 0.5 * F(y)
    (g_plain,) = torch.autograd.grad(y.tanh().sum(), plain, create_graph=True)
    (hv_plain,) = torch.autograd.grad(g_plain.square().sum(), plain)
    torch.testing.assert_close(hv, hv_plain, rtol=1e-10, atol=1e-12)


def residual_functions():
    """A generic module (autograd products) and the library's Perceptron (its own ones)."""
    torch.manual_seed(0)
    return {"sequential": nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(),
            "perceptron": irn.functions.Perceptron(3, "tanh").double()}


def second_order(block, x):
    """A gradient penalty's derivatives: ``d/d(x, w) ||d tanh(block(x)).sum() / dx||^2``, and
    the parameters' gradient of the parameter gradient's norm (meta-learning's shape)."""
    params = list(block.F.parameters())
    (g,) = torch.autograd.grad(block(x).tanh().sum(), x, create_graph=True)
    penalty = torch.autograd.grad(g.square().sum(), [x, *params])
    grads = torch.autograd.grad(block(x).tanh().sum(), params, create_graph=True)
    meta = torch.autograd.grad(sum(w.square().sum() for w in grads), [x, *params])
    return penalty + meta


@pytest.mark.parametrize("backward", ["neumann", "direct"])
@pytest.mark.parametrize("kind", ["sequential", "perceptron"])
def test_second_derivatives_through_an_implicit_backward(backward, kind):
    """create_graph=True through neumann and direct: torch's gradgradcheck (float64 finite
    differences of the gradient), and the Hessian-vector products of a gradient penalty and of
    a parameter-gradient penalty equal those of backward='unrolled' run to convergence."""
    F = residual_functions()[kind]
    block = irn.ImplicitResidualBlock(F, 0.3, 0.5, backward=backward, tol=1e-13, max_iters=200)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: block(t), (x,), eps=1e-6, atol=1e-6)
    implicit = second_order(block, x)
    assert block.last_stats.backward_iterations is not None  # the first backward's statistics
    unrolled = second_order(block.with_settings(backward="unrolled"), x)
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        assert b.abs().max() > 1e-3  # the comparison is not between zeros


def test_second_derivatives_of_an_ensemble_equal_its_members():
    torch.manual_seed(0)
    nets = [irn.ImplicitResNet(3, 2, 0.4, theta, activation="tanh", tol=1e-13, max_iters=200,
                               backward="direct").double() for theta in (0.0, 0.5, 1.0)]
    ens = irn.ImplicitResNet.stack(nets)
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)

    def penalty_gradient(net, inputs):
        (g,) = torch.autograd.grad(net(inputs).tanh().sum(), inputs, create_graph=True)
        return torch.autograd.grad(g.square().sum(), inputs)[0]

    stacked = penalty_gradient(ens, x)
    for e, net in enumerate(nets):
        solo = penalty_gradient(net, x[e].detach().clone().requires_grad_())
        torch.testing.assert_close(stacked[e], solo, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", ["gmres", "jacobian_free"])
def test_second_derivatives_through_other_backwards_name_the_alternatives(backward):
    block = irn.ImplicitResidualBlock(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(), 0.3,
                                      0.5, backward=backward)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError,
                       match=f"block.*backward='{backward}'.*'neumann', 'direct' or 'unrolled'"):
        torch.autograd.grad(block(x).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(block(x).sum(), x)  # first derivatives as before
    assert g.shape == x.shape


def test_the_adjoint_solve_returns_its_statistics_and_the_block_records_them():
    """The backward hands its statistics back (the strategy's ``adjoint`` returns them, the stats
    of the forward it belongs to are completed in one place), including for an earlier forward."""
    torch.manual_seed(0)
    block = irn.ImplicitResidualBlock(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(), 0.3)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    first = block(x)
    first_stats = block.last_stats
    block(2 * x)  # a later forward: the first one's backward must not touch its stats
    latest = block.last_stats
    y_star = torch.randn(1, 4, 3, dtype=torch.float64)  # the member layout: one member
    adjoint = block._adjoint(block.config.stopping(torch.float64))
    v, grads, info = adjoint.backward.adjoint(adjoint, y_star, torch.ones(1, 4, 3, dtype=torch.float64),
                                              0.15, create_graph=False)
    assert first_stats.backward_iterations is None and latest.backward_iterations is None
    (iterations,), (residual,), (converged,) = info.iterations, info.residual, info.converged
    assert iterations > 0 and residual <= block.lin_tol and converged
    assert v.shape == (1, 4, 3) and len(grads) == 2
    first.sum().backward()
    assert first_stats.backward_iterations > 0 and latest.backward_iterations is None
    assert block.backward_converged is None  # of the latest forward, which had no backward


@pytest.mark.parametrize("transform", ["vmap", "jvp", "grad"])
def test_torch_func_transforms_raise_one_clear_error(transform):
    from torch import func

    block = irn.ImplicitResidualBlock(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(), 0.3)
    x = torch.randn(4, 3, dtype=torch.float64)
    call = {"vmap": lambda: func.vmap(block)(x.unsqueeze(1)),
            "jvp": lambda: func.jvp(block, (x,), (torch.ones_like(x),)),
            "grad": lambda: func.grad(lambda t: block(t).sum())(x)}[transform]
    with pytest.raises(NotImplementedError, match="torch.func transforms.*ImplicitResNet.stack"):
        call()


SOLVE_SETTINGS = [(k, v) for k, v in BAD_ARGUMENTS if "h" not in k and "theta" not in k]


@pytest.mark.parametrize("kwargs,name", SOLVE_SETTINGS)
def test_the_settings_object_checks_every_field_itself(kwargs, name):
    with pytest.raises(ValueError, match=name):
        irn.SolveConfig(**kwargs)


def test_a_block_holds_one_frozen_settings_object_and_with_settings_replaces_fields():
    import dataclasses

    block = irn.ImplicitResidualBlock(nn.Identity(), 0.5, 0.25, solver="anderson",
                                      solver_options={"memory": 3}, tol=1e-7, backward="gmres")
    config = block.config
    assert config == irn.SolveConfig(solver="anderson", backward="gmres", tol=1e-7,
                                     solver_options={"memory": 3})
    assert config.lin_tol is None and config.lin_max_iters == 50  # follows tol; from max_iters
    assert block.lin_tol == 1e-7  # the backward rule's absolute part: the forward's
    assert block.settings == dataclasses.asdict(config)
    assert (block.solver, block.tol, block.solver_options) == ("anderson", 1e-7, {"memory": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tol = 1.0
    changed = block.with_settings(tol=1e-5, theta=0.5)
    assert changed.config == dataclasses.replace(config, tol=1e-5, lin_tol=None)  # lin_tol follows
    assert changed.theta == 0.5 and changed.h == 0.5 and changed.F is block.F
    # options belong to a solver: dropped when the solver changes, unless given again
    assert block.with_settings(solver="fixed_point").config.solver_options == {}
    assert block.with_settings(solver="anderson", solver_options={"memory": 2}
                               ).solver_options == {"memory": 2}
    with pytest.raises(ValueError, match="max_iters"):
        block.with_settings(max_iters=0)


def test_solver_options_are_read_from_each_solvers_signature():
    from irn import solvers

    assert solvers.SOLVER_OPTIONS == {"fixed_point": (), "gradient_descent": ("step_size",),
                                      "nonlinear_cg": ("variant",),
                                      "anderson": ("memory", "regularization"),
                                      "broyden": ("memory",)}
    for name, solver in solvers.FORWARD_SOLVERS.items():  # the driver passes the rest itself
        parameters = list(inspect.signature(solver.__init__).parameters)
        assert parameters[:3] == ["self", "g", "differentiable"], name


def test_with_settings_lets_a_default_lin_tol_follow_a_changed_tol():
    block = irn.ImplicitResidualBlock(nn.Linear(2, 2), 0.5, tol=1e-6, max_iters=50)
    changed = block.with_settings(tol=1e-9, max_iters=80)
    assert (changed.lin_tol, changed.lin_max_iters) == (1e-9, 80)
    own = irn.ImplicitResidualBlock(nn.Linear(2, 2), 0.5, tol=1e-6, lin_tol=1e-4, lin_max_iters=7)
    kept = own.with_settings(tol=1e-9, max_iters=80)
    assert (kept.lin_tol, kept.lin_max_iters) == (1e-4, 7)  # set on purpose: kept


def test_a_replaced_config_takes_effect_in_the_backward_and_its_policy():
    """``block.config`` replaced after a forward: the backward uses the new ``lin_tol`` and
    backward, and the new non-convergence policy applies (the adjoint was keyed by the
    block's name only, the record's policy fixed at construction)."""
    import dataclasses

    torch.manual_seed(0)
    block = irn.ImplicitResidualBlock(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(), 0.9,
                                      1.0, lin_tol=1e-2)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    block(x).sum().backward()
    loose = block.last_stats.backward_iterations
    block.config = dataclasses.replace(block.config, lin_tol=1e-12)
    block(x).sum().backward()
    assert block.last_stats.backward_iterations > loose
    assert block.last_stats.backward_residual <= 1e-12 * max(1.0, 3 ** 0.5)
    block.config = dataclasses.replace(block.config, backward="direct")
    block(x).sum().backward()
    assert block.last_stats.backward_iterations == 0
    block.config = dataclasses.replace(block.config, max_iters=1, on_nonconvergence="raise")
    with pytest.raises(irn.SolverError, match="block: forward solve did not converge"):
        block(x)
    with pytest.raises(ValueError, match="config must be an irn.SolveConfig"):
        block.config = {"tol": 1e-3}


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_convergence_warnings_point_at_the_callers_line(backend):
    """Forward warnings at the line that called the network (or the block), backward warnings
    at the line that called ``backward()``: not at torch's module code or irn's own."""
    import inspect
    import warnings

    torch.manual_seed(0)
    net = irn.ImplicitResNet(3, 2, 0.9, 1.0, max_iters=2, backend=backend).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        y = net(x)
        y.sum().backward()
        net.blocks[0](x)
    forward, backward, block = ([w for w in caught if what in str(w.message)]
                                for what in ("block 1: forward", "block 1: backward",
                                             "block 0: forward"))
    assert [(w.filename, w.lineno) for w in forward + backward + block[1:]] == \
        [(__file__, line), (__file__, line + 1), (__file__, line + 2)]


def test_one_network_block_lifts_its_F_and_follows_a_replaced_F():
    """Inside, one network is an ensemble of one: the user's F still sees its own layout
    ``(B, *)``, and a replaced F is the one the next call uses."""
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    seen = []
    F.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    block = irn.ImplicitResidualBlock(F, 0.5, 0.5)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    block(x).sum().backward()
    assert set(seen) == {(4, 3)}
    zero = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    nn.init.zeros_(zero[0].weight), nn.init.zeros_(zero[0].bias)
    block.F = zero
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_reassigned_h_and_theta_take_effect_after_a_first_call(backend):
    torch.manual_seed(0)
    net = irn.ImplicitResNet(2, 2, 0.5, 0.5, backend=backend).double()
    x = torch.randn(3, 2, dtype=DT)
    net(x)
    for block in net.blocks:
        block.h, block.theta = 1.0, 0.0
    explicit = x
    for block in net.blocks:
        explicit = explicit + 1.0 * block.F(explicit)
    torch.testing.assert_close(net(x), explicit, rtol=0, atol=1e-15)
    assert [block.last_stats.iterations for block in net.blocks] == [0, 0]


def test_a_networks_blocks_run_their_hooks_and_a_deleted_block_is_freed_at_once():
    import gc
    import weakref

    net = irn.ImplicitResNet(2, 2, 0.5, 0.5, backend="torch").double()
    seen = []
    net.blocks[1].register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    net(torch.randn(3, 2, dtype=DT))
    assert seen == [(3, 2)]
    block = irn.ImplicitResidualBlock(nn.Sequential(nn.Linear(2, 2), nn.Tanh()).double(), 0.5)
    block(torch.randn(3, 2, dtype=DT, requires_grad=True)).sum().backward()
    alive = weakref.ref(block)
    gc.disable()
    try:
        del block
        assert alive() is None  # no reference cycle through the lifted F or the adjoint
    finally:
        gc.enable()
