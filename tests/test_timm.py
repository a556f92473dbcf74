"""timm models as teachers and students: every method one step, pretrained weights, export and INT8.

The models are small timm edge families at 32x32 (ResNet-10-T, MobileNetV3-Small 0.5,
RepViT-M0.9, MobileOne-S0, FastViT-T8, GhostNet 0.5, EfficientNet-Lite0), built from
scratch: nothing is downloaded.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.distill import MethodContext, MethodSetupError, build_method
from pipeline.engine.checkpoint import save_torch
from pipeline.models import FeatureNet, build, feature_shapes, model_info
from pipeline.models.registry import UnknownModelError
from pipeline.models.weights import WeightsError
from pipeline.params import parse_params
from tests.conftest import tiny_params

timm = pytest.importorskip("timm")

OFFLINE = ("kd", "fitnets", "at", "ab", "rkd", "crd", "dkd", "reviewkd", "sskd", "rco", "eskd")
FAST = {"ab": {"init_epochs": 1}, "sskd": {"head_epochs": 1}, "crd": {"nce_k": 16},
        "rco": {"num_anchors": 2, "route_span": 0.5}, "eskd": {"teacher_epoch": 1, "stop_epoch": 1}}
TEACHER, STUDENT = "timm/resnet10t", "timm/mobilenetv3_small_050"
# AB compares pre-activation maps on both sides, ReviewKD on the teacher's: families whose stages end linearly
PREACT_PAIR = ("timm/repvit_m0_9", "timm/ghostnet_050")
CLASSES, CHANNELS, SIZE = 10, 1, 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny convolutions run faster on one thread on a shared 2-core machine."""


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, CHANNELS, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
            torch.arange(n))


def _calibrate_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Batch-norm statistics from one batch, so an untrained network's logits have a trained network's scale."""
    saved = {}
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            saved[m], m.momentum = m.momentum, 1.0
    model.train()
    with torch.no_grad():
        model(_batch(64, seed)[0])
    for m, momentum in saved.items():
        m.momentum = momentum
    return model.eval()


def _route_dir(tmp: Path, teacher: torch.nn.Module, epochs: tuple[int, ...] = (1, 2)) -> Path:
    """A teacher folder whose route checkpoints (at ``epochs``) all hold ``teacher``'s weights (hard links)."""
    first = tmp / "route" / f"epoch_{epochs[0]:04d}.pt"
    save_torch({"format": "kdpipe-route/1", "epoch": epochs[0], "val_top1": 50.0,
                "state_dict": {k: v.clone() for k, v in teacher.state_dict().items()}}, first)
    for epoch in epochs[1:]:
        (tmp / "route" / f"epoch_{epoch:04d}.pt").hardlink_to(first)
    return tmp


def _step(task) -> dict[str, float]:
    """One optimizer step of ``task`` (each of its phases first); the named loss terms of the main step."""
    images, labels, idx = _batch()
    for phase in [*task.phases(), None]:
        t = task if phase is None else phase.task
        t.train()
        t.on_epoch_start(0, 2)
        opt = torch.optim.SGD([p for p in t.trainable_parameters()], lr=0.01)
        logits, terms = t(images, labels, idx)
        assert logits.shape == (len(labels), CLASSES)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: float(v.detach()) for k, v in terms.items()}


@pytest.mark.parametrize("method", OFFLINE)
def test_every_offline_method_distils_a_timm_teacher_into_a_timm_student(method: str, tmp_path: Path):
    t_arch, s_arch = PREACT_PAIR if method in ("ab", "reviewkd") else (TEACHER, STUDENT)
    torch.manual_seed(0)
    teacher = build(t_arch, CLASSES, CHANNELS, SIZE)
    student = build(s_arch, CLASSES, CHANNELS, SIZE)
    ctx = MethodContext(student_arch=s_arch, num_classes=CLASSES, in_channels=CHANNELS, image_size=SIZE,
                        num_train=64, epochs=2, teacher_arch=t_arch, teacher_dir=_route_dir(tmp_path, teacher))
    cfg = getattr(parse_params(tiny_params(distill={"methods": [method], **FAST})).distill, method)
    task = build_method(method, student, teacher, cfg, ctx)
    terms = _step(task)
    assert terms and all(math.isfinite(v) for v in terms.values()), terms
    assert task.deployable() is student  # the plain timm student is what deploys


