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


class FitNetsConfig(Strict):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (trained jointly with CE, as RepDistiller/mdistiller)."""

    student_stage: int | None = Field(None, description="student stage regressed onto the hint (Python index, negative counts from the end); null = the middle stage")
    teacher_stage: int | None = Field(None, description="teacher stage giving the hint; null = the middle stage")
    ce_weight: float = Field(1.0, ge=0.0)
    hint_weight: float = Field(100.0, ge=0.0, description="weight of the MSE between regressed student and teacher features")


class ATConfig(Strict):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"."""

    p: float = Field(2.0, gt=0.0, le=8.0, description="attention map = normalised channel mean of |f|^p")
    stages: int = Field(4, ge=1, le=16, description="pair the deepest N stages of both networks (the references skip VGG's first block)")
    ce_weight: float = Field(1.0, ge=0.0)
    at_weight: float = Field(1000.0, ge=0.0)


class ABConfig(Strict):
    """Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"."""

    init_epochs: int = Field(30, ge=0, le=10000, description="epochs of the boundary-transfer initialisation phase (student + connectors); 0 skips it")
    init_lr: float | None = Field(None, gt=0.0, le=10.0, description="lr of the initialisation phase; null = the run's lr (RepDistiller)")
    margin: float = Field(1.0, gt=0.0, description="margin of the alternative (hinge-squared) boundary loss")
    ab_weight: float = Field(0.003, gt=0.0, description="scale of the boundary loss (the references' 3/1000)")
    stages: int = Field(4, ge=1, le=16, description="pair the deepest N stages (pre-activation features)")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD temperature of the main phase")
    ce_weight: float = Field(0.1, ge=0.0, description="main phase: CE weight")
    kd_weight: float = Field(0.9, ge=0.0, description="main phase: KD weight (0 with ce_weight 1 reproduces RepDistiller's AB row)")


class RKDConfig(Strict):
    """Park et al. 2019, "Relational Knowledge Distillation" (on the pooled embeddings)."""

    distance_weight: float = Field(25.0, ge=0.0)
    angle_weight: float = Field(50.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    rkd_weight: float = Field(1.0, ge=0.0, description="overall multiplier of the relational loss")


class CRDConfig(Strict):
    """Tian et al. 2020, "Contrastive Representation Distillation" (NCE over a memory bank of embeddings)."""

    feat_dim: int = Field(128, ge=2, le=65536, description="dimension of the student and teacher embedding heads")
    nce_k: int = Field(16384, ge=1, description="negatives per sample (capped at the training-set size - 1)")
    nce_t: float = Field(0.07, gt=0.0, le=10.0, description="temperature of the contrastive scores")
    nce_m: float = Field(0.5, ge=0.0, lt=1.0, description="momentum of the memory-bank update")
    ce_weight: float = Field(1.0, ge=0.0)
    crd_weight: float = Field(0.8, ge=0.0)
    kd_weight: float = Field(0.0, ge=0.0, description="optional Hinton KD term (CRD+KD in the paper uses 1.0)")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="temperature of the optional KD term")


class DKDConfig(Strict):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation"."""

    alpha: float = Field(1.0, ge=0.0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0.0, description="weight of non-target-class KD (NCKD); 6 or 2 for some pairs")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0)
    warmup_epochs: int = Field(20, ge=0, description="the DKD term ramps linearly to full weight over these epochs")


class ReviewKDConfig(Strict):
    """Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (ABF fusion + hierarchical context loss)."""

    review_weight: float = Field(5.0, ge=0.0, description="weight of the HCL loss (5 for most pairs, 8 shufflenetv2, 0.6 resnet20)")
    ce_weight: float = Field(1.0, ge=0.0)
    warmup_epochs: int = Field(20, ge=0, description="the review term ramps linearly to full weight over these epochs")
    stages: int = Field(4, ge=1, le=16, description="review the deepest N stages (plus the pooled embedding)")
    max_mid_channels: int = Field(512, ge=1, description="ABF width = min(this, student embedding width)")
    student_preact: bool = Field(False, description="read the student's pre-activation stage outputs (the teacher's are always pre-activation)")


