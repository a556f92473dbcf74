"""Results measured on a real device, filed in the workspace so the report can use them.

A device runs its bundle's ``bench.py --json results.json`` (numpy and onnxruntime
and/or OpenVINO, nothing of kdpipe); ``kdpipe device-results import results.json
--device NAME`` checks that document against the workspace's bundles and files it under
``device_results/NAME.json``: one file per device, a map bundle name -> that bundle's
results, so bundles measured on one device accumulate and a bundle imported again
replaces its entry. The report stage reads the folder through :func:`device_profiles`:
each device becomes one more profile whose figures are those of its first measured
profile, with the latency budget ``benchmark.device_budgets[NAME]``.

Every check runs before anything is written, and each failure is one
:class:`~pipeline.deploy.artifacts.DeployError` line naming the file and the field.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any

from pipeline.config.deploy import DEVICE_NAME, RUNTIMES
from pipeline.deploy.artifacts import BUNDLES, DeployError
from pipeline.deploy.edge.edge_measure import headline
from pipeline.engine.atomic import atomic_write_json

#: What the bundle's ``bench.py --json`` writes (``pipeline/deploy/edge/bench.py``).
RESULTS_FORMAT = "kdpipe-device-results/1"
#: One device's filed results: ``{"format", "device", "bundles": {name: {"imported_at", "results"}}}``.
DEVICE_FORMAT = "kdpipe-device/1"
DEVICE_RESULTS = Path("device_results")

log = logging.getLogger(__name__)

_MISSING = object()


def device_file(root: Path, name: str) -> Path:
    """``device_results/<name>.json`` of the workspace ``root``; the name must match ``DEVICE_NAME``."""
    if not DEVICE_NAME.fullmatch(name):
        raise DeployError(f"device name {name!r} must be letters, digits, _ . - (at most 64 characters)")
    return Path(root) / DEVICE_RESULTS / f"{name}.json"


def _field(doc: Any, path: str | tuple[str, ...], kinds: type | tuple[type, ...], what: str) -> Any:
    """The value at ``path`` (dotted, or a tuple of keys that may hold dots) of ``doc``, checked to be of ``kinds``.

    A missing or mistyped value is a DeployError naming the field's path.
    """
    keys = tuple(path.split(".")) if isinstance(path, str) else path
    dotted = ".".join(keys)
    value: Any = doc
    for key in keys:
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            raise DeployError(f"{what}: missing field {dotted}")
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in _tuple(kinds))
        raise DeployError(f"{what}: field {dotted} must be {names}, got {_short(value)}")
    return value


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(doc: Any, path: str | tuple[str, ...], what: str, optional: bool = False) -> None:
    """A finite number at ``path`` (or null when ``optional``)."""
    value = _field(doc, path, (int, float, type(None)) if optional else (int, float), what)
    if value is not None and not math.isfinite(value):
        raise DeployError(f"{what}: field {'.'.join(path) if isinstance(path, tuple) else path} must be a finite "
                          f"number, got {value}")


def validate_results(doc: Any, what: str) -> None:
    """Check that ``doc`` is a device-results document (``bench.py --json``) with every field the import reads.

    Why so thorough: a hand-edited or truncated file must fail here, with the field
    path, rather than as a KeyError in the report stage days later.
    """
    if not isinstance(doc, dict):
        raise DeployError(f"{what}: not a device-results document (a JSON object written by bench.py --json)")
    fmt = doc.get("format", _MISSING)
    if fmt is _MISSING:
        raise DeployError(f"{what}: missing field format: not a device-results document (write it with the "
                          f"bundle's bench.py --json)")
    if fmt != RESULTS_FORMAT:
        raise DeployError(f"{what}: format is {_short(fmt)}, expected {RESULTS_FORMAT!r} (bench.py --json)")
    for path in ("bundle", "run", "source_sha256", "device.cpu", "device.os", "device.machine", "device.python"):
        _field(doc, path, str, what)
    _field(doc, "device.logical_cores", (int, type(None)), what)
    _field(doc, "device.runtimes", dict, what)
    for path in ("settings.warmup", "settings.iterations", "settings.max_seconds"):
        _number(doc, path, what)
    profiles = _field(doc, "settings.profiles", list, what)
    if not profiles:
        raise DeployError(f"{what}: field settings.profiles is empty")
    for i, prof in enumerate(profiles):
        for key, kind in (("name", str), ("batch_sizes", list)):
            if not isinstance(prof, dict) or not isinstance(prof.get(key), kind):
                raise DeployError(f"{what}: field settings.profiles[{i}].{key} is missing or not a {kind.__name__}")
    results = _field(doc, "results", dict, what)
    if not any(results.values()):
        raise DeployError(f"{what}: field results holds no measurement")
    for runtime, per_variant in results.items():
        if runtime not in RUNTIMES:
            raise DeployError(f"{what}: results.{runtime}: unknown runtime; allowed: {', '.join(RUNTIMES)}")
        _field(doc, ("results", runtime), dict, what)
        for variant in per_variant:
            _validate_entry(doc, ("results", runtime, variant), what)
    measured_profile(doc, what)


def _validate_entry(doc: dict, path: tuple[str, ...], what: str) -> None:
    """One runtime x variant measurement: file, sha256, status and (when ok) the figures ``headline`` reads."""
    _field(doc, path, dict, what)
    for key in ("file", "sha256", "status"):
        _field(doc, (*path, key), str, what)
    if _field(doc, (*path, "status"), str, what) != "ok":
        return
    for name in _field(doc, (*path, "profiles"), dict, what):
        prof = (*path, "profiles", name)
        if _field(doc, (*prof, "status"), str, what) != "ok":
            continue
        batches = _field(doc, (*prof, "batches"), dict, what)
        if not batches:
            raise DeployError(f"{what}: field {'.'.join(prof)}.batches is empty")
        for b in batches:
            if not str(b).isdigit():
                raise DeployError(f"{what}: {'.'.join(prof)}.batches.{b}: a batch size must be a whole number")
            _field(doc, (*prof, "batches", b, "batch"), int, what)
            for stat in ("p50", "p90", "p99"):
                _number(doc, (*prof, "batches", b, f"{stat}_ms"), what)
                _interval(doc, (*prof, "batches", b), stat, what)
            _number(doc, (*prof, "batches", b, "throughput_ips"), what, optional=True)
    if _field(doc, path, dict, what).get("graph_sha256") is not None:
        _field(doc, (*path, "graph_sha256"), str, what)


def _interval(doc: dict, batch: tuple[str, ...], stat: str, what: str) -> None:
    """``<stat>_ci_ms`` (bench.py of a bundle that times in rounds): absent, or [low, high] around ``<stat>_ms``.

    Results of older bundles carry no interval; the report treats their latency as a point.
    """
    entry = _field(doc, batch, dict, what)
    if f"{stat}_ci_ms" not in entry:
        return
    ci = entry[f"{stat}_ci_ms"]
    where = ".".join((*batch, f"{stat}_ci_ms"))
    if (not isinstance(ci, list) or len(ci) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                            and math.isfinite(v) for v in ci)):
        raise DeployError(f"{what}: field {where} must be [low, high] in ms, got {_short(ci)}")
    if not ci[0] <= entry[f"{stat}_ms"] <= ci[1]:
        raise DeployError(f"{what}: field {where} = {ci} does not contain {stat}_ms = {entry[f'{stat}_ms']}")


def measured_profile(doc: dict, what: str = "device results") -> dict[str, Any]:
    """The first profile of ``settings.profiles`` the device measured (status ok for some model): the device's figure.

    Why the first: a device runs its models one way; ``bench.py`` is run there with the
    profile that matches it first (``--threads 4 --batch-sizes 1 8``, or ``--profiles NAME``).
    """
    for prof in doc["settings"]["profiles"]:
        for per_variant in doc["results"].values():
            for entry in per_variant.values():
                if (entry.get("profiles") or {}).get(prof["name"], {}).get("status") == "ok":
                    return prof
    names = [p["name"] for p in doc["settings"]["profiles"]]
    raise DeployError(f"{what}: no profile was measured (every one of {names} was skipped for every model)")


def _profile_key(prof: dict[str, Any]) -> tuple[Any, ...]:
    return (prof["name"], int(prof.get("threads", 0)), list(prof.get("batch_sizes") or [1]),
            list(prof.get("providers") or ["CPUExecutionProvider"]))


def bundle_manifests(root: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The workspace's bundles by name: ``bundles/*/bundle.json`` -> (its path, the manifest)."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted((Path(root) / BUNDLES).glob("*/bundle.json")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a broken manifest is the bundle stage's to report; no results can be checked against it
        if isinstance(manifest, dict) and isinstance(manifest.get("name"), str):
            found[manifest["name"]] = (path, manifest)
    return found


def _manifest_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every model file of a bundle manifest (``.onnx`` and ``.ort``) -> its sha256."""
    files: dict[str, str] = {}
    for entry in (manifest.get("models") or {}).values():
        if isinstance(entry, dict) and "file" in entry:
            files[entry["file"]] = entry.get("sha256", "")
            ort = entry.get("ort")
            if isinstance(ort, dict) and "file" in ort:
                files[ort["file"]] = ort.get("sha256", "")
    return files


