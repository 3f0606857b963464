"""Ensembles (docs/design.md, section 5): E stacked networks compute, member by member, exactly what the
networks compute alone (float64, 1e-10 relative), and train the same (1e-8 over 100 epochs)."""

import numpy as np
import pytest
import torch

import irn
import irn.paper.data
from irn import models, regularizers
from irn.paper import experiments, training
from irn.solvers import FORWARD_SOLVERS

DT = torch.float64
BACKWARDS = ("neumann", "gmres", "direct", "unrolled", "jacobian_free")
# members differ in h and theta; theta = 0 (an explicit member) sits among implicit ones
MEMBERS = [(0.5, 0.5), (0.25, 1.0), (0.5, 0.0), (0.3, 0.75)]


def close(a, b, rel=1e-10):
    """``a`` equals ``b`` to ``rel`` relative to ``b``'s largest entry."""
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= rel * scale


def make_nets(members=MEMBERS, dim=3, layers=3, activation="tanh", **settings):
    nets = []
    for e, (h, theta) in enumerate(members):
        torch.manual_seed(e)
        net = irn.ImplicitResNet(dim, layers, h, theta, activation=activation, init="random",
                                 **({"tol": 1e-11, "max_iters": 300} | settings)).to(DT)
        for block in net.blocks:  # biases away from zero, so that they matter
            block.F.linear.bias.data.normal_(0, 0.1)
        nets.append(net)
    return nets