class SSKDConfig(Strict):
    """Xu et al. 2020, "Knowledge Distillation Meets Self-Supervision" (rotation views, selective transfer)."""

    head_epochs: int = Field(60, ge=0, le=10000, description="epochs training the teacher's projection head on the frozen backbone (phase 1)")
    head_lr: float = Field(0.05, gt=0.0, le=10.0, description="lr of that phase")
    ce_weight: float = Field(0.1, ge=0.0, description="CE on the normal views")
    kd_weight: float = Field(0.9, ge=0.0, description="KD on the normal views")
    tf_weight: float = Field(2.7, ge=0.0, description="KD on the rotated views (transformation term)")
    ss_weight: float = Field(10.0, ge=0.0, description="KL of the view-similarity matrices (self-supervision term)")
    kd_temperature: float = Field(4.0, gt=0.0, le=100.0)
    tf_temperature: float = Field(4.0, gt=0.0, le=100.0)
    ss_temperature: float = Field(0.5, gt=0.0, le=100.0)
    tf_keep_wrong: float = Field(1.0, ge=0.0, le=1.0, description="share of the rotated views the teacher misclassifies kept for the tf term (best ranked first)")
    ss_keep_wrong: float = Field(0.75, ge=0.0, le=1.0, description="share of the views the teacher mismatches kept for the ss term")


class RCOConfig(Strict):
    """Jin et al. 2019, "Knowledge Distillation via Route Constrained Optimization" (anchors from the teacher's route)."""

    strategy: Literal["equal", "greedy"] = Field("equal", description="equal: anchors at equal teacher-epoch intervals, switched at equal student-epoch intervals; greedy: step to the next route checkpoint once the student follows the current one")
    num_anchors: int = Field(4, ge=1, le=1000, description="equal strategy: anchors taken from the route (the last is the converged teacher)")
    route_span: float = Field(0.6, gt=0.0, le=1.0, description="share of the student's epochs spent walking the route; the converged teacher supervises the rest")
    greedy_threshold: float = Field(0.5, gt=0.0, description="greedy: move on when the epoch's mean KD term (T^2 KL) to the current anchor has fallen to this share of its value in the first epoch on that anchor")
    min_anchor_epochs: int = Field(1, ge=1, description="greedy: epochs on an anchor before it may move on")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(0.1, ge=0.0)
    kd_weight: float = Field(0.9, ge=0.0)


class ESKDConfig(Strict):
    """Cho & Hariharan 2019, "On the Efficacy of Knowledge Distillation" (early-stopped teacher / early-stopped KD)."""

    teacher_epoch: int | None = Field(None, ge=1, description="route checkpoint (teacher epoch) to distil from; null = the one nearest half the teacher's training")
    stop_epoch: int | None = Field(None, ge=1, description="student epoch after which the KD term stops (plain CE from then on); null = never")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(0.1, ge=0.0)
    kd_weight: float = Field(0.9, ge=0.0)


METHODS = ("kd", "fitnets", "at", "ab", "rkd", "crd", "dkd", "reviewkd", "sskd", "rco", "eskd")


class DistillConfig(Strict):
    """Which methods to run for every student, and each method's own params."""

    methods: list[str] = Field(default_factory=lambda: ["kd"])
    kd: KDConfig = Field(default_factory=KDConfig)
    fitnets: FitNetsConfig = Field(default_factory=FitNetsConfig)
    at: ATConfig = Field(default_factory=ATConfig)
    ab: ABConfig = Field(default_factory=ABConfig)
    rkd: RKDConfig = Field(default_factory=RKDConfig)
    crd: CRDConfig = Field(default_factory=CRDConfig)
    dkd: DKDConfig = Field(default_factory=DKDConfig)
    reviewkd: ReviewKDConfig = Field(default_factory=ReviewKDConfig)
    sskd: SSKDConfig = Field(default_factory=SSKDConfig)
    rco: RCOConfig = Field(default_factory=RCOConfig)
    eskd: ESKDConfig = Field(default_factory=ESKDConfig)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; allowed: {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"methods listed twice: {v}")
        return v


# --------------------------------------------------------------------------- online distillation (issue 4)
# Networks trained together from scratch, no pre-trained teacher; one plain network is deployed.
# `rampup_epochs: null` scales the references' sigmoid ramp (80 of 300 epochs) to the run's length.


class DMLConfig(Strict):
    """Zhang et al. 2018, "Deep Mutual Learning" (CVPR): K peers, each CE + KL to the others' predictions."""

    num_peers: int = Field(2, ge=2, le=16, description="K, the number of peers (peer 0 has the student's architecture)")
    peer_models: list[str] = Field(default_factory=list, description="architectures of peers 1, 2, ... in order; peers not listed use the student's architecture")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature of the mutual KL (the paper: 1, plain probabilities)")
    ce_weight: float = Field(1.0, ge=0.0)
    kl_weight: float = Field(1.0, ge=0.0, description="weight of each peer's mean KL to the other peers")

    @model_validator(mode="after")
    def _peers(self) -> DMLConfig:
        for name in self.peer_models:
            _check_model_name(name)
        if len(self.peer_models) > self.num_peers - 1:
            raise ValueError(f"peer_models lists {len(self.peer_models)} architectures but num_peers={self.num_peers} leaves room for {self.num_peers - 1}")
        return self


