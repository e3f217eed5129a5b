"""Segmentation on the real data: BCCD boxes meet the targets, PBC single-cell images yield their cell.

BCCD: every field, every detection (edge cells included: annotators boxed them) against the
WBC boxes, IoU >= 0.5. The box padding was fitted on ImageSets/Main/train.txt, so test.txt is
reported on its own. PBC: a fixed sample per class; one uncut cell near the centre is expected.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import cv2
import pytest

from hemaflow.boxes import iou
from hemaflow.config import SegmentParams
from hemaflow.voc import read_voc_boxes
from hemaflow.tasks.segment import find_white_cells
from hemaflow.tasks.segment_eval import field_contact_sheet, score_boxes

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
CFG = SegmentParams(method="colour")  # the real-stain detector with its BCCD-fitted defaults
PBC_PER_CLASS = 60
KNOWN_MISLABELLED = {"BloodImage_00133", "BloodImage_00135"}  # a white cell annotated as Platelets


@pytest.fixture(scope="module")
def bccd(shared_data: Path) -> dict:
    root = shared_data / "bccd" / "BCCD"
    ids = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    images = {i: cv2.imread(str(root / "JPEGImages" / f"{i}.jpg")) for i in ids}
    return {"ids": ids, "images": images,
            "truth": {i: read_voc_boxes(root / "Annotations" / f"{i}.xml") for i in ids},
            "pred": {i: [d.box for d in find_white_cells(images[i], CFG)] for i in ids},
            "test": set((root / "ImageSets" / "Main" / "test.txt").read_text().split())}


def test_bccd_boxes_meet_targets(bccd, tmp_path):
    """Measured: all recall 0.989, precision 0.976, mean IoU 0.863; test list 1.000 / 0.947 / 0.853."""
    s = score_boxes(bccd["pred"], bccd["truth"])
    test = score_boxes(bccd["pred"], {i: bccd["truth"][i] for i in bccd["ids"] if i in bccd["test"]})
    print(f"\nBCCD all: recall {s['recall']:.3f} precision {s['precision']:.3f} mean IoU {s['mean_iou']:.3f}; "
          f"test: {test['recall']:.3f} {test['precision']:.3f} {test['mean_iou']:.3f}")
    assert s["truth_boxes"] == 372 and s["images"] == 364
    assert s["recall"] >= 0.98 and s["precision"] >= 0.97 and s["mean_iou"] >= 0.85, s
    assert test["recall"] >= 0.95 and test["precision"] >= 0.92 and test["mean_iou"] >= 0.83, test
    sheet = field_contact_sheet(bccd["images"], s, bccd["pred"], bccd["truth"], tmp_path / "sheet.png", max_fields=8)
    assert cv2.imread(str(sheet)).shape[1] > 1000


def test_bccd_platelets_and_red_cells_do_not_become_detections(bccd, shared_data):
    """A detection matching no WBC box must not sit on an annotated platelet or red cell.

    Measured: only BloodImage_00133 and _00135, where the annotators boxed a plain white cell
    (dark lobed nucleus, lilac cytoplasm) as "Platelets"; the other unmatched detections are
    unannotated edge white cells and split or merged cells."""
    ann = shared_data / "bccd" / "BCCD" / "Annotations"
    bad = []
    for i in bccd["ids"]:
        wbc = bccd["truth"][i]
        others = read_voc_boxes(ann / f"{i}.xml", ("Platelets", "RBC"))
        for b in bccd["pred"][i]:
            if any(iou(b, t) >= 0.5 for t in wbc):
                continue
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            inside = [o for o in others if o[0] <= cx <= o[2] and o[1] <= cy <= o[3]
                      and not any(t[0] <= cx <= t[2] and t[1] <= cy <= t[3] for t in wbc)]
            if any(iou(b, o) >= 0.3 for o in inside):
                bad.append((i, b))
    assert {i for i, _ in bad} <= KNOWN_MISLABELLED, bad


def test_pbc_sample_finds_the_centred_cell(shared_data):
    """Measured on 60 per class: non-platelet classes 98.8% (ig 0.93, basophil 0.97: touching
    cells merged or a large cell flagged as cut), erythroblasts 1.00 (their dark nucleus is
    found like a white cell's); platelets 0.83 (a PBC platelet clump is stained like a nucleus
    and nearly as large), the rest below min_nucleus_frac."""
    root = shared_data / "pbc" / "images"
    rng = random.Random(0)
    found, seen = Counter(), Counter()
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(cls_dir.glob("*.jpg"))
        for f in rng.sample(files, min(PBC_PER_CLASS, len(files))):
            img = cv2.imread(str(f))
            if img is None:
                continue
            h, w = img.shape[:2]
            seen[cls_dir.name] += 1
            found[cls_dir.name] += any(
                not d.touches_border and abs((d.box[0] + d.box[2]) / 2 - w / 2) < w / 4
                and abs((d.box[1] + d.box[3]) / 2 - h / 2) < h / 4 for d in find_white_cells(img, CFG))
    rates = {c: found[c] / seen[c] for c in seen}
    print("\nPBC centred cell found:", {c: round(r, 2) for c, r in rates.items()})
    cells = [c for c in seen if c != "platelet"]
    assert sum(found[c] for c in cells) / sum(seen[c] for c in cells) >= 0.97, rates
    assert min(rates[c] for c in cells) >= 0.9, rates
