"""The ``tensorrt`` stage: build engines where TensorRT and a GPU exist, record "skipped" and why elsewhere.

Engines are specific to the GPU and the TensorRT version; the pipeline builds them
only as a check where it can, and the bundle carries the build script and the
equivalent ``trtexec`` commands for the target (:func:`trtexec_script`). The build
itself is :func:`pipeline.deploy.edge.build_engine.build_engine` (10.x builder flags,
11.x strongly typed), the same code the bundle ships. ``tensorrt`` is imported lazily:
on a machine without it (the registry here holds only a stub package) the stage
writes ``{"status": "skipped", "reason": ...}`` and the pipeline goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.deploy.artifacts import INPUT_NAME, TRT_INT8, DeployError, deployable_runs, tensorrt_dir, variant_file
from pipeline.deploy.edge.build_engine import EngineBuildError, build_engine, source_variant, tensorrt_major


def tensorrt_availability() -> tuple[Any | None, str | None]:
    """``(tensorrt module, None)`` when engines can be built here, else ``(None, reason)``."""
    try:
        import tensorrt as trt
    except Exception as err:  # ImportError, or the registry stub raising at import
        return None, f"tensorrt is not installed or not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        return None, "the installed tensorrt package is a stub without the TensorRT runtime"
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch without CUDA support
        has_gpu = False
    if not has_gpu:
        return None, f"tensorrt {trt.__version__} is installed but no CUDA GPU is visible"
    return trt, None


def trtexec_commands(onnx_files: dict[str, str], chw: tuple[int, int, int], batches: tuple[int, int, int],
                     precisions: list[str], workspace_mb: int, input_name: str = INPUT_NAME) -> dict[str, list[str]]:
    """``trtexec`` command lines per TensorRT major version (``"10"``, ``"11"``) for the given precisions.

    ``onnx_files`` maps a variant (fp32/fp16/int8/int8_trt) to its file name. TensorRT 10 takes
    precision flags (``--fp16``, ``--int8`` with the QDQ model); TensorRT 11 removed
    them and reads the precision from the (strongly typed) ONNX file itself.
    """
    c, h, w = chw
    lo, opt, hi = batches
    shapes = (f"--minShapes={input_name}:{lo}x{c}x{h}x{w} --optShapes={input_name}:{opt}x{c}x{h}x{w} "
              f"--maxShapes={input_name}:{hi}x{c}x{h}x{w}")
    common = f"{shapes} --timingCacheFile=timing.cache --memPoolSize=workspace:{workspace_mb}M"
    out: dict[str, list[str]] = {"10": [], "11": []}
    for major in (10, 11):
        for precision in precisions:
            src = onnx_files.get(source_variant(precision, major, list(onnx_files)))
            if src is None:
                continue
            flags = ""
            if major == 10 and precision == "fp16":
                flags = " --fp16"
            elif major == 10 and precision == "int8":
                flags = " --int8 --fp16"
            out[str(major)].append(f"trtexec --onnx={src} --saveEngine=model_{precision}.plan {common}{flags}")
    return out


def trtexec_script(commands: dict[str, list[str]]) -> str:
    """A POSIX shell script running the right ``trtexec`` commands for the installed TensorRT major version."""
    lines = [
        "#!/bin/sh",
        "# Build TensorRT engines on the target device (engines are specific to its GPU and TensorRT version).",
        "# TensorRT 10.x: precision flags; TensorRT 11.x: strongly typed, the precision comes from the ONNX file",
        "# (FP16 from model_fp16.onnx, INT8 from the QDQ model_int8.onnx). Set TRT_MAJOR to override detection.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'MAJOR="${TRT_MAJOR:-$(python3 -c \'import tensorrt; print(tensorrt.__version__.split(".")[0])\' 2>/dev/null || echo 10)}"',
        'if [ "$MAJOR" -ge 11 ]; then',
        *(f"  {c}" for c in commands.get("11", []) or ["echo 'no engines configured'"]),
        "else",
        *(f"  {c}" for c in commands.get("10", []) or ["echo 'no engines configured'"]),
        "fi",
        "",
    ]
    return "\n".join(lines)


def build_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``tensorrt`` stage: engines for every deployable model, or a skipped record; writes ``exports/tensorrt``."""
    from pipeline.engine.atomic import atomic_dir, atomic_write_json

    cfg = params.tensorrt
    batches = (cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    status: dict[str, Any] = {"precisions": list(cfg.precisions), "batches": list(batches),
                              "sources": "fp32: model.onnx; fp16: FP32 ONNX + FP16 flag (10.x) or the FP16 ONNX "
                                         "(11.x); int8: the symmetric QDQ ONNX (int8_trt, else int8)"}
    if not cfg.enabled:
        trt, reason = None, "disabled in params (tensorrt.enabled: false)"
    else:
        trt, reason = tensorrt_availability()
    with atomic_dir(tensorrt_dir(root)) as tmp:
        if trt is None:
            status.update({"status": "skipped", "reason": reason, "engines": {}})
            print(f"tensorrt: skipped: {reason}")
        else:
            major = tensorrt_major(trt)
            engines: dict[str, Any] = {}
            for dep in deployable_runs(params):
                for precision in cfg.precisions:
                    present = [v for v in ("fp32", "fp16", "int8", TRT_INT8) if variant_file(root, dep.key, v).is_file()]
                    src = variant_file(root, dep.key, source_variant(precision, major, present))
                    entry: dict[str, Any] = {"onnx": str(src)}
                    if not src.is_file():
                        entry.update(status="skipped", reason=f"{src} not found (quantize.{precision} off?)")
                    else:
                        from pipeline.deploy.metadata import read_metadata

                        shape = read_metadata(src).get("input_shape", ["batch", 3, 32, 32])
                        try:
                            facts = build_engine(src, tmp / dep.key / f"model_{precision}.plan", precision,
                                                 INPUT_NAME, tuple(int(d) for d in shape[1:]), batches,
                                                 root / cfg.timing_cache, cfg.workspace_mb, cfg.optimization_level)
                            entry.update(status="built", **facts)
                        except EngineBuildError as err:
                            entry.update(status="failed", reason=str(err))
                    engines.setdefault(dep.key, {})[precision] = entry
            failed = [f"{key} {prec}: {e['reason']}" for key, per in engines.items() for prec, e in per.items()
                      if e["status"] == "failed"]
            if failed:
                raise DeployError("TensorRT engine build failed: " + "; ".join(failed))
            status.update({"status": "built", "tensorrt": str(trt.__version__), "engines": engines})
        from pipeline.deploy.artifacts import stage_provenance

        status["provenance"] = stage_provenance(params, ("tensorrt",), root, packages=("onnx", "tensorrt"))
        atomic_write_json(tmp / "status.json", status)
    return status
