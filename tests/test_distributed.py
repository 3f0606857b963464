"""Distributed data parallel training of an irn model: two CPU processes (gloo, localhost)
each on half the batch get the gradients one process gets on the whole batch.

Libraries with a custom backward have given zero gradients (parameters' gradients written
outside autograd, which DDP's hooks never see) or doubled ones (accumulated twice); the
implicit backward hands its parameter gradients to autograd, so DDP averages them as usual.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(backward: str, backend: str):
    from irn.paper import experiments

    # the embedded layout: the state layout's bias gradients vanish by symmetry, and Adam
    # would turn their rounding noise, which differs between the two runs, into full steps
    return experiments.build_model("function_approximator", 0, num_layers=5, theta=0.5,
                                   layout="embedded", backward=backward, backend=backend,
                                   tol=1e-12, max_iters=200)


def _train(model, x, y, steps=STEPS):
    """Adam steps on the MSE of ``(x, y)``; the gradients of every step, flattened."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        optimizer.step()
    return torch.stack(grads)


def _worker(rank, world, port, backward, backend, out):
    from irn.paper import data

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(backward, backend))
        sine = data.sine()
        half = sine.x_train.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)  # equal halves: the mean of the means
        grads = _train(model, sine.x_train[part], sine.y_train[part])
        if rank == 0:
            torch.save(grads, out)
        # both ranks done before either tears gloo down: a rank whose peer had already gone
        # sometimes aborted in gloo's teardown ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backward,backend", [("neumann", "torch"), ("direct", "torch"),
                                              ("neumann", "compiled"), ("direct", "compiled")])
def test_ddp_on_two_processes_matches_one_process_on_the_whole_batch(tmp_path, backward, backend):
    from irn.paper import data

    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), backward, backend, str(out)), nprocs=2, join=True)
    distributed = torch.load(out)
    sine = data.sine()
    alone = _train(_model(backward, backend), sine.x_train, sine.y_train)
    assert distributed.shape == alone.shape and alone.abs().amax(dim=1).min() > 1e-6
    assert torch.allclose(distributed, alone, rtol=1e-9, atol=1e-12), \
        (distributed - alone).abs().max()
