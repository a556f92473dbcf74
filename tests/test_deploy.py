"""Deployment: export parity and metadata, INT8/FP16 scoring, TensorRT skip, bundles, hostile inputs, report.

One small workspace (synthetic 8x8 RGB data, 6 classes, a teacher and one student
trained for a few steps) runs every deploy step in-process; the bundle runner and
benchmark then run in subprocesses that cannot import torch or this package.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import build_data, preprocess_image
from pipeline.data.splits import split_pool
from pipeline.data.synthetic import make_synthetic
from pipeline.deploy import DeployError, ParityError
from pipeline.deploy.artifacts import deployable_runs, report_file, split_arrays, tensorrt_dir, variant_file
from pipeline.deploy.benchmark import benchmark_all
from pipeline.deploy.bundle import bundle_all, safe_extract
from pipeline.deploy.edge.edge_runtime import EdgeError, open_session, resolve_inside
from pipeline.deploy.export import check_parity, export_all, export_onnx, onnx_logits, torch_logits
from pipeline.deploy.metadata import read_metadata
from pipeline.deploy.quantize import quantize_all, quantize_int8
from pipeline.deploy.tensorrt_build import build_all
from pipeline.engine.atomic import atomic_write_json
from pipeline.engine.checkpoint import load_model_file, save_model_file
from pipeline.models import build, count_parameters
from pipeline.models.complexity import count_macs
from pipeline.params import parse_params
from pipeline.report.results import report_all
from pipeline.report.rows import label
from tests.conftest import REPO, tiny_params

CLASSES = 6


def deploy_params(**over: dict) -> dict:
    """Tiny params plus small deploy sections (one fast benchmark profile)."""
    p = tiny_params(
        data={"name": "synthetic", "synthetic_samples": 240, "synthetic_classes": CLASSES, "synthetic_image_size": 8},
        online={"methods": []},
        quantize={"calibration_samples": 64},
        benchmark={"warmup": 2, "iterations": 10, "max_seconds": 0.2, "variants": ["fp32", "int8"],
                   "torch_reference": True,
                   "profiles": [{"name": "tiny-1core", "threads": 1, "batch_sizes": [1, 4], "latency_budget_ms": 50.0}]},
        **over,
    )
    p["students"] = {"tinynet_xs": {}}
    return p


def quick_train(model: torch.nn.Module, dataset, steps: int = 60, seed: int = 0) -> torch.nn.Module:
    """A few SGD steps: enough for accuracy well above chance on the synthetic gratings."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    done = 0
    while done < steps:
        for x, y, _ in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model.eval()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tuple[Path, object]:
    """A workspace with trained model files and every deploy step run once."""
    root = tmp_path_factory.mktemp("deploy")
    params = parse_params(deploy_params())
    data = build_data(params.data, params.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is fastest and kind to a shared machine
    for i, dep in enumerate(deployable_runs(params)):
        torch.manual_seed(i)
        model = quick_train(build(dep.arch, data.num_classes, data.in_channels, data.image_size), data.train_eval,
                            seed=i)
        save_model_file(dep.model_file(root), model, dep.arch, data.num_classes, data.in_channels, data.image_size,
                        {"params_sha256": "test"})
        atomic_write_json(root / "metrics" / f"{dep.key}.json",
                          {"params": count_parameters(model), "macs": count_macs(model, 3, 8)})
    torch.set_num_threads(threads)
    export_all(params, root)
    quantize_all(params, root)
    build_all(params, root)
    bundle_all(params, root)
    benchmark_all(params, root)
    report_all(params, root)
    return root, params


# --------------------------------------------------------------------------- export


def test_export_writes_checked_onnx_with_dynamic_batch_and_metadata(ws):
    import onnx

    root, params = ws
    rep = json.loads(report_file(root, "export").read_text())
    assert set(rep["models"]) == {"teacher", "baseline/tinynet_xs", "kd/tinynet_xs"}
    path = variant_file(root, "kd/tinynet_xs", "fp32")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 8, 8]
    meta = read_metadata(path)
    assert meta["class_names"] == list(build_data(params.data, params.seed).class_names)
    assert meta["input_shape"] == ["batch", 3, 8, 8]
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3 and meta["preprocessing"]["mode"] == "RGB"
    from pipeline.engine.atomic import file_sha256

    assert meta["source_sha256"] == file_sha256(root / "runs/kd/tinynet_xs/model.pt")
    assert len(meta["params_sha256"]) == 64
    for key, m in rep["models"].items():
        assert m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["top1_mismatches"] == 0, key
    # any batch size runs
    sess = open_session(path)
    for b in (1, 3, 17):
        assert sess.run(None, {"input": np.zeros((b, 3, 8, 8), np.float32)})[0].shape == (b, CLASSES)


