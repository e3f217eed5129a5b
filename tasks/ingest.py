"""Ingest: scan the raw dataset into one manifest (parquet) with content hashes.

Nothing here judges labels: every image and every label row becomes a manifest row, and
problems (unreadable file, truncated JPEG, path outside the data folder) are recorded in
the `error` column as "<reason_code>: <detail>" for validate_labels to route to the review list. Raw files are only read.
Images are streamed one at a time, so memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hemaflow.config import IngestParams
from hemaflow.errors import StageInputError, require_dir
from hemaflow.progress import Progress, track
from hemaflow.schema import MANIFEST_COLUMNS
from hemaflow.voc import read_voc_boxes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


@dataclass
class IngestResult:
    manifest_path: Path
    n_images: int
    n_label_rows: int
    n_errors: int
    sources: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "images": self.n_images,
            "label rows": self.n_label_rows,
            "files with errors": self.n_errors,
            "sources": ", ".join(f"{k}={v}" for k, v in self.sources.items()),
            "manifest": str(self.manifest_path),
        }


def describe_image(path: Path) -> dict:
    """Hash and decode one file: sha256, size, channels, or the reason it is unusable."""
    data = path.read_bytes()
    info: dict = {"sha256": hashlib.sha256(data).hexdigest(), "width": None, "height": None,
                  "channels": None, "error": None}
    if not data:
        info["error"] = "empty_file: the file has zero bytes"
        return info
    if path.suffix.lower() in {".jpg", ".jpeg"} and data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        info["error"] = "truncated_jpeg: no end-of-image marker, the file was cut short"
        return info
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        info["error"] = "unreadable_image: OpenCV cannot decode it"
        return info
    info["height"], info["width"] = int(img.shape[0]), int(img.shape[1])
    info["channels"] = 1 if img.ndim == 2 else int(img.shape[2])
    return info


def read_labels_csv(csv_path: Path, id_pattern: str) -> pd.DataFrame:
    """Hand-made labels CSV -> (file_name, label_raw) rows.

    Accepts an `Image` column of integer ids (mapped through id_pattern, BCCD style) or file
    names, and a `Category`/`label` column. Blank categories are kept as "" (not dropped).
    """
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise StageInputError(csv_path, f"cannot parse labels CSV ({exc})") from exc
    cols = {c.strip().lower(): c for c in df.columns}
    img_col = next((cols[c] for c in ("image", "image_id", "filename", "file") if c in cols), None)
    lab_col = next((cols[c] for c in ("category", "label", "class") if c in cols), None)
    if img_col is None or lab_col is None:
        raise StageInputError(csv_path, f"needs an image column (Image/filename) and a label column "
                                        f"(Category/label); found {', '.join(df.columns)}")
    rows = []
    for i, (img, lab) in enumerate(zip(df[img_col], df[lab_col])):
        img = img.strip()
        if not img:
            continue  # a fully blank line: nothing to attach a label to
        name = id_pattern.format(int(img)) if img.isdigit() else img
        rows.append({"file_name": name, "label_raw": lab.strip(), "csv_line": i + 2})
    out = pd.DataFrame(rows, columns=["file_name", "label_raw", "csv_line"])
    # several rows for one image: keep every label, the validator sees a multi-label row
    return (out.groupby("file_name", sort=False)
               .agg(label_raw=("label_raw", lambda s: ", ".join(x for x in s if x) if len(s) > 1 else s.iloc[0]),
                    csv_line=("csv_line", "first"))
               .reset_index())


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def scan_fields(raw_dir: Path, cfg: IngestParams) -> tuple[list[dict], pd.DataFrame | None]:
    """Smear-field layout: images by glob, VOC boxes beside them, labels from a CSV."""
    images = sorted(p for p in raw_dir.glob(cfg.images_glob) if p.is_file())
    ann_dir = raw_dir / cfg.annotations_dir
    csv_path = raw_dir / cfg.labels_csv
    labels = read_labels_csv(csv_path, cfg.id_pattern) if csv_path.is_file() else None
    rows = []
    for p in images:
        xml = ann_dir / (p.stem + ".xml")
        boxes = read_voc_boxes(xml) if xml.is_file() else []
        rows.append({"image_id": p.stem, "file": p, "source": "voc_fields", "boxes": boxes, "label_raw": None})
    return rows, labels


def scan_class_folders(raw_dir: Path) -> list[dict]:
    """Class-folder layout: <root>/<class>/<image>, the folder name is the label."""
    base = raw_dir / "images" if (raw_dir / "images").is_dir() else raw_dir
    rows = []
    for p in sorted(base.glob("*/*")):
        if p.is_file() and not p.name.startswith("."):
            rows.append({"image_id": f"{p.parent.name}/{p.stem}", "file": p, "source": "class_folders",
                         "boxes": [], "label_raw": p.parent.name})
    return rows


def detect_layout(raw_dir: Path, cfg: IngestParams) -> str:
    if any(raw_dir.glob(cfg.images_glob)):
        return "fields"
    base = raw_dir / "images" if (raw_dir / "images").is_dir() else raw_dir
    if any(p.is_dir() for p in base.iterdir()):
        return "class_folders"
    raise StageInputError(raw_dir, f"no images found: expected '{cfg.images_glob}' or <class>/<image> folders")


def ingest(raw_dir: Path, manifest_path: Path, cfg: IngestParams, progress: Progress | None = None) -> IngestResult:
    """Scan raw_dir, hash and decode every image, join labels, write the manifest."""
    raw_dir = require_dir(raw_dir, "raw data")
    layout = detect_layout(raw_dir, cfg)
    labels = None
    if layout == "fields":
        items, labels = scan_fields(raw_dir, cfg)
    else:
        items = scan_class_folders(raw_dir)

    records = []
    for it in track(items, len(items), progress, every=50):
        p: Path = it["file"]
        rec = {"image_id": it["image_id"], "path": p.relative_to(raw_dir).as_posix(), "source": it["source"],
               "label_raw": it["label_raw"], "boxes": json.dumps([list(b) for b in it["boxes"]]), "split": None}
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            rec.update(sha256=hashlib.sha256(p.read_bytes()).hexdigest(), width=None, height=None, channels=None,
                       error=f"not_an_image: suffix '{p.suffix}' is not an image type")
        else:
            rec.update(describe_image(p))
        records.append(rec)

    n_label_rows = 0
    if labels is not None:
        n_label_rows = len(labels)
        by_name = {Path(r["path"]).name: r for r in records}
        for lab in labels.itertuples(index=False):
            target = raw_dir / Path(cfg.images_glob).parent / lab.file_name
            if lab.file_name in by_name:
                by_name[lab.file_name]["label_raw"] = lab.label_raw
                continue
            error = ("path_outside_data_folder: the name leaves the data folder" if not _inside(target, raw_dir)
                     else "label_without_image: the label row names an image that does not exist")
            records.append({"image_id": Path(lab.file_name).stem, "path": None, "sha256": None, "width": None,
                            "height": None, "channels": None, "source": "labels_csv", "label_raw": lab.label_raw,
                            "boxes": "[]", "split": None,
                            "error": f"{error} ({cfg.labels_csv} line {lab.csv_line}: '{lab.file_name}')"})

    df = pd.DataFrame.from_records(records, columns=list(MANIFEST_COLUMNS))
    for c in ("width", "height", "channels"):
        df[c] = df[c].astype("Int64")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(manifest_path, index=False)
    return IngestResult(manifest_path=manifest_path, n_images=len(items), n_label_rows=n_label_rows,
                        n_errors=int(df["error"].notna().sum()), sources=df["source"].value_counts().to_dict())
