"""Typed schema of params.yaml: the one place that knows the params.

Every stage calls :func:`load_params`; a bad file, an unknown key, a value of the
wrong type or out of range raises :class:`ConfigError` before any work starts,
naming the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key and what is allowed."""


class Strict(BaseModel):
    """Base of every params section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")


class DataConfig(Strict):
    """Which dataset, which split sizes and which data scenario (few-sample, noisy, low-res)."""

    name: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: str | None = Field(None, description="local folder for cifar10/cifar100/imagefolder; nothing is downloaded")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="share of the training pool held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of the pool used as test split where the dataset has no test split (digits, synthetic)")
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="keep this share of the training split, stratified (few-sample scenario)")
    label_noise: float = Field(0.0, ge=0.0, lt=1.0, description="symmetric label-noise rate on the training split")
    image_size: int | None = Field(None, ge=4, le=1024, description="resize images to this side (low-resolution scenario); null keeps the native size")
    augment: bool = Field(True, description="training augmentation: zero-padded random crop (pad max(1, size//8)) and, where allowed, horizontal flip")
    hflip: bool | None = Field(None, description="random horizontal flip when augmenting; null = the dataset's default (on for cifar10/cifar100/imagefolder, off for digits/synthetic)")
    num_workers: int = Field(0, ge=0, le=64)
    bad_images: Literal["skip", "fail"] = Field("fail", description="image folder policy for unreadable images")
    synthetic_samples: int = Field(600, ge=20, description="size of the synthetic dataset (tests)")
    synthetic_classes: int = Field(4, ge=2, description="classes of the synthetic dataset")
    synthetic_image_size: int = Field(8, ge=4, le=256)

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
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
        if any(m <= 0 for m in v) or any(b <= a for a, b in zip(v, v[1:])):
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
    def _schedule_fits(self) -> "TrainConfig":
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


def _check_model_name(name: str) -> str:
    from pipeline.models import available  # lazy: the registry imports torch

    names = available()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(names)}")
    return name


class TeacherConfig(Strict):
    """The teacher: its architecture, optional local pretrained weights, and its route checkpoints."""

    model: str = "tinynet_l"
    weights: str | None = Field(None, description="local torchvision weights file (torchvision models only)")
    route_every: int = Field(5, ge=1, description="keep a teacher checkpoint every N epochs (RCO, early-stopped teachers)")
    train: TrainOverrides = Field(default_factory=TrainOverrides)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _check_model_name(v)


class StudentConfig(Strict):
    """One student: the key in `students:` is its model name; these are its own recipe changes."""

    train: TrainOverrides = Field(default_factory=TrainOverrides)


class KDConfig(Strict):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""

    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(0.1, ge=0.0)
    kd_weight: float = Field(0.9, ge=0.0)


METHODS = ("kd",)


class DistillConfig(Strict):
    """Which methods to run for every student, and each method's own params."""

    methods: list[str] = Field(default_factory=lambda: ["kd"])
    kd: KDConfig = Field(default_factory=KDConfig)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; allowed: {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"methods listed twice: {v}")
        return v


class EvaluateConfig(Strict):
    """How models are scored."""

    batch_size: int = Field(256, ge=1)
    ece_bins: int = Field(15, ge=2, le=1000)


class Params(Strict):
    """The whole params.yaml."""

    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    students: dict[str, StudentConfig] = Field(default_factory=lambda: {"tinynet_s": StudentConfig()})
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("students", mode="before")
    @classmethod
    def _student_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if not v:
                raise ValueError("at least one student is needed")
            for name, body in list(v.items()):
                _check_model_name(str(name))
                if body is None:
                    v[name] = {}
        return v

    def teacher_train(self) -> TrainConfig:
        """The teacher's resolved recipe."""
        return self.teacher.train.apply(self.train)

    def student_train(self, student: str) -> TrainConfig:
        """A student's resolved recipe (used for its baseline and every distillation run)."""
        return self.students[self.check_student(student)].train.apply(self.train)

    def check_student(self, student: str) -> str:
        """The student name if it is configured, else a ConfigError listing the configured ones."""
        if student not in self.students:
            raise ConfigError(f"student {student!r} is not in params students: {', '.join(self.students)}")
        return student


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """Walk the schema along an error location to list the keys allowed at its parent."""
    node: Any = model
    for part in loc[:-1]:
        if node is None:
            return None
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return None
            node = field.annotation
        else:  # dict[str, X]: the key is free, the value is X
            args = getattr(node, "__args__", ())
            node = args[-1] if args else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what is wrong, the value given, what is allowed."""
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: unknown key{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping; raise ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; nothing runs on a file that fails here."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p.resolve()}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p} is not UTF-8 text: {err}") from None
    return parse_params(data, source=str(p))
