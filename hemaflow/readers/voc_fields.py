"""Smear fields (BCCD, the synthetic set): images by glob, VOC boxes beside them, labels from a CSV.

ingest.voc_items "objects" reads every annotated object instead, as its own item labelled
by the object's VOC <name> (BCCD: WBC / RBC / Platelets): a cell-type set for labs whose
only labels are the boxes they drew.

Every piece but the images is optional: BCCD ships boxes but not its white-cell labels
CSV; `split_lists_dir` (BCCD ImageSets/Main) fixes the split when given.
"""

from __future__ import annotations

from pathlib import Path

from hemaflow.config import IngestParams
from hemaflow.errors import StageInputError
from hemaflow.imageio import box_path, crop_box, read_image
from hemaflow.readers.guard import FolderGuard
from hemaflow.readers.items import Scan, SourceItem
from hemaflow.readers.labels_csv import read_labels_csv
from hemaflow.voc import read_voc_boxes, read_voc_objects

NAME = "voc_fields"
OBJECTS = "voc_objects"  # source of the per-object items: each shows one cell, so segment treats it as single-cell
SPLITS = ("train", "val", "test")


def read_split_lists(lists_dir: Path) -> dict[str, str]:
    """image id -> split from train.txt / val.txt / test.txt (one id per line)."""
    if not lists_dir.is_dir():
        raise StageInputError(lists_dir, "split lists folder not found (ingest.split_lists_dir)")
    split_of: dict[str, str] = {}
    for split in SPLITS:
        path = lists_dir / f"{split}.txt"
        if path.is_file():
            for image_id in path.read_text().split():
                split_of.setdefault(image_id, split)
    return split_of


def object_items(raw_dir: Path, rel: str, xml: Path, split: str | None, cfg: IngestParams):
    """One item per annotated object of an image (ingest.voc_items: objects): its box's pixels,
    labelled with the object's <name>. The image is decoded once for all its objects."""
    import cv2

    objects = [(n, b) for n, b in read_voc_objects(xml) if not cfg.voc_object_names or n in cfg.voc_object_names]
    img = read_image(raw_dir, rel, cfg.max_pixels, cfg.max_file_bytes)  # the decoding guard applies
    stem = Path(rel).stem
    for k, (name, box) in enumerate(objects):
        item_id, path = f"{stem}/o{k:03d}", box_path(rel, box)
        pixels = None if img is None else crop_box(img, box)
        if pixels is None:
            yield SourceItem(image_id=item_id, path=path, source=OBJECTS, label_raw=name, split=split,
                             error="unreadable_image: the field cannot be decoded or the box lies outside it")
            continue
        yield SourceItem(image_id=item_id, path=path, source=OBJECTS, label_raw=name, split=split,
                         pixels=cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))


def scan(raw_dir: Path, cfg: IngestParams) -> Scan:
    images = sorted(p for p in raw_dir.glob(cfg.images_glob) if p.is_file())
    ann_dir = raw_dir / cfg.annotations_dir
    csv_path = raw_dir / cfg.labels_csv
    labels = read_labels_csv(csv_path, cfg.id_pattern) if csv_path.is_file() else None
    split_of = read_split_lists(raw_dir / cfg.split_lists_dir) if cfg.split_lists_dir else {}
    guard = FolderGuard(raw_dir)
    image_stems = {p.stem for p in images}
    orphan_xml = sorted(x for x in ann_dir.glob("*.xml") if x.stem not in image_stems) if ann_dir.is_dir() else []

    def items():
        for p in images:
            error = guard.error(p)
            xml = ann_dir / (p.stem + ".xml")
            if cfg.voc_items == "objects":
                if error is not None:
                    yield SourceItem(image_id=p.stem, path=p.relative_to(raw_dir).as_posix(), source=OBJECTS,
                                     error=error)
                elif xml.is_file():
                    yield from object_items(raw_dir, p.relative_to(raw_dir).as_posix(), xml, split_of.get(p.stem), cfg)
                continue
            boxes = read_voc_boxes(xml) if error is None and xml.is_file() else []
            yield SourceItem(image_id=p.stem, path=p.relative_to(raw_dir).as_posix(), source=NAME, boxes=boxes,
                             split=split_of.get(p.stem), file=p, error=error)
        for xml in orphan_xml:  # boxes for an image that is not there
            yield SourceItem(image_id=xml.stem, path=None, source=NAME, boxes=read_voc_boxes(xml),
                             error=f"label_without_image: annotation {xml.relative_to(raw_dir).as_posix()} "
                                   f"has no image matching '{cfg.images_glob}'")

    if cfg.voc_items == "objects":  # labels come from the boxes; progress counts fields
        labels, orphan_xml = None, []
    return Scan(items=items(), total=len(images) + len(orphan_xml), labels=labels, labels_name=cfg.labels_csv,
                labels_dir=raw_dir / glob_root(cfg.images_glob))


def glob_root(pattern: str) -> Path:
    """The fixed folder a glob starts from: 'JPEGImages/*.jpg' -> 'JPEGImages', '**/*.jpg' -> '.'."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")
