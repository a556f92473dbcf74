"""Schemas of the deployment sections of params.yaml, one per stage: export, quantize, tensorrt, bundle, benchmark, report."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Strict

PRECISIONS = ("fp32", "fp16", "int8")
#: Runtimes the benchmark can measure with (pipeline.deploy.edge.edge_runtime.RUNTIMES).
RUNTIMES = ("onnxruntime", "openvino")
#: What a device name may look like (a file name under device_results/).
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

class ExportConfig(Strict):
    """ONNX export (dynamo exporter) and its parity check against PyTorch on the test split."""

    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the export; 18 by default, 17 for older runtimes")
    example_batch: int = Field(2, ge=2, le=256, description="batch of the example input the exporter traces; >= 2 so the batch dimension stays symbolic")
    include_teacher: bool = Field(True, description="export (and quantize, bundle, benchmark) the teacher as well, for reference")
    parity_atol: float = Field(1e-4, gt=0.0, le=1.0, description="largest |logit difference| allowed between ONNX Runtime and PyTorch on any test image (plus parity_rtol x |logit|)")
    parity_rtol: float = Field(1e-5, ge=0.0, le=0.1, description="relative part of the parity tolerance: float32 rounding grows with a logit's size")
    batch_size: int = Field(256, ge=1, le=65536, description="batch size of the parity and accuracy runs")

class QuantizeConfig(Strict):
    """onnxruntime static INT8 (QDQ, per-channel weights, calibrated on training images) and an FP16 copy."""

    int8: bool = Field(True, description="make the INT8 (QDQ) model")
    fp16: bool = Field(True, description="make the FP16 model (float32 inputs and outputs kept)")
    calibration_samples: int = Field(256, ge=1, le=1_000_000, description="training images (un-augmented, a seeded sample) the calibration reads")
    calibration_batch_size: int = Field(32, ge=1, le=4096, description="images per calibration batch")
    calibration_method: Literal["MinMax", "Entropy", "Percentile"] = Field("MinMax", description="how activation ranges are chosen (onnxruntime CalibrationMethod)")
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="Percentile calibration: the percentile of |activation| kept")
    histogram_bins: int = Field(2048, ge=128, le=65536, description="activation histogram bins of Entropy and Percentile calibration (onnxruntime's own default of 128 makes Entropy equal MinMax)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    activation_type: Literal["int8", "uint8"] = Field("uint8", description="activations of model_int8.onnx: uint8 (asymmetric) is onnxruntime's fast CPU path (QLinearConv with fused ReLU); int8 is signed symmetric")
    tensorrt_qdq: bool = Field(True, description="also write model_int8_trt.onnx (signed symmetric INT8 QDQ, zero points 0), the form TensorRT's explicit quantization reads; not needed when activation_type is int8")
    max_int8_drop: float = Field(1.0, ge=0.0, le=100.0, description="top-1 points the INT8 model may lose against FP32 before the report flags it")

class TensorRTConfig(Strict):
    """TensorRT engine builds (10.x builder flags or 11.x strongly typed); skipped where tensorrt or a GPU is missing."""

    enabled: bool = Field(True, description="try to build engines (the stage records 'skipped' when it cannot)")
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: ["fp16", "int8"], description="engines to build per model")
    min_batch: int = Field(1, ge=1, description="optimization profile: smallest batch")
    opt_batch: int = Field(8, ge=1, description="optimization profile: batch the kernels are tuned for")
    max_batch: int = Field(32, ge=1, description="optimization profile: largest batch")
    workspace_mb: int = Field(1024, ge=16, le=1 << 20, description="builder workspace memory pool")
    optimization_level: int = Field(3, ge=0, le=5, description="builder optimization level (TensorRT default 3)")
    timing_cache: str = Field(".kdpipe/tensorrt/timing.cache", description="timing cache file reused across builds (GPU-specific, not a DVC out)")

    @model_validator(mode="after")
    def _batches(self) -> TensorRTConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions listed twice: {self.precisions}")
        return self

class BundleConfig(Strict):
    """The edge bundle: one folder (and .tar.gz) per deployable model, runnable with numpy, onnxruntime and Pillow."""

    variants: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS), description="ONNX variants copied into each bundle")
    default_variant: Literal["fp32", "fp16", "int8"] = Field("int8", description="the model run.py uses when none is given (falls back to fp32 if absent)")
    archive: bool = Field(True, description="also pack each bundle as <name>.tar.gz")
    ort: bool = Field(True, description="also write each onnxruntime variant as model_<variant>.ort (ONNX Runtime Mobile) with required_operators.config for a reduced build; parity against the .onnx is checked")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if "fp32" not in v:
            raise ValueError(f"variants must include fp32 (the reference model), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"variants listed twice: {v}")
        return v

class DeviceProfile(Strict):
    """How one kind of device runs a model: threads, batch sizes, execution providers, latency and size budgets."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="profile name (letters, digits, _ . -)")
    threads: int = Field(1, ge=0, le=1024, description="intra-op threads; 0 = the runtime's default (all cores)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1, description="the first is the latency batch (p50/p90/p99); the largest gives the throughput figure")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1, description="onnxruntime execution providers, in order of preference")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field("all", description="onnxruntime graph optimisation level")
    latency_budget_ms: float | None = Field(None, gt=0.0, description="the report picks the most accurate model whose latency meets this budget")
    size_budget_kib: float | None = Field(None, gt=0.0, description="largest model file (KiB) the device holds (its flash or the model's share of it); the report's pick must fit it")

    @field_validator("batch_sizes")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 65536 for b in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"batch_sizes must be strictly increasing values in 1..65536, got {v}")
        return v

