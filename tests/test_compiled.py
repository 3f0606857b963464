"""The compiled CPU path (irn.compiled, docs/design.md, section 8) computes what the generic
path computes: outputs, input and parameter gradients, per-layer and per-member statistics,
warnings and errors, to 1e-10 relative in float64, over a grid of settings; the generic path
(``backend="torch"``) is the reference."""

import contextlib
import itertools
import warnings

import pytest
import torch

import irn
from irn import compiled, regularizers
from irn.paper import experiments, training

pytestmark = pytest.mark.skipif(compiled.kernels() is None, reason="numba (the compiled extra) is not installed")
DT = torch.float64
# members differ in h and theta; theta = 0 (an explicit member) sits among implicit ones
MEMBERS = [(0.5, 0.5), (0.25, 1.0), (0.5, 0.0), (1.0, 0.75)]


def close(a, b, rel=1e-10):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= rel * scale


def network(h, theta, activation="tanh", members=None, dim=3, layers=4, dtype=DT, seed=0,
            **settings):
    """A compiled network (one, or an ensemble of ``members`` ``(h, theta)`` pairs) with
    random weights and biases away from zero."""
    pairs = members or [(h, theta)]
    nets = []
    for e, (h_e, theta_e) in enumerate(pairs):
        torch.manual_seed(seed + e)
        net = irn.ImplicitResNet(dim, layers, h_e, theta_e, activation=activation,
                                 init="random", backend="compiled",
                                 **({"on_nonconvergence": "ignore"} | settings)).to(dtype)
        for block in net.blocks:
            block.F.linear.bias.data.normal_(0, 0.3)
        nets.append(net)
    return nets[0] if members is None else irn.ImplicitResNet.stack(nets)


def run(net, y0, loss=lambda out: out.pow(3).sum()):
    """Output, input gradient, parameter gradients and every block's statistics."""
    x = y0.detach().clone().requires_grad_()
    out = net(x)
    grads = torch.autograd.grad(loss(out), [x, *net.parameters()])
    stats = [block.last_stats if net.members else [block.last_stats] for block in net.blocks]
    return out.detach(), grads[0], grads[1:], stats


def assert_same(compiled_run, generic_run, rel=1e-10):
    out, dx, dparams, stats = compiled_run
    out_t, dx_t, dparams_t, stats_t = generic_run
    assert close(out, out_t, rel)
    assert close(dx, dx_t, rel)
    assert all(close(a, b, rel) for a, b in zip(dparams, dparams_t))
    # a residual is a difference of two iterates (states, or adjoints of the gradients'
    # size): relative to their size, as their rounding is
    state_scale, adjoint_scale = float(out_t.abs().max()), float(dx_t.abs().max())
    for layer, layer_t in zip(stats, stats_t):
        for s, t in zip(layer, layer_t):
            assert (s.iterations, s.converged, s.backward_iterations) == \
                   (t.iterations, t.converged, t.backward_iterations)
            assert abs(s.residual - t.residual) <= rel * max(t.residual, state_scale)
            if t.backward_residual is not None:
                assert abs(s.backward_residual - t.backward_residual) <= \
                    rel * max(t.backward_residual, adjoint_scale)


# h theta up to 0.9 against weights of spectral radius 1: at h theta = 1 the identity
# activation makes I - h theta J^T nearly singular, where any two solvers differ by its
# condition number times the rounding
GRID = list(itertools.product((0.25, 0.9), (0.25, 0.5, 1.0), ("relu", "tanh", "sigmoid", "identity"),
                              (1e-6, 1e-10), ("neumann", "direct")))


@pytest.mark.parametrize("h, theta, activation, tol, backward", GRID)
def test_one_network_equals_the_generic_path(h, theta, activation, tol, backward):
    net = network(h, theta, activation, tol=tol, backward=backward, max_iters=200)
    assert compiled.reason(net) is None
    y0 = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert_same(run(net, y0), run(net.with_settings(backend="torch"), y0))


@pytest.mark.parametrize("activation, backward",
                         list(itertools.product(("relu", "tanh"), ("neumann", "direct"))))
