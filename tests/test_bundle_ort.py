"""ONNX Runtime Mobile in the edge bundle: the .ort files, their parity, the operator config, ``run.py --format ort``.

One bundle of a briefly trained ``tinynet_xs`` (synthetic 8x8 RGB data, the deploy
tests' params) is made with :func:`make_bundle`, the real onnxruntime converter and no
mocks; the runner then runs from an extracted copy in a subprocess that cannot import
torch or this package, as on a device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import build_data, preprocessing_spec
from pipeline.deploy import DeployError
from pipeline.deploy.artifacts import calibration_indices, split_arrays
from pipeline.deploy.bundle import make_bundle, pack, safe_extract
from pipeline.deploy.edge.edge_runtime import EdgeError, open_session
from pipeline.deploy.export import export_onnx
from pipeline.deploy.ort_mobile import ORT_CONFIG, ORT_TOLERANCE, canonical_ort, ort_parity
from pipeline.deploy.quantize import convert_fp16, quantize_int8
from pipeline.engine.atomic import file_sha256
from pipeline.models import build
from pipeline.params import parse_params
from tests.test_deploy import _blocking_env, _no_traceback, _run, _test_images, deploy_params, quick_train

ORT_VARIANTS = ("fp32", "fp16", "int8")


def _bundle(dest: Path, models: dict[str, Path], spec: dict, class_names: list[str], ort: bool = True) -> dict:
    """``make_bundle`` of ``models`` with the facts a test needs (no accuracy, one benchmark profile)."""
    return make_bundle(dest, name=dest.name, models=models, preprocessing=spec, class_names=class_names,
                       info={"run": "kd/tinynet_xs", "role": "distilled", "arch": "tinynet_xs", "source_sha256": "0" * 64},
                       benchmark={"profiles": [{"name": "tiny-1core", "threads": 1, "batch_sizes": [1]}]},
                       tensorrt={"status": "skipped", "reason": "test"}, ort=ort)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """The exported variants of a trained tinynet_xs, and a bundle of them (what the bundle stage makes)."""
    root = tmp_path_factory.mktemp("ort")
    params = parse_params(deploy_params())
    data = build_data(params.data, params.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is fastest and kind to a shared machine
    try:
        torch.manual_seed(0)
        model = quick_train(build("tinynet_xs", data.num_classes, data.in_channels, data.image_size), data.train_eval)
        fp32 = export_onnx(model, root / "exports" / "model.onnx", in_channels=data.in_channels,
                           image_size=data.image_size, opset=params.export.opset)
    finally:
        torch.set_num_threads(threads)
    calib, _ = split_arrays(data.train_eval, calibration_indices(len(data.train_eval), 64, params.seed))
    models = {"fp32": fp32, "fp16": convert_fp16(fp32, root / "exports" / "model_fp16.onnx")}
    for variant, activations in (("int8", params.quantize.activation_type), ("int8_trt", "int8")):
        models[variant] = root / "exports" / f"model_{variant}.onnx"
        quantize_int8(fp32, models[variant], calib, activation_type=activations)
    spec, names = preprocessing_spec(data), list(data.class_names)
    bdir = root / "bundles" / "tinynet_xs-kd"
    manifest = _bundle(bdir, models, spec, names)
    archive = pack(bdir, root / "bundles" / "tinynet_xs-kd.tar.gz")
    device = root / "device"
    safe_extract(archive, device)
    return {"root": root, "params": params, "models": models, "spec": spec, "names": names, "bundle": bdir,
            "manifest": manifest, "archive": archive, "device": device / bdir.name, "env": _blocking_env(root)}


def test_every_onnxruntime_variant_has_an_ort_file_with_its_hash_and_parity(made):
    b, manifest = made["bundle"], made["manifest"]
    assert json.loads((b / "bundle.json").read_text()) == manifest
    for variant in ORT_VARIANTS:
        entry = manifest["models"][variant]["ort"]
        ort_file = b / entry["file"]
        assert entry["file"] == f"model_{variant}.ort" and ort_file.is_file()
        assert entry["sha256"] == file_sha256(ort_file) and entry["bytes"] == ort_file.stat().st_size
        parity = entry["parity"]
        atol, rtol = ORT_TOLERANCE[variant]
        assert parity["tolerance"] == pytest.approx(max(atol, rtol * parity["max_abs_logit"]))
        assert 0.0 <= parity["max_abs_diff"] <= parity["tolerance"]
        assert parity["top1_agree"] == parity["inputs"] > 0
    assert manifest["models"]["fp32"]["ort"]["parity"]["max_abs_diff"] < 1e-4  # the same float32 graph
    # the TensorRT-only file gets none, and the manifest says why
    assert "ort" not in manifest["models"]["int8_trt"] and not (b / "model_int8_trt.ort").exists()
    section = manifest["ort"]
    assert section["enabled"] and section["variants"] == sorted(ORT_VARIANTS)
    assert section["optimization_style"] == "Fixed" and section["optimization_level"] == "extended"
    assert section["operators_config"] == ORT_CONFIG and "TensorRT" in section["skipped"]["int8_trt"]


def _optimised_ops(model: Path, tmp: Path) -> set[tuple[str, str]]:
    """(domain, operator) of ``model`` after onnxruntime's extended optimisations, saved as ONNX: a second route."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp / f"{model.stem}.extended.onnx")
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(so.optimized_model_filepath).graph.node}


