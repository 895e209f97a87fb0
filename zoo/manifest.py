"""Typed manifests: one frozen record per baseline, the single source of truth for
architecture, test-time settings, published metrics and checkpoint location."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

D2_URL_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"

Float4 = tuple[float, float, float, float]
Float3 = tuple[float, float, float]

# The test-time settings a user may change (zoo.get's keywords) -> the (section, field) of Architecture each
# one replaces. Detectron2's names: ROI_HEADS.SCORE_THRESH_TEST, ROI_HEADS.NMS_THRESH_TEST,
# TEST.DETECTIONS_PER_IMAGE, INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST.
TEST_SETTINGS: dict[str, tuple[str, str]] = {
    "score_thresh": ("roi_heads", "score_thresh_test"),
    "nms_thresh": ("roi_heads", "nms_thresh_test"),
    "detections_per_image": ("roi_heads", "detections_per_image"),
    "min_size": ("input", "min_size_test"),
    "max_size": ("input", "max_size_test"),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- architecture


class ResNetSpec(_Frozen):
    """MSRA ResNet / ResNeXt bottleneck backbone with FrozenBatchNorm."""

    depth: Literal[50, 101]
    num_groups: int = Field(ge=1)
    width_per_group: int = Field(ge=1)
    stem_out_channels: int = Field(ge=1)
    res2_out_channels: int = Field(ge=1)
    stride_in_1x1: bool
    res5_dilation: Literal[1, 2]
    norm: Literal["FrozenBN"]
    out_features: tuple[Literal["res2", "res3", "res4", "res5"], ...]


class FPNSpec(_Frozen):
    """Feature pyramid on top of the ResNet, with the max-pool P6 top block."""

    in_features: tuple[Literal["res2", "res3", "res4", "res5"], ...]
    out_channels: int = Field(ge=1)
    norm: Literal[""]
    fuse_type: Literal["sum"]
    top_block: Literal["max_pool"]


class AnchorSpec(_Frozen):
    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    offset: float


class RPNSpec(_Frozen):
    in_features: tuple[str, ...]
    head_conv_dims: tuple[int, ...]
    anchor_generator: AnchorSpec
    bbox_reg_weights: Float4
    nms_thresh: float = Field(gt=0, le=1)
    pre_nms_topk_test: int = Field(ge=1)
    post_nms_topk_test: int = Field(ge=1)
    min_size: float = Field(ge=0)


class PoolerSpec(_Frozen):
    type: Literal["ROIAlignV2"]
    resolution: int = Field(ge=1)
    sampling_ratio: int = Field(ge=0)


class BoxHeadSpec(_Frozen):
    """Box head: "FastRCNNConvFCHead" for DC5/FPN; "" for C4, where res5 is the head."""

    name: Literal["FastRCNNConvFCHead", ""]
    num_conv: int = Field(ge=0)
    conv_dim: int = Field(ge=1)
    num_fc: int = Field(ge=0)
    fc_dim: int = Field(ge=1)
    norm: Literal[""]
    pooler: PoolerSpec
    bbox_reg_weights: Float4
    cls_agnostic_bbox_reg: bool


class MaskHeadSpec(_Frozen):
    name: Literal["MaskRCNNConvUpsampleHead"]
    num_conv: int = Field(ge=0)
    conv_dim: int = Field(ge=1)
    norm: Literal[""]
    pooler: PoolerSpec
    cls_agnostic_mask: bool
    mask_threshold: float = Field(gt=0, lt=1)


class ROIHeadsSpec(_Frozen):
    name: Literal["Res5ROIHeads", "StandardROIHeads"]
    in_features: tuple[str, ...]
    num_classes: int = Field(ge=1)
    score_thresh_test: float = Field(ge=0, le=1)
    nms_thresh_test: float = Field(gt=0, le=1)
    detections_per_image: int = Field(ge=1)
    box_head: BoxHeadSpec
    mask_head: Optional[MaskHeadSpec] = None


class InputSpec(_Frozen):
    """Test-time input pipeline: channel order, normalisation, resize and padding."""

    format: Literal["BGR", "RGB"]
    pixel_mean: Float3
    pixel_std: Float3
    min_size_test: int = Field(ge=1)
    max_size_test: int = Field(ge=1)
    resize_interpolation: Literal["bilinear"]
    size_divisibility: int = Field(ge=0)


class Architecture(_Frozen):
    meta_architecture: Literal["GeneralizedRCNN"]
    layout: Literal["C4", "DC5", "FPN"]
    resnet: ResNetSpec
    fpn: Optional[FPNSpec] = None
    rpn: RPNSpec
    roi_heads: ROIHeadsSpec
    input: InputSpec

    @model_validator(mode="after")
    def _layout_consistent(self) -> "Architecture":
        if (self.layout == "FPN") != (self.fpn is not None):
            raise ValueError("fpn must be given exactly when layout is 'FPN'")
        if (self.layout == "DC5") != (self.resnet.res5_dilation == 2):
            raise ValueError("resnet.res5_dilation must be 2 exactly when layout is 'DC5'")
        if (self.layout == "C4") != (self.roi_heads.name == "Res5ROIHeads"):
            raise ValueError("roi_heads.name must be 'Res5ROIHeads' exactly when layout is 'C4'")
        return self

    @property
    def mask_on(self) -> bool:
        return self.roi_heads.mask_head is not None

    def test_settings(self) -> dict[str, float | int]:
        """The current values of the TEST_SETTINGS, by their zoo.get names."""
        return {key: getattr(getattr(self, section), field) for key, (section, field) in TEST_SETTINGS.items()}

    def with_test_settings(self, **settings: float | int | None) -> "Architecture":
        """A validated copy with some TEST_SETTINGS replaced (None keeps a value). Validation is strict (no
        bools or strings for numbers, no 2.0 for a count); pydantic's ValidationError names the field."""
        unknown = set(settings) - set(TEST_SETTINGS)
        if unknown:
            raise TypeError(f"unknown test-time setting(s) {sorted(unknown)}; known: {sorted(TEST_SETTINGS)}")
        given = {k: v for k, v in settings.items() if v is not None}
        if not given:
            return self
        data = self.model_dump()
        for key, value in given.items():
            section, field = TEST_SETTINGS[key]
            data[section][field] = value
        return Architecture.model_validate(data, strict=True)


