"""Edge runtime of a kdpipe bundle: load an ONNX model safely, read images, time inference.

Needs numpy and onnxruntime (Pillow for images); never torch or kdpipe, because it is
copied into every bundle and runs on the device. The pipeline's benchmark stage runs
this same file as a worker process, so device and pipeline figures come from one code.

Every failure a user can cause (a missing, corrupted or non-ONNX model file, a model
path outside the bundle, an unreadable image) raises :class:`EdgeError` with a
one-line message; the command-line tools print it and exit with status 2 instead of
showing a traceback from inside onnxruntime.

Two runtimes run a model: onnxruntime (always; ``.onnx`` and ``.ort`` files) and
OpenVINO where it is installed (``edge_openvino.py``, ``.onnx`` files), both behind the
same session interface, so loading, timing and the figures are one code for both.

Worker modes (used by ``bench.py`` and the pipeline): ``python edge_runtime.py measure
SPEC_JSON`` prints one JSON object with latency percentiles per device profile and
batch size, the cold start (runtime import, session creation, first run), the peak
resident memory of the process and the model file size; ``python edge_runtime.py peak
SPEC_JSON`` times GEMM models the same way and prints the multiply-accumulates per
second they reach (this machine's practical peak through that runtime).
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

#: Runtimes a model can be run with; OpenVINO takes the inference precisions of ``edge_openvino.PRECISIONS``.
RUNTIMES = ("onnxruntime", "openvino")


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


def installed_runtimes() -> list[str]:
    """The runtimes of :data:`RUNTIMES` that import here, in that order (a broken install counts as missing)."""
    found = []
    for name in RUNTIMES:
        try:
            check_runtime(name)
        except EdgeError:
            continue
        found.append(name)
    return found


def runtime_version(runtime: str) -> str | None:
    """The installed version of ``runtime`` (None when it is not installed)."""
    if runtime == "openvino":
        return _openvino().version()
    try:
        return str(import_onnxruntime().__version__)
    except EdgeError:
        return None


def _openvino() -> Any:
    """The ``edge_openvino`` module beside this file (a bundle's copy on a device, the pipeline's here)."""
    try:
        from pipeline.deploy.edge import edge_openvino
    except ImportError:  # on a device: the bundle folder is on sys.path, kdpipe is not installed
        import edge_openvino  # type: ignore[no-redef]
    return edge_openvino


def default_runtime() -> str:
    """The runtime a bundle's tools use when none is named: onnxruntime, or OpenVINO where onnxruntime is missing."""
    for name in RUNTIMES:  # in order, importing no more than needed
        try:
            check_runtime(name)
        except EdgeError:
            continue
        return name
    raise EdgeError("neither onnxruntime nor openvino is installed here; install one with: pip install onnxruntime")