def solo_runs(nets, y0, loss):
    """Each network alone on its slice of ``y0``: outputs, input gradients, parameter grads."""
    runs = []
    for e, net in enumerate(nets):
        x = y0.detach()[e].clone().requires_grad_()
        out = net(x)
        loss(out).backward()
        runs.append((out.detach(), x.grad, [p.grad for p in net.parameters()]))
    return runs


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("solver", sorted(FORWARD_SOLVERS))
def test_stacked_equals_solo_every_solver_and_backward(solver, backward):
    nets = make_nets(solver=solver, backward=backward)
    ens = irn.ImplicitResNet.stack(nets)
    assert ens.members == len(nets)
    y0 = torch.randn(len(nets), 5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    y0.requires_grad_()
    out = ens(y0)
    out.pow(3).sum().backward()
    stacked_stats = [block.last_stats for block in ens.blocks]
    for e, (solo_out, solo_grad, solo_params) in enumerate(solo_runs(nets, y0, lambda o: o.pow(3).sum())):
        assert close(out[e].detach(), solo_out)
        assert close(y0.grad[e], solo_grad)
        for l, block in enumerate(ens.blocks):
            assert close(block.F.weight.grad[e], solo_params[2 * l])
            assert close(block.F.bias.grad[e], solo_params[2 * l + 1])
            solo, member = nets[e].blocks[l].last_stats, stacked_stats[l][e]
            assert (member.iterations, member.converged, member.backward_iterations) == \
                (solo.iterations, solo.converged, solo.backward_iterations)
            # (a converged residual is rounding-level, below tol = 1e-11, on either side)
            assert member.residual == pytest.approx(solo.residual, rel=1e-6, abs=1e-11)
    # the explicit member (theta = 0) reports what an explicit block reports
    assert stacked_stats[0][2] == irn.SolveStats(0, 0.0, True)


def test_trajectory_and_member_copies():
    nets = make_nets()
    ens = irn.ImplicitResNet.stack(nets)
    y0 = torch.randn(len(nets), 4, 3, dtype=DT)
    traj = ens.trajectory(y0)
    assert traj.shape == (nets[0].num_layers + 1, len(nets), 4, 3)
    for e, net in enumerate(nets):
        assert close(traj[:, e], net.trajectory(y0[e]))
        copy = ens.member(e)
        assert [(b.h, b.theta) for b in copy.blocks] == [(b.h, b.theta) for b in net.blocks]
        assert copy.blocks[0].settings == net.blocks[0].settings
        assert torch.equal(copy(y0[e]), net(y0[e])) or close(copy(y0[e]), net(y0[e]))
    # weights are copied: the ensemble, the networks and the copies stay independent
    with torch.no_grad():
        ens.blocks[0].F.weight.add_(1.0)
    assert not torch.equal(ens.blocks[0].F.weight[0], nets[0].blocks[0].F.linear.weight)
    assert torch.equal(ens.member(0).blocks[0].F.linear.weight, ens.blocks[0].F.weight[0])


def test_member_copy_does_not_move_the_global_rng():
    ens = irn.ImplicitResNet.stack(make_nets())
    state = torch.get_rng_state()
    ens.member(1)
    assert torch.equal(torch.get_rng_state(), state)


def test_early_member_is_frozen_while_another_hits_the_cap():
    dim = 3
    contractive = torch.eye(dim, dtype=DT) * 0.1        # converges in a few iterations
    expansive = torch.eye(dim, dtype=DT) * 3.0          # h theta ||W|| = 3: never converges
    nets = []
    for weight in (contractive, expansive):
        net = irn.ImplicitResNet(dim, 1, 1.0, 1.0, activation="identity", tol=1e-12,
                                 max_iters=25, on_nonconvergence="ignore").to(DT)
        with torch.no_grad():
            net.blocks[0].F.linear.weight.copy_(weight)
        nets.append(net)
    ens = irn.ImplicitResNet.stack(nets)
    y0 = torch.ones(2, 2, dim, dtype=DT)
    with torch.no_grad():
        out = ens(y0)
        solo = [net(y0[e]) for e, net in enumerate(nets)]
    early, capped = ens.blocks[0].last_stats
    assert early.converged and early.iterations == nets[0].blocks[0].last_stats.iterations < 25
    assert not capped.converged and capped.iterations == 25
    assert torch.equal(out[0], solo[0])  # frozen bit for bit where its own rule stopped it
    assert close(out[1], solo[1])


def test_backward_stops_per_member():
    nets = make_nets(members=[(0.1, 1.0), (0.9, 1.0)], lin_tol=1e-12)
    ens = irn.ImplicitResNet.stack(nets)
    y0 = torch.randn(2, 4, 3, dtype=DT)
    ens(y0).sum().backward()
    for net, e in zip(nets, range(2)):
        net(y0[e]).sum().backward()
        for solo_block, block in zip(net.blocks, ens.blocks):
            assert block.last_stats[e].backward_iterations == solo_block.last_stats.backward_iterations
    counts = [s.backward_iterations for s in ens.blocks[0].last_stats]
    assert counts[0] < counts[1]  # the weaker coupling needs fewer Neumann terms


def test_nan_in_one_member_names_it():
    nets = make_nets(members=[(0.5, 0.5), (0.5, 0.5), (0.5, 0.5)], on_nonconvergence="ignore")
    with torch.no_grad():
        nets[1].blocks[2].F.linear.bias[0] = float("nan")
    ens = irn.ImplicitResNet.stack(nets)
    with pytest.raises(irn.SolverError, match=r"block 2, member 1: forward solve failed.*iteration 1"):
        ens(torch.randn(3, 2, 3, dtype=DT))


def test_nonconvergence_message_names_block_and_member():
    nets = make_nets(members=[(0.1, 1.0), (3.0, 1.0)], max_iters=3, tol=1e-12)
    ens = irn.ImplicitResNet.stack(nets)
    with pytest.warns(irn.ConvergenceWarning, match=r"block 0, member 1: forward solve did not converge"):
        ens(torch.randn(2, 2, 3, dtype=DT))


@pytest.mark.parametrize("change, name", [
    (dict(dim=4), "dim"), (dict(layers=4), "num_layers"), (dict(activation="relu"), "activation"),
    (dict(solver="anderson"), "solver"), (dict(backward="gmres"), "backward"),
    (dict(tol=1e-6), "tol"), (dict(max_iters=7), "max_iters"),
    (dict(on_nonconvergence="raise"), "on_nonconvergence"),
])
def test_stacking_different_settings_names_the_setting(change, name):
    nets = make_nets(members=[(0.5, 0.5)]) + make_nets(members=[(0.5, 0.5)], **change)
    with pytest.raises(ValueError, match=name):
        irn.ImplicitResNet.stack(nets)


def test_stacking_different_dtypes_names_it():
    nets = make_nets(members=[(0.5, 0.5), (0.5, 0.5)])
    nets[1].float()
    with pytest.raises(ValueError, match="dtype differs"):
        irn.ImplicitResNet.stack(nets)


def test_bad_ensemble_arguments():
    ens = irn.ImplicitResNet.stack(make_nets())
    for e in (-1, 4, 1.0):
        with pytest.raises(ValueError, match="e must be"):
            ens.member(e)
    with pytest.raises(ValueError, match="members=4"):
        ens(torch.randn(3, 2, 3, dtype=DT))
    with pytest.raises(ValueError, match="members=4"):
        ens(torch.randn(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="at least one"):
        irn.ImplicitResNet.stack([])
    with pytest.raises(ValueError, match="not ensembles"):
        irn.ImplicitResNet.stack([ens])
    with pytest.raises(ValueError, match="member"):
        irn.ImplicitResNet(2, 2).member(0)
    with pytest.raises(ValueError, match="same length"):
        irn.ImplicitResidualBlock(torch.nn.Identity(), h=[0.1, 0.2], theta=[0.5])
    with pytest.raises(ValueError, match=r"theta must be a number in \[0, 1\]"):
        irn.ImplicitResidualBlock(torch.nn.Identity(), h=0.1, theta=[0.5, 1.5])


def test_fixed_point_regularizer_per_member():
    nets = make_nets(members=[(0.5, 0.5), (0.25, 1.0), (0.5, 0.0)], max_iters=40)
    alphas = [0.2, 0.5, 0.3]
    ens = irn.ImplicitResNet.stack(nets)
    ens.keep_iterates = True
    y0 = torch.randn(3, 4, 3, dtype=DT)
    value = regularizers.fixed_point((ens(y0), ens)[1], alphas)
    assert value.shape == (3,)
    value.sum().backward()
    for e, net in enumerate(nets):
        net.keep_iterates = True
        net(y0[e])
        solo = regularizers.fixed_point(net, alphas[e])
        assert close(value[e].detach(), solo.detach())
        if solo.requires_grad:
            solo.backward()
            assert close(ens.blocks[1].F.weight.grad[e], nets[e].blocks[1].F.linear.weight.grad)
    assert value[2] == 0  # the explicit member records no iterates


def test_perturbation_regularizer_per_member_with_own_generators():
    nets = make_nets(activation="relu")
    sigmas, betas = [0.1, 0.05, 0.2, 0.01], [1.0, 0.5, 1.0, 2.0]
    ens = irn.ImplicitResNet.stack(nets)
    y0 = torch.randn(4, 6, 3, dtype=DT)
    generators = [torch.Generator().manual_seed(10 + e) for e in range(4)]
    value, out = regularizers.perturbation(ens, y0, sigmas, betas, 3, generator=generators,
                                           return_output=True)
    assert value.shape == (4,) and out.shape == (4, 6, 3)
    value.sum().backward()
    for e, net in enumerate(nets):
        solo, solo_out = regularizers.perturbation(net, y0[e], sigmas[e], betas[e], 3,
                                                   generator=torch.Generator().manual_seed(10 + e),
                                                   return_output=True)
        assert close(value[e].detach(), solo.detach()) and close(out[e].detach(), solo_out.detach())
        solo.backward()
        assert close(ens.blocks[0].F.weight.grad[e], net.blocks[0].F.linear.weight.grad)
    with pytest.raises(ValueError, match="sigma"):
        regularizers.perturbation(ens, y0, [0.1, 0.1], 1.0, 2)
    with pytest.raises(ValueError, match="beta"):
        regularizers.perturbation(ens, y0, 0.1, [1.0, 1.0, 1.0, -1.0], 2)


@pytest.mark.parametrize("factory, x_shape, extra", [
    ("spiral_classifier", (7, 2), {}), ("digits_classifier", (5, 64), {}),
    ("function_approximator", (6, 1), {}),
    ("function_approximator", (6, 1), {"layout": "embedded"})])
def test_models_of_the_examples_stack(factory, x_shape, extra):
    kwargs = dict(num_layers=3, T=1.0, tol=1e-11, max_iters=200, **extra)
    solo = [experiments.build_model(factory, seed, theta=theta, **kwargs)
            for seed, theta in ((0, 0.5), (1, 1.0), (2, 0.0))]
    ens = models.ImplicitModel.stack(solo)
    assert ens.members == 3
    x = torch.rand(3, *x_shape, dtype=DT)
    out = ens(x)
    out.square().sum().backward()
    for e, model in enumerate(solo):
        solo_out = model(x[e])
        assert close(out[e].detach(), solo_out.detach())
        solo_out.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), ens.member(e).parameters()):
            assert p.shape == q.shape, name
        grads = dict(model.named_parameters())
        if "readout.weight" in grads:
            assert close(ens.readout.weight.grad[e], grads["readout.weight"].grad)
        assert close(ens.net.blocks[0].F.weight.grad[e], grads["net.blocks.0.F.linear.weight"].grad)
        copy = ens.member(e)
        assert close(copy(x[e]).detach(), solo_out.detach())


