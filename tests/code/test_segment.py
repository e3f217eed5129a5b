"""Segment stage: detector accuracy on generated fields with known boxes, crops, review reasons, bad inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hemaflow.boxes import iou, match_boxes
from hemaflow.config import SegmentParams
from hemaflow.errors import StageInputError
from hemaflow.schema import CLEAN_COLUMNS, CROP_COLUMNS
from hemaflow.synthetic import CLASSES, render_field
from tasks.segment import crop_cell, find_white_cells, segment_images, segment_rows

CFG = SegmentParams()


def _jpeg(img: np.ndarray) -> np.ndarray:
    """Round-trip through JPEG q90, as the generated dataset stores fields."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def _field(seed: int, classes: list[str]) -> tuple[np.ndarray, list]:
    img, boxes = render_field(np.random.default_rng([77, seed]), classes)
    return _jpeg(img), boxes


@pytest.fixture(scope="module")
def fields() -> list[tuple[np.ndarray, list]]:
    """30 fields: every class alone, some with two cells of one class, some with two classes."""
    out = []
    for i in range(30):
        cls = CLASSES[i % 5]
        cells = [cls, cls] if i % 7 == 3 else [cls, CLASSES[(i + 2) % 5]] if i % 9 == 4 else [cls]
        out.append(_field(i, cells))
    return out


# --- boxes ---

def test_iou_of_known_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0


def test_match_boxes_is_one_to_one_and_thresholded():
    truth = [(0, 0, 10, 10), (50, 50, 70, 70)]
    pred = [(1, 1, 10, 10), (0, 0, 9, 9), (100, 100, 120, 120)]
    recall, precision, mean_iou, matches = match_boxes(pred, truth)
    assert recall == 0.5 and precision == pytest.approx(1 / 3)
    assert len(matches) == 1 and matches[0][1] == 0
    assert mean_iou == pytest.approx(0.81)
    assert match_boxes([], truth)[:2] == (0.0, 1.0)
    assert match_boxes([], [])[:3] == (1.0, 1.0, 0.0)


# --- detector ---

def test_detector_finds_the_generated_cells(fields):
    """Measured on this set: recall 1.00, precision 1.00, mean IoU ~0.92; asserted with margin."""
    tp = n_pred = n_truth = 0
    ious = []
    for img, truth in fields:
        pred = [d.box for d in find_white_cells(img, CFG)]
        _, _, _, matches = match_boxes(pred, truth)
        tp += len(matches)
        n_pred += len(pred)
        n_truth += len(truth)
        ious += [m[2] for m in matches]
    assert n_truth >= 34
    assert tp / n_truth >= 0.95, f"recall {tp / n_truth:.3f}"
    assert tp / n_pred >= 0.95, f"precision {tp / n_pred:.3f}"
    assert np.mean(ious) >= 0.85, f"mean IoU {np.mean(ious):.3f}"


def test_detection_mask_matches_its_box_and_area(fields):
    img, truth = fields[2]
    (det,) = find_white_cells(img, CFG)
    x0, y0, x1, y1 = det.box
    assert det.mask.shape == (y1 - y0, x1 - x0) and det.mask.dtype == bool
    assert det.mask_area == int(det.mask.sum()) > CFG.min_area_frac * img.shape[0] * img.shape[1]
    assert not det.touches_border


def test_field_without_white_cell_gives_nothing():
    img, _ = _field(1000, [])
    assert find_white_cells(img, CFG) == []


