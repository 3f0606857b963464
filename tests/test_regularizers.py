"""R_fp (eq. 9) and R_stab (eq. 10) on cases computable by hand, and their gradients."""

import pytest
import torch
from conftest import DT

import irn


def scalar_net(c, num_layers=3, h=0.5, theta=1.0, **kw):
    """F_l(y) = c y in every layer (identity activation, W = c I, b = 0)."""
    net = irn.ImplicitResNet(2, num_layers, h, theta, activation="identity", **kw).double()
    with torch.no_grad():
        for block in net.blocks:
            block.F.linear.weight.copy_(c * torch.eye(2, dtype=DT))
            block.F.linear.bias.zero_()
    return net


def test_fixed_point_regularizer_closed_form():
    """F = c I: fixed-point differences r^k = q^k r^0 with q = h theta c and r^0 = mean ||h c y_l||,
    so R_fp = (1/L) sum_l sum_{k=1}^{K-1} relu((q - alpha) q^{k-1} r_l^0)."""
    c, h, theta, alpha, K, L = 0.8, 0.5, 1.0, 0.2, 6, 3
    net = scalar_net(c, L, h, theta, tol=1e-30, max_iters=K, on_nonconvergence="ignore")
    net.keep_iterates = True
    y0 = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=DT)
    states = net.trajectory(y0)
    q = h * theta * c
    expected = 0.0
    for l in range(L):
        r0 = (h * c * torch.linalg.vector_norm(states[l], dim=1)).mean().item()
        expected += sum(max(0.0, (q - alpha) * q ** (k - 1) * r0) for k in range(1, K))
    value = irn.regularizers.fixed_point(net, alpha)
    assert value.item() == pytest.approx(expected / L, rel=1e-12)
    # contraction faster than alpha: nothing to penalise
    assert irn.regularizers.fixed_point(net, 0.9).item() == 0.0


def test_fixed_point_regularizer_gradient_matches_finite_differences():
    """dR_fp/dc through the recorded iterates, against central differences (K fixed). The
    solves stop before convergence, so the layer outputs are differentiated exactly by
    unrolling (the implicit backwards assume a converged y*)."""
    h, theta, alpha, K = 0.5, 1.0, 0.2, 5
    y0 = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=DT)

    def value(c):
        net = scalar_net(c, 2, h, theta, tol=1e-30, max_iters=K, on_nonconvergence="ignore",
                         backward="unrolled")
        net.keep_iterates = True
        net(y0)
        return net, irn.regularizers.fixed_point(net, alpha)

    net, r = value(0.8)
    r.backward()
    analytic = sum(block.F.linear.weight.grad.trace().item() for block in net.blocks)
    eps = 1e-6
    numeric = (value(0.8 + eps)[1].item() - value(0.8 - eps)[1].item()) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_fixed_point_regularizer_needs_recorded_iterates():
    net = scalar_net(0.5)
    with pytest.raises(ValueError, match="keep_iterates"):
        irn.regularizers.fixed_point(net, 0.5)  # no forward yet
    net(torch.ones(1, 2, dtype=DT))
    with pytest.raises(ValueError, match="keep_iterates"):
        irn.regularizers.fixed_point(net, 0.5)  # forward without recording
    net.keep_iterates = True
    net(torch.ones(1, 2, dtype=DT))
    assert irn.regularizers.fixed_point(net, 0.5).item() >= 0
    for alpha in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="alpha"):
            irn.regularizers.fixed_point(net, alpha)


def test_perturbation_regularizer_closed_form():
    """Explicit linear layers y_l = (1 + h c)^l y_0: d_l = (1 + h c)^l d_0, so
    R_stab = (1/(L S)) sum_s sum_l mean_b relu((1 + h c)^{l-1} (1 + h c - beta) d_0^s)."""
    c, h, L, S, sigma, beta = 0.4, 0.5, 4, 3, 0.1, 1.1
    net = scalar_net(c, L, h, theta=0.0)
    y0 = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 1.0]], dtype=DT)
    value = irn.regularizers.perturbation(net, y0, sigma, beta, S,
                                          generator=torch.Generator().manual_seed(5))
    xi = torch.randn((S,) + tuple(y0.shape), generator=torch.Generator().manual_seed(5), dtype=DT)
    d0 = sigma * torch.linalg.vector_norm(xi, dim=2)  # (S, B)
    a = 1 + h * c
    expected = sum(torch.relu(a ** (l - 1) * (a - beta) * d0).mean(dim=1).sum()
                   for l in range(1, L + 1)) / (L * S)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    # damping faster than beta demands: zero
    assert irn.regularizers.perturbation(net, y0, sigma, 2.0, S).item() == 0.0