def test_ensemble_equals_the_generic_path(activation, backward):
    ens = network(None, None, activation, members=MEMBERS, backward=backward, tol=1e-9,
                  max_iters=300)
    y0 = torch.randn(len(MEMBERS), 5, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert_same(run(ens, y0), run(ens.with_settings(backend="torch"), y0))


def test_members_that_stop_early_and_members_that_hit_the_cap():
    # member 1 (h theta = 2.5 on a scaled-up weight) cannot contract: it hits the cap while
    # member 0 stops early; the compiled path freezes nothing, yet both agree
    ens = network(None, None, "tanh", members=[(0.1, 0.5), (5.0, 0.5)], max_iters=12)
    with torch.no_grad():
        for block in ens.blocks:
            block.F.weight[1] *= 3
    y0 = torch.randn(2, 4, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    compiled_run, generic_run = run(ens, y0), run(ens.with_settings(backend="torch"), y0)
    assert_same(compiled_run, generic_run)
    first = compiled_run[3][0]
    assert first[1].iterations == 12 and not first[1].converged
    assert first[0].iterations < 12 and first[0].converged


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_same_warnings_and_errors_on_nonconvergence(policy):
    ens = network(None, None, "tanh", members=[(0.1, 0.5), (5.0, 0.5)], max_iters=5,
                  on_nonconvergence=policy)
    with torch.no_grad():
        for block in ens.blocks:
            block.F.weight[1] *= 3
    y0 = torch.randn(2, 4, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    messages = []
    for net in (ens, ens.with_settings(backend="torch")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                net(y0).sum().backward()
                messages.append([str(w.message) for w in caught])
            except irn.SolverError as err:
                messages.append(str(err))
    assert messages[0] == messages[1]
    assert "block 0, member 1: forward solve did not converge in 5 iterations" in str(messages[0])


def test_nan_names_block_and_member_forward_and_backward():
    ens = network(None, None, "tanh", members=[(0.5, 0.5)] * 3)
    with torch.no_grad():
        ens.blocks[2].F.bias[1, 0] = float("nan")
    y0 = torch.randn(3, 2, 3, dtype=DT)
    for net in (ens, ens.with_settings(backend="torch")):
        with pytest.raises(irn.SolverError, match=r"^block 2, member 1: forward solve failed: "
                                                  r"non-finite value \(NaN or inf\) at iteration 1$"):
            net(y0)
    ens = network(None, None, "tanh", members=[(0.5, 0.5)] * 3)
    weight = torch.ones(3, 2, 3, dtype=DT)
    weight[2, 1, 0] = float("nan")  # a NaN in member 2's incoming gradient
    for net in (ens, ens.with_settings(backend="torch")):
        out = net(y0.requires_grad_())
        with pytest.raises(irn.SolverError, match=r"^block 3, member 2: backward solve failed: "
                                                  r"non-finite value \(NaN or inf\) at iteration 1$"):
            (out * weight).sum().backward()


def test_singular_direct_backward_names_block():
    # identity activation, W = I and h theta = 1: I - h theta J^T = 0
    net = network(2.0, 0.5, "identity", layers=2, backward="direct", max_iters=3)
    with torch.no_grad():
        for block in net.blocks:
            block.F.linear.weight.copy_(torch.eye(3))
            block.F.linear.bias.zero_()
    y0 = torch.randn(4, 3, dtype=DT)
    for candidate in (net, net.with_settings(backend="torch")):
        out = candidate(y0.requires_grad_())
        with pytest.raises(irn.SolverError, match=r"^block 1: backward solve failed: "
                                                  r"I - J\^T is singular \(iteration 0\)$"):
            out.sum().backward()


@pytest.mark.parametrize("members", [None, MEMBERS])
def test_float32_within_its_own_precision(members):
    net = network(0.5, 0.5, "tanh", members=members, dtype=torch.float32, tol=1e-4)
    shape = (len(members), 5, 3) if members else (5, 3)
    y0 = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    out, dx, dparams, stats = run(net, y0)
    out_t, dx_t, dparams_t, stats_t = run(net.with_settings(backend="torch"), y0)
    assert out.dtype == torch.float32
    assert close(out, out_t, 1e-5) and close(dx, dx_t, 1e-4)
    assert all(close(a, b, 1e-4) for a, b in zip(dparams, dparams_t))
    for layer, layer_t in zip(stats, stats_t):
        assert all(abs(s.iterations - t.iterations) <= 1 for s, t in zip(layer, layer_t))


def test_trajectory_and_no_grad_forward():
    ens = network(None, None, "relu", members=MEMBERS)
    generic = ens.with_settings(backend="torch")
    y0 = torch.randn(len(MEMBERS), 5, 3, dtype=DT)
    assert close(ens.trajectory(y0), generic.trajectory(y0))
    with torch.no_grad():
        out = ens(y0)
    assert not out.requires_grad and close(out, generic(y0))
    single = network(0.5, 0.5)
    assert single.trajectory(y0[0]).shape == (5, 5, 3)


@pytest.mark.parametrize("with_output", [False, True])
def test_perturbation_regularizer_same_values_and_gradients(with_output):
    """R_stab on the compiled path (its distances and the clean output from the kernels'
    states, their gradient straight into the backward kernel): value, clean output, input
    and parameter gradients, and a second derivative, against the generic path."""
    # second derivatives go through solves of tolerance tol on both paths: a tight one
    for net in (network(0.5, 0.5, tol=1e-12, max_iters=500),
                network(None, None, members=MEMBERS, tol=1e-12, max_iters=500)):
        y0 = torch.randn(*((len(MEMBERS),) if net.members else ()), 6, 3, dtype=DT,
                         generator=torch.Generator().manual_seed(8))
        results = []
        for candidate in (net, net.with_settings(backend="torch")):
            x = y0.clone().requires_grad_()
            value, out = regularizers.perturbation(candidate, x, 0.1, 1.0, 2, return_output=True,
                                                   generator=torch.Generator().manual_seed(5))
            loss = value.sum() + (out.pow(2).sum() if with_output else 0)
            grads = torch.autograd.grad(loss, [x, *net.parameters()], create_graph=True)
            second = torch.autograd.grad(grads[0].pow(2).sum(), list(net.parameters()))
            results.append((value.detach(), out.detach(), grads, second))
        (value, out, grads, second), (value_t, out_t, grads_t, second_t) = results
        assert close(value, value_t) and close(out, out_t)
        assert all(close(a, b) for a, b in zip(grads, grads_t))
        assert all(close(a, b, 1e-8) for a, b in zip(second, second_t))


@pytest.mark.parametrize("members, activation, backward, memory", [
    (None, "tanh", "neumann", 2), (None, "relu", "direct", 3), (None, "identity", "neumann", 3),
    (None, "sigmoid", "direct", 3), (MEMBERS, "tanh", "direct", 3), (MEMBERS, "relu", "neumann", 2),
    (MEMBERS, "identity", "direct", 3)])
def test_anderson_equals_the_generic_path(members, activation, backward, memory):
    net = network(0.9, 1.0, activation, members=members, backward=backward, tol=1e-10,
                  max_iters=60, solver="anderson", solver_options={"memory": memory})
    y0 = torch.randn(*((len(MEMBERS),) if members else ()), 6, 3, dtype=DT,
                     generator=torch.Generator().manual_seed(1))
    assert compiled.reason(net, y0) is None
    compiled_run = run(net, y0)
    assert_same(compiled_run, run(net.with_settings(backend="torch"), y0))
    fixed_point = run(net.with_settings(solver="fixed_point", backend="torch"), y0)
    assert sum(s.iterations for layer in compiled_run[3] for s in layer) < \
        sum(s.iterations for layer in fixed_point[3] for s in layer)  # Anderson's own steps ran


def test_anderson_with_a_window_wider_than_the_state():
    """The paper profile's Anderson (memory 3) on Example 1's two-dimensional states: three
    residuals in R^2 make a singular Gram matrix that only the ridge keeps invertible, so any
    two implementations differ by its condition number times the rounding (measured 1e-8
    relative: the same iterations, outputs and gradients to 1e-7)."""
    ens = network(None, None, "relu", members=MEMBERS, dim=2, layers=5, backward="direct",
                  tol=1e-6, max_iters=30, solver="anderson", solver_options={"memory": 3})
    y0 = torch.randn(len(MEMBERS), 20, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert_same(run(ens, y0), run(ens.with_settings(backend="torch"), y0), rel=1e-7)


def _with_fixed_point_regularizer(net, y0, alpha=0.05):
    """``R_fp`` and the gradients of ``out^3 + 3 R_fp`` (the regulariser's own path through the
    iterates weighs in)."""
    x = y0.clone().requires_grad_()
    net.keep_iterates = True
    out = net(x)
    value = regularizers.fixed_point(net, alpha)
    loss = out.pow(3).sum() + 3 * value.sum()
    grads = torch.autograd.grad(loss, [x, *net.parameters()])
    means = [block.record.iterate_means for block in net.blocks]
    return value.detach(), grads, means, [b.last_stats for b in net.blocks]


@pytest.mark.parametrize("members, activation, backward", [
    (None, "tanh", "neumann"), (None, "relu", "direct"), (None, "identity", "neumann"),
    (MEMBERS, "tanh", "direct"), (MEMBERS, "relu", "neumann"), (MEMBERS, "sigmoid", "neumann")])
def test_fixed_point_regularizer_equals_the_generic_path(members, activation, backward):
    """``R_fp`` (its value, each layer's iterate means, and the gradients through the kept
    iterates) on the compiled path: weights scaled up so that several layers contract more
    slowly than ``alpha`` (R_fp > 0) and the members stop at different iterations."""
    net = network(0.5, 0.6, activation, members=members, backward=backward, tol=1e-9,
                  max_iters=300)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.4)
    y0 = torch.randn(*((len(MEMBERS),) if members else ()), 5, 3, dtype=DT,
                     generator=torch.Generator().manual_seed(2))
    assert compiled.reason(net, y0) is None
    value, grads, means, stats = _with_fixed_point_regularizer(net, y0)
    value_t, grads_t, means_t, stats_t = _with_fixed_point_regularizer(
        net.with_settings(backend="torch"), y0)
    assert float(value.min() if members else value) > 0 or members  # the regulariser is active
    assert close(value, value_t) and all(close(a, b) for a, b in zip(grads, grads_t))
    assert [m.shape for m in means] == [m.shape for m in means_t]
    assert all(close(a, b) for a, b in zip(means, means_t))
    assert [[s.iterations for s in (layer if members else [layer])] for layer in stats] == \
           [[s.iterations for s in (layer if members else [layer])] for layer in stats_t]
    # without R_fp's path the gradients differ: the test above checks that path
    plain = run(net.with_settings(backend="torch"), y0)
    assert not close(plain[1], grads_t[0], 1e-6)


def test_fixed_point_regularizer_through_anderson_steps_runs_on_the_generic_path():
    net = network(0.5, 0.5, solver="anderson")
    net.keep_iterates = True
    y0 = torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="cannot run this call: keep_iterates with solver 'anderson'"):
        net(y0)
    auto = net.with_settings(backend="auto")
    auto.keep_iterates = True
    assert "keep_iterates with solver 'anderson'" in compiled.reason(auto, y0)


def test_fixed_point_regularizer_without_gradients():
    net = network(0.5, 0.6, "tanh", tol=1e-8, max_iters=500)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.4)
    y0 = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    generic = net.with_settings(backend="torch")
    with torch.no_grad():
        for candidate in (net, generic):
            candidate.keep_iterates = True
            candidate(y0)
    assert all(close(a.iterate_means, b.iterate_means) and not a.iterate_means.requires_grad
               for a, b in zip((b.record for b in net.blocks), (b.record for b in generic.blocks)))
    value = regularizers.fixed_point(net, 0.1)
    assert float(value) > 0 and close(value, regularizers.fixed_point(generic, 0.1))


def test_second_derivatives_through_a_compiled_forward():
    # second derivatives go through solves of tolerance tol on both paths: a tight one
    net = network(0.5, 0.5, "tanh", tol=1e-12, max_iters=500)
    y0 = torch.randn(4, 3, dtype=DT)
    results = []
    for candidate in (net, net.with_settings(backend="torch")):
        x = y0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(candidate(x).pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), [x, *net.parameters()]))
    assert all(close(a, b, 1e-10) for a, b in zip(*results))


