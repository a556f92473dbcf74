"""ONNX Runtime Mobile figures of a few models: .ort conversion time, .ort vs .onnx size, parity; prints a markdown table.

Each model is trained briefly (``--steps`` SGD steps, batch 32) on digits resized to
32x32 (1 channel, 10 classes), exported (FP32), converted to FP16 and static INT8 (QDQ,
uint8 activations, 256 calibration images) as the pipeline's stages do, then converted
to ORT format by the bundle's own code (:func:`pipeline.deploy.ort_mobile.convert_to_ort`:
onnxruntime's converter, one run for the three files) and checked by
:func:`~pipeline.deploy.ort_mobile.ort_parity` (max |Δlogit| of .ort vs .onnx on 8 seeded
random inputs). Conversion time is the wall time of that one converter process (the
interpreter and onnxruntime starting included). The figures in docs/deploy.md
("ONNX Runtime Mobile") come from this script.

    python benchmarks/ort_bundle.py
    python benchmarks/ort_bundle.py --models tinynet_xs resnet8 --steps 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

MODELS = ["tinynet_xs", "tinynet_m", "tinynet_l", "resnet8", "timm/mobilenetv3_small_100"]
VARIANTS = ("fp32", "fp16", "int8")


def _trained(name: str, data, steps: int) -> torch.nn.Module:
    """``name`` after ``steps`` SGD steps on the training split (enough for logits of a trained size)."""
    from pipeline.models import build

    torch.manual_seed(0)
    model = build(name, data.num_classes, data.in_channels, data.image_size)
    loader = torch.utils.data.DataLoader(data.train_eval, batch_size=32, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    done = 0
    while done < steps:
        for x, y, _ in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Print one table row per model x variant."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--steps", type=int, default=300, help="SGD steps per model (0: untrained)")
    args = ap.parse_args(argv)

    import onnxruntime

    from pipeline.config.training import DataConfig
    from pipeline.data import build_data
    from pipeline.deploy.artifacts import calibration_indices, split_arrays
    from pipeline.deploy.export import export_onnx
    from pipeline.deploy.ort_mobile import ORT_LEVEL, ORT_STYLE, convert_to_ort, ort_parity
    from pipeline.deploy.quantize import convert_fp16, quantize_int8

    torch.set_num_threads(1)
    data = build_data(DataConfig(name="digits", image_size=32), 0)
    calib, _ = split_arrays(data.train_eval, calibration_indices(len(data.train_eval), 256, 0))
    print(f"digits at 32x32, {args.steps} SGD steps; onnxruntime {onnxruntime.__version__}, "
          f"style {ORT_STYLE}, level {ORT_LEVEL}\n")
    print("| model | variant | .onnx KiB | .ort KiB | max \\|Δlogit\\| | tolerance | conversion s (3 files) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="kdpipe-ort-bench-") as tmp:
            work = Path(tmp)
            model = _trained(name, data, args.steps)
            files = {"fp32": export_onnx(model, work / "model_fp32.onnx", in_channels=data.in_channels,
                                         image_size=data.image_size, opset=18)}
            files["fp16"] = convert_fp16(files["fp32"], work / "model_fp16.onnx")
            files["int8"] = work / "model_int8.onnx"
            quantize_int8(files["fp32"], files["int8"], calib, activation_type="uint8")
            out = work / "bundle"
            out.mkdir()
            t0 = time.perf_counter()
            done = convert_to_ort([files[v] for v in VARIANTS], out, name)
            seconds = time.perf_counter() - t0
            for v in VARIANTS:
                ort_file = done["files"][files[v].name]
                parity = ort_parity(files[v], ort_file, v, name)
                conversion = f"{seconds:.2f}" if v == "fp32" else ""
                print(f"| {name} | {v} | {files[v].stat().st_size / 1024:.1f} | {ort_file.stat().st_size / 1024:.1f} | "
                      f"{parity['max_abs_diff']:.2g} | {parity['tolerance']:.2g} | {conversion} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