class ONEConfig(Strict):
    """Lan et al. 2018, "Knowledge Distillation by On-the-Fly Native Ensemble" (NeurIPS)."""

    num_branches: int = Field(3, ge=2, le=16, description="m, the branches on top of the shared low layers")
    shared_stages: int | None = Field(None, ge=0, description="stages shared by every branch (the stem always is); null = all but the last stage")
    temperature: float = Field(3.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, description="CE of every branch")
    ensemble_ce_weight: float = Field(1.0, ge=0.0, description="CE of the gated ensemble")
    kl_weight: float = Field(1.0, ge=0.0, description="T^2 KL from the detached ensemble to every branch (ramped)")
    rampup_epochs: int | None = Field(None, ge=0, description="sigmoid ramp of the KL weight (80 epochs of 300 in the reference); null = round(80/300 x epochs); 0 = none")


class OKDDipConfig(Strict):
    """Chen et al. 2020, "Online Knowledge Distillation with Diverse Peers" (AAAI): attention-weighted peer targets and a leader."""

    num_peers: int = Field(3, ge=2, le=16, description="auxiliary peers (the reference's num_branches=4 is 3 peers + the leader)")
    shared_stages: int | None = Field(None, ge=0, description="stages shared by peers and leader (the stem always is); null = all but the last stage, as the reference")
    temperature: float = Field(3.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, description="CE of every peer and of the leader")
    peer_kl_weight: float = Field(1.0, ge=0.0, description="first level: each peer's T^2 KL to its attention-weighted target (ramped)")
    leader_kl_weight: float = Field(1.0, ge=0.0, description="second level: the leader's T^2 KL to the peers' mean (ramped)")
    proj_factor: int = Field(8, ge=1, le=1024, description="query/key projections map the embedding to embedding_dim // proj_factor (at least 1)")
    include_self: bool = Field(False, description="let a peer's own prediction enter its target (the reference code does; the paper's text says the other peers)")
    rampup_epochs: int | None = Field(None, ge=0, description="sigmoid ramp of both KL terms; null = round(80/300 x epochs); 0 = none")


