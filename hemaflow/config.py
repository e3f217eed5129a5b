"""Typed, frozen view of params.yaml, loaded once at each entry point (CLI, flow, tests)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    # evaluate: an external labelled folder (any reader's layout) scored next to the test split
    test_data: Path | None = None
    # validate_labels: a person's relabel/drop decisions (CSV path,action,label,note; hemaflow/label_corrections.py)
    label_corrections: Path | None = None
    # train: start from a hemaflow model folder (warm start, e.g. `hemaflow pull` of production) ...
    init_model: Path | None = None
    # ... or load a keras.applications backbone's weights from a local file (transfer learning)
    backbone_weights: Path | None = None

    def resolved(self, root: Path) -> "PathParams":
        """Same paths, made absolute against the project root."""
        return PathParams(**{k: (root / v if v is not None else None) for k, v in self.model_dump().items()})


BLOODMNIST_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil",
                      "platelet")


class IngestParams(_Frozen):
    # auto picks the reader from the layout of raw_dir (see hemaflow.readers.detect_reader)
    reader: Literal["auto", "voc_fields", "class_folders", "filename_labels", "medmnist", "labels_csv"] = "auto"
    images_glob: str = "fields/*.jpg"     # voc_fields: smear-field images, relative to raw_dir
    # relative to raw_dir. voc_fields: hand-made labels (optional); labels_csv: the table naming every image
    labels_csv: str = "labels.csv"
    # labels_csv reader: column names; None picks a common name (path/file/filename/image...,
    # label/class/cell_type/category..., split/subset). The split column is optional.
    csv_path_column: str | None = None
    csv_label_column: str | None = None
    csv_split_column: str | None = None
    annotations_dir: str = "annotations"  # voc_fields: Pascal VOC XML beside the images (optional)
    id_pattern: str = "SmearField_{:05d}.jpg"  # integer ids in the labels CSV -> file names
    split_lists_dir: str | None = None    # voc_fields: folder of train/val/test.txt id lists (BCCD ImageSets/Main)
    # voc_fields: fields = one item per image (labels from the CSV); objects = one item per annotated
    # object, labelled by its VOC <name> (e.g. BCCD WBC/RBC/Platelets), optionally only these names
    voc_items: Literal["fields", "objects"] = "fields"
    voc_object_names: tuple[str, ...] | None = None
    filename_glob: str = "**/*"           # filename_labels: files to read, relative to raw_dir
    filename_pattern: str = r"^(?P<id>Im\d+)_(?P<label>\d+)$"  # on the file stem; group 'label' is the label
    filename_labels: dict[str, str] = Field(default_factory=lambda: {"0": "no_blast", "1": "lymphoblast"})
    npz_glob: str = "*.npz"               # medmnist: archives, relative to raw_dir
    # medmnist: class names by label index, per dataset (npz stem without a _<size> suffix)
    medmnist_classes: dict[str, tuple[str, ...]] = Field(default_factory=lambda: {"bloodmnist": BLOODMNIST_CLASSES})
    # size_out_of_range: width or height more than this factor away from the source's median; None: off
    size_tolerance: float | None = Field(4.0, gt=1)
    expected_width: tuple[int, int] | None = None   # optional hard [min, max] range, every source
    # decoding guard: header pixel count and file size checked before decoding (image_too_large); None: off
    max_pixels: int | None = Field(64_000_000, ge=1)
    max_file_mb: float | None = Field(256, gt=0)

    @property
    def max_file_bytes(self) -> int | None:
        return None if self.max_file_mb is None else int(self.max_file_mb * 2**20)
    expected_height: tuple[int, int] | None = None

    @field_validator("filename_pattern")
    @classmethod
    def _has_label_group(cls, v: str) -> str:
        try:
            groups = re.compile(v).groupindex
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "label" not in groups:
            raise ValueError("needs a named group (?P<label>...) holding the label")
        return v

    @field_validator("expected_width", "expected_height")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"expected [min, max] with 0 < min <= max, got {list(v)}")
        return v


class ValidateLabelsParams(_Frozen):
    on_error: Literal["drop", "fail"] = "drop"
    synonyms: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    check_file_prefix: bool = True          # a PBC-style subtype prefix (SNE_1.jpg) must agree with the label
    near_duplicate_distance: int | None = Field(4, ge=0, le=64)  # phash Hamming bits; None: no check
    on_disagreement: Literal["review", "keep"] = "review"  # second annotator disagrees: review, or keep the first label


class SegmentParams(_Frozen):
    # fields: every white cell of a smear field is a crop labelled by its box/field label.
    # single_cell: the image shows ONE labelled cell in the centre (PBC, ALL-IDB, MedMNIST, lab crops):
    # the detection nearest the centre is the crop, other cells go to review as secondary_cell,
    # no detection -> a centred crop of fallback_crop_px, flagged. auto: single_cell for every
    # reader but voc_fields (smear fields).
    mode: Literal["auto", "fields", "single_cell"] = "auto"
    single_cell_crop: Literal["detection", "centre"] = "detection"  # centre: always the centred crop (BloodMNIST style)
    fallback_crop_px: int = Field(200, ge=8)                        # side of the centred crop (capped at the image)
    crop_size: int = Field(96, ge=8)
    margin: float = Field(0.15, ge=0.0, le=1.0)
    mask_background: bool = True
    min_area_frac: float = Field(0.002, gt=0)
    max_area_frac: float = Field(0.12, gt=0)
    # detection (tasks/segment.py): colour = real smears (BCCD, PBC); optical_density = the embedded synthetic fields
    method: Literal["colour", "optical_density"] = "optical_density"  # as params.yaml: models promoted before `method` existed used it
    # colour method; chosen on the BCCD train list, see benchmarks/segment.py
    detect_downscale: int = Field(4, ge=1)               # detect on a copy this many times smaller
    nucleus_hue: tuple[int, int] = (105, 165)            # OpenCV hue (0-180) of nuclear stain: blue..purple
    nucleus_min_saturation: int = Field(80, ge=0, le=255)
    min_nucleus_frac: float = Field(0.01, ge=0)          # smaller nucleus groups (platelets, specks): no cell
    lobe_join_px: int = Field(20, ge=0)                  # nucleus pieces this close (full-size px) are one cell
    cell_min_blue_shift: float = Field(9.0, gt=0)        # CIELAB b* below the background's: cell (cytoplasm)
    cell_open_px: int = Field(8, ge=0)                   # opening radius (full-size px) cutting thin leaks
    cell_reach: float = Field(0.6, gt=0)                 # cytoplasm at most this x sqrt(nucleus area) away
    box_pad_x: float = Field(0.0625, ge=-0.25, le=1)     # box grown by this fraction of its width, each side
    box_pad_y: float = Field(0.0375, ge=-0.25, le=1)     # ... and of its height
    border_min_visible: float = Field(0.75, ge=0, le=1)  # edge cell showing less of its round area: cut


class SplitParams(_Frozen):
    test_size: float = Field(0.2, gt=0, lt=1)
    val_size: float = Field(0.2, gt=0, lt=1)
    use_source_split: bool = True   # keep the split a source fixes (BCCD ImageSets, MedMNIST keys, CSV column)


class AugmentParams(_Frozen):
    target_per_class: int = Field(120, ge=1)
    rotation_deg: float = Field(20, ge=0, le=180)
    shift_frac: float = Field(0.1, ge=0, le=0.5)
    zoom_frac: float = Field(0.1, ge=0, le=0.5)
    flip: bool = True
    hue_jitter: float = Field(6, ge=0, le=90)
    saturation_jitter: float = Field(0.15, ge=0, le=1)
    brightness_jitter: float = Field(0.12, ge=0, le=1)


class ParallelParams(_Frozen):
    """How the Prefect flow spreads the batched stages (segment, augment) over Dask.

    The CLI and `dvc repro` run the same batches serially. No output depends on these
    values, so no dvc.yaml stage lists them and changing them re-runs nothing.
    """

    dask_address: str | None = None   # scheduler, e.g. tcp://host:8786; None: a local cluster per stage run
    n_workers: int = Field(2, ge=1)   # local cluster worker processes
    threads_per_worker: int = Field(1, ge=1)
    # Batches are sized by work: each task carries about task_seconds of estimated work on one
    # core (Prefect costs ~0.3 s a task, so tiny tasks made the flow slower than serial).
    task_seconds: float = Field(4.0, gt=0)
    batch_size: int | None = Field(None, ge=1)          # fixed images per segment task instead (None: by work)
    augment_batch_size: int | None = Field(None, ge=1)  # fixed variants per augment task instead (None: by work)


class CheckQualityParams(_Frozen):
    min_per_class: int = Field(3, ge=0)
    max_imbalance_ratio: float = Field(3.0, ge=1)
    max_kl_divergence: float = Field(0.25, ge=0)
    # the clean label table (images, before segment/split); None: the same value as for the splits
    clean_min_per_class: int | None = Field(None, ge=0)
    clean_max_imbalance_ratio: float | None = Field(None, ge=1)
    # val/test keep the natural class mix (stratified, not augmented): drop them here when it is skewed
    imbalance_splits: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")


class TrainParams(_Frozen):
    # the studies' models, small-image ResNets, and keras.applications backbones (hemaflow/backbones.py)
    architecture: Literal["small_cnn", "study_cnn", "mlp", "shallow_cnn", "lenet", "study_resnet",
                          "resnet_small", "vgg16", "vgg19", "resnet50", "inception_v3", "xception",
                          "densenet121", "densenet169", "densenet201", "efficientnet_b0",
                          "mobilenet_v2"] = "small_cnn"
    image_size: int = Field(64, ge=16)
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.002, gt=0)     # peak rate (after warm-up)
    # tf.data augmentation of train images: dihedral flips/90-degree rotations, shifts, colour jitter
    online_augmentation: bool = False
    shift_frac: float = Field(0.1, ge=0, le=0.5)   # online: shift up to this fraction of the side (reflect fill)
    colour_jitter: float = Field(0.1, ge=0, le=0.5)  # online: brightness/contrast/saturation change up to this
    rotation_deg: float = Field(0.0, ge=0, le=180)  # online: any-angle turn up to this (45 + the 90-degree views: all)
    # online: MixUp's Beta(alpha, alpha) (0 = off; 0.2 as in the paper): each train image blended
    # with another and the one-hot targets alike
    mixup_alpha: float = Field(0.0, ge=0, le=1)
    # online: Cutout (DeVries & Taylor 2017): a square of this fraction of the side, centred anywhere
    # in the image (clipped at the border), filled with the image's mean colour (0 = off)
    cutout_frac: float = Field(0.0, ge=0, le=0.5)
    augmentation_layers: bool = False             # Keras random layers (any-angle rotation, zoom) inside the model
    devices: str = Field("auto", pattern=r"^(auto|cpu|gpu|cpu:[1-9][0-9]*)$")
    patience: int = Field(4, ge=1)  # epochs without val-loss improvement before stopping
    # cosine_time only: early stopping may stop, and an epoch may count as the best, once this share
    # of max_minutes is spent: val loss is noisy while the rate is still high
    early_stop_after: float = Field(0.5, ge=0, le=1)
    # best: the weights of the epoch with the lowest val loss; last: the final epoch's, the end of
    # an annealed schedule (a noisy val loss can pick a mid-schedule epoch: 129 of 200 at 40 % of
    # the peak rate in a 64 px PBC run). Either way best_epoch in train_summary.json is the kept one
    keep_weights: Literal["best", "last"] = "best"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)        # decoupled weight decay (any optimizer; adamw's reason to exist)
    momentum: float = Field(0.9, ge=0, lt=1)       # sgd only (Nesterov)
    # sharpness-aware minimisation (hemaflow/sharpness.py): each step uses the gradient at the
    # worst point within this radius of the weights (0 = off; 0.05 as in the paper); 2x per step
    sam_rho: float = Field(0.0, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # cosine: decays to 0 at the last planned epoch; cosine_time: decays to 0 when max_minutes of
    # training time are spent (epochs is then an upper bound): the same recipe anneals fully on a
    # fast or a busy machine instead of being cut off half-way by the time budget
    lr_schedule: Literal["constant", "cosine", "cosine_time"] = "constant"
    warmup_epochs: float = Field(0, ge=0)         # linear warm-up from 0 to learning_rate
    class_weight: Literal["none", "balanced"] = "none"  # balanced: n / (classes x count) per class
    # mixed_*: bf16/fp16 maths, float32 weights and softmax (bf16: 1.7x faster on an AMX Xeon, 9x
    # slower on an AVX2-only CPU); auto: mixed where the hardware has it (hemaflow/devices.py)
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    max_minutes: float | None = Field(None, gt=0)  # training time budget: no epoch starts that would end past it
    # temperature: after training, one temperature fitted on the val split (log-loss) is folded
    # into the softmax layer (hemaflow/calibration.py): calibrated probabilities, same argmax
    calibrate: Literal["none", "temperature"] = "none"
    # file_prefix: learn the subtypes the file names carry (PBC ig/MMY_1.jpg -> ig:MMY) as classes of
    # their own; a frozen layer sums them back into params' classes (hemaflow/subclasses.py)
    subclasses: Literal["none", "file_prefix"] = "none"
    # architecture options (each builder uses those it has; see hemaflow/models.py)
    units: int = Field(128, ge=1)                 # mlp hidden units
    kernels: int = Field(64, ge=1)                # shallow_cnn conv kernels
    kernel_size: int = Field(9, ge=1)             # shallow_cnn kernel side
    dropout: float = Field(0.0, ge=0, lt=1)       # before the softmax (mlp, shallow_cnn, lenet, resnets)
    width: int = Field(32, ge=1)                  # resnet_small filters of the first stage (then 2x, 4x)
    depth: int = Field(2, ge=1)                   # resnet_small residual blocks per stage
    stem_stride: Literal[1, 2] = 1                # resnet_small: 2 halves the maps (64 px at ~32 px cost)
    # backbones with paths.backbone_weights: frozen base + new head first, then fine_tune_epochs
    # with the whole network at fine_tune_learning_rate (also after a warm start, paths.init_model)
    freeze_base: bool = True
    fine_tune_epochs: int = Field(0, ge=0)
    fine_tune_learning_rate: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _time_schedule_needs_budget(self):
        if self.lr_schedule == "cosine_time" and not self.max_minutes:
            raise ValueError("lr_schedule cosine_time needs max_minutes (the time the cosine spans)")
        return self

    @model_validator(mode="after")
    def _batch_views_are_online(self):
        if self.mixup_alpha > 0 and not self.online_augmentation:
            raise ValueError("mixup_alpha mixes train batches in tf.data: it needs online_augmentation: true")
        if self.cutout_frac > 0 and not self.online_augmentation:
            raise ValueError("cutout_frac masks train batches in tf.data: it needs online_augmentation: true")
        return self

    @model_validator(mode="after")
    def _warmup_within_epochs(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})")
        return self


class EvaluateParams(_Frozen):
    split: Literal["train", "val", "test"] = "test"
    tta: bool = False                              # average the 8 flips/90-degree rotations of each crop
    calibration_bins: int = Field(15, ge=2)        # equal-width confidence bins for ECE / reliability diagram
    gallery_size: int = Field(24, ge=0)            # misclassified crops shown in error_gallery.png
    # errors the model calls with at least this probability go to label_review.csv: more often a
    # wrong label than a wrong model (PBC: a "platelet" that is a small nucleated cell, p 0.996)
    label_review_confidence: float = Field(0.95, gt=0, le=1)


class PromoteParams(_Frozen):
    store_url: str = "models/registry"
    model_name: str = "wbc-classifier"
    min_balanced_accuracy: float = Field(0.6, ge=0, le=1)   # the first model (no champion yet)
    min_class_recall: float = Field(0.5, ge=0, le=1)        # every class, every candidate
    min_improvement: float = Field(0.0, ge=0, le=1)         # balanced accuracy over the champion (and > 0)
    mcnemar_alpha: float | None = Field(0.05, gt=0, le=1)   # paired test must call it not noise; None: off
    min_test_size: int = Field(25, ge=1)                    # test images needed to decide anything


class SearchParams(_Frozen):
    """`hemaflow search`: a grid over train params, each point scored on the validation split."""
    grid: dict[str, list] = Field(default_factory=lambda: {"learning_rate": [0.001, 0.003], "batch_size": [16, 32]})
    metric: Literal["balanced_accuracy", "accuracy", "macro_f1", "log_loss"] = "balanced_accuracy"
    out_dir: Path = Path("reports/search")      # relative to the params file's folder


class ScheduleParams(_Frozen):
    """Retraining: on a cron, and whenever the versioned raw data (data.dvc) changes."""
    cron: str = "0 3 * * 1"           # every Monday 03:00
    timezone: str = "UTC"
    watch_interval_s: int = Field(600, ge=10)  # how often the data watcher compares data.dvc with dvc.lock


class TrainJobParams(_Frozen):
    """Where train and evaluate run: in the flow's own process (local), or as a run of the
    training-job deployment on a work pool (a GPU node), inputs and outputs passing through
    transfer_url (s3://bucket/prefix, or a folder both machines see)."""
    mode: Literal["local", "work_pool"] = "local"
    deployment: str = "hemaflow-train-job/gpu"   # <flow name>/<deployment name> (prefect.yaml)
    transfer_url: str = "s3://hemaflow/jobs"     # one sub-folder per flow run: inputs/, outputs/
    timeout_s: float = Field(6 * 3600, gt=0)     # waiting longer than this fails the flow run
    job_variables: dict[str, Any] = Field(default_factory=dict)  # per-run overrides, e.g. {gpu_limit: 2}


class Params(_Frozen):
    base: BaseParams = BaseParams()
    paths: PathParams = PathParams()
    ingest: IngestParams = IngestParams()
    validate_labels: ValidateLabelsParams = ValidateLabelsParams()
    segment: SegmentParams = SegmentParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    parallel: ParallelParams = ParallelParams()
    check_quality: CheckQualityParams = CheckQualityParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    search: SearchParams = SearchParams()
    schedule: ScheduleParams = ScheduleParams()
    train_job: TrainJobParams = TrainJobParams()


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or has a value of the wrong kind."""


# Fields holding a path (or a store URL) relative to the params file's folder: an inherited
# value is rebased so that it names the same place from the extending file's folder.
_PATH_FIELDS = {"paths": None, "promote": ("store_url",), "search": ("out_dir",), "train_job": ("transfer_url",)}


def _rebase(value: Any, parent_dir: Path, child_dir: Path) -> Any:
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    return os.path.relpath(parent_dir / value, child_dir)


def _deep_merge(base: dict, override: dict) -> dict:
    """override's keys win; mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage blocks, got {type(raw).__name__}")
    return raw


def read_params_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """params.yaml as a plain mapping, with `extends: other.params.yaml` resolved.

    A file that extends another holds only what differs (a recipe variant is then a few lines,
    not a copy that drifts): the parent, named relative to the child's folder, is read first
    (it may extend another), the child's blocks are merged over it key by key, and the
    parent's relative paths are rebased so they name the same files from the child's folder.
    DVC reads params.yaml's own keys, so the file `dvc repro` uses should not extend another."""
    path = Path(path)
    raw = _read_mapping(path)
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str) or not parent_name.strip():
        raise ConfigError(f"{path}: 'extends' must name a params file, got {parent_name!r}")
    here = path.resolve()
    parent = (path.parent / parent_name).resolve()
    chain = (*_chain, here)
    if parent in chain:
        raise ConfigError(f"{path}: 'extends: {parent_name}' makes a cycle: "
                          + " -> ".join(str(p) for p in (*chain, parent)))
    if not parent.is_file():
        raise ConfigError(f"{path}: 'extends: {parent_name}': params file not found at {parent}")
    base = read_params_dict(parent, chain)
    for block, fields in _PATH_FIELDS.items():
        section = base.get(block)
        if isinstance(section, dict):
            base[block] = {k: (_rebase(v, parent.parent, here.parent) if fields is None or k in fields else v)
                           for k, v in section.items()}
    return _deep_merge(base, raw)


def require_no_extends(path: str | Path) -> None:
    """The params file DVC reads must hold every value itself: dvc.yaml's ${paths.*} and the
    per-stage params DVC hashes come from that file's own keys, so an inherited value would be
    invisible to DVC and a change to it would re-run nothing."""
    path = Path(path)
    if "extends" in _read_mapping(path):
        raise ConfigError(f"{path}: DVC reads this file's own keys, so it cannot use 'extends:' "
                          "(write the values out, or run the variant with `hemaflow run --params FILE`)")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (resolving `extends:`); errors name the file and the offending key."""
    path = Path(path)
    raw = read_params_dict(path)
    try:
        return Params.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: keep its per-key detail
        raise ConfigError(f"{path}: invalid parameters:\n{exc}") from exc
