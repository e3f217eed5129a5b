import json

import cv2
import numpy as np
import pandas as pd
import pytest

from hemaflow.config import IngestParams
from hemaflow.errors import StageInputError
from hemaflow.imageio import describe_bytes
from hemaflow.tasks.ingest import ingest, read_labels_csv

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


def test_describe_bytes_empty_file():
    assert describe_bytes(b"", ".jpg")["error"].startswith("empty_file")


# --- new columns, faults and reader selection -------------------------------------------------

def _read(out):
    return pd.read_parquet(out).set_index("image_id")


def test_phash_and_second_label_columns(raw, tmp_path):
    import imagehash
    from PIL import Image

    (raw / "labels.csv").write_text("Image,Category,Category2\n0,NEUTROPHIL,LYMPHOCYTE\n1,monocyte,\n")
    ingest(raw, tmp_path / "m.parquet", CFG)
    df = _read(tmp_path / "m.parquet")
    gray = cv2.imread(str(raw / "fields" / "SmearField_00000.jpg"), cv2.IMREAD_GRAYSCALE)
    assert df.loc["SmearField_00000"].phash == str(imagehash.phash(Image.fromarray(gray)))
    assert df["phash"].str.fullmatch(r"[0-9a-f]{16}").sum() == 4
    assert (df.loc["SmearField_00000"].label_raw, df.loc["SmearField_00000"].label_raw_2) == ("NEUTROPHIL",
                                                                                              "LYMPHOCYTE")
    assert df.loc["SmearField_00001"].label_raw_2 == ""
    assert pd.isna(df.loc["SmearField_00002"].label_raw_2)  # image without a label row


def test_phash_of_large_image_is_close_to_plain_imagehash(tmp_path):
    import imagehash
    from PIL import Image

    from hemaflow.imageio import phash_hex
    rng = np.random.default_rng(3)
    gray = cv2.GaussianBlur(rng.integers(0, 255, (363, 360), dtype=np.uint8), (0, 0), 8)
    exact = imagehash.phash(Image.fromarray(gray))
    assert exact - imagehash.hex_to_hash(phash_hex(gray)) <= 2


def test_empty_and_non_image_files_in_class_folders(tmp_path):
    for i in range(3):
        _field(tmp_path / "images" / "monocyte" / f"MO_{i}.jpg", seed=i)
    (tmp_path / "images" / "monocyte" / "MO_9.jpg").write_bytes(b"")
    (tmp_path / "images" / "monocyte" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "monocyte" / ".DS_1.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    res = ingest(tmp_path, tmp_path / "m.parquet", CFG)
    df = _read(tmp_path / "m.parquet")
    assert df.loc["monocyte/MO_9"].error.startswith("empty_file:")
    assert df.loc["monocyte/notes"].error.startswith("not_an_image:")
    assert df.loc["monocyte/.DS_1"].error.startswith("unreadable_image:")  # hidden files are not skipped
    assert df.loc["monocyte/MO_0"].error is None or pd.isna(df.loc["monocyte/MO_0"].error)
    assert res.errors == {"empty_file": 1, "not_an_image": 1, "unreadable_image": 1}
    assert pd.isna(df.loc["monocyte/MO_9"].phash) and len(df.loc["monocyte/notes"].sha256) == 64


def test_image_far_from_the_usual_size_is_flagged(tmp_path):
    for i in range(4):
        _field(tmp_path / "images" / "basophil" / f"BA_{i}.jpg", seed=i, size=(40, 42))
    _field(tmp_path / "images" / "basophil" / "BA_big.jpg", size=(400, 420))
    _field(tmp_path / "images" / "basophil" / "BA_near.jpg", size=(44, 46))
    ingest(tmp_path, tmp_path / "m.parquet", CFG)
    df = _read(tmp_path / "m.parquet")
    assert df.loc["basophil/BA_big"].error.startswith("size_out_of_range: 420x400")
    assert df["error"].notna().sum() == 1  # a slightly different size is normal
    assert df.loc["basophil/BA_big"].width == 420  # the facts are kept

    cfg = IngestParams(size_tolerance=None, expected_width=(43, 50))
    ingest(tmp_path, tmp_path / "m2.parquet", cfg)
    df = _read(tmp_path / "m2.parquet")
    assert sorted(df.index[df["error"].fillna("").str.startswith("size_out_of_range")]) == [
        f"basophil/BA_{i}" for i in range(4)] + ["basophil/BA_big"]


def test_symlink_leaving_the_data_folder_is_flagged_not_read(tmp_path):
    raw = tmp_path / "raw"
    _field(raw / "images" / "monocyte" / "MO_0.jpg")
    _field(tmp_path / "outside" / "secret.jpg")
    (raw / "images" / "monocyte" / "MO_1.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    _field(raw / "elsewhere" / "inside.jpg")
    (raw / "images" / "monocyte" / "MO_2.jpg").symlink_to(raw / "elsewhere" / "inside.jpg")  # stays inside: fine
    ingest(raw, tmp_path / "m.parquet", CFG)
    df = _read(tmp_path / "m.parquet")
    row = df.loc["monocyte/MO_1"]
    assert row.error.startswith("path_outside_data_folder:") and pd.isna(row.sha256) and pd.isna(row.width)
    assert pd.isna(df.loc["monocyte/MO_2"].error) and df.loc["monocyte/MO_2"].width == 64


def test_annotation_without_image_is_a_label_without_image(raw, tmp_path):
    _voc(raw / "annotations" / "SmearField_00042.xml", [(1, 2, 30, 40)])
    ingest(raw, tmp_path / "m.parquet", CFG)
    row = _read(tmp_path / "m.parquet").loc["SmearField_00042"]
    assert row.error.startswith("label_without_image: annotation annotations/SmearField_00042.xml")
    assert pd.isna(row.path) and json.loads(row.boxes) == [[1, 2, 30, 40]]


def test_reader_can_be_chosen_and_progress_is_reported(raw, tmp_path):
    for cls in ("basophil", "monocyte"):
        _field(raw / "images" / cls / "X_0.jpg")
    calls = []
    res = ingest(raw, tmp_path / "m.parquet", CFG, progress=lambda done, total: calls.append((done, total)))
    assert res.reader == "voc_fields" and calls[0] == (0, 4) and calls[-1] == (4, 4)  # auto: fields first
    res = ingest(raw, tmp_path / "m.parquet", IngestParams(reader="class_folders"))
    assert res.reader == "class_folders" and set(_read(tmp_path / "m.parquet")["label_raw"]) == {"basophil",
                                                                                                 "monocyte"}


def test_nothing_to_ingest_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageInputError, match=r"empty: no images found"):
        ingest(tmp_path / "empty", tmp_path / "m.parquet", CFG)
