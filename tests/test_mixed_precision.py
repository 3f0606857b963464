"""Mixed precision: under ``torch.autocast`` (bfloat16 on CPU) F runs in low precision, the
solvers' own arithmetic (Gram systems, Broyden's updates, GMRES, direct solves, the stopping
rule) in float32, and a tolerance bfloat16 cannot reach is refused."""

import pytest
import torch

import irn

SOLVERS = ["fixed_point", "anderson", "broyden", ("fixed_point", "anderson")]
BACKWARDS = ["neumann", "gmres", "direct"]


def _net(solver="fixed_point", backward="neumann", tol=1e-2, seed=0):
    torch.manual_seed(seed)
    return irn.ImplicitResNet(4, 3, h=0.5, theta=0.5, activation="tanh", solver=solver,
                              backward=backward, tol=tol, max_iters=60, backend="auto")


def _run(net, x, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(x)
        loss = out.float().pow(2).sum()
    loss.backward()
    return out.detach().float(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_bfloat16_autocast_forward_and_backward_agree_with_float32(solver, backward):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    low = _net(solver, backward)
    out, grads = _run(low, x, autocast=True)
    assert all(b.last_stats.converged and b.last_stats.backward_iterations is not None
               for b in low.blocks)
    ref_out, ref_grads = _run(_net(solver, backward), x, autocast=False)
    # bfloat16 keeps 8 bits: agreement to a few of its epsilons (7.8e-3)
    assert torch.allclose(out, ref_out, rtol=0, atol=0.05 * ref_out.abs().max())
    for g, ref in zip(grads, ref_grads):
        assert torch.allclose(g, ref, rtol=0, atol=0.1 * ref.abs().max() + 1e-6)


def test_under_autocast_F_runs_in_bfloat16_and_the_small_systems_in_float32(monkeypatch):
    seen = []
    cholesky = torch.linalg.cholesky_ex

    def spy(matrix, *args, **kwargs):  # Anderson's Gram system
        seen.append((matrix.dtype, torch.is_autocast_enabled("cpu")))
        return cholesky(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    net = _net("anderson")
    dtypes = []
    for block in net.blocks:
        block.F.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(8, 4))
    assert seen and set(seen) == {(torch.float32, False)}
    assert set(dtypes) == {torch.bfloat16}


def test_a_tolerance_below_the_autocast_precision_is_refused():
    x = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"tol=1e-06 is below what torch.bfloat16 resolves"):
            _net(tol=1e-6)(x)
        with pytest.raises(ValueError, match=r"lin_tol=0.0001 is below"):
            _net(tol=1e-2).with_settings(lin_tol=1e-4)(x)
    _net(tol=1e-6)(x)   # without autocast the same setting is fine
