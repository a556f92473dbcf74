"""The real device in the loop: the bundle's ``bench.py --json`` and ``kdpipe device-results``.

A tiny workspace holds two real bundles (``make_bundle``) of tiny real ONNX models; a
copy of one bundle (what a device receives) is measured by its own ``bench.py`` in a
subprocess that cannot import torch or kdpipe, and the document it writes is imported,
re-imported, refused when it is bad, and turned into report profiles.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from pipeline.deploy.artifacts import DeployError
from pipeline.deploy.bundle import make_bundle
from pipeline.deploy.device_results import RESULTS_FORMAT, device_profiles, import_results
from pipeline.deploy.edge.edge_measure import headline
from pipeline.deploy.edge.edge_runtime import installed_runtimes
from tests.conftest import REPO
from tests.test_deploy import _blocking_env

#: Bundle name -> run key of the tiny workspace.
BUNDLES = {"tiny-kd": "kd/tiny", "tiny-baseline": "baseline/tiny"}
#: The bundles' profiles: the first cannot run anywhere (a provider that does not exist), so the
#: device's figure is its second, the first one it measured.
PROFILES = [{"name": "accel", "threads": 1, "batch_sizes": [1], "providers": ["NoSuchExecutionProvider"]},
            {"name": "edge-1core", "threads": 1, "batch_sizes": [1, 2], "providers": ["CPUExecutionProvider"]}]
FAST = ["--iterations", "5", "--warmup", "1", "--max-seconds", "0.2"]


def tiny_onnx(path: Path, seed: int) -> Path:
    """A real image classifier: input [batch, 1, 4, 4] -> Flatten -> Gemm -> logits [batch, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_workspace(root: Path, seed: int) -> Path:
    """A workspace with ``bundles/<name>/`` for each of :data:`BUNDLES` (fp32 and int8 files; ``seed`` sets the weights)."""
    for i, (name, run) in enumerate(BUNDLES.items()):
        src = root / "exports" / name
        models = {"fp32": tiny_onnx(src / "fp32.onnx", seed * 10 + i), "int8": tiny_onnx(src / "int8.onnx", seed * 10 + i + 5)}
        make_bundle(root / "bundles" / name, name=name, models=models,
                    preprocessing={"channels": 1, "size": 4, "mode": "L", "mean": [0.5], "std": [0.25]},
                    class_names=["a", "b", "c"],
                    info={"run": run, "role": "distilled", "arch": "tiny", "student": "tiny", "method": run.split("/")[0],
                          "source_sha256": f"{seed:02d}{i:02d}" * 16, "accuracy": {}},
                    benchmark={"profiles": PROFILES, "warmup": 1, "iterations": 5, "max_seconds": 0.2, "rounds": 6,
                               "variants": ["fp32", "int8"]},
                    tensorrt={"status": "skipped", "reason": "no TensorRT here", "precisions": ["fp16"],
                              "batches": [1, 2, 4], "workspace_mb": 64})
    return root


def bench(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """The bundle's ``bench.py`` in a fresh interpreter that cannot import torch or kdpipe."""
    return subprocess.run([sys.executable, "bench.py", *args], cwd=bundle, env=_blocking_env(bundle.parent),
                          capture_output=True, text=True, timeout=300)


def kdpipe(*args: str) -> subprocess.CompletedProcess:
    """``kdpipe`` in a subprocess, this checkout first on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``device_results/`` and its bytes."""
    folder = root / "device_results"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tiny_workspace(tmp_path_factory.mktemp("ws"), seed=1)


@pytest.fixture(scope="module")
def measured(ws, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each bundle copied to a "device" and measured there by its own bench.py --json: name -> (file, document)."""
    device = tmp_path_factory.mktemp("device")
    out = {}
    for name in BUNDLES:
        shutil.copytree(ws / "bundles" / name, device / name)
        proc = bench(device / name, "--json", str(device / f"{name}.json"), *FAST)
        assert proc.returncode == 0, proc.stderr
        out[name] = (device / f"{name}.json", json.loads((device / f"{name}.json").read_text()))
    return out


def test_bench_json_is_a_device_results_document(ws, measured):
    path, doc = measured["tiny-kd"]
    manifest = json.loads((ws / "bundles" / "tiny-kd" / "bundle.json").read_text())
    assert doc["format"] == RESULTS_FORMAT
    assert (doc["bundle"], doc["run"], doc["source_sha256"]) == ("tiny-kd", "kd/tiny", manifest["source_sha256"])
    assert set(doc["device"]) >= {"cpu", "logical_cores", "os", "machine", "python", "runtimes"}
    assert doc["device"]["cpu"] and doc["device"]["logical_cores"] == os.cpu_count()
    assert set(doc["device"]["runtimes"]) == {"onnxruntime", "openvino"}
    assert doc["device"]["runtimes"]["onnxruntime"]
    assert doc["settings"] == {"warmup": 1, "iterations": 5, "max_seconds": 0.2, "profiles": PROFILES,
                               "rounds": manifest["benchmark"]["rounds"]}
    assert list(doc["results"]) == ["onnxruntime"]  # the default runtime where onnxruntime is installed
    for variant in ("fp32", "int8"):
        res = doc["results"]["onnxruntime"][variant]
        assert res["file"] == manifest["models"][variant]["file"]
        assert res["sha256"] == manifest["models"][variant]["sha256"]
        assert res["runtime"] == "onnxruntime" and res["status"] == "ok"
        assert res["profiles"]["accel"]["status"] == "skipped"
        stats = res["profiles"]["edge-1core"]["batches"]
        assert sorted(stats) == ["1", "2"] and stats["1"]["runs"] >= 5 and stats["2"]["p50_ms"] > 0
        for st in stats.values():  # the median over interleaved rounds, with its 95 % interval
            assert st["rounds"] == manifest["benchmark"]["rounds"] and st["ci_level"] == 0.95
            assert st["p50_ci_ms"][0] <= st["p50_ms"] <= st["p50_ci_ms"][1]
        assert res["graph_sha256"] == manifest["models"][variant]["graph_sha256"]
        assert res["cold_start"]["import_ms"] >= 0 and res["peak_rss_mb"] > 0
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the temp file was renamed


def test_bench_table_has_a_runtime_column(measured):
    bundle = measured["tiny-kd"][0].parent / "tiny-kd"
    proc = bench(bundle, "--variants", "int8", "--runtime", "onnxruntime", *FAST)
    assert proc.returncode == 0, proc.stderr
    header, _, *rows = proc.stdout.splitlines()
    assert header.split()[:3] == ["runtime", "model", "profile"]
    assert [r.split()[:3] for r in rows] == [["onnxruntime", "int8", "accel"], ["onnxruntime", "int8", "edge-1core"],
                                             ["onnxruntime", "int8", "edge-1core"]]


@pytest.mark.skipif("openvino" not in installed_runtimes(), reason="OpenVINO is not installed")
def test_bench_measures_with_both_runtimes(measured, tmp_path):
    bundle = measured["tiny-kd"][0].parent / "tiny-kd"
    if not (bundle / "edge_openvino.py").is_file():
        pytest.skip("the bundle has no edge_openvino.py yet (pipeline/deploy/bundle.py RUNTIME_FILES)")
    out = tmp_path / "both.json"
    proc = bench(bundle, "--runtime", "onnxruntime", "--runtime", "openvino", "--variants", "fp32", "--json",
                 str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["onnxruntime", "openvino"]
    assert doc["device"]["runtimes"]["openvino"]
    ov = doc["results"]["openvino"]["fp32"]
    assert ov["runtime"] == "openvino" and ov["precision"] == "f32"
    assert ov["profiles"]["edge-1core"]["status"] == "ok" and ov["profiles"]["accel"]["status"] == "skipped"
    assert {line.split()[0] for line in proc.stdout.splitlines()[2:]} == {"onnxruntime", "openvino"}


@pytest.mark.parametrize(("args", "needle"), [
    (["--json", "/no/such/folder/r.json"], "does not exist"),
    (["--variants", "bf16", "--runtime", "onnxruntime"], "add --runtime openvino"),
    (["--variants", "fp64"], "unknown variant"),
])
def test_bench_refuses_bad_arguments_in_one_line(measured, args, needle):
    proc = bench(measured["tiny-kd"][0].parent / "tiny-kd", *args, *FAST)
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


def test_bench_refuses_a_model_file_that_is_not_the_manifests(measured, tmp_path):
    bundle = tmp_path / "tiny-kd"
    shutil.copytree(measured["tiny-kd"][0].parent / "tiny-kd", bundle)
    tiny_onnx(bundle / "model_int8.onnx", seed=99)  # replaced on the device: the hash no longer matches
    proc = bench(bundle, "--json", str(tmp_path / "r.json"), *FAST)
    assert proc.returncode == 2 and "does not match the sha256" in proc.stderr and "model_int8.onnx" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_import_files_accumulates_and_replaces(ws, measured, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    kd_file, kd_doc = measured["tiny-kd"]
    proc = kdpipe("device-results", "import", str(kd_file), "--device", "pi5", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "filed the results of tiny-kd" in proc.stdout
    filed = json.loads((root / "device_results" / "pi5.json").read_text())
    assert filed["device"] == "pi5" and list(filed["bundles"]) == ["tiny-kd"]
    assert filed["bundles"]["tiny-kd"]["results"] == kd_doc and filed["bundles"]["tiny-kd"]["imported_at"]
    proc = kdpipe("device-results", "import", str(measured["tiny-baseline"][0]), "--device", "pi5", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads((root / "device_results" / "pi5.json").read_text())["bundles"]) == ["tiny-baseline",
                                                                                                 "tiny-kd"]
    again = copy.deepcopy(kd_doc)
    again["results"]["onnxruntime"]["fp32"]["profiles"]["edge-1core"]["batches"]["1"].update(
        p50_ms=123.0, p50_ci_ms=[120.0, 125.0])
    (tmp_path / "again.json").write_text(json.dumps(again))
    proc = kdpipe("device-results", "import", str(tmp_path / "again.json"), "--device", "pi5", "--root", str(root))
    assert proc.returncode == 0 and "replaced the results of tiny-kd" in proc.stdout, proc.stderr
    filed = json.loads((root / "device_results" / "pi5.json").read_text())
    assert sorted(filed["bundles"]) == ["tiny-baseline", "tiny-kd"]
    assert filed["bundles"]["tiny-kd"]["results"] == again
    assert filed["bundles"]["tiny-baseline"]["results"] == measured["tiny-baseline"][1]
    proc = kdpipe("device-results", "list", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[1]
    assert line.startswith("pi5 | 2: tiny-baseline, tiny-kd | ") and kd_doc["device"]["cpu"] in line
    assert "edge-1core" in line


def _drop(doc: dict, *keys: str) -> dict:
    inner = doc
    for k in keys[:-1]:
        inner = inner[k]
    del inner[keys[-1]]
    return doc


def _set(doc: dict, value: object, *keys: str) -> dict:
    inner = doc
    for k in keys[:-1]:
        inner = inner[k]
    inner[keys[-1]] = value
    return doc


BAD = {
    "missing format": (lambda d: _drop(d, "format"), "missing field format"),
    "wrong format": (lambda d: _set(d, "kdpipe-bundle/1", "format"), "expected 'kdpipe-device-results/1'"),
    "missing sha256": (lambda d: _drop(d, "results", "onnxruntime", "int8", "sha256"),
                       "missing field results.onnxruntime.int8.sha256"),
    "missing cpu": (lambda d: _drop(d, "device", "cpu"), "missing field device.cpu"),
    "mistyped p50": (lambda d: _set(d, "fast", "results", "onnxruntime", "fp32", "profiles", "edge-1core", "batches",
                                    "1", "p50_ms"),
                     "results.onnxruntime.fp32.profiles.edge-1core.batches.1.p50_ms must be int or float"),
    "interval without p50": (lambda d: _set(d, [9.0, 9.5], "results", "onnxruntime", "fp32", "profiles", "edge-1core",
                                            "batches", "1", "p50_ci_ms"),
                             "results.onnxruntime.fp32.profiles.edge-1core.batches.1.p50_ci_ms = [9.0, 9.5] does "
                             "not contain p50_ms"),
    "malformed interval": (lambda d: _set(d, [1.0], "results", "onnxruntime", "int8", "profiles", "edge-1core",
                                          "batches", "1", "p99_ci_ms"), "must be [low, high] in ms, got [1.0]"),
    "unknown runtime": (lambda d: _set(d, {}, "results", "tflite"), "unknown runtime"),
    "unknown bundle": (lambda d: _set(d, "tiny-dkd", "bundle"), "bundle 'tiny-dkd' is not among"),
    "another run": (lambda d: _set(d, "dkd/tiny", "run"), "run is 'dkd/tiny'"),
    "another file": (lambda d: _set(d, "model_fp16.onnx", "results", "onnxruntime", "int8", "file"),
                     "model_fp16.onnx is not a model of bundle tiny-kd"),
    "older export": (lambda d: _set(d, "ab" * 32, "source_sha256"), "results of an older export"),
    "nothing measured": (lambda d: _set(d, [PROFILES[0]], "settings", "profiles"), "no profile was measured"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_results_are_one_line_and_change_nothing(ws, measured, tmp_path, capsys, case):
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    assert cli.main(["device-results", "import", str(measured["tiny-baseline"][0]), "--device", "pi5",
                     "--root", str(root)]) == 0
    before = snapshot(root)
    edit, needle = BAD[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit(copy.deepcopy(measured["tiny-kd"][1]))))
    capsys.readouterr()
    assert cli.main(["device-results", "import", str(bad), "--device", "pi5", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert snapshot(root) == before


def test_not_json_a_bad_name_and_a_missing_file_are_refused(ws, measured, tmp_path, capsys):
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    garbage = tmp_path / "r.json"
    garbage.write_text('{"format": "kdpipe-device-results/1", "bundle": ')
    good = str(measured["tiny-kd"][0])
    for args, needle in (([str(garbage), "--device", "pi5"], "is not JSON"),
                         ([good, "--device", "../pi5"], "device name '../pi5' must be"),
                         ([good, "--device", "pi 5"], "device name 'pi 5' must be"),
                         ([str(tmp_path / "none.json"), "--device", "pi5"], "cannot read")):
        assert cli.main(["device-results", "import", *args, "--root", str(root)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert snapshot(root) == {}


def test_results_of_another_workspaces_models_name_the_file(measured, tmp_path, capsys):
    """The same bundle names, other weights (a retrained model's newer export): the first file that differs is named."""
    root = tiny_workspace(tmp_path / "retrained", seed=2)
    assert cli.main(["device-results", "import", str(measured["tiny-kd"][0]), "--device", "pi5",
                     "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "results.onnxruntime.fp32: model_fp32.onnx has sha256" in err and "another bundle's models" in err, err
    assert not (root / "device_results").exists()


def test_a_device_filed_with_other_results_refuses_another_cpu_or_profile(ws, measured, tmp_path, capsys):
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    assert cli.main(["device-results", "import", str(measured["tiny-baseline"][0]), "--device", "pi5",
                     "--root", str(root)]) == 0
    before = snapshot(root)
    other_cpu = _set(copy.deepcopy(measured["tiny-kd"][1]), "Cortex-A76", "device", "cpu")
    other_profile = copy.deepcopy(measured["tiny-kd"][1])
    other_profile["settings"]["profiles"][1]["threads"] = 4
    for doc, needle in ((other_cpu, "import it under another --device name"),
                        (other_profile, "first measured profile edge-1core (4 threads")):
        (tmp_path / "r.json").write_text(json.dumps(doc))
        assert cli.main(["device-results", "import", str(tmp_path / "r.json"), "--device", "pi5",
                         "--root", str(root)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
        assert snapshot(root) == before
    assert cli.main(["device-results", "import", str(tmp_path / "r.json"), "--device", "pi5-4t",
                     "--root", str(root)]) == 0  # under its own name it is fine


def _rows() -> list[dict]:
    return [{"run": run, "bundle": name, "runtime": "onnxruntime", "precision": precision,
             "latency": {"server": None}} for name, run in BUNDLES.items() for precision in ("fp32", "fp16", "int8")]


def test_device_profiles_fill_the_rows(ws, measured, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    kd_doc = measured["tiny-kd"][1]
    import_results(root, measured["tiny-kd"][0], "pi5")
    rows = _rows()
    profiles = device_profiles(root, {"pi5": 2.5}, rows)
    assert profiles == [{"name": "pi5", "device": True, "threads": 1, "batch_sizes": [1, 2], "latency_budget_ms": 2.5,
                         "cpu": kd_doc["device"]["cpu"], "measured_profile": "edge-1core", "stale_bundles": []}]
    by = {(r["bundle"], r["precision"]): r["latency"] for r in rows}
    for precision in ("fp32", "int8"):
        want = headline(kd_doc["results"]["onnxruntime"][precision], {"name": "edge-1core"})
        assert by["tiny-kd", precision]["pi5"] == want
        assert want["batch"] == 1 and want["throughput_batch"] == 2 and want["p50_ms"] > 0
    assert by["tiny-kd", "fp16"]["pi5"] is None  # not measured there
    assert all(by["tiny-baseline", p]["pi5"] is None for p in ("fp32", "fp16", "int8"))  # not imported
    assert all(r["latency"]["server"] is None for r in rows)  # the other profiles are left as they were
    ov_rows = [{**r, "runtime": "openvino", "latency": {}} for r in _rows()]
    device_profiles(root, {}, ov_rows)
    assert all(r["latency"]["pi5"] is None for r in ov_rows)  # measured with onnxruntime only


def test_device_profiles_refuse_a_budget_of_a_device_never_imported(ws, tmp_path):
    with pytest.raises(DeployError, match="device_budgets names device.s. jetson with no results"):
        device_profiles(ws, {"jetson": 3.0}, _rows())


def test_device_profiles_refuse_a_device_named_like_a_profile(ws, measured, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    import_results(root, measured["tiny-kd"][0], "server")
    with pytest.raises(DeployError, match="has the name of a benchmark profile"):
        device_profiles(root, {}, _rows())


def test_results_of_a_rebuilt_bundle_no_longer_count(measured, tmp_path):
    """After a re-export the filed figures describe files the bundle no longer holds: None, and the bundle is named."""
    root = tiny_workspace(tmp_path / "ws", seed=1)
    import_results(root, measured["tiny-kd"][0], "pi5")
    tiny_workspace(root, seed=3)  # the bundles made again from other weights
    rows = _rows()
    (profile,) = device_profiles(root, {}, rows)
    assert profile["stale_bundles"] == ["tiny-kd"]
    assert all(r["latency"]["pi5"] is None for r in rows)
