"""Edge runtime of a kdpipe bundle: load an ONNX model safely, read images, time inference.

Needs numpy and onnxruntime (Pillow for images); never torch or kdpipe, because it is
copied into every bundle and runs on the device. The pipeline's benchmark stage runs
this same file as a worker process, so device and pipeline figures come from one code.

Every failure a user can cause (a missing, corrupted or non-ONNX model file, a model
path outside the bundle, an unreadable image) raises :class:`EdgeError` with a
one-line message; the command-line tools print it and exit with status 2 instead of
showing a traceback from inside onnxruntime.

Worker mode (used by ``bench.py`` and the pipeline): ``python edge_runtime.py measure
SPEC_JSON`` prints one JSON object with latency percentiles per device profile and
batch size, the peak resident memory of the process and the model file size.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: onnxruntime graph optimisation levels by the names params.yaml uses.
GRAPH_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

#: Image file suffixes a folder run picks up.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}

#: At least this many timed runs, whatever the time cap says.
MIN_TIMED_RUNS = 5


class EdgeError(Exception):
    """A problem the user can fix from the message alone (bad model file, bad path, bad image)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def import_onnxruntime() -> Any:
    """``onnxruntime``, or an :class:`EdgeError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise EdgeError(f"onnxruntime is not installed ({err}); install it with: pip install onnxruntime") from None
    return onnxruntime


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes.

    A copy of :func:`pipeline.engine.atomic.file_sha256` (which writes the manifest's hashes),
    not an import of it: this file runs on the device, where kdpipe is not installed.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(path: str | Path, root: str | Path) -> Path:
    """``path`` resolved (symlinks followed); refuse it unless it lies inside the folder ``root``.

    A bare file name is looked up in ``root``; any other relative path is relative to
    the current directory. Why: a bundle's runner must only ever load the bundle's own
    models, never a file a crafted argument or link points it to.
    """
    root_r = Path(root).resolve()
    p = Path(path)
    if not p.is_absolute() and len(p.parts) == 1:
        p = root_r / p
    resolved = p.resolve()
    if not resolved.is_relative_to(root_r):
        raise EdgeError(f"refusing model path {path}: it resolves to {resolved}, outside the bundle folder {root_r}")
    return resolved


def check_model_file(path: Path, expected_sha256: str | None = None) -> Path:
    """Check that a model file exists, is a file, and (when known) has the bundle manifest's hash."""
    if not path.exists():
        raise EdgeError(f"model file not found: {path}")
    if not path.is_file():
        raise EdgeError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise EdgeError(f"model file is empty: {path}")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise EdgeError(
            f"{path.name} does not match the sha256 in the bundle manifest: the file is corrupted or was "
            "replaced (re-copy the bundle, or pass --no-verify to load it anyway)"
        )
    return path


def session_options(threads: int = 0, graph_optimization: str = "all", spinning: bool = False) -> Any:
    """onnxruntime session options for a fair, device-like measurement.

    ``threads`` intra-op threads (0: the runtime's default), one inter-op thread,
    sequential execution, and intra-op spinning off unless asked: a spinning thread
    pool burns the cores between runs and flatters latency at the cost of other work.
    """
    ort = import_onnxruntime()
    if graph_optimization not in GRAPH_LEVELS:
        raise EdgeError(f"unknown graph optimisation {graph_optimization!r}; allowed: {', '.join(GRAPH_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[graph_optimization])
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise on a device
    return so


def open_session(
    path: str | Path,
    threads: int = 0,
    providers: list[str] | None = None,
    graph_optimization: str = "all",
    spinning: bool = False,
) -> Any:
    """An ``InferenceSession`` for one image-classifier ONNX file, or an :class:`EdgeError`.

    Checks that the file exists, that onnxruntime can load it (a non-ONNX or truncated
    file gives a one-line error, not onnxruntime's traceback), that the requested
    execution providers exist here, and that the model has one 4-D image input.
    """
    ort = import_onnxruntime()
    path = Path(path)
    check_model_file(path)
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise EdgeError(f"execution provider(s) {missing} not available here; available: {', '.join(available)}")
    try:
        sess = ort.InferenceSession(str(path), session_options(threads, graph_optimization, spinning),
                                    providers=providers)
    except Exception as err:  # onnxruntime raises its own pybind11 exception types (InvalidProtobuf, Fail, ...)
        raise EdgeError(f"{path} is not a usable ONNX model: {_first_line(err)}") from None
    inputs = sess.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        shapes = [(i.name, i.shape) for i in inputs]
        raise EdgeError(f"{path} is not an image classifier with one NCHW input (inputs: {shapes})")
    return sess


def input_facts(sess: Any) -> tuple[str, tuple[int, int, int], Any]:
    """Name, (C, H, W) and numpy dtype of a session's image input."""
    inp = sess.get_inputs()[0]
    chw = inp.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in chw):
        raise EdgeError(f"model input {inp.name} must have fixed C, H, W; got shape {inp.shape}")
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return inp.name, (int(chw[0]), int(chw[1]), int(chw[2])), dtype