# ---------------------------------------------------------------- record


class LrSchedule(_Frozen):
    name: Literal["1x", "3x"]
    max_iter: int = Field(ge=1)
    steps: tuple[int, ...]
    base_lr: float = Field(gt=0)
    ims_per_batch: int = Field(ge=1)


class Metrics(_Frozen):
    """Published figures from the Detectron2 model zoo table."""

    train_time_s_per_iter: float = Field(ge=0)
    inference_time_s_per_im: float = Field(ge=0)
    train_memory_gb: float = Field(ge=0)
    box_ap: float = Field(ge=0, le=100)
    mask_ap: Optional[float] = Field(default=None, ge=0, le=100)


class Checkpoint(_Frozen):
    url: str = Field(pattern=r"^(https?|file)://\S+$")
    metrics_url: str = Field(pattern=r"^(https?|file)://\S+$")
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size_bytes: Optional[int] = Field(default=None, ge=1)

    @property
    def md5_prefix(self) -> Optional[str]:
        """Hex digits Detectron2 puts in released file names (`model_final_f10217.pkl`)."""
        m = re.search(r"_([0-9a-f]{6,32})\.\w+$", self.url)
        return m.group(1) if m else None


class Provenance(_Frozen):
    trained_on: str
    evaluated_on: str
    speed_measured_on: str
    source: str


class Manifest(_Frozen):
    schema_version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: Literal["detection", "instance_segmentation"]
    dataset: str
    config: str
    lr_schedule: LrSchedule
    metrics: Metrics
    model_id: int = Field(ge=0)
    checkpoint: Checkpoint
    provenance: Provenance
    architecture: Architecture

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        url = self.checkpoint.url
        if str(self.model_id) not in url or self.name not in url:
            raise ValueError(
                f"checkpoint.url must contain the model id {self.model_id} and the name {self.name!r}"
            )
        if str(self.model_id) not in self.checkpoint.metrics_url:
            raise ValueError(f"checkpoint.metrics_url must contain the model id {self.model_id}")
        segm = self.task == "instance_segmentation"
        if segm != self.architecture.mask_on:
            raise ValueError("task 'instance_segmentation' requires roi_heads.mask_head, and only it")
        if segm != (self.metrics.mask_ap is not None):
            raise ValueError("metrics.mask_ap must be given exactly for instance_segmentation")
        if not self.config.endswith(f"/{self.name}.yaml"):
            raise ValueError(f"config must end with '/{self.name}.yaml'")
        return self

    def summary(self) -> dict:
        """Flat record used by `zoo list` (json/csv) and the README table."""
        m = self.metrics
        return {
            "name": self.name,
            "task": self.task,
            "config": self.config,
            "layout": self.architecture.layout,
            "lr_schedule": self.lr_schedule.name,
            "train_time_s_per_iter": m.train_time_s_per_iter,
            "inference_time_s_per_im": m.inference_time_s_per_im,
            "train_memory_gb": m.train_memory_gb,
            "box_ap": m.box_ap,
            "mask_ap": m.mask_ap,
            "model_id": self.model_id,
            "checkpoint_url": self.checkpoint.url,
            "metrics_url": self.checkpoint.metrics_url,
            "sha256": self.checkpoint.sha256,
        }
