"""Schemas of the training sections of params.yaml: ``data``, ``train``, ``teacher``, ``students``, ``evaluate``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Strict


def check_model_name(name: str) -> str:
    """``name`` if the model registry (or, for ``timm/<name>``, the installed timm) knows it, else a ValueError."""
    if name.startswith("timm/"):
        from pipeline.models.timm_models import check_timm_name  # lazy: imports timm

        return check_timm_name(name)  # its UnknownModelError is a ValueError
    from pipeline.models import available  # lazy: the registry imports torch

    names = available()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(names)}, "
                         "or any timm model as timm/<name> (`kdpipe models --source timm PATTERN` lists them)")
    return name



DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic")

class DataConfig(Strict):
    """Which dataset, which split sizes and which data scenario (few-sample, noisy, low-res)."""

    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic"] = "digits"
    root: str | None = Field(None, description="local folder for cifar10/cifar100/mnist/fashion_mnist/imagefolder; nothing is downloaded")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="share of the training pool held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of the pool used as test split where the dataset has no test split (digits, synthetic)")
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="keep this share of the training split, stratified (few-sample scenario)")
    label_noise: float = Field(0.0, ge=0.0, lt=1.0, description="symmetric label-noise rate on the training split")
    image_size: int | None = Field(None, ge=4, le=1024, description="resize images to this side (low-resolution scenario); null keeps the native size")
    augment: bool = Field(True, description="training augmentation: zero-padded random crop (pad max(1, size//8)) and, where allowed, horizontal flip")
    hflip: bool | None = Field(None, description="random horizontal flip when augmenting; null = the dataset's default (on for cifar10/cifar100/fashion_mnist/imagefolder, off for digits/mnist/synthetic)")
    num_workers: int = Field(0, ge=0, le=64)
    bad_images: Literal["skip", "fail"] = Field("fail", description="image folder policy for unreadable images")
    synthetic_samples: int = Field(600, ge=20, description="size of the synthetic dataset (tests)")
    synthetic_classes: int = Field(4, ge=2, description="classes of the synthetic dataset")
    synthetic_image_size: int = Field(8, ge=4, le=256)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves too little "
                "for training; keep their sum below 0.9"
            )
        return self

class OptimizerConfig(Strict):
    """SGD with momentum, as every CIFAR distillation benchmark trains."""

    lr: float = Field(0.05, gt=0.0, le=10.0, description="base learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)

class ScheduleConfig(Strict):
    """Learning-rate schedule: multistep decay or cosine, each with an optional linear warm-up."""

    name: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs at which multistep multiplies the lr by gamma")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a share of the base lr")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"milestones must be positive and strictly increasing, got {v}")
        return v

class TrainConfig(Strict):
    """The recipe of one training run; `train:` holds the shared defaults."""

    epochs: int = Field(30, ge=1, le=10000)
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    amp: bool = Field(True, description="mixed precision when a CUDA device is used (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA (ignored on CPU)")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this value")

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        s = self.schedule
        if s.warmup_epochs >= self.epochs:
            raise ValueError(f"schedule.warmup_epochs={s.warmup_epochs} must be below epochs={self.epochs}")
        if s.milestones and s.milestones[-1] >= self.epochs:
            raise ValueError(f"schedule.milestones={s.milestones} must all be below epochs={self.epochs}")
        return self

class TrainOverrides(Strict):
    """Per-run changes to the shared `train:` recipe; unset fields keep the shared value."""

    epochs: int | None = Field(None, ge=1, le=10000)
    batch_size: int | None = Field(None, ge=1, le=65536)
    lr: float | None = Field(None, gt=0.0, le=10.0)
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    milestones: list[int] | None = None

    def apply(self, base: TrainConfig) -> TrainConfig:
        """The shared recipe with these overrides applied, validated again as a whole."""
        data = base.model_dump()
        if self.epochs is not None:
            data["epochs"] = self.epochs
        if self.batch_size is not None:
            data["batch_size"] = self.batch_size
        if self.lr is not None:
            data["optimizer"]["lr"] = self.lr
        if self.weight_decay is not None:
            data["optimizer"]["weight_decay"] = self.weight_decay
        if self.milestones is not None:
            data["schedule"]["milestones"] = self.milestones
        return TrainConfig.model_validate(data)

class Pretrained(Strict):
    """Local pretrained weights and how to fine-tune from them (a teacher's or a student's)."""

    weights: str | None = Field(None, description="local weights file (.pth or .safetensors) of a torchvision or timm/<name> model; nothing is downloaded")
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="the pretrained part trains at this share of the lr; the new head at the full lr")
    freeze_epochs: int = Field(0, ge=0, description="the pretrained part is not updated for this many first epochs (its batch-norm statistics still are)")

    @model_validator(mode="after")
    def _needs_weights(self) -> Pretrained:
        if self.weights is None:
            for key, value, default in (("backbone_lr_scale", self.backbone_lr_scale, 1.0),
                                        ("freeze_epochs", self.freeze_epochs, 0)):
                if value != default:
                    raise ValueError(f"{key}={value} applies to pretrained weights, but weights is null; "
                                     "set weights to a local file or drop the key")
        return self

class TeacherConfig(Pretrained):
    """The teacher: its architecture, optional local pretrained weights, and its route checkpoints."""

    model: str = "tinynet_l"
    route_every: int = Field(5, ge=1, description="keep a teacher checkpoint every N epochs (RCO, early-stopped teachers)")
    train: TrainOverrides = Field(default_factory=TrainOverrides)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return check_model_name(v)

class StudentConfig(Pretrained):
    """One student: the key in `students:` is its model name; these are its own recipe changes."""

    train: TrainOverrides = Field(default_factory=TrainOverrides)

class EvaluateConfig(Strict):
    """How models are scored."""

    batch_size: int = Field(256, ge=1)
    ece_bins: int = Field(15, ge=2, le=1000)