def test_backend_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"backend must be one of .*'auto'.*got 'fast'"):
        irn.ImplicitResNet(2, 3, backend="fast")
    with pytest.raises(ValueError, match=r"backend='compiled' cannot run this network: "
                                         r"block 0: solver='broyden'"):
        irn.ImplicitResNet(2, 3, theta=0.5, solver="broyden", backend="compiled")
    with pytest.raises(ValueError, match=r"backward='gmres'"):
        network(0.5, 0.5).with_settings(backward="gmres")
    assert "broyden" in compiled.reason(irn.ImplicitResNet(2, 3, theta=0.5, solver="broyden"))
    assert compiled.reason(irn.ImplicitResNet(2, 3, backend="torch")) == "backend='torch'"
    ens = irn.ImplicitResNet.stack([irn.ImplicitResNet(2, 3), irn.ImplicitResNet(2, 3)])
    assert ens.backend == "auto" and compiled.reason(ens) is None
    assert compiled.reason(ens.member(1)) is None
    with pytest.raises(ValueError, match="backend differs between the networks"):
        irn.ImplicitResNet.stack([irn.ImplicitResNet(2, 3), irn.ImplicitResNet(2, 3, backend="torch")])


def _stacked(width, members, **settings):
    nets = [irn.ImplicitResNet(width, 1, theta=0.5, **settings) for _ in range(members)]
    return nets[0] if members == 1 else irn.ImplicitResNet.stack(nets)


