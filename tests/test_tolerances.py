"""Stopping rules with ``atol`` and ``rtol`` (irn.config.Stopping, docs/design.md section 2):
each sample's ``||R_b|| <= atol + rtol ||y_b||`` forward, ``||r_b|| <= lin_atol max(1, max_b
||g_b||) + lin_rtol ||g_b||`` backward; an explicit ``tol`` keeps section 1's absolute rule;
lower precisions get a relative default; the compiled path computes what the generic one
does."""

import warnings

import pytest
import torch

import irn
from irn import compiled
from irn.config import DEFAULT_RTOL_EPS, MIN_RTOL_EPS
from irn.functions import Perceptron

F64, F32 = torch.float64, torch.float32
needs_numba = pytest.mark.skipif(compiled.kernels() is None, reason="numba is not installed")


def _fixed_point_counts(F, x, h, theta, atol, rtol, cap=500):
    """An independent reading of the rule: plain fixed-point iteration on ``(B, d)``, the
    number of residuals evaluated until every sample meets ``atol + rtol ||y_b||``."""
    explicit = x + h * (1 - theta) * F(x)
    y = x
    for k in range(1, cap + 1):
        g = explicit + h * theta * F(y)
        if bool(((y - g).norm(dim=1) <= atol + rtol * y.norm(dim=1)).all()):
            return k
        y = g
    raise AssertionError("did not converge")


@pytest.mark.parametrize("atol, rtol", [(1e-12, 1e-6), (1e-3, 0.0), (0.0, 1e-8)])
def test_the_forward_stops_where_every_sample_meets_atol_plus_rtol_times_its_norm(atol, rtol):
    torch.manual_seed(0)
    F = Perceptron(4, "tanh").double()
    block = irn.ImplicitResidualBlock(F, 0.8, 0.75, atol=atol, rtol=rtol, max_iters=500)
    x = 20 * torch.randn(7, 4, dtype=F64)  # states far from 1: the relative part matters
    with torch.no_grad():
        block(x)
        expected = _fixed_point_counts(F, x, 0.8, 0.75, atol, rtol)
    stats = block.last_stats
    assert stats.iterations == expected and stats.converged
    # the reported residual is the absolute max_b ||R_b|| either way
    assert stats.residual > 0 and (rtol == 0) == (stats.residual <= atol)


def test_an_explicit_tol_keeps_the_absolute_rule_and_its_numbers():
    torch.manual_seed(1)
    F = Perceptron(4, "tanh").double()
    x = 20 * torch.randn(7, 4, dtype=F64)
    outputs = {}
    for settings in ({"tol": 1e-6}, {}, {"atol": 1e-6, "rtol": 0.0}):
        block = irn.ImplicitResidualBlock(F, 0.8, 0.75, **settings)
        outputs[str(settings)] = (block(x), block.last_stats)
    (first, s1), *rest = outputs.values()
    for out, stats in rest:  # float64's default is tol = 1e-6: bit for bit the same solve
        assert torch.equal(out, first) and stats == s1
    assert s1.iterations == _fixed_point_counts(F, x, 0.8, 0.75, 1e-6, 0.0)


