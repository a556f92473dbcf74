"""ONNX export through the dynamo exporter, with metadata and a parity check against PyTorch.

:func:`export_onnx` exports one network with a symbolic batch dimension (the example
batch is >= 2 so the exporter cannot specialise it to 1), one self-contained file
(external data only past the 2 GB protobuf limit), checks it with ``onnx.checker`` and
writes kdpipe metadata into ``metadata_props``: class names, input shape,
normalisation, the preprocessing spec, the SHA-256 of the source checkpoint and of
the params the export depends on.

:func:`check_parity` runs the ONNX file with onnxruntime on the real test images and
compares with PyTorch: max |Δlogit| must be <= the tolerance and the top-1 class the
same on every image; otherwise :class:`~pipeline.deploy.artifacts.ParityError` names
the worst image and its difference. :func:`export_all` is the ``export`` stage.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import __version__
from pipeline.deploy.artifacts import (
    INPUT_NAME,
    OUTPUT_NAME,
    DeployError,
    ParityError,
    deployable_runs,
    onnx_dir,
    params_sha256,
    report_file,
    split_arrays,
    stage_provenance,
)
from pipeline.deploy.edge.edge_runtime import EdgeError, open_session, run_session
from pipeline.deploy.metadata import model_metadata, set_metadata

#: Protobuf's hard limit; bigger models need external data files.
PROTOBUF_LIMIT = 2 * 1024**3

#: Node metadata the dynamo exporter writes that holds absolute paths of this machine's source files.
LOCAL_PATH_KEYS = frozenset({"pkg.torch.onnx.stack_trace"})


def strip_local_paths(proto: Any) -> None:
    """Drop node metadata holding this machine's file paths (the exporter's Python stack traces).

    They would make the same model exported from two checkouts differ in bytes, and ship
    the developer's paths to the device; the module names, FX nodes and name scopes stay.
    """
    graphs = [proto.graph, *proto.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [(p.key, p.value) for p in node.metadata_props if p.key not in LOCAL_PATH_KEYS]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                for key, value in kept:
                    entry = node.metadata_props.add()
                    entry.key, entry.value = key, value
            graphs += [a.g for a in node.attribute if a.HasField("g")]  # If/Loop bodies
            graphs += [g for a in node.attribute for g in a.graphs]


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def _one_translation_table() -> Iterator[None]:
    """Within the block, ``torch.onnx.export`` builds its table of aten-to-ONNX translations (onnxscript's
    torchlib) once per opset, not twice per call: about 0.75 s each time, ~1.5 s of every model's export.

    The table is only read while a model is translated (we pass no custom translations),
    so one table serves every export of the stage. Where torch's exporter has no such
    table (another torch version), the block changes nothing.
    """
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def shared(cls: Any, opset_version: int = 18) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = original.__func__(cls, opset_version)
        return _REGISTRIES[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(shared)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def _quiet_export(*args: Any, **kwargs: Any) -> Any:
    """``torch.onnx.export`` without its progress prints and deprecation chatter."""
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _one_translation_table():
        warnings.simplefilter("ignore")
        return torch.onnx.export(*args, **kwargs)


def export_onnx(
    model: nn.Module,
    out: Path,
    *,
    in_channels: int,
    image_size: int,
    opset: int,
    example_batch: int = 2,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` to ``out`` (dynamic batch, opset ``opset``), check it, add ``metadata``.

    The caller provides atomicity (the export stage builds its whole out folder in a
    temp directory); external data files are written beside ``out`` only for models
    past the 2 GB protobuf limit.
    """
    import onnx

    if example_batch < 2:
        raise DeployError(f"export needs an example batch of at least 2 (got {example_batch}) to keep the batch dynamic")
    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, in_channels, image_size, image_size, generator=gen)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = _quiet_export(model, (example,), None, dynamo=True, opset_version=int(opset),
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch},), external_data=False, optimize=True, verbose=False)
    except Exception as err:  # the exporter raises many internal types; name the model and the first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DeployError(f"ONNX export of {type(model).__name__} failed: {first}") from err
    if program is None:
        raise DeployError("torch.onnx.export returned no program (dynamo exporter unavailable?)")
    proto = program.model_proto
    strip_local_paths(proto)
    set_metadata(proto, dict(metadata or {}))
    proto.producer_name, proto.producer_version = "kdpipe", __version__
    out.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(t.raw_data) or 4 * max(1, len(t.float_data)) for t in proto.graph.initializer)
    if weight_bytes >= PROTOBUF_LIMIT - (64 << 20):  # leave room for the graph itself
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    else:
        onnx.save_model(proto, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as err:  # onnx.checker.ValidationError and shape-inference errors
        raise DeployError(f"onnx.checker rejects {out}: {(str(err).strip().splitlines() or [''])[0]}") from None
    return out


@torch.no_grad()
def torch_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """PyTorch FP32 logits of ``images`` in eval mode, in order."""
    model = model.eval()
    outs = [model(torch.from_numpy(images[i:i + batch_size])).float().numpy()
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


def onnx_logits(path: Path, images: np.ndarray, batch_size: int = 256, threads: int = 0,
                runtime: str = "onnxruntime", precision: str = "f32") -> np.ndarray:
    """CPU logits of ``images`` for one ONNX file run by ``runtime`` (onnxruntime or openvino), in order."""
    try:
        sess = open_session(path, threads=threads, runtime=runtime, precision=precision)
        outs = [run_session(sess, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    except EdgeError as err:
        raise DeployError(str(err)) from None
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


def ranked_classes(logits: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best classes of each row, best first; of equal logits the lower class index ranks first.

    The tie rule matters for INT8 files: their logits are dequantized integers, so two
    classes often share the top value exactly. It is the rule of ``argmax`` and of the
    bundle's ``run.py`` (a stable sort), so every score here is what a device computes.
    (``argpartition`` breaks such ties by its selection algorithm's order, which is what
    made an INT8 file's top-1 in the quantize stage differ from a fresh ``argmax``.)
    """
    return np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share (%) of rows whose label is among the ``k`` best classes (:func:`ranked_classes`; k capped at the class count)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = ranked_classes(logits, k)
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def compare_logits(reference: np.ndarray, candidate: np.ndarray, atol: float, label: str,
                   rtol: float = 0.0, names: tuple[str, str] = ("PyTorch", "ONNX Runtime")) -> dict[str, Any]:
    """Parity of two logit arrays: the figures, or a :class:`ParityError` naming the worst image.

    ``names`` are what produced the reference and the candidate, for the message.

    Fails when any |difference| exceeds ``atol + rtol * s``, ``s`` the image's largest
    |logit| (float32 rounding grows with the size of what the last layers add up, so
    a network with logits in the hundreds needs the relative term), or when any
    image's top-1 class differs.
    """
    if reference.shape != candidate.shape:
        raise ParityError(f"{label}: {names[1]} output shape {candidate.shape} differs from {names[0]}'s "
                          f"{reference.shape}")
    if reference.size == 0:
        raise ParityError(f"{label}: no test images to check parity on")
    ref64 = reference.astype(np.float64)
    diff = np.abs(ref64 - candidate.astype(np.float64))
    scale = np.abs(ref64).max(axis=1, keepdims=True)
    allowed = atol + rtol * np.broadcast_to(scale, ref64.shape)
    excess = np.where(np.isfinite(diff), diff / allowed, np.inf)  # > 1 where the tolerance is exceeded
    worst_flat = int(excess.argmax())
    worst = worst_flat // reference.shape[1]
    max_diff = float(diff.max())
    top_ref, top_cand = reference.argmax(1), candidate.argmax(1)
    flipped = np.flatnonzero(top_ref != top_cand)
    figures = {"images": int(len(reference)), "max_abs_diff": max_diff, "mean_abs_diff": float(diff.mean()),
               "max_abs_logit": float(np.abs(ref64).max()), "worst_index": worst,
               "top1_mismatches": int(flipped.size), "atol": float(atol), "rtol": float(rtol)}
    if not np.isfinite(max_diff) or float(excess.max()) > 1.0 or flipped.size:
        at = float(diff.flat[worst_flat])
        parts = [f"|Δlogit| = {at:.3g} at test image {worst}, above the tolerance {float(allowed.flat[worst_flat]):.3g} "
                 f"there (atol {atol:g} + rtol {rtol:g} x the image's largest |logit| {float(scale[worst, 0]):.3g}); "
                 f"max |Δlogit| = {max_diff:.3g}"]
        if flipped.size:
            parts.append(f"top-1 differs on {flipped.size} image(s), first at test image {int(flipped[0])} "
                         f"({names[0]} class {int(top_ref[flipped[0]])}, {names[1]} class {int(top_cand[flipped[0]])})")
        raise ParityError(f"{label}: {names[1]} does not reproduce {names[0]} on the test split: " + "; ".join(parts))
    return figures


def check_parity(model: nn.Module, onnx_path: Path, images: np.ndarray, atol: float, label: str,
                 batch_size: int = 256, rtol: float = 0.0) -> dict[str, Any]:
    """Run both PyTorch and onnxruntime on ``images``; the parity figures or a :class:`ParityError`."""
    return compare_logits(torch_logits(model, images, batch_size), onnx_logits(onnx_path, images, batch_size),
                          atol, label, rtol)


def export_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``export`` stage: every deployable run to ONNX, parity-checked; writes ``exports/onnx`` and the report."""
    from pipeline.data import build_data, preprocessing_spec
    from pipeline.engine.atomic import atomic_dir, atomic_write_json, file_sha256
    from pipeline.engine.checkpoint import load_model_file

    cfg = params.export
    data = build_data(params.data, params.seed)
    images, labels = split_arrays(data.test)
    spec = preprocessing_spec(data)
    sections = ("seed", "data", "export")
    phash = params_sha256(params, sections)
    inside = stage_provenance(params, sections, root, git=False)  # in the ONNX files: no commit, same bytes
    report: dict[str, Any] = {}
    with atomic_dir(onnx_dir(root)) as tmp:
        for dep in deployable_runs(params):
            src = dep.model_file(root)
            model, info = load_model_file(src, expect_classes=data.num_classes)
            meta = model_metadata(run=dep.key, arch=info["arch"], role=dep.role, class_names=list(data.class_names),
                                  in_channels=data.in_channels, image_size=data.image_size, preprocessing=spec,
                                  source_sha256=file_sha256(src), params_hash=phash, opset=cfg.opset,
                                  extra={"train_params_sha256": info.get("params_sha256", ""), "provenance": inside})
            exported = model.export_form()  # the model itself, or its re-parameterised copy
            out = export_onnx(exported, tmp / dep.key / "model.onnx", in_channels=data.in_channels,
                              image_size=data.image_size, opset=cfg.opset, example_batch=cfg.example_batch,
                              metadata=meta)
            ref = torch_logits(exported, images, cfg.batch_size)
            got = onnx_logits(out, images, cfg.batch_size)
            figures = compare_logits(ref, got, cfg.parity_atol, f"parity of {dep.key} ({src})", cfg.parity_rtol)
            entry = {"role": dep.role, "arch": info["arch"], "student": dep.student, "method": dep.method,
                     "bundle": dep.bundle_name, "parity": figures,
                     "top1": round(topk_accuracy(got, labels, 1), 4),
                     "top5": round(topk_accuracy(got, labels, 5), 4),
                     "bytes": out.stat().st_size, "opset": cfg.opset}
            if exported is not model:  # re-parameterised: how far the fused network is from the trained one
                trained = torch_logits(model, images, cfg.batch_size)
                entry["reparameterized"] = {"max_abs_diff": float(np.abs(ref - trained).max()) if len(ref) else 0.0,
                                            "top1_trained": round(topk_accuracy(trained, labels, 1), 4)}
            report[dep.key] = entry
    atomic_write_json(report_file(root, "export"), {"models": report, "test_images": int(len(labels)),
                                                    "provenance": stage_provenance(params, sections, root)})
    return report

