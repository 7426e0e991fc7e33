"""Batch augmentation on tensors, like Keras' ImageDataGenerator but one affine warp per batch.

Augmenting a whole uint8 batch with one `grid_sample` costs a few milliseconds, where per-image
PIL transforms would cost more than the network on 2 cores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from asirra.config import AugmentConfig


def random_affine(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: float (N, 3, H, W) -> the same batch, each image warped by its own random affine map."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-1, 1) * math.radians(config.rotation_deg)
    shear = uniform(-config.shear, config.shear)
    scale = uniform(1 - config.zoom, 1 + config.zoom)
    tx, ty = uniform(-config.shift, config.shift) * 2, uniform(-config.shift, config.shift) * 2
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)

    cos, sin = torch.cos(angle), torch.sin(angle)
    # Sampling-grid matrix (output -> input coordinates): rotation @ shear, divided by zoom, then flip.
    a = (cos * flip) / scale
    b = (-sin + cos * torch.tan(shear)) / scale
    c = (sin * flip) / scale
    d = (cos + sin * torch.tan(shear)) / scale
    theta = torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # "border" repeats edge pixels, as Keras' default fill_mode="nearest".
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_float_batch(pixels, channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, H, W, 3) numpy or tensor -> float (N, 3, H, W) in [0, 255]."""
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
