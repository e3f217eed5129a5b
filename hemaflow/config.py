"""Typed, frozen view of params.yaml, loaded once at each entry point (CLI, flow, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseParams(_Frozen):
    seed: int = 42
    classes: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


class PathParams(_Frozen):
    raw_dir: Path = Path("data/raw")
    manifest_path: Path = Path("data/manifest.parquet")
    labels_dir: Path = Path("data/labels")
    crops_dir: Path = Path("data/crops")
    split_path: Path = Path("data/split.parquet")
    augmented_dir: Path = Path("data/augmented")
    quality_dir: Path = Path("reports/quality")
    model_dir: Path = Path("models/candidate")
    eval_dir: Path = Path("reports/eval")
    promotion_path: Path = Path("reports/promotion.json")

    def resolved(self, root: Path) -> "PathParams":
        """Same paths, made absolute against the project root."""
        return PathParams(**{k: (root / v) for k, v in self.model_dump().items()})


class IngestParams(_Frozen):
    images_glob: str = "fields/*.jpg"
    labels_csv: str = "labels.csv"
    annotations_dir: str = "annotations"
    id_pattern: str = "SmearField_{:05d}.jpg"


class ValidateLabelsParams(_Frozen):
    on_error: Literal["drop", "fail"] = "drop"
    synonyms: dict[str, tuple[str, ...]] = Field(default_factory=dict)


class SegmentParams(_Frozen):
    crop_size: int = Field(96, ge=8)
    margin: float = Field(0.15, ge=0.0, le=1.0)
    mask_background: bool = True
    min_area_frac: float = Field(0.002, gt=0)
    max_area_frac: float = Field(0.12, gt=0)


class SplitParams(_Frozen):
    test_size: float = Field(0.2, gt=0, lt=1)
    val_size: float = Field(0.2, gt=0, lt=1)


class AugmentParams(_Frozen):
    target_per_class: int = Field(120, ge=1)
    rotation_deg: float = Field(20, ge=0, le=180)
    shift_frac: float = Field(0.1, ge=0, le=0.5)
    zoom_frac: float = Field(0.1, ge=0, le=0.5)
    flip: bool = True
    hue_jitter: float = Field(6, ge=0, le=90)
    saturation_jitter: float = Field(0.15, ge=0, le=1)
    brightness_jitter: float = Field(0.12, ge=0, le=1)


class CheckQualityParams(_Frozen):
    min_per_class: int = Field(3, ge=0)
    max_imbalance_ratio: float = Field(3.0, ge=1)
    max_kl_divergence: float = Field(0.25, ge=0)
    # val/test keep the natural class mix (stratified, not augmented): drop them here when it is skewed
    imbalance_splits: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")


class TrainParams(_Frozen):
    architecture: Literal["small_cnn", "study_cnn"] = "small_cnn"
    image_size: int = Field(64, ge=16)
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.002, gt=0)
    online_augmentation: bool = False
    devices: str = Field("auto", pattern=r"^(auto|cpu|gpu|cpu:[1-9][0-9]*)$")
    patience: int = Field(4, ge=1)  # epochs without val-loss improvement before stopping


class EvaluateParams(_Frozen):
    split: Literal["train", "val", "test"] = "test"


class PromoteParams(_Frozen):
    store_url: str = "models/registry"
    model_name: str = "wbc-classifier"
    min_balanced_accuracy: float = Field(0.6, ge=0, le=1)


class Params(_Frozen):
    base: BaseParams = BaseParams()
    paths: PathParams = PathParams()
    ingest: IngestParams = IngestParams()
    validate_labels: ValidateLabelsParams = ValidateLabelsParams()
    segment: SegmentParams = SegmentParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    check_quality: CheckQualityParams = CheckQualityParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()



class ConfigError(ValueError):
    """params.yaml is missing, unreadable or has a value of the wrong kind."""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage blocks, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: keep its per-key detail
        raise ConfigError(f"{path}: invalid parameters:\n{exc}") from exc
