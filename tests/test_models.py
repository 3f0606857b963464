"""ImplicitResNet, the example models and data, and the training loop."""

import inspect
import re
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DT

import irn
from irn import functions
from irn.paper import examples
from irn import models
from irn.paper import data, training


def test_stationary_initialisation():
    net = irn.ImplicitResNet(5, 4, h=0.5, theta=0.5)
    w0 = net.blocks[0].F.linear.weight
    assert torch.linalg.eigvals(w0.double()).abs().max().item() == pytest.approx(1.0, rel=1e-6)
    for block in net.blocks:
        assert torch.equal(block.F.linear.weight, w0)
        assert torch.all(block.F.linear.bias == 0)
        assert block.F.linear.weight is not w0 or block is net.blocks[0]  # trained independently
    assert isinstance(net.blocks[0].F.linear, torch.nn.Linear)


def test_random_and_pytorch_initialisations_differ_per_layer():
    for init in ("random", "pytorch"):
        net = irn.ImplicitResNet(3, 2, init=init)
        assert not torch.equal(net.blocks[0].F.linear.weight, net.blocks[1].F.linear.weight)


def test_network_is_the_composition_of_its_blocks():
    net = irn.ImplicitResNet(3, 4, h=0.25, theta=0.5, activation="tanh", tol=1e-12).double()
    y0 = torch.randn(6, 3, dtype=DT)
    traj = net.trajectory(y0)
    assert traj.shape == (5, 6, 3)
    torch.testing.assert_close(traj[0], y0)
    torch.testing.assert_close(traj[-1], net(y0), atol=1e-12, rtol=0)
    for l, block in enumerate(net.blocks):
        y, x = traj[l + 1], traj[l]
        residual = y - x - 0.25 * (0.5 * block.F(x) + 0.5 * block.F(y))
        assert residual.abs().max() < 1e-11
        assert block.name == f"block {l}"
        assert block.h == 0.25 and block.theta == 0.5


def test_block_kwargs_are_passed_on():
    net = irn.ImplicitResNet(2, 3, theta=1.0, solver="anderson", backward="gmres", tol=1e-4,
                             max_iters=7, on_nonconvergence="ignore")
    assert all(b.solver == "anderson" and b.backward == "gmres" and b.tol == 1e-4
               and b.max_iters == 7 and b.on_nonconvergence == "ignore" for b in net.blocks)


@pytest.mark.parametrize("kwargs,name", [
    (dict(activation="gelu"), "activation"), (dict(init="xavier"), "init"),
    (dict(theta=2.0), "theta"), (dict(h=0.0), "h"), (dict(solver="x"), "solver")])
def test_resnet_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        irn.ImplicitResNet(2, 3, **kwargs)


def test_resnet_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="y0"):
        irn.ImplicitResNet(3, 2)(torch.ones(4, 2))


def test_datasets():
    sine = data.sine()
    assert sine.x_train.shape == (20, 1) and sine.x_val.shape == (40, 1)
    torch.testing.assert_close(sine.y_train, torch.sin(sine.x_train))
    assert sine.x_train[0].item() == -5 and sine.x_train[-1].item() == 5
    spirals = data.two_spirals()
    assert spirals.x_train.shape == (97, 2) and spirals.x_val.shape == (97, 2)
    x = torch.cat([spirals.x_train, spirals.x_val])
    assert torch.linalg.vector_norm(x, dim=1).max().item() == pytest.approx(1.0)
    # class 1 is the negative of class 0: index i of class 0 is sample i, of class 1 is 97 + i
    full = torch.empty(194, 2, dtype=DT)
    full[0::2], full[1::2] = spirals.x_train, spirals.x_val
    torch.testing.assert_close(full[97:], -full[:97])
    i = 5  # r_i (cos a_i, sin a_i), a_i = 3 pi i / 96, r_i = (104 - i) / 104
    expected = (104 - i) / 104 * torch.tensor([np.cos(3 * np.pi * i / 96), np.sin(3 * np.pi * i / 96)])
    torch.testing.assert_close(full[i], expected.to(DT))


