"""Training-time augmentation of uint8 image batches [B, C, H, W], each image drawn on its own.

Every transform takes the generator it draws from, so a run's augmentation is reproducible and
independent of the shuffling order (``train_one_epoch`` gives it a generator of its own).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each uint8 image [B, C, H, W] by up to ``max_shift`` pixels, filling with 0."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    dev = images.device
    padded = nn.functional.pad(images, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_affine(images: torch.Tensor, rotate_deg: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image [B, C, H, W] by up to ``rotate_deg`` degrees and zoom by 1 +- ``scale``."""
    if (rotate_deg <= 0 and scale <= 0) or images.shape[0] == 0:  # affine_grid refuses an empty batch
        return images
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(b, generator=generator) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
    theta = theta.to(images.device)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(images.dtype)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image [B, C, H, W] left to right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    shift: int = 0,
    rotate_deg: float = 0.0,
    scale: float = 0.0,
    flip: bool = False,
) -> torch.Tensor:
    """Shift, then rotate and zoom, then flip (each only where asked for), drawing from ``generator``."""
    images = random_shift(images, shift, generator)
    images = random_affine(images, rotate_deg, scale, generator)
    return random_flip(images, generator) if flip else images
