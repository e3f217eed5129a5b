"""Ingest: scan the raw dataset into one manifest (parquet) with content and perceptual hashes.

A reader (hemaflow.readers, chosen by params or detected) turns the layout into items;
this stage hashes and decodes each one and writes one manifest row per image. Nothing
here judges labels: every image and every label row becomes a row, and problems
(unreadable, truncated or empty file, non-image, size far off, path leaving the data
folder, label without image) are recorded in `error` as "<reason_code>: <detail>" for
validate_labels to route to the review list. Raw files are only read. Images are
streamed one at a time (each file's bytes are read once, hashed and decoded from the
same buffer), so memory holds the manifest rows, never the images.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from hemaflow.config import IngestParams
from hemaflow.errors import SourceReadError, require_dir
from hemaflow.imageio import describe_bytes, describe_pixels
from hemaflow.progress import Progress, track
from hemaflow.readers import IMAGE_SUFFIXES, SourceItem, scan_raw_dir
from hemaflow.readers.guard import FolderGuard
from hemaflow.readers.items import Scan
from hemaflow.readers.labels_csv import read_labels_csv  # noqa: F401  (re-exported: part of the stage API)
from hemaflow.schema import MANIFEST_COLUMNS

SIZE_CODE = "size_out_of_range"


@dataclass
class IngestResult:
    manifest_path: Path
    n_images: int
    n_label_rows: int
    n_errors: int
    reader: str = ""
    sources: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "reader": self.reader,
            "images": self.n_images,
            "label rows": self.n_label_rows,
            "files with errors": self.n_errors,
            **{f"error: {k}": v for k, v in sorted(self.errors.items())},
            "sources": ", ".join(f"{k}={v}" for k, v in self.sources.items()),
            "manifest": str(self.manifest_path),
        }


def _limits(cfg: IngestParams | None) -> dict:
    cfg = cfg or IngestParams()
    return {"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_file_bytes}


def _read(path: Path) -> bytes:
    """The file's bytes. A read failure (permission, I/O error on a mount) stops the stage: it is
    not a property of the image, and recording it as unreadable would silently shrink the data."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceReadError(path, exc) from None


def describe_item(item: SourceItem, cfg: IngestParams | None = None) -> dict:
    """The per-image facts of one item; a fault found while scanning means the file is not read."""
    if item.error is not None:
        return {"sha256": None, "phash": None, "width": None, "height": None, "channels": None, "error": item.error}
    if item.pixels is not None:
        return describe_pixels(item.pixels, rgb=True)
    p: Path = item.file
    data = _read(p)
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return {"sha256": hashlib.sha256(data).hexdigest(), "phash": None, "width": None, "height": None,
                "channels": None, "error": f"not_an_image: suffix '{p.suffix}' is not an image type"}
    return describe_bytes(data, suffix, **_limits(cfg))


def _record(item: SourceItem, cfg: IngestParams | None = None) -> dict:
    rec = {"image_id": item.image_id, "path": item.path, "source": item.source, "label_raw": item.label_raw,
           "label_raw_2": item.label_raw_2, "boxes": json.dumps([list(b) for b in item.boxes]), "split": item.split}
    rec.update(describe_item(item, cfg))
    return rec


def join_labels(records: list[dict], scan: Scan, raw_dir: Path) -> int:
    """Attach labels CSV rows to images by file name; a row naming no image becomes its own error row."""
    if scan.labels is None:
        return 0
    guard = FolderGuard(raw_dir)
    by_name = {Path(r["path"]).name: r for r in records if r["path"]}
    for lab in scan.labels.itertuples(index=False):
        where = f"({scan.labels_name} line {lab.csv_line}: '{lab.file_name}')"
        target = scan.labels_dir / lab.file_name
        outside = not guard.inside(target)
        if lab.file_name in by_name and not outside:
            by_name[lab.file_name]["label_raw"] = lab.label_raw
            by_name[lab.file_name]["label_raw_2"] = lab.label_raw_2
            continue
        error = ("path_outside_data_folder: the name leaves the data folder" if outside
                 else "label_without_image: the label row names an image that does not exist")
        records.append({"image_id": Path(lab.file_name).stem, "path": None, "sha256": None, "phash": None,
                        "width": None, "height": None, "channels": None, "source": "labels_csv",
                        "label_raw": lab.label_raw, "label_raw_2": lab.label_raw_2, "boxes": "[]", "split": None,
                        "error": f"{error} {where}"})
    return len(scan.labels)


def flag_sizes(df: pd.DataFrame, cfg: IngestParams) -> None:
    """size_out_of_range for decoded images far from their source's usual size, or outside fixed ranges."""
    ok = df["error"].isna() & df["width"].notna()
    for source, rows in df[ok].groupby("source"):
        med_w, med_h = float(rows["width"].median()), float(rows["height"].median())
        for idx, w, h in zip(rows.index, rows["width"], rows["height"]):
            why = None
            if cfg.size_tolerance and not (med_w / cfg.size_tolerance <= w <= med_w * cfg.size_tolerance
                                           and med_h / cfg.size_tolerance <= h <= med_h * cfg.size_tolerance):
                why = (f"{w}x{h} is more than {cfg.size_tolerance:g}x away from the usual "
                       f"{med_w:g}x{med_h:g} of {source} images")
            elif cfg.expected_width and not cfg.expected_width[0] <= w <= cfg.expected_width[1]:
                why = f"width {w} is outside the expected {cfg.expected_width[0]}-{cfg.expected_width[1]}"
            elif cfg.expected_height and not cfg.expected_height[0] <= h <= cfg.expected_height[1]:
                why = f"height {h} is outside the expected {cfg.expected_height[0]}-{cfg.expected_height[1]}"
            if why:
                df.at[idx, "error"] = f"{SIZE_CODE}: {why}"


def ingest(raw_dir: Path, manifest_path: Path, cfg: IngestParams, progress: Progress | None = None) -> IngestResult:
    """Scan raw_dir with the chosen reader, hash and decode every image, join labels, write the manifest."""
    raw_dir = require_dir(raw_dir, "raw data")
    reader, scan = scan_raw_dir(raw_dir, cfg)
    records = [_record(item, cfg) for item in track(scan.items, scan.total, progress, every=50)]
    n_images = sum(1 for r in records if r["path"] is not None)
    n_label_rows = join_labels(records, scan, raw_dir) + scan.label_rows

    df = pd.DataFrame.from_records(records, columns=list(MANIFEST_COLUMNS))
    for c in ("width", "height", "channels"):
        df[c] = df[c].astype("Int64")
    flag_sizes(df, cfg)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(manifest_path, index=False)
    codes = Counter(str(e).partition(": ")[0] for e in df["error"].dropna())
    return IngestResult(manifest_path=manifest_path, n_images=n_images, n_label_rows=n_label_rows,
                        n_errors=int(df["error"].notna().sum()), reader=reader,
                        sources=df["source"].value_counts().to_dict(), errors=dict(codes))
