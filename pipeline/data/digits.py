"""``digits``: scikit-learn's bundled handwritten digits, the embedded default dataset.

1797 grey images of 8x8 pixels, 10 classes, shipped inside scikit-learn (nothing is
downloaded). Train/val/test is a fixed stratified split derived from the seed
(``test_fraction`` and ``val_fraction`` of all samples). Images stay 8x8 unless
``data.image_size`` is set.

scikit-learn stores each pixel as a count of 0..16. The pipeline trains on the 8-bit
rendering of it (:func:`to_8bit`: ``round(value x 255 / 16)``, what a PNG of the digit
holds, 0 black and 255 white ink) divided by 255, like every other dataset here: so a
bundle's preprocessing divides an ordinary 8-bit image file by 255 and the model sees
exactly the tensors it was trained on. (Dividing the raw counts by 16 instead would
train on 0..1 values that no image file on a device holds.)
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
#: The largest raw value of a pixel in scikit-learn's table.
RAW_MAX = 16
SCALE = 255.0


def to_8bit(raw: np.ndarray) -> np.ndarray:
    """The digits' raw 0..16 pixel counts as 8-bit grey levels, ``round(value x 255 / 16)`` (uint8).

    Exact halves round to even (only 8 -> 127.5 -> 128 occurs).
    """
    return np.round(np.asarray(raw, dtype=np.float64) * (255.0 / RAW_MAX)).astype(np.uint8)


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
    """Build the digits splits: 8-bit grey images (:func:`to_8bit`), scaled by 1/255, optionally resized."""
    raw = _read_digits()
    images = torch.from_numpy(to_8bit(raw[:, :64]).reshape(-1, 1, 8, 8))  # [N, 1, 8, 8], 0..255
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
