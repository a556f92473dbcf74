"""Files that run one graph with other weights share ``graph_sha256``; any change of the computation does not."""

from __future__ import annotations

import hashlib

import onnx
import pytest
import torch

from pipeline.deploy.artifacts import DeployError
from pipeline.deploy.export import export_onnx
from pipeline.deploy.graph_identity import graph_sha256
from pipeline.deploy.metadata import set_metadata
from pipeline.models import build


def _export(tmp_path, arch: str, seed: int, name: str, size: int = 8):
    torch.manual_seed(seed)
    model = build(arch, 10, 1, size).eval()
    return export_onnx(model, tmp_path / name, in_channels=1, image_size=size, opset=17)


def test_same_architecture_other_weights_share_the_graph_hash(tmp_path):
    a = _export(tmp_path, "tinynet_xs", 0, "a.onnx")
    b = _export(tmp_path, "tinynet_xs", 1, "b.onnx")
    assert hashlib.sha256(a.read_bytes()).digest() != hashlib.sha256(b.read_bytes()).digest()
    assert graph_sha256(a) == graph_sha256(b)
    proto = onnx.load(str(b))
    set_metadata(proto, {"kdpipe.note": "metadata is not the graph"})
    onnx.save(proto, str(b))
    assert graph_sha256(a) == graph_sha256(b)


def test_another_architecture_or_input_size_changes_the_graph_hash(tmp_path):
    a = _export(tmp_path, "tinynet_xs", 0, "a.onnx")
    assert graph_sha256(a) != graph_sha256(_export(tmp_path, "tinynet_s", 0, "s.onnx"))
    assert graph_sha256(a) != graph_sha256(_export(tmp_path, "tinynet_xs", 0, "big.onnx", size=16))


def test_a_file_that_is_not_onnx_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "model_fp32.onnx"
    bad.write_bytes(b"this is not an ONNX model\n")
    with pytest.raises(DeployError, match="model_fp32.onnx is not a readable ONNX model") as exc:
        graph_sha256(bad)
    assert "\n" not in str(exc.value)