def test_perturbation_regularizer_returns_the_clean_output_and_is_differentiable():
    torch.manual_seed(3)
    net = irn.ImplicitResNet(3, 4, h=0.5, theta=0.5, activation="tanh", tol=1e-12).double()
    y0 = torch.randn(5, 3, dtype=DT)
    value, out = irn.regularizers.perturbation(net, y0, 0.1, 0.5, 2, return_output=True,
                                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, net(y0), atol=1e-11, rtol=0)

    weight = net.blocks[0].F.linear.weight

    def fn(w):
        with torch.no_grad():
            weight.copy_(w)
        return irn.regularizers.perturbation(net, y0, 0.1, 0.5, 2,
                                             generator=torch.Generator().manual_seed(0))

    base = weight.detach().clone()
    value = fn(base)
    value.backward()
    analytic = weight.grad.clone()
    eps, numeric = 1e-6, torch.zeros_like(base)
    for i in range(3):
        for j in range(3):
            e = torch.zeros_like(base)
            e[i, j] = eps
            numeric[i, j] = (fn(base + e).item() - fn(base - e).item()) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-5)


def test_perturbation_noise_is_fresh_each_call_and_seedable():
    net = scalar_net(0.4, 2, theta=0.0)
    y0 = torch.ones(2, 2, dtype=DT)
    a = irn.regularizers.perturbation(net, y0, 0.1, 0.5, 2)
    b = irn.regularizers.perturbation(net, y0, 0.1, 0.5, 2)
    assert a.item() != b.item()
    g = [torch.Generator().manual_seed(1) for _ in range(2)]
    assert (irn.regularizers.perturbation(net, y0, 0.1, 0.5, 2, generator=g[0]).item()
            == irn.regularizers.perturbation(net, y0, 0.1, 0.5, 2, generator=g[1]).item())


@pytest.mark.parametrize("kwargs,name", [(dict(sigma=-1.0), "sigma"), (dict(beta=0.0), "beta"),
                                         (dict(streams=0), "streams")])
def test_perturbation_bad_arguments(kwargs, name):
    args = dict(sigma=0.1, beta=1.0, streams=2) | kwargs
    with pytest.raises(ValueError, match=name):
        irn.regularizers.perturbation(scalar_net(0.4), torch.ones(1, 2, dtype=DT), **args)


# ---------------------------------------------------------------- Jacobian regulariser

def _tanh_net(dim, backend, seed=0, **kwargs):
    torch.manual_seed(seed)
    return irn.ImplicitResNet(dim, 3, h=0.5, theta=0.5, activation="tanh", tol=1e-13,
                              max_iters=200, backend=backend, **kwargs).to(DT)


