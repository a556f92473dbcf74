"""The edge bundle: one self-contained folder per deployable model, also packed as ``.tar.gz``.

A bundle holds everything a device needs and nothing it cannot run::

    <name>/
      model_fp32.onnx  model_fp16.onnx  model_int8.onnx   the ONNX variants (params bundle.variants)
      model_int8_trt.onnx                                 symmetric INT8 QDQ that TensorRT INT8 engines come from
      model_fp32.ort  model_fp16.ort  model_int8.ort      the same graphs in ORT format (params bundle.ort)
      required_operators.config                           their operators, for a reduced onnxruntime build
      labels.txt                                          class names, one per line
      preprocessing.json                                  how a raw image becomes the input
      bundle.json                                         manifest: files + sha256 (+ graph's), accuracy, profiles
      run.py  bench.py                                    runner and latency table (numpy, onnxruntime, Pillow)
      edge_runtime.py  edge_openvino.py                   their helpers: loading, sessions; OpenVINO (optional)
      edge_measure.py  edge_timing.py                     measurement: cold start, memory, interleaved rounds
      edge_preprocessing.py                               (copies of the pipeline's own code)
      build_engine.py  build_engines.sh                   TensorRT build: Python API and trtexec
      requirements.txt  README.md

``edge_preprocessing.py`` is a verbatim copy of :mod:`pipeline.data.preprocessing`, the
reference the data tests check against the training tensors, so device and training
preprocess alike. The ``.ort`` files are written by onnxruntime's own converter
and checked against their ``.onnx`` (:mod:`pipeline.deploy.ort_mobile`).
Archives are deterministic (sorted members, zero mtimes and owners)
and :func:`safe_extract` refuses members that would land outside the target folder.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.deploy.artifacts import (
    BUNDLES,
    INPUT_NAME,
    TRT_INT8,
    DeployError,
    read_json,
    report_file,
    stage_provenance,
    tensorrt_dir,
    variant_file,
)
from pipeline.deploy.graph_identity import graph_sha256
from pipeline.deploy.ort_mobile import ORT_LEVEL, ORT_STYLE, convert_to_ort, ort_parity
from pipeline.engine.atomic import file_sha256

EDGE_DIR = Path(__file__).resolve().parent / "edge"
#: Bundle file name -> source file (relative to pipeline/).
RUNTIME_FILES = {
    **{name: EDGE_DIR / name for name in ("run.py", "bench.py", "edge_runtime.py", "edge_measure.py", "edge_timing.py",
                                          "edge_openvino.py", "build_engine.py")},
    "edge_preprocessing.py": Path(__file__).resolve().parent.parent / "data" / "preprocessing.py",
}
BUNDLE_FORMAT = "kdpipe-bundle/1"

log = logging.getLogger(__name__)


def _revision(prov: dict[str, Any]) -> str:
    """`` at git revision <rev>`` (with `` (uncommitted changes)`` when dirty), or nothing outside git."""
    rev = prov.get("git_revision")
    if not rev:
        return ""
    return f" at git revision `{rev[:12]}`" + (" (uncommitted changes)" if prov.get("git_dirty") else "")


def _ort_readme(manifest: dict[str, Any]) -> str:
    """The README's ONNX Runtime Mobile section: the .ort files, how to run one and how to build a reduced runtime."""
    section = manifest.get("ort") or {}
    rows = [(v, m["ort"]) for v, m in manifest["models"].items() if m.get("ort")]
    if not section.get("enabled") or not rows:
        return ""
    table = "\n".join(f"| `{o['file']}` | `{manifest['models'][v]['file']}` | {o['bytes'] / 1024:.1f} | "
                      f"{o['parity']['max_abs_diff']:.2g} |" for v, o in rows)
    skipped = "".join(f"\nNo `.ort` for `{manifest['models'][v]['file']}`: {why}." for v, why in
                      sorted(section.get("skipped", {}).items()) if v in manifest["models"])
    variant = manifest["default_variant"] if any(v == manifest["default_variant"] for v, _ in rows) else rows[0][0]
    return f"""
## ONNX Runtime Mobile (.ort)

The same graphs in ORT format, converted by onnxruntime {section.get('onnxruntime', '')}'s
`convert_onnx_models_to_ort` (optimization style {section['optimization_style']}, level
{section['optimization_level']}: the CPU execution provider's fusions are baked in, INT8 as integer kernels
such as QLinearConv; no layout rewrite specific to the converting machine):

| file | converted from | KiB | max \\|Δlogit\\| vs the .onnx |
|---|---|---|---|
{table}

Parity is measured on {rows[0][1]['parity']['inputs']} seeded random inputs, run by onnxruntime where the bundle was made.{skipped}

```bash
python run.py image.png --format ort                 # the .ort of the {variant} variant (--variant picks another)
python run.py image.png --model {rows[0][1]['file']}       # one .ort file by name, checked against bundle.json
```

A full onnxruntime (`pip install onnxruntime`, the same or a newer version) runs `.ort`
files as they are (without optimising them again: on x86 the `.onnx` can be faster there). A reduced
onnxruntime holds only the operator kernels these models use, listed in `{section['operators_config']}`
(`com.microsoft` ones included: keep contrib operators, no `--disable_contrib_ops`); build it
from the onnxruntime sources of the same version (an ORT-format-only minimal build):

```bash
./build.sh --config MinSizeRel --build_shared_lib --parallel --skip_tests \\
    --minimal_build --include_ops_by_config /path/to/this/bundle/{section['operators_config']}
# --build_wheel for a Python package run.py can use (not tried here); --android or --ios for phones
```

A minimal build reads only `.ort` files (run `run.py --format ort`).
"""


