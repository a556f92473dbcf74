"""Every ONNX variant run by the other runtimes on the test split: their own accuracy and parity with onnxruntime.

A file can score differently under another runtime: OpenVINO has its own kernels,
integer arithmetic and (where the CPU offers it) a bf16 mode. So the quantize stage,
which scores every file with onnxruntime, also runs it with each installed runtime of
``benchmark.runtimes`` on the same images: top-1/top-5 of that runtime (the report's
rows for it use these, not onnxruntime's) and the logit difference from onnxruntime's
run of the same file. FP32 must agree within the export's parity tolerance (as
onnxruntime must agree with PyTorch), or the stage fails naming the model; the other
variants' figures are recorded, not enforced (INT8 kernels round differently, bf16
keeps 8 bits of mantissa).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.deploy.artifacts import DeployError
from pipeline.deploy.edge.edge_runtime import runtime_variants
from pipeline.deploy.export import ParityError, compare_logits, onnx_logits, topk_accuracy

#: The runtimes scored here: every runtime of ``benchmark.runtimes`` but onnxruntime, the reference.
REFERENCE = "onnxruntime"


def score_with_runtimes(files: dict[str, Path], reference: dict[str, np.ndarray], images: np.ndarray,
                        labels: np.ndarray, runtimes: list[str], *, atol: float, rtol: float, batch_size: int,
                        label: str, logits_out: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """``{runtime: {variant: figures}}`` for one model; ``reference`` holds onnxruntime's logits per file variant.

    Figures: top1, top5 (%), max/mean |Δlogit| against onnxruntime on the same file,
    top-1 mismatches, and whether FP32 is within ``atol + rtol x |logit|``. Raises
    :class:`DeployError` when the FP32 file is not. Each run's logits go into
    ``logits_out[runtime][variant]`` when given.
    """
    out: dict[str, Any] = {}
    for runtime in runtimes:
        if runtime == REFERENCE:
            continue
        out[runtime] = {}
        for variant, file_variant, precision in runtime_variants(runtime, list(files)):
            logits = onnx_logits(files[file_variant], images, batch_size, runtime=runtime, precision=precision)
            if logits_out is not None:
                logits_out.setdefault(runtime, {})[variant] = logits
            entry: dict[str, Any] = {"file_variant": file_variant, "precision": precision,
                                     "top1": round(topk_accuracy(logits, labels, 1), 4),
                                     "top5": round(topk_accuracy(logits, labels, 5), 4),
                                     "bytes": files[file_variant].stat().st_size}
            ref = reference[file_variant]
            diff = np.abs(ref.astype(np.float64) - logits.astype(np.float64))
            entry.update({"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                          "top1_mismatches": int((ref.argmax(1) != logits.argmax(1)).sum())})
            if variant == "fp32":
                try:
                    compare_logits(ref, logits, atol, f"{label} fp32", rtol, names=(REFERENCE, runtime))
                except ParityError as err:
                    raise DeployError(str(err)) from None
                entry.update({"within_tolerance": True, "atol": atol, "rtol": rtol})
            out[runtime][variant] = entry
    return out
