"""The second runtime and the hardware limit: OpenVINO sessions, measurements, GEMM peaks, a missing OpenVINO.

Real onnxruntime and OpenVINO sessions on small real ONNX files; the stage-level
figures (OpenVINO in quantize.json, benchmark.json and the report) are checked on the
deploy workspace of tests/test_deploy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.deploy.edge import edge_openvino
from pipeline.deploy.edge.edge_measure import measure_model, measure_peak
from pipeline.deploy.edge.edge_runtime import (
    EdgeError,
    available_runtimes,
    input_facts,
    open_session,
    runtime_variants,
)
from pipeline.deploy.export import export_onnx
from pipeline.deploy.peak import achieved, write_gemm_models
from pipeline.models import build

REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / "pipeline" / "deploy" / "edge"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A small real network (tinynet_s, 3x16x16, 5 classes) exported to ONNX."""
    torch.manual_seed(0)
    model = build("tinynet_s", num_classes=5, in_channels=3, image_size=16).eval()
    return export_onnx(model, tmp_path_factory.mktemp("rt") / "model_fp32.onnx", in_channels=3, image_size=16,
                       opset=18)


def test_openvino_session_reads_the_onnx_file_and_matches_onnxruntime(model_file):
    ov = open_session(model_file, threads=1, runtime="openvino")
    assert isinstance(ov, edge_openvino.OpenVinoSession) and ov.precision == "f32"
    name, chw, dtype = input_facts(ov)
    assert (name, chw, dtype) == ("input", (3, 16, 16), np.float32)
    assert ov.get_inputs()[0].shape == ["batch", 3, 16, 16]  # the dynamic batch survives
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(np.float32)
    ref = open_session(model_file, threads=1).run(None, {"input": x})[0]
    got = ov.run(None, {"input": x})[0]
    assert got.shape == (7, 5) and float(np.abs(got - ref).max()) <= 1e-5
    again = ov.run(None, {"input": x[:2]})[0]  # a copy, not the request's reused buffer
    assert float(np.abs(got[:2] - again).max()) <= 1e-6 and got.shape == (7, 5)


def test_bf16_is_its_own_variant_only_where_the_cpu_offers_it(model_file):
    plan = runtime_variants("openvino", ["fp32", "int8"])
    assert plan[:2] == [("fp32", "fp32", "f32"), ("int8", "int8", "f32")]
    assert runtime_variants("onnxruntime", ["fp32", "int8"]) == [("fp32", "fp32", "f32"), ("int8", "int8", "f32")]
    if edge_openvino.offers_bf16():
        assert plan[2:] == [("bf16", "fp32", "bf16")]
        sess = open_session(model_file, runtime="openvino", precision="bf16")
        assert sess.precision == "bf16"
    else:
        assert len(plan) == 2
        with pytest.raises(EdgeError, match="does not offer bf16"):
            open_session(model_file, runtime="openvino", precision="bf16")


def test_bad_runtime_inputs_are_one_line_errors(model_file, tmp_path):
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"not a model at all")
    cases = [
        (dict(path=garbage, runtime="openvino"), "OpenVINO cannot run bad.onnx"),
        (dict(path=model_file, runtime="tflite"), "unknown runtime 'tflite'; allowed: onnxruntime, openvino"),
        (dict(path=model_file, runtime="openvino", providers=["CUDAExecutionProvider"]), "runs on the CPU"),
        (dict(path=model_file, runtime="openvino", precision="int4"), "unknown OpenVINO precision 'int4'"),
        (dict(path=model_file.with_suffix(".ort"), runtime="openvino"), "not found"),
    ]
    for kwargs, message in cases:
        path = kwargs.pop("path")
        with pytest.raises(EdgeError) as err:
            open_session(path, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), kwargs
    ort_file = tmp_path / "model.ort"
    ort_file.write_bytes(b"x")
    with pytest.raises(EdgeError, match="OpenVINO reads the .onnx file"):
        open_session(ort_file, runtime="openvino")