def test_cell_cut_by_the_border_is_marked():
    img, (box,) = _field(1001, ["monocyte"])
    x0, y0, x1, y1 = box
    cut = np.ascontiguousarray(img[:, (x0 + x1) // 2:])  # the field now starts mid-cell
    dets = find_white_cells(cut, CFG)
    assert len(dets) == 1 and dets[0].touches_border and dets[0].box[0] <= 1


def test_find_white_cells_rejects_non_colour_input():
    with pytest.raises(ValueError, match="BGR"):
        find_white_cells(np.zeros((10, 10), np.uint8), CFG)


# --- crops ---

def test_crop_is_square_sized_and_masked(fields):
    img, _ = fields[0]
    (det,) = find_white_cells(img, CFG)
    crop = crop_cell(img, det, CFG)
    assert crop.shape == (CFG.crop_size, CFG.crop_size, 3) and crop.dtype == np.uint8
    assert (crop[0, 0] == 255).all() and (crop[-1, -1] == 255).all(), "outside the cell is white"
    centre = crop[CFG.crop_size // 2 - 5:CFG.crop_size // 2 + 5, CFG.crop_size // 2 - 5:CFG.crop_size // 2 + 5]
    assert centre.mean() < 230, "the cell itself is kept"
    unmasked = crop_cell(img, det, CFG.model_copy(update={"mask_background": False, "crop_size": 64}))
    assert unmasked.shape == (64, 64, 3)
    assert (unmasked != 255).any(axis=2).mean() > 0.95, "without masking the smear shows around the cell"


def test_crop_near_the_border_is_padded_white():
    img, (box,) = _field(1001, ["lymphocyte"])
    x0, y0, x1, y1 = box
    shifted = np.ascontiguousarray(img[:, x0 - 2:])  # cell 2 px from the left edge
    (det,) = find_white_cells(shifted, CFG)
    crop = crop_cell(shifted, det, CFG.model_copy(update={"mask_background": False}))
    assert (crop[:, :3] == 255).all(), "margin beyond the field is white, not wrapped or black"


# --- stage ---

def _clean_row(image_id: str, rel: str | None, label: str) -> dict:
    row = dict.fromkeys(CLEAN_COLUMNS)
    row.update(image_id=image_id, path=rel, sha256="0" * 64, source="test", boxes="[]", label=label,
               label_raw=label.upper())
    return row


@pytest.fixture()
def stage_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """raw dir with: a two-cell field, an empty field, a field cutting its cell, an unreadable file."""
    raw = tmp_path / "raw"
    (raw / "fields").mkdir(parents=True)
    two, _ = _field(2000, ["eosinophil", "eosinophil"])
    empty, _ = _field(2001, [])
    one, (box,) = _field(2002, ["monocyte"])
    cut = one[:, (box[0] + box[2]) // 2:]
    cv2.imwrite(str(raw / "fields" / "a.png"), two)
    cv2.imwrite(str(raw / "fields" / "b.png"), empty)
    cv2.imwrite(str(raw / "fields" / "c.png"), cut)
    (raw / "fields" / "d.jpg").write_bytes(b"not a jpeg at all")
    rows = [_clean_row("A", "fields/a.png", "eosinophil"), _clean_row("B", "fields/b.png", "monocyte"),
            _clean_row("C", "fields/c.png", "monocyte"), _clean_row("D", "fields/d.jpg", "basophil")]
    clean = tmp_path / "clean.parquet"
    pd.DataFrame(rows, columns=list(CLEAN_COLUMNS)).to_parquet(clean)
    return clean, raw


def test_segment_images_writes_crops_table_and_review(stage_inputs, tmp_path):
    clean, raw = stage_inputs
    crops_dir = tmp_path / "crops"
    (crops_dir / "images").mkdir(parents=True)
    (crops_dir / "images" / "stale_c0.png").write_bytes(b"old")
    seen = []
    result = segment_images(clean, raw, crops_dir, CFG, progress=lambda d, t: seen.append((d, t)))

    crops = pd.read_parquet(crops_dir / "crops.parquet")
    assert list(crops.columns) == list(CROP_COLUMNS)
    assert crops["crop_id"].tolist() == ["A_c0", "A_c1"]
    assert set(crops["label"]) == {"eosinophil"} and set(crops["source_path"]) == {"fields/a.png"}
    assert sorted(p.name for p in (crops_dir / "images").iterdir()) == ["A_c0.png", "A_c1.png"]
    for rel in crops["path"]:
        assert cv2.imread(str(crops_dir / rel)).shape == (CFG.crop_size, CFG.crop_size, 3)

    review = pd.read_csv(crops_dir / "review.csv")
    assert dict(zip(review["item"], review["reason"])) == {
        "B": "no_cell_found", "C_c0": "cell_cut_by_border", "D": "unreadable_image"}
    assert set(review["stage"]) == {"segment"}
    assert result.summary() == {"images": 4, "crops": 2, "flagged_total": 3, "flagged": {
        "no_cell_found": 1, "cell_cut_by_border": 1, "implausible_area": 0, "unreadable_image": 1}}
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)


def test_segment_images_is_deterministic(stage_inputs, tmp_path):
    clean, raw = stage_inputs

    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((d / "images").iterdir())}

    segment_images(clean, raw, tmp_path / "one", CFG)
    segment_images(clean, raw, tmp_path / "two", CFG)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert pd.read_parquet(tmp_path / "one" / "crops.parquet").equals(pd.read_parquet(tmp_path / "two" / "crops.parquet"))


def test_too_large_cell_is_flagged_implausible(stage_inputs, tmp_path):
    clean, raw = stage_inputs
    rows = pd.read_parquet(clean).iloc[:1]
    crop_rows, review = segment_rows(rows, raw, tmp_path / "crops", CFG.model_copy(update={"max_area_frac": 0.005}))
    assert crop_rows == []
    assert [r.reason for r in review] == ["implausible_area", "implausible_area"]
    assert "max_area_frac" in review[0].detail


def test_missing_clean_table_names_the_file(tmp_path):
    with pytest.raises(StageInputError, match="nothing.parquet"):
        segment_images(tmp_path / "nothing.parquet", tmp_path, tmp_path / "crops", CFG)


def test_corrupt_clean_table_names_the_file(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(StageInputError, match="broken.parquet.*parquet"):
        segment_images(bad, tmp_path, tmp_path / "crops", CFG)


def test_clean_table_without_label_column_names_file_and_column(tmp_path):
    partial = tmp_path / "partial.parquet"
    pd.DataFrame([_clean_row("A", "x.png", "eosinophil")]).drop(columns=["label"]).to_parquet(partial)
    with pytest.raises(StageInputError, match=r"partial.parquet.*label"):
        segment_images(partial, tmp_path, tmp_path / "crops", CFG)
