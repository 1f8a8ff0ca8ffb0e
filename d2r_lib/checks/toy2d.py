"""A minimal two-dimensional world for the prediction and design tasks of the exercise notebooks.

Two interleaved moons in [0, 1]², shaped (n, 2, 1, 1) so the library's attacks and
`methods.train_step` take them as images; small MLPs with BatchNorm as target and guide. Every
training step is `methods.train_step`. Runs take a second or two on one CPU thread.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import attacks, methods

__all__ = ["moons", "mlp", "train", "accuracy", "pgd_accuracy"]


def moons(n: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of two interleaved moons in [0, 1]² as (n, 2, 1, 1), labels 0/1 (balanced)."""
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    theta = math.pi * torch.rand(n, generator=g)
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    y = (torch.arange(n) >= half).long()
    xy = torch.where(y[:, None] == 0, upper, lower)
    xy = 0.5 + (xy - torch.tensor([0.5, 0.25])) / 3.5 + noise * torch.randn(n, 2, generator=g)
    order = torch.randperm(n, generator=g)
    return xy[order].clamp(0, 1).view(n, 2, 1, 1), y[order]


def mlp(width: int = 32, seed: int = 0) -> nn.Module:
    """Linear → BatchNorm → ReLU, twice, and a linear head (2 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(2, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 2),
    )


def train(
    method: str,
    *,
    seed: int,
    epochs: int = 15,
    width: int = 32,
    guide_width: int | None = None,
    n: int = 600,
    batch_size: int = 200,
    lr: float = 0.02,
    **params,
):
    """Train `method` on `moons(n, seed)` with `methods.train_step`; models in eval mode."""
    m = methods.get_method(method)
    x, y = moons(n, seed)
    target = mlp(width, seed)
    guide = mlp(guide_width or width, seed + 1000) if m.uses_guide else None
    optimizer = methods.make_optimizer(target, guide, lr=lr)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            methods.train_step(m, target, guide, optimizer, x[idx], y[idx], **params)
    target.eval()
    if guide is not None:
        guide.eval()
    return target, guide


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with attacks.eval_mode(model), torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def pgd_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0
) -> float:
    """Accuracy under L∞ PGD-20 (step eps/4) on the cross-entropy."""
    torch.manual_seed(seed)
    return accuracy(model, attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=20), y)