class EKDConfig(Strict):
    """EKD, "Evolutionary Knowledge Distillation" (Zhang et al. 2021): our reconstruction from the abstract (docs/online.md)."""

    teacher_model: str | None = Field(None, description="architecture of the evolving teacher, trained from scratch with the student; null = teacher.model")
    stages: int | None = Field(None, ge=1, le=16, description="pair the deepest N stages through guided modules; null = every stage both networks have")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, description="student CE on labels")
    teacher_ce_weight: float = Field(1.0, ge=0.0, description="teacher CE on labels (its only loss)")
    kd_weight: float = Field(1.0, ge=0.0, description="student T^2 KL to the teacher's softened outputs (ramped)")
    feat_weight: float = Field(1.0, ge=0.0, description="student MSE to the teacher's stage features through the guided modules, summed over stages (ramped)")
    rampup_epochs: int | None = Field(None, ge=0, description="sigmoid ramp of the KD and feature terms; null = round(80/300 x epochs); 0 = none")

    @field_validator("teacher_model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        return None if v is None else _check_model_name(v)


ONLINE_METHODS = ("dml", "one", "okddip", "ekd")


class OnlineConfig(Strict):
    """Which online methods to run for every student, and each method's own params."""

    methods: list[str] = Field(default_factory=lambda: ["dml", "one"])
    dml: DMLConfig = Field(default_factory=DMLConfig)
    one: ONEConfig = Field(default_factory=ONEConfig)
    okddip: OKDDipConfig = Field(default_factory=OKDDipConfig)
    ekd: EKDConfig = Field(default_factory=EKDConfig)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in ONLINE_METHODS]
        if bad:
            raise ValueError(f"unknown online method(s) {bad}; allowed: {', '.join(ONLINE_METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"methods listed twice: {v}")
        return v


class EvaluateConfig(Strict):
    """How models are scored."""

    batch_size: int = Field(256, ge=1)
    ece_bins: int = Field(15, ge=2, le=1000)


# --------------------------------------------------------------------------- deployment (issue 5)
# One section per deployment stage: export, quantize, tensorrt, bundle, benchmark, report.

PRECISIONS = ("fp32", "fp16", "int8")


class ExportConfig(Strict):
    """ONNX export (dynamo exporter) and its parity check against PyTorch on the test split."""

    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the export; 18 by default, 17 for older runtimes")
    example_batch: int = Field(2, ge=2, le=256, description="batch of the example input the exporter traces; >= 2 so the batch dimension stays symbolic")
    include_teacher: bool = Field(True, description="export (and quantize, bundle, benchmark) the teacher as well, for reference")
    parity_atol: float = Field(1e-4, gt=0.0, le=1.0, description="largest |logit difference| allowed between ONNX Runtime and PyTorch on any test image")
    batch_size: int = Field(256, ge=1, le=65536, description="batch size of the parity and accuracy runs")


class QuantizeConfig(Strict):
    """onnxruntime static INT8 (QDQ, per-channel weights, calibrated on training images) and an FP16 copy."""

    int8: bool = Field(True, description="make the INT8 (QDQ) model")
    fp16: bool = Field(True, description="make the FP16 model (float32 inputs and outputs kept)")
    calibration_samples: int = Field(256, ge=1, le=1_000_000, description="training images (un-augmented, a seeded sample) the calibration reads")
    calibration_batch_size: int = Field(32, ge=1, le=4096, description="images per calibration batch")
    calibration_method: Literal["MinMax", "Entropy", "Percentile"] = Field("MinMax", description="how activation ranges are chosen (onnxruntime CalibrationMethod)")
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="Percentile calibration: the percentile of |activation| kept")
    histogram_bins: int = Field(2048, ge=128, le=65536, description="activation histogram bins of Entropy and Percentile calibration (onnxruntime's own default of 128 makes Entropy equal MinMax)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    activation_type: Literal["int8", "uint8"] = Field("uint8", description="activations of model_int8.onnx: uint8 (asymmetric) is onnxruntime's fast CPU path (QLinearConv with fused ReLU); int8 is signed symmetric")
    tensorrt_qdq: bool = Field(True, description="also write model_int8_trt.onnx (signed symmetric INT8 QDQ, zero points 0), the form TensorRT's explicit quantization reads; not needed when activation_type is int8")
    max_int8_drop: float = Field(1.0, ge=0.0, le=100.0, description="top-1 points the INT8 model may lose against FP32 before the report flags it")


class TensorRTConfig(Strict):
    """TensorRT engine builds (10.x builder flags or 11.x strongly typed); skipped where tensorrt or a GPU is missing."""

    enabled: bool = Field(True, description="try to build engines (the stage records 'skipped' when it cannot)")
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: ["fp16", "int8"], description="engines to build per model")
    min_batch: int = Field(1, ge=1, description="optimization profile: smallest batch")
    opt_batch: int = Field(8, ge=1, description="optimization profile: batch the kernels are tuned for")
    max_batch: int = Field(32, ge=1, description="optimization profile: largest batch")
    workspace_mb: int = Field(1024, ge=16, le=1 << 20, description="builder workspace memory pool")
    optimization_level: int = Field(3, ge=0, le=5, description="builder optimization level (TensorRT default 3)")
    timing_cache: str = Field(".kdpipe/tensorrt/timing.cache", description="timing cache file reused across builds (GPU-specific, not a DVC out)")

    @model_validator(mode="after")
    def _batches(self) -> TensorRTConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions listed twice: {self.precisions}")
        return self