def test_auto_compiles_where_the_committed_crossover_measured_it_faster():
    """At every measured dtype, member count and batch of irn/auto_crossover.json: compiled up
    to the widest width that won there, the generic path one wider (and a batch between two
    measured ones follows the nearer on a log scale)."""
    table = compiled.crossover()["largest_width"]
    assert set(table) == {"float32", "float64"}
    for dtype_name, by_members in table.items():
        dtype = getattr(torch, dtype_name)
        for members, by_batch in by_members.items():
            for batch, widest in by_batch.items():
                for width in {max(widest, 1), widest + 1}:
                    net = _stacked(width, int(members)).to(dtype)
                    y0 = torch.zeros(*((int(members),) if int(members) > 1 else ()), int(batch),
                                     width, dtype=dtype)
                    why = compiled.reason(net, y0)
                    assert (why is None) == (width <= widest), (dtype, members, batch, width, why)
                    if why is not None:
                        assert "the generic path measured faster" in why
                        assert compiled.reason(net.with_settings(backend="compiled"), y0) is None
    assert compiled.compiled_widest(1, 23, torch.float32) == table["float32"]["1"]["16"]
    assert compiled.compiled_widest(1, 5000, torch.float32) == table["float32"]["1"]["1024"]


def test_a_network_reports_the_path_its_last_call_ran():
    widest = compiled.compiled_widest(1, 16, torch.float32)
    net = irn.ImplicitResNet(widest, 2, theta=0.5, init="random")
    net(torch.randn(16, widest))
    assert (irn.solve_summary(net).path, irn.solve_summary(net).reason) == ("compiled", None)
    wide = irn.ImplicitResNet(widest + 1, 2, theta=0.5, init="random")
    wide(torch.randn(16, widest + 1))
    summary = irn.solve_summary(wide)
    assert summary.path == "torch" and "measured faster" in summary.reason
    net.with_settings(backend="torch")(torch.randn(16, widest))
    assert irn.solve_summary(net).path == "compiled"  # with_settings made another network


