"""INT8 and FP16 variants of an exported model, each scored on the test split with onnxruntime.

INT8: onnxruntime static quantization in QDQ format with per-channel weights, activation
ranges calibrated on a seeded sample of un-augmented training images
(:class:`ArrayCalibrationReader`) by MinMax, Entropy or Percentile. Two INT8 files,
because the two runtimes want different forms:

* ``model_int8.onnx`` (``quantize.activation_type``, default uint8): asymmetric uint8
  activations and symmetric int8 weights. onnxruntime's CPU fuses Conv+ReLU into
  QLinearConv only then: measured on this machine's AVX-512 VNNI CPU, resnet8x4 at
  batch 32 runs 3.3x faster than FP32 with uint8 activations, about 1.0x with signed
  symmetric ones (the ReLU stays, and the convolutions around it run in float).
* ``model_int8_trt.onnx`` (``quantize.tensorrt_qdq``): signed symmetric int8
  activations and weights (zero points 0), the only Q/DQ form TensorRT's explicit
  quantization accepts; TensorRT INT8 engines are built from it. Not written when
  ``activation_type`` is already int8 (the one file serves both).

FP16: ``onnxruntime.transformers.float16`` (ships with onnxruntime; no extra package)
converts weights and ops to float16 and keeps float32 inputs and outputs, so the
runner feeds every variant the same arrays. (``onnxconverter-common`` offers the same
converter but is not needed.)

The accuracy reported for a variant is that of the file itself run by onnxruntime on
the whole test split, never an estimate from PyTorch. Every file's prediction for each
test image, per runtime, goes to ``reports/predictions.json`` (:data:`pipeline.deploy.artifacts.PREDICTIONS_FORMAT`):
the paired tests of the report compare files image by image, and a fresh process (a
bundle's ``run.py`` on the test split written as image files) must reproduce them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.deploy.artifacts import (
    INPUT_NAME,
    PREDICTIONS_FORMAT,
    TRT_INT8,
    DeployError,
    calibration_indices,
    deployable_runs,
    params_sha256,
    quantized_dir,
    read_json,
    report_file,
    split_arrays,
    stage_provenance,
    variant_file,
)
from pipeline.deploy.edge.edge_runtime import available_runtimes
from pipeline.deploy.export import onnx_logits, topk_accuracy
from pipeline.deploy.metadata import META_PREFIX, read_metadata, set_metadata

CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")


class ArrayCalibrationReader:
    """Feeds calibration batches to onnxruntime's calibrator: ``get_next()`` until it returns None.

    Implements onnxruntime's ``CalibrationDataReader`` protocol (``get_next`` and
    ``rewind``) over an in-memory array of preprocessed images.
    """

    def __init__(self, images: np.ndarray, batch_size: int = 32, input_name: str = INPUT_NAME) -> None:
        if images.ndim != 4 or len(images) == 0:
            raise DeployError(
                f"calibration set is empty or not a batch of images (shape {images.shape}); INT8 calibration "
                "needs at least one training image (check quantize.calibration_samples and the training split)"
            )
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch_size = max(1, int(batch_size))
        self.input_name = input_name
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence onnxruntime.quantization's prints, logging and warnings (it is chatty)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _supports_calibration_cache() -> bool:
    """Whether this onnxruntime's ``quantize_static`` accepts precomputed ranges (``calibration_cache_path``)."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    *,
    method: str = "MinMax",
    per_channel: bool = True,
    activation_type: str = "int8",
    percentile: float = 99.999,
    histogram_bins: int = 2048,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Write a static INT8 (QDQ) model of ``fp32`` to ``out``, calibrated on ``calibration`` images.

    Entropy and Percentile build activation histograms. ``quantize_static`` gives
    Entropy onnxruntime's default of 128 bins, the same as its 128 quantized bins,
    which leaves the KL search a single candidate and makes Entropy equal MinMax; so
    where onnxruntime accepts precomputed ranges (``calibration_cache_path``), the
    ranges are computed here with ``histogram_bins`` bins first. Returns facts about
    the calibration. Raises :class:`DeployError` for an empty calibration set or an
    unknown method.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise DeployError(f"unknown calibration method {method!r}; allowed: {', '.join(CALIBRATION_METHODS)}")
    reader = ArrayCalibrationReader(calibration, batch_size)
    symmetric = activation_type == "int8"
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if method == "Percentile":
        extra["CalibPercentile"] = float(percentile)
    facts: dict[str, Any] = {"method": method, "images": int(len(calibration))}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdpipe-quant-") as scratch, _quiet():
        # Work on a copy: the quantizer writes helper models next to its input.
        src = Path(scratch) / "model.onnx"
        shutil.copyfile(fp32, src)
        if fp32.with_name(fp32.name + ".data").is_file():  # a model past 2 GB keeps its weights beside it
            shutil.copyfile(fp32.with_name(fp32.name + ".data"), src.with_name(src.name + ".data"))
        kwargs: dict[str, Any] = {}
        if method != "MinMax" and _supports_calibration_cache():
            from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

            options = {"num_bins": int(histogram_bins), "num_quantized_bins": 128, "percentile": float(percentile),
                       "symmetric": method == "Percentile"}
            calibrator = create_calibrator(src, None, augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                           calibrate_method=getattr(CalibrationMethod, method),
                                           extra_options=options)
            calibrator.collect_data(reader)
            save_tensors_data(calibrator.compute_data(), Path(scratch) / "ranges.json")
            del calibrator
            reader.rewind()
            kwargs["calibration_cache_path"] = str(Path(scratch) / "ranges.json")
            facts["histogram_bins"] = int(histogram_bins)
        elif method != "MinMax":
            facts["note"] = "onnxruntime's default histogram (no calibration_cache_path support)"
        try:
            quantize_static(
                str(src), str(out), reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
                extra_options=extra,
                **kwargs,
            )
        except Exception as err:  # onnxruntime raises ValueError/RuntimeError and its own types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DeployError(f"INT8 quantization of {fp32} failed: {first}") from err
    return facts


