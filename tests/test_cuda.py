"""The same code on a GPU: results match the CPU's (skipped where CUDA is absent)."""

import pytest
import torch
from conftest import DT, random_tanh

import irn
from irn.paper import examples
from irn import models
from irn.paper import data, training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SOLVERS = [("fixed_point", None), ("gradient_descent", None), ("anderson", None),
           ("nonlinear_cg", {"variant": "fletcher_reeves"}), ("nonlinear_cg", None),
           ("broyden", None)]


@pytest.mark.parametrize("solver,options", SOLVERS)
@pytest.mark.parametrize("backward", ["neumann", "gmres", "direct", "unrolled", "jacobian_free"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_block_matches_cpu(rng, solver, options, backward, dtype, tol):
    F = random_tanh(4, rng, scale=1.0).to(dtype)
    x = torch.randn(8, 4, generator=rng, dtype=DT).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        Fd = F.to(device)
        block = irn.ImplicitResidualBlock(Fd, 0.8, 0.6, solver=solver, solver_options=options,
                                          backward=backward, tol=tol, max_iters=300)
        xd = x.to(device).clone().requires_grad_()
        y = block(xd)
        y.pow(2).sum().backward()
        assert block.last_stats.converged
        results.append([t.detach().cpu() for t in (y, xd.grad, Fd.weight.grad)])
        Fd.zero_grad()
    atol = 1e-8 if dtype == torch.float64 else 1e-3
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, atol=atol, rtol=atol)


@pytest.mark.parametrize("backward", ["neumann", "direct"])
def test_second_derivatives_match_cpu(rng, backward):
    """create_graph=True through the implicit backward on the GPU: the Hessian-vector product
    of a gradient penalty equals the CPU's."""
    F = random_tanh(4, rng, scale=1.0)
    x = torch.randn(8, 4, generator=rng, dtype=DT)
    results = []
    for device in ("cpu", "cuda"):
        block = irn.ImplicitResidualBlock(F.to(device), 0.8, 0.6, backward=backward, tol=1e-12,
                                          max_iters=300)
        xd = x.to(device).clone().requires_grad_()
        (g,) = torch.autograd.grad(block(xd).tanh().sum(), xd, create_graph=True)
        (hv,) = torch.autograd.grad(g.square().sum(), xd)
        results.append(hv.cpu())
    torch.testing.assert_close(results[1], results[0], atol=1e-8, rtol=1e-8)


def test_regularizers_and_training_on_cuda():
    torch.manual_seed(0)
    model = examples.spiral_classifier(10, 0.5, on_nonconvergence="ignore").double()
    history = training.train(model, data.two_spirals(), epochs=3, loss="cross_entropy",
                             stab_weight=1.0, fp_weight=0.1, device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    assert len(history) == 3 and history.train_loss.notna().all()


@pytest.mark.parametrize("backward", ["neumann", "gmres", "direct"])
def test_ensemble_matches_cpu(backward):
    """Stacked networks with per-member stopping on the GPU: outputs, stats and gradients equal
    the CPU's (the device mask of the running members is made on the GPU)."""
    results = []
    for device in ("cpu", "cuda"):
        nets = []
        for e, theta in enumerate((0.0, 0.5, 1.0)):
            torch.manual_seed(e)
            nets.append(irn.ImplicitResNet(3, 3, 0.4, theta, activation="tanh", backward=backward,
                                           tol=1e-10, max_iters=200).to(device, DT))
        ens = irn.ImplicitResNet.stack(nets)
        y0 = torch.randn(3, 5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
        y0 = y0.to(device).requires_grad_()
        ens(y0).pow(2).sum().backward()
        stats = [[(s.iterations, s.backward_iterations) for s in b.last_stats] for b in ens.blocks]
        results.append((y0.grad.cpu(), ens.blocks[0].F.weight.grad.cpu(), stats))
    (g_cpu, w_cpu, s_cpu), (g_gpu, w_gpu, s_gpu) = results
    torch.testing.assert_close(g_gpu, g_cpu, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(w_gpu, w_cpu, atol=1e-8, rtol=1e-8)
    assert s_gpu == s_cpu


def test_ensemble_training_on_cuda():
    jobs = [dict(model="spiral_classifier", seed=s, data="two_spirals",
                 model_kwargs=dict(num_layers=4, theta=t, on_nonconvergence="ignore"),
                 train_kwargs=dict(epochs=3, loss="cross_entropy", stab_weight=1.0, device="cuda"))
            for s, t in ((0, 0.0), (1, 0.5))]
    for model, history in experiments.train_many(jobs):
        assert len(history) == 3 and history.train_loss.notna().all()


def test_auto_runs_cuda_networks_on_the_generic_path_and_compiled_names_the_device():
    """The compiled path is CPU only: on CUDA, backend="auto" computes what the CPU's compiled
    path computes (through the generic path), backend="compiled" is a ValueError."""
    torch.manual_seed(0)
    net = irn.ImplicitResNet(3, 4, 0.5, 0.5, activation="tanh", init="random").to(DT)
    x = torch.randn(6, 3, dtype=DT)
    cpu = net(x)
    gpu = net.to("cuda")(x.to("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu.detach(), atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="backend='compiled' cannot run this call: the input is on cuda"):
        net.with_settings(backend="compiled")(x.to("cuda"))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda_keeps_the_solver_in_float32(solver, low):
    torch.manual_seed(0)
    net = irn.ImplicitResNet(8, 3, h=0.5, theta=0.5, activation="tanh", solver=solver,
                             tol=3e-2, max_iters=60).cuda()
    x = torch.randn(16, 8, device="cuda")
    with torch.autocast("cuda", dtype=low):
        out = net(x)
        out.float().pow(2).sum().backward()
    reference = irn.ImplicitResNet(8, 3, h=0.5, theta=0.5, activation="tanh", solver=solver,
                                   tol=1e-6, max_iters=60).cuda()
    reference.load_state_dict(net.state_dict())
    assert all(b.last_stats.converged for b in net.blocks)
    assert torch.allclose(out.float(), reference(x), atol=0.05 * float(out.float().abs().max()))
