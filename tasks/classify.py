"""Classify new images with a promoted model: find every white cell, label it, count.

This is what a lab does with the model it pulled from the store (`hemaflow pull`): the
segmentation settings and input size the model was trained with travel in its card.json
(the params of the run that promoted it), so a pulled model crops cells exactly as its
training crops were cut. Two layouts, as in training: smear fields (every white cell found
is a cell) and single-cell images such as PBC's (the one centred cell, cut by the segment
stage's own single_cell_crop); by default the layout the model was trained on. A model trained
on centred windows of single-cell images (single_cell_crop: centre) sees the same window
around each cell of a smear. Outputs: one row per cell (box, top-3 classes with their
probabilities, flags) in cells.csv, the differential count (counts and percentages per class)
per image and over the whole input in differential.csv, everything in results.json,
optional PNG overlays (boxes and labels), and the review list (unreadable files, fields
without a cell, doubtful cells). Unreadable files are reported and skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hemaflow.config import Params
from hemaflow.errors import StageInputError
from hemaflow.imageio import read_image
from hemaflow.model_folder import open_model_folder
from hemaflow.progress import Progress, track
from hemaflow.review import ReviewItem, write_review
from hemaflow.tta import predict_probs
from hemaflow.tasks.segment import FIELD_SOURCES, cell_window, crop_cell, find_white_cells, single_cell_crop

STAGE = "classify"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
TOP_K = 3
CELL_COLUMNS = ("image", "cell", "x0", "y0", "x1", "y1", "label", "probability", "top2_label", "top2_probability",
                "top3_label", "top3_probability", "flag")
OVERALL = "ALL"
LAYOUTS = ("auto", "smear", "single_cell")
# classes without a nucleus: find_white_cells looks for stained nuclei, so it never finds them
# (a BCCD wbc/rbc/platelet model, PBC's platelet class); class -> spellings, as params' synonyms
NOT_DETECTED = {"rbc": ("red blood cell", "erythrocyte"), "platelet": ("thrombocyte", "plt")}


@dataclass
class ClassifyResult:
    cells_path: Path
    counts_path: Path
    review_path: Path
    n_images: int
    n_cells: int
    counts: dict[str, int] = field(default_factory=dict)
    json_path: Path | None = None
    overlay_dir: Path | None = None
    n_unreadable: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layout: str = "smear"
    crop_rule: str = ""
    tta: bool = False

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds else 0.0

    @property
    def cells_per_s(self) -> float:
        return self.n_cells / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        total = sum(self.counts.values()) or 1
        out = {"images": self.n_images, "layout": f"{self.layout} ({self.crop_rule})" if self.crop_rule else self.layout,
               "test-time augmentation": self.tta, "unreadable (skipped)": self.n_unreadable, "cells": self.n_cells,
               **{f"{k} %": round(100 * v / total, 1) for k, v in self.counts.items()},
               "images/s": round(self.images_per_s, 1), "cells/s": round(self.cells_per_s, 1),
               "cells table": str(self.cells_path), "differential": str(self.counts_path)}
        if self.json_path:
            out["json"] = str(self.json_path)
        if self.overlay_dir:
            out["overlays"] = str(self.overlay_dir)
        for k, w in enumerate(self.warnings, start=1):
            out[f"warning {k}"] = w
        return out


def load_model_dir(model_dir: Path, fallback: Params, folder=None) -> tuple[object, tuple[str, ...], Params]:
    """Model (Keras safe_mode=True), class names and the params it was trained with (card.json's
    segment/train blocks, else `fallback`); every file sha256-checked by hemaflow.model_folder
    before Keras reads it."""
    folder = folder or open_model_folder(model_dir)
    params = fallback
    trained = (folder.card or {}).get("params") or {}
    blocks = {k: trained[k] for k in ("base", "ingest", "segment", "train", "evaluate") if k in trained}
    if blocks:
        params = Params.model_validate(blocks)
    return folder.load(), folder.classes, params


def trained_layout(params: Params) -> str:
    """The layout of the images a model was trained on: 'single_cell' or 'smear'. Smear fields
    (voc_fields) stay smears even when their annotated boxes were the items (BCCD's cell-type
    model: segment.mode single_cell on box crops), since new images come as whole fields; else
    segment.mode decides, and under mode auto the reader, as the segment stage does (reader
    auto -> smear, the default synthetic fields)."""
    mode, reader = params.segment.mode, params.ingest.reader
    if reader in FIELD_SOURCES:
        return "smear"
    if mode != "auto":
        return "smear" if mode == "fields" else "single_cell"
    return "smear" if reader == "auto" else "single_cell"


def undetected_classes(classes: tuple[str, ...]) -> list[str]:
    """The model's classes that the white-cell detector cannot find (no nucleus)."""
    from hemaflow.taxonomy import Taxonomy

    no_nucleus = Taxonomy.build(tuple(NOT_DETECTED), NOT_DETECTED)
    return [c for c in classes if no_nucleus.canonical(c)]


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
    """The RGB crop through training's own resize (tasks/train.py model_pixels), so the model gets
    the pixels evaluate gives it; uint8, a quarter of the memory of float32 for a folder of crops
    held until the batched predict."""
    from hemaflow.tasks.train import model_pixels

    return model_pixels(cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB), image_size).numpy().astype(np.uint8)