def convert_fp16(fp32: Path, out: Path) -> Path:
    """Write an FP16 copy of ``fp32`` (weights and ops in float16, float32 inputs and outputs) to ``out``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out


def tag_variant(path: Path, source_meta: dict[str, Any], precision: str, extra: dict[str, Any]) -> None:
    """Copy the FP32 model's kdpipe metadata into a variant file, with its precision and recipe."""
    import json

    import onnx

    model = onnx.load(str(path))
    meta = {**source_meta, "precision": precision, **extra}
    set_metadata(model, {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                         for k, v in meta.items()})
    onnx.save_model(model, str(path))


def score(path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int,
          logits_out: dict[str, np.ndarray], variant: str) -> dict[str, Any]:
    """Top-1/top-5 (%) of one ONNX file on the given images, run by onnxruntime.

    The logits go into ``logits_out[variant]`` (the reference other runtimes are compared
    with, and where the stage takes each image's prediction from).
    """
    logits = onnx_logits(path, images, batch_size)
    logits_out[variant] = logits
    return {"top1": round(topk_accuracy(logits, labels, 1), 4), "top5": round(topk_accuracy(logits, labels, 5), 4),
            "bytes": path.stat().st_size}


def _classes(logits: np.ndarray) -> list[int]:
    """Each image's predicted class (the first largest logit, as ``argmax`` and the bundle's ``run.py`` take it)."""
    return [int(c) for c in np.asarray(logits).argmax(axis=1)]


