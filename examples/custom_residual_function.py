"""A residual function of one's own (a two-layer perceptron) in implicit blocks, assembled
into a network with ImplicitResNet.from_blocks and trained with the Jacobian regulariser
(Hutchinson's estimate of ||J_F(y*)||_F^2, which keeps the solves contractive).

    python examples/custom_residual_function.py [--tiny]
"""

import argparse

import torch
from torch import nn

import irn


class TwoLayer(nn.Module):
    """F(y) = W_2 tanh(W_1 y + b_1): any module mapping a batch (B, d) to (B, d) will do."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inner, self.outer = nn.Linear(dim, hidden), nn.Linear(hidden, dim, bias=False)

    def forward(self, y):
        return self.outer(torch.tanh(self.inner(y)))


def main(tiny: bool):
    torch.manual_seed(0)
    dim = 2
    blocks = [irn.ImplicitResidualBlock(TwoLayer(dim, 16), h=0.5, theta=0.5)  # block's default
              for _ in range(2 if tiny else 4)]
    net = irn.ImplicitResNet.from_blocks(blocks, dim)
    net.keep_solution = True  # the regulariser reads the latest solutions y*
    x = torch.randn(16 if tiny else 256, dim)
    target = torch.stack([x[:, 1], -x[:, 0]], dim=1)  # a rotation by 90 degrees
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(5 if tiny else 400):
        optimizer.zero_grad()
        mse = (net(x) - target).pow(2).mean()
        jacobian = irn.regularizers.jacobian(net, probes=1)
        (mse + 0.1 * jacobian).backward()
        optimizer.step()
    summary = irn.solve_summary(net)
    print(f"mse {mse.item():.5f}, Jacobian penalty {jacobian.item():.4f}")
    print(f"iterations per block {summary.iterations}, converged {summary.converged}, "
          f"backward converged {summary.backward_converged}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on a small data set")
    main(parser.parse_args().tiny)
