"""The ``benchmark`` stage: every model x variant x device profile, timed the way a device runs it.

Each ONNX file is measured in its own fresh process running the bundle's own
``edge_runtime.py`` (numpy + onnxruntime only), so its peak memory is its own and the
code timed is the code shipped. Per profile: a session with the profile's threads,
providers and graph optimisation, intra-op spinning off, warm-up runs excluded, then
p50/p90/p99 latency per batch size and the throughput they imply. PyTorch eager FP32
is measured in the same run as the reference, all models in one process of their own
(importing torch and the model registry takes longer than timing a small model).
Results go to ``reports/benchmark.json`` (DVC metrics).
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
                 max_seconds: float) -> dict[str, Any]:
    """Time one ONNX file in a fresh process (``edge_runtime.py measure``); its JSON result."""
    spec = {"model": str(path), "profiles": profiles, "warmup": warmup, "iterations": iterations,
            "max_seconds": max_seconds}
    proc = subprocess.run([sys.executable, str(RUNTIME_SCRIPT), "measure", json.dumps(spec)], capture_output=True,
                          text=True, timeout=_timeout(profiles, warmup, max_seconds))
    return _last_json(proc, str(path))


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
    """The machine and library versions the figures were measured with."""
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
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def headline(result: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any] | None:
    """The figures the report uses for one profile: p50/p90/p99 at its first batch, throughput at its largest."""
    prof = result.get("profiles", {}).get(profile["name"])
    if not prof or prof.get("status") != "ok":
        return None
    sizes = [int(b) for b in prof["batches"]]
    first, largest = prof["batches"][str(min(sizes))], prof["batches"][str(max(sizes))]
    return {"batch": first["batch"], "p50_ms": first["p50_ms"], "p90_ms": first["p90_ms"], "p99_ms": first["p99_ms"],
            "throughput_batch": largest["batch"], "throughput_ips": largest["throughput_ips"]}


def benchmark_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``benchmark`` stage: measure every model x variant (+ PyTorch eager) x profile; writes the report."""
    from pipeline.engine.atomic import atomic_write_json

    cfg = params.benchmark
    profiles = [p.model_dump(mode="json") for p in cfg.profiles]
    models: dict[str, Any] = {}
    for dep in deployable_runs(params):
        entry: dict[str, Any] = {}
        for variant in cfg.variants:
            path = variant_file(root, dep.key, variant)
            if not path.is_file():
                entry[variant] = {"status": "skipped", "reason": f"{path} not found"}
                continue
            entry[variant] = {"status": "ok", **measure_onnx(path, profiles, cfg.warmup, cfg.iterations,
                                                             cfg.max_seconds)}
        models[dep.key] = entry
        print(f"benchmark: {dep.key} done", flush=True)
    if cfg.torch_reference:
        deps = deployable_runs(params)
        for dep, res in zip(deps, measure_torch([d.model_file(root) for d in deps], profiles, cfg.warmup,
                                                cfg.iterations, cfg.max_seconds), strict=True):
            models[dep.key]["torch"] = {"status": "ok", **res}
        print("benchmark: PyTorch eager reference done", flush=True)
    for entry in models.values():
        for res in entry.values():
            if res.get("status") == "ok":
                res["headline"] = {p["name"]: headline(res, p) for p in profiles}
    report = {"environment": environment(), "settings": {"warmup": cfg.warmup, "iterations": cfg.iterations,
                                                         "max_seconds": cfg.max_seconds, "profiles": profiles,
                                                         "intra_op_spinning": False},
              "models": models, "provenance": stage_provenance(params, ("benchmark",), root)}
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
