"""ONNX Runtime Mobile: a bundle's models in ORT format, their operator config, their parity with the ONNX files.

A reduced ("minimal") onnxruntime build reads only ORT-format models and holds only the
operator kernels listed in a config file. :func:`convert_to_ort` runs onnxruntime's own
converter (``onnxruntime.tools.convert_onnx_models_to_ort``) on a bundle's ONNX files and
writes ``model_<variant>.ort`` plus one merged ``required_operators.config``;
:func:`canonical_ort` makes each file's bytes independent of the converter process
(a bundle is a DVC out: same params, same bytes); :func:`ort_parity` checks each
``.ort`` against its ``.onnx``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.deploy.artifacts import DeployError
from pipeline.deploy.edge.edge_runtime import EdgeError, input_facts, open_session, run_session

#: How the .ort files are optimised. Style "Fixed" bakes the optimisations into the file: a minimal
#: (reduced) onnxruntime build has no graph optimiser to run them on the device, and "Runtime" only
#: pays off with compiling execution providers (NNAPI, CoreML) in an extended minimal build.
#: Level "extended", not "basic": basic (constant folding, Conv+BN fusion) leaves an INT8 model's
#: QuantizeLinear/DequantizeLinear pairs in place, so a device would run every convolution in float
#: between them, 4.5x slower than model_int8.onnx on one core here (timm/mobilenetv3_small_100 at
#: 32x32: 1.27 vs 0.28 ms) and up to 1 logit off it; extended also fuses them into QLinearConv,
#: QGemm, QLinearAdd (onnxruntime's integer CPU kernels, on ARM as on x86) and Conv+activation into
#: FusedConv, giving the .onnx's own figures. Not "all" (the converter's default): it adds the NHWC
#: layout rewrite and folds FP16 weights to float32 where this machine's kernels want it (the FP16
#: file doubles), choices of the converting machine, for no INT8 or FP32 gain measured here.
ORT_STYLE = "Fixed"
ORT_LEVEL = "extended"
#: The converter reads its optimisation level from this environment variable (it has no option for it).
ORT_LEVEL_ENV = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
#: One operator config for all of a bundle's .ort files (``build.sh --include_ops_by_config``).
ORT_CONFIG = "required_operators.config"
#: Parity of a .ort against its .onnx: (absolute, relative to the largest |logit|); the larger applies.
#: The same graph run by the same onnxruntime is near identical: fp32 within float32 rounding (the
#: .onnx run here may take x86's NCHWc kernels, the .ort never does); fp16 within two float16 steps
#: of the largest logit (a fusion may round an intermediate differently); int8 within about two
#: output quantization steps (both run the same integer kernels, so in practice exactly equal).
ORT_TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (1e-3, 2e-3), "int8": (1e-3, 2e-2)}
#: The seeded batch of random inputs of the model's shape the parity is measured on.
ORT_PARITY_IMAGES = 8
ORT_PARITY_SEED = 0


def _fields(tab: Any) -> set[int]:
    """Slots (0-based) a FlatBuffers table sets: those whose vtable entry is non-zero."""
    from flatbuffers.number_types import SOffsetTFlags, VOffsetTFlags

    vtable = tab.Pos - tab.Get(SOffsetTFlags, tab.Pos)
    size = tab.Get(VOffsetTFlags, vtable)
    return {i for i in range((size - 4) // 2) if tab.Get(VOffsetTFlags, vtable + 4 + 2 * i)}


def canonical_ort(data: bytes) -> bytes:
    """``data`` (an ORT-format file) with its kernel-type-string resolver laid out in a fixed order.

    Why: the converter writes that resolver (the ORT format's last section, the front of
    the buffer) from a hash map whose order depends on addresses in the converting
    process, so two conversions of one model differ in a few bytes while holding the same
    content. This rebuilds the front: the model subtree is copied byte for byte (it stays
    at the same distance from the end, which keeps its alignment), then the resolver's
    entries, the version string and the root are written again in their vector order.
    The content is the same: what was read is checked against what was written. A file
    with any field this code does not know (a newer ORT format) is returned unchanged.
    """
    import flatbuffers
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        ArgTypeAndIndex,
        InferenceSession,
        KernelTypeStrArgsEntry,
        KernelTypeStrResolver,
        OpIdKernelTypeStrArgsEntry,
    )

    def resolver_content(root: Any) -> list[tuple[bytes, list[tuple[bytes, list[tuple[int, int]]]]]] | None:
        res = root.KernelTypeStrResolver()
        if res is None or _fields(res._tab) - {0}:
            return None
        ops = []
        for i in range(res.OpKernelTypeStrArgsLength()):
            op = res.OpKernelTypeStrArgs(i)
            if _fields(op._tab) - {0, 1}:
                return None
            entries = []
            for j in range(op.KernelTypeStrArgsLength()):
                entry = op.KernelTypeStrArgs(j)
                if _fields(entry._tab) - {0, 1}:
                    return None
                args = [entry.Args(k) for k in range(entry.ArgsLength())]
                if any(_fields(a._tab) - {0, 1} for a in args):
                    return None
                entries.append((entry.KernelTypeStr(), [(a.ArgType(), a.Index()) for a in args]))
            ops.append((op.OpId(), entries))
        return ops

    try:
        root = InferenceSession.InferenceSession.GetRootAs(data, 0)
        if _fields(root._tab) - {0, 1, 3} or root.Model() is None:
            return data  # a session state (old format) or a field of a newer format
        ops = resolver_content(root)
        model = root.Model()._tab
        from flatbuffers.number_types import SOffsetTFlags

        tail_start = min(model.Pos, model.Pos - model.Get(SOffsetTFlags, model.Pos))
        if ops is None or root.KernelTypeStrResolver()._tab.Pos >= tail_start:
            return data
        version = root.OrtVersion()
        tail = data[tail_start:]
        b = flatbuffers.Builder(len(data) + 1024)
        b.head = len(b.Bytes) - len(tail)
        b.Bytes[b.head:] = tail
        b.minalign = 8
        model_off = len(data) - model.Pos

        def table_vector(start: Any, offsets: list[int]) -> int:
            start(b, len(offsets))
            for off in reversed(offsets):
                b.PrependUOffsetTRelative(off)
            return b.EndVector()

        op_offs = []
        for op_id, entries in ops:
            entry_offs = []
            for type_str, args in entries:
                arg_offs = []
                for arg_type, index in args:
                    ArgTypeAndIndex.Start(b)
                    ArgTypeAndIndex.AddArgType(b, arg_type)
                    ArgTypeAndIndex.AddIndex(b, index)
                    arg_offs.append(ArgTypeAndIndex.End(b))
                args_vec = table_vector(KernelTypeStrArgsEntry.StartArgsVector, arg_offs)
                name = b.CreateString(type_str)
                KernelTypeStrArgsEntry.Start(b)
                KernelTypeStrArgsEntry.AddKernelTypeStr(b, name)
                KernelTypeStrArgsEntry.AddArgs(b, args_vec)
                entry_offs.append(KernelTypeStrArgsEntry.End(b))
            entries_vec = table_vector(OpIdKernelTypeStrArgsEntry.StartKernelTypeStrArgsVector, entry_offs)
            name = b.CreateString(op_id)
            OpIdKernelTypeStrArgsEntry.Start(b)
            OpIdKernelTypeStrArgsEntry.AddOpId(b, name)
            OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(b, entries_vec)
            op_offs.append(OpIdKernelTypeStrArgsEntry.End(b))
        ops_vec = table_vector(KernelTypeStrResolver.StartOpKernelTypeStrArgsVector, op_offs)
        KernelTypeStrResolver.Start(b)
        KernelTypeStrResolver.AddOpKernelTypeStrArgs(b, ops_vec)
        resolver = KernelTypeStrResolver.End(b)
        version_off = b.CreateString(version) if version is not None else None
        InferenceSession.Start(b)
        if version_off is not None:
            InferenceSession.AddOrtVersion(b, version_off)
        InferenceSession.AddModel(b, model_off)
        InferenceSession.AddKernelTypeStrResolver(b, resolver)
        b.Finish(InferenceSession.End(b), file_identifier=bytes(data[4:8]))
        out = bytes(b.Output())
        again = InferenceSession.InferenceSession.GetRootAs(out, 0)
        same = (out.endswith(tail) and again.OrtVersion() == version and resolver_content(again) == ops
                and len(out) - again.Model()._tab.Pos == model_off)
    except Exception:  # a buffer this code cannot read: keep the converter's bytes
        return data
    return out if same else data


def _conversion_error(proc: subprocess.CompletedProcess, names: list[str], scratch: Path, label: str) -> str:
    """One line for a failed converter run: the file it failed on and onnxruntime's first line about it.

    Paths inside the scratch folder are cut to the file name: that folder is gone by the
    time anyone reads the message.
    """
    def clean(text: str) -> str:
        return text.replace(f"{scratch}{os.sep}onnx{os.sep}", "").replace(f"{scratch}{os.sep}", "").strip()

    for line in proc.stdout.splitlines():
        if line.startswith("Error converting "):
            head, _, msg = line[len("Error converting "):].partition(": ")
            name = next((n for n in names if head.endswith(n)), Path(head).name)
            return f"{label}: ORT conversion of {name} failed: {clean(msg) or 'no reason given'}"
    tail = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    return (f"{label}: ORT conversion of {', '.join(names)} failed (exit status {proc.returncode}): "
            f"{clean(tail[-1]) if tail else 'no output'}")


def convert_to_ort(onnx_files: list[Path], dest: Path, label: str) -> dict[str, Any]:
    """Convert ONNX files to ORT format into ``dest`` (``model_x.onnx`` -> ``model_x.ort``) plus :data:`ORT_CONFIG`.

    Runs onnxruntime's own converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``,
    style :data:`ORT_STYLE`, level :data:`ORT_LEVEL`) once over copies in a scratch folder:
    the converter writes beside its input and names its outputs after the level, and one
    run gives one operator config for all the files (a device's reduced build must run
    every one of them). The config is rewritten without the converter's header, which
    names the scratch paths, so a bundle's bytes do not depend on where it was made. A
    separate process also keeps the converter's prints and environment out of the stage.
    Returns ``{"files": {name.onnx: Path of the .ort}, "config": Path, "seconds": float}``;
    a conversion failure is a one-line :class:`DeployError` naming the file.
    """
    names = [f.name for f in onnx_files]
    with tempfile.TemporaryDirectory(prefix="kdpipe-ort-") as scratch:
        src, out = Path(scratch) / "onnx", Path(scratch) / "ort"
        src.mkdir()
        for f in onnx_files:
            shutil.copyfile(f, src / f.name)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
               "--optimization_style", ORT_STYLE, "--output_dir", str(out), str(src)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=scratch, env={**os.environ, ORT_LEVEL_ENV: ORT_LEVEL},
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise DeployError(_conversion_error(proc, names, Path(scratch), label))
        written: dict[str, Path] = {}
        for name in names:
            stem = Path(name).stem
            got = next((c for c in (out / f"{stem}.{ORT_LEVEL}.ort", out / f"{stem}.ort") if c.is_file()), None)
            if got is None:
                raise DeployError(f"{label}: ORT conversion of {name} wrote no .ort file (converter output: "
                                  f"{(proc.stdout.strip().splitlines() or ['none'])[-1]})")
            written[name] = dest / f"{stem}.ort"
            written[name].write_bytes(canonical_ort(got.read_bytes()))
        configs = sorted(out.glob("required_operators*.config"))
        if not configs:
            raise DeployError(f"{label}: the ORT converter wrote no operator config for {', '.join(names)}")
        ops = [ln.strip() for ln in configs[0].read_text(encoding="utf-8").splitlines()
               if ln.strip() and not ln.lstrip().startswith("#")]
    header = [f"# Operators of {', '.join(sorted(p.name for p in written.values()))}",
              f"# (ORT format, optimization style {ORT_STYLE}, level {ORT_LEVEL}).",
              f"# Reduced onnxruntime build: ./build.sh --minimal_build --include_ops_by_config {ORT_CONFIG} ..."]
    config = dest / ORT_CONFIG
    config.write_text("\n".join(header + ops) + "\n", encoding="utf-8")
    return {"files": written, "config": config, "seconds": seconds}


def ort_parity(onnx_file: Path, ort_file: Path, variant: str, label: str) -> dict[str, Any]:
    """Max |Δlogit| of ``ort_file`` against ``onnx_file`` on a seeded random batch; a :class:`DeployError` past tolerance.

    Both run in onnxruntime here on one thread (so the figure is the same on every run
    and can go into the manifest), the .onnx at the default level ``all`` as ``run.py``
    runs it. The tolerance is :data:`ORT_TOLERANCE` of the variant: the larger of its
    absolute part and its relative part times the largest |logit| of the batch.
    """
    atol, rtol = ORT_TOLERANCE.get(variant, ORT_TOLERANCE["fp32"])
    try:
        reference = open_session(onnx_file, threads=1)
        candidate = open_session(ort_file, threads=1)
        _, chw, _ = input_facts(reference)
        batch = np.random.default_rng(ORT_PARITY_SEED).standard_normal((ORT_PARITY_IMAGES, *chw)).astype(np.float32)
        ref, got = run_session(reference, batch), run_session(candidate, batch)
    except EdgeError as err:
        raise DeployError(f"{label}: parity check of {ort_file.name}: {err}") from None
    if ref.shape != got.shape:
        raise DeployError(f"{label}: {ort_file.name} gives logits of shape {got.shape}, {onnx_file.name} {ref.shape}")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    largest = float(np.abs(ref).max()) if ref.size else 0.0
    tolerance = max(atol, rtol * largest)
    if not np.isfinite(max_diff) or max_diff > tolerance:
        raise DeployError(f"{label}: {ort_file.name} does not reproduce {onnx_file.name}: max |Δlogit| = {max_diff:.3g} "
                          f"on {len(batch)} seeded random inputs, above the tolerance {tolerance:.3g} "
                          f"(the larger of {atol:g} and {rtol:g} x the largest |logit| {largest:.3g})")
    return {"max_abs_diff": max_diff, "max_abs_logit": largest, "tolerance": tolerance,
            "top1_agree": int((ref.argmax(1) == got.argmax(1)).sum()), "inputs": int(len(batch)),
            "seed": ORT_PARITY_SEED}
