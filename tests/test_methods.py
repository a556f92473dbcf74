"""Every offline method end to end on tiny data: frozen teacher, plain deployed student, setup errors, resume.

The runs go through ``pipeline.runs.train`` (phases, the one loop, finalize, the model
file) with a tinynet pair on synthetic 8x8 data for two epochs. Torch runs on one
thread here: the tiny convolutions are faster that way on a shared 2-core machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import runs
from pipeline.config.training import ScheduleConfig, TrainConfig
from pipeline.distill import MethodContext, MethodSetupError, build_method
from pipeline.distill.registry import load_methods
from pipeline.engine.checkpoint import load_model_file, load_torch, state_digest
from pipeline.engine.loop import RunSpec, fit
from pipeline.models import build
from pipeline.params import METHODS, load_params, parse_params
from pipeline.runs import RunId
from tests.conftest import REPO, fit_until_crash, tiny_params

OFFLINE = ("kd", "fitnets", "at", "ab", "rkd", "crd", "dkd", "reviewkd", "sskd", "rco", "eskd")

# Short phases and small banks so every method runs in about a second.
FAST = {"ab": {"init_epochs": 1}, "sskd": {"head_epochs": 1}, "crd": {"nce_k": 64},
        "rco": {"num_anchors": 2, "route_span": 0.5}, "eskd": {"teacher_epoch": 1, "stop_epoch": 1}}


def _params(**distill: dict):
    return parse_params(tiny_params(distill={"methods": ["kd"], **FAST, **distill}))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny convolutions run faster on one thread on a shared 2-core machine."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder holding a trained tiny teacher (two epochs, a route checkpoint after each)."""
    root = tmp_path_factory.mktemp("methods")
    runs.train(_params(), RunId("teacher"), root)
    assert sorted(p.name for p in (root / "runs/teacher/route").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    return root


def test_every_offline_method_is_registered_and_configurable():
    specs = load_methods()
    assert set(OFFLINE) <= set(specs) and set(OFFLINE) <= set(METHODS)
    for name in OFFLINE:
        assert specs[name].offline
        assert specs[name].cls.__doc__, f"{name} has no docstring"
        assert isinstance(getattr(parse_params({}).distill, name), specs[name].params)


@pytest.mark.parametrize("method", OFFLINE)
def test_method_trains_with_frozen_teacher_and_deploys_the_plain_student(method: str, workspace: Path, monkeypatch):
    used: list[torch.nn.Module] = []
    original = runs.load_teacher

    def spy(root, data):
        model = original(root, data)
        used.append(model)
        return model

    monkeypatch.setattr(runs, "load_teacher", spy)
    params = _params()
    out = runs.train(params, RunId("distill", student="tinynet_s", method=method), workspace)

    # the teacher object the run used is bit-identical to the teacher file: never updated, BN stats included
    file_state = load_torch(workspace / "runs/teacher/model.pt")["state_dict"]
    assert len(used) == 1
    assert state_digest(used[0].state_dict()) == state_digest(file_state)
    assert not used[0].training and not any(p.requires_grad for p in used[0].parameters())

    # the deployed network is exactly the student architecture: no regressor, head, bank or connector
    model, info = load_model_file(out / "model.pt")
    assert info["arch"] == "tinynet_s" and info["method"] == method
    assert list(model.state_dict()) == list(build("tinynet_s", 4, 3, 8).state_dict())

    record = json.loads((out / "train.json").read_text())
    assert record["epochs"] == 2
    assert all(math.isfinite(v) for v in record["final"].values())
    # the finished state is kept, marked finished, until DVC records the outs (pipeline.run_state)
    assert (workspace / ".kdpipe/state" / method / "tinynet_s" / "finished.json").is_file()


@pytest.mark.parametrize("method", OFFLINE)
def test_deployable_is_the_student_module(method: str, workspace: Path):
    data_ctx = MethodContext(student_arch="tinynet_s", num_classes=4, in_channels=3, image_size=8, num_train=100,
                             epochs=2, teacher_arch="tinynet_m", teacher_dir=workspace / "runs/teacher")
    student, teacher = build("tinynet_s", 4, 3, 8), build("tinynet_m", 4, 3, 8)
    task = build_method(method, student, teacher, getattr(_params().distill, method), data_ctx)
    assert task.deployable() is student
    assert set(task.deployable().state_dict()) == set(build("tinynet_s", 4, 3, 8).state_dict())
    trainable = {id(p) for p in task.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher.") for k in task.trainable_state_dict())
    # buffers summed over DDP ranks each epoch exist and are trained state (checkpointed, not frozen)
    assert set(task.rank_summed_buffers()) <= set(dict(task.named_buffers())) & set(task.trainable_state_dict())


@pytest.mark.parametrize("method", ["fitnets", "ab"])
def test_incompatible_pair_fails_at_start_naming_method_and_models(method: str, workspace: Path):
    # mobilenetv2 at 8x8 has 1x1 and 2x2 deep maps: nothing to regress onto tinynet_m's 4x4 / 8x8 stages
    params = parse_params(tiny_params(students={"mobilenetv2": {}}, distill={"methods": [method], **FAST}))
    with pytest.raises(MethodSetupError) as exc:
        runs.train(params, RunId("distill", student="mobilenetv2", method=method), workspace)
    msg = str(exc.value)
    assert repr(method) in msg and "mobilenetv2" in msg and "tinynet_m" in msg
    assert "stage" in msg
    assert not (workspace / "runs" / method / "mobilenetv2").exists()
    assert not (workspace / ".kdpipe/state" / method / "mobilenetv2" / "main" / "last.pt").exists()


def test_route_methods_fail_at_start_without_usable_route(workspace: Path, tmp_path: Path):
    ctx = MethodContext(student_arch="tinynet_s", num_classes=4, in_channels=3, image_size=8, num_train=100,
                        epochs=2, teacher_arch="tinynet_m", teacher_dir=tmp_path / "no_teacher")
    for method in ("rco", "eskd"):
        with pytest.raises(MethodSetupError, match=f"'{method}'.*tinynet_m.*tinynet_s.*route"):
            build_method(method, build("tinynet_s", 4, 3, 8), build("tinynet_m", 4, 3, 8),
                         getattr(_params().distill, method), ctx)
    ctx = MethodContext(**{**ctx.__dict__, "teacher_dir": workspace / "runs/teacher"})
    cfg = _params(eskd={"teacher_epoch": 7}).distill.eskd
    with pytest.raises(MethodSetupError, match=r"teacher_epoch=7.*available teacher epochs: \[1, 2\]"):
        build_method("eskd", build("tinynet_s", 4, 3, 8), build("tinynet_m", 4, 3, 8), cfg, ctx)


def test_stage_pairing_and_anchor_choice_helpers():
    from pipeline.distill.offline.common import equal_interval_epochs, paired_stages

    assert paired_stages(3, 3, 4) == [(0, 0), (1, 1), (2, 2)]  # ResNet / WRN pairs: every stage
    assert paired_stages(5, 5, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]  # VGG: blocks 1-4, as the references
    assert paired_stages(4, 5, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # MobileNetV2 vs VGG: deepest aligned
    assert equal_interval_epochs(list(range(20, 241, 20)), 4) == [60, 120, 180, 240]  # the CIFAR recipes
    assert equal_interval_epochs([5, 10, 15, 20, 25, 30], 4) == [10, 15, 25, 30]  # the embedded default
    assert equal_interval_epochs([1, 2], 4) == [1, 2]  # too few checkpoints: no repeats


# -- schedules inside methods -----------------------------------------------------------------------------


def _route_ctx(root: Path, epochs: int) -> MethodContext:
    return MethodContext(student_arch="tinynet_s", num_classes=4, in_channels=3, image_size=8, num_train=100,
                         epochs=epochs, teacher_arch="tinynet_m", teacher_dir=root / "runs/teacher")


def test_rco_equal_strategy_switches_on_epochs(workspace: Path):
    cfg = _params(rco={"num_anchors": 2, "route_span": 0.5}).distill.rco
    task = build_method("rco", build("tinynet_s", 4, 3, 8), build("tinynet_m", 4, 3, 8), cfg, _route_ctx(workspace, 8))
    seen = []
    for epoch in range(8):
        task.on_epoch_start(epoch, 8)
        seen.append(int(task.current))
    assert task.anchor_epochs == [1, 2]
    assert seen == [0, 0, 0, 0, 1, 1, 1, 1]
    assert task.finalize([])["anchor_started_at_student_epoch"] == [1, 5]


def test_dkd_and_reviewkd_ramps_depend_on_the_epoch_only(workspace: Path):
    ctx = _route_ctx(workspace, 30)
    p = _params().distill
    for method in ("dkd", "reviewkd"):
        task = build_method(method, build("tinynet_s", 4, 3, 8), build("tinynet_m", 4, 3, 8), getattr(p, method), ctx)
        factors = []
        for epoch in (0, 9, 19, 25):
            task.on_epoch_start(epoch, 30)
            factors.append(task.factor)
        assert factors == [1 / 20, 10 / 20, 1.0, 1.0]


def test_eskd_stops_the_kd_term_and_the_teacher_forward(workspace: Path):
    cfg = _params(eskd={"teacher_epoch": 1, "stop_epoch": 1}).distill.eskd
    teacher = build("tinynet_m", 4, 3, 8)
    task = build_method("eskd", build("tinynet_s", 4, 3, 8), teacher, cfg, _route_ctx(workspace, 2))
    assert task.teacher is not teacher  # the early checkpoint, not the converged teacher
    route = load_torch(workspace / "runs/teacher/route/epoch_0001.pt")["state_dict"]
    assert state_digest(task.teacher.state_dict()) == state_digest(route)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    task.train()
    task.on_epoch_start(0, 2)
    _, terms = task(x, y, torch.arange(8))
    assert terms["kd"].item() > 0
    task.on_epoch_start(1, 2)
    calls = []
    task.teacher.register_forward_hook(lambda *a: calls.append(1))
    _, terms = task(x, y, torch.arange(8))
    assert terms["kd"].item() == 0 and not calls


@pytest.mark.parametrize("method,cfg", [("rco", {"strategy": "greedy", "greedy_threshold": 100.0, "route_span": 1.0}),
                                        ("crd", {})])
def test_method_state_survives_resume(method: str, cfg: dict, workspace: Path, tmp_path: Path):
    """A run killed after epoch 1 resumes to the weights, anchors and memory bank of an uninterrupted run."""
    params = _params(**{method: {**FAST.get(method, {}), **cfg}})
    from pipeline.data import build_data

    data = build_data(params.data, params.seed)
    ctx = MethodContext(student_arch="tinynet_s", num_classes=4, in_channels=3, image_size=8,
                        num_train=len(data.train), epochs=3, teacher_arch="tinynet_m",
                        teacher_dir=workspace / "runs/teacher")
    train_cfg = TrainConfig(epochs=3, batch_size=32, schedule=ScheduleConfig(name="cosine"))

    def make():
        torch.manual_seed(0)
        teacher, _ = load_model_file(workspace / "runs/teacher/model.pt")
        return build_method(method, build("tinynet_s", 4, 3, 8), teacher, getattr(params.distill, method), ctx)

    full = make()
    fit(full, data.train, data.val, train_cfg, 0, RunSpec("full", tmp_path / "full", "fp"))

    fit_until_crash(0, make(), data.train, data.val, train_cfg, 0, RunSpec("killed", tmp_path / "killed", "fp"))
    resumed = make()
    result = fit(resumed, data.train, data.val, train_cfg, 0, RunSpec("killed", tmp_path / "killed", "fp"))
    assert result.resumed_from == 1
    assert state_digest(resumed.trainable_state_dict()) == state_digest(full.trainable_state_dict())
    if method == "rco":
        assert full.finalize([]) == resumed.finalize([])
        assert full.finalize([])["anchor_started_at_student_epoch"] == [1, 2]  # the lax threshold moves on at once


# -- recipes -------------------------------------------------------------------------------------------------

RECIPES = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", 0.05),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2", 0.05),
    "resnet56-resnet20": ("resnet56", "resnet20", 0.05),
    "vgg13-vgg8": ("vgg13", "vgg8", 0.05),
    "resnet32x4-shufflenetv2": ("resnet32x4", "shufflenetv2", 0.01),
    "vgg13-mobilenetv2": ("vgg13", "mobilenetv2", 0.01),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_valid_and_holds_the_paper_protocol(name: str):
    path = REPO / "recipes" / f"{name}.yaml"
    p = load_params(path)
    teacher, student, lr = RECIPES[name]
    assert p.data.name == "cifar100"
    assert p.teacher.model == teacher and list(p.students) == [student]
    assert set(p.distill.methods) == set(OFFLINE)
    for cfg in (p.teacher_train(), p.student_train(student)):
        assert cfg.epochs == 240 and cfg.batch_size == 64
        assert cfg.schedule.name == "multistep" and cfg.schedule.milestones == [150, 180, 210]
        assert cfg.schedule.gamma == 0.1 and cfg.optimizer.weight_decay == 5e-4 and cfg.optimizer.momentum == 0.9
    assert p.teacher_train().optimizer.lr == 0.05
    assert p.student_train(student).optimizer.lr == lr
    # every route epoch the recipe's RCO and ESKD settings ask for exists
    assert 240 % p.teacher.route_every == 0
    if p.distill.eskd.teacher_epoch is not None:
        assert p.distill.eskd.teacher_epoch % p.teacher.route_every == 0
    # DVC tracks params by key: the recipe spells out every key of the schema (recipes/make_recipes.py)
    raw = yaml.safe_load(path.read_text())
    assert _keys(raw) == _keys(p.model_dump(mode="json")), "regenerate with: python recipes/make_recipes.py"


def test_the_fashion_mnist_recipe_runs_every_method_with_the_phases_in_the_papers_share():
    path = REPO / "recipes" / "fashion_mnist.yaml"
    p = load_params(path)
    assert p.data.name == "fashion_mnist" and p.data.train_fraction == 0.1 and p.data.val_fraction == 0.05
    assert set(p.distill.methods) == set(OFFLINE) and set(p.online.methods) == {"dml", "one", "okddip", "ekd"}
    assert p.student_train("tinynet_xs").epochs == 10 and p.teacher_train().epochs == 15
    # 30, 60 and 20 of the papers' 240 epochs, over 10; CRD: 16384 of 50,000 images, over 5,700
    assert (p.distill.ab.init_epochs, p.distill.sskd.head_epochs, p.distill.dkd.warmup_epochs,
            p.distill.reviewkd.warmup_epochs) == (1, 2, 1, 1)
    assert p.distill.crd.nce_k == round(16384 * 5700 / 50000)
    edge = next(q for q in p.benchmark.profiles if q.name == "edge-1core")
    assert edge.threads == 1 and edge.size_budget_kib == 256
    raw = yaml.safe_load(path.read_text())
    assert _keys(raw) == _keys(p.model_dump(mode="json")), "regenerate with: python recipes/make_recipes.py"


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if v is None:
            continue  # unset optional knobs need not be spelled out
        out.add(prefix + str(k))
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out
