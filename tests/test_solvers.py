"""The solvers on their own: linear solvers on dense systems, registries, memory, determinism."""

import pytest
import torch
from conftest import DT, random_tanh

import irn
from irn import linear
from irn import solvers as S


def dense_vjp(jt):
    """vjp(u) = J^T u for a batch of dense matrices ``jt = J^T`` of shape (B, n, n), acting on
    the member layout (1, B, n) of one network."""
    return lambda u: (jt @ u[0].unsqueeze(-1)).squeeze(-1).unsqueeze(0)


def solve_linear(name, jt, b, **settings):
    """``linear.LINEAR_SOLVERS[name]`` on one network's batch ``b`` (B, n): ``(v, iterations,
    converged)``."""
    v, info = linear.LINEAR_SOLVERS[name](dense_vjp(jt), b.unsqueeze(0), active=[True],
                                           **settings)
    return v[0], info.iterations[0], info.converged[0]


@pytest.mark.parametrize("name", ["neumann", "gmres", "direct"])
def test_linear_solvers_on_dense_systems(rng, name):
    batch, n = 6, 7
    jt = torch.randn(batch, n, n, generator=rng, dtype=DT)
    jt = 0.6 * jt / torch.linalg.matrix_norm(jt, ord=2).reshape(batch, 1, 1)  # Neumann converges
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    v, _, converged = solve_linear(name, jt, b, tol=1e-12, max_iters=500)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - jt, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(v, exact, atol=1e-10, rtol=0)
    assert converged


def test_gmres_converges_in_at_most_n_steps_where_neumann_diverges(rng):
    """GMRES needs no contraction: with ||J|| > 1 it still solves in <= n Arnoldi steps."""
    batch, n = 4, 5
    jt = 2.0 * torch.randn(batch, n, n, generator=rng, dtype=DT)
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    v, iterations, _ = solve_linear("gmres", jt, b, tol=1e-10, max_iters=50)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - jt, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(v, exact, atol=1e-8, rtol=1e-8)
    assert iterations <= n
    _, _, converged = solve_linear("neumann", jt, b, tol=1e-10, max_iters=50)
    assert not converged


def test_gmres_restarts_and_happy_breakdown(rng):
    """J = 0 for half the batch (exact after one step) and a restart shorter than n."""
    batch, n = 4, 12
    jt = 0.3 * torch.randn(batch, n, n, generator=rng, dtype=DT) / n ** 0.5
    jt[:2] = 0
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    v, _, _ = solve_linear("gmres", jt, b, tol=1e-12, max_iters=100, restart=3)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - jt, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(v, exact, atol=1e-10, rtol=0)
    assert torch.isfinite(v).all()


def test_lin_max_iters_is_a_hard_cap(rng):
    batch, n = 3, 10
    jt = 0.95 * torch.eye(n, dtype=DT).expand(batch, n, n)
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    for name in ("neumann", "gmres"):
        _, iterations, _ = solve_linear(
            name, jt + 0.01 * torch.randn(batch, n, n, generator=rng, dtype=DT), b, tol=1e-14,
            max_iters=4)
        assert iterations <= 4


def test_direct_on_a_singular_system_raises_solver_error_naming_the_block():
    """F = y with h theta = 1: I - h theta J^T = 0, the backward has no solution."""
    block = irn.ImplicitResidualBlock(torch.nn.Identity(), 1.0, 1.0, backward="direct",
                                      max_iters=2, on_nonconvergence="ignore")
    x = torch.ones(2, 2, dtype=DT, requires_grad=True)
    with pytest.raises(irn.SolverError, match="block: backward solve failed.*singular"):
        block(x).sum().backward()


def test_registries_are_consistent():
    assert set(S.FORWARD_SOLVERS) == set(S.SOLVER_OPTIONS) == {
        "fixed_point", "gradient_descent", "nonlinear_cg", "anderson", "broyden"}
    from irn.backward import BACKWARDS

    assert set(linear.LINEAR_SOLVERS) < set(BACKWARDS)
    assert set(BACKWARDS) == {"neumann", "gmres", "direct", "unrolled", "jacobian_free"}
    assert {n for n, b in BACKWARDS.items() if b.twice_differentiable} == {
        "neumann", "direct", "unrolled"}


def test_a_forward_solver_declares_a_check_for_each_option():
    with pytest.raises(TypeError, match="each need a check"):
        @S.forward_solver("broken")
        class Broken(S.ForwardSolver):
            def __init__(self, g, differentiable=False, *, damping=0.5):
                super().__init__(g, differentiable)
    assert "broken" not in S.FORWARD_SOLVERS