def test_irn_backend_environment_variable_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv("IRN_BACKEND", "torch")
    assert irn.ImplicitResNet(2, 3).backend == "torch"
    assert irn.ImplicitResNet(2, 3, backend="compiled").backend == "compiled"
    monkeypatch.setenv("IRN_BACKEND", "fast")
    with pytest.raises(ValueError, match="IRN_BACKEND must be one of"):
        irn.ImplicitResNet(2, 3)


def test_without_numba_auto_runs_the_generic_path(monkeypatch):
    monkeypatch.setattr(compiled, "kernels", lambda: None)
    net = irn.ImplicitResNet(2, 3, theta=0.5)
    assert "numba is not installed" in compiled.reason(net)
    net(torch.randn(4, 2))
    with pytest.raises(ValueError, match="numba is not installed"):
        irn.ImplicitResNet(2, 3, backend="compiled")


def test_dtype_mismatch_and_other_devices_fall_back_or_name_it():
    net = network(0.5, 0.5)
    y32 = torch.randn(4, 3)
    with pytest.raises(ValueError, match="float32 or both float64"):
        net(y32)
    assert compiled.not_applicable(net.with_settings(backend="auto"), y32) is not None
    meta = torch.empty(4, 3, dtype=DT, device="meta")
    assert "meta" in compiled.not_applicable(net, meta)


