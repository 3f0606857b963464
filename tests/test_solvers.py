"""The solvers on their own: linear solvers on dense systems, registries, memory, determinism."""

import pytest
import torch
from conftest import DT, random_tanh

import irn
from irn import solvers as S


def dense_vjp(jt):
    """vjp(u) = J^T u for a batch of dense matrices ``jt = J^T`` of shape (B, n, n)."""
    return lambda u: (jt @ u.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("name", ["neumann", "gmres", "direct"])
def test_linear_solvers_on_dense_systems(rng, name):
    batch, n = 6, 7
    jt = torch.randn(batch, n, n, generator=rng, dtype=DT)
    jt = 0.6 * jt / torch.linalg.matrix_norm(jt, ord=2).reshape(batch, 1, 1)  # Neumann converges
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    v, info = S.LINEAR_SOLVERS[name](dense_vjp(jt), b, tol=1e-12, max_iters=500)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - jt, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(v, exact, atol=1e-10, rtol=0)
    assert info.converged


def test_gmres_converges_in_at_most_n_steps_where_neumann_diverges(rng):
    """GMRES needs no contraction: with ||J|| > 1 it still solves in <= n Arnoldi steps."""
    batch, n = 4, 5
    jt = 2.0 * torch.randn(batch, n, n, generator=rng, dtype=DT)
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    v, info = S.gmres(dense_vjp(jt), b, tol=1e-10, max_iters=50)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - jt, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(v, exact, atol=1e-8, rtol=1e-8)
    assert info.iterations <= n
    _, info_neumann = S.neumann(dense_vjp(jt), b, tol=1e-10, max_iters=50)
    assert not info_neumann.converged


def test_gmres_restarts_and_happy_breakdown(rng):
    """J = 0 for half the batch (exact after one step) and a restart shorter than n."""
    batch, n = 4, 12
    jt = 0.3 * torch.randn(batch, n, n, generator=rng, dtype=DT) / n ** 0.5
    jt[:2] = 0
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    v, info = S.gmres(dense_vjp(jt), b, tol=1e-12, max_iters=100, restart=3)
    exact = torch.linalg.solve(torch.eye(n, dtype=DT) - jt, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(v, exact, atol=1e-10, rtol=0)
    assert torch.isfinite(v).all()


def test_lin_max_iters_is_a_hard_cap(rng):
    batch, n = 3, 10
    jt = 0.95 * torch.eye(n, dtype=DT).expand(batch, n, n)
    b = torch.randn(batch, n, generator=rng, dtype=DT)
    for name in ("neumann", "gmres"):
        _, info = S.LINEAR_SOLVERS[name](dense_vjp(jt + 0.01 * torch.randn(batch, n, n, generator=rng, dtype=DT)),
                                         b, tol=1e-14, max_iters=4)
        assert info.iterations <= 4


def test_direct_on_a_singular_system_raises_solver_error_naming_the_block():
    """F = y with h theta = 1: I - h theta J^T = 0, the backward has no solution."""
    block = irn.ImplicitResidualBlock(torch.nn.Identity(), 1.0, 1.0, backward="direct",
                                      max_iters=2, on_nonconvergence="ignore")
    x = torch.ones(2, 2, dtype=DT, requires_grad=True)
    with pytest.raises(irn.SolverError, match="block: backward solve failed.*singular"):
        block(x).sum().backward()


def test_registries_are_consistent():
    assert set(S.FORWARD_SOLVERS) == set(S.SOLVER_OPTIONS) == {
        "fixed_point", "gradient_descent", "nonlinear_cg", "anderson"}
    from irn.backward import BACKWARDS

    assert set(S.LINEAR_SOLVERS) < set(BACKWARDS)
    assert set(BACKWARDS) == {"neumann", "gmres", "direct", "unrolled", "jacobian_free"}
    assert {n for n, b in BACKWARDS.items() if b.twice_differentiable} == {
        "neumann", "direct", "unrolled"}


def test_a_forward_solver_declares_a_check_for_each_option():
    with pytest.raises(TypeError, match="each option needs a check"):
        @S.forward_solver("broken")
        def broken(g, y0, *, tol, max_iters, differentiable=False, record=None, active=None,
                   damping=0.5):
            return y0, None
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
