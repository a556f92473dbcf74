"""kdpipe metadata inside ONNX files (``metadata_props``), readable without torch.

Every exported model carries, under ``kdpipe.*`` keys (string values, JSON where
structured): its run, architecture and role, class names, input name and shape,
normalisation mean/std, the whole preprocessing spec, the SHA-256 of the source
checkpoint and of the params the export depends on, the opset and the precision.
Quantized variants copy it and add their recipe. Any ONNX tool shows it
(``onnx.load(path).metadata_props``; onnxruntime's ``get_modelmeta().custom_metadata_map``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.deploy.artifacts import INPUT_NAME, DeployError

#: Prefix of the metadata keys kdpipe writes.
META_PREFIX = "kdpipe."


def model_metadata(
    *,
    run: str,
    arch: str,
    role: str,
    class_names: list[str],
    in_channels: int,
    image_size: int,
    preprocessing: dict[str, Any],
    source_sha256: str,
    params_hash: str,
    opset: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` of an exported model (string values; lists and dicts as JSON)."""
    meta: dict[str, Any] = {
        "format": "kdpipe-onnx/1",
        "version": __version__,
        "run": run,
        "arch": arch,
        "role": role,
        "precision": "fp32",
        "class_names": class_names,
        "input_name": INPUT_NAME,
        "input_shape": ["batch", int(in_channels), int(image_size), int(image_size)],
        "mean": preprocessing["mean"],
        "std": preprocessing["std"],
        "preprocessing": preprocessing,
        "source_sha256": source_sha256,
        "params_sha256": params_hash,
        "opset": int(opset),
        **(extra or {}),
    }
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The kdpipe metadata of an ONNX file, JSON values decoded (``kdpipe.`` prefix removed).

    A missing file, a file that is not ONNX (protobuf cannot parse it) or an ONNX model
    without kdpipe metadata raises :class:`~pipeline.deploy.artifacts.DeployError` naming the file.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise DeployError(f"{p} not found: run the export stage first (dvc repro export)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as err:  # google.protobuf.message.DecodeError, OSError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DeployError(f"{p} is not an ONNX model ({first}); re-run the export stage") from None
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            try:
                out[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
            except ValueError:
                out[prop.key[len(META_PREFIX):]] = prop.value
    if "format" not in out:
        raise DeployError(f"{p} is not a kdpipe ONNX export (it has no kdpipe metadata); re-run the export stage")
    return out


def set_metadata(model: Any, meta: dict[str, str]) -> None:
    """Replace the ``kdpipe.*`` entries of an ``onnx.ModelProto``'s metadata with ``meta`` (others are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    for k, v in keep + sorted(meta.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
