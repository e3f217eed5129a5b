import json

import cv2
import numpy as np
import pandas as pd
import pytest

from hemaflow.config import IngestParams
from hemaflow.errors import StageInputError
from tasks.ingest import describe_image, ingest, read_labels_csv

CFG = IngestParams()


def _field(path, seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _voc(path, boxes):
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>WBC</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
    path.write_text(f"<annotation>{objs}<object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                    f"<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")


@pytest.fixture
def raw(tmp_path):
    raw = tmp_path / "raw"
    for i in range(4):
        _field(raw / "fields" / f"SmearField_{i:05d}.jpg", seed=i)
    _voc(raw / "annotations" / "SmearField_00000.xml", [(10, 12, 30, 40)])
    (raw / "labels.csv").write_text("Image,Category\n0,NEUTROPHIL\n1,\n2,\"NEUTROPHIL, LYMPHOCYTE\"\n9,monocyte\n")
    return raw


def test_manifest_rows_hashes_sizes_boxes(raw, tmp_path):
    out = tmp_path / "m.parquet"
    res = ingest(raw, out, CFG)
    df = pd.read_parquet(out).set_index("image_id")
    assert res.n_images == 4 and res.n_label_rows == 4
    assert len(df) == 5  # 4 images + 1 label row without image
    row = df.loc["SmearField_00000"]
    assert (row.width, row.height, row.channels) == (64, 48, 3)
    assert len(row.sha256) == 64 and json.loads(row.boxes) == [[10, 12, 30, 40]]
    assert row.label_raw == "NEUTROPHIL"
    assert df.loc["SmearField_00001"].label_raw == ""
    assert pd.isna(df.loc["SmearField_00003"].label_raw)  # image without label row
    assert df.loc["SmearField_00009"].error.startswith("label_without_image:")
    assert "labels.csv line 5" in df.loc["SmearField_00009"].error


def test_raw_files_are_not_modified(raw, tmp_path):
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    ingest(raw, tmp_path / "m.parquet", CFG)
    after = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    assert before == after


def test_faulty_files_are_recorded_not_raised(raw, tmp_path):
    (raw / "fields" / "SmearField_00010.jpg").write_bytes(b"this is not a jpeg")
    good = (raw / "fields" / "SmearField_00000.jpg").read_bytes()
    (raw / "fields" / "SmearField_00011.jpg").write_bytes(good[: len(good) // 2])
    ingest(raw, tmp_path / "m.parquet", CFG)
    df = pd.read_parquet(tmp_path / "m.parquet").set_index("image_id")
    assert df.loc["SmearField_00010"].error.startswith("unreadable_image:")
    assert df.loc["SmearField_00011"].error.startswith("truncated_jpeg:")


def test_label_path_leaving_data_folder_is_flagged(raw, tmp_path):
    (raw / "labels.csv").write_text("Image,Category\n../../etc/passwd,NEUTROPHIL\n")
    ingest(raw, tmp_path / "m.parquet", CFG)
    df = pd.read_parquet(tmp_path / "m.parquet")
    assert df["error"].str.startswith("path_outside_data_folder").sum() == 1


def test_class_folder_layout(tmp_path):
    for cls in ("basophil", "monocyte"):
        for i in range(2):
            _field(tmp_path / "images" / cls / f"X_{i}.jpg", seed=i)
    ingest(tmp_path, tmp_path / "m.parquet", CFG)
    df = pd.read_parquet(tmp_path / "m.parquet")
    assert sorted(df["label_raw"]) == ["basophil"] * 2 + ["monocyte"] * 2
    assert set(df["source"]) == {"class_folders"}


def test_errors_name_the_file(tmp_path, raw):
    with pytest.raises(StageInputError, match="nowhere"):
        ingest(tmp_path / "nowhere", tmp_path / "m.parquet", CFG)
    (raw / "labels.csv").write_text("Picture,Kind\n1,x\n")
    with pytest.raises(StageInputError, match=r"labels\.csv.*image column"):
        read_labels_csv(raw / "labels.csv", CFG.id_pattern)
    (raw / "annotations" / "SmearField_00000.xml").write_text("<annotation><object>")
    (raw / "labels.csv").write_text("Image,Category\n")
    with pytest.raises(StageInputError, match=r"SmearField_00000\.xml"):
        ingest(raw, tmp_path / "m.parquet", CFG)


def test_describe_image_empty_file(tmp_path):
    p = tmp_path / "e.jpg"
    p.write_bytes(b"")
    assert describe_image(p)["error"].startswith("empty_file")