def _default_profiles() -> list[DeviceProfile]:
    return [
        DeviceProfile(name="edge-1core", threads=1, batch_sizes=[1], latency_budget_ms=1.0),
        DeviceProfile(name="edge-4core", threads=4, batch_sizes=[1, 8], latency_budget_ms=0.5),
        DeviceProfile(name="server", threads=0, batch_sizes=[1, 32], latency_budget_ms=0.5),
    ]

class BenchmarkConfig(Strict):
    """Latency and throughput of every model x variant x device profile, PyTorch eager as the reference."""

    variants: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS), description="ONNX variants to measure")
    torch_reference: bool = Field(True, description="also measure PyTorch eager FP32 in the same run")
    warmup: int = Field(10, ge=1, le=10000, description="untimed runs before measuring (per batch size)")
    iterations: int = Field(200, ge=5, le=1_000_000, description="timed runs per file and batch size, split across the rounds (fewer if max_seconds is reached first)")
    max_seconds: float = Field(2.0, gt=0.0, le=3600.0, description="time cap per file and batch size, split across the rounds; at least 5 timed runs per round are always made")
    rounds: int = Field(15, ge=1, le=1000, description="interleaved timing rounds: every file of a runtime and profile is timed once per round, round-robin; latency is the median over rounds with a 95 % interval (at least 6 rounds for an order-statistic interval; fewer give the rounds' range)")
    profiles: list[DeviceProfile] = Field(default_factory=_default_profiles, min_length=1)
    runtimes: list[Literal["onnxruntime", "openvino"]] = Field(default_factory=lambda: list(RUNTIMES), min_length=1, description="runtimes every model x variant is measured with, where installed (openvino: pip install -e '.[openvino]'); OpenVINO adds a bf16 variant on CPUs that offer it")
    peak: bool = Field(True, description="also time a large FP32 and INT8 GEMM per runtime and thread count: the practical peak the report compares each model's MAC/s with")
    device_budgets: dict[str, float] = Field(default_factory=dict, description="latency budget (ms) per imported device (kdpipe device-results import FILE --device NAME): the report picks the most accurate model within it on that device")

    @field_validator("profiles")
    @classmethod
    def _unique(cls, v: list[DeviceProfile]) -> list[DeviceProfile]:
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError(f"profile names must be unique, got {names}")
        return v

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"runtimes listed twice: {v}")
        return v

    @field_validator("device_budgets")
    @classmethod
    def _device_budgets(cls, v: dict[str, float]) -> dict[str, float]:
        for name, ms in v.items():
            if not DEVICE_NAME.fullmatch(name):
                raise ValueError(f"device name {name!r} must be letters, digits, _ . - (at most 64)")
            if not ms > 0:
                raise ValueError(f"device_budgets.{name} must be a positive number of milliseconds, got {ms}")
        return v

class ReportConfig(Strict):
    """The results table, the Pareto plot and the per-profile model choice under a latency budget."""

    latency_statistic: Literal["p50", "p90", "p99"] = Field("p50", description="latency figure the Pareto plot and the budgets use")
    plot_dpi: int = Field(120, ge=50, le=600)
    pick: Literal["cheapest_within_noise", "most_accurate"] = Field("cheapest_within_noise", description="the budget pick among the models that fit: cheapest_within_noise takes, of the models not significantly less accurate than the most accurate (exact McNemar, alpha), the fastest beyond noise, then the smallest file, then the most accurate; most_accurate takes the most accurate (one test image can decide)")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="significance level of the paired test (exact McNemar on the same test images) below which two models' accuracies differ beyond noise, for the picks and the Pareto front")
