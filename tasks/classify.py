"""Classify new smears with a promoted model: find every white cell, label it, count.

This is what a lab does with the model it pulled from the store (`hemaflow pull`): the
segmentation settings and input size the model was trained with travel in its card.json
(the params of the run that promoted it), so a pulled model crops cells exactly as its
training crops were cut. Outputs: one row per cell (box, class, probability, flags) and a
differential count per image, the figure a haematologist reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hemaflow.config import Params
from hemaflow.errors import StageInputError
from hemaflow.model_folder import open_model_folder
from hemaflow.progress import Progress, track
from hemaflow.review import ReviewItem, write_review
from hemaflow.tasks.segment import crop_cell, find_white_cells

STAGE = "classify"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
CELL_COLUMNS = ("image", "cell", "x0", "y0", "x1", "y1", "label", "probability", "flag")


@dataclass
class ClassifyResult:
    cells_path: Path
    counts_path: Path
    review_path: Path
    n_images: int
    n_cells: int
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        total = sum(self.counts.values()) or 1
        return {"images": self.n_images, "cells": self.n_cells,
                **{f"{k} %": round(100 * v / total, 1) for k, v in self.counts.items()},
                "cells table": str(self.cells_path), "differential": str(self.counts_path)}


def load_model_dir(model_dir: Path, fallback: Params) -> tuple[object, tuple[str, ...], Params]:
    """Model, class names and the params it was trained with (card.json, else `fallback`);
    opened and sha256-checked by hemaflow.model_folder."""
    folder = open_model_folder(model_dir)
    params = fallback
    trained = (folder.card or {}).get("params")
    if trained:
        params = Params.model_validate(trained)
    return folder.load(), folder.classes, params


def list_images(inputs: list[Path]) -> list[Path]:
    """Files given, and the image files inside folders given (sorted)."""
    found: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise StageInputError(p, "no such image file or folder")
    if not found:
        raise StageInputError(", ".join(map(str, inputs)), "no images to classify")
    return found


def _to_model_input(crop_bgr: np.ndarray, image_size: int) -> np.ndarray:
    """The training path's resize (tf.image.resize, antialias) on the RGB crop."""
    import tensorflow as tf

    rgb = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB)
    return tf.image.resize(rgb, (image_size, image_size), antialias=True).numpy()


def classify_smears(model_dir: Path, inputs: list[Path], out_dir: Path, params: Params,
                    progress: Progress | None = None, batch_size: int = 64) -> ClassifyResult:
    """Segment every image, classify every cell found, write cells.csv, differential.csv, review.csv."""
    model, classes, trained = load_model_dir(Path(model_dir), params)
    seg, size = trained.segment, trained.train.image_size
    images = list_images([Path(p) for p in inputs])
    rows: list[dict] = []
    crops: list[np.ndarray] = []
    review: list[ReviewItem] = []
    for path in track(images, len(images), progress, every=10):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            review.append(ReviewItem(STAGE, path.name, str(path), "unreadable_image", "OpenCV cannot decode it"))
            continue
        dets = find_white_cells(image, seg)
        if not dets:
            review.append(ReviewItem(STAGE, path.name, str(path), "no_cell_found", "no white cell found"))
        field_px = image.shape[0] * image.shape[1]
        for k, det in enumerate(dets):
            flag = ("cell_cut_by_border" if det.touches_border else
                    "implausible_area" if det.mask_area / field_px > seg.max_area_frac else "")
            if flag:  # still classified and listed, but left out of the count and sent to review
                review.append(ReviewItem(STAGE, f"{path.name}#{k}", str(path), flag, f"box {det.box}"))
            x0, y0, x1, y1 = det.box
            rows.append({"image": str(path), "cell": k, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "flag": flag})
            crops.append(_to_model_input(crop_cell(image, det, seg), size))
    if crops:
        probs = np.concatenate([np.asarray(model.predict_on_batch(np.stack(crops[i:i + batch_size])))
                                for i in range(0, len(crops), batch_size)])
        for row, p in zip(rows, probs):
            row["label"], row["probability"] = classes[int(np.argmax(p))], round(float(np.max(p)), 4)
    cells = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
    counted = cells[cells["flag"] == ""]
    counts = (counted.groupby(["image", "label"]).size().unstack(fill_value=0)
              .reindex(columns=list(classes), fill_value=0))
    counts = counts.reindex(sorted({str(p) for p in images}), fill_value=0)
    counts.index.name = "image"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells_path, counts_path, review_path = out_dir / "cells.csv", out_dir / "differential.csv", out_dir / "review.csv"
    cells.to_csv(cells_path, index=False)
    counts.to_csv(counts_path)
    write_review(review, review_path)
    return ClassifyResult(cells_path, counts_path, review_path, len(images), len(cells),
                          {c: int(counts[c].sum()) for c in classes})
