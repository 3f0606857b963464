"""Solving a trained network again with other settings (ImplicitResNet.with_settings) and the
solver comparison of irn.paper.diagnostics."""

import numpy as np
import pytest
import torch
from conftest import DT

import irn
from irn.paper import diagnostics
from irn.paper.examples import function_approximator


def tanh_model(theta=0.5):
    torch.manual_seed(0)
    return function_approximator(4, theta, T=2.0, tol=1e-10, max_iters=300).double()


def test_with_settings_shares_parameters_and_keeps_other_settings():
    net = irn.ImplicitResNet(3, 2, h=0.5, theta=0.5, activation="tanh", init="random",
                             solver="anderson", solver_options={"memory": 3}, tol=1e-9,
                             lin_max_iters=77, on_nonconvergence="raise").double()
    other = net.with_settings(solver="nonlinear_cg")
    for a, b in zip(net.blocks, other.blocks):
        assert a.F is b.F and a.name == b.name
        assert (b.solver, b.solver_options, b.tol, b.lin_max_iters, b.on_nonconvergence, b.h,
                b.theta) == ("nonlinear_cg", {}, 1e-9, 77, "raise", 0.5, 0.5)
    assert [p.data_ptr() for p in other.parameters()] == [p.data_ptr() for p in net.parameters()]
    assert net.blocks[0].solver == "anderson" and net.blocks[0].solver_options == {"memory": 3}
    assert net.with_settings(tol=1e-5).blocks[0].solver_options == {"memory": 3}
    y0 = torch.randn(5, 3, dtype=DT)
    torch.testing.assert_close(other(y0), net(y0), atol=1e-8, rtol=0)
    assert net.with_settings(theta=1.0).blocks[1].theta == 1.0
    with pytest.raises(ValueError, match="solver"):
        net.with_settings(solver="newton")


def test_forward_solvers_agree_on_a_contractive_network():
    model = tanh_model()
    x = torch.linspace(-2, 2, 7, dtype=DT)[:, None]
    table, residuals = diagnostics.compare_forward_solvers(model, x, repeats=2)
    assert list(table.solver) == list(diagnostics.FORWARD_CONFIGS)
    assert (table.converged_layers == 4).all()
    assert table.max_output_difference.max() < 1e-8
    assert table.max_output_difference.iloc[0] == 0
    for name, per_layer in residuals.items():
        row = table.set_index("solver").loc[name]
        assert len(per_layer) == 4 and max(len(r) for r in per_layer) == row.max_iterations
        assert np.mean([len(r) for r in per_layer]) == pytest.approx(row.iterations)
        assert min(r[-1] for r in per_layer) <= 1e-10
    # fixed_point's iterations are those of the block itself
    with torch.no_grad():
        model(x)
    counts = [b.last_stats.iterations for b in model.net.blocks]
    assert table.iterations.iloc[0] == pytest.approx(np.mean(counts))


def test_unconverged_solver_is_measured_against_a_converged_one():
    model = tanh_model(theta=1.0)
    x = torch.linspace(-2, 2, 5, dtype=DT)[:, None]
    configs = {"capped": dict(solver="fixed_point", max_iters=2, on_nonconvergence="ignore"),
               "anderson": dict(solver="anderson")}
    table, _ = diagnostics.compare_forward_solvers(model, x, configs, repeats=1)
    assert table.converged_layers.tolist() == [0, 4]
    assert table.max_output_difference.iloc[1] == 0 and table.max_output_difference.iloc[0] > 1e-4


def test_backward_solvers_give_the_same_gradient():
    model = tanh_model()
    x = torch.linspace(-2, 2, 7, dtype=DT)[:, None]
    y = torch.sin(x)
    table = diagnostics.compare_backward_solvers(model, x, y, ("direct", "neumann", "gmres"),
                                                 repeats=1)
    assert (table.converged_layers == 4).all()
    assert table.max_gradient_difference.max() < 1e-8
    assert table.set_index("backward").iterations["neumann"] > 1
    assert all(p.grad is None for p in model.parameters())


def test_the_compared_solvers_are_read_from_the_registry():
    from irn import solvers

    configs = diagnostics.solver_configs()
    assert {c["solver"] for c in configs.values()} == set(solvers.FORWARD_SOLVERS)
    assert configs["nonlinear_cg (FR)"] == dict(solver="nonlinear_cg",
                                                solver_options={"variant": "fletcher_reeves"})

    from irn import driver

    @solvers.forward_solver("damped", damping=driver.positive)
    class Damped(solvers.FixedPoint):
        def __init__(self, g, differentiable=False, *, damping=0.5):
            super().__init__(g, differentiable)
    try:
        assert diagnostics.solver_configs()["damped"] == dict(solver="damped")  # one decorator
    finally:
        for registry in (driver.FORWARD_SOLVERS, driver.SOLVER_OPTIONS, driver.OPTION_CHECKS):
            registry.pop("damped")
