"""Readers: each turns one raw-data layout into a stream of SourceItems for ingest.

  voc_fields       smear fields by glob + Pascal VOC boxes + optional labels CSV (BCCD, synthetic)
  class_folders    <class>/<image> folders, the folder is the label (PBC)
  filename_labels  label inside the file name (ALL-IDB ImXXX_Y.tif)
  medmnist         .npz archives with fixed splits (BloodMNIST)
  labels_csv       images in any sub-folders + a CSV naming each by its relative path, with its label

`ingest.reader: auto` picks one from what raw_dir holds (detect_reader).
"""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path
from typing import Callable

from hemaflow.config import IngestParams
from hemaflow.errors import StageInputError
from hemaflow.readers import class_folders, filename_labels, labels_csv, medmnist, voc_fields
from hemaflow.readers.items import IMAGE_SUFFIXES, Scan, SourceItem

READERS: dict[str, Callable[[Path, IngestParams], Scan]] = {
    voc_fields.NAME: voc_fields.scan,
    class_folders.NAME: class_folders.scan,
    filename_labels.NAME: filename_labels.scan,
    medmnist.NAME: medmnist.scan,
    labels_csv.NAME: labels_csv.scan,
}

__all__ = ["READERS", "Scan", "SourceItem", "detect_reader", "scan_raw_dir"]


def _any(paths) -> bool:
    return next(iter(paths), None) is not None


def detect_reader(raw_dir: Path, cfg: IngestParams) -> str:
    """Layout of raw_dir, checked in order: images_glob hits, a labels CSV naming existing files by path,
    npz archives, class folders, labelled names."""
    if _any(p for p in raw_dir.glob(cfg.images_glob) if p.is_file()):
        return voc_fields.NAME
    if labels_csv.names_existing_files(raw_dir, cfg):
        return labels_csv.NAME
    if _any(raw_dir.glob(cfg.npz_glob)):
        return medmnist.NAME
    base = class_folders.class_root(raw_dir)
    if any(d.is_dir() and _any(f for f in d.iterdir() if f.is_file()) for d in base.iterdir()):
        images = [p for p in islice(raw_dir.rglob("*"), 10_000) if p.suffix.lower() in IMAGE_SUFFIXES]
        pattern = re.compile(cfg.filename_pattern)
        if not (images and all(pattern.match(p.stem) for p in images)):
            return class_folders.NAME
    images = [p for p in islice(raw_dir.glob(cfg.filename_glob), 10_000) if p.suffix.lower() in IMAGE_SUFFIXES]
    if images and all(re.match(cfg.filename_pattern, p.stem) for p in images):
        return filename_labels.NAME
    raise StageInputError(raw_dir, f"no images found: expected '{cfg.images_glob}', '{cfg.npz_glob}', "
                                   f"'{cfg.labels_csv}' naming image paths, <class>/<image> folders "
                                   f"or names matching '{cfg.filename_pattern}' (or set ingest.reader)")


def scan_raw_dir(raw_dir: Path, cfg: IngestParams) -> tuple[str, Scan]:
    """(reader name, scan) for raw_dir, with the reader params choose or detect."""
    name = detect_reader(raw_dir, cfg) if cfg.reader == "auto" else cfg.reader
    return name, READERS[name](raw_dir, cfg)
