"""Dataset registry: digits (embedded default), cifar10/cifar100, mnist/fashion_mnist, imagefolder and synthetic.

``build_data(cfg.data, seed)`` returns :class:`DataSplits` (train, train_eval, val,
test plus shape, class and normalisation facts); :func:`preprocessing_spec` turns
them into the preprocessing a deployment runner repeats on raw images.
"""

from pipeline.data.base import (
    DATASET_NAMES,
    BadDatasetError,
    DatasetNotFoundError,
    DataSplits,
    build_data,
    register_dataset,
)
from pipeline.data.images import ImageDataset
from pipeline.data.preprocessing import preprocess_image, preprocessing_spec

# Importing the dataset modules registers them (order = DATASET_NAMES order).
from pipeline.data import digits, cifar, idx, imagefolder, synthetic  # noqa: E402,F401  isort: skip

__all__ = [
    "DATASET_NAMES",
    "BadDatasetError",
    "DataSplits",
    "DatasetNotFoundError",
    "ImageDataset",
    "build_data",
    "preprocess_image",
    "preprocessing_spec",
    "register_dataset",
]
