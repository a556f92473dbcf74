"""Which ONNX files run the same graph: a hash of the graph without its initializer values.

Every FP32 file of one student architecture, whichever method trained it, holds the same
operators on the same shapes; only the weights differ. Their latencies then differ by
measurement noise alone, and the report must treat them as tied rather than rank them by
it. :func:`graph_sha256` hashes the graph (nodes, their attributes, inputs, outputs,
value infos, and each initializer's name, type and shape) and the opsets, leaving out
initializer values, metadata and doc strings, so two files share it exactly when a
runtime executes the same computation on different numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.deploy.artifacts import DeployError

#: TensorProto fields that hold an initializer's values (cleared before hashing).
_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def graph_sha256(path: Path) -> str:
    """Hex SHA-256 of ``path``'s graph structure: equal for files that differ only in initializer values."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, OSError: one line naming the file
        lines = str(err).strip().splitlines()
        raise DeployError(f"{path} is not a readable ONNX model: {lines[0] if lines else type(err).__name__}") from None
    graph = model.graph
    for tensor in list(graph.initializer) + [s.values for s in graph.sparse_initializer]:
        for name in _VALUE_FIELDS:
            tensor.ClearField(name)
        tensor.ClearField("external_data")
        tensor.ClearField("doc_string")
    graph.ClearField("doc_string")
    for node in graph.node:
        node.ClearField("doc_string")
    h = hashlib.sha256()
    h.update(graph.SerializeToString(deterministic=True))
    for opset in sorted((o.domain, o.version) for o in model.opset_import):
        h.update(f"{opset[0]}:{opset[1]};".encode())
    return h.hexdigest()