def test_train_ensemble_matches_solo_histories():
    """``train`` on an ensemble gives each member its solo history (full batch, no
    regularisers: the plain case; the regularised, minibatched case is train_many's test).
    The grid is not symmetric: on Example 1's symmetric grid the bias gradients of an odd
    network with zero biases are zero up to rounding, and Adam's normalisation turns that
    rounding into steps of size lr, so no reordering of sums could agree there."""
    data = irn.paper.data.sine(low=-4.0)
    # tol far below 1e-8: with tol = 1e-6 a rounding-level difference can flip an
    # iteration count at the threshold and move the result by about tol
    solo = [experiments.build_model("function_approximator", s, num_layers=3, theta=t, T=2.0,
                                 tol=1e-12, max_iters=200) for s, t in ((0, 0.5), (1, 0.0))]
    ens = models.ImplicitModel.stack(solo)
    histories = training.train(ens, data, epochs=5, seed=[0, 1], progress=False)
    for model, history in zip(solo, histories):
        alone = training.train(model, data, epochs=5, progress=False)
        np.testing.assert_allclose(history.drop(columns="converged").to_numpy(float),
                                   alone.drop(columns="converged").to_numpy(float), rtol=1e-8)


def _job(model, data, seed, theta, model_kwargs, train_kwargs):
    return dict(model=model, data=data, seed=seed, model_kwargs=dict(theta=theta, **model_kwargs),
                train_kwargs=train_kwargs)


