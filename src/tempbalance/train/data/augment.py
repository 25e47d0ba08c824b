"""Batched training augmentation on the device: random crop with zero padding, horizontal flip.

No per-image Python: one gather for the crop and one ``torch.where`` for the flip per batch. The
random offsets and flips are drawn on the CPU a block of batches at a time and reach the device in
one copy per block (pinned and non-blocking on CUDA), so no batch waits for a host-to-device copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .sharding import STREAM_AUGMENT, make_generator

if TYPE_CHECKING:
    from .registry import DatasetInfo

__all__ = ["crop_at", "draw_crop_flip", "flip_where", "random_crop_flip", "normalize"]

BLOCK_SAMPLES = 1 << 16  # draws per host-to-device copy: 1.5 MiB of int64 (a whole CIFAR epoch)


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


def draw_crop_flip(
    generator: torch.Generator,
    batch_sizes: Sequence[int],
    padding: int,
    device: str | torch.device,
    block_samples: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The random crop offsets and flips of consecutive batches, ``(dy, dx, flip)`` per batch on ``device``.

    For each batch of size ``B``, in order, ``generator`` (a CPU generator) draws
    ``torch.randint(0, 2 * padding + 1, (2, B))`` (rows ``dy``, ``dx``) and then ``torch.rand(B) < 0.5``
    (``flip``): the same stream whatever the block size or device. The draws of up to ``block_samples``
    examples (default :data:`BLOCK_SAMPLES`; at least one batch) are written into one host buffer
    (pinned when ``device`` is CUDA) and moved with one non-blocking copy; on the CPU they are used
    in place.

    Yields:
        ``dy``, ``dx``: (B,) int64 in ``[0, 2 * padding]``; ``flip``: (B,) bool. All on ``device``.
    """
    device = torch.device(device)
    limit = BLOCK_SAMPLES if block_samples is None else block_samples
    sizes = [int(size) for size in batch_sizes]
    start = 0
    while start < len(sizes):
        stop, total = start + 1, sizes[start]
        while stop < len(sizes) and total + sizes[stop] <= limit:
            total += sizes[stop]
            stop += 1
        host = torch.empty(3 * total, dtype=torch.int64, pin_memory=device.type == "cuda")
        offset = 0
        for size in sizes[start:stop]:
            chunk = host[offset : offset + 3 * size].view(3, size)
            torch.randint(0, 2 * padding + 1, (2, size), generator=generator, out=chunk[:2])
            chunk[2].copy_(torch.rand(size, generator=generator) < 0.5)
            offset += 3 * size
        moved = host if device.type == "cpu" else host.to(device, non_blocking=True)
        offset = 0
        for size in sizes[start:stop]:
            chunk = moved[offset : offset + 3 * size].view(3, size)
            yield chunk[0], chunk[1], chunk[2].bool()
            offset += 3 * size
        start = stop


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (``padding`` zero pixels per side) then random horizontal flip (p = 0.5).

    The random numbers come from ``generator`` (a CPU generator, see :func:`draw_crop_flip`) and
    are moved to the images' device, so the result depends only on the generator's seed, not on
    the device.
    """
    ((dy, dx, flip),) = draw_crop_flip(generator, [images.shape[0]], padding, images.device)
    return flip_where(crop_at(images, padding, dy, dx), flip)


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
    batch_sizes: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches as the network sees them: each raw ``(x, y)`` batch gets the data set's
    augmentation (random crop + flip when ``augment`` and its policy is ``"crop-flip"``, drawn
    from the generator of ``(seed, epoch, rank)``), then normalisation.

    ``batch_sizes`` (the sizes of the raw batches, in order, when known ahead) lets the random
    draws of many batches travel to the device in one copy (:func:`draw_crop_flip`); without it
    each batch's draws are copied on their own. The numbers are the same either way.
    """
    generator = make_generator(seed, STREAM_AUGMENT, epoch, rank) if augment and info.augment == "crop-flip" else None
    if generator is None:
        for raw, y in raw_batches:
            yield normalize(raw, info.pixel_scale, mean, std), y
        return
    draws = draw_crop_flip(generator, batch_sizes, info.padding, mean.device) if batch_sizes is not None else None
    for raw, y in raw_batches:
        if draws is None:
            raw = random_crop_flip(raw, info.padding, generator)
        else:
            dy, dx, flip = next(draws)
            if dy.shape[0] != raw.shape[0]:
                raise ConfigError(f"batch_sizes gave {dy.shape[0]} examples for a batch of {raw.shape[0]}")
            raw = flip_where(crop_at(raw, info.padding, dy, dx), flip)
        yield normalize(raw, info.pixel_scale, mean, std), y