def test_swiss_roll_is_haber_and_ruthotto_s():
    roll = data.swiss_roll()
    assert roll.x_train.shape == (513, 2) and roll.x_val.shape == (513, 2)
    # undo the split: even indices of the 1026 samples validate, odd ones train
    full = torch.empty(1026, 2, dtype=DT)
    labels = torch.empty(1026, dtype=torch.long)
    full[0::2], full[1::2] = roll.x_val, roll.x_train
    labels[0::2], labels[1::2] = roll.y_val, roll.y_train
    assert labels[:513].eq(0).all() and labels[513:].eq(1).all()
    for i in (0, 100, 512):  # a_i = 4 pi i / 512, r_i = i / 512; class 1 at r_i + 0.2
        direction = torch.tensor([np.cos(4 * np.pi * i / 512), np.sin(4 * np.pi * i / 512)], dtype=DT)
        torch.testing.assert_close(full[i], i / 512 * direction)
        torch.testing.assert_close(full[513 + i], (i / 512 + 0.2) * direction)


def test_example_1_layouts():
    state = examples.function_approximator(5, 0.5).double()
    assert state.net.dim == 2 and state.net.blocks[0].F.activation == "tanh"
    torch.manual_seed(0)
    embedded = examples.function_approximator(4, 0.5, layout="embedded").double()
    x = torch.linspace(-1, 1, 7, dtype=DT).unsqueeze(1)
    assert embedded(x).shape == (7, 1)
    assert embedded.net.dim == 5 and embedded.net.blocks[0].F.activation == "relu"
    assert isinstance(embedded.embed, torch.nn.Linear) and embedded.embed.weight.shape == (5, 1)
    assert isinstance(embedded.readout, torch.nn.Linear) and embedded.readout.weight.shape == (1, 5)
    # the residual layers keep the paper's stationary initialisation
    w0 = embedded.net.blocks[0].F.linear.weight
    assert torch.linalg.eigvals(w0).abs().max().item() == pytest.approx(1.0)
    assert all(torch.equal(b.F.linear.weight, w0) for b in embedded.net.blocks)
    torch.testing.assert_close(embedded(x), embedded.readout(embedded.net(embedded.embed(x))))
    # the default activation follows the layout; an explicit one wins
    assert examples.function_approximator(2, 0.0, layout="embedded", activation="tanh"
                                        ).net.blocks[0].F.activation == "tanh"
    with pytest.raises(ValueError, match="layout must be one of"):
        examples.function_approximator(2, 0.0, layout="wide")
    with pytest.raises(ValueError, match="width"):
        examples.function_approximator(2, 0.0, layout="embedded", width=0)


def test_example_models():
    m = examples.function_approximator(5, 0.5).double()
    x = torch.linspace(-1, 1, 7, dtype=DT).unsqueeze(1)
    assert m(x).shape == (7, 1)
    torch.testing.assert_close(m.embed(x), torch.cat([x, torch.zeros_like(x)], 1))
    assert m.net.blocks[0].h == 1.0 and m.net.blocks[0].F.activation == "tanh"
    c = examples.spiral_classifier(10, 0.0).double()
    assert c(torch.ones(3, 2, dtype=DT)).shape == (3, 2)
    assert c.trajectory(torch.ones(3, 2, dtype=DT)).shape == (11, 3, 4)


def test_training_records_history_and_reduces_loss():
    torch.manual_seed(0)
    model = examples.function_approximator(8, 0.5, T=2.0).double()  # h theta ||W|| small: converges
    history = training.train(model, data.sine(), epochs=40, lr=1e-2, progress=False)
    assert len(history) == 40 and list(history.epoch) == list(range(1, 41))
    assert history.train_loss.iloc[-1] < 0.5 * history.train_loss.iloc[0]
    assert np.isfinite(history.val_loss).all()
    fwd = training.per_layer(history, "forward_iterations")
    bwd = training.per_layer(history, "backward_iterations")
    grad = training.per_layer(history, "grad")
    assert fwd.shape == bwd.shape == grad.shape == (40, 8)
    assert (fwd >= 1).all() and (bwd >= 1).all() and (grad > 0).all()
    assert history.converged.all()


