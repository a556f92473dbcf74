"""Classify images with this bundle's model: ``python run.py IMAGE`` or ``python run.py FOLDER``.

One image: prints the top-k classes (default 5) with their softmax scores. A folder:
every image file in it (recursively, sorted) becomes one CSV row (``file``, the top-k
classes and scores, ``error``), written to stdout or ``--out FILE``; unreadable files
get their error in the row and the exit status is 1.

Images are converted and resized exactly as ``preprocessing.json`` says (Pillow mode,
scale, bilinear resize in float, per-channel normalisation), so an image of another
size or mode is accepted and converted, never rejected. Needs numpy, onnxruntime and
Pillow only. ``--model`` must name a file inside this bundle (a bare name such as
``model_fp16.onnx`` or ``model_fp16.ort`` is looked up here); the file must match the
sha256 in ``bundle.json`` unless ``--no-verify`` is given. ``--format ort`` runs the
ORT-format file of the chosen variant (what a reduced ONNX Runtime Mobile build reads).
``--runtime openvino`` runs the ``.onnx`` file with OpenVINO instead (``pip install
openvino``; the default is onnxruntime, or OpenVINO where onnxruntime is missing), and
``--variant bf16`` runs the fp32 file in OpenVINO's bf16 on CPUs that offer it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from edge_preprocessing import preprocess_image
from edge_runtime import (
    IMAGE_SUFFIXES,
    RUNTIMES,
    EdgeError,
    check_model_file,
    default_runtime,
    load_image,
    open_session,
    resolve_inside,
    run_session,
    softmax,
)

HERE = Path(__file__).resolve().parent


def read_manifest() -> dict:
    """The bundle manifest ``bundle.json`` beside this script."""
    try:
        return json.loads((HERE / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EdgeError(f"cannot read the bundle manifest {HERE / 'bundle.json'}: {err}") from None


#: Model file formats: ``.onnx`` (any onnxruntime) and ``.ort`` (ORT format, also for reduced builds).
FORMATS = ("onnx", "ort")


def model_files(manifest: dict) -> dict:
    """Every model file the manifest lists, ``.onnx`` and ``.ort``: file name -> its entry (with ``sha256``)."""
    known = {}
    for entry in manifest.get("models", {}).values():
        known[entry["file"]] = entry
        if isinstance(entry.get("ort"), dict) and entry["ort"].get("file"):
            known[entry["ort"]["file"]] = entry["ort"]
    return known


def pick_model(manifest: dict, model: str | None, variant: str | None, verify: bool,
               fmt: str | None = None) -> Path:
    """The model file to run: ``--model`` (inside the bundle), or ``--variant`` (default: the bundle's) in ``fmt``.

    ``fmt`` ``onnx`` (the default) or ``ort`` picks that variant's ``.ort`` file; with
    ``--model`` the file's own suffix says its format, and a ``fmt`` that contradicts it
    is refused rather than silently ignored.
    """
    models = manifest.get("models", {})
    if fmt is not None and fmt not in FORMATS:
        raise EdgeError(f"unknown model format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if model is not None:
        path = resolve_inside(model, HERE)
        if fmt is not None and path.suffix.lower() != "." + fmt:
            raise EdgeError(f"--model {path.name} is not a .{fmt} file; drop --format or name a .{fmt} file")
        known = model_files(manifest)
        expected = known.get(path.name, {}).get("sha256") if path.parent == HERE else None
        if verify and expected is None:
            raise EdgeError(f"{path.name} is not one of this bundle's models ({', '.join(sorted(known))}); "
                            "pass --no-verify to run it anyway")
        return check_model_file(path, expected if verify else None)
    name = variant or manifest.get("default_variant", "fp32")
    if name not in models:
        raise EdgeError(f"variant {name!r} is not in this bundle; available: {', '.join(sorted(models))}")
    entry = models[name]
    if fmt == "ort":
        with_ort = sorted(v for v, m in models.items() if isinstance(m.get("ort"), dict))
        if not isinstance(entry.get("ort"), dict):
            raise EdgeError(f"variant {name!r} has no .ort file in this bundle; variants with one: "
                            f"{', '.join(with_ort) or 'none (the bundle was made with bundle.ort false)'}")
        entry = entry["ort"]
    return check_model_file(resolve_inside(entry["file"], HERE), entry.get("sha256") if verify else None)


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (by suffix, recursive, hidden entries skipped), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def top_k(scores: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` best (class name, score) pairs of one score row, best first."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(names[i] if i < len(names) else str(i), float(scores[i])) for i in order]


def classify(sess, spec: dict, paths: list[Path], batch_size: int) -> list[np.ndarray | EdgeError]:
    """Softmax scores of each image (or the :class:`EdgeError` that stopped it), in order."""
    results: list[np.ndarray | EdgeError] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        tensors: list[np.ndarray | EdgeError] = []
        for p in chunk:
            try:
                tensors.append(preprocess_image(spec, load_image(p))[0])
            except EdgeError as err:
                tensors.append(err)
            except (ValueError, OSError) as err:
                tensors.append(EdgeError(f"cannot convert image {p}: {err}"))
        good = [t for t in tensors if isinstance(t, np.ndarray)]
        scores = iter(softmax(run_session(sess, np.stack(good))) if good else [])
        results.extend(next(scores) if isinstance(t, np.ndarray) else t for t in tensors)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status (0 ok, 1 some images failed, 2 unusable input)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="an image file or a folder of images")
    ap.add_argument("--model", help="a model file (.onnx or .ort) inside this bundle (default: the bundle's default variant)")
    ap.add_argument("--variant", help="fp32, fp16 or int8 (as listed in bundle.json); bf16 with --runtime openvino")
    ap.add_argument("--runtime", choices=RUNTIMES, help="onnxruntime (default, where installed) or openvino")
    ap.add_argument("--format", choices=FORMATS, default=None,
                    help="onnx (default) or ort: the variant's ORT-format file, as a reduced onnxruntime build runs it")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per inference call for a folder")
    ap.add_argument("--out", help="CSV file for a folder run (default: stdout)")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check against bundle.json")
    args = ap.parse_args(argv)
    try:
        manifest = read_manifest()
        spec = json.loads((HERE / manifest.get("preprocessing", "preprocessing.json")).read_text(encoding="utf-8"))
        names = list(manifest.get("class_names", []))
        runtime = args.runtime or default_runtime()
        precision = "f32"
        variant = args.variant
        if variant == "bf16":  # OpenVINO's variant: the fp32 file run in bf16
            if runtime != "openvino":
                raise EdgeError("variant bf16 is the fp32 file run by OpenVINO in bf16: add --runtime openvino")
            variant, precision = "fp32", "bf16"
        model = pick_model(manifest, args.model, variant, not args.no_verify, args.format)
        sess = open_session(model, threads=args.threads, runtime=runtime, precision=precision)
        k = max(1, min(args.top_k, len(names) or args.top_k))
        target = Path(args.input)
        if target.is_dir():
            files = image_files(target)
            if not files:
                raise EdgeError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {target}")
            results = classify(sess, spec, files, max(1, args.batch_size))
            header = ["file"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("class", "score")] + ["error"]
            fh = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout
            try:
                writer = csv.writer(fh)
                writer.writerow(header)
                for path, res in zip(files, results):  # noqa: B905 - same length; Python 3.9 devices
                    rel = path.relative_to(target).as_posix()
                    if isinstance(res, EdgeError):
                        writer.writerow([rel] + [""] * (2 * k) + [str(res)])
                    else:
                        writer.writerow([rel] + [v for c, s in top_k(res, names, k) for v in (c, f"{s:.6f}")] + [""])
            finally:
                if fh is not sys.stdout:
                    fh.close()
            failed = sum(isinstance(r, EdgeError) for r in results)
            if failed:
                print(f"run.py: {failed} of {len(files)} image(s) could not be read (see the error column)",
                      file=sys.stderr)
            return 1 if failed else 0
        (res,) = classify(sess, spec, [target], 1)
        if isinstance(res, EdgeError):
            raise res
        print(f"{target}  (model {model.name}, {runtime}" + (", bf16)" if precision == "bf16" else ")"))
        for rank, (cls, score) in enumerate(top_k(res, names, k), start=1):
            print(f"{rank:2d}. {cls:<24s} {score:.4f}")
        return 0
    except EdgeError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