def readme(manifest: dict[str, Any]) -> str:
    """The bundle's README: what is inside and the commands to run it."""
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    models = "\n".join(f"| `{m['file']}` | {v} | {pct(m.get('top1'))} | {pct(m.get('top5'))} | {m['bytes'] / 1024:.1f} |"
                       for v, m in manifest["models"].items())
    trt = manifest.get("tensorrt", {})
    shape = "x".join(str(d) for d in manifest["input_shape"][1:])
    profiles = "\n".join(
        f"- `{p['name']}`: {p.get('threads') or 'all'} thread(s), batch sizes {p.get('batch_sizes')}, "
        f"providers {', '.join(p.get('providers', []))}"
        + (f", latency budget {p['latency_budget_ms']:g} ms" if p.get("latency_budget_ms") else "")
        + (f", size budget {p['size_budget_kib']:g} KiB" if p.get("size_budget_kib") else "")
        for p in manifest.get("benchmark", {}).get("profiles", []))
    return f"""# {manifest['name']}

{manifest['role']} model `{manifest['arch']}` (run `{manifest['run']}`) for {len(manifest['class_names'])} classes,
input `{INPUT_NAME}` of shape N x {shape} (float32, NCHW), output `logits`.
Exported by kdpipe {manifest['kdpipe']}{_revision(manifest.get('provenance') or {})}; source checkpoint sha256 `{manifest['source_sha256'][:16]}...`.

| file | precision | top-1 % | top-5 % | KiB |
|---|---|---|---|---|
{models}

Accuracy is each file's own, run by onnxruntime on the test split.

## Run

```bash
pip install -r requirements.txt            # numpy, onnxruntime, Pillow; nothing else
python run.py image.png                     # top-5 classes with scores ({manifest['default_variant']} model)
python run.py image.png --variant fp32      # another variant (or --model model_fp16.onnx)
python run.py images/ --out predictions.csv # a folder: one CSV row per image
python bench.py                             # latency table for the device profiles listed below
python bench.py --threads 1 4 --batch-sizes 1 16
python run.py image.png --runtime openvino  # OpenVINO instead (pip install openvino; bf16: --variant bf16)
python bench.py --runtime onnxruntime openvino --json results.json  # both runtimes; the file for the report:
                                            # kdpipe device-results import results.json --device NAME
```

Images of any size or mode are converted as `preprocessing.json` says (Pillow mode
`{manifest['preprocessing_mode']}`, bilinear resize, per-channel normalisation). `run.py` only loads models
inside this folder whose sha256 matches `bundle.json`; errors are one line and exit with status 2.

Benchmark profiles (from the pipeline's params; `python bench.py --profiles NAME` picks some):

{profiles}
{_ort_readme(manifest)}
## TensorRT (on the target GPU)

Engines are specific to the GPU and the TensorRT version, so build them on the device:

```bash
sh build_engines.sh                         # trtexec; TensorRT 10 flags or 11 strongly typed, detected
python build_engine.py --precision fp16 int8 # the same through the TensorRT Python API
```

Optimization profile over the batch: min {trt.get('batches', [1, 8, 32])[0]}, opt {trt.get('batches', [1, 8, 32])[1]}, max {trt.get('batches', [1, 8, 32])[2]}; a timing cache
(`timing.cache`) speeds up later builds. Pipeline build status: {trt.get('status', 'unknown')}{(' (' + trt['reason'] + ')') if trt.get('reason') else ''}.
"""


