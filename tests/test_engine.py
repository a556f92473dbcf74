"""The training engine: atomic writes, safe checkpoints, determinism, resume, NaN handling."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from pipeline.config.training import ScheduleConfig, TrainConfig
from pipeline.data import build_data
from pipeline.distill import Vanilla
from pipeline.engine.atomic import atomic_write, atomic_write_text
from pipeline.engine.checkpoint import CheckpointError, load_model_file, load_torch, save_model_file, state_digest
from pipeline.engine.loop import NonFiniteLossError, RunSpec, fit
from pipeline.engine.optim import Finetune, build_optimizer, build_scheduler, lr_factor
from pipeline.models import build
from pipeline.params import parse_params
from tests.conftest import fit_until_crash, tiny_params


@pytest.fixture(scope="module")
def data():
    p = parse_params(tiny_params())
    return build_data(p.data, p.seed)


def _task(data, seed: int = 0) -> Vanilla:
    torch.manual_seed(seed)
    return Vanilla(build("tinynet_s", data.num_classes, data.in_channels, data.image_size))


def _cfg(epochs: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, schedule=ScheduleConfig(name="cosine"))


def _spec(tmp: Path, name: str = "run", route_every: int | None = None) -> RunSpec:
    return RunSpec(label=name, state_dir=tmp / name, fingerprint="fp-1", route_every=route_every)


def _digest(task: torch.nn.Module) -> str:
    return state_digest(task.state_dict())


# -- atomic writes and checkpoints ------------------------------------------------------------

def test_atomic_write_keeps_previous_file_on_disk_full(tmp_path: Path):
    target = atomic_write_text(tmp_path / "model.pt", "good")

    def full_disk(fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as exc:
        atomic_write(target, full_disk)
    assert exc.value.errno == errno.ENOSPC
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_write_keeps_mode_only_when_asked(tmp_path: Path):
    import stat

    f = tmp_path / "params.yaml"
    f.write_text("seed: 0\n")
    f.chmod(0o640)
    atomic_write_text(f, "seed: 1\n", keep_mode=True)  # a file people own (params.yaml, DVC's rwlock)
    assert f.read_text() == "seed: 1\n" and stat.S_IMODE(f.stat().st_mode) == 0o640
    atomic_write_text(f, "seed: 2\n")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_model_file_roundtrip_and_mismatch_errors(tmp_path: Path, data):
    model = build("tinynet_s", 4, 1, 8)
    f = save_model_file(tmp_path / "m.pt", model, "tinynet_s", 4, 1, 8, {"role": "baseline"})
    again, info = load_model_file(f)
    assert info["arch"] == "tinynet_s" and info["role"] == "baseline"
    assert _digest(again) == _digest(model.eval())
    with pytest.raises(CheckpointError, match="m.pt.*tinynet_m"):
        load_model_file(f, expect_arch="tinynet_m")
    with pytest.raises(CheckpointError, match="m.pt.*10 classes|4 classes"):
        load_model_file(f, expect_classes=10)


def test_checkpoint_of_another_architecture_names_the_file(tmp_path: Path):
    other = build("tinynet_m", 4, 1, 8)
    f = tmp_path / "liar.pt"
    torch.save({"format": "kdpipe-model/1", "arch": "tinynet_s", "num_classes": 4, "in_channels": 1,
                "image_size": 8, "state_dict": other.state_dict(), "meta": {}}, f)
    with pytest.raises(CheckpointError, match="liar.pt does not fit tinynet_s"):
        load_model_file(f)


def test_truncated_checkpoint_names_the_file(tmp_path: Path):
    f = save_model_file(tmp_path / "t.pt", build("tinynet_s", 4, 1, 8), "tinynet_s", 4, 1, 8)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"t\.pt.*truncated"):
        load_model_file(f)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"format": "kdpipe-model/1", "state_dict": {}, "x": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_torch(f)
    assert not marker.exists()


# -- schedules --------------------------------------------------------------------------------

def test_lr_schedules():
    ms = ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.1)
    assert [round(lr_factor(ms, 6, e), 6) for e in range(6)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = ScheduleConfig(name="cosine", warmup_epochs=2)
    f = [lr_factor(cos, 10, e) for e in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(f[2:], f[3:], strict=False))


# -- the loop -----------------------------------------------------------------------------------

def test_training_learns_and_is_deterministic(tmp_path: Path, data):
    a, b = _task(data), _task(data)
    ra = fit(a, data.train, data.val, _cfg(3), 0, _spec(tmp_path, "a"))
    rb = fit(b, data.train, data.val, _cfg(3), 0, _spec(tmp_path, "b"))
    assert _digest(a) == _digest(b)
    assert ra.history == rb.history
    assert ra.final["val/top1"] > 100.0 / data.num_classes + 20  # well above chance
    assert (tmp_path / "a" / "live" / "metrics.json").is_file()


def test_interrupted_run_resumes_to_identical_weights(tmp_path: Path, data):
    full = _task(data)
    fit(full, data.train, data.val, _cfg(4), 0, _spec(tmp_path, "full", route_every=2))

    fit_until_crash(1, _task(data), data.train, data.val, _cfg(4), 0, _spec(tmp_path, "cut", route_every=2))
    assert load_torch(tmp_path / "cut" / "last.pt")["epoch"] == 2

    resumed = _task(data, seed=123)  # different init: everything must come from the checkpoint
    res = fit(resumed, data.train, data.val, _cfg(4), 0, _spec(tmp_path, "cut", route_every=2))
    assert res.resumed_from == 2
    assert _digest(resumed) == _digest(full)
    routes = sorted(p.name for p in (tmp_path / "cut" / "route").iterdir())
    assert routes == ["epoch_0002.pt", "epoch_0004.pt"]
    tsv = (tmp_path / "cut" / "live" / "plots" / "metrics" / "val" / "top1.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 4  # header + one row per epoch, none duplicated by the resume


def test_changed_fingerprint_starts_afresh(tmp_path: Path, data):
    fit(_task(data), data.train, data.val, _cfg(2), 0, _spec(tmp_path, "r"))
    spec = _spec(tmp_path, "r")
    spec.fingerprint = "fp-2"
    res = fit(_task(data), data.train, data.val, _cfg(2), 0, spec)
    assert res.resumed_from == 0


class _ExplodingTask(Vanilla):
    def forward(self, images, labels, indices):
        logits, terms = super().forward(images, labels, indices)
        if self.epoch == 1:
            terms["ce"] = terms["ce"] * float("nan")
        return logits, terms


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good(tmp_path: Path, data):
    torch.manual_seed(0)
    task = _ExplodingTask(build("tinynet_s", data.num_classes, data.in_channels, data.image_size))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1"):
        fit(task, data.train, data.val, _cfg(3), 0, _spec(tmp_path, "nan"))
    assert load_torch(tmp_path / "nan" / "last.pt")["epoch"] == 1


def test_atomic_writes_clear_what_killed_writers_left(tmp_path: Path):
    import os
    import subprocess

    from pipeline.engine.atomic import atomic_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getppid()  # a live process: its temp files are still being written
    (tmp_path / f".a.json.kdtmp-{dead.pid}-x1.tmp").write_text("half")
    (tmp_path / f".a.json.kdtmp-{live}-x2.tmp").write_text("in progress")
    atomic_write_text(tmp_path / "a.json", "{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".a.json.kdtmp-{live}-x2.tmp", "a.json"]
    # killed between the two renames of a folder swap: the previous folder comes back, the new one goes
    (tmp_path / f".d.kdtmp-{dead.pid}-old").mkdir()
    (tmp_path / f".d.kdtmp-{dead.pid}-old" / "v").write_text("previous")
    (tmp_path / f".d.kdtmp-{dead.pid}-y.tmp").mkdir()
    with atomic_dir(tmp_path / "other") as d:
        (d / "v").write_text("x")
    assert not (tmp_path / "d").exists()  # only the siblings of the path being written are touched
    with atomic_dir(tmp_path / "d") as d:
        assert (tmp_path / "d" / "v").read_text() == "previous"
        (d / "v").write_text("new")
    assert (tmp_path / "d" / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if ".d." in p.name) == []


def test_finetune_freezes_then_scales_the_pretrained_group_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))  # [0] pretrained, [1] a new head
    cfg = TrainConfig(epochs=4, optimizer={"lr": 0.1}, schedule=ScheduleConfig(name="constant"))
    tune = Finetune(pretrained=tuple(model[0].parameters()), lr_scale=0.25, freeze_epochs=2)
    opt = build_optimizer(model.parameters(), cfg, tune)
    sched = build_scheduler(opt, cfg, tune)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # the head first, then the backbone
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        frozen = torch.equal(model[0].weight, before)
        assert frozen == (len(seen) <= 2), len(seen)  # not updated while frozen, updated after
        sched.step()
    assert seen == [[0.1, 0.0], [0.1, 0.0], [0.1, 0.025], [0.1, 0.025]]
