"""The synthetic smear generator: image contract, file formats, planted label faults, determinism."""

from __future__ import annotations

import csv
import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline

from hemaflow.synthetic import CLASSES, _class_counts, generate_dataset, plan_dataset, render_field

N_FIELDS = 14


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate_dataset(out, n_fields=N_FIELDS, seed=3)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_field_draws_one_box_per_cell_inside_the_field():
    img, boxes = render_field(np.random.default_rng(1), ["monocyte", "lymphocyte"])
    assert img.shape == (480, 640, 3) and img.dtype == np.uint8
    assert len(boxes) == 2
    for x0, y0, x1, y1 in boxes:
        assert 0 < x0 < x1 < 640 and 0 < y0 < y1 < 480


def test_monocytes_are_larger_than_lymphocytes_on_average_but_sizes_overlap():
    """Small lymphocytes are much smaller than monocytes; large lymphocytes reach monocyte size."""
    def widths(cls: str) -> list[int]:
        return [b[2] - b[0] for k in range(12)
                for b in render_field(np.random.default_rng([5, k]), [cls], size=(200, 200))[1]]

    mono, lympho = widths("monocyte"), widths("lymphocyte")
    assert np.mean(mono) > 1.3 * np.mean(lympho)
    assert max(lympho) > min(mono), "large lymphocytes overlap small monocytes in size"
    assert min(lympho) < 80, "most lymphocytes stay small"


def test_render_field_background_is_pale_and_cells_are_dark():
    img, (box,) = render_field(np.random.default_rng(2), ["neutrophil"])
    x0, y0, x1, y1 = box
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert np.percentile(gray, 90) > 200, "smear background is pale"
    assert gray[y0:y1, x0:x1].min() < 120, "the nucleus is dark"


def test_render_field_without_cells_and_with_unknown_class():
    img, boxes = render_field(np.random.default_rng(0), [])
    assert boxes == [] and img.shape == (480, 640, 3)
    with pytest.raises(ValueError, match="platelet"):
        render_field(np.random.default_rng(0), ["platelet"])


def test_class_counts_follow_bccd_like_imbalance():
    assert _class_counts(148) == [40, 34, 28, 26, 20]
    assert sum(_class_counts(37)) == 37


def test_plan_plants_every_labels_fault():
    plan = plan_dataset(150, seed=0)
    f = plan["faults"]
    ids = [i for i, _ in plan["rows"]]
    texts = dict(plan["rows"])
    assert f["unlabelled_id"] not in ids
    assert f["missing_image_id"] >= 150 and f["missing_image_id"] in ids
    assert [texts[i] for i in f["blank_ids"]] == ["", "", ""]
    assert texts[f["multi_label_id"]] == "NEUTROPHIL, LYMPHOCYTE"
    assert plan["cells"][f["multi_label_id"]] == ["neutrophil", "lymphocyte"]
    assert sorted(texts[i] for i in f["variant_ids"]) == ["Monocyte", "Neutrophils", "lymphocyte"]
    twins = [c for c in plan["cells"].values() if len(c) == 2 and c[0] == c[1]]
    assert 10 <= len(twins) <= 20, "about 10% of single-label fields hold two cells of one class"
    with pytest.raises(ValueError, match="at least"):
        plan_dataset(5, seed=0)


