"""GEMM models that measure this machine's practical peak, and how close a model runs to it.

The benchmark times two square matrix products through each runtime and thread count
(``edge_measure.py peak``): FP32 (``MatMul``) and INT8 in the QDQ form our INT8 models
use (uint8 activations, int8 per-tensor weights, a constant weight the runtimes fold
into their integer kernels). The best run's multiply-accumulates per second is the
peak a model could reach there; a model's achieved rate is its MACs times its
throughput. Both are what a runtime delivers, not the data-sheet figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Side of the square GEMM: 1024^3 = 1.07 G multiply-accumulates per run, past every cache of an edge CPU.
GEMM_SIZE = 1024


def write_gemm_models(folder: Path, n: int = GEMM_SIZE) -> list[dict[str, Any]]:
    """Write ``gemm_fp32.onnx`` and ``gemm_int8.onnx`` (``[n, n] @ [n, n]``) into ``folder``; their specs.

    Each spec is ``{"precision", "model", "macs"}`` as :func:`edge_measure.measure_peak` takes it.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    w32 = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    fp32 = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm_fp32", [x],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], initializer=[w32])
    w8 = numpy_helper.from_array(rng.integers(-127, 128, (n, n)).astype(np.int8), "w")
    scales = [helper.make_tensor("x_scale", TensorProto.FLOAT, [], [0.02]),
              helper.make_tensor("x_zero", TensorProto.UINT8, [], [128]),
              helper.make_tensor("w_scale", TensorProto.FLOAT, [], [0.01]),
              helper.make_tensor("w_zero", TensorProto.INT8, [], [0]),
              helper.make_tensor("y_scale", TensorProto.FLOAT, [], [1.0]),
              helper.make_tensor("y_zero", TensorProto.UINT8, [], [128])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"]),
             helper.make_node("MatMul", ["xf", "wf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["y"])]
    int8 = helper.make_graph(nodes, "gemm_int8", [x], [helper.make_tensor_value_info("y", TensorProto.UINT8, [n, n])],
                             initializer=[w8, *scales])
    specs = []
    for precision, graph in (("fp32", fp32), ("int8", int8)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="kdpipe")
        onnx.checker.check_model(model)
        path = folder / f"gemm_{precision}.onnx"
        onnx.save_model(model, str(path))
        specs.append({"precision": precision, "model": str(path), "macs": n * n * n})
    return specs


def achieved(macs: float | None, throughput_ips: float | None, peak_gmacs: float | None) -> dict[str, Any] | None:
    """A model's achieved GMAC/s at its throughput (``macs`` per image) and its fraction of ``peak_gmacs``.

    None when a figure is missing.
    """
    if not macs or not throughput_ips:
        return None
    rate = float(macs) * float(throughput_ips) / 1e9
    return {"gmacs_per_s": float(f"{rate:.5g}"),
            "peak_gmacs_per_s": peak_gmacs,
            "fraction_of_peak": float(f"{rate / peak_gmacs:.5g}") if peak_gmacs else None}
