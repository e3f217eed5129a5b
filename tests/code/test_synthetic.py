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
    (mx0, my0, mx1, my1), (lx0, ly0, lx1, ly1) = boxes
    assert (mx1 - mx0) > 1.5 * (lx1 - lx0), "a monocyte is much larger than a lymphocyte"


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
    """A linear model on colour histograms must separate the five classes on unseen cells."""
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
    assert model.score(x_test, y_test) >= 0.9
