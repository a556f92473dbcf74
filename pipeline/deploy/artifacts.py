"""Which trained runs are deployed, and where every deployment artifact lives.

Layout (all DVC outs, each stage writing only its own):

    exports/onnx/<run>/model.onnx              export: FP32 ONNX with kdpipe metadata
    exports/quantized/<run>/model_int8.onnx    quantize: static INT8 (QDQ)
    exports/quantized/<run>/model_int8_trt.onnx  quantize: symmetric INT8 QDQ for TensorRT
    exports/quantized/<run>/model_fp16.onnx    quantize: FP16 (float32 inputs/outputs)
    exports/tensorrt/status.json               tensorrt: built engines, or "skipped" and why
    bundles/<name>/ and bundles/<name>.tar.gz  bundle: what is copied to the device
    reports/export.json                        export: parity figures per model (DVC metrics)
    reports/quantize.json                      quantize: accuracy of every variant (DVC metrics)
    reports/benchmark.json                     benchmark: latency/throughput/memory (DVC metrics)
    reports/results.{json,md}, pareto.png      report

where ``<run>`` is ``teacher``, ``baseline/<student>`` or ``<method>/<student>`` as in
:mod:`pipeline.runs`, and ``<name>`` is ``teacher-<arch>``, ``<student>-baseline`` or
``<student>-<method>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.engine.atomic import sha256_json
from pipeline.errors import UserError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from pipeline.params import Params
    from pipeline.run_id import RunId

VARIANTS = ("fp32", "fp16", "int8")
#: The symmetric INT8 QDQ file TensorRT builds INT8 engines from (not an onnxruntime benchmark variant).
TRT_INT8 = "int8_trt"
EXPORTS = Path("exports")
REPORTS = Path("reports")
#: ``reports/predictions.json`` (quantize writes it, the report reads it): ``{"labels": [...],
#: "models": {run: {runtime: {variant: [class per test image]}}}}``.
PREDICTIONS_FORMAT = "kdpipe-predictions/1"
BUNDLES = Path("bundles")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class DeployError(UserError, RuntimeError):
    """A deployment step that cannot go on; the message names the model, the file and the reason."""


class ParityError(DeployError):
    """The exported ONNX model does not reproduce PyTorch's logits on the test split."""


@dataclass(frozen=True)
class Deployable:
    """One trained model that becomes deployment artifacts."""

    run: RunId
    role: str  # teacher | baseline | distilled | online
    arch: str

    @property
    def key(self) -> str:
        """The run key (``teacher``, ``baseline/<student>``, ``<method>/<student>``)."""
        return self.run.key

    @property
    def student(self) -> str | None:
        return self.run.student

    @property
    def method(self) -> str | None:
        return self.run.method

    @property
    def bundle_name(self) -> str:
        """Folder name of this model's bundle: one path component, no slashes."""
        if self.role == "teacher":
            return f"teacher-{self.arch}".replace("/", "-")
        return f"{self.student}-{'baseline' if self.role == 'baseline' else self.method}".replace("/", "-")

    def model_file(self, root: Path) -> Path:
        """The trained model file (``runs/<run>/model.pt``)."""
        return self.run.out_dir(root) / "model.pt"


def deployable_runs(params: Params, include_teacher: bool | None = None) -> list[Deployable]:
    """Every run the params define: the teacher (when included), then per student its baseline,
    its offline methods (``distill.methods``, role ``distilled``) and its online methods
    (``online.methods``, role ``online``)."""
    from pipeline.run_id import RunId

    with_teacher = params.export.include_teacher if include_teacher is None else include_teacher
    online = getattr(getattr(params, "online", None), "methods", None) or []
    out: list[Deployable] = []
    if with_teacher:
        out.append(Deployable(RunId("teacher"), "teacher", params.teacher.model))
    for student in params.students:
        out.append(Deployable(RunId("baseline", student=student), "baseline", student))
        for method in params.distill.methods:
            out.append(Deployable(RunId("distill", student=student, method=method), "distilled", student))
        for method in online:
            out.append(Deployable(RunId("online", student=student, method=method), "online", student))
    return out


def onnx_dir(root: Path) -> Path:
    return root / EXPORTS / "onnx"


def quantized_dir(root: Path) -> Path:
    return root / EXPORTS / "quantized"


def tensorrt_dir(root: Path) -> Path:
    return root / EXPORTS / "tensorrt"


def variant_file(root: Path, key: str, variant: str) -> Path:
    """The ONNX file of one variant of run ``key``."""
    if variant == "fp32":
        return onnx_dir(root) / key / "model.onnx"
    if variant in ("fp16", "int8", TRT_INT8):
        return quantized_dir(root) / key / f"model_{variant}.onnx"
    raise DeployError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")


def report_file(root: Path, name: str) -> Path:
    """``reports/<name>.json``."""
    return root / REPORTS / f"{name}.json"


def read_json(path: Path, what: str) -> Any:
    """Load a JSON artifact another stage wrote; a missing or broken file names the stage to run."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeployError(f"{path} not found: run the {what} stage first (dvc repro {what})") from None
    except ValueError as err:
        raise DeployError(f"{path} is not valid JSON ({err}); re-run the {what} stage") from None


def params_sha256(params: Params, sections: tuple[str, ...]) -> str:
    """SHA-256 of the params sections an artifact depends on (not the whole file: unrelated edits keep it)."""
    dumped = params.model_dump(mode="json")
    return sha256_json({k: dumped[k] for k in sections})


#: Libraries whose versions the deploy stages record (read from package metadata, never imported for it).
DEPLOY_PACKAGES = ("torch", "onnx", "onnxruntime")


def stage_provenance(params: Params, sections: tuple[str, ...], root: Path, *, git: bool = True,
                     packages: tuple[str, ...] = DEPLOY_PACKAGES) -> dict[str, Any]:
    """:func:`pipeline.provenance.provenance` of a deploy stage: its params sections' hash, CPU device.

    ``git=False`` for what goes inside model files (ONNX metadata), whose bytes must not
    depend on the commit; reports and manifests carry the revision.
    """
    from pipeline.provenance import provenance

    return provenance(params_sha256(params, sections), packages=packages, git=git, root=root)


def split_arrays(dataset: Dataset, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split's (or a subset's) normalised images float32 [N, C, H, W] and labels int64 [N], in order."""
    positions = range(len(dataset)) if indices is None else [int(i) for i in indices]
    images, labels = [], []
    for i in positions:
        x, y, _ = dataset[i]
        images.append(np.asarray(x, dtype=np.float32))
        labels.append(int(y))
    if not images:
        return np.zeros((0, 0, 0, 0), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def calibration_indices(n_available: int, n_wanted: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``min(n_wanted, n_available)`` positions of the training split."""
    n = min(int(n_wanted), int(n_available))
    if n <= 0:
        return np.zeros((0,), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED_CA1B]))
    return np.sort(rng.choice(int(n_available), size=n, replace=False))
