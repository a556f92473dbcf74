"""Pixels: where images live, how they are resized, augmented and normalised.

Every dataset in the registry ends up as an :class:`ImageDataset` over an image
*store*. A store hands back one image as a float32 tensor ``[C, S, S]`` scaled to
[0, 1] at the final size; the dataset adds training augmentation (padded random
crop, optional horizontal flip) and normalisation. Keeping the raw-pixel handling
here, in one place, is what lets :mod:`pipeline.data.preprocessing` describe it
exactly for a deployment runner that has only numpy and Pillow.

Resizing rule (shared with the runner): scale the raw pixels to [0, 1] first, then
resize every channel as a Pillow float image (mode ``"F"``) with the BILINEAR
filter to ``size x size`` (aspect ratio is not kept). Doing it in float keeps the
digits' 17 grey levels from being rounded when they are upscaled.

Randomness: augmentation draws from torch's global RNG, which the engine reseeds
per epoch, so a run is deterministic and resumable; DataLoader workers get their
own seeds derived from that RNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.base import BadDatasetError

log = logging.getLogger(__name__)

#: Largest float32 cache (bytes) one store builds in memory; bigger stores resize lazily per item.
CACHE_BUDGET_BYTES = 1 << 30

#: Image folders with fewer files than this are decoded once and kept in memory (if within the budget).
FOLDER_CACHE_MAX_FILES = 20_000


def crop_padding(size: int) -> int:
    """Padding of the random crop for images of side ``size``: 4 at 32 px, scaled with size, at least 1."""
    return max(1, size // 8)


def resize_float(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a float32 ``[C, H, W]`` array to ``[C, size, size]``, channel by channel, with Pillow BILINEAR.

    The one resize used for training data; the edge runner repeats it with the same
    Pillow call (see :mod:`pipeline.data.preprocessing`), so train and deploy agree.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.shape[1] == size and image.shape[2] == size:
        return np.ascontiguousarray(image)
    out = np.empty((image.shape[0], size, size), dtype=np.float32)
    for c in range(image.shape[0]):
        channel = Image.fromarray(np.ascontiguousarray(image[c]))  # float32 2-D -> mode "F"
        out[c] = np.asarray(channel.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


class ImageStore(Protocol):
    """Where a split's images come from: ``load(i)`` gives float32 ``[C, S, S]`` in [0, 1] at the final size."""

    channels: int
    size: int

    def __len__(self) -> int: ...

    def load(self, i: int) -> torch.Tensor: ...

    def subset(self, indices: Sequence[int]) -> ImageStore: ...


class ArrayStore:
    """Images held in memory as a tensor ``[N, C, H, W]`` of raw values (uint8), divided by ``scale`` on load.

    When the final ``size`` differs from the stored one, :meth:`materialise` resizes
    all images once into a float32 tensor if that fits :data:`CACHE_BUDGET_BYTES`;
    otherwise each image is resized when it is loaded.
    """

    def __init__(self, images: torch.Tensor, scale: float, size: int) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        self.images = images
        self.scale = float(scale)
        self.size = int(size)
        self.channels = int(images.shape[1])
        self._resized: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def needs_resize(self) -> bool:
        """Whether the stored images differ in size from the final size."""
        return tuple(self.images.shape[2:]) != (self.size, self.size)

    def subset(self, indices: Sequence[int]) -> ArrayStore:
        """A store over the given positions (a copy of those rows; no resize done yet)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayStore(self.images[index], self.scale, self.size)

    def materialise(self) -> ArrayStore:
        """Resize every image now (once) when a resize is needed and the result fits the memory budget."""
        if self.needs_resize and self._resized is None:
            nbytes = len(self) * self.channels * self.size * self.size * 4
            if nbytes <= CACHE_BUDGET_BYTES:
                raw = self.images.numpy()
                out = np.empty((len(self), self.channels, self.size, self.size), dtype=np.float32)
                for i in range(len(self)):
                    out[i] = resize_float(raw[i].astype(np.float32) / self.scale, self.size)
                self._resized = torch.from_numpy(out)
            else:
                log.info("resizing %d images lazily (a cache would take %.1f GiB)", len(self), nbytes / 2**30)
        return self

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 ``[C, S, S]`` in [0, 1]; a shared tensor, never modify it in place."""
        if self._resized is not None:
            return self._resized[i]
        x = self.images[i].to(torch.float32) / self.scale
        if self.needs_resize:
            x = torch.from_numpy(resize_float(x.numpy(), self.size))
        return x


