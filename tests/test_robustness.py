"""Attacks, noise and perturbation growth (irn.paper.robustness) against closed forms."""

import math

import numpy as np
import pytest
import torch
from conftest import DT
from torch import nn

import irn
from irn.paper import data, robustness
from irn.models import ImplicitModel, PadEmbedding


class Identity(nn.Module):
    def forward(self, x):
        return x


def linear_classifier(w, b):
    """Two logits ``(0, w.x + b)``: class 1 iff ``w.x + b > 0``; an explicit one-layer
    network with F = 0 in between, so the attacks meet only the readout."""
    readout = nn.Linear(len(w), 2).double()
    with torch.no_grad():
        readout.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        readout.bias.copy_(torch.tensor([0.0, b], dtype=DT))
    net = irn.ImplicitResNet(len(w), 1, h=1.0, theta=0.0, activation="identity").double()
    with torch.no_grad():
        net.blocks[0].F.linear.weight.zero_()
    return ImplicitModel(Identity(), net, readout)


def implicit_classifier(theta=0.5, backward="neumann"):
    torch.manual_seed(0)
    net = irn.ImplicitResNet(4, 3, h=0.5, theta=theta, activation="tanh", init="random",
                             backward=backward, tol=1e-12, max_iters=200).double()
    return ImplicitModel(PadEmbedding(2, 4), net, nn.Linear(4, 3).double())


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_reach_the_optimum_of_a_linear_classifier(attack):
    # for a linear margin m(x) = w.x + b the worst L-inf perturbation of size eps moves the
    # margin by eps ||w||_1 towards the wrong side: accuracy = share with |m| > eps ||w||_1
    g = torch.Generator().manual_seed(0)
    w, b = torch.tensor([1.5, -0.5, 2.0], dtype=DT), 0.1
    model = linear_classifier(w, b)
    x = torch.randn(400, 3, generator=g, dtype=DT)
    y = (x @ w + b > 0).long()
    epsilons = [0.0, 0.05, 0.2, 0.5]
    kwargs = dict(steps=20, generator=g) if attack == "pgd" else {}
    table = robustness.adversarial_accuracy(model, x, y, epsilons, attack, **kwargs)
    margin = (x @ w + b).abs()
    expected = [float((margin > eps * w.abs().sum()).double().mean()) for eps in epsilons]
    assert table["size"].tolist() == epsilons
    np.testing.assert_allclose(table.accuracy, expected, atol=1 / 400)
    adv = robustness.ATTACKS[attack](model, x, y, 0.2, **kwargs)
    assert (adv - x).abs().max() <= 0.2 + 1e-12


def test_input_gradient_goes_through_the_implicit_backward():
    # the attack gradient of an implicit network: every backward agrees with central finite
    # differences of the loss (the forward solved to 1e-12)
    x = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1, 0])
    grads = {}
    for backward in ("neumann", "gmres", "direct", "unrolled"):
        grads[backward] = robustness.input_gradient(implicit_classifier(backward=backward), x, y)
    model = implicit_classifier()
    loss = lambda z: float(nn.functional.cross_entropy(model(z), y, reduction="sum"))
    numeric = torch.zeros_like(x)
    with torch.no_grad():
        for index in np.ndindex(*x.shape):
            step = torch.zeros_like(x)
            step[index] = 1e-6
            numeric[index] = (loss(x + step) - loss(x - step)) / 2e-6
    for backward, grad in grads.items():
        torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=1e-6, msg=backward)
    assert all(p.grad is None for p in model.parameters())  # attacks leave no parameter grads