# --------------------------------------------------------------------------------- memory

def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn()`` builds its graph
    (each storage counted once)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def block_saved_bytes(backward, iterations, rng):
    """Saved bytes of one block forward forced to run exactly ``iterations`` iterations."""
    F = random_tanh(64, rng, scale=0.5)
    x = torch.randn(32, 64, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, 0.5, 0.5, backward=backward, tol=1e-30,
                                      max_iters=iterations, on_nonconvergence="ignore")
    nbytes, out = saved_bytes(lambda: block(x))
    assert block.last_stats.iterations == iterations
    out.sum().backward()  # the graph is usable
    return nbytes


@pytest.mark.parametrize("backward", ["neumann", "gmres", "direct", "jacobian_free"])
def test_implicit_backward_memory_does_not_grow_with_iterations(rng, backward):
    few, many = (block_saved_bytes(backward, k, rng) for k in (5, 40))
    assert few == many
    explicit_bytes, _ = saved_bytes(lambda: irn.ImplicitResidualBlock(
        random_tanh(64, rng), 0.5, 0.0)(torch.randn(32, 64, dtype=DT, requires_grad=True)))
    # x, y* and the graphs of two evaluations of F: about twice the explicit step
    assert many <= 2.5 * explicit_bytes


def test_unrolled_memory_grows_with_iterations(rng):
    few, many = (block_saved_bytes("unrolled", k, rng) for k in (5, 40))
    assert many > 5 * few


def live_bytes_after_forward(solver, backward, iterations, rng):
    """Bytes allocated by one block forward and still allocated after it (the output kept):
    allocations minus frees inside the forward, from torch.profiler's memory records. No
    saved-tensor hook: an identity hook (return the tensor itself) makes every tensor that an
    op saves as its own output (tanh saves its result) a reference cycle through C++ that
    Python's gc cannot free, so under such a hook every grad-enabled evaluation of F inside
    gradient_descent and nonlinear_cg looked like a leak."""
    from torch.profiler import ProfilerActivity, profile

    F = random_tanh(16, rng, scale=0.5)
    x = torch.randn(8, 16, generator=rng, dtype=DT, requires_grad=True)
    block = irn.ImplicitResidualBlock(F, 1.0, 1.0, solver=solver, backward=backward,
                                      tol=1e-30, max_iters=iterations, on_nonconvergence="ignore")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = block(x)
    assert block.last_stats.iterations == iterations
    y.sum().backward()  # the graph is usable
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


@pytest.mark.parametrize("solver", sorted(S.FORWARD_SOLVERS))
def test_no_iterate_stays_alive_after_the_forward_whatever_the_solver(rng, solver):
    few, many = (live_bytes_after_forward(solver, "neumann", k, rng) for k in (3, 30))
    assert few == many


def test_live_bytes_see_the_iterates_that_unrolled_keeps(rng):
    few, many = (live_bytes_after_forward("fixed_point", "unrolled", k, rng) for k in (3, 30))
    assert many > 5 * few


# ---------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_determinism_bitwise(solver):
    def run():
        torch.manual_seed(7)
        net = irn.ImplicitResNet(4, 5, h=0.5, theta=0.5, solver=solver).double()
        y0 = torch.randn(16, 4, dtype=DT)
        out = net(y0)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# ------------------------------------------------------------------ Broyden and fallback