def test_the_operator_config_lists_the_models_operators(made, tmp_path):
    text = (made["bundle"] / ORT_CONFIG).read_text()
    assert "/tmp" not in text and "kdpipe-ort-" not in text  # no scratch paths: the bundle's bytes stay reproducible
    ops: set[tuple[str, str]] = set()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        domain, opset, names = line.split(";")
        assert domain in ("ai.onnx", "com.microsoft") and int(opset) > 0
        ops |= {(domain, op) for op in names.split(",")}
    expected = set().union(*(_optimised_ops(made["models"][v], tmp_path) for v in ORT_VARIANTS))
    assert ops == expected  # one config for all three files: every operator any of them runs, nothing more
    names = {op for _, op in ops}
    assert {"Conv", "Cast"} <= names  # fp32 and fp16 (its float32 input and output)
    assert "QLinearConv" in names  # int8 runs integer kernels, not float convolutions between Q/DQ pairs


def test_canonical_ort_bytes_do_not_depend_on_the_converting_process(made):
    data = (made["bundle"] / "model_fp32.ort").read_bytes()
    assert canonical_ort(data) == data  # already canonical: rewriting changes nothing
    assert canonical_ort(b"not a flatbuffer") == b"not a flatbuffer"  # what it cannot read is left alone


def _top(stdout: str) -> list[tuple[str, float]]:
    """(class, score) rows of run.py's single-image output."""
    rows = [ln.split() for ln in stdout.splitlines()[1:] if ln.strip()]
    return [(r[1], float(r[2])) for r in rows]


def test_runner_format_ort_gives_the_onnx_answer_without_torch(made, tmp_path):
    bdir, env = made["device"], made["env"]
    raw, _ = _test_images(made["params"], 3)
    for i, img in enumerate(raw):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    for variant in ORT_VARIANTS:
        for i in range(len(raw)):
            img = str(tmp_path / f"{i}.png")
            onnx_run = _run(["run.py", img, "--variant", variant], bdir, env)
            ort_run = _run(["run.py", img, "--variant", variant, "--format", "ort"], bdir, env)
            assert onnx_run.returncode == 0 and ort_run.returncode == 0, (onnx_run.stderr, ort_run.stderr)
            assert f"(model model_{variant}.ort, onnxruntime)" in ort_run.stdout
            a, b = _top(onnx_run.stdout), _top(ort_run.stdout)
            assert [c for c, _ in a][:1] == [c for c, _ in b][:1]
            assert np.allclose([s for _, s in a], [s for _, s in b], atol=2e-4)  # printed to 4 decimals
    by_name = _run(["run.py", str(tmp_path / "0.png"), "--model", "model_fp32.ort"], bdir, env)
    assert by_name.returncode == 0, by_name.stderr
    assert _top(by_name.stdout)[0][0] == _top(_run(["run.py", str(tmp_path / "0.png"), "--variant", "fp32"],
                                                   bdir, env).stdout)[0][0]


