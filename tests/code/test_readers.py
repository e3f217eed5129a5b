"""Readers and image access on tiny generated fixtures: one per layout, plus npz streaming."""

import json

import cv2
import numpy as np
import pandas as pd
from pathlib import Path

import pytest

from hemaflow.config import IngestParams
from hemaflow.errors import SourceReadError, StageInputError, is_transient
from hemaflow.imageio import jpeg_frame, parse_npz_path, read_image
from hemaflow.readers import detect_reader
from hemaflow.readers.labels_csv import read_labels_csv
from hemaflow.readers.npz import NpzArchive
from hemaflow.tasks.ingest import ingest

CFG = IngestParams()
BLOOD = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")


def _img(path, seed=0, size=(20, 24), ext_flags=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8), list(ext_flags))


def _manifest(path):
    return pd.read_parquet(path).set_index("image_id")


# --- labels CSV -------------------------------------------------------------------------------

def test_bccd_style_labels_csv(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(",Image,Category\n0,0,NEUTROPHIL\n1,1,\n\n3,3,\"NEUTROPHIL,EOSINOPHIL\"\n"
                   "4,4,\"NEUTROPHIL, LYMPHOCYTE\"\n5,BloodImage_00005.jpg,basophil\n6,6,MONOCYTE\n7,6,MONOCYTE\n")
    lab = read_labels_csv(csv, "BloodImage_{:05d}.jpg").set_index("file_name")
    assert lab.loc["BloodImage_00000.jpg"].label_raw == "NEUTROPHIL"
    assert lab.loc["BloodImage_00001.jpg"].label_raw == ""            # blank category kept
    assert lab.loc["BloodImage_00003.jpg"].label_raw == "NEUTROPHIL,EOSINOPHIL"
    assert lab.loc["BloodImage_00004.jpg"].label_raw == "NEUTROPHIL, LYMPHOCYTE"
    assert lab.loc["BloodImage_00005.jpg"].label_raw == "basophil"    # a file name instead of an id
    assert lab.loc["BloodImage_00006.jpg"].label_raw == "MONOCYTE, MONOCYTE"  # two rows for one image
    assert lab.loc["BloodImage_00003.jpg"].csv_line == 5             # the blank line still counts
    assert lab["label_raw_2"].isna().all()


@pytest.mark.parametrize("column", ["Category2", "label_2", "annotator2"])
def test_second_annotator_column(tmp_path, column):
    csv = tmp_path / "labels.csv"
    csv.write_text(f"filename,label,{column}\na.jpg,neutrophil,NEUTROPHIL\nb.jpg,monocyte,lymphocyte\n")
    lab = read_labels_csv(csv, CFG.id_pattern).set_index("file_name")
    assert lab.loc["b.jpg"].tolist()[:2] == ["monocyte", "lymphocyte"]


# --- voc_fields ---------------------------------------------------------------------------------

def test_voc_fields_bccd_layout_with_split_lists(tmp_path):
    root = tmp_path / "BCCD"
    for i in range(3):
        _img(root / "JPEGImages" / f"BloodImage_{i:05d}.jpg", seed=i, size=(48, 64))
    (root / "Annotations").mkdir()
    (root / "Annotations" / "BloodImage_00000.xml").write_text(
        "<annotation><object><name>WBC</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>30</xmax><ymax>40</ymax>"
        "</bndbox></object><object><name>WBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
        "<ymax>9</ymax></bndbox></object><object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>")
    lists = root / "ImageSets" / "Main"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("BloodImage_00000\nBloodImage_00001\n")
    (lists / "test.txt").write_text("BloodImage_00002\n")
    cfg = IngestParams(images_glob="JPEGImages/*.jpg", annotations_dir="Annotations",
                       split_lists_dir="ImageSets/Main", id_pattern="BloodImage_{:05d}.jpg")
    res = ingest(root, tmp_path / "m.parquet", cfg)
    df = _manifest(tmp_path / "m.parquet")
    assert res.reader == "voc_fields" and res.n_label_rows == 0 and res.n_errors == 0
    assert json.loads(df.loc["BloodImage_00000"].boxes) == [[5, 6, 30, 40], [1, 1, 9, 9]]
    assert df.loc["BloodImage_00001"].boxes == "[]" and df["label_raw"].isna().all()
    assert df["split"].tolist() == ["train", "train", "test"]
    assert df.loc["BloodImage_00002"].path == "JPEGImages/BloodImage_00002.jpg"


# --- class_folders ------------------------------------------------------------------------------

def test_class_folders_without_images_dir(tmp_path):
    _img(tmp_path / "raw" / "neutrophil" / "SNE_1.jpg")
    _img(tmp_path / "raw" / "platelet" / "PLATELET_2.png")
    cv2.imwrite(str(tmp_path / "raw" / "platelet" / "PLATELET_3.jpg"), np.full((9, 8), 90, np.uint8))
    res = ingest(tmp_path / "raw", tmp_path / "m.parquet", CFG)
    df = _manifest(tmp_path / "m.parquet")
    assert res.reader == "class_folders"
    assert df.loc["platelet/PLATELET_2"].path == "platelet/PLATELET_2.png"
    assert df.loc["neutrophil/SNE_1"].label_raw == "neutrophil" and df["error"].isna().all()
    assert (df.loc["platelet/PLATELET_3"].channels, df.loc["platelet/PLATELET_3"].width) == (1, 8)
    assert df.loc["platelet/PLATELET_2"].channels == 3


# --- filename_labels ----------------------------------------------------------------------------

def test_all_idb_file_name_labels(tmp_path):
    raw = tmp_path / "ALL_IDB2"
    _img(raw / "img" / "Im001_1.tif", seed=1)
    _img(raw / "img" / "Im002_0.tif", seed=2)
    _img(raw / "img" / "Im003_7.tif", seed=3)
    assert detect_reader(raw, CFG) == "filename_labels"
    (raw / "img" / "readme.jpg").write_bytes(b"")  # a name without a label, and empty
    res = ingest(raw, tmp_path / "m.parquet", IngestParams(reader="filename_labels"))
    df = _manifest(tmp_path / "m.parquet")
    assert df.loc["Im001_1"].label_raw == "lymphoblast" and df.loc["Im002_0"].label_raw == "no_blast"
    assert df.loc["Im003_7"].label_raw == "7"  # unmapped value kept for validate_labels to judge
    assert pd.isna(df.loc["readme"].label_raw) and df.loc["readme"].error.startswith("empty_file")
    assert (df.loc["Im001_1"].width, df.loc["Im001_1"].channels) == (24, 3) and res.reader == "filename_labels"


def test_filename_pattern_needs_a_label_group():
    with pytest.raises(ValueError, match="label"):
        IngestParams(filename_pattern=r"^Im\d+_\d$")


# --- medmnist -----------------------------------------------------------------------------------

def _bloodmnist(path, compressed=False, n=(5, 2, 3), gray=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, 28, 28) if gray else (k, 28, 28, 3)
        arrays[f"{split}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 8).reshape(k, 1).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_medmnist_npz_rows_splits_labels_and_read_back(tmp_path, compressed):
    raw = tmp_path / "raw"
    arrays = _bloodmnist(raw / "bloodmnist.npz", compressed)
    assert detect_reader(raw, CFG) == "medmnist"
    res = ingest(raw, tmp_path / "m.parquet", CFG)
    df = _manifest(tmp_path / "m.parquet")
    assert res.n_images == 10 and res.n_errors == 0 and df["split"].value_counts().to_dict() == {
        "train": 5, "test": 3, "val": 2}
    row = df.loc["bloodmnist/train/00003"]
    assert row.path == "bloodmnist.npz::train/00003" and row.label_raw == BLOOD[3]
    assert (row.width, row.height, row.channels) == (28, 28, 3) and len(row.phash) == 16
    img = read_image(raw, row.path)
    assert img.dtype == np.uint8 and np.array_equal(img, arrays["train_images"][3][:, :, ::-1])  # RGB -> BGR
    assert read_image(raw, "bloodmnist.npz::train/00099") is None
    assert read_image(raw, "bloodmnist.npz::nosplit/00000") is None


def test_medmnist_label_without_image_and_unknown_dataset(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    np.savez(raw / "somemnist_64.npz", train_images=np.zeros((2, 8, 8), np.uint8),
             train_labels=np.array([[0], [3], [1]]))
    ingest(raw, tmp_path / "m.parquet", CFG)
    df = _manifest(tmp_path / "m.parquet")
    assert df["label_raw"].tolist() == ["0", "3", "1"]  # no class names known: indices kept
    assert df.loc["somemnist_64/train/00002"].error.startswith("label_without_image:")
    assert df.loc["somemnist_64/train/00000"].channels == 1
    assert read_image(raw, "somemnist_64.npz::train/00001").shape == (8, 8, 3)


def test_broken_npz_is_recorded(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "bloodmnist.npz").write_bytes(b"PK\x03\x04 truncated")
    ingest(tmp_path / "raw", tmp_path / "m.parquet", CFG)
    assert _manifest(tmp_path / "m.parquet").loc["bloodmnist"].error.startswith("unreadable_image:")


def test_npz_rows_are_streamed_one_at_a_time(tmp_path):
    arrays = _bloodmnist(tmp_path / "b.npz", compressed=True, n=(40, 1, 1))
    arc = NpzArchive(tmp_path / "b.npz")
    rows = []
    for row in arc.iter_rows("train_images"):
        assert row.base is not None and len(row.base) == 28 * 28 * 3  # a buffer of one row, not the array
        rows.append(row.copy())
    assert np.array_equal(np.stack(rows), arrays["train_images"])
    stored_arrays = _bloodmnist(tmp_path / "s.npz")
    stored = NpzArchive(tmp_path / "s.npz")
    assert isinstance(stored.array("train_images"), np.memmap)  # random access without loading
    assert np.array_equal(stored.row("train_images", 2), stored_arrays["train_images"][2])


# --- image access -------------------------------------------------------------------------------

def test_read_image_files_and_paths(tmp_path):
    _img(tmp_path / "a" / "x.jpg", size=(10, 12))
    gray = np.full((6, 7), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    img = read_image(tmp_path, "a/x.jpg")
    assert img.shape == (10, 12, 3) and np.array_equal(img, cv2.imread(str(tmp_path / "a" / "x.jpg")))
    assert read_image(tmp_path, "g.png").shape == (6, 7, 3)
    with pytest.raises(SourceReadError, match="missing.jpg: cannot read the file"):
        read_image(tmp_path, "missing.jpg")  # a listed file that vanished is an error, not bad content
    assert read_image(tmp_path / "a", "../g.png") is None  # outside the data folder
    assert parse_npz_path("bloodmnist.npz::val/00012") == ("bloodmnist.npz", "val", 12)
    assert parse_npz_path("a/x.jpg") is None


def test_jpeg_frame_header(tmp_path):
    _img(tmp_path / "c.jpg", size=(30, 41))
    cv2.imwrite(str(tmp_path / "g.jpg"), np.zeros((5, 9), np.uint8))
    assert jpeg_frame((tmp_path / "c.jpg").read_bytes()) == (41, 30, 3)
    assert jpeg_frame((tmp_path / "g.jpg").read_bytes()) == (9, 5, 1)
    assert jpeg_frame(b"\xff\xd8\xff\xda\x00\x02") is None


# --- fail fast: a read failure is not a decode failure ---

def test_read_failure_is_an_error_not_unreadable(tmp_path):
    (tmp_path / "dir.jpg").mkdir()  # a real OSError (IsADirectoryError) on read
    with pytest.raises(SourceReadError, match="dir.jpg: cannot read the file") as err:
        read_image(tmp_path, "dir.jpg")
    assert not is_transient(err.value), "a deterministic read failure is not retried"


def test_io_error_on_a_mount_is_transient_and_stops_ingest(tmp_path, monkeypatch):
    import errno

    from hemaflow.config import IngestParams
    from hemaflow.tasks.ingest import ingest

    for i in range(3):
        _img(tmp_path / "raw" / "images" / "neutrophil" / f"n{i}.jpg", size=(20, 20))
    real_read = Path.read_bytes

    def flaky(self):
        if self.name == "n1.jpg":
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    with pytest.raises(SourceReadError, match="n1.jpg: cannot read the file .Input/output error.") as err:
        ingest(tmp_path / "raw", tmp_path / "manifest.parquet", IngestParams(reader="class_folders"))
    assert is_transient(err.value), "EIO on a network mount may pass: the flow retries it"
    assert not (tmp_path / "manifest.parquet").exists(), "no manifest that silently lacks the image"
# --- labels_csv ---------------------------------------------------------------------------------

def _csv_layout(raw, csv_text, files=("images/neutrophil/BNE_1.jpg", "images/lymphocyte/LY_7.jpg")):
    for i, rel in enumerate(files):
        _img(raw / rel, seed=i)
    (raw / "labels.csv").write_text(csv_text)
    return raw


def test_labels_csv_matches_paths_and_reports_both_orphans(tmp_path):
    raw = _csv_layout(tmp_path / "raw", "path,label\n./images/neutrophil/BNE_1.jpg,NEUTROPHIL\n"
                                        "images\\lymphocyte\\LY_7.jpg,lymphocyte\nimages/monocyte/MO_3.jpg,monocyte\n",
                      files=("images/neutrophil/BNE_1.jpg", "images/lymphocyte/LY_7.jpg", "images/extra/EO_2.png"))
    (raw / "README.txt").write_text("not an image, not listed: ignored")
    assert detect_reader(raw, CFG) == "labels_csv"  # not class_folders, although images/<class>/ fits that too
    res = ingest(raw, tmp_path / "m.parquet", CFG)
    df = _manifest(tmp_path / "m.parquet")
    assert res.reader == "labels_csv" and res.n_images == 3 and res.n_label_rows == 3
    assert res.errors == {"label_without_image": 1}
    bne = df.loc["images/neutrophil/BNE_1"]
    assert (bne.path, bne.label_raw, bne.width) == ("images/neutrophil/BNE_1.jpg", "NEUTROPHIL", 24)
    assert df.loc["images/lymphocyte/LY_7"].path == "images/lymphocyte/LY_7.jpg"  # backslashes folded
    missing = df.loc["images/monocyte/MO_3"]
    assert pd.isna(missing.path) and missing.label_raw == "monocyte"
    assert missing.error == ("label_without_image: the label row names an image that does not exist "
                             "(labels.csv line 4: 'images/monocyte/MO_3.jpg')")
    extra = df.loc["images/extra/EO_2"]
    assert extra.path == "images/extra/EO_2.png" and pd.isna(extra.label_raw) and pd.isna(extra.error)
    assert set(df["source"]) == {"labels_csv"} and df["split"].isna().all()


def test_labels_csv_faults_reach_the_review_list(tmp_path):
    from hemaflow.config import ValidateLabelsParams
    from hemaflow.tasks.validate_labels import validate_labels
    raw = _csv_layout(tmp_path / "raw", "file,cell_type\nimages/neutrophil/BNE_1.jpg,neutrophil\n"
                                        "images/gone.jpg,lymphocyte\n")
    ingest(raw, tmp_path / "m.parquet", CFG)
    res = validate_labels(tmp_path / "m.parquet", tmp_path / "labels", ValidateLabelsParams(), ("neutrophil", "lymphocyte"),
                          require_every_class=False)
    review = pd.read_csv(tmp_path / "labels" / "review.csv").set_index("item")
    assert res.n_clean == 1 and res.problems == {"label_without_image": 1, "image_without_label": 1}
    assert review.loc["images/gone"].reason == "label_without_image"
    assert review.loc["images/gone"].detail.endswith("(labels.csv line 3: 'images/gone.jpg')")
    assert review.loc["images/lymphocyte/LY_7"].reason == "image_without_label"
    assert review.loc["images/lymphocyte/LY_7"].path == "images/lymphocyte/LY_7.jpg"


def test_labels_csv_split_column_and_merged_rows(tmp_path):
    raw = _csv_layout(tmp_path / "raw", "Image Path;Class;Subset\nimages/neutrophil/BNE_1.jpg;neutrophil;Train\n"
                                        "images/lymphocyte/LY_7.jpg;lymphocyte;validation\n"
                                        "images/neutrophil/BNE_1.jpg;neutrophil;\n"
                                        "images/c/X_1.jpg;monocyte;holdout\n",
                      files=("images/neutrophil/BNE_1.jpg", "images/lymphocyte/LY_7.jpg", "images/c/X_1.jpg"))
    ingest(raw, tmp_path / "m.parquet", IngestParams(reader="labels_csv"))
    df = _manifest(tmp_path / "m.parquet")
    assert df.loc["images/neutrophil/BNE_1"].split == "train"
    assert df.loc["images/neutrophil/BNE_1"].label_raw == "neutrophil, neutrophil"  # two rows, one image
    assert df.loc["images/lymphocyte/LY_7"].split == "val"
    assert df.loc["images/c/X_1"].error == ("unknown_split: split 'holdout' is not one of train, val, test "
                                            "(labels.csv line 5: 'images/c/X_1.jpg')")


def test_labels_csv_named_columns_and_missing_columns(tmp_path):
    raw = _csv_layout(tmp_path / "raw", "where,what,annotator\nimages/neutrophil/BNE_1.jpg,seg,neutrophil\n")
    cfg = IngestParams(reader="labels_csv", csv_path_column="where", csv_label_column="What")
    ingest(raw, tmp_path / "m.parquet", cfg)
    assert _manifest(tmp_path / "m.parquet").loc["images/neutrophil/BNE_1"].label_raw == "seg"
    assert detect_reader(raw, CFG) == "class_folders"  # no path column found: not this layout
    with pytest.raises(StageInputError, match=r"needs a path column named path/file/filename/image .*"
                                              r"found where, what, annotator"):
        ingest(raw, tmp_path / "m.parquet", IngestParams(reader="labels_csv"))
    with pytest.raises(StageInputError, match=r"needs a split column 'fold' \(ingest.csv_split_column\)"):
        ingest(raw, tmp_path / "m.parquet", cfg.model_copy(update={"csv_split_column": "fold"}))
    with pytest.raises(StageInputError, match="labels CSV not found"):
        ingest(raw, tmp_path / "m.parquet", cfg.model_copy(update={"labels_csv": "nope.csv"}))


def test_labels_csv_paths_leaving_the_folder_are_not_read(tmp_path):
    outside = tmp_path / "secret"
    _img(outside / "s.jpg")
    raw_abs = (tmp_path / "raw").resolve()
    raw = _csv_layout(tmp_path / "raw", f"path,label\n../secret/s.jpg,neutrophil\n{outside / 's.jpg'} ,neutrophil\n"
                                        "images/link.jpg,neutrophil\nlinkdir/s.jpg,lymphocyte\n"
                                        "images/neutrophil/../neutrophil/BNE_1.jpg,neutrophil\n"
                                        f"{raw_abs}/images/lymphocyte/LY_7.jpg,lymphocyte\n")
    (raw / "images" / "link.jpg").symlink_to(outside / "s.jpg")
    (raw / "linkdir").symlink_to(outside, target_is_directory=True)
    ingest(raw, tmp_path / "m.parquet", CFG)
    df = _manifest(tmp_path / "m.parquet")
    err = df["error"].dropna()
    assert err.str.startswith("path_outside_data_folder: ").sum() == 4 and len(err) == 4
    assert df.loc["../secret/s"].error == ("path_outside_data_folder: the name leaves the data folder "
                                           "(labels.csv line 2: '../secret/s.jpg')")
    assert pd.isna(df.loc["../secret/s"].sha256) and pd.isna(df.loc["images/link"].sha256)  # never read
    assert "resolves to" in df.loc["images/link"].error and "labels.csv line 4" in df.loc["images/link"].error
    assert "labels.csv line 5" in df.loc["linkdir/s"].error
    assert df.loc["images/neutrophil/BNE_1"].label_raw == "neutrophil"  # a/../a folded
    assert df.loc["images/lymphocyte/LY_7"].path == "images/lymphocyte/LY_7.jpg"  # absolute, inside raw_dir
    assert len(df) == 6  # the symlink is the CSV's row, not also an unlisted image


def test_labels_csv_hint_for_case_and_folder_slips(tmp_path):
    raw = _csv_layout(tmp_path / "raw", "filename,label\nImages/Neutrophil/BNE_1.jpg,neutrophil\nLY_7.jpg,lymphocyte\n\n")
    res = ingest(raw, tmp_path / "m.parquet", IngestParams(reader="labels_csv"))
    df = _manifest(tmp_path / "m.parquet")
    assert df.loc["Images/Neutrophil/BNE_1"].error.endswith("; did you mean 'images/neutrophil/BNE_1.jpg'?")
    assert df.loc["LY_7"].error.endswith("(labels.csv line 3: 'LY_7.jpg'); did you mean 'images/lymphocyte/LY_7.jpg'?")
    assert res.n_label_rows == 2 and res.errors == {"label_without_image": 2}


def test_labels_csv_blank_path_with_a_label(tmp_path):
    raw = _csv_layout(tmp_path / "raw", "path,label\n,neutrophil\n ,\nimages/neutrophil/BNE_1.jpg,neutrophil\n")
    ingest(raw, tmp_path / "m.parquet", IngestParams(reader="labels_csv"))
    df = _manifest(tmp_path / "m.parquet")
    assert df.loc["labels.csv:2"].error == ("label_without_image: the label row names no image "
                                            "(labels.csv line 2: blank path)")
    assert len(df) == 3  # the fully blank row is skipped; LY_7 is an unlisted image


def test_voc_layout_wins_over_a_labels_csv(tmp_path):
    raw = tmp_path / "raw"
    _img(raw / "fields" / "SmearField_00000.jpg")
    (raw / "labels.csv").write_text("Image,Category\n0,NEUTROPHIL\nfields/SmearField_00000.jpg,x\n")
    assert detect_reader(raw, CFG) == "voc_fields"
