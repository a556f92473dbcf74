"""A finished run's state is kept until DVC records its outs, reused by a rerun, and pruned once recorded.

The hash DVC records for an out folder is computed here as DVC computes it; the first
test checks that against real ``dvc repro`` runs, so a DVC release that hashes folders
differently fails here (the state would then only be kept longer, never lost).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline.run_state import FINISHED, STATE_ROOT, dvc_dir_hash, finished_states, mark_finished, prune_recorded
from tests.conftest import REPO

WRITE_OUTS = ("import pathlib; o = pathlib.Path('out'); (o / 'x').mkdir(parents=True); "
              "(o / 'x' / 'h.bin').write_bytes(bytes(range(256)) * 3); (o / 'y.txt').write_text('yo'); "
              "(o / '.y.txt.kdtmp-99999-abc').write_text('a killed writer left this')")


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def _dvc(root: Path, *args: str) -> None:
    done = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _lock_md5(root: Path, stage: str) -> str:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]


def _finished(root: Path, run: str, outs: list[str]) -> Path:
    state = root / STATE_ROOT / run
    (state / "main").mkdir(parents=True)
    (state / "main" / "last.pt").write_bytes(b"state")
    mark_finished(state, [root / o for o in outs], root)
    return state


def test_folder_hash_is_the_one_dvc_records(tmp_path: Path):
    root = _repo(tmp_path)
    _dvc(root, "stage", "add", "-q", "-n", "s", "-o", "out", f'python -c "{WRITE_OUTS}"')
    _dvc(root, "repro", "-q")
    assert dvc_dir_hash(root / "out") == _lock_md5(root, "s")  # the .kdtmp temp is ignored, as .dvcignore says
    (root / "out" / "y.txt").write_text("changed")
    assert dvc_dir_hash(root / "out") != _lock_md5(root, "s")


def test_prune_removes_only_states_whose_outs_dvc_recorded_as_they_are(tmp_path: Path):
    root = _repo(tmp_path)
    _dvc(root, "stage", "add", "-q", "-n", "s", "-o", "out", f'python -c "{WRITE_OUTS}"')
    recorded = _finished(root, "teacher", ["out"])
    assert prune_recorded(root) == []  # DVC has not recorded the outs yet: a rerun may need the state
    assert recorded.exists()

    _dvc(root, "repro", "-q")
    changed = _finished(root, "kd/s", ["out2"])
    (root / "out2").mkdir()
    (root / "out2" / "a").write_text("not what any dvc.lock entry holds")
    unreadable = _finished(root, "dkd/s", ["out"])
    (unreadable / FINISHED).write_text("{not json")
    running = root / STATE_ROOT / "crd" / "s"  # a run under way has no marker
    (running / "main").mkdir(parents=True)

    assert prune_recorded(root) == ["teacher"]
    assert not recorded.exists() and changed.exists() and unreadable.exists() and running.exists()
    assert finished_states(root) == [unreadable, changed]


def test_a_finished_run_is_kept_then_rerun_without_training(tmp_path: Path, capsys):
    from pipeline.params import parse_params
    from pipeline.runs import RunId, train
    from tests.conftest import tiny_params

    params = parse_params(tiny_params())
    out = train(params, RunId("teacher"), tmp_path)
    first = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    state = tmp_path / STATE_ROOT / "teacher"
    marker = json.loads((state / FINISHED).read_text())
    assert marker == {"outs": ["live/teacher", "runs/teacher"]} and (state / "main" / "last.pt").is_file()
    capsys.readouterr()

    shutil.rmtree(out)  # as dvc repro does before it runs the stage again
    train(params, RunId("teacher"), tmp_path)
    err = capsys.readouterr().err
    assert "[teacher] resuming after epoch 2 " in err and "nothing left to train" in err
    assert "[teacher] epoch " not in err  # not one epoch trained again
    again = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert again == first
    assert prune_recorded(tmp_path) == []  # no dvc.lock here: nothing recorded, the state stays
