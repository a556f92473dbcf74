"""Tests of the model registry: reference parameter counts, the feature API, weights files."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from pipeline.models import (
    FeatureInfo,
    ModelOutput,
    StagedNet,
    UnknownModelError,
    available,
    build,
    count_parameters,
    feature_shapes,
    model_info,
    register_model,
)
from pipeline.models.torchvision_models import rgb_filters_to, wrap_torchvision
from pipeline.models.weights import WeightsError

# Parameter counts at num_classes=100, in_channels=3 of the CRD benchmark networks
# (HobbitLong/RepDistiller models/: resnet.py, wrn.py, vgg.py with batch norm,
# mobilenetv2.py mobile_half, ShuffleNetv1.py ShuffleV1, ShuffleNetv2.py ShuffleV2),
# counted on a re-typing of those definitions; they agree with the published tables
# (e.g. resnet56 0.86M, resnet32x4 7.43M, WRN-40-2 2.26M, vgg13 9.46M, ShuffleV2 1.36M).
ZOO_PARAMS_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}

# Tiny nets at num_classes=10 for 1-channel (digits) and 3-channel input.
TINY_PARAMS_10 = {
    ("tinynet_xs", 1): 4_782,
    ("tinynet_xs", 3): 4_854,
    ("tinynet_s", 1): 18_482,
    ("tinynet_s", 3): 18_626,
    ("tinynet_m", 1): 72_666,
    ("tinynet_m", 3): 72_954,
    ("tinynet_l", 1): 288_170,
    ("tinynet_l", 3): 288_746,
}

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
]

# How each stage's post output relates to its pre output: "relu" (post == relu(pre))
# or "same" (the stage ends without an activation: pre is post).
_SAME_ALL = {"mobilenetv2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"}


def _pre_post_rule(name: str, n_stages: int) -> list[str]:
    if name in _SAME_ALL:
        return ["same"] * n_stages
    if name.startswith("wrn_"):
        return ["same", "same", "relu"]
    return ["relu"] * n_stages


ALL_MODELS = available()
NUM_CLASSES = 7  # not 10 or 100, so nothing can be hard-coded to a dataset


def test_registry_lists_every_family() -> None:
    assert set(ZOO_PARAMS_100) | set(TORCHVISION) | {n for n, _ in TINY_PARAMS_10} == set(ALL_MODELS)
    assert available("torchvision") == sorted(TORCHVISION)
    assert available("tiny") == ["tinynet_l", "tinynet_m", "tinynet_s", "tinynet_xs"]
    assert set(available("cifar_resnet")) == {n for n in ZOO_PARAMS_100 if n.startswith("resnet")}


@pytest.mark.parametrize("name", sorted(ZOO_PARAMS_100))
def test_zoo_parameter_count_matches_reference(name: str) -> None:
    assert count_parameters(build(name, num_classes=100, in_channels=3)) == ZOO_PARAMS_100[name]


@pytest.mark.parametrize(("name", "in_channels"), sorted(TINY_PARAMS_10))
def test_tinynet_parameter_count(name: str, in_channels: int) -> None:
    model = build(name, num_classes=10, in_channels=in_channels, image_size=8)
    assert count_parameters(model) == TINY_PARAMS_10[(name, in_channels)]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_wrapper_computes_what_torchvision_computes(name: str) -> None:
    torch.manual_seed(0)
    tv = getattr(tvm, name)(weights=None, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tv(x)
        wrapped = wrap_torchvision(tv, name).eval()
        got = wrapped(x)
    assert count_parameters(wrapped) == count_parameters(tv)
    assert count_parameters(build(name, num_classes=100)) == count_parameters(tv)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("image_size", [8, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_api(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=NUM_CLASSES, in_channels=in_channels, image_size=image_size).eval()
    info = model.feature_info
    assert isinstance(model, StagedNet) and isinstance(info, FeatureInfo)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == NUM_CLASSES
    assert model.classifier.in_features == info.embedding_dim

    x = torch.randn(2, in_channels, image_size, image_size)
    with torch.no_grad():
        logits = model(x)
        out = model.forward_features(x)
    assert isinstance(out, ModelOutput)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.equal(logits, out.logits)
    assert out.embedding.shape == (2, info.embedding_dim)

    assert len(out.stages) == len(out.preact) == len(info.stages) >= 3
    assert [t.shape[1] for t in out.stages] == info.channels
    for i, (post, pre, rule) in enumerate(
        zip(out.stages, out.preact, _pre_post_rule(name, len(info.stages)), strict=True)
    ):
        assert post.shape == pre.shape, f"stage {i}"
        assert post.shape[-1] >= 1 and post.shape[-2] >= 1
        if rule == "same":
            assert pre is post, f"stage {i} has no final activation: pre must be post"
        else:
            assert torch.equal(F.relu(pre), post), f"stage {i}: post must be relu(pre)"
            assert not torch.equal(pre, post), f"stage {i}: pre should hold negative values"
    if image_size == 32:
        reductions = [image_size // t.shape[-1] for t in out.stages]
        assert reductions == [s.reduction for s in info.stages]

    # No in-place op of a later stage may have overwritten a returned feature.
    with torch.no_grad():
        for i in range(1, len(out.stages)):
            again, _ = model.stages[i](out.stages[i - 1].clone())
            assert torch.equal(again, out.stages[i]), f"stage {i - 1} output modified in place"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    # A matching parameter count does not prove every layer is used; this does.
    torch.manual_seed(0)
    model = build(name, num_classes=NUM_CLASSES, in_channels=1, image_size=8).train()
    out = model.forward_features(torch.randn(2, 1, 8, 8))
    (out.logits.sum() + sum(t.mean() for t in out.preact)).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_feature_shapes_helper() -> None:
    model = build("resnet8x4", num_classes=10, in_channels=3, image_size=32)
    shapes = feature_shapes(model, in_channels=3, image_size=32)
    assert shapes["stages"] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert shapes["preact"] == shapes["stages"]
    assert shapes["embedding"] == [(256,)]


def test_vgg_pools_follow_the_input_size() -> None:
    # 64x64 uses the pool before block 4 (as CRD does on Tiny-ImageNet) ...
    model = build("vgg8", num_classes=10, image_size=64).eval()
    assert [s.reduction for s in model.feature_info.stages] == [1, 2, 4, 8, 16]
    assert feature_shapes(model, 3, 64)["stages"][-1] == (512, 4, 4)
    # ... and below 8x8 the pools that would leave nothing become identities.
    tiny = build("vgg8", num_classes=10, in_channels=1, image_size=2).eval()
    assert [s.reduction for s in tiny.feature_info.stages] == [1, 2, 2, 2, 2]
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 2, 2)).shape == (2, 10)


# ---------------------------------------------------------------- registry


def test_unknown_model_error_lists_allowed_names() -> None:
    with pytest.raises(UnknownModelError) as err:
        build("resnet9000", num_classes=10)
    message = str(err.value)
    assert "resnet9000" in message
    for name in ALL_MODELS:
        assert name in message
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert str(pickle.loads(pickle.dumps(err.value))) == message
    with pytest.raises(KeyError):
        model_info("nope")


def test_model_info_and_families() -> None:
    info = model_info("wrn_40_2")
    assert info["family"] == "wrn" and info["description"] and info["accepts_weights"] is False
    assert model_info("resnet18")["accepts_weights"] is True
    with pytest.raises(ValueError, match="known families"):
        available("no_such_family")


def test_register_model_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_model("resnet8", family="cifar_resnet")
        def resnet8(num_classes: int, in_channels: int, image_size: int) -> StagedNet:  # pragma: no cover
            raise AssertionError


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_channels": 0}, {"num_classes": 10, "image_size": -1}]
)
def test_build_rejects_bad_shapes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        build("resnet8", **kwargs)


def test_zoo_models_refuse_weight_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="only torchvision and timm/<name> models take pretrained weight files"):
        build("resnet8", num_classes=10, weights=str(tmp_path / "w.pt"))


# ---------------------------------------------------------------- weights files


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = tvm.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return str(path), state


def test_weights_file_is_loaded(resnet18_weights) -> None:
    path, state = resnet18_weights
    model = build("resnet18", num_classes=1000, weights=path)
    assert torch.equal(model.stem[0].weight, state["conv1.weight"])
    assert torch.equal(model.stages[3].blocks[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.classifier.weight, state["fc.weight"])  # same head size: kept


def test_weights_with_new_head_and_grey_input(resnet18_weights) -> None:
    path, state = resnet18_weights
    model = build("resnet18", num_classes=10, in_channels=1, weights=path)
    assert model.classifier.weight.shape == (10, 512)  # re-initialised for 10 classes
    assert torch.equal(model.stages[0].blocks[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.stem[0].weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_rgb_filters_to_other_channel_counts() -> None:
    w = torch.randn(4, 3, 3, 3)
    w5 = rgb_filters_to(w, 5)
    assert w5.shape == (4, 5, 3, 3)
    torch.testing.assert_close(w5[:, :3], w * 0.6)
    torch.testing.assert_close(w5[:, 3:], w[:, :2] * 0.6)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(WeightsError, match="not found .*nowhere"):
        build("resnet18", num_classes=10, weights=str(missing))


def test_unreadable_or_mismatched_weights_file(tmp_path, resnet18_weights) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        build("resnet18", num_classes=10, weights=str(garbage))
    path, _ = resnet18_weights
    with pytest.raises(ValueError, match="does not fit 'torchvision resnet34': 96 missing keys"):
        build("resnet34", num_classes=10, weights=path)