def test_generated_files_follow_the_bccd_layout(dataset):
    out, summary = dataset
    jpgs = sorted((out / "fields").glob("*.jpg"))
    assert [p.name for p in jpgs] == [f"SmearField_{i:05d}.jpg" for i in range(N_FIELDS)]
    plan = plan_dataset(N_FIELDS, seed=3)
    for i in range(N_FIELDS):
        root = ET.parse(out / "annotations" / f"SmearField_{i:05d}.xml").getroot()
        assert root.findtext("filename") == f"SmearField_{i:05d}.jpg"
        assert (root.findtext("size/width"), root.findtext("size/height"), root.findtext("size/depth")) == ("640", "480", "3")
        wbcs = [o for o in root.iter("object") if o.findtext("name") == "WBC"]
        assert len(wbcs) == len(plan["cells"][i])
        for o in wbcs:
            x0, y0, x1, y1 = (int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 0 < x0 < x1 < 640 and 0 < y0 < y1 < 480, "default data never cuts a cell at the border"
    assert cv2.imread(str(jpgs[0])).shape == (480, 640, 3)
    assert summary["total_bytes"] / N_FIELDS < 40_000, "keep the embedded dataset small (~5 MB for 150 fields)"


def test_labels_csv_has_the_faults_of_a_hand_made_file(dataset):
    out, summary = dataset
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Image", "Category"]
    body = {int(r[0]): r[1] for r in rows[1:]}
    faults = summary["faults"]
    assert sum(1 for v in body.values() if v == "") == 3
    assert [k for k, v in body.items() if v == "NEUTROPHIL, LYMPHOCYTE"] == [faults["multi_label_id"]]
    assert {"lymphocyte", "Monocyte", "Neutrophils"} <= set(body.values())
    assert [k for k in body if k >= N_FIELDS] == [faults["missing_image_id"]]
    assert set(range(N_FIELDS)) - set(body) == {faults["unlabelled_id"]}
    assert sum(v.isupper() for v in body.values()) >= N_FIELDS - 8, "upper case mostly"


def test_generation_is_byte_for_byte_deterministic(dataset, tmp_path):
    out, _ = dataset
    generate_dataset(tmp_path / "again", n_fields=N_FIELDS, seed=3)
    assert _digest(out) == _digest(tmp_path / "again")
    generate_dataset(tmp_path / "other", n_fields=N_FIELDS, seed=4)
    other = _digest(tmp_path / "other")
    assert all(other[k] != v for k, v in _digest(out).items() if k.endswith(".jpg"))


def _cell_features(img: np.ndarray, box) -> np.ndarray:
    """Colour histogram of the cell (hue x value) plus its size: enough to tell stains apart."""
    x0, y0, x1, y1 = box
    hsv = cv2.cvtColor(img[y0:y1, x0:x1], cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 2], None, [12, 6], [0, 180, 0, 256]).ravel()
    return np.concatenate([hist / hist.sum(), [(x1 - x0) / 100.0]])


def test_classes_are_distinct_enough_to_learn():
    """A linear model on colour histograms separates the five classes on unseen cells well, though
    not perfectly: look-alikes (band neutrophils, large lymphocytes, pale eosinophils, hypogranular
    basophils) and per-field stain drift overlap them. Measured ~0.80; asserted with margin."""
    def sample(seed: int, n: int):
        xs, ys = [], []
        for i in range(n):
            for k, cls in enumerate(CLASSES):
                img, (box,) = render_field(np.random.default_rng([seed, i, k]), [cls], size=(200, 200))
                xs.append(_cell_features(img, box))
                ys.append(cls)
        return np.array(xs), np.array(ys)

    x_train, y_train = sample(10, 8)
    x_test, y_test = sample(11, 6)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    assert model.score(x_test, y_test) >= 0.65


# --- realism: stain / lamp drift, focus drift, touching cells, look-alike nuclei, debris ---

def _background_and_sharpness(seed: int) -> tuple[np.ndarray, float]:
    img, _ = render_field(np.random.default_rng([seed, 0]), ["neutrophil"])
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    bright = gray >= np.percentile(gray, 80)          # plasma between the cells
    return img[bright].astype(float).mean(0), float(cv2.Laplacian(gray, cv2.CV_32F).var())


def test_fields_differ_in_stain_illumination_and_focus():
    stats = [_background_and_sharpness(s) for s in range(12)]
    backgrounds = np.array([b for b, _ in stats])
    sharpness = np.array([v for _, v in stats])
    assert np.ptp(backgrounds.mean(1)) > 8, "lamp brightness drifts between fields"
    tint = backgrounds - backgrounds.mean(1, keepdims=True)
    assert np.ptp(tint, axis=0).max() > 6, "white balance / stain tint drifts between fields"
    assert sharpness.max() > 1.5 * sharpness.min(), "some fields are less in focus than others"
    assert (backgrounds.min(1) > 180).all(), "the background stays pale"


