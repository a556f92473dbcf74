"""timm edge families through export, onnxruntime parity and INT8, and a whole `dvc repro` with timm models.

Slow: each export traces a timm network (5-20 s here). Kept apart from tests/test_timm.py so the
two files run on different workers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import build
from tests.conftest import make_workspace, tiny_params
from tests.test_timm import CHANNELS, CLASSES, SIZE, STUDENT, TEACHER, _batch, _calibrate_bn

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- export


EDGE_FAMILIES = ["timm/resnet10t", "timm/mobilenetv3_small_050", "timm/repvit_m0_9", "timm/mobileone_s0",
                 "timm/fastvit_t8", "timm/ghostnet_050"]


@pytest.mark.parametrize("name", EDGE_FAMILIES)
def test_timm_edge_family_exports_with_onnxruntime_parity_and_quantizes(name: str, tmp_path: Path):
    from pipeline.deploy.export import export_onnx, onnx_logits, torch_logits
    from pipeline.deploy.quantize import quantize_int8

    torch.manual_seed(0)
    net = _calibrate_bn(build(name, CLASSES, CHANNELS, SIZE))
    images = _batch(32, seed=5)[0].numpy()
    fused = net.export_form()
    path = export_onnx(fused, tmp_path / "model.onnx", in_channels=CHANNELS, image_size=SIZE, opset=18)
    ref, got = torch_logits(fused, images), onnx_logits(path, images)
    # Against the float64 truth, onnxruntime must be as exact as float32 PyTorch: within 1e-4, or within twice
    # PyTorch's own float32 error where that is larger (untrained nets on noise reach logits of 20, where
    # float32 rounding alone is ~1.5e-4; the measured figures are in docs/deploy.md)
    with torch.no_grad():
        truth = fused.double()(torch.from_numpy(images).double()).numpy()
    fused.float()
    assert np.abs(got - truth).max() <= max(1e-4, 2 * np.abs(ref - truth).max())
    trained = torch_logits(net, images)
    assert np.abs(trained - ref).max() <= 1e-3 * max(1.0, float(np.abs(trained).max()))  # fusing changes little
    if name in ("timm/mobileone_s0", "timm/repvit_m0_9", "timm/fastvit_t8"):  # branches fused away
        assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in net.parameters())
    facts = quantize_int8(path, tmp_path / "model.int8.onnx", images)
    assert facts and np.isfinite(onnx_logits(tmp_path / "model.int8.onnx", images)).all()


def test_dvc_repro_of_a_timm_teacher_and_student_on_digits_at_32x32(tmp_path: Path):
    """The whole pipeline: a pretrained timm teacher fine-tuned from a file under pretrained/, a timm student."""
    params = tiny_params(
        data={"name": "digits", "image_size": 32, "train_fraction": 0.5},
        train={"epochs": 1, "batch_size": 64, "optimizer": {"lr": 0.05}},
        teacher={"model": TEACHER, "route_every": 1, "weights": "pretrained/resnet10t.pth",
                 "backbone_lr_scale": 0.5},
        distill={"methods": ["kd"]},
        benchmark={"warmup": 1, "iterations": 5, "max_seconds": 0.05, "torch_reference": False,
                   "variants": ["fp32", "int8"],
                   "profiles": [{"name": "edge-1core", "threads": 1, "batch_sizes": [1], "latency_budget_ms": 100.0}]},
    )
    params["students"] = {STUDENT: {}}
    ws = make_workspace(tmp_path / "ws", params)
    torch.save(timm.create_model("resnet10t", num_classes=1000).state_dict(), ws / "pretrained" / "resnet10t.pth")
    proc = subprocess.run(["dvc", "repro"], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("teacher", f"baseline/{STUDENT}", f"kd/{STUDENT}"):
        m = json.loads((ws / "metrics" / f"{run}.json").read_text())
        assert 0 <= m["top1"] <= 100 and m["test_samples"] > 0, run
    exported = json.loads((ws / "reports" / "export.json").read_text())["models"]
    assert set(exported) == {"teacher", f"baseline/{STUDENT}", f"kd/{STUDENT}"}
    assert all(e["parity"]["top1_mismatches"] == 0 for e in exported.values()), exported
    assert exported[f"kd/{STUDENT}"]["bundle"] == "timm-mobilenetv3_small_050-kd"
    assert (ws / "reports" / "results.md").is_file()
    # the weights file is a dep of the training stages: replacing it makes the teacher stale
    torch.save(timm.create_model("resnet10t", num_classes=1000).state_dict(), ws / "pretrained" / "resnet10t.pth")
    status = subprocess.run(["dvc", "status", "train_teacher"], cwd=ws, capture_output=True, text=True).stdout
    assert "pretrained" in status and "modified" in status
