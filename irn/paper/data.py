"""The datasets of the paper's examples, generated (nothing is downloaded)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Dataset:
    """Training and validation tensors, batch-first."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def to(self, device=None, dtype=None) -> "Dataset":
        """Move to ``device``; cast the floating-point tensors (inputs, regression targets) to ``dtype``."""
        def move(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return Dataset(move(self.x_train), move(self.y_train), move(self.x_val), move(self.y_val))


def sine(n_train: int = 20, n_val: int = 40, low: float = -5.0, high: float = 5.0,
         dtype=torch.float64) -> Dataset:
    """Example 1: ``f(x) = sin(x)``, training on ``linspace(low, high, n_train)``, validation on
    ``linspace(low, high, n_val)``; shapes ``(n, 1)``."""
    x_train = torch.linspace(low, high, n_train, dtype=dtype).unsqueeze(1)
    x_val = torch.linspace(low, high, n_val, dtype=dtype).unsqueeze(1)
    return Dataset(x_train, torch.sin(x_train), x_val, torch.sin(x_val))


def two_spirals(points: int = 97, turns: float = 1.5, dtype=torch.float64) -> Dataset:
    """Example 2: class 0 is ``r_i (cos a_i, sin a_i)``, ``a_i = 2 pi turns i / (points - 1)``,
    ``r_i = (points + 7 - i) / (points + 7)``, ``i = 0..points-1`` (with the defaults,
    ``a_i = 3 pi i / 96`` and ``r_i = (104 - i) / 104``); class 1 is its negative. Of the
    concatenated ``2 * points`` samples the even indices train and the odd ones validate."""
    i = torch.arange(points, dtype=dtype)
    angle = 2 * math.pi * turns * i / (points - 1)
    radius = (points + 7 - i) / (points + 7)
    spiral = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    x = torch.cat([spiral, -spiral])
    labels = torch.cat([torch.zeros(points, dtype=torch.long), torch.ones(points, dtype=torch.long)])
    return Dataset(x[0::2], labels[0::2], x[1::2], labels[1::2])


def swiss_roll(points: int = 513, gap: float = 0.2, dtype=torch.float64) -> Dataset:
    """Example 2 as in the paper's source, Haber & Ruthotto (2017): for ``i = 0..points-1``,
    ``a_i = 4 pi i / (points - 1)``, ``r_i = i / (points - 1)``; class 0 is
    ``r_i (cos a_i, sin a_i)``, class 1 is ``(r_i + gap)(cos a_i, sin a_i)`` (two turns, the
    second spiral ``gap`` outside the first). Of the ``2 * points`` samples (class 0, then
    class 1) the even indices validate and the odd ones train: 513 each by default."""
    i = torch.arange(points, dtype=dtype)
    angle = 4 * math.pi * i / (points - 1)
    radius = i / (points - 1)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    x = torch.cat([radius.unsqueeze(1) * direction, (radius + gap).unsqueeze(1) * direction])
    labels = torch.cat([torch.zeros(points, dtype=torch.long), torch.ones(points, dtype=torch.long)])
    return Dataset(x[1::2], labels[1::2], x[0::2], labels[0::2])


def digits(dtype=torch.float64) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes; shipped with
    the package, nothing is downloaded): inputs are the 64 pixel intensities scaled to
    [0, 1], shape ``(n, 64)``; labels 0-9. Every fourth sample (index 3, 7, ...) validates
    (449 samples, 41-50 per class), the other 1348 train."""
    from sklearn.datasets import load_digits  # imported here: only this dataset needs it

    raw = load_digits()
    x = torch.tensor(raw.data / 16.0, dtype=dtype)
    labels = torch.tensor(raw.target, dtype=torch.long)
    val = torch.arange(len(labels)) % 4 == 3
    return Dataset(x[~val], labels[~val], x[val], labels[val])
