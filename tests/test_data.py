"""Tests of the dataset registry (pipeline.data): splits, scenarios, augmentation, preprocessing, loaders."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config.training import DATASETS, DataConfig
from pipeline.data import (
    DATASET_NAMES,
    DatasetNotFoundError,
    DataSplits,
    build_data,
    preprocess_image,
    preprocessing_spec,
)
from pipeline.data import imagefolder as imagefolder_module
from pipeline.data import images as images_module
from pipeline.data.splits import split_pool, stratified_subset


def digits(seed: int = 0, **kw) -> DataSplits:
    return build_data(DataConfig(name="digits", **kw), seed)


def stack(dataset) -> tuple[torch.Tensor, np.ndarray]:
    xs, ys = zip(*[(x, y) for x, y, _ in (dataset[i] for i in range(len(dataset)))], strict=True)
    return torch.stack(xs), np.asarray(ys)


def test_registry_matches_config() -> None:
    assert sorted(DATASET_NAMES) == sorted(DATASETS)


# --------------------------------------------------------------------------- digits: splits


def test_digits_split_sizes_and_stratification() -> None:
    s = digits()
    assert (len(s.train), len(s.val), len(s.test)) == (1797 - 270 - 359, 270, 359)
    assert len(s.train_eval) == len(s.train)
    assert (s.num_classes, s.in_channels, s.image_size, s.name) == (10, 1, 8, "digits")
    assert s.class_names == [str(i) for i in range(10)]
    overall = np.bincount(load_digits().target) / 1797
    for split in (s.train, s.val, s.test):
        share = np.bincount(split.labels, minlength=10) / len(split)
        assert np.abs(share - overall).max() < 0.01 + 1.0 / len(split)


def test_splits_are_disjoint_and_cover_the_pool() -> None:
    labels = load_digits().target
    train, val, test = split_pool(labels, 0.15, 0.2, seed=3)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    # The built test split holds exactly those pool images, in that order.
    s = digits(seed=3)
    raw = np.round(load_digits().images[test] * 255 / 16) / 255  # the 8-bit rendering a PNG of the digit holds
    x, y = stack(s.test)
    assert np.array_equal(y, labels[test])
    assert np.allclose(x.numpy()[:, 0] * s.std[0] + s.mean[0], raw, atol=1e-5)


def test_determinism() -> None:
    a, b, c = digits(0, label_noise=0.2), digits(0, label_noise=0.2), digits(1, label_noise=0.2)
    for name in ("train_eval", "val", "test"):
        xa, ya = stack(getattr(a, name))
        xb, yb = stack(getattr(b, name))
        assert torch.equal(xa, xb) and np.array_equal(ya, yb)
    assert a.noisy_indices == b.noisy_indices
    assert a.noisy_indices != c.noisy_indices
    assert not torch.equal(stack(a.val)[0], stack(c.val)[0])


# --------------------------------------------------------------------------- scenarios


def test_train_fraction_keeps_every_class_and_the_count() -> None:
    full = digits()
    s = digits(train_fraction=0.05)
    assert len(s.train) == round(0.05 * len(full.train))
    assert np.bincount(s.train.labels, minlength=10).min() >= 1
    tiny = digits(train_fraction=0.001)
    assert len(tiny.train) == 10 and sorted(tiny.train.labels.tolist()) == list(range(10))
    assert len(tiny.val) == len(full.val) and len(tiny.test) == len(full.test)  # only train shrinks
    # Imbalanced labels: rare classes still get one.
    labels = np.array([0] * 97 + [1] * 2 + [2])
    kept = stratified_subset(labels, 0.1, seed=0)
    assert len(kept) == 10 and set(labels[kept]) == {0, 1, 2}


def test_label_noise_rate_and_flips() -> None:
    s = digits(label_noise=0.3)
    n = len(s.train)
    assert len(s.noisy_indices) == round(0.3 * n)
    changed = np.flatnonzero(s.train.labels != s.train.clean_labels)
    assert changed.tolist() == s.noisy_indices
    assert np.array_equal(s.train_eval.labels, s.train.labels)
    assert len(set(s.train.labels[s.noisy_indices].tolist())) == 10  # new labels spread over classes
    assert [s.train[i][1] for i in s.noisy_indices[:5]] == s.train.labels[s.noisy_indices[:5]].tolist()
    assert np.array_equal(digits(label_noise=0.3).train.labels, s.train.labels)
    assert digits().noisy_indices == []
    # val/test labels are never noisy, and the split does not move with the noise rate.
    assert np.array_equal(s.val.labels, digits().val.labels)


def test_image_size_resize() -> None:
    s = digits(image_size=16)
    x, _, _ = s.test[0]
    assert x.shape == (1, 16, 16) and s.image_size == 16 and s.pad == 2
    syn = build_data(DataConfig(name="synthetic", image_size=4), 0)
    assert syn.train[0][0].shape == (3, 4, 4) and syn.pad == 1


def test_lazy_resize_matches_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = stack(digits(image_size=12).test)[0]
    monkeypatch.setattr(images_module, "CACHE_BUDGET_BYTES", 0)
    lazy = stack(digits(image_size=12).test)[0]
    assert torch.equal(cached, lazy)


# --------------------------------------------------------------------------- augmentation and normalisation


def _shifts(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad)
    padded[:, pad : pad + h, pad : pad + w] = img
    return [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]


def _raw(x: torch.Tensor, s: DataSplits) -> torch.Tensor:
    mean = torch.tensor(s.mean).view(-1, 1, 1)
    std = torch.tensor(s.std).view(-1, 1, 1)
    return x * std + mean


def test_augmentation_never_flips_digits() -> None:
    s = digits()
    assert s.hflip is False and s.pad == 1 and s.train.augment
    torch.manual_seed(0)
    checked = 0
    for i in range(40):
        original = _raw(s.train_eval[i][0], s)
        plain, flipped = _shifts(original, s.pad), _shifts(original.flip(-1), s.pad)
        if any(torch.allclose(p, f, atol=1e-5) for p in plain for f in flipped):
            continue  # a symmetric image cannot tell
        checked += 1
        for _ in range(10):
            seen = _raw(s.train[i][0], s)
            assert any(torch.allclose(seen, p, atol=1e-5) for p in plain)
            assert not any(torch.allclose(seen, f, atol=1e-5) for f in flipped)
    assert checked >= 30


def test_hflip_override_and_augment_off() -> None:
    s = build_data(DataConfig(name="synthetic", hflip=True), 0)
    assert s.hflip is True
    torch.manual_seed(0)
    original = _raw(s.train_eval[0][0], s)
    flipped = _shifts(original.flip(-1), s.pad)
    assert any(any(torch.allclose(_raw(s.train[0][0], s), f, atol=1e-5) for f in flipped) for _ in range(40))
    off = digits(augment=False)
    assert (off.hflip, off.pad, off.train.augment) == (False, 0, False)
    assert torch.equal(off.train[3][0], off.train_eval[3][0])
    assert digits(hflip=True).hflip is True


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_normalised_train_statistics(name: str) -> None:
    s = build_data(DataConfig(name=name), 0)
    x, _ = stack(s.train_eval)
    per_channel = x.transpose(0, 1).reshape(s.in_channels, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(s.in_channels), atol=1e-3)
    assert torch.allclose(per_channel.std(1), torch.ones(s.in_channels), atol=1e-3)
    # val/test are normalised with the train statistics: close to, not exactly, 0/1.
    assert abs(stack(s.test)[0].mean().item()) < 0.2


def test_items_are_image_label_index() -> None:
    s = build_data(DataConfig(name="synthetic", synthetic_samples=60), 0)
    for split in (s.train, s.train_eval, s.val, s.test):
        for i in (0, len(split) - 1):
            x, y, index = split[i]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 8, 8)
            assert type(y) is int and type(index) is int and index == i
        with pytest.raises(IndexError):
            split[len(split)]
    x, y, index = next(iter(torch.utils.data.DataLoader(s.train, batch_size=8)))
    assert x.shape == (8, 3, 8, 8) and index.tolist() == list(range(8))


# --------------------------------------------------------------------------- preprocessing spec


def test_preprocessing_spec_content() -> None:
    s = digits()
    spec = preprocessing_spec(s)
    json.dumps(spec)
    assert spec["size"] == 8 and spec["channels"] == 1 and spec["mode"] == "L" and spec["scale"] == 255.0
    assert spec["layout"] == "NCHW" and spec["resize"]["method"] == "bilinear"
    assert spec["mean"] == list(s.mean) and spec["std"] == list(s.std)
    rgb = preprocessing_spec(build_data(DataConfig(name="synthetic"), 0))
    assert rgb["mode"] == "RGB" and rgb["channels"] == 3 and rgb["scale"] == 255.0 and len(rgb["mean"]) == 3


@pytest.mark.parametrize("size", [None, 16, 5])
def test_preprocess_image_reproduces_the_test_split(size: int | None) -> None:
    s = digits(seed=3, image_size=size)
    spec = preprocessing_spec(s)
    _, _, test = split_pool(load_digits().target, 0.15, 0.2, seed=3)
    raw = np.round(load_digits().images[test] * 255 / 16).astype(np.uint8)  # 8-bit grey, as an image file holds
    for i in (0, 7, 100):
        assert np.allclose(preprocess_image(spec, raw[i])[0], s.test[i][0].numpy(), atol=1e-6)


# --------------------------------------------------------------------------- cifar


def write_fake_cifar10(root: Path, per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A tiny CIFAR-10 folder in the python-version pickle format (5 train batches, test, meta)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.repeat(np.arange(10), per_class)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        batch = {"batch_label": f"training batch {b} of 5", "labels": labels[part].tolist(), "data": data[part]}
        if b == 1:  # the real files decode to bytes or str keys depending on encoding: accept both
            batch = {k.encode(): v for k, v in batch.items()}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"labels": list(range(10)), "data": rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=5))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))
    return data, test["data"]


def test_cifar10_from_a_fake_folder(tmp_path: Path) -> None:
    train_data, test_data = write_fake_cifar10(tmp_path)
    s = build_data(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.25), 0)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    assert s.class_names[0] == "airplane" and s.num_classes == 10 and s.in_channels == 3
    assert s.mean == (0.4914, 0.4822, 0.4465) and s.hflip is True and s.pad == 4
    x, y, i = s.test[2]
    assert x.shape == (3, 32, 32) and y == 2 and i == 2
    expected = (test_data[2].reshape(3, 32, 32) / 255.0 - np.array(s.mean)[:, None, None]) / np.array(s.std)[
        :, None, None
    ]
    assert np.allclose(x.numpy(), expected, atol=1e-5)
    assert sorted(s.val.labels.tolist()) == list(range(10))
    small = build_data(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.25, image_size=16), 0)
    assert small.test[0][0].shape == (3, 16, 16)


def test_cifar_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        build_data(DataConfig(name="cifar10", root=str(tmp_path)), 0)
    message = str(err.value)
    assert str(tmp_path) in message and "cifar-10-batches-py" in message
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta", "downloaded"):
        assert name in message
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python.*train, test, meta"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "nowhere")), 0)
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        build_data(DataConfig(name="cifar10"), 0)
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing: test_batch"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)), 0)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({"label_names": Evil()}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.25), 0)


# --------------------------------------------------------------------------- imagefolder


def write_folder(root: Path, classes=("cat", "dog", "owl"), n_train: int = 6, n_val: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(10, 30, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                pixels[..., k] = 255  # a class colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")


def test_imagefolder_loads(tmp_path: Path) -> None:
    write_folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.2)
    s = build_data(cfg, 0)
    assert s.class_names == ["cat", "dog", "owl"] and s.in_channels == 3 and s.image_size == 16
    assert (len(s.train), len(s.val), len(s.test)) == (14, 4, 6) and s.hflip is True and s.skipped_files == []
    assert s.test[0][0].shape == (3, 16, 16)
    x, _ = stack(s.train_eval)
    assert torch.allclose(x.transpose(0, 1).reshape(3, -1).mean(1), torch.zeros(3), atol=1e-3)
    # The deployment preprocessing of the PNG gives the test tensor; the lazy path gives the same.
    spec = preprocessing_spec(s)
    assert spec["mode"] == "RGB" and spec["native_size"] is None
    with Image.open(tmp_path / "val" / "cat" / "0.png") as im:
        assert np.allclose(preprocess_image(spec, im)[0], s.test[0][0].numpy(), atol=1e-6)
    assert (
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), 0).image_size == imagefolder_module.DEFAULT_SIZE
    )


def test_imagefolder_lazy_matches_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, val_fraction=0.2)
    cached = stack(build_data(cfg, 0).test)[0]
    monkeypatch.setattr(imagefolder_module, "FOLDER_CACHE_MAX_FILES", 0)
    lazy = build_data(cfg, 0)
    assert lazy.test.store.cache is None
    assert torch.equal(cached, stack(lazy.test)[0])


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "missing")), 0)
    write_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "val" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*contains no images"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), 0)
    (tmp_path / "train" / "empty").rmdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "val" / "empty" / "0.png")
    with pytest.raises(ValueError, match=r"only in val/: \['empty'\]"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), 0)


def test_imagefolder_bad_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.2)
    with pytest.raises(ValueError, match="broken.png"):
        build_data(cfg, 0)
    with caplog.at_level(logging.WARNING):
        s = build_data(cfg.model_copy(update={"bad_images": "skip"}), 0)
    assert s.skipped_files == [str(bad)]
    assert len(s.train) + len(s.val) == 18
    assert "skipped 1 unreadable image" in caplog.text