def _add_ort_files(dest: Path, entries: dict[str, Any], models: dict[str, Path], name: str) -> dict[str, Any]:
    """Convert the bundle's onnxruntime variants to ``.ort``, record file, sha256, bytes and parity in ``entries``.

    Not converted: ``int8_trt`` (TensorRT builds its engines from the ONNX file and cannot
    read ORT format; onnxruntime runs ``model_int8.onnx`` faster, so an ``.ort`` of it would
    only add operators to the reduced build for a file no device should run there), and
    a model whose weights lie in an external ``.data`` file (past 2 GB: ORT format is a
    FlatBuffer, which cannot hold that much); both are recorded as skipped with the reason.
    Returns the manifest's ``ort`` section.
    """
    label = f"bundle {name}"
    skipped: dict[str, str] = {}
    wanted: dict[str, Path] = {}
    for variant, entry in entries.items():
        if variant == TRT_INT8:
            skipped[variant] = "it is for TensorRT, which reads ONNX; onnxruntime runs model_int8 faster"
        elif models[variant].with_name(models[variant].name + ".data").is_file():
            skipped[variant] = "its weights lie in an external .data file (past 2 GB), which ORT format cannot hold"
        else:
            wanted[variant] = dest / entry["file"]
    section: dict[str, Any] = {"enabled": True, "optimization_style": ORT_STYLE, "optimization_level": ORT_LEVEL,
                               "operators_config": None, "variants": sorted(wanted), "skipped": skipped}
    if not wanted:
        return section
    import onnxruntime

    done = convert_to_ort(list(wanted.values()), dest, label)
    for variant, onnx_file in wanted.items():
        ort_file = done["files"][onnx_file.name]
        entries[variant]["ort"] = {"file": ort_file.name, "sha256": file_sha256(ort_file),
                                   "bytes": ort_file.stat().st_size,
                                   "parity": ort_parity(onnx_file, ort_file, variant, label)}
    log.info("%s: %d .ort file(s) converted in %.2f s", label, len(wanted), done["seconds"])
    section["operators_config"] = done["config"].name
    section["onnxruntime"] = onnxruntime.__version__  # the ORT format version a device's runtime must read
    return section