def test_train_many_with_and_without_ensembles_agree_over_100_epochs():
    """Regularisers on (R_stab with per-member weight and sigma; R_fp with per-member weight
    and alpha), minibatches on (each member's own order): same histories and weights to 1e-8."""
    jobs = []
    for seed in (0, 1):
        for theta, weight, sigma in ((0.0, 1.0, 0.05), (0.5, 0.5, 0.1), (1.0, 1.0, 0.02)):
            jobs.append(_job("spiral_classifier", "two_spirals", seed, theta,
                             dict(num_layers=4, T=1.0, tol=1e-12, max_iters=100,
                                  on_nonconvergence="ignore"),
                             dict(epochs=100, lr=0.01, lr_step=30, loss="cross_entropy",
                                  batch_size=32, stab_weight=weight, stab_sigma=sigma)))
        for theta, weight, alpha in ((0.5, 1.0, 0.5), (1.0, 0.3, 0.3)):
            jobs.append(_job("function_approximator", "sine", seed, theta,
                             dict(num_layers=4, T=2.0, tol=1e-12, max_iters=100,
                                  on_nonconvergence="ignore"),
                             dict(epochs=100, lr=0.01, lr_step=30, batch_size=8,
                                  fp_weight=weight, fp_alpha=alpha)))
    assert len(experiments._batches(jobs, True, 1, 64)) == 2  # two ensembles, not ten runs
    stacked = experiments.train_many(jobs, ensemble=True)
    alone = experiments.train_many(jobs, ensemble=False)
    for (model_a, history_a), (model_b, history_b) in zip(stacked, alone):
        assert (history_a.converged == history_b.converged).all()
        columns = [c for c in history_b.columns if c != "converged"]
        # atol: R_fp is a sum of relu differences that cancel to ~1e-10 in places, where
        # rounding (~1e-18) exceeds 1e-8 relative
        np.testing.assert_allclose(history_a[columns].to_numpy(float),
                                   history_b[columns].to_numpy(float), rtol=1e-8, atol=1e-14)
        for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-8, atol=1e-14, err_msg=name)


def test_jobs_group_by_what_they_share():
    base = dict(model="function_approximator", data="sine", model_kwargs=dict(num_layers=3),
                train_kwargs=dict(epochs=3))
    jobs = [base | dict(seed=s, model_kwargs=dict(num_layers=3, theta=t))
            for s in range(3) for t in (0.0, 1.0)]
    jobs.append(base | dict(seed=0, model_kwargs=dict(num_layers=4, theta=0.5)))
    jobs.append(base | dict(seed=0, train_kwargs=dict(epochs=3, fp_weight=1.0)))
    batches = experiments._batches(jobs, True, workers=2, max_members=64)
    assert sorted(map(len, batches)) == [1, 1, 3, 3]
    assert sorted(experiments._batches(jobs, False, 2, 64)) == [[i] for i in range(len(jobs))]
    assert max(map(len, experiments._batches(jobs, True, 1, max_members=2))) == 2


