"""Augment: class-balancing offline augmentation of the TRAIN split, deterministic by seed.

The split is fixed before this stage (on source images), so no derivative of a val/test
image can reach training. Val/test crops are copied unchanged. Every output row records
the crop and source image it came from. Transforms follow the studies hemaflow builds on:
rotation <= 20 deg, shifts <= 10 %, flips, zoom, colour/stain jitter, fill mode nearest.
"""

from __future__ import annotations

import functools
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hemaflow.batches import BatchRunner, run_serial, split_batches, work_batches
from hemaflow.config import AugmentParams
from hemaflow.contact_sheet import save_grid
from hemaflow.errors import OutputWriteError, StageInputError, read_table, write_image
from hemaflow.imageio import safe_relpath
from hemaflow.progress import Progress
from hemaflow.schema import CROP_COLUMNS, DATASET_COLUMNS

SECONDS_PER_VARIANT = 0.001  # decode + warp + colour + PNG write of one 96 px crop, one core (PBC: 2748 in ~2.7 s)
SHEET_SOURCES_PER_CLASS = 2  # contact sheet: train crops shown per class ...
SHEET_VARIANTS = 5           # ... each followed by up to this many of its variants


@dataclass
class AugmentResult:
    dataset_path: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    n_augmented: int = 0
    contact_sheet_path: Path | None = None

    def summary(self) -> dict:
        out = {"augmented images": self.n_augmented, "dataset": str(self.dataset_path),
               "contact sheet": str(self.contact_sheet_path)}
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


def _read_split(split_path: Path) -> pd.DataFrame:
    crops = read_table(split_path, "split table", (*CROP_COLUMNS, "split"))
    if crops.empty:
        raise StageInputError(split_path, "no crops to augment")
    return crops


def plan_augment(split_path: Path, crops_dir: Path, augmented_dir: Path,
                 cfg: AugmentParams) -> tuple[list[dict], list[dict]]:
    """Plan: copy every crop unchanged (cheap) and list the augmentation jobs (the batch items).

    Returns (rows of the copied crops, jobs). Each job carries everything its batch needs
    (source crop path, label, provenance, k), so batches share no state.
    """
    split_path, crops_dir, augmented_dir = Path(split_path), Path(crops_dir), Path(augmented_dir)
    crops = _read_split(split_path)
    img_dir = augmented_dir / "images"
    if augmented_dir.exists():
        shutil.rmtree(augmented_dir)
    img_dir.mkdir(parents=True)

    rows = []
    for r in crops.itertuples(index=False):
        src = crops_dir / r.path
        if not src.is_file():
            raise StageInputError(src, f"crop listed in {split_path.name} is missing")
        dst = img_dir / f"{safe_relpath(r.crop_id)}.png"  # crop ids may hold sub-folders (class_folders)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        except OSError as exc:
            raise OutputWriteError(dst, f"could not copy crop: {exc.strerror or exc}") from None
        rows.append({"path": dst.relative_to(augmented_dir).as_posix(), "label": r.label, "split": r.split,
                     "source_id": r.source_id, "source_sha256": r.source_sha256, "crop_id": r.crop_id,
                     "augmented": False})

    by_id = crops.set_index("crop_id")
    jobs = []
    for crop_id, k in plan_augmentation(crops[crops["split"] == "train"], cfg.target_per_class):
        src = by_id.loc[crop_id]
        jobs.append({"crop_id": crop_id, "k": k, "src_path": src["path"], "label": src["label"],
                     "source_id": src["source_id"], "source_sha256": src["source_sha256"]})
    return rows, jobs


def augment_batch(jobs: list[dict], crops_dir: Path, augmented_dir: Path, cfg: AugmentParams,
                  seed: int) -> list[dict]:
    """Batch: write one variant per job (seeded by job_seed, so batching cannot change it); return its rows."""
    rows = []
    for job in jobs:
        src = Path(crops_dir) / job["src_path"]
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        if img is None:
            raise StageInputError(src, "crop cannot be decoded")
        out = augment_image(img, np.random.default_rng(job_seed(seed, job["crop_id"], job["k"])), cfg)
        rel = f"images/{safe_relpath(job['crop_id'])}_aug{job['k']:03d}.png"
        write_image(Path(augmented_dir) / rel, out, "augmented image")
        rows.append({"path": rel, "label": job["label"], "split": "train", "source_id": job["source_id"],
                     "source_sha256": job["source_sha256"], "crop_id": job["crop_id"], "augmented": True})
    return rows