# Example 1's state layout is left out: its biases' gradients vanish by symmetry (an odd target
# on symmetric points), so both paths feed rounding noise (1e-13 on the generic path, 4e-9 on
# the compiled one at the second step, measured) to Adam, which scales it to full steps; the
# test below shows that its gradients agree to the rounding of the largest one.
@pytest.mark.parametrize("factory, data_name, settings, loss, regularizer", [
    ("function_approximator", "sine", dict(num_layers=5, theta=0.75, layout="embedded"), "mse", {}),
    ("spiral_classifier", "two_spirals", dict(num_layers=10, theta=0.5), "cross_entropy", {}),
    ("function_approximator", "sine", dict(num_layers=5, theta=1.0, layout="embedded"), "mse",
     dict(fp_weight=1.0, fp_alpha=0.5)),
])
def test_the_examples_train_the_same_on_both_paths(factory, data_name, settings, loss,
                                                   regularizer):
    data = experiments.DATASETS[data_name]()
    histories = []
    for backend in ("auto", "torch"):
        model = experiments.build_model(factory, 3, backend=backend,
                                        on_nonconvergence="ignore", **settings)
        assert (compiled.reason(model.net) is None) == (backend == "auto")
        history = training.train(model.to(DT), data, epochs=30, loss=loss, seed=3,
                                 progress=False, **regularizer)
        histories.append(history)
    for column in ("train_loss", "val_loss", "forward_iterations_0", "backward_iterations_0"):
        a, b = (torch.tensor(h[column].to_numpy()) for h in histories)
        assert close(a, b, 1e-8), column


@pytest.mark.parametrize("factory, data_name, settings, loss, regularizer", [
    ("function_approximator", "sine", dict(num_layers=4, theta=0.5, layout="embedded"), "mse",
     dict(fp_weight=1.0, fp_alpha=0.5)),
    ("spiral_classifier", "two_spirals", dict(num_layers=6, theta=0.5), "cross_entropy",
     dict(stab_weight=1.0, stab_sigma=0.1)),
])
def test_training_on_flat_parameters_changes_no_number(monkeypatch, factory, data_name,
                                                       settings, loss, regularizer):
    """The training loop steps the layers as one tensor on the compiled path
    (``irn.compiled.flat_parameters``): the histories and weights of the layers stepped one
    by one, for an ensemble of three, to the last bit but for Adam's own rounding (its fused
    kernel vectorises a long tensor where it ran short ones element by element: a last-bit
    difference, measured 7e-18 in one bias after eight epochs)."""
    data = experiments.DATASETS[data_name]()
    runs = []
    for flat in (True, False):
        if not flat:
            monkeypatch.setattr(compiled, "flat_parameters", lambda net: contextlib.nullcontext())
        models = [experiments.build_model(factory, seed, on_nonconvergence="ignore", **settings)
                  for seed in range(3)]
        model = irn.models.ImplicitModel.stack(models).to(DT)
        histories = training.train(model, data, epochs=8, loss=loss, seed=[3, 4, 5],
                                   progress=False, batch_size=40, **regularizer)
        runs.append((histories, [p.detach().clone() for p in model.parameters()]))
    (flat_histories, flat_weights), (histories, weights) = runs
    for a, b in zip(flat_histories, histories):
        assert list(a.columns) == list(b.columns)
        assert all(close(a[c].to_numpy(dtype=float, copy=True), b[c].to_numpy(dtype=float, copy=True), 1e-12)
                   for c in a.columns)
    assert all(close(a, b, 1e-14) for a, b in zip(flat_weights, weights))


def test_flat_parameters_keep_the_layers_gradients_on_both_paths():
    ens = network(None, None, "tanh", members=MEMBERS)
    y0 = torch.randn(len(MEMBERS), 5, 3, dtype=DT, generator=torch.Generator().manual_seed(6))
    expected = run(ens.with_settings(backend="torch"), y0)[2]
    with compiled.flat_parameters(ens) as flat:
        for backend in ("auto", "torch"):  # the generic path accumulates into the same views
            ens.backend = backend
            for _ in range(2):  # accumulated over two backwards, then reset
                ens(y0).pow(3).sum().backward()
            assert all(close(p.grad, 2 * g) for p, g in zip(ens.parameters(), expected))
            assert close(flat.data.grad[:flat.split], torch.cat([g.reshape(-1) for g in expected[0::2]]) * 2)
            flat.reset()
            assert all(float(p.grad.abs().max()) == 0 for p in ens.parameters())
    ens.backend = "auto"
    assert "_flat_parameters" not in ens.__dict__
    assert close(run(ens, y0)[0], run(ens.with_settings(backend="torch"), y0)[0])


