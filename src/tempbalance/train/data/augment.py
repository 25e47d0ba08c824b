"""Batched training augmentation on the device: random crop with zero padding, horizontal flip.

No per-image Python: one gather for the crop and one ``torch.where`` for the flip per batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from .sharding import STREAM_AUGMENT, make_generator

if TYPE_CHECKING:
    from .registry import DatasetInfo

__all__ = ["crop_at", "flip_where", "random_crop_flip", "normalize"]


def crop_at(images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Crop each image of a batch at its own offset inside the zero-padded image.

    Args:
        images: (B, C, H, W) tensor, any dtype.
        padding: zero pixels added on every side (0 returns ``images``).
        dy, dx: (B,) int64 offsets in ``[0, 2 * padding]``; image ``b`` becomes
            ``pad(images[b])[:, dy[b]:dy[b] + H, dx[b]:dx[b] + W]``.

    Returns:
        (B, C, H, W) tensor of the same dtype and device.
    """
    if padding == 0:
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (dy.view(batch, 1) + torch.arange(height, device=images.device)).view(batch, 1, height, 1)
    cols = (dx.view(batch, 1) + torch.arange(width, device=images.device)).view(batch, 1, 1, width)
    b_idx = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    c_idx = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return padded[b_idx, c_idx, rows, cols]


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images whose ``mask`` entry is True. images: (B, C, H, W); mask: (B,) bool."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (``padding`` zero pixels per side) then random horizontal flip (p = 0.5).

    The random numbers come from ``generator`` (a CPU generator) and are moved to the images'
    device, so the result depends only on the generator's seed, not on the device.
    """
    batch = images.shape[0]
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    mask = torch.rand(batch, generator=generator) < 0.5
    offsets, mask = offsets.to(images.device), mask.to(images.device)
    return flip_where(crop_at(images, padding, offsets[0], offsets[1]), mask)


def normalize(raw: torch.Tensor, pixel_scale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(raw / pixel_scale - mean) / std`` as float32; mean/std broadcast over (B, C, ...)."""
    return (raw.to(torch.float32) / pixel_scale - mean) / std


def augmented_batches(
    raw_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    info: "DatasetInfo",
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    augment: bool,
    seed: int,
    epoch: int,
    rank: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches as the network sees them: each raw ``(x, y)`` batch gets the data set's
    augmentation (random crop + flip when ``augment`` and its policy is ``"crop-flip"``, drawn
    from the generator of ``(seed, epoch, rank)``), then normalisation."""
    generator = make_generator(seed, STREAM_AUGMENT, epoch, rank) if augment and info.augment == "crop-flip" else None
    for raw, y in raw_batches:
        if generator is not None:
            raw = random_crop_flip(raw, info.padding, generator)
        yield normalize(raw, info.pixel_scale, mean, std), y
