"""Pascal VOC annotation files (as in BCCD): white-cell boxes of a smear field."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from hemaflow.errors import StageInputError

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax


def read_voc_boxes(xml_path: Path, names: tuple[str, ...] = ("WBC",)) -> list[Box]:
    """Boxes of the objects whose <name> is in `names`; zero-area boxes are skipped."""
    return [box for name, box in read_voc_objects(xml_path) if name in names]


def read_voc_objects(xml_path: Path) -> list[tuple[str, Box]]:
    """(name, box) of every annotated object, in file order; zero-area boxes are skipped."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise StageInputError(xml_path, f"not a readable Pascal VOC XML file ({exc})") from exc
    boxes: list[tuple[str, Box]] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            raise StageInputError(xml_path, f"object '{name}' has no <bndbox>")
        try:
            box = tuple(int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as exc:
            raise StageInputError(xml_path, f"object '{name}' has a non-numeric box") from exc
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append((name, box))  # type: ignore[arg-type]
    return boxes