def _expanding_block(solver, dim=4, scale=-1.5, **kwargs):
    """A linear block (h = theta = 1, F(y) = W y + b) whose fixed-point map expands:
    W = scale I + small noise, so fixed-point iteration diverges for |scale| > 1 while
    y* = (I - W)^{-1} (x + b) exists."""
    F = torch.nn.Linear(dim, dim, dtype=torch.float64)
    noise = torch.randn(dim + 1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        F.weight.copy_(scale * torch.eye(dim, dtype=torch.float64) + 0.05 * noise[:dim])
        F.bias.copy_(noise[dim])
    return irn.ImplicitResidualBlock(F, 1.0, 1.0, solver=solver, tol=1e-10, max_iters=30,
                                     on_nonconvergence="ignore", **kwargs), F


def _exact(F, x):
    eye = torch.eye(F.weight.shape[0], dtype=x.dtype)
    return torch.linalg.solve(eye - F.weight, (x + F.bias).T).T


def test_broyden_converges_where_fixed_point_diverges():
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain, _ = _expanding_block("fixed_point")
    plain(x)
    assert not plain.last_stats.converged and plain.last_stats.residual > 1e3
    block, F = _expanding_block("broyden")
    with torch.no_grad():
        y = block(x)
    stats = block.last_stats
    assert stats.converged and stats.iterations <= 2 * 4 + 1   # linear: at most 2n steps
    assert torch.allclose(y, _exact(F, x), atol=1e-9)
    with pytest.raises(ValueError, match="solver_options\\['memory'\\]"):
        irn.ImplicitResidualBlock(F, 1.0, 1.0, solver="broyden", solver_options={"memory": 0})


def test_fallback_tries_the_next_solver_from_the_lowest_residual_point():
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block, F = _expanding_block(("fixed_point", "broyden"))
    with torch.no_grad():
        y = block(x)
    stats = block.last_stats
    assert stats.converged and stats.solver == "broyden"
    assert 30 < stats.iterations <= 30 + 9     # the first solver's 30, then Broyden's
    assert torch.allclose(y, _exact(F, x), atol=1e-9)
    # where the first converges, it finishes
    easy, _ = _expanding_block(("fixed_point", "broyden"), scale=0.3)
    easy(x)
    assert easy.last_stats.converged and easy.last_stats.solver == "fixed_point"


def test_fallback_returns_the_lowest_residual_point_when_every_solver_fails():
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # both diverge from x: the lowest residual evaluated is that of the start, y = x
    block, F = _expanding_block(("fixed_point", "gradient_descent"), scale=-3.0)
    with torch.no_grad():
        y = block(x)
    stats = block.last_stats
    assert not stats.converged and stats.solver == "gradient_descent" and stats.iterations == 60
    # the output is g(y*) = x + F(y*) (h = theta = 1), here with y* = x
    assert torch.equal(y, x + F(x))
    assert stats.residual == pytest.approx(float(F(x).norm(dim=1).max()), rel=1e-12)
    # on_nonconvergence applies once, after the last solver
    strict, _ = _expanding_block(("fixed_point", "gradient_descent"), scale=-3.0)
    strict = strict.with_settings(on_nonconvergence="raise")
    with pytest.raises(irn.SolverError, match="forward solve did not converge in 60 iterations"):
        strict(x)
    rescued = _expanding_block(("fixed_point", "broyden"))[0].with_settings(on_nonconvergence="raise")
    rescued(x)   # the first fails, the second converges: no error


def test_fallback_per_member_of_an_ensemble():
    from irn.models import StackedLinear

    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solos = [_expanding_block(("fixed_point", "broyden"), scale=s)[0] for s in (0.3, -1.5)]
    ensemble = irn.ImplicitResidualBlock(
        StackedLinear([b.F for b in solos]), (1.0, 1.0), (1.0, 1.0), solver=("fixed_point", "broyden"),
        tol=1e-10, max_iters=30, on_nonconvergence="ignore")
    with torch.no_grad():
        out = ensemble(x)
    first, second = ensemble.last_stats
    assert (first.solver, second.solver) == ("fixed_point", "broyden")
    assert first.converged and second.converged and first.iterations < 30 < second.iterations
    for e, block in enumerate(solos):
        with torch.no_grad():
            assert torch.allclose(out[e], block(x[e]), atol=1e-9)
        assert (block.last_stats.iterations, block.last_stats.solver) == \
            (ensemble.last_stats[e].iterations, ensemble.last_stats[e].solver)


def test_fallback_settings_are_checked_at_construction():
    F = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="solver must be one of"):
        irn.ImplicitResidualBlock(F, solver=("fixed_point", "newton"))
    with pytest.raises(ValueError, match="tuple of distinct names"):
        irn.ImplicitResidualBlock(F, solver=("anderson", "anderson"))
    with pytest.raises(ValueError, match="must map some of their names"):
        irn.ImplicitResidualBlock(F, solver=("fixed_point", "anderson"), solver_options={"memory": 3})
    with pytest.raises(ValueError, match="solver_options\\['memory'\\]"):
        irn.ImplicitResidualBlock(F, solver=("fixed_point", "anderson"),
                                  solver_options={"anderson": {"memory": -1}})
    block = irn.ImplicitResidualBlock(F, solver=["fixed_point", "anderson"],
                                      solver_options={"anderson": {"memory": 3}})
    assert block.solver == ("fixed_point", "anderson")