def test_flat_parameters_guard_their_views_and_refuse_what_they_cannot_hold():
    ens = network(None, None, "tanh", members=MEMBERS)
    y0 = torch.randn(len(MEMBERS), 5, 3, dtype=DT, generator=torch.Generator().manual_seed(9))
    with compiled.flat_parameters(ens) as flat:
        with pytest.raises(ValueError, match="already active"):
            with compiled.flat_parameters(ens):
                pass
        ens.zero_grad(set_to_none=True)  # the layers' gradient views dropped ...
        flat.reset()  # ... and re-attached
        ens(y0).sum().backward()
        assert all(p.grad.data_ptr() >= flat.grad.data_ptr() for p in ens.parameters())
        assert close(torch.cat([p.grad.reshape(-1) for p in ens.parameters()]).abs().sum(),
                     flat.grad.abs().sum())
        ens.to(torch.float32)  # the parameters moved: the optimiser would step a stale copy
        with pytest.raises(RuntimeError, match="moved or replaced inside"):
            ens(y0.float())
        ens.to(DT)
    pointers = [p.data_ptr() for p in ens.parameters()]  # own storage again after the context
    assert len(set(pointers)) == len(pointers) and "_flat_parameters" not in ens.__dict__
    frozen = network(0.5, 0.5)
    frozen.blocks[1].F.linear.weight.requires_grad_(False)
    assert compiled.flat_unsupported(frozen) == "a layer parameter does not require grad"
    with pytest.raises(ValueError, match="does not require grad"):
        compiled.FlatParameters(frozen)
    tied = network(0.5, 0.5)
    tied.blocks[1].F = tied.blocks[0].F
    assert compiled.flat_unsupported(tied) == "layers share a parameter"


def test_training_leaves_a_frozen_layer_untouched():
    model = experiments.build_model("function_approximator", 0, num_layers=3, theta=0.5).to(DT)
    weight = model.net.blocks[1].F.linear.weight
    weight.requires_grad_(False)
    before = weight.detach().clone()
    training.train(model, experiments.DATASETS["sine"](), epochs=3, progress=False)
    assert torch.equal(weight, before)


def test_example_1_state_layout_gradients_agree_to_rounding():
    data = experiments.DATASETS["sine"]().to(dtype=DT)
    grads = []
    for backend in ("auto", "torch"):
        model = experiments.build_model("function_approximator", 3, backend=backend,
                                        num_layers=5, theta=0.5).to(DT)
        loss = torch.nn.functional.mse_loss(model(data.x_train), data.y_train)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    scale = max(float(g.abs().max()) for g in grads[1])
    assert all(float((a - b).abs().max()) <= 1e-14 * scale for a, b in zip(*grads))


def test_an_activation_without_a_kernel_runs_on_the_generic_path(monkeypatch):
    """A fifth activation added to the generic table: ``auto`` falls back (it raised KeyError
    in the plan), ``compiled`` names what is missing."""
    from irn import functions

    monkeypatch.setitem(functions.ACTIVATIONS, "softplus", torch.nn.functional.softplus)
    monkeypatch.setitem(functions.DERIVATIVES, "softplus", torch.sigmoid)
    torch.manual_seed(0)
    net = irn.ImplicitResNet(3, 2, 0.5, 0.5, activation="softplus").double()
    assert "activation 'softplus' has no compiled kernel" in compiled.reason(net)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    generic = net.with_settings(backend="torch")
    torch.testing.assert_close(net(y0), generic(y0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation 'softplus' has no compiled kernel"):
        irn.ImplicitResNet(3, 2, 0.5, 0.5, activation="softplus", backend="compiled")


@pytest.mark.parametrize("backward", ["neumann", "direct"])
def test_the_parallel_kernels_compute_what_the_serial_ones_do(backward):
    """Members on several threads (numba's prange) give the serial kernels' results bit for
    bit: each member is computed by one thread, in the same order."""
    ens = network(None, None, "tanh", members=MEMBERS, backward=backward)
    y0 = torch.randn(len(MEMBERS), 5, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not compiled._kernel("forward", len(MEMBERS))[1]
        serial = run(ens, y0)
        torch.set_num_threads(2)
        assert compiled._kernel("forward", len(MEMBERS))[1]
        parallel = run(ens, y0)
    finally:
        torch.set_num_threads(previous)
    assert_same(parallel, serial, rel=0)
    assert_same(parallel, run(ens.with_settings(backend="torch"), y0))

