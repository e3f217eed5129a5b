"""MedMNIST .npz archives (bloodmnist.npz): <split>_images N x H x W [x C] uint8, <split>_labels N x k.

The archive fixes the split. Label indices become class names through
`medmnist_classes[<dataset>]` (dataset = file stem without a `_<size>` suffix, e.g.
bloodmnist_224 -> bloodmnist); an index without a name is kept as its number. Rows are
streamed from the archive, one image in memory at a time.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from hemaflow.config import IngestParams
from hemaflow.imageio import npz_path
from hemaflow.readers.guard import FolderGuard
from hemaflow.readers.items import Scan, SourceItem
from hemaflow.readers.npz import NpzArchive

NAME = "medmnist"
SPLITS = ("train", "val", "test")


def dataset_name(npz_file: Path) -> str:
    return re.sub(r"_\d+$", "", npz_file.stem.lower())


def label_text(label: np.ndarray, classes: tuple[str, ...]) -> str:
    """Label row -> text: one index (multi-class) or the names of the set flags (multi-label)."""
    values = np.atleast_1d(label).astype(np.int64)
    if values.size > 1:  # multi-label task: a 0/1 flag per class
        idx = np.flatnonzero(values)
    else:
        idx = values
    return ", ".join(classes[i] if 0 <= i < len(classes) else str(i) for i in idx)


def _rows(arc: NpzArchive, rel: str, split: str, classes: tuple[str, ...]) -> Iterator[SourceItem]:
    img_key, lab_key = f"{split}_images", f"{split}_labels"
    n_img = arc.shape(img_key)[0] if img_key in arc.headers else 0
    labels = arc.iter_rows(lab_key) if lab_key in arc.headers else iter(())
    images = arc.iter_rows(img_key) if n_img else iter(())
    stem = Path(rel).stem
    for i in range(max(n_img, arc.shape(lab_key)[0] if lab_key in arc.headers else 0)):
        pixels = next(images, None)
        label = next(labels, None)
        item = SourceItem(image_id=f"{stem}/{split}/{i:05d}", path=npz_path(rel, split, i), source=NAME,
                          label_raw=None if label is None else label_text(label, classes), split=split)
        if pixels is None:
            item.path = None
            item.error = f"label_without_image: {rel} has a {lab_key} row {i} but no {img_key} row"
        else:
            item.pixels = pixels
        yield item


def scan(raw_dir: Path, cfg: IngestParams) -> Scan:
    guard = FolderGuard(raw_dir)
    archives: list[tuple[Path, NpzArchive | None, str | None]] = []
    total = 0
    for p in sorted(raw_dir.glob(cfg.npz_glob)):
        error = guard.error(p, "the archive")
        arc = None
        if error is None:
            try:
                arc = NpzArchive(p)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                error = f"unreadable_image: {p.name} is not a readable npz archive ({exc})"
        archives.append((p, arc, error))
        if arc is None:
            total += 1
        else:
            for split in SPLITS:
                total += max((arc.shape(f"{split}_{k}")[0] for k in ("images", "labels")
                              if f"{split}_{k}" in arc.headers), default=0)

    def items():
        for p, arc, error in archives:
            rel = p.relative_to(raw_dir).as_posix()
            if arc is None:
                yield SourceItem(image_id=p.stem, path=rel, source=NAME, file=p, error=error)
                continue
            classes = tuple(cfg.medmnist_classes.get(dataset_name(p), ()))
            try:
                for split in SPLITS:
                    yield from _rows(arc, rel, split, classes)
            finally:
                arc.close()

    return Scan(items=items(), total=total)