def test_float32_gets_a_relative_default_that_a_fresh_network_meets():
    # the case: |y| ~ 40 in float32, where 1e-6 absolute is below the rounding of y
    torch.manual_seed(0)
    net = irn.ImplicitResNet(8, 10, h=0.5, theta=0.5)
    x = 10 * torch.randn(256, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", irn.ConvergenceWarning)
        net(x).sum().backward()
    assert all(b.last_stats.converged and b.backward_converged for b in net.blocks)
    assert max(b.last_stats.iterations for b in net.blocks) < 50
    assert max(b.last_stats.residual for b in net.blocks) > 1e-6  # the absolute rule fails
    rules = net.blocks[0].config.stopping(F32)
    assert rules.rtol == DEFAULT_RTOL_EPS * torch.finfo(F32).eps and rules.atol == 1e-6
    assert net.blocks[0].config.stopping(F64).rtol == 0.0


def test_a_tol_below_float32s_resolution_warns_that_it_is():
    torch.manual_seed(0)
    net = irn.ImplicitResNet(8, 3, h=0.5, theta=0.5, tol=1e-12, max_iters=40)
    with pytest.warns(irn.ConvergenceWarning, match="below what the precision resolves"):
        net(10 * torch.randn(64, 8))
    with pytest.warns(irn.ConvergenceWarning) as caught:  # not where the solver is the cause
        irn.ImplicitResNet(8, 3, h=0.5, theta=0.5, tol=1e-12, max_iters=2).double()(
            10 * torch.randn(64, 8, dtype=F64))
    assert not any("resolves" in str(w.message) for w in caught)


def test_an_rtol_below_the_dtypes_resolution_is_an_error_at_the_first_call():
    eps32 = torch.finfo(F32).eps
    net = irn.ImplicitResNet(3, 2, theta=0.5, rtol=eps32)  # fine for float64
    net.double()(torch.randn(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"rtol=.* below what torch.float32 resolves"):
        net.float()(torch.randn(4, 3))
    irn.ImplicitResNet(3, 2, theta=0.5, rtol=MIN_RTOL_EPS * eps32)(torch.randn(4, 3))


@pytest.mark.parametrize("settings, match", [
    ({"tol": 1e-6, "atol": 1e-6}, "not both"), ({"tol": 1e-6, "rtol": 1e-3}, "not both"),
    ({"atol": -1.0}, "atol must be"), ({"rtol": float("nan")}, "rtol must be"),
    ({"atol": 0.0, "rtol": 0.0}, "cannot both be 0")])
def test_bad_tolerances_are_errors_at_construction(settings, match):
    with pytest.raises(ValueError, match=match):
        irn.ImplicitResidualBlock(torch.nn.Identity(), **settings)


def test_with_settings_switches_between_the_absolute_and_the_relative_rule():
    block = irn.ImplicitResidualBlock(torch.nn.Identity(), tol=1e-5)
    relative = block.with_settings(rtol=1e-4)
    assert (relative.config.tol, relative.config.rtol, relative.tol) == (None, 1e-4, 1e-6)
    assert block.with_settings(atol=1e-3).tol == 1e-3
    assert relative.with_settings(tol=1e-7).config.rtol is None
    assert "atol=default, rtol=0.0001" in repr(relative)


@pytest.mark.parametrize("backward", ["neumann", "gmres", "direct"])
def test_the_backward_rule_is_relative_to_each_samples_gradient(backward):
    torch.manual_seed(2)
    F = Perceptron(3, "tanh").double()
    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    weights = torch.logspace(-6, 3, 5, dtype=F64)[:, None]  # gradients of very different sizes
    lin_rtol = 1e-6
    block = irn.ImplicitResidualBlock(F, 0.9, 1.0, backward=backward, atol=1e-12, rtol=lin_rtol,
                                      max_iters=300)
    (block(x) * weights).sum().backward()
    stats = block.last_stats
    assert block.backward_converged
    # an independent check of the rule at the returned adjoint: solve for v exactly
    with torch.no_grad():
        y_star = x + 0.9 * F(x)
        for _ in range(300):
            y_star = x + 0.9 * F(y_star)
    J = torch.func.vmap(torch.func.jacrev(F))(y_star)  # (B, d, d)
    g = weights.expand(5, 3)
    exact = torch.linalg.solve(torch.eye(3, dtype=F64) - 0.9 * J.transpose(1, 2), g.unsqueeze(-1))
    # dL/dx = v + 0 (theta = 1): its error against the exact adjoint is within the rule
    error = (x.grad - exact.squeeze(-1)).norm(dim=1)
    bound = (1e-12 * max(1.0, float(g.norm(dim=1).max())) + lin_rtol * g.norm(dim=1))
    assert bool((error <= 50 * bound).all())  # residual -> error: a factor of ||(I - J^T)^-1||
    if backward == "neumann":  # the absolute rule alone would have gone on
        assert stats.backward_residual > 1e-12 * float(g.norm(dim=1).max())


@needs_numba
@pytest.mark.parametrize("members, solver, backward, dtype", [
    (None, "fixed_point", "neumann", F64), (None, "anderson", "direct", F64),
    ([(0.5, 0.5), (0.25, 1.0), (0.5, 0.0), (1.0, 0.75)], "fixed_point", "direct", F64),
    ([(0.5, 0.5), (0.9, 1.0)], "anderson", "neumann", F64), (None, "fixed_point", "neumann", F32)])
def test_the_compiled_path_applies_the_same_rules(members, solver, backward, dtype):
    from tests.test_compiled import assert_same, network, run

    settings = {} if dtype == F32 else {"atol": 1e-12, "rtol": 1e-7}
    net = network(0.9, 1.0, "tanh", members=members, dtype=dtype, solver=solver,
                  backward=backward, max_iters=200, **settings)
    y0 = 30 * torch.randn(*((len(members),) if members else ()), 6, 3, dtype=dtype,
                          generator=torch.Generator().manual_seed(1))
    assert compiled.reason(net, y0) is None
    got, reference = run(net, y0), run(net.with_settings(backend="torch"), y0)
    if dtype == F64:
        assert_same(got, reference)
    else:  # float32: the same rule, rounding apart
        for layer, layer_t in zip(got[3], reference[3]):
            for s, t in zip(layer, layer_t):
                assert s.converged and t.converged and abs(s.iterations - t.iterations) <= 1
    assert any(s.residual > 1e-9 for layer in got[3] for s in layer)  # the relative part ran


@needs_numba
def test_a_relative_layer_does_not_leak_its_threshold_into_the_next_one():
    """An absolute Anderson layer after a relative one: the compiled forward resets each
    layer's relative part (it once kept the previous layer's, and Anderson stepped plainly)."""
    from tests.test_compiled import assert_same, run

    torch.manual_seed(0)
    blocks = [irn.ImplicitResidualBlock(Perceptron(3, "tanh"), 1.0, 1.0, atol=1e-12, rtol=0.5,
                                        on_nonconvergence="ignore"),
              irn.ImplicitResidualBlock(Perceptron(3, "tanh"), 1.0, 1.0, solver="anderson",
                                        tol=1e-10, max_iters=200, on_nonconvergence="ignore")]
    net = irn.ImplicitResNet.from_blocks(blocks, 3).double()
    with torch.no_grad():
        for block in net.blocks:
            block.F.linear.weight.mul_(3)
    y0 = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert compiled.reason(net.with_settings(backend="compiled"), y0) is None
    got = run(net.with_settings(backend="compiled"), y0)
    assert_same(got, run(net.with_settings(backend="torch"), y0))
    assert got[3][1][0].converged


def test_autocast_leaves_float64_iterates_their_own_rule():
    torch.manual_seed(0)
    block = irn.ImplicitResidualBlock(Perceptron(4, "tanh"), 0.9, 1.0).double()
    x = torch.randn(8, 4, dtype=F64)
    plain = block(x)
    stats = block.last_stats
    with torch.autocast("cpu", dtype=torch.bfloat16):  # casts float32 only: F runs in float64
        under = block(x)
    assert block.last_stats == stats and torch.equal(under, plain)


def test_a_rule_no_solve_can_meet_is_an_error_naming_the_block():
    net = irn.ImplicitResNet(3, 2, theta=0.5, atol=0.0)  # float64's default rtol is 0
    with pytest.raises(ValueError, match=r"block 0: atol=0 with rtol=0 in torch.float64"):
        net.double()(torch.randn(4, 3, dtype=F64))
    net.float()(torch.randn(4, 3))  # float32's default rtol makes it a rule
