"""An external test folder, prepared exactly like the training data: the ingest, label
validation and segmentation stage code with the run's own params, into a work folder.

The figure a lab quotes is the one on images the pipeline never saw; so every external
image whose content hash (sha256) is among the training dataset's sources is dropped and
counted, and rows the label validation or segmentation rejected are counted, not scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hemaflow.config import Params
from hemaflow.errors import StageInputError, read_table, require_dir


@dataclass
class ExternalSet:
    crops_dir: Path
    paths: list[str]              # relative to crops_dir
    labels: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # images, rejected_by_validation, ..., dropped_seen_in_training


def prepare_external(folder: Path, work_dir: Path, params: Params, training_table: Path,
                     classes: tuple[str, ...]) -> ExternalSet:
    """ingest -> validate_labels -> segment `folder` into work_dir; drop images seen in training."""
    from hemaflow.tasks.ingest import ingest
    from hemaflow.tasks.segment import segment_images
    from hemaflow.tasks.validate_labels import validate_labels

    folder = require_dir(folder, "external test data")
    work_dir.mkdir(parents=True, exist_ok=True)
    manifest, labels_dir, crops_dir = work_dir / "manifest.parquet", work_dir / "labels", work_dir / "crops"
    ing = ingest(folder, manifest, params.ingest)
    validate_labels(manifest, labels_dir, params.validate_labels, params.base.classes, require_every_class=False)
    seg = segment_images(labels_dir / "clean.parquet", folder, crops_dir, params.segment)
    crops = read_table(crops_dir / "crops.parquet", "external crops table")
    training = read_table(training_table, "training dataset table")
    seen = set(training["source_sha256"].astype(str))
    in_training = crops["source_sha256"].astype(str).isin(seen)
    known = crops["label"].isin(classes)
    kept = crops[~in_training & known]
    if kept.empty:
        raise StageInputError(folder, f"no external test image left to score: {len(crops)} crop(s), "
                                      f"{int(in_training.sum())} of them from images seen in training, "
                                      f"{int((~known).sum())} with a class the model does not know")
    clean = read_table(labels_dir / "clean.parquet", "external clean label table")
    counts = {
        "images": int(ing.n_images),
        "clean_images": int(len(clean)),
        "crops": int(len(crops)),
        "segment_flagged": int(sum(seg.flagged.values())),
        "dropped_seen_in_training": int(in_training.sum()),
        "dropped_unknown_class": int((~known & ~in_training).sum()),
    }
    return ExternalSet(crops_dir=crops_dir, paths=list(kept["path"]), labels=list(kept["label"]), counts=counts)
