"""Real image files in, the report's answers out: every bundle's ``run.py`` on the test split as PNG files.

A small digits workspace (the default's dataset: 1797 images, its 359-image test split)
runs export, quantize and bundle in-process. The test split is then written the way a
camera or an image editor would hold it, as ordinary 8-bit greyscale PNGs
(``round(value x 255 / 16)`` of scikit-learn's 0..16 counts, computed here and not by the
pipeline), and every bundle's own ``run.py`` classifies the folder in a fresh process
that cannot import torch or kdpipe, for every variant, model format and runtime. Each
image's class must be the one ``reports/predictions.json`` holds for that file, and the
top-1 the one ``reports/quantize.json`` reports: image for image, no tolerance.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data import build_data
from pipeline.data.splits import split_pool
from pipeline.deploy.artifacts import deployable_runs, report_file
from pipeline.deploy.bundle import bundle_all
from pipeline.deploy.edge.edge_runtime import installed_runtimes, runtime_variants
from pipeline.deploy.export import export_all
from pipeline.deploy.quantize import quantize_all
from pipeline.deploy.tensorrt_build import build_all
from pipeline.engine.atomic import atomic_write_json
from pipeline.engine.checkpoint import save_model_file
from pipeline.models import build, count_parameters
from pipeline.models.complexity import count_macs
from pipeline.params import parse_params
from tests.conftest import tiny_params
from tests.test_deploy import _blocking_env, _run, quick_train


@pytest.fixture(scope="module")
def digits_ws(tmp_path_factory) -> tuple[Path, object]:
    """A digits workspace whose teacher, students alone and KD students went through export, quantize and bundle."""
    root = tmp_path_factory.mktemp("digits-deploy")
    params = parse_params(tiny_params(data={"name": "digits"}, students={"tinynet_xs": {}},
                                      quantize={"calibration_samples": 128}))
    data = build_data(params.data, params.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, dep in enumerate(deployable_runs(params)):
            torch.manual_seed(i)
            model = quick_train(build(dep.arch, data.num_classes, data.in_channels, data.image_size),
                                data.train_eval, steps=120, seed=i)
            save_model_file(dep.model_file(root), model, dep.arch, data.num_classes, data.in_channels,
                            data.image_size, {"params_sha256": "test"})
            atomic_write_json(root / "metrics" / f"{dep.key}.json",
                              {"params": count_parameters(model), "macs": count_macs(model, 1, 8)})
    finally:
        torch.set_num_threads(threads)
    export_all(params, root)
    quantize_all(params, root)
    build_all(params, root)
    bundle_all(params, root)
    return root, params


def _write_test_split(params, folder: Path, mode: str = "L") -> np.ndarray:
    """The test split as 8-bit PNG files ``NNNN.png`` in split order (RGB: grey in all three channels); its labels."""
    digits = load_digits()
    _, _, test = split_pool(digits.target, params.data.val_fraction, params.data.test_fraction, params.seed)
    folder.mkdir(parents=True)
    for n, i in enumerate(test):
        grey = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(grey, mode="L").convert(mode).save(folder / f"{n:04d}.png")
    return digits.target[test]


def _classes(csv_file: Path, names: list[str]) -> list[int]:
    """The top-1 class of each row of a ``run.py`` folder CSV, in file order; every row must have classified."""
    with csv_file.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert all(not r["error"] for r in rows), [r for r in rows if r["error"]][:3]
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    return [names.index(r["class1"]) for r in rows]


def test_the_digits_train_on_what_an_8_bit_image_file_holds(digits_ws):
    root, _ = digits_ws
    spec = json.loads((root / "bundles" / "tinynet_xs-kd" / "preprocessing.json").read_text())
    assert spec["scale"] == 255.0 and spec["mode"] == "L"


def test_every_bundle_classifies_the_test_split_png_files_as_the_report_says(digits_ws, tmp_path):
    root, params = digits_ws
    labels = _write_test_split(params, tmp_path / "png")
    predictions = json.loads(report_file(root, "predictions").read_text())
    quantize = json.loads(report_file(root, "quantize").read_text())
    assert predictions["labels"] == [int(y) for y in labels]  # the files are the test split, in its order
    env = _blocking_env(tmp_path)
    runtimes = [r for r in ("onnxruntime", "openvino") if r in installed_runtimes()]
    checked = []
    for key, per_runtime in predictions["models"].items():
        bundle = root / "bundles" / _bundle_name(root, key)
        manifest = json.loads((bundle / "bundle.json").read_text())
        names = manifest["class_names"]
        runs: list[tuple[str, str, list[str]]] = []  # (runtime, variant whose predictions must come out, args)
        for variant, entry in manifest["models"].items():
            runs.append(("onnxruntime", variant, ["--variant", variant]))
            if entry.get("ort"):
                runs.append(("onnxruntime", variant, ["--variant", variant, "--format", "ort"]))
        if "openvino" in runtimes:
            for variant, _, _ in runtime_variants("openvino", [v for v in manifest["models"] if v != "int8_trt"]):
                runs.append(("openvino", variant, ["--variant", variant, "--runtime", "openvino"]))
        for runtime, variant, args in runs:
            out = tmp_path / f"{bundle.name}-{'-'.join(a.strip('-') for a in args)}.csv"
            proc = _run([str(bundle / "run.py"), str(tmp_path / "png"), *args, "--out", str(out)], bundle, env)
            assert proc.returncode == 0, (key, args, proc.stderr)
            got = _classes(out, names)
            want = per_runtime[runtime][variant]
            differ = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
            assert not differ, f"{key} {' '.join(args)}: {len(differ)} image(s) differ from the report, e.g. {differ[:5]}"
            top1 = 100 * float(np.mean(np.asarray(got) == labels))
            reported = (quantize["models"][key] if runtime == "onnxruntime"
                        else quantize["models"][key]["runtimes"][runtime])[variant]["top1"]
            assert top1 == pytest.approx(reported, abs=1e-3), (key, args)
            checked.append((key, runtime, variant))
    assert {v for _, rt, v in checked if rt == "onnxruntime"} == {"fp32", "fp16", "int8", "int8_trt"}
    assert {k for k, _, _ in checked} == {d.key for d in deployable_runs(params)}  # every deployed model
    assert {"teacher", "baseline/tinynet_xs", "kd/tinynet_xs"} <= {k for k, _, _ in checked}


def test_colour_files_of_the_same_digits_give_the_same_classes(digits_ws, tmp_path):
    root, params = digits_ws
    _write_test_split(params, tmp_path / "rgb", mode="RGB")  # a colour PNG of a grey image: converted to L
    bundle = root / "bundles" / "tinynet_xs-kd"
    manifest = json.loads((bundle / "bundle.json").read_text())
    out = tmp_path / "rgb.csv"
    proc = _run([str(bundle / "run.py"), str(tmp_path / "rgb"), "--variant", "fp32", "--out", str(out)], bundle,
                _blocking_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(report_file(root, "predictions").read_text())
    assert _classes(out, manifest["class_names"]) == predictions["models"]["kd/tinynet_xs"]["onnxruntime"]["fp32"]


def _bundle_name(root: Path, key: str) -> str:
    """The bundle folder the export stage named for run ``key``."""
    return json.loads(report_file(root, "export").read_text())["models"][key]["bundle"]
