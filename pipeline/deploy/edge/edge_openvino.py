"""OpenVINO behind onnxruntime's session interface, so a bundle's tools and the benchmark run either runtime.

OpenVINO reads the bundle's ONNX files directly (no conversion step). Its CPU plugin
picks bf16 by itself on CPUs with AVX512-BF16 or AMX, which moves logits by 1e-3 to
1e-1; so a session is compiled with ``INFERENCE_PRECISION_HINT`` f32 unless bf16 is
asked for by name, and bf16 is reported as its own variant. One stream and an explicit
thread count make a measurement comparable with onnxruntime's one session per profile.
Needs numpy and openvino only (copied into every bundle, like ``edge_runtime.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Inference precisions a session may be compiled with (OpenVINO's own names).
PRECISIONS = ("f32", "bf16")

_ONNX_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "u8": "tensor(uint8)", "i8": "tensor(int8)",
               "i32": "tensor(int32)", "i64": "tensor(int64)"}


class OpenVinoError(Exception):
    """OpenVINO is missing or refused a model; the message is one line."""


def import_openvino() -> Any:
    """``openvino``, or an :class:`OpenVinoError` saying how to install it."""
    try:
        import openvino
    except ImportError as err:
        raise OpenVinoError(f"openvino is not installed ({err}); install it with: pip install openvino") from None
    return openvino


def version() -> str | None:
    """The installed OpenVINO version (``2026.4.1``), or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__).split("-")[0]


def offers_bf16() -> bool:
    """Whether this machine's OpenVINO CPU plugin can run bf16 (AVX512-BF16 or AMX)."""
    ov = import_openvino()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_name() -> str | None:
    """The CPU's name as OpenVINO reports it, or None when OpenVINO is not installed."""
    try:
        return str(import_openvino().Core().get_property("CPU", "FULL_DEVICE_NAME"))
    except OpenVinoError:
        return None


class _Input:
    """What onnxruntime's ``NodeArg`` tells about an input: name, shape (a string for a dynamic dim), type."""

    def __init__(self, port: Any) -> None:
        self.name = port.get_any_name()
        self.shape = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
        self.type = _ONNX_TYPES.get(port.get_element_type().get_type_name(), str(port.get_element_type()))


class OpenVinoSession:
    """A model compiled for OpenVINO's CPU plugin, used through ``get_inputs()`` and ``run(None, feed)``.

    ``threads`` 0 lets OpenVINO use every core; ``precision`` is the inference
    precision hint (f32 for parity with onnxruntime, bf16 where the CPU offers it).
    """

    def __init__(self, path: str | Path, threads: int = 0, precision: str = "f32") -> None:
        if precision not in PRECISIONS:
            raise OpenVinoError(f"unknown OpenVINO precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        ov = import_openvino()
        from openvino.frontend import FrontEndManager

        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1,
                                  "PERFORMANCE_HINT": "LATENCY"}
        if int(threads) > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            # the ONNX front end alone: Core.read_model tries every framework's parser on a file it cannot read
            onnx_fe = FrontEndManager().load_by_framework("onnx")
            self._compiled = core.compile_model(onnx_fe.convert(onnx_fe.load(str(path))), "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError and its own types; the last line says what failed
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            raise OpenVinoError(f"OpenVINO cannot run {Path(path).name}: {lines[-1]}") from None
        self._request = self._compiled.create_infer_request()
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.threads = int(threads)

    def get_inputs(self) -> list[_Input]:
        """The model's inputs, described the way onnxruntime describes them."""
        return [_Input(p) for p in self._compiled.inputs]

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of one synchronous inference (copies: the request reuses its buffers)."""
        del output_names  # every output, in order, as onnxruntime's ``run(None, ...)`` returns them
        self._request.infer(feed)
        return [np.array(self._request.get_output_tensor(i).data) for i in range(len(self._compiled.outputs))]