def test_pgd_one_step_without_random_start_is_fgsm_and_respects_bounds():
    model = implicit_classifier()
    x = torch.rand(8, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 3
    for bounds in (None, (0.0, 1.0)):
        fgsm = robustness.fgsm(model, x, y, 0.3, bounds=bounds)
        pgd = robustness.pgd(model, x, y, 0.3, steps=1, step_size=0.3, random_start=False,
                             bounds=bounds)
        torch.testing.assert_close(pgd, fgsm, rtol=0, atol=0)
    assert fgsm.min() >= 0 and fgsm.max() <= 1
    g = torch.Generator().manual_seed(3)
    adv = robustness.pgd(model, x, y, 0.1, steps=7, generator=g, bounds=(0.0, 1.0))
    assert (adv - x).abs().max() <= 0.1 + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(robustness.pgd(model, x, y, 0.0), x)


def test_noise_accuracy_matches_the_gaussian_tail():
    # class 1 iff x > 0, every input at x = 1: accuracy under N(0, sigma^2) noise is Phi(1/sigma)
    model = linear_classifier(torch.tensor([1.0], dtype=DT), 0.0)
    x = torch.ones(2000, 1, dtype=DT)
    y = torch.ones(2000, dtype=torch.long)
    sigmas = [0.0, 0.5, 1.0, 2.0]
    g = torch.Generator().manual_seed(0)
    table = robustness.noise_accuracy(model, x, y, sigmas, repeats=20, generator=g)
    expected = [1.0] + [0.5 * (1 + math.erf(1 / (s * math.sqrt(2)))) for s in sigmas[1:]]
    np.testing.assert_allclose(table.accuracy, expected, atol=0.01)  # ~5 standard errors
    again = robustness.noise_accuracy(model, x, y, sigmas, repeats=20,
                                      generator=torch.Generator().manual_seed(0))
    assert table.equals(again)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_perturbation_growth_of_a_linear_network(theta):
    # F(y) = c y: each block multiplies every perturbation by (1 + h(1-theta)c) / (1 - h theta c)
    c, h = 0.8, 0.25
    net = irn.ImplicitResNet(3, 4, h=h, theta=theta, activation="identity", tol=1e-13).double()
    with torch.no_grad():
        for block in net.blocks:
            block.F.linear.weight.copy_(c * torch.eye(3, dtype=DT))
    model = ImplicitModel(PadEmbedding(3, 3), net, Identity())
    x = torch.randn(10, 3, dtype=DT)
    growth = robustness.growth_per_layer(model, x, 0.01, generator=torch.Generator().manual_seed(0))
    expected = (1 + h * (1 - theta) * c) / (1 - h * theta * c)
    np.testing.assert_allclose(growth, np.full(4, expected), rtol=1e-9)
    iterations, converged = robustness.forward_iterations(model, x)
    assert converged and (iterations == 0) == (theta == 0)
    # through all four layers: the product, whatever the draw
    gain = robustness.perturbation_gain(model, x, 0.01, generator=torch.Generator().manual_seed(1))
    assert gain == pytest.approx(4 * np.log10(expected), rel=1e-9)


def test_evaluate_reports_every_measurement():
    model = implicit_classifier()
    dataset = data.Dataset(*(t for t in (torch.rand(6, 2, dtype=DT), torch.arange(6) % 3) * 2))
    curves, growth, summary = robustness.measure(
        model, dataset, sigmas=[0.0, 0.1], epsilons=[0.0, 0.05], pgd_steps=2, repeats=2,
        bounds=(0.0, 1.0), seed=4)
    assert list(curves.columns) == ["perturbation", "size", "accuracy"]
    assert sorted(set(curves.perturbation)) == ["fgsm", "gaussian", "pgd"]
    at_zero = curves[curves["size"] == 0].accuracy
    assert (at_zero == summary["clean_accuracy"]).all()
    assert growth.shape == (3,) and summary["converged"] and summary["forward_iterations"] > 1
    again = robustness.measure(model, dataset, sigmas=[0.0, 0.1], epsilons=[0.0, 0.05],
                                pgd_steps=2, repeats=2, bounds=(0.0, 1.0), seed=4)
    assert again[0].equals(curves) and np.array_equal(again[1], growth)


def test_bad_arguments():
    model = implicit_classifier()
    x, y = torch.rand(4, 2, dtype=DT), torch.arange(4) % 3
    cases = [
        (lambda: robustness.fgsm(model, x, y, -0.1), "epsilon"),
        (lambda: robustness.fgsm(model, x, y, 0.1, bounds=(1, 0)), "bounds"),
        (lambda: robustness.fgsm(model, x, y, 0.1, loss="hinge"), "loss"),
        (lambda: robustness.pgd(model, x, y, 0.1, steps=0), "steps"),
        (lambda: robustness.pgd(model, x, y, 0.1, step_size=0), "step_size"),
        (lambda: robustness.adversarial_accuracy(model, x, y, [0.1], "cw"), "attack"),
        (lambda: robustness.noise_accuracy(model, x, y, [0.1], repeats=0), "repeats"),
        (lambda: robustness.noise_accuracy(model, x, y, [-0.1]), "sigmas"),
        (lambda: robustness.growth_per_layer(model, x, 0.0), "sigma"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_summarize_means_and_stds_over_seeds():
    import pandas as pd

    rows, summary = [], []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        tags = dict(dataset="d", theta=0.5, regularizer="none", seed=seed)
        summary.append(tags | dict(clean_accuracy=acc + 0.2, forward_iterations=4.0 + seed,
                                   converged=seed == 0))
        for kind, size in (("gaussian", 0.0), ("gaussian", 0.1), ("fgsm", 0.2), ("pgd", 0.2)):
            rows.append(tags | dict(perturbation=kind, size=size, accuracy=acc - size))
    table = robustness.summary_table(pd.DataFrame(rows), pd.DataFrame(summary), {"d": 0.1}, {"d": 0.2})
    row = table.loc[("d", 0.5, "none")]
    np.testing.assert_allclose([row.clean_accuracy, row.gaussian, row.fgsm, row.pgd],
                               [80.0, 50.0, 40.0, 40.0])
    np.testing.assert_allclose([row.clean_accuracy_std, row.gaussian_std], [10.0, 10.0])
    assert row.forward_iterations == 4.5 and row.converged_seeds == 1
    with pytest.raises(ValueError, match="gaussian"):
        robustness.summary_table(pd.DataFrame(rows), pd.DataFrame(summary), {"d": 0.3}, {"d": 0.2})
