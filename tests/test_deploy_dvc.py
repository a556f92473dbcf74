"""End to end: `dvc repro` of a tiny configuration through export, quantize, tensorrt, bundle, benchmark, report."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace, tiny_params

pytestmark = pytest.mark.slow

DEPLOY_STAGES = ["benchmark", "bundle", "quantize", "report", "tensorrt"]


def dvc(ws: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=ws, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    return sorted(line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    params = tiny_params(
        online={"methods": []},  # keep the run short; tests/test_deploy_units.py covers online runs' roles
        quantize={"calibration_samples": 32},
        benchmark={"warmup": 2, "iterations": 10, "max_seconds": 0.2, "variants": ["fp32", "int8"],
                   "torch_reference": False,  # the fast tests measure the eager reference; keep this run short
                   "profiles": [{"name": "edge-1core", "threads": 1, "batch_sizes": [1, 4], "latency_budget_ms": 100.0}]},
    )
    ws = make_workspace(tmp_path_factory.mktemp("deploy-ws"), params)
    dvc(ws, "repro")
    return ws


def test_repro_writes_every_deploy_artifact(workspace: Path):
    ws = workspace
    runs = ["teacher", "baseline/tinynet_s", "kd/tinynet_s"]
    for run in runs:
        assert (ws / "exports/onnx" / run / "model.onnx").is_file()
        for v in ("int8", "int8_trt", "fp16"):
            assert (ws / "exports/quantized" / run / f"model_{v}.onnx").is_file()
    export = json.loads((ws / "reports/export.json").read_text())
    assert all(m["parity"]["max_abs_diff"] <= 1e-4 for m in export["models"].values())
    trt = json.loads((ws / "exports/tensorrt/status.json").read_text())
    assert trt["status"] in ("skipped", "built") and (trt["status"] == "built" or trt["reason"])
    for name in ("teacher-tinynet_m", "tinynet_s-baseline", "tinynet_s-kd"):
        assert (ws / "bundles" / name / "run.py").is_file() and (ws / "bundles" / f"{name}.tar.gz").is_file()
    res = json.loads((ws / "reports/results.json").read_text())
    # 3 models x (onnxruntime fp32/fp16/int8 + OpenVINO's fp32/fp16/int8 and bf16 where the CPU offers it)
    ov_variants = {r["precision"] for r in res["rows"] if r["runtime"] == "openvino"}
    assert ov_variants >= {"fp32", "fp16", "int8"} and ov_variants <= {"fp32", "fp16", "int8", "bf16"}
    assert len(res["rows"]) == 3 * (3 + len(ov_variants)) and res["profiles"]["edge-1core"]["pick"] is not None
    md = (ws / "reports/results.md").read_text()
    assert md.startswith("# Deployment results") and "| 95 % interval |" in md
    why = res["profiles"]["edge-1core"]["why"]  # the pick in words, in both files
    assert re.match(rf"\d+ of {len(res['rows'])} models meet p50 <= 100 ms\. The pick, ", why) and f"- **edge-1core**: {why}" in md
    # what distillation buys: the KD student against the same student alone, on the same test images
    assert "## What distillation buys (PyTorch FP32, test split)" in md
    paired = {r["run"]: r for r in res["significance"]}
    assert set(paired) == {"teacher", "baseline/tinynet_s", "kd/tinynet_s"}
    kd = paired["kd/tinynet_s"]
    right = {k: [r["actual"] == r["predicted"] for r in json.loads((ws / "plots/confusion" / f"{k}.json").read_text())]
             for k in ("kd/tinynet_s", "baseline/tinynet_s")}
    pairs = zip(right["kd/tinynet_s"], right["baseline/tinynet_s"], strict=True)
    assert kd["only_model"] == sum(a and not b for a, b in pairs)
    assert 0 < kd["p_value"] <= 1 and "p_value" not in paired["teacher"]
    assert kd["ci_low"] <= kd["top1"] <= kd["ci_high"]
    assert ("Significant at 0.05: `kd/tinynet_s`" in md) == kd["significant"]
    assert (ws / "reports/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert {"reports/export.json", "reports/quantize.json", "reports/benchmark.json"} <= set(files)


def test_second_repro_runs_nothing(workspace: Path):
    out = dvc(workspace, "repro")
    assert ran(out) == []


def test_a_quantize_param_reruns_only_quantize_and_what_follows(workspace: Path):
    ws = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["quantize"]["calibration_method"] = "Percentile"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc(ws, "status", "--json").stdout)
    assert set(status) == {"quantize"}
    assert ran(dvc(ws, "repro")) == DEPLOY_STAGES
    meta = json.loads((ws / "reports/quantize.json").read_text())
    assert meta["recipe"]["calibration_method"] == "Percentile"


def test_a_failing_parity_check_stops_the_stage_with_one_line(workspace: Path):
    ws = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["export"]["parity_atol"] = 1e-12  # ONNX Runtime and PyTorch differ by ~1e-6: this must fail
    params["export"]["parity_rtol"] = 0.0
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["python", "-m", "stages.export"], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "export: error: parity of teacher" in proc.stderr and "at test image" in proc.stderr
    assert (ws / "exports/onnx/teacher/model.onnx").is_file()  # the previous export is left as it was
