"""Deployment pieces that need no trained model: Pareto logic, budget picks, TensorRT API use, deploy params."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pipeline.config.base import ConfigError
from pipeline.deploy.edge import build_engine as be
from pipeline.deploy.tensorrt_build import tensorrt_availability, trtexec_commands, trtexec_script
from pipeline.params import parse_params
from pipeline.report.results import summarize
from pipeline.report.rows import best_under_budget, build_rows, label, pareto_front
from tests.conftest import tiny_params

# --------------------------------------------------------------------------- Pareto front and budgets


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [(1.0, 80.0), (2.0, 90.0), (1.5, 85.0), (3.0, 88.0), (0.5, 70.0), (2.0, 89.0), (4.0, 95.0)]
    assert pareto_front(pts) == [4, 0, 2, 1, 6]  # ordered by latency; (3.0, 88) and (2.0, 89) are dominated


def test_pareto_front_ties_and_duplicates():
    assert pareto_front([(1.0, 90.0), (1.0, 90.0)]) == [0]  # an exact duplicate is dominated by the first
    assert pareto_front([(1.0, 80.0), (1.0, 90.0)]) == [1]  # same latency: the more accurate one
    assert pareto_front([(1.0, 90.0), (2.0, 90.0)]) == [0]  # same accuracy: the faster one
    assert pareto_front([]) == []


def _row(run: str, precision: str, top1: float, p50: float | None, role: str = "distilled", nbytes: int = 100) -> dict:
    student, method = (run.split("/")[1], run.split("/")[0]) if "/" in run else (None, None)
    return {"run": run, "role": role, "student": student, "method": method, "arch": student or "tinynet_l",
            "precision": precision, "top1": top1, "top5": 100.0, "bytes": nbytes, "bundle": run.replace("/", "-"),
            "latency": {"edge": None if p50 is None else {"p50_ms": p50, "p99_ms": p50 * 1.5}}}


def test_best_under_budget_picks_the_most_accurate_model_that_fits():
    rows = [_row("kd/a", "fp32", 90.0, 2.0), _row("kd/a", "int8", 89.5, 0.8), _row("baseline/a", "int8", 88.0, 0.5),
            _row("kd/b", "fp32", 95.0, None)]
    assert best_under_budget(rows, "edge", 1.0)["precision"] == "int8"
    assert best_under_budget(rows, "edge", 1.0)["run"] == "kd/a"
    assert best_under_budget(rows, "edge", 5.0)["top1"] == 90.0  # unmeasured rows never qualify
    assert best_under_budget(rows, "edge", 0.1) is None
    tie = [_row("kd/a", "fp32", 90.0, 0.9, nbytes=300), _row("kd/a", "int8", 90.0, 0.4, nbytes=100)]
    assert best_under_budget(tie, "edge", 1.0)["precision"] == "int8"  # tie on accuracy: the faster


def test_summary_names_front_and_pick():
    rows = [_row("teacher", "fp32", 97.0, 3.0, role="teacher"), _row("kd/a", "int8", 93.0, 0.5),
            _row("baseline/a", "int8", 91.0, 0.6, role="baseline")]
    s = summarize(rows, [{"name": "edge", "latency_budget_ms": 1.0}], "p50")["edge"]
    assert s["pareto_front"] == ["a/kd int8", "teacher tinynet_l fp32"]
    assert s["pick"]["model"] == "a/kd int8" and s["pick"]["latency_ms"] == 0.5
    assert label(rows[2]) == "a/baseline int8"


def test_a_size_budget_leaves_out_the_large_files_and_the_pick_is_explained():
    rows = [_row("teacher", "fp32", 98.0, 0.3, role="teacher", nbytes=400 * 1024),
            _row("teacher", "int8", 97.5, 0.2, role="teacher", nbytes=300 * 1024),
            _row("kd/a", "fp32", 96.0, 0.2, nbytes=40 * 1024), _row("dkd/a", "fp32", 95.0, 0.1, nbytes=40 * 1024),
            _row("baseline/a", "fp32", 90.0, 0.1, role="baseline", nbytes=40 * 1024),
            _row("at/a", "fp32", 97.0, 2.0, nbytes=40 * 1024)]
    assert best_under_budget(rows, "edge", None, size_kib=256)["run"] == "at/a"  # size only: latency not asked
    assert best_under_budget(rows, "edge", 1.0, size_kib=256)["run"] == "kd/a"  # both budgets
    assert best_under_budget(rows, "edge", 1.0, size_kib=30) is None
    s = summarize(rows, [{"name": "edge", "latency_budget_ms": 1.0, "size_budget_kib": 256}], "p50",
                  test_images=400)["edge"]
    assert s["pick"]["run"] == "kd/a" and s["pick"]["kib"] == 40.0 and s["size_budget_kib"] == 256
    why = s["why"]
    assert why.startswith("3 of 6 models meet p50 <= 1 ms and file <= 256 KiB.")
    assert "The pick, a/kd fp32, is the most accurate of them (96.00 %)." in why
    # the three more accurate rows, most accurate first, each with the budget it misses
    assert ("teacher tinynet_l fp32 (98.00 %: 400.0 KiB > 256 KiB); teacher tinynet_l int8 (97.50 %: 300.0 KiB > "
            "256 KiB); a/at fp32 (97.00 %: p50 2.000 ms > 1 ms)") in why
    # 96 % of 400 images: Wilson interval 93.60-97.52 %, which holds dkd (95 %) but not the baseline (90 %)
    assert ("1 other fitting model has top-1 inside the pick's 95 % interval (93.60-97.52 %): on 400 test images "
            "the pick is not shown better than it.") in why
    s = summarize(rows[2:5], [{"name": "edge", "latency_budget_ms": 1.0}], "p50", test_images=4000)["edge"]
    assert "No model that misses the budgets is more accurate." in s["why"]
    assert "No other fitting model reaches the pick's 95 % interval" in s["why"]  # 4000 images: 95 % is outside
    assert summarize(rows, [{"name": "edge"}], "p50")["edge"]["why"] == ""  # no budget, no pick
    none = summarize(rows, [{"name": "edge", "size_budget_kib": 1}], "p50")["edge"]
    assert none["pick"] is None and none["why"].endswith("None fits, so there is no pick.")


def test_build_rows_joins_the_stage_reports():
    export = {"models": {"kd/a": {"role": "distilled", "student": "a", "method": "kd", "arch": "a", "bundle": "a-kd"}}}
    quantize = {"models": {"kd/a": {"fp32": {"top1": 90.0, "top5": 99.0, "bytes": 4000},
                                    "int8": {"top1": 89.0, "top5": 99.0, "bytes": 1200},
                                    "runtimes": {"openvino": {"int8": {"top1": 88.5, "top5": 98.0, "bytes": 1200}}}}}}
    edge = {"threads": 1, "status": "ok", "cold_start": {"session_ms": 5.0, "first_run_ms": 0.5}}
    bench = {"models": {"kd/a": {
        "onnxruntime": {
            "fp32": {"peak_rss_mb": 50.0, "profiles": {"edge": edge},
                     "headline": {"edge": {"p50_ms": 1.0, "p99_ms": 2.0, "throughput_ips": 1000.0}}},
            "int8": {"peak_rss_mb": 48.0, "headline": {"edge": {"p50_ms": 0.4, "p99_ms": 0.9}}}},
        "openvino": {"int8": {"peak_rss_mb": 60.0, "cold_start": {"import_ms": 90.0}, "profiles": {"edge": edge},
                              "headline": {"edge": {"p50_ms": 0.2, "p99_ms": 0.3, "throughput_ips": 4000.0}}}}}},
        "peak": {"onnxruntime": {"peaks": {"fp32": {"1": {"gmacs_per_s": 0.01}}}},
                 "openvino": {"peaks": {"int8": {"1": {"gmacs_per_s": 0.1}}}}}}
    rows = build_rows(export, quantize, bench, {"kd/a": {"params": 1000, "macs": 5000}}, [{"name": "edge", "threads": 1}])
    assert [(r["runtime"], r["precision"], r["top1"], r["bytes"], r["params"], r["macs"]) for r in rows] == [
        ("onnxruntime", "fp32", 90.0, 4000, 1000, 5000), ("onnxruntime", "int8", 89.0, 1200, 1000, 5000),
        ("openvino", "int8", 88.5, 1200, 1000, 5000)]  # OpenVINO's row: its own accuracy of the same file
    assert rows[1]["latency"]["edge"]["p99_ms"] == 0.9 and rows[1]["role"] == "distilled"
    # 5000 MACs x 1000 images/s = 5e-3 GMAC/s, half of onnxruntime's FP32 peak; OpenVINO INT8 against its INT8 peak
    assert rows[0]["efficiency"]["edge"] == {"gmacs_per_s": 0.005, "peak_gmacs_per_s": 0.01, "fraction_of_peak": 0.5}
    assert rows[2]["efficiency"]["edge"]["fraction_of_peak"] == 0.2
    assert rows[1]["efficiency"]["edge"] is None  # no throughput figure: nothing to compare
    assert rows[2]["cold_start"]["edge"] == {"session_ms": 5.0, "first_run_ms": 0.5} and rows[2]["import_ms"] == 90.0
    assert rows[2]["peak_rss_mb"] == 60.0 and label(rows[2]) == "a/kd int8 OpenVINO" and label(rows[1]) == "a/kd int8"


# --------------------------------------------------------------------------- TensorRT


class _FakeTRT(types.ModuleType):
    """Records how build_engine drives the TensorRT Python API (10.x or 11.x)."""

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple] = []
        calls = self.calls
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Cache:
            def serialize(self) -> bytes:
                return b"cache-bytes"

        class Config:
            builder_optimization_level = 3

            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("add_profile",))

            def create_timing_cache(self, blob):
                calls.append(("create_cache", blob))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_cache", ignore_mismatch))

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("shape", name, lo, opt, hi))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse", Path(path).name))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.mark.parametrize("version,precision,flags,source", [
    ("10.9.0", "fp16", ["FP16"], "fp32"),
    ("10.9.0", "int8", ["FP16", "INT8"], "int8_trt"),
    ("11.1.0", "fp16", [], "fp16"),
    ("11.1.0", "int8", [], "int8_trt"),
])
def test_build_engine_uses_flags_on_10_and_strong_typing_on_11(monkeypatch, tmp_path, version, precision, flags, source):
    fake = _FakeTRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert be.source_variant(precision, be.tensorrt_major(fake)) == source
    cache = tmp_path / "cache" / "timing.cache"
    facts = be.build_engine(tmp_path / f"model_{source}.onnx", tmp_path / "e.plan", precision, "input", (3, 32, 32),
                            (1, 8, 32), cache, 256)
    assert [c[1] for c in fake.calls if c[0] == "flag"] == flags
    assert ("shape", "input", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32)) in fake.calls
    assert ("pool", "WORKSPACE", 256 << 20) in fake.calls
    assert ("create_cache", b"") in fake.calls and cache.read_bytes() == b"cache-bytes"
    assert (tmp_path / "e.plan").read_bytes() == b"engine"
    assert facts["typing"] == ("strong" if version.startswith("11") else "weak")
    cache.write_bytes(b"old")  # a second build starts from the saved cache
    fake.calls.clear()
    be.build_engine(tmp_path / "m.onnx", tmp_path / "e2.plan", precision, "input", (3, 32, 32), (1, 8, 32), cache)
    assert ("create_cache", b"old") in fake.calls


def test_tensorrt_missing_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    trt, reason = tensorrt_availability()
    assert trt is None and "tensorrt is not installed" in reason


def test_trtexec_commands_per_major_version():
    cmds = trtexec_commands({"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"},
                            (1, 8, 8), (1, 8, 32), ["fp32", "fp16", "int8"], 512)
    ten, eleven = cmds["10"], cmds["11"]
    assert "--onnx=model_fp32.onnx --saveEngine=model_fp16.plan" in ten[1] and ten[1].endswith("--fp16")
    assert "--onnx=model_int8.onnx" in ten[2] and "--int8" in ten[2]
    assert "--onnx=model_fp16.onnx --saveEngine=model_fp16.plan" in eleven[1] and "--fp16" not in eleven[1]
    assert "--int8" not in eleven[2] and "--onnx=model_int8.onnx" in eleven[2]
    for c in ten + eleven:
        assert "--minShapes=input:1x1x8x8" in c and "--maxShapes=input:32x1x8x8" in c
        assert "--timingCacheFile=timing.cache" in c and "--memPoolSize=workspace:512M" in c
    with_trt = trtexec_commands({"fp32": "a.onnx", "int8": "b.onnx", "int8_trt": "c.onnx"}, (1, 8, 8), (1, 8, 32),
                                ["int8"], 512)
    assert "--onnx=c.onnx" in with_trt["10"][0] and "--onnx=c.onnx" in with_trt["11"][0]  # the symmetric QDQ file
    script = trtexec_script(cmds)
    assert script.startswith("#!/bin/sh") and 'if [ "$MAJOR" -ge 11 ]' in script


def test_device_hash_is_the_manifest_hash(tmp_path: Path):
    """edge_runtime keeps its own copy of file_sha256 (no kdpipe on the device): it must agree."""
    import hashlib

    from pipeline.deploy.edge import edge_runtime
    from pipeline.engine.atomic import file_sha256

    f = tmp_path / "model.onnx"
    f.write_bytes(bytes(range(256)) * 5000)  # more than one 1 MiB chunk
    assert file_sha256(f) == edge_runtime.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- params


def test_deployable_runs_cover_teacher_baseline_offline_and_online():
    from pipeline.deploy.artifacts import deployable_runs

    p = parse_params({**tiny_params(online={"methods": ["dml"]}), "students": {"tinynet_s": {}, "resnet8": {}}})
    got = [(d.key, d.role, d.bundle_name) for d in deployable_runs(p)]
    assert got == [("teacher", "teacher", "teacher-tinynet_m"),
                   ("baseline/tinynet_s", "baseline", "tinynet_s-baseline"), ("kd/tinynet_s", "distilled", "tinynet_s-kd"),
                   ("dml/tinynet_s", "online", "tinynet_s-dml"),
                   ("baseline/resnet8", "baseline", "resnet8-baseline"), ("kd/resnet8", "distilled", "resnet8-kd"),
                   ("dml/resnet8", "online", "resnet8-dml")]
    assert [d.key for d in deployable_runs(p, include_teacher=False)][0] == "baseline/tinynet_s"


def test_deploy_defaults_are_the_issue_defaults():
    p = parse_params(tiny_params())
    assert p.export.opset == 18 and p.export.parity_atol == 1e-4 and p.export.example_batch >= 2
    assert p.quantize.per_channel and p.quantize.calibration_method == "MinMax"
    names = {pr.name: pr for pr in p.benchmark.profiles}
    assert names["edge-1core"].threads == 1 and names["edge-1core"].batch_sizes == [1]
    assert names["edge-4core"].threads == 4 and "server" in names


@pytest.mark.parametrize("section,body,needle", [
    ("export", {"opset": 12}, "export.opset"),
    ("export", {"example_batch": 1}, "export.example_batch"),
    ("quantize", {"calibration_method": "KL"}, "quantize.calibration_method"),
    ("quantize", {"calibration_samples": 0}, "quantize.calibration_samples"),
    ("tensorrt", {"min_batch": 8, "opt_batch": 4}, "min_batch <= opt_batch"),
    ("bundle", {"variants": ["int8"]}, "must include fp32"),
    ("benchmark", {"profiles": [{"name": "a", "batch_sizes": [8, 1]}]}, "strictly increasing"),
    ("benchmark", {"profiles": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ("benchmark", {"profiles": [{"name": "a b"}]}, "benchmark.profiles.0.name"),
    ("benchmark", {"profiles": [{"name": "a", "size_budget_kib": 0}]}, "benchmark.profiles.0.size_budget_kib"),
    ("report", {"latency_statistic": "mean"}, "report.latency_statistic"),
])
def test_bad_deploy_params_name_the_key(section, body, needle):
    with pytest.raises(ConfigError) as exc:
        parse_params(tiny_params(**{section: body}), source="params.yaml")
    assert needle in str(exc.value)
