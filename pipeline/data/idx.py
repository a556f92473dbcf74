"""``mnist`` and ``fashion_mnist``: the standard IDX files read from ``data.root``.

Nothing is downloaded. ``data.root`` holds the four files
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (each plain or ``.gz``), either directly (the flat folder
Debian's ``dataset-fashion-mnist`` package installs; ``dpkg -L dataset-fashion-mnist``
shows it) or in torchvision's ``<root>/MNIST/raw/`` / ``<root>/FashionMNIST/raw/``.
The official 10 000-image test set is the test split; validation is carved, stratified,
from the 60 000 training images (``val_fraction``). A file that is not what its name
says (wrong magic number, wrong sizes, cut short, labels out of range, image and label
counts that differ) is a one-line error naming the file.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.base import BadDatasetError, DatasetNotFoundError, DataSplits, register_dataset
from pipeline.data.splits import official_test_splits

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig

NATIVE_SIZE = 28
#: The magic numbers of unsigned-byte IDX files: 0x0000 08 <number of dimensions>.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
#: The two halves of the standard file names.
SPLITS = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class IdxLayout:
    """One IDX dataset: its name in messages, torchvision's folder, classes and well-known statistics."""

    title: str
    torchvision_folder: str
    class_names: tuple[str, ...]
    mean: float
    std: float
    hflip: bool


MNIST = IdxLayout(
    title="MNIST",
    torchvision_folder="MNIST",
    class_names=tuple(str(d) for d in range(10)),
    mean=0.1307,
    std=0.3081,
    hflip=False,  # a mirrored digit is another symbol, or none
)

FASHION_MNIST = IdxLayout(
    title="Fashion-MNIST",
    torchvision_folder="FashionMNIST",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
    mean=0.2860,
    std=0.3530,
    hflip=True,  # garments are left-right symmetric
)


def idx_file_names(split: str, kind: str) -> tuple[str, str]:
    """The plain and gzip names of one standard file (``kind``: ``images`` or ``labels``)."""
    stem = f"{SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    return stem, stem + ".gz"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in one IDX file (plain or gzip), checked against its header.

    Raises :class:`BadDatasetError` naming ``path`` when the magic number is not ``magic``
    or the data is shorter or longer than the header's sizes.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise BadDatasetError(f"{path} is not a readable IDX file: {exc}") from None
    if len(raw) < 4:
        raise BadDatasetError(f"{path} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise BadDatasetError(f"{path} has magic number 0x{found:08x}, expected 0x{magic:08x} "
                              f"({'images' if magic == IMAGES_MAGIC else 'labels'}, unsigned bytes)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BadDatasetError(f"{path} is cut short: {len(raw)} bytes, shorter than its {header}-byte header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise BadDatasetError(f"{path} holds {len(raw)} bytes, but its header {dims} needs {expected}"
                              f"{' (cut short)' if len(raw) < expected else ''}")
    # a writable array (np.frombuffer on bytes is read-only, and torch warns on wrapping one)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_idx_folder(layout: IdxLayout, root: str | None) -> Path:
    """The folder holding the four files: ``root`` itself or torchvision's ``root/<Folder>/raw``.

    Raises :class:`DatasetNotFoundError` naming what is missing and both layouts.
    """
    names = [idx_file_names(split, kind) for split in SPLITS for kind in ("images", "labels")]
    listed = ", ".join(f"{plain}[.gz]" for plain, _ in names)
    if root is None:
        raise DatasetNotFoundError(f"data.root is not set: {layout.title} is read from the IDX files {listed}; "
                                   "nothing is downloaded")
    base = Path(root).expanduser()
    candidates = [base, base / layout.torchvision_folder / "raw"]
    for folder in candidates:
        if all((folder / plain).is_file() or (folder / gz).is_file() for plain, gz in names):
            return folder
    best = max(candidates, key=lambda f: sum((f / p).is_file() or (f / g).is_file() for p, g in names))
    missing = [plain for plain, gz in names if not ((best / plain).is_file() or (best / gz).is_file())]
    where = (f"the folder {root} does not exist" if not base.is_dir()
             else f"missing in {best}: {', '.join(f'{m}[.gz]' for m in missing)}")
    raise DatasetNotFoundError(
        f"{layout.title} not found under data.root = {root!r} ({where}). Expected {listed} in data.root itself "
        f"(as `apt-get install dataset-fashion-mnist` installs them) or in data.root/{layout.torchvision_folder}/raw/ "
        "(torchvision's layout). Nothing is downloaded."
    )


def read_split(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 1, 28, 28], labels int64 [N])`` of one split, checked against each other."""
    paths = {}
    for kind in ("images", "labels"):
        plain, gz = idx_file_names(split, kind)
        paths[kind] = folder / plain if (folder / plain).is_file() else folder / gz
    images = read_idx(paths["images"], IMAGES_MAGIC)
    labels = read_idx(paths["labels"], LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise BadDatasetError(f"{paths['images']} holds images of {images.shape[1]}x{images.shape[2]} pixels, "
                              f"expected {NATIVE_SIZE}x{NATIVE_SIZE}")
    if len(images) != len(labels):
        raise BadDatasetError(f"{paths['labels']} holds {len(labels)} labels for the {len(images)} images of "
                              f"{paths['images'].name}")
    if len(labels) and int(labels.max()) >= num_classes:
        raise BadDatasetError(f"{paths['labels']} holds label {int(labels.max())}; labels are 0..{num_classes - 1}")
    return images[:, None], labels


def _build(name: str, layout: IdxLayout, cfg: DataConfig, seed: int) -> DataSplits:
    folder = find_idx_folder(layout, cfg.root)
    classes = len(layout.class_names)
    return official_test_splits(name, cfg, seed, read_split(folder, "train", classes), read_split(folder, "test", classes),
                                class_names=layout.class_names, mode="L", native_size=NATIVE_SIZE,
                                hflip_default=layout.hflip, known_stats=((layout.mean,), (layout.std,)))


@register_dataset("mnist")
def build_mnist(cfg: DataConfig, seed: int) -> DataSplits:
    """MNIST from the IDX files under ``cfg.root`` (60k train minus val, the official 10k test, 10 digits)."""
    return _build("mnist", MNIST, cfg, seed)


@register_dataset("fashion_mnist")
def build_fashion_mnist(cfg: DataConfig, seed: int) -> DataSplits:
    """Fashion-MNIST from the IDX files under ``cfg.root`` (60k train minus val, the official 10k test)."""
    return _build("fashion_mnist", FASHION_MNIST, cfg, seed)
