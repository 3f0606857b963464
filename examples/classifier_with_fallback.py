"""An implicit classifier on two interleaved spirals, whose blocks fall back to Anderson
acceleration where plain fixed-point iteration does not converge.

    python examples/classifier_with_fallback.py [--tiny]
"""

import argparse
import math

import torch
from torch import nn

import irn


def two_spirals(samples: int, generator: torch.Generator):
    """Points on two spirals (class 0 and 1) with a little noise: ``(2 samples, 2)``, labels."""
    t = torch.rand(samples, generator=generator) * 3 * math.pi + 0.5
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (3 * math.pi)
    x = torch.cat([arm, -arm]) + 0.02 * torch.randn(2 * samples, 2, generator=generator)
    return x, torch.cat([torch.zeros(samples), torch.ones(samples)]).long()


def main(tiny: bool):
    torch.manual_seed(0)
    x, labels = two_spirals(32 if tiny else 256, torch.Generator().manual_seed(0))
    width = 8
    model = irn.ImplicitModel(
        nn.Linear(2, width),
        irn.ImplicitResNet(width, 2 if tiny else 8, h=0.5, theta=1.0, activation="tanh",
                           init="random", solver=("fixed_point", "anderson"), max_iters=30),
        nn.Linear(width, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(5 if tiny else 300):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
    accuracy = (model(x).argmax(dim=1) == labels).float().mean().item()
    summary = irn.solve_summary(model)
    finished = [block.last_stats.solver for block in model.net.blocks]
    print(f"loss {loss.item():.4f}, training accuracy {accuracy:.3f}")
    print(f"forward converged: {summary.converged}, solvers that finished: {finished}, "
          f"path: {summary.path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on a small data set")
    main(parser.parse_args().tiny)