def test_disk_full_while_writing_onnx_keeps_the_previous_exports(ws, tmp_path, monkeypatch):
    import errno
    import shutil

    import onnx

    root, params = ws
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    before = {p.relative_to(copy).as_posix(): p.read_bytes() for p in (copy / "exports").rglob("*") if p.is_file()}
    real_save = onnx.save_model

    def full_disk(proto, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"\x08\x07partial")  # a few bytes land, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(OSError) as info:
        export_all(params, copy)
    assert info.value.errno == errno.ENOSPC and "model.onnx" in str(info.value)
    monkeypatch.setattr(onnx, "save_model", real_save)
    after = {p.relative_to(copy).as_posix(): p.read_bytes() for p in (copy / "exports").rglob("*") if p.is_file()}
    assert after == before  # the previous exports are intact, no partial file and no temp folder left
    assert not [p for p in copy.rglob("*kdtmp*")]


def test_parity_failure_names_the_worst_image(ws, tmp_path):
    root, params = ws
    data = build_data(params.data, params.seed)
    images, _ = split_arrays(data.test)
    model, _ = load_model_file(root / "runs/baseline/tinynet_xs/model.pt")
    out = export_onnx(model, tmp_path / "m.onnx", in_channels=3, image_size=8, opset=18)
    assert check_parity(model, out, images, 1e-4, "ok")["max_abs_diff"] < 1e-4
    with torch.no_grad():  # perturb one weight after export: PyTorch and ONNX now disagree
        model.classifier.weight[2, :] += 0.5
    diff = np.abs(torch_logits(model, images) - onnx_logits(out, images)).max(axis=1)
    with pytest.raises(ParityError) as exc:
        check_parity(model, out, images, 1e-4, "baseline/tinynet_xs")
    msg = str(exc.value)
    assert "baseline/tinynet_xs" in msg and f"at test image {int(diff.argmax())}" in msg
    assert f"{diff.max():.3g}" in msg and "tolerance 0.0001" in msg


def test_parity_tolerance_grows_with_the_logit_only_by_its_relative_part():
    from pipeline.deploy.export import compare_logits

    ref = np.array([[624.0, -3.0], [1.0, 2.0]], dtype=np.float32)
    got = ref + np.array([[6e-4, 0.0], [0.0, 0.0]], dtype=np.float32)  # float32 noise on a logit of 624
    assert compare_logits(ref, got, 1e-4, "big", rtol=1e-5)["max_abs_logit"] == 624.0
    with pytest.raises(ParityError, match=r"atol 0.0001 \+ rtol 0 x the image's largest \|logit\| 624"):
        compare_logits(ref, got, 1e-4, "big")
    beside = ref + np.array([[0.0, 6e-4], [0.0, 0.0]], dtype=np.float32)  # beside a logit of 624: rounding too
    assert compare_logits(ref, beside, 1e-4, "beside", rtol=1e-5)["max_abs_diff"] > 1e-4
    small = ref + np.array([[0.0, 0.0], [0.0, 6e-4]], dtype=np.float32)  # on an image with logits of 2: not noise
    with pytest.raises(ParityError, match="at test image 1"):
        compare_logits(ref, small, 1e-4, "small", rtol=1e-5)


def test_export_refuses_a_batch_of_one(tmp_path):
    with pytest.raises(DeployError, match="at least 2"):
        export_onnx(build("tinynet_xs", 4, 3, 8), tmp_path / "m.onnx", in_channels=3, image_size=8, opset=18,
                    example_batch=1)


# --------------------------------------------------------------------------- quantize