def test_measure_model_with_openvino_records_cold_start_and_skips_gpu_profiles(model_file):
    profiles = [{"name": "one", "threads": 1, "batch_sizes": [1, 4]},
                {"name": "gpu", "threads": 0, "batch_sizes": [1], "providers": ["CUDAExecutionProvider"]}]
    res = measure_model(model_file, profiles, warmup=1, iterations=5, max_seconds=0.05, runtime="openvino")
    assert res["runtime"] == "openvino" and res["runtime_version"] == edge_openvino.version()
    assert res["precision"] == "f32"
    one = res["profiles"]["one"]
    assert one["status"] == "ok" and set(one["batches"]) == {"1", "4"}
    assert one["cold_start"]["session_ms"] > 0 and one["cold_start"]["first_run_ms"] > 0
    assert res["profiles"]["gpu"] == {"status": "skipped",
                                      "reason": "OpenVINO runs on the CPU here, not on ['CUDAExecutionProvider']"}
    assert res["cold_start"]["import_ms"] >= 0 and res["peak_rss_mb"] > 0


def test_gemm_peak_through_both_runtimes(tmp_path):
    gemms = write_gemm_models(tmp_path, n=128)
    assert [g["precision"] for g in gemms] == ["fp32", "int8"] and all(g["macs"] == 128 ** 3 for g in gemms)
    for runtime in ("onnxruntime", "openvino"):
        res = measure_peak(gemms, [1], runtime, warmup=1, iterations=5, max_seconds=0.05)
        for precision in ("fp32", "int8"):
            f = res["peaks"][precision]["1"]
            assert f["runs"] >= 5 and f["macs"] == 128 ** 3 and f["best_ms"] <= f["p50_ms"]
            assert f["gmacs_per_s"] == pytest.approx(128 ** 3 / f["best_ms"] / 1e6, rel=1e-3)
    # the INT8 GEMM computes what its QDQ graph says: uint8 of (x quantized) @ (w) rescaled
    import onnx
    from onnx import numpy_helper

    sess = open_session_any(gemms[1]["model"])
    x = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    w = numpy_helper.to_array(next(t for t in onnx.load(gemms[1]["model"]).graph.initializer if t.name == "w"))
    xq = np.clip(np.round(x / 0.02) + 128, 0, 255)
    expect = np.clip(np.round(((xq - 128) * 0.02) @ (w.astype(np.float64) * 0.01)) + 128, 0, 255)
    got = sess.run(None, {"x": x})[0].astype(np.float64)
    assert float(np.abs(got - expect).max()) <= 1.0  # integer kernels may round the last step differently


def open_session_any(path: str):
    """A plain onnxruntime session (the GEMM models have no image input, so not open_session)."""
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_achieved_rate_and_fraction_of_peak():
    a = achieved(2e6, 1000.0, 4.0)  # 2 MMAC/image x 1000 images/s = 2 GMAC/s, half of a 4 GMAC/s peak
    assert a == {"gmacs_per_s": 2.0, "peak_gmacs_per_s": 4.0, "fraction_of_peak": 0.5}
    assert achieved(None, 1000.0, 4.0) is None and achieved(2e6, None, 4.0) is None
    assert achieved(2e6, 1000.0, None)["fraction_of_peak"] is None


def test_a_missing_openvino_is_skipped_with_the_reason_and_bench_default(model_file, tmp_path):
    """With openvino unimportable the runtime list shrinks, the skip says how to install it, and the
    edge worker refuses --runtime openvino in one line."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "openvino.py").write_text("raise ImportError('openvino hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(EDGE), str(REPO)])}
    code = ("import json\nfrom edge_runtime import available_runtimes\n"
            "print(json.dumps(available_runtimes(['onnxruntime', 'openvino'])))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    runtimes, skipped = json.loads(out.stdout.strip().splitlines()[-1])
    assert runtimes == ["onnxruntime"]
    assert skipped == {"openvino": "openvino is not installed (pip install openvino; in a kdpipe checkout: "
                                   "pip install -e '.[openvino]')"}
    spec = {"model": str(model_file), "profiles": [{"name": "a", "threads": 1}], "warmup": 1, "iterations": 5,
            "max_seconds": 0.05, "runtime": "openvino"}
    proc = subprocess.run([sys.executable, str(EDGE / "edge_measure.py"), "cold", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error.startswith("runtime openvino is not installed here (openvino hidden for this test)")
    assert available_runtimes(["openvino", "onnxruntime"]) == (["openvino", "onnxruntime"], {})  # here both are
