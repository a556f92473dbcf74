"""mnist / fashion_mnist from IDX files the tests write: both folder layouts, plain and gzip, and bad files."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config.training import DataConfig
from pipeline.data import BadDatasetError, DatasetNotFoundError, build_data
from pipeline.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from tests.conftest import REPO, tiny_params, write_params

RNG = np.random.default_rng(0)
N_TRAIN, N_TEST = 200, 50


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file as the format defines it: a big-endian magic number, the sizes, the bytes."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_set(folder: Path, gz: bool = True, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, np.ndarray]:
    """The four standard files of a small MNIST-like set; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": RNG.permutation(np.arange(n_test) % 10)}
    for name, array in arrays.items():
        data = idx_bytes(array, IMAGES_MAGIC if "images" in name else LABELS_MAGIC)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def build(name: str, root: Path, **kw):
    return build_data(DataConfig(name=name, root=str(root), **kw), 0)


def test_the_flat_gzip_layout_gives_the_official_test_set_and_a_stratified_val(tmp_path: Path):
    written = write_set(tmp_path / "fashion")
    s = build("fashion_mnist", tmp_path / "fashion", val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (160, 40, N_TEST)
    assert (s.num_classes, s.in_channels, s.image_size, s.mode, s.native_size) == (10, 1, 28, "L", 28)
    assert s.class_names[0] == "T-shirt/top" and s.class_names[9] == "Ankle boot"
    assert s.hflip is True and (s.mean, s.std) == ((0.2860,), (0.3530,))
    assert np.bincount(s.val.labels, minlength=10).tolist() == [4] * 10  # stratified: 4 of each class's 20
    # the test split is the t10k file, in its order, its pixels scaled by 1/255 and normalised
    assert s.test.labels.tolist() == written["t10k-labels-idx1-ubyte"].tolist()
    x, y, i = s.test[3]
    raw = written["t10k-images-idx3-ubyte"][3] / 255.0
    assert (y, i) == (int(written["t10k-labels-idx1-ubyte"][3]), 3)
    assert np.allclose(x[0].numpy(), (raw - 0.2860) / 0.3530, atol=1e-5)


def test_torchvisions_raw_layout_and_plain_files_read_the_same_as_the_flat_gzip_layout(tmp_path: Path):
    write_set(tmp_path / "flat", gz=True)
    tv = tmp_path / "tv" / "MNIST" / "raw"
    tv.mkdir(parents=True)
    for f in (tmp_path / "flat").iterdir():
        (tv / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    a, b = build("mnist", tmp_path / "flat"), build("mnist", tmp_path / "tv")
    assert a.hflip is False and a.class_names == [str(d) for d in range(10)]
    assert a.train.labels.tolist() == b.train.labels.tolist() and a.test.labels.tolist() == b.test.labels.tolist()
    assert all(np.array_equal(a.test[k][0].numpy(), b.test[k][0].numpy()) for k in (0, 7, N_TEST - 1))


def test_a_missing_root_or_file_names_the_path_and_both_layouts(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        build_data(DataConfig(name="mnist"), 0)
    with pytest.raises(DatasetNotFoundError, match=r"the folder .*nowhere does not exist"):
        build("mnist", tmp_path / "nowhere")
    write_set(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        build("fashion_mnist", tmp_path / "part")
    message = str(err.value)
    assert "missing in" in message and "t10k-labels-idx1-ubyte[.gz]" in message and "train-images" not in \
        message.split("missing in")[1].split(")")[0]
    assert "FashionMNIST/raw" in message and "dataset-fashion-mnist" in message and "\n" not in message


@pytest.mark.parametrize(("damage", "match"), [
    ("magic", r"t10k-images-idx3-ubyte.gz has magic number 0x00000801, expected 0x00000803"),
    ("cut", r"t10k-images-idx3-ubyte.gz holds \d+ bytes, but its header \[50, 28, 28\] needs \d+ \(cut short\)"),
    ("count", r"t10k-labels-idx1-ubyte.gz holds 49 labels for the 50 images of t10k-images-idx3-ubyte.gz"),
    ("label", r"t10k-labels-idx1-ubyte.gz holds label 12; labels are 0..9"),
    ("gzip", r"t10k-images-idx3-ubyte.gz is not a readable IDX file"),
])
def test_a_damaged_file_is_a_one_line_error_naming_it(tmp_path: Path, damage: str, match: str):
    written = write_set(tmp_path / "d")
    images, labels = tmp_path / "d" / "t10k-images-idx3-ubyte.gz", tmp_path / "d" / "t10k-labels-idx1-ubyte.gz"
    if damage == "magic":  # a labels file under an images name
        images.write_bytes(gzip.compress(idx_bytes(np.zeros(50), LABELS_MAGIC)))
    elif damage == "cut":
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    elif damage == "count":
        labels.write_bytes(gzip.compress(idx_bytes(written["t10k-labels-idx1-ubyte"][:49], LABELS_MAGIC)))
    elif damage == "label":
        bad = written["t10k-labels-idx1-ubyte"].copy()
        bad[5] = 12
        labels.write_bytes(gzip.compress(idx_bytes(bad, LABELS_MAGIC)))
    else:
        images.write_bytes(images.read_bytes()[:40])  # a gzip stream cut short
    with pytest.raises(BadDatasetError, match=match) as err:
        build("mnist", tmp_path / "d")
    assert "\n" not in str(err.value)


def test_read_idx_rejects_a_header_longer_than_the_file(tmp_path: Path):
    path = tmp_path / "short"
    path.write_bytes(IMAGES_MAGIC.to_bytes(4, "big") + b"\0\0")
    with pytest.raises(BadDatasetError, match="cut short: 6 bytes, shorter than its 16-byte header"):
        read_idx(path, IMAGES_MAGIC)


def test_the_stage_prints_the_damaged_file_in_one_line(tmp_path: Path):
    write_set(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03"))
    params = tiny_params(data={"name": "fashion_mnist", "root": str(tmp_path / "d")})
    write_params(tmp_path / "params.yaml", params)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["data"]["name"] == "fashion_mnist"
    proc = subprocess.run([sys.executable, "-m", "stages.train_teacher"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train-labels-idx1-ubyte.gz has magic number 0x00000803, expected 0x00000801" in proc.stderr
    assert "Traceback" not in proc.stderr
