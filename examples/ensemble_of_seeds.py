"""Five seeds of one implicit network trained as one ensemble: each member sees its own
data and stops its solves on its own; per-seed results come out of one training loop.

    python examples/ensemble_of_seeds.py [--tiny]
"""

import argparse

import torch

import irn


def main(tiny: bool):
    seeds, batch, dim = range(5), 16 if tiny else 128, 4
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)  # each member initialised as its own run would be
        nets.append(irn.ImplicitResNet(dim, 3, h=0.5, theta=0.5, activation="tanh",
                                       init="random"))
    ensemble = irn.ImplicitResNet.stack(nets)  # weights copied: members (5, batch, dim)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(seeds), batch, dim, generator=generator)
    target = torch.sin(x)  # learn y = sin(x) componentwise
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-2)
    for step in range(5 if tiny else 500):
        optimizer.zero_grad()
        per_member = (ensemble(x) - target).pow(2).mean(dim=(1, 2))  # (5,)
        per_member.sum().backward()  # members are independent: each gets its own gradient
        optimizer.step()
    summary = irn.solve_summary(ensemble)
    for seed, loss, converged in zip(seeds, per_member.tolist(), summary.converged):
        print(f"seed {seed}: mse {loss:.5f}, every solve converged: {converged}")
    single = ensemble.member(0)  # a standalone network with member 0's trained weights
    assert torch.allclose(single(x[0]), ensemble(x)[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on a small data set")
    main(parser.parse_args().tiny)
