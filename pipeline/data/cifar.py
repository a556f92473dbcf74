"""``cifar10`` and ``cifar100``: the CIFAR "python version" archives read from ``data.root``.

Nothing is downloaded: the extracted archive must already be under ``data.root``
(``cifar-10-batches-py/`` or ``cifar-100-python/``, the folders torchvision's
``CIFAR10``/``CIFAR100`` use). The files are read here directly rather than through
torchvision's classes, for two reasons: torchvision checks fixed MD5 sums (so any
other copy, e.g. a test fixture, is rejected as corrupt) and unpickles with the
plain ``pickle`` module, which can run code; our reader accepts only the numpy
array types the format contains. Val is carved stratified from the official
training split (``val_fraction``); test is the official test split. Normalisation
uses the datasets' well-known statistics; horizontal flips are on by default.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.base import BadDatasetError, DatasetNotFoundError, DataSplits, register_dataset
from pipeline.data.splits import official_test_splits

if TYPE_CHECKING:
    from pipeline.config.training import DataConfig

NATIVE_SIZE = 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and which keys hold labels and class names."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarLayout(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)

CIFAR100 = CifarLayout(
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy's array reconstruction helpers (old and new module paths)."""
    from numpy._core import multiarray, numeric  # numpy >= 2

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    import codecs

    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings and numpy arrays, and refuses every other global."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR format") from None


def _read_batch(path: Path) -> dict[str, Any]:
    """Read one CIFAR pickle; keys are returned as ``str`` whether the file stored bytes or str."""
    try:
        entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as exc:
        raise BadDatasetError(f"{path} is not a readable CIFAR python batch: {exc}") from exc
    if not isinstance(entry, dict):
        raise BadDatasetError(f"{path} is not a readable CIFAR python batch: expected a dict, got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _missing_message(layout: CifarLayout, root: str | None, folder: Path | None, missing: list[str]) -> str:
    expected = ", ".join(layout.train_files + (layout.test_file, layout.meta_file))
    where = "data.root is not set" if root is None else f"{layout.title} not found under data.root = {root!r}"
    detail = f" (missing: {', '.join(missing)})" if missing else ""
    target = folder if folder is not None else Path("<data.root>") / layout.folder
    return (
        f"{where}{detail}. Expected the extracted python-version archive at {target}/ containing "
        f"{expected}. Nothing is downloaded: copy the files there, or point data.root at the folder "
        f"that contains {layout.folder}/."
    )


def read_cifar(
    layout: CifarLayout, root: str | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """Read ``((train_images, train_labels), (test_images, test_labels), class_names)``; images uint8 [N, 3, 32, 32].

    Raises :class:`DatasetNotFoundError` naming the path and the expected files when
    the root or any file is missing.
    """
    if root is None:
        raise DatasetNotFoundError(_missing_message(layout, None, None, []))
    folder = Path(root).expanduser() / layout.folder
    needed = layout.train_files + (layout.test_file, layout.meta_file)
    if not Path(root).expanduser().is_dir():
        raise DatasetNotFoundError(_missing_message(layout, root, folder, [f"the folder {root} itself"]))
    if not folder.is_dir():
        raise DatasetNotFoundError(_missing_message(layout, root, folder, [f"{layout.folder}/"]))
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(_missing_message(layout, root, folder, missing))

    def images_and_labels(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            batch = _read_batch(folder / name)
            if "data" not in batch or layout.label_key not in batch:
                raise BadDatasetError(
                    f"{folder / name} lacks the keys 'data' and {layout.label_key!r} of a {layout.title} batch"
                )
            data = np.asarray(batch["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE))
            labels.append(np.asarray(batch[layout.label_key], dtype=np.int64))
            if len(images[-1]) != len(labels[-1]):
                raise BadDatasetError(f"{folder / name}: {len(images[-1])} images but {len(labels[-1])} labels")
        return np.concatenate(images), np.concatenate(labels)

    meta = _read_batch(folder / layout.meta_file)
    if layout.names_key not in meta:
        raise BadDatasetError(f"{folder / layout.meta_file} lacks the key {layout.names_key!r}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key]]
    return images_and_labels(layout.train_files), images_and_labels((layout.test_file,)), names


def _build(name: str, layout: CifarLayout, cfg: DataConfig, seed: int) -> DataSplits:
    train, test, class_names = read_cifar(layout, cfg.root)
    return official_test_splits(name, cfg, seed, train, test, class_names=class_names, mode="RGB",
                                native_size=NATIVE_SIZE, hflip_default=True, known_stats=(layout.mean, layout.std))


@register_dataset("cifar10")
def build_cifar10(cfg: DataConfig, seed: int) -> DataSplits:
    """CIFAR-10 from ``cfg.root/cifar-10-batches-py/`` (50k train minus val, 10k test, 10 classes)."""
    return _build("cifar10", CIFAR10, cfg, seed)


@register_dataset("cifar100")
def build_cifar100(cfg: DataConfig, seed: int) -> DataSplits:
    """CIFAR-100 from ``cfg.root/cifar-100-python/`` (fine labels: 100 classes)."""
    return _build("cifar100", CIFAR100, cfg, seed)
