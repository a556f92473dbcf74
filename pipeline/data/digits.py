"""``digits``: scikit-learn's bundled handwritten digits, the embedded default dataset.

1797 grey images of 8x8 pixels with values 0..16, 10 classes, shipped inside
scikit-learn (nothing is downloaded). Train/val/test is a fixed stratified split
derived from the seed (``test_fraction`` and ``val_fraction`` of all samples).
Pixels are divided by 16; images stay 8x8 unless ``data.image_size`` is set.
Horizontal flips are off by default: a mirrored digit is another symbol (or none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.base import DataSplits, register_dataset
from pipeline.data.images import ArrayStore
from pipeline.data.splits import assemble_splits, split_pool

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig

NATIVE_SIZE = 8
SCALE = 16.0


def _read_digits() -> np.ndarray:
    """scikit-learn's bundled digits table (64 pixels + label per row), read without importing
    scikit-learn, whose import costs about two seconds at the start of every stage."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as fh:
        return np.loadtxt(fh, delimiter=",")


@register_dataset("digits")
def build_digits(cfg: DataConfig, seed: int) -> DataSplits:
    """Build the digits splits: raw values 0..16 kept as uint8, scaled by 1/16, optionally resized."""
    raw = _read_digits()
    images = torch.from_numpy(raw[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8))  # [N, 1, 8, 8], 0..16
    labels = raw[:, 64].astype(np.int64)
    pool = ArrayStore(images, SCALE, cfg.image_size or NATIVE_SIZE)
    train, val, test = split_pool(labels, cfg.val_fraction, cfg.test_fraction, seed)
    return assemble_splits(
        "digits",
        cfg,
        seed,
        train=(pool.subset(train), labels[train]),
        val=(pool.subset(val), labels[val]),
        test=(pool.subset(test), labels[test]),
        class_names=[str(c) for c in range(10)],
        mode="L",
        scale=SCALE,
        native_size=NATIVE_SIZE,
        hflip_default=False,
    )
