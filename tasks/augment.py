"""Augment: class-balancing offline augmentation of the TRAIN split, deterministic by seed.

The split is fixed before this stage (on source images), so no derivative of a val/test
image can reach training. Val/test crops are copied unchanged. Every output row records
the crop and source image it came from. Transforms follow the studies hemaflow builds on:
rotation <= 20 deg, shifts <= 10 %, flips, zoom, colour/stain jitter, fill mode nearest.
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hemaflow.config import AugmentParams
from hemaflow.errors import StageInputError, require_columns, require_file
from hemaflow.progress import Progress, track
from hemaflow.schema import CROP_COLUMNS, DATASET_COLUMNS


@dataclass
class AugmentResult:
    dataset_path: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    n_augmented: int = 0

    def summary(self) -> dict:
        out = {"augmented images": self.n_augmented, "dataset": str(self.dataset_path)}
        for split, per in self.counts.items():
            out[f"{split}"] = ", ".join(f"{k}={v}" for k, v in per.items())
        return out


def augment_image(img: np.ndarray, rng: np.random.Generator, cfg: AugmentParams) -> np.ndarray:
    """One random geometric + colour variant of a BGR uint8 image."""
    h, w = img.shape[:2]
    angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)
    scale = rng.uniform(1 - cfg.zoom_frac, 1 + cfg.zoom_frac)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[0, 2] += rng.uniform(-cfg.shift_frac, cfg.shift_frac) * w
    m[1, 2] += rng.uniform(-cfg.shift_frac, cfg.shift_frac) * h
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if cfg.flip:
        if rng.random() < 0.5:
            out = cv2.flip(out, 1)
        if rng.random() < 0.5:
            out = cv2.flip(out, 0)
    hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter)) % 180
    hsv[..., 1] *= rng.uniform(1 - cfg.saturation_jitter, 1 + cfg.saturation_jitter)
    hsv[..., 2] *= rng.uniform(1 - cfg.brightness_jitter, 1 + cfg.brightness_jitter)
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)


def plan_augmentation(train: pd.DataFrame, target_per_class: int) -> list[tuple[str, int]]:
    """(crop_id, k) jobs that top each class up to target_per_class, cycling over its crops.

    Classes already at or above the target are left as they are (never down-sampled).
    """
    jobs = []
    for _, grp in train.groupby("label", sort=True):
        ids = sorted(grp["crop_id"])
        for k in range(max(0, target_per_class - len(ids))):
            jobs.append((ids[k % len(ids)], k // len(ids)))
    return jobs


def job_seed(seed: int, crop_id: str, k: int) -> int:
    """Stable per-job seed: the same job gives the same image whatever else changed."""
    return zlib.crc32(f"{seed}:{crop_id}:{k}".encode())


def augment_dataset(split_path: Path, crops_dir: Path, augmented_dir: Path, cfg: AugmentParams, seed: int,
                    progress: Progress | None = None) -> AugmentResult:
    """Copy every crop, add balancing variants of train crops, write dataset.parquet."""
    require_file(split_path, "split table")
    crops = pd.read_parquet(split_path)
    require_columns(crops, (*CROP_COLUMNS, "split"), split_path)
    if crops.empty:
        raise StageInputError(split_path, "no crops to augment")

    img_dir = augmented_dir / "images"
    if augmented_dir.exists():
        shutil.rmtree(augmented_dir)
    img_dir.mkdir(parents=True)

    rows = []
    by_id = crops.set_index("crop_id")
    for r in crops.itertuples(index=False):
        src = crops_dir / r.path
        if not src.is_file():
            raise StageInputError(src, f"crop listed in {split_path.name} is missing")
        dst = img_dir / f"{r.crop_id}.png"
        shutil.copyfile(src, dst)
        rows.append({"path": dst.relative_to(augmented_dir).as_posix(), "label": r.label, "split": r.split,
                     "source_id": r.source_id, "source_sha256": r.source_sha256, "crop_id": r.crop_id,
                     "augmented": False})

    jobs = plan_augmentation(crops[crops["split"] == "train"], cfg.target_per_class)
    for crop_id, k in track(jobs, len(jobs), progress, every=25):
        src_row = by_id.loc[crop_id]
        src = crops_dir / src_row["path"]
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        if img is None:
            raise StageInputError(src, "crop cannot be decoded")
        out = augment_image(img, np.random.default_rng(job_seed(seed, crop_id, k)), cfg)
        dst = img_dir / f"{crop_id}_aug{k:03d}.png"
        cv2.imwrite(str(dst), out)
        rows.append({"path": dst.relative_to(augmented_dir).as_posix(), "label": src_row["label"], "split": "train",
                     "source_id": src_row["source_id"], "source_sha256": src_row["source_sha256"],
                     "crop_id": crop_id, "augmented": True})

    ds = pd.DataFrame(rows, columns=list(DATASET_COLUMNS))
    dataset_path = augmented_dir / "dataset.parquet"
    ds.to_parquet(dataset_path, index=False)
    counts = {s: ds[ds["split"] == s]["label"].value_counts().sort_index().to_dict() for s in ("train", "val", "test")}
    return AugmentResult(dataset_path, counts, int(ds["augmented"].sum()))