def test_validation_every_k_epochs_leaves_training_unchanged():
    def run(val_every):
        torch.manual_seed(0)
        model = examples.spiral_classifier(3, 0.5, T=1.0).double()
        return training.train(model, data.two_spirals(), epochs=7, loss="cross_entropy",
                              val_every=val_every, progress=False)

    every, sparse = run(1), run(3)
    measured = sparse.epoch.isin([3, 6, 7])  # every third epoch and the last one
    assert sparse.val_loss[measured].notna().all() and sparse.val_loss[~measured].isna().all()
    assert sparse.val_accuracy[~measured].isna().all()
    pd.testing.assert_series_equal(sparse.val_loss[measured], every.val_loss[measured])
    pd.testing.assert_frame_equal(sparse.drop(columns=["val_loss", "val_accuracy"]),
                                  every.drop(columns=["val_loss", "val_accuracy"]))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="val_every"):
            training.train(examples.spiral_classifier(2, 0.0).double(), data.two_spirals(),
                           epochs=1, val_every=bad, progress=False)


def test_training_with_regularizers_and_classification_is_deterministic():
    def run():
        torch.manual_seed(1)
        model = examples.spiral_classifier(6, 0.5, on_nonconvergence="ignore").double()
        return training.train(model, data.two_spirals(), epochs=5, loss="cross_entropy",
                              stab_weight=1.0, stab_sigma=0.05, fp_weight=0.1,
                              progress=False, seed=3)

    a, b = run(), run()
    assert "val_accuracy" in a and (a.reg_loss > 0).any()
    assert a.equals(b)


def test_training_bad_arguments():
    model = examples.function_approximator(2, 0.5)
    with pytest.raises(ValueError, match="loss"):
        training.train(model, data.sine(), epochs=1, loss="hinge")
    with pytest.raises(ValueError, match="epochs"):
        training.train(model, data.sine(), epochs=0)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
def test_perceptron_linearization_matches_autograd(activation):
    """The analytic products of Perceptron's backward (J_F^T u for the linear solve, dF/dw^T u
    for the parameters) against autograd, and against the generic linearisation of irn.layers."""
    F = functions.Perceptron(3, activation).double()
    y = torch.randn(5, 3, dtype=DT)
    u = torch.randn(5, 3, dtype=DT)
    _, vjp = torch.func.vjp(lambda params, y: torch.func.functional_call(F, params, (y,)),
                            dict(F.named_parameters()), y)
    param_grads, input_grad = vjp(u)
    input_vjp, parameter_vjp = F.linearize(y, 0.7)
    torch.testing.assert_close(input_vjp(u), 0.7 * input_grad, atol=1e-14, rtol=0)
    for got, name in zip(parameter_vjp(u), ("linear.weight", "linear.bias")):
        torch.testing.assert_close(got, 0.7 * param_grads[name], atol=1e-14, rtol=0)
    generic = irn.backward.linearize(torch.nn.Sequential(F), y, 0.7)  # Sequential: no own linearize
    torch.testing.assert_close(generic[0](u), input_vjp(u), atol=1e-14, rtol=0)
    for a, b in zip(generic[1](u), parameter_vjp(u)):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    F.linear.bias.requires_grad_(False)
    assert F.linearize(y)[1](u)[1] is None and irn.backward.linearize(torch.nn.Sequential(F), y)[1](u)[1] is None


def test_summarize_histories():
    """Per-model summary over seeds: medians, ranges, convergence counts, last-epoch iterations."""
    rows = []
    for seed, (loss, conv) in enumerate([(1.0, True), (3.0, False), (2.0, True)]):
        for epoch in (1, 2):
            rows.append({"epoch": epoch, "seed": seed, "depth": 2, "theta": 0.5,
                         "train_loss": loss * epoch, "val_loss": loss, "converged": conv or epoch == 1,
                         "forward_iterations_0": 4.0, "forward_iterations_1": 6.0,
                         "backward_iterations_0": 2.0, "backward_iterations_1": 2.0})
    table = training.summarize(pd.DataFrame(rows))
    row = table.iloc[0]
    assert (row.depth, row.theta, row.seeds, row.converged_seeds) == (2, 0.5, 3, 2)
    assert row.converged_epochs == pytest.approx(5 / 6)
    assert (row.train_loss, row.train_loss_min, row.train_loss_max) == (4.0, 2.0, 6.0)
    assert (row.forward_iterations, row.backward_iterations) == (5.0, 2.0)


def test_digits_dataset_and_classifier():
    dataset = data.digits()
    assert dataset.x_train.shape == (1348, 64) and dataset.x_val.shape == (449, 64)
    assert dataset.x_train.dtype == DT and 0 <= dataset.x_train.min() and dataset.x_val.max() <= 1
    assert set(dataset.y_val.tolist()) == set(range(10))
    assert torch.equal(data.digits().x_val, dataset.x_val)  # no randomness in the split
    torch.manual_seed(0)
    model = examples.digits_classifier(num_layers=2, theta=0.5, T=1.0, dim=8).double()
    assert model(dataset.x_val[:5]).shape == (5, 10)
    assert model.embed.in_features == 64 and model.net.dim == 8


