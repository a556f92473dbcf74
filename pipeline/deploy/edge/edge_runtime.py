"""Edge runtime of a kdpipe bundle: load an ONNX model safely, open sessions, read images.

Needs numpy and onnxruntime (Pillow for images); never torch or kdpipe, because it is
copied into every bundle and runs on the device. The pipeline runs this same file
(through ``edge_measure.py``, the benchmark's worker), so device and pipeline figures
come from one code.

Every failure a user can cause (a missing, corrupted or non-ONNX model file, a model
path outside the bundle, an unreadable image) raises :class:`EdgeError` with a
one-line message; the command-line tools print it and exit with status 2 instead of
showing a traceback from inside onnxruntime.

Two runtimes run a model: onnxruntime (always; ``.onnx`` and ``.ort`` files) and
OpenVINO where it is installed (``edge_openvino.py``, ``.onnx`` files), both behind the
same session interface, so loading, timing and the figures are one code for both.
Timing lives in ``edge_measure.py`` (the measurement and its worker processes) and
``edge_timing.py`` (interleaved rounds, latency intervals).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

#: onnxruntime graph optimisation levels by the names params.yaml uses.
GRAPH_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

#: Image file suffixes a folder run picks up.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}

#: Runtimes a model can be run with; OpenVINO takes the inference precisions of ``edge_openvino.PRECISIONS``.
RUNTIMES = ("onnxruntime", "openvino")


class EdgeError(Exception):
    """A problem the user can fix from the message alone (bad model file, bad path, bad image)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): one-line errors for users."""
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
        return openvino_module().version()
    try:
        return str(import_onnxruntime().__version__)
    except EdgeError:
        return None


def openvino_module() -> Any:
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
    if runtime == "openvino" and "fp32" in variants and openvino_module().offers_bf16():
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
        raise EdgeError(f"runtime {runtime} is not installed here ({first_line(err)}); install it with: "
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
        raise EdgeError(f"{path} is not a usable ONNX model: {first_line(err)}") from None
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
    ov = openvino_module()
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
        raise EdgeError(f"inference failed: {first_line(err)}") from None


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
        raise EdgeError(f"cannot read image {p}: {first_line(err)}") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable scores."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
