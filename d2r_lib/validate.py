"""Argument checks shared by every module: each error names the parameter and what is allowed."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def choice(name: str, value, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def number(name: str, value, *, min=None, max=None, min_open: bool = False, integer: bool = False):
    """Check a real (or integer) number against bounds; min_open=True makes the lower bound strict."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TypeError(f"{name} must be {kind}; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if min is not None and (value <= min if min_open else value < min):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {min}; got {value!r}")
    if max is not None and value > max:
        raise ValueError(f"{name} must be <= {max}; got {value!r}")
    return value


def eps(value, name: str = "eps"):
    return number(name, value, min=0)


def step_size(value, name: str = "step_size"):
    return number(name, value, min=0, min_open=True)


def steps(value, name: str = "steps"):
    return number(name, value, min=1, integer=True)


def images(x, name: str = "x") -> torch.Tensor:
    """x must be a float tensor (N, C, H, W) with every value in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, channels, height, width); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with pixels in [0, 1]; got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{name} must have pixels in [0, 1] (no mean/std normalisation); "
            f"got values in [{x.min().item():.4g}, {x.max().item():.4g}]"
        )
    return x


def labels(y, num_classes: int, batch: int, name: str = "y") -> torch.Tensor:
    """y must be an integer tensor of shape (batch,) with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer torch.Tensor of class indices; got {getattr(y, 'dtype', type(y))}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch; got {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes - 1}]; "
            f"got values in [{y.min().item()}, {y.max().item()}]"
        )
    return y


def logits(z, name: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"{name} must be a (batch, classes) tensor of logits; got {getattr(z, 'shape', type(z))}")
    return z


def same_shape(**tensors) -> None:
    """All named tensors must have the same shape (same batch and class count)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"mismatched batch or class sizes: {listed}; they must be equal")


def same_batch(**tensors) -> None:
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} has {n}" for k, n in sizes.items())
        raise ValueError(f"mismatched batch sizes: {listed}; they must be equal")
