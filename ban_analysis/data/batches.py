"""Batches from an in-memory split: shuffle, random crop, flip and normalise on its device.

Vectorised over the batch (no per-sample Python loop), so the data path costs little next to a
training step; ``benchmarks/bench_data.py`` measures it. Re-exported by :mod:`ban_analysis.data`,
which is where users import it from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "flip", "crop_flip")


@dataclass(frozen=True)
class Split:
    """One split, held in memory.

    Attributes:
        x: (N, C, H, W) uint8 images.
        y: (N,) int64 labels.
        index: (N,) int64 sample ids (train/val: index in the original training set;
            test: index in the test set).
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as int if it is an integer in low..high, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}; got {value}")
    return int(value)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded batch, one offset per sample, vectorised.

    Same as torchvision ``RandomCrop(H, padding=pad)`` (fill 0) on each image: the output
    pixel (i, j) of sample b is padded[b, :, oy_b + i, ox_b + j] with oy, ox uniform in 0..2*pad.

    Args:
        x: (B, C, H, W) any dtype.
        pad: padding on every side, >= 0.
        generator: draws the offsets (on its own device) in the order oy, ox.

    Returns:
        (B, C, H, W) same dtype and device as ``x``.
    """
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros outside
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device).to(x.device)
    # All (2p+1)^2 crops as a view (no copy), then one advanced-indexing gather picks each
    # sample's crop: 3x faster than a flat-index torch.gather at 32 px (bench, 2 cores).
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W)
    return windows[torch.arange(b, device=x.device), :, oy, ox]  # (B, C, H, W)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (one uniform draw per sample).

    Args:
        x: (B, C, H, W).
        generator: draws the (B,) uniforms on its own device.

    Returns:
        (B, C, H, W).
    """
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def iterate_batches(
    split: Split,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    augment: str = "crop_flip",
    pad: int = 4,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of one pass over ``split``, augmented and normalised on the split's device.

    Per batch, in this order: crop (``crop_flip``; zero padding on the uint8 image, so padding
    is black as in torchvision), then flip (``flip``, ``crop_flip``), then
    ``(x / 255 - mean) / std`` in float32. The permutation is drawn once per call with
    ``torch.randperm(generator=generator)``; then per batch the crop offsets (oy, ox) and the
    flip draws, all on the generator's device, so a CPU generator gives the same batches on
    any device. On the CPU each batch is prepared with one torch thread (see ``_one_thread``);
    the caller's thread count is back in place whenever a batch is handed out.

    Args:
        split: the data.
        batch_size: samples per batch, >= 1.
        shuffle: random order (needs ``generator``), else the split's order.
        generator: required when ``shuffle`` or ``augment != "none"``.
        augment: one of ``AUGMENTATIONS``.
        pad: crop padding in pixels (``crop_flip`` only), >= 0.
        mean, std: per-channel normalisation; None -> 0 and 1 (x / 255 only).
        drop_last: drop a final batch smaller than ``batch_size``.

    Returns:
        An iterator of ``(x, y, index)``: x (B, C, H, W) float32, y (B,) int64, index (B,) int64
        (the ``Split.index`` of each sample).
    """
    check_int(batch_size, "batch_size", 1)
    check_int(pad, "pad", 0)
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; allowed: {', '.join(AUGMENTATIONS)}")
    if (shuffle or augment != "none") and generator is None:
        raise ValueError("iterate_batches: shuffle=True or augment != 'none' needs an explicit torch.Generator")
    channels = split.x.shape[1]
    mean = (0.0,) * channels if mean is None else tuple(mean)
    std = (1.0,) * channels if std is None else tuple(std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"mean and std need {channels} values each, std > 0; got mean={mean}, std={std}")
    return _batches(split, batch_size, shuffle, generator, augment, pad, mean, std, drop_last)


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """Run the block with torch's intra-op threads at 1, restoring the caller's count after.

    Batch preparation is a handful of small memory-bound ops (a 128-image CIFAR batch is
    400 kB), which gain nothing from threads; but when the cores are shared, every parallel op
    waits at an OpenMP barrier for a descheduled thread. Measured on the 2 shared cores of
    this project's machine (load average 6): 4-6 ms per batch at 1 thread vs 44-53 ms at 2.
    Setting the count costs under a microsecond.
    """
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(split, batch_size, shuffle, generator, augment, pad, mean, std, drop_last):
    device = split.x.device
    n = len(split)
    on_cpu = device.type == "cpu"
    # (x/255 - mean)/std folded into one multiply-add.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)  # (1, C, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    with _one_thread(on_cpu):
        if shuffle:
            order = torch.randperm(n, generator=generator, device=generator.device).to(device)
        else:
            order = torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        # The thread count is restored before the yield: the caller's training step keeps its own.
        with _one_thread(on_cpu):
            idx = order[start:start + batch_size]
            x = split.x[idx]  # (B, C, H, W) uint8
            if augment == "crop_flip":
                x = random_crop(x, pad, generator)
            if augment in ("flip", "crop_flip"):
                x = random_flip(x, generator)
            x = x.to(torch.float32).mul_(scale).add_(shift)  # (B, C, H, W) float32
            y, index = split.y[idx], split.index[idx]
        yield x, y, index
