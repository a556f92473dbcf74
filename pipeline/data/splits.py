"""Who goes where: stratified splits, the few-sample subset, label noise, and assembling :class:`DataSplits`.

Everything here is deterministic from the run's seed. Each purpose draws from its
own seed derived from ``(seed, purpose)``, so changing e.g. ``label_noise`` never
moves the validation split.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.base import BadDatasetError, DataSplits
from pipeline.data.images import ArrayStore, ImageDataset, ImageStore, channel_stats, crop_padding

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig


def derive_seed(seed: int, purpose: str) -> int:
    """A 31-bit seed for one purpose (``"split"``, ``"noise"``, ...) derived from the run seed."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode())]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def _holdout(
    indices: np.ndarray, labels: np.ndarray, fraction: float, n_total: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``indices`` into (kept, held out): ``fraction * n_total`` held out, >= 1 per class."""
    n_classes = len(np.unique(labels[indices]))
    n_hold = max(n_classes, int(round(fraction * n_total)))
    if n_hold > len(indices) - n_classes:
        raise BadDatasetError(
            f"cannot hold out {n_hold} of {len(indices)} samples for {what} and keep every one of the "
            f"{n_classes} classes in the rest; lower the fraction or add data"
        )
    counts = np.bincount(labels[indices])
    if counts[counts > 0].min() < 2:
        small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
        raise BadDatasetError(
            f"cannot split a stratified {what} set: class(es) {small} have a single sample; "
            "every class needs at least 2"
        )
    hold = _stratified_pick(indices, labels[indices], n_hold, seed)
    keep = np.setdiff1d(indices, hold)
    return np.sort(keep), np.sort(hold)


def _stratified_pick(indices: np.ndarray, lab: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``indices`` drawn per class in proportion to its size (largest remainder),
    at least one per class and never a whole class, shuffled by ``seed``.

    Our own few lines instead of scikit-learn's splitter: importing scikit-learn costs
    about two seconds at the start of every stage.
    """
    classes, counts = np.unique(lab, return_counts=True)
    exact = counts * n / len(lab)
    take = np.clip(np.floor(exact).astype(int), 1, counts - 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    diff = int(n - take.sum())
    for step in range(4 * len(classes) * max(1, abs(diff))):
        if diff == 0:
            break
        c = order[step % len(classes)]
        if diff > 0 and take[c] < counts[c] - 1:
            take[c] += 1
            diff -= 1
        elif diff < 0 and take[c] > 1:
            take[c] -= 1
            diff += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(indices[lab == c])[: take[i]] for i, c in enumerate(classes)]
    return np.concatenate(picked)


