"""The same code on a GPU: results match the CPU's (skipped where CUDA is absent)."""

import pytest
import torch
from conftest import DT, random_tanh

import irn
from irn import data, models, training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SOLVERS = [("fixed_point", None), ("gradient_descent", None), ("anderson", None),
           ("nonlinear_cg", {"variant": "fletcher_reeves"}), ("nonlinear_cg", None)]


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


def test_regularizers_and_training_on_cuda():
    torch.manual_seed(0)
    model = models.spiral_classifier(10, 0.5, on_nonconvergence="ignore").double()
    history = training.train(model, data.two_spirals(), epochs=3, loss="cross_entropy",
                             stab_weight=1.0, fp_weight=0.1, device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    assert len(history) == 3 and history.train_loss.notna().all()
