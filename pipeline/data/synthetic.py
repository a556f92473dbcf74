"""``synthetic``: a small generated dataset for tests and smoke runs, deterministic from the seed.

Each class is a sinusoidal grating with its own orientation (``pi * k / K``) and its
own colour contrast per channel, drawn with a random phase, a jittered frequency and
Gaussian pixel noise. Images have 3 channels (RGB), so the colour path that CIFAR and
image folders use in real runs is exercised by tests too, while ``digits`` covers the
grey path. Pixels are quantised to uint8 like a real image file, so the deployment
preprocessing (divide by 255) is the same as for photos. A tiny CNN separates the
classes well above chance within a few epochs; horizontal flips are off by default
because a mirrored grating has another orientation, i.e. another class.

Sizes: ``data.synthetic_samples`` images of ``data.synthetic_classes`` balanced
classes, ``data.synthetic_image_size`` pixels square; split like ``digits``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.base import DataSplits, register_dataset
from pipeline.data.images import ArrayStore
from pipeline.data.splits import assemble_splits, derive_seed, split_pool

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig

CHANNELS = 3
NOISE_STD = 0.15
CONTRAST = 0.4


def make_synthetic(num_samples: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``(images uint8 [N, 3, size, size], labels int64 [N])`` with balanced classes."""
    rng = np.random.default_rng(derive_seed(seed, "synthetic"))
    # Class colours are fixed (seed independent): a class looks the same in every run.
    palette = np.random.default_rng(12345).uniform(0.15, 1.0, size=(num_classes, CHANNELS))
    labels = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int64)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    angle = np.pi * labels / num_classes
    freq = rng.uniform(1.2, 2.0, size=num_samples)  # cycles per image side
    phase = rng.uniform(0.0, 2 * np.pi, size=num_samples)
    along = xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None]
    wave = np.cos(2 * np.pi * freq[:, None, None] * along + phase[:, None, None])  # [N, S, S]
    images = 0.5 + CONTRAST * wave[:, None] * palette[labels][:, :, None, None]
    images += rng.normal(0.0, NOISE_STD, size=images.shape)
    pixels = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return pixels, labels


@register_dataset("synthetic")
def build_synthetic(cfg: DataConfig, seed: int) -> DataSplits:
    """Build the synthetic splits (generated from ``seed``; split like digits)."""
    native = cfg.synthetic_image_size
    pixels, labels = make_synthetic(cfg.synthetic_samples, cfg.synthetic_classes, native, seed)
    pool = ArrayStore(torch.from_numpy(pixels), 255.0, cfg.image_size or native)
    train, val, test = split_pool(labels, cfg.val_fraction, cfg.test_fraction, seed)
    return assemble_splits(
        "synthetic",
        cfg,
        seed,
        train=(pool.subset(train), labels[train]),
        val=(pool.subset(val), labels[val]),
        test=(pool.subset(test), labels[test]),
        class_names=[f"pattern_{k}" for k in range(cfg.synthetic_classes)],
        mode="RGB",
        scale=255.0,
        native_size=native,
        hflip_default=False,
    )
