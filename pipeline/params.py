"""The whole params.yaml: every section's schema, validated at load.

Every stage calls :func:`load_params`; a bad file, an unknown key, a value of the
wrong type or out of range raises :class:`~pipeline.config.base.ConfigError` before any
work starts, naming the key, the value and what is allowed. The sections' schemas live
with what they configure (:mod:`pipeline.config.training`, :mod:`pipeline.config.deploy`,
and each method's own module for ``distill.<method>`` / ``online.<method>``); this module
only puts them together. A stage validates every section (a typo anywhere stops the first
stage), but its outs depend only on the sections it reads, which ``dvc.yaml`` lists as
its params and whose schema modules it lists as deps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from pipeline.config.base import (
    ConfigError,
    Strict,
    error_message,
    format_validation_error,
    problem_line,
    read_yaml,
)
from pipeline.config.deploy import (
    BenchmarkConfig,
    BundleConfig,
    ExportConfig,
    QuantizeConfig,
    ReportConfig,
    TensorRTConfig,
)
from pipeline.config.methods import methods_section
from pipeline.config.training import (
    DataConfig,
    EvaluateConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    check_model_name,
)
from pipeline.distill.registry import method_schemas

DistillConfig = methods_section("distill", method_schemas(offline=True), ["kd"],
                                "Which offline methods to run for every student, and each method's own params.")
# Networks trained together from scratch, no pre-trained teacher; one plain network is deployed.
# `rampup_epochs: null` scales the references' sigmoid ramp (80 of 300 epochs) to the run's length.
OnlineConfig = methods_section("online", method_schemas(offline=False), ["dml", "one"],
                               "Which online methods to run for every student, and each method's own params.")
#: Names of the offline and the online methods (the registry's, found from their files).
METHODS: tuple[str, ...] = tuple(method_schemas(offline=True))
ONLINE_METHODS: tuple[str, ...] = tuple(method_schemas(offline=False))


class Params(Strict):
    """The whole params.yaml."""

    seed: int = Field(0, ge=0, le=2**31 - 1)
    #: Intra-op CPU threads of every stage. Part of the result on CPU (kernels sum in a thread-count-dependent
    #: order), so fixed here, not by how many stages run at once; null: a share of the cores (outs then depend
    #: on ``kdpipe run --jobs``).
    cpu_threads: int | None = Field(1, ge=1, le=4096)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    students: dict[str, StudentConfig] = Field(default_factory=lambda: {"tinynet_s": StudentConfig()})
    distill: DistillConfig = Field(default_factory=DistillConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("students", mode="before")
    @classmethod
    def _student_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if not v:
                raise ValueError("at least one student is needed")
            for name, body in list(v.items()):
                check_model_name(str(name))
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


_OVERRIDE_KEYS = {("epochs",): "epochs", ("batch_size",): "batch_size", ("optimizer", "lr"): "lr",
                  ("optimizer", "weight_decay"): "weight_decay", ("schedule", "milestones"): "milestones"}

def _check_resolved_recipes(params: Params, source: str) -> None:
    """Every run's recipe (the shared ``train:`` with its overrides) must be valid at load, not when it runs.

    Each section is valid alone, but an override can clash with the shared recipe
    (``teacher.train.epochs: 3`` under ``train.schedule.warmup_epochs: 5``) or break a
    rule only the whole recipe checks (``milestones: [0]``).
    """
    runs = [("teacher", params.teacher)]
    runs += [(f"students.{name}", s) for name, s in params.students.items()]
    problems = []
    for owner, section in runs:
        where, overrides = f"{owner}.train", section.train
        try:
            epochs = overrides.apply(params.train).epochs
            if section.freeze_epochs >= epochs:
                problems.append(f"  {owner}.freeze_epochs: {section.freeze_epochs} leaves no epoch to fine-tune "
                                f"the pretrained part; it must be below the run's {epochs} epochs")
        except ValidationError as err:
            for e in err.errors():
                loc = tuple(e["loc"])
                key = _OVERRIDE_KEYS.get(loc[:2]) or _OVERRIDE_KEYS.get(loc[:1])
                problems.append(problem_line(f"{where}.{key}" if key else where, e,
                                         "; checked on the shared train: recipe with these overrides"))
    if problems:
        raise ConfigError(error_message(source, problems))


def parse_params(data: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping; raise ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, Params)) from None
    _check_resolved_recipes(params, source)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; nothing runs on a file that fails here."""
    return parse_params(read_yaml(path), source=str(Path(path)))
