"""The benchmark's own measuring tools (``benchmarks/bench.py``), checked on cases whose
answer is known; the benchmark itself runs with ``make bench``, not here."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench  # noqa: E402


def test_matrix_products_counts_forward_and_backward():
    # y = x W^T + b (addmm), loss = sum(y @ V): forward 2 products, backward 2 for the
    # weights and 2 for the inputs (x requires grad); 2 m k n flops each
    m, k, n = 5, 3, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True)
    v = torch.randn(n, 2, generator=gen, requires_grad=True)

    def step():
        (torch.nn.functional.linear(x, w, b) @ v).sum().backward()

    count, flops, in_products, whole = bench.matrix_products(step, repeats=3)
    assert count == 6
    assert flops == 2 * (m * k * n + m * n * 2) + 2 * (n * m * 2 + m * 2 * n) \
        + 2 * (n * m * k + m * n * k)
    assert 0 < in_products and 0 < whole


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(8, 16)
    w = torch.randn(16, 16, requires_grad=True)
    net = torch.nn.Module()
    net.forward = lambda x: torch.relu(x @ w) @ w  # saves x, w (once), relu's output
    saved = bench.saved_bytes(net, x)
    assert saved == 4 * (8 * 16 + 16 * 16 + 8 * 16)


@pytest.mark.parametrize("method", [m for m in bench.methods_for("W1 example 1, L=5")
                                    if not m.startswith("torchdeq")])
def test_every_method_builds_and_steps(method):
    net, step = bench.build("W1 example 1, L=5", method)
    step()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_implicit_and_plain_steps_agree():
    # the same equation: irn's implicit step and the plain reference loop give the same
    # gradients up to the solver tolerances
    grads = {}
    for method in ("plain", "irn:fixed_point/neumann", "irn:fixed_point/direct",
                   "compiled:fixed_point/neumann", "compiled:fixed_point/direct"):
        net, step = bench.build("W1 example 1, L=5", method)
        step()
        grads[method] = torch.cat([p.grad.flatten() for p in net.parameters()])
    for method in ("irn:fixed_point/neumann", "irn:fixed_point/direct"):
        torch.testing.assert_close(grads[method], grads["plain"], rtol=1e-4, atol=1e-5)
    for method in ("neumann", "direct"):  # the compiled rows time the same computation
        torch.testing.assert_close(grads[f"compiled:fixed_point/{method}"],
                                   grads[f"irn:fixed_point/{method}"], rtol=1e-5, atol=1e-6)


def test_interleaved_times_calls_every_step_each_cycle():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = bench.interleaved_times(steps, min_time=0.0, min_cycles=4)
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    timed = calls[9:]  # after two warm-up calls each and one cycle that sizes the rest
    assert timed == list("abc") + list("cba") + list("abc") + list("cba")


def test_peak_memory_of_known_allocations():
    # a (1000,) float32 tensor, doubled into a second one while the first is alive, then both
    # freed: the peak is the two buffers, 8000 bytes (allocations may round up a little)
    def step():
        a = torch.ones(1000)
        b = a * 2
        del a, b

    assert 8000 <= bench.peak_memory(step) < 8000 + 2 * 512
    assert bench.peak_memory(lambda: None) == 0


@pytest.mark.parametrize("members", [None, 3])
@pytest.mark.parametrize("workload", list(bench.ENSEMBLE_WORKLOADS))
def test_ensemble_step_trains_every_member(workload, members):
    model, step = bench.ensemble_step(workload, members)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    if members:
        assert len(model.net.blocks[0].last_stats) == members


@pytest.mark.parametrize("workload", list(bench.ENSEMBLE_WORKLOADS))
def test_jax_reference_computes_irn_loss_and_gradients(workload):
    """The compiled reference of the ensemble table solves the same problem: its loss and
    gradients at the initial weights equal irn's (float64, within the solver tolerance)."""
    jax = pytest.importorskip("jax")  # benchmark-only dependency (make bench installs it)
    import jax_reference

    spec, params, model = bench.jax_problem(workload, None)
    loss, grads = jax.value_and_grad(jax_reference.loss_function(spec))(params)
    from irn.paper import experiments, training
    factory, data_name, _, loss_name = bench.ENSEMBLE_WORKLOADS[workload]
    data = experiments.DATASETS[data_name]()
    value = training.LOSSES[loss_name](model(data.x_train), data.y_train)
    value.backward()
    assert float(loss) == pytest.approx(float(value.detach()), rel=1e-9)
    for l, (gw, gb) in enumerate(grads["blocks"]):
        linear = model.net.blocks[l].F.linear
        torch.testing.assert_close(torch.tensor(np.asarray(gw)), linear.weight.grad,
                                   rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(torch.tensor(np.asarray(gb)), linear.bias.grad,
                                   rtol=1e-4, atol=1e-7)


def test_harness_step_times_its_kernels_inside_the_step():
    model, step = bench.harness_step("function_approximator", "sine",
                                     dict(num_layers=2, theta=0.5), "mse", 2,
                                     dict(fp_weight=1.0, fp_alpha=0.5))
    whole, kernels = bench.step_and_kernel_times({"R_fp": step}, rounds=2, per_round=1)
    assert 0 < kernels["R_fp"] < whole["R_fp"]
    assert all(p.grad is not None for p in model.parameters())
    assert model.net.blocks[0].record.iterate_means is not None  # R_fp ran, compiled
