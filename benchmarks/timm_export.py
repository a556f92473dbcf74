"""timm edge families through the deploy path, measured in one run; prints a markdown table.

For each family, trained from scratch on digits resized to 32x32 (1 channel, 10 classes)
for ``--epochs`` epochs with the pipeline's own loop (``--epochs 0``: untrained, batch-norm
statistics from 256 training images): parameters before and after re-parameterisation,
ONNX and INT8 file sizes, export time, ONNX-vs-PyTorch parity of the exported (fused)
network, how far the fused network is from the trained one, both runtimes' error against
float64, test top-1 of the FP32 and INT8 files, and onnxruntime latency at batch 1 on one
thread (each file in a fresh process, ``pipeline/deploy/edge``'s measurement). The figures
in docs/models.md come from this script.

    python benchmarks/timm_export.py
    python benchmarks/timm_export.py --epochs 0 --families timm/mobileone_s0 timm/repvit_m0_9
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FAMILIES = ["timm/resnet10t", "timm/mobilenetv3_small_050", "timm/mobilenetv3_small_100", "timm/repvit_m0_9",
            "timm/mobileone_s0", "timm/fastvit_t8", "timm/ghostnet_050", "timm/efficientnet_lite0",
            "timm/mobilenetv4_conv_small", "timm/convnext_atto"]
PROFILE = {"name": "edge-1core", "threads": 1, "batch_sizes": [1], "providers": ["CPUExecutionProvider"],
           "graph_optimization": "all"}


def _calibrate(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Batch-norm running statistics from ``images`` (momentum 1 for one pass), then eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    return model.eval()


def _latency_ms(path: Path) -> float:
    from pipeline.deploy.benchmark import measure_onnx

    result = measure_onnx(path, [PROFILE], warmup=20, iterations=200, max_seconds=5.0)
    return float(result["profiles"][PROFILE["name"]]["batches"]["1"]["p50_ms"])


def _trained(name: str, data, epochs: int, calib: torch.Tensor, work: Path) -> torch.nn.Module:
    """``name`` trained ``epochs`` epochs alone (cross-entropy, the pipeline's loop and default recipe)."""
    from pipeline.config.training import TrainConfig
    from pipeline.distill import Vanilla
    from pipeline.engine.loop import RunSpec, fit
    from pipeline.models import build

    torch.manual_seed(0)
    net = build(name, 10, 1, 32)
    if epochs == 0:
        return _calibrate(net, calib)
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer={"lr": 0.05})
    fit(Vanilla(net), data.train, data.val, cfg, 0, RunSpec(label=name, state_dir=work / "state", fingerprint=name))
    return net.eval()


def measure(name: str, data, epochs: int, calib: torch.Tensor, work: Path) -> dict[str, object]:
    """The figures of one family."""
    from pipeline.deploy.export import export_onnx, onnx_logits, split_arrays, topk_accuracy, torch_logits
    from pipeline.deploy.quantize import quantize_int8

    images, labels = split_arrays(data.test)
    net = _trained(name, data, epochs, calib, work)
    fused = net.export_form()
    t0 = time.perf_counter()
    fp32 = export_onnx(fused, work / "model.onnx", in_channels=1, image_size=32, opset=18)
    export_s = time.perf_counter() - t0
    ref, got, trained = torch_logits(fused, images), onnx_logits(fp32, images), torch_logits(net, images)
    with torch.no_grad():
        truth = net.double()(torch.from_numpy(images).double()).numpy()
    int8 = work / "model_int8.onnx"
    quantize_int8(fp32, int8, calib.numpy()[:128])  # calibrated on training images, as the quantize stage does
    q = onnx_logits(int8, images)
    return {
        "model": name, "params": sum(p.numel() for p in net.parameters()),
        "fused_params": sum(p.numel() for p in fused.parameters()),
        "onnx_kib": fp32.stat().st_size / 1024, "int8_kib": int8.stat().st_size / 1024, "export_s": export_s,
        "max_logit": float(np.abs(ref).max()), "onnx_vs_torch": float(np.abs(got - ref).max()),
        "fused_vs_trained": float(np.abs(ref - trained).max()),
        "torch32_vs_f64": float(np.abs(trained - truth).max()), "onnx_vs_f64": float(np.abs(got - truth).max()),
        "fp32_top1": topk_accuracy(got, labels, 1), "int8_top1": topk_accuracy(q, labels, 1),
        "fp32_ms": _latency_ms(fp32), "int8_ms": _latency_ms(int8),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per family (0: untrained)")
    args = ap.parse_args(argv)
    from pipeline.config.training import DataConfig
    from pipeline.data import build_data
    from pipeline.deploy.export import split_arrays

    torch.set_num_threads(1)
    data = build_data(DataConfig(name="digits", image_size=32), 0)
    calib = torch.from_numpy(split_arrays(data.train)[0][:256])
    print(f"{len(data.test)} digits test images at 32x32, {args.epochs} training epochs; torch {torch.__version__}",
          flush=True)
    rows = []
    for name in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(name, data, args.epochs, calib, Path(tmp)))
        r = rows[-1]
        print(f"  {name}: exported in {r['export_s']:.1f} s, parity {r['onnx_vs_torch']:.2g}", flush=True)
    print("\n| model | params | fused | ONNX KiB | INT8 KiB | export s | max abs logit | ONNX vs torch | "
          "fused vs trained | torch fp32 vs f64 | ONNX vs f64 | FP32 top-1 | INT8 top-1 | FP32 ms | INT8 ms |")
    print("|" + "---|" * 15)
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['fused_params']:,} | {r['onnx_kib']:.0f} | {r['int8_kib']:.0f} | "
              f"{r['export_s']:.1f} | {r['max_logit']:.1f} | {r['onnx_vs_torch']:.1e} | {r['fused_vs_trained']:.1e} | "
              f"{r['torch32_vs_f64']:.1e} | {r['onnx_vs_f64']:.1e} | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | "
              f"{r['fp32_ms']:.3f} | {r['int8_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