@pytest.mark.parametrize("method", ["dml", "ekd"])
def test_online_methods_train_timm_networks(method: str):
    ctx = MethodContext(student_arch=STUDENT, num_classes=CLASSES, in_channels=CHANNELS, image_size=SIZE,
                        num_train=64, epochs=2, teacher_arch=TEACHER)
    cfg = getattr(parse_params(tiny_params(online={"methods": [method]})).online, method)
    task = build_method(method, build(STUDENT, CLASSES, CHANNELS, SIZE), None, cfg, ctx)
    terms = _step(task)
    assert terms and all(math.isfinite(v) for v in terms.values()), terms


@pytest.mark.parametrize("method", ["one", "okddip"])
def test_branching_online_methods_refuse_timm_models_at_load(method: str):
    ctx = MethodContext(student_arch=STUDENT, num_classes=CLASSES, in_channels=CHANNELS, image_size=SIZE,
                        num_train=64, epochs=2)
    cfg = getattr(parse_params(tiny_params(online={"methods": [method]})).online, method)
    with pytest.raises(MethodSetupError, match=f"{method}: timm/mobilenetv3_small_050 cannot be split"):
        build_method(method, build(STUDENT, CLASSES, CHANNELS, SIZE), None, cfg, ctx)


def test_methods_that_need_pre_activations_fail_at_load_naming_model_and_stage():
    ctx = MethodContext(student_arch=STUDENT, num_classes=CLASSES, in_channels=CHANNELS, image_size=SIZE,
                        num_train=64, epochs=2, teacher_arch=TEACHER)
    teacher, student = build(TEACHER, CLASSES, CHANNELS, SIZE), build(STUDENT, CLASSES, CHANNELS, SIZE)
    cfg = parse_params(tiny_params()).distill
    with pytest.raises(MethodSetupError, match=r"method 'ab' .* pre-activation maps at stages .*"
                                               r"timm/mobilenetv3_small_050 ends stage"):
        build_method("ab", student, teacher, cfg.ab, ctx)
    with pytest.raises(MethodSetupError, match=r"'reviewkd' .* teacher's pre-activation .* timm/resnet10t ends stages"):
        build_method("reviewkd", student, teacher, cfg.reviewkd, ctx)


def test_timm_features_come_from_timms_feature_api():
    net = build(STUDENT, CLASSES, CHANNELS, SIZE).eval()
    assert isinstance(net, FeatureNet)
    x = _batch()[0]
    with torch.no_grad():
        out = net.forward_features(x)
        direct = net.model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(out.logits, net(x))  # the classifier of the embedding is the model's forward
    assert [tuple(t.shape[1:]) for t in out.stages] == [tuple(t.shape[1:]) for t in direct]
    info = net.model.feature_info
    assert net.feature_info.channels == [f["num_chs"] for f in info]
    assert [s.reduction for s in net.feature_info.stages] == [f["reduction"] for f in info]
    assert out.embedding.shape == (len(x), net.feature_info.embedding_dim)
    # MobileNetV3's stem (BN + HardSwish) and its last ConvBnAct stage end in an activation; the IR stages do not
    assert net.feature_info.preact_missing == (0, 4)
    assert out.preact[0] is None and out.preact[1] is out.stages[1]
    shapes = feature_shapes(net, CHANNELS, SIZE)
    assert shapes["stages"][-1] == (288, 1, 1)


def test_unknown_timm_name_suggests_close_names_and_how_to_list():
    with pytest.raises(UnknownModelError, match=r"did you mean 'timm/mobilenetv3_small_050'.*kdpipe models --source timm"):
        build("timm/mobilenetv3_smal_050", CLASSES)
    with pytest.raises(Exception, match="unknown timm model 'timm/nonet'"):
        parse_params(tiny_params(students={"timm/nonet": {}}))
    assert model_info(STUDENT)["family"] == "timm"


def test_kdpipe_models_lists_timm_models_by_pattern():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "--source", "timm", "mobileone_s*"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert "timm/mobileone_s0" in out and "timm/mobileone_s4" in out
    assert not any(n.startswith("timm/resnet") for n in out)