def split_pool(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test positions of a pool with no official test split (digits, synthetic).

    test holds ``test_fraction`` of all samples and val ``val_fraction`` of all; train
    is the rest. The split depends only on the labels and the seed.
    """
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    rest, test = _holdout(everything, labels, test_fraction, len(labels), derive_seed(seed, "split:test"), "test")
    train, val = _holdout(rest, labels, val_fraction, len(labels), derive_seed(seed, "split:val"), "validation")
    return train, val, test


def carve_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) positions carved from an official training split (cifar, imagefolder)."""
    labels = np.asarray(labels)
    return _holdout(
        np.arange(len(labels)), labels, val_fraction, len(labels), derive_seed(seed, "split:val"), "validation"
    )


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a stratified ``fraction`` of ``labels`` keeping at least one sample of every class.

    The count is ``round(fraction * n)`` (raised to the number of classes when that is
    larger); classes get their proportional share, rounded by largest remainder,
    never below one. Used for the few-sample scenario (``data.train_fraction``).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if fraction >= 1.0:
        return np.arange(n)
    classes = np.unique(labels)
    target = min(n, max(len(classes), int(round(fraction * n))))
    members = [np.flatnonzero(labels == c) for c in classes]
    sizes = np.array([len(m) for m in members])
    exact = sizes * target / n
    quota = np.maximum(1, np.floor(exact).astype(int))
    # Give what is left (or take back what the minimum of one overshot) by largest remainder.
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while quota.sum() < target:
        for k in order:
            if quota.sum() == target:
                break
            if quota[k] < sizes[k]:
                quota[k] += 1
    while quota.sum() > target:
        for k in order[::-1]:
            if quota.sum() == target:
                break
            if quota[k] > 1:
                quota[k] -= 1
    rng = np.random.default_rng(derive_seed(seed, "train_fraction"))
    chosen = [rng.choice(m, size=q, replace=False) for m, q in zip(members, quota, strict=True)]
    return np.sort(np.concatenate(chosen))


def add_label_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Symmetric label noise: ``round(rate * n)`` labels replaced by a uniformly drawn *different* class.

    Returns the noisy labels and the sorted positions that were changed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_flip = int(round(rate * len(labels)))
    if n_flip == 0:
        return labels.copy(), []
    rng = np.random.default_rng(derive_seed(seed, "label_noise"))
    flipped = np.sort(rng.choice(len(labels), size=n_flip, replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    return noisy, [int(i) for i in flipped]


def _materialise(store: ImageStore) -> ImageStore:
    """Let a store build its resize cache (stores without one are returned as they are)."""
    materialise = getattr(store, "materialise", None)
    return materialise() if materialise is not None else store


def assemble_splits(
    name: str,
    cfg: DataConfig,
    seed: int,
    *,
    train: tuple[ImageStore, np.ndarray],
    val: tuple[ImageStore, np.ndarray],
    test: tuple[ImageStore, np.ndarray],
    class_names: Sequence[str],
    mode: str,
    scale: float,
    native_size: int | None,
    hflip_default: bool,
    known_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    stats_max_items: int | None = None,
    skipped_files: Sequence[str] = (),
) -> DataSplits:
    """Turn per-split (store, labels) into :class:`DataSplits`, applying the options common to every dataset.

    In order: the stratified few-sample subset of train (``train_fraction``), label
    noise on train (``label_noise``), normalisation statistics (``known_stats`` or
    computed on the final train split, at most ``stats_max_items`` images), and the
    training augmentation (crop padding scaled with the image size; horizontal flip
    from ``cfg.hflip`` or else ``hflip_default``).
    """
    train_store, train_labels = train
    train_labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = len(class_names)
    if cfg.train_fraction < 1.0:
        keep = stratified_subset(train_labels, cfg.train_fraction, seed)
        train_store, train_labels = train_store.subset(keep), train_labels[keep]
    train_store = _materialise(train_store)
    val_store, test_store = _materialise(val[0]), _materialise(test[0])
    noisy_labels, noisy_indices = add_label_noise(train_labels, cfg.label_noise, num_classes, seed)

    if known_stats is not None:
        mean, std = tuple(float(m) for m in known_stats[0]), tuple(float(s) for s in known_stats[1])
    else:
        mean, std = channel_stats(train_store, stats_max_items, derive_seed(seed, "stats"))

    size = train_store.size
    hflip = bool(cfg.hflip if cfg.hflip is not None else hflip_default) and cfg.augment
    pad = crop_padding(size) if cfg.augment else 0

    def dataset(
        store: ImageStore, labels: np.ndarray, augment: bool = False, clean: np.ndarray | None = None
    ) -> ImageDataset:
        return ImageDataset(store, labels, mean, std, augment=augment, pad=pad, hflip=hflip, clean_labels=clean)

    return DataSplits(
        name=name,
        train=dataset(train_store, noisy_labels, augment=cfg.augment, clean=train_labels),
        train_eval=dataset(train_store, noisy_labels, clean=train_labels),
        val=dataset(val_store, val[1]),
        test=dataset(test_store, test[1]),
        num_classes=num_classes,
        in_channels=train_store.channels,
        image_size=size,
        class_names=list(class_names),
        mean=mean,
        std=std,
        hflip=hflip,
        pad=pad,
        noisy_indices=noisy_indices,
        skipped_files=list(skipped_files),
        mode=mode,
        scale=float(scale),
        native_size=native_size,
    )


def official_test_splits(
    name: str,
    cfg: DataConfig,
    seed: int,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    class_names: Sequence[str],
    mode: str,
    native_size: int,
    hflip_default: bool,
    known_stats: tuple[Sequence[float], Sequence[float]],
) -> DataSplits:
    """The splits of a dataset that ships a training set and an official test set as uint8 arrays [N, C, H, W]
    (CIFAR, MNIST, Fashion-MNIST): val carved stratified from the training set, test kept whole."""
    (train_x, train_y), (test_x, test_y) = train, test
    size = cfg.image_size or native_size
    pool = ArrayStore(torch.from_numpy(np.ascontiguousarray(train_x)), 255.0, size)
    kept, val = carve_val(train_y, cfg.val_fraction, seed)
    return assemble_splits(
        name,
        cfg,
        seed,
        train=(pool.subset(kept), train_y[kept]),
        val=(pool.subset(val), train_y[val]),
        test=(ArrayStore(torch.from_numpy(np.ascontiguousarray(test_x)), 255.0, size), test_y),
        class_names=class_names,
        mode=mode,
        scale=255.0,
        native_size=native_size,
        hflip_default=hflip_default,
        known_stats=known_stats,
    )