@pytest.mark.parametrize("theta", [0.0, 0.5])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_non_finite_input_is_named_as_the_input(theta, backend):
    """A NaN or inf in the input is a ValueError naming the sample (and member), on every path,
    the explicit network included (there it passed through silently); a NaN that appears in an
    iterate stays the solver's SolverError (tests/test_block.py)."""
    net = irn.ImplicitResNet(3, 4, 0.5, theta, backend=backend).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"y0 holds a non-finite value \(NaN or inf\) at sample 3"):
        net(x)
    ens = irn.ImplicitResNet.stack([irn.ImplicitResNet(3, 4, 0.5, theta, backend=backend)
                                    for _ in range(2)]).double()
    xe = torch.randn(2, 5, 3, dtype=torch.float64)
    xe[1, 4, 0] = float("inf")
    with pytest.raises(ValueError, match="at member 1, sample 4"):
        ens(xe)
    with pytest.raises(ValueError, match="at member 1, sample 4"):
        ens.trajectory(xe)
    block = irn.ImplicitResidualBlock(irn.functions.Perceptron(3), 0.5, theta).double()
    with pytest.raises(ValueError, match=r"x holds a non-finite value \(NaN or inf\) at sample 3"):
        block(x)


def test_a_network_checks_its_input_once_not_per_layer(monkeypatch):
    reductions = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: reductions.append(t.shape) or isfinite(t))
    net = irn.ImplicitResNet(3, 6, 0.5, 0.5, backend="torch").double()
    net(torch.randn(4, 3, dtype=torch.float64))  # the generic path calls its six blocks
    assert len(reductions) == 1
    net.blocks[0](torch.randn(4, 3, dtype=torch.float64))  # a block called alone checks its own
    assert len(reductions) == 2


@pytest.mark.parametrize("make, where", [
    (lambda: irn.ImplicitResNet(2, 3, max_iter=5), "ImplicitResNet()"),
    (lambda: irn.ImplicitResidualBlock(irn.functions.Perceptron(2), 0.5, 0.5, max_iter=5),
     "ImplicitResidualBlock()"),
    (lambda: irn.SolveConfig(max_iter=5), "SolveConfig()"),
    (lambda: irn.ImplicitResNet(2, 3).with_settings(max_iter=5), "ImplicitResNet.with_settings()"),
    (lambda: irn.ImplicitResNet(2, 3).blocks[0].with_settings(max_iter=5),
     "ImplicitResidualBlock.with_settings()"),
])
def test_a_misspelled_keyword_names_the_closest_and_the_allowed_ones(make, where):
    with pytest.raises(TypeError, match=rf"{re.escape(where)} got an unexpected keyword argument "
                                        r"'max_iter' \(did you mean 'max_iters'\?\); allowed: .*tol"):
        make()


def test_the_keyword_check_keeps_the_signatures():
    assert "max_iters" in inspect.signature(irn.ImplicitResidualBlock.__init__).parameters
    assert "max_iters" in inspect.signature(irn.SolveConfig).parameters
    with pytest.raises(TypeError, match="'zzz'; allowed: dim, num_layers"):
        irn.ImplicitResNet(2, 3, zzz=1)  # nothing close: no suggestion


def test_implicit_model_is_public_and_stacks():
    """``irn.ImplicitModel``: an embedding, a network and a readout, stacked into an ensemble
    whose members compute what the models compute alone."""
    assert "ImplicitModel" in irn.__all__ and irn.ImplicitModel is models.ImplicitModel
    torch.manual_seed(0)
    singles = [irn.ImplicitModel(torch.nn.Linear(1, 3), irn.ImplicitResNet(3, 2, 0.5, 0.5),
                                 torch.nn.Linear(3, 1)).double() for _ in range(2)]
    ensemble = irn.ImplicitModel.stack(singles)
    x = torch.randn(4, 1, dtype=torch.float64)
    out = ensemble(x.expand(2, 4, 1))
    for e, single in enumerate(singles):
        torch.testing.assert_close(out[e], single(x), rtol=1e-12, atol=1e-12)