def test_ensembles_are_cut_where_theta_changes():
    base = dict(model="function_approximator", data="sine", train_kwargs=dict(epochs=3))
    thetas = [0.0] * 4 + [0.25] * 4 + [0.5] * 4 + [1.0] * 8
    jobs = [base | dict(seed=s, model_kwargs=dict(num_layers=3, theta=t)) for s, t in enumerate(thetas)]
    # two pieces: the even cut (10) moves to the change at 8; three pieces: 7 -> 8, 13 -> 12
    for workers, sizes in ((2, [8, 12]), (3, [4, 8, 8])):
        batches = experiments._batches(jobs, True, workers=workers, max_members=64)
        assert sorted(map(len, batches)) == sorted(sizes)
        for batch in batches:  # each piece holds whole thetas
            held = {thetas[i] for i in batch}
            assert all(thetas.count(t) == sum(thetas[i] == t for i in batch) for t in held)
    # no change within a quarter of a piece of the even cut: the cut stays even
    same = [base | dict(seed=s, model_kwargs=dict(num_layers=3, theta=0.5)) for s in range(10)]
    assert sorted(map(len, experiments._batches(same, True, workers=2, max_members=64))) == [5, 5]
    thirds = [base | dict(seed=s, model_kwargs=dict(num_layers=3, theta=t))
              for t in (0.0, 0.5, 1.0) for s in range(10)]  # changes at 10, 20; even cut 15
    assert sorted(map(len, experiments._batches(thirds, True, workers=2, max_members=64))) == [15, 15]
    # pieces never exceed max_members
    assert max(map(len, experiments._batches(jobs, True, workers=2, max_members=6))) <= 6
    # Anderson and implicit batches are estimated dearer, and start first
    anderson = [base | dict(seed=0, model_kwargs=dict(num_layers=3, theta=0.5, solver="anderson"))]
    assert experiments._cost(anderson) > experiments._cost([jobs[8]]) > experiments._cost([jobs[0]])


def test_train_an_explicit_ensemble_with_the_perturbation_regularizer():
    """theta = 0 everywhere (notebook 3's ResNet): no solve, no backward statistics."""
    jobs = [_job("spiral_classifier", "two_spirals", seed, 0.0, dict(num_layers=3),
                 dict(epochs=2, loss="cross_entropy", stab_weight=1.0)) for seed in (0, 1)]
    stacked = experiments.train_many(jobs)
    alone = experiments.train_many(jobs, ensemble=False)
    for (_, a), (_, b) in zip(stacked, alone):
        assert a.converged.all()
        np.testing.assert_allclose(a.drop(columns="converged").to_numpy(float),
                                   b.drop(columns="converged").to_numpy(float), rtol=1e-8)


@pytest.mark.parametrize("backward", ["neumann", "gmres"])
@pytest.mark.parametrize("solver", sorted(FORWARD_SOLVERS))
def test_equivalence_with_loose_tolerances(solver, backward):
    """With tol = lin_tol = 1e-3 a single iteration more or less moves a result by far more
    than 1e-10: stacked members must stop exactly where they stop alone, the members that
    stop first included (a freeze one step early once slipped through the tight tests)."""
    nets = make_nets(members=[(0.2, 1.0), (0.5, 0.5), (0.9, 1.0), (0.4, 0.75)], solver=solver,
                     backward=backward, tol=1e-3, lin_tol=1e-3, on_nonconvergence="ignore")
    ens = irn.ImplicitResNet.stack(nets)
    y0 = torch.randn(len(nets), 5, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    y0.requires_grad_()
    out = ens(y0)
    out.pow(3).sum().backward()
    for e, (solo_out, solo_grad, solo_params) in enumerate(solo_runs(nets, y0, lambda o: o.pow(3).sum())):
        assert close(out[e].detach(), solo_out)
        assert close(y0.grad[e], solo_grad)
        for l, block in enumerate(ens.blocks):
            assert close(block.F.weight.grad[e], solo_params[2 * l])
    counts = [s.iterations for s in ens.blocks[0].last_stats]
    if backward == "neumann":
        counts += [s.backward_iterations for s in ens.blocks[0].last_stats]
    assert len(set(counts)) > 1  # the members stop at different iterations


def test_jobs_with_and_without_the_jacobian_regularizer_train_apart_as_they_train_alone():
    """A member without the Jacobian regulariser stacked with one that has it would draw
    probes from its own generator and move its R_stab noise against its solo run."""
    jobs = [_job("spiral_classifier", "two_spirals", seed, 0.5,
                 dict(num_layers=3, T=1.0, tol=1e-12, max_iters=100, on_nonconvergence="ignore"),
                 dict(epochs=3, loss="cross_entropy", stab_weight=1.0, jac_weight=weight))
            for seed, weight in ((0, 0.0), (1, 0.5), (2, 0.0), (3, 0.2))]
    batches = experiments._batches(jobs, True, 1, 64)
    assert sorted(sorted(batch) for batch in batches) == [[0, 2], [1, 3]]
    stacked = experiments.train_many(jobs)
    alone = experiments.train_many(jobs, ensemble=False)
    for (_, a), (_, b) in zip(stacked, alone):
        np.testing.assert_allclose(a.drop(columns="converged").to_numpy(float),
                                   b.drop(columns="converged").to_numpy(float), rtol=1e-8)