def test_importing_the_registry_does_not_import_timm():
    code = "import sys, pipeline.models, pipeline.params; print('timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# ---------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_round_trip_keeps_the_backbone_and_makes_a_new_head(suffix: str, tmp_path: Path):
    torch.manual_seed(3)
    source = timm.create_model("mobilenetv3_small_050", num_classes=1000)  # RGB, ImageNet head
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    net = build(STUDENT, num_classes=7, in_channels=3, image_size=SIZE, weights=str(path))
    state = source.state_dict()
    own = net.model.state_dict()
    head = {"classifier.weight", "classifier.bias"}
    for key in own:
        if key not in head:
            assert torch.equal(own[key], state[key]), key
    assert own["classifier.weight"].shape == (7, 1024)  # new head for 7 classes
    assert net.pretrained_keys == {f"model.{k}" for k in own if k not in head}
    # grey input: the first convolution is timm's adaptation of the RGB one (summed over RGB)
    grey = build(STUDENT, num_classes=7, in_channels=1, image_size=SIZE, weights=str(path))
    torch.testing.assert_close(grey.model.conv_stem.weight, state["conv_stem.weight"].sum(dim=1, keepdim=True))


def test_teacher_weights_from_params_load_with_another_class_count(tmp_path: Path):
    from pipeline import runs
    from pipeline.run_id import RunId

    source = timm.create_model("resnet10t", num_classes=1000, in_chans=3)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    params = parse_params(tiny_params(teacher={"model": TEACHER, "weights": str(tmp_path / "resnet10t.pth"),
                                               "backbone_lr_scale": 0.1, "freeze_epochs": 1, "route_every": 1},
                                      data={"name": "synthetic", "synthetic_samples": 60, "synthetic_classes": 4,
                                            "synthetic_image_size": 32},
                                      train={"epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.05}}))
    out = runs.train(params, RunId("teacher"), tmp_path)
    from pipeline.engine.checkpoint import load_model_file

    trained, _ = load_model_file(out / "model.pt")
    after = trained.model.state_dict()
    # frozen for the first epoch, then at a tenth of the lr: the backbone moved, less than from scratch would
    assert after["fc.weight"].shape == (4, 512)
    assert not torch.equal(after["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])


def test_weights_errors_are_one_line_naming_path_and_keys(tmp_path: Path):
    with pytest.raises(WeightsError, match=r"not found .*nowhere\.pth"):
        build(STUDENT, CLASSES, weights=str(tmp_path / "nowhere.pth"))
    other = timm.create_model("mobilenetv3_small_100", num_classes=1000)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError) as err:
        build(STUDENT, CLASSES, weights=str(tmp_path / "other.pth"))
    msg = str(err.value)
    assert "\n" not in msg and "other.pth" in msg and "keys of another shape" in msg
    assert "blocks.0.0.conv_pw.weight (16, 16, 1, 1) vs (8, 16, 1, 1)" in msg
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(WeightsError, match=r"cannot read weights file .*junk\.safetensors"):
        build(STUDENT, CLASSES, weights=str(tmp_path / "junk.safetensors"))


def test_finetune_keys_need_weights_and_freeze_must_leave_epochs():
    from pipeline.config.base import ConfigError

    with pytest.raises(ConfigError, match="backbone_lr_scale=0.1 applies to pretrained weights, but weights is null"):
        parse_params(tiny_params(students={"tinynet_s": {"backbone_lr_scale": 0.1}}))
    with pytest.raises(ConfigError, match="teacher.freeze_epochs: 2 leaves no epoch to fine-tune"):
        parse_params(tiny_params(teacher={"model": "tinynet_m", "weights": "w.pth", "freeze_epochs": 2}))


@pytest.mark.parametrize("name", ["resnet32x4-timm_mobilenetv3_small_100", "resnet32x4-timm_repvit_m0_9"])
def test_timm_recipes_validate_and_every_method_they_list_sets_up_at_32x32(name: str, tmp_path: Path):
    import yaml

    from pipeline.params import load_params
    from tests.conftest import REPO
    from tests.test_methods import _keys

    path = REPO / "recipes" / f"{name}.yaml"
    p = load_params(path)
    assert "UNTESTED AT FULL LENGTH" in path.read_text()
    raw = yaml.safe_load(path.read_text())
    assert _keys(raw) == _keys(p.model_dump(mode="json")), "regenerate with: python recipes/make_recipes.py"
    (student,) = p.students
    assert student.startswith("timm/") and p.data.name == "cifar100" and p.student_train(student).epochs == 240
    teacher = build(p.teacher.model, 100, 3, 32)
    ctx = MethodContext(student_arch=student, num_classes=100, in_channels=3, image_size=32, num_train=49000,
                        epochs=240, teacher_arch=p.teacher.model,
                        teacher_dir=_route_dir(tmp_path, teacher, tuple(range(p.teacher.route_every, 241,
                                                                            p.teacher.route_every))))
    for method in p.distill.methods:  # setup checks every shape the method needs, before any training
        build_method(method, build(student, 100, 3, 32), teacher, getattr(p.distill, method), ctx)
