"""irn.solve_summary: the latest solves of any module's implicit blocks in one record."""

import pytest
import torch
from torch import nn

import irn
from irn.functions import Perceptron


def _blocks(count=3, **settings):
    torch.manual_seed(0)
    return [irn.ImplicitResidualBlock(Perceptron(3, "tanh"), 0.5, 0.5, **settings).double()
            for _ in range(count)]


def test_a_users_sequential_of_blocks_forward_then_backward():
    model = nn.Sequential(nn.Linear(3, 3), *_blocks(), nn.Linear(3, 1)).double()
    with pytest.raises(ValueError, match="no forward has run yet"):
        irn.solve_summary(model)
    model(torch.randn(8, 3, dtype=torch.float64)).sum().backward()
    summary = irn.solve_summary(model)
    blocks = [m for m in model if isinstance(m, irn.ImplicitResidualBlock)]
    assert summary.iterations == [b.last_stats.iterations for b in blocks]
    assert summary.residual == max(b.last_stats.residual for b in blocks)
    assert summary.converged is True and summary.backward_converged is True
    assert summary.backward_iterations == [b.last_stats.backward_iterations for b in blocks]
    assert summary.path is None  # no ImplicitResNet ran them
    model(torch.randn(8, 3, dtype=torch.float64))  # a new forward: its backward has not run
    assert irn.solve_summary(model).backward_converged is None


def test_one_unconverged_block_makes_the_record_unconverged():
    blocks = _blocks(max_iters=1, on_nonconvergence="ignore")[:1] + _blocks(2)
    model = nn.Sequential(*blocks)
    model(torch.randn(8, 3, dtype=torch.float64))
    summary = irn.solve_summary(model)
    assert summary.converged is False and summary.iterations[0] == 1


def test_an_ensemble_reports_per_member_and_an_explicit_member_counts_as_converged():
    nets = [irn.ImplicitResNet(3, 2, h=h, theta=theta, init="random", backend="torch",
                               max_iters=12, on_nonconvergence="ignore").double()
            for h, theta in ((0.5, 0.0), (0.5, 0.5), (5.0, 1.0))]
    ens = irn.ImplicitModel(nn.Identity(), irn.ImplicitResNet.stack(nets), nn.Identity())
    with torch.no_grad():  # member 2 (h theta = 5 on a scaled-up weight) cannot contract
        for block in ens.net.blocks:
            block.F.weight[2] *= 3
    ens(torch.randn(3, 5, 3, dtype=torch.float64)).sum().backward()
    summary = irn.solve_summary(ens)
    assert summary.converged == [True, True, False]
    assert summary.backward_converged[:2] == [None, True]  # member 0 is explicit: no solve
    first = summary.iterations[0]  # block 0, one count per member
    assert first[0] == 0 and 1 < first[1] < 12 and first[2] == 12
    assert summary.path == "torch" and summary.reason == "backend='torch'"


def test_an_explicit_network_has_no_backward_solve_to_report():
    net = irn.ImplicitResNet(3, 2, theta=0.0)
    net(torch.randn(4, 3)).sum().backward()
    summary = irn.solve_summary(net)
    assert summary.converged is True and summary.backward_converged is None
    assert summary.iterations == [0, 0]


def test_r_stab_needs_a_network_and_says_so():
    blocks = nn.Sequential(*_blocks(2))
    with pytest.raises(ValueError, match="net must be an irn.ImplicitResNet"):
        irn.regularizers.perturbation(blocks, torch.randn(4, 3, dtype=torch.float64), 0.1, 1.0, 2)


def test_a_module_without_blocks_is_an_error():
    with pytest.raises(ValueError, match="holds no irn.ImplicitResidualBlock"):
        irn.solve_summary(nn.Linear(2, 2))


class _Members(nn.Module):
    """A user's residual function on the member layout ``(E, B, d)``: one weight per member."""

    def __init__(self, members, dim):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(members, dim, dim, dtype=torch.float64))

    def forward(self, y):
        return torch.tanh(y @ self.weight)


def test_a_network_and_an_ensemble_of_ones_own_blocks():
    torch.manual_seed(1)
    own = [irn.ImplicitResidualBlock(nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(), 0.5, 0.5)
           for _ in range(3)]
    net = irn.ImplicitResNet.from_blocks(own, dim=3)
    y0 = torch.randn(6, 3, dtype=torch.float64)
    assert net.trajectory(y0).shape == (4, 6, 3) and net.members is None
    assert [b.name for b in net.blocks] == ["block 0", "block 1", "block 2"]
    expected = y0
    for block in own:
        expected = block(expected)
    assert torch.equal(net(y0), expected)
    summary = irn.solve_summary(net)
    assert summary.path == "torch" and "Perceptron" in summary.reason
    net.keep_solution = True
    net(y0)
    assert irn.regularizers.jacobian(net).dim() == 0
    assert net.with_settings(max_iters=3).blocks[0].max_iters == 3
    ensemble = irn.ImplicitResNet.from_blocks(
        [irn.ImplicitResidualBlock(_Members(2, 3), [0.5, 0.5], [0.5, 1.0]) for _ in range(2)], 3)
    out = ensemble(torch.randn(2, 6, 3, dtype=torch.float64))
    assert out.shape == (2, 6, 3) and ensemble.members == 2
    assert len(irn.solve_summary(ensemble).converged) == 2


@pytest.mark.parametrize("blocks, dim, match", [
    ([], 3, "non-empty list"), ([nn.Linear(3, 3)], 3, "irn.ImplicitResidualBlock"),
    ([irn.ImplicitResidualBlock(nn.Identity())], 0, "dim must be"),
    ([irn.ImplicitResidualBlock(nn.Identity()),
      irn.ImplicitResidualBlock(nn.Identity(), [1.0, 1.0], [0.5, 0.5])], 3, "mix")])
def test_from_blocks_refuses_what_is_not_a_network(blocks, dim, match):
    with pytest.raises(ValueError, match=match):
        irn.ImplicitResNet.from_blocks(blocks, dim)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_every_solve_names_its_solver_and_its_backwards_convergence(backend):
    from irn import compiled

    if backend == "compiled" and compiled.kernels() is None:
        pytest.skip("numba is not installed")
    nets = [irn.ImplicitResNet(3, 2, h=0.5, theta=theta, init="random", solver="anderson",
                               backend=backend).double() for theta in (0.0, 0.5)]
    ens = irn.ImplicitResNet.stack(nets)
    ens(torch.randn(2, 5, 3, dtype=torch.float64)).sum().backward()
    explicit, implicit = ens.blocks[0].last_stats
    assert (explicit.solver, implicit.solver) == (None, "anderson")  # no fallback needed
    assert explicit.backward_converged is None and implicit.backward_converged is True
    single = irn.ImplicitResNet(3, 2, h=0.5, theta=0.5, init="random", backend=backend).double()
    single(torch.randn(5, 3, dtype=torch.float64))
    assert single.blocks[1].last_stats.solver == "fixed_point"
    assert single.blocks[1].last_stats.backward_converged is None  # no backward yet