def check_against_bundle(doc: dict[str, Any], manifests: dict[str, tuple[Path, dict[str, Any]]], root: Path,
                         what: str) -> None:
    """Refuse results of a bundle the workspace lacks, of another run, or of model files the bundle does not hold.

    Why: figures filed under a bundle must be those of its very files; results of an
    older export or of another bundle's models would put a wrong latency beside an accuracy.
    """
    name = doc["bundle"]
    if name not in manifests:
        known = sorted(manifests)
        shown = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
        raise DeployError(f"{what}: bundle {name!r} is not among this workspace's bundles "
                          f"({Path(root) / BUNDLES}/*/bundle.json: {shown or 'none'}); measure one of them")
    path, manifest = manifests[name]
    if doc["run"] != manifest.get("run"):
        raise DeployError(f"{what}: run is {doc['run']!r} but {path} says {manifest.get('run')!r}")
    files = _manifest_files(manifest)
    for runtime, per_variant in doc["results"].items():
        for variant, entry in per_variant.items():
            file, sha = entry["file"], entry["sha256"]
            if file not in files:
                raise DeployError(f"{what}: results.{runtime}.{variant}: {file} is not a model of bundle {name} "
                                  f"({path} lists {', '.join(sorted(files))})")
            if sha != files[file]:
                raise DeployError(f"{what}: results.{runtime}.{variant}: {file} has sha256 {sha[:12]}..., "
                                  f"{path} has {files[file][:12]}...: the device measured another bundle's models "
                                  f"or an older export; copy {path.parent} to the device again and re-measure")
    if doc["source_sha256"] != manifest.get("source_sha256"):
        raise DeployError(f"{what}: source_sha256 {doc['source_sha256'][:12]}... is not that of {path} "
                          f"({str(manifest.get('source_sha256'))[:12]}...): results of an older export")