class BundleConfig(Strict):
    """The edge bundle: one folder (and .tar.gz) per deployable model, runnable with numpy, onnxruntime and Pillow."""

    variants: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS), description="ONNX variants copied into each bundle")
    default_variant: Literal["fp32", "fp16", "int8"] = Field("int8", description="the model run.py uses when none is given (falls back to fp32 if absent)")
    archive: bool = Field(True, description="also pack each bundle as <name>.tar.gz")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if "fp32" not in v:
            raise ValueError(f"variants must include fp32 (the reference model), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"variants listed twice: {v}")
        return v


class DeviceProfile(Strict):
    """How one kind of device runs a model: threads, batch sizes, execution providers, latency budget."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="profile name (letters, digits, _ . -)")
    threads: int = Field(1, ge=0, le=1024, description="intra-op threads; 0 = the runtime's default (all cores)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1, description="the first is the latency batch (p50/p90/p99); the largest gives the throughput figure")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1, description="onnxruntime execution providers, in order of preference")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field("all", description="onnxruntime graph optimisation level")
    latency_budget_ms: float | None = Field(None, gt=0.0, description="the report picks the most accurate model whose latency meets this budget")

    @field_validator("batch_sizes")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 65536 for b in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"batch_sizes must be strictly increasing values in 1..65536, got {v}")
        return v


def _default_profiles() -> list[DeviceProfile]:
    return [
        DeviceProfile(name="edge-1core", threads=1, batch_sizes=[1], latency_budget_ms=1.0),
        DeviceProfile(name="edge-4core", threads=4, batch_sizes=[1, 8], latency_budget_ms=0.5),
        DeviceProfile(name="server", threads=0, batch_sizes=[1, 32], latency_budget_ms=0.5),
    ]


class BenchmarkConfig(Strict):
    """Latency and throughput of every model x variant x device profile, PyTorch eager as the reference."""

    variants: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS), description="ONNX variants to measure")
    torch_reference: bool = Field(True, description="also measure PyTorch eager FP32 in the same run")
    warmup: int = Field(10, ge=1, le=10000, description="untimed runs before measuring (per batch size)")
    iterations: int = Field(200, ge=5, le=1_000_000, description="timed runs per batch size (fewer if max_seconds is reached first)")
    max_seconds: float = Field(2.0, gt=0.0, le=3600.0, description="time cap per measurement; at least 5 timed runs are always made")
    profiles: list[DeviceProfile] = Field(default_factory=_default_profiles, min_length=1)

    @field_validator("profiles")
    @classmethod
    def _unique(cls, v: list[DeviceProfile]) -> list[DeviceProfile]:
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError(f"profile names must be unique, got {names}")
        return v


class ReportConfig(Strict):
    """The results table, the Pareto plot and the per-profile model choice under a latency budget."""

    latency_statistic: Literal["p50", "p90", "p99"] = Field("p50", description="latency figure the Pareto plot and the budgets use")
    plot_dpi: int = Field(120, ge=50, le=600)


class Params(Strict):
    """The whole params.yaml."""

    seed: int = Field(0, ge=0, le=2**31 - 1)
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


def _problem(key: str, e: dict[str, Any], suffix: str = "") -> str:
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = "" if isinstance(value, dict) or f"got {value}" in msg else f" (got {value!r})"
    return f"  {key}: {msg}{shown}{suffix}"


def _message(source: str, problems: list[str]) -> str:
    """One line for a single problem, else a heading and one indented line per problem."""
    if len(problems) == 1:
        return f"invalid params in {source}: {problems[0].strip()}"
    return "\n".join([f"invalid params in {source}:", *problems])


def format_validation_error(err: ValidationError, source: str) -> str:
    """The dotted key, what is wrong, the value given, what is allowed, for every problem."""
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            problems.append(f"  {key}: unknown key{hint}")
            continue
        problems.append(_problem(key, e))
    return _message(source, problems)


#: Where a field of the resolved recipe (TrainConfig) comes from in a run's ``train:`` overrides.
_OVERRIDE_KEYS = {("epochs",): "epochs", ("batch_size",): "batch_size", ("optimizer", "lr"): "lr",
                  ("optimizer", "weight_decay"): "weight_decay", ("schedule", "milestones"): "milestones"}


def _check_resolved_recipes(params: Params, source: str) -> None:
    """Every run's recipe (the shared ``train:`` with its overrides) must be valid at load, not when it runs.

    Each section is valid alone, but an override can clash with the shared recipe
    (``teacher.train.epochs: 3`` under ``train.schedule.warmup_epochs: 5``) or break a
    rule only the whole recipe checks (``milestones: [0]``).
    """
    runs = [("teacher.train", params.teacher.train)]
    runs += [(f"students.{name}.train", s.train) for name, s in params.students.items()]
    problems = []
    for where, overrides in runs:
        try:
            overrides.apply(params.train)
        except ValidationError as err:
            for e in err.errors():
                loc = tuple(e["loc"])
                key = _OVERRIDE_KEYS.get(loc[:2]) or _OVERRIDE_KEYS.get(loc[:1])
                problems.append(_problem(f"{where}.{key}" if key else where, e,
                                         "; checked on the shared train: recipe with these overrides"))
    if problems:
        raise ConfigError(_message(source, problems))


def parse_params(data: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping; raise ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    _check_resolved_recipes(params, source)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; nothing runs on a file that fails here."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p.resolve()}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif getattr(err, "position", None) is not None:  # a reader error: a character YAML does not allow
            where = f" at character {err.position + 1}"
        else:
            where = ""
        problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or ["unreadable"])[0]
        raise ConfigError(f"{p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p} is not UTF-8 text: {err}") from None
    return parse_params(data, source=str(p))