def make_bundle(
    dest: Path,
    *,
    name: str,
    models: dict[str, Path],
    preprocessing: dict[str, Any],
    class_names: list[str],
    info: dict[str, Any],
    benchmark: dict[str, Any],
    tensorrt: dict[str, Any],
    default_variant: str = "int8",
    provenance: dict[str, Any] | None = None,
    ort: bool = True,
) -> dict[str, Any]:
    """Fill the folder ``dest`` with one bundle; returns its manifest (also written as ``bundle.json``).

    ``models`` maps a variant (fp32/fp16/int8) to its ONNX file; ``info`` carries the
    run facts (run, role, arch, student, method, source_sha256, accuracies per variant);
    ``provenance`` (what made the bundle: version, git revision, params hash) goes into the manifest.
    ``ort``: also write each onnxruntime variant as ``model_<variant>.ort`` with the operator
    config of a reduced build (ONNX Runtime Mobile), each checked against its ``.onnx``.
    """
    from pipeline.deploy.tensorrt_build import trtexec_commands, trtexec_script

    if "fp32" not in models:
        raise DeployError(f"bundle {name}: the fp32 model is required")
    dest.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for variant, src in models.items():
        if not src.is_file():
            raise DeployError(f"bundle {name}: {src} not found (run the export and quantize stages first)")
        target = dest / f"model_{variant}.onnx"
        shutil.copyfile(src, target)
        data = src.with_name(src.name + ".data")  # external weights of a model past 2 GB keep their recorded name
        if data.is_file():
            shutil.copyfile(data, dest / data.name)
        acc = info.get("accuracy", {}).get(variant, {})
        entries[variant] = {"file": target.name, "sha256": file_sha256(target), "bytes": target.stat().st_size,
                            "top1": acc.get("top1"), "top5": acc.get("top5")}
        if variant == TRT_INT8:
            entries[variant]["use"] = "TensorRT INT8 engines (symmetric QDQ); slower than model_int8.onnx in onnxruntime"
    ort_section = _add_ort_files(dest, entries, models, name) if ort else {"enabled": False}
    for entry in entries.values():  # after the ORT conversion, whose error names a broken file first
        entry["graph_sha256"] = graph_sha256(dest / entry["file"])
    for fname, src in RUNTIME_FILES.items():
        shutil.copyfile(src, dest / fname)
    (dest / "labels.txt").write_text("\n".join(class_names) + "\n", encoding="utf-8")
    (dest / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n", encoding="utf-8")
    (dest / "requirements.txt").write_text("numpy\nonnxruntime\nPillow\n# optional, for --runtime openvino:\n"
                                           "# openvino\n", encoding="utf-8")
    chw = (int(preprocessing["channels"]), int(preprocessing["size"]), int(preprocessing["size"]))
    batches = tuple(tensorrt.get("batches", (1, 8, 32)))
    commands = trtexec_commands({v: e["file"] for v, e in entries.items()}, chw, batches,
                                list(tensorrt.get("precisions", ["fp16", "int8"])), int(tensorrt.get("workspace_mb", 1024)))
    script = dest / "build_engines.sh"
    script.write_text(trtexec_script(commands), encoding="utf-8")
    script.chmod(0o755)
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "kdpipe": __version__,
        **{k: info.get(k) for k in ("run", "role", "arch", "student", "method", "source_sha256")},
        "class_names": list(class_names),
        "input_name": INPUT_NAME,
        "input_shape": ["batch", *chw],
        "preprocessing": "preprocessing.json",
        "preprocessing_mode": preprocessing.get("mode"),
        "labels": "labels.txt",
        "models": entries,
        "default_variant": default_variant if default_variant in entries else "fp32",
        "benchmark": {**benchmark, "variants": [v for v in benchmark.get("variants", list(entries)) if v in entries]},
        "tensorrt": {**tensorrt, "trtexec": commands},
        "ort": ort_section,
        "provenance": dict(provenance or {}),
    }
    (dest / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (dest / "README.md").write_text(readme(manifest), encoding="utf-8")
    return manifest


def pack(folder: Path, archive: Path) -> Path:
    """Pack ``folder`` as ``archive`` (.tar.gz) with members under ``<folder name>/``, byte-for-byte reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in [folder, *sorted(folder.rglob("*"))]:
            arcname = folder.name if path == folder else f"{folder.name}/{path.relative_to(folder).as_posix()}"
            ti = tar.gettarinfo(str(path), arcname)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            ti.mode = 0o755 if path.is_dir() or path.suffix in (".sh", ".py") else 0o644
            if path.is_file():
                with path.open("rb") as fh:
                    tar.addfile(ti, fh)
            else:
                tar.addfile(ti)
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(buf.getvalue())
    return archive


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a bundle archive into ``dest``; refuse any member that would escape it.

    Refused: absolute names, ``..`` components, links (symbolic or hard), devices and
    other special members. Everything is checked before anything is written, so a
    hostile archive leaves ``dest`` untouched. Returns the extracted file paths.
    """
    dest = Path(dest)
    root = dest.resolve()
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as err:
        raise DeployError(f"cannot open bundle archive {archive}: {err}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DeployError(f"bundle archive {archive} is corrupted: {err}") from None
        for m in members:
            name = m.name
            parts = Path(name).parts
            if not parts:
                raise DeployError(f"refusing to extract {archive}: a member has an empty name")
            if name.startswith(("/", "\\")) or Path(name).is_absolute() or ":" in parts[0]:
                raise DeployError(f"refusing to extract {archive}: member {name!r} has an absolute path")
            if ".." in Path(name).parts or "\\" in name:
                raise DeployError(f"refusing to extract {archive}: member {name!r} escapes the target folder")
            if not (m.isfile() or m.isdir()):
                raise DeployError(f"refusing to extract {archive}: member {name!r} is a link or special file")
            if not (root / name).resolve().is_relative_to(root):
                raise DeployError(f"refusing to extract {archive}: member {name!r} resolves outside {root}")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(dest, members=members, filter="data")  # Python >= 3.11.4: a second line of defence
        except TypeError:  # older 3.11: the checks above are the defence
            tar.extractall(dest, members=members)
    return [dest / m.name for m in members if m.isfile()]


def bundle_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``bundle`` stage: one bundle folder (+ .tar.gz) per deployable model under ``bundles/``."""
    from pipeline.engine.atomic import atomic_dir

    exported = read_json(report_file(root, "export"), "export")["models"]
    accuracy = read_json(report_file(root, "quantize"), "quantize")["models"]
    trt_status = read_json(tensorrt_dir(root) / "status.json", "tensorrt")
    bench = params.benchmark
    benchmark = {"profiles": [p.model_dump(mode="json") for p in bench.profiles], "warmup": bench.warmup,
                 "iterations": bench.iterations, "max_seconds": bench.max_seconds, "rounds": bench.rounds,
                 "variants": list(bench.variants)}
    tensorrt = {"status": trt_status.get("status"), "reason": trt_status.get("reason"),
                "precisions": list(params.tensorrt.precisions),
                "batches": [params.tensorrt.min_batch, params.tensorrt.opt_batch, params.tensorrt.max_batch],
                "workspace_mb": params.tensorrt.workspace_mb}
    from pipeline.deploy.metadata import read_metadata

    made_by = stage_provenance(params, ("bundle", "benchmark", "tensorrt"), root)
    manifests: dict[str, Any] = {}
    with atomic_dir(root / BUNDLES) as tmp:
        # The models the export stage wrote (reports/export.json), so this stage needs no torch.
        for key, ex in exported.items():
            wanted = list(params.bundle.variants) + ([TRT_INT8] if "int8" in params.bundle.variants else [])
            models = {v: variant_file(root, key, v) for v in wanted}
            models = {v: p for v, p in models.items() if v == "fp32" or p.is_file()}
            meta = read_metadata(models["fp32"])
            info = {"run": key, "role": ex["role"], "arch": ex["arch"], "student": ex.get("student"),
                    "method": ex.get("method"), "source_sha256": meta.get("source_sha256", ""),
                    "accuracy": accuracy.get(key, {})}
            name = ex["bundle"]
            folder = tmp / name
            manifests[name] = make_bundle(
                folder, name=name, models=models, preprocessing=meta["preprocessing"],
                class_names=list(meta["class_names"]), info=info, benchmark=benchmark, tensorrt=tensorrt,
                default_variant=params.bundle.default_variant, provenance=made_by, ort=params.bundle.ort)
            if params.bundle.archive:
                pack(folder, tmp / f"{name}.tar.gz")
    return manifests
