"""Score segmentation boxes against annotated white-cell boxes (BCCD VOC), and show the worst fields.

Recall = share of true boxes matched one-to-one at IoU >= threshold, precision = share of
predicted boxes matched, mean IoU over the matches (hemaflow.boxes.match_boxes). Only fields
whose source carries annotations count: a class-folder image with boxes "[]" is unannotated,
not a field without white cells.

Crop rows (crops.parquet) omit cells the segment stage flagged (cut by the border, implausible
area), so recall on crops is lower than the detector's where annotators boxed edge cells;
`interior` repeats the figures ignoring true boxes that touch the field edge (and predictions
matching them), the VOC "truncated" convention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from hemaflow.boxes import match_boxes
from hemaflow.contact_sheet import draw_boxes, save_grid
from hemaflow.errors import StageInputError, require_columns, require_file

Box = Sequence[float]
ANNOTATED_SOURCES = ("voc_fields",)  # readers whose `boxes` column is an annotation
PRED_COLOUR = (0, 0, 230)    # BGR red
TRUTH_COLOUR = (0, 170, 0)   # BGR green


def _touches_edge(box: Box, size: tuple[int, int] | None, tol: int = 2) -> bool:
    if size is None:
        return False
    w, h = size
    return box[0] <= tol or box[1] <= tol or box[2] >= w - tol or box[3] >= h - tol


def _totals(per_image: list[dict]) -> dict:
    n_truth = sum(r["truth"] for r in per_image)
    n_pred = sum(r["predicted"] for r in per_image)
    ious = [v for r in per_image for v in r["ious"]]
    return {"images": len(per_image), "truth_boxes": n_truth, "predicted_boxes": n_pred, "matched": len(ious),
            "recall": len(ious) / n_truth if n_truth else 1.0,
            "precision": len(ious) / n_pred if n_pred else 1.0,
            "mean_iou": float(np.mean(ious)) if ious else 0.0}


def score_boxes(pred: Mapping[str, Sequence[Box]], truth: Mapping[str, Sequence[Box]], threshold: float = 0.5,
                sizes: Mapping[str, tuple[int, int]] | None = None) -> dict:
    """Recall, precision, mean IoU over the images in `truth` (predictions elsewhere are ignored).

    sizes (image id -> (width, height)), if given, adds the `interior` figures. Returns
    totals, `interior`, and `per_image` rows (missed true boxes, unmatched predictions, IoUs).
    """
    per_image, interior = [], []
    for image_id in sorted(truth):
        t = [tuple(b) for b in truth[image_id]]
        p = [tuple(b) for b in pred.get(image_id, [])]
        _, _, _, matches = match_boxes(p, t, threshold)
        hit_p, hit_t = {m[0] for m in matches}, {m[1] for m in matches}
        per_image.append({"image_id": image_id, "truth": len(t), "predicted": len(p), "ious": [m[2] for m in matches],
                          "missed": [list(t[j]) for j in range(len(t)) if j not in hit_t],
                          "extra": [list(p[i]) for i in range(len(p)) if i not in hit_p]})
        if sizes is not None:
            size = sizes.get(image_id)
            edge_t = {j for j, b in enumerate(t) if _touches_edge(b, size)}
            edge_p = {m[0] for m in matches if m[1] in edge_t}
            interior.append({"truth": len(t) - len(edge_t), "predicted": len(p) - len(edge_p),
                             "ious": [m[2] for m in matches if m[1] not in edge_t]})
    out = {"threshold": threshold, **_totals(per_image)}
    if sizes is not None:
        out["interior"] = _totals(interior)
    out["images_with_misses"] = [r["image_id"] for r in per_image if r["missed"]]
    out["images_with_extras"] = [r["image_id"] for r in per_image if r["extra"]]
    out["per_image"] = per_image
    return out


def _badness(row: dict) -> tuple:
    """Sort key: most errors first, then lowest IoU."""
    return (-(len(row["missed"]) + len(row["extra"])), min(row["ious"], default=1.0), row["image_id"])


def field_contact_sheet(images: Mapping[str, np.ndarray], scores: dict, pred: Mapping[str, Sequence[Box]],
                        truth: Mapping[str, Sequence[Box]], out_path: Path, max_fields: int = 24, cols: int = 4,
                        tile_size: int = 320) -> Path:
    """PNG of fields, worst first (most misses + extras, then lowest IoU): predicted boxes red, true boxes green.

    images: id -> BGR field (fields missing from it are skipped); scores: score_boxes(...) output.
    """
    rows = sorted((r for r in scores["per_image"] if r["image_id"] in images), key=_badness)[:max_fields]
    tiles, captions = [], []
    for r in rows:
        i = r["image_id"]
        tiles.append(draw_boxes(draw_boxes(images[i], truth.get(i, []), TRUTH_COLOUR, 3), pred.get(i, []), PRED_COLOUR, 2))
        ious = ",".join(f"{v:.2f}" for v in r["ious"]) or "-"
        captions.append(f"{i} iou {ious} miss {len(r['missed'])} extra {len(r['extra'])}")
    title = (f"RED = predicted, GREEN = true | recall {scores['recall']:.3f} precision {scores['precision']:.3f} "
             f"mean IoU {scores['mean_iou']:.3f} | worst fields first")
    return save_grid(out_path, tiles, captions, cols=cols, tile_size=tile_size, title=title)


def _boxes_of(value: object, where: Path) -> list[list[float]]:
    try:
        boxes = json.loads(value) if isinstance(value, str) else []
    except json.JSONDecodeError as exc:
        raise StageInputError(where, f"boxes column holds invalid JSON: {value!r}") from exc
    return [list(b[:4]) for b in boxes]


def evaluate_segmentation(clean_path: Path, crops_path: Path, raw_dir: Path, out_dir: Path,
                          threshold: float = 0.5, max_fields: int = 24) -> dict:
    """Crop boxes vs annotated boxes -> out_dir/box_eval.json and out_dir/fields_contact_sheet.png; returns the JSON.

    clean_path: clean.parquet (image_id, path, source, boxes, width, height); crops_path:
    crops.parquet (source_id, x0, y0, x1, y1); raw_dir: where clean `path`s point, for the sheet.
    """
    clean_path, crops_path, raw_dir, out_dir = Path(clean_path), Path(crops_path), Path(raw_dir), Path(out_dir)
    for p, what in ((clean_path, "clean labels table"), (crops_path, "crops table")):
        require_file(p, what)
    clean, crops = pd.read_parquet(clean_path), pd.read_parquet(crops_path)
    require_columns(clean, ("image_id", "path", "boxes"), clean_path)
    require_columns(crops, ("source_id", "x0", "y0", "x1", "y1"), crops_path)
    if "source" in clean.columns:
        clean = clean[clean["source"].isin(ANNOTATED_SOURCES)]
    else:  # no reader recorded: only rows with boxes are known to be annotated
        clean = clean[clean["boxes"].map(lambda v: bool(_boxes_of(v, clean_path)))]
    clean = clean.drop_duplicates("image_id")
    truth = {str(r.image_id): _boxes_of(r.boxes, clean_path) for r in clean.itertuples(index=False)}
    sizes = None
    if {"width", "height"} <= set(clean.columns):
        sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in clean.itertuples(index=False)
                 if pd.notna(r.width) and pd.notna(r.height)}
    pred: dict[str, list[list[float]]] = {}
    for r in crops.itertuples(index=False):
        pred.setdefault(str(r.source_id), []).append([float(r.x0), float(r.y0), float(r.x1), float(r.y1)])
    scores = score_boxes(pred, truth, threshold, sizes)
    result = {"source": {"clean": clean_path.name, "crops": crops_path.name}, **scores}  # names: outputs must not depend on where the project lives

    out_dir.mkdir(parents=True, exist_ok=True)
    worst = sorted(scores["per_image"], key=_badness)[:max_fields]
    paths = dict(zip(clean["image_id"].astype(str), clean["path"]))
    images = {}
    for r in worst:
        rel = paths.get(r["image_id"])
        img = cv2.imread(str(raw_dir / rel), cv2.IMREAD_COLOR) if isinstance(rel, str) else None
        if img is not None:
            images[r["image_id"]] = img
    field_contact_sheet(images, scores, pred, truth, out_dir / "fields_contact_sheet.png", max_fields)
    (out_dir / "box_eval.json").write_text(json.dumps(result, indent=2))
    return result