def quantize_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``quantize`` stage: INT8 and FP16 of every exported model, each scored; writes ``exports/quantized``."""
    from pipeline.data import build_data
    from pipeline.deploy.runtime_parity import score_with_runtimes
    from pipeline.engine.atomic import atomic_dir, atomic_write_json

    cfg = params.quantize
    exported = read_json(report_file(root, "export"), "export")["models"]
    data = build_data(params.data, params.seed)
    images, labels = split_arrays(data.test)
    calib, _ = split_arrays(data.train_eval, calibration_indices(len(data.train_eval), cfg.calibration_samples,
                                                                 params.seed))
    recipe = {"calibration_method": cfg.calibration_method, "calibration_samples": int(len(calib)),
              "per_channel": cfg.per_channel, "activation_type": cfg.activation_type, "format": "QDQ",
              "quantize_params_sha256": params_sha256(params, ("seed", "data", "quantize"))}
    if cfg.calibration_method == "Percentile":
        recipe["percentile"] = cfg.percentile
    sections = ("seed", "data", "quantize")
    runtimes, skipped = available_runtimes(list(params.benchmark.runtimes))
    inside = {"provenance": stage_provenance(params, sections, root, git=False)}  # no commit inside model files
    report: dict[str, Any] = {}
    predictions: dict[str, Any] = {}
    with atomic_dir(quantized_dir(root)) as tmp:
        for dep in deployable_runs(params):
            if dep.key not in exported:
                raise DeployError(f"{dep.key} is missing from reports/export.json: re-run the export stage")
            fp32 = variant_file(root, dep.key, "fp32")
            if not fp32.is_file():
                raise DeployError(f"{fp32} not found: run the export stage first (dvc repro export)")
            source_meta = read_metadata(fp32)
            logits: dict[str, np.ndarray] = {}
            files = {"fp32": fp32}
            entry: dict[str, Any] = {"fp32": score(fp32, images, labels, params.export.batch_size, logits, "fp32")}
            if cfg.int8:
                out = tmp / dep.key / "model_int8.onnx"
                facts = quantize_int8(fp32, out, calib, method=cfg.calibration_method, per_channel=cfg.per_channel,
                                      activation_type=cfg.activation_type, percentile=cfg.percentile,
                                      histogram_bins=cfg.histogram_bins, batch_size=cfg.calibration_batch_size)
                tag_variant(out, source_meta, "int8", {"quantization": {**recipe, **facts}, **inside})
                entry["int8"] = score(out, images, labels, params.export.batch_size, logits, "int8")
                files["int8"] = out
                drop = entry["fp32"]["top1"] - entry["int8"]["top1"]
                entry["int8_top1_drop"] = round(drop, 4)
                entry["int8_within_budget"] = bool(drop <= cfg.max_int8_drop)
                if cfg.tensorrt_qdq and cfg.activation_type != "int8":
                    out = tmp / dep.key / f"model_{TRT_INT8}.onnx"
                    facts = quantize_int8(fp32, out, calib, method=cfg.calibration_method, per_channel=cfg.per_channel,
                                          activation_type="int8", percentile=cfg.percentile,
                                          histogram_bins=cfg.histogram_bins, batch_size=cfg.calibration_batch_size)
                    tag_variant(out, source_meta, "int8", {"quantization": {**recipe, **facts, "activation_type": "int8",
                                                                            "target": "tensorrt"}, **inside})
                    entry[TRT_INT8] = score(out, images, labels, params.export.batch_size, logits, TRT_INT8)
            if cfg.fp16:
                out = convert_fp16(fp32, tmp / dep.key / "model_fp16.onnx")
                tag_variant(out, source_meta, "fp16", inside)
                entry["fp16"] = score(out, images, labels, params.export.batch_size, logits, "fp16")
                files["fp16"] = out
            other: dict[str, dict[str, np.ndarray]] = {}
            entry["runtimes"] = score_with_runtimes(
                files, logits, images, labels, runtimes, atol=params.export.parity_atol,
                rtol=params.export.parity_rtol, batch_size=params.export.batch_size, label=dep.key,
                logits_out=other)
            predictions[dep.key] = {"onnxruntime": {v: _classes(x) for v, x in logits.items()},
                                    **{rt: {v: _classes(x) for v, x in per.items()} for rt, per in other.items()}}
            report[dep.key] = entry
    atomic_write_json(report_file(root, "predictions"), {"format": PREDICTIONS_FORMAT, "test_images": int(len(labels)),
                                                         "labels": [int(y) for y in labels], "models": predictions})
    atomic_write_json(report_file(root, "quantize"), {"models": report, "recipe": recipe,
                                                      "test_images": int(len(labels)),
                                                      "runtimes": runtimes, "runtimes_skipped": skipped,
                                                      "provenance": stage_provenance(params, sections, root)})
    return report
