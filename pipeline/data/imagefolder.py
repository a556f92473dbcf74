"""``imagefolder``: a user's own images in class folders under ``data.root``.

Layout::

    <root>/train/<class>/<image files>   training pool (val is carved from it)
    <root>/val/<class>/<image files>     held-out images: the test split

Class names are the sorted sub-folder names of ``train/``; ``val/`` must have the
same ones. Files with an image extension are used (others, and hidden files, are
ignored); a class folder without images is an error naming it. Every image is
checked once when the splits are built; unreadable files follow ``data.bad_images``:
``fail`` stops with the file's path, ``skip`` leaves them out with a logged warning
(and lists them in ``DataSplits.skipped_files``).

Images are converted to RGB and resized to ``data.image_size``, or to
:data:`DEFAULT_SIZE` (64) when it is not set: the native sizes of a folder vary,
and 64 keeps CPU training practical (set 224 for ImageNet-style models). Small
folders (fewer than 20000 files whose decoded images fit the memory budget) are
decoded once and kept in memory; larger ones are read lazily per item.
Normalisation statistics come from (a seeded sample of up to 2000 images of) the
training split; horizontal flips are on by default.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.data.base import BadDatasetError, DatasetNotFoundError, DataSplits, register_dataset
from pipeline.data.images import CACHE_BUDGET_BYTES, FOLDER_CACHE_MAX_FILES, FileStore, read_image_file
from pipeline.data.splits import assemble_splits, carve_val

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig

log = logging.getLogger(__name__)

DEFAULT_SIZE = 64
STATS_MAX_ITEMS = 2000
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

LAYOUT = "<root>/train/<class>/<images> and <root>/val/<class>/<images>, with the same class folders in both"


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Map each class folder of ``split_dir`` to its image files (sorted); errors name an empty class folder."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} has no class folders; expected layout: {LAYOUT}")
    files: dict[str, list[Path]] = {}
    for folder in classes:
        images = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise BadDatasetError(
                f"class folder {folder} contains no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        files[folder.name] = images
    return files


def _check(path: Path, size: int, decode: bool) -> torch.Tensor | None:
    """Check that ``path`` is a readable image (Pillow verify), and decode it if ``decode``; raise on failure."""
    with Image.open(path) as im:
        im.verify()
    return read_image_file(path, size) if decode else None


@register_dataset("imagefolder")
def build_imagefolder(cfg: DataConfig, seed: int) -> DataSplits:
    """Build splits from ``cfg.root/train`` (train + carved val) and ``cfg.root/val`` (test)."""
    if cfg.root is None:
        raise DatasetNotFoundError(f"data.root is not set; the imagefolder dataset expects {LAYOUT}")
    root = Path(cfg.root).expanduser()
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DatasetNotFoundError(f"{root / sub} not found (data.root = {cfg.root!r}); expected {LAYOUT}")
    train_files, val_files = _class_files(root / "train"), _class_files(root / "val")
    if list(train_files) != list(val_files):
        only_train = sorted(set(train_files) - set(val_files))
        only_val = sorted(set(val_files) - set(train_files))
        raise BadDatasetError(
            f"class folders of {root / 'train'} and {root / 'val'} differ: only in train/: {only_train}, "
            f"only in val/: {only_val}; both must hold the same classes"
        )
    class_names = list(train_files)
    size = cfg.image_size or DEFAULT_SIZE
    total = sum(len(v) for v in train_files.values()) + sum(len(v) for v in val_files.values())
    cache_bytes = total * 3 * size * size * 4
    cache: dict[str, torch.Tensor] | None = (
        {} if total < FOLDER_CACHE_MAX_FILES and cache_bytes <= CACHE_BUDGET_BYTES else None
    )

    skipped: list[str] = []

    def usable(files: dict[str, list[Path]]) -> tuple[list[str], np.ndarray]:
        paths: list[str] = []
        labels: list[int] = []
        for label, images in enumerate(files.values()):
            kept = 0
            for path in images:
                try:
                    decoded = _check(path, size, decode=cache is not None)
                except Exception as exc:
                    if cfg.bad_images == "fail":
                        raise BadDatasetError(
                            f"unreadable image {path}: {exc}. Fix or remove it, or set data.bad_images: skip"
                        ) from exc
                    skipped.append(str(path))
                    continue
                if cache is not None and decoded is not None:
                    cache[str(path)] = decoded
                paths.append(str(path))
                labels.append(label)
                kept += 1
            if kept == 0:
                raise BadDatasetError(f"class folder {path.parent} has no readable images (all {len(images)} were skipped)")
        return paths, np.asarray(labels, dtype=np.int64)

    pool_paths, pool_labels = usable(train_files)
    test_paths, test_labels = usable(val_files)
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("imagefolder: skipped %d unreadable image(s) (data.bad_images = skip): %s", len(skipped), shown)

    pool = FileStore(pool_paths, size, cache)
    train, val = carve_val(pool_labels, cfg.val_fraction, seed)
    return assemble_splits(
        "imagefolder",
        cfg,
        seed,
        train=(pool.subset(train), pool_labels[train]),
        val=(pool.subset(val), pool_labels[val]),
        test=(FileStore(test_paths, size, cache), test_labels),
        class_names=class_names,
        mode="RGB",
        scale=255.0,
        native_size=None,
        hflip_default=True,
        stats_max_items=STATS_MAX_ITEMS,
        skipped_files=skipped,
    )