def test_focus_drifts_across_one_field():
    """Blur strength varies within a field: a grid of sharp lines comes out blurrier on one side."""
    from hemaflow.synthetic import _focus

    grid = np.zeros((480, 640, 3), np.float32)
    grid[:, ::16] = grid[::16, :] = 200
    ratios = []
    for s in range(8):
        out = _focus(np.random.default_rng([40, s]), grid.copy())[..., 0]
        peaks = [out[y:y + 120, x:x + 160].max() for y in range(0, 480, 120) for x in range(0, 640, 160)]
        ratios.append(max(peaks) / min(peaks))
    assert max(ratios) > 1.15 and np.median(ratios) > 1.1, ratios


def test_white_cells_touch_red_cells_and_now_and_then_each_other(monkeypatch):
    """Record where red cells are drawn: many white cells have one against or on their rim."""
    import hemaflow.synthetic as synthetic

    drawn: list[tuple[float, float, float]] = []
    real = synthetic._draw_rbc

    def spy(rng, f, cx, cy, R):
        drawn.append((cx, cy, R))
        real(rng, f, cx, cy, R)

    monkeypatch.setattr(synthetic, "_draw_rbc", spy)
    touching_rbc = touching_pairs = 0
    for s in range(20):
        drawn.clear()
        _, boxes = render_field(np.random.default_rng([60, s]), ["lymphocyte", "monocyte"])
        centres = [((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2) for x0, y0, x1, y1 in boxes]
        for x, y, r in centres:
            touching_rbc += min(np.hypot(cx - x, cy - y) - r - R for cx, cy, R in drawn) < 1.0
        (xa, ya, ra), (xb, yb, rb) = centres
        touching_pairs += np.hypot(xa - xb, ya - yb) - ra - rb < 8
    assert touching_rbc >= 15, f"only {touching_rbc} of 40 white cells touch a red cell"
    assert 1 <= touching_pairs <= 12, f"{touching_pairs} of 20 white-cell pairs touch"


def test_neutrophils_are_segmented_or_band_shaped(monkeypatch):
    """A share of neutrophils get a band (one curved C/S piece), the rest 2-5 lobes."""
    import hemaflow.synthetic as synthetic

    for s in range(5):
        band = synthetic._nucleus_band(np.random.default_rng([71, s]), 121, 50.0) > 0.5
        contours, _ = cv2.findContours(band.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        assert len(contours) == 1, "a band nucleus is one piece"
        assert band.sum() < 0.88 * cv2.contourArea(cv2.convexHull(contours[0])), "... and curved"
    kinds = []
    monkeypatch.setattr(synthetic, "_nucleus_band", lambda rng, size, R: kinds.append("band") or np.zeros((size, size)))
    monkeypatch.setattr(synthetic, "_nucleus_segmented", lambda rng, size, R, n: kinds.append(n) or np.zeros((size, size)))
    for s in range(60):
        synthetic._nucleus_neutrophil(np.random.default_rng([70, s]), 121, 50.0)
    assert 10 <= kinds.count("band") <= 32
    assert {2, 3, 4, 5} <= set(kinds)


def test_empty_fields_carry_platelets_and_debris_but_no_white_cell():
    from hemaflow.config import SegmentParams
    from hemaflow.tasks.segment import find_white_cells

    cfg = SegmentParams(method="optical_density")
    specks = 0
    for s in range(4):
        img, _ = render_field(np.random.default_rng([80, s]), [])
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        purple = ((hsv[..., 0] > 120) & (hsv[..., 0] < 165) & (hsv[..., 1] > 40)).astype(np.uint8)
        specks += cv2.connectedComponents(purple)[0] - 1
        assert find_white_cells(img, cfg) == [], "specks and clumps are not taken for white cells"
    assert specks >= 8, "platelets and stain precipitate: small purple specks"