def test_int8_and_fp16_are_scored_by_onnxruntime_on_the_test_split(ws):
    root, params = ws
    rep = json.loads(report_file(root, "quantize").read_text())
    data = build_data(params.data, params.seed)
    images, labels = split_arrays(data.test)
    assert rep["test_images"] == len(labels)
    for key, acc in rep["models"].items():
        for variant in ("fp32", "fp16", "int8", "int8_trt"):
            logits = onnx_logits(variant_file(root, key, variant), images)
            # argmax: the first of tied logits, as a device's runner takes it (INT8 logits tie often)
            assert acc[variant]["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).mean(), abs=1e-3), (key, variant)
        assert acc["fp32"]["top1"] > 100 / CLASSES + 20  # trained well above chance
        assert abs(acc["fp32"]["top1"] - acc["int8"]["top1"]) <= 5.0
        assert acc["int8"]["bytes"] < acc["fp32"]["bytes"] or acc["fp32"]["bytes"] < 40_000
    import onnx

    q = onnx.load(str(variant_file(root, "kd/tinynet_xs", "int8")))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    weight_scales = [i for i in q.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert weight_scales, "per-channel weight scales expected"
    meta = read_metadata(variant_file(root, "kd/tinynet_xs", "int8"))
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_samples"] == 64
    assert meta["quantization"]["activation_type"] == "uint8"  # onnxruntime's fast CPU form
    trt = onnx.load(str(variant_file(root, "kd/tinynet_xs", "int8_trt")))
    zero_points = [i for i in trt.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(i.data_type != onnx.TensorProto.UINT8 for i in zero_points)
    assert all(not np.any(onnx.numpy_helper.to_array(i)) for i in zero_points)  # symmetric: what TensorRT reads
    f16 = onnx.load(str(variant_file(root, "kd/tinynet_xs", "fp16")))
    assert f16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io kept float32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in f16.graph.initializer)


def test_top1_breaks_ties_between_logits_as_argmax_does():
    from pipeline.deploy.export import ranked_classes, topk_accuracy

    # INT8 logits are dequantized integers: rows whose two best classes tie exactly are common
    logits = np.array([[0.5, 2.0, 2.0, 0.0], [3.0, 1.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    assert ranked_classes(logits, 2).tolist() == [[1, 2], [0, 2], [0, 1]]
    assert (ranked_classes(logits, 1)[:, 0] == logits.argmax(1)).all()
    assert topk_accuracy(logits, np.array([2, 2, 0]), 1) == pytest.approx(100 / 3)  # only the last row: class 0 first
    assert topk_accuracy(logits, np.array([2, 2, 1]), 2) == pytest.approx(100.0)
    many = np.tile(np.array([[1.0, 4.0, 4.0, 4.0, 0.0, 4.0, 4.0, 2.0, 4.0, 4.0]], np.float32), (64, 1))
    assert topk_accuracy(many, np.full(64, 1), 1) == 100.0  # the lowest of the tied classes, on every row


def test_empty_calibration_set_is_a_clear_error(ws, tmp_path):
    root, _ = ws
    with pytest.raises(DeployError, match="calibration set is empty"):
        quantize_int8(variant_file(root, "kd/tinynet_xs", "fp32"), tmp_path / "q.onnx",
                      np.zeros((0, 3, 8, 8), np.float32))
    assert not (tmp_path / "q.onnx").exists()


# --------------------------------------------------------------------------- tensorrt


def test_tensorrt_stage_records_skipped_with_the_reason(ws):
    root, _ = ws
    status = json.loads((tensorrt_dir(root) / "status.json").read_text())
    try:
        import tensorrt  # noqa: F401

        has_trt = torch.cuda.is_available()
    except Exception:
        has_trt = False
    if not has_trt:
        assert status["status"] == "skipped" and status["engines"] == {}
        assert "tensorrt" in status["reason"] or "GPU" in status["reason"]


# --------------------------------------------------------------------------- bundle


def _blocking_env(tmp: Path) -> dict[str, str]:
    """Environment whose interpreter fails on any import of torch or of this package."""
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "pipeline", "torchvision"):
                    raise ImportError(f"{name} is blocked: the edge bundle must not need it")
                return None

        sys.meta_path.insert(0, _Block())
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(hook)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bundle_copy(ws, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The kd bundle, extracted from its archive into a fresh folder (what a device receives)."""
    root, _ = ws
    dest = tmp_path_factory.mktemp("device")
    files = safe_extract(root / "bundles" / "tinynet_xs-kd.tar.gz", dest)
    assert files
    return dest / "tinynet_xs-kd", _blocking_env(dest)


def test_bundle_layout_and_reproducible_archive(ws, tmp_path):
    root, params = ws
    names = sorted(p.name for p in (root / "bundles").iterdir())
    assert names == ["teacher-tinynet_m", "teacher-tinynet_m.tar.gz", "tinynet_xs-baseline",
                     "tinynet_xs-baseline.tar.gz", "tinynet_xs-kd", "tinynet_xs-kd.tar.gz"]
    b = root / "bundles" / "tinynet_xs-kd"
    for f in ("model_fp32.onnx", "model_fp16.onnx", "model_int8.onnx", "model_int8_trt.onnx", "labels.txt",
              "preprocessing.json",
              "bundle.json", "run.py", "bench.py", "edge_runtime.py", "edge_openvino.py", "edge_preprocessing.py",
              "build_engine.py",
              "build_engines.sh", "README.md", "requirements.txt"):
        assert (b / f).is_file(), f
    manifest = json.loads((b / "bundle.json").read_text())
    assert manifest["role"] == "distilled" and manifest["default_variant"] == "int8"
    assert "--fp16" in " ".join(manifest["tensorrt"]["trtexec"]["10"])
    assert "model_fp16.onnx" in " ".join(manifest["tensorrt"]["trtexec"]["11"])
    assert "--fp16" not in " ".join(manifest["tensorrt"]["trtexec"]["11"])
    assert "trtexec" in (b / "build_engines.sh").read_text()
    from pipeline.deploy.bundle import pack

    again = pack(b, tmp_path / "again.tar.gz")
    assert again.read_bytes() == (root / "bundles" / "tinynet_xs-kd.tar.gz").read_bytes()
    assert (b / "edge_preprocessing.py").read_text() == (REPO / "pipeline/data/preprocessing.py").read_text()


def _test_images(params, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 test images [n, 8, 8, 3] (as files would hold them) and labels."""
    pixels, labels = make_synthetic(params.data.synthetic_samples, CLASSES, 8, params.seed)
    _, _, test = split_pool(labels, params.data.val_fraction, params.data.test_fraction, params.seed)
    return pixels[test[:n]].transpose(0, 2, 3, 1), labels[test[:n]]


def test_runner_prints_top5_without_torch_or_pipeline(ws, bundle_copy, tmp_path):
    root, params = ws
    bdir, env = bundle_copy
    probe = _run(["-c", "import torch"], bdir, env)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the hook works
    raw, _ = _test_images(params, 1)
    Image.fromarray(raw[0]).save(tmp_path / "img.png")
    proc = _run(["run.py", str(tmp_path / "img.png")], bdir, env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()[:2].strip().rstrip(".").isdigit()]
    assert len(lines) == 5
    scores = [float(ln.split()[-1]) for ln in lines]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def _image_folder(params, n: int, folder: Path) -> Path:
    """The first ``n`` test images as PNG files ``000.png``, ``001.png``, ... in a new ``folder``."""
    raw, _ = _test_images(params, n)
    folder.mkdir()
    for i, img in enumerate(raw):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def test_runner_folder_csv_matches_the_test_split(ws, bundle_copy, tmp_path):
    root, params = ws
    bdir, env = bundle_copy
    folder = _image_folder(params, 12, tmp_path / "imgs")
    proc = _run(["run.py", str(folder), "--variant", "fp32"], bdir, env)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["file"] for r in rows] == [f"{i:03d}.png" for i in range(12)]
    data = build_data(params.data, params.seed)
    images, _ = split_arrays(data.test, np.arange(12))
    expected = onnx_logits(variant_file(root, "kd/tinynet_xs", "fp32"), images).argmax(1)
    names = json.loads((bdir / "bundle.json").read_text())["class_names"]
    assert [r["class1"] for r in rows] == [names[i] for i in expected]
    assert all(r["error"] == "" for r in rows)


def test_runner_runs_the_bundle_with_openvino_too(ws, bundle_copy, tmp_path):
    """run.py --runtime openvino: the same top-1 classes as onnxruntime on test images and scores within 1e-4;
    bf16 where the CPU offers it; bf16 without OpenVINO is a one-line error."""
    from pipeline.deploy.edge import edge_openvino

    root, params = ws
    bdir, env = bundle_copy
    folder = _image_folder(params, 8, tmp_path / "imgs")
    runs = {}
    for runtime in ("onnxruntime", "openvino"):
        proc = _run(["run.py", str(folder), "--variant", "fp32", "--runtime", runtime], bdir, env)
        assert proc.returncode == 0, proc.stderr
        runs[runtime] = list(csv.DictReader(io.StringIO(proc.stdout)))
    ort_rows, ov_rows = runs["onnxruntime"], runs["openvino"]
    assert [r["class1"] for r in ov_rows] == [r["class1"] for r in ort_rows]
    assert max(abs(float(a["score1"]) - float(b["score1"])) for a, b in zip(ort_rows, ov_rows, strict=True)) <= 1e-4
    one = _run(["run.py", str(folder / "000.png"), "--runtime", "openvino", "--variant", "int8"], bdir, env)
    assert one.returncode == 0 and "(model model_int8.onnx, openvino)" in one.stdout, one.stderr
    bf16 = _run(["run.py", str(folder / "000.png"), "--runtime", "openvino", "--variant", "bf16"], bdir, env)
    if edge_openvino.offers_bf16():
        assert bf16.returncode == 0 and "(model model_fp32.onnx, openvino, bf16)" in bf16.stdout, bf16.stderr
    else:
        assert bf16.returncode == 2 and "does not offer bf16" in bf16.stderr
    bad = _run(["run.py", str(folder / "000.png"), "--variant", "bf16", "--runtime", "onnxruntime"], bdir, env)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "run.py: error: variant bf16 is the fp32 file run by OpenVINO in bf16: add --runtime openvino")


def test_bench_prints_the_latency_table_without_torch(bundle_copy):
    bdir, env = bundle_copy
    proc = _run(["bench.py", "--variants", "fp32", "int8", "--iterations", "5", "--warmup", "1"], bdir, env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "p50_ms" in out and "p99_ms" in out and "throughput_ips" in out and "peak_rss_mb" in out
    assert out.count("tiny-1core") == 4  # 2 variants x 2 batch sizes


def test_runner_converts_wrong_size_and_mode(ws, bundle_copy, tmp_path):
    root, _ = ws
    bdir, env = bundle_copy
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (13, 20, 4), dtype=np.uint8), "RGBA")
    grey = rgba.convert("L")
    rgba.save(tmp_path / "odd.png")
    grey.save(tmp_path / "grey.png")
    spec = json.loads((bdir / "preprocessing.json").read_text())
    x = preprocess_image(spec, Image.open(tmp_path / "odd.png"))
    assert x.shape == (1, 3, 8, 8)
    for name in ("odd.png", "grey.png"):
        proc = _run(["run.py", str(tmp_path / name), "--variant", "fp32"], bdir, env)
        assert proc.returncode == 0, proc.stderr
    probs = onnx_logits(variant_file(root, "kd/tinynet_xs", "fp32"), x)
    names = json.loads((bdir / "bundle.json").read_text())["class_names"]
    first = _run(["run.py", str(tmp_path / "odd.png"), "--variant", "fp32"], bdir, env).stdout.splitlines()[1]
    assert first.split()[1] == names[int(probs.argmax())]


# --------------------------------------------------------------------------- hostile inputs


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_non_onnx_and_corrupted_model_files(bundle_copy, tmp_path):
    bdir, env = bundle_copy
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    fake = bdir / "notes.onnx"
    fake.write_text("this is not a model")
    proc = _run(["run.py", str(img), "--model", "notes.onnx", "--no-verify"], bdir, env)
    _no_traceback(proc)
    assert "not a usable ONNX model" in proc.stderr
    proc = _run(["run.py", str(img), "--model", "notes.onnx"], bdir, env)
    _no_traceback(proc)
    assert "not one of this bundle's models" in proc.stderr
    proc = _run(["bench.py", "--model", "notes.onnx"], bdir, env)
    _no_traceback(proc)
    assert "not a usable ONNX model" in proc.stderr
    broken = tmp_path / "copy"
    import shutil

    shutil.copytree(bdir, broken)
    data = (broken / "model_int8.onnx").read_bytes()
    (broken / "model_int8.onnx").write_bytes(data[: len(data) // 2])
    proc = _run(["run.py", str(img)], broken, env)
    _no_traceback(proc)
    assert "does not match the sha256" in proc.stderr
    proc = _run(["run.py", str(img), "--no-verify"], broken, env)
    _no_traceback(proc)
    assert "not a usable ONNX model" in proc.stderr
    with pytest.raises(EdgeError, match="not a usable ONNX model"):
        open_session(fake)


def test_unreadable_images(bundle_copy, tmp_path):
    bdir, env = bundle_copy
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    proc = _run(["run.py", str(bad)], bdir, env)
    _no_traceback(proc)
    assert "cannot read image" in proc.stderr and "bad.png" in proc.stderr
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, format="PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[:60])
    proc = _run(["run.py", str(tmp_path / "trunc.png")], bdir, env)
    _no_traceback(proc)
    proc = _run(["run.py", str(tmp_path / "missing.png")], bdir, env)
    _no_traceback(proc)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    (folder / "readme.txt").write_text("ignored")
    proc = _run(["run.py", str(folder)], bdir, env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["file"] for r in rows] == ["a.png", "b.jpg"]
    assert rows[0]["error"] == "" and "cannot read image" in rows[1]["error"]


def test_runner_refuses_a_model_outside_its_bundle(ws, bundle_copy, tmp_path):
    root, _ = ws
    bdir, env = bundle_copy
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(variant_file(root, "kd/tinynet_xs", "fp32").read_bytes())
    for arg in (str(outside), "../outside.onnx", os.path.relpath(outside, bdir)):
        proc = _run(["run.py", str(img), "--model", arg, "--no-verify"], bdir, env)
        _no_traceback(proc)
        assert "outside the bundle" in proc.stderr
    link = bdir / "link.onnx"
    link.symlink_to(outside)
    try:
        proc = _run(["run.py", str(img), "--model", "link.onnx", "--no-verify"], bdir, env)
        _no_traceback(proc)
        assert "outside the bundle" in proc.stderr
        with pytest.raises(EdgeError, match="outside the bundle"):
            resolve_inside("link.onnx", bdir)
    finally:
        link.unlink()


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("bundle/ok.txt")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"o"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("make", [
    lambda: tarfile.TarInfo("../evil.txt"),
    lambda: tarfile.TarInfo("bundle/../../evil.txt"),
    lambda: tarfile.TarInfo("/tmp/kdpipe-evil.txt"),
    lambda: (lambda t: (setattr(t, "type", tarfile.SYMTYPE), setattr(t, "linkname", "/etc/passwd"), t)[-1])(
        tarfile.TarInfo("bundle/link")),
    lambda: (lambda t: (setattr(t, "type", tarfile.LNKTYPE), setattr(t, "linkname", "../x"), t)[-1])(
        tarfile.TarInfo("bundle/hard")),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink"])
def test_archive_extraction_refuses_escaping_members(tmp_path, make):
    archive = _tar_with(tmp_path / "evil.tar.gz", make())
    dest = tmp_path / "out"
    with pytest.raises(DeployError, match="refusing to extract"):
        safe_extract(archive, dest)
    assert not dest.exists() or not any(dest.iterdir())  # nothing written, not even the good member
    assert not (tmp_path / "evil.txt").exists()


def test_corrupted_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    with pytest.raises(DeployError, match="bundle archive"):
        safe_extract(bad, tmp_path / "out")


# --------------------------------------------------------------------------- benchmark and report


def test_benchmark_measures_every_runtime_and_variant_and_the_eager_reference(ws):
    from pipeline.deploy.edge import edge_openvino

    root, _ = ws
    rep = json.loads(report_file(root, "benchmark").read_text())
    assert rep["settings"]["intra_op_spinning"] is False
    assert rep["settings"]["runtimes"] == ["onnxruntime", "openvino"] and rep["settings"]["runtimes_skipped"] == {}
    entry = rep["models"]["kd/tinynet_xs"]
    assert set(entry) == {"onnxruntime", "openvino", "torch"}
    assert set(entry["onnxruntime"]) == {"fp32", "int8"}  # the params of this workspace measure fp32 and int8
    bf16 = edge_openvino.offers_bf16()
    assert set(entry["openvino"]) == {"fp32", "int8"} | ({"bf16"} if bf16 else set())
    results = [*entry["onnxruntime"].values(), *entry["openvino"].values(), entry["torch"]["fp32"]]
    for res in results:
        prof = res["profiles"]["tiny-1core"]
        assert prof["status"] == "ok" and prof["threads"] == 1
        for b in ("1", "4"):
            st = prof["batches"][b]
            assert 0 < st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"] and st["runs"] >= 5 and st["throughput_ips"] > 0
        assert res["peak_rss_mb"] > 0 and res["file_bytes"] > 0
        assert res["headline"]["tiny-1core"]["throughput_batch"] == 4
    for runtime in ("onnxruntime", "openvino"):
        res = entry[runtime]["int8"]
        assert res["runtime"] == runtime and res["runtime_version"]
        cold = res["profiles"]["tiny-1core"]["cold_start"]
        assert cold["session_ms"] > 0 and cold["first_run_ms"] > 0 and res["cold_start"]["import_ms"] >= 0
        # the GEMM peak of this runtime at the profile's thread count, FP32 and INT8 (and bf16 where offered)
        peaks = rep["peak"][runtime]["peaks"]
        assert {"fp32", "int8"} <= set(peaks) and ("bf16" in peaks) == (bf16 and runtime == "openvino")
        for per in peaks.values():
            f = per["1"]
            assert f["macs"] == 1024 ** 3 and f["gmacs_per_s"] >= f["p50_gmacs_per_s"] > 0
    assert entry["openvino"]["fp32"]["precision"] == "f32"
    assert rep["environment"]["runtimes"]["openvino"] == edge_openvino.version()


def test_benchmark_without_openvino_records_the_skip_and_the_report_says_so(ws, tmp_path):
    """A machine without OpenVINO (hidden by a module that fails to import): the stage measures onnxruntime
    alone, says why OpenVINO is missing, and the report prints it."""
    import shutil

    import yaml

    root, params = ws
    work = tmp_path / "ws"
    shutil.copytree(root, work)
    (work / "params.yaml").write_text(yaml.safe_dump(deploy_params()))
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "openvino.py").write_text("raise ImportError('no openvino on this machine')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(repo)])}
    proc = subprocess.run([sys.executable, "-m", "stages.benchmark"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "benchmark: openvino skipped: openvino is not installed" in proc.stdout
    rep = json.loads(report_file(work, "benchmark").read_text())
    assert rep["settings"]["runtimes"] == ["onnxruntime"] and "openvino" in rep["settings"]["runtimes_skipped"]
    assert all(set(entry) == {"onnxruntime", "torch"} for entry in rep["models"].values())
    assert set(rep["peak"]) == {"onnxruntime"}
    report_all(params, work)
    md = (work / "reports/results.md").read_text()
    assert "Not measured with OpenVINO: openvino is not installed (pip install openvino" in md


def test_a_device_measured_with_bench_json_becomes_a_report_profile(ws, tmp_path):
    """bench.py --json on the "device" (a copied bundle), kdpipe device-results import, and the report gains
    the device: its latency columns, its Pareto front and its budget pick (benchmark.device_budgets)."""
    import shutil

    from pipeline.cli import main as kdpipe

    root, _ = ws
    work = tmp_path / "ws"
    shutil.copytree(root, work)
    device = tmp_path / "device" / "tinynet_xs-kd"
    shutil.copytree(root / "bundles" / "tinynet_xs-kd", device)
    proc = subprocess.run([sys.executable, "bench.py", "--runtime", "onnxruntime", "openvino", "--threads", "1",
                           "--batch-sizes", "1", "2", "--warmup", "1", "--iterations", "5", "--max-seconds", "0.05",
                           "--json", str(tmp_path / "results.json")], cwd=device, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert kdpipe(["device-results", "import", str(tmp_path / "results.json"), "--device", "pi5",
                   "--root", str(work)]) == 0
    raw = deploy_params()
    raw["benchmark"]["device_budgets"] = {"pi5": 1000.0}
    params = parse_params(raw)
    res = report_all(params, work)
    prof = res["profiles"]["pi5"]
    assert prof["budget_ms"] == 1000.0 and prof["pick"]["run"] == "kd/tinynet_xs"  # only its bundle was measured
    measured = [r for r in res["rows"] if r["latency"].get("pi5")]
    assert {r["run"] for r in measured} == {"kd/tinynet_xs"}
    assert {(r["runtime"], r["precision"]) for r in measured} >= {("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                                                   ("openvino", "fp32"), ("openvino", "int8")}
    assert all(label.startswith("tinynet_xs/kd") for label in prof["pareto_front"])
    md = (work / "reports/results.md").read_text()
    assert "pi5 p50 ms" in md and "| pi5 | 1000 |" in md


def test_quantize_scores_every_file_with_openvino_too(ws):
    root, _ = ws
    rep = json.loads(report_file(root, "quantize").read_text())
    assert rep["runtimes"] == ["onnxruntime", "openvino"]
    for key, acc in rep["models"].items():
        ov = acc["runtimes"]["openvino"]
        assert {"fp32", "fp16", "int8"} <= set(ov)
        fp32 = ov["fp32"]
        # f32 precision hint: OpenVINO reproduces onnxruntime's FP32 on the whole test split
        assert fp32["within_tolerance"] and fp32["max_abs_diff"] <= 1e-4 and fp32["top1_mismatches"] == 0, key
        assert fp32["top1"] == acc["fp32"]["top1"] and fp32["bytes"] == acc["fp32"]["bytes"]
        assert 0 <= ov["int8"]["top1"] <= 100 and ov["int8"]["file_variant"] == "int8"
        if "bf16" in ov:
            assert ov["bf16"]["file_variant"] == "fp32" and ov["bf16"]["precision"] == "bf16"
            assert ov["bf16"]["max_abs_diff"] > 0  # bf16 is another precision: it cannot be exact


def test_report_rows_budget_pick_and_plot(ws):
    root, params = ws
    res = json.loads((root / "reports/results.json").read_text())
    rows = res["rows"]
    ov_variants = len(json.loads(report_file(root, "quantize").read_text())["models"]["teacher"]["runtimes"]["openvino"])
    assert len(rows) == 3 * (3 + ov_variants)  # models x (onnxruntime's variants + OpenVINO's)
    assert {r["runtime"] for r in rows} == {"onnxruntime", "openvino"}
    roles = {r["run"]: r["role"] for r in rows}
    assert roles == {"teacher": "teacher", "baseline/tinynet_xs": "baseline", "kd/tinynet_xs": "distilled"}
    for r in rows:
        for key in ("student", "method", "precision", "top1", "top5", "params", "macs", "bytes"):
            assert key in r
        lat = r["latency"]["tiny-1core"]
        eff = r["efficiency"]["tiny-1core"]
        if r["precision"] == "fp16":  # not benchmarked in this workspace
            assert lat is None and eff is None
        else:
            assert lat["p50_ms"] > 0 and lat["p99_ms"] >= lat["p50_ms"]
            assert lat["p50_ci_ms"][0] <= lat["p50_ms"] <= lat["p50_ci_ms"][1] and r["graph_sha256"]
            # achieved MAC/s = MACs x images/s at the throughput batch; a fraction of the runtime's GEMM peak
            assert eff["gmacs_per_s"] == pytest.approx(r["macs"] * lat["throughput_ips"] / 1e9, rel=1e-4)
            assert 0 < eff["fraction_of_peak"] == pytest.approx(eff["gmacs_per_s"] / eff["peak_gmacs_per_s"], rel=1e-4)
    prof = res["profiles"]["tiny-1core"]
    pick = prof["pick"]
    assert pick is not None and pick["latency_ms"] <= 50.0 and prof["rule"] == res["pick_rule"] == params.report.pick
    best = max(r["top1"] for r in rows if r["latency"]["tiny-1core"] is not None)
    reference = next(r for r in rows if label(r) == prof["reference"])
    assert reference["top1"] == best  # the most accurate that fits; the pick is within noise of it
    assert pick["model"] in prof["within_noise"] and prof["reference"] in prof["within_noise"]
    md = (root / "reports/results.md").read_text()
    assert md.index("## Picks") < md.index("## Summary") < md.index("## Pareto front") < md.index("## Models")
    assert "| `kd/tinynet_xs` |" in md and "Pareto front" in md and "TensorRT" in md
    for section in ("## Other runtimes against onnxruntime", "## How close to the hardware's limit",
                    "## Cold start and memory"):
        assert section in md
    assert "tinynet_xs/kd int8 OpenVINO" in md
    with Image.open(root / "reports/pareto.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