def test_a_corrupt_ort_file_exits_2_with_one_line(made, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(made["device"], broken)
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    data = (broken / "model_fp32.ort").read_bytes()
    (broken / "model_fp32.ort").write_bytes(data[: len(data) // 2])
    env = made["env"]
    proc = _run(["run.py", str(img), "--variant", "fp32", "--format", "ort"], broken, env)
    _no_traceback(proc)
    assert "model_fp32.ort does not match the sha256" in proc.stderr
    proc = _run(["run.py", str(img), "--model", "model_fp32.ort", "--no-verify"], broken, env)
    _no_traceback(proc)
    assert "model_fp32.ort" in proc.stderr and "not a usable" in proc.stderr
    (broken / "notes.ort").write_text("this is not a model")
    proc = _run(["run.py", str(img), "--model", "notes.ort"], broken, env)
    _no_traceback(proc)
    assert "not one of this bundle's models" in proc.stderr and "model_int8.ort" in proc.stderr
    with pytest.raises(EdgeError, match="not a usable"):
        open_session(broken / "notes.ort")


def test_runner_refuses_a_missing_or_contradicting_format(made, tmp_path):
    bdir, env = made["device"], made["env"]
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    proc = _run(["run.py", str(img), "--variant", "int8_trt", "--format", "ort"], bdir, env)
    _no_traceback(proc)
    assert "int8_trt" in proc.stderr and "no .ort file" in proc.stderr and "fp16, fp32, int8" in proc.stderr
    proc = _run(["run.py", str(img), "--model", "model_fp32.onnx", "--format", "ort"], bdir, env)
    _no_traceback(proc)
    assert "not a .ort file" in proc.stderr


def test_parity_beyond_the_tolerance_names_the_file_and_the_figure(made):
    b = made["bundle"]
    with pytest.raises(DeployError) as exc:  # the int8 graph is not the fp32 graph: far beyond 1e-4
        ort_parity(b / "model_fp32.onnx", b / "model_int8.ort", "fp32", "bundle t")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("bundle t: model_int8.ort does not reproduce model_fp32.onnx")
    assert "max |Δlogit| = " in msg and "above the tolerance 0.0001" in msg


def test_a_conversion_failure_is_one_line_naming_the_file(made, tmp_path):
    bad = tmp_path / "model_fp16.onnx"
    bad.write_bytes(b"this is not an ONNX model\n")
    models = {"fp32": made["models"]["fp32"], "fp16": bad}
    with pytest.raises(DeployError) as exc:
        _bundle(tmp_path / "b", models, made["spec"], made["names"])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("bundle b: ORT conversion of model_fp16.onnx failed: "), msg
    assert "kdpipe-ort-" not in msg  # the scratch folder is gone: the message names the file only


def test_bundle_ort_false_writes_no_ort_files(made, tmp_path):
    manifest = _bundle(tmp_path / "plain", {"fp32": made["models"]["fp32"]}, made["spec"], made["names"], ort=False)
    assert manifest["ort"] == {"enabled": False} and "ort" not in manifest["models"]["fp32"]
    assert not list((tmp_path / "plain").glob("*.ort")) and not (tmp_path / "plain" / ORT_CONFIG).exists()
    assert ".ort" not in (tmp_path / "plain" / "README.md").read_text()


def test_readme_lists_the_ort_files_and_the_reduced_build(made):
    text = (made["bundle"] / "README.md").read_text()
    assert "## ONNX Runtime Mobile (.ort)" in text
    for variant in ORT_VARIANTS:
        assert f"| `model_{variant}.ort` | `model_{variant}.onnx` |" in text
    assert "python run.py image.png --format ort" in text and "--model model_" in text
    assert f"--include_ops_by_config /path/to/this/bundle/{ORT_CONFIG}" in text and "--minimal_build" in text
    assert "No `.ort` for `model_int8_trt.onnx`" in text


def test_a_second_bundle_of_the_same_models_is_byte_identical(made, tmp_path):
    again = tmp_path / made["bundle"].name
    _bundle(again, made["models"], made["spec"], made["names"])
    assert pack(again, tmp_path / "again.tar.gz").read_bytes() == made["archive"].read_bytes()
