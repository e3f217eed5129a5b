"""What every reader yields: one SourceItem per image (or per orphan label)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


@dataclass
class SourceItem:
    image_id: str
    path: str | None                  # manifest path, relative to raw_dir
    source: str                       # reader name, goes to the manifest `source` column
    label_raw: str | None = None
    label_raw_2: str | None = None
    boxes: list = field(default_factory=list)
    split: str | None = None
    file: Path | None = None          # file to hash and decode
    pixels: np.ndarray | None = None  # already-decoded image (npz rows), RGB order as stored
    error: str | None = None          # fault found while scanning; the file is then not read


@dataclass
class Scan:
    """A reader's output: items streamed lazily, their count known up front for progress."""
    items: Iterable[SourceItem]
    total: int
    labels: pd.DataFrame | None = None  # labels CSV rows to join by file name (voc_fields)
    labels_name: str = ""                # the CSV's name, for error details
    labels_dir: Path | None = None       # folder the CSV's file names are relative to
    label_rows: int = 0                  # labels read by the reader itself (labels_csv), for the ingest summary