def read_image_file(path: str | Path, size: int) -> torch.Tensor:
    """Decode one image file as RGB, scale to [0, 1] and resize: float32 ``[3, size, size]``."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(resize_float(rgb.transpose(2, 0, 1), size))


class FileStore:
    """Images read from files (RGB), optionally from a cache of already decoded and resized tensors."""

    def __init__(self, paths: Sequence[str], size: int, cache: dict[str, torch.Tensor] | None = None) -> None:
        self.paths = list(paths)
        self.size = int(size)
        self.channels = 3
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> FileStore:
        """A store over the given positions, sharing the cache."""
        return FileStore([self.paths[int(i)] for i in indices], self.size, self.cache)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 ``[3, S, S]`` in [0, 1] (cached tensors are shared: never modify in place)."""
        path = self.paths[i]
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        try:
            return read_image_file(path, self.size)
        except Exception as exc:  # a file that changed or vanished after the build-time check
            raise BadDatasetError(f"cannot read image {path}: {exc}") from exc


def channel_stats(
    store: ImageStore, max_items: int | None = None, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a store's pixels (all items, or a seeded sample of ``max_items``).

    Used on the training split so that normalised training images have mean ~0 and
    std ~1 per channel. A constant channel gets std 1 rather than a division by zero.
    """
    n = len(store)
    if n == 0:
        raise ValueError("cannot compute normalisation statistics of an empty training split")
    indices = np.arange(n)
    if max_items is not None and n > max_items:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))
    total = np.zeros(store.channels, dtype=np.float64)
    total_sq = np.zeros(store.channels, dtype=np.float64)
    count = 0
    for i in indices:
        x = store.load(int(i)).to(torch.float64).reshape(store.channels, -1)
        total += x.sum(dim=1).numpy()
        total_sq += (x * x).sum(dim=1).numpy()
        count += x.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad ``x`` [C, H, W] by ``pad`` on each side (black, before normalising), crop back at a random offset."""
    if pad <= 0:
        return x
    c, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    padded = x.new_zeros((c, h + 2 * pad, w + 2 * pad))
    padded[:, pad : pad + h, pad : pad + w] = x
    return padded[:, dy : dy + h, dx : dx + w]


class ImageDataset(Dataset):
    """One split: items are ``(image float32 [C, S, S] normalised, label int, index int)``.

    ``index`` is the item's position in this split (0..len-1), which CRD's memory
    bank and per-sample bookkeeping rely on. With ``augment`` the image gets a
    zero-padded random crop (``pad`` pixels) and, if ``hflip``, a random horizontal
    flip, drawn from torch's global RNG.

    Attributes: ``labels`` (int64 numpy array, the labels the split trains on) and
    ``clean_labels`` (the labels before any label noise; equal to ``labels`` otherwise).
    """

    def __init__(
        self,
        store: ImageStore,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        pad: int = 0,
        hflip: bool = False,
        clean_labels: np.ndarray | None = None,
    ) -> None:
        if len(store) != len(labels):
            raise ValueError(f"{len(store)} images but {len(labels)} labels")
        self.store = store
        self.labels = np.asarray(labels, dtype=np.int64)
        self.clean_labels = self.labels if clean_labels is None else np.asarray(clean_labels, dtype=np.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self.pad = int(pad)
        self.hflip = bool(hflip)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.labels)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a split of {n} items")
        i = int(index) % n
        x = self.store.load(i)
        if self.augment:
            x = random_crop(x, self.pad)
            if self.hflip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - self._mean) / self._std
        return x, int(self.labels[i]), i