def finish_augment(augmented_dir: Path, rows: list[dict], seed: int) -> AugmentResult:
    """Finish: dataset.parquet (copies first, then variants in job order) and the contact sheet."""
    augmented_dir = Path(augmented_dir)
    ds = pd.DataFrame(rows, columns=list(DATASET_COLUMNS))
    dataset_path = augmented_dir / "dataset.parquet"
    ds.to_parquet(dataset_path, index=False)
    sheet = write_contact_sheet(ds, augmented_dir, seed)
    counts = {s: ds[ds["split"] == s]["label"].value_counts().sort_index().to_dict() for s in ("train", "val", "test")}
    return AugmentResult(dataset_path, counts, int(ds["augmented"].sum()), sheet)


def write_contact_sheet(ds: pd.DataFrame, augmented_dir: Path, seed: int, per_class: int = SHEET_SOURCES_PER_CLASS,
                        variants: int = SHEET_VARIANTS) -> Path:
    """augmented_dir/contact_sheet.png: per class, a few train crops, each followed by its variants.

    Picks the train crops with the most variants (ties by crop id), so a person can judge
    whether the transforms still look like the same cell of the same class.
    """
    train = ds[ds["split"] == "train"]
    tiles, captions = [], []
    for label in sorted(train["label"].unique()):
        grp = train[train["label"] == label]
        n_var = grp[grp["augmented"]].groupby("crop_id").size()
        originals = grp[~grp["augmented"]].assign(n=lambda g: g["crop_id"].map(n_var).fillna(0))
        picked = originals.sort_values(["n", "crop_id"], ascending=[False, True]).head(per_class)
        for src in picked.itertuples(index=False):
            row = [(src.path, f"{label} {src.crop_id}")]
            var = grp[grp["augmented"] & (grp["crop_id"] == src.crop_id)].head(variants)
            row += [(p, f"{Path(p).stem.rsplit('_', 1)[-1]} {label}") for p in var["path"]]
            row += [None] * (variants + 1 - len(row))
            for cell in row:
                img = cv2.imread(str(augmented_dir / cell[0])) if cell else None
                tiles.append(img if img is not None else np.full((8, 8, 3), 255, np.uint8))
                captions.append(cell[1] if cell else "")
    return save_grid(augmented_dir / "contact_sheet.png", tiles, captions, cols=variants + 1, tile_size=140,
                     title=f"augment, seed {seed}: each row a train crop (its id), then variants augNNN of it")


def augment_dataset(split_path: Path, crops_dir: Path, augmented_dir: Path, cfg: AugmentParams, seed: int,
                    progress: Progress | None = None, batch_size: int | None = None,
                    run_batches: BatchRunner | None = None, task_seconds: float = 4.0,
                    n_parallel: int = 1) -> AugmentResult:
    """Stage driver: copy every crop, add balancing variants of train crops, write dataset.parquet + contact sheet.

    The variants are made in batches of `batch_size` jobs through `run_batches` (default:
    serially in-process; the Prefect flow passes a Dask runner).
    """
    rows, jobs = plan_augment(split_path, crops_dir, augmented_dir, cfg)
    batch_fn = functools.partial(augment_batch, crops_dir=Path(crops_dir), augmented_dir=Path(augmented_dir),
                                 cfg=cfg, seed=seed)
    batches = split_batches(jobs, batch_size) if batch_size else \
        work_batches(jobs, [1.0] * len(jobs), SECONDS_PER_VARIANT, task_seconds, n_parallel)
    parts = (run_batches or run_serial)(batch_fn, batches, progress)
    return finish_augment(augmented_dir, rows + [r for part in parts for r in part], seed)