def run_session(sess: Any, batch: np.ndarray) -> np.ndarray:
    """Logits of a batch ``[N, C, H, W]``; errors from inside the runtime become one-line :class:`EdgeError`."""
    name, _, dtype = input_facts(sess)
    try:
        return np.asarray(sess.run(None, {name: np.ascontiguousarray(batch, dtype=dtype)})[0], dtype=np.float32)
    except Exception as err:  # onnxruntime's own exception types
        raise EdgeError(f"inference failed: {_first_line(err)}") from None


def load_image(path: str | Path) -> Any:
    """Open and fully decode an image file with Pillow; unreadable or truncated files raise :class:`EdgeError`."""
    try:
        from PIL import Image
    except ImportError as err:
        raise EdgeError(f"Pillow is not installed ({err}); install it with: pip install Pillow") from None
    p = Path(path)
    if not p.is_file():
        raise EdgeError(f"cannot read image {p}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except Exception as err:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        raise EdgeError(f"cannot read image {p}: {_first_line(err)}") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable scores."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where the platform cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 2)


def time_runs(fn: Any, warmup: int, iterations: int, max_seconds: float) -> np.ndarray:
    """Run ``fn`` ``warmup`` times untimed, then time it: milliseconds of each timed run.

    Timing stops after ``iterations`` runs or ``max_seconds``, whichever comes first,
    but never before :data:`MIN_TIMED_RUNS` runs.
    """
    for _ in range(max(0, warmup)):
        fn()
    times: list[int] = []
    start = time.perf_counter()
    while len(times) < iterations:
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
        if len(times) >= MIN_TIMED_RUNS and time.perf_counter() - start > max_seconds:
            break
    return np.asarray(times, dtype=np.float64) / 1e6


def latency_stats(ms: np.ndarray, batch: int) -> dict[str, float | int]:
    """p50/p90/p99/mean latency (ms) of timed runs and the throughput (images/s) they imply."""
    mean = float(ms.mean())
    return {
        "batch": int(batch),
        "runs": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(mean, 4),
        "throughput_ips": round(batch * 1000.0 / mean, 2) if mean > 0 else None,
    }


def measure_model(
    model: str | Path,
    profiles: list[dict[str, Any]],
    warmup: int = 10,
    iterations: int = 200,
    max_seconds: float = 2.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one ONNX model under each device profile; one session per profile, created and dropped in turn.

    A profile is ``{"name", "threads", "batch_sizes", "providers", "graph_optimization"}``.
    A profile whose providers are missing here is recorded as skipped, with the reason.
    Peak memory is that of the whole process (interpreter, onnxruntime, the model and
    its buffers), so run one model per process for a per-model figure.
    """
    path = check_model_file(Path(model))
    ort = import_onnxruntime()
    baseline = peak_rss_mb()
    out: dict[str, Any] = {"model": path.name, "file_bytes": path.stat().st_size, "onnxruntime": ort.__version__,
                           "profiles": {}}
    rng = np.random.default_rng(seed)
    for prof in profiles:
        name = str(prof["name"])
        providers = list(prof.get("providers") or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            out["profiles"][name] = {"status": "skipped", "reason": f"execution provider(s) {missing} not available"}
            continue
        sess = open_session(path, int(prof.get("threads", 0)), providers, str(prof.get("graph_optimization", "all")))
        input_name, chw, dtype = input_facts(sess)
        batches: dict[str, Any] = {}
        for b in prof.get("batch_sizes", [1]):
            x = rng.standard_normal((int(b), *chw)).astype(dtype)
            feed = {input_name: x}
            try:
                ms = time_runs(lambda feed=feed, sess=sess: sess.run(None, feed), warmup, iterations, max_seconds)
            except Exception as err:  # onnxruntime's own exception types
                raise EdgeError(f"{path.name}: inference failed at batch {b}: {_first_line(err)}") from None
            batches[str(int(b))] = latency_stats(ms, int(b))
        out["profiles"][name] = {"status": "ok", "threads": int(prof.get("threads", 0)), "providers": providers,
                                 "graph_optimization": str(prof.get("graph_optimization", "all")), "batches": batches}
        del sess
    out["baseline_rss_mb"] = baseline
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _worker(argv: list[str]) -> int:
    """``measure SPEC_JSON``: print :func:`measure_model`'s result (or ``{"error": ...}``) as JSON."""
    if len(argv) != 2 or argv[0] != "measure":
        print("usage: python edge_runtime.py measure SPEC_JSON", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[1])
        result = measure_model(spec["model"], spec["profiles"], int(spec.get("warmup", 10)),
                               int(spec.get("iterations", 200)), float(spec.get("max_seconds", 2.0)))
    except EdgeError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    except (KeyError, ValueError, TypeError) as err:
        print(json.dumps({"error": f"bad measurement spec: {err}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
