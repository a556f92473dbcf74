"""The ``benchmark`` stage: every model x runtime x variant x device profile, timed the way a device runs it.

Each ONNX file is measured per runtime (``benchmark.runtimes``: onnxruntime, and
OpenVINO where installed, which adds a bf16 variant on CPUs that offer it) in its own
fresh process running the bundle's own ``edge_runtime.py``, so its peak memory and
cold start are its own and the code timed is the code shipped. Per profile: a session
with the profile's threads, providers and graph optimisation, intra-op spinning off,
warm-up runs excluded, then p50/p90/p99 latency per batch size and the throughput they
imply. PyTorch eager FP32 is measured in the same run as the reference, all models in
one process of their own (importing torch and the model registry takes longer than
timing a small model). With ``benchmark.peak`` the same run times a large FP32 and
INT8 GEMM per runtime and thread count (:mod:`pipeline.deploy.peak`), the practical
peak the report compares each model's MAC/s with. Results go to
``reports/benchmark.json`` (DVC metrics): ``models[run][runtime][variant]``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.deploy.artifacts import DeployError, deployable_runs, report_file, stage_provenance, variant_file
from pipeline.deploy.edge import edge_runtime
from pipeline.deploy.edge.edge_runtime import headline

RUNTIME_SCRIPT = Path(edge_runtime.__file__).resolve()


def _timeout(profiles: list[dict[str, Any]], warmup: int, max_seconds: float) -> float:
    runs = sum(len(p.get("batch_sizes", [1])) for p in profiles)
    return 120.0 + runs * (3.0 * max_seconds + 0.05 * warmup + 10.0)


def _last_json(proc: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:]
        raise DeployError(f"measuring {what} failed (exit {proc.returncode}): {tail[0] if tail else ''}") from None
    if "error" in result:
        raise DeployError(f"measuring {what} failed: {result['error']}")
    return result


def measure_onnx(path: Path, profiles: list[dict[str, Any]], warmup: int, iterations: int,
                 max_seconds: float, runtime: str = "onnxruntime", precision: str = "f32") -> dict[str, Any]:
    """Time one ONNX file with ``runtime`` in a fresh process (``edge_runtime.py measure``); its JSON result."""
    spec = {"model": str(path), "profiles": profiles, "warmup": warmup, "iterations": iterations,
            "max_seconds": max_seconds, "runtime": runtime, "precision": precision}
    proc = subprocess.run([sys.executable, str(RUNTIME_SCRIPT), "measure", json.dumps(spec)], capture_output=True,
                          text=True, timeout=_timeout(profiles, warmup, max_seconds))
    return _last_json(proc, f"{path} with {runtime}")


def measure_peaks(runtime: str, threads: list[int], folder: Path, bf16: bool = False,
                  max_seconds: float = 2.0) -> dict[str, Any]:
    """This machine's GEMM peak through ``runtime`` per thread count, in a fresh process (``edge_runtime.py peak``).

    ``bf16`` adds OpenVINO's FP32 GEMM compiled in bf16 (the peak of the bf16 variant).
    """
    from pipeline.deploy.peak import write_gemm_models

    gemms = write_gemm_models(folder)
    if bf16:  # the FP32 GEMM once more, compiled in bf16
        gemms.append({**next(g for g in gemms if g["precision"] == "fp32"), "precision": "bf16", "hint": "bf16"})
    spec = {"gemms": gemms, "threads": threads, "runtime": runtime, "warmup": 3, "iterations": 20,
            "max_seconds": max_seconds}
    timeout = 120.0 + len(gemms) * len(threads) * (3.0 * max_seconds + 30.0)
    proc = subprocess.run([sys.executable, str(RUNTIME_SCRIPT), "peak", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    return _last_json(proc, f"the GEMM peak with {runtime}")


def measure_torch(model_files: list[Path], profiles: list[dict[str, Any]], warmup: int, iterations: int,
                  max_seconds: float) -> list[dict[str, Any]]:
    """Time PyTorch eager FP32 of model files in one fresh process (this module's ``torch-measure``).

    One process for all models: importing torch and the model registry costs seconds,
    more than timing a small model. Its memory figures are therefore per process
    (``peak_rss_mb``, cumulative) plus ``model_rss_mb``, the resident memory a model
    added while it was loaded and run.
    """
    spec = {"models": [str(f) for f in model_files], "profiles": profiles, "warmup": warmup,
            "iterations": iterations, "max_seconds": max_seconds}
    proc = subprocess.run([sys.executable, "-m", "pipeline.deploy.benchmark", "torch-measure", json.dumps(spec)],
                          capture_output=True, text=True,
                          timeout=len(model_files) * _timeout(profiles, warmup, max_seconds),
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))})
    return _last_json(proc, "PyTorch eager")["results"]


def _current_rss_mb() -> float | None:
    """Resident memory of this process now (Linux), MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 2)


