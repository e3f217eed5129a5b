"""The one place that says which paths and params each stage reads and writes.

The CLI (and so `dvc repro`, whose dvc.yaml calls the CLI) and the Prefect flow both call
`run_stage`, so a stage is wired exactly once. Stage code is imported lazily: `hemaflow
--help` must not pay for TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hemaflow.batches import BatchRunner
from hemaflow.config import Params, PathParams
from hemaflow.errors import as_stage_error
from hemaflow.progress import Progress


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]    # PathParams fields read
    outputs: tuple[str, ...]   # PathParams fields written
    help: str


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("ingest", ("raw_dir",), ("manifest_path",), "Scan raw images and labels into a manifest with content hashes."),
    StageSpec("validate_labels", ("manifest_path", "label_corrections"), ("labels_dir",), "Normalise labels, apply a person's label corrections; send bad items to the review list."),
    StageSpec("segment", ("labels_dir", "raw_dir"), ("crops_dir",), "Crop every white cell found in the images."),
    StageSpec("split", ("crops_dir", "labels_dir"), ("split_path",), "Stratified, group-aware train/val/test split by source image and near-duplicate group."),
    StageSpec("augment", ("split_path", "crops_dir"), ("augmented_dir",), "Class-balancing augmentation of the train split."),
    StageSpec("check_quality", ("augmented_dir", "labels_dir"), ("quality_dir",), "Great Expectations gate on the clean table and the splits: schema, taxonomy, balance, leakage."),
    StageSpec("train", ("augmented_dir", "init_model", "backbone_weights"), ("model_dir",), "Train the Keras classifier (from scratch, a warm start or a backbone's weights)."),
    StageSpec("evaluate", ("model_dir", "augmented_dir", "crops_dir", "raw_dir", "test_data"), ("eval_dir",), "Score the model on the test split (and an external labelled folder): accuracy, AUC, calibration, confusion matrix, error gallery, label review."),
    StageSpec("promote", ("model_dir", "eval_dir", "augmented_dir"), ("promotion_path",), "Store the model as a version; make it production if it beats production on the same test split (gate)."),
)}


def stage_paths(params: Params, root: Path, overrides: dict[str, Path] | None = None) -> PathParams:
    """params.paths with per-run overrides, all made absolute against the project root."""
    merged = params.paths.model_copy(update={k: Path(v) for k, v in (overrides or {}).items() if v is not None})
    return merged.resolved(root)


# Stages written as plan -> batch function -> finish (hemaflow/batches.py): run_stage runs their
# batches serially unless given a batch_runner (the Prefect flow passes a Dask one).
BATCHED_STAGES = ("segment", "augment")


def run_stage(name: str, params: Params, root: Path, overrides: dict[str, Path] | None = None,
              progress: Progress | None = None, batch_runner: BatchRunner | None = None) -> Any:
    """Run one stage with its params block and paths; returns the stage's result record."""
    if name not in _RUNNERS:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    if name == "promote" and "://" not in params.promote.store_url:
        store = Path(params.promote.store_url)
        params = params.model_copy(update={"promote": params.promote.model_copy(
            update={"store_url": str(store if store.is_absolute() else root / store)})})
    extra = {"batch_runner": batch_runner} if name in BATCHED_STAGES else {}
    try:
        return _RUNNERS[name](params, stage_paths(params, root, overrides), progress, **extra)
    except OSError as exc:  # e.g. an output folder that cannot be made: one message naming the path
        err = as_stage_error(exc)
        if err is exc:
            raise
        raise err from None


def _ingest(p: Params, d: PathParams, progress):
    from hemaflow.tasks.ingest import ingest
    return ingest(d.raw_dir, d.manifest_path, p.ingest, progress)


def _validate_labels(p: Params, d: PathParams, progress):
    from hemaflow.tasks.validate_labels import validate_labels
    return validate_labels(d.manifest_path, d.labels_dir, p.validate_labels, p.base.classes,
                           corrections_path=d.label_corrections)


def _segment(p: Params, d: PathParams, progress, batch_runner: BatchRunner | None = None):
    from hemaflow.tasks.segment import segment_images
    return segment_images(d.labels_dir / "clean.parquet", d.raw_dir, d.crops_dir, p.segment, progress,
                          batch_size=p.parallel.batch_size, run_batches=batch_runner,
                          task_seconds=p.parallel.task_seconds, n_parallel=p.parallel.n_workers)


def _split(p: Params, d: PathParams, progress):
    from hemaflow.tasks.split import split_crops
    return split_crops(d.crops_dir / "crops.parquet", d.split_path, p.split, p.base.seed,
                       clean_path=d.labels_dir / "clean.parquet")


def _augment(p: Params, d: PathParams, progress, batch_runner: BatchRunner | None = None):
    from hemaflow.tasks.augment import augment_dataset
    return augment_dataset(d.split_path, d.crops_dir, d.augmented_dir, p.augment, p.base.seed, progress,
                           batch_size=p.parallel.augment_batch_size, run_batches=batch_runner,
                           task_seconds=p.parallel.task_seconds, n_parallel=p.parallel.n_workers)


def _check_quality(p: Params, d: PathParams, progress):
    from hemaflow.tasks.check_quality import check_quality
    return check_quality(d.augmented_dir / "dataset.parquet", d.quality_dir, p.check_quality, p.base.classes,
                         clean_path=d.labels_dir / "clean.parquet")


def _train(p: Params, d: PathParams, progress):
    from hemaflow.tasks.train import train_model
    return train_model(d.augmented_dir, d.model_dir, p.train, p.base.classes, p.base.seed, progress,
                       init_model=d.init_model, backbone_weights=d.backbone_weights)


def _evaluate(p: Params, d: PathParams, progress):
    from hemaflow.tasks.evaluate import CropSources, evaluate_model
    return evaluate_model(d.model_dir, d.augmented_dir, d.eval_dir, p.evaluate, test_data=d.test_data, params=p,
                          sources=CropSources(d.crops_dir / "crops.parquet", d.raw_dir))


def _promote(p: Params, d: PathParams, progress):
    from hemaflow.tasks.promote import promote_model
    return promote_model(d.model_dir, d.eval_dir, d.promotion_path, p.promote, dataset_dir=d.augmented_dir,
                         split=p.evaluate.split, tta=p.evaluate.tta, raw_dir=d.raw_dir, params=p.model_dump(mode="json"), progress=progress)


_RUNNERS = {
    "ingest": _ingest, "validate_labels": _validate_labels, "segment": _segment, "split": _split,
    "augment": _augment, "check_quality": _check_quality, "train": _train, "evaluate": _evaluate,
    "promote": _promote,
}