def differential(cells: pd.DataFrame, classes: tuple[str, ...], images: list[str]) -> pd.DataFrame:
    """Per image and over everything (row 'ALL'): count and percentage of each class among
    the counted cells (flagged cells are listed but not counted)."""
    counted = cells[cells["flag"] == ""]
    counts = (counted.groupby(["image", "label"]).size().unstack(fill_value=0)
              .reindex(columns=list(classes), fill_value=0))
    counts = counts.reindex(sorted(set(images)), fill_value=0)
    counts.loc[OVERALL] = counts.sum(axis=0)
    totals = counts.sum(axis=1)
    pct = counts.div(totals.where(totals > 0, 1), axis=0).mul(100).round(1)
    out = pd.concat([counts.astype(int), pct.add_suffix(" %")], axis=1)
    out.insert(0, "cells", totals.astype(int))
    out.index.name = "image"
    return out


def draw_overlay(image: np.ndarray, rows: list[dict], path: Path) -> None:
    """The field with every cell's box and top label (flagged cells in orange)."""
    canvas = image.copy()
    for r in rows:
        colour = (0, 140, 255) if r["flag"] else (40, 180, 40)
        cv2.rectangle(canvas, (int(r["x0"]), int(r["y0"])), (int(r["x1"]), int(r["y1"])), colour, 2)
        text = f"{r.get('label', '?')} {r.get('probability', 0):.2f}"
        cv2.putText(canvas, text, (int(r["x0"]), max(12, int(r["y0"]) - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    colour, 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)


def classify_smears(model_dir: Path, inputs: list[Path], out_dir: Path, params: Params,
                    progress: Progress | None = None, batch_size: int = 64, overlays: bool = False,
                    layout: str = "auto", tta: bool | None = None) -> ClassifyResult:
    """Segment every image, classify every cell found; write cells.csv, differential.csv,
    results.json, review.csv (and overlays/*.png when asked). layout: smear, single_cell, or
    auto (what the model was trained on, see trained_layout). tta: average the 8 flips and
    rotations of each crop (None: as the model was evaluated, its params' evaluate.tta)."""
    if layout not in LAYOUTS:
        raise StageInputError(layout, f"unknown layout: choose one of {', '.join(LAYOUTS)}")
    started = time.perf_counter()
    folder = open_model_folder(Path(model_dir))
    model, classes, trained = load_model_dir(Path(model_dir), params, folder)
    seg, size = trained.segment, folder.image_size  # the input size the model itself declares
    trained_on = trained_layout(trained)
    tta = trained.evaluate.tta if tta is None else tta
    layout = trained_on if layout == "auto" else layout
    # a model of centred single-cell windows sees each smear cell through the same window
    windowed = trained_on == "single_cell" and seg.single_cell_crop == "centre"
    crop_rule = (f"single_cell_crop: {seg.single_cell_crop}" if layout == "single_cell" else
                 f"a centred {seg.fallback_crop_px} px window per cell" if windowed else "each cell's box")
    images = list_images([Path(p) for p in inputs])
    rows: list[dict] = []
    crops: list[np.ndarray] = []
    review: list[ReviewItem] = []
    unreadable: list[str] = []
    kept: dict[str, np.ndarray] = {}
    for path in track(images, len(images), progress, every=10):
        # decoded as training decoded its images (EXIF orientation ignored, 16-bit or grey to 8-bit BGR,
        # the decoding guard); a file that cannot be read at all (SourceReadError) stops the run
        real = path.resolve()  # a symlinked input (a DVC cache, a shared folder) is read where it lies
        image = read_image(real.parent, real.name)
        if image is None:
            review.append(ReviewItem(STAGE, path.name, str(path), "unreadable_image",
                                     "cannot be decoded as an image (or is beyond the decoding guard's size limits)"))
            unreadable.append(str(path))
            continue
        if overlays:
            kept[str(path)] = image
        if layout == "single_cell":  # one cell, cut as the segment stage cut the training images
            cut = single_cell_crop(image, seg)
            for k, det in cut.secondary.items():
                review.append(ReviewItem(STAGE, f"{path.name}#s{k}", str(path), "secondary_cell",
                                         f"another cell at box {det.box}, not the image's centred cell: not classified"))
            if cut.fallback:
                review.append(ReviewItem(STAGE, f"{path.name}#0", str(path), "centre_crop_fallback", cut.fallback))
            x0, y0, x1, y1 = cut.det.box
            rows.append({"image": str(path), "cell": 0, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "flag": ""})
            crops.append(_to_model_input(cut.crop, size))
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
            crop = cell_window(image, det, seg) if windowed else crop_cell(image, det, seg)
            crops.append(_to_model_input(crop, size))
    if crops:
        probs = predict_probs(model, np.stack(crops), tta=tta, batch_size=batch_size)
        for row, p in zip(rows, probs):
            order = np.argsort(-p)[:TOP_K]
            row["label"], row["probability"] = classes[int(order[0])], round(float(p[order[0]]), 4)
            for k, idx in enumerate(order[1:], start=2):
                row[f"top{k}_label"], row[f"top{k}_probability"] = classes[int(idx)], round(float(p[idx]), 4)
    cells = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
    readable = [str(p) for p in images if str(p) not in set(unreadable)]
    diff = differential(cells, classes, readable)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells_path, counts_path, review_path = out_dir / "cells.csv", out_dir / "differential.csv", out_dir / "review.csv"
    cells.to_csv(cells_path, index=False)
    diff.to_csv(counts_path)
    write_review(review, review_path)
    overlay_dir = None
    if overlays:
        overlay_dir = out_dir / "overlays"
        for img_path, image in kept.items():
            draw_overlay(image, [r for r in rows if r["image"] == img_path], overlay_dir / (Path(img_path).stem + ".png"))
    seconds = time.perf_counter() - started

    def block(name: str) -> dict:
        r = diff.loc[name]
        return {"cells": int(r["cells"]), "counts": {c: int(r[c]) for c in classes},
                "percent": {c: float(r[f"{c} %"]) for c in classes}}

    missing = undetected_classes(classes) if layout == "smear" else []  # single-cell images need no nucleus
    warnings = [f"the model's classes {', '.join(missing)} have no nucleus: classify finds white (nucleated) "
                f"cells only, so their counts are only cells mistaken for them, not a count of the smear's "
                f"{', '.join(missing)}"] if missing else []
    card = folder.card or {}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({
        "model": {"sha256": folder.sha256, "name": card.get("name"), "version": card.get("tag"),
                  "classes": list(classes), "trained_on": trained_on},
        "layout": layout, "crop": crop_rule, "tta": tta,
        "overall": block(OVERALL), "images": {img: block(img) for img in readable},
        "cells": json.loads(cells.to_json(orient="records")), "unreadable": unreadable, "warnings": warnings,
        "images_per_s": round(len(images) / seconds, 2) if seconds else None,
    }, indent=2) + "\n")
    return ClassifyResult(cells_path, counts_path, review_path, len(images), len(cells),
                          {c: int(diff.loc[OVERALL, c]) for c in classes}, json_path=json_path,
                          overlay_dir=overlay_dir, n_unreadable=len(unreadable), seconds=seconds,
                          warnings=warnings, layout=layout, crop_rule=crop_rule, tta=tta)