def torch_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker body: PyTorch eager FP32 latency of each model file per profile (CPU; inference mode)."""
    import gc

    import numpy as np
    import torch

    from pipeline.engine.checkpoint import load_model_file

    default_threads = torch.get_num_threads()
    baseline = edge_runtime.peak_rss_mb()
    results = []
    for file in spec["models"]:
        before = _current_rss_mb()
        path = Path(file)
        model, info = load_model_file(path)
        model.eval()
        chw = (int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]))
        rng = np.random.default_rng(0)
        out: dict[str, Any] = {"model": path.name, "file_bytes": path.stat().st_size, "torch": str(torch.__version__),
                               "profiles": {}}
        for prof in spec["profiles"]:
            if "CPUExecutionProvider" not in (prof.get("providers") or ["CPUExecutionProvider"]):
                out["profiles"][prof["name"]] = {"status": "skipped", "reason": "the reference runs on the CPU only"}
                continue
            torch.set_num_threads(int(prof.get("threads", 0)) or default_threads)
            batches = {}
            with torch.inference_mode():
                for b in prof.get("batch_sizes", [1]):
                    x = torch.from_numpy(rng.standard_normal((int(b), *chw)).astype(np.float32))
                    ms = edge_runtime.time_runs(lambda x=x, model=model: model(x), int(spec.get("warmup", 10)),
                                                int(spec.get("iterations", 200)), float(spec.get("max_seconds", 2.0)))
                    batches[str(int(b))] = edge_runtime.latency_stats(ms, int(b))
            out["profiles"][prof["name"]] = {"status": "ok", "threads": int(prof.get("threads", 0)),
                                             "providers": ["torch-cpu"], "batches": batches}
        after = _current_rss_mb()
        out["baseline_rss_mb"] = baseline
        out["peak_rss_mb"] = edge_runtime.peak_rss_mb()
        out["model_rss_mb"] = None if before is None or after is None else round(after - before, 2)
        results.append(out)
        del model
        gc.collect()
    return {"results": results}


def environment() -> dict[str, Any]:
    """The machine and library versions the figures were measured with (``runtimes``: name -> version or None)."""
    import onnxruntime

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    installed = edge_runtime.installed_runtimes()
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "runtimes": {r: edge_runtime.runtime_version(r) if r in installed else None for r in edge_runtime.RUNTIMES}}


def benchmark_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``benchmark`` stage: measure every model x runtime x variant (+ PyTorch eager) x profile; writes the report."""
    import tempfile

    from pipeline.engine.atomic import atomic_write_json

    cfg = params.benchmark
    profiles = [p.model_dump(mode="json") for p in cfg.profiles]
    runtimes, skipped = edge_runtime.available_runtimes(list(cfg.runtimes))
    for runtime, why in skipped.items():
        print(f"benchmark: {runtime} skipped: {why}", flush=True)
    plans = {r: edge_runtime.runtime_variants(r, list(cfg.variants)) for r in runtimes}
    models: dict[str, Any] = {}
    deps = deployable_runs(params)
    for dep in deps:
        entry: dict[str, Any] = {}
        for runtime, plan in plans.items():
            entry[runtime] = {}
            for variant, file_variant, precision in plan:
                path = variant_file(root, dep.key, file_variant)
                if not path.is_file():
                    entry[runtime][variant] = {"status": "skipped", "reason": f"{path} not found"}
                    continue
                entry[runtime][variant] = {"status": "ok", **measure_onnx(path, profiles, cfg.warmup, cfg.iterations,
                                                                          cfg.max_seconds, runtime, precision)}
        models[dep.key] = entry
        print(f"benchmark: {dep.key} done ({', '.join(runtimes)})", flush=True)
    if cfg.torch_reference:
        for dep, res in zip(deps, measure_torch([d.model_file(root) for d in deps], profiles, cfg.warmup,
                                                cfg.iterations, cfg.max_seconds), strict=True):
            models[dep.key]["torch"] = {"fp32": {"status": "ok", **res}}
        print("benchmark: PyTorch eager reference done", flush=True)
    for entry in models.values():
        for per_variant in entry.values():
            for res in per_variant.values():
                if res.get("status") == "ok":
                    res["headline"] = {p["name"]: headline(res, p) for p in profiles}
    peaks: dict[str, Any] = {}
    if cfg.peak:
        threads = sorted({int(p["threads"]) for p in profiles
                          if "CPUExecutionProvider" in (p.get("providers") or ["CPUExecutionProvider"])})
        with tempfile.TemporaryDirectory(prefix="kdpipe-gemm-") as scratch:
            for runtime in runtimes:
                peaks[runtime] = measure_peaks(runtime, threads, Path(scratch), bf16=any(
                    v == "bf16" for v, _, _ in plans[runtime]), max_seconds=cfg.max_seconds)
                print(f"benchmark: {runtime} GEMM peak done", flush=True)
    report = {"environment": environment(), "settings": {"warmup": cfg.warmup, "iterations": cfg.iterations,
                                                         "max_seconds": cfg.max_seconds, "profiles": profiles,
                                                         "runtimes": runtimes, "runtimes_skipped": skipped,
                                                         "intra_op_spinning": False},
              "models": models, "peak": peaks, "provenance": stage_provenance(params, ("benchmark",), root)}
    atomic_write_json(report_file(root, "benchmark"), report)
    return report


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "torch-measure":
        try:
            print(json.dumps(torch_measure(json.loads(argv[1]))))
        except Exception as err:  # reported to the parent as one line
            print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
            return 2
        return 0
    print("usage: python -m pipeline.deploy.benchmark torch-measure SPEC_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
