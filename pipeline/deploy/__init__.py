"""Deployment: ONNX export, INT8/FP16 variants, TensorRT builds, edge bundles and benchmarks.

Modules, in stage order: :mod:`~pipeline.deploy.artifacts` (which runs are deployed and
where every deploy artifact lives), :mod:`~pipeline.deploy.metadata` (kdpipe facts
inside each ONNX file), :mod:`~pipeline.deploy.export` (dynamo ONNX export + parity
with PyTorch), :mod:`~pipeline.deploy.quantize` (onnxruntime static INT8 and FP16, each
scored on the test split), :mod:`~pipeline.deploy.tensorrt_build` (engines where
TensorRT and a GPU exist, a clear "skipped" record otherwise),
:mod:`~pipeline.deploy.bundle` (the folder + .tar.gz that goes to the device) and
:mod:`~pipeline.deploy.benchmark` (latency, throughput, memory per device profile).
:mod:`pipeline.deploy.edge` holds the files that run on the device itself.

Importing this package is cheap: torch, onnx and onnxruntime are imported by the
modules that need them, tensorrt only inside the functions that build engines.
"""

from pipeline.deploy.artifacts import DeployError, ParityError

__all__ = ["DeployError", "ParityError"]
