"""Build a TensorRT engine from one of this bundle's ONNX files, on the device that will run it.

Engines are specific to the GPU and the TensorRT version, so they are built on the
target, never shipped. ``python build_engine.py --precision int8`` (or fp16, fp32)
picks the right ONNX file and the right API for the installed TensorRT:

* TensorRT 10.x (weakly typed by default): FP16 sets ``BuilderFlag.FP16`` on the FP32
  ONNX; INT8 reads the symmetric QDQ ONNX (explicit quantization) with
  ``BuilderFlag.INT8`` (and FP16 for the layers left unquantized).
* TensorRT 11.x removed those flags: every network is strongly typed, so FP16 comes
  from the FP16 ONNX and INT8 from the symmetric QDQ ONNX, each taken as it is typed.

Both build with an optimization profile over the dynamic batch (min/opt/max) and a
timing cache file that later builds reuse. ``tensorrt`` is imported only inside the
functions, so the pipeline can import this module where TensorRT is absent.
The equivalent ``trtexec`` commands are in ``build_engines.sh``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: The symmetric INT8 QDQ file (zero points 0) TensorRT builds INT8 engines from, when the bundle has it.
TRT_INT8 = "int8_trt"


class EngineBuildError(RuntimeError):
    """An engine could not be built; the message says why (parser errors included)."""


def tensorrt_major(trt: Any) -> int:
    """Major version of an imported ``tensorrt`` module."""
    return int(str(trt.__version__).split(".")[0])


def source_variant(precision: str, major: int, available: tuple[str, ...] | list[str] = ("fp32", "fp16", "int8",
                                                                                        TRT_INT8)) -> str:
    """Which ONNX variant an engine of ``precision`` is built from under TensorRT ``major``.

    fp32 from fp32. fp16: the FP32 file plus the FP16 builder flag on 10.x; the FP16
    file on 11.x (strongly typed). int8: the symmetric QDQ file (``int8_trt``) when it
    exists, else ``int8``, on both (explicit quantization).
    """
    if precision == "fp32":
        return "fp32"
    if precision == "fp16":
        return "fp16" if major >= 11 else "fp32"
    if precision == "int8":
        return TRT_INT8 if TRT_INT8 in available else "int8"
    raise EngineBuildError(f"unknown precision {precision!r}; allowed: fp32, fp16, int8")


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str,
    input_name: str,
    chw: tuple[int, int, int],
    batches: tuple[int, int, int] = (1, 8, 32),
    timing_cache: str | Path | None = None,
    workspace_mb: int = 1024,
    optimization_level: int = 3,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build a serialized engine for ``precision`` and write it to ``engine_path``.

    ``batches`` is the optimization profile's (min, opt, max) batch. The timing cache
    at ``timing_cache`` is loaded when it exists and written back after the build.
    Returns facts about the build (TensorRT version, flags, typing mode, sizes).
    """
    import tensorrt as trt  # lazy: absent on most machines

    major = tensorrt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if major >= 11:
        network = builder.create_network(0)  # strongly typed is the only mode in 11.x
        typing = "strong"
    else:
        network = builder.create_network(0)  # explicit batch is implicit in 10.x; weak typing + builder flags
        typing = "weak"
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.builder_optimization_level = int(optimization_level)
    flags: list[str] = []
    if major < 11:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
            flags.append("FP16")
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the QDQ nodes
            flags.append("INT8")
    lo, opt, hi = (int(b) for b in batches)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    blob = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see its log above)")
    Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
    Path(engine_path).write_bytes(bytes(serialized))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": str(trt.__version__), "typing": typing, "flags": flags, "precision": precision,
            "onnx": Path(onnx_path).name, "engine": Path(engine_path).name,
            "engine_bytes": Path(engine_path).stat().st_size, "profile": {"min": lo, "opt": opt, "max": hi}}


def main(argv: list[str] | None = None) -> int:
    """Build engines for this bundle's models (run on the target device)."""
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", nargs="*", default=["fp16", "int8"], choices=["fp32", "fp16", "int8"])
    ap.add_argument("--batches", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"))
    ap.add_argument("--timing-cache", default=str(here / "timing.cache"))
    ap.add_argument("--workspace-mb", type=int, default=1024)
    args = ap.parse_args(argv)
    try:
        import tensorrt as trt
    except ImportError as err:
        print(f"build_engine.py: error: tensorrt is not installed here ({err})", file=sys.stderr)
        return 2
    manifest = json.loads((here / "bundle.json").read_text(encoding="utf-8"))
    trt_cfg = manifest.get("tensorrt", {})
    batches = tuple(args.batches or trt_cfg.get("batches", (1, 8, 32)))
    chw = tuple(manifest["input_shape"][1:])
    major = tensorrt_major(trt)
    for precision in args.precision:
        variant = source_variant(precision, major, list(manifest["models"]))
        entry = manifest["models"].get(variant)
        if entry is None:
            print(f"build_engine.py: skipping {precision}: the bundle has no {variant} model", file=sys.stderr)
            continue
        try:
            facts = build_engine(here / entry["file"], here / f"model_{precision}.plan", precision,
                                 manifest.get("input_name", "input"), chw, batches, args.timing_cache,
                                 args.workspace_mb)
        except EngineBuildError as err:
            print(f"build_engine.py: error: {err}", file=sys.stderr)
            return 1
        print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