def available_runtimes(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The runtimes of ``wanted`` installed here, in order, and why each other one is left out."""
    installed = installed_runtimes()
    skipped = {r: f"{r} is not installed (pip install {r}; in a kdpipe checkout: pip install -e '.[{r}]')"
               for r in wanted if r not in installed}
    return [r for r in wanted if r in installed], skipped


def runtime_variants(runtime: str, variants: list[str]) -> list[tuple[str, str, str]]:
    """(variant name, file variant, inference precision) to run with ``runtime``, given the files' ``variants``.

    OpenVINO runs every file with the f32 precision hint (its CPU plugin would pick bf16
    by itself on CPUs that have it) and, where the CPU offers bf16, the FP32 file once
    more in bf16 as its own variant ``bf16``.
    """
    plan = [(v, v, "f32") for v in variants]
    if runtime == "openvino" and "fp32" in variants and _openvino().offers_bf16():
        plan.append(("bf16", "fp32", "bf16"))
    return plan


def check_runtime(runtime: str) -> None:
    """Import ``runtime``; refuse an unknown name, or a runtime that does not import here, with the install command."""
    import importlib

    if runtime not in RUNTIMES:
        raise EdgeError(f"unknown runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    try:
        importlib.import_module(runtime)
    except Exception as err:  # ImportError, or whatever a broken wheel raises at import
        raise EdgeError(f"runtime {runtime} is not installed here ({_first_line(err)}); install it with: "
                        f"pip install {runtime}") from None


def open_session(
    path: str | Path,
    threads: int = 0,
    providers: list[str] | None = None,
    graph_optimization: str = "all",
    spinning: bool = False,
    runtime: str = "onnxruntime",
    precision: str = "f32",
) -> Any:
    """A session for one image-classifier model file, or an :class:`EdgeError`.

    ``runtime`` onnxruntime gives an ``InferenceSession`` (``.onnx`` or ``.ort``);
    openvino an ``edge_openvino.OpenVinoSession`` on the CPU with inference precision
    ``precision`` (f32, or bf16 where the CPU offers it). Checks that the file exists,
    that the runtime can load it (a non-ONNX or truncated file gives a one-line error,
    not the runtime's traceback), that the requested execution providers exist here,
    and that the model has one 4-D image input.
    """
    path = Path(path)
    check_model_file(path)
    check_runtime(runtime)
    if runtime == "openvino":
        return _open_openvino(path, threads, providers, precision)
    ort = import_onnxruntime()
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
    return _image_classifier(sess, path)


def _image_classifier(sess: Any, path: Path) -> Any:
    """``sess`` when its model has one 4-D image input, else an :class:`EdgeError`."""
    inputs = sess.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        shapes = [(i.name, i.shape) for i in inputs]
        raise EdgeError(f"{path} is not an image classifier with one NCHW input (inputs: {shapes})")
    return sess


def _open_openvino(path: Path, threads: int, providers: list[str] | None, precision: str) -> Any:
    """An OpenVINO CPU session for ``path`` (see :func:`open_session`)."""
    if path.suffix == ".ort":
        raise EdgeError(f"{path.name} is an onnxruntime (.ort) file; OpenVINO reads the .onnx file")
    if [p for p in (providers or ["CPUExecutionProvider"]) if p != "CPUExecutionProvider"]:
        raise EdgeError(f"OpenVINO runs on the CPU here; providers {providers} are onnxruntime's")
    ov = _openvino()
    try:
        if precision == "bf16" and not ov.offers_bf16():
            raise EdgeError("this CPU's OpenVINO plugin does not offer bf16 (needs AVX512-BF16 or AMX)")
        return _image_classifier(ov.OpenVinoSession(path, threads, precision), path)
    except ov.OpenVinoError as err:
        raise EdgeError(str(err)) from None


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
    """Peak resident memory of this process in MiB (None where the platform cannot tell).

    Linux: the address space's high-water mark (``VmHWM``), which starts afresh at exec;
    ``ru_maxrss`` does not, so a worker started from a large process (a test runner, a
    stage that imported torch) would report its parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 2)
    except (OSError, ValueError, IndexError):
        pass
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


def headline(result: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any] | None:
    """The figures the report uses for one profile of a :func:`measure_model` result: p50/p90/p99 at its
    first batch, throughput at its largest (None when the profile was not measured)."""
    prof = result.get("profiles", {}).get(profile["name"])
    if not prof or prof.get("status") != "ok":
        return None
    sizes = [int(b) for b in prof["batches"]]
    first, largest = prof["batches"][str(min(sizes))], prof["batches"][str(max(sizes))]
    return {"batch": first["batch"], "p50_ms": first["p50_ms"], "p90_ms": first["p90_ms"], "p99_ms": first["p99_ms"],
            "throughput_batch": largest["batch"], "throughput_ips": largest["throughput_ips"]}


def _import_ms(runtime: str) -> float:
    """Milliseconds to import ``runtime`` (and create its core object): the first part of a cold start.

    Near zero when the runtime was imported already in this process: the workers are fresh processes.
    """
    t0 = time.perf_counter()
    check_runtime(runtime)
    if runtime == "openvino":
        _openvino().import_openvino().Core()
    return round((time.perf_counter() - t0) * 1e3, 3)


def _profile_skip(runtime: str, providers: list[str]) -> str | None:
    """Why a profile cannot run with ``runtime`` here (None when it can)."""
    if runtime == "openvino":
        other = [p for p in providers if p != "CPUExecutionProvider"]
        return f"OpenVINO runs on the CPU here, not on {other}" if other else None
    missing = [p for p in providers if p not in import_onnxruntime().get_available_providers()]
    return f"execution provider(s) {missing} not available" if missing else None


def measure_model(
    model: str | Path,
    profiles: list[dict[str, Any]],
    warmup: int = 10,
    iterations: int = 200,
    max_seconds: float = 2.0,
    seed: int = 0,
    runtime: str = "onnxruntime",
    precision: str = "f32",
) -> dict[str, Any]:
    """Time one model under each device profile with ``runtime``; one session per profile, created and dropped in turn.

    A profile is ``{"name", "threads", "batch_sizes", "providers", "graph_optimization"}``.
    A profile the runtime cannot serve here (a missing execution provider; a GPU
    provider for OpenVINO) is recorded as skipped, with the reason. Per profile the cold
    start is recorded too: session creation and the first run at the first batch size
    (with the runtime's import time, which only the first session of a process pays).
    Peak memory is that of the whole process (interpreter, runtime, the model and
    its buffers), so run one model per process for a per-model figure.
    """
    path = check_model_file(Path(model))
    import_ms = _import_ms(runtime)
    baseline = peak_rss_mb()
    out: dict[str, Any] = {"model": path.name, "file_bytes": path.stat().st_size, "runtime": runtime,
                           "runtime_version": runtime_version(runtime), "profiles": {}}
    if runtime == "openvino":
        out["precision"] = precision
    rng = np.random.default_rng(seed)
    for prof in profiles:
        name = str(prof["name"])
        providers = list(prof.get("providers") or ["CPUExecutionProvider"])
        skip = _profile_skip(runtime, providers)
        if skip:
            out["profiles"][name] = {"status": "skipped", "reason": skip}
            continue
        threads, graph = int(prof.get("threads", 0)), str(prof.get("graph_optimization", "all"))
        t0 = time.perf_counter()
        sess = open_session(path, threads, providers, graph, runtime=runtime, precision=precision)
        session_ms = (time.perf_counter() - t0) * 1e3
        input_name, chw, dtype = input_facts(sess)
        batches: dict[str, Any] = {}
        first_run_ms = None
        for b in prof.get("batch_sizes", [1]):
            x = rng.standard_normal((int(b), *chw)).astype(dtype)
            feed = {input_name: x}
            try:
                if first_run_ms is None:
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    first_run_ms = (time.perf_counter() - t0) * 1e3
                ms = time_runs(lambda feed=feed, sess=sess: sess.run(None, feed), warmup, iterations, max_seconds)
            except Exception as err:  # the runtimes' own exception types
                raise EdgeError(f"{path.name}: inference failed at batch {b}: {_first_line(err)}") from None
            batches[str(int(b))] = latency_stats(ms, int(b))
        out["profiles"][name] = {"status": "ok", "threads": threads, "providers": providers,
                                 "graph_optimization": graph, "batches": batches,
                                 "cold_start": {"session_ms": round(session_ms, 3),
                                                "first_run_ms": round(first_run_ms or 0.0, 3)}}
        del sess
    out["cold_start"] = {"import_ms": import_ms}
    out["baseline_rss_mb"] = baseline
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def measure_peak(
    gemms: list[dict[str, Any]],
    threads: list[int],
    runtime: str = "onnxruntime",
    warmup: int = 3,
    iterations: int = 20,
    max_seconds: float = 2.0,
    precision: str = "f32",
) -> dict[str, Any]:
    """Multiply-accumulates per second of GEMM models through ``runtime``, per thread count.

    Each GEMM is ``{"precision": "fp32"|"int8", "model": path, "macs": int}``: a model
    whose inputs are fed seeded random data of their own shape and type. The best run's
    rate (the p50 is recorded as well) is the practical peak a model could reach on this
    machine with that runtime and thread count. ``precision`` is OpenVINO's inference
    precision, which a GEMM's own ``"hint"`` overrides (bf16: the peak of its bf16 variant).
    """
    check_runtime(runtime)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"runtime": runtime, "runtime_version": runtime_version(runtime), "peaks": {}}
    for gemm in gemms:
        path = check_model_file(Path(gemm["model"]))
        per_threads: dict[str, Any] = {}
        for t in threads:
            if runtime == "openvino":
                sess = _openvino().OpenVinoSession(path, int(t), str(gemm.get("hint", precision)))
            else:
                sess = import_onnxruntime().InferenceSession(str(path), session_options(int(t)),
                                                             providers=["CPUExecutionProvider"])
            feed = {}
            for inp in sess.get_inputs():
                dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}[inp.type]
                shape = [int(d) for d in inp.shape]
                feed[inp.name] = (rng.standard_normal(shape) if dtype == np.float32
                                  else rng.integers(0, 100, shape)).astype(dtype)
            ms = time_runs(lambda feed=feed, sess=sess: sess.run(None, feed), warmup, iterations, max_seconds)
            macs = int(gemm["macs"])
            per_threads[str(int(t))] = {"threads": int(t), "runs": int(ms.size), "macs": macs,
                                        "best_ms": float(f"{ms.min():.5g}"), "p50_ms": float(f"{np.median(ms):.5g}"),
                                        "gmacs_per_s": float(f"{macs / float(ms.min()) / 1e6:.5g}"),
                                        "p50_gmacs_per_s": float(f"{macs / float(np.median(ms)) / 1e6:.5g}")}
            del sess
        out["peaks"][str(gemm["precision"])] = per_threads
    return out


def _worker(argv: list[str]) -> int:
    """``measure SPEC_JSON`` / ``peak SPEC_JSON``: print the result (or ``{"error": ...}``) as one JSON line."""
    if len(argv) != 2 or argv[0] not in ("measure", "peak"):
        print("usage: python edge_runtime.py measure|peak SPEC_JSON", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[1])
        common = {"warmup": int(spec.get("warmup", 10)), "iterations": int(spec.get("iterations", 200)),
                  "max_seconds": float(spec.get("max_seconds", 2.0)), "runtime": str(spec.get("runtime", "onnxruntime"))}
        precision = str(spec.get("precision", "f32"))
        if argv[0] == "peak":
            result = measure_peak(spec["gemms"], [int(t) for t in spec["threads"]], precision=precision, **common)
        else:
            result = measure_model(spec["model"], spec["profiles"], precision=precision, **common)
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