def read_device_file(path: Path) -> dict[str, Any]:
    """A filed device's results (``device_results/NAME.json``), checked; a broken file is a DeployError naming it."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DeployError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise DeployError(f"{path} is not valid JSON ({err}); import the device's results again") from None
    what = str(path)
    if not isinstance(doc, dict) or doc.get("format") != DEVICE_FORMAT:
        raise DeployError(f"{path}: not a device file (format {DEVICE_FORMAT!r}); write it with "
                          f"kdpipe device-results import")
    if doc.get("device") != Path(path).stem:
        raise DeployError(f"{path}: field device is {_short(doc.get('device'))}, expected {Path(path).stem!r}")
    for bundle in _field(doc, "bundles", dict, what):
        _field(doc, ("bundles", bundle, "imported_at"), str, what)
        validate_results(_field(doc, ("bundles", bundle, "results"), dict, what), f"{path}: bundles.{bundle}.results")
    return doc


def _check_same_device(doc: dict[str, Any], filed: dict[str, Any], target: Path, what: str) -> None:
    """The other bundles filed for this device were measured on the same CPU with the same first profile."""
    mine = measured_profile(doc, what)
    for bundle, entry in filed["bundles"].items():
        if bundle == doc["bundle"]:
            continue
        other = entry["results"]
        for key in ("cpu", "machine"):
            if other["device"][key] != doc["device"][key]:
                raise DeployError(f"{what}: measured on {key} {doc['device'][key]!r}, but {target} holds results "
                                  f"of {other['device'][key]!r} ({bundle}); import it under another --device name")
        theirs = measured_profile(other, str(target))
        if _profile_key(theirs) != _profile_key(mine):
            raise DeployError(f"{what}: first measured profile {_describe(mine)} differs from {_describe(theirs)} of "
                              f"{bundle} in {target}; measure with the same profile, or import under another name")


def _describe(prof: dict[str, Any]) -> str:
    return f"{prof['name']} ({prof.get('threads', 0) or 'all'} threads, batches {prof.get('batch_sizes')})"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def import_results(root: Path, results_file: Path, device: str) -> dict[str, Any]:
    """File a ``bench.py --json`` document under ``device_results/<device>.json``; what was filed.

    Checks (each a one-line DeployError, nothing written): the file is JSON of the
    device-results format with every field; its bundle is one of ``bundles/*/bundle.json``
    with the same run, and each measured model file has that manifest's sha256; the
    device name is valid; results already filed for the device come from the same CPU
    and first profile. The entry of the bundle is replaced when it was filed before.
    """
    root = Path(root)
    target = device_file(root, device)
    what = str(results_file)
    try:
        text = Path(results_file).read_text(encoding="utf-8")
    except OSError as err:
        raise DeployError(f"cannot read {results_file}: {err.strerror or err}") from None
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise DeployError(f"{what} is not JSON ({err}); pass the file bench.py --json wrote") from None
    validate_results(doc, what)
    check_against_bundle(doc, bundle_manifests(root), root, what)
    filed = read_device_file(target) if target.exists() else {"format": DEVICE_FORMAT, "device": device,
                                                              "bundles": {}}
    _check_same_device(doc, filed, target, what)
    replaced = doc["bundle"] in filed["bundles"]
    filed["bundles"][doc["bundle"]] = {"imported_at": _now(), "results": doc}
    atomic_write_json(target, filed)
    variants = sum(len(v) for v in doc["results"].values())
    return {"device": device, "file": str(target), "bundle": doc["bundle"], "replaced": replaced,
            "runtimes": sorted(doc["results"]), "variants": variants, "profile": measured_profile(doc)["name"],
            "bundles": sorted(filed["bundles"])}


def list_devices(root: Path) -> list[dict[str, Any]]:
    """One summary per filed device: name, its bundles, CPU, first profile and the latest import date."""
    out = []
    for path in sorted((Path(root) / DEVICE_RESULTS).glob("*.json")):
        doc = read_device_file(path)
        entries = doc["bundles"]
        first = entries[min(entries)]["results"] if entries else None
        out.append({"device": doc["device"], "file": str(path), "bundles": sorted(entries),
                    "cpu": first["device"]["cpu"] if first else None,
                    "profile": measured_profile(first)["name"] if first else None,
                    "imported_at": max((e["imported_at"] for e in entries.values()), default=None)})
    return out


def _current(entry: dict[str, Any], manifests: dict[str, tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``runtime/variant`` -> result of a filed bundle whose file still has the workspace bundle's sha256."""
    doc = entry["results"]
    files = _manifest_files(manifests[doc["bundle"]][1]) if doc["bundle"] in manifests else {}
    return {f"{runtime}/{variant}": res for runtime, per_variant in doc["results"].items()
            for variant, res in per_variant.items() if files.get(res["file"]) == res["sha256"]}


def device_profiles(root: Path, budgets: dict[str, float], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report profile per filed device, and each row's latency on it (``row["latency"][NAME]``).

    A profile is ``{"name", "device": True, "threads", "batch_sizes", "latency_budget_ms",
    "cpu", "measured_profile", "stale_bundles"}``: the device's figures are those of its
    first measured profile (:func:`measured_profile`), so the report's Pareto front and
    budget pick treat it like any profile. A row gets the :func:`headline` of the
    device's result for its bundle, runtime and precision, or None when the device did
    not measure it, or measured files the workspace's bundle no longer holds (a
    retrained or re-exported model: the bundle is then listed in ``stale_bundles``).
    A budget for a device never imported, or a device named like a benchmark profile,
    is a DeployError.
    """
    folder = Path(root) / DEVICE_RESULTS
    devices = {p.stem: read_device_file(p) for p in sorted(folder.glob("*.json"))}
    missing = sorted(set(budgets) - set(devices))
    if missing:
        raise DeployError(f"benchmark.device_budgets names device(s) {', '.join(missing)} with no results under "
                          f"{folder}/: import them (kdpipe device-results import results.json --device "
                          f"{missing[0]}) or remove the budget")
    profile_names = {name for r in rows for name in (r.get("latency") or {})}
    clash = sorted(profile_names & set(devices))
    if clash:
        raise DeployError(f"device {clash[0]!r} ({folder / clash[0]}.json) has the name of a benchmark profile; "
                          f"import its results under another --device name")
    manifests = bundle_manifests(root) if devices else {}
    profiles = []
    for name, doc in devices.items():
        entries = doc["bundles"]
        if not entries:
            continue
        first = entries[min(entries)]["results"]
        prof = measured_profile(first, str(folder / f"{name}.json"))
        current = {b: _current(e, manifests) for b, e in entries.items()}
        stale = sorted(b for b, e in entries.items()
                       if len(current[b]) < sum(len(v) for v in e["results"]["results"].values()))
        if stale:
            log.warning("device %s: results of %s are of model files the workspace's bundles no longer hold "
                        "(re-measure them on the device)", name, ", ".join(stale))
        for row in rows:
            entry = entries.get(row.get("bundle"))
            res = None
            if entry is not None and entry["results"]["run"] == row.get("run"):
                res = current[row["bundle"]].get(f"{row.get('runtime', 'onnxruntime')}/{row.get('precision')}")
            row.setdefault("latency", {})[name] = headline(res, {"name": prof["name"]}) if res else None
        profiles.append({"name": name, "device": True, "threads": int(prof.get("threads", 0)),
                         "batch_sizes": list(prof.get("batch_sizes") or [1]),
                         "latency_budget_ms": budgets.get(name), "cpu": first["device"]["cpu"],
                         "measured_profile": prof["name"], "stale_bundles": stale})
    return profiles