def _exact_jacobian_norm(net):
    """(1/L) sum_l mean_b ||J_F_l(y_l)||_F^2 with the Jacobians built column by column."""
    total = 0.0
    for block in net.blocks:
        y = block.solution.detach()
        for sample in y:
            J = torch.autograd.functional.jacobian(block.F, sample.unsqueeze(0)).reshape(len(sample), -1)
            total += float((J ** 2).sum()) / len(y)
    return total / len(net.blocks)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_jacobian_regularizer_is_exact_in_one_dimension_and_unbiased_in_three(backend):
    y0 = torch.randn(4, 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    net = _tanh_net(1, backend)
    net.keep_solution = True
    net(y0)
    # one dimension: eps^2 = 1, so every probe gives ||J||_F^2 exactly
    assert irn.regularizers.jacobian(net).item() == pytest.approx(_exact_jacobian_norm(net), rel=1e-12)
    net = _tanh_net(3, backend)
    net.keep_solution = True
    net(torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(1)))
    exact = _exact_jacobian_norm(net)
    estimates = [irn.regularizers.jacobian(net, probes=1, generator=torch.Generator().manual_seed(s)).item()
                 for s in range(400)]
    spread = torch.tensor(estimates).std().item() / len(estimates) ** 0.5
    assert abs(sum(estimates) / len(estimates) - exact) < 4 * spread   # unbiased, within 4 s.e.
    assert spread < 0.05 * exact


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_jacobian_regularizer_gradient_matches_finite_differences(backend):
    """dR_J/dW through F's parameters and through y*(W) (the implicit backward), fixed probes."""
    y0 = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    net = _tanh_net(3, backend)
    net.keep_solution = True
    weight = net.blocks[1].F.linear.weight

    def value():
        net(y0)
        return irn.regularizers.jacobian(net, probes=2, generator=torch.Generator().manual_seed(5))

    value().backward()
    analytic = weight.grad.clone()
    eps = 1e-6
    for index in [(0, 0), (1, 2), (2, 1)]:
        with torch.no_grad():
            weight[index] += eps
            up = value().item()
            weight[index] -= 2 * eps
            down = value().item()
            weight[index] += eps
        assert analytic[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)


def test_jacobian_regularizer_per_member_and_its_errors():
    y0 = torch.randn(4, 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    nets = [_tanh_net(1, "auto", seed=s) for s in (0, 1)]
    ensemble = irn.ImplicitResNet.stack(nets)
    ensemble.keep_solution = True
    ensemble(torch.stack([y0, 2 * y0]))
    values = irn.regularizers.jacobian(ensemble)
    assert values.shape == (2,)
    for e, (net, x) in enumerate(zip(nets, (y0, 2 * y0))):
        net.keep_solution = True
        net(x)
        assert values[e].item() == pytest.approx(irn.regularizers.jacobian(net).item(), rel=1e-10)
    with pytest.raises(ValueError, match="keep_solution"):
        irn.regularizers.jacobian(_tanh_net(1, "auto"))
    with pytest.raises(ValueError, match="probes must be an int >= 1"):
        irn.regularizers.jacobian(ensemble, probes=0)


def test_training_with_the_jacobian_regularizer_keeps_solves_converging():
    # Example 1, state layout, L = 5, theta = 0.5, seed 2: its fixed-point solves stop
    # converging after 267 epochs without the regulariser (measured); with it they all converge
    from irn.paper import data, experiments, training

    runs = {}
    for weight in (0.0, 1.0):
        model = experiments.build_model("function_approximator", 2, num_layers=5, theta=0.5,
                                        layout="state", on_nonconvergence="ignore")
        runs[weight] = training.train(model, data.sine(), epochs=300, lr=1e-2, lr_step=100,
                                      jac_weight=weight, progress=False)
    assert not runs[0.0].converged.iloc[-1] and runs[0.0].converged.iloc[:200].all()
    assert runs[1.0].converged.all() and (runs[1.0].reg_loss > 0).all()


def test_the_regularizers_find_the_blocks_in_any_module():
    """``nn.Sequential`` of blocks, an ``ImplicitModel`` and the network itself give the same
    R_J and R_fp (the blocks found in ``model.modules()``); a module without blocks is a
    ValueError."""
    torch.manual_seed(0)
    net = irn.ImplicitResNet(3, 3, 0.5, 0.5).double()
    net.keep_solution = net.keep_iterates = True
    net(torch.randn(5, 3, dtype=torch.float64))
    sequential = torch.nn.Sequential(*net.blocks)
    model = irn.ImplicitModel(torch.nn.Identity(), net, torch.nn.Identity())
    values = [irn.regularizers.jacobian(m, generator=torch.Generator().manual_seed(1))
              for m in (net, sequential, model)]
    assert values[0].dim() == 0 and values[0] == values[1] == values[2]
    fp = [irn.regularizers.fixed_point(m, 0.1) for m in (net, sequential, model)]
    assert fp[0] == fp[1] == fp[2]
    with pytest.raises(ValueError, match="Linear holds no irn.ImplicitResidualBlock"):
        irn.regularizers.jacobian(torch.nn.Linear(3, 3))
